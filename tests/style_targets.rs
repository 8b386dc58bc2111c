//! Style targets computed block by block (what a worker does for a large tiled canvas, so that its memory
//! depends on the tile size) against the one-pass Gram matrices, on the real engine and weights. Measured
//! here: relu1_1-relu4_1 agree to ~1e-7, relu5_1 to ~4e-5 (its receptive field reaches past the halo).

use stylefarm_core::{imaging, RenderParams};
use stylefarm_engine::{BlockedTargets, Device, Engine};
use stylefarm_tests::{shared_image, weights};

#[test]
fn blocked_style_grams_match_the_one_pass_grams() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    let params = RenderParams::default();
    let side = 400;
    let whole = engine
        .style_grams(std::slice::from_ref(&style), side, &params, None)
        .unwrap();
    // larger than the block: computed in blocks of 256 px (128 px each and 64 px of halo on either side)
    let blocked = engine
        .style_grams(std::slice::from_ref(&style), side, &params, Some(256))
        .unwrap();
    // a block as large as the image: the one-pass computation
    let same = engine
        .style_grams(std::slice::from_ref(&style), side, &params, Some(side))
        .unwrap();
    let layers = params.style_layers.len();
    assert!(layers > 0);
    for grams in [&whole, &blocked, &same] {
        assert_eq!(grams.grams().len(), layers, "a Gram matrix a style layer");
    }
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

/// Blocked style targets look at the render's cancel block by block (a large tile's take minutes on a
/// CPU): with the cancel set they stop with Error::Cancelled; with it clear, or without one, they are the
/// same Gram matrices.
#[test]
fn blocked_targets_stop_at_a_cancel() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use stylefarm_engine::cancel::with_cancel;
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    let params = RenderParams::default();
    let grams = || engine.style_grams(std::slice::from_ref(&style), 300, &params, Some(128));
    let flag = Arc::new(AtomicBool::new(false));
    let clear = with_cancel(flag.clone(), grams).unwrap();
    let without = grams().unwrap();
    assert_eq!(clear.grams().len(), params.style_layers.len());
    assert_eq!(without.grams().len(), params.style_layers.len());
    for (a, b) in clear.grams().iter().zip(without.grams()) {
        assert!(a.equal(b));
    }
    flag.store(true, Ordering::Relaxed);
    let cancelled = with_cancel(flag, grams);
    assert!(
        matches!(cancelled, Err(stylefarm_engine::Error::Cancelled)),
        "{:?}",
        cancelled.err()
    );
}

/// The objective and gradient of a whole image evaluated block by block (the exact tiled mode) against the
/// one-pass evaluation, at an image that is neither a multiple of the block nor of 16 px, with uneven style
/// layer weights (2, 0.5, 1.5, 1, 0): both weigh each layer's term alike. Measured here, relative differences
/// (content loss, gradient, style loss): blocks of 256 px (4 blocks, 32 px of halo) 3.3e-5, 3.2e-5, 5e-8;
/// blocks of 128 px (24 blocks, 32 px of halo) 2.8e-4, 7.4e-5, 5e-8 (with weights of 1 each: 2.8e-4, 8.1e-5,
/// 1.3e-6). The gradient's difference is mostly the content layer's at the blocks' edges: weights that make
/// the style's gradient small leave it to that one (relu1_1 alone: 4.9e-3 at 128-px blocks).
#[test]
fn blocked_objective_and_gradient_match_the_one_pass_ones() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let content = imaging::resize(
        &imaging::load(&shared_image("tubingen.jpg")).unwrap(),
        330,
        250,
    );
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    let params = RenderParams {
        tv_weight: 1e-3,
        style_layer_weights: vec![2.0, 0.5, 1.5, 1.0, 0.0],
        ..RenderParams::default()
    };
    let grams = engine
        .style_grams(std::slice::from_ref(&style), 330, &params, None)
        .unwrap();
    let pre = engine.vgg().preprocessing();
    let x0 = pre.preprocess(&content, Device::Cpu);
    // a point away from the content: the upsampled, noisy init of a later scale
    tch::manual_seed(3);
    let x = &x0 + tch::Tensor::randn_like(&x0) * 20.0;
    let whole = engine.targets_with(&content, &grams, &params).unwrap();
    let (expected, grad) = engine.objective(&x, &whole, &params).unwrap();
    for block in [128, 256] {
        let targets = BlockedTargets::new(&engine, &x0, &grams, &params, block).unwrap();
        assert!(targets.len() > 1, "{block}: {} blocks", targets.len());
        let (losses, blocked) = engine.objective_blocked(&x, &targets, &params).unwrap();
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        let grad_rel = (&grad - &blocked).norm().double_value(&[]) / grad.norm().double_value(&[]);
        eprintln!(
            "block {block} ({} blocks): content {:.2e} style {:.2e} tv {:.2e} gradient {grad_rel:.2e}",
            targets.len(),
            rel(losses.content, expected.content),
            rel(losses.style, expected.style),
            rel(losses.tv, expected.tv)
        );
        assert!(rel(losses.tv, expected.tv) < 1e-6);
        assert!(rel(losses.content, expected.content) < 2e-3);
        assert!(rel(losses.style, expected.style) < 1e-4);
        assert!(grad_rel < 1e-3, "{block}: gradient {grad_rel}");
        let without = engine.losses_blocked(&x, &targets, &params).unwrap();
        assert_eq!(without, losses);
    }
}

