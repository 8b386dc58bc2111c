//! Images in and out: decoding with limits (PNG, JPEG, WebP, TIFF, BMP, GIF), EXIF orientation, transparency
//! composited over white, header-only dimensions, encoding by extension (PNG, JPEG, TIFF; 8 or 16 bits per
//! channel), working sizes, resampling, colour.

use std::fmt;
use std::io::{BufRead, Cursor, Seek};
use std::path::Path;
use std::str::FromStr;

use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{
    ColorType, DynamicImage, GrayImage, ImageBuffer, ImageDecoder, ImageFormat, ImageReader,
    Limits, Luma, Rgb, Rgb32FImage, RgbImage, Rgba,
};

use crate::Error;

/// Largest width or height of an image the project decodes.
pub const MAX_IMAGE_SIDE: u32 = 32_768;
/// Most bytes a decoder may allocate for one image.
pub const MAX_IMAGE_BYTES: u64 = 2 << 30;
/// Largest encoded image file the farm takes: a file a client uploads or `render` reads, a worker's
/// result.
pub const MAX_ENCODED_BYTES: usize = 512 << 20;
/// Most pixels an image may have (16,384 x 16,384): a header may declare far more than its bytes hold (a
/// 100-byte GIF can declare 10,000 x 28,000), and decoding, orienting and compositing such an image takes
/// several times its size in memory.
pub const MAX_IMAGE_PIXELS: u64 = 1 << 28;

fn limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_BYTES);
    limits
}

/// What a decoder may allocate past two copies of the image it decodes ([`decode_full`]).
const DECODE_SLACK_BYTES: u64 = 16 << 20;

/// Whether a TIFF's first image is stored in JPEG-compressed strips (compression 6, old-style, or 7); false
/// when its tags cannot be read (the decoder then says why).
fn tiff_of_jpeg_strips(bytes: &[u8]) -> bool {
    let Ok(mut tiff) = tiff::decoder::Decoder::new(Cursor::new(bytes)) else {
        return false;
    };
    matches!(
        tiff.find_tag_unsigned::<u16>(tiff::tags::Tag::Compression),
        Ok(Some(6 | 7))
    )
}

/// The (width, height) in the header of the lossy (VP8) frame that the WebP decoder decodes for an extended
/// WebP, and the size it must have, when they differ: the canvas of a still image, the frame's own for an
/// animation's first frame. The decoder decodes such a frame whole (up to 16383 x 16383, about 400 MB)
/// before it compares the sizes (or, after an alpha chunk, never does), and the limits taken from the
/// canvas do not reach it. The frame is found as image-webp 0.2 finds it: by the VP8X animation flag, the
/// first `ANMF` chunk or the first `VP8 ` chunk (of the whole file: the decoder looks a little past the
/// RIFF data's end); in an `ANMF`, its first chunk, or the one after an `ALPH`, whatever its name, read
/// from the file (not bounded by the ANMF); the VP8X's 10 bytes whatever size it says; a chunk's payload
/// cut short at the end of the file, as the decoder reads it. A still image with both a lossless and a
/// lossy frame is looked at too (it is malformed). `None` when they agree, or when the file is no
/// extended WebP or its frame cannot be found (the decoder then fails).
fn webp_lossy_frame_mismatch(bytes: &[u8]) -> Option<((u32, u32), (u32, u32))> {
    // (fourcc, where its payload starts in `data`, the payload) of each chunk of `data` from `at`, a payload
    // cut short at the end of `data`
    fn chunks(data: &[u8], mut at: usize) -> impl Iterator<Item = (&[u8], usize, &[u8])> {
        std::iter::from_fn(move || {
            let header = data.get(at..at.checked_add(8)?)?;
            let size = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
            let start = at + 8;
            let payload = &data[start..start.saturating_add(size).min(data.len())];
            at = start.saturating_add(size).saturating_add(size & 1);
            Some((&header[..4], start, payload))
        })
    }
    // a 24-bit side less one, as VP8X and ANMF store them
    let side = |b: &[u8]| Some(u32::from_le_bytes([*b.first()?, *b.get(1)?, *b.get(2)?, 0]) + 1);
    // the size in a VP8 frame's header: a 3-byte frame tag, the start code, then 14 bits each
    let vp8_size = |payload: &[u8]| {
        let b = payload.get(6..10)?;
        let side = |lo: u8, hi: u8| u32::from(u16::from_le_bytes([lo, hi]) & 0x3FFF);
        Some((side(b[0], b[1]), side(b[2], b[3])))
    };
    if bytes.get(..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WEBP") {
        return None;
    }
    let mut top = chunks(bytes, 12);
    let (b"VP8X", ..) = top.next()? else {
        return None;
    };
    // the decoder reads the VP8X's 10 bytes whatever size the chunk says it has
    let vp8x = bytes.get(20..30)?;
    let animated = vp8x[0] & 2 != 0;
    let (bitstream, expected) = if animated {
        let (_, start, anmf) = top.find(|(c, ..)| *c == b"ANMF")?;
        let own = (side(anmf.get(6..)?)?, side(anmf.get(9..)?)?);
        // the frame's chunks as the decoder reads them: from the file, not bounded by the ANMF's size
        let mut frame = chunks(bytes, start.checked_add(16)?);
        match frame.next()? {
            (b"VP8 ", _, bitstream) => (bitstream, own),
            (b"ALPH", ..) => (frame.next()?.2, own),
            _ => return None,
        }
    } else {
        let canvas = (side(&vp8x[4..])?, side(&vp8x[7..])?);
        (top.find(|(c, ..)| *c == b"VP8 ")?.2, canvas)
    };
    let frame = vp8_size(bitstream)?;
    (frame != expected).then_some((frame, expected))
}

/// A decoded image as the engine sees it, and its transparency.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The pixels, 8-bit RGB, in the orientation a viewer shows (EXIF orientation applied), transparent
    /// pixels composited over white: `round(a * c + (1 - a) * 255)` per channel, with `a` the alpha in 0..1
    /// (16-bit images are composited in 16 bits, then rounded to 8).
    pub rgb: RgbImage,
    /// The alpha channel in 8 bits (0 transparent, 255 opaque), the same size and orientation as `rgb`;
    /// `None` when the image has no alpha channel or every pixel of it is opaque (255 once in 8 bits).
    pub alpha: Option<GrayImage>,
}

/// The decoder's error for image `name`: "cannot decode image: ...", saying for a pixel format it does not
/// take (a 32-bit grayscale float TIFF: "the color type `Unknown(32)`") which ones it does.
fn cannot_decode(name: &str, e: image::ImageError) -> Error {
    use image::error::{ImageError, UnsupportedErrorKind};
    match &e {
        ImageError::Unsupported(u) if matches!(u.kind(), UnsupportedErrorKind::Color(_)) => Error::image(
            name,
            format!(
                "cannot decode image: its pixel format is not one that is read ({e}); save it as 8- or \
                 16-bit RGB, RGBA or grayscale"
            ),
        ),
        _ => Error::image(name, format!("cannot decode image: {e}")),
    }
}

/// A decoder for `reader` with the project's limits on it (side and allocation; a larger image is an error
/// here, before any pixel is decoded), its format, and the orientation its metadata asks for.
fn open<'a, R: BufRead + Seek + 'a>(
    reader: R,
    name: &str,
) -> Result<(impl ImageDecoder + 'a, ImageFormat, Orientation), Error> {
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|e| Error::image(name, e))?;
    let Some(format) = reader.format() else {
        let empty = reader.into_inner().fill_buf().is_ok_and(|b| b.is_empty());
        let why = match empty {
            true => "not an image: the file is empty (0 bytes)",
            false => "not an image (unknown format)",
        };
        return Err(Error::image(name, why));
    };
    // the sides checked below, saying them (the decoder's own check says "Image size exceeds limit")
    let mut header_limits = limits();
    (
        header_limits.max_image_width,
        header_limits.max_image_height,
    ) = (None, None);
    reader.limits(header_limits);
    let mut decoder = reader.into_decoder().map_err(|e| match e {
        // a header whose sizes ask the decoder for more than MAX_IMAGE_BYTES as it is read (a PNG's row
        // of 2^31 - 1 px): the decoder says only "Memory limit exceeded"
        image::ImageError::Limits(_) => Error::image(
            name,
            format!(
                "cannot decode image: its header declares an image larger than the farm takes (at most \
                 {MAX_IMAGE_SIDE} px a side and {MAX_IMAGE_PIXELS} pixels)"
            ),
        ),
        e => cannot_decode(name, e),
    })?;
    let (width, height) = decoder.dimensions();
    if width == 0 || height == 0 {
        return Err(Error::image(name, "image has zero width or height"));
    }
    if width.max(height) > MAX_IMAGE_SIDE {
        return Err(Error::image(
            name,
            format!("{width} x {height} px: an image may have at most {MAX_IMAGE_SIDE} px a side"),
        ));
    }
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS {
        return Err(Error::image(
            name,
            format!(
                "{width} x {height} px is more than the {MAX_IMAGE_PIXELS} pixels an image may have"
            ),
        ));
    }
    let orientation = decoder
        .orientation()
        .map_err(|e| Error::image(name, format!("cannot read the orientation: {e}")))?;
    Ok((decoder, format, orientation))
}

/// Whether an orientation turns the image by a quarter, exchanging width and height (EXIF 5-8).
fn swaps_sides(orientation: Orientation) -> bool {
    matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Whether a JPEG stream runs to its end-of-image marker (FF D9). The marker segments are walked from the
/// start of image; the entropy-coded data after each start of scan is skipped (in it, 0xFF is followed only
/// by 0x00 stuffing or a restart marker, so no marker can hide there). Whatever follows the end of image
/// (padding, the video some phones append) is not looked at. The JPEG decoder is lenient: a stream cut
/// short decodes without an error, its missing part grey, so completeness is checked here.
fn jpeg_reaches_eoi(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut i = 2;
    loop {
        // a marker: one or more 0xFF (the extra ones are fill bytes), then its code
        if bytes.get(i) != Some(&0xFF) {
            return false;
        }
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&code) = bytes.get(i) else {
            return false;
        };
        i += 1;
        match code {
            0xD9 => return true,
            0x01 | 0xD0..=0xD7 => continue, // TEM and RSTn stand alone
            _ => {}
        }
        // a segment: its big-endian length counts itself but not the marker
        let Some(&[hi, lo]) = bytes.get(i..i + 2) else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        if len < 2 || i + len > bytes.len() {
            return false;
        }
        i += len;
        if code == 0xDA {
            // entropy-coded data, up to the next marker that is not a restart
            loop {
                let Some(at) = bytes[i..].iter().position(|&b| b == 0xFF) else {
                    return false;
                };
                i += at;
                match bytes.get(i + 1) {
                    Some(0x00 | 0xD0..=0xD7) => i += 2,
                    Some(_) => break,
                    None => return false,
                }
            }
        }
    }
}

/// Splits an image with an alpha channel into its colour composited over white and its alpha, both in 8
/// bits; `max` is the largest sample (255 or 65535) of `pixels`, RGBA in row order.
fn over_white(
    width: u32,
    height: u32,
    pixels: impl Iterator<Item = [u64; 4]>,
    max: u64,
) -> Decoded {
    let to_8 = |v: u64| {
        (if max == 255 {
            v
        } else {
            (v * 255 + max / 2) / max
        }) as u8
    };
    let mut rgb = RgbImage::new(width, height);
    let mut alpha = GrayImage::new(width, height);
    for ((p, out), a_out) in pixels.zip(rgb.pixels_mut()).zip(alpha.pixels_mut()) {
        let a = p[3];
        // a/max * c + (1 - a/max) * max, rounded, in the image's own depth
        let over = |c: u64| (a * c + (max - a) * max + max / 2) / max;
        *out = Rgb([over(p[0]), over(p[1]), over(p[2])].map(to_8));
        *a_out = Luma([to_8(a)]);
    }
    let opaque = alpha.iter().all(|&a| a == 255);
    Decoded {
        rgb,
        alpha: (!opaque).then_some(alpha),
    }
}

