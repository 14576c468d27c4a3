//! The codec of every generated client and server: prost, with smaller stream buffers.
//!
//! tonic's default codec allocates an 8 KiB buffer for each direction of every call when the
//! call starts. A coordinator holds one long-lived `AgentLink.Connect` stream per node, so
//! those two buffers were about a quarter of its memory per connected agent. Messages on the
//! link are a few hundred bytes; a 1 KiB buffer grows on demand for the rare large one (a
//! `ListNodes` answer reserves its full size at once), so only the idle cost changes.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// The initial size of a call's encode and decode buffer.
pub const BUFFER_BYTES: usize = 1024;
/// tonic's default: an encoder yields after this many buffered bytes.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// [`tonic_prost::ProstCodec`] with [`BUFFER_BYTES`] buffers. `tonic-prost-build` names it
/// as the codec of the generated code (see `build.rs`).
#[derive(Debug)]
pub struct HomelabCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for HomelabCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for HomelabCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD))
    }
}
