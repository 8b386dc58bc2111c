//! Render parameters: the knobs of ../shared/design/ALGORITHM.md with its defaults, and their validation.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
        if (self.size >> (self.scales - 1)) < 16 {
            return Err(Error::invalid(
                "scales",
                format!(
                    "{} scales from size {} make the first scale smaller than 16 px",
                    self.scales, self.size
                ),
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
            if self.style_blend.iter().sum::<f64>() <= 0.0 {
                return Err(Error::invalid("style_blend", "weights sum to 0"));
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
}
