//! Dense optical flow between two video frames, for the temporal loss of Ruder et al. (2016), "Artistic
//! style transfer for videos", section 3: the previous frame's result is warped along the flow, and the
//! loss holds a frame only where the flow is reliable.
//!
//! The flow is Horn & Schunck's (1981): a brightness-constancy data term and a quadratic smoothness term
//! (weight [`SMOOTHNESS`]), solved by their Jacobi iteration, coarse to fine over an image pyramid with the
//! second frame warped by the current estimate at each level (the usual warping scheme, e.g. Brox et al.
//! 2004), so that motions of many pixels are found. Ruder et al. use DeepFlow; this is the classic method,
//! on the engine's device with plain tensor operations (no host reads). Reliability is Ruder et al.'s
//! forward-backward consistency check (their equations 3 and 4): a pixel is unreliable where the two flows
//! do not cancel (a disocclusion) or where the flow's gradient is large (a motion boundary).
//!
//! Images are `1 x C x H x W` floats in 0..1 on any device; flows are `1 x 2 x H x W`, in pixels, x (right)
//! then y (down). Nothing here copies from or to the host: on a GPU, the flow's kernels queue behind the
//! render's without waiting for them.

use tch::{Device, Kind, Tensor};

/// Horn & Schunck's smoothness weight alpha, for intensities in 0..1: larger gives smoother flow fields.
pub const SMOOTHNESS: f64 = 0.3;
/// Times the second frame is warped by the current estimate at each pyramid level.
const WARPS: usize = 3;
/// Jacobi iterations after each warp.
const ITERATIONS: usize = 40;
/// The pyramid halves the frames while the halved shorter side would be at least this many pixels.
const COARSEST_SIDE: i64 = 4;
/// The side, in px, of the window in which [`flow`] compares the moving and the zero flow.
pub const FUSION_WINDOW: i64 = 5;

/// `1 x 1 x 3 x 3` filter taps, made on `device` by its own kernels: a copy from the host would wait for
/// the device's queue to drain.
fn kernel(taps: [f32; 9], device: Device) -> Tensor {
    let k = Tensor::zeros([9], (Kind::Float, device));
    for (i, &t) in taps.iter().enumerate() {
        if t != 0.0 {
            let _ = k.narrow(0, i as i64, 1).fill_(f64::from(t));
        }
    }
    k.reshape([1, 1, 3, 3])
}

/// Each channel of `x` (`1 x C x H x W`) filtered by `k` (`1 x 1 x 3 x 3`), the border replicated.
fn filter(x: &Tensor, k: &Tensor) -> Tensor {
    let size = x.size();
    let (c, h, w) = (size[1], size[2], size[3]);
    x.reshape([c, 1, h, w])
        .replication_pad2d([1, 1, 1, 1])
        .conv2d(k, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
        .reshape([1, c, h, w])
}

/// Central differences in x and in y (`1 x C x H x W` each), the border replicated.
fn gradients(x: &Tensor) -> (Tensor, Tensor) {
    let device = x.device();
    let dx = kernel([0.0, 0.0, 0.0, -0.5, 0.0, 0.5, 0.0, 0.0, 0.0], device);
    let dy = kernel([0.0, -0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.0], device);
    (filter(x, &dx), filter(x, &dy))
}

/// The luminance (BT.601 weights) of a `1 x 3 x H x W` image, `1 x 1 x H x W`, lightly smoothed (a 3 x 3
/// binomial filter) so that its derivatives are stable.
fn grey(rgb: &Tensor) -> Tensor {
    let [r, g, b] = stylefarm_core::imaging::LUMA_WEIGHTS;
    let y = rgb.narrow(1, 0, 1) * r + rgb.narrow(1, 1, 1) * g + rgb.narrow(1, 2, 1) * b;
    let binomial = [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0].map(|t| t / 16.0);
    filter(&y, &kernel(binomial, rgb.device()))
}

/// `image` (`1 x C x H x W`) sampled at `p + flow(p)` for every pixel `p` (bilinear, the border extended:
/// `torch.nn.functional.grid_sample(align_corners=True, padding_mode="border")`). A side of 1 px samples
/// its one pixel.
pub fn warp(image: &Tensor, flow: &Tensor) -> Tensor {
    let size = image.size();
    let (h, w) = (size[2], size[3]);
    let opts = (Kind::Float, image.device());
    let xs = Tensor::arange(w, opts).reshape([1, 1, w]);
    let ys = Tensor::arange(h, opts).reshape([1, h, 1]);
    // align_corners: -1 and 1 are the centres of the first and last pixels (of a 1-px side, both are)
    let gx = (xs + flow.select(1, 0)) * (2.0 / (w - 1).max(1) as f64) - 1.0;
    let gy = (ys + flow.select(1, 1)) * (2.0 / (h - 1).max(1) as f64) - 1.0;
    let grid = Tensor::stack(&[gx, gy], -1).to_kind(image.kind());
    // interpolation 0: bilinear; padding 1: border
    image.grid_sampler_2d(&grid, 0, 1, true)
}

/// The flow `w` that carries `from` onto `to`: `from(p + w(p))` matches `to(p)`. Both `1 x 3 x H x W` in
/// 0..1, one size; the flow is zero where a side is under 2 pixels.
///
/// Horn & Schunck's flow is fused with the zero flow: each pixel keeps whichever of the two matches the
/// frames better in the [`FUSION_WINDOW`]-px window around it (zero on a tie). The quadratic smoothness
/// term spreads a moving object's flow over the still background around it, and through the coarse
/// levels over much of the frame; the fusion keeps a still background still.
pub fn flow(to: &Tensor, from: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let moving = horn_schunck(to, from);
        if moving.size()[2] < 2 || moving.size()[3] < 2 {
            return moving;
        }
        let still = window_difference(from, to);
        let keep = window_difference(&warp(from, &moving), to)
            .lt_tensor(&still)
            .to_kind(Kind::Float);
        moving * keep
    })
}

