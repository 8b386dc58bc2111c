//! The status page: what the farm is doing, at a glance, in a browser. Served by the coordinator on an HTTP
//! port of its own (`stylefarm coordinator --status-listen ADDR`; HTTPS with the coordinator's certificate
//! when it has one).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the page: jobs with their progress, each scale's preview (a tiled job's stitched scales, and its current scale's tiles as they finish, over the previous scale), thumbnails of results, cancel, pause, resume and retry buttons; workers with device, memory and health. It polls `/api/status` every second. |
//! | `GET /api/status` | the same as JSON ([`Status`]): the caller's jobs, newest first (at most [`MAX_JOBS`]), and the workers |
//! | `GET /api/jobs/{job_id}/tasks/{index}/preview` | a running task's latest preview, as its worker sent it (every few seconds: `--preview-secs`), a PNG of at most 256 px |
//! | `GET /api/jobs/{job_id}/tasks/{index}/log` | a task's log as text: what its worker logged in each of its last attempts, and how each ended (`stylefarm log`) |
//! | `GET /api/images/{sha256}?max=N` | a stored image as a PNG thumbnail, its longer side at most `N` px rounded up to one of [`THUMBNAIL_SIZES`] (`N` from 16 to 1024, default 256) |
//! | `POST /api/jobs/{job_id}/cancel` | cancels a job, as RenderService's CancelJob does; needs the header `X-Stylefarm-Csrf: 1` |
//! | `POST /api/jobs/{job_id}/tasks/{index}/cancel`, `.../retry` | cancels a keep-going batch's or sweep's task alone, or runs one that failed or was cancelled again, as CancelJob and RetryJob with `tasks` do; the same header |
//! | `POST /api/jobs/{job_id}/retry` | runs a failed or cancelled job again (or a keep-going batch's or sweep's failed tasks while it runs), as RenderService's RetryJob does; the same header |
//! | `POST /api/jobs/{job_id}/pause`, `.../resume` | pauses or resumes a job, as RenderService's PauseJob and ResumeJob do; the same header |
//! | `POST /login`, `POST /logout` | a session for a client token, its id in an HttpOnly, SameSite=Strict cookie (or the session ended) |
//!
//! With auth on, the page, its JSON, its images and its buttons' calls need a client token, exactly as
//! RenderService does (the same check, [`crate::auth`]): `Authorization: Bearer <token>` (scripts) or the
//! cookie that `POST /login` sets (browsers; the page shows a token form). The script, the style sheet,
//! the login form and the logout hold no data and are open. A tenant sees its own jobs, as through
//! ListJobs, and every worker (the task a worker renders for another tenant is shown without its job).
//! Images, as through DownloadResult, are served to any client that knows their sha256. The cookie holds
//! a session id (256 random bits), never the token: the coordinator keeps the token with it, checks it
//! again at every request, and forgets it at logout or after [`SESSION_TTL`] (and when it restarts). As
//! any cookie it goes to every port of the host: serve the page over HTTPS where the network is not
//! trusted. Login and logout refuse requests that a browser marks as coming from another site
//! (`Sec-Fetch-Site`).
//!
//! With auth off, the page answers only requests for an IP address, `localhost` (or a name under it), or
//! a host the operator allows (`--status-allowed-host`): 403 for another `Host`. A web page's server
//! could otherwise point a name of its own at this address (DNS rebinding), and the page's scripts,
//! served from that name, would read the farm's jobs and press its buttons as the same origin.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::{Deserialize, Serialize};
use stylefarm_core::ids::{JobId, WorkerId};
use stylefarm_core::job::{ImageHash, JobKind};
use stylefarm_core::progress::TaskProgress;
use stylefarm_core::{imaging, job::ScalePart};

use crate::auth::Tenant;
use crate::model::{JobMeta, JobState, TaskRecord, TaskState};
use crate::scheduler::{LeaseView, Waiting};
use crate::workers::Gone;
use crate::{Coordinator, Error};

/// Jobs the page lists, newest first.
pub const MAX_JOBS: usize = 50;
/// Tasks listed per job (a tiled job's current scale, or a batch's first tasks); the counts cover all.
pub const MAX_TASKS_SHOWN: usize = 400;
/// Tasks listed over all the jobs of one answer: the rows are made under the scheduler's lock, so this
/// bounds the time a page's poll holds it.
pub const MAX_TASKS_SHOWN_IN_ALL: usize = 2_000;
/// Workers listed: busy, idle, then silent, each group by id.
pub const MAX_WORKERS_SHOWN: usize = 500;
/// The thumbnails' sizes (longest side, px): a request's `max` is rounded up to one of them, so that an
/// image has at most this many thumbnails.
pub const THUMBNAIL_SIZES: [u32; 5] = [64, 128, 256, 512, 1024];
/// Bytes of encoded thumbnails kept, the oldest dropped first.
const THUMBNAIL_CACHE_BYTES: usize = 64 << 20;
/// Thumbnails made at once (each decodes a stored image on the blocking pool).
const THUMBNAIL_PERMITS: usize = 2;
/// The cookie `POST /login` sets: a session id.
const COOKIE: &str = "stylefarm_session";
/// How long a login lasts: the session's life on the coordinator, and its cookie's `Max-Age`.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The most sessions kept at once; a login beyond them ends the oldest.
const MAX_SESSIONS: usize = 10_000;
/// The most sessions of one token; a login beyond them ends that token's oldest (so that one token's
/// logins cannot end everyone else's).
const MAX_SESSIONS_PER_TOKEN: usize = 64;

/// The browsers logged in: each session id (a cookie's value) with the client token it logged in with
/// and when, until logout or [`SESSION_TTL`].
#[derive(Default)]
struct Sessions(Mutex<HashMap<String, (String, Instant)>>);

impl Sessions {
    /// A new session for `token`; its id (64 hex digits of a CSPRNG's output).
    fn open(&self, token: &str) -> String {
        let id = stylefarm_core::ids::hex(&rand::random::<[u8; 32]>());
        let mut sessions = self.0.lock().unwrap();
        sessions.retain(|_, (_, at)| at.elapsed() < SESSION_TTL);
        let own = sessions.values().filter(|(t, _)| t == token).count();
        if own >= MAX_SESSIONS_PER_TOKEN || sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .filter(|(_, (t, _))| own < MAX_SESSIONS_PER_TOKEN || t == token)
                .min_by_key(|(_, (_, at))| *at)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                sessions.remove(&oldest);
            }
        }
        sessions.insert(id.clone(), (token.to_string(), Instant::now()));
        id
    }

    /// The token of a live session.
    fn token(&self, id: &str) -> Option<String> {
        let sessions = self.0.lock().unwrap();
        let (token, at) = sessions.get(id)?;
        (at.elapsed() < SESSION_TTL).then(|| token.clone())
    }

    fn close(&self, id: &str) {
        self.0.lock().unwrap().remove(id);
    }
}
/// The header that a state-changing request must carry: a page of another origin cannot send it without
/// the coordinator's CORS consent, which it never gives.
const CSRF_HEADER: &str = "x-stylefarm-csrf";

