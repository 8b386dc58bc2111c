//! Memory budgets for the images that come in: uploads and task results.
//!
//! - **Receiving** (`Receiving`): an image arrives in chunks of a MiB and is held whole until it is
//!   stored, within [`RECEIVE_BUDGET_BYTES`] (uploads and results each have their own budget, so clients
//!   cannot crowd out workers; one tenant's uploads hold at most [`TENANT_RECEIVE_BYTES`], so no one
//!   tenant takes it all).
//!   - A request that declares its image's size before the data (`size_bytes`, as the client and the
//!     worker do) has exactly that many bytes set aside at once, or is refused before any data is read:
//!     it is never refused part-way, so a refused image is not sent whole only to be sent again.
//!   - A request that does not (grpcurl, say) takes its bytes as its buffer grows (doubling); a chunk that
//!     finds the budget spent fails at once and holds nothing more.
//!   - Nothing waits for bytes: a stream not read holds its share of its HTTP/2 connection's flow-control
//!     window, and would stall the other images on that connection. So no two half-received images wait
//!     on each other either.
//!   - A refusal is UNAVAILABLE, naming the limit, with a RetryInfo: the client and the worker send the
//!     image again after the delay. A stream that adds no data for [`RECEIVE_IDLE_TIMEOUT`], or whose
//!     bytes fall behind [`RECEIVE_MIN_BYTES_PER_SEC`] after that grace, fails with DEADLINE_EXCEEDED, so
//!     a stalled or trickling sender does not hold its share.
//! - **Decoding** (`DecodeBudget`): a header may declare 16,384 x 16,384 pixels in a hundred bytes, and
//!   decoding such an image takes gigabytes: without a budget, a few such uploads at once would take the
//!   coordinator's memory. Each decode first reads its image's header and waits for its share of
//!   [`DECODE_BUDGET_BYTES`] (FIFO, tokio's semaphore); small images decode many at a time, the largest one
//!   at a time. A result's content decoded for its alpha, and a tiled scale's stitch (its canvas), take
//!   their shares too.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use image::RgbImage;
use stylefarm_core::imaging::{self, MAX_IMAGE_PIXELS};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::{Stream, StreamExt};

use crate::auth::Tenant;
use crate::service::stream_message;
use crate::{blocking, Error};

/// Bytes a pixel of the farm's own images takes in a stitch or a decode (8-bit RGB results, stitched
/// canvases): the canvas or decoded image (3), a result decoded beside it and an oriented copy (6), an
/// alpha (1), with room to spare. An uploaded image's decode takes what its header says
/// ([`imaging::Header::decode_bytes`]).
const BYTES_PER_PIXEL: u64 = 16;

/// The share of the decode budget an image of the farm's own of `width` x `height` takes
/// ([`BYTES_PER_PIXEL`] a pixel).
pub(crate) fn farm_image_bytes(width: u32, height: u32) -> u64 {
    (u64::from(width) * u64::from(height)).saturating_mul(BYTES_PER_PIXEL)
}

/// Decode memory the coordinator's decodes hold at once: one image of the most pixels
/// ([`MAX_IMAGE_PIXELS`]) of the farm's own, 4 GiB. A decode that needs more takes all of it.
pub const DECODE_BUDGET_BYTES: u64 = MAX_IMAGE_PIXELS * BYTES_PER_PIXEL;

const MIB: u64 = 1 << 20;

/// The decode budget: permits of a MiB.
pub(crate) struct DecodeBudget {
    permits: Arc<Semaphore>,
    total_mib: u32,
}

impl Default for DecodeBudget {
    fn default() -> DecodeBudget {
        DecodeBudget::new(DECODE_BUDGET_BYTES)
    }
}

impl DecodeBudget {
    /// A budget of `bytes` (at least a MiB).
    pub(crate) fn new(bytes: u64) -> DecodeBudget {
        let total_mib = u32::try_from(bytes.div_ceil(MIB).max(1)).unwrap_or(u32::MAX >> 3);
        DecodeBudget {
            permits: Arc::new(Semaphore::new(total_mib as usize)),
            total_mib,
        }
    }

