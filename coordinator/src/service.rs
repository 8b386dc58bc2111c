//! The gRPC services: RenderService for clients, WorkerService for workers. Handlers convert at the edge
//! (stylefarm-core's `wire`), call the scheduler and the blob store, and map errors to status codes.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use stylefarm_core::checkpoint::{Checkpoint, CheckpointFile};
use stylefarm_core::ids::{JobId, LeaseId, WorkerId};
use stylefarm_core::job::CheckpointBounds;
use stylefarm_core::job::{ExpandedJob, ImageHash, JobKind, ScalePart};
use stylefarm_proto::pb::render_service_server::RenderService;
use stylefarm_proto::pb::worker_service_server::WorkerService;
use stylefarm_proto::{pb, PROTOCOL};
use stylefarm_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{self, Tenant};
use crate::decoding::Incoming;
use crate::exchange::{ExchangeError, ShardOf, MAX_EXCHANGE_BYTES, MAX_EXCHANGE_PARTS};
use crate::model::{JobMeta, JobState, TaskRecord, TaskState};
use crate::scheduler::{
    CheckpointSaved, DeviceMemory, FailureKind, JobView, Scheduler, Waiting, MAX_PREVIEW_BYTES,
};
use crate::workers::{MAX_WORKER_ID, MAX_WORKER_TEXT};
use crate::{blocking, Coordinator, Error};
use stylefarm_core::progress::TaskProgress;
use stylefarm_core::task_log::SentLines;
use stylefarm_proto::exchange::Parts;

/// Most leases a worker's sign-off names (its task at hand and its result on its way are two).
const MAX_SIGN_OFF_LEASES: usize = 16;

/// The longest idempotency key a submit may carry (pb::SubmitJobRequest::client_request_id), in bytes.
const MAX_REQUEST_ID_BYTES: usize = 256;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::Chunk, Status>> + Send>>;

fn job_state(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

fn task_state(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
    }
}

/// An image's hash as the wire's text; empty for none.
fn text(hash: Option<&ImageHash>) -> String {
    hash.map(ToString::to_string).unwrap_or_default()
}

/// The wire form of a job's status; `waiting`: why it waits, if it does ([`Waiting::reason`]).
pub(crate) fn job_status(view: &JobView, waiting: String) -> pb::JobStatus {
    let tasks: Vec<_> = view.tasks.iter().map(|(t, p)| (t, *p)).collect();
    job_status_of(&view.meta, &tasks, waiting)
}

/// [`job_status`] of a job's record and its tasks with their live progress, as the scheduler holds them
/// ([`Scheduler::each_newest`]: no copy of the tasks).
fn job_status_of(
    m: &JobMeta,
    tasks: &[(&TaskRecord, Option<TaskProgress>)],
    waiting: String,
) -> pb::JobStatus {
    let tiled = m.spec.kind.tiling().is_some();
    // a tiled job's final image (and its scales, below); a video's last frame
    let staged = tiled || matches!(m.spec.kind, JobKind::Video(_));
    let replaced = crate::model::replaced_tasks(tasks.iter().map(|(t, _)| *t));
    let mut status = pb::JobStatus {
        job_id: m.id.to_string(),
        spec: Some((&m.spec).into()),
        state: job_state(m.state) as i32,
        tasks: tasks
            .iter()
            .map(|(t, p)| pb::TaskStatus {
                index: t.index,
                state: task_state(t.state) as i32,
                label: t.spec.label.clone(),
                attempts: t.attempts,
                worker_id: t.worker.to_string(),
                progress: p.as_ref().map(Into::into),
                result: text(t.result.as_ref()),
                warnings: t.warnings.clone(),
                checkpoint: t.checkpoint.as_ref().map(Into::into),
                error: t.error.clone(),
                tile: t.spec.scale.as_ref().map(Into::into),
                frame: t.spec.frame.as_ref().map(Into::into),
                replaced: replaced.contains(&t.index),
            })
            .collect(),
        // a job's own images by its kind: a sweep's contact sheet, a tiled job's scales and final image
        contact_sheet: if matches!(m.spec.kind, JobKind::Sweep(_)) {
            text(m.result.as_ref())
        } else {
            String::new()
        },
        result: if staged {
            text(m.result.as_ref())
        } else {
            String::new()
        },
        scale_results: if tiled {
            m.stage_results.iter().map(ToString::to_string).collect()
        } else {
            Vec::new()
        },
        scales: if tiled {
            m.spec.pyramid_params().map_or(0, |p| p.scales)
        } else {
            0
        },
        error: m.error.clone(),
        strikes: m.strikes.iter().map(|(w, n)| (w.to_string(), *n)).collect(),
        submitted_ms: m.submitted_ms,
        finished_ms: m.finished_ms,
        waiting,
        paused: m.paused,
        // an ended job keeps them for a retry, but waits for nothing
        waiting_on: if m.state.is_terminal() {
            Vec::new()
        } else {
            m.waiting_on.iter().map(ToString::to_string).collect()
        },
    };
    fit_status(&mut status, STATUS_BYTES);
    status
}

/// The most bytes a job's status takes on the wire ([`fit_status`]): a message, less room for the
/// call's other fields (a watch's previews make room for it).
const STATUS_BYTES: usize = MAX_MESSAGE_BYTES - (64 << 10);

/// Clips the tasks' labels, errors and warnings of `status`, where they make it longer than `budget`
/// bytes: each task's warnings past its first are left out, then the texts are clipped, each to the same
/// length (at a character boundary, ending in `…`). A sweep of 10,000 points with long values, or a batch
/// of 10,000 tasks that failed with long errors, would otherwise have a status that no call can send, and
/// the job could not be watched, fetched or listed. The whole texts stay in the job's spec and its tasks'
/// logs.
fn fit_status(status: &mut pb::JobStatus, budget: usize) {
    if prost::Message::encoded_len(status) <= budget || status.tasks.is_empty() {
        return;
    }
    for task in &mut status.tasks {
        task.warnings.truncate(1);
    }
    let len = prost::Message::encoded_len(status);
    if len <= budget {
        return;
    }
    let (mut texts, mut count) = (0, 0);
    for task in &status.tasks {
        let warning = task.warnings.first();
        texts += task.label.len() + task.error.len() + warning.map_or(0, String::len);
        count += 2 + usize::from(warning.is_some());
    }
    // what each text may keep: the room the rest leaves, shared equally (the length prefixes of the
    // fields are counted in the rest, and do not grow)
    let each = budget.saturating_sub(len - texts) / count;
    let clip = |text: &mut String| {
        if text.len() > each {
            let end = text.floor_char_boundary(each.saturating_sub('…'.len_utf8()));
            text.truncate(end);
            text.push('…');
        }
    };
    for task in &mut status.tasks {
        clip(&mut task.label);
        clip(&mut task.error);
        task.warnings.iter_mut().for_each(clip);
    }
}

/// Job `job_id` if it is `tenant`'s; NOT_FOUND otherwise, as for a job that does not exist (another
/// tenant's job ids are not confirmed).
fn own_job(coordinator: &Coordinator, tenant: &Tenant, job_id: &JobId) -> Result<JobView, Error> {
    coordinator.check_own(tenant, job_id)?;
    Ok(coordinator.scheduler.get(job_id)?)
}

/// Most workers one DrainWorkers call names.
const MAX_DRAINED_AT_ONCE: usize = 1_000;

/// A worker id no longer than [`MAX_WORKER_ID`] (an id the coordinator gave out always is): the worker
/// registry holds the ids it hears of.
fn check_worker_id(id: &WorkerId) -> Result<(), Error> {
    let len = id.as_str().len();
    if len > MAX_WORKER_ID {
        let message = format!("{len} bytes: at most {MAX_WORKER_ID}");
        return Err(Error::invalid("worker_id", message));
    }
    Ok(())
}

/// Refuses a worker that speaks an older render protocol than this coordinator ([`PROTOCOL`]): it would
/// render the tasks' new fields as if they were absent.
fn check_protocol(protocol: u32) -> Result<(), Status> {
    if protocol >= PROTOCOL {
        return Ok(());
    }
    Err(Status::failed_precondition(format!(
        "protocol: this worker speaks render protocol {protocol} and the coordinator {PROTOCOL}: upgrade \
         the worker (one older than its coordinator would ignore render options it does not know)"
    )))
}

/// FindImages calls looking in the blob store at once; the others wait their turn.
static FINDING_IMAGES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

fn hash_arg(field: &'static str, value: &str) -> Result<ImageHash, Error> {
    value
        .parse()
        .map_err(|_| Error::invalid(field, format!("'{value}' is not a sha256")))
}

/// Streams a blob in chunks of [`CHUNK_BYTES`], each read from the blob store as the stream is polled for
/// it (off the async threads: a disk read, an S3 body): a download holds a chunk, not the blob. Before, each
/// call read the whole blob and copied it into its chunks, so that calls not read (200 on a connection, of
/// a 512-MiB image) held 100 GiB.
async fn send_blob(coordinator: &Arc<Coordinator>, sha256: String) -> Result<ChunkStream, Error> {
    let hash = hash_arg("sha256", &sha256)?;
    let opening = coordinator.clone();
    let name = hash.clone();
    let reader = blocking(move || {
        opening
            .blobs
            .open_sequential(&name)?
            .ok_or_else(|| Error::NotFound(format!("image {name} not found")))
    })
    .await?;
    let coordinator = coordinator.clone();
    Ok(Box::pin(BlobChunks::new(
        reader,
        hash,
        Arc::new(move |hash, bytes| coordinator.blobs.delete_damaged(hash, bytes)),
    )))
}

