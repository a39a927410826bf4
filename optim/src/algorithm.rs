//! The per-parameter update rules, on flattened tensors. Each keeps its state in named
//! slots so checkpoints store `<slot>.<parameter path>`.

use std::collections::BTreeMap;

use burn::prelude::*;
use furnace_configs::{OptimizerName, Recipe};

/// Optimizer state of one parameter, by slot name (`exp_avg`, `exp_avg_sq`, `hessian`).
pub type Slots<B> = BTreeMap<String, Tensor<B, 1>>;

#[derive(Debug, Clone, PartialEq)]
pub enum Algorithm {
    /// m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²; θ ← θ − lr·λ·θ − lr·m̂/(√v̂ + ε).
    AdamW { beta1: f64, beta2: f64, eps: f64 },
    /// c ← β1·m + (1−β1)·g; θ ← θ − lr·(sign(c) + λ·θ); m ← β2·m + (1−β2)·g.
    Lion { beta1: f64, beta2: f64 },
    /// m ← β1·m + (1−β1)·g; θ ← θ − lr·λ·θ; θ ← θ − lr·clip(m / max(ρ·h, ε), 1), with
    /// h ← β2·h + (1−β2)·ĥ every `hessian_interval` steps from the Gauss-Newton-Bartlett estimate.
    Sophia { beta1: f64, beta2: f64, rho: f64, eps: f64, hessian_interval: usize },
}

impl Algorithm {
    pub fn from_recipe(recipe: &Recipe) -> Self {
        let (beta1, beta2, eps) = recipe.optimizer_betas_eps();
        match recipe.optimizer.name {
            OptimizerName::AdamW => Algorithm::AdamW { beta1, beta2, eps },
            OptimizerName::Lion => Algorithm::Lion { beta1, beta2 },
            OptimizerName::Sophia => {
                Algorithm::Sophia { beta1, beta2, rho: recipe.optimizer.rho, eps, hessian_interval: recipe.optimizer.hessian_interval }
            }
        }
    }

    /// Float slots of state per parameter element (Adam's two moments, Lion's one, Sophia's
    /// momentum and Hessian estimate).
    pub fn state_slots(&self) -> usize {
        match self {
            Algorithm::AdamW { .. } | Algorithm::Sophia { .. } => 2,
            Algorithm::Lion { .. } => 1,
        }
    }

    /// One update of `value` given its gradient; `step` is 1-based. Sophia adds the count of
    /// clipped coordinates to `clipped`.
    pub fn update<B: Backend>(
        &self,
        step: u64,
        lr: f64,
        weight_decay: f64,
        value: Tensor<B, 1>,
        grad: Tensor<B, 1>,
        slots: &mut Slots<B>,
        clipped: &mut Option<Tensor<B, 1>>,
    ) -> Tensor<B, 1> {
        let decayed = if weight_decay > 0.0 { value * (1.0 - lr * weight_decay) } else { value };
        let ema = |slots: &mut Slots<B>, name: &str, beta: f64, x: Tensor<B, 1>| -> Tensor<B, 1> {
            match slots.remove(name) {
                Some(old) => old * beta + x * (1.0 - beta),
                None => x * (1.0 - beta),
            }
        };
        match *self {
            Algorithm::AdamW { beta1, beta2, eps } => {
                let exp_avg = ema(slots, "exp_avg", beta1, grad.clone());
                let exp_avg_sq = ema(slots, "exp_avg_sq", beta2, grad.square());
                let bias_correction1 = 1.0 - beta1.powi(step as i32);
                let bias_correction2 = 1.0 - beta2.powi(step as i32);
                let denom = exp_avg_sq.clone().sqrt() / bias_correction2.sqrt() + eps;
                let updated = decayed - exp_avg.clone() / denom * (lr / bias_correction1);
                slots.insert("exp_avg".into(), exp_avg);
                slots.insert("exp_avg_sq".into(), exp_avg_sq);
                updated
            }
            Algorithm::Lion { beta1, beta2 } => {
                let momentum = slots.remove("exp_avg");
                let interpolated = match &momentum {
                    Some(m) => m.clone() * beta1 + grad.clone() * (1.0 - beta1),
                    None => grad.clone() * (1.0 - beta1),
                };
                let updated = decayed - interpolated.sign() * lr;
                let exp_avg = match momentum {
                    Some(m) => m * beta2 + grad * (1.0 - beta2),
                    None => grad * (1.0 - beta2),
                };
                slots.insert("exp_avg".into(), exp_avg);
                updated
            }
            Algorithm::Sophia { beta1, rho, eps, .. } => {
                let exp_avg = ema(slots, "exp_avg", beta1, grad);
                let ratio = match slots.get("hessian") {
                    Some(h) => exp_avg.clone() / (h.clone() * rho).clamp_min(eps),
                    None => exp_avg.clone() / eps,
                };
                let count = ratio.clone().abs().greater_equal_elem(1.0).float().sum();
                *clipped = Some(match clipped.take() {
                    Some(total) => total + count,
                    None => count,
                });
                let updated = decayed - ratio.clamp(-1.0, 1.0) * lr;
                slots.insert("exp_avg".into(), exp_avg);
                updated
            }
        }
    }

    /// Sophia: whether optimizer step `step` (1-based) refreshes the Hessian estimate first
    /// (steps 1, k+1, 2k+1, ...: the paper's `t mod k = 1`).
    pub fn needs_curvature(&self, step: u64) -> bool {
        match *self {
            Algorithm::Sophia { hessian_interval, .. } => (step - 1).is_multiple_of(hessian_interval as u64),
            _ => false,
        }
    }

    /// Fold a curvature estimate `estimate` (already ĥ, same shape as the parameter) into the state.
    pub fn update_curvature<B: Backend>(&self, estimate: Tensor<B, 1>, slots: &mut Slots<B>) {
        if let Algorithm::Sophia { beta2, .. } = *self {
            let h = match slots.remove("hessian") {
                Some(h) => h * beta2 + estimate * (1.0 - beta2),
                None => estimate * (1.0 - beta2),
            };
            slots.insert("hessian".into(), h);
        }
    }
}
