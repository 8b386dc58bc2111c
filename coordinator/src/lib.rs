#![doc = include_str!("../README.md")]

pub mod auth;
pub mod blobs;
pub mod connections;
pub mod decoding;
pub mod exchange;
pub mod gc;
pub mod metrics;
pub mod model;
pub mod notify;
mod pipeline;
pub mod scheduler;
mod service;
mod sheet;
pub mod status;
pub mod store;
mod tiled;
pub mod workers;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use stylefarm_core::ids::WorkerId;
use stylefarm_proto::pb::render_service_server::RenderServiceServer;
use stylefarm_proto::pb::worker_service_server::WorkerServiceServer;
use stylefarm_proto::{FILE_DESCRIPTOR_SET, MAX_MESSAGE_BYTES};
use tonic::service::interceptor::InterceptedService;

pub use scheduler::SchedulerConfig;

/// Errors of the coordinator; [`tonic::Status`] gets them through one mapping.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A job spec, image or argument that stylefarm-core refused: INVALID_ARGUMENT on the wire.
    #[error(transparent)]
    Invalid(#[from] stylefarm_core::Error),
    /// No such job (the message names it): NOT_FOUND on the wire.
    #[error("{0}")]
    NotFound(String),
    /// A limit was reached (the message names it): RESOURCE_EXHAUSTED on the wire.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The coordinator holds as much of a kind of work as it takes at once (the message names the limit):
    /// UNAVAILABLE on the wire, with a `RetryInfo` of [`BUSY_RETRY_DELAY`]
    /// ([`stylefarm_proto::retry_later`]): the client and the worker send the request again.
    #[error("{0}")]
    Busy(String),
    /// The job's state does not allow the call (the message says why): FAILED_PRECONDITION on the wire.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The job store failed to load or commit: UNAVAILABLE on the wire when it could not be reached (a
    /// Redis server down), RESOURCE_EXHAUSTED when its disk is full, else INTERNAL.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A file system error: creating the data dir, or reading or writing the blob store; RESOURCE_EXHAUSTED
    /// on the wire when the disk is full (ENOSPC, EDQUOT), UNAVAILABLE when the blob store is out of reach
    /// (S3 down, after its retries), else INTERNAL.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The coordinator's own failure (a blocking task that panicked, an image it stored and cannot read
    /// back): INTERNAL on the wire.
    #[error("{0}")]
    Internal(String),
    /// A scale's tiles did not fit its plan when stitched: INTERNAL on the wire.
    #[error(transparent)]
    Stitch(#[from] stylefarm_core::tiling::StitchError),
    /// A status from the transport itself (a stream that broke), passed on as it came.
    #[error("{}", .0.message())]
    Rpc(tonic::Status),
    /// The gRPC server could not be built (reflection) or failed while serving.
    #[error("server: {0}")]
    Transport(String),
}

impl From<scheduler::SchedulerError> for Error {
    fn from(e: scheduler::SchedulerError) -> Self {
        match e {
            scheduler::SchedulerError::JobNotFound(_) => Error::NotFound(e.to_string()),
            scheduler::SchedulerError::Invalid(e) => Error::Invalid(e),
            scheduler::SchedulerError::Store(e) => Error::Store(e),
            scheduler::SchedulerError::Limit(m) => Error::ResourceExhausted(m),
            scheduler::SchedulerError::Precondition(m) => Error::FailedPrecondition(m),
        }
    }
}

impl Error {
    /// A bad value of a request's `field`: INVALID_ARGUMENT, the message starting with the field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Error {
        Error::Invalid(stylefarm_core::Error::invalid(field, message))
    }

    /// Whether the blob store is out of reach ([`out_of_reach`]): work that failed with it may be tried
    /// again later.
    pub(crate) fn blobs_away(&self) -> bool {
        matches!(self, Error::Io(io) if out_of_reach(io))
    }

    /// Whether the job store is out of reach ([`store::StoreError::is_unavailable`]): work that failed with
    /// it may be tried again once it answers.
    pub(crate) fn store_away(&self) -> bool {
        matches!(self, Error::Store(s) if s.is_unavailable())
    }
}

/// The most calls (HTTP/2 streams) one connection has open at once: hyper's default, which tonic's server
/// otherwise lifts. Each may hold a message of up to [`MAX_MESSAGE_BYTES`] being received.
pub const MAX_CONCURRENT_STREAMS: u32 = 200;

/// How long a caller answered [`Error::Busy`] is asked to wait before it sends the request again.
pub const BUSY_RETRY_DELAY: Duration = Duration::from_secs(1);

