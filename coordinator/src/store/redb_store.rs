//! [`RedbStore`]: the embedded persistent store, one redb file with a group-committing writer thread.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use redb::{ReadableTable, TableDefinition};
use serde::Serialize;
use stylefarm_core::ids::WorkerId;

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
        held_back: false,
    }
}

const JOBS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("jobs");
const TASKS: TableDefinition<'_, (&str, u32), &[u8]> = TableDefinition::new("tasks");
/// Rows: [`DRAINED_KEY`], the names of the workers drained (JSON); [`REGISTRATIONS_KEY`], the number of
/// the last worker registration (JSON).
const SETTINGS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("settings");
const DRAINED_KEY: &str = "drained";
const REGISTRATIONS_KEY: &str = "registrations";

/// How often writes held back for a full disk are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Opens (or creates) the database: again after an I/O error, which leaves a redb database refusing every
/// later write (`PreviousIo`) until it is reopened.
type Opener = Box<dyn Fn() -> Result<redb::Database, redb::DatabaseError> + Send + Sync>;

/// The write queue of a [`RedbStore`].
#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    /// Number of write calls queued so far (those committed: [`Shared::committed`]).
    enqueued: u64,
    /// Write calls told an error: (after seq, up to seq, error), kept while a [`Durable`] of that range is
    /// still to read it ([`Queue::waiting`]).
    failures: Vec<(u64, u64, StoreError)>,
    /// The write calls whose [`Durable`] is alive and has not read its outcome yet.
    waiting: BTreeSet<u64>,
    closing: bool,
}

/// What the committer thread, the store and the writers' [`Durable`] futures share.
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when ops are queued (to the committer).
    queued: Condvar,
    /// The number of write calls committed (or failed), for the futures to wait on.
    committed: tokio::sync::watch::Sender<u64>,
    /// The database; `None` after a failed commit, until it is opened again ([`Shared::database`]).
    db: Mutex<Option<redb::Database>>,
    opener: Opener,
    /// Why writes are held back (the disk is full), while they are ([`Store::behind`]).
    behind: Mutex<Option<StoreError>>,
}

impl Shared {
    /// The open database, opened again when a failed commit closed it.
    fn database<'a>(
        &self,
        db: &'a mut Option<redb::Database>,
    ) -> Result<&'a redb::Database, StoreError> {
        if db.is_none() {
            *db = Some((self.opener)().map_err(redb_err)?);
        }
        Ok(db.as_ref().expect("opened above"))
    }
}

/// The embedded persistent store: one redb file. A committer thread applies the queued writes in batches,
/// one fsynced transaction a batch: every write is durable when its `Durable` future resolves, and many
/// writers share a fsync.
///
/// A full disk (ENOSPC, EDQUOT) fails no write for good: the batch is held back, in order, with every write
/// queued after it, and tried again every second (`RETRY_EVERY`; the database reopened: redb refuses all
/// writes after an I/O error) until there is room, whatever error the tries meet meanwhile. Their callers
/// are told RESOURCE_EXHAUSTED (or the later error) meanwhile and [`Store::behind`] says so, as the Redis
/// store does while its server is out of reach. Any other failed commit, with nothing held back, fails its
/// batch, and the database is reopened for the next.
pub struct RedbStore {
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
            // a job deleted (or never stored) is not brought back in part
            Op::Job(job) => {
                if jobs.get(job.id.as_str()).map_err(redb_err)?.is_some() {
                    jobs.insert(job.id.as_str(), json(job)?.as_slice())
                        .map_err(redb_err)?;
                }
            }
            Op::Task(job_id, t) => {
                if jobs.get(job_id.as_str()).map_err(redb_err)?.is_some() {
                    tasks
                        .insert((job_id.as_str(), t.index), json(t)?.as_slice())
                        .map_err(redb_err)?;
                }
            }
            Op::Delete(job_id) => {
                let id = job_id.as_str();
                jobs.remove(id).map_err(redb_err)?;
                tasks
                    .retain_in((id, 0)..=(id, u32::MAX), |_, _| false)
                    .map_err(redb_err)?;
            }
            Op::Drained(names) => set_setting(tx, DRAINED_KEY, json(names)?)?,
            Op::Registrations(n) => set_setting(tx, REGISTRATIONS_KEY, json(n)?)?,
        }
    }
    Ok(())
}

