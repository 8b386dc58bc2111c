//! One render: the optimizer over the objective (`crate::objective`), multi-scale, progress, cancellation.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::rc::Rc;
use std::time::Instant;

use image::{Rgb32FImage, RgbImage};
use stylefarm_core::checkpoint::{AdamMoments, CheckpointEvery, CheckpointFile};
use stylefarm_core::imaging;
use stylefarm_core::job::CheckpointBounds;
use stylefarm_core::{memory, ImageSize, Init, Optimizer, RenderParams};
use tch::{Device, Kind, Tensor};

use crate::budget::{self, Reservation};
use crate::engine::Engine;
use crate::objective::{to_f64s, LossTerms, StyleGrams};
use crate::optim::{Adam, AdamState, IterateAverage, Lbfgs, Reduction};
use crate::shard::Shard;
use crate::Error;
use stylefarm_core::progress::TaskProgress;

/// The images and parameters of one render.
#[derive(Debug, Clone)]
pub struct RenderJob {
    /// The content image at any size: each scale resizes it to that scale's working size.
    pub content: RgbImage,
    /// The style images at any size, resized to each scale's style side and blended by `params.style_blend`.
    pub styles: Vec<RgbImage>,
    /// The init image when `params.init` is [`Init::Image`].
    pub init_image: Option<RgbImage>,
    /// The render's parameters, checked by [`RenderJob::check`] before any tensor work.
    pub params: RenderParams,
    /// The longest side the style targets are sized for (style images get `round(style_longest *
    /// style_scale)`); `None`: each scale's working size. A tile of a larger canvas sets the canvas' size.
    pub style_longest: Option<u32>,
    /// Evaluate the objective in blocks of at most this many px a side, halos included (the exact
    /// gradient of the whole image, with memory bound by the block; [`Engine::objective_blocked`]).
    pub block: Option<u32>,
    /// A video frame's previous frame: where its content matches this one's (within
    /// [`imaging::TEMPORAL_TOLERANCE`], followed along the optical flow with `params.optical_flow`), the
    /// render starts from its result (elsewhere from `params.init`) and the temporal loss
    /// (`params.temporal_weight`) holds it there. None for other renders.
    pub previous: Option<PreviousFrameImages>,
    /// Exact mode over several workers: the shard of the canvas this render optimizes ([`crate::shard`]);
    /// `content` and `init_image` are its region, the result its own rows. Needs `block` and one scale.
    /// None for other renders.
    pub shard: Option<Shard>,
}

/// The previous frame of a video frame, as images at any size (each scale resizes them to its own).
#[derive(Debug, Clone)]
pub struct PreviousFrameImages {
    /// The previous frame's content.
    pub content: RgbImage,
    /// The previous frame's rendered result.
    pub result: RgbImage,
}

impl RenderJob {
    /// A render of `content` in the style of `styles`, its style targets sized for each scale's working size
    /// (`style_longest: None`) and its objective evaluated on the whole image (`block: None`); the styles
    /// as [`styles_for`] matches them to the content (luminance-only transfer, colour matching).
    pub fn new(
        content: RgbImage,
        styles: Vec<RgbImage>,
        init_image: Option<RgbImage>,
        params: RenderParams,
    ) -> RenderJob {
        let styles = styles_for(styles, &content, &params);
        RenderJob::with_styles(content, styles, init_image, params)
    }

    /// [`RenderJob::new`] with `styles` as they are: already those of [`styles_for`] (a worker's, matched
    /// once for all the tasks of a content; a tile's, matched to the whole content and not to its window).
    pub fn with_styles(
        content: RgbImage,
        styles: Vec<RgbImage>,
        init_image: Option<RgbImage>,
        params: RenderParams,
    ) -> RenderJob {
        RenderJob {
            content,
            styles,
            init_image,
            params,
            style_longest: None,
            block: None,
            previous: None,
            shard: None,
        }
    }
}

/// How a render's style images are matched to its content, after Gatys et al. (2016) ([`styles_for`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StyleMatch {
    /// Luminance-only transfer ([`RenderParams::luminance_only`]): each style's luminance matched to the
    /// content's ([`imaging::matched_luminance`]).
    Luminance,
    /// Colour histogram matching ([`RenderParams::match_colors`]): each style's colours moved to the
    /// content's ([`imaging::matched_colors`]).
    Colors,
}

impl StyleMatch {
    /// The match `params` ask for; `None`: the styles as given.
    pub fn of(params: &RenderParams) -> Option<StyleMatch> {
        if params.luminance_only {
            Some(StyleMatch::Luminance)
        } else if params.match_colors {
            Some(StyleMatch::Colors)
        } else {
            None
        }
    }

    /// What it matches, for people and cache keys: `luminance` or `colours`.
    pub fn name(self) -> &'static str {
        match self {
            StyleMatch::Luminance => "luminance",
            StyleMatch::Colors => "colours",
        }
    }

    /// `style` matched to `content`.
    pub fn apply(self, style: &RgbImage, content: &RgbImage) -> RgbImage {
        match self {
            StyleMatch::Luminance => imaging::matched_luminance(style, content),
            StyleMatch::Colors => imaging::matched_colors(style, content),
        }
    }
}

/// The style images as a render of `content` takes them: as given, or matched to the content as `params`
/// ask ([`StyleMatch`]).
pub fn styles_for(
    styles: Vec<RgbImage>,
    content: &RgbImage,
    params: &RenderParams,
) -> Vec<RgbImage> {
    match StyleMatch::of(params) {
        None => styles,
        Some(m) => styles.iter().map(|style| m.apply(style, content)).collect(),
    }
}

