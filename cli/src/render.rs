//! `stylefarm render`: one stylized image on this machine.

use std::io::Write;
use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use stylefarm_core::imaging::{Decoded, OutputDepth};
use stylefarm_core::params::ParamArgs;
use stylefarm_core::{imaging, tiling, ImageSize, Init};

use stylefarm_engine::{Engine, Progress, RenderJob, Snapshots};

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum ProgressMode {
    /// A progress bar with the loss and an ETA, on stderr; where stderr is not a terminal (a log file, CI),
    /// a line every few iterations of each scale (PROGRESS_LINE_EVERY) and at its last instead.
    Bar,
    /// One JSON object per iteration on stdout.
    Json,
    /// Nothing.
    None,
}

/// `stylefarm render`'s arguments.
#[derive(Args)]
#[command(allow_negative_numbers = true)]
pub(crate) struct RenderArgs {
    /// Content image: PNG, JPEG, WebP, TIFF, BMP or GIF (EXIF orientation applied, transparency over white).
    #[arg(long)]
    content: PathBuf,
    /// Style images, e.g. `--style a.jpg b.png` or repeated (as `local` and `submit` take them): several
    /// are blended (--style-blend).
    #[arg(long, required = true, num_args = 1..)]
    style: Vec<PathBuf>,
    /// Output image; PNG, JPEG or TIFF by extension. A content image with transparency gives a PNG or TIFF
    /// output its alpha (a JPEG gets the stylized image over white).
    #[arg(long, short, required_unless_present = "evaluate")]
    output: Option<PathBuf>,
    /// Bits per channel of the output: 8, or 16 (PNG and TIFF), from the optimized image's floats.
    #[arg(long, default_value = "8", conflicts_with = "evaluate")]
    output_depth: OutputDepth,
    /// Also write the image every N iterations of each scale, as jcjohnson/neural-style's `-save_iter`
    /// does: beside the output, `<stem>_<iteration>.<ext>` (`<stem>_s<scale>_<iteration>.<ext>` with
    /// several scales), in the output's format and depth, at the scale's size. 0: none, as
    /// `-save_iter 0` is.
    #[arg(long, value_name = "N", conflicts_with = "evaluate")]
    save_every: Option<u32>,
    /// Instead of rendering, print the objective (weighted content, style, tv terms and total, JSON) of this
    /// image against the content and styles at the image's own size: e.g. to compare a tiled output with an
    /// untiled one.
    #[arg(long, conflicts_with = "output")]
    evaluate: Option<PathBuf>,
    #[command(flatten)]
    params: ParamArgs,
    /// Evaluate the objective (and the style targets) in blocks of at most this many px a side, halos
    /// included: the exact gradient of the whole image with the network's memory bound by the block, at
    /// about twice the compute. For outputs whose activations do not fit (see also `local --tiled`).
    #[arg(long, value_parser = clap::value_parser!(u32).range(i64::from(tiling::MIN_TILE_SIZE)..=i64::from(tiling::MAX_TILE_SIZE)))]
    block: Option<u32>,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, env = "STYLEFARM_DEVICE", default_value = "auto")]
    pub(crate) device: String,
    /// VGG19 weights (.safetensors); default: the file deploy/setup.sh converts.
    #[arg(long, env = "STYLEFARM_WEIGHTS")]
    weights: Option<PathBuf>,
    /// bar, json or none.
    #[arg(long, value_enum, default_value = "bar")]
    progress: ProgressMode,
    #[command(flatten)]
    pub(crate) engine: EngineArgs,
    #[command(flatten)]
    pub(crate) memory: crate::nodes::DeviceMemoryArg,
}

