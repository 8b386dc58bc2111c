//! The farm's commands: `coordinator`, `worker`, `local`, and the client's `submit`, `watch`, `status`,
//! `list`, `fetch`, `cancel`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use stylefarm_core::job::{parse_sweep, ImageHash, JobKind, JobSpec};
use stylefarm_core::tiling::{self, TileSizing, Tiling};
use stylefarm_core::{imaging, Init, RenderParams};
use stylefarm_proto::pb;
use stylefarm_proto::pb::render_service_client::RenderServiceClient;
use stylefarm_proto::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::render::{EngineArgs, ParamArgs};

const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7700";

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Address to listen on.
    #[arg(long, env = "STYLEFARM_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Where jobs (state.redb) and images (blobs/) are kept; a restart on the same dir resumes.
    #[arg(long, env = "STYLEFARM_DATA_DIR", default_value = "stylefarm-data")]
    data_dir: PathBuf,
    /// Seconds a lease lasts without a heartbeat.
    #[arg(long, default_value_t = 10.0)]
    lease_secs: f64,
    /// Seconds between a worker's heartbeats.
    #[arg(long, default_value_t = 2.0)]
    heartbeat_secs: f64,
    /// Attempts per task when a job does not say.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
}

#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long, env = "STYLEFARM_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
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
pub struct DeviceMemoryArg {
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
#[command(allow_negative_numbers = true)]
pub struct SubmitArgs {
    #[arg(long, env = "STYLEFARM_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    #[command(flatten)]
    job: JobArgs,
    /// Wait for the job, showing progress, and fetch its results.
    #[arg(long)]
    wait: bool,
}

/// What a job renders: shared by `submit` and `local`.
#[derive(Args)]
pub struct JobArgs {
    /// Content image; repeat for a batch.
    #[arg(long, required = true)]
    content: Vec<PathBuf>,
    /// Style image; repeat for several styles (blended, or each alone with --batch).
    #[arg(long, required = true)]
    style: Vec<PathBuf>,
    /// Every content x every style, each style alone.
    #[arg(long, conflicts_with_all = ["sweep", "tiled"])]
    batch: bool,
    /// Render --size in overlapping tiles over a pyramid of scales (for outputs beyond one device).
    #[arg(long, conflicts_with = "sweep")]
    tiled: bool,
    /// Tiled: tile size in pixels for every scale (and the first scale's longest side at most). Default:
    /// each scale planned for the workers present when it starts: whole where it fits their device
    /// memory, else tiles as large as fit (at least 512 px), enough for every worker.
    #[arg(long, requires = "tiled")]
    tile_size: Option<u32>,
    /// Tiled: minimum overlap of neighbouring tiles in pixels, blended with feathered weights.
    #[arg(long, default_value_t = tiling::DEFAULT_OVERLAP, requires = "tiled")]
    overlap: u32,
    /// Tiled, exact mode: each later scale is one task that optimizes the whole canvas with the exact
    /// gradient of its objective, evaluated in blocks of --tile-size px (default: the largest blocks that
    /// fit the workers' memory, the whole canvas where it fits): no tiles, no seams, the style loss
    /// of an untiled render, memory still bound by the tile size; but one worker per scale and about 3x an
    /// untiled scale's compute.
    #[arg(long, requires = "tiled")]
    exact: bool,
    /// A parameter grid, e.g. 'style_weight=10,100;seed=0,1' (style_blend values as 0.7:0.3).
    #[arg(long)]
    sweep: Option<String>,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Where results go: a file for a single render, else a directory.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Idempotency key: submitting twice with it gives the same job.
    #[arg(long)]
    request_id: Option<String>,
    #[command(flatten)]
    params: ParamArgs,
}

#[derive(Args)]
pub struct JobRef {
    #[arg(long, env = "STYLEFARM_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    job_id: String,
}

#[derive(Args)]
pub struct FetchArgs {
    #[command(flatten)]
    job: JobRef,
    /// Directory (or, for a single render, a .png/.jpg file) to write the results to.
    #[arg(long, short)]
    output: PathBuf,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long, env = "STYLEFARM_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    coordinator: String,
    /// Most jobs to show, newest first.
    #[arg(long, default_value_t = 20)]
    limit: u32,
}

#[derive(Args)]
pub struct LocalArgs {
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
    #[command(flatten)]
    memory: DeviceMemoryArg,
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    job: JobArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn coordinator_config(
    data_dir: PathBuf,
    lease: f64,
    heartbeat: f64,
    attempts: u32,
) -> anyhow::Result<stylefarm_coordinator::CoordinatorConfig> {
    if !(lease.is_finite() && heartbeat.is_finite() && heartbeat > 0.0 && lease > heartbeat) {
        bail!("lease_secs must be greater than heartbeat_secs, both > 0");
    }
    if attempts == 0 {
        bail!("max_attempts must be at least 1");
    }
    Ok(stylefarm_coordinator::CoordinatorConfig {
        data_dir,
        scheduler: stylefarm_coordinator::SchedulerConfig {
            lease: Duration::from_secs_f64(lease),
            heartbeat_interval: Duration::from_secs_f64(heartbeat),
            default_max_attempts: attempts,
            ..Default::default()
        },
    })
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let config = coordinator_config(
        args.data_dir,
        args.lease_secs,
        args.heartbeat_secs,
        args.max_attempts,
    )?;
    runtime()?.block_on(async move {
        let coordinator = stylefarm_coordinator::Coordinator::open(config)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        // the line a supervisor (or a test) reads to learn the address
        println!("listening on {}", listener.local_addr()?);
        stylefarm_coordinator::serve(listener, coordinator, shutdown_signal()).await?;
        Ok(())
    })
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
        name,
        device,
        weights: weights.unwrap_or_else(crate::weights::default_weights),
        lease_wait: Duration::from_secs(10),
        device_memory: memory.device_memory,
        engine: engine.options(),
    })
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        set_threads(threads)?;
    }
    let config = worker_config(
        args.coordinator,
        &args.device,
        args.weights,
        args.name,
        &args.memory,
        &args.engine,
    )?;
    // fault injection for the end-to-end tests: the fail points that FAILPOINTS names
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    runtime()?.block_on(stylefarm_worker::run(config, shutdown_signal()))?;
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<RenderServiceClient<Channel>> {
    let channel = Channel::from_shared(url.to_string())
        .with_context(|| format!("coordinator url '{url}'"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    Ok(RenderServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}

/// Uploads an image file in chunks; returns its sha256.
async fn upload(
    client: &mut RenderServiceClient<Channel>,
    path: &Path,
) -> anyhow::Result<ImageHash> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    imaging::decode(&bytes, &path.display().to_string())?;
    let hash = ImageHash::of(&bytes);
    let mut parts = vec![pb::UploadImageRequest {
        part: Some(pb::upload_image_request::Part::ExpectedSha256(
            hash.to_string(),
        )),
    }];
    parts.extend(bytes.chunks(CHUNK_BYTES).map(|c| pb::UploadImageRequest {
        part: Some(pb::upload_image_request::Part::Data(c.to_vec())),
    }));
    client
        .upload_image(tokio_stream::iter(parts))
        .await
        .map_err(status_error)
        .with_context(|| format!("uploading {}", path.display()))?;
    Ok(hash)
}

/// Uploads the job's images and submits it; returns the job id.
async fn submit_job(
    client: &mut RenderServiceClient<Channel>,
    job: &JobArgs,
) -> anyhow::Result<String> {
    let mut params = RenderParams::try_from(&job.params)?;
    let kind = if job.batch {
        JobKind::Batch
    } else if job.tiled {
        JobKind::Tiled
    } else if job.sweep.is_some() {
        JobKind::Sweep
    } else {
        JobKind::Single
    };
    if kind != JobKind::Batch && job.content.len() > 1 {
        bail!("contents: several --content images need --batch");
    }
    let mut uploaded: HashMap<PathBuf, ImageHash> = HashMap::new();
    for path in job.content.iter().chain(&job.style) {
        if !uploaded.contains_key(path) {
            uploaded.insert(path.clone(), upload(client, path).await?);
        }
    }
    if let Init::Image(path) = &params.init {
        params.init = Init::Image(PathBuf::from(upload(client, path).await?.to_string()));
    }
    let spec = JobSpec {
        kind,
        contents: job.content.iter().map(|p| uploaded[p].clone()).collect(),
        styles: job.style.iter().map(|p| uploaded[p].clone()).collect(),
        params,
        sweep: job
            .sweep
            .as_deref()
            .map(parse_sweep)
            .transpose()?
            .unwrap_or_default(),
        priority: job.priority,
        max_attempts: 0,
        tiling: if job.tiled {
            Tiling {
                tile_size: job.tile_size.unwrap_or(tiling::DEFAULT_TILE_SIZE),
                overlap: job.overlap,
                exact: job.exact,
                sizing: if job.tile_size.is_some() {
                    TileSizing::Fixed
                } else {
                    TileSizing::Planned
                },
            }
        } else {
            Tiling::default()
        },
    };
    spec.tasks()?;
    let request = pb::SubmitJobRequest {
        spec: Some((&spec).into()),
        client_request_id: job.request_id.clone().unwrap_or_default(),
    };
    let reply = client
        .submit_job(request)
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(reply.job_id)
}

fn state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

fn task_state_name(state: i32) -> String {
    pb::TaskState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("TASK_STATE_")
                .to_lowercase()
        })
        .unwrap_or_default()
}

