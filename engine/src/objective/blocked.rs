//! The objective of a large image evaluated block by block (ALGORITHM.md, "Exact distributed mode"; the
//! method of bgalerne/scaling_painting_style_transfer): memory bound by the block, not by the image.
//!
//! The image is cut into blocks whose corners lie on multiples of 16 px (the deepest pooling stride); each
//! is run through the network with a halo of context around it, and each layer's feature map is cut back to
//! the block's own positions. Those positions partition every layer's positions exactly, so:
//! - pass 1 (no gradient) sums the blocks' `F F^T` into each style layer's Gram matrix of the WHOLE image,
//!   hence the style loss and its gradient with respect to the Gram matrices, `D = dL/dG`;
//! - pass 2 runs each block again with gradients and back-propagates `<D, F F^T> / (C N)` plus the block's
//!   share of the content loss; the gradients of all blocks (halos included) add up to the whole image's.
//!
//! Inside the halo's reach a block's features equal the whole image's; past it the zero padding of the
//! block's border differs, so the result matches a one-pass evaluation up to that deep-layer error: with
//! 32-px halos, relu5_1's Gram matrix is a few percent off, the gradient within 1e-4 (BENCHMARKS.md).

use image::RgbImage;
use stylefarm_core::{Layer, RenderParams};
use tch::{Kind, Tensor};

use super::{LossTerms, StyleGrams};
use crate::engine::Engine;
use crate::loss::tv_loss;
use crate::Error;

/// Alignment of block corners: the stride of the deepest pooling.
const ALIGN: u32 = 16;

/// One block: the region run through the network (block and halo) and the block's own rectangle, both
/// `[x0, x1) x [y0, y1)` in image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Block {
    pub region: [u32; 4],
    pub own: [u32; 4],
}

impl Block {
    /// The block's own positions in the feature map `f` (`1 x C x h x w`) of its region at `layer`, as a
    /// `C x n` matrix; `None` when the block has no position at this depth.
    fn own_features(&self, f: &Tensor, layer: Layer, width: u32, height: u32) -> Option<Tensor> {
        let stride = 1u32 << (layer.block - 1);
        let size = f.size();
        let (c, fh, fw) = (size[1], size[2], size[3]);
        let cut = |lo: u32, hi: u32, r0: u32, full: i64, last: bool| {
            let a = i64::from((lo - r0) / stride);
            // the last block along an axis takes what the network's flooring left at the end
            let b = if last {
                full
            } else {
                i64::from((hi - r0) / stride)
            };
            (a, (b - a).max(0))
        };
        let [x0, x1, y0, y1] = self.own;
        let (fx, nx) = cut(x0, x1, self.region[0], fw, x1 == width);
        let (fy, ny) = cut(y0, y1, self.region[2], fh, y1 == height);
        (nx > 0 && ny > 0).then(|| f.narrow(3, fx, nx).narrow(2, fy, ny).reshape([c, nx * ny]))
    }

    /// The block's region of `x` (`1 x 3 x H x W`).
    fn cut(&self, x: &Tensor) -> Tensor {
        let [x0, x1, y0, y1] = self.region;
        x.narrow(3, i64::from(x0), i64::from(x1 - x0))
            .narrow(2, i64::from(y0), i64::from(y1 - y0))
    }
}

/// The halo of the blocks of an objective evaluation, for blocks of at most `block` px: an eighth of it, at
/// least 32 px. (Measured on a 330 x 250 image: 16 px of halo leave a 5e-2 relative error in the gradient,
/// 32 px 8e-5.)
pub(crate) fn objective_halo(block: u32) -> u32 {
    (block / 8 / ALIGN * ALIGN).max(2 * ALIGN)
}

/// The halo of the blocks of style targets, computed once per scale: a quarter of the block, at least 16
/// px and at most [`MAX_TARGET_HALO`]. (relu5_1's Gram matrix, whose features see furthest, is within 4e-5
/// of the one-pass one with a 64-px halo on 256-px blocks, but 5e-2 off with 32 px.)
pub(crate) fn target_halo(block: u32) -> u32 {
    (block / 4 / ALIGN * ALIGN).clamp(ALIGN, MAX_TARGET_HALO)
}

/// The most halo style targets get: twice the 64 px that keep relu5_1's Gram matrix within 4e-5. Past it
/// a larger block only adds its own positions (a quarter of the block would make the halo's share of the
/// work the same 4x at every block size).
pub const MAX_TARGET_HALO: u32 = 128;

