//! Exact mode over several workers, on the real engine and weights: shards of a canvas, run in threads
//! that add up their parts through an in-process exchange (a farm's go through the coordinator), against
//! one worker's exact mode (the whole canvas evaluated in the same blocks).

use std::sync::{Arc, Mutex};

use image::RgbImage;
use stylefarm_core::job::{ScalePart, ScaleTask};
use stylefarm_core::tiling::{shard_rows, Rect};
use stylefarm_core::{imaging, Optimizer, RenderParams};
use stylefarm_engine::shard::{local_group, Shard, SharedExchange};
use stylefarm_engine::tile::tile_job;
use stylefarm_engine::{BlockedTargets, Device, Engine};
use stylefarm_tests::{pixel_difference, shared_image, weights};
use tch::Tensor;

/// Blocks of 128 px (64-px block rows): two and three shards of the 330 x 250 canvas.
const BLOCK: u32 = 128;
/// Blocks of 192 px (128-px block rows) for the renders: two shards, in 6 blocks where 128 px take 24
/// (evaluated with their halos, 2.6x the canvas' pixels instead of 4.8x).
const RENDER_BLOCK: u32 = 192;

fn images() -> (RgbImage, RgbImage) {
    let content = imaging::resize(
        &imaging::load(&shared_image("tubingen.jpg")).unwrap(),
        330,
        250,
    );
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    (content, style)
}

fn exchanges(n: usize) -> Vec<SharedExchange> {
    local_group(n)
        .into_iter()
        .map(|e| Arc::new(Mutex::new(e)) as SharedExchange)
        .collect()
}

/// The objective and gradient of 2 and 3 shards, each evaluating its own blocks and adding up through
/// the exchange, against one evaluation of the whole canvas in the same blocks: the same losses and, on
/// each shard's own rows, the same gradient, up to the order the Gram sums are added in.
#[test]
fn shards_evaluate_the_whole_canvas_objective_and_gradient() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let (content, style) = images();
    let (w, h) = content.dimensions();
    let params = RenderParams {
        tv_weight: 1e-3,
        ..RenderParams::default()
    };
    let grams = engine
        .style_grams(std::slice::from_ref(&style), w, &params, None)
        .unwrap();
    let x0 = engine
        .vgg()
        .preprocessing()
        .preprocess(&content, Device::Cpu);
    tch::manual_seed(3);
    let x = &x0 + Tensor::randn_like(&x0) * 20.0;
    let whole = BlockedTargets::new(&engine, &x0, &grams, &params, BLOCK).unwrap();
    let (expected, grad) = engine.objective_blocked(&x, &whole, &params).unwrap();
    // rows that are no band of the canvas: an error naming the shard, not a panic
    for rows in [(h + 500, h + 600), (100, 50), (0, h + 1)] {
        let exchange = exchanges(1).remove(0);
        let bad = Shard {
            canvas: (w, h),
            rows,
            exchange,
        };
        let e = BlockedTargets::shard(&engine, &x0, &grams, &params, BLOCK, &bad)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("shard"), "{rows:?}: {e}");
    }
    for n in [2, 3] {
        let bands = shard_rows(h, BLOCK, n);
        assert_eq!(bands.len(), n as usize);
        let shards: Vec<Shard> = bands
            .iter()
            .zip(exchanges(n as usize))
            .map(|(&rows, exchange)| Shard {
                canvas: (w, h),
                rows,
                exchange,
            })
            .collect();
        // a tensor is not shared between threads: each shard has its own engine, as a worker does
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = shards
                .iter()
                .map(|shard| {
                    let (params, style) = (&params, &style);
                    let (x0, x) = (x0.copy(), x.copy());
                    s.spawn(move || {
                        let engine = &Engine::load(&weights(), Device::Cpu).unwrap();
                        let grams = &engine
                            .style_grams(std::slice::from_ref(style), w, params, None)
                            .unwrap();
                        let (y0, y1) = shard.region(BLOCK);
                        let rows = |t: &Tensor| t.narrow(2, i64::from(y0), i64::from(y1 - y0));
                        let targets =
                            BlockedTargets::shard(engine, &rows(&x0), grams, params, BLOCK, shard)
                                .unwrap();
                        let (losses, g) = engine
                            .objective_blocked(&rows(&x), &targets, params)
                            .unwrap();
                        let own = g.narrow(2, i64::from(shard.rows.0 - y0), {
                            i64::from(shard.rows.1 - shard.rows.0)
                        });
                        (losses, own)
                    })
                })
                .collect();
            handles.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        for (losses, _) in &results {
            eprintln!(
                "{n} shards: content {:.1e} style {:.1e} tv {:.1e}",
                rel(losses.content, expected.content),
                rel(losses.style, expected.style),
                rel(losses.tv, expected.tv)
            );
            assert!(rel(losses.content, expected.content) < 1e-5);
            assert!(rel(losses.style, expected.style) < 1e-5);
            assert!(rel(losses.tv, expected.tv) < 1e-5);
        }
        let sharded = Tensor::cat(&results.iter().map(|(_, g)| g).collect::<Vec<_>>(), 2);
        let diff = (&sharded - &grad).norm().double_value(&[]) / grad.norm().double_value(&[]);
        eprintln!("{n} shards: gradient {diff:.1e}");
        assert!(diff < 1e-5, "{n} shards: gradient {diff}");
    }
}

