//! The coordinator's Prometheus metrics, as text for an HTTP scrape ([`crate::Coordinator::metrics_text`];
//! the CLI serves it on `--metrics-listen`). Events are counted as they happen ([`SchedulerMetrics`]);
//! the state (queue, tasks, jobs, workers, blob bytes) is read at each scrape.
//!
//! | metric | type | labels | what |
//! | --- | --- | --- | --- |
//! | `stylefarm_queue_depth` | gauge | `priority` | pending tasks a worker may start (ready or backing off); at most [`MAX_SERIES`] priorities, the others added up under `(other)`; priority `0` at 0 when none is queued |
//! | `stylefarm_held_tasks` | gauge | `reason` (`paused`, `waiting`, `max_workers`) | pending tasks of jobs paused, waiting for the jobs they are after, or past their job's `--max-workers`: no worker starts them now (every reason, 0 included) |
//! | `stylefarm_open_tasks` | gauge | `worker_tags` | tasks queued (not held) or running, by their job's worker tags (every tag set: a pool of tagged workers scales on its own); the untagged jobs' (`""`) always there |
//! | `stylefarm_tasks` | gauge | `state` | tasks of the jobs held, by state (every state, 0 included) |
//! | `stylefarm_jobs` | gauge | `state` | jobs held, by state (every state, 0 included) |
//! | `stylefarm_workers` | gauge | `state` (`live`, `drained`, `leaving`, `silent`, `left`) | workers (by name) heard from within a minute (and not lost since: a lease of theirs ran out) that may take work, those of them drained (`stylefarm drain`), those of them stopping (a SIGTERM: they finish their task, then sign off), those that signed off as they stopped, and the others |
//! | `stylefarm_lease_expiries_total` | counter | | leases that lapsed without a heartbeat |
//! | `stylefarm_task_stalls_total` | counter | | leases taken back from a task whose progress did not move for `--task-stall-secs` |
//! | `stylefarm_task_retries_total` | counter | `kind` | failed attempts sent back to the queue |
//! | `stylefarm_blocklist_events_total` | counter | | a worker reaching the strikes threshold on a job |
//! | `stylefarm_job_retries_total` | counter | | failed or cancelled jobs run again by their clients (RetryJob), and running keep-going batches or sweeps whose failed tasks they queued again |
//! | `stylefarm_task_seconds` | histogram | | lease to accepted result, s |
//! | `stylefarm_notifications_total` | counter | `outcome` (`delivered`, `refused`, `gave_up`) | job-end notifications ([`crate::notify`]) by how their delivery ended |
//! | `stylefarm_blob_store_bytes` | gauge | | bytes of images stored (S3: as [`crate::blobs::BlobStore::stored_bytes`] says) |
//! | `stylefarm_blobs_collected_total` | counter | | blobs deleted by the garbage collection, and task checkpoints deleted once replaced or done ([`crate::gc`]) |
//! | `stylefarm_blob_bytes_collected_total` | counter | | their bytes |
//! | `stylefarm_connections_open` | gauge | | gRPC connections served now ([`crate::connections`]) |
//! | `stylefarm_connections_refused_total` | counter | | connections closed as they came: as many were open as `--max-connections` (or, from their address, `--max-connections-per-source`) allows |

use std::collections::{BTreeMap, HashSet};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use stylefarm_core::ids::WorkerId;

use crate::model::{JobState, TaskState};
use crate::scheduler::Held;
use crate::Coordinator;

/// A metric's labels: (name, value) pairs.
pub type Labels = Vec<(String, String)>;

pub(crate) fn label(name: &str, value: impl ToString) -> Labels {
    vec![(name.to_string(), value.to_string())]
}

/// The most priorities `stylefarm_queue_depth` shows at a scrape. Priorities come from clients: each job
/// could otherwise add a series of its own (a time series database keeps each for hours).
pub const MAX_SERIES: usize = 20;

/// `counts` by label value, at most [`MAX_SERIES`] of them: the largest counts (ties by value), the rest
/// added up under `(other)`, a value no priority can have.
fn capped(counts: BTreeMap<String, usize>) -> BTreeMap<String, usize> {
    if counts.len() <= MAX_SERIES {
        return counts;
    }
    let mut largest: Vec<(String, usize)> = counts.into_iter().collect();
    largest.sort_by(|(a, m), (b, n)| n.cmp(m).then_with(|| a.cmp(b)));
    let rest: usize = largest.drain(MAX_SERIES - 1..).map(|(_, n)| n).sum();
    let mut kept: BTreeMap<String, usize> = largest.into_iter().collect();
    kept.insert("(other)".into(), rest);
    kept
}

