//! The optimizers, over tch tensors (tch has no L-BFGS).
//!
//! Both minimize `f` from `x`, updating `x` in place; `f` returns the objective and its gradient at its
//! argument. Each returns the number of steps it applied to `x`.

use std::cell::RefCell;

use tch::{Kind, Tensor};

/// The algorithm of `torch.optim.LBFGS(lr, history_size, line_search_fn=None, tolerance_grad,
/// tolerance_change)` for one `step()` with `max_iter` function evaluations (ALGORITHM.md's settings: lr 1,
/// tolerances -1), with its direction `d = -H g` computed in the compact representation of Byrd, Nocedal &
/// Schnabel (1994), "Representations of quasi-Newton matrices and their use in limited memory methods",
/// eq. (3.5), instead of torch's two-loop recursion: the same matrix `H` (BFGS updates of `H0 = gamma I`
/// with the stored pairs), so the same iterates up to rounding, but a fixed number of kernel launches per
/// iteration whatever the history size (two matrix products over the stacked history, each reading it once,
/// and solves of small `k x k` triangular systems) where the two-loop launches about `4 k` and reads nothing
/// back. Which pairs enter the history, and whether a step is taken, is decided on the device: an iteration
/// reads nothing back from it (see [`Lbfgs::minimize`]).
#[derive(Debug, Clone)]
pub struct Lbfgs {
    /// Step size multiplying each direction (torch's `lr`; default 1). The first step is scaled further by
    /// `min(1, 1 / sum|g|)`.
    pub lr: f64,
    /// Most curvature pairs `(s, y)` kept (torch's `history_size`; default 100); must be at least 1.
    pub history_size: usize,
    /// Stop once `max |g| <= tolerance_grad`; negative (default -1) never stops, and skips the check.
    pub tolerance_grad: f64,
    /// Stop once a step's `max |t d|` or the change of the objective is under it; negative (default -1)
    /// disables those checks. A direction with `g^T d > -tolerance_change` is not taken.
    pub tolerance_change: f64,
    /// Every how many iterations the host reads whether a direction that does not descend has stopped
    /// the minimization (default 1; a shard of [`Lbfgs::minimize_shard`] reads every iteration whatever
    /// this is): the only device-to-host read of an iteration at the default tolerances. On a GPU a read
    /// waits for the device's queue to drain; a render there reads as often as it reads its losses, every
    /// [`crate::render::GPU_READ_INTERVAL`] iterations.
    pub check_every: usize,
}

impl Default for Lbfgs {
    fn default() -> Self {
        Lbfgs {
            lr: 1.0,
            history_size: 100,
            tolerance_grad: -1.0,
            tolerance_change: -1.0,
            check_every: 1,
        }
    }
}

fn abs_max(t: &Tensor) -> f64 {
    t.abs().max().double_value(&[])
}

/// The last `m` curvature pairs `(s_i, y_i)`, stacked: one `(m + 1) x 2 x n` buffer written in a ring
/// (`s_i` and `y_i` side by side, so that one matrix product over it gives what an iteration needs of
/// both: the history is read twice an iteration, [`Products::partial`] and [`History::times`]), with the
/// products `s_i^T y_j` and `y_i^T y_j` of the stored rows kept up to date (`m x m`, in float64, by row
/// and column as pairs arrive), so that `H g` needs no loop over the history.
///
/// Whether a pair is stored (its curvature `y^T s > 1e-10`, as torch decides) is known on the device
/// only: the count of pairs stored is a device tensor, a pair not taken is written to the spare row `m`
/// (never read), and the rows the ring has not reached yet are zeros, which add nothing to `H g`
/// ([`History::times`]). The host knows how many rows can be in use (one per pair offered, at most `m`)
/// and reads those.
struct History {
    pairs: Tensor,
    /// `sy[i][j] = s_i^T y_j`, `yy[i][j] = y_i^T y_j`, by buffer row.
    sy: Tensor,
    yy: Tensor,
    /// Pairs stored so far (a 0-dim int64 on the device): the next goes to row `stored % m`.
    stored: Tensor,
    /// Pairs offered so far (stored or not): the rows that can be in use are the first
    /// `min(offered, m)`.
    offered: usize,
    /// The spare row's index, `[m]` (int64, on the device).
    spare: Tensor,
    capacity: usize,
}

/// The products an iteration needs, of the new pair `(s, y)` and gradient `g` with themselves and with the
/// stored rows (`m` each, by buffer row; rows not in use give zeros or are ignored): one vector, so that a
/// shard adds them up with the others' in one call ([`Reduction`]).
struct Products {
    ys: Tensor,
    yy: Tensor,
    sg: Tensor,
    yg: Tensor,
    gg: Tensor,
    /// `s_i^T y`, `y_i^T s`, `y_i^T y`, `s_i^T g`, `y_i^T g` over the stored rows.
    rows: [Tensor; 5],
}

