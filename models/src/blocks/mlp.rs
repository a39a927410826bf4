use burn::prelude::*;
use burn::tensor::activation::{gelu, relu};

use super::Linear;
use crate::kernels::{gelu_tanh, swiglu, FusedOps};
use furnace_core::rng::SeededRng;

pub use furnace_core::blocks::MlpKind;

#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    pub gate_proj: Option<Linear<B>>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
    #[module(skip)]
    pub kind: MlpKind,
}

impl<B: Backend> FeedForward<B> {
    /// `out_std` initialises the residual-stream projection (scaled by depth, as GPT-2 does).
    pub fn new(
        kind: MlpKind,
        d_model: usize,
        d_ff: usize,
        bias: bool,
        std: f64,
        out_std: f64,
        rng: &mut SeededRng,
        device: &B::Device,
    ) -> Self {
        Self {
            gate_proj: matches!(kind, MlpKind::SwiGlu | MlpKind::GatedGelu).then(|| Linear::new(d_model, d_ff, bias, std, rng, device)),
            up_proj: Linear::new(d_model, d_ff, bias, std, rng, device),
            down_proj: Linear::new(d_ff, d_model, bias, out_std, rng, device),
            kind,
        }
    }
}

impl<B: Backend> FeedForward<B> {
    /// The projections under their PEFT names (what LoRA's `target_modules` match).
    pub fn projections_mut(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out: Vec<(&'static str, &mut Linear<B>)> = self.gate_proj.iter_mut().map(|gate| ("gate_proj", gate)).collect();
        out.extend([("up_proj", &mut self.up_proj), ("down_proj", &mut self.down_proj)]);
        out
    }
}

impl<B: FusedOps> FeedForward<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = match (&self.gate_proj, self.kind) {
            (Some(gate), MlpKind::GatedGelu) => gelu_tanh(gate.forward(x.clone())) * self.up_proj.forward(x),
            (Some(gate), _) => swiglu(gate.forward(x.clone()), self.up_proj.forward(x)),
            (None, MlpKind::GeluExact) => gelu(self.up_proj.forward(x)),
            (None, MlpKind::Relu) => relu(self.up_proj.forward(x)),
            (None, _) => gelu_tanh(self.up_proj.forward(x)),
        };
        self.down_proj.forward(hidden)
    }
}
