//! The machine's memory as the CPU renders of one process share it: `local --workers N` runs N engines in
//! one process, and renders that each fit the machine ([`crate::Engine::memory_bytes`]) may not fit it
//! together; the kernel's OOM killer would then take the whole process, every worker and the embedded
//! coordinator with it. Each render takes its estimate ([`stylefarm_core::memory`]) from the process'
//! budget before it starts, and gives it back when it ends (its [`Reservation`] dropped, on an error or a
//! panic too); one that does not fit beside the renders running waits for them to end, in turn: a render
//! that comes later waits behind it, even one that would fit (else a stream of small renders could keep a
//! large one waiting for good). Separate worker processes on one machine do not share it:
//! `--device-memory` bounds each one's renders ([`crate::EngineOptions::cpu_memory_bytes`]).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::Error;

/// Bytes reserved by the renders running, the renders waiting in turn, and the wakeup of those waiting.
pub(crate) struct MemoryBudget {
    held: Mutex<Held>,
    freed: Condvar,
}

/// What a [`MemoryBudget`] holds under its lock.
struct Held {
    /// Bytes reserved by the renders running.
    in_use: u64,
    /// The tickets of the renders waiting, oldest first: only the first may start.
    waiting: VecDeque<u64>,
    /// The next waiter's ticket.
    next_ticket: u64,
}

impl Held {
    /// Whether `need` bytes fit beside the renders running (any render fits when none runs).
    fn fits(&self, need: u64, limit: u64) -> bool {
        self.in_use == 0 || self.in_use.saturating_add(need) <= limit
    }
}

/// The budget of this process' CPU renders.
pub(crate) static CPU: MemoryBudget = MemoryBudget::new();

/// How often a render waiting for memory looks at its cancel ([`crate::cancel`]).
const CANCEL_POLL: Duration = Duration::from_millis(100);

impl MemoryBudget {
    pub(crate) const fn new() -> MemoryBudget {
        MemoryBudget {
            held: Mutex::new(Held {
                in_use: 0,
                waiting: VecDeque::new(),
                next_ticket: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        // consistent whatever panicked while holding it: each update is whole under the lock
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `need` bytes of `limit`: at once when they fit beside the renders running (or none runs: a
    /// render larger than `limit` is refused before this) and none waits, else in turn, once enough of
    /// them have ended, unless this thread's render is cancelled meanwhile ([`Error::Cancelled`]). With
    /// `wait` false it takes them at once whatever is in use: a shard of an exact-mode scale starts with
    /// its group, whose shards wait for each other at every step (one waiting here for another's memory
    /// would hold them all).
    pub(crate) fn reserve(
        &self,
        need: u64,
        limit: u64,
        wait: bool,
    ) -> Result<Reservation<'_>, Error> {
        let mut held = self.held();
        if !wait || (held.waiting.is_empty() && held.fits(need, limit)) {
            held.in_use = held.in_use.saturating_add(need);
            return Ok(Reservation {
                budget: self,
                bytes: need,
            });
        }
        let ticket = held.next_ticket;
        held.next_ticket += 1;
        held.waiting.push_back(ticket);
        tracing::info!(
            need_bytes = need,
            in_use_bytes = held.in_use,
            limit_bytes = limit,
            waiting_before = held.waiting.len() - 1,
            "waiting for memory: this process' other renders hold it"
        );
        loop {
            if held.waiting.front() == Some(&ticket) && held.fits(need, limit) {
                held.waiting.pop_front();
                held.in_use = held.in_use.saturating_add(need);
                // the next in turn may fit beside it
                self.freed.notify_all();
                return Ok(Reservation {
                    budget: self,
                    bytes: need,
                });
            }
            if let Err(e) = crate::cancel::check() {
                held.waiting.retain(|&t| t != ticket);
                // the one behind it may be first now
                self.freed.notify_all();
                return Err(e);
            }
            held = (self.freed.wait_timeout(held, CANCEL_POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    #[cfg(test)]
    fn in_use(&self) -> u64 {
        self.held().in_use
    }
}

/// Bytes taken from a [`MemoryBudget`], given back when dropped.
pub(crate) struct Reservation<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut held = self.budget.held();
        held.in_use = held.in_use.saturating_sub(self.bytes);
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_render_that_does_not_fit_beside_the_others_waits_for_them() {
        let budget = MemoryBudget::new();
        let first = budget.reserve(6, 10, true).unwrap();
        // fits beside: at once
        let small = budget.reserve(4, 10, true).unwrap();
        assert_eq!(budget.in_use(), 10);
        drop(small);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let _taken = budget.reserve(6, 10, true).unwrap();
                budget.in_use()
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(!waiter.is_finished(), "6 + 6 > 10: it waits");
            drop(first);
            assert_eq!(
                waiter.join().unwrap(),
                6,
                "it took its 6 once the first ended"
            );
        });
        assert_eq!(budget.in_use(), 0, "every reservation given back");
    }

    /// Renders start in turn: one that would fit waits behind an earlier one that does not, and starts
    /// beside it once it has started.
    #[test]
    fn renders_waiting_for_memory_start_in_turn() {
        let budget = MemoryBudget::new();
        let first = budget.reserve(6, 10, true).unwrap();
        std::thread::scope(|s| {
            let large = s.spawn(|| {
                let taken = budget.reserve(6, 10, true).unwrap();
                std::thread::sleep(Duration::from_millis(600));
                drop(taken);
            });
            while budget.held().waiting.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
            let small = s.spawn(|| {
                let _taken = budget.reserve(4, 10, true).unwrap();
                budget.in_use()
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(!small.is_finished(), "4 fits beside 6, but waits its turn");
            assert!(!large.is_finished());
            drop(first);
            assert_eq!(small.join().unwrap(), 10, "it started beside the large one");
            large.join().unwrap();
        });
        assert_eq!(budget.in_use(), 0, "every reservation given back");
    }

    #[test]
    fn a_waiting_render_stops_at_its_cancel_and_a_shard_does_not_wait() {
        let budget = MemoryBudget::new();
        let first = budget.reserve(6, 10, true).unwrap();
        // a shard: over the limit, at once
        let shard = budget.reserve(6, 10, false).unwrap();
        assert_eq!(budget.in_use(), 12);
        drop(shard);
        let cancel = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                crate::cancel::with_cancel(cancel.clone(), || {
                    budget.reserve(6, 10, true).map(|_| ())
                })
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(!waiter.is_finished());
            cancel.store(true, Ordering::Relaxed);
            assert!(matches!(waiter.join().unwrap(), Err(Error::Cancelled)));
        });
        assert_eq!(budget.in_use(), 6, "the cancelled one took nothing");
        // nor holds its turn: one that fits starts at once
        drop(budget.reserve(4, 10, true).unwrap());
        drop(first);
        assert_eq!(budget.in_use(), 0);
    }
}
