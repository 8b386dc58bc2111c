//! A sweep's contact sheet: its results side by side in a grid, each labelled with its parameters in a
//! bitmap font built into the binary (embedded-graphics' X11 misc-fixed; the coordinator needs no font
//! files).

use embedded_graphics::mono_font::{iso_8859_1::FONT_8X13, MonoFont, MonoTextStyle};
use embedded_graphics::pixelcolor::Rgb888;
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Point, RgbColor, Size};
use embedded_graphics::text::{Baseline, Text};
use embedded_graphics::{Drawable, Pixel};
use image::{Rgb, RgbImage};

use crate::Error;

/// The labels' font: X11's 8x13 misc-fixed, its Latin-1 glyphs (embedded-graphics'; a character it lacks
/// is drawn as `?`).
const FONT: MonoFont<'static> = FONT_8X13;
/// A character's advance, px.
const GLYPH_W: u32 = FONT.character_size.width + FONT.character_spacing;
/// A line of label, px: the font's height and 2 px between lines.
const LINE_H: u32 = FONT.character_size.height + 2;
const PAD: u32 = 8;

/// An image to draw text on ([`draw_text`]): what embedded-graphics draws into.
struct Canvas<'a>(&'a mut RgbImage);

impl OriginDimensions for Canvas<'_> {
    fn size(&self) -> Size {
        Size::new(self.0.width(), self.0.height())
    }
}

impl DrawTarget for Canvas<'_> {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I>(&mut self, pixels: I) -> Result<(), Self::Error>
    where
        I: IntoIterator<Item = Pixel<Rgb888>>,
    {
        for Pixel(at, color) in pixels {
            // clipped to the image
            if let (Ok(x), Ok(y)) = (u32::try_from(at.x), u32::try_from(at.y)) {
                if x < self.0.width() && y < self.0.height() {
                    self.0
                        .put_pixel(x, y, Rgb([color.r(), color.g(), color.b()]));
                }
            }
        }
        Ok(())
    }
}

/// Draws `text` in black with its top left at (x, y), clipped to the image.
fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32) {
    // none of it shows (embedded-graphics' positions are i32, and overflow past i32::MAX)
    let (Ok(x), Ok(y)) = (i32::try_from(x), i32::try_from(y)) else {
        return;
    };
    if x.unsigned_abs() >= img.width() || y.unsigned_abs() >= img.height() {
        return;
    }
    let at = Point::new(x, y);
    let style = MonoTextStyle::new(&FONT, Rgb888::BLACK);
    let Ok(_) = Text::with_baseline(text, at, style, Baseline::Top).draw(&mut Canvas(img));
}

/// The longest side of a contact sheet, in pixels (RGB: 201 MB at most). A sweep of many points gets
/// smaller cells: its thumbnails are scaled down (aspect kept) and its labels wrap sooner. A sheet of 9
/// points of 512 px is 1568 px wide; one of 10,000 points ([`stylefarm_core::job::MAX_TASKS_PER_JOB`])
/// has 100 x 100 cells 73 px wide.
pub(crate) const MAX_SHEET_SIDE: u32 = 8192;

/// Most lines of a label under its thumbnail: a longer label ends in `..`.
const MAX_LABEL_LINES: usize = 4;

/// Splits a label into lines of `width` pixels at most: at spaces, and a word longer than a line in
/// pieces; at most `max_lines` (at least one), the last ending in `..` when the label goes on.
fn wrap(label: &str, width: u32, max_lines: usize) -> Vec<String> {
    let per_line = (width / GLYPH_W).max(1) as usize;
    let max_lines = max_lines.max(1);
    let mut lines: Vec<String> = Vec::new();
    let pieces = label.split(' ').flat_map(|word| {
        let chars: Vec<char> = word.chars().collect();
        let pieces: Vec<String> = chars.chunks(per_line).map(|c| c.iter().collect()).collect();
        pieces
    });
    for piece in pieces {
        let len = piece.chars().count();
        match lines.last_mut() {
            Some(line) if line.chars().count() + 1 + len <= per_line => {
                line.push(' ');
                line.push_str(&piece);
            }
            _ => lines.push(piece),
        }
    }
    if lines.len() > max_lines {
        lines.truncate(max_lines);
        let last = &mut lines[max_lines - 1];
        let keep = per_line.saturating_sub(2).min(last.chars().count());
        *last = last
            .chars()
            .take(keep)
            .chain("..".chars())
            .take(per_line)
            .collect();
    }
    lines
}

