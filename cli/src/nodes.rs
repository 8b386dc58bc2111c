//! The farm's commands that run the engine: `worker`, and `local` (a [`LocalFarm`] running one job).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use stylefarm_client::LocalFarm;

use crate::farm::{
    coordinator_config, interrupted, interrupts, runtime, wait_and_fetch, ConnectArgs, FetchFailed,
    JobArgs,
};
use crate::render::EngineArgs;

#[derive(Args)]
pub(crate) struct WorkerArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Address to serve Prometheus metrics on (`GET /metrics`); off unless given.
    #[arg(long, env = "STYLEFARM_METRICS_LISTEN", value_parser = crate::farm::listen_addr)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "STYLEFARM_DEVICE", default_value = "auto")]
    pub(crate) device: String,
    /// VGG19 weights (.safetensors); default: the file deploy/setup.sh converts.
    #[arg(long, env = "STYLEFARM_WEIGHTS")]
    weights: Option<PathBuf>,
    /// Name shown by the coordinator (default: host name and process id). Give each worker its own: a
    /// worker's failures on a job (its strikes) count by name.
    #[arg(long)]
    name: Option<String>,
    /// A tag of this worker, e.g. gpu or a100 (repeat, or comma-separated in the variable): jobs submitted
    /// with --worker-tag go only to workers with all their tags; jobs without, to any worker.
    #[arg(long = "tag", env = "STYLEFARM_WORKER_TAGS", value_delimiter = ',')]
    tags: Vec<String>,
    /// Seconds the engine may take to stop a render once its task is cancelled (by a client, or by the
    /// coordinator for a lease it took back: --task-stall-secs) before the worker leaves with an error, for
    /// its supervisor to start it again: an engine that ignores a cancel hangs, and would render nothing
    /// more. More than the longest a render goes without looking at its cancel: an iteration, or a block
    /// of its targets (a minute or so for a large tile on a CPU; far less on a GPU).
    #[arg(long, env = "STYLEFARM_CANCEL_GRACE_SECS",
          default_value_t = stylefarm_worker::DEFAULT_CANCEL_GRACE.as_secs_f64())]
    cancel_grace_secs: f64,
    /// libtorch's CPU threads (default: one per core). With several CPU workers on one machine, give each
    /// its share of the cores: 2 workers on 2 cores oversubscribe with the default and run slower than 1.
    #[arg(long, env = "STYLEFARM_THREADS")]
    threads: Option<u32>,
    #[command(flatten)]
    pub(crate) memory: DeviceMemoryArg,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
}

/// The device memory a worker reports, and keeps to.
#[derive(Args, Clone)]
pub(crate) struct DeviceMemoryArg {
    /// Device memory of a worker (of `render`: of its device), e.g. 24GiB or 16GB (default: the GPU's
    /// total memory, or the machine's or container's for the CPU; `local`'s workers on one device share
    /// it evenly). It is reported to the coordinator, which sizes tiled jobs' tiles for it. On a GPU the
    /// worker keeps to it: libtorch's allocator is capped there (PyTorch's per_process_memory_fraction),
    /// so several workers can share one GPU, and an allocation past it fails that task as out of memory.
    /// On a CPU a render that needs more by stylefarm's estimate is refused before it starts, as out of
    /// memory (without it, one that needs more than the machine's memory).
    #[arg(long, env = "STYLEFARM_DEVICE_MEMORY", value_parser = parse_bytes)]
    pub(crate) device_memory: Option<u64>,
}

/// What each engine of this process gets of its GPU once `--device-memory` holds the process to it, by GPU
/// index ([`stylefarm_worker::CudaMemoryLimit::per_engine`]): what the workers report. Set once, by
/// [`DeviceMemoryArg::prepare_process`].
static HELD_PER_ENGINE: std::sync::OnceLock<std::collections::BTreeMap<usize, u64>> =
    std::sync::OnceLock::new();

/// What `--device-memory` did to the process, to be logged once logging starts.
pub(crate) enum MemoryNote {
    /// The process is held to it (info).
    Held(String),
    /// It could not be, and the engines may take the whole device (a warning).
    NotHeld(String),
}

