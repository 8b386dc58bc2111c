//! The render parameters' command-line options, shared by `render`, `submit` and `local`.

use clap::Args;
use stylefarm_core::params::parse_list;
use stylefarm_core::{Init, Layer, Optimizer, Pooling, RenderParams};

/// The render parameters, shared by `render`, `submit` and `local`; defaults are ALGORITHM.md's.
#[derive(Args, Clone)]
pub struct ParamArgs {
    /// Blend weights of the styles, e.g. 0.7,0.3 (normalized to sum 1; default equal).
    #[arg(long)]
    style_blend: Option<String>,
    /// Longest side of the output, in pixels.
    #[arg(long, default_value_t = 512)]
    size: u32,
    /// Iterations (L-BFGS function evaluations or Adam steps); with --scales, those of the first scale.
    #[arg(long, default_value_t = 500)]
    iterations: u32,
    /// Iterations per scale, coarsest first, e.g. 300,150 (default: --iterations halved at each scale).
    #[arg(long)]
    scale_iterations: Option<String>,
    /// lbfgs or adam.
    #[arg(long, default_value = "lbfgs")]
    optimizer: String,
    /// Adam's learning rate (0..255 units).
    #[arg(long, default_value_t = 10.0)]
    learning_rate: f64,
    /// L-BFGS history size.
    #[arg(long, default_value_t = 100)]
    history_size: u32,
    #[arg(long, default_value_t = 5.0)]
    content_weight: f64,
    #[arg(long, default_value_t = 100.0)]
    style_weight: f64,
    /// Total variation weight.
    #[arg(long, default_value_t = 1e-3)]
    tv_weight: f64,
    /// Content layers, comma-separated.
    #[arg(long, default_value = "relu4_2")]
    content_layers: String,
    /// Style layers, comma-separated.
    #[arg(long, default_value = "relu1_1,relu2_1,relu3_1,relu4_1,relu5_1")]
    style_layers: String,
    /// max or avg.
    #[arg(long, default_value = "max")]
    pooling: String,
    /// content, noise, or an image file.
    #[arg(long, default_value = "content")]
    init: String,
    /// Seed of the noise init; a CPU run with the same seed repeats bit for bit.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Style images are resized to a longest side of size * style-scale.
    #[arg(long, default_value_t = 1.0)]
    style_scale: f64,
    /// Keep the content's colours (the output's luminance with the content's chroma).
    #[arg(long)]
    original_colors: bool,
    /// Number of scales: the first at size / 2^(scales-1), each next one twice as large.
    #[arg(long, default_value_t = 1)]
    scales: u32,
}

impl TryFrom<&ParamArgs> for RenderParams {
    type Error = stylefarm_core::Error;

    /// Parses the options; validation against the number of styles is the caller's.
    fn try_from(a: &ParamArgs) -> Result<Self, Self::Error> {
        fn list<T: std::str::FromStr>(
            field: &'static str,
            s: &Option<String>,
        ) -> Result<Vec<T>, stylefarm_core::Error>
        where
            T::Err: std::fmt::Display,
        {
            Ok(s.as_deref()
                .map(|s| parse_list(field, s))
                .transpose()?
                .unwrap_or_default())
        }
        Ok(RenderParams {
            size: a.size,
            iterations: a.iterations,
            scale_iterations: list("scale_iterations", &a.scale_iterations)?,
            optimizer: a.optimizer.parse::<Optimizer>()?,
            learning_rate: a.learning_rate,
            history_size: a.history_size,
            content_weight: a.content_weight,
            style_weight: a.style_weight,
            tv_weight: a.tv_weight,
            style_blend: list("style_blend", &a.style_blend)?,
            content_layers: parse_list::<Layer>("content_layers", &a.content_layers)?,
            style_layers: parse_list::<Layer>("style_layers", &a.style_layers)?,
            pooling: a.pooling.parse::<Pooling>()?,
            init: a.init.parse::<Init>()?,
            seed: a.seed,
            style_scale: a.style_scale,
            original_colors: a.original_colors,
            scales: a.scales,
        })
    }
}
