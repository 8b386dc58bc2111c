//! Property-based fuzzing (proptest) of the code that takes untrusted input: image decoding, parameter
//! validation, the tiling plan and the jobs it becomes, sweep parsing and the wire conversion.
//!
//! Every target asserts that nothing panics (a panic inside the code under test fails the case, and proptest
//! shrinks it to a minimal input) and the invariants that make the results usable (sizes, coverage, the
//! minimum sides VGG19 needs, errors naming their field or file).
//!
//! Bounded time: the number of cases of each target is `STYLEFARM_FUZZ_CASES` (default 1000) times the
//! target's factor (the second argument of its `run`, by its cost), so the default run takes about 35 s in
//! debug on 2 cores and `STYLEFARM_FUZZ_CASES=10000` is a 10x longer run. Inputs are random each run;
//! `STYLEFARM_FUZZ_SEED=N` replays one (a failing target prints its seed). On success each target writes
//! `fuzz NAME: N inputs, 0 crashes; M ACCEPTED (T s, seed S)` to stderr, M counting the inputs that got
//! through to its deepest checks (decoded, valid, planned...); libtest shows it (it bypasses libtest's
//! capture), nextest with `--success-output final`.

// the generators end their literals of RenderParams with `..Default::default()`, so that a new render option
// (a row of `render_options!`, a proto field) needs no change here: needless while they name every field
#![allow(clippy::needless_update)]

use std::cell::Cell;
use std::collections::HashMap;
use std::io::{Cursor, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{
    DynamicImage, GrayAlphaImage, GrayImage, ImageBuffer, ImageEncoder, ImageFormat, LumaA, Rgb,
    RgbImage, Rgba, RgbaImage,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

use stylefarm_core::checkpoint::CheckpointEvery;
use stylefarm_core::ids::{JobId, TaskId};
use stylefarm_core::imaging::{self, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE};
use stylefarm_core::job::{
    parse_sweep, ImageHash, JobKind, JobSpec, ScalePart, ScaleTask, SweepAxis, Task,
};
use stylefarm_core::params::{ImageSize, Init, Layer, Optimizer, Pooling, RenderParams, MAX_SIZE};
use stylefarm_core::params::{MAX_ITERATIONS, MAX_SCALES, MAX_STYLE_PIXELS};
use stylefarm_core::tiling::{
    self, AxisPlan, TileSizing, Tiling, MAX_TILE_SIZE, MIN_OVERLAP, MIN_TILE_SIZE,
    STORED_MIN_TILE_SIZE,
};
use stylefarm_core::tiling::{DEFAULT_OVERLAP, DEFAULT_TILE_SIZE};
use stylefarm_core::Error;
use stylefarm_proto::pb;
use stylefarm_proto::pb::job_spec::Kind as WireKind;

// ---------------------------------------------------------------------------------------------------------
// The runner: bounded case counts, a reproducible seed, a count of the inputs that ran.

const DEFAULT_BASE_CASES: u64 = 1000;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value}: expected a whole number")),
    )
}

thread_local! {
    /// Inputs of the running target that got through to the deepest checks (see [`accept`]).
    static ACCEPTED: Cell<usize> = const { Cell::new(0) };
}

/// Counts the current input as accepted by the code under test (decoded, valid, planned...), so that each
/// target reports how many of its inputs reached its deepest invariants, not only how many ran.
fn accept() {
    ACCEPTED.with(|c| c.set(c.get() + 1));
}

