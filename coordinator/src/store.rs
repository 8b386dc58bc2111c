//! Durable state of the coordinator: jobs and their tasks, behind the [`Store`] trait.
//!
//! Backends: [`MemoryStore`] (nothing survives the process; tests and benchmarks) and [`RedbStore`], the
//! embedded persistent default (a single file under the data dir; every write is a committed, fsynced
//! transaction, so a coordinator killed with SIGKILL loses nothing it acknowledged). One test suite runs
//! against each ([`tests::suite`]).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

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
    /// Failures per worker id; a worker at the blocklist threshold gets no more of this job's tasks.
    pub strikes: BTreeMap<String, u32>,
    /// sha256 of a sweep's contact sheet.
    pub contact_sheet: String,
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
    pub error: String,
    /// Earliest time (unix ms) of the next attempt (retry backoff).
    pub not_before_ms: i64,
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
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// Where jobs and tasks are kept. Every call is durable when it returns.
pub trait Store: Send + Sync {
    /// Adds a job and all its tasks, atomically.
    fn insert_job(&self, job: &JobMeta, tasks: &[TaskRecord]) -> Result<(), StoreError>;
    fn update_job(&self, job: &JobMeta) -> Result<(), StoreError>;
    fn update_task(&self, job_id: &str, task: &TaskRecord) -> Result<(), StoreError>;
    /// Every job with its tasks (in index order), in submission order.
    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError>;
}

/// A job and its tasks by index.
type JobEntry = (JobMeta, BTreeMap<u32, TaskRecord>);

/// Keeps everything in memory.
#[derive(Default)]
pub struct MemoryStore {
    jobs: Mutex<BTreeMap<String, JobEntry>>,
}

impl Store for MemoryStore {
    fn insert_job(&self, job: &JobMeta, tasks: &[TaskRecord]) -> Result<(), StoreError> {
        let tasks = tasks.iter().map(|t| (t.index, t.clone())).collect();
        self.jobs
            .lock()
            .unwrap()
            .insert(job.id.clone(), (job.clone(), tasks));
        Ok(())
    }

    fn update_job(&self, job: &JobMeta) -> Result<(), StoreError> {
        let mut jobs = self.jobs.lock().unwrap();
        let entry = jobs
            .get_mut(&job.id)
            .ok_or_else(|| err(format!("no job {}", job.id)))?;
        entry.0 = job.clone();
        Ok(())
    }

    fn update_task(&self, job_id: &str, task: &TaskRecord) -> Result<(), StoreError> {
        let mut jobs = self.jobs.lock().unwrap();
        let entry = jobs
            .get_mut(job_id)
            .ok_or_else(|| err(format!("no job {job_id}")))?;
        entry.1.insert(task.index, task.clone());
        Ok(())
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

/// The embedded persistent store: one redb file.
pub struct RedbStore {
    db: redb::Database,
}

impl RedbStore {
    /// Opens or creates the database file.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db =
            redb::Database::create(path).map_err(|e| err(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(err)?;
        tx.open_table(JOBS).map_err(err)?;
        tx.open_table(TASKS).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(RedbStore { db })
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(err)?;
        f(&tx)?;
        tx.commit().map_err(err)
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(err)
}

impl Store for RedbStore {
    fn insert_job(&self, job: &JobMeta, tasks: &[TaskRecord]) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(JOBS)
                .map_err(err)?
                .insert(job.id.as_str(), json(job)?.as_slice())
                .map_err(err)?;
            let mut table = tx.open_table(TASKS).map_err(err)?;
            for t in tasks {
                table
                    .insert((job.id.as_str(), t.index), json(t)?.as_slice())
                    .map_err(err)?;
            }
            Ok(())
        })
    }

    fn update_job(&self, job: &JobMeta) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(JOBS)
                .map_err(err)?
                .insert(job.id.as_str(), json(job)?.as_slice())
                .map_err(err)?;
            Ok(())
        })
    }

    fn update_task(&self, job_id: &str, task: &TaskRecord) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.open_table(TASKS)
                .map_err(err)?
                .insert((job_id, task.index), json(task)?.as_slice())
                .map_err(err)?;
            Ok(())
        })
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
