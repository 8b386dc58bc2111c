//! Durable state of the coordinator: jobs and their tasks, behind the [`Store`] trait.
//!
//! Backends: [`MemoryStore`] (nothing survives the process; tests and benchmarks) and [`RedbStore`], the
//! embedded persistent default (a single file under the data dir; writes are committed in fsynced batches and
//! acknowledged only once committed, so a coordinator killed with SIGKILL loses nothing it acknowledged). One test suite runs
//! against each ([`tests::suite`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use stylefarm_core::job::{JobSpec, TaskSpec};

/// Job states, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Task states, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A job without its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMeta {
    pub id: String,
    /// Submission order, for FIFO among equal priorities.
    pub seq: u64,
    pub client_request_id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub submitted_ms: i64,
    pub finished_ms: i64,
    pub error: String,
    /// Strikes (retryable failures, lease expiries) per worker id; a worker at the blocklist threshold gets no
    /// more of this job's tasks. Failures blamed on the input or on memory are not strikes.
    pub strikes: BTreeMap<String, u32>,
    /// sha256 of a sweep's contact sheet.
    pub contact_sheet: String,
    /// Tiled jobs: sha256 of the final stitched image.
    #[serde(default)]
    pub result: String,
    /// Tiled jobs: sha256 of each finished scale's stitched image, coarsest first.
    #[serde(default)]
    pub scale_results: Vec<String>,
}

/// One task of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub index: u32,
    pub spec: TaskSpec,
    pub state: TaskState,
    pub attempts: u32,
    /// The worker of the current or last attempt.
    pub worker: String,
    /// sha256 of the result image.
    pub result: String,
    /// The error of the last failed attempt.
    pub error: String,
    /// Earliest time (unix ms) of the next attempt (retry backoff).
    pub not_before_ms: i64,
    /// The distinct workers that reported `error` as non-retryable (the input's fault), in report order;
    /// emptied when an attempt fails with another error.
    #[serde(default)]
    pub permanent_error_workers: Vec<String>,
}