const PAGE: &str = include_str!("status/index.html");
const SCRIPT: &str = include_str!("status/status.js");
const STYLE: &str = include_str!("status/status.css");
const LOGIN: &str = include_str!("status/login.html");

/// The most of a job's content images left out at its submit that the page lists (a poll's answer stays
/// small: 999 of them, 512 bytes each, in each of 50 jobs would be 25 MB).
pub const MAX_LEFT_OUT_SHOWN: usize = 20;

/// The page's JSON: `GET /api/status`.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The tenant of the caller's token; empty when auth is off.
    pub tenant: String,
    /// Whether the coordinator asks for tokens (the page then offers to log out).
    pub auth: bool,
    /// The coordinator's clock, Unix ms.
    pub now_ms: i64,
    /// The caller's jobs, newest first (at most [`MAX_JOBS`]).
    pub jobs: Vec<JobRow>,
    /// The workers: busy, idle, then silent; each group by id.
    pub workers: Vec<WorkerRow>,
}

/// A job on the page.
#[derive(Debug, Serialize)]
pub struct JobRow {
    /// The job's id.
    pub id: String,
    /// Its name ([`stylefarm_core::job::JobSpec::name`]); empty: none.
    pub name: String,
    /// `single`, `batch`, `sweep` or `tiled`.
    pub kind: &'static str,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: &'static str,
    /// Whether that state is final (succeeded, failed or cancelled): no cancel button then.
    pub finished: bool,
    /// Paused by its client: its queued tasks wait until it is resumed.
    pub paused: bool,
    /// Keep-going ([`stylefarm_core::job::JobSpec::keep_going`]): its tasks are cancelled and run again
    /// alone (a button each).
    pub keep_going: bool,
    /// Its priority (higher runs first).
    pub priority: i32,
    /// When it was submitted, Unix ms.
    pub submitted_ms: i64,
    /// When it ended, Unix ms; 0 until then.
    pub finished_ms: i64,
    /// Why it failed; "cancelled" when cancelled; empty otherwise.
    pub error: String,
    /// Why it has tasks queued and none running, when no live worker may take them
    /// ([`Waiting::reason`]); empty otherwise.
    pub waiting: String,
    /// The first [`MAX_LEFT_OUT_SHOWN`] content images its client left out at its submit, each saying which
    /// and why ([`stylefarm_core::job::JobSpec::left_out`]).
    pub left_out: Vec<String>,
    /// How many it left out.
    pub left_out_count: usize,
    /// How much is done, 0 to 1: the mean of the tasks' fractions (a tiled job: of its scales', each the
    /// mean of its tiles').
    pub progress: f64,
    /// Tasks by state name, over all the job's tasks.
    pub counts: BTreeMap<&'static str, usize>,
    /// A tiled job's scales; 0 for the other kinds.
    pub scales: u32,
    /// A tiled job's scale being rendered, 1-based (`scales` once the last is stitched); 0 for the other
    /// kinds.
    pub scale: u32,
    /// A tiled job: the current scale's canvas, in px (0 x 0 for its first, untiled scale).
    pub canvas: [u32; 2],
    /// The job's own images: a tiled job's stitched scales, a sweep's contact sheet, the final result.
    pub previews: Vec<Preview>,
    /// A tiled job's current scale: its tiles; the other kinds: their tasks (at most
    /// [`MAX_TASKS_SHOWN`], fewer when the answer's [`MAX_TASKS_SHOWN_IN_ALL`] is reached).
    pub tasks: Vec<TaskRow>,
    /// How many tasks `tasks` is the first of: the current scale's tiles, or all the job's tasks.
    pub tasks_of: usize,
}

/// An image of a job.
#[derive(Debug, Serialize)]
pub struct Preview {
    /// For people: "scale 2 of 3", "contact sheet", "result".
    pub label: String,
    /// The image's sha256 (`/api/images/{sha256}`).
    pub image: String,
}

/// A task (or a tile of the current scale) on the page.
#[derive(Debug, Serialize)]
pub struct TaskRow {
    /// The task's index in its job.
    pub index: u32,
    /// What it renders, for people.
    pub label: String,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: &'static str,
    /// The worker of its current or last attempt.
    pub worker: String,
    /// Attempts so far.
    pub attempts: u32,
    /// How much is done, 0 to 1.
    pub progress: f64,
    /// The iteration its worker last reported, of `iterations` of the current scale; 0 before any, and
    /// once the task ended (progress is kept only while it runs: `progress` says 1 for one done).
    pub iteration: u32,
    /// The iterations of the scale being rendered; 0 before a report, and once the task ended.
    pub iterations: u32,
    /// The objective at `iteration`.
    pub loss: Option<f64>,
    /// Seconds left, as its worker's engine estimates them, while it runs.
    pub eta_s: Option<f64>,
    /// The result's sha256, once succeeded.
    pub result: String,
    /// The last failed attempt's error.
    pub error: String,
    /// What the engine warned of while it rendered the result, once succeeded (`pb::TaskStatus::warnings`):
    /// the first, with how many more there are.
    pub warnings: Vec<String>,
    /// Its last checkpoint (`--checkpoint-every`, `--checkpoint-secs`), which its next attempt starts
    /// from: scale and iteration.
    pub checkpoint: Option<[u32; 2]>,
    /// A tile: its rectangle in the canvas, px (x, y, width, height).
    pub rect: Option<[u32; 4]>,
    /// While it runs: when its worker's latest preview of the image came (ms since the Unix epoch), served
    /// at `/api/jobs/{job}/tasks/{index}/preview`; 0: none yet.
    pub preview_ms: i64,
}

/// A worker on the page.
#[derive(Debug, Serialize)]
pub struct WorkerRow {
    /// The worker's id (its name and a number).
    pub id: String,
    /// "cpu", "cuda:0", ...; empty when unknown (a worker seen without its registration).
    pub device: String,
    /// Its tags (jobs asking for tags go only to workers with all of them).
    pub tags: Vec<String>,
    /// The device's memory, bytes; 0: unknown.
    pub memory_bytes: u64,
    /// The memory in use as last reported, bytes (the device's on a GPU, the process's on a CPU); 0:
    /// unknown.
    pub memory_used_bytes: u64,
    /// Seconds since it last called; -1: not since this coordinator started (a name drained, listed
    /// while none of its workers has called).
    pub last_seen_s: f64,
    /// `busy` (it holds a lease), `idle` (it asks for work: [`crate::workers::WorkerInfo::asking`]),
    /// `silent` (neither: a worker that died idle, or not heard from for a lease period while holding a
    /// lease, or since a lease of it expired), `left` (signed off).
    pub health: &'static str,
    /// The job of the task it renders when the job is the caller's, else empty.
    pub job_id: String,
    /// That task's index.
    pub task: Option<u32>,
    /// How much of its task is done, 0 to 1.
    pub progress: f64,
    /// Drained ([`Coordinator::drain_workers`]): it takes no new task.
    pub drained: bool,
    /// Stopping ([`WorkerInfo::leaving`](crate::workers::WorkerInfo::leaving)): it finishes its task and
    /// signs off.
    pub leaving: bool,
    /// Another live worker process registered under its name, as it is live: the farm counts them as one.
    pub name_shared: bool,
}