/// The one mapping from the coordinator's errors to gRPC codes.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::Invalid(e) => tonic::Status::invalid_argument(e.to_string()),
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::ResourceExhausted(m) => tonic::Status::resource_exhausted(m),
            Error::Busy(m) => stylefarm_proto::retry_later(m, BUSY_RETRY_DELAY),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Error::Rpc(status) => status,
            Error::Store(e) => match e.kind {
                store::StoreErrorKind::Unavailable => tonic::Status::unavailable(e.to_string()),
                store::StoreErrorKind::StorageFull => {
                    tonic::Status::resource_exhausted(e.to_string())
                }
                store::StoreErrorKind::Failed | store::StoreErrorKind::Fenced => {
                    tonic::Status::internal(e.to_string())
                }
            },
            Error::Io(e) if storage_full(&e) => {
                tonic::Status::resource_exhausted(format!("storage full: {e}"))
            }
            Error::Io(e) if out_of_reach(&e) => {
                tonic::Status::unavailable(format!("blob store out of reach: {e}"))
            }
            e @ (Error::Io(_) | Error::Internal(_) | Error::Stitch(_) | Error::Transport(_)) => {
                tonic::Status::internal(e.to_string())
            }
        }
    }
}

/// The span of one gRPC call (`rpc`, with its method), child of the caller's span when the request carries
/// a trace context (`traceparent`): a worker's task and the coordinator's handling of its calls are one
/// trace.
fn rpc_span(request: &http::Request<()>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let span = tracing::info_span!("rpc", method = request.uri().path());
    let parent = stylefarm_proto::connect::extract_trace_context(request.headers());
    // an error only says that no OpenTelemetry layer records spans (e.g. in a library's tests)
    let _ = span.set_parent(parent);
    span
}

/// tonic answers a request over the message size limit ([`MAX_MESSAGE_BYTES`]) with OUT_OF_RANGE; for a
/// limit reached, gRPC's servers and this project's other limits answer RESOURCE_EXHAUSTED: the status is
/// rewritten, its message (which names the limit in bytes) kept.
fn message_limit_status<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers();
    let too_large = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if too_large {
        response
            .headers_mut()
            .insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// The most characters of an error's message (gRPC's `grpc-message`) that a client gets. A message that
/// names a value the client sent (a job id, a sha256, a style layer) would otherwise carry all of it, and
/// one of 20,000 characters, percent-encoded, is past gRPC clients' 16-KiB bound on a response's metadata:
/// the client got a transport error in place of the one naming the field.
pub const MAX_STATUS_MESSAGE_CHARS: usize = 1024;

/// `message` as a client is shown it, where it differs: its control characters escaped (`\n`, `\u{1b}`:
/// a client prints the message, to a terminal that would obey them) and cut after
/// [`MAX_STATUS_MESSAGE_CHARS`], saying how much was cut. `None` when it is shown as it is.
fn shown_status_message(message: &str) -> Option<String> {
    let count = message.chars().count();
    if count <= MAX_STATUS_MESSAGE_CHARS && !message.contains(char::is_control) {
        return None;
    }
    let mut shown = String::new();
    for c in message.chars().take(MAX_STATUS_MESSAGE_CHARS) {
        match c.is_control() {
            true => shown.extend(c.escape_default()),
            false => shown.push(c),
        }
    }
    if count > MAX_STATUS_MESSAGE_CHARS {
        let cut = count - MAX_STATUS_MESSAGE_CHARS;
        shown.push_str(&format!("... ({cut} more characters)"));
    }
    Some(shown)
}

/// An error answered at once, whoever made it (the coordinator's [`Error`], a status of tonic's), with its
/// message as [`shown_status_message`] shows it: rewritten in the response's `grpc-message` header (the
/// trailers-only response of every error of a unary or client-streaming call, and of a stream refused
/// before its first message). An error that ends a stream already under way comes in its trailers, which
/// this does not see: those (a download's I/O, a stopping coordinator) name no value a client sent.
fn shown_status<B>(mut response: http::Response<B>) -> http::Response<B> {
    // read and written by tonic's own header codec (percent-encoding), the message alone replaced
    let Some(status) = tonic::Status::from_header_map(response.headers()) else {
        return response;
    };
    let Some(shown) = shown_status_message(status.message()) else {
        return response;
    };
    let mut encoded = http::HeaderMap::new();
    if tonic::Status::new(status.code(), shown)
        .add_header(&mut encoded)
        .is_ok()
    {
        if let Some(message) = encoded.remove("grpc-message") {
            response.headers_mut().insert("grpc-message", message);
        }
    }
    response
}

/// Whether an I/O error says the disk (or the user's quota on it) is full: ENOSPC, EDQUOT.
pub(crate) fn storage_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// Whether an I/O error says a store across the network did not answer (the S3 blob store's, after its
/// retries: [`blobs::S3Blobs`]): no connection, or a request that timed out.
pub(crate) fn out_of_reach(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        NotConnected
            | ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | TimedOut
            | HostUnreachable
            | NetworkUnreachable
    )
}

