//! [`RedisStore`]: the store in a Redis server, shared by the coordinators of a cluster.
//!
//! Layout, under a key prefix (`stylefarm` unless given another):
//!
//! - `{prefix}:jobs`: a sorted set of job ids scored by their submission sequence (the order of
//!   [`Store::load`]);
//! - `{prefix}:job:{id}`: the job's record ([`JobMeta`]) as JSON;
//! - `{prefix}:tasks:{id}`: a hash of the job's tasks ([`TaskRecord`] as JSON) by their index;
//! - `{prefix}:drained`: the names of the workers drained ([`Op::Drained`]) as JSON;
//! - `{prefix}:leader` and `{prefix}:epoch`: the active coordinator's lease (its id, expiring unless renewed)
//!   and the fencing token ([`Epoch`]: a number that each new holder increments, and the holder's id) taken
//!   with it in one transaction ([`RedisStore::open_active`]); every write of an active coordinator is a
//!   transaction that watches the epoch and applies only while it is still its own.
//!
//! A writer thread applies the queued writes in order on one connection; the writes queued while it was busy
//! go to the server together as one `MULTI`/`EXEC` transaction (group commit), which Redis applies
//! atomically. A write is durable when the server has acknowledged its transaction: as durable as the
//! server's persistence makes it (with `appendonly yes` and `appendfsync always` nothing acknowledged is
//! lost; `everysec` may lose the last second on a power failure, not on a crash of the server process).
//! When the server cannot be reached (down, restarting, still loading its data), the writes are held back
//! in order and tried again every [`RETRY_EVERY`] until it answers: their callers, and those of every
//! write queued meanwhile, are told UNAVAILABLE at once, and [`Store::behind`] says so until the backlog is
//! applied; nothing queued is dropped or reordered unless the store is closed first.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use stylefarm_core::ids::WorkerId;

use super::{durable_now, err, Durable, Op, Store, StoreError, StoreErrorKind};
use crate::model::{JobMeta, TaskRecord};

/// How long connecting to the server, and each reply, may take before the call fails.
const TIMEOUT: Duration = Duration::from_secs(5);

/// How often writes held back while the server is out of reach are tried again.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "stylefarm";

/// `HSET KEYS[2] ARGV[1] ARGV[2]` while the job's record `KEYS[1]` exists ([`Op::Task`]).
const TASK_OF_A_STORED_JOB: &str =
    "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end \
     return 0";

/// A job's tasks as `HGETALL` returns them: (index, JSON) pairs.
type TaskFields = Vec<(u32, Vec<u8>)>;

/// One queued write and where its outcome goes.
struct Write {
    ops: Vec<Op>,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// The store in a Redis server (`redis://[user:password@]host:port[/db]`).
pub struct RedisStore {
    client: redis::Client,
    prefix: String,
    writes: Option<mpsc::Sender<Write>>,
    writer: Option<std::thread::JoinHandle<()>>,
    leadership: Option<Leadership>,
    /// Why writes are held back, while some are (the server out of reach).
    behind: Arc<Mutex<Option<StoreError>>>,
}

/// The keys of one store.
#[derive(Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn jobs(&self) -> String {
        format!("{}:jobs", self.prefix)
    }

    fn job(&self, id: &str) -> String {
        format!("{}:job:{id}", self.prefix)
    }

    fn tasks(&self, id: &str) -> String {
        format!("{}:tasks:{id}", self.prefix)
    }

    /// The names of the workers drained (JSON).
    fn drained(&self) -> String {
        format!("{}:drained", self.prefix)
    }

    /// The number of the last worker registration.
    fn registrations(&self) -> String {
        format!("{}:registrations", self.prefix)
    }

    /// The id of the coordinator holding the leader lease; expires unless renewed.
    fn leader(&self) -> String {
        format!("{}:leader", self.prefix)
    }

    /// The fencing token ([`Epoch`]), set by each coordinator that takes the leader lease.
    fn epoch(&self) -> String {
        format!("{}:epoch", self.prefix)
    }
}

/// A fencing token: the epoch a coordinator took with the leader lease, its number (the store's last one
/// plus 1) and the coordinator's node id (the leader key's value). Stored as `{number}:{node}`, so that two
/// holders never share one, even when a Redis server that lost its data (restarted without it, the keys
/// deleted) numbers epochs from 1 again: a coordinator active before the loss, its writes held back, cannot
/// find its number taken by a standby that took over since and write beside it. A stored bare number (a
/// coordinator of an older version) reads as that number with no node.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Epoch {
    number: u64,
    node: String,
}

impl Epoch {
    /// The epoch stored as `stored`; an unreadable one (not written by stylefarm) as number 0.
    fn parse(stored: &str) -> Epoch {
        let (number, node) = stored.split_once(':').unwrap_or((stored, ""));
        Epoch {
            number: number.parse().unwrap_or(0),
            node: node.to_string(),
        }
    }

    /// The value stored in the epoch key.
    fn stored(&self) -> String {
        format!("{}:{}", self.number, self.node)
    }

    /// Whether the store's epoch key (`current`, None when absent) still holds this one.
    fn holds(&self, current: Option<&str>) -> bool {
        current == Some(self.stored().as_str())
    }
}

fn json(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(err)
}

/// A Redis error as a store error: unavailable when the server could not be reached, the connection broke,
/// or the server refuses writes for a while (its writes are then held back and applied in order later, not
/// dropped while memory has them).
fn redis_err(e: redis::RedisError) -> StoreError {
    let unavailable = e.is_io_error()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || e.is_timeout()
            // a server still loading its data after a restart, or between roles
            || matches!(
                e.kind(),
                redis::ErrorKind::Server(
                    redis::ServerErrorKind::BusyLoading
                        | redis::ServerErrorKind::TryAgain
                        | redis::ServerErrorKind::MasterDown
                        | redis::ServerErrorKind::ClusterDown
                        | redis::ServerErrorKind::ReadOnly
                )
            )
            // out of memory under noeviction, its snapshots failing, too few replicas: until its operator
            // (or its load) frees it; the server's errors of one command, or of each in a transaction
            || e.clone().into_server_errors().is_some_and(|errors| {
                errors.iter().any(|(_, error)| {
                    matches!(
                        error.code(),
                        "OOM" | "MISCONF" | "NOREPLICAS" | "READONLY" | "LOADING"
                    )
                })
            });
    let message = format!("redis: {e}");
    if unavailable {
        StoreError::unavailable(message)
    } else {
        StoreError::new(message)
    }
}

fn connect(client: &redis::Client) -> Result<redis::Connection, StoreError> {
    let con = client
        .get_connection_with_timeout(TIMEOUT)
        .map_err(redis_err)?;
    con.set_read_timeout(Some(TIMEOUT)).map_err(err)?;
    con.set_write_timeout(Some(TIMEOUT)).map_err(err)?;
    Ok(con)
}

