//! Conversion between the wire types of stylefarm-proto and the domain types, at the edge: a missing or bad
//! field becomes [`Error::Invalid`] naming it (the servers map that to INVALID_ARGUMENT).

use stylefarm_proto::pb;

use crate::checkpoint::{Checkpoint, CheckpointEvery};
use crate::ids::JobId;
use crate::job::{
    ExpandedJob, ImageHash, JobKind, JobSpec, PreviousFrame, ScalePart, ScaleTask, SweepAxis, Task,
    TaskId, TaskSpec, Video, VideoFrame,
};
use crate::params::{render_options, Init, Layer, Optimizer, Pooling, RenderParams, INIT_KEYWORDS};
use crate::progress::{LossTerms, TaskProgress};
use crate::task_log::{AttemptLog, LogLines, SentLines};
use crate::tiling::{default_overlap, shard_rows, Rect, Tiling, STORED_MIN_TILE_SIZE};
use crate::Error;

fn hashes(field: &'static str, values: Vec<String>) -> Result<Vec<ImageHash>, Error> {
    values
        .into_iter()
        .map(|v| {
            v.parse::<ImageHash>()
                .map_err(|_| Error::invalid(field, format!("'{v}' is not a sha256")))
        })
        .collect()
}

/// A render option's type on the wire: `optional` scalars (unset: the default), repeated lists (empty: the
/// default), proto enums. The table of `render_options!` pairs each option with its proto field of the same
/// name through this trait; a field of the wrong type does not compile.
trait WireValue: Sized {
    /// The proto field's Rust type.
    type Wire;
    /// The domain value of a field, `default` when unset; errors name `field`.
    fn from_wire(field: &'static str, wire: Self::Wire, default: Self) -> Result<Self, Error>;
    /// The field for a domain value (always set).
    fn to_wire(&self) -> Self::Wire;
}

macro_rules! optional_scalar {
    ($($ty:ty),*) => {$(
        impl WireValue for $ty {
            type Wire = Option<$ty>;
            fn from_wire(_: &'static str, wire: Option<$ty>, default: $ty) -> Result<$ty, Error> {
                Ok(wire.unwrap_or(default))
            }
            fn to_wire(&self) -> Option<$ty> {
                Some(*self)
            }
        }
    )*};
}
optional_scalar!(u32, u64, f64, bool);

macro_rules! repeated_scalar {
    ($($ty:ty),*) => {$(
        impl WireValue for Vec<$ty> {
            type Wire = Vec<$ty>;
            fn from_wire(_: &'static str, wire: Vec<$ty>, default: Vec<$ty>) -> Result<Vec<$ty>, Error> {
                Ok(if wire.is_empty() { default } else { wire })
            }
            fn to_wire(&self) -> Vec<$ty> {
                self.clone()
            }
        }
    )*};
}
repeated_scalar!(u32, f64);

impl WireValue for Vec<Layer> {
    type Wire = Vec<String>;
    fn from_wire(field: &'static str, wire: Vec<String>, default: Self) -> Result<Self, Error> {
        if wire.is_empty() {
            return Ok(default);
        }
        wire.iter()
            .map(|v| {
                v.parse::<Layer>()
                    .map_err(|e| Error::invalid(field, e.to_string()))
            })
            .collect()
    }
    fn to_wire(&self) -> Vec<String> {
        self.iter().map(ToString::to_string).collect()
    }
}

/// A proto enum with its domain type: `UNSPECIFIED` (or unset) is the default, an unknown number an error.
macro_rules! proto_enum {
    ($ty:ty, $pb:ty, $($variant:ident),+) => {
        impl WireValue for $ty {
            type Wire = Option<i32>;
            fn from_wire(field: &'static str, wire: Option<i32>, default: $ty) -> Result<$ty, Error> {
                match wire.map(<$pb>::try_from) {
                    None | Some(Ok(<$pb>::Unspecified)) => Ok(default),
                    $(Some(Ok(<$pb>::$variant)) => Ok(<$ty>::$variant),)+
                    Some(Err(_)) => Err(Error::invalid(
                        field,
                        format!(
                            "unknown value {} (expected one of: {})",
                            wire.unwrap_or_default(),
                            [$(<$ty>::$variant.to_string()),+].join(", ")
                        ),
                    )),
                }
            }
            fn to_wire(&self) -> Option<i32> {
                Some(match self {
                    $(<$ty>::$variant => <$pb>::$variant as i32,)+
                })
            }
        }
    };
}
proto_enum!(Optimizer, pb::Optimizer, Lbfgs, Adam);
proto_enum!(Pooling, pb::Pooling, Max, Avg, L2);

/// The init of a farm job: a keyword (`content`, `noise`, ...), `image:<sha256>` of an uploaded image ([`Init::Image`]) or
/// `job:<id>`, another job's result ([`Init::Job`]). A file's path ([`Init::File`]) names nothing on the
/// farm: a client uploads the file and sends its hash, and the coordinator refuses a path.
impl WireValue for Init {
    type Wire = Option<String>;
    fn from_wire(field: &'static str, wire: Option<String>, default: Init) -> Result<Init, Error> {
        let Some(text) = wire else {
            return Ok(default);
        };
        // only the canonical spellings: not a path, nor the CLI's alias `random`
        match text.parse::<Init>() {
            Ok(init) if !matches!(init, Init::File(_)) && init.to_string() == text => Ok(init),
            _ => Err(Error::invalid(
                field,
                format!("'{text}': expected {INIT_KEYWORDS}, image:<sha256> or job:<id>"),
            )),
        }
    }
    fn to_wire(&self) -> Option<String> {
        Some(self.to_string())
    }
}

/// Both directions of `RenderParams`, field by field from the options' table.
macro_rules! params_wire {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $default:expr, $range:expr, sweep: $sweep:literal;
    )*) => {
        impl TryFrom<pb::RenderParams> for RenderParams {
            type Error = Error;

            /// Unset fields take the defaults. The result is not validated against a style count:
            /// [`JobSpec::tasks`] does that; its lists are checked now
            /// ([`RenderParams::check_lists`]), before a job copies them into each of its tasks.
            fn try_from(p: pb::RenderParams) -> Result<Self, Error> {
                let d = RenderParams::default();
                let params = RenderParams {
                    $($name: WireValue::from_wire(stringify!($name), p.$name, d.$name)?,)*
                };
                params.check_lists()?;
                Ok(params)
            }
        }

        impl From<&RenderParams> for pb::RenderParams {
            fn from(p: &RenderParams) -> Self {
                pb::RenderParams {
                    $($name: WireValue::to_wire(&p.$name),)*
                }
            }
        }
    };
}
render_options!(params_wire);