/// Decodes an image from bytes: PNG, JPEG, WebP, TIFF (8 or 16 bits), BMP or GIF (its first frame),
/// recognized by content. The result is oriented as a viewer shows it (the EXIF orientation of JPEG, PNG,
/// WebP and TIFF applied, so orientations 5-8 exchange width and height) and composited over white where
/// transparent (see [`Decoded`]). `name` is for errors.
///
/// # Errors
/// [`Error::Image`] naming `name` when the bytes are not an image in one of those formats, are corrupt or cut
/// short (a JPEG without its end-of-image marker included), have a zero side, or exceed [`MAX_IMAGE_SIDE`]
/// or [`MAX_IMAGE_BYTES`].
pub fn decode_full(bytes: &[u8], name: &str) -> Result<Decoded, Error> {
    let (mut decoder, format, orientation) = open(Cursor::new(bytes), name)?;
    if format == ImageFormat::Jpeg && !jpeg_reaches_eoi(bytes) {
        return Err(Error::image(
            name,
            "cannot decode image: truncated JPEG (no end-of-image marker)",
        ));
    }
    if format == ImageFormat::Tiff && tiff_of_jpeg_strips(bytes) {
        return Err(Error::image(
            name,
            "a TIFF of JPEG-compressed strips is not read (their decoder takes each strip's size from \
             its JPEG, not from the TIFF): save it as a PNG, a JPEG, or a TIFF compressed otherwise",
        ));
    }
    if format == ImageFormat::WebP {
        if let Some(((w, h), (cw, ch))) = webp_lossy_frame_mismatch(bytes) {
            return Err(Error::image(
                name,
                format!("cannot decode image: a WebP frame of {w} x {h} where its header declares {cw} x {ch}"),
            ));
        }
    }
    // what the decoder may allocate beyond the image it returns: one more copy (a TIFF's strips are
    // read whole, then copied out) and DECODE_SLACK_BYTES, not the 2 GiB that a header of a few pixels
    // would otherwise let it take (a GIF whose frame is larger than its screen)
    let total = decoder.total_bytes();
    let mut limits = limits();
    limits.max_alloc = Some(
        total
            .saturating_mul(2)
            .saturating_add(DECODE_SLACK_BYTES)
            .min(MAX_IMAGE_BYTES),
    );
    // the image returned is taken off the limit first (refused where it does not fit), then the rest is
    // the decoder's; except TIFF's, which takes its image off the limit itself (image's
    // `TiffDecoder::set_limits`): given what is left, a strip read whole had 16 MiB and a single-strip
    // TIFF past it (uncompressed, as Pillow writes one) was refused as "Memory limit exceeded"
    let mut left = limits.clone();
    left.reserve(total)
        .and_then(|()| match format {
            ImageFormat::Tiff => decoder.set_limits(limits),
            _ => decoder.set_limits(left),
        })
        .map_err(|e| Error::image(name, format!("cannot decode image: {e}")))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| cannot_decode(name, e))?;
    img.apply_orientation(orientation);
    let (width, height) = (img.width(), img.height());
    Ok(match img {
        img if !img.color().has_alpha() => Decoded {
            rgb: img.into_rgb8(),
            alpha: None,
        },
        DynamicImage::ImageLumaA8(_) | DynamicImage::ImageRgba8(_) => {
            let rgba = img.into_rgba8();
            over_white(
                width,
                height,
                rgba.pixels().map(|p| p.0.map(u64::from)),
                255,
            )
        }
        // 16-bit (and floating-point) images with alpha: composited in 16 bits
        img => {
            let rgba = img.into_rgba16();
            over_white(
                width,
                height,
                rgba.pixels().map(|p| p.0.map(u64::from)),
                65_535,
            )
        }
    })
}

/// Decodes an image from bytes into 8-bit RGB, oriented and composited over white: [`decode_full`] without
/// the alpha channel.
pub fn decode(bytes: &[u8], name: &str) -> Result<RgbImage, Error> {
    decode_full(bytes, name).map(|d| d.rgb)
}

/// Reads and decodes an image file (see [`decode_full`]); errors name the path.
pub fn load_full(path: &Path) -> Result<Decoded, Error> {
    decode_full(&read_image_file(path)?, &path.display().to_string())
}

/// The bytes of the image file at `path`, refused before they are read when it is not a regular file (a
/// FIFO or `/dev/zero` would block or fill the memory) or is larger than [`MAX_ENCODED_BYTES`].
///
/// # Errors
/// [`Error::Image`] naming `path`: it cannot be read, is not a regular file, or is too large.
pub fn read_image_file(path: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let fail = |message: String| Error::image(path.display(), message);
    // looked at before it is opened: opening a FIFO waits for a writer
    let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    let file = std::fs::File::open(path).map_err(|e| fail(format!("cannot read: {e}")))?;
    let too_large = || {
        fail(format!(
            "larger than {} MiB, the most an image file may be",
            MAX_ENCODED_BYTES >> 20
        ))
    };
    if meta.len() > MAX_ENCODED_BYTES as u64 {
        return Err(too_large());
    }
    // a file that grows meanwhile is read to the limit and no further
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_ENCODED_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read: {e}")))?;
    if bytes.len() > MAX_ENCODED_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Reads and decodes an image file into 8-bit RGB, oriented and composited over white (see [`decode_full`]).
pub fn load(path: &Path) -> Result<RgbImage, Error> {
    load_full(path).map(|d| d.rgb)
}

/// What an image's header says, read before any pixel is decoded ([`header`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The width of the image that [`decode`] gives, px: the stored size, exchanged for EXIF orientations
    /// 5-8.
    pub width: u32,
    /// Its height, px.
    pub height: u32,
    /// Whether it has an alpha channel (palette transparency included).
    pub alpha: bool,
    /// The most bytes [`decode_full`] holds at once to decode it ([`decode_peak_bytes`]).
    pub decode_bytes: u64,
}

/// The most bytes [`decode_full`] holds at once for an image of `pixels` pixels stored as `color`: two
/// copies of its pixels as stored (the decoder's buffer, and its strips read whole or an oriented copy),
/// and the 16-bit RGBA, 8-bit RGB and alpha made from them (12 bytes a pixel). Measured: a 4096 x 4096
/// float RGBA TIFF (16 bytes a pixel as stored) peaked at 516 MB, 31 bytes a pixel (44 counted).
pub fn decode_peak_bytes(pixels: u64, color: ColorType) -> u64 {
    pixels.saturating_mul(2 * u64::from(color.bytes_per_pixel()) + 12)
}

/// What `reader`'s header says about the image [`decode`] gives for it. No pixel is decoded (the JPEG
/// decoder does read the whole stream into memory, its header parsed only).
///
/// # Errors
/// [`Error::Image`] naming `name` when the header is not one of a supported format, is corrupt, gives a zero
/// side or a side over [`MAX_IMAGE_SIDE`].
pub fn header<R: BufRead + Seek>(reader: R, name: &str) -> Result<Header, Error> {
    let (decoder, _, orientation) = open(reader, name)?;
    let (stored_width, stored_height) = decoder.dimensions();
    let (width, height) = if swaps_sides(orientation) {
        (stored_height, stored_width)
    } else {
        (stored_width, stored_height)
    };
    let color = decoder.color_type();
    Ok(Header {
        width,
        height,
        alpha: color.has_alpha(),
        decode_bytes: decode_peak_bytes(u64::from(width) * u64::from(height), color),
    })
}

/// The (width, height) of the image that [`decode`] gives for `reader`'s content ([`header`]).
///
/// # Errors
/// Those of [`header`].
pub fn dimensions<R: BufRead + Seek>(reader: R, name: &str) -> Result<(u32, u32), Error> {
    header(reader, name).map(|h| (h.width, h.height))
}

/// Bits per channel of a written image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum OutputDepth {
    /// 8 bits per channel (PNG, TIFF, JPEG): `"8"`.
    #[default]
    Eight,
    /// 16 bits per channel (PNG, TIFF; not JPEG): `"16"`.
    Sixteen,
}

impl FromStr for OutputDepth {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "8" => Ok(OutputDepth::Eight),
            "16" => Ok(OutputDepth::Sixteen),
            _ => Err(Error::invalid(
                "output_depth",
                format!("unknown value '{s}' (expected one of: 8, 16)"),
            )),
        }
    }
}

impl fmt::Display for OutputDepth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputDepth::Eight => "8",
            OutputDepth::Sixteen => "16",
        })
    }
}

/// The format an output path asks for, by its extension (case-insensitive): `.png`, `.jpg`/`.jpeg`,
/// `.tif`/`.tiff`.
///
/// # Errors
/// [`Error::Invalid`] on field `output` for any other extension, or none.
pub fn output_format(path: &Path) -> Result<ImageFormat, Error> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("png") => Ok(ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(ImageFormat::Jpeg),
        Some("tif" | "tiff") => Ok(ImageFormat::Tiff),
        _ => Err(Error::invalid(
            "output",
            format!(
                "{}: extension must be .png, .jpg, .jpeg, .tif or .tiff",
                path.display()
            ),
        )),
    }
}

/// Resamples an alpha channel to `width` x `height` like [`resize`] (Lanczos3; unchanged at that size).
fn resize_alpha(alpha: &GrayImage, width: u32, height: u32) -> GrayImage {
    if alpha.dimensions() == (width, height) {
        return alpha.clone();
    }
    image::imageops::resize(alpha, width, height, FilterType::Lanczos3)
}

/// `rgb` with `alpha` as an 8- or 16-bit RGB or RGBA image: `round(v)` or `round(v * 257)` per value,
/// clamped; the alpha as it is, or times 257.
fn quantize(rgb: &Rgb32FImage, alpha: Option<&GrayImage>, depth: OutputDepth) -> DynamicImage {
    let (width, height) = rgb.dimensions();
    let px = |x, y| rgb.get_pixel(x, y).0;
    match (depth, alpha) {
        (OutputDepth::Eight, None) => {
            DynamicImage::ImageRgb8(ImageBuffer::from_fn(width, height, |x, y| {
                Rgb(px(x, y).map(to_u8))
            }))
        }
        (OutputDepth::Eight, Some(alpha)) => {
            DynamicImage::ImageRgba8(ImageBuffer::from_fn(width, height, |x, y| {
                let [r, g, b] = px(x, y).map(to_u8);
                Rgba([r, g, b, alpha.get_pixel(x, y).0[0]])
            }))
        }
        (OutputDepth::Sixteen, None) => {
            DynamicImage::ImageRgb16(ImageBuffer::from_fn(width, height, |x, y| {
                Rgb(px(x, y).map(to_u16))
            }))
        }
        (OutputDepth::Sixteen, Some(alpha)) => {
            DynamicImage::ImageRgba16(ImageBuffer::from_fn(width, height, |x, y| {
                let [r, g, b] = px(x, y).map(to_u16);
                Rgba([r, g, b, u16::from(alpha.get_pixel(x, y).0[0]) * 257])
            }))
        }
    }
}

fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

fn to_u16(v: f32) -> u16 {
    (v * 257.0).round().clamp(0.0, 65_535.0) as u16
}

/// [`encode_output`], errors naming `name`.
fn encode_named(
    rgb: &Rgb32FImage,
    alpha: Option<&GrayImage>,
    depth: OutputDepth,
    format: ImageFormat,
    name: &dyn fmt::Display,
) -> Result<Vec<u8>, Error> {
    let alpha = alpha.map(|a| resize_alpha(a, rgb.width(), rgb.height()));
    let alpha = alpha.as_ref();
    let mut out = Cursor::new(Vec::new());
    match (format, depth) {
        (ImageFormat::Jpeg, OutputDepth::Sixteen) => {
            return Err(Error::invalid(
                "output_depth",
                "16 bits per channel needs a .png or .tif output: JPEG holds 8 bits",
            ))
        }
        (ImageFormat::Jpeg, OutputDepth::Eight) => {
            let img = RgbImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                let a = alpha.map_or(1.0, |a| f32::from(a.get_pixel(x, y).0[0]) / 255.0);
                Rgb(rgb
                    .get_pixel(x, y)
                    .0
                    .map(|v| to_u8(a * v.clamp(0.0, 255.0) + (1.0 - a) * 255.0)))
            });
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
            img.write_with_encoder(enc)
        }
        (ImageFormat::Png | ImageFormat::Tiff, depth) => {
            quantize(rgb, alpha, depth).write_to(&mut out, format)
        }
        (format, _) => {
            return Err(Error::invalid(
                "output",
                format!("{format:?} is not an output format (PNG, JPEG or TIFF)"),
            ))
        }
    }
    .map_err(|e| Error::image(name, format!("cannot encode: {e}")))?;
    Ok(out.into_inner())
}

/// Encodes the engine's result: `rgb` holds values in 0..255 as floats (outside that range clamped),
/// `alpha` (8 bits, 255 opaque) is resampled to `rgb`'s size with Lanczos3 if it differs.
///
/// - 8 bits: each value rounded to a `u8`; 16 bits: `round(v * 257)` as a `u16` (the 8-bit values exactly,
///   and the fractions between them);
/// - PNG and TIFF: RGB, or RGBA with the alpha (times 257 in 16 bits) when there is one;
/// - JPEG (quality 95): 8-bit RGB only; an alpha is composited over white, `a * v + (1 - a) * 255`.
///
/// # Errors
/// [`Error::Invalid`] on `output_depth` for 16-bit JPEG, on `output` for a format other than PNG, JPEG or
/// TIFF; [`Error::Image`] (named `output`) when encoding fails (a zero side).
pub fn encode_output(
    rgb: &Rgb32FImage,
    alpha: Option<&GrayImage>,
    depth: OutputDepth,
    format: ImageFormat,
) -> Result<Vec<u8>, Error> {
    encode_named(rgb, alpha, depth, format, &"output")
}