/// What deletes a blob found damaged: [`crate::gc::TrackedBlobs::delete_damaged`].
type DeleteDamaged = Arc<dyn Fn(&ImageHash, u64) -> std::io::Result<()> + Send + Sync>;

impl BlobChunks {
    fn new(
        reader: Box<dyn std::io::Read + Send>,
        hash: ImageHash,
        delete_damaged: DeleteDamaged,
    ) -> BlobChunks {
        BlobChunks {
            reader: Some(BlobRead {
                reader,
                hasher: sha2::Sha256::default(),
                bytes: 0,
                hash,
                delete_damaged,
            }),
            reading: None,
        }
    }
}

/// A blob's chunks as [`send_blob`] streams them.
struct BlobChunks {
    /// The blob, between reads; `None` while one is under way, and once it ended or failed.
    reader: Option<BlobRead>,
    /// The read of the next chunk, on the blocking pool.
    reading: Option<tokio::task::JoinHandle<ChunkRead>>,
}

/// A blob being streamed, and the hash of its bytes so far: at its end, a blob whose bytes do not hash
/// to its name (damaged on disk) is deleted ([`crate::gc::TrackedBlobs::delete_damaged`]) and its stream
/// ends DATA_LOSS, saying so, rather than the caller finding the bytes wrong and trying again for good.
struct BlobRead {
    reader: Box<dyn std::io::Read + Send>,
    hasher: sha2::Sha256,
    bytes: u64,
    hash: ImageHash,
    delete_damaged: DeleteDamaged,
}

impl BlobRead {
    /// The next chunk; empty at the blob's end, once its bytes are found to hash to its name.
    fn next_chunk(&mut self) -> Result<Vec<u8>, Status> {
        use sha2::Digest;
        use std::io::Read;
        let mut data = Vec::with_capacity(CHUNK_BYTES);
        (&mut self.reader)
            .take(CHUNK_BYTES as u64)
            .read_to_end(&mut data)
            .map_err(|e| Status::from(Error::from(e)))?;
        self.hasher.update(&data);
        self.bytes += data.len() as u64;
        if !data.is_empty() {
            return Ok(data);
        }
        let found = stylefarm_core::ids::hex(&self.hasher.clone().finalize());
        if found == self.hash.as_str() {
            return Ok(data);
        }
        let hash = &self.hash;
        let deleted = match (self.delete_damaged)(hash, self.bytes) {
            Ok(()) => "deleted: upload the image again (submit it again), then retry".to_string(),
            Err(e) => format!("deleting it failed ({e})"),
        };
        tracing::error!(image = %hash, found, bytes = self.bytes, deleted, "a stored image is damaged");
        Err(Status::data_loss(format!(
            "image {hash}: the stored copy is damaged ({} bytes that hash to {found}); {deleted}",
            self.bytes
        )))
    }
}

/// A chunk read, with the blob to read the next from; empty at its end.
type ChunkRead = Result<(BlobRead, Vec<u8>), Status>;

impl Stream for BlobChunks {
    type Item = Result<pb::Chunk, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::future::Future;
        use std::task::Poll;
        if self.reading.is_none() {
            let Some(mut reader) = self.reader.take() else {
                return Poll::Ready(None);
            };
            self.reading = Some(tokio::task::spawn_blocking(move || {
                let data = reader.next_chunk()?;
                Ok((reader, data))
            }));
        }
        let reading = self.reading.as_mut().expect("a read under way");
        let read = std::task::ready!(Pin::new(reading).poll(cx));
        self.reading = None;
        Poll::Ready(match read {
            Ok(Ok((_, data))) if data.is_empty() => None,
            Ok(Ok((reader, data))) => {
                self.reader = Some(reader);
                Some(Ok(pb::Chunk { data }))
            }
            Ok(Err(status)) => Some(Err(status)),
            Err(e) => Some(Err(Status::from(Error::Internal(format!(
                "reading a blob: {e}"
            ))))),
        })
    }
}

/// A message of a client stream that failed to decode: one over the message size limit answers
/// RESOURCE_EXHAUSTED naming the field, as a unary call over it does (`message_limit_status`), not the
/// transport's OUT_OF_RANGE.
pub(crate) fn stream_message<T>(msg: Result<T, Status>) -> Result<T, Error> {
    msg.map_err(|s| {
        if s.code() == tonic::Code::OutOfRange {
            Error::ResourceExhausted(format!(
                "data: {} (send images in chunks of at most {} MiB)",
                s.message(),
                CHUNK_BYTES >> 20
            ))
        } else {
            Error::Rpc(s)
        }
    })
}

/// The most jobs a ListJobs page holds.
const MAX_LIST_PAGE: usize = 1000;

/// The most bytes of job statuses a ListJobs page holds: the message limit, less room for the rest.
const LIST_PAGE_BYTES: usize = MAX_MESSAGE_BYTES - (64 << 10);

/// A ListJobs page of `views` (newest first; one more than `limit` when another page follows): the first
/// `limit` jobs, fewer when their statuses would pass `max_bytes` (at least one), and the token of the
/// page after when jobs are left: the submission number of its last job.
fn list_page(
    scheduler: &Scheduler,
    tenant: &str,
    (states, before): (&[JobState], Option<u64>),
    waiting: &Waiting,
    limit: usize,
    max_bytes: usize,
) -> pb::ListJobsResponse {
    let mut page = pb::ListJobsResponse::default();
    let (mut bytes, mut last_seq, mut more) = (0, 0, false);
    // built under the scheduler's lock from its records, one more job than the page holds looked at:
    // whether another page follows
    scheduler.each_newest(tenant, states, limit + 1, before, |meta, tasks| {
        if page.jobs.len() == limit {
            more = true;
            return ControlFlow::Break(());
        }
        let waits = waiting.reason(meta, tasks.iter().map(|(t, _)| *t));
        let status = job_status_of(meta, tasks, waits);
        // the field's tag and length prefix
        let len = prost::Message::encoded_len(&status) + 6;
        if !page.jobs.is_empty() && bytes + len > max_bytes {
            more = true;
            return ControlFlow::Break(());
        }
        bytes += len;
        last_seq = meta.seq;
        page.jobs.push(status);
        ControlFlow::Continue(())
    });
    if more {
        page.next_page_token = last_seq.to_string();
    }
    page
}

/// How often, at most, a WatchJob stream sends an event while its job changes.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// How often a WatchJob stream of a job that does not change looks again at why it waits (the workers
/// come and go without the job changing).
const WAITING_EVERY: Duration = Duration::from_secs(2);

/// A heartbeat's preview as the scheduler keeps it: `None` when there is none, and when it is over
/// [`MAX_PREVIEW_BYTES`] or not a PNG of at most [`PREVIEW_SIDE`] px a side by its header (logged: a worker
/// of another version, or a caller that is not a worker; its heartbeat is answered as usual). Clients
/// and the status page's browsers decode it: a few KB of PNG may declare 30,000 x 30,000 px.
///
/// [`PREVIEW_SIDE`]: stylefarm_core::imaging::PREVIEW_SIDE
fn checked_preview(png: Vec<u8>, lease_id: &LeaseId) -> Option<bytes::Bytes> {
    if png.is_empty() {
        return None;
    }
    let side = || {
        let reader =
            image::ImageReader::with_format(std::io::Cursor::new(&png), image::ImageFormat::Png);
        reader.into_dimensions().ok()
    };
    let fits = |(w, h): (u32, u32)| w.max(h) <= stylefarm_core::imaging::PREVIEW_SIDE;
    if png.len() > MAX_PREVIEW_BYTES || !side().is_some_and(fits) {
        tracing::warn!(
            lease_id = lease_id.as_str(),
            bytes = png.len(),
            "preview_png: not a PNG of at most {MAX_PREVIEW_BYTES} bytes and {} px a side; left out",
            stylefarm_core::imaging::PREVIEW_SIDE
        );
        return None;
    }
    Some(png.into())
}

/// The most bytes of previews one WatchJob event carries (the rest come with the next): eight of the
/// largest, fewer when the job's status leaves less of the 4-MiB message limit.
const PREVIEW_EVENT_BYTES: usize = 8 * crate::scheduler::MAX_PREVIEW_BYTES;

/// The previews of job `job_id`'s running tasks that are not those `sent` (task index -> when the one sent
/// came), at most `budget` bytes of them, the tasks not sent the longest first; `sent` updated.
fn new_previews(
    scheduler: &Scheduler,
    job_id: &JobId,
    sent: &mut HashMap<u32, i64>,
    budget: usize,
) -> Vec<pb::TaskPreview> {
    let mut due: Vec<(u32, crate::scheduler::Preview)> = scheduler
        .previews(job_id)
        .into_iter()
        .filter(|(index, p)| sent.get(index) != Some(&p.at_ms))
        .collect();
    due.sort_by_key(|(index, _)| sent.get(index).copied().unwrap_or(i64::MIN));
    let mut bytes = 0;
    let mut previews = Vec::new();
    for (index, preview) in due {
        if bytes + preview.png.len() > budget {
            continue;
        }
        bytes += preview.png.len();
        sent.insert(index, preview.at_ms);
        previews.push(pb::TaskPreview {
            task_index: index,
            png: preview.png.to_vec(),
            at_ms: preview.at_ms,
        });
    }
    previews
}

