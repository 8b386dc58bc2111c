//! The terms of the objective, as free functions on feature maps (ALGORITHM.md, "Objective").

use tch::{Reduction, Tensor};

/// `G = F F^T / (C H W)` of a feature map `1 x C x H x W` (or `C x H x W`), with F reshaped to `C x (H W)`.
pub fn gram(features: &Tensor) -> Tensor {
    let size = features.size();
    let (c, hw) = match size.as_slice() {
        [1, c, h, w] | [c, h, w] => (*c, h * w),
        _ => panic!("gram: expected a C x H x W feature map, got {size:?}"),
    };
    let f = features.reshape([c, hw]);
    f.matmul(&f.tr()) / ((c * hw) as f64)
}

/// `weight * mean((F - P)^2)`.
pub fn content_loss(features: &Tensor, target: &Tensor, weight: f64) -> Tensor {
    features.mse_loss(target, Reduction::Mean) * weight
}

/// `weight * mean((G - A)^2)` over the `C x C` entries, `G` the Gram matrix of `features`.
pub fn style_loss(features: &Tensor, target_gram: &Tensor, weight: f64) -> Tensor {
    gram(features).mse_loss(target_gram, Reduction::Mean) * weight
}

/// `weight * 0.5 * (sum of squared horizontal differences + sum of squared vertical differences)` over all
/// channels of an image `... x H x W`.
pub fn tv_loss(image: &Tensor, weight: f64) -> Tensor {
    let w = image.size()[image.dim() - 1];
    let h = image.size()[image.dim() - 2];
    let dx = image.narrow(-1, 1, w - 1) - image.narrow(-1, 0, w - 1);
    let dy = image.narrow(-2, 1, h - 1) - image.narrow(-2, 0, h - 1);
    (dx.square().sum(image.kind()) + dy.square().sum(image.kind())) * (0.5 * weight)
}

/// `weight * mean(mask * ((x - target) / per_255)^2)` over the `1 x 3 x H x W` elements of an image, `mask`
/// (`1 x 1 x H x W`, 0 or 1) broadcast over the channels: the temporal loss of a video frame (Ruder et al.
/// 2016, artistic-videos' `WeightedContentLoss` on the image with MSE), `target` the previous frame's
/// result and `per_255` one 0..255 grey level in the image's units, so the weight means the same with either
/// weights' preprocessing.
pub fn temporal_loss(
    x: &Tensor,
    target: &Tensor,
    mask: &Tensor,
    weight: f64,
    per_255: f64,
) -> Tensor {
    ((x - target).square() * mask).mean(x.kind()) * (weight / (per_255 * per_255))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn f64s(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// Compares the autograd gradient of `f` at `x` with central finite differences, in double precision.
    fn check_gradient(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
        let x = x.to_kind(Kind::Double).set_requires_grad(true);
        let grad = Tensor::run_backward(&[f(&x)], &[&x], false, false)
            .pop()
            .unwrap();
        let (grad, x0) = (f64s(&grad), f64s(&x.detach()));
        let eps = 1e-6;
        for i in 0..x0.len() {
            let at = |delta: f64| {
                let mut v = x0.clone();
                v[i] += delta;
                let xi = Tensor::from_slice(&v).reshape(x.size());
                f(&xi).double_value(&[])
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            let tol = 1e-6 * (1.0 + numeric.abs());
            assert!(
                (numeric - grad[i]).abs() < tol,
                "element {i}: autograd {} vs numeric {numeric}",
                grad[i]
            );
        }
    }

    fn sample(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Double, Device::Cpu))
    }

    #[test]
    fn gram_matches_its_definition() {
        let f = sample(&[1, 3, 2, 2], 1);
        let g = f64s(&gram(&f));
        let v = f64s(&f);
        for a in 0..3 {
            for b in 0..3 {
                let dot: f64 = (0..4).map(|k| v[a * 4 + k] * v[b * 4 + k]).sum();
                assert!((g[a * 3 + b] - dot / 12.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn losses_match_their_definitions() {
        let (f, p) = (sample(&[1, 2, 3, 3], 2), sample(&[1, 2, 3, 3], 3));
        let (vf, vp) = (f64s(&f), f64s(&p));
        let mse: f64 = vf
            .iter()
            .zip(&vp)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            / 18.0;
        assert!((content_loss(&f, &p, 5.0).double_value(&[]) - 5.0 * mse).abs() < 1e-12);

        let x = Tensor::from_slice(&[1.0f64, 2.0, 4.0, 8.0]).reshape([1, 1, 2, 2]);
        // horizontal: (2-1)^2 + (8-4)^2 = 17; vertical: (4-1)^2 + (8-2)^2 = 45
        assert!((tv_loss(&x, 2.0).double_value(&[]) - 2.0 * 0.5 * 62.0).abs() < 1e-12);

        let a = gram(&p);
        let ga = f64s(&gram(&f));
        let va = f64s(&a);
        let mse: f64 = ga
            .iter()
            .zip(&va)
            .map(|(x, y)| (x - y).powi(2))
            .sum::<f64>()
            / 4.0;
        assert!((style_loss(&f, &a, 100.0).double_value(&[]) - 100.0 * mse).abs() < 1e-12);
    }

    #[test]
    fn content_loss_gradient() {
        let p = sample(&[1, 2, 3, 4], 4);
        check_gradient(&sample(&[1, 2, 3, 4], 5), |x| content_loss(x, &p, 5.0));
    }

    #[test]
    fn style_loss_gradient() {
        let a = gram(&sample(&[1, 3, 4, 3], 6));
        check_gradient(&sample(&[1, 3, 4, 3], 7), |x| style_loss(x, &a, 100.0));
    }

    #[test]
    fn tv_loss_gradient() {
        check_gradient(&sample(&[1, 3, 4, 5], 8), |x| tv_loss(x, 1e-3));
    }

    /// The temporal loss: its definition (masked pixels count as zeros in the mean over every element)
    /// and its gradient.
    #[test]
    fn temporal_loss_matches_its_definition_and_its_gradient() {
        let (x, target) = (sample(&[1, 3, 2, 3], 10), sample(&[1, 3, 2, 3], 11));
        let mask = Tensor::from_slice(&[1.0f64, 0.0, 1.0, 1.0, 0.0, 1.0]).reshape([1, 1, 2, 3]);
        let (xs, ts, ms) = (f64s(&x), f64s(&target), f64s(&mask));
        let sum: f64 = (0..18)
            .map(|i| ms[i % 6] * ((xs[i] - ts[i]) / 0.5).powi(2))
            .sum();
        let value = temporal_loss(&x, &target, &mask, 1e3, 0.5).double_value(&[]);
        assert!((value - 1e3 * sum / 18.0).abs() < 1e-9 * value, "{value}");
        check_gradient(&sample(&[1, 3, 2, 3], 12), |x| {
            temporal_loss(x, &target, &mask, 1e3, 0.5)
        });
    }

    #[test]
    fn gram_gradient() {
        check_gradient(&sample(&[1, 2, 3, 3], 9), |x| {
            gram(x).square().sum(Kind::Double)
        });
    }
}
