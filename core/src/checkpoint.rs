//! A task's checkpoint: the state of the render, saved now and then while a long render runs (every
//! [`crate::job::JobSpec::checkpoint_every`] iterations or [`crate::job::JobSpec::checkpoint_secs`]
//! seconds: [`CheckpointEvery`]), so that the task's next attempt (its worker lost, its lease expired, the
//! job retried) starts from there instead of from the beginning: OpenCue's frame checkpoints.
//!
//! A checkpoint file is a safetensors file (Hugging Face's format, the `safetensors` crate) of float32
//! tensors of shape `1 x 3 x H x W`, at the size of the scale it was saved in: `image`, the image as the
//! optimizer holds it (in the VGG19 weights' preprocessed space, [`CheckpointFile::preprocessing`]), and
//! for Adam its moments, `adam_m` and `adam_v` (its step count is the iteration); with iterate averaging
//! ([`crate::RenderParams::avg_decay`]) `average`, the moving average's sum of the images before the
//! checkpoint's (not bias-corrected: its weight is `1 - decay^iteration`); as metadata, the 1-based
//! scale, the iteration (the image after that many optimizer steps of the scale) and the preprocessing.
//! An Adam render resumed from one goes on exactly as it would have, its average too. L-BFGS' state is not kept (its
//! curvature pairs would take up to 200 times the image): a resumed L-BFGS render starts its optimizer
//! afresh from the image, as jcjohnson/neural-style's `-init image` from a saved iteration would, and its
//! pixels differ slightly from an uninterrupted render's.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::ids::ImageHash;
use crate::imaging::MAX_IMAGE_SIDE;
use crate::{Error, Optimizer, RenderParams};

/// Name of the image's tensor in a checkpoint file.
const IMAGE: &str = "image";
/// Names of Adam's first and second moments' tensors.
const ADAM_M: &str = "adam_m";
const ADAM_V: &str = "adam_v";
/// Name of the iterate average's tensor.
const AVERAGE: &str = "average";
/// The most bytes a checkpoint file's header (its JSON) may take; a file with a larger one is refused
/// before it is parsed.
pub const MAX_HEADER_BYTES: u64 = 64 << 10;
/// The metadata key that says which format the file is (and [`FORMAT`] its value).
const FORMAT_KEY: &str = "format";
const FORMAT: &str = "stylefarm-checkpoint-1";

/// `values` as the file holds them, little-endian: their own bytes where the machine's are (no copy).
fn little_endian(values: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        std::borrow::Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// When a render saves its checkpoints: a job's [`crate::job::JobSpec::checkpoint_every`] or
/// [`crate::job::JobSpec::checkpoint_secs`], at most one of them set ([`CheckpointEvery::of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointEvery {
    /// None (the default).
    #[default]
    Never,
    /// Every this many iterations of each scale.
    Iterations(NonZeroU32),
    /// At most every this many seconds (wall time) of the render, the first one this long after its
    /// first iteration: one interval for every kind of worker, where iterations take 10 ms on a GPU and seconds
    /// on a CPU (the render's clock is read on the host; it costs the device no sync).
    Secs(NonZeroU32),
}

impl CheckpointEvery {
    /// From a job's (or a task's) two fields, iterations and seconds, 0 for unset; both set: an error
    /// naming `checkpoint_secs`.
    pub fn of(iterations: u32, secs: u32) -> Result<CheckpointEvery, Error> {
        match (NonZeroU32::new(iterations), NonZeroU32::new(secs)) {
            (None, None) => Ok(CheckpointEvery::Never),
            (Some(n), None) => Ok(CheckpointEvery::Iterations(n)),
            (None, Some(s)) => Ok(CheckpointEvery::Secs(s)),
            (Some(_), Some(_)) => Err(Error::invalid(
                "checkpoint_secs",
                format!(
                    "a job's checkpoints come every so many iterations (checkpoint_every, \
                     {iterations}) or every so many seconds ({secs}), not both"
                ),
            )),
        }
    }

    /// Whether no checkpoint is saved.
    pub fn is_never(self) -> bool {
        self == CheckpointEvery::Never
    }

    /// Whether a render saves a checkpoint of its image at `iteration` of a scale, `since_last` after its
    /// last checkpoint (after its start, before the first): at a multiple of the iterations, or once the
    /// seconds have passed. (The render itself saves none at a scale's first or last image.)
    pub fn due(self, iteration: u32, since_last: Duration) -> bool {
        match self {
            CheckpointEvery::Never => false,
            CheckpointEvery::Iterations(n) => iteration.is_multiple_of(n.get()),
            CheckpointEvery::Secs(s) => since_last >= Duration::from_secs(s.get().into()),
        }
    }

