//! The workers the coordinator has heard from: each one's device and device memory (reported when it
//! registers) and when it last called. The tiled planner sizes a scale's tiles for the live ones
//! ([`stylefarm_core::tiling::Tiling::scale_tile_size`]).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stylefarm_core::ids::WorkerId;

/// A worker that has not called for this long (a lease poll waits at most 30 s; a rendering worker
/// heartbeats every few seconds) no longer counts for planning.
pub const LIVE_WINDOW: Duration = Duration::from_secs(60);

/// How many workers the registry remembers; beyond it, the registrations not live are forgotten (a
/// worker's every start registers anew), and while this many are live, a new registration is refused
/// ([`Registry::has_room`]): a caller that registers without end (20,000 names took 360 MB of a
/// coordinator in a probe, with the store's writes) is held to about this many.
pub const MAX_WORKERS: usize = 10_000;

/// Longest worker name, and longest device or version text a worker registers with, in bytes.
pub const MAX_WORKER_TEXT: usize = stylefarm_core::ids::MAX_WORKER_NAME;

/// Longest worker id: its name, `#` and the registration's number.
pub const MAX_WORKER_ID: usize = MAX_WORKER_TEXT + 1 + 20;

/// What a worker said about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    /// "cpu", "cuda:0", ...
    pub device: String,
    /// Bytes of device memory; 0 when unknown (a worker seen leasing without registering with this
    /// coordinator, e.g. across its restart).
    pub memory_bytes: u64,
    /// Bytes of memory in use as the worker last reported (its device's on a GPU, its process's on a CPU);
    /// 0 when unknown.
    pub memory_used_bytes: u64,
    /// When the worker last registered or called.
    pub last_seen: Instant,
    /// Its tags, as it last said (registering or asking for a task).
    pub tags: Vec<String>,
    /// Why it is not live though heard from lately, until it calls again; `None` when it is not gone.
    pub gone: Option<Gone>,
    /// It said it is stopping ([`Registry::stopping`]): it takes no new task, finishes the one it runs
    /// and signs off. Still live (its task's lease is renewed), but nothing is planned for it.
    pub leaving: bool,
    /// The worker process' number (pb::RegisterWorkerRequest::instance: random, the same at each of its
    /// registrations); 0: not known (a worker older than the field, or seen without registering).
    pub instance: u64,
    /// Its lease polls under way ([`Registry::polling`]): an idle worker has one at almost every moment,
    /// and none once its process died (its connection closed, the call was dropped).
    pub polling: u32,
    /// When its last lease poll ended (answered, or dropped with its connection); `None`: none yet.
    pub poll_ended: Option<Instant>,
}

/// Why a worker heard from lately is not live ([`WorkerInfo::gone`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gone {
    /// A lease of it expired since it last called ([`Registry::lost`]).
    Lost,
    /// It signed off: it left the farm ([`Registry::left`]).
    Left,
}

/// Whether `other` is a later registration of `id`'s name (`name#n`: the coordinator numbers them in
/// order).
fn registered_after(other: &WorkerId, id: &WorkerId) -> bool {
    let number = |id: &WorkerId| (id.as_str().rsplit_once('#')?.1).parse::<u64>().ok();
    matches!((number(other), number(id)), (Some(m), Some(n)) if m > n)
        && other.by_name() == id.by_name()
}

/// Forgets the workers not live once the registry holds [`MAX_WORKERS`].
fn forget_past_room(workers: &mut HashMap<WorkerId, WorkerInfo>) {
    if workers.len() >= MAX_WORKERS {
        let since = live_since();
        workers.retain(|_, w| w.live(since));
    }
}

/// The moment a worker must have been heard from since to be live: [`LIVE_WINDOW`] ago (`None` while the
/// clock has not run that long: every worker is live).
fn live_since() -> Option<Instant> {
    Instant::now().checked_sub(LIVE_WINDOW)
}

impl WorkerInfo {
    /// Whether it was heard from after `since` ([`live_since`]).
    fn live(&self, since: Option<Instant>) -> bool {
        self.gone.is_none() && since.is_none_or(|c| self.last_seen > c)
    }

