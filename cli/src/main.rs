#![doc = include_str!("../README.md")]

#[cfg(not(feature = "client"))]
compile_error!("stylefarm needs the `client` feature (or `engine`, which includes it)");

/// `println!` for a command's output on stdout ([`write_stdout`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for a command's output on stdout ([`write_stdout`]).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

mod farm;
mod metrics;
#[cfg(feature = "engine")]
mod nodes;
#[cfg(feature = "engine")]
mod render;
mod seams;
mod weights;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Runs a one-shot command with a panic turned into its error: tch's infallible calls panic on a libtorch
/// error (e.g. the device running out of memory inside a loss), and the user gets one line and exit code 1
/// naming it, not a backtrace and 101. (The farm's worker contains panics per task on its engine thread.)
#[cfg(feature = "engine")]
fn contain_panics(command: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let default_hook = std::panic::take_hook();
    // the error line says it; the hook's report (and backtrace note) would be a second message
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(command));
    std::panic::set_hook(default_hook);
    result.unwrap_or_else(|payload| {
        let message = stylefarm_worker::panic_message(payload.as_ref());
        // without libtorch's C++ stack trace (after its first line, or after escaped newlines in a
        // panic of tch's): the engine's one definition of where it starts
        let trimmed = stylefarm_engine::without_stack_trace(&message);
        let first = trimmed.lines().next().unwrap_or_default();
        Err(anyhow::anyhow!("internal error: {first}"))
    })
}

/// Writes a command's output on stdout, as `print!` does, except that a reader that left (`stylefarm list |
/// head -1`) ends the process as it ends any Unix tool, by SIGPIPE, where `print!` panics. SIGPIPE itself
/// stays ignored, as Rust has it: the farm's connections need a write to a peer that reset them to be an
/// error (writev raises the signal where send's MSG_NOSIGNAL does not), not a signal that kills a
/// coordinator or a worker. Another write error (a full disk) ends the process with it and exit code 1.
fn write_stdout(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) else {
        return;
    };
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // SAFETY: signal(2) and raise(3) with SIGPIPE's default action: the process ends here, as a
        // write's SIGPIPE would end it
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            libc::raise(libc::SIGPIPE);
        }
    }
    eprintln!("error: writing to stdout: {e}");
    std::process::exit(1);
}

#[derive(Parser)]
#[command(
    name = "stylefarm",
    version,
    about = "Neural style transfer (Gatys et al. 2015) render farm"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The logs' format on stderr: `text` for people, `json` (one object a line, with the fields of the
    /// current span and its parents: job_id, task_id, worker_id) for a log pipeline.
    #[arg(
        long,
        global = true,
        env = "STYLEFARM_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    /// An OpenTelemetry collector's OTLP/HTTP endpoint (e.g. http://otel-collector:4318): the spans (a
    /// worker's tasks, the coordinator's calls, one trace across the gRPC hop) are exported there.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

/// The logs (text or JSON, on stderr, filtered by STYLEFARM_LOG or `default`) and OpenTelemetry's spans:
/// W3C trace context propagation always (a worker's calls carry its task's context, the coordinator's
/// spans of them continue it), OTLP/HTTP export to `--otlp-endpoint` when given, as `service`. Returns the
/// tracer provider, to be shut down (flushed) on exit.
fn init_tracing(
    cli: &Cli,
    default: &str,
    service: &'static str,
) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use tracing_subscriber::prelude::*;
    // each layer its own filter: the logs and the spans as STYLEFARM_LOG says, a task's log its own
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("STYLEFARM_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
    };
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match cli.log_format {
        // colours only on a terminal: log files stay greppable
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).boxed(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .boxed(),
    };
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let mut provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service)
            .build(),
    );
    if let Some(endpoint) = &cli.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()
            .map_err(|e| anyhow::anyhow!("otlp_endpoint '{endpoint}': {e}"))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let spans = tracing_opentelemetry::layer().with_tracer(provider.tracer("stylefarm"));
    // each task's events, for its log (the worker's commands)
    #[cfg(feature = "engine")]
    let task_logs = {
        use stylefarm_worker::task_log::TaskLogLayer;
        TaskLogLayer.with_filter(TaskLogLayer::filter())
    };
    #[cfg(not(feature = "engine"))]
    let task_logs = tracing_subscriber::layer::Identity::new();
    tracing_subscriber::registry()
        .with(logs.with_filter(filter()))
        .with(spans.with_filter(filter()))
        .with(task_logs)
        .init();
    Ok(provider)
}

