//! The coordinator's part of a tiled job: when every task of a scale has succeeded, stitch the tiles with
//! their feathered weights (stylefarm_core::tiling), store the stitched image, and queue the next scale's
//! tiles with it as their init, or finish the job at the last scale.
//!
//! Stitching holds the canvas of the scale, one decoded tile and one band of tile rows in floats: never a
//! copy of the canvas per tile.

use std::collections::{HashMap, HashSet};
use std::io::Cursor;
use std::sync::Arc;
use std::time::Instant;

use image::{GrayImage, RgbImage};
use stylefarm_core::ids::{JobId, WorkerId};
use stylefarm_core::imaging;
use stylefarm_core::job::{ImageHash, ScalePart, ScaleTask};
use stylefarm_core::tiling::{self, TileSizing};

use crate::blobs::BlobReader;
use crate::decoding::farm_image_bytes;
use crate::model::{JobMeta, TaskRecord, TaskState};
use crate::workers::WorkerInfo;
use crate::{blocking, Coordinator, Error};

fn png(img: &RgbImage) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| Error::Internal(format!("encoding a PNG: {e}")))?;
    Ok(out)
}

/// What became of a scale whose tile ran out of memory ([`Coordinator::replan_out_of_memory`]).
enum Replan {
    /// Planned again: the number of its new tasks and their largest tile size.
    Planned(usize, u32),
    /// Kept as planned: its tiles fixed by the user or the smallest already, or the job moved on.
    Kept,
    /// To be planned once it can be: no worker to plan for now.
    Later,
}

/// The image sizes a coordinator keeps ([`Coordinator::dimensions`]; all forgotten when full).
const KEPT_SIZES: usize = 4096;

impl Coordinator {
    /// A stored image's file, opened for reading.
    fn stored(&self, hash: &ImageHash) -> Result<Box<dyn BlobReader>, Error> {
        self.blobs
            .open_blob(hash)?
            .ok_or_else(|| Error::Internal(format!("image {hash} missing from the blob store")))
    }