impl RenderJob {
    /// Checks the parameters, and that every image reaches the deepest layer at every scale
    /// ([`RenderParams::check_sizes`]), before any tensor work.
    pub fn check(&self) -> Result<(), Error> {
        if self.previous.is_some() && self.block.is_some() {
            return Err(crate::objective::whole_frames_only());
        }
        if self.params.normalize_gradients && self.block.is_some() {
            return Err(crate::objective::not_with_blocks());
        }
        if let Some(shard) = &self.shard {
            shard.check()?;
            let invalid = |field: &'static str, message: &str| {
                Err(Error::Core(stylefarm_core::Error::invalid(field, message)))
            };
            if self.params.scales != 1 || self.previous.is_some() {
                return invalid("shard", "a shard renders one scale of a tiled job");
            }
            let Some(block) = self.block else {
                return invalid("shard", "a shard is evaluated in blocks");
            };
            let (y0, y1) = shard.region(block);
            if self.content.dimensions() != (shard.canvas.0, y1 - y0) {
                return invalid(
                    "shard",
                    &format!(
                        "the content is {}x{}, the shard's region {}x{}",
                        self.content.width(),
                        self.content.height(),
                        shard.canvas.0,
                        y1 - y0
                    ),
                );
            }
        }
        check_inputs(
            &self.params,
            self.content.dimensions(),
            &self.styles,
            self.style_longest,
        )
    }
}

/// [`RenderJob::check`] of `params` for a content of `content` px and `styles`.
fn check_inputs(
    params: &RenderParams,
    content: (u32, u32),
    styles: &[RgbImage],
    style_longest: Option<u32>,
) -> Result<(), Error> {
    params.validate(styles.len())?;
    let names: Vec<String> = (1..=styles.len()).map(|i| format!("#{i}")).collect();
    let styles: Vec<ImageSize<'_>> = styles
        .iter()
        .zip(&names)
        .map(|(img, name)| ImageSize::new(name, img.dimensions()))
        .collect();
    let content = ImageSize::new("", content);
    Ok(params.check_sizes(content, &styles, style_longest)?)
}

/// Where [`Engine::render_with`] gets the style targets of a style side: e.g. a cache shared across tasks.
pub type StyleSource<'a> = dyn FnMut(&Engine, u32) -> Result<Rc<StyleGrams>, Error> + 'a;

/// Reported once per evaluation of the objective: iteration 0 is the initial image of a scale, iteration k
/// the image after k steps.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// 1-based scale, and the number of scales.
    pub scale: u32,
    /// Number of scales of the render.
    pub scales: u32,
    /// Which image of this scale was evaluated: 0 its initial image, k the image after k optimizer steps.
    pub iteration: u32,
    /// Iterations of this scale.
    pub iterations: u32,
    /// Width of this scale's image, in px.
    pub width: u32,
    /// Height of this scale's image, in px.
    pub height: u32,
    /// The weighted loss terms of the image at `iteration`.
    pub losses: LossTerms,
    /// Seconds since the render started.
    pub elapsed: f64,
    /// Seconds left, estimated: this scale's iterations left at its mean rate so far (from the scale's
    /// start, its style and content targets done), and each later scale's at that rate times its pixels over
    /// this scale's (an iteration's cost follows the pixels). The later scales' targets are not counted.
    pub eta: f64,
}

impl From<&Progress> for TaskProgress {
    /// What the farm reports of a render's progress: scale, iteration and losses.
    fn from(p: &Progress) -> TaskProgress {
        TaskProgress {
            scale: p.scale,
            scales: p.scales,
            iteration: p.iteration,
            iterations: p.iterations,
            losses: p.losses,
            eta_seconds: p.eta,
        }
    }
}

/// An input image as the optimization sees it: its luminance in luminance-only transfer
/// ([`RenderParams::luminance_only`]; the content's chroma is put back on the result), else itself.
pub(crate) fn optimized(img: RgbImage, params: &RenderParams) -> RgbImage {
    if params.luminance_only {
        imaging::luminance(&img)
    } else {
        img
    }
}

/// Images of a render as it goes: jcjohnson/neural-style's `-save_iter` (`render --save-every N`, every N
/// iterations) and a worker's previews (every few seconds). `due` is asked, with the scale (1-based) and
/// the iteration (the image after that many steps of the scale), before each evaluation from the scale's
/// first step on and once more at the scale's end (an iteration is asked about once); when it says yes,
/// `save` gets them with the image as the render's result would be at that point: deprocessed, with the
/// content's colours where asked ([`RenderParams::original_colors`], [`RenderParams::luminance_only`]),
/// in floats (0..255), at the scale's size (a tile's or a shard's: its window), or shrunk to `longest`.
/// Only an image saved is read from the device.
pub struct Snapshots<'a> {
    /// Whether the image of (scale, iteration) is wanted.
    pub due: &'a mut dyn FnMut(u32, u32) -> bool,
    /// The image's longer side at most this, px: shrunk on the device (an area average,
    /// `adaptive_avg_pool2d`) before it is read and its colours are transferred. `None`: the scale's size.
    pub longest: Option<u32>,
    /// Gets each image, or the error that reading it met (a panic in libtorch included: the render goes
    /// on unless `save` passes the error on); its own error ends the render.
    pub save: &'a mut dyn FnMut(u32, u32, Result<Rgb32FImage, Error>) -> Result<(), Error>,
}

/// A render's checkpoints ([`stylefarm_core::checkpoint`]): the one it starts from, and where it saves
/// new ones. A checkpoint that does not fit the render (of another scale size, a scale or iteration it
/// does not have, other weights' preprocessing: [`CheckpointBounds::check`] and more) is ignored with a
/// warning: the render starts from the beginning. A shard of an exact-mode scale neither resumes nor
/// saves.
pub struct Checkpointing<'a> {
    /// The checkpoint to start from: the render skips the scales before its scale and starts that one
    /// from its image at its iteration; Adam from its moments (it goes on as it would have), L-BFGS
    /// afresh; the iterate average from its average.
    pub resume: Option<CheckpointFile>,
    /// When to save one ([`CheckpointEvery::due`]): every so many iterations of each scale, or at most
    /// every so many seconds of the render (timed from its first evaluation, then from the last
    /// checkpoint, across scales); never at a scale's first or last image.
    pub every: CheckpointEvery,
    /// Gets each checkpoint, its image (and Adam's moments) read from the device (one host sync per
    /// checkpoint); its error ends the render.
    pub save: &'a mut dyn FnMut(CheckpointFile) -> Result<(), Error>,
}