impl Products {
    const SCALARS: i64 = 5;

    /// The products as one vector, each over `own` (the elements a shard owns; all without it). The stored
    /// rows' come from one product of the history's rows in use with `[s, y, g]`: one read of the history.
    fn partial(
        s: &Tensor,
        y: &Tensor,
        g: &Tensor,
        history: &History,
        own: Option<&Tensor>,
    ) -> Tensor {
        let (sm, ym, gm) = match own {
            Some(own) => (s * own, y * own, g * own),
            None => (s.shallow_clone(), y.shallow_clone(), g.shallow_clone()),
        };
        // [i, 0, j] = s_i^T v_j and [i, 1, j] = y_i^T v_j for v = (s, y, g), by buffer row, the rows not
        // in use zeros
        let m = history.capacity as i64;
        let used = history.used() as i64;
        let rows = history
            .in_use()
            // [s, y, g] as the columns of a view of the three rows (a contiguous n x 3 copy makes the
            // product read the history rows more than once on a CPU: twice as slow, measured)
            .mm(&Tensor::stack(&[&sm, &ym, &gm], 0).tr())
            .constant_pad_nd([0, 0, 0, 2 * (m - used)])
            .view([m, 2, 3]);
        let (with_s, with_y) = (rows.select(1, 0), rows.select(1, 1));
        Tensor::cat(
            &[
                Tensor::stack(&[ym.dot(s), ym.dot(y), sm.dot(g), ym.dot(g), gm.dot(g)], 0),
                with_s.select(1, 1),
                with_y.select(1, 0),
                with_y.select(1, 1),
                with_s.select(1, 2),
                with_y.select(1, 2),
            ],
            0,
        )
    }

    /// The products in `v` (as [`Products::partial`] lays them out), in float64.
    fn of(v: &Tensor) -> Products {
        let v = v.to_kind(Kind::Double);
        let at = |i: i64| v.get(i);
        let m = (v.size()[0] - Self::SCALARS) / 5;
        let row = |k: i64| v.narrow(0, Self::SCALARS + k * m, m);
        Products {
            ys: at(0),
            yy: at(1),
            sg: at(2),
            yg: at(3),
            gg: at(4),
            rows: [row(0), row(1), row(2), row(3), row(4)],
        }
    }
}

impl History {
    fn new(capacity: usize, like: &Tensor) -> History {
        let n = like.size()[0];
        let m = capacity as i64;
        let f64s = (Kind::Double, like.device());
        History {
            pairs: Tensor::zeros([m + 1, 2, n], (like.kind(), like.device())),
            sy: Tensor::zeros([m, m], f64s),
            yy: Tensor::zeros([m, m], f64s),
            stored: Tensor::zeros([], (Kind::Int64, like.device())),
            offered: 0,
            spare: Tensor::full([1], m, (Kind::Int64, like.device())),
            capacity,
        }
    }

    /// How many rows can be in use: the first `used()` (the ring fills its rows from the first; all of
    /// them once it is full).
    fn used(&self) -> usize {
        self.offered.min(self.capacity)
    }

    /// The rows that can be in use as rows `s_0, y_0, s_1, y_1, ...` (`2 used x n`).
    fn in_use(&self) -> Tensor {
        let (used, n) = (self.used() as i64, self.pairs.size()[2]);
        self.pairs.narrow(0, 0, used).view([2 * used, n])
    }

    /// Offers a pair with its products `p` (with itself, with the rows stored before, and the gradient's; a
    /// shard's added up over the shards), stored where `take` (a 0-dim bool on the device) holds, in the
    /// ring's next row, replacing the oldest pair when full; returns `S^T g` and `Y^T g` over the rows in
    /// use now.
    fn offer(&mut self, s: &Tensor, y: &Tensor, p: &Products, take: &Tensor) -> (Tensor, Tensor) {
        let m = self.capacity as i64;
        let row = self.stored.remainder(m).reshape([1]);
        // a pair not taken goes to the spare row, and changes nothing that is read
        let to = row.where_self(take, &self.spare);
        for (k, v) in [s, y].into_iter().enumerate() {
            let _ = self
                .pairs
                .select(1, k as i64)
                .index_copy_(0, &to, &v.unsqueeze(0));
        }
        let _ = self.stored.g_add_(&take.to_kind(Kind::Int64));
        self.offered += 1;
        // the new row's products with every row: at its own row, with itself (the products there were
        // the replaced pair's)
        let with = |v: &Tensor, own: &Tensor| v.index_copy(0, &row, &own.reshape([1]));
        let [s_y, y_s, y_y, s_g, y_g] = &p.rows;
        // the stored products' row and column: the new pair's where it is taken, else as they were
        let column = |t: &Tensor, dim: i64, v: &Tensor| {
            let old = t.index_select(dim, &row).view([-1]);
            let new = v.where_self(take, &old).unsqueeze(dim);
            let _ = t.shallow_clone().index_copy_(dim, &row, &new);
        };
        column(&self.sy, 1, &with(s_y, &p.ys)); // s_i^T y_new
        column(&self.sy, 0, &with(y_s, &p.ys)); // s_new^T y_j
        let y_y = with(y_y, &p.yy);
        column(&self.yy, 1, &y_y);
        column(&self.yy, 0, &y_y);
        // S^T g and Y^T g: where the pair is not taken, the rows' as they are (the old pair's at its row)
        let kept = |v: &Tensor, own: &Tensor| with(v, own).where_self(take, v);
        (kept(s_g, &p.sg), kept(y_g, &p.yg))
    }

