//! What the engine's benchmarks share: the weights and the sample images.

use std::path::{Path, PathBuf};

/// The repository's root.
pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The VGG19 weights: $STYLEFARM_WEIGHTS, or the file deploy/setup.sh converts (`stylefarm weights path`).
pub(crate) fn weights() -> PathBuf {
    std::env::var_os("STYLEFARM_WEIGHTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let out = std::process::Command::new(repo().join("target/release/stylefarm"))
                .args(["weights", "path"])
                .output()
                .expect(
                    "set STYLEFARM_WEIGHTS, or build the stylefarm binary (cargo build --release)",
                );
            let line = String::from_utf8_lossy(&out.stdout).into_owned();
            PathBuf::from(line.split('\t').next().unwrap_or_default().trim())
        })
}

/// A sample image of ../shared/data/images.
pub(crate) fn image(name: &str) -> PathBuf {
    repo().join("../shared/data/images").join(name)
}

/// The median of `v` (the upper one of an even count).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
