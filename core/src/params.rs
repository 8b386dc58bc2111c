//! Render parameters: the knobs of ../shared/design/ALGORITHM.md with its defaults, and their validation.
//!
//! Every option is defined once, in `render_options!`'s table: its name, type, default, range and
//! documentation. From the table come [`RenderParams`] and its `Default`, the per-option range checks of
//! [`RenderParams::validate`], [`RenderParams::set`] (text values by name: the sweep axes), the command
//! line's `ParamArgs` (cargo feature `clap`) and the wire conversion (`crate::wire`). A new option is a
//! row there and a field of the same name in the proto's `RenderParams`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{ImageHash, JobId};
use crate::{imaging, Error};

/// Largest output side a render accepts (a single untiled pass; the tiled path of the farm goes further).
pub const MAX_SIZE: u32 = 16_384;

/// Most pixels the style images of one render (a farm's task) may have together: as many as one image may
/// have ([`imaging::MAX_IMAGE_PIXELS`], 268 M: one style of 16,384 x 16,384, or 16 of 4096 x 4096). A
/// worker holds each style whole, decoded (3 bytes a pixel) and again in its render, so that without a
/// limit one task of many large styles (a job may have 1000) would take the memory of every worker it
/// reached, one after the other.
pub const MAX_STYLE_PIXELS: u64 = imaging::MAX_IMAGE_PIXELS;

/// Refuses style images of `pixels` pixels together in one render ([`MAX_STYLE_PIXELS`]).
///
/// # Errors
/// [`Error::Invalid`] on `styles`.
pub fn check_style_pixels(pixels: u64) -> Result<(), Error> {
    if pixels <= MAX_STYLE_PIXELS {
        return Ok(());
    }
    Err(Error::invalid(
        "styles",
        format!(
            "the style images have {pixels} pixels together, more than the {MAX_STYLE_PIXELS} of one \
             render (fewer or smaller style images)"
        ),
    ))
}
/// Most iterations a single scale accepts.
pub const MAX_ITERATIONS: u32 = 100_000;
/// Most scales of a multi-scale render.
pub const MAX_SCALES: u32 = 8;
/// Largest L-BFGS history.
pub const MAX_HISTORY_SIZE: u32 = 1000;
/// Largest style scale.
pub const MAX_STYLE_SCALE: f64 = 8.0;

/// The optimizer that updates the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// `torch.optim.LBFGS(lr=1, line_search_fn=None, tolerance_grad=-1, tolerance_change=-1)`.
    Lbfgs,
    /// `torch.optim.Adam` with betas 0.9/0.999 and eps 1e-8.
    Adam,
}

/// VGG19's pooling layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// 2x2 stride-2 max pooling (the default, as jcjohnson/neural-style).
    Max,
    /// 2x2 stride-2 average pooling (Gatys' choice; smoother results).
    Avg,
    /// 2x2 stride-2 L2 pooling, as crowsonkb/style-transfer-pytorch's `--pooling l2`: the square root of the
    /// window's sum of squares (`torch.nn.LPPool2d(2, 2)`), times 0.78 to keep the activations near max
    /// pooling's (crowsonkb's scale).
    L2,
}

/// Where the optimized image starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The content image.
    Content,
    /// Seeded Gaussian noise, sigma 0.001 in preprocessed units (as jcjohnson/neural-style).
    Noise,
    /// Mid grey with seeded uniform noise of one 0..255 level: 127.5 + U(0, 1) in every channel (0..255
    /// units), as crowsonkb/style-transfer-pytorch's `--init gray`.
    Gray,
    /// Seeded uniform noise over the whole range: U(0, 255) in every channel (0..255 units), as
    /// crowsonkb/style-transfer-pytorch's `uniform`.
    Uniform,
    /// The style images' mean colour (each image's mean RGB, weighted by the style blend) with seeded
    /// uniform noise of one level, as crowsonkb/style-transfer-pytorch's `style_mean`.
    StyleMean,
    /// An image file on this machine, resized to the working size: what `stylefarm render --init` takes,
    /// and what a client uploads (becoming [`Init::Image`]) before it submits a farm job.
    File(PathBuf),
    /// An image uploaded to the farm, by its sha256, resized to the working size: what a farm job and its
    /// tasks carry (written `image:<sha256>`).
    Image(ImageHash),
    /// The result of another farm job, resized to the working size (written `job:<id>`): the job waits for
    /// that one to succeed, and the coordinator then hands its tasks that image ([`Init::Image`]), as
    /// jcjohnson/neural-style's multi-resolution scripts pass one run's output to the next as `-init_image`.
    Job(JobId),
}

impl Init {
    /// Whether the render starts from a given image ([`Init::File`], [`Init::Image`] or [`Init::Job`]).
    pub fn is_image(&self) -> bool {
        matches!(self, Init::File(_) | Init::Image(_) | Init::Job(_))
    }

    /// The local image file it starts from ([`Init::File`]), if any.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Init::File(path) => Some(path),
            _ => None,
        }
    }

    /// The farm job whose result it starts from ([`Init::Job`]), if any.
    pub fn job(&self) -> Option<&JobId> {
        match self {
            Init::Job(id) => Some(id),
            _ => None,
        }
    }

    /// The uploaded image it names ([`Init::Image`]), if any.
    pub fn image(&self) -> Option<&ImageHash> {
        match self {
            Init::Image(hash) => Some(hash),
            _ => None,
        }
    }
}

macro_rules! keyword_enum {
    ($ty:ident, $what:literal, $($name:literal => $variant:expr),+) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                $(if *self == $variant { return f.write_str($name); })+
                unreachable!("every variant is listed")
            }
        }

        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                match s {
                    $($name => Ok($variant),)+
                    _ => Err(Error::invalid($what, format!(
                        "unknown value '{s}' (expected one of: {})", [$($name),+].join(", ")))),
                }
            }
        }
    };
}
keyword_enum!(Optimizer, "optimizer", "lbfgs" => Optimizer::Lbfgs, "adam" => Optimizer::Adam);
keyword_enum!(Pooling, "pooling", "max" => Pooling::Max, "avg" => Pooling::Avg, "l2" => Pooling::L2);

impl fmt::Display for Init {
    /// The text [`Init::from_str`] reads: `content`, `noise`, `gray`, `uniform`, `style_mean`, the file's
    /// path, `image:<sha256>` or `job:<id>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Init::Content => f.write_str("content"),
            Init::Noise => f.write_str("noise"),
            Init::Gray => f.write_str("gray"),
            Init::Uniform => f.write_str("uniform"),
            Init::StyleMean => f.write_str("style_mean"),
            Init::File(path) => write!(f, "{}", path.display()),
            Init::Image(hash) => write!(f, "{IMAGE_PREFIX}{hash}"),
            Init::Job(id) => write!(f, "{JOB_PREFIX}{id}"),
        }
    }
}

/// The inits named by a word, as errors list them.
pub(crate) const INIT_KEYWORDS: &str = "content, noise, gray, uniform, style_mean";

/// How the text of an [`Init::Image`] starts: `image:<sha256>`.
const IMAGE_PREFIX: &str = "image:";
/// How the text of an [`Init::Job`] starts: `job:<id>`.
const JOB_PREFIX: &str = "job:";

impl FromStr for Init {
    type Err = Error;
    /// `content`, `noise` (or `random`), `gray`, `uniform`, `style_mean`, `image:<sha256>` of an uploaded
    /// image, `job:<id>` of a farm job, or any other text as a file's path (`./gray`, `./job:x` for files
    /// so named). An error names `init`.
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "content" => Ok(Init::Content),
            "noise" | "random" => Ok(Init::Noise),
            "gray" => Ok(Init::Gray),
            "uniform" => Ok(Init::Uniform),
            "style_mean" => Ok(Init::StyleMean),
            "" => Err(Error::invalid(
                "init",
                format!("empty value (expected {INIT_KEYWORDS} or an image path)"),
            )),
            text => {
                let bad = || {
                    Error::invalid(
                        "init",
                        format!(
                            "'{text}': expected {INIT_KEYWORDS}, image:<sha256>, job:<id> or a file's path"
                        ),
                    )
                };
                if let Some(hash) = text.strip_prefix(IMAGE_PREFIX) {
                    return hash.parse().map(Init::Image).map_err(|_| bad());
                }
                if let Some(id) = text.strip_prefix(JOB_PREFIX) {
                    return JobId::checked("init", id).map(Init::Job).map_err(|_| bad());
                }
                // a bare word is a keyword mistyped (`Noise`, `image`), not a file: a file so named
                // needs a path (`./gray`), an image file has an extension
                if !text.contains(['/', '.']) {
                    return Err(Error::invalid(
                        "init",
                        format!(
                            "'{text}' is not one of {INIT_KEYWORDS} (lowercase), image:<sha256> nor \
                             job:<id>; a file's path has a folder or an extension (./{text})"
                        ),
                    ));
                }
                Ok(Init::File(PathBuf::from(text)))
            }
        }
    }
}