/// Each worker's lease that it renders: the latest handed out to it (a worker still reporting its last task
/// holds that one's lease too).
fn by_worker(leases: &[LeaseView]) -> HashMap<WorkerId, LeaseView> {
    let mut by_worker: HashMap<WorkerId, LeaseView> = HashMap::new();
    for lease in leases {
        match by_worker.get(&lease.worker) {
            Some(held) if held.leased_ms >= lease.leased_ms => {}
            _ => drop(by_worker.insert(lease.worker.clone(), lease.clone())),
        }
    }
    by_worker
}

/// How much of a task is done, 0 to 1.
fn task_fraction(state: TaskState, progress: Option<&TaskProgress>) -> f64 {
    match (state, progress) {
        (TaskState::Succeeded, _) => 1.0,
        (TaskState::Running, Some(p)) if p.scales > 0 && p.iterations > 0 => {
            let within = f64::from(p.iteration.min(p.iterations)) / f64::from(p.iterations);
            ((f64::from(p.scale.max(1) - 1) + within) / f64::from(p.scales)).clamp(0.0, 1.0)
        }
        _ => 0.0,
    }
}

fn task_row(t: &TaskRecord, p: Option<&TaskProgress>) -> TaskRow {
    TaskRow {
        index: t.index,
        label: t.spec.label.clone(),
        state: t.state.name(),
        worker: t.worker.to_string(),
        attempts: t.attempts,
        progress: task_fraction(t.state, p),
        iteration: p.map_or(0, |p| p.iteration),
        iterations: p.map_or(0, |p| p.iterations),
        loss: p.map(|p| p.losses.total),
        eta_s: p
            .filter(|p| t.state == TaskState::Running && p.eta_seconds > 0.0)
            .map(|p| p.eta_seconds),
        result: t
            .result
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        error: t.error.clone(),
        // the first, and how many more (a page of many tasks stays small; `stylefarm status` lists all)
        warnings: match &t.warnings[..] {
            [] => Vec::new(),
            [one] => vec![one.clone()],
            [first, rest @ ..] => vec![format!("{first} (and {} more)", rest.len())],
        },
        checkpoint: t.checkpoint.as_ref().map(|c| [c.scale, c.iteration]),
        rect: t.spec.scale.as_ref().and_then(|s| match s.part {
            ScalePart::Tile { rect, .. } | ScalePart::Shard { rect, .. } => {
                Some([rect.x, rect.y, rect.width, rect.height])
            }
            ScalePart::Whole { .. } => None,
        }),
        preview_ms: 0,
    }
}

