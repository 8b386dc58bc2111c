//! Memory budgets for the images that come in: uploads and task results.
//!
//! - **Receiving** (`ReceiveBudget`): an image arrives in chunks of a MiB and is held whole until it is
//!   stored. Each request's buffer takes its share of [`RECEIVE_BUDGET_BYTES`] as it grows (uploads and
//!   results each have their own budget, so clients cannot crowd out workers). A request whose next chunk
//!   finds the budget spent fails at once with UNAVAILABLE, naming the limit, and holds nothing more: it
//!   is retried with backoff (the client and the worker do), and no two half-received images wait on each
//!   other. A stream that adds no data for [`RECEIVE_IDLE_TIMEOUT`] fails with DEADLINE_EXCEEDED, so a
//!   stalled sender does not hold its share.
//! - **Decoding** (`DecodeBudget`): a header may declare 16,384 x 16,384 pixels in a hundred bytes, and
//!   decoding such an image takes gigabytes: without a budget, a few such uploads at once would take the
//!   coordinator's memory. Each decode first reads its image's header and waits for its share of
//!   [`DECODE_BUDGET_BYTES`] (FIFO, tokio's semaphore); small images decode many at a time, the largest one
//!   at a time.

use std::io::Cursor;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use image::RgbImage;
use stylefarm_core::imaging::{self, MAX_IMAGE_PIXELS};
use tokio::sync::Semaphore;
use tokio_stream::{Stream, StreamExt};

use crate::service::stream_message;
use crate::{blocking, Error};

/// Bytes a decode may hold a pixel: a 16-bit RGBA buffer (8), the 8-bit RGB image (3), its alpha (1) and
/// an oriented copy (3), rounded up.
const BYTES_PER_PIXEL: u64 = 16;