/// A WatchJob stream's events: `first`, then the job after each change (`changes`: the scheduler's,
/// subscribed to before `first` was read), the changes of [`WATCH_EVERY`] coalesced into one event, until
/// the job ends (its last event) or the client leaves. Each event says why the job waits, if it does
/// (`waiting`, called for the workers live then); a change of that alone is an event too, looked for
/// every [`WAITING_EVERY`]. With `previews`, an event carries the running tasks' previews that came since
/// the last ([`new_previews`]).
/// The status a job event stream ends with when its coordinator stops ([`crate::serve`]).
const COORDINATOR_STOPPING: &str =
    "the coordinator is stopping: watch again once it, or a standby, serves";

async fn watch(
    scheduler: Arc<Scheduler>,
    waiting: impl Fn() -> Waiting + Send + 'static,
    job_id: JobId,
    first: JobView,
    previews: bool,
    mut changes: tokio::sync::broadcast::Receiver<JobId>,
    tx: mpsc::Sender<Result<pb::JobEvent, Status>>,
) {
    let (mut view, mut changed, mut sent) = (first, true, String::new());
    let mut previews_sent = HashMap::new();
    loop {
        let reason = waiting().of(&view);
        if changed || reason != sent {
            let done = view.meta.state.is_terminal();
            let status = job_status(&view, reason.clone());
            let previews = if previews {
                // room left in the message beside the status (a large batch's is large)
                let status_bytes = prost::Message::encoded_len(&status);
                let budget = PREVIEW_EVENT_BYTES
                    .min(MAX_MESSAGE_BYTES.saturating_sub(status_bytes + (64 << 10)));
                new_previews(&scheduler, &job_id, &mut previews_sent, budget)
            } else {
                Vec::new()
            };
            if tx
                .send(Ok(pb::JobEvent {
                    status: Some(status),
                    previews,
                }))
                .await
                .is_err()
                || done
            {
                return; // the client left, or the job is over
            }
            sent = reason;
        }
        match tokio::time::timeout(WAITING_EVERY, next_change(&mut changes, &job_id)).await {
            // no change: look again at why it waits (and whether the client is still there)
            Err(_) => {
                if tx.is_closed() {
                    return;
                }
                changed = false;
                continue;
            }
            Ok(false) => return,
            Ok(true) => {}
        }
        // the changes of the next moment (every worker's heartbeat is one) make one event: the job is
        // copied under the scheduler's lock at most every WATCH_EVERY per watcher
        tokio::time::sleep(WATCH_EVERY).await;
        changes = changes.resubscribe();
        match scheduler.get(&job_id) {
            Ok(v) => (view, changed) = (v, true),
            Err(_) => return,
        }
    }
}

/// Waits for a change of job `job_id` among the scheduler's `changes` (or for changes missed, which may
/// hold one): true; false when the scheduler is gone.
async fn next_change(
    changes: &mut tokio::sync::broadcast::Receiver<JobId>,
    job_id: &JobId,
) -> bool {
    loop {
        match changes.recv().await {
            Ok(id) if id == *job_id => return true,
            Ok(_) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return true,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
        }
    }
}

pub(crate) struct RenderApi {
    pub coordinator: Arc<Coordinator>,
    /// True once the coordinator stops ([`crate::serve`]): its job event streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl RenderService for RenderApi {
    async fn upload_image(
        &self,
        request: Request<Streaming<pb::UploadImageRequest>>,
    ) -> Result<Response<pb::UploadImageResponse>, Status> {
        let (mut expected, mut data) = (None, false);
        let mut received = self.coordinator.receiving.upload(&auth::tenant(&request));
        received
            .receive(request.into_inner(), |msg: pb::UploadImageRequest| {
                use pb::upload_image_request::Part;
                Ok(match msg.part {
                    // one, before the data (a second would be a client's confusion, not a correction)
                    Some(Part::ExpectedSha256(_)) if expected.is_some() || data => {
                        return Err(Error::invalid("expected_sha256", "once, before the data"))
                    }
                    Some(Part::ExpectedSha256(h)) => {
                        expected = Some(hash_arg("expected_sha256", &h)?);
                        Incoming::Nothing
                    }
                    Some(Part::SizeBytes(size)) => Incoming::Size(size),
                    Some(Part::Data(d)) => {
                        data = true;
                        Incoming::Data(d)
                    }
                    None => Incoming::Nothing,
                })
            })
            .await?;
        let (received, img) = self.coordinator.decoding.decode(received).await?;
        let (width, height) = img.dimensions();
        drop(img);
        let coordinator = self.coordinator.clone();
        let hash = blocking(move || Ok(coordinator.blobs.put(received.bytes())?)).await?;
        if let Some(expected) = expected.filter(|e| *e != hash) {
            return Err(Error::invalid(
                "expected_sha256",
                format!("the bytes hash to {hash}, not {expected}"),
            )
            .into());
        }
        Ok(Response::new(pb::UploadImageResponse {
            sha256: hash.to_string(),
            width,
            height,
        }))
    }

