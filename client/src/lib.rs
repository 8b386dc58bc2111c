#![doc = include_str!("../README.md")]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use stylefarm_core::checkpoint::CheckpointEvery;
pub use stylefarm_core::ids::JobId;
use stylefarm_core::job::{image_names_of, ImageHash, JobKind, JobSpec};
use stylefarm_core::{imaging, Init, RenderParams};
use stylefarm_proto::compat::{self, DescriptorPool};
use stylefarm_proto::connect::AuthChannel;
pub use stylefarm_proto::connect::Credentials;
use stylefarm_proto::pb;
use stylefarm_proto::pb::render_service_client::RenderServiceClient;
use stylefarm_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
use tokio_stream::{Stream, StreamExt};
use unicode_properties::{GeneralCategoryGroup, UnicodeGeneralCategory};

#[cfg(feature = "local")]
mod local;
#[cfg(feature = "local")]
pub use local::{LocalFarm, LocalFarmError, RENDER_STOP_WAIT};

/// How long [`FarmClient::connect`] waits for the coordinator's TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an upload that the coordinator asks to be sent again is sent again ([`FarmClient::upload`]),
/// and a submit it cannot take now (its store out of reach) ([`FarmClient::submit`]).
pub const UPLOAD_RETRY_FOR: Duration = Duration::from_secs(120);

/// What can go wrong talking to a coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL is not one tonic can connect to.
    #[error("coordinator url '{url}': {message}")]
    Url {
        /// The URL as given.
        url: String,
        /// Why it is not a URI.
        message: String,
    },
    /// Nothing answered at the URL within [`CONNECT_TIMEOUT`].
    #[error("cannot reach the coordinator at {url}")]
    Connect {
        /// The URL as given.
        url: String,
        /// The transport's error.
        source: tonic::transport::Error,
    },
    /// Something accepted the connection, but no coordinator answered on it
    /// ([`stylefarm_proto::connect::answers`]: a frozen coordinator's host still accepts connections).
    #[error("the coordinator at {url} does not answer: {message}")]
    NoAnswer {
        /// The URL as given.
        url: String,
        /// No answer in time, or the transport's error.
        message: String,
    },
    /// The coordinator answered with an error status; its message names the field or job. Shown as the
    /// message and the code, then the transport's cause where there is one (not tonic's `Display`,
    /// which says the message twice).
    #[error("{}", status_text(.0))]
    Status(tonic::Status),
    /// A local file could not be read or written.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An input image or parameter is unusable (decoding, an unknown output format, a bad value).
    #[error(transparent)]
    Domain(#[from] stylefarm_core::Error),
    /// A downloaded file's bytes do not hash to the name it was asked by.
    #[error("downloading {0}: the bytes do not match their hash")]
    Corrupt(ImageHash),
    /// The coordinator is older than this client: it does not know these fields of the request
    /// (`Message.field (number)`), and would drop them without an error: rendering the job without them, or
    /// cancelling (or running again) the whole job where some of its tasks were named.
    #[error(
        "the coordinator does not know {}: it is older than this client and would act as if they were not \
         set; upgrade the coordinator, or leave those options out",
        .0.join(", ")
    )]
    Unsupported(Vec<String>),
    /// The coordinator's descriptors could not be read (`.1` says why), and the request (`.0`) is one that
    /// an older coordinator would take for another: cancelling some tasks of a job, say, for a cancel of
    /// the whole job. Nothing was sent.
    #[error(
        "{0}: refused, as the coordinator's fields could not be read to check that it knows them ({1}); \
         an older coordinator would take it for a call on the whole job"
    )]
    Unchecked(String, String),
    /// A job ended, or a stream stopped, without what the call needs.
    #[error("job {job_id}: {message}")]
    Job {
        /// The job.
        job_id: JobId,
        /// What is missing, with the job's state.
        message: String,
    },
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        ClientError::Status(status)
    }
}

/// A status as [`ClientError::Status`] shows it: `message (Code)`, and for the transport's own failures
/// (a refused connection, a broken stream) `: cause` after. Not tonic's `Display`, which says the message
/// twice, once as the code's description (`code: 'Some requested entity was not found', message: ...`).
fn status_text(status: &tonic::Status) -> String {
    let mut text = format!("{} ({:?})", status.message(), status.code());
    for said in causes(status).map(|e| e.to_string()) {
        // tonic's transport errors carry their cause's text as their message too
        if said != status.message() {
            text.push_str(&format!(": {said}"));
        }
    }
    text
}

/// The result of a [`FarmClient`] call.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// The statuses of one job, from [`FarmClient::watch`]: one now, one on every change, ending with the job.
pub type StatusStream = Pin<Box<dyn Stream<Item = Result<pb::JobStatus>> + Send>>;

/// A job's statuses with the previews that came with each ([`FarmClient::watch_events`]).
pub type EventStream =
    Pin<Box<dyn Stream<Item = Result<(pb::JobStatus, Vec<pb::TaskPreview>)>> + Send>>;

/// A proto enum value's name without its prefix, lowercased: `JOB_STATE_SUCCEEDED` -> `succeeded`.
fn short_name(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

/// Whether a job in `state` has ended: succeeded, failed or cancelled.
pub fn job_ended(state: pb::JobState) -> bool {
    use pb::JobState::{Cancelled, Failed, Succeeded};
    matches!(state, Succeeded | Failed | Cancelled)
}

/// A job's state name as the CLI prints it: `queued`, `running`, `succeeded`, `failed`, `cancelled` (empty
/// for a value this build does not know).
pub fn job_state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| short_name(s.as_str_name(), "JOB_STATE_"))
        .unwrap_or_default()
}

/// A task's state name: `queued`, `leased`, `running`, `succeeded`, `failed`, `cancelled` (empty for a value
/// this build does not know).
pub fn task_state_name(state: i32) -> String {
    pb::TaskState::try_from(state)
        .map(|s| short_name(s.as_str_name(), "TASK_STATE_"))
        .unwrap_or_default()
}

/// A job whose images are local files: [`FarmClient::submit_files`] uploads each once and submits the
/// [`JobSpec`] that names them by hash.
#[derive(Debug, Clone)]
pub struct JobFiles {
    /// The job's kind with its parameters: a batch renders every content with every style; a sweep has its
    /// axes, a tiled job its tiling.
    pub kind: JobKind,
    /// Content images; several only for a batch.
    pub contents: Vec<PathBuf>,
    /// Style images.
    pub styles: Vec<PathBuf>,
    /// The render's parameters; an [`Init::File`] names a local file, uploaded too (an [`Init::Image`] one
    /// uploaded before).
    pub params: RenderParams,
    /// Higher runs first.
    pub priority: i32,
    /// Attempts per task before the job fails (at most [`stylefarm_core::job::MAX_ATTEMPTS`]); 0: the
    /// coordinator's default.
    pub max_attempts: u32,
    /// Only workers with all these tags take the job's tasks; none: any worker.
    pub worker_tags: Vec<String>,
    /// A batch's or sweep's task that fails for good fails alone, the others render
    /// ([`JobSpec::keep_going`]).
    pub keep_going: bool,
    /// The most of the job's tasks that run at once ([`JobSpec::max_workers`]); 0: no limit.
    pub max_workers: u32,
    /// Jobs that must succeed before this one starts ([`JobSpec::after`]).
    pub after: Vec<JobId>,
    /// When its tasks save checkpoints ([`JobSpec::checkpoints`]: every so many iterations of each scale,
    /// or every so many seconds).
    pub checkpoints: CheckpointEvery,
    /// The job's name, for people ([`JobSpec::name`]); empty: none.
    pub name: String,
    /// Idempotency key: submitting twice with it gives the same job.
    pub request_id: Option<String>,
    /// Submitted paused ([`FarmClient::pause`]): nothing of it runs until it is resumed.
    pub paused: bool,
}