/// A VGG19 layer, named by its ReLU: `relu{block}_{conv}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Layer {
    /// 1..=5
    pub block: u8,
    /// 1..=2 in blocks 1-2, 1..=4 in blocks 3-5
    pub conv: u8,
}

/// Convolutions per block in VGG19.
pub const VGG19_BLOCKS: [u8; 5] = [2, 2, 4, 4, 4];

impl Layer {
    /// The layer `relu{block}_{conv}`, unchecked (parse the name for a checked one): `block` in 1..=5,
    /// `conv` within [`VGG19_BLOCKS`]`[block - 1]`.
    pub const fn new(block: u8, conv: u8) -> Self {
        Layer { block, conv }
    }

    /// Position of the layer's convolution among VGG19's 16 (0-based).
    pub fn index(self) -> usize {
        let before: u8 = VGG19_BLOCKS[..(self.block - 1) as usize].iter().sum();
        (before + self.conv - 1) as usize
    }

    /// The smallest side, in px, of an image that VGG19 can carry to this layer: `2^(block-1)`, so 1 px for
    /// relu1_x, 2 for relu2_x, 4 for relu3_x, 8 for relu4_x and 16 for relu5_x. Every block after the first
    /// starts behind a 2x2 stride-2 pooling (ALGORITHM.md, "Network and weights"), which floors the side
    /// (torch.nn.functional.max_pool2d / avg_pool2d without ceil_mode) and gives nothing from a side under 2.
    pub fn min_input_side(self) -> u32 {
        1 << (self.block - 1)
    }

    /// The layer's feature maps (output channels): 64, 128, 256, 512, 512 in blocks 1 to 5.
    pub fn channels(self) -> u32 {
        64 << (self.block - 1).min(3)
    }

    /// Every layer of VGG19, in order.
    pub fn all() -> impl Iterator<Item = Layer> {
        VGG19_BLOCKS
            .iter()
            .enumerate()
            .flat_map(|(b, &n)| (1..=n).map(move |c| Layer::new(b as u8 + 1, c)))
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "relu{}_{}", self.block, self.conv)
    }
}

impl FromStr for Layer {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || {
            Error::invalid(
                "layer",
                format!("unknown VGG19 layer '{s}' (expected relu1_1 .. relu5_4)"),
            )
        };
        let rest = s.strip_prefix("relu").ok_or_else(bad)?;
        let (b, c) = rest.split_once('_').ok_or_else(bad)?;
        let (block, conv): (u8, u8) =
            (b.parse().map_err(|_| bad())?, c.parse().map_err(|_| bad())?);
        if !(1..=5).contains(&block) || conv < 1 || conv > VGG19_BLOCKS[(block - 1) as usize] {
            return Err(bad());
        }
        Ok(Layer { block, conv })
    }
}