    /// The iterations and the seconds, as the wire's two fields carry them (0: unset).
    pub fn fields(self) -> (u32, u32) {
        match self {
            CheckpointEvery::Never => (0, 0),
            CheckpointEvery::Iterations(n) => (n.get(), 0),
            CheckpointEvery::Secs(s) => (0, s.get()),
        }
    }
}

/// A task's last checkpoint as the coordinator records it: the file's blob (by sha256) and where the
/// render was when it was saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The checkpoint file's sha256 in the blob store.
    pub blob: ImageHash,
    /// The 1-based scale of the render's pyramid it was saved in.
    pub scale: u32,
    /// The iteration of that scale: the image after that many optimizer steps.
    pub iteration: u32,
    /// The file's size, bytes, as the coordinator records it (so that it can delete the blob once a newer
    /// checkpoint replaces it); 0 where not known (a worker's copy: the wire does not carry it).
    #[serde(default)]
    pub bytes: u64,
}

/// What a checkpoint file says of itself, read without its values ([`CheckpointFile::header`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointHeader {
    /// 1-based scale of the render it was saved in.
    pub scale: u32,
    /// The image after this many optimizer steps of that scale.
    pub iteration: u32,
    /// Width of the scale's image, px.
    pub width: u32,
    /// Height of the scale's image, px.
    pub height: u32,
    /// The preprocessing of the image's values (the engine's name for it, e.g. `caffe`): a render with
    /// other weights cannot resume from it.
    pub preprocessing: String,
    /// Whether it holds Adam's moments.
    pub adam: bool,
    /// Whether it holds an iterate average.
    pub average: bool,
}

/// Adam's moments after a checkpoint's iteration, each `3 x height x width` values as the image's.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamMoments {
    /// The first moment (the gradient's running mean).
    pub m: Vec<f32>,
    /// The second moment (the squared gradient's running mean).
    pub v: Vec<f32>,
}

/// A checkpoint file's contents ([the module's docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointFile {
    /// 1-based scale of the render it was saved in.
    pub scale: u32,
    /// The image after this many optimizer steps of that scale.
    pub iteration: u32,
    /// Width of the scale's image, px.
    pub width: u32,
    /// Height of the scale's image, px.
    pub height: u32,
    /// The preprocessing of the image's values (the engine's name for it, e.g. `caffe`).
    pub preprocessing: String,
    /// `3 x height x width` float32 values, channel by channel, row by row (the tensor's own order).
    pub values: Vec<f32>,
    /// An Adam render's moments; `None` for L-BFGS.
    pub adam: Option<AdamMoments>,
    /// With iterate averaging, the average's sum of the scale's images before this one (`3 x height x
    /// width` values, not bias-corrected); `None` without.
    pub average: Option<Vec<f32>>,
}

impl CheckpointFile {
    /// The most bytes a checkpoint file of a render of `params` of at most `longest` px a side takes: its
    /// image (and Adam's two moments, and the iterate average), and a header of at most
    /// [`MAX_HEADER_BYTES`].
    pub fn max_bytes(longest: u32, params: &RenderParams) -> u64 {
        let tensors = match params.optimizer {
            Optimizer::Lbfgs => 1,
            Optimizer::Adam => 3,
        } + u64::from(params.avg_decay > 0.0);
        // saturating: a task's size comes from its coordinator, and a worker reads it before the engine
        // checks it (u32::MAX squared, times 12, is past u64)
        (tensors * 3 * 4)
            .saturating_mul(u64::from(longest) * u64::from(longest))
            .saturating_add(8 + MAX_HEADER_BYTES)
    }

