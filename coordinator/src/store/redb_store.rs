//! [`RedbStore`]: the embedded persistent store, one redb file with a group-committing writer thread.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use redb::{ReadableTable, TableDefinition};
use serde::Serialize;

use super::{durable_now, err, Durable, Op, Store, StoreError, StoreErrorKind};
use crate::model::{JobMeta, TaskRecord};

/// A redb error as a store error: a full disk (ENOSPC, EDQUOT) is [`StoreErrorKind::StorageFull`].
fn redb_err(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    let full = matches!(&e, redb::Error::Io(io) if crate::storage_full(io));
    StoreError {
        message: e.to_string(),
        kind: if full {
            StoreErrorKind::StorageFull
        } else {
            StoreErrorKind::Failed
        },
    }
}

const JOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("jobs");
const TASKS: TableDefinition<'_, (&str, u32), &[u8]> = TableDefinition::new("tasks");

/// The write queue of a [`RedbStore`].
#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    /// Number of write calls queued so far (those committed: [`Shared::committed`]).
    enqueued: u64,
    /// Batches whose commit failed: (after seq, up to seq, error).
    failures: Vec<(u64, u64, String)>,
    closing: bool,
}

/// What the committer thread and the writers' [`Durable`] futures share.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when ops are queued (to the committer).
    queued: Condvar,
    /// The number of write calls committed (or failed), for the futures to wait on.
    committed: tokio::sync::watch::Sender<u64>,
}

/// The embedded persistent store: one redb file. A committer thread applies the queued writes in batches,
/// one fsynced transaction a batch: every write is durable when its `Durable` future resolves, and many
/// writers share a fsync.
pub struct RedbStore {
    db: Arc<redb::Database>,
    shared: Arc<Shared>,
    committer: Option<std::thread::JoinHandle<()>>,
}

fn apply(tx: &redb::WriteTransaction, ops: &[Op]) -> Result<(), StoreError> {
    let mut jobs = tx.open_table(JOBS).map_err(redb_err)?;
    let mut tasks = tx.open_table(TASKS).map_err(redb_err)?;
    for op in ops {
        match op {
            Op::Insert(job, list) => {
                jobs.insert(job.id.as_str(), json(job)?.as_slice())
                    .map_err(redb_err)?;
                for t in list {
                    tasks
                        .insert((job.id.as_str(), t.index), json(t)?.as_slice())
                        .map_err(redb_err)?;
                }
            }
            Op::Job(job) => {
                jobs.insert(job.id.as_str(), json(job)?.as_slice())
                    .map_err(redb_err)?;
            }
            Op::Task(job_id, t) => {
                tasks
                    .insert((job_id.as_str(), t.index), json(t)?.as_slice())
                    .map_err(redb_err)?;
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
        let tx = db.begin_write().map_err(redb_err)?;
        tx.open_table(JOBS).map_err(redb_err)?;
        tx.open_table(TASKS).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        let db = Arc::new(db);
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            committed: tokio::sync::watch::Sender::new(0),
        });
        let committer = {
            let (db, shared) = (db.clone(), shared.clone());
            std::thread::Builder::new()
                .name("store-committer".into())
                .spawn(move || Self::commit_loop(&db, &shared))
                .map_err(redb_err)?
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
            let result = db.begin_write().map_err(redb_err).and_then(|tx| {
                apply(&tx, &ops)?;
                tx.commit().map_err(redb_err)
            });
            if let Err(e) = result {
                tracing::error!(error = %e, "store commit failed");
                // recorded before the count moves: a future that sees `upto` sees its failure
                let from = *shared.committed.borrow();
                shared
                    .queue
                    .lock()
                    .unwrap()
                    .failures
                    .push((from, upto, e.message));
            }
            shared.committed.send_replace(upto);
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
    fn write(&self, ops: Vec<Op>) -> Durable {
        if ops.is_empty() {
            return durable_now(Ok(()));
        }
        let mut q = self.shared.queue.lock().unwrap();
        q.ops.extend(ops);
        q.enqueued += 1;
        let seq = q.enqueued;
        drop(q);
        self.shared.queued.notify_one();
        let shared = self.shared.clone();
        Box::pin(async move {
            let mut committed = shared.committed.subscribe();
            // the sender lives in `shared`, which this future holds: it cannot close
            let _ = committed.wait_for(|&c| c >= seq).await;
            let q = shared.queue.lock().unwrap();
            match q
                .failures
                .iter()
                .find(|(lo, hi, _)| *lo < seq && seq <= *hi)
            {
                Some((_, _, e)) => Err(StoreError::new(e.clone())),
                None => Ok(()),
            }
        })
    }

    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let jobs = tx.open_table(JOBS).map_err(redb_err)?;
        let tasks = tx.open_table(TASKS).map_err(redb_err)?;
        let mut all = Vec::new();
        for entry in jobs.iter().map_err(redb_err)? {
            let (_, value) = entry.map_err(redb_err)?;
            let job = crate::model::job_from_json(value.value()).map_err(err)?;
            let mut list = Vec::new();
            for t in tasks
                .range((job.id.as_str(), 0)..=(job.id.as_str(), u32::MAX))
                .map_err(redb_err)?
            {
                let (_, value) = t.map_err(redb_err)?;
                list.push(crate::model::task_from_json(value.value()).map_err(err)?);
            }
            all.push((job, list));
        }
        all.sort_by_key(|(j, _)| j.seq);
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{job, suite};

    #[test]
    fn a_full_disk_is_storage_full_and_other_io_errors_failures() {
        let io = |errno| redb::StorageError::Io(std::io::Error::from_raw_os_error(errno));
        // ENOSPC, EDQUOT
        assert_eq!(redb_err(io(28)).kind, StoreErrorKind::StorageFull);
        assert_eq!(redb_err(io(122)).kind, StoreErrorKind::StorageFull);
        // EIO
        assert_eq!(redb_err(io(5)).kind, StoreErrorKind::Failed);
        assert_eq!(
            redb_err(redb::StorageError::PreviousIo).kind,
            StoreErrorKind::Failed
        );
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