/// The mean of the tasks' fractions done (0 for none).
fn fraction_of<'a>(tasks: impl Iterator<Item = &'a (&'a TaskRecord, Option<TaskProgress>)>) -> f64 {
    let (sum, n) = tasks
        .map(|(t, p)| task_fraction(t.state, p.as_ref()))
        .fold((0.0, 0usize), |(s, n), f| (s + f, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// A job as the page shows it, from its record and its tasks with their live progress, listing at most
/// `max_tasks` of them; `waiting` tells why it waits, if it does.
pub fn job_row(
    m: &JobMeta,
    all: &[(&TaskRecord, Option<TaskProgress>)],
    waiting: &Waiting,
    max_tasks: usize,
) -> JobRow {
    let max_tasks = max_tasks.min(MAX_TASKS_SHOWN);
    let replaced = crate::model::replaced_tasks(all.iter().map(|(t, _)| *t));
    let mut counts = BTreeMap::new();
    for (t, _) in all {
        let name = if replaced.contains(&t.index) {
            "replaced"
        } else {
            t.state.name()
        };
        *counts.entry(name).or_insert(0) += 1;
    }
    let scales = match m.spec.kind {
        JobKind::Tiled(_) => m.spec.pyramid_params().map_or(1, |p| p.scales.max(1)),
        _ => 0,
    };
    let mut previews = Vec::new();
    // the tasks listed: a tiled job's current scale, or all the job's tasks
    let (scale, canvas, progress, listed): (_, _, _, Vec<_>);
    if scales > 0 {
        // the scale being rendered (0-based): the first not stitched yet
        let current = (m.stage_results.len() as u32).min(scales - 1);
        // less the tasks a new plan replaced
        listed = all
            .iter()
            .filter(|(t, _)| t.spec.scale_index() == current && !replaced.contains(&t.index))
            .collect();
        let stitched = m.stage_results.len() as u32;
        let current_fraction = if stitched >= scales {
            0.0
        } else {
            fraction_of(listed.iter().copied())
        };
        progress = if m.state == JobState::Succeeded {
            1.0
        } else {
            (f64::from(stitched.min(scales)) + current_fraction) / f64::from(scales)
        };
        scale = (stitched + 1).min(scales);
        canvas = listed
            .iter()
            .find_map(|(t, _)| t.spec.scale.as_ref())
            .map_or([0, 0], |s| [s.canvas_width, s.canvas_height]);
        for (i, hash) in m.stage_results.iter().enumerate() {
            previews.push(Preview {
                label: format!("scale {} of {scales}", i + 1),
                image: hash.to_string(),
            });
        }
    } else {
        scale = 0;
        canvas = [0, 0];
        listed = all.iter().collect();
        progress = match m.spec.kind {
            // a video's frames are queued as they come: the fraction is of all its frames
            JobKind::Video(_) => {
                fraction_of(listed.iter().copied()) * listed.len() as f64
                    / m.spec.contents.len().max(1) as f64
            }
            _ => fraction_of(listed.iter().copied()),
        };
        if let (JobKind::Sweep(_), Some(sheet)) = (&m.spec.kind, &m.result) {
            previews.push(Preview {
                label: "contact sheet".into(),
                image: sheet.to_string(),
            });
        }
    }
    let tasks_of = listed.len();
    let tasks = listed
        .iter()
        .take(max_tasks)
        .map(|(t, p)| task_row(t, p.as_ref()))
        .collect();
    // the final image: the last scale's stitch, shown once
    if scales > 0 && m.stage_results.len() < scales as usize {
        if let Some(result) = &m.result {
            previews.push(Preview {
                label: "result".into(),
                image: result.to_string(),
            });
        }
    }
    JobRow {
        id: m.id.to_string(),
        name: m.spec.name.clone(),
        kind: m.spec.kind.name(),
        state: m.state.name(),
        finished: m.state.is_terminal(),
        paused: m.paused,
        keep_going: m.spec.keep_going,
        priority: m.spec.priority,
        submitted_ms: m.submitted_ms,
        finished_ms: m.finished_ms,
        error: m.error.clone(),
        waiting: waiting.reason(m, all.iter().map(|(t, _)| *t)),
        left_out: (m.spec.left_out.iter().take(MAX_LEFT_OUT_SHOWN).cloned()).collect(),
        left_out_count: m.spec.left_out.len(),
        progress,
        counts,
        scales,
        scale,
        canvas,
        previews,
        tasks,
        tasks_of,
    }
}

impl Coordinator {
    /// The page's JSON for `tenant`.
    pub fn status(&self, tenant: &Tenant) -> Status {
        let mut budget = MAX_TASKS_SHOWN_IN_ALL;
        let waiting = self.waiting();
        let mut jobs = self
            .scheduler
            .list_with(&tenant.0, MAX_JOBS, |meta, tasks| {
                let row = job_row(meta, tasks, &waiting, budget);
                budget -= row.tasks.len();
                row
            });
        let all = self.scheduler.leases();
        let previews: HashMap<(&str, u32), i64> = all
            .iter()
            .filter(|l| l.preview_ms > 0)
            .map(|l| ((l.job_id.as_str(), l.index), l.preview_ms))
            .collect();
        for job in &mut jobs {
            for task in &mut job.tasks {
                if let Some(&at) = previews.get(&(job.id.as_str(), task.index)) {
                    task.preview_ms = at;
                }
            }
        }
        let workers = self.worker_rows(tenant, &by_worker(&all));
        Status {
            tenant: tenant.0.clone(),
            auth: self.gate.enabled(),
            now_ms: crate::scheduler::now_ms(),
            jobs,
            workers,
        }
    }

    /// The workers for `tenant` ([`WorkerRow`]): busy, idle, then silent, each by id; at most
    /// [`MAX_WORKERS_SHOWN`].
    pub fn workers_status(&self, tenant: &Tenant) -> Vec<WorkerRow> {
        self.worker_rows(tenant, &by_worker(&self.scheduler.leases()))
    }

    /// [`Coordinator::workers_status`] with the leases by worker ([`by_worker`]).
    fn worker_rows(
        &self,
        tenant: &Tenant,
        leases: &HashMap<WorkerId, LeaseView>,
    ) -> Vec<WorkerRow> {
        let lease_period = self.scheduler.config().lease;
        let drained = self.scheduler.drained();
        let shared = self.workers.shared_names();
        let mut workers: Vec<WorkerRow> = self
            .workers
            .all()
            .into_iter()
            .map(|(id, w)| {
                let silent_for = w.last_seen.elapsed();
                let lease = leases.get(&id);
                let health = match lease {
                    _ if w.gone == Some(Gone::Left) => "left",
                    Some(_) if silent_for <= lease_period => "busy",
                    None if w.asking() => "idle",
                    _ => "silent",
                };
                let own = lease.filter(|l| l.tenant == tenant.0);
                WorkerRow {
                    id: id.to_string(),
                    device: w.device,
                    tags: w.tags,
                    memory_bytes: w.memory_bytes,
                    memory_used_bytes: w.memory_used_bytes,
                    last_seen_s: silent_for.as_secs_f64(),
                    health,
                    job_id: own.map(|l| l.job_id.to_string()).unwrap_or_default(),
                    task: own.map(|l| l.index),
                    progress: own.map_or(0.0, |l| {
                        task_fraction(TaskState::Running, l.progress.as_ref())
                    }),
                    drained: drained.contains(&id.by_name()),
                    leaving: w.leaving && w.gone != Some(Gone::Left),
                    name_shared: (shared.get(&id.by_name()))
                        .is_some_and(|p| p.contains(&w.instance)),
                }
            })
            .collect();
        // a name drained that no worker of has called (since the coordinator started, or that it forgot):
        // listed, so that a worker that comes back under it is not drained without a trace
        let named: HashSet<WorkerId> = workers
            .iter()
            .map(|w| WorkerId::from(w.id.as_str()).by_name())
            .collect();
        for name in drained.iter().filter(|n| !named.contains(*n)) {
            workers.push(WorkerRow {
                id: name.to_string(),
                device: String::new(),
                tags: Vec::new(),
                memory_bytes: 0,
                memory_used_bytes: 0,
                last_seen_s: -1.0,
                health: "silent",
                job_id: String::new(),
                task: None,
                progress: 0.0,
                drained: true,
                leaving: false,
                name_shared: false,
            });
        }
        let rank = |h: &str| match h {
            "busy" => 0,
            "idle" => 1,
            _ => 2,
        };
        workers.sort_by(|a, b| (rank(a.health), &a.id).cmp(&(rank(b.health), &b.id)));
        workers.truncate(MAX_WORKERS_SHOWN);
        workers
    }
}

/// The status page's shared state.
#[derive(Clone)]
struct Page {
    coordinator: Arc<Coordinator>,
    /// With auth off, the host names that requests may name besides IP addresses and `localhost`
    /// (lowercase, without a port).
    allowed_hosts: Arc<[String]>,
    /// Whether the page is served over HTTPS (its cookie is then `Secure`).
    https: bool,
    thumbnails: Arc<Thumbnails>,
    sessions: Arc<Sessions>,
}

/// A thumbnail's key: the image and the longest side asked for.
type ThumbnailKey = (ImageHash, u32);

/// Encoded thumbnails and the permits to make more.
struct Thumbnails {
    cache: Mutex<ThumbnailCache>,
    /// Thumbnails made at once (a permit held by the work itself, which a request that goes away leaves
    /// running).
    permits: Arc<tokio::sync::Semaphore>,
}

/// Thumbnails by key, the keys in insertion order (the oldest dropped first), at most
/// [`THUMBNAIL_CACHE_BYTES`] in all.
#[derive(Default)]
struct ThumbnailCache {
    map: HashMap<ThumbnailKey, bytes::Bytes>,
    order: VecDeque<ThumbnailKey>,
    bytes: usize,
}

impl ThumbnailCache {
    fn insert(&mut self, key: ThumbnailKey, png: bytes::Bytes) {
        let size = png.len();
        if size > THUMBNAIL_CACHE_BYTES || self.map.contains_key(&key) {
            return;
        }
        while self.bytes + size > THUMBNAIL_CACHE_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.bytes -= self.map.remove(&old).map_or(0, |b| b.len());
        }
        self.map.insert(key.clone(), png);
        self.order.push_back(key);
        self.bytes += size;
    }
}

/// An error page or JSON error: its status and a message for people.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (
            self.0,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let status = tonic::Status::from(e);
        Failure(http_status(status.code()), status.message().to_string())
    }
}

/// The HTTP status of a gRPC code, as gRPC's HTTP mapping has it.
fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        InvalidArgument | OutOfRange | FailedPrecondition => StatusCode::BAD_REQUEST,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        PermissionDenied => StatusCode::FORBIDDEN,
        NotFound => StatusCode::NOT_FOUND,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The session id in a request's login cookie.
fn session_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// The token a request carries: its `Authorization: Bearer` header, else its live session's.
fn token_of(headers: &HeaderMap, sessions: &Sessions) -> Option<String> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        return v.to_str().ok().map(str::to_string);
    }
    let token = sessions.token(session_of(headers)?)?;
    Some(format!("Bearer {token}"))
}

