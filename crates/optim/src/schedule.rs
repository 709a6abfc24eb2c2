//! Learning-rate schedules with warmup, as transformers' `get_{constant,linear,cosine}_schedule_with_warmup`.
//!
//! The multiplier for optimizer step `s` (0-based: the first update uses `s = 0`, so a warmup starts at 0):
//! warmup `s / warmup` while `s < warmup`, then constant 1, linear `(total - s) / (total - warmup)`, or
//! cosine `½(1 + cos(π · (s - warmup) / (total - warmup)))`, never below 0.

use burn::config::Config;
use serde::{Deserialize, Serialize};

use crate::OptimError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Linear,
    Cosine,
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScheduleKind::Constant => "constant",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
        })
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = OptimError;
    fn from_str(s: &str) -> Result<Self, OptimError> {
        match s {
            "constant" => Ok(ScheduleKind::Constant),
            "linear" => Ok(ScheduleKind::Linear),
            "cosine" => Ok(ScheduleKind::Cosine),
            other => {
                Err(OptimError::Config(format!("unknown LR schedule `{other}` (expected constant, linear or cosine)")))
            }
        }
    }
}

/// Warmup length: a fraction of the total steps (rounded up, as transformers) or a number of steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    Ratio(f64),
    Steps(u64),
}

#[derive(Config, Debug)]
pub struct LrScheduleConfig {
    /// The peak learning rate (QLoRA: 2e-4).
    #[config(default = 2e-4)]
    pub lr: f64,
    /// QLoRA: constant.
    #[config(default = "ScheduleKind::Constant")]
    pub kind: ScheduleKind,
    /// QLoRA: 3% of the steps.
    #[config(default = "Warmup::Ratio(0.03)")]
    pub warmup: Warmup,
}

impl LrScheduleConfig {
    /// The schedule for a run of `total_steps` optimizer steps.
    pub fn init(&self, total_steps: u64) -> Result<LrSchedule, OptimError> {
        if !self.lr.is_finite() || self.lr < 0.0 {
            return Err(OptimError::Config(format!("learning rate {} must be finite and ≥ 0", self.lr)));
        }
        let warmup_steps = match self.warmup {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) if (0.0..=1.0).contains(&r) => (total_steps as f64 * r).ceil() as u64,
            Warmup::Ratio(r) => return Err(OptimError::Config(format!("warmup ratio {r} must be in [0, 1]"))),
        };
        Ok(LrSchedule { lr: self.lr, kind: self.kind, warmup_steps, total_steps })
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub kind: ScheduleKind,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The multiplier of the peak learning rate at 0-based optimizer step `step`.
    pub fn factor(&self, step: u64) -> f64 {
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        if step < self.warmup_steps {
            return s / w.max(1.0);
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate at 0-based optimizer step `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.lr * self.factor(step)
    }
}