/// The mean absolute difference of `a` and `b` (`1 x C x H x W`) over channels and the
/// [`FUSION_WINDOW`]-px window around each pixel (`1 x 1 x H x W`).
fn window_difference(a: &Tensor, b: &Tensor) -> Tensor {
    (a - b)
        .abs()
        .mean_dim([1i64].as_slice(), true, Kind::Float)
        .avg_pool2d(
            [FUSION_WINDOW, FUSION_WINDOW],
            [1, 1],
            [FUSION_WINDOW / 2, FUSION_WINDOW / 2],
            false,
            false,
            None,
        )
}

/// `img` as the flow takes it: `1 x 3 x H x W` floats in 0..1 on `device`.
pub fn unit_image(img: &image::RgbImage, device: Device) -> Tensor {
    let (w, h) = img.dimensions();
    Tensor::from_slice(img.as_raw())
        .to_device(device)
        .reshape([1, i64::from(h), i64::from(w), 3])
        .permute([0, 3, 1, 2])
        .to_kind(Kind::Float)
        / 255.0
}

/// Horn & Schunck's flow alone (see [`flow`]).
fn horn_schunck(to: &Tensor, from: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let size = to.size();
        let (h, w) = (size[2], size[3]);
        let device = to.device();
        if h < 2 || w < 2 {
            return Tensor::zeros([1, 2, h, w], (Kind::Float, device));
        }
        // the pyramid, finest first
        let mut levels = vec![(grey(to), grey(from))];
        loop {
            let (h, w) = {
                let s = levels[levels.len() - 1].0.size();
                (s[2], s[3])
            };
            if h.min(w) / 2 < COARSEST_SIDE {
                break;
            }
            let half = [(h + 1) / 2, (w + 1) / 2];
            let (a, b) = &levels[levels.len() - 1];
            let next = (a.adaptive_avg_pool2d(half), b.adaptive_avg_pool2d(half));
            levels.push(next);
        }
        let average = kernel(
            [1.0, 2.0, 1.0, 2.0, 0.0, 2.0, 1.0, 2.0, 1.0].map(|t| t / 12.0),
            device,
        );
        let mut estimate: Option<Tensor> = None;
        for (to, from) in levels.iter().rev() {
            let size = to.size();
            let (h, w) = (size[2], size[3]);
            let mut w_flow = match estimate {
                None => Tensor::zeros([1, 2, h, w], (Kind::Float, device)),
                Some(coarse) => upsample(&coarse, h, w),
            };
            let (tx, ty) = gradients(to);
            for _ in 0..WARPS {
                let warped = warp(from, &w_flow);
                let (fx, fy) = gradients(&warped);
                let g = Tensor::cat(&[(&tx + fx) * 0.5, (&ty + fy) * 0.5], 1);
                let it = warped - to;
                let denom = g
                    .square()
                    .sum_dim_intlist([1i64].as_slice(), true, Kind::Float)
                    + SMOOTHNESS * SMOOTHNESS;
                let start = w_flow.shallow_clone();
                // Horn & Schunck's update, linearized around `start`:
                // w = avg(w) - g (g . (avg(w) - start) + It) / (alpha^2 + |g|^2)
                for _ in 0..ITERATIONS {
                    let avg = filter(&w_flow, &average);
                    let residual = (&g * (&avg - &start)).sum_dim_intlist(
                        [1i64].as_slice(),
                        true,
                        Kind::Float,
                    ) + &it;
                    w_flow = &avg - &g * (residual / &denom);
                }
            }
            estimate = Some(w_flow);
        }
        estimate.expect("the pyramid has at least one level")
    })
}

