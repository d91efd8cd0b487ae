//! Generates the load generator's gRPC client from `../proto` with protox (a pure-Rust protobuf
//! compiler), so building needs no system `protoc`. Client only: the load tool never serves the
//! gateway API, and it cannot depend on the `pushgate` crate (which depends on this one).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let proto = root.join("pushgate/v1/gateway.proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile([&proto], [&root])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
