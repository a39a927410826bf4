use burn::module::Param;
use burn::prelude::*;

use crate::init::{constant_param, normal_param, SeededRng};
use crate::lora::LoraAdapter;

/// A dense layer computed as one 2-D matmul over all tokens. The weight is stored
/// `[d_in, d_out]` (Burn's layout; the Hugging Face tables transpose it).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A trainable low-rank update over this (then frozen) layer; see `lora`.
    pub lora: Option<LoraAdapter<B>>,
}

impl<B: Backend> Linear<B> {
    pub fn new(d_in: usize, d_out: usize, bias: bool, std: f64, rng: &mut SeededRng, device: &B::Device) -> Self {
        Self { weight: normal_param([d_in, d_out], std, rng, device), bias: bias.then(|| constant_param([d_out], 0.0, device)), lora: None }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let d_in = dims[D - 1];
        let rows = x.shape().num_elements() / d_in;
        let x = x.reshape([rows, d_in]);
        let mut out = x.clone().matmul(self.weight.val());
        if let Some(bias) = &self.bias {
            out = out + bias.val().unsqueeze_dim(0);
        }
        if let Some(lora) = &self.lora {
            out = out + lora.forward(x);
        }
        let mut out_dims = dims;
        out_dims[D - 1] = out.dims()[1];
        out.reshape(out_dims)
    }
}