impl DeviceMemoryArg {
    /// What `--device-memory` needs of the process, set before it starts a thread or libtorch touches
    /// CUDA: for `workers` engines on `device` (as [`local_device`] spreads them over the GPUs), the
    /// setting of PyTorch's CUDA allocator that holds each GPU to its engines' memory
    /// ([`stylefarm_worker::cuda_memory_limit`]).
    pub(crate) fn prepare_process(
        &self,
        device: &str,
        workers: u32,
    ) -> anyhow::Result<Option<MemoryNote>> {
        let Some(bytes) = self.device_memory else {
            return Ok(None);
        };
        let on_gpu = device == "auto" || stylefarm_engine::named_cuda_index(device).is_some();
        if !on_gpu || workers == 0 || workers > MAX_LOCAL_WORKERS {
            // the CPU; or a device name, or a number of workers, that the command refuses, naming it
            return Ok(None);
        }
        let totals = match stylefarm_worker::gpu_total_memories() {
            Ok(totals) => totals,
            Err(e) if device == "auto" => {
                return Ok(Some(MemoryNote::NotHeld(format!(
                    "device_memory: cannot read the GPU's memory ({e}): a GPU that libtorch finds \
                     anyway is not held to {}",
                    bytesize::ByteSize(bytes)
                ))))
            }
            Err(e) => bail!(
                "device_memory: cannot read the GPU's memory to hold {device} to {}: {e}",
                bytesize::ByteSize(bytes)
            ),
        };
        if totals.is_empty() && device == "auto" {
            // no GPU: auto runs on the CPU, which only reports the memory
            return Ok(None);
        }
        let engines: Vec<usize> = (0..workers)
            .filter_map(|i| {
                stylefarm_engine::named_cuda_index(&local_device(device, i, totals.len()))
            })
            .collect();
        let limit = stylefarm_worker::cuda_memory_limit(bytes, &engines, &totals, |name| {
            std::env::var(name).ok()
        })
        .map_err(anyhow::Error::msg)?;
        let Some(limit) = limit else {
            return Ok(None);
        };
        std::env::set_var(limit.variable, &limit.value);
        let each = limit
            .per_engine
            .iter()
            .map(|(gpu, bytes)| format!("cuda:{gpu} {}", bytesize::ByteSize(*bytes)))
            .collect::<Vec<_>>()
            .join(", ");
        let note = format!(
            "{} of each GPU's memory for --device-memory {} (each worker: {each}): {}={}",
            limit.fraction,
            bytesize::ByteSize(bytes),
            limit.variable,
            limit.value
        );
        let _ = HELD_PER_ENGINE.set(limit.per_engine);
        Ok(Some(MemoryNote::Held(note)))
    }

    /// The memory a worker on `device` reports: `--device-memory`, or what it gets of its GPU when
    /// engines sharing it get less ([`HELD_PER_ENGINE`]); `None`: the device's own.
    fn reported(&self, device: stylefarm_engine::Device) -> Option<u64> {
        let held = match device {
            stylefarm_engine::Device::Cuda(index) => HELD_PER_ENGINE.get()?.get(&index).copied(),
            _ => None,
        };
        self.device_memory
            .map(|bytes| held.map_or(bytes, |h| h.min(bytes)))
    }
}

/// The most device memory a worker may say it has: 1 PiB (no device has that much; a size past u64's
/// range would otherwise be taken as 16 EiB).
const MAX_DEVICE_MEMORY: u64 = 1 << 50;

/// The least `--device-memory` taken: VGG19's weights alone (float32) are 80 MB.
const MIN_DEVICE_MEMORY: u64 = 256 << 20;

/// A size in bytes, at least [`MIN_DEVICE_MEMORY`] and at most [`MAX_DEVICE_MEMORY`], with a unit (B, KB,
/// KiB, MB, MiB, GB, GiB, TB, TiB) or without (bytes).
fn parse_bytes(s: &str) -> Result<u64, String> {
    match s.parse::<bytesize::ByteSize>().map(|b| b.as_u64()) {
        Ok(0) => Err(format!("'{s}': must be more than 0 bytes")),
        // `--device-memory 12` meant 12 GiB, not 12 bytes (on a GPU, an allocator capped there)
        Ok(bytes) if bytes < MIN_DEVICE_MEMORY => Err(format!(
            "'{s}': {} is less than the {} a worker needs (a size takes a unit: 12GiB, 16GB, 512MiB)",
            bytesize::ByteSize(bytes),
            bytesize::ByteSize(MIN_DEVICE_MEMORY)
        )),
        Ok(bytes) if bytes > MAX_DEVICE_MEMORY => Err(format!(
            "'{s}': more than {}, which no device has",
            bytesize::ByteSize(MAX_DEVICE_MEMORY)
        )),
        Ok(bytes) => Ok(bytes),
        Err(e) => Err(format!("'{s}': {e} (e.g. 24GiB, 16GB, 512MiB)")),
    }
}