/// Installs ring as rustls' crypto provider for the process, once (later calls do nothing; a provider
/// installed before stays). reqwest, which carries the S3 blob store's requests and the OTLP exporter's
/// spans, is built without a provider of its own, and tonic's TLS server takes the process's: both take
/// this one. The status page's HTTPS names its provider.
pub fn install_crypto_provider() {
    // an error only says that a provider is installed already
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// How long an active coordinator's hold on a shared store lasts unless renewed, by default.
pub const DEFAULT_LEADER_LEASE: Duration = Duration::from_secs(10);

/// Where the coordinator keeps its jobs and tasks.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum StoreConfig {
    /// `state.redb` in the data dir: one machine's coordinator (the default).
    #[default]
    Embedded,
    /// A Redis server (`redis://[user:password@]host:port[/db]`), its keys under `prefix`: the state that
    /// the coordinators of a cluster share.
    Redis {
        /// The server's URL.
        url: String,
        /// The keys' prefix ([`store::DEFAULT_PREFIX`] unless several farms share the server).
        prefix: String,
        /// How long the active coordinator's hold on the store lasts unless renewed: a standby takes over
        /// within this of the active one's death ([`store::RedisStore::open_active`]).
        lease: Duration,
    },
}

impl std::str::FromStr for StoreConfig {
    type Err = Error;

    /// `embedded`, or a `redis://` (`rediss://` for TLS) URL whose keys take the default prefix. An error
    /// names `store`.
    fn from_str(s: &str) -> Result<Self, Error> {
        if s == "embedded" {
            Ok(StoreConfig::Embedded)
        } else if s.starts_with("redis://") || s.starts_with("rediss://") {
            Ok(StoreConfig::Redis {
                url: s.to_string(),
                prefix: store::DEFAULT_PREFIX.to_string(),
                lease: DEFAULT_LEADER_LEASE,
            })
        } else {
            Err(Error::invalid(
                "store",
                format!("'{s}': expected embedded or a redis:// URL"),
            ))
        }
    }
}

/// Where the coordinator keeps its images (inputs, results, contact sheets, stitched scales).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum BlobsConfig {
    /// `blobs/` in the data dir (the default).
    #[default]
    Disk,
    /// An S3 bucket or S3-compatible store, `s3://<bucket>[/<prefix>]`, configured from the environment
    /// ([`blobs::S3Blobs`]): the images that the coordinators of a cluster share.
    S3(String),
}

impl std::str::FromStr for BlobsConfig {
    type Err = Error;

    /// `disk`, or an `s3://` URL. An error names `blobs`.
    fn from_str(s: &str) -> Result<Self, Error> {
        if s == "disk" {
            Ok(BlobsConfig::Disk)
        } else if s.starts_with("s3://") {
            Ok(BlobsConfig::S3(s.to_string()))
        } else {
            Err(Error::invalid(
                "blobs",
                format!("'{s}': expected disk or an s3://bucket[/prefix] URL"),
            ))
        }
    }
}

/// Where the coordinator keeps its state, and how it schedules.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// Holds `state.redb` (jobs and tasks, with the embedded store) and `blobs/` (images).
    pub data_dir: PathBuf,
    /// Where jobs and tasks are kept.
    pub store: StoreConfig,
    /// Where images are kept.
    pub blobs: BlobsConfig,
    /// How long a blob that no job refers to is kept after it was last written or used, before a garbage
    /// collection deletes it ([`gc`]); `None`: blobs are kept for good.
    pub keep_unused_blobs: Option<Duration>,
    /// Lease length, heartbeat interval, attempts, blocklist threshold, retry backoff, limits.
    pub scheduler: SchedulerConfig,
    /// The client and worker tokens; none: auth is off (one machine, a trusted network).
    pub auth: auth::AuthConfig,
    /// The listener's TLS; `None`: plain HTTP/2.
    pub tls: Option<auth::TlsConfig>,
    /// The most gRPC connections open at once (more are closed as they come: [`connections`]);
    /// [`connections::DEFAULT_MAX_CONNECTIONS`] unless configured.
    pub max_connections: usize,
    /// The most of those from one IP address (more from it are closed as they come, while others are
    /// served); `None`: no bound per source but `max_connections`.
    pub max_connections_per_source: Option<usize>,
    /// Where jobs that end are announced ([`notify`]); `None`: nowhere.
    pub notify: Option<notify::NotifyConfig>,
}

/// Runs `f` on the blocking pool. Every call that may wait for a store runs there, never on the async
/// threads that serve every call: the job store's commit (many waiting together is what lets one fsync
/// serve them all), the blob store's file or S3 requests, and image decodes.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

