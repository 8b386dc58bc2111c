#![doc = include_str!("../README.md")]

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

/// Largest gRPC message the project sends or accepts: above every chunk and status, below gRPC's default.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Size of the chunks of image streams.
pub const CHUNK_BYTES: usize = 1 << 20;

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
}