impl TryFrom<pb::JobSpec> for JobSpec {
    type Error = Error;

    /// Converts and checks: the spec must expand into valid tasks.
    fn try_from(s: pb::JobSpec) -> Result<Self, Error> {
        Ok(ExpandedJob::try_from(s)?.into_parts().0)
    }
}

impl TryFrom<pb::JobSpec> for ExpandedJob {
    type Error = Error;

    /// Converts, checks and expands the spec into its tasks: the one expansion of a submission.
    fn try_from(s: pb::JobSpec) -> Result<Self, Error> {
        use pb::job_spec::Kind;
        let kind = match s.kind {
            Some(Kind::Single(_)) => JobKind::Single,
            Some(Kind::Batch(_)) => JobKind::Batch,
            Some(Kind::Sweep(sweep)) => JobKind::Sweep(
                sweep
                    .axes
                    .into_iter()
                    .map(|a| {
                        Ok(SweepAxis {
                            parameter: a.parameter.parse()?,
                            values: a.values,
                        })
                    })
                    .collect::<Result<Vec<_>, Error>>()?,
            ),
            Some(Kind::Video(v)) => JobKind::Video(Video {
                chunk_frames: v.chunk_frames,
                frame_iterations: v.frame_iterations,
            }),
            Some(Kind::Tiled(t)) => {
                // 0: the planner's (tile size) or the default for the tile size (overlap)
                let tile_size = Some(t.tile_size).filter(|&size| size != 0);
                JobKind::Tiled(Tiling::new(
                    tile_size,
                    if t.overlap == 0 {
                        default_overlap(tile_size)
                    } else {
                        t.overlap
                    },
                    t.exact,
                ))
            }
            None => {
                return Err(Error::invalid(
                    "kind",
                    "missing (single, batch, sweep, tiled or video)",
                ))
            }
        };
        let spec = JobSpec {
            kind,
            contents: hashes("contents", s.contents)?,
            styles: hashes("styles", s.styles)?,
            // unset: every option its default, as each unset field of it is
            params: RenderParams::try_from(s.params.unwrap_or_default())?,
            priority: s.priority,
            max_attempts: s.max_attempts,
            worker_tags: s.worker_tags,
            keep_going: s.keep_going,
            max_workers: s.max_workers,
            checkpoint_every: s.checkpoint_every,
            checkpoint_secs: s.checkpoint_secs,
            content_names: s.content_names,
            style_names: s.style_names,
            name: s.name,
            left_out: s.left_out,
            after: s
                .after
                .iter()
                .map(|id| JobId::checked("after", id))
                .collect::<Result<_, _>>()?,
        };
        spec.expand()
    }
}