/// The coordinator's state: scheduler and blobs.
pub struct Coordinator {
    /// Jobs, tasks and leases, written through to `state.redb` in the data dir.
    pub(crate) scheduler: Arc<scheduler::Scheduler>,
    /// Images (inputs, task results, contact sheets, stitched scales) by the sha256 of their bytes, with
    /// their uses tracked for the garbage collection.
    pub(crate) blobs: gc::TrackedBlobs,
    /// [`CoordinatorConfig::keep_unused_blobs`].
    pub(crate) keep_unused_blobs: Option<Duration>,
    /// [`CoordinatorConfig::max_connections`].
    pub(crate) max_connections: usize,
    /// [`CoordinatorConfig::max_connections_per_source`].
    pub(crate) max_connections_per_source: Option<usize>,
    /// [`CoordinatorConfig::notify`].
    pub(crate) notify: Option<notify::NotifyConfig>,
    /// The connections served and refused, for [`metrics`].
    pub(crate) connection_metrics: connections::ConnectionMetrics,
    /// The workers heard from, with their device memory: tiled jobs' later scales are planned for the live
    /// ones.
    pub(crate) workers: workers::Registry,
    /// The shards of exact-mode scales adding up their parts.
    pub(crate) exchanges: exchange::Exchanges,
    /// The encoded bytes that uploads and task results being received may hold at once.
    pub(crate) receiving: decoding::Receiving,
    /// The memory that decodes of uploads and task results may hold at once.
    pub(crate) decoding: decoding::DecodeBudget,
    /// Since when each exact-mode scale (job, scale) has had more shards than workers left
    /// ([`Coordinator::replan_shards`]).
    pub(crate) short_of_workers: std::sync::Mutex<
        std::collections::HashMap<(stylefarm_core::ids::JobId, u32), std::time::Instant>,
    >,
    /// The services' token checks.
    pub(crate) gate: auth::Gate,
    /// The listener's TLS, checked when opened.
    pub(crate) tls: Option<tonic::transport::ServerTlsConfig>,
    /// Its certificate and key, for the status page's HTTPS.
    pub(crate) tls_files: Option<auth::TlsConfig>,
    /// The Prometheus registry.
    pub(crate) metrics: metrics::Metrics,
    /// Set when a stage's work could not be done, or a task's completion recorded, because a store was out
    /// of reach, or when a tiled scale's stitch waits for a live worker to plan the next scale for: the job
    /// waits at that stage, and [`serve`]'s loop steps the jobs awaiting a step again
    /// every [`STAGE_RETRY`] (while the job store holds no write back) until it is done.
    pub(crate) stage_deferred: std::sync::atomic::AtomicBool,
    /// The sizes of images looked at lately, by hash ([`Coordinator::dimensions`]).
    pub(crate) sizes:
        std::sync::Mutex<std::collections::HashMap<stylefarm_core::job::ImageHash, (u32, u32)>>,
    /// Stage work, one run at a time per job ([`Coordinator::stage_done`]).
    pub(crate) stepping: pipeline::OneAtATime<stylefarm_core::ids::JobId>,
    /// The stage work that task results start: [`STAGE_WORK_AT_ONCE`] runs at a time.
    pub(crate) stage_slots: Arc<tokio::sync::Semaphore>,
}

/// Stage work (a tiled scale's stitch, a sweep's contact sheet, a video's next frames) that task results
/// start runs on at most this many threads of the blocking pool at once; the rest wait for a slot without
/// holding a thread. Many jobs finishing a stage together would otherwise fill the pool, and a stitch that
/// waits there for its share of the decode budget would hold a thread that the decodes holding that budget
/// need to finish.
pub const STAGE_WORK_AT_ONCE: usize = 4;

/// How often stage work deferred (a store out of reach, no worker to plan a tiled scale for) is tried again.
pub const STAGE_RETRY: Duration = Duration::from_secs(2);

/// How long a stopping coordinator ([`serve`]'s `shutdown`) lets the calls already open finish (a result
/// or an image on its way) before it stops without them. Its job event streams (WatchJob) and its workers'
/// lease polls end at once: they would hold it open for good, or for their whole wait.
pub const STOP_DRAIN: Duration = Duration::from_secs(10);

/// Blocking work that `serve`'s loop starts now and then, on a thread of the blocking pool (the loop, and
/// the lease expiry it runs, never wait on it), one run at a time.
struct Chore {
    started: tokio::time::Instant,
    running: Option<tokio::task::JoinHandle<()>>,
}

impl Chore {
    /// A chore whose first run is due `every` from now.
    fn new() -> Chore {
        Chore {
            started: tokio::time::Instant::now(),
            running: None,
        }
    }

    /// Starts `work` when the last run has ended, `every` has passed since it started, and `wanted` says
    /// so (asked last: it may consume a flag).
    fn start(
        &mut self,
        every: Duration,
        wanted: impl FnOnce() -> bool,
        work: impl FnOnce() + Send + 'static,
    ) {
        let idle = self.running.as_ref().is_none_or(|r| r.is_finished());
        if idle && self.started.elapsed() >= every && wanted() {
            self.started = tokio::time::Instant::now();
            self.running = Some(tokio::task::spawn_blocking(work));
        }
    }
}