impl JobFiles {
    /// A job of `kind` over these files with `params`, and the rest as the coordinator's defaults: priority
    /// 0, its attempts, any worker, no limit, after no job, no checkpoints, no name nor request id, not
    /// paused.
    pub fn new(
        kind: JobKind,
        contents: Vec<PathBuf>,
        styles: Vec<PathBuf>,
        params: RenderParams,
    ) -> JobFiles {
        // the scheduling options' defaults are the job spec's ([`JobSpec::new`])
        let JobSpec {
            priority,
            max_attempts,
            worker_tags,
            keep_going,
            max_workers,
            after,
            name,
            ..
        } = JobSpec::new(
            kind.clone(),
            Vec::new(),
            Vec::new(),
            RenderParams::default(),
        );
        JobFiles {
            kind,
            contents,
            styles,
            params,
            priority,
            max_attempts,
            worker_tags,
            keep_going,
            max_workers,
            after,
            checkpoints: CheckpointEvery::Never,
            name,
            request_id: None,
            paused: false,
        }
    }

    /// The job's local image files, in order: its contents, its styles and its init image
    /// ([`Init::File`]); a file given twice comes twice.
    pub fn inputs(&self) -> impl Iterator<Item = &Path> {
        self.contents
            .iter()
            .chain(&self.styles)
            .map(PathBuf::as_path)
            .chain(self.params.init.file())
    }
}

impl ClientError {
    /// Whether the call failed because the coordinator went away or could not be reached (it stopped,
    /// restarted, or its standby is taking over): the same call may succeed once connected again
    /// ([`FarmClient::reconnect`]). Not for an error status of the coordinator's own.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::NoAnswer { .. } => true,
            // the transport's failures (a refused or closed connection, a broken stream mid-response:
            // UNKNOWN "h2 protocol error") carry their cause; a status the coordinator sent has none
            ClientError::Status(s) => {
                s.code() == tonic::Code::Unavailable || std::error::Error::source(s).is_some()
            }
            _ => false,
        }
    }
}

/// A connection to a coordinator. Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct FarmClient {
    channel: AuthChannel,
    rpc: RenderServiceClient<AuthChannel>,
    /// The coordinator's descriptors as its server reflection last answered ([`Descriptors`]), kept once
    /// the answer is definite; shared by the clones.
    coordinator_descriptors: Arc<std::sync::Mutex<Option<Descriptors>>>,
    /// What it connected with, to connect again ([`FarmClient::reconnect`]): the URL or URLs as given.
    urls: String,
    credentials: Credentials,
    /// The images this client uploaded since it connected ([`FarmClient::uploaded`]).
    uploaded: u64,
    /// The content images the last [`FarmClient::submit_files`] of a keep-going batch left out
    /// ([`FarmClient::left_out`]).
    left_out: Vec<(PathBuf, String)>,
    /// The images this client downloaded since it connected ([`FarmClient::downloaded`]).
    downloaded: u64,
    /// Whether the last submit made a job ([`FarmClient::created`]).
    created: bool,
}

impl FarmClient {
    /// Connects to the coordinator at `url` (e.g. `http://127.0.0.1:7700`), or to the first that answers
    /// of several URLs separated by commas (an active coordinator and its standbys, which listen only once
    /// active); the error is the last one's. A coordinator answers when its health check does, within
    /// [`ANSWER_TIMEOUT`](stylefarm_proto::connect::ANSWER_TIMEOUT).
    pub async fn connect(url: &str) -> Result<FarmClient> {
        Self::connect_with(url, &Credentials::default()).await
    }

