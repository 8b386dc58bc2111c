//! The engine on its own OS thread: it loads VGG19 once and keeps it warm; async code sends it renders over a
//! channel and awaits the result (libtorch never blocks the async runtime; `Tensor` is not `Sync`). The
//! thread also keeps the style targets (blended Gram matrices) it computed, by content: a batch's tasks
//! with the same style, a sweep's points with the same style weight's targets, and every tile of a tiled
//! scale reuse them instead of running the style images through the network again. A tile's own target is
//! the global Gram plus the tile's deviation from its whole canvas at the start (the canvas' Grams are
//! cached too, by the init's hash), so that the tiles' Grams average to the global ones.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use image::{Rgb32FImage, RgbImage};
use stylefarm_core::checkpoint::{CheckpointEvery, CheckpointFile};
use stylefarm_core::job::ImageHash;
use stylefarm_core::{imaging, Layer, Pooling};
use stylefarm_engine::render::StyleMatch;
use stylefarm_engine::{
    Checkpointing, Device, Engine, EngineOptions, Progress, RenderJob, Snapshots, StyleGrams,
};
use tokio::sync::{oneshot, watch};

/// Style targets kept on the engine thread.
const STYLE_CACHE_ENTRIES: usize = 16;

/// What identifies a task's style targets besides the style side: the style images' hashes, blend weights,
/// style layers, pooling and the block size (see [`stylefarm_engine::Engine::style_grams`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StyleKey {
    /// The style images' sha256 hashes, in the task's order.
    pub styles: Vec<ImageHash>,
    /// Block size in px in which the style targets are computed (a tile's render); `None`: the whole image at
    /// once.
    pub block: Option<u32>,
    /// A tile's canvas, whose Gram matrices its targets are offset by.
    pub tile_canvas: Option<TileCanvas>,
    /// The content's sha256 when the styles are matched to it ([`stylefarm_engine::render::StyleMatch`]:
    /// luminance-only transfer, colour matching), so that their targets depend on it. `None` otherwise.
    pub matched_to: Option<ImageHash>,
}

/// The canvas of a tile at the start of its scale: the previous scale's result (`init`, its hash) resampled
/// to `width` x `height`. Resampled only when its Gram matrices are not cached yet: once per worker and
/// scale, not per tile.
#[derive(Debug, Clone, PartialEq)]
pub struct TileCanvas {
    /// The sha256 of the previous scale's result, which keys the canvas' cached Gram matrices.
    pub init: ImageHash,
    /// The previous scale's result, decoded, at its own size.
    pub previous: Arc<RgbImage>,
    /// The canvas' width at this scale, in px.
    pub width: u32,
    /// The canvas' height at this scale, in px.
    pub height: u32,
}

/// What a cached set of Gram matrices depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum TargetKey {
    /// The style images' blended Grams at a style side ([`Engine::style_grams`]).
    Style {
        styles: Vec<ImageHash>,
        /// The blend weights' bits (f64 is not `Eq`).
        blend: Vec<u64>,
        side: u32,
        layers: Vec<Layer>,
        pooling: Pooling,
        block: Option<u32>,
        /// Matched to the content ([`StyleKey::matched_to`]): luminance-only transfer's Grams are those of
        /// the images' luminance matched to the content's, colour matching's those of the images with the
        /// content's colours.
        matched: Option<StyleMatch>,
        matched_to: Option<ImageHash>,
    },
    /// A tile's canvas at the start of its scale ([`Engine::canvas_grams`]): the previous scale's hash.
    Canvas {
        init: ImageHash,
        size: (u32, u32),
        layers: Vec<Layer>,
        pooling: Pooling,
        block: Option<u32>,
        luminance_only: bool,
    },
}

/// Gram matrices by key, the oldest dropped first.
#[derive(Default)]
struct StyleCache {
    entries: VecDeque<(TargetKey, Rc<StyleGrams>)>,
    hits: u64,
    misses: u64,
}