impl Coordinator {
    /// Opens (or creates) the data dir; jobs left there resume.
    pub fn open(config: CoordinatorConfig) -> Result<Arc<Coordinator>, Error> {
        // the auth and TLS settings first: a mistake there is found before anything is opened
        let gate = auth::Gate::new(&config.auth, config.tls.as_ref())?;
        // a share for a tenant no token names weighs nothing: said once, at the start
        for tenant in config.scheduler.tenant_shares.keys() {
            if !config.auth.clients.iter().any(|c| &c.tenant == tenant) {
                tracing::warn!(
                    tenant,
                    "--tenant-share names a tenant that no client token has (with no tokens, every \
                     client is one unnamed tenant): its share applies to no job"
                );
            }
        }
        let tls = config
            .tls
            .as_ref()
            .map(auth::TlsConfig::server_config)
            .transpose()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::invalid(
                "data_dir",
                format!("cannot make {} a directory: {e}", config.data_dir.display()),
            )
        })?;
        // S3 before the job store: a standby whose bucket or credentials are wrong says so now, not at
        // its takeover (the disk's blobs once the job store holds the data dir)
        let s3: Option<Arc<dyn blobs::BlobStore>> = match &config.blobs {
            BlobsConfig::Disk => None,
            BlobsConfig::S3(url) => {
                let s3 = Arc::new(blobs::S3Blobs::open(url)?);
                // the bytes stored (a metric), learnt by a listing in the background: a large bucket
                // takes a while
                let listed = s3.clone();
                let spawned = std::thread::Builder::new()
                    .name("blobs-listing".into())
                    .spawn(move || {
                        if let Err(e) = blobs::BlobStore::list(&*listed, &mut |_| {}) {
                            tracing::warn!(error = %e, "listing the blob store for its size");
                        }
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "listing the blob store for its size");
                }
                Some(s3)
            }
        };
        let store: Arc<dyn store::Store> = match &config.store {
            StoreConfig::Embedded => {
                Arc::new(store::RedbStore::open(&config.data_dir.join("state.redb"))?)
            }
            StoreConfig::Redis { url, prefix, lease } => {
                if matches!(config.blobs, BlobsConfig::Disk) {
                    // fine for one coordinator; a standby that takes over would have none of the images
                    tracing::warn!(
                        "jobs in Redis, images in this coordinator's data dir: a standby that takes over \
                         (another machine) has none of them; share them with --blobs s3://BUCKET"
                    );
                }
                Arc::new(store::RedisStore::open_active(url, prefix, *lease)?)
            }
        };
        // each job's end marked to announce while notifications are on
        let scheduler_config = scheduler::SchedulerConfig {
            announce_ends: config.notify.is_some(),
            ..config.scheduler
        };
        let scheduler = scheduler::Scheduler::new(scheduler_config, store)?;
        let drained = scheduler.drained();
        if !drained.is_empty() {
            // stored from before: an operator looking for why a worker takes nothing finds it here
            let names: Vec<&str> = drained.iter().take(20).map(WorkerId::as_str).collect();
            let more = drained.len().saturating_sub(names.len());
            tracing::info!(
                count = drained.len(),
                names = %names.join(", "),
                more,
                "workers drained (stylefarm undrain puts them back)"
            );
        }
        let blobs = match s3 {
            Some(s3) => s3,
            None => Arc::new(blobs::DiskBlobs::open(&config.data_dir.join("blobs"))?),
        };
        let blobs = gc::TrackedBlobs::new(blobs, config.keep_unused_blobs);
        let connection_metrics = connections::ConnectionMetrics::default();
        let metrics = metrics::Metrics::new(scheduler.metrics(), &blobs, &connection_metrics);
        let coordinator = Arc::new(Coordinator {
            scheduler: Arc::new(scheduler),
            blobs,
            keep_unused_blobs: config.keep_unused_blobs,
            max_connections: config.max_connections,
            max_connections_per_source: config.max_connections_per_source,
            notify: config.notify.clone(),
            connection_metrics,
            workers: workers::Registry::default(),
            exchanges: exchange::Exchanges::default(),
            receiving: decoding::Receiving::default(),
            decoding: decoding::DecodeBudget::default(),
            short_of_workers: Default::default(),
            gate,
            tls,
            tls_files: config.tls.clone(),
            metrics,
            stage_deferred: false.into(),
            sizes: Default::default(),
            stepping: Default::default(),
            stage_slots: Arc::new(tokio::sync::Semaphore::new(STAGE_WORK_AT_ONCE)),
        });
        coordinator.step_awaiting();
        Ok(coordinator)
    }
}

impl Coordinator {
    /// Runs a job's stage work ([`Coordinator::stage_done`]) on the blocking pool once one of the
    /// [`STAGE_WORK_AT_ONCE`] slots is free, waiting for it without holding a thread. Needs a Tokio runtime
    /// (an async task, or a thread of its blocking pool).
    pub(crate) fn spawn_stage_work(self: &Arc<Self>, job_id: stylefarm_core::ids::JobId) {
        let coordinator = self.clone();
        tokio::spawn(async move {
            let Ok(slot) = coordinator.stage_slots.clone().acquire_owned().await else {
                return;
            };
            tokio::task::spawn_blocking(move || {
                coordinator.stage_done(&job_id);
                drop(slot);
            });
        });
    }

    /// What tells why a job waits, with the workers live now ([`scheduler::Waiting`]).
    pub(crate) fn waiting(&self) -> scheduler::Waiting {
        let (live, drained) = self.live_workers();
        scheduler::Waiting {
            live,
            drained,
            blocklist_after: self.scheduler.config().blocklist_after,
        }
    }

