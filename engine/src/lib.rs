#![doc = include_str!("../README.md")]

mod budget;
pub mod cancel;
mod engine;
pub mod flow;
pub mod loss;
pub mod objective;
pub mod optim;
pub mod render;
pub mod shard;
pub mod tile;
pub mod vgg;

pub use engine::{machine_memory_bytes, Engine, EngineOptions};
pub use objective::blocked::BlockedTargets;
pub use objective::{LossTerms, StyleGrams, Targets};
pub use render::{Checkpointing, PreviousFrameImages, Progress, RenderJob, Snapshots};
pub use tch::Device;
pub use vgg::{Preprocessing, Vgg19};

/// Errors of the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The weights file is missing, unreadable or not VGG19's.
    #[error("weights {path}: {message}")]
    Weights {
        /// The weights file's path.
        path: String,
        /// What is wrong with it: the reader's error, or the tensor or metadata that does not fit VGG19.
        message: String,
    },
    /// A device string that is not cpu, cuda, cuda:N or auto, or a device that is not there.
    #[error("device: {0}")]
    Device(String),
    /// A bad parameter or image (from stylefarm-core).
    #[error(transparent)]
    Core(#[from] stylefarm_core::Error),
    /// An input the engine cannot take, found at the network's door: the backstop of the size checks made
    /// before any tensor work (`RenderParams::check_sizes`, which name the option).
    #[error("input: {0}")]
    Input(String),
    /// libtorch failed (out of memory among others); shown without the C++ stack trace its exceptions
    /// carry ([`without_stack_trace`]). Not its error's `source`: an error's chain (anyhow's `{:#}`,
    /// `with_sources`) would show the trace again.
    #[error("libtorch: {}", without_stack_trace(&.0.to_string()))]
    Torch(tch::TchError),
    /// The progress callback asked to stop.
    #[error("cancelled")]
    Cancelled,
    /// The render needs more memory than the engine may take, by stylefarm's estimate
    /// ([`Engine::memory_bytes`]): found before the render starts. The message names the field (`size`,
    /// `style_scale` or `style_size`, `evaluate`).
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The shards of an exact-mode scale could not add up their parts ([`shard::Exchange`]): another shard
    /// failed or started again, or the coordinator is out of reach. Not the input's fault, nor the
    /// worker's.
    #[error("shard exchange: {0}")]
    Exchange(String),
}

impl From<tch::TchError> for Error {
    fn from(e: tch::TchError) -> Self {
        Error::Torch(e)
    }
}

impl Error {
    /// True when the task's input caused the error (a bad parameter or image): another attempt, on any
    /// worker, fails the same way.
    pub fn is_input_fault(&self) -> bool {
        matches!(self, Error::Core(_) | Error::Input(_))
    }

    /// True when libtorch ran out of memory on the device (retryable elsewhere, not the job's fault).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::OutOfMemory(_) => true,
            Error::Torch(e) => is_out_of_memory_message(&e.to_string()),
            _ => false,
        }
    }
}

/// Whether libtorch's error `message` says an allocation failed: CUDA's allocator says "out of memory",
/// libtorch's CPU allocator "can't allocate memory" or "not enough memory". Also for a panic's message:
/// tch's infallible calls (`Tensor::zeros`, the operators) panic with libtorch's error, which is the same
/// out of memory.
pub fn is_out_of_memory_message(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    [
        "out of memory",
        "can't allocate memory",
        "not enough memory",
    ]
    .iter()
    .any(|m| message.contains(m))
}

/// libtorch's error `message` without the C++ stack trace that its exceptions carry after what failed
/// ("Exception raised from ...", "frame #0: ...", as c10::Error::what() gives them; in a panic's message
/// the newlines before them are escaped): kilobytes of frames in a task's error say nothing to its user.
pub fn without_stack_trace(message: &str) -> &str {
    let cut = ["Exception raised from", "frame #0"]
        .iter()
        .filter_map(|marker| message.find(marker))
        .min()
        .unwrap_or(message.len());
    let mut kept = message[..cut].trim_end();
    while let Some(rest) = kept.strip_suffix("\\n") {
        kept = rest.trim_end();
    }
    kept
}

