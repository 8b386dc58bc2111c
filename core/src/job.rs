//! Jobs of the farm and the tasks they split into: a single render, a batch (contents x styles) or a sweep
//! (a grid of parameter values).

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::checkpoint::{CheckpointEvery, CheckpointFile};
use crate::ids::JobId;
use crate::params::{ImageSize, Init, JobReads, RenderParams};
use crate::tiling::{self, Rect, Tiling};
use crate::Error;

pub use crate::ids::{ImageHash, TaskId};

/// Most tasks one job may expand to.
pub const MAX_TASKS_PER_JOB: usize = 10_000;
/// Most content or style images of one job.
pub const MAX_IMAGES_PER_JOB: usize = 1_000;
/// Longest value of a sweep's axis, in characters (a blend of 100 styles' weights, `0.01:0.01:...`, is
/// 500): it is the task's label too.
pub const MAX_SWEEP_VALUE_CHARS: usize = 1024;
/// Longest label of a sweep's point (its axes' `name=value`, space-separated), in characters: a label is
/// kept with each of up to [`MAX_TASKS_PER_JOB`] tasks.
pub const MAX_SWEEP_LABEL_CHARS: usize = 2048;
/// Most attempts per task a job may ask for (or a coordinator default to).
pub const MAX_ATTEMPTS: u32 = 100;
/// The most jobs a job may wait for ([`JobSpec::after`]).
pub const MAX_AFTER: usize = 16;
/// The longest name of a job's input image ([`JobSpec::content_names`]), in bytes.
pub const MAX_IMAGE_NAME_BYTES: usize = 100;

/// The longest name of a job ([`JobSpec::name`]), in bytes.
pub const MAX_JOB_NAME_BYTES: usize = 200;

/// The longest account of a content image left out at a job's submit ([`JobSpec::left_out`]), in bytes.
pub const MAX_LEFT_OUT_BYTES: usize = 512;

/// `why` a content image was left out made an entry of [`JobSpec::left_out`]: its control characters
/// (a decoder's multi-line message) made spaces, cut to [`MAX_LEFT_OUT_BYTES`] at a character boundary.
pub fn left_out_entry(why: &str) -> String {
    let why = why.replace(char::is_control, " ");
    crate::task_log::at_most(&why, MAX_LEFT_OUT_BYTES).to_string()
}

/// Refuses a job of more than [`MAX_IMAGES_PER_JOB`] content or style images ([`JobSpec::check_new`]),
/// which a client checks too before it reads any of them.
///
/// # Errors
/// [`Error::Invalid`] on `contents` or `styles`.
pub fn check_image_counts(contents: usize, styles: usize) -> Result<(), Error> {
    for (field, images) in [("contents", contents), ("styles", styles)] {
        if images > MAX_IMAGES_PER_JOB {
            return Err(Error::invalid(
                field,
                format!("more than {MAX_IMAGES_PER_JOB} images in one job"),
            ));
        }
    }
    Ok(())
}

/// Checks a job's names of its `count` images of a kind (`field`: [`JobSpec::content_names`] or
/// [`JobSpec::style_names`]): none, or one each, of 1 to [`MAX_IMAGE_NAME_BYTES`] bytes without control
/// characters.
fn check_names(field: &'static str, names: &[String], count: usize) -> Result<(), Error> {
    if !names.is_empty() && names.len() != count {
        return Err(Error::invalid(
            field,
            format!(
                "{} names for {count} images: one each, or none",
                names.len()
            ),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() || name.len() > MAX_IMAGE_NAME_BYTES || name.contains(char::is_control) {
            return Err(Error::invalid(
                field,
                format!(
                    "name {}: 1 to {MAX_IMAGE_NAME_BYTES} bytes without control characters",
                    i + 1
                ),
            ));
        }
    }
    Ok(())
}

/// The name a job gives the image of file `path` ([`JobSpec::content_names`]): its stem (`IMG_0001` for
/// `photos/IMG_0001.jpg`), its control characters made spaces, cut to [`MAX_IMAGE_NAME_BYTES`] at a
/// character boundary; `image` for a path without one.
pub fn image_name_of(path: &std::path::Path) -> String {
    name_of(path.file_stem())
}

/// The names a job gives the images of files `paths`, in order: [`image_name_of`] each, but the file's
/// whole name (`a.png`, `a.jpg`) for those whose stems the others share, so that their labels and result
/// files tell them apart.
pub fn image_names_of(paths: &[&std::path::Path]) -> Vec<String> {
    let stems: Vec<String> = paths.iter().map(|p| image_name_of(p)).collect();
    let shared = |stem: &String| stems.iter().filter(|s| *s == stem).count() > 1;
    (paths.iter().zip(&stems))
        .map(|(path, stem)| match shared(stem) {
            true => name_of(path.file_name()),
            false => stem.clone(),
        })
        .collect()
}

/// A file name's part (`name`) made an image's name: control characters made spaces, cut to
/// [`MAX_IMAGE_NAME_BYTES`]; `image` when there is none.
fn name_of(name: Option<&std::ffi::OsStr>) -> String {
    let name = name
        .map(|s| s.to_string_lossy().replace(char::is_control, " "))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "image".into());
    crate::task_log::at_most(&name, MAX_IMAGE_NAME_BYTES).to_string()
}

/// The name of image `i` (0-based) of a kind in a task's label: its name ([`JobSpec::content_names`]) if
/// the job has them, else `what` and its 1-based number (`content 3`).
fn image_name(names: &[String], i: usize, what: &str) -> String {
    names
        .get(i)
        .cloned()
        .unwrap_or_else(|| format!("{what} {}", i + 1))
}
/// Most tags a worker may have, or a job ask for.
pub const MAX_TAGS: usize = 16;
/// Longest tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;

/// Checks a list of worker tags (a worker's, or those a job asks for): at most [`MAX_TAGS`], each 1 to
/// [`MAX_TAG_CHARS`] letters, digits, `-`, `_` or `.`; the error names `field`.
pub fn check_tags(field: &'static str, tags: &[String]) -> Result<(), Error> {
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid(
            field,
            format!("at most {MAX_TAGS} tags, got {}", tags.len()),
        ));
    }
    for tag in tags {
        let ok = (1..=MAX_TAG_CHARS).contains(&tag.len())
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            // a hostile tag is echoed no longer than a tag may be
            let shown: String = tag.chars().take(MAX_TAG_CHARS).collect();
            return Err(Error::invalid(
                field,
                format!("tag {shown:?}: 1 to {MAX_TAG_CHARS} letters, digits, '-', '_' or '.'"),
            ));
        }
    }
    Ok(())
}

/// What a job renders, with the parameters of its kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// One content with the style set: one task.
    Single,
    /// Every content x every style, each style alone: N x M tasks.
    Batch,
    /// One content with the style set, one task per point of the grid of these axes (at least one), then
    /// a contact sheet.
    Sweep(Vec<SweepAxis>),
    /// One content with the style set at a size beyond one device: a pyramid of scales, each later scale cut
    /// into overlapping tiles of this tiling (one task each) and stitched by the coordinator before the next
    /// is created.
    Tiled(Tiling),
    /// The contents are the frames of a video, in order, each rendered with the style set and, after the
    /// first frame of its chunk, held where its content matches the previous frame's to that frame's result
    /// (Ruder et al. 2016): one task per frame, a chunk's frames one after the other ([`Video`]).
    Video(Video),
}

/// The parameters of a video job ([`JobKind::Video`]). Every frame after the first of its chunk starts,
/// where its content matches the previous frame's, from the previous frame's result, and is held to it
/// there by the temporal loss (`params.temporal_weight`; Ruder et al. 2016). With `params.optical_flow` (the
/// default), the previous frame is followed along the optical flow, so a moving camera or object is
/// held too; without, frames are compared in place. Elsewhere a frame starts as the first frame did
/// (`params.init`). So a chunk's frames render one after the other, and the chunks side by side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Video {
    /// Frames per chunk, at most [`MAX_IMAGES_PER_JOB`]: the frames are cut into chunks of this many
    /// consecutive frames, rendered side by side on as many workers (a chunk's first frame starts afresh,
    /// so the video may jump there); 0: one chunk of every frame (the most coherent, one worker at a time).
    pub chunk_frames: u32,
    /// Iterations of each frame after a chunk's first (which renders with `params.iterations` and
    /// `params.scales`), one scale at the full size, from the previous frame's result; at most
    /// [`crate::params::MAX_ITERATIONS`]; 0: half of `params.iterations`, rounded up (artistic-videos'
    /// default is 2000 for the first frame and 1000 for the others).
    pub frame_iterations: u32,
}

impl Video {
    /// Checks the fields' ranges; an error names `chunk_frames` or `frame_iterations`.
    pub fn validate(&self) -> Result<(), Error> {
        if self.chunk_frames as usize > MAX_IMAGES_PER_JOB {
            return Err(Error::invalid(
                "chunk_frames",
                format!(
                    "at most {MAX_IMAGES_PER_JOB} (0: one chunk), got {}",
                    self.chunk_frames
                ),
            ));
        }
        if self.frame_iterations > crate::params::MAX_ITERATIONS {
            return Err(Error::invalid(
                "frame_iterations",
                format!(
                    "at most {} (0: half of iterations), got {}",
                    crate::params::MAX_ITERATIONS,
                    self.frame_iterations
                ),
            ));
        }
        Ok(())
    }

    /// The iterations of a frame after a chunk's first, for a job whose first frames run `iterations`.
    pub fn iterations_after_first(&self, iterations: u32) -> u32 {
        match self.frame_iterations {
            0 => iterations.div_ceil(2).max(1),
            n => n,
        }
    }

    /// Whether frame `index` (0-based) starts a chunk: it renders afresh, with no frame before it.
    pub fn starts_chunk(&self, index: u32) -> bool {
        index.is_multiple_of(self.chunk_frames) // of 0: only 0
    }
}

/// Where a task of a video job sits among the frames ([`JobKind::Video`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoFrame {
    /// 0-based index of the frame among the job's contents.
    pub index: u32,
    /// Number of frames of the job.
    pub frames: u32,
    /// The frame before this one in its chunk, with its result: the temporal loss' target. None for the
    /// first frame of a chunk.
    pub previous: Option<PreviousFrame>,
}

/// The frame before a video frame: its content and its rendered result, by sha256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviousFrame {
    /// The previous frame's content: where it matches this frame's, the temporal loss holds the result.
    pub content: ImageHash,
    /// The previous frame's result: the target of the temporal loss, and where the content matches, this
    /// frame's start (moved along the optical flow with `params.optical_flow`).
    pub result: ImageHash,
}

impl JobKind {
    /// The kind's name as people read it: `single`, `batch`, `sweep`, `tiled` or `video`.
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Single => "single",
            JobKind::Batch => "batch",
            JobKind::Sweep(_) => "sweep",
            JobKind::Tiled(_) => "tiled",
            JobKind::Video(_) => "video",
        }
    }

    /// Whether the coordinator has work of its own once every task of a stage succeeded: a sweep's contact
    /// sheet, a tiled job's stitch of the scale (and its next scale's tiles), a video's next frames. A job
    /// of such a kind succeeds when that work is done, not with its last task.
    pub fn has_stage_work(&self) -> bool {
        matches!(
            self,
            JobKind::Sweep(_) | JobKind::Tiled(_) | JobKind::Video(_)
        )
    }

    /// A tiled job's tiling; `None` for other kinds.
    pub fn tiling(&self) -> Option<Tiling> {
        match self {
            JobKind::Tiled(tiling) => Some(*tiling),
            _ => None,
        }
    }
}

