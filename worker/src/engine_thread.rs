//! The engine on its own OS thread: it loads VGG19 once and keeps it warm; async code sends it renders over a
//! channel and awaits the result (libtorch never blocks the async runtime; `Tensor` is not `Sync`). The
//! thread also keeps the style targets (blended Gram matrices) it computed, by content: a batch's tasks
//! with the same style, a sweep's points with the same style weight's targets, and every tile of a tiled
//! scale reuse them instead of running the style images through the network again. A tile's own target is
//! the global Gram plus the tile's deviation from its whole canvas at the start (the canvas' Grams are
//! cached too, by the init's hash), so that the tiles' Grams average to the global ones.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;
use stylefarm_core::RenderParams;
use stylefarm_engine::{Device, Engine, Progress, RenderJob, StyleGrams};
use tokio::sync::{oneshot, watch};

/// Style targets kept on the engine thread.
const STYLE_CACHE_ENTRIES: usize = 16;

/// What identifies a task's style targets besides the style side: the style images' hashes, blend weights,
/// style layers, pooling and the block size (see [`stylefarm_engine::Engine::style_grams`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StyleKey {
    pub styles: Vec<String>,
    pub block: Option<u32>,
    /// A tile's canvas: the init image (the previous scale's result) at this scale's size, and its hash.
    pub tile_canvas: Option<(String, Arc<RgbImage>)>,
}

/// Style targets by key, the oldest dropped first.
#[derive(Default)]
struct StyleCache {
    entries: VecDeque<(String, Rc<StyleGrams>)>,
    hits: u64,
    misses: u64,
}

impl StyleCache {
    fn get(&mut self, key: String, compute: impl FnOnce() -> StyleGrams) -> Rc<StyleGrams> {
        if let Some((_, grams)) = self.entries.iter().find(|(k, _)| *k == key) {
            self.hits += 1;
            return grams.clone();
        }
        self.misses += 1;
        let grams = Rc::new(compute());
        if self.entries.len() >= STYLE_CACHE_ENTRIES {
            self.entries.pop_front();
        }
        self.entries.push_back((key, grams.clone()));
        grams
    }
}

/// What one render took.
#[derive(Debug, Clone, Copy)]
pub struct RenderStats {
    /// Seconds on the engine thread, style targets included.
    pub engine_s: f64,
    /// Whether the style targets came from the cache.
    pub style_cached: bool,
}

struct Request {
    job: RenderJob,
    style: StyleKey,
    cancel: Arc<AtomicBool>,
    progress: watch::Sender<Option<Progress>>,
    reply: oneshot::Sender<Result<(RgbImage, RenderStats), stylefarm_engine::Error>>,
}

/// A handle to the engine thread; dropping it ends the thread.
pub struct EngineThread {
    requests: std::sync::mpsc::Sender<Request>,
}

impl EngineThread {
    /// Loads the weights on a new thread; returns once they are loaded (or failed to).
    pub fn start(
        weights: PathBuf,
        device: Device,
    ) -> Result<EngineThread, stylefarm_engine::Error> {
        let (requests, inbox) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("engine-{device:?}").to_lowercase())
            .spawn(move || {
                let engine = match Engine::load(&weights, device) {
                    Ok(engine) => {
                        let _ = ready_tx.send(Ok(()));
                        engine
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                tracing::info!(?device, "engine loaded");
                let mut cache = StyleCache::default();
                for req in inbox {
                    let started = Instant::now();
                    let hits = cache.hits;
                    let mut on_progress = |p: &Progress| {
                        let _ = req.progress.send(Some(*p));
                        if req.cancel.load(Ordering::Relaxed) {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    };
                    let params = &req.job.params;
                    let mut style_for = |engine: &Engine, side: u32| {
                        // the key names everything the Gram matrices depend on
                        let key = format!(
                            "{:?} blend={:?} side={side} layers={:?} pooling={:?} block={:?}",
                            req.style.styles,
                            params.blend_weights(req.style.styles.len()),
                            params.style_layers,
                            params.pooling,
                            req.style.block,
                        );
                        let global = cache.get(key.clone(), || {
                            engine.style_grams(&req.job.styles, side, params, req.style.block)
                        });
                        let Some((init, canvas)) = &req.style.tile_canvas else {
                            return Ok(global);
                        };
                        // a tile matches the global Grams in aggregate: its target keeps the tile's own
                        // deviation from the whole canvas at the start (from the coarser scale, rendered
                        // whole), so that the tiles' Grams average to the global ones
                        let alone = RenderParams {
                            style_blend: Vec::new(),
                            ..params.clone()
                        };
                        let longest = canvas.width().max(canvas.height());
                        let whole = cache.get(format!("canvas {init} {key}"), || {
                            engine.style_grams(
                                &[(**canvas).clone()],
                                longest,
                                &alone,
                                req.style.block,
                            )
                        });
                        let tile = req.job.init_image.as_ref().expect("a tile has its init");
                        let own = engine.style_grams(
                            std::slice::from_ref(tile),
                            tile.width().max(tile.height()),
                            &alone,
                            None,
                        );
                        Ok(Rc::new(global.offset(&own, &whole)))
                    };
                    let result = engine
                        .render_with(&req.job, &mut style_for, &mut on_progress)
                        .map(|img| {
                            let stats = RenderStats {
                                engine_s: started.elapsed().as_secs_f64(),
                                style_cached: cache.hits > hits,
                            };
                            (img, stats)
                        });
                    let _ = req.reply.send(result);
                }
            })
            .expect("spawn the engine thread");
        ready_rx.recv().unwrap_or_else(|_| {
            Err(stylefarm_engine::Error::Device("engine thread died".into()))
        })?;
        Ok(EngineThread { requests })
    }

    /// Queues a render; the receiver yields its result. Setting `cancel` stops it at the next iteration.
    pub fn render(
        &self,
        job: RenderJob,
        style: StyleKey,
        cancel: Arc<AtomicBool>,
        progress: watch::Sender<Option<Progress>>,
    ) -> oneshot::Receiver<Result<(RgbImage, RenderStats), stylefarm_engine::Error>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.requests.send(Request {
            job,
            style,
            cancel,
            progress,
            reply,
        });
        rx
    }
}
