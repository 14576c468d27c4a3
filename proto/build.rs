//! Compiles `homelab/v1/*.proto` with protox, a pure-Rust protobuf compiler, so that a fresh
//! machine builds the contract with `cargo build` alone and no system `protoc`.

use std::{env, path::PathBuf};

const PROTOS: &[&str] = &["homelab/v1/homelab.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=homelab");
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // Server reflection serves this descriptor set, so generic gRPC tools can list the API.
    std::fs::write(
        out.join("homelab_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // No generated `connect` constructors: every client builds its own mTLS channel, and
        // the constructor would clash with the `AgentLink.Connect` method.
        .build_transport(false)
        // prost with smaller per-call buffers: see src/codec.rs.
        .codec_path("crate::codec::HomelabCodec")
        .compile_fds(fds)?;
    Ok(())
}