impl TryFrom<String> for Layer {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Layer> for String {
    fn from(l: Layer) -> String {
        l.to_string()
    }
}

/// Default content layers: relu4_2.
pub const DEFAULT_CONTENT_LAYERS: [Layer; 1] = [Layer::new(4, 2)];
/// Default style layers: relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
pub const DEFAULT_STYLE_LAYERS: [Layer; 5] = [
    Layer::new(1, 1),
    Layer::new(2, 1),
    Layer::new(3, 1),
    Layer::new(4, 1),
    Layer::new(5, 1),
];

/// The render options, one row each: doc comment, `name: Type = default, range, sweep: bool;` (`sweep`:
/// whether a sweep job may vary it). Called with a macro's name, it passes that macro the table: the
/// single definition the struct, the checks, the command line and the wire format derive from.
macro_rules! render_options {
    ($callback:ident) => {
        $callback! {
            /// Longest side of the output, in pixels.
            size: u32 = 512, Range::Between(1, MAX_SIZE as u64), sweep: false;
            /// Iterations (L-BFGS function evaluations or Adam steps); with several scales, those of the first.
            iterations: u32 = 500, Range::Between(1, MAX_ITERATIONS as u64), sweep: true;
            /// Iterations per scale, coarsest first, e.g. 300,150 (default: iterations halved at each scale).
            scale_iterations: Vec<u32> = Vec::new(), Range::Between(1, MAX_ITERATIONS as u64), sweep: false;
            /// lbfgs (torch.optim.LBFGS, no line search) or adam (torch.optim.Adam, betas 0.9/0.999).
            optimizer: Optimizer = Optimizer::Lbfgs, Range::Any, sweep: true;
            /// Adam's learning rate, in 0..255 units.
            learning_rate: f64 = 10.0, Range::Positive, sweep: true;
            /// Iterate averaging, crowsonkb/style-transfer-pytorch's --avg-decay (its default 0.99, with
            /// Adam): each scale's result is the exponential moving average of its images, this the decay,
            /// bias-corrected as Adam's moments; the next scale starts from it, and the progress line of a
            /// scale's last iteration has its losses. It smooths the noise of Adam's last steps. 0: off, the
            /// last image (ALGORITHM.md).
            avg_decay: f64 = 0.0, Range::Fraction, sweep: true;
            /// L-BFGS history size.
            history_size: u32 = 100, Range::Between(1, MAX_HISTORY_SIZE as u64), sweep: true;
            /// Weight of the content loss.
            content_weight: f64 = 5.0, Range::NonNegative, sweep: true;
            /// Weight of the style loss.
            style_weight: f64 = 100.0, Range::NonNegative, sweep: true;
            /// Weight of the total variation loss.
            tv_weight: f64 = 1e-3, Range::NonNegative, sweep: true;
            /// Video jobs: weight of the temporal loss, which holds each frame where its content matches
            /// the previous frame's to that frame's result (Ruder et al. 2016; artistic-videos' default).
            temporal_weight: f64 = 1e3, Range::NonNegative, sweep: false;
            /// Video jobs: follow the motion between frames, as Ruder et al. (2016) do: the previous frame's
            /// result is warped along the optical flow (Horn & Schunck, coarse to fine) and held where the
            /// flow is reliable; false: frames are compared in place, for a static camera.
            optical_flow: bool = true, Range::Any, sweep: false;
            /// Blend weights of the style images, e.g. 0.7,0.3 (normalized to sum 1; default equal).
            style_blend: Vec<f64> = Vec::new(), Range::NonNegative, sweep: true;
            /// Content layers, comma-separated.
            content_layers: Vec<Layer> = DEFAULT_CONTENT_LAYERS.to_vec(), Range::Any, sweep: true;
            /// Style layers, comma-separated.
            style_layers: Vec<Layer> = DEFAULT_STYLE_LAYERS.to_vec(), Range::Any, sweep: true;
            /// Weights of the style layers, one per style layer in its order, e.g. 256,64,16,4,1: a layer's
            /// style loss is style_weight x its weight (ALGORITHM.md's layer_weight; not normalized; default 1
            /// each).
            style_layer_weights: Vec<f64> = Vec::new(), Range::NonNegative, sweep: true;
            /// jcjohnson/neural-style's -normalize_gradients: the gradient of each content and style layer's
            /// loss with respect to that layer's feature map is divided by its L1 norm (plus 1e-8) before the
            /// layer's weight multiplies it, so that each layer pulls with its weight's strength; the total
            /// variation and temporal terms' gradients are not. The losses reported stay the objective's.
            /// Not with exact mode or blocks.
            normalize_gradients: bool = false, Range::Any, sweep: true;
            /// VGG19's pooling: max, avg, or l2 (crowsonkb/style-transfer-pytorch's: LPPool2d with p = 2,
            /// times 0.78).
            pooling: Pooling = Pooling::Max, Range::Any, sweep: true;
            /// Where the image starts: content, noise (Gaussian), gray, uniform, style_mean (crowsonkb's), or
            /// an image file (on the farm: an uploaded image, or job:ID, another job's result, which the job
            /// waits for).
            init: Init = Init::Content, Range::Any, sweep: false;
            /// Seed of the inits' noise; a CPU run with the same seed repeats bit for bit.
            seed: u64 = 0, Range::Any, sweep: true;
            /// Style images are resized to a longest side of size * style_scale.
            style_scale: f64 = 1.0, Range::UpTo(MAX_STYLE_SCALE), sweep: true;
            /// A fixed longest side for the style images, in px, at every scale instead of size * style_scale
            /// (crowsonkb/style-transfer-pytorch's --style-size): every scale, and every tile, matches the
            /// same Gram matrices. 0: off.
            style_size: u32 = 0, Range::Between(0, MAX_SIZE as u64), sweep: true;
            /// Keep the content's colours (the output's luminance with the content's chroma).
            original_colors: bool = false, Range::Any, sweep: true;
            /// Luminance-only transfer (Gatys et al. 2016): content, style and init enter as their luminance
            /// (each scale starts from the luminance of the one before; the style's matched to the content's
            /// mean and deviation), and the result's luminance gets the content's chroma back.
            luminance_only: bool = false, Range::Any, sweep: true;
            /// Colour histogram matching (Gatys et al. 2016): each style image's colours are moved to the
            /// content's mean and covariance before its Gram matrices, so the result keeps the content's
            /// palette with the style's texture. Not with luminance_only.
            match_colors: bool = false, Range::Any, sweep: true;
            /// Tiled jobs: each tile matches the style's Gram matrices alone, ALGORITHM.md's global targets,
            /// instead of those plus the tile's own deviation from its canvas at the start of the scale (the
            /// default, closer to an untiled render: BENCHMARKS.md, "Seams and style loss").
            global_style_targets: bool = false, Range::Any, sweep: false;
            /// Number of scales: the first at size / 2^(scales-1), each next one twice as large.
            scales: u32 = 1, Range::Between(1, MAX_SCALES as u64), sweep: true;
        }
    };
}
pub(crate) use render_options;

/// The struct, its default, its range checks and [`RenderParams::set`], from the table.
macro_rules! params_struct {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $default:expr, $range:expr, sweep: $sweep:literal;
    )*) => {
        /// Everything that shapes a render besides its images. Defaults are ALGORITHM.md's.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default)]
        pub struct RenderParams {
            $($(#[doc = $doc])* pub $name: $ty,)*
        }

        impl Default for RenderParams {
            fn default() -> Self {
                RenderParams { $($name: $default,)* }
            }
        }

        impl RenderParams {
            /// Every option's name, in the table's order: the field, the proto field, the command line's
            /// `--name-with-dashes`.
            pub const OPTIONS: &'static [&'static str] = &[$(stringify!($name)),*];

            /// The options a sweep job may vary.
            pub fn sweepable() -> impl Iterator<Item = &'static str> {
                [$((stringify!($name), $sweep)),*]
                    .into_iter()
                    .filter(|(_, sweep)| *sweep)
                    .map(|(name, _)| name)
            }

            /// Each option within its own range, naming it on error.
            fn check_ranges(&self) -> Result<(), Error> {
                $(OptionValue::check(&self.$name, stringify!($name), $range)?;)*
                Ok(())
            }

            /// The option `name` within its range, naming it on error (nothing for an unknown name).
            pub fn check_range(&self, name: &str) -> Result<(), Error> {
                match name {
                    $(stringify!($name) => OptionValue::check(&self.$name, stringify!($name), $range),)*
                    _ => Ok(()),
                }
            }

            /// Sets the option `name` from its text (as on the command line; a list comma-separated).
            /// Unchecked: [`RenderParams::validate`] checks.
            pub fn set(&mut self, name: &str, text: &str) -> Result<(), Error> {
                match name {
                    $(stringify!($name) => self.$name = OptionValue::parse_text(stringify!($name), text)?,)*
                    _ => {
                        return Err(Error::invalid(
                            "option",
                            format!("unknown option '{name}' (expected one of: {})", Self::OPTIONS.join(", ")),
                        ))
                    }
                }
                Ok(())
            }

            /// The option `name`'s value as text ([`RenderParams::set`] reads it back); None for an
            /// unknown name.
            pub fn get(&self, name: &str) -> Option<String> {
                match name {
                    $(stringify!($name) => Some(OptionValue::to_text(&self.$name)),)*
                    _ => None,
                }
            }
        }

        /// The render options on the command line (`render`, `submit`, `local`): each `--option VALUE` as
        /// text, parsed by [`ParamArgs::params`] onto the defaults, errors naming the option. A value not
        /// of its option's kind or range is refused by the argument parser itself (exit code 2, a usage
        /// hint), as any malformed command line is.
        #[cfg(feature = "clap")]
        #[derive(clap::Args, Debug, Clone, Default)]
        pub struct ParamArgs {
            $(
                $(#[doc = $doc])*
                #[arg(
                    long,
                    value_name = <$ty as OptionValue>::VALUE_NAME,
                    num_args = <$ty as OptionValue>::MIN_ARGS..=1,
                    default_missing_value = <$ty as OptionValue>::BARE_VALUE,
                    default_value = RenderParams::default().$name.to_text(),
                    // an empty list's default ("") is not worth showing
                    hide_default_value = RenderParams::default().$name.to_text().is_empty(),
                    value_parser = |text: &str| -> Result<String, String> {
                        <$ty as OptionValue>::parse_text(stringify!($name), text)
                            .and_then(|v| OptionValue::check(&v, stringify!($name), $range))
                            .map(|()| text.to_string())
                            .map_err(|e| {
                                // a whole number past its type (-1, 99999999999): the option's range
                                $range.out_of_range(text).unwrap_or_else(|| e.reason().to_string())
                            })
                    },
                )]
                pub $name: Option<String>,
            )*
        }

        #[cfg(feature = "clap")]
        impl ParamArgs {
            /// The parameters: each option given parsed onto [`RenderParams::default`] (unvalidated).
            pub fn params(&self) -> Result<RenderParams, Error> {
                let mut params = RenderParams::default();
                $(if let Some(text) = &self.$name {
                    params.$name = OptionValue::parse_text(stringify!($name), text)?;
                })*
                Ok(params)
            }
        }
    };
}
render_options!(params_struct);

/// The values an option accepts; [`RenderParams::validate`] checks each option against its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    /// Any value of the option's type.
    Any,
    /// A whole number in `min..=max` (each element of a list).
    Between(u64, u64),
    /// A number >= 0 that float32 holds, the engine's precision (each element of a list).
    NonNegative,
    /// A number > 0 that float32 holds.
    Positive,
    /// A finite number in `(0, max]`.
    UpTo(f64),
    /// A number in `[0, 1)`.
    Fraction,
}

impl Range {
    /// What a whole number's `text` that its type cannot hold (`-1`, `99999999999`) misses of a
    /// [`Range::Between`]: "must be between 1 and 16384, got -1". `None` for other text or ranges.
    pub fn out_of_range(self, text: &str) -> Option<String> {
        match self {
            Range::Between(min, max) if whole_literal(text).is_some() => Some(format!(
                "must be between {min} and {max}, got {}",
                text.trim()
            )),
            _ => None,
        }
    }

    fn check_whole(self, field: &'static str, value: u64) -> Result<(), Error> {
        match self {
            Range::Between(min, max) if !(min..=max).contains(&value) => Err(Error::invalid(
                field,
                format!("must be between {min} and {max}, got {value}"),
            )),
            _ => Ok(()),
        }
    }

    fn check_number(self, field: &'static str, value: f64) -> Result<(), Error> {
        let (ok, what) = match self {
            Range::NonNegative => (
                (value as f32).is_finite() && value >= 0.0,
                format!("a number >= 0 and at most {:e} (float32)", f32::MAX),
            ),
            // > 0 as float32 too: 1e-46 would be 0 there
            Range::Positive => (
                (value as f32).is_finite() && (value as f32) > 0.0,
                format!(
                    "a number from {:e} to {:e} (float32)",
                    f32::from_bits(1),
                    f32::MAX
                ),
            ),
            Range::UpTo(max) => (
                value.is_finite() && value > 0.0 && value <= max,
                format!("in (0, {max}]"),
            ),
            Range::Fraction => ((0.0..1.0).contains(&value), "in [0, 1)".to_string()),
            Range::Between(min, max) => (
                value >= min as f64 && value <= max as f64,
                format!("between {min} and {max}"),
            ),
            Range::Any => (true, String::new()),
        };
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                field,
                format!("must be {what}, got {value}"),
            ))
        }
    }
}

