//! The engine on its own OS thread: it loads VGG19 once and keeps it warm; async code sends it renders over a
//! channel and awaits the result (libtorch never blocks the async runtime; `Tensor` is not `Sync`).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use image::RgbImage;
use stylefarm_engine::{Device, Engine, Progress, RenderJob};
use tokio::sync::{oneshot, watch};

struct Request {
    job: RenderJob,
    cancel: Arc<AtomicBool>,
    progress: watch::Sender<Option<Progress>>,
    reply: oneshot::Sender<Result<RgbImage, stylefarm_engine::Error>>,
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
                for req in inbox {
                    let mut on_progress = |p: &Progress| {
                        let _ = req.progress.send(Some(*p));
                        if req.cancel.load(Ordering::Relaxed) {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    };
                    let _ = req.reply.send(engine.render(&req.job, &mut on_progress));
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
        cancel: Arc<AtomicBool>,
        progress: watch::Sender<Option<Progress>>,
    ) -> oneshot::Receiver<Result<RgbImage, stylefarm_engine::Error>> {
        let (reply, rx) = oneshot::channel();
        let _ = self.requests.send(Request {
            job,
            cancel,
            progress,
            reply,
        });
        rx
    }
}
