//! Exact mode over several workers: the coordinator adds up the parts of the shards of a scale
//! (WorkerService.Exchange; the engine's `shard` module says what the parts are).
//!
//! The shards of a scale form a group. Each shard task's attempt calls 0, 1, 2, ... in step with the others:
//! a call answers once every shard gave its parts of that call, with the sums, over the shards that gave
//! them, of each of the caller's keys (added in shard order, so every shard gets the same bits). A shard
//! gives its calls in order, each once its previous call has its sums (else the call is refused), so a
//! group holds the parts of two calls at most ([`MAX_EXCHANGE_BYTES`] a shard each). Call 0
//! joins: a shard's new attempt (another lease) in a group that has started makes it start again: every
//! later call fails, and only the shards waiting in call 0 stay members; the others join again with their
//! next attempts. A waiting call after 0 fails as soon as a member's lease ended (its worker failed, left
//! or was cancelled; looked at every second): the shards fail their tasks as a group failure, and every
//! shard is retried. A shard waiting in call 0 waits for the lost shard's next attempt, or for the
//! scale to be planned again for fewer workers (`Coordinator::replan_shards`), which ends its lease.
//! A shard that holds its group back while its lease holds (its engine hung between two calls) is taken
//! back by the scheduler's `--task-stall-secs`: a shard's wait in a call here is no stall
//! (`Scheduler::exchanging`), so the stalled one is the one at fault.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stylefarm_core::ids::{JobId, LeaseId};
use tokio::sync::watch;

/// How long a shard's call 0 waits for the other shards of its group to join (be leased and start) before
/// it fails: they may be queued behind other work, or waiting out a retry's backoff. A group that no live
/// shard holds is dropped once nobody called it for as long.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(600);

/// The most bytes of values one call may give: the Gram sums (2.4 MB with the default style layers) and
/// two bands of gradient rows (3 channels x twice the halo x the canvas' width, float32 each: 201 MB for
/// a 16384-px-wide canvas in 4096-px blocks, whose halo is 512 px), with room to spare.
pub const MAX_EXCHANGE_BYTES: usize = 1 << 30;

/// The most parts one call may give: key 0 and the gradient rows around at most two band boundaries.
pub const MAX_EXCHANGE_PARTS: usize = 3;

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

/// A shard's current attempt in its group.
struct Member {
    lease: LeaseId,
    /// The call it gives next: calls come in order, one at a time (a shard gives call `n + 1` once call
    /// `n` has its sums), so that a group holds at most two calls' parts.
    next: u64,
}

struct Group {
    shards: u32,
    /// Each shard's current attempt.
    members: BTreeMap<u32, Member>,
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

/// The exchanges of every sharded scale in progress, by job, scale and number of shards (a scale planned
/// again for fewer workers is a group of its own: a late call of a replaced shard cannot disturb it).
#[derive(Default)]
pub struct Exchanges {
    groups: Mutex<HashMap<(JobId, u32, u32), Group>>,
    /// The leases with a call on its way ([`Exchanges::one_call`]).
    calling: Mutex<std::collections::HashSet<LeaseId>>,
}

/// A lease's call on its way ([`Exchanges::one_call`]); it ends when dropped.
pub struct Calling<'a> {
    exchanges: &'a Exchanges,
    lease: LeaseId,
}

impl Drop for Calling<'_> {
    fn drop(&mut self) {
        self.exchanges
            .calling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.lease);
    }
}

impl Exchanges {
    /// Marks `lease`'s call as on its way until the returned guard drops; `None` while another call of
    /// it is: a shard calls once its previous call has its sums, so one at a time, and the coordinator
    /// holds at most one call's values ([`MAX_EXCHANGE_BYTES`]) a lease, whatever a worker sends.
    pub fn one_call(&self, lease: &LeaseId) -> Option<Calling<'_>> {
        let mut calling = self.calling.lock().unwrap_or_else(|p| p.into_inner());
        calling.insert(lease.clone()).then(|| Calling {
            exchanges: self,
            lease: lease.clone(),
        })
    }
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