    /// A stored image's bytes.
    fn blob(&self, hash: &ImageHash) -> Result<Vec<u8>, Error> {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut self.stored(hash)?, &mut bytes)?;
        Ok(bytes)
    }

    /// A stored image, decoded.
    pub(crate) fn image(&self, hash: &ImageHash) -> Result<RgbImage, Error> {
        Ok(imaging::decode(&self.blob(hash)?, hash.as_str())?)
    }

    /// A succeeded task's result image, decoded.
    pub(crate) fn result_image(&self, task: &TaskRecord) -> Result<RgbImage, Error> {
        let hash = task
            .result
            .as_ref()
            .ok_or_else(|| Error::Internal(format!("task {} has no result", task.index)))?;
        self.image(hash)
    }

    /// The width and height of a stored image as decoded (EXIF orientation applied), from its header: no
    /// pixel is decoded. Kept for the images asked about lately (an image's bytes never change under its
    /// hash; a JPEG's header is read with its whole stream): each task's result is checked against its
    /// content's.
    pub(crate) fn dimensions(&self, hash: &ImageHash) -> Result<(u32, u32), Error> {
        let known = |d: &Self| {
            d.sizes
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(hash)
                .copied()
        };
        if let Some(size) = known(self) {
            return Ok(size);
        }
        let size = imaging::dimensions(self.stored(hash)?, hash.as_str())?;
        let mut sizes = self.sizes.lock().unwrap_or_else(|p| p.into_inner());
        if sizes.len() >= KEPT_SIZES {
            sizes.clear();
        }
        sizes.insert(hash.clone(), size);
        Ok(size)
    }

    /// The alpha channel of a stored content image, oriented as its pixels; `None` when it has none or is
    /// opaque (the header says whether to decode at all).
    pub(crate) fn content_alpha(&self, hash: &ImageHash) -> Result<Option<GrayImage>, Error> {
        if self.alpha_decode_bytes(hash)?.is_none() {
            return Ok(None);
        }
        self.decode_alpha(hash)
    }

    /// The bytes that decoding a stored image for its alpha channel takes
    /// ([`imaging::Header::decode_bytes`]), from its header; `None` when it has no alpha channel.
    fn alpha_decode_bytes(&self, hash: &ImageHash) -> Result<Option<u64>, Error> {
        let header = imaging::header(self.stored(hash)?, hash.as_str())?;
        Ok(header.alpha.then_some(header.decode_bytes))
    }

    /// The alpha channel of a stored image, decoded; `None` when it is opaque.
    fn decode_alpha(&self, hash: &ImageHash) -> Result<Option<GrayImage>, Error> {
        Ok(imaging::decode_full(&self.blob(hash)?, hash.as_str())?.alpha)
    }

    /// [`Coordinator::content_alpha`] on the blocking pool, its decode within the decode budget (the
    /// content may have many more pixels than the result it goes with).
    pub(crate) async fn content_alpha_in_budget(
        self: &Arc<Self>,
        hash: &ImageHash,
    ) -> Result<Option<GrayImage>, Error> {
        let (coordinator, content) = (self.clone(), hash.clone());
        let Some(bytes) = blocking(move || coordinator.alpha_decode_bytes(&content)).await? else {
            return Ok(None);
        };
        let share = self.decoding.share(bytes).await?;
        let (coordinator, content) = (self.clone(), hash.clone());
        blocking(move || {
            let alpha = coordinator.decode_alpha(&content);
            drop(share);
            alpha
        })
        .await
    }

    /// Stitches the finished scale of tiled job `job_id` and moves it on; a failure fails the job, unless
    /// a store was out of reach ([`Coordinator::stage_failed`]).
    pub(crate) fn finish_tiled_scale(&self, job_id: &JobId) {
        if let Err(e) = self.stitch_scale(job_id) {
            self.stage_failed(job_id, "stitching", e);
        }
    }

    fn stitch_scale(&self, job_id: &JobId) -> Result<(), Error> {
        let view = self.scheduler.get(job_id)?;
        let spec = &view.meta.spec;
        let scale = view.meta.stage_results.len() as u32;
        let tasks: Vec<_> = view
            .tasks
            .iter()
            .map(|(t, _)| t)
            // less the tasks a new plan replaced
            .filter(|t| t.spec.scale_index() == scale && t.state != TaskState::Cancelled)
            .collect();
        if tasks.is_empty() {
            return Ok(()); // already moved on
        }
        if tasks.iter().any(|t| !t.state.settled()) {
            return Ok(()); // planned again since: stitched once its new tiles are done
        }
        let started = std::time::Instant::now();
        // a stitch holds about what a decode of its canvas does, and the last one also decodes the content
        // (its colours, its alpha): it waits for that share of the decode budget, so that stitches of many
        // jobs at once do not take the coordinator's memory
        let (width, height, scales) = match (&tasks[0].spec.scale, &tasks[0].result) {
            (Some(first), _) => (first.canvas_width, first.canvas_height, first.scales),
            (None, Some(result)) => {
                let (width, height) = self.dimensions(result)?;
                (width, height, spec.pyramid_params()?.scales)
            }
            (None, None) => {
                return Err(Error::Internal(format!(
                    "task {} has no result",
                    tasks[0].index
                )))
            }
        };
        let last = scale + 1 == scales;
        // the next scale is planned for the workers present: with none live that the job may run on (a
        // coordinator just started, before its workers call again; every worker restarting; only workers
        // without its tags back yet) it would be cut into the smallest tiles for good. It waits for one, the
        // work tried again every [`crate::STAGE_RETRY`] (a job that its live workers are all blocklisted for
        // is planned, for [`Scheduler::fail_stranded`](crate::scheduler::Scheduler::fail_stranded) to fail)
        let planned = spec
            .kind
            .tiling()
            .is_some_and(|t| t.sizing == TileSizing::Planned);
        let may_run = |(_, tags): &(WorkerId, Vec<String>)| spec.runs_on(tags);
        if !last && planned && !self.workers.live().iter().any(may_run) {
            tracing::debug!(
                job_id = job_id.as_str(),
                scale = scale + 1,
                "no live worker to plan the next scale for: the stitch waits for one"
            );
            self.stage_deferred
                .store(true, std::sync::atomic::Ordering::SeqCst);
            return Ok(());
        }
        // the canvas and its tiles' results, and at the last scale the content's decode for its alpha
        let content_bytes = match last {
            true => self.alpha_decode_bytes(&spec.contents[0])?.unwrap_or(0),
            false => 0,
        };
        let share = self
            .decoding
            .share_blocking(farm_image_bytes(width, height).saturating_add(content_bytes))?;
        let stitched = match &tasks[0].spec.scale {
            // the first scale is one untiled task: its result is the scale's image
            None => self.result_image(tasks[0])?,
            // exact mode's shards: bands of the canvas' rows, pasted in place
            Some(first) if matches!(first.part, ScalePart::Shard { .. }) => {
                let (w, h) = (first.canvas_width, first.canvas_height);
                let mut canvas = RgbImage::new(w, h);
                let mut rows = 0u32;
                for task in &tasks {
                    let rect = task
                        .spec
                        .scale
                        .as_ref()
                        .map(ScaleTask::rect)
                        .ok_or_else(|| Error::Internal("a shard without its rows".into()))?;
                    let img = self.result_image(task)?;
                    if img.dimensions() != (rect.width, rect.height) || rect.width != w {
                        return Err(Error::Internal(format!(
                            "shard {}: {}x{}, its rows are {}x{}",
                            task.index,
                            img.width(),
                            img.height(),
                            rect.width,
                            rect.height
                        )));
                    }
                    image::imageops::replace(&mut canvas, &img, 0, i64::from(rect.y));
                    rows += rect.height;
                }
                if rows != h {
                    return Err(Error::Internal(format!(
                        "scale {}: the shards cover {rows} of {h} rows",
                        scale + 1
                    )));
                }
                canvas
            }
            Some(first) => {
                // the tile size the planner chose for this scale
                let job_tiling = spec.kind.tiling().ok_or_else(|| {
                    Error::Internal(format!("a {} job with scale tasks", spec.kind.name()))
                })?;
                let tiling = stylefarm_core::tiling::Tiling {
                    tile_size: first.block(),
                    ..job_tiling
                };
                let grid = tiling.grid(first.canvas_width, first.canvas_height);
                if grid.len() != tasks.len() {
                    return Err(Error::Internal(format!(
                        "scale {}: {} tiles, the plan has {}",
                        scale + 1,
                        tasks.len(),
                        grid.len()
                    )));
                }
                // the tiles' own errors travel through the stitcher's messages
                grid.stitch(|i| {
                    let (task, at) = tasks
                        .iter()
                        .find_map(|t| {
                            let x = t.spec.scale.as_ref()?;
                            (x.index() as usize == i).then(|| (*t, x.rect()))
                        })
                        .ok_or_else(|| Error::Internal(format!("tile {i} missing")))?;
                    // planned elsewhere (a job stored by a version that placed its tiles
                    // otherwise): blended at the grid's places, it would be shifted
                    if at != grid.tile(i) {
                        return Err(Error::Internal(format!(
                            "tile {i} is {at:?}, where the scale's grid has {:?}",
                            grid.tile(i)
                        )));
                    }
                    self.result_image(task)
                })?
            }
        };
        let stitched = if last && spec.params.original_colors {
            imaging::original_colors(&stitched, &self.image(&spec.contents[0])?)
        } else {
            stitched
        };
        let with_alpha = if last {
            self.content_alpha(&spec.contents[0])?
                .map(|alpha| imaging::png_with_alpha(&stitched, &alpha))
                .transpose()?
        } else {
            None
        };
        let encoded = match with_alpha {
            Some(encoded) => encoded,
            None => png(&stitched)?,
        };
        // spared by a garbage collection until it is recorded, with the next scale's tasks
        let using = self.blobs.begin_use();
        let hash = using.put(&encoded)?;
        drop(stitched);
        let next = if last {
            None
        } else {
            let memory = self.planning_memory(&view.meta);
            let max_tile = view.meta.max_tile_size;
            Some(self.plan_scale(&view.meta, scale + 1, &hash, &memory, max_tile)?)
        };
        let tiles = next.as_ref().map_or(0, Vec::len);
        let tile_size = next
            .as_ref()
            .and_then(|tasks| tasks.first()?.scale.as_ref())
            .map_or(0, |t| t.block());
        drop(share);
        let advanced = self.scheduler.finish_stage(job_id, scale, &hash, next)?;
        drop(using);
        tracing::info!(
            job_id = job_id.as_str(),
            scale = scale + 1,
            scales,
            width,
            height,
            stitched = %hash,
            next_tiles = tiles,
            next_tile_size = tile_size,
            advanced,
            seconds = started.elapsed().as_secs_f64(),
            "scale stitched"
        );
        Ok(())
    }

    /// The device memory of each worker that may take the tasks of the job of `meta` now: live, not drained,
    /// with the tags it asks for, not blocklisted by it; one per worker name, as many as the job may run on
    /// at once ([`for_max_workers`]). What its scales are planned for.
    pub(crate) fn planning_memory(&self, meta: &JobMeta) -> Vec<u64> {
        self.memory_for(meta, &HashSet::new())
    }

    /// [`Coordinator::planning_memory`], with the drained and leaving workers named in `running` counted
    /// too; when only drained workers may take the tasks, those (they are to come back: a plan for none
    /// would cut the smallest tiles for good), never the leaving ones
    /// ([`WorkerInfo::leaving`](crate::workers::WorkerInfo::leaving)).
    fn memory_for(&self, meta: &JobMeta, running: &HashSet<WorkerId>) -> Vec<u64> {
        let drained = self.scheduler.drained();
        let may_take = |id: &WorkerId, w: &WorkerInfo| {
            meta.spec.runs_on(&w.tags) && !self.scheduler.blocklists(meta, id)
        };
        let mut memory = self.workers.live_memory(|id, w| {
            let name = id.by_name();
            may_take(id, w) && ((!drained.contains(&name) && !w.leaving) || running.contains(&name))
        });
        if memory.is_empty() && !drained.is_empty() {
            memory = self
                .workers
                .live_memory(|id, w| may_take(id, w) && !w.leaving);
        }
        for_max_workers(memory, meta.spec.max_workers)
    }

    /// Plans again each exact-mode scale in progress that has had more shards than workers left to take
    /// them (one left for good, or was blocklisted by the job) for a lease period
    /// ([`SchedulerConfig::lease`](crate::scheduler::SchedulerConfig::lease): the time a worker has to
    /// be heard from, e.g. after a restart of the coordinator or a short break in the network): its
    /// shards would wait for each other until their call 0 gave up, and then again with every attempt.
    /// The scale is planned for the workers left
    /// ([`Scheduler::replan`](crate::scheduler::Scheduler::replan)): fewer shards, or one task on one
    /// worker. With no worker left at all, it waits for one. Called by the coordinator's loop.
    pub(crate) fn replan_shards(&self) {
        if self.scheduler.store_behind() {
            return; // nothing could be written
        }
        let grace = self.scheduler.config().lease;
        let mut short_since = self.short_of_workers.lock().unwrap();
        let mut still_short = HashMap::new();
        let scales = self.scheduler.sharded_scales();
        let leases = match scales.is_empty() {
            true => Vec::new(),
            false => self.scheduler.leases(),
        };
        for (meta, scale, shards) in scales {
            // a drained worker still counts while it runs one of the scale's shards (the only tasks of
            // the job that run in this stage): its shard goes on to the scale's end
            let running: HashSet<WorkerId> = leases
                .iter()
                .filter(|l| l.job_id == meta.id)
                .map(|l| l.worker.by_name())
                .collect();
            let memory = self.memory_for(&meta, &running);
            if memory.is_empty() || memory.len() >= shards as usize {
                continue;
            }
            let key = (meta.id.clone(), scale);
            let since = short_since.get(&key).copied().unwrap_or_else(Instant::now);
            if since.elapsed() < grace {
                still_short.insert(key, since);
                continue;
            }
            let job_id = &meta.id;
            match self.replan_scale(&meta, scale, shards, &memory) {
                Ok(Some(tasks)) => tracing::warn!(
                    job_id = job_id.as_str(),
                    scale = scale + 1,
                    shards,
                    tasks,
                    "scale planned again for the workers left"
                ),
                Ok(None) => {}
                Err(e) => tracing::error!(
                    job_id = job_id.as_str(),
                    scale = scale + 1,
                    error = %e,
                    "planning a scale again for the workers left"
                ),
            }
        }
        // a scale that has its workers again (or moved on) starts its wait over when next short
        *short_since = still_short;
    }

    /// The tasks of `scale` of the tiled job of `meta`, from `previous` (the scale before, stitched),
    /// planned for `memory` (the device memory of the workers that may take them) with tiles of at most
    /// `max_tile` px ([`stylefarm_core::job::JobSpec::scale_tasks`]).
    fn plan_scale(
        &self,
        meta: &JobMeta,
        scale: u32,
        previous: &ImageHash,
        memory: &[u64],
        max_tile: Option<u32>,
    ) -> Result<Vec<stylefarm_core::job::TaskSpec>, Error> {
        let (cw, ch) = self.dimensions(&meta.spec.contents[0])?;
        Ok(meta
            .spec
            .scale_tasks(cw, ch, scale, previous, memory, max_tile)?)
    }

    /// The stitched image of the scale a tiled job of `meta` last finished: the init of the scale it is at.
    fn scale_before<'a>(&self, meta: &'a JobMeta) -> Result<&'a ImageHash, Error> {
        meta.stage_results
            .last()
            .ok_or_else(|| Error::Internal("a later scale without the scale before".into()))
    }

    /// Plans again, in smaller tiles, each scale of a tiled job whose tile (or exact-mode block) ran out
    /// of a device's memory: the planner's estimate of its render did not hold on that device (the
    /// device shared with other work, a driver's own reserve, an estimate too low). The job's tiles are
    /// then at most three quarters of the side that ran out, this scale's and its later scales'
    /// ([`tiling::max_tile_after_out_of_memory`]). A job whose tile size the user fixed (`--tile-size`),
    /// or whose tiles are already the smallest the planner cuts, keeps its plan: its task is retried as
    /// any out-of-memory failure is (on another worker first). OpenCue retries a frame that ran out of
    /// memory with more; a tile can be made smaller instead. Called by the coordinator's loop.
    pub(crate) fn replan_out_of_memory(&self) {
        for (meta, task) in self.scheduler.take_ran_out() {
            let job_id = meta.id.as_str();
            let scale = task.spec.scale_index();
            match self.replan_smaller(&meta, &task) {
                Ok(Replan::Planned(tasks, max_tile_size)) => tracing::warn!(
                    job_id,
                    scale = scale + 1,
                    task = task.index,
                    tasks,
                    max_tile_size,
                    "a tile ran out of memory: its scale planned again in smaller tiles"
                ),
                Ok(Replan::Kept) => {}
                Ok(Replan::Later) => self.scheduler.hand_back_ran_out(&meta.id, task.index),
                Err(e) if e.blobs_away() || e.store_away() => {
                    tracing::warn!(
                        job_id,
                        scale = scale + 1,
                        error = %e,
                        "planning a scale again in smaller tiles: a store is out of reach; tried again"
                    );
                    self.scheduler.hand_back_ran_out(&meta.id, task.index);
                }
                // not worth trying again every turn of the loop: the task is retried at its size, as any
                // out-of-memory failure is
                Err(e) => tracing::error!(
                    job_id,
                    scale = scale + 1,
                    error = %e,
                    "planning a scale again in smaller tiles failed; the tile is retried at its size"
                ),
            }
        }
    }

    /// [`Coordinator::replan_out_of_memory`] for the scale of `ran_out`, a task of the job of `meta`.
    fn replan_smaller(&self, meta: &JobMeta, ran_out: &TaskRecord) -> Result<Replan, Error> {
        let spec = &meta.spec;
        let (Some(tiling), Some(part)) = (spec.kind.tiling(), ran_out.spec.scale.as_ref()) else {
            return Ok(Replan::Kept);
        };
        if tiling.sizing != TileSizing::Planned {
            return Ok(Replan::Kept);
        }
        let memory = self.planning_memory(meta);
        if memory.is_empty() {
            // no worker that may take it now: planned for those that come (the planner would cut its
            // smallest tiles, for good)
            return Ok(Replan::Later);
        }
        let scale = part.scale;
        let max_tile_size = tiling::max_tile_after_out_of_memory(part.block());
        let previous = self.scale_before(meta)?;
        let tasks = self.plan_scale(meta, scale, previous, &memory, Some(max_tile_size))?;
        let planned = tasks
            .iter()
            .filter_map(|t| Some(t.scale.as_ref()?.block()))
            .max()
            .unwrap_or(0);
        if planned >= part.block() {
            return Ok(Replan::Kept); // the smallest tiles already
        }
        let reason = format!(
            "replaced: {} ran out of a device's memory on {}; the scale was planned again in tiles of at \
             most {planned} px",
            ran_out.spec.label,
            ran_out.out_of_memory_on.join(", "),
        );
        let count = tasks.len();
        let replanned = self.scheduler.replan_smaller(
            &meta.id,
            scale,
            ran_out.index,
            tasks,
            planned,
            &reason,
        )?;
        Ok(if replanned {
            Replan::Planned(count, planned)
        } else {
            Replan::Kept
        })
    }

    /// [`Coordinator::replan_shards`] for one scale of the job of `meta`, for workers with `memory`: the
    /// number of its new tasks, or `None` when it keeps its shards.
    fn replan_scale(
        &self,
        meta: &JobMeta,
        scale: u32,
        shards: u32,
        memory: &[u64],
    ) -> Result<Option<usize>, Error> {
        let previous = self.scale_before(meta)?;
        let tasks = self.plan_scale(meta, scale, previous, memory, meta.max_tile_size)?;
        let count = tasks.len();
        let reason = format!(
            "replaced: the scale was planned again for the {} worker(s) left of the {shards} its shards \
             were planned for",
            memory.len()
        );
        Ok(self
            .scheduler
            .replan(&meta.id, scale, shards, tasks, &reason)?
            .then_some(count))
    }
}

