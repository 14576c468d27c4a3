//! The gRPC contract of homelab, package `homelab.v1`, and nothing else.
//!
//! # Layout
//! - `homelab/v1/homelab.proto`: the services `Enrollment`, `AgentLink`, `Status` and `Admin`.
//! - [`v1`]: the code that `tonic-prost-build` generates from it at build time.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC server reflection.
//! - [`codec`]: the codec of the generated code (prost with smaller stream buffers).

pub mod codec;

/// Generated messages, clients and servers of `homelab.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
// Reason: generated code; its shape is the generator's, not ours.
pub mod v1 {
    tonic::include_proto!("homelab.v1");
}

/// The encoded `FileDescriptorSet` of the contract, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/homelab_descriptor.bin"));