/// Sets libtorch's intra-op thread count for this process.
fn set_threads(threads: u32) -> anyhow::Result<()> {
    if threads == 0 || threads > 1024 {
        bail!("threads: must be between 1 and 1024, got {threads}");
    }
    tch::set_num_threads(threads as i32);
    Ok(())
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct LocalArgs {
    /// Worker processes' worth of engines to run in this process; with --device auto or cuda, on the GPUs
    /// in turn (worker i on cuda:(i mod the number of GPUs)).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_LOCAL_WORKERS)))]
    pub(crate) workers: u32,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "STYLEFARM_DEVICE", default_value = "auto")]
    pub(crate) device: String,
    /// VGG19 weights (.safetensors); default: the file deploy/setup.sh converts.
    #[arg(long, env = "STYLEFARM_WEIGHTS")]
    weights: Option<PathBuf>,
    /// Coordinator state (default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to serve the coordinator's status page on while the job runs; off unless given.
    #[arg(long, env = "STYLEFARM_STATUS_LISTEN", value_parser = crate::farm::listen_addr)]
    status_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    status_hosts: crate::farm::StatusHostsArg,
    #[command(flatten)]
    pub(crate) memory: DeviceMemoryArg,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    #[command(flatten)]
    job: JobArgs,
}

fn worker_config(
    coordinator: String,
    device: &str,
    weights: Option<PathBuf>,
    name: Option<String>,
    memory: &DeviceMemoryArg,
    engine: &EngineArgs,
    device_shared_by: u32,
) -> anyhow::Result<stylefarm_worker::WorkerConfig> {
    let device = stylefarm_engine::parse_device(device)?;
    let name = name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    // checked here too, so that a bad name stops the worker at once, before it loads VGG19
    stylefarm_core::ids::check_worker_name("--name", &name)?;
    Ok(stylefarm_worker::WorkerConfig {
        coordinator,
        credentials: Default::default(),
        metrics: Default::default(),
        name,
        device,
        weights: weights.unwrap_or_else(crate::weights::default_weights),
        lease_wait: Duration::from_secs(10),
        device_memory: memory.reported(device),
        device_shared_by,
        engine: engine.options(),
        tags: Vec::new(),
        cancel_grace: stylefarm_worker::DEFAULT_CANCEL_GRACE,
    })
}

pub(crate) fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        set_threads(threads)?;
    }
    let mut config = worker_config(
        args.connect.coordinator.clone(),
        &args.device,
        args.weights,
        args.name,
        &args.memory,
        &args.engine,
        1,
    )?;
    config.credentials = args.connect.credentials()?;
    // checked here too, so that a bad tag stops the worker at once with the flag named
    stylefarm_core::job::check_tags("tag", &args.tags)?;
    config.tags = args.tags;
    config.cancel_grace = crate::farm::seconds("--cancel-grace-secs", args.cancel_grace_secs)?;
    // fault injection for the end-to-end tests: the fail points that FAILPOINTS names
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let metrics = config.metrics.clone();
    runtime()?.block_on(async move {
        if let Some(addr) = args.metrics_listen {
            crate::metrics::serve(addr, move || metrics.text()).await?;
        }
        // the first interrupt: the worker takes no more tasks and finishes the one it runs; a second one
        // does not wait for it (it signs off: its task goes back to the queue)
        let interrupts = interrupts();
        let run = stylefarm_worker::run(
            config,
            interrupted(interrupts.clone(), 1),
            interrupted(interrupts, 2),
        );
        match run.await {
            Err(e @ stylefarm_worker::Error::Abandoned) => bail!("interrupted again: {e}"),
            run => anyhow::Ok(run?),
        }
    })?;
    Ok(())
}

/// How long `local`'s job waits while every worker is blocklisted for it before it fails: its workers are
/// all there will be, and this is time enough for a slow one to start.
const LOCAL_NO_WORKER_LEFT: Duration = Duration::from_secs(30);

/// The device of local worker `i` of a machine with `gpus` CUDA devices: with `auto` (when there is a GPU)
/// or `cuda`, the GPUs in turn (`cuda:i mod gpus`), so that `--workers 4` on a 4-GPU machine uses all four;
/// otherwise `device` as given (`cuda` without a GPU is then refused by [`stylefarm_engine::parse_device`]).
fn local_device(device: &str, i: u32, gpus: usize) -> String {
    match device {
        "auto" | "cuda" | "gpu" if gpus > 0 => format!("cuda:{}", i as usize % gpus),
        other => other.to_string(),
    }
}

