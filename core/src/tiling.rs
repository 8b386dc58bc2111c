//! Tiled rendering of large images (ALGORITHM.md, "Tiled rendering of large images"): the plan of scales and
//! tiles, the feathered blend weights, stitching in row bands, and the seam measure.
//!
//! A tile grid is the product of two axis plans. Along an axis of length `len`, tiles have the extent
//! `min(tile, len)`; the first starts at 0, the last ends at `len` (edge-aligned: every tile has the full
//! extent), and the starts in between are spread evenly so that neighbours overlap by at least `overlap`.
//! A tile's weight ramps (raised cosine) from 0 at an edge it shares with a neighbour to 1 where that
//! neighbour ends; edges on the canvas border keep weight 1. Because the grid is a product, the per-pixel
//! normalization is a product too: the normalized weights are `wx_i(x) / Σ_i wx_i(x) * wy_j(y) / Σ_j wy_j(y)`,
//! which sum to 1 at every pixel.

use image::{Rgb, RgbImage};
use serde::{Deserialize, Serialize};

use crate::imaging;
use crate::memory;
use crate::params::{RenderParams, MAX_SCALES};
use crate::Error;

/// Default tile size, in px (ALGORITHM.md's `tile_size` default).
pub const DEFAULT_TILE_SIZE: u32 = 512;
/// Default overlap of neighbouring tiles, in px (ALGORITHM.md's `overlap` default).
pub const DEFAULT_OVERLAP: u32 = 128;

/// The overlap of a job whose user gave none: [`DEFAULT_OVERLAP`], or half the tile size for fixed tiles
/// under twice that (the most [`Tiling::validate`] accepts; 128-px tiles overlap by 64, not refused).
pub fn default_overlap(tile_size: Option<u32>) -> u32 {
    tile_size.map_or(DEFAULT_OVERLAP, |t| DEFAULT_OVERLAP.min(t / 2))
}
/// Least overlap [`Tiling::validate`] accepts, in px (ALGORITHM.md: `overlap` >= 64): narrower, the
/// feathered blend has too few pixels to hide where two tiles' optimizations drifted apart.
pub const MIN_OVERLAP: u32 = 64;
/// Smallest tile size [`Tiling::validate`] accepts, in px: room for [`MIN_OVERLAP`] on both sides.
pub const MIN_TILE_SIZE: u32 = 2 * MIN_OVERLAP;
/// Least overlap of a job stored by an earlier version (whose limit was 8 px): [`Tiling::validate_stored`]
/// accepts it, so that such a job renders on after an upgrade; new jobs get [`MIN_OVERLAP`].
pub const STORED_MIN_OVERLAP: u32 = 8;
/// Smallest tile size of a job stored by an earlier version, as [`STORED_MIN_OVERLAP`].
pub const STORED_MIN_TILE_SIZE: u32 = 64;
/// Largest tile size [`Tiling::validate`] accepts, in px; the planner grows tiles up to it (a scale that
/// fits a device whole is one task, of any size).
pub const MAX_TILE_SIZE: u32 = 4096;
/// Half-width of the band around each tile edge line that the seam measure looks at.
pub const SEAM_BAND: u32 = 2;

/// Exact mode's blocks have their corners on multiples of this many px: the stride of VGG19's deepest
/// pooling (relu5_1 sees the image at 1/16 of its size), so a block's feature maps line up with the whole
/// image's.
pub const BLOCK_ALIGN: u32 = 16;

/// The halo of the blocks of an objective evaluated in blocks of at most `block` px: an eighth of the block,
/// at least 32 px. (Measured on a 330 x 250 image: 16 px of halo leave a 5e-2 relative error in the
/// gradient, 32 px 8e-5.)
pub fn objective_halo(block: u32) -> u32 {
    (block / 8 / BLOCK_ALIGN * BLOCK_ALIGN).max(2 * BLOCK_ALIGN)
}

/// The side of a block's own square (what it computes, without its halo) for blocks of at most `block` px
/// with `halo` px of context on each side: what the halo leaves, on a multiple of [`BLOCK_ALIGN`], at least
/// [`BLOCK_ALIGN`]. Blocks start at the multiples of it.
pub fn block_step(block: u32, halo: u32) -> u32 {
    (block.saturating_sub(2 * halo) / BLOCK_ALIGN * BLOCK_ALIGN).max(BLOCK_ALIGN)
}

/// The most shards an exact scale is cut into (one per worker).
pub const MAX_SHARDS: u32 = 64;

/// Exact mode over several workers: the rows `[y0, y1)` of each shard of a `height`-px canvas whose
/// objective is evaluated in blocks of `block` px, at most `shards` (and [`MAX_SHARDS`]) of them. A shard
/// is a band of whole rows of blocks, the bands as even as the block rows allow, and each at least twice
/// the objective's halo tall, so that a canvas row lies in the regions (band and halo) of at most two
/// shards; fewer shards where that cannot be. One shard: the whole canvas.
pub fn shard_rows(height: u32, block: u32, shards: u32) -> Vec<(u32, u32)> {
    let halo = objective_halo(block);
    let step = block_step(block, halo);
    let block_rows = height.div_ceil(step).max(1);
    let mut n = shards.clamp(1, block_rows.min(MAX_SHARDS));
    loop {
        let bound = |i: u32| {
            if i == n {
                height
            } else {
                ((u64::from(i) * u64::from(block_rows) / u64::from(n)) as u32 * step).min(height)
            }
        };
        let bands: Vec<(u32, u32)> = (0..n).map(|i| (bound(i), bound(i + 1))).collect();
        if n == 1 || bands.iter().all(|&(a, b)| b - a >= 2 * halo) {
            return bands;
        }
        n -= 1;
    }
}

/// How the tiles of a tiled job's later scales are sized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TileSizing {
    /// By the planner, when each scale starts, from the device memory of the workers present
    /// ([`Tiling::scale_tile_size`]): the whole canvas when it fits, else tiles as large as fit (at least
    /// `tile_size`), enough of them for every worker.
    #[default]
    Planned,
    /// Always `tile_size` (the user gave `--tile-size`).
    Fixed,
}

