//! stylefarm-core: the domain of stylefarm, free of libtorch; the wire format appears only in [`wire`].
//!
//! - [`params`]: render parameters with ALGORITHM.md's defaults and their validation;
//! - [`imaging`]: image decoding and encoding with limits, working sizes, antialiased resampling, and the
//!   original-colours transfer;
//! - [`job`]: the farm's jobs (single, batch, sweep, tiled) and the tasks they expand into;
//! - [`memory`]: the device memory a render needs, which the tiled planner sizes tiles by;
//! - [`tiling`]: the plan of a tiled render (scales, tiles with overlap), feathered stitching, the seam measure;
//! - [`wire`]: conversion from and to the protocol's types, with errors naming the field.

pub mod imaging;
pub mod job;
pub mod memory;
pub mod params;
pub mod tiling;
pub mod wire;

pub use params::{ImageSize, Init, Layer, Optimizer, Pooling, RenderParams};

/// Errors of the domain: a bad value (naming its field) or an unusable image (naming its file).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter is out of range or unknown; `field` names it as the user wrote it.
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    /// An image could not be read, decoded or written.
    #[error("{path}: {message}")]
    Image { path: String, message: String },
}

impl Error {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            message: message.into(),
        }
    }

    pub fn image(path: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        Error::Image {
            path: path.to_string(),
            message: message.to_string(),
        }
    }
}
