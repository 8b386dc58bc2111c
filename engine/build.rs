//! Makes every binary of the crate find libtorch without LD_LIBRARY_PATH: torch-sys sets no rpath, and the
//! linker's `--as-needed` drops libtorch_cuda (nothing references it directly, yet it registers the CUDA
//! backend when loaded). Shared by the crates that link libtorch (`build = "../engine/build.rs"`).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = PathBuf::from(&lib)
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(lib));
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