/// How the engine runs on its device (`stylefarm_engine::EngineOptions`): shared by `render`, `worker`
/// and `local`.
#[derive(Args, Clone)]
pub(crate) struct EngineArgs {
    /// Keep activations and weights in the channels-last (NHWC) layout, which cuDNN's tensor-core
    /// convolutions and oneDNN's CPU ones prefer; false keeps PyTorch's default (NCHW). The objective is the
    /// same within float rounding. `--channels-last` alone means true.
    #[arg(long, env = "STYLEFARM_CHANNELS_LAST", value_name = "BOOL", action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true",
          default_value_t = stylefarm_engine::EngineOptions::default().channels_last)]
    channels_last: bool,
    /// Let cuDNN run the convolutions in TensorFloat-32 on GPUs that have it (PyTorch's
    /// torch.backends.cudnn.allow_tf32); false holds them, forward and backward, to float32 (the backward
    /// by NVIDIA_TF32_OVERRIDE=0, set for the process). CPUs compute float32 either way.
    #[arg(long, env = "STYLEFARM_TF32", value_name = "BOOL", action = clap::ArgAction::Set,
          default_value_t = stylefarm_engine::EngineOptions::default().tf32)]
    tf32: bool,
    /// Let cuDNN time its algorithms for each new input shape and keep the fastest (PyTorch's
    /// torch.backends.cudnn.benchmark): its trial runs take time at each new shape, and a workspace as
    /// large as the GPU's free memory (or a worker's --device-memory) allows. false takes cuDNN's heuristic
    /// choice at once, as PyTorch does by default. GPUs only.
    #[arg(long, env = "STYLEFARM_CUDNN_BENCHMARK", value_name = "BOOL", action = clap::ArgAction::Set,
          default_value_t = stylefarm_engine::EngineOptions::default().cudnn_benchmark)]
    cudnn_benchmark: bool,
}

impl EngineArgs {
    /// What the options need of the process, set before it starts a thread: with `--tf32 false`,
    /// NVIDIA_TF32_OVERRIDE=0, NVIDIA's switch that holds cuDNN and cuBLAS to float32 when they start.
    /// The engine passes its TF32 choice to each forward convolution (at::_convolution), but their
    /// backward (at::convolution_backward) reads libtorch's global cuDNN flag, which tch cannot set.
    pub(crate) fn prepare_process(&self) {
        if !self.tf32 {
            std::env::set_var("NVIDIA_TF32_OVERRIDE", "0");
        }
    }

    pub(crate) fn options(&self) -> stylefarm_engine::EngineOptions {
        stylefarm_engine::EngineOptions {
            channels_last: self.channels_last,
            tf32: self.tf32,
            cudnn_benchmark: self.cudnn_benchmark,
            // a command's --device-memory, where it has one, sets it
            cpu_memory_bytes: None,
        }
    }
}

/// Every how many iterations `--progress bar` writes a line where stderr is not a terminal: as
/// jcjohnson/neural-style's `-print_iter` default.
pub(crate) const PROGRESS_LINE_EVERY: u32 = 50;

/// The JSON line of `--progress json`.
fn json_line(p: &Progress) -> String {
    serde_json::json!({
        "scale": p.scale,
        "scales": p.scales,
        "iteration": p.iteration,
        "iterations": p.iterations,
        "width": p.width,
        "height": p.height,
        "content_loss": p.losses.content,
        "style_loss": p.losses.style,
        "tv_loss": p.losses.tv,
        "total_loss": p.losses.total,
        "elapsed_s": p.elapsed,
        "eta_s": p.eta,
    })
    .to_string()
}