    /// [`FarmClient::connect`] presenting `credentials`: a token on every call, TLS for `https://` URLs.
    pub async fn connect_with(url: &str, credentials: &Credentials) -> Result<FarmClient> {
        let mut last = None;
        for one in url.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            match Self::connect_one(one, credentials).await {
                Ok(mut client) => {
                    client.urls = url.into();
                    return Ok(client);
                }
                Err(e @ ClientError::Url { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Url {
            url: url.into(),
            message: "no URL given".into(),
        }))
    }

    async fn connect_one(url: &str, credentials: &Credentials) -> Result<FarmClient> {
        // the one error whose URL may hold a user or password: endpoint() refuses those
        let bad = |e: stylefarm_proto::connect::CredentialsError| ClientError::Url {
            url: stylefarm_proto::connect::shown_url(url),
            message: e.to_string(),
        };
        let channel = credentials
            .endpoint(url)
            .map_err(bad)?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.into(),
                source,
            })?;
        let channel = credentials.authorize(channel).map_err(bad)?;
        stylefarm_proto::connect::answers(channel.clone())
            .await
            .map_err(|message| ClientError::NoAnswer {
                url: url.into(),
                message,
            })?;
        Ok(FarmClient {
            channel: channel.clone(),
            rpc: RenderServiceClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            coordinator_descriptors: Arc::default(),
            urls: url.into(),
            credentials: credentials.clone(),
            uploaded: 0,
            downloaded: 0,
            left_out: Vec::new(),
            created: false,
        })
    }

    /// The images this client has downloaded since it connected (a [`FarmClient::fetch`] skips the PNG
    /// files that hold their result already).
    pub fn downloaded(&self) -> u64 {
        self.downloaded
    }

    /// The content images that the last [`FarmClient::submit_files`] of a keep-going batch
    /// ([`JobFiles::keep_going`]) left out, each with why (a file that cannot be read or decoded, or is
    /// too small for VGG19 at the job's sizes): the job renders the others, and holds them
    /// ([`JobSpec::left_out`]).
    pub fn left_out(&self) -> &[(PathBuf, String)] {
        &self.left_out
    }

    /// The images this client has uploaded since it connected (those the coordinator held already,
    /// [`FarmClient::find_images`], are not sent again by [`FarmClient::submit_files`]).
    pub fn uploaded(&self) -> u64 {
        self.uploaded
    }

    /// Whether the last submit made a new job: false when the coordinator held one of the request id
    /// given already (pb::SubmitJobResponse::created), whose id it answered: that job, with the options it
    /// was submitted with then.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Connects again as [`FarmClient::connect_with`] did, to the first of its URLs that answers (a
    /// coordinator started again, or a standby that took over): for a caller whose calls failed because
    /// the coordinator went away ([`ClientError::is_connection_lost`]).
    pub async fn reconnect(&mut self) -> Result<()> {
        *self = Self::connect_with(&self.urls, &self.credentials).await?;
        Ok(())
    }

    /// The generated gRPC client on the same connection, for requests this API does not build: the tests
    /// send malformed ones through it. It has tonic's default message limits, not this client's
    /// ([`MAX_MESSAGE_BYTES`] each way), so that what a server does with an oversized message can be seen.
    pub fn rpc(&self) -> RenderServiceClient<AuthChannel> {
        RenderServiceClient::new(self.channel.clone())
    }

    /// Uploads an encoded image in [`CHUNK_BYTES`] chunks, declaring its sha256 (the coordinator checks
    /// it) and its size (which the coordinator sets aside before any data comes) first; returns the hash.
    /// The image is decoded here first, so a broken file fails before any byte is sent, with `name` in
    /// the error. An upload that the coordinator asks to be sent again (busy
    /// receiving others: UNAVAILABLE with a `RetryInfo`) is, after the delay it asks for or longer
    /// ([`Backoff`](stylefarm_proto::Backoff)), for up to [`UPLOAD_RETRY_FOR`].
    pub async fn upload(&mut self, bytes: &[u8], name: &str) -> Result<ImageHash> {
        let hash = off_async(|| -> Result<ImageHash> {
            imaging::decode(bytes, name)?;
            Ok(ImageHash::of(bytes))
        })?;
        self.upload_decoded(bytes, hash).await
    }

    /// [`FarmClient::upload`] of bytes already decoded here, whose sha256 is `hash`.
    async fn upload_decoded(&mut self, bytes: &[u8], hash: ImageHash) -> Result<ImageHash> {
        let (start, mut busy) = (
            std::time::Instant::now(),
            stylefarm_proto::Backoff::default(),
        );
        loop {
            let mut parts = vec![
                pb::UploadImageRequest {
                    part: Some(pb::upload_image_request::Part::ExpectedSha256(
                        hash.to_string(),
                    )),
                },
                pb::UploadImageRequest {
                    part: Some(pb::upload_image_request::Part::SizeBytes(bytes.len() as u64)),
                },
            ];
            parts.extend(bytes.chunks(CHUNK_BYTES).map(|c| pb::UploadImageRequest {
                part: Some(pb::upload_image_request::Part::Data(c.to_vec())),
            }));
            match self.rpc.upload_image(tokio_stream::iter(parts)).await {
                Err(s) if start.elapsed() < UPLOAD_RETRY_FOR => {
                    let Some(wait) = busy.wait_for(&s) else {
                        return Err(s.into());
                    };
                    tokio::time::sleep(wait).await;
                }
                sent => {
                    sent?;
                    self.uploaded += 1;
                    break;
                }
            }
        }
        Ok(hash)
    }

    /// The images of `hashes` that the coordinator holds already (FindImages), which a job may name
    /// without an upload; none from a coordinator that does not have the call (it is newer than some).
    /// [`FarmClient::submit_files`] takes an error here for none held: the call only spares uploads.
    pub async fn find_images(&mut self, hashes: &[ImageHash]) -> Result<HashSet<ImageHash>> {
        let mut held = HashSet::new();
        for chunk in hashes.chunks(stylefarm_proto::MAX_FIND_IMAGES) {
            let request = pb::FindImagesRequest {
                sha256: chunk.iter().map(ImageHash::to_string).collect(),
            };
            match self.rpc.find_images(request).await {
                // only what was asked: anything else is not taken for an upload
                Ok(reply) => {
                    let asked: HashSet<&ImageHash> = chunk.iter().collect();
                    held.extend(
                        reply
                            .into_inner()
                            .held
                            .iter()
                            .filter_map(|h| h.parse::<ImageHash>().ok())
                            .filter(|h| asked.contains(h)),
                    )
                }
                Err(s) if s.code() == tonic::Code::Unimplemented => return Ok(HashSet::new()),
                Err(s) => return Err(s.into()),
            }
        }
        Ok(held)
    }

    /// Uploads an image file; see [`FarmClient::upload`].
    pub async fn upload_file(&mut self, path: &Path) -> Result<ImageHash> {
        let bytes = off_async(|| read_file(path))?;
        self.upload(&bytes, &path.display().to_string()).await
    }

    /// Submits a job whose images are uploaded; returns its id. The spec is checked here as the coordinator
    /// will check it, so a bad one fails naming its field without a round trip.
    pub async fn submit(&mut self, spec: &JobSpec, request_id: Option<&str>) -> Result<JobId> {
        spec.check_new()?;
        self.send(spec, request_id, false).await
    }

    /// The SubmitJob call of a checked spec. One the coordinator answers UNAVAILABLE (its store out of
    /// reach: a Redis restarting) is sent again, after a backoff, for up to [`UPLOAD_RETRY_FOR`], under the
    /// same request id (a random one when none is given), so that the coordinator makes one job of it
    /// however many times it comes.
    async fn send(
        &mut self,
        spec: &JobSpec,
        request_id: Option<&str>,
        paused: bool,
    ) -> Result<JobId> {
        let generated;
        let request_id = match request_id {
            Some(id) => id,
            None => {
                generated = format!("auto-{:032x}", rand::random::<u128>());
                &generated
            }
        };
        let request = submit_request(spec, Some(request_id), paused);
        self.check_known(SUBMIT, &request).await?;
        let (start, mut backoff) = (
            std::time::Instant::now(),
            stylefarm_proto::Backoff::default(),
        );
        loop {
            let status = match self.rpc.submit_job(request.clone()).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    self.created = reply.created;
                    return Ok(JobId::new(reply.job_id));
                }
                Err(status) => status,
            };
            // answered by the coordinator (not a transport error), which cannot write the job now
            if !stylefarm_proto::answered_unavailable(&status)
                || start.elapsed() >= UPLOAD_RETRY_FOR
            {
                return Err(status.into());
            }
            let wait = backoff.wait_after(&status);
            tracing::warn!(
                error = status.message(),
                wait_s = wait.as_secs_f64(),
                "the coordinator cannot take the job now; sending it again"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// Refuses a request (a submit, message `name`) that sets fields the coordinator does not know
    /// ([`compat::unknown_to`]) to other than their defaults: one older than this client would drop them
    /// without an error and render the job without them (a new render option, say), or cancel a whole job
    /// where a client named some of its tasks. The coordinator's descriptors are read by gRPC server
    /// reflection, within [`REFLECTION_TIMEOUT`], and kept once it answers definitely; a refusal reads them
    /// again first (the coordinator may have been upgraded since). A coordinator that does not answer with
    /// them is not checked (logged).
    async fn check_known(&self, name: &str, request: &impl Message) -> Result<()> {
        self.check_known_or(name, request, None).await
    }

    /// [`FarmClient::check_known`]; when the coordinator's fields cannot be read and `what` is given,
    /// refused ([`ClientError::Unchecked`], naming `what`): for a request that an older coordinator would
    /// not merely do less of but do otherwise (cancel a whole job for some of its tasks).
    async fn check_known_or(
        &self,
        name: &str,
        request: &impl Message,
        what: Option<&str>,
    ) -> Result<()> {
        let kept = self.coordinator_descriptors.lock().unwrap().clone();
        let unknown = match kept {
            Some(descriptors) => match descriptors.unknown(name, request) {
                // read them again: what was kept may be of the coordinator before an upgrade
                Ok(unknown) if !unknown.is_empty() => {
                    self.read_descriptors().await.unknown(name, request)
                }
                unknown => unknown,
            },
            None => self.read_descriptors().await.unknown(name, request),
        };
        match (unknown, what) {
            (Ok(unknown), _) if !unknown.is_empty() => Err(ClientError::Unsupported(unknown)),
            (Err(why), Some(what)) => Err(ClientError::Unchecked(what.to_string(), why)),
            (Err(why), None) => {
                tracing::warn!(
                    reason = why.as_str(),
                    "the request's fields not checked against the coordinator's"
                );
                Ok(())
            }
            (Ok(_), _) => Ok(()),
        }
    }

    /// A cancel or retry (`request`, message `name`) of some of a job's tasks: checked as
    /// [`FarmClient::check_known_or`] refuses what an older coordinator would do otherwise (`what` says what
    /// the call is, for the error). None named: the whole job's, which every coordinator knows (no check).
    async fn check_tasks_known(
        &self,
        name: &str,
        request: &impl Message,
        tasks: &[u32],
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        if tasks.is_empty() {
            return Ok(());
        }
        self.check_known_or(name, request, Some(&what())).await
    }

    /// The coordinator's descriptors read now, kept when the answer is definite.
    async fn read_descriptors(&self) -> Descriptors {
        let read = coordinator_descriptors(self.channel.clone()).await;
        if !matches!(read, Descriptors::Unread(_)) {
            *self.coordinator_descriptors.lock().unwrap() = Some(read.clone());
        }
        read
    }

    /// Uploads a job's images (each file once) and submits it; returns its id. The job is checked as
    /// the coordinator will check it before any byte is sent: the files are hashed first.
    pub async fn submit_files(&mut self, job: &JobFiles) -> Result<JobId> {
        let init = job.params.init.file();
        // before any file is read: a folder of 50,000 photos is refused at once
        stylefarm_core::job::check_image_counts(job.contents.len(), job.styles.len())?;
        // a keep-going batch leaves out a content image that cannot be read or decoded, or that is too
        // small for VGG19 at the job's sizes, and renders the others (make's -k): each decoded as it is
        // read, not again at its upload; another batch is refused naming every such image, not the
        // first alone (a folder's three bad photos fixed in one go, not in three submits)
        let check_contents = matches!(job.kind, JobKind::Batch);
        // a photo that is also a style or the init is every task's input: not left out, but checked as
        // the job's
        let others: HashSet<&Path> = (job.styles.iter().map(PathBuf::as_path))
            .chain(job.params.init.file())
            .collect();
        let contents: HashSet<&Path> = (job.contents.iter().map(PathBuf::as_path))
            .filter(|p| !others.contains(p))
            .collect();
        self.left_out.clear();
        let mut decoded: HashSet<ImageHash> = HashSet::new();
        // each file read once, in order; the files to upload, one of each bytes
        let mut files: Vec<(&Path, ImageHash)> = Vec::new();
        let mut hashes: HashMap<&Path, ImageHash> = HashMap::new();
        for path in job.inputs() {
            if hashes.contains_key(path) || self.left_out.iter().any(|(p, _)| p == path) {
                continue;
            }
            let hash = if check_contents && contents.contains(path) {
                let checked = off_async(|| -> Result<ImageHash> {
                    let bytes = read_file(path)?;
                    let name = path.display().to_string();
                    let size = imaging::decode(&bytes, &name)?.dimensions();
                    let content = stylefarm_core::params::ImageSize::new(&name, size);
                    job.params.check_sizes(content, &[], None)?;
                    Ok(ImageHash::of(&bytes))
                });
                match checked {
                    Ok(hash) => {
                        decoded.insert(hash.clone());
                        hash
                    }
                    Err(e) => {
                        self.left_out.push((
                            path.to_path_buf(),
                            stylefarm_proto::connect::with_sources(&e),
                        ));
                        continue;
                    }
                }
            } else {
                off_async(|| read_file(path).map(|bytes| ImageHash::of(&bytes)))?
            };
            hashes.insert(path, hash.clone());
            if !files.iter().any(|(_, h)| *h == hash) {
                files.push((path, hash));
            }
        }
        if !job.keep_going && !self.left_out.is_empty() {
            let left_out = std::mem::take(&mut self.left_out);
            let count = left_out.len();
            const SAID: usize = 10;
            let each: Vec<String> = left_out.into_iter().take(SAID).map(|(_, e)| e).collect();
            let more = match count.saturating_sub(SAID) {
                0 => String::new(),
                more => format!("; and {more} more"),
            };
            return Err(stylefarm_core::Error::invalid(
                "contents",
                format!(
                    "{count} content image(s) cannot be rendered (--keep-going leaves them out and \
                     renders the others): {}{more}",
                    each.join("; ")
                ),
            )
            .into());
        }
        let contents: Vec<&Path> = job
            .contents
            .iter()
            .map(PathBuf::as_path)
            .filter(|p| hashes.contains_key(p))
            .collect();
        if contents.is_empty() && !job.contents.is_empty() {
            // (each error names its file)
            let (_, error) = &self.left_out[0];
            return Err(stylefarm_core::Error::invalid(
                "contents",
                format!(
                    "every content image was left out ({} of them), the first: {error}",
                    self.left_out.len(),
                ),
            )
            .into());
        }
        let hash_of = |path: &Path| hashes[path].clone();
        let mut params = job.params.clone();
        if let Some(path) = init {
            params.init = Init::Image(hash_of(path));
        }
        let (checkpoint_every, checkpoint_secs) = job.checkpoints.fields();
        let spec = JobSpec {
            kind: job.kind.clone(),
            contents: contents.iter().map(|p| hash_of(p)).collect(),
            styles: job.styles.iter().map(|p| hash_of(p)).collect(),
            params,
            priority: job.priority,
            max_attempts: job.max_attempts,
            worker_tags: job.worker_tags.clone(),
            keep_going: job.keep_going,
            max_workers: job.max_workers,
            after: job.after.clone(),
            checkpoint_every,
            checkpoint_secs,
            content_names: Vec::new(),
            style_names: Vec::new(),
            name: job.name.clone(),
            // said with the job: its status, its watch, the status page
            left_out: (self.left_out.iter())
                .map(|(_, why)| stylefarm_core::job::left_out_entry(why))
                .collect(),
        };
        // for people: a batch's labels and result files (the other kinds' labels do not use them)
        let mut spec = match spec.kind {
            JobKind::Batch => JobSpec {
                content_names: image_names_of(&contents),
                style_names: image_names_of(
                    &job.styles.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
                ),
                ..spec
            },
            _ => spec,
        };
        spec.check_new()?;
        // before any byte is sent: a coordinator that would drop an option is told of no upload either
        let (request_id, paused) = (job.request_id.as_deref(), job.paused);
        match self
            .check_known(SUBMIT, &submit_request(&spec, request_id, paused))
            .await
        {
            // an older coordinator, without the images' names or those left out: they are for people, the
            // job renders the same without them (its labels say "content 1 x style 1"; those left out
            // were said as it was submitted)
            Err(ClientError::Unsupported(unknown)) if unknown.iter().any(|f| for_people(f)) => {
                // only those it does not know: a coordinator with the names but not those left out
                // keeps the names
                let unknown_to = |field: &str| unknown.iter().any(|f| f.starts_with(field));
                if unknown_to("JobSpec.content_names ") || unknown_to("JobSpec.style_names ") {
                    spec.content_names.clear();
                    spec.style_names.clear();
                }
                if unknown_to("JobSpec.left_out ") {
                    spec.left_out.clear();
                }
                self.check_known(SUBMIT, &submit_request(&spec, request_id, paused))
                    .await?;
            }
            checked => checked?,
        }
        // only the images the coordinator does not hold yet (a batch submitted again, a shared style)
        let wanted: Vec<ImageHash> = files.iter().map(|(_, hash)| hash.clone()).collect();
        let held = self.find_images(&wanted).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "FindImages failed: uploading every image");
            HashSet::new()
        });
        self.upload_files(
            files.iter().filter(|(_, hash)| !held.contains(hash)),
            &decoded,
        )
        .await?;
        let sent = match self.send(&spec, request_id, paused).await {
            // one it held was collected meanwhile (unused for --keep-unused-blobs-secs while the others
            // went up): those are uploaded after all, and the job sent again
            Err(ClientError::Status(s))
                if !held.is_empty()
                    && s.code() == tonic::Code::InvalidArgument
                    && s.message().contains(stylefarm_proto::NOT_UPLOADED) =>
            {
                self.upload_files(
                    files.iter().filter(|(_, hash)| held.contains(hash)),
                    &decoded,
                )
                .await?;
                self.send(&spec, request_id, paused).await
            }
            sent => sent,
        };
        sent.map_err(|e| with_file_names(e, &files))
    }

    /// Uploads each file of `files` (path, the hash its bytes had when the job was made), checking that
    /// the bytes sent are still those; those whose hash is in `decoded` were decoded when they were read,
    /// and are not decoded again.
    async fn upload_files<'a>(
        &mut self,
        files: impl Iterator<Item = &'a (&'a Path, ImageHash)>,
        decoded: &HashSet<ImageHash>,
    ) -> Result<()> {
        for (path, hash) in files {
            let sent = if decoded.contains(hash) {
                let bytes = off_async(|| read_file(path))?;
                let now = ImageHash::of(&bytes);
                match now == *hash {
                    true => self.upload_decoded(&bytes, now).await?,
                    false => now,
                }
            } else {
                self.upload_file(path).await?
            };
            if sent != *hash {
                return Err(ClientError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::other("the file changed while it was submitted"),
                });
            }
        }
        Ok(())
    }

    /// The workers the coordinator has heard from: busy, idle, then silent ([`pb::WorkerStatus`]; the
    /// task a worker renders is named only when its job is this client's).
    pub async fn workers(&mut self) -> Result<Vec<pb::WorkerStatus>> {
        Ok(self
            .rpc
            .list_workers(pb::ListWorkersRequest {})
            .await?
            .into_inner()
            .workers)
    }

    /// Drains the workers named (names, or ids whose name is meant), or undrains them: a drained worker
    /// takes no new task, the one it runs finishes. The farm's operator only (PERMISSION_DENIED). Returns
    /// each one's name and whether its state changed, in order.
    pub async fn drain(
        &mut self,
        workers: &[String],
        undrain: bool,
    ) -> Result<Vec<(String, bool)>> {
        let reply = self
            .rpc
            .drain_workers(pb::DrainWorkersRequest {
                workers: workers.to_vec(),
                undrain,
            })
            .await?
            .into_inner();
        Ok(reply
            .names
            .into_iter()
            .map(|name| {
                let changed = reply.changed.contains(&name);
                (name, changed)
            })
            .collect())
    }

    /// A job's status now.
    pub async fn job(&mut self, job_id: &JobId) -> Result<pb::JobStatus> {
        Ok(self
            .rpc
            .get_job(pb::GetJobRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner())
    }

    /// The log of task `index` of a job (GetTaskLog): its last ended attempts, oldest first, then the
    /// running one, if any.
    pub async fn task_log(&mut self, job_id: &JobId, index: u32) -> Result<pb::TaskLog> {
        Ok(self
            .rpc
            .get_task_log(pb::GetTaskLogRequest {
                job_id: job_id.to_string(),
                index,
            })
            .await?
            .into_inner())
    }

    /// The newest `limit` jobs (0: all) in `states` (all when empty), newest first, fetched a page
    /// (ListJobs) at a time.
    pub async fn list(
        &mut self,
        states: &[pb::JobState],
        limit: u32,
    ) -> Result<Vec<pb::JobStatus>> {
        let mut jobs = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .rpc
                .list_jobs(pb::ListJobsRequest {
                    states: states.iter().map(|&s| s as i32).collect(),
                    limit: limit.saturating_sub(jobs.len() as u32),
                    page_token,
                })
                .await?
                .into_inner();
            jobs.extend(page.jobs);
            if page.next_page_token.is_empty() || (limit > 0 && jobs.len() >= limit as usize) {
                return Ok(jobs);
            }
            page_token = page.next_page_token;
        }
    }

    /// Cancels a job; returns its state after the cancel (a job already ended keeps its state).
    pub async fn cancel(&mut self, job_id: &JobId) -> Result<pb::JobState> {
        Ok(self.cancel_tasks(job_id, &[]).await?.0)
    }

    /// Cancels tasks `tasks` (their indices, [`pb::TaskStatus::index`]) of a keep-going batch or sweep
    /// alone, which goes on without them (CancelJob with its tasks); none named: the whole job. Returns the
    /// job's state and how many of them were cancelled (those that had ended are left as they are).
    /// FAILED_PRECONDITION for a job that is not keep-going; [`ClientError::Unsupported`] from a
    /// coordinator too old to cancel tasks alone (it would cancel the whole job).
    pub async fn cancel_tasks(
        &mut self,
        job_id: &JobId,
        tasks: &[u32],
    ) -> Result<(pb::JobState, u32)> {
        let request = pb::CancelJobRequest {
            job_id: job_id.to_string(),
            tasks: tasks.to_vec(),
        };
        self.check_tasks_known("stylefarm.v1.CancelJobRequest", &request, tasks, || {
            format!("cancelling tasks of job {job_id}")
        })
        .await?;
        let reply = self.rpc.cancel_job(request).await?.into_inner();
        let state = pb::JobState::try_from(reply.state).unwrap_or_default();
        Ok((state, reply.tasks_cancelled))
    }

    /// Pauses a job (PauseJob): its queued tasks are not leased until it is resumed, its running ones go on.
    /// Returns its state (a finished job is left as it is).
    pub async fn pause(&mut self, job_id: &JobId) -> Result<pb::JobState> {
        let reply = self
            .rpc
            .pause_job(pb::PauseJobRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner();
        Ok(pb::JobState::try_from(reply.state).unwrap_or_default())
    }

    /// Sets a job's priority (SetJobPriority; higher runs first): its queued tasks take their places by
    /// it. Returns its state (a finished job is left as it is).
    pub async fn set_priority(&mut self, job_id: &JobId, priority: i32) -> Result<pb::JobState> {
        let reply = self
            .rpc
            .set_job_priority(pb::SetJobPriorityRequest {
                job_id: job_id.to_string(),
                priority,
            })
            .await?
            .into_inner();
        Ok(pb::JobState::try_from(reply.state).unwrap_or_default())
    }

    /// Resumes a paused job (ResumeJob); returns its state.
    pub async fn resume(&mut self, job_id: &JobId) -> Result<pb::JobState> {
        let reply = self
            .rpc
            .resume_job(pb::ResumeJobRequest {
                job_id: job_id.to_string(),
            })
            .await?
            .into_inner();
        Ok(pb::JobState::try_from(reply.state).unwrap_or_default())
    }

    /// Runs a failed or cancelled job again (RetryJob): its failed and cancelled tasks are queued again,
    /// its succeeded ones keep their results. Returns the coordinator's answer: the job's state after it,
    /// how many tasks were queued again, whether the coordinator's step runs again; a queued or running
    /// job is left as it is (but for a keep-going job's failed tasks), a succeeded one is
    /// FAILED_PRECONDITION.
    pub async fn retry(&mut self, job_id: &JobId) -> Result<pb::RetryJobResponse> {
        self.retry_tasks(job_id, &[]).await
    }

    /// [`FarmClient::retry`] of tasks `tasks` (their indices) of a keep-going batch or sweep alone: each
    /// must have failed or been cancelled; the job's other failed and cancelled tasks stay as they are.
    /// None named: the whole job's. [`ClientError::Unsupported`] from a coordinator too old to run tasks
    /// again alone.
    pub async fn retry_tasks(
        &mut self,
        job_id: &JobId,
        tasks: &[u32],
    ) -> Result<pb::RetryJobResponse> {
        let request = pb::RetryJobRequest {
            job_id: job_id.to_string(),
            tasks: tasks.to_vec(),
        };
        self.check_tasks_known("stylefarm.v1.RetryJobRequest", &request, tasks, || {
            format!("running tasks of job {job_id} again")
        })
        .await?;
        Ok(self.rpc.retry_job(request).await?.into_inner())
    }

    /// Deletes a finished job (DeleteJob): its record and its tasks'; FAILED_PRECONDITION while it is
    /// queued or running.
    pub async fn delete(&mut self, job_id: &JobId) -> Result<()> {
        self.rpc
            .delete_job(pb::DeleteJobRequest {
                job_id: job_id.to_string(),
            })
            .await?;
        Ok(())
    }

    /// Follows a job: its status now, then one on every change, until it ends (the stream then ends).
    pub async fn watch(&mut self, job_id: &JobId) -> Result<StatusStream> {
        let events = self.watch_events(job_id, false).await?;
        Ok(Box::pin(
            events.map(|event| event.map(|(status, _)| status)),
        ))
    }

    /// [`Self::watch`] with each event's previews (WatchJobRequest.previews): the running tasks' images
    /// that came since the event before, when `previews`.
    pub async fn watch_events(&mut self, job_id: &JobId, previews: bool) -> Result<EventStream> {
        let job = job_id.clone();
        let stream = self
            .rpc
            .watch_job(pb::WatchJobRequest {
                job_id: job_id.to_string(),
                previews,
            })
            .await?
            .into_inner();
        Ok(Box::pin(stream.map(move |event| {
            let event = event?;
            let status = event.status.ok_or_else(|| ClientError::Job {
                job_id: job.clone(),
                message: "an event without a status".into(),
            })?;
            Ok((status, event.previews))
        })))
    }

    /// Follows a job until it ends; returns its last status. An error when the coordinator ends the
    /// stream before the job ends (it stopped, or restarted): the job goes on, to be watched again.
    pub async fn wait(&mut self, job_id: &JobId) -> Result<pb::JobStatus> {
        let mut stream = self.watch(job_id).await?;
        let mut last = None;
        while let Some(status) = stream.next().await {
            last = Some(status?);
        }
        let ended = |message: String| ClientError::Job {
            job_id: job_id.clone(),
            message,
        };
        let last = last.ok_or_else(|| ended("the event stream ended without an event".into()))?;
        if !job_ended(last.state()) {
            return Err(ended(format!(
                "the event stream ended while the job was {}: the coordinator stopped or restarted",
                job_state_name(last.state)
            )));
        }
        Ok(last)
    }

    /// Downloads a result image's bytes by its sha256, checking them against it.
    pub async fn download_bytes(&mut self, hash: &ImageHash) -> Result<Vec<u8>> {
        let stream = self
            .rpc
            .download_result(pb::DownloadRequest {
                sha256: hash.to_string(),
            })
            .await?
            .into_inner();
        let max = imaging::MAX_ENCODED_BYTES as u64;
        let bytes = stylefarm_proto::chunks_bytes(stream, max).await?;
        if off_async(|| ImageHash::of(&bytes)) != *hash {
            return Err(ClientError::Corrupt(hash.clone()));
        }
        self.downloaded += 1;
        Ok(bytes)
    }

    /// Downloads a result image to `path`, re-encoded to the format of its extension (PNG as sent).
    pub async fn download(&mut self, hash: &ImageHash, path: &Path) -> Result<()> {
        let bytes = self.download_bytes(hash).await?;
        off_async(|| imaging::save_encoded(&bytes, hash.as_str(), path))?;
        Ok(())
    }

    /// Writes a job's results, those done so far for a job still running; returns the files that hold them
    /// (written, or found holding them already). A single
    /// render or a tiled job's stitched image goes to `output` when it names an image file (`.png`, `.jpg`,
    /// `.tif`); otherwise `output` is a directory that gets every task's result as `NNN_<label>.png` (the
    /// task's index, with as many digits as the job's last, at least 3), a sweep's `contact-sheet.png`, a
    /// tiled job's `scale-K.png` and `result.png`, or a video's frames rendered so far as `frame-NNNNN.png`
    /// (1-based, for `ffmpeg -i frame-%05d.png`; a video not finished may leave gaps, where ffmpeg's numbered
    /// input stops). Files there are written over, but not one of the job's input images (by sha256): that
    /// is refused, naming `output`, before anything is written. A PNG file that holds its result already
    /// (the same sha256: a fetch run again after one cut short, or of a job that went on) is left as it
    /// is, not downloaded again. A result that cannot be written (a directory in its file's place, say)
    /// does not stop the others: the error, naming `output`, says how many were not written, and the
    /// first's reason.
    pub async fn fetch(&mut self, status: &pb::JobStatus, output: &Path) -> Result<Vec<PathBuf>> {
        self.fetch_each(status, output, |_| {}).await
    }

    /// [`FarmClient::fetch`], calling `each` with each file as it is written (or found holding its result
    /// already): a fetch of a thousand results says how far it is, and a fetch that fails part-way has
    /// said which were written.
    pub async fn fetch_each(
        &mut self,
        status: &pb::JobStatus,
        output: &Path,
        mut each: impl FnMut(&Path),
    ) -> Result<Vec<PathBuf>> {
        let missing = |what: &str| ClientError::Job {
            job_id: JobId::new(status.job_id.clone()),
            message: format!("{what} (state {})", job_state_name(status.state)),
        };
        let done: Vec<&pb::TaskStatus> = status
            .tasks
            .iter()
            .filter(|t| !t.result.is_empty())
            .collect();
        if done.is_empty() {
            return Err(missing("has no results"));
        }
        let video = matches!(
            status.spec.as_ref().and_then(|s| s.kind.as_ref()),
            Some(pb::job_spec::Kind::Video(_))
        );
        let tiled = !status.result.is_empty() || status.scales > 0;
        let sweep = matches!(
            status.spec.as_ref().and_then(|s| s.kind.as_ref()),
            Some(pb::job_spec::Kind::Sweep(_))
        );
        // the job's results, not those done yet: one of a running batch is not its result
        let several = video || (!tiled && (status.tasks.len() > 1 || sweep));
        imaging::check_output(output, several, &[])?;
        // (image, where it goes), and the folder they go in
        let mut plan: Vec<(&str, PathBuf)> = Vec::new();
        let folder = if video {
            let total = status.spec.as_ref().map_or(0, |s| s.contents.len());
            check_no_stale_frames(output, total)?;
            let mut frames: Vec<(u64, &pb::TaskStatus)> = done
                .into_iter()
                .map(|t| (u64::from(t.frame.as_ref().map_or(t.index, |f| f.index)), t))
                .collect();
            frames.sort_by_key(|(index, _)| *index);
            for (index, t) in frames {
                let path = output.join(format!("frame-{:05}.png", index + 1));
                plan.push((&t.result, path));
            }
            true
        } else if tiled {
            // tiled: the stitched image; into a directory also every scale's
            if status.result.is_empty() {
                return Err(missing("has no result yet"));
            }
            if imaging::output_format(output).is_ok() {
                plan.push((&status.result, output.to_path_buf()));
                false
            } else {
                for (k, sha) in status.scale_results.iter().enumerate() {
                    plan.push((sha, output.join(format!("scale-{}.png", k + 1))));
                }
                plan.push((&status.result, output.join("result.png")));
                true
            }
        } else if !several && imaging::output_format(output).is_ok() {
            plan.push((&done[0].result, output.to_path_buf()));
            false
        } else {
            for t in done {
                let path = output.join(task_file_name(t.index, status.tasks.len(), &t.label));
                plan.push((&t.result, path));
            }
            if !status.contact_sheet.is_empty() {
                plan.push((&status.contact_sheet, output.join("contact-sheet.png")));
            }
            true
        };
        let inputs = status
            .spec
            .iter()
            .flat_map(|s| s.contents.iter().chain(&s.styles));
        check_not_inputs(plan.iter().map(|(_, path)| path.as_path()), inputs)?;
        if folder {
            create_dir(output)?;
        }
        let (mut written, mut unwritten) = (Vec::new(), Vec::new());
        let planned = plan.len();
        for (sha, path) in plan {
            if !holds(&path, sha) {
                let hash: ImageHash = sha.parse().map_err(|_| {
                    stylefarm_core::Error::invalid("result", format!("'{sha}' is not a sha256"))
                })?;
                // the coordinator's errors stop the fetch; a file that cannot be written (a directory
                // in its place, a name the filesystem refuses) does not stop the others
                let bytes = self.download_bytes(&hash).await?;
                if let Err(e) = off_async(|| imaging::save_encoded(&bytes, sha, &path)) {
                    unwritten.push(e);
                    continue;
                }
            }
            each(&path);
            written.push(path);
        }
        if let Some(first) = unwritten.first() {
            return Err(stylefarm_core::Error::invalid(
                "output",
                format!(
                    "{} of {planned} result(s) could not be written ({} were), the first: {first}",
                    unwritten.len(),
                    written.len()
                ),
            )
            .into());
        }
        Ok(written)
    }
}