impl StyleCache {
    fn get(
        &mut self,
        key: TargetKey,
        compute: impl FnOnce() -> Result<StyleGrams, stylefarm_engine::Error>,
    ) -> Result<Rc<StyleGrams>, stylefarm_engine::Error> {
        if let Some((_, grams)) = self.entries.iter().find(|(k, _)| *k == key) {
            self.hits += 1;
            return Ok(grams.clone());
        }
        self.misses += 1;
        let grams = Rc::new(compute()?);
        if self.entries.len() >= STYLE_CACHE_ENTRIES {
            self.entries.pop_front();
        }
        self.entries.push_back((key, grams.clone()));
        Ok(grams)
    }
}

/// What one render took.
#[derive(Debug, Clone, Copy)]
pub struct RenderStats {
    /// Seconds on the engine thread, style targets included.
    pub engine_s: f64,
    /// Whether the style targets came from the cache.
    pub style_cached: bool,
    /// The evaluations of the objective it made (every scale's; from a checkpoint, only those after it).
    pub evaluations: u32,
    /// Seconds the engine thread waited between the end of its previous render and the start of this one
    /// (the first: none): on a GPU, the device's idle time between tasks (the worker's lease, downloads
    /// and the tile's preparation; a lease poll that waited for work too).
    pub idle_s: Option<f64>,
}

/// Why a render on the engine thread failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The engine returned an error (a bad input, libtorch, out of memory, cancelled).
    #[error(transparent)]
    Engine(#[from] stylefarm_engine::Error),
    /// The render panicked; the thread caught it, checked the engine and kept it (or reloaded it).
    #[error("the engine panicked: {0}")]
    Panicked(String),
    /// The engine can no longer render (device lost, weights gone on reload): the worker must stop.
    #[error("the engine is lost: {0}")]
    Lost(Unhealthy),
}

type Reply = Result<(RgbImage, RenderStats), RenderError>;

struct Request {
    job: RenderJob,
    style: StyleKey,
    /// The checkpoint to start from ([`Checkpointing::resume`]), taken by the render.
    resume: std::cell::Cell<Option<CheckpointFile>>,
    cancel: Arc<AtomicBool>,
    live: Live,
    reply: oneshot::Sender<Reply>,
    /// The task's span, entered while it renders: the engine thread's events go to the task's log.
    span: tracing::Span,
}

/// How often a render's progress goes to the log, in iterations (neural-style's `-print_iter`); each
/// scale's last iteration goes too.
const LOG_EVERY_ITERATIONS: u32 = 100;

/// A preview of a render's image: a PNG whose longer side is at most [`imaging::PREVIEW_SIDE`] px, of the
/// scale being rendered (a tile's or a shard's window).
pub type PreviewPng = Arc<Vec<u8>>;

/// Where a render says how it goes: its progress at every evaluation, now and then a preview of its
/// image, and its checkpoints.
pub struct Live {
    /// The latest progress.
    pub progress: watch::Sender<Option<Progress>>,
    /// The latest preview, the first one `preview_every` after the render starts.
    pub preview: watch::Sender<Option<PreviewPng>>,
    /// The time between two previews; `None`: none (no image is read for them).
    pub preview_every: Option<Duration>,
    /// The latest checkpoint ([`stylefarm_core::checkpoint`]), saved as `checkpoints` says, for the worker
    /// to encode and send off the engine thread.
    pub checkpoint: Arc<CheckpointSlot>,
    /// When the render saves checkpoints ([`stylefarm_core::job::JobSpec::checkpoints`]).
    pub checkpoints: CheckpointEvery,
}

/// The latest checkpoint of a render, waiting to be sent: a newer one replaces one that waits, and the
/// sender takes it, so that no copy is kept once it is on its way.
#[derive(Default)]
pub struct CheckpointSlot {
    file: Mutex<Option<CheckpointFile>>,
    ready: tokio::sync::Notify,
}

