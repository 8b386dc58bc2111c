//! One render: targets under no_grad, the objective with its gradient, the optimizer, multi-scale, progress.

use std::ops::ControlFlow;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

use image::{Rgb32FImage, RgbImage};
use serde::Serialize;
use stylefarm_core::imaging;
use stylefarm_core::{ImageSize, Init, Layer, Optimizer, RenderParams};
use tch::{Device, Kind, Tensor};

use crate::blocked::{self, BlockedTargets};
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
    /// The longest side the style targets are sized for (style images get `round(style_longest *
    /// style_scale)`); `None`: each scale's working size. A tile of a larger canvas sets the canvas' size.
    pub style_longest: Option<u32>,
    /// Evaluate the objective in blocks of at most this many px a side, halos included (the exact
    /// gradient of the whole image, with memory bound by the block; [`Engine::objective_blocked`]).
    pub block: Option<u32>,
}

impl RenderJob {
    pub fn new(
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
        }
    }
}

impl RenderJob {
    /// Checks the parameters, and that every image reaches the deepest layer at every scale
    /// ([`RenderParams::check_sizes`]), before any tensor work.
    pub fn check(&self) -> Result<(), Error> {
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
    let styles: Vec<ImageSize> = styles
        .iter()
        .zip(&names)
        .map(|(img, name)| ImageSize::new(name, img.dimensions()))
        .collect();
    let content = ImageSize::new("", content);
    Ok(params.check_sizes(content, &styles, style_longest)?)
}

/// Where [`Engine::render_with`] gets the style targets of a style side: e.g. a cache shared across tasks.
pub type StyleSource<'a> = dyn FnMut(&Engine, u32) -> Result<Rc<StyleGrams>, Error> + 'a;

/// The blended Gram matrices of a style set at one style size, one per style layer: the style targets that
/// every task and every tile with the same (style images, blend, size, layers, pooling) share.
pub struct StyleGrams {
    grams: Vec<Tensor>,
}

impl StyleGrams {
    /// The Gram matrix of each style layer, in `params.style_layers` order.
    pub fn grams(&self) -> &[Tensor] {
        &self.grams
    }