/// Follows a job until it ends, with a progress bar per task (stderr); returns its final status.
async fn watch_job(
    client: &mut RenderServiceClient<Channel>,
    job_id: &str,
    bars: bool,
) -> anyhow::Result<pb::JobStatus> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let multi = MultiProgress::new();
    if !bars {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>24} {bar:24} {pos:>4}/{len:4} {msg}")
        .expect("template");
    let mut task_bars: Vec<ProgressBar> = Vec::new();
    let mut job_bar: Option<ProgressBar> = None;
    let mut last = None;
    while let Some(event) = stream.next().await {
        let status = event.map_err(status_error)?.status.context("empty event")?;
        if status.scales > 0 {
            // tiled: the scale being rendered and its tiles done
            let bar = job_bar.get_or_insert_with(|| {
                multi.insert(0, ProgressBar::new(1).with_style(style.clone()))
            });
            let scale = status.scale_results.len().min(status.scales as usize - 1);
            let of_scale: Vec<&pb::TaskStatus> = status
                .tasks
                .iter()
                .filter(|t| t.tile.as_ref().map_or(0, |x| x.scale) as usize == scale)
                .collect();
            let done = of_scale.iter().filter(|t| !t.result.is_empty()).count();
            bar.set_prefix(format!("scale {}/{}", scale + 1, status.scales));
            bar.set_length(of_scale.len().max(1) as u64);
            bar.set_position(done as u64);
            bar.set_message(format!("tiles of scale {} done", scale + 1));
        }
        for t in &status.tasks {
            while task_bars.len() <= t.index as usize {
                let bar = multi.add(ProgressBar::new(1).with_style(style.clone()));
                task_bars.push(bar);
            }
            let bar = &task_bars[t.index as usize];
            bar.set_prefix(t.label.clone());
            if t.iterations > 0 {
                bar.set_length(u64::from(t.iterations));
                bar.set_position(u64::from(t.iteration));
            }
            let state = task_state_name(t.state);
            let loss = t.losses.as_ref().map(|l| l.total).filter(|l| *l > 0.0);
            bar.set_message(match (state.as_str(), loss) {
                ("running", Some(l)) => format!("scale {}/{} loss {l:.4e}", t.scale, t.scales),
                ("failed", _) => format!("failed: {}", t.error),
                (s, _) => s.to_string(),
            });
            if state == "succeeded" {
                bar.set_position(bar.length().unwrap_or(1));
            }
        }
        last = Some(status);
    }
    for bar in task_bars.into_iter().chain(job_bar) {
        bar.finish();
    }
    last.context("the job's event stream ended without an event")
}