/// The block for style targets (Gram matrices of a style image or a canvas, forward passes without
/// gradients) alongside an optimization in blocks or tiles of `block` px: at least [`MIN_TARGET_BLOCK`].
/// A forward pass without gradients keeps about two layers' activations, a tenth of what a training step
/// keeps per pixel, so 4x the pixels of a 512-px tile stay within that tile's memory; and with the halo
/// capped at [`MAX_TARGET_HALO`], a 1024-px block computes 768 px of its own, where a 512-px one computes
/// 256: 1.8x the image's pixels through the network instead of 4x.
pub fn target_block(block: u32) -> u32 {
    block.max(MIN_TARGET_BLOCK)
}

/// See [`target_block`].
pub const MIN_TARGET_BLOCK: u32 = 1024;

/// The blocks of a `width` x `height` image such that no region (block and `halo` on each side) exceeds
/// `block` px a side, unless the block is too small to hold a 16-px block and its halo.
pub(crate) fn blocks(width: u32, height: u32, block: u32, halo: u32) -> Vec<Block> {
    let own = ((block.saturating_sub(2 * halo)) / ALIGN * ALIGN).max(ALIGN);
    let mut out = Vec::new();
    for y0 in (0..height).step_by(own as usize) {
        for x0 in (0..width).step_by(own as usize) {
            let (x1, y1) = ((x0 + own).min(width), (y0 + own).min(height));
            out.push(Block {
                region: [
                    x0.saturating_sub(halo),
                    (x1 + halo).min(width),
                    y0.saturating_sub(halo),
                    (y1 + halo).min(height),
                ],
                own: [x0, x1, y0, y1],
            });
        }
    }
    out
}

/// Sums `F F^T` of the blocks' own positions over all blocks, for each of `layers`, and divides by the
/// whole image's `C * positions`: the Gram matrices of the whole `width` x `height` image, each with that
/// divisor. `region(block)` gives a block's region, preprocessed (`1 x 3 x h x w`); no gradient.
pub(crate) fn grams(
    engine: &Engine,
    (width, height): (u32, u32),
    region: impl Fn(&Block) -> Tensor,
    blocks: &[Block],
    params: &RenderParams,
    layers: &[Layer],
) -> Result<Vec<(Tensor, f64)>, Error> {
    tch::no_grad(|| {
        let mut sums: Vec<Option<Tensor>> = layers.iter().map(|_| None).collect();
        let mut counts = vec![0i64; layers.len()];
        for b in blocks {
            let features = engine.vgg().features(&region(b), params.pooling, layers)?;
            for (k, (layer, f)) in layers.iter().zip(features).enumerate() {
                if let Some(part) = b.own_features(&f, *layer, width, height) {
                    counts[k] += part.numel() as i64;
                    let outer = part.matmul(&part.tr());
                    sums[k] = Some(match sums[k].take() {
                        Some(s) => s + outer,
                        None => outer,
                    });
                }
            }
        }
        sums.into_iter()
            .zip(counts)
            .zip(layers)
            .map(|((s, n), layer)| {
                let s = s.ok_or_else(|| {
                    Error::Input(format!(
                        "a {width} x {height} px image has no position at {layer}"
                    ))
                })?;
                Ok((s / (n as f64), n as f64))
            })
            .collect()
    })
}

/// The Gram matrices of a (large) image, computed in blocks of at most `block` px with the targets' halo;
/// only one block is ever preprocessed.
pub(crate) fn image_grams(
    engine: &Engine,
    img: &RgbImage,
    block: u32,
    params: &RenderParams,
) -> Result<Vec<Tensor>, Error> {
    let (w, h) = img.dimensions();
    let pre = engine.vgg().preprocessing();
    let region = |b: &Block| {
        let [x0, x1, y0, y1] = b.region;
        let crop = image::imageops::crop_imm(img, x0, y0, x1 - x0, y1 - y0).to_image();
        pre.preprocess(&crop, engine.device())
    };
    let blocks = blocks(w, h, block, target_halo(block));
    Ok(grams(
        engine,
        (w, h),
        region,
        &blocks,
        params,
        &params.style_layers,
    )?
    .into_iter()
    .map(|(g, _)| g)
    .collect())
}

/// A content target of one block: the index of its layer in `params.content_layers` and the feature map
/// at the block's own positions (`C x n`).
struct ContentPart {
    layer: usize,
    target: Tensor,
}

/// The targets of a blocked evaluation: the blocks, the content features of each block's own positions and
/// the style Gram matrices.
pub struct BlockedTargets {
    blocks: Vec<Block>,
    /// Per block, its content targets.
    content: Vec<Vec<ContentPart>>,
    /// `C * positions` of each content layer over the whole image.
    content_sizes: Vec<f64>,
    /// The style Gram matrices, in `params.style_layers` order.
    style: Vec<Tensor>,
}