impl Page {
    /// The caller's tenant, by the same check as RenderService's; UNAUTHENTICATED (401) or
    /// PERMISSION_DENIED (403, a worker token) otherwise.
    fn tenant(&self, headers: &HeaderMap) -> Result<Tenant, Failure> {
        let mut request = tonic::Request::new(());
        let token = token_of(headers, &self.sessions);
        if token.is_none() && self.coordinator.gate.enabled() {
            // said for HTTP (gRPC's says its metadata, and the commands' flags)
            return Err(Failure(
                StatusCode::UNAUTHORIZED,
                "authorization: missing (log in at / with a client token, or send the header \
                 'Authorization: Bearer <token>')"
                    .into(),
            ));
        }
        if let Some(value) = token.and_then(|t| t.parse().ok()) {
            request
                .metadata_mut()
                .insert(stylefarm_proto::connect::AUTHORIZATION, value);
        }
        let mut check = self.coordinator.gate.clients();
        let request = tonic::service::Interceptor::call(&mut check, request)
            .map_err(|s| Failure(http_status(s.code()), s.message().to_string()))?;
        Ok(crate::auth::tenant(&request))
    }

    /// The login cookie: session `id` for `max_age` seconds (0: ends it).
    fn cookie(&self, id: &str, max_age: u64) -> HeaderValue {
        let secure = if self.https { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{secure}; Max-Age={max_age}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Headers of every page: no framing, no sniffing, no referrer, scripts and styles of this origin only.
fn page_headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 5] {
    [
        (header::CONTENT_TYPE, content_type),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; \
             frame-ancestors 'none'; form-action 'self'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ]
}

async fn index(State(page): State<Page>, headers: HeaderMap) -> Response {
    match page.tenant(&headers) {
        Ok(_) => (page_headers("text/html; charset=utf-8"), PAGE).into_response(),
        // no token yet: the form, without an error
        Err(Failure(code, _)) if token_of(&headers, &page.sessions).is_none() => {
            login_page(code, "")
        }
        Err(Failure(code, message)) => login_page(code, &message),
    }
}

fn login_page(code: StatusCode, message: &str) -> Response {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    (
        code,
        page_headers("text/html; charset=utf-8"),
        LOGIN.replace("{{message}}", &escaped),
    )
        .into_response()
}

/// The longest token the login form takes.
const MAX_LOGIN_TOKEN_BYTES: usize = 4096;

#[derive(Deserialize)]
struct Login {
    token: String,
}

/// A request that the browser marks as sent from another site's page (`Sec-Fetch-Site: cross-site` or
/// `same-site`): refused for login and logout, which a page of another site could otherwise post.
fn cross_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .is_some_and(|v| v != "same-origin" && v != "none")
}

async fn login(State(page): State<Page>, headers: HeaderMap, Form(login): Form<Login>) -> Response {
    if cross_site(&headers) {
        return login_page(
            StatusCode::FORBIDDEN,
            "login: refused from another site's page",
        );
    }
    let token = login.token.trim();
    // a session keeps its token (checked again at every request): no longer than a token may be, even
    // where the page asks for none (auth off)
    if token.len() > MAX_LOGIN_TOKEN_BYTES {
        return login_page(
            StatusCode::BAD_REQUEST,
            &format!("token: longer than {MAX_LOGIN_TOKEN_BYTES} bytes"),
        );
    }
    let mut headers = HeaderMap::new();
    if let Ok(v) = format!("Bearer {token}").parse() {
        headers.insert(header::AUTHORIZATION, v);
    }
    match page.tenant(&headers) {
        Ok(_) => {
            let id = page.sessions.open(token);
            (
                [(header::SET_COOKIE, page.cookie(&id, SESSION_TTL.as_secs()))],
                Redirect::to("/"),
            )
                .into_response()
        }
        Err(Failure(code, message)) => login_page(code, &message),
    }
}

async fn logout(State(page): State<Page>, headers: HeaderMap) -> Response {
    if cross_site(&headers) {
        return login_page(
            StatusCode::FORBIDDEN,
            "logout: refused from another site's page",
        );
    }
    if let Some(id) = session_of(&headers) {
        page.sessions.close(id);
    }
    (
        [(header::SET_COOKIE, page.cookie("", 0))],
        Redirect::to("/"),
    )
        .into_response()
}

async fn status_json(State(page): State<Page>, headers: HeaderMap) -> Result<Response, Failure> {
    let tenant = page.tenant(&headers)?;
    let coordinator = page.coordinator.clone();
    let status = tokio::task::spawn_blocking(move || coordinator.status(&tenant))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(status)).into_response())
}

async fn cancel(
    State(page): State<Page>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let (state, _) = job_action(&page, &headers, job_id, |coordinator, tenant, job_id| {
        coordinator.cancel_own(tenant, job_id, &[])
    })
    .await?;
    Ok(Json(serde_json::json!({ "state": state.name() })).into_response())
}

async fn pause(
    State(page): State<Page>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    pause_or_resume(page, job_id, headers, true).await
}

async fn resume(
    State(page): State<Page>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    pause_or_resume(page, job_id, headers, false).await
}

async fn pause_or_resume(
    page: Page,
    job_id: String,
    headers: HeaderMap,
    paused: bool,
) -> Result<Response, Failure> {
    let state = job_action(
        &page,
        &headers,
        job_id,
        move |coordinator, tenant, job_id| coordinator.pause_own(tenant, job_id, paused),
    )
    .await?;
    Ok(Json(serde_json::json!({ "state": state.name() })).into_response())
}

async fn retry(
    State(page): State<Page>,
    Path(job_id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let retried = job_action(&page, &headers, job_id, |coordinator, tenant, job_id| {
        coordinator.retry_own(tenant, job_id, &[])
    })
    .await?;
    Ok(Json(serde_json::json!({
        "state": retried.state.name(),
        "requeued": retried.requeued,
    }))
    .into_response())
}

async fn cancel_task(
    State(page): State<Page>,
    Path((job_id, index)): Path<(String, u32)>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let (state, cancelled) = job_action(
        &page,
        &headers,
        job_id,
        move |coordinator, tenant, job_id| coordinator.cancel_own(tenant, job_id, &[index]),
    )
    .await?;
    Ok(Json(serde_json::json!({ "state": state.name(), "cancelled": cancelled })).into_response())
}

async fn retry_task(
    State(page): State<Page>,
    Path((job_id, index)): Path<(String, u32)>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let retried = job_action(
        &page,
        &headers,
        job_id,
        move |coordinator, tenant, job_id| coordinator.retry_own(tenant, job_id, &[index]),
    )
    .await?;
    Ok(Json(serde_json::json!({
        "state": retried.state.name(),
        "requeued": retried.requeued,
    }))
    .into_response())
}

/// A button's POST on one of the caller's jobs: its tenant and the page's CSRF header checked, then
/// `action` on the blocking pool (it waits for the store).
async fn job_action<T: Send + 'static>(
    page: &Page,
    headers: &HeaderMap,
    job_id: String,
    action: impl FnOnce(&Arc<Coordinator>, &Tenant, &JobId) -> Result<T, Error> + Send + 'static,
) -> Result<T, Failure> {
    let tenant = page.tenant(headers)?;
    if headers.get(CSRF_HEADER).is_none() {
        return Err(Failure(
            StatusCode::FORBIDDEN,
            format!("{CSRF_HEADER}: missing (the page's own requests send it)"),
        ));
    }
    let coordinator = page.coordinator.clone();
    let job_id = JobId::from(job_id);
    Ok(
        tokio::task::spawn_blocking(move || action(&coordinator, &tenant, &job_id))
            .await
            .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??,
    )
}

