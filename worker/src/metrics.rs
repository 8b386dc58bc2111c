//! The worker's Prometheus metrics, as text for an HTTP scrape ([`WorkerMetrics::text`]; the CLI serves it
//! on `--metrics-listen`).
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `stylefarm_worker_tasks_total` | counter | `outcome` (`succeeded`, `failed`, `cancelled`) | tasks reported |
//! | `stylefarm_worker_task_seconds` | histogram | | lease to report, s |
//! | `stylefarm_worker_engine_seconds` | histogram | | time on the engine thread per rendered task, s |
//! | `stylefarm_worker_engine_idle_seconds` | histogram | | the engine thread's wait before a render since the previous one ended (the lease, downloads, the tile's preparation; a lease poll that waited for work too), s: on a GPU, the device's idle time between tasks |
//! | `stylefarm_worker_iterations_per_second` | gauge | | the last rendered task's iterations (its evaluations of the objective, every scale's) over its engine time |
//! | `stylefarm_worker_downloaded_bytes_total` | counter | | image bytes downloaded from the coordinator |
//! | `stylefarm_worker_device_memory_bytes` | gauge | | memory in use: the process's resident set on a CPU, the device's used memory on a GPU (NVML) |

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use stylefarm_engine::Device;

/// A metric's labels: (name, value) pairs.
type Labels = Vec<(String, String)>;

/// The worker's metrics: counted as tasks run, the device memory read at each scrape.
pub struct WorkerMetrics {
    registry: Registry,
    tasks: Family<Labels, Counter>,
    task_seconds: Histogram,
    engine_seconds: Histogram,
    engine_idle_seconds: Histogram,
    iterations_per_second: Gauge<f64, AtomicU64>,
    downloaded: Counter,
    memory: Gauge,
    device: std::sync::Mutex<Option<Device>>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("stylefarm_worker");
        let m = WorkerMetrics {
            registry: Registry::default(),
            tasks: Family::default(),
            // 0.1 s to about 14 min
            task_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            engine_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            // 1 ms to about 16 s
            engine_idle_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            iterations_per_second: Gauge::default(),
            downloaded: Counter::default(),
            memory: Gauge::default(),
            device: std::sync::Mutex::new(None),
        };
        registry.register("tasks", "Tasks reported, by outcome", m.tasks.clone());
        registry.register(
            "task_seconds",
            "Lease to report, in seconds",
            m.task_seconds.clone(),
        );
        registry.register(
            "engine_seconds",
            "Time on the engine thread per rendered task, in seconds",
            m.engine_seconds.clone(),
        );
        registry.register(
            "engine_idle_seconds",
            "The engine thread's wait before a render since the previous one ended, in seconds",
            m.engine_idle_seconds.clone(),
        );
        registry.register(
            "iterations_per_second",
            "The last rendered task's iterations over its engine time",
            m.iterations_per_second.clone(),
        );
        registry.register(
            "downloaded_bytes",
            "Image bytes downloaded from the coordinator",
            m.downloaded.clone(),
        );
        registry.register(
            "device_memory_bytes",
            "Memory in use: the process's resident set on a CPU, the device's used memory on a GPU",
            m.memory.clone(),
        );
        WorkerMetrics { registry, ..m }
    }
}

impl WorkerMetrics {
    /// The device whose memory is reported.
    pub(crate) fn set_device(&self, device: Device) {
        *self.device.lock().unwrap_or_else(|p| p.into_inner()) = Some(device);
    }

    /// A task reported with `outcome` after `seconds` under its lease, having downloaded `bytes`.
    pub(crate) fn task(&self, outcome: &str, seconds: f64, bytes: u64) {
        self.tasks
            .get_or_create(&vec![("outcome".to_string(), outcome.to_string())])
            .inc();
        self.task_seconds.observe(seconds);
        self.downloaded.inc_by(bytes);
    }

    /// A render that took `engine_s` on the engine thread for `iterations`, after the thread waited
    /// `idle_s` since its previous render (the first: none).
    pub(crate) fn rendered(&self, engine_s: f64, iterations: u32, idle_s: Option<f64>) {
        self.engine_seconds.observe(engine_s);
        if let Some(idle_s) = idle_s {
            self.engine_idle_seconds.observe(idle_s);
        }
        if engine_s > 0.0 {
            self.iterations_per_second
                .set(f64::from(iterations) / engine_s);
        }
    }

    /// The metrics as Prometheus text (OpenMetrics), the memory read now.
    pub fn text(&self) -> String {
        let device = *self.device.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bytes) = device.and_then(crate::device::memory_in_use) {
            self.memory.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // writing to a String cannot fail
        let _ = encode(&mut out, &self.registry);
        out
    }
}
