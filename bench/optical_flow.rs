//! The optical flow of a video frame (engine::flow) on a real photo with a known motion, against one
//! iteration of the render, side by side in one process on the CPU: tubingen.jpg panned by (DX, DY) px.
//!
//!     cargo bench -p stylefarm-engine --bench optical_flow -- [SIZE] [DX] [DY] [REPS]
//!
//! Defaults: 512 px, a pan of (8, 4), 5 repetitions, alternating the flow (both ways and the reliability
//! check, as a video frame's temporal target computes them) and one evaluation of the objective and its
//! gradient (one L-BFGS iteration's work). Prints the median seconds of each and their ratio; the mean
//! endpoint error of the flow against the pan away from the entering strip, in px; the share of pixels
//! found reliable; and the mean absolute difference (0..255) of the previous frame to this one, warped
//! and in place. Weights: $STYLEFARM_WEIGHTS, or the file deploy/setup.sh converts.

use std::time::Instant;

use stylefarm_core::{imaging, RenderParams};
use stylefarm_engine::{flow, Device, Engine};
use tch::{Kind, Tensor};

#[path = "engine_bench.rs"]
mod engine_bench;
use engine_bench::{image, median, weights};

fn main() {
    let args: Vec<i64> = std::env::args()
        .skip(1)
        .take(4)
        .filter_map(|a| a.parse().ok())
        .collect();
    let size = args.first().copied().unwrap_or(512);
    let (dx, dy) = (
        args.get(1).copied().unwrap_or(8),
        args.get(2).copied().unwrap_or(4),
    );
    let reps = args.get(3).copied().unwrap_or(5) as usize;
    let engine = Engine::load(&weights(), Device::Cpu).expect("weights");
    let photo = imaging::load(&image("tubingen.jpg")).unwrap();
    let big = imaging::resize_longest(&photo, (size + dx.abs()) as u32);
    let (w, h) = (size, i64::from(big.height()) - dy.abs());
    let whole = flow::unit_image(&big, Device::Cpu);
    // this frame's pixel p is the previous frame's p + (dx, dy)
    let window = |x: i64, y: i64| whole.narrow(2, y, h).narrow(3, x, w);
    let (x0, y0) = ((-dx).max(0), (-dy).max(0));
    let previous = window(x0, y0);
    let current = window(x0 + dx, y0 + dy);

    // one evaluation of the objective at this size
    let content = imaging::resize(&big, w as u32, h as u32);
    let style = imaging::load(&image("starry_night.jpg")).unwrap();
    let params = RenderParams::default();
    let grams = engine
        .style_grams(std::slice::from_ref(&style), size as u32, &params, None)
        .expect("style targets");
    let targets = engine
        .targets_with(&content, &grams, &params)
        .expect("targets");
    let x = engine
        .vgg()
        .preprocessing()
        .preprocess(&content, Device::Cpu);

    let (mut t_flow, mut t_step) = (Vec::new(), Vec::new());
    let mut found = None;
    for _ in 0..reps {
        let t = Instant::now();
        let backward = flow::flow(&current, &previous);
        let forward = flow::flow(&previous, &current);
        let reliable = flow::reliable(&backward, &forward);
        t_flow.push(t.elapsed().as_secs_f64());
        found = Some((backward, reliable));
        let t = Instant::now();
        let _ = engine.objective(&x, &targets, &params).expect("objective");
        t_step.push(t.elapsed().as_secs_f64());
    }
    let (backward, reliable) = found.expect("at least one repetition");
    // away from the strip that enters the frame, and a margin
    let m = 8 + dx.abs().max(dy.abs());
    let inner = |t: &Tensor| t.narrow(2, m, h - 2 * m).narrow(3, m, w - 2 * m);
    let truth = Tensor::from_slice(&[dx as f32, dy as f32]).reshape([1, 2, 1, 1]);
    let endpoint_error = (inner(&backward) - truth)
        .square()
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        .sqrt()
        .mean(Kind::Float)
        .double_value(&[]);
    let share = reliable.mean(Kind::Float).double_value(&[]);
    let difference = |a: &Tensor| {
        inner(&(a - &current).abs())
            .mean(Kind::Float)
            .double_value(&[])
            * 255.0
    };
    let warped = flow::warp(&previous, &backward);
    let (mf, ms) = (median(t_flow), median(t_step));
    println!(
        "{w}x{h}, pan ({dx}, {dy}) px, {reps} reps: flow both ways + reliability {mf:.3} s, one iteration \
         {ms:.3} s ({:.2}x); mean endpoint error {endpoint_error:.3} px; reliable {:.1}% of pixels; \
         previous frame to this one: {:.2} warped, {:.2} in place (mean abs, 0..255)",
        mf / ms,
        100.0 * share,
        difference(&warped),
        difference(&previous),
    );
}
