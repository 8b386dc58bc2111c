//! Durable state of the coordinator: jobs and their tasks ([`crate::model`]), behind the [`Store`] trait.
//!
//! Backends, one file each: [`MemoryStore`] (nothing survives the process; tests and benchmarks) and
//! [`RedbStore`], the embedded persistent default (a single file under the data dir; writes are committed in
//! fsynced batches and acknowledged only once committed, so a coordinator killed with SIGKILL loses nothing it
//! acknowledged); and [`RedisStore`], a Redis server that the coordinators of a cluster share (writes applied
//! in order, each group of them one `MULTI`/`EXEC` transaction). One test suite runs against each
//! (`tests::suite`).

mod memory;
mod redb_store;
mod redis_store;

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;

use stylefarm_core::ids::{JobId, WorkerId};

pub use self::memory::MemoryStore;
pub use self::redb_store::RedbStore;
pub use self::redis_store::{RedisServer, RedisStore, DEFAULT_PREFIX};
use crate::model::{JobMeta, TaskRecord};

/// A store failure (a redb error, a failed commit, a write to an unknown job, a server out of reach, a full
/// disk), as its message and kind.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store: {message}")]
pub struct StoreError {
    /// What failed, for a person to read.
    pub message: String,
    /// Whether a later try may succeed, and so the gRPC code it is answered with.
    pub kind: StoreErrorKind,
    /// Whether the write this error answers is kept, to be applied in order once the store takes it (its
    /// server out of reach, its disk full; [`Store::behind`]): its effect is still to come, not lost.
    pub held_back: bool,
}

/// What kind of failure a [`StoreError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The store itself failed (a corrupt record, an error of the server): INTERNAL on the wire.
    Failed,
    /// The store could not be reached (a server down or restarting): the call may succeed later;
    /// UNAVAILABLE on the wire.
    Unavailable,
    /// The disk under the store is full (ENOSPC, a quota): RESOURCE_EXHAUSTED on the wire.
    StorageFull,
    /// This coordinator lost its hold on a store that several share (another took over): it writes
    /// nothing more, and stops. INTERNAL on the wire, as a failure of the store.
    Fenced,
}

impl StoreError {
    /// A failure of the store itself.
    pub fn new(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            kind: StoreErrorKind::Failed,
            held_back: false,
        }
    }

    /// The store could not be reached.
    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            kind: StoreErrorKind::Unavailable,
            held_back: false,
        }
    }

    /// This error, for a write that the store keeps and applies in order `once` it can
    /// ([`StoreError::held_back`]).
    pub fn holding_back(self, once: &str) -> StoreError {
        StoreError {
            message: format!(
                "{} (the write is held back and applied in order once {once})",
                self.message
            ),
            held_back: true,
            ..self
        }
    }

    /// Whether the store could not be reached.
    pub fn is_unavailable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(e.to_string())
}

/// One write to the store.
#[derive(Debug, Clone)]
pub enum Op {
    /// A new job with all its tasks.
    Insert(JobMeta, Vec<TaskRecord>),
    /// A job's new record (state, strikes, results), replacing the stored one; its tasks are untouched.
    /// Nothing when the store holds no such job: a write that lands after its job's deletion (or after an
    /// insert that failed) leaves no part of the job behind.
    Job(JobMeta),
    /// A task of the job with this id; nothing when the store holds no such job, as for [`Op::Job`].
    Task(JobId, TaskRecord),
    /// Forgets the job with this id and all its tasks (nothing when there is none).
    Delete(JobId),
    /// The names of the workers drained ([`crate::scheduler::Scheduler::drain`]), replacing those stored.
    Drained(BTreeSet<WorkerId>),
    /// The number of the last worker registration (the `n` of its id, `name#n`), replacing the one stored:
    /// a coordinator that restarts, or a standby that takes over, numbers on from it.
    Registrations(u64),
}

/// Resolves when the writes it was returned for are durable, or with the error that made them fail. Opaque:
/// each backend decides what durable means (an fsynced commit, a replicated write) and how to wait for it.
pub type Durable = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send>>;

/// A [`Durable`] that is already resolved (a backend with nothing to wait for).
pub fn durable_now(result: Result<(), StoreError>) -> Durable {
    Box::pin(std::future::ready(result))
}

