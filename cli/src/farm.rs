//! The farm's commands that need no engine: `coordinator`, and the client's `submit`, `watch`, `status`,
//! `list`, `fetch`, `pause`, `resume`, `priority`, `cancel`, `retry` (arguments and printing; the calls are
//! stylefarm-client's). `worker` and `local` are in `nodes`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use stylefarm_client::{job_state_name, task_state_name, Credentials, FarmClient, JobFiles, JobId};
use stylefarm_coordinator::auth::{AuthConfig, TlsConfig, WorkerToken};
use stylefarm_coordinator::notify::SigningSecret;
use stylefarm_coordinator::{BlobsConfig, StoreConfig};
use stylefarm_core::checkpoint::CheckpointEvery;
use stylefarm_core::imaging;
use stylefarm_core::job::{parse_sweep, JobKind, Video, MAX_ATTEMPTS};
use stylefarm_core::params::ParamArgs;
use stylefarm_core::task_log::AttemptLog;
use stylefarm_core::tiling::{self, Tiling};
use stylefarm_proto::pb;
use tokio_stream::StreamExt;

pub(crate) const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7700";

#[derive(Args)]
pub(crate) struct CoordinatorArgs {
    /// Address to listen on: IP:PORT, or HOST:PORT (its first IPv4 address, else its first).
    #[arg(long, env = "STYLEFARM_LISTEN", default_value = "127.0.0.1:7700", value_parser = listen_addr)]
    listen: SocketAddr,
    /// Where jobs (state.redb) and images (blobs/) are kept; a restart on the same dir resumes.
    #[arg(long, env = "STYLEFARM_DATA_DIR", default_value = "stylefarm-data")]
    data_dir: PathBuf,
    /// Where jobs and tasks are kept: `embedded` (state.redb in the data dir) or a Redis server,
    /// `redis://[user:password@]host:port[/db]`, that several coordinators can share.
    #[arg(long, env = "STYLEFARM_STORE", default_value = "embedded")]
    store: StoreConfig,
    /// With a Redis store, several coordinators can share it: one is active, the others wait as standbys.
    /// Seconds the active one's hold lasts unless renewed (every third of it): a standby, looking every
    /// quarter of it, takes over within about 1.25 times this of its death.
    #[arg(long, env = "STYLEFARM_LEADER_LEASE_SECS", default_value_t = stylefarm_coordinator::DEFAULT_LEADER_LEASE.as_secs_f64())]
    leader_lease_secs: f64,
    /// Where images are kept: `disk` (blobs/ in the data dir) or an S3 bucket, `s3://bucket[/prefix]`, that
    /// several coordinators can share; its endpoint and credentials from the usual variables
    /// (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ALLOW_HTTP).
    #[arg(long, env = "STYLEFARM_BLOBS", default_value = "disk")]
    blobs: BlobsConfig,
    /// The prefix of the store's keys in Redis (several farms on one server).
    #[arg(long, env = "STYLEFARM_STORE_PREFIX", default_value = stylefarm_coordinator::store::DEFAULT_PREFIX)]
    store_prefix: String,
    /// Seconds a lease lasts without a heartbeat.
    #[arg(long, default_value_t = 10.0)]
    lease_secs: f64,
    /// Seconds between a worker's heartbeats.
    #[arg(long, default_value_t = 2.0)]
    heartbeat_secs: f64,
    /// Attempts per task when a job does not say.
    #[arg(long, default_value_t = 3, value_parser = attempts_range())]
    max_attempts: u32,
    /// Unfinished (queued or running) jobs one client (tenant) may have; a submit beyond is refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "STYLEFARM_MAX_UNFINISHED_JOBS",
          default_value_t = stylefarm_coordinator::scheduler::DEFAULT_MAX_UNFINISHED_JOBS)]
    max_unfinished_jobs: usize,
    /// Tasks of one client's (tenant's) unfinished jobs, counted together: a submit (or a retry) that
    /// would pass it is refused with RESOURCE_EXHAUSTED. Each task takes about 2 KB of the coordinator's
    /// memory and as much of its store.
    #[arg(long, env = "STYLEFARM_MAX_UNFINISHED_TASKS",
          default_value_t = stylefarm_coordinator::scheduler::DEFAULT_MAX_UNFINISHED_TASKS)]
    max_unfinished_tasks: usize,
    /// A tenant's share of the farm, TENANT=SHARE (repeat, or comma-separated in the variable): at equal
    /// priority, a tenant of share 3 gets 3 tasks running for each of a tenant of share 1. Tenants not
    /// named have share 1.
    #[arg(
        long = "tenant-share",
        env = "STYLEFARM_TENANT_SHARES",
        value_delimiter = ',',
        value_name = "TENANT=SHARE"
    )]
    tenant_shares: Vec<String>,
    /// The most gRPC connections (workers and clients) served at once; one more is closed as it comes, so
    /// that its client fails fast. Lowered to fit the open-files limit (ulimit -n), which the coordinator
    /// first raises as far as this needs, up to the hard limit.
    #[arg(long, env = "STYLEFARM_MAX_CONNECTIONS",
          default_value_t = stylefarm_coordinator::connections::DEFAULT_MAX_CONNECTIONS as u32,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// The most of those connections from one IP address; more from it are closed as they come, while
    /// other hosts are still served. Unset: no bound per address but --max-connections (clients behind
    /// one NAT or proxy share an address).
    #[arg(long, env = "STYLEFARM_MAX_CONNECTIONS_PER_SOURCE",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_source: Option<u32>,
    /// Delete finished (succeeded, failed, cancelled) jobs this many seconds after they ended, as
    /// `stylefarm delete` does (their images stay in the blob store); unset: keep them until deleted.
    #[arg(long, env = "STYLEFARM_KEEP_FINISHED_SECS")]
    keep_finished_secs: Option<f64>,
    /// Delete blobs (images) that no job refers to (those of deleted jobs, uploads never submitted) once
    /// they have not been written or used for this many seconds, looking every half of it; unset: keep
    /// them. Only for a blob store that no other farm shares.
    #[arg(long, env = "STYLEFARM_KEEP_UNUSED_BLOBS_SECS")]
    keep_unused_blobs_secs: Option<f64>,
    /// Announce each job that ends (succeeded, failed, cancelled): a POST of JSON to this http:// or
    /// https:// URL (a webhook: job id, name, tenant, kind, state, error, task counts, times), sent again
    /// while it gets no 2xx answer, 10 tries in all. A receiver's secret can go in the URL; the logs show
    /// its host only. Unset: none.
    #[arg(long, env = "STYLEFARM_NOTIFY_URL", hide_env_values = true)]
    notify_url: Option<String>,
    /// Sign each notification (Standard Webhooks' webhook-signature, HMAC-SHA256) with this secret:
    /// whsec_ and the base64 of 24 to 64 random bytes. Several, space-separated, sign it each (a
    /// signature by each: to rotate the receiver's secret, give the new one and the old until it has the
    /// new). A flag shows in the process list: prefer STYLEFARM_NOTIFY_SECRET or --notify-secret-file (one
    /// of the two; set, even from the environment, it needs --notify-url).
    #[arg(
        long,
        env = "STYLEFARM_NOTIFY_SECRET",
        hide_env_values = true,
        requires = "notify_url",
        conflicts_with = "notify_secret_file"
    )]
    notify_secret: Option<String>,
    /// File holding --notify-secret, one secret a line, e.g. a mounted Kubernetes Secret.
    #[arg(long, env = "STYLEFARM_NOTIFY_SECRET_FILE", requires = "notify_url")]
    notify_secret_file: Option<PathBuf>,
    /// Seconds a running task may go without its progress moving (its scale or iteration, as the worker's
    /// heartbeats report it) before the coordinator takes its lease back: the task is retried, a strike
    /// against the worker, which is told to cancel it (for an engine that hangs while its worker still
    /// heartbeats). Counted from the lease until the first progress, so it must outlast a task's slowest
    /// iteration and its style and content targets (minutes for a large tile on a CPU). An exact-mode shard
    /// waiting in the exchange for its group's other shards does not stall; the one holding the group back
    /// does. A task whose render has ended (its last iteration) gets 5 minutes more, while its result is on
    /// its way. Unset: never.
    #[arg(long, env = "STYLEFARM_TASK_STALL_SECS")]
    task_stall_secs: Option<f64>,
    /// Seconds a job waits while every live worker is blocklisted for it (3 failures each on it) before it
    /// fails with "no worker left to run it": time for other workers to come (0: at once).
    #[arg(long, env = "STYLEFARM_NO_WORKER_LEFT_SECS",
          default_value_t = stylefarm_coordinator::scheduler::DEFAULT_NO_WORKER_LEFT.as_secs_f64())]
    no_worker_left_secs: f64,
    /// Seconds between two previews of a running task's image that workers send (a PNG of at most 256 px,
    /// shown on the status page); 0: none.
    #[arg(long, env = "STYLEFARM_PREVIEW_SECS",
          default_value_t = stylefarm_coordinator::scheduler::DEFAULT_PREVIEW_INTERVAL.as_secs_f64())]
    preview_secs: f64,
    /// A client token, TENANT:TOKEN (repeat, or comma-separated in the variable). Any token configured
    /// turns authentication on: every call then needs one, and a tenant sees only its own jobs.
    #[arg(
        long = "client-token",
        env = "STYLEFARM_CLIENT_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    client_tokens: Vec<String>,
    /// A worker token (repeat, or comma-separated in the variable).
    #[arg(
        long = "worker-token",
        env = "STYLEFARM_WORKER_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    worker_tokens: Vec<String>,
    /// A TOML file of tokens: `[[client]]` tables (tenant, token or token_file, and `operator = true` for
    /// the farm's operator, who may drain workers) and `[[worker]]` tables (token or token_file); added to
    /// the flags'.
    #[arg(long, env = "STYLEFARM_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// The coordinator's certificate chain (PEM): the listener speaks TLS (clients use https:// URLs).
    #[arg(long, env = "STYLEFARM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "STYLEFARM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA (PEM) whose client certificates are verified when presented (mutual TLS).
    #[arg(long, env = "STYLEFARM_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Workers must present a client certificate signed by --tls-client-ca.
    #[arg(long, requires = "tls_client_ca")]
    require_worker_cert: bool,
    /// Address to serve Prometheus metrics on (`GET /metrics`); off unless given.
    #[arg(long, env = "STYLEFARM_METRICS_LISTEN", value_parser = listen_addr)]
    metrics_listen: Option<SocketAddr>,
    /// Address to serve the status page on (jobs, previews, workers, cancel buttons; HTTPS with
    /// --tls-cert, a client token asked for when tokens are configured); off unless given.
    #[arg(long, env = "STYLEFARM_STATUS_LISTEN", value_parser = listen_addr)]
    status_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub(crate) status_hosts: StatusHostsArg,
}

