//! An engine: VGG19 on one device, loaded once and reused for any number of renders, with how it runs there
//! ([`EngineOptions`]), its warm-up and its health probe.

use std::path::Path;

use stylefarm_core::Layer;
use tch::{Device, Kind, Tensor};

use crate::loss::gram;
use crate::objective::to_f64s;
use crate::vgg::Vgg19;
use crate::Error;

/// VGG19 on one device, loaded once and reused for any number of renders.
pub struct Engine {
    vgg: Vgg19,
    device: Device,
    /// [`EngineOptions::cpu_memory_bytes`], as given.
    cpu_memory: Option<u64>,
    /// The machine's memory, read at load on a CPU ([`machine_memory_bytes`]); `None` on a GPU.
    machine_memory: Option<u64>,
}

/// The memory of this machine in bytes, or its cgroup's limit where that is lower (a container's); `None`
/// when it cannot be read (the `sysinfo` crate).
pub fn machine_memory_bytes() -> Option<u64> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory();
    let total = match sys.cgroup_limits() {
        Some(limits) if limits.total_memory > 0 => limits.total_memory.min(sys.total_memory()),
        _ => sys.total_memory(),
    };
    (total > 0).then_some(total)
}

/// How an engine runs on its device: choices of speed that leave the objective as it is (within float
/// rounding), and on a CPU the memory a render may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Activations and weights in the channels-last (NHWC) layout ([`Vgg19::set_channels_last`]).
    pub channels_last: bool,
    /// Convolutions in TensorFloat-32 on GPUs that have it ([`Vgg19::set_tf32`]). `false` holds the
    /// forward convolutions to float32; their backward follows libtorch's global cuDNN flag (TF32 unless
    /// the process has NVIDIA_TF32_OVERRIDE=0, which the CLI sets for `--tf32 false`).
    pub tf32: bool,
    /// Whether cuDNN times its algorithms for each new input shape and keeps the fastest
    /// (`torch.backends.cudnn.benchmark`), or takes its heuristics' choice at once
    /// ([`Vgg19::set_cudnn_benchmark`]).
    /// The timing costs start-up time per shape, and PyTorch gives the trial algorithms a workspace as
    /// large as the device's free memory allows (aten/src/ATen/native/cudnn/Conv_v8.cpp,
    /// `get_available_workspace`). No effect on a CPU.
    pub cudnn_benchmark: bool,
    /// On a CPU, the most memory one render may take by stylefarm's estimate, in bytes (a worker's or
    /// `render`'s `--device-memory`); `None`: the machine's ([`machine_memory_bytes`]). See
    /// [`Engine::memory_bytes`]. No effect on a GPU, whose allocator `--device-memory` caps.
    pub cpu_memory_bytes: Option<u64>,
}

impl Default for EngineOptions {
    /// The channels-last layout and TF32 convolutions, each chosen by measurement on an H200 and on this
    /// project's CPU (BENCHMARKS.md, "Issue 10's figures on the H200"); cuDNN's autotuner on, as since the
    /// engine's first version, until `bench/gpu.sh`'s run with it off decides. gpu.sh times each option
    /// against these.
    fn default() -> EngineOptions {
        EngineOptions {
            channels_last: true,
            tf32: true,
            cudnn_benchmark: true,
            cpu_memory_bytes: None,
        }
    }
}

impl Engine {
    /// Loads the weights onto `device`, with the default [`EngineOptions`].
    pub fn load(weights: &Path, device: Device) -> Result<Engine, Error> {
        Self::load_with(weights, device, EngineOptions::default())
    }

    /// Loads the weights onto `device`, to run with `options`.
    pub fn load_with(
        weights: &Path,
        device: Device,
        options: EngineOptions,
    ) -> Result<Engine, Error> {
        if let Device::Cuda(_) = device {
            // the global flag, which the convolutions' backward (at::convolution_backward) reads
            tch::Cuda::cudnn_set_benchmark(options.cudnn_benchmark);
        }
        let mut vgg = Vgg19::load(weights, device)?;
        vgg.set_channels_last(options.channels_last)?;
        vgg.set_tf32(options.tf32);
        vgg.set_cudnn_benchmark(options.cudnn_benchmark);
        let machine_memory = match device {
            Device::Cpu => machine_memory_bytes(),
            _ => None,
        };
        Ok(Engine {
            vgg,
            device,
            cpu_memory: options.cpu_memory_bytes,
            machine_memory,
        })
    }

    /// The options the engine runs with, as read back from its network.
    pub fn options(&self) -> EngineOptions {
        EngineOptions {
            channels_last: self.vgg.channels_last(),
            tf32: self.vgg.tf32(),
            cudnn_benchmark: self.vgg.cudnn_benchmark(),
            cpu_memory_bytes: self.cpu_memory,
        }
    }

    /// Runs the objective's work once on a small image (forward through every layer to relu5_4, Gram
    /// matrices, backward) so that the device's one-time costs (CUDA context, cuDNN and cuBLAS handles,
    /// the allocator's first blocks) are paid before the first task rather than inside it. With the
    /// autotuner on ([`EngineOptions::cudnn_benchmark`]), cuDNN still tunes each new input shape once, on
    /// first use, and keeps the choice for the process.
    pub fn warm_up(&self) -> Result<(), Error> {
        let layers: Vec<Layer> = Layer::all().collect();
        let x =
            Tensor::f_zeros([1, 3, 64, 64], (Kind::Float, self.device))?.set_requires_grad(true);
        let features = self
            .vgg
            .features(&x, stylefarm_core::Pooling::Max, &layers)?;
        let total = features
            .iter()
            .map(|f| gram(f).f_sum(Kind::Float))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .fold(Tensor::f_zeros([], (Kind::Float, self.device))?, |a, b| {
                a + b
            });
        let grads = Tensor::f_run_backward(&[&total], &[&x], false, false)?;
        to_f64s(&grads[0].f_sum(Kind::Float)?)?;
        Ok(())
    }

    /// The device the weights live on, where every render of this engine runs.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The most memory a render on this engine may take, in bytes: on a CPU
    /// [`EngineOptions::cpu_memory_bytes`], else the machine's memory ([`machine_memory_bytes`], read at
    /// load); `None` (no bound) on a GPU, whose allocator fails an allocation past its memory cleanly,
    /// and where the memory cannot be read. A render whose estimate
    /// ([`stylefarm_core::memory::render_bytes`]) is larger fails at once, as out of memory
    /// ([`Error::OutOfMemory`]), rather than being killed by the kernel's OOM killer once its pages are
    /// touched, minutes in.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.machine_memory
            .map(|machine| self.cpu_memory.unwrap_or(machine))
    }

    /// The machine's memory, on a CPU: what the process' renders share ([`crate::budget`]).
    pub(crate) fn machine_memory(&self) -> Option<u64> {
        self.machine_memory
    }

    /// The loaded VGG19 network.
    pub fn vgg(&self) -> &Vgg19 {
        &self.vgg
    }

    /// Whether the engine still renders: a 16 x 16 image through VGG19's first convolution on the device,
    /// read back to the host (e.g. after a failure, to tell a bad task from a lost device).
    pub fn probe(&self) -> Result<(), Error> {
        let x = Tensor::f_zeros([1, 3, 16, 16], (Kind::Float, self.device))?;
        let f = self
            .vgg
            .features(&x, stylefarm_core::Pooling::Max, &[Layer::new(1, 1)])?;
        to_f64s(&f[0].f_sum(Kind::Float)?)?;
        Ok(())
    }
}