/// Refuses, naming `output`, a path among `paths` whose file is one of the images `inputs` (sha256 in
/// hex): a job's result written there would replace its own content or style.
fn check_not_inputs<'a>(
    paths: impl Iterator<Item = &'a Path>,
    inputs: impl Iterator<Item = &'a String>,
) -> Result<()> {
    let inputs: HashSet<&str> = inputs.map(String::as_str).collect();
    for path in paths.filter(|p| p.is_file()) {
        let bytes = off_async(|| std::fs::read(path)).map_err(|source| ClientError::Io {
            path: path.into(),
            source,
        })?;
        let hash = off_async(|| ImageHash::of(&bytes));
        if inputs.contains(hash.as_str()) {
            return Err(stylefarm_core::Error::invalid(
                "output",
                format!(
                    "{} is one of the job's input images (sha256 {hash}): fetching would write over it; \
                     give another path",
                    path.display()
                ),
            )
            .into());
        }
    }
    Ok(())
}

/// Runs work that holds its thread for a while (decoding, hashing, reading or writing a large image) from
/// an async caller: on a multi-thread runtime its other tasks move to other threads meanwhile (tokio's
/// `block_in_place`; a local farm's coordinator and workers share the runtime); on another, it just runs.
pub(crate) fn off_async<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Whether `path` is a PNG file whose bytes hash to `sha256` (a result as [`FarmClient::download`] writes
/// it: a PNG as sent). Any other file, or none, does not.
fn holds(path: &Path, sha256: &str) -> bool {
    if !matches!(imaging::output_format(path), Ok(image::ImageFormat::Png)) {
        return false;
    }
    // a regular file of at most an image's size (not a FIFO, nor a link to /dev/zero)
    off_async(|| imaging::read_image_file(path))
        .is_ok_and(|bytes| ImageHash::of(&bytes).as_str() == sha256)
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    Ok(imaging::read_image_file(path)?)
}

fn create_dir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|source| ClientError::Io {
        path: path.into(),
        source,
    })
}