/// The host names the status page answers without tokens.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct StatusHostsArg {
    /// Without client tokens, the status page answers requests for its IP addresses and localhost only
    /// (a web page could point another name at this address, DNS rebinding, and script the page); a host
    /// name it answers too, e.g. farm.example.lan (repeat, or comma-separated in the variable).
    #[arg(
        long = "status-allowed-host",
        env = "STYLEFARM_STATUS_ALLOWED_HOSTS",
        value_delimiter = ',',
        value_name = "HOST"
    )]
    pub(crate) status_allowed_hosts: Vec<String>,
}

impl StatusHostsArg {
    /// The names given, each checked: one that is not a host name is refused, naming the flag (an empty
    /// one, as a trailing comma leaves, is left out).
    pub(crate) fn hosts(&self) -> anyhow::Result<Vec<String>> {
        let named = self
            .status_allowed_hosts
            .iter()
            .filter(|h| !h.trim().is_empty());
        named
            .map(|h| match stylefarm_coordinator::status::host_name(h) {
                Some(name) if !name.is_empty() => Ok(name),
                _ => bail!("--status-allowed-host: '{h}' is not a host name"),
            })
            .collect()
    }
}

/// How a client or a worker reaches the coordinator: its URLs, its token, TLS.
#[derive(Args, Clone)]
pub(crate) struct ConnectArgs {
    /// The coordinator's URL (`http://`, or `https://` with TLS), or several separated by commas (an
    /// active one and its standbys): the first that answers is used.
    #[arg(long, env = "STYLEFARM_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub(crate) coordinator: String,
    /// Bearer token, when the coordinator asks for one (a flag shows in the process list: prefer
    /// STYLEFARM_TOKEN or --token-file). Unless either flag is given: STYLEFARM_TOKEN_FILE, else
    /// STYLEFARM_TOKEN (a flag wins over the environment).
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the token (its first line), e.g. a mounted Kubernetes Secret.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the coordinator's: needed for https:// URLs.
    #[arg(long, env = "STYLEFARM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This caller's certificate (PEM), for a coordinator that asks workers for one (mutual TLS).
    #[arg(long, env = "STYLEFARM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "STYLEFARM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ConnectArgs {
    /// The token and TLS settings; an error names the file that cannot be read.
    pub(crate) fn credentials(&self) -> anyhow::Result<Credentials> {
        let from_env = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        let token = match (&self.token, &self.token_file) {
            (Some(token), _) => Some(token.clone()),
            (None, Some(file)) => Some(Credentials::token_from_file(file)?),
            (None, None) => match from_env("STYLEFARM_TOKEN_FILE") {
                Some(file) => Some(Credentials::token_from_file(Path::new(&file))?),
                None => match from_env("STYLEFARM_TOKEN") {
                    Some(token) => Some(
                        token
                            .into_string()
                            .map_err(|_| anyhow::anyhow!("STYLEFARM_TOKEN: not UTF-8 text"))?,
                    ),
                    None => None,
                },
            },
        };
        Ok(Credentials {
            token,
            tls_ca: self.tls_ca.clone(),
            tls_identity: self.tls_cert.clone().zip(self.tls_key.clone()),
        })
    }
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct SubmitArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    job: JobArgs,
    /// Wait for the job, showing progress, and fetch its results.
    #[arg(long)]
    wait: bool,
    /// Submit it paused: nothing of it runs until `stylefarm resume`.
    #[arg(long)]
    paused: bool,
}

/// `--max-attempts`, the coordinator's default and a job's: 1 to [`MAX_ATTEMPTS`].
fn attempts_range() -> clap::builder::RangedI64ValueParser<u32> {
    clap::value_parser!(u32).range(1..=i64::from(MAX_ATTEMPTS))
}

/// What a job renders: shared by `submit` and `local`.
#[derive(Args)]
pub(crate) struct JobArgs {
    /// Content images, e.g. `--content a.jpg b.png` or repeated; a directory stands for the images in it
    /// (PNG, JPEG, WebP, TIFF, BMP, GIF by extension, sorted by name, not its subdirectories): a batch of a
    /// folder.
    #[arg(long, required = true, num_args = 1..)]
    content: Vec<PathBuf>,
    /// Style images, as --content; several are blended, or each alone with --batch.
    #[arg(long, required = true, num_args = 1..)]
    style: Vec<PathBuf>,
    /// Every content x every style, each style alone.
    #[arg(long, conflicts_with_all = ["sweep", "tiled", "video"])]
    batch: bool,
    /// The contents are a video's frames, in order (a directory: its images sorted by name, e.g. from
    /// `ffmpeg -i in.mp4 frames/%05d.png`): where a frame's content matches the previous frame's
    /// (followed along the optical flow: --optical-flow), it starts from the previous frame's result and is
    /// held to it (--temporal-weight; Ruder et al. 2016). The output is a directory of frame-NNNNN.png.
    #[arg(long, conflicts_with_all = ["sweep", "tiled"])]
    video: bool,
    /// Video: frames per chunk; the chunks render side by side on as many workers, each starting afresh
    /// (the video may jump there). Default: one chunk, the frames one after the other.
    #[arg(long, requires = "video", value_parser = clap::value_parser!(u32).range(1..))]
    chunk_frames: Option<u32>,
    /// Video: iterations of each frame after a chunk's first (default: half of --iterations).
    #[arg(long, requires = "video", value_parser = clap::value_parser!(u32).range(1..))]
    frame_iterations: Option<u32>,
    /// Render --size in overlapping tiles over a pyramid of scales (for outputs beyond one device).
    #[arg(long, conflicts_with_all = ["sweep", "video"])]
    tiled: bool,
    /// Tiled: tile size in pixels for every scale (and the first scale's longest side at most). Default:
    /// each scale planned for the workers present when it starts: whole where it fits their device
    /// memory, else tiles as large as fit (at least 512 px), enough for every worker.
    #[arg(long, requires = "tiled")]
    tile_size: Option<u32>,
    /// Tiled: minimum overlap of neighbouring tiles in pixels, blended with feathered weights (at least
    /// 64, at most half the tile size). Default: 128, or half of a --tile-size under 256.
    #[arg(long, requires = "tiled")]
    overlap: Option<u32>,
    /// Tiled, exact mode: each later scale optimizes the whole canvas with the exact gradient of its
    /// objective, evaluated in blocks of --tile-size px (default: the largest blocks that fit the workers'
    /// memory, the whole canvas where it fits): no tiles, no seams, the style loss of an untiled render,
    /// memory still bound by the tile size, about 2x an untiled scale's compute (BENCHMARKS.md, "Exact
    /// mode"). The scale is shared by the workers present (one shard, a band of block rows, each; they
    /// run together, adding up each evaluation's sums through the coordinator).
    #[arg(long, requires = "tiled")]
    exact: bool,
    /// A parameter grid, e.g. 'style_weight=10,100;optimizer=lbfgs,adam': any render option but --size,
    /// --scale-iterations, --init and those of videos and tiled jobs; a list's items separated by ':'
    /// (style_blend=0.7:0.3, style_layers=relu1_1:relu2_1).
    #[arg(long)]
    sweep: Option<String>,
    /// Higher runs first (at equal priorities, the client with the fewest tasks running).
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Attempts per task before the job fails (default: the coordinator's --max-attempts).
    #[arg(long, value_parser = attempts_range())]
    max_attempts: Option<u32>,
    /// Only workers with this tag take the job's tasks (repeat: with all of them), e.g. gpu; default: any
    /// worker.
    #[arg(long = "worker-tag")]
    worker_tags: Vec<String>,
    /// Batch or sweep: a task that fails for good fails alone and the others render (make's -k); the job
    /// then ends failed, naming the failed tasks, with the others' results fetched (a sweep's contact
    /// sheet too, its failed variants' cells grey), and `retry` runs the failed ones again. Default: the
    /// first such task fails the job and cancels the rest.
    #[arg(long)]
    keep_going: bool,
    /// The most of the job's tasks that run at once, each on its own worker (Deadline's machine limit), so
    /// that a large job leaves workers to the others; default: no limit. Not with --exact.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    max_workers: Option<u32>,
    /// Start only once this job has succeeded (repeat: once all of them have; OpenCue's and Deadline's job
    /// dependencies); if one fails or is cancelled, this job fails, naming it. `--init job:ID` starts from
    /// that job's result and waits for it too.
    #[arg(long = "after", value_name = "JOB_ID", value_parser = job_id_arg)]
    after: Vec<JobId>,
    /// Save each task's image every N iterations of each scale (OpenCue's frame checkpoints): a task whose
    /// worker is lost, or a job retried, starts again from its last checkpoint instead of from the
    /// beginning: with Adam exactly as it would have gone on, with L-BFGS from the saved image with its
    /// optimizer afresh (the pixels differ slightly from an uninterrupted render's). Not for the shards of
    /// an --exact scale, which step together. Default: none.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    checkpoint_every: Option<u32>,
    /// Save each task's image at most every S seconds of its render instead (the first S seconds after its
    /// first iteration), for its next attempt as with --checkpoint-every: one interval for GPU and CPU workers
    /// alike, whose iterations take milliseconds and seconds. Default: none.
    #[arg(long, value_name = "S", conflicts_with = "checkpoint_every",
          value_parser = clap::value_parser!(u32).range(1..))]
    checkpoint_secs: Option<u32>,
    /// Where results go: an image file (.png, .jpg, .tif) for a job with one result, else a folder
    /// (created when missing). Checked before anything is submitted: the file's folder must exist and take
    /// new files, and the file must not be one of the job's images. `submit` writes it with --wait.
    #[arg(long, short)]
    pub(crate) output: Option<PathBuf>,
    /// The job's name, for people: `stylefarm list` and `status` and the status page show it beside the
    /// job's id (at most 200 bytes, no control characters).
    #[arg(long, default_value = "")]
    name: String,
    /// Idempotency key: submitting twice with it gives the same job; with another job's options or
    /// images it is refused (a key stands for one submission).
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    params: ParamArgs,
}