/// See [`Cli::log_format`].
#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Render one stylized image on this machine.
    #[cfg(feature = "engine")]
    Render(Box<render::RenderArgs>),
    /// Run a job (single, batch, sweep, tiled or video) on an embedded coordinator with local workers.
    #[cfg(feature = "engine")]
    Local(Box<nodes::LocalArgs>),
    /// Start a coordinator.
    Coordinator(Box<farm::CoordinatorArgs>),
    /// Start a worker that renders the coordinator's tasks.
    #[cfg(feature = "engine")]
    Worker(nodes::WorkerArgs),
    /// Submit a job to a coordinator; prints its id.
    Submit(Box<farm::SubmitArgs>),
    /// Follow a job's progress until it ends.
    Watch(farm::WatchArgs),
    /// Show a job and its tasks.
    Status(farm::JobRef),
    /// Show a task's log: what its worker logged in each of its last attempts, and how each ended.
    Log(farm::LogArgs),
    /// List jobs, newest first.
    List(farm::ListArgs),
    /// Download a finished job's results.
    Fetch(farm::FetchArgs),
    /// List the workers: health (busy, idle, silent, left; leaving, draining, drained; name-shared), device,
    /// memory, tags, their tasks.
    Workers(farm::WorkersArgs),
    /// Drain workers (the farm's operator): they take no new task, the ones they run finish.
    Drain(farm::DrainArgs),
    /// Undrain workers: they take tasks again.
    Undrain(farm::DrainArgs),
    /// Pause jobs: their queued tasks wait until they are resumed; their running ones go on.
    Pause(farm::JobRefs),
    /// Resume paused jobs.
    Resume(farm::JobRefs),
    /// Change a job's priority (higher runs first): its queued tasks take their places by it.
    Priority(farm::PriorityArgs),
    /// Cancel jobs, or some tasks of a keep-going job (--task).
    Cancel(farm::JobOrTaskRefs),
    /// Run failed or cancelled jobs again: their failed and cancelled tasks (their succeeded ones keep
    /// their results); or some of a keep-going job's (--task).
    Retry(farm::JobOrTaskRefs),
    /// Delete finished jobs: their records and their tasks' (their images stay in the blob store).
    Delete(farm::JobRefs),
    /// Measure how visible a tiled render's tile grid is (1.0: not at all).
    Seams(seams::SeamsArgs),
    /// Locate or convert VGG19 weights.
    #[command(subcommand)]
    Weights(weights::WeightsCommand),
}

/// An error as the user reads it: its message and its causes', each once (a cause whose text the message
/// ends with already, as an I/O error's wrapper shows it, is not said again).
fn said(e: &anyhow::Error) -> String {
    stylefarm_proto::connect::with_sources(e.as_ref())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // before any thread starts (the environment is the process's)
    #[cfg(feature = "engine")]
    let memory_limit = match &cli.command {
        Command::Render(args) => {
            args.engine.prepare_process();
            args.memory.prepare_process(&args.device, 1)
        }
        Command::Local(args) => {
            args.engine.prepare_process();
            args.memory.prepare_process(&args.device, args.workers)
        }
        Command::Worker(args) => {
            args.engine.prepare_process();
            args.memory.prepare_process(&args.device, 1)
        }
        _ => Ok(None),
    };
    #[cfg(feature = "engine")]
    let memory_limit = match memory_limit {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("error: {}", said(&e));
            return ExitCode::FAILURE;
        }
    };
    stylefarm_coordinator::install_crypto_provider();
    // servers log their work by default; the user's commands only warnings (STYLEFARM_LOG overrides both)
    let (default, service) = match cli.command {
        Command::Coordinator(_) => ("info", "stylefarm-coordinator"),
        #[cfg(feature = "engine")]
        Command::Worker(_) => ("info", "stylefarm-worker"),
        _ => ("warn", "stylefarm"),
    };
    let tracer = match init_tracing(&cli, default, service) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {}", said(&e));
            return ExitCode::FAILURE;
        }
    };
    #[cfg(feature = "engine")]
    match memory_limit {
        Some(nodes::MemoryNote::Held(note)) => tracing::info!("device memory held to {note}"),
        Some(nodes::MemoryNote::NotHeld(note)) => tracing::warn!("{note}"),
        None => {}
    }
    let result = match cli.command {
        #[cfg(feature = "engine")]
        Command::Render(args) => contain_panics(|| render::run(*args)),
        #[cfg(feature = "engine")]
        Command::Local(args) => nodes::local(*args),
        Command::Coordinator(args) => farm::coordinator(*args),
        #[cfg(feature = "engine")]
        Command::Worker(args) => nodes::worker(args),
        Command::Submit(args) => farm::submit(*args),
        Command::Watch(args) => farm::watch(args),
        Command::Status(args) => farm::status(args),
        Command::Log(args) => farm::log(args),
        Command::List(args) => farm::list(args),
        Command::Fetch(args) => farm::fetch(args),
        Command::Workers(args) => farm::workers(args),
        Command::Drain(args) => farm::drain(args, true),
        Command::Undrain(args) => farm::drain(args, false),
        Command::Pause(args) => farm::pause(args, true),
        Command::Resume(args) => farm::pause(args, false),
        Command::Priority(args) => farm::priority(args),
        Command::Cancel(args) => farm::cancel(args),
        Command::Retry(args) => farm::retry(args),
        Command::Delete(args) => farm::delete(args),
        Command::Seams(args) => seams::run(args),
        Command::Weights(cmd) => weights::run(cmd),
    };
    // the spans not exported yet go now (a batch exporter holds them up to a few seconds)
    if let Err(e) = tracer.shutdown() {
        tracing::debug!(error = %e, "flushing the spans");
    }
    let code: u8 = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", said(&e));
            farm::failed_exit_code()
        }
    };
    // an engine thread still alive (a second interrupt did not wait for its render to stop, or it frees
    // its engine): the process ends without tearing libtorch's static objects down under it (exit's
    // destructors would, a segmentation fault), its output written first
    #[cfg(feature = "engine")]
    if stylefarm_worker::engine_threads_alive() > 0 {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: _exit ends the process at once; nothing of it is used after
        unsafe { libc::_exit(i32::from(code)) }
    }
    ExitCode::from(code)
}