    /// `H g` for `H = gamma I + [S, gamma Y] M [S^T; gamma Y^T]` (Byrd, Nocedal & Schnabel, eq. 3.5), with
    /// `S`, `Y` the stored pairs in age order, `R` the upper triangle of `S^T Y`, `D` its diagonal and
    /// `M = [[R^-T (D + gamma Y^T Y) R^-1, -R^-T], [-R^-1, 0]]`; `gamma` is a 0-dim tensor, `s_g = S^T g`
    /// and `y_g = Y^T g` by buffer row (float64). With it, `g^T H g - gamma g^T g` (float64): the
    /// directional derivative from the products alone. A row not reached yet (zeros: every product with
    /// it 0) is given 1 on `R`'s and `D`'s diagonals, which makes its coefficients 0: `H` is that of the
    /// pairs stored.
    fn times(&self, g: &Tensor, gamma: &Tensor, s_g: &Tensor, y_g: &Tensor) -> (Tensor, Tensor) {
        let device = g.device();
        // the rows in age order are consecutive modulo the capacity from the oldest (row 0 until the
        // ring is full): made on the device from its count
        let (len, rows) = (self.used() as i64, self.capacity as i64);
        let full = self.stored.ge(rows);
        let oldest = self
            .stored
            .remainder(rows)
            .where_self(&full, &self.stored.zeros_like());
        let idx = (Tensor::arange(len, (Kind::Int64, device)) + oldest).remainder(rows);
        let pick = |t: &Tensor| t.index_select(0, &idx).index_select(1, &idx);
        let (sy, yy) = (pick(&self.sy), pick(&self.yy));
        let diagonal = sy.diagonal(0, 0, 1);
        let unused = diagonal.eq(0.0).to_kind(Kind::Double).diag_embed(0, -2, -1);
        let r = sy.triu(0) + &unused;
        let d = diagonal.diag_embed(0, -2, -1) + unused;
        let gamma64 = gamma.to_kind(Kind::Double);
        // a = S^T g, b = Y^T g, in age order
        let a = s_g.index_select(0, &idx);
        let b = y_g.index_select(0, &idx);
        let col = |v: &Tensor| v.unsqueeze(1);
        // u = R^-1 a;  p = R^-T ((D + gamma Y^T Y) u - gamma b)
        let u = r
            .linalg_solve_triangular(&col(&a), true, true, false)
            .squeeze_dim(1);
        let rhs = (d + &yy * &gamma64).mv(&u) - &b * &gamma64;
        let p = r
            .tr()
            .linalg_solve_triangular(&col(&rhs), false, true, false)
            .squeeze_dim(1);
        // g^T H g = gamma g^T g + a^T p - gamma b^T u
        let correction = a.dot(&p) - b.dot(&u) * &gamma64;
        // back to buffer rows, those in use (`idx` orders them all)
        let scatter = |v: &Tensor| {
            Tensor::zeros([len], (Kind::Double, device))
                .index_copy(0, &idx, v)
                .to_kind(g.kind())
        };
        // [S, Y] [p; -gamma u] in one product, the coefficients interleaved as the rows are
        let coefficients =
            Tensor::stack(&[scatter(&p), scatter(&(u * &gamma64).neg())], 1).view([-1]);
        let gamma = gamma.to_kind(g.kind());
        let hg = g * &gamma + self.in_use().tr().mv(&coefficients);
        (hg, correction)
    }
}

/// A vector that several shards hold parts of ([`crate::shard`]): a shard's `x` is its region, whose rows
/// it shares with its neighbours, and L-BFGS' dot products are the whole vector's, each element counted
/// once: the sum over the shards of their products over the elements they own.
pub struct Reduction<'a, E> {
    /// 1 on the elements of `x` the shard owns, 0 on the others (the kind and size of `x`, flat).
    pub own: Tensor,
    /// Adds up a vector of partial sums with the other shards' (their same call), elementwise.
    pub sum: &'a mut dyn FnMut(Tensor) -> Result<Tensor, E>,
}