#[derive(Args)]
pub(crate) struct JobRef {
    #[command(flatten)]
    connect: ConnectArgs,
    job_id: JobId,
}

#[derive(Args)]
pub(crate) struct WatchArgs {
    #[command(flatten)]
    job: JobRef,
    /// Write the running tasks' previews here as they come: task-N.png for task N, a PNG of at most 256 px
    /// a side, as often as the coordinator's --preview-secs has workers send them.
    #[arg(long)]
    preview_dir: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct PriorityArgs {
    #[command(flatten)]
    job: JobRef,
    /// The job's new priority: higher runs first (submit's `--priority`).
    #[arg(allow_negative_numbers = true)]
    priority: i32,
}

/// One or more jobs, for the commands that act on each in turn.
#[derive(Args)]
pub(crate) struct JobRefs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The jobs' ids (e.g. `$(stylefarm list --state failed | cut -f1)`).
    #[arg(required = true)]
    job_ids: Vec<JobId>,
}

/// Jobs, or some tasks of one, for `cancel` and `retry`.
#[derive(Args)]
pub(crate) struct JobOrTaskRefs {
    #[command(flatten)]
    jobs: JobRefs,
    /// Only this task of the job, by its index as `status` lists it (repeat for several): a keep-going
    /// batch's or sweep's tasks (`--keep-going`) are cancelled, or run again, alone, the job going on
    /// without them. With one job.
    #[arg(long = "task", value_name = "INDEX")]
    tasks: Vec<u32>,
}

impl JobOrTaskRefs {
    /// The jobs, refused naming `--task` when tasks are given for more than one.
    fn jobs(self) -> anyhow::Result<(JobRefs, Vec<u32>)> {
        if !self.tasks.is_empty() && self.jobs.job_ids.len() > 1 {
            bail!(
                "--task: the tasks of one job; {} jobs given",
                self.jobs.job_ids.len()
            );
        }
        Ok((self.jobs, self.tasks))
    }
}

#[derive(Args)]
pub(crate) struct FetchArgs {
    #[command(flatten)]
    job: JobRef,
    /// Directory (or, for a single render, a .png/.jpg file) to write the results to.
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Most jobs to show, newest first (0: all of them).
    #[arg(long, default_value_t = 20)]
    limit: u32,
    /// Only jobs in this state (repeat for several; all when none), e.g. `--state failed` to find those
    /// to run again (a state as `list` prints it).
    #[arg(long = "state", value_name = "STATE", value_parser = job_state)]
    states: Vec<pb::JobState>,
}

/// A job state by the name the CLI prints for it ([`job_state_name`]); an error lists the names.
fn job_state(name: &str) -> Result<pb::JobState, String> {
    let states = (1..).map_while(|n| pb::JobState::try_from(n).ok());
    states
        .clone()
        .find(|&s| job_state_name(s as i32) == name)
        .ok_or_else(|| {
            let names: Vec<String> = states.map(|s| job_state_name(s as i32)).collect();
            format!("'{name}' is not a job state ({})", names.join(", "))
        })
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The interrupts (Ctrl-C's and SIGTERMs) this process has had since the call, counted: one that comes
/// while the one before is being handled is not lost between two waits ([`interrupted`]). One within
/// [`INTERRUPT_ECHO`] of the one counted before is not counted: `timeout` (without `--foreground`), and
/// wrappers that signal a process group, send the same signal twice at once, which is one interrupt. In a
/// runtime.
pub(crate) fn interrupts() -> tokio::sync::watch::Receiver<u32> {
    let (count, interrupts) = tokio::sync::watch::channel(0);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // registered once: no signal falls between two waits
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::spawn(async move {
            let mut counted: Option<std::time::Instant> = None;
            loop {
                let signal = tokio::select! {
                    _ = int.recv() => libc::SIGINT,
                    _ = term.recv() => libc::SIGTERM,
                };
                LAST_INTERRUPT.store(signal, std::sync::atomic::Ordering::SeqCst);
                if counted.is_none_or(|at| at.elapsed() >= INTERRUPT_ECHO) {
                    counted = Some(std::time::Instant::now());
                    count.send_modify(|n| *n += 1);
                }
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            LAST_INTERRUPT.store(2, std::sync::atomic::Ordering::SeqCst);
            count.send_modify(|n| *n += 1);
        }
    });
    interrupts
}

/// The signal number of the last interrupt that [`interrupts`] heard (SIGINT 2, SIGTERM 15); 0: none.
static LAST_INTERRUPT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The exit status of a command that failed: 128 + the signal's number when an interrupt ([`interrupts`])
/// stopped it (130 for Ctrl-C, 143 for SIGTERM, as a shell reports a process that the signal ended), 1
/// otherwise.
pub(crate) fn failed_exit_code() -> u8 {
    match LAST_INTERRUPT.load(std::sync::atomic::Ordering::SeqCst) {
        signal @ 1..=127 => 128 + signal as u8,
        _ => 1,
    }
}

/// How soon after an interrupt another is taken for its echo ([`interrupts`]), not a second one.
const INTERRUPT_ECHO: Duration = Duration::from_millis(50);

/// Returns once `interrupts` ([`interrupts`]) has counted `n`.
pub(crate) async fn interrupted(mut interrupts: tokio::sync::watch::Receiver<u32>, n: u32) {
    let _ = interrupts.wait_for(|count| *count >= n).await;
}

/// The first interrupt (Ctrl-C or SIGTERM, [`interrupts`]).
pub(crate) async fn shutdown_signal() {
    interrupted(interrupts(), 1).await
}

pub(crate) fn coordinator_config(
    data_dir: PathBuf,
    lease: f64,
    heartbeat: f64,
    attempts: u32,
) -> anyhow::Result<stylefarm_coordinator::CoordinatorConfig> {
    // each flag's own bound first, named (`seconds` checks the range a Duration takes)
    if !(heartbeat.is_finite() && heartbeat > 0.0) {
        bail!("heartbeat_secs: --heartbeat-secs {heartbeat} must be more than 0");
    }
    if !(lease.is_finite() && lease > heartbeat) {
        bail!(
            "lease_secs: --lease-secs {lease} must be more than --heartbeat-secs {heartbeat} (a lease \
             outlasts the heartbeats that renew it), both more than 0"
        );
    }
    if attempts == 0 {
        bail!("max_attempts must be at least 1");
    }
    let (lease, heartbeat) = (
        seconds("lease_secs", lease)?,
        seconds("heartbeat_secs", heartbeat)?,
    );
    Ok(stylefarm_coordinator::CoordinatorConfig {
        data_dir,
        store: StoreConfig::Embedded,
        blobs: BlobsConfig::Disk,
        keep_unused_blobs: None,
        scheduler: stylefarm_coordinator::SchedulerConfig {
            lease,
            heartbeat_interval: heartbeat,
            default_max_attempts: attempts,
            ..Default::default()
        },
        auth: Default::default(),
        tls: None,
        max_connections: stylefarm_coordinator::connections::DEFAULT_MAX_CONNECTIONS,
        max_connections_per_source: None,
        notify: None,
    })
}

/// A duration given in seconds on the command line: more than 0 and at most a day; an error names `name`.
pub(crate) fn seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    if !(value > 0.0 && value <= 86_400.0) {
        bail!("{name} must be more than 0 and at most 86400 (a day), got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

pub(crate) fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut config = coordinator_config(
        args.data_dir,
        args.lease_secs,
        args.heartbeat_secs,
        args.max_attempts,
    )?;
    config.blobs = args.blobs;
    config.scheduler.max_unfinished_jobs = args.max_unfinished_jobs;
    config.scheduler.max_unfinished_tasks = args.max_unfinished_tasks;
    config.max_connections = args.max_connections as usize;
    config.max_connections_per_source = args.max_connections_per_source.map(|n| n as usize);
    config.scheduler.tenant_shares =
        stylefarm_coordinator::scheduler::parse_tenant_shares(&args.tenant_shares)
            .map_err(|e| anyhow!("--tenant-share: {e}"))?;
    // a keep time: any number of seconds more than 0
    let keep = |flag: &str, secs: Option<f64>| {
        secs.map(|secs| {
            Duration::try_from_secs_f64(secs)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    anyhow!("{flag} must be a number of seconds more than 0, got {secs}")
                })
        })
        .transpose()
    };
    config.scheduler.keep_finished = keep("--keep-finished-secs", args.keep_finished_secs)?;
    config.scheduler.task_stall = args
        .task_stall_secs
        .map(|secs| seconds("--task-stall-secs", secs))
        .transpose()?;
    if let Some(stall) = config.scheduler.task_stall {
        // progress comes with the heartbeats: a stall shorter than two of them would take back tasks
        // that move
        let least = 2 * config.scheduler.heartbeat_interval;
        if stall < least {
            bail!(
                "--task-stall-secs must be at least twice --heartbeat-secs ({} s), got {}",
                least.as_secs_f64(),
                stall.as_secs_f64()
            );
        }
    }
    config.keep_unused_blobs = keep("--keep-unused-blobs-secs", args.keep_unused_blobs_secs)?;
    config.notify = args
        .notify_url
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e| anyhow!("--notify-url: {e}"))?;
    // one of the two at most (the argument parser's conflict, the variables' values included)
    let secrets = match (&args.notify_secret, &args.notify_secret_file) {
        (Some(secrets), _) => Some(("--notify-secret", secrets.clone())),
        (None, Some(file)) => Some((
            "--notify-secret-file",
            stylefarm_proto::connect::secrets_from_file("--notify-secret-file", file, "whsec_")?
                .join(" "),
        )),
        (None, None) => None,
    };
    if let (Some(notify), Some((flag, text))) = (&mut config.notify, secrets) {
        notify.secrets = SigningSecret::list(&text).map_err(|e| anyhow!("{flag}: {e}"))?;
    }
    // a wait: any number of seconds, 0 or more
    let wait = |flag: &str, secs: f64| {
        Duration::try_from_secs_f64(secs)
            .map_err(|_| anyhow!("{flag} must be a number of seconds, 0 or more, got {secs}"))
    };
    config.scheduler.no_worker_left = wait("--no-worker-left-secs", args.no_worker_left_secs)?;
    config.scheduler.preview_interval = wait("--preview-secs", args.preview_secs)?;
    let mut auth = match &args.auth_file {
        Some(file) => AuthConfig::load(file)?,
        None => AuthConfig::default(),
    };
    for c in &args.client_tokens {
        auth.clients.push(AuthConfig::parse_client(c)?);
    }
    auth.workers
        .extend(args.worker_tokens.iter().map(|t| WorkerToken {
            token: Some(t.clone()),
            token_file: None,
        }));
    config.auth = auth;
    config.tls = args
        .tls_cert
        .zip(args.tls_key)
        .map(|(cert, key)| TlsConfig {
            cert,
            key,
            client_ca: args.tls_client_ca,
            require_worker_cert: args.require_worker_cert,
        });
    config.store = match args.store {
        StoreConfig::Redis { url, .. } => StoreConfig::Redis {
            url,
            prefix: args.store_prefix,
            lease: seconds("leader_lease_secs", args.leader_lease_secs)?,
        },
        embedded => {
            // (one given equal to the default is not told apart from none)
            let default = stylefarm_coordinator::DEFAULT_LEADER_LEASE.as_secs_f64();
            if args.leader_lease_secs != default {
                tracing::warn!(
                    "--leader-lease-secs (STYLEFARM_LEADER_LEASE_SECS) is for coordinators sharing a Redis \
                     store (--store redis://...); the embedded store has one coordinator, holding no lease"
                );
            }
            embedded
        }
    };
    // fault injection for the end-to-end tests: the fail points that FAILPOINTS names
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // the addresses it will listen on, tried now and let go: a standby binds them only once it takes
    // over (until then its closed ports send clients to the active coordinator at once), and an address
    // that cannot be bound (in use, not this host's) is said now, not at a takeover that would leave the
    // farm without a coordinator
    let addresses = [
        ("listen", Some(args.listen)),
        ("metrics_listen", args.metrics_listen),
        ("status_listen", args.status_listen),
    ];
    for (flag, addr) in addresses {
        if let Some(addr) = addr {
            std::net::TcpListener::bind(addr).with_context(|| format!("{flag}: binding {addr}"))?;
        }
    }
    runtime()?.block_on(async move {
        // a standby waits in open until it holds the leader lease: told to stop meanwhile (a pod deleted,
        // a node drained), it exits at once, holding nothing, rather than at its supervisor's SIGKILL
        let opening =
            tokio::task::spawn_blocking(move || stylefarm_coordinator::Coordinator::open(config));
        let coordinator = tokio::select! {
            opened = opening => opened.context("opening the coordinator's store")??,
            () = shutdown_signal() => {
                eprintln!("stopped before serving (a standby waiting for the leader lease)");
                std::process::exit(0);
            }
        };
        if let Some(addr) = args.metrics_listen {
            let coordinator = coordinator.clone();
            crate::metrics::serve(addr, move || coordinator.metrics_text()).await?;
        }
        if let Some(addr) = args.status_listen {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("status_listen: binding {addr}"))?;
            stylefarm_coordinator::status::serve_status(
                listener,
                coordinator.clone(),
                &args.status_hosts.hosts()?,
            )
            .await?;
        }
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listen: binding {}", args.listen))?;
        // the line a supervisor (or a test) reads to learn the address
        // for whoever started it (a test, a supervisor): a coordinator whose stdout is closed serves on
        let listening = format!("listening on {}\n", listener.local_addr()?);
        let _ = std::io::Write::write_all(&mut std::io::stdout(), listening.as_bytes());
        stylefarm_coordinator::serve(listener, coordinator, shutdown_signal()).await?;
        Ok(())
    })
}

