//! How much memory a worker's device has, reported when it registers so that the coordinator can size a
//! tiled job's tiles for it ([`stylefarm_core::tiling::Tiling::scale_tile_size`]).
//!
//! - CUDA: the device's total memory from the driver API (`cuDeviceTotalMem_v2` in libcuda.so.1, the
//!   NVIDIA driver's library, loaded at run time: a CPU build links no CUDA library for it);
//! - CPU: the machine's memory, or the cgroup's limit when the worker runs in a container with one
//!   (the `sysinfo` crate).

use stylefarm_engine::Device;

/// The total memory of `device` in bytes; `None` when it cannot be read (the worker then reports 0,
/// "unknown", and the coordinator plans its tiles by the job's tile size).
pub(crate) fn total_memory(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(index) => cuda_total_memory(index).map_err(|e| {
            tracing::warn!(error = e, device = index, "cannot read the GPU's memory");
        }),
        _ => stylefarm_engine::machine_memory_bytes().ok_or(()),
    }
    .ok()
}

/// The memory in use now, in bytes, for the metrics and the coordinator's status page (sampled by
/// [`MemorySampler`] for each lease request and heartbeat): on a CPU the worker process's resident set; on a GPU
/// the device's used memory as NVML reports it ([`cuda_used_memory`]: `nvmlDeviceGetMemoryInfo_v2` in
/// libnvidia-ml.so.1, the driver's management library, through nvml-wrapper: every process's allocations
/// on the device, libtorch's cache included).
/// `None` when it cannot be read.
pub(crate) fn memory_in_use(device: Device) -> Option<u64> {
    match device {
        Device::Cuda(index) => cuda_used_memory(index)
            .map_err(|e| {
                tracing::debug!(
                    error = e,
                    device = index,
                    "cannot read the GPU's memory in use"
                )
            })
            .ok(),
        _ => {
            let pid = sysinfo::get_current_pid().ok()?;
            let mut sys = sysinfo::System::new().ok()?;
            sys.refresh_processes_specifics(
                sysinfo::ProcessesToUpdate::Some(&[pid]),
                false,
                sysinfo::ProcessRefreshKind::nothing().with_memory(),
            );
            sys.process(pid).map(sysinfo::Process::memory)
        }
    }
}