/// A job's kind on the wire: a tiled job's tile size 0 when the planner sizes it.
impl From<&JobKind> for pb::job_spec::Kind {
    fn from(kind: &JobKind) -> Self {
        use pb::job_spec::{Batch, Kind, Single, Sweep, Tiled, Video};
        match kind {
            JobKind::Single => Kind::Single(Single {}),
            JobKind::Batch => Kind::Batch(Batch {}),
            JobKind::Sweep(axes) => Kind::Sweep(Sweep {
                axes: axes
                    .iter()
                    .map(|a| pb::SweepAxis {
                        parameter: a.parameter.name().into(),
                        values: a.values.clone(),
                    })
                    .collect(),
            }),
            JobKind::Tiled(tiling) => Kind::Tiled(Tiled {
                tile_size: tiling.fixed_tile_size().unwrap_or(0),
                overlap: tiling.overlap,
                exact: tiling.exact,
            }),
            JobKind::Video(video) => Kind::Video(Video {
                chunk_frames: video.chunk_frames,
                frame_iterations: video.frame_iterations,
            }),
        }
    }
}

impl From<&JobSpec> for pb::JobSpec {
    fn from(s: &JobSpec) -> Self {
        pb::JobSpec {
            kind: Some((&s.kind).into()),
            contents: s.contents.iter().map(ToString::to_string).collect(),
            styles: s.styles.iter().map(ToString::to_string).collect(),
            params: Some((&s.params).into()),
            priority: s.priority,
            max_attempts: s.max_attempts,
            worker_tags: s.worker_tags.clone(),
            keep_going: s.keep_going,
            max_workers: s.max_workers,
            after: s.after.iter().map(ToString::to_string).collect(),
            checkpoint_every: s.checkpoint_every,
            checkpoint_secs: s.checkpoint_secs,
            content_names: s.content_names.clone(),
            style_names: s.style_names.clone(),
            name: s.name.clone(),
            left_out: s.left_out.clone(),
        }
    }
}

impl From<&LossTerms> for pb::Losses {
    fn from(l: &LossTerms) -> Self {
        pb::Losses {
            content: l.content,
            style: l.style,
            tv: l.tv,
            total: l.total,
            temporal: l.temporal,
        }
    }
}

impl From<pb::Losses> for LossTerms {
    fn from(l: pb::Losses) -> Self {
        LossTerms {
            content: l.content,
            style: l.style,
            tv: l.tv,
            total: l.total,
            temporal: l.temporal,
        }
    }
}

/// The longest ETA a progress report keeps (a year, in seconds): beyond it, an estimate says nothing.
pub const MAX_ETA_SECONDS: f64 = 365.0 * 86_400.0;

impl From<&TaskProgress> for pb::Progress {
    fn from(p: &TaskProgress) -> Self {
        pb::Progress {
            scale: p.scale,
            scales: p.scales,
            iteration: p.iteration,
            iterations: p.iterations,
            losses: Some((&p.losses).into()),
            eta_seconds: p.eta_seconds,
        }
    }
}

impl From<pb::Progress> for TaskProgress {
    /// Unset losses are zeros; an ETA that is negative or not a number is 0 (not known), one beyond
    /// [`MAX_ETA_SECONDS`] that.
    fn from(p: pb::Progress) -> Self {
        TaskProgress {
            scale: p.scale,
            scales: p.scales,
            iteration: p.iteration,
            iterations: p.iterations,
            losses: p.losses.unwrap_or_default().into(),
            eta_seconds: if p.eta_seconds >= 0.0 {
                p.eta_seconds.min(MAX_ETA_SECONDS)
            } else {
                0.0
            },
        }
    }
}

impl From<LogLines> for pb::TaskLogLines {
    fn from(l: LogLines) -> Self {
        pb::TaskLogLines {
            lines: l.lines,
            left_out: l.left_out,
            first_line: 0,
        }
    }
}

impl From<SentLines> for pb::TaskLogLines {
    fn from(l: SentLines) -> Self {
        pb::TaskLogLines {
            first_line: l.first,
            ..l.lines.into()
        }
    }
}

impl From<pb::TaskLogLines> for SentLines {
    /// Bounded as [`LogLines`] from the message is.
    fn from(l: pb::TaskLogLines) -> Self {
        SentLines {
            first: l.first_line,
            lines: l.into(),
        }
    }
}

impl From<pb::TaskLogLines> for LogLines {
    /// Bounded as [`LogLines::extend`] bounds lines, whatever came: long lines cut, the earliest after the
    /// first few left out and counted.
    fn from(l: pb::TaskLogLines) -> Self {
        let mut log = LogLines {
            lines: Vec::new(),
            left_out: l.left_out,
        };
        log.extend(l.lines);
        log
    }
}

