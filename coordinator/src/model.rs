//! The coordinator's model of the farm's work, as the scheduler keeps it and the store persists it: jobs
//! ([`JobMeta`]) and their tasks ([`TaskRecord`]), with their states.

use std::collections::BTreeMap;

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
