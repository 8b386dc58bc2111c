#![doc = include_str!("../README.md")]

mod device;
mod engine_thread;
mod exchange;
pub mod metrics;
pub mod task_log;

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use stylefarm_core::checkpoint::{Checkpoint, CheckpointEvery, CheckpointFile};
use stylefarm_core::ids::{LeaseId, WorkerId};
use stylefarm_core::job::{ImageHash, ScalePart, Task};
use stylefarm_core::progress::TaskProgress;
use stylefarm_core::{imaging, Init};
use stylefarm_engine::render::StyleMatch;
use stylefarm_engine::{Device, EngineOptions, PreviousFrameImages, Progress, RenderJob};
use stylefarm_proto::connect::{AuthChannel, Credentials};
use stylefarm_proto::pb;
use stylefarm_proto::pb::worker_service_client::WorkerServiceClient;
use stylefarm_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES, REPORT_TIMEOUT};
use tonic::Code;
use tracing::Instrument;

use crate::task_log::TaskLog;

pub use device::{cuda_memory_limit, gpu_total_memories, CudaMemoryLimit};
pub use engine_thread::{
    engine_threads_alive, panic_message, renders_running, CheckpointSlot, EngineThread, Live,
    PreviewPng, RenderError, RenderStats, StyleKey, TileCanvas, Unhealthy,
};

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The engine could not be started: loading VGG19 on the device, or warming it up, failed.
    #[error(transparent)]
    Engine(#[from] stylefarm_engine::Error),
    /// The coordinator refused the worker (its token or certificate, its registration), or its address, TLS
    /// options or token are malformed; other failed calls are retried.
    #[error("coordinator {0}")]
    Coordinator(String),
    /// The engine can no longer render (device lost, weights gone when it was reloaded): the worker stops
    /// leasing rather than fail every task it would take.
    #[error("cannot render any more: {0}")]
    EngineLost(engine_thread::Unhealthy),
    /// The engine did not stop a cancelled render within [`WorkerConfig::cancel_grace`]: it hangs, and the
    /// worker leaves so that its supervisor starts it again.
    #[error(
        "the engine did not stop within {} s of its task's cancel: it hangs; leaving",
        .0.as_secs_f64()
    )]
    EngineStuck(Duration),
    /// Told to leave without finishing ([`run`]'s `abandon`): the task at hand, if any, was left unfinished.
    #[error(
        "left without finishing the task at hand, if any (signed off: the coordinator gives its task to \
         another worker; a coordinator that did not answer does so when its lease lapses)"
    )]
    Abandoned,
}

/// [`WorkerConfig::cancel_grace`] unless configured: longer than the longest a render goes without looking
/// at its cancel, which it does at each evaluation and at each block of a large canvas' targets
/// ([`stylefarm_engine::cancel`]): one iteration, or one block's forward pass, of a large tile on a CPU
/// (a 512-px iteration takes 1.9 s on this project's 2-core machine; a 2048-px tile's about 16 times
/// that).
pub const DEFAULT_CANCEL_GRACE: Duration = Duration::from_secs(600);

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// e.g. http://127.0.0.1:7700
    pub coordinator: String,
    /// The worker's token and TLS settings.
    pub credentials: Credentials,
    /// Where the worker counts what it does, for a Prometheus scrape ([`metrics::WorkerMetrics::text`]).
    pub metrics: Arc<metrics::WorkerMetrics>,
    /// Shown in the coordinator's logs and statuses.
    pub name: String,
    /// The device the engine renders on; its name and memory are reported to the coordinator.
    pub device: Device,
    /// The VGG19 weights file (safetensors) the engine loads.
    pub weights: PathBuf,
    /// How long one LeaseTask call waits for work.
    pub lease_wait: Duration,
    /// The device memory to report, in bytes (default: the device's own, `device::total_memory`, divided
    /// among [`WorkerConfig::device_shared_by`]): the coordinator sizes tiled jobs' tiles for it.
    pub device_memory: Option<u64>,
    /// How many workers share the device (those of `stylefarm local` on one CPU or one GPU; at least 1):
    /// without [`WorkerConfig::device_memory`], each reports its share of the device's memory, so that the
    /// tiles planned for them, rendered at once, fit it together.
    pub device_shared_by: u32,
    /// How the engine runs on its device.
    pub engine: EngineOptions,
    /// The worker's tags: jobs that ask for tags go only to workers with all of them (checked by the
    /// coordinator: `stylefarm_core::job::check_tags`).
    pub tags: Vec<String>,
    /// How long the engine may take to stop a render once its task is cancelled (by a client, or by the
    /// coordinator for a lease it took back) before the worker gives up on it and leaves with
    /// [`Error::EngineStuck`]: an engine that ignores a cancel would render nothing more while the worker
    /// still heartbeats ([`DEFAULT_CANCEL_GRACE`]).
    pub cancel_grace: Duration,
}

/// Decoded input images by hash, bounded by their decoded bytes (a batch of large photos must not pile
/// up): the least recently used go first; the image just fetched always stays.
struct ImageCache {
    images: VecDeque<(ImageHash, Arc<RgbImage>)>,
    max_bytes: usize,
    /// Bytes downloaded from the coordinator so far (encoded, as they travelled).
    downloaded: u64,
}

/// How much longer than its wait (`lease_wait`) a request for a task may go unanswered before the worker
/// takes its coordinator for gone and connects again (to a standby, where there is one).
const LEASE_REPLY_MARGIN: Duration = Duration::from_secs(5);

/// Sets a task's cancel flag when dropped: the task's future dropped (its worker's dropped, as
/// `LocalFarm::shutdown` drops them) stops its render at the next iteration rather than leaving the
/// engine thread rendering for no one ([`renders_running`]).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A number for a request for a task (pb::LeaseTaskRequest::request_id), or for the worker process
/// (pb::RegisterWorkerRequest::instance): random, not 0, so that requests of workers that share a name, or
/// of a worker that started again, do not take each other's leases.
fn new_request_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// What [`ImageCache`] holds at most, but for the images a task holds ([`ImageCache::insert`]).
const IMAGE_CACHE_BYTES: usize = 512 << 20;

impl ImageCache {
    fn new(max_bytes: usize) -> ImageCache {
        ImageCache {
            images: VecDeque::new(),
            max_bytes,
            downloaded: 0,
        }
    }

    fn bytes(&self) -> usize {
        self.images.iter().map(|(_, img)| img.as_raw().len()).sum()
    }

    /// A cached image, which becomes the most recently used.
    fn lookup(&mut self, hash: &ImageHash) -> Option<Arc<RgbImage>> {
        let at = self.images.iter().position(|(h, _)| h == hash)?;
        let entry = self.images.remove(at)?;
        let img = entry.1.clone();
        self.images.push_back(entry);
        Some(img)
    }

    /// Caches `img`, leaving out the least recently used images until it fits: not those a task holds
    /// now (a tile's content, style and previous scale stay while it fetches the others; left out, every
    /// tile of a canvas past the budget would download and decode them again), which may keep the cache
    /// over its bytes while that task runs.
    fn insert(&mut self, hash: ImageHash, img: Arc<RgbImage>) {
        let size = img.as_raw().len();
        while self.bytes() + size > self.max_bytes {
            let Some(at) = self
                .images
                .iter()
                .position(|(_, held)| Arc::strong_count(held) == 1)
            else {
                break;
            };
            self.images.remove(at);
        }
        self.images.push_back((hash, img));
    }
}