async fn download(
    client: &mut RenderServiceClient<Channel>,
    sha256: &str,
    path: &Path,
) -> anyhow::Result<()> {
    let mut stream = client
        .download_result(pb::DownloadRequest {
            sha256: sha256.into(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        bytes.extend(chunk.map_err(status_error)?.data);
    }
    if ImageHash::of(&bytes).as_str() != sha256 {
        bail!("downloading {sha256}: the bytes do not match their hash");
    }
    imaging::save_encoded(&bytes, sha256, path)?;
    Ok(())
}

/// A file name from a task label: `content 1 x style 2` -> `content-1_x_style-2`.
fn slug(label: &str) -> String {
    label
        .split(' ')
        .map(|w| {
            w.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "=._-".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("_")
}

/// Writes a finished job's results: a single render to `output` when it names an image file, everything else
/// into the directory `output`.
async fn fetch_results(
    client: &mut RenderServiceClient<Channel>,
    status: &pb::JobStatus,
    output: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let done: Vec<&pb::TaskStatus> = status
        .tasks
        .iter()
        .filter(|t| !t.result.is_empty())
        .collect();
    if done.is_empty() {
        bail!(
            "job {} has no results (state {})",
            status.job_id,
            state_name(status.state)
        );
    }
    let mut written = Vec::new();
    if !status.result.is_empty() || status.scales > 0 {
        // tiled: the stitched image; into a directory also every scale's
        if status.result.is_empty() {
            bail!(
                "job {} has no result yet (state {})",
                status.job_id,
                state_name(status.state)
            );
        }
        if imaging::output_format(output).is_ok() {
            download(client, &status.result, output).await?;
            written.push(output.to_path_buf());
            return Ok(written);
        }
        std::fs::create_dir_all(output)
            .with_context(|| format!("creating {}", output.display()))?;
        for (k, sha) in status.scale_results.iter().enumerate() {
            let path = output.join(format!("scale-{}.png", k + 1));
            download(client, sha, &path).await?;
            written.push(path);
        }
        let path = output.join("result.png");
        download(client, &status.result, &path).await?;
        written.push(path);
        return Ok(written);
    }
    if done.len() == 1 && status.contact_sheet.is_empty() && imaging::output_format(output).is_ok()
    {
        download(client, &done[0].result, output).await?;
        written.push(output.to_path_buf());
        return Ok(written);
    }
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    for t in done {
        let path = output.join(format!("{:03}_{}.png", t.index, slug(&t.label)));
        download(client, &t.result, &path).await?;
        written.push(path);
    }
    if !status.contact_sheet.is_empty() {
        let path = output.join("contact-sheet.png");
        download(client, &status.contact_sheet, &path).await?;
        written.push(path);
    }
    Ok(written)
}

/// Waits for the job, fetches its results when `output` is given, and fails when the job did not succeed.
async fn wait_and_fetch(
    client: &mut RenderServiceClient<Channel>,
    job_id: &str,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let status = watch_job(client, job_id, true).await?;
    let state = state_name(status.state);
    if state != "succeeded" {
        bail!("job {job_id} {state}: {}", status.error);
    }
    if let Some(output) = output {
        for path in fetch_results(client, &status, output).await? {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

pub fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.coordinator).await?;
        let job_id = submit_job(&mut client, &args.job).await?;
        println!("{job_id}");
        if args.wait {
            wait_and_fetch(&mut client, &job_id, args.job.output.as_deref()).await?;
        }
        Ok(())
    })
}

pub fn watch(args: JobRef) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.coordinator).await?;
        let status = watch_job(&mut client, &args.job_id, true).await?;
        eprintln!("job {} {}", status.job_id, state_name(status.state));
        Ok(())
    })
}

