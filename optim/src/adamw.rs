//! AdamW (Loshchilov & Hutter) with decoupled weight decay, parameter groups chosen by
//! parameter path, and state keyed by path so checkpoints resume it exactly.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use furnace_configs::OptimizerSection;
use furnace_models::params::{HostTensor, NamedTensors, PathStack};

/// What a parameter is, for choosing its weight-decay group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Matrix,
    Norm,
    Bias,
    Embedding,
}

impl ParamKind {
    /// By path and rank: `*.bias`; other 1-D tensors are norm weights; `embed_*` are embeddings.
    pub fn classify(path: &str, rank: usize) -> Self {
        if path.ends_with("bias") {
            ParamKind::Bias
        } else if path.split('.').next().is_some_and(|p| p.starts_with("embed")) {
            ParamKind::Embedding
        } else if rank == 1 {
            ParamKind::Norm
        } else {
            ParamKind::Matrix
        }
    }
}

#[derive(Debug, Clone)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decay_norms: bool,
    pub decay_biases: bool,
    pub decay_embeddings: bool,
}

impl From<&OptimizerSection> for AdamWConfig {
    fn from(o: &OptimizerSection) -> Self {
        Self {
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            decay_norms: o.decay_norms,
            decay_biases: o.decay_biases,
            decay_embeddings: o.decay_embeddings,
        }
    }
}

impl AdamWConfig {
    pub fn weight_decay_for(&self, kind: ParamKind) -> f64 {
        let decayed = match kind {
            ParamKind::Matrix => true,
            ParamKind::Norm => self.decay_norms,
            ParamKind::Bias => self.decay_biases,
            ParamKind::Embedding => self.decay_embeddings,
        };
        if decayed {
            self.weight_decay
        } else {
            0.0
        }
    }
}

/// First and second moments of one parameter, flattened.
#[derive(Debug, Clone)]
struct Moments<B: Backend> {
    exp_avg: Tensor<B, 1>,
    exp_avg_sq: Tensor<B, 1>,
}

pub struct AdamW<B: AutodiffBackend> {
    pub config: AdamWConfig,
    /// Optimizer steps taken (bias correction uses it).
    pub step: u64,
    state: HashMap<String, Moments<B::InnerBackend>>,
}

impl<B: AutodiffBackend> AdamW<B> {
    pub fn new(config: AdamWConfig) -> Self {
        Self { config, step: 0, state: HashMap::new() }
    }

    /// One update of every parameter that has a gradient. `grad_scale` multiplies the
    /// gradients first (global-norm clipping folds in here, saving a pass).
    pub fn step<M: AutodiffModule<B>>(&mut self, lr: f64, model: M, mut grads: GradientsParams, grad_scale: f64) -> M {
        self.step += 1;
        let mut update = Update { optimizer: self, lr, grad_scale, grads: &mut grads, path: PathStack::default() };
        model.map(&mut update)
    }

    /// Moments by name (`exp_avg.<path>`, `exp_avg_sq.<path>`), for checkpoints.
    pub fn state_tensors(&self) -> NamedTensors {
        let mut out = NamedTensors::new();
        for (path, m) in &self.state {
            out.insert(format!("exp_avg.{path}"), HostTensor::from_tensor(m.exp_avg.clone()));
            out.insert(format!("exp_avg_sq.{path}"), HostTensor::from_tensor(m.exp_avg_sq.clone()));
        }
        out
    }

    pub fn load_state(&mut self, step: u64, tensors: &NamedTensors, device: &burn::tensor::Device<B::InnerBackend>) -> Result<(), String> {
        self.step = step;
        self.state.clear();
        for (name, tensor) in tensors {
            let Some(path) = name.strip_prefix("exp_avg.") else { continue };
            let sq = tensors.get(&format!("exp_avg_sq.{path}")).ok_or_else(|| format!("optimizer state lacks exp_avg_sq.{path}"))?;
            self.state.insert(path.to_string(), Moments { exp_avg: tensor.to_tensor(device), exp_avg_sq: sq.to_tensor(device) });
        }
        Ok(())
    }
}

struct Update<'a, B: AutodiffBackend> {
    optimizer: &'a mut AdamW<B>,
    lr: f64,
    grad_scale: f64,
    grads: &'a mut GradientsParams,
    path: PathStack,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Update<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }

    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let path = self.path.path();
        let c = &self.optimizer.config;
        let weight_decay = c.weight_decay_for(ParamKind::classify(&path, D));
        let dims = tensor.dims();
        let n = tensor.shape().num_elements();
        let mut grad = grad.reshape([n]);
        if self.grad_scale != 1.0 {
            grad = grad * self.grad_scale;
        }
        let mut value = tensor.inner().reshape([n]);
        let moments = self.optimizer.state.remove(&path);
        let (exp_avg, exp_avg_sq) = match moments {
            Some(m) => (
                m.exp_avg * c.beta1 + grad.clone() * (1.0 - c.beta1),
                m.exp_avg_sq * c.beta2 + grad.square() * (1.0 - c.beta2),
            ),
            None => (grad.clone() * (1.0 - c.beta1), grad.square() * (1.0 - c.beta2)),
        };
        let t = self.optimizer.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        if weight_decay > 0.0 {
            value = value * (1.0 - self.lr * weight_decay);
        }
        let denom = exp_avg_sq.clone().sqrt() / bias_correction2.sqrt() + c.eps;
        value = value - exp_avg.clone() / denom * (self.lr / bias_correction1);
        self.optimizer.state.insert(path, Moments { exp_avg, exp_avg_sq });
        let updated = Tensor::<B, D>::from_inner(value.reshape(dims)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}