/// A parameter a sweep can vary: the name of a render option marked `sweep: true` in the options' table
/// ([`RenderParams::sweepable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepParam(&'static str);

impl Serialize for SweepParam {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for SweepParam {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl SweepParam {
    /// The option's name, e.g. `style_weight`.
    pub fn name(self) -> &'static str {
        self.0
    }
}

impl FromStr for SweepParam {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        RenderParams::sweepable()
            .find(|name| *name == s)
            .map(SweepParam)
            .ok_or_else(|| {
                let names: Vec<&str> = RenderParams::sweepable().collect();
                Error::invalid(
                    "sweep",
                    format!(
                        "unknown parameter '{s}' (expected one of: {})",
                        names.join(", ")
                    ),
                )
            })
    }
}

/// One axis of a sweep: a parameter and its values, as text (`100`, or `0.7:0.3` for a style blend).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepAxis {
    /// The option this axis varies.
    pub parameter: SweepParam,
    /// The option's values, in order, as text (a list's items separated by `:`); at least one.
    pub values: Vec<String>,
}

impl SweepAxis {
    /// Sets this axis' `value` in `params` (a list's items separated by `:`); unchecked.
    fn apply(&self, value: &str, params: &mut RenderParams) -> Result<(), Error> {
        let name = self.parameter.name();
        params
            .set(name, &value.replace(':', ","))
            .map_err(|e| match e {
                Error::Invalid { message, .. } => {
                    Error::invalid("sweep", format!("{name}: {message}"))
                }
                other => other,
            })
    }
}

/// Frame `i`'s name in parentheses (` (003)`, its file's name as the client gave it) where the spec names
/// its contents; empty otherwise.
fn frame_name(spec: &JobSpec, i: usize) -> String {
    spec.content_names
        .get(i)
        .map_or_else(String::new, |name| format!(" ({name})"))
}

/// Parses the CLI's sweep syntax: `style_weight=10,100;seed=0,1` (axes separated by `;`, values by `,`;
/// a style blend's weights by `:`).
pub fn parse_sweep(s: &str) -> Result<Vec<SweepAxis>, Error> {
    s.split(';')
        .filter(|axis| !axis.trim().is_empty())
        .map(|axis| {
            let (name, values) = axis.split_once('=').ok_or_else(|| {
                Error::invalid(
                    "sweep",
                    format!("'{axis}': expected parameter=value,value,..."),
                )
            })?;
            let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
            if values.iter().any(String::is_empty) {
                return Err(Error::invalid("sweep", format!("'{axis}': empty value")));
            }
            Ok(SweepAxis {
                parameter: name.trim().parse()?,
                values,
            })
        })
        .collect()
}

/// What a client submits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Single, batch, sweep (with its axes) or tiled (with its tiling): how the job expands into tasks.
    pub kind: JobKind,
    /// The content images: one, or several for a batch (at most [`MAX_IMAGES_PER_JOB`]).
    pub contents: Vec<ImageHash>,
    /// The style images: blended in one render, or each alone in a batch (at most [`MAX_IMAGES_PER_JOB`]).
    pub styles: Vec<ImageHash>,
    /// The render parameters every task starts from (a sweep varies some; a tiled job sets its pyramid's).
    pub params: RenderParams,
    /// Higher runs first; at equal priorities, the tenant with the fewest tasks running, then submission
    /// order (the coordinator's fair share).
    pub priority: i32,
    /// Attempts per task before the job fails, at most [`MAX_ATTEMPTS`]; 0: the coordinator's default.
    pub max_attempts: u32,
    /// Only workers with every one of these tags take the job's tasks (as Flamenco's worker tags: e.g.
    /// `gpu` for a large tiled job in a farm with CPU workers too); none: any worker ([`check_tags`]).
    #[serde(default)]
    pub worker_tags: Vec<String>,
    /// A batch's tasks, and a sweep's variants, are independent: with `keep_going`, a task that fails for
    /// good (out of attempts, or its non-retryable error confirmed) fails alone and the others render, as
    /// `make -k` goes on (OpenCue's dead frames); the job then ends failed, naming its failed tasks, with
    /// the others' results kept (a sweep's contact sheet made of them, its failed variants' cells marked).
    /// Without (the default), the first such task fails the job and cancels the rest, which spares a farm
    /// a systemic fault (a bad style, say) failing every task in turn. Batch and sweep jobs only.
    #[serde(default)]
    pub keep_going: bool,
    /// The most of the job's tasks that run at once, each on its own worker (Deadline's machine limit,
    /// OpenCue's job max cores), so that one large job leaves workers to the others; 0: no limit. Not for
    /// exact mode, whose shards run together on as many workers as are present.
    #[serde(default)]
    pub max_workers: u32,
    /// Jobs that must succeed before this one starts (OpenCue's and Deadline's job dependencies), at most
    /// [`MAX_AFTER`]; a job whose init is another job's result ([`Init::Job`]) waits for that one too
    /// ([`JobSpec::dependencies`]). One that fails or is cancelled fails this one, naming it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<JobId>,
    /// Checkpoints (OpenCue's frame checkpoints, [`crate::checkpoint`]): every this many iterations of
    /// each scale, a task's worker saves the image it optimizes, and the task's next attempt (its worker
    /// lost, its lease expired, the job retried) starts from the last one; 0: none. Not for the shards of
    /// an exact-mode scale, which step together, nor for a task whose checkpoint could be larger than a
    /// coordinator receives (512 MiB).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checkpoint_every: u32,
    /// Checkpoints as [`JobSpec::checkpoint_every`]'s, at most every this many seconds of a task's render
    /// instead (the first this long after its first iteration): one interval for every kind of worker, where an
    /// iteration takes 10 ms on a GPU and seconds on a CPU; 0: none. Not with `checkpoint_every`
    /// ([`JobSpec::checkpoints`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub checkpoint_secs: u32,
    /// The contents' names, for people (their files' stems: `IMG_0001` for `photos/IMG_0001.jpg`): as many
    /// as `contents`, or none; each 1 to [`MAX_IMAGE_NAME_BYTES`] bytes without control characters
    /// ([`JobSpec::check_new`]). A batch's task labels are made of them (`IMG_0001 x
    /// starry_night`; without, `content 1 x style 1`), and so are its results' file names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub content_names: Vec<String>,
    /// The styles' names, as [`JobSpec::content_names`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub style_names: Vec<String>,
    /// The job's name, for people (OpenCue's and Flamenco's job names: `stylefarm list`, `status`, the
    /// status page show it beside the id): at most [`MAX_JOB_NAME_BYTES`] bytes without control
    /// characters; empty: none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The content images that a keep-going batch's client left out at its submit, for people: each
    /// says which file and why (it could not be read, it is not an image, it is too small for VGG19 at
    /// the job's sizes; [`left_out_entry`]). The job renders the others; `stylefarm status`, `list`,
    /// `watch` and the status page say so, and a wait for the job fails at its end (make's `-k`). At most
    /// [`MAX_IMAGES_PER_JOB`] with the contents, each of 1 to [`MAX_LEFT_OUT_BYTES`] bytes without control
    /// characters, only in a keep-going batch ([`JobSpec::check_new`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Where a task of a tiled job's later scale sits: its scale of the pyramid and its part of that scale's
/// canvas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleTask {
    /// 0-based scale; scale 0 is rendered whole as an ordinary task and has no `ScaleTask`.
    pub scale: u32,
    /// Number of scales of the job's pyramid.
    pub scales: u32,
    /// Width of this scale's canvas, in px: the content image is resized to it, as is the previous scale's
    /// result, the task's init (`params.init`).
    pub canvas_width: u32,
    /// Height of this scale's canvas, in px.
    pub canvas_height: u32,
    /// The whole canvas or one tile of it.
    pub part: ScalePart,
}

/// What a task of a tiled job's scale renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScalePart {
    /// Exact mode ([`Tiling::exact`]): the whole canvas, optimized with its objective evaluated in blocks of
    /// at most `block` px a side (the job's tile size).
    Whole {
        /// Side of the blocks, in px.
        block: u32,
    },
    /// Exact mode over several workers: one shard of the canvas, a band of whole block rows
    /// ([`crate::tiling::shard_rows`]) that one worker optimizes while the shards add up each
    /// evaluation's Gram matrices and shared gradient rows (and, with L-BFGS, each iteration's dot
    /// products) through the coordinator; the bands are pasted together, nothing is blended.
    Shard {
        /// Side of the blocks, in px.
        block: u32,
        /// Index of the shard, top to bottom.
        index: u32,
        /// Number of shards of the scale.
        shards: u32,
        /// The shard's rows of the canvas (the canvas' whole width), in canvas px.
        rect: Rect,
    },
    /// One tile of the scale's grid, stitched with the others by the coordinator.
    Tile {
        /// Row-major index of the tile in the grid.
        index: u32,
        /// Number of tiles of the grid.
        tiles: u32,
        /// The tile's region of the canvas, in canvas px.
        rect: Rect,
        /// The grid's tile size: style targets are computed in blocks of at most this size.
        tile_size: u32,
    },
}

impl ScaleTask {
    /// The region the task renders, in canvas px: its tile, or the whole canvas.
    pub fn rect(&self) -> Rect {
        match self.part {
            ScalePart::Whole { .. } => Rect {
                x: 0,
                y: 0,
                width: self.canvas_width,
                height: self.canvas_height,
            },
            ScalePart::Tile { rect, .. } | ScalePart::Shard { rect, .. } => rect,
        }
    }

    /// The tile's index in the scale's grid (0 for the whole canvas).
    pub fn index(&self) -> u32 {
        match self.part {
            ScalePart::Whole { .. } => 0,
            ScalePart::Tile { index, .. } | ScalePart::Shard { index, .. } => index,
        }
    }

    /// The number of tasks of the scale: its tiles (1 for the whole canvas).
    pub fn count(&self) -> u32 {
        match self.part {
            ScalePart::Whole { .. } => 1,
            ScalePart::Tile { tiles, .. } => tiles,
            ScalePart::Shard { shards, .. } => shards,
        }
    }

    /// The side of the blocks the task's style targets (and, for the whole canvas, its objective) are
    /// computed in, in px: the job's tile size.
    pub fn block(&self) -> u32 {
        match self.part {
            ScalePart::Whole { block } | ScalePart::Shard { block, .. } => block,
            ScalePart::Tile { tile_size, .. } => tile_size,
        }
    }
}

/// One render of a job: what a worker runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The content image to stylize, by its sha256.
    pub content: ImageHash,
    /// The style images (one for a batch task), blended by `params.style_blend`.
    pub styles: Vec<ImageHash>,
    /// The task's own parameters: the job's, with a sweep point's values or a tiled scale's size and init.
    pub params: RenderParams,
    /// For people: which content and style, or which sweep point.
    pub label: String,
    /// Set for the tasks of a tiled job's later scales: the scale and its part of the canvas.
    #[serde(default)]
    pub scale: Option<ScaleTask>,
    /// Set for the tasks of a video job: the frame, and the frame before it in its chunk.
    #[serde(default)]
    pub frame: Option<VideoFrame>,
}

