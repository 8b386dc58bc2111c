//! The coordinator's model of the farm's work, as the scheduler keeps it and the store persists it: jobs
//! ([`JobMeta`]) and their tasks ([`TaskRecord`]), with their states.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stylefarm_core::checkpoint::Checkpoint;
use stylefarm_core::ids::{ImageHash, JobId, LeaseId, WorkerId};
use stylefarm_core::job::{JobKind, JobSpec, TaskSpec};
use stylefarm_core::task_log::{AttemptLog, KEPT_ATTEMPTS};

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

    /// Every state, in the order of a job's life.
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// Its name for people and metrics: `queued`, `running`, `succeeded`, `failed`, `cancelled`.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
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
    /// Out of attempts, or its permanent error confirmed by
    /// [`crate::scheduler::SchedulerConfig::permanent_confirmations`] workers: its job failed with it, or,
    /// in a keep-going batch or sweep ([`stylefarm_core::job::JobSpec::keep_going`]), goes on without it.
    Failed,
    /// Its job ended (cancelled, or failed by another task) before the task could finish; or, in a
    /// job that has not ended, a new plan replaced it ([`replaced_tasks`]) or, in a keep-going batch or
    /// sweep, it was cancelled alone ([`crate::scheduler::Scheduler::cancel_tasks`]).
    Cancelled,
}

impl TaskState {
    /// Whether a task in this state leaves nothing for its job to wait for: it succeeded, or it was
    /// cancelled. In a job that has not ended, a cancelled task is one that a new plan replaced (an
    /// exact-mode scale's shards planned again for fewer workers, [`crate::scheduler::Scheduler::replan`];
    /// a scale planned again in smaller tiles, [`crate::scheduler::Scheduler::replan_smaller`]), or a
    /// keep-going job's task cancelled alone ([`crate::scheduler::Scheduler::cancel_tasks`]).
    pub fn settled(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Cancelled)
    }

    /// Whether a job's stage with tasks in `states` is done, for the coordinator's step
    /// ([`JobKind::has_stage_work`]: a contact sheet, a stitch): every task settled; in a keep-going sweep
    /// ([`JobSpec::keep_going`]), every task settled or failed for good, one of them rendered (one whose
    /// every variant failed has no sheet to make, and fails as a batch does).
    pub fn stage_done(spec: &JobSpec, states: impl IntoIterator<Item = TaskState>) -> bool {
        let kept_going = spec.keep_going && matches!(spec.kind, JobKind::Sweep(_));
        let mut rendered = false;
        for state in states {
            rendered |= state == TaskState::Succeeded;
            if !(state.settled() || (kept_going && state == TaskState::Failed)) {
                return false;
            }
        }
        rendered || !kept_going
    }

    /// Every state, in the order of a task's life.
    pub const ALL: [TaskState; 5] = [
        TaskState::Pending,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Cancelled,
    ];

    /// Its name for people and metrics: `pending`, `running`, `succeeded`, `failed`, `cancelled`.
    pub fn name(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
        }
    }
}