/// Blocks the calling thread until `durable` resolves: for synchronous callers such as the scheduler, which
/// runs on blocking threads. Not for an async task of the runtime (await the future there).
pub fn wait(durable: Durable) -> Result<(), StoreError> {
    futures_executor::block_on(durable)
}

/// A coordinator's hold on a store that several share, as the active one: its leader lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// What is left of the lease, counted from when its last renewal was sent (zero once it lapsed or
    /// another coordinator took over).
    pub left: std::time::Duration,
    /// The lease's length.
    pub lease: std::time::Duration,
}

/// Where jobs and tasks are kept. Writes are ordered: a write is applied after every write returned before
/// it. [`Store::write`] does not wait for durability; its [`Durable`] does, so many writers can share one
/// commit (group commit).
pub trait Store: Send + Sync {
    /// Queues `ops`, to be applied after every write queued before them. The write is queued when this
    /// returns, whether or not the future is polled: dropping it gives up waiting, not the write.
    fn write(&self, ops: Vec<Op>) -> Durable;
    /// Every job with its tasks (in index order), in submission order.
    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError>;
    /// The names of the workers drained, as last written ([`Op::Drained`]); none when never written.
    fn load_drained(&self) -> Result<BTreeSet<WorkerId>, StoreError>;
    /// The number of the last worker registration, as last written ([`Op::Registrations`]); 0 when never
    /// written.
    fn load_registrations(&self) -> Result<u64, StoreError>;

    /// Why writes are held back, while some are: the store is out of reach (a Redis server restarting) or
    /// its disk is full (redb), and applies them, in order, once it answers or has room. The scheduler takes
    /// no new outcomes meanwhile (its calls that write answer with this error: UNAVAILABLE, or
    /// RESOURCE_EXHAUSTED for a full disk), so that nothing it acknowledges is ahead of what the store
    /// holds. `None` for a store that never holds writes back (memory).
    fn behind(&self) -> Option<StoreError> {
        None
    }

    /// Why this coordinator may no longer write, once that is so (another coordinator sharing the store
    /// took over): the coordinator then stops serving. `None` for a store of one coordinator.
    fn lost(&self) -> Option<String> {
        None
    }

    /// This coordinator's hold on a store that several share: what is left of its leader lease. `None`
    /// for a store of one coordinator (held for good). The blob store's garbage collection deletes only
    /// while half a lease is left.
    fn hold(&self) -> Option<Hold> {
        None
    }

