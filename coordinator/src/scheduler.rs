//! The scheduler: jobs -> tasks, pull-based leases with expiry and fencing, retries with backoff, a per-job
//! worker blocklist, priorities (FIFO among equals), cancellation. State lives in memory, indexed for the hot
//! path, and every change that matters is written through to the [`Store`] before it is acknowledged.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use stylefarm_core::checkpoint::{Checkpoint, CheckpointEvery};
use stylefarm_core::ids::{ImageHash, JobId, LeaseId, WorkerId};
use stylefarm_core::job::{ExpandedJob, JobKind, JobSpec, Task, TaskId, TaskSpec};
use stylefarm_core::progress::TaskProgress;
use stylefarm_core::task_log::{clip_line, AttemptLog, ReceivedLines, SentLines};
use stylefarm_core::Init;
use tokio::sync::{broadcast, Notify};

use crate::decoding::MAX_IMAGE_UPLOAD;
use crate::metrics::SchedulerMetrics;
use crate::model::{JobMeta, JobState, TaskRecord, TaskState};
use crate::store::{self, Op, Store, StoreError};

/// Scheduling settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// How long a lease lasts without a heartbeat.
    pub lease: Duration,
    /// How often workers are asked to heartbeat.
    pub heartbeat_interval: Duration,
    /// Attempts per task when the job does not say.
    pub default_max_attempts: u32,
    /// Strikes of one worker on one job after which it gets no more of that job's tasks (see [`FailureKind`]).
    pub blocklist_after: u32,
    /// Distinct workers that must report the same [`FailureKind::Permanent`] error before a task fails
    /// without waiting for its attempts to run out: [`PERMANENT_CONFIRMATIONS`] on a farm, where one
    /// worker's word may be its own fault (a damaged disk, a broken build). 1 where the workers share one
    /// process, and so one build and one decoder (`stylefarm local`): another's word would add nothing.
    pub permanent_confirmations: usize,
    /// First retry delay; doubled per attempt up to `max_backoff`.
    pub backoff: Duration,
    /// Longest retry delay, however many attempts have failed.
    pub max_backoff: Duration,
    /// Unfinished (queued or running) jobs one tenant may have; a submit beyond it is refused
    /// ([`SchedulerError::Limit`], RESOURCE_EXHAUSTED on the wire).
    pub max_unfinished_jobs: usize,
    /// Tasks of one tenant's unfinished jobs, counted together; a submit (or a retry) that would pass it
    /// is refused ([`SchedulerError::Limit`]). Each task is held in memory and in the store (about 2 KB
    /// of each, measured: a job of 10,000 tasks took 19 MB of a coordinator's memory and 25 MB of its
    /// store): `max_unfinished_jobs` jobs of up to [`stylefarm_core::job::MAX_TASKS_PER_JOB`] tasks each
    /// would otherwise let one tenant fill the disk.
    pub max_unfinished_tasks: usize,
    /// How long a finished job is kept after it ended before the coordinator deletes it
    /// ([`Scheduler::delete_finished_before`], swept every [`KEEP_FINISHED_SWEEP`], or every half of this
    /// when shorter); `None`: kept until a client deletes it (DeleteJob).
    pub keep_finished: Option<Duration>,
    /// How long a job waits while every live worker is blocklisted for it (none may take its queued tasks)
    /// before it fails ([`Scheduler::fail_stranded`]): time for other workers to come (a cluster scaling
    /// up). `Duration::ZERO`: at once.
    pub no_worker_left: Duration,
    /// How often, at most, workers send a preview of the image they render (for the status page);
    /// `Duration::ZERO`: never.
    pub preview_interval: Duration,
    /// Each tenant's share of the farm at equal priority ([`Scheduler::lease_tagged`]): with tasks of both
    /// queued, a tenant of share 3 gets 3 tasks running for each of a tenant of share 1 (OpenCue's
    /// subscriptions, as weights). A tenant not named has [`DEFAULT_TENANT_SHARE`].
    /// [`parse_tenant_shares`] reads them.
    pub tenant_shares: HashMap<String, u32>,
    /// How long a running task may go without its progress moving (its scale or iteration, as its worker's
    /// heartbeats report it) before its lease is taken back, as if it had expired: the task is retried
    /// (a strike against the worker) and the worker told to cancel it (Flamenco's task timeout, for an
    /// engine that hangs while its heartbeats go on). Counted from the lease until the first progress: it
    /// must outlast a task's slowest iteration and its style and content targets. A task whose progress
    /// shows its render ended (the last iteration of its last scale) gets [`stylefarm_proto::REPORT_TIMEOUT`]
    /// more: its worker is encoding and sending the result, which takes as long as the image's size asks
    /// (and the worker gives up after as long). An exact-mode shard does not stall while it waits in an
    /// exchange call for its group's other shards ([`Scheduler::exchanging`]): the one that holds its
    /// group back (an engine hung between two calls) is the one that stalls. `None`: never.
    pub task_stall: Option<Duration>,
    /// Whether jobs' ends are announced (the coordinator's `--notify-url`, [`crate::notify`]): each end is
    /// marked to announce ([`JobMeta::unannounced`]) until [`Scheduler::announced`].
    pub announce_ends: bool,
}

/// A tenant's share ([`SchedulerConfig::tenant_shares`]) unless configured.
pub const DEFAULT_TENANT_SHARE: u32 = 1;

/// The largest share a tenant may be given ([`SchedulerConfig::tenant_shares`]).
pub const MAX_TENANT_SHARE: u32 = 1000;

/// Reads tenant shares, each `TENANT=SHARE` (a tenant's name as its client token names it, a share from 1
/// to [`MAX_TENANT_SHARE`]); an error names the entry that is wrong, and a tenant given twice.
pub fn parse_tenant_shares(entries: &[String]) -> Result<HashMap<String, u32>, String> {
    let mut shares = HashMap::new();
    for entry in entries {
        let (tenant, share) = entry
            .split_once('=')
            .ok_or_else(|| format!("tenant share '{entry}': expected TENANT=SHARE"))?;
        if !crate::auth::Tenant::valid_name(tenant) {
            return Err(format!(
                "tenant share '{entry}': the tenant must be {}",
                crate::auth::Tenant::NAME_RULE
            ));
        }
        let share = share
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_TENANT_SHARE).contains(n))
            .ok_or_else(|| {
                format!(
                    "tenant share '{entry}': the share must be a whole number from 1 to \
                     {MAX_TENANT_SHARE}"
                )
            })?;
        if shares.insert(tenant.to_string(), share).is_some() {
            return Err(format!("tenant share: tenant '{tenant}' is given twice"));
        }
    }
    Ok(shares)
}

/// [`SchedulerConfig::preview_interval`] unless configured.
pub const DEFAULT_PREVIEW_INTERVAL: Duration = Duration::from_secs(5);

/// The largest preview kept (HeartbeatRequest.preview_png): 4 bytes a pixel of a square of
/// [`PREVIEW_SIDE`], more than an 8-bit RGB PNG of it takes.
///
/// [`PREVIEW_SIDE`]: stylefarm_core::imaging::PREVIEW_SIDE
pub const MAX_PREVIEW_BYTES: usize =
    4 * (stylefarm_core::imaging::PREVIEW_SIDE * stylefarm_core::imaging::PREVIEW_SIDE) as usize;

/// [`SchedulerConfig::no_worker_left`] unless configured: 10 minutes, time for a cluster to start GPU nodes.
pub const DEFAULT_NO_WORKER_LEFT: Duration = Duration::from_secs(600);

/// How often, at most, the coordinator looks for finished jobs past [`SchedulerConfig::keep_finished`].
pub const KEEP_FINISHED_SWEEP: Duration = Duration::from_secs(60);
/// The most jobs one sweep deletes (one store transaction): a long history goes in several sweeps.
pub const KEEP_FINISHED_BATCH: usize = 1000;

/// [`SchedulerConfig::max_unfinished_jobs`] unless configured.
pub const DEFAULT_MAX_UNFINISHED_JOBS: usize = 10_000;

/// [`SchedulerConfig::max_unfinished_tasks`] unless configured: 100 jobs of the most tasks a job may have.
pub const DEFAULT_MAX_UNFINISHED_TASKS: usize = 100 * stylefarm_core::job::MAX_TASKS_PER_JOB;

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lease: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(2),
            default_max_attempts: 3,
            blocklist_after: 3,
            permanent_confirmations: PERMANENT_CONFIRMATIONS,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            max_unfinished_jobs: DEFAULT_MAX_UNFINISHED_JOBS,
            max_unfinished_tasks: DEFAULT_MAX_UNFINISHED_TASKS,
            keep_finished: None,
            no_worker_left: DEFAULT_NO_WORKER_LEFT,
            preview_interval: DEFAULT_PREVIEW_INTERVAL,
            tenant_shares: HashMap::new(),
            task_stall: None,
            announce_ends: false,
        }
    }
}

/// Errors of scheduler calls.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// No job has this id.
    #[error("job {0} not found")]
    JobNotFound(JobId),
    /// The job spec was refused (it cannot be expanded into tasks); the error names the field.
    #[error(transparent)]
    Invalid(#[from] stylefarm_core::Error),
    /// The store failed to write or load.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A limit was reached; the message names it.
    #[error("{0}")]
    Limit(String),
    /// The job is not in a state that allows the call (deleting a running job); the message says why.
    #[error("{0}")]
    Precondition(String),
}

/// The device memory of a worker asking for a task ([`Scheduler::lease_as`]), in bytes; 0 where not known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    /// The asking worker's.
    pub own: u64,
    /// The largest of the live workers'.
    pub largest_live: u64,
}

/// A task handed to a worker.
#[derive(Debug, Clone)]
pub struct Lease {
    /// Unique id of this lease, random (`lease-` and 32 hex digits): heartbeats, the result and a failure
    /// name it. Once the lease has expired or its task been reported, a result or failure under it is
    /// discarded and a heartbeat answers cancel (fencing).
    pub lease_id: LeaseId,
    /// The task (its job and index) and what the worker is to render.
    pub task: Task,
    /// When the lease expires unless a heartbeat renews it, in ms since the Unix epoch.
    pub deadline_ms: i64,
}

/// A job and its tasks as clients see them.
#[derive(Debug, Clone)]
pub struct JobView {
    /// The job's record as persisted: spec, state, strikes, results.
    pub meta: JobMeta,
    /// Every task in index order, with the live progress of a running one that has reported some.
    pub tasks: Vec<(TaskRecord, Option<TaskProgress>)>,
}

/// A lease as [`Scheduler::leases`] shows it.
#[derive(Debug, Clone)]
pub struct LeaseView {
    /// The worker holding it.
    pub worker: WorkerId,
    /// The task's job.
    pub job_id: JobId,
    /// The job's tenant.
    pub tenant: String,
    /// The task's index in the job.
    pub index: u32,
    /// The task's latest progress, once its worker reported some.
    pub progress: Option<TaskProgress>,
    /// When its worker's latest preview came (ms since the Unix epoch); 0: none yet.
    pub preview_ms: i64,
    /// When it was handed out (ms since the Unix epoch): a worker holds two leases while it reports one
    /// task and renders the next; the later is the one it renders.
    pub leased_ms: i64,
}

/// A preview of a running task's image, as its worker last sent it ([`Scheduler::heartbeat`]).
#[derive(Debug, Clone)]
pub struct Preview {
    /// A PNG, at most [`MAX_PREVIEW_BYTES`].
    pub png: bytes::Bytes,
    /// When it came, in ms since the Unix epoch.
    pub at_ms: i64,
}

struct LeaseInfo {
    job_id: JobId,
    index: u32,
    worker: WorkerId,
    /// The worker's number for the request it was handed out for (0: none): a request sent again, its
    /// answer lost, is answered with this lease ([`Scheduler::lease_again`]).
    request: u64,
    /// Whether a heartbeat of its worker came: its worker has it, and it is not handed again.
    heard: bool,
    /// When it was handed out, in ms since the Unix epoch.
    leased_ms: i64,
    /// When its progress last moved (its scale or iteration), or it was handed out, in ms since the Unix
    /// epoch ([`SchedulerConfig::task_stall`]).
    progressed_ms: i64,
    deadline_ms: i64,
    cancel: bool,
    progress: Option<TaskProgress>,
    preview: Option<Preview>,
    /// A shard's lease whose group another shard's counted failure ended: its own failure as
    /// [`FailureKind::Group`] costs no attempt (the other shard's failure was counted).
    group_failure_owed: bool,
    /// Whether the shard waits in an exchange call for its group's other shards ([`Scheduler::exchanging`]).
    exchanging: bool,
    /// The device memory of its worker when it asked, in bytes (0: unknown).
    memory_bytes: u64,
    /// Which attempt at its task it is ([`TaskRecord::attempts`] once leased).
    attempt: u32,
    /// The lines its worker logged so far ([`Scheduler::append_log`]), each once: kept with the task
    /// when the attempt ends ([`log_attempt`]).
    log: ReceivedLines,
    /// Whether its worker said it rendered the task and is sending its result while it takes another
    /// ([`Scheduler::sending_result`]): the task no longer holds the worker's device.
    rendered: bool,
    /// Its worker signed off while it held it ([`Scheduler::signed_off`]): it ends at the next
    /// [`Scheduler::expire`], as a lease that lapsed does.
    signed_off: bool,
    /// Taken up from the store by a coordinator that started again ([`Scheduler::new`]): until its worker
    /// is heard from, its lapse costs nothing ([`Scheduler::expire`]).
    adopted: bool,
}

/// The tasks of `job` whose leases hold their workers' devices: those not rendered yet (a worker sends a
/// rendered task's result while it renders its next: [`Scheduler::sending_result`]). What a job's
/// `max_workers` counts.
fn rendering(leases: &HashMap<LeaseId, LeaseInfo>, job: &Job) -> usize {
    job.leases
        .values()
        .filter(|id| leases.get(*id).is_none_or(|l| !l.rendered))
        .count()
}

/// What a lease of task `index` of `job` hands its worker: the task, its checkpoints, and the checkpoint to
/// resume from, if any.
fn task_to_lease(job: &Job, index: u32) -> Task {
    let task = &job.tasks[index as usize];
    let checkpoints = checkpoints(&job.meta.spec, &task.spec);
    let resume = task.checkpoint.clone().filter(|_| !checkpoints.is_never());
    Task {
        id: TaskId {
            job: job.meta.id.clone(),
            index,
        },
        spec: task.spec.clone(),
        checkpoints,
        resume,
    }
}

/// Ends `lease`'s attempt in the logs of `task` (its task) with `outcome`, taking the lines its worker
/// logged.
fn log_attempt(task: &mut TaskRecord, lease: &mut LeaseInfo, outcome: &str) {
    task.keep_log(AttemptLog {
        attempt: lease.attempt,
        worker: lease.worker.clone(),
        started_ms: lease.leased_ms,
        ended_ms: now_ms(),
        outcome: clip_line(outcome),
        log: std::mem::take(&mut lease.log.lines),
    });
}

struct Job {
    meta: JobMeta,
    tasks: Vec<TaskRecord>,
    /// lease id of each running task
    leases: HashMap<u32, LeaseId>,
}

/// Appends `specs` to a held job as pending tasks, queued and tallied; the store's ops that record them.
fn append_tasks(
    queue: &mut TaskQueue,
    tally: &mut Tally,
    job: &mut Job,
    specs: impl IntoIterator<Item = TaskSpec>,
) -> Vec<Op> {
    let mut ops = Vec::new();
    for spec in specs {
        let task = TaskRecord::pending(job.tasks.len() as u32, spec);
        ops.push(Op::Task(job.meta.id.clone(), task.clone()));
        queue.insert(&job.meta, task.index);
        tally.add_task(task.state);
        job.tasks.push(task);
    }
    ops
}

/// When a task saves checkpoints ([`JobSpec::checkpoints`]). Never for a shard of an exact-mode scale
/// (its attempt starts with its group's, from the beginning), nor for a task whose checkpoint could be
/// larger than the coordinator receives ([`MAX_IMAGE_UPLOAD`]), nor for a job whose spec sets both
/// intervals (refused at submit: only a store written by something else holds one).
fn checkpoints(job: &JobSpec, task: &TaskSpec) -> CheckpointEvery {
    if task.shards().is_some() || task.max_checkpoint_bytes() > MAX_IMAGE_UPLOAD as u64 {
        CheckpointEvery::Never
    } else {
        job.checkpoints().unwrap_or_default()
    }
}

/// The images (blobs) a job refers to: its spec's, its stages' and result, and each task's inputs, result
/// and checkpoint.
fn job_images(job: &Job) -> impl Iterator<Item = &ImageHash> {
    let meta = &job.meta;
    meta.spec
        .images()
        .chain(&meta.stage_results)
        .chain(&meta.result)
        .chain(job.tasks.iter().flat_map(|t| {
            t.spec
                .images()
                .chain(&t.result)
                .chain(t.checkpoint.iter().map(|c| &c.blob))
        }))
}

/// Whether a task is still to be done: queued or running.
fn to_do(task: &TaskRecord) -> bool {
    matches!(task.state, TaskState::Pending | TaskState::Running)
}

/// The tasks of `job` that a call names by index (`tasks`, as [`TaskRecord::index`]), each once, checked
/// to be the job's: refused naming `tasks` otherwise.
fn named_tasks(job: &Job, tasks: &[u32]) -> Result<BTreeSet<u32>, SchedulerError> {
    let n = job.tasks.len();
    if let Some(bad) = tasks.iter().find(|&&i| i as usize >= n) {
        return Err(stylefarm_core::Error::invalid(
            "tasks",
            format!(
                "job {} has no task {bad}: its {n} task(s) are numbered from 0",
                job.meta.id
            ),
        )
        .into());
    }
    Ok(tasks.iter().copied().collect())
}

/// Refuses to end or run again some of job `job`'s tasks alone (`what`) unless it is keep-going
/// ([`JobSpec::keep_going`]): the tasks of any other job end, and run again, together.
fn alone_needs_keep_going(job: &Job, what: &str) -> Result<(), SchedulerError> {
    if job.meta.spec.keep_going {
        return Ok(());
    }
    Err(SchedulerError::Precondition(format!(
        "job {} is not keep-going: only a keep-going batch's or sweep's tasks (JobSpec.keep_going) {what} \
         alone; name no task to do it to the whole job",
        job.meta.id
    )))
}

/// Replaces the tasks `current` of job `job_id` (of one scale) by new ones, `tasks`, planned otherwise: each
/// is cancelled with `reason` as its error (its lease ended: the worker's next heartbeat tells it to stop,
/// and its outcome is discarded), and `tasks` are queued after the job's last. Returns the writes.
fn replace_tasks(
    st: &mut State,
    job_id: &JobId,
    current: &[u32],
    tasks: Vec<TaskSpec>,
    reason: &str,
) -> Vec<Op> {
    let job = st
        .jobs
        .get_mut(job_id)
        .expect("a job being planned again exists");
    let mut ops = Vec::new();
    for &index in current {
        let task = &mut job.tasks[index as usize];
        if let Some(lease_id) = job.leases.remove(&index) {
            if let Some(mut lease) = st.leases.remove(&lease_id) {
                log_attempt(task, &mut lease, &format!("replaced: {reason}"));
            }
        }
        st.queue.remove(&job.meta, index);
        set_task_state(&mut st.tally, task, TaskState::Cancelled);
        task.result = None;
        task.warnings.clear();
        task.checkpoint = None;
        task.error = reason.to_string();
        ops.push(Op::Task(job_id.clone(), task.clone()));
    }
    ops.extend(append_tasks(&mut st.queue, &mut st.tally, job, tasks));
    ops
}

/// The key of a job's client request id in [`State::by_request`]: (tenant, request id).
fn request_key(meta: &JobMeta) -> (String, String) {
    (meta.tenant.clone(), meta.client_request_id.clone())
}

/// Frees `request` when it names `job_id`; whether it did.
fn release_request(st: &mut State, request: (String, String), job_id: &JobId) -> bool {
    let names_job = st.by_request.get(&request) == Some(job_id);
    if names_job {
        st.by_request.remove(&request);
    }
    names_job
}

/// Queue key of a pending task: higher priority first, then submission order, then task index.
type QueueKey = (Reverse<i32>, u64, u32, JobId);

/// The pending tasks, each tenant's in queue order ([`QueueKey`]), for the fair share between tenants
/// ([`fair_share`]).
#[derive(Default)]
struct TaskQueue {
    by_tenant: HashMap<String, BTreeSet<QueueKey>>,
    len: usize,
}

impl TaskQueue {
    /// Queues task `index` of the job of `meta`; whether it was not queued already.
    fn insert(&mut self, meta: &JobMeta, index: u32) -> bool {
        let tenant = match self.by_tenant.get_mut(&meta.tenant) {
            Some(keys) => keys,
            None => self.by_tenant.entry(meta.tenant.clone()).or_default(),
        };
        let new = tenant.insert(queue_key(meta, index));
        self.len += usize::from(new);
        new
    }

    /// Takes task `index` of the job of `meta` out of the queue; whether it was queued.
    fn remove(&mut self, meta: &JobMeta, index: u32) -> bool {
        let Some(keys) = self.by_tenant.get_mut(&meta.tenant) else {
            return false;
        };
        let queued = keys.remove(&queue_key(meta, index));
        if keys.is_empty() {
            self.by_tenant.remove(&meta.tenant);
        }
        self.len -= usize::from(queued);
        queued
    }

    /// Every queued task, tenant by tenant.
    fn iter(&self) -> impl Iterator<Item = &QueueKey> {
        self.by_tenant.values().flatten()
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// What a worker does with a queued task ([`fair_share`]).
enum Take {
    /// Takes it.
    Yes,
    /// Passes it by (a backoff).
    Skip,
    /// Passes every task of its job by (a paused job, a blocklist, a tag): the scan goes on past them at
    /// once.
    SkipJob,
    /// Takes nothing queued behind it (a scale's shards waiting for as many free workers).
    Wait,
}

/// The queued task a worker takes, of those `take` lets it: the highest priority first; among equal
/// priorities, the fair share between tenants (OpenCue's balance between shows): the tenant with the fewest
/// tasks running for its share (`shares`, [`SchedulerConfig::tenant_shares`]), then queue order
/// (submission). The shards of an exact-mode scale keep their place in
/// queue order: the first that is not skipped is a barrier, taken when nothing the worker may take is queued
/// before it, and nothing queued behind it is taken (they wait for as many free workers, [`Take::Wait`],
/// and must not lose them to tasks behind them). Each tenant's queue is scanned to its first task the worker
/// may take (before the barrier), which stands for the tenant. So one tenant's large batch does not hold a
/// shared farm while another's job waits; with one tenant, the task taken is the first the worker may take,
/// as in a plain queue. A lease scans the queued shards and, per tenant with tasks queued, the tasks it
/// skips before its first (a job it may not take at all is passed in one step).
fn fair_share(
    st: &State,
    shares: &HashMap<String, u32>,
    take: impl Fn(&QueueKey) -> Take,
) -> Option<QueueKey> {
    let mut shards: Vec<QueueKey> = st
        .sharded
        .iter()
        .filter_map(|id| st.jobs.get(id))
        .filter(|job| !job.meta.state.is_terminal())
        .flat_map(|job| {
            job.tasks
                .iter()
                .filter(|t| t.state == TaskState::Pending && t.spec.shards().is_some())
                .map(|t| queue_key(&job.meta, t.index))
        })
        .collect();
    shards.sort();
    let mut barrier = shards.iter().find_map(|key| match take(key) {
        Take::Skip | Take::SkipJob => None,
        Take::Yes => Some((key, true)),
        Take::Wait => Some((key, false)),
    });
    let is_shard = |key: &QueueKey| {
        st.jobs[&key.3].tasks[key.2 as usize]
            .spec
            .shards()
            .is_some()
    };
    let mut candidates: Vec<(&str, &QueueKey)> = Vec::new();
    for (tenant, keys) in &st.queue.by_tenant {
        // the tenant's first task the worker may take before the barrier; a shard found on the way (that
        // the worker may start, or that waits) is a barrier too
        let mut scan = keys.range::<QueueKey, _>(..);
        while let Some(key) = scan.next() {
            if barrier.is_some_and(|(b, _)| key >= b) {
                break;
            }
            match take(key) {
                Take::Skip => continue,
                Take::SkipJob => {
                    // past the job's tasks: its keys are (priority, seq, index, id), its seq its own
                    let (priority, seq, _, _) = key;
                    scan = keys.range((*priority, seq + 1, 0, JobId::default())..);
                    continue;
                }
                Take::Yes if !is_shard(key) => candidates.push((tenant.as_str(), key)),
                Take::Yes => barrier = Some((key, true)),
                Take::Wait => barrier = Some((key, false)),
            }
            break;
        }
    }
    candidates.retain(|(_, key)| barrier.is_none_or(|(b, _)| *key < b));
    let Some(top) = candidates.iter().map(|(_, key)| key.0).min() else {
        return barrier.filter(|(_, yes)| *yes).map(|(key, _)| key.clone());
    };
    candidates.retain(|(_, key)| key.0 == top);
    if candidates.len() == 1 {
        return Some(candidates[0].1.clone());
    }
    let mut running: HashMap<&str, u64> = HashMap::new();
    for lease in st.leases.values().filter(|l| !l.rendered) {
        if let Some(job) = st.jobs.get(&lease.job_id) {
            *running.entry(job.meta.tenant.as_str()).or_default() += 1;
        }
    }
    let running = |tenant: &str| running.get(tenant).copied().unwrap_or(0);
    let share = |tenant: &str| {
        u64::from(
            shares
                .get(tenant)
                .copied()
                .unwrap_or(DEFAULT_TENANT_SHARE)
                .max(1),
        )
    };
    // running / share, compared without division: a / b < c / d when a * d < c * b (shares are positive)
    candidates
        .into_iter()
        .min_by(|(a, key_a), (b, key_b)| {
            (running(a) * share(b))
                .cmp(&(running(b) * share(a)))
                .then_with(|| key_a.cmp(key_b))
        })
        .map(|(_, key)| key.clone())
}

#[derive(Default)]
struct State {
    /// [`SchedulerConfig::announce_ends`].
    announce: bool,
    jobs: HashMap<JobId, Job>,
    /// Jobs by (tenant, client request id).
    by_request: HashMap<(String, String), JobId>,
    /// Unfinished jobs by tenant.
    unfinished: HashMap<String, HashSet<JobId>>,
    queue: TaskQueue,
    leases: HashMap<LeaseId, LeaseInfo>,
    next_seq: u64,
    next_id: u64,
    /// Jobs and tasks by state, kept as they change ([`Scheduler::counts`]).
    tally: Tally,
    /// Jobs that blocklisted a worker, unfinished when added: those [`Scheduler::fail_stranded`] looks at.
    blocklisting: BTreeSet<JobId>,
    /// Since when (ms since the Unix epoch) each job has been found with no live worker left to take it.
    stranded_since: HashMap<JobId, i64>,
    /// Jobs that were given shards of an exact-mode scale, unfinished when added: those
    /// [`Scheduler::sharded_scales`] looks at.
    sharded: BTreeSet<JobId>,
    /// Workers whose lease expired since [`Scheduler::take_lost`] last took them, with the moment their
    /// lease ran out.
    lost: Vec<(WorkerId, std::time::Instant)>,
    /// Jobs whose stage a task's failure left done ([`TaskState::stage_done`]: a keep-going sweep's last
    /// variant failed) since [`Scheduler::take_stage_due`] last took them: their step is to run.
    stage_due: Vec<JobId>,
    /// The tiles (or exact-mode wholes) of tiled jobs' later scales that ran out of memory since
    /// [`Scheduler::take_ran_out`] last took them: (job, task index).
    ran_out: Vec<(JobId, u32)>,
    /// Jobs whose deletion is being written ([`Scheduler::forget`]): neither deleted again (one deletion
    /// at a time, so that its end clears the mark) nor run again meanwhile.
    deleting: HashSet<JobId>,
    /// The workers free now, asking for a task ([`Scheduler::idle`]), by name: their tags and how many of
    /// their calls wait. The shards of a scale start only on as many of them at once.
    idle: HashMap<WorkerId, (Vec<String>, usize)>,
    /// Unfinished jobs that wait for others ([`JobMeta::waiting_on`]): those [`settle_dependents`] looks at.
    waiting: BTreeSet<JobId>,
    /// The workers drained, by name ([`Scheduler::drain`]): they take no task.
    drained: Arc<BTreeSet<WorkerId>>,
    /// The number of the last worker registration ([`Scheduler::register`]).
    registrations: u64,
    /// Jobs one of whose tasks saved a checkpoint, whatever became of it since, as long as the job is
    /// kept: those [`Scheduler::holds_checkpoint`] looks at.
    checkpointed: HashSet<JobId>,
}

/// A job's per-worker records by worker name ([`WorkerId::by_name`]), as this version keeps them: records
/// of an earlier version keyed them by id (`name#n`), and one worker's registrations then counted apart
/// (its strikes summed here; its reports once).
fn by_worker_name(meta: &mut JobMeta, tasks: &mut [TaskRecord]) {
    if meta.strikes.keys().any(|w| w.by_name() != *w) {
        let mut strikes = BTreeMap::new();
        for (worker, n) in std::mem::take(&mut meta.strikes) {
            *strikes.entry(worker.by_name()).or_insert(0u32) += n;
        }
        meta.strikes = strikes;
    }
    let names = |workers: &mut Vec<WorkerId>| {
        let mut named: Vec<WorkerId> = Vec::with_capacity(workers.len());
        for worker in workers.drain(..) {
            let name = worker.by_name();
            if !named.contains(&name) {
                named.push(name);
            }
        }
        *workers = named;
    };
    for task in tasks {
        names(&mut task.permanent_error_workers);
        names(&mut task.out_of_memory_on);
    }
}

/// The number of jobs and tasks in each state, moved by every change of state ([`set_task_state`],
/// [`set_job_state`]) and added to as jobs and tasks arrive, so that the metrics read them without walking
/// every task the coordinator has ever had.
#[derive(Default)]
struct Tally {
    tasks: BTreeMap<&'static str, usize>,
    jobs: BTreeMap<&'static str, usize>,
}

impl Tally {
    fn add_task(&mut self, state: TaskState) {
        *self.tasks.entry(state.name()).or_default() += 1;
    }

    fn add_job(&mut self, state: JobState) {
        *self.jobs.entry(state.name()).or_default() += 1;
    }

    fn remove_task(&mut self, state: TaskState) {
        Self::decrement(&mut self.tasks, state.name());
    }

    fn remove_job(&mut self, state: JobState) {
        Self::decrement(&mut self.jobs, state.name());
    }

    fn decrement(counts: &mut BTreeMap<&'static str, usize>, name: &'static str) {
        if let Some(n) = counts.get_mut(name) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Moves `task` to state `to`, and the tally with it.
/// Shard task `index` of `job` back to the queue, its result dropped, to run again with shard task `with`:
/// a scale's shards run together, and one's result cannot be stitched without the others'. Its write goes
/// to `ops`.
fn run_again_with(
    tally: &mut Tally,
    queue: &mut TaskQueue,
    job: &mut Job,
    index: u32,
    with: u32,
    ops: &mut Vec<Op>,
) {
    let task = &mut job.tasks[index as usize];
    set_task_state(tally, task, TaskState::Pending);
    task.result = None;
    task.warnings.clear();
    task.error = format!("run again with shard task {with}");
    ops.push(Op::Task(job.meta.id.clone(), task.clone()));
    queue.insert(&job.meta, index);
}

fn set_task_state(tally: &mut Tally, task: &mut TaskRecord, to: TaskState) {
    tally.remove_task(task.state);
    tally.add_task(to);
    task.state = to;
    // the lease a restart takes up is a running attempt's: a task that ended, or went back to the queue,
    // is written without it (its lease may live on meanwhile, e.g. a cancelled task's until its worker
    // reports)
    if to != TaskState::Running {
        task.clear_lease();
    }
}

/// Takes back the strikes that keep-going task `task`'s failures put on its job's workers
/// ([`TaskRecord::struck`]): it failed everywhere, or was cancelled alone, and was its own fault.
fn take_back_strikes(meta: &mut JobMeta, task: &mut TaskRecord) {
    for name in std::mem::take(&mut task.struck) {
        if let Some(strikes) = meta.strikes.get_mut(&name) {
            *strikes = strikes.saturating_sub(1);
        }
    }
    meta.strikes.retain(|_, strikes| *strikes > 0);
}

/// Stamps job `meta`'s end now: when it ended, and whether that end is to be announced (`announce`:
/// [`SchedulerConfig::announce_ends`]).
fn stamp_end(meta: &mut JobMeta, announce: bool) {
    meta.finished_ms = now_ms();
    meta.unannounced = announce;
}

/// Moves job `meta` to state `to`, and the tally with it; a job that ends is no longer paused.
fn set_job_state(tally: &mut Tally, meta: &mut JobMeta, to: JobState) {
    tally.remove_job(meta.state);
    tally.add_job(to);
    meta.state = to;
    meta.paused &= !to.is_terminal();
}

/// Refuses to delete or run again a finished job while it is still ending: its tasks are being stopped
/// (told to stop at their next heartbeat; their leases would otherwise outlive the job's end), or its
/// deletion is being written ([`Scheduler::forget`]; one at a time, so that its end clears the mark).
fn still_ending(st: &State, job: &Job) -> Result<(), SchedulerError> {
    let id = &job.meta.id;
    let why = if !job.leases.is_empty() {
        format!("{} task(s) are still being stopped", job.leases.len())
    } else if st.deleting.contains(id) {
        "it is being deleted".to_string()
    } else {
        return Ok(());
    };
    Err(SchedulerError::Precondition(format!(
        "job {id}: {why}; try again in a moment"
    )))
}

/// Ends a job: pending tasks are cancelled, running ones told to stop at their next heartbeat; the writes
/// go to `ops`. Returns whether it ended now: a job that had ended keeps its state (and nothing is written:
/// it may be being deleted, [`Scheduler::forget`]). The jobs waiting for it are left to
/// [`settle_dependents`].
fn end_job(
    st: &mut State,
    job_id: &JobId,
    state: JobState,
    error: &str,
    ops: &mut Vec<Op>,
) -> Result<bool, SchedulerError> {
    let job = st
        .jobs
        .get_mut(job_id)
        .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
    if job.meta.state.is_terminal() {
        return Ok(false);
    }
    job_ended(&mut st.unfinished, &job.meta);
    set_job_state(&mut st.tally, &mut job.meta, state);
    job.meta.error = error.to_string();
    stamp_end(&mut job.meta, st.announce);
    // it waits no more (its `waiting_on` is kept: a retry waits for those again)
    st.waiting.remove(job_id);
    for task in job
        .tasks
        .iter_mut()
        .filter(|t| matches!(t.state, TaskState::Pending | TaskState::Running))
    {
        set_task_state(&mut st.tally, task, TaskState::Cancelled);
        ops.push(Op::Task(job_id.clone(), task.clone()));
        st.queue.remove(&job.meta, task.index);
    }
    ops.push(Op::Job(job.meta.clone()));
    for lease_id in job.leases.values() {
        if let Some(lease) = st.leases.get_mut(lease_id) {
            lease.cancel = true;
        }
    }
    Ok(true)
}

/// The image a succeeded job hands to a job that starts from its result ([`Init::Job`]): a single job's
/// render or a tiled job's stitched image; `None` for the other kinds, whose results are many (a batch, a
/// sweep's variants, a video's frames).
fn result_image(job: &Job) -> Option<&ImageHash> {
    match job.meta.spec.kind {
        JobKind::Single => job.tasks.first().and_then(|t| t.result.as_ref()),
        JobKind::Tiled(_) => job.meta.result.as_ref(),
        _ => None,
    }
}

/// What a job of `tenant`, `spec`, waits for among `jobs` (a new job's [`JobSpec::dependencies`]; a job run
/// again, those it waited for when it ended): those that have not succeeded yet, and the image of the job
/// its init is the result of ([`Init::Job`]) when that one has. Refused, naming `after` (`init` for the
/// init's job): a job the tenant does not have (or one being deleted), one that failed or was cancelled
/// (to be run again first), and as init a job whose result is not one image ([`result_image`]).
fn unmet_dependencies(
    st: &State,
    spec: &JobSpec,
    jobs: Vec<JobId>,
    tenant: &str,
) -> Result<(Vec<JobId>, Option<ImageHash>), stylefarm_core::Error> {
    let init_job = spec.params.init.job();
    let (mut waiting, mut image) = (Vec::new(), None);
    for id in jobs {
        let is_init = init_job == Some(&id);
        let field = dependency_field(spec, &id);
        let invalid = |why: String| stylefarm_core::Error::invalid(field, why);
        let job = st
            .jobs
            .get(&id)
            .filter(|j| j.meta.tenant == tenant && !st.deleting.contains(&id))
            .ok_or_else(|| invalid(format!("job {id} not found")))?;
        if is_init && !matches!(job.meta.spec.kind, JobKind::Single | JobKind::Tiled(_)) {
            return Err(invalid(format!(
                "job {id} is a {} job: only a single or tiled job's result is one image to start from",
                job.meta.spec.kind.name()
            )));
        }
        match job.meta.state {
            JobState::Succeeded if is_init => image = result_image(job).cloned(),
            JobState::Succeeded => {}
            JobState::Failed | JobState::Cancelled => {
                return Err(invalid(format!(
                    "job {id} {}; run it again first (stylefarm retry)",
                    if job.meta.state == JobState::Failed {
                        "failed"
                    } else {
                        "was cancelled"
                    }
                )))
            }
            JobState::Queued | JobState::Running => waiting.push(id),
        }
    }
    Ok((waiting, image))
}

/// The option that makes a job of `spec` wait for job `id`, which errors about it name: `init` when it
/// starts from that job's result ([`Init::Job`]), else `after`.
fn dependency_field(spec: &JobSpec, id: &JobId) -> &'static str {
    if spec.params.init.job() == Some(id) {
        "init"
    } else {
        "after"
    }
}

/// Sets `init` to `image` where it is the result of job `from` ([`Init::Job`]); whether it did.
fn start_from(init: &mut Init, from: &JobId, image: &ImageHash) -> bool {
    let of_it = init.job() == Some(from);
    if of_it {
        *init = Init::Image(image.clone());
    }
    of_it
}

/// Starts a held job from `image`, the result of job `from`, where its init is that job's
/// ([`start_from`]): its spec's and its tasks' (those written to `ops`).
fn start_job_from(job: &mut Job, from: &JobId, image: &ImageHash, ops: &mut Vec<Op>) {
    if start_from(&mut job.meta.spec.params.init, from, image) {
        for task in &mut job.tasks {
            if start_from(&mut task.spec.params.init, from, image) {
                ops.push(Op::Task(job.meta.id.clone(), task.clone()));
            }
        }
    }
}

/// Where a keep-going job goes once a task of it failed for good ([`Scheduler::go_on_keeping_going`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeptGoing {
    /// None of its tasks is left to run: it ended ([`kept_going_end`]).
    Ended,
    /// A sweep with its variants done: due for its contact sheet.
    SheetDue,
    /// Its other tasks go on.
    GoesOn,
}

/// What [`settle_dependents`] did.
#[derive(Default)]
struct Settled {
    /// The jobs it changed.
    changed: Vec<JobId>,
    /// Whether a job waits for none any more: its tasks may be leased now.
    released: bool,
}

/// Moves on the jobs waiting for `ended`, a job that just ended (or that is gone): once it succeeded each
/// stops waiting for it, and one that starts from its result ([`Init::Job`]) gets that image, in its spec
/// and in its tasks; when it failed, was cancelled or is gone, each fails, naming it, and so fails those
/// waiting for it in turn. The writes go to `ops`.
fn settle_dependents(st: &mut State, ended: &JobId, ops: &mut Vec<Op>) -> Settled {
    let mut settled = Settled::default();
    let mut ended_now = vec![ended.clone()];
    while let Some(ended) = ended_now.pop() {
        let waiting: Vec<JobId> = st
            .waiting
            .iter()
            .filter(|id| {
                st.jobs.get(*id).is_some_and(|j| {
                    !j.meta.state.is_terminal() && j.meta.waiting_on.contains(&ended)
                })
            })
            .cloned()
            .collect();
        if waiting.is_empty() {
            continue;
        }
        let outcome = match st.jobs.get(&ended) {
            Some(job) if job.meta.state == JobState::Succeeded => Ok(result_image(job).cloned()),
            Some(job) if job.meta.state == JobState::Failed => Err(format!(
                "job {ended}, which it waits for, failed: {}",
                job.meta.error
            )),
            Some(job) if job.meta.state == JobState::Cancelled => {
                Err(format!("job {ended}, which it waits for, was cancelled"))
            }
            Some(_) => continue,
            None => Err(format!("job {ended}, which it waits for, is gone")),
        };
        for id in waiting {
            let field = dependency_field(&st.jobs[&id].meta.spec, &ended);
            let outcome = match &outcome {
                // a succeeded job of another kind is refused as an init at submission; a result lost
                // is said so, not left for the engine to refuse
                Ok(None) if field == "init" => Err(format!("job {ended} has no result image")),
                other => other.clone(),
            };
            match &outcome {
                Ok(image) => {
                    let job = st.jobs.get_mut(&id).expect("a waiting job is held");
                    job.meta.waiting_on.retain(|j| *j != ended);
                    if let Some(image) = image {
                        start_job_from(job, &ended, image, ops);
                    }
                    ops.push(Op::Job(job.meta.clone()));
                    if job.meta.waiting_on.is_empty() {
                        st.waiting.remove(&id);
                        settled.released = true;
                    }
                }
                Err(why) => {
                    let error = format!("{field}: {why}");
                    if end_job(st, &id, JobState::Failed, &error, ops).unwrap_or(false) {
                        ended_now.push(id.clone());
                    }
                }
            }
            settled.changed.push(id);
        }
    }
    settled
}

/// A job with stage work, unfinished, its stage done ([`TaskState::stage_done`]): the coordinator's step is
/// next.
fn awaits_step(job: &Job) -> bool {
    job.meta.spec.kind.has_stage_work() && !job.meta.state.is_terminal() && stage_done(job)
}

/// Whether the job's current stage is done ([`TaskState::stage_done`]).
fn stage_done(job: &Job) -> bool {
    TaskState::stage_done(&job.meta.spec, job.tasks.iter().map(|t| t.state))
}

/// How a keep-going batch (or sweep) ends once none of its tasks is left to run (none queued or running) and
/// one did not render ([`JobSpec::keep_going`]): failed, naming the first few failed tasks, when one failed;
/// cancelled when the only ones left out were cancelled alone ([`Scheduler::cancel_tasks`]). The state and
/// the job's error. `None` for a job that is not keep-going, has a task still to run or rendered them all.
fn kept_going_end(job: &Job) -> Option<(JobState, String)> {
    const NAMED: usize = 3;
    let tasks = &job.tasks;
    if !job.meta.spec.keep_going
        || tasks
            .iter()
            .any(|t| matches!(t.state, TaskState::Pending | TaskState::Running))
    {
        return None;
    }
    let failed: Vec<&TaskRecord> = tasks
        .iter()
        .filter(|t| t.state == TaskState::Failed)
        .collect();
    let cancelled: Vec<u32> = tasks
        .iter()
        .filter(|t| t.state == TaskState::Cancelled)
        .map(|t| t.index)
        .collect();
    let of = tasks.len();
    let kept = of - failed.len() - cancelled.len();
    let and_cancelled = match cancelled.len() {
        0 => String::new(),
        c => format!(", {c} cancelled"),
    };
    if failed.is_empty() {
        let c = cancelled.len();
        let mut named: Vec<String> = cancelled.iter().take(NAMED).map(u32::to_string).collect();
        if c > NAMED {
            named.push(format!("and {} more", c - NAMED));
        }
        return (c > 0).then(|| {
            let error = format!(
                "{c} of {of} tasks cancelled ({kept} rendered, their results kept; `retry` runs the \
                 cancelled ones again): task(s) {}",
                named.join(", ")
            );
            (JobState::Cancelled, error)
        });
    }
    let mut named: Vec<String> = failed
        .iter()
        .take(NAMED)
        .map(|t| format!("task {} ({}): {}", t.index, t.spec.label, t.error))
        .collect();
    if failed.len() > NAMED {
        named.push(format!("and {} more", failed.len() - NAMED));
    }
    let n = failed.len();
    let again = if cancelled.is_empty() {
        "failed"
    } else {
        "failed and cancelled"
    };
    let error = format!(
        "{n} of {of} tasks failed{and_cancelled} ({kept} rendered, their results kept; `retry` runs the \
         {again} ones again): {}",
        named.join("; ")
    );
    Some((JobState::Failed, error))
}

/// `meta`'s job is no longer one of its tenant's unfinished jobs: it reached a terminal state.
fn job_ended(unfinished: &mut HashMap<String, HashSet<JobId>>, meta: &JobMeta) {
    if let Some(jobs) = unfinished.get_mut(&meta.tenant) {
        jobs.remove(&meta.id);
        if jobs.is_empty() {
            unfinished.remove(&meta.tenant);
        }
    }
}

/// The current time in ms since the Unix epoch (0 if the clock is set before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn queue_key(meta: &JobMeta, index: u32) -> QueueKey {
    (
        Reverse(meta.spec.priority),
        meta.seq,
        index,
        meta.id.clone(),
    )
}

/// An accepted result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completed {
    /// The job of the accepted result.
    pub job_id: JobId,
    /// This result was the job's last: the job has succeeded, or for a sweep, awaits its contact sheet.
    pub all_tasks_done: bool,
    /// The coordinator's stage work ([`JobKind::has_stage_work`]) is to run now: every task of the job
    /// succeeded, or a frame of a video did (its chunk's next frame follows at once, whatever the other
    /// chunks' frames are doing).
    pub stage_work: bool,
    /// The task's checkpoint, dropped now that it succeeded: its blob may go
    /// ([`crate::gc::TrackedBlobs::delete_unreferenced`]).
    pub dropped_checkpoint: Option<Checkpoint>,
}

/// What became of a checkpoint given to [`Scheduler::save_checkpoint`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointSaved {
    /// Not recorded: the lease is no longer live, or the task is not checkpointed.
    Discarded,
    /// Recorded, durable, replacing the task's checkpoint before it (if any), whose blob may go.
    Kept {
        /// The checkpoint it replaced.
        replaced: Option<Checkpoint>,
    },
}

/// What [`Scheduler::retry`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retried {
    /// The job's state now: queued, or running when nothing was queued again (a job that is only waiting
    /// for the coordinator's stage work); a job that had not ended keeps its own.
    pub state: JobState,
    /// How many of its tasks went back to the queue.
    pub requeued: usize,
    /// Every task of the job's stage has succeeded: the coordinator's stage work
    /// ([`JobKind::has_stage_work`]) is to run now (the step that failed the job, e.g. a stitch).
    pub stage_work: bool,
}

/// Why a pending task is held: no worker may start it until its job's client or another job moves it on
/// ([`Counts::held_by_reason`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Its job waits for the jobs it is after ([`JobMeta::waiting_on`]).
    Waiting,
    /// Its job is paused.
    Paused,
    /// Its job runs as many tasks as its [`JobSpec::max_workers`] lets.
    MaxWorkers,
}

impl Held {
    /// Every reason.
    pub const ALL: [Held; 3] = [Held::Waiting, Held::Paused, Held::MaxWorkers];

    /// Its name in [`Counts::held_by_reason`] and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Held::Waiting => "waiting",
            Held::Paused => "paused",
            Held::MaxWorkers => "max_workers",
        }
    }
}

/// The scheduler's state in numbers ([`Scheduler::counts`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Pending tasks a worker may start, by their job's priority (not those of [`Counts::held_by_reason`]).
    pub queue_by_priority: BTreeMap<String, usize>,
    /// Pending tasks that no worker may start until their job's client or another job moves them on, by
    /// why ([`Held::name`]; `max_workers`: those past what their job's [`JobSpec::max_workers`] lets start
    /// beside its running ones): work that more workers would not run.
    pub held_by_reason: BTreeMap<String, usize>,
    /// Tasks by state ([`TaskState::name`]).
    pub tasks_by_state: BTreeMap<String, usize>,
    /// Jobs by state ([`JobState::name`]).
    pub jobs_by_state: BTreeMap<String, usize>,
    /// Tasks queued (and not held) or running, by the worker tags their job asks for
    /// ([`worker_tags_label`]): the work a pool of workers with those tags (or more) may take.
    pub open_by_worker_tags: BTreeMap<String, usize>,
}

/// A job's worker tags as one label value: sorted, comma-separated; empty for a job any worker may take.
pub fn worker_tags_label(tags: &[String]) -> String {
    let mut tags = tags.to_vec();
    tags.sort();
    tags.dedup();
    tags.join(",")
}

/// Why no worker may start `task`, pending in `job`: `paused` (its client paused the job; a shard whose
/// siblings run still starts, as [`Scheduler::lease`] does), `waiting` (for the jobs it is after), or none.
fn held_reason(job: &Job, task: &TaskRecord) -> Option<Held> {
    if job.meta.state.is_terminal() {
        None
    } else if !job.meta.waiting_on.is_empty() {
        Some(Held::Waiting)
    } else if job.meta.paused
        && !(task.spec.shards().is_some()
            && shard_group(job, task).any(|t| t.state == TaskState::Running))
    {
        Some(Held::Paused)
    } else {
        None
    }
}

/// Gives the task of an ended `lease` back to the queue at no cost: its attempt given back, no strike. Its
/// attempts' log says why (`outcome`, with the number the next attempt takes again) when its worker had
/// it (a lease taken up at a restart and not heard from: its worker died with the coordinator, or
/// before), and nothing when it never had it (`None`: handed to a poll its worker gave up). A job that
/// ended meanwhile (cancelled, say) keeps its tasks as it left them. The task's write goes to `ops`;
/// returns whether it was given back.
fn give_back(
    st: &mut State,
    lease: &mut LeaseInfo,
    outcome: Option<&str>,
    ops: &mut Vec<Op>,
) -> bool {
    let running = |job: &Job| {
        !job.meta.state.is_terminal() && job.tasks[lease.index as usize].state == TaskState::Running
    };
    let Some(job) = st.jobs.get_mut(&lease.job_id).filter(|j| running(j)) else {
        return false;
    };
    let task = &mut job.tasks[lease.index as usize];
    if let Some(outcome) = outcome {
        log_attempt(task, lease, outcome);
    }
    task.attempts = task.attempts.saturating_sub(1);
    set_task_state(&mut st.tally, task, TaskState::Pending);
    st.queue.insert(&job.meta, lease.index);
    ops.push(Op::Task(job.meta.id.clone(), task.clone()));
    true
}

/// The workers of `live` (heard from lately, with their tags) that a job of `spec` may run on
/// ([`JobSpec::runs_on`]).
fn eligible<'a>(spec: &JobSpec, live: &'a [(WorkerId, Vec<String>)]) -> Vec<&'a WorkerId> {
    live.iter()
        .filter(|(_, tags)| spec.runs_on(tags))
        .map(|(id, _)| id)
        .collect()
}

/// Whether `worker` has `blocklist_after` strikes ([`SchedulerConfig::blocklist_after`]) on the job of
/// `meta`: it is given none of the job's tasks.
fn blocklisted(meta: &JobMeta, worker: &WorkerId, blocklist_after: u32) -> bool {
    name_blocklisted(meta, &worker.by_name(), blocklist_after)
}

/// The tasks that run together with `task` when it is a shard of an exact-mode scale (its scale's shards, as
/// many as its own count, not replaced), itself included; none when it is no shard.
fn shard_group<'a>(job: &'a Job, task: &TaskRecord) -> impl Iterator<Item = &'a TaskRecord> {
    let (scale, shards) = (task.spec.scale_index(), task.spec.shards());
    job.tasks.iter().filter(move |t| {
        shards.is_some()
            && t.spec.shards() == shards
            && t.spec.scale_index() == scale
            && t.state != TaskState::Cancelled
    })
}

/// [`blocklisted`] for a worker's name ([`WorkerId::by_name`], taken once).
fn name_blocklisted(meta: &JobMeta, name: &WorkerId, blocklist_after: u32) -> bool {
    meta.strikes.get(name).copied().unwrap_or(0) >= blocklist_after
}

/// Most workers drained at once ([`Scheduler::drain`]).
pub const MAX_DRAINED: usize = 10_000;

/// At most this many of the live workers' tag sets are named in a [`Waiting::reason`].
const TAG_SETS_NAMED: usize = 5;

/// What tells why a job waits ([`Waiting::reason`]): the workers live at one moment, and the blocklist.
/// Its default: no live worker, the default blocklist.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// The workers heard from lately and not drained ([`Scheduler::drain`]), with their tags.
    pub live: Vec<(WorkerId, Vec<String>)>,
    /// The workers heard from lately that are drained, with their tags.
    pub drained: Vec<(WorkerId, Vec<String>)>,
    /// Strikes that blocklist a worker for a job ([`SchedulerConfig::blocklist_after`]).
    pub blocklist_after: u32,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            live: Vec::new(),
            drained: Vec::new(),
            blocklist_after: SchedulerConfig::default().blocklist_after,
        }
    }
}

impl Waiting {
    /// Why a job has tasks queued and none running, for people (the status page, `stylefarm status`): no live
    /// worker at all (or only drained ones that may take it), none with the worker tags the job asks for, or
    /// every one that has them blocklisted for it. Empty when the job is finished, has a task running or none
    /// queued, or a live worker may take its tasks (they are busy with others, or about to ask); for the
    /// shards of an exact-mode scale, that they start together on as many free workers. `tasks`: the job's
    /// tasks.
    pub fn reason<'a>(
        &self,
        meta: &JobMeta,
        tasks: impl IntoIterator<Item = &'a TaskRecord>,
    ) -> String {
        let (mut queued, mut running, mut shards) = (false, false, None);
        for t in tasks {
            queued |= t.state == TaskState::Pending;
            running |= t.state == TaskState::Running;
            if t.state == TaskState::Pending {
                shards = shards.or(t.spec.shards());
            }
        }
        if !meta.waiting_on.is_empty() && !meta.state.is_terminal() {
            let jobs: Vec<&str> = meta.waiting_on.iter().map(JobId::as_str).collect();
            return format!("waiting for job {} to succeed", jobs.join(", "));
        }
        if meta.paused && queued && !meta.state.is_terminal() {
            return "paused: its queued tasks start once it is resumed".into();
        }
        if meta.state.is_terminal() || !queued || running {
            return String::new();
        }
        let live = &self.live;
        let may_take = |w: &&WorkerId| !blocklisted(meta, w, self.blocklist_after);
        if !eligible(&meta.spec, live).iter().any(may_take)
            && eligible(&meta.spec, &self.drained).iter().any(may_take)
        {
            return "the live workers that may take it are drained: it waits for one to be undrained \
                    (stylefarm undrain) or for another to register"
                .into();
        }
        if live.is_empty() && !self.drained.is_empty() {
            return "every live worker is drained, and none of them may take it: it waits for another to \
                    register"
                .into();
        }
        if live.is_empty() {
            return "no live worker: it waits for one to register".into();
        }
        let eligible = eligible(&meta.spec, live);
        if eligible.is_empty() {
            let mut have: Vec<String> = live
                .iter()
                .map(|(_, tags)| match worker_tags_label(tags) {
                    t if t.is_empty() => "none".to_string(),
                    t => t,
                })
                .collect();
            have.sort();
            have.dedup();
            if have.len() > TAG_SETS_NAMED {
                have.truncate(TAG_SETS_NAMED);
                have.push("...".into());
            }
            // no worker count: the text changes only when the tags present do (a watch sends each change)
            return format!(
                "no live worker has the worker tags it asks for ({}): the live ones have tags {}; it \
                 waits for one that has",
                worker_tags_label(&meta.spec.worker_tags),
                have.join("; ")
            );
        }
        if eligible
            .iter()
            .all(|w| blocklisted(meta, w, self.blocklist_after))
        {
            return format!(
                "every live worker it may run on ({}) is blocklisted for it (strikes: at least {}): it \
                 fails unless another comes",
                eligible.len(),
                self.blocklist_after
            );
        }
        if let Some(n) = shards {
            // no worker count here either: the text changes when the plan does
            return format!(
                "its {n} shards start together, when {n} workers that may take them are free at once \
                 (planned again for fewer if fewer are left)"
            );
        }
        String::new()
    }

    /// [`Waiting::reason`] for a job's view.
    pub fn of(&self, view: &JobView) -> String {
        self.reason(&view.meta, view.tasks.iter().map(|(t, _)| t))
    }
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// Stop the task: its job was cancelled, or the lease is gone.
    pub cancel: bool,
    /// The lease's new deadline, in ms since the Unix epoch; 0 when the lease is gone.
    pub deadline_ms: i64,
}

/// How a task failed, as its worker reports it. A failed task is retried after a backoff; it fails, and its
/// job with it (a keep-going batch or sweep goes on without it: [`JobSpec::keep_going`]), when it is out of
/// attempts, or sooner when its permanent error is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The worker's fault, or chance (a crash, a lost connection, an expired lease): another attempt may
    /// succeed. A strike against the worker: after [`SchedulerConfig::blocklist_after`] strikes on a job it
    /// gets no more of that job's tasks (in a keep-going batch or sweep, a task that fails for good takes its
    /// strikes back: it was the task's fault).
    Retryable,
    /// The worker blames the input (e.g. a corrupt image): retrying cannot help. Not a strike, and one
    /// worker's word does not end the task: it is retried, and fails at once, with its job, when
    /// [`SchedulerConfig::permanent_confirmations`] distinct workers have reported the same error (equal
    /// text) as permanent.
    Permanent,
    /// The device ran out of memory: not a strike. The task is offered to other workers first: the worker
    /// that ran out gets it again only once it has waited a lease period ([`SchedulerConfig::lease`])
    /// past its backoff with nobody else taking it (a farm of one worker, or of equal devices). A tile of
    /// a tiled job's later scale (not a shard) is also handed to the coordinator
    /// ([`Scheduler::take_ran_out`]), which plans its scale again in smaller tiles where it can.
    OutOfMemory,
    /// Another task of its group failed or started again (a shard of an exact-mode scale, whose shards run
    /// together and wait for each other): retried, not a strike. The attempt is not counted when another
    /// shard's counted failure ended the group while this lease ran (at most once a lease): a farm that
    /// loses a worker now and then loses each shard's attempts only for its own failures. Otherwise (a
    /// group that did not form within [`crate::exchange::JOIN_TIMEOUT`], an exchange the coordinator
    /// could not serve) it is counted, so that a group that cannot complete still runs out of attempts.
    /// (A shard waiting in call 0 when another failed does not fail, and keeps the right for its lease:
    /// one later group failure of that lease is free, whatever its cause.)
    Group,
}

impl FailureKind {
    /// How an attempt that failed so ended, for its log ([`TaskRecord::logs`]).
    fn ended(self) -> &'static str {
        match self {
            FailureKind::Retryable => "failed",
            FailureKind::Permanent => "failed on its input",
            FailureKind::OutOfMemory => "ran out of device memory",
            FailureKind::Group => "failed with its group",
        }
    }
}

/// What the error of an untiled job whose task ran out of device memory on its last attempt adds.
pub const OUT_OF_MEMORY_HINT: &str =
    " (the image at its size needs more device memory than the workers that ran it have: a smaller \
     --size, or for one image --tiled, which sizes its tiles for the workers' memory)";

/// [`SchedulerConfig::permanent_confirmations`] unless configured.
pub const PERMANENT_CONFIRMATIONS: usize = 2;

/// A worker counted free while this lives ([`Scheduler::idle`]).
pub struct Idle<'a> {
    scheduler: &'a Scheduler,
    name: WorkerId,
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        // not unwrap: a panic while another panic unwinds would abort the coordinator
        let Ok(mut st) = self.scheduler.state.lock() else {
            return;
        };
        if let Some(entry) = st.idle.get_mut(&self.name) {
            entry.1 -= 1;
            if entry.1 == 0 {
                st.idle.remove(&self.name);
            }
        }
    }
}

/// The farm's scheduler: jobs, their task queue and leases in memory behind one lock, written through to the
/// [`Store`]. Calls that record an outcome (submit, complete, fail, cancel, expire, ...) block until the
/// store has made it durable.
pub struct Scheduler {
    config: SchedulerConfig,
    /// Events counted as they happen.
    metrics: SchedulerMetrics,
    store: Arc<dyn Store>,
    state: Mutex<State>,
    /// Wakes long-polling LeaseTask calls when a task becomes pending.
    work: Notify,
    /// The id of each job that changed, for WatchJob.
    changes: broadcast::Sender<JobId>,
}

impl Scheduler {
    /// Loads the store's jobs. A task that was running when the coordinator stopped keeps its lease
    /// ([`TaskRecord::lease`]) for one lease period ([`SchedulerConfig::lease`]): its worker, which goes on
    /// rendering while the coordinator is away, renews it with its next heartbeat and sends its result as
    /// usual. Unheard from by then (the worker died too), the task goes back to the queue, the attempt given
    /// back. A shard of an exact-mode scale (whose group's exchange died with the coordinator), or a task
    /// of a job that has ended, goes back to the queue at once.
    pub fn new(config: SchedulerConfig, store: Arc<dyn Store>) -> Result<Scheduler, StoreError> {
        let mut state = State {
            drained: Arc::new(store.load_drained()?),
            registrations: store.load_registrations()?,
            announce: config.announce_ends,
            ..State::default()
        };
        for (mut meta, mut tasks) in store.load()? {
            // a job's tasks are found by index: a record out of place is a corrupt store, refused as an
            // undecodable record is (not an index past the end at the first lease)
            if let Some((at, t)) = tasks
                .iter()
                .enumerate()
                .find(|(at, t)| t.index as usize != *at)
            {
                return Err(StoreError::new(format!(
                    "job {}: its task record {at} of {} says index {}",
                    meta.id,
                    tasks.len(),
                    t.index
                )));
            }
            by_worker_name(&mut meta, &mut tasks);
            state.next_seq = state.next_seq.max(meta.seq + 1);
            if !meta.client_request_id.is_empty() {
                state.by_request.insert(
                    (meta.tenant.clone(), meta.client_request_id.clone()),
                    meta.id.clone(),
                );
            }
            if !meta.state.is_terminal() {
                (state.unfinished.entry(meta.tenant.clone()).or_default()).insert(meta.id.clone());
            }
            let mut adopted = HashMap::new();
            for t in tasks.iter_mut() {
                let lease = t.lease.clone().filter(|_| {
                    t.state == TaskState::Running
                        && !meta.state.is_terminal()
                        && t.spec.shards().is_none()
                });
                if let Some(lease_id) = lease {
                    let now = now_ms();
                    adopted.insert(
                        t.index,
                        (
                            lease_id,
                            LeaseInfo {
                                job_id: meta.id.clone(),
                                index: t.index,
                                worker: t.worker.clone(),
                                request: t.lease_request,
                                heard: false,
                                // its attempt's log starts when it was handed out; a stall is
                                // counted from now (its progress is not known until it is heard)
                                leased_ms: t.leased_at(now),
                                progressed_ms: now,
                                deadline_ms: now + config.lease.as_millis() as i64,
                                cancel: false,
                                progress: None,
                                preview: None,
                                group_failure_owed: false,
                                exchanging: false,
                                memory_bytes: t.lease_memory_bytes,
                                attempt: t.attempt_number(),
                                log: ReceivedLines::default(),
                                rendered: false,
                                signed_off: false,
                                adopted: true,
                            },
                        ),
                    );
                } else if t.state == TaskState::Running {
                    // the attempt its lease's write counted given back (a shard's group starts over
                    // for the coordinator's sake, not its own), and logged with the number the next
                    // takes again
                    if t.lease.is_some() {
                        let now = now_ms();
                        let outcome =
                            "stopped by the coordinator's restart (run again; the attempt \
                                       not counted)";
                        t.keep_log(AttemptLog {
                            attempt: t.attempt_number(),
                            worker: t.worker.clone(),
                            started_ms: t.leased_at(now),
                            ended_ms: now,
                            outcome: outcome.into(),
                            log: Default::default(),
                        });
                        t.attempts = t.attempts.saturating_sub(1);
                    }
                    t.clear_lease();
                    t.state = TaskState::Pending;
                    store.update_task(&meta.id, t)?;
                } else if t.lease.is_some() {
                    // a record written with its lease as the attempt ended (its state says how)
                    t.clear_lease();
                    store.update_task(&meta.id, t)?;
                }
                if t.state == TaskState::Pending && !meta.state.is_terminal() {
                    state.queue.insert(&meta, t.index);
                }
                state.tally.add_task(t.state);
            }
            state.tally.add_job(meta.state);
            if !meta.state.is_terminal()
                && meta.strikes.values().any(|&s| s >= config.blocklist_after)
            {
                state.blocklisting.insert(meta.id.clone());
            }
            if !meta.state.is_terminal() && tasks.iter().any(|t| t.spec.shards().is_some()) {
                state.sharded.insert(meta.id.clone());
            }
            if !meta.state.is_terminal() && !meta.waiting_on.is_empty() {
                state.waiting.insert(meta.id.clone());
            }
            if tasks.iter().any(|t| t.checkpoint.is_some()) {
                state.checkpointed.insert(meta.id.clone());
            }
            let mut leases = HashMap::new();
            for (index, (lease_id, lease)) in adopted {
                leases.insert(index, lease_id.clone());
                state.leases.insert(lease_id, lease);
            }
            state.jobs.insert(
                meta.id.clone(),
                Job {
                    meta,
                    tasks,
                    leases,
                },
            );
        }
        // a job that ended (or was deleted) before the writes settling those waiting for it were made: they
        // are settled now
        let ended: BTreeSet<JobId> = state
            .waiting
            .iter()
            .flat_map(|id| &state.jobs[id].meta.waiting_on)
            .filter(|dep| {
                state
                    .jobs
                    .get(*dep)
                    .is_none_or(|d| d.meta.state.is_terminal())
            })
            .cloned()
            .collect();
        let mut ops = Vec::new();
        for dep in ended {
            settle_dependents(&mut state, &dep, &mut ops);
        }
        if !ops.is_empty() {
            store::wait(store.write(ops))?;
        }
        let (changes, _) = broadcast::channel(1024);
        Ok(Scheduler {
            config,
            metrics: SchedulerMetrics::default(),
            store,
            state: Mutex::new(state),
            work: Notify::new(),
            changes,
        })
    }

    /// The settings it runs with; workers are told the lease length and heartbeat interval when they
    /// register.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Job ids as they change.
    pub fn subscribe(&self) -> broadcast::Receiver<JobId> {
        self.changes.subscribe()
    }

    fn changed(&self, job_id: &JobId) {
        let _ = self.changes.send(job_id.clone());
    }

    /// Checks and expands a job, and adds it; a known `client_request_id` returns the earlier job instead
    /// (`false`).
    pub fn submit(
        &self,
        spec: JobSpec,
        client_request_id: &str,
    ) -> Result<(JobId, bool), SchedulerError> {
        self.submit_expanded(spec.expand()?, "", client_request_id, false)
    }

    /// [`Scheduler::submit`] of a job already expanded into its tasks (as the gRPC edge does, once), for
    /// `tenant` (its request ids are its own), `paused` or not ([`Scheduler::set_paused`]); refused when
    /// the tenant has [`SchedulerConfig::max_unfinished_jobs`] unfinished jobs.
    pub fn submit_expanded(
        &self,
        job: ExpandedJob,
        tenant: &str,
        client_request_id: &str,
        paused: bool,
    ) -> Result<(JobId, bool), SchedulerError> {
        self.writable()?;
        let (mut spec, mut tasks) = job.into_parts();
        // the spec as submitted, by which a key used again is told from a mistake
        let request_sha256 = match client_request_id {
            "" => String::new(),
            _ => {
                use prost::Message;
                ImageHash::of(&stylefarm_proto::pb::JobSpec::from(&spec).encode_to_vec())
                    .to_string()
            }
        };
        let mut st = self.state.lock().unwrap();
        let request = (tenant.to_string(), client_request_id.to_string());
        if let Some(id) = st
            .by_request
            .get(&request)
            .filter(|_| !client_request_id.is_empty())
        {
            let earlier = st.jobs.get(id).map(|j| j.meta.request_sha256.as_str());
            if earlier.is_some_and(|e| !e.is_empty() && e != request_sha256) {
                return Err(SchedulerError::Invalid(stylefarm_core::Error::invalid(
                    "client_request_id",
                    format!(
                        "used already for job {id}, whose spec differs from this one (a key stands for \
                         one submission: a new job needs a new key)"
                    ),
                )));
            }
            return Ok((id.clone(), false));
        }
        self.room_for_a_job(&st, tenant, tasks.len())?;
        let (waiting_on, init_image) = unmet_dependencies(&st, &spec, spec.dependencies(), tenant)?;
        if let (Some(from), Some(image)) = (spec.params.init.job().cloned(), init_image) {
            // its init's job has succeeded already: its tasks start from that image
            start_from(&mut spec.params.init, &from, &image);
            for task in &mut tasks {
                start_from(&mut task.params.init, &from, &image);
            }
        }
        // unique among the jobs held, even when a restart (its counter from 0) lands in the millisecond of
        // the last job before it
        let id = loop {
            st.next_id += 1;
            let id = JobId::new(format!("job-{:x}{:04x}", now_ms(), st.next_id & 0xffff));
            if !st.jobs.contains_key(&id) {
                break id;
            }
        };
        let seq = st.next_seq;
        st.next_seq += 1;
        let meta = JobMeta {
            id: id.clone(),
            seq,
            client_request_id: client_request_id.to_string(),
            request_sha256,
            tenant: tenant.to_string(),
            spec,
            state: JobState::Queued,
            submitted_ms: now_ms(),
            finished_ms: 0,
            unannounced: false,
            error: String::new(),
            strikes: Default::default(),
            stage_results: Vec::new(),
            result: None,
            paused,
            max_tile_size: None,
            waiting_on,
            not_stored: false,
        };
        let tasks: Vec<TaskRecord> = tasks
            .into_iter()
            .enumerate()
            .map(|(i, spec)| TaskRecord::pending(i as u32, spec))
            .collect();
        let durable = self
            .store
            .write(vec![Op::Insert(meta.clone(), tasks.clone())]);
        for t in &tasks {
            st.queue.insert(&meta, t.index);
        }
        if !client_request_id.is_empty() {
            st.by_request.insert(request, id.clone());
        }
        (st.unfinished.entry(tenant.to_string()).or_default()).insert(id.clone());
        st.tally.add_job(meta.state);
        for t in &tasks {
            st.tally.add_task(t.state);
        }
        if !meta.waiting_on.is_empty() {
            st.waiting.insert(id.clone());
        }
        st.jobs.insert(
            id.clone(),
            Job {
                meta,
                tasks,
                leases: HashMap::new(),
            },
        );
        drop(st);
        if let Err(e) = store::wait(durable) {
            if !e.held_back {
                // not stored, nor to be: the job fails in memory (its tasks a worker may have leased
                // meanwhile stopped; its writes go nowhere: the store writes nothing of a job it lacks),
                // is not run again, and its request id is free for the client's retry to submit it again
                let mut st = self.state.lock().unwrap();
                if let Some(job) = st.jobs.get_mut(&id) {
                    job.meta.not_stored = true;
                    let request = request_key(&job.meta);
                    let _ = self.finish_job(
                        &mut st,
                        &id,
                        JobState::Failed,
                        &format!("not stored: {e}"),
                        &mut Vec::new(),
                    );
                    release_request(&mut st, request, &id);
                }
                drop(st);
                self.changed(&id);
            }
            return Err(e.into());
        }
        self.work.notify_waiters();
        self.changed(&id);
        Ok((id, true))
    }

    /// Refuses one more unfinished job of `tenant`, of `tasks` tasks, when it has
    /// [`SchedulerConfig::max_unfinished_jobs`], or when its unfinished jobs' tasks and these would be more
    /// than [`SchedulerConfig::max_unfinished_tasks`].
    fn room_for_a_job(&self, st: &State, tenant: &str, tasks: usize) -> Result<(), SchedulerError> {
        let jobs = st.unfinished.get(tenant);
        let unfinished = jobs.map_or(0, HashSet::len);
        if unfinished >= self.config.max_unfinished_jobs {
            return Err(SchedulerError::Limit(format!(
                "max_unfinished_jobs: {unfinished} jobs of this client are queued or running, the \
                 limit is {} (wait for some to finish, or cancel some)",
                self.config.max_unfinished_jobs
            )));
        }
        // counted when asked (a submit, a retry), over the tenant's unfinished jobs: their tasks grow
        // as their scales are planned
        let held: usize = (jobs.into_iter().flatten())
            .filter_map(|id| st.jobs.get(id))
            .map(|j| j.tasks.len())
            .sum();
        if held.saturating_add(tasks) > self.config.max_unfinished_tasks {
            return Err(SchedulerError::Limit(format!(
                "max_unfinished_tasks: this client's queued or running jobs have {held} tasks, this \
                 job {tasks} more, the limit is {} (wait for some to finish, or cancel some)",
                self.config.max_unfinished_tasks
            )));
        }
        Ok(())
    }

    /// Hands the next task to `worker` (a worker without tags), if one is ready: [`Scheduler::lease_tagged`].
    pub fn lease(&self, worker: &WorkerId) -> Result<Option<Lease>, SchedulerError> {
        self.lease_tagged(worker, &[])
    }

    /// Hands the next task to `worker`, whose tags are `tags`, if one is ready: the highest priority first;
    /// at equal priorities, the tenant with the fewest tasks running for its share (a fair share,
    /// [`SchedulerConfig::tenant_shares`]), then the oldest job;
    /// not a task of a job that blocklisted the worker or asks for a tag it lacks ([`JobSpec::runs_on`]),
    /// nor one waiting out a retry backoff.
    pub fn lease_tagged(
        &self,
        worker: &WorkerId,
        tags: &[String],
    ) -> Result<Option<Lease>, SchedulerError> {
        self.lease_as(worker, tags, DeviceMemory::default())
    }

    /// [`Scheduler::lease_tagged`] for a worker whose device memory is `memory` (OpenCue's out-of-memory
    /// retries with more memory): while a live worker has a larger device than any a task ran out of
    /// memory on, the task goes at once to such a worker, and waits a lease period before it goes to one
    /// with no more memory than that (as it does for the workers it ran out on). A worker whose memory is
    /// not known is not held back. Not for the shards of an exact-mode scale, which start together.
    pub fn lease_as(
        &self,
        worker: &WorkerId,
        tags: &[String],
        memory: DeviceMemory,
    ) -> Result<Option<Lease>, SchedulerError> {
        // expire() does nothing while the store holds writes back; lease_ready then refuses
        self.expire()?;
        self.lease_ready(worker, tags, memory, 0)
    }

    /// [`Scheduler::lease`] without expiring the leases past their deadline first (which waits for the
    /// store's commit): what [`Scheduler::lease_wait`] calls on an async thread; the coordinator's loop
    /// expires leases every 250 ms and wakes the waiters when tasks come back.
    fn lease_ready(
        &self,
        worker: &WorkerId,
        tags: &[String],
        memory: DeviceMemory,
        request: u64,
    ) -> Result<Option<Lease>, SchedulerError> {
        self.writable()?;
        let now = now_ms();
        let mut st = self.state.lock().unwrap();
        // a scheduler bug, injected by the tests (a panic while the state is held)
        fail::fail_point!("coordinator-lease-locked");
        let st = &mut *st;
        let lease_ms = self.config.lease.as_millis() as i64;
        // strikes and out-of-memory reports count by the worker's name (whichever registration it is)
        let name = worker.by_name();
        if st.drained.contains(&name) {
            return Ok(None);
        }
        let takes = |meta: &JobMeta| {
            !name_blocklisted(meta, &name, self.config.blocklist_after) && meta.spec.runs_on(tags)
        };
        // a task that ran out of memory goes first to other workers, and to a larger device when one is
        // live: this worker, or one with no more than the largest device it ran out on, takes it only a
        // lease period later (a shard, whose group starts together, only the first)
        let ready = |task: &TaskRecord| {
            let ran_out = task.out_of_memory_bytes;
            let no_larger = memory.own > 0
                && memory.own <= ran_out
                && memory.largest_live > ran_out
                && task.spec.shards().is_none();
            let ran_out_here = task.out_of_memory_on.contains(&name) || no_larger;
            task.not_before_ms + if ran_out_here { lease_ms } else { 0 } <= now
        };
        // the shards of a scale run together, each waiting for the others at every step: a shard whose
        // siblings run already comes before any other task (else two scales started at once on a farm of
        // two workers would each hold one and wait for the other's, and neither ends)
        let started = st
            .sharded
            .iter()
            .filter_map(|id| st.jobs.get(id))
            .filter(|job| !job.meta.state.is_terminal() && takes(&job.meta))
            .flat_map(|job| {
                let running =
                    |t: &TaskRecord| shard_group(job, t).any(|s| s.state == TaskState::Running);
                job.tasks
                    .iter()
                    .filter(move |t| t.state == TaskState::Pending && t.spec.shards().is_some())
                    .filter(move |t| ready(t) && running(t))
                    .map(|t| queue_key(&job.meta, t.index))
            })
            .min();
        // whether the worker takes the task of `key`, skips it, or waits (takes nothing behind it)
        let take = |key: &QueueKey| {
            let job = &st.jobs[&key.3];
            let task = &job.tasks[key.2 as usize];
            // a paused job starts nothing (a shard whose siblings run, above, still starts), nor one that
            // waits for others, nor one with as many tasks running as its limit
            let max_workers = job.meta.spec.max_workers as usize;
            if job.meta.paused
                || !job.meta.waiting_on.is_empty()
                || !takes(&job.meta)
                || (max_workers > 0 && rendering(&st.leases, job) >= max_workers)
            {
                return Take::SkipJob;
            }
            if task.spec.shards().is_none() {
                return if ready(task) { Take::Yes } else { Take::Skip };
            }
            // a scale's shards start together, on as many free workers: when fewer are free, this one
            // waits for the others rather than taking a task behind them (which could keep them from ever
            // being free at once)
            let pending: Vec<&TaskRecord> = shard_group(job, task)
                .filter(|t| t.state == TaskState::Pending)
                .collect();
            if !pending.iter().all(|t| ready(t)) {
                return Take::Skip;
            }
            let free = st
                .idle
                .iter()
                .filter(|(other, _)| **other != name && !st.drained.contains(*other))
                .filter(|(other, (tags, _))| {
                    !name_blocklisted(&job.meta, other, self.config.blocklist_after)
                        && job.meta.spec.runs_on(tags)
                })
                .count()
                + 1;
            if free < pending.len() {
                Take::Wait
            } else {
                Take::Yes
            }
        };
        let pick = started.or_else(|| fair_share(st, &self.config.tenant_shares, take));
        let Some(key) = pick else {
            return Ok(None);
        };
        let starts_group = {
            let job = &st.jobs[&key.3];
            let task = &job.tasks[key.2 as usize];
            task.spec.shards().is_some()
                && !shard_group(job, task).any(|t| t.state == TaskState::Running)
        };
        st.queue.remove(&st.jobs[&key.3].meta, key.2);
        let (_, _, index, job_id) = key;
        // random: the id is what fences a lease's reports, and another worker must not guess it
        let lease_id = LeaseId::new(format!(
            "lease-{}",
            stylefarm_core::ids::hex(&rand::random::<[u8; 16]>())
        ));
        let deadline_ms = now + self.config.lease.as_millis() as i64;
        let job = st.jobs.get_mut(&job_id).expect("queued job exists");
        let task = &mut job.tasks[index as usize];
        set_task_state(&mut st.tally, task, TaskState::Running);
        task.attempts += 1;
        task.worker = worker.clone();
        task.lease = Some(lease_id.clone());
        task.leased_ms = now;
        task.lease_memory_bytes = memory.own;
        task.lease_request = request;
        let task_attempt = task.attempt_number();
        // written, not waited for: a coordinator that starts again on the store takes the lease up
        // (Scheduler::new), and a later write of the task (its outcome) supersedes it in order
        let mut ops = vec![Op::Task(job_id.clone(), task.clone())];
        let leased = task_to_lease(job, index);
        if job.meta.state == JobState::Queued {
            set_job_state(&mut st.tally, &mut job.meta, JobState::Running);
            // "running" is for people
            ops.push(Op::Job(job.meta.clone()));
        }
        drop(self.store.write(ops));
        job.leases.insert(index, lease_id.clone());
        st.leases.insert(
            lease_id.clone(),
            LeaseInfo {
                job_id: job_id.clone(),
                index,
                worker: worker.clone(),
                request,
                heard: false,
                leased_ms: now,
                progressed_ms: now,
                deadline_ms,
                cancel: false,
                progress: None,
                preview: None,
                group_failure_owed: false,
                exchanging: false,
                memory_bytes: memory.own,
                attempt: task_attempt,
                log: ReceivedLines::default(),
                rendered: false,
                signed_off: false,
                adopted: false,
            },
        );
        if starts_group {
            // the other free workers take the scale's other shards now, not at their next poll
            self.work.notify_waiters();
        }
        self.changed(&job_id);
        Ok(Some(Lease {
            lease_id,
            task: leased,
            deadline_ms,
        }))
    }

    /// The lease still held that was handed out for `worker`'s request `request` (by the worker's name,
    /// whichever registration asked), when the worker asks again because the answer was lost: handed to
    /// this registration as it was (its task, its checkpoint to resume from, its deadline: the worker's
    /// first heartbeat renews it, and asking again keeps no lease alive). Not one past its deadline (the
    /// coordinator's loop expires it), one whose worker sent a heartbeat for it (it has it), nor one being
    /// cancelled (it lapses, its job ended). `None` for request 0.
    fn lease_again(&self, worker: &WorkerId, request: u64) -> Option<Lease> {
        if request == 0 {
            return None;
        }
        let mut st = self.state.lock().unwrap();
        let st = &mut *st;
        let (name, now) = (worker.by_name(), now_ms());
        let (lease_id, lease) = st.leases.iter_mut().find(|(_, l)| {
            l.request == request
                && !l.heard
                && !l.cancel
                && l.deadline_ms > now
                && l.worker.by_name() == name
        })?;
        let job = st.jobs.get_mut(&lease.job_id)?;
        let task = job.tasks.get_mut(lease.index as usize)?;
        lease.worker = worker.clone();
        task.worker = worker.clone();
        tracing::warn!(
            lease_id = lease_id.as_str(),
            job_id = lease.job_id.as_str(),
            worker_id = worker.as_str(),
            "lease handed again: its worker did not have the answer"
        );
        Some(Lease {
            lease_id: lease_id.clone(),
            task: task_to_lease(job, lease.index),
            deadline_ms: lease.deadline_ms,
        })
    }

    /// Waits up to `wait` for a task for `worker`, whose tags are `tags` and device memory `memory`
    /// ([`Scheduler::lease_as`]). Never waits for the store (it runs
    /// on an async thread): leases past their deadline are expired by the coordinator's loop, which wakes
    /// the waiters.
    ///
    /// `request` is the worker's number for the request (pb::LeaseTaskRequest::request_id; 0: none): a
    /// lease handed out for it whose answer was lost is handed again.
    pub async fn lease_wait(
        &self,
        worker: &WorkerId,
        tags: &[String],
        memory: DeviceMemory,
        wait: Duration,
        request: u64,
    ) -> Result<Option<Lease>, SchedulerError> {
        let deadline = tokio::time::Instant::now() + wait;
        // a request sent again: the lease handed out for it, looked for once (not at every poll: the
        // leases are scanned under the state's lock)
        if let Some(lease) = self.lease_again(worker, request) {
            return Ok(Some(lease));
        }
        let _idle = self.idle(worker, tags);
        loop {
            let notified = self.work.notified();
            if let Some(lease) = self.lease_ready(worker, tags, memory, request)? {
                return Ok(Some(lease));
            }
            // a backoff or a lease expiry can make work ready without a notification: poll at least every 250 ms
            let next = (tokio::time::Instant::now() + Duration::from_millis(250)).min(deadline);
            if tokio::time::timeout_at(next, notified).await.is_err()
                && tokio::time::Instant::now() >= deadline
            {
                return Ok(None);
            }
        }
    }

    /// Notes that `worker` rendered the task of its lease `lease_id` and is sending its result while it
    /// asks for another (pb::LeaseTaskRequest::reporting_lease_id): the task no longer counts against its
    /// job's `max_workers` nor its tenant's share, and its progress may stand still for as long as a report
    /// may take ([`Scheduler::expire`]). A lease of another worker (by name), or one that ended, is left as
    /// it is.
    pub fn sending_result(&self, worker: &WorkerId, lease_id: &LeaseId) {
        let mut st = self.state.lock().unwrap();
        let Some(lease) = st.leases.get_mut(lease_id) else {
            return;
        };
        if lease.worker.by_name() != worker.by_name() || lease.rendered {
            return;
        }
        lease.rendered = true;
        drop(st);
        // a task of its job may start now (its max_workers), on another worker too
        self.work.notify_waiters();
    }

    /// Drains the workers named `names` (names: every registration of each), or undrains them when
    /// `drain` is false (OpenCue's locked hosts, Flamenco's sleeping workers): a drained worker
    /// is handed no task, nor counted free for an exact-mode scale's shards; the tasks it runs finish. Kept
    /// in the store, so that a coordinator that restarts, or a standby that takes over, has the same
    /// drained. Returns the names whose state changed, once that is durable.
    pub fn drain(&self, names: &[WorkerId], drain: bool) -> Result<Vec<WorkerId>, SchedulerError> {
        self.writable()?;
        let mut st = self.state.lock().unwrap();
        let new: Vec<&WorkerId> = names
            .iter()
            .filter(|&n| drain != st.drained.contains(n))
            .collect();
        let after = st.drained.len() + new.len();
        if drain && after > MAX_DRAINED {
            return Err(SchedulerError::Limit(format!(
                "workers: {after} would be drained, the most is {MAX_DRAINED} (undrain some)"
            )));
        }
        let set = Arc::make_mut(&mut st.drained);
        let changed: Vec<WorkerId> = new
            .into_iter()
            .filter(|&name| match drain {
                true => set.insert(name.clone()),
                false => set.remove(name),
            })
            .cloned()
            .collect();
        if changed.is_empty() {
            return Ok(changed);
        }
        // the whole set, each write replacing the one before: the store ends as the last write, which
        // is queued in the order of the changes here. As for a job's changes, one whose write fails is
        // kept here (the store may hold the write back and apply it later; the next one stores it)
        let durable = self
            .store
            .write(vec![Op::Drained(st.drained.as_ref().clone())]);
        drop(st);
        store::wait(durable)?;
        if !drain {
            // its long-poll asks again at once rather than at its next 250-ms look
            self.work.notify_waiters();
        }
        Ok(changed)
    }

    /// A new worker id for a registration of the worker named `name`: `name#n`, `n` one more than the
    /// last registration's. The number is kept in the store, so that a coordinator that restarts, or a
    /// standby that takes over, hands out none that a worker still calling with the id it had may hold.
    /// Returns once the number is durable (the store's error while it holds writes back).
    pub fn register(&self, name: &str) -> Result<WorkerId, SchedulerError> {
        self.writable()?;
        let mut st = self.state.lock().unwrap();
        // a stored counter at u64's largest (a store edited by hand) is refused, not wrapped to ids in use
        let n = st.registrations.checked_add(1).ok_or_else(|| {
            StoreError::new("worker registrations: the stored counter is at its largest; reset it")
        })?;
        st.registrations = n;
        // queued under the lock, in the numbers' order: the store ends with the largest
        let durable = self.store.write(vec![Op::Registrations(n)]);
        drop(st);
        store::wait(durable)?;
        Ok(WorkerId::new(format!("{name}#{n}")))
    }

    /// The names of the workers drained ([`Scheduler::drain`]); a snapshot, shared until they change.
    pub fn drained(&self) -> Arc<BTreeSet<WorkerId>> {
        self.state.lock().unwrap().drained.clone()
    }

    /// Counts `worker`, whose tags are `tags`, as free until the guard is dropped: it is asking for a task
    /// ([`Scheduler::lease_wait`] holds one while it waits). The shards of an exact-mode scale start only
    /// when as many workers that may take them are free at once (the one asking included); until then
    /// the free ones wait for the others instead of taking a task queued behind the shards.
    pub fn idle(&self, worker: &WorkerId, tags: &[String]) -> Idle<'_> {
        let name = worker.by_name();
        let mut st = self.state.lock().unwrap();
        let entry = st.idle.entry(name.clone()).or_default();
        entry.0 = tags.to_vec();
        entry.1 += 1;
        Idle {
            scheduler: self,
            name,
        }
    }

    /// Extends a lease and records its progress and its worker's preview, each when given (the latest
    /// kept), for the lease's worker (`worker`, by name). An unknown or expired lease, or another
    /// worker's, answers `cancel`.
    pub fn heartbeat(
        &self,
        lease_id: &LeaseId,
        worker: &WorkerId,
        progress: Option<TaskProgress>,
        preview: Option<bytes::Bytes>,
    ) -> Result<HeartbeatReply, SchedulerError> {
        // what the task looks like comes from the worker that renders it (by name: a worker that
        // registered again is the same one), not from another that knows the lease's id
        let own = |lease: &LeaseInfo| lease.worker.by_name() == worker.by_name();
        // its progress before the expiry, so that a task that moved in this beat is not taken back as
        // stalled ([`SchedulerConfig::task_stall`])
        if let Some(p) = progress {
            let mut st = self.state.lock().unwrap();
            if let Some(lease) = st.leases.get_mut(lease_id).filter(|l| own(l)) {
                let at = |p: &TaskProgress| (p.scale, p.iteration);
                if lease.progress.as_ref().map(at) != Some(at(&p)) {
                    lease.progressed_ms = now_ms();
                }
                lease.progress = Some(p);
            }
        }
        self.expire()?;
        let mut st = self.state.lock().unwrap();
        // another worker's lease (it knows the id): not kept alive by it, and that worker stops
        let Some(lease) = st.leases.get_mut(lease_id).filter(|l| own(l)) else {
            return Ok(HeartbeatReply {
                cancel: true,
                deadline_ms: 0,
            });
        };
        lease.deadline_ms = now_ms() + self.config.lease.as_millis() as i64;
        lease.heard = true;
        if let Some(png) = preview {
            let at_ms = now_ms();
            lease.preview = Some(Preview { png, at_ms });
        }
        let reply = HeartbeatReply {
            cancel: lease.cancel,
            deadline_ms: lease.deadline_ms,
        };
        let job_id = lease.job_id.clone();
        drop(st);
        self.changed(&job_id);
        Ok(reply)
    }

    /// The task under a live lease that is not being cancelled, and whether its job is tiled; `None` when
    /// the lease expired, never existed or is being cancelled.
    pub fn leased_task(&self, lease_id: &LeaseId) -> Option<(TaskSpec, bool)> {
        let st = self.state.lock().unwrap();
        let lease = st.leases.get(lease_id).filter(|l| !l.cancel)?;
        let job = st.jobs.get(&lease.job_id)?;
        let task = job.tasks.get(lease.index as usize)?;
        Some((task.spec.clone(), job.meta.spec.kind.tiling().is_some()))
    }

    /// The job, task index and task under a live lease that is not being cancelled; `None` otherwise.
    pub fn leased(&self, lease_id: &LeaseId) -> Option<(JobId, u32, TaskSpec)> {
        let st = self.state.lock().unwrap();
        let lease = st.leases.get(lease_id).filter(|l| !l.cancel)?;
        let task = st
            .jobs
            .get(&lease.job_id)?
            .tasks
            .get(lease.index as usize)?;
        Some((lease.job_id.clone(), lease.index, task.spec.clone()))
    }

    /// The task under a live lease that is not being cancelled, when it is checkpointed
    /// ([`JobSpec::checkpoints`]); `None` otherwise.
    pub fn checkpointed_task(&self, lease_id: &LeaseId) -> Option<TaskSpec> {
        let st = self.state.lock().unwrap();
        let lease = st.leases.get(lease_id).filter(|l| !l.cancel)?;
        let job = st.jobs.get(&lease.job_id)?;
        let task = job.tasks.get(lease.index as usize)?;
        (!checkpoints(&job.meta.spec, &task.spec).is_never()).then(|| task.spec.clone())
    }

    /// Records the checkpoint of the task under a live lease ([`JobSpec::checkpoints`]), replacing
    /// the one before, once durable: the task's next attempt starts from it. Discarded (nothing recorded)
    /// when the lease is no longer live or being cancelled, or its task is not checkpointed (a job
    /// without checkpoints, a shard of an exact-mode scale).
    pub fn save_checkpoint(
        &self,
        lease_id: &LeaseId,
        checkpoint: Checkpoint,
    ) -> Result<CheckpointSaved, SchedulerError> {
        self.writable()?;
        let mut st = self.state.lock().unwrap();
        let Some(lease) = st.leases.get(lease_id).filter(|l| !l.cancel) else {
            return Ok(CheckpointSaved::Discarded);
        };
        let (job_id, index) = (lease.job_id.clone(), lease.index);
        let Some(job) = st.jobs.get_mut(&job_id) else {
            return Ok(CheckpointSaved::Discarded);
        };
        let task = &mut job.tasks[index as usize];
        if checkpoints(&job.meta.spec, &task.spec).is_never() {
            return Ok(CheckpointSaved::Discarded);
        }
        let replaced = task.checkpoint.replace(checkpoint);
        // running, under its lease: a coordinator that starts again takes the lease up (and gives the
        // attempt back when its worker is not heard from)
        let stored = task.clone();
        st.checkpointed.insert(job_id.clone());
        let durable = self.store.write(vec![Op::Task(job_id.clone(), stored)]);
        drop(st);
        store::wait(durable)?;
        self.changed(&job_id);
        Ok(CheckpointSaved::Kept { replaced })
    }

    /// Whether a task holds the checkpoint file `hash` as its checkpoint ([`Scheduler::save_checkpoint`]):
    /// the only way a job refers to a checkpoint's blob, as none of its images (uploads, results, stitched
    /// scales) is a checkpoint file: each is decoded as an image when it is received or made, and a
    /// checkpoint file (a safetensors header) decodes as none. Looks only at the jobs that have saved one
    /// (`State::checkpointed`), not at every task of the farm: a checkpoint is dropped (each one a newer
    /// one replaces) as often as they are saved, every few seconds a worker on GPUs.
    pub fn holds_checkpoint(&self, hash: &ImageHash) -> bool {
        let st = self.state.lock().unwrap();
        st.checkpointed
            .iter()
            .filter_map(|id| st.jobs.get(id))
            .flat_map(|job| &job.tasks)
            .any(|t| t.checkpoint.as_ref().is_some_and(|c| c.blob == *hash))
    }

    /// Takes a live lease out of the tables; None when it expired or never existed (fencing).
    fn take_lease(st: &mut State, lease_id: &LeaseId) -> Option<LeaseInfo> {
        let lease = st.leases.remove(lease_id)?;
        if let Some(job) = st.jobs.get_mut(&lease.job_id) {
            job.leases.remove(&lease.index);
            if let Some(task) = job.tasks.get_mut(lease.index as usize) {
                task.clear_lease();
            }
        }
        Some(lease)
    }

    /// Records a result; `None` when the lease is no longer valid (the result is discarded).
    pub fn complete(
        &self,
        lease_id: &LeaseId,
        result: &ImageHash,
    ) -> Result<Option<Completed>, SchedulerError> {
        self.complete_with_log(lease_id, result, SentLines::default(), Vec::new())
    }

    /// [`Scheduler::complete`], with the last lines its worker logged for the attempt (`log`), kept only
    /// once the outcome is taken (a report sent again brings them again), and what the engine warned of
    /// while it rendered the result (`warnings`, bounded by the caller with
    /// [`stylefarm_core::task_log::warnings`] as they came, not again here under the state's lock).
    pub fn complete_with_log(
        &self,
        lease_id: &LeaseId,
        result: &ImageHash,
        log: SentLines,
        warnings: Vec<String>,
    ) -> Result<Option<Completed>, SchedulerError> {
        self.writable()?;
        let mut st = self.state.lock().unwrap();
        let Some(mut lease) = Self::take_lease(&mut st, lease_id) else {
            return Ok(None);
        };
        lease.log.add(log);
        if lease.cancel {
            self.discard_cancelled(&mut st, lease);
            return Ok(None);
        }
        self.metrics
            .task_seconds
            .observe((now_ms() - lease.leased_ms).max(0) as f64 / 1000.0);
        let state = &mut *st;
        let job = state
            .jobs
            .get_mut(&lease.job_id)
            .expect("leased job exists");
        // a shard whose sibling failed after their group's last call, and waits to run again: its result
        // cannot be stitched alone, so it runs again with it (as a shard that succeeded before the
        // failure does, fail_with_log)
        let requeued_sibling = job
            .tasks
            .get(lease.index as usize)
            .filter(|t| t.spec.shards().is_some())
            .and_then(|t| {
                shard_group(job, t)
                    .find(|o| o.index != lease.index && o.state == TaskState::Pending)
                    .map(|o| o.index)
            });
        if let Some(other) = requeued_sibling {
            log_attempt(
                &mut job.tasks[lease.index as usize],
                &mut lease,
                "succeeded, after its group failed",
            );
            let mut ops = Vec::new();
            let (tally, queue) = (&mut state.tally, &mut state.queue);
            run_again_with(tally, queue, job, lease.index, other, &mut ops);
            let durable = self.store.write(ops);
            drop(st);
            store::wait(durable)?;
            self.work.notify_waiters();
            self.changed(&lease.job_id);
            return Ok(Some(Completed {
                job_id: lease.job_id,
                all_tasks_done: false,
                stage_work: false,
                dropped_checkpoint: None,
            }));
        }
        let task = &mut job.tasks[lease.index as usize];
        set_task_state(&mut state.tally, task, TaskState::Succeeded);
        log_attempt(task, &mut lease, "succeeded");
        task.result = Some(result.clone());
        task.warnings = warnings;
        // its result is what the checkpoint was kept for
        let dropped_checkpoint = task.checkpoint.take();
        task.error.clear();
        task.permanent_error_workers.clear();
        task.struck.clear();
        let mut ops = vec![Op::Task(job.meta.id.clone(), task.clone())];
        let all_tasks_done = stage_done(job);
        let stage_work = job.meta.spec.kind.has_stage_work();
        let per_task = matches!(job.meta.spec.kind, JobKind::Video(_));
        // a job with stage work ends once it is done (finish_stage without a next stage), the others with
        // their last task; a keep-going batch with a failed (or cancelled) task fails (or is cancelled)
        // with its last (a keep-going sweep with one, once its contact sheet is made)
        let kept_going = kept_going_end(job).filter(|_| !(stage_work && all_tasks_done));
        if let Some((end, reason)) = kept_going {
            self.finish_job(state, &lease.job_id, end, &reason, &mut ops)?;
        } else if all_tasks_done && !stage_work {
            set_job_state(&mut state.tally, &mut job.meta, JobState::Succeeded);
            stamp_end(&mut job.meta, state.announce);
            ops.push(Op::Job(job.meta.clone()));
            job_ended(&mut state.unfinished, &job.meta);
            self.settle(state, &lease.job_id, &mut ops);
        }
        // a job at its limit of workers has a place again: an idle worker may take its next task now
        let limited = state
            .jobs
            .get(&lease.job_id)
            .is_some_and(|j| j.meta.spec.max_workers > 0 && !j.meta.state.is_terminal());
        let durable = self.store.write(ops);
        drop(st);
        store::wait(durable)?;
        if limited {
            self.work.notify_waiters();
        }
        self.changed(&lease.job_id);
        Ok(Some(Completed {
            job_id: lease.job_id,
            all_tasks_done,
            stage_work: stage_work && (all_tasks_done || per_task),
            dropped_checkpoint,
        }))
    }

    /// Records a failure: a retry after a backoff, or the job's failure when the task is out of attempts or
    /// its permanent error is confirmed (see [`FailureKind`]); in a keep-going batch or sweep, the task's
    /// failure alone, and the job's once none of its tasks is left to run.
    pub fn fail(
        &self,
        lease_id: &LeaseId,
        error: &str,
        kind: FailureKind,
    ) -> Result<(), SchedulerError> {
        self.fail_with_log(lease_id, error, kind, SentLines::default())
    }

    /// [`Scheduler::fail`], with the last lines its worker logged for the attempt (`log`), kept only once
    /// the failure is taken.
    pub fn fail_with_log(
        &self,
        lease_id: &LeaseId,
        error: &str,
        kind: FailureKind,
        log: SentLines,
    ) -> Result<(), SchedulerError> {
        self.writable()?;
        let mut st = self.state.lock().unwrap();
        let Some(mut lease) = Self::take_lease(&mut st, lease_id) else {
            return Ok(());
        };
        lease.log.add(log);
        let outcome = if lease.cancel {
            "cancelled".to_string()
        } else {
            format!("{}: {error}", kind.ended())
        };
        let mut ops = Vec::new();
        Self::end_attempt(&mut st, &mut lease, &outcome, &mut ops, |st, lease, ops| {
            self.fail_task(st, lease, error, kind, ops)
        })?;
        let durable = self.store.write(ops);
        drop(st);
        store::wait(durable)?;
        self.work.notify_waiters();
        self.changed(&lease.job_id);
        Ok(())
    }

    /// Ends a lease's attempt that did not succeed: logs it with `outcome` ([`log_attempt`]), then applies
    /// `fail` (the failure), and writes the task's record even where `fail` did not (a job that ended).
    fn end_attempt(
        st: &mut State,
        lease: &mut LeaseInfo,
        outcome: &str,
        ops: &mut Vec<Op>,
        fail: impl FnOnce(&mut State, &LeaseInfo, &mut Vec<Op>) -> Result<(), SchedulerError>,
    ) -> Result<(), SchedulerError> {
        if let Some(task) = st
            .jobs
            .get_mut(&lease.job_id)
            .and_then(|j| j.tasks.get_mut(lease.index as usize))
        {
            log_attempt(task, lease, outcome);
        }
        let before = ops.len();
        fail(st, lease, ops)?;
        if ops.len() == before {
            if let Some(job) = st.jobs.get(&lease.job_id) {
                let task = job.tasks[lease.index as usize].clone();
                ops.push(Op::Task(job.meta.id.clone(), task));
            }
        }
        Ok(())
    }

    /// Appends lines that a lease's worker (`worker`, by name: as [`Scheduler::heartbeat`] takes its
    /// progress) logged to the lease's attempt ([`TaskRecord::logs`] once it ends); lines for a lease no
    /// longer held, or from another worker, are dropped.
    pub fn append_log(&self, lease_id: &LeaseId, worker: &WorkerId, lines: SentLines) {
        if lines.is_empty() {
            return;
        }
        let mut st = self.state.lock().unwrap();
        if let Some(lease) = st
            .leases
            .get_mut(lease_id)
            .filter(|l| l.worker.by_name() == worker.by_name())
        {
            lease.log.add(lines);
        }
    }

    /// Ends a lease being cancelled (its job ended) whose worker reports a result anyway, which is
    /// discarded: its attempt is logged as cancelled, with `log`, and the lease no longer waits to lapse.
    /// Nothing for a lease that is not being cancelled, or no longer held.
    pub fn end_cancelled(&self, lease_id: &LeaseId, log: SentLines) {
        let mut st = self.state.lock().unwrap();
        if !st.leases.get(lease_id).is_some_and(|l| l.cancel) {
            return;
        }
        let Some(mut lease) = Self::take_lease(&mut st, lease_id) else {
            return;
        };
        lease.log.add(log);
        let job_id = lease.job_id.clone();
        self.discard_cancelled(&mut st, lease);
        drop(st);
        self.changed(&job_id);
    }

    /// Logs the attempt of `lease`, taken out of the tables while being cancelled, as ended with its
    /// result discarded; the task's record is written, not waited for (its job has ended).
    fn discard_cancelled(&self, st: &mut State, mut lease: LeaseInfo) {
        if let Some(job) = st.jobs.get_mut(&lease.job_id) {
            let task = &mut job.tasks[lease.index as usize];
            log_attempt(task, &mut lease, "cancelled: its result discarded");
            drop(
                self.store
                    .write(vec![Op::Task(job.meta.id.clone(), task.clone())]),
            );
        }
    }

    /// The logs of task `index` of job `job_id`: its last ended attempts' ([`TaskRecord::logs`]), oldest
    /// first, then the running one's, if any (`ended_ms` 0, no outcome).
    pub fn task_log(&self, job_id: &JobId, index: u32) -> Result<Vec<AttemptLog>, SchedulerError> {
        let st = self.state.lock().unwrap();
        let job = st
            .jobs
            .get(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        let Some(task) = job.tasks.get(index as usize) else {
            return Err(stylefarm_core::Error::invalid(
                "index",
                format!("{index}: job {job_id} has {} tasks", job.tasks.len()),
            )
            .into());
        };
        let mut logs = task.logs.as_ref().clone();
        let running = job.leases.get(&index).and_then(|id| st.leases.get(id));
        logs.extend(running.map(|lease| AttemptLog {
            attempt: lease.attempt,
            worker: lease.worker.clone(),
            started_ms: lease.leased_ms,
            ended_ms: 0,
            outcome: String::new(),
            log: lease.log.lines.clone(),
        }));
        Ok(logs)
    }

    /// Applies a failure to the state; the writes it needs go to `ops`.
    fn fail_task(
        &self,
        st: &mut State,
        lease: &LeaseInfo,
        error: &str,
        kind: FailureKind,
        ops: &mut Vec<Op>,
    ) -> Result<(), SchedulerError> {
        let job = st.jobs.get_mut(&lease.job_id).expect("leased job exists");
        if job.meta.state.is_terminal() {
            return Ok(());
        }
        let max = if job.meta.spec.max_attempts > 0 {
            job.meta.spec.max_attempts
        } else {
            self.config.default_max_attempts
        };
        if kind == FailureKind::Group && lease.group_failure_owed {
            let task = &mut job.tasks[lease.index as usize];
            task.attempts = task.attempts.saturating_sub(1);
        } else if let Some(task) = job
            .tasks
            .get(lease.index as usize)
            .filter(|t| t.spec.shards().is_some())
        {
            // a counted failure of a shard: the others running now fail with the group, at no attempt
            let shards: Vec<u32> = shard_group(job, task)
                .filter(|t| t.index != lease.index && t.state == TaskState::Running)
                .map(|t| t.index)
                .collect();
            for index in shards {
                if let Some(other) = job.leases.get(&index).and_then(|id| st.leases.get_mut(id)) {
                    other.group_failure_owed = true;
                }
            }
        }
        let task = &mut job.tasks[lease.index as usize];
        if task.error != error {
            task.error = error.to_string();
            task.permanent_error_workers.clear();
        }
        let name = lease.worker.by_name();
        if kind == FailureKind::Permanent && !task.permanent_error_workers.contains(&name) {
            task.permanent_error_workers.push(name.clone());
        }
        if kind == FailureKind::OutOfMemory {
            if !task.out_of_memory_on.contains(&name) {
                task.out_of_memory_on.push(name);
            }
            task.out_of_memory_bytes = task.out_of_memory_bytes.max(lease.memory_bytes);
        }
        // a tile of a later scale (not a shard: its scale plans again with its workers) may be made smaller
        if kind == FailureKind::OutOfMemory
            && task.spec.scale_index() >= 1
            && task.spec.shards().is_none()
        {
            st.ran_out.push((lease.job_id.clone(), lease.index));
        }
        let confirmations = self.config.permanent_confirmations.max(1);
        let reason = if task.permanent_error_workers.len() >= confirmations {
            Some(format!(
                "task {} ({}) failed with the same non-retryable error on {} {}: {error}",
                task.index,
                task.spec.label,
                if task.permanent_error_workers.len() == 1 {
                    "worker"
                } else {
                    "workers"
                },
                task.permanent_error_workers.join(", ")
            ))
        } else if task.attempts >= max {
            // an image too large for the devices it ran on: what would fit, said (not for a tiled job,
            // whose scales are planned again in smaller tiles)
            let hint =
                match kind == FailureKind::OutOfMemory && job.meta.spec.kind.tiling().is_none() {
                    true => OUT_OF_MEMORY_HINT,
                    false => "",
                };
            Some(format!(
                "task {} ({}) failed after {} attempt(s): {error}{hint}",
                task.index, task.spec.label, task.attempts
            ))
        } else {
            None
        };
        let keep_going = job.meta.spec.keep_going;
        if kind == FailureKind::Retryable && reason.is_some() && keep_going {
            // a keep-going task that failed everywhere was its own fault, not its workers': the strikes
            // it caused are taken back (else a bad photo or two would blocklist a small farm, and the job
            // fail for want of a worker)
            take_back_strikes(&mut job.meta, task);
        } else if kind == FailureKind::Retryable {
            let name = lease.worker.by_name();
            let strikes = job.meta.strikes.entry(name.clone()).or_default();
            *strikes += 1;
            if *strikes == self.config.blocklist_after {
                self.metrics.blocklisted.inc();
                st.blocklisting.insert(lease.job_id.clone());
            }
            if keep_going {
                task.struck.push(name);
            }
        }
        if let Some(reason) = reason {
            set_task_state(&mut st.tally, task, TaskState::Failed);
            ops.push(Op::Task(job.meta.id.clone(), task.clone()));
            let job_id = job.meta.id.clone();
            if keep_going {
                self.go_on_keeping_going(st, &job_id, ops)?;
            } else {
                self.finish_job(st, &job_id, JobState::Failed, &reason, ops)?;
            }
        } else {
            let backoff = self
                .config
                .backoff
                .saturating_mul(1 << (task.attempts.saturating_sub(1)).min(16));
            set_task_state(&mut st.tally, task, TaskState::Pending);
            task.not_before_ms = now_ms() + backoff.min(self.config.max_backoff).as_millis() as i64;
            self.metrics.retry(match kind {
                FailureKind::Retryable => "retryable",
                FailureKind::Permanent => "permanent",
                FailureKind::OutOfMemory => "out_of_memory",
                FailureKind::Group => "group",
            });
            ops.push(Op::Task(job.meta.id.clone(), task.clone()));
            let scale = task.spec.scale_index();
            if task.spec.shards().is_some() {
                // the shards of a scale run together: one that succeeded cannot be stepped alone once
                // another has to run again, so it runs again with it
                let succeeded: Vec<u32> = (job.tasks.iter())
                    .filter(|t| {
                        t.state == TaskState::Succeeded
                            && t.spec.shards().is_some()
                            && t.spec.scale_index() == scale
                    })
                    .map(|t| t.index)
                    .collect();
                for other in succeeded {
                    let (tally, queue) = (&mut st.tally, &mut st.queue);
                    run_again_with(tally, queue, job, other, lease.index, ops);
                }
            }
            ops.push(Op::Job(job.meta.clone()));
            st.queue.insert(&job.meta, lease.index);
        }
        Ok(())
    }

    /// Ends a job ([`end_job`]) and settles the jobs waiting for it ([`Scheduler::settle`]). The writes it
    /// needs go to `ops`. A job that has ended keeps its state (and nothing is written: it may be being
    /// deleted, [`Scheduler::forget`]).
    fn finish_job(
        &self,
        st: &mut State,
        job_id: &JobId,
        state: JobState,
        error: &str,
        ops: &mut Vec<Op>,
    ) -> Result<(), SchedulerError> {
        if end_job(st, job_id, state, error, ops)? {
            self.settle(st, job_id, ops);
        }
        Ok(())
    }

    /// [`settle_dependents`] of `ended`, a job that just ended, announcing the jobs it changed and waking the
    /// workers when one of them may start. The announcements go out before the caller's writes are
    /// durable: a watcher may see a job's new state a moment early, as a status read then would.
    fn settle(&self, st: &mut State, ended: &JobId, ops: &mut Vec<Op>) {
        let settled = settle_dependents(st, ended, ops);
        for id in &settled.changed {
            self.changed(id);
        }
        if settled.released {
            self.work.notify_waiters();
        }
    }

    /// Where keep-going job `job_id` ([`JobSpec::keep_going`]) goes once a task of it failed for good: a
    /// batch ends only once none of its tasks is left to run, failing naming the failed ones; a sweep then
    /// has its contact sheet made first, of the variants that rendered (due for the coordinator's step,
    /// [`Scheduler::take_stage_due`], which ends it); until then the task fails alone and the job goes on.
    fn go_on_keeping_going(
        &self,
        st: &mut State,
        job_id: &JobId,
        ops: &mut Vec<Op>,
    ) -> Result<KeptGoing, SchedulerError> {
        let job = st
            .jobs
            .get(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        if job.meta.spec.kind.has_stage_work() && stage_done(job) {
            ops.push(Op::Job(job.meta.clone()));
            st.stage_due.push(job_id.clone());
            return Ok(KeptGoing::SheetDue);
        }
        match kept_going_end(job) {
            Some((state, reason)) => {
                self.finish_job(st, job_id, state, &reason, ops)?;
                Ok(KeptGoing::Ended)
            }
            None => {
                ops.push(Op::Job(job.meta.clone()));
                Ok(KeptGoing::GoesOn)
            }
        }
    }

    /// Fails the queued tasks of keep-going job `job_id` with `error` ([`JobSpec::keep_going`]), none being
    /// left to run them, and ends the job as [`Scheduler::fail`] does when its last task fails
    /// ([`Scheduler::go_on_keeping_going`]).
    fn fail_queued_tasks(
        &self,
        st: &mut State,
        job_id: &JobId,
        error: &str,
        ops: &mut Vec<Op>,
    ) -> Result<KeptGoing, SchedulerError> {
        let job = st
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        for task in job
            .tasks
            .iter_mut()
            .filter(|t| t.state == TaskState::Pending)
        {
            set_task_state(&mut st.tally, task, TaskState::Failed);
            task.error = error.to_string();
            st.queue.remove(&job.meta, task.index);
            ops.push(Op::Task(job_id.clone(), task.clone()));
        }
        self.go_on_keeping_going(st, job_id, ops)
    }

    /// Fails a job for a reason outside its tasks (e.g. its contact sheet could not be made); a job that
    /// has ended keeps its state.
    pub fn fail_job(&self, job_id: &JobId, error: &str) -> Result<(), SchedulerError> {
        self.writable()?;
        let mut st = self.state.lock().unwrap();
        let mut ops = Vec::new();
        self.finish_job(&mut st, job_id, JobState::Failed, error, &mut ops)?;
        if ops.is_empty() {
            return Ok(());
        }
        let durable = self.store.write(ops);
        drop(st);
        store::wait(durable)?;
        self.changed(job_id);
        Ok(())
    }

    /// Fails the unfinished jobs that no live worker may take any more, once they have been so for
    /// [`SchedulerConfig::no_worker_left`]: tasks queued, none running, and every worker of `live` (those
    /// heard from lately, with their tags) that the job may run on ([`JobSpec::runs_on`]) blocklisted for
    /// it. Such a job would otherwise wait forever, e.g. `stylefarm local --workers 1` after three failures
    /// on different tasks (Flamenco fails a job with no worker left to run it). With no live worker at all,
    /// or none that the job may run on, it waits: workers may come (a cluster scaling up from zero). A
    /// keep-going job fails its queued tasks instead, and ends as when its last task fails: a sweep that
    /// rendered a variant is due for its contact sheet, not failed yet.
    /// Called every 250 ms by the coordinator; returns the jobs failed.
    pub fn fail_stranded(
        &self,
        live: &[(WorkerId, Vec<String>)],
    ) -> Result<Vec<JobId>, SchedulerError> {
        let behind = self.store.behind().is_some();
        {
            // nothing to look at (the common case, every 250 ms): no scan, no writability check
            let mut st = self.state.lock().unwrap();
            if st.blocklisting.is_empty() || live.is_empty() || behind {
                st.stranded_since.clear();
                return Ok(Vec::new());
            }
        }
        self.writable()?;
        let now = now_ms();
        let grace = i64::try_from(self.config.no_worker_left.as_millis()).unwrap_or(i64::MAX);
        let mut st = self.state.lock().unwrap();
        let (mut failed, mut ops, mut stranded) = (Vec::new(), Vec::new(), HashMap::new());
        let mut sheet_due = Vec::new();
        for job_id in st.blocklisting.clone() {
            let Some(job) = st.jobs.get(&job_id).filter(|j| !j.meta.state.is_terminal()) else {
                st.blocklisting.remove(&job_id);
                continue;
            };
            if job.meta.paused || !job.meta.waiting_on.is_empty() {
                // it waits for its client, or for other jobs, not for a worker
                continue;
            }
            let blocked = |w: &WorkerId| blocklisted(&job.meta, w, self.config.blocklist_after);
            let eligible = eligible(&job.meta.spec, live);
            let queued = job.tasks.iter().find(|t| t.state == TaskState::Pending);
            let no_worker_left = job.leases.is_empty()
                && !eligible.is_empty()
                && eligible.iter().all(|w| blocked(w));
            let Some(task) = queued.filter(|_| no_worker_left) else {
                continue;
            };
            let since = st.stranded_since.get(&job_id).copied().unwrap_or(now);
            if now - since < grace {
                stranded.insert(job_id, since);
                continue;
            }
            let mut names: Vec<&str> = eligible.iter().take(5).map(|w| w.as_str()).collect();
            if eligible.len() > names.len() {
                names.push("...");
            }
            let why = format!(
                "no worker left to run it: every live worker ({}: {}) is blocklisted for this job ({} \
                 failures on it), for {} s now",
                eligible.len(),
                names.join(", "),
                self.config.blocklist_after,
                (now - since) / 1000,
            );
            if job.meta.spec.keep_going {
                st.blocklisting.remove(&job_id);
                // a keep-going job fails its queued tasks alone and ends as when its last task failed
                // (a sweep has its contact sheet made of the variants that rendered)
                match self.fail_queued_tasks(&mut st, &job_id, &why, &mut ops)? {
                    KeptGoing::Ended => failed.push(job_id),
                    KeptGoing::SheetDue => sheet_due.push(job_id),
                    // none running (no lease) and none queued now: not reached
                    KeptGoing::GoesOn => {}
                }
                continue;
            }
            let reason = format!(
                "{why}; task {} ({}) last failed with: {}",
                task.index,
                task.spec.label,
                if task.error.is_empty() {
                    "no error recorded"
                } else {
                    &task.error
                },
            );
            self.finish_job(&mut st, &job_id, JobState::Failed, &reason, &mut ops)?;
            st.blocklisting.remove(&job_id);
            failed.push(job_id);
        }
        // a job that a worker may take again starts its wait over when next stranded
        st.stranded_since = stranded;
        if ops.is_empty() {
            return Ok(failed);
        }
        let durable = self.store.write(ops);
        drop(st);
        store::wait(durable)?;
        for job_id in &failed {
            tracing::warn!(
                job_id = job_id.as_str(),
                "job failed: every live worker is blocklisted"
            );
            self.changed(job_id);
        }
        for job_id in &sheet_due {
            tracing::warn!(
                job_id = job_id.as_str(),
                "variants failed: every live worker is blocklisted; the contact sheet is made of the rest"
            );
            self.changed(job_id);
        }
        Ok(failed)
    }

    /// Sweeps, tiled and video jobs whose every task succeeded (or was replaced), waiting for the
    /// coordinator's step (a contact sheet, a stitch, the next frames or the video's end), e.g. after a
    /// restart.
    pub fn jobs_awaiting_step(&self) -> Vec<JobId> {
        let st = self.state.lock().unwrap();
        st.jobs
            .values()
            .filter(|j| awaits_step(j))
            .map(|j| j.meta.id.clone())
            .collect()
    }

    /// Whether job `job_id` is one of [`Scheduler::jobs_awaiting_step`].
    pub fn awaits_step(&self, job_id: &JobId) -> bool {
        let st = self.state.lock().unwrap();
        st.jobs.get(job_id).is_some_and(awaits_step)
    }

    /// The unfinished jobs whose current scale is cut into shards ([`ScalePart::Shard`]) not all
    /// succeeded yet, as (the job's record, scale, number of shards): those the coordinator plans again
    /// when fewer workers are left than the shards ([`Scheduler::replan`]).
    ///
    /// [`ScalePart::Shard`]: stylefarm_core::job::ScalePart::Shard
    pub fn sharded_scales(&self) -> Vec<(JobMeta, u32, u32)> {
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let mut found = Vec::new();
        let jobs = &st.jobs;
        st.sharded.retain(|id| {
            let Some(job) = jobs.get(id).filter(|j| !j.meta.state.is_terminal()) else {
                return false;
            };
            // the current scale's tasks are the last ones
            let Some((scale, shards)) = job
                .tasks
                .last()
                .and_then(|t| Some((t.spec.scale_index(), t.spec.shards()?)))
            else {
                return false;
            };
            let running = job.tasks.iter().any(|t| {
                t.spec.scale_index() == scale
                    && t.spec.shards() == Some(shards)
                    && matches!(t.state, TaskState::Pending | TaskState::Running)
            });
            if running {
                found.push((job.meta.clone(), scale, shards));
            }
            true
        });
        found
    }

    /// Plans scale `scale` of job `job_id` again: its `shards` shards are replaced by `tasks`, fewer of
    /// them (the scale planned for the workers left). The shards are cancelled with `reason` as their
    /// error, succeeded ones included (a scale's shards run together); a running shard's lease ends (its
    /// worker's next heartbeat tells it to stop, and its outcome is discarded). Returns false, changing
    /// nothing, when the job is not at that point (it ended, moved past the scale, or its shards were
    /// replaced already) or `tasks` are none, not fewer than the shards, or not of that scale.
    pub fn replan(
        &self,
        job_id: &JobId,
        scale: u32,
        shards: u32,
        tasks: Vec<TaskSpec>,
        reason: &str,
    ) -> Result<bool, SchedulerError> {
        self.writable()?;
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let Some(job) = st.jobs.get_mut(job_id) else {
            return Ok(false);
        };
        let current: Vec<u32> = job
            .tasks
            .iter()
            .filter(|t| {
                t.spec.scale_index() == scale
                    && t.spec.shards() == Some(shards)
                    && t.state != TaskState::Cancelled
            })
            .map(|t| t.index)
            .collect();
        if job.meta.state.is_terminal()
            || job.meta.stage_results.len() as u32 != scale
            || current.len() as u32 != shards
            || current
                .iter()
                .all(|&i| job.tasks[i as usize].state == TaskState::Succeeded)
            || tasks.is_empty()
            || tasks.len() >= shards as usize
            || tasks.iter().any(|t| t.scale_index() != scale)
        {
            return Ok(false);
        }
        let ops = replace_tasks(st, job_id, &current, tasks, reason);
        let durable = self.store.write(ops);
        drop(guard);
        store::wait(durable)?;
        self.work.notify_waiters();
        self.changed(job_id);
        Ok(true)
    }

    /// The tiles of tiled jobs' later scales that ran out of a device's memory since the last call, each
    /// with its job's record, while its job is still at that scale and the task still to do (queued again
    /// or running: not replaced, not succeeded elsewhere since): what the coordinator may plan again in
    /// smaller tiles ([`Scheduler::replan_smaller`]). Taken only while the store takes writes (else left
    /// for a later call).
    pub fn take_ran_out(&self) -> Vec<(JobMeta, TaskRecord)> {
        if self.store_behind() {
            return Vec::new();
        }
        let mut st = self.state.lock().unwrap();
        let ran_out = std::mem::take(&mut st.ran_out);
        ran_out
            .into_iter()
            .filter_map(|(job_id, index)| {
                let job = st.jobs.get(&job_id)?;
                let task = job.tasks.get(index as usize)?;
                let at_its_scale = job.meta.stage_results.len() as u32 == task.spec.scale_index();
                // a task that succeeded since (on another worker) leaves its scale as planned
                (!job.meta.state.is_terminal() && at_its_scale && to_do(task))
                    .then(|| (job.meta.clone(), task.clone()))
            })
            .collect()
    }

    /// Plans scale `scale` of tiled job `job_id` again in smaller tiles, since its task `ran_out` ran out
    /// of a device's memory: every task of the scale (succeeded ones included: the grid changes) is
    /// cancelled with `reason` as its error and replaced by `tasks`, planned with tiles of at most
    /// `max_tile_size` px, which the job keeps for its later scales ([`JobMeta::max_tile_size`]). A
    /// running task's lease ends (its worker's next heartbeat tells it to stop; its outcome is
    /// discarded). Returns false, changing nothing, when the job is not at that point any more (it
    /// ended, moved past the scale, or `ran_out` was replaced or succeeded since) or `tasks` are none or
    /// not of that scale.
    pub fn replan_smaller(
        &self,
        job_id: &JobId,
        scale: u32,
        ran_out: u32,
        tasks: Vec<TaskSpec>,
        max_tile_size: u32,
        reason: &str,
    ) -> Result<bool, SchedulerError> {
        self.writable()?;
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let Some(job) = st.jobs.get_mut(job_id) else {
            return Ok(false);
        };
        let current: Vec<u32> = job
            .tasks
            .iter()
            .filter(|t| t.spec.scale_index() == scale && t.state != TaskState::Cancelled)
            .map(|t| t.index)
            .collect();
        if job.meta.state.is_terminal()
            || job.meta.stage_results.len() as u32 != scale
            || !current.contains(&ran_out)
            || !to_do(&job.tasks[ran_out as usize])
            || tasks.is_empty()
            || tasks.iter().any(|t| t.scale_index() != scale)
        {
            return Ok(false);
        }
        job.meta.max_tile_size = Some(max_tile_size);
        let mut ops = vec![Op::Job(job.meta.clone())];
        // an exact-mode canvas planned again may be shards now (more workers than when it was planned)
        if tasks.iter().any(|t| t.shards().is_some()) {
            st.sharded.insert(job_id.clone());
        }
        ops.extend(replace_tasks(st, job_id, &current, tasks, reason));
        let durable = self.store.write(ops);
        drop(guard);
        store::wait(durable)?;
        self.work.notify_waiters();
        self.changed(job_id);
        Ok(true)
    }

    /// Hands back a tile that ran out of memory ([`Scheduler::take_ran_out`]) that the coordinator could
    /// not plan again now (no worker to plan for, a store out of reach): the next call takes it again.
    pub fn hand_back_ran_out(&self, job_id: &JobId, index: u32) {
        self.state
            .lock()
            .unwrap()
            .ran_out
            .push((job_id.clone(), index));
    }

    /// The jobs whose stage was left done by a task's failure since the last call (a keep-going sweep whose
    /// last variant to end failed): the coordinator runs their step (its contact sheet).
    pub fn take_stage_due(&self) -> Vec<JobId> {
        std::mem::take(&mut self.state.lock().unwrap().stage_due)
    }

    /// The workers whose lease expired since the last call, with the moment each lease ran out: lost, as
    /// far as the scheduler can tell, unless they called after that moment.
    pub fn take_lost(&self) -> Vec<(WorkerId, std::time::Instant)> {
        std::mem::take(&mut self.state.lock().unwrap().lost)
    }

    /// Whether `worker` is blocklisted for the job of `meta` ([`SchedulerConfig::blocklist_after`]
    /// strikes on it): it is given none of its tasks.
    pub fn blocklists(&self, meta: &JobMeta, worker: &WorkerId) -> bool {
        blocklisted(meta, worker, self.config.blocklist_after)
    }

    /// Forgets a finished (succeeded, failed or cancelled) job: its record and its tasks', in memory and in
    /// the store; its client request id may be used again. [`SchedulerError::Precondition`] while it is
    /// queued or running, or while a task of it is still being stopped (its worker not yet told). Its
    /// images stay in the blob store (content-addressed: other jobs may share them) until a garbage
    /// collection finds them unused ([`crate::gc`]).
    pub fn delete(&self, job_id: &JobId) -> Result<(), SchedulerError> {
        self.writable()?;
        let st = self.state.lock().unwrap();
        let job = st
            .jobs
            .get(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        if !job.meta.state.is_terminal() {
            return Err(SchedulerError::Precondition(format!(
                "job {job_id} is {}: cancel it first, or wait for it to end",
                job.meta.state.name()
            )));
        }
        still_ending(&st, job)?;
        self.forget(st, std::slice::from_ref(job_id))
    }

    /// Deletes up to `limit` finished jobs that ended before `before_ms` (Unix ms) and have no task still
    /// being stopped, as [`Scheduler::delete`] does, in one write; returns their ids. Walks every job: for
    /// an occasional sweep ([`SchedulerConfig::keep_finished`]), not a call per request.
    pub fn delete_finished_before(
        &self,
        before_ms: i64,
        limit: usize,
    ) -> Result<Vec<JobId>, SchedulerError> {
        self.writable()?;
        let st = self.state.lock().unwrap();
        let old: Vec<JobId> = st
            .jobs
            .values()
            .filter(|j| j.meta.state.is_terminal() && j.meta.finished_ms < before_ms)
            .filter(|j| still_ending(&st, j).is_ok())
            .take(limit)
            .map(|j| j.meta.id.clone())
            .collect();
        if !old.is_empty() {
            self.forget(st, &old)?;
        }
        Ok(old)
    }

    /// Forgets finished jobs: from the store first and, once that is durable, from memory (their records,
    /// their tasks and the tally of both), so that memory never lacks a job the store still holds (the blob
    /// store's garbage collection keeps the images of the jobs in memory, [`Scheduler::images_in_use`]).
    /// Their request ids are freed at once. The state's lock `st` is released while the write is waited
    /// for; when it fails the jobs stay as they were. A write held back ([`StoreError::held_back`]: the
    /// store out of reach, its disk full) is still to be applied, in order: the jobs go from memory too
    /// (the collection does not run while the store is behind), and its error is answered.
    fn forget(
        &self,
        mut st: std::sync::MutexGuard<'_, State>,
        job_ids: &[JobId],
    ) -> Result<(), SchedulerError> {
        let mut freed = Vec::new();
        for job_id in job_ids {
            let Some(job) = st.jobs.get(job_id) else {
                continue;
            };
            let request = request_key(&job.meta);
            if release_request(&mut st, request.clone(), job_id) {
                freed.push((request, job_id.clone()));
            }
        }
        let durable = self
            .store
            .write(job_ids.iter().cloned().map(Op::Delete).collect());
        st.deleting.extend(job_ids.iter().cloned());
        drop(st);
        let written = store::wait(durable);
        let mut st = self.state.lock().unwrap();
        for job_id in job_ids {
            st.deleting.remove(job_id);
        }
        if let Err(e) = &written {
            if !e.held_back {
                for (request, job_id) in freed {
                    if st.jobs.contains_key(&job_id) {
                        st.by_request.entry(request).or_insert(job_id);
                    }
                }
                return Err(e.clone().into());
            }
        }
        for job_id in job_ids {
            let Some(job) = st.jobs.remove(job_id) else {
                continue;
            };
            st.checkpointed.remove(job_id);
            // a request id that a concurrent deletion of the job, failed, gave back to it
            release_request(&mut st, request_key(&job.meta), job_id);
            st.tally.remove_job(job.meta.state);
            for t in &job.tasks {
                st.tally.remove_task(t.state);
                st.queue.remove(&job.meta, t.index);
            }
        }
        drop(st);
        for job_id in job_ids {
            self.changed(job_id);
        }
        Ok(written?)
    }

    /// The images the jobs in memory refer to, by sha256: their specs', their tasks' specs and results,
    /// their stages' images. The mark of the blob store's garbage collection ([`crate::gc`]); memory holds
    /// every job the store holds ([`Scheduler::delete`] takes a job out of memory only once its deletion is
    /// durable). Walks every job and task under the scheduler's lock: for an occasional collection, not a
    /// call per request.
    pub fn images_in_use(&self) -> std::collections::HashSet<ImageHash> {
        let st = self.state.lock().unwrap();
        st.jobs.values().flat_map(job_images).cloned().collect()
    }

    /// Pauses a job (`paused`, OpenCue's and Flamenco's pause) or resumes it. A paused job's queued tasks
    /// are not leased; its running tasks go on, and its stage work (a stitch, the next scale's tiles), whose
    /// tasks wait in turn. The shards of an exact-mode scale whose siblings already run still start: they
    /// wait for one another at every step. A paused job is not failed for want of a worker
    /// ([`Scheduler::fail_stranded`]). A finished job is left as it is. Returns the job's state.
    pub fn set_paused(&self, job_id: &JobId, paused: bool) -> Result<JobState, SchedulerError> {
        self.change_unfinished(job_id, |job, _| {
            let changed = job.meta.paused != paused;
            job.meta.paused = paused;
            changed
        })
    }

    /// Changes a job's priority (OpenCue's and Flamenco's set priority): its queued tasks take their
    /// places in the queue by it (higher first, then submission order), its running ones go on. A
    /// finished job is left as it is. Returns the job's state.
    pub fn set_priority(&self, job_id: &JobId, priority: i32) -> Result<JobState, SchedulerError> {
        self.change_unfinished(job_id, |job, queue| {
            if job.meta.spec.priority == priority {
                return false;
            }
            let queued: Vec<u32> = job
                .tasks
                .iter()
                .filter(|t| queue.remove(&job.meta, t.index))
                .map(|t| t.index)
                .collect();
            job.meta.spec.priority = priority;
            for index in queued {
                queue.insert(&job.meta, index);
            }
            true
        })
    }

    /// Changes an unfinished job's record by `change` (given the job and the queue; it says whether it
    /// changed anything), writes it and wakes the calls waiting for a task. A finished job is left as it
    /// is. Returns the job's state.
    fn change_unfinished(
        &self,
        job_id: &JobId,
        change: impl FnOnce(&mut Job, &mut TaskQueue) -> bool,
    ) -> Result<JobState, SchedulerError> {
        self.writable()?;
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let job = st
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        let state = job.meta.state;
        if state.is_terminal() || !change(job, &mut st.queue) {
            return Ok(state);
        }
        let durable = self.store.write(vec![Op::Job(job.meta.clone())]);
        drop(guard);
        store::wait(durable)?;
        self.work.notify_waiters();
        self.changed(job_id);
        Ok(state)
    }

    /// Cancels a job; a finished job keeps its state.
    pub fn cancel(&self, job_id: &JobId) -> Result<JobState, SchedulerError> {
        self.writable()?;
        let mut st = self.state.lock().unwrap();
        let state = st
            .jobs
            .get(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?
            .meta
            .state;
        if state.is_terminal() {
            return Ok(state);
        }
        let mut ops = Vec::new();
        self.finish_job(&mut st, job_id, JobState::Cancelled, "cancelled", &mut ops)?;
        let durable = self.store.write(ops);
        drop(st);
        store::wait(durable)?;
        self.changed(job_id);
        Ok(JobState::Cancelled)
    }

    /// Cancels tasks `tasks` (their indices) of keep-going batch or sweep `job_id` alone
    /// ([`JobSpec::keep_going`]; OpenCue's kill of frames): each one queued or running ends cancelled (a
    /// running one's lease ends: its worker's next heartbeat tells it to stop, and its outcome is
    /// discarded), and the job goes on without them. Once none of its tasks is left to run, it ends as
    /// `kept_going_end` says: failed when a task failed, else cancelled; a sweep has its contact sheet
    /// made first, of the variants that rendered ([`Scheduler::take_stage_due`]). [`Scheduler::retry_tasks`]
    /// runs them again. Tasks that have ended are left as they are, as is a job that has ended. Returns the
    /// job's state and how many tasks were cancelled. Refused ([`SchedulerError::Invalid`], naming `tasks`)
    /// for an index the job has no task at, and ([`SchedulerError::Precondition`]) for a job that is not
    /// keep-going (its tasks end together: [`Scheduler::cancel`]).
    pub fn cancel_tasks(
        &self,
        job_id: &JobId,
        tasks: &[u32],
    ) -> Result<(JobState, usize), SchedulerError> {
        self.writable()?;
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let job = st
            .jobs
            .get(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        let named = named_tasks(job, tasks)?;
        alone_needs_keep_going(job, "are cancelled")?;
        if job.meta.state.is_terminal() {
            return Ok((job.meta.state, 0));
        }
        let (mut ops, mut cancelled) = (Vec::new(), 0);
        for index in named {
            let lease_id = st.jobs[job_id].leases.get(&index).cloned();
            let lease = lease_id.and_then(|id| Self::take_lease(st, &id));
            let job = st.jobs.get_mut(job_id).expect("looked up above");
            let task = &mut job.tasks[index as usize];
            if !to_do(task) {
                continue;
            }
            // its lease ends now, as a replaced task's does (replace_tasks): the worker's next heartbeat
            // tells it to stop and its outcome is discarded (so are the log lines it sends with it), and
            // the task may run again (retry_tasks) while it stops
            if let Some(mut lease) = lease {
                log_attempt(task, &mut lease, "cancelled: its task was cancelled alone");
            }
            st.queue.remove(&job.meta, index);
            set_task_state(&mut st.tally, task, TaskState::Cancelled);
            task.error = "cancelled".to_string();
            // the strikes its failures put on workers are taken back, as when it fails everywhere
            // (fail_task): a task cancelled for failing on a worker leaves that worker to the others
            take_back_strikes(&mut job.meta, task);
            ops.push(Op::Task(job_id.clone(), task.clone()));
            cancelled += 1;
        }
        if cancelled > 0 {
            self.go_on_keeping_going(st, job_id, &mut ops)?;
        }
        let state = st.jobs[job_id].meta.state;
        if ops.is_empty() {
            return Ok((state, 0));
        }
        let durable = self.store.write(ops);
        drop(guard);
        store::wait(durable)?;
        self.work.notify_waiters();
        self.changed(job_id);
        Ok((state, cancelled))
    }

    /// Runs a failed or cancelled job again (Flamenco's requeue, OpenCue's retry of dead frames). Its failed
    /// and cancelled tasks go back to the queue with their attempts, errors and out-of-memory marks
    /// cleared (not their checkpoints: they start from there), and the job's strikes with them (the
    /// blocklist starts over). Its succeeded tasks keep their
    /// results, except the shards of an exact-mode scale that has a shard to run again: a scale's shards
    /// run together. Tasks that a new plan replaced stay as they are ([`crate::model::replaced_tasks`]). A
    /// job whose every task of its stage had succeeded (it failed in the coordinator's own step, a stitch
    /// or a contact sheet) queues nothing and has that step run again ([`Retried::stage_work`]).
    ///
    /// A queued or running job keeps its state (returned): only a keep-going batch's or sweep's tasks that
    /// failed or were cancelled alone ([`JobSpec::keep_going`]) run again, nothing else is requeued. Refused
    /// ([`SchedulerError::Precondition`]) for a job that succeeded, one whose tasks are still being stopped
    /// or that is being deleted; and ([`SchedulerError::Limit`]) as a submission is, when its tenant has
    /// [`SchedulerConfig::max_unfinished_jobs`] unfinished jobs.
    pub fn retry(&self, job_id: &JobId) -> Result<Retried, SchedulerError> {
        self.retry_tasks(job_id, &[])
    }

    /// [`Scheduler::retry`] of tasks `tasks` (their indices) of a keep-going batch or sweep alone
    /// ([`JobSpec::keep_going`]): those of them that failed or were cancelled run again, the job's other
    /// failed and cancelled tasks stay as they are (and the job ends failed, or cancelled, again once the
    /// named ones have run). No task named: [`Scheduler::retry`]. Refused as [`Scheduler::cancel_tasks`]
    /// refuses the tasks it is given, and ([`SchedulerError::Precondition`]) when a named task has not
    /// failed nor been cancelled.
    pub fn retry_tasks(&self, job_id: &JobId, tasks: &[u32]) -> Result<Retried, SchedulerError> {
        self.writable()?;
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let job = st
            .jobs
            .get(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        let named = named_tasks(job, tasks)?;
        if !named.is_empty() {
            alone_needs_keep_going(job, "run again")?;
        }
        let refused = |why: &str| {
            Err(SchedulerError::Precondition(format!(
                "job {job_id} {why}: there is nothing to run again"
            )))
        };
        // a keep-going batch or sweep that still runs may have tasks that failed alone: those run again
        if job.meta.not_stored {
            return refused("was never stored (its submit failed: submit it again)");
        }
        let running = match job.meta.state {
            JobState::Queued | JobState::Running => true,
            JobState::Succeeded => return refused("succeeded"),
            JobState::Failed | JobState::Cancelled => false,
        };
        if running && awaits_step(job) {
            // a keep-going sweep's contact sheet is being made of the variants that rendered: a variant
            // run again now could render before the sheet is recorded, which would show it failed
            return Err(SchedulerError::Precondition(format!(
                "job {job_id}'s contact sheet is being made; retry it once it has ended"
            )));
        }
        // a job that ended waits again for those it waited for then and that have not succeeded since
        // (one that failed refuses: it runs again first); those that had succeeded may be gone
        let (waiting_on, init_image) = if running {
            (job.meta.waiting_on.clone(), None)
        } else {
            still_ending(st, job)?;
            self.room_for_a_job(st, &job.meta.tenant, job.tasks.len())?;
            let waited = job.meta.waiting_on.clone();
            unmet_dependencies(st, &job.meta.spec, waited, &job.meta.tenant)
                .map_err(|e| SchedulerError::Precondition(format!("job {job_id}: {e}")))?
        };
        let replaced = crate::model::replaced_tasks(job.tasks.iter());
        // a keep-going job's tasks may be cancelled alone while it runs (Scheduler::cancel_tasks)
        let cancelled_alone = job.meta.spec.keep_going;
        let ended = |t: &TaskRecord| {
            (t.state == TaskState::Failed
                || (t.state == TaskState::Cancelled && (!running || cancelled_alone)))
                && !replaced.contains(&t.index)
                && (named.is_empty() || named.contains(&t.index))
        };
        if let Some(t) = job
            .tasks
            .iter()
            .find(|t| named.contains(&t.index) && !ended(t))
        {
            return Err(SchedulerError::Precondition(format!(
                "task {} of job {job_id} ({}): only a failed or cancelled task runs again",
                t.index,
                t.state.name()
            )));
        }
        let sharded_scales: BTreeSet<u32> = job
            .tasks
            .iter()
            .filter(|t| ended(t) && t.spec.shards().is_some())
            .map(|t| t.spec.scale_index())
            .collect();
        let again: Vec<u32> = job
            .tasks
            .iter()
            .filter(|t| {
                ended(t)
                    || (t.state == TaskState::Succeeded
                        && t.spec.shards().is_some()
                        && sharded_scales.contains(&t.spec.scale_index()))
            })
            .map(|t| t.index)
            .collect();
        if running && again.is_empty() {
            return Ok(Retried {
                state: job.meta.state,
                requeued: 0,
                stage_work: false,
            });
        }
        let stage_work = again.is_empty() && job.meta.spec.kind.has_stage_work();
        if again.is_empty() && !stage_work {
            return refused("has no failed or cancelled task");
        }
        let job = st.jobs.get_mut(job_id).expect("looked up above");
        let mut ops = Vec::new();
        for &index in &again {
            let task = &mut job.tasks[index as usize];
            // a new task, as at submission, but for its checkpoint: it starts from there
            set_task_state(&mut st.tally, task, TaskState::Pending);
            let checkpoint = task.checkpoint.take();
            // and for its logs: why it failed before stays readable, its attempts numbered on after those
            let logs = std::mem::take(&mut task.logs);
            *task = TaskRecord {
                checkpoint,
                logs,
                earlier_attempts: task.attempt_number(),
                ..TaskRecord::pending(index, task.spec.clone())
            };
            ops.push(Op::Task(job_id.clone(), task.clone()));
            st.queue.insert(&job.meta, index);
        }
        if !sharded_scales.is_empty() {
            st.sharded.insert(job_id.clone());
        }
        if matches!(job.meta.spec.kind, JobKind::Sweep(_)) && !again.is_empty() {
            // a keep-going sweep's contact sheet is made again, with the variants that render now
            job.meta.stage_results.clear();
            job.meta.result = None;
        }
        let state = if running {
            job.meta.state
        } else if again.is_empty() {
            JobState::Running
        } else {
            JobState::Queued
        };
        if !running {
            set_job_state(&mut st.tally, &mut job.meta, state);
            job.meta.error.clear();
            job.meta.finished_ms = 0;
            job.meta.unannounced = false;
            (st.unfinished.entry(job.meta.tenant.clone()).or_default()).insert(job_id.clone());
            if let (Some(from), Some(image)) =
                (job.meta.spec.params.init.job().cloned(), init_image)
            {
                start_job_from(job, &from, &image, &mut ops);
            }
            if !waiting_on.is_empty() {
                st.waiting.insert(job_id.clone());
            }
            job.meta.waiting_on = waiting_on;
        }
        if named.is_empty() {
            // the whole job runs again: its workers start with a clean slate; tasks run again alone
            // leave the strikes that the job's other tasks put on its workers
            job.meta.strikes.clear();
        }
        // a worker still blocklisted for it: watched again, for the job not to wait forever when no
        // worker is left to run it (a job that ended was no longer watched)
        let blocklisted = (job.meta.strikes.values()).any(|&s| s >= self.config.blocklist_after);
        ops.push(Op::Job(job.meta.clone()));
        if blocklisted {
            st.blocklisting.insert(job_id.clone());
        }
        let durable = self.store.write(ops);
        drop(guard);
        store::wait(durable)?;
        self.metrics.job_retries.inc();
        self.work.notify_waiters();
        self.changed(job_id);
        Ok(Retried {
            state,
            requeued: again.len(),
            stage_work,
        })
    }

    /// Shard lease `lease_id` waits in an exchange call for its group's other shards (`waiting`), or that
    /// call ended: while it waits, its progress cannot move and it does not stall
    /// ([`SchedulerConfig::task_stall`]); the call's end counts as its progress moving (it waited for the
    /// slowest shard). A lease that ended is left as it is.
    pub fn exchanging(&self, lease_id: &LeaseId, waiting: bool) {
        let mut st = self.state.lock().unwrap();
        if let Some(lease) = st.leases.get_mut(lease_id) {
            lease.exchanging = waiting;
            lease.progressed_ms = now_ms();
        }
    }

    /// Worker `worker` signed off (it stops): the leases of it that it names, by id (`leases`: a task it
    /// left unfinished) or by the lease poll they were handed to (`request`, not 0: a poll it gave up as it
    /// stopped), lapse now rather than at their deadlines; the next [`Scheduler::expire`] returns their
    /// tasks to the queue, as for any lease that lapsed (an attempt spent, a strike against the worker).
    /// A lease named only by its poll and never heard of since (no heartbeat: the worker never saw the
    /// answer, so its task never started) goes back to the queue at once and at no cost: no attempt spent,
    /// no strike, no entry in the task's attempts (a shard's lease is the exception, given up as the others
    /// are: its group's other shards run again with it). Returns how many leases were given up. Only
    /// those named: a caller that knows a worker's id but not its lease ids cannot take its work from it.
    pub fn signed_off(&self, worker: &WorkerId, leases: &[LeaseId], request: u64) -> usize {
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let now = now_ms();
        let mut released = 0;
        let named = |id: &LeaseId, l: &LeaseInfo| {
            l.worker == *worker && (leases.contains(id) || (request != 0 && l.request == request))
        };
        let mut unseen = Vec::new();
        for (id, lease) in st.leases.iter_mut().filter(|(id, l)| named(id, l)) {
            released += 1;
            let shard = (st.jobs.get(&lease.job_id))
                .and_then(|j| j.tasks.get(lease.index as usize))
                .is_some_and(|t| t.spec.shards().is_some());
            if !lease.heard && !lease.cancel && !shard && !leases.contains(id) {
                unseen.push(id.clone());
                continue;
            }
            lease.signed_off = true;
            lease.deadline_ms = lease.deadline_ms.min(now - 1);
        }
        let (mut changed, mut ops) = (Vec::new(), Vec::new());
        for id in unseen {
            let mut lease = Self::take_lease(st, &id).expect("listed lease");
            // its lease's record superseded (not waited for, as the lease's own write)
            if !give_back(st, &mut lease, None, &mut ops) {
                continue;
            }
            tracing::info!(
                lease_id = id.as_str(),
                job_id = lease.job_id.as_str(),
                worker_id = lease.worker.as_str(),
                "lease given back unseen: its worker signed off before its poll was answered"
            );
            changed.push(lease.job_id);
        }
        if !ops.is_empty() {
            drop(self.store.write(ops));
        }
        drop(guard);
        if !changed.is_empty() {
            self.work.notify_waiters();
        }
        for job in changed {
            self.changed(&job);
        }
        released
    }

    /// Starts the lease period of the leases taken up from the store ([`Scheduler::new`]) now, as the
    /// coordinator starts serving: its start (the blob store's listing, the stage work it found due) may
    /// have taken a while, during which no worker could call.
    pub fn serving(&self) {
        let deadline_ms = now_ms() + self.config.lease.as_millis() as i64;
        for lease in self.state.lock().unwrap().leases.values_mut() {
            if lease.adopted && !lease.heard {
                lease.deadline_ms = lease.deadline_ms.max(deadline_ms);
                lease.progressed_ms = lease.progressed_ms.max(now_ms());
            }
        }
    }

    /// Lapses the leases taken up from the store whose workers have not called ([`Scheduler::new`]), as
    /// a lease period without them does: their tasks are queued again (tests: a restart whose workers died
    /// with the coordinator, without waiting a lease period).
    #[cfg(test)]
    fn lapse_adopted(&self) {
        let now = now_ms();
        for lease in self.state.lock().unwrap().leases.values_mut() {
            if lease.adopted && !lease.heard {
                lease.deadline_ms = now - 1;
            }
        }
        self.expire().unwrap();
    }

    /// Returns expired leases' tasks to the queue (a strike against their worker), and those of leases whose
    /// task made no progress for [`SchedulerConfig::task_stall`] (their worker is told to cancel).
    pub fn expire(&self) -> Result<(), SchedulerError> {
        if self.store.behind().is_some() {
            // nothing expires while the store holds writes back: the workers' heartbeats still renew
            // their leases, and the expiries' writes could not be acknowledged
            return Ok(());
        }
        let now = now_ms();
        let stall_ms = self.config.task_stall.map(|d| d.as_millis() as i64);
        let mut st = self.state.lock().unwrap();
        // a render that ended: its result is on its way, for as long as a worker tries to send it
        let report_ms = stylefarm_proto::REPORT_TIMEOUT.as_millis() as i64;
        let rendered = |l: &LeaseInfo| {
            l.rendered
                || l.progress
                    .as_ref()
                    .is_some_and(|p| p.scale == p.scales && p.iteration == p.iterations)
        };
        // (lease, whether it expired; else it stalled). Exact-mode shards wait for each other at every
        // evaluation: the one that hangs stalls, not those waiting in the exchange for it.
        let ended: Vec<(LeaseId, bool)> = st
            .leases
            .iter()
            .filter_map(|(id, l)| {
                // (a lease taken up at a restart and not heard from yet is not stalled: it lapses,
                // at no cost, if its worker does not call)
                let unheard_since_restart = l.adopted && !l.heard;
                let stalled = !l.cancel
                    && !unheard_since_restart
                    && stall_ms.is_some_and(|ms| {
                        let waited = now - l.progressed_ms;
                        waited > ms && !(rendered(l) && waited <= ms + report_ms)
                    })
                    && !l.exchanging;
                (l.deadline_ms < now || stalled).then(|| (id.clone(), l.deadline_ms < now))
            })
            .collect();
        if ended.is_empty() {
            return Ok(());
        }
        let (mut jobs, mut ops) = (Vec::new(), Vec::new());
        for (lease_id, expired) in ended {
            let cancelled = st.leases.get(&lease_id).is_some_and(|l| l.cancel);
            if !expired && cancelled {
                // its job ended meanwhile (another lease of it taken back failed it): left to its worker,
                // as any lease being cancelled
                continue;
            }
            let mut lease = Self::take_lease(&mut st, &lease_id).expect("listed lease");
            if expired && lease.adopted && !lease.heard {
                // taken up from the store, and its worker never called: it died with the coordinator, or
                // before. Its task goes back to the queue at no cost (as when the store did not keep leases)
                let outcome =
                    "lost at the coordinator's restart: its worker did not call again within a \
                               lease period (run again; the attempt not counted)";
                give_back(&mut st, &mut lease, Some(outcome), &mut ops);
                tracing::info!(
                    lease_id = lease_id.as_str(),
                    job_id = lease.job_id.as_str(),
                    worker_id = lease.worker.as_str(),
                    "lease not taken up: its worker did not call within a lease period of this \
                     coordinator's start; its task is queued again"
                );
                jobs.push(lease.job_id);
                continue;
            }
            let reason = if expired && lease.signed_off {
                tracing::warn!(
                    lease_id = lease_id.as_str(),
                    job_id = lease.job_id.as_str(),
                    worker_id = lease.worker.as_str(),
                    "lease given up: its worker signed off"
                );
                "its worker stopped (signed off) before finishing it".to_string()
            } else if expired {
                tracing::warn!(
                    lease_id = lease_id.as_str(),
                    job_id = lease.job_id.as_str(),
                    worker_id = lease.worker.as_str(),
                    "lease expired"
                );
                self.metrics.lease_expiries.inc();
                let overdue = Duration::from_millis((now - lease.deadline_ms).max(0) as u64);
                let ran_out = std::time::Instant::now()
                    .checked_sub(overdue)
                    .unwrap_or_else(std::time::Instant::now);
                match st.lost.iter_mut().find(|(w, _)| *w == lease.worker) {
                    Some((_, at)) => *at = (*at).max(ran_out),
                    None => st.lost.push((lease.worker.clone(), ran_out)),
                }
                "lease expired (worker lost)".to_string()
            } else {
                let secs = (now - lease.progressed_ms) as f64 / 1000.0;
                tracing::warn!(
                    lease_id = lease_id.as_str(),
                    job_id = lease.job_id.as_str(),
                    worker_id = lease.worker.as_str(),
                    no_progress_s = secs,
                    "task stalled: lease taken back"
                );
                self.metrics.task_stalls.inc();
                format!(
                    "no progress for {secs:.0} s on its worker (the coordinator's --task-stall-secs)"
                )
            };
            let mut lease = lease;
            Self::end_attempt(&mut st, &mut lease, &reason, &mut ops, |st, lease, ops| {
                self.fail_task(st, lease, &reason, FailureKind::Retryable, ops)
            })?;
            jobs.push(lease.job_id);
        }
        let durable = self.store.write(ops);
        drop(st);
        store::wait(durable)?;
        self.work.notify_waiters();
        for job in jobs {
            self.changed(&job);
        }
        Ok(())
    }

    /// Queues more tasks of a running video job (its chunks' next frames, [`JobSpec::next_frames`]),
    /// leaving out any whose frame has a task already. Returns how many were queued: none once the job has
    /// ended (a cancel, a failure) or for another kind.
    pub fn add_frames(
        &self,
        job_id: &JobId,
        tasks: Vec<TaskSpec>,
    ) -> Result<usize, SchedulerError> {
        self.writable()?;
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let job = st
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        if job.meta.state.is_terminal() || !matches!(job.meta.spec.kind, JobKind::Video(_)) {
            return Ok(0);
        }
        let frame = |t: &TaskSpec| t.frame.as_ref().map(|f| f.index);
        let new: Vec<TaskSpec> = tasks
            .into_iter()
            .filter(|s| s.frame.is_some() && !job.tasks.iter().any(|t| frame(&t.spec) == frame(s)))
            .collect();
        let ops = append_tasks(&mut st.queue, &mut st.tally, job, new);
        let added = ops.len();
        if added == 0 {
            return Ok(0);
        }
        let durable = self.store.write(ops);
        drop(guard);
        store::wait(durable)?;
        self.work.notify_waiters();
        self.changed(job_id);
        Ok(added)
    }

    /// Records the image of stage `stage` of a job with stage work ([`stylefarm_core::job::JobKind::has_stage_work`]) whose
    /// tasks all succeeded (a sweep's contact sheet; a tiled job's stitched scale; a video's last frame,
    /// its one stage), and either queues the next stage's tasks (`next`) or, without one, completes the
    /// job with that image as its result.
    /// Returns false (and changes nothing) when the job is not at that point: finished, cancelled, or
    /// already past it.
    pub fn finish_stage(
        &self,
        job_id: &JobId,
        stage: u32,
        image: &ImageHash,
        next: Option<Vec<TaskSpec>>,
    ) -> Result<bool, SchedulerError> {
        self.writable()?;
        let mut guard = self.state.lock().unwrap();
        let st = &mut *guard;
        let job = st
            .jobs
            .get_mut(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        let at_stage = job.meta.stage_results.len() as u32 == stage && stage_done(job);
        if job.meta.state.is_terminal() || !job.meta.spec.kind.has_stage_work() || !at_stage {
            return Ok(false);
        }
        job.meta.stage_results.push(image.clone());
        let mut ops = Vec::new();
        match next {
            Some(tasks) => {
                if tasks.iter().any(|t| t.shards().is_some()) {
                    st.sharded.insert(job_id.clone());
                }
                ops = append_tasks(&mut st.queue, &mut st.tally, job, tasks);
            }
            None => {
                job.meta.result = Some(image.clone());
                // a keep-going sweep with failed (or cancelled) variants fails (or is cancelled), its
                // contact sheet kept
                match kept_going_end(job) {
                    Some((state, reason)) => {
                        set_job_state(&mut st.tally, &mut job.meta, state);
                        job.meta.error = reason;
                    }
                    None => set_job_state(&mut st.tally, &mut job.meta, JobState::Succeeded),
                }
                stamp_end(&mut job.meta, st.announce);
                job_ended(&mut st.unfinished, &job.meta);
            }
        }
        ops.push(Op::Job(job.meta.clone()));
        if job.meta.state.is_terminal() {
            self.settle(st, job_id, &mut ops);
        }
        let durable = self.store.write(ops);
        drop(guard);
        store::wait(durable)?;
        self.work.notify_waiters();
        self.changed(job_id);
        Ok(true)
    }

    /// An error while the store holds writes back ([`Store::behind`]): the calls that record outcomes
    /// answer it (UNAVAILABLE on the wire, RESOURCE_EXHAUSTED for a full disk) rather than acknowledge what
    /// the store may not hold.
    fn writable(&self) -> Result<(), SchedulerError> {
        match self.store.behind() {
            Some(e) => Err(SchedulerError::Store(e)),
            None => Ok(()),
        }
    }

    /// Whether the store holds writes back, out of reach ([`Store::behind`]).
    pub fn store_behind(&self) -> bool {
        self.store.behind().is_some()
    }

    /// Why this coordinator may no longer write to its store ([`Store::lost`]), once that is so.
    pub fn store_lost(&self) -> Option<String> {
        self.store.lost()
    }

    /// Why this scheduler's state can no longer be trusted: a panic while a call held it (a bug) poisoned
    /// its lock, and the call's changes may be half made, in memory ahead of or behind the store. Every
    /// later call that takes the lock panics; the coordinator stops instead of serving nothing while it
    /// holds a leader lease, so that a supervisor's restart (or a standby) loads the jobs from the store.
    /// `None`: sound.
    pub fn poisoned(&self) -> Option<String> {
        self.state.is_poisoned().then(|| {
            "a panic in the scheduler (a bug: see the log above) left its state in doubt; stopping, so that \
             a restart loads the jobs from the store"
                .to_string()
        })
    }

    /// This coordinator's hold on a store that several share ([`Store::hold`]); `None`: held for good.
    pub fn store_hold(&self) -> Option<store::Hold> {
        self.store.hold()
    }

    /// A job and its tasks, with live progress; [`SchedulerError::JobNotFound`] when there is no such job.
    pub fn get(&self, job_id: &JobId) -> Result<JobView, SchedulerError> {
        let st = self.state.lock().unwrap();
        let job = st
            .jobs
            .get(job_id)
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))?;
        Ok(Self::view(&st, job))
    }

    /// `f` of job `job_id`'s record and tasks, under the scheduler's lock, when the job has ended
    /// (succeeded, failed or cancelled); `None` when it has not, or there is no such job. Cheap for a
    /// running job: what a watcher of every job's changes asks at each.
    pub fn ended_with<T>(
        &self,
        job_id: &JobId,
        f: impl FnOnce(&JobMeta, &[TaskRecord]) -> T,
    ) -> Option<T> {
        let st = self.state.lock().unwrap();
        let job = st.jobs.get(job_id)?;
        job.meta
            .state
            .is_terminal()
            .then(|| f(&job.meta, &job.tasks))
    }

    /// Records that job `job_id`'s end at `finished_ms` was announced to the coordinator's `--notify-url`
    /// ([`JobMeta::unannounced`] cleared): written, not waited for (at worst the next coordinator announces
    /// it again, under the same delivery id). Nothing for a job that has ended again since, runs again, is
    /// being deleted or is gone, nor while the store holds writes back.
    pub fn announced(&self, job_id: &JobId, finished_ms: i64) {
        if self.store.behind().is_some() {
            return;
        }
        let mut st = self.state.lock().unwrap();
        let deleting = st.deleting.contains(job_id);
        let Some(job) = st.jobs.get_mut(job_id).filter(|_| !deleting) else {
            return;
        };
        let meta = &mut job.meta;
        if !meta.state.is_terminal() || meta.finished_ms != finished_ms || !meta.unannounced {
            return;
        }
        meta.unannounced = false;
        drop(self.store.write(vec![Op::Job(meta.clone())]));
    }

    /// The jobs whose end is still to be announced ([`JobMeta::unannounced`]), every tenant's, in the
    /// order they ended.
    pub fn unannounced(&self) -> Vec<JobId> {
        let st = self.state.lock().unwrap();
        let mut ended: Vec<(i64, JobId)> = (st.jobs.values())
            .filter(|j| j.meta.state.is_terminal() && j.meta.unannounced)
            .map(|j| (j.meta.finished_ms, j.meta.id.clone()))
            .collect();
        ended.sort();
        ended.into_iter().map(|(_, id)| id).collect()
    }

    /// The tenant that submitted job `job_id`.
    pub fn tenant_of(&self, job_id: &JobId) -> Result<String, SchedulerError> {
        let st = self.state.lock().unwrap();
        st.jobs
            .get(job_id)
            .map(|j| j.meta.tenant.clone())
            .ok_or_else(|| SchedulerError::JobNotFound(job_id.clone()))
    }

    fn view(st: &State, job: &Job) -> JobView {
        let tasks = job
            .tasks
            .iter()
            .map(|t| (t.clone(), Self::live_progress(st, job, t.index)))
            .collect();
        JobView {
            meta: job.meta.clone(),
            tasks,
        }
    }

    /// `tenant`'s jobs, newest first, optionally only in `states` and submitted before the job of
    /// submission number `before_seq` ([`JobMeta::seq`]; a page after one that ended there), at most
    /// `limit` (0: all).
    pub fn list(
        &self,
        tenant: &str,
        states: &[JobState],
        limit: usize,
        before_seq: Option<u64>,
    ) -> Vec<JobView> {
        let st = self.state.lock().unwrap();
        Self::newest(&st, tenant, states, limit, before_seq)
            .into_iter()
            .map(|j| Self::view(&st, j))
            .collect()
    }

    /// `f` of each of `tenant`'s jobs, newest first, at most `limit` (0: all), called under the
    /// scheduler's lock with the job's record and its tasks with their live progress: for summaries
    /// (the status page's) that need not copy every task as [`Scheduler::list`] does.
    pub fn list_with<T>(
        &self,
        tenant: &str,
        limit: usize,
        mut f: impl FnMut(&JobMeta, &[(&TaskRecord, Option<TaskProgress>)]) -> T,
    ) -> Vec<T> {
        let mut all = Vec::new();
        self.each_newest(tenant, &[], limit, None, |meta, tasks| {
            all.push(f(meta, tasks));
            ControlFlow::Continue(())
        });
        all
    }

    /// `f` of each of `tenant`'s jobs, as [`Scheduler::list`] picks them (in `states`, before `before_seq`,
    /// newest first, at most `limit`), called under the scheduler's lock with the job's record and its
    /// tasks with their live progress, until it breaks: a page of statuses built as it goes, without a copy
    /// of every task of every job.
    pub fn each_newest(
        &self,
        tenant: &str,
        states: &[JobState],
        limit: usize,
        before_seq: Option<u64>,
        mut f: impl FnMut(&JobMeta, &[(&TaskRecord, Option<TaskProgress>)]) -> ControlFlow<()>,
    ) {
        let st = self.state.lock().unwrap();
        for job in Self::newest(&st, tenant, states, limit, before_seq) {
            let tasks: Vec<_> = job
                .tasks
                .iter()
                .map(|t| (t, Self::live_progress(&st, job, t.index)))
                .collect();
            if f(&job.meta, &tasks).is_break() {
                break;
            }
        }
    }

    fn newest<'a>(
        st: &'a State,
        tenant: &str,
        states: &[JobState],
        limit: usize,
        before_seq: Option<u64>,
    ) -> Vec<&'a Job> {
        let mut jobs: Vec<&Job> = st
            .jobs
            .values()
            .filter(|j| j.meta.tenant == tenant)
            .filter(|j| states.is_empty() || states.contains(&j.meta.state))
            .filter(|j| before_seq.is_none_or(|before| j.meta.seq < before))
            .collect();
        // the newest `limit` first picked (linear), then only they sorted
        if limit > 0 && jobs.len() > limit {
            jobs.select_nth_unstable_by_key(limit - 1, |j| Reverse(j.meta.seq));
            jobs.truncate(limit);
        }
        jobs.sort_by_key(|j| Reverse(j.meta.seq));
        jobs
    }

    /// The latest progress of task `index` of `job`, when it runs and its worker reported some.
    fn live_progress(st: &State, job: &Job, index: u32) -> Option<TaskProgress> {
        job.leases
            .get(&index)
            .and_then(|l| st.leases.get(l))
            .and_then(|l| l.progress)
    }

    /// Every lease held now: which worker renders which task, with its latest progress.
    pub fn leases(&self) -> Vec<LeaseView> {
        let st = self.state.lock().unwrap();
        st.leases
            .values()
            .map(|l| LeaseView {
                worker: l.worker.clone(),
                job_id: l.job_id.clone(),
                index: l.index,
                tenant: st
                    .jobs
                    .get(&l.job_id)
                    .map(|j| j.meta.tenant.clone())
                    .unwrap_or_default(),
                progress: l.progress,
                preview_ms: l.preview.as_ref().map_or(0, |p| p.at_ms),
                leased_ms: l.leased_ms,
            })
            .collect()
    }

    /// The latest preview of task `index` of job `job_id` while it runs ([`Scheduler::heartbeat`]).
    pub fn preview(&self, job_id: &JobId, index: u32) -> Option<Preview> {
        let st = self.state.lock().unwrap();
        let lease = st.jobs.get(job_id)?.leases.get(&index)?;
        st.leases.get(lease)?.preview.clone()
    }

    /// The latest preview of each running task of job `job_id` that has one, by task index: [`Self::preview`]
    /// of them all, under one lock.
    pub fn previews(&self, job_id: &JobId) -> Vec<(u32, Preview)> {
        let st = self.state.lock().unwrap();
        let Some(job) = st.jobs.get(job_id) else {
            return Vec::new();
        };
        job.leases
            .iter()
            .filter_map(|(&index, lease)| Some((index, st.leases.get(lease)?.preview.clone()?)))
            .collect()
    }

    /// What the scheduler counts as it happens, for the metrics.
    pub fn metrics(&self) -> &SchedulerMetrics {
        &self.metrics
    }

    /// The queue by priority and the tasks held (a walk of the pending tasks), the tasks and the jobs by
    /// state (kept as they change: no walk of every task the coordinator has had).
    pub fn counts(&self) -> Counts {
        let st = self.state.lock().unwrap();
        let mut counts = Counts::default();
        let tags_of = |job_id: &JobId| {
            st.jobs
                .get(job_id)
                .map_or_else(String::new, |j| worker_tags_label(&j.meta.spec.worker_tags))
        };
        // how many more of a job's queued tasks may start under its max_workers
        let mut startable: HashMap<&JobId, usize> = HashMap::new();
        for (Reverse(priority), _, index, job_id) in st.queue.iter() {
            let held = st.jobs.get(job_id).and_then(|job| {
                let task = job.tasks.get(*index as usize)?;
                held_reason(job, task).or_else(|| {
                    let max = job.meta.spec.max_workers as usize;
                    if max == 0 {
                        return None;
                    }
                    let left = startable
                        .entry(job_id)
                        .or_insert_with(|| max.saturating_sub(rendering(&st.leases, job)));
                    let over = *left == 0;
                    *left = left.saturating_sub(1);
                    over.then_some(Held::MaxWorkers)
                })
            });
            if let Some(reason) = held {
                *counts
                    .held_by_reason
                    .entry(reason.name().into())
                    .or_default() += 1;
                continue;
            }
            *counts
                .queue_by_priority
                .entry(priority.to_string())
                .or_default() += 1;
            *counts
                .open_by_worker_tags
                .entry(tags_of(job_id))
                .or_default() += 1;
        }
        for lease in st.leases.values().filter(|l| !l.cancel) {
            *counts
                .open_by_worker_tags
                .entry(tags_of(&lease.job_id))
                .or_default() += 1;
        }
        let nonzero = |tally: &BTreeMap<&'static str, usize>| {
            tally
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(&name, &n)| (name.to_string(), n))
                .collect()
        };
        counts.tasks_by_state = nonzero(&st.tally.tasks);
        counts.jobs_by_state = nonzero(&st.tally.jobs);
        counts
    }

    /// [`Scheduler::counts`] by walking every job and task: what the tally must equal.
    #[cfg(test)]
    fn counts_walked(&self) -> Counts {
        let mut counts = self.counts();
        counts.tasks_by_state.clear();
        counts.jobs_by_state.clear();
        let st = self.state.lock().unwrap();
        for job in st.jobs.values() {
            *counts
                .jobs_by_state
                .entry(job.meta.state.name().into())
                .or_default() += 1;
            for t in &job.tasks {
                *counts
                    .tasks_by_state
                    .entry(t.state.name().into())
                    .or_default() += 1;
            }
        }
        counts
    }

    /// Pending tasks (ready, backing off or held), for tests.
    pub fn queue_depth(&self) -> usize {
        self.state.lock().unwrap().queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use std::collections::HashSet;
    use stylefarm_core::job::ImageHash;
    use stylefarm_core::job::JobKind;
    use stylefarm_core::RenderParams;

    fn batch(contents: u8, priority: i32) -> JobSpec {
        JobSpec {
            priority,
            ..JobSpec::new(
                JobKind::Batch,
                (0..contents).map(|i| ImageHash::of(&[i])).collect(),
                vec![ImageHash::of(b"style")],
                RenderParams::default(),
            )
        }
    }

    /// A tiled job of 1024 px in the default 512-px tiles: a whole first scale, then 3 x 2 tiles.
    fn tiled_1024() -> JobSpec {
        JobSpec {
            kind: JobKind::Tiled(Default::default()),
            contents: vec![ImageHash::of(b"content")],
            params: RenderParams {
                size: 1024,
                ..Default::default()
            },
            ..batch(1, 0)
        }
    }

    /// Submits `spec` as `tenant`'s job.
    fn submit_as(s: &Scheduler, tenant: &str, spec: JobSpec) -> JobId {
        s.submit_expanded(spec.expand().unwrap(), tenant, "", false)
            .unwrap()
            .0
    }

    /// A stand-in for an image's hash.
    fn hash(name: &str) -> ImageHash {
        ImageHash::of(name.as_bytes())
    }

    fn w(id: &str) -> WorkerId {
        WorkerId::from(id)
    }

    fn scheduler(config: SchedulerConfig) -> Scheduler {
        Scheduler::new(config, Arc::new(MemoryStore::default())).unwrap()
    }

    #[test]
    fn priorities_then_fifo() {
        let s = scheduler(SchedulerConfig::default());
        let (low, _) = s.submit(batch(2, 0), "").unwrap();
        let (high, _) = s.submit(batch(1, 5), "").unwrap();
        let (low2, _) = s.submit(batch(1, 0), "").unwrap();
        let order: Vec<(JobId, u32)> = std::iter::from_fn(|| s.lease(&w("w")).unwrap())
            .map(|l| (l.task.id.job, l.task.id.index))
            .collect();
        assert_eq!(order, [(high, 0), (low.clone(), 0), (low, 1), (low2, 0)]);
    }

    /// A priority changed after submission reorders the job's queued tasks, and a restart keeps it; a
    /// finished job keeps its own.
    #[test]
    fn a_priority_changed_reorders_the_job_s_queued_tasks() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let (first, _) = s.submit(batch(2, 0), "").unwrap();
        let (second, _) = s.submit(batch(1, 0), "").unwrap();
        let running = s.lease(&w("w")).unwrap().unwrap();
        assert_eq!(running.task.id.job, first);
        assert_eq!(s.set_priority(&second, 7).unwrap(), JobState::Queued);
        assert_eq!(s.counts().queue_by_priority.get("7"), Some(&1));
        drop(s);
        let s = Scheduler::new(SchedulerConfig::default(), store).unwrap();
        s.lapse_adopted();
        let order: Vec<JobId> = std::iter::from_fn(|| s.lease(&w("w")).unwrap())
            .map(|l| l.task.id.job)
            .collect();
        // the first job's task that ran went back to the queue at the restart
        assert_eq!(order, [second.clone(), first.clone(), first]);
        let (done, _) = s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        s.complete(&l.lease_id, &hash("r")).unwrap().unwrap();
        assert_eq!(s.set_priority(&done, 9).unwrap(), JobState::Succeeded);
        assert_eq!(s.get(&done).unwrap().meta.spec.priority, 0);
    }

    /// A request for a task sent again, its answer lost (the same request_id, from the same worker by name,
    /// whichever registration): answered with the lease handed out for it, its deadline as it was, at no
    /// attempt; another request, or one without a number, leases afresh; a lease being cancelled is not
    /// handed again.
    #[test]
    fn a_lease_is_handed_again_for_its_request_sent_again() {
        // as lease_wait asks: the lease of a request sent again, else a new one
        let ask = |s: &Scheduler, who: &str, request| {
            s.lease_again(&w(who), request).or_else(|| {
                s.lease_ready(&w(who), &[], DeviceMemory::default(), request)
                    .unwrap()
            })
        };
        let s = scheduler(SchedulerConfig::default());
        let (job, _) = s.submit(batch(3, 0), "").unwrap();
        let first = ask(&s, "a#1", 7).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        // the worker registered again (a#2) and asks again
        let again = ask(&s, "a#2", 7).unwrap();
        assert_eq!(again.lease_id, first.lease_id);
        assert_eq!(again.task.id, first.task.id);
        assert_eq!(
            again.deadline_ms, first.deadline_ms,
            "renewed by heartbeats only"
        );
        let view = s.get(&job).unwrap();
        let (task, _) = &view.tasks[first.task.id.index as usize];
        assert_eq!((task.attempts, task.worker.as_str()), (1, "a#2"));
        assert_eq!(s.leases().len(), 1);
        // once its worker sent a heartbeat for it, it has it: not handed again
        s.heartbeat(&first.lease_id, &w("a#2"), None, None).unwrap();
        let (_, more) = s.submit(batch(1, 0), "").unwrap();
        let _ = more;
        let after_beat = ask(&s, "a#3", 7).unwrap();
        assert_ne!(after_beat.lease_id, first.lease_id);
        // another worker with the same number, and the next request: other tasks
        let other = ask(&s, "b#1", 7).unwrap();
        assert_ne!(other.lease_id, first.lease_id);
        let next = ask(&s, "a#2", 8).unwrap();
        assert_ne!(next.task.id, first.task.id);
        assert_ne!(next.task.id, other.task.id);
        // no number: never handed again
        let (job2, _) = s.submit(batch(2, 0), "").unwrap();
        let plain = ask(&s, "c#1", 0).unwrap();
        let fresh = ask(&s, "c#1", 0).unwrap();
        assert_ne!(plain.lease_id, fresh.lease_id);
        // being cancelled: lapses, not handed again
        s.cancel(&job2).unwrap();
        let (_job3, _) = s.submit(batch(1, 0), "").unwrap();
        let d = ask(&s, "d#1", 9).unwrap();
        s.cancel(&d.task.id.job).unwrap();
        let after = ask(&s, "d#2", 9);
        assert!(after.is_none_or(|l| l.lease_id != d.lease_id));
        // past its deadline, not yet expired by the coordinator's loop: not handed again
        let s = scheduler(SchedulerConfig {
            lease: Duration::from_millis(1),
            ..Default::default()
        });
        s.submit(batch(2, 0), "").unwrap();
        let lapsed = ask(&s, "e#1", 5).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let next = ask(&s, "e#2", 5).unwrap();
        assert_ne!(next.lease_id, lapsed.lease_id);
    }

    /// A task's log: each attempt with its worker, its lines and how it ended, the running one included;
    /// the last [`stylefarm_core::task_log::KEPT_ATTEMPTS`], each bounded whatever its worker sends; kept
    /// by a restart; an expired lease's attempt says so, with the lines its heartbeats brought.
    #[test]
    fn a_task_keeps_its_last_attempts_logs_each_bounded() {
        use stylefarm_core::task_log::{LogLines, KEPT_ATTEMPTS, MAX_ATTEMPT_BYTES};
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            ..SchedulerConfig::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let job = submit_as(
            &s,
            "",
            JobSpec {
                max_attempts: 10,
                ..batch(1, 0)
            },
        );
        let lines = |text: &str| SentLines {
            first: 0,
            lines: LogLines {
                lines: vec![text.to_string()],
                left_out: 0,
            },
        };
        for i in 1..=4 {
            let worker = w(&format!("w{i}"));
            let l = s.lease(&worker).unwrap().unwrap();
            s.append_log(&l.lease_id, &worker, lines(&format!("line {i}")));
            // another worker that knows the lease's id adds nothing
            s.append_log(&l.lease_id, &w("intruder"), lines("forged"));
            let running = s.task_log(&job, 0).unwrap().pop().unwrap();
            assert_eq!(
                (running.attempt, running.ended_ms, running.outcome.as_str()),
                (i, 0, "")
            );
            assert_eq!(running.log.lines, [format!("line {i}")]);
            s.fail_with_log(
                &l.lease_id,
                &format!("boom {i}"),
                FailureKind::Retryable,
                lines("task failed"),
            )
            .unwrap();
            // a lease that ended takes no more lines
            s.append_log(&l.lease_id, &worker, lines("late"));
        }
        let logs = s.task_log(&job, 0).unwrap();
        assert_eq!(logs.len(), KEPT_ATTEMPTS);
        let last = logs.last().unwrap();
        assert_eq!(
            (last.attempt, last.worker.as_str(), last.outcome.as_str()),
            (4, "w4", "failed: boom 4")
        );
        assert_eq!(last.log.lines, ["line 4", "task failed"]);
        assert!(last.ended_ms >= last.started_ms && last.started_ms > 0);
        // a worker's flood of lines is bounded
        let l = s.lease(&w("w5")).unwrap().unwrap();
        let flood = SentLines {
            first: 0,
            lines: LogLines {
                lines: vec!["x".repeat(4096); 10_000],
                left_out: 0,
            },
        };
        s.complete_with_log(&l.lease_id, &hash("r"), flood, Vec::new())
            .unwrap()
            .unwrap();
        let logs = s.task_log(&job, 0).unwrap();
        let last = logs.last().unwrap();
        assert_eq!((last.attempt, last.outcome.as_str()), (5, "succeeded"));
        assert!(last.log.bytes() <= MAX_ATTEMPT_BYTES && last.log.left_out > 0);
        // kept by a restart
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        assert_eq!(s.task_log(&job, 0).unwrap(), logs);
        assert!(matches!(
            s.task_log(&job, 1),
            Err(SchedulerError::Invalid(stylefarm_core::Error::Invalid {
                field: "index",
                ..
            }))
        ));
        // an expired lease: its heartbeats' lines, and why it ended
        let s = scheduler(SchedulerConfig {
            lease: Duration::from_millis(0),
            ..Default::default()
        });
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("lost")).unwrap().unwrap();
        s.append_log(&l.lease_id, &w("lost"), lines("rendering"));
        std::thread::sleep(Duration::from_millis(5));
        s.expire().unwrap();
        let logs = s.task_log(&job, 0).unwrap();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].outcome, "lease expired (worker lost)");
        assert_eq!(logs[0].log.lines, ["rendering"]);
        // a cancelled job's task whose worker reports its result anyway: ended at once, as cancelled
        let s = scheduler(SchedulerConfig::default());
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        s.end_cancelled(&l.lease_id, lines("not cancelled yet"));
        assert_eq!(s.task_log(&job, 0).unwrap()[0].ended_ms, 0, "still running");
        s.cancel(&job).unwrap();
        s.end_cancelled(&l.lease_id, lines("rendered"));
        let logs = s.task_log(&job, 0).unwrap();
        assert_eq!(logs.len(), 1, "{logs:?}");
        assert_eq!(logs[0].outcome, "cancelled: its result discarded");
        assert_eq!(logs[0].log.lines, ["rendered"]);
        assert!(s.leases().is_empty());
    }

    /// A scheduler without retry backoff, on a store that outlives it (for a restart), and its config.
    fn restartable() -> (Arc<dyn Store>, SchedulerConfig, Scheduler) {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            ..SchedulerConfig::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        (store, config, s)
    }

    /// A checkpoint of scale 1 at `iteration`, its blob a stand-in.
    fn checkpoint(iteration: u32) -> Checkpoint {
        Checkpoint {
            blob: hash(&format!("checkpoint {iteration}")),
            scale: 1,
            iteration,
            bytes: 100,
        }
    }

    /// A task's checkpoint is recorded under its live lease only, and only for a job with checkpoints; its
    /// next attempt (after a failure, or the coordinator's restart) starts from it, its blob is in use
    /// meanwhile, and it is dropped once the task succeeds.
    #[test]
    fn a_task_s_next_attempt_starts_from_its_checkpoint_until_it_succeeds() {
        let (store, config, s) = restartable();
        let discarded = CheckpointSaved::Discarded;
        let kept = |replaced| CheckpointSaved::Kept { replaced };
        // a job without checkpoints records none
        let plain = s.submit(batch(1, 0), "").unwrap().0;
        let l = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(
            (l.task.checkpoints, &l.task.resume),
            (CheckpointEvery::Never, &None)
        );
        assert_eq!(
            s.save_checkpoint(&l.lease_id, checkpoint(10)).unwrap(),
            discarded
        );
        s.complete(&l.lease_id, &hash("r")).unwrap().unwrap();
        assert_eq!(s.get(&plain).unwrap().tasks[0].0.checkpoint, None);

        let job = submit_as(
            &s,
            "",
            JobSpec {
                checkpoint_every: 10,
                ..batch(1, 0)
            },
        );
        let l = s.lease(&w("a")).unwrap().unwrap();
        let every_10 = CheckpointEvery::Iterations(10.try_into().unwrap());
        assert_eq!((l.task.checkpoints, &l.task.resume), (every_10, &None));
        assert_eq!(
            s.save_checkpoint(&l.lease_id, checkpoint(10)).unwrap(),
            kept(None)
        );
        assert_eq!(
            s.save_checkpoint(&l.lease_id, checkpoint(20)).unwrap(),
            kept(Some(checkpoint(10)))
        );
        assert!(s.images_in_use().contains(&checkpoint(20).blob));
        assert!(
            s.holds_checkpoint(&checkpoint(20).blob) && !s.holds_checkpoint(&checkpoint(10).blob)
        );
        s.fail(&l.lease_id, "worker lost", FailureKind::Retryable)
            .unwrap();
        // the lease that failed saves no more
        assert_eq!(
            s.save_checkpoint(&l.lease_id, checkpoint(30)).unwrap(),
            discarded
        );
        let l = s.lease(&w("b")).unwrap().unwrap();
        assert_eq!(l.task.resume, Some(checkpoint(20)));
        drop(s);
        // a restart keeps it: the running task, its worker gone with the coordinator, goes back to the
        // queue and starts from it again
        let s = Scheduler::new(config, store).unwrap();
        s.lapse_adopted();
        let l = s.lease(&w("b")).unwrap().unwrap();
        assert_eq!(l.task.resume, Some(checkpoint(20)));
        let done = s.complete(&l.lease_id, &hash("result")).unwrap().unwrap();
        assert_eq!(done.dropped_checkpoint, Some(checkpoint(20)));
        assert_eq!(s.get(&job).unwrap().tasks[0].0.checkpoint, None);
        assert!(!s.holds_checkpoint(&checkpoint(20).blob));
        assert!(!s.images_in_use().contains(&checkpoint(20).blob));
        // a task whose checkpoint could be larger than the coordinator receives is not checkpointed:
        // Adam's at 4096 px would be 36 bytes a pixel, 576 MiB
        let large = submit_as(
            &s,
            "",
            JobSpec {
                checkpoint_every: 10,
                params: RenderParams {
                    size: 4096,
                    optimizer: stylefarm_core::Optimizer::Adam,
                    ..RenderParams::default()
                },
                ..batch(1, 0)
            },
        );
        let l = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(
            (&l.task.id.job, l.task.checkpoints),
            (&large, CheckpointEvery::Never)
        );
        assert_eq!(
            s.save_checkpoint(&l.lease_id, checkpoint(10)).unwrap(),
            discarded
        );
        s.complete(&l.lease_id, &hash("large")).unwrap().unwrap();

        // a job retried after it failed (out of attempts) starts from its failed task's checkpoint (one
        // whose checkpoints come every so many seconds, as those by iterations)
        let failed = submit_as(
            &s,
            "",
            JobSpec {
                checkpoint_secs: 60,
                max_attempts: 1,
                ..batch(1, 0)
            },
        );
        let l = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(
            s.save_checkpoint(&l.lease_id, checkpoint(30)).unwrap(),
            kept(None)
        );
        s.fail(&l.lease_id, "worker lost", FailureKind::Retryable)
            .unwrap();
        assert_eq!(s.get(&failed).unwrap().meta.state, JobState::Failed);
        s.retry(&failed).unwrap();
        let l = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(
            (l.task.id.job, l.task.resume, l.task.checkpoints),
            (
                failed,
                Some(checkpoint(30)),
                CheckpointEvery::Secs(60.try_into().unwrap())
            )
        );
    }

    /// A checkpoint's blob is held while a task's checkpoint is it, in any job (tasks of the same inputs
    /// save the same checkpoints), and no longer once the last one is replaced, dropped with its task's
    /// success, or its job deleted; a restart finds the checkpoints held.
    #[test]
    fn a_checkpoint_blob_is_held_while_any_task_holds_it() {
        let (store, config, s) = restartable();
        let spec = JobSpec {
            checkpoint_every: 10,
            max_attempts: 1,
            ..batch(1, 0)
        };
        let (first, second) = (submit_as(&s, "", spec.clone()), submit_as(&s, "", spec));
        let (l1, l2) = (
            s.lease(&w("a")).unwrap().unwrap(),
            s.lease(&w("b")).unwrap().unwrap(),
        );
        assert!(!s.holds_checkpoint(&checkpoint(10).blob));
        for l in [&l1, &l2] {
            s.save_checkpoint(&l.lease_id, checkpoint(10)).unwrap();
        }
        s.save_checkpoint(&l1.lease_id, checkpoint(20)).unwrap();
        let held = |s: &Scheduler| [10, 20].map(|i| s.holds_checkpoint(&checkpoint(i).blob));
        assert_eq!(
            held(&s),
            [true, true],
            "the second job's task holds the first's old one"
        );
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        assert_eq!(held(&s), [true, true], "after a restart");
        // its running task's worker gone with the coordinator
        s.lapse_adopted();
        let l = s.lease(&w("b")).unwrap().unwrap();
        assert_eq!(l.task.id.job, first);
        s.fail(&l.lease_id, "worker lost", FailureKind::Retryable)
            .unwrap();
        let l = s.lease(&w("b")).unwrap().unwrap();
        assert_eq!(l.task.id.job, second);
        s.complete(&l.lease_id, &hash("result")).unwrap().unwrap();
        assert_eq!(held(&s), [false, true], "the failed job keeps its task's");
        s.delete(&first).unwrap();
        assert_eq!(held(&s), [false, false]);
    }

    #[test]
    fn submit_is_idempotent_by_request_id() {
        let s = scheduler(SchedulerConfig::default());
        let (a, created) = s.submit(batch(1, 0), "r1").unwrap();
        assert!(created);
        assert_eq!(s.submit(batch(1, 0), "r1").unwrap(), (a.clone(), false));
        // the job changed since (its priority) is still the one its spec as submitted asked for
        s.set_priority(&a, 9).unwrap();
        assert_eq!(s.submit(batch(1, 0), "r1").unwrap(), (a.clone(), false));
        // another spec under the key: refused, not answered with the first job
        let err = s.submit(batch(3, 0), "r1").unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "client_request_id: used already for job {a}, whose spec differs"
            )),
            "{err}"
        );
        assert_eq!(s.queue_depth(), 1);
    }

    #[test]
    fn completion_finishes_the_job_and_stale_leases_are_fenced() {
        let s = scheduler(SchedulerConfig {
            lease: Duration::from_millis(0),
            backoff: Duration::ZERO,
            ..Default::default()
        });
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        let first = s.lease(&w("w1")).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        // the lease expired: the task is handed out again, and the old lease's result is discarded
        let second = s.lease(&w("w2")).unwrap().unwrap();
        assert_ne!(first.lease_id, second.lease_id);
        assert!(s
            .complete(&first.lease_id, &hash("stale"))
            .unwrap()
            .is_none());
        let view = s.get(&job).unwrap();
        assert_eq!(view.tasks[0].0.result, None, "the stale result is not kept");
        assert_ne!(view.meta.state, JobState::Succeeded);
        let s2 = scheduler(SchedulerConfig::default());
        let (job2, _) = s2.submit(batch(1, 0), "").unwrap();
        let lease = s2.lease(&w("w")).unwrap().unwrap();
        assert!(
            s2.complete(&lease.lease_id, &hash("result"))
                .unwrap()
                .unwrap()
                .all_tasks_done
        );
        let view = s2.get(&job2).unwrap();
        assert_eq!(view.meta.state, JobState::Succeeded);
        assert_eq!(view.tasks[0].0.result, Some(hash("result")));
    }

    #[test]
    fn retries_then_fails_and_blocklists() {
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            blocklist_after: 2,
            ..Default::default()
        });
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("bad")).unwrap().unwrap();
        s.fail(&l.lease_id, "boom", FailureKind::Retryable).unwrap();
        let l = s.lease(&w("bad")).unwrap().unwrap();
        s.fail(&l.lease_id, "boom", FailureKind::Retryable).unwrap();
        assert!(
            s.lease(&w("bad")).unwrap().is_none(),
            "blocklisted after 2 failures"
        );
        let l = s.lease(&w("good")).unwrap().unwrap();
        s.fail(&l.lease_id, "boom", FailureKind::Retryable).unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(
            view.meta.state,
            JobState::Failed,
            "3 attempts: the default maximum"
        );
        assert!(view.meta.error.contains("boom"));
    }

    #[test]
    fn out_of_memory_and_permanent_failures_are_not_strikes() {
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            blocklist_after: 1,
            ..Default::default()
        });
        let spec = JobSpec {
            max_attempts: 10,
            worker_tags: Vec::new(),
            ..batch(1, 0)
        };
        let (first, _) = s.submit(spec, "").unwrap();
        let (second, _) = s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        s.fail(&l.lease_id, "oom", FailureKind::OutOfMemory)
            .unwrap();
        // the task that ran out of memory on w is offered to other workers first; w still gets work
        let other = s
            .lease(&w("w"))
            .unwrap()
            .expect("no strike for out-of-memory");
        assert_eq!(
            (other.task.id.job.as_str(), other.task.id.index),
            (second.as_str(), 0)
        );
        let l = s.lease(&w("v")).unwrap().expect("another worker, at once");
        assert_eq!(
            (l.task.id.job.as_str(), l.task.id.index),
            (first.as_str(), 0)
        );
        s.fail(&l.lease_id, "corrupt", FailureKind::Permanent)
            .unwrap();
        let view = s.get(&first).unwrap();
        assert_eq!(view.meta.state, JobState::Running, "one worker's word");
        assert!(view.meta.strikes.is_empty(), "{:?}", view.meta.strikes);
        assert_eq!(view.tasks[0].0.state, TaskState::Pending);
        let l = s
            .lease(&w("v"))
            .unwrap()
            .expect("no strike for a permanent failure");
        assert_eq!(
            (l.task.id.job.as_str(), l.task.id.index),
            (first.as_str(), 0)
        );
        // a retryable failure is a strike: blocklisted from this job at once
        s.fail(&l.lease_id, "crash", FailureKind::Retryable)
            .unwrap();
        assert_eq!(s.get(&first).unwrap().meta.strikes["v"], 1);
        assert!(s.lease(&w("v")).unwrap().is_none(), "blocklisted");
        assert!(
            s.lease(&w("v#2")).unwrap().is_none(),
            "blocklisted when registered again: strikes count by name"
        );
        assert!(
            s.lease(&w("x")).unwrap().is_some(),
            "the task is ready for others"
        );
    }

    /// A job that asks for tags goes only to workers with all of them; one that asks for none, to any. Only
    /// the workers it may run on count for [`Scheduler::fail_stranded`]: with none of them live it waits.
    #[test]
    fn a_job_with_worker_tags_goes_to_the_workers_with_them() {
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            blocklist_after: 1,
            default_max_attempts: 10,
            no_worker_left: Duration::ZERO,
            ..Default::default()
        });
        let tags = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        let (gpu_job, _) = s
            .submit(
                JobSpec {
                    worker_tags: tags(&["gpu"]),
                    ..batch(1, 5)
                },
                "",
            )
            .unwrap();
        assert!(
            s.lease(&w("plain")).unwrap().is_none(),
            "an untagged worker"
        );
        assert!(s
            .lease_tagged(&w("cpu"), &tags(&["cpu"]))
            .unwrap()
            .is_none());
        // why it waits, for people: by the live workers
        let waiting = |live: Vec<(WorkerId, Vec<String>)>| {
            let waiting = Waiting {
                live,
                blocklist_after: 1,
                ..Default::default()
            };
            waiting.of(&s.get(&gpu_job).unwrap())
        };
        assert_eq!(
            waiting(vec![]),
            "no live worker: it waits for one to register"
        );
        assert_eq!(
            waiting(vec![(w("plain"), vec![]), (w("cpu"), tags(&["cpu"]))]),
            "no live worker has the worker tags it asks for (gpu): the live ones have tags cpu; none; \
             it waits for one that has"
        );
        let big = tags(&["a100", "gpu"]);
        assert_eq!(
            waiting(vec![(w("big"), big.clone())]),
            "",
            "a worker may take it"
        );
        // the work a pool of tagged workers scales on: queued or running, by the job's tags
        let open = |s: &Scheduler| s.counts().open_by_worker_tags;
        assert_eq!(open(&s), BTreeMap::from([("gpu".to_string(), 1)]));
        let l = s.lease_tagged(&w("big"), &big).unwrap().unwrap();
        assert_eq!(l.task.id.job, gpu_job);
        assert_eq!(waiting(vec![]), "", "running");
        assert_eq!(
            open(&s),
            BTreeMap::from([("gpu".to_string(), 1)]),
            "running"
        );
        // an untagged job: any worker, tagged or not
        let (any_job, _) = s.submit(batch(1, 0), "").unwrap();
        assert_eq!(open(&s).get(""), Some(&1));
        let l2 = s.lease_tagged(&w("cpu"), &tags(&["cpu"])).unwrap().unwrap();
        assert_eq!(l2.task.id.job, any_job);
        assert_eq!(
            worker_tags_label(&tags(&["gpu", "a100", "gpu"])),
            "a100,gpu"
        );
        // the only gpu worker blocklisted: the cpu worker does not count, the job has no worker left
        s.fail(&l.lease_id, "crash", FailureKind::Retryable)
            .unwrap();
        let live = vec![(w("cpu"), tags(&["cpu"]))];
        assert!(
            s.fail_stranded(&live).unwrap().is_empty(),
            "none it may run on: wait"
        );
        let live = vec![(w("cpu"), tags(&["cpu"])), (w("big#2"), big)];
        assert_eq!(
            waiting(live.clone()),
            "every live worker it may run on (1) is blocklisted for it (strikes: at least 1): it \
             fails unless another comes"
        );
        assert_eq!(s.fail_stranded(&live).unwrap(), vec![gpu_job.clone()]);
        assert_eq!(waiting(live), "", "failed");
        let error = s.get(&gpu_job).unwrap().meta.error;
        assert!(error.contains("(1: big#2)"), "{error}");
    }

    /// Records of a version that keyed strikes and reports by worker id (`name#n`) load by name: one
    /// worker's registrations summed, its reports counted once.
    #[test]
    fn records_keyed_by_worker_id_load_by_worker_name() {
        let store = Arc::new(MemoryStore::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        let view = s.get(&job).unwrap();
        let mut meta = view.meta.clone();
        meta.strikes = [(w("gpu#1"), 2), (w("gpu#4"), 1), (w("cpu#2"), 1)].into();
        store.update_job(&meta).unwrap();
        let mut task = view.tasks[0].0.clone();
        task.permanent_error_workers = vec![w("gpu#1"), w("gpu#4")];
        task.out_of_memory_on = vec![w("cpu#2")];
        store.update_task(&job, &task).unwrap();
        let s = Scheduler::new(SchedulerConfig::default(), store).unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.strikes, [(w("cpu"), 1), (w("gpu"), 3)].into());
        assert_eq!(view.tasks[0].0.permanent_error_workers, ["gpu"]);
        assert_eq!(view.tasks[0].0.out_of_memory_on, ["cpu"]);
        assert!(s.lease(&w("gpu#9")).unwrap().is_none(), "3 strikes by name");
    }

    /// Live workers without tags, for [`Scheduler::fail_stranded`].
    fn untagged(ids: &[&str]) -> Vec<(WorkerId, Vec<String>)> {
        ids.iter().map(|id| (w(id), Vec::new())).collect()
    }

    /// A job that every live worker is blocklisted for fails, naming them and the last error, once it has
    /// waited `no_worker_left` for another, instead of waiting forever; not while another live worker may
    /// take it, a task of it runs, or no worker is live; and the same after a restart (strikes are stored).
    #[test]
    fn a_job_no_live_worker_may_take_fails() {
        let store = Arc::new(MemoryStore::default());
        let grace = Duration::from_millis(200);
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            blocklist_after: 2,
            default_max_attempts: 10,
            no_worker_left: grace,
            ..Default::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let (job, _) = s.submit(batch(3, 0), "").unwrap();
        let (other, _) = s.submit(batch(1, -1), "").unwrap();
        for error in ["crash 1", "crash 2"] {
            let l = s.lease(&w("a")).unwrap().unwrap();
            assert_eq!(l.task.id.job, job);
            s.fail(&l.lease_id, error, FailureKind::Retryable).unwrap();
        }
        assert_eq!(s.get(&job).unwrap().meta.strikes["a"], 2);
        // "b" may still take it; no live worker: wait for one
        for live in [untagged(&["a", "b"]), vec![]] {
            assert!(s.fail_stranded(&live).unwrap().is_empty());
        }
        // a task running on "b" may yet succeed; a wait that a live worker interrupts starts over
        assert!(s.fail_stranded(&untagged(&["a"])).unwrap().is_empty());
        std::thread::sleep(grace + Duration::from_millis(20));
        let running = s.lease(&w("b")).unwrap().unwrap();
        assert!(s.fail_stranded(&untagged(&["a"])).unwrap().is_empty());
        s.fail(&running.lease_id, "crash 3", FailureKind::Retryable)
            .unwrap();
        let restarted = Scheduler::new(config, store).unwrap();
        for s in [&s, &restarted] {
            // no worker left ("a" registered again is still "a"): the job waits `no_worker_left` for one
            // to come, then fails
            let live = untagged(&["a#2"]);
            assert!(
                s.fail_stranded(&live).unwrap().is_empty(),
                "the wait starts"
            );
            std::thread::sleep(grace / 2);
            assert!(s.fail_stranded(&live).unwrap().is_empty(), "still waiting");
            std::thread::sleep(grace / 2 + Duration::from_millis(20));
            assert_eq!(s.fail_stranded(&live).unwrap(), vec![job.clone()]);
            let view = s.get(&job).unwrap();
            assert_eq!(view.meta.state, JobState::Failed);
            assert!(
                view.meta.error.starts_with("no worker left to run it")
                    && view.meta.error.contains("(1: a#2)")
                    && view.meta.error.contains("crash"),
                "{}",
                view.meta.error
            );
            assert!(view
                .tasks
                .iter()
                .all(|(t, _)| t.state != TaskState::Pending));
            // another job is not held by the blocklist
            assert_eq!(s.get(&other).unwrap().meta.state, JobState::Queued);
            assert!(
                s.fail_stranded(&untagged(&["a"])).unwrap().is_empty(),
                "once"
            );
        }
    }

    #[test]
    fn a_task_out_of_memory_on_the_only_worker_returns_to_it_a_lease_later() {
        let lease = Duration::from_millis(100);
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            lease,
            ..Default::default()
        });
        s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        s.fail(&l.lease_id, "oom", FailureKind::OutOfMemory)
            .unwrap();
        assert!(s.lease(&w("w")).unwrap().is_none(), "others first");
        std::thread::sleep(lease + Duration::from_millis(20));
        let again = s.lease(&w("w")).unwrap().expect("nobody else took it");
        assert_eq!(again.task.id, l.task.id);
    }

    /// A task that ran out of memory on a 24 GiB device goes at once to a worker with more (OpenCue's
    /// out-of-memory retries with more memory); another 24 GiB one, or a smaller one, takes it only a lease
    /// period later, as the one that ran out does, while a larger device is live; once it ran out on the
    /// largest, a like one takes it at once; a worker whose memory is not known is not held back. The
    /// largest device it ran out on is kept with the task, across a restart, and a lease taken up at a
    /// restart knows its worker's device.
    #[test]
    fn a_task_out_of_memory_goes_to_a_larger_device_first() {
        const GIB: u64 = 1 << 30;
        let lease = Duration::from_millis(150);
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            lease,
            ..Default::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let attempts = JobSpec {
            max_attempts: 10,
            ..batch(1, 0)
        };
        s.submit(attempts, "").unwrap();
        // a farm of 16, 24 and 80 GiB devices
        let farm = |own: u64| DeviceMemory {
            own: own * GIB,
            largest_live: 80 * GIB,
        };
        let run_out = |s: &Scheduler, lease: &Lease| {
            s.fail(
                &lease.lease_id,
                "CUDA out of memory",
                FailureKind::OutOfMemory,
            )
            .unwrap();
        };
        let l = s.lease_as(&w("small-1"), &[], farm(24)).unwrap().unwrap();
        // the coordinator restarts while small-1 renders: the lease it takes up knows small-1's device
        drop(s);
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        run_out(&s, &l);
        let s = Scheduler::new(config, store).unwrap();
        for (worker, memory) in [("small-2", 24), ("smaller", 16), ("small-1", 24)] {
            let leased = s.lease_as(&w(worker), &[], farm(memory)).unwrap();
            assert!(leased.is_none(), "{worker}");
        }
        let large = s.lease_as(&w("large"), &[], farm(80)).unwrap().unwrap();
        assert_eq!(large.task.id, l.task.id);
        run_out(&s, &large);
        // it ran out on the largest device too: none is larger, so another of the same size (as on a farm
        // of like GPUs) takes it at once, as does one of unknown memory
        let twin = s.lease_as(&w("large-2"), &[], farm(80)).unwrap().unwrap();
        assert_eq!(twin.task.id, l.task.id);
        run_out(&s, &twin);
        let unknown = DeviceMemory {
            own: 0,
            largest_live: 80 * GIB,
        };
        let unknown = s.lease_as(&w("unknown"), &[], unknown).unwrap().unwrap();
        assert_eq!(unknown.task.id, l.task.id);
        run_out(&s, &unknown);
        // a lease period later, the workers it ran out on may try it again
        assert!(s.lease_as(&w("small-1"), &[], farm(24)).unwrap().is_none());
        std::thread::sleep(lease + Duration::from_millis(30));
        let again = s.lease_as(&w("small-1"), &[], farm(24)).unwrap().unwrap();
        assert_eq!(again.task.id, l.task.id);
    }

    /// A job of one task with `max_attempts` attempts, and the scheduler without retry delays.
    fn one_task(max_attempts: u32) -> (Scheduler, JobId) {
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            ..Default::default()
        });
        let spec = JobSpec {
            max_attempts,
            ..batch(1, 0)
        };
        let (job, _) = s.submit(spec, "").unwrap();
        (s, job)
    }

    /// Leases the task as `worker` and fails it.
    fn fail_as(s: &Scheduler, worker: &str, error: &str, kind: FailureKind) {
        let l = s.lease(&w(worker)).unwrap().expect("the task is ready");
        s.fail(&l.lease_id, error, kind).unwrap();
    }

    #[test]
    fn one_worker_repeating_a_permanent_error_does_not_confirm_it() {
        let (s, job) = one_task(3);
        fail_as(&s, "a", "corrupt", FailureKind::Permanent);
        fail_as(&s, "a", "corrupt", FailureKind::Permanent);
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Running);
        let task = &view.tasks[0].0;
        assert_eq!(task.state, TaskState::Pending);
        assert_eq!(task.error, "corrupt");
        assert_eq!(task.permanent_error_workers, ["a"]);
        // the attempts still bound it
        fail_as(&s, "a", "corrupt", FailureKind::Permanent);
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(view.tasks[0].0.state, TaskState::Failed);
        assert_eq!(view.tasks[0].0.attempts, 3);
        assert!(
            view.meta.error.contains("after 3 attempt(s): corrupt"),
            "{}",
            view.meta.error
        );
    }

    #[test]
    fn the_same_permanent_error_on_two_workers_fails_the_job_at_once() {
        let (s, job) = one_task(10);
        fail_as(&s, "a", "corrupt", FailureKind::Permanent);
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Running);
        fail_as(&s, "b", "corrupt", FailureKind::Permanent);
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        let task = &view.tasks[0].0;
        assert_eq!(task.state, TaskState::Failed);
        assert_eq!(task.attempts, 2, "8 attempts left unused");
        assert_eq!(task.error, "corrupt");
        assert_eq!(task.permanent_error_workers, ["a", "b"]);
        assert!(
            view.meta.error.starts_with("task 0 "),
            "{}",
            view.meta.error
        );
        assert!(
            view.meta.error.ends_with("on workers a, b: corrupt"),
            "{}",
            view.meta.error
        );
        assert_eq!(s.queue_depth(), 0);
        assert!(s.lease(&w("c")).unwrap().is_none());
    }

    #[test]
    fn an_untiled_task_out_of_memory_to_the_last_attempt_says_what_would_fit() {
        let (s, job) = one_task(2);
        fail_as(&s, "a", "CUDA out of memory", FailureKind::OutOfMemory);
        fail_as(&s, "b", "CUDA out of memory", FailureKind::OutOfMemory);
        let error = s.get(&job).unwrap().meta.error;
        assert_eq!(
            error,
            format!(
                "task 0 (content 1 x style 1) failed after 2 attempt(s): CUDA out of memory{OUT_OF_MEMORY_HINT}"
            )
        );
        // another failure's last attempt: no hint
        let (s, job) = one_task(1);
        fail_as(&s, "a", "crash", FailureKind::Retryable);
        assert!(s
            .get(&job)
            .unwrap()
            .meta
            .error
            .ends_with("attempt(s): crash"));
    }

    #[test]
    fn one_confirmation_where_configured_fails_the_job_at_the_first_report() {
        // `stylefarm local`: its workers share one process, and a second one's word adds nothing
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            permanent_confirmations: 1,
            ..Default::default()
        });
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        fail_as(&s, "a", "corrupt", FailureKind::Permanent);
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(view.tasks[0].0.attempts, 1);
        assert!(
            view.meta.error.ends_with("error on worker a: corrupt"),
            "{}",
            view.meta.error
        );
        // a retryable failure still has its attempts
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        fail_as(&s, "a", "lost", FailureKind::Retryable);
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Running);
    }

    #[test]
    fn another_error_restarts_the_confirmation() {
        let (s, job) = one_task(10);
        fail_as(&s, "a", "corrupt", FailureKind::Permanent);
        fail_as(&s, "b", "truncated", FailureKind::Permanent);
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Running, "the errors differ");
        assert_eq!(view.tasks[0].0.error, "truncated");
        assert_eq!(view.tasks[0].0.permanent_error_workers, ["b"]);
        // any other failure in between restarts it too
        fail_as(&s, "c", "crash", FailureKind::Retryable);
        fail_as(&s, "a", "truncated", FailureKind::Permanent);
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Running);
        assert_eq!(view.tasks[0].0.permanent_error_workers, ["a"]);
        fail_as(&s, "b", "truncated", FailureKind::Permanent);
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(view.tasks[0].0.attempts, 5);
        assert!(
            view.meta.error.ends_with(": truncated"),
            "{}",
            view.meta.error
        );
    }

    #[test]
    fn backoff_delays_the_retry() {
        let s = scheduler(SchedulerConfig {
            backoff: Duration::from_secs(60),
            ..Default::default()
        });
        s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        s.fail(&l.lease_id, "x", FailureKind::Retryable).unwrap();
        assert!(
            s.lease(&w("other")).unwrap().is_none(),
            "waiting out the backoff"
        );
        assert_eq!(s.queue_depth(), 1);
    }

    /// A paused job starts nothing while its running task goes on, waits saying so (and is not failed for
    /// want of a worker), stays paused across a restart, and goes on once resumed; a finished job is left
    /// as it is.
    #[test]
    fn a_paused_job_starts_nothing_until_resumed() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            no_worker_left: Duration::ZERO,
            blocklist_after: 1,
            backoff: Duration::ZERO,
            ..Default::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let (job, _) = s.submit(batch(3, 0), "").unwrap();
        let first = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(s.set_paused(&job, true).unwrap(), JobState::Running);
        assert!(s.lease(&w("a")).unwrap().is_none(), "paused");
        // its queued tasks are held, not queued for a worker; the running one is still open
        let counts = s.counts();
        assert_eq!(
            counts.held_by_reason,
            BTreeMap::from([("paused".into(), 2)])
        );
        assert!(counts.queue_by_priority.is_empty(), "{counts:?}");
        assert_eq!(counts.open_by_worker_tags, BTreeMap::from([("".into(), 1)]));
        s.complete(&first.lease_id, &hash("done")).unwrap().unwrap();
        // a failure blocklists the only worker: a paused job waits for its client, not for a worker
        s.set_paused(&job, false).unwrap();
        let second = s.lease(&w("a")).unwrap().unwrap();
        s.set_paused(&job, true).unwrap();
        s.fail(&second.lease_id, "boom", FailureKind::Retryable)
            .unwrap();
        let live = untagged(&["a"]);
        assert!(s.fail_stranded(&live).unwrap().is_empty());
        let view = s.get(&job).unwrap();
        let waiting = Waiting {
            live,
            blocklist_after: 1,
            ..Default::default()
        };
        assert_eq!(
            waiting.reason(&view.meta, view.tasks.iter().map(|(t, _)| t)),
            "paused: its queued tasks start once it is resumed"
        );
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        assert!(s.get(&job).unwrap().meta.paused, "paused across a restart");
        assert!(s.lease(&w("b")).unwrap().is_none());
        s.set_paused(&job, false).unwrap();
        for _ in 0..2 {
            let l = s.lease(&w("b")).unwrap().unwrap();
            s.complete(&l.lease_id, &hash("r")).unwrap().unwrap();
        }
        assert_eq!(s.set_paused(&job, true).unwrap(), JobState::Succeeded);
        assert!(
            !s.get(&job).unwrap().meta.paused,
            "a finished job is left as it is"
        );
        // a job paused when it ends is no longer paused (a retry runs it)
        let (other, _) = s.submit(batch(1, 0), "").unwrap();
        s.set_paused(&other, true).unwrap();
        s.cancel(&other).unwrap();
        assert!(!s.get(&other).unwrap().meta.paused);
    }

    /// A shard whose siblings run starts even when its job is paused (they wait for it at every step); a
    /// scale's first shard does not.
    #[test]
    fn a_paused_job_s_running_scale_takes_its_other_shards() {
        let (s, job, _) = sharded_job(Arc::new(MemoryStore::default()), 2);
        let _free = s.idle(&w("b"), &[]);
        s.set_paused(&job, true).unwrap();
        assert!(
            s.lease(&w("a")).unwrap().is_none(),
            "no group starts while paused"
        );
        s.set_paused(&job, false).unwrap();
        s.lease(&w("a")).unwrap().unwrap();
        s.set_paused(&job, true).unwrap();
        // the sibling counts as queued for a worker, not held
        let queued: usize = s.counts().queue_by_priority.values().sum();
        assert_eq!(queued, 1, "{:?}", s.counts());
        let sibling = s
            .lease(&w("b"))
            .unwrap()
            .expect("the running group's other shard");
        assert!(sibling.task.spec.shards().is_some());
    }

    /// A running task's latest preview is kept (a heartbeat without one keeps it; another worker's is left
    /// out) and goes with its lease.
    #[test]
    fn a_running_task_keeps_its_latest_preview_until_it_ends() {
        let s = scheduler(SchedulerConfig::default());
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        assert!(s.preview(&job, 0).is_none());
        assert_eq!(s.leases()[0].preview_ms, 0);
        for (worker, png) in [
            ("w", Some("first")),
            ("w", Some("second")),
            ("w", None),
            ("x", Some("x")),
        ] {
            let png = png.map(|p| bytes::Bytes::from_static(p.as_bytes()));
            s.heartbeat(&l.lease_id, &w(worker), None, png).unwrap();
        }
        let preview = s.preview(&job, 0).unwrap();
        assert_eq!(&preview.png[..], b"second");
        assert_eq!(s.leases()[0].preview_ms, preview.at_ms);
        s.complete(&l.lease_id, &hash("r")).unwrap().unwrap();
        assert!(s.preview(&job, 0).is_none());
    }

    #[test]
    fn cancel_reaches_the_heartbeat() {
        let s = scheduler(SchedulerConfig::default());
        let (job, _) = s.submit(batch(2, 0), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        assert!(
            !s.heartbeat(&l.lease_id, &w("w"), None, None)
                .unwrap()
                .cancel
        );
        assert_eq!(s.cancel(&job).unwrap(), JobState::Cancelled);
        assert!(
            s.heartbeat(&l.lease_id, &w("w"), None, None)
                .unwrap()
                .cancel
        );
        assert!(
            s.lease(&w("w")).unwrap().is_none(),
            "the pending task was cancelled"
        );
        assert!(s.complete(&l.lease_id, &hash("late")).unwrap().is_none());
        assert!(matches!(
            s.cancel(&JobId::from("job-nope")),
            Err(SchedulerError::JobNotFound(_))
        ));
    }

    /// A job is deleted only once finished and with no task still being stopped; then it is gone from
    /// memory, the counts and the store (a restart does not bring it back), and its request id is free.
    #[test]
    fn finished_jobs_are_deleted_for_good_and_running_ones_refused() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let (job, _) = s.submit(batch(2, 0), "req").unwrap();
        let (kept, _) = s.submit(batch(1, 0), "").unwrap();
        let refused = |e: SchedulerError, says: &str| match e {
            SchedulerError::Precondition(m) => assert!(m.contains(says), "{m}"),
            e => panic!("{e:?}"),
        };
        refused(s.delete(&job).unwrap_err(), "is queued: cancel it first");
        let l = s.lease(&w("w")).unwrap().unwrap();
        refused(s.delete(&job).unwrap_err(), "is running");
        s.cancel(&job).unwrap();
        // cancelled, but its worker has not been told yet
        refused(s.delete(&job).unwrap_err(), "still being stopped");
        assert!(
            s.heartbeat(&l.lease_id, &w("w"), None, None)
                .unwrap()
                .cancel
        );
        s.fail(&l.lease_id, "cancelled", FailureKind::Retryable)
            .unwrap();
        s.delete(&job).unwrap();
        assert!(matches!(s.get(&job), Err(SchedulerError::JobNotFound(_))));
        assert!(matches!(
            s.delete(&job),
            Err(SchedulerError::JobNotFound(_))
        ));
        assert_eq!(s.counts(), s.counts_walked());
        assert_eq!(
            s.counts().jobs_by_state,
            BTreeMap::from([("queued".into(), 1)])
        );
        let (again, created) = s.submit(batch(1, 0), "req").unwrap();
        assert!(created && again != job, "the request id is free again");
        let restarted = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let ids: Vec<_> = restarted
            .list("", &[], 10, None)
            .into_iter()
            .map(|v| v.meta.id)
            .collect();
        assert!(!ids.contains(&job) && ids.contains(&kept), "{ids:?}");

        // the sweep: only jobs finished before the cutoff, never unfinished ones
        let l = restarted.lease(&w("w")).unwrap().unwrap();
        restarted.complete(&l.lease_id, &hash("r")).unwrap();
        let finished: Vec<_> = restarted
            .list("", &[JobState::Succeeded], 10, None)
            .into_iter()
            .map(|v| v.meta.id)
            .collect();
        assert_eq!(finished.len(), 1);
        assert!(restarted.delete_finished_before(0, 10).unwrap().is_empty());
        assert!(restarted
            .delete_finished_before(now_ms() + 1, 0)
            .unwrap()
            .is_empty());
        let deleted = restarted.delete_finished_before(now_ms() + 1, 10).unwrap();
        assert_eq!(deleted, finished);
        assert_eq!(restarted.counts(), restarted.counts_walked());
        assert_eq!(store.load().unwrap().len(), 1, "one job left, unfinished");
    }

    #[test]
    fn tiled_jobs_advance_scale_by_scale_and_survive_a_restart() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let spec = tiled_1024();
        let (job, _) = s.submit(spec.clone(), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        assert_eq!(l.task.spec.label, "scale 1/2");
        let done = s.complete(&l.lease_id, &hash("scale0")).unwrap().unwrap();
        assert!(done.all_tasks_done);
        assert_eq!(
            s.get(&job).unwrap().meta.state,
            JobState::Running,
            "waits for its stitch"
        );
        assert_eq!(s.jobs_awaiting_step(), vec![job.clone()]);
        let stitched = ImageHash::of(b"stitched 1");
        let tiles = spec.scale_tasks(800, 600, 1, &stitched, &[], None).unwrap();
        assert_eq!(tiles.len(), 6, "1024 x 768 in 512-px tiles: 3 x 2");
        // a wrong scale, or the same scale twice, changes nothing
        assert!(!s.finish_stage(&job, 1, &hash("x"), None).unwrap());
        assert!(s
            .finish_stage(&job, 0, &stitched, Some(tiles.clone()))
            .unwrap());
        assert!(!s.finish_stage(&job, 0, &stitched, Some(tiles)).unwrap());
        assert_eq!(s.queue_depth(), 6);
        assert!(s.jobs_awaiting_step().is_empty());
        // the tiles are in the store: a restarted scheduler has them queued
        let again = Scheduler::new(SchedulerConfig::default(), store).unwrap();
        assert_eq!(again.queue_depth(), 6);
        let mut leases = Vec::new();
        while let Some(l) = again.lease(&w("w")).unwrap() {
            assert!(l.task.spec.scale.is_some());
            leases.push(l);
        }
        assert_eq!(leases.len(), 6);
        for l in &leases {
            again.complete(&l.lease_id, &hash("tile")).unwrap();
        }
        assert!(again.finish_stage(&job, 1, &hash("final"), None).unwrap());
        let view = again.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Succeeded);
        assert_eq!(view.meta.result, Some(hash("final")));
        assert_eq!(view.meta.stage_results, [stitched, hash("final")]);
    }

    /// An exact-mode tiled job (Adam; a 768 x 1024 content) at its second scale, cut into `workers`
    /// shards (at most 3: 1024 px tall in 512-px blocks); its scheduler
    /// with the job, in `store`, and the shards' specs.
    fn sharded_job(store: Arc<dyn Store>, workers: usize) -> (Scheduler, JobId, JobSpec) {
        sharded_job_with(SchedulerConfig::default(), store, workers)
    }

    /// [`sharded_job`] under `config`.
    fn sharded_job_with(
        config: SchedulerConfig,
        store: Arc<dyn Store>,
        workers: usize,
    ) -> (Scheduler, JobId, JobSpec) {
        let s = Scheduler::new(config, store).unwrap();
        let spec = JobSpec {
            kind: JobKind::Tiled(stylefarm_core::tiling::Tiling {
                exact: true,
                ..Default::default()
            }),
            params: RenderParams {
                optimizer: stylefarm_core::Optimizer::Adam,
                ..tiled_1024().params
            },
            ..tiled_1024()
        };
        let (job, _) = s.submit(spec.clone(), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        s.complete(&l.lease_id, &hash("scale 0")).unwrap();
        let shards = spec
            .scale_tasks(768, 1024, 1, &hash("stitched"), &vec![0; workers], None)
            .unwrap();
        assert_eq!(shards.len(), workers);
        assert!(shards.iter().all(|t| t.shards() == Some(workers as u32)));
        assert!(s
            .finish_stage(&job, 0, &hash("stitched"), Some(shards))
            .unwrap());
        (s, job, spec)
    }

    /// [`Scheduler::sharded_scales`] by job id.
    fn sharded(s: &Scheduler) -> Vec<(JobId, u32, u32)> {
        s.sharded_scales()
            .into_iter()
            .map(|(meta, scale, shards)| (meta.id, scale, shards))
            .collect()
    }

    /// A lease taken up at a restart does not stall while its worker has not called yet (it would cost a
    /// strike and an attempt): it lapses at no cost.
    #[test]
    fn a_lease_taken_up_at_a_restart_does_not_stall_before_its_worker_calls() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            lease: Duration::from_millis(400),
            task_stall: Some(Duration::from_millis(100)),
            ..SchedulerConfig::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        s.lease(&w("w")).unwrap().unwrap();
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        s.serving();
        std::thread::sleep(Duration::from_millis(200));
        s.expire().unwrap();
        assert_eq!(s.get(&job).unwrap().tasks[0].0.state, TaskState::Running);
        std::thread::sleep(Duration::from_millis(300));
        s.expire().unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(
            (view.tasks[0].0.state, view.tasks[0].0.attempts),
            (TaskState::Pending, 0)
        );
        assert!(view.meta.strikes.is_empty(), "{:?}", view.meta.strikes);
    }

    /// A restart does not take a scale's shards' leases up (their group's exchange died with the
    /// coordinator): they go back to the queue at once, the attempts their leases counted given back.
    #[test]
    fn a_restart_queues_running_shards_again_at_no_cost() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let (s, job, _) = sharded_job(store.clone(), 2);
        let free = s.idle(&w("b"), &[]);
        s.lease(&w("a")).unwrap().unwrap();
        s.lease(&w("b")).unwrap().unwrap();
        drop(free);
        drop(s);
        let s = Scheduler::new(SchedulerConfig::default(), store).unwrap();
        let view = s.get(&job).unwrap();
        for (t, _) in &view.tasks[1..] {
            assert_eq!(
                (t.state, t.attempts, t.lease.as_ref()),
                (TaskState::Pending, 0, None)
            );
            // logged, under the number the next attempt takes again
            let logged: Vec<(u32, &str)> = (t.logs.iter())
                .map(|a| (a.attempt, a.outcome.as_str()))
                .collect();
            assert_eq!(
                logged,
                [(
                    1,
                    "stopped by the coordinator's restart (run again; the attempt not counted)"
                )]
            );
        }
        assert_eq!(s.queue_depth(), 2);
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A scale's shards run together: when one has to run again after another succeeded, the succeeded
    /// one runs again too (its result alone cannot be stitched), without an attempt or a strike; so does
    /// one that completes after the failure (their last call made, the failed one's lease lost while this
    /// one uploaded), not left succeeded for the other's new attempt to wait on alone.
    #[test]
    fn a_shard_that_fails_takes_the_succeeded_shards_of_its_scale_back_with_it() {
        for completed_first in [true, false] {
            let (s, job, _) = sharded_job(Arc::new(MemoryStore::default()), 2);
            let _free = s.idle(&w("b"), &[]);
            let a = s.lease(&w("a")).unwrap().unwrap();
            let b = s.lease(&w("b")).unwrap().unwrap();
            if completed_first {
                s.complete(&a.lease_id, &hash("band 0")).unwrap().unwrap();
                assert_eq!(sharded(&s), [(job.clone(), 1, 2)]);
            }
            s.fail(
                &b.lease_id,
                "worker lost mid-upload",
                FailureKind::Retryable,
            )
            .unwrap();
            if !completed_first {
                let done = s.complete(&a.lease_id, &hash("band 0")).unwrap().unwrap();
                assert!(!done.all_tasks_done && !done.stage_work);
            }
            let view = s.get(&job).unwrap();
            let shards: Vec<_> = view.tasks[1..].iter().map(|(t, _)| t).collect();
            assert!(
                shards.iter().all(|t| t.state == TaskState::Pending),
                "{shards:?}"
            );
            assert_eq!(shards[0].result, None);
            assert_eq!(shards[0].error, "run again with shard task 2");
            assert_eq!(view.meta.strikes.get(&w("a")), None);
            assert!(s.jobs_awaiting_step().is_empty());
            assert_eq!(s.counts(), s.counts_walked());
            // shards cancelled with their job were not replaced
            s.cancel(&job).unwrap();
            let view = s.get(&job).unwrap();
            assert!(crate::model::replaced_tasks(view.tasks.iter().map(|(t, _)| t)).is_empty());
        }
    }

    /// A tenant's unfinished jobs' tasks are bounded together (`max_unfinished_tasks`): a submit that would
    /// pass the bound is refused naming it, another tenant's is not, and a job that ended no longer counts.
    #[test]
    fn a_tenant_s_unfinished_tasks_are_bounded_together() {
        let config = SchedulerConfig {
            max_unfinished_tasks: 5,
            ..Default::default()
        };
        let s = Scheduler::new(config, Arc::new(MemoryStore::default())).unwrap();
        let submit = |contents: u8, tenant: &str| {
            s.submit_expanded(batch(contents, 0).expand().unwrap(), tenant, "", false)
        };
        let (first, _) = submit(3, "alice").unwrap();
        submit(2, "alice").unwrap();
        match submit(1, "alice") {
            Err(SchedulerError::Limit(m)) => assert!(
                m.starts_with(
                    "max_unfinished_tasks: this client's queued or running jobs have 5 tasks, this \
                     job 1 more, the limit is 5"
                ),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        submit(5, "bob").unwrap();
        s.cancel(&first).unwrap();
        submit(3, "alice").unwrap();
    }

    /// A failed job runs again: its failed and cancelled tasks are queued with their attempts, errors and
    /// the job's strikes cleared, its succeeded task keeps its result, and a restart finds it so. A job that
    /// has not ended is left as it is; one that succeeded is refused, and so is the tenant's job past its
    /// limit of unfinished jobs.
    #[test]
    fn a_failed_job_runs_again_keeping_its_succeeded_tasks() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            blocklist_after: 1,
            max_unfinished_jobs: 1,
            ..Default::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let spec = JobSpec {
            max_attempts: 1,
            ..batch(3, 0)
        };
        let (job, _) = s.submit(spec, "").unwrap();
        let first = s.lease(&w("a")).unwrap().unwrap();
        s.complete(&first.lease_id, &hash("kept")).unwrap().unwrap();
        assert_eq!(
            s.retry(&job).unwrap().state,
            JobState::Running,
            "a running job"
        );
        let second = s.lease(&w("a")).unwrap().unwrap();
        s.fail(&second.lease_id, "boom", FailureKind::Retryable)
            .unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(view.meta.strikes.get(&w("a")), Some(&1));
        // another job of the tenant takes its one unfinished place
        let (other, _) = s.submit(batch(1, 0), "").unwrap();
        match s.retry(&job) {
            Err(SchedulerError::Limit(m)) => assert!(m.contains("max_unfinished_jobs"), "{m}"),
            other => panic!("{other:?}"),
        }
        s.cancel(&other).unwrap();
        let retried = s.retry(&job).unwrap();
        assert_eq!(
            retried,
            Retried {
                state: JobState::Queued,
                requeued: 2,
                stage_work: false,
            }
        );
        assert_eq!(s.metrics().job_retries.get(), 1);
        assert_eq!(s.counts(), s.counts_walked());
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Queued);
        assert!(view.meta.error.is_empty() && view.meta.strikes.is_empty());
        assert_eq!(view.meta.finished_ms, 0);
        let tasks: Vec<&TaskRecord> = view.tasks.iter().map(|(t, _)| t).collect();
        assert_eq!(tasks[0].state, TaskState::Succeeded);
        assert_eq!(tasks[0].result, Some(hash("kept")));
        for t in &tasks[1..] {
            assert_eq!(
                (t.state, t.attempts, t.error.as_str()),
                (TaskState::Pending, 0, "")
            );
        }
        // worker a, blocklisted before, takes the two tasks again; the job succeeds with them
        for _ in 0..2 {
            let l = s.lease(&w("a")).unwrap().unwrap();
            assert_ne!(l.task.id.index, 0);
            s.complete(&l.lease_id, &hash("again")).unwrap().unwrap();
        }
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Succeeded);
        // the failed task's log numbers its attempt after the retry (a restart between) on from its
        // first, though its attempts started over
        let log = s.task_log(&job, second.task.id.index).unwrap();
        let numbered: Vec<(u32, &str)> = log
            .iter()
            .map(|a| (a.attempt, a.outcome.as_str()))
            .collect();
        assert_eq!(numbered, [(1, "failed: boom"), (2, "succeeded")]);
        let view = s.get(&job).unwrap();
        assert_eq!(view.tasks[second.task.id.index as usize].0.attempts, 1);
        match s.retry(&job) {
            Err(SchedulerError::Precondition(m)) => assert!(m.contains("succeeded"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A keep-going batch's task that fails for good fails alone: the job runs on, its other tasks
    /// leased and completed; `retry` while it runs queues only the failed task again (the job keeps its
    /// state); once none is left to run, the job fails naming its failed tasks, their number and the
    /// results kept, and a restart reads it so. A batch without keep-going fails with its first.
    #[test]
    fn a_keep_going_batch_s_failed_task_fails_alone() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            ..Default::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let (job, _) = s
            .submit(
                JobSpec {
                    max_attempts: 1,
                    keep_going: true,
                    ..batch(4, 0)
                },
                "",
            )
            .unwrap();
        let state = |s: &Scheduler| s.get(&job).unwrap().meta.state;
        let task_states = |s: &Scheduler| -> Vec<TaskState> {
            s.get(&job)
                .unwrap()
                .tasks
                .iter()
                .map(|(t, _)| t.state)
                .collect()
        };
        let lease = |s: &Scheduler, index| {
            let l = s.lease(&w("a")).unwrap().unwrap();
            assert_eq!(l.task.id.index, index);
            l.lease_id
        };
        s.fail(&lease(&s, 0), "boom", FailureKind::Retryable)
            .unwrap();
        assert_eq!(state(&s), JobState::Running);
        s.complete(&lease(&s, 1), &hash("one")).unwrap().unwrap();
        // run again while the job runs: the failed task only, at its place in the queue
        let retried = s.retry(&job).unwrap();
        assert_eq!(
            retried,
            Retried {
                state: JobState::Running,
                requeued: 1,
                stage_work: false,
            }
        );
        assert_eq!(
            task_states(&s),
            [
                TaskState::Pending,
                TaskState::Succeeded,
                TaskState::Pending,
                TaskState::Pending
            ]
        );
        s.fail(&lease(&s, 0), "boom again", FailureKind::Retryable)
            .unwrap();
        s.fail(&lease(&s, 2), "bad input", FailureKind::Permanent)
            .unwrap();
        assert_eq!(state(&s), JobState::Running);
        assert_eq!(s.counts(), s.counts_walked());
        s.complete(&lease(&s, 3), &hash("three")).unwrap().unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(
            view.meta.error,
            "2 of 4 tasks failed (2 rendered, their results kept; `retry` runs the failed ones again): \
             task 0 (content 1 x style 1): boom again; task 2 (content 3 x style 1): bad input"
        );
        assert_eq!(s.counts(), s.counts_walked());
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        assert_eq!(
            task_states(&s),
            [
                TaskState::Failed,
                TaskState::Succeeded,
                TaskState::Failed,
                TaskState::Succeeded
            ]
        );
        assert_eq!(s.get(&job).unwrap().tasks[3].0.result, Some(hash("three")));
        // the last task to end may be the failed one; more than three are counted, not named
        let (many, _) = s
            .submit(
                JobSpec {
                    max_attempts: 1,
                    keep_going: true,
                    ..batch(5, 0)
                },
                "",
            )
            .unwrap();
        for _ in 0..5 {
            let l = s.lease(&w("a")).unwrap().unwrap();
            s.fail(&l.lease_id, "x", FailureKind::Permanent).unwrap();
        }
        let error = s.get(&many).unwrap().meta.error;
        assert!(
            error.starts_with("5 of 5 tasks failed (0 rendered")
                && error.ends_with("task 2 (content 3 x style 1): x; and 2 more"),
            "{error}"
        );
        // without keep-going, the first task failed for good fails the job and cancels the others
        let (fail_fast, _) = s
            .submit(
                JobSpec {
                    max_attempts: 1,
                    ..batch(2, 0)
                },
                "",
            )
            .unwrap();
        let l = s.lease(&w("a")).unwrap().unwrap();
        s.fail(&l.lease_id, "boom", FailureKind::Permanent).unwrap();
        let view = s.get(&fail_fast).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(view.tasks[1].0.state, TaskState::Cancelled);
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A keep-going batch's tasks are cancelled alone, queued or running (the running one's lease ends: its
    /// heartbeat answers cancel, its result and failure are discarded), and the job goes on; a task named
    /// twice or that has ended counts once or not at all; the strikes a task cancelled alone put on its
    /// workers are taken back. `retry` of named tasks runs only those, each
    /// having failed or been cancelled. Once none is left to run, the job ends cancelled when nothing
    /// failed, failed when a task did, naming the counts, and a restart reads it so; `retry` of the whole
    /// job runs the cancelled task too. Refused naming `tasks` for an index the job has none at, and for a
    /// job that is not keep-going.
    #[test]
    fn a_keep_going_batch_s_tasks_are_cancelled_and_run_again_alone() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            ..Default::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let keep_going = |n| JobSpec {
            max_attempts: 1,
            keep_going: true,
            ..batch(n, 0)
        };
        let (job, _) = s.submit(keep_going(4), "").unwrap();
        let task_states = |s: &Scheduler, job: &JobId| -> Vec<TaskState> {
            (s.get(job).unwrap().tasks.iter())
                .map(|(t, _)| t.state)
                .collect()
        };
        let lease = |s: &Scheduler, index| {
            let l = s.lease(&w("a")).unwrap().unwrap();
            assert_eq!(l.task.id.index, index);
            l.lease_id
        };
        let running = lease(&s, 0);
        assert_eq!(
            s.cancel_tasks(&job, &[1, 0, 1]).unwrap(),
            (JobState::Running, 2)
        );
        use TaskState::{Cancelled, Pending, Succeeded};
        assert_eq!(
            task_states(&s, &job),
            [Cancelled, Cancelled, Pending, Pending]
        );
        assert!(s.heartbeat(&running, &w("a"), None, None).unwrap().cancel);
        assert!(s.complete(&running, &hash("late")).unwrap().is_none());
        s.fail(&running, "stopped", FailureKind::Retryable).unwrap();
        assert_eq!(
            task_states(&s, &job),
            [Cancelled, Cancelled, Pending, Pending]
        );
        assert_eq!(s.cancel_tasks(&job, &[0]).unwrap(), (JobState::Running, 0));
        assert_eq!(s.counts(), s.counts_walked());
        let refused = |e: SchedulerError| e.to_string();
        let e = refused(s.cancel_tasks(&job, &[4]).unwrap_err());
        assert!(
            e.starts_with("tasks: job ")
                && e.ends_with("no task 4: its 4 task(s) are numbered from 0"),
            "{e}"
        );
        let e = refused(s.retry_tasks(&job, &[2]).unwrap_err());
        assert!(
            e.contains("task 2 of job")
                && e.ends_with(" (pending): only a failed or cancelled task runs again"),
            "{e}"
        );
        // the named one runs again, at its place in the queue; the other stays cancelled
        let retried = s.retry_tasks(&job, &[1]).unwrap();
        assert_eq!((retried.state, retried.requeued), (JobState::Running, 1));
        assert_eq!(
            task_states(&s, &job),
            [Cancelled, Pending, Pending, Pending]
        );
        for index in 1..4 {
            s.complete(&lease(&s, index), &hash("r")).unwrap().unwrap();
        }
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Cancelled);
        assert_eq!(
            view.meta.error,
            "1 of 4 tasks cancelled (3 rendered, their results kept; `retry` runs the cancelled ones again): \
             task(s) 0"
        );
        assert_eq!(s.counts(), s.counts_walked());
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Cancelled);
        assert_eq!(
            task_states(&s, &job),
            [Cancelled, Succeeded, Succeeded, Succeeded]
        );
        // the whole job again: its cancelled task
        let retried = s.retry(&job).unwrap();
        assert_eq!((retried.state, retried.requeued), (JobState::Queued, 1));
        s.complete(&lease(&s, 0), &hash("r")).unwrap().unwrap();
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Succeeded);
        // a failed task and a cancelled one: the job fails, counting both
        let (mixed, _) = s.submit(keep_going(3), "").unwrap();
        s.fail(&lease(&s, 0), "boom", FailureKind::Permanent)
            .unwrap();
        s.cancel_tasks(&mixed, &[2]).unwrap();
        s.complete(&lease(&s, 1), &hash("r")).unwrap().unwrap();
        let view = s.get(&mixed).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert!(
            view.meta
                .error
                .starts_with("1 of 3 tasks failed, 1 cancelled (1 rendered"),
            "{}",
            view.meta.error
        );
        // cancelling the last tasks to run ends the job at once
        let (last, _) = s.submit(keep_going(2), "").unwrap();
        s.complete(&lease(&s, 0), &hash("r")).unwrap().unwrap();
        assert_eq!(
            s.cancel_tasks(&last, &[1]).unwrap(),
            (JobState::Cancelled, 1)
        );
        // a job that is not keep-going: its tasks end, and run again, together
        let (together, _) = s.submit(batch(2, 0), "").unwrap();
        let e = refused(s.cancel_tasks(&together, &[0]).unwrap_err());
        assert!(e.contains("is not keep-going"), "{e}");
        s.cancel(&together).unwrap();
        let e = refused(s.retry_tasks(&together, &[0]).unwrap_err());
        assert!(e.contains("is not keep-going"), "{e}");
        assert_eq!(task_states(&s, &together), [Cancelled, Cancelled]);
        // the strikes a task put on its workers are taken back when it is cancelled alone
        let (struck, _) = s
            .submit(
                JobSpec {
                    max_attempts: 3,
                    ..keep_going(2)
                },
                "",
            )
            .unwrap();
        s.fail(&lease(&s, 0), "flaky", FailureKind::Retryable)
            .unwrap();
        let strikes = |s: &Scheduler| s.get(&struck).unwrap().meta.strikes;
        assert_eq!(strikes(&s).get(&w("a")), Some(&1));
        assert_eq!(
            s.cancel_tasks(&struck, &[0]).unwrap(),
            (JobState::Running, 1)
        );
        assert!(strikes(&s).is_empty());
        // a task run again alone leaves the strikes that another task put on the job's workers
        s.fail(&lease(&s, 1), "flaky", FailureKind::Retryable)
            .unwrap();
        assert_eq!(s.retry_tasks(&struck, &[0]).unwrap().requeued, 1);
        assert_eq!(strikes(&s).get(&w("a")), Some(&1));
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A keep-going sweep renders around a failed variant: once none is left to run, the job waits for its
    /// contact sheet whether its last task to end rendered or failed (the failure leaves it due:
    /// [`Scheduler::take_stage_due`]), and recording the sheet fails the job, naming the failed variant,
    /// with the sheet as its result. `retry` runs only that variant and drops the sheet; the next sheet
    /// ends the job succeeded; while a sheet is being made, `retry` is refused. One whose every variant
    /// failed has no sheet to wait for: it fails.
    #[test]
    fn a_keep_going_sweep_makes_its_sheet_around_a_failed_variant() {
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            ..Default::default()
        });
        let sweep = JobSpec {
            kind: JobKind::Sweep(stylefarm_core::job::parse_sweep("style_weight=1,2,3").unwrap()),
            max_attempts: 1,
            keep_going: true,
            ..batch(1, 0)
        };
        let (job, _) = s.submit(sweep.clone(), "").unwrap();
        let lease = |index| {
            let l = s.lease(&w("a")).unwrap().unwrap();
            assert_eq!(l.task.id.index, index);
            l.lease_id
        };
        let (l0, l1, l2) = (lease(0), lease(1), lease(2));
        let done = s.complete(&l0, &hash("zero")).unwrap().unwrap();
        assert!(!done.stage_work && !s.awaits_step(&job));
        s.fail(&l1, "bad variant", FailureKind::Permanent).unwrap();
        assert!(s.take_stage_due().is_empty(), "a variant is still running");
        let done = s.complete(&l2, &hash("two")).unwrap().unwrap();
        assert!(done.stage_work && done.all_tasks_done);
        assert!(s.awaits_step(&job));
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Running);
        assert!(s.finish_stage(&job, 0, &hash("sheet"), None).unwrap());
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(view.meta.result, Some(hash("sheet")));
        assert!(
            view.meta
                .error
                .starts_with("1 of 3 tasks failed (2 rendered")
                && view.meta.error.ends_with("bad variant"),
            "{}",
            view.meta.error
        );
        assert_eq!(s.counts(), s.counts_walked());
        // retry: the failed variant only, and a new sheet after it
        let retried = s.retry(&job).unwrap();
        assert_eq!((retried.state, retried.requeued), (JobState::Queued, 1));
        let view = s.get(&job).unwrap();
        assert!(view.meta.result.is_none() && view.meta.stage_results.is_empty());
        // this time the failure is the last to end: the job is due for its sheet, and not run again
        // while that is being made (a variant rendered meanwhile would show failed on it)
        s.fail(&lease(1), "bad again", FailureKind::Permanent)
            .unwrap();
        assert_eq!(s.take_stage_due(), std::slice::from_ref(&job));
        assert!(s.awaits_step(&job));
        let refused = s.retry(&job).unwrap_err().to_string();
        assert!(refused.contains("contact sheet is being made"), "{refused}");
        assert!(s.finish_stage(&job, 0, &hash("sheet 1b"), None).unwrap());
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Failed);
        s.retry(&job).unwrap();
        s.complete(&lease(1), &hash("one")).unwrap().unwrap();
        assert!(s.finish_stage(&job, 0, &hash("sheet 2"), None).unwrap());
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Succeeded);
        assert_eq!(view.meta.result, Some(hash("sheet 2")));
        // every variant failed: no sheet, the job fails
        let (all_failed, _) = s.submit(sweep, "").unwrap();
        for index in 0..3 {
            s.fail(&lease(index), "bad", FailureKind::Permanent)
                .unwrap();
        }
        assert!(s.take_stage_due().is_empty() && !s.awaits_step(&all_failed));
        let view = s.get(&all_failed).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert!(view.meta.result.is_none());
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// With notifications on, a job's end is marked to announce until it is announced, the mark kept by
    /// the store (a restart announces it then); an end announced, or from before notifications were on,
    /// is not; an announcement of an earlier end of a job run again since changes nothing.
    #[test]
    fn a_job_s_end_is_marked_to_announce_until_it_is_announced() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let quiet = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let (before, _) = quiet.submit(batch(1, 0), "").unwrap();
        quiet.cancel(&before).unwrap();
        assert!(quiet.unannounced().is_empty());
        drop(quiet);
        let config = SchedulerConfig {
            announce_ends: true,
            ..Default::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let (first, _) = s.submit(batch(1, 0), "").unwrap();
        let (second, _) = s.submit(batch(1, 0), "").unwrap();
        s.cancel(&first).unwrap();
        let l = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(l.task.id.job, second);
        s.complete(&l.lease_id, &hash("r")).unwrap().unwrap();
        assert_eq!(s.unannounced(), [first.clone(), second.clone()]);
        let ended = s.get(&second).unwrap().meta.finished_ms;
        s.announced(&second, ended);
        assert_eq!(s.unannounced(), std::slice::from_ref(&first));
        // run again: the earlier end's announcement is not this one's
        let ended = s.get(&first).unwrap().meta.finished_ms;
        s.retry(&first).unwrap();
        s.announced(&first, ended);
        assert!(s.unannounced().is_empty(), "running again");
        s.cancel(&first).unwrap();
        assert_eq!(s.unannounced(), std::slice::from_ref(&first));
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        assert_eq!(s.unannounced(), std::slice::from_ref(&first));
    }

    /// A keep-going sweep whose last variant to run is cancelled alone is due for its contact sheet, of
    /// those that rendered, and the sheet ends it cancelled; with every variant cancelled, it ends at once.
    #[test]
    fn a_keep_going_sweep_s_cancelled_variant_leaves_its_sheet_to_the_others() {
        let s = scheduler(SchedulerConfig::default());
        let sweep = JobSpec {
            kind: JobKind::Sweep(stylefarm_core::job::parse_sweep("style_weight=1,2,3").unwrap()),
            keep_going: true,
            ..batch(1, 0)
        };
        let (job, _) = s.submit(sweep.clone(), "").unwrap();
        for index in 0..2 {
            let l = s.lease(&w("a")).unwrap().unwrap();
            assert_eq!(l.task.id.index, index);
            s.complete(&l.lease_id, &hash("r")).unwrap().unwrap();
        }
        assert_eq!(s.cancel_tasks(&job, &[2]).unwrap(), (JobState::Running, 1));
        assert_eq!(s.take_stage_due(), std::slice::from_ref(&job));
        assert!(s.finish_stage(&job, 0, &hash("sheet"), None).unwrap());
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Cancelled);
        assert_eq!(view.meta.result, Some(hash("sheet")));
        assert!(
            view.meta
                .error
                .starts_with("1 of 3 tasks cancelled (2 rendered"),
            "{}",
            view.meta.error
        );
        let (none, _) = s.submit(sweep, "").unwrap();
        assert_eq!(
            s.cancel_tasks(&none, &[0, 1, 2]).unwrap(),
            (JobState::Cancelled, 3)
        );
        assert!(s.take_stage_due().is_empty());
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// In a keep-going batch, a task that fails everywhere (out of attempts on retryable errors) takes
    /// back the strikes it put on its workers: worker a, alone, is not blocklisted by one bad task and
    /// renders the others; a task that a retry then renders elsewhere leaves its strike standing.
    #[test]
    fn a_keep_going_task_failed_everywhere_takes_its_strikes_back() {
        let s = Scheduler::new(
            SchedulerConfig {
                backoff: Duration::ZERO,
                blocklist_after: 3,
                ..Default::default()
            },
            Arc::new(MemoryStore::default()),
        )
        .unwrap();
        let spec = JobSpec {
            max_attempts: 3,
            keep_going: true,
            ..batch(3, 0)
        };
        let (job, _) = s.submit(spec, "").unwrap();
        let strikes = |s: &Scheduler| s.get(&job).unwrap().meta.strikes;
        for attempt in 1..=3 {
            let l = s.lease(&w("a")).unwrap().unwrap();
            assert_eq!(l.task.id.index, 0);
            s.fail(&l.lease_id, "engine panicked", FailureKind::Retryable)
                .unwrap();
            let expected = if attempt < 3 { attempt } else { 0 };
            assert_eq!(strikes(&s).get(&w("a")).copied().unwrap_or(0), expected);
        }
        assert_eq!(s.get(&job).unwrap().tasks[0].0.state, TaskState::Failed);
        assert_eq!(s.metrics().blocklisted.get(), 0);
        // task 1 fails once on a, then renders on b: a's strike stands
        let l = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(l.task.id.index, 1);
        s.fail(&l.lease_id, "lost", FailureKind::Retryable).unwrap();
        let l = s.lease(&w("b")).unwrap().unwrap();
        assert_eq!(l.task.id.index, 1);
        s.complete(&l.lease_id, &hash("one")).unwrap().unwrap();
        assert!(s.get(&job).unwrap().tasks[1].0.struck.is_empty());
        let l = s.lease(&w("a")).unwrap().unwrap();
        s.complete(&l.lease_id, &hash("two")).unwrap().unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(view.meta.strikes.get(&w("a")), Some(&1));
        assert!(
            view.meta.error.starts_with("1 of 3 tasks failed"),
            "{}",
            view.meta.error
        );
    }

    /// A keep-going job that no live worker is left for fails its queued tasks alone rather than the whole
    /// job: a batch fails naming them, its rendered task kept, `retry --task` of one fails it again (its
    /// worker still blocklisted), and `retry` runs the failed ones; a sweep
    /// that rendered a variant is due for its contact sheet, which ends it.
    #[test]
    fn a_keep_going_job_with_no_worker_left_fails_its_queued_tasks_and_keeps_what_rendered() {
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            blocklist_after: 2,
            no_worker_left: Duration::ZERO,
            ..Default::default()
        });
        let live = untagged(&["a"]);
        // the first task renders, the second fails twice on a: a is blocklisted, the only worker
        let strand = |job: &JobId| {
            let l = s.lease(&w("a")).unwrap().unwrap();
            s.complete(&l.lease_id, &hash("rendered")).unwrap().unwrap();
            for _ in 0..2 {
                let l = s.lease(&w("a")).unwrap().unwrap();
                assert_eq!(&l.task.id.job, job);
                s.fail(&l.lease_id, "flaky", FailureKind::Retryable)
                    .unwrap();
            }
            assert!(s.lease(&w("a")).unwrap().is_none(), "blocklisted");
        };
        let (batch_job, _) = s
            .submit(
                JobSpec {
                    max_attempts: 5,
                    keep_going: true,
                    ..batch(3, 0)
                },
                "",
            )
            .unwrap();
        strand(&batch_job);
        assert_eq!(s.fail_stranded(&live).unwrap(), vec![batch_job.clone()]);
        let view = s.get(&batch_job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert!(
            view.meta
                .error
                .starts_with("2 of 3 tasks failed (1 rendered")
                && view.meta.error.contains("no worker left to run it"),
            "{}",
            view.meta.error
        );
        let states: Vec<TaskState> = view.tasks.iter().map(|(t, _)| t.state).collect();
        assert_eq!(
            states,
            [TaskState::Succeeded, TaskState::Failed, TaskState::Failed]
        );
        assert_eq!(s.counts(), s.counts_walked());
        // a task run again alone: a is still blocklisted, so it fails again for want of a worker rather
        // than waiting forever
        assert_eq!(s.retry_tasks(&batch_job, &[1]).unwrap().requeued, 1);
        assert_eq!(s.get(&batch_job).unwrap().meta.state, JobState::Queued);
        assert_eq!(s.fail_stranded(&live).unwrap(), vec![batch_job.clone()]);
        assert_eq!(s.get(&batch_job).unwrap().meta.state, JobState::Failed);
        // retry: the blocklist starts over and the failed tasks run again
        assert_eq!(s.retry(&batch_job).unwrap().requeued, 2);
        assert!(s.lease(&w("a")).unwrap().is_some());
        s.cancel(&batch_job).unwrap();

        let (sweep, _) = s
            .submit(
                JobSpec {
                    kind: JobKind::Sweep(
                        stylefarm_core::job::parse_sweep("style_weight=1,2,3").unwrap(),
                    ),
                    max_attempts: 5,
                    keep_going: true,
                    ..batch(1, 0)
                },
                "",
            )
            .unwrap();
        strand(&sweep);
        assert!(s.fail_stranded(&live).unwrap().is_empty(), "not failed yet");
        assert_eq!(s.take_stage_due(), std::slice::from_ref(&sweep));
        assert!(s.awaits_step(&sweep));
        assert!(s.finish_stage(&sweep, 0, &hash("sheet"), None).unwrap());
        let view = s.get(&sweep).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert_eq!(view.meta.result, Some(hash("sheet")));
        assert!(
            view.meta
                .error
                .starts_with("2 of 3 tasks failed (1 rendered"),
            "{}",
            view.meta.error
        );
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// At equal priority, the tenant with the fewest tasks running goes first, then submission order: a
    /// tenant's batch submitted behind another's gets every other free worker; once it has nothing queued
    /// the other's tasks go in order; a higher priority goes first whatever its tenant runs.
    #[test]
    fn tenants_share_the_farm_at_equal_priority() {
        let s =
            Scheduler::new(SchedulerConfig::default(), Arc::new(MemoryStore::default())).unwrap();
        let submit = |tenant: &str, spec: JobSpec| submit_as(&s, tenant, spec);
        let big = submit("studio", batch(6, 0));
        let small = submit("indie", batch(2, 0));
        let mut leased = Vec::new();
        for i in 0..5 {
            let lease = s.lease(&w(&format!("w{i}"))).unwrap().unwrap();
            leased.push((lease.task.id.job, lease.task.id.index));
        }
        // studio first (none running either side, submitted first), indie (0 running against 1), studio
        // (1 against 1: submission order), indie (1 against 2), then studio's alone
        assert_eq!(
            leased,
            [
                (big.clone(), 0),
                (small.clone(), 0),
                (big.clone(), 1),
                (small.clone(), 1),
                (big.clone(), 2)
            ]
        );
        // studio runs 3 tasks against indie's 2: its higher priority goes first all the same
        let later = submit("indie", batch(1, 0));
        let urgent = submit("studio", batch(1, 5));
        assert_eq!(s.lease(&w("w5")).unwrap().unwrap().task.id.job, urgent);
        assert_eq!(s.lease(&w("w6")).unwrap().unwrap().task.id.job, later);
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A tenant of share 3 gets three tasks running for each of a tenant of share 1 (not named: the
    /// default share), whichever submitted first; once it has nothing queued, the other takes the rest.
    #[test]
    fn tenant_shares_weight_the_fair_share() {
        let config = SchedulerConfig {
            tenant_shares: parse_tenant_shares(&["studio=3".to_string()]).unwrap(),
            ..SchedulerConfig::default()
        };
        let s = Scheduler::new(config, Arc::new(MemoryStore::default())).unwrap();
        let submit = |tenant: &str, spec: JobSpec| submit_as(&s, tenant, spec);
        let indie = submit("indie", batch(10, 0));
        let studio = submit("studio", batch(7, 0));
        let mut leased = Vec::new();
        for i in 0..8 {
            leased.push(s.lease(&w(&format!("w{i}"))).unwrap().unwrap().task.id.job);
        }
        let count = |job: &JobId| leased.iter().filter(|j| *j == job).count();
        assert_eq!((count(&studio), count(&indie)), (6, 2), "{leased:?}");
        // indie first (none running either side, submitted first), then studio until it runs 3 for indie's 1
        assert_eq!(
            leased[..5],
            [&indie, &studio, &studio, &studio, &indie].map(Clone::clone)
        );
        // 6 for 3 against 2 for 1 is even: indie (submitted first), then studio's last queued task, then
        // indie's alone
        let more: Vec<JobId> = (8..11)
            .map(|i| s.lease(&w(&format!("w{i}"))).unwrap().unwrap().task.id.job)
            .collect();
        assert_eq!(more, [indie.clone(), studio.clone(), indie.clone()]);
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// Tenant shares: `TENANT=SHARE`, a share from 1 to MAX_TENANT_SHARE, each tenant once; an error
    /// names the entry.
    #[test]
    fn tenant_shares_are_read_and_bad_ones_named() {
        let read = |entries: &[&str]| {
            parse_tenant_shares(&entries.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(
            read(&["studio=3", "indie.b=1"]).unwrap(),
            HashMap::from([("studio".to_string(), 3), ("indie.b".to_string(), 1)])
        );
        for (bad, says) in [
            ("studio", "expected TENANT=SHARE"),
            ("=3", "the tenant must be"),
            ("a b=3", "the tenant must be"),
            ("studio=0", "from 1 to 1000"),
            ("studio=1001", "from 1 to 1000"),
            ("studio=-1", "from 1 to 1000"),
            ("studio=x", "from 1 to 1000"),
        ] {
            let e = read(&[bad]).unwrap_err();
            assert!(e.contains(says) && e.contains(bad), "{bad}: {e}");
        }
        let e = read(&["studio=3", "studio=2"]).unwrap_err();
        assert!(e.contains("'studio' is given twice"), "{e}");
    }

    /// A cancelled job runs again only once its running tasks have stopped; a cancelled exact-mode scale
    /// runs again with the shard that had succeeded (the shards of a scale run together), and a job that
    /// failed in its stage work queues nothing and has that work run again.
    #[test]
    fn a_cancelled_job_runs_again_once_stopped_with_its_scale_s_shards() {
        let (s, job, _) = sharded_job(Arc::new(MemoryStore::default()), 2);
        let _free = s.idle(&w("b"), &[]);
        let a = s.lease(&w("a")).unwrap().unwrap();
        let b = s.lease(&w("b")).unwrap().unwrap();
        s.complete(&a.lease_id, &hash("band 0")).unwrap().unwrap();
        s.cancel(&job).unwrap();
        match s.retry(&job) {
            Err(SchedulerError::Precondition(m)) => assert!(m.contains("being stopped"), "{m}"),
            other => panic!("{other:?}"),
        }
        // the worker stops: its result is discarded
        assert_eq!(s.complete(&b.lease_id, &hash("band 1")).unwrap(), None);
        let retried = s.retry(&job).unwrap();
        assert_eq!((retried.state, retried.requeued), (JobState::Queued, 2));
        let view = s.get(&job).unwrap();
        assert_eq!(
            view.tasks[0].0.result,
            Some(hash("scale 0")),
            "the first scale is kept"
        );
        assert!(view.tasks[1..]
            .iter()
            .all(|(t, _)| t.state == TaskState::Pending));
        assert_eq!(sharded(&s), [(job.clone(), 1, 2)]);
        let a = s.lease(&w("a")).unwrap().unwrap();
        let b = s.lease(&w("b")).unwrap().unwrap();
        s.complete(&a.lease_id, &hash("band 0")).unwrap().unwrap();
        s.complete(&b.lease_id, &hash("band 1")).unwrap().unwrap();
        assert_eq!(s.jobs_awaiting_step(), std::slice::from_ref(&job));
        // the stitch fails: running the job again runs its stitch again
        s.fail_job(&job, "stitching scale 1: out of disk").unwrap();
        assert!(s.jobs_awaiting_step().is_empty());
        let retried = s.retry(&job).unwrap();
        assert_eq!(
            retried,
            Retried {
                state: JobState::Running,
                requeued: 0,
                stage_work: true,
            }
        );
        assert_eq!(s.jobs_awaiting_step(), std::slice::from_ref(&job));
        assert!(s.finish_stage(&job, 1, &hash("final"), None).unwrap());
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Succeeded);
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A stored job whose task records are not its tasks in order (a corrupt or hostile store) is refused
    /// at load, naming the job, where it would panic at the first lease.
    #[test]
    fn a_stored_task_out_of_place_is_refused_at_load() {
        let store = Arc::new(MemoryStore::default());
        let (meta, mut tasks) = crate::store::tests::job("job-1", 1);
        tasks[1].index = 7;
        store.insert_job(&meta, &tasks).unwrap();
        let error = Scheduler::new(SchedulerConfig::default(), store)
            .err()
            .expect("refused");
        assert!(
            error
                .to_string()
                .contains("job job-1: its task record 1 of 2 says index 7"),
            "{error}"
        );
    }

    /// Each shard's attempts count its own failures. A shard that fails with its group because another
    /// shard's worker was lost keeps its attempt: with 3 attempts a task, a scale whose workers are lost
    /// three times, alternately under each shard, still runs (before, the third loss failed the job). A
    /// group failure that no counted failure explains (a group that did not form) is counted.
    #[test]
    fn a_shard_that_fails_with_its_group_keeps_its_attempt() {
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            ..Default::default()
        };
        let (s, job, _) = sharded_job_with(config, Arc::new(MemoryStore::default()), 2);
        let (a, b) = (w("a"), w("b"));
        let both = || {
            let _free = s.idle(&b, &[]);
            let first = s.lease(&a).unwrap().unwrap();
            let second = s.lease(&b).unwrap().unwrap();
            (first, second)
        };
        let attempts = || -> Vec<u32> {
            let view = s.get(&job).unwrap();
            view.tasks[1..].iter().map(|(t, _)| t.attempts).collect()
        };
        for round in 0..3 {
            let (first, second) = both();
            let (lost, with_it) = if round % 2 == 0 {
                (first, second)
            } else {
                (second, first)
            };
            s.fail(
                &lost.lease_id,
                "lease expired (worker lost)",
                FailureKind::Retryable,
            )
            .unwrap();
            s.fail(
                &with_it.lease_id,
                "the group starts again",
                FailureKind::Group,
            )
            .unwrap();
        }
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Running);
        assert_eq!(attempts(), [2, 1], "shard 1 was lost twice, shard 2 once");
        // no counted failure behind it: a group failure is counted (the third attempt of shard 1: the job
        // fails)
        let (first, _) = both();
        assert_eq!(attempts(), [3, 2]);
        s.fail(
            &first.lease_id,
            "1 of 2 shards joined within 600 s",
            FailureKind::Group,
        )
        .unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Failed);
        assert!(
            view.meta.error.contains("after 3 attempt(s): 1 of 2"),
            "{}",
            view.meta.error
        );
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A scale's shards start together, on as many free workers, and once one runs the others come before
    /// any other task: else two scales started at once on a farm of two workers could each hold one worker
    /// and wait for the other's, and neither would end.
    #[test]
    fn a_scale_s_shards_start_together_and_before_anything_else() {
        let (s, job, _) = sharded_job(Arc::new(MemoryStore::default()), 2);
        let (behind, _) = s.submit(batch(1, 0), "").unwrap();
        // one worker free: it waits for a second, taking neither a shard nor the task queued behind them
        assert!(s.lease(&w("a")).unwrap().is_none());
        let waiting = Waiting {
            live: untagged(&["a", "b"]),
            ..Default::default()
        };
        assert_eq!(
            waiting.of(&s.get(&job).unwrap()),
            "its 2 shards start together, when 2 workers that may take them are free at once (planned \
             again for fewer if fewer are left)"
        );
        // a free worker counts once by its name, and not when it may not take the job's tasks
        let _a = [s.idle(&w("a#2"), &[]), s.idle(&w("a"), &[])];
        assert!(s.lease(&w("a")).unwrap().is_none());
        {
            let mut st = s.state.lock().unwrap();
            let strikes = s.config.blocklist_after;
            let job = st.jobs.get_mut(&job).unwrap();
            job.meta.strikes.insert(w("b"), strikes);
        }
        let b = s.idle(&w("b"), &[]);
        assert!(s.lease(&w("a")).unwrap().is_none());
        let c = s.idle(&w("c"), &[]);
        let first = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(first.task.spec.shards(), Some(2));
        drop((b, c));
        // a higher priority job submitted now comes after the other shard of the scale that started
        let (urgent, _) = s.submit(batch(1, 9), "").unwrap();
        let second = s.lease(&w("c")).unwrap().unwrap();
        assert_eq!(
            (second.task.id.job.clone(), second.task.spec.shards()),
            (job.clone(), Some(2))
        );
        assert_eq!(s.lease(&w("b")).unwrap().unwrap().task.id.job, urgent);
        // shards waiting out a retry's backoff: a free worker takes the task behind them meanwhile
        s.fail(&second.lease_id, "lost", FailureKind::Retryable)
            .unwrap();
        s.fail(&first.lease_id, "its shard failed", FailureKind::Group)
            .unwrap();
        let _d = s.idle(&w("d"), &[]);
        assert_eq!(s.lease(&w("a")).unwrap().unwrap().task.id.job, behind);
        assert!(s.lease(&w("d")).unwrap().is_none());
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A job the worker may not take at all (paused, or asking for a tag it lacks) is passed in one step:
    /// the task taken is the first of the next job, which a tagged worker takes after the tagged job.
    #[test]
    fn a_job_the_worker_may_not_take_is_passed_whole() {
        let s =
            Scheduler::new(SchedulerConfig::default(), Arc::new(MemoryStore::default())).unwrap();
        let (paused, _) = s.submit(batch(3, 0), "").unwrap();
        s.set_paused(&paused, true).unwrap();
        let gpu = vec!["gpu".to_string()];
        let (tagged, _) = s
            .submit(
                JobSpec {
                    worker_tags: gpu.clone(),
                    ..batch(2, 0)
                },
                "",
            )
            .unwrap();
        let (next, _) = s.submit(batch(2, 0), "").unwrap();
        let l = s.lease(&w("cpu")).unwrap().unwrap();
        assert_eq!((l.task.id.job, l.task.id.index), (next.clone(), 0));
        let l = s.lease_tagged(&w("gpu"), &gpu).unwrap().unwrap();
        assert_eq!((l.task.id.job, l.task.id.index), (tagged, 0));
        s.set_paused(&paused, false).unwrap();
        let l = s.lease(&w("cpu")).unwrap().unwrap();
        assert_eq!((l.task.id.job, l.task.id.index), (paused, 0));
    }

    /// Another tenant's tasks queued behind a scale's shards wait with them, however few that tenant runs:
    /// one free worker takes nothing while the shards wait for a second, and the two free workers take
    /// the shards before the other tenant's task, though the shards' tenant runs a task already.
    #[test]
    fn another_tenant_s_tasks_wait_behind_a_scale_s_shards() {
        let (s, job, _) = sharded_job(Arc::new(MemoryStore::default()), 2);
        let (running, _) = s.submit(batch(1, 9), "").unwrap();
        assert_eq!(s.lease(&w("x")).unwrap().unwrap().task.id.job, running);
        let (indie, _) = s
            .submit_expanded(batch(2, 0).expand().unwrap(), "indie", "", false)
            .unwrap();
        assert!(s.lease(&w("a")).unwrap().is_none());
        let _b = s.idle(&w("b"), &[]);
        for worker in ["a", "b"] {
            let lease = s.lease(&w(worker)).unwrap().unwrap();
            assert_eq!(
                (lease.task.id.job, lease.task.spec.shards()),
                (job.clone(), Some(2))
            );
        }
        assert_eq!(s.lease(&w("c")).unwrap().unwrap().task.id.job, indie);
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// Workers asking for a task count as free while they wait ([`Scheduler::lease_wait`]): two of them
    /// take a scale's two shards, where one alone waits in vain, and once it stops waiting it counts no
    /// more.
    #[test]
    fn workers_waiting_for_a_task_take_a_scale_s_shards_together() {
        let (s, job, _) = sharded_job(Arc::new(MemoryStore::default()), 2);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let wait = Duration::from_millis(300);
        assert!(runtime
            .block_on(s.lease_wait(&w("a"), &[], DeviceMemory::default(), wait, 0))
            .unwrap()
            .is_none());
        assert!(s.state.lock().unwrap().idle.is_empty());
        let (a, b) = (w("a"), w("b"));
        let (a, b) = runtime.block_on(async {
            tokio::join!(
                s.lease_wait(&a, &[], DeviceMemory::default(), Duration::from_secs(5), 0),
                s.lease_wait(&b, &[], DeviceMemory::default(), Duration::from_secs(5), 0)
            )
        });
        let (a, b) = (a.unwrap().unwrap(), b.unwrap().unwrap());
        assert_eq!((&a.task.id.job, &b.task.id.job), (&job, &job));
        assert_ne!(a.task.id.index, b.task.id.index);
        assert!(s.state.lock().unwrap().idle.is_empty());
    }

    /// Fewer workers left than a scale's shards: the scale is planned again. Its shards are cancelled (a
    /// running one's lease ends: its heartbeat says cancel, its result is discarded), the new tasks are
    /// queued and, once done, the scale is stitched as usual; a restart keeps it so.
    #[test]
    fn a_scale_planned_again_replaces_its_shards_with_fewer_tasks() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let (s, job, spec) = sharded_job(store.clone(), 3);
        let _free = [s.idle(&w("b"), &[]), s.idle(&w("c"), &[])];
        let a = s.lease(&w("a")).unwrap().unwrap();
        let b = s.lease(&w("b")).unwrap().unwrap();
        s.complete(&b.lease_id, &hash("band 1")).unwrap().unwrap();
        assert_eq!(sharded(&s), [(job.clone(), 1, 3)]);
        let two = spec
            .scale_tasks(768, 1024, 1, &hash("stitched"), &[0, 0], None)
            .unwrap();
        let one = spec
            .scale_tasks(768, 1024, 1, &hash("stitched"), &[0], None)
            .unwrap();
        assert_eq!((two.len(), one.len()), (2, 1));
        // not fewer, the wrong scale or the wrong count of shards: nothing changes
        let three = spec
            .scale_tasks(768, 1024, 1, &hash("stitched"), &[0, 0, 0], None)
            .unwrap();
        assert!(!s.replan(&job, 1, 3, three, "no").unwrap());
        assert!(!s.replan(&job, 0, 3, two.clone(), "no").unwrap());
        assert!(!s.replan(&job, 1, 4, two.clone(), "no").unwrap());
        assert!(!s.replan(&job, 1, 3, Vec::new(), "no").unwrap());
        assert!(s.replan(&job, 1, 3, two, "fewer workers").unwrap());
        // the shards are replaced once: their count is 2 now
        assert!(!s.replan(&job, 1, 3, one.clone(), "again").unwrap());
        assert_eq!(sharded(&s), [(job.clone(), 1, 2)]);
        let view = s.get(&job).unwrap();
        assert_eq!(view.tasks.len(), 1 + 3 + 2);
        for (t, _) in &view.tasks[1..4] {
            assert_eq!(
                (t.state, t.error.as_str()),
                (TaskState::Cancelled, "fewer workers")
            );
            assert_eq!(t.result, None);
        }
        assert!(
            s.heartbeat(&a.lease_id, &w("a"), None, None)
                .unwrap()
                .cancel
        );
        assert_eq!(s.complete(&a.lease_id, &hash("late")).unwrap(), None);
        s.fail(&a.lease_id, "late", FailureKind::Retryable).unwrap();
        assert_eq!(s.get(&job).unwrap().tasks[1].0.state, TaskState::Cancelled);
        assert_eq!(s.queue_depth(), 2);
        assert_eq!(s.counts(), s.counts_walked());
        // 2 -> 1: one task on one worker, no shard left to look at
        assert!(s.replan(&job, 1, 2, one, "one worker left").unwrap());
        assert!(sharded(&s).is_empty());
        assert_eq!(s.queue_depth(), 1);
        let view = s.get(&job).unwrap();
        let replaced = crate::model::replaced_tasks(view.tasks.iter().map(|(t, _)| t));
        assert_eq!(replaced.into_iter().collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        // a restart has the plan as it was left
        let again = Scheduler::new(SchedulerConfig::default(), store).unwrap();
        assert_eq!(again.queue_depth(), 1);
        let l = again.lease(&w("c")).unwrap().unwrap();
        assert_eq!(l.task.id.index, 6);
        assert_eq!(l.task.spec.shards(), None);
        let done = again
            .complete(&l.lease_id, &hash("whole"))
            .unwrap()
            .unwrap();
        assert!(done.all_tasks_done && done.stage_work);
        assert_eq!(again.jobs_awaiting_step(), std::slice::from_ref(&job));
        assert!(again.finish_stage(&job, 1, &hash("final"), None).unwrap());
        assert_eq!(again.get(&job).unwrap().meta.state, JobState::Succeeded);
        assert_eq!(again.counts(), again.counts_walked());
    }

    /// A tile of a later scale that runs out of memory is handed to the coordinator once, while its job is
    /// at that scale; the scale planned again in smaller tiles replaces every task of it (one that
    /// succeeded included: the grid changed), the job keeps the smaller size for its later scales, and a
    /// restart keeps both. A plan that is stale (the task replaced already, another scale, no tasks)
    /// changes nothing.
    #[test]
    fn a_scale_whose_tile_ran_out_of_memory_is_planned_again_in_smaller_tiles() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            ..SchedulerConfig::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let spec = tiled_1024();
        let (job, _) = s.submit(spec.clone(), "").unwrap();
        let l = s.lease(&w("a")).unwrap().unwrap();
        // the first scale is not planned from memory: it is never made smaller
        s.fail(&l.lease_id, "CUDA out of memory", FailureKind::OutOfMemory)
            .unwrap();
        assert!(s.take_ran_out().is_empty());
        let l = s.lease(&w("b")).unwrap().unwrap();
        s.complete(&l.lease_id, &hash("scale 0")).unwrap();
        let memory = [80 << 30];
        let plan = |max| {
            spec.scale_tasks(768, 1024, 1, &hash("stitched"), &memory, max)
                .unwrap()
        };
        let (large, small) = (plan(Some(640)), plan(Some(512)));
        assert!(large.len() > 2 && small.len() > large.len());
        assert!(s
            .finish_stage(&job, 0, &hash("stitched"), Some(large.clone()))
            .unwrap());
        // a tile that ran out and then succeeded on another worker leaves its scale as planned
        let first = s.lease(&w("a")).unwrap().unwrap();
        s.fail(
            &first.lease_id,
            "CUDA out of memory",
            FailureKind::OutOfMemory,
        )
        .unwrap();
        let elsewhere = s.lease(&w("b")).unwrap().unwrap();
        assert_eq!(elsewhere.task.id.index, first.task.id.index);
        s.complete(&elsewhere.lease_id, &hash("tile 0")).unwrap();
        assert!(s.take_ran_out().is_empty(), "succeeded since");
        let index = first.task.id.index;
        assert!(!s
            .replan_smaller(&job, 1, index, small.clone(), 512, "no")
            .unwrap());
        let second = s.lease(&w("a")).unwrap().unwrap();
        let third = s.lease(&w("b")).unwrap().unwrap();
        s.fail(
            &second.lease_id,
            "CUDA out of memory",
            FailureKind::OutOfMemory,
        )
        .unwrap();
        let ran_out = s.take_ran_out();
        assert_eq!(ran_out.len(), 1);
        let (meta, task) = &ran_out[0];
        assert_eq!((&meta.id, task.index), (&job, second.task.id.index));
        assert_eq!(task.out_of_memory_on, [w("a")]);
        assert!(s.take_ran_out().is_empty(), "handed over once");
        // handed back (nothing to plan for yet): taken again
        s.hand_back_ran_out(&job, task.index);
        assert_eq!(s.take_ran_out().len(), 1);
        let index = task.index;
        assert!(!s
            .replan_smaller(&job, 0, index, small.clone(), 512, "no")
            .unwrap());
        assert!(!s
            .replan_smaller(&job, 1, index, Vec::new(), 512, "no")
            .unwrap());
        assert!(s
            .replan_smaller(&job, 1, index, small.clone(), 512, "smaller")
            .unwrap());
        assert!(!s
            .replan_smaller(&job, 1, index, small.clone(), 512, "again")
            .unwrap());
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.max_tile_size, Some(512));
        assert_eq!(view.tasks.len(), 1 + large.len() + small.len());
        for (t, _) in &view.tasks[1..=large.len()] {
            assert_eq!(
                (t.state, t.error.as_str()),
                (TaskState::Cancelled, "smaller")
            );
            assert_eq!(t.result, None);
        }
        let replaced = crate::model::replaced_tasks(view.tasks.iter().map(|(t, _)| t));
        assert_eq!(
            replaced.into_iter().collect::<Vec<_>>(),
            (1..=large.len() as u32).collect::<Vec<_>>()
        );
        // the running tile's worker is told to stop; its late result is discarded
        assert!(
            s.heartbeat(&third.lease_id, &w("b"), None, None)
                .unwrap()
                .cancel
        );
        assert_eq!(s.complete(&third.lease_id, &hash("late")).unwrap(), None);
        assert_eq!(s.queue_depth(), small.len());
        assert_eq!(s.counts(), s.counts_walked());
        // another out-of-memory report of the old plan's tile is not handed over
        assert!(s.take_ran_out().is_empty());
        let again = Scheduler::new(config, store).unwrap();
        assert_eq!(again.queue_depth(), small.len());
        assert_eq!(again.get(&job).unwrap().meta.max_tile_size, Some(512));
        assert_eq!(again.counts(), again.counts_walked());
    }

    /// A task whose progress does not move for `task_stall` loses its lease as an expired one would: it is
    /// retried, a strike against its worker, which is told to cancel it, and the worker is not counted lost
    /// (it still heartbeats). Progress that moves keeps the lease, not heartbeats alone nor another
    /// worker's progress; a lease being cancelled is left to its worker.
    #[test]
    fn a_task_whose_progress_stalls_is_taken_back_and_retried() {
        // long beside the sleeps that must stay under it (a third, a half), so that a slow machine's
        // longer sleeps cannot pass it
        let stall = Duration::from_secs(1);
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            task_stall: Some(stall),
            ..Default::default()
        });
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        let l = s.lease(&w("a")).unwrap().unwrap();
        let at = |iteration| {
            Some(TaskProgress {
                scale: 1,
                scales: 1,
                iteration,
                iterations: 100,
                ..Default::default()
            })
        };
        // moving: iterations 1, 2, 3 a third of the stall apart; the same iteration again does not count
        for iteration in 1..=3 {
            std::thread::sleep(stall / 3);
            let beat = s
                .heartbeat(&l.lease_id, &w("a"), at(iteration), None)
                .unwrap();
            assert!(!beat.cancel, "iteration {iteration}");
        }
        std::thread::sleep(stall / 2);
        assert!(
            !s.heartbeat(&l.lease_id, &w("a"), at(3), None)
                .unwrap()
                .cancel
        );
        std::thread::sleep(stall * 3 / 4);
        // stalled: more than the stall since iteration 3 came, heartbeats meanwhile
        s.expire().unwrap();
        let view = s.get(&job).unwrap();
        let task = &view.tasks[0].0;
        assert_eq!(task.state, TaskState::Pending);
        assert!(task.error.contains("no progress for"), "{}", task.error);
        assert!(task.error.contains("--task-stall-secs"), "{}", task.error);
        assert_eq!(view.meta.strikes.get(&w("a")), Some(&1));
        assert!(
            s.heartbeat(&l.lease_id, &w("a"), at(4), None)
                .unwrap()
                .cancel
        );
        assert!(
            s.take_lost().is_empty(),
            "a stalled worker still heartbeats"
        );
        assert_eq!(s.metrics.task_stalls.get(), 1);
        // the next attempt, on another worker: its stall counts from its lease until the first progress
        let l = s.lease(&w("b")).unwrap().unwrap();
        std::thread::sleep(stall / 2);
        s.expire().unwrap();
        assert!(
            !s.heartbeat(&l.lease_id, &w("b"), None, None)
                .unwrap()
                .cancel
        );
        // progress from another worker, which knows the lease's id, does not count, and that worker is
        // told to stop
        assert!(
            s.heartbeat(&l.lease_id, &w("x"), at(7), None)
                .unwrap()
                .cancel
        );
        std::thread::sleep(stall * 3 / 4);
        s.expire().unwrap();
        assert!(
            s.heartbeat(&l.lease_id, &w("b"), None, None)
                .unwrap()
                .cancel
        );
        // a lease being cancelled (its job cancelled) is left to its worker
        let l = s.lease(&w("c")).unwrap().unwrap();
        s.cancel(&job).unwrap();
        std::thread::sleep(stall * 5 / 4);
        s.expire().unwrap();
        assert_eq!(s.metrics.task_stalls.get(), 2);
        assert!(s.leases().iter().any(|v| v.worker == w("c")), "{l:?}");
    }

    /// A task whose render ended (its progress at the last iteration of its last scale) keeps its lease past
    /// `task_stall` while its worker sends the result (a large image's encoding and upload), and the result
    /// is taken; one at the last iteration of an earlier scale still stalls, and so does one whose result
    /// has not come a worker's REPORT_TIMEOUT after the stall (an engine hung after its last iteration).
    #[test]
    fn a_task_whose_render_ended_is_not_taken_back_while_its_result_comes() {
        let stall = Duration::from_millis(500);
        let s = scheduler(SchedulerConfig {
            backoff: Duration::ZERO,
            task_stall: Some(stall),
            ..Default::default()
        });
        let (job, _) = s.submit(batch(3, 0), "").unwrap();
        let at = |scale, iteration| {
            Some(TaskProgress {
                scale,
                scales: 2,
                iteration,
                iterations: 100,
                ..Default::default()
            })
        };
        let (ended, between) = (
            s.lease(&w("a")).unwrap().unwrap(),
            s.lease(&w("b")).unwrap().unwrap(),
        );
        for _ in 0..3 {
            for (l, worker, scale) in [(&ended, "a", 2), (&between, "b", 1)] {
                s.heartbeat(&l.lease_id, &w(worker), at(scale, 100), None)
                    .unwrap();
            }
            std::thread::sleep(stall / 2);
        }
        s.expire().unwrap();
        assert!(
            !s.heartbeat(&ended.lease_id, &w("a"), at(2, 100), None)
                .unwrap()
                .cancel
        );
        assert!(
            s.heartbeat(&between.lease_id, &w("b"), at(1, 100), None)
                .unwrap()
                .cancel,
            "a scale's end is not the render's"
        );
        assert!(s.complete(&ended.lease_id, &hash("r")).unwrap().is_some());
        let view = s.get(&job).unwrap();
        assert_eq!(
            view.tasks[ended.task.id.index as usize].0.state,
            TaskState::Succeeded
        );
        assert_eq!(s.metrics.task_stalls.get(), 1);
        // ended, and nothing since for longer than the stall and a worker's report together
        let hung = s.lease(&w("c")).unwrap().unwrap();
        s.heartbeat(&hung.lease_id, &w("c"), at(2, 100), None)
            .unwrap();
        let report_ms = stylefarm_proto::REPORT_TIMEOUT.as_millis() as i64;
        s.state
            .lock()
            .unwrap()
            .leases
            .get_mut(&hung.lease_id)
            .unwrap()
            .progressed_ms -= report_ms + stall.as_millis() as i64 + 1_000;
        s.expire().unwrap();
        assert!(
            s.heartbeat(&hung.lease_id, &w("c"), at(2, 100), None)
                .unwrap()
                .cancel
        );
        assert_eq!(s.metrics.task_stalls.get(), 2);
    }

    /// Exact-mode shards: the one that holds its group back (its engine hung between two exchange calls,
    /// its heartbeats going on) stalls, not the one waiting in the exchange for it, however long it waits;
    /// the waiting one fails with its group at no attempt, and its call's end counts as progress.
    #[test]
    fn the_shard_that_holds_its_group_back_stalls_not_the_one_waiting_for_it() {
        let stall = Duration::from_secs(60);
        let config = SchedulerConfig {
            backoff: Duration::ZERO,
            task_stall: Some(stall),
            ..Default::default()
        };
        let (s, job, _) = sharded_job_with(config, Arc::new(MemoryStore::default()), 2);
        let _free = s.idle(&w("b"), &[]);
        let (waiting, hung) = (
            s.lease(&w("a")).unwrap().unwrap(),
            s.lease(&w("b")).unwrap().unwrap(),
        );
        let age = |s: &Scheduler, lease: &LeaseId| {
            let mut st = s.state.lock().unwrap();
            st.leases.get_mut(lease).unwrap().progressed_ms -= stall.as_millis() as i64 + 1_000;
        };
        s.exchanging(&waiting.lease_id, true);
        age(&s, &waiting.lease_id);
        age(&s, &hung.lease_id);
        s.expire().unwrap();
        let leased: Vec<WorkerId> = s.leases().into_iter().map(|l| l.worker).collect();
        assert_eq!(leased, [w("a")], "the hung shard's lease is taken back");
        assert_eq!(s.metrics.task_stalls.get(), 1);
        let view = s.get(&job).unwrap();
        let (first, second) = (&view.tasks[1].0, &view.tasks[2].0);
        assert!(second.error.contains("no progress for"), "{}", second.error);
        assert_eq!(view.meta.strikes.get(&w("b")), Some(&1));
        // the waiting one's call ends (its group started again): that is progress, not a stall
        s.exchanging(&waiting.lease_id, false);
        s.expire().unwrap();
        assert_eq!(s.leases().len(), 1);
        s.fail(
            &waiting.lease_id,
            "the group starts again",
            FailureKind::Group,
        )
        .unwrap();
        let view = s.get(&job).unwrap();
        assert_eq!(view.tasks[1].0.attempts, first.attempts - 1, "no attempt");
        assert_eq!(view.meta.strikes.get(&w("a")), None);
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A worker that signs off gives up the leases of it that it names, by id or by the poll they were
    /// handed to (and only those: not another of its leases, nor another registration's, nor a lease named
    /// with another worker's id): the next expiry queues their tasks again, long before their deadlines,
    /// saying why; not counted as a lease that lapsed. A lease handed to a poll and never heard of goes
    /// back at once, with no attempt spent and no strike.
    #[test]
    fn a_worker_that_signs_off_gives_up_its_leases() {
        let s = scheduler(SchedulerConfig {
            lease: Duration::from_secs(3600),
            ..Default::default()
        });
        let (job, _) = s.submit(batch(5, 0), "").unwrap();
        let a = s.lease(&w("a#1")).unwrap().unwrap();
        let other = s.lease(&w("a#2")).unwrap().unwrap();
        let kept = s.lease(&w("a#1")).unwrap().unwrap();
        // handed to a poll (request 77) the worker gave up: named by its request, never heard of
        let unseen = s
            .lease_ready(&w("a#1"), &[], DeviceMemory::default(), 77)
            .unwrap()
            .unwrap();
        assert_eq!(s.signed_off(&w("a#1"), &[], 78), 0);
        assert_eq!(s.signed_off(&w("a#1"), &[], 77), 1);
        let task = s.get(&job).unwrap().tasks[unseen.task.id.index as usize]
            .0
            .clone();
        assert_eq!(
            (
                task.state,
                task.attempts,
                task.error.as_str(),
                task.logs.len()
            ),
            (TaskState::Pending, 0, "", 0),
            "given back at once, at no cost"
        );
        assert!(s.get(&job).unwrap().meta.strikes.is_empty());
        assert_eq!(s.counts(), s.counts_walked());
        // handed to a poll, then heard of (its worker started it): given up as a task left unfinished
        let polled = s
            .lease_ready(&w("a#1"), &[], DeviceMemory::default(), 79)
            .unwrap()
            .unwrap();
        s.heartbeat(&polled.lease_id, &w("a#1"), None, None)
            .unwrap();
        assert_eq!(s.signed_off(&w("a#1"), &[], 79), 1);
        // named, but another worker's; its own, but not named
        assert_eq!(
            s.signed_off(&w("b#1"), std::slice::from_ref(&a.lease_id), 0),
            0
        );
        assert_eq!(s.signed_off(&w("a#1"), &[], 0), 0);
        assert_eq!(
            s.signed_off(&w("a#1"), std::slice::from_ref(&a.lease_id), 0),
            1
        );
        s.expire().unwrap();
        let view = s.get(&job).unwrap();
        for given_up in [&a, &polled] {
            let task = &view.tasks[given_up.task.id.index as usize].0;
            assert_eq!(task.state, TaskState::Pending);
            assert_eq!(
                task.error,
                "its worker stopped (signed off) before finishing it"
            );
        }
        for held in [&other, &kept] {
            assert_eq!(
                view.tasks[held.task.id.index as usize].0.state,
                TaskState::Running
            );
        }
        assert_eq!(s.metrics().lease_expiries.get(), 0);
        assert!(
            s.heartbeat(&a.lease_id, &w("a#1"), None, None)
                .unwrap()
                .cancel,
            "given up"
        );
    }

    /// A registration's id numbers on from the last one the store holds: a scheduler that loads the store
    /// (a restarted coordinator, a standby) hands out no id a worker may still call with. One that the store
    /// cannot take is refused (the worker registers again), its number not handed out.
    #[test]
    fn worker_ids_number_on_across_restarts() {
        let store = Arc::new(HeldBack::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        assert_eq!(s.register("gpu").unwrap(), w("gpu#1"));
        assert_eq!(s.register("cpu").unwrap(), w("cpu#2"));
        let restarted = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        assert_eq!(restarted.register("gpu").unwrap(), w("gpu#3"));
        *store.failing.lock().unwrap() = Some(StoreError::new("disk on fire"));
        assert!(restarted.register("gpu").is_err());
        *store.failing.lock().unwrap() = None;
        assert_eq!(restarted.register("gpu").unwrap(), w("gpu#5"));
        let restarted = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        assert_eq!(restarted.register("gpu").unwrap(), w("gpu#6"));
        // a counter at its largest is refused, not wrapped
        store::wait(store.write(vec![Op::Registrations(u64::MAX)])).unwrap();
        let full = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        assert!(full.register("gpu").is_err());
    }

    /// A drained worker (by its name: every registration of it) takes no task, even while it asks, while its
    /// running task goes on to its end; the others take the queue; undrained, it takes tasks again. A job
    /// whose live workers are all drained says so. The drained are stored: a scheduler loading the store
    /// has them; a change whose write fails is kept, and the next write stores it. At most MAX_DRAINED.
    #[test]
    fn a_drained_worker_takes_no_task_until_undrained() {
        let store = Arc::new(HeldBack::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let job = submit_as(&s, "", batch(3, 0));
        let a = s.lease(&w("a#1")).unwrap().unwrap();
        assert_eq!(s.drain(&[w("a")], true).unwrap(), [w("a")]);
        assert!(
            s.drain(&[w("a")], true).unwrap().is_empty(),
            "drained already"
        );
        assert_eq!(*s.drained(), BTreeSet::from([w("a")]));
        let reloaded = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        assert_eq!(*reloaded.drained(), BTreeSet::from([w("a")]));
        // a write that fails: the change is kept (as a job's is), and the next write stores it
        *store.failing.lock().unwrap() = Some(StoreError::new("disk on fire"));
        assert!(s.drain(&[w("c")], true).is_err());
        assert_eq!(*s.drained(), BTreeSet::from([w("a"), w("c")]));
        *store.failing.lock().unwrap() = None;
        s.drain(&[w("d")], true).unwrap();
        let reloaded = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        assert_eq!(
            *reloaded.drained(),
            BTreeSet::from([w("a"), w("c"), w("d")])
        );
        s.drain(&[w("c"), w("d")], false).unwrap();
        // at most MAX_DRAINED at once
        let many: Vec<WorkerId> = (0..MAX_DRAINED).map(|i| w(&format!("n{i}"))).collect();
        match s.drain(&many, true) {
            Err(SchedulerError::Limit(m)) => assert!(m.contains("10001 would be drained"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(*s.drained(), BTreeSet::from([w("a")]));
        assert!(s.lease(&w("a#1")).unwrap().is_none());
        assert!(
            s.lease(&w("a#2")).unwrap().is_none(),
            "its other registration"
        );
        assert!(
            !s.heartbeat(&a.lease_id, &w("a#1"), None, None)
                .unwrap()
                .cancel
        );
        s.complete(&a.lease_id, &hash("a")).unwrap();
        let waiting = Waiting {
            drained: vec![(w("a#1"), Vec::new())],
            ..Default::default()
        };
        assert!(
            waiting
                .of(&s.get(&job).unwrap())
                .starts_with("the live workers that may take it are drained"),
            "{}",
            waiting.of(&s.get(&job).unwrap())
        );
        assert_eq!(s.lease(&w("b")).unwrap().unwrap().task.id.job, job);
        assert_eq!(s.drain(&[w("a")], false).unwrap(), [w("a")]);
        assert!(s.drained().is_empty());
        assert_eq!(s.lease(&w("a#2")).unwrap().unwrap().task.id.job, job);
        // a drained worker asking for work is not counted free for a scale's shards
        let (s, _, _) = sharded_job(Arc::new(MemoryStore::default()), 2);
        s.drain(&[w("b")], true).unwrap();
        let _b = s.idle(&w("b#1"), &[]);
        assert!(s.lease(&w("a")).unwrap().is_none(), "b is drained");
        s.drain(&[w("b")], false).unwrap();
        assert_eq!(
            s.lease(&w("a")).unwrap().unwrap().task.spec.shards(),
            Some(2)
        );
    }

    /// A job with `max_workers` runs at most that many tasks at once: a worker that comes while it is at its
    /// limit takes the next job's task instead (or nothing), and the job's next task goes as soon as one of
    /// its own ends.
    #[test]
    fn a_job_runs_at_most_its_max_workers_tasks_at_once() {
        let s = scheduler(SchedulerConfig::default());
        let limited = submit_as(
            &s,
            "",
            JobSpec {
                max_workers: 2,
                ..batch(4, 5)
            },
        );
        // before any runs, two of its queued tasks may start, the other two are held (no use adding
        // workers for them)
        let counts = s.counts();
        assert_eq!(counts.queue_by_priority, BTreeMap::from([("5".into(), 2)]));
        assert_eq!(
            counts.held_by_reason,
            BTreeMap::from([("max_workers".into(), 2)])
        );
        let a = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(s.counts().held_by_reason.get("max_workers"), Some(&2));
        let b = s.lease(&w("b")).unwrap().unwrap();
        assert_eq!((&a.task.id.job, &b.task.id.job), (&limited, &limited));
        // at its limit: its two queued tasks are held, the running two open
        let counts = s.counts();
        assert!(counts.queue_by_priority.is_empty(), "{counts:?}");
        assert_eq!(counts.open_by_worker_tags, BTreeMap::from([("".into(), 2)]));
        assert!(
            s.lease(&w("c")).unwrap().is_none(),
            "at its limit: nothing else queued"
        );
        // a lower-priority job's task goes to the third worker meanwhile
        let other = submit_as(&s, "", batch(1, 0));
        let c = s.lease(&w("c")).unwrap().unwrap();
        assert_eq!(c.task.id.job, other);
        s.complete(&a.lease_id, &hash("a")).unwrap();
        let d = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(d.task.id.job, limited);
        assert!(s.lease(&w("d")).unwrap().is_none());
        // a failure frees its place too
        s.fail(&b.lease_id, "boom", FailureKind::Retryable).unwrap();
        assert_eq!(s.lease(&w("d")).unwrap().unwrap().task.id.job, limited);
        assert_eq!(s.leases().iter().filter(|l| l.job_id == limited).count(), 2);
    }

    /// A worker sending a rendered task's result while it asks for another (sending_result) holds no
    /// place of its job's `max_workers` nor of its tenant's share with it: on a farm of one worker, a job
    /// limited to one worker takes its next task before a lower-priority job's, and the result sent after
    /// is taken. Another worker's name cannot free the place.
    #[test]
    fn a_task_whose_result_is_on_its_way_holds_no_place_of_its_job_s_max_workers() {
        let s = scheduler(SchedulerConfig::default());
        let limited = submit_as(
            &s,
            "",
            JobSpec {
                max_workers: 1,
                ..batch(3, 5)
            },
        );
        let other = submit_as(&s, "", batch(1, 0));
        let first = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(first.task.id.job, limited);
        // not said: the job is at its limit, the lower-priority job's task is next
        s.sending_result(&w("b"), &first.lease_id);
        assert_eq!(s.counts().held_by_reason.get("max_workers"), Some(&2));
        s.sending_result(&w("a#2"), &first.lease_id);
        assert_eq!(s.counts().held_by_reason.get("max_workers"), Some(&1));
        let second = s.lease(&w("a#2")).unwrap().unwrap();
        assert_eq!(
            second.task.id.job, limited,
            "the limited job's next task first"
        );
        // one rendering again: at its limit
        assert_eq!(s.lease(&w("c")).unwrap().unwrap().task.id.job, other);
        s.complete(&first.lease_id, &hash("first")).unwrap();
        assert!(s.lease(&w("c")).unwrap().is_none());
        let view = s.get(&limited).unwrap();
        assert_eq!(
            view.tasks[first.task.id.index as usize].0.state,
            TaskState::Succeeded
        );
    }

    /// A lease that expires names its worker once, for the coordinator to count it out of the live ones.
    #[test]
    fn an_expired_lease_reports_its_worker_lost_once() {
        let s = scheduler(SchedulerConfig {
            lease: Duration::from_millis(1),
            ..SchedulerConfig::default()
        });
        s.submit(batch(2, 0), "").unwrap();
        s.lease(&w("a")).unwrap().unwrap();
        s.lease(&w("a")).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        s.expire().unwrap();
        let lost = s.take_lost();
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].0, w("a"));
        assert!(lost[0].1 < std::time::Instant::now());
        assert!(s.take_lost().is_empty());
    }

    /// A video job's frames: each completed frame asks for the stage work (its chunk's next frame), with
    /// other frames still running; the next frames are queued behind the job's, a frame with a task
    /// already is left out, and an ended job or another kind takes none.
    #[test]
    fn video_frames_are_queued_as_their_chunks_go_on() {
        let s = scheduler(SchedulerConfig::default());
        let spec = JobSpec::new(
            JobKind::Video(stylefarm_core::job::Video {
                chunk_frames: 2,
                frame_iterations: 0,
            }),
            vec![hash("f1"), hash("f2"), hash("f3"), hash("f4")],
            vec![hash("s")],
            RenderParams::default(),
        );
        let (job, _) = s.submit(spec.clone(), "").unwrap();
        let (a, b) = (
            s.lease(&w("a")).unwrap().unwrap(),
            s.lease(&w("b")).unwrap().unwrap(),
        );
        let done = s.complete(&a.lease_id, &hash("r1")).unwrap().unwrap();
        assert!(done.stage_work && !done.all_tasks_done, "{done:?}");
        let view = s.get(&job).unwrap();
        let tasks = view.tasks.iter().map(|(t, _)| (&t.spec, t.result.as_ref()));
        let next = spec.next_frames(tasks).unwrap();
        assert_eq!(
            next.len(),
            1,
            "frame 2 follows frame 1; frame 4 waits for frame 3"
        );
        assert_eq!(s.add_frames(&job, next.clone()).unwrap(), 1);
        assert_eq!(s.add_frames(&job, next).unwrap(), 0, "frame 2 has its task");
        let c = s.lease(&w("a")).unwrap().unwrap();
        assert_eq!(c.task.spec.content, hash("f2"));
        s.complete(&b.lease_id, &hash("r3")).unwrap();
        let done = s.complete(&c.lease_id, &hash("r2")).unwrap().unwrap();
        assert!(done.stage_work);
        let view = s.get(&job).unwrap();
        let tasks = view.tasks.iter().map(|(t, _)| (&t.spec, t.result.as_ref()));
        let last = spec.next_frames(tasks).unwrap();
        assert_eq!(last.len(), 1, "frame 4 follows frame 3");
        let batch = batch_job(&s);
        assert_eq!(
            s.add_frames(&batch, last.clone()).unwrap(),
            0,
            "another kind takes none"
        );
        assert_eq!(s.get(&batch).unwrap().tasks.len(), 1);
        s.cancel(&job).unwrap();
        assert_eq!(
            s.add_frames(&job, last).unwrap(),
            0,
            "a cancelled job takes none"
        );
    }

    fn batch_job(s: &Scheduler) -> JobId {
        s.submit(batch(1, 0), "").unwrap().0
    }

    /// Random submits (batches and tiled jobs), leases, results, failures of every kind, expiries, stage
    /// steps, cancels, retries, deletes and restarts: after each, the counts kept as states change equal a
    /// walk of every task and job.
    #[test]
    fn counts_kept_as_states_change_equal_a_walk_of_every_task() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            lease: Duration::from_millis(2),
            backoff: Duration::ZERO,
            default_max_attempts: 3,
            ..Default::default()
        };
        let mut s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let tiled = tiled_1024();
        // a fixed-seed xorshift: the same sequence every run
        let mut seed = 0x5eed_u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut jobs, mut leases, mut deleted, mut retried) = (Vec::new(), Vec::new(), 0, 0);
        let kinds = [
            FailureKind::Retryable,
            FailureKind::Permanent,
            FailureKind::OutOfMemory,
        ];
        for step in 0..400 {
            match next(10) {
                0 => jobs.push(s.submit(batch(1 + next(3) as u8, 0), "").unwrap().0),
                1 => jobs.push(s.submit(tiled.clone(), "").unwrap().0),
                2 | 3 => {
                    if let Some(l) = s.lease(&w(&format!("w{}", next(3)))).unwrap() {
                        leases.push(l.lease_id);
                    }
                }
                4 | 5 if !leases.is_empty() => {
                    let l = leases.swap_remove(next(leases.len() as u64) as usize);
                    let _ = s.complete(&l, &hash("r")).unwrap();
                }
                6 if !leases.is_empty() => {
                    let l = leases.swap_remove(next(leases.len() as u64) as usize);
                    let kind = kinds[next(3) as usize];
                    s.fail(&l, "boom", kind).unwrap();
                }
                7 => {
                    std::thread::sleep(Duration::from_millis(3));
                    s.expire().unwrap();
                }
                8 => {
                    for job in s.jobs_awaiting_step() {
                        let stage = s.get(&job).unwrap().meta.stage_results.len() as u32;
                        let next_tiles = (stage == 0).then(|| {
                            tiled
                                .scale_tasks(800, 600, 1, &hash("stitched"), &[], None)
                                .unwrap()
                        });
                        s.finish_stage(&job, stage, &hash("stitched"), next_tiles)
                            .unwrap();
                    }
                }
                _ if !jobs.is_empty() && next(4) == 0 => {
                    let job = &jobs[next(jobs.len() as u64) as usize];
                    match s.cancel(job) {
                        Ok(_) | Err(SchedulerError::JobNotFound(_)) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                _ if !jobs.is_empty() && next(4) == 0 => {
                    let job = &jobs[next(jobs.len() as u64) as usize];
                    match s.retry(job) {
                        Ok(r) => retried += usize::from(r.requeued > 0 || r.stage_work),
                        Err(SchedulerError::JobNotFound(_) | SchedulerError::Precondition(_)) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                _ if !jobs.is_empty() && next(4) == 0 => {
                    let job = &jobs[next(jobs.len() as u64) as usize];
                    match s.delete(job) {
                        Ok(()) => deleted += 1,
                        Err(SchedulerError::JobNotFound(_)) => {}
                        Err(SchedulerError::Precondition(_)) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                _ if next(20) == 0 => {
                    drop(s);
                    s = Scheduler::new(config.clone(), store.clone()).unwrap();
                    leases.clear();
                }
                _ => {}
            }
            assert_eq!(s.counts(), s.counts_walked(), "after step {step}");
        }
        let counts = s.counts();
        for state in ["succeeded", "failed", "cancelled"] {
            assert!(counts.jobs_by_state.contains_key(state), "{counts:?}");
        }
        assert!(deleted > 0, "no job was deleted");
        assert!(retried > 0, "no job was run again");
    }

    /// A worker's request for a task whose answer was lost in a coordinator's restart, sent again to the
    /// coordinator that took the lease up: answered with that lease, as the one that handed it out would
    /// (before, the lease waited a lease period for its worker while the worker rendered another task).
    #[test]
    fn a_lease_taken_up_at_a_restart_is_handed_again_for_its_request_sent_again() {
        let (store, config, s) = restartable();
        let (job, _) = s.submit(batch(2, 0), "").unwrap();
        let lost = s
            .lease_ready(&w("a#1"), &[], DeviceMemory::default(), 7)
            .unwrap()
            .unwrap();
        drop(s);
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        // another number, and no number: the other task
        assert!(s.lease_again(&w("a#1"), 8).is_none());
        assert!(s.lease_again(&w("a#1"), 0).is_none());
        // another worker with the same number: not its lease
        assert!(s.lease_again(&w("b#1"), 7).is_none());
        let again = s.lease_again(&w("a#2"), 7).unwrap();
        assert_eq!(
            (&again.lease_id, &again.task.id),
            (&lost.lease_id, &lost.task.id)
        );
        let view = s.get(&job).unwrap();
        let (task, _) = &view.tasks[lost.task.id.index as usize];
        assert_eq!((task.attempts, task.worker.as_str()), (1, "a#2"));
        assert_eq!(s.queue_depth(), 1);
        assert!(
            !s.heartbeat(&lost.lease_id, &w("a#2"), None, None)
                .unwrap()
                .cancel
        );
        assert!(s.complete(&lost.lease_id, &hash("r")).unwrap().is_some());
        // a task ended is written without the request's number
        drop(s);
        let s = Scheduler::new(config, store).unwrap();
        let view = s.get(&job).unwrap();
        let (task, _) = &view.tasks[lost.task.id.index as usize];
        assert_eq!((task.state, task.lease_request), (TaskState::Succeeded, 0));
    }

    #[test]
    fn a_restart_takes_running_tasks_leases_up_for_a_lease_period() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let config = SchedulerConfig {
            lease: Duration::from_millis(300),
            ..SchedulerConfig::default()
        };
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        let (job, _) = s.submit(batch(3, 0), "req").unwrap();
        let (kept, lost) = (
            s.lease(&w("w")).unwrap().unwrap(),
            s.lease(&w("v")).unwrap().unwrap(),
        );
        drop(s);
        std::thread::sleep(Duration::from_millis(10));
        let restarted_ms = now_ms();
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        assert_eq!(s.queue_depth(), 1, "the running tasks keep their leases");
        assert_eq!(s.counts(), s.counts_walked());
        // w, registered again, goes on: its heartbeat renews the lease, its result is taken
        let reply = s.heartbeat(&kept.lease_id, &w("w"), None, None).unwrap();
        assert!(!reply.cancel);
        // not by another worker
        assert!(
            s.heartbeat(&lost.lease_id, &w("x"), None, None)
                .unwrap()
                .cancel
        );
        // past the lease period, w's heartbeats keep its lease
        for _ in 0..2 {
            std::thread::sleep(Duration::from_millis(200));
            assert!(
                !s.heartbeat(&kept.lease_id, &w("w"), None, None)
                    .unwrap()
                    .cancel
            );
        }
        assert!(s.complete(&kept.lease_id, &hash("r")).unwrap().is_some());
        // its attempt's log starts when the lease was handed out, before the restart
        let log = s.task_log(&job, kept.task.id.index).unwrap();
        let attempt = log.last().unwrap();
        assert!(
            attempt.started_ms < restarted_ms && attempt.outcome == "succeeded",
            "{attempt:?}"
        );
        // v died with the coordinator: a lease period later its task is queued again, the attempt given
        // back, no strike
        let view = s.get(&job).unwrap();
        let task = &view.tasks[lost.task.id.index as usize].0;
        assert_eq!(
            (task.state, task.attempts, task.lease.as_ref()),
            (TaskState::Pending, 0, None)
        );
        assert!(view.meta.strikes.is_empty(), "{:?}", view.meta.strikes);
        // its log says so, under the number its next attempt takes again
        let logged: Vec<(u32, &str, bool)> = (task.logs.iter())
            .map(|a| (a.attempt, a.worker.as_str(), a.started_ms < restarted_ms))
            .collect();
        assert_eq!(logged, [(1, "v", true)], "{:?}", task.logs);
        assert!(
            task.logs[0]
                .outcome
                .starts_with("lost at the coordinator's restart"),
            "{:?}",
            task.logs
        );
        assert_eq!(view.tasks[kept.task.id.index as usize].0.attempts, 1);
        assert_eq!(s.queue_depth(), 2);
        assert!(s.complete(&lost.lease_id, &hash("late")).unwrap().is_none());
        assert_eq!(s.counts(), s.counts_walked());
        assert_eq!(
            s.submit(batch(3, 0), "req").unwrap(),
            (job.clone(), false),
            "request ids survive"
        );
        // and so in the store: a task ended has no lease, one queued again neither
        drop(s);
        let s = Scheduler::new(config.clone(), store.clone()).unwrap();
        assert_eq!(s.queue_depth(), 2);
        assert!(s
            .get(&job)
            .unwrap()
            .tasks
            .iter()
            .all(|(t, _)| t.lease.is_none()));
        // a job cancelled while a lease taken up waits for its worker keeps its tasks cancelled
        let running = s.lease(&w("w")).unwrap().unwrap();
        drop(s);
        let s = Scheduler::new(config, store.clone()).unwrap();
        assert_eq!(s.queue_depth(), 1);
        s.cancel(&job).unwrap();
        s.lapse_adopted();
        let view = s.get(&job).unwrap();
        assert_eq!(view.meta.state, JobState::Cancelled);
        assert_ne!(
            view.tasks[running.task.id.index as usize].0.state,
            TaskState::Pending
        );
        assert_eq!(s.queue_depth(), 0);
        assert_eq!(s.counts(), s.counts_walked());
        // and its tasks are written without the lease, which only a running one's record carries
        let stored = store.load().unwrap();
        let (_, tasks) = stored.iter().find(|(m, _)| m.id == job).unwrap();
        assert!(tasks.iter().all(|t| t.lease.is_none()), "{tasks:?}");
    }

    /// A memory store that can be told it is holding writes back, as a Redis store out of reach is, or
    /// to fail its writes.
    #[derive(Default)]
    struct HeldBack {
        inner: MemoryStore,
        behind: Mutex<Option<StoreError>>,
        failing: Mutex<Option<StoreError>>,
        /// The error of writes held back ([`StoreError::held_back`]); they are applied (here at once).
        holding: Mutex<Option<StoreError>>,
        /// How long a write takes to be durable (a slow fsync), blocking whoever waits for it.
        slow: Mutex<Option<Duration>>,
    }

    impl Store for HeldBack {
        fn write(&self, ops: Vec<Op>) -> store::Durable {
            let durable = match self.failing.lock().unwrap().clone() {
                Some(e) => store::durable_now(Err(e)),
                None => match self.holding.lock().unwrap().clone() {
                    Some(e) => {
                        let applied = store::wait(self.inner.write(ops));
                        store::durable_now(applied.and(Err(e)))
                    }
                    None => self.inner.write(ops),
                },
            };
            match *self.slow.lock().unwrap() {
                Some(slow) => Box::pin(async move {
                    std::thread::sleep(slow);
                    durable.await
                }),
                None => durable,
            }
        }
        fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError> {
            self.inner.load()
        }
        fn load_drained(&self) -> Result<BTreeSet<WorkerId>, StoreError> {
            self.inner.load_drained()
        }
        fn load_registrations(&self) -> Result<u64, StoreError> {
            self.inner.load_registrations()
        }
        fn behind(&self) -> Option<StoreError> {
            self.behind.lock().unwrap().clone()
        }
    }

    /// The images in use are those of the jobs held: specs (init image included), results, stages'
    /// images, the next scale's tiles. A deletion whose write fails leaves the job as it was, its images
    /// in use and its request id taken: memory never lacks a job that the store holds.
    #[test]
    fn a_deletion_that_is_not_stored_leaves_the_job_and_its_images_in_use() {
        let store = Arc::new(HeldBack::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let with_init = JobSpec {
            params: RenderParams {
                init: stylefarm_core::Init::Image(hash("init")),
                ..Default::default()
            },
            ..batch(1, 0)
        };
        let (job, _) = s.submit(with_init.clone(), "req").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        s.complete(&l.lease_id, &hash("result")).unwrap();
        let (tiled, _) = s.submit(tiled_1024(), "").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        s.complete(&l.lease_id, &hash("scale 0")).unwrap();
        let next = tiled_1024()
            .scale_tasks(1024, 768, 1, &hash("stitched"), &[], None)
            .unwrap();
        assert!(s
            .finish_stage(&tiled, 0, &hash("stitched"), Some(next))
            .unwrap());
        let tiled_images = ["content", "style", "scale 0", "stitched"].map(hash);
        let used: HashSet<_> = [ImageHash::of(&[0]), hash("init"), hash("result")]
            .into_iter()
            .chain(tiled_images.clone())
            .collect();
        assert_eq!(s.images_in_use(), used);
        *store.failing.lock().unwrap() = Some(StoreError::new("disk on fire"));
        assert!(matches!(s.delete(&job), Err(SchedulerError::Store(_))));
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Succeeded);
        assert_eq!(s.images_in_use(), used);
        assert_eq!(s.counts(), s.counts_walked());
        // a job that has ended keeps its state: failing it (a stage's work failed late) writes nothing
        // that could follow its deletion into the store
        s.fail_job(&job, "late").unwrap();
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Succeeded);
        *store.failing.lock().unwrap() = None;
        assert_eq!(
            s.submit(with_init, "req").unwrap(),
            (job.clone(), false),
            "its request id is still taken"
        );
        s.delete(&job).unwrap();
        assert_eq!(s.images_in_use(), HashSet::from(tiled_images));
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A submit whose insert fails for good (not held back: an I/O error) is answered with the error, and
    /// its job fails in memory ("not stored"), its tasks not leased; its request id is free, so the
    /// client's retry submits it again rather than finding a job the store will never hold.
    #[test]
    fn a_submit_not_stored_fails_its_job_and_frees_its_request_id() {
        let store = Arc::new(HeldBack::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        *store.failing.lock().unwrap() = Some(StoreError::new("disk on fire"));
        assert!(matches!(
            s.submit(batch(2, 0), "req"),
            Err(SchedulerError::Store(_))
        ));
        *store.failing.lock().unwrap() = None;
        let view = s.list("", &[], 0, None).pop().expect("in memory");
        let job = view.meta.id.clone();
        assert_eq!(view.meta.state, JobState::Failed);
        assert!(
            view.meta.error.contains("not stored: store: disk on fire"),
            "{}",
            view.meta.error
        );
        assert!(
            s.lease(&w("w")).unwrap().is_none(),
            "none of its tasks leased"
        );
        assert!(
            matches!(s.retry(&job), Err(SchedulerError::Precondition(m)) if m.contains("never stored"))
        );
        let (again, created) = s.submit(batch(2, 0), "req").unwrap();
        assert!(created && again != job);
        assert_eq!(
            store.load().unwrap().len(),
            1,
            "the retry is stored, the first not"
        );
        assert_eq!(s.counts(), s.counts_walked());
    }

    /// A deletion whose write is held back (the store out of reach, its disk full) is still applied, in
    /// order: the job goes from memory too, and its request id is free, so that memory holds no job the
    /// store will not (a retry of it, stored, would leave part of a job there), and the error is answered.
    #[test]
    fn a_deletion_held_back_forgets_the_job_and_answers_the_error() {
        let store = Arc::new(HeldBack::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let (job, _) = s.submit(batch(2, 0), "req").unwrap();
        for _ in 0..2 {
            let l = s.lease(&w("w")).unwrap().unwrap();
            s.complete(&l.lease_id, &hash("result")).unwrap();
        }
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Succeeded);
        let held = StoreError::unavailable("redis: connection refused").holding_back("it answers");
        *store.holding.lock().unwrap() = Some(held);
        match s.delete(&job) {
            Err(SchedulerError::Store(e)) => {
                assert!(e.held_back && e.message.contains("held back"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        *store.holding.lock().unwrap() = None;
        assert!(matches!(s.get(&job), Err(SchedulerError::JobNotFound(_))));
        assert!(matches!(s.retry(&job), Err(SchedulerError::JobNotFound(_))));
        assert!(store.load().unwrap().is_empty());
        assert_eq!(s.counts(), s.counts_walked());
        let (again, created) = s.submit(batch(1, 0), "req").unwrap();
        assert!(created && again != job, "its request id is free");
    }

    /// Waiting for a lease (on an async thread of the coordinator) never waits for the store's commit: a
    /// lease past its deadline is not expired there (the coordinator's loop does it, on a blocking thread).
    #[test]
    fn waiting_for_a_lease_does_not_wait_for_the_store() {
        let store = Arc::new(HeldBack::default());
        let config = SchedulerConfig {
            lease: Duration::from_millis(1),
            ..Default::default()
        };
        let s = Scheduler::new(config, store.clone()).unwrap();
        let (job, _) = s.submit(batch(1, 0), "").unwrap();
        s.lease(&w("w")).unwrap().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        *store.slow.lock().unwrap() = Some(Duration::from_millis(1500));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let started = std::time::Instant::now();
        let leased = runtime.block_on(s.lease_wait(
            &w("w2"),
            &[],
            DeviceMemory::default(),
            Duration::ZERO,
            0,
        ));
        assert!(
            leased.unwrap().is_none(),
            "the lapsed lease is not expired here"
        );
        assert!(
            started.elapsed() < Duration::from_millis(700),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(s.get(&job).unwrap().tasks[0].0.state, TaskState::Running);
        // the loop's expiry sends the task back to the queue
        s.expire().unwrap();
        assert_eq!(s.get(&job).unwrap().tasks[0].0.state, TaskState::Pending);
    }

    #[test]
    fn while_the_store_holds_writes_back_outcomes_are_refused_and_leases_do_not_expire() {
        let store = Arc::new(HeldBack::default());
        let s = Scheduler::new(
            SchedulerConfig {
                lease: Duration::from_millis(1),
                ..Default::default()
            },
            store.clone(),
        )
        .unwrap();
        let (job, _) = s.submit(batch(2, 0), "r1").unwrap();
        let l = s.lease(&w("w")).unwrap().unwrap();
        *store.behind.lock().unwrap() = Some(StoreError::unavailable("redis: connection refused"));
        std::thread::sleep(Duration::from_millis(5));
        let unavailable = |r: Result<_, SchedulerError>| matches!(r, Err(SchedulerError::Store(e)) if e.is_unavailable());
        assert!(
            unavailable(s.submit(batch(1, 0), "r1").map(|_| ())),
            "not even a repeat"
        );
        assert!(unavailable(s.submit(batch(1, 0), "r2").map(|_| ())));
        assert!(unavailable(s.lease(&w("w2")).map(|_| ())));
        assert!(unavailable(s.complete(&l.lease_id, &hash("r")).map(|_| ())));
        assert!(unavailable(s.cancel(&job).map(|_| ())));
        // the lease is past its deadline, but nothing expires while outcomes cannot be recorded
        s.expire().unwrap();
        assert!(
            !s.heartbeat(&l.lease_id, &w("w"), None, None)
                .unwrap()
                .cancel
        );
        assert_eq!(s.get(&job).unwrap().meta.state, JobState::Running);
        // the store answers again: the result the worker retries is taken
        *store.behind.lock().unwrap() = None;
        assert!(s.complete(&l.lease_id, &hash("r")).unwrap().is_some());
        assert_eq!(s.submit(batch(2, 0), "r1").unwrap(), (job, false));
    }

    /// A single job's spec, of content `content`.
    fn single(content: &str) -> JobSpec {
        JobSpec {
            kind: JobKind::Single,
            contents: vec![hash(content)],
            ..batch(1, 0)
        }
    }

    /// A job after others (`--after`) is not leased until they succeeded; one that starts from another
    /// job's result (`--init job:ID`) waits for it too and then starts from its image, in its spec and its
    /// tasks; both wait across a restart, saying what for. Refused: a job the tenant does not have, and a
    /// job whose result is not one image as an init.
    #[test]
    fn a_job_waits_for_the_jobs_it_is_after_and_starts_from_a_result() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let a = submit_as(&s, "t", single("a"));
        let after = submit_as(
            &s,
            "t",
            JobSpec {
                after: vec![a.clone()],
                ..batch(2, 9)
            },
        );
        let mut from_a = single("b");
        from_a.params.init = Init::Job(a.clone());
        let from_a = submit_as(&s, "t", from_a);
        for id in [&after, &from_a] {
            let meta = s.get(id).unwrap().meta;
            assert_eq!(meta.waiting_on, std::slice::from_ref(&a));
            assert_eq!(
                Waiting::default().reason(&meta, s.get(id).unwrap().tasks.iter().map(|(t, _)| t)),
                format!("waiting for job {a} to succeed")
            );
        }
        // the waiting tasks are held: no more workers would run them (what an autoscaler reads)
        let counts = s.counts();
        assert_eq!(
            counts.held_by_reason,
            BTreeMap::from([("waiting".into(), 3)])
        );
        assert_eq!(counts.queue_by_priority, BTreeMap::from([("0".into(), 1)]));
        assert_eq!(counts.open_by_worker_tags, BTreeMap::from([("".into(), 1)]));
        // the higher-priority batch waits: A's task comes first, and nothing else
        let l = s.lease(&w("w1")).unwrap().unwrap();
        assert_eq!(l.task.id.job, a);
        assert!(s.lease(&w("w2")).unwrap().is_none());
        // across a restart (its worker gone with the coordinator): A's task runs again, the others still
        // wait
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        s.lapse_adopted();
        let l = s.lease(&w("w1")).unwrap().unwrap();
        assert_eq!(l.task.id.job, a);
        assert!(s.lease(&w("w2")).unwrap().is_none());
        s.complete(&l.lease_id, &hash("a result")).unwrap().unwrap();
        assert_eq!(s.get(&a).unwrap().meta.state, JobState::Succeeded);
        let started = s.get(&from_a).unwrap();
        assert!(started.meta.waiting_on.is_empty());
        assert_eq!(started.meta.spec.params.init, Init::Image(hash("a result")));
        assert_eq!(
            started.tasks[0].0.spec.params.init,
            Init::Image(hash("a result"))
        );
        let leased: Vec<Lease> = std::iter::from_fn(|| s.lease(&w("w1")).unwrap()).collect();
        assert_eq!(
            leased.len(),
            3,
            "the batch's 2 tasks and the render from A's result"
        );
        assert_eq!(leased[0].task.id.job, after, "the higher priority first");
        // a job after one that succeeded already starts at once, from its result
        let mut later = single("c");
        later.params.init = Init::Job(a.clone());
        let later = submit_as(&s, "t", later);
        let view = s.get(&later).unwrap();
        assert!(view.meta.waiting_on.is_empty());
        assert_eq!(
            view.tasks[0].0.spec.params.init,
            Init::Image(hash("a result"))
        );
        // the image they start from stays in use (kept from the blob store's collection) once A is gone
        s.delete(&a).unwrap();
        assert!(s.images_in_use().contains(&hash("a result")));
        // refused, naming the field: another tenant's job, an unknown one, a batch's results as an init
        let refused = |tenant: &str, spec: JobSpec| {
            s.submit_expanded(spec.expand().unwrap(), tenant, "", false)
                .map(|_| ())
                .unwrap_err()
                .to_string()
        };
        let other = JobSpec {
            after: vec![a.clone()],
            ..single("d")
        };
        let d = submit_as(&s, "t", single("d"));
        assert_eq!(
            refused(
                "u",
                JobSpec {
                    after: vec![d.clone()],
                    ..other
                }
            ),
            format!("after: job {d} not found")
        );
        let unknown = JobSpec {
            after: vec![JobId::new("job-0")],
            ..single("d")
        };
        assert_eq!(refused("t", unknown), "after: job job-0 not found");
        let mut of_batch = single("d");
        of_batch.params.init = Init::Job(after.clone());
        assert!(
            refused("t", of_batch).starts_with(&format!("init: job {after} is a batch job")),
            "a batch's results are many"
        );
    }

    /// A job whose dependency fails or is cancelled fails, naming it, and so do the jobs after it in turn;
    /// a new job after a failed one is refused, and so is running again a job whose dependency failed,
    /// until that one runs again. A restart settles what its writes had not: a job after one that
    /// succeeded starts, one after a job that is gone fails.
    #[test]
    fn a_job_after_one_that_fails_fails_and_a_restart_settles_the_rest() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        let a = submit_as(&s, "", single("a"));
        let after = |job: &JobId, content: &str| JobSpec {
            after: vec![job.clone()],
            ..single(content)
        };
        let b = submit_as(&s, "", after(&a, "b"));
        let c = submit_as(&s, "", after(&b, "c"));
        assert_eq!(s.cancel(&a).unwrap(), JobState::Cancelled);
        let (vb, vc) = (s.get(&b).unwrap().meta, s.get(&c).unwrap().meta);
        assert_eq!((vb.state, vc.state), (JobState::Failed, JobState::Failed));
        assert_eq!(
            vb.error,
            format!("after: job {a}, which it waits for, was cancelled")
        );
        assert!(
            vc.error.starts_with(&format!(
                "after: job {b}, which it waits for, failed: after:"
            )),
            "{}",
            vc.error
        );
        let err = s.submit(after(&a, "d"), "").unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("after: job {a} was cancelled")),
            "{err}"
        );
        let err = s.retry(&b).unwrap_err().to_string();
        assert!(
            err.contains(&format!("after: job {a} was cancelled")),
            "{err}"
        );
        // A runs again: B, run again too, waits for it, and starts once it succeeded
        s.retry(&a).unwrap();
        assert_eq!(s.retry(&b).unwrap().state, JobState::Queued);
        assert_eq!(s.get(&b).unwrap().meta.waiting_on, std::slice::from_ref(&a));
        let l = s.lease(&w("w")).unwrap().unwrap();
        assert_eq!(l.task.id.job, a);
        assert!(s.lease(&w("w")).unwrap().is_none());
        // a job cancelled while it waits is left as it is when the job it waits for succeeds
        let mut from_a = single("x");
        from_a.params.init = Init::Job(a.clone());
        let from_a = submit_as(&s, "", from_a);
        s.cancel(&from_a).unwrap();
        s.complete(&l.lease_id, &hash("a result")).unwrap().unwrap();
        let left = s.get(&from_a).unwrap().meta;
        assert_eq!(left.state, JobState::Cancelled);
        assert_eq!(left.spec.params.init, Init::Job(a.clone()));
        let lb = s.lease(&w("w")).unwrap().unwrap();
        assert_eq!(lb.task.id.job, b);
        // B fails in its own right once A is gone: run again, it waits for nothing (A had succeeded)
        s.delete(&a).unwrap();
        s.fail(&lb.lease_id, "boom", FailureKind::Permanent)
            .unwrap();
        s.fail_job(&b, "its step failed").unwrap();
        assert_eq!(s.get(&b).unwrap().meta.state, JobState::Failed);
        assert_eq!(s.retry(&b).unwrap().state, JobState::Queued);
        assert!(s.get(&b).unwrap().meta.waiting_on.is_empty());
        assert_eq!(s.lease(&w("w")).unwrap().unwrap().task.id.job, b);

        // writes a restart finds unsettled: E after D, which the store holds as succeeded; G after F,
        // which it no longer holds
        let d = submit_as(&s, "", single("d"));
        let e = submit_as(&s, "", after(&d, "e"));
        let f = submit_as(&s, "", single("f"));
        let g = submit_as(&s, "", after(&f, "g"));
        let mut done = s.get(&d).unwrap().meta;
        done.state = JobState::Succeeded;
        store::wait(store.write(vec![Op::Job(done), Op::Delete(f.clone())])).unwrap();
        let s = Scheduler::new(SchedulerConfig::default(), store.clone()).unwrap();
        assert!(s.get(&e).unwrap().meta.waiting_on.is_empty());
        let vg = s.get(&g).unwrap().meta;
        assert_eq!(vg.state, JobState::Failed);
        assert_eq!(
            vg.error,
            format!("after: job {f}, which it waits for, is gone")
        );
        // and the store holds what it settled
        let again = Scheduler::new(SchedulerConfig::default(), store).unwrap();
        assert_eq!(again.get(&g).unwrap().meta.state, JobState::Failed);
        assert!(again.get(&e).unwrap().meta.waiting_on.is_empty());
    }
}
