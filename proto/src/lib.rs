#![doc = include_str!("../README.md")]

pub mod compat;
pub mod connect;
pub mod exchange;

/// The generated messages, clients and servers of `stylefarm.v1`.
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub, rustdoc::all)]
pub mod pb {
    tonic::include_proto!("stylefarm.v1");
}

/// The encoded file descriptor set of `stylefarm.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("stylefarm_descriptor");

/// The revision of the render protocol this build speaks: the number of lines of `proto/protocol.lock`,
/// which lists every field and enum value a coordinator has ever sent its workers (those of the messages
/// that WorkerService answers with, nested ones included), added to and never taken from. build.rs refuses
/// to build while the proto file has one that the lock lacks, and names the lines to append; so adding such
/// a field (a render option, a part of a task's spec) raises the revision, and a coordinator refuses workers
/// older than itself (RegisterWorkerRequest.protocol) rather than lease them tasks whose new fields they
/// would drop without an error (protobuf skips unknown fields). Workers newer than their coordinator are
/// taken: they read every field it sends. So a farm is upgraded workers first. Revisions are one line of
/// history: two branches that each add a field are not told apart by it.
pub mod protocol {
    include!(concat!(env!("OUT_DIR"), "/protocol.rs"));
}
pub use protocol::PROTOCOL;
// The revision never goes below one that workers have spoken: 70 at 8436533, the first build with the
// check (coordinators take workers at or above their own). A line taken from protocol.lock fails here.
const _: () = assert!(
    PROTOCOL >= 70,
    "proto/protocol.lock lost lines: the render protocol went below 70"
);

/// Largest gRPC message the project sends or accepts: above every chunk and status, below gRPC's default.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Size of the chunks of image streams.
pub const CHUNK_BYTES: usize = 1 << 20;
/// The most images one FindImages call asks about: a job's most images of a kind
/// (`stylefarm_core::job::MAX_IMAGES_PER_JOB`); each is a look in the blob store (an S3 HEAD).
pub const MAX_FIND_IMAGES: usize = 1_000;
/// What SubmitJob's INVALID_ARGUMENT says of an image the coordinator does not hold (`<field>: image
/// <sha256> was not uploaded`): a client that took it for held (FindImages) uploads it and submits again.
pub const NOT_UPLOADED: &str = "was not uploaded";

/// How long a worker tries to report a task's outcome (encoding and sending a large result included)
/// before it gives up and lets the lease lapse; as long, past `--task-stall-secs`, the coordinator waits
/// for the result of a task whose render has ended.
pub const REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// The bytes of a blob streamed in [`pb::Chunk`]s (DownloadImage, DownloadResult), in order, at most
/// `max_bytes` of them (the largest the blob can be: an image's limit, a checkpoint's size): a stream
/// that goes on past them fails OUT_OF_RANGE as it does, before it takes the caller's memory; the status
/// of the stream when it fails.
pub async fn chunks_bytes(
    mut stream: tonic::Streaming<pb::Chunk>,
    max_bytes: u64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        if (bytes.len() as u64).saturating_add(chunk.data.len() as u64) > max_bytes {
            return Err(tonic::Status::out_of_range(format!(
                "the blob sent is more than the {max_bytes} bytes it can be"
            )));
        }
        bytes.extend(chunk.data);
    }
    Ok(bytes)
}

/// A server's answer that it is too busy to take the request now: UNAVAILABLE with gRPC's `RetryInfo`
/// detail (google.rpc.RetryInfo, the richer error model) asking the caller to send it again after `delay`.
pub fn retry_later(message: impl Into<String>, delay: std::time::Duration) -> tonic::Status {
    use tonic_types::{ErrorDetails, StatusExt};
    tonic::Status::with_error_details(
        tonic::Code::Unavailable,
        message,
        ErrorDetails::with_retry_info(Some(delay)),
    )
}

/// How long `status` asks its caller to wait before sending the request again ([`retry_later`]); `None`
/// when it does not ask.
pub fn retry_delay(status: &tonic::Status) -> Option<std::time::Duration> {
    use tonic_types::StatusExt;
    status.get_details_retry_info()?.retry_delay
}

/// Whether `status` is the server's answer that it cannot serve the request now (UNAVAILABLE: its store
/// or blob store out of reach, or busy), not a transport error (which also comes as UNAVAILABLE, with the
/// transport's error as its source): a request to send again on the same connection.
pub fn answered_unavailable(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && std::error::Error::source(status).is_none()
}