/// Writes the engine's result (see [`encode_output`]) in the format of the path's extension (see
/// [`output_format`]), through a temporary file so that a failed write leaves no partial output.
///
/// # Errors
/// Those of [`output_format`] and [`encode_output`]; [`Error::Image`] naming the path when it cannot be
/// written.
pub fn save_output(
    rgb: &Rgb32FImage,
    alpha: Option<&GrayImage>,
    depth: OutputDepth,
    path: &Path,
) -> Result<(), Error> {
    let format = output_format(path)?;
    write_whole(
        path,
        &encode_named(rgb, alpha, depth, format, &path.display())?,
    )
}

/// Writes `bytes` to `path` through a temporary file of its own beside it (a new name each time, made
/// with the permissions a new file gets), renamed over `path` once whole: a failed write leaves no
/// partial output, a reader never sees half an image, and two writers of one path do not share a
/// temporary file.
///
/// # Errors
/// [`Error::Image`] naming `path` when it cannot be written.
pub fn write_whole(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let fail = |e: std::io::Error| Error::image(path.display(), format!("cannot write: {e}"));
    let mut tmp = temp_file_in(folder_of(path)).map_err(fail)?;
    // the file's own error: NamedTempFile's adds the temporary file's path, which the user never named
    // ("No space left on device ... at path .stylefarm-GsR1X2.partial")
    tmp.as_file_mut().write_all(bytes).map_err(fail)?;
    tmp.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

/// A new temporary file in `folder` (`.stylefarm-XXXXXX.partial`), with the permissions a file created
/// by `std::fs::write` gets (0666 less the umask), not tempfile's 0600; deleted when dropped unless
/// persisted.
fn temp_file_in(folder: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".stylefarm-")
        .suffix(".partial")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(folder)
}

/// The folder a file path is in (`.` for a bare name).
pub fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// [`check_output`] for a command that writes one image file and no folder (`render`): `output` must have
/// an image extension [`output_format`] takes, and not be a folder.
///
/// # Errors
/// [`Error::Invalid`] on field `output`, naming the path and what is wrong with it.
pub fn check_output_file(output: &Path, inputs: &[&Path]) -> Result<(), Error> {
    output_format(output)?;
    if output.is_dir() {
        return Err(Error::invalid(
            "output",
            format!("{}: is a folder: give an image file name", output.display()),
        ));
    }
    check_output(output, false, inputs)
}

/// Checks, before any work, that a job's results can be written to `output` (`--output`), so that a
/// finished render is not lost to a typo, nor written over what it was made from. A name with an image
/// extension that [`output_format`] takes is one image file, for a job with one result (`several`
/// false): it must not be a folder, its folder must exist and take new files, and it must not be one of
/// `inputs` (the job's content, style and init images). Any other name is a folder (created when
/// missing), which must not be an existing file, must take new files (it, or the folder it will be
/// made in) and must not hold one of `inputs`; a name with another extension (`.webp`, `.jpgg`) is
/// refused rather than made a folder, unless it is an existing folder.
///
/// # Errors
/// [`Error::Invalid`] on field `output`, naming the path and what is wrong with it.
pub fn check_output(output: &Path, several: bool, inputs: &[&Path]) -> Result<(), Error> {
    let bad = |message: String| {
        Err(Error::invalid(
            "output",
            format!("{}: {message}", output.display()),
        ))
    };
    if output_format(output).is_err() {
        if ImageFormat::from_path(output).is_ok() {
            return bad(
                "not an image format stylefarm writes (.png, .jpg, .jpeg, .tif, .tiff), nor a folder name"
                    .into(),
            );
        }
        if output.exists() && !output.is_dir() {
            return bad("exists and is not a folder".into());
        }
        // a mistyped image name (`out.jpgg`) would be made a folder without a word
        if let (Some(extension), false) = (output.extension(), output.is_dir()) {
            return bad(format!(
                ".{} is not an image extension stylefarm writes (.png, .jpg, .jpeg, .tif, .tiff); a \
                 folder it makes is named without an extension (an existing one may have any name)",
                extension.to_string_lossy()
            ));
        }
        // the folder, or the one it will be made in: it must take new files
        let nearest = output
            .ancestors()
            .map(|a| match a.as_os_str().is_empty() {
                true => Path::new("."),
                false => a,
            })
            .find(|a| a.exists());
        if let Some(at) = nearest {
            if !at.is_dir() {
                return bad(format!("{} is not a folder", at.display()));
            }
            if let Err(e) = temp_file_in(at) {
                return bad(format!("cannot write in {}: {e}", at.display()));
            }
        }
        // its results' names (result.png, 000_a_x_s.png, ...) could be an input's, and a folder given as
        // the content would take them for inputs the next time
        if let Ok(out) = output.canonicalize() {
            let in_it = |i: &&&Path| {
                i.canonicalize()
                    .is_ok_and(|i| i.parent() == Some(out.as_path()))
            };
            if let Some(input) = inputs.iter().find(in_it) {
                return bad(format!(
                    "holds one of the job's inputs ({}), which its results could be written over: give \
                     another folder",
                    input.display()
                ));
            }
        }
        return Ok(());
    }
    if several {
        return bad(
            "the job has several results (a batch's images, a sweep's variants and contact sheet, a \
             video's frames): give a folder, not an image file name"
                .into(),
        );
    }
    if output.is_dir() {
        return bad(
            "is a folder: give an image file name, or a folder's name without an image extension"
                .into(),
        );
    }
    let folder = folder_of(output);
    if folder.exists() && !folder.is_dir() {
        return bad(format!("{} is not a folder", folder.display()));
    }
    if !folder.is_dir() {
        return bad(format!("its folder {} does not exist", folder.display()));
    }
    if let Err(e) = temp_file_in(folder) {
        return bad(format!("cannot write in {}: {e}", folder.display()));
    }
    // its own name, which the file system may refuse (longer than 255 bytes, say): made and removed at
    // once, rather than found out after the render
    if !output.exists() {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(output)
        {
            Ok(_) => {
                let _ = std::fs::remove_file(output);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return bad(format!("cannot be written: {e}")),
        }
    }
    if let Ok(out) = output.canonicalize() {
        if let Some(input) = inputs
            .iter()
            .find(|i| i.canonicalize().is_ok_and(|i| i == out))
        {
            return bad(format!(
                "is one of the job's inputs ({}): it would be written over",
                input.display()
            ));
        }
    }
    Ok(())
}

/// Writes an encoded image (e.g. a farm's PNG result; `name` is for errors) in the format of `path`'s
/// extension: PNG bytes as they are, TIFF with the same channels and depth, JPEG over white.
///
/// # Errors
/// Those of [`output_format`] and [`decode_full`]; [`Error::Image`] naming the path when it cannot be
/// encoded or written.
pub fn save_encoded(bytes: &[u8], name: &str, path: &Path) -> Result<(), Error> {
    match output_format(path)? {
        ImageFormat::Png if image::guess_format(bytes).ok() == Some(ImageFormat::Png) => {
            write_whole(path, bytes)
        }
        ImageFormat::Jpeg => save(&decode(bytes, name)?, path),
        format => {
            let (decoder, _, orientation) = open(Cursor::new(bytes), name)?;
            let mut img =
                DynamicImage::from_decoder(decoder).map_err(|e| cannot_decode(name, e))?;
            img.apply_orientation(orientation);
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, format)
                .map_err(|e| Error::image(path.display(), format!("cannot encode: {e}")))?;
            write_whole(path, &out.into_inner())
        }
    }
}

/// An 8-bit RGB image as floats (0..255), as [`encode_output`] takes it.
fn to_f32(img: &RgbImage) -> Rgb32FImage {
    let (width, height) = img.dimensions();
    Rgb32FImage::from_fn(width, height, |x, y| {
        Rgb(img.get_pixel(x, y).0.map(f32::from))
    })
}

/// Writes an 8-bit RGB image, PNG, JPEG (quality 95) or TIFF by the path's extension, through a temporary
/// file (see [`save_output`]).
pub fn save(img: &RgbImage, path: &Path) -> Result<(), Error> {
    save_output(&to_f32(img), None, OutputDepth::Eight, path)
}

/// An 8-bit RGBA PNG of `rgb` with `alpha` (resampled to `rgb`'s size if it differs): a stylized image
/// given its content's cut-out.
pub fn png_with_alpha(rgb: &RgbImage, alpha: &GrayImage) -> Result<Vec<u8>, Error> {
    encode_output(
        &to_f32(rgb),
        Some(alpha),
        OutputDepth::Eight,
        ImageFormat::Png,
    )
}

/// The longer side of a worker's previews of the image it renders, px ([`thumbnail_png`]).
pub const PREVIEW_SIDE: u32 = 256;

/// The engine's image (values in 0..255 as floats) in 8 bits, each value clamped and rounded as an 8-bit
/// output's are ([`encode_output`]).
pub fn eight_bit(rgb: &Rgb32FImage) -> RgbImage {
    let (width, height) = rgb.dimensions();
    RgbImage::from_fn(width, height, |x, y| Rgb(rgb.get_pixel(x, y).0.map(to_u8)))
}

