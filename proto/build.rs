//! Generates the moe.v1 messages and services with protox (no protoc needed),
//! and gives this crate's test executables the libtorch rpath.

#[path = "../build-support/rpath.rs"]
mod rpath;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    rpath::emit_torch_rpath();
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