/// The commands of `ops`, in order.
fn commands(keys: &Keys, ops: &[Op]) -> Result<Vec<redis::Cmd>, StoreError> {
    let mut out = Vec::new();
    let task = |id: &str, t: &TaskRecord| -> Result<redis::Cmd, StoreError> {
        let mut c = redis::cmd("HSET");
        c.arg(keys.tasks(id)).arg(t.index).arg(json(t)?);
        Ok(c)
    };
    for op in ops {
        match op {
            Op::Insert(job, tasks) => {
                let id = job.id.as_str();
                let mut set = redis::cmd("SET");
                set.arg(keys.job(id)).arg(json(job)?);
                let mut listed = redis::cmd("ZADD");
                listed.arg(keys.jobs()).arg(job.seq).arg(id);
                out.extend([set, listed]);
                for t in tasks {
                    out.push(task(id, t)?);
                }
            }
            // a job deleted (or never stored) is not brought back in part: its record only replaced (XX),
            // a task stored only while the record is there
            Op::Job(job) => {
                let mut set = redis::cmd("SET");
                set.arg(keys.job(job.id.as_str())).arg(json(job)?).arg("XX");
                out.push(set);
            }
            Op::Task(job_id, t) => {
                let id = job_id.as_str();
                let mut set = redis::cmd("EVAL");
                set.arg(TASK_OF_A_STORED_JOB)
                    .arg(2)
                    .arg(keys.job(id))
                    .arg(keys.tasks(id))
                    .arg(t.index)
                    .arg(json(t)?);
                out.push(set);
            }
            Op::Delete(job_id) => {
                let id = job_id.as_str();
                let mut del = redis::cmd("DEL");
                del.arg(keys.job(id)).arg(keys.tasks(id));
                let mut unlisted = redis::cmd("ZREM");
                unlisted.arg(keys.jobs()).arg(id);
                out.extend([del, unlisted]);
            }
            Op::Drained(names) => {
                let mut set = redis::cmd("SET");
                set.arg(keys.drained()).arg(json(names)?);
                out.push(set);
            }
            Op::Registrations(n) => {
                let mut set = redis::cmd("SET");
                set.arg(keys.registrations()).arg(json(n)?);
                out.push(set);
            }
        }
    }
    Ok(out)
}

/// Applies `cmds` as one transaction; with a `fence`, only while the store's epoch is still that one (the
/// epoch key watched: a coordinator that another has taken over from writes nothing).
fn apply(
    con: &mut redis::Connection,
    keys: &Keys,
    cmds: &[redis::Cmd],
    fence: Option<&Epoch>,
) -> Result<(), StoreError> {
    let redis = redis_err;
    let Some(epoch) = fence else {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for c in cmds {
            pipe.add_command(c.clone()).ignore();
        }
        return pipe.exec(con).map_err(redis);
    };
    redis::transaction(con, &[keys.epoch()], |con, pipe| {
        let current: Option<String> = redis::cmd("GET").arg(keys.epoch()).query(con)?;
        if !epoch.holds(current.as_deref()) {
            return Ok(Some(Err(fenced(epoch, current.as_deref()))));
        }
        for c in cmds {
            pipe.add_command(c.clone()).ignore();
        }
        // None: the epoch changed before EXEC, which then applied nothing; look again
        Ok(pipe.query::<Option<()>>(con)?.map(Ok))
    })
    .map_err(redis)?
}

/// The error of a write by the holder of `epoch` refused because the store's epoch key holds `current`.
fn fenced(epoch: &Epoch, current: Option<&str>) -> StoreError {
    let mine = epoch.number;
    fenced_because(&match current.map(Epoch::parse) {
        Some(current) if current.number == mine => format!(
            "this coordinator's epoch is {mine}, and the store's is {mine} taken by another coordinator \
             ({}): another coordinator is active (the store lost its data since this one took its epoch)",
            current.node
        ),
        Some(current) => format!(
            "this coordinator's epoch is {mine}, the store's {}: another coordinator is active",
            current.number
        ),
        None => format!(
            "this coordinator's epoch is {mine}, the store has none: its data is gone (a Redis server \
             restarted without its data, or the keys deleted)"
        ),
    })
}

/// The error of a write refused because this coordinator lost its hold on the store, `why`.
fn fenced_because(why: &str) -> StoreError {
    StoreError {
        kind: StoreErrorKind::Fenced,
        ..err(format!("fenced: {why}"))
    }
}