/// Runs `test` on `cases` inputs of `strategy`, where `cases` is `STYLEFARM_FUZZ_CASES` (default
/// [`DEFAULT_BASE_CASES`]) times `factor`; panics with the minimal failing input and the seed on failure.
/// `accepted` says what an input [`accept`]ed got through.
fn run<S: Strategy>(
    name: &str,
    factor: f64,
    accepted: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let base = env_u64("STYLEFARM_FUZZ_CASES").unwrap_or(DEFAULT_BASE_CASES);
    let cases = ((base as f64 * factor).ceil() as u64).clamp(1, u64::from(u32::MAX)) as u32;
    // one seed per target, from STYLEFARM_FUZZ_SEED or the clock
    let seed = env_u64("STYLEFARM_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let config = Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let ran = AtomicUsize::new(0);
    ACCEPTED.with(|c| c.set(0));
    let start = Instant::now();
    let result = runner.run(&strategy, |value| {
        ran.fetch_add(1, Ordering::Relaxed);
        test(value)
    });
    let ran = ran.into_inner();
    let secs = start.elapsed().as_secs_f64();
    match result {
        Ok(()) => {
            // straight to stderr, not through eprintln!, which the test harness captures
            let _ = writeln!(
                std::io::stderr(),
                "fuzz {name}: {ran} inputs, 0 crashes; {} {accepted} ({secs:.1} s, seed {seed})",
                ACCEPTED.with(Cell::get)
            );
        }
        Err(e) => panic!(
            "fuzz {name}: {e}\n({ran} inputs run, shrinking included; replay with STYLEFARM_FUZZ_SEED={seed} \
             STYLEFARM_FUZZ_CASES={base})"
        ),
    }
}

/// `Err` unless `err` is an [`Error::Invalid`] on one of `fields`.
fn check_field(err: &Error, fields: &[&str]) -> Result<(), TestCaseError> {
    match err {
        Error::Invalid { field, .. } if fields.contains(field) => Ok(()),
        other => Err(TestCaseError::fail(format!(
            "error '{other}' ({other:?}) names none of {fields:?}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------------------
// 1. Image decoding.

/// What a generated image is stored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    PngL8,
    PngLa8,
    PngRgb8,
    PngRgba8,
    PngRgb16,
    PngRgba16,
    PngPalette,
    Jpeg,
    WebpRgb,
    WebpRgba,
    TiffRgb8,
    TiffRgba8,
    TiffRgb16,
    Bmp,
    BmpRgba,
    Gif,
}

const KINDS: [Kind; 16] = [
    Kind::PngL8,
    Kind::PngLa8,
    Kind::PngRgb8,
    Kind::PngRgba8,
    Kind::PngRgb16,
    Kind::PngRgba16,
    Kind::PngPalette,
    Kind::Jpeg,
    Kind::WebpRgb,
    Kind::WebpRgba,
    Kind::TiffRgb8,
    Kind::TiffRgba8,
    Kind::TiffRgb16,
    Kind::Bmp,
    Kind::BmpRgba,
    Kind::Gif,
];

impl Kind {
    /// Whether the format carries an EXIF orientation through the image crate's encoder.
    fn has_exif(self) -> bool {
        matches!(
            self,
            Kind::PngL8
                | Kind::PngLa8
                | Kind::PngRgb8
                | Kind::PngRgba8
                | Kind::PngRgb16
                | Kind::PngRgba16
                | Kind::Jpeg
                | Kind::WebpRgb
                | Kind::WebpRgba
        )
    }

    /// Whether the decoded RGB must equal the source exactly (opaque sources).
    fn lossless_rgb(self) -> bool {
        matches!(
            self,
            Kind::PngRgb8 | Kind::WebpRgb | Kind::TiffRgb8 | Kind::Bmp
        )
    }
}

#[derive(Debug, Clone, Copy)]
enum Alpha {
    Opaque,
    /// 0 or 255
    Binary,
    Partial,
}

#[derive(Debug, Clone)]
struct ImageSpec {
    kind: Kind,
    width: u32,
    height: u32,
    seed: u64,
    /// Colours drawn from a palette of this many (0: every pixel its own random colour).
    palette: u8,
    alpha: Alpha,
    /// An EXIF orientation block (1..=8), for the formats that carry one.
    orientation: Option<u16>,
    jpeg_quality: u8,
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl ImageSpec {
    /// 64 random bits for pixel (x, y).
    fn bits(&self, x: u32, y: u32) -> u64 {
        let cell = if self.palette == 0 {
            (u64::from(x) << 32) | u64::from(y)
        } else {
            // one of `palette` colours, in blocks so that neighbours often repeat
            splitmix(self.seed ^ (u64::from(x / 3) << 20) ^ u64::from(y / 2))
                % u64::from(self.palette)
        };
        splitmix(self.seed.rotate_left(17) ^ cell)
    }

    fn alpha_of(&self, bits: u64) -> u8 {
        let a = (bits >> 48) as u8;
        match self.alpha {
            Alpha::Opaque => 255,
            Alpha::Binary => {
                if a & 1 == 0 {
                    255
                } else {
                    0
                }
            }
            Alpha::Partial => a,
        }
    }

    fn rgba8(&self) -> RgbaImage {
        RgbaImage::from_fn(self.width, self.height, |x, y| {
            let b = self.bits(x, y);
            Rgba([b as u8, (b >> 8) as u8, (b >> 16) as u8, self.alpha_of(b)])
        })
    }

    fn rgba16(&self) -> ImageBuffer<Rgba<u16>, Vec<u16>> {
        ImageBuffer::from_fn(self.width, self.height, |x, y| {
            let b = self.bits(x, y);
            let a = match self.alpha {
                Alpha::Partial => (b >> 48) as u16,
                _ => u16::from(self.alpha_of(b)) * 257,
            };
            Rgba([b as u16, (b >> 16) as u16, (b >> 32) as u16, a])
        })
    }

    /// The source as 8-bit RGB (alpha dropped).
    fn rgb8(&self) -> RgbImage {
        DynamicImage::ImageRgba8(self.rgba8()).to_rgb8()
    }

    fn exif(&self) -> Option<Vec<u8>> {
        self.orientation
            .filter(|_| self.kind.has_exif())
            .map(exif_orientation)
    }

    /// The size `decode_full` must give for the unmutated encoding.
    fn decoded_size(&self) -> (u32, u32) {
        match self.exif().and(self.orientation) {
            Some(5..=8) => (self.height, self.width),
            _ => (self.width, self.height),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        let exif = self.exif();
        let dynamic = |img: DynamicImage, format: ImageFormat| {
            let mut out = Cursor::new(Vec::new());
            img.write_to(&mut out, format).expect("encodes");
            out.into_inner()
        };
        match self.kind {
            Kind::PngL8
            | Kind::PngLa8
            | Kind::PngRgb8
            | Kind::PngRgba8
            | Kind::PngRgb16
            | Kind::PngRgba16 => {
                let img = match self.kind {
                    Kind::PngL8 => DynamicImage::ImageLuma8(GrayImage::from_fn(
                        self.width,
                        self.height,
                        |x, y| image::Luma([self.bits(x, y) as u8]),
                    )),
                    Kind::PngLa8 => DynamicImage::ImageLumaA8(GrayAlphaImage::from_fn(
                        self.width,
                        self.height,
                        |x, y| {
                            let b = self.bits(x, y);
                            LumaA([b as u8, self.alpha_of(b)])
                        },
                    )),
                    Kind::PngRgb8 => DynamicImage::ImageRgb8(self.rgb8()),
                    Kind::PngRgba8 => DynamicImage::ImageRgba8(self.rgba8()),
                    Kind::PngRgb16 => DynamicImage::ImageRgba16(self.rgba16()).to_rgb16().into(),
                    _ => DynamicImage::ImageRgba16(self.rgba16()),
                };
                let mut enc = PngEncoder::new(&mut bytes);
                if let Some(exif) = exif {
                    enc.set_exif_metadata(exif).expect("PNG takes EXIF");
                }
                img.write_with_encoder(enc).expect("encodes");
            }
            Kind::PngPalette => {
                let colours = usize::from(self.palette.max(1)).min(256);
                let palette: Vec<u8> = (0..colours as u64)
                    .flat_map(|i| {
                        let b = splitmix(self.seed ^ i);
                        [b as u8, (b >> 8) as u8, (b >> 16) as u8]
                    })
                    .collect();
                let indices: Vec<u8> = (0..self.height)
                    .flat_map(|y| (0..self.width).map(move |x| (x, y)))
                    .map(|(x, y)| (self.bits(x, y) % colours as u64) as u8)
                    .collect();
                let mut enc = png::Encoder::new(&mut bytes, self.width, self.height);
                enc.set_color(png::ColorType::Indexed);
                enc.set_depth(png::BitDepth::Eight);
                enc.set_palette(palette);
                if !matches!(self.alpha, Alpha::Opaque) {
                    let trns: Vec<u8> = (0..colours as u64)
                        .map(|i| self.alpha_of(splitmix(self.seed ^ i ^ 0xA5)))
                        .collect();
                    enc.set_trns(trns);
                }
                let mut w = enc.write_header().expect("header");
                w.write_image_data(&indices).expect("encodes");
            }
            Kind::Jpeg => {
                let mut enc = JpegEncoder::new_with_quality(&mut bytes, self.jpeg_quality);
                if let Some(exif) = exif {
                    enc.set_exif_metadata(exif).expect("JPEG takes EXIF");
                }
                self.rgb8().write_with_encoder(enc).expect("encodes");
            }
            Kind::WebpRgb | Kind::WebpRgba => {
                let mut enc = WebPEncoder::new_lossless(&mut bytes);
                if let Some(exif) = exif {
                    enc.set_exif_metadata(exif).expect("WebP takes EXIF");
                }
                if self.kind == Kind::WebpRgb {
                    self.rgb8().write_with_encoder(enc)
                } else {
                    self.rgba8().write_with_encoder(enc)
                }
                .expect("encodes");
            }
            Kind::TiffRgb8 => bytes = dynamic(self.rgb8().into(), ImageFormat::Tiff),
            Kind::TiffRgba8 => bytes = dynamic(self.rgba8().into(), ImageFormat::Tiff),
            Kind::TiffRgb16 => {
                bytes = dynamic(
                    DynamicImage::ImageRgba16(self.rgba16()).to_rgb16().into(),
                    ImageFormat::Tiff,
                )
            }
            Kind::Bmp => bytes = dynamic(self.rgb8().into(), ImageFormat::Bmp),
            Kind::BmpRgba => bytes = dynamic(self.rgba8().into(), ImageFormat::Bmp),
            Kind::Gif => bytes = dynamic(self.rgba8().into(), ImageFormat::Gif),
        }
        bytes
    }
}

/// An EXIF block (TIFF structure, little-endian) holding only Orientation = `n`.
fn exif_orientation(n: u16) -> Vec<u8> {
    let mut exif = b"II*\0".to_vec();
    exif.extend(8u32.to_le_bytes());
    exif.extend(1u16.to_le_bytes());
    exif.extend(0x0112u16.to_le_bytes());
    exif.extend(3u16.to_le_bytes());
    exif.extend(1u32.to_le_bytes());
    exif.extend(n.to_le_bytes());
    exif.extend([0, 0]);
    exif.extend(0u32.to_le_bytes());
    exif
}

fn image_spec() -> BoxedStrategy<ImageSpec> {
    let side = || prop_oneof![2 => 1..=8u32, 1 => 1..=64u32];
    (
        prop::sample::select(KINDS.to_vec()),
        side(),
        side(),
        any::<u64>(),
        prop_oneof![1 => Just(0u8), 3 => 1..=16u8],
        prop_oneof![
            Just(Alpha::Opaque),
            Just(Alpha::Binary),
            Just(Alpha::Partial)
        ],
        prop_oneof![2 => Just(None), 1 => (1..=8u16).prop_map(Some)],
        1..=100u8,
    )
        .prop_map(
            |(kind, width, height, seed, palette, alpha, orientation, jpeg_quality)| ImageSpec {
                kind,
                width,
                height,
                seed,
                // a GIF of more than 256 colours goes through NeuQuant, slow in debug builds
                palette: if kind == Kind::Gif && palette == 0 {
                    16
                } else {
                    palette
                },
                alpha,
                orientation,
                jpeg_quality,
            },
        )
        .boxed()
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Overwrite(Index, Vec<u8>),
    Delete(Index, u8),
}

fn mutation() -> BoxedStrategy<Mutation> {
    let bytes = || {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 1..=16),
            // big-endian and little-endian large numbers, for sizes and lengths
            prop::sample::select(vec![
                vec![0xFF, 0xFF, 0xFF, 0xFF],
                vec![0x7F, 0xFF, 0xFF, 0xFF],
                vec![0x00, 0x00, 0x80, 0x00],
                vec![0x00, 0x80, 0x00, 0x00],
                vec![0x00, 0x00, 0x00, 0x00],
                vec![0xFF, 0xD9],
                vec![0xFF, 0xD8, 0xFF],
            ]),
        ]
    };
    prop_oneof![
        4 => (any::<Index>(), 1..=255u8).prop_map(|(i, m)| Mutation::Flip(i, m)),
        2 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), bytes()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        2 => (any::<Index>(), bytes()).prop_map(|(i, b)| Mutation::Overwrite(i, b)),
        1 => (any::<Index>(), 1..=64u8).prop_map(|(i, n)| Mutation::Delete(i, n)),
    ]
    .boxed()
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::Flip(at, mask) if len > 0 => bytes[at.index(len)] ^= mask,
        Mutation::Truncate(at) => bytes.truncate(at.index(len + 1)),
        Mutation::Insert(at, new) => {
            let at = at.index(len + 1);
            bytes.splice(at..at, new.iter().copied());
        }
        Mutation::Overwrite(at, new) if len > 0 => {
            let at = at.index(len);
            for (i, &b) in new.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(at + i) {
                    *slot = b;
                }
            }
        }
        Mutation::Delete(at, n) if len > 0 => {
            let at = at.index(len);
            let end = (at + usize::from(*n)).min(len);
            bytes.drain(at..end);
        }
        _ => {}
    }
}

/// Most pixels a GIF's header may declare for the fuzz targets to decode it whole. A GIF's frames may be
/// smaller than its logical screen, the rest transparent, so a mutated header turns a 100-byte GIF into a
/// valid 10000 x 28000 image (within [`MAX_IMAGE_SIDE`] and [`MAX_IMAGE_BYTES`]: a legitimate input) whose
/// decoding and compositing over white takes a minute in a debug build. Past this only its header is
/// checked; the targets count such inputs. (The other formats fail fast when their data is missing.)
const MAX_DECODED_GIF_PIXELS: u64 = 1 << 21;

thread_local! {
    static HEADER_ONLY: Cell<usize> = const { Cell::new(0) };
}

/// Decodes `bytes` both ways and checks the invariants; the decoded size when `decode_full` succeeds.
fn check_decode(bytes: &[u8], name: &str) -> Result<Option<(u32, u32)>, TestCaseError> {
    let named = |e: &Error| -> Result<(), TestCaseError> {
        match e {
            Error::Image { path, .. } if path == name => {
                prop_assert!(e.to_string().starts_with(&format!("{name}: ")), "{e}");
                Ok(())
            }
            other => Err(TestCaseError::fail(format!(
                "error does not name the file {name}: {other:?}"
            ))),
        }
    };
    let header = imaging::dimensions(Cursor::new(bytes), name);
    if let (Ok((w, h)), Ok(ImageFormat::Gif)) = (&header, image::guess_format(bytes)) {
        let (w, h) = (*w, *h);
        if u64::from(w) * u64::from(h) > MAX_DECODED_GIF_PIXELS {
            prop_assert!(w <= MAX_IMAGE_SIDE && h <= MAX_IMAGE_SIDE, "{w} x {h}");
            HEADER_ONLY.with(|c| c.set(c.get() + 1));
            return Ok(None);
        }
    }
    let full = imaging::decode_full(bytes, name);
    let size = match &full {
        Ok(d) => {
            let (w, h) = d.rgb.dimensions();
            prop_assert!(w > 0 && h > 0, "decoded {w} x {h}");
            prop_assert!(w <= MAX_IMAGE_SIDE && h <= MAX_IMAGE_SIDE, "{w} x {h}");
            prop_assert!(u64::from(w) * u64::from(h) * 3 <= MAX_IMAGE_BYTES);
            prop_assert!(u64::from(w) * u64::from(h) <= MAX_IMAGE_PIXELS);
            prop_assert_eq!(d.rgb.as_raw().len() as u64, u64::from(w) * u64::from(h) * 3);
            if let Some(alpha) = &d.alpha {
                prop_assert_eq!(alpha.dimensions(), (w, h));
                prop_assert!(
                    alpha.pixels().any(|p| p[0] != 255),
                    "an alpha that is opaque everywhere must be None"
                );
            }
            Some((w, h))
        }
        Err(e) => {
            named(e)?;
            None
        }
    };
    match (&header, size) {
        (Ok(dims), Some(size)) => prop_assert_eq!(*dims, size, "header vs decoded size"),
        (Err(e), Some(_)) => {
            return Err(TestCaseError::fail(format!(
                "decode_full succeeded, dimensions failed: {e}"
            )))
        }
        (Ok((w, h)), None) => {
            prop_assert!(*w > 0 && *h > 0 && *w <= MAX_IMAGE_SIDE && *h <= MAX_IMAGE_SIDE);
            prop_assert!(u64::from(*w) * u64::from(*h) <= MAX_IMAGE_PIXELS);
        }
        (Err(e), None) => named(e)?,
    }
    Ok(size)
}

fn file_name() -> impl Strategy<Value = String> {
    "[a-z0-9 _-]{1,12}\\.(png|jpg|webp|tif|bmp|gif|bin)"
}

#[test]
fn fuzz_decode_arbitrary_bytes() {
    let bytes = prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..256),
        // arbitrary bytes behind each format's signature, so the decoders get past the sniffing
        2 => (
            prop::sample::select(vec![
                b"\x89PNG\r\n\x1a\n".to_vec(),
                b"\xFF\xD8\xFF".to_vec(),
                b"RIFF\0\0\0\0WEBPVP8L".to_vec(),
                b"II*\0".to_vec(),
                b"MM\0*".to_vec(),
                b"BM".to_vec(),
            ]),
            prop::collection::vec(any::<u8>(), 0..256),
        )
            .prop_map(|(mut magic, rest)| {
                magic.extend(rest);
                magic
            }),
        // a GIF's logical screen kept under MAX_DECODED_GIF_PIXELS, so that it is decoded
        1 => (0..=1448u16, 0..=1448u16, prop::collection::vec(any::<u8>(), 0..256)).prop_map(
            |(w, h, rest)| {
                let mut gif = b"GIF89a".to_vec();
                gif.extend(w.to_le_bytes());
                gif.extend(h.to_le_bytes());
                gif.extend(rest);
                gif
            }
        ),
    ];
    run(
        "decode (arbitrary bytes)",
        100.0,
        "decoded",
        (bytes, file_name()),
        |(bytes, name)| check_decode(&bytes, &name).map(|size| size.map_or((), |_| accept())),
    );
    report_header_only("decode (arbitrary bytes)");
}

