//! A tile of a tiled job's scale, as the engine renders it (ALGORITHM.md, "Tiled rendering of large
//! images"): its inputs cut from the canvas, and its style targets.
//!
//! - [`tile_job`]: the content and the init (the previous scale's stitched result) resampled to the canvas
//!   over the tile's window only ([`imaging::resize_window`]: the pixels of resizing the whole canvas and
//!   cutting, for the work and memory of the tile), the style targets sized for the canvas;
//! - [`Engine::canvas_grams`] and [`Engine::tile_style_grams`]: a tile matches the style's Gram matrices in
//!   aggregate, not alone. Its target is the global Gram plus the tile's own deviation from the whole canvas
//!   at the start of the scale (the coarser scale was rendered whole, so that deviation is the painting's
//!   local character): `A + G(tile at start) - G(canvas at start)`, whose average over the tiles is `A`.

use image::RgbImage;
use stylefarm_core::job::{ScalePart, ScaleTask};
use stylefarm_core::{imaging, RenderParams};

use crate::engine::Engine;
use crate::objective::blocked::target_block;
use crate::objective::StyleGrams;
use crate::render::RenderJob;
use crate::shard::{Shard, SharedExchange};
use crate::Error;

/// A task of a tiled job's later scale, prepared for the engine.
pub struct ScaleRender {
    /// The render of the task's region: its window of the canvas, or the whole canvas with its objective
    /// evaluated in blocks of the job's tile size (exact mode).
    pub job: RenderJob,
    /// Side in px of the blocks the style targets (the style's and the canvas' Gram matrices, no gradient)
    /// are computed in: [`target_block`] of the job's tile size, within the tile's memory.
    pub target_block: u32,
    /// For a tile smaller than its canvas, the canvas' width and height: the tile's style targets are offset
    /// by the canvas' Gram matrices at the start of the scale ([`Engine::canvas_grams`],
    /// [`Engine::tile_style_grams`]). `None` for the whole canvas, and with
    /// [`RenderParams::global_style_targets`] (the style's Grams alone).
    pub canvas: Option<(u32, u32)>,
}

/// The render of one task of a canvas: `content` and `init` (the previous scale's result) resampled to the
/// canvas over the task's window (a shard's: its region, [`Shard::region`]); one scale of the window's size;
/// the style targets those of the whole canvas (`style_longest`), `styles` as the render takes them
/// ([`crate::render::styles_for`] of the whole content: luminance-only transfer and colour matching match
/// them to the whole content, not to the window; a worker does that once per content). A shard adds up its
/// evaluations with the other shards through `exchange`. An error names `tile` (a canvas that is not the
/// content's at that size),
/// `init` (none given) or `shard` (a shard without an exchange).
pub fn tile_job(
    content: &RgbImage,
    styles: Vec<RgbImage>,
    init: Option<&RgbImage>,
    mut params: RenderParams,
    tile: &ScaleTask,
    exchange: Option<SharedExchange>,
) -> Result<ScaleRender, stylefarm_core::Error> {
    let (cw, ch) = (tile.canvas_width, tile.canvas_height);
    let (w, h) = imaging::working_size(content.width(), content.height(), cw.max(ch));
    if (w, h) != (cw, ch) {
        return Err(stylefarm_core::Error::invalid(
            "tile",
            format!(
                "canvas {cw}x{ch} does not match the content's {w}x{h} at size {}",
                cw.max(ch)
            ),
        ));
    }
    let init = init.ok_or_else(|| {
        stylefarm_core::Error::invalid(
            "init",
            "a tile needs the previous scale's image as its init",
        )
    })?;
    let r = tile.rect();
    let shard = match tile.part {
        ScalePart::Shard { .. } => Some(Shard {
            canvas: (cw, ch),
            rows: (r.y, r.y + r.height),
            exchange: exchange.ok_or_else(|| {
                stylefarm_core::Error::invalid("shard", "a shard needs an exchange with the others")
            })?,
        }),
        _ => None,
    };
    let window = match &shard {
        Some(s) => {
            let (y0, y1) = s.region(tile.block());
            (0, y0, cw, y1 - y0)
        }
        None => (r.x, r.y, r.width, r.height),
    };
    let r = stylefarm_core::tiling::Rect {
        x: window.0,
        y: window.1,
        width: window.2,
        height: window.3,
    };
    params.size = r.width.max(r.height);
    params.scales = 1;
    params.scale_iterations.clear();
    let job = RenderJob {
        style_longest: Some(cw.max(ch)),
        ..RenderJob::with_styles(
            imaging::resize_window(content, (cw, ch), window)?,
            styles,
            Some(imaging::resize_window(init, (cw, ch), window)?),
            params,
        )
    };
    Ok(match tile.part {
        ScalePart::Whole { block } | ScalePart::Shard { block, .. } => ScaleRender {
            job: RenderJob {
                block: Some(block),
                shard,
                ..job
            },
            target_block: target_block(block),
            canvas: None,
        },
        ScalePart::Tile { tile_size, .. } => ScaleRender {
            canvas: ((r.width, r.height) != (cw, ch) && !job.params.global_style_targets)
                .then_some((cw, ch)),
            job,
            target_block: target_block(tile_size),
        },
    })
}

