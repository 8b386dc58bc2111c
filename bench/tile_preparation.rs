//! The CPU cost of preparing one tile of a tiled scale, against the canvas size: the tile's content and init
//! resampled to the canvas over the tile's window only (`imaging::resize_window`, what the worker does), side
//! by side with resizing the whole canvas and cutting (what it did before), on the same images in one run.
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
    println!("| canvas | window (now) | whole canvas + cut (before) | ratio |");
    println!("| --- | --- | --- | --- |");
    for longest in canvases {
        let (cw, ch) = imaging::working_size(content.width(), content.height(), longest);
        let previous = RgbImage::from_fn(cw / 2, ch / 2, |x, y| {
            image::Rgb([(x * 7 + y) as u8, (x ^ y) as u8, (x + 3 * y) as u8])
        });
        let window = (cw / 2 - tile / 2, ch / 2 - tile / 2, tile, tile);
        let (mut now, mut before) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t = Instant::now();
            let a = imaging::resize_window(&content, (cw, ch), window).unwrap();
            let b = imaging::resize_window(&previous, (cw, ch), window).unwrap();
            now.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let (x, y, w, h) = window;
            let cut = |img: &RgbImage| {
                image::imageops::crop_imm(&imaging::resize(img, cw, ch), x, y, w, h).to_image()
            };
            let (c, d) = (cut(&content), cut(&previous));
            before.push(t.elapsed().as_secs_f64());
            assert!(a == c && b == d, "the window differs from the cut");
        }
        let (n, b) = (median(now), median(before));
        println!("| {cw} x {ch} | {n:.4} s | {b:.3} s | {:.0}x |", b / n);
    }
}