/// Writes how many inputs of a decode target were GIFs declaring more than [`MAX_DECODED_GIF_PIXELS`].
fn report_header_only(name: &str) {
    let n = HEADER_ONLY.with(|c| c.replace(0));
    let _ = writeln!(
        std::io::stderr(),
        "fuzz {name}: {n} GIFs declared over {MAX_DECODED_GIF_PIXELS} px: header checked, not decoded"
    );
}

#[test]
fn fuzz_decode_valid_images() {
    run(
        "decode (valid images)",
        15.0,
        "decoded as encoded",
        (image_spec(), file_name()),
        |(spec, name)| {
            let bytes = spec.encode();
            let size = check_decode(&bytes, &name)?;
            prop_assert_eq!(size, Some(spec.decoded_size()), "{:?}", spec.kind);
            let decoded = imaging::decode_full(&bytes, &name).expect("checked");
            let unturned = spec.exif().is_none() || spec.orientation == Some(1);
            if unturned && spec.kind.lossless_rgb() {
                prop_assert!(decoded.rgb == spec.rgb8(), "{:?}: pixels differ", spec.kind);
                prop_assert!(decoded.alpha.is_none());
            }
            if unturned && matches!(spec.kind, Kind::PngRgba8 | Kind::WebpRgba) {
                // composited over white: round(a * c + (1 - a) * 255); the alpha kept unless opaque
                let src = spec.rgba8();
                for (x, y, p) in decoded.rgb.enumerate_pixels() {
                    let s = src.get_pixel(x, y).0;
                    let a = f64::from(s[3]) / 255.0;
                    let want =
                        [0, 1, 2].map(|c| (a * f64::from(s[c]) + (1.0 - a) * 255.0).round() as u8);
                    prop_assert_eq!(p.0, want, "at ({}, {})", x, y);
                }
                let opaque = src.pixels().all(|p| p[3] == 255);
                match &decoded.alpha {
                    None => prop_assert!(opaque),
                    Some(alpha) => {
                        prop_assert!(!opaque);
                        prop_assert!(alpha.pixels().zip(src.pixels()).all(|(a, s)| a[0] == s[3]));
                    }
                }
            }
            accept();
            Ok(())
        },
    );
}

#[test]
fn fuzz_decode_mutated_images() {
    run(
        "decode (mutated images)",
        80.0,
        "still decoded",
        (
            image_spec(),
            prop::collection::vec(mutation(), 1..=4),
            file_name(),
        ),
        |(spec, mutations, name)| {
            let mut bytes = spec.encode();
            for m in &mutations {
                mutate(&mut bytes, m);
            }
            check_decode(&bytes, &name).map(|size| size.map_or((), |_| accept()))
        },
    );
    report_header_only("decode (mutated images)");
}

// ---------------------------------------------------------------------------------------------------------
// 2. Parameter validation and the size checks.

fn weight() -> impl Strategy<Value = f64> {
    prop_oneof![
        24 => 0.0..1e4f64,
        2 => Just(0.0),
        1 => Just(-0.0),
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => -1e4..0.0f64,
        1 => Just(f64::MAX),
        1 => Just(f64::MIN_POSITIVE),
        1 => Just(5e-324),
        1 => any::<f64>(),
    ]
}

fn iterations() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => 1..=1000u32,
        1 => Just(0u32),
        1 => Just(MAX_ITERATIONS),
        1 => Just(MAX_ITERATIONS + 1),
        1 => any::<u32>(),
    ]
}

fn layers() -> impl Strategy<Value = Vec<Layer>> {
    let all: Vec<Layer> = Layer::all().collect();
    prop_oneof![
        1 => Just(Vec::new()),
        12 => prop::collection::vec(prop::sample::select(all), 1..=5),
    ]
}

fn style_scale() -> impl Strategy<Value = f64> {
    prop_oneof![
        12 => 0.05..=8.0f64,
        2 => 0.001..0.05f64,
        1 => Just(0.0),
        1 => Just(f64::NAN),
        1 => Just(1e300),
        1 => Just(8.0),
        1 => Just(8.000_001),
        1 => Just(1e-9),
        1 => Just(-1.0),
        1 => Just(f64::INFINITY),
    ]
}

/// One field of otherwise valid parameters set to an invalid or extreme value.
#[derive(Debug, Clone)]
enum Corruption {
    Size(u32),
    Iterations(u32),
    Scales(u32),
    ScaleIterations(Vec<u32>),
    LearningRate(f64),
    HistorySize(u32),
    ContentWeight(f64),
    StyleWeight(f64),
    TvWeight(f64),
    StyleScale(f64),
    StyleBlend(Vec<f64>),
    ContentLayers(Vec<Layer>),
    StyleLayers(Vec<Layer>),
    StyleLayerWeights(Vec<f64>),
    AvgDecay(f64),
    StyleSize(u32),
}

fn corruption() -> BoxedStrategy<Corruption> {
    let bad_weight = || {
        prop::sample::select(vec![
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            -1e-300,
            f64::MIN,
            f64::MAX,
            0.0,
        ])
    };
    let size = prop_oneof![
        Just(0u32),
        Just(MAX_SIZE + 1),
        1..=20_000u32,
        1..=15u32,
        any::<u32>(),
    ];
    let count = || prop_oneof![Just(0u32), Just(MAX_ITERATIONS + 1), any::<u32>()];
    prop_oneof![
        size.prop_map(Corruption::Size),
        count().prop_map(Corruption::Iterations),
        prop_oneof![Just(0u32), Just(MAX_SCALES + 1), 0..=40u32].prop_map(Corruption::Scales),
        prop::collection::vec(prop_oneof![3 => 1..=1000u32, 1 => count()], 0..=10)
            .prop_map(Corruption::ScaleIterations),
        prop_oneof![bad_weight(), Just(-0.0)].prop_map(Corruption::LearningRate),
        prop_oneof![Just(0u32), Just(1001u32), any::<u32>()].prop_map(Corruption::HistorySize),
        bad_weight().prop_map(Corruption::ContentWeight),
        bad_weight().prop_map(Corruption::StyleWeight),
        bad_weight().prop_map(Corruption::TvWeight),
        style_scale().prop_map(Corruption::StyleScale),
        prop::collection::vec(
            prop_oneof![weight(), Just(f64::MAX), Just(1e308), Just(0.0)],
            0..=5
        )
        .prop_map(Corruption::StyleBlend),
        Just(Corruption::ContentLayers(Vec::new())),
        Just(Corruption::StyleLayers(Vec::new())),
        layers().prop_map(Corruption::StyleLayers),
        prop::collection::vec(prop_oneof![weight(), bad_weight(), Just(f64::MAX)], 0..=6)
            .prop_map(Corruption::StyleLayerWeights),
        prop_oneof![Just(1.0), Just(-1e-9), Just(f64::NAN), 0.0..1.0f64]
            .prop_map(Corruption::AvgDecay),
        prop_oneof![Just(MAX_SIZE + 1), any::<u32>(), 0..=64u32].prop_map(Corruption::StyleSize),
    ]
    .boxed()
}

fn corrupt(p: &mut RenderParams, c: Corruption) {
    match c {
        Corruption::Size(v) => p.size = v,
        Corruption::Iterations(v) => p.iterations = v,
        Corruption::Scales(v) => p.scales = v,
        Corruption::ScaleIterations(v) => p.scale_iterations = v,
        Corruption::LearningRate(v) => p.learning_rate = v,
        Corruption::HistorySize(v) => p.history_size = v,
        Corruption::ContentWeight(v) => p.content_weight = v,
        Corruption::StyleWeight(v) => p.style_weight = v,
        Corruption::TvWeight(v) => p.tv_weight = v,
        Corruption::StyleScale(v) => p.style_scale = v,
        Corruption::StyleBlend(v) => p.style_blend = v,
        Corruption::ContentLayers(v) => p.content_layers = v,
        Corruption::StyleLayers(v) => p.style_layers = v,
        Corruption::StyleLayerWeights(v) => p.style_layer_weights = v,
        Corruption::AvgDecay(v) => p.avg_decay = v,
        Corruption::StyleSize(v) => p.style_size = v,
    }
}

/// Render parameters for a job of `styles` style images: valid ones, with extreme values among them (sizes
/// from 16 to MAX_SIZE, up to MAX_SCALES scales, huge weights, style scales from 0.05 to 8), then in about
/// a third of the cases one to three fields corrupted (zero, NaN, infinite, negative, out of range, empty).
fn render_params(styles: usize) -> BoxedStrategy<RenderParams> {
    let hash = ImageHash::of(b"init");
    let size = prop_oneof![
        4 => 16..=512u32,
        4 => 16..=4096u32,
        1 => 16..=MAX_SIZE,
        1 => prop::sample::select(vec![16u32, 17, 31, 32, 33, 63, 64, 65, MAX_SIZE]),
    ];
    let scales = prop_oneof![6 => 1..=3u32, 2 => 1..=MAX_SCALES];
    let valid_weight = || {
        prop_oneof![
            12 => 0.0..1e4f64,
            1 => prop::sample::select(vec![0.0, -0.0, 5e-324, f64::MIN_POSITIVE, 1e300, f64::MAX]),
        ]
    };
    let blend = prop_oneof![
        2 => Just(Vec::new()),
        1 => prop::collection::vec(
            prop_oneof![4 => 0.01..10.0f64, 1 => valid_weight()],
            styles..=styles
        ),
    ];
    let valid_scale = prop_oneof![
        6 => 0.25..=2.0f64,
        2 => 0.05..=8.0f64,
        1 => Just(8.0),
    ];
    // a farm job's inits: an uploaded image by its hash, not a file's path (refused on the wire)
    let init = prop_oneof![
        Just(Init::Content),
        Just(Init::Noise),
        Just(Init::Gray),
        Just(Init::Uniform),
        Just(Init::StyleMean),
        Just(Init::Image(hash)),
    ];
    let corruptions = prop_oneof![
        6 => Just(Vec::new()),
        2 => prop::collection::vec(corruption(), 1..=1),
        1 => prop::collection::vec(corruption(), 2..=3),
    ];
    (
        (
            size,
            prop_oneof![4 => 1..=1000u32, 1 => Just(MAX_ITERATIONS)],
            prop_oneof![3 => Just(None), 1 => prop::collection::vec(1..=1000u32, 8).prop_map(Some)],
            scales,
            prop_oneof![4 => 1e-3..100.0f64, 1 => valid_weight().prop_filter("> 0", |w| *w > 0.0)],
            1..=1000u32,
        ),
        (
            valid_weight(),
            valid_weight(),
            valid_weight(),
            blend,
            valid_scale,
        ),
        (
            prop::collection::vec(
                prop::sample::select(Layer::all().collect::<Vec<_>>()),
                1..=5,
            ),
            prop::collection::vec(
                prop::sample::select(Layer::all().collect::<Vec<_>>()),
                1..=5,
            ),
            prop_oneof![Just(Optimizer::Lbfgs), Just(Optimizer::Adam)],
            prop_oneof![Just(Pooling::Max), Just(Pooling::Avg), Just(Pooling::L2)],
            init,
            any::<u64>(),
            any::<bool>(),
        ),
        corruptions,
    )
        .prop_map(
            |(
                (size, iterations, per_scale, scales, learning_rate, history_size),
                (content_weight, style_weight, tv_weight, style_blend, style_scale),
                (content_layers, style_layers, optimizer, pooling, init, seed, original_colors),
                corruptions,
            )| {
                // as many scales as the size allows (the first at least 16 px)
                let scales = (1..=scales)
                    .rev()
                    .find(|s| size >> (s - 1) >= 16)
                    .unwrap_or(1);
                let mut p = RenderParams {
                    size,
                    iterations,
                    scale_iterations: per_scale
                        .map(|v| v[..scales as usize].to_vec())
                        .unwrap_or_default(),
                    optimizer,
                    learning_rate,
                    history_size,
                    content_weight,
                    style_weight,
                    tv_weight,
                    style_blend,
                    content_layers,
                    style_layers,
                    pooling,
                    init,
                    seed,
                    style_scale,
                    original_colors,
                    scales,
                    // an option added later takes its default here until the generator covers it
                    ..RenderParams::default()
                };
                for c in corruptions {
                    corrupt(&mut p, c);
                }
                p
            },
        )
        .boxed()
}