pub(crate) fn run(args: RenderArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let params = args.params.params()?;
    params.validate(args.style.len())?;
    // `local` and `submit` take a folder for its images; `render` renders one pair
    for (field, path) in
        std::iter::once(("content", &args.content)).chain(args.style.iter().map(|s| ("style", s)))
    {
        if path.is_dir() {
            return Err(stylefarm_core::Error::invalid(
                field,
                format!(
                    "{} is a folder: render takes image files (`stylefarm local --batch` renders a \
                     folder's images)",
                    path.display()
                ),
            )
            .into());
        }
    }
    // one image, whole: no video, no tiles; or no render at all
    params.check_read(stylefarm_core::params::JobReads {
        evaluate: args.evaluate.is_some(),
        ..Default::default()
    })?;
    let save_every = args.save_every.and_then(NonZeroU32::new);
    if let Some(output) = &args.output {
        // before the render: a finished image must not be lost to a folder that is not there, nor
        // written over an input
        let inputs: Vec<&Path> = std::iter::once(args.content.as_path())
            .chain(args.style.iter().map(PathBuf::as_path))
            .chain(params.init.file())
            .collect();
        imaging::check_output_file(output, &inputs)?;
        if let Some(input) = inputs
            .iter()
            .find(|i| save_every.is_some() && is_snapshot_of(output, i))
        {
            anyhow::bail!(
                "save_every: the snapshots of {} would be written over the input {}",
                output.display(),
                input.display()
            );
        }
        if imaging::output_format(output)? == image::ImageFormat::Jpeg
            && args.output_depth == OutputDepth::Sixteen
        {
            anyhow::bail!(
                "output_depth: 16 bits per channel needs a .png or .tif output, not {}",
                output.display()
            );
        }
    }
    let Decoded {
        rgb: content,
        alpha,
    } = imaging::load_full(&args.content)?;
    let styles = args
        .style
        .iter()
        .map(|p| imaging::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let init_image = match &params.init {
        Init::File(path) => Some(imaging::load(path)?),
        Init::Image(hash) => {
            return Err(stylefarm_core::Error::invalid(
                "init",
                format!("image:{hash} names an image uploaded to a farm; give a file's path"),
            )
            .into())
        }
        Init::Job(id) => {
            return Err(stylefarm_core::Error::invalid(
                "init",
                format!(
                    "job:{id} names a farm job's result (stylefarm submit --init job:ID); give a file's \
                     path (./job:... for a file so named)"
                ),
            )
            .into())
        }
        _ => None,
    };
    if args.evaluate.is_none() {
        // before the engine loads: every image must reach the deepest layer at every scale
        let names: Vec<String> = args.style.iter().map(|p| p.display().to_string()).collect();
        let style_sizes: Vec<ImageSize<'_>> = names
            .iter()
            .zip(&styles)
            .map(|(name, img)| ImageSize::new(name, img.dimensions()))
            .collect();
        let content_name = args.content.display().to_string();
        params.check_sizes(
            ImageSize::new(&content_name, content.dimensions()),
            &style_sizes,
            None,
        )?;
    }
    // the image evaluated takes the content's place and size: it must reach the deepest layer (checked
    // before the engine loads)
    let evaluated = match &args.evaluate {
        Some(path) => {
            let image = imaging::load(path)?;
            let ((w, h), layer) = (image.dimensions(), params.deepest_layer());
            if w.min(h) < layer.min_input_side() {
                return Err(stylefarm_core::Error::invalid(
                    "evaluate",
                    format!(
                        "{} is {w} x {h} px; VGG19 needs at least {} px a side to reach {layer}",
                        path.display(),
                        layer.min_input_side()
                    ),
                )
                .into());
            }
            Some(image)
        }
        None => None,
    };
    let inputs_s = started.elapsed().as_secs_f64();
    let device = stylefarm_engine::parse_device(&args.device)?;
    let weights = args
        .weights
        .clone()
        .unwrap_or_else(crate::weights::default_weights);
    let options = stylefarm_engine::EngineOptions {
        cpu_memory_bytes: args.memory.device_memory,
        ..args.engine.options()
    };
    let engine = Engine::load_with(&weights, device, options)?;
    // on a GPU the first load also starts CUDA's context
    let load_s = started.elapsed().as_secs_f64() - inputs_s;
    tracing::info!(?device, weights = %weights.display(), load_s, "engine loaded");
    if let (Some(path), Some(image)) = (&args.evaluate, evaluated) {
        let job = RenderJob {
            block: args.block,
            ..RenderJob::new(content, styles, init_image, params)
        };
        let l = engine.evaluate(&job, &image)?;
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::json!({
                "image": path.display().to_string(),
                "width": image.width(),
                "height": image.height(),
                "content_loss": l.content,
                "style_loss": l.style,
                "tv_loss": l.tv,
                "total_loss": l.total,
            })
        )
        .context("writing the losses to stdout")?;
        return Ok(());
    }
    let output = args.output.as_ref().expect("required without --evaluate");

    let iterations = params.iterations_per_scale();
    let total: u64 = iterations.iter().map(|&n| u64::from(n)).sum();
    let done_before: Vec<u64> = iterations
        .iter()
        .scan(0u64, |acc, &n| {
            let before = *acc;
            *acc += u64::from(n);
            Some(before)
        })
        .collect();
    let bar = match args.progress {
        ProgressMode::Bar => {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} it  {msg}  [{elapsed_precise}]")
                    .expect("template"),
            );
            Some(bar)
        }
        _ => None,
    };
    let stderr_is_terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut stdout = std::io::stdout().lock();
    // the progress' reader left (`| head -1`, a monitor that exited): the render goes on without it
    let mut progress_read = true;
    let mut on_progress = |p: &Progress| {
        match args.progress {
            ProgressMode::Json if progress_read => {
                if let Err(e) = writeln!(stdout, "{}", json_line(p)).and_then(|()| stdout.flush()) {
                    tracing::warn!(error = %e, "progress: stdout is closed; rendering on without it");
                    progress_read = false;
                }
            }
            ProgressMode::Json => {}
            ProgressMode::Bar => {
                let bar = bar.as_ref().expect("bar mode");
                bar.set_position(done_before[p.scale as usize - 1] + u64::from(p.iteration));
                let message = format!(
                    "scale {}/{} {}x{}  loss {:.4e} (content {:.3e}, style {:.3e}, tv {:.3e})  {} left",
                    p.scale,
                    p.scales,
                    p.width,
                    p.height,
                    p.losses.total,
                    p.losses.content,
                    p.losses.style,
                    p.losses.tv,
                    indicatif::HumanDuration(
                        std::time::Duration::try_from_secs_f64(p.eta).unwrap_or_default()
                    )
                );
                // a log has no bar (indicatif draws none there): a line now and then instead
                let due =
                    p.iteration.is_multiple_of(PROGRESS_LINE_EVERY) || p.iteration == p.iterations;
                if !stderr_is_terminal && due {
                    eprintln!("iteration {}/{}  {message}", p.iteration, p.iterations);
                }
                bar.set_message(message);
            }
            ProgressMode::None => {}
        }
        ControlFlow::Continue(())
    };
    let job = RenderJob {
        block: args.block,
        ..RenderJob::new(content, styles, init_image, params)
    };
    // a snapshot is a by-product: one that cannot be read or written (a full disk, a folder of its name)
    // is said, the first one, and counted; the render goes on to its output
    let mut unsaved = 0u32;
    let mut save = |scale: u32, iteration: u32, image: Result<image::Rgb32FImage, _>| {
        let path = snapshot_path(output, (scale, job.params.scales), iteration);
        let saved = image.and_then(|image| {
            Ok(imaging::save_output(
                &image,
                alpha.as_ref(),
                args.output_depth,
                &path,
            )?)
        });
        match saved {
            Ok(()) => tracing::info!(path = %path.display(), scale, iteration, "snapshot written"),
            Err(e) => {
                if unsaved == 0 {
                    eprintln!(
                        "warning: snapshot {} not written: {e}; the render goes on",
                        path.display()
                    );
                }
                unsaved += 1;
            }
        }
        Ok(())
    };
    let mut every =
        |_scale, iteration: u32| save_every.is_some_and(|n| iteration.is_multiple_of(n.get()));
    let snapshots = save_every.map(|_| Snapshots {
        due: &mut every,
        longest: None,
        save: &mut save,
    });
    let rendering = std::time::Instant::now();
    let image = engine
        .render_f32(&job, &mut on_progress, snapshots)
        .map_err(|e| match e.is_out_of_memory() {
            // the way out of a device too small: blocks, or the farm's tiles sized for its workers' memory
            true => anyhow::anyhow!(
                "render failed: {e} (--block bounds the network's memory by a block; `stylefarm local \
                 --tiled` renders a large image, and computes its style targets, in tiles that fit)"
            ),
            false => anyhow::Error::new(e).context("render failed"),
        })?;
    if let Some(bar) = bar {
        bar.finish();
    }
    if unsaved > 1 {
        eprintln!("warning: {unsaved} snapshots not written (the first said above)");
    }
    let render_s = rendering.elapsed().as_secs_f64();
    if let Err(e) = imaging::save_output(&image, alpha.as_ref(), args.output_depth, output) {
        // the render is not lost to a full disk or a folder removed meanwhile: kept where it can be
        let kept = keep_elsewhere(output, |path| {
            imaging::save_output(&image, alpha.as_ref(), args.output_depth, path)
        });
        return Err(match kept {
            Ok(path) => anyhow::anyhow!("{e}; the rendered image is kept in {}", path.display()),
            Err(kept) => anyhow::anyhow!(
                "{e}; the rendered image is lost: it could not be kept in the temporary folder either \
                 ({kept})"
            ),
        });
    }
    // where a render's wall time goes, for start-up figures (bench/gpu.sh): decoding and checking the
    // inputs, loading the engine, rendering (with --save-every's snapshots), writing the output (the rest
    // is the process's start and exit)
    tracing::info!(
        inputs_s,
        load_s,
        render_s,
        write_s = started.elapsed().as_secs_f64() - inputs_s - load_s - render_s,
        "render timed"
    );
    eprintln!(
        "wrote {} ({}x{})",
        output.display(),
        image.width(),
        image.height()
    );
    Ok(())
}