impl CheckpointSlot {
    /// Puts `file` in the slot, replacing one that waits.
    pub fn put(&self, file: CheckpointFile) {
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
        self.ready.notify_one();
    }

    /// Takes the next checkpoint, waiting for one.
    pub async fn take(&self) -> CheckpointFile {
        loop {
            if let Some(file) = self.file.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return file;
            }
            self.ready.notified().await;
        }
    }
}

/// Renders running on this process's engine threads.
static RENDERING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many renders this process's engine threads are running now. A process must not exit while one
/// runs: libtorch's static objects would be torn down under it (a segmentation fault at exit). A task
/// whose worker is dropped is cancelled, and its render stops at its next iteration: a process that
/// stops its workers (`LocalFarm::shutdown`) waits for this to be 0.
pub fn renders_running() -> usize {
    RENDERING.load(std::sync::atomic::Ordering::SeqCst)
}

/// This process's engine threads alive (loading, rendering, idle or freeing their engine).
static ENGINE_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many engine threads this process has alive, from their start to their last drop (the engine's
/// tensors, a CUDA context): a process that ends while one is must end without running libtorch's static
/// destructors under it (`_exit`): its render may not have stopped yet, or its engine may be being freed.
pub fn engine_threads_alive() -> usize {
    ENGINE_THREADS.load(std::sync::atomic::Ordering::SeqCst)
}

/// Counts itself in a counter ([`RENDERING`], [`ENGINE_THREADS`]) while it lives.
struct Counted(&'static std::sync::atomic::AtomicUsize);

impl Counted {
    fn start(counter: &'static std::sync::atomic::AtomicUsize) -> Counted {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted(counter)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A handle to the engine thread; dropping it ends the thread.
pub struct EngineThread {
    requests: std::sync::mpsc::Sender<Request>,
    /// Set, with the reason, when the engine can no longer render.
    lost: Arc<Mutex<Option<Unhealthy>>>,
}

pub use stylefarm_core::panic_message;

/// Why the engine does not render, or cannot be had again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unhealthy {
    /// Its probe render ([`Engine::probe`]) returned this error.
    #[error(transparent)]
    Probe(Arc<stylefarm_engine::Error>),
    /// Its probe render panicked with this message.
    #[error("{0}")]
    ProbePanicked(String),
    /// It did not render, and reloading VGG19 failed.
    #[error("{why}; reloading failed: {reload}")]
    ReloadFailed {
        /// Why the engine was reloaded.
        why: Box<Unhealthy>,
        /// The reload's error.
        reload: Arc<stylefarm_engine::Error>,
    },
    /// It did not render, and the reloaded engine does not either.
    #[error("{why}; after a reload still: {still}")]
    StillUnhealthy {
        /// Why the engine was reloaded.
        why: Box<Unhealthy>,
        /// Why the reloaded one does not render.
        still: Box<Unhealthy>,
    },
    /// Recovering it after a render that failed (its probe, VGG19's reload) panicked with this message.
    #[error("recovering the engine panicked: {0}")]
    RecoverPanicked(String),
    /// The engine thread is gone.
    #[error("the engine thread stopped")]
    Stopped,
}

/// Whether the engine still renders ([`Engine::probe`]), a panic in the probe included.
fn healthy(engine: &Engine) -> Result<(), Unhealthy> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| engine.probe())) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Unhealthy::Probe(Arc::new(e))),
        Err(payload) => Err(Unhealthy::ProbePanicked(panic_message(payload.as_ref()))),
    }
}

/// The engine of the thread: loaded once, checked after every failure that was not the input's, and
/// reloaded from the weights when the check fails.
struct Resident {
    engine: Engine,
    cache: StyleCache,
    weights: PathBuf,
}