    async fn find_images(
        &self,
        request: Request<pb::FindImagesRequest>,
    ) -> Result<Response<pb::FindImagesResponse>, Status> {
        let asked = request.into_inner().sha256;
        if asked.len() > stylefarm_proto::MAX_FIND_IMAGES {
            return Err(Error::invalid(
                "sha256",
                format!(
                    "{} images: at most {} a call",
                    asked.len(),
                    stylefarm_proto::MAX_FIND_IMAGES
                ),
            )
            .into());
        }
        let hashes = asked
            .iter()
            .map(|h| hash_arg("sha256", h))
            .collect::<Result<Vec<_>, _>>()?;
        // fault injection (tests): a coordinator older than FindImages, as tonic answers an unknown method
        fail::fail_point!("coordinator-find-images-unimplemented", |_| {
            Err(Status::unimplemented(
                "Operation is not implemented or not supported",
            ))
        });
        // fault injection (tests): every image answered as held, as if the blob collection deleted those
        // not held after the answer
        fail::fail_point!("coordinator-find-images-stale", |_| {
            Ok(Response::new(pb::FindImagesResponse {
                held: asked.clone(),
            }))
        });
        let coordinator = self.coordinator.clone();
        // a look in the blob store each (a file's metadata, an S3 HEAD), remembered as a use; a few
        // calls at once, so that they leave the blocking pool to the others
        let _slot = FINDING_IMAGES
            .acquire()
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let held = blocking(move || {
            let mut held = Vec::new();
            for hash in hashes {
                if coordinator.blobs.contains(&hash)? {
                    held.push(hash.to_string());
                }
            }
            Ok(held)
        })
        .await?;
        Ok(Response::new(pb::FindImagesResponse { held }))
    }

    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let tenant = auth::tenant(&request);
        let pb::SubmitJobRequest {
            spec,
            client_request_id,
            paused,
        } = request.into_inner();
        // kept with the job, and written with it at each of its records
        if client_request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(Error::invalid(
                "client_request_id",
                format!(
                    "{} bytes: at most {MAX_REQUEST_ID_BYTES}",
                    client_request_id.len()
                ),
            )
            .into());
        }
        // converted, checked and expanded into its tasks once, here
        let job = ExpandedJob::try_from(spec.ok_or_else(|| Error::invalid("spec", "missing"))?)
            .map_err(Error::from)?;
        let coordinator = self.coordinator.clone();
        // the blob store and the job store are waited for: off the async threads
        let (job_id, created) = blocking(move || {
            let spec = job.spec();
            let images = spec
                .contents
                .iter()
                .map(|h| ("contents", h))
                .chain(spec.styles.iter().map(|h| ("styles", h)));
            let init = spec.params.init.image().map(|h| ("init", h));
            // the images found here are spared by a garbage collection until the job is recorded
            let using = coordinator.blobs.begin_use();
            for (field, hash) in images.chain(init) {
                if !using.contains(hash)? {
                    return Err(Error::invalid(
                        field,
                        format!("image {hash} {}", stylefarm_proto::NOT_UPLOADED),
                    ));
                }
            }
            // no task may be too small for VGG19: sizes from the images' headers
            job.check_sizes(|hash| {
                coordinator.dimensions(hash).map_err(|e| {
                    stylefarm_core::Error::image(
                        hash.as_str(),
                        format!("cannot read the header: {e}"),
                    )
                })
            })
            .map_err(Error::from)?;
            let submitted = coordinator
                .scheduler
                .submit_expanded(job, &tenant.0, &client_request_id, paused)
                .map_err(Error::from);
            drop(using);
            submitted
        })
        .await?;
        tracing::info!(job_id = job_id.as_str(), created, "job submitted");
        // fault injection (tests): the reply delayed after the job is stored, so that a client can die
        // between its request and the reply
        fail::fail_point!("coordinator-submit-reply");
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: job_id.into(),
            created,
        }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::JobStatus>, Status> {
        let tenant = auth::tenant(&request);
        let job_id = JobId::from(request.into_inner().job_id);
        let view = own_job(&self.coordinator, &tenant, &job_id)?;
        Ok(Response::new(job_status(
            &view,
            self.coordinator.waiting().of(&view),
        )))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let tenant = auth::tenant(&request);
        let r = request.into_inner();
        let mut states = r
            .states
            .iter()
            .map(|s| match pb::JobState::try_from(*s) {
                Ok(pb::JobState::Queued) => Ok(JobState::Queued),
                Ok(pb::JobState::Running) => Ok(JobState::Running),
                Ok(pb::JobState::Succeeded) => Ok(JobState::Succeeded),
                Ok(pb::JobState::Failed) => Ok(JobState::Failed),
                Ok(pb::JobState::Cancelled) => Ok(JobState::Cancelled),
                _ => Err(Error::invalid("states", format!("{s} is not a job state"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // each state once: the list is looked through for every job, under the scheduler's lock
        states.sort_unstable_by_key(|s| *s as u8);
        states.dedup();
        let before = match r.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<u64>().map_err(|_| {
                Error::invalid(
                    "page_token",
                    format!("'{token}' is not a next_page_token of a ListJobs response"),
                )
            })?),
        };
        let limit = match r.limit as usize {
            0 => MAX_LIST_PAGE,
            n => n.min(MAX_LIST_PAGE),
        };
        let waiting = self.coordinator.waiting();
        let scheduler = self.coordinator.scheduler.clone();
        // under the scheduler's lock, for as long as a page takes: off the async threads
        let page = blocking(move || {
            Ok(list_page(
                &scheduler,
                &tenant.0,
                (&states, before),
                &waiting,
                limit,
                LIST_PAGE_BYTES,
            ))
        })
        .await?;
        Ok(Response::new(page))
    }

    type WatchJobStream = ReceiverStream<Result<pb::JobEvent, Status>>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let tenant = auth::tenant(&request);
        let request = request.into_inner();
        let job_id = JobId::from(request.job_id);
        let scheduler = self.coordinator.scheduler.clone();
        let changes = scheduler.subscribe();
        let first = own_job(&self.coordinator, &tenant, &job_id)?;
        // one event held for a slow client (and one waiting to be): the next is made when it is taken, of
        // the job as it is then, so a slow client misses the states in between rather than gets a
        // backlog of them, and a stream not read holds two statuses (each up to a message, 4 MiB), not 16
        let (tx, rx) = mpsc::channel(1);
        let coordinator = self.coordinator.clone();
        let waiting = move || coordinator.waiting();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let watching = watch(
                scheduler,
                waiting,
                job_id,
                first,
                request.previews,
                changes,
                tx.clone(),
            );
            tokio::select! {
                () = watching => {}
                // a stream left open would hold the coordinator's stop open for good: it ends, and the
                // client watches again once this coordinator, or a standby, serves
                () = crate::until_stopping(&mut stopping) => {
                    let _ = tx.send(Err(Status::unavailable(COORDINATOR_STOPPING))).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        let tenant = auth::tenant(&request);
        let request = request.into_inner();
        let job_id = JobId::from(request.job_id);
        let coordinator = self.coordinator.clone();
        // waits for the store's commit: off the async threads
        let (state, cancelled) =
            blocking(move || coordinator.cancel_own(&tenant, &job_id, &request.tasks)).await?;
        Ok(Response::new(pb::CancelJobResponse {
            state: job_state(state) as i32,
            tasks_cancelled: u32::try_from(cancelled).unwrap_or(u32::MAX),
        }))
    }

    async fn pause_job(
        &self,
        request: Request<pb::PauseJobRequest>,
    ) -> Result<Response<pb::PauseJobResponse>, Status> {
        let tenant = auth::tenant(&request);
        let job_id = JobId::from(request.into_inner().job_id);
        let coordinator = self.coordinator.clone();
        // waits for the store's commit: off the async threads
        let state = blocking(move || coordinator.pause_own(&tenant, &job_id, true)).await?;
        Ok(Response::new(pb::PauseJobResponse {
            state: job_state(state) as i32,
        }))
    }

    async fn resume_job(
        &self,
        request: Request<pb::ResumeJobRequest>,
    ) -> Result<Response<pb::ResumeJobResponse>, Status> {
        let tenant = auth::tenant(&request);
        let job_id = JobId::from(request.into_inner().job_id);
        let coordinator = self.coordinator.clone();
        let state = blocking(move || coordinator.pause_own(&tenant, &job_id, false)).await?;
        Ok(Response::new(pb::ResumeJobResponse {
            state: job_state(state) as i32,
        }))
    }

    async fn set_job_priority(
        &self,
        request: Request<pb::SetJobPriorityRequest>,
    ) -> Result<Response<pb::SetJobPriorityResponse>, Status> {
        let tenant = auth::tenant(&request);
        let r = request.into_inner();
        let (job_id, priority) = (JobId::from(r.job_id), r.priority);
        let coordinator = self.coordinator.clone();
        let state = blocking(move || {
            coordinator.check_own(&tenant, &job_id)?;
            let state = coordinator.scheduler.set_priority(&job_id, priority)?;
            tracing::info!(job_id = job_id.as_str(), priority, "job priority set");
            Ok(state)
        })
        .await?;
        Ok(Response::new(pb::SetJobPriorityResponse {
            state: job_state(state) as i32,
        }))
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        let tenant = auth::tenant(&request);
        let request = request.into_inner();
        let job_id = JobId::from(request.job_id);
        let coordinator = self.coordinator.clone();
        // waits for the store's commit: off the async threads
        let retried =
            blocking(move || coordinator.retry_own(&tenant, &job_id, &request.tasks)).await?;
        Ok(Response::new(pb::RetryJobResponse {
            state: job_state(retried.state) as i32,
            tasks_requeued: u32::try_from(retried.requeued).unwrap_or(u32::MAX),
            step_again: retried.stage_work,
        }))
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let tenant = auth::tenant(&request);
        let job_id = JobId::from(request.into_inner().job_id);
        let coordinator = self.coordinator.clone();
        // waits for the store's commit: off the async threads
        blocking(move || coordinator.delete_own(&tenant, &job_id)).await?;
        Ok(Response::new(pb::DeleteJobResponse {}))
    }

    async fn get_task_log(
        &self,
        request: Request<pb::GetTaskLogRequest>,
    ) -> Result<Response<pb::TaskLog>, Status> {
        let tenant = auth::tenant(&request);
        let r = request.into_inner();
        let job_id = JobId::from(r.job_id);
        self.coordinator.check_own(&tenant, &job_id)?;
        let attempts = self
            .coordinator
            .scheduler
            .task_log(&job_id, r.index)
            .map_err(Error::from)?;
        Ok(Response::new(pb::TaskLog {
            job_id: job_id.into(),
            index: r.index,
            attempts: attempts.into_iter().map(Into::into).collect(),
        }))
    }

    type DownloadResultStream = ChunkStream;

    async fn download_result(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        Ok(Response::new(
            send_blob(&self.coordinator, request.into_inner().sha256).await?,
        ))
    }

    async fn list_workers(
        &self,
        request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        let tenant = auth::tenant(&request);
        let workers = self
            .coordinator
            .workers_status(&tenant)
            .into_iter()
            .map(|w| pb::WorkerStatus {
                worker_id: w.id,
                device: w.device,
                tags: w.tags,
                memory_bytes: w.memory_bytes,
                memory_used_bytes: w.memory_used_bytes,
                last_seen_s: w.last_seen_s,
                health: w.health.into(),
                job_id: w.job_id,
                task: w.task,
                progress: w.progress,
                drained: w.drained,
                leaving: w.leaving,
                name_shared: w.name_shared,
            })
            .collect();
        Ok(Response::new(pb::ListWorkersResponse { workers }))
    }

    async fn drain_workers(
        &self,
        request: Request<pb::DrainWorkersRequest>,
    ) -> Result<Response<pb::DrainWorkersResponse>, Status> {
        auth::operator(&request, "DrainWorkers")?;
        let pb::DrainWorkersRequest { workers, undrain } = request.into_inner();
        if workers.is_empty() || workers.len() > MAX_DRAINED_AT_ONCE {
            let message = format!("1 to {MAX_DRAINED_AT_ONCE} names, got {}", workers.len());
            return Err(Error::invalid("workers", message).into());
        }
        let names: Vec<WorkerId> = workers.into_iter().map(WorkerId::from).collect();
        if let Some(bad) = names
            .iter()
            .find(|n| n.is_empty() || n.as_str().len() > MAX_WORKER_ID)
        {
            let len = bad.as_str().len();
            let message =
                format!("a name of {len} bytes: a worker's name or id is 1 to {MAX_WORKER_ID}");
            return Err(Error::invalid("workers", message).into());
        }
        // the store's commit is waited for: off the async threads
        let coordinator = self.coordinator.clone();
        let (names, changed) =
            blocking(move || coordinator.drain_workers(&names, !undrain)).await?;
        Ok(Response::new(pb::DrainWorkersResponse {
            changed: changed.into_iter().map(String::from).collect(),
            names: names.into_iter().map(String::from).collect(),
        }))
    }
}

pub(crate) struct WorkerApi {
    pub coordinator: Arc<Coordinator>,
    /// True once the coordinator stops ([`crate::serve`]): a lease poll's wait ends then, with no task.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let r = request.into_inner();
        stylefarm_core::ids::check_worker_name("name", &r.name).map_err(Error::from)?;
        for (field, text) in [("device", &r.device), ("version", &r.version)] {
            check_worker_text(field, text)?;
        }
        stylefarm_core::job::check_tags("tags", &r.tags).map_err(Error::from)?;
        check_protocol(r.protocol)?;
        // before the store's counter is written: a caller registering without end is held to the registry's
        // bound (a real worker that restarts meanwhile finds room once the registrations of the last minute
        // are no longer live)
        if !self.coordinator.workers.has_room() {
            return Err(Error::ResourceExhausted(format!(
                "worker registrations: {} workers were heard from within the last {} s, the most the \
                 coordinator keeps; try again later",
                crate::workers::MAX_WORKERS,
                crate::workers::LIVE_WINDOW.as_secs()
            ))
            .into());
        }
        let worker_id = {
            let coordinator = self.coordinator.clone();
            let name = r.name.clone();
            blocking(move || Ok(coordinator.scheduler.register(&name)?)).await?
        };
        tracing::info!(
            worker_id = worker_id.as_str(),
            device = r.device,
            memory_bytes = r.memory_bytes,
            version = r.version,
            tags = r.tags.join(","),
            "worker registered"
        );
        let sharing = (self.coordinator.workers).register(
            &worker_id,
            &r.device,
            r.memory_bytes,
            &r.tags,
            r.instance,
        );
        if !sharing.is_empty() {
            let others: Vec<&str> = sharing.iter().map(WorkerId::as_str).collect();
            tracing::warn!(
                worker_id = worker_id.as_str(),
                others = others.join(","),
                "another worker process runs under this worker's name: the farm counts them as one (a \
                 tiled or exact scale plans for one; a drain, strike or blocklist takes both); give each \
                 worker its own --name"
            );
        }
        let config = self.coordinator.scheduler.config();
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker_id: worker_id.into(),
            heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u32,
            lease_ms: config.lease.as_millis() as u32,
            // at least 1 ms when on: 0 says none
            preview_interval_ms: u32::try_from(config.preview_interval.as_millis())
                .unwrap_or(u32::MAX)
                .max(u32::from(!config.preview_interval.is_zero())),
        }))
    }

    async fn lease_task(
        &self,
        request: Request<pb::LeaseTaskRequest>,
    ) -> Result<Response<pb::LeaseTaskResponse>, Status> {
        let pb::LeaseTaskRequest {
            worker_id,
            wait_ms,
            memory_used_bytes,
            tags,
            protocol,
            request_id,
            device,
            memory_bytes,
            reporting_lease_id,
        } = request.into_inner();
        let worker_id = WorkerId::from(worker_id);
        if worker_id.is_empty() {
            return Err(Error::invalid("worker_id", "missing").into());
        }
        check_worker_id(&worker_id)?;
        stylefarm_core::job::check_tags("tags", &tags).map_err(Error::from)?;
        check_protocol(protocol)?;
        check_worker_text("device", &device)?;
        let said = crate::workers::Said {
            tags: &tags,
            device: &device,
            memory_bytes,
        };
        self.coordinator
            .workers
            .seen(&worker_id, memory_used_bytes, Some(said));
        if !reporting_lease_id.is_empty() {
            let lease_id = LeaseId::from(reporting_lease_id);
            self.coordinator
                .scheduler
                .sending_result(&worker_id, &lease_id);
        }
        let wait = Duration::from_millis(u64::from(wait_ms.min(30_000)));
        // the device memory it said (registering, or in this poll; 0 from an older worker that leases
        // without having registered here), and the farm's largest: a task that ran out of memory goes to a
        // larger device first
        let workers = &self.coordinator.workers;
        let drained = self.coordinator.scheduler.drained();
        let memory = DeviceMemory {
            own: workers.get(&worker_id).map_or(0, |w| w.memory_bytes),
            largest_live: workers
                .live_memory(|id, w| !drained.contains(&id.by_name()) && !w.leaving)
                .into_iter()
                .max()
                .unwrap_or(0),
        };
        // while it waits: a process that died idle has none under way (its call dropped with its
        // connection), and is not taken for another process under its name
        let _polling = workers.polling(&worker_id);
        let mut stopping = self.stopping.clone();
        let lease = tokio::select! {
            // a stopping coordinator answers at once, whatever is ready
            biased;
            () = crate::until_stopping(&mut stopping) => None,
            lease = self
                .coordinator
                .scheduler
                .lease_wait(&worker_id, &tags, memory, wait, request_id) => lease.map_err(Error::from)?,
        };
        let Some(lease) = lease else {
            return Ok(Response::new(pb::LeaseTaskResponse::default()));
        };
        tracing::info!(
            job_id = lease.task.id.job.as_str(),
            task = lease.task.id.index,
            worker_id = worker_id.as_str(),
            "task leased"
        );
        Ok(Response::new(pb::LeaseTaskResponse {
            task: Some((&lease.task).into()),
            lease_id: lease.lease_id.into(),
            lease_deadline_ms: lease.deadline_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let (worker_id, lease_id) = (WorkerId::from(r.worker_id), LeaseId::from(r.lease_id));
        if worker_id.is_empty() {
            return Err(Error::invalid("worker_id", "missing").into());
        }
        check_worker_id(&worker_id)?;
        let (leaving, memory_used) = (r.leaving, r.memory_used_bytes);
        if lease_id.is_empty() {
            return Ok(Response::new(pb::HeartbeatResponse {
                cancel: false,
                lease_deadline_ms: 0,
            }));
        }
        if let Some(log) = r.log {
            self.coordinator
                .scheduler
                .append_log(&lease_id, &worker_id, SentLines::from(log));
        }
        let progress = r
            .progress
            .map(TaskProgress::from)
            .filter(|p| p.iterations > 0);
        let preview = checked_preview(r.preview_png, &lease_id);
        // expiring the leases past their deadline may wait for the store's commit: off the async threads
        let scheduler = self.coordinator.scheduler.clone();
        let beating = worker_id.clone();
        let reply = blocking(move || {
            // fault injection (tests): a reply slower than the worker waits for, its lines kept
            // (`sleep(ms)`; on the blocking threads)
            fail::fail_point!("coordinator-heartbeat");
            Ok(scheduler.heartbeat(&lease_id, &beating, progress, preview)?)
        })
        .await?;
        // what a beat says of its worker (heard from, its memory in use, stopping: it says so in the
        // beats of the task it finishes) is taken from a beat of a lease the worker holds (its deadline
        // renewed), not from any caller that knows a worker's id or makes one up (a worker listed live)
        if reply.deadline_ms > 0 {
            self.coordinator.workers.seen(&worker_id, memory_used, None);
            if leaving {
                self.coordinator.workers.stopping(&worker_id);
            }
        }
        Ok(Response::new(pb::HeartbeatResponse {
            cancel: reply.cancel,
            lease_deadline_ms: reply.deadline_ms,
        }))
    }

    async fn complete_task(
        &self,
        request: Request<Streaming<pb::CompleteTaskRequest>>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        // fault injection (tests): results refused for a while, as a coordinator whose store is out of
        // reach refuses them
        fail::fail_point!("coordinator-complete-task", |_| Err(Status::unavailable(
            "the store is out of reach (injected)"
        )));
        let mut lease_id = LeaseId::default();
        let mut held = false;
        let mut log = SentLines::default();
        let mut warnings = Vec::new();
        let mut received = self.coordinator.receiving.result();
        let scheduler = &self.coordinator.scheduler;
        received
            .receive(request.into_inner(), |msg: pb::CompleteTaskRequest| {
                use pb::complete_task_request::Part;
                Ok(match msg.part {
                    Some(Part::LeaseId(id)) => {
                        lease_id = id.into();
                        held = scheduler.leased_task(&lease_id).is_some();
                        Incoming::Nothing
                    }
                    Some(Part::SizeBytes(_) | Part::Data(_) | Part::Log(_) | Part::Warnings(_))
                        if lease_id.is_empty() =>
                    {
                        return Err(Error::invalid("lease_id", "missing before the result"));
                    }
                    Some(Part::Log(lines)) => {
                        log.append(SentLines::from(lines));
                        Incoming::Nothing
                    }
                    Some(Part::Warnings(sent)) => {
                        warnings.extend(sent.warnings);
                        // bounded as they come, whatever the worker sends
                        warnings = stylefarm_core::task_log::warnings(warnings.drain(..));
                        Incoming::Nothing
                    }
                    // the result of a lease no longer held is answered at its first bytes, unread (its
                    // log lines, which come before them, kept for a lease being cancelled)
                    Some(Part::SizeBytes(_)) if !held => Incoming::Nothing,
                    Some(Part::Data(_)) if !held => Incoming::Stop,
                    Some(Part::SizeBytes(size)) => Incoming::Size(size),
                    Some(Part::Data(d)) => Incoming::Data(d),
                    None => Incoming::Nothing,
                })
            })
            .await?;
        if lease_id.is_empty() {
            return Err(Error::invalid("lease_id", "missing").into());
        }
        // looked up again: the lease may have ended while the result came
        let Some((task, tiled)) = self.coordinator.scheduler.leased_task(&lease_id) else {
            // a lease being cancelled ends now, not when it lapses
            self.coordinator.scheduler.end_cancelled(&lease_id, log);
            // its lease expired, or its job was cancelled or planned again: the result would be
            // discarded, so it is neither decoded nor stored
            tracing::info!(
                lease_id = lease_id.as_str(),
                accepted = false,
                "task result of a lease no longer held"
            );
            return Ok(Response::new(pb::CompleteTaskResponse { accepted: false }));
        };
        // a whole image's result gets its content's alpha (a tiled job's, once stitched); the alpha first,
        // so that the decoded result is not held while the content's decode waits for the budget
        let alpha = if !tiled && task.scale.is_none() {
            self.coordinator
                .content_alpha_in_budget(&task.content)
                .await?
        } else {
            None
        };
        // the result's size: a tile's or a shard's region, or the content at the task's size
        let expected = match task.scale.as_ref().map(|s| s.rect()) {
            Some(rect) => (rect.width, rect.height),
            None => {
                let (coordinator, content) = (self.coordinator.clone(), task.content.clone());
                let (w, h) = blocking(move || coordinator.dimensions(&content)).await?;
                stylefarm_core::imaging::working_size(w, h, task.params.size)
            }
        };
        let decoded = self.coordinator.decoding.decode(received).await;
        // a result that does not decode, or of another size (it would be the job's, or fail its scale's
        // stitch and the job with it, for good): the attempt fails at once, a strike against its worker,
        // and the task runs again (not left running until its lease lapses)
        let refused = match &decoded {
            Err(Error::Invalid(e)) => Some(e.to_string()),
            Ok((_, img)) if img.dimensions() != expected => {
                let (w, h) = img.dimensions();
                Some(format!(
                    "result: {w}x{h} px, where the task's is {}x{} px",
                    expected.0, expected.1
                ))
            }
            _ => None,
        };
        if let Some(error) = refused {
            tracing::warn!(lease_id = lease_id.as_str(), error, "task result refused");
            let scheduler = self.coordinator.scheduler.clone();
            let failed = error.clone();
            blocking(move || {
                scheduler
                    .fail_with_log(&lease_id, &failed, FailureKind::Retryable, log)
                    .map_err(Error::from)
            })
            .await?;
            return Err(Status::invalid_argument(error));
        }
        let (received, img) = decoded?;
        let coordinator = self.coordinator.clone();
        let lease = lease_id.clone();
        let (hash, completed) = blocking(move || {
            let with_alpha = alpha
                .map(|alpha| stylefarm_core::imaging::png_with_alpha(&img, &alpha))
                .transpose()?;
            let using = coordinator.blobs.begin_use();
            let hash = using
                .put(with_alpha.as_deref().unwrap_or(received.bytes()))
                .map_err(Error::from)?;
            let completed = coordinator
                .scheduler
                .complete_with_log(&lease, &hash, log, warnings)
                .map_err(Error::from)?;
            drop(using);
            // the task's checkpoint, kept for its next attempt, is of no more use
            if let Some(checkpoint) = completed
                .as_ref()
                .and_then(|c| c.dropped_checkpoint.as_ref())
            {
                coordinator.drop_checkpoint_blob(checkpoint);
            }
            Ok((hash, completed))
        })
        .await
        .inspect_err(|e| {
            // recorded in memory, not yet in the store: the worker finds its lease gone when it sends
            // again, and the job's stage work (a stitch, the next frames) is left to the loop's retries
            if matches!(e, Error::Store(_)) {
                let deferred = &self.coordinator.stage_deferred;
                deferred.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })?;
        tracing::info!(
            lease_id = lease_id.as_str(),
            accepted = completed.is_some(),
            result = %hash,
            "task result"
        );
        if let Some(done) = completed.as_ref().filter(|c| c.stage_work) {
            self.coordinator.spawn_stage_work(done.job_id.clone());
        }
        Ok(Response::new(pb::CompleteTaskResponse {
            accepted: completed.is_some(),
        }))
    }

    async fn save_checkpoint(
        &self,
        request: Request<Streaming<pb::SaveCheckpointRequest>>,
    ) -> Result<Response<pb::SaveCheckpointResponse>, Status> {
        let mut lease_id = LeaseId::default();
        let mut received = self.coordinator.receiving.checkpoint();
        let scheduler = &self.coordinator.scheduler;
        // what the task's checkpoints may hold, once its lease is known live
        let mut bounds: Option<CheckpointBounds> = None;
        let too_large = |bounds: &CheckpointBounds, size: u64| {
            Error::invalid(
                "checkpoint",
                format!(
                    "{size} bytes, more than a checkpoint of the task's {}-px image takes ({})",
                    bounds.longest, bounds.max_bytes
                ),
            )
        };
        received
            .receive(request.into_inner(), |msg: pb::SaveCheckpointRequest| {
                use pb::save_checkpoint_request::Part;
                Ok(match msg.part {
                    Some(Part::LeaseId(id)) => {
                        lease_id = id.into();
                        // the checkpoint of a lease no longer held, or of a task not checkpointed,
                        // is answered at once, unread
                        match scheduler.checkpointed_task(&lease_id) {
                            None => Incoming::Stop,
                            Some(spec) => {
                                bounds = Some(spec.checkpoint_bounds());
                                Incoming::Nothing
                            }
                        }
                    }
                    Some(Part::SizeBytes(_) | Part::Data(_)) if lease_id.is_empty() => {
                        return Err(Error::invalid("lease_id", "missing before the checkpoint"));
                    }
                    Some(Part::SizeBytes(size)) => match &bounds {
                        Some(b) if size > b.max_bytes => return Err(too_large(b, size)),
                        _ => Incoming::Size(size),
                    },
                    Some(Part::Data(d)) => Incoming::Data(d),
                    None => Incoming::Nothing,
                })
            })
            .await?;
        if lease_id.is_empty() {
            return Err(Error::invalid("lease_id", "missing").into());
        }
        let Some(bounds) = bounds else {
            return Ok(Response::new(pb::SaveCheckpointResponse {
                accepted: false,
            }));
        };
        let size = received.bytes().len() as u64;
        if size > bounds.max_bytes {
            return Err(too_large(&bounds, size).into());
        }
        let coordinator = self.coordinator.clone();
        let lease = lease_id.clone();
        let saved = blocking(move || {
            // its header only: the values are the worker's to read
            let file = CheckpointFile::header(received.bytes())?;
            bounds.check(file.scale, file.iteration, file.width, file.height)?;
            let using = coordinator.blobs.begin_use();
            let blob = using.put(received.bytes()).map_err(Error::from)?;
            let checkpoint = Checkpoint {
                blob,
                scale: file.scale,
                iteration: file.iteration,
                bytes: size,
            };
            let saved = coordinator
                .scheduler
                .save_checkpoint(&lease, checkpoint.clone())
                .map_err(Error::from)?;
            drop(using);
            // the checkpoint it replaced, or this one when discarded, is of no more use
            Ok(match saved {
                CheckpointSaved::Kept { replaced } => {
                    if let Some(old) = replaced {
                        coordinator.drop_checkpoint_blob(&old);
                    }
                    Some(checkpoint)
                }
                CheckpointSaved::Discarded => {
                    coordinator.drop_checkpoint_blob(&checkpoint);
                    None
                }
            })
        })
        .await?;
        match &saved {
            Some(c) => tracing::info!(
                lease_id = lease_id.as_str(),
                scale = c.scale,
                iteration = c.iteration,
                bytes = size,
                "checkpoint saved"
            ),
            None => tracing::info!(
                lease_id = lease_id.as_str(),
                "checkpoint of a lease no longer held, or of a task not checkpointed: discarded"
            ),
        }
        Ok(Response::new(pb::SaveCheckpointResponse {
            accepted: saved.is_some(),
        }))
    }

    async fn fail_task(
        &self,
        request: Request<pb::FailTaskRequest>,
    ) -> Result<Response<pb::FailTaskResponse>, Status> {
        let mut r = request.into_inner();
        let lease_id = LeaseId::from(r.lease_id);
        if lease_id.is_empty() {
            return Err(Error::invalid("lease_id", "missing").into());
        }
        // kept with the task, its job and every status of them: one line, bounded whatever a worker sends
        r.error = stylefarm_core::task_log::clip_line(&r.error);
        let kind = match pb::FailureKind::try_from(r.kind) {
            Ok(pb::FailureKind::Input) => FailureKind::Permanent,
            Ok(pb::FailureKind::OutOfMemory) => FailureKind::OutOfMemory,
            Ok(pb::FailureKind::Group) => FailureKind::Group,
            // unspecified, or a kind this build does not know: retried
            _ => FailureKind::Retryable,
        };
        tracing::warn!(
            lease_id = lease_id.as_str(),
            error = r.error,
            ?kind,
            "task failed"
        );
        let scheduler = self.coordinator.scheduler.clone();
        let log = r.log.map(SentLines::from).unwrap_or_default();
        blocking(move || {
            scheduler
                .fail_with_log(&lease_id, &r.error, kind, log)
                .map_err(Error::from)
        })
        .await?;
        // a keep-going sweep whose last variant failed: its contact sheet, of the others, is made now
        for job_id in self.coordinator.scheduler.take_stage_due() {
            self.coordinator.spawn_stage_work(job_id);
        }
        Ok(Response::new(pb::FailTaskResponse {}))
    }

    type ExchangeStream = Pin<Box<dyn Stream<Item = Result<pb::ExchangeReply, Status>> + Send>>;

    async fn exchange(
        &self,
        request: Request<Streaming<pb::ExchangeRequest>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        let mut stream = request.into_inner();
        // the header first: the lease is checked before any value is buffered
        let header = match stream.next().await {
            Some(msg) => match stream_message(msg)?.part {
                Some(pb::exchange_request::Part::Header(h)) => h,
                _ => return Err(Error::invalid("header", "must come first").into()),
            },
            None => return Err(Error::invalid("header", "missing").into()),
        };
        let lease = LeaseId::from(header.lease_id);
        let scheduler = self.coordinator.scheduler.clone();
        let of = match scheduler.leased(&lease) {
            Some((job, _, spec)) => match spec.scale.map(|t| (t.scale, t.part)) {
                Some((scale, ScalePart::Shard { index, shards, .. })) => ShardOf {
                    job,
                    scale,
                    index,
                    shards,
                },
                _ => {
                    return Err(Status::failed_precondition(
                        "the lease's task is not a shard of an exact-mode scale",
                    ))
                }
            },
            None => {
                return Err(Status::failed_precondition(
                    "no live lease with that id (it ended, or its job was cancelled)",
                ))
            }
        };
        // before any value is buffered: one call of a lease at a time
        let Some(_calling) = self.coordinator.exchanges.one_call(&lease) else {
            return Err(Status::failed_precondition(
                "a call of this lease is on its way: a shard calls once its previous call has its sums",
            ));
        };
        let (mut parts, mut bytes) = (Parts::new(), 0usize);
        while let Some(msg) = stream.next().await {
            let Some(pb::exchange_request::Part::Data(d)) = stream_message(msg)?.part else {
                return Err(Error::invalid("header", "given twice").into());
            };
            bytes += d.values.len();
            if bytes > MAX_EXCHANGE_BYTES || d.values.len() % 4 != 0 {
                return Err(Error::invalid(
                    "values",
                    format!(
                        "float32 values of at most {} MiB a call",
                        MAX_EXCHANGE_BYTES >> 20
                    ),
                )
                .into());
            }
            let new_key = parts.last().is_none_or(|(key, _)| *key != d.key);
            if new_key && parts.iter().any(|(key, _)| *key == d.key) {
                return Err(Error::invalid("key", format!("part {} given twice", d.key)).into());
            }
            if new_key && parts.len() == MAX_EXCHANGE_PARTS {
                return Err(Error::invalid(
                    "key",
                    format!("at most {MAX_EXCHANGE_PARTS} parts a call"),
                )
                .into());
            }
            stylefarm_proto::exchange::append(&mut parts, d.key, &d.values);
        }
        // waiting for the other shards is not stalling, until the call ends (answered, failed or dropped)
        scheduler.exchanging(&lease, true);
        let _waiting = scopeguard::guard((), |()| scheduler.exchanging(&lease, false));
        let sums = self
            .coordinator
            .exchanges
            .exchange(&of, &lease, header.call, parts, |l| {
                scheduler.leased(l).is_some()
            })
            .await
            .map_err(|e| match e {
                ExchangeError::Restart(m) => Status::aborted(m),
                ExchangeError::Invalid(m) => Status::invalid_argument(m),
            })?;
        let replies: Vec<Result<pb::ExchangeReply, Status>> = sums
            .into_iter()
            .flat_map(|(key, values)| {
                stylefarm_proto::exchange::chunks(&values)
                    .into_iter()
                    .map(move |values| {
                        Ok(pb::ExchangeReply {
                            part: Some(pb::ExchangePart { key, values }),
                        })
                    })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(replies))))
    }

    type DownloadImageStream = ChunkStream;

    async fn download_image(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        Ok(Response::new(
            send_blob(&self.coordinator, request.into_inner().sha256).await?,
        ))
    }

    async fn sign_off(
        &self,
        request: Request<pb::SignOffRequest>,
    ) -> Result<Response<pb::SignOffResponse>, Status> {
        let pb::SignOffRequest {
            worker_id,
            lease_ids,
            lease_request_id,
        } = request.into_inner();
        let worker_id = WorkerId::from(worker_id);
        if worker_id.is_empty() {
            return Err(Error::invalid("worker_id", "missing").into());
        }
        check_worker_id(&worker_id)?;
        if lease_ids.len() > MAX_SIGN_OFF_LEASES {
            let message = format!("{} leases: at most {MAX_SIGN_OFF_LEASES}", lease_ids.len());
            return Err(Error::invalid("lease_ids", message).into());
        }
        let leases: Vec<LeaseId> = lease_ids.into_iter().map(LeaseId::from).collect();
        self.coordinator.workers.left(&worker_id);
        let coordinator = self.coordinator.clone();
        let id = worker_id.clone();
        // the leases it gives up go back now, not when they lapse (a failed expiry is tried again by the
        // coordinator's chore, every 250 ms)
        let released = blocking(move || {
            let released = coordinator
                .scheduler
                .signed_off(&id, &leases, lease_request_id);
            if released > 0 {
                if let Err(e) = coordinator.scheduler.expire() {
                    tracing::warn!(error = %e, "returning a signed-off worker's tasks");
                }
            }
            Ok(released)
        })
        .await?;
        tracing::info!(
            worker_id = worker_id.as_str(),
            leases_given_up = released,
            "worker signed off"
        );
        Ok(Response::new(pb::SignOffResponse {}))
    }
}

/// Refuses a worker's text field (its device, its version) longer than [`MAX_WORKER_TEXT`] bytes, or with a
/// control character (`stylefarm workers` prints it: an escape sequence would drive the operator's
/// terminal), naming it.
fn check_worker_text(field: &'static str, text: &str) -> Result<(), Status> {
    if text.len() > MAX_WORKER_TEXT {
        let message = format!("{} bytes: at most {MAX_WORKER_TEXT}", text.len());
        return Err(Error::invalid(field, message).into());
    }
    if text.contains(char::is_control) {
        return Err(Error::invalid(field, "has a control character").into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    /// A preview is kept when it is a PNG of at most PREVIEW_SIDE px a side by its header: a PNG of a few
    /// bytes declaring more, or bytes that are not a PNG, are left out.
    #[test]
    fn a_preview_past_its_side_or_not_a_png_is_left_out() {
        let png = |w: u32, h: u32| {
            let mut bytes = std::io::Cursor::new(Vec::new());
            image::GrayImage::new(w, h)
                .write_to(&mut bytes, image::ImageFormat::Png)
                .unwrap();
            bytes.into_inner()
        };
        let lease = LeaseId::from("lease-1".to_string());
        let side = stylefarm_core::imaging::PREVIEW_SIDE;
        assert!(checked_preview(png(side, 3), &lease).is_some());
        assert!(checked_preview(png(1, side + 1), &lease).is_none());
        assert!(checked_preview(b"\x89PNG\r\n\x1a\nnot really".to_vec(), &lease).is_none());
        assert!(checked_preview(Vec::new(), &lease).is_none());
    }

    /// A blob's download reads it a chunk at a time as its stream is polled: a stream not read holds a
    /// chunk, not the blob; the chunks are the blob's bytes, in order, [`CHUNK_BYTES`] each but the last.
    #[tokio::test]
    async fn a_download_reads_its_blob_a_chunk_at_a_time() {
        /// The blob's bytes, counting those read.
        struct Counted(
            std::io::Cursor<Vec<u8>>,
            Arc<std::sync::atomic::AtomicUsize>,
        );
        impl std::io::Read for Counted {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Ok(n)
            }
        }
        let blob: Vec<u8> = (0..CHUNK_BYTES * 5 + 7).map(|i| (i % 253) as u8).collect();
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let deleted = Arc::new(std::sync::Mutex::new(Vec::new()));
        let deleting = deleted.clone();
        let delete: DeleteDamaged = Arc::new(move |hash: &ImageHash, bytes| {
            deleting.lock().unwrap().push((hash.clone(), bytes));
            Ok(())
        });
        let mut chunks = BlobChunks::new(
            Box::new(Counted(std::io::Cursor::new(blob.clone()), read.clone())),
            ImageHash::of(&blob),
            delete.clone(),
        );
        let first = chunks.next().await.unwrap().unwrap();
        assert_eq!(first.data.len(), CHUNK_BYTES);
        let held = read.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(held, CHUNK_BYTES, "the first chunk read, not the blob");
        let mut back = first.data;
        let mut sizes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.unwrap();
            sizes.push(chunk.data.len());
            back.extend(chunk.data);
        }
        assert_eq!(
            sizes,
            [CHUNK_BYTES, CHUNK_BYTES, CHUNK_BYTES, CHUNK_BYTES, 7]
        );
        assert!(back == blob);
        assert!(chunks.next().await.is_none(), "ended for good");
        assert!(deleted.lock().unwrap().is_empty());
        // bytes that do not hash to the blob's name: its chunks, then DATA_LOSS, the blob deleted
        let named = ImageHash::of(b"another image");
        let mut chunks = BlobChunks::new(
            Box::new(std::io::Cursor::new(blob.clone())),
            named.clone(),
            delete,
        );
        let mut last = None;
        for _ in 0..7 {
            match chunks.next().await {
                Some(Err(status)) => last = Some(status),
                Some(Ok(chunk)) => assert!(!chunk.data.is_empty()),
                None => break,
            }
        }
        let status = last.expect("the stream failed");
        assert_eq!(status.code(), tonic::Code::DataLoss);
        assert!(status.message().starts_with(&format!(
            "image {named}: the stored copy is damaged ({} bytes that hash to {})",
            blob.len(),
            ImageHash::of(&blob)
        )));
        assert_eq!(*deleted.lock().unwrap(), [(named, blob.len() as u64)]);
        assert!(chunks.next().await.is_none(), "ended for good");
    }

    fn batch() -> stylefarm_core::job::JobSpec {
        stylefarm_core::job::JobSpec::new(
            JobKind::Batch,
            vec![ImageHash::of(b"content")],
            vec![ImageHash::of(b"style")],
            Default::default(),
        )
    }

    /// A status of 10,000 tasks with long labels and errors is clipped to fit a message, every task's
    /// texts to the same length at a character boundary; a status that fits is left whole.
    #[test]
    fn a_status_too_long_for_a_message_has_its_tasks_texts_clipped() {
        let task = |i: u32| pb::TaskStatus {
            index: i,
            label: format!("style_blend={} seed={i}", "é".repeat(300)),
            error: "x".repeat(1024),
            ..Default::default()
        };
        let small = pb::JobStatus {
            tasks: (0..10).map(task).collect(),
            ..Default::default()
        };
        let mut kept = small.clone();
        fit_status(&mut kept, STATUS_BYTES);
        assert_eq!(kept, small);
        let mut large = pb::JobStatus {
            tasks: (0..10_000).map(task).collect(),
            ..Default::default()
        };
        assert!(prost::Message::encoded_len(&large) > MAX_MESSAGE_BYTES);
        fit_status(&mut large, STATUS_BYTES);
        assert!(prost::Message::encoded_len(&large) <= STATUS_BYTES);
        let lengths: std::collections::BTreeSet<_> =
            large.tasks.iter().map(|t| t.error.len()).collect();
        assert_eq!(lengths.len(), 1, "{lengths:?}");
        assert!(large
            .tasks
            .iter()
            .all(|t| t.label.starts_with("style_blend=é")
                && t.label.ends_with('…')
                && t.error.ends_with('…')));
        // as long as the room allows
        assert!(*lengths.first().unwrap() > 100, "{lengths:?}");
        // warnings: each task's first kept, clipped as its other texts are
        let warned = |i: u32| pb::TaskStatus {
            warnings: vec!["w".repeat(1024); 8],
            ..task(i)
        };
        let mut warned = pb::JobStatus {
            tasks: (0..10_000).map(warned).collect(),
            ..Default::default()
        };
        fit_status(&mut warned, STATUS_BYTES);
        assert!(prost::Message::encoded_len(&warned) <= STATUS_BYTES);
        assert!(warned.tasks.iter().all(|t| t.warnings.len() == 1
            && t.warnings[0].ends_with('…')
            && t.warnings[0].len() == t.error.len()));
        // left whole where dropping the later warnings is enough
        let few = |i: u32| pb::TaskStatus {
            index: i,
            warnings: vec!["w".repeat(1024); 8],
            ..Default::default()
        };
        let mut few = pb::JobStatus {
            tasks: (0..1_000).map(few).collect(),
            ..Default::default()
        };
        fit_status(&mut few, STATUS_BYTES);
        assert!(few.tasks.iter().all(|t| t.warnings == ["w".repeat(1024)]));
    }

    fn ids(views: &[impl std::borrow::Borrow<JobView>]) -> Vec<String> {
        views
            .iter()
            .map(|v| v.borrow().meta.id.to_string())
            .collect()
    }

    /// A page ends at its limit or where the next job would pass its byte budget (never empty), and its
    /// token goes on after its last job.
    #[test]
    fn a_list_page_ends_at_its_limit_or_its_bytes_and_says_where_to_go_on() {
        let s = Scheduler::new(Default::default(), Arc::new(MemoryStore::default())).unwrap();
        for _ in 0..5 {
            s.submit(batch(), "").unwrap();
        }
        let all = s.list("", &[], 0, None);
        let none = Waiting::default();
        let page = |before, limit, bytes| list_page(&s, "", (&[], before), &none, limit, bytes);
        let listed = |page: &pb::ListJobsResponse| -> Vec<String> {
            page.jobs.iter().map(|j| j.job_id.clone()).collect()
        };
        // a limit of 2: 2 jobs, and a token
        let first = page(None, 2, usize::MAX);
        assert_eq!(listed(&first), ids(&all[..2]));
        assert_eq!(first.next_page_token, all[1].meta.seq.to_string());
        let token: u64 = first.next_page_token.parse().unwrap();
        let rest = page(Some(token), 3, usize::MAX);
        assert_eq!(listed(&rest), ids(&all[2..]));
        assert!(rest.next_page_token.is_empty());
        // a budget of two and a half jobs holds two
        let one = prost::Message::encoded_len(&job_status(&all[0], none.of(&all[0]))) + 6;
        let two = page(None, 10, one * 5 / 2);
        assert_eq!(two.jobs.len(), 2);
        assert_eq!(two.next_page_token, all[1].meta.seq.to_string());
        // a budget below one job still holds one: the client goes on
        let one = page(None, 10, 1);
        assert_eq!(one.jobs.len(), 1);
        assert_eq!(one.next_page_token, all[0].meta.seq.to_string());
        // the states asked for alone
        let running = list_page(&s, "", (&[JobState::Running], None), &none, 10, usize::MAX);
        assert!(running.jobs.is_empty() && running.next_page_token.is_empty());
    }

    /// A job that changes every 2 ms (a busy farm's heartbeats) for a second makes a watcher an event per
    /// WATCH_EVERY at most, not one per change, and its last event is the job's end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_sends_the_changes_of_a_moment_as_one_event() {
        let s =
            Arc::new(Scheduler::new(Default::default(), Arc::new(MemoryStore::default())).unwrap());
        let (job, _) = s.submit(batch(), "").unwrap();
        let lease = s.lease(&WorkerId::from("w")).unwrap().unwrap().lease_id;
        let (tx, mut rx) = mpsc::channel(16);
        let first = s.get(&job).unwrap();
        tokio::spawn(watch(
            s.clone(),
            Waiting::default,
            job.clone(),
            first,
            false,
            s.subscribe(),
            tx,
        ));
        let started = std::time::Instant::now();
        let changes = tokio::task::spawn_blocking({
            let s = s.clone();
            move || {
                let mut changes = 0;
                while started.elapsed() < Duration::from_secs(1) {
                    s.heartbeat(&lease, &WorkerId::from("w"), None, None)
                        .unwrap();
                    changes += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
                s.complete(&lease, &ImageHash::of(b"result")).unwrap();
                changes
            }
        });
        let mut events = Vec::new();
        while let Some(event) = rx.recv().await {
            events.push(event.unwrap().status.unwrap());
        }
        let (changes, elapsed) = (changes.await.unwrap(), started.elapsed());
        assert!(changes > 100, "{changes} changes");
        // the first, one for each WATCH_EVERY of changes, and the end
        let most = 2 + (elapsed.as_millis() / WATCH_EVERY.as_millis()) as usize;
        assert!(
            (3..=most).contains(&events.len()),
            "{} events for {changes} changes in {elapsed:?}",
            events.len()
        );
        assert_eq!(events[0].state, pb::JobState::Running as i32);
        assert_eq!(events.last().unwrap().state, pb::JobState::Succeeded as i32);
    }

    /// A watch that asks for previews gets each running task's preview once, as it comes (an event with
    /// none while none is new); one that does not ask gets none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_with_previews_sends_each_new_preview_once() {
        let s =
            Arc::new(Scheduler::new(Default::default(), Arc::new(MemoryStore::default())).unwrap());
        let (job, _) = s.submit(batch(), "").unwrap();
        let w = WorkerId::from("w");
        let lease = s.lease(&w).unwrap().unwrap().lease_id;
        let watch_with = |previews| {
            let (tx, rx) = mpsc::channel(16);
            let first = s.get(&job).unwrap();
            let s = s.clone();
            let job = job.clone();
            tokio::spawn(async move {
                let changes = s.subscribe();
                watch(s, Waiting::default, job, first, previews, changes, tx).await
            });
            rx
        };
        let (mut with, mut without) = (watch_with(true), watch_with(false));
        let png = |n: u8| bytes::Bytes::from([b"\x89PNG\r\n\x1a\n".as_slice(), &[n]].concat());
        let beat = |preview: Option<bytes::Bytes>| {
            s.heartbeat(&lease, &w, None, preview).unwrap();
        };
        // every event of a watch: (previews' last bytes) each, once the changes of a moment are sent
        let drain = |rx: &mut mpsc::Receiver<Result<pb::JobEvent, Status>>| {
            let mut events = Vec::new();
            while let Ok(e) = rx.try_recv() {
                let e = e.unwrap();
                assert!(e.previews.iter().all(|p| p.task_index == 0 && p.at_ms > 0));
                events.push(e.previews.iter().map(|p| *p.png.last().unwrap()).collect());
            }
            events
        };
        let settle = || tokio::time::sleep(WATCH_EVERY * 3);
        settle().await;
        beat(Some(png(1)));
        settle().await;
        beat(None);
        settle().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
        beat(Some(png(2)));
        settle().await;
        let events: Vec<Vec<u8>> = drain(&mut with);
        assert_eq!(events.concat(), [1, 2], "{events:?}");
        assert!(events.len() >= 4, "{events:?}");
        assert!(drain(&mut without).iter().all(Vec::is_empty));
    }

    /// A job that does not change is sent again when why it waits does (a worker came), within
    /// WAITING_EVERY, and not otherwise; a client that left ends the watch.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_sends_a_change_of_why_the_job_waits() {
        let s =
            Arc::new(Scheduler::new(Default::default(), Arc::new(MemoryStore::default())).unwrap());
        let (job, _) = s.submit(batch(), "").unwrap();
        let live = Arc::new(std::sync::Mutex::new(Vec::new()));
        let waiting = {
            let live = live.clone();
            move || Waiting {
                live: live.lock().unwrap().clone(),
                ..Default::default()
            }
        };
        let (tx, mut rx) = mpsc::channel(16);
        let first = s.get(&job).unwrap();
        let watching = tokio::spawn(watch(
            s.clone(),
            waiting,
            job,
            first,
            false,
            s.subscribe(),
            tx,
        ));
        let next = |rx: &mut mpsc::Receiver<_>| {
            let event = rx
                .try_recv()
                .map(|e: Result<pb::JobEvent, Status>| e.unwrap());
            event.ok().and_then(|e| e.status).map(|s| s.waiting)
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            next(&mut rx).as_deref(),
            Some("no live worker: it waits for one to register")
        );
        // nothing changed for longer than WAITING_EVERY: no event
        tokio::time::sleep(WAITING_EVERY + Duration::from_millis(500)).await;
        assert_eq!(next(&mut rx), None);
        // a worker came: the job is sent again, not waiting
        live.lock().unwrap().push((WorkerId::from("w"), Vec::new()));
        tokio::time::sleep(WAITING_EVERY + Duration::from_millis(500)).await;
        assert_eq!(next(&mut rx).as_deref(), Some(""));
        drop(rx);
        tokio::time::timeout(WAITING_EVERY * 2, watching)
            .await
            .expect("the watch ends once its client left")
            .unwrap();
    }
}
