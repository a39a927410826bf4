use burn::module::Param;
use burn::prelude::*;

use crate::init::constant_param;
use crate::kernels::{norm, FusedOps};
use furnace_core::params::f32_val;

pub use furnace_core::blocks::NormKind;

/// RMSNorm (Llama) or LayerNorm (GPT-2) over the last dimension.
#[derive(Module, Debug)]
pub struct Norm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    #[module(skip)]
    pub kind: NormKind,
    pub eps: f64,
}

impl<B: Backend> Norm<B> {
    pub fn new(kind: NormKind, dim: usize, eps: f64, bias: bool, device: &B::Device) -> Self {
        Self {
            weight: constant_param([dim], 1.0, device),
            bias: (bias && kind == NormKind::LayerNorm).then(|| constant_param([dim], 0.0, device)),
            kind,
            eps,
        }
    }
}

impl<B: FusedOps> Norm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        norm(x, f32_val(&self.weight), self.bias.as_ref().map(f32_val), self.kind, self.eps as f32)
    }
}