/// Writes a render whose `output` could not be written, with `save`, to a new file of the temporary folder
/// (`$TMPDIR`, `/tmp`): `stylefarm-<output's stem>-XXXXXX.<output's extension>`; returns its path.
fn keep_elsewhere(
    output: &Path,
    save: impl FnOnce(&Path) -> Result<(), stylefarm_core::Error>,
) -> anyhow::Result<PathBuf> {
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    let extension = output.extension().unwrap_or_default().to_string_lossy();
    let (_, path) = tempfile::Builder::new()
        .prefix(&format!("stylefarm-{stem}-"))
        .suffix(&format!(".{extension}"))
        .tempfile()?
        .keep()?;
    if let Err(e) = save(&path) {
        let _ = std::fs::remove_file(&path);
        return Err(e.into());
    }
    Ok(path)
}

/// Where `render --save-every` writes the image of `iteration` at `scale` of `scales`: beside `output`,
/// `<stem>_<iteration>.<ext>`, or `<stem>_s<scale>_<iteration>.<ext>` with several scales.
fn snapshot_path(output: &Path, (scale, scales): (u32, u32), iteration: u32) -> PathBuf {
    // joined, not set_extension's: a stem with a dot (`cat.styled`) keeps its name
    let mut name = output.file_stem().unwrap_or_default().to_os_string();
    name.push(match scales {
        1 => format!("_{iteration}"),
        _ => format!("_s{scale}_{iteration}"),
    });
    if let Some(ext) = output.extension() {
        name.push(".");
        name.push(ext);
    }
    output.with_file_name(name)
}

