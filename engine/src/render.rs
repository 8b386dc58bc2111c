//! One render: targets under no_grad, the objective with its gradient, the optimizer, multi-scale, progress.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use image::RgbImage;
use serde::Serialize;
use stylefarm_core::imaging;
use stylefarm_core::{Init, Layer, Optimizer, RenderParams};
use tch::{Device, Kind, Tensor};

use crate::loss::{content_loss, gram, style_loss, tv_loss};
use crate::optim::{Adam, Lbfgs};
use crate::vgg::Vgg19;
use crate::Error;

/// The images and parameters of one render.
#[derive(Debug, Clone)]
pub struct RenderJob {
    pub content: RgbImage,
    pub styles: Vec<RgbImage>,
    /// The init image when `params.init` is [`Init::Image`].
    pub init_image: Option<RgbImage>,
    pub params: RenderParams,
}

/// The weighted terms of the objective and their sum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossTerms {
    pub content: f64,
    pub style: f64,
    pub tv: f64,
    pub total: f64,
}

/// Reported once per evaluation of the objective: iteration 0 is the initial image of a scale, iteration k
/// the image after k steps.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// 1-based scale, and the number of scales.
    pub scale: u32,
    pub scales: u32,
    pub iteration: u32,
    /// Iterations of this scale.
    pub iterations: u32,
    pub width: u32,
    pub height: u32,
    pub losses: LossTerms,
    /// Seconds since the render started.
    pub elapsed: f64,
}

/// The targets of one scale: content feature maps and blended style Gram matrices, computed once.
pub struct Targets {
    /// The distinct layers the objective reads, in network order.
    layers: Vec<Layer>,
    /// (position in `layers`, content feature map)
    content: Vec<(usize, Tensor)>,
    /// (position in `layers`, blended Gram matrix)
    style: Vec<(usize, Tensor)>,
}

/// VGG19 on one device, loaded once and reused for any number of renders.
pub struct Engine {
    vgg: Vgg19,
    device: Device,
}

fn to_f64s(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(
        &t.to_kind(Kind::Double)
            .to_device(Device::Cpu)
            .flatten(0, -1),
    )
    .expect("f64 values")
}