    /// The MiB a decode of `bytes` takes of the budget: at least one, at most all of it.
    fn weight(&self, bytes: u64) -> u32 {
        let mib = bytes.div_ceil(MIB);
        u32::try_from(mib)
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_mib)
    }

    /// Waits for the share of the budget that a decode holding `bytes` takes (an uploaded image's
    /// [`imaging::Header::decode_bytes`], or [`BYTES_PER_PIXEL`] a pixel of the farm's own images); the
    /// decode holds it until it ends.
    pub(crate) async fn share(&self, bytes: u64) -> Result<OwnedSemaphorePermit, Error> {
        self.permits
            .clone()
            .acquire_many_owned(self.weight(bytes))
            .await
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// [`DecodeBudget::share`] for work that blocks its thread (a stitch, on the blocking pool, or at
    /// start-up). Run outside tokio's cooperative budget: the start-up's stitches run inside a
    /// `block_on`, whose task's budget, once spent by many acquires, would make each next one return
    /// pending and wake itself at once, for good.
    pub(crate) fn share_blocking(&self, bytes: u64) -> Result<OwnedSemaphorePermit, Error> {
        futures_executor::block_on(tokio::task::unconstrained(self.share(bytes)))
    }

    /// Decodes the bytes received ([`imaging::decode`], on the blocking pool) once its share of the budget
    /// is free; gives them back with the image. Errors name the image (an undecodable header fails before
    /// any wait).
    pub(crate) async fn decode(&self, received: Received) -> Result<(Received, RgbImage), Error> {
        let name = received.name;
        let (received, header) = blocking(move || {
            let header = imaging::header(Cursor::new(received.bytes()), name);
            Ok((received, header))
        })
        .await?;
        let share = self.share(header?.decode_bytes).await?;
        // the share goes with the decode: a request cancelled meanwhile does not give it back before the
        // decode (which cannot be stopped) ends
        let (received, decoded) = blocking(move || {
            let decoded = imaging::decode(received.bytes(), name);
            drop(share);
            Ok((received, decoded))
        })
        .await?;
        Ok((received, decoded?))
    }
}

/// Largest image a client may upload or a worker return, encoded.
pub const MAX_IMAGE_UPLOAD: usize = stylefarm_core::imaging::MAX_ENCODED_BYTES;

/// Encoded bytes that the uploads being received hold at once, and as much again for task results: four
/// of the largest ([`MAX_IMAGE_UPLOAD`]), 2 GiB each.
pub const RECEIVE_BUDGET_BYTES: usize = 4 * MAX_IMAGE_UPLOAD;

/// Encoded bytes that one tenant's uploads hold at once: the upload budget less one of the largest
/// images (1.5 GiB), so that no one tenant takes it all: while one holds its share, another's largest
/// image still fits.
pub const TENANT_RECEIVE_BYTES: usize = RECEIVE_BUDGET_BYTES - MAX_IMAGE_UPLOAD;

/// How long a request's stream may add no data before it fails (DEADLINE_EXCEEDED): a MiB chunk takes
/// this at 140 kbit/s.
pub const RECEIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The slowest an image may come (2 Mbit/s): past [`RECEIVE_IDLE_TIMEOUT`]'s grace, a stream whose bytes
/// fall behind this many a second on average since it began fails (DEADLINE_EXCEEDED). A sender holds its
/// share of the budget (a declared size, or a buffer doubled) only as long as its bytes take at this rate,
/// and must keep sending to hold it.
pub const RECEIVE_MIN_BYTES_PER_SEC: usize = 256 << 10;

/// The receive budgets: one for uploads, shared out among tenants, one for task results, and half as
/// much for checkpoints.
pub(crate) struct Receiving {
    uploads: ReceiveBudget,
    /// Each tenant's share of the uploads ([`TENANT_RECEIVE_BYTES`]), while it has uploads in hand.
    tenants: Mutex<HashMap<Tenant, ReceiveBudget>>,
    tenant_bytes: usize,
    results: ReceiveBudget,
    checkpoints: ReceiveBudget,
}

impl Default for Receiving {
    fn default() -> Receiving {
        Receiving::new(RECEIVE_BUDGET_BYTES, TENANT_RECEIVE_BYTES)
    }
}