    /// `self + plus - minus`, layer by layer: e.g. a tile's target that keeps the tile's own deviation
    /// from its canvas (`plus` the tile's Grams, `minus` the canvas').
    pub fn offset(&self, plus: &StyleGrams, minus: &StyleGrams) -> StyleGrams {
        StyleGrams {
            grams: self
                .grams
                .iter()
                .zip(&plus.grams)
                .zip(&minus.grams)
                .map(|((a, p), m)| a + p - m)
                .collect(),
        }
    }
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

/// The targets of one scale of a render: for the whole image at once, or block by block.
enum ScaleTargets {
    Whole(Targets),
    Blocked(BlockedTargets),
}

/// VGG19 on one device, loaded once and reused for any number of renders.
pub struct Engine {
    vgg: Vgg19,
    device: Device,
}

fn to_f64s(t: &Tensor) -> Result<Vec<f64>, Error> {
    Ok(Vec::<f64>::try_from(
        &t.f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?
            .flatten(0, -1),
    )?)
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

    /// Whether the engine still renders: a 16 x 16 image through VGG19's first convolution on the device,
    /// read back to the host (e.g. after a failure, to tell a bad task from a lost device).
    pub fn probe(&self) -> Result<(), Error> {
        let x = Tensor::f_zeros([1, 3, 16, 16], (Kind::Float, self.device))?;
        let f = self
            .vgg
            .features(&x, stylefarm_core::Pooling::Max, &[Layer::new(1, 1)])?;
        to_f64s(&f[0].f_sum(Kind::Float)?)?;
        Ok(())
    }

    /// Content and style targets for a working content image; style images are resized so that their
    /// longest side is `round(longest * style_scale)`, `longest` being the working size of this scale.
    pub fn targets(
        &self,
        content: &RgbImage,
        styles: &[RgbImage],
        longest: u32,
        params: &RenderParams,
    ) -> Result<Targets, Error> {
        let grams = self.style_grams(styles, params.style_side(longest), params, None)?;
        self.targets_with(content, &grams, params)
    }

    /// The blended Gram matrices of `styles`, each resized so its longest side is `side`. With `block`, a
    /// style image larger than it is run through the network in blocks of at most `block` px (halos
    /// included) whose Gram sums are added up, so the memory needed depends on the block, not on `side`.
    pub fn style_grams(
        &self,
        styles: &[RgbImage],
        side: u32,
        params: &RenderParams,
        block: Option<u32>,
    ) -> Result<StyleGrams, Error> {
        let pre = self.vgg.preprocessing();
        tch::no_grad(|| {
            let mut grams: Vec<Option<Tensor>> = params.style_layers.iter().map(|_| None).collect();
            for (img, w) in styles.iter().zip(params.blend_weights(styles.len())) {
                let img = imaging::resize_longest(img, side);
                let of_image: Vec<Tensor> = match block {
                    Some(b) if img.width().max(img.height()) > b => {
                        blocked::image_grams(self, &img, b, params)?
                    }
                    _ => self
                        .vgg
                        .features(
                            &pre.preprocess(&img, self.device),
                            params.pooling,
                            &params.style_layers,
                        )?
                        .iter()
                        .map(gram)
                        .collect(),
                };
                for (acc, g) in grams.iter_mut().zip(of_image) {
                    let g = g * w;
                    *acc = Some(match acc.take() {
                        Some(sum) => sum + g,
                        None => g,
                    });
                }
            }
            let grams = grams.into_iter().collect::<Option<Vec<Tensor>>>();
            Ok(StyleGrams {
                grams: grams.ok_or_else(|| {
                    Error::Core(stylefarm_core::Error::invalid(
                        "style",
                        "at least one style image is needed",
                    ))
                })?,
            })
        })
    }

    /// Targets for a working content image with precomputed style Gram matrices.
    pub fn targets_with(
        &self,
        content: &RgbImage,
        style: &StyleGrams,
        params: &RenderParams,
    ) -> Result<Targets, Error> {
        let mut layers: Vec<Layer> = params
            .content_layers
            .iter()
            .chain(&params.style_layers)
            .copied()
            .collect();
        layers.sort();
        layers.dedup();
        // `layers` is made of the content and style layers: each is there
        let pos = |l: &Layer| layers.iter().position(|x| x == l).expect("layer listed");
        let pre = self.vgg.preprocessing();
        tch::no_grad(|| {
            let content_features = self.vgg.features(
                &pre.preprocess(content, self.device),
                params.pooling,
                &params.content_layers,
            )?;
            let content = params
                .content_layers
                .iter()
                .map(pos)
                .zip(content_features)
                .collect();
            let style = params
                .style_layers
                .iter()
                .map(pos)
                .zip(style.grams.iter().map(Tensor::shallow_clone))
                .collect();
            Ok(Targets {
                layers: layers.clone(),
                content,
                style,
            })
        })
    }

    /// The weighted terms `[content, style, tv, total]` at `x` (preprocessed, `1 x 3 x H x W`).
    fn terms(
        &self,
        x: &Tensor,
        targets: &Targets,
        params: &RenderParams,
    ) -> Result<[Tensor; 4], Error> {
        let features = self.vgg.features(x, params.pooling, &targets.layers)?;
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
        Ok([content, style, tv, total])
    }

    fn losses_of(terms: &[Tensor; 4]) -> Result<LossTerms, Error> {
        let v = to_f64s(&Tensor::f_stack(terms, 0)?.detach())?;
        Ok(LossTerms {
            content: v[0],
            style: v[1],
            tv: v[2],
            total: v[3],
        })
    }

    /// The objective and its gradient with respect to `x`.
    pub fn objective(
        &self,
        x: &Tensor,
        targets: &Targets,
        params: &RenderParams,
    ) -> Result<(LossTerms, Tensor), Error> {
        let xg = x.detach().set_requires_grad(true);
        let terms = self.terms(&xg, targets, params)?;
        let mut grads = Tensor::f_run_backward(&[&terms[3]], &[&xg], false, false)?;
        let grad = grads.pop().ok_or_else(|| {
            Error::Torch(tch::TchError::Torch("backward gave no gradient".into()))
        })?;
        Ok((Self::losses_of(&terms)?, grad))
    }

    /// The objective at `x`, without a gradient.
    pub fn losses(
        &self,
        x: &Tensor,
        targets: &Targets,
        params: &RenderParams,
    ) -> Result<LossTerms, Error> {
        tch::no_grad(|| Self::losses_of(&self.terms(x, targets, params)?))
    }

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
        check_inputs(&params, (w, h), &job.styles, None)?;
        let content = imaging::resize(&job.content, w, h);
        let grams =
            self.style_grams(&job.styles, params.style_side(w.max(h)), &params, job.block)?;
        let targets = self.scale_targets(&content, &grams, &params, job.block)?;
        let x = self.vgg.preprocessing().preprocess(image, self.device);
        self.scale_losses(&x, &targets, &params)
    }

