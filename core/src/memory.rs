//! How much device memory a render needs: the estimate the tiled planner sizes each scale's tiles by
//! ([`crate::tiling::Tiling::scale_tile_size`]), from the memory workers report when they register.
//!
//! The estimate is linear in the pixels being optimized: VGG19's activations up to relu5_1 kept for the
//! backward pass, plus the optimizer's state (L-BFGS: `history_size` pairs of image-sized vectors, or as many
//! as its iterations make; Adam: two moments), plus a fixed part (weights, CUDA context, cuDNN workspaces).
//! Measured peaks it is made to cover (BENCHMARKS.md): a one-pass 2048 x 1536 render on the CPU, 7.2 GiB
//! resident (2.4 KB a pixel, history negligible at 3 iterations); a one-pass 4096 x 3072 render on an H200
//! with L-BFGS's history of 100, 50 GB in use (4.0 KB a pixel, 2.4 KB of it the history). Normalized
//! gradients ([`RenderParams::normalize_gradients`]) measured no higher peak on the CPU (BENCHMARKS.md; not
//! measured on a GPU), and are not counted.

use crate::params::{Optimizer, RenderParams};

/// Bytes per optimized pixel for the network's activations and the backward's transients (the CPU's
/// measured 2.4 KB rounded up).
pub const ACTIVATION_BYTES_PER_PX: u64 = 2_500;

/// Bytes per pixel of a style image for its style targets (Gram matrices), and of an image whose objective
/// is evaluated (`render --evaluate`): VGG19's forward pass without the backward's activations, one image
/// at a time. Measured on the CPU, peak resident memory: `render --size 256` and `384 --style-scale 8`,
/// the style at 2048 x 1280 and 3072 x 1920, 0.70 and 0.69 KB a pixel over a plain render's; `render
/// --evaluate` of a 1024 x 768 and a 2048 x 1536 image, 0.73 KB a pixel between them. Rounded up.
pub const STYLE_TARGET_BYTES_PER_PX: u64 = 750;

/// Bytes per pixel of an image-sized float vector (3 channels of f32).
const IMAGE_BYTES_PER_PX: u64 = 12;

/// Memory a worker needs besides the optimization's: the weights (80 MB), CUDA's context and cuDNN's
/// workspaces, the process.
pub const FIXED_BYTES: u64 = 2 << 30;

/// The share of a device's memory the planner fills, the rest left to the allocator's fragmentation.
pub const USABLE_FRACTION: f64 = 0.85;

/// Bytes per optimized pixel of the optimizer's state: the image, its gradient and the search direction,
/// plus L-BFGS's (s, y) pairs or Adam's two moments, plus with iterate averaging
/// ([`RenderParams::avg_decay`]) the average's sum and a copy of the average (a snapshot's, the scale's
/// result). L-BFGS holds `history_size` pairs, or fewer where its scale's iterations make fewer (one a
/// step after the first): the largest scale's, the last; and one more, the row where a pair it does not
/// take is written (its choice is the device's).
pub fn optimizer_bytes_per_px(params: &RenderParams) -> u64 {
    let averaging = if params.avg_decay > 0.0 { 2 } else { 0 };
    let vectors = 4
        + averaging
        + match params.optimizer {
            Optimizer::Lbfgs => {
                let last = params.iterations_per_scale().last().copied().unwrap_or(1);
                2 * (u64::from(params.history_size.min(last.saturating_sub(1)).max(1)) + 1)
            }
            Optimizer::Adam => 2,
        };
    vectors.saturating_mul(IMAGE_BYTES_PER_PX)
}

/// Estimated peak bytes of optimizing a `width` x `height` image with `params`, the fixed part excluded.
pub fn render_bytes(width: u32, height: u32, params: &RenderParams) -> u64 {
    let px = u64::from(width) * u64::from(height);
    // saturating: an estimate past any device is "does not fit", whatever the parameters
    px.saturating_mul(ACTIVATION_BYTES_PER_PX.saturating_add(optimizer_bytes_per_px(params)))
}

/// Estimated peak bytes of optimizing a `width` x `height` canvas whose objective is evaluated in blocks
/// of at most `block` px a side (exact mode): the optimizer's state is the canvas', the activations a
/// block's.
pub fn blocked_render_bytes(width: u32, height: u32, block: u32, params: &RenderParams) -> u64 {
    let px = u64::from(width) * u64::from(height);
    let block_px = u64::from(block.min(width)) * u64::from(block.min(height));
    px.saturating_mul(optimizer_bytes_per_px(params))
        .saturating_add(block_px * ACTIVATION_BYTES_PER_PX)
}

/// Estimated peak bytes of the style targets of one `width` x `height` style image (its size at the
/// style side), computed whole.
pub fn style_targets_bytes(width: u32, height: u32) -> u64 {
    (u64::from(width) * u64::from(height)).saturating_mul(STYLE_TARGET_BYTES_PER_PX)
}