/// Writes row `key` of [`SETTINGS`] (JSON), replacing what it held ([`RedbStore::setting`] reads it).
fn set_setting(tx: &redb::WriteTransaction, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
    let mut settings = tx.open_table(SETTINGS).map_err(redb_err)?;
    settings.insert(key, value.as_slice()).map_err(redb_err)?;
    Ok(())
}

impl RedbStore {
    /// Runs `f` in a read transaction, the database held (opened again first if an I/O error left it
    /// refusing) until it returns.
    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut db = self.shared.db.lock().unwrap();
        let tx = self
            .shared
            .database(&mut db)?
            .begin_read()
            .map_err(redb_err)?;
        f(&tx)
    }

    /// Opens or creates the database file and starts its committer thread.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let file = path.to_path_buf();
        Self::open_with(
            Box::new(move || redb::Database::create(&file)),
            &path.display().to_string(),
        )
    }

    /// With `opener` for the database, `name` in its errors.
    fn open_with(opener: Opener, name: &str) -> Result<RedbStore, StoreError> {
        let db = opener().map_err(|e| match e {
            // a lock of the file: another process (a coordinator) has the store open
            redb::DatabaseError::DatabaseAlreadyOpen => err(format!(
                "{name}: another process holds the store open (a coordinator on the same --data-dir?)"
            )),
            e => err(format!("{name}: {e}")),
        })?;
        let tx = db.begin_write().map_err(redb_err)?;
        tx.open_table(JOBS).map_err(redb_err)?;
        tx.open_table(TASKS).map_err(redb_err)?;
        tx.commit().map_err(redb_err)?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            committed: tokio::sync::watch::Sender::new(0),
            db: Mutex::new(Some(db)),
            opener,
            behind: Mutex::new(None),
        });
        let committer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("store-committer".into())
                .spawn(move || Self::commit_loop(&shared))
                .map_err(redb_err)?
        };
        Ok(RedbStore {
            shared,
            committer: Some(committer),
        })
    }

    fn commit_loop(shared: &Shared) {
        // the ops of writes held back for a full disk, in order, to apply before any later ones
        let mut backlog: Vec<Op> = Vec::new();
        loop {
            let (ops, upto, closing) = {
                let mut q = shared.queue.lock().unwrap();
                if backlog.is_empty() {
                    while q.ops.is_empty() && !q.closing {
                        q = shared.queued.wait(q).unwrap();
                    }
                } else if q.ops.is_empty() && !q.closing {
                    q = shared.queued.wait_timeout(q, RETRY_EVERY).unwrap().0;
                }
                if q.ops.is_empty() && backlog.is_empty() {
                    return;
                }
                (std::mem::take(&mut q.ops), q.enqueued, q.closing)
            };
            let from = *shared.committed.borrow();
            backlog.extend(ops);
            let result = Self::commit(shared, &backlog);
            let mut behind = shared.behind.lock().unwrap();
            let result = match result {
                Ok(()) => {
                    if let Some(was) = behind.take() {
                        tracing::info!(
                            ops = backlog.len(),
                            error = %was,
                            "the disk has room again: the writes held back are applied"
                        );
                    }
                    backlog.clear();
                    Ok(())
                }
                // a full disk holds the writes back; so does any error once some are held (reopening the
                // database after the disk filled can fail otherwise): their callers were told they would
                // be applied, and dropping them would leave later writes on a store that lacks them
                Err(e) if e.kind == StoreErrorKind::StorageFull || behind.is_some() => {
                    if behind.is_none() {
                        tracing::error!(error = %e, "disk full: holding writes back until it has room");
                    } else if e.kind != StoreErrorKind::StorageFull {
                        tracing::error!(error = %e, "store commit failed while writes are held back");
                    }
                    let e = e.holding_back("the store takes it");
                    *behind = Some(e.clone());
                    Err(e)
                }
                Err(e) => {
                    tracing::error!(error = %e, "store commit failed");
                    backlog.clear();
                    behind.take();
                    Err(e)
                }
            };
            drop(behind);
            if let Err(e) = result {
                // recorded before the count moves: a future that sees `upto` sees its failure; not when none
                // is left to read it (its callers gave up waiting)
                let mut q = shared.queue.lock().unwrap();
                if from < upto && q.waiting.range(from + 1..=upto).next().is_some() {
                    q.failures.push((from, upto, e));
                }
            }
            shared.committed.send_replace(upto);
            if closing && !backlog.is_empty() {
                // closed while the disk is full, after one last try: what is left is lost (its callers
                // were told RESOURCE_EXHAUSTED, none that it was applied)
                tracing::error!(
                    ops = backlog.len(),
                    "store closed while the disk was full: writes not applied"
                );
                return;
            }
        }
    }

    /// Applies `ops` in one transaction; a failure closes the database, to be opened again for the next.
    fn commit(shared: &Shared, ops: &[Op]) -> Result<(), StoreError> {
        let mut db = shared.db.lock().unwrap();
        let result = shared.database(&mut db).and_then(|db| {
            let tx = db.begin_write().map_err(redb_err)?;
            apply(&tx, ops)?;
            tx.commit().map_err(redb_err)
        });
        if result.is_err() {
            *db = None;
        }
        result
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

/// A write call's [`Durable`] while it is alive: dropped (its outcome read, or its caller gone), it is no
/// longer waiting, and a failure that no live one is left to read is forgotten.
struct Waiter {
    shared: Arc<Shared>,
    seq: u64,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut q = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        let seq = self.seq;
        q.waiting.remove(&seq);
        let Some(at) = q
            .failures
            .iter()
            .position(|(lo, hi, _)| *lo < seq && seq <= *hi)
        else {
            return;
        };
        let (lo, hi, _) = q.failures[at];
        if q.waiting.range(lo + 1..=hi).next().is_none() {
            q.failures.swap_remove(at);
        }
    }
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
        q.waiting.insert(seq);
        drop(q);
        self.shared.queued.notify_one();
        let waiter = Waiter {
            shared: self.shared.clone(),
            seq,
        };
        Box::pin(async move {
            let mut committed = waiter.shared.committed.subscribe();
            // the sender lives in `shared`, which this future holds: it cannot close
            let _ = committed.wait_for(|&c| c >= seq).await;
            let q = waiter.shared.queue.lock().unwrap();
            match q
                .failures
                .iter()
                .find(|(lo, hi, _)| *lo < seq && seq <= *hi)
            {
                Some((_, _, e)) => Err(e.clone()),
                None => Ok(()),
            }
        })
    }

    fn behind(&self) -> Option<StoreError> {
        self.shared.behind.lock().unwrap().clone()
    }

    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError> {
        self.read(|tx| {
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
        })
    }

    fn load_drained(&self) -> Result<BTreeSet<WorkerId>, StoreError> {
        self.setting(DRAINED_KEY, "the workers drained")
    }

    fn load_registrations(&self) -> Result<u64, StoreError> {
        self.setting(REGISTRATIONS_KEY, "the last worker registration")
    }
}

