//! Checkpoints (`submit --checkpoint-every N`) on the real engine, on the CPU: what saving them costs a
//! render, and what resuming from one costs its result, side by side in one process.
//!
//!     cargo bench -p stylefarm-engine --bench checkpoints -- [SIZE] [ITERATIONS] [COST_SIZE] [REPS]
//!
//! Defaults: 128 px, 300 iterations, 512 px, 3 repetitions.
//! 1. Cost: a COST_SIZE render of 5 L-BFGS iterations with a checkpoint at every iteration (4 of them:
//!    not at the first image nor the last) and without, alternating, REPS times each; the median
//!    difference over 4 is one checkpoint's cost: the image read from the device (on the engine thread)
//!    and encoded (which a worker does beside the render, as it sends it), set against one iteration's
//!    time.
//! 2. Resuming: for L-BFGS and Adam, a SIZE render of ITERATIONS iterations (one scale) saving a checkpoint
//!    every third of them, then the same render resumed from each checkpoint: the final total loss of each
//!    against the uninterrupted render's (L-BFGS starts afresh; Adam goes on from its moments, so its
//!    losses should be the same).
//!
//! Weights: $STYLEFARM_WEIGHTS, or the file deploy/setup.sh converts.

use std::ops::ControlFlow;
use std::rc::Rc;
use std::time::Instant;

use stylefarm_core::checkpoint::{CheckpointEvery, CheckpointFile};
use stylefarm_core::{imaging, Optimizer, RenderParams};
use stylefarm_engine::{Checkpointing, Device, Engine, RenderJob};

#[path = "engine_bench.rs"]
mod engine_bench;
use engine_bench::{image, median, weights};

/// Renders `job`, saving a checkpoint every `every` iterations, from `resume` if given: the seconds it
/// took, the last evaluation's total loss, and the checkpoints.
fn render(
    engine: &Engine,
    job: &RenderJob,
    every: u32,
    resume: Option<CheckpointFile>,
) -> (f64, f64, Vec<CheckpointFile>) {
    let mut saved = Vec::new();
    let mut save = |file: CheckpointFile| {
        // encoded as a worker does before it sends one
        file.encode()?;
        saved.push(file);
        Ok(())
    };
    let mut last = 0.0;
    let started = Instant::now();
    engine
        .render_with(
            job,
            &mut |engine, side| {
                Ok(Rc::new(engine.style_grams(
                    &job.styles,
                    side,
                    &job.params,
                    None,
                )?))
            },
            &mut |p| {
                last = p.losses.total;
                ControlFlow::Continue(())
            },
            None,
            Some(Checkpointing {
                resume,
                every: CheckpointEvery::of(every, 0).expect("iterations only"),
                save: &mut save,
            }),
        )
        .expect("render");
    (started.elapsed().as_secs_f64(), last, saved)
}

fn job(size: u32, iterations: u32, optimizer: Optimizer) -> RenderJob {
    RenderJob::new(
        imaging::load(&image("tubingen.jpg")).unwrap(),
        vec![imaging::load(&image("starry_night.jpg")).unwrap()],
        None,
        RenderParams {
            size,
            iterations,
            optimizer,
            ..Default::default()
        },
    )
}

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .take(4)
        .filter_map(|a| a.parse().ok())
        .collect();
    let size = args.first().copied().unwrap_or(128);
    let iterations = args.get(1).copied().unwrap_or(300);
    let cost_size = args.get(2).copied().unwrap_or(512);
    let reps = args.get(3).copied().unwrap_or(3) as usize;
    let engine = Engine::load(&weights(), Device::Cpu).expect("weights");

    let cost_job = job(cost_size, 5, Optimizer::Lbfgs);
    let (mut with, mut without, mut bytes) = (Vec::new(), Vec::new(), 0);
    for _ in 0..reps {
        let (t, _, saved) = render(&engine, &cost_job, 1, None);
        assert_eq!(saved.len(), 4);
        bytes = saved[0].encode().unwrap().len();
        with.push(t);
        without.push(render(&engine, &cost_job, 0, None).0);
    }
    let (with, without) = (median(with), median(without));
    let one = (with - without) / 4.0;
    let c = &cost_job.content;
    let pixels = imaging::working_size(c.width(), c.height(), cost_size);
    println!(
        "cost at {} x {} px: 5 iterations {without:.3} s without checkpoints, {with:.3} s with 4 \
         (medians of {reps}): {:.1} ms a checkpoint, {:.2}% of an iteration ({:.3} s); file {} bytes",
        pixels.0,
        pixels.1,
        one * 1e3,
        100.0 * one / (without / 5.0),
        without / 5.0,
        bytes
    );

    for optimizer in [Optimizer::Lbfgs, Optimizer::Adam] {
        let job = job(size, iterations, optimizer);
        let every = (iterations / 3).max(1);
        let (t, whole, saved) = render(&engine, &job, every, None);
        println!(
            "{optimizer:?}, {size} px, {iterations} iterations: uninterrupted final loss {whole:.4e} \
             ({t:.1} s)"
        );
        for checkpoint in saved {
            let at = checkpoint.iteration;
            let (t, resumed, _) = render(&engine, &job, 0, Some(checkpoint));
            println!(
                "  resumed at iteration {at}: final loss {resumed:.4e}, {:+.1}% ({t:.1} s)",
                100.0 * (resumed / whole - 1.0)
            );
        }
    }
}
