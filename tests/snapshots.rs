//! The engine's snapshots of a render as it goes (`render --save-every`, a worker's previews) through its
//! API: on the real engine and weights.

use std::ops::ControlFlow;

use image::Rgb32FImage;
use stylefarm_core::{imaging, RenderParams};
use stylefarm_engine::{Device, Engine, RenderJob, Snapshots};
use stylefarm_tests::{shared_image, weights};

/// The snapshot of iteration 2 of a 32 x 24 render, at the scale's size or shrunk to `longest`.
fn snapshot(engine: &Engine, longest: Option<u32>) -> Rgb32FImage {
    let job = RenderJob::new(
        imaging::load(&shared_image("tubingen.jpg")).unwrap(),
        vec![imaging::load(&shared_image("starry_night.jpg")).unwrap()],
        None,
        RenderParams {
            size: 32,
            iterations: 3,
            ..Default::default()
        },
    );
    let mut taken = None;
    let mut due = |_scale, iteration| iteration == 2;
    let mut save = |_scale, _iteration, image: Result<Rgb32FImage, _>| {
        taken = Some(image?);
        Ok(())
    };
    let snapshots = Snapshots {
        due: &mut due,
        longest,
        save: &mut save,
    };
    engine
        .render_f32(&job, &mut |_| ControlFlow::Continue(()), Some(snapshots))
        .unwrap();
    taken.expect("a snapshot at iteration 2")
}

/// A snapshot shrunk on the device (a worker's preview) is the area average of the full one: each pixel of
/// a 16 x 12 snapshot of a 32 x 24 render is the mean of its 2 x 2 pixels of the full one (the renders are
/// the same: the CPU's are deterministic).
#[test]
fn a_snapshot_shrunk_on_the_device_is_the_area_average_of_the_full_one() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let full = snapshot(&engine, None);
    let small = snapshot(&engine, Some(16));
    assert_eq!(full.dimensions(), (32, 24));
    assert_eq!(small.dimensions(), (16, 12));
    let mut worst = 0f32;
    for (x, y, p) in small.enumerate_pixels() {
        for c in 0..3 {
            let mean = [(0, 0), (1, 0), (0, 1), (1, 1)]
                .iter()
                .map(|&(dx, dy)| full.get_pixel(2 * x + dx, 2 * y + dy).0[c])
                .sum::<f32>()
                / 4.0;
            worst = worst.max((p.0[c] - mean).abs());
        }
    }
    // clamping to 0..255 before or after the average is the only difference
    assert!(worst < 1.0, "worst difference {worst}");
    assert_eq!(snapshot(&engine, Some(64)), full, "never enlarged");
}

/// With `original_colors` (a post-process: the same optimization), each snapshot is the plain render's
/// snapshot with the content's colours, at each size in turn (the two scales of a render, unshrunk): a
/// worker's previews resize the content to their size once a size, not at each, to the same pixels.
#[test]
fn snapshots_with_original_colors_are_the_plain_ones_with_the_content_s_colours() {
    stylefarm_tests::one_libtorch_thread();
    let engine = Engine::load(&weights(), Device::Cpu).unwrap();
    let content = imaging::load(&shared_image("tubingen.jpg")).unwrap();
    let snapshots_of = |original_colors: bool| {
        let job = RenderJob::new(
            content.clone(),
            vec![imaging::load(&shared_image("starry_night.jpg")).unwrap()],
            None,
            RenderParams {
                size: 64,
                scales: 2,
                iterations: 4,
                original_colors,
                ..Default::default()
            },
        );
        let mut taken = Vec::new();
        let mut due = |_scale, _iteration| true;
        let mut save = |_scale, _iteration, image: Result<Rgb32FImage, _>| {
            taken.push(image?);
            Ok(())
        };
        let snapshots = Snapshots {
            due: &mut due,
            longest: None,
            save: &mut save,
        };
        engine
            .render_f32(&job, &mut |_| ControlFlow::Continue(()), Some(snapshots))
            .unwrap();
        taken
    };
    let (plain, coloured) = (snapshots_of(false), snapshots_of(true));
    let sizes: std::collections::BTreeSet<_> = plain.iter().map(|i| i.dimensions()).collect();
    assert_eq!(sizes.len(), 2, "{sizes:?}");
    assert_eq!(plain.len(), coloured.len());
    for (plain, coloured) in plain.iter().zip(&coloured) {
        assert!(imaging::original_colors_f32(plain, &content) == *coloured);
    }
}
