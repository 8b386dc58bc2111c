//! The machine's memory as the CPU renders of one process share it: `local --workers N` runs N engines in
//! one process, and renders that each fit the machine ([`crate::Engine::memory_bytes`]) may not fit it
//! together; the kernel's OOM killer would then take the whole process, every worker and the embedded
//! coordinator with it. Each render takes its estimate ([`stylefarm_core::memory`]) from the process'
//! budget before it starts, and gives it back when it ends (its [`Reservation`] dropped, on an error or a
//! panic too); one that does not fit beside the renders running waits for them to end (not in turn: a
//! smaller one that fits may start before it). Separate worker processes on one machine do not share it:
//! `--device-memory` bounds each one's renders ([`crate::EngineOptions::cpu_memory_bytes`]).

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::Error;

/// Bytes reserved by the renders running, and the wakeup of those waiting for some to end.
pub(crate) struct MemoryBudget {
    in_use: Mutex<u64>,
    freed: Condvar,
}

/// The budget of this process' CPU renders.
pub(crate) static CPU: MemoryBudget = MemoryBudget::new();

/// How often a render waiting for memory looks at its cancel ([`crate::cancel`]).
const CANCEL_POLL: Duration = Duration::from_millis(100);

impl MemoryBudget {
    pub(crate) const fn new() -> MemoryBudget {
        MemoryBudget {
            in_use: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Takes `need` bytes of `limit`: at once when they fit beside the renders running (or none runs: a
    /// render larger than `limit` is refused before this), else once enough of them have ended, unless
    /// this thread's render is cancelled meanwhile ([`Error::Cancelled`]). With `wait` false it takes
    /// them at once whatever is in use: a shard of an exact-mode scale starts with its group, whose
    /// shards wait for each other at every step (one waiting here for another's memory would hold them
    /// all).
    pub(crate) fn reserve(
        &self,
        need: u64,
        limit: u64,
        wait: bool,
    ) -> Result<Reservation<'_>, Error> {
        let mut in_use = self.in_use.lock().unwrap_or_else(|e| e.into_inner());
        let mut said = false;
        while wait && *in_use > 0 && in_use.saturating_add(need) > limit {
            if !said {
                tracing::info!(
                    need_bytes = need,
                    in_use_bytes = *in_use,
                    limit_bytes = limit,
                    "waiting for memory: this process' other renders hold it"
                );
                said = true;
            }
            crate::cancel::check()?;
            in_use = (self.freed.wait_timeout(in_use, CANCEL_POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *in_use = in_use.saturating_add(need);
        Ok(Reservation {
            budget: self,
            bytes: need,
        })
    }

    #[cfg(test)]
    fn in_use(&self) -> u64 {
        *self.in_use.lock().unwrap()
    }
}

/// Bytes taken from a [`MemoryBudget`], given back when dropped.
pub(crate) struct Reservation<'a> {
    budget: &'a MemoryBudget,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut in_use = self.budget.in_use.lock().unwrap_or_else(|e| e.into_inner());
        *in_use = in_use.saturating_sub(self.bytes);
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
        drop(first);
        assert_eq!(budget.in_use(), 0);
    }
}
