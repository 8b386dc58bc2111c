//! The objective (ALGORITHM.md): content and style targets computed once per scale, the weighted content,
//! style and total-variation terms, and their gradient with respect to the image; for the whole image at
//! once, or block by block ([`blocked`]) with the memory of a block.

pub mod blocked;

use image::RgbImage;
use stylefarm_core::imaging;
use stylefarm_core::{Layer, RenderParams};
use tch::{Device, Kind, Tensor};

use crate::engine::Engine;
use crate::flow;
use crate::loss::{content_loss, gram, style_loss, temporal_loss, tv_loss};
use crate::shard::Shard;
use crate::Error;
use blocked::BlockedTargets;

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

pub use stylefarm_core::progress::LossTerms;

/// The targets of one scale: content feature maps and blended style Gram matrices, computed once.
pub struct Targets {
    /// The distinct layers the objective reads, in network order.
    layers: Vec<Layer>,
    /// (position in `layers`, content feature map)
    content: Vec<(usize, Tensor)>,
    /// (position in `layers`, blended Gram matrix)
    style: Vec<(usize, Tensor)>,
    /// A video frame's temporal loss ([`Engine::temporal_target`]); None for other renders.
    temporal: Option<Temporal>,
}

/// The temporal loss' inputs at one scale: the previous frame's result and where it holds the frame.
pub(crate) struct Temporal {
    /// The previous frame's result at this scale's size, warped along the optical flow when the render
    /// follows it, preprocessed (`1 x 3 x H x W`).
    result: Tensor,
    /// 1 where the content matches the previous frame's (and the flow is reliable), else 0
    /// (`1 x 1 x H x W`).
    mask: Tensor,
    /// One 0..255 grey level in the preprocessed units.
    per_255: f64,
}

/// The targets of one scale of a render: for the whole image at once, or block by block.
pub(crate) enum ScaleTargets {
    Whole(Targets),
    Blocked(BlockedTargets),
}

/// The error for a video frame with blocks: the temporal loss is the whole image's.
pub(crate) fn whole_frames_only() -> Error {
    Error::Core(stylefarm_core::Error::invalid(
        "frame",
        "a video frame renders whole, not in blocks",
    ))
}

/// The error for normalized gradients with blocks: a layer's L1 norm is the whole image's.
pub(crate) fn not_with_blocks() -> Error {
    Error::Core(stylefarm_core::Error::invalid(
        "normalize_gradients",
        "not with blocks: a layer's L1 norm is the whole image's",
    ))
}

impl Temporal {
    /// A video frame's start: the previous frame's result where the content matches, `init` (the
    /// start a first frame has) elsewhere. `init` is `1 x 3 x H x W`, preprocessed.
    pub(crate) fn start(&self, init: &Tensor) -> Tensor {
        tch::no_grad(|| &self.result * &self.mask + init * (1.0 - &self.mask))
    }
}

impl ScaleTargets {
    /// The temporal loss' inputs, for a video frame after its chunk's first.
    pub(crate) fn temporal(&self) -> Option<&Temporal> {
        match self {
            ScaleTargets::Whole(t) => t.temporal.as_ref(),
            ScaleTargets::Blocked(_) => None,
        }
    }

    /// Adds a video frame's temporal loss to the targets; the blocked objective has none (an error: a video
    /// frame renders whole).
    pub(crate) fn set_temporal(&mut self, temporal: Temporal) -> Result<(), Error> {
        match self {
            ScaleTargets::Whole(t) => {
                t.temporal = Some(temporal);
                Ok(())
            }
            ScaleTargets::Blocked(_) => Err(whole_frames_only()),
        }
    }
}

/// The gradient of the scalar `output` with respect to `input` (`torch.autograd.grad`), keeping the graph
/// for another backward through it with `keep_graph`.
pub(crate) fn only_gradient(
    output: &Tensor,
    input: &Tensor,
    keep_graph: bool,
) -> Result<Tensor, Error> {
    Tensor::f_run_backward(&[output], &[input], keep_graph, false)?
        .pop()
        .ok_or_else(|| Error::Torch(tch::TchError::Torch("backward gave no gradient".into())))
}

/// A float tensor of the terms `[content, style, tv, total, temporal]`, read back.
pub(crate) fn read_terms(terms: &Tensor) -> Result<LossTerms, Error> {
    Ok(LossTerms::from_values(&to_f64s(terms)?))
}

pub(crate) fn to_f64s(t: &Tensor) -> Result<Vec<f64>, Error> {
    Ok(Vec::<f64>::try_from(
        &t.f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?
            .flatten(0, -1),
    )?)
}

