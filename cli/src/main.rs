//! `stylefarm`: the user's command. Today: `render` (one image, on this machine) and `weights`; the farm's
//! commands (`local`, `submit`, `watch`, ...) come with the coordinator.

mod render;
mod weights;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stylefarm",
    version,
    about = "Neural style transfer (Gatys et al. 2015) render farm"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render one stylized image on this machine.
    Render(Box<render::RenderArgs>),
    /// Locate or convert VGG19 weights.
    #[command(subcommand)]
    Weights(weights::WeightsCommand),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("STYLEFARM_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Render(args) => render::run(*args),
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