/// How many evaluations' losses a render on a GPU reads back at once (progress, cancellation), and every
/// how many iterations L-BFGS reads whether it stopped ([`crate::optim::Lbfgs::check_every`]): a read
/// waits for the device to finish its queue, and a queue that runs empty idles the device while the host
/// launches the next kernels. On the CPU each evaluation's losses are read as they come (nothing to wait
/// for).
pub const GPU_READ_INTERVAL: usize = 10;

/// The error for losses read at `iteration` of `scale` that are not finite (a weight too large for
/// float32, the precision of the losses, overflows them; the image is lost past it); `None` when every
/// term is finite. It names the weight of the term that is not finite; when several are (the image itself
/// went), of the largest term in `before`, the last finite losses read, or without those (the first
/// losses: each term is the start image's with its weight), of the first term that is not finite. When
/// only the terms' sum overflowed, of the largest term.
fn not_finite(
    losses: &LossTerms,
    before: Option<&LossTerms>,
    optimizer: Optimizer,
    iteration: u32,
    scale: u32,
) -> Option<Error> {
    if losses.total.is_finite() {
        return None;
    }
    // from losses far inside float32's range to past it in one step: Adam's step threw the image
    // out (a learning rate of 1e10), not a weight that overflowed
    if let (Optimizer::Adam, Some(before)) = (optimizer, before) {
        if before.total < f64::from(f32::MAX) * 1e-6 {
            return Some(Error::Core(stylefarm_core::Error::invalid(
                "learning_rate",
                format!(
                    "the losses became {} at iteration {iteration} of scale {scale}, from {:e} at the \
                     iteration before: Adam's steps diverged; lower learning_rate",
                    losses.total, before.total
                ),
            )));
        }
    }
    let largest = largest_term;
    let gone: Vec<_> = loss_terms(losses)
        .into_iter()
        .filter(|(_, v, _)| !v.is_finite())
        .collect();
    let (weight, why) = match (gone.as_slice(), before) {
        ([(term, value, weight)], _) | ([(term, value, weight), ..], None) => {
            (*weight, format!("the {term} loss became {value}"))
        }
        ([], _) => {
            let (term, value, weight) = largest(losses);
            let why = format!(
                "the losses' sum became {}, with a {term} loss of {value:e}",
                losses.total
            );
            (weight, why)
        }
        (_, Some(before)) => {
            let (term, value, weight) = largest(before);
            let why = format!(
                "the losses became {}, after a {term} loss of {value:e}",
                losses.total
            );
            (weight, why)
        }
    };
    Some(Error::Core(stylefarm_core::Error::invalid(
        weight,
        format!(
            "{why} at iteration {iteration} of scale {scale}: the weights overflow float32 (the \
             losses' precision); lower {weight}"
        ),
    )))
}

/// A loss' terms: each one's name, value and weight's name.
fn loss_terms(l: &LossTerms) -> [(&'static str, f64, &'static str); 4] {
    [
        ("content", l.content, "content_weight"),
        ("style", l.style, "style_weight"),
        ("total variation", l.tv, "tv_weight"),
        ("temporal", l.temporal, "temporal_weight"),
    ]
}

/// The largest of a loss' terms ([`loss_terms`]).
fn largest_term(l: &LossTerms) -> (&'static str, f64, &'static str) {
    (loss_terms(l).into_iter())
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("style", l.style, "style_weight"))
}

/// The error for Adam's second moment (the squared gradient's running mean) found past float32 at
/// `iteration` of `scale`, the losses then `losses`: where it is infinite Adam's step is 0, and the image
/// stops changing while every loss stays finite (a style weight of 1e25 at 64 px rendered the content
/// itself, saying nothing). It names the weight of the largest term.
fn adam_overflowed(losses: &LossTerms, iteration: u32, scale: u32) -> Error {
    let (term, value, weight) = largest_term(losses);
    Error::Core(stylefarm_core::Error::invalid(
        weight,
        format!(
            "Adam's squared gradient overflowed float32 at iteration {iteration} of scale {scale}, with a \
             {term} loss of {value:e}: the image stops changing; lower {weight}"
        ),
    ))
}

impl Engine {
    /// The objective of `job` evaluated at an image of the output's size (e.g. to measure a finished render).
    pub fn evaluate(&self, job: &RenderJob, image: &RgbImage) -> Result<LossTerms, Error> {
        let (w, h) = image.dimensions();
        // the image is the output: its size is the one scale's
        let params = RenderParams {
            size: w.max(h),
            scales: 1,
            scale_iterations: Vec::new(),
            ..job.params.clone()
        };
        check_inputs(&params, (w, h), &job.styles, job.style_longest)?;
        let _memory = self.check_memory_of(job, &params, (w, h), Some("evaluate"))?;
        let content = optimized(imaging::resize(&job.content, w, h), &params);
        // a tile's style targets are its canvas' (style_longest), as its render's
        let longest = job.style_longest.unwrap_or(w.max(h));
        let grams =
            self.style_grams(&job.styles, params.style_side(longest), &params, job.block)?;
        let mut targets = self.scale_targets(&content, &grams, &params, job.block, None)?;
        if let Some(p) = &job.previous {
            targets
                .set_temporal(self.temporal_target(&content, &p.content, &p.result, &params)?)?;
        }
        let grey;
        let image = if params.luminance_only {
            grey = imaging::luminance(image);
            &grey
        } else {
            image
        };
        let x = self.vgg().preprocessing().preprocess(image, self.device());
        self.scale_losses(&x, &targets, &params)
    }