/// `flow` (`1 x 2 x h x w`) resampled to `h2 x w2`, its vectors scaled with the image (the pyramid's
/// levels are area averages: pixel edges, not centres, line up, as with `align_corners=False`).
fn upsample(flow: &Tensor, h2: i64, w2: i64) -> Tensor {
    let size = flow.size();
    let (h, w) = (size[2], size[3]);
    let up = flow.upsample_bilinear2d([h2, w2], false, None, None);
    Tensor::cat(
        &[
            up.narrow(1, 0, 1) * (w2 as f64 / w as f64),
            up.narrow(1, 1, 1) * (h2 as f64 / h as f64),
        ],
        1,
    )
}

/// Where the flow `backward` (from the current frame to the previous: `previous(p + backward(p))` matches
/// `current(p)`) is reliable, given the flow `forward` the other way: 1 or 0 per pixel, `1 x 1 x H x W`.
/// Unreliable are, as in Ruder et al. (2016), equations 3 and 4 (`w` backward, `w~` forward at
/// `p + w(p)`, in pixels): disocclusions, `|w~ + w|^2 > 0.01 (|w~|^2 + |w|^2) + 0.5`; motion boundaries,
/// `|grad u|^2 + |grad v|^2 > 0.01 |w|^2 + 0.002`; and pixels whose `p + w(p)` leaves the previous frame (by
/// more than half a pixel).
pub fn reliable(backward: &Tensor, forward: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let size = backward.size();
        let (h, w) = (size[2], size[3]);
        let sum_c = |t: Tensor| t.sum_dim_intlist([1i64].as_slice(), true, Kind::Float);
        let there = warp(forward, backward);
        let magnitudes = sum_c(there.square()) + sum_c(backward.square());
        let occluded = sum_c((&there + backward).square()).gt_tensor(&(&magnitudes * 0.01 + 0.5));
        let (gx, gy) = gradients(backward);
        let boundary = (sum_c(gx.square()) + sum_c(gy.square()))
            .gt_tensor(&(sum_c(backward.square()) * 0.01 + 0.002));
        let opts = (Kind::Float, backward.device());
        let x = Tensor::arange(w, opts).reshape([1, 1, 1, w]) + backward.narrow(1, 0, 1);
        let y = Tensor::arange(h, opts).reshape([1, 1, h, 1]) + backward.narrow(1, 1, 1);
        let outside = x
            .lt(-0.5)
            .logical_or(&x.gt(w as f64 - 0.5))
            .logical_or(&y.lt(-0.5))
            .logical_or(&y.gt(h as f64 - 0.5));
        occluded
            .logical_or(&boundary)
            .logical_or(&outside)
            .logical_not()
            .to_kind(Kind::Float)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A smooth texture, `1 x 3 x h x w` in 0..1: a coarse grid of hashed values (sin(...) * 43758.5453,
    /// its fraction: deterministic, where the tests share one random generator) upsampled bicubically,
    /// features about 4 px, not periodic, so that a flow can be followed.
    fn texture(h: i64, w: i64) -> Tensor {
        let opts = (Kind::Double, Device::Cpu);
        let (gh, gw) = (h / 4, w / 4);
        let x = Tensor::arange(gw, opts).reshape([1, 1, 1, gw]);
        let y = Tensor::arange(gh, opts).reshape([1, 1, gh, 1]);
        let c = Tensor::arange(3, opts).reshape([1, 3, 1, 1]);
        let hashed = ((x * 12.9898 + y * 78.233 + c * 37.719).sin() * 43758.5453)
            .frac()
            .abs();
        hashed
            .to_kind(Kind::Float)
            .upsample_bicubic2d([h, w], true, None, None)
            .clamp(0.0, 1.0)
    }

    /// The window of `big` at (`x`, `y`), `h x w`.
    fn crop(big: &Tensor, x: i64, y: i64, h: i64, w: i64) -> Tensor {
        big.narrow(2, y, h).narrow(3, x, w)
    }

    #[test]
    fn a_still_frame_has_zero_flow_and_is_reliable_everywhere() {
        let a = texture(48, 64);
        let f = flow(&a, &a);
        assert!(f.abs().max().double_value(&[]) < 1e-4);
        assert_eq!(reliable(&f, &f).min().double_value(&[]), 1.0);
        assert!(warp(&a, &f).allclose(&a, 1e-4, 1e-4, false));
    }

    #[test]
    fn frames_of_a_few_pixels_have_a_flow_of_their_size() {
        for (h, w) in [(1, 1), (1, 5), (5, 1), (2, 2), (3, 7), (7, 3), (9, 4)] {
            let (a, b) = (texture(16, 16), texture(20, 20));
            let (a, b) = (crop(&a, 0, 0, h, w), crop(&b, 1, 2, h, w));
            let f = flow(&a, &b);
            assert_eq!(f.size(), [1, 2, h, w]);
            assert_eq!(f.isfinite().all().int64_value(&[]), 1, "{h} x {w}");
            let r = reliable(&f, &flow(&b, &a));
            assert_eq!(r.size(), [1, 1, h, w]);
            let warped = warp(&b, &f);
            assert_eq!(warped.isfinite().all().int64_value(&[]), 1, "{h} x {w}");
        }
        // a 1-px side samples its one pixel
        let column = texture(16, 16).narrow(3, 0, 1);
        let f = Tensor::ones([1, 2, 16, 1], (Kind::Float, Device::Cpu)) * 0.25;
        let expected =
            (column.narrow(2, 0, 15) * 0.75 + column.narrow(2, 1, 15) * 0.25).narrow(2, 0, 15);
        assert!(warp(&column, &f)
            .narrow(2, 0, 15)
            .allclose(&expected, 1e-5, 1e-6, false));
    }

    #[test]
    fn a_pan_is_found_and_warps_the_previous_frame_onto_the_current() {
        // the camera moves 5 px right and 3 px down: current(p) = previous(p + (5, 3))
        let big = texture(160, 192);
        let (h, w) = (96, 128);
        let previous = crop(&big, 20, 20, h, w);
        let current = crop(&big, 25, 23, h, w);
        let backward = flow(&current, &previous);
        let forward = flow(&previous, &current);
        // inside, away from the strip that enters the frame
        let inner = |t: &Tensor| t.narrow(2, 8, h - 16).narrow(3, 8, w - 16);
        let u = inner(&backward.narrow(1, 0, 1)).median().double_value(&[]);
        let v = inner(&backward.narrow(1, 1, 1)).median().double_value(&[]);
        assert!(
            (u - 5.0).abs() < 0.2 && (v - 3.0).abs() < 0.2,
            "flow ({u}, {v})"
        );
        let error = (inner(&backward) - Tensor::from_slice(&[5.0f32, 3.0]).reshape([1, 2, 1, 1]))
            .square()
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
            .sqrt()
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(error < 0.3, "mean endpoint error {error} px");
        let warped = warp(&previous, &backward);
        let off = inner(&(warped - &current).abs())
            .mean(Kind::Float)
            .double_value(&[]);
        let unwarped = inner(&(&previous - &current).abs())
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(off < 0.1 * unwarped, "warped {off} vs not {unwarped}");
        // reliable inside; not where p + w(p) leaves the previous frame (the last 5 columns, 3 rows)
        let ok = reliable(&backward, &forward);
        let inside = inner(&ok).mean(Kind::Float).double_value(&[]);
        assert!(inside > 0.95, "reliable inside: {inside}");
        // (near the border the flow is short of the pan: a few pixels there still land inside)
        let right = ok.narrow(3, w - 4, 4).mean(Kind::Float).double_value(&[]);
        let bottom = ok.narrow(2, h - 2, 2).mean(Kind::Float).double_value(&[]);
        assert!(
            right < 0.1 && bottom < 0.1,
            "reliable where entering: {right}, {bottom}"
        );
    }

    #[test]
    fn a_moving_square_leaves_its_disocclusion_unreliable() {
        // a flat square moves 6 px right over the texture: the background it uncovers has no previous
        let background = texture(64, 64);
        let with_square = |x: i64| {
            let img = background.copy();
            let _ = img.narrow(2, 24, 16).narrow(3, x, 16).fill_(0.9);
            img
        };
        let (previous, current) = (with_square(16), with_square(22));
        let backward = flow(&current, &previous);
        let forward = flow(&previous, &current);
        let ok = reliable(&backward, &forward);
        // the uncovered strip: x 16..22 of the square's rows
        let uncovered = ok
            .narrow(2, 27, 10)
            .narrow(3, 17, 4)
            .mean(Kind::Float)
            .double_value(&[]);
        assert!(uncovered < 0.5, "reliable where uncovered: {uncovered}");
        // far from the square (the quadratic smoothness term spreads its motion about 10 px around
        // it, where the motion-boundary check leaves it unreliable), still and reliable
        for rows in [ok.narrow(2, 0, 8), ok.narrow(2, 56, 8)] {
            let still = rows.mean(Kind::Float).double_value(&[]);
            assert!(still > 0.95, "reliable far from the square: {still}");
        }
        // the square's inside moved left with it; a flat square's flow comes from its edges (Horn &
        // Schunck's smoothness fills it in, the textured background holds it back), short of 6 px
        let u = backward
            .narrow(1, 0, 1)
            .narrow(2, 28, 8)
            .narrow(3, 26, 8)
            .median()
            .double_value(&[]);
        assert!((-7.0..-1.5).contains(&u), "the square's flow {u}");
    }
}