    /// The live workers ([`workers::Registry::live`]) with their tags: those not drained (that may take
    /// work), and those drained ([`scheduler::Scheduler::drain`]).
    pub(crate) fn live_workers(&self) -> (Vec<workers::Tagged>, Vec<workers::Tagged>) {
        let drained = self.scheduler.drained();
        self.workers
            .live()
            .into_iter()
            .partition(|(id, _)| !drained.contains(&id.by_name()))
    }

    /// Drains the workers named `names` (names, or ids whose name is meant: every registration of each),
    /// or undrains them ([`scheduler::Scheduler::drain`]; blocking: it waits for the store). Each must be a
    /// worker that has called this coordinator, or (to undrain) one drained; else NOT_FOUND naming it, and
    /// none changes. Returns each one's name (as given when it is a known name, which may hold `#`; else
    /// the id's name), and those whose state changed.
    pub fn drain_workers(
        &self,
        names: &[WorkerId],
        drain: bool,
    ) -> Result<(Vec<WorkerId>, Vec<WorkerId>), Error> {
        let drained = self.scheduler.drained();
        let known: std::collections::HashSet<WorkerId> = self
            .workers
            .all()
            .into_iter()
            .map(|(id, _)| id.by_name())
            .chain(drained.iter().cloned())
            .collect();
        let mut resolved = Vec::with_capacity(names.len());
        for given in names {
            let name = match known.contains(given) {
                true => given.clone(),
                false => given.by_name(),
            };
            if !known.contains(&name) {
                return Err(Error::NotFound(format!(
                    "worker '{given}': no worker of that name has called this coordinator"
                )));
            }
            resolved.push(name);
        }
        let changed = self.scheduler.drain(&resolved, drain)?;
        for name in &changed {
            let what = if drain {
                "worker drained"
            } else {
                "worker undrained"
            };
            tracing::info!(worker = name.as_str(), "{what}");
        }
        Ok((resolved, changed))
    }

    /// Runs the stage work of every job whose stage has all its tasks done and is not yet stepped: those
    /// left so by a restart, or by a store out of reach. Blocking: stitches and stores images.
    pub(crate) fn step_awaiting(&self) {
        for job_id in self.scheduler.jobs_awaiting_step() {
            self.stage_done(&job_id);
        }
    }

    /// Deletes the blobs that no job refers to and that were not written or used within `keep`
    /// ([`gc::TrackedBlobs::collect`]); deletes none while the job store holds writes back (memory may be
    /// ahead of it), and stops once less than half of this coordinator's lease on a shared job store is
    /// left (another may take over soon, with jobs this one has not seen; a deletion under way when it
    /// does may still land).
    pub(crate) fn collect_unused_blobs(&self, keep: Duration) -> std::io::Result<gc::Collected> {
        let scheduler = &self.scheduler;
        let may_delete = || self.may_delete_blobs();
        if !may_delete() {
            return Ok(gc::Collected::default());
        }
        self.blobs
            .collect(keep, || scheduler.images_in_use(), may_delete)
    }

    /// Whether this coordinator may delete blobs: its store is not holding writes back, and it holds a
    /// shared store's leader lease with at least half of it left (a coordinator taken over from, whose
    /// memory no longer has every job, must not).
    fn may_delete_blobs(&self) -> bool {
        !self.scheduler.store_behind()
            && self
                .scheduler
                .store_hold()
                .is_none_or(|h| h.left >= h.lease / 2)
    }

    /// Deletes a task's checkpoint that no job or task refers to any more (replaced by a newer one, or
    /// discarded, or its task done), at once rather than at the next collection, or never when none is
    /// configured ([`gc::TrackedBlobs::delete_unreferenced`]). A failure is logged: a collection can
    /// still take it.
    pub(crate) fn drop_checkpoint_blob(&self, checkpoint: &stylefarm_core::checkpoint::Checkpoint) {
        let deleted = self.blobs.delete_unreferenced(
            &checkpoint.blob,
            checkpoint.bytes,
            |hash| self.scheduler.holds_checkpoint(hash),
            || self.may_delete_blobs(),
        );
        match deleted {
            Ok(true) => tracing::debug!(blob = %checkpoint.blob, "checkpoint deleted"),
            Ok(false) => {}
            Err(e) => tracing::warn!(blob = %checkpoint.blob, error = %e, "deleting a checkpoint"),
        }
    }

    /// Its Prometheus metrics as text ([`metrics`] lists them), for an HTTP scrape.
    pub fn metrics_text(&self) -> String {
        self.metrics.text(self)
    }
}