    fn initial(&self, job: &RenderJob, content: &RgbImage) -> Result<Tensor, Error> {
        let pre = self.vgg().preprocessing();
        let (w, h) = content.dimensions();
        Ok(match &job.params.init {
            Init::Content => pre.preprocess(content, self.device()),
            // the seeded inits, drawn on the CPU (the same pixels on any device)
            init @ (Init::Noise | Init::Gray | Init::Uniform | Init::StyleMean) => {
                tch::manual_seed(job.params.seed as i64);
                let shape = [1, 3, i64::from(h), i64::from(w)];
                let x = match init {
                    // jcjohnson's: Gaussian, in the weights' space
                    Init::Noise => {
                        Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_device(self.device())
                            * pre.noise_sigma()
                    }
                    // crowsonkb/style-transfer-pytorch's, in 0..255 units: a level of uniform noise on
                    // mid grey or the styles' mean colour, or uniform noise over the whole range
                    _ => {
                        let u = Tensor::rand(shape, (Kind::Float, Device::Cpu));
                        let rgb = match init {
                            Init::Gray => u + 127.5,
                            Init::Uniform => u * 255.0,
                            _ => u + Tensor::from_slice(&style_mean(job)).reshape([1, 3, 1, 1]),
                        };
                        pre.input_of_rgb(&rgb.to_device(self.device()))
                    }
                };
                if job.params.luminance_only {
                    pre.luminance(&x)
                } else {
                    x
                }
            }
            init @ (Init::File(_) | Init::Image(_)) => {
                let img = job.init_image.as_ref().ok_or_else(|| {
                    stylefarm_core::Error::invalid("init", format!("{init}: init image not loaded"))
                })?;
                let img = optimized(imaging::resize(img, w, h), &job.params);
                pre.preprocess(&img, self.device())
            }
            Init::Job(id) => {
                return Err(stylefarm_core::Error::invalid(
                    "init",
                    format!(
                        "job:{id} is a farm job's result, which its coordinator hands over first"
                    ),
                )
                .into())
            }
        })
    }

    /// Renders `job`; `on_progress` sees every evaluation and may stop the render ([`Error::Cancelled`]).
    pub fn render(
        &self,
        job: &RenderJob,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<RgbImage, Error> {
        self.render_with(
            job,
            &mut |engine, side| engine.own_style_grams(job, side),
            on_progress,
            None,
            None,
        )
    }

    /// Refuses `job` when its largest scale needs more memory than [`Engine::memory_bytes`] by stylefarm's
    /// estimate: the optimized image's ([`memory::render_bytes`]; with blocks,
    /// [`memory::blocked_render_bytes`]), then the style targets' of each style image at its style side
    /// ([`memory::style_targets_bytes`]; a block's with blocks), computed one at a time before it. A
    /// render past the machine's memory is killed by the kernel once its pages are touched (a worker with
    /// it), after minutes of work. A tile's or a shard's style targets, of its canvas
    /// ([`RenderJob::style_longest`]) and in blocks of the tile, are not counted. The error is
    /// [`Error::OutOfMemory`], naming `size`, or for the style targets the option that sizes the style
    /// images (`style_size` where set, else `style_scale`) and which style image. On a CPU the larger of
    /// the two is then taken from the process' budget ([`budget::CPU`], the machine's memory), waiting
    /// while the other renders of the process hold too much of it; the reservation returned is given
    /// back when dropped, once the render ends.
    fn check_memory(&self, job: &RenderJob) -> Result<Option<Reservation<'static>>, Error> {
        let params = &job.params;
        let longest = params
            .sizes_per_scale()
            .into_iter()
            .max()
            .unwrap_or(params.size);
        let (w, h) = imaging::working_size(job.content.width(), job.content.height(), longest);
        self.check_memory_of(job, params, (w, h), None)
    }