/// How a tiled job cuts its canvas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiling {
    /// The tile size: the first scale's longest side at most, and every later scale's tiles' with
    /// [`TileSizing::Fixed`]; the smallest tiles the planner cuts with [`TileSizing::Planned`].
    pub tile_size: u32,
    /// Least overlap of neighbouring tiles, in px ([`MIN_OVERLAP`] to `tile_size / 2`): where feathered
    /// weights blend.
    pub overlap: u32,
    /// Exact mode: each later scale is ONE task that optimizes the whole canvas with the exact gradient of
    /// the whole image's objective, evaluated in blocks of `tile_size` px (ALGORITHM.md, "Exact distributed
    /// mode", on one worker per scale): no tiles to stitch, the style loss of an untiled render, the
    /// network's memory bound by the tile size; about 2x the compute of an untiled scale, on one worker.
    /// Otherwise tiles are independent tasks, spread over the workers and stitched with feathered weights.
    #[serde(default)]
    pub exact: bool,
    /// Whether the planner sizes later scales' tiles from the workers' memory, or keeps `tile_size`.
    #[serde(default)]
    pub sizing: TileSizing,
}

impl Default for Tiling {
    fn default() -> Self {
        Tiling {
            tile_size: DEFAULT_TILE_SIZE,
            overlap: DEFAULT_OVERLAP,
            exact: false,
            sizing: TileSizing::Planned,
        }
    }
}

/// The largest tile (or block) side to plan a tiled job's scales with once a tile (or block) of `ran_out`
/// px ran out of a device's memory: three quarters of it (about half its pixels, and so about half the
/// memory of its render), rounded down to a multiple of 64 px. The planner still cuts tiles of the job's
/// `tile_size` at least ([`Tiling::scale_tile_size`]): a tile that small has nothing smaller to go to.
pub fn max_tile_after_out_of_memory(ran_out: u32) -> u32 {
    ran_out / 4 * 3 / 64 * 64
}

impl Tiling {
    /// A tiled job's tiling: `tile_size` fixes every scale's tiles ([`TileSizing::Fixed`]); none leaves
    /// them to the planner ([`TileSizing::Planned`], from [`DEFAULT_TILE_SIZE`] up). Unchecked: see
    /// [`Tiling::validate`].
    pub fn new(tile_size: Option<u32>, overlap: u32, exact: bool) -> Tiling {
        Tiling {
            tile_size: tile_size.unwrap_or(DEFAULT_TILE_SIZE),
            overlap,
            exact,
            sizing: if tile_size.is_some() {
                TileSizing::Fixed
            } else {
                TileSizing::Planned
            },
        }
    }

    /// The tile size the user fixed; none when the planner sizes the tiles ([`Tiling::new`]'s argument).
    pub fn fixed_tile_size(&self) -> Option<u32> {
        (self.sizing == TileSizing::Fixed).then_some(self.tile_size)
    }

    /// Checks a new job's tiling: `tile_size` in [`MIN_TILE_SIZE`]..=[`MAX_TILE_SIZE`], `overlap` from
    /// [`MIN_OVERLAP`] to half the tile size; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        self.check(MIN_OVERLAP, MIN_TILE_SIZE)
    }

    /// Checks a stored job's tiling, which an earlier version may have accepted with narrower overlaps
    /// and smaller tiles ([`STORED_MIN_OVERLAP`], [`STORED_MIN_TILE_SIZE`]): what the planner needs.
    pub fn validate_stored(&self) -> Result<(), Error> {
        self.check(STORED_MIN_OVERLAP, STORED_MIN_TILE_SIZE)
    }

    fn check(&self, min_overlap: u32, min_tile_size: u32) -> Result<(), Error> {
        if !(min_tile_size..=MAX_TILE_SIZE).contains(&self.tile_size) {
            return Err(Error::invalid(
                "tile_size",
                format!(
                    "must be between {min_tile_size} and {MAX_TILE_SIZE}, got {}",
                    self.tile_size
                ),
            ));
        }
        if self.overlap < min_overlap || self.overlap > self.tile_size / 2 {
            return Err(Error::invalid(
                "overlap",
                format!(
                    "must be between {min_overlap} and half the tile size ({}), got {}",
                    self.tile_size / 2,
                    self.overlap
                ),
            ));
        }
        Ok(())
    }

    /// The tile size of a later scale's `width` x `height` canvas (in exact mode, the block size), for
    /// workers whose devices have `workers` bytes of memory each (0 where a worker did not say).
    ///
    /// [`TileSizing::Fixed`], or no worker that said: `tile_size`. Otherwise the whole canvas when its
    /// render fits the smallest device ([`memory::render_bytes`]), as a one-pass render would; else the
    /// largest multiple of 64 px (from `tile_size` to [`MAX_TILE_SIZE`]) whose tile fits it, made smaller
    /// while that leaves fewer tiles than workers (a few large tiles across N devices, not many small
    /// ones); in exact mode, the largest block that fits beside the canvas' optimizer state. `max_tile`:
    /// no tile (or block) larger than this, the whole canvas included, but `tile_size` at least (the
    /// tiles that ran out of memory made smaller: [`max_tile_after_out_of_memory`]).
    pub fn scale_tile_size(
        &self,
        width: u32,
        height: u32,
        params: &RenderParams,
        workers: &[u64],
        max_tile: Option<u32>,
    ) -> u32 {
        let known = workers.iter().copied().filter(|&m| m > 0);
        let (TileSizing::Planned, Some(smallest)) = (self.sizing, known.min()) else {
            return self.tile_size;
        };
        let budget = memory::usable_bytes(smallest);
        let longest = width.max(height);
        let max_tile = max_tile.unwrap_or(MAX_TILE_SIZE);
        if longest <= max_tile && memory::render_bytes(width, height, params) <= budget {
            return longest.max(self.tile_size);
        }
        let fits = |t: u32| {
            let bytes = if self.exact {
                memory::blocked_render_bytes(width, height, t, params)
            } else {
                memory::render_bytes(t.min(width), t.min(height), params)
            };
            bytes <= budget
        };
        let step = 64;
        let mut t = self.tile_size;
        while t + step <= MAX_TILE_SIZE.min(longest).min(max_tile) && fits(t + step) {
            t += step;
        }
        if !self.exact {
            let tiles = |t: u32| {
                TileGrid::new(
                    width,
                    height,
                    Tiling {
                        tile_size: t,
                        ..*self
                    },
                )
                .len()
            };
            while t >= self.tile_size + step && tiles(t) < workers.len() {
                t -= step;
            }
        }
        t
    }

    /// Exact mode's shards of a later scale's canvas, `height` px tall, for `workers` workers: the block
    /// size and the rows of each shard ([`shard_rows`]). Several shards with more than one worker (and
    /// either optimizer: Adam's steps are element-wise, L-BFGS' are once the shards added up its dot
    /// products): as many as the workers where the canvas allows, the planned `block` made smaller for
    /// that (to the job's tile size at least); else one, the whole canvas, in `block`.
    pub fn exact_shards(&self, height: u32, workers: usize, block: u32) -> (u32, Vec<(u32, u32)>) {
        let n = u32::try_from(workers).unwrap_or(u32::MAX);
        if !self.exact || n < 2 {
            return (block, vec![(0, height)]);
        }
        // a planned block: the largest that gives the most shards (down to the job's tile size)
        let mut best = (block, shard_rows(height, block, n));
        if self.sizing == TileSizing::Planned {
            let step = 64;
            let mut smaller = block;
            while best.1.len() < n.min(MAX_SHARDS) as usize && smaller >= self.tile_size + step {
                smaller -= step;
                let bands = shard_rows(height, smaller, n);
                if bands.len() > best.1.len() {
                    best = (smaller, bands);
                }
            }
        }
        if best.1.len() == 1 {
            // one shard: the whole canvas, in the planned block
            return (block, vec![(0, height)]);
        }
        best
    }

    /// The tiles of a later scale's `width` x `height` canvas: the grid, or in exact mode one tile that is
    /// the whole canvas.
    pub fn grid(&self, width: u32, height: u32) -> TileGrid {
        if self.exact {
            TileGrid {
                xs: AxisPlan::new(width, width, 0),
                ys: AxisPlan::new(height, height, 0),
            }
        } else {
            TileGrid::new(width, height, *self)
        }
    }
}