fn print_status(s: &pb::JobStatus) {
    let done = s.tasks.iter().filter(|t| !t.result.is_empty()).count();
    println!(
        "{}\t{}\t{}/{} tasks\t{}",
        s.job_id,
        state_name(s.state),
        done,
        s.tasks.len(),
        s.error
    );
}

pub fn status(args: JobRef) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.coordinator).await?;
        let s = client
            .get_job(pb::GetJobRequest {
                job_id: args.job_id,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        print_status(&s);
        if s.scales > 0 {
            println!(
                "  scales stitched {}/{}{}",
                s.scale_results.len(),
                s.scales,
                if s.result.is_empty() {
                    String::new()
                } else {
                    format!(", result {}", s.result)
                }
            );
        }
        for t in &s.tasks {
            println!(
                "  {:>3} {:<10} {:<32} attempts {} {}",
                t.index,
                task_state_name(t.state),
                t.label,
                t.attempts,
                t.error
            );
        }
        Ok(())
    })
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.coordinator).await?;
        let jobs = client
            .list_jobs(pb::ListJobsRequest {
                states: vec![],
                limit: args.limit,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for s in &jobs.jobs {
            print_status(s);
        }
        Ok(())
    })
}

pub fn fetch(args: FetchArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.job.coordinator).await?;
        let s = client
            .get_job(pb::GetJobRequest {
                job_id: args.job.job_id,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        for path in fetch_results(&mut client, &s, &args.output).await? {
            println!("{}", path.display());
        }
        Ok(())
    })
}

