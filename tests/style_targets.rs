//! Style targets computed block by block (what a worker does for a large tiled canvas, so that its memory
//! depends on the tile size) against the one-pass Gram matrices, on the real engine and weights. Measured
//! here: relu1_1-relu4_1 agree to ~1e-7, relu5_1 to ~4e-5 (its receptive field reaches past the halo).

use std::process::Command;

use stylefarm_core::{imaging, RenderParams};
use stylefarm_engine::{Device, Engine};
use stylefarm_tests::{binary, shared_image};

fn weights() -> std::path::PathBuf {
    let out = Command::new(binary())
        .args(["weights", "path"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    line.split('\t').next().unwrap().trim().into()
}

#[test]
fn blocked_style_grams_match_the_one_pass_grams() {
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    let params = RenderParams::default();
    let side = 400;
    let whole = engine.style_grams(std::slice::from_ref(&style), side, &params, None);
    // larger than the block: computed in blocks of 256 px (128 px each and 64 px of halo on either side)
    let blocked = engine.style_grams(std::slice::from_ref(&style), side, &params, Some(256));
    // a block as large as the image: the one-pass computation
    let same = engine.style_grams(std::slice::from_ref(&style), side, &params, Some(side));
    for (k, ((a, b), c)) in whole
        .grams()
        .iter()
        .zip(blocked.grams())
        .zip(same.grams())
        .enumerate()
    {
        let norm = a.norm().double_value(&[]);
        let rel = (a - b).norm().double_value(&[]) / norm;
        eprintln!("{}: relative difference {rel:.2e}", params.style_layers[k]);
        assert!(rel < 1e-3, "{}: {rel}", params.style_layers[k]);
        assert_eq!((a - c).abs().max().double_value(&[]), 0.0);
    }
}
