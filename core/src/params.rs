//! Render parameters: the knobs of ../shared/design/ALGORITHM.md with its defaults, and their validation.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{imaging, Error};

/// Largest output side a render accepts (a single untiled pass; the tiled path of the farm goes further).
pub const MAX_SIZE: u32 = 16_384;
/// Most iterations a single scale accepts.
pub const MAX_ITERATIONS: u32 = 100_000;
/// Most scales of a multi-scale render.
pub const MAX_SCALES: u32 = 8;

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
    Max,
    Avg,
}

/// Where the optimized image starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// The content image.
    Content,
    /// Seeded Gaussian noise, sigma 0.001 in preprocessed units (as jcjohnson/neural-style).
    Noise,
    /// An image, resized to the working size: a file for `stylefarm render`; in a farm job, the sha256 of an
    /// uploaded image.
    Image(PathBuf),
}

macro_rules! keyword_enum {
    ($ty:ident, $what:literal, $($name:literal => $variant:expr),+) => {
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
keyword_enum!(Pooling, "pooling", "max" => Pooling::Max, "avg" => Pooling::Avg);

impl FromStr for Init {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "content" => Ok(Init::Content),
            "noise" | "random" => Ok(Init::Noise),
            "" => Err(Error::invalid(
                "init",
                "empty value (expected content, noise or an image path)",
            )),
            path => Ok(Init::Image(PathBuf::from(path))),
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

/// Everything that shapes a render besides its images. Defaults are ALGORITHM.md's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RenderParams {
    /// Longest side of the output, in pixels.
    pub size: u32,
    /// Iterations (function evaluations for L-BFGS, steps for Adam) of a single-scale render, and of the
    /// first scale of a multi-scale one.
    pub iterations: u32,
    /// Iterations per scale, coarsest first; empty: `iterations` halved at each finer scale.
    pub scale_iterations: Vec<u32>,
    pub optimizer: Optimizer,
    /// Adam's step size, in 0..255 units.
    pub learning_rate: f64,
    /// L-BFGS history size.
    pub history_size: u32,
    pub content_weight: f64,
    pub style_weight: f64,
    pub tv_weight: f64,
    /// Blend weights of the style images, normalized to sum 1; empty: equal.
    pub style_blend: Vec<f64>,
    pub content_layers: Vec<Layer>,
    pub style_layers: Vec<Layer>,
    pub pooling: Pooling,
    pub init: Init,
    pub seed: u64,
    /// Style images are resized so their longest side is `size * style_scale`.
    pub style_scale: f64,
    /// Keep the output's luminance and the content's chroma.
    pub original_colors: bool,
    /// Number of scales; 1 renders at `size` only.
    pub scales: u32,
}

impl Default for RenderParams {
    fn default() -> Self {
        RenderParams {
            size: 512,
            iterations: 500,
            scale_iterations: Vec::new(),
            optimizer: Optimizer::Lbfgs,
            learning_rate: 10.0,
            history_size: 100,
            content_weight: 5.0,
            style_weight: 100.0,
            tv_weight: 1e-3,
            style_blend: Vec::new(),
            content_layers: DEFAULT_CONTENT_LAYERS.to_vec(),
            style_layers: DEFAULT_STYLE_LAYERS.to_vec(),
            pooling: Pooling::Max,
            init: Init::Content,
            seed: 0,
            style_scale: 1.0,
            original_colors: false,
            scales: 1,
        }
    }
}

fn check_weight(field: &'static str, value: f64) -> Result<(), Error> {
    if !value.is_finite() || value < 0.0 {
        return Err(Error::invalid(
            field,
            format!("must be a finite number >= 0, got {value}"),
        ));
    }
    Ok(())
}

fn check_iterations(field: &'static str, value: u32) -> Result<(), Error> {
    if value == 0 || value > MAX_ITERATIONS {
        return Err(Error::invalid(
            field,
            format!("must be between 1 and {MAX_ITERATIONS}, got {value}"),
        ));
    }
    Ok(())
}

impl RenderParams {
    /// Checks every field; `styles` is the number of style images of the job.
    pub fn validate(&self, styles: usize) -> Result<(), Error> {
        if self.size == 0 || self.size > MAX_SIZE {
            return Err(Error::invalid(
                "size",
                format!("must be between 1 and {MAX_SIZE}, got {}", self.size),
            ));
        }
        check_iterations("iterations", self.iterations)?;
        if self.scales == 0 || self.scales > MAX_SCALES {
            return Err(Error::invalid(
                "scales",
                format!("must be between 1 and {MAX_SCALES}, got {}", self.scales),
            ));
        }
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
        if !self.scale_iterations.is_empty() {
            if self.scale_iterations.len() != self.scales as usize {
                return Err(Error::invalid(
                    "scale_iterations",
                    format!(
                        "has {} values for {} scales",
                        self.scale_iterations.len(),
                        self.scales
                    ),
                ));
            }
            for &n in &self.scale_iterations {
                check_iterations("scale_iterations", n)?;
            }
        }
        if !self.learning_rate.is_finite() || self.learning_rate <= 0.0 {
            return Err(Error::invalid(
                "learning_rate",
                format!("must be a finite number > 0, got {}", self.learning_rate),
            ));
        }
        if self.history_size == 0 || self.history_size > 1000 {
            return Err(Error::invalid(
                "history_size",
                format!("must be between 1 and 1000, got {}", self.history_size),
            ));
        }
        check_weight("content_weight", self.content_weight)?;
        check_weight("style_weight", self.style_weight)?;
        check_weight("tv_weight", self.tv_weight)?;
        if !self.style_scale.is_finite() || self.style_scale <= 0.0 || self.style_scale > 8.0 {
            return Err(Error::invalid(
                "style_scale",
                format!("must be in (0, 8], got {}", self.style_scale),
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
            for &w in &self.style_blend {
                check_weight("style_blend", w)?;
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
        Ok(())
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

    /// The longest side of the style images for a working size `longest`: `round(longest * style_scale)`,
    /// at least 1 (ALGORITHM.md, "Inputs and sizes").
    pub fn style_side(&self, longest: u32) -> u32 {
        ((longest as f64) * self.style_scale).round().max(1.0) as u32
    }

    /// Checks that every image of a render reaches the deepest layer it is run to, at every scale, before any
    /// tensor work: the content (and so the init and the optimized image, which take its working size) at
    /// each scale's size must be at least [`Self::deepest_layer`]'s [`Layer::min_input_side`] on both sides,
    /// and each style image at its style side ([`Self::style_side`] of the scale's size, or of
    /// `style_longest` when set: the canvas of a tile) at least [`Self::deepest_style_layer`]'s, and at most
    /// [`MAX_SIZE`]. `content` and `styles` are the images' names and original sizes. The error names the
    /// option to change (`size`, `scales` or `style_scale`), the image and both sizes.
    pub fn check_sizes(
        &self,
        content: ImageSize<'_>,
        styles: &[ImageSize<'_>],
        style_longest: Option<u32>,
    ) -> Result<(), Error> {
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
                    return Err(Error::invalid(
                        "style_scale",
                        format!(
                            "style image {style} becomes {sw} x {sh} px at style scale {} of {at}; {limit}",
                            self.style_scale
                        ),
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
    pub name: &'a str,
    pub width: u32,
    pub height: u32,
}

impl<'a> ImageSize<'a> {
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

/// Parses a comma-separated list such as `0.7,0.3` or `relu1_1,relu2_1`, naming `field` on error.
pub fn parse_list<T: FromStr>(field: &'static str, s: &str) -> Result<Vec<T>, Error>
where
    T::Err: fmt::Display,
{
    s.split(',')
        .map(|item| {
            item.trim()
                .parse::<T>()
                .map_err(|e| Error::invalid(field, format!("'{item}': {e}")))
        })
        .collect()
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

    #[test]
    fn validation_names_the_field() {
        type Mutation = Box<dyn Fn(&mut RenderParams)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|p| p.style_weight = f64::NAN), "style_weight"),
            (Box::new(|p| p.content_weight = -1.0), "content_weight"),
            (Box::new(|p| p.tv_weight = f64::INFINITY), "tv_weight"),
            (Box::new(|p| p.iterations = 0), "iterations"),
            (Box::new(|p| p.size = 0), "size"),
            (Box::new(|p| p.size = MAX_SIZE + 1), "size"),
            (Box::new(|p| p.learning_rate = 0.0), "learning_rate"),
            (Box::new(|p| p.style_scale = -2.0), "style_scale"),
            (Box::new(|p| p.style_blend = vec![1.0, 2.0]), "style_blend"),
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

    #[test]
    fn keywords_parse() {
        assert_eq!("adam".parse::<Optimizer>().unwrap(), Optimizer::Adam);
        assert_eq!("avg".parse::<Pooling>().unwrap(), Pooling::Avg);
        assert_eq!(
            "x.png".parse::<Init>().unwrap(),
            Init::Image("x.png".into())
        );
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