async fn connect(args: &ConnectArgs) -> anyhow::Result<FarmClient> {
    Ok(FarmClient::connect_with(&args.coordinator, &args.credentials()?).await?)
}

impl JobArgs {
    /// The job these options describe; its kind from the flags (--batch, --tiled, --sweep, --video, else
    /// single).
    pub(crate) fn files(&self) -> anyhow::Result<JobFiles> {
        // before any connection: a bad tag is the user's to fix, not the coordinator's to refuse
        stylefarm_core::job::check_tags("worker_tags", &self.worker_tags)?;
        // clap keeps --batch, --tiled, --sweep and --video apart
        let kind = if self.batch {
            JobKind::Batch
        } else if self.tiled {
            let overlap = self
                .overlap
                .unwrap_or_else(|| tiling::default_overlap(self.tile_size));
            JobKind::Tiled(Tiling::new(self.tile_size, overlap, self.exact))
        } else if let Some(sweep) = &self.sweep {
            JobKind::Sweep(parse_sweep(sweep)?)
        } else if self.video {
            let video = Video {
                chunk_frames: self.chunk_frames.unwrap_or(0),
                frame_iterations: self.frame_iterations.unwrap_or(0),
            };
            video.validate()?;
            JobKind::Video(video)
        } else {
            JobKind::Single
        };
        let job = JobFiles {
            kind,
            contents: images_of("content", &self.content)?,
            styles: images_of("style", &self.style)?,
            params: self.params.params()?,
            priority: self.priority,
            max_attempts: self.max_attempts.unwrap_or(0),
            worker_tags: self.worker_tags.clone(),
            keep_going: self.keep_going,
            max_workers: self.max_workers.unwrap_or(0),
            after: self.after.clone(),
            checkpoints: CheckpointEvery::of(
                self.checkpoint_every.unwrap_or(0),
                self.checkpoint_secs.unwrap_or(0),
            )?,
            name: self.name.clone(),
            request_id: self.request_id.clone(),
            paused: false,
        };
        match &job.kind {
            JobKind::Sweep(axes) => stylefarm_core::job::check_sweep_reads(&job.params, axes)?,
            _ => job.params.check_read(stylefarm_core::params::JobReads {
                video: self.video,
                tiles: self.tiled && !self.exact,
                batch: self.batch,
                evaluate: false,
            })?,
        }
        // refused before the render, not after it
        if let Some(output) = self.output.as_deref() {
            let several = match &job.kind {
                JobKind::Single | JobKind::Tiled(_) => false,
                JobKind::Batch => job.contents.len() * job.styles.len() > 1,
                JobKind::Sweep(_) | JobKind::Video(_) => true,
            };
            imaging::check_output(output, several, &job.inputs().collect::<Vec<_>>())?;
            if matches!(job.kind, JobKind::Video(_)) {
                stylefarm_client::check_no_stale_frames(output, job.contents.len())?;
            }
        }
        Ok(job)
    }
}

/// An address to listen on: an IP address and port, or a host name (`localhost:7700`) and port, which
/// stands for its first IPv4 address, else its first.
pub(crate) fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("'{text}' is not HOST:PORT nor IP:PORT: {e}"))?
        .collect();
    // IPv4 first: `localhost` is often ::1 first, where clients' default http://127.0.0.1:7700 is not
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("'{text}': the host name has no address"))
}

/// A job id on the command line ([`JobId::checked`]).
fn job_id_arg(text: &str) -> Result<JobId, String> {
    JobId::checked("after", text).map_err(|e| e.to_string())
}

/// `paths` with each directory replaced by the images in it: the files whose extension names a format
/// the image crate reads here (`ImageFormat::from_path`), sorted by name, without subdirectories nor
/// hidden files (a name that starts with `.`). A broken symbolic link with such a name is kept: reading
/// it fails, saying so (a keep-going batch leaves it out), rather than it being passed over unsaid; the
/// other files passed over (a phone's `.HEIC`, a `.pdf`) are said on stderr ([`passed_over`]). An error
/// names `field` and the directory that cannot be read or holds no image.
fn images_of(field: &str, paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let (images, others) = images_in(field, paths)?;
    if let Some(note) = passed_over(field, &others) {
        eprintln!("{note}");
    }
    Ok(images)
}

/// The readable formats, by the extensions `images_of` takes.
const READ_FORMATS: &str = "PNG, JPEG, WebP, TIFF, BMP or GIF";

/// The note for `files` in `field`'s directories that are not taken as images; `None` for none.
fn passed_over(field: &str, files: &[PathBuf]) -> Option<String> {
    const NAMED: usize = 8;
    let (first, more) = (files.first()?, files.len().saturating_sub(NAMED));
    let names: Vec<String> = files
        .iter()
        .take(NAMED)
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let dir = first.parent().unwrap_or(first).display();
    Some(format!(
        "note: {field}: {} file(s) in {dir} not taken, their extensions not those of an image it reads \
         ({READ_FORMATS}; convert HEIC or RAW photos to JPEG): {}{}",
        files.len(),
        names.join(", "),
        if more > 0 {
            format!(", and {more} more")
        } else {
            String::new()
        }
    ))
}

/// [`images_of`]'s images, and the other files of its directories (not hidden), passed over.
fn images_in(field: &str, paths: &[PathBuf]) -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut out, mut others) = (Vec::new(), Vec::new());
    for path in paths {
        if !path.is_dir() {
            out.push(path.clone());
            continue;
        }
        let entries = std::fs::read_dir(path)
            .and_then(|dir| {
                dir.map(|e| e.map(|e| e.path()))
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .with_context(|| format!("{field}: reading the directory {}", path.display()))?;
        let (mut images, mut passed): (Vec<PathBuf>, Vec<PathBuf>) = entries
            .into_iter()
            // a link to nothing is not a file, nor a directory: the user's photo that is missing
            .filter(|p| p.is_file() || (p.is_symlink() && !p.exists()))
            // hidden files: not the user's photos (macOS's `._IMG_0001.jpg` beside each on a shared
            // drive, editors' and tools' leftovers)
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."))
            })
            .partition(|p| image::ImageFormat::from_path(p).is_ok_and(|f| f.reading_enabled()));
        if images.is_empty() {
            bail!(
                "{field}: the directory {} holds no image ({READ_FORMATS})",
                path.display()
            );
        }
        images.sort();
        passed.sort();
        out.extend(images);
        others.extend(passed);
    }
    Ok((out, others))
}

