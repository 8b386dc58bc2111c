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
        _ => cpu_memory().ok_or(()),
    }
    .ok()
}

/// The memory in use now, in bytes, for the metrics and the coordinator's status page (sampled by
/// [`MemorySampler`] for each lease request and heartbeat): on a CPU the worker process's resident set; on a GPU
/// the device's used memory as NVML reports it (`nvmlDeviceGetMemoryInfo` in libnvidia-ml.so.1, the
/// driver's management library: every process's allocations on the device, libtorch's cache included).
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

/// NVML's `nvmlMemory_t`: total, free and used bytes.
#[repr(C)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

fn cuda_used_memory(index: usize) -> Result<u64, String> {
    let index = std::os::raw::c_uint::try_from(index).map_err(|e| e.to_string())?;
    let check = |what: &str, r: std::os::raw::c_int| {
        if r == 0 {
            Ok(())
        } else {
            Err(format!("{what} returned nvmlReturn_t {r}"))
        }
    };
    // SAFETY: libnvidia-ml.so.1 is NVIDIA's management library; these symbols have these C signatures
    // in every driver since NVML's v2 entry points (nvml.h: nvmlReturn_t nvmlInit_v2(void),
    // nvmlDeviceGetHandleByIndex_v2(unsigned int, nvmlDevice_t*), nvmlDeviceGetMemoryInfo(nvmlDevice_t,
    // nvmlMemory_t*) with nvmlDevice_t an opaque pointer and nvmlMemory_t three unsigned long longs); the
    // library stays loaded while they are called, and nvmlInit_v2 may be called more than once.
    unsafe {
        let lib = libloading::Library::new("libnvidia-ml.so.1").map_err(|e| e.to_string())?;
        let init: libloading::Symbol<'_, unsafe extern "C" fn() -> std::os::raw::c_int> =
            lib.get(b"nvmlInit_v2\0").map_err(|e| e.to_string())?;
        let handle_of: libloading::Symbol<
            '_,
            unsafe extern "C" fn(
                std::os::raw::c_uint,
                *mut *mut std::ffi::c_void,
            ) -> std::os::raw::c_int,
        > = lib
            .get(b"nvmlDeviceGetHandleByIndex_v2\0")
            .map_err(|e| e.to_string())?;
        let memory_info: libloading::Symbol<
            '_,
            unsafe extern "C" fn(*mut std::ffi::c_void, *mut NvmlMemory) -> std::os::raw::c_int,
        > = lib
            .get(b"nvmlDeviceGetMemoryInfo\0")
            .map_err(|e| e.to_string())?;
        check("nvmlInit_v2", init())?;
        let mut handle = std::ptr::null_mut();
        check(
            "nvmlDeviceGetHandleByIndex_v2",
            handle_of(index, &mut handle),
        )?;
        let mut memory = NvmlMemory {
            total: 0,
            free: 0,
            used: 0,
        };
        check("nvmlDeviceGetMemoryInfo", memory_info(handle, &mut memory))?;
        Ok(memory.used)
    }
}

fn cpu_memory() -> Option<u64> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory();
    let total = match sys.cgroup_limits() {
        Some(limits) if limits.total_memory > 0 => limits.total_memory.min(sys.total_memory()),
        _ => sys.total_memory(),
    };
    (total > 0).then_some(total)
}

/// `CUresult` of the driver API: 0 is success.
type CuResult = std::os::raw::c_int;

fn cuda_total_memory(index: usize) -> Result<u64, String> {
    let ordinal = std::os::raw::c_int::try_from(index).map_err(|e| e.to_string())?;
    let check = |what: &str, r: CuResult| {
        if r == 0 {
            Ok(())
        } else {
            Err(format!("{what} returned CUresult {r}"))
        }
    };
    // SAFETY: libcuda.so.1 is NVIDIA's driver library; the three symbols have these C signatures in every
    // driver since CUDA 3.2 (cuda.h: CUresult cuInit(unsigned int), cuDeviceGet(CUdevice*, int),
    // cuDeviceTotalMem_v2(size_t*, CUdevice) with CUdevice an int); the library stays loaded while they
    // are called.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1").map_err(|e| e.to_string())?;
        let init: libloading::Symbol<'_, unsafe extern "C" fn(std::os::raw::c_uint) -> CuResult> =
            lib.get(b"cuInit\0").map_err(|e| e.to_string())?;
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
        check("cuInit", init(0))?;
        let mut device: std::os::raw::c_int = 0;
        check("cuDeviceGet", device_get(&mut device, ordinal))?;
        let mut bytes: usize = 0;
        check("cuDeviceTotalMem_v2", total_mem(&mut bytes, device))?;
        Ok(bytes as u64)
    }
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
    fn a_missing_gpu_is_unknown_not_a_crash() {
        // SAFETY: loading NVIDIA's driver library only to see whether this machine has one
        if unsafe { libloading::Library::new("libcuda.so.1") }.is_err() {
            assert_eq!(total_memory(Device::Cuda(0)), None);
        }
        // SAFETY: as above, NVIDIA's management library
        if unsafe { libloading::Library::new("libnvidia-ml.so.1") }.is_err() {
            assert_eq!(memory_in_use(Device::Cuda(0)), None);
        }
    }
}
