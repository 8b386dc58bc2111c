//! Generates the stylefarm.v1 code with tonic-prost-build, using the protoc binary vendored by the
//! protoc-bin-vendored crate (no system protoc needed), and writes the file descriptor set for reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["stylefarm/v1/stylefarm.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // SAFETY: the build script is single-threaded; protoc's location is set before any code generation.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("stylefarm_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    Ok(())
}