impl Lbfgs {
    /// Runs at most `max_iter` evaluations of `f` (and as many steps: the last step's result is not
    /// evaluated, as in torch). `f` returns the objective as a 0-dim tensor and its gradient, both left on
    /// the device.
    ///
    /// At the default tolerances an iteration reads nothing back from the device, but every
    /// [`Lbfgs::check_every`] iterations one value, and the minimization one more at its end (the steps
    /// taken). The curvature `y^T s` that decides whether a pair enters the history, and the directional
    /// derivative `g^T d` that decides whether a step is taken, are compared on the device. Torch stops
    /// before a direction that does not descend by `tolerance_change`; here such a direction, and every
    /// one after it, leaves `x` where it is, and the loop stops at the next check, having evaluated `f` at
    /// that `x` once for each iteration in between (an ascent direction cannot arise from pairs with
    /// positive curvature: in practice it never happens). The gradient and the objective are read only
    /// for the tolerances that are enabled (non-negative).
    pub fn minimize<E>(
        &self,
        x: &mut Tensor,
        max_iter: usize,
        f: impl FnMut(&Tensor) -> Result<(Tensor, Tensor), E>,
    ) -> Result<usize, E> {
        self.minimize_shard(x, max_iter, f, None)
    }

    /// [`Lbfgs::minimize`] of one shard's part of a vector, its dot products added up with the other
    /// shards' through `shard` (one call per iteration; the other shards run the same iterations): every
    /// shard takes the same steps, so the elements that shards share stay equal. Without `shard`, the
    /// whole vector's minimization. A shard checks neither `tolerance_grad` nor the step's size (its own
    /// values could stop it alone); the descent check and the change of the objective (`f`'s value, the
    /// whole objective's in every shard) it does.
    pub fn minimize_shard<E>(
        &self,
        x: &mut Tensor,
        max_iter: usize,
        mut f: impl FnMut(&Tensor) -> Result<(Tensor, Tensor), E>,
        mut shard: Option<Reduction<'_, E>>,
    ) -> Result<usize, E> {
        let mut xf = x.view([-1]);
        let flat = |g: Tensor| g.contiguous().view([-1]);
        let own = shard.as_ref().map(|r| r.own.shallow_clone());
        // the checks of a shard's own values could stop it alone, and the others would wait for it: none
        // (the descent check and the change of the objective are the whole vector's)
        let (tolerance_grad, step_tolerance) = match own {
            Some(_) => (-1.0, -1.0),
            None => (self.tolerance_grad, self.tolerance_change),
        };
        let mut reduce = |partial: Tensor| -> Result<Tensor, E> {
            match shard.as_mut() {
                Some(r) => (r.sum)(partial),
                None => Ok(partial),
            }
        };
        let (mut loss, g) = f(x)?;
        let mut g = flat(g);
        // with a negative tolerance a check can never pass: skip it (and its device sync)
        let grad_converged = |g: &Tensor| tolerance_grad >= 0.0 && abs_max(g) <= tolerance_grad;
        if grad_converged(&g) {
            return Ok(0);
        }
        let device = g.device();
        let scalar = |v: f64| Tensor::from(v as f32).to_device(device);
        // made once: a host-to-device copy in the loop would wait for the device's queue
        let (lr, zero) = (scalar(self.lr), scalar(0.0));
        let mut history: Option<History> = None;
        // pairs come from the second iteration on: a render of fewer iterations than the history holds
        // never fills it, and its buffers hold only what it can (the same steps, less memory)
        let capacity = self.history_size.min(max_iter.saturating_sub(1)).max(1);
        let mut h_diag = scalar(1.0);
        let mut d = Tensor::new();
        let mut t = Tensor::new();
        let mut prev_g: Option<Tensor> = None;
        // true once a direction did not descend: no step from then on (torch stops there)
        let mut stopped = Tensor::zeros([], (Kind::Bool, device));
        // the steps applied to `x`, counted on the device
        let mut steps = Tensor::zeros([], (Kind::Int64, device));
        // a shard reads every iteration (its exchange does), so that shards on devices of other kinds
        // (whose renders read at other intervals) stop at the same iteration
        let check_every = if own.is_some() {
            1
        } else {
            self.check_every.max(1)
        };
        for n_iter in 1..=max_iter {
            // g^T d, the directional derivative
            let g_d;
            if n_iter == 1 {
                d = -&g;
                match &own {
                    None => {
                        g_d = g.dot(&d);
                        // min(1, 1 / sum|g|) * lr, on the device
                        t = g
                            .abs()
                            .sum(Kind::Float)
                            .reciprocal()
                            .clamp_max(1.0)
                            .g_mul(&lr);
                    }
                    Some(own) => {
                        // g^T g and sum |g|, the whole vector's
                        let gm = &g * own;
                        let sums = reduce(Tensor::stack(&[gm.dot(&g), gm.abs().sum(g.kind())], 0))?;
                        g_d = -sums.get(0);
                        t = sums.get(1).reciprocal().clamp_max(1.0).g_mul(&lr);
                    }
                }
            } else {
                let y = &g - prev_g.as_ref().expect("previous gradient");
                let s = &d * &t;
                // the products the iteration needs, in one read of the history; a shard's added up with
                // the other shards' in one call
                let h = history.get_or_insert_with(|| History::new(capacity, &g));
                let p = Products::of(&reduce(Products::partial(&s, &y, &g, h, own.as_ref()))?);
                // the pair enters the history where its curvature is positive (torch's `ys > 1e-10`)
                let take = p.ys.gt(1e-10);
                h_diag = (&p.ys / &p.yy).to_kind(g.kind()).where_self(&take, &h_diag);
                // S^T g and Y^T g by buffer row
                let (s_g, y_g) = h.offer(&s, &y, &p, &take);
                // g^T H g = gamma g^T g + the history's correction (0 while no pair is stored)
                let gamma_gg = h_diag.to_kind(Kind::Double) * &p.gg;
                let (hg, correction) = h.times(&g, &h_diag, &s_g, &y_g);
                (d, g_d) = (-hg, -(gamma_gg + correction));
                t = lr.shallow_clone();
            }
            prev_g = Some(g.shallow_clone());
            let prev_loss = loss.shallow_clone();
            // torch's test, `g^T d > -tolerance_change` stops: a direction of NaNs (a gradient that is not
            // finite) is taken, and the objective's NaNs show in the next losses
            let go = g_d
                .gt(-self.tolerance_change)
                .logical_not()
                .logical_and(&stopped.logical_not());
            tch::no_grad(|| {
                let _ = xf.addcmul_(&d, &t.where_self(&go, &zero));
            });
            steps += go.to_kind(Kind::Int64);
            stopped = go.logical_not();
            if n_iter == max_iter || (n_iter % check_every == 0 && stopped.int64_value(&[]) != 0) {
                break;
            }
            let (l, grad) = f(x)?;
            loss = l;
            g = flat(grad);
            if grad_converged(&g) {
                break;
            }
            if self.tolerance_change >= 0.0 {
                if step_tolerance >= 0.0 && abs_max(&(&d * &t)) <= step_tolerance {
                    break;
                }
                if (loss.double_value(&[]) - prev_loss.double_value(&[])).abs()
                    < self.tolerance_change
                {
                    break;
                }
            }
        }
        Ok(steps.int64_value(&[]) as usize)
    }
}