impl TaskRecord {
    /// A new task, waiting for its first attempt.
    pub fn pending(index: u32, spec: TaskSpec) -> TaskRecord {
        TaskRecord {
            index,
            spec,
            state: TaskState::Pending,
            attempts: 0,
            worker: String::new(),
            result: String::new(),
            error: String::new(),
            not_before_ms: 0,
            permanent_error_workers: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// One write to the store.
#[derive(Debug, Clone)]
pub enum Op {
    /// A new job with all its tasks.
    Insert(JobMeta, Vec<TaskRecord>),
    Job(JobMeta),
    /// A task of the job with this id.
    Task(String, TaskRecord),
}

/// Says when queued writes are durable.
pub enum Ticket {
    Done(Result<(), StoreError>),
    Pending { seq: u64, shared: Arc<Shared> },
}

impl Ticket {
    /// Blocks until the writes are durable (or failed).
    pub fn wait(self) -> Result<(), StoreError> {
        match self {
            Ticket::Done(r) => r,
            Ticket::Pending { seq, shared } => {
                let mut q = shared.queue.lock().unwrap();
                while q.committed < seq {
                    q = shared.committed.wait(q).unwrap();
                }
                match q
                    .failures
                    .iter()
                    .find(|(lo, hi, _)| *lo < seq && seq <= *hi)
                {
                    Some((_, _, e)) => Err(StoreError(e.clone())),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Where jobs and tasks are kept. Writes are queued in order and made durable together (group commit):
/// [`Store::write`] does not block, its [`Ticket`] does.
pub trait Store: Send + Sync {
    /// Queues `ops`, to be applied after every write queued before them.
    fn write(&self, ops: Vec<Op>) -> Ticket;
    /// Every job with its tasks (in index order), in submission order.
    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError>;

    /// Adds a job and all its tasks, atomically, and waits until that is durable.
    fn insert_job(&self, job: &JobMeta, tasks: &[TaskRecord]) -> Result<(), StoreError> {
        self.write(vec![Op::Insert(job.clone(), tasks.to_vec())])
            .wait()
    }
    fn update_job(&self, job: &JobMeta) -> Result<(), StoreError> {
        self.write(vec![Op::Job(job.clone())]).wait()
    }
    fn update_task(&self, job_id: &str, task: &TaskRecord) -> Result<(), StoreError> {
        self.write(vec![Op::Task(job_id.to_string(), task.clone())])
            .wait()
    }
}

/// A job and its tasks by index.
type JobEntry = (JobMeta, BTreeMap<u32, TaskRecord>);

/// Keeps everything in memory.
#[derive(Default)]
pub struct MemoryStore {
    jobs: Mutex<BTreeMap<String, JobEntry>>,
}

impl Store for MemoryStore {
    fn write(&self, ops: Vec<Op>) -> Ticket {
        let mut jobs = self.jobs.lock().unwrap();
        for op in ops {
            match op {
                Op::Insert(job, tasks) => {
                    let tasks = tasks.into_iter().map(|t| (t.index, t)).collect();
                    jobs.insert(job.id.clone(), (job, tasks));
                }
                Op::Job(job) => match jobs.get_mut(&job.id) {
                    Some(entry) => entry.0 = job,
                    None => return Ticket::Done(Err(err(format!("no job {}", job.id)))),
                },
                Op::Task(job_id, task) => match jobs.get_mut(&job_id) {
                    Some(entry) => {
                        entry.1.insert(task.index, task);
                    }
                    None => return Ticket::Done(Err(err(format!("no job {job_id}")))),
                },
            }
        }
        Ticket::Done(Ok(()))
    }

    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError> {
        let mut all: Vec<_> = self
            .jobs
            .lock()
            .unwrap()
            .values()
            .map(|(j, t)| (j.clone(), t.values().cloned().collect::<Vec<_>>()))
            .collect();
        all.sort_by_key(|(j, _)| j.seq);
        Ok(all)
    }
}

const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");
const TASKS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("tasks");

/// The write queue of a [`RedbStore`].
#[derive(Default)]
pub struct Queue {
    ops: Vec<Op>,
    /// Number of write calls queued so far, and of those committed.
    enqueued: u64,
    committed: u64,
    /// Batches whose commit failed: (after seq, up to seq, error).
    failures: Vec<(u64, u64, String)>,
    closing: bool,
}

/// What the committer thread and the tickets share.
pub struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when ops are queued (to the committer).
    queued: Condvar,
    /// Signalled when a batch is committed (to the tickets).
    committed: Condvar,
}

/// The embedded persistent store: one redb file. A committer thread applies the queued writes in batches, one
/// fsynced transaction a batch: every write is durable when its ticket returns, and many writers share a fsync.
pub struct RedbStore {
    db: Arc<redb::Database>,
    shared: Arc<Shared>,
    committer: Option<std::thread::JoinHandle<()>>,
}

fn apply(tx: &redb::WriteTransaction, ops: &[Op]) -> Result<(), StoreError> {
    let mut jobs = tx.open_table(JOBS).map_err(err)?;
    let mut tasks = tx.open_table(TASKS).map_err(err)?;
    for op in ops {
        match op {
            Op::Insert(job, list) => {
                jobs.insert(job.id.as_str(), json(job)?.as_slice())
                    .map_err(err)?;
                for t in list {
                    tasks
                        .insert((job.id.as_str(), t.index), json(t)?.as_slice())
                        .map_err(err)?;
                }
            }
            Op::Job(job) => {
                jobs.insert(job.id.as_str(), json(job)?.as_slice())
                    .map_err(err)?;
            }
            Op::Task(job_id, t) => {
                tasks
                    .insert((job_id.as_str(), t.index), json(t)?.as_slice())
                    .map_err(err)?;
            }
        }
    }
    Ok(())
}

impl RedbStore {
    /// Opens or creates the database file and starts its committer thread.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db =
            redb::Database::create(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(JOBS).map_err(err)?;
        tx.open_table(TASKS).map_err(err)?;
        tx.commit().map_err(err)?;
        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            committed: Condvar::new(),
        });
        let committer = {
            let (db, shared) = (db.clone(), shared.clone());
            std::thread::Builder::new()
                .name("store-committer".into())
                .spawn(move || Self::commit_loop(&db, &shared))
                .map_err(err)?
        };
        Ok(RedbStore {
            db,
            shared,
            committer: Some(committer),
        })
    }

    fn commit_loop(db: &redb::Database, shared: &Shared) {
        loop {
            let (ops, upto) = {
                let mut q = shared.queue.lock().unwrap();
                while q.ops.is_empty() && !q.closing {
                    q = shared.queued.wait(q).unwrap();
                }
                if q.ops.is_empty() {
                    return;
                }
                (std::mem::take(&mut q.ops), q.enqueued)
            };
            let result = db.begin_write().map_err(err).and_then(|tx| {
                apply(&tx, &ops)?;
                tx.commit().map_err(err)
            });
            let mut q = shared.queue.lock().unwrap();
            if let Err(e) = result {
                tracing::error!(error = %e, "store commit failed");
                let from = q.committed;
                q.failures.push((from, upto, e.0));
            }
            q.committed = upto;
            shared.committed.notify_all();
        }
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().closing = true;
        self.shared.queued.notify_all();
        if let Some(committer) = self.committer.take() {
            let _ = committer.join();
        }
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(err)
}

impl Store for RedbStore {
    fn write(&self, ops: Vec<Op>) -> Ticket {
        if ops.is_empty() {
            return Ticket::Done(Ok(()));
        }
        let mut q = self.shared.queue.lock().unwrap();
        q.ops.extend(ops);
        q.enqueued += 1;
        let seq = q.enqueued;
        drop(q);
        self.shared.queued.notify_one();
        Ticket::Pending {
            seq,
            shared: self.shared.clone(),
        }
    }

    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError> {
        let tx = self.db.begin_read().map_err(err)?;
        let jobs = tx.open_table(JOBS).map_err(err)?;
        let tasks = tx.open_table(TASKS).map_err(err)?;
        let mut all = Vec::new();
        for entry in jobs.iter().map_err(err)? {
            let (_, value) = entry.map_err(err)?;
            let job: JobMeta = serde_json::from_slice(value.value()).map_err(err)?;
            let mut list = Vec::new();
            for t in tasks
                .range((job.id.as_str(), 0)..=(job.id.as_str(), u32::MAX))
                .map_err(err)?
            {
                let (_, value) = t.map_err(err)?;
                list.push(serde_json::from_slice::<TaskRecord>(value.value()).map_err(err)?);
            }
            all.push((job, list));
        }
        all.sort_by_key(|(j, _)| j.seq);
        Ok(all)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use stylefarm_core::job::{ImageHash, JobKind};
    use stylefarm_core::RenderParams;

    fn job(id: &str, seq: u64) -> (JobMeta, Vec<TaskRecord>) {
        let spec = JobSpec {
            kind: JobKind::Batch,
            contents: vec![ImageHash::of(b"a"), ImageHash::of(b"b")],
            styles: vec![ImageHash::of(b"s")],
            params: RenderParams::default(),
            sweep: vec![],
            priority: 0,
            max_attempts: 0,
            tiling: Default::default(),
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
            spec,
            state: JobState::Queued,
            submitted_ms: 1,
            finished_ms: 0,
            error: String::new(),
            strikes: BTreeMap::new(),
            contact_sheet: String::new(),
            result: String::new(),
            scale_results: Vec::new(),
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
        ta[1].result = "r".into();
        store.update_task("job-a", &ta[1]).unwrap();
        a.state = JobState::Running;
        a.strikes.insert("w1".into(), 2);
        store.update_job(&a).unwrap();
        let all = store.load().unwrap();
        assert_eq!(all[1], (a, ta));
        assert_eq!(all[0], (b, tb), "other jobs untouched");
        assert!(
            store.update_task("nope", &all[0].1[0]).is_err() || store.load().unwrap().len() == 2
        );
    }

    #[test]
    fn memory_store() {
        suite(&MemoryStore::default());
    }

    #[test]
    fn task_records_of_older_versions_load() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("state.redb")).unwrap();
        let (meta, tasks) = job("job-a", 1);
        store.insert_job(&meta, &tasks).unwrap();
        // the task as an older version wrote it: without permanent_error_workers
        let mut old = serde_json::to_value(&tasks[0]).unwrap();
        let fields = old.as_object_mut().unwrap();
        assert!(fields.remove("permanent_error_workers").is_some());
        let tx = store.db.begin_write().unwrap();
        tx.open_table(TASKS)
            .unwrap()
            .insert(("job-a", 0), serde_json::to_vec(&old).unwrap().as_slice())
            .unwrap();
        tx.commit().unwrap();
        let all = store.load().unwrap();
        assert_eq!(all[0].1, tasks);
        assert!(all[0].1[0].permanent_error_workers.is_empty());
    }

    #[test]
    fn redb_store_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        suite(&RedbStore::open(&path).unwrap());
        let reopened = RedbStore::open(&path).unwrap();
        assert_eq!(
            reopened.load().unwrap().len(),
            2,
            "state survives the process"
        );
    }
}
