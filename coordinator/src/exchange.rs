//! Exact mode over several workers: the coordinator adds up the parts of the shards of a scale
//! (WorkerService.Exchange; the engine's `shard` module says what the parts are).
//!
//! The shards of a scale form a group. Each shard task's attempt calls 0, 1, 2, ... in step with the others:
//! a call answers once every shard gave its parts of that call, with the sums, over the shards that gave
//! them, of each of the caller's keys (added in shard order, so every shard gets the same bits). Call 0
//! joins: a shard's new attempt (another lease) drops whatever the group had going, and the other shards'
//! waiting calls fail, so that they start again with it. A call fails as soon as a member's lease ended
//! (its worker failed, left or was cancelled): the shards fail their tasks as a group failure, and every
//! shard is retried.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stylefarm_core::ids::{JobId, LeaseId};
use tokio::sync::watch;

/// How long a shard's call 0 waits for the other shards of its group to join (be leased and start) before
/// it fails: they may be queued behind other work, or waiting out a retry's backoff.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(600);

/// The most bytes of values one call may give: the Gram sums (2.4 MB with the default style layers) and
/// two bands of gradient rows (3 channels x twice the halo x the canvas' width, float32: 100 MB for a
/// 16384-px-wide canvas in 4096-px blocks), with room to spare.
pub const MAX_EXCHANGE_BYTES: usize = 512 << 20;

/// How often a waiting call looks whether the group's other shards still hold their leases.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);

pub use stylefarm_proto::exchange::Parts;

/// Why a call failed: the text goes back to the shard, which fails its task as a group failure.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExchangeError {
    /// Another shard's lease ended, or another attempt of it joined: the group starts again.
    #[error("the group starts again: {0}")]
    Restart(String),
    /// The caller's own call makes no sense (a stale lease, a call given twice, parts that disagree in
    /// length with another shard's).
    #[error("{0}")]
    Invalid(String),
}

/// Where a shard sits: its scale's group and its index in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ShardOf {
    /// The job.
    pub job: JobId,
    /// The scale of the job's pyramid.
    pub scale: u32,
    /// The shard's index, and the number of shards of the scale.
    pub index: u32,
    /// Number of shards of the scale.
    pub shards: u32,
}

#[derive(Default)]
struct Call {
    given: BTreeMap<u32, Parts>,
    sums: Option<Parts>,
    taken: u32,
    failed: Option<ExchangeError>,
}

struct Group {
    shards: u32,
    /// Each shard's current attempt.
    members: BTreeMap<u32, LeaseId>,
    calls: BTreeMap<u64, Call>,
    changed: watch::Sender<u64>,
    touched: Instant,
}

