//! jcjohnson/neural-style's normalized gradients (`normalize_gradients`) against their definition, on the
//! real engine and weights: the gradient is, over the content and style layers, `weight / (|g|_1 + 1e-8)`
//! times that layer's own plain gradient, `g` the gradient of the layer's unweighted loss with respect to its
//! feature map (written out here by hand: the mean squared error's and the Gram matrix's), plus the total
//! variation's plain gradient.

use image::imageops::{resize, FilterType};
use stylefarm_core::{imaging, Layer, RenderParams};
use stylefarm_engine::loss::gram;
use stylefarm_engine::{Device, Engine};
use stylefarm_tests::{shared_image, weights};
use tch::{Kind, Tensor};

/// Side at which the style's Gram matrices are taken, the same in every objective below.
const STYLE_SIDE: u32 = 64;

fn l1(t: &Tensor) -> f64 {
    t.abs().sum(Kind::Double).double_value(&[])
}

#[test]
fn normalized_gradients_weigh_each_layer_by_the_l1_norm_of_its_own() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let load = |name: &str| {
        let img = imaging::load(&shared_image(name)).unwrap();
        resize(&img, 64, 48, FilterType::Triangle)
    };
    let (content, style) = (load("tubingen.jpg"), load("starry_night.jpg"));
    let pre = engine.vgg().preprocessing();
    let x = pre.preprocess(&load("shipwreck.jpg"), Device::Cpu);
    // uneven layer weights, a zero among them (that layer pulls with nothing)
    let params = RenderParams {
        size: 64,
        content_weight: 5.0,
        style_weight: 100.0,
        tv_weight: 0.01,
        style_layer_weights: vec![3.0, 0.5, 2.0, 0.0, 1.5],
        ..RenderParams::default()
    };
    let objective = |p: &RenderParams| {
        let grams = engine
            .style_grams(std::slice::from_ref(&style), STYLE_SIDE, p, None)
            .unwrap();
        let targets = engine.targets_with(&content, &grams, p).unwrap();
        engine.objective(&x, &targets, p).unwrap()
    };
    let features = |img: &Tensor, layer: Layer| {
        tch::no_grad(|| engine.vgg().features(img, params.pooling, &[layer]))
            .unwrap()
            .remove(0)
    };
    // the plain gradient of one term alone, unweighted
    let alone = |content_weight, style_layers: Vec<Layer>, tv_weight| RenderParams {
        content_weight,
        style_weight: if style_layers.is_empty() { 0.0 } else { 1.0 },
        style_layers: if style_layers.is_empty() {
            params.style_layers.clone()
        } else {
            style_layers
        },
        style_layer_weights: Vec::new(),
        tv_weight,
        ..params.clone()
    };
    let (_, mut expected) = objective(&alone(0.0, Vec::new(), params.tv_weight));
    for &layer in &params.content_layers {
        // mean((F - P)^2): g = 2 (F - P) / n
        let f = features(&x, layer);
        let p = features(&pre.preprocess(&content, Device::Cpu), layer);
        let norm = 2.0 * l1(&(&f - &p)) / f.numel() as f64;
        let p_alone = RenderParams {
            content_layers: vec![layer],
            ..alone(1.0, Vec::new(), 0.0)
        };
        let (_, plain) = objective(&p_alone);
        expected += plain * (params.content_weight / (norm + 1e-8));
    }
    let grams = engine
        .style_grams(std::slice::from_ref(&style), STYLE_SIDE, &params, None)
        .unwrap();
    for ((&layer, w), a) in params
        .style_layers
        .iter()
        .zip(params.layer_weights())
        .zip(grams.grams())
    {
        // mean((G - A)^2) over C x C, G = F F^T / (C HW): dL/dG = 2 (G - A) / C^2, and
        // g = (dL/dG + dL/dG^T) F / (C HW) = 2 dL/dG F / (C HW), dL/dG being symmetric
        let f = features(&x, layer);
        let (c, hw) = (f.size()[1], f.size()[2] * f.size()[3]);
        let flat = f.reshape([c, hw]);
        let d_gram = (gram(&f) - a) * (2.0 / (c * c) as f64);
        let g = d_gram.matmul(&flat) * (2.0 / (c * hw) as f64);
        let (_, plain) = objective(&alone(0.0, vec![layer], 0.0));
        expected += plain * (params.style_weight * w / (l1(&g) + 1e-8));
    }

    let (losses, ours) = objective(&RenderParams {
        normalize_gradients: true,
        ..params.clone()
    });
    let rel = (&ours - &expected).norm().double_value(&[]) / expected.norm().double_value(&[]);
    eprintln!("normalized gradient: relative difference {rel:.2e} from its definition");
    assert!(rel < 1e-4, "{rel}");
    // the losses reported are the objective's, bit for bit; its plain gradient is another direction
    let (plain_losses, plain) = objective(&params);
    assert_eq!(losses, plain_losses);
    let cos = (&ours * &plain).sum(Kind::Double).double_value(&[])
        / (ours.norm().double_value(&[]) * plain.norm().double_value(&[]));
    assert!(
        cos < 0.99,
        "the normalized gradient is the plain one's direction: cosine {cos}"
    );
}