/// Tiles along one axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisPlan {
    /// Length of the axis (the canvas' width or height), in px.
    pub len: u32,
    /// Every tile's extent along this axis: `min(tile, len)`.
    pub extent: u32,
    /// Each tile's first coordinate, increasing: the first 0, the last `len - extent`.
    pub starts: Vec<u32>,
}

fn raised_cosine(t: f64) -> f64 {
    let t = t.clamp(0.0, 1.0);
    0.5 - 0.5 * (std::f64::consts::PI * t).cos()
}

impl AxisPlan {
    /// The fewest tiles of `tile` px along an axis of `len` px that overlap by at least `overlap` px, starts
    /// spread evenly, edge-aligned (one tile of extent `len` when `len <= tile`).
    ///
    /// # Panics
    /// When `len` is 0 or `overlap >= tile`.
    pub fn new(len: u32, tile: u32, overlap: u32) -> AxisPlan {
        assert!(
            len > 0 && overlap < tile,
            "axis {len}, tile {tile}, overlap {overlap}"
        );
        if len <= tile {
            return AxisPlan {
                len,
                extent: len,
                starts: vec![0],
            };
        }
        let (len64, tile64, overlap64) = (u64::from(len), u64::from(tile), u64::from(overlap));
        // the fewest tiles whose evenly spread starts keep every overlap >= `overlap`
        let n = (len64 - overlap64).div_ceil(tile64 - overlap64);
        let starts = (0..n)
            .map(|i| (i * (len64 - tile64) / (n - 1)) as u32)
            .collect();
        AxisPlan {
            len,
            extent: tile,
            starts,
        }
    }

    /// Number of tiles along the axis.
    pub fn count(&self) -> usize {
        self.starts.len()
    }

    /// The unnormalized feather weight of tile `i` at coordinate `p` (inside the tile): a raised cosine from
    /// 0 at an edge shared with a neighbour to 1 where that neighbour's overlap ends.
    fn raw_weight(&self, i: usize, p: u32) -> f64 {
        let s = self.starts[i];
        let centre = f64::from(p) + 0.5;
        let mut w = 1.0;
        if i > 0 {
            let ramp = f64::from(self.starts[i - 1] + self.extent - s);
            w *= raised_cosine((centre - f64::from(s)) / ramp);
        }
        if i + 1 < self.starts.len() {
            let ramp = f64::from(s + self.extent - self.starts[i + 1]);
            w *= raised_cosine((f64::from(s + self.extent) - centre) / ramp);
        }
        w
    }

    /// Normalized weights of tile `i`, one per coordinate of the tile: over all tiles covering a coordinate
    /// they sum to 1.
    pub fn weights(&self, i: usize) -> Vec<f32> {
        let s = self.starts[i];
        (s..s + self.extent)
            .map(|p| {
                let total: f64 = (0..self.count())
                    .filter(|&j| self.starts[j] <= p && p < self.starts[j] + self.extent)
                    .map(|j| self.raw_weight(j, p))
                    .sum();
                (self.raw_weight(i, p) / total) as f32
            })
            .collect()
    }

    /// Coordinates where one tile's edge meets the inside of another: where a hard-edged stitch would show.
    pub fn edge_lines(&self) -> Vec<u32> {
        let n = self.count();
        let mut lines: Vec<u32> = (0..n)
            .flat_map(|i| {
                let s = self.starts[i];
                [(i > 0).then_some(s), (i + 1 < n).then_some(s + self.extent)]
            })
            .flatten()
            .collect();
        lines.sort_unstable();
        lines.dedup();
        lines
    }
}