/// Where a contact sheet's cells go: `cols` x `rows` cells of `cell_w` px, each a result of at most
/// `cell_w` x `thumb_h` px above at most `lines` lines of label.
#[derive(Debug, PartialEq)]
struct Layout {
    cols: u32,
    rows: u32,
    cell_w: u32,
    thumb_h: u32,
    lines: usize,
    width: u32,
    height: u32,
}

impl Layout {
    /// The layout of `cells` (each result's width, height and label) with no side over `max_side` px:
    /// cells as wide as the widest result and the longest word of a label, and results as tall as the
    /// tallest, as far as the side allows; labels take as many lines as they need up to
    /// [`MAX_LABEL_LINES`], as far as a row leaves room for a result at least 1 px tall.
    fn of(max_side: u32, cells: &[(u32, u32, String)]) -> Result<Layout, Error> {
        let n = u32::try_from(cells.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::Internal(format!("a contact sheet of {} tiles", cells.len())))?;
        let cols = (f64::from(n)).sqrt().ceil() as u32;
        let rows = n.div_ceil(cols);
        let longest_word = cells
            .iter()
            .flat_map(|(_, _, l)| l.split(' '))
            .map(|w| u32::try_from(w.chars().count()).unwrap_or(u32::MAX))
            .max()
            .unwrap_or(0);
        let widest = cells.iter().map(|c| c.0).max().unwrap_or(1);
        let cell_w = widest
            .max(GLYPH_W.saturating_mul(longest_word.max(8)))
            .min((max_side.saturating_sub(PAD) / cols).saturating_sub(PAD))
            .max(1);
        // a row: its result, PAD, its lines of label, PAD below
        let row_h = max_side.saturating_sub(PAD) / rows;
        let room = (row_h.saturating_sub(2 * PAD + 1) / LINE_H) as usize;
        let lines = cells
            .iter()
            .map(|(_, _, l)| wrap(l, cell_w, room.min(MAX_LABEL_LINES)).len())
            .max()
            .unwrap_or(1);
        let under = PAD + lines as u32 * LINE_H;
        let tallest = cells.iter().map(|c| c.1).max().unwrap_or(1);
        let thumb_h = tallest.min(row_h.saturating_sub(PAD + under)).max(1);
        let (width, height) = (
            u64::from(cols) * u64::from(cell_w + PAD) + u64::from(PAD),
            u64::from(rows) * u64::from(thumb_h + under + PAD) + u64::from(PAD),
        );
        if width.max(height) > u64::from(max_side) {
            return Err(Error::Internal(format!(
                "a contact sheet of {n} tiles would be {width}x{height} px: more than {max_side}"
            )));
        }
        Ok(Layout {
            cols,
            rows,
            cell_w,
            thumb_h,
            lines,
            width: width as u32,
            height: height as u32,
        })
    }
}

/// The grid of a sweep's results (about square), each with its label under it, as PNG bytes; no side
/// longer than [`MAX_SHEET_SIDE`]. `cells` gives each result's width, height and label; `image(i)` decodes
/// result `i` (once, in order: one result is in memory at a time, besides the sheet).
pub(crate) fn contact_sheet(
    cells: &[(u32, u32, String)],
    image: impl FnMut(usize) -> Result<RgbImage, Error>,
) -> Result<Vec<u8>, Error> {
    sheet_within(MAX_SHEET_SIDE, cells, image)
}