/// What the scheduler counts as it happens (cheap atomics, shared with the registry).
#[derive(Debug)]
pub struct SchedulerMetrics {
    /// Leases that lapsed without a heartbeat.
    pub lease_expiries: Counter,
    /// Leases taken back from a task whose progress stalled ([`crate::SchedulerConfig::task_stall`]).
    pub task_stalls: Counter,
    /// Failed attempts sent back to the queue, by failure kind.
    pub retries: Family<Labels, Counter>,
    /// A worker reaching [`crate::SchedulerConfig::blocklist_after`] strikes on a job.
    pub blocklisted: Counter,
    /// Failed or cancelled jobs run again ([`crate::scheduler::Scheduler::retry`]).
    pub job_retries: Counter,
    /// Lease to accepted result, in seconds.
    pub task_seconds: Histogram,
    /// Job-end notifications ([`crate::notify`]), by how their delivery ended.
    pub notifications: Family<Labels, Counter>,
}

impl Default for SchedulerMetrics {
    fn default() -> Self {
        SchedulerMetrics {
            lease_expiries: Counter::default(),
            task_stalls: Counter::default(),
            retries: Family::default(),
            blocklisted: Counter::default(),
            job_retries: Counter::default(),
            // 0.1 s to about 14 min
            task_seconds: Histogram::new(exponential_buckets(0.1, 2.0, 14)),
            notifications: Family::default(),
        }
    }
}

impl SchedulerMetrics {
    /// Counts a retry of kind `kind`.
    pub(crate) fn retry(&self, kind: &str) {
        self.retries.get_or_create(&label("kind", kind)).inc();
    }
}

/// The registry and the gauges read at each scrape.
pub(crate) struct Metrics {
    registry: Registry,
    queue_depth: Family<Labels, Gauge>,
    held_tasks: Family<Labels, Gauge>,
    open_tasks: Family<Labels, Gauge>,
    tasks: Family<Labels, Gauge>,
    jobs: Family<Labels, Gauge>,
    workers: Family<Labels, Gauge>,
    blob_bytes: Gauge,
}