/// A tiled scale's time left: `left` tiles at the pace of the `done` ones that took `elapsed`; `None`
/// before the first is done, or once none is left.
fn scale_time_left(elapsed: Duration, done: usize, left: usize) -> Option<Duration> {
    (done > 0 && left > 0).then(|| elapsed.mul_f64(left as f64 / done as f64))
}

/// The most tasks a watched job has a progress bar each for: past that (a batch of a folder of photos, a
/// tiled scale's tiles), one bar counts its tasks, and each task has a bar while it runs.
const TASK_BARS: usize = 16;

/// Shows task `t`'s label, progress and state on `bar`.
fn show_task(bar: &ProgressBar, t: &pb::TaskStatus) {
    bar.set_prefix(t.label.clone());
    let progress = t.progress.unwrap_or_default();
    if progress.iterations > 0 {
        bar.set_length(u64::from(progress.iterations));
        bar.set_position(u64::from(progress.iteration));
    }
    let state = pb::TaskState::try_from(t.state).unwrap_or_default();
    let loss = progress.losses.map(|l| l.total).filter(|l| *l > 0.0);
    bar.set_message(match (state, loss) {
        (pb::TaskState::Running, Some(l)) => {
            let left = Duration::try_from_secs_f64(progress.eta_seconds)
                .ok()
                .filter(|d| !d.is_zero())
                .map(|d| format!(", {} left", indicatif::HumanDuration(d)))
                .unwrap_or_default();
            format!(
                "scale {}/{} loss {l:.4e}{left}",
                progress.scale, progress.scales
            )
        }
        (pb::TaskState::Failed, _) => format!("failed: {}", t.error),
        // cancelled for a new plan of its scale
        _ if t.replaced => "replaced".to_string(),
        _ => task_state_name(t.state),
    });
    if state == pb::TaskState::Succeeded {
        bar.set_position(bar.length().unwrap_or(1));
    }
}

/// How long a watch tries to connect again to a coordinator that went away ([`rewatch`]): a standby takes
/// over within two leader leases (seconds), a coordinator restarts in about as long.
const REWATCH_FOR: Duration = Duration::from_secs(120);