/// A type a render option can have: its text form (command line, sweep values) and its range check.
pub trait OptionValue: Sized {
    /// The placeholder of the value in `--help`.
    const VALUE_NAME: &'static str;
    /// Values the command-line flag takes at least: 0 for a switch (`--original-colors`), else 1.
    const MIN_ARGS: usize = 1;
    /// The value of the flag given without one (a switch: `true`).
    const BARE_VALUE: Option<&'static str> = None;

    /// Parses the text form; the error is the message, without the option's name.
    fn parse_value(text: &str) -> Result<Self, String>;

    /// The text form [`OptionValue::parse_value`] reads.
    fn to_text(&self) -> String;

    /// Checks the value against the option's range.
    fn check(&self, _field: &'static str, _range: Range) -> Result<(), Error> {
        Ok(())
    }

    /// Parses the text form, naming the option `field` on error.
    fn parse_text(field: &'static str, text: &str) -> Result<Self, Error> {
        Self::parse_value(text).map_err(|message| Error::invalid(field, message))
    }
}

/// Whether `text` (trimmed) is a whole number as written, digits with a sign or none, whatever its size:
/// `Some(true)` for a negative one. `None` for other text.
fn whole_literal(text: &str) -> Option<bool> {
    let t = text.trim();
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| t.starts_with('-'))
}

/// A scalar's text form read with its `FromStr`, trimmed; `expected` says what it should have been.
fn parse_scalar<T: FromStr>(text: &str, expected: &str) -> Result<T, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("'{text}' is not {expected}"))
}

macro_rules! whole_option {
    ($($ty:ty),*) => {$(
        impl OptionValue for $ty {
            const VALUE_NAME: &'static str = "N";
            fn parse_value(text: &str) -> Result<Self, String> {
                // (a flag's parser says its option's range instead: Range::out_of_range)
                let t = text.trim();
                t.parse().map_err(|_| match whole_literal(t) {
                    Some(true) => format!("'{t}' is negative: a whole number >= 0 is needed"),
                    Some(false) => format!("'{t}' is too large"),
                    None => format!("'{text}' is not a whole number"),
                })
            }
            fn to_text(&self) -> String {
                self.to_string()
            }
            fn check(&self, field: &'static str, range: Range) -> Result<(), Error> {
                range.check_whole(field, u64::from(*self))
            }
        }
    )*};
}
whole_option!(u32, u64);

impl OptionValue for f64 {
    const VALUE_NAME: &'static str = "X";
    fn parse_value(text: &str) -> Result<Self, String> {
        parse_scalar(text, "a number")
    }
    fn to_text(&self) -> String {
        self.to_string()
    }
    fn check(&self, field: &'static str, range: Range) -> Result<(), Error> {
        range.check_number(field, *self)
    }
}

impl OptionValue for bool {
    const VALUE_NAME: &'static str = "BOOL";
    const MIN_ARGS: usize = 0;
    const BARE_VALUE: Option<&'static str> = Some("true");
    fn parse_value(text: &str) -> Result<Self, String> {
        // jcjohnson/neural-style's flags take 1 and 0 (-original_colors 1)
        match text.trim() {
            "1" => Ok(true),
            "0" => Ok(false),
            _ => parse_scalar(text, "true or false (or 1 or 0)"),
        }
    }
    fn to_text(&self) -> String {
        self.to_string()
    }
}

/// The message of a domain error, without its field (the option names it).
fn message(e: Error) -> String {
    match e {
        Error::Invalid { message, .. } => message,
        other => other.to_string(),
    }
}

