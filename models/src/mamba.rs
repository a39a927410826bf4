//! Mamba (Gu & Dao, 2023): a selective state-space language model, in Hugging Face's
//! `MambaForCausalLM` layout.
//!
//! embed → blocks (RMSNorm → mixer, one residual) → final norm → head. The mixer projects to
//! (x, z), runs x through a depthwise causal convolution and SiLU, derives the step size Δ and
//! the projections B, C from x (the "selective" part), scans, gates by SiLU(z), projects back.
//! Decoding keeps per layer the last `d_conv − 1` convolution inputs and the scan state: O(1)
//! work per token.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::embedding;

use crate::blocks::{lm_logits, Linear, Norm, NormKind};
use crate::causal_lm::CausalLm;
use crate::init::{constant_param, normal_param, uniform_param};
use crate::kernels::reference::{causal_conv, selective_scan_with_state};
use crate::kernels::{causal_conv_silu, selective_scan, swiglu, FusedOps, Scan};
use crate::lora::LinearLayers;
use crate::model::Init;
pub use furnace_core::arch::MambaConfig;
use furnace_core::params::f32_val;
use furnace_core::rng::SeededRng;

impl Init for MambaConfig {
    type Model<B: Backend> = Mamba<B>;

    fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> Mamba<B> {
        let mut rng = SeededRng::new(seed);
        let std = self.init_std;
        let out_std = std / (2.0 * self.n_layers as f64).sqrt();
        let embed_tokens = normal_param([self.vocab_size, self.d_model], std, &mut rng, device);
        let layers = (0..self.n_layers)
            .map(|_| MambaBlock {
                norm: Norm::new(NormKind::RmsNorm, self.d_model, self.norm_eps, false, device),
                mixer: mixer(self, std, out_std, &mut rng, device),
            })
            .collect();
        Mamba {
            embed_tokens,
            layers,
            norm: Norm::new(NormKind::RmsNorm, self.d_model, self.norm_eps, false, device),
            lm_head: (!self.tie_embeddings).then(|| Linear::new(self.d_model, self.vocab_size, false, std, &mut rng, device)),
            max_seq_len: self.max_seq_len,
            vocab_size: self.vocab_size,
        }
    }
}

/// One block's mixer, initialised as the paper (and transformers) initialise it.
fn mixer<B: Backend>(c: &MambaConfig, std: f64, out_std: f64, rng: &mut SeededRng, device: &B::Device) -> MambaMixer<B> {
    let (d, n, r) = (c.d_inner(), c.d_state, c.dt_rank);
    let conv_bound = 1.0 / (c.d_conv as f64).sqrt();
    // Δ = softplus(bias) starts log-uniform in [dt_min, dt_max]: the bias is softplus⁻¹ of it.
    let (log_min, log_max) = (c.dt_min.ln(), c.dt_max.ln());
    let dt_bias: Vec<f32> = (0..d)
        .map(|_| {
            let dt = (log_min + rng.uniform() * (log_max - log_min)).exp().max(c.dt_floor);
            (dt + (-(-dt).exp_m1()).ln()) as f32
        })
        .collect();
    // A = −(1, 2, …, N) in every channel (S4D-real).
    let a_log: Vec<f32> = (0..d).flat_map(|_| (1..=n).map(|i| (i as f32).ln())).collect();
    MambaMixer {
        in_proj: Linear::new(c.d_model, 2 * d, false, std, rng, device),
        conv_weight: uniform_param([d, 1, c.d_conv], conv_bound, rng, device),
        conv_bias: uniform_param([d], conv_bound, rng, device),
        x_proj: Linear::new(d, r + 2 * n, false, std, rng, device),
        dt_proj: Linear {
            weight: Some(uniform_param([r, d], (r as f64).powf(-0.5), rng, device)),
            nf4: None,
            bias: Some(Param::from_tensor(Tensor::from_data(TensorData::new(dt_bias, [d]), device))),
            lora: None,
        },
        a_log: Param::from_tensor(Tensor::from_data(TensorData::new(a_log, [d, n]), device)),
        d: constant_param([d], 1.0, device),
        out_proj: Linear::new(d, c.d_model, false, out_std, rng, device),
        d_state: n,
        dt_rank: r,
    }
}

/// The selective state-space mixer (HF `MambaMixer`).
#[derive(Module, Debug)]
pub struct MambaMixer<B: Backend> {
    /// `[d_model, 2·d_inner]`: x and the gate z.
    pub in_proj: Linear<B>,
    /// `[d_inner, 1, d_conv]`: one causal filter per channel (torch's depthwise `Conv1d` layout).
    pub conv_weight: Param<Tensor<B, 3>>,
    pub conv_bias: Param<Tensor<B, 1>>,
    /// `[d_inner, dt_rank + 2·d_state]`: Δ (low rank), B and C from x.
    pub x_proj: Linear<B>,
    /// `[dt_rank, d_inner]` with bias: Δ back to full width, before the softplus.
    pub dt_proj: Linear<B>,
    /// `[d_inner, d_state]`: A = −exp(a_log).
    pub a_log: Param<Tensor<B, 2>>,
    /// `[d_inner]`: the skip connection.
    pub d: Param<Tensor<B, 1>>,
    /// `[d_inner, d_model]`.
    pub out_proj: Linear<B>,
    pub d_state: usize,
    pub dt_rank: usize,
}