    /// The file's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let bytes = little_endian;
        let mut data = vec![(IMAGE, bytes(&self.values))];
        if let Some(adam) = &self.adam {
            data.extend([(ADAM_M, bytes(&adam.m)), (ADAM_V, bytes(&adam.v))]);
        }
        if let Some(average) = &self.average {
            data.push((AVERAGE, bytes(average)));
        }
        let shape = vec![1, 3, self.height as usize, self.width as usize];
        let views = data
            .iter()
            .map(|(name, bytes)| {
                TensorView::new(Dtype::F32, shape.clone(), bytes)
                    .map(|view| (*name, view))
                    .map_err(|e| Error::invalid("checkpoint", format!("{name}: {e:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metadata = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            ("scale".to_string(), self.scale.to_string()),
            ("iteration".to_string(), self.iteration.to_string()),
            ("preprocessing".to_string(), self.preprocessing.clone()),
        ]);
        safetensors::tensor::serialize(views, &Some(metadata))
            .map_err(|e| Error::invalid("checkpoint", format!("{e:?}")))
    }

    /// Reads what a checkpoint file says of itself, without copying its values (the coordinator checks
    /// a checkpoint so). An error (`checkpoint: ...`) says what is wrong with bytes that are not one: not
    /// a safetensors file, another format, a scale or iteration missing, no `image` tensor, a tensor of
    /// another type or shape, sides over [`MAX_IMAGE_SIDE`], one Adam moment without the other.
    pub fn header(bytes: &[u8]) -> Result<CheckpointHeader, Error> {
        let bad = |m: String| Error::invalid("checkpoint", m);
        // a header past the limit is not parsed (a hostile one could take many times its bytes)
        if let Some(length) = bytes.get(..8) {
            let length = u64::from_le_bytes(length.try_into().expect("8 bytes"));
            if length > MAX_HEADER_BYTES {
                return Err(bad(format!(
                    "not a safetensors file of a checkpoint: a header of {length} bytes, more than \
                     {MAX_HEADER_BYTES}"
                )));
            }
        }
        // the parser's arithmetic on a hostile header's offsets may overflow (a panic in a debug build):
        // that is bytes that are not a checkpoint, not a crash
        let metadata = match std::panic::catch_unwind(|| SafeTensors::read_metadata(bytes)) {
            Ok(Ok((_, metadata))) => metadata,
            Ok(Err(e)) => return Err(bad(format!("not a safetensors file: {e:?}"))),
            Err(_) => return Err(bad("not a safetensors file: its header is malformed".into())),
        };
        let meta = metadata.metadata().clone().unwrap_or_default();
        if meta.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!("not a {FORMAT} file")));
        }
        let number = |key: &str| -> Result<u32, Error> {
            meta.get(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("no {key} (a whole number) in its metadata")))
        };
        let (scale, iteration) = (number("scale")?, number("iteration")?);
        if scale == 0 {
            return Err(bad("scale 0: scales count from 1".into()));
        }
        let tensors = metadata.tensors();
        if let Some(other) = tensors
            .keys()
            .find(|k| ![IMAGE, ADAM_M, ADAM_V, AVERAGE].contains(&k.as_str()))
        {
            return Err(bad(format!(
                "a tensor '{other}' that a checkpoint does not have"
            )));
        }
        let image = tensors
            .get(IMAGE)
            .ok_or_else(|| bad(format!("no '{IMAGE}' tensor")))?;
        let side = |v: usize| {
            u32::try_from(v)
                .ok()
                .filter(|&v| (1..=MAX_IMAGE_SIDE).contains(&v))
        };
        let (height, width) = match (image.dtype, image.shape.as_slice()) {
            (Dtype::F32, &[1, 3, h, w]) => match (side(h), side(w)) {
                (Some(h), Some(w)) => (h, w),
                _ => {
                    return Err(bad(format!(
                        "a {w} x {h} image: each side 1 to {MAX_IMAGE_SIDE} px"
                    )))
                }
            },
            (dtype, shape) => {
                return Err(bad(format!(
                    "'{IMAGE}' is {dtype:?} of shape {shape:?}, not F32 of shape [1, 3, H, W]"
                )))
            }
        };
        let adam = match (tensors.get(ADAM_M), tensors.get(ADAM_V)) {
            (None, None) => false,
            (Some(m), Some(v)) => {
                for (name, t) in [(ADAM_M, m), (ADAM_V, v)] {
                    if t.dtype != Dtype::F32 || t.shape != image.shape {
                        return Err(bad(format!(
                            "'{name}' is {:?} of shape {:?}, not as '{IMAGE}'",
                            t.dtype, t.shape
                        )));
                    }
                }
                true
            }
            _ => {
                return Err(bad(format!(
                    "'{ADAM_M}' without '{ADAM_V}', or the reverse"
                )))
            }
        };
        let average = match tensors.get(AVERAGE) {
            None => false,
            Some(t) if t.dtype == Dtype::F32 && t.shape == image.shape => true,
            Some(t) => {
                return Err(bad(format!(
                    "'{AVERAGE}' is {:?} of shape {:?}, not as '{IMAGE}'",
                    t.dtype, t.shape
                )))
            }
        };
        Ok(CheckpointHeader {
            scale,
            iteration,
            width,
            height,
            preprocessing: meta.get("preprocessing").cloned().unwrap_or_default(),
            adam,
            average,
        })
    }

    /// Reads a checkpoint file: [`CheckpointFile::header`]'s checks, and its values, every one finite (a
    /// render started from NaN fails as if a weight of its job were too large).
    pub fn decode(bytes: &[u8]) -> Result<CheckpointFile, Error> {
        let header = Self::header(bytes)?;
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::invalid("checkpoint", format!("not a safetensors file: {e:?}")))?;
        let values = |name: &str| -> Result<Vec<f32>, Error> {
            let tensor = tensors
                .tensor(name)
                .map_err(|e| Error::invalid("checkpoint", format!("'{name}': {e:?}")))?;
            let values: Vec<f32> = (tensor.data().chunks_exact(4))
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            // an image (or moments) gone to NaN or infinity: the render started from it fails, blaming
            // a weight of the job's
            match values.iter().position(|v| !v.is_finite()) {
                Some(i) => Err(Error::invalid(
                    "checkpoint",
                    format!("'{name}': value {i} is {}, not finite", values[i]),
                )),
                None => Ok(values),
            }
        };
        let adam = match header.adam {
            true => Some(AdamMoments {
                m: values(ADAM_M)?,
                v: values(ADAM_V)?,
            }),
            false => None,
        };
        Ok(CheckpointFile {
            scale: header.scale,
            iteration: header.iteration,
            width: header.width,
            height: header.height,
            preprocessing: header.preprocessing,
            values: values(IMAGE)?,
            adam,
            average: match header.average {
                true => Some(values(AVERAGE)?),
                false => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checkpoints by iterations come at their multiples whatever the time; by seconds once that long
    /// has passed, whatever the iteration; never, never.
    #[test]
    fn checkpoints_are_due_by_iterations_or_by_seconds() {
        let every = CheckpointEvery::of(10, 0).unwrap();
        let secs = CheckpointEvery::of(0, 60).unwrap();
        let (soon, late) = (Duration::ZERO, Duration::from_secs(3600));
        assert!(every.due(20, soon) && !every.due(21, late));
        assert!(secs.due(21, Duration::from_secs(60)) && !secs.due(20, Duration::from_secs(59)));
        assert!(!CheckpointEvery::of(0, 0).unwrap().due(10, late));
        assert_eq!((every.fields(), secs.fields()), ((10, 0), (0, 60)));
        let err = CheckpointEvery::of(10, 60).unwrap_err().to_string();
        assert!(err.starts_with("checkpoint_secs: "), "{err}");
    }

    fn file() -> CheckpointFile {
        CheckpointFile {
            scale: 2,
            iteration: 30,
            width: 5,
            height: 3,
            preprocessing: "caffe".into(),
            values: (0..45).map(|v| v as f32 * 0.5 - 7.25).collect(),
            adam: Some(AdamMoments {
                m: (0..45).map(|v| v as f32 * 1e-3).collect(),
                v: (0..45).map(|v| v as f32 * 1e-6).collect(),
            }),
            average: Some((0..45).map(|v| v as f32 * 0.25 - 3.0).collect()),
        }
    }

    #[test]
    fn a_checkpoint_file_reads_back_as_written() {
        let f = file();
        let bytes = f.encode().unwrap();
        let params = |optimizer, avg_decay| RenderParams {
            optimizer,
            avg_decay,
            ..Default::default()
        };
        assert!(bytes.len() as u64 <= CheckpointFile::max_bytes(5, &params(Optimizer::Adam, 0.9)));
        // the average: one more image's values at most
        let more = CheckpointFile::max_bytes(5, &params(Optimizer::Adam, 0.9))
            - CheckpointFile::max_bytes(5, &params(Optimizer::Adam, 0.0));
        assert_eq!(more, 3 * 4 * 5 * 5);
        assert_eq!(CheckpointFile::decode(&bytes).unwrap(), f);
        let header = CheckpointFile::header(&bytes).unwrap();
        assert_eq!(
            (header.scale, header.iteration, header.width, header.height),
            (2, 30, 5, 3)
        );
        assert!(header.adam && header.average);
        let lbfgs = CheckpointFile {
            adam: None,
            average: None,
            ..file()
        };
        let bytes = lbfgs.encode().unwrap();
        assert!(bytes.len() as u64 <= CheckpointFile::max_bytes(5, &params(Optimizer::Lbfgs, 0.0)));
        // a size no render has (a coordinator's task unchecked yet) is the most bytes, not an overflow
        assert_eq!(
            CheckpointFile::max_bytes(u32::MAX, &params(Optimizer::Adam, 0.9)),
            u64::MAX
        );
        assert!(!CheckpointFile::header(&bytes).unwrap().average);
        assert_eq!(CheckpointFile::decode(&bytes).unwrap(), lbfgs);
    }

    #[test]
    fn bytes_that_are_not_a_checkpoint_are_refused_naming_what_is_wrong() {
        let err = |bytes: &[u8]| CheckpointFile::decode(bytes).unwrap_err().to_string();
        assert!(err(b"").starts_with("checkpoint: not a safetensors file"));
        assert!(err(&[0xff; 64]).starts_with("checkpoint: not a safetensors file"));
        // a header whose offsets overflow the parser's sum
        let header = format!(
            "{{\"image\":{{\"dtype\":\"U8\",\"shape\":[{}],\"data_offsets\":[0,{}]}}}}",
            usize::MAX,
            usize::MAX
        );
        let mut hostile = (header.len() as u64).to_le_bytes().to_vec();
        hostile.extend(header.as_bytes());
        assert!(err(&hostile).starts_with("checkpoint: not a safetensors file"));
        // a safetensors file of another kind
        let other = safetensors::tensor::serialize(
            [("w", TensorView::new(Dtype::F32, vec![1], &[0; 4]).unwrap())],
            &None,
        )
        .unwrap();
        assert_eq!(err(&other), "checkpoint: not a stylefarm-checkpoint-1 file");
        // the right format with a wrong shape, or scale 0
        let mut f = file();
        f.width = 4;
        assert!(f.encode().is_err(), "45 values are not 3 x 3 x 4");
        let mut f = file();
        f.scale = 0;
        assert_eq!(
            err(&f.encode().unwrap()),
            "checkpoint: scale 0: scales count from 1"
        );
        // values not finite (a poisoned or a diverged render's): refused, so the render starts afresh
        let mut f = file();
        f.values[7] = f32::NAN;
        assert_eq!(
            err(&f.encode().unwrap()),
            "checkpoint: 'image': value 7 is NaN, not finite"
        );
        // one Adam moment without the other, or of another shape than the image
        let image = [0u8; 4 * 45];
        let view = |len: usize| TensorView::new(Dtype::F32, vec![1, 3, 3, len / 36], &image[..len]);
        let metadata = Some(HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            ("scale".to_string(), "1".to_string()),
            ("iteration".to_string(), "3".to_string()),
        ]));
        let lone = safetensors::tensor::serialize(
            [(IMAGE, view(180).unwrap()), (ADAM_M, view(180).unwrap())],
            &metadata,
        )
        .unwrap();
        assert_eq!(
            err(&lone),
            "checkpoint: 'adam_m' without 'adam_v', or the reverse"
        );
        let mismatched = safetensors::tensor::serialize(
            [
                (IMAGE, view(180).unwrap()),
                (ADAM_M, view(144).unwrap()),
                (ADAM_V, view(180).unwrap()),
            ],
            &metadata,
        )
        .unwrap();
        assert!(err(&mismatched).starts_with("checkpoint: 'adam_m' is F32 of shape [1, 3, 3, 4]"));
        let average = safetensors::tensor::serialize(
            [(IMAGE, view(180).unwrap()), (AVERAGE, view(144).unwrap())],
            &metadata,
        )
        .unwrap();
        assert!(err(&average).starts_with("checkpoint: 'average' is F32 of shape [1, 3, 3, 4]"));
        // a tensor a checkpoint does not have; a header past the limit, refused before it is parsed
        let stray = safetensors::tensor::serialize(
            [(IMAGE, view(180).unwrap()), ("stray", view(180).unwrap())],
            &metadata,
        )
        .unwrap();
        assert_eq!(
            err(&stray),
            "checkpoint: a tensor 'stray' that a checkpoint does not have"
        );
        let mut huge = (100u64 << 20).to_le_bytes().to_vec();
        huge.extend(b"{");
        assert_eq!(
            err(&huge),
            "checkpoint: not a safetensors file of a checkpoint: a header of 104857600 bytes, more \
             than 65536"
        );
    }
}
