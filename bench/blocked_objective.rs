//! One evaluation of the objective and its gradient, whole against block by block (the exact tiled mode),
//! side by side in one process: tubingen x starry_night from ../shared/data, on the CPU.
//!
//!     cargo bench -p stylefarm-engine --bench blocked_objective -- [SIZE] [BLOCK] [REPS] [IMAGE]
//!
//! Defaults: 768 px, 256-px blocks, 5 repetitions, alternating whole and blocked, evaluated at the content
//! plus noise, or at IMAGE (e.g. a finished render of that size, where the style loss is near its optimum). Prints the median seconds
//! of each, their ratio and the relative difference of the gradients. Weights: $STYLEFARM_WEIGHTS, or the
//! file deploy/setup.sh converts (`stylefarm weights path` prints it).

use std::path::Path;
use std::time::Instant;

use stylefarm_core::{imaging, RenderParams};
use stylefarm_engine::{BlockedTargets, Device, Engine};

#[path = "engine_bench.rs"]
mod engine_bench;
use engine_bench::{image, median, weights};

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .take(3)
        .filter_map(|a| a.parse().ok())
        .collect();
    let size = args.first().copied().unwrap_or(768);
    let block = args.get(1).copied().unwrap_or(256);
    let reps = args.get(2).copied().unwrap_or(5) as usize;
    let engine = Engine::load(&weights(), Device::Cpu).expect("weights");
    let content = imaging::resize_longest(&imaging::load(&image("tubingen.jpg")).unwrap(), size);
    let style = imaging::load(&image("starry_night.jpg")).unwrap();
    let params = RenderParams::default();
    let grams = engine
        .style_grams(std::slice::from_ref(&style), size, &params, Some(block))
        .expect("style targets");
    let x0 = engine
        .vgg()
        .preprocessing()
        .preprocess(&content, Device::Cpu);
    // a point away from the content, as during a render
    let x = match std::env::args().nth(4) {
        Some(path) => {
            let img = imaging::load(Path::new(&path)).unwrap();
            assert_eq!(
                img.dimensions(),
                content.dimensions(),
                "{path}: not the content's size"
            );
            engine.vgg().preprocessing().preprocess(&img, Device::Cpu)
        }
        None => &x0 + tch::Tensor::randn_like(&x0) * 20.0,
    };
    let whole = engine
        .targets_with(&content, &grams, &params)
        .expect("targets");
    let blocked = BlockedTargets::new(&engine, &x0, &grams, &params, block).expect("targets");
    let (mut t_whole, mut t_blocked) = (Vec::new(), Vec::new());
    let (mut g_whole, mut g_blocked) = (None, None);
    for _ in 0..reps {
        let t = Instant::now();
        g_whole = Some(engine.objective(&x, &whole, &params).expect("objective").1);
        t_whole.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        g_blocked = Some(
            engine
                .objective_blocked(&x, &blocked, &params)
                .expect("objective")
                .1,
        );
        t_blocked.push(t.elapsed().as_secs_f64());
    }
    let (a, b) = (g_whole.unwrap(), g_blocked.unwrap());
    let diff = (&a - &b).norm().double_value(&[]) / a.norm().double_value(&[]);
    let (w, h) = content.dimensions();
    let (mw, mb) = (median(t_whole), median(t_blocked));
    println!(
        "{w}x{h}, {} blocks of at most {block} px, {reps} reps: whole {mw:.2} s, blocked {mb:.2} s \
         ({:.2}x); gradient relative difference {diff:.1e}",
        blocked.len(),
        mb / mw
    );
}
