//! Job pipelines: the coordinator's own work between a job's stages, behind one hook,
//! [`Coordinator::stage_done`], which runs once every task of a stage succeeded. A sweep's one stage ends
//! with its contact sheet (`sheet.rs`); each scale of a tiled job ends with its stitch and the next
//! scale's tiles (`tiled.rs`); each stage of a video job with its chunks' next frames. The scheduler
//! knows only whether a kind has such work ([`JobKind::has_stage_work`]); the gRPC services only call the
//! hook.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use stylefarm_core::ids::JobId;
use stylefarm_core::job::JobKind;

use crate::model::TaskState;
use crate::{sheet, Coordinator, Error};

/// Whether a job's step is to run: it has not ended, and its stage's tasks are done
/// ([`TaskState::stage_done`]).
fn at_stage(view: &crate::scheduler::JobView) -> bool {
    !view.meta.state.is_terminal()
        && TaskState::stage_done(&view.meta.spec, view.tasks.iter().map(|(t, _)| t.state))
}

/// The colour of a failed (or cancelled) variant's cell in a keep-going sweep's contact sheet: a mid grey.
const FAILED_CELL: [u8; 3] = [128, 128, 128];

/// Work done one run at a time per key: a call while the key's work runs returns at once and has that
/// work run once more after the run under way (calls meanwhile fold into that one run).
pub(crate) struct OneAtATime<K> {
    /// The keys whose work runs, each with whether it was asked for again meanwhile.
    running: Mutex<HashMap<K, bool>>,
}