    /// [`Self::check_memory`] of `job` with `params` at its largest scale, whose image is `w` x `h`: an
    /// optimization's, or with `evaluated` (the field of the image evaluated) one evaluation of its
    /// objective, a forward pass without the backward's activations, counted as the style targets'
    /// ([`memory::STYLE_TARGET_BYTES_PER_PX`]).
    fn check_memory_of(
        &self,
        job: &RenderJob,
        params: &RenderParams,
        (w, h): (u32, u32),
        evaluated: Option<&str>,
    ) -> Result<Option<Reservation<'static>>, Error> {
        let Some(limit) = self.memory_bytes() else {
            return Ok(None);
        };
        let longest = w.max(h);
        let too_much = |field: &str, what: String, need: u64| {
            Err(Error::OutOfMemory(format!(
                "{field}: {what} needs about {} of memory by stylefarm's estimate, more than the {} \
                 {}",
                bytesize::ByteSize(need),
                bytesize::ByteSize(limit),
                match self.options().cpu_memory_bytes {
                    Some(_) => "given by --device-memory",
                    None => "this machine has",
                }
            )))
        };
        let need = match (evaluated, job.block) {
            (Some(_), Some(block)) => memory::blocked_evaluate_bytes(w, h, block),
            (Some(_), None) => memory::style_targets_bytes(w, h),
            (None, Some(block)) => memory::blocked_render_bytes(w, h, block, params),
            (None, None) => memory::render_bytes(w, h, params),
        };
        if need > limit {
            return match evaluated {
                Some(field) => too_much(field, format!("evaluating a {w} x {h} image"), need),
                None => {
                    let what = format!(
                        "a {w} x {h} render (VGG19's activations for the backward pass and the \
                         optimizer's state)"
                    );
                    too_much("size", what, need)
                }
            };
        }
        let mut peak = need;
        if job.style_longest.is_none() {
            let side = params.style_side(longest);
            for (i, style) in job.styles.iter().enumerate() {
                let (w, h) = imaging::working_size(style.width(), style.height(), side);
                let need = match job.block {
                    Some(b) if w.max(h) > b => memory::style_targets_bytes(b.min(w), b.min(h)),
                    _ => memory::style_targets_bytes(w, h),
                };
                if need > limit {
                    let field = if params.style_size > 0 {
                        "style_size"
                    } else {
                        "style_scale"
                    };
                    let which = match job.styles.len() {
                        1 => "the style image".to_string(),
                        n => format!("style image {} of {n}", i + 1),
                    };
                    let what =
                        format!("{which} at {w} x {h}, for its style targets (Gram matrices),");
                    return too_much(field, what, need);
                }
                peak = peak.max(need);
            }
        }
        // the process' CPU renders share the machine: taken from its budget, waiting for others if need be
        let Some(machine) = self.machine_memory() else {
            return Ok(None);
        };
        budget::CPU
            .reserve(peak, machine, job.shard.is_none())
            .map(Some)
    }

    /// The style targets of `job`'s own style images at a style side, computed afresh.
    fn own_style_grams(&self, job: &RenderJob, side: u32) -> Result<Rc<StyleGrams>, Error> {
        Ok(Rc::new(self.style_grams(
            &job.styles,
            side,
            &job.params,
            job.block,
        )?))
    }

    /// Renders `job` with the style targets of each scale from `style_for(self, style side)`: a cache
    /// shared across tasks, or blocked Grams of a large canvas; from a checkpoint, and saving them, with
    /// `checkpointing`.
    pub fn render_with(
        &self,
        job: &RenderJob,
        style_for: &mut StyleSource<'_>,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
        snapshots: Option<Snapshots<'_>>,
        checkpointing: Option<Checkpointing<'_>>,
    ) -> Result<RgbImage, Error> {
        let x = self.optimize(job, style_for, on_progress, snapshots, checkpointing)?;
        let out = self.vgg().preprocessing().deprocess(&x)?;
        let out = if job.params.original_colors || job.params.luminance_only {
            imaging::original_colors(&out, &job.content)
        } else {
            out
        };
        Ok(match (&job.shard, job.block) {
            // a shard's result is its own rows of the region it optimized
            (Some(shard), Some(block)) => {
                let top = shard.rows.0 - shard.region(block).0;
                let (w, rows) = (out.width(), shard.rows.1 - shard.rows.0);
                image::imageops::crop_imm(&out, 0, top, w, rows).to_image()
            }
            _ => out,
        })
    }

    /// Renders `job` as [`Self::render`] does, the result in floats (0..255, clamped, not rounded): for
    /// outputs of 16 bits per channel.
    pub fn render_f32(
        &self,
        job: &RenderJob,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
        snapshots: Option<Snapshots<'_>>,
    ) -> Result<Rgb32FImage, Error> {
        if job.shard.is_some() {
            return Err(Error::Core(stylefarm_core::Error::invalid(
                "shard",
                "a shard renders 8 bits per channel",
            )));
        }
        let x = self.optimize(
            job,
            &mut |engine, side| engine.own_style_grams(job, side),
            on_progress,
            snapshots,
            None,
        )?;
        self.result_f32(job, &x)
    }

    /// The result image of `x` (preprocessed, `1 x 3 x H x W`) in floats: deprocessed, with the content's
    /// colours where asked.
    fn result_f32(&self, job: &RenderJob, x: &Tensor) -> Result<Rgb32FImage, Error> {
        self.result_f32_with(job, x, &mut None)
    }

    /// [`Self::result_f32`], the content at the result's size taken from `content` when it has that size
    /// (else resized from the job's, and kept there): a render's previews, all of one size a scale, resize
    /// the content once, not at each (a large photo's resize, on the engine thread while the device
    /// waits).
    fn result_f32_with(
        &self,
        job: &RenderJob,
        x: &Tensor,
        content: &mut Option<RgbImage>,
    ) -> Result<Rgb32FImage, Error> {
        let out = self.vgg().preprocessing().deprocess_f32(x)?;
        if !(job.params.original_colors || job.params.luminance_only) {
            return Ok(out);
        }
        let size = out.dimensions();
        let at_size = match content.take() {
            Some(c) if c.dimensions() == size => c,
            _ => imaging::resize(&job.content, size.0, size.1),
        };
        Ok(imaging::original_colors_f32(&out, content.insert(at_size)))
    }

    /// [`Self::result_f32`] of `x` for a [`Snapshots`], shrunk first on the device to `longest` px when
    /// larger. A panic in libtorch while it is read is an error, so that a snapshot that fails need not
    /// fail the render.
    fn snapshot(
        &self,
        job: &RenderJob,
        x: &Tensor,
        longest: Option<u32>,
        content: &mut Option<RgbImage>,
    ) -> Result<Rgb32FImage, Error> {
        let read = || {
            let (h, w) = (x.size()[2] as u32, x.size()[3] as u32);
            let small = match longest {
                Some(longest) if w.max(h) > longest => {
                    let (sw, sh) = imaging::working_size(w, h, longest);
                    x.f_adaptive_avg_pool2d([i64::from(sh), i64::from(sw)])?
                }
                _ => x.shallow_clone(),
            };
            self.result_f32_with(job, &small, content)
        };
        tch::no_grad(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)))
            .unwrap_or_else(|payload| {
                let message = stylefarm_core::panic_message(payload.as_ref());
                Err(Error::Torch(tch::TchError::Torch(format!(
                    "panicked: {message}"
                ))))
            })
    }

    /// The checkpoint of `checkpointing` when it fits `job` (see [`Checkpointing`]), else `None` with a
    /// warning.
    fn resume_from(
        &self,
        job: &RenderJob,
        checkpointing: Option<&mut Checkpointing<'_>>,
    ) -> Option<CheckpointFile> {
        let file = checkpointing?.resume.take()?;
        let scale = file.scale as usize;
        let preprocessing = self.vgg().preprocessing().name();
        // the scale, iteration and size as the coordinator checks them, then what only the engine knows
        let unfit = if let Err(e) = CheckpointBounds::of_render(&job.params).check(
            file.scale,
            file.iteration,
            file.width,
            file.height,
        ) {
            Some(e.to_string())
        } else if file.preprocessing != preprocessing {
            Some(format!("these weights' preprocessing is {preprocessing}"))
        } else if [
            Some(&file.values),
            file.adam.as_ref().map(|a| &a.m),
            file.adam.as_ref().map(|a| &a.v),
            file.average.as_ref(),
        ]
        .into_iter()
        .flatten()
        .any(|v| v.len() as u64 != 3 * u64::from(file.width) * u64::from(file.height))
        {
            Some("its values are not 3 x height x width".to_string())
        } else {
            let longest = job.params.sizes_per_scale()[scale - 1];
            let (w, h) = imaging::working_size(job.content.width(), job.content.height(), longest);
            ((w, h) != (file.width, file.height))
                .then(|| format!("the render's scale {scale} is {w} x {h}"))
        };
        match unfit {
            Some(why) => {
                tracing::warn!(
                    scale = file.scale,
                    iteration = file.iteration,
                    width = file.width,
                    height = file.height,
                    "the checkpoint does not fit the render ({why}): starting from the beginning"
                );
                None
            }
            None => Some(file),
        }
    }

    /// A checkpoint of `scale` at `iteration`: `x`'s values, Adam's moments (`adam`) and the iterate
    /// average's sum (`average`), read from the device.
    fn checkpoint_of(
        &self,
        x: &Tensor,
        adam: Option<&AdamState>,
        average: Option<&IterateAverage>,
        scale: u32,
        iteration: u32,
    ) -> Result<CheckpointFile, Error> {
        let (h, w) = (x.size()[2] as u32, x.size()[3] as u32);
        let read = |t: &Tensor| -> Result<Vec<f32>, Error> {
            let values = tch::no_grad(|| {
                t.f_to_kind(Kind::Float)?
                    .f_contiguous()?
                    .flatten(0, -1)
                    .f_to_device(Device::Cpu)
            })?;
            Ok(Vec::<f32>::try_from(&values)?)
        };
        Ok(CheckpointFile {
            scale,
            iteration,
            width: w,
            height: h,
            preprocessing: self.vgg().preprocessing().name().into(),
            values: read(x)?,
            adam: match adam {
                Some(state) => Some(AdamMoments {
                    m: read(&state.m)?,
                    v: read(&state.v)?,
                }),
                None => None,
            },
            average: average.map(|a| read(&a.sum)).transpose()?,
        })
    }

    /// Every scale's optimization (from a checkpoint's scale and iteration where `checkpointing` has one
    /// that fits); the optimized image, preprocessed (`1 x 3 x H x W`).
    fn optimize(
        &self,
        job: &RenderJob,
        style_for: &mut StyleSource<'_>,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
        mut snapshots: Option<Snapshots<'_>>,
        mut checkpointing: Option<Checkpointing<'_>>,
    ) -> Result<Tensor, Error> {
        job.check()?;
        let _memory = self.check_memory(job)?;
        let params = &job.params;
        let started = Instant::now();
        let sizes = params.sizes_per_scale();
        let iterations = params.iterations_per_scale();
        let scales = sizes.len() as u32;
        // a shard of an exact-mode scale starts with its group, from the beginning, and saves nothing
        if job.shard.is_some() {
            checkpointing = None;
        }
        let mut resume = self.resume_from(job, checkpointing.as_mut());
        // when the last checkpoint was saved (the render's first evaluation before the first): the time
        // spent on its first scale's targets is not time a checkpoint would keep
        let mut last_checkpoint: Option<Instant> = None;
        let mut x: Option<Tensor> = None;
        // the content at the previews' size, for their original colours ([`Self::result_f32_with`])
        let mut preview_content: Option<RgbImage> = None;
        for (s, (&longest, &n)) in sizes.iter().zip(&iterations).enumerate() {
            // the scales before a checkpoint's are done
            if resume.as_ref().is_some_and(|r| s as u32 + 1 < r.scale) {
                continue;
            }
            let content = optimized(imaging::resize_longest(&job.content, longest), params);
            let (w, h) = content.dimensions();
            let style = style_for(
                self,
                params.style_side(job.style_longest.unwrap_or(longest)),
            )?;
            let mut targets =
                self.scale_targets(&content, &style, params, job.block, job.shard.as_ref())?;
            if let Some(p) = &job.previous {
                targets
                    .set_temporal(self.temporal_target(&content, &p.content, &p.result, params)?)?;
            }
            // the iteration the scale starts at: a checkpoint's, or 0
            let first = resume.as_ref().map_or(0, |r| r.iteration);
            let resumed = resume.take();
            let tensor = |values: &[f32]| -> Result<Tensor, Error> {
                let (h, w) = (i64::from(h), i64::from(w));
                Ok(Tensor::f_from_slice(values)?
                    .f_reshape([1, 3, h, w])?
                    .f_to_device(self.device())?)
            };
            // Adam's state: a checkpoint's (the render goes on as it would have), else afresh
            let resumed_adam = match resumed.as_ref().and_then(|r| r.adam.as_ref()) {
                Some(moments) if params.optimizer == Optimizer::Adam => Some(AdamState {
                    m: tensor(&moments.m)?,
                    v: tensor(&moments.v)?,
                    steps: first,
                }),
                _ => None,
            };
            let resumed_average = match resumed.as_ref().and_then(|r| r.average.as_ref()) {
                Some(sum) => Some(tensor(sum)?),
                None => None,
            };
            let mut xs = match (x.take(), resumed) {
                (_, Some(r)) => tensor(&r.values)?,
                // a video frame after its chunk's first: the previous frame's result where the content
                // matches
                (None, None) => match targets.temporal() {
                    Some(t) => t.start(&self.initial(job, &content)?),
                    None => self.initial(job, &content)?,
                },
                (Some(prev), None) => tch::no_grad(|| {
                    let up = prev.upsample_bilinear2d([h as i64, w as i64], false, None, None);
                    // luminance-only: the next scale starts from the luminance (as a tiled job's does,
                    // from its stitched result), not from the colour the optimization let in
                    if params.luminance_only {
                        self.vgg().preprocessing().luminance(&up)
                    } else {
                        up
                    }
                }),
            };
            // Adam's state (the optimizer is Adam exactly when there is one), which checkpoints read
            let adam = (params.optimizer == Optimizer::Adam)
                .then(|| RefCell::new(resumed_adam.unwrap_or_else(|| AdamState::new(&xs))));
            // the iterate average (RenderParams::avg_decay): a checkpoint's (of the images before its
            // own), else of none yet
            let mut average = match (params.avg_decay > 0.0, resumed_average) {
                (false, _) => None,
                (true, Some(sum)) => Some(IterateAverage {
                    sum,
                    decay: params.avg_decay,
                    count: first,
                }),
                (true, None) => {
                    if first > 0 {
                        tracing::warn!(
                            iteration = first,
                            "the checkpoint has no iterate average: averaging from its image on"
                        );
                    }
                    Some(IterateAverage::new(&xs, params.avg_decay))
                }
            };
            let mut evaluations = first;
            // for the ETA: the later scales' iterations in this scale's iterations (their pixels' ratio)
            let pixels = |longest: u32| f64::from(longest).powi(2);
            let later: f64 = (s + 1..sizes.len())
                .map(|k| f64::from(iterations[k]) * pixels(sizes[k]) / pixels(longest))
                .sum();
            let scale_started = Instant::now();
            // the last losses read, all finite
            let mut finite = None;
            // the scale's first and last objective read
            let objective = std::cell::Cell::new(None::<(f64, f64)>);
            // `evaluated`: the evaluations done when read (on a GPU, those of the whole batch read)
            let mut report =
                |iteration: u32, losses: LossTerms, evaluated: u32| -> Result<(), Error> {
                    let scale = s as u32 + 1;
                    if let Some(e) =
                        not_finite(&losses, finite.as_ref(), params.optimizer, iteration, scale)
                    {
                        return Err(e);
                    }
                    finite = Some(losses);
                    let first = objective.get().map_or(losses.total, |(first, _)| first);
                    objective.set(Some((first, losses.total)));
                    let rate = scale_started.elapsed().as_secs_f64() / f64::from(evaluated.max(1));
                    let left = f64::from(n.saturating_sub(iteration)) + later;
                    let progress = Progress {
                        scale: s as u32 + 1,
                        scales,
                        iteration,
                        iterations: n,
                        width: w,
                        height: h,
                        losses,
                        elapsed: started.elapsed().as_secs_f64(),
                        eta: rate * left,
                    };
                    match on_progress(&progress) {
                        ControlFlow::Continue(()) => Ok(()),
                        ControlFlow::Break(()) => Err(Error::Cancelled),
                    }
                };
            // the evaluations' terms not read yet: read (and reported) GPU_READ_INTERVAL at a time on a
            // GPU, one at a time on the CPU
            let read_interval = if self.device().is_cuda() {
                GPU_READ_INTERVAL
            } else {
                1
            };
            let mut unread: Vec<(u32, Tensor)> = Vec::new();
            let flush = |unread: &mut Vec<(u32, Tensor)>,
                         report: &mut dyn FnMut(u32, LossTerms, u32) -> Result<(), Error>|
             -> Result<(), Error> {
                let Some(last) = unread.last().map(|(iteration, _)| *iteration) else {
                    return Ok(());
                };
                let all = Tensor::f_stack(
                    &unread
                        .iter()
                        .map(|(_, t)| t.shallow_clone())
                        .collect::<Vec<_>>(),
                    0,
                )?;
                // with Adam, whether its second moment went past float32 by now, read with the losses
                // (no host sync of its own): once infinite it stays so, so one look a read is enough
                let all = match adam.as_ref() {
                    Some(state) => {
                        let overflowed = state.borrow().v.f_isinf()?.f_any()?;
                        let overflowed = overflowed.f_to_kind(all.kind())?.f_reshape([1])?;
                        Tensor::f_cat(&[all.f_flatten(0, -1)?, overflowed], 0)?
                    }
                    None => all,
                };
                let mut values = to_f64s(&all)?;
                let overflowed = adam.is_some() && values.pop().is_some_and(|flag| flag > 0.0);
                let mut losses = None;
                for ((iteration, _), v) in unread.drain(..).zip(values.chunks(LossTerms::LEN)) {
                    let read = LossTerms::from_values(v);
                    report(iteration, read, last + 1 - first)?;
                    losses = Some(read);
                }
                match losses {
                    Some(losses) if overflowed => Err(adam_overflowed(&losses, last, s as u32 + 1)),
                    _ => Ok(()),
                }
            };
            // the iteration of this scale last asked about
            let mut asked = None;
            let scale = s as u32 + 1;
            // the image of `iteration`: `x`, or with iterate averaging the average of the images to it
            let mut snapshot = |iteration: u32,
                                x: &Tensor,
                                average: Option<&IterateAverage>|
             -> Result<(), Error> {
                match snapshots.as_mut() {
                    Some(snapshots) if iteration > 0 && asked != Some(iteration) => {
                        asked = Some(iteration);
                        if (snapshots.due)(scale, iteration) {
                            let x = average.map_or_else(|| x.shallow_clone(), IterateAverage::get);
                            let image =
                                self.snapshot(job, &x, snapshots.longest, &mut preview_content);
                            (snapshots.save)(scale, iteration, image)?;
                        }
                        Ok(())
                    }
                    _ => Ok(()),
                }
            };
            let mut f = |x: &Tensor| -> Result<(Tensor, Tensor), Error> {
                let since_checkpoint = last_checkpoint.get_or_insert_with(Instant::now).elapsed();
                let due = |c: &&mut Checkpointing<'_>| {
                    evaluations > first
                        && evaluations < n
                        && c.every.due(evaluations, since_checkpoint)
                };
                if let Some(c) = checkpointing.as_mut().filter(due) {
                    let adam = adam.as_ref().map(RefCell::borrow);
                    let file = self.checkpoint_of(
                        x,
                        adam.as_deref(),
                        average.as_ref(),
                        scale,
                        evaluations,
                    )?;
                    (c.save)(file)?;
                    last_checkpoint = Some(Instant::now());
                }
                if let Some(a) = average.as_mut() {
                    a.add(x);
                }
                snapshot(evaluations, x, average.as_ref())?;
                let (terms, grad) = self.scale_objective(x, &targets, params)?;
                let total = terms.f_get(3)?;
                unread.push((evaluations, terms));
                evaluations += 1;
                if unread.len() >= read_interval {
                    flush(&mut unread, &mut report)?;
                }
                Ok((total, grad))
            };
            let left = (n - first) as usize;
            // L-BFGS, or Adam from its state
            let steps = match &adam {
                None => {
                    let lbfgs = Lbfgs {
                        history_size: params.history_size as usize,
                        // whether a step stopped it, read as often as the losses: on a GPU a stop (a
                        // direction that does not descend, which the default tolerances never meet but
                        // for rounding) is found up to 9 evaluations later, each of the same image,
                        // reported as iterations and added to an iterate average
                        check_every: read_interval,
                        ..Lbfgs::default()
                    };
                    match (&job.shard, job.block) {
                        // a shard: the dot products over its own rows, added up with the other shards'
                        (Some(shard), Some(block)) => {
                            let own = shard.own_rows(block, &xs);
                            let sum = &mut |partial| shard.sum(partial);
                            let reduction = Reduction { own, sum };
                            lbfgs.minimize_shard(&mut xs, left, &mut f, Some(reduction))?
                        }
                        _ => lbfgs.minimize(&mut xs, left, &mut f)?,
                    }
                }
                // the learning rate is in 0..255 units (ALGORITHM.md), the image in the weights' space
                Some(state) => {
                    Adam::new(params.learning_rate * self.vgg().preprocessing().per_255())
                        .minimize_from(&mut xs, left, state, &mut f)?
                }
            } as u32
                + first;
            flush(&mut unread, &mut report)?;
            // the last step's image has not been evaluated yet (nor averaged)
            let unevaluated = steps == evaluations;
            // the scale's result: its last image, or the average of its images
            let result = match average {
                Some(mut a) => {
                    if unevaluated {
                        a.add(&xs);
                    }
                    a.get()
                }
                None => xs,
            };
            snapshot(steps, &result, None)?;
            if unevaluated {
                report(
                    steps,
                    self.scale_losses(&result, &targets, params)?,
                    steps + 1 - first,
                )?;
            }
            // a scale that ends worse than it began: its image is of no use, though nothing failed (L-BFGS
            // without a line search, as torch.optim.LBFGS, may step far past the minimum early on: 3.3e8 to
            // 4.9e17 at the 2nd of 3 evaluations at 64 px, back to 3.3e8 at the 3rd)
            if let Some((began, ended)) = objective.get().filter(|(b, e)| e > b) {
                let hint = match params.optimizer {
                    Optimizer::Lbfgs => {
                        "L-BFGS without a line search can overshoot in its first \
                                         iterations: give it more, or use --optimizer adam"
                    }
                    Optimizer::Adam => "lower --learning-rate, or give it more iterations",
                };
                tracing::warn!(
                    scale = s + 1,
                    began,
                    ended,
                    "the objective ended above where the scale began: its image is worse than its \
                     start; {hint}"
                );
            }
            x = Some(result);
        }
        x.ok_or_else(|| Error::Input("no scale to render".into()))
    }
}