    /// Adds a job and all its tasks, atomically, and waits until that is durable.
    fn insert_job(&self, job: &JobMeta, tasks: &[TaskRecord]) -> Result<(), StoreError> {
        wait(self.write(vec![Op::Insert(job.clone(), tasks.to_vec())]))
    }
    /// Replaces a job's record (not its tasks), and waits until that is durable.
    fn update_job(&self, job: &JobMeta) -> Result<(), StoreError> {
        wait(self.write(vec![Op::Job(job.clone())]))
    }
    /// Stores `task` as task `task.index` of job `job_id` (replacing it), and waits until that is durable.
    fn update_task(&self, job_id: &JobId, task: &TaskRecord) -> Result<(), StoreError> {
        wait(self.write(vec![Op::Task(job_id.clone(), task.clone())]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{JobState, TaskState};
    use stylefarm_core::job::{ImageHash, JobKind, JobSpec};
    use stylefarm_core::RenderParams;

    pub(crate) fn job(id: &str, seq: u64) -> (JobMeta, Vec<TaskRecord>) {
        let spec = JobSpec {
            checkpoint_every: 10,
            ..JobSpec::new(
                JobKind::Batch,
                vec![ImageHash::of(b"a"), ImageHash::of(b"b")],
                vec![ImageHash::of(b"s")],
                RenderParams::default(),
            )
        };
        let tasks = spec
            .tasks()
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, spec)| TaskRecord::pending(i as u32, spec))
            .collect();
        let meta = JobMeta {
            id: id.into(),
            seq,
            client_request_id: format!("req-{id}"),
            request_sha256: String::new(),
            tenant: "t".into(),
            spec,
            state: JobState::Queued,
            submitted_ms: 1,
            finished_ms: 0,
            unannounced: false,
            error: String::new(),
            strikes: BTreeMap::new(),
            stage_results: Vec::new(),
            result: None,
            paused: false,
            max_tile_size: None,
            waiting_on: Vec::new(),
            not_stored: false,
        };
        (meta, tasks)
    }

    /// The behaviour every backend must have.
    pub(crate) fn suite(store: &dyn Store) {
        assert!(store.load().unwrap().is_empty());
        let (mut a, mut ta) = job("job-a", 2);
        let (b, tb) = job("job-b", 1);
        store.insert_job(&a, &ta).unwrap();
        store.insert_job(&b, &tb).unwrap();
        let all = store.load().unwrap();
        assert_eq!(
            all.iter().map(|(j, _)| j.id.as_str()).collect::<Vec<_>>(),
            ["job-b", "job-a"],
            "by seq"
        );
        assert_eq!(all[1].1, ta);

        ta[1].state = TaskState::Succeeded;
        ta[1].result = Some(ImageHash::of(b"r"));
        store.update_task(&JobId::from("job-a"), &ta[1]).unwrap();
        // a task's checkpoint, and its job's setting, are kept
        ta[0].checkpoint = Some(stylefarm_core::checkpoint::Checkpoint {
            bytes: 4096,
            blob: ImageHash::of(b"checkpoint"),
            scale: 2,
            iteration: 30,
        });
        // and its attempts' logs
        ta[0].keep_log(stylefarm_core::task_log::AttemptLog {
            attempt: 1,
            worker: "w1#1".into(),
            started_ms: 1_000,
            ended_ms: 2_000,
            outcome: "failed: boom".into(),
            log: stylefarm_core::task_log::LogLines {
                lines: vec!["rendering".into(), "é ✓".into()],
                left_out: 3,
            },
        });
        store.update_task(&JobId::from("job-a"), &ta[0]).unwrap();
        a.state = JobState::Running;
        a.strikes.insert("w1".into(), 2);
        store.update_job(&a).unwrap();
        let all = store.load().unwrap();
        assert_eq!(all[1], (a, ta));
        assert_eq!(all[0], (b, tb), "other jobs untouched");
        // a deleted job goes with all its tasks: stored again with one task, it has one
        let (mut c, tc) = job("job-c", 3);
        store.insert_job(&c, &tc).unwrap();
        wait(store.write(vec![Op::Delete(c.id.clone())])).unwrap();
        assert_eq!(store.load().unwrap(), all, "as before job-c");
        store.insert_job(&c, &tc[..1]).unwrap();
        assert_eq!(store.load().unwrap()[2], (c.clone(), tc[..1].to_vec()));
        let nope = JobId::from("nope");
        wait(store.write(vec![Op::Delete(c.id.clone()), Op::Delete(nope.clone())])).unwrap();
        assert_eq!(store.load().unwrap(), all);
        // an insert earlier in the same write makes a job to write to
        wait(store.write(vec![
            Op::Insert(c.clone(), tc[..1].to_vec()),
            Op::Task(c.id.clone(), tc[1].clone()),
        ]))
        .unwrap();
        assert_eq!(store.load().unwrap()[2], (c.clone(), tc.clone()));
        wait(store.write(vec![Op::Delete(c.id.clone())])).unwrap();
        // while writes to a job the store does not hold bring back no part of it: a deleted job's outcomes
        // landing after its deletion (a retry's), a job whose insert failed or that was never stored
        c.state = JobState::Succeeded;
        wait(store.write(vec![
            Op::Task(c.id.clone(), tc[1].clone()),
            Op::Job(c.clone()),
        ]))
        .unwrap();
        store.update_task(&nope, &all[0].1[0]).unwrap();
        store.update_job(&job("nope", 9).0).unwrap();
        assert_eq!(store.load().unwrap(), all, "no part of job-c or nope");

        // the workers drained: none at first, then as last written, the jobs untouched
        assert!(store.load_drained().unwrap().is_empty());
        let names = BTreeSet::from([WorkerId::from("gpu-1"), WorkerId::from("odd#name")]);
        wait(store.write(vec![Op::Drained(names.clone())])).unwrap();
        assert_eq!(store.load_drained().unwrap(), names);
        wait(store.write(vec![Op::Drained(BTreeSet::new())])).unwrap();
        assert!(store.load_drained().unwrap().is_empty());
        // the last registration's number: 0 at first, then as last written
        assert_eq!(store.load_registrations().unwrap(), 0);
        wait(store.write(vec![Op::Registrations(7), Op::Registrations(8)])).unwrap();
        assert_eq!(store.load_registrations().unwrap(), 8);
        assert_eq!(store.load().unwrap(), all);
    }
}