/// [`contact_sheet`] with no side longer than `max_side` px.
fn sheet_within(
    max_side: u32,
    cells: &[(u32, u32, String)],
    mut image: impl FnMut(usize) -> Result<RgbImage, Error>,
) -> Result<Vec<u8>, Error> {
    let Layout {
        cols,
        cell_w,
        thumb_h,
        lines,
        width,
        height,
        ..
    } = Layout::of(max_side, cells)?;
    let cell_h = thumb_h + PAD + lines as u32 * LINE_H;
    let mut sheet = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (i, (_, _, label)) in cells.iter().enumerate() {
        let (x, y) = (
            PAD + (i as u32 % cols) * (cell_w + PAD),
            PAD + (i as u32 / cols) * (cell_h + PAD),
        );
        let mut tile = image(i)?;
        if tile.width() > cell_w || tile.height() > thumb_h {
            // scaled to fit its cell, its aspect kept
            let scale = (f64::from(cell_w) / f64::from(tile.width()))
                .min(f64::from(thumb_h) / f64::from(tile.height()));
            let w = ((f64::from(tile.width()) * scale).round() as u32).clamp(1, cell_w);
            let h = ((f64::from(tile.height()) * scale).round() as u32).clamp(1, thumb_h);
            tile = image::imageops::thumbnail(&tile, w, h);
        }
        image::imageops::overlay(&mut sheet, &tile, i64::from(x), i64::from(y));
        for (n, line) in wrap(label, cell_w, lines).iter().enumerate() {
            draw_text(
                &mut sheet,
                line,
                x,
                y + tile.height() + PAD / 2 + n as u32 * LINE_H,
            );
        }
    }
    let mut png = Vec::new();
    sheet
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Internal(format!("encoding the contact sheet: {e}")))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sheet_places_every_tile_and_draws_labels() {
        let red = RgbImage::from_pixel(40, 30, Rgb([255, 0, 0]));
        let blue = RgbImage::from_pixel(40, 30, Rgb([0, 0, 255]));
        let tiles = [red, blue.clone(), blue];
        let labels = ["style_weight=10", "seed=1", "seed=2"];
        let cells: Vec<_> = labels.iter().map(|l| (40, 30, l.to_string())).collect();
        let png = contact_sheet(&cells, |i| Ok(tiles[i].clone())).unwrap();
        let sheet = image::load_from_memory(&png).unwrap().to_rgb8();
        let cell_w = GLYPH_W * 15; // the width of "style_weight=10"
        assert_eq!(
            sheet.width(),
            2 * (cell_w + PAD) + PAD,
            "2 columns for 3 tiles"
        );
        assert_eq!(*sheet.get_pixel(PAD + 1, PAD + 1), Rgb([255, 0, 0]));
        assert_eq!(
            *sheet.get_pixel(PAD + cell_w + PAD + 1, PAD + 1),
            Rgb([0, 0, 255])
        );
        let dark = sheet.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(dark > 100, "labels are drawn ({dark} black pixels)");
        assert!(contact_sheet(&[], |_| unreachable!()).is_err());
    }

    /// A sweep's sheet stays within its bound ([`MAX_SHEET_SIDE`]; 1024 px here, for a quick test),
    /// whatever its results' sizes, their number and their labels' length: its results are scaled down
    /// (aspect kept) and long labels cut.
    #[test]
    fn sheet_of_many_large_results_with_long_labels_keeps_its_bounds() {
        let long = format!("seed={}1", "0".repeat(100_000));
        let mut cells = vec![(400, 200, long); 3];
        cells.extend((0..13).map(|i| (400, 200, format!("style_weight={i}"))));
        let result = RgbImage::from_pixel(400, 200, Rgb([0, 128, 0]));
        let mut decoded = Vec::new();
        let png = sheet_within(1024, &cells, |i| {
            decoded.push(i);
            Ok(result.clone())
        })
        .unwrap();
        assert_eq!(
            decoded,
            (0..16).collect::<Vec<_>>(),
            "each decoded once, in order"
        );
        let sheet = image::load_from_memory(&png).unwrap().to_rgb8();
        // 4 x 4 cells of 246 px, under each result 4 lines of label: each result scaled to 246 x 123
        let cell_w = (1024 - PAD) / 4 - PAD;
        assert_eq!(cell_w, 246);
        assert_eq!(sheet.width(), 4 * (cell_w + PAD) + PAD);
        assert!(sheet.height() <= 1024, "{}", sheet.height());
        let green = |x: u32, y: u32| *sheet.get_pixel(x, y) == Rgb([0, 128, 0]);
        assert!(green(PAD, PAD) && green(PAD + 245, PAD + 122));
        assert!(!green(PAD + 246, PAD) && !green(PAD, PAD + 124));
    }

    /// The largest sweep (10,000 points, 100 x 100 cells 73 px wide) fits the side: its labels get the
    /// lines a row leaves room for (3 of 15 px, under results 20 px tall: 8108 x 8108 px); a layout that
    /// gave each label the lines it needs made the sheet too tall, and the sweep failed at it.
    #[test]
    fn the_largest_sweep_s_sheet_fits_its_side() {
        let cells = vec![(512, 512, "style_weight=100 seed=2".to_string()); 10_000];
        let layout = Layout::of(MAX_SHEET_SIDE, &cells).unwrap();
        assert_eq!(
            layout,
            Layout {
                cols: 100,
                rows: 100,
                cell_w: 73,
                thumb_h: 20,
                lines: 3,
                width: 8108,
                height: 8108,
            }
        );
        // fewer points: wider cells (19 characters a line: 2 lines) and taller results
        let layout = Layout::of(MAX_SHEET_SIDE, &cells[..2_500]).unwrap();
        assert_eq!((layout.cell_w, layout.lines, layout.thumb_h), (155, 2, 117));
        assert!(layout.height <= MAX_SHEET_SIDE);
    }

    /// Each character of a sweep's labels (its parameters' names and values) and of a failed or
    /// cancelled variant's state has a glyph of its own, not the `?` drawn for the others; so have
    /// upper case and Latin-1's letters.
    #[test]
    fn every_character_of_a_label_has_a_glyph() {
        let index = |c: char| FONT.glyph_mapping.index(c);
        let unknown = index('\u{1}');
        assert_eq!(unknown, index('?'));
        let labels = "abcdefghijklmnopqrstuvwxyz_ 0123456789.,:=-+ seed=2 (failed) (cancelled) \
                      [1/2] 50% ABCXYZ éèüñß";
        for c in labels.chars() {
            assert_ne!(index(c), unknown, "{c:?} is drawn as `?`");
        }
        assert_eq!(index('→'), unknown);
    }

    /// A label is drawn in its font's glyphs: lower case is not upper case, and text past the image's
    /// edge is clipped.
    #[test]
    fn labels_are_drawn_in_the_font_clipped_to_the_image() {
        let drawn = |text: &str| {
            let mut img = RgbImage::from_pixel(GLYPH_W, LINE_H, Rgb([255, 255, 255]));
            draw_text(&mut img, text, 0, 0);
            img
        };
        assert_ne!(drawn("a"), drawn("A"));
        assert!(drawn("a").pixels().any(|p| p.0 == [0, 0, 0]));
        assert_eq!(
            drawn("ab"),
            drawn("ac"),
            "the second character is past the edge"
        );
        let mut img = RgbImage::from_pixel(4, 4, Rgb([255, 255, 255]));
        draw_text(&mut img, "seed=1", u32::MAX, u32::MAX);
        draw_text(&mut img, "seed=1", 3, 3);
    }

    #[test]
    fn labels_wrap_at_spaces_and_long_words_in_pieces() {
        assert_eq!(
            wrap("style_weight=10 seed=1", GLYPH_W * 16, MAX_LABEL_LINES),
            ["style_weight=10", "seed=1"]
        );
        assert_eq!(wrap("a b", GLYPH_W * 16, MAX_LABEL_LINES), ["a b"]);
        // a word longer than a line is cut in pieces; a label longer than 4 lines ends in ".."
        assert_eq!(
            wrap("seed=12345678", GLYPH_W * 5, MAX_LABEL_LINES),
            ["seed=", "12345", "678"]
        );
        assert_eq!(
            wrap(&"x".repeat(100), GLYPH_W * 5, MAX_LABEL_LINES),
            ["xxxxx", "xxxxx", "xxxxx", "xxx.."]
        );
    }
}
