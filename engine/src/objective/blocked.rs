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
use stylefarm_core::tiling::{block_step, objective_halo, BLOCK_ALIGN as ALIGN};
use stylefarm_core::{Layer, RenderParams};
use tch::{Kind, Tensor};

use super::{only_gradient, LossTerms, StyleGrams};
use crate::engine::Engine;
use crate::shard::{Shard, SharedExchange};
use crate::Error;

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

    /// The block's region of `x` (`1 x 3 x h x W`), whose first row is the canvas' row `row0`.
    fn cut(&self, x: &Tensor, row0: u32) -> Tensor {
        let [x0, x1, y0, y1] = self.region;
        x.narrow(3, i64::from(x0), i64::from(x1 - x0)).narrow(
            2,
            i64::from(y0 - row0),
            i64::from(y1 - y0),
        )
    }
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
    let own = block_step(block, halo);
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

/// Sums `F F^T` of the blocks' own positions over all blocks, for each of `layers` (`C x C`; `None` at a
/// layer where no block has a position): the Gram matrices of the whole `width` x `height` image times
/// `C * positions`. `region(block)` gives a block's region, preprocessed (`1 x 3 x h x w`); no gradient.
pub(crate) fn gram_sums(
    engine: &Engine,
    (width, height): (u32, u32),
    region: impl Fn(&Block) -> Tensor,
    blocks: &[Block],
    params: &RenderParams,
    layers: &[Layer],
) -> Result<Vec<Option<Tensor>>, Error> {
    tch::no_grad(|| {
        let mut sums: Vec<Option<Tensor>> = layers.iter().map(|_| None).collect();
        for b in blocks {
            crate::cancel::check()?;
            let features = engine.vgg().features(&region(b), params.pooling, layers)?;
            for (k, (layer, f)) in layers.iter().zip(features).enumerate() {
                if let Some(part) = b.own_features(&f, *layer, width, height) {
                    let outer = part.matmul(&part.tr());
                    sums[k] = Some(match sums[k].take() {
                        Some(s) => s + outer,
                        None => outer,
                    });
                }
            }
        }
        Ok(sums)
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
    gram_sums(
        engine,
        (w, h),
        region,
        &blocks,
        params,
        &params.style_layers,
    )?
    .into_iter()
    .zip(&params.style_layers)
    .map(|(s, layer)| {
        let s = s.ok_or_else(|| no_position(w, h, *layer))?;
        let n = s.size()[0] as f64 * positions(*layer, (w, h));
        Ok(s / n)
    })
    .collect()
}

/// The error for an image too small to have a position at `layer`.
fn no_position(width: u32, height: u32, layer: Layer) -> Error {
    Error::Input(format!(
        "a {width} x {height} px image has no position at {layer}"
    ))
}

/// The positions of a `width` x `height` image's feature map at `layer` (VGG19's pooling floors each
/// side): what the blocks' own positions add up to.
fn positions(layer: Layer, (width, height): (u32, u32)) -> f64 {
    let shift = layer.block - 1;
    f64::from(width >> shift) * f64::from(height >> shift)
}

/// A content target of one block: the index of its layer in `params.content_layers` and the feature map
/// at the block's own positions (`C x n`).
struct ContentPart {
    layer: usize,
    target: Tensor,
}

/// The part of the canvas a blocked evaluation covers: the whole canvas, or one shard's rows
/// ([`crate::shard`]) and how it adds up with the other shards.
struct Part {
    /// The canvas' width and height.
    canvas: (u32, u32),
    /// The canvas rows `[y0, y1)` whose positions (and total-variation pairs) this part owns.
    rows: (u32, u32),
    /// The canvas row of the evaluated image's first row.
    row0: u32,
    /// The objective's halo: how far a block's gradient reaches past its own rows.
    halo: u32,
    /// A shard's exchange; `None` for the whole canvas.
    exchange: Option<SharedExchange>,
}

impl Part {
    /// The sums over the shards of `parts` (the parts themselves for the whole canvas).
    fn sum(&self, parts: Vec<(u64, Tensor)>) -> Result<Vec<Tensor>, Error> {
        match &self.exchange {
            None => Ok(parts.into_iter().map(|(_, t)| t).collect()),
            Some(ex) => ex
                .lock()
                .map_err(|_| Error::Exchange("a shard's exchange failed before".into()))?
                .sum(parts),
        }
    }

    /// The rows this part shares with a neighbouring shard, in the evaluated image's rows, each under the
    /// key of the band boundary it straddles (its canvas row + 1; key 0 is for the sums every shard gives).
    fn shared_rows(&self) -> Vec<(u64, i64, i64)> {
        let height = self.canvas.1;
        let (top, bottom) = self.rows;
        [top, bottom]
            .into_iter()
            .filter(|&b| b > 0 && b < height)
            .map(|b| {
                let (a, z) = (b.saturating_sub(self.halo), (b + self.halo).min(height));
                (u64::from(b) + 1, i64::from(a - self.row0), i64::from(z - a))
            })
            .collect()
    }
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
    part: Part,
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
        let part = Part {
            canvas: (width, height),
            rows: (0, height),
            row0: 0,
            halo: objective_halo(block),
            exchange: None,
        };
        Self::of_part(engine, content, style, params, block, part)
    }

    /// Targets for one shard of a canvas: `content` (`1 x 3 x h x W`, preprocessed) is the canvas' rows
    /// [`Shard::region`], and the shard evaluates its own blocks, adding up with the other shards through
    /// its exchange. An error names `shard` for rows that are not a band of the canvas or not whole rows
    /// of blocks.
    pub fn shard(
        engine: &Engine,
        content: &Tensor,
        style: &StyleGrams,
        params: &RenderParams,
        block: u32,
        shard: &Shard,
    ) -> Result<BlockedTargets, Error> {
        shard.check()?;
        let (row0, row1) = shard.region(block);
        let (w, h) = (content.size()[3] as u32, content.size()[2] as u32);
        if (w, h) != (shard.canvas.0, row1 - row0) {
            return Err(Error::Input(format!(
                "a shard's content is {w} x {h} px, its region of the {} x {} canvas {} x {}",
                shard.canvas.0,
                shard.canvas.1,
                shard.canvas.0,
                row1 - row0
            )));
        }
        let part = Part {
            canvas: shard.canvas,
            rows: shard.rows,
            row0,
            halo: objective_halo(block),
            exchange: Some(shard.exchange.clone()),
        };
        Self::of_part(engine, content, style, params, block, part)
    }

    fn of_part(
        engine: &Engine,
        content: &Tensor,
        style: &StyleGrams,
        params: &RenderParams,
        block: u32,
        part: Part,
    ) -> Result<BlockedTargets, Error> {
        let (width, height) = part.canvas;
        let (top, bottom) = part.rows;
        let blocks: Vec<Block> = blocks(width, height, block, part.halo)
            .into_iter()
            .filter(|b| (top..bottom).contains(&b.own[2]))
            .collect();
        if blocks.first().map(|b| b.own[2]) != Some(top)
            || blocks.last().map(|b| b.own[3]) != Some(bottom)
        {
            return Err(Error::Core(stylefarm_core::Error::invalid(
                "shard",
                format!(
                    "rows {top}..{bottom} of a {width} x {height} canvas are not whole rows of \
                     {block}-px blocks"
                ),
            )));
        }
        let mut content_sizes = vec![0.0; params.content_layers.len()];
        let parts = tch::no_grad(|| {
            blocks
                .iter()
                .map(|b| {
                    crate::cancel::check()?;
                    let features = engine.vgg().features(
                        &b.cut(content, part.row0),
                        params.pooling,
                        &params.content_layers,
                    )?;
                    Ok(params
                        .content_layers
                        .iter()
                        .zip(features)
                        .enumerate()
                        .filter_map(|(k, (layer, f))| {
                            content_sizes[k] = f.size()[1] as f64 * positions(*layer, part.canvas);
                            let own = b.own_features(&f, *layer, width, height)?;
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
            part,
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

/// The total-variation loss of the pairs of neighbouring pixels whose first pixel is in the canvas rows
/// `rows` (horizontal pairs on those rows, vertical pairs down from them), `x` holding the canvas' rows
/// from `row0` on: [`crate::loss::tv_loss`] of the whole image when `rows` are all of its rows.
fn tv_of_rows(x: &Tensor, row0: u32, rows: (u32, u32), height: u32, weight: f64) -> Tensor {
    let w = x.size()[3];
    let first = i64::from(rows.0 - row0);
    let own = x.narrow(2, first, i64::from(rows.1 - rows.0));
    let down = x.narrow(2, first, i64::from(rows.1.min(height - 1) + 1 - rows.0));
    let h = down.size()[2];
    let dx = own.narrow(3, 1, w - 1) - own.narrow(3, 0, w - 1);
    let dy = down.narrow(2, 1, h - 1) - down.narrow(2, 0, h - 1);
    (dx.square().sum(x.kind()) + dy.square().sum(x.kind())) * (0.5 * weight)
}

impl Engine {
    /// The objective at `x` (preprocessed, `1 x 3 x H x W`) evaluated block by block, and its gradient with
    /// respect to `x`. Every block runs through the network up to the deepest style layer without gradients
    /// (pass 1), and once more for its content loss and its share of the gradient (pass 2). For a shard's
    /// targets ([`BlockedTargets::shard`]), `x` is the shard's region and the losses and gradient are the
    /// whole canvas' there.
    pub fn objective_blocked(
        &self,
        x: &Tensor,
        targets: &BlockedTargets,
        params: &RenderParams,
    ) -> Result<(LossTerms, Tensor), Error> {
        let (terms, grad) = self.objective_blocked_on_device(x, targets, params)?;
        Ok((crate::objective::read_terms(&terms)?, grad))
    }

    /// [`Engine::objective_blocked`] with its terms `[content, style, tv, total, temporal]` (a float64
    /// tensor of [`LossTerms::LEN`]) left on the device: nothing is read back but what a shard's exchange
    /// sends.
    pub(crate) fn objective_blocked_on_device(
        &self,
        x: &Tensor,
        targets: &BlockedTargets,
        params: &RenderParams,
    ) -> Result<(Tensor, Tensor), Error> {
        let (terms, grad) = self.evaluate_blocked(x, targets, params, true)?;
        Ok((terms, grad.unwrap_or_else(|| x.zeros_like())))
    }

    /// The objective at `x` evaluated block by block, without a gradient.
    pub fn losses_blocked(
        &self,
        x: &Tensor,
        targets: &BlockedTargets,
        params: &RenderParams,
    ) -> Result<LossTerms, Error> {
        tch::no_grad(|| {
            crate::objective::read_terms(&self.evaluate_blocked(x, targets, params, false)?.0)
        })
    }

    fn evaluate_blocked(
        &self,
        x: &Tensor,
        targets: &BlockedTargets,
        params: &RenderParams,
        gradient: bool,
    ) -> Result<(Tensor, Option<Tensor>), Error> {
        let part = &targets.part;
        let (width, height) = part.canvas;
        let row0 = part.row0;
        let x = x.detach();
        // pass 1: the whole image's Gram matrices (the shards' sums added up), the style loss and D = dL/dG
        // per style layer
        let sums = gram_sums(
            self,
            part.canvas,
            |b| b.cut(&x, row0),
            &targets.blocks,
            params,
            &params.style_layers,
        )?;
        let sums = sums
            .into_iter()
            .zip(&params.style_layers)
            .map(|(s, layer)| s.ok_or_else(|| no_position(width, height, *layer)))
            .collect::<Result<Vec<_>, _>>()?;
        let sizes: Vec<i64> = sums.iter().map(|s| s.size()[0]).collect();
        let flat = Tensor::f_cat(
            &sums.iter().map(|s| s.flatten(0, -1)).collect::<Vec<_>>(),
            0,
        )?;
        let flat = part.sum(vec![(0, flat)])?.remove(0);
        // summed on the device in float64 and read with the other terms, once: a read is a device sync
        let mut style = Tensor::f_zeros([], (Kind::Double, x.device()))?;
        let mut d_grams = Vec::with_capacity(sums.len());
        let mut norms = Vec::with_capacity(sums.len());
        let mut at = 0;
        let layers = sizes.iter().zip(&targets.style).zip(&params.style_layers);
        for (((&c, a), layer), w) in layers.zip(params.layer_weights()) {
            let norm = c as f64 * positions(*layer, part.canvas);
            let g = flat.narrow(0, at, c * c).reshape([c, c]) / norm;
            at += c * c;
            // style_loss is weight * mean((G - A)^2) over the C x C entries
            let entries = g.numel() as f64;
            let diff = g - a;
            let weight = params.style_weight * w;
            style += diff.square().sum(Kind::Double) * (weight / entries);
            d_grams.push(diff * (2.0 * weight / entries));
            norms.push(norm);
        }
        // TV of the part's rows (three channels: cheap)
        let (tv, mut grad) = if params.tv_weight > 0.0 {
            let xg = x.detach().set_requires_grad(true);
            let t = tv_of_rows(&xg, row0, part.rows, height, params.tv_weight);
            let g = gradient
                .then(|| only_gradient(&t, &xg, false))
                .transpose()?;
            (t.detach(), g)
        } else {
            (
                Tensor::zeros([], (Kind::Float, x.device())),
                gradient.then(|| x.zeros_like()),
            )
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
            // a large canvas' evaluation takes minutes on a CPU: a cancel ends it between blocks
            crate::cancel::check()?;
            let xb = b.cut(&x, row0).set_requires_grad(gradient);
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
            for (((f, layer), d), norm) in style_features
                .iter()
                .zip(&params.style_layers)
                .zip(&d_grams)
                .zip(&norms)
            {
                if let Some(own) = b.own_features(f, *layer, width, height) {
                    total += (d * own.matmul(&own.tr())).sum(Kind::Float) / *norm;
                }
            }
            if !total.requires_grad() {
                // no position of this block at any layer the objective reads (deep layers only, a sliver)
                continue;
            }
            let gb = only_gradient(&total, &xb, false)?;
            let [x0, x1, y0, y1] = b.region;
            let _ = grad
                .narrow(3, i64::from(x0), i64::from(x1 - x0))
                .narrow(2, i64::from(y0 - row0), i64::from(y1 - y0))
                .g_add_(&gb);
        }
        // the content and TV losses of every shard, and the gradient of the rows shared with a
        // neighbouring shard, added up
        let mut parts = vec![(0, Tensor::stack(&[content, tv.to_kind(Kind::Float)], 0))];
        let shared = match &grad {
            Some(_) => part.shared_rows(),
            None => Vec::new(),
        };
        if let Some(g) = &grad {
            for &(key, first, rows) in &shared {
                parts.push((key, g.narrow(2, first, rows).copy()));
            }
        }
        let mut sums = part.sum(parts)?.into_iter();
        let terms = sums
            .next()
            .ok_or_else(|| Error::Exchange("no sum of the losses".into()))?;
        if let Some(g) = grad.as_mut() {
            for ((_, first, rows), sum) in shared.iter().zip(sums) {
                g.narrow(2, *first, *rows).copy_(&sum);
            }
        }
        let (content, tv) = (
            terms.get(0).to_kind(Kind::Double),
            terms.get(1).to_kind(Kind::Double),
        );
        let total = &content + &style + &tv;
        let temporal = content.zeros_like();
        Ok((
            Tensor::f_stack(&[content, style, tv, total, temporal], 0)?,
            grad,
        ))
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
