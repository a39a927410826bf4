//! The learning rate as a pure function of the step (nanoGPT's habit): linear warmup, then
//! cosine, linear, warmup-stable-decay or constant.

use furnace_configs::{Decay, LrSchedulerSection};

#[derive(Debug, Clone)]
pub struct Schedule {
    pub peak_lr: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub decay: Decay,
    pub min_lr_ratio: f64,
    pub decay_ratio: f64,
}

impl Schedule {
    pub fn new(peak_lr: f64, total_steps: usize, section: &LrSchedulerSection) -> Self {
        Self {
            peak_lr,
            warmup_steps: section.warmup_steps,
            total_steps,
            decay: section.decay,
            min_lr_ratio: section.min_lr_ratio,
            decay_ratio: section.decay_ratio,
        }
    }

    /// Learning rate for optimizer step `step` (1-based, so the first step already moves).
    pub fn lr(&self, step: usize) -> f64 {
        if step <= self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.min_lr_ratio;
        let factor = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - (1.0 - floor) * progress,
            Decay::Cosine => floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Wsd => {
                let decay_start = self.total_steps as f64 * (1.0 - self.decay_ratio);
                let into_decay = (step as f64 - decay_start) / (self.total_steps as f64 - decay_start).max(1.0);
                if into_decay <= 0.0 {
                    1.0
                } else {
                    1.0 - (1.0 - floor) * into_decay.min(1.0)
                }
            }
        };
        self.peak_lr * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: Decay) -> Schedule {
        Schedule { peak_lr: 1.0, warmup_steps: 10, total_steps: 110, decay, min_lr_ratio: 0.1, decay_ratio: 0.2 }
    }

    #[test]
    fn warmup_is_linear_then_each_decay_ends_at_the_floor() {
        for decay in [Decay::Cosine, Decay::Linear, Decay::Wsd] {
            let s = schedule(decay);
            assert!((s.lr(5) - 0.5).abs() < 1e-12);
            assert!((s.lr(10) - 1.0).abs() < 1e-12);
            assert!((s.lr(110) - 0.1).abs() < 1e-12, "{decay:?}");
            assert!((1..110).all(|t| s.lr(t + 1) <= s.lr(t) + 1e-12 || t < 10));
        }
        assert_eq!(schedule(Decay::Constant).lr(100), 1.0);
    }

    #[test]
    fn cosine_is_halfway_at_the_midpoint_and_wsd_is_flat_until_its_decay() {
        assert!((schedule(Decay::Cosine).lr(60) - 0.55).abs() < 1e-12);
        let wsd = schedule(Decay::Wsd);
        assert_eq!(wsd.lr(88), 1.0);
        assert!((wsd.lr(99) - 0.55).abs() < 1e-12);
    }
}
