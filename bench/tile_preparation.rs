//! The CPU cost of preparing one tile of a tiled scale, against the canvas size: the tile's content and init
//! resampled to the canvas over the tile's window only (`imaging::resize_window`, what the worker does: in
//! bands of rows on the machine's cores), side by side with the same windows in one pass on one thread
//! (what it did until 2026-12-06) and with resizing the whole canvas and cutting (what it did before
//! 2026-11-30), on the same images in one run; the three asserted pixel-identical in every repetition.
//!
//!     cargo bench -p stylefarm-core --bench tile_preparation -- [TILE] [REPS] [CANVAS,...]
//!
//! The content is tubingen.jpg (1024 x 768) from ../shared/data, the init a synthetic previous scale at half
//! the canvas; each canvas' tile is an interior one. Prints the median over REPS of each way, per tile.

use std::path::Path;
use std::time::Instant;

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
    let tile: u32 = args.first().and_then(|a| a.parse().ok()).unwrap_or(512);
    let reps: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let canvases: Vec<u32> = args
        .get(2)
        .map(|a| a.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![2048, 4096, 8192]);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let content =
        imaging::load(&repo.join("../shared/data/images/tubingen.jpg")).expect("tubingen.jpg");
    println!("tile {tile} px, median of {reps}; seconds per tile (content + init)");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("{cores} cores");
    println!(
        "| canvas | bands | window (now) | window, one pass | ratio | whole canvas + cut | ratio |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for longest in canvases {
        let (cw, ch) = imaging::working_size(content.width(), content.height(), longest);
        let previous = RgbImage::from_fn(cw / 2, ch / 2, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (x + 3 * y) as u8])
        });
        let window = (cw / 2 - tile / 2, ch / 2 - tile / 2, tile, tile);
        let (mut now, mut one, mut before) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let a = imaging::resize_window(&content, (cw, ch), window).unwrap();
            let b = imaging::resize_window(&previous, (cw, ch), window).unwrap();
            now.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let e = imaging::resize_window_in_bands(&content, (cw, ch), window, 1).unwrap();
            let f = imaging::resize_window_in_bands(&previous, (cw, ch), window, 1).unwrap();
            one.push(t.elapsed().as_secs_f64());
            assert!(a == e && b == f, "the bands differ from one pass");
            let t = Instant::now();
            let (x, y, w, h) = window;
            let cut = |img: &RgbImage| {
                image::imageops::crop_imm(&imaging::resize(img, cw, ch), x, y, w, h).to_image()
            };
            let (c, d) = (cut(&content), cut(&previous));
            before.push(t.elapsed().as_secs_f64());
            assert!(a == c && b == d, "the window differs from the cut");
        }
        let (n, o, b) = (median(now), median(one), median(before));
        let bands = imaging::window_bands(content.dimensions(), (cw, ch), window);
        println!(
            "| {cw} x {ch} | {bands} | {n:.4} s | {o:.4} s | {:.2}x | {b:.3} s | {:.0}x |",
            o / n,
            b / n
        );
    }
}