/// Bytes per pixel of an image evaluated in blocks (`render --evaluate --block`) held whole beside a
/// block's forward pass: the image, its content and the content targets of the whole canvas. Measured on
/// the CPU, peak resident memory of `render --evaluate` with `--block 256` of a 2048 x 1536 and a
/// 3072 x 2304 image: 0.71 and 1.30 GB, 155 bytes a pixel between them. Rounded up.
pub const EVALUATED_IMAGE_BYTES_PER_PX: u64 = 160;

/// Estimated peak bytes of evaluating the objective of a `width` x `height` image in blocks of at most
/// `block` px a side: a block's forward pass ([`style_targets_bytes`]) beside the whole image's tensors
/// ([`EVALUATED_IMAGE_BYTES_PER_PX`]).
pub fn blocked_evaluate_bytes(width: u32, height: u32, block: u32) -> u64 {
    let px = u64::from(width) * u64::from(height);
    style_targets_bytes(block.min(width), block.min(height))
        .saturating_add(px.saturating_mul(EVALUATED_IMAGE_BYTES_PER_PX))
}

/// The bytes of a device of `total` bytes that the planner lets one render use.
pub fn usable_bytes(total: u64) -> u64 {
    (total.saturating_sub(FIXED_BYTES) as f64 * USABLE_FRACTION) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_covers_the_measured_peaks() {
        // `render --evaluate --block 256`: 2048 x 1536 and 3072 x 2304 took 725.6 and 1,335.8 MB of
        // resident memory (the process' own beside them in both)
        let grown =
            blocked_evaluate_bytes(3072, 2304, 256) - blocked_evaluate_bytes(2048, 1536, 256);
        assert!(grown >= 1_335_800_000 - 725_600_000, "{grown}");
        let lbfgs = RenderParams::default();
        assert_eq!(lbfgs.history_size, 100);
        // the CPU's one pass at 2048 x 1536 (7.2 GiB, 3 iterations: a history of 2)
        let short = RenderParams {
            history_size: 2,
            ..lbfgs.clone()
        };
        let cpu = render_bytes(2048, 1536, &short) + FIXED_BYTES;
        assert!(cpu >= 7_200 << 20, "{cpu}");
        // the H200's one pass at 4096 x 3072 with a history of 100 (50 GB)
        let gpu = render_bytes(4096, 3072, &lbfgs) + FIXED_BYTES;
        assert!(gpu >= 50_000_000_000, "{gpu}");
        // and within 1.5x of them: the planner does not waste the device
        assert!(
            cpu < (7_200 << 20) * 3 / 2 && gpu < 75_000_000_000,
            "{cpu} {gpu}"
        );
    }

    #[test]
    fn adam_needs_less_than_a_long_history_and_blocks_bound_the_activations() {
        let lbfgs = RenderParams::default();
        let adam = RenderParams {
            optimizer: Optimizer::Adam,
            ..lbfgs.clone()
        };
        assert!(render_bytes(1024, 1024, &adam) < render_bytes(1024, 1024, &lbfgs));
        // iterate averaging: its sum and a copy of the average
        let averaged = RenderParams {
            avg_decay: 0.99,
            ..adam.clone()
        };
        assert_eq!(
            optimizer_bytes_per_px(&averaged) - optimizer_bytes_per_px(&adam),
            2 * IMAGE_BYTES_PER_PX
        );
        assert!(
            blocked_render_bytes(4096, 4096, 512, &adam) < render_bytes(4096, 4096, &adam) / 10
        );
        assert_eq!(
            blocked_render_bytes(300, 200, 512, &adam),
            render_bytes(300, 200, &adam)
        );
        assert_eq!(usable_bytes(1 << 30), 0);
    }

    /// L-BFGS's history holds no more pairs than its last scale's iterations make (one a step after the
    /// first), and a spare pair, as the engine allocates it.
    #[test]
    fn a_short_scale_s_history_counts_only_the_pairs_it_makes() {
        let long = RenderParams::default();
        let short = RenderParams {
            iterations: 31,
            ..long.clone()
        };
        let history = |p: &RenderParams| optimizer_bytes_per_px(p) / IMAGE_BYTES_PER_PX - 4;
        assert_eq!(history(&long), 2 * 101);
        assert_eq!(history(&short), 2 * 31);
        // a pyramid's last scale: 500 >> 3 = 62 iterations, 61 pairs
        let pyramid = RenderParams {
            scales: 4,
            ..long.clone()
        };
        assert_eq!(history(&pyramid), 2 * 62);
        let one = RenderParams {
            iterations: 1,
            ..long
        };
        assert_eq!(history(&one), 2 * 2);
    }
}