/// Decode memory the coordinator's decodes hold at once: one image of the most pixels
/// ([`MAX_IMAGE_PIXELS`]), 4 GiB.
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

    /// The MiB a decode of `pixels` pixels takes of the budget: at least one, at most all of it.
    fn weight(&self, pixels: u64) -> u32 {
        let mib = pixels.saturating_mul(BYTES_PER_PIXEL).div_ceil(MIB);
        u32::try_from(mib)
            .unwrap_or(u32::MAX)
            .clamp(1, self.total_mib)
    }

    /// Decodes the bytes received ([`imaging::decode`], on the blocking pool) once its share of the budget
    /// is free; gives them back with the image. Errors name the image (an undecodable header fails before
    /// any wait).
    pub(crate) async fn decode(&self, received: Received) -> Result<(Received, RgbImage), Error> {
        let name = received.name;
        let (received, size) = blocking(move || {
            let size = imaging::dimensions(Cursor::new(received.bytes()), name);
            Ok((received, size))
        })
        .await?;
        let (width, height) = size?;
        let share = self
            .permits
            .clone()
            .acquire_many_owned(self.weight(u64::from(width) * u64::from(height)))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
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
pub const MAX_IMAGE_UPLOAD: usize = 512 << 20;

/// Encoded bytes that the uploads being received hold at once, and as much again for task results: four
/// of the largest ([`MAX_IMAGE_UPLOAD`]), 2 GiB each.
pub const RECEIVE_BUDGET_BYTES: usize = 4 * MAX_IMAGE_UPLOAD;

/// How long a request's stream may add no data before it fails (DEADLINE_EXCEEDED): a MiB chunk takes
/// this at 140 kbit/s.
pub const RECEIVE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The receive budgets: one for uploads, one for task results.
#[derive(Default)]
pub(crate) struct Receiving {
    /// UploadImage's.
    pub(crate) uploads: ReceiveBudget,
    /// CompleteTask's.
    pub(crate) results: ReceiveBudget,
}

/// A budget of encoded bytes that requests receiving an image hold at once ([`RECEIVE_BUDGET_BYTES`]).
#[derive(Clone)]
pub(crate) struct ReceiveBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

impl Default for ReceiveBudget {
    fn default() -> ReceiveBudget {
        ReceiveBudget::new(RECEIVE_BUDGET_BYTES)
    }
}

impl ReceiveBudget {
    /// A budget of `total` bytes.
    pub(crate) fn new(total: usize) -> ReceiveBudget {
        let total = total.min(Semaphore::MAX_PERMITS);
        ReceiveBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// An empty buffer for an image named `name` (`image`, `result`) that takes its memory from this
    /// budget.
    pub(crate) fn buffer(&self, name: &'static str) -> Received {
        Received {
            bytes: Vec::new(),
            held: 0,
            budget: self.clone(),
            name,
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.total - self.bytes.available_permits()
    }
}

/// An image's encoded bytes as they arrive, their memory (the buffer's capacity) held from a
/// [`ReceiveBudget`] until this is dropped.
pub(crate) struct Received {
    bytes: Vec<u8>,
    /// The budget's bytes held: the buffer's capacity as asked for.
    held: usize,
    budget: ReceiveBudget,
    name: &'static str,
}

impl Received {
    /// The bytes received.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Appends `data`, growing the buffer (doubling, up to [`MAX_IMAGE_UPLOAD`]) with the budget's bytes.
    /// Errors: past [`MAX_IMAGE_UPLOAD`], INVALID_ARGUMENT naming the image; the budget spent,
    /// [`Error::Busy`] (UNAVAILABLE).
    pub(crate) fn append(&mut self, data: &[u8]) -> Result<(), Error> {
        let needed = self.bytes.len() + data.len();
        if needed > MAX_IMAGE_UPLOAD {
            return Err(Error::invalid(
                self.name,
                format!("larger than {} MiB", MAX_IMAGE_UPLOAD >> 20),
            ));
        }
        if needed > self.held {
            let grown = needed.max(self.held * 2).min(MAX_IMAGE_UPLOAD);
            let more = grown - self.held;
            let permit = u32::try_from(more)
                .ok()
                .and_then(|n| self.budget.bytes.try_acquire_many(n).ok())
                .ok_or_else(|| {
                    Error::Busy(format!(
                        "{}: the coordinator is receiving as many bytes as it holds at once ({} MiB); \
                         send it again shortly",
                        self.name,
                        self.budget.total >> 20
                    ))
                })?;
            permit.forget();
            self.held = grown;
            self.bytes.reserve_exact(grown - self.bytes.len());
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    /// Receives a request's stream: each message goes to `part` with this buffer, until the stream ends
    /// or `part` breaks; then the buffer is cut to its bytes and the rest of its share given back.
    /// Errors: `part`'s; a stream error ([`stream_message`]); no bytes added for [`RECEIVE_IDLE_TIMEOUT`]
    /// (messages without data do not count).
    pub(crate) async fn receive<M>(
        &mut self,
        mut stream: impl Stream<Item = Result<M, tonic::Status>> + Unpin,
        mut part: impl FnMut(&mut Received, M) -> Result<ControlFlow<()>, Error>,
    ) -> Result<(), Error> {
        let mut deadline = tokio::time::Instant::now() + RECEIVE_IDLE_TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, stream.next())
                .await
                .map_err(|_| {
                    Error::Rpc(tonic::Status::deadline_exceeded(format!(
                        "{}: no data received for {} s",
                        self.name,
                        RECEIVE_IDLE_TIMEOUT.as_secs()
                    )))
                })?;
            let Some(message) = next else {
                break;
            };
            let before = self.bytes.len();
            if part(self, stream_message(message)?)?.is_break() {
                break;
            }
            if self.bytes.len() > before {
                deadline = tokio::time::Instant::now() + RECEIVE_IDLE_TIMEOUT;
            }
        }
        self.bytes.shrink_to_fit();
        let kept = self.bytes.capacity().min(self.held);
        self.budget.bytes.add_permits(self.held - kept);
        self.held = kept;
        Ok(())
    }
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("name", &self.name)
            .field("bytes", &self.bytes.len())
            .field("held", &self.held)
            .finish()
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        self.budget.bytes.add_permits(self.held);
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
        let mut received = ReceiveBudget::default().buffer("image");
        received.append(&bytes).unwrap();
        received
    }

    /// A decode waits while the budget is taken, and goes on once it is given back; the largest image
    /// takes all of it, a small one a MiB.
    #[tokio::test]
    async fn a_decode_waits_for_its_share_of_the_budget() {
        let budget = Arc::new(DecodeBudget::default());
        assert_eq!(budget.total_mib, 4096);
        assert_eq!(budget.weight(MAX_IMAGE_PIXELS), 4096);
        assert_eq!(budget.weight(u64::MAX), 4096);
        assert_eq!((budget.weight(0), budget.weight(512 * 512)), (1, 4));
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
        // a header that is no image's fails at once, budget or not
        let _held = budget.permits.acquire_many(4096).await.unwrap();
        let error = budget
            .decode(as_received(b"not an image".to_vec()))
            .await
            .unwrap_err();
        assert!(error.to_string().contains("image"), "{error}");
    }

    /// A buffer takes the budget's bytes as it grows (doubling, its capacity what it holds) and gives them
    /// back when dropped; a chunk that finds the budget spent fails at once (UNAVAILABLE with a RetryInfo,
    /// naming the image and the limit) and takes nothing, while the other buffers keep theirs; past the
    /// largest image is INVALID_ARGUMENT, whatever the budget.
    #[test]
    fn a_buffer_past_the_receive_budget_is_refused_and_holds_nothing_more() {
        const MIB: usize = 1 << 20;
        let budget = ReceiveBudget::new(3 * MIB);
        let chunk = vec![7u8; MIB];
        let mut a = budget.buffer("image");
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
        let mut b = budget.buffer("result");
        b.append(&chunk).unwrap();
        assert_eq!(budget.held(), 3 * MIB);
        let busy = b.append(&[1]).unwrap_err();
        assert!(matches!(busy, Error::Busy(_)), "{busy:?}");
        let status = tonic::Status::from(busy);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            stylefarm_proto::retry_delay(&status),
            Some(crate::BUSY_RETRY_DELAY)
        );
        assert!(
            status.message().starts_with("result: ") && status.message().contains("(3 MiB)"),
            "{}",
            status.message()
        );
        assert_eq!(budget.held(), 3 * MIB, "the refused chunk took nothing");
        drop(b);
        assert_eq!(budget.held(), 2 * MIB);
        // what a is given back, b gets
        let mut b = budget.buffer("result");
        b.append(&chunk).unwrap();
        assert!(b.append(&[1]).is_err());
        drop(a);
        b.append(&[1]).unwrap();
        assert_eq!(budget.held(), 2 * MIB);
        drop(b);
        assert_eq!(budget.held(), 0);
        // (a zeroed allocation: its pages are not touched)
        let error = budget
            .buffer("image")
            .append(&vec![0u8; MAX_IMAGE_UPLOAD + 1])
            .unwrap_err();
        let error = tonic::Status::from(error);
        assert_eq!(error.code(), tonic::Code::InvalidArgument);
        assert_eq!(error.message(), "image: larger than 512 MiB");
        assert_eq!(budget.held(), 0);
    }

    /// A stream's messages go to the handler's closure until it ends or the closure breaks; the buffer
    /// then gives back what it holds past its bytes. A stream that adds no bytes for the idle timeout
    /// (messages without data do not count) fails, DEADLINE_EXCEEDED naming the image; one whose chunks
    /// come 40 s apart does not.
    #[tokio::test(start_paused = true)]
    async fn a_stream_without_data_for_the_idle_timeout_fails_and_gives_its_bytes_back() {
        use tokio_stream::StreamExt as _;
        let budget = ReceiveBudget::default();
        let append =
            |r: &mut Received, chunk: Vec<u8>| r.append(&chunk).map(|()| ControlFlow::Continue(()));
        let chunks = || tokio_stream::iter([Ok(vec![1u8; 3]), Ok(vec![2u8; 2])]);
        let mut received = budget.buffer("image");
        received.receive(chunks(), append).await.unwrap();
        assert_eq!(received.bytes(), [1, 1, 1, 2, 2]);
        assert_eq!(budget.held(), 5, "6 held while receiving, 5 kept");
        drop(received);

        // data, then empty messages every 30 s: no data for 60 s
        let start = tokio::time::Instant::now();
        let empty = tokio_stream::iter(std::iter::repeat_with(|| Ok(Vec::new())))
            .throttle(Duration::from_secs(30));
        let mut received = budget.buffer("image");
        let error = received
            .receive(Box::pin(chunks().chain(empty)), append)
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), RECEIVE_IDLE_TIMEOUT);
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(status.message(), "image: no data received for 60 s");
        assert_eq!(received.bytes(), [1, 1, 1, 2, 2]);
        drop(received);
        assert_eq!(budget.held(), 0);

        // three chunks 40 s apart, and the end 40 s after the last: 120 s in all, never 60 s without data
        let start = tokio::time::Instant::now();
        let slow = chunks()
            .chain(tokio_stream::iter([Ok(vec![3u8])]))
            .throttle(Duration::from_secs(40));
        let mut received = budget.buffer("image");
        received.receive(Box::pin(slow), append).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(120));
        assert_eq!(received.bytes(), [1, 1, 1, 2, 2, 3]);

        // a closure's break ends the receiving; the rest is not read
        let mut received = budget.buffer("image");
        received
            .receive(chunks(), |r, chunk| {
                r.append(&chunk)?;
                Ok(ControlFlow::Break(()))
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