impl Resident {
    /// After a failure that was not the input's: keeps the engine when it still renders, else reloads
    /// VGG19 (and forgets the cached targets); `Err` when it cannot be had again.
    fn recover(&mut self) -> Result<(), Unhealthy> {
        let Err(why) = self.check() else {
            return Ok(());
        };
        tracing::error!(reason = %why, "the engine does not render; reloading VGG19");
        self.cache = StyleCache::default();
        let device = self.engine.device();
        fail::fail_point!("engine-reload", |_| Err(Unhealthy::ReloadFailed {
            why: Box::new(why.clone()),
            reload: Arc::new(stylefarm_engine::Error::Device(
                "the weights are gone (injected)".into()
            )),
        }));
        let engine =
            Engine::load_with(&self.weights, device, self.engine.options()).map_err(|e| {
                Unhealthy::ReloadFailed {
                    why: Box::new(why.clone()),
                    reload: Arc::new(e),
                }
            })?;
        healthy(&engine).map_err(|e| Unhealthy::StillUnhealthy {
            why: Box::new(why),
            still: Box::new(e),
        })?;
        self.engine = engine;
        tracing::info!("engine reloaded");
        Ok(())
    }

    fn check(&self) -> Result<(), Unhealthy> {
        fail::fail_point!("engine-probe", |_| Err(Unhealthy::Probe(Arc::new(
            stylefarm_engine::Error::Device("device lost (injected)".into())
        ))));
        healthy(&self.engine)
    }