impl Engine {
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
        let pre = self.vgg().preprocessing();
        tch::no_grad(|| {
            let mut grams: Vec<Option<Tensor>> = params.style_layers.iter().map(|_| None).collect();
            for (img, w) in styles.iter().zip(params.blend_weights(styles.len())) {
                // luminance-only: the style's luminance, then resized (so that a grey image of it is the
                // same style, bit for bit); a render's styles are that luminance matched to its content's
                // already ([`RenderJob::new`]: the luminance of a grey image is itself)
                let img = match params.luminance_only {
                    true => imaging::resize_longest(&imaging::luminance(img), side),
                    false => imaging::resize_longest(img, side),
                };
                let of_image: Vec<Tensor> = match block {
                    Some(b) if img.width().max(img.height()) > b => {
                        blocked::image_grams(self, &img, b, params)?
                    }
                    _ => self
                        .vgg()
                        .features(
                            &pre.preprocess(&img, self.device()),
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
        let pre = self.vgg().preprocessing();
        tch::no_grad(|| {
            let content_features = self.vgg().features(
                &pre.preprocess(content, self.device()),
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
                temporal: None,
            })
        })
    }

    /// The temporal loss' inputs for a video frame whose working content (as the optimization sees it) is
    /// `content`, given the previous frame's `content` and `result` (each resized to it), after Ruder et al.
    /// (2016). With `params.optical_flow`, the previous result and content are warped along the flow from
    /// this frame to the previous one ([`crate::flow`]), and a pixel is held where the flow is reliable
    /// ([`flow::reliable`]); without, they are compared in place. Either way a pixel is held only where the
    /// (warped) previous content is within [`imaging::TEMPORAL_TOLERANCE`] of this one in every channel.
    /// The inputs are made grey for luminance-only transfer, as the content is.
    pub(crate) fn temporal_target(
        &self,
        content: &RgbImage,
        previous_content: &RgbImage,
        previous_result: &RgbImage,
        params: &RenderParams,
    ) -> Result<Temporal, Error> {
        let (w, h) = content.dimensions();
        let device = self.device();
        let of = |img: &RgbImage| crate::render::optimized(imaging::resize(img, w, h), params);
        let pre = self.vgg().preprocessing();
        let result = pre.preprocess(&of(previous_result), device);
        let unit = |img: &RgbImage| flow::unit_image(img, device);
        let (now, before) = (unit(content), unit(&of(previous_content)));
        let (result, before, reliable) = if params.optical_flow && w.min(h) >= 2 {
            let backward = flow::flow(&now, &before);
            let forward = flow::flow(&before, &now);
            let reliable = flow::reliable(&backward, &forward);
            (
                tch::no_grad(|| flow::warp(&result, &backward)),
                tch::no_grad(|| flow::warp(&before, &backward)),
                Some(reliable),
            )
        } else {
            (result, before, None)
        };
        // every channel within the tolerance (the half level absorbs the float rounding of k / 255)
        let tolerance = (f64::from(imaging::TEMPORAL_TOLERANCE) + 0.5) / 255.0;
        let same = (before - now)
            .abs()
            .amax([1i64].as_slice(), true)
            .le(tolerance)
            .to_kind(Kind::Float);
        let mask = match reliable {
            Some(r) => same * r,
            None => same,
        };
        Ok(Temporal {
            result,
            mask,
            per_255: pre.per_255(),
        })
    }

    /// The weighted terms `[content, style, tv, total, temporal]` at `x` (preprocessed, `1 x 3 x H x W`),
    /// and the scalar whose gradient with respect to `x` the optimizer follows: the total, or with
    /// `normalize` ([`RenderParams::normalize_gradients`]) a surrogate whose gradient is
    /// jcjohnson/neural-style's: each content and style layer's `weight * g / (|g|_1 + 1e-8)`, `g` the
    /// gradient of its unweighted loss with respect to its feature map (its `ContentLoss` and `StyleLoss`
    /// modules' `updateGradInput`), carried back through the network, plus the total variation and
    /// temporal terms' own gradients. `normalize` needs autograd (not under `no_grad`); nothing is read back.
    fn terms(
        &self,
        x: &Tensor,
        targets: &Targets,
        params: &RenderParams,
        normalize: bool,
    ) -> Result<([Tensor; LossTerms::LEN], Tensor), Error> {
        let features = self.vgg().features(x, params.pooling, &targets.layers)?;
        let zero = || Tensor::zeros([], (Kind::Float, self.device()));
        // sum of <feature map, its normalized gradient> over the layers: its gradient with respect to `x` is
        // the layers' normalized gradients carried back through the network
        let mut normalized: Option<Tensor> = None;
        let mut layer = |features: &Tensor,
                         loss: &dyn Fn(f64) -> Tensor,
                         weight: f64|
         -> Result<Tensor, Error> {
            if !normalize || weight == 0.0 {
                return Ok(loss(weight));
            }
            let unweighted = loss(1.0);
            // the backward stops at the feature map: the network's graph below it is not run, nor freed
            let g = only_gradient(&unweighted, features, false)?;
            let norm = g.f_abs()?.f_sum(Kind::Float)? + 1e-8;
            let pull = g * weight / norm;
            let product = (features * pull).f_sum(Kind::Float)?;
            normalized = Some(match normalized.take() {
                Some(sum) => sum + product,
                None => product,
            });
            Ok(unweighted * weight)
        };
        let content = (targets.content.iter())
            .map(|(i, p)| {
                let f = &features[*i];
                layer(f, &|w| content_loss(f, p, w), params.content_weight)
            })
            .collect::<Result<Vec<_>, Error>>()?
            .into_iter()
            .fold(zero(), |a, b| a + b);
        // in style_layers order, as their weights
        let style = (targets.style.iter().zip(params.layer_weights()))
            .map(|((i, a), w)| {
                let f = &features[*i];
                layer(f, &|w| style_loss(f, a, w), params.style_weight * w)
            })
            .collect::<Result<Vec<_>, Error>>()?
            .into_iter()
            .fold(zero(), |a, b| a + b);
        let tv = if params.tv_weight > 0.0 {
            tv_loss(x, params.tv_weight)
        } else {
            zero()
        };
        let temporal = match &targets.temporal {
            Some(t) => temporal_loss(x, &t.result, &t.mask, params.temporal_weight, t.per_255),
            None => zero(),
        };
        let total = &content + &style + &tv + &temporal;
        // (no layer at all with a weight: the total, whose content and style terms are 0)
        let differentiated = match normalized {
            Some(layers) => layers + &tv + &temporal,
            None => total.shallow_clone(),
        };
        Ok(([content, style, tv, total, temporal], differentiated))
    }

    fn losses_of(terms: &[Tensor; LossTerms::LEN]) -> Result<LossTerms, Error> {
        read_terms(&Tensor::f_stack(terms, 0)?.detach())
    }

    /// The objective and its gradient with respect to `x`.
    pub fn objective(
        &self,
        x: &Tensor,
        targets: &Targets,
        params: &RenderParams,
    ) -> Result<(LossTerms, Tensor), Error> {
        let (terms, grad) = self.objective_on_device(x, targets, params)?;
        Ok((read_terms(&terms)?, grad))
    }

    /// The objective's weighted terms `[content, style, tv, total, temporal]` (a float tensor of
    /// [`LossTerms::LEN`]) and its gradient
    /// with respect to `x`, both left on the device: nothing is read back.
    fn objective_on_device(
        &self,
        x: &Tensor,
        targets: &Targets,
        params: &RenderParams,
    ) -> Result<(Tensor, Tensor), Error> {
        let xg = x.detach().set_requires_grad(true);
        let (terms, differentiated) =
            self.terms(&xg, targets, params, params.normalize_gradients)?;
        let grad = only_gradient(&differentiated, &xg, false)?;
        Ok((Tensor::f_stack(&terms, 0)?.detach(), grad))
    }

    /// The objective at `x`, without a gradient.
    pub fn losses(
        &self,
        x: &Tensor,
        targets: &Targets,
        params: &RenderParams,
    ) -> Result<LossTerms, Error> {
        tch::no_grad(|| Self::losses_of(&self.terms(x, targets, params, false)?.0))
    }

    /// The targets of a working content image: block by block when it is larger than `block`, and always
    /// for a shard (whose `content` is its region).
    pub(crate) fn scale_targets(
        &self,
        content: &RgbImage,
        style: &StyleGrams,
        params: &RenderParams,
        block: Option<u32>,
        shard: Option<&Shard>,
    ) -> Result<ScaleTargets, Error> {
        let pre = || {
            self.vgg()
                .preprocessing()
                .preprocess(content, self.device())
        };
        Ok(match (block, shard) {
            (Some(b), Some(shard)) => ScaleTargets::Blocked(BlockedTargets::shard(
                self,
                &pre(),
                style,
                params,
                b,
                shard,
            )?),
            (Some(b), None) if content.width().max(content.height()) > b => {
                ScaleTargets::Blocked(BlockedTargets::new(self, &pre(), style, params, b)?)
            }
            _ => ScaleTargets::Whole(self.targets_with(content, style, params)?),
        })
    }

    /// The objective's terms (a float tensor of [`LossTerms::LEN`], on the device) and its gradient at `x`,
    /// for either kind of targets.
    pub(crate) fn scale_objective(
        &self,
        x: &Tensor,
        targets: &ScaleTargets,
        params: &RenderParams,
    ) -> Result<(Tensor, Tensor), Error> {
        match targets {
            ScaleTargets::Whole(t) => self.objective_on_device(x, t, params),
            ScaleTargets::Blocked(_) if params.normalize_gradients => Err(not_with_blocks()),
            ScaleTargets::Blocked(t) => {
                let (terms, grad) = self.objective_blocked_on_device(x, t, params)?;
                Ok((terms.f_to_kind(Kind::Float)?, grad))
            }
        }
    }

    /// The objective at `x` without a gradient, for either kind of targets.
    pub(crate) fn scale_losses(
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
}
