//! The farm's commands that run the engine: `worker`, and `local` (a [`LocalFarm`] running one job).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use stylefarm_client::LocalFarm;

use crate::farm::{
    coordinator_config, runtime, shutdown_signal, wait_and_fetch, ConnectArgs, JobArgs,
};
use crate::render::EngineArgs;

#[derive(Args)]
pub(crate) struct WorkerArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Address to serve Prometheus metrics on (`GET /metrics`); off unless given.
    #[arg(long, env = "STYLEFARM_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "STYLEFARM_DEVICE", default_value = "auto")]
    device: String,
    /// VGG19 weights (.safetensors); default: the file deploy/setup.sh converts.
    #[arg(long, env = "STYLEFARM_WEIGHTS")]
    weights: Option<PathBuf>,
    /// Name shown by the coordinator (default: host name and process id).
    #[arg(long)]
    name: Option<String>,
    /// libtorch's CPU threads (default: one per core). With several CPU workers on one machine, give each
    /// its share of the cores: 2 workers on 2 cores oversubscribe with the default and run slower than 1.
    #[arg(long, env = "STYLEFARM_THREADS")]
    threads: Option<u32>,
    #[command(flatten)]
    memory: DeviceMemoryArg,
    #[command(flatten)]
    engine: EngineArgs,
}

/// The device memory a worker reports.
#[derive(Args, Clone)]
pub(crate) struct DeviceMemoryArg {
    /// Device memory to report to the coordinator, which sizes tiled jobs' tiles for it, e.g. 24GiB or
    /// 16GB (default: the GPU's total memory, or the machine's or container's for the CPU). Lower it to
    /// leave room for other processes on the device.
    #[arg(long, env = "STYLEFARM_DEVICE_MEMORY", value_parser = parse_bytes)]
    device_memory: Option<u64>,
}

/// A size in bytes, with a unit (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB) or without (bytes).
fn parse_bytes(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("'{s}': {e} (e.g. 24GiB, 16GB, 512MiB)"))
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
pub(crate) struct LocalArgs {
    /// Worker processes' worth of engines to run in this process.
    #[arg(long, default_value_t = 1)]
    workers: u32,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "STYLEFARM_DEVICE", default_value = "auto")]
    device: String,
    #[arg(long, env = "STYLEFARM_WEIGHTS")]
    weights: Option<PathBuf>,
    /// Coordinator state (default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Address to serve the coordinator's status page on while the job runs; off unless given.
    #[arg(long, env = "STYLEFARM_STATUS_LISTEN")]
    status_listen: Option<std::net::SocketAddr>,
    #[command(flatten)]
    memory: DeviceMemoryArg,
    #[command(flatten)]
    engine: EngineArgs,
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
) -> anyhow::Result<stylefarm_worker::WorkerConfig> {
    let device = stylefarm_engine::parse_device(device)?;
    let name = name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    Ok(stylefarm_worker::WorkerConfig {
        coordinator,
        credentials: Default::default(),
        metrics: Default::default(),
        name,
        device,
        weights: weights.unwrap_or_else(crate::weights::default_weights),
        lease_wait: Duration::from_secs(10),
        device_memory: memory.device_memory,
        engine: engine.options(),
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
    )?;
    config.credentials = args.connect.credentials()?;
    // fault injection for the end-to-end tests: the fail points that FAILPOINTS names
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let metrics = config.metrics.clone();
    runtime()?.block_on(async move {
        if let Some(addr) = args.metrics_listen {
            crate::metrics::serve(addr, move || metrics.text()).await?;
        }
        stylefarm_worker::run(config, shutdown_signal()).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// An embedded coordinator on 127.0.0.1 and `--workers` workers in this process, one job, its results.
pub(crate) fn local(args: LocalArgs) -> anyhow::Result<()> {
    if args.workers == 0 || args.workers > 64 {
        bail!("workers: must be between 1 and 64, got {}", args.workers);
    }
    let output = args
        .job
        .output
        .clone()
        .context("output: --output is needed")?;
    let job = args.job.files()?;
    // the workers share this process, and libtorch's thread pool: split the cores between them
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    set_threads((cores / args.workers).max(1))?;
    // an empty data dir: LocalFarm's temporary one
    let config = coordinator_config(args.data_dir.clone().unwrap_or_default(), 10.0, 1.0, 3)?;
    let workers = (0..args.workers)
        .map(|i| {
            worker_config(
                String::new(),
                &args.device,
                args.weights.clone(),
                Some(format!("local-{i}")),
                &args.memory,
                &args.engine,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    runtime()?.block_on(async move {
        let farm = LocalFarm::start(config, workers).await?;
        if let Some(addr) = args.status_listen {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("status_listen: binding {addr}"))?;
            farm.serve_status(listener).await?;
        }
        let mut client = farm.client().await?;
        let result = async {
            let job_id = client.submit_files(&job).await?;
            wait_and_fetch(&mut client, &job_id, Some(&output)).await
        }
        .await;
        farm.shutdown().await;
        result
    })
}