/// A caller's waits between tries of a call that failed and may succeed later (the coordinator out of
/// reach for a while, or busy: [`retry_later`]): exponential with jitter (backon's), 0.25 s doubling up
/// to 2.5 s, each plus a random share of up to itself: 0.25 to 0.5 s first, then 0.5 to 1 s, ..., 2.5 to
/// 5 s ([`Backoff::MAX`]) from the fifth on. The jitter spreads the tries of many workers that lost their
/// coordinator at one moment, where equal waits would bring them back at the same instants.
#[derive(Debug)]
pub struct Backoff {
    waits: backon::ExponentialBackoff,
}

impl Default for Backoff {
    fn default() -> Backoff {
        use backon::BackoffBuilder as _;
        let waits = backon::ExponentialBuilder::default()
            .with_min_delay(Self::MAX / 20)
            .with_max_delay(Self::MAX / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build();
        Backoff { waits }
    }
}

impl Backoff {
    /// The longest of the backoff's own waits.
    pub const MAX: std::time::Duration = std::time::Duration::from_secs(5);

    /// The next wait.
    pub fn next_wait(&mut self) -> std::time::Duration {
        // without_max_times: the waits go on
        self.waits.next().unwrap_or(Self::MAX).min(Self::MAX)
    }

    /// The next wait before sending again a request that got `status`, an [`answered_unavailable`] one:
    /// the next of the backoff's own waits, or the delay it asks for ([`retry_later`]) when longer.
    pub fn wait_after(&mut self, status: &tonic::Status) -> std::time::Duration {
        let asked = retry_delay(status).unwrap_or_default();
        self.next_wait().max(asked)
    }

    /// How long to wait before sending again the request that got `status`: the delay it asks for
    /// ([`retry_later`]), or the next wait when longer; `None` when the status does not ask for it to be
    /// sent again (a failure for the caller to handle), and the backoff is left as it was.
    pub fn wait_for(&mut self, status: &tonic::Status) -> Option<std::time::Duration> {
        let asked = retry_delay(status)?;
        Some(self.next_wait().max(asked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A busy answer carries its delay as gRPC's RetryInfo detail; another status asks for none.
    #[test]
    fn a_retry_later_status_carries_its_delay() {
        let busy = retry_later("busy", Duration::from_millis(1500));
        assert_eq!(
            (busy.code(), busy.message()),
            (tonic::Code::Unavailable, "busy")
        );
        assert_eq!(retry_delay(&busy), Some(Duration::from_millis(1500)));
        assert_eq!(retry_delay(&tonic::Status::unavailable("down")), None);
    }

    /// Each wait's bounds: 0.25 s doubling up to 2.5 s, and up to as much again.
    const BASES: [f64; 7] = [0.25, 0.5, 1.0, 2.0, 2.5, 2.5, 2.5];

    fn within_bounds(waits: &[Duration], at_least: f64) -> bool {
        waits.iter().zip(BASES).all(|(wait, base)| {
            let (wait, low) = (wait.as_secs_f64(), base.max(at_least));
            wait >= low && wait <= (2.0 * base).max(at_least) + 1e-6
        })
    }

    /// A failed call's waits: 0.25 s doubling up to 2.5 s, each plus up to as much again, at most 5 s; two
    /// callers' waits differ (the jitter).
    #[test]
    fn the_backoff_doubles_up_to_its_longest_with_jitter() {
        let waits = || {
            let mut backoff = Backoff::default();
            (0..7).map(|_| backoff.next_wait()).collect::<Vec<_>>()
        };
        let (one, other) = (waits(), waits());
        assert!(within_bounds(&one, 0.0), "{one:?}");
        assert!(within_bounds(&other, 0.0), "{other:?}");
        assert_ne!(one, other, "jittered");
        assert!(one.iter().all(|w| *w <= Backoff::MAX));
    }

    /// The backoff waits the delay asked for or its own, when longer; a status that does not ask gets no
    /// wait, and leaves the backoff as it was.
    #[test]
    fn a_busy_answer_waits_the_delay_it_asks_or_the_backoff_s() {
        let mut backoff = Backoff::default();
        let busy = retry_later("busy", Duration::from_secs(1));
        let waits: Vec<_> = (0..7).map(|_| backoff.wait_for(&busy).unwrap()).collect();
        assert!(within_bounds(&waits, 1.0), "{waits:?}");
        let mut fresh = Backoff::default();
        assert_eq!(fresh.wait_for(&tonic::Status::unavailable("down")), None);
        let first = fresh.next_wait().as_secs_f64();
        assert!((0.25..=0.5).contains(&first), "{first}");
    }
}