/// `local` interrupted (Ctrl-C, SIGTERM) before its job ended.
#[derive(Debug, thiserror::Error)]
#[error("interrupted: the job unfinished")]
struct Interrupted;

/// The error of `local` interrupted with job `job_id` unfinished, once the results of its tasks that
/// rendered are written to `output` (a batch's, a sweep's or a video's, each a file of its own there: a
/// folder of 1000 photos interrupted at the 999th keeps 998); a single or tiled job has none.
async fn write_rendered(
    client: &mut stylefarm_client::FarmClient,
    job_id: &stylefarm_core::ids::JobId,
    output: &std::path::Path,
) -> anyhow::Error {
    use stylefarm_proto::pb::job_spec::Kind;
    let status = match client.job(job_id).await {
        Ok(s) => s,
        Err(e) => {
            return anyhow::Error::new(Interrupted).context(format!("its results not read: {e}"))
        }
    };
    let several = matches!(
        status.spec.as_ref().and_then(|s| s.kind.as_ref()),
        Some(Kind::Batch(_) | Kind::Sweep(_) | Kind::Video(_))
    );
    let done = status.tasks.iter().filter(|t| !t.result.is_empty()).count();
    if !several || done == 0 {
        return anyhow::Error::new(Interrupted);
    }
    let wrote = |path: &Path| eprintln!("wrote {}", path.display());
    match client.fetch_each(&status, output, wrote).await {
        Ok(_) => {
            anyhow::anyhow!(
                "interrupted: the job unfinished, the results of {done} of its {} tasks written",
                status.tasks.len()
            )
        }
        // kept with the data dir, for a coordinator to serve, as a finished job's would be
        Err(source) => anyhow::Error::new(FetchFailed {
            job_id: job_id.clone(),
            source,
        })
        .context(format!(
            "interrupted: the job unfinished, the results of its {done} rendered tasks not written"
        )),
    }
}

/// The most workers `local` runs in its process.
const MAX_LOCAL_WORKERS: u32 = 64;

