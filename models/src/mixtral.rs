//! Mixtral (Jiang et al., 2024): the Llama decoder of `decoder.rs` with every MLP replaced by
//! the sparse mixture of experts defined here. A linear router scores the E experts for each
//! token; the token goes to the top k of the router's softmax, weighted by those k
//! probabilities renormalised to sum to 1, and the experts' outputs are summed.
//!
//! Routing is sparse: each expert gathers the tokens routed to it, runs on those only, and its
//! weighted outputs are added back at their rows. Training adds Switch Transformer's
//! load-balancing loss (in transformers' Mixtral form) and ST-MoE's router z-loss, both
//! computed from the router logits every MoE layer returns.

use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::IndexingUpdateOp;

use crate::blocks::{FeedForward, Linear, MlpKind};
use crate::kernels::FusedOps;
pub use furnace_core::arch::MoeConfig;
use furnace_core::rng::SeededRng;

/// One layer's router and experts, initialised from `rng`.
pub fn sparse_moe<B: Backend>(
    config: &MoeConfig,
    d_model: usize,
    d_ff: usize,
    std: f64,
    out_std: f64,
    rng: &mut SeededRng,
    device: &B::Device,
) -> SparseMoe<B> {
    SparseMoe {
        router: Linear::new(d_model, config.n_experts, false, std, rng, device),
        experts: (0..config.n_experts)
            .map(|_| FeedForward::new(MlpKind::SwiGlu, d_model, d_ff, false, std, out_std, rng, device))
            .collect(),
        top_k: config.experts_per_token,
        capacity_factor: config.capacity_factor,
    }
}

#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// `[d_model, n_experts]`: one logit per expert.
    pub router: Linear<B>,
    pub experts: Vec<FeedForward<B>>,
    pub top_k: usize,
    #[module(skip)]
    pub capacity_factor: f64,
}

impl<B: FusedOps> SparseMoe<B> {
    /// The layer's output `[batch, seq, d_model]` and its router logits `[batch·seq, E]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let [batch, seq, d_model] = x.dims();
        let (tokens, k, n_experts) = (batch * seq, self.top_k, self.experts.len());
        let device = x.device();
        let x = x.reshape([tokens, d_model]);
        let logits = self.router.forward(x.clone());
        let (top, chosen) = softmax(logits.clone(), 1).topk_with_indices(k, 1);
        // The k weights are the chosen probabilities renormalised; gradients reach the router
        // through them.
        let weights = (top.clone() / top.sum_dim(1)).reshape([tokens * k]);
        let chosen: Vec<i64> = chosen.into_data().convert::<i64>().into_vec().expect("expert indices");
        let capacity =
            (self.capacity_factor > 0.0).then(|| (self.capacity_factor * (tokens * k) as f64 / n_experts as f64).ceil() as usize);
        // Per expert, its tokens (rows of x) and their slots in the flat [tokens·k] weights, in
        // token order, so that under a capacity the earliest tokens are kept.
        let mut rows = vec![Vec::new(); n_experts];
        let mut slots = vec![Vec::new(); n_experts];
        for (slot, &expert) in chosen.iter().enumerate() {
            let expert = expert as usize;
            if capacity.is_none_or(|c| rows[expert].len() < c) {
                rows[expert].push((slot / k) as i64);
                slots[expert].push(slot as i64);
            }
        }
        let index = |v: Vec<i64>| {
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), &device)
        };
        let mut out = Tensor::<B, 2>::zeros([tokens, d_model], &device);
        for ((expert, rows), slots) in self.experts.iter().zip(rows).zip(slots) {
            if rows.is_empty() {
                continue;
            }
            let m = rows.len();
            let rows = index(rows);
            let input = x.clone().select(0, rows.clone()).reshape([1, m, d_model]);
            let weight = weights.clone().select(0, index(slots)).reshape([m, 1]);
            let output = expert.forward(input).reshape([m, d_model]) * weight;
            out = out.select_assign(0, rows, output, IndexingUpdateOp::Add);
        }
        (out.reshape([batch, seq, d_model]), logits)
    }
}

/// The router logits of every MoE layer of one forward pass (`[tokens, E]` each), from which
/// training takes its auxiliary losses and the experts' load.
pub struct Routing<B: Backend> {
    pub logits: Vec<Tensor<B, 2>>,
    pub top_k: usize,
}

impl<B: Backend> Routing<B> {
    /// Top-k assignments per expert over every layer's tokens (host counts; no gradient).
    fn assignments(&self) -> Vec<f64> {
        let n_experts = self.logits[0].dims()[1];
        let mut counts = vec![0.0; n_experts];
        for logits in &self.logits {
            let (_, chosen) = logits.clone().detach().topk_with_indices(self.top_k, 1);
            for e in chosen.into_data().convert::<i64>().into_vec::<i64>().expect("expert indices") {
                counts[e as usize] += 1.0;
            }
        }
        counts
    }

