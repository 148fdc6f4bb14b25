//! Learning-rate schedules: linear warmup, then cosine, linear, constant or
//! warmup-stable-decay.

use config::{ScheduleKind, TrainingSection};

/// The learning rate for each optimizer step.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    kind: ScheduleKind,
    lr: f64,
    min_lr: f64,
    warmup: usize,
    total: usize,
    decay_fraction: f64,
}

impl Schedule {
    /// The schedule of `t` over `total` optimizer steps.
    pub fn new(t: &TrainingSection, total: usize) -> Self {
        Self {
            kind: t.schedule,
            lr: t.lr,
            min_lr: t.min_lr,
            warmup: t.warmup_steps.min(total.saturating_sub(1)),
            total: total.max(1),
            decay_fraction: t.decay_fraction,
        }
    }

    /// The rate used for the update of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.total - self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let decayed = |fraction_left: f64| self.min_lr + (self.lr - self.min_lr) * fraction_left;
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => decayed(0.5 * (1.0 + (std::f64::consts::PI * progress).cos())),
            ScheduleKind::Linear => decayed(1.0 - progress),
            ScheduleKind::Wsd => {
                let stable = 1.0 - self.decay_fraction;
                if progress < stable {
                    self.lr
                } else {
                    decayed(1.0 - (progress - stable) / self.decay_fraction.max(1e-12))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> Schedule {
        let t = TrainingSection {
            schedule: kind,
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            decay_fraction: 0.2,
            ..TrainingSection::default()
        };
        Schedule::new(&t, 110)
    }

    #[test]
    fn warmup_then_shapes() {
        let cos = schedule(ScheduleKind::Cosine);
        assert!((cos.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((cos.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((cos.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((cos.lr_at(60) - 0.55).abs() < 1e-12);
        assert!((cos.lr_at(110) - 0.1).abs() < 1e-12);
        let lin = schedule(ScheduleKind::Linear);
        assert!((lin.lr_at(35) - (0.1 + 0.9 * 0.75)).abs() < 1e-12);
        assert_eq!(schedule(ScheduleKind::Constant).lr_at(100), 1.0);
        let wsd = schedule(ScheduleKind::Wsd);
        assert_eq!(wsd.lr_at(89), 1.0);
        assert!((wsd.lr_at(100) - (0.1 + 0.9 * 0.5)).abs() < 1e-12);
        assert!(wsd.lr_at(109) < 0.2);
    }
}