impl TaskSpec {
    /// The images the task refers to, by sha256: its content, its styles, its init image (a tiled
    /// scale's previous result) and a video frame's previous frame. What a blob store's garbage collection
    /// keeps.
    pub fn images(&self) -> impl Iterator<Item = &ImageHash> {
        let previous = self.previous_frame();
        std::iter::once(&self.content)
            .chain(&self.styles)
            .chain(self.params.init.image())
            .chain(previous.map(|p| &p.content))
            .chain(previous.map(|p| &p.result))
    }

    /// A video frame's previous frame ([`VideoFrame::previous`]), if any.
    pub fn previous_frame(&self) -> Option<&PreviousFrame> {
        self.frame.as_ref().and_then(|f| f.previous.as_ref())
    }

    /// The 0-based scale of a tiled job's pyramid that the task renders: its `scale`'s, or 0 (the first
    /// scale, one untiled task, and every task of the other kinds).
    pub fn scale_index(&self) -> u32 {
        self.scale.as_ref().map_or(0, |s| s.scale)
    }

    /// What a checkpoint of the task's render may hold ([`crate::checkpoint`]): the longest side of the
    /// image it optimizes (a tile's or a shard's window; for an untiled render, the output's size), the
    /// iterations of each of its scales, and the most bytes its file may take.
    pub fn checkpoint_bounds(&self) -> CheckpointBounds {
        match &self.scale {
            // a tile or a shard renders one scale of its window ([`ScaleTask::rect`])
            Some(_) => CheckpointBounds {
                longest: self.checkpoint_longest(),
                iterations: vec![self.params.iterations],
                max_bytes: self.max_checkpoint_bytes(),
            },
            None => CheckpointBounds::of_render(&self.params),
        }
    }

    /// The most bytes a checkpoint file of the task's render may take ([`CheckpointFile::max_bytes`]):
    /// [`TaskSpec::checkpoint_bounds`]' `max_bytes`, without the rest.
    pub fn max_checkpoint_bytes(&self) -> u64 {
        CheckpointFile::max_bytes(self.checkpoint_longest(), &self.params)
    }

    /// The longest side of the image the task's render optimizes: its tile's or shard's window, else the
    /// output's size.
    fn checkpoint_longest(&self) -> u32 {
        match &self.scale {
            Some(t) => {
                let r = t.rect();
                r.width.max(r.height)
            }
            None => self.params.size,
        }
    }

    /// The number of shards of the exact-mode scale whose shard the task renders
    /// ([`ScalePart::Shard`]); `None` for any other task.
    pub fn shards(&self) -> Option<u32> {
        match self.scale.as_ref()?.part {
            ScalePart::Shard { shards, .. } => Some(shards),
            _ => None,
        }
    }
}

/// What a checkpoint of a task may hold ([`TaskSpec::checkpoint_bounds`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointBounds {
    /// The longest side of the image the task optimizes, px.
    pub longest: u32,
    /// The iterations of each of its render's scales.
    pub iterations: Vec<u32>,
    /// The most bytes its checkpoint file may take ([`CheckpointFile::max_bytes`]).
    pub max_bytes: u64,
}

impl CheckpointBounds {
    /// The bounds of a render of `params` (as the engine gets it: a tile's params are its window's, one
    /// scale).
    pub fn of_render(params: &RenderParams) -> CheckpointBounds {
        CheckpointBounds {
            longest: params.size,
            iterations: params.iterations_per_scale(),
            max_bytes: CheckpointFile::max_bytes(params.size, params),
        }
    }

    /// Checks a checkpoint's scale (1-based), iteration and size against the bounds; the error names
    /// `checkpoint` and says what is out of them.
    pub fn check(&self, scale: u32, iteration: u32, width: u32, height: u32) -> Result<(), Error> {
        let bad = |m: String| Err(Error::invalid("checkpoint", m));
        let Some(&n) = (scale as usize)
            .checked_sub(1)
            .and_then(|s| self.iterations.get(s))
        else {
            return bad(format!(
                "of scale {scale}: the task's render has {} scale(s)",
                self.iterations.len()
            ));
        };
        if iteration >= n {
            return bad(format!(
                "at iteration {iteration}: scale {scale} has {n} iterations (a checkpoint is of an \
                 image before the last)"
            ));
        }
        if width.max(height) > self.longest {
            return bad(format!(
                "a {width} x {height} image: the task's is at most {} px a side",
                self.longest
            ));
        }
        Ok(())
    }
}

/// A task as a worker receives it under a lease: which task, and what to render.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The job and the task's index in it.
    pub id: TaskId,
    /// What to render.
    pub spec: TaskSpec,
    /// Its job's [`JobSpec::checkpoints`] ([`CheckpointEvery::Never`] for a task that is not
    /// checkpointed: a shard of an exact-mode scale, or one whose checkpoint could be larger than a
    /// coordinator receives).
    pub checkpoints: CheckpointEvery,
    /// The checkpoint an earlier attempt saved, to start from; `None`: from the beginning.
    pub resume: Option<crate::checkpoint::Checkpoint>,
}

impl JobSpec {
    /// A job of `kind` over `contents` and `styles` with `params`, and the rest at their defaults (the
    /// protocol's zero values, as a submit without them gives): priority 0, the coordinator's attempts, any
    /// worker, not keep-going, no limit of workers, after no job, no checkpoints, no names.
    pub fn new(
        kind: JobKind,
        contents: Vec<ImageHash>,
        styles: Vec<ImageHash>,
        params: RenderParams,
    ) -> JobSpec {
        JobSpec {
            kind,
            contents,
            styles,
            params,
            priority: 0,
            max_attempts: 0,
            worker_tags: Vec::new(),
            keep_going: false,
            max_workers: 0,
            after: Vec::new(),
            checkpoint_every: 0,
            checkpoint_secs: 0,
            content_names: Vec::new(),
            style_names: Vec::new(),
            name: String::new(),
            left_out: Vec::new(),
        }
    }

    /// The images the spec refers to, by sha256: its contents, its styles and its init image.
    pub fn images(&self) -> impl Iterator<Item = &ImageHash> {
        self.contents
            .iter()
            .chain(&self.styles)
            .chain(self.params.init.image())
    }

    /// When its tasks save checkpoints: [`JobSpec::checkpoint_every`] or [`JobSpec::checkpoint_secs`]; an
    /// error names `checkpoint_secs` when both are set.
    pub fn checkpoints(&self) -> Result<CheckpointEvery, Error> {
        CheckpointEvery::of(self.checkpoint_every, self.checkpoint_secs)
    }

    /// The jobs it waits for, each once, in order: [`JobSpec::after`], then the job whose result is its
    /// init ([`Init::Job`]).
    pub fn dependencies(&self) -> Vec<JobId> {
        let mut jobs = self.after.clone();
        jobs.extend(self.params.init.job().cloned());
        let mut seen = std::collections::HashSet::new();
        jobs.retain(|id| seen.insert(id.clone()));
        jobs
    }

    /// Whether a worker with `tags` may take the job's tasks: it has every tag the job asks for.
    pub fn runs_on(&self, tags: &[String]) -> bool {
        self.worker_tags.iter().all(|t| tags.contains(t))
    }

    /// Checks the spec and expands it into its tasks, in a stable order; an error names the field.
    pub fn tasks(&self) -> Result<Vec<TaskSpec>, Error> {
        if self.contents.is_empty() {
            return Err(Error::invalid(
                "contents",
                "at least one content image is needed",
            ));
        }
        if self.styles.is_empty() {
            return Err(Error::invalid(
                "styles",
                "at least one style image is needed",
            ));
        }
        check_image_counts(self.contents.len(), self.styles.len())?;
        if !matches!(self.kind, JobKind::Batch | JobKind::Video(_)) && self.contents.len() != 1 {
            return Err(Error::invalid(
                "contents",
                format!(
                    "a {} job takes one content image, got {} (a batch, --batch, renders each; a \
                     video, --video, takes them as its frames)",
                    self.kind.name(),
                    self.contents.len()
                ),
            ));
        }
        let tasks = match &self.kind {
            JobKind::Single => {
                self.params.validate(self.styles.len())?;
                vec![TaskSpec {
                    content: self.contents[0].clone(),
                    styles: self.styles.clone(),
                    params: self.params.clone(),
                    label: "render".into(),
                    scale: None,
                    frame: None,
                }]
            }
            JobKind::Tiled(tiling) => {
                let params = self.pyramid_params_of(*tiling)?;
                let sizes = params.sizes_per_scale();
                // the fan-out: the finest scale's tiles, at most (a square canvas; planned tiles are no
                // smaller than tile_size); exact mode renders each scale as one task
                let finest = sizes.last().copied().unwrap_or(params.size);
                let tiles = tiling::TileGrid::new(finest, finest, *tiling).len();
                if !tiling.exact && tiles > MAX_TASKS_PER_JOB {
                    return Err(Error::invalid(
                        "tile_size",
                        format!(
                            "a {finest}-px canvas in {}-px tiles ({}-px overlap) is up to {tiles} tiles a \
                             scale, more than {MAX_TASKS_PER_JOB}: use larger tiles or a smaller size",
                            tiling.tile_size, tiling.overlap
                        ),
                    ));
                }
                vec![TaskSpec {
                    content: self.contents[0].clone(),
                    styles: self.styles.clone(),
                    params: RenderParams {
                        size: sizes[0],
                        iterations: params.iterations_per_scale()[0],
                        scale_iterations: Vec::new(),
                        scales: 1,
                        original_colors: false,
                        ..params.clone()
                    },
                    label: format!("scale 1/{}", sizes.len()),
                    scale: None,
                    frame: None,
                }]
            }
            JobKind::Batch => {
                let n = self.contents.len() * self.styles.len();
                if n > MAX_TASKS_PER_JOB {
                    return Err(Error::invalid(
                        "contents",
                        format!("{n} tasks: more than {MAX_TASKS_PER_JOB}"),
                    ));
                }
                let params = RenderParams {
                    style_blend: Vec::new(),
                    ..self.params.clone()
                };
                params.validate(1)?;
                let mut tasks = Vec::with_capacity(n);
                for (i, content) in self.contents.iter().enumerate() {
                    for (j, style) in self.styles.iter().enumerate() {
                        tasks.push(TaskSpec {
                            content: content.clone(),
                            styles: vec![style.clone()],
                            params: params.clone(),
                            label: format!(
                                "{} x {}",
                                image_name(&self.content_names, i, "content"),
                                image_name(&self.style_names, j, "style")
                            ),
                            scale: None,
                            frame: None,
                        });
                    }
                }
                tasks
            }
            JobKind::Sweep(axes) => self.sweep_tasks(axes)?,
            JobKind::Video(video) => {
                video.validate()?;
                self.params.validate(self.styles.len())?;
                let frames = self.contents.len() as u32;
                (0..frames)
                    .filter(|&i| video.starts_chunk(i))
                    .map(|i| TaskSpec {
                        content: self.contents[i as usize].clone(),
                        styles: self.styles.clone(),
                        params: self.params.clone(),
                        label: format!("frame {}/{frames}", i + 1),
                        scale: None,
                        frame: Some(VideoFrame {
                            index: i,
                            frames,
                            previous: None,
                        }),
                    })
                    .collect()
            }
        };
        Ok(tasks)
    }

