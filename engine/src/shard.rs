//! Exact mode over several workers (ALGORITHM.md, "Exact distributed mode"): the canvas of a scale is cut
//! into shards, bands of whole block rows ([`stylefarm_core::tiling::shard_rows`]), each optimized by one
//! worker, and every evaluation of the objective is the whole image's:
//!
//! - pass 1: each shard sums `F F^T` over its blocks' own positions; the shards add up those partial Gram
//!   matrices ([`Exchange::sum`], key 0), so that each holds the whole image's Gram matrices, its style
//!   loss and `D = dL/dG`;
//! - pass 2: each shard back-propagates its blocks' share of the objective; the rows that two shards'
//!   regions (band and halo) share get both shards' gradients, summed by the exchange (keyed by the band
//!   boundary they straddle), along with the content and total-variation losses (key 0).
//!
//! A shard optimizes its whole region, and the rows it shares with a neighbour get the same gradient
//! there. Adam's steps are element-wise, so both shards hold the same pixels without sending any. L-BFGS'
//! steps are element-wise too once its dot products are known: each iteration, the shards add up their
//! products over their own rows ([`crate::optim::Reduction`]: one more call, `5 + 5 m` values for a
//! history of `m`), and every shard takes the same step. The shard's result is its band. Gradients and
//! results match one worker's exact mode up to float rounding (the order in which the sums are added).

use std::sync::{Arc, Condvar, Mutex};

use tch::Tensor;

use crate::Error;

/// How the shards of one scale add up their parts of each evaluation.
pub trait Exchange: Send {
    /// Adds up, over the shards of the group, each part `(key, values)` with the parts of the same key that
    /// the other shards give in their same call; returns the sums, in `parts` order, on the device of the
    /// values. Every shard gives key 0; the two shards around a band boundary give the rows around it under
    /// the same key. Every shard makes the same sequence of calls: two per evaluation of the objective, and
    /// with L-BFGS one more per iteration (its dot products, [`crate::optim::Reduction`]). An
    /// error (another shard failed or restarted, the coordinator is away) ends the render with
    /// [`Error::Exchange`].
    fn sum(&mut self, parts: Vec<(u64, Tensor)>) -> Result<Vec<Tensor>, Error>;
}

/// An [`Exchange`] shared by a render's objective evaluations.
pub type SharedExchange = Arc<Mutex<dyn Exchange>>;

