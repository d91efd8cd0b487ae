//! Compiles `pushgate/v1/*.proto` with protox (a pure-Rust protobuf compiler), so building needs
//! no system `protoc`. Client and server both: the gateway serves the API, the load tool and the
//! tests call it.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["pushgate/v1/gateway.proto"];
    println!("cargo:rerun-if-changed=pushgate");
    let descriptors = protox::compile(protos, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("pushgate_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}