/// An 8-bit PNG of `img` whose longer side is at most `max` px (at least 1), never enlarged, resampled by
/// `image::imageops::thumbnail` (an area average): the status page's thumbnails and a worker's previews.
///
/// # Errors
/// [`Error::Image`] naming `name` when encoding fails.
pub fn thumbnail_png(img: &RgbImage, max: u32, name: &str) -> Result<Vec<u8>, Error> {
    let (w, h) = img.dimensions();
    let scale = (f64::from(max.max(1)) / f64::from(w.max(h).max(1))).min(1.0);
    let (tw, th) = (
        ((f64::from(w) * scale).round() as u32).max(1),
        ((f64::from(h) * scale).round() as u32).max(1),
    );
    let mut out = std::io::Cursor::new(Vec::new());
    let written = if (tw, th) == (w, h) {
        img.write_to(&mut out, ImageFormat::Png)
    } else {
        image::imageops::thumbnail(img, tw, th).write_to(&mut out, ImageFormat::Png)
    };
    written.map_err(|e| Error::image(name, format!("cannot encode a thumbnail: {e}")))?;
    Ok(out.into_inner())
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

/// Resamples to exactly `width` x `height` with an antialiased Lanczos3 filter (`image::imageops::resize`'s
/// pixels); an image already at that size is returned as it is, not resampled. A large one is resampled in
/// bands of rows on the machine's cores ([`resize_bands`]; each band [`resize_window`]'s, the same pixels
/// as one pass): a worker resamples its content at every scale while its device waits.
pub fn resize(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.dimensions() == (width, height) {
        return img.clone();
    }
    resize_in_bands(
        img,
        (width, height),
        resize_bands(img.dimensions(), (width, height)),
    )
}

/// [`resize`] in `bands` bands of rows, each on a thread of its own (one: `image::imageops::resize`).
fn resize_in_bands(img: &RgbImage, (width, height): (u32, u32), bands: u32) -> RgbImage {
    if bands <= 1 {
        return image::imageops::resize(img, width, height, FilterType::Lanczos3);
    }
    resample_in_bands(img, (width, height), (0, 0, width, height), bands)
}

/// The window `(x, y, w, h)` of `img` resampled to `width` x `height` ([`resample_window`]) in `bands`
/// bands of the window's rows, each on a thread of its own (one: on this thread).
fn resample_in_bands(
    img: &RgbImage,
    (width, height): (u32, u32),
    (x, y0, w, h): (u32, u32, u32, u32),
    bands: u32,
) -> RgbImage {
    if bands <= 1 {
        return resample_window(img, (width, height), (x, y0, w, h));
    }
    let rows = h.div_ceil(bands);
    let parts: Vec<RgbImage> = std::thread::scope(|scope| {
        let spawned: Vec<_> = (y0..y0 + h)
            .step_by(rows as usize)
            .map(|y| {
                let window = (x, y, w, rows.min(y0 + h - y));
                let band = move || resample_window(img, (width, height), window);
                // a thread the system cannot start: that band is resampled here, after the others start
                std::thread::Builder::new()
                    .spawn_scoped(scope, band)
                    .map_err(|_| window)
            })
            .collect();
        spawned
            .into_iter()
            .map(|band| match band {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(window) => resample_window(img, (width, height), window),
            })
            .collect()
    });
    // the window's full-width bands, top to bottom: their rows concatenated are the window's
    let mut raw = Vec::with_capacity(w as usize * h as usize * 3);
    for part in parts {
        raw.extend_from_slice(part.as_raw());
    }
    RgbImage::from_raw(w, h, raw).expect("the bands cover the window")
}

/// Into how many bands of rows [`resize`] splits a resampling from `from` to `to` pixels
/// ([`window_bands`] of the whole image).
pub fn resize_bands(from: (u32, u32), to: (u32, u32)) -> u32 {
    window_bands(from, to, (0, 0, to.0, to.1))
}

/// Into how many bands of rows [`resize_window`] splits the window `(x, y, w, h)` of a resampling from
/// `from` to `to` pixels: one a core (at most 32), each at least 64 rows, and one when the window and its
/// share of the source hold less than a quarter of a megapixel together (about 4 ms of work on one core:
/// a thread's start would cost more than it saves).
pub fn window_bands(from: (u32, u32), to: (u32, u32), (_, _, w, h): (u32, u32, u32, u32)) -> u32 {
    const MIN_ROWS: u32 = 64;
    const MIN_PIXELS: u64 = 1 << 18;
    let pixels = |(w, h): (u32, u32)| u64::from(w) * u64::from(h);
    let (window, whole) = (pixels((w, h)), pixels(to));
    if pixels(from) == 0 || window == 0 || whole == 0 {
        return 1;
    }
    // the source pixels the window reads, in proportion
    let read = (u128::from(pixels(from)) * u128::from(window) / u128::from(whole)) as u64;
    if window + read < MIN_PIXELS {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get().min(32) as u32);
    cores.min(h / MIN_ROWS).max(1)
}

/// The taps of one output position of a Lanczos3 resampling from `from` to `to` positions along an axis: the
/// first input position and the normalized weights. The arithmetic (f32, its order included) is
/// `image::imageops::resize`'s, so that a window computed here equals the same window of a whole resize.
fn lanczos3_taps(from: u32, to: u32, out: u32) -> (u32, Vec<f32>) {
    let kernel = |x: f32| {
        let sinc = |t: f32| {
            if t == 0.0 {
                1.0
            } else {
                let a = t * std::f32::consts::PI;
                a.sin() / a
            }
        };
        if x.abs() < 3.0 {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    };
    let ratio = from as f32 / to as f32;
    let sratio = ratio.max(1.0);
    let support = 3.0 * sratio;
    let center = (out as f32 + 0.5) * ratio;
    let left = ((center - support).floor() as i64).clamp(0, i64::from(from) - 1);
    let right = ((center + support).ceil() as i64).clamp(left + 1, i64::from(from));
    let center = center - 0.5;
    let mut weights: Vec<f32> = (left..right)
        .map(|i| kernel((i as f32 - center) / sratio))
        .collect();
    let sum: f32 = weights.iter().sum();
    for w in &mut weights {
        *w /= sum;
    }
    (left as u32, weights)
}

/// The window `(x, y, w, h)` of `img` resampled to `width` x `height` ([`resize`]: Lanczos3, not resampled
/// at that size), computed from the source pixels that window needs only: the work and memory follow the
/// window, not the whole output (a tile of a large canvas). Equal to cropping the whole resize, pixel for
/// pixel. The window must lie inside `width` x `height`. A large one is resampled in bands of rows on the
/// machine's cores ([`window_bands`]): a worker prepares each tile while its device waits.
pub fn resize_window(
    img: &RgbImage,
    to: (u32, u32),
    window: (u32, u32, u32, u32),
) -> Result<RgbImage, Error> {
    resize_window_in_bands(img, to, window, window_bands(img.dimensions(), to, window))
}

/// [`resize_window`] in `bands` bands of the window's rows, each on a thread of its own (one: on this
/// thread); the same pixels whatever the bands.
pub fn resize_window_in_bands(
    img: &RgbImage,
    (width, height): (u32, u32),
    (x, y, w, h): (u32, u32, u32, u32),
    bands: u32,
) -> Result<RgbImage, Error> {
    if w == 0 || h == 0 || x.saturating_add(w) > width || y.saturating_add(h) > height {
        return Err(Error::invalid(
            "tile",
            format!("window {w}x{h} at {x},{y} is not inside {width}x{height}"),
        ));
    }
    if img.dimensions() == (width, height) {
        return Ok(image::imageops::crop_imm(img, x, y, w, h).to_image());
    }
    Ok(resample_in_bands(img, (width, height), (x, y, w, h), bands))
}

/// [`resize_window`] of a window known to lie inside `width` x `height`, of an image of another size.
fn resample_window(
    img: &RgbImage,
    (width, height): (u32, u32),
    (x, y, w, h): (u32, u32, u32, u32),
) -> RgbImage {
    let (src_w, src_h) = img.dimensions();
    // image's resize samples the columns first (into floats), then the rows (rounded)
    let rows: Vec<(u32, Vec<f32>)> = (y..y + h)
        .map(|o| lanczos3_taps(src_h, height, o))
        .collect();
    let cols: Vec<(u32, Vec<f32>)> = (x..x + w).map(|o| lanczos3_taps(src_w, width, o)).collect();
    let c0 = cols.first().map_or(0, |(l, _)| *l);
    let c1 = cols
        .iter()
        .map(|(l, ws)| l + ws.len() as u32)
        .max()
        .unwrap_or(c0);
    // vertical pass over the columns the window reads: h x (c1 - c0) x 3 floats
    let span = (c1 - c0) as usize;
    let mut tmp = vec![0f32; h as usize * span * 3];
    let (raw, stride) = (img.as_raw(), src_w as usize * 3);
    for ((top, ws), out) in rows.iter().zip(tmp.chunks_exact_mut(span * 3)) {
        // a row of taps at a time, over contiguous bytes: each value's sum in the taps' order, as before
        for (i, wgt) in ws.iter().enumerate() {
            let start = (*top as usize + i) * stride + c0 as usize * 3;
            for (t, &p) in out.iter_mut().zip(&raw[start..start + span * 3]) {
                *t += f32::from(p) * wgt;
            }
        }
    }
    RgbImage::from_fn(w, h, |ox, oy| {
        let (first, ws) = &cols[ox as usize];
        let mut t = [0f32; 3];
        for (i, wgt) in ws.iter().enumerate() {
            let at = (oy as usize * span + (first - c0) as usize + i) * 3;
            for c in 0..3 {
                t[c] += tmp[at + c] * wgt;
            }
        }
        Rgb(t.map(|v| v.clamp(0.0, 255.0).round() as u8))
    })
}

/// Resizes so that the longest side is `longest` (see [`working_size`] and [`resize`]).
pub fn resize_longest(img: &RgbImage, longest: u32) -> RgbImage {
    let (w, h) = working_size(img.width(), img.height(), longest);
    resize(img, w, h)
}

/// The weights of R, G and B in luminance (Y of full-range BT.601 YCbCr).
pub const LUMA_WEIGHTS: [f64; 3] = [0.299, 0.587, 0.114];

fn to_ycbcr([r, g, b]: [f64; 3]) -> [f64; 3] {
    let [wr, wg, wb] = LUMA_WEIGHTS;
    let y = wr * r + wg * g + wb * b;
    [
        y,
        128.0 - 0.168_736 * r - 0.331_264 * g + 0.5 * b,
        128.0 + 0.5 * r - 0.418_688 * g - 0.081_312 * b,
    ]
}

/// RGB of full-range BT.601 YCbCr, clamped to 0..255 (not rounded).
fn from_ycbcr([y, cb, cr]: [f64; 3]) -> [f64; 3] {
    let (cb, cr) = (cb - 128.0, cr - 128.0);
    [
        y + 1.402 * cr,
        y - 0.344_136 * cb - 0.714_136 * cr,
        y + 1.772 * cb,
    ]
    .map(|v| v.clamp(0.0, 255.0))
}

/// How far (in 0..255 grey levels, any channel) a pixel of a video frame may differ from the previous
/// frame's, at the place the motion between them takes it (in place without optical flow), and still be
/// held by the temporal loss. Above the noise of a compressed video's static background, below a moving edge.
pub const TEMPORAL_TOLERANCE: u8 = 12;

/// The luminance (Y of full-range BT.601 YCbCr, rounded) of `img` in all three channels: the grey image
/// that luminance-only transfer optimizes and takes its style from (Gatys et al. 2016, "Preserving Color
/// in Neural Artistic Style Transfer").
pub fn luminance(img: &RgbImage) -> RgbImage {
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        Rgb([luma_level(img.get_pixel(x, y).0); 3])
    })
}

/// A pixel's luminance level: Y of full-range BT.601 YCbCr, rounded.
fn luma_level(rgb: [u8; 3]) -> u8 {
    let [luma, _, _] = to_ycbcr(rgb.map(f64::from));
    luma.round().clamp(0.0, 255.0) as u8
}

/// How many pixels of `img` have each luminance level ([`luminance`]'s, rounded).
fn luminance_histogram(img: &RgbImage) -> [u64; 256] {
    let mut histogram = [0u64; 256];
    for p in img.pixels() {
        histogram[usize::from(luma_level(p.0))] += 1;
    }
    histogram
}

/// The mean and standard deviation (population) of the levels counted in `histogram`; (0, 0) for none.
fn mean_and_deviation(histogram: &[u64; 256]) -> (f64, f64) {
    let n: u64 = histogram.iter().sum();
    if n == 0 {
        return (0.0, 0.0);
    }
    let levels = || {
        histogram
            .iter()
            .enumerate()
            .map(|(v, &c)| (v as f64, c as f64))
    };
    let mean = levels().map(|(v, c)| v * c).sum::<f64>() / n as f64;
    let variance = levels().map(|(v, c)| (v - mean).powi(2) * c).sum::<f64>() / n as f64;
    (mean, variance.sqrt())
}

/// Luminance-only transfer's style image (Gatys et al. 2016, "Preserving Color in Neural Artistic Style
/// Transfer", luminance-only transfer): the luminance of `style` ([`luminance`]) with its mean and standard
/// deviation matched to those of `content`'s luminance, `L' = sigma_C / sigma_S (L - mu_S) + mu_C`, rounded
/// and clamped to 0..255, so that the style gives its texture and not its brightness or contrast. A style of
/// one level becomes the content's mean. A grey image of the style's luminance gives the same image.
pub fn matched_luminance(style: &RgbImage, content: &RgbImage) -> RgbImage {
    let mut out = luminance(style);
    // out is grey: its levels are the style's luminance levels
    let (mu_s, sigma_s) = mean_and_deviation(&luminance_histogram(&out));
    let (mu_c, sigma_c) = mean_and_deviation(&luminance_histogram(content));
    let gain = if sigma_s > 0.0 {
        sigma_c / sigma_s
    } else {
        0.0
    };
    let level: [u8; 256] =
        std::array::from_fn(|v| (gain * (v as f64 - mu_s) + mu_c).round().clamp(0.0, 255.0) as u8);
    for p in out.pixels_mut() {
        *p = Rgb([level[p.0[0] as usize]; 3]);
    }
    out
}

/// Colour histogram matching of a style image (Gatys et al. 2016, "Preserving Color in Neural Artistic Style
/// Transfer", section 2): `style`'s RGB values moved by the linear map `x' = A (x - mu_S) + mu_C` that gives
/// them the mean and covariance of `content`'s, with `A = Sigma_C^(1/2) Sigma_S^(-1/2)` (the paper's Image
/// Analogies variant, symmetric square roots of the 3 x 3 covariances), rounded and clamped to 0..255. The
/// covariances are in 0..1 units with [`COLOR_MATCH_EPS`] added to their diagonals, as ProGamerGov's
/// linear-color-transfer does, so that a style of one colour (a singular covariance) becomes the content's
/// mean. The style gives its texture and the content its palette, in every channel (where
/// [`original_colors`] keeps only the content's chroma, after the render).
pub fn matched_colors(style: &RgbImage, content: &RgbImage) -> RgbImage {
    let (mu_s, cov_s) = color_statistics(style);
    let (mu_c, cov_c) = color_statistics(content);
    let a = symmetric_power(cov_c, 0.5) * symmetric_power(cov_s, -0.5);
    let mut out = style.clone();
    for p in out.pixels_mut() {
        let x = nalgebra::Vector3::from(p.0.map(|v| f64::from(v) / 255.0));
        let y = a * (x - mu_s) + mu_c;
        p.0 = [0, 1, 2].map(|i| (y[i] * 255.0).round().clamp(0.0, 255.0) as u8);
    }
    out
}

/// What [`matched_colors`] adds to the diagonal of each colour covariance (in 0..1 units): ProGamerGov's
/// linear-color-transfer's.
pub const COLOR_MATCH_EPS: f64 = 1e-5;