impl From<AttemptLog> for pb::AttemptLog {
    fn from(a: AttemptLog) -> Self {
        pb::AttemptLog {
            attempt: a.attempt,
            worker_id: a.worker.into(),
            started_ms: a.started_ms,
            ended_ms: a.ended_ms,
            outcome: a.outcome,
            log: Some(a.log.into()),
        }
    }
}

impl From<pb::AttemptLog> for AttemptLog {
    fn from(a: pb::AttemptLog) -> Self {
        AttemptLog {
            attempt: a.attempt,
            worker: a.worker_id.into(),
            started_ms: a.started_ms,
            ended_ms: a.ended_ms,
            outcome: a.outcome,
            log: a.log.map(LogLines::from).unwrap_or_default(),
        }
    }
}

/// A leased task as the coordinator sends it.
impl From<&Task> for pb::Task {
    fn from(t: &Task) -> Self {
        let (checkpoint_every, checkpoint_secs) = t.checkpoints.fields();
        pb::Task {
            job_id: t.id.job.to_string(),
            index: t.id.index,
            content: t.spec.content.to_string(),
            styles: t.spec.styles.iter().map(ToString::to_string).collect(),
            params: Some((&t.spec.params).into()),
            label: t.spec.label.clone(),
            tile: t.spec.scale.as_ref().map(Into::into),
            frame: t.spec.frame.as_ref().map(Into::into),
            checkpoint_every,
            checkpoint_secs,
            resume: t.resume.as_ref().map(Into::into),
        }
    }
}

impl From<&Checkpoint> for pb::Checkpoint {
    fn from(c: &Checkpoint) -> Self {
        pb::Checkpoint {
            sha256: c.blob.to_string(),
            scale: c.scale,
            iteration: c.iteration,
        }
    }
}

impl TryFrom<pb::Checkpoint> for Checkpoint {
    type Error = Error;

    /// A checkpoint as a worker is handed it; an error names `resume`.
    fn try_from(c: pb::Checkpoint) -> Result<Self, Error> {
        if c.scale == 0 {
            return Err(Error::invalid("resume", "scale 0: scales count from 1"));
        }
        Ok(Checkpoint {
            blob: hashes("resume", vec![c.sha256])?.remove(0),
            scale: c.scale,
            iteration: c.iteration,
            bytes: 0,
        })
    }
}

impl From<&VideoFrame> for pb::VideoFrame {
    fn from(f: &VideoFrame) -> Self {
        let (content, result) = f
            .previous
            .as_ref()
            .map_or((String::new(), String::new()), |p| {
                (p.content.to_string(), p.result.to_string())
            });
        pb::VideoFrame {
            index: f.index,
            frames: f.frames,
            previous_content: content,
            previous_result: result,
        }
    }
}

impl TryFrom<pb::VideoFrame> for VideoFrame {
    type Error = Error;

    /// Converts and checks: the index within the frames, the previous frame's two hashes both set (or both
    /// empty, for a chunk's first frame), and no previous frame for frame 0. An error names `frame`,
    /// `previous_content` or `previous_result`.
    fn try_from(f: pb::VideoFrame) -> Result<Self, Error> {
        if f.index >= f.frames {
            return Err(Error::invalid(
                "frame",
                format!("frame index {} of {} frames", f.index, f.frames),
            ));
        }
        let previous = match (f.previous_content.is_empty(), f.previous_result.is_empty()) {
            (true, true) => None,
            _ if f.index == 0 => {
                return Err(Error::invalid(
                    "frame",
                    "the first frame has no previous frame",
                ))
            }
            _ => Some(PreviousFrame {
                content: hashes("previous_content", vec![f.previous_content])?.remove(0),
                result: hashes("previous_result", vec![f.previous_result])?.remove(0),
            }),
        };
        Ok(VideoFrame {
            index: f.index,
            frames: f.frames,
            previous,
        })
    }
}

impl TryFrom<pb::Task> for Task {
    type Error = Error;