    /// Renders one request, its style targets from (and into) the cache; the image, and the evaluations
    /// made.
    fn render(&mut self, req: &Request) -> Result<(RgbImage, u32), stylefarm_engine::Error> {
        fail::fail_point!("engine-render");
        // every render runs out of memory (`return`), or those of at least N px a side (`return(N)`)
        #[cfg(feature = "failpoints")]
        if let Some(true) = fail::eval("engine-render-oom", |from| {
            let from = from.and_then(|px| px.parse::<u32>().ok()).unwrap_or(0);
            req.job.params.size >= from
        }) {
            return Err(stylefarm_engine::Error::Torch(tch::TchError::Torch(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected)".into(),
            )));
        }
        let cache = &mut self.cache;
        let evaluations = std::cell::Cell::new(0u32);
        let logged = std::cell::Cell::new((0, 0));
        let mut on_progress = |p: &Progress| {
            evaluations.set(evaluations.get() + 1);
            let _ = req.live.progress.send(Some(*p));
            let due = p.iteration == p.iterations
                || (p.iteration > 0 && p.iteration.is_multiple_of(LOG_EVERY_ITERATIONS));
            // once an iteration (L-BFGS evaluates some more than once)
            if due && logged.replace((p.scale, p.iteration)) != (p.scale, p.iteration) {
                let l = &p.losses;
                tracing::info!(
                    scale = format!("{}/{}", p.scale, p.scales),
                    iteration = format!("{}/{}", p.iteration, p.iterations),
                    size = format!("{}x{}", p.width, p.height),
                    content_loss = l.content,
                    style_loss = l.style,
                    tv_loss = l.tv,
                    total_loss = l.total,
                    elapsed_s = p.elapsed,
                    "progress"
                );
            }
            if req.cancel.load(Ordering::Relaxed) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let params = &req.job.params;
        let mut style_for = |engine: &Engine, side: u32| {
            let global = cache.get(
                TargetKey::Style {
                    styles: req.style.styles.clone(),
                    blend: params
                        .blend_weights(req.style.styles.len())
                        .iter()
                        .map(|w| w.to_bits())
                        .collect(),
                    side,
                    layers: params.style_layers.clone(),
                    pooling: params.pooling,
                    block: req.style.block,
                    matched: StyleMatch::of(params),
                    matched_to: req.style.matched_to.clone(),
                },
                || engine.style_grams(&req.job.styles, side, params, req.style.block),
            )?;
            let Some(canvas) = &req.style.tile_canvas else {
                return Ok(global);
            };
            // the canvas' targets cost the canvas (a minute on a CPU for a large one): not once cancelled
            if req.cancel.load(Ordering::Relaxed) {
                return Err(stylefarm_engine::Error::Cancelled);
            }
            let size = (canvas.width, canvas.height);
            let whole = cache.get(
                TargetKey::Canvas {
                    init: canvas.init.clone(),
                    size,
                    layers: params.style_layers.clone(),
                    pooling: params.pooling,
                    block: req.style.block,
                    luminance_only: params.luminance_only,
                },
                || engine.canvas_grams(&canvas.previous, size, params, req.style.block),
            )?;
            let tile = req.job.init_image.as_ref().ok_or_else(|| {
                stylefarm_core::Error::invalid("init", "a tile needs its init image")
            })?;
            Ok(Rc::new(
                engine.tile_style_grams(&global, &whole, tile, params)?,
            ))
        };
        // a preview reads the image from the device: when one is due, not at every iteration
        let last = std::cell::Cell::new(Instant::now());
        let mut due = |_scale, _iteration| {
            req.live
                .preview_every
                .is_some_and(|every| last.get().elapsed() >= every)
        };
        // a preview that fails is left out: the render goes on
        let mut save = |_scale, _iteration, image: Result<Rgb32FImage, stylefarm_engine::Error>| {
            last.set(Instant::now());
            let png = image.map_err(|e| e.to_string()).and_then(|image| {
                let eight = imaging::eight_bit(&image);
                imaging::thumbnail_png(&eight, imaging::PREVIEW_SIDE, "preview")
                    .map_err(|e| e.to_string())
            });
            match png {
                Ok(png) => drop(req.live.preview.send(Some(Arc::new(png)))),
                Err(e) => tracing::warn!(error = %e, "preview left out"),
            }
            Ok(())
        };
        let snapshots = req.live.preview_every.map(|_| Snapshots {
            due: &mut due,
            longest: Some(imaging::PREVIEW_SIDE),
            save: &mut save,
        });
        let mut save_checkpoint = |file: CheckpointFile| {
            req.live.checkpoint.put(file);
            Ok(())
        };
        let checkpointing = Checkpointing {
            resume: req.resume.take(),
            every: req.live.checkpoints,
            save: &mut save_checkpoint,
        };
        // the targets of a large canvas look at the cancel block by block, not only between phases
        let image = stylefarm_engine::cancel::with_cancel(req.cancel.clone(), || {
            self.engine.render_with(
                &req.job,
                &mut style_for,
                &mut on_progress,
                snapshots,
                Some(checkpointing),
            )
        })?;
        Ok((image, evaluations.get()))
    }
}