impl BlockedTargets {
    /// Targets for a preprocessed content image `content` (`1 x 3 x H x W`) cut into blocks of at most
    /// `block` px, halos included.
    pub fn new(
        engine: &Engine,
        content: &Tensor,
        style: &StyleGrams,
        params: &RenderParams,
        block: u32,
    ) -> Result<BlockedTargets, Error> {
        let (width, height) = (content.size()[3] as u32, content.size()[2] as u32);
        let blocks = blocks(width, height, block, objective_halo(block));
        let mut content_sizes = vec![0.0; params.content_layers.len()];
        let parts = tch::no_grad(|| {
            blocks
                .iter()
                .map(|b| {
                    let features = engine.vgg().features(
                        &b.cut(content),
                        params.pooling,
                        &params.content_layers,
                    )?;
                    Ok(params
                        .content_layers
                        .iter()
                        .zip(features)
                        .enumerate()
                        .filter_map(|(k, (layer, f))| {
                            let own = b.own_features(&f, *layer, width, height)?;
                            content_sizes[k] += own.numel() as f64;
                            Some(ContentPart {
                                layer: k,
                                target: own.copy(),
                            })
                        })
                        .collect())
                })
                .collect::<Result<Vec<_>, Error>>()
        })?;
        Ok(BlockedTargets {
            blocks,
            content: parts,
            content_sizes,
            style: style.grams().iter().map(Tensor::shallow_clone).collect(),
        })
    }

    /// The number of blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether there is no block (only for an image with a zero side).
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// The only gradient `Tensor::f_run_backward` of one output with respect to one input gives.
fn only_gradient(output: &Tensor, input: &Tensor) -> Result<Tensor, Error> {
    Tensor::f_run_backward(&[output], &[input], false, false)?
        .pop()
        .ok_or_else(|| Error::Torch(tch::TchError::Torch("backward gave no gradient".into())))
}

impl Engine {
    /// The objective at `x` (preprocessed, `1 x 3 x H x W`) evaluated block by block, and its gradient with
    /// respect to `x`. Every block runs through the network up to the deepest style layer without gradients
    /// (pass 1), and once more for its content loss and its share of the gradient (pass 2).
    pub fn objective_blocked(
        &self,
        x: &Tensor,
        targets: &BlockedTargets,
        params: &RenderParams,
    ) -> Result<(LossTerms, Tensor), Error> {
        let (losses, grad) = self.evaluate_blocked(x, targets, params, true)?;
        Ok((losses, grad.unwrap_or_else(|| x.zeros_like())))
    }

    /// The objective at `x` evaluated block by block, without a gradient.
    pub fn losses_blocked(
        &self,
        x: &Tensor,
        targets: &BlockedTargets,
        params: &RenderParams,
    ) -> Result<LossTerms, Error> {
        tch::no_grad(|| Ok(self.evaluate_blocked(x, targets, params, false)?.0))
    }