/// One shard of an exact-mode scale, as a render sees it: its job's content and init are the shard's
/// region of the canvas (its rows and the objective's halo above and below, [`Shard::region`]).
#[derive(Clone)]
pub struct Shard {
    /// The canvas' width and height, in px.
    pub canvas: (u32, u32),
    /// The rows `[y0, y1)` of the canvas the shard owns: its result.
    pub rows: (u32, u32),
    /// How it adds up its parts with the other shards.
    pub exchange: SharedExchange,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("canvas", &self.canvas)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl Shard {
    /// An error naming `shard` unless its rows are a band of its canvas (`y0 < y1 <= height`).
    pub fn check(&self) -> Result<(), Error> {
        let ((w, h), (y0, y1)) = (self.canvas, self.rows);
        if w == 0 || y0 >= y1 || y1 > h {
            return Err(Error::Core(stylefarm_core::Error::invalid(
                "shard",
                format!("rows {y0}..{y1} are not a band of the {w} x {h} canvas"),
            )));
        }
        Ok(())
    }

    /// The sum over the shards of `partial` (a vector of as many values in each shard), under key 0 of a
    /// call of its exchange.
    pub fn sum(&self, partial: Tensor) -> Result<Tensor, Error> {
        self.exchange
            .lock()
            .map_err(|_| Error::Exchange("a shard's exchange failed before".into()))?
            .sum(vec![(0, partial)])?
            .pop()
            .ok_or_else(|| Error::Exchange("the exchange gave no sum back".into()))
    }

    /// 1 on the elements of `x` (the shard's region, `1 x C x h x W`, [`Shard::region`]) in the shard's own
    /// rows, 0 on the others; flat, of the kind of `x`: what L-BFGS' dot products count
    /// ([`crate::optim::Reduction`]).
    pub fn own_rows(&self, block: u32, x: &Tensor) -> Tensor {
        let top = i64::from(self.rows.0 - self.region(block).0);
        let rows = i64::from(self.rows.1 - self.rows.0);
        let own = x.zeros_like();
        let _ = own.narrow(2, top, rows).fill_(1.0);
        own.view([-1])
    }

    /// The rows `[y0, y1)` of the canvas that the shard's render holds, for blocks of `block` px: its own
    /// rows and the objective's halo ([`stylefarm_core::tiling::objective_halo`]) on either side.
    pub fn region(&self, block: u32) -> (u32, u32) {
        region(self.canvas.1, self.rows, block)
    }
}

/// [`Shard::region`] of the rows `rows` of a canvas `height` px tall.
pub fn region(height: u32, rows: (u32, u32), block: u32) -> (u32, u32) {
    let halo = stylefarm_core::tiling::objective_halo(block);
    (
        rows.0.saturating_sub(halo),
        rows.1.saturating_add(halo).min(height),
    )
}

/// The shared state of an in-process group.
struct Round {
    /// Each shard's parts of the current call, once given.
    given: Vec<Option<Vec<(u64, Tensor)>>>,
    /// The sums of the current call, per key, once every shard gave its parts.
    sums: Option<Vec<(u64, Tensor)>>,
    /// Shards that have taken the sums of the current call.
    taken: usize,
    /// Set when a shard left: every call fails from then on.
    broken: bool,
}

/// One shard's end of an in-process group: the shards of a scale run in threads of one process (tests and
/// benchmarks; a farm's shards exchange through the coordinator). The sums are added in shard order.
pub struct LocalExchange {
    shard: usize,
    state: Arc<(Mutex<Round>, Condvar)>,
}

/// The [`Exchange`]s of an in-process group of `shards` shards, in shard order.
pub fn local_group(shards: usize) -> Vec<LocalExchange> {
    let state = Arc::new((
        Mutex::new(Round {
            given: (0..shards).map(|_| None).collect(),
            sums: None,
            taken: 0,
            broken: false,
        }),
        Condvar::new(),
    ));
    (0..shards)
        .map(|shard| LocalExchange {
            shard,
            state: state.clone(),
        })
        .collect()
}

/// The sum of each key's parts, in the order the parts are given.
pub fn add_up(given: impl IntoIterator<Item = (u64, Tensor)>) -> Vec<(u64, Tensor)> {
    let mut sums: Vec<(u64, Tensor)> = Vec::new();
    for (key, t) in given {
        match sums.iter_mut().find(|(k, _)| *k == key) {
            Some((_, s)) => *s = &*s + t,
            None => sums.push((key, t)),
        }
    }
    sums
}

impl Drop for LocalExchange {
    fn drop(&mut self) {
        // a shard that stops (done, failed or panicking, before its first call too) ends the group's
        // calls: the others must not wait for it. A shard that is done made its last call, whose sums the
        // others still take: only a call after that fails, and every shard makes the same calls.
        let (lock, cvar) = &*self.state;
        match lock.lock() {
            Ok(mut r) => r.broken = true,
            Err(poisoned) => poisoned.into_inner().broken = true,
        }
        cvar.notify_all();
    }
}

impl Exchange for LocalExchange {
    fn sum(&mut self, parts: Vec<(u64, Tensor)>) -> Result<Vec<Tensor>, Error> {
        let broken = || Error::Exchange("another shard of the group stopped".into());
        let (lock, cvar) = &*self.state;
        let mut r = lock.lock().map_err(|_| broken())?;
        // a call starts once every shard took the previous call's sums
        while r.sums.is_some() && !r.broken {
            r = cvar.wait(r).map_err(|_| broken())?;
        }
        if r.broken {
            return Err(broken());
        }
        let keys: Vec<u64> = parts.iter().map(|(k, _)| *k).collect();
        r.given[self.shard] = Some(parts);
        if r.given.iter().all(Option::is_some) {
            let given: Vec<_> = r
                .given
                .iter_mut()
                .filter_map(Option::take)
                .flatten()
                .collect();
            r.sums = Some(tch::no_grad(|| add_up(given)));
            cvar.notify_all();
        }
        while r.sums.is_none() && !r.broken {
            r = cvar.wait(r).map_err(|_| broken())?;
        }
        let Some(sums) = r.sums.as_ref() else {
            return Err(broken());
        };
        let mine = keys
            .iter()
            .map(|k| {
                sums.iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, t)| t.copy())
                    .ok_or_else(broken)
            })
            .collect::<Result<Vec<_>, _>>()?;
        r.taken += 1;
        if r.taken == r.given.len() {
            r.sums = None;
            r.taken = 0;
            cvar.notify_all();
        }
        Ok(mine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three shards adding up in threads; one stops (here: its end dropped) before its first call, another
    /// after two: the others' next calls fail instead of waiting for it for good, and sums already made
    /// are still taken.
    #[test]
    fn a_shard_that_stops_ends_the_others_calls() {
        let value = |v: f32| Tensor::from_slice(&[v]);
        for stop_after in [0, 2] {
            let mut group = local_group(3);
            let mut stopper = group.pop().unwrap();
            let others: Vec<_> = group
                .into_iter()
                .map(|mut e| {
                    std::thread::spawn(move || {
                        let mut sums = Vec::new();
                        for call in 0..4 {
                            match e.sum(vec![(0, value(call as f32))]) {
                                Ok(s) => sums.push(s[0].double_value(&[0])),
                                Err(e) => return (sums, Some(e.to_string())),
                            }
                        }
                        (sums, None)
                    })
                })
                .collect();
            for call in 0..stop_after {
                stopper.sum(vec![(0, value(call as f32))]).unwrap();
            }
            drop(stopper);
            for other in others {
                let (sums, error) = other.join().unwrap();
                let expected: Vec<f64> = (0..stop_after).map(|c| 3.0 * f64::from(c)).collect();
                assert_eq!(sums, expected, "stopped after {stop_after}");
                assert!(
                    error.unwrap().contains("another shard"),
                    "stopped after {stop_after}"
                );
            }
        }
    }
}