/// The mean colour of `job`'s style images (RGB, 0..255), each image's weighted by the style blend
/// ([`RenderParams::blend_weights`]): crowsonkb/style-transfer-pytorch's `style_mean` init. The styles as
/// the render uses them (matched to the content's colours or luminance where asked).
fn style_mean(job: &RenderJob) -> [f32; 3] {
    let mut mean = [0.0f64; 3];
    for (img, w) in job
        .styles
        .iter()
        .zip(job.params.blend_weights(job.styles.len()))
    {
        let mut sum = [0u64; 3];
        for px in img.pixels() {
            for (s, &v) in sum.iter_mut().zip(&px.0) {
                *s += u64::from(v);
            }
        }
        let n = (u64::from(img.width()) * u64::from(img.height())).max(1) as f64;
        for (m, s) in mean.iter_mut().zip(sum) {
            *m += w * s as f64 / n;
        }
    }
    mean.map(|m| m as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Losses that are not finite name the weight to lower: the term's that went, the largest before
    /// when the image went, the first that went in the first losses, the largest when only the sum did.
    #[test]
    fn losses_not_finite_name_their_weight() {
        let finite = LossTerms {
            content: 1e3,
            style: 1e30,
            tv: 2.0,
            total: 1e30,
            temporal: 0.0,
        };
        assert!(not_finite(&finite, None, Optimizer::Lbfgs, 1, 1).is_none());
        let named = |losses: LossTerms, before: Option<&LossTerms>| {
            let e = not_finite(&losses, before, Optimizer::Lbfgs, 7, 2)
                .expect("not finite")
                .to_string();
            assert!(e.contains("at iteration 7 of scale 2"), "{e}");
            e
        };
        let tv = LossTerms {
            tv: f64::INFINITY,
            total: f64::INFINITY,
            ..finite
        };
        assert!(
            named(tv, Some(&finite)).starts_with("tv_weight: the total variation loss became inf")
        );
        let image_gone = LossTerms {
            content: f64::NAN,
            style: f64::NAN,
            tv: f64::NAN,
            total: f64::NAN,
            temporal: 0.0,
        };
        let e = named(image_gone, Some(&finite));
        assert!(
            e.starts_with("style_weight: the losses became NaN, after a style loss of 1e30"),
            "{e}"
        );
        let first = LossTerms {
            content: f64::INFINITY,
            tv: f64::INFINITY,
            ..image_gone
        };
        let e = named(first, None);
        assert!(
            e.starts_with("content_weight: the content loss became inf"),
            "{e}"
        );
        let sum = LossTerms {
            content: 3e38,
            style: 2e38,
            tv: 1.0,
            total: f64::INFINITY,
            temporal: 0.0,
        };
        let e = named(sum, None);
        assert!(
            e.starts_with(
                "content_weight: the losses' sum became inf, with a content loss of 3e38"
            ),
            "{e}"
        );
        // Adam, from losses far inside float32's range: its steps diverged (the learning rate); near
        // its top, a weight
        let adam = |losses: &LossTerms, before: &LossTerms| {
            not_finite(losses, Some(before), Optimizer::Adam, 3, 1)
                .unwrap()
                .to_string()
        };
        let small = LossTerms {
            style: 1e9,
            total: 1e9,
            ..finite
        };
        let e = adam(&image_gone, &small);
        assert!(
            e.starts_with(
                "learning_rate: the losses became NaN at iteration 3 of scale 1, from 1e9"
            ),
            "{e}"
        );
        let near_top = LossTerms {
            style: 1e37,
            total: 1e37,
            ..finite
        };
        let e = adam(&image_gone, &near_top);
        assert!(e.starts_with("style_weight:"), "{e}");
    }
}