impl Metrics {
    pub(crate) fn new(
        scheduler: &SchedulerMetrics,
        blobs: &crate::gc::TrackedBlobs,
        connections: &crate::connections::ConnectionMetrics,
    ) -> Metrics {
        let mut registry = Registry::with_prefix("stylefarm");
        let metrics = Metrics {
            queue_depth: Family::default(),
            held_tasks: Family::default(),
            open_tasks: Family::default(),
            tasks: Family::default(),
            jobs: Family::default(),
            workers: Family::default(),
            blob_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "queue_depth",
            "Pending tasks a worker may start (ready or backing off), by job priority",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "held_tasks",
            "Pending tasks no worker starts now: their job is paused, waits for the jobs it is after, or \
             runs as many tasks as its max_workers",
            metrics.held_tasks.clone(),
        );
        registry.register(
            "open_tasks",
            "Tasks queued (not held) or running, by the worker tags their job asks for (empty: any worker)",
            metrics.open_tasks.clone(),
        );
        registry.register(
            "tasks",
            "Tasks of the jobs held, by state",
            metrics.tasks.clone(),
        );
        registry.register("jobs", "Jobs held, by state", metrics.jobs.clone());
        registry.register(
            "workers",
            "Workers heard from within a minute and not lost since (live; of those, drained, and leaving: \
             stopping), signed off (left), or neither (silent)",
            metrics.workers.clone(),
        );
        registry.register(
            "lease_expiries",
            "Leases that lapsed without a heartbeat",
            scheduler.lease_expiries.clone(),
        );
        registry.register(
            "task_stalls",
            "Leases taken back from a task whose progress did not move for --task-stall-secs",
            scheduler.task_stalls.clone(),
        );
        registry.register(
            "task_retries",
            "Failed attempts sent back to the queue, by failure kind",
            scheduler.retries.clone(),
        );
        registry.register(
            "blocklist_events",
            "Workers reaching the strikes threshold on a job",
            scheduler.blocklisted.clone(),
        );
        registry.register(
            "job_retries",
            "Jobs run again by their clients (RetryJob), or their failed tasks (keep-going batches, sweeps)",
            scheduler.job_retries.clone(),
        );
        registry.register(
            "task_seconds",
            "Lease to accepted result, in seconds",
            scheduler.task_seconds.clone(),
        );
        registry.register(
            "notifications",
            "Job-end notifications (--notify-url), by how their delivery ended: delivered, refused (a 4xx \
             answer) or gave_up",
            scheduler.notifications.clone(),
        );
        registry.register(
            "blob_store_bytes",
            "Bytes of images in the blob store (S3: at the last listing, and stored or deleted since)",
            metrics.blob_bytes.clone(),
        );
        registry.register(
            "blobs_collected",
            "Blobs deleted by the garbage collection, and task checkpoints deleted once replaced or done: no \
             job referred to them",
            blobs.collected.clone(),
        );
        registry.register(
            "blob_bytes_collected",
            "Bytes of the blobs deleted by the garbage collection, and of task checkpoints deleted",
            blobs.collected_bytes.clone(),
        );
        registry.register(
            "connections_open",
            "gRPC connections served now",
            connections.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed as they came: as many were open as --max-connections (or, from their \
             address, --max-connections-per-source) allows",
            connections.refused.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// The metrics as Prometheus text (OpenMetrics), the state read now.
    pub(crate) fn text(&self, coordinator: &Coordinator) -> String {
        let counts = coordinator.scheduler.counts();
        let set = |family: &Family<Labels, Gauge>, name: &str, values: BTreeMap<String, usize>| {
            family.clear();
            for (value, n) in values {
                family.get_or_create(&label(name, value)).set(n as i64);
            }
        };
        // every state, 0 included: an idle farm's dashboard shows 0, not "no data"
        let with_every = |names: &[&str], mut counts: BTreeMap<String, usize>| {
            for name in names {
                counts.entry((*name).to_string()).or_default();
            }
            counts
        };
        // a series at 0 when nothing is queued (the default priority's, 0: the protocol's zero value), and
        // the untagged jobs' always: an autoscaler's query reads 0, not "no data"
        let mut queued = capped(counts.queue_by_priority);
        if queued.is_empty() {
            queued.insert("0".into(), 0);
        }
        set(&self.queue_depth, "priority", queued);
        let reasons = Held::ALL.map(Held::name);
        set(
            &self.held_tasks,
            "reason",
            with_every(&reasons, counts.held_by_reason),
        );
        set(
            &self.open_tasks,
            "worker_tags",
            with_every(&[""], counts.open_by_worker_tags),
        );
        let task_states = TaskState::ALL.map(TaskState::name);
        set(
            &self.tasks,
            "state",
            with_every(&task_states, counts.tasks_by_state),
        );
        let job_states = JobState::ALL.map(JobState::name);
        set(
            &self.jobs,
            "state",
            with_every(&job_states, counts.jobs_by_state),
        );
        let (live, silent, left) = coordinator.workers.live_silent_left();
        // by name, as the live ones are counted: leaving, those whose live registrations all said they
        // are stopping (drained or not); drained, the others drained
        let leaving_ids = coordinator.workers.leaving();
        let (leaving_now, staying): (Vec<_>, Vec<_>) = (coordinator.workers.live().into_iter())
            .map(|(id, _)| id)
            .partition(|id| leaving_ids.contains(id));
        let staying: HashSet<WorkerId> = staying.iter().map(WorkerId::by_name).collect();
        let leaving: HashSet<WorkerId> = (leaving_now.iter().map(WorkerId::by_name))
            .filter(|name| !staying.contains(name))
            .collect();
        let drained = (coordinator.live_workers().1.iter())
            .map(|(id, _)| id.by_name())
            .filter(|name| !leaving.contains(name))
            .collect::<HashSet<_>>()
            .len();
        let leaving = leaving.len();
        set(
            &self.workers,
            "state",
            BTreeMap::from([
                ("live".into(), live.saturating_sub(drained + leaving)),
                ("drained".into(), drained),
                ("leaving".into(), leaving),
                ("silent".into(), silent),
                ("left".into(), left),
            ]),
        );
        self.blob_bytes
            .set(i64::try_from(coordinator.blobs.stored_bytes()).unwrap_or(i64::MAX));
        let mut out = String::new();
        // writing to a String cannot fail
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Priorities past MAX_SERIES are added up under `(other)`, the largest kept; fewer are
    /// left as they are.
    #[test]
    fn a_gauge_has_at_most_max_series_label_values() {
        let few = BTreeMap::from([("0".to_string(), 3), ("7".to_string(), 1)]);
        assert_eq!(capped(few.clone()), few);
        // priorities 0..100, priority p with p + 1 tasks: 100 series, 5050 tasks
        let many: BTreeMap<String, usize> = (0..100).map(|p| (p.to_string(), p + 1)).collect();
        let kept = capped(many);
        assert_eq!(kept.len(), MAX_SERIES);
        assert_eq!(
            kept.values().sum::<usize>(),
            5050,
            "every task still counted"
        );
        let top = MAX_SERIES - 1;
        for p in 100 - top..100 {
            assert_eq!(kept.get(&p.to_string()), Some(&(p + 1)), "priority {p}");
        }
        let rest: usize = (1..=100 - top).sum();
        assert_eq!(kept.get("(other)"), Some(&rest));
    }
}
