//! The CPU cost of resampling a large photo to a scale's working size (what a worker does to its content at
//! every scale of an untiled task, while its device waits): `imaging::resize`, in bands of rows on the
//! machine's cores, side by side with one pass of `image::imageops::resize` (what it did before), on the same
//! image in one run; the two asserted pixel-identical in every repetition.
//!
//!     cargo bench -p stylefarm-core --bench resize_bands -- [WIDTHxHEIGHT] [REPS] [LONGEST,...]
//!
//! The photo is synthetic (6000 x 4000, a 24-megapixel camera's, unless given), each size its longest side.
//! Prints the median over REPS of each way.

use std::time::Instant;

use image::imageops::FilterType;
use image::RgbImage;
use stylefarm_core::imaging;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let (w, h) = args
        .first()
        .and_then(|a| a.split_once('x'))
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        .unwrap_or((6000u32, 4000u32));
    let reps: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let sizes: Vec<u32> = args
        .get(2)
        .map(|a| a.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![512, 1024, 2048, 4096]);
    let photo = RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (x / 3 + 5 * y) as u8])
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{w} x {h} photo, {cores} cores, median of {reps}; seconds per resize");
    println!("| to | bands | imaging::resize (now) | one pass (before) | ratio |");
    println!("| --- | --- | --- | --- | --- |");
    for longest in sizes {
        let (tw, th) = imaging::working_size(w, h, longest);
        let (mut now, mut before) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let a = imaging::resize(&photo, tw, th);
            now.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let b = image::imageops::resize(&photo, tw, th, FilterType::Lanczos3);
            before.push(t.elapsed().as_secs_f64());
            assert!(a == b, "the bands differ from one pass");
        }
        let (n, b) = (median(now), median(before));
        let bands = imaging::resize_bands((w, h), (tw, th));
        println!(
            "| {tw} x {th} | {bands} | {n:.3} s | {b:.3} s | {:.2}x |",
            b / n
        );
    }
}
