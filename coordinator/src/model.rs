//! The coordinator's model of the farm's work, as the scheduler keeps it and the store persists it: jobs
//! ([`JobMeta`]) and their tasks ([`TaskRecord`]), with their states.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stylefarm_core::ids::{ImageHash, JobId, WorkerId};
#[cfg(doc)]
use stylefarm_core::job::JobKind;
use stylefarm_core::job::{JobSpec, TaskSpec};

/// Job states, as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Submitted; none of its tasks has been leased yet.
    Queued,
    /// A task has been leased; a sweep or tiled job stays here until its contact sheet or last stitch is
    /// recorded.
    Running,
    /// Every task succeeded (and a sweep's contact sheet or a tiled job's final image is recorded).
    Succeeded,
    /// A task ran out of attempts or had its permanent error confirmed, or the coordinator's own step
    /// (contact sheet, stitch) failed; `error` says why.
    Failed,
    /// Cancelled by a client: its pending tasks were cancelled and its running ones told to stop.
    Cancelled,
}

impl JobState {
    /// Whether the job is over (succeeded, failed or cancelled): no task of it is leased again.
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
    /// Waiting in the queue for a lease, possibly backing off until `not_before_ms`.
    Pending,
    /// Leased to `worker`, whose attempt is under way.
    Running,
    /// Its result was accepted: `result` holds the image's sha256.
    Succeeded,
    /// Out of attempts, or its permanent error confirmed by [`crate::scheduler::PERMANENT_CONFIRMATIONS`]
    /// workers: its job failed with it.
    Failed,
    /// Its job ended (cancelled, or failed by another task) before the task could finish.
    Cancelled,
}

/// A job without its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMeta {
    /// The job's id (`job-` and hex digits), assigned at submission; the store's key.
    pub id: JobId,
    /// Submission order, for FIFO among equal priorities.
    pub seq: u64,
    /// The client's idempotency key: submitting again with the same non-empty key returns this job; empty
    /// when none was given.
    pub client_request_id: String,
    /// What to render, as submitted: kind (with a sweep's axes or a tiled job's tiling), content and style
    /// images (by sha256), params, priority, max attempts.
    pub spec: JobSpec,
    /// Where the job stands; terminal states are final.
    pub state: JobState,
    /// When the job was submitted, in ms since the Unix epoch.
    pub submitted_ms: i64,
    /// When the job reached a terminal state, in ms since the Unix epoch; 0 until then.
    pub finished_ms: i64,
    /// Why the job failed (`cancelled` for a cancelled job); empty otherwise.
    pub error: String,
    /// Strikes (retryable failures, lease expiries) per worker id; a worker at the blocklist threshold gets no
    /// more of this job's tasks. Failures blamed on the input or on memory are not strikes.
    pub strikes: BTreeMap<WorkerId, u32>,
    /// A job with stage work ([`JobKind::has_stage_work`]): the image of each finished stage, in order (a
    /// tiled job's stitched scales, coarsest first; a sweep's contact sheet).
    #[serde(default)]
    pub stage_results: Vec<ImageHash>,
    /// A job with stage work, once it succeeded: its own image, the last stage's (a tiled job's final
    /// stitched image, a sweep's contact sheet).
    #[serde(default)]
    pub result: Option<ImageHash>,
}

/// One task of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task's position in its job, from 0; a tiled job's later scales append their tiles after the
    /// earlier tasks.
    pub index: u32,
    /// What to render: content and styles (by sha256), params, label, and for a tile, its tile and scale.
    pub spec: TaskSpec,
    /// Where the task stands.
    pub state: TaskState,
    /// Attempts so far: each lease counts one, when it is handed out; bounded by the job's max attempts (or
    /// the scheduler's default).
    pub attempts: u32,
    /// The worker of the current or last attempt.
    pub worker: WorkerId,
    /// The result image, once the task succeeded.
    pub result: Option<ImageHash>,
    /// The error of the last failed attempt.
    pub error: String,
    /// Earliest time (unix ms) of the next attempt (retry backoff).
    pub not_before_ms: i64,
    /// The distinct workers that reported `error` as non-retryable (the input's fault), in report order;
    /// emptied when an attempt fails with another error.
    #[serde(default)]
    pub permanent_error_workers: Vec<WorkerId>,
}

impl TaskRecord {
    /// A new task, waiting for its first attempt.
    pub fn pending(index: u32, spec: TaskSpec) -> TaskRecord {
        TaskRecord {
            index,
            spec,
            state: TaskState::Pending,
            attempts: 0,
            worker: WorkerId::default(),
            result: None,
            error: String::new(),
            not_before_ms: 0,
            permanent_error_workers: Vec::new(),
        }
    }
}
