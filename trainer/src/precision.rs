//! Mixed precision: the dtype the dense layers compute in, and fp16's dynamic loss scaling.

use anyhow::{bail, Result};
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use furnace_configs::{Precision, Recipe};
use serde::{Deserialize, Serialize};

/// The dtype of the dense layers' matmuls under `precision` (None: f32 throughout), checked
/// against what the backend computes in.
pub fn compute_dtype<B: Backend>(recipe: &Recipe, device: &B::Device) -> Result<Option<FloatDType>> {
    let dtype = match recipe.runtime.precision {
        Precision::Fp32 => return Ok(None),
        Precision::Bf16Mixed | Precision::Bf16True => FloatDType::BF16,
        Precision::Fp16Mixed => FloatDType::F16,
    };
    if !B::supports_dtype(device, DType::from(dtype)) {
        bail!(
            "recipe key runtime.precision = \"{}\": the {} backend does not compute in {dtype:?}; use \"fp32\" or another precision",
            recipe.runtime.precision,
            recipe.runtime.backend
        );
    }
    Ok(Some(dtype))
}

/// fp16's dynamic loss scale, as PyTorch's GradScaler keeps it: gradients that overflow skip
/// the step and halve the scale; `growth_interval` good steps in a row double it. Saved in
/// checkpoints so a resumed run scales as the straight one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the scale last changed (GradScaler's growth tracker).
    pub good_steps: usize,
}

impl LossScaler {
    pub fn new(scale: f64) -> Self {
        Self { scale, good_steps: 0 }
    }

    /// Record a step whose unscaled gradients were `finite` (or not). Returns whether the
    /// optimizer may apply them.
    pub fn update(&mut self, finite: bool, growth_interval: usize) -> bool {
        if !finite {
            self.scale *= 0.5;
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == growth_interval {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_backs_off_and_good_steps_grow_the_scale() {
        let mut scaler = LossScaler::new(65536.0);
        assert!(!scaler.update(false, 3));
        assert_eq!(scaler, LossScaler { scale: 32768.0, good_steps: 0 });
        assert!(scaler.update(true, 3) && scaler.update(true, 3));
        assert_eq!(scaler.scale, 32768.0);
        assert!(scaler.update(true, 3));
        assert_eq!(scaler, LossScaler { scale: 65536.0, good_steps: 0 }, "doubled after 3 good steps");
        scaler.update(true, 3);
        scaler.update(false, 3);
        assert_eq!(scaler, LossScaler { scale: 32768.0, good_steps: 0 }, "an overflow resets the count");
    }
}
