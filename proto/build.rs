//! Generates the moe.v1 messages and services with protox (no protoc, no
//! Python: this crate does not link libtorch).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["moe/v1/expert.proto", "moe/v1/generation.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .bytes(".moe.v1.TensorPayload.data")
        .compile_fds(descriptors)?;
    Ok(())
}