/// A coordinator's hold on the store, as the active one of those that share it: the leader key, renewed
/// by a thread of its own, and the epoch (a fencing token, [`Epoch`]) its writes are checked against.
struct Leadership {
    epoch: Epoch,
    /// This holder's id, the leader key's value while it holds it.
    node: String,
    client: redis::Client,
    keys: Keys,
    /// Why the hold was lost, once it is: the writes fail from then on, and the coordinator stops.
    lost: Arc<Mutex<Option<String>>>,
    /// When the last successful renewal (or the taking) of the leader key was sent: the hold lasts a lease
    /// from then.
    renewed: Arc<Mutex<std::time::Instant>>,
    lease: Duration,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

impl Leadership {
    /// Waits (a standby) until no other coordinator holds the leader key, takes it for `lease` with a new
    /// epoch (one transaction: [`Leadership::take`]), and starts renewing it every third of that.
    fn acquire(
        client: &redis::Client,
        keys: &Keys,
        lease: Duration,
    ) -> Result<Leadership, StoreError> {
        // unique among the coordinators sharing the store, whatever their hosts and process ids
        let node = format!(
            "{}-{}",
            std::process::id(),
            stylefarm_core::ids::hex(&rand::random::<[u8; 8]>())
        );
        let mut con = Some(connect(client)?);
        let mut waiting = false;
        let (epoch, renewed) = loop {
            let sent = std::time::Instant::now();
            let taken = match con.as_mut() {
                Some(c) => Self::take(c, keys, &node, lease),
                None => connect(client).map(|c| {
                    con = Some(c);
                    None
                }),
            };
            let taken = match taken {
                Ok(taken) => taken,
                // a standby waits through the server's outage (a restart, a failover) as it waits for
                // the active coordinator; another error (a password or ACL refused) is for its operator
                Err(e) if e.kind == StoreErrorKind::Unavailable => {
                    tracing::warn!(error = %e, "standby: the store is out of reach; asking it again");
                    con = None;
                    std::thread::sleep(lease / 4);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(epoch) = taken {
                break (epoch, Arc::new(Mutex::new(sent)));
            }
            if !waiting {
                tracing::info!(
                    lease_ms = lease.as_millis() as u64,
                    "standby: another coordinator is active; taking over when its lease lapses"
                );
                waiting = true;
            }
            std::thread::sleep(lease / 4);
        };
        tracing::info!(
            epoch = epoch.number,
            node,
            "active: holding the store's leader lease"
        );
        let lost = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (client, keys, lost, stop) =
                (client.clone(), keys.clone(), lost.clone(), stop.clone());
            let (node, epoch, renewed) = (node.clone(), epoch.clone(), renewed.clone());
            let holder = Holder { node, epoch, lease };
            std::thread::Builder::new()
                .name("store-leader".into())
                .spawn(move || holder.renew_loop(&client, &keys, &renewed, &lost, &stop))
                .map_err(err)?
        };
        Ok(Leadership {
            epoch,
            node,
            client: client.clone(),
            keys: keys.clone(),
            lost,
            renewed,
            lease,
            stop,
            renewer: Some(renewer),
        })
    }

    /// Takes the leader key for `lease` as `node`, with the next epoch, when no coordinator holds it: one
    /// transaction (the keys watched), so that a holder always has an epoch of its own. `None`: another
    /// holds it.
    fn take(
        c: &mut redis::Connection,
        keys: &Keys,
        node: &str,
        lease: Duration,
    ) -> Result<Option<Epoch>, StoreError> {
        let lease_ms = lease.as_millis().max(1) as u64;
        let (leader, epoch) = (keys.leader(), keys.epoch());
        redis::transaction(c, &[&leader, &epoch], |c, pipe| {
            let holder: Option<String> = redis::cmd("GET").arg(&leader).query(c)?;
            if holder.is_some() {
                return Ok(Some(None));
            }
            let last: Option<String> = redis::cmd("GET").arg(&epoch).query(c)?;
            let number = last.map_or(0, |last| Epoch::parse(&last).number);
            let mine = Epoch {
                number: number.saturating_add(1),
                node: node.to_string(),
            };
            pipe.cmd("SET")
                .arg(&leader)
                .arg(node)
                .arg("PX")
                .arg(lease_ms)
                .ignore()
                .cmd("SET")
                .arg(&epoch)
                .arg(mine.stored())
                .ignore();
            // None: a watched key changed before EXEC, which then applied nothing; look again
            Ok(pipe.query::<Option<()>>(c)?.map(|()| Some(mine)))
        })
        .map_err(redis_err)
    }
}

/// How many leader leases the store may stay out of reach before the active coordinator stops
/// ([`Holder::renew_loop`]): long enough for a Redis server to restart, short enough that a coordinator cut
/// off from Redis (but not from its workers) hands them to the standby that took over.
pub(crate) const STEP_DOWN_LEASES: u32 = 3;

/// What the thread that renews a coordinator's leader lease knows of its hold ([`Holder::renew_loop`]).
struct Holder {
    /// The leader key's value while this coordinator holds it.
    node: String,
    /// The epoch it took with the lease: its writes are fenced by it.
    epoch: Epoch,
    lease: Duration,
}

/// What a renewal of the leader lease found.
enum Renewal {
    /// Renewed (or taken again, its epoch still the store's).
    Held,
    /// Another coordinator took over: why, to stop with.
    Lost(String),
}

impl Holder {
    /// Renews the leader key while this node holds it, every third of a lease; records why when another
    /// coordinator took over (the key held by another, or a newer epoch) or may have (the key gone while the
    /// server answered). A server out of reach for longer than a lease (a Redis restarting, paused, failing
    /// over) is asked again: this coordinator's writes are held back meanwhile and fenced by its epoch, so
    /// none lands once another has taken over; a key that lapsed meanwhile is taken again when the epoch is
    /// still this one's (no standby took over), and the held-back writes land. Out of reach for
    /// [`STEP_DOWN_LEASES`] leases, it gives up: a standby that reaches the server has taken over by then,
    /// and this coordinator's workers must leave it for that one.
    fn renew_loop(
        &self,
        client: &redis::Client,
        keys: &Keys,
        renewed: &Mutex<std::time::Instant>,
        lost: &Mutex<Option<String>>,
        stop: &AtomicBool,
    ) {
        let last_renewed = || *renewed.lock().unwrap_or_else(|p| p.into_inner());
        let mut con: Option<redis::Connection> = None;
        // whether the server was out of reach since the last renewal; and for a whole lease
        let (mut cut_off, mut lapsed) = (false, false);
        loop {
            // woken early by a stop (Drop unparks this thread); an early wake-up renews early
            std::thread::park_timeout(self.lease / 3);
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let sent = std::time::Instant::now();
            let outcome = (|| -> Result<Renewal, StoreError> {
                let c = match con.as_mut() {
                    Some(c) => c,
                    None => con.insert(connect(client)?),
                };
                self.renew(c, keys, cut_off)
            })();
            match outcome {
                Ok(Renewal::Held) => {
                    cut_off = false;
                    if std::mem::take(&mut lapsed) {
                        tracing::warn!(
                            epoch = self.epoch.number,
                            "the store answers again; holding the leader lease again (no other \
                             coordinator took over)"
                        );
                    }
                    *renewed.lock().unwrap_or_else(|p| p.into_inner()) = sent;
                }
                Ok(Renewal::Lost(why)) => {
                    tracing::error!(reason = why, "no longer the active coordinator");
                    *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    return;
                }
                Err(e) => {
                    (con, cut_off) = (None, true);
                    let out_of_reach = last_renewed().elapsed();
                    if out_of_reach >= self.lease * STEP_DOWN_LEASES {
                        let why = format!(
                            "the store out of reach for {:.0} s ({STEP_DOWN_LEASES} leader leases): a \
                             standby may have taken over: {e}",
                            out_of_reach.as_secs_f64()
                        );
                        tracing::error!(reason = why, "no longer the active coordinator");
                        *lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                        return;
                    }
                    if out_of_reach < self.lease {
                        tracing::warn!(error = %e, "renewing the leader lease failed; retrying");
                    } else if !std::mem::replace(&mut lapsed, true) {
                        tracing::error!(
                            error = %e,
                            lease_s = self.lease.as_secs_f64(),
                            "the leader lease lapsed: the store out of reach for a lease; asking it again \
                             (the writes held back land if no other coordinator took over meanwhile)"
                        );
                    }
                }
            }
        }
    }