/// Refuses a folder that holds frames (`frame-NNNNN.png`) past a video's `total`: another render's, which
/// `ffmpeg -i frame-%05d.png` would read after this video's last frame. Frames within it are written over.
/// [`FarmClient::fetch`] checks it; a command that will fetch checks it first, before the render.
///
/// # Errors
/// [`ClientError::Domain`] on field `output`, naming the first such frame.
pub fn check_no_stale_frames(folder: &Path, total: usize) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        // not there yet (made next), or not a folder (refused by the write)
        return Ok(());
    };
    let mut stale: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| {
            name.strip_prefix("frame-")
                .and_then(|n| n.strip_suffix(".png"))
                .and_then(|n| n.parse::<usize>().ok())
                .is_some_and(|n| n > total)
        })
        .collect();
    if stale.is_empty() {
        return Ok(());
    }
    stale.sort();
    Err(stylefarm_core::Error::invalid(
        "output",
        format!(
            "{}: holds {} frame(s) past this video's {total} ({} ...), from another render: ffmpeg would \
             read them after its last frame; give an empty folder, or remove them",
            folder.display(),
            stale.len(),
            stale[0]
        ),
    )
    .into())
}

/// The file a folder fetch writes task `index`'s result to, of a job of `tasks` tasks: `NNN_<label>.png`,
/// the index with as many digits as the job's last, at least 3, so that the names sort in task order.
fn task_file_name(index: u32, tasks: usize, label: &str) -> String {
    let digits = tasks.saturating_sub(1).to_string().len().max(3);
    format!("{index:0digits$}_{}.png", slug(label))
}