    fn evaluate_blocked(
        &self,
        x: &Tensor,
        targets: &BlockedTargets,
        params: &RenderParams,
        gradient: bool,
    ) -> Result<(LossTerms, Option<Tensor>), Error> {
        let (width, height) = (x.size()[3] as u32, x.size()[2] as u32);
        let x = x.detach();
        // pass 1: the whole image's Gram matrices, the style loss and D = dL/dG per style layer
        let grams = grams(
            self,
            (width, height),
            |b| b.cut(&x),
            &targets.blocks,
            params,
            &params.style_layers,
        )?;
        let mut style = 0.0;
        let mut d_grams = Vec::with_capacity(grams.len());
        for ((g, _), a) in grams.iter().zip(&targets.style) {
            // style_loss is weight * mean((G - A)^2) over the C x C entries
            let entries = g.numel() as f64;
            let diff = g - a;
            style +=
                params.style_weight * diff.square().sum(Kind::Double).double_value(&[]) / entries;
            d_grams.push(diff * (2.0 * params.style_weight / entries));
        }
        // TV over the whole image (three channels: cheap)
        let (tv, mut grad) = if params.tv_weight > 0.0 {
            let xg = x.detach().set_requires_grad(true);
            let t = tv_loss(&xg, params.tv_weight);
            let g = gradient.then(|| only_gradient(&t, &xg)).transpose()?;
            (t.double_value(&[]), g)
        } else {
            (0.0, gradient.then(|| x.zeros_like()))
        };
        // pass 2: per block, its content loss + <D, F F^T> / (C N) at its own positions, back-propagated;
        // the gradients of the blocks' regions add up to the whole image's
        let mut layers: Vec<Layer> = params.content_layers.clone();
        if gradient {
            layers.extend(&params.style_layers);
        }
        // summed on the device and read once (a read is a device sync)
        let mut content = Tensor::zeros([], (Kind::Float, x.device()));
        for (b, parts) in targets.blocks.iter().zip(&targets.content) {
            if !gradient && parts.is_empty() {
                continue;
            }
            let xb = b.cut(&x).set_requires_grad(gradient);
            let features = self.vgg().features(&xb, params.pooling, &layers)?;
            let mut total = Tensor::zeros([], (Kind::Float, x.device()));
            for part in parts {
                let k = part.layer;
                // a content target has positions (BlockedTargets::new keeps only those)
                let Some(own) = b.own_features(&features[k], layers[k], width, height) else {
                    continue;
                };
                let term = (own - &part.target).square().sum(Kind::Float)
                    * (params.content_weight / targets.content_sizes[k]);
                content += term.detach();
                total += term;
            }
            let Some(grad) = grad.as_mut() else {
                continue;
            };
            let style_features = &features[params.content_layers.len()..];
            for (((f, layer), d), (_, norm)) in style_features
                .iter()
                .zip(&params.style_layers)
                .zip(&d_grams)
                .zip(&grams)
            {
                if let Some(own) = b.own_features(f, *layer, width, height) {
                    total += (d * own.matmul(&own.tr())).sum(Kind::Float) / *norm;
                }
            }
            if !total.requires_grad() {
                // no position of this block at any layer the objective reads (deep layers only, a sliver)
                continue;
            }
            let gb = only_gradient(&total, &xb)?;
            let [x0, x1, y0, y1] = b.region;
            let _ = grad
                .narrow(3, i64::from(x0), i64::from(x1 - x0))
                .narrow(2, i64::from(y0), i64::from(y1 - y0))
                .g_add_(&gb);
        }
        let content = content.double_value(&[]);
        let losses = LossTerms {
            content,
            style,
            tv,
            total: content + style + tv,
            temporal: 0.0,
        };
        Ok((losses, grad))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The pixels that style targets of a large canvas run through the network, as a multiple of the
    /// canvas': 512-px blocks with a quarter of halo on each side compute 256 px of their own each (4x);
    /// the target block of a 512-px tile (1024 px, 128 px of halo) computes 768 (under 2x).
    #[test]
    fn target_blocks_of_a_large_canvas_cost_under_twice_its_pixels() {
        let (w, h) = (8192u32, 6144u32);
        let through = |block: u32, halo: u32| {
            let px: u64 = blocks(w, h, block, halo)
                .iter()
                .map(|b| {
                    u64::from(b.region[1] - b.region[0]) * u64::from(b.region[3] - b.region[2])
                })
                .sum();
            px as f64 / (f64::from(w) * f64::from(h))
        };
        let before = through(512, 512 / 4);
        let block = target_block(512);
        let now = through(block, target_halo(block));
        assert_eq!((block, target_halo(block)), (1024, MAX_TARGET_HALO));
        assert!(before > 3.5 && now < 1.9, "{before:.2}x -> {now:.2}x");
        // small blocks keep a quarter of halo
        assert_eq!(target_halo(256), 64);
    }

    /// The blocks' own rectangles tile the image exactly, their regions stay inside it and within the
    /// block size, and at every depth their own feature positions add up to the whole feature map's.
    #[test]
    fn blocks_partition_the_image_and_every_feature_map() {
        for (w, h, block) in [
            (330, 250, 128),
            (97, 61, 64),
            (1000, 17, 256),
            (256, 256, 256),
        ] {
            let halo = objective_halo(block);
            let blocks = blocks(w, h, block, halo);
            let mut covered = vec![0u8; (w * h) as usize];
            for b in &blocks {
                let [x0, x1, y0, y1] = b.own;
                let [rx0, rx1, ry0, ry1] = b.region;
                assert!(rx0 <= x0 && x1 <= rx1 && ry0 <= y0 && y1 <= ry1 && rx1 <= w && ry1 <= h);
                assert!(rx0 % 16 == 0 && ry0 % 16 == 0, "{:?}", b.region);
                if block > 2 * halo {
                    assert!(rx1 - rx0 <= block && ry1 - ry0 <= block, "{:?}", b.region);
                }
                for y in y0..y1 {
                    for x in x0..x1 {
                        covered[(y * w + x) as usize] += 1;
                    }
                }
            }
            assert!(covered.iter().all(|&c| c == 1), "{w}x{h}/{block}");
            for depth in 1..=5u8 {
                let layer = Layer::new(depth, 1);
                let s = 1u32 << (depth - 1);
                let mut positions = 0;
                for b in &blocks {
                    let [rx0, rx1, ry0, ry1] = b.region;
                    let f = Tensor::zeros(
                        [1, 2, i64::from((ry1 - ry0) / s), i64::from((rx1 - rx0) / s)],
                        (Kind::Float, Device::Cpu),
                    );
                    positions += b
                        .own_features(&f, layer, w, h)
                        .map_or(0, |own| own.size()[1]);
                }
                assert_eq!(
                    positions,
                    i64::from(w / s) * i64::from(h / s),
                    "{w}x{h}/{block}, stride {s}"
                );
            }
        }
    }
}