/// The job's event stream again, once connected again ([`FarmClient::reconnect`]), trying for up to
/// [`REWATCH_FOR`] with backoff ([`stylefarm_proto::Backoff`]: 0.25 s doubling to 2.5 s, with jitter up to
/// as much again); the last error after that.
async fn rewatch(
    client: &mut FarmClient,
    job_id: &JobId,
    previews: bool,
) -> anyhow::Result<stylefarm_client::EventStream> {
    let deadline = std::time::Instant::now() + REWATCH_FOR;
    let mut backoff = stylefarm_proto::Backoff::default();
    loop {
        tokio::time::sleep(backoff.next_wait()).await;
        let watched = match client.reconnect().await {
            Ok(()) => client.watch_events(job_id, previews).await,
            Err(e) => Err(e),
        };
        match watched {
            Ok(stream) => return Ok(stream),
            Err(e) if e.is_connection_lost() && std::time::Instant::now() < deadline => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// How to write the results of a job that goes on without this command: "`stylefarm fetch JOB -o
/// OUTPUT` writes its results", with the output given (else `DIR`).
fn fetch_hint(job_id: &JobId, output: Option<&Path>) -> String {
    let output = output.map_or("DIR".into(), |o| o.display().to_string());
    format!("`stylefarm fetch {job_id} -o {output}` writes its results")
}

/// Follows a job until it ends, with progress bars (stderr: a bar per task, or past [`TASK_BARS`] tasks one
/// counting them and one per running task), through the coordinator going
/// away for a while ([`rewatch`]); returns its final status.
async fn watch_job(
    client: &mut FarmClient,
    job_id: &JobId,
    bars: bool,
    preview_dir: Option<&Path>,
    output: Option<&Path>,
) -> anyhow::Result<pb::JobStatus> {
    let mut stream = client.watch_events(job_id, preview_dir.is_some()).await?;
    let multi = MultiProgress::new();
    if !bars {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>24} {bar:24} {pos:>4}/{len:4} {msg}")
        .expect("template");
    // a bar per task (a job of at most TASK_BARS tasks); else one counting them and one per running task
    let mut all_bars: Vec<ProgressBar> = Vec::new();
    let mut many = false;
    let mut tasks_bar: Option<ProgressBar> = None;
    let mut running_bars: std::collections::HashMap<u32, ProgressBar> = Default::default();
    // the failed tasks said so (a job of many tasks: their bars are gone)
    let mut failed_said = std::collections::HashSet::new();
    // the results whose warnings were said (a task may run again, and warn of its new result)
    let mut warnings_said = std::collections::HashSet::new();
    // the attempts said to run again after a failed one, with why: (task, attempt, the failure)
    let mut reruns_said = std::collections::HashSet::new();
    // where no bar is drawn: each task's state as last said
    let mut states_said: std::collections::HashMap<u32, pb::TaskState> = Default::default();
    let mut job_bar: Option<ProgressBar> = None;
    // the scale the job bar shows, when this watch first saw it and its tiles done then
    let mut scale_seen: Option<(usize, std::time::Instant, usize)> = None;
    let (mut last, mut waiting) = (None, String::new());
    // a line above the bars; on stderr where there are none (indicatif draws nothing, nor prints, where
    // stderr is not a terminal: CI, a pipe)
    let say = |line: String| -> anyhow::Result<()> {
        if bars && !multi.is_hidden() {
            multi.println(line)?;
        } else {
            eprintln!("{line}");
        }
        Ok(())
    };
    loop {
        let event = match stream.next().await {
            Some(Ok(event)) => event,
            // the coordinator went away (stopped, restarted, its standby taking over), or ended the
            // stream before the job did: connect again and go on watching
            lost @ (Some(Err(_)) | None) => {
                let why = match lost {
                    Some(Err(e)) if !e.is_connection_lost() => return Err(e.into()),
                    Some(Err(e)) => e.to_string(),
                    _ if last.as_ref().is_some_and(|s: &pb::JobStatus| {
                        stylefarm_client::job_ended(s.state())
                    }) =>
                    {
                        break
                    }
                    _ => "the coordinator ended the job's event stream".to_string(),
                };
                say(format!("lost the coordinator ({why}): connecting again"))?;
                stream = rewatch(client, job_id, preview_dir.is_some())
                    .await
                    .with_context(|| {
                        format!(
                            "the job goes on; `stylefarm watch {job_id}` follows it again, {}",
                            fetch_hint(job_id, output)
                        )
                    })?;
                continue;
            }
        };
        let (status, previews) = event;
        if let Some(dir) = preview_dir {
            write_previews(dir, &previews);
        }
        // why it waits (no worker may take it), once each time that changes
        if status.waiting != waiting {
            if !status.waiting.is_empty() {
                say(format!("job {job_id} waiting: {}", status.waiting))?;
            }
            waiting.clone_from(&status.waiting);
        }
        if status.scales > 0 {
            // tiled: the scale being rendered and its tiles done
            let bar = job_bar.get_or_insert_with(|| {
                multi.insert(0, ProgressBar::new(1).with_style(style.clone()))
            });
            let scale = status.scale_results.len().min(status.scales as usize - 1);
            let of_scale: Vec<&pb::TaskStatus> = status
                .tasks
                .iter()
                .filter(|t| t.tile.as_ref().map_or(0, |x| x.scale) as usize == scale && !t.replaced)
                .collect();
            let done = of_scale.iter().filter(|t| !t.result.is_empty()).count();
            bar.set_prefix(format!("scale {}/{}", scale + 1, status.scales));
            bar.set_length(of_scale.len().max(1) as u64);
            bar.set_position(done as u64);
            if scale_seen.is_none_or(|(seen, _, _)| seen != scale) {
                scale_seen = Some((scale, std::time::Instant::now(), done));
            }
            let (_, since, done_then) = scale_seen.expect("set above");
            // the scale's time left at the pace of the tiles done since this watch saw it start
            let left = scale_time_left(
                since.elapsed(),
                done.saturating_sub(done_then),
                of_scale.len().saturating_sub(done),
            )
            .map(|d| format!(", about {} left", indicatif::HumanDuration(d)))
            .unwrap_or_default();
            bar.set_message(format!("tiles of scale {} done{left}", scale + 1));
        }
        // a task running again (its last attempt failed: its worker lost, an error that may pass; or its
        // shard group runs again): why, once an attempt (with bars too: a bar that starts over says nothing)
        for t in status.tasks.iter().filter(|t| !t.replaced) {
            let rerun = t.state() == pb::TaskState::Running && !t.error.is_empty();
            if rerun && reruns_said.insert((t.index, t.attempts, t.error.clone())) {
                say(format!(
                    "task {} ({}) running again, attempt {}: {}",
                    t.index, t.label, t.attempts, t.error
                ))?;
                states_said.insert(t.index, pb::TaskState::Running);
            }
        }
        // where no bar is drawn (stderr not a terminal: a log, CI), a line each time a task's state changes
        if multi.is_hidden() {
            for t in status.tasks.iter().filter(|t| !t.replaced) {
                let state = t.state();
                // queued: not said (nor again when a retry queues it), running again after that is
                if states_said.insert(t.index, state) == Some(state)
                    || state == pb::TaskState::Pending
                {
                    continue;
                }
                if state != pb::TaskState::Failed {
                    say(format!(
                        "task {} ({}) {}",
                        t.index,
                        t.label,
                        task_state_name(t.state)
                    ))?;
                } else if failed_said.insert(t.index) {
                    say(format!(
                        "task {} ({}) failed: {}",
                        t.index, t.label, t.error
                    ))?;
                }
            }
        }
        // what the engine warned of while it rendered a result: the job succeeds, its image may not be
        // what was asked for
        for t in status.tasks.iter().filter(|t| !t.warnings.is_empty()) {
            if warnings_said.insert((t.index, t.result.clone())) {
                for warning in &t.warnings {
                    say(format!("task {} ({}) warning: {warning}", t.index, t.label))?;
                }
            }
        }
        // a job's tasks can grow (a video's frames, known from its contents; a tiled job's scales): once
        // past TASK_BARS, for good, the bars of each task so far cleared
        let frames = match status.spec.as_ref() {
            Some(spec) if matches!(spec.kind, Some(pb::job_spec::Kind::Video(_))) => {
                spec.contents.len()
            }
            _ => 0,
        };
        if !many && status.tasks.len().max(frames) > TASK_BARS {
            many = true;
            for bar in all_bars.drain(..) {
                bar.finish_and_clear();
                multi.remove(&bar);
            }
        }
        if !many {
            // a bar per task, kept once it ends
            for t in &status.tasks {
                let index = t.index as usize;
                while all_bars.len() <= index {
                    all_bars.push(multi.add(ProgressBar::new(1).with_style(style.clone())));
                }
                show_task(&all_bars[index], t);
            }
        } else {
            // many tasks: a bar counting them (not those replaced by a new plan of their scale), and one
            // for each task while it runs
            let tasks: Vec<&pb::TaskStatus> = status.tasks.iter().filter(|t| !t.replaced).collect();
            let count = |state| tasks.iter().filter(|t| t.state() == state).count();
            // (a keep-going job's tasks cancelled alone are done with too)
            let (done, failed, cancelled) = (
                count(pb::TaskState::Succeeded),
                count(pb::TaskState::Failed),
                count(pb::TaskState::Cancelled),
            );
            let tasks_bar = tasks_bar
                .get_or_insert_with(|| multi.add(ProgressBar::new(1).with_style(style.clone())));
            tasks_bar.set_prefix("tasks");
            tasks_bar.set_length(tasks.len() as u64);
            tasks_bar.set_position((done + failed + cancelled) as u64);
            let cancelled = match cancelled {
                0 => String::new(),
                n => format!(", {n} cancelled"),
            };
            tasks_bar.set_message(format!(
                "{done} succeeded, {failed} failed{cancelled}, {} running",
                count(pb::TaskState::Running)
            ));
            for t in &status.tasks {
                let running = t.state() == pb::TaskState::Running;
                match running_bars.get(&t.index) {
                    Some(bar) if !running => {
                        bar.finish_and_clear();
                        multi.remove(bar);
                        running_bars.remove(&t.index);
                    }
                    Some(bar) => show_task(bar, t),
                    None if running => {
                        let bar = multi.add(ProgressBar::new(1).with_style(style.clone()));
                        show_task(&bar, t);
                        running_bars.insert(t.index, bar);
                    }
                    None => {}
                }
                if t.state() == pb::TaskState::Failed && failed_said.insert(t.index) {
                    say(format!(
                        "task {} ({}) failed: {}",
                        t.index, t.label, t.error
                    ))?;
                }
            }
        }
        last = Some(status);
    }
    for bar in all_bars
        .into_iter()
        .chain(running_bars.into_values())
        .chain(tasks_bar)
        .chain(job_bar)
    {
        bar.finish();
    }
    last.context("the job's event stream ended without an event")
}

/// A job that succeeded, whose results could not be fetched (the output's disk full or its folder gone, the
/// coordinator out of reach): its coordinator still has them ([`wait_and_fetch`]).
#[derive(Debug, thiserror::Error)]
#[error("fetching the results of job {job_id}")]
pub(crate) struct FetchFailed {
    pub(crate) job_id: JobId,
    #[source]
    pub(crate) source: stylefarm_client::ClientError,
}

/// Waits for the job, fetches its results when `output` is given, and fails when the job did not succeed.
/// A keep-going batch or sweep that failed has its rendered tasks' results (and a sweep's contact sheet)
/// fetched before the error, and a failed job's first failed tasks' logs are printed
/// ([`print_failed_logs`]; `coordinator_stays`: whether the coordinator keeps the job once this returns).
pub(crate) async fn wait_and_fetch(
    client: &mut FarmClient,
    job_id: &JobId,
    output: Option<&Path>,
    coordinator_stays: bool,
) -> anyhow::Result<()> {
    let status = watch_job(client, job_id, true, None, output).await?;
    let succeeded = status.state() == pb::JobState::Succeeded;
    let kept_going = status.spec.as_ref().is_some_and(|s| s.keep_going)
        && status.tasks.iter().any(|t| !t.result.is_empty());
    if let Some(output) = output.filter(|_| succeeded || kept_going) {
        let wrote = |path: &Path| eprintln!("wrote {}", path.display());
        match client.fetch_each(&status, output, wrote).await {
            Ok(_) => {}
            // the job's own error comes after, not in place of, this one
            Err(e) if !succeeded => eprintln!("fetching the rendered results: {e}"),
            Err(source) => {
                return Err(FetchFailed {
                    job_id: job_id.clone(),
                    source,
                }
                .into())
            }
        }
    }
    if status.state() == pb::JobState::Failed {
        print_failed_logs(client, &status, coordinator_stays).await;
    }
    // a batch or sweep that failed without --keep-going: its results rendered are on the coordinator,
    // not written; said, with how to write them
    let rendered = status.tasks.iter().filter(|t| !t.result.is_empty()).count();
    let several = matches!(
        status.spec.as_ref().and_then(|s| s.kind.as_ref()),
        Some(pb::job_spec::Kind::Batch(_) | pb::job_spec::Kind::Sweep(_))
    );
    if !succeeded && !kept_going && several && coordinator_stays && rendered > 0 {
        eprintln!(
            "{rendered} of its {} results were rendered: {}",
            status.tasks.len(),
            fetch_hint(job_id, output)
        );
    }
    ended_well(&status)
}

/// The command's error for a job that ended without succeeding (failed, cancelled): its state and error;
/// for a keep-going batch that rendered all it was given but left out content images at its submit
/// ([`JobSpec::left_out`](stylefarm_core::job::JobSpec::left_out)), as make -k fails: saying how many.
fn ended_well(status: &pb::JobStatus) -> anyhow::Result<()> {
    let state = job_state_name(status.state);
    if status.state() != pb::JobState::Succeeded {
        // an error that only repeats the state ("cancelled") is not said twice
        match status.error.as_str() {
            "" => bail!("job {} {state}", status.job_id),
            error if error == state => bail!("job {} {state}", status.job_id),
            error => bail!("job {} {state}: {error}", status.job_id),
        }
    }
    if let Some(first) = left_out_of(status).first() {
        return Err(left_out_error(
            &status.job_id,
            &state,
            left_out_of(status).len(),
            first,
        ));
    }
    Ok(())
}

/// The error of a wait for a job (`state`) that rendered its photos but left out `count` at its submit,
/// `first` saying the first and why.
fn left_out_error(job_id: &str, state: &str, count: usize, first: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "job {job_id} {state}: the others rendered, but {count} content image(s) were left out at its \
         submit (the first: {first})"
    )
}

/// The content images a keep-going batch left out at its submit, each saying which and why
/// ([`JobSpec::left_out`](stylefarm_core::job::JobSpec::left_out)).
fn left_out_of(status: &pb::JobStatus) -> &[String] {
    status.spec.as_ref().map_or(&[], |spec| &spec.left_out)
}

/// The failed tasks whose last attempt's log a failed job's wait prints ([`print_failed_logs`]).
const FAILED_LOGS_SHOWN: usize = 3;

/// Prints the log of the last attempt of each of a job's first [`FAILED_LOGS_SHOWN`] failed tasks on
/// stderr (`local`'s coordinator is gone once the command returns), and, when the coordinator stays, how to
/// read the others'. Nothing when the coordinator answers no log (one older than task logs).
async fn print_failed_logs(
    client: &mut FarmClient,
    status: &pb::JobStatus,
    coordinator_stays: bool,
) {
    let job_id = JobId::from(status.job_id.clone());
    let failed: Vec<&pb::TaskStatus> = status
        .tasks
        .iter()
        .filter(|t| t.state == pb::TaskState::Failed as i32)
        .collect();
    for t in failed.iter().take(FAILED_LOGS_SHOWN) {
        // a coordinator without task logs (an older one) answers an error: nothing to show
        let Ok(log) = client.task_log(&job_id, t.index).await else {
            return;
        };
        // a task whose attempts ended before its coordinator kept logs has none
        let Some(last) = log.attempts.into_iter().last() else {
            continue;
        };
        let last = [AttemptLog::from(last)];
        eprint!(
            "task {} ({}), its last attempt's log:\n{}",
            t.index,
            t.label,
            stylefarm_core::task_log::text(&last)
        );
    }
    if coordinator_stays && failed.len() > FAILED_LOGS_SHOWN {
        eprintln!(
            "{} more failed tasks: `stylefarm log {job_id} TASK` shows each one's log while the \
             coordinator keeps the job",
            failed.len() - FAILED_LOGS_SHOWN
        );
    }
}

pub(crate) fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    if args.job.output.is_some() && !args.wait {
        bail!(
            "output: --output is written once the job is done, with --wait (or later: stylefarm fetch \
             JOB --output PATH)"
        );
    }
    let job = JobFiles {
        paused: args.paused,
        ..args.job.files()?
    };
    runtime()?.block_on(async move {
        let mut client = connect(&args.connect).await?;
        let job_id = client.submit_files(&job).await?;
        say_left_out(client.left_out());
        // the files read, less those left out: neither uploaded nor on the coordinator
        let files = job.inputs().collect::<std::collections::HashSet<_>>().len() as u64;
        let files = files.saturating_sub(client.left_out().len() as u64);
        let held = files.saturating_sub(client.uploaded());
        eprintln!(
            "{} image(s) uploaded{}",
            client.uploaded(),
            if held > 0 {
                format!(", {held} already on the coordinator")
            } else {
                String::new()
            }
        );
        outln!("{job_id}");
        if let (false, Some(request_id)) = (client.created(), &job.request_id) {
            // a repeat (a retry of a submit whose answer was lost) or a request id used again: either
            // way, the job is the one submitted first, with the options it had then
            eprintln!(
                "{job_id} was submitted before with request id {request_id}: that job, as it was \
                 submitted then (this command's options are not used; another request id submits a \
                 new job)"
            );
        }
        if args.wait {
            // the job is the coordinator's now: an interrupted wait leaves it running, and says so
            tokio::select! {
                waited = wait_and_fetch(&mut client, &job_id, args.job.output.as_deref(), true) => {
                    waited?
                }
                () = shutdown_signal() => bail!(
                    "interrupted: the job goes on; `stylefarm watch {job_id}` follows it, `stylefarm \
                     cancel {job_id}` stops it{}",
                    match &args.job.output {
                        Some(output) => format!(", {}", fetch_hint(&job_id, Some(output))),
                        None => String::new(),
                    }
                ),
            }
            // a coordinator without JobSpec.left_out did not keep them ([`ended_well`] says them
            // otherwise): said here
            if let Some((_, first)) = client.left_out().first() {
                let count = client.left_out().len();
                return Err(left_out_error(job_id.as_str(), "succeeded", count, first));
            }
        }
        Ok(())
    })
}

/// Says each content image that a keep-going batch left out ([`FarmClient::left_out`]), on stderr.
pub(crate) fn say_left_out(left_out: &[(PathBuf, String)]) {
    for (_, why) in left_out {
        eprintln!("left out: {why}");
    }
}

/// Writes each preview to `dir` as `task-<index>.png` (the task's latest replaces the one before; written
/// to a temporary file of its own there and renamed, so that a viewer, or another watch writing there,
/// never reads half a file). A preview that cannot be written is left out with a warning: the watch goes
/// on.
fn write_previews(dir: &Path, previews: &[pb::TaskPreview]) {
    for preview in previews {
        let path = dir.join(format!("task-{}.png", preview.task_index));
        // with the permissions of a new file, as fetch's results (tempfile's own are 0600)
        if let Err(e) = stylefarm_core::imaging::write_whole(&path, &preview.png) {
            eprintln!("warning: preview_dir: {e}");
        }
    }
}

pub(crate) fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let WatchArgs {
        job: args,
        preview_dir,
    } = args;
    if let Some(dir) = &preview_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("preview_dir: creating {}", dir.display()))?;
    }
    runtime()?.block_on(async move {
        let mut client = connect(&args.connect).await?;
        let watched = watch_job(
            &mut client,
            &args.job_id,
            true,
            preview_dir.as_deref(),
            None,
        );
        let status = watched.await?;
        // a job that failed or was cancelled fails the command, as `submit --wait`'s does
        ended_well(&status)?;
        eprintln!("job {} {}", status.job_id, job_state_name(status.state));
        Ok(())
    })
}