/// An image side, 1..=40000 px, mostly small.
fn side() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 1..=64u32,
        3 => 1..=2048u32,
        2 => 1..=40_000u32,
        1 => Just(1u32),
        1 => Just(40_000u32),
    ]
}

/// An image's width and height: mostly photo-like (16..=4096 px, aspect ratio up to 4), otherwise any
/// two sides of 1..=40000 px.
fn image_size() -> impl Strategy<Value = (u32, u32)> {
    prop_oneof![
        3 => (16..=4096u32, 1.0..=4.0f64, any::<bool>()).prop_map(|(long, aspect, tall)| {
            let short = ((f64::from(long) / aspect).round() as u32).max(1);
            if tall {
                (short, long)
            } else {
                (long, short)
            }
        }),
        1 => (side(), side()),
    ]
}

const PARAM_FIELDS: [&str; 19] = [
    "size",
    "iterations",
    "scales",
    "scale_iterations",
    "learning_rate",
    "history_size",
    "content_weight",
    "style_weight",
    "tv_weight",
    "style_scale",
    "style_size",
    "style",
    "style_blend",
    "content_layers",
    "style_layers",
    "style_layer_weights",
    "temporal_weight",
    "avg_decay",
    // not with luminance_only
    "match_colors",
];

/// What `validate` promises when it passes, written out independently.
fn check_valid(p: &RenderParams, styles: usize) -> Result<(), TestCaseError> {
    prop_assert!((1..=MAX_SIZE).contains(&p.size));
    prop_assert!((1..=MAX_ITERATIONS).contains(&p.iterations));
    prop_assert!((1..=MAX_SCALES).contains(&p.scales));
    prop_assert!(p.scale_iterations.is_empty() || p.scale_iterations.len() == p.scales as usize);
    prop_assert!(p
        .scale_iterations
        .iter()
        .all(|n| (1..=MAX_ITERATIONS).contains(n)));
    prop_assert!(p.learning_rate.is_finite() && p.learning_rate > 0.0);
    prop_assert!((0.0..1.0).contains(&p.avg_decay));
    prop_assert!((1..=1000).contains(&p.history_size));
    for w in [p.content_weight, p.style_weight, p.tv_weight] {
        prop_assert!(w.is_finite() && w >= 0.0);
    }
    prop_assert!(p.style_scale > 0.0 && p.style_scale <= 8.0);
    prop_assert!(p.style_size <= MAX_SIZE);
    prop_assert!(styles >= 1);
    prop_assert!(!p.content_layers.is_empty() && !p.style_layers.is_empty());
    let layer_weights: Vec<f64> = p.layer_weights().collect();
    prop_assert_eq!(layer_weights.len(), p.style_layers.len());
    prop_assert!(
        layer_weights.iter().all(|w| *w >= 0.0
            && (p.style_layer_weights.is_empty() || ((w * p.style_weight) as f32).is_finite())),
        "{layer_weights:?}"
    );
    // the derived values every renderer relies on
    let sizes = p.sizes_per_scale();
    prop_assert_eq!(sizes.len(), p.scales as usize);
    prop_assert_eq!(*sizes.last().unwrap(), p.size);
    prop_assert!(
        sizes[0] >= p.deepest_layer().min_input_side(),
        "first scale {sizes:?}"
    );
    prop_assert!(sizes.windows(2).all(|w| w[0] <= w[1]), "{sizes:?}");
    let iterations = p.iterations_per_scale();
    prop_assert_eq!(iterations.len(), p.scales as usize);
    prop_assert!(iterations.iter().all(|&n| n >= 1));
    let blend = p.blend_weights(styles);
    prop_assert_eq!(blend.len(), styles);
    prop_assert!(
        blend.iter().all(|w| w.is_finite() && *w >= 0.0),
        "{blend:?}"
    );
    let sum: f64 = blend.iter().sum();
    prop_assert!(
        (sum - 1.0).abs() < 1e-9,
        "blend {:?} sums to {sum}",
        p.style_blend
    );
    Ok(())
}

fn min_side(layer: Layer) -> u32 {
    // 2^(block-1): every block after the first starts behind a stride-2 pooling
    2u32.pow(u32::from(layer.block) - 1)
}