/// A job without its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobMeta {
    /// The job's id (`job-` and hex digits), assigned at submission; the store's key.
    pub id: JobId,
    /// Submission order, for FIFO among equal priorities.
    pub seq: u64,
    /// The client's idempotency key: submitting again with the same non-empty key (as the same tenant)
    /// returns this job; empty when none was given.
    pub client_request_id: String,
    /// With a `client_request_id`, the sha256 of the spec submitted (its wire encoding, before anything
    /// of it changed): a submit of that key with another spec is refused, not answered with this job.
    /// Empty without a key (and for records written before it: not compared).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub request_sha256: String,
    /// The tenant that submitted the job ([`crate::auth::Tenant`]): only its tokens see, fetch or cancel
    /// it. Empty when auth is off (and for records written before tenants).
    #[serde(default)]
    pub tenant: String,
    /// What to render, as submitted: kind (with a sweep's axes or a tiled job's tiling), content and style
    /// images (by sha256), params, priority, max attempts.
    pub spec: JobSpec,
    /// Where the job stands; terminal states are final.
    pub state: JobState,
    /// When the job was submitted, in ms since the Unix epoch.
    pub submitted_ms: i64,
    /// When the job reached a terminal state, in ms since the Unix epoch; 0 until then.
    pub finished_ms: i64,
    /// Its end is to be announced to the coordinator's `--notify-url` and has not been yet (delivered,
    /// refused or given up on: [`crate::notify`]): set as it ends when notifications are on
    /// ([`crate::scheduler::SchedulerConfig::announce_ends`]), cleared once announced. The next coordinator
    /// on the store announces the ends its predecessor left so.
    #[serde(default)]
    pub unannounced: bool,
    /// Why the job failed (`cancelled` for a cancelled job); empty otherwise.
    pub error: String,
    /// Strikes (retryable failures, lease expiries) per worker name ([`WorkerId::by_name`]: a worker keeps
    /// them when it registers again); a worker at the blocklist threshold gets no more of this job's tasks.
    /// Failures blamed on the input or on memory are not strikes.
    pub strikes: BTreeMap<WorkerId, u32>,
    /// A job with stage work ([`JobKind::has_stage_work`]): the image of each finished stage, in order (a
    /// tiled job's stitched scales, coarsest first; a sweep's contact sheet; a video's last frame, once
    /// every frame is rendered).
    #[serde(default)]
    pub stage_results: Vec<ImageHash>,
    /// A job with stage work, once it succeeded: its own image, the last stage's (a tiled job's final
    /// stitched image, a sweep's contact sheet, a video's last frame).
    #[serde(default)]
    pub result: Option<ImageHash>,
    /// Paused by its client ([`crate::scheduler::Scheduler::set_paused`]): its queued tasks are not leased
    /// until it is resumed; its running ones go on. Cleared when the job ends.
    #[serde(default)]
    pub paused: bool,
    /// A tiled job whose tile (or block) ran out of a device's memory: the largest tile side, in px, that
    /// its scales are planned with from then on (the scale that ran out planned again with it:
    /// [`crate::scheduler::Scheduler::replan_smaller`]); `None`: as large as the workers' memory allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tile_size: Option<u32>,
    /// The jobs it still waits for: those of its [`JobSpec::dependencies`] that have not succeeded yet. Its
    /// tasks are not leased until none is left ([`crate::scheduler::Scheduler`] settles it as each ends).
    /// A job that ends keeps them: run again, it waits for those that have not succeeded since.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_on: Vec<JobId>,
    /// Its insert failed for good (not held back): the store never held it, and no write of it lands, so
    /// it is not run again ([`crate::scheduler::Scheduler::retry`] refuses it). In memory only.
    #[serde(skip)]
    pub not_stored: bool,
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
    /// Attempts so far: each lease counts one, when it is handed out, and gives it back when it fails only
    /// because another shard's counted failure ended its group ([`crate::scheduler::FailureKind::Group`]);
    /// bounded by the job's max attempts (or the scheduler's default).
    pub attempts: u32,
    /// The attempts of its runs before the last `stylefarm retry` (RetryJob), which starts `attempts` over:
    /// the task log numbers its attempts on after them, so that an attempt's number is never seen twice.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub earlier_attempts: u32,
    /// The worker of the current or last attempt.
    pub worker: WorkerId,
    /// The result image, once the task succeeded.
    pub result: Option<ImageHash>,
    /// What the engine warned of while it rendered the result, once the task succeeded
    /// ([`stylefarm_core::task_log::warnings`]: at most 8, each at most 1 KiB).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The error of the last failed attempt.
    pub error: String,
    /// Earliest time (unix ms) of the next attempt (retry backoff).
    pub not_before_ms: i64,
    /// The distinct workers (by name) that reported `error` as non-retryable (the input's fault), in report
    /// order; emptied when an attempt fails with another error.
    #[serde(default)]
    pub permanent_error_workers: Vec<WorkerId>,
    /// The workers (by name) whose device ran out of memory on this task: the task goes to another worker
    /// first (see [`crate::scheduler::FailureKind::OutOfMemory`]).
    #[serde(default)]
    pub out_of_memory_on: Vec<WorkerId>,
    /// The most device memory, in bytes, of the workers that ran out on this task (0: none, or not
    /// known): a worker with no more than that takes it only a lease period later, one with more at once
    /// (OpenCue's out-of-memory retries with more memory).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub out_of_memory_bytes: u64,
    /// In a keep-going batch or sweep ([`stylefarm_core::job::JobSpec::keep_going`]): the workers (by name,
    /// once a strike) whose retryable failures of this task were strikes against them, taken back if the task
    /// fails for good.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub struck: Vec<WorkerId>,
    /// The last checkpoint of an attempt ([`stylefarm_core::job::JobSpec::checkpoints`]): the next attempt
    /// starts from it. Dropped once the task succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpoint>,
    /// The logs of its last [`KEPT_ATTEMPTS`] ended attempts, oldest first (the task log); shared, so that
    /// a view or a write of the record does not copy them.
    #[serde(default, skip_serializing_if = "no_logs")]
    pub logs: std::sync::Arc<Vec<AttemptLog>>,
    /// The lease of the attempt under way (while [`TaskState::Running`]), written as it is handed out: a
    /// coordinator that starts again on the store (restarted, or a standby taking over) takes it up
    /// ([`crate::scheduler::Scheduler::new`]), so that the worker rendering the task goes on and its result
    /// is taken, instead of the task starting over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseId>,
    /// When [`TaskRecord::lease`] was handed out, in ms since the Unix epoch (0: not known, a record of
    /// an earlier version): a coordinator that takes the lease up starts its attempt's log there.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub leased_ms: i64,
    /// The device memory of the lease's worker as it asked, in bytes (0: not known): a coordinator that
    /// takes the lease up steers the task away from that memory when it runs out, as the one that handed it
    /// out would.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lease_memory_bytes: u64,
    /// The worker's number for the request the lease was handed out for (pb::LeaseTaskRequest::request_id;
    /// 0: none, or not known): a coordinator that takes the lease up answers the request sent again, its
    /// answer lost in the restart, with this lease, as the one that handed it out would.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lease_request: u64,
}