    /// A leased task as a worker decodes it, checked: its images' hashes, its parameters' values and its
    /// scale task (the engine checks the parameters against the styles). An error names the field at fault.
    fn try_from(t: pb::Task) -> Result<Self, Error> {
        if t.job_id.is_empty() {
            return Err(Error::invalid("job_id", "missing"));
        }
        let content = hashes("content", vec![t.content])?.remove(0);
        let styles = hashes("styles", t.styles)?;
        let params = RenderParams::try_from(t.params.unwrap_or_default())?;
        if t.tile.is_some() && t.frame.is_some() {
            return Err(Error::invalid(
                "frame",
                "a task is a tile of a tiled job or a frame of a video, not both",
            ));
        }
        Ok(Task {
            id: TaskId {
                job: JobId::new(t.job_id),
                index: t.index,
            },
            spec: TaskSpec {
                content,
                styles,
                params,
                label: t.label,
                scale: t.tile.map(ScaleTask::try_from).transpose()?,
                frame: t.frame.map(VideoFrame::try_from).transpose()?,
            },
            checkpoints: CheckpointEvery::of(t.checkpoint_every, t.checkpoint_secs)?,
            // a malformed checkpoint is no reason to fail the task: it starts from the beginning
            resume: t.resume.and_then(|c| Checkpoint::try_from(c).ok()),
        })
    }
}

/// The flat wire form of a scale task: its region as a rectangle (the whole canvas in exact mode), its
/// index and count (0 and 1 for the whole canvas; the shard and shards of an exact scale over several
/// workers), its block or tile size, and `exact`.
impl From<&ScaleTask> for pb::TileTask {
    fn from(t: &ScaleTask) -> Self {
        let rect = t.rect();
        pb::TileTask {
            scale: t.scale,
            scales: t.scales,
            tile: t.index(),
            tiles: t.count(),
            canvas_width: t.canvas_width,
            canvas_height: t.canvas_height,
            x: rect.x,
            y: rect.y,
            width: rect.width,
            height: rect.height,
            tile_size: t.block(),
            exact: matches!(t.part, ScalePart::Whole { .. } | ScalePart::Shard { .. }),
        }
    }
}

impl TryFrom<pb::TileTask> for ScaleTask {
    type Error = Error;