fn print_status(s: &pb::JobStatus) {
    let done = s.tasks.iter().filter(|t| !t.result.is_empty()).count();
    // a video's frames are queued as they come: its count is its frames'
    let (all, what) = match s.tasks.iter().find_map(|t| t.frame.as_ref()) {
        Some(f) => (f.frames as usize, "frames"),
        // less the tasks a new plan replaced
        None => (s.tasks.iter().filter(|t| !t.replaced).count(), "tasks"),
    };
    // a keep-going batch's or sweep's tasks that failed, or were cancelled, alone while it runs on (and
    // those that ended with their job); not those a new plan replaced
    let count = |state: pb::TaskState| {
        let n = (s.tasks.iter())
            .filter(|t| t.state == state as i32 && !t.replaced)
            .count();
        if n > 0 {
            format!(", {n} {}", task_state_name(state as i32))
        } else {
            String::new()
        }
    };
    let failed = count(pb::TaskState::Failed) + &count(pb::TaskState::Cancelled);
    let left_out = left_out_of(s).len();
    let warned = s.tasks.iter().filter(|t| !t.warnings.is_empty()).count();
    let note = if !s.waiting.is_empty() {
        format!("waiting: {}", s.waiting)
    } else if s.paused && s.error.is_empty() {
        "paused".to_string()
    } else if s.error.is_empty() && left_out > 0 {
        format!("{left_out} content image(s) left out at its submit")
    } else if s.error.is_empty() && warned > 0 {
        format!("{warned} task(s) rendered with warnings")
    } else {
        s.error.clone()
    };
    // its name, if it has one, quoted after its id
    let name = s
        .spec
        .as_ref()
        .filter(|spec| !spec.name.is_empty())
        .map_or_else(String::new, |spec| format!(" {:?}", spec.name));
    outln!(
        "{}{name}\t{}\t{done}/{all} {what}{failed}\t{note}",
        s.job_id,
        job_state_name(s.state)
    );
}

pub(crate) fn status(args: JobRef) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.connect).await?;
        let s = client.job(&args.job_id).await?;
        print_status(&s);
        // what `stylefarm priority` set (or submit's --priority), when not the default
        if let Some(priority) = s
            .spec
            .as_ref()
            .map(|spec| spec.priority)
            .filter(|&p| p != 0)
        {
            outln!("  priority {priority}");
        }
        for why in left_out_of(&s) {
            outln!("  left out: {why}");
        }
        if s.scales > 0 {
            outln!(
                "  scales stitched {}/{}{}",
                s.scale_results.len(),
                s.scales,
                if s.result.is_empty() {
                    String::new()
                } else {
                    format!(", result {}", s.result)
                }
            );
        }
        for t in &s.tasks {
            // where its next attempt starts from (--checkpoint-every, --checkpoint-secs)
            let checkpoint = t.checkpoint.as_ref().map_or_else(String::new, |c| {
                format!("checkpoint scale {} iteration {} ", c.scale, c.iteration)
            });
            outln!(
                "  {:>3} {:<10} {} attempts {} {checkpoint}{}",
                t.index,
                // cancelled for a new plan of its scale (the error says why): not the job's work
                if t.replaced {
                    "replaced".to_string()
                } else {
                    task_state_name(t.state)
                },
                padded(&t.label, 32),
                t.attempts,
                t.error
            );
            for warning in &t.warnings {
                outln!("      warning: {warning}");
            }
        }
        Ok(())
    })
}

/// `text` padded with spaces to `width` terminal columns, where `{:<width}` pads to `width` characters: a
/// CJK character takes two columns (unicode-width's UAX #11 widths), a combining mark none.
fn padded(text: &str, width: usize) -> String {
    let pad = width.saturating_sub(unicode_width::UnicodeWidthStr::width(text));
    format!("{text}{}", " ".repeat(pad))
}

/// The arguments of `log`.
#[derive(Args)]
pub(crate) struct LogArgs {
    #[command(flatten)]
    job: JobRef,
    /// The task's index, as `stylefarm status` lists it.
    #[arg(default_value_t = 0)]
    task: u32,
}

/// Prints a task's log: for each of its last attempts, a line with its number, worker, start (UTC), how
/// long it ran and how it ended, then its worker's lines, indented.
pub(crate) fn log(args: LogArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.job.connect).await?;
        let log = client.task_log(&args.job.job_id, args.task).await?;
        let attempts: Vec<AttemptLog> = log.attempts.into_iter().map(Into::into).collect();
        out!("{}", stylefarm_core::task_log::text(&attempts));
        Ok(())
    })
}

pub(crate) fn list(args: ListArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.connect).await?;
        // one more than shown: whether the list goes on past the limit, to say so
        let asked = match args.limit {
            0 => 0,
            n => n.saturating_add(1),
        };
        let jobs = client.list(&args.states, asked).await?;
        let shown = match args.limit {
            0 => jobs.len(),
            n => jobs.len().min(n as usize),
        };
        for s in &jobs[..shown] {
            print_status(s);
        }
        if shown < jobs.len() {
            eprintln!("(the newest {shown} shown; --limit N shows more, --limit 0 all)");
        }
        // said on stderr: stdout stays empty for a script
        if jobs.is_empty() && args.states.is_empty() {
            eprintln!("(no jobs: none submitted, or all deleted)");
        } else if jobs.is_empty() {
            eprintln!("(no jobs in those states)");
        }
        Ok(())
    })
}

/// The arguments of `workers`.
#[derive(Args)]
pub(crate) struct WorkersArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Lists the workers, one a line: id, health, device, memory in use of the device's, tags, seconds since
/// it last called, and its task (`JOB/INDEX` and how much is done, when the job is the caller's).
pub(crate) fn workers(args: WorkersArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.connect).await?;
        let workers = client.workers().await?;
        if workers.is_empty() {
            // said on stderr: stdout stays empty for a script
            eprintln!("(no workers: none has called this coordinator since it started)");
        }
        if workers.iter().any(|w| w.name_shared) {
            eprintln!(
                "name-shared: another worker process runs under that worker's name, and the farm counts \
                 them as one (a tiled or exact scale plans for one; a drain or blocklist takes both): give \
                 each worker its own --name"
            );
        }
        for w in workers {
            let bytes = |b: u64| match b {
                0 => "?".to_string(),
                b => bytesize::ByteSize(b).to_string(),
            };
            let device = if w.device.is_empty() { "?" } else { &w.device };
            let tags = if w.tags.is_empty() {
                "-".to_string()
            } else {
                w.tags.join(",")
            };
            let health = match (w.health.as_str(), w.drained) {
                // stopping (a SIGTERM): it finishes its task and signs off, drained or not
                ("busy" | "idle", _) if w.leaving => "leaving",
                ("busy", true) => "draining",
                ("idle", true) => "drained",
                ("silent", true) => "silent,drained",
                (health, _) => health,
            };
            let task = match (w.job_id.as_str(), w.task) {
                ("", _) | (_, None) if w.health == "busy" => "another client's task".to_string(),
                ("", _) | (_, None) => String::new(),
                (job, Some(index)) => format!("{job}/{index} {:.0}%", w.progress * 100.0),
            };
            let seen = match w.last_seen_s {
                s if s < 0.0 => "not since the coordinator started".to_string(),
                s => format!("{s:.0} s ago"),
            };
            // two processes under one name count as one: said beside its health, and once below
            let shared = if w.name_shared { ",name-shared" } else { "" };
            outln!(
                "{}\t{health}{shared}\t{device}\t{} of {}\t{tags}\t{seen}\t{task}",
                w.worker_id,
                bytes(w.memory_used_bytes),
                bytes(w.memory_bytes),
            );
        }
        Ok(())
    })
}