/// A tile of a grid, in canvas pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rect {
    /// Left column, in px from the canvas' left edge.
    pub x: u32,
    /// Top row, in px from the canvas' top edge.
    pub y: u32,
    /// Width in px.
    pub width: u32,
    /// Height in px.
    pub height: u32,
}

/// A tile handed to [`TileGrid::stitch`] whose size is not its rectangle's in the plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tile {index} is {}x{}, the plan says {}x{}", size.0, size.1, planned.0, planned.1)]
pub struct StitchError {
    /// The tile's row-major index.
    pub index: usize,
    /// Its width and height as given, in px.
    pub size: (u32, u32),
    /// Its width and height in the plan, in px.
    pub planned: (u32, u32),
}

/// The tiles of one canvas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TileGrid {
    /// The columns: tiles along the canvas' width.
    pub xs: AxisPlan,
    /// The rows: tiles along the canvas' height.
    pub ys: AxisPlan,
}

impl TileGrid {
    /// The grid of a `width` x `height` px canvas with `tiling`'s tile size and overlap (exact mode ignored:
    /// see [`Tiling::grid`]).
    ///
    /// # Panics
    /// When a side is 0 or the overlap is not under the tile size (see [`AxisPlan::new`]).
    pub fn new(width: u32, height: u32, tiling: Tiling) -> TileGrid {
        TileGrid {
            xs: AxisPlan::new(width, tiling.tile_size, tiling.overlap),
            ys: AxisPlan::new(height, tiling.tile_size, tiling.overlap),
        }
    }

    /// Number of tiles: columns x rows.
    pub fn len(&self) -> usize {
        self.xs.count() * self.ys.count()
    }

    /// Whether the grid has no tile (never, for a grid built by [`TileGrid::new`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of tiles per row.
    pub fn columns(&self) -> usize {
        self.xs.count()
    }

    /// Tile `index`, row-major.
    pub fn tile(&self, index: usize) -> Rect {
        let (row, col) = (index / self.columns(), index % self.columns());
        Rect {
            x: self.xs.starts[col],
            y: self.ys.starts[row],
            width: self.xs.extent,
            height: self.ys.extent,
        }
    }

    /// Every tile, row-major (the order of [`TileGrid::tile`]'s indices).
    pub fn tiles(&self) -> impl Iterator<Item = Rect> + '_ {
        (0..self.len()).map(|i| self.tile(i))
    }

    /// Blends the tiles, row-major, with the feathered weights into one canvas. `tile(i)` yields tile `i`'s
    /// pixels (the full extent); its error is returned as it is, and a tile of the wrong size is a
    /// [`StitchError`]. Only one band of `tile_size` rows is held in floats, besides the canvas; one tile is
    /// the canvas (its weights are all 1), taken as it is.
    pub fn stitch<E: From<StitchError>>(
        &self,
        mut tile: impl FnMut(usize) -> Result<RgbImage, E>,
    ) -> Result<RgbImage, E> {
        let checked = |index: usize, img: RgbImage| {
            let rect = self.tile(index);
            match img.dimensions() == (rect.width, rect.height) {
                true => Ok(img),
                false => Err(StitchError {
                    index,
                    size: img.dimensions(),
                    planned: (rect.width, rect.height),
                }),
            }
        };
        if self.len() == 1 {
            return Ok(checked(0, tile(0)?)?);
        }
        let (width, height) = (self.xs.len, self.ys.len);
        let mut canvas = RgbImage::new(width, height);
        let wx: Vec<Vec<f32>> = (0..self.xs.count()).map(|i| self.xs.weights(i)).collect();
        let wy: Vec<Vec<f32>> = (0..self.ys.count()).map(|j| self.ys.weights(j)).collect();
        // rows [band_top, band_top + band.len() / (3 * width)) of weighted sums
        let mut band: Vec<f32> = Vec::new();
        let mut band_top = 0u32;
        for (row, wy_row) in wy.iter().enumerate() {
            let top = self.ys.starts[row];
            let bottom = top + self.ys.extent;
            // grow the band down to this row of tiles' bottom
            let have = band_top + (band.len() / (3 * width as usize)) as u32;
            if bottom > have {
                band.resize(band.len() + ((bottom - have) * 3 * width) as usize, 0.0);
            }
            for (col, wx_col) in wx.iter().enumerate() {
                let index = row * self.columns() + col;
                let rect = self.tile(index);
                let img = checked(index, tile(index)?)?;
                for (ty, &w_y) in wy_row.iter().enumerate() {
                    let y = rect.y + ty as u32;
                    let line = ((y - band_top) * 3 * width) as usize;
                    for (tx, &w_x) in wx_col.iter().enumerate() {
                        let w = w_x * w_y;
                        let p = img.get_pixel(tx as u32, ty as u32).0;
                        let at = line + 3 * (rect.x as usize + tx);
                        for c in 0..3 {
                            band[at + c] += w * f32::from(p[c]);
                        }
                    }
                }
            }
            // rows above the next row of tiles are final
            let done = if row + 1 < self.ys.count() {
                self.ys.starts[row + 1]
            } else {
                height
            };
            let rows = (done - band_top) as usize;
            for (r, line) in band[..rows * 3 * width as usize]
                .chunks_exact(3 * width as usize)
                .enumerate()
            {
                for (x, px) in line.chunks_exact(3).enumerate() {
                    let v = |c: usize| px[c].round().clamp(0.0, 255.0) as u8;
                    canvas.put_pixel(x as u32, band_top + r as u32, Rgb([v(0), v(1), v(2)]));
                }
            }
            band.drain(..rows * 3 * width as usize);
            band_top = done;
        }
        Ok(canvas)
    }
}