impl EngineThread {
    /// Loads the weights on a new thread; returns once they are loaded (or failed to).
    ///
    /// A render that fails on its input fails alone. One that panics, or fails in libtorch for another
    /// reason than memory, is followed by a check of the engine: when it no longer renders, VGG19 is
    /// reloaded; when that fails too, the thread stops, [`EngineThread::lost`] says why, and every later
    /// render fails with [`RenderError::Lost`].
    ///
    /// The engine is warmed up ([`Engine::warm_up`]) before `start` returns: the device's one-time costs
    /// are paid once per worker, before its first task.
    pub fn start(
        weights: PathBuf,
        device: Device,
        options: EngineOptions,
    ) -> Result<EngineThread, stylefarm_engine::Error> {
        let (requests, inbox) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let lost = Arc::new(Mutex::new(None));
        let lost_here = lost.clone();
        std::thread::Builder::new()
            .name(format!("engine-{device:?}").to_lowercase())
            .spawn(move || {
                // first: dropped after everything else of the thread
                let _alive = Counted::start(&ENGINE_THREADS);
                let started = Instant::now();
                let loaded = Engine::load_with(&weights, device, options).and_then(|engine| {
                    let load_s = started.elapsed().as_secs_f64();
                    engine.warm_up()?;
                    Ok((engine, load_s))
                });
                let engine = match loaded {
                    Ok((engine, load_s)) => {
                        tracing::info!(
                            ?device,
                            ?options,
                            load_s,
                            warm_up_s = started.elapsed().as_secs_f64() - load_s,
                            "engine loaded"
                        );
                        let _ = ready_tx.send(Ok(()));
                        engine
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut resident = Resident {
                    engine,
                    cache: StyleCache::default(),
                    weights,
                };
                // when the last render ended: the idle time before the next (RenderStats::idle_s)
                let mut last_ended: Option<Instant> = None;
                while let Ok(req) = inbox.recv() {
                    let started = Instant::now();
                    let idle_s = last_ended.map(|ended| (started - ended).as_secs_f64());
                    let hits = resident.cache.hits;
                    let entered = req.span.enter();
                    let rendering = Counted::start(&RENDERING);
                    let rendered =
                        std::panic::catch_unwind(AssertUnwindSafe(|| resident.render(&req)));
                    let reply = match rendered {
                        Ok(Ok((img, evaluations))) => Ok((
                            img,
                            RenderStats {
                                engine_s: started.elapsed().as_secs_f64(),
                                style_cached: resident.cache.hits > hits,
                                evaluations,
                                idle_s,
                            },
                        )),
                        Ok(Err(e)) => Err(RenderError::Engine(e)),
                        Err(payload) => {
                            let message = panic_message(payload.as_ref());
                            let message =
                                stylefarm_engine::without_stack_trace(&message).to_string();
                            // tch's infallible calls panic with libtorch's error: an allocation that
                            // failed is the device's memory, not a broken engine (its tile is made smaller)
                            if stylefarm_engine::is_out_of_memory_message(&message) {
                                Err(RenderError::Engine(stylefarm_engine::Error::Torch(
                                    tch::TchError::Torch(message),
                                )))
                            } else {
                                Err(RenderError::Panicked(message))
                            }
                        }
                    };
                    let suspect = match &reply {
                        Err(RenderError::Engine(e)) => {
                            !e.is_input_fault()
                                && !e.is_out_of_memory()
                                && !matches!(e, stylefarm_engine::Error::Cancelled)
                        }
                        Err(_) => true,
                        Ok(_) => false,
                    };
                    if suspect {
                        // a panic here too must leave the engine lost with its reason, not the thread
                        // gone without one
                        let recovered =
                            std::panic::catch_unwind(AssertUnwindSafe(|| resident.recover()))
                                .unwrap_or_else(|payload| {
                                    Err(Unhealthy::RecoverPanicked(panic_message(payload.as_ref())))
                                });
                        if let Err(why) = recovered {
                            tracing::error!(reason = %why, "the engine is lost");
                            *lost_here.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                            // refuse further requests before answering this one: a render sent after
                            // the answer finds the thread gone and is answered as lost at once
                            drop(inbox);
                            drop(entered);
                            let _ = req.reply.send(reply);
                            return;
                        }
                    }
                    drop((entered, rendering));
                    let _ = req.reply.send(reply);
                    last_ended = Some(Instant::now());
                }
            })
            .map_err(|e| {
                stylefarm_engine::Error::Device(format!("cannot start the engine thread: {e}"))
            })?;
        ready_rx.recv().unwrap_or_else(|_| {
            Err(stylefarm_engine::Error::Device("engine thread died".into()))
        })?;
        Ok(EngineThread { requests, lost })
    }

    /// Why the engine can no longer render, once it cannot: the worker should stop leasing and exit.
    pub fn lost(&self) -> Option<Unhealthy> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queues a render, from the checkpoint `resume` if any; the receiver yields its result. Setting
    /// `cancel` stops it at the next iteration.
    pub fn render(
        &self,
        job: RenderJob,
        style: StyleKey,
        resume: Option<CheckpointFile>,
        cancel: Arc<AtomicBool>,
        live: Live,
    ) -> oneshot::Receiver<Reply> {
        let (reply, rx) = oneshot::channel();
        if let Err(std::sync::mpsc::SendError(req)) = self.requests.send(Request {
            job,
            style,
            resume: std::cell::Cell::new(resume),
            cancel,
            live,
            reply,
            span: tracing::Span::current(),
        }) {
            // the thread is gone: the engine is lost, with its reason where the thread gave one
            let why = self
                .lost
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(Unhealthy::Stopped)
                .clone();
            let _ = req.reply.send(Err(RenderError::Lost(why)));
        }
        rx
    }
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use stylefarm_core::RenderParams;

    fn request(
        engine: &EngineThread,
        style_key: &str,
        params: RenderParams,
    ) -> Result<(RgbImage, RenderStats), RenderError> {
        let (progress, _) = watch::channel(None);
        let (preview, _) = watch::channel(None);
        let live = Live {
            progress,
            preview,
            preview_every: None,
            checkpoint: Default::default(),
            checkpoints: CheckpointEvery::Never,
        };
        request_live(engine, style_key, params, live)
    }

    fn request_live(
        engine: &EngineThread,
        style_key: &str,
        params: RenderParams,
        live: Live,
    ) -> Result<(RgbImage, RenderStats), RenderError> {
        let img =
            |v: u8| RgbImage::from_fn(32, 24, |x, y| image::Rgb([v, x as u8 * 7, y as u8 * 9]));
        let job = RenderJob::new(img(10), vec![img(200)], None, params);
        let style = StyleKey {
            styles: vec![ImageHash::of(style_key.as_bytes())],
            block: None,
            tile_canvas: None,
            matched_to: None,
        };
        engine
            .render(job, style, None, Arc::new(AtomicBool::new(false)), live)
            .blocking_recv()
            .expect("a reply")
    }

    fn engine_thread() -> EngineThread {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let weights = repo.join(".stylefarm/vgg19.safetensors");
        EngineThread::start(weights, Device::Cpu, EngineOptions::default()).unwrap()
    }

    /// Previews come as the render goes, when due (here at every iteration): PNGs of the image at most
    /// PREVIEW_SIDE px a side, the last one the result itself; none at all without an interval.
    #[test]
    fn previews_come_when_due_and_the_last_is_the_result() {
        let engine = engine_thread();
        let params = RenderParams {
            size: 32,
            iterations: 3,
            ..Default::default()
        };
        let (progress, _) = watch::channel(None);
        let (preview, mut previews) = watch::channel(None);
        let live = Live {
            progress,
            preview,
            preview_every: Some(Duration::ZERO),
            checkpoint: Default::default(),
            checkpoints: CheckpointEvery::Never,
        };
        let (result, _) = request_live(&engine, "good", params.clone(), live).unwrap();
        let png = previews.borrow_and_update().clone().expect("a preview");
        let last = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(last, result, "the last preview is the result");

        let (progress, _) = watch::channel(None);
        let (preview, previews) = watch::channel(None);
        let live = Live {
            progress,
            preview,
            preview_every: None,
            checkpoint: Default::default(),
            checkpoints: CheckpointEvery::Never,
        };
        request_live(&engine, "good", params, live).unwrap();
        assert!(
            previews.borrow().is_none(),
            "no preview without an interval"
        );
    }

    /// One bad task fails alone: a panic inside a render and a render refused for its input each fail that
    /// render only, and the next renders on the same thread; a lost device that cannot be reloaded stops
    /// the thread and says why.
    #[test]
    fn a_failing_render_fails_alone_and_a_lost_engine_says_why() {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("vgg19.safetensors");
        std::os::unix::fs::symlink(
            repo.join(".stylefarm/vgg19.safetensors")
                .canonicalize()
                .unwrap(),
            &weights,
        )
        .unwrap();
        let engine =
            EngineThread::start(weights.clone(), Device::Cpu, EngineOptions::default()).unwrap();
        let params = RenderParams {
            size: 32,
            iterations: 2,
            ..Default::default()
        };
        let good = |engine: &EngineThread| request(engine, "good", params.clone());
        assert_eq!(good(&engine).unwrap().0.dimensions(), (32, 24));

        fail::cfg("engine-render", "1*panic(injected)").unwrap();
        let panicked = request(&engine, "good", params.clone()).unwrap_err();
        assert!(
            matches!(&panicked, RenderError::Panicked(m) if m.contains("injected")),
            "{panicked}"
        );
        assert_eq!(good(&engine).unwrap().0.dimensions(), (32, 24));

        // a panic of tch's with libtorch's out of memory (an infallible call's): the device's memory, as
        // the error would be, not a broken engine
        fail::cfg(
            "engine-render",
            "1*panic(called `Result::unwrap()` on an `Err` value: Torch(\"CUDA out of memory. Tried to \
             allocate 2.00 GiB\"))",
        )
        .unwrap();
        match request(&engine, "good", params.clone()).unwrap_err() {
            RenderError::Engine(e) => assert!(e.is_out_of_memory(), "{e}"),
            other => panic!("{other}"),
        }
        assert_eq!(good(&engine).unwrap().0.dimensions(), (32, 24));

        // a style scale that leaves the style 1 px a side: refused before any tensor work, the input's fault
        let tiny = RenderParams {
            style_scale: 0.01,
            ..params.clone()
        };
        match request(&engine, "tiny", tiny).unwrap_err() {
            RenderError::Engine(e) => {
                assert!(e.is_input_fault(), "{e}");
                assert!(e.to_string().starts_with("style_scale:"), "{e}");
            }
            other => panic!("{other}"),
        }
        assert!(engine.lost().is_none());
        assert_eq!(good(&engine).unwrap().0.dimensions(), (32, 24));

        // the device is lost and the weights are gone: the engine cannot be had again
        std::fs::remove_file(&weights).unwrap();
        fail::cfg("engine-probe", "return").unwrap();
        fail::cfg("engine-render", "1*panic(injected)").unwrap();
        assert!(matches!(
            request(&engine, "good", params.clone()),
            Err(RenderError::Panicked(_))
        ));
        fail::remove("engine-probe");
        let why = engine.lost().expect("the engine is lost").to_string();
        assert!(
            why.contains("device lost") && why.contains("reloading failed"),
            "{why}"
        );
        match good(&engine) {
            Err(RenderError::Lost(m)) => assert_eq!(m.to_string(), why),
            other => panic!("{:?}", other.map(|(img, _)| img.dimensions())),
        }
    }

    /// A recovery that panics (here VGG19's reload, after a render that panicked on a lost device) leaves
    /// the engine lost with the panic's message, so that the worker leaves the farm saying why, instead of
    /// a thread gone without a reason and a worker that leases tasks only to fail them.
    #[test]
    fn a_recovery_that_panics_leaves_the_engine_lost_with_the_reason() {
        let engine = engine_thread();
        let params = RenderParams {
            size: 32,
            iterations: 2,
            ..Default::default()
        };
        fail::cfg("engine-probe", "return").unwrap();
        fail::cfg("engine-reload", "panic(reload injected)").unwrap();
        fail::cfg("engine-render", "1*panic(injected)").unwrap();
        assert!(matches!(
            request(&engine, "good", params.clone()),
            Err(RenderError::Panicked(_))
        ));
        let why = engine.lost().expect("the engine is lost").to_string();
        assert!(
            why.starts_with("recovering the engine panicked") && why.contains("reload injected"),
            "{why}"
        );
        match request(&engine, "good", params) {
            Err(RenderError::Lost(m)) => assert_eq!(m.to_string(), why),
            other => panic!("{:?}", other.map(|(img, _)| img.dimensions())),
        }
    }
}