    /// Whether it asks for work now: not gone, with a lease poll under way, or a call (a poll's start or
    /// another) or a poll's end within 6 s (`POLL_GAP`: the next poll follows). A worker process that died
    /// idle is not, 6 s after its poll dropped with its connection, though it stays live for planning for
    /// [`LIVE_WINDOW`].
    pub fn asking(&self) -> bool {
        let within = |at: Instant| at.elapsed() <= POLL_GAP;
        self.gone.is_none()
            && (self.polling > 0 || within(self.last_seen) || self.poll_ended.is_some_and(within))
    }

    /// Its worker process ([`WorkerInfo::instance`]) while the process is known and runs by what the
    /// coordinator sees: a lease poll of it under way, or a call within [`PROCESS_HEARD_WITHIN`] (a
    /// process that died while idle has no poll under way; one that died rendering stops its
    /// heartbeats), not the minute that a worker stays live for planning.
    fn running_process(&self) -> Option<u64> {
        let running = self.gone.is_none()
            && (self.polling > 0 || self.last_seen.elapsed() < PROCESS_HEARD_WITHIN);
        (self.instance != 0 && running).then_some(self.instance)
    }
}

/// How recently a worker process without a lease poll under way must have called to count as running
/// ([`WorkerInfo::running_process`]): several heartbeats of a rendering worker (every 2 s by default).
/// A worker restarted after a crash under its name is then not taken for a second process sharing it.
const PROCESS_HEARD_WITHIN: Duration = Duration::from_secs(15);

/// How long an idle worker goes between its lease polls at most ([`WorkerInfo::asking`]): the next goes
/// as the last is answered, or after a failed one's backoff (at most [`stylefarm_proto::Backoff::MAX`], or
/// the delay a busy coordinator asks for), a second more for the call to come.
const POLL_GAP: Duration = stylefarm_proto::Backoff::MAX.saturating_add(Duration::from_secs(1));

/// A lease poll of a worker under way ([`Registry::polling`]), counted until dropped.
pub struct Polling<'a> {
    registry: &'a Registry,
    id: WorkerId,
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        if let Some(w) = self.registry.workers().get_mut(&self.id) {
            w.polling = w.polling.saturating_sub(1);
            w.poll_ended = Some(Instant::now());
        }
    }
}

/// The registrations of `id`'s name by other running worker processes than `instance` (`id`'s; 0: not
/// known, and none is; [`WorkerInfo::running_process`]): another worker given the same name (`--name`).
/// The farm counts workers by name (a tiled or exact scale plans for one per name; a drain, a strike and
/// a blocklist take every registration of a name), so they count as one.
fn sharing_name(
    workers: &HashMap<WorkerId, WorkerInfo>,
    id: &WorkerId,
    instance: u64,
) -> Vec<WorkerId> {
    if instance == 0 {
        return Vec::new();
    }
    let name = id.by_name();
    let mut others: Vec<WorkerId> = workers
        .iter()
        .filter(|(other, w)| {
            w.running_process().is_some_and(|p| p != instance) && other.by_name() == name
        })
        .map(|(other, _)| other.clone())
        .collect();
    others.sort();
    others
}

/// A worker and its tags.
pub type Tagged = (WorkerId, Vec<String>);

/// What a worker says about itself in a lease poll, as at registration ([`Registry::seen`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Said<'a> {
    /// Its tags.
    pub tags: &'a [String],
    /// Its device ("cpu", "cuda:0"); empty: not said.
    pub device: &'a str,
    /// Bytes of device memory; 0: not said.
    pub memory_bytes: u64,
}

/// The workers by id.
#[derive(Debug, Default)]
pub struct Registry {
    workers: Mutex<HashMap<WorkerId, WorkerInfo>>,
}