impl Receiving {
    /// Budgets of `total` bytes for uploads (`tenant` bytes of them for each tenant), `total` for
    /// results and half of it for checkpoints.
    fn new(total: usize, tenant: usize) -> Receiving {
        Receiving {
            uploads: ReceiveBudget::new(total, "the coordinator's receive budget".into()),
            tenants: Mutex::default(),
            tenant_bytes: tenant,
            results: ReceiveBudget::new(total, "the coordinator's receive budget".into()),
            checkpoints: ReceiveBudget::new(
                total / 2,
                "the coordinator's receive budget for checkpoints".into(),
            ),
        }
    }

    /// An empty buffer for an UploadImage call of `tenant`: from the tenant's share, then the uploads'.
    pub(crate) fn upload(&self, tenant: &Tenant) -> Received {
        let share = {
            let mut tenants = self.tenants.lock().unwrap_or_else(PoisonError::into_inner);
            // a share that only this map holds has no upload in hand
            tenants.retain(|_, share| Arc::strong_count(&share.bytes) > 1);
            tenants
                .entry(tenant.clone())
                .or_insert_with(|| {
                    let whose = match tenant.0.as_str() {
                        "" => "the tenant's share of the receive budget".to_string(),
                        name => format!("tenant {name}'s share of the receive budget"),
                    };
                    ReceiveBudget::new(self.tenant_bytes, whose.into())
                })
                .clone()
        };
        Received::new("image", vec![share, self.uploads.clone()])
    }

    /// An empty buffer for a CompleteTask call.
    pub(crate) fn result(&self) -> Received {
        Received::new("result", vec![self.results.clone()])
    }

    /// An empty buffer for a SaveCheckpoint call: from a budget of its own, so that checkpoints, which a
    /// task can do without, never keep results out.
    pub(crate) fn checkpoint(&self) -> Received {
        Received::new("checkpoint", vec![self.checkpoints.clone()])
    }
}

/// A budget of encoded bytes that requests receiving an image hold at once.
#[derive(Clone)]
struct ReceiveBudget {
    bytes: Arc<Semaphore>,
    total: usize,
    /// What it is, for a busy refusal: "the coordinator's receive budget", "tenant acme's share of it".
    whose: Arc<str>,
}

impl ReceiveBudget {
    /// A budget of `total` bytes.
    fn new(total: usize, whose: Arc<str>) -> ReceiveBudget {
        let total = total.min(Semaphore::MAX_PERMITS);
        ReceiveBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
            whose,
        }
    }

    /// The refusal of an image named `name` that this budget cannot hold now.
    fn busy(&self, name: &str) -> Error {
        Error::Busy(format!(
            "{name}: {} ({} MiB) is spent; send it again shortly",
            self.whose,
            self.total >> 20
        ))
    }

    /// Bytes held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.total - self.bytes.available_permits()
    }
}

/// What a request's message brings to its image's buffer ([`Received::receive`]).
pub(crate) enum Incoming {
    /// A chunk of the image's bytes.
    Data(Vec<u8>),
    /// The image's size in bytes, declared before its data (`size_bytes`).
    Size(u64),
    /// Nothing for the buffer: a field that the handler keeps, or an empty message.
    Nothing,
    /// The rest of the stream is not wanted.
    Stop,
}

/// An image's encoded bytes as they arrive, their memory (the buffer's capacity) held from its budgets
/// until this is dropped.
pub(crate) struct Received {
    bytes: Vec<u8>,
    /// The bytes held from each budget: the buffer's capacity as asked for.
    held: usize,
    /// The budgets, each holding `held` bytes: a tenant's share first, where there is one.
    budgets: Vec<ReceiveBudget>,
    /// The size declared before the data, if one was.
    declared: Option<usize>,
    name: &'static str,
}

impl Received {
    fn new(name: &'static str, budgets: Vec<ReceiveBudget>) -> Received {
        Received {
            bytes: Vec::new(),
            held: 0,
            budgets,
            declared: None,
            name,
        }
    }

