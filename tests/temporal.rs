//! A video frame after its chunk's first (Ruder et al. 2016), on the real engine and weights: the temporal
//! loss' value is the formula's; a frame starts from the previous frame's result and is held to it where
//! its content did not change; where every pixel changed, it renders as a first frame; with optical flow,
//! a frame of a panning camera is held to the previous result moved with the pan.

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

/// A video frame of `content` after the frame of `previous_content` rendered as `previous`.
fn frame_job(
    content: &RgbImage,
    previous_content: &RgbImage,
    previous: &RgbImage,
    style: &RgbImage,
    params: RenderParams,
) -> RenderJob {
    RenderJob {
        previous: Some(PreviousFrameImages {
            content: previous_content.clone(),
            result: previous.clone(),
        }),
        ..RenderJob::new(content.clone(), vec![style.clone()], None, params)
    }
}

#[test]
fn the_temporal_loss_holds_unchanged_pixels_to_the_previous_result_and_no_others() {
    stylefarm_tests::one_libtorch_thread();
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
    // frames compared in place (no optical flow), so that "unchanged" is exact
    let frame = |previous_content: &RgbImage, temporal_weight: f64| {
        let params = RenderParams {
            temporal_weight,
            optical_flow: false,
            ..params.clone()
        };
        frame_job(&content, previous_content, &previous, &style, params)
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
    // everywhere). The previous result is 10 iterations from the content, far from converged (its style
    // loss halves in 10 more), so the style term's pull outweighs the default weight's; 1e6 shows the hold
    // with a margin on every CPU (1e5 only halved the distance on an AMD EPYC: 5.35 against 10.53)
    let free = engine.render(&frame(&content, 0.0), &mut quiet).unwrap();
    let kept = engine.render(&frame(&content, 1e6), &mut quiet).unwrap();
    let (d_free, d_kept) = (
        mean_abs_difference(&free, &previous),
        mean_abs_difference(&kept, &previous),
    );
    eprintln!("mean |result - previous|: weight 0 {d_free:.3}, weight 1e6 {d_kept:.3}");
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

/// `img`'s columns from `x` on, `width` of them (the rows whole).
fn columns(img: &RgbImage, x: u32, width: u32) -> RgbImage {
    image::imageops::crop_imm(img, x, 0, width, img.height()).to_image()
}

#[test]
fn a_panning_frame_is_held_to_the_previous_result_moved_with_the_pan() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    // the camera pans 4 px right: this frame's pixel (x, y) is the previous frame's (x + 4, y)
    let wide = imaging::resize_longest(&imaging::load(&shared_image("tubingen.jpg")).unwrap(), 68);
    let (w, pan) = (64, 4);
    let (previous_content, content) = (columns(&wide, 0, w), columns(&wide, pan, w));
    let style = imaging::load(&shared_image("starry_night.jpg")).unwrap();
    let params = RenderParams {
        size: 64,
        iterations: 10,
        ..Default::default()
    };
    let mut quiet = |_: &stylefarm_engine::Progress| std::ops::ControlFlow::Continue(());
    let first = RenderJob::new(
        previous_content.clone(),
        vec![style.clone()],
        None,
        params.clone(),
    );
    let previous = engine.render(&first, &mut quiet).unwrap();
    let frame = |optical_flow: bool, temporal_weight: f64| {
        let params = RenderParams {
            optical_flow,
            temporal_weight,
            ..params.clone()
        };
        frame_job(&content, &previous_content, &previous, &style, params)
    };
    // the previous result moved with the pan (its last 4 columns, which enter the frame, repeated)
    let moved = RgbImage::from_fn(w, previous.height(), |x, y| {
        *previous.get_pixel((x + pan).min(w - 1), y)
    });
    let temporal = |job: &RenderJob, at: &RgbImage| engine.evaluate(job, at).unwrap().temporal;
    // with the flow, the loss is near zero at the moved result and large at the result left in place;
    // compared in place, the other way round
    let flowing = frame(true, 1e3);
    let (at_moved, in_place) = (temporal(&flowing, &moved), temporal(&flowing, &previous));
    eprintln!(
        "optical flow: temporal loss {at_moved:.1} at the moved result, {in_place:.1} in place"
    );
    assert!(at_moved < 0.1 * in_place, "{at_moved} vs {in_place}");
    let still = frame(false, 1e3);
    let (at_moved, in_place) = (temporal(&still, &moved), temporal(&still, &previous));
    eprintln!("no flow: temporal loss {at_moved:.1} at the moved result, {in_place:.1} in place");
    assert!(in_place < at_moved, "{in_place} vs {at_moved}");

    // rendered, away from the entering columns: with the flow, held to the moved result, closer to it
    // than a render left free (weight 0) or one held in place (no flow). The previous result is 10
    // iterations from its content, far from converged, so the style term pulls hard; 1e5 shows the hold
    let inner = |img: &RgbImage| columns(img, 4, w - 12);
    let mut distance = |optical_flow, temporal_weight| {
        let out = engine
            .render(&frame(optical_flow, temporal_weight), &mut quiet)
            .unwrap();
        mean_abs_difference(&inner(&out), &inner(&moved))
    };
    let (free, held, in_place) = (
        distance(true, 0.0),
        distance(true, 1e5),
        distance(false, 1e5),
    );
    eprintln!(
        "mean |result - moved previous result|: flow, weight 0 {free:.2}; flow, weight 1e5 {held:.2}; \
         no flow, weight 1e5 {in_place:.2}"
    );
    assert!(
        held < 0.9 * free && held < 0.9 * in_place,
        "{held} vs {free}, {in_place}"
    );
}