/// The mean absolute gradient of `img` in bands of ±[`SEAM_BAND`] px around the grid's inner tile edge lines,
/// over the mean absolute gradient of the whole image: about 1 when the tiling leaves no trace, more with
/// seams. The gradient of a pixel is `|I(x+1,y) - I(x,y)| + |I(x,y+1) - I(x,y)|`, averaged over the channels,
/// on the pixels that have both neighbours. `None` when the grid has no inner edge, or the image no
/// gradient.
pub fn seam_measure(img: &RgbImage, grid: &TileGrid) -> Option<f64> {
    let (w, h) = img.dimensions();
    if w < 2 || h < 2 {
        return None;
    }
    let (vx, hy) = (grid.xs.edge_lines(), grid.ys.edge_lines());
    if vx.is_empty() && hy.is_empty() {
        return None;
    }
    // which columns and rows lie in a band, decided once per axis
    let in_band = |lines: &[u32], n: u32| -> Vec<bool> {
        (0..n)
            .map(|p| {
                lines
                    .iter()
                    .any(|&l| p + SEAM_BAND >= l && p < l + SEAM_BAND)
            })
            .collect()
    };
    let (columns, rows) = (in_band(&vx, w - 1), in_band(&hy, h - 1));
    let (mut all, mut n_all, mut band, mut n_band) = (0.0f64, 0u64, 0.0f64, 0u64);
    for y in 0..h - 1 {
        for x in 0..w - 1 {
            let p = img.get_pixel(x, y).0;
            let r = img.get_pixel(x + 1, y).0;
            let d = img.get_pixel(x, y + 1).0;
            let g: f64 = (0..3)
                .map(|c| {
                    f64::from((i16::from(r[c]) - i16::from(p[c])).abs())
                        + f64::from((i16::from(d[c]) - i16::from(p[c])).abs())
                })
                .sum::<f64>()
                / 3.0;
            all += g;
            n_all += 1;
            if columns[x as usize] || rows[y as usize] {
                band += g;
                n_band += 1;
            }
        }
    }
    if n_band == 0 || all == 0.0 {
        return None;
    }
    Some((band / n_band as f64) / (all / n_all as f64))
}

/// `params` with the number of scales a tiled render uses: enough that the first scale's longest side is at
/// most the tile size, and at least `params.scales`.
pub fn pyramid_params(params: &RenderParams, tiling: Tiling) -> Result<RenderParams, Error> {
    // a stored job's limits: a new job's tiling is checked (Tiling::validate) by JobSpec::expand
    tiling.validate_stored()?;
    // the size, and the scales asked for, checked here as a single job's are (else a tile size would be
    // blamed)
    params.check_range("size")?;
    params.check_range("scales")?;
    let mut scales = 1u32;
    while params.size.div_ceil(1 << (scales - 1)) > tiling.tile_size {
        scales += 1;
    }
    let scales = scales.max(params.scales);
    if scales > MAX_SCALES {
        return Err(Error::invalid(
            "tile_size",
            format!(
                "size {} with tiles of {} needs {scales} scales, more than {MAX_SCALES}",
                params.size, tiling.tile_size
            ),
        ));
    }
    let listed = params.scale_iterations.len();
    if listed > 0 && listed != scales as usize && scales > params.scales {
        // raised from the scales asked for: say why, rather than count the values against a number the
        // user did not give
        let asked = match params.scales {
            1 => String::new(),
            n => format!(", not the {n} asked for"),
        };
        return Err(Error::invalid(
            "scale_iterations",
            format!(
                "has {listed} values, and a tiled job of size {} in tiles of {} has {scales} scales (its \
                 first scale at most one tile{asked}): give {scales} values",
                params.size, tiling.tile_size
            ),
        ));
    }
    let pyramid = RenderParams {
        scales,
        ..params.clone()
    };
    // scales asked for beyond what the tile size needs can round the first canvas down to nothing
    if pyramid.sizes_per_scale()[0] == 0 {
        return Err(Error::invalid(
            "scales",
            format!(
                "{scales} scales from size {} make the first scale 0 px",
                params.size
            ),
        ));
    }
    Ok(pyramid)
}

/// One scale of a tiled render.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalePlan {
    /// The canvas at this scale.
    pub width: u32,
    /// The canvas' height at this scale, in px.
    pub height: u32,
    /// Iterations of this scale's render (each tile's, for a later scale).
    pub iterations: u32,
    /// `None` for the first scale, rendered whole as one task.
    pub grid: Option<TileGrid>,
}

impl ScalePlan {
    /// The canvas' longest side, in px: the scale's `size`.
    pub fn longest(&self) -> u32 {
        self.width.max(self.height)
    }

    /// Number of tasks of the scale: its tiles, or 1 for the first scale.
    pub fn tasks(&self) -> usize {
        self.grid.as_ref().map_or(1, TileGrid::len)
    }
}