impl Group {
    /// A new attempt of shard `index` under `lease` joins (its call 0). A group that has not started (no
    /// call answered, no shard's attempt replaced) just takes it in. Otherwise the group starts again:
    /// every call after 0 fails, and of the other shards only those waiting in call 0 under their current
    /// lease stay members (with their parts); the others' next call fails, and they join again.
    fn join(&mut self, index: u32, lease: &LeaseId) {
        let started = self.members.contains_key(&index)
            || self.calls.keys().any(|&n| n > 0)
            || self.calls.get(&0).is_some_and(|c| c.sums.is_some());
        if started {
            let error = ExchangeError::Restart(format!("shard {index} started again"));
            self.fail_all(&error);
            let waiting: BTreeMap<u32, Parts> = self
                .calls
                .remove(&0)
                .filter(|c| c.sums.is_none())
                .map(|c| c.given)
                .unwrap_or_default()
                .into_iter()
                .filter(|(shard, _)| *shard != index)
                .collect();
            self.members.retain(|shard, _| waiting.contains_key(shard));
            self.calls.clear();
            self.calls.insert(
                0,
                Call {
                    given: waiting,
                    ..Call::default()
                },
            );
        }
        self.members.insert(
            index,
            Member {
                lease: lease.clone(),
                next: 0,
            },
        );
        self.notify();
    }

