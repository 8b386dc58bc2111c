//! `stylefarm seams IMAGE --tile-size T --overlap O`: how visible the tile grid of a tiled render is.
//!
//! The measure (stylefarm_core::tiling::seam_measure): the mean absolute pixel gradient in bands of ±2 px
//! around every inner tile edge line of the grid a tiled job with these settings uses for an output of this
//! image's size, over the mean absolute gradient of the whole image. 1.0: the edges look like anywhere else.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use stylefarm_core::imaging;
use stylefarm_core::tiling::{self, TileGrid, TileSizing, Tiling};

#[derive(Args)]
pub(crate) struct SeamsArgs {
    /// The stitched output of a tiled render.
    image: PathBuf,
    /// The tile size the render used.
    #[arg(long, default_value_t = tiling::DEFAULT_TILE_SIZE)]
    tile_size: u32,
    /// The overlap the render used. Default: a job's without --overlap (128, or half a tile size under
    /// 256).
    #[arg(long)]
    overlap: Option<u32>,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: SeamsArgs) -> anyhow::Result<()> {
    let tiling = Tiling {
        tile_size: args.tile_size,
        overlap: args
            .overlap
            .unwrap_or_else(|| tiling::default_overlap(Some(args.tile_size))),
        exact: false,
        sizing: TileSizing::Fixed,
    };
    tiling.validate()?;
    let img = imaging::load(&args.image)?;
    let (w, h) = img.dimensions();
    let grid = TileGrid::new(w, h, tiling);
    let lines = (grid.xs.edge_lines().len(), grid.ys.edge_lines().len());
    let measure = tiling::seam_measure(&img, &grid).with_context(|| match grid.len() {
        1 => format!(
            "{}: a {w}x{h} image is one {}-px tile: no tile edges to measure",
            args.image.display(),
            args.tile_size
        ),
        _ => format!(
            "{}: the image is flat (no gradient anywhere): no seam to measure against it",
            args.image.display()
        ),
    })?;
    if args.json {
        let json = serde_json::json!({
            "image": args.image.display().to_string(),
            "width": w,
            "height": h,
            "tiles": grid.len(),
            "vertical_lines": lines.0,
            "horizontal_lines": lines.1,
            "seam_measure": (measure * 1e4).round() / 1e4,
        });
        outln!("{json}");
    } else {
        outln!(
            "{}: {w}x{h}, {} tiles ({} vertical and {} horizontal edge lines): seam measure {measure:.4}",
            args.image.display(),
            grid.len(),
            lines.0,
            lines.1
        );
    }
    Ok(())
}
