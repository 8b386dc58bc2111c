//! `stylefarm weights`: where the VGG19 weights are, and conversion of other weight files.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};

/// The converter of deploy/convert_weights.py, carried in the binary.
const CONVERTER: &str = include_str!("../../deploy/convert_weights.py");

#[derive(Subcommand)]
pub(crate) enum WeightsCommand {
    /// Print the weights file that `render` uses by default, and whether it is there.
    Path,
    /// Convert a weights file to the safetensors format the engine loads (needs Python with numpy; h5py for
    /// h5 files. deploy/setup.sh makes such a venv.)
    Convert {
        /// What the input is.
        #[arg(long, value_enum)]
        from: SourceKind,
        /// The input file, e.g. torchvision's vgg19-dcbb9e9d.pth.
        input: PathBuf,
        /// The .safetensors file to write.
        output: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SourceKind {
    /// torchvision's vgg19 state dict (features.N.weight / bias; RGB 0..1 normalized input).
    TorchvisionPth,
    /// Keras' vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 (Caffe weights; BGR 0..255 input).
    KerasH5,
}

/// `$STYLEFARM_HOME`, by default `$XDG_CACHE_HOME/stylefarm` or `~/.cache/stylefarm` (as deploy/setup.sh).
pub(crate) fn stylefarm_home() -> PathBuf {
    if let Some(home) = std::env::var_os("STYLEFARM_HOME") {
        return home.into();
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("stylefarm")
}

/// The weights deploy/setup.sh converts.
pub(crate) fn default_weights() -> PathBuf {
    stylefarm_home()
        .join("weights")
        .join("vgg19-caffe.safetensors")
}

pub(crate) fn run(cmd: WeightsCommand) -> anyhow::Result<()> {
    match cmd {
        WeightsCommand::Path => {
            let path = default_weights();
            let state = if path.exists() {
                "present"
            } else {
                "missing: run `bash deploy/setup.sh`"
            };
            outln!("{}\t{state}", path.display());
            Ok(())
        }
        WeightsCommand::Convert {
            from,
            input,
            output,
        } => {
            if !input.is_file() {
                bail!("{}: no such file", input.display());
            }
            if !stylefarm_core::imaging::folder_of(&output).is_dir() {
                bail!("output: {}: its folder does not exist", output.display());
            }
            // the converted weights would replace their source
            let same = |a: &std::path::Path, b: &std::path::Path| {
                let (a, b) = (a.canonicalize(), b.canonicalize());
                matches!((a, b), (Ok(a), Ok(b)) if a == b)
            };
            if same(&input, &output) {
                bail!(
                    "output: {} is the input: give another path for the converted weights",
                    output.display()
                );
            }
            let venv_python = stylefarm_home().join("venv/bin/python");
            let python = if venv_python.exists() {
                venv_python
            } else {
                PathBuf::from("python3")
            };
            let script = tempfile::Builder::new()
                .suffix(".py")
                .tempfile()
                .context("temporary file")?;
            std::fs::write(script.path(), CONVERTER).context("writing the converter")?;
            let kind = match from {
                SourceKind::TorchvisionPth => "torchvision-pth",
                SourceKind::KerasH5 => "keras-h5",
            };
            // its report on stdout; its error, one line, in ours
            let run = std::process::Command::new(&python)
                .arg(script.path())
                .arg(kind)
                .arg(&input)
                .arg(&output)
                .stdout(std::process::Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", python.display()))?;
            if !run.status.success() {
                let stderr = String::from_utf8_lossy(&run.stderr);
                let why = stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map_or_else(|| run.status.to_string(), |l| l.trim().to_string());
                let why = why.strip_prefix("error: ").unwrap_or(&why);
                bail!("converting {} failed: {why}", input.display());
            }
            Ok(())
        }
    }
}
