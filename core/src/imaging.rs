//! Images in and out: decoding with limits, encoding by extension, working sizes, resampling, colour.

use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{ImageFormat, ImageReader, Limits, RgbImage};

use crate::Error;

/// Largest width or height of an image the project decodes.
pub const MAX_IMAGE_SIDE: u32 = 32_768;
/// Most bytes a decoder may allocate for one image.
pub const MAX_IMAGE_BYTES: u64 = 2 << 30;

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    limits
}

/// Decodes an image (PNG or JPEG, recognized by content) from bytes into 8-bit RGB; `name` is for errors.
pub fn decode(bytes: &[u8], name: &str) -> Result<RgbImage, Error> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::image(name, e))?;
    if reader.format().is_none() {
        return Err(Error::image(name, "not an image (unknown format)"));
    }
    reader.limits(limits());
    let img = reader
        .decode()
        .map_err(|e| Error::image(name, format!("cannot decode image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::image(name, "image has zero width or height"));
    }
    Ok(img.to_rgb8())
}

/// Reads and decodes an image file into 8-bit RGB.
pub fn load(path: &Path) -> Result<RgbImage, Error> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::image(path.display(), format!("cannot read: {e}")))?;
    decode(&bytes, &path.display().to_string())
}

/// The format an output path asks for, by its extension.
pub fn output_format(path: &Path) -> Result<ImageFormat, Error> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(ImageFormat::Jpeg),
        _ => Err(Error::invalid(
            "output",
            format!("{}: extension must be .png, .jpg or .jpeg", path.display()),
        )),
    }
}

/// Writes an image, PNG or JPEG (quality 95) by the path's extension, through a temporary file so that a
/// failed write leaves no partial output.
pub fn save(img: &RgbImage, path: &Path) -> Result<(), Error> {
    let format = output_format(path)?;
    let mut bytes = Vec::new();
    match format {
        ImageFormat::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95);
            img.write_with_encoder(enc)
        }
        _ => img.write_to(&mut Cursor::new(&mut bytes), format),
    }
    .map_err(|e| Error::image(path.display(), format!("cannot encode: {e}")))?;
    let tmp = path.with_extension(format!(
        "partial.{}",
        path.extension().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::image(path.display(), format!("cannot write: {e}"))
        })
}

/// The size of an image of `width` x `height` scaled so that its longest side is `longest`, keeping the
/// aspect ratio (the short side rounded, at least 1).
pub fn working_size(width: u32, height: u32, longest: u32) -> (u32, u32) {
    let scale = |side: u32, other: u32| {
        ((side as f64) * (longest as f64) / (other as f64))
            .round()
            .max(1.0) as u32
    };
    if width >= height {
        (longest, scale(height, width))
    } else {
        (scale(width, height), longest)
    }
}

/// Resamples to exactly `width` x `height` with an antialiased Lanczos3 filter; an image already at that size
/// is returned as it is, not resampled.
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    image::imageops::resize(img, width, height, FilterType::Lanczos3)
}

/// Resizes so that the longest side is `longest` (see [`working_size`] and [`resize`]).
pub fn resize_longest(img: &RgbImage, longest: u32) -> RgbImage {
    let (w, h) = working_size(img.width(), img.height(), longest);
    resize(img, w, h)
}

fn to_ycbcr(p: [u8; 3]) -> [f64; 3] {
    let [r, g, b] = p.map(f64::from);
    let y = 0.299 * r + 0.587 * g + 0.114 * b;
    [
        y,
        128.0 - 0.168_736 * r - 0.331_264 * g + 0.5 * b,
        128.0 + 0.5 * r - 0.418_688 * g - 0.081_312 * b,
    ]
}

fn from_ycbcr([y, cb, cr]: [f64; 3]) -> [u8; 3] {
    let (cb, cr) = (cb - 128.0, cr - 128.0);
    [
        y + 1.402 * cr,
        y - 0.344_136 * cb - 0.714_136 * cr,
        y + 1.772 * cb,
    ]
    .map(|v| v.round().clamp(0.0, 255.0) as u8)
}

/// jcjohnson's `-original_colors 1`: the luminance (Y of full-range BT.601 YCbCr) of `stylized` with the
/// chroma (Cb, Cr) of `content`, which is resized to the output's size first.
pub fn original_colors(stylized: &RgbImage, content: &RgbImage) -> RgbImage {
    let content = resize(content, stylized.width(), stylized.height());
    RgbImage::from_fn(stylized.width(), stylized.height(), |x, y| {
        let [luma, _, _] = to_ycbcr(stylized.get_pixel(x, y).0);
        let [_, cb, cr] = to_ycbcr(content.get_pixel(x, y).0);
        image::Rgb(from_ycbcr([luma, cb, cr]))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_size_keeps_aspect() {
        assert_eq!(working_size(1024, 768, 512), (512, 384));
        assert_eq!(working_size(451, 300, 128), (128, 85));
        assert_eq!(working_size(300, 451, 128), (85, 128));
        assert_eq!(working_size(5000, 1, 100), (100, 1));
    }

    #[test]
    fn resize_at_size_is_identity() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]));
        assert_eq!(resize(&img, 7, 5), img);
        assert_eq!(resize_longest(&img, 7), img);
        assert_eq!(resize_longest(&img, 14).dimensions(), (14, 10));
    }

    #[test]
    fn decode_rejects_garbage_and_names_the_file() {
        let err = decode(b"definitely not an image", "x.png")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.png"), "{err}");
        let mut png = Vec::new();
        RgbImage::new(4, 4)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        png.truncate(png.len() / 2);
        assert!(decode(&png, "half.png").is_err());
    }

    #[test]
    fn save_and_load_round_trip_png_and_refuse_unknown_extension() {
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(6, 3, |x, y| image::Rgb([x as u8, y as u8, 200]));
        let path = dir.path().join("a.png");
        save(&img, &path).unwrap();
        assert_eq!(load(&path).unwrap(), img);
        save(&img, &dir.path().join("a.JPG")).unwrap();
        assert!(save(&img, &dir.path().join("a.bmp"))
            .unwrap_err()
            .to_string()
            .starts_with("output"));
        assert!(load(&dir.path().join("missing.png")).is_err());
    }

    #[test]
    fn original_colors_keep_luminance_and_chroma() {
        // moderate colours, so that no channel clips when luminance and chroma are recombined
        let stylized = RgbImage::from_fn(8, 8, |x, _| {
            image::Rgb([90 + x as u8 * 8, 120, 150 - x as u8 * 6])
        });
        let content = RgbImage::from_fn(8, 8, |_, y| image::Rgb([140, 100 + y as u8 * 6, 110]));
        let out = original_colors(&stylized, &content);
        for (x, y, p) in out.enumerate_pixels() {
            let (o, s, c) = (
                to_ycbcr(p.0),
                to_ycbcr(stylized.get_pixel(x, y).0),
                to_ycbcr(content.get_pixel(x, y).0),
            );
            assert!((o[0] - s[0]).abs() < 1.0, "luma {o:?} vs stylized {s:?}");
            assert!(
                (o[1] - c[1]).abs() < 1.5 && (o[2] - c[2]).abs() < 1.5,
                "chroma {o:?} vs content {c:?}"
            );
        }
    }
}