/// Whether `render --save-every` could write a snapshot of `output` ([`snapshot_path`]) over `file`:
/// `file` is in `output`'s folder and named as a snapshot of it.
fn is_snapshot_of(output: &Path, file: &Path) -> bool {
    let folder = |p: &Path| {
        let parent = p.parent().filter(|p| !p.as_os_str().is_empty());
        parent.unwrap_or(Path::new(".")).canonicalize().ok()
    };
    let (Some(name), Some(stem)) = (file.file_name(), output.file_stem()) else {
        return false;
    };
    let (name, stem) = (name.to_string_lossy(), stem.to_string_lossy());
    let ext = output
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let Some(middle) = name
        .strip_prefix(&format!("{stem}_"))
        .and_then(|rest| rest.strip_suffix(&ext))
    else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let named = digits(middle)
        || middle
            .strip_prefix('s')
            .and_then(|m| m.split_once('_'))
            .is_some_and(|(scale, iteration)| digits(scale) && digits(iteration));
    named && folder(output).is_some_and(|f| folder(file) == Some(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot is named after the output's whole stem, dots and all: `cat.styled.jpg`'s first is
    /// `cat.styled_100.jpg`, not `cat.jpg` (set_extension's reading of `cat.styled_100`), which could be
    /// the content image.
    #[test]
    fn a_snapshot_keeps_the_output_s_name_and_never_names_an_input() {
        let at = |out: &str, scales, iteration| {
            snapshot_path(Path::new(out), (1, scales), iteration)
                .display()
                .to_string()
        };
        assert_eq!(at("out/cat.styled.jpg", 1, 100), "out/cat.styled_100.jpg");
        assert_eq!(at("v1.2.png", 2, 5), "v1.2_s1_5.png");
        assert_eq!(at("result", 1, 7), "result_7");
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, b"").unwrap();
            path
        };
        let output = dir.path().join("cat.styled.jpg");
        for name in ["cat.styled_100.jpg", "cat.styled_s2_40.jpg"] {
            assert!(is_snapshot_of(&output, &file(name)), "{name}");
        }
        for name in [
            "cat.jpg",
            "cat.styled_x.jpg",
            "cat.styled_100.png",
            "cat.styled_s2.jpg",
        ] {
            assert!(!is_snapshot_of(&output, &file(name)), "{name}");
        }
        // named as one, in another folder
        let other = tempfile::tempdir().unwrap();
        let elsewhere = other.path().join("cat.styled_100.jpg");
        std::fs::write(&elsewhere, b"").unwrap();
        assert!(!is_snapshot_of(&output, &elsewhere));
    }
}