/// A later scale of a tiled job in exact mode, rendered with Adam by one worker (the whole canvas in
/// blocks) and by two shards in threads (tile_job's shards, as workers prepare them): the stitched
/// shards are the whole canvas' render, up to rounding.
#[test]
fn two_shards_render_what_one_worker_renders_with_adam() {
    two_shards_render_what_one_worker_renders(Optimizer::Adam);
}

/// [`two_shards_render_what_one_worker_renders_with_adam`] with L-BFGS: the shards add up its dot
/// products each iteration and take the same steps. L-BFGS carries rounding further than Adam: measured
/// after 4 iterations, the shards differ from one worker by max 6, mean 0.026 levels in 192-px blocks
/// (max 2, mean 0.056 in 128-px blocks), where noise of 1e-7 of each gradient element moves one worker's
/// own render by max 2, mean 0.027 (the shards' gradient differs from one worker's by 1e-7 in norm), and
/// dot products counted over the regions rather than the own rows (a bug, 128-px blocks) by max 52, mean
/// 4.9.
#[test]
fn two_shards_render_what_one_worker_renders_with_lbfgs() {
    two_shards_render_what_one_worker_renders(Optimizer::Lbfgs);
}

fn two_shards_render_what_one_worker_renders(optimizer: Optimizer) {
    stylefarm_tests::one_libtorch_thread();
    let (content, style) = images();
    let (w, h) = content.dimensions();
    // the previous scale's result: the content, a little blurred
    let init = image::imageops::blur(&content, 2.0);
    let params = RenderParams {
        optimizer,
        iterations: 4,
        ..RenderParams::default()
    };
    let task = |part| ScaleTask {
        scale: 1,
        scales: 2,
        canvas_width: w,
        canvas_height: h,
        part,
    };
    let render = |part, exchange| {
        let job = tile_job(
            &content,
            vec![style.clone()],
            Some(&init),
            params.clone(),
            &task(part),
            exchange,
        )
        .unwrap()
        .job;
        Engine::load(&weights(), Device::Cpu)
            .unwrap()
            .render(&job, &mut |_| std::ops::ControlFlow::Continue(()))
            .unwrap()
    };
    let whole = render(
        ScalePart::Whole {
            block: RENDER_BLOCK,
        },
        None,
    );
    let bands = shard_rows(h, RENDER_BLOCK, 2);
    let parts: Vec<RgbImage> = std::thread::scope(|s| {
        let handles: Vec<_> = bands
            .iter()
            .zip(exchanges(2))
            .enumerate()
            .map(|(i, (&(y0, y1), exchange))| {
                let part = ScalePart::Shard {
                    block: RENDER_BLOCK,
                    index: i as u32,
                    shards: 2,
                    rect: Rect {
                        x: 0,
                        y: y0,
                        width: w,
                        height: y1 - y0,
                    },
                };
                let render = &render;
                s.spawn(move || render(part, Some(exchange)))
            })
            .collect();
        handles.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut stitched = RgbImage::new(w, h);
    for (img, &(y0, _)) in parts.iter().zip(&bands) {
        image::imageops::replace(&mut stitched, img, 0, i64::from(y0));
    }
    let (max, mean) = pixel_difference(whole.as_raw(), stitched.as_raw());
    eprintln!("{optimizer:?}, 2 shards against one worker: max {max}, mean {mean:.4} levels");
    let moved = whole
        .as_raw()
        .iter()
        .zip(init.as_raw())
        .filter(|(a, b)| a.abs_diff(**b) > 2)
        .count();
    assert!(
        moved > whole.as_raw().len() / 10,
        "the render hardly changed its init"
    );
    let (max_at_most, mean_under) = match optimizer {
        Optimizer::Adam => (2, 0.01),
        Optimizer::Lbfgs => (8, 0.15),
    };
    assert!(
        max <= max_at_most && mean < mean_under,
        "max {max}, mean {mean}"
    );
}