impl Group {
    fn new(shards: u32) -> Group {
        Group {
            shards,
            members: BTreeMap::new(),
            calls: BTreeMap::new(),
            changed: watch::channel(0).0,
            touched: Instant::now(),
        }
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Fails every call, with `error`.
    fn fail_all(&mut self, error: &ExchangeError) {
        for call in self.calls.values_mut() {
            call.failed.get_or_insert_with(|| error.clone());
        }
        self.notify();
    }
}

/// The exchanges of every sharded scale in progress.
#[derive(Default)]
pub struct Exchanges {
    groups: Mutex<HashMap<(JobId, u32), Group>>,
}

/// The sums of each key's parts, over the given parts in shard order.
fn add_up(given: &BTreeMap<u32, Parts>) -> Result<Parts, ExchangeError> {
    let mut sums: Parts = Vec::new();
    for (shard, parts) in given {
        for (key, values) in parts {
            match sums.iter_mut().find(|(k, _)| k == key) {
                Some((_, sum)) if sum.len() == values.len() => {
                    sum.iter_mut().zip(values).for_each(|(s, v)| *s += v)
                }
                Some((_, sum)) => {
                    return Err(ExchangeError::Invalid(format!(
                        "shard {shard} gave {} values under key {key}, another shard {}",
                        values.len(),
                        sum.len()
                    )))
                }
                None => sums.push((*key, values.clone())),
            }
        }
    }
    Ok(sums)
}

impl Exchanges {
    /// Gives `parts` as shard `of`'s call `call` under `lease`, and waits for the sums of its keys;
    /// `live(lease)` says whether a shard's lease still holds.
    pub async fn exchange(
        &self,
        of: &ShardOf,
        lease: &LeaseId,
        call: u64,
        parts: Parts,
        live: impl Fn(&LeaseId) -> bool,
    ) -> Result<Parts, ExchangeError> {
        let key = (of.job.clone(), of.scale);
        let keys: Vec<u64> = parts.iter().map(|(k, _)| *k).collect();
        let mut changed = {
            let mut groups = self.groups.lock().unwrap();
            // groups nobody called for a while are done (or abandoned)
            groups.retain(|_, g| g.touched.elapsed() < 2 * JOIN_TIMEOUT);
            let group = groups
                .entry(key.clone())
                .or_insert_with(|| Group::new(of.shards));
            if group.shards != of.shards {
                *group = Group::new(of.shards);
            }
            group.touched = Instant::now();
            if group.members.get(&of.index) != Some(lease) {
                if call != 0 {
                    return Err(ExchangeError::Invalid(format!(
                        "call {call} of shard {} under a lease that is not its current attempt's",
                        of.index
                    )));
                }
                // a new attempt of this shard: whatever the group had going starts again
                if group.members.insert(of.index, lease.clone()).is_some() {
                    let error = ExchangeError::Restart(format!("shard {} started again", of.index));
                    group.fail_all(&error);
                    group.calls.retain(|&n, _| n == 0);
                    if let Some(first) = group.calls.get_mut(&0) {
                        first.given.remove(&of.index);
                        first.failed = None;
                    }
                }
            }
            let entry = group.calls.entry(call).or_default();
            if entry.given.insert(of.index, parts).is_some() {
                return Err(ExchangeError::Invalid(format!(
                    "shard {} gave call {call} twice",
                    of.index
                )));
            }
            if entry.given.len() as u32 == group.shards {
                match add_up(&entry.given) {
                    Ok(sums) => entry.sums = Some(sums),
                    Err(e) => entry.failed = Some(e),
                }
                entry.given.clear();
            }
            group.notify();
            group.changed.subscribe()
        };
        let started = Instant::now();
        loop {
            {
                let mut groups = self.groups.lock().unwrap();
                let Some(group) = groups.get_mut(&key) else {
                    return Err(ExchangeError::Restart("the group was dropped".into()));
                };
                if group.members.get(&of.index) != Some(lease) {
                    return Err(ExchangeError::Restart(format!(
                        "another attempt of shard {} joined",
                        of.index
                    )));
                }
                let shards = group.shards;
                let Some(entry) = group.calls.get_mut(&call) else {
                    return Err(ExchangeError::Restart("the group started again".into()));
                };
                if let Some(e) = &entry.failed {
                    return Err(e.clone());
                }
                if let Some(sums) = &entry.sums {
                    let mine = keys
                        .iter()
                        .map(|k| {
                            sums.iter()
                                .find(|(key, _)| key == k)
                                .cloned()
                                .ok_or_else(|| ExchangeError::Invalid(format!("no sum of key {k}")))
                        })
                        .collect::<Result<Parts, _>>()?;
                    entry.taken += 1;
                    if entry.taken == shards {
                        group.calls.remove(&call);
                    }
                    return Ok(mine);
                }
                if call == 0 && started.elapsed() > JOIN_TIMEOUT {
                    let error = ExchangeError::Restart(format!(
                        "{} of {} shards joined within {} s",
                        entry.given.len(),
                        shards,
                        JOIN_TIMEOUT.as_secs()
                    ));
                    entry.given.remove(&of.index);
                    return Err(error);
                }
                changed.borrow_and_update();
            }
            if tokio::time::timeout(LIVENESS_CHECK, changed.changed())
                .await
                .is_err()
            {
                // quiet for a while: does every member still hold its lease?
                let mut groups = self.groups.lock().unwrap();
                if let Some(group) = groups.get_mut(&key) {
                    let gone = group
                        .members
                        .iter()
                        .find(|(_, l)| !live(l))
                        .map(|(shard, _)| *shard);
                    if let Some(shard) = gone {
                        group.members.remove(&shard);
                        let error = ExchangeError::Restart(format!(
                            "shard {shard}'s lease ended (its task failed, its worker left, or the \
                             job was cancelled)"
                        ));
                        group.fail_all(&error);
                        if shard == of.index {
                            return Err(error);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn of(index: u32, shards: u32) -> ShardOf {
        ShardOf {
            job: JobId::from("job".to_string()),
            scale: 1,
            index,
            shards,
        }
    }

    fn lease(s: &str) -> LeaseId {
        LeaseId::from(s.to_string())
    }

    /// Two shards' calls: each gets the sums of its own keys, added in shard order, the same on both.
    #[tokio::test]
    async fn shards_get_the_sums_of_their_keys() {
        let ex = Arc::new(Exchanges::default());
        let (a, b) = (ex.clone(), ex.clone());
        let first = tokio::spawn(async move {
            a.exchange(
                &of(0, 2),
                &lease("a"),
                0,
                vec![(0, vec![1.0, 2.0]), (193, vec![0.5])],
                |_| true,
            )
            .await
        });
        let second = tokio::spawn(async move {
            b.exchange(
                &of(1, 2),
                &lease("b"),
                0,
                vec![(0, vec![10.0, 20.0]), (193, vec![0.25])],
                |_| true,
            )
            .await
        });
        let (first, second) = (
            first.await.unwrap().unwrap(),
            second.await.unwrap().unwrap(),
        );
        assert_eq!(first, vec![(0, vec![11.0, 22.0]), (193, vec![0.75])]);
        assert_eq!(first, second);
        // the call is gone once both took it
        assert!(ex
            .groups
            .lock()
            .unwrap()
            .values()
            .all(|g| g.calls.is_empty()));
    }

    /// A waiting call fails when another shard's lease ends, and when another attempt of a shard joins;
    /// parts that disagree in length fail the call.
    #[tokio::test]
    async fn a_call_fails_when_another_shard_is_gone_or_starts_again() {
        let ex = Arc::new(Exchanges::default());
        let e = ex.clone();
        // shard 1 joined with lease "b", whose lease then ended
        let waiting = tokio::spawn(async move {
            e.exchange(&of(0, 2), &lease("a"), 0, vec![(0, vec![1.0])], |l| {
                l.as_str() != "b"
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        ex.groups
            .lock()
            .unwrap()
            .get_mut(&(of(0, 2).job, 1))
            .map(|g| g.members.insert(1, lease("b")));
        let error = waiting.await.unwrap().unwrap_err();
        assert!(
            matches!(&error, ExchangeError::Restart(m) if m.contains("shard 1")),
            "{error}"
        );

        let ex = Arc::new(Exchanges::default());
        let (a, b) = (ex.clone(), ex.clone());
        let done = tokio::spawn(async move {
            let one = [(0u64, vec![1.0f32])];
            a.exchange(&of(0, 2), &lease("a"), 0, one.to_vec(), |_| true)
                .await?;
            a.exchange(&of(0, 2), &lease("a"), 1, one.to_vec(), |_| true)
                .await
        });
        b.exchange(&of(1, 2), &lease("b"), 0, vec![(0, vec![1.0])], |_| true)
            .await
            .unwrap();
        // shard 1 starts again (a new lease) while shard 0 waits in call 1
        tokio::time::sleep(Duration::from_millis(50)).await;
        let again = ex.clone();
        let rejoined = tokio::spawn(async move {
            again
                .exchange(&of(1, 2), &lease("b2"), 0, vec![(0, vec![1.0])], |_| true)
                .await
        });
        let error = done.await.unwrap().unwrap_err();
        assert!(
            matches!(&error, ExchangeError::Restart(m) if m.contains("started again")),
            "{error}"
        );
        // shard 0's new attempt joins the new one of shard 1
        let sums = ex
            .exchange(&of(0, 2), &lease("a2"), 0, vec![(0, vec![2.0])], |_| true)
            .await
            .unwrap();
        assert_eq!(sums, vec![(0, vec![3.0])]);
        assert_eq!(rejoined.await.unwrap().unwrap(), sums);

        let ex = Arc::new(Exchanges::default());
        let e = ex.clone();
        let short = tokio::spawn(async move {
            e.exchange(&of(0, 2), &lease("a"), 0, vec![(0, vec![1.0])], |_| true)
                .await
        });
        let long = ex
            .exchange(&of(1, 2), &lease("b"), 0, vec![(0, vec![1.0, 2.0])], |_| {
                true
            })
            .await;
        assert!(matches!(long, Err(ExchangeError::Invalid(m)) if m.contains("values under key 0")));
        assert!(short.await.unwrap().is_err());
    }
}