/// The arguments of `drain` and `undrain`.
#[derive(Args)]
pub(crate) struct DrainArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Worker names, or ids as `stylefarm workers` prints them (`name#n`: its name is meant): every
    /// registration of each.
    #[arg(required = true)]
    workers: Vec<String>,
}

/// Drains (or undrains) workers, one line each: the name, and `drained`/`undrained` or that it was so
/// already.
pub(crate) fn drain(args: DrainArgs, drain: bool) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.connect).await?;
        let now = if drain { "drained" } else { "undrained" };
        for (name, changed) in client.drain(&args.workers, !drain).await? {
            let already = if changed { "" } else { "already " };
            outln!("{name}\t{already}{now}");
        }
        Ok(())
    })
}

pub(crate) fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.job.connect).await?;
        let s = client.job(&args.job.job_id).await?;
        // each as it is written
        (client.fetch_each(&s, &args.output, |path| outln!("{}", path.display()))).await?;
        let done = s.tasks.iter().filter(|t| !t.result.is_empty()).count();
        if !stylefarm_client::job_ended(s.state()) {
            eprintln!(
                "the job is {}: its results so far ({done} of {} tasks)",
                stylefarm_client::job_state_name(s.state),
                s.tasks.len()
            );
        } else if s.state() != pb::JobState::Succeeded {
            // written, but not the job's whole result: the command fails, saying so
            eprintln!(
                "the job ended unfinished: the results of {done} of its {} tasks",
                s.tasks.len()
            );
            ended_well(&s)?;
        } else if !left_out_of(&s).is_empty() {
            eprintln!(
                "the job left out {} content image(s) at its submit (stylefarm status {} lists them)",
                left_out_of(&s).len(),
                s.job_id
            );
        }
        Ok(())
    })
}

/// Runs `act` on each job of `args` in turn (one connection), printing `<job>\t<what act says>`. With one
/// job its error is the command's; with several, a job's error is printed and the others go on, and the
/// command fails at the end saying how many did.
fn each_job(
    args: JobRefs,
    mut act: impl AsyncFnMut(&mut FarmClient, &JobId) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.connect).await?;
        let mut failed = 0;
        for job_id in &args.job_ids {
            match act(&mut client, job_id).await {
                Ok(line) => outln!("{job_id}\t{line}"),
                Err(e) if args.job_ids.len() == 1 => return Err(e),
                Err(e) => {
                    eprintln!("error: {job_id}: {e:#}");
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            bail!(
                "the command failed for {failed} of the {} jobs given (each said above)",
                args.job_ids.len()
            );
        }
        Ok(())
    })
}

pub(crate) fn delete(args: JobRefs) -> anyhow::Result<()> {
    each_job(args, async |client, job_id| {
        client.delete(job_id).await?;
        Ok("deleted".into())
    })
}

/// What pause, resume, priority and cancel say of a job that had already finished: they change nothing.
const LEFT_AS_IT_IS: &str = "finished: left as it is";

/// `stylefarm pause` (`paused`) and `stylefarm resume`.
pub(crate) fn pause(args: JobRefs, paused: bool) -> anyhow::Result<()> {
    each_job(args, async |client, job_id| {
        let state = if paused {
            client.pause(job_id).await?
        } else {
            client.resume(job_id).await?
        };
        let finished = stylefarm_client::job_ended(state);
        let now = match (finished, paused) {
            (true, _) => LEFT_AS_IT_IS,
            (false, true) => "paused",
            (false, false) => "resumed",
        };
        Ok(format!("{}\t{now}", job_state_name(state as i32)))
    })
}

pub(crate) fn priority(args: PriorityArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.job.connect).await?;
        let state = client.set_priority(&args.job.job_id, args.priority).await?;
        let set = match stylefarm_client::job_ended(state) {
            true => LEFT_AS_IT_IS.to_string(),
            false => format!("priority {}", args.priority),
        };
        let state = job_state_name(state as i32);
        outln!("{}\t{state}\t{set}", args.job.job_id);
        Ok(())
    })
}

pub(crate) fn retry(args: JobOrTaskRefs) -> anyhow::Result<()> {
    let (jobs, tasks) = args.jobs()?;
    each_job(jobs, async |client, job_id| {
        let retried = client.retry_tasks(job_id, &tasks).await?;
        let (name, requeued) = (job_state_name(retried.state), retried.tasks_requeued);
        Ok(match (requeued, retried.step_again) {
            (0, true) => format!("{name}\tits coordinator's step runs again (no task to render)"),
            // a job still running, none of its tasks failed alone (keep-going); or an older
            // coordinator's answer, which never says that a step runs again: true of both
            (0, false) => {
                format!(
                    "{name}\tno task queued again: none of its tasks has failed or been cancelled"
                )
            }
            _ => format!("{name}\t{requeued} task(s) queued again"),
        })
    })
}

pub(crate) fn cancel(args: JobOrTaskRefs) -> anyhow::Result<()> {
    let (jobs, tasks) = args.jobs()?;
    each_job(jobs, async |client, job_id| {
        let (state, cancelled) = client.cancel_tasks(job_id, &tasks).await?;
        // a job that had ended otherwise (succeeded, failed) is left as it was, as pause says
        let ended_before = stylefarm_client::job_ended(state) && state != pb::JobState::Cancelled;
        let state = job_state_name(state as i32);
        Ok(if tasks.is_empty() && ended_before {
            format!("{state}\t{LEFT_AS_IT_IS}")
        } else if tasks.is_empty() {
            state
        } else {
            format!("{state}\t{cancelled} task(s) cancelled")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::{images_in, images_of, listen_addr, padded, passed_over, scale_time_left};
    use std::path::PathBuf;
    use std::time::Duration;

    #[test]
    fn a_listen_address_may_name_a_host() {
        assert_eq!(listen_addr("127.0.0.1:7700").unwrap().port(), 7700);
        assert!(listen_addr("[::1]:7700").unwrap().is_ipv6());
        let local = listen_addr("localhost:7701").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 7701, "{local}");
        // IPv4 where the name has one
        assert!(local.is_ipv4(), "{local}");
        let err = listen_addr("localhost").unwrap_err();
        assert!(err.contains("'localhost' is not HOST:PORT"), "{err}");
        assert!(listen_addr("localhost:port").is_err());
    }

    #[test]
    fn a_lease_shorter_than_its_heartbeats_is_refused_naming_both() {
        let err = super::coordinator_config(Default::default(), 1.5, 2.0, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lease_secs: --lease-secs 1.5 must be more than --heartbeat-secs 2 (a lease outlasts the \
             heartbeats that renew it), both more than 0"
        );
        assert!(super::coordinator_config(Default::default(), 2.5, 2.0, 3).is_ok());
        let err = super::coordinator_config(Default::default(), 10.0, 0.0, 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "heartbeat_secs: --heartbeat-secs 0 must be more than 0"
        );
    }

    /// 3 of a scale's tiles done in 30 s since the watch saw it start, 5 left: about 50 s.
    #[test]
    fn a_scale_s_time_left_follows_the_pace_of_its_tiles() {
        let s = Duration::from_secs;
        assert_eq!(scale_time_left(s(30), 3, 5), Some(s(50)));
        assert_eq!(scale_time_left(s(30), 0, 5), None, "no tile done yet");
        assert_eq!(scale_time_left(s(30), 3, 0), None, "none left");
    }

    /// Columns line up in a terminal whatever the labels' script: padded by display width.
    #[test]
    fn labels_are_padded_to_terminal_columns() {
        assert_eq!(padded("ab", 4), "ab  ");
        assert_eq!(padded("東京 x 富士", 12), "東京 x 富士 ");
        assert_eq!(padded("e\u{301}", 3), "e\u{301}  ");
        assert_eq!(padded("longer than", 4), "longer than");
    }

    /// A directory stands for its images, sorted by name: other files, hidden ones (`._b.jpg`) and
    /// subdirectories are left out (and links to folders), a file given by name is kept as it is, a
    /// broken link is kept (reading it says so), and a directory without images is an error naming the
    /// field.
    #[test]
    fn a_directory_stands_for_the_images_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let photos = dir.path().join("photos");
        std::fs::create_dir_all(photos.join("nested")).unwrap();
        for name in [
            "b.jpg",
            "a.PNG",
            "c.webp",
            "notes.txt",
            "nested/d.png",
            "._b.jpg",
            ".x.png",
        ] {
            std::fs::write(photos.join(name), b"").unwrap();
        }
        // a link to a photo that is gone is kept (reading it says so); one to a folder is not a file
        std::os::unix::fs::symlink(dir.path().join("gone.jpg"), photos.join("e.jpg")).unwrap();
        std::os::unix::fs::symlink(photos.join("nested"), photos.join("f.png")).unwrap();
        let single = dir.path().join("single.tif");
        let (found, others) = images_in("content", &[single.clone(), photos.clone()]).unwrap();
        // the other files, said
        assert_eq!(others, [photos.join("notes.txt")]);
        let note = passed_over("content", &others).unwrap();
        assert!(
            note.starts_with(&format!("note: content: 1 file(s) in {}", photos.display()))
                && note.ends_with("convert HEIC or RAW photos to JPEG): notes.txt"),
            "{note}"
        );
        assert_eq!(passed_over("content", &[]), None);
        let many: Vec<PathBuf> = (0..10).map(|i| photos.join(format!("{i}.heic"))).collect();
        let note = passed_over("content", &many).unwrap();
        assert!(
            note.contains(": 10 file(s) in ") && note.ends_with("7.heic, and 2 more"),
            "{note}"
        );
        let names: Vec<_> = found
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "single.tif",
                "photos/a.PNG",
                "photos/b.jpg",
                "photos/c.webp",
                "photos/e.jpg"
            ]
        );
        assert_eq!(
            images_of("style", &[photos.join("nested")]).unwrap(),
            [photos.join("nested/d.png")]
        );
        std::fs::remove_file(photos.join("nested/d.png")).unwrap();
        let err = images_of("style", &[photos.join("nested")])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("style: the directory")
                && err.contains("nested")
                && err.contains("no image"),
            "{err}"
        );
    }
}