    /// The next frames of a video job, given its tasks so far, each with its result once it succeeded: for
    /// each frame rendered whose successor in its chunk has no task yet, that successor, with the frame
    /// as its [`PreviousFrame`] (where their contents match, it starts from the frame's result and is held
    /// to it by the temporal loss), one scale at the full size with [`Video::iterations_after_first`]
    /// iterations. Empty once every frame has its task. An error names `kind` (not a video job) or a field of the spec
    /// (as [`Self::tasks`]).
    pub fn next_frames<'a>(
        &self,
        tasks: impl IntoIterator<Item = (&'a TaskSpec, Option<&'a ImageHash>)>,
    ) -> Result<Vec<TaskSpec>, Error> {
        let JobKind::Video(video) = self.kind else {
            return Err(Error::invalid(
                "kind",
                format!("a {} job has no frames", self.kind.name()),
            ));
        };
        self.tasks()?;
        let frames = self.contents.len() as u32;
        let tasks: Vec<(&VideoFrame, Option<&ImageHash>)> = tasks
            .into_iter()
            .filter_map(|(t, result)| t.frame.as_ref().map(|f| (f, result)))
            .collect();
        let has_task = |i: u32| tasks.iter().any(|(f, _)| f.index == i);
        let params = RenderParams {
            iterations: video.iterations_after_first(self.params.iterations),
            scale_iterations: Vec::new(),
            scales: 1,
            ..self.params.clone()
        };
        let mut next: Vec<TaskSpec> = tasks
            .iter()
            .filter_map(|(f, result)| Some((f.index.saturating_add(1), f.index, (*result)?)))
            .filter(|&(i, _, _)| i < frames && !video.starts_chunk(i) && !has_task(i))
            .map(|(i, before, result)| TaskSpec {
                content: self.contents[i as usize].clone(),
                styles: self.styles.clone(),
                params: params.clone(),
                label: format!("frame {}/{frames}", i + 1),
                scale: None,
                frame: Some(VideoFrame {
                    index: i,
                    frames,
                    previous: Some(PreviousFrame {
                        content: self.contents[before as usize].clone(),
                        result: result.clone(),
                    }),
                }),
            })
            .collect();
        next.sort_by_key(|t| t.frame.as_ref().map_or(0, |f| f.index));
        next.dedup_by_key(|t| t.frame.as_ref().map_or(0, |f| f.index));
        Ok(next)
    }

    /// A tiled job's parameters with the number of scales of its pyramid, checked. An error names `kind`
    /// (not a tiled job) or the field at fault.
    pub fn pyramid_params(&self) -> Result<RenderParams, Error> {
        self.pyramid_params_of(self.tiling()?)
    }

    fn pyramid_params_of(&self, tiling: Tiling) -> Result<RenderParams, Error> {
        let params = tiling::pyramid_params(&self.params, tiling)?;
        params.validate(self.styles.len())?;
        Ok(params)
    }

    /// A tiled job's tiling; an error names `kind` for any other kind.
    fn tiling(&self) -> Result<Tiling, Error> {
        self.kind.tiling().ok_or_else(|| {
            Error::invalid(
                "kind",
                format!("a {} job has no scales of tiles", self.kind.name()),
            )
        })
    }

    /// The tasks of scale `scale` (>= 1) of a tiled job whose content image is `content_width` x
    /// `content_height`, given the stitched result of the scale before, its tiles sized for workers with
    /// `workers` bytes of device memory each and at most `max_tile` px ([`Tiling::scale_tile_size`]; 0
    /// where unknown). An error names `kind` (not a tiled job), a field of the spec (as [`Self::tasks`])
    /// or `scale` (no such scale).
    pub fn scale_tasks(
        &self,
        content_width: u32,
        content_height: u32,
        scale: u32,
        previous: &ImageHash,
        workers: &[u64],
        max_tile: Option<u32>,
    ) -> Result<Vec<TaskSpec>, Error> {
        let job_tiling = self.tiling()?;
        // the spec checked as at submission: one content image, valid parameters and tiling
        self.tasks()?;
        let plans = tiling::plan(content_width, content_height, &self.params, job_tiling)?;
        let scales = plans.len() as u32;
        let plan = plans
            .get(scale as usize)
            .filter(|_| scale >= 1)
            .ok_or_else(|| Error::invalid("scale", format!("no scale {scale} of {scales}")))?;
        let params = RenderParams {
            size: plan.longest(),
            iterations: plan.iterations,
            scale_iterations: Vec::new(),
            scales: 1,
            original_colors: false,
            init: Init::Image(previous.clone()),
            ..self.params.clone()
        };
        let tiling = Tiling {
            tile_size: job_tiling.scale_tile_size(
                plan.width,
                plan.height,
                &params,
                workers,
                max_tile,
            ),
            ..job_tiling
        };
        let block = tiling.tile_size;
        let parts: Vec<(&str, ScalePart)> = if tiling.exact {
            let (block, bands) = tiling.exact_shards(plan.height, workers.len(), block);
            let shards = bands.len() as u32;
            bands
                .into_iter()
                .enumerate()
                .map(|(i, (y0, y1))| {
                    let rect = Rect {
                        x: 0,
                        y: y0,
                        width: plan.width,
                        height: y1 - y0,
                    };
                    match shards {
                        1 => ("tile", ScalePart::Whole { block }),
                        _ => (
                            "shard",
                            ScalePart::Shard {
                                block,
                                index: i as u32,
                                shards,
                                rect,
                            },
                        ),
                    }
                })
                .collect()
        } else {
            let grid = tiling.grid(plan.width, plan.height);
            let tiles = grid.len() as u32;
            grid.tiles()
                .enumerate()
                .map(|(i, rect)| {
                    let part = ScalePart::Tile {
                        index: i as u32,
                        tiles,
                        rect,
                        tile_size: block,
                    };
                    ("tile", part)
                })
                .collect()
        };
        Ok(parts
            .into_iter()
            .map(|(name, part)| {
                let task = ScaleTask {
                    scale,
                    scales,
                    canvas_width: plan.width,
                    canvas_height: plan.height,
                    part,
                };
                let rect = task.rect();
                TaskSpec {
                    content: self.contents[0].clone(),
                    styles: self.styles.clone(),
                    params: params.clone(),
                    label: format!(
                        "scale {}/{scales} {name} {}/{} ({}x{} at {},{})",
                        scale + 1,
                        task.index() + 1,
                        task.count(),
                        rect.width,
                        rect.height,
                        rect.x,
                        rect.y
                    ),
                    scale: Some(task),
                    frame: None,
                }
            })
            .collect())
    }

    /// Checks the spec as a new job ([`JobSpec::check_new`]) and expands it into its tasks, once
    /// ([`ExpandedJob`]).
    pub fn expand(self) -> Result<ExpandedJob, Error> {
        let tasks = self.check_new()?;
        Ok(ExpandedJob { spec: self, tasks })
    }

    /// Checks [`JobSpec::left_out`]: only in a keep-going batch, at most [`MAX_IMAGES_PER_JOB`] with the
    /// contents, each of 1 to [`MAX_LEFT_OUT_BYTES`] bytes without control characters; an error names
    /// `left_out`.
    fn check_left_out(&self) -> Result<(), Error> {
        let invalid = |why: String| Err(Error::invalid("left_out", why));
        if self.left_out.is_empty() {
            return Ok(());
        }
        if !(self.keep_going && matches!(self.kind, JobKind::Batch)) {
            return invalid("only a keep-going batch leaves out content images".into());
        }
        // as many as the client read: the job's contents and these, together
        if self.left_out.len() + self.contents.len() > MAX_IMAGES_PER_JOB {
            return invalid(format!(
                "{} with the job's {} contents: more than {MAX_IMAGES_PER_JOB} images in one job",
                self.left_out.len(),
                self.contents.len()
            ));
        }
        for (i, why) in self.left_out.iter().enumerate() {
            if why.is_empty() || why.len() > MAX_LEFT_OUT_BYTES || why.contains(char::is_control) {
                return invalid(format!(
                    "entry {}: 1 to {MAX_LEFT_OUT_BYTES} bytes without control characters",
                    i + 1
                ));
            }
        }
        Ok(())
    }

    /// [`JobSpec::tasks`] with the limits on a new job, which may be narrower than a stored job's (a
    /// tiled job's overlap and tile size: [`Tiling::validate`] rather than the planner's
    /// [`Tiling::validate_stored`]); an error names the field.
    pub fn check_new(&self) -> Result<Vec<TaskSpec>, Error> {
        if self.name.len() > MAX_JOB_NAME_BYTES || self.name.contains(char::is_control) {
            return Err(Error::invalid(
                "name",
                format!("at most {MAX_JOB_NAME_BYTES} bytes without control characters"),
            ));
        }
        check_names("content_names", &self.content_names, self.contents.len())?;
        check_names("style_names", &self.style_names, self.styles.len())?;
        self.check_left_out()?;
        // before the tasks, which the planner checks against a stored job's wider limits: an error
        // names a new job's
        if let Some(tiling) = self.kind.tiling() {
            tiling.validate()?;
        }
        let tasks = self.tasks()?;
        check_tags("worker_tags", &self.worker_tags)?;
        self.checkpoints()?;
        if self.max_attempts > MAX_ATTEMPTS {
            return Err(Error::invalid(
                "max_attempts",
                format!("at most {MAX_ATTEMPTS}, got {}", self.max_attempts),
            ));
        }
        if self.keep_going && !matches!(self.kind, JobKind::Batch | JobKind::Sweep(_)) {
            return Err(Error::invalid(
                "keep_going",
                format!(
                    "for batch and sweep jobs only, whose tasks are independent; this is a {} job",
                    self.kind.name()
                ),
            ));
        }
        if self.after.len() > MAX_AFTER {
            return Err(Error::invalid(
                "after",
                format!("at most {MAX_AFTER} jobs, got {}", self.after.len()),
            ));
        }
        for id in &self.after {
            JobId::checked("after", id.as_ref())?;
        }
        if let Some(tiling) = self.kind.tiling() {
            if tiling.exact && self.max_workers > 0 {
                return Err(Error::invalid(
                    "max_workers",
                    "not with exact mode, whose shards run together on as many workers as are present",
                ));
            }
            if tiling.exact && self.params.normalize_gradients {
                return Err(Error::invalid(
                    "normalize_gradients",
                    "not with exact mode, whose objective is evaluated in blocks: a layer's L1 norm is the \
                     whole canvas'",
                ));
            }
        }
        Ok(tasks)
    }

    /// Checks that no task of the job would be too small for VGG19: [`ExpandedJob::check_sizes`] of the
    /// expanded spec.
    pub fn check_sizes(
        &self,
        size_of: impl FnMut(&ImageHash) -> Result<(u32, u32), Error>,
    ) -> Result<(), Error> {
        // the spec itself first: a tiled job's content is `contents[0]` only once that is checked
        let tasks = self.tasks()?;
        check_task_sizes(self, &tasks, size_of)
    }

    fn sweep_tasks(&self, axes: &[SweepAxis]) -> Result<Vec<TaskSpec>, Error> {
        let mut tasks = Vec::new();
        for (params, label) in sweep_points(&self.params, axes)? {
            // the field named, and the point whose values it came from
            params.validate(self.styles.len()).map_err(|e| match e {
                Error::Invalid { field, message } => {
                    Error::invalid(field, format!("{message} (sweep point {label})"))
                }
                other => other,
            })?;
            tasks.push(TaskSpec {
                content: self.contents[0].clone(),
                styles: self.styles.clone(),
                params,
                label,
                scale: None,
                frame: None,
            });
        }
        // nor two points of the same options (a value given twice, `1` and `1.0`; blends or layer weights
        // of one ratio, `1:1` and `0.5:0.5`, or given and left to their default): the same image twice
        let mut seen = std::collections::HashMap::new();
        for task in &tasks {
            let same = RenderParams {
                style_blend: task.params.blend_weights(self.styles.len()),
                style_layer_weights: task.params.layer_weights().collect(),
                ..task.params.clone()
            };
            if let Some(first) = seen.insert(format!("{same:?}"), &task.label) {
                return Err(Error::invalid(
                    "sweep",
                    format!(
                        "points '{first}' and '{}' are the same render (a value given twice)",
                        task.label
                    ),
                ));
            }
        }
        // an axis that no point reads would label copies of one image as different
        for axis in axes {
            let name = axis.parameter.name();
            if let Some(why) = unread_by_every(tasks.iter().map(|t| &t.params), name) {
                return Err(Error::invalid(
                    "sweep",
                    format!("{name}: no point reads it: {why}"),
                ));
            }
        }
        Ok(tasks)
    }
}

