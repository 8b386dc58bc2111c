#![doc = include_str!("../README.md")]

pub mod checkpoint;
pub mod ids;
pub mod imaging;
pub mod job;
pub mod memory;
pub mod params;
pub mod progress;
pub mod task_log;
pub mod tiling;
pub mod wire;

pub use params::{ImageSize, Init, Layer, Optimizer, Pooling, RenderParams};

/// The message of a caught panic (`std::panic::catch_unwind`'s payload): its `String` or `&str`, else a
/// phrase saying it had none.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Errors of the domain: a bad value (naming its field) or an unusable image (naming its file).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A parameter is out of range or unknown; `field` names it as the user wrote it.
    #[error("{field}: {message}")]
    Invalid {
        /// The option or field at fault, spelled as the user wrote it (e.g. `style_blend`, `sweep`).
        field: &'static str,
        /// What is wrong with the value, for a person to read.
        message: String,
    },
    /// An image could not be read, decoded or written.
    #[error("{path}: {message}")]
    Image {
        /// The image's file path, or the name it goes by when decoded from memory (e.g. its sha256).
        path: String,
        /// What went wrong: the decoder's, reader's or encoder's message, or the limit exceeded.
        message: String,
    },
}

impl Error {
    /// What is wrong, without the field or path it is about (the message of [`Error::Invalid`] and
    /// [`Error::Image`]): for a caller that names the field its own way (the argument parser, its flag).
    pub fn reason(&self) -> &str {
        match self {
            Error::Invalid { message, .. } | Error::Image { message, .. } => message,
        }
    }

    /// An [`Error::Invalid`] for the value of `field`.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            message: message.into(),
        }
    }

    /// An [`Error::Image`] for the image at `path` (any displayable path or name).
    pub fn image(path: impl std::fmt::Display, message: impl std::fmt::Display) -> Self {
        Error::Image {
            path: path.to_string(),
            message: message.to_string(),
        }
    }
}
