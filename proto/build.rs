//! Compiles `onceonly/v1/*.proto` with protox (pure Rust, no `protoc` on the
//! machine) and generates the prost messages and tonic clients and servers.
//! Also writes the encoded file descriptor set for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "onceonly/v1/common.proto",
    "onceonly/v1/evidence.proto",
    "onceonly/v1/connector.proto",
    "onceonly/v1/consent.proto",
    "onceonly/v1/audit.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("onceonly_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;

    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(descriptors)?;
    Ok(())
}