/// The points of a sweep of `axes` over `params`: each point's parameters (unchecked) and its label
/// (`style_weight=10 seed=1`), the last axis varying fastest. Refused, naming `sweep`: no axis, an axis
/// without values, or twice, a value too long, more points than a job's tasks.
fn sweep_points(
    params: &RenderParams,
    axes: &[SweepAxis],
) -> Result<Vec<(RenderParams, String)>, Error> {
    if axes.is_empty() {
        return Err(Error::invalid(
            "sweep",
            "a sweep job needs at least one axis",
        ));
    }
    // before the base is copied into every point
    params.check_lists()?;
    let mut points = 1usize;
    // the longest label a point can have
    let mut label = axes.len().saturating_sub(1);
    for axis in axes {
        if axis.values.is_empty() {
            return Err(Error::invalid(
                "sweep",
                format!("{}: no values", axis.parameter.name()),
            ));
        }
        // an empty value would stand for the option's default: a point that the base gives already
        if axis.values.iter().any(|v| v.trim().is_empty()) {
            return Err(Error::invalid(
                "sweep",
                format!("{}: an empty value", axis.parameter.name()),
            ));
        }
        if let Some(long) = axis
            .values
            .iter()
            .find(|v| v.chars().count() > MAX_SWEEP_VALUE_CHARS)
        {
            return Err(Error::invalid(
                "sweep",
                format!(
                    "{}: a value of {} characters: at most {MAX_SWEEP_VALUE_CHARS}",
                    axis.parameter.name(),
                    long.chars().count()
                ),
            ));
        }
        if axes
            .iter()
            .filter(|a| a.parameter == axis.parameter)
            .count()
            > 1
        {
            return Err(Error::invalid(
                "sweep",
                format!("{} appears twice", axis.parameter.name()),
            ));
        }
        points = points.saturating_mul(axis.values.len());
        let longest = axis.values.iter().map(|v| v.chars().count()).max();
        label += axis.parameter.name().len() + 1 + longest.unwrap_or(0);
    }
    if label > MAX_SWEEP_LABEL_CHARS {
        return Err(Error::invalid(
            "sweep",
            format!(
                "points labelled with up to {label} characters (their axes' name=value): at most \
                 {MAX_SWEEP_LABEL_CHARS}"
            ),
        ));
    }
    if points > MAX_TASKS_PER_JOB {
        return Err(Error::invalid(
            "sweep",
            format!("{points} points: more than {MAX_TASKS_PER_JOB}"),
        ));
    }
    let mut all = Vec::with_capacity(points);
    for point in 0..points {
        // mixed-radix digits, the last axis fastest
        let mut rest = point;
        let mut choice = vec![0; axes.len()];
        for (slot, axis) in choice.iter_mut().zip(axes).rev() {
            *slot = rest % axis.values.len();
            rest /= axis.values.len();
        }
        let mut params = params.clone();
        let mut label = Vec::new();
        for (axis, &c) in axes.iter().zip(&choice) {
            axis.apply(&axis.values[c], &mut params)?;
            label.push(format!("{}={}", axis.parameter.name(), axis.values[c]));
        }
        all.push((params, label.join(" ")));
    }
    Ok(all)
}

/// Why none of a sweep's `points` reads the option `name` ([`RenderParams::unread`], the first point's
/// reason); `None` when one does.
fn unread_by_every<'a>(
    mut points: impl Iterator<Item = &'a RenderParams>,
    name: &str,
) -> Option<&'static str> {
    let first = points.next()?.unread(name, JobReads::default())?;
    points
        .all(|p| p.unread(name, JobReads::default()).is_some())
        .then_some(first)
}

/// The command line's check of a sweep's options, as [`RenderParams::check_read`] is the other jobs': an
/// option set away from its default that the sweep varies too (its values would replace it), or that no
/// point of the sweep reads, is refused, naming it.
pub fn check_sweep_reads(params: &RenderParams, axes: &[SweepAxis]) -> Result<(), Error> {
    let d = RenderParams::default();
    let set = |name: &str| params.get(name) != d.get(name);
    if let Some(axis) = axes.iter().find(|a| set(a.parameter.name())) {
        return Err(Error::invalid(
            axis.parameter.name(),
            "is set, but the sweep varies it too, and its values would replace this one: give the \
             values in --sweep alone",
        ));
    }
    let points = sweep_points(params, axes)?;
    for name in RenderParams::OPTIONS.iter().filter(|name| set(name)) {
        if let Some(why) = unread_by_every(points.iter().map(|(p, _)| p), name) {
            return Err(Error::invalid(
                name,
                format!("is set, but no point of the sweep reads it: {why}"),
            ));
        }
    }
    Ok(())
}

/// A job checked and expanded into its tasks, once: what a submission becomes at the coordinator's edge
/// (from the wire, `TryFrom<pb::JobSpec>`) and what the scheduler stores. Built only by
/// [`JobSpec::expand`], so its tasks are always those of its spec.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpandedJob {
    spec: JobSpec,
    tasks: Vec<TaskSpec>,
}

impl ExpandedJob {
    /// The job as submitted.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// Its tasks, in a stable order (for a tiled job, the first scale's).
    pub fn tasks(&self) -> &[TaskSpec] {
        &self.tasks
    }

    /// The spec and its tasks.
    pub fn into_parts(self) -> (JobSpec, Vec<TaskSpec>) {
        (self.spec, self.tasks)
    }

    /// Checks that no task of the job would be too small for VGG19 ([`RenderParams::check_sizes`]): every
    /// content and style image at every scale of every task (each sweep point and batch pair; each scale
    /// of a tiled job's pyramid, whose tiles are at least the smaller of the tile size and the canvas, and
    /// whose styles are sized for the canvas). `size_of` gives an input's width and height as decoded,
    /// e.g. from its header. An error names the option and, for a sweep or batch, the task.
    pub fn check_sizes(
        &self,
        size_of: impl FnMut(&ImageHash) -> Result<(u32, u32), Error>,
    ) -> Result<(), Error> {
        check_task_sizes(&self.spec, &self.tasks, size_of)
    }
}

