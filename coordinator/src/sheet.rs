//! A sweep's contact sheet: its results side by side in a grid, each labelled with its parameters in a small
//! built-in bitmap font (so the coordinator needs no font files).

use image::{Rgb, RgbImage};

use crate::Error;

/// 5x7 glyphs, one byte a row, the low 5 bits left to right.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        'x' | '*' => [0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00],
        ' ' => [0; 7],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

const SCALE: u32 = 2;
const GLYPH_W: u32 = 6 * SCALE; // 5 columns and a space
const LINE_H: u32 = 9 * SCALE;
const PAD: u32 = 8;

/// Draws `text` at (x, y), clipped to the image.
fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, color: Rgb<u8>) {
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        for (row, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        let (px, py) = (
                            x + i as u32 * GLYPH_W + col * SCALE + dx,
                            y + row as u32 * SCALE + dy,
                        );
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, color);
                        }
                    }
                }
            }
        }
    }
}

/// Splits a label into lines that fit `width` pixels, at spaces.
fn wrap(label: &str, width: u32) -> Vec<String> {
    let per_line = (width / GLYPH_W).max(1) as usize;
    let mut lines: Vec<String> = Vec::new();
    for word in label.split(' ') {
        match lines.last_mut() {
            Some(line) if line.len() + 1 + word.len() <= per_line => {
                line.push(' ');
                line.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

/// The grid of `tiles` (about square), each with its label under it, as PNG bytes.
pub(crate) fn contact_sheet(tiles: &[(RgbImage, String)]) -> Result<Vec<u8>, Error> {
    if tiles.is_empty() {
        return Err(Error::Internal("a contact sheet of no tiles".into()));
    }
    let cols = (tiles.len() as f64).sqrt().ceil() as u32;
    let rows = (tiles.len() as u32).div_ceil(cols);
    // wide enough for the tiles and for the longest word of any label (labels wrap only at spaces)
    let longest_word = tiles
        .iter()
        .flat_map(|(_, l)| l.split(' '))
        .map(|w| w.chars().count() as u32)
        .max();
    let cell_w = tiles
        .iter()
        .map(|(t, _)| t.width())
        .max()
        .unwrap_or(1)
        .max(GLYPH_W * longest_word.unwrap_or(0).max(8));
    let label_lines = tiles
        .iter()
        .map(|(_, l)| wrap(l, cell_w).len() as u32)
        .max()
        .unwrap_or(1);
    let cell_h =
        tiles.iter().map(|(t, _)| t.height()).max().unwrap_or(1) + PAD + label_lines * LINE_H;
    let mut sheet = RgbImage::from_pixel(
        cols * (cell_w + PAD) + PAD,
        rows * (cell_h + PAD) + PAD,
        Rgb([255, 255, 255]),
    );
    for (i, (tile, label)) in tiles.iter().enumerate() {
        let (x, y) = (
            PAD + (i as u32 % cols) * (cell_w + PAD),
            PAD + (i as u32 / cols) * (cell_h + PAD),
        );
        image::imageops::overlay(&mut sheet, tile, i64::from(x), i64::from(y));
        for (n, line) in wrap(label, cell_w).iter().enumerate() {
            draw_text(
                &mut sheet,
                line,
                x,
                y + tile.height() + PAD / 2 + n as u32 * LINE_H,
                Rgb([0, 0, 0]),
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
        let tiles = vec![
            (red, "style_weight=10".to_string()),
            (blue.clone(), "seed=1".into()),
            (blue, "seed=2".into()),
        ];
        let png = contact_sheet(&tiles).unwrap();
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
        assert!(contact_sheet(&[]).is_err());
    }

    #[test]
    fn labels_wrap_at_spaces() {
        assert_eq!(
            wrap("style_weight=10 seed=1", GLYPH_W * 16),
            ["style_weight=10", "seed=1"]
        );
        assert_eq!(wrap("a b", GLYPH_W * 16), ["a b"]);
    }
}
