#![doc = include_str!("../README.md")]

#[cfg(not(feature = "client"))]
compile_error!("stylefarm needs the `client` feature (or `engine`, which includes it)");

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
        // libtorch's messages carry a C++ backtrace after their first line
        let first = message.lines().next().unwrap_or_default();
        Err(anyhow::anyhow!("internal error: {first}"))
    })
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
    /// Run a job (single, batch, sweep or tiled) on an embedded coordinator with local workers.
    #[cfg(feature = "engine")]
    Local(Box<nodes::LocalArgs>),
    /// Start a coordinator.
    Coordinator(farm::CoordinatorArgs),
    /// Start a worker that renders the coordinator's tasks.
    #[cfg(feature = "engine")]
    Worker(nodes::WorkerArgs),
    /// Submit a job to a coordinator; prints its id.
    Submit(Box<farm::SubmitArgs>),
    /// Follow a job's progress until it ends.
    Watch(farm::JobRef),
    /// Show a job and its tasks.
    Status(farm::JobRef),
    /// List jobs, newest first.
    List(farm::ListArgs),
    /// Download a finished job's results.
    Fetch(farm::FetchArgs),
    /// Cancel a job.
    Cancel(farm::JobRef),
    /// Measure how visible a tiled render's tile grid is (1.0: not at all).
    Seams(seams::SeamsArgs),
    /// Locate or convert VGG19 weights.
    #[command(subcommand)]
    Weights(weights::WeightsCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // servers log their work by default; the user's commands only warnings (STYLEFARM_LOG overrides both)
    let default = match cli.command {
        Command::Coordinator(_) => "info",
        #[cfg(feature = "engine")]
        Command::Worker(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("STYLEFARM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        // colours only on a terminal: log files stay greppable
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
    let result = match cli.command {
        #[cfg(feature = "engine")]
        Command::Render(args) => contain_panics(|| render::run(*args)),
        #[cfg(feature = "engine")]
        Command::Local(args) => nodes::local(*args),
        Command::Coordinator(args) => farm::coordinator(args),
        #[cfg(feature = "engine")]
        Command::Worker(args) => nodes::worker(args),
        Command::Submit(args) => farm::submit(*args),
        Command::Watch(args) => farm::watch(args),
        Command::Status(args) => farm::status(args),
        Command::List(args) => farm::list(args),
        Command::Fetch(args) => farm::fetch(args),
        Command::Cancel(args) => farm::cancel(args),
        Command::Seams(args) => seams::run(args),
        Command::Weights(cmd) => weights::run(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
