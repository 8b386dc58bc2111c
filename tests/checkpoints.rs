//! A render's checkpoints (`submit --checkpoint-every N`, `--checkpoint-secs S`) through the engine's API,
//! on the real engine and weights: where they are saved, and a render resumed from one.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use image::RgbImage;
use stylefarm_core::checkpoint::{CheckpointEvery, CheckpointFile};
use stylefarm_core::{imaging, Optimizer, RenderParams};
use stylefarm_engine::{Checkpointing, Device, Engine, Progress, RenderJob};
use stylefarm_tests::{shared_image, weights};

fn job(params: RenderParams) -> RenderJob {
    RenderJob::new(
        imaging::load(&shared_image("tubingen.jpg")).unwrap(),
        vec![imaging::load(&shared_image("starry_night.jpg")).unwrap()],
        None,
        params,
    )
}

/// What a render did: its result, every evaluation's (scale, iteration, total loss), and the checkpoints
/// it saved, each with when (after the render's start).
struct Rendered {
    image: RgbImage,
    evaluations: Vec<(u32, u32, f64)>,
    saved: Vec<CheckpointFile>,
    saved_at: Vec<Duration>,
}

/// `job` rendered with checkpoints `every` (iterations when a number), from `resume`; `slower(scale,
/// iteration)` is slept as each evaluation is reported (a slow device, for checkpoints by time).
fn render(
    engine: &Engine,
    job: &RenderJob,
    every: impl Into<Every>,
    resume: Option<CheckpointFile>,
    slower: impl Fn(u32, u32) -> Duration,
) -> Rendered {
    let every = match every.into() {
        Every::Iterations(n) => CheckpointEvery::of(n, 0).unwrap(),
        Every::Checkpoints(every) => every,
    };
    let mut evaluations = Vec::new();
    let mut saved = Vec::new();
    let mut saved_at = Vec::new();
    let started = Instant::now();
    let mut save = |file: CheckpointFile| {
        saved.push(file);
        saved_at.push(started.elapsed());
        Ok(())
    };
    let image = engine
        .render_with(
            job,
            &mut |engine, side| {
                Ok(std::rc::Rc::new(engine.style_grams(
                    &job.styles,
                    side,
                    &job.params,
                    None,
                )?))
            },
            &mut |p: &Progress| {
                evaluations.push((p.scale, p.iteration, p.losses.total));
                std::thread::sleep(slower(p.scale, p.iteration));
                ControlFlow::Continue(())
            },
            None,
            Some(Checkpointing {
                resume,
                every,
                save: &mut save,
            }),
        )
        .unwrap();
    Rendered {
        image,
        evaluations,
        saved,
        saved_at,
    }
}

/// A render's checkpoints: every so many iterations (a number), or as given.
enum Every {
    Iterations(u32),
    Checkpoints(CheckpointEvery),
}

impl From<u32> for Every {
    fn from(n: u32) -> Every {
        Every::Iterations(n)
    }
}

impl From<CheckpointEvery> for Every {
    fn from(every: CheckpointEvery) -> Every {
        Every::Checkpoints(every)
    }
}

/// No pause: a render on this CPU as it is.
fn flat_out(_scale: u32, _iteration: u32) -> Duration {
    Duration::ZERO
}

/// Checkpoints by time (`--checkpoint-secs 1`) come at most once a second of the render, the first a
/// second after its first iteration, whatever the iteration; in a render of over 2 seconds (50 ms slept at
/// each of 50 evaluations), at least once. A render resumed from one starts at its iteration with exactly
/// the loss the uninterrupted render had there. The clock goes on across scales, and no checkpoint is of
/// a scale's first image: a render whose first scale ends with a 3.5-second pause (`--checkpoint-secs 3`)
/// saves its next one at the second scale's iteration 1.
#[test]
fn checkpoints_by_time_come_at_most_that_often() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let job = job(RenderParams {
        size: 32,
        iterations: 49,
        optimizer: Optimizer::Adam,
        ..Default::default()
    });
    let every = CheckpointEvery::of(0, 1).unwrap();
    let slower = Duration::from_millis(50);
    let whole = render(&engine, &job, every, None, |_, _| slower);
    assert!(!whole.saved.is_empty(), "one in 50 x 50 ms");
    let second = Duration::from_secs(1);
    let mut last = Duration::ZERO;
    for (c, &at) in whole.saved.iter().zip(&whole.saved_at) {
        assert!(at - last >= second, "{at:?} after {last:?}");
        last = at;
        assert!((1..49).contains(&c.iteration), "{}", c.iteration);
    }
    let checkpoint = whole.saved[0].clone();
    let iteration = checkpoint.iteration;
    let resumed = render(&engine, &job, 0, Some(checkpoint), flat_out);
    let from = whole
        .evaluations
        .iter()
        .position(|e| e.1 == iteration)
        .unwrap();
    assert_eq!(resumed.evaluations, whole.evaluations[from..]);
    assert_eq!(resumed.image, whole.image);

    // 20 iterations at 32 px, then 10 at 64: 3.5 s slept once the first scale's last one is reported
    let job = crate::job(RenderParams {
        size: 64,
        scales: 2,
        iterations: 20,
        optimizer: Optimizer::Adam,
        ..Default::default()
    });
    let every = CheckpointEvery::of(0, 3).unwrap();
    let pause = |scale, iteration| match (scale, iteration) {
        (1, 20) => Duration::from_millis(3500),
        _ => Duration::ZERO,
    };
    let paused = render(&engine, &job, every, None, pause);
    // a loaded machine may take over 3 s for the first scale's iterations too (it has: 0.75 s each), and
    // save some of them; never its last, and then the second scale's iteration 1, not its first image
    let at: Vec<(u32, u32)> = paused
        .saved
        .iter()
        .map(|c| (c.scale, c.iteration))
        .collect();
    let first_of_2 = at.iter().position(|&(scale, _)| scale == 2);
    assert!(
        first_of_2.is_some_and(|i| at[i] == (2, 1))
            && at
                .iter()
                .all(|&(scale, i)| scale == 2 || (1..20).contains(&i)),
        "{at:?}"
    );
}

