//! A render's cancel, looked at by the work that takes long without an evaluation (where the optimizer's
//! progress callback looks): the Gram matrices and content targets of a large canvas, block by block.
//! On a CPU those take minutes for a large tile; with this they stop within a block.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::Error;

thread_local! {
    /// The cancel of the render running on this thread, if its caller gave one.
    static CANCEL: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Runs `f` with `flag` as this thread's cancel: once it is set, the blocked target computations `f` calls
/// stop with [`Error::Cancelled`] at their next block. The cancel before is back when `f` returns (or
/// unwinds).
pub fn with_cancel<T>(flag: Arc<AtomicBool>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Arc<AtomicBool>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let before = self.0.take();
            CANCEL.with(|c| *c.borrow_mut() = before);
        }
    }
    let _restore = Restore(CANCEL.with(|c| c.borrow_mut().replace(flag)));
    f()
}

/// [`Error::Cancelled`] when this thread's cancel ([`with_cancel`]) is set.
pub(crate) fn check() -> Result<(), Error> {
    let cancelled = CANCEL.with(|c| {
        c.borrow()
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
    });
    if cancelled {
        Err(Error::Cancelled)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cancel_is_the_callers_and_the_one_before_comes_back() {
        assert!(check().is_ok(), "no cancel given");
        let outer = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(AtomicBool::new(true));
        with_cancel(outer.clone(), || {
            assert!(check().is_ok());
            with_cancel(inner, || assert!(matches!(check(), Err(Error::Cancelled))));
            assert!(check().is_ok(), "the outer one again");
            outer.store(true, Ordering::Relaxed);
            assert!(matches!(check(), Err(Error::Cancelled)));
        });
        assert!(check().is_ok(), "none after");
        // back after a panic too
        let set = Arc::new(AtomicBool::new(true));
        let unwound = std::panic::catch_unwind(|| with_cancel(set, || panic!("in a render")));
        assert!(unwound.is_err());
        assert!(check().is_ok());
    }
}