pub fn cancel(args: JobRef) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut client = connect(&args.coordinator).await?;
        let r = client
            .cancel_job(pb::CancelJobRequest {
                job_id: args.job_id.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("{}\t{}", args.job_id, state_name(r.state));
        Ok(())
    })
}

/// An embedded coordinator on 127.0.0.1 and `--workers` workers in this process, one job, its results.
pub fn local(args: LocalArgs) -> anyhow::Result<()> {
    if args.workers == 0 || args.workers > 64 {
        bail!("workers: must be between 1 and 64, got {}", args.workers);
    }
    let output = args
        .job
        .output
        .clone()
        .context("output: --output is needed")?;
    // the workers share this process, and libtorch's thread pool: split the cores between them
    let cores = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    set_threads((cores / args.workers).max(1))?;
    let tmp = tempfile::tempdir().context("temporary data dir")?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let config = coordinator_config(data_dir, 10.0, 1.0, 3)?;
    runtime()?.block_on(async move {
        let coordinator = stylefarm_coordinator::Coordinator::open(config)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut server_stop = stop_rx.clone();
        let server = tokio::spawn(stylefarm_coordinator::serve(
            listener,
            coordinator,
            async move {
                let _ = server_stop.changed().await;
            },
        ));
        let mut workers = Vec::new();
        for i in 0..args.workers {
            let config = worker_config(
                url.clone(),
                &args.device,
                args.weights.clone(),
                Some(format!("local-{i}")),
                &args.memory,
                &args.engine,
            )?;
            let mut worker_stop = stop_rx.clone();
            workers.push(tokio::spawn(stylefarm_worker::run(config, async move {
                let _ = worker_stop.changed().await;
            })));
        }
        let mut client = connect(&url).await?;
        let job_id = submit_job(&mut client, &args.job).await?;
        let result = wait_and_fetch(&mut client, &job_id, Some(&output)).await;
        let _ = stop_tx.send(true);
        for w in workers {
            w.abort();
        }
        let _ = server.await;
        result
    })
}