/// The workers' `memory` a job with `max_workers` (0: no limit) is planned for: at most that many, so that
/// its tiles are not cut smaller for workers it will not run on at once; the smallest known memory among
/// them kept, as any of them may take a tile (unknown memory, 0, last).
fn for_max_workers(mut memory: Vec<u64>, max_workers: u32) -> Vec<u64> {
    let limit = max_workers as usize;
    if limit > 0 && memory.len() > limit {
        memory.sort_unstable_by_key(|&m| (m == 0, m));
        memory.truncate(limit);
    }
    memory
}

#[cfg(test)]
mod tests {
    use super::for_max_workers;

    #[test]
    fn a_job_with_max_workers_is_planned_for_that_many_keeping_the_smallest_device() {
        const GIB: u64 = 1 << 30;
        let farm = vec![80 * GIB, 0, 24 * GIB, 40 * GIB];
        assert_eq!(for_max_workers(farm.clone(), 0), farm);
        assert_eq!(for_max_workers(farm.clone(), 4), farm);
        assert_eq!(for_max_workers(farm.clone(), 2), [24 * GIB, 40 * GIB]);
        assert_eq!(for_max_workers(farm, 1), [24 * GIB]);
        assert_eq!(for_max_workers(vec![0, 0], 1), [0]);
    }
}