/// An embedded coordinator on 127.0.0.1 and `--workers` workers in this process, one job, its results.
pub(crate) fn local(args: LocalArgs) -> anyhow::Result<()> {
    // fault injection for the end-to-end tests, as for `worker`
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let output = args
        .job
        .output
        .clone()
        .context("output: --output is needed")?;
    let job = args.job.files()?;
    if !job.worker_tags.is_empty() {
        bail!("worker_tags: the local workers have no tags (--worker-tag is for a farm's workers)");
    }
    // its coordinator starts empty: no other job to wait for
    if !job.after.is_empty() {
        bail!("after: a local farm runs this job alone (--after is for a farm's submit)");
    }
    if let Some(id) = job.params.init.job() {
        bail!("init: a local farm runs this job alone, with no job:{id} to start from (give an image file)");
    }
    // the workers share this process, and libtorch's thread pool: split the cores between them
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    set_threads((cores / args.workers).max(1))?;
    // an empty data dir: LocalFarm's temporary one
    let mut config = coordinator_config(args.data_dir.clone().unwrap_or_default(), 10.0, 1.0, 3)?;
    config.scheduler.no_worker_left = LOCAL_NO_WORKER_LEFT;
    // the workers share this process (one build, one decoder): an input error is confirmed by the first
    config.scheduler.permanent_confirmations = 1;
    let gpus = if matches!(args.device.as_str(), "auto" | "cuda" | "gpu") {
        tch::Cuda::device_count().max(0) as usize
    } else {
        0
    };
    let devices: Vec<String> = (0..args.workers)
        .map(|i| local_device(&args.device, i, gpus))
        .collect();
    let workers = devices
        .iter()
        .enumerate()
        .map(|(i, device)| {
            worker_config(
                String::new(),
                device,
                args.weights.clone(),
                Some(format!("local-{i}")),
                &args.memory,
                &args.engine,
                devices.iter().filter(|d| *d == device).count() as u32,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    runtime()?.block_on(async move {
        let interrupts = interrupts();
        let mut farm = LocalFarm::start(config, workers).await?;
        if let Some(addr) = args.status_listen {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("status_listen: binding {addr}"))?;
            farm.serve_status(listener, &args.status_hosts.hosts()?)
                .await?;
        }
        let mut client = farm.client().await?;
        // the job once submitted: an interrupted batch's rendered results are written still
        let submitted = std::sync::OnceLock::new();
        let render = async {
            // the workers load their engines first (seconds on a GPU): the job goes once one is ready,
            // not to be shown waiting for a worker meanwhile
            while client.workers().await?.is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            let job_id = client.submit_files(&job).await?;
            let _ = submitted.set(job_id.clone());
            crate::farm::say_left_out(client.left_out());
            wait_and_fetch(&mut client, &job_id, Some(&output), false).await
        };
        // with no worker left the job would wait for one forever: this farm gets none; Ctrl-C or SIGTERM
        // stops it too, and its temporary data dir (every image of the job) goes with it
        // the interrupts had when the job ended, or was interrupted
        let mut had = 0;
        let result = tokio::select! {
            result = render => result,
            reasons = farm.workers_gone() => Err(anyhow::anyhow!(
                "every worker left the farm, the job unfinished: {}",
                reasons.join("; ")
            )),
            () = interrupted(interrupts.clone(), 1) => {
                // before saying "interrupt again", which the next one may answer at once
                had = *interrupts.borrow();
                if stylefarm_worker::renders_running() > 0 {
                    eprintln!(
                        "interrupted: stopping the renders (at most {} s; interrupt again not to wait)",
                        stylefarm_client::RENDER_STOP_WAIT.as_secs()
                    );
                }
                Err(anyhow::Error::new(Interrupted))
            }
        };
        // one more Ctrl-C or SIGTERM than those had so far does not wait (for the results' writing, for
        // the renders to stop)
        let hurry = match had {
            0 => *interrupts.borrow(),
            had => had,
        } + 1;
        let result = match (result, submitted.get()) {
            (Err(e), Some(job_id)) if e.is::<Interrupted>() => tokio::select! {
                written = write_rendered(&mut client, job_id, &output) => Err(written),
                () = interrupted(interrupts.clone(), hurry) => Err(anyhow::Error::new(Interrupted)),
            },
            (result, _) => result,
        };
        // rendered, but not written: the data dir keeps the results, for a coordinator to serve
        let unwritten = result.as_ref().err().and_then(|e| e.downcast_ref::<FetchFailed>());
        if let Some(failed) = unwritten {
            if let Some(dir) = farm.keep_data_dir().or(args.data_dir.clone()) {
                let dir = dir.display();
                eprintln!(
                    "the results are kept in {dir}: `stylefarm coordinator --data-dir {dir} --listen \
                     127.0.0.1:7700` serves them to `stylefarm fetch {} -o OUTPUT --coordinator \
                     http://127.0.0.1:7700`",
                    failed.job_id
                );
            }
        }
        // the data dir goes all the same
        tokio::select! {
            () = farm.shutdown() => {}
            () = interrupted(interrupts, hurry) => {
                eprintln!("interrupted again: not waiting for the renders to stop")
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::local_device;

    #[test]
    fn local_workers_take_the_gpus_in_turn() {
        let devices = |device, gpus| {
            (0..5)
                .map(|i| local_device(device, i, gpus))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            devices("auto", 2),
            ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
        );
        assert_eq!(devices("cuda", 4)[3], "cuda:3");
        // as given: no GPU, a device named, the CPU
        assert_eq!(devices("auto", 0), ["auto"; 5]);
        assert_eq!(devices("cuda:1", 4), ["cuda:1"; 5]);
        assert_eq!(devices("cpu", 4), ["cpu"; 5]);
    }

    #[test]
    fn device_memory_is_refused_past_what_a_device_has() {
        assert_eq!(super::parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(super::parse_bytes("1PiB"), Ok(1 << 50));
        for past in ["99999999TiB", "2PiB", "18446744073709551615"] {
            let e = super::parse_bytes(past).unwrap_err();
            assert!(e.contains("which no device has"), "{past}: {e}");
        }
        assert!(super::parse_bytes("0").unwrap_err().contains("more than 0"));
        // a number without its unit is bytes: far too few
        assert_eq!(
            super::parse_bytes("12").unwrap_err(),
            "'12': 12 B is less than the 256.0 MiB a worker needs (a size takes a unit: 12GiB, 16GB, \
             512MiB)"
        );
        assert_eq!(super::parse_bytes("256MiB"), Ok(256 << 20));
    }
}