    /// Shard `index`'s lease ended: it is no member until another attempt joins; its part of a call 0 in
    /// progress is dropped, and every later call fails (it cannot complete without it).
    fn left(&mut self, index: u32) {
        self.members.remove(&index);
        let error = ExchangeError::Restart(format!(
            "shard {index}'s lease ended (its task failed, its worker left, or the job was cancelled)"
        ));
        for (&n, call) in self.calls.iter_mut() {
            if n == 0 && call.sums.is_none() {
                call.given.remove(&index);
            } else {
                call.failed.get_or_insert_with(|| error.clone());
            }
        }
        self.notify();
    }
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
        let key = (of.job.clone(), of.scale, of.shards);
        let keys: Vec<u64> = parts.iter().map(|(k, _)| *k).collect();
        let mut changed = {
            let mut groups = self.groups.lock().unwrap();
            // groups that no live shard holds and nobody called for a while are done (or abandoned)
            groups.retain(|_, g| {
                g.touched.elapsed() < JOIN_TIMEOUT || g.members.values().any(|m| live(&m.lease))
            });
            let group = groups
                .entry(key.clone())
                .or_insert_with(|| Group::new(of.shards));
            group.touched = Instant::now();
            if group.members.get(&of.index).map(|m| &m.lease) != Some(lease) {
                if call != 0 {
                    return Err(ExchangeError::Restart(format!(
                        "shard {} must join again: the group started again without it",
                        of.index
                    )));
                }
                group.join(of.index, lease);
            }
            if call > 0 && (group.members.len() as u32) < group.shards {
                return Err(ExchangeError::Restart(
                    "a shard of the group left, and has not joined again".into(),
                ));
            }
            let next = group.members.get(&of.index).map_or(0, |m| m.next);
            if call != next {
                return Err(ExchangeError::Invalid(format!(
                    "shard {} gave call {call}: its next call is {next} (calls come in order, once each)",
                    of.index
                )));
            }
            let previous_pending = call
                .checked_sub(1)
                .and_then(|p| group.calls.get(&p))
                .is_some_and(|p| p.sums.is_none() && p.failed.is_none());
            if previous_pending {
                return Err(ExchangeError::Invalid(format!(
                    "shard {} gave call {call} before call {} had its sums",
                    of.index,
                    call - 1
                )));
            }
            if let Some(member) = group.members.get_mut(&of.index) {
                member.next = call + 1;
            }
            let entry = group.calls.entry(call).or_default();
            entry.given.insert(of.index, parts);
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
                group.touched = Instant::now();
                if group.members.get(&of.index).map(|m| &m.lease) != Some(lease) {
                    return Err(ExchangeError::Restart(format!(
                        "shard {} must join again: the group started again without it",
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
                    group.left(of.index);
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
                    let gone: Vec<u32> = group
                        .members
                        .iter()
                        .filter(|(_, m)| !live(&m.lease))
                        .map(|(shard, _)| *shard)
                        .collect();
                    for shard in gone {
                        group.left(shard);
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
    /// One call of a lease at a time: a second while the first is on its way is refused, before the
    /// coordinator holds any of its values; another lease's is not.
    #[test]
    fn a_lease_has_one_call_on_its_way_at_a_time() {
        let exchanges = Exchanges::default();
        let (a, b) = (LeaseId::new("lease-a"), LeaseId::new("lease-b"));
        let first = exchanges.one_call(&a).expect("the first call");
        assert!(exchanges.one_call(&a).is_none(), "a second at once");
        assert!(exchanges.one_call(&b).is_some(), "another lease's");
        drop(first);
        assert!(
            exchanges.one_call(&a).is_some(),
            "the next, once the first ended"
        );
    }

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

    /// A waiting call fails when another shard's lease ends, or when another attempt of a shard joins;
    /// the shards' next attempts then meet in call 0. A shard waiting in call 0 keeps waiting for a lost
    /// shard's next attempt. Parts that disagree in length fail the call.
    #[tokio::test]
    async fn a_call_fails_when_another_shard_is_gone_or_starts_again() {
        let one = || vec![(0u64, vec![1.0f32])];
        for restart in [false, true] {
            let ex = Arc::new(Exchanges::default());
            let (a, b) = (ex.clone(), ex.clone());
            let first = tokio::spawn(async move {
                a.exchange(&of(0, 2), &lease("a"), 0, one(), |_| true)
                    .await?;
                // in call 1, shard 1's first lease is gone (restart: its second attempt joins instead)
                a.exchange(&of(0, 2), &lease("a"), 1, one(), |l| {
                    restart || l.as_str() != "b"
                })
                .await
            });
            b.exchange(&of(1, 2), &lease("b"), 0, one(), |_| true)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let again = ex.clone();
            let rejoined = tokio::spawn(async move {
                if restart {
                    again
                        .exchange(&of(1, 2), &lease("b2"), 0, one(), |_| true)
                        .await
                } else {
                    // shard 1 comes back once shard 0 found its lease gone
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    again
                        .exchange(&of(1, 2), &lease("b2"), 0, one(), |_| true)
                        .await
                }
            });
            let error = first.await.unwrap().unwrap_err();
            let expected = if restart {
                "join again"
            } else {
                "shard 1's lease ended"
            };
            assert!(
                matches!(&error, ExchangeError::Restart(m) if m.contains(expected)),
                "{error}"
            );
            // shard 0's next attempt meets shard 1's
            let sums = ex
                .exchange(&of(0, 2), &lease("a2"), 0, vec![(0, vec![2.0])], |_| true)
                .await
                .unwrap();
            assert_eq!(sums, vec![(0, vec![3.0])]);
            assert_eq!(rejoined.await.unwrap().unwrap(), sums);
        }

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

    /// A shard's calls come in order, one at a time: one that gives calls without waiting for their sums
    /// (its streams cancelled) is refused, and the group holds one call's parts, not one per call number.
    #[tokio::test]
    async fn calls_come_in_order_one_at_a_time() {
        let ex = Arc::new(Exchanges::default());
        let one = || vec![(0u64, vec![1.0f32])];
        let call = |shard: u32, call: u64| {
            let ex = ex.clone();
            let name = ["a", "b"][shard as usize];
            tokio::spawn(async move {
                ex.exchange(&of(shard, 2), &lease(name), call, one(), |_| true)
                    .await
            })
        };
        let (a, b) = (call(0, 0), call(1, 0));
        assert_eq!(a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
        // shard 0 gives call 1 and leaves it (its stream cancelled) before shard 1 gives it
        let left = call(0, 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        left.abort();
        for (n, expected) in [
            (1, "gave call 1: its next call is 2"),
            (7, "gave call 7: its next call is 2"),
            (2, "gave call 2 before call 1 had its sums"),
        ] {
            match call(0, n).await.unwrap() {
                Err(ExchangeError::Invalid(m)) => assert!(m.contains(expected), "{m}"),
                other => panic!("call {n}: {other:?}"),
            }
        }
        let held: usize = ex
            .groups
            .lock()
            .unwrap()
            .values()
            .map(|g| g.calls.len())
            .sum();
        assert_eq!(held, 1, "call 1's parts only");
        // shard 1's call 1 completes it, and both go on
        assert_eq!(call(1, 1).await.unwrap().unwrap(), [(0, vec![2.0])]);
        let (a, b) = (call(0, 2), call(1, 2));
        assert_eq!(a.await.unwrap().unwrap(), b.await.unwrap().unwrap());
    }
}