impl TaskRecord {
    /// The number of its latest attempt in its log ([`AttemptLog::attempt`]): its attempts, after those of
    /// its runs before a retry ([`TaskRecord::earlier_attempts`]).
    pub fn attempt_number(&self) -> u32 {
        self.earlier_attempts.saturating_add(self.attempts)
    }

    /// When its lease was handed out ([`TaskRecord::leased_ms`]), or `now` where a record of an earlier
    /// version does not say.
    pub fn leased_at(&self, now: i64) -> i64 {
        if self.leased_ms > 0 {
            self.leased_ms
        } else {
            now
        }
    }

    /// Takes its lease away (the attempt ended, or went back to the queue), with what was written with it.
    pub fn clear_lease(&mut self) -> Option<LeaseId> {
        self.leased_ms = 0;
        self.lease_memory_bytes = 0;
        self.lease_request = 0;
        self.lease.take()
    }

    /// Keeps `attempt`'s log, and of the earlier ones the latest, [`KEPT_ATTEMPTS`] in all.
    pub fn keep_log(&mut self, attempt: AttemptLog) {
        let logs = std::sync::Arc::make_mut(&mut self.logs);
        logs.push(attempt);
        let extra = logs.len().saturating_sub(KEPT_ATTEMPTS);
        logs.drain(..extra);
    }
}

/// Whether a task has no attempt's log (serde leaves the field out of its record).
fn no_logs(logs: &std::sync::Arc<Vec<AttemptLog>>) -> bool {
    logs.is_empty()
}

/// The indices of the tasks that a new plan replaced, of a job's `tasks` in index order: tasks of a
/// tiled job's scale (shards, tiles), cancelled, with a later task of the same scale planned otherwise
/// (another number of shards, or another tile size: only [`crate::scheduler::Scheduler::replan`] and
/// [`crate::scheduler::Scheduler::replan_smaller`] add such tasks after cancelling some). They are not
/// the job's work: counts and progress leave them out.
pub fn replaced_tasks<'a>(
    tasks: impl DoubleEndedIterator<Item = &'a TaskRecord>,
) -> std::collections::BTreeSet<u32> {
    // (scale, shards, tile size) of the tasks after the one looked at: the plan each is of
    let mut later = std::collections::BTreeSet::new();
    let mut replaced = std::collections::BTreeSet::new();
    for t in tasks.rev() {
        let Some(scale) = &t.spec.scale else {
            continue;
        };
        let plan = (scale.scale, t.spec.shards(), scale.block());
        let replanned = || {
            later
                .iter()
                .any(|&(s, n, b)| s == plan.0 && (n, b) != (plan.1, plan.2))
        };
        if t.state == TaskState::Cancelled && replanned() {
            replaced.insert(t.index);
        }
        later.insert(plan);
    }
    replaced
}