impl Engine {
    /// Loads the weights onto `device`.
    pub fn load(weights: &Path, device: Device) -> Result<Engine, Error> {
        if let Device::Cuda(_) = device {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        Ok(Engine {
            vgg: Vgg19::load(weights, device)?,
            device,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn vgg(&self) -> &Vgg19 {
        &self.vgg
    }

    /// Content and style targets for a working content image; style images are resized so that their
    /// longest side is `round(longest * style_scale)`, `longest` being the working size of this scale.
    pub fn targets(
        &self,
        content: &RgbImage,
        styles: &[RgbImage],
        longest: u32,
        params: &RenderParams,
    ) -> Targets {
        let mut layers: Vec<Layer> = params
            .content_layers
            .iter()
            .chain(&params.style_layers)
            .copied()
            .collect();
        layers.sort();
        layers.dedup();
        let pos = |l: &Layer| layers.iter().position(|x| x == l).expect("layer listed");
        let pre = self.vgg.preprocessing();
        tch::no_grad(|| {
            let content_features = self.vgg.features(
                &pre.preprocess(content, self.device),
                params.pooling,
                &params.content_layers,
            );
            let content = params
                .content_layers
                .iter()
                .map(pos)
                .zip(content_features)
                .collect();
            let style_side = ((longest as f64) * params.style_scale).round().max(1.0) as u32;
            let mut grams: Vec<Option<Tensor>> = params.style_layers.iter().map(|_| None).collect();
            for (img, w) in styles.iter().zip(params.blend_weights(styles.len())) {
                let img = imaging::resize_longest(img, style_side);
                let features = self.vgg.features(
                    &pre.preprocess(&img, self.device),
                    params.pooling,
                    &params.style_layers,
                );
                for (acc, f) in grams.iter_mut().zip(features) {
                    let g = gram(&f) * w;
                    *acc = Some(match acc.take() {
                        Some(sum) => sum + g,
                        None => g,
                    });
                }
            }
            let style = params
                .style_layers
                .iter()
                .map(pos)
                .zip(grams.into_iter().map(|g| g.expect("a style")))
                .collect();
            Targets {
                layers: layers.clone(),
                content,
                style,
            }
        })
    }

    /// The weighted terms `[content, style, tv, total]` at `x` (preprocessed, `1 x 3 x H x W`).
    fn terms(&self, x: &Tensor, targets: &Targets, params: &RenderParams) -> [Tensor; 4] {
        let features = self.vgg.features(x, params.pooling, &targets.layers);
        let zero = || Tensor::zeros([], (Kind::Float, self.device));
        let content = targets
            .content
            .iter()
            .map(|(i, p)| content_loss(&features[*i], p, params.content_weight))
            .fold(zero(), |a, b| a + b);
        // layer_weight is 1 for every style layer (ALGORITHM.md)
        let style = targets
            .style
            .iter()
            .map(|(i, a)| style_loss(&features[*i], a, params.style_weight))
            .fold(zero(), |a, b| a + b);
        let tv = if params.tv_weight > 0.0 {
            tv_loss(x, params.tv_weight)
        } else {
            zero()
        };
        let total = &content + &style + &tv;
        [content, style, tv, total]
    }

    fn losses_of(terms: &[Tensor; 4]) -> LossTerms {
        let v = to_f64s(&Tensor::stack(terms, 0).detach());
        LossTerms {
            content: v[0],
            style: v[1],
            tv: v[2],
            total: v[3],
        }
    }

    /// The objective and its gradient with respect to `x`.
    pub fn objective(
        &self,
        x: &Tensor,
        targets: &Targets,
        params: &RenderParams,
    ) -> (LossTerms, Tensor) {
        let xg = x.detach().set_requires_grad(true);
        let terms = self.terms(&xg, targets, params);
        let grad = Tensor::run_backward(&[&terms[3]], &[&xg], false, false)
            .pop()
            .expect("one gradient");
        (Self::losses_of(&terms), grad)
    }

    /// The objective at `x`, without a gradient.
    pub fn losses(&self, x: &Tensor, targets: &Targets, params: &RenderParams) -> LossTerms {
        tch::no_grad(|| Self::losses_of(&self.terms(x, targets, params)))
    }

    /// The objective of `job` evaluated at an image of the output's size (e.g. to measure a finished render).
    pub fn evaluate(&self, job: &RenderJob, image: &RgbImage) -> Result<LossTerms, Error> {
        job.params.validate(job.styles.len())?;
        let (w, h) = image.dimensions();
        let content = imaging::resize(&job.content, w, h);
        let targets = self.targets(&content, &job.styles, w.max(h), &job.params);
        Ok(self.losses(
            &self.vgg.preprocessing().preprocess(image, self.device),
            &targets,
            &job.params,
        ))
    }

    fn initial(&self, job: &RenderJob, content: &RgbImage) -> Result<Tensor, Error> {
        let pre = self.vgg.preprocessing();
        let (w, h) = content.dimensions();
        Ok(match &job.params.init {
            Init::Content => pre.preprocess(content, self.device),
            Init::Noise => {
                tch::manual_seed(job.params.seed as i64);
                Tensor::randn([1, 3, h as i64, w as i64], (Kind::Float, Device::Cpu))
                    .to_device(self.device)
                    * pre.noise_sigma()
            }
            Init::Image(path) => {
                let img = job.init_image.as_ref().ok_or_else(|| {
                    stylefarm_core::Error::invalid(
                        "init",
                        format!("{}: init image not loaded", path.display()),
                    )
                })?;
                pre.preprocess(&imaging::resize(img, w, h), self.device)
            }
        })
    }

    /// Renders `job`; `on_progress` sees every evaluation and may stop the render ([`Error::Cancelled`]).
    pub fn render(
        &self,
        job: &RenderJob,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<RgbImage, Error> {
        let params = &job.params;
        params.validate(job.styles.len())?;
        let started = Instant::now();
        let sizes = params.sizes_per_scale();
        let iterations = params.iterations_per_scale();
        let scales = sizes.len() as u32;
        let mut x: Option<Tensor> = None;
        for (s, (&longest, &n)) in sizes.iter().zip(&iterations).enumerate() {
            let content = imaging::resize_longest(&job.content, longest);
            let (w, h) = content.dimensions();
            let targets = self.targets(&content, &job.styles, longest, params);
            let mut xs = match x.take() {
                None => self.initial(job, &content)?,
                Some(prev) => tch::no_grad(|| {
                    prev.upsample_bilinear2d([h as i64, w as i64], false, None, None)
                }),
            };
            let mut evaluations = 0u32;
            let mut report = |iteration: u32, losses: LossTerms| -> Result<(), Error> {
                let progress = Progress {
                    scale: s as u32 + 1,
                    scales,
                    iteration,
                    iterations: n,
                    width: w,
                    height: h,
                    losses,
                    elapsed: started.elapsed().as_secs_f64(),
                };
                match on_progress(&progress) {
                    ControlFlow::Continue(()) => Ok(()),
                    ControlFlow::Break(()) => Err(Error::Cancelled),
                }
            };
            let mut f = |x: &Tensor| -> Result<(f64, Tensor), Error> {
                let (losses, grad) = self.objective(x, &targets, params);
                report(evaluations, losses)?;
                evaluations += 1;
                Ok((losses.total, grad))
            };
            let steps = match params.optimizer {
                Optimizer::Lbfgs => {
                    let lbfgs = Lbfgs {
                        history_size: params.history_size as usize,
                        ..Lbfgs::default()
                    };
                    lbfgs.minimize(&mut xs, n as usize, &mut f)?
                }
                Optimizer::Adam => {
                    Adam::new(params.learning_rate).minimize(&mut xs, n as usize, &mut f)?
                }
            } as u32;
            if steps == evaluations {
                // the last step's image has not been evaluated yet
                report(steps, self.losses(&xs, &targets, params))?;
            }
            x = Some(xs);
        }
        let out = self
            .vgg
            .preprocessing()
            .deprocess(&x.expect("at least one scale"));
        Ok(if params.original_colors {
            imaging::original_colors(&out, &job.content)
        } else {
            out
        })
    }
}