/// The mean and the covariance (plus [`COLOR_MATCH_EPS`] on its diagonal) of an image's RGB values, in 0..1
/// units.
fn color_statistics(img: &RgbImage) -> (nalgebra::Vector3<f64>, nalgebra::Matrix3<f64>) {
    let n = (img.width() as f64 * img.height() as f64).max(1.0);
    let mut sum = nalgebra::Vector3::zeros();
    let mut outer = nalgebra::Matrix3::zeros();
    for p in img.pixels() {
        let x = nalgebra::Vector3::from(p.0.map(|v| f64::from(v) / 255.0));
        sum += x;
        outer += x * x.transpose();
    }
    let mean = sum / n;
    let cov = outer / n - mean * mean.transpose() + nalgebra::Matrix3::identity() * COLOR_MATCH_EPS;
    (mean, cov)
}

/// `m^power` of a symmetric positive definite 3 x 3 matrix, by its eigendecomposition (eigenvalues below
/// [`COLOR_MATCH_EPS`], from rounding, taken as that).
fn symmetric_power(m: nalgebra::Matrix3<f64>, power: f64) -> nalgebra::Matrix3<f64> {
    let eigen = nalgebra::SymmetricEigen::new(m);
    let values = eigen
        .eigenvalues
        .map(|v| v.max(COLOR_MATCH_EPS).powf(power));
    eigen.eigenvectors * nalgebra::Matrix3::from_diagonal(&values) * eigen.eigenvectors.transpose()
}

/// The luminance of `stylized` (RGB, 0..255) with the chroma of `content`.
fn luma_with_chroma(stylized: [f64; 3], content: [u8; 3]) -> [f64; 3] {
    let [luma, _, _] = to_ycbcr(stylized);
    let [_, cb, cr] = to_ycbcr(content.map(f64::from));
    from_ycbcr([luma, cb, cr])
}

/// jcjohnson's `-original_colors 1`: the luminance (Y of full-range BT.601 YCbCr) of `stylized` with the
/// chroma (Cb, Cr) of `content`, which is resized to the output's size first.
pub fn original_colors(stylized: &RgbImage, content: &RgbImage) -> RgbImage {
    let content = resize(content, stylized.width(), stylized.height());
    RgbImage::from_fn(stylized.width(), stylized.height(), |x, y| {
        let rgb = luma_with_chroma(
            stylized.get_pixel(x, y).0.map(f64::from),
            content.get_pixel(x, y).0,
        );
        Rgb(rgb.map(|v| v.round() as u8))
    })
}