/// Serves the coordinator on an already-bound listener until `shutdown` resolves: RenderService,
/// WorkerService, grpc.health.v1 (SERVING once the services are up) and server reflection.
pub async fn serve(
    listener: tokio::net::TcpListener,
    coordinator: Arc<Coordinator>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    // reflection v1 and, for older clients (grpcurl before 1.9, Python's grpcio-reflection), v1alpha
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Transport(e.to_string()))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Transport(e.to_string()))?;
    // each service behind its token check (health and reflection stay open: probes and tools)
    // true once the coordinator stops: the calls that wait (WatchJob, LeaseTask) end then
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let render = InterceptedService::new(
        RenderServiceServer::new(service::RenderApi {
            coordinator: coordinator.clone(),
            stopping: stopping.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        coordinator.gate.clients(),
    );
    let worker = InterceptedService::new(
        WorkerServiceServer::new(service::WorkerApi {
            coordinator: coordinator.clone(),
            stopping: stopping.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
        coordinator.gate.workers(),
    );

    // leases expire even when nobody calls; a stage whose step could not be recorded while the store was
    // out of reach is stepped again once it answers, and one whose work found the blob store out of reach
    // every STAGE_RETRY (on a blocking thread of its own: lease expiry does not wait on the blob store)
    let expiry = {
        let coordinator = coordinator.clone();
        tokio::spawn(async move {
            let mut was_behind = false;
            let (mut retry, mut sweep, mut collection) = (Chore::new(), Chore::new(), Chore::new());
            let serving = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                // finished jobs past --keep-finished-secs, deleted now and then
                if let Some(keep) = coordinator.scheduler.config().keep_finished {
                    let every = scheduler::KEEP_FINISHED_SWEEP.min(keep / 2);
                    let coordinator = coordinator.clone();
                    sweep.start(
                        every,
                        || true,
                        move || {
                            let before = scheduler::now_ms()
                                - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
                            let batch = scheduler::KEEP_FINISHED_BATCH;
                            match coordinator.scheduler.delete_finished_before(before, batch) {
                                Ok(ids) if !ids.is_empty() => tracing::info!(
                                    jobs = ids.len(),
                                    keep_secs = keep.as_secs(),
                                    "finished jobs past their keep time deleted"
                                ),
                                Ok(_) => {}
                                Err(e) => tracing::warn!(error = %e, "deleting old finished jobs"),
                            }
                        },
                    );
                }
                // blobs unused past --keep-unused-blobs-secs, collected every half of it, the first time
                // once this coordinator has served that long (an upload before a restart, re-used just
                // before it, is not in its memory)
                if let Some(keep) = coordinator.keep_unused_blobs {
                    let coordinator = coordinator.clone();
                    collection.start(
                        keep / 2,
                        || serving.elapsed() >= keep,
                        move || match coordinator.collect_unused_blobs(keep) {
                            Ok(done) if done.deleted > 0 => tracing::info!(
                                blobs = done.deleted,
                                bytes = done.deleted_bytes,
                                listed = done.listed,
                                keep_secs = keep.as_secs_f64(),
                                "unused blobs deleted"
                            ),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "collecting unused blobs"),
                        },
                    );
                }
                let (deferred, scheduler) = (&coordinator.stage_deferred, &coordinator.scheduler);
                let stepping = coordinator.clone();
                retry.start(
                    STAGE_RETRY,
                    // not while the job store holds writes back: the work would be done to fail again
                    || !scheduler.store_behind() && deferred.swap(false, Ordering::SeqCst),
                    move || stepping.step_awaiting(),
                );
                // expiring writes to the store and waits for the commit: on the blocking pool
                let coordinator = coordinator.clone();
                let step = tokio::task::spawn_blocking(move || {
                    let behind = coordinator.scheduler.store_behind();
                    // the jobs that waited for the store stepped by the retry chore, off this loop (their
                    // stitches take seconds), not here
                    if was_behind && !behind {
                        coordinator.stage_deferred.store(true, Ordering::SeqCst);
                    }
                    let expired = coordinator.scheduler.expire();
                    // a worker whose lease expired counts as gone until it calls again: an exact-mode
                    // scale with more shards than workers left is planned again
                    for (worker, ran_out) in coordinator.scheduler.take_lost() {
                        coordinator.workers.lost(&worker, ran_out);
                    }
                    coordinator.replan_shards();
                    coordinator.replan_out_of_memory();
                    // a job that every live worker is blocklisted for fails instead of waiting forever
                    // (a drained one counts: a job it could run waits for it to be undrained)
                    let live = coordinator.workers.live();
                    if let Err(e) = coordinator.scheduler.fail_stranded(&live) {
                        tracing::error!(error = %e, "failing the jobs no live worker may take");
                    }
                    // a keep-going sweep whose last variant failed (its lease expired, or no worker is
                    // left for it, say)
                    for job_id in coordinator.scheduler.take_stage_due() {
                        coordinator.spawn_stage_work(job_id);
                    }
                    (behind, expired)
                });
                match step.await {
                    Ok((behind, expired)) => {
                        was_behind = behind;
                        if let Err(e) = expired {
                            tracing::error!(error = %e, "expiring leases");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "expiring leases: the task failed"),
                }
            }
        })
    };
    // jobs that end, announced where the operator asked
    let notifying = coordinator.notify.clone().map(|config| {
        tokio::spawn(notify::run(
            coordinator.scheduler.clone(),
            config,
            coordinator.scheduler.metrics().notifications.clone(),
        ))
    });
    health
        .set_serving::<RenderServiceServer<service::RenderApi>>()
        .await;
    health
        .set_serving::<WorkerServiceServer<service::WorkerApi>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    // a coordinator that another has taken over from (a shared store's leader lease lost), or whose
    // scheduler a panic left in doubt, stops serving
    let lost = {
        let scheduler = coordinator.scheduler.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if let Some(why) = stopped(&scheduler) {
                    return why;
                }
            }
        }
    };
    let stop = async move {
        tokio::select! {
            () = shutdown => tracing::info!(
                drain_s = STOP_DRAIN.as_secs_f64(),
                "stopping: no new calls; the open ones may finish meanwhile"
            ),
            why = lost => tracing::error!(reason = %why, "stopping"),
        }
        stopping_tx.send_replace(true);
    };
    // the calls still open STOP_DRAIN after the stop began are not waited for
    let drained = {
        let mut stopping = stopping.clone();
        async move {
            until_stopping(&mut stopping).await;
            tokio::time::sleep(STOP_DRAIN).await;
        }
    };
    let mut server = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
        .trace_fn(rpc_span)
        .layer(tower::util::MapResponseLayer::new(message_limit_status))
        .layer(tower::util::MapResponseLayer::new(shown_status));
    if let Some(tls) = &coordinator.tls {
        // tonic's TLS takes the process's rustls provider
        install_crypto_provider();
        server = server
            .tls_config(tls.clone())
            .map_err(|e| Error::Transport(format!("tls: {e}")))?;
    }
    // a restart's running tasks: their workers may call from now on
    coordinator.scheduler.serving();
    let serving = server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(render)
        .add_service(worker)
        .serve_with_incoming_shutdown(
            connections::incoming(
                listener,
                connections::connection_limit(coordinator.max_connections),
                coordinator.max_connections_per_source,
                coordinator.connection_metrics.clone(),
            ),
            stop,
        );
    let result = tokio::select! {
        served = serving => served.map_err(|e| Error::Transport(e.to_string())),
        () = drained => {
            tracing::warn!(
                drain_s = STOP_DRAIN.as_secs_f64(),
                "stopped with calls still open"
            );
            Ok(())
        }
    };
    expiry.abort();
    if let Some(notifying) = notifying {
        notifying.abort();
    }
    match stopped(&coordinator.scheduler) {
        Some(why) => Err(why),
        None => result,
    }
}

