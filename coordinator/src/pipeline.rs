//! Job pipelines: the coordinator's own work between a job's stages, behind one hook,
//! [`Coordinator::stage_done`], which runs once every task of a stage succeeded. A sweep's one stage ends
//! with its contact sheet (`sheet.rs`); each scale of a tiled job ends with its stitch and the next
//! scale's tiles (`tiled.rs`). The scheduler knows only whether a kind has such work
//! ([`JobKind::has_stage_work`]); the gRPC services only call the hook.

use stylefarm_core::ids::JobId;
use stylefarm_core::job::JobKind;

use crate::{sheet, Coordinator, Error};

impl Coordinator {
    /// The hook the scheduler's "every task of the job's stage succeeded" reaches (after a completion, and
    /// for jobs left at that point by a restart): the job kind's stage work ([`JobKind::has_stage_work`]).
    pub(crate) fn stage_done(&self, job_id: &JobId) {
        fail::fail_point!("coordinator-stage-work");
        let Ok(view) = self.scheduler.get(job_id) else {
            return;
        };
        match view.meta.spec.kind {
            JobKind::Sweep(_) => self.finish_sweep(job_id),
            JobKind::Tiled(_) => self.finish_tiled_scale(job_id),
            _ => {}
        }
    }

    /// When a sweep job has succeeded: composes its contact sheet, stores it and records it on the job.
    fn finish_sweep(&self, job_id: &JobId) {
        let Ok(view) = self.scheduler.get(job_id) else {
            return;
        };
        if !matches!(view.meta.spec.kind, JobKind::Sweep(_)) {
            return;
        }
        let tiles: Result<Vec<_>, Error> = view
            .tasks
            .iter()
            .map(|(t, _)| Ok((self.result_image(t)?, t.spec.label.clone())))
            .collect();
        let using = self.blobs.begin_use();
        let stored = tiles
            .and_then(|tiles| sheet::contact_sheet(&tiles))
            .and_then(|png| Ok(using.put(&png)?));
        match stored {
            Ok(hash) => {
                // the sweep's one stage: its contact sheet is the job's result
                if let Err(e) = self.scheduler.finish_stage(job_id, 0, &hash, None) {
                    tracing::error!(
                        job_id = job_id.as_str(),
                        error = %e,
                        "recording the contact sheet"
                    );
                }
            }
            Err(e) => self.stage_failed(job_id, "contact sheet", e),
        }
    }

    /// A stage's work that failed: with a store out of reach the job waits at its stage, and the work is
    /// tried again: for the blob store every [`crate::STAGE_RETRY`] ([`Coordinator::stage_deferred`]), for
    /// the job store once it answers (`serve`'s loop steps the jobs awaiting a step then); any other error
    /// fails the job, naming `what` failed.
    pub(crate) fn stage_failed(&self, job_id: &JobId, what: &str, e: Error) {
        let blobs_away = matches!(&e, Error::Io(io) if crate::out_of_reach(io));
        let store_away = matches!(&e, Error::Store(s) if s.is_unavailable());
        if blobs_away || store_away {
            tracing::warn!(
                job_id = job_id.as_str(),
                error = %e,
                "{what}: a store is out of reach; the job waits and the work is tried again"
            );
            if blobs_away {
                self.stage_deferred
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        } else {
            tracing::error!(job_id = job_id.as_str(), error = %e, "{what}");
            let _ = self.scheduler.fail_job(job_id, &format!("{what}: {e}"));
        }
    }
}