    /// One renewal: the leader key's lease extended while this node holds it, or, when the store was out
    /// of reach since the last renewal (`cut_off`: the key may have lapsed meanwhile), taken again while no
    /// one holds it and the store's epoch is still this one's.
    fn renew(
        &self,
        c: &mut redis::Connection,
        keys: &Keys,
        cut_off: bool,
    ) -> Result<Renewal, StoreError> {
        let lease_ms = self.lease.as_millis().max(1) as u64;
        let (leader, epoch) = (keys.leader(), keys.epoch());
        redis::transaction(c, &[&leader, &epoch], |c, pipe| {
            let holder: Option<String> = redis::cmd("GET").arg(&leader).query(c)?;
            match holder {
                Some(holder) if holder == self.node => {
                    pipe.cmd("PEXPIRE").arg(&leader).arg(lease_ms).ignore();
                }
                Some(_) => {
                    let why = "another coordinator holds the leader lease".to_string();
                    return Ok(Some(Renewal::Lost(why)));
                }
                None if !cut_off => {
                    let why = "the leader lease lapsed while the store answered (this coordinator \
                               frozen?): another coordinator may take over";
                    return Ok(Some(Renewal::Lost(why.to_string())));
                }
                None => {
                    let current: Option<String> = redis::cmd("GET").arg(&epoch).query(c)?;
                    if !self.epoch.holds(current.as_deref()) {
                        let why = fenced(&self.epoch, current.as_deref()).to_string();
                        return Ok(Some(Renewal::Lost(why)));
                    }
                    pipe.cmd("SET")
                        .arg(&leader)
                        .arg(&self.node)
                        .arg("PX")
                        .arg(lease_ms)
                        .ignore();
                }
            }
            // None: a watched key changed before EXEC, which then applied nothing; look again
            Ok(pipe.query::<Option<()>>(c)?.map(|()| Renewal::Held))
        })
        .map_err(redis_err)
    }
}

impl Drop for Leadership {
    /// Stops renewing and, when this holder still holds the leader key, deletes it: a standby takes over at
    /// once after a clean stop, not a lease later.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(renewer) = self.renewer.take() {
            renewer.thread().unpark();
            let _ = renewer.join();
        }
        let Ok(mut con) = connect(&self.client) else {
            return;
        };
        let leader = self.keys.leader();
        let released = redis::transaction(&mut con, &[&leader], |con, pipe| {
            let holder: Option<String> = redis::cmd("GET").arg(&leader).query(con)?;
            if holder.as_deref() != Some(self.node.as_str()) {
                return Ok(Some(()));
            }
            pipe.cmd("DEL").arg(&leader).ignore();
            pipe.query::<Option<()>>(con)
        });
        if let Err(e) = released {
            tracing::warn!(error = %e, "releasing the leader lease; it lapses by itself");
        }
    }
}

impl RedisStore {
    /// Connects to the server at `url` (checking that it answers) and starts the writer thread; the keys
    /// start with `prefix` (several farms can share a server under different prefixes). Writes are not
    /// fenced: for one coordinator, tests and tools ([`RedisStore::open_active`] for coordinators that
    /// share the server).
    pub fn open(url: &str, prefix: &str) -> Result<RedisStore, StoreError> {
        Self::start(url, prefix, None)
    }

    /// [`RedisStore::open`] for one of several coordinators sharing the server: waits, as a standby, until
    /// no other holds the leader lease (a key that lapses `lease` after its holder last renewed it), takes
    /// it and a new epoch, and renews it while running. Every write is fenced by that epoch: once another
    /// coordinator has taken over, this one's writes fail and [`Store::lost`] says why.
    pub fn open_active(url: &str, prefix: &str, lease: Duration) -> Result<RedisStore, StoreError> {
        Self::start(url, prefix, Some(lease))
    }

    fn start(url: &str, prefix: &str, lease: Option<Duration>) -> Result<RedisStore, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            // the url without its password: all before its last '@' (a password that makes it fail to parse
            // may hold '/', '?' or '#', which end the authority of a url that parses)
            let url = match (url.split_once("://"), url.rsplit_once('@')) {
                (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
                _ => url.to_string(),
            };
            err(format!("redis url '{url}': {e}"))
        })?;
        // the server named: "Connection refused" alone does not say which (the url without its password)
        let at = |e: StoreError| {
            let server = client.get_connection_info().addr().to_string();
            StoreError {
                message: format!("{} (redis at {server})", e.message),
                ..e
            }
        };
        let mut con = connect(&client).map_err(at)?;
        redis::cmd("PING")
            .query::<String>(&mut con)
            .map_err(|e| at(redis_err(e)))?;
        // the store's task writes run a script (TASK_OF_A_STORED_JOB): a user that may not (an ACL without
        // @scripting) is told now, not by every write's transaction failing later
        redis::cmd("EVAL")
            .arg("return 1")
            .arg(0)
            .query::<i64>(&mut con)
            .map_err(|e| match e.code() {
                Some("NOPERM") => err(format!(
                    "redis: the store runs Lua scripts (EVAL), which this user may not ({e}): grant \
                     the user +@scripting"
                )),
                _ => redis_err(e),
            })?;
        let keys = Keys {
            prefix: prefix.to_string(),
        };
        let leadership = lease
            .map(|lease| Leadership::acquire(&client, &keys, lease))
            .transpose()?;
        let fence = leadership
            .as_ref()
            .map(|l| (l.epoch.clone(), l.lost.clone()));
        let (writes, inbox) = mpsc::channel::<Write>();
        let behind = Arc::new(Mutex::new(None));
        let writer = {
            let (client, behind) = (client.clone(), behind.clone());
            std::thread::Builder::new()
                .name("store-redis".into())
                .spawn(move || Self::write_loop(&client, &keys, con, &inbox, fence, &behind))
                .map_err(err)?
        };
        Ok(RedisStore {
            client,
            prefix: prefix.to_string(),
            writes: Some(writes),
            writer: Some(writer),
            leadership,
            behind,
        })
    }

    /// Applies the queued writes in order. A group that fails because the server is out of reach is kept
    /// and applied again, before anything queued after it, until the server answers (every
    /// [`RETRY_EVERY`]); its callers and those of later writes are told UNAVAILABLE meanwhile, and
    /// [`Store::behind`] says so. Other failures (a fenced write, an error of the server) fail their group
    /// and drop it, unless writes are held back already: then any failure but a fenced one holds the group
    /// back with them (their commands replay in order: each sets, adds or deletes, whatever ran before).
    fn write_loop(
        client: &redis::Client,
        keys: &Keys,
        con: redis::Connection,
        inbox: &mpsc::Receiver<Write>,
        fence: Option<(Epoch, Arc<Mutex<Option<String>>>)>,
        behind: &Mutex<Option<StoreError>>,
    ) {
        let mut con = Some(con);
        // the commands of writes that failed for want of the server, in order, to apply before any other
        let mut backlog: Vec<redis::Cmd> = Vec::new();
        loop {
            let mut closing = false;
            let first = if backlog.is_empty() {
                let Ok(first) = inbox.recv() else { return };
                Some(first)
            } else {
                match inbox.recv_timeout(RETRY_EVERY) {
                    Ok(first) => Some(first),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        closing = true;
                        None
                    }
                }
            };
            // every write queued meanwhile joins this transaction
            let batch = first.into_iter().chain(inbox.try_iter()).collect();
            Self::apply_batch(client, keys, &mut con, &fence, behind, &mut backlog, batch);
            if closing {
                // closed while behind, after one last try: what is left is lost (its callers were told
                // UNAVAILABLE, none that it was applied)
                if !backlog.is_empty() {
                    tracing::error!(
                        commands = backlog.len(),
                        "store closed while the server was out of reach: writes not applied"
                    );
                }
                return;
            }
        }
    }

    /// Applies the backlog and then `batch` as one transaction, and tells `batch`'s callers the outcome.
    fn apply_batch(
        client: &redis::Client,
        keys: &Keys,
        con: &mut Option<redis::Connection>,
        fence: &Option<(Epoch, Arc<Mutex<Option<String>>>)>,
        behind: &Mutex<Option<StoreError>>,
        backlog: &mut Vec<redis::Cmd>,
        batch: Vec<Write>,
    ) {
        let lost = fence
            .as_ref()
            .and_then(|(_, lost)| lost.lock().unwrap_or_else(|p| p.into_inner()).clone());
        // a batch that cannot be made into commands (its JSON) fails alone, as it is: nothing of it is
        // held back (the backlog is tried again on the next turn)
        let cmds = match batch
            .iter()
            .map(|w| commands(keys, &w.ops))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(cmds) => cmds,
            Err(e) => {
                for w in batch {
                    let _ = w.done.send(Err(e.clone()));
                }
                return;
            }
        };
        let result = match lost {
            Some(why) => Err(fenced_because(&why)),
            None => {
                backlog.extend(cmds.into_iter().flatten());
                match con.as_mut() {
                    Some(c) => Ok(c),
                    None => connect(client).map(|c| con.insert(c)),
                }
                .and_then(|c| apply(c, keys, backlog, fence.as_ref().map(|(epoch, _)| epoch)))
            }
        };
        // this coordinator lost its hold (another took over): it writes nothing more, and stops (its
        // hold marked lost here too when the transaction found it so before the renewal did)
        let fenced = result
            .as_ref()
            .is_err_and(|e| e.kind == StoreErrorKind::Fenced);
        if let (Err(e), Some((_, lost))) = (&result, fence.as_ref().filter(|_| fenced)) {
            lost.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert_with(|| e.message.clone());
        }
        let mut behind = behind.lock().unwrap_or_else(|p| p.into_inner());
        let result = match result {
            Ok(()) => {
                if let Some(was) = behind.take() {
                    tracing::info!(
                        commands = backlog.len(),
                        error = %was,
                        "the store answers again: the writes held back are applied"
                    );
                }
                backlog.clear();
                Ok(())
            }
            // out of reach: the writes stay, in order; so do they on any error once some are held back (their
            // callers were told they would be applied, and dropping them would leave later writes on a store
            // that lacks them), unless this coordinator lost its hold (it writes nothing more, and stops)
            Err(e) if e.is_unavailable() || (behind.is_some() && !fenced) => {
                // a broken connection is replaced on the next try
                con.take();
                if behind.is_none() {
                    tracing::error!(error = %e, "store out of reach: holding writes back until it answers");
                } else if !e.is_unavailable() {
                    tracing::error!(error = %e, "store write failed while writes are held back");
                }
                // UNAVAILABLE whatever the error (the callers try again later, as for a server out of reach)
                let e = StoreError::unavailable(e.message).holding_back("the server answers");
                *behind = Some(e.clone());
                Err(e)
            }
            Err(e) => {
                tracing::error!(error = %e, "store write failed");
                con.take();
                backlog.clear();
                behind.take();
                Err(e)
            }
        };
        for w in batch {
            let _ = w.done.send(result.clone());
        }
    }
}

