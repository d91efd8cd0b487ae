//! Compiles `pushgate/v1/*.proto` with protox (a pure-Rust protobuf compiler), so building needs
//! no system `protoc`. Client and server both: the gateway serves the API, the load tool and the
//! tests call it. pbjson-build adds serde impls that follow the proto3 JSON mapping, for the
//! HTTP/JSON API and the `pushgate send` template files.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["pushgate/v1/gateway.proto"];
    println!("cargo:rerun-if-changed=pushgate");
    let descriptors = protox::compile(protos, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("pushgate_descriptor.bin"), &encoded)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .btree_map(".")
        // Hand-written in lib.rs: they carry device tokens, user ids and template texts.
        .skip_debug([
            "pushgate.v1.Recipient",
            "pushgate.v1.Template",
            "pushgate.v1.LocalizedText",
            "pushgate.v1.Variant",
            "pushgate.v1.Receipt",
            "pushgate.v1.DeadLetter",
            "pushgate.v1.InvalidToken",
            "pushgate.v1.OptOutRequest",
            "pushgate.v1.ForgetUserRequest",
            "pushgate.v1.TrackedEvent",
        ])
        .compile_fds(descriptors)?;
    // Proto field names on output (`app_id`, as in the .proto, the README and grpcurl), both
    // spellings accepted on input; every field emitted, so JSON readers need no defaults table.
    pbjson_build::Builder::new()
        .register_descriptors(&encoded)?
        .preserve_proto_field_names()
        .emit_fields()
        .btree_map(["."])
        .build(&[".pushgate.v1"])?;
    Ok(())
}