/// Checkpoints come every N iterations of each scale, not at a scale's first or last image, each the
/// image of that iteration (and Adam's moments); a render resumed from one skips the scales before it and
/// starts at its iteration with exactly the loss the uninterrupted render had there (the same image).
/// Adam's then goes on exactly as the uninterrupted one: the same losses, the same pixels. L-BFGS's
/// optimizer starts afresh: it ends with the scale's iterations done and a loss near the uninterrupted
/// one's (in these short renders, 30 + 15 iterations, up to 35% higher; BENCHMARKS.md). A checkpoint
/// that does not fit (another scale size, other weights' preprocessing) is ignored: the render starts
/// from the beginning, as one without a checkpoint does.
#[test]
fn a_render_resumes_from_its_checkpoint_at_its_scale_and_iteration() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    for optimizer in [Optimizer::Lbfgs, Optimizer::Adam] {
        let job = job(RenderParams {
            size: 64,
            scales: 2,
            iterations: 30,
            optimizer,
            ..Default::default()
        });
        // 30 iterations at 32 px, 15 at 64
        let whole = render(&engine, &job, 10, None, flat_out);
        let at: Vec<(u32, u32, u32, u32)> = whole
            .saved
            .iter()
            .map(|c| (c.scale, c.iteration, c.width, c.height))
            .collect();
        assert_eq!(
            at,
            [(1, 10, 32, 24), (1, 20, 32, 24), (2, 10, 64, 48)],
            "{optimizer:?}"
        );
        assert!(whole.saved.iter().all(|c| c.preprocessing == "caffe"));
        assert!(whole
            .saved
            .iter()
            .all(|c| c.adam.is_some() == (optimizer == Optimizer::Adam)));

        let loss_at = |r: &Rendered, scale, iteration| {
            r.evaluations
                .iter()
                .find(|e| (e.0, e.1) == (scale, iteration))
                .map(|e| e.2)
                .unwrap()
        };
        for checkpoint in whole.saved.clone() {
            let (scale, iteration) = (checkpoint.scale, checkpoint.iteration);
            let resumed = render(&engine, &job, 0, Some(checkpoint), flat_out);
            let first = resumed.evaluations[0];
            assert_eq!((first.0, first.1), (scale, iteration), "{optimizer:?}");
            assert_eq!(first.2, loss_at(&whole, scale, iteration), "the same image");
            let last = *resumed.evaluations.last().unwrap();
            assert_eq!(
                (last.0, last.1),
                (2, 15),
                "{optimizer:?} from ({scale}, {iteration})"
            );
            assert_eq!(resumed.image.dimensions(), whole.image.dimensions());
            if optimizer == Optimizer::Adam {
                let from = whole
                    .evaluations
                    .iter()
                    .position(|e| (e.0, e.1) == (scale, iteration))
                    .unwrap();
                assert_eq!(resumed.evaluations, whole.evaluations[from..]);
                assert_eq!(
                    resumed.image, whole.image,
                    "Adam from ({scale}, {iteration})"
                );
                continue;
            }
            let (got, want) = (last.2, loss_at(&whole, 2, 15));
            assert!(
                got < first.2 && got < 1.5 * want,
                "{optimizer:?} from ({scale}, {iteration}): {got} vs {want} uninterrupted"
            );
        }

        let mut other_size = whole.saved[0].clone();
        other_size.width = 20;
        other_size.values.truncate(3 * 20 * 24);
        let mut other_weights = whole.saved[2].clone();
        other_weights.preprocessing = "torchvision".into();
        for unfit in [other_size, other_weights] {
            let resumed = render(&engine, &job, 0, Some(unfit), flat_out);
            assert_eq!(
                resumed.evaluations, whole.evaluations,
                "{optimizer:?}: from the start"
            );
            assert_eq!(resumed.image, whole.image);
        }
    }
}

/// With iterate averaging (`avg_decay`), a checkpoint also holds the average of the images before its
/// own, and an Adam render resumed from one goes on exactly as the uninterrupted one: the same losses,
/// the same pixels (the second scale starts from the first's average). Without the average it kept,
/// the resumed render ends elsewhere.
#[test]
fn an_averaged_adam_render_resumes_with_its_average() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let job = job(RenderParams {
        size: 64,
        scales: 2,
        iterations: 30,
        optimizer: Optimizer::Adam,
        avg_decay: 0.9,
        ..Default::default()
    });
    let whole = render(&engine, &job, 10, None, flat_out);
    assert_eq!(whole.saved.len(), 3);
    assert!(whole.saved.iter().all(|c| c.average.is_some()));
    for checkpoint in whole.saved.clone() {
        let (scale, iteration) = (checkpoint.scale, checkpoint.iteration);
        let resumed = render(&engine, &job, 0, Some(checkpoint), flat_out);
        let from = whole
            .evaluations
            .iter()
            .position(|e| (e.0, e.1) == (scale, iteration))
            .unwrap();
        assert_eq!(resumed.evaluations, whole.evaluations[from..]);
        assert_eq!(resumed.image, whole.image, "from ({scale}, {iteration})");
    }
    let forgotten = CheckpointFile {
        average: None,
        ..whole.saved[1].clone()
    };
    let resumed = render(&engine, &job, 0, Some(forgotten), flat_out);
    assert_ne!(
        resumed.image, whole.image,
        "averaged from the checkpoint's image on"
    );
}