    fn rows(&self) -> usize {
        self.logits.iter().map(|l| l.dims()[0]).sum()
    }

    /// What each layer's share of the auxiliary losses needs from the whole pass, with the
    /// losses' coefficients: `aux_coef · load_balancing_loss + z_coef · z_loss` is the sum over
    /// layers of `layer_loss(logits)`.
    pub fn loss_weights(&self, aux_coef: f64, z_coef: f64) -> RouterLossWeights {
        let rows = self.rows() as f64;
        let fractions = self.assignments().iter().map(|&c| (c / rows) as f32).collect();
        RouterLossWeights { fractions, rows, aux_coef, z_coef }
    }

    /// Switch Transformer's load-balancing loss as transformers computes it for Mixtral:
    /// E · Σ_e f_e · P_e over all layers' tokens together, f_e the top-k assignments to expert e
    /// per token and P_e its mean router probability. k when routing is even, larger when not.
    pub fn load_balancing_loss(&self) -> Tensor<B, 1> {
        let weights = self.loss_weights(1.0, 0.0);
        self.logits.iter().map(|l| weights.load_balancing(l.clone())).reduce(|a, b| a + b).expect("one MoE layer")
    }

    /// ST-MoE's router z-loss: the mean over tokens (all layers) of logsumexp(logits)².
    pub fn z_loss(&self) -> Tensor<B, 1> {
        // The z-loss needs no assignments.
        let weights = RouterLossWeights { fractions: Vec::new(), rows: self.rows() as f64, aux_coef: 0.0, z_coef: 1.0 };
        self.logits.iter().map(|l| weights.z(l.clone())).reduce(|a, b| a + b).expect("one MoE layer")
    }

    /// Each expert's share of the top-k assignments over all layers (sums to 1).
    pub fn expert_fractions(&self) -> Vec<f64> {
        self.loss_weights(0.0, 0.0).expert_fractions()
    }
}

/// The auxiliary losses split by layer. Every layer's top-k assignments enter the
/// load-balancing loss only as fractions, which carry no gradient, and both losses average over
/// the rows of all layers; given those, each layer's share depends on its own router logits
/// alone, so activation checkpointing can back-propagate it when it recomputes the layer.
#[derive(Debug, Clone)]
pub struct RouterLossWeights {
    /// Each expert's top-k assignments over all layers' rows, per row.
    fractions: Vec<f32>,
    /// Routed rows over all layers.
    rows: f64,
    pub aux_coef: f64,
    pub z_coef: f64,
}

impl RouterLossWeights {
    /// Each expert's share of the top-k assignments over all layers (sums to 1).
    pub fn expert_fractions(&self) -> Vec<f64> {
        let total: f64 = self.fractions.iter().map(|&f| f as f64).sum();
        self.fractions.iter().map(|&f| f as f64 / total).collect()
    }

    /// Both coefficients times `factor` (a loss scale, a micro-batch's share).
    pub fn scaled(self, factor: f64) -> Self {
        Self { aux_coef: self.aux_coef * factor, z_coef: self.z_coef * factor, ..self }
    }

    /// One layer's share of the load-balancing loss: E · Σ_e f_e · Σ_rows p_e / rows.
    pub fn load_balancing<B: Backend>(&self, logits: Tensor<B, 2>) -> Tensor<B, 1> {
        let n_experts = self.fractions.len();
        let fractions = Tensor::<B, 1>::from_data(TensorData::new(self.fractions.clone(), [n_experts]), &logits.device());
        let probability_sums = softmax(logits, 1).sum_dim(0).reshape([n_experts]);
        (fractions * probability_sums / self.rows).sum() * n_experts as f64
    }

    /// One layer's share of the z-loss: Σ_rows logsumexp(logits)² / rows.
    pub fn z<B: Backend>(&self, logits: Tensor<B, 2>) -> Tensor<B, 1> {
        let max = logits.clone().detach().max_dim(1);
        let lse = (logits - max.clone()).exp().sum_dim(1).log() + max;
        lse.powf_scalar(2.0).sum() / self.rows
    }

    /// One layer's share of `aux_coef · load_balancing + z_coef · z`.
    pub fn layer_loss<B: Backend>(&self, logits: Tensor<B, 2>) -> Tensor<B, 1> {
        self.load_balancing(logits.clone()) * self.aux_coef + self.z(logits) * self.z_coef
    }
}