/// Returns once `stopping` (set by [`serve`]) is true, or its sender is gone (the server ended).
pub(crate) async fn until_stopping(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stop| *stop).await;
}

/// Why a coordinator must stop serving: another coordinator took over its store
/// ([`scheduler::Scheduler::store_lost`]), or a panic left its scheduler's state in doubt
/// ([`scheduler::Scheduler::poisoned`]).
fn stopped(scheduler: &scheduler::Scheduler) -> Option<Error> {
    if let Some(why) = scheduler.store_lost() {
        return Some(Error::Store(store::StoreError::new(format!(
            "no longer the active coordinator: {why}"
        ))));
    }
    scheduler.poisoned().map(Error::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error's message is cut and escaped by tonic's own header codec, its code and details (a
    /// retry's RetryInfo) kept; a message shown as it is stays untouched.
    #[test]
    fn an_error_s_message_is_shown_cut_and_escaped_with_its_details_kept() {
        let long = format!("\x1b[2J{}", "x".repeat(2000));
        let status = stylefarm_proto::retry_later(long, BUSY_RETRY_DELAY);
        let shown = shown_status(status.clone().into_http::<()>());
        let got = tonic::Status::from_header_map(shown.headers()).unwrap();
        assert_eq!(got.code(), tonic::Code::Unavailable);
        assert_eq!(got.details(), status.details());
        assert!(
            got.message().starts_with("\\u{1b}[2Jxxx"),
            "{}",
            got.message()
        );
        assert!(
            got.message().ends_with("... (980 more characters)"),
            "{}",
            got.message()
        );
        let plain = tonic::Status::not_found("job j not found").into_http::<()>();
        let kept = shown_status(plain);
        assert_eq!(
            tonic::Status::from_header_map(kept.headers())
                .unwrap()
                .message(),
            "job j not found"
        );
    }

    #[test]
    fn a_store_out_of_reach_is_unavailable_a_full_disk_resource_exhausted_others_internal() {
        use store::StoreErrorKind::*;
        let status = |kind| {
            tonic::Status::from(Error::Store(store::StoreError {
                message: "redis: connection refused".into(),
                kind,
                held_back: false,
            }))
            .code()
        };
        assert_eq!(status(Unavailable), tonic::Code::Unavailable);
        assert_eq!(status(StorageFull), tonic::Code::ResourceExhausted);
        assert_eq!(status(Failed), tonic::Code::Internal);
        assert_eq!(status(Fenced), tonic::Code::Internal);
        // a blob written to a full disk: the OS's own ENOSPC
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"))
            .unwrap_err();
        let status = tonic::Status::from(Error::Io(full));
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("storage full"));
        let other = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert_eq!(
            tonic::Status::from(Error::Io(other)).code(),
            tonic::Code::Internal
        );
    }
}