/// How often [`MemorySampler`] reads the memory in use.
const MEMORY_SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The memory in use ([`memory_in_use`]), read every [`MEMORY_SAMPLE_INTERVAL`] on a thread of its own,
/// so that a slow read (NVML initializing, a sick GPU) never holds up a lease request or a heartbeat,
/// which send the last reading. The thread ends once every handle is dropped.
#[derive(Clone)]
pub(crate) struct MemorySampler(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl MemorySampler {
    pub(crate) fn start(device: Device) -> MemorySampler {
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let weak = std::sync::Arc::downgrade(&bytes);
        let spawned = std::thread::Builder::new()
            .name("memory-sampler".into())
            .spawn(move || loop {
                let reading = memory_in_use(device).unwrap_or(0);
                let Some(bytes) = weak.upgrade() else { return };
                bytes.store(reading, std::sync::atomic::Ordering::Relaxed);
                drop(bytes);
                std::thread::sleep(MEMORY_SAMPLE_INTERVAL);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the memory sampler: memory in use unreported");
        }
        MemorySampler(bytes)
    }

    /// The last reading, bytes; 0 before the first or when it cannot be read.
    pub(crate) fn bytes(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The process' NVML (nvml-wrapper's, which loads libnvidia-ml.so.1 at run time), initialized once it
/// could be (a failure, e.g. a driver still loading, is tried again at the next sample), or why it cannot
/// be had.
fn nvml() -> Result<&'static nvml_wrapper::Nvml, String> {
    static NVML: std::sync::OnceLock<nvml_wrapper::Nvml> = std::sync::OnceLock::new();
    if let Some(nvml) = NVML.get() {
        return Ok(nvml);
    }
    let loaded = nvml_wrapper::Nvml::init().map_err(|e| format!("NVML: {e}"))?;
    // two samples that initialized it at once: one is kept (the other shuts its reference down)
    Ok(NVML.get_or_init(|| loaded))
}

/// The memory in use on CUDA device `index`, as NVML reports it. NVML numbers the GPUs in PCI order,
/// whatever `CUDA_VISIBLE_DEVICES` and `CUDA_DEVICE_ORDER` say, where CUDA (and libtorch) numbers those it
/// is shown: the device is found by the PCI bus id that the driver API gives CUDA's `index`.
fn cuda_used_memory(index: usize) -> Result<u64, String> {
    static BUS_IDS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let bus_ids = match BUS_IDS.get() {
        Some(ids) => ids,
        None => {
            let ids = cuda_devices()?.into_iter().map(|d| d.pci_bus_id).collect();
            BUS_IDS.get_or_init(|| ids)
        }
    };
    let bus_id = bus_ids.get(index).ok_or_else(|| {
        format!(
            "cuda:{index} is not among the {} GPU(s) the driver sees",
            bus_ids.len()
        )
    })?;
    let device = (nvml()?.device_by_pci_bus_id(bus_id.as_str()))
        .map_err(|e| format!("NVML: the GPU at PCI {bus_id}: {e}"))?;
    let memory =
        (device.memory_info()).map_err(|e| format!("NVML: memory of PCI {bus_id}: {e}"))?;
    Ok(memory.used)
}

/// `CUresult` of the driver API: 0 is success.
type CuResult = std::os::raw::c_int;

fn cuda_total_memory(index: usize) -> Result<u64, String> {
    let totals = gpu_total_memories()?;
    totals.get(index).copied().ok_or_else(|| {
        format!(
            "cuda:{index} is not among the {} GPU(s) the driver sees",
            totals.len()
        )
    })
}

/// `CUDA_ERROR_NO_DEVICE`: the driver is there, no GPU is (or none is visible).
const CUDA_ERROR_NO_DEVICE: CuResult = 100;

/// The total memory of each GPU the NVIDIA driver sees (`CUDA_VISIBLE_DEVICES` applies, as for libtorch), in
/// bytes, in the driver's order (`cuda:0` first); empty without a driver or a GPU. It asks the driver API
/// (libcuda.so.1, loaded at run time and kept loaded), which makes no CUDA context and leaves libtorch's
/// allocator unstarted, so it may run before [`cuda_memory_limit`]'s setting is made. An error says what
/// failed in a driver that is there.
pub fn gpu_total_memories() -> Result<Vec<u64>, String> {
    Ok(cuda_devices()?.into_iter().map(|d| d.total_bytes).collect())
}

/// A GPU as the driver API sees it ([`cuda_devices`]).
struct CudaDevice {
    /// Its memory, bytes.
    total_bytes: u64,
    /// Its PCI bus id, `domain:bus:device.function` in hexadecimal (`0000:3b:00.0`): how NVML finds it.
    pci_bus_id: String,
}

/// Each GPU the NVIDIA driver sees, in CUDA's order ([`gpu_total_memories`]); empty without a driver or a
/// GPU.
fn cuda_devices() -> Result<Vec<CudaDevice>, String> {
    let check = |what: &str, r: CuResult| {
        if r == 0 {
            Ok(())
        } else {
            Err(format!("{what} returned CUresult {r}"))
        }
    };
    // SAFETY: libcuda.so.1 is NVIDIA's driver library; the five symbols have these C signatures in every
    // driver since CUDA 4.1 (cuda.h: CUresult cuInit(unsigned int), cuDeviceGetCount(int*),
    // cuDeviceGet(CUdevice*, int), cuDeviceTotalMem_v2(size_t*, CUdevice), cuDeviceGetPCIBusId(char*,
    // int, CUdevice) with CUdevice an int, the last writing a NUL-terminated string of at most its length);
    // the library is never unloaded (below), so it stays loaded while they are called and after.
    unsafe {
        let Ok(lib) = libloading::Library::new("libcuda.so.1") else {
            return Ok(Vec::new());
        };
        let init: libloading::Symbol<'_, unsafe extern "C" fn(std::os::raw::c_uint) -> CuResult> =
            lib.get(b"cuInit\0").map_err(|e| e.to_string())?;
        let device_count: libloading::Symbol<
            '_,
            unsafe extern "C" fn(*mut std::os::raw::c_int) -> CuResult,
        > = lib.get(b"cuDeviceGetCount\0").map_err(|e| e.to_string())?;
        let device_get: libloading::Symbol<
            '_,
            unsafe extern "C" fn(*mut std::os::raw::c_int, std::os::raw::c_int) -> CuResult,
        > = lib.get(b"cuDeviceGet\0").map_err(|e| e.to_string())?;
        let total_mem: libloading::Symbol<
            '_,
            unsafe extern "C" fn(*mut usize, std::os::raw::c_int) -> CuResult,
        > = lib
            .get(b"cuDeviceTotalMem_v2\0")
            .map_err(|e| e.to_string())?;
        let bus_id: libloading::Symbol<
            '_,
            unsafe extern "C" fn(
                *mut std::os::raw::c_char,
                std::os::raw::c_int,
                std::os::raw::c_int,
            ) -> CuResult,
        > = lib
            .get(b"cuDeviceGetPCIBusId\0")
            .map_err(|e| e.to_string())?;
        let devices = match init(0) {
            CUDA_ERROR_NO_DEVICE => Ok(Vec::new()),
            r => check("cuInit", r).and_then(|()| {
                let mut count: std::os::raw::c_int = 0;
                check("cuDeviceGetCount", device_count(&mut count))?;
                (0..count)
                    .map(|ordinal| {
                        let mut device: std::os::raw::c_int = 0;
                        check("cuDeviceGet", device_get(&mut device, ordinal))?;
                        let mut bytes: usize = 0;
                        check("cuDeviceTotalMem_v2", total_mem(&mut bytes, device))?;
                        let mut id = [0 as std::os::raw::c_char; 64];
                        check(
                            "cuDeviceGetPCIBusId",
                            bus_id(id.as_mut_ptr(), id.len() as std::os::raw::c_int, device),
                        )?;
                        let pci_bus_id = std::ffi::CStr::from_ptr(id.as_ptr())
                            .to_string_lossy()
                            .into_owned();
                        Ok(CudaDevice {
                            total_bytes: bytes as u64,
                            pci_bus_id,
                        })
                    })
                    .collect()
            }),
        };
        // an initialized driver unloaded before libtorch loads it again would be initialized twice
        std::mem::forget(lib);
        devices
    }
}

/// The key of PyTorch's CUDA caching allocator setting that caps a process's device memory at a fraction of
/// each device's total (`torch.cuda.set_per_process_memory_fraction` in Python; the pinned PyTorch 2.11
/// reads it from the environment).
const MEMORY_FRACTION_KEY: &str = "per_process_memory_fraction";

/// An environment variable to set, before libtorch first allocates on a GPU, so that its caching allocator
/// holds the process to the device memory its workers report: [`cuda_memory_limit`].
#[derive(Debug, Clone, PartialEq)]
pub struct CudaMemoryLimit {
    /// `PYTORCH_ALLOC_CONF` (PyTorch's name since 2.8), or `PYTORCH_CUDA_ALLOC_CONF` when that one is
    /// set: libtorch's CUDA allocator reads the latter first.
    pub variable: &'static str,
    /// The variable's value: what it held, with `per_process_memory_fraction:F` added.
    pub value: String,
    /// F: the share of each device's total memory the process may hold, in (0, 1).
    pub fraction: f64,
    /// What each engine gets of its GPU, in bytes, by GPU index: F x the GPU's total / its engines, at
    /// most the bytes asked for (less on a GPU whose engines' share is cut to the smallest F).
    pub per_engine: std::collections::BTreeMap<usize, u64>,
}

/// How to hold a process whose engines run on the GPUs `engines` lists (one index per engine, e.g. `[0]`
/// for a worker on cuda:0, `[0, 1, 0]` for three local workers on two GPUs) to `bytes` of device memory per
/// engine, given each GPU's total memory (`totals`, [`gpu_total_memories`]) and the process's environment
/// (`env`: a variable's value, if set).
///
/// PyTorch's caching allocator takes one fraction of each device's total for the whole process, so engines
/// sharing a GPU share its allowance, and the fraction is the smallest of the devices' (allowance / total):
/// no device is allowed more than its engines' bytes ([`CudaMemoryLimit::per_engine`] says what each
/// gets). An allocation past it fails as out of memory (a task then fails alone, as on a full device), and
/// cuDNN's autotuner (when on) halves the workspace it tries until it fits, as it does on a full device
/// (aten/src/ATen/native/cudnn/Conv_v8.cpp). `None` when there is nothing to hold: no engine on a GPU, or
/// an allowance of a whole device or more.
///
/// Errors (naming `device_memory`): no bytes, an engine on a GPU the driver does not see, a variable that
/// already sets `per_process_memory_fraction`, or one that selects the `cudaMallocAsync` backend (whose
/// pool this setting does not bound).
pub fn cuda_memory_limit(
    bytes: u64,
    engines: &[usize],
    totals: &[u64],
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<CudaMemoryLimit>, String> {
    if bytes == 0 {
        return Err("device_memory: must be more than 0 bytes".into());
    }
    let mut per_device = std::collections::BTreeMap::<usize, (u64, u64)>::new();
    for &index in engines {
        let total = *totals.get(index).ok_or_else(|| {
            format!(
                "device_memory: cuda:{index} is not among the {} GPU(s) the NVIDIA driver sees",
                totals.len()
            )
        })?;
        per_device.entry(index).or_insert((total, 0)).1 += 1;
    }
    let fraction = per_device
        .values()
        .filter(|(total, _)| *total > 0)
        .map(|&(total, count)| bytes.saturating_mul(count) as f64 / total as f64)
        .fold(1.0f64, f64::min);
    if per_device.is_empty() || fraction >= 1.0 {
        return Ok(None);
    }
    // rounded down, so that no device's share passes its allowance; at least what the setting can say
    let fraction = ((fraction * 1e9).floor() / 1e9).max(1e-9);
    let (variable, current) = match (env("PYTORCH_CUDA_ALLOC_CONF"), env("PYTORCH_ALLOC_CONF")) {
        (Some(v), _) => ("PYTORCH_CUDA_ALLOC_CONF", v),
        (None, v) => ("PYTORCH_ALLOC_CONF", v.unwrap_or_default()),
    };
    let current = current.trim().trim_end_matches(',');
    for setting in current.split(',') {
        let (key, value) = setting.split_once(':').unwrap_or((setting, ""));
        let (key, value) = (key.trim(), value.trim());
        if key == MEMORY_FRACTION_KEY {
            return Err(format!(
                "device_memory: {variable} already sets {MEMORY_FRACTION_KEY}; give that or \
                 --device-memory, not both"
            ));
        }
        if key == "backend" && value == "cudaMallocAsync" {
            return Err(format!(
                "device_memory: {variable} selects backend:cudaMallocAsync, whose memory \
                 {MEMORY_FRACTION_KEY} does not bound; drop one or the other"
            ));
        }
    }
    let setting = format!("{MEMORY_FRACTION_KEY}:{fraction:.9}");
    let value = if current.is_empty() {
        setting
    } else {
        format!("{current},{setting}")
    };
    let per_engine = per_device
        .into_iter()
        .map(|(index, (total, count))| {
            let share = (fraction * total as f64 / count as f64) as u64;
            (index, share.min(bytes))
        })
        .collect();
    Ok(Some(CudaMemoryLimit {
        variable,
        value,
        fraction,
        per_engine,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_reports_the_machine_or_cgroup_memory() {
        let bytes = total_memory(Device::Cpu).expect("the machine's memory");
        // more than a GiB, less than a PiB
        assert!((1 << 30..1 << 50).contains(&bytes), "{bytes}");
    }

    #[test]
    fn the_cpu_reports_the_process_memory_in_use() {
        let rss = memory_in_use(Device::Cpu).unwrap();
        // a test process of this crate holds at least a few MiB, and less than the machine
        assert!(
            rss > 1 << 20 && rss < total_memory(Device::Cpu).unwrap(),
            "{rss}"
        );
    }

    #[test]
    fn the_device_memory_limit_is_a_share_of_each_gpu() {
        const GIB: u64 = 1 << 30;
        let none = |_: &str| None;
        // one worker on an 80-GiB GPU held to 20 GiB
        let limit = cuda_memory_limit(20 * GIB, &[0], &[80 * GIB], none)
            .unwrap()
            .unwrap();
        assert_eq!(limit.variable, "PYTORCH_ALLOC_CONF");
        assert_eq!(limit.value, "per_process_memory_fraction:0.250000000");
        assert_eq!(limit.fraction, 0.25);
        assert_eq!(limit.per_engine, [(0, 20 * GIB)].into());
        // three engines on two GPUs of different sizes: cuda:0 holds two (2 x 10 of 80 GiB), cuda:1 one
        // (10 of 40): the smaller share for both, so that neither passes its engines' bytes; cuda:0's
        // engines get 10 GiB each, cuda:1's 10
        let limit = cuda_memory_limit(10 * GIB, &[0, 1, 0], &[80 * GIB, 40 * GIB], none)
            .unwrap()
            .unwrap();
        assert_eq!(limit.fraction, 0.25);
        assert_eq!(limit.per_engine, [(0, 10 * GIB), (1, 10 * GIB)].into());
        // three engines on two 80-GiB GPUs, 30 GiB each: cuda:0's two need 60 of 80 (0.75), cuda:1's
        // one 30 (0.375); held to 0.375 everywhere, cuda:0's engines get 15 GiB each, not the 30 asked
        let limit = cuda_memory_limit(30 * GIB, &[0, 1, 0], &[80 * GIB, 80 * GIB], none)
            .unwrap()
            .unwrap();
        assert_eq!(limit.fraction, 0.375);
        assert_eq!(limit.per_engine, [(0, 15 * GIB), (1, 30 * GIB)].into());
        // rounded down: a third of the device is never more than the bytes asked for
        let limit = cuda_memory_limit(GIB, &[0], &[3 * GIB], none)
            .unwrap()
            .unwrap();
        assert!(limit.fraction * (3 * GIB) as f64 <= GIB as f64, "{limit:?}");
        assert!(limit.fraction > 0.333_333, "{limit:?}");
        assert!(limit.per_engine[&0] <= GIB && limit.per_engine[&0] > GIB - (1 << 20));
        // nothing to hold: the whole device or more, or no engine on a GPU
        assert_eq!(
            cuda_memory_limit(80 * GIB, &[0], &[80 * GIB], none),
            Ok(None)
        );
        assert_eq!(
            cuda_memory_limit(50 * GIB, &[0, 0], &[80 * GIB], none),
            Ok(None)
        );
        assert_eq!(cuda_memory_limit(GIB, &[], &[], none), Ok(None));
        // no bytes, a GPU the driver does not see
        let e = cuda_memory_limit(0, &[0], &[80 * GIB], none).unwrap_err();
        assert!(e.contains("device_memory"), "{e}");
        let e = cuda_memory_limit(GIB, &[2], &[80 * GIB, 80 * GIB], none).unwrap_err();
        assert!(e.contains("device_memory") && e.contains("cuda:2"), "{e}");
    }

    #[test]
    fn the_device_memory_limit_keeps_the_allocator_settings_already_given() {
        const GIB: u64 = 1 << 30;
        let env = |cuda: Option<&'static str>, generic: Option<&'static str>| {
            move |name: &str| match name {
                "PYTORCH_CUDA_ALLOC_CONF" => cuda.map(String::from),
                "PYTORCH_ALLOC_CONF" => generic.map(String::from),
                _ => None,
            }
        };
        let limit = |cuda, generic| cuda_memory_limit(GIB, &[0], &[4 * GIB], env(cuda, generic));
        // added to the variable libtorch's CUDA allocator reads: PYTORCH_CUDA_ALLOC_CONF first
        let l = limit(
            Some("expandable_segments:True,"),
            Some("max_split_size_mb:64"),
        )
        .unwrap()
        .unwrap();
        assert_eq!(l.variable, "PYTORCH_CUDA_ALLOC_CONF");
        assert_eq!(
            l.value,
            "expandable_segments:True,per_process_memory_fraction:0.250000000"
        );
        let l = limit(None, Some(" max_split_size_mb:64 "))
            .unwrap()
            .unwrap();
        assert_eq!(l.variable, "PYTORCH_ALLOC_CONF");
        assert_eq!(
            l.value,
            "max_split_size_mb:64,per_process_memory_fraction:0.250000000"
        );
        // a fraction given there already is not overridden in silence, nor an allocator it does not bound
        let e = limit(Some("per_process_memory_fraction: 0.5"), None).unwrap_err();
        assert!(
            e.contains("device_memory") && e.contains("PYTORCH_CUDA_ALLOC_CONF"),
            "{e}"
        );
        let e = limit(None, Some("backend: cudaMallocAsync")).unwrap_err();
        assert!(
            e.contains("device_memory") && e.contains("cudaMallocAsync"),
            "{e}"
        );
        // the native backend named is fine
        assert!(limit(None, Some("backend:native")).unwrap().is_some());
    }

    #[test]
    fn a_missing_gpu_is_unknown_not_a_crash() {
        // SAFETY: loading NVIDIA's driver library only to see whether this machine has one
        if unsafe { libloading::Library::new("libcuda.so.1") }.is_err() {
            assert_eq!(total_memory(Device::Cuda(0)), None);
            assert_eq!(gpu_total_memories(), Ok(Vec::new()));
        }
        // SAFETY: as above, NVIDIA's management library
        if unsafe { libloading::Library::new("libnvidia-ml.so.1") }.is_err() {
            assert_eq!(memory_in_use(Device::Cuda(0)), None);
        }
    }
}