/// Job `job_id` when it is the caller's (by the token or session of `headers`); NOT_FOUND otherwise, as
/// for a job that does not exist.
fn callers_job(page: &Page, headers: &HeaderMap, job_id: String) -> Result<JobId, Failure> {
    let tenant = page.tenant(headers)?;
    let job_id = JobId::from(job_id);
    page.coordinator.check_own(&tenant, &job_id)?;
    Ok(job_id)
}

/// The latest preview of a running task of the caller's job, as its worker sent it (a PNG of at most 256
/// px); NOT_FOUND once the task no longer runs, or before its first preview.
async fn preview(
    State(page): State<Page>,
    Path((job_id, index)): Path<(String, u32)>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let job_id = callers_job(&page, &headers, job_id)?;
    let preview = page
        .coordinator
        .scheduler
        .preview(&job_id, index)
        .ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                format!("job {job_id} task {index}: no preview (not running, or none sent yet)"),
            )
        })?;
    let headers = [
        (header::CONTENT_TYPE, "image/png"),
        // the page asks with `?v=` the preview's time: an address keeps its image
        (header::CACHE_CONTROL, "private, max-age=300"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    Ok((headers, preview.png).into_response())
}

/// A task of the caller's job: its log as text ([`stylefarm_core::task_log::text`]), as RenderService's
/// GetTaskLog has it.
async fn task_log(
    State(page): State<Page>,
    Path((job_id, index)): Path<(String, u32)>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    let job_id = callers_job(&page, &headers, job_id)?;
    let attempts = page
        .coordinator
        .scheduler
        .task_log(&job_id, index)
        .map_err(Error::from)?;
    let headers = [
        (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    Ok((headers, stylefarm_core::task_log::text(&attempts)).into_response())
}

#[derive(Deserialize)]
struct ThumbnailQuery {
    max: Option<u32>,
}

/// Thumbnails' longest side, px: the default and the bounds of `max`.
const THUMBNAIL_DEFAULT: u32 = 256;
const THUMBNAIL_MIN: u32 = 16;
const THUMBNAIL_MAX: u32 = THUMBNAIL_SIZES[THUMBNAIL_SIZES.len() - 1];

async fn thumbnail(
    State(page): State<Page>,
    Path(sha256): Path<String>,
    Query(q): Query<ThumbnailQuery>,
    headers: HeaderMap,
) -> Result<Response, Failure> {
    page.tenant(&headers)?;
    let hash: ImageHash = sha256.parse().map_err(|_| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("sha256: '{sha256}' is not a sha256"),
        )
    })?;
    let max = q.max.unwrap_or(THUMBNAIL_DEFAULT);
    if !(THUMBNAIL_MIN..=THUMBNAIL_MAX).contains(&max) {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("max: {max} px is outside {THUMBNAIL_MIN} to {THUMBNAIL_MAX}"),
        ));
    }
    // one of the few sizes, so that an image has few thumbnails
    let max = THUMBNAIL_SIZES
        .into_iter()
        .find(|&size| size >= max)
        .unwrap_or(THUMBNAIL_MAX);
    let key = (hash, max);
    let cached = |page: &Page| page.thumbnails.cache.lock().ok()?.map.get(&key).cloned();
    let png = match cached(&page) {
        Some(png) => png,
        None => {
            let permit = page
                .thumbnails
                .permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
            // made while this request waited for its permit?
            match cached(&page) {
                Some(png) => png,
                None => {
                    let coordinator = page.coordinator.clone();
                    let hash = key.0.clone();
                    let png = tokio::task::spawn_blocking(move || {
                        let _permit = permit;
                        coordinator.thumbnail(&hash, max)
                    })
                    .await
                    .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
                    if let Ok(mut cache) = page.thumbnails.cache.lock() {
                        cache.insert(key, png.clone());
                    }
                    png
                }
            }
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            // an image's bytes never change under its hash
            (
                header::CACHE_CONTROL,
                "private, max-age=31536000, immutable",
            ),
        ],
        png,
    )
        .into_response())
}

impl Coordinator {
    /// Job `job_id` is `tenant`'s; NOT_FOUND otherwise, as for a job that does not exist (another
    /// tenant's job ids are not confirmed).
    pub(crate) fn check_own(&self, tenant: &Tenant, job_id: &JobId) -> Result<(), Error> {
        if job_id.is_empty() {
            return Err(Error::invalid("job_id", "missing"));
        }
        if self.scheduler.tenant_of(job_id)? == tenant.0 {
            Ok(())
        } else {
            Err(crate::scheduler::SchedulerError::JobNotFound(job_id.clone()).into())
        }
    }

    /// Cancels `tenant`'s job `job_id`, or only its tasks `tasks` when some are named, as RenderService's
    /// CancelJob ([`crate::scheduler::Scheduler::cancel`], [`crate::scheduler::Scheduler::cancel_tasks`]):
    /// NOT_FOUND for another tenant's. Returns the job's state and how many of `tasks` were cancelled.
    pub(crate) fn cancel_own(
        self: &Arc<Self>,
        tenant: &Tenant,
        job_id: &JobId,
        tasks: &[u32],
    ) -> Result<(JobState, usize), Error> {
        self.check_own(tenant, job_id)?;
        if tasks.is_empty() {
            let state = self.scheduler.cancel(job_id)?;
            tracing::info!(job_id = job_id.as_str(), ?state, "job cancel");
            return Ok((state, 0));
        }
        let cancelled = self.scheduler.cancel_tasks(job_id, tasks);
        // a keep-going sweep whose last variants to run were cancelled: its contact sheet is made now
        for job_id in self.scheduler.take_stage_due() {
            self.spawn_stage_work(job_id);
        }
        let (state, cancelled) = cancelled?;
        tracing::info!(
            job_id = job_id.as_str(),
            ?tasks,
            cancelled,
            ?state,
            "tasks cancel"
        );
        Ok((state, cancelled))
    }

    /// Pauses (`paused`) or resumes `tenant`'s job `job_id`, as RenderService's PauseJob and ResumeJob
    /// ([`crate::scheduler::Scheduler::set_paused`]): NOT_FOUND for another tenant's.
    pub(crate) fn pause_own(
        &self,
        tenant: &Tenant,
        job_id: &JobId,
        paused: bool,
    ) -> Result<JobState, Error> {
        self.check_own(tenant, job_id)?;
        let state = self.scheduler.set_paused(job_id, paused)?;
        tracing::info!(job_id = job_id.as_str(), paused, "job paused or resumed");
        Ok(state)
    }