impl<K> Default for OneAtATime<K> {
    fn default() -> Self {
        OneAtATime {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> OneAtATime<K> {
    /// Runs `work` for `key` now, or has it run again by the call whose run is under way.
    pub(crate) fn run(&self, key: &K, mut work: impl FnMut()) {
        let lock = || self.running.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut running = lock();
            if let Some(again) = running.get_mut(key) {
                *again = true;
                return;
            }
            running.insert(key.clone(), false);
        }
        loop {
            work();
            let mut running = lock();
            match running.get_mut(key) {
                Some(again) if *again => *again = false,
                _ => {
                    running.remove(key);
                    return;
                }
            }
        }
    }
}

impl Coordinator {
    /// The hook the scheduler's "every task of the job's stage succeeded" reaches (after a completion, and
    /// for jobs left at that point by a restart or a store out of reach): the job kind's stage work
    /// ([`JobKind::has_stage_work`]). One run at a time per job: a call while one runs makes it run once
    /// more after (it may have read the job before the stage's last task was done), not a second stitch
    /// beside it.
    /// A panic in the work fails the job, naming it, rather than leaving the job running with no step
    /// to come (and this job's later calls folded into a run that ended).
    pub(crate) fn stage_done(&self, job_id: &JobId) {
        self.stepping.run(job_id, || {
            let work = std::panic::AssertUnwindSafe(|| self.stage_work(job_id));
            if let Err(payload) = std::panic::catch_unwind(work) {
                let message = stylefarm_core::panic_message(payload.as_ref());
                let e = Error::Internal(format!("panicked: {message}"));
                self.stage_failed(job_id, "stage work", e);
            }
        });
    }

    fn stage_work(&self, job_id: &JobId) {
        fail::fail_point!("coordinator-stage-work");
        let Ok(view) = self.scheduler.get(job_id) else {
            return;
        };
        // a sweep's or a tiled scale's work once every task of the stage succeeded (or was replaced by a new
        // plan, TaskState::settled) in a job that goes on: a call at another time (a second call while a
        // run queued the next scale's tiles, or after the job ended) has nothing to do
        let at_stage = at_stage(&view);
        match view.meta.spec.kind {
            JobKind::Sweep(_) if at_stage => self.finish_sweep(job_id),
            JobKind::Tiled(_) if at_stage => self.finish_tiled_scale(job_id),
            JobKind::Video(_) => self.next_frames(job_id),
            _ => {}
        }
    }

    /// After a frame of a video job succeeded: queues the next frame of each chunk whose frame is
    /// rendered ([`stylefarm_core::job::JobSpec::next_frames`]: a chunk goes on without waiting for the
    /// others), or, once every frame is rendered, completes the job with the last frame as its result.
    fn next_frames(&self, job_id: &JobId) {
        let Ok(view) = self.scheduler.get(job_id) else {
            return;
        };
        if view.meta.state.is_terminal() {
            return;
        }
        let tasks = view.tasks.iter().map(|(t, _)| (&t.spec, t.result.as_ref()));
        let next = match view.meta.spec.next_frames(tasks) {
            Ok(next) => next,
            Err(e) => return self.stage_failed(job_id, "next frames", e.into()),
        };
        if !next.is_empty() {
            let frames: Vec<u32> = next
                .iter()
                .filter_map(|t| Some(t.frame.as_ref()?.index.saturating_add(1)))
                .collect();
            match self.scheduler.add_frames(job_id, next) {
                Ok(added) if added > 0 => {
                    tracing::info!(job_id = job_id.as_str(), ?frames, "video frames queued")
                }
                Ok(_) => {}
                Err(e) => self.stage_failed(job_id, "queueing the next frames", e.into()),
            }
            return;
        }
        let all_done = view.tasks.iter().all(|(t, _)| t.result.is_some());
        // the video's last frame: its result is the job's
        let last = view
            .tasks
            .iter()
            .max_by_key(|(t, _)| t.spec.frame.as_ref().map_or(0, |f| f.index))
            .and_then(|(t, _)| t.result.clone());
        if let (true, Some(last)) = (all_done, last) {
            match self.scheduler.finish_stage(job_id, 0, &last, None) {
                Ok(true) => tracing::info!(job_id = job_id.as_str(), "video rendered"),
                Ok(false) => {}
                Err(e) => self.stage_failed(job_id, "recording the video's end", e.into()),
            }
        }
    }

    /// When a sweep job's variants have rendered: composes its contact sheet, stores it and records it on
    /// the job, which succeeds; in a keep-going sweep with failed (or cancelled) variants, their cells are
    /// grey, labelled failed (or cancelled), and the job fails (or is cancelled) with the sheet kept
    /// ([`Scheduler::finish_stage`]).
    ///
    /// [`Scheduler::finish_stage`]: crate::scheduler::Scheduler::finish_stage
    fn finish_sweep(&self, job_id: &JobId) {
        let Ok(view) = self.scheduler.get(job_id) else {
            return;
        };
        // read again: the stage may have moved on since the step began
        if !matches!(view.meta.spec.kind, JobKind::Sweep(_)) || !at_stage(&view) {
            return;
        }
        // the results' sizes from their headers; then each decoded in turn, as the sheet takes it. A
        // failed variant's cell is the size of the first rendered one's.
        let sizes: Result<Vec<Option<(u32, u32)>>, Error> = view
            .tasks
            .iter()
            .map(|(t, _)| match (&t.result, t.state) {
                (Some(hash), _) => Ok(Some(self.dimensions(hash)?)),
                (None, TaskState::Failed | TaskState::Cancelled) => Ok(None),
                (None, _) => Err(Error::Internal(format!("task {} has no result", t.index))),
            })
            .collect();
        let cells = sizes.and_then(|sizes| {
            let rendered = sizes.iter().flatten().next().copied().ok_or_else(|| {
                Error::Internal("no variant rendered: there is no contact sheet to make".into())
            })?;
            Ok(view
                .tasks
                .iter()
                .zip(sizes)
                .map(|((t, _), size)| match size {
                    Some((w, h)) => (w, h, t.spec.label.clone()),
                    None => (
                        rendered.0,
                        rendered.1,
                        format!("{} ({})", t.spec.label, t.state.name()),
                    ),
                })
                .collect::<Vec<_>>())
        });
        let using = self.blobs.begin_use();
        let stored = cells
            .and_then(|cells| {
                sheet::contact_sheet(&cells, |i| {
                    let (w, h, _) = cells[i];
                    match &view.tasks[i].0 {
                        t if t.result.is_none() => {
                            Ok(image::RgbImage::from_pixel(w, h, image::Rgb(FAILED_CELL)))
                        }
                        // each variant decoded within the decode budget, as a stitch's tiles are
                        t => {
                            let _share = self
                                .decoding
                                .share_blocking(crate::decoding::farm_image_bytes(w, h))?;
                            self.result_image(t)
                        }
                    }
                })
            })
            .and_then(|png| Ok(using.put(&png)?));
        match stored {
            Ok(hash) => {
                // the sweep's one stage: its contact sheet is the job's result (not recorded for a store
                // out of reach: tried again, as a stitch is)
                if let Err(e) = self.scheduler.finish_stage(job_id, 0, &hash, None) {
                    self.stage_failed(job_id, "recording the contact sheet", e.into());
                }
            }
            Err(e) => self.stage_failed(job_id, "contact sheet", e),
        }
    }

    /// A stage's work that failed: with a store out of reach the job waits at its stage, and the work is
    /// tried again every [`crate::STAGE_RETRY`] ([`Coordinator::stage_deferred`]; for the job store, once it
    /// holds no write back); any other error fails the job, naming `what` failed.
    pub(crate) fn stage_failed(&self, job_id: &JobId, what: &str, e: Error) {
        let (blobs_away, store_away) = (e.blobs_away(), e.store_away());
        if blobs_away || store_away {
            tracing::warn!(
                job_id = job_id.as_str(),
                error = %e,
                "{what}: a store is out of reach; the job waits and the work is tried again"
            );
            self.stage_deferred
                .store(true, std::sync::atomic::Ordering::SeqCst);
        } else {
            tracing::error!(job_id = job_id.as_str(), error = %e, "{what}");
            let _ = self.scheduler.fail_job(job_id, &format!("{what}: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
    use std::sync::Arc;
    use std::time::Duration;

    use super::OneAtATime;

    /// Calls while a key's work runs do not run it beside that run: they fold into one more run after it;
    /// another key's work runs beside.
    #[test]
    fn work_runs_one_at_a_time_per_key_and_once_more_when_asked_meanwhile() {
        let once = Arc::new(OneAtATime::default());
        let (runs, running, most) = (
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicU32::new(0)),
            Arc::new(AtomicU32::new(0)),
        );
        let call = |key: &'static str| {
            let (once, runs, running, most) =
                (once.clone(), runs.clone(), running.clone(), most.clone());
            std::thread::spawn(move || {
                once.run(&key, || {
                    let now = running.fetch_add(1, SeqCst) + 1;
                    most.fetch_max(now, SeqCst);
                    std::thread::sleep(Duration::from_millis(600));
                    running.fetch_sub(1, SeqCst);
                    runs.fetch_add(1, SeqCst);
                })
            })
        };
        let first = call("job-1");
        std::thread::sleep(Duration::from_millis(100));
        let others: Vec<_> = (0..3).map(|_| call("job-1")).collect();
        for other in others {
            other.join().unwrap();
        }
        assert_eq!(runs.load(SeqCst), 0, "the calls meanwhile returned at once");
        let another = call("job-2");
        first.join().unwrap();
        another.join().unwrap();
        assert_eq!(
            runs.load(SeqCst),
            3,
            "job-1 twice (once more for the calls meanwhile), job-2 once"
        );
        assert_eq!(
            most.load(SeqCst),
            2,
            "job-2 beside job-1, never job-1 beside itself"
        );
        call("job-1").join().unwrap();
        assert_eq!(runs.load(SeqCst), 4, "a later call runs again");
    }
}