/// `torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8)`, one step per evaluation of `f`.
#[derive(Debug, Clone)]
pub struct Adam {
    /// Learning rate, in the units of `x` (ALGORITHM.md: 10 for 0..255 images).
    pub lr: f64,
    /// Decay rate of the first moment (the gradient's running mean); 0.9 from [`Adam::new`].
    pub beta1: f64,
    /// Decay rate of the second moment (the squared gradient's running mean); 0.999 from [`Adam::new`].
    pub beta2: f64,
    /// Added to the denominator `sqrt(v_hat)` for numerical stability; 1e-8 from [`Adam::new`].
    pub eps: f64,
}

impl Adam {
    /// Adam with learning rate `lr` and torch's defaults: betas 0.9/0.999, eps 1e-8.
    pub fn new(lr: f64) -> Self {
        Adam {
            lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }

    /// Evaluates `f` and steps `steps` times, from zero moments.
    pub fn minimize<E>(
        &self,
        x: &mut Tensor,
        steps: usize,
        f: impl FnMut(&Tensor) -> Result<(Tensor, Tensor), E>,
    ) -> Result<usize, E> {
        self.minimize_from(x, steps, &RefCell::new(AdamState::new(x)), f)
    }

    /// Evaluates `f` and steps `steps` times from `state`, which each step updates: a render resumed from
    /// a checkpoint goes on as it would have, and `f` may read the state (borrowed only during a step's
    /// update) to save one.
    pub fn minimize_from<E>(
        &self,
        x: &mut Tensor,
        steps: usize,
        state: &RefCell<AdamState>,
        mut f: impl FnMut(&Tensor) -> Result<(Tensor, Tensor), E>,
    ) -> Result<usize, E> {
        for _ in 0..steps {
            let (_, g) = f(x)?;
            let state = &mut *state.borrow_mut();
            state.steps += 1;
            let step = state.steps as i32;
            let (m, v) = (&mut state.m, &mut state.v);
            tch::no_grad(|| {
                let _ = m.lerp_(&g, 1.0 - self.beta1);
                let _ = v.g_mul_scalar_(self.beta2);
                let _ = v.addcmul_(&g, &(&g * (1.0 - self.beta2)));
                let bias_correction1 = 1.0 - self.beta1.powi(step);
                let bias_correction2 = 1.0 - self.beta2.powi(step);
                let step_size = self.lr / bias_correction1;
                let denom = v.sqrt() / bias_correction2.sqrt() + self.eps;
                let _ = x.addcdiv_(&(&*m * -step_size), &denom);
            });
        }
        Ok(steps)
    }
}

/// Adam's state: its moments, each shaped as the image, and the steps taken (which its bias corrections
/// count).
#[derive(Debug)]
pub struct AdamState {
    /// The first moment (the gradient's running mean).
    pub m: Tensor,
    /// The second moment (the squared gradient's running mean).
    pub v: Tensor,
    /// Steps taken.
    pub steps: u32,
}

impl AdamState {
    /// The state before the first step: zero moments shaped as `x`.
    pub fn new(x: &Tensor) -> AdamState {
        AdamState {
            m: x.zeros_like(),
            v: x.zeros_like(),
            steps: 0,
        }
    }
}

/// An exponential moving average of a scale's images, bias-corrected as Adam's moments are: after the
/// images `x_0 .. x_{k-1}`, `sum_i (1 - d) d^(k-1-i) x_i / (1 - d^k)` for the decay `d`
/// (crowsonkb/style-transfer-pytorch's `EMA` and `--avg-decay`; [`stylefarm_core::RenderParams::avg_decay`]).
#[derive(Debug)]
pub struct IterateAverage {
    /// The images' decayed sum, `sum_i (1 - d) d^(k-1-i) x_i`: what a checkpoint keeps.
    pub sum: Tensor,
    /// The decay, in `(0, 1)`.
    pub decay: f64,
    /// The images added, `k`.
    pub count: u32,
}

impl IterateAverage {
    /// The average of no image yet, shaped as `x`.
    pub fn new(x: &Tensor, decay: f64) -> IterateAverage {
        IterateAverage {
            sum: x.zeros_like(),
            decay,
            count: 0,
        }
    }

