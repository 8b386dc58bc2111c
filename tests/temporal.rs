//! A video frame after its chunk's first (Ruder et al. 2016, without optical flow:
//! `imaging::unchanged_pixels` weights), on the real engine and weights: the temporal loss' value is the
//! formula's; a frame starts from the previous frame's result and is held to it where its content did not
//! change; where every pixel changed, it renders as a first frame.

use image::RgbImage;
use stylefarm_core::{imaging, RenderParams};
use stylefarm_engine::{Device, Engine, Preprocessing, PreviousFrameImages, RenderJob};
use stylefarm_tests::{shared_image, weights};

fn mean_abs_difference(a: &RgbImage, b: &RgbImage) -> f64 {
    let sum: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&u, &v)| f64::from(u.abs_diff(v)))
        .sum();
    sum / a.as_raw().len() as f64
}

#[test]
fn the_temporal_loss_holds_unchanged_pixels_to_the_previous_result_and_no_others() {
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    assert_eq!(engine.vgg().preprocessing(), Preprocessing::Caffe);
    let content =
        imaging::resize_longest(&imaging::load(&shared_image("tubingen.jpg")).unwrap(), 64);
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    let params = RenderParams {
        size: 64,
        iterations: 10,
        ..Default::default()
    };
    let mut quiet = |_: &stylefarm_engine::Progress| std::ops::ControlFlow::Continue(());
    // the previous frame's result: the same content, rendered
    let first = RenderJob::new(content.clone(), vec![style.clone()], None, params.clone());
    let previous = engine.render(&first, &mut quiet).unwrap();
    let frame = |previous_content: &RgbImage, temporal_weight: f64| RenderJob {
        previous: Some(PreviousFrameImages {
            content: previous_content.clone(),
            result: previous.clone(),
        }),
        ..RenderJob::new(
            content.clone(),
            vec![style.clone()],
            None,
            RenderParams {
                temporal_weight,
                ..params.clone()
            },
        )
    };

    // the term's value: weight * mean over pixels and channels of (x - previous)^2 where unchanged, in
    // 0..255 units (Caffe's preprocessing is in them); the content unchanged everywhere
    let held = frame(&content, 1e3);
    let at = imaging::resize_longest(&style, 64);
    let at = imaging::resize(&at, content.width(), content.height());
    let terms = engine.evaluate(&held, &at).unwrap();
    let squares: f64 = at
        .as_raw()
        .iter()
        .zip(previous.as_raw())
        .map(|(&u, &v)| (f64::from(u) - f64::from(v)).powi(2))
        .sum();
    let expected = 1e3 * squares / at.as_raw().len() as f64;
    let rel = (terms.temporal - expected).abs() / expected;
    assert!(rel < 1e-4, "temporal {} vs {expected}", terms.temporal);
    let sum = terms.content + terms.style + terms.tv + terms.temporal;
    assert!((terms.total - sum).abs() <= 1e-4 * sum, "{terms:?}");

    // rendered: started from the previous result and held to it where the content did not change (here
    // everywhere). The previous result is
    // 10 iterations from the content, far from converged (its style loss halves in 10 more), so the
    // style term's pull outweighs the default weight's; 1e5 shows the hold
    let free = engine.render(&frame(&content, 0.0), &mut quiet).unwrap();
    let kept = engine.render(&frame(&content, 1e5), &mut quiet).unwrap();
    let (d_free, d_kept) = (
        mean_abs_difference(&free, &previous),
        mean_abs_difference(&kept, &previous),
    );
    eprintln!("mean |result - previous|: weight 0 {d_free:.3}, weight 1e5 {d_kept:.3}");
    assert!(d_kept < 0.5 * d_free, "{d_kept} vs {d_free}");

    // every pixel changed (each channel 128 levels away): the frame starts from its content and nothing
    // holds it, as a first frame: the same render as the previous frame's, bit for bit
    let moved = RgbImage::from_fn(content.width(), content.height(), |x, y| {
        image::Rgb(content.get_pixel(x, y).0.map(|c| c.wrapping_add(128)))
    });
    let unheld = engine.render(&frame(&moved, 1e5), &mut quiet).unwrap();
    assert!(
        unheld == previous,
        "with every pixel changed, a frame renders as a first frame"
    );
}
