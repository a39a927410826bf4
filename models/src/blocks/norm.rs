use burn::module::Param;
use burn::prelude::*;

use crate::init::constant_param;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NormKind {
    RmsNorm,
    LayerNorm,
}

/// RMSNorm (Llama) or LayerNorm (GPT-2) over the last dimension, always computed in f32.
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

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let normed = match self.kind {
            NormKind::RmsNorm => {
                let mean_square = x.clone().square().mean_dim(D - 1);
                x * (mean_square + self.eps).sqrt().recip()
            }
            NormKind::LayerNorm => {
                let centred = x.clone() - x.mean_dim(D - 1);
                let var = centred.clone().square().mean_dim(D - 1);
                centred * (var + self.eps).sqrt().recip()
            }
        };
        let weight = self.weight.val().unsqueeze::<D>();
        match &self.bias {
            Some(bias) => normed * weight + bias.val().unsqueeze::<D>(),
            None => normed * weight,
        }
    }
}