#[test]
fn fuzz_params_validate_and_check_sizes() {
    let strategy = (0usize..=4).prop_flat_map(|styles| {
        (
            render_params(styles),
            Just(styles),
            image_size(),
            prop::collection::vec(image_size(), styles..=styles),
            prop_oneof![
                6 => Just(None),
                2 => (16..=4096u32).prop_map(Some),
                1 => side().prop_map(Some),
                1 => any::<u32>().prop_map(Some),
            ],
        )
    });
    run(
        "params (validate, check_sizes)",
        100.0,
        "passed validate and check_sizes",
        strategy,
        |(params, styles, content, style_sizes, style_longest)| {
            if let Err(e) = params.validate(styles) {
                return check_field(&e, &PARAM_FIELDS);
            }
            check_valid(&params, styles)?;
            let names: Vec<String> = (0..styles).map(|i| format!("style-{i}.png")).collect();
            let style_images: Vec<ImageSize<'_>> = names
                .iter()
                .zip(&style_sizes)
                .map(|(n, &s)| ImageSize::new(n, s))
                .collect();
            let result = params.check_sizes(
                ImageSize::new("content.png", content),
                &style_images,
                style_longest,
            );
            // the condition check_sizes checks, written out
            let (need, style_need) = (
                min_side(params.deepest_layer()),
                min_side(params.deepest_style_layer()),
            );
            prop_assert!(params
                .content_layers
                .iter()
                .chain(&params.style_layers)
                .all(|&l| l <= params.deepest_layer()));
            let style_pixels: u64 = (style_sizes.iter())
                .map(|&(w, h)| u64::from(w) * u64::from(h))
                .sum();
            let mut fits = style_pixels <= MAX_STYLE_PIXELS;
            for longest in params.sizes_per_scale() {
                let (w, h) = imaging::working_size(content.0, content.1, longest);
                prop_assert_eq!(w.max(h), longest, "working size of {:?}", content);
                fits &= w.min(h) >= need;
                let style_side = params.style_side(style_longest.unwrap_or(longest));
                prop_assert!(style_side >= 1);
                for &(sw, sh) in &style_sizes {
                    let (w, h) = imaging::working_size(sw, sh, style_side);
                    fits &= w.min(h) >= style_need && style_side <= MAX_SIZE;
                }
            }
            match &result {
                Ok(()) => {
                    prop_assert!(fits, "check_sizes passed a size that does not fit");
                    accept();
                }
                Err(e) => {
                    prop_assert!(!fits, "check_sizes refused sizes that fit: {e}");
                    check_field(
                        e,
                        &["size", "scales", "style_scale", "style_size", "styles"],
                    )?;
                    let text = e.to_string();
                    prop_assert!(
                        text.contains("content.png")
                            || text.contains("style-")
                            || text.contains("pixels together"),
                        "{text}"
                    );
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------------------
// 3. The tiling plan, tiled jobs, sweeps.

fn tiling_strategy() -> BoxedStrategy<Tiling> {
    let tile = prop_oneof![
        6 => MIN_TILE_SIZE..=MAX_TILE_SIZE,
        3 => MIN_TILE_SIZE..=256u32,
        1 => 0..=100u32,
        1 => Just(MAX_TILE_SIZE + 1),
        1 => any::<u32>(),
    ];
    let exact = prop_oneof![3 => Just(false), 1 => Just(true)];
    let junk = prop_oneof![8 => Just(false), 1 => Just(true)];
    let sizing = prop_oneof![Just(TileSizing::Fixed), Just(TileSizing::Planned)];
    (tile, exact, junk, sizing)
        .prop_flat_map(|(tile_size, exact, junk, sizing)| {
            let overlap = if junk {
                prop_oneof![0..=16u32, any::<u32>()].boxed()
            } else {
                prop_oneof![
                    MIN_OVERLAP..=(tile_size / 2).max(MIN_OVERLAP),
                    Just(tile_size / 2)
                ]
                .boxed()
            };
            overlap.prop_map(move |overlap| Tiling {
                tile_size,
                overlap,
                exact,
                sizing,
            })
        })
        .boxed()
}

/// The axis plan invariants: edge-aligned, covering, neighbours overlapping by at least `overlap`, every
/// tile `extent` long.
fn check_axis(a: &AxisPlan, tiling: Tiling) -> Result<(), TestCaseError> {
    prop_assert!(a.len > 0, "empty axis");
    let want = if tiling.exact {
        a.len
    } else {
        tiling.tile_size.min(a.len)
    };
    prop_assert_eq!(a.extent, want);
    prop_assert!(!a.starts.is_empty());
    prop_assert_eq!(a.starts[0], 0);
    prop_assert_eq!(
        u64::from(*a.starts.last().unwrap()) + u64::from(a.extent),
        u64::from(a.len)
    );
    for pair in a.starts.windows(2) {
        prop_assert!(pair[0] < pair[1], "starts not increasing");
        // no gap, and the overlap the feathering needs
        prop_assert!(
            pair[0] + a.extent >= pair[1] + tiling.overlap,
            "overlap under {} at {:?}",
            tiling.overlap,
            pair
        );
    }
    Ok(())
}

/// Checks a plan against its canvas sizes; with `stitch`, stitches small canvases back from tiles cut out
/// of a known image.
fn check_plan(
    plans: &[tiling::ScalePlan],
    content: (u32, u32),
    params: &RenderParams,
    tiling: Tiling,
    stitch: bool,
) -> Result<(), TestCaseError> {
    let pyramid = tiling::pyramid_params(params, tiling).expect("plan passed");
    prop_assert!(pyramid.scales <= MAX_SCALES);
    let sizes = pyramid.sizes_per_scale();
    if pyramid.scale_iterations.is_empty() || pyramid.scale_iterations.len() == sizes.len() {
        prop_assert_eq!(plans.len(), sizes.len());
    }
    prop_assert!(!plans.is_empty());
    // the first scale fits one tile
    prop_assert!(
        sizes[0] <= tiling.tile_size,
        "first scale {} > tile",
        sizes[0]
    );
    for (s, plan) in plans.iter().enumerate() {
        prop_assert_eq!(
            (plan.width, plan.height),
            imaging::working_size(content.0, content.1, sizes[s])
        );
        prop_assert!(
            plan.width >= 1 && plan.height >= 1,
            "canvas {}x{}",
            plan.width,
            plan.height
        );
        let Some(grid) = &plan.grid else {
            prop_assert_eq!(s, 0, "a later scale has no grid");
            continue;
        };
        prop_assert!(s > 0, "the first scale has a grid");
        prop_assert_eq!((grid.xs.len, grid.ys.len), (plan.width, plan.height));
        check_axis(&grid.xs, tiling)?;
        check_axis(&grid.ys, tiling)?;
        prop_assert_eq!(grid.len(), grid.xs.count() * grid.ys.count());
        prop_assert_eq!(plan.tasks(), grid.len());
        if tiling.exact {
            prop_assert_eq!(grid.len(), 1);
        }
        let (min_w, min_h) = (
            tiling.tile_size.min(plan.width),
            tiling.tile_size.min(plan.height),
        );
        // the axes cover the canvas, so their product does; each rect must be inside, at least the minimum
        for (i, r) in grid.tiles().enumerate() {
            prop_assert!(
                u64::from(r.x) + u64::from(r.width) <= u64::from(plan.width)
                    && u64::from(r.y) + u64::from(r.height) <= u64::from(plan.height),
                "tile {i} {r:?} outside {}x{}",
                plan.width,
                plan.height
            );
            prop_assert!(r.width >= min_w && r.height >= min_h, "tile {i} {r:?}");
            prop_assert_eq!(grid.tile(i), r);
        }
        if stitch {
            let source = RgbImage::from_fn(plan.width, plan.height, |x, y| {
                let b = splitmix((u64::from(x) << 32) | u64::from(y));
                Rgb([b as u8, (b >> 8) as u8, (b >> 16) as u8])
            });
            let out = grid
                .stitch(|i| {
                    let r = grid.tile(i);
                    Ok::<_, tiling::StitchError>(
                        image::imageops::crop_imm(&source, r.x, r.y, r.width, r.height).to_image(),
                    )
                })
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(out.dimensions(), source.dimensions());
            for (a, b) in out.pixels().zip(source.pixels()) {
                for c in 0..3 {
                    prop_assert!(
                        a[c].abs_diff(b[c]) <= 1,
                        "stitching the source's own tiles changed {:?} into {:?}",
                        b,
                        a
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_tiling_plan() {
    let content_side = prop_oneof![1 => Just(0u32), 10 => side()];
    run(
        "tiling plan",
        50.0,
        "planned",
        (
            (1usize..=3).prop_flat_map(render_params),
            content_side.clone(),
            content_side,
            tiling_strategy(),
        ),
        |(params, w, h, tiling)| {
            let plan = tiling::plan(w, h, &params, tiling);
            let pyramid = tiling::pyramid_params(&params, tiling);
            prop_assert_eq!(plan.is_ok(), pyramid.is_ok());
            match plan {
                Ok(plans) => {
                    // the planner takes a stored job's tiling too (an earlier version's limits)
                    prop_assert!(tiling.validate_stored().is_ok());
                    check_plan(&plans, (w, h), &params, tiling, false)?;
                    accept();
                }
                Err(e) => check_field(
                    &e,
                    &["tile_size", "overlap", "size", "scales", "scale_iterations"],
                )?,
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_tiling_stitch() {
    // small canvases (the stitch runs in a debug build) cut into several small tiles
    let strategy = (
        (1usize..=2).prop_flat_map(render_params),
        1..=160u32,
        0..=3u32,
        1..=400u32,
        1..=400u32,
        (MIN_TILE_SIZE..=192u32).prop_flat_map(|tile| (Just(tile), MIN_OVERLAP..=tile / 2)),
        any::<bool>(),
    )
        .prop_map(
            |(params, size, scales, w, h, (tile_size, overlap), exact)| {
                let tiling = Tiling {
                    tile_size,
                    overlap,
                    exact,
                    sizing: TileSizing::Fixed,
                };
                (
                    RenderParams {
                        size,
                        scales,
                        ..params
                    },
                    w,
                    h,
                    tiling,
                )
            },
        );
    run(
        "tiling plan and stitch (small canvases)",
        4.0,
        "planned and stitched",
        strategy,
        |(params, w, h, tiling)| match tiling::plan(w, h, &params, tiling) {
            Ok(plans) => check_plan(&plans, (w, h), &params, tiling, true).map(|()| accept()),
            Err(e) => check_field(
                &e,
                &["tile_size", "overlap", "size", "scales", "scale_iterations"],
            ),
        },
    );
}

fn hash(n: u8) -> ImageHash {
    ImageHash::of(&[n])
}

/// Job kinds with their parameters, for jobs of `styles` style images: mostly tiled (a tiling of
/// [`tiling_strategy`], or the default), or a sweep over axes mostly valid for the styles (as the CLI parses
/// them; sometimes none, which a sweep job refuses).
fn kind(styles: usize) -> BoxedStrategy<JobKind> {
    let tiling = prop_oneof![8 => tiling_strategy(), 1 => Just(Tiling::default())];
    let axes = prop_oneof![
        8 => valid_sweep_text(styles).prop_map(|text| parse_sweep(&text).unwrap_or_default()),
        1 => Just(Vec::new()),
    ];
    prop_oneof![
        6 => tiling.prop_map(JobKind::Tiled),
        1 => Just(JobKind::Single),
        1 => Just(JobKind::Batch),
        1 => axes.prop_map(JobKind::Sweep),
        1 => (0..=4u32, prop_oneof![Just(0u32), 1..=50u32]).prop_map(|(chunk_frames, frame_iterations)| {
            JobKind::Video(stylefarm_core::job::Video {
                chunk_frames,
                frame_iterations,
            })
        }),
    ]
    .boxed()
}

/// The fields a job's errors may name besides a parameter's (a job's kind and its parameters are one value
/// now: no field names a tiling on a job of another kind).
const JOB_ONLY_FIELDS: [&str; 13] = [
    "max_attempts",
    "after",
    "keep_going",
    "chunk_frames",
    "frame_iterations",
    "worker_tags",
    "contents",
    "styles",
    "tile_size",
    "overlap",
    "sweep",
    "scale",
    "image",
];

/// Every field a job's errors may name.
fn job_fields() -> Vec<&'static str> {
    [&PARAM_FIELDS[..], &JOB_ONLY_FIELDS[..]].concat()
}

/// `spec.check_sizes` with `sizes`; the result, after checking that an error names a field.
fn job_check_sizes(
    spec: &JobSpec,
    sizes: &HashMap<ImageHash, (u32, u32)>,
) -> Result<bool, TestCaseError> {
    let mut asked = 0usize;
    let result = spec.check_sizes(|h: &ImageHash| {
        asked += 1;
        sizes
            .get(h)
            .copied()
            .ok_or_else(|| Error::invalid("image", format!("{h}: unknown")))
    });
    prop_assert!(asked <= sizes.len().max(spec.contents.len() + spec.styles.len()));
    match result {
        Ok(()) => Ok(true),
        Err(e) => {
            check_field(&e, &job_fields())?;
            Ok(false)
        }
    }
}

#[test]
fn fuzz_tiled_jobs() {
    let contents = prop_oneof![8 => Just(1usize), 1 => 0usize..=3];
    let styles = prop_oneof![8 => 1usize..=3, 1 => Just(0usize)];
    let strategy = (contents, styles).prop_flat_map(|(contents, styles)| {
        (
            kind(styles),
            Just(contents),
            Just(styles),
            render_params(styles),
            prop::collection::vec(image_size(), contents + styles),
            // the output's size in tiles, so that most pyramids have later scales
            prop_oneof![4 => (0.5..12.0f64).prop_map(Some), 1 => Just(None)],
            prop_oneof![4 => any::<Index>().prop_map(Ok), 1 => (0u32..=9).prop_map(Err)],
            // the device memory of the workers the planner sizes tiles for (0: unknown)
            prop_oneof![
                1 => Just(Vec::new()),
                2 => prop::collection::vec(prop_oneof![Just(0u64), 0..=(1u64 << 41)], 1..12),
            ],
        )
    });
    run(
        "tiled jobs (check_sizes, tasks, scale_tasks)",
        30.0,
        "passed check_sizes and expanded into the tiles of a scale",
        strategy,
        |(kind, contents, styles, mut params, image_sizes, in_tiles, scale, workers)| {
            // the tile size: a tiled job's, the default for the other kinds
            let tile_size = kind.tiling().unwrap_or_default().tile_size;
            if let Some(tiles) = in_tiles.filter(|_| (16..=MAX_SIZE).contains(&params.size)) {
                params.size = ((f64::from(tile_size) * tiles) as u32).clamp(16, MAX_SIZE);
            }
            // distinct hashes; the contents first
            let spec = JobSpec::new(
                kind,
                (0..contents).map(|i| hash(i as u8)).collect(),
                (0..styles).map(|i| hash(100 + i as u8)).collect(),
                params,
            );
            let sizes: HashMap<ImageHash, (u32, u32)> = spec
                .contents
                .iter()
                .chain(&spec.styles)
                .cloned()
                .zip(image_sizes.iter().copied())
                .collect();
            let fits = job_check_sizes(&spec, &sizes)?;
            let tasks = spec.tasks();
            if fits {
                prop_assert!(tasks.is_ok(), "check_sizes passed a job whose tasks fail");
            }
            let tasks = match tasks {
                Ok(tasks) => tasks,
                Err(e) => return check_field(&e, &job_fields()),
            };
            prop_assert!(!tasks.is_empty());
            for task in &tasks {
                task.params.validate(task.styles.len()).map_err(|e| {
                    TestCaseError::fail(format!("task {} does not validate: {e}", task.label))
                })?;
            }
            let previous = hash(250);
            let Some(tiling) = spec.kind.tiling() else {
                // only a tiled job has a pyramid and scales of tiles: the others are refused naming `kind`
                let err = spec
                    .pyramid_params()
                    .expect_err("a pyramid of a job not tiled");
                check_field(&err, &["kind"])?;
                let content = image_sizes[0];
                let err = spec
                    .scale_tasks(content.0, content.1, 1, &previous, &workers, None)
                    .expect_err("scale tasks of a job not tiled");
                check_field(&err, &["kind"])?;
                return Ok(());
            };
            prop_assert_eq!(tasks.len(), 1);
            let first = &tasks[0].params;
            prop_assert!(first.size <= tiling.tile_size && first.scales == 1);
            let pyramid = spec.pyramid_params().expect("tasks passed");
            let content = image_sizes[0];
            let plans = tiling::plan(content.0, content.1, &spec.params, tiling)
                .map_err(|e| TestCaseError::fail(format!("tasks passed, plan failed: {e}")))?;
            prop_assert_eq!(plans.len(), pyramid.scales as usize);
            check_plan(&plans, content, &spec.params, tiling, false)?;
            let need = min_side(pyramid.deepest_layer());
            if fits {
                // every canvas and tile reaches the deepest layer
                for plan in &plans {
                    prop_assert!(
                        plan.width.min(plan.height) >= need,
                        "canvas {}x{} < {need}",
                        plan.width,
                        plan.height
                    );
                    if let Some(grid) = &plan.grid {
                        for r in grid.tiles() {
                            prop_assert!(r.width.min(r.height) >= need, "tile {r:?} < {need}");
                        }
                    }
                }
            }
            // the tasks of a scale: skipped where a scale has too many tiles to label in a debug build
            if plans.iter().map(tiling::ScalePlan::tasks).sum::<usize>() > 20_000 {
                return Ok(());
            }
            // a later scale of the plan, or any number
            let scale = match scale {
                Ok(i) => 1 + i.index(plans.len().max(2) - 1) as u32,
                Err(any) => any,
            };
            match spec.scale_tasks(content.0, content.1, scale, &previous, &workers, None) {
                Err(e) => {
                    prop_assert!(scale == 0 || scale as usize >= plans.len(), "{e}");
                    check_field(&e, &["scale"])?;
                }
                Ok(tiles) => {
                    prop_assert!(scale >= 1 && (scale as usize) < plans.len());
                    let plan = &plans[scale as usize];
                    let shards: Vec<_> = tiles
                        .iter()
                        .filter_map(|t| match t.scale.as_ref()?.part {
                            ScalePart::Shard { rect, .. } => Some(rect),
                            _ => None,
                        })
                        .collect();
                    if !shards.is_empty() {
                        // exact mode over several workers: at most a shard a worker, every task a shard,
                        // the bands covering the canvas top to bottom
                        prop_assert!(tiling.exact);
                        prop_assert!(shards.len() == tiles.len() && shards.len() <= workers.len());
                        prop_assert_eq!(shards[0].y, 0);
                        prop_assert_eq!(
                            shards[shards.len() - 1].y + shards[shards.len() - 1].height,
                            plan.height
                        );
                        for w in shards.windows(2) {
                            prop_assert_eq!(w[0].y + w[0].height, w[1].y);
                        }
                    } else if tiling.sizing == TileSizing::Fixed || workers.iter().all(|&m| m == 0)
                    {
                        prop_assert_eq!(tiles.len(), plan.tasks());
                    } else {
                        // planned tiles are never smaller than the job's tile size: no more of them
                        prop_assert!(!tiles.is_empty() && tiles.len() <= plan.tasks());
                    }
                    for (i, task) in tiles.iter().enumerate() {
                        let t = task.scale.as_ref().expect("a scale task");
                        prop_assert_eq!((t.scale, t.scales), (scale, plans.len() as u32));
                        prop_assert_eq!((t.index(), t.count()), (i as u32, tiles.len() as u32));
                        prop_assert_eq!(
                            (t.canvas_width, t.canvas_height),
                            (plan.width, plan.height)
                        );
                        // exact mode: the whole canvas; otherwise a tile of the grid
                        match t.part {
                            ScalePart::Whole { .. } => {
                                prop_assert!(tiling.exact, "a whole canvas of a job not exact");
                                prop_assert_eq!(
                                    t.rect(),
                                    tiling::Rect {
                                        x: 0,
                                        y: 0,
                                        width: plan.width,
                                        height: plan.height
                                    }
                                );
                            }
                            ScalePart::Tile { .. } => {
                                prop_assert!(!tiling.exact, "a tile of an exact job")
                            }
                            ScalePart::Shard { rect, .. } => {
                                prop_assert!(tiling.exact, "a shard of a job not exact");
                                prop_assert_eq!((rect.x, rect.width), (0, plan.width));
                            }
                        }
                        prop_assert!(t.block() >= tiling.tile_size);
                        prop_assert_eq!(task.params.scales, 1);
                        prop_assert_eq!(task.params.size, plan.longest());
                        prop_assert_eq!(&task.params.init, &Init::Image(previous.clone()));
                        if fits {
                            let rect = t.rect();
                            prop_assert!(rect.width.min(rect.height) >= need);
                        }
                        // what the coordinator sends a worker comes back as the same scale task...
                        let wire = pb::TileTask::from(t);
                        let back = ScaleTask::try_from(wire).map_err(|e| {
                            TestCaseError::fail(format!("tile {i} refused on the wire: {e}"))
                        })?;
                        prop_assert_eq!(&back, t);
                        // ...and as the same task, leased whole
                        let leased = Task {
                            checkpoints: CheckpointEvery::Never,
                            resume: None,
                            id: TaskId {
                                job: JobId::new("job-1"),
                                index: 1 + i as u32,
                            },
                            spec: task.clone(),
                        };
                        let back = Task::try_from(pb::Task::from(&leased)).map_err(|e| {
                            TestCaseError::fail(format!("task {i} refused on the wire: {e}"))
                        })?;
                        prop_assert_eq!(back, leased);
                    }
                    if fits {
                        accept();
                    }
                }
            }
            Ok(())
        },
    );
}

const SWEEP_NAMES: [&str; 9] = [
    "style_weight",
    "content_weight",
    "tv_weight",
    "style_scale",
    "seed",
    "style_blend",
    "colour",
    "",
    " seed ",
];

fn sweep_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (0.0..1e4f64).prop_map(|v| v.to_string()),
        2 => (0u64..100).prop_map(|v| v.to_string()),
        2 => prop::collection::vec(0.0..2.0f64, 1..=4)
            .prop_map(|v| v.iter().map(f64::to_string).collect::<Vec<_>>().join(":")),
        1 => prop::sample::select(vec![
            "NaN".to_string(), "inf".into(), "-1".into(), "1e999".into(), "".into(), " 1 ".into(),
            "-0".into(), "0".into(), "x".into(), "::".into(), "18446744073709551616".into(),
        ]),
        1 => "[ -~]{0,8}",
    ]
}

/// Values of a sweep axis over `parameter`: mostly valid for it (`styles` weights for a style blend).
fn axis_values(parameter: &'static str, styles: usize) -> BoxedStrategy<Vec<String>> {
    let number = |range: std::ops::Range<f64>| range.prop_map(|v| v.to_string());
    let value: BoxedStrategy<String> = match parameter {
        "seed" => (0u64..1000).prop_map(|v| v.to_string()).boxed(),
        "style_scale" => number(0.1..4.0).boxed(),
        "style_blend" => prop_oneof![
            4 => prop::collection::vec(0.01..2.0f64, styles..=styles),
            1 => prop::collection::vec(0.0..2.0f64, 1..=4),
        ]
        .prop_map(|v| v.iter().map(f64::to_string).collect::<Vec<_>>().join(":"))
        .boxed(),
        _ => number(0.0..1e4).boxed(),
    };
    prop::collection::vec(prop_oneof![12 => value, 1 => sweep_value()], 1..=3).boxed()
}

/// A sweep in the CLI's syntax over 1..=3 distinct parameters, mostly valid for `styles` style images.
fn valid_sweep_text(styles: usize) -> BoxedStrategy<String> {
    prop::sample::subsequence(SWEEP_NAMES[..6].to_vec(), 1..=3)
        .prop_flat_map(move |names| {
            names
                .into_iter()
                .map(|n| (Just(n), axis_values(n, styles)))
                .collect::<Vec<_>>()
        })
        .prop_map(|axes| {
            axes.iter()
                .map(|(name, values)| format!("{name}={}", values.join(",")))
                .collect::<Vec<_>>()
                .join(";")
        })
        .boxed()
}

fn sweep_text(styles: usize) -> BoxedStrategy<String> {
    let axis = (
        prop::sample::select(SWEEP_NAMES.to_vec()),
        prop::collection::vec(sweep_value(), 0..=4),
        prop_oneof![8 => Just("="), 1 => Just(""), 1 => Just("==")],
    )
        .prop_map(|(name, values, eq)| format!("{name}{eq}{}", values.join(",")));
    prop_oneof![
        12 => valid_sweep_text(styles),
        4 => prop::collection::vec(axis, 0..=4).prop_map(|axes| axes.join(";")),
        2 => "[ -~]{0,40}",
        1 => any::<String>(),
    ]
    .boxed()
}

#[test]
fn fuzz_sweep_jobs() {
    let strategy = (1usize..=3).prop_flat_map(|styles| {
        (
            sweep_text(styles),
            Just(styles),
            render_params(styles),
            prop::collection::vec(image_size(), styles + 1),
        )
    });
    run(
        "sweep jobs (parse_sweep, tasks, check_sizes)",
        30.0,
        "expanded into tasks",
        strategy,
        |(text, styles, params, image_sizes)| {
            let axes = match parse_sweep(&text) {
                Ok(axes) => axes,
                Err(e) => return check_field(&e, &["sweep"]),
            };
            for axis in &axes {
                prop_assert!(!axis.values.is_empty());
                prop_assert!(axis.values.iter().all(|v| !v.is_empty() && v.trim() == v));
            }
            let spec = JobSpec::new(
                JobKind::Sweep(axes.clone()),
                vec![hash(0)],
                (0..styles).map(|i| hash(100 + i as u8)).collect(),
                params,
            );
            let sizes: HashMap<ImageHash, (u32, u32)> = spec
                .contents
                .iter()
                .chain(&spec.styles)
                .cloned()
                .zip(image_sizes)
                .collect();
            let fits = job_check_sizes(&spec, &sizes)?;
            match spec.tasks() {
                Err(e) => {
                    prop_assert!(!fits, "check_sizes passed a sweep whose tasks fail: {e}");
                    check_field(&e, &job_fields())?;
                }
                Ok(tasks) => {
                    let points: usize = axes.iter().map(|a| a.values.len()).product();
                    prop_assert_eq!(tasks.len(), points);
                    for task in &tasks {
                        prop_assert!(task.params.validate(styles).is_ok());
                        prop_assert!(
                            task.label.split(' ').count() >= axes.len(),
                            "{}",
                            task.label
                        );
                    }
                    // the wire carries the spec unchanged
                    let back = JobSpec::try_from(pb::JobSpec::from(&spec))
                        .map_err(|e| TestCaseError::fail(format!("wire refused: {e}")))?;
                    prop_assert_eq!(format!("{back:?}"), format!("{spec:?}"));
                    accept();
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------------------
// 4. Wire conversion.

fn layer_name() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(Layer::all().map(|l| l.to_string()).collect::<Vec<_>>()),
        2 => (0u32..=300, 0u32..=300).prop_map(|(b, c)| format!("relu{b}_{c}")),
        1 => prop::sample::select(vec![
            "relu".to_string(),
            "relu_".into(),
            "relu1_".into(),
            "relu+1_+1".into(),
            "relu01_01".into(),
            "relu-1_1".into(),
            "conv1_1".into(),
            "".into(),
            "relu1_1 ".into(),
            "ReLU1_1".into(),
        ]),
        1 => any::<String>(),
    ]
}

/// A proto enum field: unset, one of its `values` (0: unspecified), or any number.
fn proto_enum(values: std::ops::RangeInclusive<i32>) -> impl Strategy<Value = Option<i32>> {
    prop_oneof![
        3 => Just(None),
        6 => values.prop_map(Some),
        1 => any::<i32>().prop_map(Some),
    ]
}

fn hash_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0u8..4).prop_map(|n| hash(n).to_string()),
        1 => "[0-9a-fA-F]{63,65}",
        1 => any::<String>(),
    ]
}

fn opt<T: std::fmt::Debug + Clone>(
    s: impl Strategy<Value = T>,
) -> impl Strategy<Value = Option<T>> {
    prop_oneof![1 => Just(None), 3 => s.prop_map(Some)]
}

/// A change to wire parameters derived from valid ones.
#[derive(Debug, Clone)]
enum ParamsTweak {
    /// Unset the optional field with this index (of the 14 scalar ones).
    Unset(u8),
    Optimizer(Option<i32>),
    Pooling(Option<i32>),
    Init(Option<String>),
    ContentLayers(Vec<String>),
    StyleLayers(Vec<String>),
    /// The options added after the first generator: temporal_weight, optical_flow, style_layer_weights,
    /// luminance_only, match_colors, global_style_targets.
    Later(Later),
}

type Later = (
    Option<f64>,
    Option<bool>,
    Vec<f64>,
    Option<bool>,
    Option<bool>,
    Option<bool>,
);

fn params_tweak() -> BoxedStrategy<ParamsTweak> {
    prop_oneof![
        4 => (0u8..14).prop_map(ParamsTweak::Unset),
        1 => proto_enum(0..=2).prop_map(ParamsTweak::Optimizer),
        1 => proto_enum(0..=2).prop_map(ParamsTweak::Pooling),
        1 => wire_init().prop_map(ParamsTweak::Init),
        1 => prop::collection::vec(layer_name(), 0..=4).prop_map(ParamsTweak::ContentLayers),
        1 => prop::collection::vec(layer_name(), 0..=4).prop_map(ParamsTweak::StyleLayers),
        2 => (
            opt(weight()),
            opt(any::<bool>()),
            prop::collection::vec(weight(), 0..=6),
            opt(any::<bool>()),
            opt(any::<bool>()),
            opt(any::<bool>()),
        )
            .prop_map(ParamsTweak::Later),
    ]
    .boxed()
}

fn tweak_params(p: &mut pb::RenderParams, t: ParamsTweak) {
    match t {
        ParamsTweak::Unset(i) => match i {
            0 => p.size = None,
            1 => p.iterations = None,
            2 => p.optimizer = None,
            3 => p.learning_rate = None,
            4 => p.history_size = None,
            5 => p.content_weight = None,
            6 => p.style_weight = None,
            7 => p.tv_weight = None,
            8 => p.pooling = None,
            9 => p.init = None,
            10 => p.seed = None,
            11 => p.style_scale = None,
            12 => p.original_colors = None,
            _ => p.scales = None,
        },
        ParamsTweak::Optimizer(v) => p.optimizer = v,
        ParamsTweak::Pooling(v) => p.pooling = v,
        ParamsTweak::Init(v) => p.init = v,
        ParamsTweak::ContentLayers(v) => p.content_layers = v,
        ParamsTweak::StyleLayers(v) => p.style_layers = v,
        ParamsTweak::Later((temporal, flow, layer_weights, luminance, colors, global)) => {
            p.temporal_weight = temporal;
            p.optical_flow = flow;
            p.style_layer_weights = layer_weights;
            p.luminance_only = luminance;
            p.match_colors = colors;
            p.global_style_targets = global;
        }
    }
}

fn tweaks<T: std::fmt::Debug + Clone + 'static>(
    tweak: BoxedStrategy<T>,
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        4 => Just(Vec::new()),
        3 => prop::collection::vec(tweak.clone(), 1..=1),
        1 => prop::collection::vec(tweak, 2..=3),
    ]
}

/// Wire parameters: those of [`render_params`] (for `styles` style images) as the client sends them, then
/// tweaked (fields unset, unknown keywords and layers); or every field arbitrary.
fn wire_params_for(styles: usize) -> BoxedStrategy<pb::RenderParams> {
    prop_oneof![
        3 => (render_params(styles), tweaks(params_tweak())).prop_map(|(p, tweaks)| {
            let mut wire = pb::RenderParams::from(&p);
            for t in tweaks {
                tweak_params(&mut wire, t);
            }
            wire
        }),
        1 => arbitrary_wire_params(),
    ]
    .boxed()
}

fn wire_init() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        2 => Just(None),
        2 => prop::sample::select(vec!["content", "noise", "random", "", "image:"])
            .prop_map(|s| Some(s.to_string())),
        2 => hash_text().prop_map(|h| Some(format!("image:{h}"))),
        1 => any::<String>().prop_map(Some),
    ]
    .boxed()
}

fn arbitrary_wire_params() -> BoxedStrategy<pb::RenderParams> {
    let init = wire_init();
    let size = prop_oneof![3 => 1..=2048u32, 1 => 0..=20_000u32, 1 => any::<u32>()];
    (
        (
            opt(size),
            opt(iterations()),
            prop::collection::vec(iterations(), 0..=9),
            proto_enum(0..=2),
            opt(weight()),
            opt(prop_oneof![1..=1000u32, any::<u32>()]),
            opt(weight()),
            opt(weight()),
            opt(weight()),
        ),
        (
            prop::collection::vec(weight(), 0..=4),
            prop::collection::vec(layer_name(), 0..=4),
            prop::collection::vec(layer_name(), 0..=4),
            proto_enum(0..=2),
            init,
            opt(any::<u64>()),
            opt(style_scale()),
            opt(any::<bool>()),
            opt(prop_oneof![1..=4u32, 0..=10u32, any::<u32>()]),
        ),
    )
        .prop_map(
            |(
                (
                    size,
                    iterations,
                    scale_iterations,
                    optimizer,
                    learning_rate,
                    history_size,
                    cw,
                    sw,
                    tw,
                ),
                (
                    style_blend,
                    content_layers,
                    style_layers,
                    pooling,
                    init,
                    seed,
                    style_scale,
                    oc,
                    scales,
                ),
            )| pb::RenderParams {
                size,
                iterations,
                scale_iterations,
                optimizer,
                learning_rate,
                history_size,
                content_weight: cw,
                style_weight: sw,
                tv_weight: tw,
                style_blend,
                content_layers,
                style_layers,
                pooling,
                init,
                seed,
                style_scale,
                original_colors: oc,
                scales,
                // an option added later is unset here until the generator covers it
                ..Default::default()
            },
        )
        .boxed()
}

/// Sweep axes as a client may send them: any of [`SWEEP_NAMES`] (unknown, empty and untrimmed names among
/// them), each with 0..=3 values of [`sweep_value`].
fn wire_axes() -> BoxedStrategy<Vec<pb::SweepAxis>> {
    let axis = (
        prop::sample::select(SWEEP_NAMES.to_vec()),
        prop::collection::vec(sweep_value(), 0..=3),
    )
        .prop_map(|(parameter, values)| pb::SweepAxis {
            parameter: parameter.to_string(),
            values,
        });
    prop::collection::vec(axis, 0..=3).boxed()
}

/// A wire job's kind with arbitrary parameters (sweep axes, tile size, overlap, exact), or none.
fn arbitrary_wire_kind() -> BoxedStrategy<Option<WireKind>> {
    let tile = prop_oneof![3 => Just(0u32), 3 => MIN_TILE_SIZE..=MAX_TILE_SIZE, 1 => any::<u32>()];
    let overlap = prop_oneof![3 => Just(0u32), 3 => 8..=256u32, 1 => any::<u32>()];
    prop_oneof![
        3 => Just(None),
        2 => Just(Some(WireKind::Single(pb::job_spec::Single {}))),
        2 => Just(Some(WireKind::Batch(pb::job_spec::Batch {}))),
        2 => wire_axes().prop_map(|axes| Some(WireKind::Sweep(pb::job_spec::Sweep { axes }))),
        2 => (tile, overlap, any::<bool>()).prop_map(|(tile_size, overlap, exact)| {
            Some(WireKind::Tiled(pb::job_spec::Tiled {
                tile_size,
                overlap,
                exact,
            }))
        }),
        2 => (
            prop_oneof![3 => 0..=8u32, 1 => any::<u32>()],
            prop_oneof![3 => 0..=100u32, 1 => any::<u32>()]
        )
            .prop_map(|(chunk_frames, frame_iterations)| {
                Some(WireKind::Video(pb::job_spec::Video {
                    chunk_frames,
                    frame_iterations,
                }))
            }),
    ]
    .boxed()
}

/// A domain kind as a client sends it; with `unset_tiling`, a tiled job's tile size and overlap unset (0:
/// the planner's and the default).
fn wire_kind(kind: &JobKind, unset_tiling: bool) -> WireKind {
    let mut wire = WireKind::from(kind);
    if let (WireKind::Tiled(w), JobKind::Tiled(t)) = (&mut wire, kind) {
        // the tile size as the job holds it, whether the planner may change it or not
        (w.tile_size, w.overlap) = if unset_tiling {
            (0, 0)
        } else {
            (t.tile_size, t.overlap)
        };
    }
    wire
}

/// A change to a wire job spec derived from a valid one.
#[derive(Debug, Clone)]
enum JobTweak {
    /// The kind replaced by any other, with arbitrary parameters, or unset.
    Kind(Option<WireKind>),
    Contents(Vec<String>),
    Styles(Vec<String>),
    NoParams,
    /// A sweep's axes replaced; a job of another kind becomes a sweep over these axes.
    Sweep(Vec<pb::SweepAxis>),
    /// A tiled job's tile size replaced; a job of another kind becomes a tiled one with this tile size.
    TileSize(u32),
    /// A tiled job's overlap replaced; a job of another kind becomes a tiled one with this overlap.
    Overlap(u32),
    /// A tiled job's exact mode replaced; a job of another kind becomes a tiled one with this mode.
    Exact(bool),
}

fn job_tweak() -> BoxedStrategy<JobTweak> {
    prop_oneof![
        arbitrary_wire_kind().prop_map(JobTweak::Kind),
        prop::collection::vec(hash_text(), 0..=3).prop_map(JobTweak::Contents),
        prop::collection::vec(hash_text(), 0..=3).prop_map(JobTweak::Styles),
        Just(JobTweak::NoParams),
        wire_axes().prop_map(JobTweak::Sweep),
        prop_oneof![Just(0u32), 0..=5000u32, any::<u32>()].prop_map(JobTweak::TileSize),
        prop_oneof![Just(0u32), 0..=3000u32, any::<u32>()].prop_map(JobTweak::Overlap),
        any::<bool>().prop_map(JobTweak::Exact),
    ]
    .boxed()
}

/// The tiling of a wire job's kind, the kind first made a tiled one (unset tiling) if it is not.
fn tiled(kind: &mut Option<WireKind>) -> &mut pb::job_spec::Tiled {
    if !matches!(kind, Some(WireKind::Tiled(_))) {
        *kind = Some(WireKind::Tiled(pb::job_spec::Tiled::default()));
    }
    match kind {
        Some(WireKind::Tiled(t)) => t,
        _ => unreachable!("made a tiled kind"),
    }
}

fn tweak_job(wire: &mut pb::JobSpec, t: JobTweak) {
    match t {
        JobTweak::Kind(k) => wire.kind = k,
        JobTweak::Contents(v) => wire.contents = v,
        JobTweak::Styles(v) => wire.styles = v,
        JobTweak::NoParams => wire.params = None,
        JobTweak::Sweep(axes) => match &mut wire.kind {
            Some(WireKind::Sweep(sweep)) => sweep.axes = axes,
            other => *other = Some(WireKind::Sweep(pb::job_spec::Sweep { axes })),
        },
        JobTweak::TileSize(v) => tiled(&mut wire.kind).tile_size = v,
        JobTweak::Overlap(v) => tiled(&mut wire.kind).overlap = v,
        JobTweak::Exact(v) => tiled(&mut wire.kind).exact = v,
    }
}

/// Wire job specs: a consistent spec of each kind (a sweep with its axes, a tiled job with its tiling) as a
/// client sends it, then tweaked; or every field arbitrary.
fn wire_job() -> BoxedStrategy<pb::JobSpec> {
    let consistent = (1usize..=3)
        .prop_flat_map(|styles| (kind(styles), Just(styles)))
        .prop_flat_map(|(kind, styles)| {
            let contents = if matches!(kind, JobKind::Batch | JobKind::Video(_)) {
                1..=3usize
            } else {
                1..=1
            };
            (
                Just(kind),
                prop::collection::vec((0u8..4).prop_map(hash), contents),
                Just(styles),
                wire_params_for(styles),
                prop_oneof![3 => Just(false), 1 => Just(true)],
                tweaks(job_tweak()),
            )
        })
        .prop_map(|(kind, contents, styles, params, unset_tiling, tweaks)| {
            let mut wire = pb::JobSpec {
                checkpoint_every: 0,
                checkpoint_secs: 0,
                content_names: Vec::new(),
                style_names: Vec::new(),
                name: String::new(),
                left_out: Vec::new(),
                kind: Some(wire_kind(&kind, unset_tiling)),
                contents: contents.iter().map(ToString::to_string).collect(),
                styles: (0..styles)
                    .map(|i| hash(100 + i as u8).to_string())
                    .collect(),
                params: Some(params),
                priority: 0,
                max_attempts: 0,
                worker_tags: Vec::new(),
                keep_going: false,
                max_workers: 0,
                after: Vec::new(),
            };
            for t in tweaks {
                tweak_job(&mut wire, t);
            }
            wire
        });
    prop_oneof![3 => consistent, 1 => arbitrary_wire_job()].boxed()
}

fn arbitrary_wire_job() -> BoxedStrategy<pb::JobSpec> {
    (
        arbitrary_wire_kind(),
        prop::collection::vec(hash_text(), 0..=3),
        prop::collection::vec(hash_text(), 0..=3),
        prop_oneof![1 => Just(None), 12 => wire_params_for(1).prop_map(Some)],
        any::<i32>(),
        any::<u32>(),
        prop::collection::vec("[a-z.#-]{0,3}", 0..=2),
        any::<bool>(),
        prop_oneof![3 => Just(0u32), 1 => any::<u32>()],
        prop_oneof![
            4 => prop::collection::vec("[a-z0-9 _:-]{0,8}", 0..=3),
            // around the limit on the jobs waited for
            1 => prop::collection::vec("job-[0-9]{1,3}", 15..=18),
        ],
    )
        .prop_map(
            |(
                kind,
                contents,
                styles,
                params,
                priority,
                max_attempts,
                worker_tags,
                keep_going,
                max_workers,
                after,
            )| {
                pb::JobSpec {
                    checkpoint_every: 0,
                    checkpoint_secs: 0,
                    content_names: Vec::new(),
                    style_names: Vec::new(),
                    name: String::new(),
                    left_out: Vec::new(),
                    kind,
                    contents,
                    styles,
                    params,
                    priority,
                    max_attempts,
                    worker_tags,
                    keep_going,
                    max_workers,
                    after,
                }
            },
        )
        .boxed()
}

#[test]
fn fuzz_wire_conversion() {
    let tile_task = (
        (0u32..=8, 0u32..=8, 0u32..=50, 0u32..=50),
        (
            0u32..=5000,
            0u32..=5000,
            0u32..=5000,
            0u32..=5000,
            0u32..=5000,
            0u32..=5000,
        ),
        (
            prop_oneof![8 => any::<u32>(), 1 => 0..=2 * MIN_TILE_SIZE],
            any::<bool>(),
            any::<bool>(),
            any::<[u32; 10]>(),
            // the whole canvas as tile 0 of 1: what an exact task must be
            prop_oneof![3 => Just(false), 1 => Just(true)],
        ),
    )
        .prop_map(
            |(
                (scale, scales, tile, tiles),
                (cw, ch, x, y, w, h),
                (ts, exact, huge, big, whole),
            )| {
                let mut t = pb::TileTask {
                    scale,
                    scales,
                    tile,
                    tiles,
                    canvas_width: cw,
                    canvas_height: ch,
                    x,
                    y,
                    width: w,
                    height: h,
                    tile_size: ts,
                    exact,
                };
                if huge {
                    // values near u32::MAX, where x + width overflows a u32
                    [
                        t.scale,
                        t.scales,
                        t.tile,
                        t.tiles,
                        t.canvas_width,
                        t.canvas_height,
                        t.x,
                        t.y,
                        t.width,
                        t.height,
                    ] = big.map(|v| v | 0x8000_0000);
                }
                if whole {
                    (t.x, t.y, t.width, t.height) = (0, 0, t.canvas_width, t.canvas_height);
                    (t.tile, t.tiles) = (0, 1);
                }
                t
            },
        );
    run(
        "wire (RenderParams, JobSpec, ScaleTask)",
        40.0,
        "job specs accepted",
        (wire_params_for(1), wire_job(), tile_task),
        |(params, job, tile)| {
            match RenderParams::try_from(params.clone()) {
                Ok(p) => {
                    // back to the wire and again: the same parameters (compared as text: NaN != NaN)
                    let again = RenderParams::try_from(pb::RenderParams::from(&p))
                        .map_err(|e| TestCaseError::fail(format!("round trip refused: {e}")))?;
                    prop_assert_eq!(format!("{again:?}"), format!("{p:?}"));
                    if params.content_layers.is_empty() {
                        prop_assert_eq!(&p.content_layers, &RenderParams::default().content_layers);
                    }
                    if let Some(size) = params.size {
                        prop_assert_eq!(p.size, size);
                    }
                }
                // an enum or a layer it does not know, or a list longer than any job uses
                Err(e) => check_field(
                    &e,
                    &[
                        "optimizer",
                        "pooling",
                        "init",
                        "content_layers",
                        "style_layers",
                        "style_layer_weights",
                        "scale_iterations",
                        "style_blend",
                    ],
                )?,
            }
            let kind = job.kind.clone();
            match JobSpec::try_from(job) {
                Ok(spec) => {
                    let tasks = spec.tasks().map_err(|e| {
                        TestCaseError::fail(format!("accepted from the wire, tasks fail: {e}"))
                    })?;
                    prop_assert!(!tasks.is_empty());
                    let back = JobSpec::try_from(pb::JobSpec::from(&spec))
                        .map_err(|e| TestCaseError::fail(format!("round trip refused: {e}")))?;
                    prop_assert_eq!(format!("{back:?}"), format!("{spec:?}"));
                    // the kind of the wire, with its parameters
                    match (&kind, &spec.kind) {
                        (Some(WireKind::Single(_)), JobKind::Single)
                        | (Some(WireKind::Batch(_)), JobKind::Batch) => {}
                        (Some(WireKind::Video(w)), JobKind::Video(v)) => {
                            prop_assert_eq!(
                                (v.chunk_frames, v.frame_iterations),
                                (w.chunk_frames, w.frame_iterations)
                            );
                            prop_assert!(v.validate().is_ok());
                        }
                        (Some(WireKind::Sweep(sweep)), JobKind::Sweep(axes)) => {
                            prop_assert!(!axes.is_empty(), "a sweep without axes accepted");
                            prop_assert!(axes.iter().all(|a: &SweepAxis| !a.values.is_empty()));
                            let names: Vec<&str> =
                                axes.iter().map(|a| a.parameter.name()).collect();
                            let wire: Vec<&str> =
                                sweep.axes.iter().map(|a| a.parameter.as_str()).collect();
                            prop_assert_eq!(names, wire);
                            for (axis, wire) in axes.iter().zip(&sweep.axes) {
                                prop_assert_eq!(&axis.values, &wire.values);
                            }
                        }
                        (Some(WireKind::Tiled(t)), JobKind::Tiled(tiling)) => {
                            // 0: the planner's tile size (from the default up), the default overlap
                            // (at most half a fixed tile)
                            let (size, sizing) = match t.tile_size {
                                0 => (DEFAULT_TILE_SIZE, TileSizing::Planned),
                                size => (size, TileSizing::Fixed),
                            };
                            let overlap = match (t.overlap, sizing) {
                                (0, TileSizing::Fixed) => DEFAULT_OVERLAP.min(size / 2),
                                (0, _) => DEFAULT_OVERLAP,
                                (overlap, _) => overlap,
                            };
                            prop_assert_eq!(
                                (
                                    tiling.tile_size,
                                    tiling.sizing,
                                    tiling.overlap,
                                    tiling.exact
                                ),
                                (size, sizing, overlap, t.exact)
                            );
                        }
                        (wire, kind) => {
                            return Err(TestCaseError::fail(format!(
                                "the wire's kind {wire:?} accepted as {kind:?}"
                            )))
                        }
                    }
                    accept();
                }
                Err(e) => {
                    if kind.is_none() {
                        // a missing kind is refused first, naming it
                        check_field(&e, &["kind"])?;
                    }
                    check_field(
                        &e,
                        &[
                            &job_fields()[..],
                            &["kind", "params", "optimizer", "pooling", "init", "layer"][..],
                        ]
                        .concat(),
                    )?
                }
            }
            match ScaleTask::try_from(tile) {
                Ok(t) => {
                    let rect = t.rect();
                    prop_assert!(rect.width > 0 && rect.height > 0);
                    prop_assert!(
                        u64::from(rect.x) + u64::from(rect.width) <= u64::from(t.canvas_width)
                    );
                    prop_assert!(
                        u64::from(rect.y) + u64::from(rect.height) <= u64::from(t.canvas_height)
                    );
                    prop_assert!(t.scale < t.scales && t.index() < t.count());
                    prop_assert!(t.block() >= STORED_MIN_TILE_SIZE);
                    // an exact task is the whole canvas, tile 0 of 1, or a shard of it
                    prop_assert_eq!(
                        matches!(t.part, ScalePart::Whole { .. } | ScalePart::Shard { .. }),
                        tile.exact
                    );
                    if let ScalePart::Shard {
                        block,
                        index,
                        shards,
                        rect,
                    } = t.part
                    {
                        let bands = tiling::shard_rows(t.canvas_height, block, shards);
                        prop_assert_eq!(bands[index as usize], (rect.y, rect.y + rect.height));
                    } else if tile.exact {
                        prop_assert_eq!(
                            (
                                rect.x,
                                rect.y,
                                rect.width,
                                rect.height,
                                t.index(),
                                t.count()
                            ),
                            (0, 0, t.canvas_width, t.canvas_height, 0, 1)
                        );
                    }
                    prop_assert_eq!(pb::TileTask::from(&t), tile);
                }
                Err(e) => {
                    let field = if tile.tile_size < STORED_MIN_TILE_SIZE {
                        "tile_size"
                    } else {
                        "tile"
                    };
                    check_field(&e, &[field])?
                }
            }
            Ok(())
        },
    );
}