    /// Runs `tenant`'s failed or cancelled job `job_id` again, as RenderService's RetryJob
    /// ([`crate::scheduler::Scheduler::retry`]), and starts its stage work when that is what failed:
    /// NOT_FOUND for another tenant's. Blocking (the store's write); needs a Tokio runtime.
    pub(crate) fn retry_own(
        self: &Arc<Self>,
        tenant: &Tenant,
        job_id: &JobId,
        tasks: &[u32],
    ) -> Result<crate::scheduler::Retried, Error> {
        self.check_own(tenant, job_id)?;
        let retried = self.scheduler.retry_tasks(job_id, tasks).inspect_err(|_| {
            // a write that failed after the job changed in memory: its step still runs (a restart, or
            // the store back in reach, would start it too)
            if self.scheduler.awaits_step(job_id) {
                self.spawn_stage_work(job_id.clone());
            }
        })?;
        tracing::info!(
            job_id = job_id.as_str(),
            state = retried.state.name(),
            ?tasks,
            requeued = retried.requeued,
            stage_work = retried.stage_work,
            "job retry"
        );
        if retried.stage_work {
            self.spawn_stage_work(job_id.clone());
        }
        Ok(retried)
    }

    /// Deletes `tenant`'s finished job `job_id`, as RenderService's DeleteJob: NOT_FOUND for another
    /// tenant's ([`crate::scheduler::Scheduler::delete`]).
    pub(crate) fn delete_own(&self, tenant: &Tenant, job_id: &JobId) -> Result<(), Error> {
        self.check_own(tenant, job_id)?;
        self.scheduler.delete(job_id)?;
        tracing::info!(job_id = job_id.as_str(), "job deleted");
        Ok(())
    }

    /// Stored image `hash` as a PNG, its longer side at most `max` px (never enlarged); NOT_FOUND when
    /// it is not stored.
    fn thumbnail(&self, hash: &ImageHash, max: u32) -> Result<bytes::Bytes, Error> {
        let bytes = self
            .blobs
            .get(hash)?
            .ok_or_else(|| Error::NotFound(format!("sha256: image {hash} is not stored")))?;
        // decoded within the decode budget, as a stitch's images are: a large stored image asked for at
        // several sizes at once would otherwise hold several decodes beside the budget's
        let header = imaging::header(std::io::Cursor::new(&bytes), hash.as_str())?;
        let _share = self.decoding.share_blocking(header.decode_bytes)?;
        let img = imaging::decode(&bytes, hash.as_str())?;
        Ok(imaging::thumbnail_png(&img, max, hash.as_str())?.into())
    }
}

