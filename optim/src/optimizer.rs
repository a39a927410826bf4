//! The optimizer the trainer drives: an `Algorithm` applied to every parameter with a
//! gradient, weight decay by parameter group, state keyed by parameter path (so a checkpoint
//! resumes it exactly), and a curvature hook for second-order methods.

use std::collections::HashMap;

use burn::module::{AutodiffModule, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, FloatDType};
use furnace_core::params::{
    map_with_paths, visit_with_paths, widened, HostTensor, NamedTensors, ParamKind, ParamKinds, PathMapper, PathVisitor,
};

use crate::algorithm::{Algorithm, Slots};
use crate::fused::FusedUpdate;
use crate::groups::DecayGroups;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

pub struct Optimizer<B: AutodiffBackend<InnerBackend: FusedUpdate>> {
    pub algorithm: Algorithm,
    pub groups: DecayGroups,
    /// What each parameter is, by path, as the model says (its weight-decay group).
    kinds: ParamKinds,
    /// Optimizer steps taken (bias correction and the curvature schedule use it).
    pub step: u64,
    state: HashMap<String, Slots<Inner<B>>>,
    /// Sophia: clipped coordinates and all coordinates since the last `take_metrics`.
    clipped: Option<Tensor<Inner<B>, 1>>,
    coordinates: usize,
}

impl<B: AutodiffBackend<InnerBackend: FusedUpdate>> Optimizer<B> {
    /// `kinds` come from the model (`LanguageModel::param_kinds`); a parameter it does not
    /// list is decayed as a matrix.
    pub fn new(algorithm: Algorithm, groups: DecayGroups, kinds: ParamKinds) -> Self {
        Self { algorithm, groups, kinds, step: 0, state: HashMap::new(), clipped: None, coordinates: 0 }
    }

    /// One update of every parameter that has a gradient. `grad_scale` multiplies the
    /// gradients first (global-norm clipping folds in here, saving a pass).
    pub fn step<M: AutodiffModule<B>>(&mut self, lr: f64, model: M, mut grads: GradientsParams, grad_scale: f64) -> M {
        self.step += 1;
        let mut update = Update { optimizer: self, lr, grad_scale, grads: &mut grads };
        map_with_paths(model, &mut update)
    }

    /// "I need a curvature estimate before optimizer step `step`" (1-based). The trainer then
    /// computes one and passes it to `update_curvature` before calling `step`.
    pub fn needs_curvature(&self, step: u64) -> bool {
        self.algorithm.needs_curvature(step)
    }

    /// Gauss-Newton-Bartlett: `grads` are the gradients of the mean loss on labels sampled
    /// from the model itself; the estimate is `scale · ĝ ⊙ ĝ` (scale = the batch size).
    pub fn update_curvature<M: AutodiffModule<B>>(&mut self, model: &M, grads: &GradientsParams, scale: f64) {
        struct Curvature<'a, B: AutodiffBackend<InnerBackend: FusedUpdate>> {
            optimizer: &'a mut Optimizer<B>,
            grads: &'a GradientsParams,
            scale: f64,
        }
        impl<B: AutodiffBackend<InnerBackend: FusedUpdate>> PathVisitor<B> for Curvature<'_, B> {
            fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
                if let Some(g) = self.grads.get::<Inner<B>, D>(param.id) {
                    let n = g.shape().num_elements();
                    let estimate = g.reshape([n]).square() * self.scale;
                    let slots = self.optimizer.state.entry(path.to_string()).or_default();
                    self.optimizer.algorithm.update_curvature(estimate, slots);
                }
            }
        }
        visit_with_paths(model, &mut Curvature { optimizer: self, grads, scale });
    }

    /// Keep the state of the parameters `keep` accepts (ZeRO: this rank's own), dropping the rest.
    pub fn retain_state(&mut self, keep: impl Fn(&str) -> bool) {
        self.state.retain(|path, _| keep(path));
    }

    /// Optimizer-specific metrics since the last call (read back from the device now).
    pub fn take_metrics(&mut self) -> Vec<(&'static str, f64)> {
        let coordinates = std::mem::take(&mut self.coordinates);
        match self.clipped.take() {
            Some(count) if coordinates > 0 => vec![("sophia/clip_fraction", count.into_scalar().elem::<f64>() / coordinates as f64)],
            _ => vec![],
        }
    }

    /// Bytes of optimizer state this process holds (ZeRO: its shard only).
    pub fn state_bytes(&self) -> usize {
        let tensors = self.state.values().flat_map(|slots| slots.values());
        tensors.map(|t| t.shape().num_elements() * t.dtype().size()).sum()
    }

    /// State by name (`<slot>.<parameter path>`), for checkpoints.
    pub fn state_tensors(&self) -> NamedTensors {
        let mut out = NamedTensors::new();
        for (path, slots) in &self.state {
            for (slot, tensor) in slots {
                out.insert(format!("{slot}.{path}"), HostTensor::from_tensor(tensor.clone()));
            }
        }
        out
    }

    pub fn load_state(&mut self, step: u64, tensors: &NamedTensors, device: &burn::tensor::Device<Inner<B>>) -> Result<(), String> {
        self.step = step;
        self.state.clear();
        for (name, tensor) in tensors {
            let (slot, path) = name.split_once('.').ok_or_else(|| format!("optimizer state `{name}` is not `<slot>.<path>`"))?;
            self.state.entry(path.to_string()).or_default().insert(slot.to_string(), tensor.to_tensor(device));
        }
        Ok(())
    }
}

struct Update<'a, B: AutodiffBackend<InnerBackend: FusedUpdate>> {
    optimizer: &'a mut Optimizer<B>,
    lr: f64,
    grad_scale: f64,
    grads: &'a mut GradientsParams,
}

impl<B: AutodiffBackend<InnerBackend: FusedUpdate>> PathMapper<B> for Update<'_, B> {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<Inner<B>, D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let kind = self.optimizer.kinds.get(path).copied().unwrap_or(ParamKind::Matrix);
        let weight_decay = self.optimizer.groups.weight_decay_for(kind);
        let dims = tensor.dims();
        let n = tensor.shape().num_elements();
        let grad = grad.reshape([n]);
        let optimizer = &mut *self.optimizer;
        let slots = optimizer.state.entry(path.to_string()).or_default();
        // bf16-true: a bf16 parameter is updated in f32 (its state is f32) and rounded back.
        let stored = tensor.dtype();
        let (value, grad) = (widened(tensor.inner().reshape([n])), widened(grad));
        let (algorithm, step, clipped) = (&optimizer.algorithm, optimizer.step, &mut optimizer.clipped);
        let updated = Inner::<B>::update(algorithm, step, self.lr, weight_decay, self.grad_scale, value, grad, slots, clipped);
        let updated = match stored {
            DType::F32 => updated,
            _ => updated.cast(FloatDType::from(stored)),
        };
        if matches!(optimizer.algorithm, Algorithm::Sophia { .. }) {
            optimizer.coordinates += n;
        }
        let updated = Tensor::<B, D>::from_inner(updated.reshape(dims)).require_grad();
        Param::from_mapped_value(id, updated, mapper)
    }
}