    /// The targets of a working content image: block by block when it is larger than `block`.
    fn scale_targets(
        &self,
        content: &RgbImage,
        style: &StyleGrams,
        params: &RenderParams,
        block: Option<u32>,
    ) -> Result<ScaleTargets, Error> {
        Ok(match block {
            Some(b) if content.width().max(content.height()) > b => {
                ScaleTargets::Blocked(BlockedTargets::new(
                    self,
                    &self.vgg.preprocessing().preprocess(content, self.device),
                    style,
                    params,
                    b,
                )?)
            }
            _ => ScaleTargets::Whole(self.targets_with(content, style, params)?),
        })
    }

    /// The objective and its gradient at `x`, for either kind of targets.
    fn scale_objective(
        &self,
        x: &Tensor,
        targets: &ScaleTargets,
        params: &RenderParams,
    ) -> Result<(LossTerms, Tensor), Error> {
        match targets {
            ScaleTargets::Whole(t) => self.objective(x, t, params),
            ScaleTargets::Blocked(t) => self.objective_blocked(x, t, params),
        }
    }

    /// The objective at `x` without a gradient, for either kind of targets.
    fn scale_losses(
        &self,
        x: &Tensor,
        targets: &ScaleTargets,
        params: &RenderParams,
    ) -> Result<LossTerms, Error> {
        match targets {
            ScaleTargets::Whole(t) => self.losses(x, t, params),
            ScaleTargets::Blocked(t) => self.losses_blocked(x, t, params),
        }
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
        self.render_with(
            job,
            &mut |engine, side| engine.own_style_grams(job, side),
            on_progress,
        )
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
    /// shared across tasks, or blocked Grams of a large canvas.
    pub fn render_with(
        &self,
        job: &RenderJob,
        style_for: &mut StyleSource<'_>,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<RgbImage, Error> {
        let x = self.optimize(job, style_for, on_progress)?;
        let out = self.vgg.preprocessing().deprocess(&x)?;
        Ok(if job.params.original_colors {
            imaging::original_colors(&out, &job.content)
        } else {
            out
        })
    }

    /// Renders `job` as [`Self::render`] does, the result in floats (0..255, clamped, not rounded): for
    /// outputs of 16 bits per channel.
    pub fn render_f32(
        &self,
        job: &RenderJob,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Rgb32FImage, Error> {
        let x = self.optimize(
            job,
            &mut |engine, side| engine.own_style_grams(job, side),
            on_progress,
        )?;
        let out = self.vgg.preprocessing().deprocess_f32(&x)?;
        Ok(if job.params.original_colors {
            imaging::original_colors_f32(&out, &job.content)
        } else {
            out
        })
    }

    /// Every scale's optimization; the optimized image, preprocessed (`1 x 3 x H x W`).
    fn optimize(
        &self,
        job: &RenderJob,
        style_for: &mut StyleSource<'_>,
        on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
    ) -> Result<Tensor, Error> {
        job.check()?;
        let params = &job.params;
        let started = Instant::now();
        let sizes = params.sizes_per_scale();
        let iterations = params.iterations_per_scale();
        let scales = sizes.len() as u32;
        let mut x: Option<Tensor> = None;
        for (s, (&longest, &n)) in sizes.iter().zip(&iterations).enumerate() {
            let content = imaging::resize_longest(&job.content, longest);
            let (w, h) = content.dimensions();
            let style = style_for(
                self,
                params.style_side(job.style_longest.unwrap_or(longest)),
            )?;
            let targets = self.scale_targets(&content, &style, params, job.block)?;
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
                let (losses, grad) = self.scale_objective(x, &targets, params)?;
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
                report(steps, self.scale_losses(&xs, &targets, params)?)?;
            }
            x = Some(xs);
        }
        x.ok_or_else(|| Error::Input("no scale to render".into()))
    }
}
