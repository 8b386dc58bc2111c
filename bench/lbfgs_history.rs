//! L-BFGS's own cost per iteration once its history is full (`engine/src/optim.rs`): on as many values as a
//! 512 x 384 RGB image has (589,824), the default history of 100 pairs (472 MB of float32), with an
//! objective so cheap (a diagonal quadratic) that what is timed is the optimizer's work: the direction from
//! the history, the new pair's products, the step. Prints the median seconds per iteration over the
//! iterations after the history filled, REPS times, and the objective at the end (the same, up to
//! rounding, whichever way the direction is computed).
//!
//!     cargo bench -p stylefarm-engine --bench lbfgs_history -- [N] [HISTORY] [REPS]
//!
//! Defaults: 589824 values, history 100, 3 repetitions. The CPU's threads: libtorch's default (one a core).

use std::convert::Infallible;
use std::time::Instant;

use stylefarm_engine::optim::Lbfgs;
use tch::{Kind, Tensor};

#[path = "engine_bench.rs"]
#[allow(dead_code)]
mod engine_bench;
use engine_bench::median;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(|a| a.parse().expect("N HISTORY REPS: numbers"))
        .collect();
    let n = args.first().copied().unwrap_or(589_824) as i64;
    let history = args.get(1).copied().unwrap_or(100);
    let reps = args.get(2).copied().unwrap_or(3);
    let timed = 20;
    tch::manual_seed(0);
    // f(x) = 1/2 sum(a (x - c)^2), a log-uniform in [1e-4, 1]: conditioned badly enough that L-BFGS is
    // still moving (every pair stored, the history full) after the iterations timed; each evaluation reads
    // x, a and c once
    let a =
        (Tensor::rand([n], (Kind::Float, tch::Device::Cpu)) * -4.0 * std::f64::consts::LN_10).exp();
    let c = Tensor::randn([n], (Kind::Float, tch::Device::Cpu));
    for rep in 1..=reps {
        let mut x = Tensor::zeros([n], (Kind::Float, tch::Device::Cpu));
        let mut at = Vec::new();
        let lbfgs = Lbfgs {
            history_size: history,
            ..Default::default()
        };
        lbfgs
            .minimize(&mut x, history + 2 + timed, |x| {
                at.push(Instant::now());
                let r = x - &c;
                let g = &a * &r;
                let f = (&g * &r).sum(Kind::Float) * 0.5;
                Ok::<_, Infallible>((f, g))
            })
            .unwrap();
        // evaluation k + 1 follows iteration k's step; the history is full from iteration history + 1
        let per: Vec<f64> = at
            .windows(2)
            .skip(history + 1)
            .map(|w| w[1].duration_since(w[0]).as_secs_f64())
            .collect();
        let r = &x - &c;
        let f = f64::try_from((&a * &r * &r).sum(Kind::Double) * 0.5).unwrap();
        println!(
            "rep {rep}: {n} values, history {history}: {:.4} s per iteration (median of {}); f {f:.6e}",
            median(per.clone()),
            per.len()
        );
    }
}