impl Registry {
    fn workers(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, WorkerInfo>> {
        // the map stays consistent whatever panicked while holding it: every update is one insert
        self.workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a lease poll of worker `id` as under way until the guard is dropped (the call answered, or
    /// dropped with its connection).
    pub fn polling(&self, id: &WorkerId) -> Polling<'_> {
        if let Some(w) = self.workers().get_mut(id) {
            w.polling += 1;
        }
        Polling {
            registry: self,
            id: id.clone(),
        }
    }

    /// Whether a registration may be added: fewer than [`MAX_WORKERS`] are remembered once those not
    /// live are forgotten.
    pub fn has_room(&self) -> bool {
        let mut workers = self.workers();
        forget_past_room(&mut workers);
        workers.len() < MAX_WORKERS
    }

    /// Records a worker's registration, by the worker process `instance` (0: not known), in place of that
    /// process' earlier registrations (one process, one row in `stylefarm workers`). Returns the
    /// registrations of its name by other running processes: two workers given one name, which the farm
    /// counts as one.
    pub fn register(
        &self,
        id: &WorkerId,
        device: &str,
        memory_bytes: u64,
        tags: &[String],
        instance: u64,
    ) -> Vec<WorkerId> {
        let mut workers = self.workers();
        forget_past_room(&mut workers);
        if instance != 0 {
            let name = id.by_name();
            workers.retain(|other, w| w.instance != instance || other.by_name() != name);
        }
        let others = sharing_name(&workers, id, instance);
        workers.insert(
            id.clone(),
            WorkerInfo {
                device: device.to_string(),
                memory_bytes,
                memory_used_bytes: 0,
                last_seen: Instant::now(),
                tags: tags.to_vec(),
                gone: None,
                leaving: false,
                instance,
                polling: 0,
                poll_ended: None,
            },
        );
        others
    }

    /// Records that a worker called (a lease poll, a heartbeat), with the memory in use it reported (0:
    /// unknown, and the last known value is kept) and what it says about itself when the call carries it
    /// (a lease poll: its tags, device and memory, as at registration; an empty device or 0 bytes keep
    /// what is known). A heartbeat of a registration not known is not recorded when its name has a later
    /// one: a worker that registered again (its coordinator restarted) still reports the task it leased
    /// before, under the id it had then.
    pub fn seen(&self, id: &WorkerId, memory_used_bytes: u64, said: Option<Said<'_>>) {
        let mut workers = self.workers();
        if let Some(w) = workers.get_mut(id) {
            w.last_seen = Instant::now();
            w.gone = None;
            if memory_used_bytes > 0 {
                w.memory_used_bytes = memory_used_bytes;
            }
            if let Some(said) = said {
                if w.tags != said.tags {
                    w.tags = said.tags.to_vec();
                }
                if !said.device.is_empty() && w.device != said.device {
                    w.device = said.device.to_string();
                }
                if said.memory_bytes > 0 {
                    w.memory_bytes = said.memory_bytes;
                }
            }
            return;
        }
        // an id not known (the later registrations looked for here only, not at every heartbeat)
        let superseded = said.is_none() && workers.keys().any(|other| registered_after(other, id));
        if workers.len() >= MAX_WORKERS || superseded {
            return;
        }
        let said = said.unwrap_or_default();
        workers.insert(
            id.clone(),
            WorkerInfo {
                device: said.device.to_string(),
                memory_bytes: said.memory_bytes,
                memory_used_bytes,
                last_seen: Instant::now(),
                tags: said.tags.to_vec(),
                gone: None,
                leaving: false,
                instance: 0,
                polling: 0,
                poll_ended: None,
            },
        );
    }

    /// Records that a lease of worker `id` ran out at `ran_out` (it stopped heartbeating): unless it called
    /// since, it is not live until it calls again, so that what is planned for the workers live (an
    /// exact-mode scale's shards) need not wait out [`LIVE_WINDOW`] to leave it out.
    pub fn lost(&self, id: &WorkerId, ran_out: Instant) {
        if let Some(w) = self
            .workers()
            .get_mut(id)
            .filter(|w| w.last_seen <= ran_out)
        {
            // a worker that signed off stays left
            w.gone = Some(w.gone.unwrap_or(Gone::Lost));
        }
    }

    /// Records that worker `id` said it is stopping (a heartbeat's `leaving`: its first SIGTERM or
    /// Ctrl-C): [`WorkerInfo::leaving`] for this registration, which ends with its sign-off (a worker
    /// started again registers anew).
    pub fn stopping(&self, id: &WorkerId) {
        if let Some(w) = self.workers().get_mut(id) {
            w.leaving = true;
        }
    }

    /// The registrations that said they are stopping ([`Registry::stopping`]), live or not.
    pub fn leaving(&self) -> HashSet<WorkerId> {
        self.workers()
            .iter()
            .filter(|(_, w)| w.leaving)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Records that worker `id` signed off (it leaves the farm): not live until it calls again.
    pub fn left(&self, id: &WorkerId) {
        if let Some(w) = self.workers().get_mut(id) {
            w.gone = Some(Gone::Left);
        }
    }

    /// The device memory (0 where unknown) of each live worker that `may_take` accepts, given its id and
    /// what it said (for a job: its tags for [`JobSpec::runs_on`](stylefarm_core::job::JobSpec::runs_on),
    /// no blocklist, and whether it is leaving): what a tiled job's scales are planned for. One entry per
    /// worker name ([`WorkerId::by_name`]): a worker that registered again is one worker (its largest
    /// memory).
    pub fn live_memory(&self, may_take: impl Fn(&WorkerId, &WorkerInfo) -> bool) -> Vec<u64> {
        let since = live_since();
        let mut by_name: HashMap<WorkerId, u64> = HashMap::new();
        for (id, w) in self.workers().iter() {
            if w.live(since) && may_take(id, w) {
                let memory = by_name.entry(id.by_name()).or_default();
                *memory = (*memory).max(w.memory_bytes);
            }
        }
        by_name.into_values().collect()
    }

    /// The workers heard from within [`LIVE_WINDOW`] (and not lost since, [`Registry::lost`]), with their
    /// tags.
    pub fn live(&self) -> Vec<(WorkerId, Vec<String>)> {
        let since = live_since();
        self.workers()
            .iter()
            .filter(|(_, w)| w.live(since))
            .map(|(id, w)| (id.clone(), w.tags.clone()))
            .collect()
    }

    /// How many workers are live (as [`Registry::live`]), silent, and left (signed off), by name: a worker
    /// that registered again is one, live when any of its registrations is, else left when the one last
    /// heard from signed off.
    pub fn live_silent_left(&self) -> (usize, usize, usize) {
        let since = live_since();
        // by name: whether live, and when the last registration was heard from and whether it left
        let mut names: HashMap<WorkerId, (bool, Instant, bool)> = HashMap::new();
        for (id, w) in self.workers().iter() {
            let left = w.gone == Some(Gone::Left);
            let name = names
                .entry(id.by_name())
                .or_insert((false, w.last_seen, left));
            name.0 |= w.live(since);
            if w.last_seen > name.1 {
                (name.1, name.2) = (w.last_seen, left);
            }
        }
        let live = names.values().filter(|n| n.0).count();
        let left = names.values().filter(|n| !n.0 && n.2).count();
        (live, names.len() - live - left, left)
    }

    /// The worker processes of each name that more than one running process registers under (their
    /// [`WorkerInfo::instance`]s; running: a lease poll under way, or a call within the last 15 s): two
    /// workers given one name, which the farm counts as one.
    pub fn shared_names(&self) -> HashMap<WorkerId, HashSet<u64>> {
        let mut processes: HashMap<WorkerId, HashSet<u64>> = HashMap::new();
        for (id, w) in self.workers().iter() {
            if let Some(process) = w.running_process() {
                processes.entry(id.by_name()).or_default().insert(process);
            }
        }
        processes.retain(|_, p| p.len() > 1);
        processes
    }

    /// Every worker remembered (live and silent), in no particular order.
    pub fn all(&self) -> Vec<(WorkerId, WorkerInfo)> {
        self.workers()
            .iter()
            .map(|(id, w)| (id.clone(), w.clone()))
            .collect()
    }

    /// What is known of worker `id`; `None` when it has not been heard from (or was forgotten).
    pub fn get(&self, id: &WorkerId) -> Option<WorkerInfo> {
        self.workers().get(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(id: &str) -> WorkerId {
        WorkerId::from(id)
    }

    #[test]
    fn live_workers_count_with_their_memory_unknown_ones_with_zero() {
        let r = Registry::default();
        r.register(&w("gpu#1"), "cuda:0", 80 << 30, &["gpu".to_string()], 0);
        r.seen(&w("old#7"), 0, None);
        r.seen(&w("gpu#1"), 5 << 30, None);
        let mut live = r.live_memory(|_, _| true);
        live.sort();
        assert_eq!(live, [0, 80 << 30]);
        assert_eq!(r.get(&w("gpu#1")).unwrap().device, "cuda:0");
        assert_eq!(r.get(&w("gpu#1")).unwrap().memory_used_bytes, 5 << 30);
        // an unknown reading keeps the last known one
        r.seen(&w("gpu#1"), 0, None);
        assert_eq!(r.get(&w("gpu#1")).unwrap().memory_used_bytes, 5 << 30);
        // tags: from the registration, then as a lease poll says (a heartbeat carries none)
        assert_eq!(r.get(&w("gpu#1")).unwrap().tags, ["gpu"]);
        let cpu = ["cpu".to_string()];
        r.seen(
            &w("old#7"),
            0,
            Some(Said {
                tags: &cpu,
                ..Said::default()
            }),
        );
        // a lease poll's device and memory (a coordinator that restarted: not registered here), then one
        // that does not say them (an older worker) keeps them
        let said = |device, memory_bytes| Said {
            tags: &[],
            device,
            memory_bytes,
        };
        r.seen(&w("gpu#9"), 0, Some(said("cuda:1", 24 << 30)));
        r.seen(&w("gpu#9"), 0, Some(said("", 0)));
        let gpu9 = r.get(&w("gpu#9")).unwrap();
        assert_eq!(
            (gpu9.device.as_str(), gpu9.memory_bytes),
            ("cuda:1", 24 << 30)
        );
        r.workers().remove("gpu#9");
        // silent past the window: no longer counted
        r.workers().get_mut("old#7").unwrap().last_seen = Instant::now() - 2 * LIVE_WINDOW;
        assert_eq!(r.live_memory(|_, _| true), [80 << 30]);
        assert!(r
            .live_memory(|_, w| w.tags.contains(&"cpu".to_string()))
            .is_empty());
        assert_eq!(r.live(), [(w("gpu#1"), vec!["gpu".to_string()])]);
        assert_eq!(r.get(&w("old#7")).unwrap().tags, ["cpu"]);
        // a name registered twice is one worker; one that is left out is not counted
        r.register(&w("gpu#2"), "cuda:0", 40 << 30, &[], 0);
        r.register(&w("cpu#1"), "cpu", 0, &[], 0);
        let mut live = r.live_memory(|_, _| true);
        live.sort();
        assert_eq!(live, [0, 80 << 30]);
        assert_eq!(r.live_memory(|id, _| id.by_name() != w("gpu")), [0]);
        // and counted once: gpu and cpu live, old silent
        assert_eq!(r.live_silent_left(), (2, 1, 0));
    }

    #[test]
    fn a_worker_that_signed_off_is_not_live_until_it_calls_again() {
        let r = Registry::default();
        r.register(&w("a#1"), "cpu", 0, &[], 0);
        r.register(&w("b#1"), "cpu", 0, &[], 0);
        r.left(&w("a#1"));
        // an unknown one is not remembered for it
        r.left(&w("c#1"));
        assert_eq!(r.live(), [(w("b#1"), Vec::new())]);
        assert_eq!(r.get(&w("a#1")).unwrap().gone, Some(Gone::Left));
        assert!(r.get(&w("c#1")).is_none());
        assert_eq!(r.live_silent_left(), (1, 0, 1));
        // a lease of it that expires since leaves it left
        r.lost(&w("a#1"), Instant::now());
        assert_eq!(r.get(&w("a#1")).unwrap().gone, Some(Gone::Left));
        r.seen(&w("a#1"), 0, None);
        assert_eq!(r.live().len(), 2);
        assert_eq!(r.get(&w("a#1")).unwrap().gone, None);
        assert_eq!(r.live_silent_left(), (2, 0, 0));
        // a name is left when the registration of it last heard from signed off, and none is live
        r.register(&w("a#2"), "cpu", 0, &[], 0);
        r.left(&w("a#2"));
        r.workers().get_mut("a#1").unwrap().last_seen = Instant::now() - 2 * LIVE_WINDOW;
        assert_eq!(r.live_silent_left(), (1, 0, 1));
        r.workers().get_mut("a#2").unwrap().last_seen = Instant::now() - 3 * LIVE_WINDOW;
        assert_eq!(r.live_silent_left(), (1, 1, 0));
    }

    #[test]
    fn a_worker_that_says_it_is_stopping_is_leaving_until_it_registers_again() {
        let r = Registry::default();
        r.register(&w("a#1"), "cpu", 0, &[], 0);
        r.register(&w("b#1"), "cpu", 0, &[], 0);
        r.stopping(&w("a#1"));
        // an unknown one is not remembered for it
        r.stopping(&w("c#1"));
        assert_eq!(r.leaving(), HashSet::from([w("a#1")]));
        // still live (its lease is renewed) and heard from: its later beats keep it leaving
        r.seen(&w("a#1"), 0, None);
        assert_eq!(r.live().len(), 2);
        assert!(r.get(&w("a#1")).unwrap().leaving);
        // the worker started again registers anew: not leaving
        r.register(&w("a#2"), "cpu", 0, &[], 0);
        assert_eq!(r.leaving(), HashSet::from([w("a#1")]));
        assert!(!r.get(&w("a#2")).unwrap().leaving);
    }

    #[test]
    fn a_worker_whose_lease_expired_is_not_live_until_it_calls_again() {
        let r = Registry::default();
        r.register(&w("a#1"), "cpu", 0, &[], 0);
        r.register(&w("b#1"), "cpu", 0, &[], 0);
        // a worker heard from after its lease ran out is alive
        r.lost(&w("a#1"), Instant::now() - Duration::from_secs(1));
        assert_eq!(r.live_memory(|_, _| true).len(), 2);
        r.lost(&w("a#1"), Instant::now());
        assert_eq!(r.live_memory(|_, _| true).len(), 1);
        assert_eq!(r.live().len(), 1);
        assert_eq!(r.live_silent_left(), (1, 1, 0));
        r.seen(&w("a#1"), 0, None);
        assert_eq!(r.live_memory(|_, _| true).len(), 2);
        // an unknown worker is nothing to forget
        r.lost(&w("c#1"), Instant::now());
        assert_eq!(r.live().len(), 2);
    }

    /// A worker asks for work while a lease poll of it is under way, or within [`POLL_GAP`] of its last
    /// call or of its last poll's end (the next poll on its way); not once that passed, nor once gone,
    /// though it stays live.
    #[test]
    fn an_idle_worker_asks_for_work_while_it_polls() {
        let r = Registry::default();
        r.register(&w("w#1"), "cpu", 0, &[], 1);
        let asking = || r.get(&w("w#1")).unwrap().asking();
        assert!(asking());
        let polling = r.polling(&w("w#1"));
        let long_ago = Instant::now() - 2 * POLL_GAP;
        r.workers().get_mut("w#1").unwrap().last_seen = long_ago;
        assert!(asking());
        // a poll that started long ago has just ended: the next is on its way
        drop(polling);
        assert!(asking());
        r.workers().get_mut("w#1").unwrap().poll_ended = Some(long_ago);
        assert!(!asking());
        assert_eq!(r.live().len(), 1);
        r.seen(&w("w#1"), 0, None);
        assert!(asking());
        r.lost(&w("w#1"), Instant::now());
        assert!(!asking());
    }

    /// Another process under a worker's name counts as sharing it while that worker runs by what the
    /// coordinator sees (a lease poll under way, or a call within the last seconds), not for the minute it
    /// stays live: a worker restarted after a crash is not taken for a second process.
    #[test]
    fn a_worker_restarted_after_a_crash_does_not_share_its_name_with_its_dead_process() {
        let r = Registry::default();
        r.register(&w("w#1"), "cpu", 0, &[], 1);
        // a second process at once: sharing
        assert_eq!(r.register(&w("w#2"), "cpu", 0, &[], 2), [w("w#1")]);
        let quiet = Instant::now() - 2 * PROCESS_HEARD_WITHIN;
        // the first, idle, with its lease poll under way: still sharing
        let polling = r.polling(&w("w#1"));
        r.workers().get_mut("w#1").unwrap().last_seen = quiet;
        r.workers().get_mut("w#2").unwrap().last_seen = quiet;
        assert_eq!(r.register(&w("w#3"), "cpu", 0, &[], 3), [w("w#1")]);
        // its poll dropped with its connection (the process died): not sharing, though live for a minute
        drop(polling);
        r.workers().get_mut("w#3").unwrap().last_seen = quiet;
        assert!(r.register(&w("w#4"), "cpu", 0, &[], 4).is_empty());
        assert_eq!(r.live().len(), 4);
        assert!(r.shared_names().is_empty());
    }

    /// One worker process, one entry: its registration replaces its earlier ones, and after a coordinator
    /// restart the heartbeats of the task it leased before, under its old id, do not list that id again.
    #[test]
    fn a_worker_that_registers_again_is_listed_once() {
        let r = Registry::default();
        r.register(&w("w1#3"), "cpu", 0, &[], 7);
        r.register(&w("w2#4"), "cpu", 0, &[], 8);
        r.register(&w("w1#5"), "cpu", 0, &[], 7);
        let mut ids: Vec<String> = r.all().into_iter().map(|(id, _)| id.into()).collect();
        ids.sort();
        assert_eq!(ids, ["w1#5", "w2#4"]);
        // a restarted coordinator: w2 registers again, then beats for its lease of before
        let r = Registry::default();
        r.register(&w("w2#6"), "cpu", 0, &[], 8);
        r.seen(&w("w2#4"), 0, None);
        assert!(r.get(&w("w2#4")).is_none());
        // a worker heard from before it registers (an older one) is recorded, as is a later id's beat
        r.seen(&w("w3#9"), 0, None);
        r.seen(&w("w2#7"), 0, None);
        assert!(r.get(&w("w3#9")).is_some() && r.get(&w("w2#7")).is_some());
    }

    /// The registry is bounded: full of live registrations, it has no room for another (the service
    /// refuses it); those no longer live are forgotten to make room.
    #[test]
    fn a_registry_full_of_live_workers_has_no_room_until_some_are_not_live() {
        let r = Registry::default();
        for i in 0..MAX_WORKERS {
            assert!(r.has_room(), "{i}");
            r.register(&w(&format!("flood#{i}")), "cpu", 0, &[], 0);
        }
        assert!(!r.has_room());
        assert_eq!(r.workers().len(), MAX_WORKERS);
        // the first hundred go silent
        for i in 0..100 {
            let id = format!("flood#{i}");
            r.workers().get_mut(id.as_str()).unwrap().last_seen = Instant::now() - 2 * LIVE_WINDOW;
        }
        assert!(r.has_room());
        assert_eq!(r.workers().len(), MAX_WORKERS - 100);
        // nor does a worker never registered add itself past the bound
        r.register(&w("late#1"), "cpu", 0, &[], 0);
        for i in 0..200 {
            r.seen(&w(&format!("phantom#{i}")), 0, None);
        }
        assert_eq!(r.workers().len(), MAX_WORKERS);
    }
}