    /// Adds the next image (on the device; no host sync).
    pub fn add(&mut self, x: &Tensor) {
        tch::no_grad(|| {
            let _ = self.sum.lerp_(x, 1.0 - self.decay);
        });
        self.count += 1;
    }

    /// The average of the images added (at least one).
    pub fn get(&self) -> Tensor {
        let weight = 1.0 - self.decay.powi(self.count.min(i32::MAX as u32) as i32);
        tch::no_grad(|| &self.sum / weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The average of 1, 2, 3 with decay 0.5, by crowsonkb's EMA: value 0.5, 1.25, 2.125 and accum
    /// 0.5, 0.25, 0.125, so 2.125 / 0.875; of one image, that image.
    #[test]
    fn the_iterate_average_is_crowsonkbs_bias_corrected_ema() {
        let x = |v: f32| Tensor::from_slice(&[v, 2.0 * v]);
        let mut average = IterateAverage::new(&x(0.0), 0.5);
        average.add(&x(1.0));
        assert_eq!(values(&average.get()), [1.0, 2.0]);
        average.add(&x(2.0));
        average.add(&x(3.0));
        let want = 2.125 / 0.875;
        let got = values(&average.get());
        assert!(
            (got[0] - want).abs() < 1e-6 && (got[1] - 2.0 * want).abs() < 1e-6,
            "{got:?}"
        );
        assert_eq!(average.count, 3);
    }
    use std::convert::Infallible;
    use tch::Device;

    fn values(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn rosenbrock(x: &Tensor) -> Result<(Tensor, Tensor), Infallible> {
        let v = values(x);
        let (a, b) = (v[0], v[1]);
        let f = (1.0 - a).powi(2) + 100.0 * (b - a * a).powi(2);
        let g = [
            -2.0 * (1.0 - a) - 400.0 * a * (b - a * a),
            200.0 * (b - a * a),
        ];
        Ok((Tensor::from(f), Tensor::from_slice(&g.map(|v| v as f32))))
    }

    #[test]
    fn lbfgs_solves_a_quadratic() {
        // f(x) = 0.5 x^T A x - b^T x with A symmetric positive definite; minimum at A^-1 b
        tch::manual_seed(0);
        let m = Tensor::randn([6, 6], (Kind::Double, Device::Cpu));
        let a = m.matmul(&m.tr()) + Tensor::eye(6, (Kind::Double, Device::Cpu));
        let b = Tensor::randn([6], (Kind::Double, Device::Cpu));
        let expected = values(&a.inverse().matmul(&b));
        let mut x = Tensor::zeros([6], (Kind::Double, Device::Cpu));
        let steps = Lbfgs::default()
            .minimize(&mut x, 60, |x| {
                let ax = a.matmul(x);
                let f = x.dot(&ax) * 0.5 - b.dot(x);
                Ok::<_, Infallible>((f, ax - &b))
            })
            .unwrap();
        assert!(steps > 0);
        for (got, want) in values(&x).iter().zip(&expected) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn lbfgs_takes_no_step_that_does_not_descend_by_the_tolerance() {
        // g^T d = -0.08 at the start, above -tolerance_change: torch stops before its first step
        for max_iter in [1, 2, 5] {
            let mut x = Tensor::from_slice(&[0.1f32, 0.1]);
            let lbfgs = Lbfgs {
                tolerance_change: 1.0,
                ..Default::default()
            };
            let steps = lbfgs
                .minimize(&mut x, max_iter, |x| {
                    Ok::<_, Infallible>((x.square().sum(Kind::Float), 2 * x))
                })
                .unwrap();
            assert_eq!(steps, 0, "max_iter {max_iter}");
            assert_eq!(values(&x), [0.1f32 as f64; 2]);
        }
    }

    /// A gradient of NaNs (the objective overflowed) gives a direction of NaNs, which is taken, as torch
    /// takes it (its stop, `g^T d > -tolerance_change`, is false for NaN): `x` becomes NaN, for the render's
    /// next losses to show (and fail naming the weight), not left where it was as if the render had
    /// converged.
    #[test]
    fn lbfgs_takes_a_direction_of_nans_as_torch_does() {
        let mut x = Tensor::from_slice(&[3.0f32, -2.0]);
        let mut seen = 0;
        let steps = Lbfgs::default()
            .minimize(&mut x, 6, |x| {
                seen += 1;
                let (f, g) = (x.square().sum(Kind::Float), 2 * x);
                // the third evaluation on: not finite
                Ok::<_, Infallible>(if seen >= 3 { (f, g * f64::NAN) } else { (f, g) })
            })
            .unwrap();
        assert_eq!((steps, seen), (6, 6));
        assert!(values(&x).iter().all(|v| v.is_nan()), "{:?}", values(&x));
    }

    /// The stop is found at the next check: with `check_every` 1 at once, with 4 after one more
    /// evaluation at the same `x` (which the enabled tolerances then stop at); no step either way.
    #[test]
    fn lbfgs_finds_a_stop_at_its_next_check() {
        for (check_every, evaluations) in [(1, 1), (4, 2)] {
            let mut x = Tensor::from_slice(&[0.1f32, 0.1]);
            let mut seen = 0;
            let lbfgs = Lbfgs {
                tolerance_change: 1.0,
                check_every,
                ..Default::default()
            };
            let steps = lbfgs
                .minimize(&mut x, 5, |x| {
                    seen += 1;
                    Ok::<_, Infallible>((x.square().sum(Kind::Float), 2 * x))
                })
                .unwrap();
            assert_eq!((steps, seen), (0, evaluations), "check_every {check_every}");
            assert_eq!(values(&x), [0.1f32 as f64; 2]);
        }
    }

    #[test]
    fn lbfgs_minimizes_rosenbrock() {
        let mut x = Tensor::from_slice(&[-1.2f32, 1.0]);
        Lbfgs::default().minimize(&mut x, 200, rosenbrock).unwrap();
        let v = values(&x);
        assert!(
            (v[0] - 1.0).abs() < 1e-3 && (v[1] - 1.0).abs() < 1e-3,
            "{v:?}"
        );
    }

    /// L-BFGS over two shards of a vector (regions overlapping in 4 elements, each owning its half), their
    /// dot products added up through an in-process exchange: each shard's own elements follow the whole
    /// vector's minimization (within 1e-5: the sums are added in another order, in float32), and the
    /// elements they share stay equal on both (the same operations on the same values: the same bits on
    /// one machine). The objective is separable, so a shard evaluates its region's gradient exactly; a
    /// history of 3 wraps around. The algorithm itself (`offer`, `times`) is checked against torch by
    /// `lbfgs_follows_torch_trajectory`, whose history wraps too.
    #[test]
    fn lbfgs_over_shards_follows_the_whole_vector() {
        let n = 10i64;
        // the gradient of sum w_i (x_i - c_i)^2 + 0.1 x_i^4 over elements from..from + len
        let grad = |x: &Tensor, from: i64| {
            let i = Tensor::arange_start(from, from + x.size()[0], (Kind::Float, Device::Cpu));
            let (w, c) = (0.5 + 0.25 * &i, -2.0 + 0.35 * &i);
            2 * &w * (x - &c) + 0.4 * x.pow_tensor_scalar(3)
        };
        let lbfgs = Lbfgs {
            history_size: 3,
            ..Default::default()
        };
        let start: Vec<f32> = (0..n).map(|i| 1.0 - 0.2 * i as f32).collect();
        let mut whole = Tensor::from_slice(&start);
        lbfgs
            .minimize(&mut whole, 15, |x| {
                Ok::<_, crate::Error>((Tensor::from(0.0f32), grad(x, 0)))
            })
            .unwrap();
        // (region, own elements in it)
        let shards = [(0i64, 7i64, 0i64, 5i64), (3, 7, 2, 5)];
        let results: Vec<Vec<f64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .iter()
                .zip(crate::shard::local_group(2))
                .map(|(&(from, len, own_from, own_len), mut exchange)| {
                    let (start, lbfgs, grad) = (&start, &lbfgs, &grad);
                    scope.spawn(move || {
                        let mut x =
                            Tensor::from_slice(&start[from as usize..(from + len) as usize]);
                        let own = x.zeros_like();
                        let _ = own.narrow(0, own_from, own_len).fill_(1.0);
                        let sum = &mut |partial: Tensor| -> Result<Tensor, crate::Error> {
                            use crate::shard::Exchange;
                            Ok(exchange.sum(vec![(0, partial)])?.remove(0))
                        };
                        lbfgs
                            .minimize_shard(
                                &mut x,
                                15,
                                |x| Ok((Tensor::from(0.0f32), grad(x, from))),
                                Some(Reduction { own, sum }),
                            )
                            .unwrap();
                        values(&x)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let whole = values(&whole);
        let sharded: Vec<f64> = results[0][..5]
            .iter()
            .chain(&results[1][2..])
            .copied()
            .collect();
        for (a, b) in sharded.iter().zip(&whole) {
            assert!((a - b).abs() < 1e-5, "{sharded:?} vs {whole:?}");
        }
        assert!(whole
            .iter()
            .zip(&start)
            .all(|(a, &b)| (a - f64::from(b)).abs() > 1e-3));
        // elements 3..7, held by both shards: the same bits
        assert_eq!(results[0][3..7], results[1][..4]);
    }

    #[test]
    fn adam_minimizes_a_bowl() {
        let mut x = Tensor::from_slice(&[3.0f32, -2.0]);
        Adam::new(0.1)
            .minimize(&mut x, 500, |x| {
                Ok::<_, Infallible>((x.square().sum(Kind::Float), 2 * x))
            })
            .unwrap();
        assert!(
            values(&x).iter().all(|v| v.abs() < 1e-2),
            "{:?}",
            values(&x)
        );
    }

    /// The trajectory of torch.optim.LBFGS (PyTorch 2.11.0) on small problems, recorded by
    /// bench/lbfgs_trajectory.py into tests/fixtures: the same iterates, evaluation by evaluation. In the
    /// two cases of a function that is not convex, some pairs have negative curvature and are left out of
    /// the history (the first pair in one case; the history of 3 full in both), which is decided on the
    /// device: taking them gives another trajectory (it stops after 8 evaluations).
    #[test]
    fn lbfgs_follows_torch_trajectory() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!(
            "../tests/fixtures/lbfgs_torch_trajectory.json"
        ))
        .unwrap();
        for case in fixture["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let x0: Vec<f32> = serde_json::from_value(case["x0"].clone()).unwrap();
            let a: Vec<f32> = serde_json::from_value(case["a"].clone()).unwrap();
            let history = case["history_size"].as_u64().unwrap() as usize;
            let iterates: Vec<Vec<f64>> = serde_json::from_value(case["iterates"].clone()).unwrap();
            let function = case["function"].as_str().unwrap();
            // the two programs round differently (float32 sums in another order); where the function is
            // not convex the difference grows about twofold an iteration: 7e-4 at the 12th evaluation
            let tolerance = if function == "cauchy" { 1e-3 } else { 1e-4 };
            let n = x0.len() as i64;
            let a = Tensor::from_slice(&a).reshape([n, n]);
            let mut seen: Vec<Vec<f64>> = Vec::new();
            let mut x = Tensor::from_slice(&x0);
            let lbfgs = Lbfgs {
                history_size: history,
                ..Default::default()
            };
            lbfgs
                .minimize(&mut x, iterates.len(), |x| {
                    seen.push(values(x));
                    // the fixture script's functions
                    let xg = x.detach().set_requires_grad(true);
                    let r = a.matmul(&xg) - 1.0;
                    let f = match function {
                        "quartic" => {
                            r.square().sum(Kind::Float)
                                + 0.1 * xg.pow_tensor_scalar(4).sum(Kind::Float)
                        }
                        "cauchy" => {
                            r.square().log1p().sum(Kind::Float)
                                + 0.01 * xg.square().sum(Kind::Float)
                        }
                        other => panic!("{name}: no function {other}"),
                    };
                    let g = Tensor::run_backward(&[&f], &[&xg], false, false)
                        .pop()
                        .unwrap();
                    Ok::<_, Infallible>((f.detach(), g))
                })
                .unwrap();
            assert_eq!(seen.len(), iterates.len(), "{name}: evaluations");
            for (k, (ours, theirs)) in seen.iter().zip(&iterates).enumerate() {
                for (o, t) in ours.iter().zip(theirs) {
                    assert!(
                        (o - t).abs() <= tolerance * (1.0 + t.abs()),
                        "{name} evaluation {k}: {ours:?} vs torch {theirs:?}"
                    );
                }
            }
        }
    }
}