impl TaskRecord {
    /// A new task, waiting for its first attempt.
    pub fn pending(index: u32, spec: TaskSpec) -> TaskRecord {
        TaskRecord {
            index,
            spec,
            state: TaskState::Pending,
            attempts: 0,
            earlier_attempts: 0,
            worker: WorkerId::default(),
            result: None,
            warnings: Vec::new(),
            error: String::new(),
            not_before_ms: 0,
            permanent_error_workers: Vec::new(),
            out_of_memory_on: Vec::new(),
            out_of_memory_bytes: 0,
            struck: Vec::new(),
            checkpoint: None,
            logs: Default::default(),
            lease: None,
            leased_ms: 0,
            lease_memory_bytes: 0,
            lease_request: 0,
        }
    }
}

/// Whether a count is 0 (serde leaves such fields out of a record).
fn is_zero<N: Default + PartialEq>(n: &N) -> bool {
    *n == N::default()
}

/// A stored job record, from its JSON, written by this version or an earlier one ([`upgrade_job`]).
pub fn job_from_json(bytes: &[u8]) -> Result<JobMeta, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
    upgrade_job(&mut value);
    serde_json::from_value(value)
}

/// A stored task record, from its JSON, written by this version or an earlier one ([`upgrade_task`]).
pub fn task_from_json(bytes: &[u8]) -> Result<TaskRecord, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_slice(bytes)?;
    upgrade_task(&mut value);
    serde_json::from_value(value)
}

/// Rewrites a job record of the versions before 2026-12-01 into the current form, in place (a current one
/// is left as it is): the spec's kind a bare name with `sweep` and `tiling` beside it becomes the kind with
/// its parameters inside; a sweep's `contact_sheet` becomes its one stage result and its result; a tiled
/// job's `scale_results` its stage results; an empty `result` none.
pub fn upgrade_job(job: &mut serde_json::Value) {
    use serde_json::{json, Value};
    let Some(fields) = job.as_object_mut() else {
        return;
    };
    if let Some(spec) = fields.get_mut("spec").and_then(Value::as_object_mut) {
        let sweep = spec.remove("sweep").unwrap_or_else(|| json!([]));
        let tiling = spec.remove("tiling");
        if let Some(Value::String(kind)) = spec.get("kind") {
            let kind = match kind.as_str() {
                "sweep" => json!({ "sweep": sweep }),
                "tiled" => json!({
                    "tiled": tiling.unwrap_or_else(|| {
                        serde_json::to_value(stylefarm_core::tiling::Tiling::default())
                            .unwrap_or(Value::Null)
                    })
                }),
                other => json!(other),
            };
            spec.insert("kind".into(), kind);
        }
    }
    if matches!(fields.get("result"), Some(Value::String(s)) if s.is_empty()) {
        fields.insert("result".into(), Value::Null);
    }
    if let Some(scales) = fields.remove("scale_results") {
        fields.insert("stage_results".into(), scales);
    }
    if let Some(Value::String(sheet)) = fields.remove("contact_sheet") {
        if !sheet.is_empty() {
            fields.insert("stage_results".into(), json!([sheet]));
            fields.insert("result".into(), json!(sheet));
        }
    }
}

/// Rewrites a task record of the versions before 2026-12-01 into the current form, in place: an empty
/// `result` becomes none, and a tiled task's flat `tile` (rectangle, index, count, tile size, `exact`) its
/// `scale` task, the whole canvas in exact mode or one tile.
pub fn upgrade_task(task: &mut serde_json::Value) {
    use serde_json::{json, Value};
    let Some(fields) = task.as_object_mut() else {
        return;
    };
    if matches!(fields.get("result"), Some(Value::String(s)) if s.is_empty()) {
        fields.insert("result".into(), Value::Null);
    }
    let Some(spec) = fields.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let Some(tile) = spec.remove("tile") else {
        return;
    };
    let scale = match tile {
        Value::Object(t) => {
            let part = if t.get("exact").and_then(Value::as_bool).unwrap_or(false) {
                json!({ "whole": { "block": t.get("tile_size") } })
            } else {
                json!({ "tile": {
                    "index": t.get("tile"),
                    "tiles": t.get("tiles"),
                    "rect": t.get("rect"),
                    "tile_size": t.get("tile_size"),
                } })
            };
            json!({
                "scale": t.get("scale"),
                "scales": t.get("scales"),
                "canvas_width": t.get("canvas_width"),
                "canvas_height": t.get("canvas_height"),
                "part": part,
            })
        }
        other => other,
    };
    spec.insert("scale".into(), scale);
}