/// `params` for the Gram matrices of one image alone (no style blend): a canvas or a tile.
fn alone(params: &RenderParams) -> RenderParams {
    RenderParams {
        style_blend: Vec::new(),
        ..params.clone()
    }
}

impl Engine {
    /// The Gram matrices of a canvas at the start of its scale: `previous` (the coarser scale's result)
    /// resized to `width` x `height`, run through the network in blocks of at most `block` px. Once per
    /// scale (callers cache it): it costs the canvas, not a tile.
    pub fn canvas_grams(
        &self,
        previous: &RgbImage,
        (width, height): (u32, u32),
        params: &RenderParams,
        block: Option<u32>,
    ) -> Result<StyleGrams, Error> {
        let canvas = imaging::resize(previous, width, height);
        self.style_grams(&[canvas], width.max(height), &alone(params), block)
    }

    /// The style targets of a tile: `global + G(tile_init) - canvas`, layer by layer, with `global` the
    /// style's Gram matrices at the canvas' style side, `canvas` [`Self::canvas_grams`] and `tile_init` the
    /// tile's own start (its init image).
    pub fn tile_style_grams(
        &self,
        global: &StyleGrams,
        canvas: &StyleGrams,
        tile_init: &RgbImage,
        params: &RenderParams,
    ) -> Result<StyleGrams, Error> {
        let own = self.style_grams(
            std::slice::from_ref(tile_init),
            tile_init.width().max(tile_init.height()),
            &alone(params),
            None,
        )?;
        Ok(global.offset(&own, canvas))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stylefarm_core::tiling::Rect;

    /// A tile's targets are offset by its canvas' Grams, unless the job asks for the global targets alone;
    /// its inputs are its window of the canvas either way.
    #[test]
    fn a_tile_is_offset_by_its_canvas_unless_the_targets_are_global() {
        let content = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]));
        let previous = RgbImage::from_pixel(32, 24, image::Rgb([120, 110, 100]));
        let task = ScaleTask {
            scale: 1,
            scales: 2,
            canvas_width: 64,
            canvas_height: 48,
            part: ScalePart::Tile {
                index: 0,
                tiles: 2,
                rect: Rect {
                    x: 0,
                    y: 0,
                    width: 40,
                    height: 48,
                },
                tile_size: 40,
            },
        };
        let cut = |global_style_targets| {
            let params = RenderParams {
                global_style_targets,
                ..Default::default()
            };
            tile_job(
                &content,
                vec![previous.clone()],
                Some(&previous),
                params,
                &task,
                None,
            )
            .unwrap()
        };
        let (offset, global) = (cut(false), cut(true));
        assert_eq!(offset.canvas, Some((64, 48)));
        assert_eq!(global.canvas, None);
        assert_eq!(offset.job.content, global.job.content);
        assert_eq!(global.job.content.dimensions(), (40, 48));
    }
}