impl RedbStore {
    /// The value of row `key` of [`SETTINGS`] (JSON), what it holds named `what` in an error; the default
    /// when never written.
    fn setting<T: serde::de::DeserializeOwned + Default>(
        &self,
        key: &str,
        what: &str,
    ) -> Result<T, StoreError> {
        self.read(|tx| {
            // a database that never had a setting written has no such table
            let settings = match tx.open_table(SETTINGS) {
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(T::default()),
                table => table.map_err(redb_err)?,
            };
            match settings.get(key).map_err(redb_err)? {
                Some(value) => {
                    serde_json::from_slice(value.value()).map_err(|e| err(format!("{what}: {e}")))
                }
                None => Ok(T::default()),
            }
        })
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
        let db = store.shared.db.lock().unwrap();
        let tx = db.as_ref().unwrap().begin_write().unwrap();
        tx.open_table(TASKS)
            .unwrap()
            .insert(("job-a", 0), serde_json::to_vec(&old).unwrap().as_slice())
            .unwrap();
        tx.commit().unwrap();
        drop(db);
        let all = store.load().unwrap();
        assert_eq!(all[0].1, tasks);
        assert!(all[0].1[0].permanent_error_workers.is_empty());
    }

    /// A file whose disk fails on demand: writes, resizes and syncs fail with the OS error `errno` while it
    /// is not 0 (28: ENOSPC, the disk full; 5: EIO).
    #[derive(Debug)]
    struct FillingDisk {
        file: redb::backends::FileBackend,
        errno: Arc<std::sync::atomic::AtomicI32>,
    }

    impl FillingDisk {
        fn check(&self) -> std::io::Result<()> {
            match self.errno.load(std::sync::atomic::Ordering::SeqCst) {
                0 => Ok(()),
                errno => Err(std::io::Error::from_raw_os_error(errno)),
            }
        }
    }