#[cfg(test)]
mod tests {
    use super::*;
    use stylefarm_core::job::{parse_sweep, ImageHash, JobKind};
    use stylefarm_core::tiling::Tiling;
    use stylefarm_core::RenderParams;

    /// Records as the version of 2026-11-30 (1f6f1ab) wrote them, one JSON a line: a sweep job with its
    /// contact sheet and a task, a tiled job and its last tile (overlapping, then exact), a single job.
    const OLD: &str = include_str!("store/records-2026-11-30.jsonl");

    fn h(s: &str) -> ImageHash {
        ImageHash::of(s.as_bytes())
    }

    /// The spec the records were written from, as it is now.
    fn spec(kind: JobKind) -> JobSpec {
        JobSpec::new(
            kind,
            vec![h("c")],
            vec![h("s")],
            RenderParams {
                size: 1024,
                ..Default::default()
            },
        )
    }

    #[test]
    fn records_of_the_previous_version_load_as_the_same_jobs_and_tasks() {
        let lines: Vec<&[u8]> = OLD.lines().map(str::as_bytes).collect();
        assert_eq!(lines.len(), 7);

        let sweep = spec(JobKind::Sweep(parse_sweep("seed=1,2").unwrap()));
        let job = job_from_json(lines[0]).unwrap();
        assert_eq!(job.spec, sweep);
        assert_eq!(
            (job.stage_results, job.result),
            (vec![h("sheet")], Some(h("sheet")))
        );
        let task = task_from_json(lines[1]).unwrap();
        // the sweep's first point (a seed beside the content's init, which that version took: a new one is
        // refused now, its seed read by no point)
        let point = stylefarm_core::job::TaskSpec {
            content: h("c"),
            styles: vec![h("s")],
            params: RenderParams {
                seed: 1,
                ..sweep.params.clone()
            },
            label: "seed=1".into(),
            scale: None,
            frame: None,
        };
        assert_eq!(task.spec, point);
        assert_eq!(task.result, Some(h("r0")));

        for (exact, at) in [(false, 2), (true, 4)] {
            let tiled = spec(JobKind::Tiled(Tiling::new(Some(256), 64, exact)));
            let job = job_from_json(lines[at]).unwrap();
            assert_eq!(job.spec, tiled);
            assert_eq!(job.stage_results, [h("scale1"), h("scale2")]);
            assert_eq!(job.result, Some(h("scale2")));
            let task = task_from_json(lines[at + 1]).unwrap();
            let tiles = tiled
                .scale_tasks(800, 600, 1, &h("scale1"), &[], None)
                .unwrap();
            assert_eq!(task, TaskRecord::pending(1, tiles[tiles.len() - 1].clone()));
        }

        let single = job_from_json(lines[6]).unwrap();
        assert_eq!(single.spec, spec(JobKind::Single));
        assert!(single.stage_results.is_empty() && single.result.is_none());
    }

    #[test]
    fn current_records_are_left_as_they_are() {
        let tiled = spec(JobKind::Tiled(Tiling::new(Some(256), 64, true)));
        let job = JobMeta {
            id: "job-1".into(),
            seq: 1,
            client_request_id: String::new(),
            request_sha256: String::new(),
            tenant: String::new(),
            spec: tiled.clone(),
            state: JobState::Running,
            submitted_ms: 1,
            finished_ms: 0,
            unannounced: false,
            error: String::new(),
            strikes: BTreeMap::new(),
            stage_results: vec![h("scale1")],
            result: None,
            paused: true,
            max_tile_size: Some(768),
            waiting_on: vec!["job-0".into()],
            not_stored: false,
        };
        let bytes = serde_json::to_vec(&job).unwrap();
        assert_eq!(job_from_json(&bytes).unwrap(), job);
        let task = TaskRecord::pending(
            1,
            tiled
                .scale_tasks(800, 600, 1, &h("scale1"), &[], None)
                .unwrap()[0]
                .clone(),
        );
        let bytes = serde_json::to_vec(&task).unwrap();
        assert_eq!(task_from_json(&bytes).unwrap(), task);
    }
}
