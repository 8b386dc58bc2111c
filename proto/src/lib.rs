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