impl Store for RedisStore {
    fn write(&self, ops: Vec<Op>) -> Durable {
        let (done, outcome) = tokio::sync::oneshot::channel();
        let sent = self
            .writes
            .as_ref()
            .ok_or_else(|| err("the store is closed"))
            .and_then(|w| {
                w.send(Write { ops, done })
                    .map_err(|_| err("the store's writer stopped"))
            });
        if let Err(e) = sent {
            return durable_now(Err(e));
        }
        Box::pin(async move {
            outcome
                .await
                .unwrap_or_else(|_| Err(err("the store's writer stopped")))
        })
    }

    fn behind(&self) -> Option<StoreError> {
        self.behind
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lost(&self) -> Option<String> {
        self.leadership
            .as_ref()
            .and_then(|l| l.lost.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    fn hold(&self) -> Option<super::Hold> {
        let l = self.leadership.as_ref()?;
        let renewed = *l.renewed.lock().unwrap_or_else(|p| p.into_inner());
        let left = match self.lost() {
            Some(_) => Duration::ZERO,
            None => l.lease.saturating_sub(renewed.elapsed()),
        };
        Some(super::Hold {
            left,
            lease: l.lease,
        })
    }

    fn load(&self) -> Result<Vec<(JobMeta, Vec<TaskRecord>)>, StoreError> {
        let keys = Keys {
            prefix: self.prefix.clone(),
        };
        let redis = redis_err;
        let mut con = connect(&self.client)?;
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys.jobs())
            .arg(0)
            .arg(-1)
            .query(&mut con)
            .map_err(redis)?;
        let mut all = Vec::with_capacity(ids.len());
        for id in ids {
            let (meta, tasks): (Option<Vec<u8>>, TaskFields) = redis::pipe()
                .cmd("GET")
                .arg(keys.job(&id))
                .cmd("HGETALL")
                .arg(keys.tasks(&id))
                .query(&mut con)
                .map_err(redis)?;
            let meta = meta.ok_or_else(|| err(format!("job {id} is listed but has no record")))?;
            let meta: JobMeta =
                crate::model::job_from_json(&meta).map_err(|e| err(format!("job {id}: {e}")))?;
            let mut tasks = tasks
                .into_iter()
                .map(|(index, t)| {
                    crate::model::task_from_json(&t)
                        .map_err(|e| err(format!("job {id} task {index}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            tasks.sort_by_key(|t| t.index);
            all.push((meta, tasks));
        }
        Ok(all)
    }

    fn load_drained(&self) -> Result<BTreeSet<WorkerId>, StoreError> {
        self.setting(|keys| keys.drained(), "the workers drained")
    }

    fn load_registrations(&self) -> Result<u64, StoreError> {
        self.setting(|keys| keys.registrations(), "the last worker registration")
    }
}

impl RedisStore {
    /// The value (JSON) of the key `key` names, what it holds named `what` in an error; the default when
    /// never written.
    fn setting<T: serde::de::DeserializeOwned + Default>(
        &self,
        key: impl FnOnce(&Keys) -> String,
        what: &str,
    ) -> Result<T, StoreError> {
        let keys = Keys {
            prefix: self.prefix.clone(),
        };
        let mut con = connect(&self.client)?;
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key(&keys))
            .query(&mut con)
            .map_err(redis_err)?;
        match value {
            Some(value) => serde_json::from_slice(&value).map_err(|e| err(format!("{what}: {e}"))),
            None => Ok(T::default()),
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        // the writer drains what is queued, then ends; then the leader lease is no longer renewed
        self.writes = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        self.leadership = None;
    }
}

/// A redis-server of its own, for tests and benchmarks: on a loopback port, its files in a temporary
/// directory; killed when dropped. Panics with the reason when `redis-server` cannot start (the README's
/// test command installs it).
pub struct RedisServer {
    child: Option<std::process::Child>,
    port: u16,
    /// Append-only file on, fsynced at every write: a restart loses nothing acknowledged.
    persistent: bool,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// A server on a free port, persistence off.
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    /// A server on `port` (e.g. again on the port of one that was stopped), persistence off.
    pub fn start_on(port: u16) -> RedisServer {
        Self::launch(port, false, tempfile::tempdir().unwrap())
    }

    /// A server on a free port with persistence on (`appendonly yes`, `appendfsync always`), which
    /// [`RedisServer::restart`] brings back with its data.
    pub fn start_persistent() -> RedisServer {
        Self::launch(free_port(), true, tempfile::tempdir().unwrap())
    }

    fn launch(port: u16, persistent: bool, dir: tempfile::TempDir) -> RedisServer {
        let persistence: &[&str] = if persistent {
            &["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            &["--appendonly", "no"]
        };
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(persistence)
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (installed by deploy/test.sh: apt-get install redis-server)");
        let server = RedisServer {
            child: Some(child),
            port,
            persistent,
            dir,
        };
        let client = redis::Client::open(server.url()).unwrap();
        for _ in 0..100 {
            if let Ok(mut con) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                    return server;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not answer on port {port}");
    }

    /// Kills the server (SIGKILL, as a crash would); [`RedisServer::restart`] starts it again.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it runs and starts it again on the same port and directory: with persistence
    /// on, with the data it had acknowledged.
    pub fn restart(&mut self) {
        self.kill();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        *self = Self::launch(self.port, self.persistent, dir);
    }

    /// Its URL, `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_store() {
        let server = RedisServer::start();
        super::super::tests::suite(&RedisStore::open(&server.url(), "test").unwrap());
        // the suite's writes to jobs not stored (job nope, job-c once deleted) left no key behind either
        let mut con = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("test:*").query(&mut con).unwrap();
        keys.sort();
        assert_eq!(
            keys,
            [
                "test:drained",
                "test:job:job-a",
                "test:job:job-b",
                "test:jobs",
                "test:registrations",
                "test:tasks:job-a",
                "test:tasks:job-b"
            ]
        );
        // another prefix on the same server is another store
        assert!(RedisStore::open(&server.url(), "other")
            .unwrap()
            .load()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn writes_apply_in_order_and_survive_a_new_store_on_the_same_server() {
        let server = RedisServer::start();
        let store = RedisStore::open(&server.url(), DEFAULT_PREFIX).unwrap();
        let (mut job, tasks) = super::super::tests::job("job-1", 1);
        let inserted = store.write(vec![Op::Insert(job.clone(), tasks.clone())]);
        // queued before the first resolved: applied after it, maybe in the same transaction
        let mut pending = Vec::new();
        for n in 0..50 {
            job.strikes.insert("w".into(), n);
            pending.push(store.write(vec![Op::Job(job.clone())]));
        }
        super::super::wait(inserted).unwrap();
        for p in pending {
            super::super::wait(p).unwrap();
        }
        drop(store);
        let again = RedisStore::open(&server.url(), DEFAULT_PREFIX).unwrap();
        assert_eq!(again.load().unwrap(), vec![(job, tasks)]);
    }

    /// Two coordinators on one server: the second waits while the first renews its lease; when the first
    /// stalls past it (its key lapses, as for a process stopped with SIGSTOP), the second takes over with a
    /// new epoch, and the first one's writes are refused from then on.
    #[test]
    fn a_standby_takes_over_a_lapsed_lease_and_the_old_active_one_is_fenced() {
        let server = RedisServer::start();
        let url = server.url();
        let lease = Duration::from_millis(600);
        let a = RedisStore::open_active(&url, "farm", lease).unwrap();
        let (mut job, tasks) = super::super::tests::job("job-1", 1);
        let drained = BTreeSet::from([WorkerId::from("gpu-3")]);
        let ops = vec![
            Op::Insert(job.clone(), tasks.clone()),
            Op::Drained(drained.clone()),
        ];
        super::super::wait(a.write(ops)).unwrap();
        let standby = {
            let url = url.clone();
            std::thread::spawn(move || RedisStore::open_active(&url, "farm", lease))
        };
        std::thread::sleep(lease * 3);
        assert!(!standby.is_finished(), "the active one renews its lease");
        assert!(a.lost().is_none());
        // renewed every third of the lease: most of it is left
        let hold = a.hold().unwrap();
        assert_eq!(hold.lease, lease);
        assert!(hold.left > lease / 4 && hold.left <= lease, "{hold:?}");
        let mut con = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let epoch = |con: &mut redis::Connection| -> String {
            redis::cmd("GET").arg("farm:epoch").query(con).unwrap()
        };
        let first = epoch(&mut con);
        redis::cmd("DEL").arg("farm:leader").exec(&mut con).unwrap();
        let b = standby.join().unwrap().unwrap();
        // the next number, and the node that took it (the leader key's value): a token of its own
        let taken = epoch(&mut con);
        let leader: String = redis::cmd("GET")
            .arg("farm:leader")
            .query(&mut con)
            .unwrap();
        assert!(
            first.starts_with("1:") && first != format!("1:{leader}"),
            "{first}"
        );
        assert_eq!(taken, format!("2:{leader}"));
        job.error = "written by the old active one".into();
        let err = super::super::wait(a.write(vec![Op::Job(job.clone())])).unwrap_err();
        assert!(err.to_string().contains("fenced"), "{err}");
        let undrained = a.write(vec![Op::Drained(BTreeSet::new())]);
        assert!(super::super::wait(undrained).is_err(), "fenced");
        let deadline = std::time::Instant::now() + lease;
        while a.lost().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(a.lost().unwrap().contains("another coordinator"));
        assert_eq!(a.hold().unwrap().left, Duration::ZERO);
        job.error = "written by the new one".into();
        super::super::wait(b.write(vec![Op::Job(job.clone())])).unwrap();
        assert_eq!(b.load().unwrap(), vec![(job, tasks)]);
        assert_eq!(
            b.load_drained().unwrap(),
            drained,
            "the drained, not the fenced write"
        );
        assert!(b.lost().is_none());
        // a clean stop releases the lease: the next one takes over at once, not a lease later
        drop(b);
        let started = std::time::Instant::now();
        let c = RedisStore::open_active(&url, "farm", Duration::from_secs(60)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(c.lost().is_none());
    }

    /// The server out of reach for longer than the leader lease (a restart that takes a while): the active
    /// coordinator keeps asking, and once the server answers takes its lapsed key again (no standby took
    /// over: the epoch is still its own), and the write held back meanwhile lands. A standby waits through
    /// an outage rather than failing. Before, the active one gave up after a lease (the coordinator
    /// stopped, its held-back writes lost), and a standby failed at the first error. Out of reach for
    /// STEP_DOWN_LEASES leases, the active one gives up.
    #[test]
    fn an_outage_longer_than_the_leader_lease_keeps_the_hold_when_no_one_took_over() {
        let mut server = RedisServer::start_persistent();
        let url = server.url();
        let lease = Duration::from_secs(1);
        let a = RedisStore::open_active(&url, "farm", lease).unwrap();
        // a standby of another farm on the server, whose active one (a lease of 8 s) outlasts the outage,
        // and which asks for the lease every 2 s
        let other_lease = Duration::from_secs(8);
        let other = RedisStore::open_active(&url, "other", other_lease).unwrap();
        let standby = {
            let url = url.clone();
            std::thread::spawn(move || RedisStore::open_active(&url, "other", other_lease))
        };
        std::thread::sleep(Duration::from_millis(300));
        let (job, tasks) = super::super::tests::job("job-1", 1);
        server.kill();
        let held = a.write(vec![Op::Insert(job.clone(), tasks.clone())]);
        assert!(super::super::wait(held).unwrap_err().held_back);
        // past a lease, short of STEP_DOWN_LEASES
        std::thread::sleep(lease * 2);
        assert!(a.lost().is_none(), "{:?}", a.lost());
        assert_eq!(a.hold().unwrap().left, Duration::ZERO, "lapsed");
        assert!(
            !standby.is_finished(),
            "the standby waits through the outage"
        );
        server.restart();
        let deadline = std::time::Instant::now() + lease * 5;
        while (a.hold().unwrap().left.is_zero() || a.behind().is_some())
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(a.behind().is_none(), "the writes held back are applied");
        assert!(a.lost().is_none(), "{:?}", a.lost());
        assert!(!a.hold().unwrap().left.is_zero(), "held again");
        assert_eq!(a.load().unwrap(), vec![(job, tasks)]);
        assert!(
            !standby.is_finished(),
            "the other farm's active one still holds"
        );
        drop(other);
        let taken = standby.join().unwrap().unwrap();
        assert!(taken.lost().is_none());
        // out of reach for STEP_DOWN_LEASES leases: the active one gives up
        server.kill();
        let deadline = std::time::Instant::now() + lease * (STEP_DOWN_LEASES + 3);
        while a.lost().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let lost = a.lost().unwrap();
        assert!(
            lost.contains("out of reach") && lost.contains("leader leases"),
            "{lost}"
        );
    }

    #[test]
    fn an_unreachable_server_fails_the_write_and_the_next_one_reconnects() {
        let server = RedisServer::start();
        let url = server.url();
        let store = RedisStore::open(&url, DEFAULT_PREFIX).unwrap();
        let (job, tasks) = super::super::tests::job("job-1", 1);
        drop(server);
        let write = || store.write(vec![Op::Insert(job.clone(), tasks.clone())]);
        let err = super::super::wait(write()).unwrap_err();
        assert!(
            err.to_string().contains("redis") && err.is_unavailable(),
            "{err:?}"
        );
        assert!(RedisStore::open(&url, DEFAULT_PREFIX).is_err());
        // a server back on that address: the next write connects again
        let port = url.rsplit(':').next().unwrap().parse().unwrap();
        let _back = RedisServer::start_on(port);
        super::super::wait(write()).unwrap();
        assert_eq!(store.load().unwrap(), vec![(job, tasks)]);
    }

    /// Waits (up to 10 s) for `store` to apply the writes it held back, and checks that it is still the
    /// active one.
    fn caught_up(store: &RedisStore) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.behind().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the backlog is applied"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(store.lost().is_none(), "still the active one");
    }

    /// A server out of memory (maxmemory under noeviction: every write answered OOM) is out of reach for
    /// the store's writes: they are held back, not dropped (the scheduler's memory has them), and applied
    /// in order once it has room again.
    #[test]
    fn writes_refused_for_the_server_s_memory_are_held_back_and_applied_once_it_has_room() {
        let server = RedisServer::start();
        let store =
            RedisStore::open_active(&server.url(), "farm", Duration::from_secs(30)).unwrap();
        let mut admin = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let set = |con: &mut redis::Connection, key: &str, value: &str| {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg(key)
                .arg(value)
                .query::<()>(con)
                .unwrap()
        };
        set(&mut admin, "maxmemory-policy", "noeviction");
        set(&mut admin, "maxmemory", "1");
        let (job, tasks) = super::super::tests::job("job-1", 1);
        let e = super::super::wait(store.write(vec![Op::Insert(job.clone(), tasks.clone())]))
            .unwrap_err();
        assert!(
            e.is_unavailable() && e.message.contains("OOM") && e.message.contains("held back"),
            "{e:?}"
        );
        assert!(store.behind().is_some());
        set(&mut admin, "maxmemory", "0");
        caught_up(&store);
        assert_eq!(store.load().unwrap(), vec![(job, tasks)]);
    }

    /// A server restarted mid-stream (persistence on): the writes made while it is down fail UNAVAILABLE
    /// at once and are held back ([`Store::behind`]), then applied in order once it answers: the store
    /// ends with every write, the last one last.
    #[test]
    fn writes_made_while_the_server_restarts_are_held_back_and_applied_in_order() {
        let mut server = RedisServer::start_persistent();
        let store =
            RedisStore::open_active(&server.url(), "farm", Duration::from_secs(30)).unwrap();
        let (mut job, tasks) = super::super::tests::job("job-1", 1);
        super::super::wait(store.write(vec![Op::Insert(job.clone(), tasks.clone())])).unwrap();
        assert!(store.behind().is_none());
        server.kill();
        for n in 0..5 {
            job.strikes.insert("w".into(), n);
            let e = super::super::wait(store.write(vec![Op::Job(job.clone())])).unwrap_err();
            assert!(
                e.is_unavailable() && e.message.contains("held back"),
                "{e:?}"
            );
            assert!(store.behind().is_some());
        }
        server.restart();
        caught_up(&store);
        job.error = "after the restart".into();
        super::super::wait(store.write(vec![Op::Job(job.clone())])).unwrap();
        assert_eq!(store.load().unwrap(), vec![(job, tasks)]);
    }

    /// A server, and a job's insert held back while it was out of reach: the store's writer's state set
    /// by hand, for [`RedisStore::apply_batch`]'s next tries.
    struct HeldBack {
        server: RedisServer,
        client: redis::Client,
        keys: Keys,
        /// A connection of the test's own.
        raw: redis::Connection,
        job: (JobMeta, Vec<TaskRecord>),
        con: Option<redis::Connection>,
        backlog: Vec<redis::Cmd>,
        behind: Mutex<Option<StoreError>>,
    }

    impl HeldBack {
        fn new() -> HeldBack {
            let server = RedisServer::start();
            let client = redis::Client::open(server.url()).unwrap();
            let keys = Keys {
                prefix: "farm".into(),
            };
            let raw = client.get_connection().unwrap();
            let job = super::super::tests::job("job-1", 1);
            let backlog = commands(&keys, &[Op::Insert(job.0.clone(), job.1.clone())]).unwrap();
            let held =
                StoreError::unavailable("connection refused").holding_back("the server answers");
            HeldBack {
                server,
                client,
                keys,
                raw,
                job,
                con: None,
                backlog,
                behind: Mutex::new(Some(held)),
            }
        }

        /// The writer's next try under `fence`, with a write of `ops` when given: that write's outcome.
        fn try_again(
            &mut self,
            fence: &Option<(Epoch, Arc<Mutex<Option<String>>>)>,
            ops: Option<Vec<Op>>,
        ) -> Option<Result<(), StoreError>> {
            let (batch, outcome) = match ops {
                Some(ops) => {
                    let (done, outcome) = tokio::sync::oneshot::channel();
                    (vec![Write { ops, done }], Some(outcome))
                }
                None => (Vec::new(), None),
            };
            let (client, keys) = (&self.client, &self.keys);
            RedisStore::apply_batch(
                client,
                keys,
                &mut self.con,
                fence,
                &self.behind,
                &mut self.backlog,
                batch,
            );
            outcome.map(|o| o.blocking_recv().unwrap())
        }
    }

    /// A write that its transaction finds fenced (another coordinator took the epoch) before this one's
    /// renewal noticed marks the hold lost, so that the coordinator stops rather than serve on once its
    /// held-back writes are dropped. An epoch of the same number taken by another coordinator (the store
    /// lost its data, and numbers started again) fences it too; its own epoch does not.
    #[test]
    fn a_write_fenced_in_its_transaction_marks_the_hold_lost() {
        let mine = |number| Epoch {
            number,
            node: "7-mine".into(),
        };
        for (stored, why) in [
            ("5", "epoch is 4, the store's 5"),
            ("5:7-other", "epoch is 4, the store's 5"),
            (
                "4:7-other",
                "the store's is 4 taken by another coordinator (7-other)",
            ),
        ] {
            let mut h = HeldBack::new();
            redis::cmd("SET")
                .arg(h.keys.epoch())
                .arg(stored)
                .exec(&mut h.raw)
                .unwrap();
            let lost = Arc::new(Mutex::new(None));
            let e = h
                .try_again(
                    &Some((mine(4), lost.clone())),
                    Some(vec![Op::Drained(Default::default())]),
                )
                .unwrap()
                .unwrap_err();
            assert!(e.kind == StoreErrorKind::Fenced && !e.held_back, "{e:?}");
            let said = lost.lock().unwrap().clone().expect("the hold is lost");
            assert!(said.contains(why), "{stored}: {said}");
        }
        let mut h = HeldBack::new();
        redis::cmd("SET")
            .arg(h.keys.epoch())
            .arg(mine(4).stored())
            .exec(&mut h.raw)
            .unwrap();
        let lost = Arc::new(Mutex::new(None));
        let write = Some(vec![Op::Drained(Default::default())]);
        h.try_again(&Some((mine(4), lost.clone())), write)
            .unwrap()
            .unwrap();
        assert!(lost.lock().unwrap().is_none());
    }

    /// A server that does not answer is named (its address, not the url's password).
    #[test]
    fn a_server_out_of_reach_at_open_is_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://:secret@127.0.0.1:{port}/");
        let e = RedisStore::open(&url, "farm").err().expect("refused");
        assert!(
            e.message
                .ends_with(&format!(" (redis at 127.0.0.1:{port})"))
                && !e.message.contains("secret"),
            "{e}"
        );
        // a url that does not parse is named without its password too
        let e = RedisStore::open("redis://:secret@127.0.0.1:99999999/", "farm")
            .err()
            .expect("refused");
        assert!(
            e.message
                .starts_with("redis url 'redis://***@127.0.0.1:99999999/'")
                && !e.message.contains("secret"),
            "{e}"
        );
        let e = RedisStore::open("redis://:se/cr#et@127.0.0.1:99999999/", "farm")
            .err()
            .expect("refused");
        assert!(
            !e.message.contains("cr#et") && !e.message.contains("se/"),
            "{e}"
        );
    }

    /// A user whose ACL refuses scripts is told so when the store opens, naming what to grant.
    #[test]
    fn a_user_that_may_not_run_scripts_is_refused_at_open() {
        let server = RedisServer::start();
        let mut con = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("ACL")
            .arg(&[
                "SETUSER",
                "noscripts",
                "on",
                ">pw",
                "~*",
                "+@all",
                "-@scripting",
            ])
            .exec(&mut con)
            .unwrap();
        let url = server
            .url()
            .replacen("redis://", "redis://noscripts:pw@", 1);
        let e = RedisStore::open(&url, "farm").err().expect("refused");
        assert!(e.message.contains("+@scripting"), "{e}");
        redis::cmd("ACL")
            .arg(&["SETUSER", "noscripts", "+@scripting"])
            .exec(&mut con)
            .unwrap();
        assert!(RedisStore::open(&url, "farm").is_ok());
    }

    /// Once writes are held back, a later failure of another kind (an error of the server: here a key of
    /// the wrong type, as an operator's mistake makes) holds them back still, in order, rather than drop
    /// writes whose callers were told they would be applied; all are applied once the server takes them.
    #[test]
    fn writes_held_back_stay_held_back_whatever_error_the_next_try_meets() {
        let mut h = HeldBack::new();
        // the next try meets WRONGTYPE on the list of jobs
        redis::cmd("SET")
            .arg(h.keys.jobs())
            .arg("not a sorted set")
            .exec(&mut h.raw)
            .unwrap();
        let later = super::super::tests::job("job-2", 2).0;
        let e = h
            .try_again(&None, Some(vec![Op::Job(later)]))
            .unwrap()
            .unwrap_err();
        assert!(e.held_back && e.message.contains("WRONGTYPE"), "{e:?}");
        // UNAVAILABLE, as for a server out of reach: the callers try again later
        assert_eq!(e.kind, StoreErrorKind::Unavailable, "{e:?}");
        assert!(h.behind.lock().unwrap().is_some() && h.backlog.len() > 2);
        // the operator's mistake undone: the next try applies them all, in order
        redis::cmd("DEL")
            .arg(h.keys.jobs())
            .exec(&mut h.raw)
            .unwrap();
        assert!(h.try_again(&None, None).is_none());
        assert!(h.behind.lock().unwrap().is_none() && h.backlog.is_empty());
        let store = RedisStore::open(&h.server.url(), "farm").unwrap();
        assert_eq!(store.load().unwrap(), vec![h.job]);
    }
}