impl ImageCache {
    /// The image `hash`, from the cache or downloaded from the coordinator and checked against its hash. A
    /// download that fails may succeed later; bytes that do not decode are the input's fault.
    async fn get(
        &mut self,
        client: &mut WorkerServiceClient<AuthChannel>,
        hash: &ImageHash,
    ) -> Result<Arc<RgbImage>, Failure> {
        if let Some(img) = self.lookup(hash) {
            return Ok(img);
        }
        let bytes = (self.download(client, hash, imaging::MAX_ENCODED_BYTES as u64)).await?;
        // decoding a large image takes a while: off the async threads (heartbeats)
        let name = hash.clone();
        let img = tokio::task::spawn_blocking(move || {
            imaging::decode(&bytes, name.as_str()).map_err(|e| Failure::Input(e.to_string()))
        })
        .await
        .map_err(|e| Failure::Transient(format!("decoding {hash}: {e}")))??;
        let img = Arc::new(img);
        self.insert(hash.clone(), img.clone());
        Ok(img)
    }

    /// The blob `hash` downloaded from the coordinator (counted in [`ImageCache::downloaded`]), at most
    /// `max_bytes` of it (the most it can be: a stream past them fails), checked
    /// against its hash. A download that fails may succeed later. One the coordinator answers UNAVAILABLE
    /// (its blob store out of reach: S3 down for a while) is tried again, from the start, after a backoff,
    /// until it succeeds or the task is cancelled (the task's heartbeats keep its lease meanwhile): the
    /// outage costs the task no attempt.
    async fn download(
        &mut self,
        client: &mut WorkerServiceClient<AuthChannel>,
        hash: &ImageHash,
        max_bytes: u64,
    ) -> Result<Vec<u8>, Failure> {
        let mut backoff = stylefarm_proto::Backoff::default();
        let bytes = loop {
            let status = match Self::download_once(client, hash, max_bytes).await {
                Ok(bytes) => break bytes,
                Err(status) => status,
            };
            // answered by the coordinator (not a transport error): it cannot serve the blob now
            if !stylefarm_proto::answered_unavailable(&status) {
                return Err(Failure::Transient(format!(
                    "downloading {hash}: {}",
                    status.message()
                )));
            }
            let wait = backoff.wait_after(&status);
            tracing::warn!(
                error = status.message(),
                image = %hash,
                wait_s = wait.as_secs_f64(),
                "the coordinator cannot serve an input now; downloading it again"
            );
            tokio::time::sleep(wait).await;
        };
        self.downloaded += bytes.len() as u64;
        // hashing a large blob takes a while: off the async threads (heartbeats)
        let expected = hash.clone();
        tokio::task::spawn_blocking(move || {
            if ImageHash::of(&bytes) != expected {
                return Err(Failure::Transient(format!(
                    "downloading {expected}: the bytes do not match their hash"
                )));
            }
            Ok(bytes)
        })
        .await
        .map_err(|e| Failure::Transient(format!("downloading {hash}: {e}")))?
    }

    /// The blob `hash` as the coordinator streams it, once; the status of the call or of the stream when
    /// either fails.
    async fn download_once(
        client: &mut WorkerServiceClient<AuthChannel>,
        hash: &ImageHash,
        max_bytes: u64,
    ) -> Result<Vec<u8>, tonic::Status> {
        let stream = client
            .download_image(pb::DownloadRequest {
                sha256: hash.to_string(),
            })
            .await?
            .into_inner();
        stylefarm_proto::chunks_bytes(stream, max_bytes).await
    }

    /// The checkpoint a task's attempt starts from ([`stylefarm_core::checkpoint`]), of at most
    /// `max_bytes` (the task's: TaskSpec::max_checkpoint_bytes); `None`, with a warning, when it cannot be
    /// had (downloaded, read): the render starts from the beginning.
    async fn checkpoint(
        &mut self,
        client: &mut WorkerServiceClient<AuthChannel>,
        checkpoint: &Checkpoint,
        max_bytes: u64,
    ) -> Option<CheckpointFile> {
        let read = match self.download(client, &checkpoint.blob, max_bytes).await {
            Ok(bytes) => tokio::task::spawn_blocking(move || {
                CheckpointFile::decode(&bytes).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string())),
            Err(failure) => Err(format!("{failure:?}")),
        };
        match read {
            Ok(file) => {
                tracing::info!(
                    scale = file.scale,
                    iteration = file.iteration,
                    "resuming from the task's checkpoint"
                );
                Some(file)
            }
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    checkpoint = %checkpoint.blob,
                    "the task's checkpoint cannot be had: starting from the beginning"
                );
                None
            }
        }
    }

    /// The style images as a render of `content` takes them ([`stylefarm_engine::render::styles_for`]):
    /// matched to the content (luminance-only transfer, colour matching) where asked, computed (O(content +
    /// style pixels)) once per worker and kept here under a key of its own, so a tiled job's tiles do not
    /// each pay for the whole content.
    async fn styles_for(
        &mut self,
        styles: &[(ImageHash, Arc<RgbImage>)],
        (content_hash, content): (&ImageHash, &Arc<RgbImage>),
        params: &stylefarm_core::RenderParams,
    ) -> Result<Vec<Arc<RgbImage>>, Failure> {
        let Some(matched) = StyleMatch::of(params) else {
            return Ok(styles.iter().map(|(_, img)| img.clone()).collect());
        };
        let what = matched.name();
        let mut matched = Vec::with_capacity(styles.len());
        for (hash, style) in styles {
            let key =
                ImageHash::of(format!("{what} of {hash} matched to {content_hash}").as_bytes());
            if let Some(img) = self.lookup(&key) {
                matched.push(img);
                continue;
            }
            let (style, content, params) = (style.clone(), content.clone(), params.clone());
            let img = tokio::task::spawn_blocking(move || {
                let styles = vec![(*style).clone()];
                stylefarm_engine::render::styles_for(styles, &content, &params).remove(0)
            })
            .await
            .map_err(|e| Failure::Transient(format!("matching the style's {what}: {e}")))?;
            let img = Arc::new(img);
            self.insert(key, img.clone());
            matched.push(img);
        }
        Ok(matched)
    }
}