/// A file name from a task label: words joined by `_`, characters other than letters, digits (Unicode's,
/// [`char::is_alphanumeric`]: `東京`, `Ünïcödé` stay), combining marks (the accents of a decomposed name,
/// as macOS gives them; a Devanagari virama) and `=._-` replaced by `-` (path separators, punctuation,
/// control and format characters): `content 1 x style 2` -> `content_1_x_style_2`; at most
/// [`MAX_SLUG_BYTES`] bytes of UTF-8, cut at a character (a sweep's label names every axis and value).
fn slug(label: &str) -> String {
    let slug = label
        .split(' ')
        .map(|w| {
            w.chars()
                .map(|c| {
                    let mark = c.general_category_group() == GeneralCategoryGroup::Mark;
                    if c.is_alphanumeric() || mark || "=._-".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("_");
    stylefarm_core::task_log::at_most(&slug, MAX_SLUG_BYTES).to_string()
}

/// The longest label part of a result's file name, in bytes: with its index and extension, well within
/// file systems' 255-byte names (and eCryptfs' 143); the index keeps the names apart.
const MAX_SLUG_BYTES: usize = 120;

/// The SubmitJob request of `spec`.
fn submit_request(spec: &JobSpec, request_id: Option<&str>, paused: bool) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest {
        spec: Some(spec.into()),
        client_request_id: request_id.unwrap_or_default().to_string(),
        paused,
    }
}

/// How long a client waits for the coordinator's server reflection before a submit (which checks that the
/// coordinator knows the job's fields): past it the submit goes on unchecked.
pub const REFLECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether `field`, as [`compat::unknown_to`] names a field, is one of those for people: the images' names
/// ([`JobSpec::content_names`]) and those left out ([`JobSpec::left_out`]), which a coordinator without
/// them may go without.
fn for_people(field: &str) -> bool {
    [
        "JobSpec.content_names ",
        "JobSpec.style_names ",
        "JobSpec.left_out ",
    ]
    .iter()
    .any(|name| field.starts_with(name))
}

/// What a coordinator's server reflection answered.
#[derive(Clone)]
enum Descriptors {
    /// Its stylefarm.v1 descriptors.
    Read(DescriptorPool),
    /// A definite answer without them (no reflection service, no such symbol, a file that does not
    /// decode): submits to it are not checked.
    None(String),
    /// No answer this time (unreachable, busy, too slow): read again at the next submit.
    Unread(String),
}

impl Descriptors {
    /// The fields of `request`, a message `name`, the coordinator lacks ([`compat::unknown_to`]), its
    /// render options left at their defaults aside (the coordinator's behaviour without them); an error
    /// saying why when it cannot be told.
    fn unknown(&self, name: &str, request: &impl Message) -> Result<Vec<String>, String> {
        let theirs = match self {
            Descriptors::Read(theirs) => theirs,
            Descriptors::None(why) | Descriptors::Unread(why) => return Err(why.clone()),
        };
        let defaults = [(
            "stylefarm.v1.RenderParams",
            pb::RenderParams::from(&RenderParams::default()).encode_to_vec(),
        )];
        compat::unknown_to(theirs, name, request, &defaults)
    }
}

/// The full name of SubmitJobRequest, as the coordinator's descriptors name it.
const SUBMIT: &str = "stylefarm.v1.SubmitJobRequest";

/// The descriptors of the coordinator behind `channel`, as its gRPC server reflection (v1) gives the file of
/// `stylefarm.v1.RenderService` (stylefarm.v1 imports no other file), within [`REFLECTION_TIMEOUT`].
async fn coordinator_descriptors(channel: AuthChannel) -> Descriptors {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "stylefarm.v1.RenderService".into(),
        )),
    };
    let call = async {
        let mut replies = ServerReflectionClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .server_reflection_info(tokio_stream::once(request))
            .await?
            .into_inner();
        replies.message().await
    };
    let reply = match tokio::time::timeout(REFLECTION_TIMEOUT, call).await {
        Err(_) => return Descriptors::Unread("server reflection did not answer in time".into()),
        Ok(Err(status))
            if matches!(
                status.code(),
                tonic::Code::Unimplemented | tonic::Code::NotFound | tonic::Code::PermissionDenied
            ) =>
        {
            return Descriptors::None(format!("server reflection: {}", status.message()));
        }
        Ok(Err(status)) => return Descriptors::Unread(format!("server reflection: {status}")),
        Ok(Ok(reply)) => reply,
    };
    match reply.and_then(|r| r.message_response) {
        Some(MessageResponse::FileDescriptorResponse(files)) => {
            match compat::pool_of(&files.file_descriptor_proto) {
                Ok(pool) => Descriptors::Read(pool),
                Err(why) => Descriptors::None(why),
            }
        }
        Some(MessageResponse::ErrorResponse(e)) => {
            Descriptors::None(format!("server reflection: {}", e.error_message))
        }
        _ => Descriptors::None("server reflection answered without the file".into()),
    }
}