/// [`ExpandedJob::check_sizes`] of `spec` expanded into `tasks`.
fn check_task_sizes(
    spec: &JobSpec,
    tasks: &[TaskSpec],
    mut size_of: impl FnMut(&ImageHash) -> Result<(u32, u32), Error>,
) -> Result<(), Error> {
    let mut sizes = std::collections::HashMap::new();
    for hash in spec.contents.iter().chain(&spec.styles) {
        if !sizes.contains_key(hash) {
            sizes.insert(hash.clone(), size_of(hash)?);
        }
    }
    let check = |params: &RenderParams, content: &ImageHash, styles: &[ImageHash]| {
        let styles: Vec<ImageSize<'_>> = styles
            .iter()
            .map(|h| ImageSize::new(h.as_str(), sizes[h]))
            .collect();
        params.check_sizes(
            ImageSize::new(content.as_str(), sizes[content]),
            &styles,
            None,
        )
    };
    if let JobKind::Tiled(tiling) = spec.kind {
        // the pyramid's sizes are the canvases of its scales: more of them than asked for when its first
        // scale must shrink to one tile, which a coarse scale too small for VGG19 says, naming the tile
        // size where the user gave it
        let pyramid = spec.pyramid_params_of(tiling)?;
        return check(&pyramid, &spec.contents[0], &spec.styles).map_err(|e| match e {
            Error::Invalid {
                field: "scales",
                message,
            } if pyramid.scales > spec.params.scales => {
                let field = match tiling.sizing {
                    crate::tiling::TileSizing::Fixed => "tile_size",
                    crate::tiling::TileSizing::Planned => "scales",
                };
                Error::invalid(
                    field,
                    format!(
                        "{message} (a tiled job's first scale is at most one tile, {} px: {} scales, not \
                         the {} asked for; larger tiles make fewer)",
                        tiling.tile_size, pyramid.scales, spec.params.scales
                    ),
                )
            }
            other => other,
        });
    }
    if let JobKind::Video(_) = spec.kind {
        // frames of one size (the temporal loss compares a frame with the one before, pixel by pixel; the
        // output is one video)
        let first = sizes[&spec.contents[0]];
        for (i, content) in spec.contents.iter().enumerate() {
            let (w, h) = sizes[content];
            if (w, h) != first {
                return Err(Error::invalid(
                    "contents",
                    format!(
                        "frame {}{} is {w}x{h}, frame 1{} is {}x{}: a video's frames share one size",
                        i + 1,
                        frame_name(spec, i),
                        frame_name(spec, 0),
                        first.0,
                        first.1
                    ),
                ));
            }
        }
        // every frame renders at the job's size: its first scale (the pyramid's smallest) is the one to check
        for (i, content) in spec.contents.iter().enumerate() {
            check(&spec.params, content, &spec.styles).map_err(|e| match e {
                Error::Invalid { field, message } => Error::invalid(
                    field,
                    format!("frame {}{}: {message}", i + 1, frame_name(spec, i)),
                ),
                other => other,
            })?;
        }
        return Ok(());
    }
    let several = tasks.len() > 1;
    for task in tasks {
        check(&task.params, &task.content, &task.styles).map_err(|e| match e {
            Error::Invalid { field, message } if several => {
                Error::invalid(field, format!("task '{}': {message}", task.label))
            }
            other => other,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiling::TileSizing;

    fn h(n: u8) -> ImageHash {
        ImageHash::of(&[n])
    }

    /// Tags: letters, digits, `-`, `_`, `.`; at most 16 of 1 to 64 characters; an error names the field and
    /// echoes no more of a bad tag than a tag may hold; a job runs on workers with all its tags.
    #[test]
    fn tags_are_checked_and_a_job_runs_on_the_workers_with_all_of_them() {
        let tags = |t: &[&str]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        check_tags("tags", &tags(&["gpu", "a100", "zone-1_b.2"])).unwrap();
        check_tags("tags", &[]).unwrap();
        let long = "x".repeat(10_000);
        for bad in [
            tags(&[""]),
            tags(&["has space"]),
            tags(&["é"]),
            vec![long],
            vec!["t".into(); 17],
        ] {
            let err = check_tags("worker_tags", &bad).unwrap_err().to_string();
            assert!(err.starts_with("worker_tags") && err.len() < 200, "{err}");
        }
        let job = JobSpec {
            worker_tags: tags(&["gpu", "a100"]),
            ..spec(JobKind::Single)
        };
        assert!(job.runs_on(&tags(&["a100", "gpu", "eu"])));
        assert!(!job.runs_on(&tags(&["gpu"])));
        assert!(spec(JobKind::Single).runs_on(&[]));
    }

    /// A render's checkpoint bounds: its scales' iterations and its size; a checkpoint out of them is
    /// refused naming `checkpoint`.
    #[test]
    fn a_checkpoint_out_of_a_render_s_bounds_is_refused() {
        let params = RenderParams {
            size: 64,
            scales: 2,
            iterations: 20,
            ..RenderParams::default()
        };
        let bounds = CheckpointBounds::of_render(&params);
        assert_eq!(
            (bounds.longest, bounds.iterations.clone()),
            (64, vec![20, 10])
        );
        assert!(bounds.check(2, 9, 64, 48).is_ok());
        let err = |scale, iteration, width| {
            bounds
                .check(scale, iteration, width, 48)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(3, 0, 64),
            "checkpoint: of scale 3: the task's render has 2 scale(s)"
        );
        assert_eq!(
            err(0, 0, 64),
            "checkpoint: of scale 0: the task's render has 2 scale(s)"
        );
        assert!(
            err(2, 10, 64).starts_with("checkpoint: at iteration 10: scale 2 has 10 iterations")
        );
        assert_eq!(
            err(1, 5, 65),
            "checkpoint: a 65 x 48 image: the task's is at most 64 px a side"
        );
    }

    /// A limit on the workers a job runs on is refused for exact mode, whose shards must run together on
    /// as many workers as are present; any other kind takes it.
    #[test]
    fn max_workers_is_refused_for_exact_mode_only() {
        let limited = |kind| JobSpec {
            max_workers: 1,
            ..spec(kind)
        };
        let exact = JobKind::Tiled(Tiling {
            exact: true,
            ..Default::default()
        });
        let err = limited(exact).check_new().unwrap_err().to_string();
        assert!(err.starts_with("max_workers: not with exact mode"), "{err}");
        for kind in [
            JobKind::Batch,
            JobKind::Single,
            JobKind::Tiled(Default::default()),
            JobKind::Sweep(parse_sweep("style_weight=1,2").unwrap()),
        ] {
            assert!(limited(kind).check_new().is_ok());
        }
    }

    /// Normalized gradients are refused for exact mode, whose objective is evaluated in blocks; a tiled job's
    /// tiles and any other kind take them.
    #[test]
    fn normalized_gradients_are_refused_for_exact_mode_only() {
        let normalized = |kind| {
            let mut job = spec(kind);
            job.params.normalize_gradients = true;
            job
        };
        let exact = JobKind::Tiled(Tiling {
            exact: true,
            ..Default::default()
        });
        let err = normalized(exact).check_new().unwrap_err().to_string();
        assert!(
            err.starts_with("normalize_gradients: not with exact mode"),
            "{err}"
        );
        for kind in [
            JobKind::Batch,
            JobKind::Single,
            JobKind::Tiled(Default::default()),
            JobKind::Sweep(parse_sweep("normalize_gradients=true,false").unwrap()),
        ] {
            assert!(normalized(kind).check_new().is_ok());
        }
    }

    /// Keep-going is for batches and sweeps, whose tasks are independent: another kind is refused, naming
    /// the field and the kind.
    #[test]
    fn keep_going_is_for_batches_and_sweeps_only() {
        let keep_going = |kind| JobSpec {
            keep_going: true,
            ..spec(kind)
        };
        assert!(keep_going(JobKind::Batch).check_new().is_ok());
        let sweep = JobKind::Sweep(parse_sweep("style_weight=1,2").unwrap());
        assert!(keep_going(sweep).check_new().is_ok());
        for kind in [
            JobKind::Single,
            JobKind::Tiled(Tiling::new(None, tiling::DEFAULT_OVERLAP, false)),
        ] {
            let name = kind.name();
            let err = keep_going(kind).check_new().unwrap_err().to_string();
            assert!(
                err.starts_with("keep_going")
                    && err.contains("for batch and sweep jobs only")
                    && err.ends_with(&format!("this is a {name} job")),
                "{err}"
            );
        }
    }

    /// The content images left out at a submit are a keep-going batch's, each said in 1 to 512 bytes
    /// without control characters (a decoder's message made one line and cut), at most 1000 with the
    /// contents; an error names `left_out`.
    #[test]
    fn left_out_images_are_a_keep_going_batch_s() {
        let left_out = |kind, keep_going, left_out: Vec<String>| JobSpec {
            keep_going,
            left_out,
            ..spec(kind)
        };
        let one = vec![left_out_entry("b.jpg: cannot decode\nline two")];
        assert_eq!(one[0], "b.jpg: cannot decode line two");
        assert!(left_out(JobKind::Batch, true, one.clone())
            .check_new()
            .is_ok());
        let long = left_out_entry(&"é".repeat(MAX_LEFT_OUT_BYTES));
        assert!(long.len() <= MAX_LEFT_OUT_BYTES && long.starts_with('é'));
        let sweep = JobKind::Sweep(parse_sweep("style_weight=1,2").unwrap());
        let many = vec!["x".to_string(); MAX_IMAGES_PER_JOB];
        for (job, why) in [
            (
                left_out(JobKind::Batch, false, one.clone()),
                "only a keep-going batch",
            ),
            (left_out(sweep, true, one), "only a keep-going batch"),
            (
                left_out(JobKind::Batch, true, vec![String::new()]),
                "entry 1: 1 to 512 bytes",
            ),
            (
                left_out(JobKind::Batch, true, vec!["a\tb".into()]),
                "entry 1: 1 to 512 bytes",
            ),
            (
                left_out(JobKind::Batch, true, vec!["x".repeat(513)]),
                "entry 1: 1 to 512 bytes",
            ),
            (
                left_out(JobKind::Batch, true, many),
                "more than 1000 images in one job",
            ),
        ] {
            let err = job.check_new().unwrap_err().to_string();
            assert!(err.starts_with("left_out: ") && err.contains(why), "{err}");
        }
    }

    /// A job's checkpoints come every so many iterations or every so many seconds, not both: a job with
    /// both is refused naming `checkpoint_secs`.
    #[test]
    fn checkpoints_are_by_iterations_or_by_seconds_not_both() {
        let with = |checkpoint_every, checkpoint_secs| JobSpec {
            checkpoint_every,
            checkpoint_secs,
            ..spec(JobKind::Single)
        };
        let every = |n: u32| n.try_into().unwrap();
        assert_eq!(with(0, 0).checkpoints().unwrap(), CheckpointEvery::Never);
        assert_eq!(
            with(10, 0).checkpoints().unwrap(),
            CheckpointEvery::Iterations(every(10))
        );
        assert_eq!(
            with(0, 60).checkpoints().unwrap(),
            CheckpointEvery::Secs(every(60))
        );
        assert!(with(0, 60).check_new().is_ok());
        let err = with(10, 60).check_new().unwrap_err().to_string();
        assert!(
            err.starts_with("checkpoint_secs: ") && err.contains("not both"),
            "{err}"
        );
    }

    fn spec(kind: JobKind) -> JobSpec {
        JobSpec::new(kind, vec![h(1)], vec![h(2)], RenderParams::default())
    }

    #[test]
    fn hashes_are_sha256_hex() {
        assert_eq!(
            ImageHash::of(b"abc").as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!("ABC".parse::<ImageHash>().is_err());
        assert!(ImageHash::of(b"x").to_string().parse::<ImageHash>().is_ok());
    }

    #[test]
    fn batch_is_contents_times_styles() {
        let s = JobSpec {
            contents: vec![h(1), h(2)],
            styles: vec![h(3), h(4)],
            ..spec(JobKind::Batch)
        };
        let tasks = s.tasks().unwrap();
        assert_eq!(tasks.len(), 4);
        assert_eq!(tasks[1].label, "content 1 x style 2");
        assert_eq!(
            (tasks[1].content.clone(), tasks[1].styles.clone()),
            (h(1), vec![h(4)])
        );
        assert_eq!(tasks[2].content, h(2));
        // named by their files: the labels say which
        let named = JobSpec {
            content_names: vec!["IMG_0001".into(), "IMG_0002".into()],
            style_names: vec!["starry_night".into(), "the wave".into()],
            ..s.clone()
        };
        let tasks = named.check_new().unwrap();
        assert_eq!(tasks[1].label, "IMG_0001 x the wave");
        // styles named, contents not
        let half = JobSpec {
            content_names: Vec::new(),
            ..named.clone()
        };
        assert_eq!(
            half.check_new().unwrap()[2].label,
            "content 2 x starry_night"
        );
        // names that are not one each, too long, empty or with control characters: refused, naming them
        for (contents, styles, field) in [
            (vec!["a".to_string()], vec![], "content_names"),
            (
                vec![],
                vec!["x".repeat(MAX_IMAGE_NAME_BYTES + 1), "b".into()],
                "style_names",
            ),
            (vec!["a".into(), String::new()], vec![], "content_names"),
            (vec!["a".into(), "b\nc".into()], vec![], "content_names"),
        ] {
            let bad = JobSpec {
                content_names: contents,
                style_names: styles,
                ..s.clone()
            };
            match bad.check_new() {
                Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{other:?}"),
            }
        }
        // a file's name: its stem, clean and bounded
        use std::path::Path;
        assert_eq!(image_name_of(Path::new("photos/IMG_0001.jpg")), "IMG_0001");
        assert_eq!(image_name_of(Path::new("a\tb.png")), "a b");
        assert_eq!(image_name_of(Path::new("/")), "image");
        let long = image_name_of(Path::new(&format!("{}.png", "é".repeat(100))));
        assert!(
            long.len() <= MAX_IMAGE_NAME_BYTES && long.starts_with('é'),
            "{long}"
        );
        // files of one stem (a.png, a.jpg) are told apart by their whole names
        let paths = ["p/a.png", "p/a.jpg", "p/b.png", "q/A.png"].map(Path::new);
        assert_eq!(image_names_of(&paths), ["a.png", "a.jpg", "b", "A"]);
    }

    /// The command line's options beside a sweep: one that no point reads, or that the sweep varies too,
    /// is refused naming it; one that some point reads is taken.
    #[test]
    fn an_option_no_sweep_point_reads_or_that_the_sweep_varies_is_refused() {
        let with = |f: fn(&mut RenderParams)| {
            let mut p = RenderParams::default();
            f(&mut p);
            p
        };
        let check = |params: &RenderParams, grid: &str| {
            check_sweep_reads(params, &parse_sweep(grid).unwrap()).map_err(|e| e.to_string())
        };
        let lr = with(|p| p.learning_rate = 5.0);
        let error = check(&lr, "style_weight=10,100").unwrap_err();
        assert!(
            error.starts_with(
                "learning_rate: is set, but no point of the sweep reads it: Adam's alone"
            ),
            "{error}"
        );
        check(&lr, "optimizer=lbfgs,adam").unwrap();
        let weight = with(|p| p.style_weight = 50.0);
        let error = check(&weight, "style_weight=10,100").unwrap_err();
        assert!(
            error.starts_with("style_weight: is set, but the sweep varies it too"),
            "{error}"
        );
        check(&weight, "content_weight=1,2").unwrap();
        check(
            &RenderParams::default(),
            "learning_rate=1,10;optimizer=adam",
        )
        .unwrap();
        let error = check_sweep_reads(&RenderParams::default(), &[]).unwrap_err();
        assert!(error.to_string().starts_with("sweep: "), "{error}");
    }

    #[test]
    fn sweep_is_the_grid_of_its_axes() {
        // a seeded init: the seed is read
        let s = JobSpec {
            params: RenderParams {
                init: Init::Noise,
                ..Default::default()
            },
            ..spec(JobKind::Sweep(
                parse_sweep("style_weight=10,100;seed=0,1,2").unwrap(),
            ))
        };
        let tasks = s.tasks().unwrap();
        assert_eq!(tasks.len(), 6);
        assert_eq!(tasks[0].label, "style_weight=10 seed=0");
        assert_eq!(tasks[5].label, "style_weight=100 seed=2");
        assert_eq!(
            (tasks[4].params.style_weight, tasks[4].params.seed),
            (100.0, 1)
        );

        let blend = JobSpec {
            styles: vec![h(2), h(3)],
            ..spec(JobKind::Sweep(
                parse_sweep("style_blend=0.7:0.3,0.5:0.5").unwrap(),
            ))
        };
        assert_eq!(blend.tasks().unwrap()[0].params.style_blend, [0.7, 0.3]);
        // a value given twice, however written: the same render twice
        for twice in [
            "style_weight=1,10,1.0",
            "optimizer=adam;style_weight=1e3,1000",
            "style_blend=1:1,0.5:0.5",
            "style_blend=1:3,2:6",
        ] {
            let e = JobSpec {
                styles: vec![h(2), h(3)],
                ..spec(JobKind::Sweep(parse_sweep(twice).unwrap()))
            }
            .tasks()
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("sweep: points '") && e.contains("are the same render"),
                "{twice}: {e}"
            );
        }

        // the optimizer, layer lists (items separated by `:`), pooling, a switch: jcjohnson/neural-style's
        // usual comparisons
        let s = spec(JobKind::Sweep(
            parse_sweep(
                "optimizer=lbfgs,adam;style_layers=relu1_1:relu2_1,relu3_1:relu4_1:relu5_1;\
                 pooling=avg;luminance_only=true,false",
            )
            .unwrap(),
        ));
        let tasks = s.tasks().unwrap();
        assert_eq!(tasks.len(), 8);
        assert_eq!(
            tasks[2].label,
            "optimizer=lbfgs style_layers=relu3_1:relu4_1:relu5_1 pooling=avg luminance_only=true"
        );
        let p = &tasks[5].params;
        assert_eq!(p.optimizer, crate::Optimizer::Adam);
        assert_eq!(
            p.style_layers,
            [crate::Layer::new(1, 1), crate::Layer::new(2, 1)]
        );
        assert_eq!((p.pooling, p.luminance_only), (crate::Pooling::Avg, false));
        // per-layer style weights, crowsonkb/style-transfer-pytorch's against ALGORITHM.md's
        let s = spec(JobKind::Sweep(
            parse_sweep("style_layer_weights=1:1:1:1:1,256:64:16:4:1").unwrap(),
        ));
        let tasks = s.tasks().unwrap();
        assert_eq!(tasks[1].label, "style_layer_weights=256:64:16:4:1");
        assert_eq!(
            tasks[1].params.style_layer_weights,
            [256.0, 64.0, 16.0, 4.0, 1.0]
        );
        // a bad value is refused at submission, naming the axis
        for (grid, names) in [
            ("pooling=max,min", "pooling"),
            ("style_layers=relu1_1:relu9_9", "relu9_9"),
            ("iterations=0", "iterations"),
            // as many weights as style layers at every point
            (
                "style_layers=relu1_1:relu2_1,relu3_1;style_layer_weights=1:2",
                "style_layer_weights",
            ),
        ] {
            let error = spec(JobKind::Sweep(parse_sweep(grid).unwrap()))
                .tasks()
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("sweep") && error.contains(names),
                "{grid}: {error}"
            );
        }
        // nor an axis that no point reads: its images would be copies
        let reads_nothing = |grid: &str, params: RenderParams| {
            JobSpec {
                params,
                ..spec(JobKind::Sweep(parse_sweep(grid).unwrap()))
            }
            .tasks()
            .map(|t| t.len())
            .map_err(|e| e.to_string())
        };
        let default = RenderParams::default;
        let with_scales = RenderParams {
            scales: 2,
            scale_iterations: vec![10, 5],
            ..default()
        };
        for (grid, params, refused) in [
            (
                "learning_rate=1,10",
                default(),
                "learning_rate: no point reads it: Adam's alone",
            ),
            (
                "history_size=5,50;optimizer=adam",
                default(),
                "history_size: no point reads it: L-BFGS's",
            ),
            (
                "iterations=10,20",
                with_scales,
                "iterations: no point reads it: --scale-iterations gives",
            ),
            // the content's init is not seeded
            (
                "seed=1,2",
                default(),
                "seed: no point reads it: the seeded inits' alone",
            ),
        ] {
            let error = reads_nothing(grid, params).unwrap_err();
            assert!(
                error.starts_with("sweep: ") && error.contains(refused),
                "{error}"
            );
        }
        assert_eq!(
            reads_nothing("learning_rate=1,10;optimizer=lbfgs,adam", default()),
            Ok(4)
        );
        let noise = RenderParams {
            init: Init::Noise,
            ..default()
        };
        assert_eq!(reads_nothing("seed=1,2", noise), Ok(2));
        // nor the output's size
        let error = parse_sweep("size=256,512").unwrap_err().to_string();
        assert!(error.contains("unknown parameter 'size'"), "{error}");

        // a value is a label too: "seed=000...01" (seed 1) is refused, naming the axis
        let long = format!("seed={}1", "0".repeat(MAX_SWEEP_VALUE_CHARS));
        let error = spec(JobKind::Sweep(parse_sweep(&long).unwrap()))
            .tasks()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sweep") && error.contains("seed: a value of 1025 characters"),
            "{error}"
        );
        // and a point's label is at most MAX_SWEEP_LABEL_CHARS: three axes of 1000-character values
        // (seeds padded with zeros) are refused
        let padded = |name: &str| format!("{name}={}1,2", "0".repeat(999));
        let three = [padded("seed"), padded("iterations"), padded("history_size")].join(";");
        let error = spec(JobKind::Sweep(parse_sweep(&three).unwrap()))
            .tasks()
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("sweep: points labelled with up to 3031 characters"),
            "{error}"
        );
    }

    /// A video of 5 frames in chunks of 2: the chunks' first frames (1, 3, 5) first, afresh; then each
    /// chunk's next frame, from its previous frame's result with that frame as its temporal target, one
    /// scale at the full size, half the iterations; then nothing. A frame already queued is not queued
    /// again, and only video jobs have frames.
    #[test]
    fn video_frames_start_each_chunk_afresh_then_follow_their_previous_frame() {
        let video = JobSpec {
            contents: (1..=5).map(h).collect(),
            styles: vec![h(9)],
            params: RenderParams {
                iterations: 101,
                scales: 2,
                ..Default::default()
            },
            ..spec(JobKind::Video(Video {
                chunk_frames: 2,
                frame_iterations: 0,
            }))
        };
        let first = video.tasks().unwrap();
        let index = |t: &TaskSpec| t.frame.as_ref().unwrap().index;
        assert_eq!(first.iter().map(index).collect::<Vec<_>>(), [0, 2, 4]);
        assert_eq!(first[1].label, "frame 3/5");
        assert!(first.iter().all(|t| t.previous_frame().is_none()));
        assert_eq!(
            (first[0].params.scales, first[0].content.clone()),
            (2, h(1))
        );
        let results: Vec<ImageHash> = (11..=13).map(h).collect();
        let next = video
            .next_frames(first.iter().zip(results.iter().map(Some)))
            .unwrap();
        assert_eq!(next.iter().map(index).collect::<Vec<_>>(), [1, 3]);
        // a chunk goes on as soon as its own frame is rendered, whatever the others' do
        let one = video
            .next_frames(first.iter().zip([None, Some(&results[1]), None]))
            .unwrap();
        assert_eq!(one.iter().map(index).collect::<Vec<_>>(), [3]);
        let second = &next[1];
        assert_eq!(second.content, h(4));
        assert_eq!(
            second.previous_frame(),
            Some(&PreviousFrame {
                content: h(3),
                result: h(12)
            })
        );
        assert_eq!(second.params.init, Init::Content);
        assert_eq!(
            (
                second.params.scales,
                second.params.iterations,
                second.params.size
            ),
            (1, 51, 512)
        );
        assert!(
            second.images().any(|i| *i == h(3)),
            "the previous content is in use"
        );
        let all: Vec<TaskSpec> = first.iter().chain(&next).cloned().collect();
        let results: Vec<ImageHash> = (11..=15).map(h).collect();
        assert!(video
            .next_frames(all.iter().zip(results.iter().map(Some)))
            .unwrap()
            .is_empty());
        // one chunk: one frame at a time; a frame with its task already is not queued twice
        let one = JobSpec {
            kind: JobKind::Video(Video {
                chunk_frames: 0,
                frame_iterations: 7,
            }),
            ..video.clone()
        };
        let first = one.tasks().unwrap();
        assert_eq!(first.len(), 1);
        let (r20, r21) = (h(20), h(21));
        let next = one
            .next_frames([(&first[0], Some(&r20)), (&first[0], Some(&r20))])
            .unwrap();
        assert_eq!((next.len(), next[0].params.iterations), (1, 7));
        // a frame queued and not rendered yet: its successor waits, and it is not queued twice
        assert!(one
            .next_frames([(&first[0], Some(&r20)), (&next[0], None)])
            .unwrap()
            .is_empty());
        assert!(one
            .next_frames([(&first[0], Some(&r20)), (&next[0], Some(&r21))])
            .unwrap()
            .iter()
            .all(|t| index(t) == 2));
        let err = spec(JobKind::Batch)
            .next_frames([])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("kind"), "{err}");
    }

    #[test]
    fn tiled_jobs_start_with_one_task_then_tiles() {
        let tiling = Tiling {
            tile_size: 256,
            overlap: 64,
            exact: false,
            sizing: TileSizing::Fixed,
        };
        let s = JobSpec {
            params: RenderParams {
                size: 1024,
                ..Default::default()
            },
            ..spec(JobKind::Tiled(tiling))
        };
        let first = s.tasks().unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].params.size, first[0].params.scales), (256, 1));
        assert_eq!(first[0].params.iterations, 500);
        assert_eq!(first[0].label, "scale 1/3");
        let tiles = s.scale_tasks(800, 600, 2, &h(9), &[], None).unwrap();
        // 1024 x 768 in 256-px tiles, overlap >= 64: 5 x 4
        assert_eq!(tiles.len(), 20);
        let t = tiles[6].scale.as_ref().unwrap();
        assert_eq!(
            (t.canvas_width, t.canvas_height, t.count()),
            (1024, 768, 20)
        );
        assert_eq!((t.rect().width, t.rect().height), (256, 256));
        assert_eq!(tiles[6].params.init, Init::Image(h(9)));
        assert_eq!(tiles[6].params.iterations, 125);
        assert!(s.scale_tasks(800, 600, 3, &h(9), &[], None).is_err());
        // exact mode: the same pyramid, one task per scale that is the whole canvas
        let exact = JobSpec {
            kind: JobKind::Tiled(Tiling {
                exact: true,
                ..tiling
            }),
            ..s.clone()
        };
        assert_eq!(exact.tasks().unwrap(), first);
        let whole = exact.scale_tasks(800, 600, 2, &h(9), &[], None).unwrap();
        assert_eq!(whole.len(), 1);
        let t = whole[0].scale.as_ref().unwrap();
        assert!(t.part == ScalePart::Whole { block: 256 } && t.block() == 256);
        let canvas = Rect {
            x: 0,
            y: 0,
            width: 1024,
            height: 768,
        };
        assert_eq!((t.rect(), t.count()), (canvas, 1));
        assert_eq!(whole[0].params.iterations, 125);
    }

    /// A tiled job stored by an earlier version, whose limits were an 8-px overlap and 64-px tiles,
    /// plans and cuts its scales on; the same spec as a new job is refused naming the field.
    #[test]
    fn a_stored_job_under_an_earlier_versions_limits_renders_on_but_a_new_one_is_refused() {
        for (tile_size, overlap, field) in [(128, 32, "overlap"), (64, 16, "tile_size")] {
            let old = JobSpec {
                params: RenderParams {
                    size: 512,
                    ..Default::default()
                },
                ..spec(JobKind::Tiled(Tiling::new(Some(tile_size), overlap, false)))
            };
            assert_eq!(old.tasks().unwrap().len(), 1, "the first scale");
            let tiles = old.scale_tasks(400, 300, 1, &h(3), &[], None).unwrap();
            assert!(tiles.len() > 1);
            for t in &tiles {
                let wire = stylefarm_proto::pb::TileTask::from(t.scale.as_ref().unwrap());
                assert!(
                    crate::job::ScaleTask::try_from(wire).is_ok(),
                    "a worker takes it"
                );
            }
            let err = old.clone().expand().unwrap_err().to_string();
            assert!(err.starts_with(field), "{err}");
            // with a new job's least value, not a stored one's
            let least = match field {
                "overlap" => crate::tiling::MIN_OVERLAP,
                _ => crate::tiling::MIN_TILE_SIZE,
            };
            assert!(err.contains(&format!("must be between {least} ")), "{err}");
            assert!(old.check_new().is_err());
        }
    }

    #[test]
    fn a_tiled_job_of_more_tiles_than_the_fan_out_limit_is_refused_naming_tile_size() {
        let tiled = |tile_size, exact| JobSpec {
            params: RenderParams {
                size: crate::params::MAX_SIZE,
                ..Default::default()
            },
            ..spec(JobKind::Tiled(Tiling {
                tile_size,
                overlap: crate::tiling::MIN_OVERLAP,
                exact,
                sizing: TileSizing::Fixed,
            }))
        };
        // 16384 px in 128-px tiles (the smallest that 8 scales allow) overlapping by 64: 255 x 255 tiles
        let err = tiled(128, false).tasks().unwrap_err().to_string();
        assert!(
            err.starts_with("tile_size") && err.contains("65025 tiles") && err.contains("10000"),
            "{err}"
        );
        // exact mode renders a scale as one task; larger tiles fit
        assert!(tiled(128, true).tasks().is_ok());
        assert!(tiled(512, false).tasks().is_ok());
    }

    /// A job whose tasks each take all its styles (a single render, a sweep, a tiled job) is refused at its
    /// submit when they have more pixels together than one render may take, naming `styles`; a batch,
    /// whose tasks take one style each, is not.
    #[test]
    fn a_task_s_style_images_are_bounded_in_pixels_together() {
        let styles: Vec<ImageHash> = (2..=18).map(h).collect();
        // 17 styles of 4096 x 4096 px: one more than a render may take together
        let size_of = |hash: &ImageHash| {
            Ok(if *hash == h(1) {
                (600, 400)
            } else {
                (4096, 4096)
            })
        };
        for kind in [
            JobKind::Single,
            JobKind::Tiled(Tiling::default()),
            JobKind::Sweep(parse_sweep("style_weight=1,2").unwrap()),
        ] {
            let job = JobSpec {
                styles: styles.clone(),
                ..spec(kind)
            };
            let err = job.check_sizes(size_of).unwrap_err().to_string();
            assert!(
                err.starts_with("styles:") || err.contains(": styles:"),
                "{err}"
            );
            assert!(err.contains("pixels together"), "{err}");
            let sixteen = JobSpec {
                styles: styles[..16].to_vec(),
                ..job
            };
            sixteen.check_sizes(size_of).unwrap();
        }
        let batch = JobSpec {
            styles,
            ..spec(JobKind::Batch)
        };
        batch.check_sizes(size_of).unwrap();
    }

    /// A tiled job whose tile size adds coarse scales too small for VGG19 (a 16:1 panorama in 128-px
    /// tiles) is refused naming the tile size and saying why there are more scales than asked for.
    #[test]
    fn a_tile_size_that_adds_scales_too_small_is_named() {
        let pano = JobSpec {
            params: RenderParams {
                size: 512,
                ..Default::default()
            },
            ..spec(JobKind::Tiled(Tiling::new(Some(128), 64, false)))
        };
        let size_of = |hash: &ImageHash| {
            Ok(if *hash == h(1) {
                (1024, 64)
            } else {
                (512, 512)
            })
        };
        let err = pano.check_sizes(size_of).unwrap_err().to_string();
        assert!(
            err.starts_with("tile_size: content image ")
                && err.contains(" becomes 128 x 8 px at size 128 (scale 1 of 3); VGG19 needs")
                && err.ends_with(
                    "(a tiled job's first scale is at most one tile, 128 px: 3 scales, not the 1 \
                     asked for; larger tiles make fewer)"
                ),
            "{err}"
        );
        // 256-px tiles: two scales, the first at 256 x 16 px
        let larger = JobSpec {
            kind: JobKind::Tiled(Tiling::new(Some(256), 64, false)),
            ..pano
        };
        larger.check_sizes(size_of).unwrap();
    }

    /// A video's frame of another size than its first is refused naming both, by number and by name.
    #[test]
    fn a_video_s_frame_of_another_size_is_named() {
        let video = JobSpec {
            contents: vec![h(11), h(12), h(13)],
            content_names: ["001", "002", "003"].map(String::from).to_vec(),
            ..spec(JobKind::Video(Video {
                chunk_frames: 0,
                frame_iterations: 0,
            }))
        };
        let size_of = |hash: &ImageHash| Ok(if *hash == h(13) { (80, 64) } else { (96, 64) });
        let err = video.check_sizes(size_of).unwrap_err().to_string();
        assert_eq!(
            err,
            "contents: frame 3 (003) is 80x64, frame 1 (001) is 96x64: a video's frames share one size"
        );
    }

    #[test]
    fn tiled_checks_refuse_a_bad_spec_before_reading_its_content() {
        let none = JobSpec {
            contents: vec![],
            ..spec(JobKind::Tiled(Tiling::default()))
        };
        // both once indexed contents[0] of an unchecked spec
        let err = none.check_sizes(|_| Ok((512, 512))).unwrap_err();
        assert!(err.to_string().starts_with("contents"), "{err}");
        let err = none.scale_tasks(512, 512, 1, &h(9), &[], None).unwrap_err();
        assert!(err.to_string().starts_with("contents"), "{err}");
        let err = spec(JobKind::Single)
            .scale_tasks(512, 512, 1, &h(9), &[], None)
            .unwrap_err();
        assert!(err.to_string().starts_with("kind"), "{err}");
    }

    #[test]
    fn bad_specs_name_the_field() {
        let cases = [
            (
                JobSpec {
                    contents: vec![],
                    ..spec(JobKind::Single)
                },
                "contents",
            ),
            (
                JobSpec {
                    styles: vec![],
                    ..spec(JobKind::Single)
                },
                "styles",
            ),
            (
                JobSpec {
                    contents: vec![h(1), h(2)],
                    ..spec(JobKind::Single)
                },
                "contents",
            ),
            (spec(JobKind::Sweep(Vec::new())), "sweep"),
            (
                spec(JobKind::Sweep(parse_sweep("style_weight=-1").unwrap())),
                "style_weight",
            ),
            (
                spec(JobKind::Sweep(parse_sweep("seed=1;seed=2").unwrap())),
                "sweep",
            ),
            (
                spec(JobKind::Sweep(parse_sweep("seed=x").unwrap())),
                "sweep",
            ),
            (
                JobSpec {
                    params: RenderParams {
                        iterations: 0,
                        ..Default::default()
                    },
                    ..spec(JobKind::Batch)
                },
                "iterations",
            ),
            (
                spec(JobKind::Video(Video {
                    chunk_frames: 1001,
                    frame_iterations: 0,
                })),
                "chunk_frames",
            ),
            (
                spec(JobKind::Video(Video {
                    chunk_frames: 0,
                    frame_iterations: 100_001,
                })),
                "frame_iterations",
            ),
        ];
        for (s, field) in cases {
            let err = s.tasks().unwrap_err().to_string();
            assert!(err.starts_with(field), "{field}: {err}");
        }
        for bad in ["style_weight", "colour=1", "seed=1,,2"] {
            assert!(
                parse_sweep(bad)
                    .unwrap_err()
                    .to_string()
                    .starts_with("sweep"),
                "{bad}"
            );
        }
        // an empty value from the wire (where `""` beside `1` was two points of one render)
        for (axis, values) in [("seed", vec!["1", "", "2"]), ("style_blend", vec!["", "1"])] {
            let empty = vec![SweepAxis {
                parameter: axis.parse().unwrap(),
                values: values.into_iter().map(String::from).collect(),
            }];
            let err = spec(JobKind::Sweep(empty)).tasks().unwrap_err().to_string();
            assert_eq!(err, format!("sweep: {axis}: an empty value"));
        }
    }
}