/// The CUDA device a device name asks for, read without libtorch (so before CUDA starts): `cuda` and `gpu`
/// are `cuda:0`, `cuda:N` is N; `None` for any other name (`cpu`, `auto`, a wrong one).
pub fn named_cuda_index(s: &str) -> Option<usize> {
    match s {
        "cuda" | "gpu" => Some(0),
        other => other.strip_prefix("cuda:")?.parse().ok(),
    }
}

/// Parses `cpu`, `cuda`, `cuda:N` or `auto` (the first GPU when libtorch sees one, else the CPU), and checks
/// that the device exists.
pub fn parse_device(s: &str) -> Result<Device, Error> {
    let device = match s {
        "cpu" => return Ok(Device::Cpu),
        "auto" => return Ok(Device::cuda_if_available()),
        other => named_cuda_index(other).ok_or_else(|| {
            Error::Device(format!(
                "unknown device '{s}' (expected cpu, cuda, cuda:N or auto)"
            ))
        })?,
    };
    let count = tch::Cuda::device_count() as usize;
    if device >= count {
        return Err(Error::Device(format!(
            "{s} requested but libtorch sees {count} CUDA device(s) (CPU build of libtorch, or no GPU)"
        )));
    }
    Ok(Device::Cuda(device))
}

#[cfg(test)]
mod tests {
    #[test]
    fn devices_parse() {
        assert_eq!(super::parse_device("cpu").unwrap(), tch::Device::Cpu);
        let err = super::parse_device("tpu").unwrap_err().to_string();
        assert!(err.starts_with("device:") && err.contains("tpu"), "{err}");
        if !tch::Cuda::is_available() {
            assert!(super::parse_device("cuda:0").is_err());
            assert_eq!(super::parse_device("auto").unwrap(), tch::Device::Cpu);
        }
        let named: Vec<_> = ["cuda", "gpu", "cuda:3", "cpu", "auto", "cuda:x", "cuda:"]
            .map(super::named_cuda_index)
            .into();
        assert_eq!(named, [Some(0), Some(0), Some(3), None, None, None, None]);
    }

    #[test]
    fn out_of_memory_is_recognized_on_cuda_and_cpu() {
        let torch = |m: &str| super::Error::Torch(tch::TchError::Torch(m.into()));
        assert!(torch("CUDA out of memory. Tried to allocate 2.00 GiB").is_out_of_memory());
        assert!(torch(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes"
        )
        .is_out_of_memory());
        assert!(!torch("Expected 4D input").is_out_of_memory());
        // the engine's own estimate, before the render: a worker fails the task as out of memory
        assert!(super::Error::OutOfMemory("size: ...".into()).is_out_of_memory());
        // PyTorch 2's CPU allocator, as a panic of tch's infallible call carries it (escaped newlines)
        let panicked = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at \
            alloc_cpu.cpp:127] data. DefaultCPUAllocator: not enough memory: you tried to allocate \
            4294967296 bytes.\\nframe #0: c10::ThrowEnforceNotMet(char const*, int, char const*, \
            std::string const&, void const*) + 0x55 (0x7f in libc10.so)\\nframe #1: ...\")";
        assert!(torch(panicked).is_out_of_memory());
        let shown = torch(panicked).to_string();
        assert!(
            shown.ends_with("you tried to allocate 4294967296 bytes.") && !shown.contains("frame"),
            "{shown}"
        );
        // nor in the error's chain, as a command prints it (its sources after it)
        assert!(std::error::Error::source(&torch(panicked)).is_none());
        let raised =
            "Expected 4D input\nException raised from check at conv.cpp:12 (most recent call \
            first):\nframe #0: c10::Error::Error() + 0x1";
        assert_eq!(super::without_stack_trace(raised), "Expected 4D input");
        assert_eq!(super::without_stack_trace("no frames"), "no frames");
        assert!(!super::Error::Input("out of memory".into()).is_out_of_memory());
    }
}
