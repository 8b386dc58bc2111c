//! A render's progress as the farm reports it: the engine emits it, a worker's heartbeat carries it, the
//! coordinator keeps the latest per running task and shows it in the job's status.

use serde::Serialize;

/// The weighted terms of the objective (ALGORITHM.md) and their sum, for one image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LossTerms {
    /// Content loss: `content_weight * mean((F_l - P_l)^2)`, summed over the content layers.
    pub content: f64,
    /// Style loss: `style_weight * mean((G_l - A_l)^2)` over the Gram matrices, summed over the style layers.
    pub style: f64,
    /// Total-variation loss: `tv_weight * 0.5 * (sum of squared neighbour differences)`, preprocessed units.
    pub tv: f64,
    /// The objective the optimizer minimizes: `content + style + tv + temporal`.
    pub total: f64,
    /// Temporal loss of a video frame after its chunk's first (Ruder et al. 2016):
    /// `temporal_weight * mean(c * (x - w)^2)` over pixels and channels in 0..255 units, `w` the previous
    /// frame's result (warped along the optical flow with `optical_flow`) and `c` 1 where the content
    /// matches the previous frame's (and the flow is reliable), else 0; 0 for other renders.
    #[serde(default)]
    pub temporal: f64,
}

impl LossTerms {
    /// How many values the terms' layout on the device has: `[content, style, tv, total, temporal]`.
    pub const LEN: usize = 5;

    /// The terms from their layout on the device, `[content, style, tv, total, temporal]` (at least
    /// [`Self::LEN`] values).
    pub fn from_values(v: &[f64]) -> LossTerms {
        LossTerms {
            content: v[0],
            style: v[1],
            tv: v[2],
            total: v[3],
            temporal: v[4],
        }
    }

    /// The terms in that layout.
    pub fn values(&self) -> [f64; Self::LEN] {
        [self.content, self.style, self.tv, self.total, self.temporal]
    }
}

/// Where a running task's render is: its scale, its iteration and the latest losses.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TaskProgress {
    /// The scale being rendered, from 1 (of `scales`).
    pub scale: u32,
    /// Scales of the render's pyramid.
    pub scales: u32,
    /// Iteration within the current scale; 0 is the scale's initial image.
    pub iteration: u32,
    /// Iterations of the current scale.
    pub iterations: u32,
    /// The losses of the image at `iteration`.
    pub losses: LossTerms,
    /// Seconds left in the task, as its engine estimates them from its rate so far (0: not known).
    pub eta_seconds: f64,
}