macro_rules! keyword_option {
    ($($ty:ty => $value_name:literal),*) => {$(
        impl OptionValue for $ty {
            const VALUE_NAME: &'static str = $value_name;
            fn parse_value(text: &str) -> Result<Self, String> {
                text.parse().map_err(message)
            }
            fn to_text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
keyword_option!(Optimizer => "lbfgs|adam", Pooling => "max|avg|l2", Init => "content|noise|gray|uniform|style_mean|IMAGE", Layer => "LAYER");

/// A comma-separated list (`0.7,0.3`, `relu1_1,relu2_1`); empty text is the empty list.
impl<T: OptionValue> OptionValue for Vec<T> {
    const VALUE_NAME: &'static str = "LIST";
    fn parse_value(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        text.split(',')
            .map(|item| T::parse_value(item.trim()).map_err(|e| format!("'{item}': {e}")))
            .collect()
    }
    fn to_text(&self) -> String {
        self.iter().map(T::to_text).collect::<Vec<_>>().join(",")
    }
    fn check(&self, field: &'static str, range: Range) -> Result<(), Error> {
        self.iter().try_for_each(|v| v.check(field, range))
    }
}

/// What a job renders, for [`RenderParams::check_read`]: the options some jobs alone read.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobReads {
    /// A video's frames: the temporal loss and the optical flow.
    pub video: bool,
    /// Independent tiles: their style targets.
    pub tiles: bool,
    /// A batch: each content with each style alone.
    pub batch: bool,
    /// No render: the objective of an image as it is (`render --evaluate`).
    pub evaluate: bool,
}

impl RenderParams {
    /// Why a job of these parameters does not read the option `name` (e.g. "Adam's alone (--optimizer
    /// adam)"); `None` when it reads it. `job` says what the job renders (a sweep: each of its points'
    /// parameters, [`crate::job::check_sweep_reads`]).
    pub fn unread(&self, name: &str, job: JobReads) -> Option<&'static str> {
        match name {
            "size" | "scales" | "iterations" | "scale_iterations" | "optimizer" | "learning_rate"
            | "avg_decay" | "history_size" | "normalize_gradients" | "init" | "seed"
            | "original_colors"
                if job.evaluate =>
            {
                Some(
                    "an evaluation optimizes nothing: it takes the image as it is, at its own size \
                     (--evaluate)",
                )
            }
            "learning_rate" if self.optimizer != Optimizer::Adam => {
                Some("Adam's alone (--optimizer adam); L-BFGS takes steps of lr 1")
            }
            "history_size" if self.optimizer != Optimizer::Lbfgs => {
                Some("L-BFGS's alone (--optimizer lbfgs)")
            }
            "iterations" if !self.scale_iterations.is_empty() => {
                Some("--scale-iterations gives every scale's iterations")
            }
            "temporal_weight" | "optical_flow" if !job.video => Some("a video's alone (--video)"),
            "global_style_targets" if !job.tiles => {
                Some("independent tiles' alone (--tiled, not --exact)")
            }
            "style_blend" if job.batch => {
                Some("a batch renders each content with each style alone (--batch): no blend")
            }
            "seed" if matches!(self.init, Init::Content) || self.init.is_image() => Some(
                "the seeded inits' alone (--init noise, gray, uniform or style_mean); this one starts \
                 from an image",
            ),
            "style_layers" | "style_layer_weights" if self.style_weight == 0.0 => {
                Some("style_weight is 0: no style loss")
            }
            "content_layers" if self.content_weight == 0.0 => {
                Some("content_weight is 0: no content loss")
            }
            "style_scale" if self.style_size > 0 => {
                Some("--style-size gives the style images' size at every scale")
            }
            "original_colors" if self.luminance_only => {
                Some("--luminance-only gives the result the content's colours already")
            }
            _ => None,
        }
    }

    /// Refuses an option set away from its default that the job would not read ([`RenderParams::unread`]),
    /// naming it: a command line's `--learning-rate` beside L-BFGS would otherwise be dropped without a
    /// word. Not for a job from the wire, whose every field is set.
    pub fn check_read(&self, job: JobReads) -> Result<(), Error> {
        // nor a render of no loss at all (a video's temporal loss alone is one)
        let weights = [self.content_weight, self.style_weight, self.tv_weight];
        let temporal = job.video && self.temporal_weight > 0.0;
        if weights.iter().all(|&w| w == 0.0) && !temporal && !job.evaluate {
            return Err(Error::invalid(
                "style_weight",
                "content_weight, style_weight and tv_weight are all 0: nothing to optimize (the result \
                 would be the start image)",
            ));
        }
        let d = RenderParams::default();
        let unread = Self::OPTIONS
            .iter()
            .filter(|name| self.get(name) != d.get(name))
            .find_map(|name| Some((*name, self.unread(name, job)?)));
        match unread {
            Some((name, why)) => Err(Error::invalid(
                name,
                format!("is set, but this job does not read it: {why}"),
            )),
            None => Ok(()),
        }
    }

    /// Refuses a list option longer than any job may use, naming it: at most 16 content or style layers
    /// (VGG19's ReLU layers, each at most once), as many style layer weights, one iteration count a scale
    /// ([`MAX_SCALES`]) and one blend weight a style image
    /// ([`MAX_IMAGES_PER_JOB`](crate::job::MAX_IMAGES_PER_JOB)). Checked where options come in (the wire,
    /// a sweep's base), before they are copied into each task, and by [`RenderParams::validate`].
    pub fn check_lists(&self) -> Result<(), Error> {
        let vgg19_layers = Layer::all().count();
        let too_long = |field: &'static str, len: usize, max: usize, what: &str| {
            (len > max)
                .then(|| Error::invalid(field, format!("{len} values: at most {max} ({what})")))
        };
        let checks = [
            (
                "content_layers",
                self.content_layers.len(),
                vgg19_layers,
                "VGG19's ReLU layers",
            ),
            (
                "style_layers",
                self.style_layers.len(),
                vgg19_layers,
                "VGG19's ReLU layers",
            ),
            (
                "style_layer_weights",
                self.style_layer_weights.len(),
                vgg19_layers,
                "one a style layer",
            ),
            (
                "scale_iterations",
                self.scale_iterations.len(),
                MAX_SCALES as usize,
                "one a scale",
            ),
            (
                "style_blend",
                self.style_blend.len(),
                crate::job::MAX_IMAGES_PER_JOB,
                "one a style image",
            ),
        ];
        if let Some(e) = checks
            .into_iter()
            .find_map(|(field, len, max, what)| too_long(field, len, max, what))
        {
            return Err(e);
        }
        for (field, layers) in [
            ("content_layers", &self.content_layers),
            ("style_layers", &self.style_layers),
        ] {
            if let Some(twice) = layers
                .iter()
                .enumerate()
                .find_map(|(i, l)| layers[..i].contains(l).then_some(l))
            {
                return Err(Error::invalid(
                    field,
                    format!("{twice} given twice: each layer at most once (style_layer_weights weighs them)"),
                ));
            }
        }
        Ok(())
    }

    /// Checks every field; `styles` is the number of style images of the job.
    pub fn validate(&self, styles: usize) -> Result<(), Error> {
        self.check_lists()?;
        self.check_ranges()?;
        // the first scale's longest side must reach the deepest layer (both sides, with the images:
        // check_sizes)
        let (first, layer) = (self.sizes_per_scale()[0], self.deepest_layer());
        let need = layer.min_input_side();
        if first < need {
            let (field, what) = if self.scales == 1 {
                ("size", format!("{first} px"))
            } else {
                (
                    "scales",
                    format!(
                        "{} scales from size {} make the first scale {first} px,",
                        self.scales, self.size
                    ),
                )
            };
            return Err(Error::invalid(
                field,
                format!("{what} under the {need} px a side that VGG19 needs to reach {layer}"),
            ));
        }
        if !self.scale_iterations.is_empty() && self.scale_iterations.len() != self.scales as usize
        {
            return Err(Error::invalid(
                "scale_iterations",
                format!(
                    "has {} values for {} scales",
                    self.scale_iterations.len(),
                    self.scales
                ),
            ));
        }
        if styles == 0 {
            return Err(Error::invalid(
                "style",
                "at least one style image is needed",
            ));
        }

        if !self.style_blend.is_empty() {
            if self.style_blend.len() != styles {
                return Err(Error::invalid(
                    "style_blend",
                    format!(
                        "has {} weights for {styles} style images",
                        self.style_blend.len()
                    ),
                ));
            }
            let sum = self.style_blend.iter().sum::<f64>();
            if sum <= 0.0 {
                return Err(Error::invalid("style_blend", "weights sum to 0"));
            }
            // each finite, but a sum past f64::MAX would normalize every weight to 0
            if !sum.is_finite() {
                return Err(Error::invalid(
                    "style_blend",
                    "weights sum to more than the largest number; scale them down",
                ));
            }
        }
        if self.content_layers.is_empty() {
            return Err(Error::invalid(
                "content_layers",
                "at least one layer is needed",
            ));
        }
        if self.style_layers.is_empty() {
            return Err(Error::invalid(
                "style_layers",
                "at least one layer is needed",
            ));
        }
        if self.match_colors && self.luminance_only {
            return Err(Error::invalid(
                "match_colors",
                "not with luminance_only, whose styles are their luminance alone",
            ));
        }
        if !self.style_layer_weights.is_empty() {
            let (weights, layers) = (self.style_layer_weights.len(), self.style_layers.len());
            if weights != layers {
                return Err(Error::invalid(
                    "style_layer_weights",
                    format!("has {weights} weights for {layers} style layers"),
                ));
            }
            if self.style_layer_weights.iter().all(|&w| w == 0.0) {
                // as style_weight 0 is, said so (check_read refuses a render of no loss at all)
                return Err(Error::invalid(
                    "style_layer_weights",
                    "all 0: no style loss (style_weight 0 is a render without one)",
                ));
            }
        }
        // each finite, but a product past f32::MAX (the losses' precision) would make the style loss
        // infinite
        let past_f32 = |w: f64| !((self.style_weight * w) as f32).is_finite();
        if !self.style_layer_weights.is_empty() && self.layer_weights().any(past_f32) {
            return Err(Error::invalid(
                "style_layer_weights",
                format!(
                    "style_weight x a layer's weight is more than {:e}; scale them down",
                    f32::MAX
                ),
            ));
        }
        Ok(())
    }

    /// The weight of each style layer, in `style_layers` order: `style_layer_weights`, or 1 each when it is
    /// empty (ALGORITHM.md's `layer_weight`). A layer's style loss is `style_weight` times its weight.
    pub fn layer_weights(&self) -> impl Iterator<Item = f64> + '_ {
        (0..self.style_layers.len())
            .map(|i| self.style_layer_weights.get(i).copied().unwrap_or(1.0))
    }

    /// The deepest of `layers` (`relu1_1` when empty).
    fn deepest(layers: &[Layer]) -> Layer {
        layers.iter().copied().max().unwrap_or(Layer::new(1, 1))
    }

    /// The layer that sets the smallest side of the image being optimized (and of the content image): the
    /// deepest content or style layer; [`Layer::min_input_side`] gives the side.
    pub fn deepest_layer(&self) -> Layer {
        Self::deepest(&self.content_layers).max(Self::deepest(&self.style_layers))
    }

    /// The layer that sets the smallest side of a style image: the deepest style layer.
    pub fn deepest_style_layer(&self) -> Layer {
        Self::deepest(&self.style_layers)
    }

    /// The longest side of the style images for a working size `longest`: [`RenderParams::style_size`]
    /// when set, else `round(longest * style_scale)`, at least 1 (ALGORITHM.md, "Inputs and sizes").
    pub fn style_side(&self, longest: u32) -> u32 {
        if self.style_size > 0 {
            return self.style_size;
        }
        ((longest as f64) * self.style_scale).round().max(1.0) as u32
    }

    /// Checks that every image of a render reaches the deepest layer it is run to, at every scale, before any
    /// tensor work: the content (and so the init and the optimized image, which take its working size) at
    /// each scale's size must be at least [`Self::deepest_layer`]'s [`Layer::min_input_side`] on both sides,
    /// and each style image at its style side ([`Self::style_side`] of the scale's size, or of
    /// `style_longest` when set: the canvas of a tile) at least [`Self::deepest_style_layer`]'s, and at most
    /// [`MAX_SIZE`]. `content` and `styles` are the images' names and original sizes. The error names the
    /// option to change (`size`, `scales`, `style_size` when set, else `style_scale`), the image and both
    /// sizes; style images of more than [`MAX_STYLE_PIXELS`] together are refused naming `styles`.
    pub fn check_sizes(
        &self,
        content: ImageSize<'_>,
        styles: &[ImageSize<'_>],
        style_longest: Option<u32>,
    ) -> Result<(), Error> {
        check_style_pixels(
            styles
                .iter()
                .map(|s| u64::from(s.width) * u64::from(s.height))
                .sum(),
        )?;
        let sizes = self.sizes_per_scale();
        let scales = sizes.len();
        let (layer, style_layer) = (self.deepest_layer(), self.deepest_style_layer());
        let (need, style_need) = (layer.min_input_side(), style_layer.min_input_side());
        for (s, &longest) in sizes.iter().enumerate() {
            let at = if scales > 1 {
                format!("size {longest} (scale {} of {scales})", s + 1)
            } else {
                format!("size {longest}")
            };
            let (w, h) = imaging::working_size(content.width, content.height, longest);
            if w.min(h) < need {
                // the output's own size, or only a coarser scale of it
                let field = if s + 1 == scales { "size" } else { "scales" };
                return Err(Error::invalid(
                    field,
                    format!(
                        "content image {content} becomes {w} x {h} px at {at}; VGG19 needs at least {need} px \
                         a side to reach {layer}"
                    ),
                ));
            }
            let side = self.style_side(style_longest.unwrap_or(longest));
            for style in styles {
                let (sw, sh) = imaging::working_size(style.width, style.height, side);
                if sw.min(sh) < style_need || side > MAX_SIZE {
                    let limit = if side > MAX_SIZE {
                        format!("style images are resized to at most {MAX_SIZE} px")
                    } else {
                        format!(
                            "VGG19 needs at least {style_need} px a side to reach {style_layer}"
                        )
                    };
                    let (field, by) = if self.style_size > 0 {
                        ("style_size", format!("style size {}", self.style_size))
                    } else {
                        (
                            "style_scale",
                            format!("style scale {} of {at}", self.style_scale),
                        )
                    };
                    return Err(Error::invalid(
                        field,
                        format!("style image {style} becomes {sw} x {sh} px at {by}; {limit}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The blend weights of `styles` style images, normalized to sum 1.
    pub fn blend_weights(&self, styles: usize) -> Vec<f64> {
        if self.style_blend.is_empty() {
            return vec![1.0 / styles as f64; styles];
        }
        let sum: f64 = self.style_blend.iter().sum();
        self.style_blend.iter().map(|w| w / sum).collect()
    }

    /// Iterations of each scale, coarsest first.
    pub fn iterations_per_scale(&self) -> Vec<u32> {
        if !self.scale_iterations.is_empty() {
            return self.scale_iterations.clone();
        }
        (0..self.scales)
            .map(|s| (self.iterations >> s).max(1))
            .collect()
    }

    /// The output's longest side at each scale, coarsest first: `size / 2^(scales-1)` doubling up to `size`.
    pub fn sizes_per_scale(&self) -> Vec<u32> {
        (0..self.scales)
            .map(|s| {
                let down = self.scales - 1 - s;
                ((self.size as f64) / f64::from(1u32 << down)).round() as u32
            })
            .collect()
    }
}

/// An input image's name (its file, or its sha256 on the farm; may be empty) and size in px, for
/// [`RenderParams::check_sizes`].
#[derive(Debug, Clone, Copy)]
pub struct ImageSize<'a> {
    /// The image's file name, or its sha256 on the farm; empty for an unnamed image.
    pub name: &'a str,
    /// Width in px, before any resizing to the working size.
    pub width: u32,
    /// Height in px, before any resizing to the working size.
    pub height: u32,
}

impl<'a> ImageSize<'a> {
    /// The image `name` of `(width, height)` px (the order of [`crate::imaging::dimensions`]).
    pub fn new(name: &'a str, (width, height): (u32, u32)) -> ImageSize<'a> {
        ImageSize {
            name,
            width,
            height,
        }
    }
}

impl fmt::Display for ImageSize<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.name.is_empty() {
            write!(f, "{} ", self.name)?;
        }
        write!(f, "({} x {} px)", self.width, self.height)
    }
}

/// Parses a comma-separated list such as `0.7,0.3` or `relu1_1,relu2_1` as a list option does, naming
/// `field` on error.
pub fn parse_list<T: OptionValue>(field: &'static str, s: &str) -> Result<Vec<T>, Error> {
    Vec::<T>::parse_text(field, s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_algorithm() {
        let p = RenderParams::default();
        assert_eq!(
            (p.size, p.iterations, p.optimizer),
            (512, 500, Optimizer::Lbfgs)
        );
        assert_eq!(
            (p.content_weight, p.style_weight, p.tv_weight),
            (5.0, 100.0, 1e-3)
        );
        assert_eq!(
            p.content_layers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["relu4_2"]
        );
        assert_eq!(
            p.style_layers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
        );
        p.validate(1).unwrap();
    }

    #[test]
    fn layers_parse_and_index() {
        let all: Vec<Layer> = Layer::all().collect();
        assert_eq!(all.len(), 16);
        for (i, l) in all.iter().enumerate() {
            assert_eq!(l.index(), i);
            assert_eq!(l.to_string().parse::<Layer>().unwrap(), *l);
        }
        for bad in ["relu1_3", "relu6_1", "conv1_1", "relu0_1", "relu", "relu4_"] {
            assert!(bad.parse::<Layer>().is_err(), "{bad}");
        }
    }

    /// An option set away from its default that the job does not read is refused, naming it; the jobs that
    /// read it take it (a sweep's points: `check_sweep_reads`, in job.rs).
    #[test]
    fn an_option_the_job_does_not_read_is_refused() {
        let video = JobReads {
            video: true,
            ..JobReads::default()
        };
        let tiles = JobReads {
            tiles: true,
            ..JobReads::default()
        };
        let batch = JobReads {
            batch: true,
            ..JobReads::default()
        };
        let refused = |p: RenderParams, job: JobReads| p.check_read(job).unwrap_err().to_string();
        let lr = RenderParams {
            learning_rate: 3.0,
            ..Default::default()
        };
        assert!(refused(lr.clone(), JobReads::default()).starts_with("learning_rate: is set"));
        RenderParams {
            optimizer: Optimizer::Adam,
            ..lr
        }
        .check_read(JobReads::default())
        .unwrap();
        let temporal = RenderParams {
            temporal_weight: 5.0,
            optical_flow: false,
            ..Default::default()
        };
        assert!(refused(temporal.clone(), tiles).starts_with("temporal_weight"));
        temporal.check_read(video).unwrap();
        let global = RenderParams {
            global_style_targets: true,
            ..Default::default()
        };
        assert!(refused(global.clone(), video).starts_with("global_style_targets"));
        global.check_read(tiles).unwrap();
        let both = RenderParams {
            iterations: 77,
            scale_iterations: vec![10, 5],
            scales: 2,
            ..Default::default()
        };
        assert!(refused(both, video).starts_with("iterations"));
        let blend = RenderParams {
            style_blend: vec![0.7, 0.3],
            ..Default::default()
        };
        assert!(refused(blend.clone(), batch).starts_with("style_blend: is set"));
        blend.check_read(JobReads::default()).unwrap();
        // layers of a loss whose weight is 0
        let unweighted = RenderParams {
            style_weight: 0.0,
            style_layers: vec![Layer::new(1, 1)],
            ..Default::default()
        };
        let e = refused(unweighted, JobReads::default());
        assert!(
            e.starts_with("style_layers: is set")
                && e.ends_with("style_weight is 0: no style loss"),
            "{e}"
        );
        let unweighted = RenderParams {
            content_weight: 0.0,
            content_layers: vec![Layer::new(1, 1)],
            ..Default::default()
        };
        let e = refused(unweighted, JobReads::default());
        assert!(e.starts_with("content_layers: is set"), "{e}");
        // no loss at all: nothing to optimize; a video's temporal loss alone is one
        let none = RenderParams {
            content_weight: 0.0,
            style_weight: 0.0,
            tv_weight: 0.0,
            ..Default::default()
        };
        let e = refused(none.clone(), JobReads::default());
        assert!(
            e.starts_with("style_weight: content_weight, style_weight and tv_weight are all 0"),
            "{e}"
        );
        none.check_read(video).unwrap();
        // a seed beside an init that is not seeded; a style scale beside a style size
        let seeded = |init| RenderParams {
            seed: 7,
            init,
            ..Default::default()
        };
        let e = refused(seeded(Init::Content), JobReads::default());
        assert!(
            e.starts_with("seed: is set, but this job does not read it"),
            "{e}"
        );
        seeded(Init::Noise).check_read(JobReads::default()).unwrap();
        let e = refused(
            RenderParams {
                style_size: 64,
                style_scale: 2.0,
                ..Default::default()
            },
            JobReads::default(),
        );
        assert!(
            e.starts_with("style_scale: is set") && e.contains("--style-size"),
            "{e}"
        );
        let e = refused(
            RenderParams {
                original_colors: true,
                luminance_only: true,
                ..Default::default()
            },
            JobReads::default(),
        );
        assert!(
            e.starts_with("original_colors: is set") && e.contains("--luminance-only"),
            "{e}"
        );
        // an evaluation reads the objective's options, none of the optimization's
        let evaluate = JobReads {
            evaluate: true,
            ..JobReads::default()
        };
        for optimizing in [
            RenderParams {
                size: 256,
                ..Default::default()
            },
            RenderParams {
                optimizer: Optimizer::Adam,
                ..Default::default()
            },
            RenderParams {
                scales: 2,
                ..Default::default()
            },
        ] {
            let e = refused(optimizing, evaluate);
            assert!(e.contains("is set") && e.contains("--evaluate"), "{e}");
        }
        RenderParams {
            style_weight: 1e3,
            tv_weight: 0.0,
            style_scale: 0.5,
            ..Default::default()
        }
        .check_read(evaluate)
        .unwrap();
        // the defaults, given or not, are read by every job
        RenderParams::default()
            .check_read(JobReads::default())
            .unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        type Mutation = Box<dyn Fn(&mut RenderParams)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|p| p.style_weight = f64::NAN), "style_weight"),
            (Box::new(|p| p.content_weight = -1.0), "content_weight"),
            (Box::new(|p| p.tv_weight = f64::INFINITY), "tv_weight"),
            // finite, but past float32's largest, the losses' precision
            (Box::new(|p| p.style_weight = 1e39), "style_weight"),
            (Box::new(|p| p.learning_rate = 1e39), "learning_rate"),
            (Box::new(|p| p.iterations = 0), "iterations"),
            (Box::new(|p| p.size = 0), "size"),
            (Box::new(|p| p.size = MAX_SIZE + 1), "size"),
            (Box::new(|p| p.learning_rate = 0.0), "learning_rate"),
            // > 0, but 0 as float32
            (Box::new(|p| p.learning_rate = 1e-46), "learning_rate"),
            (Box::new(|p| p.style_scale = -2.0), "style_scale"),
            (Box::new(|p| p.style_blend = vec![1.0, 2.0]), "style_blend"),
            (
                Box::new(|p| p.style_layer_weights = vec![1.0, 2.0]),
                "style_layer_weights",
            ),
            (
                Box::new(|p| (p.match_colors, p.luminance_only) = (true, true)),
                "match_colors",
            ),
            (
                Box::new(|p| p.style_layer_weights = vec![1.0, f64::NAN, 1.0, 1.0, 1.0]),
                "style_layer_weights",
            ),
            (
                Box::new(|p| (p.style_weight, p.style_layer_weights) = (1e20, vec![1e20; 5])),
                "style_layer_weights",
            ),
            (Box::new(|p| p.scales = 9), "scales"),
            (Box::new(|p| (p.size, p.scales) = (64, 4)), "scales"),
            (
                Box::new(|p| p.scale_iterations = vec![1, 2]),
                "scale_iterations",
            ),
        ];
        for (mutate, field) in cases {
            let mut p = RenderParams::default();
            mutate(&mut p);
            let err = p.validate(1).unwrap_err();
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
        // each weight finite, their sum not: every normalized weight would be 0
        let huge = RenderParams {
            style_blend: vec![f64::MAX, f64::MAX],
            ..Default::default()
        };
        assert!(huge
            .validate(2)
            .unwrap_err()
            .to_string()
            .starts_with("style_blend"));
        assert!(RenderParams::default()
            .validate(0)
            .unwrap_err()
            .to_string()
            .starts_with("style"));
    }

    #[test]
    fn blend_weights_are_normalized() {
        let p = RenderParams {
            style_blend: vec![0.7, 0.7, 1.4],
            ..Default::default()
        };
        p.validate(3).unwrap();
        assert_eq!(p.blend_weights(3), vec![0.25, 0.25, 0.5]);
        assert_eq!(RenderParams::default().blend_weights(4), vec![0.25; 4]);
    }

    #[test]
    fn layer_weights_are_one_each_unless_given() {
        let p = RenderParams::default();
        assert_eq!(p.layer_weights().collect::<Vec<_>>(), [1.0; 5]);
        let p = RenderParams {
            style_layers: vec![Layer::new(1, 1), Layer::new(3, 1)],
            style_layer_weights: vec![256.0, 0.0],
            ..Default::default()
        };
        p.validate(1).unwrap();
        assert_eq!(p.layer_weights().collect::<Vec<_>>(), [256.0, 0.0]);
        // every layer 0: no style loss, as style_weight 0 says
        let none = RenderParams {
            style_layer_weights: vec![0.0, 0.0],
            ..p
        };
        let e = none.validate(1).unwrap_err().to_string();
        assert!(e.starts_with("style_layer_weights: all 0"), "{e}");
    }

    #[test]
    fn scales_go_coarse_to_fine() {
        let p = RenderParams {
            size: 1000,
            scales: 3,
            iterations: 300,
            ..Default::default()
        };
        assert_eq!(p.sizes_per_scale(), [250, 500, 1000]);
        assert_eq!(p.iterations_per_scale(), [300, 150, 75]);
        let p = RenderParams {
            scale_iterations: vec![5, 6, 7],
            ..p
        };
        assert_eq!(p.iterations_per_scale(), [5, 6, 7]);
    }

    /// The table's derivations: every option reads back what it writes as text, the sweepable ones are the
    /// table's, and an unknown name is refused naming it.
    #[test]
    #[allow(clippy::needless_update)]
    fn every_option_round_trips_through_its_text() {
        let changed = RenderParams {
            size: 300,
            iterations: 7,
            scale_iterations: vec![7, 3],
            optimizer: Optimizer::Adam,
            learning_rate: 2.5,
            history_size: 5,
            content_weight: 0.5,
            style_weight: 1e4,
            tv_weight: 0.0,
            style_blend: vec![0.7, 0.3],
            content_layers: vec![Layer::new(3, 2), Layer::new(4, 2)],
            style_layers: vec![Layer::new(1, 1)],
            pooling: Pooling::Avg,
            init: Init::Noise,
            seed: 42,
            style_scale: 0.5,
            original_colors: true,
            scales: 2,
            // a new option needs no line here: its default round-trips too
            ..RenderParams::default()
        };
        for params in [RenderParams::default(), changed] {
            let mut copy = RenderParams {
                size: 1,
                ..Default::default()
            };
            for name in RenderParams::OPTIONS {
                let text = params.get(name).expect("a listed option");
                copy.set(name, &text).unwrap();
            }
            assert_eq!(copy, params);
        }
        let sweepable: Vec<&str> = RenderParams::sweepable().collect();
        for name in [
            "iterations",
            "optimizer",
            "learning_rate",
            "content_weight",
            "style_weight",
            "tv_weight",
            "style_blend",
            "content_layers",
            "style_layers",
            "pooling",
            "seed",
            "style_scale",
            "original_colors",
            "luminance_only",
            "match_colors",
            "scales",
        ] {
            assert!(sweepable.contains(&name), "{name}");
        }
        // not the output's size (a contact sheet's cells share one), nor what only videos or tiled jobs
        // read, nor an init image (uploaded with the job, not named in a grid)
        for name in [
            "size",
            "temporal_weight",
            "optical_flow",
            "global_style_targets",
            "init",
        ] {
            assert!(!sweepable.contains(&name), "{name}");
        }
        assert!(sweepable.iter().all(|n| RenderParams::OPTIONS.contains(n)));
        let err = RenderParams::default().set("colour", "1").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = RenderParams::default().set("size", "big").unwrap_err();
        assert!(err.to_string().starts_with("size: 'big'"), "{err}");
    }

    /// The command line's options: each one's flag, parsed onto the defaults; a switch without a value.
    #[cfg(feature = "clap")]
    #[test]
    fn the_command_line_options_come_from_the_table() {
        use clap::Parser;
        // as the commands have it: `--content-weight -1` is a value, not a flag
        #[derive(Parser)]
        #[command(allow_negative_numbers = true)]
        struct Cli {
            #[command(flatten)]
            params: ParamArgs,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from([&["render"], args].concat())
                .unwrap()
                .params
                .params()
        };
        assert_eq!(parse(&[]).unwrap(), RenderParams::default());
        let p = parse(&[
            "--size",
            "64",
            "--style-blend",
            "1,3",
            "--original-colors",
            "--optimizer",
            "adam",
        ])
        .unwrap();
        assert_eq!(
            (p.size, p.style_blend, p.original_colors, p.optimizer),
            (64, vec![1.0, 3.0], true, Optimizer::Adam)
        );
        // a value not of its option's kind or range: the argument parser's error (exit code 2, a usage
        // hint), naming the flag and saying why
        for (args, says) in [
            (["--pooling", "min"], "unknown value 'min'"),
            (["--size", "abc"], "'abc' is not a whole number"),
            (["--size", "0"], "must be between 1 and"),
            (["--size", "-1"], "must be between 1 and 16384, got -1"),
            (
                ["--iterations", "99999999999"],
                "must be between 1 and 100000, got 99999999999",
            ),
            (["--content-weight", "-1"], "must be a number >= 0"),
        ] {
            let Err(err) = Cli::try_parse_from([&["render"], &args[..]].concat()) else {
                panic!("{args:?} parsed");
            };
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{err}");
            assert_eq!(err.exit_code(), 2);
            let err = err.to_string();
            assert!(
                err.contains(args[0]) && err.contains(says),
                "{args:?}: {err}"
            );
        }
        for name in RenderParams::OPTIONS {
            let flag = format!("--{}", name.replace('_', "-"));
            let value = RenderParams::default().get(name).unwrap();
            assert!(
                Cli::try_parse_from(["render", flag.as_str(), value.as_str()]).is_ok(),
                "{flag} {value}"
            );
        }
    }

    #[test]
    fn keywords_parse() {
        // booleans as words, or as neural-style's 1 and 0
        let bools: Vec<_> = ["true", "false", "1", "0", " 1 "]
            .map(bool::parse_value)
            .into();
        assert_eq!(bools, [Ok(true), Ok(false), Ok(true), Ok(false), Ok(true)]);
        assert_eq!(
            bool::parse_value("yes"),
            Err("'yes' is not true or false (or 1 or 0)".into())
        );
        assert_eq!("adam".parse::<Optimizer>().unwrap(), Optimizer::Adam);
        assert_eq!("avg".parse::<Pooling>().unwrap(), Pooling::Avg);
        assert_eq!("l2".parse::<Pooling>().unwrap(), Pooling::L2);
        assert_eq!("x.png".parse::<Init>().unwrap(), Init::File("x.png".into()));
        // crowsonkb's inits are words, read back from their text; a file so named needs a path
        for init in [Init::Gray, Init::Uniform, Init::StyleMean] {
            assert_eq!(init.to_string().parse::<Init>().unwrap(), init);
        }
        assert_eq!(
            "./gray".parse::<Init>().unwrap(),
            Init::File("./gray".into())
        );
        // a bare word that is not a keyword: mistyped, not a file
        for word in ["Noise", "image", "GRAY"] {
            let err = word.parse::<Init>().unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("init: '{word}' is not one of content, noise"))
                    && err.ends_with(&format!("(./{word})")),
                "{err}"
            );
        }
        // a farm job's result, its text read back; a bad id named
        let init: Init = "job:job-19a2b3c0001".parse().unwrap();
        assert_eq!(init, Init::Job(JobId::new("job-19a2b3c0001")));
        assert_eq!(init.to_string().parse::<Init>().unwrap(), init);
        assert_eq!(
            "./job:x.png".parse::<Init>().unwrap(),
            Init::File("./job:x.png".into())
        );
        for bad in [
            "job:",
            "job:a b",
            "job:../x",
            &format!("job:{}", "a".repeat(65)),
        ] {
            let err = bad.parse::<Init>().unwrap_err().to_string();
            assert!(
                err.starts_with("init") && err.contains("job:<id>"),
                "{bad}: {err}"
            );
        }
        let err = "sgd".parse::<Optimizer>().unwrap_err().to_string();
        assert!(
            err.contains("optimizer") && err.contains("sgd") && err.contains("lbfgs"),
            "{err}"
        );
        assert_eq!(
            parse_list::<f64>("style_blend", "0.7, 0.3").unwrap(),
            [0.7, 0.3]
        );
        assert!(parse_list::<f64>("style_blend", "0.7,x")
            .unwrap_err()
            .to_string()
            .contains("style_blend"));
    }

    #[test]
    fn min_sides_follow_the_poolings() {
        let sides: Vec<u32> = ["relu1_2", "relu2_1", "relu3_4", "relu4_2", "relu5_1"]
            .iter()
            .map(|l| l.parse::<Layer>().unwrap().min_input_side())
            .collect();
        assert_eq!(sides, [1, 2, 4, 8, 16]);
        let p = RenderParams::default();
        assert_eq!(p.deepest_layer().to_string(), "relu5_1");
        let shallow = RenderParams {
            content_layers: vec![Layer::new(2, 2)],
            style_layers: vec![Layer::new(1, 1), Layer::new(3, 1)],
            ..Default::default()
        };
        assert_eq!(shallow.deepest_layer().to_string(), "relu3_1");
        assert_eq!(shallow.deepest_style_layer().min_input_side(), 4);
    }

    /// Style images of more pixels together than one image may have are refused, naming `styles`: 16 of
    /// 4096 x 4096 are the most, a 17th is one too many (a worker would hold them all, whole).
    #[test]
    fn a_render_s_style_images_are_bounded_in_pixels_together() {
        let photo = ImageSize::new("photo.jpg", (600, 400));
        let big = ImageSize::new("big.png", (4096, 4096));
        let p = RenderParams::default();
        p.check_sizes(photo, &[big; 16], None).unwrap();
        let err = p
            .check_sizes(photo, &[big; 17], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("styles:")
                && err.contains("285212672 pixels together, more than the 268435456 of one render"),
            "{err}"
        );
        assert!(check_style_pixels(MAX_STYLE_PIXELS).is_ok());
        assert!(check_style_pixels(u64::MAX).is_err());
    }

    #[test]
    fn sizes_are_checked_naming_the_option_the_image_and_both_sizes() {
        let photo = ImageSize::new("photo.jpg", (600, 400));
        let style = ImageSize::new("s.png", (300, 200));
        let p = RenderParams::default();
        p.check_sizes(photo, &[style], None).unwrap();
        // a style scale that shrinks the style under relu5_1's 16 px: 512 * 0.01 = 5 px
        let tiny = RenderParams {
            style_scale: 0.01,
            ..Default::default()
        };
        let err = tiny
            .check_sizes(photo, &[style], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("style_scale:")
                && err.contains("s.png (300 x 200 px)")
                && err.contains("5 x 3 px")
                && err.contains("16 px")
                && err.contains("relu5_1"),
            "{err}"
        );
        // a 1 x 300 content: 2 x 512 at size 512
        let thin = ImageSize::new("thin.png", (1, 300));
        let err = p.check_sizes(thin, &[style], None).unwrap_err().to_string();
        assert!(
            err.starts_with("size:")
                && err.contains("thin.png (1 x 300 px)")
                && err.contains("2 x 512 px"),
            "{err}"
        );
        // fine at the output's size, too small at the first of 3 scales: the option is scales
        let wide = ImageSize::new("wide.png", (1000, 40));
        let three = RenderParams {
            scales: 3,
            ..Default::default()
        };
        p.check_sizes(wide, &[style], None).unwrap();
        let err = three
            .check_sizes(wide, &[style], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("scales:") && err.contains("scale 1 of 3"),
            "{err}"
        );
        // shallow layers need less: relu3_1 reaches from 4 px
        let shallow = RenderParams {
            content_layers: vec![Layer::new(2, 1)],
            style_layers: vec![Layer::new(1, 1), Layer::new(3, 1)],
            style_scale: 0.02,
            ..Default::default()
        };
        shallow
            .check_sizes(ImageSize::new("c", (512, 40)), &[style], None)
            .unwrap();
        assert!(shallow
            .check_sizes(ImageSize::new("c", (512, 3)), &[style], None)
            .is_err());
        // a tile's styles take the canvas' size; a style side past MAX_SIZE is refused
        let tile = RenderParams {
            size: 64,
            style_scale: 8.0,
            ..Default::default()
        };
        tile.check_sizes(ImageSize::new("t", (64, 64)), &[style], Some(1024))
            .unwrap();
        let err = tile
            .check_sizes(ImageSize::new("t", (64, 64)), &[style], Some(4096))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("style_scale:") && err.contains("at most"),
            "{err}"
        );
    }
}