/// The host that `authority` (a `Host` header or an HTTP/2 `:authority`, as [`http::uri::Authority`] reads
/// it: a name or an IP address, IPv6 in brackets, with or without userinfo and a port) names: lowercase,
/// without its brackets or a trailing dot; `None` for text that is no authority.
pub fn host_name(authority: &str) -> Option<String> {
    let authority: http::uri::Authority = authority.trim().parse().ok()?;
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether a request for `authority` ([`host_name`]'s) is answered with auth off: an IP address,
/// `localhost` or a name under it, or one of `allowed` ([`host_name`]s).
fn host_allowed(authority: &str, allowed: &[String]) -> bool {
    host_name(authority).is_some_and(|name| {
        name.parse::<std::net::IpAddr>().is_ok()
            || name == "localhost"
            || name.ends_with(".localhost")
            || allowed.contains(&name)
    })
}

/// With auth off, refuses (403) a request whose host (HTTP/2's `:authority`, else the `Host` header) is
/// not [`host_allowed`], or that names none; passes the others on.
async fn check_host(
    State(page): State<Page>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !page.coordinator.gate.enabled() {
        let host = match request.uri().authority() {
            Some(authority) => Some(authority.as_str()),
            None => request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok()),
        };
        if !host.is_some_and(|h| host_allowed(h, &page.allowed_hosts)) {
            let host = host.unwrap_or("(none)");
            return Failure(
                StatusCode::FORBIDDEN,
                format!(
                    "host '{host}' is not allowed: without tokens the status page answers requests \
                     for an IP address or localhost only (another name could be one that a web page \
                     points at this address); name it with --status-allowed-host, or configure tokens"
                ),
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// The page's routes over `coordinator`; `https`: whether they are served over TLS (the cookie is then
/// `Secure`); `allowed_hosts`: with auth off, the host names requests may name besides IP addresses and
/// `localhost` ([the module's docs](self)).
pub fn router(coordinator: Arc<Coordinator>, https: bool, allowed_hosts: &[String]) -> Router {
    let page = Page {
        coordinator,
        allowed_hosts: allowed_hosts
            .iter()
            .filter_map(|h| host_name(h))
            .filter(|h| !h.is_empty())
            .collect(),
        https,
        thumbnails: Arc::new(Thumbnails {
            cache: Mutex::default(),
            permits: Arc::new(tokio::sync::Semaphore::new(THUMBNAIL_PERMITS)),
        }),
        sessions: Arc::default(),
    };
    let asset = |content_type: &'static str, body: &'static str| {
        get(move || async move { (page_headers(content_type), body) })
    };
    Router::new()
        .route("/", get(index))
        .route(
            "/status.js",
            asset("text/javascript; charset=utf-8", SCRIPT),
        )
        .route("/status.css", asset("text/css; charset=utf-8", STYLE))
        .route("/login", post(login))
        .route("/logout", post(logout))
        .route("/api/status", get(status_json))
        .route("/api/images/{sha256}", get(thumbnail))
        .route("/api/jobs/{job_id}/cancel", post(cancel))
        .route("/api/jobs/{job_id}/retry", post(retry))
        .route("/api/jobs/{job_id}/pause", post(pause))
        .route("/api/jobs/{job_id}/resume", post(resume))
        .route("/api/jobs/{job_id}/tasks/{index}/cancel", post(cancel_task))
        .route("/api/jobs/{job_id}/tasks/{index}/retry", post(retry_task))
        .route("/api/jobs/{job_id}/tasks/{index}/preview", get(preview))
        .route("/api/jobs/{job_id}/tasks/{index}/log", get(task_log))
        .layer(axum::middleware::from_fn_with_state(
            page.clone(),
            check_host,
        ))
        .with_state(page)
}

/// Serves the status page on `listener` until the process ends: over HTTPS with the coordinator's
/// certificate when it has one (`--tls-cert`), else plain HTTP; `allowed_hosts` as [`router`] takes them.
/// Logs the URL ("status page on http://ADDR/").
pub async fn serve_status(
    listener: std::net::TcpListener,
    coordinator: Arc<Coordinator>,
    allowed_hosts: &[String],
) -> Result<SocketAddr, Error> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    match coordinator.tls_files.clone() {
        Some(tls) => {
            let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(
                tls.rustls_server_config()?,
            ));
            let app = router(coordinator, true, allowed_hosts);
            tracing::info!("status page on https://{addr}/");
            let server = axum_server::from_tcp_rustls(listener, config)
                .map_err(|e| Error::Transport(format!("status page: {e}")))?;
            tokio::spawn(async move {
                if let Err(e) = server.serve(app.into_make_service()).await {
                    tracing::error!(error = %e, "the status page stopped");
                }
            });
        }
        None => {
            let app = router(coordinator, false, allowed_hosts);
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tracing::info!("status page on http://{addr}/");
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "the status page stopped");
                }
            });
        }
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker holding two leases (it reports one task while it renders the next) is shown with the later.
    #[test]
    fn a_worker_is_shown_with_the_lease_it_took_last() {
        let lease = |worker: &str, index: u32, leased_ms: i64| LeaseView {
            worker: WorkerId::from(worker),
            job_id: JobId::from("j"),
            tenant: String::new(),
            index,
            progress: None,
            preview_ms: 0,
            leased_ms,
        };
        for leases in [
            vec![lease("w1", 0, 10), lease("w1", 1, 20), lease("w2", 2, 15)],
            vec![lease("w2", 2, 15), lease("w1", 1, 20), lease("w1", 0, 10)],
        ] {
            let shown = by_worker(&leases);
            assert_eq!(shown.len(), 2);
            assert_eq!(shown[&WorkerId::from("w1")].index, 1);
            assert_eq!(shown[&WorkerId::from("w2")].index, 2);
        }
    }

    /// Without tokens: IP addresses (with or without a port, IPv6 in brackets), localhost and names under
    /// it, and the allowed names, whatever their case or a trailing dot; not other names, nor an IP
    /// address inside one.
    #[test]
    fn without_tokens_the_page_answers_ip_addresses_localhost_and_allowed_hosts() {
        // as the flag may give them: a port, spaces around a comma-separated name
        let allowed: Vec<String> = ["farm.lan:8080", " Other.LAN "]
            .iter()
            .filter_map(|h| host_name(h))
            .collect();
        assert_eq!(allowed, ["farm.lan", "other.lan"]);
        for host in [
            "127.0.0.1",
            "127.0.0.1:7701",
            "10.1.2.3:80",
            "[::1]:7701",
            "[fe80::1]",
            "localhost:7701",
            "LOCALHOST.",
            "app.localhost",
            "farm.lan:7701",
            "Farm.LAN.",
        ] {
            assert!(host_allowed(host, &allowed), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:7701",
            "127.0.0.1.nip.io:7701",
            "localhost.attacker.example",
            "farm.lan.attacker.example",
            "[::1",
            "",
        ] {
            assert!(!host_allowed(host, &allowed), "{host}");
        }
    }

    /// A task's row shows its last checkpoint (scale, iteration), none before one is saved.
    #[test]
    fn a_task_row_shows_its_checkpoint() {
        let spec = stylefarm_core::job::JobSpec {
            checkpoint_every: 10,
            ..stylefarm_core::job::JobSpec::new(
                stylefarm_core::job::JobKind::Single,
                vec![ImageHash::of(b"c")],
                vec![ImageHash::of(b"s")],
                Default::default(),
            )
        };
        let mut task = TaskRecord::pending(0, spec.tasks().unwrap().remove(0));
        assert_eq!(task_row(&task, None).checkpoint, None);
        task.checkpoint = Some(stylefarm_core::checkpoint::Checkpoint {
            bytes: 4096,
            blob: ImageHash::of(b"checkpoint"),
            scale: 2,
            iteration: 40,
        });
        let row = serde_json::to_value(task_row(&task, None)).unwrap();
        assert_eq!(row["checkpoint"], serde_json::json!([2, 40]));
    }

    #[test]
    fn a_task_is_done_by_its_scales_and_iterations() {
        let p = |scale, scales, iteration, iterations| TaskProgress {
            scale,
            scales,
            iteration,
            iterations,
            ..Default::default()
        };
        assert_eq!(task_fraction(TaskState::Pending, None), 0.0);
        assert_eq!(task_fraction(TaskState::Succeeded, None), 1.0);
        assert_eq!(task_fraction(TaskState::Running, None), 0.0);
        assert_eq!(
            task_fraction(TaskState::Running, Some(&p(1, 1, 25, 100))),
            0.25
        );
        // the second of two scales, half done
        assert_eq!(
            task_fraction(TaskState::Running, Some(&p(2, 2, 50, 100))),
            0.75
        );
        // nonsense from a worker stays within 0..1
        assert_eq!(
            task_fraction(TaskState::Running, Some(&p(9, 2, 500, 100))),
            1.0
        );
        assert_eq!(task_fraction(TaskState::Running, Some(&p(1, 0, 5, 0))), 0.0);
        assert_eq!(task_fraction(TaskState::Failed, Some(&p(1, 1, 5, 10))), 0.0);
    }

    #[test]
    fn the_token_comes_from_the_header_else_the_cookies_live_session() {
        let sessions = Sessions::default();
        let id = sessions.open("abc 123");
        assert_eq!(id.len(), 64);
        assert_ne!(sessions.open("abc 123"), id, "a new id each login");
        let cookie = |value: String| {
            let mut headers = HeaderMap::new();
            headers.insert(header::COOKIE, HeaderValue::from_str(&value).unwrap());
            headers
        };
        assert_eq!(token_of(&HeaderMap::new(), &sessions), None);
        let mut headers = cookie(format!("theme=dark; {COOKIE}={id}; other=1"));
        assert_eq!(
            token_of(&headers, &sessions).as_deref(),
            Some("Bearer abc 123")
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xyz"),
        );
        assert_eq!(token_of(&headers, &sessions).as_deref(), Some("Bearer xyz"));
        // a cookie whose name only starts with ours is not ours; an unknown id is no session
        assert_eq!(
            token_of(&cookie(format!("{COOKIE}s={id}")), &sessions),
            None
        );
        assert_eq!(
            token_of(&cookie(format!("{COOKIE}=abc123")), &sessions),
            None
        );
        // logged out, or past its time: gone
        sessions.close(&id);
        assert_eq!(token_of(&cookie(format!("{COOKIE}={id}")), &sessions), None);
        let old = sessions.open("t");
        sessions.0.lock().unwrap().get_mut(&old).unwrap().1 -= SESSION_TTL;
        assert_eq!(
            token_of(&cookie(format!("{COOKIE}={old}")), &sessions),
            None
        );
    }

    /// One token's logins past MAX_SESSIONS_PER_TOKEN end that token's oldest sessions, not another
    /// token's, even an older one.
    #[test]
    fn one_token_s_logins_do_not_end_another_token_s_session() {
        let sessions = Sessions::default();
        let other = sessions.open("b");
        let first = sessions.open("a");
        let live = |id: &str| sessions.token(id).is_some();
        for _ in 1..MAX_SESSIONS_PER_TOKEN {
            sessions.open("a");
        }
        assert!(live(&first) && live(&other));
        let newest = sessions.open("a");
        assert!(!live(&first), "a's oldest session ends");
        assert!(live(&other) && live(&newest));
        assert_eq!(sessions.0.lock().unwrap().len(), MAX_SESSIONS_PER_TOKEN + 1);
    }

    #[test]
    fn grpc_codes_map_to_http_statuses() {
        assert_eq!(
            http_status(tonic::Code::Unauthenticated),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            http_status(tonic::Code::PermissionDenied),
            StatusCode::FORBIDDEN
        );
        assert_eq!(http_status(tonic::Code::NotFound), StatusCode::NOT_FOUND);
        assert_eq!(
            http_status(tonic::Code::InvalidArgument),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(tonic::Code::Unavailable),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