    /// The bytes received.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes `more` bytes of every budget, now or not at all ([`Error::Busy`], naming the first budget
    /// spent).
    fn try_hold(&mut self, more: usize) -> Result<(), Error> {
        let n = u32::try_from(more).map_err(|_| self.budgets[0].busy(self.name))?;
        for (i, budget) in self.budgets.iter().enumerate() {
            match budget.bytes.try_acquire_many(n) {
                Ok(permit) => permit.forget(),
                Err(_) => {
                    self.budgets[..i]
                        .iter()
                        .for_each(|b| b.bytes.add_permits(more));
                    return Err(budget.busy(self.name));
                }
            }
        }
        self.held += more;
        Ok(())
    }

    /// Gives `less` bytes back to every budget.
    fn give_back(&mut self, less: usize) {
        self.budgets.iter().for_each(|b| b.bytes.add_permits(less));
        self.held -= less;
    }

    /// Appends `data`, growing the buffer (doubling, up to [`MAX_IMAGE_UPLOAD`]) with the budgets' bytes;
    /// a declared image's bytes were set aside when it was declared. Errors: past [`MAX_IMAGE_UPLOAD`],
    /// INVALID_ARGUMENT naming the image; past the size declared, naming `size_bytes`; a budget spent,
    /// [`Error::Busy`] (UNAVAILABLE).
    pub(crate) fn append(&mut self, data: &[u8]) -> Result<(), Error> {
        let needed = self.bytes.len() + data.len();
        if let Some(declared) = self.declared.filter(|d| needed > *d) {
            return Err(Error::invalid(
                "size_bytes",
                format!("{declared} declared, and more data sent"),
            ));
        }
        if needed > MAX_IMAGE_UPLOAD {
            return Err(self.too_large(""));
        }
        if needed > self.held {
            let grown = needed.max(self.held * 2).min(MAX_IMAGE_UPLOAD);
            self.try_hold(grown - self.held)?;
            self.bytes.reserve_exact(grown - self.bytes.len());
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    /// The refusal of an image past [`MAX_IMAGE_UPLOAD`] (INVALID_ARGUMENT naming it), `what` said of it.
    fn too_large(&self, what: &str) -> Error {
        Error::invalid(
            self.name,
            format!("{what}larger than {} MiB", MAX_IMAGE_UPLOAD >> 20),
        )
    }

    /// Sets aside the bytes of an image of `size` bytes, declared before its data, at once. Errors:
    /// INVALID_ARGUMENT naming `size_bytes` (after data, twice, 0), or the image (past
    /// [`MAX_IMAGE_UPLOAD`]); a budget spent, [`Error::Busy`].
    ///
    /// It does not wait for the bytes: a stream whose data are not read holds its HTTP/2 flow-control
    /// window, which its connection's other streams share, so a wait here would stall the images of the
    /// same connection that hold their bytes.
    fn declare(&mut self, size: u64) -> Result<(), Error> {
        let refuse = |why: String| Err(Error::invalid("size_bytes", why));
        if self.declared.is_some() {
            return refuse("declared twice".into());
        }
        if !self.bytes.is_empty() {
            return refuse("declared after the data".into());
        }
        let size = match usize::try_from(size) {
            Ok(0) => return refuse("0: an image has bytes".into()),
            Ok(size) if size <= MAX_IMAGE_UPLOAD => size,
            _ => return Err(self.too_large(&format!("{size} bytes (size_bytes): "))),
        };
        self.try_hold(size)?;
        self.bytes.reserve_exact(size);
        self.declared = Some(size);
        Ok(())
    }

    /// Receives a request's stream: each message goes to `part`, which says what it brings, until the
    /// stream ends or `part` stops it; then the buffer is cut to its bytes and the rest of its share given
    /// back. Errors: `part`'s; a stream error ([`stream_message`]); no bytes added for
    /// [`RECEIVE_IDLE_TIMEOUT`] (messages without data do not count), or the bytes behind
    /// [`RECEIVE_MIN_BYTES_PER_SEC`] past that grace (DEADLINE_EXCEEDED); a declared size refused
    /// ([`Received::declare`]); fewer bytes than declared (INVALID_ARGUMENT naming `size_bytes`).
    pub(crate) async fn receive<M>(
        &mut self,
        mut stream: impl Stream<Item = Result<M, tonic::Status>> + Unpin,
        mut part: impl FnMut(M) -> Result<Incoming, Error>,
    ) -> Result<(), Error> {
        let started = tokio::time::Instant::now();
        let mut idle = started + RECEIVE_IDLE_TIMEOUT;
        loop {
            // when the bytes so far stop keeping up with the slowest rate, after the idle timeout's grace
            let behind = started
                + RECEIVE_IDLE_TIMEOUT
                + Duration::from_secs_f64(
                    self.bytes.len() as f64 / RECEIVE_MIN_BYTES_PER_SEC as f64,
                );
            let next = tokio::time::timeout_at(idle.min(behind), stream.next())
                .await
                .map_err(|_| {
                    Error::Rpc(tonic::Status::deadline_exceeded(if idle <= behind {
                        format!(
                            "{}: no data received for {} s",
                            self.name,
                            RECEIVE_IDLE_TIMEOUT.as_secs()
                        )
                    } else {
                        format!(
                            "{}: {} bytes in {:.0} s, slower than {} KiB/s",
                            self.name,
                            self.bytes.len(),
                            started.elapsed().as_secs_f64(),
                            RECEIVE_MIN_BYTES_PER_SEC >> 10
                        )
                    }))
                })?;
            let Some(message) = next else {
                break;
            };
            match part(stream_message(message)?)? {
                Incoming::Data(data) if !data.is_empty() => {
                    self.append(&data)?;
                    idle = tokio::time::Instant::now() + RECEIVE_IDLE_TIMEOUT;
                }
                Incoming::Size(size) => self.declare(size)?,
                Incoming::Data(_) | Incoming::Nothing => {}
                Incoming::Stop => return Ok(()),
            }
        }
        if let Some(declared) = self.declared.filter(|d| *d != self.bytes.len()) {
            return Err(Error::invalid(
                "size_bytes",
                format!("{declared} declared, {} received", self.bytes.len()),
            ));
        }
        self.bytes.shrink_to_fit();
        let kept = self.bytes.capacity().min(self.held);
        self.give_back(self.held - kept);
        Ok(())
    }
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("name", &self.name)
            .field("bytes", &self.bytes.len())
            .field("held", &self.held)
            .field("declared", &self.declared)
            .finish()
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        self.give_back(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        RgbImage::new(width, height)
            .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    }

    /// `bytes` as received for an upload, from a budget of their own.
    fn as_received(bytes: Vec<u8>) -> Received {
        let mut received = Receiving::default().upload(&Tenant::default());
        received.append(&bytes).unwrap();
        received
    }

    /// A decode waits while the budget is taken, and goes on once it is given back; the largest image
    /// takes all of it, a small one a MiB, a float image what its header says.
    #[tokio::test]
    async fn a_decode_waits_for_its_share_of_the_budget() {
        let budget = Arc::new(DecodeBudget::default());
        assert_eq!(budget.total_mib, 4096);
        assert_eq!(budget.weight(DECODE_BUDGET_BYTES), 4096);
        assert_eq!(budget.weight(u64::MAX), 4096);
        assert_eq!((budget.weight(0), budget.weight(4 << 20)), (1, 4));
        let held = budget.permits.acquire_many(4096).await.unwrap();
        let b = budget.clone();
        let decode = tokio::spawn(async move { b.decode(as_received(png(64, 48))).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!decode.is_finished(), "it waits for the budget");
        drop(held);
        let (received, img) = decode.await.unwrap().unwrap();
        assert_eq!(
            (img.width(), img.height(), received.bytes().len()),
            (64, 48, png(64, 48).len())
        );
        // a float RGBA TIFF of 256 x 256 takes what its header says its decode takes (44 bytes a pixel:
        // 3 MiB), not 16 bytes a pixel (1 MiB)
        let mut tif = Vec::new();
        image::DynamicImage::ImageRgba32F(image::Rgba32FImage::new(256, 256))
            .write_to(&mut Cursor::new(&mut tif), image::ImageFormat::Tiff)
            .unwrap();
        let held = budget.permits.acquire_many(4094).await.unwrap();
        let b = budget.clone();
        let decode = tokio::spawn(async move { b.decode(as_received(tif)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!decode.is_finished(), "2 MiB free: it waits for 3");
        drop(held);
        let (_, img) = decode.await.unwrap().unwrap();
        assert_eq!(img.dimensions(), (256, 256));
        // a header that is no image's fails at once, budget or not
        let _held = budget.permits.acquire_many(4096).await.unwrap();
        let error = budget
            .decode(as_received(b"not an image".to_vec()))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("image"), "{error}");
    }

    const MIB: usize = 1 << 20;

    /// The stream of a request whose messages are what they bring.
    fn stream(
        parts: impl IntoIterator<Item = Incoming>,
    ) -> impl Stream<Item = Result<Incoming, tonic::Status>> + Unpin {
        tokio_stream::iter(parts.into_iter().map(Ok).collect::<Vec<_>>())
    }

    /// Each message as it is.
    fn as_is(part: Incoming) -> Result<Incoming, Error> {
        Ok(part)
    }

    fn refusal(result: Result<(), Error>) -> tonic::Status {
        tonic::Status::from(result.unwrap_err())
    }

    /// A stitch's share, taken on a blocking thread, waits for the budget as a decode's does: a canvas
    /// of the most pixels takes all of it.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_share_taken_on_a_blocking_thread_waits_for_the_budget() {
        let budget = Arc::new(DecodeBudget::default());
        let held = budget.permits.clone().acquire_many_owned(1).await.unwrap();
        let b = budget.clone();
        let stitch = tokio::task::spawn_blocking(move || {
            b.share_blocking(farm_image_bytes(16_384, 16_384))
                .map(|s| s.num_permits())
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!stitch.is_finished(), "it waits for the whole budget");
        drop(held);
        assert_eq!(stitch.await.unwrap().unwrap(), 4096);
        assert_eq!(budget.permits.available_permits(), 4096);
    }

    /// A buffer takes the budget's bytes as it grows (doubling, its capacity what it holds) and gives them
    /// back when dropped; a chunk that finds the budget spent fails at once (UNAVAILABLE with a RetryInfo,
    /// naming the image and the limit) and takes nothing, while the other buffers keep theirs; past the
    /// largest image is INVALID_ARGUMENT, whatever the budget.
    #[test]
    fn a_buffer_past_the_receive_budget_is_refused_and_holds_nothing_more() {
        let receiving = Receiving::new(3 * MIB, 3 * MIB);
        let budget = &receiving.results;
        let chunk = vec![7u8; MIB];
        let mut a = receiving.result();
        a.append(&chunk).unwrap();
        assert_eq!((budget.held(), a.bytes.capacity()), (MIB, MIB));
        a.append(&chunk[..10]).unwrap();
        assert_eq!(
            (budget.held(), a.bytes.capacity()),
            (2 * MIB, 2 * MIB),
            "doubled"
        );
        a.append(&chunk[10..]).unwrap();
        assert_eq!((a.bytes().len(), budget.held()), (2 * MIB, 2 * MIB));
        let mut b = receiving.result();
        b.append(&chunk).unwrap();
        assert_eq!(budget.held(), 3 * MIB);
        let status = refusal(b.append(&[1]));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            stylefarm_proto::retry_delay(&status),
            Some(crate::BUSY_RETRY_DELAY)
        );
        assert_eq!(
            status.message(),
            "result: the coordinator's receive budget (3 MiB) is spent; send it again shortly"
        );
        assert_eq!(budget.held(), 3 * MIB, "the refused chunk took nothing");
        drop(b);
        assert_eq!(budget.held(), 2 * MIB);
        // what a is given back, b gets
        let mut b = receiving.result();
        b.append(&chunk).unwrap();
        assert!(b.append(&[1]).is_err());
        drop(a);
        b.append(&[1]).unwrap();
        assert_eq!(budget.held(), 2 * MIB);
        drop(b);
        assert_eq!(budget.held(), 0);
        // (a zeroed allocation: its pages are not touched)
        let error = refusal(receiving.result().append(&vec![0u8; MAX_IMAGE_UPLOAD + 1]));
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert_eq!(error.message(), "result: larger than 512 MiB");
        assert_eq!(budget.held(), 0);
    }

    /// A tenant's uploads hold at most its share of the upload budget (refused past it, naming the
    /// tenant), so the others find room; results have a budget of their own; a share without uploads in
    /// hand is forgotten.
    #[test]
    fn a_tenant_holds_at_most_its_share_of_the_uploads() {
        let receiving = Receiving::new(4 * MIB, 3 * MIB);
        let (acme, other) = (Tenant("acme".into()), Tenant::default());
        let chunk = vec![1u8; MIB];
        let mut a = receiving.upload(&acme);
        a.append(&vec![1u8; 2 * MIB]).unwrap();
        let mut a2 = receiving.upload(&acme);
        a2.append(&chunk).unwrap();
        let busy = refusal(receiving.upload(&acme).append(&[1]));
        assert_eq!(busy.code(), tonic::Code::Unavailable);
        assert_eq!(
            busy.message(),
            "image: tenant acme's share of the receive budget (3 MiB) is spent; send it again shortly"
        );
        let mut b = receiving.upload(&other);
        b.append(&chunk).unwrap();
        // the uploads' budget is spent; the results' is not
        let busy = refusal(receiving.upload(&Tenant("third".into())).append(&[1]));
        assert!(
            busy.message()
                .starts_with("image: the coordinator's receive budget (4 MiB) is spent"),
            "{}",
            busy.message()
        );
        receiving.result().append(&vec![1u8; 4 * MIB]).unwrap();
        assert_eq!(receiving.uploads.held(), 4 * MIB);
        drop((a, a2));
        assert_eq!(receiving.uploads.held(), MIB);
        let busy = refusal(receiving.upload(&other).append(&vec![1u8; 3 * MIB]));
        assert!(busy
            .message()
            .starts_with("image: the tenant's share of the receive budget (3 MiB)"));
        drop(b);
        let _c = receiving.upload(&other);
        let tenants = receiving.tenants.lock().unwrap();
        assert_eq!(tenants.keys().collect::<Vec<_>>(), [&other]);
    }

    /// A declared size is set aside at once, before any data, and exactly; one that does not fit is
    /// refused at once (UNAVAILABLE, before its data is read) holding nothing; a size declared after the
    /// data, twice, of 0 or past the largest image, and data that do not add up to it, are
    /// INVALID_ARGUMENT naming `size_bytes`.
    #[tokio::test]
    async fn a_declared_size_is_set_aside_at_once_or_refused_before_its_data() {
        let receiving = Receiving::new(4 * MIB, 4 * MIB);
        let held = || receiving.results.held();
        let data = |n: usize| Incoming::Data(vec![9u8; n]);
        let size = |n: usize| Incoming::Size(n as u64);
        let mut a = receiving.result();
        a.receive(stream([size(3 * MIB)]), as_is).await.unwrap_err();
        drop(a);
        assert_eq!(
            held(),
            0,
            "fewer bytes than declared: refused, and nothing held"
        );
        let mut a = receiving.result();
        a.declare(3 * MIB as u64).unwrap();
        assert_eq!(held(), 3 * MIB, "set aside before any data");
        a.receive(stream([data(2 * MIB), data(MIB)]), as_is)
            .await
            .unwrap();
        assert_eq!(
            (a.bytes().len(), a.bytes.capacity(), held()),
            (3 * MIB, 3 * MIB, 3 * MIB)
        );

        // b's 2 MiB do not fit beside a's 3: refused at its declaration, its data unread
        let mut b = receiving.result();
        let mut read = 0;
        let busy = refusal(
            b.receive(stream([size(2 * MIB), data(MIB), data(MIB)]), |part| {
                read += 1;
                Ok(part)
            })
            .await,
        );
        assert_eq!(
            (busy.code(), read, held()),
            (tonic::Code::Unavailable, 1, 3 * MIB)
        );
        assert!(
            busy.message().contains("(4 MiB) is spent"),
            "{}",
            busy.message()
        );
        drop((a, b));
        assert_eq!(held(), 0);

        for (parts, message) in [
            (
                vec![data(1), size(1)],
                "size_bytes: declared after the data",
            ),
            (vec![size(2), size(2)], "size_bytes: declared twice"),
            (vec![size(0)], "size_bytes: 0: an image has bytes"),
            (
                vec![size(MAX_IMAGE_UPLOAD + 1)],
                "result: 536870913 bytes (size_bytes): larger than 512 MiB",
            ),
            (
                vec![size(2), data(3)],
                "size_bytes: 2 declared, and more data sent",
            ),
            (vec![size(3), data(2)], "size_bytes: 3 declared, 2 received"),
        ] {
            let mut r = receiving.result();
            let error = refusal(r.receive(stream(parts), as_is).await);
            assert_eq!(
                (error.code(), error.message()),
                (tonic::Code::InvalidArgument, message)
            );
            drop(r);
            assert_eq!(held(), 0);
        }
    }

    /// A stream's messages go to the handler's closure until it ends or the closure stops it; the buffer
    /// then gives back what it holds past its bytes. A stream that adds no bytes for the idle timeout
    /// (messages without data do not count) fails, DEADLINE_EXCEEDED naming the image; one whose chunks
    /// come 40 s apart does not.
    #[tokio::test(start_paused = true)]
    async fn a_stream_without_data_for_the_idle_timeout_fails_and_gives_its_bytes_back() {
        use tokio_stream::StreamExt as _;
        let receiving = Receiving::default();
        let budget = &receiving.results;
        let append = |chunk: Vec<u8>| Ok(Incoming::Data(chunk));
        let chunks = || tokio_stream::iter([Ok(vec![1u8; 3]), Ok(vec![2u8; 2])]);
        let mut received = receiving.result();
        received.receive(chunks(), append).await.unwrap();
        assert_eq!(received.bytes(), [1, 1, 1, 2, 2]);
        assert_eq!(budget.held(), 5, "6 held while receiving, 5 kept");
        drop(received);

        // data, then empty messages every 30 s: no data for 60 s
        let start = tokio::time::Instant::now();
        let empty = tokio_stream::iter(std::iter::repeat_with(|| Ok(Vec::new())))
            .throttle(Duration::from_secs(30));
        let mut received = receiving.result();
        let error = received
            .receive(Box::pin(chunks().chain(empty)), append)
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), RECEIVE_IDLE_TIMEOUT);
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(status.message(), "result: no data received for 60 s");
        assert_eq!(received.bytes(), [1, 1, 1, 2, 2]);
        drop(received);
        assert_eq!(budget.held(), 0);

        // three chunks of 16 MiB 40 s apart, and the end 40 s after the last: 120 s in all, never 60 s
        // without data, and never behind 256 KiB/s after the first 60 s
        let start = tokio::time::Instant::now();
        let big = || tokio_stream::iter((1..=3u8).map(|i| Ok(vec![i; 16 << 20])));
        let slow = big().throttle(Duration::from_secs(40));
        let mut received = receiving.result();
        received.receive(Box::pin(slow), append).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(120));
        assert_eq!(received.bytes().len(), 48 << 20);
        drop(received);

        // the same bytes in chunks of 100 KiB 50 s apart are never 60 s without data, but fall behind
        // 256 KiB/s: 200 KiB by 60.78 s
        let start = tokio::time::Instant::now();
        let trickle = tokio_stream::iter(std::iter::repeat_with(|| Ok(vec![1u8; 100 << 10])))
            .throttle(Duration::from_secs(50));
        let mut received = receiving.result();
        let error = received
            .receive(Box::pin(trickle), append)
            .await
            .unwrap_err();
        // (within the timer's millisecond)
        let late = start.elapsed().as_secs_f64() - (60.0 + 200.0 / 256.0);
        assert!((0.0..0.002).contains(&late), "{late}");
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "result: 204800 bytes in 61 s, slower than 256 KiB/s"
        );
        drop(received);
        assert_eq!(budget.held(), 0);

        // the closure's stop ends the receiving; the rest is not read
        let mut received = receiving.result();
        let mut first = true;
        received
            .receive(chunks(), |chunk| {
                Ok(if std::mem::take(&mut first) {
                    Incoming::Data(chunk)
                } else {
                    Incoming::Stop
                })
            })
            .await
            .unwrap();
        assert_eq!(received.bytes(), [1, 1, 1]);

        // a transport error passes on
        let broken = tokio_stream::iter([Err::<Vec<u8>, _>(tonic::Status::cancelled("gone"))]);
        let error = received.receive(broken, append).await.unwrap_err();
        assert_eq!(tonic::Status::from(error).code(), tonic::Code::Cancelled);
    }
}
