//! [`MemoryStore`]: the store in memory; nothing survives the process.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use stylefarm_core::ids::{JobId, WorkerId};

use super::{durable_now, Durable, Op, Store, StoreError};
use crate::model::{JobMeta, TaskRecord};

/// A job and its tasks by index.
type JobEntry = (JobMeta, BTreeMap<u32, TaskRecord>);

/// Keeps everything in memory.
#[derive(Default)]
pub struct MemoryStore {
    jobs: Mutex<BTreeMap<JobId, JobEntry>>,
    drained: Mutex<BTreeSet<WorkerId>>,
    registrations: AtomicU64,
}

impl Store for MemoryStore {
    fn write(&self, ops: Vec<Op>) -> Durable {
        let mut jobs = self.jobs.lock().unwrap();
        for op in ops {
            match op {
                Op::Insert(job, tasks) => {
                    let tasks = tasks.into_iter().map(|t| (t.index, t)).collect();
                    jobs.insert(job.id.clone(), (job, tasks));
                }
                // a job deleted (or never stored) is not brought back in part
                Op::Job(job) => {
                    if let Some(entry) = jobs.get_mut(&job.id) {
                        entry.0 = job;
                    }
                }
                Op::Task(job_id, task) => {
                    if let Some(entry) = jobs.get_mut(&job_id) {
                        entry.1.insert(task.index, task);
                    }
                }
                Op::Delete(job_id) => {
                    jobs.remove(&job_id);
                }
                Op::Drained(names) => *self.drained.lock().unwrap() = names,
                Op::Registrations(n) => self.registrations.store(n, Ordering::Relaxed),
            }
        }
        durable_now(Ok(()))
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

    fn load_drained(&self) -> Result<BTreeSet<WorkerId>, StoreError> {
        Ok(self.drained.lock().unwrap().clone())
    }

    fn load_registrations(&self) -> Result<u64, StoreError> {
        Ok(self.registrations.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store() {
        super::super::tests::suite(&MemoryStore::default());
    }
}
