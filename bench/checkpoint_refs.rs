//! The coordinator's look-up of whether a checkpoint's blob is still held (`Scheduler::holds_checkpoint`),
//! made under the scheduler's lock for each checkpoint that a newer one replaces, and for each task that
//! succeeds with one: every few seconds per worker on GPUs. Its time with JOBS batch jobs of 10,000 tasks
//! each in the scheduler (in memory), CHECKPOINTED of them with a task that saved a checkpoint.
//!
//!     cargo bench -p stylefarm-coordinator --bench checkpoint_refs -- [JOBS] [CHECKPOINTED]
//!
//! Defaults: 20 jobs (200,000 tasks), 1 checkpointed. Prints the median of 201 look-ups of a blob that no
//! task holds (the whole look-up, as for each replaced checkpoint).

use std::sync::Arc;
use std::time::Instant;

use stylefarm_coordinator::scheduler::Scheduler;
use stylefarm_coordinator::store::MemoryStore;
use stylefarm_coordinator::SchedulerConfig;
use stylefarm_core::checkpoint::Checkpoint;
use stylefarm_core::ids::{ImageHash, WorkerId};
use stylefarm_core::job::{JobKind, JobSpec};
use stylefarm_core::RenderParams;

/// A batch of 100 contents x 100 styles, its images distinct from every other job's.
fn batch(job: u32, checkpoint_every: u32, priority: i32) -> JobSpec {
    let images = |kind: &str| {
        (0..100)
            .map(|i| ImageHash::of(format!("{kind} {job} {i}").as_bytes()))
            .collect()
    };
    JobSpec {
        priority,
        // one task at a time: the next lease is of the next job
        max_workers: u32::from(checkpoint_every > 0),
        checkpoint_every,
        ..JobSpec::new(
            JobKind::Batch,
            images("content"),
            images("style"),
            RenderParams::default(),
        )
    }
}

fn main() {
    let args: Vec<u32> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let jobs = args.first().copied().unwrap_or(20);
    let checkpointed = args.get(1).copied().unwrap_or(1).min(jobs);
    let s = Scheduler::new(SchedulerConfig::default(), Arc::new(MemoryStore::default())).unwrap();
    // the checkpointed jobs first by priority, one task of each at a time, so that each of the first leases
    // is of another of them
    let mut ids = Vec::new();
    for job in 0..jobs {
        let spec = if job < checkpointed {
            batch(job, 10, (checkpointed - job) as i32)
        } else {
            batch(job, 0, 0)
        };
        ids.push(s.submit(spec, "").unwrap().0);
    }
    for job in 0..checkpointed {
        let lease = s.lease(&WorkerId::from("w")).unwrap().expect("a task");
        let held = Checkpoint {
            blob: ImageHash::of(format!("checkpoint {job}").as_bytes()),
            scale: 1,
            iteration: 10,
            bytes: 100,
        };
        s.save_checkpoint(&lease.lease_id, held.clone()).unwrap();
        assert!(s.holds_checkpoint(&held.blob));
        assert_eq!(
            lease.task.id.job, ids[job as usize],
            "a lease of each checkpointed job"
        );
    }
    let other = ImageHash::of(b"another checkpoint");
    let mut times: Vec<f64> = (0..201)
        .map(|_| {
            let t = Instant::now();
            assert!(!s.holds_checkpoint(&other));
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "{jobs} jobs, {} tasks, {checkpointed} checkpointed: holds_checkpoint median {:.3} ms (min {:.3}, \
         max {:.3})",
        jobs as u64 * 10_000,
        times[100] * 1e3,
        times[0] * 1e3,
        times[200] * 1e3
    );
}