/// The scales of a tiled render of a `content_width` x `content_height` content image: enough scales that
/// the first one's longest side is at most the tile size (at least `params.scales`), each later one twice
/// the previous, up to `params.size`. Cheap for any size: it only computes tile positions.
pub fn plan(
    content_width: u32,
    content_height: u32,
    params: &RenderParams,
    tiling: Tiling,
) -> Result<Vec<ScalePlan>, Error> {
    let params = pyramid_params(params, tiling)?;
    let plans = params
        .sizes_per_scale()
        .into_iter()
        .zip(params.iterations_per_scale())
        .enumerate()
        .map(|(s, (longest, iterations))| {
            let (width, height) = imaging::working_size(content_width, content_height, longest);
            ScalePlan {
                width,
                height,
                iterations,
                grid: (s > 0).then(|| tiling.grid(width, height)),
            }
        })
        .collect();
    Ok(plans)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job that gives no overlap is valid at every tile size a user may fix: 128 px by default, half
    /// the tile under 256 px (128-px tiles were refused, naming an overlap the user had not given).
    #[test]
    fn the_default_overlap_fits_every_tile_size() {
        assert_eq!(default_overlap(None), DEFAULT_OVERLAP);
        assert_eq!(default_overlap(Some(512)), 128);
        assert_eq!(default_overlap(Some(128)), 64);
        for tile_size in MIN_TILE_SIZE..=MAX_TILE_SIZE {
            let tiling = Tiling::new(Some(tile_size), default_overlap(Some(tile_size)), false);
            assert!(
                tiling.validate().is_ok(),
                "{tile_size}: {:?}",
                tiling.validate()
            );
        }
    }

    const GIB: u64 = 1 << 30;

    /// Shards are bands of whole block rows that cover the canvas in order, each at least twice the halo
    /// tall (so a row is in at most two shards' regions); fewer where the canvas is too short.
    #[test]
    fn shards_are_bands_of_block_rows_at_least_two_halos_tall() {
        for (height, block, shards) in [(576, 256, 2), (576, 256, 3), (1000, 128, 7), (250, 128, 4)]
        {
            let halo = objective_halo(block);
            let step = block_step(block, halo);
            let bands = shard_rows(height, block, shards);
            assert!(!bands.is_empty() && bands.len() <= shards as usize);
            assert_eq!((bands[0].0, bands[bands.len() - 1].1), (0, height));
            for w in bands.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
            for &(a, b) in &bands {
                assert!(a % step == 0 && b > a, "{height}/{block}: {bands:?}");
                assert!(
                    bands.len() == 1 || b - a >= 2 * halo,
                    "{height}/{block}: {bands:?}"
                );
            }
        }
        // 576 px in 256-px blocks: 32 px of halo, block rows of 192 px; two shards of 384 and 192 rows
        assert_eq!(shard_rows(576, 256, 2), vec![(0, 192), (192, 576)]);
        assert_eq!(shard_rows(576, 256, 3).len(), 3);
        // a canvas of one block row is one shard
        assert_eq!(shard_rows(100, 256, 4), vec![(0, 100)]);
        // 250 px in 128-px blocks: rows of 64 px, the last 58: four bands would leave one under 64 px
        assert!(shard_rows(250, 128, 4).len() < 4);
    }

    /// Exact scales are sharded with several workers, with either optimizer; a planned block is made
    /// smaller until every worker gets a shard (not below the job's tile size); a fixed one is kept.
    #[test]
    fn exact_scales_are_shared_by_the_workers() {
        let fixed = Tiling::new(Some(128), 64, true);
        assert_eq!(
            fixed.exact_shards(192, 2, 128),
            (128, vec![(0, 64), (64, 192)])
        );
        assert_eq!(fixed.exact_shards(192, 1, 128).1, vec![(0, 192)]);
        let not_exact = Tiling::new(Some(128), 64, false);
        assert_eq!(not_exact.exact_shards(192, 2, 128).1, vec![(0, 192)]);
        // planned: a 3072-px canvas that fits one device whole (block 4096) over 4 workers
        let planned = Tiling::new(None, 128, true);
        let (block, bands) = planned.exact_shards(3072, 4, 4096);
        assert_eq!(bands.len(), 4, "block {block}: {bands:?}");
        assert!(block < 4096 && block >= planned.tile_size);
    }

    #[test]
    fn the_planner_renders_a_scale_whole_where_it_fits_and_sizes_tiles_from_memory_and_workers() {
        let params = RenderParams::default(); // L-BFGS, history 100: 4.9 KB a pixel
        let planned = Tiling::default();
        assert_eq!(planned.sizing, TileSizing::Planned);
        let size = |w, h, workers: &[u64]| planned.scale_tile_size(w, h, &params, workers, None);
        // no worker said how much memory it has: the job's tile size
        assert_eq!(size(4096, 3072, &[]), 512);
        assert_eq!(size(4096, 3072, &[0, 0]), 512);
        // an H200 (143 GB): 4096 x 3072 (62 GB estimated) renders whole
        let h200 = 143_000_000_000;
        assert_eq!(size(4096, 3072, &[h200]), 4096);
        // 8192 x 6144 does not: the largest tiles that fit (capped at MAX_TILE_SIZE)
        let t = size(8192, 6144, &[h200]);
        assert_eq!(t, MAX_TILE_SIZE);
        assert_eq!(
            TileGrid::new(
                8192,
                6144,
                Tiling {
                    tile_size: t,
                    ..planned
                }
            )
            .len(),
            6
        );
        // eight of them: smaller tiles, at least one each
        let t8 = size(8192, 6144, &[h200; 8]);
        assert!(t8 < t && t8 % 64 == 0, "{t8}");
        let grid = TileGrid::new(
            8192,
            6144,
            Tiling {
                tile_size: t8,
                ..planned
            },
        );
        assert!(grid.len() >= 8, "{} tiles of {t8}", grid.len());
        let t7 = TileGrid::new(
            8192,
            6144,
            Tiling {
                tile_size: t8 + 64,
                ..planned
            },
        );
        assert!(t7.len() < 8, "the largest tiles that give every worker one");
        // a 16 GiB device: tiles that fit it, the smallest device of a mixed farm deciding
        let small = size(4096, 3072, &[16 * GIB]);
        assert!(
            memory::render_bytes(small, small, &params) <= memory::usable_bytes(16 * GIB)
                && memory::render_bytes(small + 64, small + 64, &params)
                    > memory::usable_bytes(16 * GIB),
            "{small}"
        );
        assert_eq!(size(4096, 3072, &[h200, 16 * GIB, 0]), small);
        // never below the job's tile size, even on a device too small for it
        assert_eq!(size(4096, 3072, &[3 * GIB]), 512);
        // Adam needs less than L-BFGS's history: larger tiles on the same device
        let adam = RenderParams {
            optimizer: crate::Optimizer::Adam,
            ..params.clone()
        };
        assert!(planned.scale_tile_size(4096, 3072, &adam, &[16 * GIB], None) > small);
        // --tile-size fixes it
        let fixed = Tiling {
            tile_size: 256,
            sizing: TileSizing::Fixed,
            ..planned
        };
        assert_eq!(
            fixed.scale_tile_size(4096, 3072, &params, &[h200], None),
            256
        );
    }

    #[test]
    fn the_planner_sizes_exact_mode_blocks_beside_the_canvas_state() {
        let params = RenderParams::default();
        let exact = Tiling {
            exact: true,
            ..Tiling::default()
        };
        // fits: the whole canvas in one block
        assert_eq!(
            exact.scale_tile_size(2048, 1536, &params, &[143 * GIB], None),
            2048
        );
        // does not: the largest block beside the canvas' optimizer state (2.4 KB a pixel here)
        let b = exact.scale_tile_size(4096, 3072, &params, &[48 * GIB], None);
        assert!(b > 512 && b < 4096, "{b}");
        let budget = memory::usable_bytes(48 * GIB);
        assert!(memory::blocked_render_bytes(4096, 3072, b, &params) <= budget);
        assert!(memory::blocked_render_bytes(4096, 3072, b + 64, &params) > budget);
    }

    #[test]
    fn tiles_that_ran_out_of_memory_are_planned_smaller_down_to_the_job_s_tile_size() {
        // three quarters of the side, a multiple of 64 px
        assert_eq!(max_tile_after_out_of_memory(4096), 3072);
        assert_eq!(max_tile_after_out_of_memory(768), 576);
        assert_eq!(max_tile_after_out_of_memory(600), 448);
        let params = RenderParams::default();
        let h200 = 143_000_000_000;
        for exact in [false, true] {
            let planned = Tiling {
                exact,
                ..Tiling::default()
            };
            let size = |max| planned.scale_tile_size(4096, 3072, &params, &[h200], max);
            // the whole canvas fits the device, not the tile that ran out
            assert_eq!(size(None), 4096);
            assert_eq!(size(Some(3072)), 3072);
            assert_eq!(size(Some(1000)), 960);
            // never below the job's tile size
            assert_eq!(size(Some(100)), planned.tile_size);
        }
        // a smaller canvas than the limit: whole, as before
        assert_eq!(
            Tiling::default().scale_tile_size(768, 576, &params, &[h200], Some(3072)),
            768
        );
        // a fixed tile size is the user's: kept
        let fixed = Tiling::new(Some(1024), 128, false);
        assert_eq!(
            fixed.scale_tile_size(4096, 3072, &params, &[h200], Some(512)),
            1024
        );
    }

    fn check_axis(len: u32, tile: u32, overlap: u32) {
        let a = AxisPlan::new(len, tile, overlap);
        assert_eq!(a.extent, tile.min(len), "{len}/{tile}");
        assert_eq!(a.starts[0], 0);
        assert_eq!(a.starts.last().unwrap() + a.extent, len, "edge-aligned");
        for pair in a.starts.windows(2) {
            assert!(pair[0] < pair[1], "{:?}", a.starts);
            assert!(
                pair[0] + a.extent >= pair[1] + overlap,
                "overlap < {overlap}: {len}/{tile} {:?}",
                a.starts
            );
        }
        // every coordinate is covered, and the normalized weights sum to 1 there
        let mut sum = vec![0.0f64; len as usize];
        let mut covered = vec![0u32; len as usize];
        for i in 0..a.count() {
            for (k, w) in a.weights(i).into_iter().enumerate() {
                assert!((0.0..=1.0).contains(&w));
                sum[a.starts[i] as usize + k] += f64::from(w);
                covered[a.starts[i] as usize + k] += 1;
            }
        }
        assert!(covered.iter().all(|&c| c >= 1));
        for (p, s) in sum.iter().enumerate() {
            assert!((s - 1.0).abs() < 1e-5, "{len}/{tile}: sum {s} at {p}");
        }
        // weight 1 on the canvas border, ~0 at an inner tile edge
        assert!((a.weights(0)[0] - 1.0).abs() < 1e-6);
        if a.count() > 1 {
            assert!(a.weights(1)[0] < 0.01);
        }
    }

    #[test]
    fn plans_cover_the_canvas_with_full_size_tiles() {
        for len in [
            1, 2, 7, 97, 127, 128, 129, 255, 256, 257, 509, 512, 521, 1000, 1031, 2048, 8191,
        ] {
            for (tile, overlap) in [(128, 32), (256, 64), (256, 128), (512, 128), (500, 250)] {
                check_axis(len, tile, overlap);
            }
        }
    }

    #[test]
    fn plans_refuse_an_empty_canvas() {
        let tiling = Tiling::default();
        let at = |size, scales| {
            let params = RenderParams {
                size,
                scales,
                ..Default::default()
            };
            plan(800, 600, &params, tiling).map(|p| p.len())
        };
        assert!(at(0, 1).unwrap_err().to_string().starts_with("size:"));
        // 1 px in 4 scales: 0, 0, 1, 1 px; a tiled later scale of 0 px once failed an assertion
        assert!(at(1, 4).unwrap_err().to_string().starts_with("scales:"));
        assert_eq!(at(1, 1).unwrap(), 1);
    }

    #[test]
    fn grid_weights_sum_to_one_everywhere() {
        // a prime-sized canvas, a one-row canvas, one smaller than a tile
        for (w, h) in [(521, 331), (1031, 100), (97, 61)] {
            let grid = TileGrid::new(
                w,
                h,
                Tiling {
                    tile_size: 256,
                    overlap: 64,
                    exact: false,
                    sizing: TileSizing::Fixed,
                },
            );
            let mut sum = vec![0.0f64; (w * h) as usize];
            for (i, r) in grid.tiles().enumerate() {
                assert!(r.x + r.width <= w && r.y + r.height <= h);
                assert_eq!((r.width, r.height), (256.min(w), 256.min(h)));
                let wx = grid.xs.weights(i % grid.columns());
                let wy = grid.ys.weights(i / grid.columns());
                for (ty, a) in wy.iter().enumerate() {
                    for (tx, b) in wx.iter().enumerate() {
                        sum[((r.y + ty as u32) * w + r.x + tx as u32) as usize] += f64::from(a * b);
                    }
                }
            }
            assert!(sum.iter().all(|s| (s - 1.0).abs() < 1e-5), "{w}x{h}");
        }
    }

    fn gradient_image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([
                ((x * 7 + y * 3) % 256) as u8,
                ((x * x + y) % 251) as u8,
                ((x ^ y) % 256) as u8,
            ])
        })
    }

    #[test]
    fn stitching_crops_of_one_image_gives_it_back() {
        let (w, h) = (523, 301);
        let img = gradient_image(w, h);
        let grid = TileGrid::new(
            w,
            h,
            Tiling {
                tile_size: 200,
                overlap: 50,
                exact: false,
                sizing: TileSizing::Fixed,
            },
        );
        assert!(grid.len() > 4);
        let out = grid
            .stitch(|i| {
                let r = grid.tile(i);
                Ok::<_, StitchError>(
                    image::imageops::crop_imm(&img, r.x, r.y, r.width, r.height).to_image(),
                )
            })
            .unwrap();
        assert_eq!(out, img);
        let bad = grid.stitch(|_| Ok::<_, StitchError>(RgbImage::new(3, 3)));
        assert!(bad.unwrap_err().to_string().contains("plan says"));
    }

    #[test]
    fn seams_show_in_the_measure() {
        let (w, h) = (400, 400);
        let tiling = Tiling {
            tile_size: 200,
            overlap: 50,
            exact: false,
            sizing: TileSizing::Fixed,
        };
        let grid = TileGrid::new(w, h, tiling);
        // smooth noise-free ramp: no seam
        let smooth = RgbImage::from_fn(w, h, |x, y| Rgb([(x / 2) as u8, (y / 2) as u8, 100]));
        let m = seam_measure(&smooth, &grid).unwrap();
        assert!((m - 1.0).abs() < 0.02, "{m}");
        // every other tile brighter in blue: pasted with hard edges, a seam at every edge line ...
        let tile_of = |i: usize| {
            let r = grid.tile(i);
            RgbImage::from_fn(r.width, r.height, |x, y| {
                let p = smooth.get_pixel(r.x + x, r.y + y).0;
                Rgb([p[0], p[1], p[2] + 40 * (i as u8 % 2)])
            })
        };
        let mut hard = smooth.clone();
        for i in 0..grid.len() {
            let r = grid.tile(i);
            image::imageops::replace(&mut hard, &tile_of(i), i64::from(r.x), i64::from(r.y));
        }
        let hard_m = seam_measure(&hard, &grid).unwrap();
        assert!(hard_m > 1.5, "{hard_m}");
        // ... feathered, the step is spread over the overlap
        let feathered = grid.stitch(|i| Ok::<_, StitchError>(tile_of(i))).unwrap();
        let feathered_m = seam_measure(&feathered, &grid).unwrap();
        assert!(feathered_m < hard_m, "{feathered_m} vs {hard_m}");
        let single = TileGrid::new(100, 100, tiling);
        assert_eq!(seam_measure(&gradient_image(100, 100), &single), None);
    }

    /// Per-scale iterations counted against the scales the user asked for, where the tile size raised
    /// them, are refused saying so (was: "has 2 values for 3 scales", after --scales 2).
    #[test]
    fn scale_iterations_for_scales_a_tile_size_raised_say_why() {
        let params = RenderParams {
            size: 1100,
            scales: 2,
            scale_iterations: vec![1, 1],
            ..Default::default()
        };
        let e = pyramid_params(&params, Tiling::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("scale_iterations:")
                && e.contains("has 3 scales")
                && e.contains("2 asked"),
            "{e}"
        );
        let three = RenderParams {
            scale_iterations: vec![1, 1, 1],
            ..params
        };
        assert_eq!(pyramid_params(&three, Tiling::default()).unwrap().scales, 3);
    }

    #[test]
    fn pyramids_start_within_a_tile() {
        let params = RenderParams {
            size: 8192,
            ..Default::default()
        };
        let t = std::time::Instant::now();
        let plans = plan(4000, 3000, &params, Tiling::default()).unwrap();
        assert!(t.elapsed().as_millis() < 500);
        assert_eq!(plans.len(), 5);
        assert_eq!((plans[0].width, plans[0].height), (512, 384));
        assert!(plans[0].grid.is_none());
        let last = plans.last().unwrap();
        assert_eq!((last.width, last.height), (8192, 6144));
        let grid = last.grid.as_ref().unwrap();
        assert_eq!((grid.xs.count(), grid.ys.count()), (21, 16));
        assert_eq!(
            plans.iter().map(|p| p.iterations).collect::<Vec<_>>(),
            [500, 250, 125, 62, 31]
        );
        // 8192 x 8192: 5 scales, 21 x 21 tiles at the last
        let square = plan(1000, 1000, &params, Tiling::default()).unwrap();
        let grid = square[4].grid.as_ref().unwrap();
        assert_eq!(
            (square[4].width, square[4].height, grid.len()),
            (8192, 8192, 441)
        );
        assert!(grid.tiles().all(|r| r.x + 512 <= 8192 && r.y + 512 <= 8192));
        // within one tile: a single scale, a single task
        let small = RenderParams {
            size: 300,
            ..Default::default()
        };
        let p = plan(640, 480, &small, Tiling::default()).unwrap();
        assert_eq!((p.len(), p[0].tasks()), (1, 1));
        let huge = RenderParams {
            size: 16_384,
            ..Default::default()
        };
        // 128-px tiles (the least) reach 16384 px in 8 scales (the most); smaller ones are refused
        let err = plan(
            10,
            10,
            &huge,
            Tiling {
                tile_size: MIN_TILE_SIZE / 2,
                overlap: MIN_OVERLAP / 2,
                exact: false,
                sizing: TileSizing::Fixed,
            },
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("tile_size"), "{err}");
        let err = plan(
            10,
            10,
            &params,
            Tiling {
                tile_size: 512,
                overlap: 300,
                exact: false,
                sizing: TileSizing::Fixed,
            },
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("overlap"), "{err}");
        // the scales asked for are checked as a single job's, not blamed on the tile size
        for scales in [0, MAX_SCALES + 1] {
            let asked = RenderParams {
                scales,
                ..params.clone()
            };
            let err = plan(10, 10, &asked, Tiling::default()).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("scales: must be between 1 and {MAX_SCALES}, got {scales}")
            );
        }
    }
}