/// The channels-last layout (an engine option) changes where the numbers sit in memory, not the
/// objective: its losses and gradient against the NCHW layout's, after a warm-up in both. The TF32
/// and cuDNN-autotuner options reach the network and, on a CPU (which has neither), leave every number as
/// it is.
#[test]
fn the_engine_options_give_the_same_objective() {
    stylefarm_tests::one_libtorch_thread();
    use stylefarm_engine::EngineOptions;
    let content = imaging::resize(
        &imaging::load(&shared_image("tubingen.jpg")).unwrap(),
        96,
        72,
    );
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    let params = RenderParams::default();
    let run = |options: EngineOptions| {
        let engine = Engine::load_with(&weights(), Device::Cpu, options).unwrap();
        assert_eq!(engine.options(), options);
        engine.warm_up().unwrap();
        let grams = engine
            .style_grams(std::slice::from_ref(&style), 96, &params, None)
            .unwrap();
        let targets = engine.targets_with(&content, &grams, &params).unwrap();
        tch::manual_seed(5);
        let x0 = engine
            .vgg()
            .preprocessing()
            .preprocess(&content, Device::Cpu);
        let x = &x0 + tch::Tensor::randn_like(&x0) * 20.0;
        engine.objective(&x, &targets, &params).unwrap()
    };
    let default = EngineOptions::default();
    let ((a, ga), (b, gb)) = (
        run(default),
        run(EngineOptions {
            channels_last: !default.channels_last,
            ..default
        }),
    );
    let (c, gc) = run(EngineOptions {
        tf32: !default.tf32,
        ..default
    });
    assert_eq!(c, a);
    assert!(gc.equal(&ga));
    let (d, gd) = run(EngineOptions {
        cudnn_benchmark: !default.cudnn_benchmark,
        ..default
    });
    assert_eq!(d, a);
    assert!(gd.equal(&ga));
    let rel = |x: f64, y: f64| (x - y).abs() / y.abs();
    let grad_rel = (&ga - &gb).norm().double_value(&[]) / ga.norm().double_value(&[]);
    eprintln!(
        "channels-last against row-major (NCHW): content {:.1e} style {:.1e} gradient {grad_rel:.1e}",
        rel(b.content, a.content),
        rel(b.style, a.style)
    );
    assert!(rel(b.content, a.content) < 1e-5 && rel(b.style, a.style) < 1e-5);
    assert!(grad_rel < 1e-5, "gradient {grad_rel}");
    assert!(gb.size() == ga.size());
}

/// A fixed style size (crowsonkb/style-transfer-pytorch's `--style-size`) sizes the style images the same
/// whatever the working size: an image's objective at 64 px with `style_size` 48 is the one with
/// `style_scale` 0.75, and at 96 px the one with `style_scale` 0.5 (the same style side, so the same Gram
/// targets); the default scale gives other targets.
#[test]
fn a_fixed_style_size_is_the_same_at_every_working_size() {
    use image::imageops::{resize, FilterType};
    use stylefarm_engine::RenderJob;
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let content = imaging::load(&shared_image("tubingen.jpg")).unwrap();
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    let evaluate = |side: u32, params: RenderParams| {
        let image = resize(&content, side, side * 3 / 4, FilterType::Triangle);
        let job = RenderJob::new(content.clone(), vec![style.clone()], None, params);
        engine.evaluate(&job, &image).unwrap()
    };
    for (side, scale) in [(64, 0.75), (96, 0.5)] {
        let fixed = evaluate(
            side,
            RenderParams {
                style_size: 48,
                ..RenderParams::default()
            },
        );
        let scaled = evaluate(
            side,
            RenderParams {
                style_scale: scale,
                ..RenderParams::default()
            },
        );
        assert_eq!(fixed, scaled, "{side} px");
        let default = evaluate(side, RenderParams::default());
        assert_ne!(fixed.style, default.style, "{side} px");
    }
}