/// What one layer carries between decoding steps.
#[derive(Debug, Clone)]
pub struct LayerState<B: Backend> {
    /// The last `d_conv − 1` convolution inputs `[batch, d_conv − 1, d_inner]`.
    pub conv: Tensor<B, 3>,
    /// The scan state `[batch, d_inner, d_state]`.
    pub ssm: Tensor<B, 3>,
}

impl<B: FusedOps> MambaMixer<B> {
    /// `[batch, seq, d_model]` → same. With `state`, continues from it (None: a fresh start)
    /// and leaves the state after the last position there.
    pub fn forward(&self, x: Tensor<B, 3>, state: Option<&mut Option<LayerState<B>>>) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let [d_inner, _, width] = self.conv_weight.dims();
        let xz = self.in_proj.forward(x);
        let (x, z) = (xz.clone().narrow(2, 0, d_inner), xz.narrow(2, d_inner, d_inner));

        // Causal depthwise convolution: position t sees inputs t − width + 1 ..= t.
        let filters = f32_val(&self.conv_weight).reshape([d_inner, width]);
        let (x, history) = match state.as_deref() {
            None => (causal_conv_silu(x, filters, f32_val(&self.conv_bias)), None),
            Some(state) => {
                let before = match state {
                    Some(s) => s.conv.clone(),
                    None => Tensor::zeros([batch, width - 1, d_inner], &x.device()),
                };
                let padded = Tensor::cat(vec![before, x], 1);
                let conv = causal_conv(padded.clone(), filters, f32_val(&self.conv_bias));
                (silu(conv), Some(padded.narrow(1, seq, width - 1)))
            }
        };

        let (n, r) = (self.d_state, self.dt_rank);
        let projected = self.x_proj.forward(x.clone());
        let scan = Scan {
            u: x,
            dt: self.dt_proj.forward(projected.clone().narrow(2, 0, r)),
            a: f32_val(&self.a_log).exp().neg(),
            b: projected.clone().narrow(2, r, n),
            c: projected.narrow(2, r + n, n),
            d: f32_val(&self.d),
        };
        let y = match state {
            None => selective_scan(scan),
            Some(state) => {
                let (y, ssm) = selective_scan_with_state(scan, state.as_ref().map(|s| s.ssm.clone()));
                *state = Some(LayerState { conv: history.expect("kept for a stateful call"), ssm });
                y
            }
        };
        self.out_proj.forward(swiglu(z, y))
    }
}

/// Pre-norm residual block around the mixer (HF `MambaBlock`).
#[derive(Module, Debug)]
pub struct MambaBlock<B: Backend> {
    pub norm: Norm<B>,
    pub mixer: MambaMixer<B>,
}

impl<B: FusedOps> MambaBlock<B> {
    /// Pre-norm residual block; `state` carries the layer's decoding state.
    pub fn forward(&self, x: Tensor<B, 3>, state: Option<&mut Option<LayerState<B>>>) -> Tensor<B, 3> {
        x.clone() + self.mixer.forward(self.norm.forward(x), state)
    }
}

#[derive(Module, Debug)]
pub struct Mamba<B: Backend> {
    /// `[vocab_size, d_model]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<MambaBlock<B>>,
    pub norm: Norm<B>,
    /// None when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    pub max_seq_len: usize,
    pub vocab_size: usize,
}

/// Every layer's decoding state, and how many positions it has seen.
#[derive(Debug, Clone)]
pub struct MambaState<B: Backend> {
    pub layers: Vec<Option<LayerState<B>>>,
    pub len: usize,
}

impl<B: FusedOps> Mamba<B> {
    /// The first block's input.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        embedding(f32_val(&self.embed_tokens), tokens)
    }

    /// Logits from the last block's output.
    pub fn finish(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        lm_logits(self.norm.forward(x), self.lm_head.as_ref(), &self.embed_tokens)
    }

    /// Final hidden states `[batch, seq, d_model]` (after the final norm).
    pub fn forward_hidden(&self, tokens: Tensor<B, 2, Int>, mut state: Option<&mut MambaState<B>>) -> Tensor<B, 3> {
        let mut x = self.embed(tokens);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, state.as_mut().map(|s| &mut s.layers[i]));
        }
        self.norm.forward(x)
    }
}

impl<B: FusedOps> CausalLm<B> for Mamba<B> {
    type State = MambaState<B>;

    fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        lm_logits(self.forward_hidden(tokens, None), self.lm_head.as_ref(), &self.embed_tokens)
    }

    fn init_state(&self) -> MambaState<B> {
        MambaState { layers: vec![None; self.layers.len()], len: 0 }
    }

    fn forward_step(&self, tokens: Tensor<B, 2, Int>, state: &mut MambaState<B>) -> Tensor<B, 3> {
        state.len += tokens.dims()[1];
        lm_logits(self.forward_hidden(tokens, Some(state)), self.lm_head.as_ref(), &self.embed_tokens)
    }

    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

impl<B: Backend> LinearLayers<B> for Mamba<B> {
    fn linear_layers_mut(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out: Vec<(&'static str, &mut Linear<B>)> = Vec::new();
        for layer in &mut self.layers {
            let m = &mut layer.mixer;
            out.extend([
                ("in_proj", &mut m.in_proj),
                ("x_proj", &mut m.x_proj),
                ("dt_proj", &mut m.dt_proj),
                ("out_proj", &mut m.out_proj),
            ]);
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head", head));
        }
        out
    }
}