    /// Converts and checks that the tile lies inside its canvas, and that an exact task is the whole canvas
    /// (tile 0 of 1). An error names `tile_size` or `tile`.
    fn try_from(t: pb::TileTask) -> Result<Self, Error> {
        let inside = t.width > 0
            && t.height > 0
            && u64::from(t.x) + u64::from(t.width) <= u64::from(t.canvas_width)
            && u64::from(t.y) + u64::from(t.height) <= u64::from(t.canvas_height);
        // a task of a job stored by an earlier version may have its smaller tiles
        if t.tile_size < STORED_MIN_TILE_SIZE {
            return Err(Error::invalid(
                "tile_size",
                format!(
                    "must be at least {STORED_MIN_TILE_SIZE}, got {}",
                    t.tile_size
                ),
            ));
        }
        // no canvas past the largest output a job may ask for: a worker resamples its images to it
        if t.canvas_width.max(t.canvas_height) > crate::params::MAX_SIZE {
            return Err(Error::invalid(
                "tile",
                format!(
                    "a {}x{} canvas is larger than {} px a side, the largest output",
                    t.canvas_width,
                    t.canvas_height,
                    crate::params::MAX_SIZE
                ),
            ));
        }
        if !inside || t.scale >= t.scales || t.tile >= t.tiles {
            return Err(Error::invalid(
                "tile",
                format!(
                    "tile {}/{} of scale {}/{}: {}x{} at {},{} is not inside the {}x{} canvas",
                    t.tile,
                    t.tiles,
                    t.scale,
                    t.scales,
                    t.width,
                    t.height,
                    t.x,
                    t.y,
                    t.canvas_width,
                    t.canvas_height
                ),
            ));
        }
        let rect = Rect {
            x: t.x,
            y: t.y,
            width: t.width,
            height: t.height,
        };
        let part = if t.exact && t.tiles > 1 {
            // a shard: the band the planner cuts for that many shards (shard_rows), no other rows
            let bands = shard_rows(t.canvas_height, t.tile_size, t.tiles);
            let band = bands.get(t.tile as usize).copied();
            let planned = bands.len() == t.tiles as usize
                && band == Some((t.y, t.y + t.height))
                && (t.x, t.width) == (0, t.canvas_width);
            if !planned {
                return Err(Error::invalid(
                    "tile",
                    format!(
                        "shard {}/{} of a {}x{} canvas in {}-px blocks is not {}x{} at {},{}: the shards \
                         are {bands:?}",
                        t.tile, t.tiles, t.canvas_width, t.canvas_height, t.tile_size, t.width,
                        t.height, t.x, t.y
                    ),
                ));
            }
            ScalePart::Shard {
                block: t.tile_size,
                index: t.tile,
                shards: t.tiles,
                rect,
            }
        } else if t.exact {
            let whole = (t.x, t.y, t.width, t.height, t.tiles)
                == (0, 0, t.canvas_width, t.canvas_height, 1);
            if !whole {
                return Err(Error::invalid(
                    "tile",
                    format!(
                        "an exact task is the whole {}x{} canvas, tile 0 of 1; got {}x{} at {},{}, tile {}/{}",
                        t.canvas_width, t.canvas_height, t.width, t.height, t.x, t.y, t.tile, t.tiles
                    ),
                ));
            }
            ScalePart::Whole { block: t.tile_size }
        } else {
            ScalePart::Tile {
                index: t.tile,
                tiles: t.tiles,
                rect,
                tile_size: t.tile_size,
            }
        };
        Ok(ScaleTask {
            scale: t.scale,
            scales: t.scales,
            canvas_width: t.canvas_width,
            canvas_height: t.canvas_height,
            part,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::parse_sweep;

    fn spec() -> JobSpec {
        JobSpec {
            priority: 3,
            max_attempts: 2,
            max_workers: 4,
            after: vec![JobId::new("job-19a2b3c0001")],
            ..JobSpec::new(
                JobKind::Sweep(parse_sweep("style_weight=10,100;style_blend=0.7:0.3").unwrap()),
                vec![ImageHash::of(b"c")],
                vec![ImageHash::of(b"s1"), ImageHash::of(b"s2")],
                RenderParams {
                    size: 128,
                    init: Init::Image(ImageHash::of(b"i")),
                    ..Default::default()
                },
            )
        }
    }

    #[test]
    fn job_specs_round_trip() {
        let s = spec();
        let wire: pb::JobSpec = (&s).into();
        assert_eq!(JobSpec::try_from(wire).unwrap(), s);
        // another job's result as the init, and a bad job id named
        let from_job = JobSpec {
            params: RenderParams {
                init: Init::Job(JobId::new("job-1")),
                ..s.params.clone()
            },
            ..s.clone()
        };
        let wire: pb::JobSpec = (&from_job).into();
        assert_eq!(JobSpec::try_from(wire).unwrap(), from_job);
        // the images' names, and those left out (a keep-going batch's)
        let named = JobSpec {
            kind: JobKind::Batch,
            keep_going: true,
            left_out: vec!["photos/b.jpg: not an image (unknown format)".into()],
            content_names: vec!["tubingen".into(); s.contents.len()],
            style_names: vec!["starry night".into(); s.styles.len()],
            name: "a sweep of tubingen".into(),
            ..s.clone()
        };
        let wire: pb::JobSpec = (&named).into();
        assert_eq!(JobSpec::try_from(wire).unwrap(), named);
        let mut wire: pb::JobSpec = (&s).into();
        wire.after.push("job 2".into());
        let err = JobSpec::try_from(wire).unwrap_err().to_string();
        assert!(err.starts_with("after: 'job 2' is no job id"), "{err}");
    }

    /// The edge's one expansion gives the spec and the tasks that expanding the spec gives.
    #[test]
    fn a_wire_spec_expands_once_into_its_tasks() {
        let s = spec();
        let job = ExpandedJob::try_from(pb::JobSpec::from(&s)).unwrap();
        assert_eq!(job.spec(), &s);
        assert_eq!(job.tasks(), s.tasks().unwrap().as_slice());
        assert_eq!(job.tasks().len(), 2, "a sweep of 2 x 1 points");
    }

    #[test]
    fn tasks_round_trip() {
        let s = tiled_512();
        for exact in [false, true] {
            let s = JobSpec {
                kind: JobKind::Tiled(Tiling::new(Some(128), 64, exact)),
                ..s.clone()
            };
            for spec in s
                .scale_tasks(400, 300, 1, &ImageHash::of(b"p"), &[], None)
                .unwrap()
            {
                let task = Task {
                    id: TaskId {
                        job: JobId::new("job-1"),
                        index: 4,
                    },
                    spec,
                    checkpoints: CheckpointEvery::Iterations(10.try_into().unwrap()),
                    resume: Some(Checkpoint {
                        blob: ImageHash::of(b"checkpoint"),
                        scale: 1,
                        iteration: 20,
                        bytes: 0,
                    }),
                };
                assert_eq!(Task::try_from(pb::Task::from(&task)).unwrap(), task);
                let timed = Task {
                    checkpoints: CheckpointEvery::Secs(60.try_into().unwrap()),
                    ..task
                };
                let wire = pb::Task::from(&timed);
                assert_eq!((wire.checkpoint_every, wire.checkpoint_secs), (0, 60));
                assert_eq!(Task::try_from(wire.clone()).unwrap(), timed);
                let both = pb::Task {
                    checkpoint_every: 10,
                    ..wire
                };
                let err = Task::try_from(both).unwrap_err().to_string();
                assert!(err.starts_with("checkpoint_secs: "), "{err}");
            }
        }
    }

    /// A video job and its frames, the first and a later one, survive the wire; a frame outside the
    /// video, a previous frame for the first frame, half a previous frame, or a frame that is also a tile
    /// is refused naming its field.
    #[test]
    fn video_jobs_and_frames_round_trip_and_bad_frames_name_the_field() {
        let s = JobSpec {
            kind: JobKind::Video(crate::job::Video {
                chunk_frames: 2,
                frame_iterations: 30,
            }),
            contents: vec![ImageHash::of(b"f1"), ImageHash::of(b"f2")],
            styles: vec![ImageHash::of(b"s1")],
            params: RenderParams::default(),
            ..spec()
        };
        let wire: pb::JobSpec = (&s).into();
        assert_eq!(JobSpec::try_from(wire).unwrap(), s);
        let first = s.tasks().unwrap();
        let r1 = ImageHash::of(b"r1");
        let next = s.next_frames([(&first[0], Some(&r1))]).unwrap();
        assert!(next[0].previous_frame().is_some());
        let task = |spec: TaskSpec| Task {
            checkpoints: CheckpointEvery::Never,
            resume: None,
            id: TaskId {
                job: JobId::new("job-1"),
                index: 1,
            },
            spec,
        };
        for spec in [first[0].clone(), next[0].clone()] {
            let t = task(spec);
            assert_eq!(Task::try_from(pb::Task::from(&t)).unwrap(), t);
        }
        let bad = |f: &dyn Fn(&mut pb::Task), field: &str| {
            let mut wire = pb::Task::from(&task(next[0].clone()));
            f(&mut wire);
            let err = Task::try_from(wire).unwrap_err().to_string();
            assert!(err.starts_with(field), "{field}: {err}");
        };
        bad(&|w| w.frame.as_mut().unwrap().index = 2, "frame");
        bad(&|w| w.frame.as_mut().unwrap().index = 0, "frame");
        bad(
            &|w| w.frame.as_mut().unwrap().previous_result = String::new(),
            "previous_result",
        );
        bad(
            &|w| w.frame.as_mut().unwrap().previous_content = "x".into(),
            "previous_content",
        );
        bad(
            &|w| {
                w.tile = a_tile_on_the_wire();
            },
            "frame",
        );
    }

    /// A tiled job of 512 px in 128-px tiles.
    fn tiled_512() -> JobSpec {
        JobSpec {
            kind: JobKind::Tiled(Tiling::new(Some(128), 32, false)),
            params: RenderParams {
                size: 512,
                ..Default::default()
            },
            ..spec()
        }
    }

    /// A tile of [`tiled_512`], on the wire.
    fn a_tile_on_the_wire() -> Option<pb::TileTask> {
        let tasks = tiled_512()
            .scale_tasks(400, 300, 1, &ImageHash::of(b"p"), &[], None)
            .unwrap();
        tasks[0].scale.as_ref().map(Into::into)
    }

    /// A tile is refused naming `tile` outside its canvas, or on a canvas past the largest output (a
    /// worker would resample its images to it).
    #[test]
    fn a_tile_outside_its_canvas_or_on_a_canvas_too_large_is_refused() {
        let tile = a_tile_on_the_wire().unwrap();
        ScaleTask::try_from(tile).unwrap();
        let refused = |t: pb::TileTask| ScaleTask::try_from(t).unwrap_err().to_string();
        let huge = pb::TileTask {
            canvas_width: crate::params::MAX_SIZE + 1,
            ..tile
        };
        let err = refused(huge);
        let expected = format!(
            "tile: a 16385x{} canvas is larger than 16384 px a side",
            tile.canvas_height
        );
        assert!(err.starts_with(&expected), "{err}");
        let canvas = format!(
            "is not inside the {}x{} canvas",
            tile.canvas_width, tile.canvas_height
        );
        let outside = pb::TileTask {
            x: tile.canvas_width,
            ..tile
        };
        let err = refused(outside);
        assert!(err.starts_with("tile: ") && err.contains(&canvas), "{err}");
    }

    #[test]
    fn a_progress_report_keeps_a_sane_eta() {
        let eta = |eta_seconds: f64| {
            TaskProgress::from(pb::Progress {
                eta_seconds,
                ..Default::default()
            })
            .eta_seconds
        };
        assert_eq!(eta(12.5), 12.5);
        for bad in [-1.0, f64::NAN, f64::NEG_INFINITY] {
            assert_eq!(eta(bad), 0.0, "{bad}");
        }
        assert_eq!(eta(f64::INFINITY), MAX_ETA_SECONDS);
        let p = TaskProgress {
            eta_seconds: 3.0,
            ..Default::default()
        };
        assert_eq!(TaskProgress::from(pb::Progress::from(&p)), p);
    }

    #[test]
    fn unset_params_take_the_defaults() {
        assert_eq!(
            RenderParams::try_from(pb::RenderParams::default()).unwrap(),
            RenderParams::default()
        );
        // a spec's params left out, as each of their fields
        let mut wire: pb::JobSpec = (&spec()).into();
        wire.params = None;
        assert_eq!(
            JobSpec::try_from(wire).unwrap().params,
            RenderParams::default()
        );
        // a tiled job's overlap left out: the default, or half the tile size where that is less
        let tiled = |tile_size| {
            let mut wire: pb::JobSpec = (&spec()).into();
            wire.kind = Some(pb::job_spec::Kind::Tiled(pb::job_spec::Tiled {
                tile_size,
                ..Default::default()
            }));
            match JobSpec::try_from(wire).map(|s| s.kind) {
                Ok(JobKind::Tiled(t)) => t.overlap,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(tiled(0), crate::tiling::DEFAULT_OVERLAP);
        assert_eq!(tiled(512), crate::tiling::DEFAULT_OVERLAP);
        assert_eq!(tiled(200), 100);
    }

    #[test]
    fn bad_wire_values_name_the_field() {
        let bad = |f: &dyn Fn(&mut pb::JobSpec), field: &str| {
            let mut wire: pb::JobSpec = (&spec()).into();
            f(&mut wire);
            let err = JobSpec::try_from(wire).unwrap_err().to_string();
            assert!(err.starts_with(field), "{field}: {err}");
        };
        bad(&|w| w.kind = None, "kind");
        bad(&|w| w.contents = vec!["nope".into()], "contents");
        bad(&|w| w.params.as_mut().unwrap().size = Some(0), "size");
        bad(
            &|w| w.params.as_mut().unwrap().content_weight = Some(f64::NAN),
            "content_weight",
        );
        bad(
            &|w| w.params.as_mut().unwrap().optimizer = Some(99),
            "optimizer",
        );
        bad(
            &|w| w.params.as_mut().unwrap().init = Some("image:zz".into()),
            "init",
        );
        bad(
            &|w| w.params.as_mut().unwrap().style_layers = vec!["relu7_1".into()],
            "style_layers",
        );
        bad(
            &|w| match w.kind.as_mut() {
                Some(pb::job_spec::Kind::Sweep(sweep)) => sweep.axes[0].parameter = "colour".into(),
                _ => unreachable!("spec() is a sweep"),
            },
            "sweep",
        );
        bad(
            &|w| w.params.as_mut().unwrap().init = Some("/tmp/x.png".into()),
            "init",
        );
    }

    /// Lists longer than any job uses are refused as the parameters come in, naming the field (a sweep
    /// or a batch would otherwise copy them into each of up to 10,000 tasks before checking one), and so
    /// is a layer given twice.
    #[test]
    fn lists_longer_than_any_job_uses_are_refused_as_they_come() {
        let refused = |f: &dyn Fn(&mut pb::RenderParams)| {
            let mut wire = pb::RenderParams::default();
            f(&mut wire);
            RenderParams::try_from(wire).unwrap_err().to_string()
        };
        let layers = |n: usize| vec!["relu4_2".to_string(); n];
        assert_eq!(
            refused(&|p| p.content_layers = layers(17)),
            "content_layers: 17 values: at most 16 (VGG19's ReLU layers)"
        );
        assert_eq!(
            refused(&|p| p.style_layers = vec!["relu1_1".into(), "relu2_1".into(), "relu1_1".into()]),
            "style_layers: relu1_1 given twice: each layer at most once (style_layer_weights weighs them)"
        );
        assert_eq!(
            refused(&|p| p.style_layer_weights = vec![1.0; 17]),
            "style_layer_weights: 17 values: at most 16 (one a style layer)"
        );
        assert_eq!(
            refused(&|p| p.scale_iterations = vec![1; 4_000_000]),
            "scale_iterations: 4000000 values: at most 8 (one a scale)"
        );
        assert_eq!(
            refused(&|p| p.style_blend = vec![1.0; 1001]),
            "style_blend: 1001 values: at most 1000 (one a style image)"
        );
        // at the limits: taken
        let mut wire = pb::RenderParams {
            content_layers: Layer::all().map(|l| l.to_string()).collect(),
            scale_iterations: vec![1; 8],
            style_blend: vec![1.0; 1000],
            ..Default::default()
        };
        RenderParams::try_from(wire.clone()).unwrap();
        wire.style_layers = wire.content_layers.clone();
        wire.style_layer_weights = vec![1.0; 16];
        RenderParams::try_from(wire).unwrap();
    }
}