/// [`original_colors`] of a result in floats (0..255), unrounded: for 16-bit outputs.
pub fn original_colors_f32(stylized: &Rgb32FImage, content: &RgbImage) -> Rgb32FImage {
    let content = resize(content, stylized.width(), stylized.height());
    Rgb32FImage::from_fn(stylized.width(), stylized.height(), |x, y| {
        let rgb = luma_with_chroma(
            stylized.get_pixel(x, y).0.map(f64::from),
            content.get_pixel(x, y).0,
        );
        Rgb(rgb.map(|v| v as f32))
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
        let err = decode(b"", "e.png").unwrap_err().to_string();
        assert!(
            err.contains("e.png: not an image: the file is empty"),
            "{err}"
        );
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

    /// What is not a regular file (a device, a folder) is refused before a byte is read: `/dev/zero` would
    /// fill the memory.
    #[test]
    fn only_regular_files_are_read_as_images() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe.png");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let fifo = fifo.display().to_string();
        for path in ["/dev/zero", "/", &fifo] {
            let e = read_image_file(Path::new(path)).unwrap_err().to_string();
            assert_eq!(e, format!("{path}: not a regular file"));
        }
        assert!(read_image_file(Path::new("/nonexistent.png"))
            .unwrap_err()
            .to_string()
            .starts_with("/nonexistent.png: cannot read: "));
    }

    /// An output is written through a temporary file of its own (not `<name>.partial.<ext>`, which may be
    /// the user's), with a new file's permissions, and leaves nothing else behind.
    #[test]
    fn an_output_is_written_whole_and_leaves_other_files_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let img = RgbImage::from_fn(6, 3, |x, y| image::Rgb([x as u8, y as u8, 200]));
        let theirs = dir.path().join("a.partial.png");
        std::fs::write(&theirs, b"the user's").unwrap();
        let path = dir.path().join("a.png");
        save(&img, &path).unwrap();
        assert_eq!(load(&path).unwrap(), img);
        assert_eq!(std::fs::read(&theirs).unwrap(), b"the user's");
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["a.partial.png", "a.png"]);
        // what std::fs::write would have made: group and others read it where the umask lets them
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&plain));
    }

    /// An output is checked before any work: an image file in a folder that exists, is not a folder, is not
    /// an input and is for one result; a folder that is not a file and holds no input; no other image
    /// format's extension.
    #[test]
    fn an_output_that_cannot_be_written_is_refused_before_the_render() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("photo.png");
        std::fs::write(&content, b"pixels").unwrap();
        let refused = |output: &Path, several: bool| {
            let e = check_output(output, several, &[&content])
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!("output: {}: ", output.display())),
                "{e}"
            );
            e
        };
        check_output(&dir.path().join("out.png"), false, &[&content]).unwrap();
        check_output(&dir.path().join("results"), true, &[&content]).unwrap();
        assert!(refused(dir.path(), true).contains("holds one of the job's inputs"));
        check_output(dir.path(), true, &[]).unwrap();
        assert!(refused(&dir.path().join("typo/out.png"), false).contains("does not exist"));
        // a file where its folder should be; a name the file system refuses (over 255 bytes), which
        // is not left behind when it can be made
        std::fs::write(dir.path().join("afile"), b"").unwrap();
        let under_a_file = refused(&dir.path().join("afile/out.png"), false);
        assert!(
            under_a_file.ends_with("afile is not a folder"),
            "{under_a_file}"
        );
        let long = dir.path().join(format!("{}.png", "a".repeat(300)));
        let too_long = refused(&long, false);
        assert!(
            too_long.contains("cannot be written: File name too long"),
            "{too_long}"
        );
        let fine = dir.path().join("fine.png");
        check_output(&fine, false, &[]).unwrap();
        assert!(!fine.exists(), "the probe is removed");
        let folder = dir.path().join("out.png");
        std::fs::create_dir(&folder).unwrap();
        assert!(refused(&folder, false).contains("is a folder"));
        assert!(refused(&content, false).contains("inputs"));
        // the same file by another path
        let again = dir.path().join("typo/../photo.png");
        std::fs::create_dir(dir.path().join("typo")).unwrap();
        assert!(refused(&again, false).contains("inputs"));
        assert!(refused(&dir.path().join("out.jpg"), true).contains("several results"));
        assert!(refused(&dir.path().join("out.webp"), false).contains("not an image format"));
        // a mistyped extension is not made a folder; an existing folder may have one
        let typo = refused(&dir.path().join("out.jpgg"), false);
        assert!(typo.contains(".jpgg is not an image extension"), "{typo}");
        assert!(refused(&dir.path().join("renders.v2"), true).contains("without an extension"));
        std::fs::create_dir(dir.path().join("renders.v2")).unwrap();
        check_output(&dir.path().join("renders.v2"), true, &[]).unwrap();
        let notes = dir.path().join("notes.txt");
        std::fs::write(&notes, b"").unwrap();
        assert!(refused(&notes, true).contains("exists and is not a folder"));
        // a folder to be made in a file, or where no file can be made (even by root: /proc)
        assert!(refused(&notes.join("results"), true).contains("is not a folder"));
        let proc = Path::new("/proc/stylefarm-results/run-1");
        assert!(refused(proc, true).contains("cannot write in /proc"));
        check_output(&dir.path().join("new/deeper"), true, &[&content]).unwrap();
        assert!(!dir.path().join("new").exists(), "checked, not made");
    }

    /// The style's colours take the content's mean and covariance (within 8-bit rounding), in every
    /// channel and across channels; the content matched to itself is itself, and so is a darkened and
    /// flattened copy of it; a style of one colour becomes the content's mean.
    #[test]
    fn matched_colors_take_the_content_s_mean_and_covariance() {
        // correlated channels in both, of different sizes
        let style = RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8 + x) as u8, ((x + y) * 3) as u8])
        });
        let content = RgbImage::from_fn(50, 20, |x, y| {
            image::Rgb([
                100 + (x * 2) as u8,
                120 + y as u8 + x as u8,
                90 + (x % 7) as u8 * 5,
            ])
        });
        let matched = matched_colors(&style, &content);
        assert_eq!(matched.dimensions(), style.dimensions());
        let eps = nalgebra::Matrix3::identity() * COLOR_MATCH_EPS;
        let (mu, cov) = color_statistics(&matched);
        let (mu_c, cov_c) = color_statistics(&content);
        // in 0..255 units: the means within half a level, the covariances within a level squared
        assert!((mu - mu_c).abs().max() * 255.0 < 0.5, "{mu} vs {mu_c}");
        let off = ((cov - eps) - (cov_c - eps)).abs().max() * 255.0 * 255.0;
        assert!(off < 1.0, "covariances differ by {off}: {cov} vs {cov_c}");
        let (_, cov_s) = color_statistics(&style);
        assert!(
            ((cov_s - cov_c).abs().max() * 65025.0) > 100.0,
            "the test's images differ"
        );
        // itself: unchanged
        let same = matched_colors(&content, &content);
        let worst = same
            .pixels()
            .zip(content.pixels())
            .flat_map(|(a, b)| (0..3).map(move |i| a.0[i].abs_diff(b.0[i])));
        assert_eq!(worst.max(), Some(0));
        // a style that is the content darkened and flattened (every channel alike) maps back onto it,
        // within the rounding of the darkening
        let scaled = RgbImage::from_fn(50, 20, |x, y| {
            image::Rgb(content.get_pixel(x, y).0.map(|v| v / 2 + 10))
        });
        let back = matched_colors(&scaled, &content);
        let worst = back
            .pixels()
            .zip(content.pixels())
            .flat_map(|(a, b)| (0..3).map(move |i| a.0[i].abs_diff(b.0[i])));
        assert!(worst.max() <= Some(2));
        // one colour: the content's mean
        let flat = RgbImage::from_pixel(4, 4, image::Rgb([9, 200, 9]));
        let mean = [0, 1, 2].map(|i| (mu_c[i] * 255.0).round() as u8);
        assert!(matched_colors(&flat, &content)
            .pixels()
            .all(|p| p.0 == mean));
    }

    /// The style's luminance takes the content's mean and deviation; a linear change of the style's
    /// brightness and contrast changes nothing beyond rounding, its grey image nothing at all.
    #[test]
    fn matched_luminance_takes_the_content_s_mean_and_deviation() {
        let style = RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8])
        });
        let content = RgbImage::from_fn(50, 20, |x, y| {
            image::Rgb([100 + (x * 2) as u8, 120 + y as u8, 90 + (x % 7) as u8 * 5])
        });
        let stats = |img: &RgbImage| mean_and_deviation(&luminance_histogram(img));
        let matched = matched_luminance(&style, &content);
        assert!(matched
            .pixels()
            .all(|p| p.0[0] == p.0[1] && p.0[1] == p.0[2]));
        let ((m, d), (mc, dc)) = (stats(&matched), stats(&content));
        assert!(
            (m - mc).abs() < 0.5 && (d - dc).abs() < 0.5,
            "{m} {d} vs {mc} {dc}"
        );
        assert_eq!(matched_luminance(&luminance(&style), &content), matched);
        // the style darkened and flattened: the same image within rounding
        let dim = RgbImage::from_fn(40, 30, |x, y| {
            image::Rgb(
                style
                    .get_pixel(x, y)
                    .0
                    .map(|v| (f64::from(v) * 0.4 + 20.0).round() as u8),
            )
        });
        let from_dim = matched_luminance(&dim, &content);
        let worst = from_dim
            .pixels()
            .zip(matched.pixels())
            .map(|(a, b)| a.0[0].abs_diff(b.0[0]))
            .max();
        assert!(worst <= Some(3), "{worst:?}");
        assert!(stats(&dim).0 < stats(&style).0 - 20.0);
        // one level: the content's mean
        let flat = RgbImage::from_pixel(4, 4, image::Rgb([9, 9, 9]));
        let mean = mc.round() as u8;
        assert!(matched_luminance(&flat, &content)
            .pixels()
            .all(|p| p.0 == [mean; 3]));
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
                to_ycbcr(p.0.map(f64::from)),
                to_ycbcr(stylized.get_pixel(x, y).0.map(f64::from)),
                to_ycbcr(content.get_pixel(x, y).0.map(f64::from)),
            );
            assert!((o[0] - s[0]).abs() < 1.0, "luma {o:?} vs stylized {s:?}");
            assert!(
                (o[1] - c[1]).abs() < 1.5 && (o[2] - c[2]).abs() < 1.5,
                "chroma {o:?} vs content {c:?}"
            );
        }
    }
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::PngEncoder;
    use image::codecs::webp::WebPEncoder;
    use image::{ImageEncoder, Rgb, Rgba, RgbaImage};

    /// Six colours far apart, for a 3 x 2 image whose every flip and turn is different.
    const CORNERS: [[u8; 3]; 6] = [
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [0, 255, 255],
        [255, 0, 255],
    ];

    /// A 3 x 2 image of [`CORNERS`] (row by row), each pixel a `block` x `block` square.
    fn asymmetric(block: u32) -> RgbImage {
        RgbImage::from_fn(3 * block, 2 * block, |x, y| {
            Rgb(CORNERS[(y / block * 3 + x / block) as usize])
        })
    }

    /// What a viewer shows of `stored` under EXIF orientation `n` (the TIFF/EXIF definitions, written out
    /// independently of the image crate): `displayed(x, y) = stored(sx, sy)`.
    fn as_viewer_shows(stored: &RgbImage, n: u16) -> RgbImage {
        let (w, h) = stored.dimensions();
        let (dw, dh) = if n >= 5 { (h, w) } else { (w, h) };
        RgbImage::from_fn(dw, dh, |x, y| {
            let (sx, sy) = match n {
                1 => (x, y),
                2 => (w - 1 - x, y),         // mirrored left-right
                3 => (w - 1 - x, h - 1 - y), // turned 180
                4 => (x, h - 1 - y),         // mirrored top-bottom
                5 => (y, x),                 // transposed
                6 => (y, h - 1 - x), // stored turned 90 counter-clockwise: shown turned clockwise
                7 => (w - 1 - y, h - 1 - x), // transversed
                8 => (w - 1 - y, x), // shown turned counter-clockwise
                _ => unreachable!(),
            };
            *stored.get_pixel(sx, sy)
        })
    }

    /// An EXIF block (the TIFF structure, without JPEG's "Exif\0\0"): a little-endian header and one IFD
    /// holding only Orientation (0x0112, SHORT, count 1) = `n`.
    fn exif_orientation(n: u16) -> Vec<u8> {
        let mut exif = b"II*\0".to_vec();
        exif.extend(8u32.to_le_bytes()); // the IFD follows the header
        exif.extend(1u16.to_le_bytes()); // one entry
        exif.extend(0x0112u16.to_le_bytes());
        exif.extend(3u16.to_le_bytes());
        exif.extend(1u32.to_le_bytes());
        exif.extend(n.to_le_bytes());
        exif.extend([0, 0]); // the value field's padding
        exif.extend(0u32.to_le_bytes()); // no next IFD
        exif
    }

    fn encode_with(img: &RgbImage, format: ImageFormat, exif: Vec<u8>) -> Vec<u8> {
        let mut bytes = Vec::new();
        match format {
            ImageFormat::Png => {
                let mut enc = PngEncoder::new(&mut bytes);
                enc.set_exif_metadata(exif).unwrap();
                img.write_with_encoder(enc)
            }
            ImageFormat::Jpeg => {
                let mut enc = JpegEncoder::new_with_quality(&mut bytes, 100);
                enc.set_exif_metadata(exif).unwrap();
                img.write_with_encoder(enc)
            }
            ImageFormat::WebP => {
                let mut enc = WebPEncoder::new_lossless(&mut bytes);
                enc.set_exif_metadata(exif).unwrap();
                img.write_with_encoder(enc)
            }
            _ => unreachable!(),
        }
        .unwrap();
        bytes
    }

    fn encode(img: impl Into<DynamicImage>, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Cursor::new(Vec::new());
        img.into().write_to(&mut bytes, format).unwrap();
        bytes.into_inner()
    }

    #[test]
    fn exif_orientations_1_to_8_decode_as_a_viewer_shows_them() {
        // PNG (eXIf) and lossless WebP exactly; JPEG (APP1) with 16 px blocks, compared at their centres
        for (format, block, tolerance) in [
            (ImageFormat::Png, 1, 0),
            (ImageFormat::WebP, 1, 0),
            (ImageFormat::Jpeg, 16, 40),
        ] {
            let stored = asymmetric(block);
            for n in 1..=8 {
                let bytes = encode_with(&stored, format, exif_orientation(n));
                let got = decode(&bytes, "oriented").unwrap();
                let want = as_viewer_shows(&asymmetric(1), n);
                assert_eq!(
                    got.dimensions(),
                    (want.width() * block, want.height() * block),
                    "{format:?} orientation {n}"
                );
                for (x, y, w) in want.enumerate_pixels() {
                    let g = got.get_pixel(x * block + block / 2, y * block + block / 2);
                    let off = (0..3).map(|c| g[c].abs_diff(w[c])).max().unwrap();
                    assert!(
                        off <= tolerance,
                        "{format:?} orientation {n} at ({x}, {y}): {g:?}, expected {w:?}"
                    );
                }
                let header = dimensions(Cursor::new(&bytes), "oriented").unwrap();
                assert_eq!(header, got.dimensions(), "{format:?} orientation {n}");
                assert_eq!(
                    header,
                    if n >= 5 {
                        (2 * block, 3 * block)
                    } else {
                        (3 * block, 2 * block)
                    }
                );
            }
        }
    }

    #[test]
    fn dimensions_reads_the_header_and_keeps_the_limits() {
        let png = encode(asymmetric(5), ImageFormat::Png);
        assert_eq!(dimensions(Cursor::new(&png), "a.png").unwrap(), (15, 10));
        // what a decode takes: two copies of the pixels as stored, and 12 bytes a pixel more
        let rgb = header(Cursor::new(&png), "a.png").unwrap();
        assert_eq!((rgb.alpha, rgb.decode_bytes), (false, 150 * (2 * 3 + 12)));
        let float = image::Rgba32FImage::from_pixel(4, 3, image::Rgba([0.5, 0.5, 0.5, 0.5]));
        let tif = encode(DynamicImage::ImageRgba32F(float), ImageFormat::Tiff);
        let float = header(Cursor::new(&tif), "f.tif").unwrap();
        assert_eq!((float.width, float.height, float.alpha), (4, 3, true));
        assert_eq!(float.decode_bytes, 12 * (2 * 16 + 12));
        let err = dimensions(Cursor::new(b"not an image"), "junk").unwrap_err();
        assert!(err.to_string().starts_with("junk: "), "{err}");
        // one side over MAX_IMAGE_SIDE: refused from the header, and by decode
        let wide = encode(GrayImage::new(MAX_IMAGE_SIDE + 1, 1), ImageFormat::Png);
        let err = dimensions(Cursor::new(&wide), "wide.png").unwrap_err();
        assert_eq!(
            err.to_string(),
            "wide.png: 32769 x 1 px: an image may have at most 32768 px a side"
        );
        let err = decode(&wide, "wide.png").unwrap_err();
        assert!(err.to_string().contains("at most 32768 px a side"), "{err}");
    }

    #[test]
    fn rgba_png_composites_over_white_and_keeps_its_alpha() {
        // left half opaque colours, right half transparent magenta; one row of partial alphas
        let rgba = RgbaImage::from_fn(4, 3, |x, y| match (x, y) {
            (0, 2) => Rgba([200, 100, 0, 51]), // a = 0.2: 0.2 * c + 0.8 * 255
            (1, 2) => Rgba([0, 0, 0, 128]),
            (_, 2) => Rgba([10, 20, 30, 254]),
            (0 | 1, _) => Rgba([x as u8 * 100, y as u8 * 50, 7, 255]),
            _ => Rgba([255, 0, 255, 0]),
        });
        let got = decode_full(&encode(rgba.clone(), ImageFormat::Png), "t.png").unwrap();
        for (x, y, p) in got.rgb.enumerate_pixels() {
            let want = match (x, y) {
                (0, 2) => [244, 224, 204],
                (1, 2) => [127, 127, 127],
                (_, 2) => [11, 21, 31],
                (0 | 1, _) => [x as u8 * 100, y as u8 * 50, 7],
                _ => [255, 255, 255],
            };
            assert_eq!(p.0, want, "at ({x}, {y})");
        }
        let alpha = got.alpha.expect("a transparent image keeps its alpha");
        assert_eq!(
            alpha,
            GrayImage::from_fn(4, 3, |x, y| Luma([rgba.get_pixel(x, y)[3]]))
        );
        // the same through decode / load
        assert_eq!(
            decode(&encode(rgba, ImageFormat::Png), "t.png").unwrap(),
            got.rgb
        );
        // an alpha channel that is opaque everywhere is no alpha
        let opaque = RgbaImage::from_pixel(2, 2, Rgba([1, 2, 3, 255]));
        let got = decode_full(&encode(opaque, ImageFormat::Png), "o.png").unwrap();
        assert_eq!(got.alpha, None);
        assert_eq!(got.rgb, RgbImage::from_pixel(2, 2, Rgb([1, 2, 3])));
        assert_eq!(
            decode_full(&encode(asymmetric(1), ImageFormat::Png), "rgb")
                .unwrap()
                .alpha,
            None
        );
    }

    #[test]
    fn la_png_composites_over_white() {
        let la = image::GrayAlphaImage::from_fn(3, 1, |x, _| {
            image::LumaA([[100, 100, 0][x as usize], [0, 255, 128][x as usize]])
        });
        let got = decode_full(&encode(la, ImageFormat::Png), "la.png").unwrap();
        let grey = |v| Rgb([v, v, v]);
        assert_eq!(
            got.rgb.pixels().copied().collect::<Vec<_>>(),
            [grey(255), grey(100), grey(127)]
        );
        assert_eq!(got.alpha.unwrap().into_raw(), [0, 255, 128]);
    }

    #[test]
    fn sixteen_bit_rgba_composites_in_16_bits() {
        let px = [
            [0u16, 65_535, 1_000, 32_768],
            [40_000, 20_000, 50, 65_535],
            [300, 0, 65_535, 0],
            [12_345, 54_321, 777, 65_000],
        ];
        let rgba = ImageBuffer::<Rgba<u16>, Vec<u16>>::from_fn(4, 1, |x, _| Rgba(px[x as usize]));
        let got = decode_full(&encode(rgba, ImageFormat::Png), "16.png").unwrap();
        for (x, p) in px.iter().enumerate() {
            let a = f64::from(p[3]) / 65_535.0;
            let want = [0, 1, 2].map(|c| {
                let v16 = (a * f64::from(p[c]) + (1.0 - a) * 65_535.0).round();
                (v16 / 257.0).round() as u8
            });
            assert_eq!(got.rgb.get_pixel(x as u32, 0).0, want, "pixel {x}");
        }
        let alpha = got.alpha.unwrap().into_raw();
        let want: Vec<u8> = px
            .iter()
            .map(|p| (f64::from(p[3]) / 257.0).round() as u8)
            .collect();
        assert_eq!(alpha, want);
    }

    #[test]
    fn palette_png_with_trns_composites_over_white() {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, 3, 1);
            enc.set_color(png::ColorType::Indexed);
            enc.set_depth(png::BitDepth::Eight);
            enc.set_palette(vec![255, 0, 0, 0, 255, 0, 0, 0, 255]);
            enc.set_trns(vec![255, 128, 0]);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[0, 1, 2]).unwrap();
        }
        let got = decode_full(&bytes, "pal.png").unwrap();
        assert_eq!(
            got.rgb.into_raw(),
            [
                255, 0, 0, /* green, a = 128 */ 127, 255, 127, /* blue, a = 0 */ 255,
                255, 255
            ]
        );
        assert_eq!(got.alpha.unwrap().into_raw(), [255, 128, 0]);
    }

    /// A 7 x 5 image with every value different.
    fn gradient() -> RgbImage {
        RgbImage::from_fn(7, 5, |x, y| {
            Rgb([x as u8 * 36, y as u8 * 60, 17 + x as u8 + 7 * y as u8])
        })
    }

    #[test]
    fn webp_tiff_bmp_decode_exactly() {
        let img = gradient();
        let mut webp = Vec::new();
        img.write_with_encoder(WebPEncoder::new_lossless(&mut webp))
            .unwrap();
        assert_eq!(decode(&webp, "a.webp").unwrap(), img);
        assert_eq!(
            decode(&encode(img.clone(), ImageFormat::Tiff), "a.tif").unwrap(),
            img
        );
        assert_eq!(
            decode(&encode(img.clone(), ImageFormat::Bmp), "a.bmp").unwrap(),
            img
        );
        // transparent WebP: composited, alpha kept
        let rgba = RgbaImage::from_fn(2, 1, |x, _| Rgba([0, 0, 0, [255, 0][x as usize]]));
        let mut webp = Vec::new();
        rgba.write_with_encoder(WebPEncoder::new_lossless(&mut webp))
            .unwrap();
        let got = decode_full(&webp, "t.webp").unwrap();
        assert_eq!(got.rgb.into_raw(), [0, 0, 0, 255, 255, 255]);
        assert_eq!(got.alpha.unwrap().into_raw(), [255, 0]);
    }

    /// A TIFF of one strip larger than the decoder's slack (uncompressed, as Pillow writes one: one strip
    /// of the whole image) decodes: its strip is read whole, then copied out.
    #[test]
    fn a_tiff_of_one_large_strip_decodes() {
        let (w, h) = (2400u32, 2400u32);
        assert!(u64::from(w * h * 3) > DECODE_SLACK_BYTES);
        let img = RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, (x ^ y) as u8]));
        let mut bytes = Cursor::new(Vec::new());
        let mut tiff = tiff::encoder::TiffEncoder::new(&mut bytes).unwrap();
        let mut strip = tiff
            .new_image::<tiff::encoder::colortype::RGB8>(w, h)
            .unwrap();
        strip.rows_per_strip(h).unwrap();
        strip.write_data(img.as_raw()).unwrap();
        assert_eq!(decode(bytes.get_ref(), "one-strip.tif").unwrap(), img);
    }

    /// A pixel format the decoder does not take (a 32-bit grayscale float TIFF, as Pillow writes mode F)
    /// is refused saying what is read.
    #[test]
    fn a_tiff_of_float_gray_is_refused_saying_what_is_read() {
        let mut bytes = Cursor::new(Vec::new());
        let mut tiff = tiff::encoder::TiffEncoder::new(&mut bytes).unwrap();
        (tiff.write_image::<tiff::encoder::colortype::Gray32Float>(4, 4, &[0.5; 16])).unwrap();
        let err = decode(bytes.get_ref(), "f.tif").unwrap_err().to_string();
        assert!(
            err.starts_with(
                "f.tif: cannot decode image: its pixel format is not one that is read ("
            ) && err.ends_with("); save it as 8- or 16-bit RGB, RGBA or grayscale"),
            "{err}"
        );
    }

    #[test]
    fn sixteen_bit_tiff_rounds_to_8_bits() {
        let values = [
            0u16, 128, 129, 1_000, 32_767, 32_896, 40_000, 65_407, 65_535,
        ];
        let img = ImageBuffer::<Rgb<u16>, Vec<u16>>::from_fn(3, 3, |x, y| {
            let v = values[(y * 3 + x) as usize];
            Rgb([v, 65_535 - v, v / 2])
        });
        let got = decode(&encode(img.clone(), ImageFormat::Tiff), "16.tif").unwrap();
        for (x, y, p) in img.enumerate_pixels() {
            let want = p.0.map(|v| (f64::from(v) / 257.0).round() as u8);
            assert_eq!(got.get_pixel(x, y).0, want, "at ({x}, {y}) from {p:?}");
        }
    }

    #[test]
    fn gif_decodes_its_first_frame() {
        use image::codecs::gif::GifEncoder;
        use image::{Delay, Frame};
        let first = RgbaImage::from_fn(4, 2, |x, y| match (x, y) {
            (3, 1) => Rgba([0, 0, 0, 0]),
            _ => Rgba([x as u8 * 60, y as u8 * 200, 90, 255]),
        });
        let second = RgbaImage::from_pixel(4, 2, Rgba([1, 2, 3, 255]));
        let mut gif = Vec::new();
        {
            let mut enc = GifEncoder::new(&mut gif);
            for f in [&first, &second] {
                enc.encode_frame(Frame::from_parts(
                    f.clone(),
                    0,
                    0,
                    Delay::from_numer_denom_ms(100, 1),
                ))
                .unwrap();
            }
        }
        let got = decode_full(&gif, "a.gif").unwrap();
        for (x, y, p) in first.enumerate_pixels() {
            let want = if p[3] == 0 {
                [255; 3]
            } else {
                [p[0], p[1], p[2]]
            };
            assert_eq!(got.rgb.get_pixel(x, y).0, want, "at ({x}, {y})");
        }
        let alpha = got.alpha.unwrap();
        assert_eq!(alpha.get_pixel(3, 1)[0], 0);
        assert_eq!(alpha.get_pixel(0, 0)[0], 255);
    }

    /// A JPEG big and busy enough for a cut to fall inside its entropy-coded data.
    fn busy_jpeg() -> Vec<u8> {
        let img = RgbImage::from_fn(128, 128, |x, y| {
            Rgb([
                ((x * 7 + y * 13) % 251) as u8,
                ((x * y) % 256) as u8,
                ((x ^ y) * 3 % 256) as u8,
            ])
        });
        let mut bytes = Vec::new();
        img.write_with_encoder(JpegEncoder::new_with_quality(&mut bytes, 95))
            .unwrap();
        bytes
    }

    #[test]
    fn truncated_files_are_errors_naming_the_file() {
        let jpeg = busy_jpeg();
        // the decoder alone fills a cut JPEG with grey; decode refuses it
        let half = &jpeg[..jpeg.len() / 2];
        assert!(
            image::load_from_memory(half).is_ok(),
            "the decoder became strict: simplify"
        );
        for cut in [jpeg.len() / 2, jpeg.len() * 9 / 10, jpeg.len() - 2] {
            let err = decode(&jpeg[..cut], "cut.jpg").unwrap_err().to_string();
            assert!(
                err.starts_with("cut.jpg: ") && err.contains("truncated"),
                "{err}"
            );
        }
        // complete, with padding or other data after the end of image: accepted
        let mut padded = jpeg.clone();
        padded.extend([0; 16]);
        padded.extend(b"trailing data, as some phones append");
        assert_eq!(
            decode(&padded, "p.jpg").unwrap(),
            decode(&jpeg, "j.jpg").unwrap()
        );

        let img = gradient();
        let rgba = DynamicImage::ImageRgb8(img.clone()).to_rgba8();
        let mut webp = Vec::new();
        img.write_with_encoder(WebPEncoder::new_lossless(&mut webp))
            .unwrap();
        for (name, bytes) in [
            ("a.png", encode(img.clone(), ImageFormat::Png)),
            ("a.gif", encode(rgba, ImageFormat::Gif)),
            ("a.webp", webp),
            ("a.tif", encode(img.clone(), ImageFormat::Tiff)),
            (
                "a16.tif",
                encode(
                    DynamicImage::ImageRgb8(img.clone()).to_rgb16(),
                    ImageFormat::Tiff,
                ),
            ),
            ("a.bmp", encode(img.clone(), ImageFormat::Bmp)),
        ] {
            assert_eq!(decode(&bytes, name).unwrap(), img, "{name} whole");
            let err = decode(&bytes[..bytes.len() / 2], name)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("{name}: ")), "{err}");
        }
    }

    /// Decompression bombs that pass the header's pixel cap are refused without their allocation: a GIF of
    /// a 1-px screen whose frame says 23170 x 23170 (its decoder's frame buffer is held to twice the
    /// image's bytes and a slack, not 2 GiB), a 1-px TIFF of JPEG-compressed strips (whose decoder
    /// sizes each strip from its JPEG's header), and extended WebPs of a 1-px canvas whose lossy frame says
    /// 16383 x 16383, still or an animation's first frame (its decoder decodes the frame before it compares
    /// the sizes).
    #[test]
    fn decompression_bombs_under_the_pixel_cap_are_refused() {
        let mut gif = b"GIF89a".to_vec();
        gif.extend([1, 0, 1, 0, 0x80, 0, 0, 0, 0, 0, 255, 255, 255]);
        // an image descriptor at 0,0 of 23170 x 23170, then a few LZW bytes, and the trailer
        gif.extend([
            0x2C, 0, 0, 0, 0, 0x82, 0x5A, 0x82, 0x5A, 0, 2, 2, 0x44, 0x01, 0, 0x3B,
        ]);
        let err = decode(&gif, "bomb.gif").unwrap_err().to_string();
        assert!(
            err.starts_with("bomb.gif: ") && err.contains("limit"),
            "{err}"
        );
        // a 1 x 1 grey TIFF whose one strip is (said to be) a JPEG
        let mut tif = b"II".to_vec();
        tif.extend(42u16.to_le_bytes());
        tif.extend(8u32.to_le_bytes());
        let entries: [(u16, u16, u32); 9] = [
            (256, 3, 1),   // width
            (257, 3, 1),   // height
            (258, 3, 8),   // bits per sample
            (259, 3, 7),   // compression: JPEG
            (262, 3, 1),   // grey, black is 0
            (273, 4, 122), // strip offsets
            (277, 3, 1),   // samples per pixel
            (278, 3, 1),   // rows per strip
            (279, 4, 4),   // strip byte counts
        ];
        tif.extend((entries.len() as u16).to_le_bytes());
        for (tag, kind, value) in entries {
            tif.extend(tag.to_le_bytes());
            tif.extend(kind.to_le_bytes());
            tif.extend(1u32.to_le_bytes());
            tif.extend(value.to_le_bytes());
        }
        tif.extend(0u32.to_le_bytes());
        assert_eq!(tif.len(), 122);
        tif.extend([0xFF, 0xD8, 0xFF, 0xD9]);
        let err = decode(&tif, "bomb.tif").unwrap_err().to_string();
        assert!(
            err.starts_with("bomb.tif: a TIFF of JPEG-compressed strips is not read"),
            "{err}"
        );
        // WebP: RIFF chunks, each a fourcc, its size and its payload (padded to an even size)
        let chunk = |fourcc: &[u8], payload: &[u8]| {
            let mut c = fourcc.to_vec();
            c.extend((payload.len() as u32).to_le_bytes());
            c.extend(payload);
            c.extend(vec![0; payload.len() % 2]);
            c
        };
        let riff = |chunks: &[Vec<u8>]| {
            let body = chunks.concat();
            let mut r = b"RIFF".to_vec();
            r.extend((4 + body.len() as u32).to_le_bytes());
            r.extend(b"WEBP");
            r.extend(body);
            r
        };
        // flags, then the canvas' sides less one (24 bits each)
        let vp8x = |flags: u8| chunk(b"VP8X", &[flags, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        // a key frame's tag, the start code, the sides (14 bits each), then a few bytes of frame
        let vp8 = |side: u16| {
            let mut payload = vec![0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A];
            payload.extend(side.to_le_bytes());
            payload.extend(side.to_le_bytes());
            payload.extend([0; 8]);
            chunk(b"VP8 ", &payload)
        };
        let still = riff(&[vp8x(0), vp8(16383)]);
        // an animation (flag 2) whose first frame is 1 x 1 at 0,0
        let mut anmf = vec![0; 16];
        anmf.extend(vp8(16383));
        let animated = riff(&[vp8x(2), chunk(b"ANIM", &[0; 6]), chunk(b"ANMF", &anmf)]);
        for (name, bytes) in [("still.webp", &still), ("animated.webp", &animated)] {
            assert_eq!(
                webp_lossy_frame_mismatch(bytes),
                Some(((16383, 16383), (1, 1))),
                "{name}"
            );
            let err = decode(bytes, name).unwrap_err().to_string();
            assert_eq!(
                err,
                format!(
                    "{name}: cannot decode image: a WebP frame of 16383 x 16383 where its header \
                     declares 1 x 1"
                )
            );
        }
        // a frame of the size declared is left to the decoder
        assert_eq!(webp_lossy_frame_mismatch(&riff(&[vp8x(0), vp8(1)])), None);
        // the frame the decoder decodes, however the file hides it: a chunk whose size runs past the
        // end of the file (read to the end), a decoy of the right size where the other kind of image
        // keeps its frame, an ANMF whose ALPH is followed by a chunk of any name (read as VP8)
        let mut past_end = riff(&[vp8x(0), vp8(16383)]);
        let at = past_end.len() - 18 - 4;
        past_end[at..at + 4].copy_from_slice(&100u32.to_le_bytes());
        let frame = |chunks: &[Vec<u8>]| {
            let mut anmf = vec![0; 16];
            anmf.extend(chunks.concat());
            chunk(b"ANMF", &anmf)
        };
        let animated_decoy = riff(&[vp8x(2), vp8(1), frame(&[vp8(16383)])]);
        let still_decoy = riff(&[vp8x(0), frame(&[vp8(1)]), vp8(16383)]);
        let renamed = {
            let mut v = vp8(16383);
            v[..4].copy_from_slice(b"VP8L");
            v
        };
        let after_alpha = riff(&[vp8x(2), frame(&[chunk(b"ALPH", &[0; 4]), renamed])]);
        // a VP8X that says it has 4 bytes (the decoder reads its 10 whatever it says: here the canvas'
        // sides are the next chunk's header, 0 + 1 each), then an empty chunk before the frame
        let mut short = chunk(b"VP8X", &[0; 4]);
        short.extend(chunk(b"\0\0\0\0", &[]));
        let short_vp8x = riff(&[short, vp8(16383)]);
        // an odd-sized ALPH whose frame's last byte lies past the ANMF (its padding byte): the decoder
        // reads the frame from the file
        let mut odd = vec![0; 16];
        odd.extend(chunk(b"ALPH", &[0; 3]));
        odd.extend(&vp8(16383)[..8 + 9]);
        let mut odd_alpha = riff(&[vp8x(2), chunk(b"ANMF", &odd)]);
        assert_eq!(odd.len() % 2, 1, "the ANMF ends in a padding byte");
        *odd_alpha.last_mut().unwrap() = 0x3F;
        for (name, bytes) in [
            ("short_vp8x", short_vp8x),
            ("odd_alpha", odd_alpha),
            ("past_end", past_end),
            ("animated_decoy", animated_decoy),
            ("still_decoy", still_decoy),
            ("after_alpha", after_alpha),
        ] {
            assert_eq!(
                webp_lossy_frame_mismatch(&bytes),
                Some(((16383, 16383), (1, 1))),
                "{name}"
            );
        }
    }

    #[test]
    fn output_depth_parses_and_prints() {
        assert_eq!(OutputDepth::default(), OutputDepth::Eight);
        for d in [OutputDepth::Eight, OutputDepth::Sixteen] {
            assert_eq!(d.to_string().parse::<OutputDepth>().unwrap(), d);
        }
        assert_eq!("16".parse::<OutputDepth>().unwrap(), OutputDepth::Sixteen);
        let err = "12".parse::<OutputDepth>().unwrap_err().to_string();
        assert!(err.starts_with("output_depth: "), "{err}");
    }

    /// An engine result with values between the 8-bit steps and outside 0..255.
    fn float_result() -> Rgb32FImage {
        let values = [
            1000.0 / 257.0,
            0.0,
            255.0,
            12.4,
            12.5,
            -3.0,
            300.0,
            65_000.0 / 257.0,
            128.2,
        ];
        Rgb32FImage::from_fn(3, 3, |x, y| {
            let v = values[(y * 3 + x) as usize];
            Rgb([v, 255.0 - v, v / 2.0])
        })
    }

    #[test]
    fn save_output_16_bits_keeps_the_precision() {
        let dir = tempfile::tempdir().unwrap();
        let rgb = float_result();
        for ext in ["png", "tif"] {
            let path = dir.path().join(format!("out.{ext}"));
            save_output(&rgb, None, OutputDepth::Sixteen, &path).unwrap();
            let back = image::open(&path).unwrap();
            let DynamicImage::ImageRgb16(back) = back else {
                panic!("{ext}: not 16-bit RGB: {:?}", back.color());
            };
            for (x, y, p) in rgb.enumerate_pixels() {
                let want =
                    p.0.map(|v| (f64::from(v) * 257.0).round().clamp(0.0, 65_535.0) as u16);
                assert_eq!(back.get_pixel(x, y).0, want, "{ext} at ({x}, {y})");
            }
            assert_eq!(back.get_pixel(0, 0)[0], 1000);
            assert_eq!(back.get_pixel(1, 2)[0], 65_000);
        }
        // 8 bits: rounded and clamped
        let path = dir.path().join("out8.png");
        save_output(&rgb, None, OutputDepth::Eight, &path).unwrap();
        let back = load(&path).unwrap();
        let firsts: Vec<u8> = back.pixels().map(|p| p[0]).collect();
        assert_eq!(firsts, [4, 0, 255, 12, 13, 0, 255, 253, 128]);
    }

    #[test]
    fn save_output_carries_alpha_resized_to_the_output() {
        let dir = tempfile::tempdir().unwrap();
        let rgb = float_result();
        let alpha = GrayImage::from_fn(3, 3, |x, y| Luma([(x * 100 + y * 10) as u8]));
        let path = dir.path().join("a.png");
        save_output(&rgb, Some(&alpha), OutputDepth::Eight, &path).unwrap();
        let back = image::open(&path).unwrap();
        assert_eq!(back.color(), image::ColorType::Rgba8);
        let alpha_back: Vec<u8> = back.to_rgba8().pixels().map(|p| p[3]).collect();
        assert_eq!(alpha_back, alpha.as_raw().clone());
        assert_eq!(load_full(&path).unwrap().alpha.unwrap(), alpha);

        let path = dir.path().join("a16.tiff");
        save_output(&rgb, Some(&alpha), OutputDepth::Sixteen, &path).unwrap();
        let DynamicImage::ImageRgba16(back) = image::open(&path).unwrap() else {
            panic!("not 16-bit RGBA");
        };
        assert_eq!(back.get_pixel(0, 0).0, [1000, 65_535 - 1000, 500, 0]);
        assert_eq!(back.get_pixel(2, 1)[3], 210 * 257);

        // an alpha of another size is resampled to the output's
        let big = GrayImage::from_pixel(6, 6, Luma([100]));
        let bytes = encode_output(&rgb, Some(&big), OutputDepth::Eight, ImageFormat::Png).unwrap();
        let back = decode_full(&bytes, "resized").unwrap().alpha.unwrap();
        assert_eq!(back.dimensions(), (3, 3));
        assert!(back.iter().all(|&a| a.abs_diff(100) <= 1), "{back:?}");
    }

    #[test]
    fn jpeg_output_is_8_bit_and_composites_alpha_over_white() {
        let rgb = Rgb32FImage::from_pixel(16, 16, Rgb([0.0, 0.0, 0.0]));
        let err = encode_output(&rgb, None, OutputDepth::Sixteen, ImageFormat::Jpeg)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("output_depth: ") && err.contains("JPEG"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jpg");
        let err = save_output(&rgb, None, OutputDepth::Sixteen, &path).unwrap_err();
        assert!(err.to_string().starts_with("output_depth: "), "{err}");
        assert!(!path.exists());
        // left half transparent: white; right half opaque: black
        let alpha = GrayImage::from_fn(16, 16, |x, _| Luma([if x < 8 { 0 } else { 255 }]));
        save_output(&rgb, Some(&alpha), OutputDepth::Eight, &path).unwrap();
        let back = load(&path).unwrap();
        assert!(
            back.get_pixel(2, 8).0.iter().all(|&v| v >= 250),
            "{:?}",
            back.get_pixel(2, 8)
        );
        assert!(
            back.get_pixel(13, 8).0.iter().all(|&v| v <= 5),
            "{:?}",
            back.get_pixel(13, 8)
        );
    }

    #[test]
    fn output_format_by_extension() {
        let f = |p: &str| output_format(Path::new(p));
        assert_eq!(f("a.png").unwrap(), ImageFormat::Png);
        assert_eq!(f("a.JPEG").unwrap(), ImageFormat::Jpeg);
        assert_eq!(f("a.tif").unwrap(), ImageFormat::Tiff);
        assert_eq!(f("a.TIFF").unwrap(), ImageFormat::Tiff);
        for bad in ["a.webp", "a.bmp", "a"] {
            let err = f(bad).unwrap_err().to_string();
            assert!(
                err.starts_with("output: ") && err.contains(".tiff"),
                "{err}"
            );
        }
        let err = encode_output(&float_result(), None, OutputDepth::Eight, ImageFormat::Bmp)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("output: "), "{err}");
    }

    #[test]
    fn save_encoded_keeps_png_bytes_and_alpha_in_tiff_and_composites_jpeg() {
        let dir = tempfile::tempdir().unwrap();
        let rgba = image::RgbaImage::from_fn(8, 4, |x, _| {
            Rgba([200, 10, 60, if x < 4 { 0 } else { 255 }])
        });
        let mut png = Vec::new();
        rgba.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let as_png = dir.path().join("r.png");
        save_encoded(&png, "r", &as_png).unwrap();
        assert_eq!(std::fs::read(&as_png).unwrap(), png);
        let as_tiff = dir.path().join("r.tif");
        save_encoded(&png, "r", &as_tiff).unwrap();
        assert_eq!(image::open(&as_tiff).unwrap().to_rgba8(), rgba);
        let as_jpeg = dir.path().join("r.jpg");
        save_encoded(&png, "r", &as_jpeg).unwrap();
        let jpeg = image::open(&as_jpeg).unwrap().to_rgb8();
        assert!(
            jpeg.get_pixel(0, 0).0.iter().all(|&v| v > 240),
            "over white"
        );
        assert!(save_encoded(b"junk", "r", &as_tiff)
            .unwrap_err()
            .to_string()
            .starts_with("r:"));
    }

    #[test]
    fn a_window_of_a_resize_equals_the_crop_of_the_whole_resize() {
        let img = RgbImage::from_fn(57, 43, |x, y| {
            Rgb([
                (x * 37 + y * 11) as u8,
                (x * x + 3 * y) as u8,
                (y * y * 5) as u8,
            ])
        });
        // up (a later scale's init), down (a large photo to a canvas), mixed
        for (width, height) in [(160, 121), (31, 23), (90, 20), (57, 43)] {
            let whole = image::imageops::resize(&img, width, height, FilterType::Lanczos3);
            for window in [
                (0, 0, width.min(17), height.min(13)),
                (width / 3, height / 4, width / 2, height / 2),
                (width - 9, height - 7, 9, 7),
                (0, 0, width, height),
            ] {
                let (x, y, w, h) = window;
                let expected = image::imageops::crop_imm(&whole, x, y, w, h).to_image();
                let got = resize_window(&img, (width, height), window).unwrap();
                assert_eq!(got, expected, "{width}x{height} window {window:?}");
            }
        }
        assert!(resize_window(&img, (40, 30), (35, 0, 10, 10))
            .unwrap_err()
            .to_string()
            .starts_with("tile"));
    }

    /// A resize in bands of rows on several threads has the pixels of one pass of
    /// `image::imageops::resize`, whatever the bands (more than the rows, not dividing them), and so has a
    /// window of it; only a large one is split.
    #[test]
    fn a_resize_in_bands_equals_one_pass() {
        let img = RgbImage::from_fn(203, 151, |x, y| {
            Rgb([(x * 29 + y * 7) as u8, (x * y) as u8, (y * 3 + x / 5) as u8])
        });
        for (width, height) in [(64, 47), (437, 329), (120, 9), (203, 151), (1, 40), (40, 1)] {
            let one = image::imageops::resize(&img, width, height, FilterType::Lanczos3);
            for bands in [2, 3, 7, 64] {
                let got = resize_in_bands(&img, (width, height), bands);
                assert_eq!(
                    got.dimensions(),
                    (width, height),
                    "{width}x{height} in {bands}"
                );
                assert!(got == one, "{width}x{height} in {bands} bands");
            }
        }
        // a window's bands: its rows, wherever it lies
        for (window, bands) in [
            ((0, 0, 437, 329), 5),
            ((100, 37, 200, 150), 3),
            ((436, 7, 1, 300), 64),
        ] {
            let whole = image::imageops::resize(&img, 437, 329, FilterType::Lanczos3);
            let (x, y, w, h) = window;
            let cut = image::imageops::crop_imm(&whole, x, y, w, h).to_image();
            let got = resize_window_in_bands(&img, (437, 329), window, bands).unwrap();
            assert!(got == cut, "{window:?} in {bands} bands");
        }
        assert_eq!(resize_bands((203, 151), (437, 329)), 1, "small: one pass");
        // a 512-px tile of a 2048 x 1536 canvas from a 1024 x 768 content: banded (about 5 ms of work)
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        assert_eq!(
            window_bands((1024, 768), (2048, 1536), (768, 512, 512, 512)),
            cores.clamp(1, 8)
        );
        assert_eq!(
            window_bands((1024, 768), (2048, 1536), (0, 0, 256, 256)),
            1,
            "small window"
        );
        assert_eq!(resize_bands((0, 0), (4096, 4096)), 1, "nothing to resample");
        assert_eq!(resize_bands((6000, 4000), (512, 341)), cores.clamp(1, 5));
    }

    /// A 1 x 1 RGB PNG whose header declares `width` x `height` px.
    fn png_declaring(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        RgbImage::new(1, 1)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        // IHDR: length (4), "IHDR" (4), width and height (4 each) from byte 16, CRC over type and data
        png[16..20].copy_from_slice(&width.to_be_bytes());
        png[20..24].copy_from_slice(&height.to_be_bytes());
        let crc = crc32fast::hash(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        png
    }

    #[test]
    fn a_header_declaring_too_many_pixels_is_refused_before_decoding() {
        let png = png_declaring(20_000, 20_000);
        for err in [
            dimensions(Cursor::new(&png), "huge.png").unwrap_err(),
            decode(&png, "huge.png").unwrap_err(),
        ] {
            let err = err.to_string();
            assert!(
                err.starts_with("huge.png: 20000 x 20000 px is more than"),
                "{err}"
            );
        }
        // a side so large that the decoder's allocation limit stops it reading the header
        let png = png_declaring(i32::MAX as u32, 1);
        for err in [
            dimensions(Cursor::new(&png), "wide.png").unwrap_err(),
            decode(&png, "wide.png").unwrap_err(),
        ] {
            assert_eq!(
                err.to_string(),
                "wide.png: cannot decode image: its header declares an image larger than the farm \
                 takes (at most 32768 px a side and 268435456 pixels)"
            );
        }
    }
}