/// Connects to the first of `urls` (comma-separated: an active coordinator and its standbys, which listen
/// only once active) that answers ([`stylefarm_proto::connect::answers`]: a frozen one, whose host still
/// accepts connections, is passed over), trying them in turn and retrying with backoff (up to 5 s between
/// rounds) until one answers (`None` once `stop` is set). An error at once, for the worker to leave with,
/// when a URL, the TLS options or the token are malformed: trying again would not mend them.
async fn connect(
    urls: &str,
    credentials: &Credentials,
    stop: &AtomicBool,
) -> Result<Option<WorkerServiceClient<AuthChannel>>, Error> {
    let mut endpoints = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        match credentials.endpoint(url) {
            Ok(endpoint) => endpoints.push((url, endpoint.connect_timeout(Duration::from_secs(5)))),
            Err(e) => {
                // (the URLs taken are shown as given: a user and password in one is refused here)
                let url = stylefarm_proto::connect::shown_url(url);
                tracing::error!(coordinator = url, error = %e, "bad coordinator url or TLS options");
                return Err(Error::Coordinator(format!(
                    "{url}: a bad url or TLS options: {e}"
                )));
            }
        }
    }
    let bearer = credentials.bearer().map_err(|e| {
        tracing::error!(error = %e, "bad token");
        Error::Coordinator(format!("token: {e}"))
    })?;
    let mut delay = Duration::from_millis(100);
    while !endpoints.is_empty() {
        for (url, endpoint) in &endpoints {
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            match endpoint.connect().await {
                Ok(channel) => {
                    let channel = tonic::service::interceptor::InterceptedService::new(
                        channel,
                        bearer.clone(),
                    );
                    if let Err(why) = stylefarm_proto::connect::answers(channel.clone()).await {
                        tracing::warn!(
                            coordinator = url,
                            error = why,
                            "coordinator does not answer"
                        );
                        refused_certificate(url, credentials, &bearer).await?;
                        continue;
                    }
                    return Ok(Some(
                        WorkerServiceClient::new(channel)
                            .max_decoding_message_size(MAX_MESSAGE_BYTES)
                            .max_encoding_message_size(MAX_MESSAGE_BYTES),
                    ));
                }
                Err(e) => {
                    tracing::warn!(
                        coordinator = url,
                        error = stylefarm_proto::connect::with_sources(&e),
                        "coordinator unreachable; retrying"
                    );
                    refused_certificate(url, credentials, &bearer).await?;
                }
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    tracing::error!("no coordinator url given");
    Err(Error::Coordinator("url: none given".into()))
}

/// Why a task failed, as the coordinator needs to know it: whose fault, and so whether another attempt
/// can succeed.
#[derive(Debug, Clone, PartialEq)]
enum Failure {
    /// The task's input (an image, a parameter) cannot be rendered: every attempt fails the same way.
    Input(String),
    /// This attempt failed (a download, libtorch, a panic caught on the engine thread): another attempt may succeed.
    Transient(String),
    /// The device ran out of memory: another worker may have more.
    OutOfMemory(String),
    /// Another shard of the task's exact-mode scale failed or started again: the shards start again.
    Group(String),
}

/// Names `field` in an input's failure (an image that does not decode: `content: <sha256>: not an image`),
/// leaving other failures as they are.
fn naming(field: &'static str) -> impl Fn(Failure) -> Failure {
    move |failure| match failure {
        Failure::Input(message) => Failure::Input(format!("{field}: {message}")),
        other => other,
    }
}

impl Failure {
    fn of_render(e: &RenderError) -> Failure {
        match e {
            RenderError::Engine(e) if e.is_input_fault() => Failure::Input(e.to_string()),
            RenderError::Engine(e) if e.is_out_of_memory() => Failure::OutOfMemory(e.to_string()),
            RenderError::Engine(e @ stylefarm_engine::Error::Exchange(_)) => {
                Failure::Group(e.to_string())
            }
            other => Failure::Transient(other.to_string()),
        }
    }

    /// The FailTask request of this failure, with the task's last lines (`log`).
    fn request(&self, lease_id: &LeaseId, log: Option<pb::TaskLogLines>) -> pb::FailTaskRequest {
        let (error, kind) = match self {
            Failure::Input(e) => (e, pb::FailureKind::Input),
            Failure::Transient(e) => (e, pb::FailureKind::Transient),
            Failure::OutOfMemory(e) => (e, pb::FailureKind::OutOfMemory),
            Failure::Group(e) => (e, pb::FailureKind::Group),
        };
        pb::FailTaskRequest {
            lease_id: lease_id.to_string(),
            error: error.clone(),
            kind: kind as i32,
            log,
        }
    }
}

/// What became of one task.
enum Outcome {
    Done(RgbImage),
    Failed(Failure),
    Cancelled,
    /// Cancelled, and the engine's render still running [`WorkerConfig::cancel_grace`] later: it hangs.
    EngineStuck,
}

/// Runs a worker until `shutdown` resolves (then drains: the current task finishes first, and is reported),
/// and signs off. Once `abandon` resolves, it leaves at once, [`Error::Abandoned`]: the task at hand is
/// neither finished nor reported, and its sign-off gives its lease up.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    abandon: impl Future<Output = ()>,
) -> Result<(), Error> {
    let mut reporting = Reporting::default();
    let mut signed_in = None;
    tokio::pin!(abandon);
    let mut served = tokio::select! {
        served = serve(config, shutdown, &mut reporting, &mut signed_in) => served,
        () = &mut abandon => Err(Error::Abandoned),
    };
    if !matches!(served, Err(Error::Abandoned)) {
        // a worker that stops (or leaves) has its last task reported first, unless told to abandon it
        tokio::select! {
            () = reporting.finish() => {}
            () = &mut abandon => served = Err(Error::Abandoned),
        }
    }
    if let Some(mut signed_in) = signed_in {
        // what it gives up: its task at hand and its result on its way (when it abandons them), the
        // lease poll it gave up as it stopped
        let leases = signed_in
            .task
            .take()
            .into_iter()
            .chain(reporting.lease().map(LeaseId::from))
            .collect();
        sign_off(&mut signed_in, leases).await;
    }
    served
}

/// A worker's latest registration, and what it holds of the coordinator: what its sign-off names.
struct SignedIn {
    client: WorkerServiceClient<AuthChannel>,
    worker_id: WorkerId,
    /// The lease of the task at hand, until its outcome is reported (or on its way: [`Reporting`]).
    task: Option<LeaseId>,
    /// The request id of a lease poll sent and not answered (0: none).
    poll: u64,
}

/// Fails, saying why, when the coordinator at `url`, which a connection with this worker's certificate
/// (`--tls-cert`) did not reach, answers one without it (its health check, open to every caller) and then
/// fails one with it again at once: it refused the certificate in the TLS handshake, which closes the
/// connection and looks like a network fault to the worker, which would otherwise try again for ever.
/// Nothing without a certificate, when the coordinator does not answer without it either, or when the try
/// with it succeeds or is slow to fail (a busy coordinator, not a refusal: a handshake refused fails within
/// milliseconds).
async fn refused_certificate(
    url: &str,
    credentials: &Credentials,
    bearer: &stylefarm_proto::connect::Bearer,
) -> Result<(), Error> {
    if credentials.tls_identity.is_none() {
        return Ok(());
    }
    let answers = |credentials: Credentials| async move {
        let endpoint = credentials.endpoint(url).map_err(|e| e.to_string())?;
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let channel = tonic::service::interceptor::InterceptedService::new(channel, bearer.clone());
        stylefarm_proto::connect::answers(channel).await
    };
    let without = Credentials {
        tls_identity: None,
        ..credentials.clone()
    };
    if answers(without).await.is_err() {
        return Ok(());
    }
    let again = Instant::now();
    if answers(credentials.clone()).await.is_ok()
        || again.elapsed() > stylefarm_proto::connect::ANSWER_TIMEOUT / 2
    {
        return Ok(());
    }
    let why =
        "refused this worker's certificate (--tls-cert) in the TLS handshake, and answers without \
               one: is it signed by the coordinator's --tls-client-ca, and still valid?";
    tracing::error!(coordinator = url, "{why}");
    Err(Error::Coordinator(format!("{url}: {why}")))
}

/// How long a worker that leaves waits for its sign-off's answer.
const SIGN_OFF_TIMEOUT: Duration = Duration::from_secs(2);

/// Tells the coordinator that the worker leaves the farm (SignOff), so that it is not counted live for the
/// minute it would take to notice, giving up `leases` and its lease poll left unanswered (their tasks go
/// back to the queue at once); unanswered in [`SIGN_OFF_TIMEOUT`], or refused (an older coordinator does
/// not have the call), it leaves all the same.
async fn sign_off(signed_in: &mut SignedIn, leases: Vec<LeaseId>) {
    let request = pb::SignOffRequest {
        worker_id: signed_in.worker_id.to_string(),
        lease_ids: leases.into_iter().map(String::from).collect(),
        lease_request_id: signed_in.poll,
    };
    let worker_id = signed_in.worker_id.as_str();
    match tokio::time::timeout(SIGN_OFF_TIMEOUT, signed_in.client.sign_off(request)).await {
        Ok(Ok(_)) => tracing::info!(worker_id, "signed off"),
        Ok(Err(s)) => tracing::debug!(error = s.message(), "signing off"),
        Err(_) => tracing::debug!("signing off: no answer"),
    }
}

/// [`run`], each task reported through `reporting` while the next is leased and rendered; `signed_in`:
/// the worker's latest registration and what it holds, to sign off with.
async fn serve(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reporting: &mut Reporting,
    signed_in: &mut Option<SignedIn>,
) -> Result<(), Error> {
    // loading VGG19 and warming it up take seconds, probing the device's memory may too: off the async
    // threads (a local farm's coordinator shares them)
    // on a CPU, --device-memory bounds each render (on a GPU the allocator's cap does)
    let options = EngineOptions {
        cpu_memory_bytes: config.device_memory,
        ..config.engine
    };
    let (weights, device) = (config.weights.clone(), config.device);
    let engine = tokio::task::spawn_blocking(move || EngineThread::start(weights, device, options))
        .await
        .unwrap_or_else(|e| match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => Err(stylefarm_engine::Error::Device(format!(
                "starting the engine: {e}"
            ))),
        })?;
    config.metrics.set_device(config.device);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_on_signal = stop.clone();
    // the same, for a wait for a task to end at once (its call dropped)
    let (stopping, mut stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!(
            "shutting down: taking no new task, and finishing the one under way if any (the command: \
             interrupt again not to wait)"
        );
        stop_on_signal.store(true, Ordering::Relaxed);
        let _ = stopping.send(true);
    });
    let mut cache = ImageCache::new(IMAGE_CACHE_BYTES);
    let memory_used = device::MemorySampler::start(config.device);
    let memory_bytes = match config.device_memory {
        Some(bytes) => bytes,
        None => tokio::task::spawn_blocking(move || device::total_memory(device))
            .await
            .ok()
            .flatten()
            .map_or(0, |total| total / u64::from(config.device_shared_by.max(1))),
    };
    // said at registration, and with every lease poll (a coordinator that restarted knows them at once)
    let device_name = format!("{:?}", config.device).to_lowercase();
    // the number of the request for a task, kept until one is answered (pb::LeaseTaskRequest::request_id)
    let mut lease_request = new_request_id();
    // this process' number, the same at each registration (pb::RegisterWorkerRequest::instance): the
    // coordinator tells another worker given this name from this one registering again
    let instance = new_request_id();
    'connect: while !stop.load(Ordering::Relaxed) {
        let Some(mut client) = connect(&config.coordinator, &config.credentials, &stop).await?
        else {
            break;
        };
        let registered = client
            .register_worker(pb::RegisterWorkerRequest {
                name: config.name.clone(),
                device: device_name.clone(),
                memory_bytes,
                version: env!("CARGO_PKG_VERSION").into(),
                tags: config.tags.clone(),
                protocol: stylefarm_proto::PROTOCOL,
                instance,
            })
            .await;
        let registered = match registered {
            Ok(r) => r.into_inner(),
            // a refused token or certificate, a coordinator newer than this worker's render protocol, or a
            // registration it refuses (an empty or overlong name) will be refused again: leave, saying why
            Err(s)
                if matches!(
                    s.code(),
                    Code::Unauthenticated
                        | Code::PermissionDenied
                        | Code::FailedPrecondition
                        | Code::InvalidArgument
                ) =>
            {
                tracing::error!(error = s.message(), "the coordinator refused this worker");
                return Err(Error::Coordinator(format!(
                    "refused the worker: {}",
                    s.message()
                )));
            }
            Err(s) => {
                tracing::warn!(error = s.message(), "registration failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let worker_id = WorkerId::new(registered.worker_id);
        let heartbeat = Duration::from_millis(u64::from(registered.heartbeat_interval_ms.max(100)));
        let lease = Duration::from_millis(u64::from(registered.lease_ms));
        // previews as often as the coordinator asks, at most one a heartbeat (0: none)
        let preview_every = (registered.preview_interval_ms > 0).then(|| {
            Duration::from_millis(u64::from(registered.preview_interval_ms)).max(heartbeat)
        });
        tracing::info!(worker_id = worker_id.as_str(), memory_bytes, "registered");
        let signed = signed_in.insert(SignedIn {
            client: client.clone(),
            worker_id: worker_id.clone(),
            task: None,
            poll: 0,
        });
        // the waits between leases the coordinator answered it cannot make now
        let mut unavailable = stylefarm_proto::Backoff::default();
        while !stop.load(Ordering::Relaxed) {
            if let Some(why) = engine.lost() {
                tracing::error!(reason = %why, "the engine cannot render: leaving the farm");
                return Err(Error::EngineLost(why));
            }
            let wait_ms = config.lease_wait.as_millis() as u32;
            signed.poll = lease_request;
            let leased = client.lease_task(pb::LeaseTaskRequest {
                worker_id: worker_id.to_string(),
                wait_ms,
                memory_used_bytes: memory_used.bytes(),
                tags: config.tags.clone(),
                protocol: stylefarm_proto::PROTOCOL,
                request_id: lease_request,
                device: device_name.clone(),
                memory_bytes,
                reporting_lease_id: reporting.lease().map(String::from).unwrap_or_default(),
            });
            // the coordinator answers once it has a task or the wait is over: no answer well after that,
            // and it is gone (the keepalive would notice too, later)
            let leased = tokio::select! {
                leased = tokio::time::timeout(config.lease_wait + LEASE_REPLY_MARGIN, leased) => leased,
                // told to stop while it waits for a task: it takes none (the call is dropped)
                _ = stopped.wait_for(|stop| *stop) => break 'connect,
            };
            // fault injection (tests): a lease's answer lost on its way, as a broken connection loses it
            #[cfg(feature = "failpoints")]
            let leased = match leased {
                Ok(Ok(r))
                    if r.get_ref().task.is_some()
                        && fail::eval("worker-lease-reply-lost", |_| ()).is_some() =>
                {
                    Ok(Err(tonic::Status::unavailable(
                        "the answer was lost (injected)",
                    )))
                }
                other => other,
            };
            // told to stop as the call failed (a local farm stops its coordinator with its workers):
            // not a failure to say
            if *stopped.borrow() && !matches!(leased, Ok(Ok(_))) {
                break 'connect;
            }
            let leased = match leased {
                Ok(Ok(r)) => {
                    // answered: the next request is another (an unanswered one is sent again as
                    // the same, so that a lease handed out for it is handed again)
                    lease_request = new_request_id();
                    signed.poll = 0;
                    unavailable = stylefarm_proto::Backoff::default();
                    r.into_inner()
                }
                // the coordinator answered that it cannot lease now (its store out of reach, or busy):
                // asked again on this registration, less and less often, rather than registering
                // again every half second (each registration a worker id, live for a minute)
                Ok(Err(s)) if stylefarm_proto::answered_unavailable(&s) => {
                    let wait = unavailable.wait_after(&s);
                    tracing::warn!(
                        error = s.message(),
                        wait_s = wait.as_secs_f64(),
                        "the coordinator cannot lease now; asking again"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Ok(Err(s)) => {
                    tracing::warn!(error = s.message(), "lease failed; reconnecting");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'connect;
                }
                Err(_) => {
                    tracing::warn!(
                        wait_s = config.lease_wait.as_secs_f64(),
                        "the coordinator did not answer a lease; reconnecting"
                    );
                    continue 'connect;
                }
            };
            let Some(task) = leased.task else { continue };
            let lease_id = LeaseId::new(leased.lease_id);
            signed.task = Some(lease_id.clone());
            let span = tracing::info_span!(
                task_log::TASK_SPAN,
                job_id = task.job_id,
                task_id = task.index,
                worker_id = worker_id.as_str()
            );
            let log = TaskLog::of(&span);
            async {
                tracing::info!(label = task.label, "rendering");
                let leased_at = Instant::now();
                // one heartbeat for the whole task: preparation, render and report
                let cancel = Arc::new(AtomicBool::new(false));
                // a worker dropped mid-task (its farm stopped) stops its render too
                let cancel_on_drop = CancelOnDrop(cancel.clone());
                let (progress_tx, progress_rx) = tokio::sync::watch::channel(None);
                let (preview_tx, preview_rx) = tokio::sync::watch::channel(None);
                let checkpoint = Arc::new(CheckpointSlot::default());
                let lease_clock = LeaseClock::start(lease);
                // both set: the task fails naming checkpoint_secs when it is read (run_task)
                let checkpoints =
                    CheckpointEvery::of(task.checkpoint_every, task.checkpoint_secs).unwrap_or_default();
                let saving = (!checkpoints.is_never()).then(|| {
                    CheckpointUploader::start(client.clone(), lease_id.clone(), checkpoint.clone())
                });
                let beating = Heartbeat::start(
                    client.clone(),
                    worker_id.clone(),
                    lease_id.clone(),
                    heartbeat,
                    Carried {
                        progress: progress_rx,
                        preview: preview_rx,
                        memory_used: memory_used.clone(),
                        log: log.clone(),
                        leaving: stop.clone(),
                    },
                    lease_clock.clone(),
                    cancel.clone(),
                );
                let live = Live {
                    progress: progress_tx,
                    preview: preview_tx,
                    preview_every,
                    checkpoint,
                    checkpoints,
                };
                let downloaded_before = cache.downloaded;
                let outcome = run_task(
                    &engine,
                    &mut client,
                    &mut cache,
                    Leased {
                        lease_id: &lease_id,
                        task,
                    },
                    cancel,
                    live,
                    &config,
                )
                .await;
                if let Outcome::EngineStuck = outcome {
                    tracing::error!(
                        grace_s = config.cancel_grace.as_secs_f64(),
                        "the engine did not stop its cancelled render: leaving, for a supervisor to \
                         start the worker again"
                    );
                    return Err(Error::EngineStuck(config.cancel_grace));
                }
                let downloaded = cache.downloaded - downloaded_before;
                let outcome_name = match &outcome {
                    Outcome::Done(_) => "succeeded",
                    Outcome::Failed(_) => "failed",
                    Outcome::Cancelled | Outcome::EngineStuck => "cancelled",
                };
                // the task is over: a checkpoint still on its way is of no more use
                drop(saving);
                // a result is reported while the worker leases and renders the next task (under this
                // task's heartbeat, which keeps its lease until then); a failure before it leases again,
                // so that the coordinator counts it (a strike, an out-of-memory mark) first
                let background = matches!(outcome, Outcome::Done(_));
                let metrics = config.metrics.clone();
                let mut client = client.clone();
                // a report that hangs must not keep the lease alive forever: given up REPORT_TIMEOUT after
                // the render's end (the wait for the report before it included), as the coordinator
                // allows a rendered task, and its lease left to lapse
                let give_up = tokio::time::Instant::now() + REPORT_TIMEOUT;
                let reporting_lease = lease_id.clone();
                let reported = async move {
                    // the render is over: the task's cancel no longer matters (its heartbeat still says
                    // when the coordinator cancels it)
                    drop(cancel_on_drop);
                    if tokio::time::timeout_at(
                        give_up,
                        report(&mut client, &lease_id, outcome, log.as_ref(), &lease_clock),
                    )
                    .await
                    .is_err()
                    {
                        tracing::warn!(
                            "reporting timed out; the lease will lapse and the task run again"
                        );
                    }
                    drop(beating);
                    // lease to reported, to set against the engine's time ("rendered" above); the
                    // bytes this task downloaded (inputs not cached yet)
                    let task_s = leased_at.elapsed().as_secs_f64();
                    metrics.task(outcome_name, task_s, downloaded);
                    tracing::info!(task_s, downloaded, "task over");
                };
                if background {
                    reporting
                        .start(reporting_lease, reported.in_current_span())
                        .await;
                } else {
                    reporting.finish().await;
                    reported.await;
                }
                // its outcome reported, or on its way (the lease then Reporting's)
                signed.task = None;
                Ok::<(), Error>(())
            }
            .instrument(span)
            .await?;
        }
    }
    Ok(())
}

/// The report of a task rendered (its result encoded and uploaded), on its way while the worker leases,
/// fetches and renders the next task: the device does not wait for the network between tasks. One at a
/// time: the next report starts once this one has ended. Dropped (the worker's future dropped, as
/// `LocalFarm::shutdown` drops it, even while it waits for the report), it stops, and the task's lease
/// lapses.
#[derive(Default)]
struct Reporting(Option<(LeaseId, tokio::task::JoinHandle<()>)>);

impl Reporting {
    /// Waits for the report on its way, if any.
    async fn finish(&mut self) {
        if let Some((_, reporting)) = &mut self.0 {
            // awaited in place: a drop meanwhile aborts it (Drop), rather than leave it running
            if let Err(e) = reporting.await {
                tracing::error!(error = %e, "reporting a task failed");
            }
            self.0 = None;
        }
    }

    /// Sends `report` of the task of lease `lease_id` in the background, once the report before it has
    /// ended.
    async fn start(
        &mut self,
        lease_id: LeaseId,
        report: impl Future<Output = ()> + Send + 'static,
    ) {
        self.finish().await;
        self.0 = Some((lease_id, tokio::spawn(report)));
    }

    /// The lease of the task whose result is on its way, until it has been sent (or given up): what a
    /// lease poll says (pb::LeaseTaskRequest::reporting_lease_id).
    fn lease(&self) -> Option<&str> {
        self.0
            .as_ref()
            .filter(|(_, reporting)| !reporting.is_finished())
            .map(|(lease_id, _)| lease_id.as_str())
    }
}

impl Drop for Reporting {
    fn drop(&mut self) {
        if let Some((_, reporting)) = &self.0 {
            reporting.abort();
        }
    }
}

/// Resolves once `cancel` has been set for `grace` (looked at every second): a render still running then
/// ignores its cancel.
async fn cancel_ignored(cancel: &AtomicBool, grace: Duration) {
    while !cancel.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(grace).await;
}

/// What a task's heartbeats carry besides the lease.
struct Carried {
    /// The render's latest progress.
    progress: tokio::sync::watch::Receiver<Option<Progress>>,
    /// Its latest preview: each sent once.
    preview: tokio::sync::watch::Receiver<Option<PreviewPng>>,
    /// The device memory in use.
    memory_used: device::MemorySampler,
    /// The task's lines not sent yet.
    log: Option<TaskLog>,
    /// Set once the worker is told to stop (its first SIGTERM or Ctrl-C): each beat says it is leaving,
    /// so that the coordinator plans nothing more for it while it finishes this task.
    leaving: Arc<AtomicBool>,
}

/// A task's lease as its worker knows it: when it was last renewed (leased, or a heartbeat answered) and
/// how long a lease lasts (the coordinator's `--lease-secs`, from the registration).
#[derive(Clone)]
struct LeaseClock {
    renewed: Arc<std::sync::Mutex<Instant>>,
    lease: Duration,
}

impl LeaseClock {
    /// The clock of a lease taken now.
    fn start(lease: Duration) -> LeaseClock {
        LeaseClock {
            renewed: Arc::new(std::sync::Mutex::new(Instant::now())),
            lease,
        }
    }

    fn renew(&self) {
        *self.renewed.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn since_renewed(&self) -> Duration {
        self.renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Whether the lease may still be held: renewed less than a lease ago. Past that, a coordinator that
    /// is still there has taken it back.
    fn may_be_held(&self) -> bool {
        self.since_renewed() < self.lease
    }
}

/// Renews a task's lease every `interval` from the moment it is leased until the task is over (dropped),
/// carrying the render's latest progress, its preview when a new one came and the task's lines logged since
/// the last beat ([`Carried`]), and notes each renewal on `lease_clock`; when the coordinator answers
/// that the task is cancelled, or no beat has been answered for two leases, sets `cancel`, which the
/// preparation checks and the engine honours at its next iteration.
struct Heartbeat(tokio::task::JoinHandle<()>);

impl Heartbeat {
    fn start(
        mut client: WorkerServiceClient<AuthChannel>,
        worker_id: WorkerId,
        lease_id: LeaseId,
        interval: Duration,
        Carried {
            mut progress,
            mut preview,
            memory_used,
            log,
            leaving,
        }: Carried,
        lease_clock: LeaseClock,
        cancel: Arc<AtomicBool>,
    ) -> Heartbeat {
        Heartbeat(tokio::spawn(
            async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    let sending = log.as_ref().and_then(TaskLog::take_for_beat);
                    // a slow network under a beat with lines: the task's report must wait for them
                    #[cfg(feature = "failpoints")]
                    if let (Some(_), Some(Some(ms))) = (
                        &sending,
                        fail::eval("worker-heartbeat-lines", |ms| {
                            ms.and_then(|m| m.parse().ok())
                        }),
                    ) {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let beat = pb::HeartbeatRequest {
                        log: sending.as_ref().map(|s| s.lines.clone().into()),
                        worker_id: worker_id.to_string(),
                        lease_id: lease_id.to_string(),
                        progress: progress
                            .borrow_and_update()
                            .as_ref()
                            .map(|p| (&TaskProgress::from(p)).into()),
                        memory_used_bytes: memory_used.bytes(),
                        leaving: leaving.load(Ordering::Relaxed),
                        // a preview once: the next heartbeats carry none until another comes
                        preview_png: match preview.has_changed() {
                            Ok(true) => preview
                                .borrow_and_update()
                                .as_ref()
                                .map_or_else(Vec::new, |png| png.to_vec()),
                            _ => Vec::new(),
                        },
                    };
                    // a beat that hangs must not hold up the next ones
                    let sent = tokio::time::timeout(interval, client.heartbeat(beat)).await;
                    if !matches!(sent, Ok(Ok(_))) {
                        // its lines go with the next beat, or the report
                        if let Some(sending) = sending {
                            sending.not_sent();
                        }
                    }
                    // a lease being cancelled is renewed too, until its worker reports; an unknown or
                    // expired one answers no deadline
                    if matches!(&sent, Ok(Ok(r)) if r.get_ref().lease_deadline_ms > 0) {
                        lease_clock.renew();
                    }
                    match sent {
                        Ok(Ok(r)) if r.get_ref().cancel => {
                            if !cancel.swap(true, Ordering::Relaxed) {
                                tracing::info!("cancelled by the coordinator");
                            }
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(s)) => tracing::warn!(error = s.message(), "heartbeat failed"),
                        Err(_) => tracing::warn!("heartbeat timed out"),
                    }
                    // no beat answered in time for two leases (one answered late, by a slow coordinator,
                    // renews nothing here): a coordinator still there has taken the task back (it runs
                    // again elsewhere), and one that is gone (a standby took over) does not know the
                    // lease: the render is of no more use
                    if lease_clock.since_renewed() > 2 * lease_clock.lease
                        && !cancel.swap(true, Ordering::Relaxed)
                    {
                        tracing::warn!(
                            lease_s = lease_clock.lease.as_secs_f64(),
                            "no heartbeat answered for two leases: stopping the render"
                        );
                    }
                }
            }
            .in_current_span(),
        ))
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends a task's checkpoints to the coordinator (WorkerService.SaveCheckpoint) as the render saves them,
/// encoded here (off the engine thread and the async threads), one at a time, the latest first: one saved
/// while another is on its way replaces any that waited. A checkpoint that is refused or cannot be sent is
/// logged and left out: the render goes on. Dropping it stops the sending.
struct CheckpointUploader(tokio::task::JoinHandle<()>);

impl CheckpointUploader {
    fn start(
        mut client: WorkerServiceClient<AuthChannel>,
        lease_id: LeaseId,
        saved: Arc<CheckpointSlot>,
    ) -> CheckpointUploader {
        CheckpointUploader(tokio::spawn(
            async move {
                loop {
                    let checkpoint = saved.take().await;
                    let (scale, iteration) = (checkpoint.scale, checkpoint.iteration);
                    let encoded = tokio::task::spawn_blocking(move || checkpoint.encode())
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    let bytes = match encoded {
                        Ok(bytes) => Arc::new(bytes),
                        Err(e) => {
                            tracing::warn!(scale, iteration, error = %e, "checkpoint left out");
                            continue;
                        }
                    };
                    use pb::save_checkpoint_request::Part;
                    let head = [
                        Part::LeaseId(lease_id.to_string()),
                        Part::SizeBytes(bytes.len() as u64),
                    ];
                    // each chunk copied as it is sent, not all at once
                    let chunks = (0..bytes.len().div_ceil(CHUNK_BYTES)).map({
                        let bytes = bytes.clone();
                        move |i| {
                            let end = (i * CHUNK_BYTES + CHUNK_BYTES).min(bytes.len());
                            Part::Data(bytes[i * CHUNK_BYTES..end].to_vec())
                        }
                    });
                    let parts = head
                        .into_iter()
                        .chain(chunks)
                        .map(|part| pb::SaveCheckpointRequest { part: Some(part) });
                    match client.save_checkpoint(tokio_stream::iter(parts)).await {
                        Ok(r) if r.get_ref().accepted => {
                            tracing::info!(scale, iteration, "checkpoint saved")
                        }
                        Ok(_) => tracing::warn!(
                            scale,
                            iteration,
                            "checkpoint discarded: the lease ended, or the task is not checkpointed"
                        ),
                        Err(s) => tracing::warn!(
                            scale,
                            iteration,
                            error = s.message(),
                            "checkpoint not saved"
                        ),
                    }
                }
            }
            .in_current_span(),
        ))
    }
}

impl Drop for CheckpointUploader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A task as leased: the lease it is held under, and the task.
struct Leased<'a> {
    lease_id: &'a LeaseId,
    task: pb::Task,
}

/// Fetches the inputs, prepares a tile, renders on the engine thread, and says what became of it. The
/// caller's [`Heartbeat`] keeps the lease and may set `cancel`; the render's progress and previews go to
/// `live`.
async fn run_task(
    engine: &EngineThread,
    client: &mut WorkerServiceClient<AuthChannel>,
    cache: &mut ImageCache,
    Leased { lease_id, task }: Leased<'_>,
    cancel: Arc<AtomicBool>,
    live: Live,
    config: &WorkerConfig,
) -> Outcome {
    let metrics = &config.metrics;
    let permanent = |error: String| Outcome::Failed(Failure::Input(error));
    let progress_rx = live.progress.subscribe();
    let cancelled = || cancel.load(Ordering::Relaxed);
    // the task decoded and checked once: a malformed one fails alone, naming its field
    let Task {
        spec: task, resume, ..
    } = match Task::try_from(task) {
        Ok(t) => t,
        Err(e) => return permanent(e.to_string()),
    };
    // tests: the tasks whose label holds the fail point's argument fail as if their input could not be
    // rendered, e.g. FAILPOINTS='task-input=return(photo x)' for the content photo.jpg of a batch (a count,
    // `1*return(...)`, is spent by the first task, whatever its label)
    #[cfg(feature = "failpoints")]
    if let Some(Some(bad)) = fail::eval("task-input", |bad| bad.filter(|b| task.label.contains(b)))
    {
        return permanent(format!("content: {bad} cannot be rendered (injected)"));
    }
    let (preparing, downloaded_before) = (Instant::now(), cache.downloaded);
    // the downloads, until a cancel (a stream that stalls would otherwise hold the task; the heartbeat
    // hears the cancel)
    let fetched = async {
        let content = (cache.get(client, &task.content).await).map_err(naming("content"))?;
        let (mut inputs, mut style_pixels) = (Vec::new(), 0u64);
        for hash in &task.styles {
            let style = (cache.get(client, hash).await).map_err(naming("styles"))?;
            // each held whole until the render ends: bounded as they come, not once they all are
            // (the coordinator checks a job's styles at its submit; this is for a task it did not)
            let (w, h) = style.dimensions();
            style_pixels = style_pixels.saturating_add(u64::from(w) * u64::from(h));
            stylefarm_core::params::check_style_pixels(style_pixels)
                .map_err(|e| Failure::Input(e.to_string()))?;
            inputs.push((hash.clone(), style));
        }
        let styles = cache
            .styles_for(&inputs, (&task.content, &content), &task.params)
            .await?;
        // an earlier attempt's checkpoint, to start from
        let resume = match &resume {
            Some(checkpoint) => {
                let max_bytes = task.max_checkpoint_bytes();
                cache.checkpoint(client, checkpoint, max_bytes).await
            }
            None => None,
        };
        let (init_hash, init_image) = match &task.params.init {
            Init::Image(hash) => (
                Some(hash.clone()),
                Some((cache.get(client, hash).await).map_err(naming("init"))?),
            ),
            _ => (None, None),
        };
        // a video frame's previous frame: its content and result, for the temporal loss
        let previous = match task.previous_frame() {
            Some(p) => Some([
                cache.get(client, &p.content).await?,
                cache.get(client, &p.result).await?,
            ]),
            None => None,
        };
        Ok::<_, Failure>((content, styles, resume, init_hash, init_image, previous))
    };
    let until_cancelled = async {
        while !cancelled() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (content, styles, resume, init_hash, init_image, previous) = tokio::select! {
        fetched = fetched => match fetched {
            Ok(fetched) => fetched,
            Err(failure) => return Outcome::Failed(failure),
        },
        () = until_cancelled => return Outcome::Cancelled,
    };
    if cancelled() {
        return Outcome::Cancelled;
    }
    let mut style = StyleKey {
        styles: task.styles.clone(),
        block: None,
        tile_canvas: None,
        matched_to: StyleMatch::of(&task.params).map(|_| task.content.clone()),
    };
    // copying the images into the job (a large content: tens of ms) and resampling a tile are CPU work:
    // off the async threads
    let scale = task.scale.clone();
    // a shard of an exact-mode scale adds up its evaluations with the others through the coordinator
    let exchange = scale
        .as_ref()
        .filter(|t| matches!(t.part, ScalePart::Shard { .. }))
        .map(|_| {
            let remote = exchange::RemoteExchange::new(
                tokio::runtime::Handle::current(),
                client.clone(),
                lease_id.clone(),
                cancel.clone(),
            );
            Arc::new(std::sync::Mutex::new(remote)) as stylefarm_engine::shard::SharedExchange
        });
    let prepare = tokio::task::spawn_blocking({
        let init = init_image.clone();
        move || {
            let styles: Vec<RgbImage> = styles.iter().map(|i| (**i).clone()).collect();
            match &scale {
                None => Ok((
                    RenderJob {
                        previous: previous.map(|p| PreviousFrameImages {
                            content: (*p[0]).clone(),
                            result: (*p[1]).clone(),
                        }),
                        ..RenderJob::with_styles(
                            (*content).clone(),
                            styles,
                            init.map(|i| (*i).clone()),
                            task.params,
                        )
                    },
                    None,
                )),
                Some(t) => stylefarm_engine::tile::tile_job(
                    &content,
                    styles,
                    init.as_deref(),
                    task.params,
                    t,
                    exchange,
                )
                .map(|r| (r.job, Some((r.target_block, r.canvas)))),
            }
        }
    })
    .await;
    let (job, tile) = match prepare {
        Ok(Ok(prepared)) => prepared,
        Ok(Err(e)) => return permanent(e.to_string()),
        Err(e) => return Outcome::Failed(Failure::Transient(format!("preparing the task: {e}"))),
    };
    tracing::info!(
        prepare_s = preparing.elapsed().as_secs_f64(),
        downloaded = cache.downloaded - downloaded_before,
        "inputs ready"
    );
    if let (Some(t), Some((target_block, canvas))) = (&task.scale, tile) {
        style.block = Some(target_block);
        match t.part {
            ScalePart::Whole { block } => {
                tracing::info!(block, "exact: the whole canvas, in blocks")
            }
            ScalePart::Shard {
                block,
                index,
                shards,
                ..
            } => tracing::info!(
                block,
                index,
                shards,
                "exact: a shard of the canvas, in blocks"
            ),
            ScalePart::Tile { .. } => {}
        }
        // the canvas' Gram matrices: computed (and the canvas resampled) once per worker and scale
        if let Some((width, height)) = canvas {
            style.tile_canvas = init_hash
                .zip(init_image)
                .map(|(init, previous)| TileCanvas {
                    init,
                    previous,
                    width,
                    height,
                });
        }
    }
    if cancelled() {
        return Outcome::Cancelled;
    }
    // the cancel's grace runs while the engine renders (preparation and downloads look at the cancel
    // themselves)
    let done = tokio::select! {
        done = engine.render(job, style, resume, cancel.clone(), live) => done,
        () = cancel_ignored(&cancel, config.cancel_grace) => return Outcome::EngineStuck,
    };
    match done {
        Ok(Ok((img, stats))) => {
            let last = *progress_rx.borrow();
            let (style, total) = last.map_or((0.0, 0.0), |p| (p.losses.style, p.losses.total));
            metrics.rendered(stats.engine_s, stats.evaluations, stats.idle_s);
            tracing::info!(
                engine_s = stats.engine_s,
                engine_idle_s = stats.idle_s,
                style_cached = stats.style_cached,
                style_loss = style,
                total_loss = total,
                "rendered"
            );
            Outcome::Done(img)
        }
        Ok(Err(RenderError::Engine(stylefarm_engine::Error::Cancelled))) => Outcome::Cancelled,
        // a cancelled job's shards find their exchange ended
        Ok(Err(RenderError::Engine(stylefarm_engine::Error::Exchange(_)))) if cancelled() => {
            Outcome::Cancelled
        }
        Ok(Err(e)) => Outcome::Failed(Failure::of_render(&e)),
        Err(_) => Outcome::Failed(Failure::Transient("the engine thread stopped".into())),
    }
}

/// Sends the outcome to the coordinator, again while it may take it later (it is away, busy, or cannot
/// write it yet: [`tries_after`]) after the delay it asks for or with backoff, up to 5 s
/// ([`stylefarm_proto::Backoff`]), as long as the lease may be held (`lease_clock`: the heartbeat keeps
/// renewing it, as a coordinator whose store is out of reach does); the caller bounds the whole report by
/// `REPORT_TIMEOUT`. The task's lines not sent yet (`log`) go with it, once those of a heartbeat on its
/// way have come ([`TaskLog::last_turn`]), and with a result, the engine's warnings ([`TaskLog::warnings`]).
async fn report(
    client: &mut WorkerServiceClient<AuthChannel>,
    lease_id: &LeaseId,
    outcome: Outcome,
    log: Option<&TaskLog>,
    lease_clock: &LeaseClock,
) {
    // a result encoded once, off the async threads (a large one takes seconds)
    let report = match outcome {
        Outcome::Done(img) => {
            let encoded = tokio::task::spawn_blocking(move || {
                let mut png = Vec::new();
                img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
                    .map(|()| png)
                    .map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            match encoded {
                Ok(png) => Ok(png),
                Err(e) => {
                    tracing::error!(error = %e, "encoding the result");
                    return;
                }
            }
        }
        Outcome::Failed(failure) => {
            tracing::warn!(?failure, "task failed");
            Err(failure)
        }
        Outcome::Cancelled | Outcome::EngineStuck => Err(Failure::Transient("cancelled".into())),
    };
    // the lines not sent yet, with those logged (or put back by a heartbeat that failed) before each send;
    // the coordinator keeps them once it takes the outcome. Once a heartbeat's lines have come: the
    // outcome ends the lease, and lines that come after it are dropped
    let _turn = match log {
        Some(log) => Some(log.last_turn().await),
        None => None,
    };
    let mut unsent = stylefarm_core::task_log::SentLines::default();
    let mut attempt = 0u32;
    let mut backoff = stylefarm_proto::Backoff::default();
    loop {
        if let Some(log) = log {
            unsent.append(log.take());
        }
        let lines = (!unsent.is_empty()).then(|| pb::TaskLogLines::from(unsent.clone()));
        let sent = match &report {
            Ok(png) => {
                // the size declared first: the coordinator sets it aside before any data comes
                let mut parts = vec![
                    pb::CompleteTaskRequest {
                        part: Some(pb::complete_task_request::Part::LeaseId(
                            lease_id.to_string(),
                        )),
                    },
                    pb::CompleteTaskRequest {
                        part: Some(pb::complete_task_request::Part::SizeBytes(png.len() as u64)),
                    },
                ];
                parts.extend(lines.clone().map(|l| pb::CompleteTaskRequest {
                    part: Some(pb::complete_task_request::Part::Log(l)),
                }));
                // what the engine warned of while it rendered the result
                let warnings = log.map(TaskLog::warnings).unwrap_or_default();
                if !warnings.is_empty() {
                    parts.push(pb::CompleteTaskRequest {
                        part: Some(pb::complete_task_request::Part::Warnings(
                            pb::TaskWarnings { warnings },
                        )),
                    });
                }
                parts.extend(png.chunks(CHUNK_BYTES).map(|c| pb::CompleteTaskRequest {
                    part: Some(pb::complete_task_request::Part::Data(c.to_vec())),
                }));
                client
                    .complete_task(tokio_stream::iter(parts))
                    .await
                    .map(|r| {
                        if !r.get_ref().accepted {
                            tracing::warn!(
                                "result discarded: the lease had expired or the job was cancelled"
                            );
                        } else {
                            tracing::info!(bytes = png.len(), "result uploaded");
                        }
                    })
            }
            // a small call: one unanswered for a lease (a frozen coordinator, whose connection stays
            // open) is given up, to be sent again while the lease may be held
            Err(failure) => tokio::time::timeout(
                lease_clock.lease,
                client.fail_task(failure.request(lease_id, lines.clone())),
            )
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer within a lease")))
            .map(|_| ()),
        };
        match sent {
            Ok(()) => return,
            Err(s) => {
                if !lease_clock.may_be_held() {
                    tracing::warn!(
                        error = s.message(),
                        since_s = lease_clock.since_renewed().as_secs_f64(),
                        "reporting failed, and the lease has not been renewed for a whole lease: it has \
                         lapsed, and the task will run again"
                    );
                    return;
                }
                if let Some(wait) = backoff.wait_for(&s) {
                    tracing::info!(
                        error = s.message(),
                        "the coordinator is busy; sending again"
                    );
                    tokio::time::sleep(wait).await;
                    continue;
                }
                match tries_after(&s) {
                    0 => {
                        tracing::error!(
                            error = s.message(),
                            code = ?s.code(),
                            "the coordinator refused the task's outcome (the task runs again)"
                        );
                        return;
                    }
                    tries if attempt >= tries => {
                        tracing::error!(
                            error = s.message(),
                            code = ?s.code(),
                            attempt,
                            "reporting to the coordinator keeps failing; the lease will lapse"
                        );
                        return;
                    }
                    _ => {}
                }
                tracing::warn!(
                    error = s.message(),
                    attempt,
                    "reporting to the coordinator failed; retrying"
                );
                tokio::time::sleep(backoff.next_wait()).await;
                attempt += 1;
            }
        }
    }
}

/// How many times a report that failed with `status` is sent again: for as long as the lease may be held
/// when the coordinator says it may take it later (UNAVAILABLE: out of reach, busy, its store out of
/// reach; RESOURCE_EXHAUSTED: its disk full); [`REPORT_FEW_TRIES`] times when the failure may pass or
/// may repeat every time (INTERNAL, a stream reset: UNKNOWN, a deadline); not at all when the
/// coordinator refused this outcome (an invalid field, a token it does not accept).
fn tries_after(status: &tonic::Status) -> u32 {
    match status.code() {
        Code::Unavailable | Code::ResourceExhausted => u32::MAX,
        Code::Unknown
        | Code::Internal
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Cancelled => REPORT_FEW_TRIES,
        _ => 0,
    }
}

/// Tries of a report that failed in a way that may repeat every time ([`tries_after`]).
const REPORT_FEW_TRIES: u32 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_cache_keeps_to_its_bytes_least_recently_used_out_first() {
        // 100 x 100 RGB: 30,000 bytes each; room for three
        let mut cache = ImageCache::new(90_000);
        let img = |v: u8| Arc::new(RgbImage::from_pixel(100, 100, image::Rgb([v, v, v])));
        for v in 0..5u8 {
            cache.insert(ImageHash::of(&[v]), img(v));
            assert!(cache.bytes() <= 90_000);
        }
        let kept = |cache: &ImageCache| -> Vec<u8> {
            cache.images.iter().map(|(_, i)| i.as_raw()[0]).collect()
        };
        assert_eq!(kept(&cache), [2, 3, 4]);
        // a hit makes an image the last to go
        assert!(cache.lookup(&ImageHash::of(&[2])).is_some());
        assert!(cache.lookup(&ImageHash::of(&[0])).is_none());
        cache.insert(ImageHash::of(&[5]), img(5));
        assert_eq!(kept(&cache), [4, 2, 5]);
        // one image larger than the budget still stays, alone
        cache.insert(ImageHash::of(b"big"), Arc::new(RgbImage::new(200, 200)));
        assert_eq!(cache.images.len(), 1);
        // images a task holds stay, past the budget: the next tile finds its inputs
        let mut cache = ImageCache::new(90_000);
        let (content, previous) = (img(1), img(2));
        cache.insert(ImageHash::of(&[1]), content.clone());
        cache.insert(ImageHash::of(&[2]), previous.clone());
        cache.insert(ImageHash::of(&[3]), img(3));
        cache.insert(ImageHash::of(&[4]), img(4));
        assert_eq!(kept(&cache), [1, 2, 4], "3, held by no one, went");
        drop((content, previous));
        cache.insert(ImageHash::of(&[5]), img(5));
        assert_eq!(kept(&cache), [2, 4, 5]);
    }

    #[tokio::test]
    async fn matched_styles_are_computed_once_per_content() {
        let mut cache = ImageCache::new(1 << 20);
        let image = |k: u32| {
            Arc::new(RgbImage::from_fn(16, 12, |x, y| {
                image::Rgb([(x * k) as u8, (y * 2 * k) as u8, ((x + y) * k) as u8])
            }))
        };
        let (content, other, style) = (image(9), image(3), image(5));
        let (content_hash, other_hash) = (ImageHash::of(b"content"), ImageHash::of(b"other"));
        let styles = [(ImageHash::of(b"style"), style.clone())];
        let params = stylefarm_core::RenderParams {
            luminance_only: true,
            ..Default::default()
        };
        let first = cache
            .styles_for(&styles, (&content_hash, &content), &params)
            .await
            .unwrap();
        assert_eq!(*first[0], imaging::matched_luminance(&style, &content));
        assert_ne!(
            *first[0],
            imaging::luminance(&style),
            "matched, not the style's own"
        );
        // the next task of the same content takes the same image, not a new match
        let again = cache
            .styles_for(&styles, (&content_hash, &content), &params)
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&first[0], &again[0]));
        // another content: its own match
        let for_other = cache
            .styles_for(&styles, (&other_hash, &other), &params)
            .await
            .unwrap();
        assert_eq!(*for_other[0], imaging::matched_luminance(&style, &other));
        assert_ne!(*for_other[0], *first[0]);
        // without luminance-only: the style itself
        let plain = cache
            .styles_for(&styles, (&content_hash, &content), &Default::default())
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&plain[0], &style));
        // colour matching: the style with the content's colours, kept apart from its luminance match
        let colours = stylefarm_core::RenderParams {
            match_colors: true,
            ..Default::default()
        };
        let matched = cache
            .styles_for(&styles, (&content_hash, &content), &colours)
            .await
            .unwrap();
        assert_eq!(*matched[0], imaging::matched_colors(&style, &content));
        assert_ne!(*matched[0], *first[0]);
        let again = cache
            .styles_for(&styles, (&content_hash, &content), &colours)
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&matched[0], &again[0]));
    }
}