    impl redb::StorageBackend for FillingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
            self.file.read(offset, len)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data(eventual)
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
    }

    /// The disk fills up under the store: the write that does not fit and every one after it are told
    /// RESOURCE_EXHAUSTED (StorageFull) and held back, `behind` says so, and stay held when a try meets
    /// another error (EIO); once the disk takes them they are applied in order, and nothing is lost (the
    /// file read again by a new store).
    #[test]
    fn writes_made_while_the_disk_is_full_are_held_back_and_applied_once_it_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let errno = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let set = |e: i32| errno.store(e, std::sync::atomic::Ordering::SeqCst);
        let opener: Opener = {
            let (path, errno) = (path.clone(), errno.clone());
            Box::new(move || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
                redb::Builder::new().create_with_backend(FillingDisk {
                    file: redb::backends::FileBackend::new(file)?,
                    errno: errno.clone(),
                })
            })
        };
        let store = RedbStore::open_with(opener, "filling").unwrap();
        let jobs: Vec<_> = (1..=4).map(|i| job(&format!("job-{i}"), i)).collect();
        store.insert_job(&jobs[0].0, &jobs[0].1).unwrap();
        set(28);
        for (meta, tasks) in &jobs[1..3] {
            let e = store.insert_job(meta, tasks).unwrap_err();
            assert_eq!(e.kind, StoreErrorKind::StorageFull, "{e}");
            assert!(e.message.contains("held back"), "{e}");
        }
        // a write whose caller gave up waiting (its future dropped) is held back and applied with them
        let (mut late, late_tasks) = jobs[2].clone();
        late.error = "written while the disk was full".into();
        drop(store.write(vec![Op::Job(late.clone())]));
        // the failures told are not kept once read (a long outage would grow them without end)
        let failures = || store.shared.queue.lock().unwrap().failures.len();
        assert_eq!(failures(), 0);
        // tried again (and reopened) every second, still full
        std::thread::sleep(RETRY_EVERY * 2 + Duration::from_millis(500));
        assert_eq!(
            store.behind().map(|e| e.kind),
            Some(StoreErrorKind::StorageFull)
        );
        // another error on the way: still held, not dropped
        set(5);
        std::thread::sleep(RETRY_EVERY * 2 + Duration::from_millis(500));
        let held = store.behind().expect("still held back");
        assert!(held.message.contains("held back"), "{held}");
        set(0);
        let started = std::time::Instant::now();
        while store.behind().is_some() {
            assert!(started.elapsed() < Duration::from_secs(10), "never applied");
            std::thread::sleep(Duration::from_millis(50));
        }
        store.insert_job(&jobs[3].0, &jobs[3].1).unwrap();
        assert_eq!(failures(), 0);
        assert!(store.shared.queue.lock().unwrap().waiting.is_empty());
        assert!(store.load().unwrap().contains(&(late, late_tasks)));
        let ids = |all: Vec<(JobMeta, Vec<TaskRecord>)>| {
            all.into_iter()
                .map(|(j, t)| (j.id.to_string(), t.len()))
                .collect::<Vec<_>>()
        };
        let expected: Vec<_> = jobs
            .iter()
            .map(|(j, t)| (j.id.to_string(), t.len()))
            .collect();
        assert_eq!(ids(store.load().unwrap()), expected);
        drop(store);
        assert_eq!(
            ids(RedbStore::open(&path).unwrap().load().unwrap()),
            expected
        );
    }

    #[test]
    fn redb_store_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        suite(&RedbStore::open(&path).unwrap());
        let reopened = RedbStore::open(&path).unwrap();
        let all = reopened.load().unwrap();
        assert_eq!(all.len(), 2, "state survives the process");
        // open once at a time: a second opener (another coordinator) is told who holds it
        let e = RedbStore::open(&path).err().expect("held");
        assert!(
            e.message.ends_with(
                "state.redb: another process holds the store open (a coordinator on the same \
                 --data-dir?)"
            ),
            "{e}"
        );
        // the suite's writes to jobs not stored (job nope, job-c once deleted) left no task row behind
        use redb::ReadableTableMetadata;
        let rows = reopened
            .read(|tx| {
                tx.open_table(TASKS)
                    .map_err(redb_err)?
                    .len()
                    .map_err(redb_err)
            })
            .unwrap();
        assert_eq!(
            rows,
            all.iter().map(|(_, tasks)| tasks.len() as u64).sum::<u64>()
        );
    }
}
