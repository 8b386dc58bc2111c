//! [`MemoryStore`]: the store in memory; nothing survives the process.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{durable_now, err, Durable, Op, Store, StoreError};
use crate::model::{JobMeta, TaskRecord};

/// A job and its tasks by index.
type JobEntry = (JobMeta, BTreeMap<u32, TaskRecord>);

/// Keeps everything in memory.
#[derive(Default)]
pub struct MemoryStore {
    jobs: Mutex<BTreeMap<String, JobEntry>>,
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
                Op::Job(job) => match jobs.get_mut(&job.id) {
                    Some(entry) => entry.0 = job,
                    None => return durable_now(Err(err(format!("no job {}", job.id)))),
                },
                Op::Task(job_id, task) => match jobs.get_mut(&job_id) {
                    Some(entry) => {
                        entry.1.insert(task.index, task);
                    }
                    None => return durable_now(Err(err(format!("no job {job_id}")))),
                },
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_store() {
        super::super::tests::suite(&MemoryStore::default());
    }
}