/// The causes of `error` ([`std::error::Error::source`], its source's, ...), nearest first.
fn causes<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(error.source(), |e| e.source())
}

/// A coordinator's refusal of a job (INVALID_ARGUMENT) with its images named by their files rather than by
/// their sha256, the only names the coordinator has: `submit` names `photo.jpg` as `render` does. `files`:
/// each hash with the first of the job's files that has its bytes.
fn with_file_names(error: ClientError, files: &[(&Path, ImageHash)]) -> ClientError {
    match error {
        ClientError::Status(s) if s.code() == tonic::Code::InvalidArgument => {
            let mut message = s.message().to_string();
            for (path, hash) in files {
                message = message.replace(hash.as_str(), &path.display().to_string());
            }
            ClientError::Status(tonic::Status::new(s.code(), message))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work run through `off_async` on a multi-thread runtime does not hold up the runtime's other tasks,
    /// even with one worker thread; on a current-thread runtime it just runs.
    /// A video's folder holding frames past its last (another render's) is refused, naming them; frames
    /// within it, other files, and a folder not made yet are fine.
    #[test]
    fn a_video_s_folder_with_another_render_s_later_frames_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        check_no_stale_frames(&dir.path().join("not-yet"), 3).unwrap();
        for name in [
            "frame-00001.png",
            "frame-00003.png",
            "notes.txt",
            "frame-x.png",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        check_no_stale_frames(dir.path(), 3).unwrap();
        std::fs::write(dir.path().join("frame-00004.png"), b"").unwrap();
        let err = check_no_stale_frames(dir.path(), 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("output: ")
                && err.contains("1 frame(s) past this video's 3 (frame-00004.png"),
            "{err}"
        );
    }

    /// Result names sort in task order, however many tasks: 3 digits up to 1000 tasks, more past.
    #[test]
    fn result_names_sort_in_task_order() {
        assert_eq!(
            task_file_name(7, 2, "content 1 x style 1"),
            "007_content_1_x_style_1.png"
        );
        assert_eq!(task_file_name(999, 1000, "a"), "999_a.png");
        let names: Vec<String> = [0, 9, 100, 1000, 1234]
            .iter()
            .map(|&i| task_file_name(i, 1235, "a"))
            .collect();
        assert_eq!(names[0], "0000_a.png");
        assert!(names.is_sorted(), "{names:?}");
    }

    /// A lost connection (a transport failure carries its cause; UNAVAILABLE) is worth connecting again
    /// for; a status the coordinator sent (no cause), even UNKNOWN or INTERNAL, is its answer.
    #[test]
    fn only_a_lost_connection_is_worth_connecting_again_for() {
        let broken = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stream closed");
        let transport = tonic::Status::from_error(Box::new(broken));
        assert_eq!(transport.code(), tonic::Code::Unknown);
        assert!(ClientError::Status(transport).is_connection_lost());
        assert!(ClientError::Status(tonic::Status::unavailable("restarting")).is_connection_lost());
        for sent in [
            tonic::Status::unknown("job-1: no such job"),
            tonic::Status::internal("the store failed"),
            tonic::Status::not_found("job_id: no such job"),
        ] {
            assert!(!ClientError::Status(sent).is_connection_lost());
        }
    }

    #[test]
    fn work_off_async_lets_the_runtimes_other_tasks_run() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()
            .unwrap();
        // both tasks on the runtime's one worker thread (not on the thread that blocks on the runtime)
        let ticks = runtime
            .block_on(runtime.spawn(async {
                let ticker = tokio::spawn(async {
                    let mut ticks = 0u32;
                    let started = std::time::Instant::now();
                    while started.elapsed() < std::time::Duration::from_millis(600) {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        ticks += 1;
                    }
                    ticks
                });
                // let the ticker start, then hold this task's thread for 600 ms
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                off_async(|| std::thread::sleep(std::time::Duration::from_millis(600)));
                ticker.await.unwrap()
            }))
            .unwrap();
        assert!(ticks > 10, "the ticker ran {ticks} times meanwhile");
        let current = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(current.block_on(async { off_async(|| 7) }), 7);
    }

    #[test]
    fn labels_become_file_names() {
        assert_eq!(slug("content 1 x style 2"), "content_1_x_style_2");
        assert_eq!(slug("style_weight=10 seed=1"), "style_weight=10_seed=1");
        assert_eq!(slug("a/b"), "a-b");
        assert_eq!(slug("東京 x Ünïcödé"), "東京_x_Ünïcödé");
        // decomposed (U and a combining diaeresis) and with a virama
        assert_eq!(slug("U\u{308}ber x हिन्दी"), "U\u{308}ber_x_हिन्दी");
        // a right-to-left override (a format character) and a backslash go
        assert_eq!(slug("a\u{202e}gnp.exe x b\\c"), "a-gnp.exe_x_b-c");
        // a long label (a sweep's every axis and value) is cut at a character, within the bytes
        let long = slug(&"東".repeat(100));
        assert_eq!(long, "東".repeat(MAX_SLUG_BYTES / 3));
        assert_eq!(slug(&"a".repeat(500)).len(), MAX_SLUG_BYTES);
    }

    #[test]
    fn state_names_are_the_proto_names_lowercased() {
        assert_eq!(job_state_name(pb::JobState::Succeeded as i32), "succeeded");
        assert_eq!(task_state_name(pb::TaskState::Running as i32), "running");
        assert_eq!(job_state_name(99), "");
    }
}
