//! Mamba's keys: selective state-space blocks instead of attention and MLPs.

use serde_json::{Map, Value};

use super::{bounded, fill_from_preset, parse, positive, probability_and_positive, Arch, KeyError, Preset};
use crate::section;

section! {
    /// A Mamba (selective state-space blocks, no attention). Unset keys take the flavor's sizes.
    MambaConfig = "model" {
        /// Vocabulary size. 0 (unset): the tokenizer's.
        vocab_size: usize = 0,
        /// Hidden size.
        d_model: usize = 64,
        /// Number of Mamba blocks.
        n_layers: usize = 2,
        /// Longest sequence trained on or generated (the model itself has no position limit).
        max_seq_len: usize = 256,
        /// Size N of each channel's state.
        d_state: usize = 16,
        /// Width of the causal convolution.
        d_conv: usize = 4,
        /// Inner channels per model dimension (d_inner = expand·d_model).
        expand: usize = 2,
        /// Rank of the step-size (Δ) projection. Unset: ⌈d_model/16⌉.
        dt_rank: usize = 4,
        /// Epsilon inside the norms.
        norm_eps: f64 = 1e-5,
        /// Share the input embedding with the output head.
        tie_embeddings: bool = true,
        /// Δ at initialisation is log-uniform in [dt_min, dt_max], at least dt_floor.
        dt_min: f64 = 0.001; internal,
        dt_max: f64 = 0.1; internal,
        dt_floor: f64 = 1e-4; internal,
        init_std: f64 = 0.02; internal,
    }
}

pub(super) fn from_keys(p: &Preset, keys: &Map<String, Value>) -> Result<MambaConfig, KeyError> {
    let mut c: MambaConfig = parse(Arch::Mamba, keys)?;
    let given = |key: &str| keys.contains_key(key);
    fill_from_preset(
        keys,
        &mut [
            ("vocab_size", &mut c.vocab_size, p.vocab_size),
            ("d_model", &mut c.d_model, p.d_model),
            ("n_layers", &mut c.n_layers, p.n_layers),
            ("max_seq_len", &mut c.max_seq_len, p.max_seq_len),
        ],
    );
    if !given("dt_rank") {
        c.dt_rank = c.d_model.div_ceil(16);
    }
    Ok(c)
}

impl MambaConfig {
    /// A Mamba of these sizes, the other keys at their defaults (Δ's rank ⌈d_model/16⌉).
    pub fn new(vocab_size: usize, d_model: usize, n_layers: usize, max_seq_len: usize) -> Self {
        MambaConfig { vocab_size, d_model, n_layers, max_seq_len, dt_rank: d_model.div_ceil(16), ..Default::default() }
    }

    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }

    pub(super) fn check(&self) -> Result<(), KeyError> {
        positive(&[("d_model", self.d_model), ("n_layers", self.n_layers)])?;
        bounded(&[
            ("d_model", self.d_model, 1 << 16),
            ("n_layers", self.n_layers, 1 << 10),
            ("max_seq_len", self.max_seq_len, 1 << 20),
            ("vocab_size", self.vocab_size, 1 << 22),
        ])?;
        if self.d_state == 0 || self.d_conv < 2 || self.expand == 0 || self.dt_rank == 0 {
            return Err(KeyError::new(
                "d_state",
                "Mamba needs d_state, expand and dt_rank above 0 and d_conv of at least 2",
                "use the defaults: d_state = 16, d_conv = 4, expand = 2",
            ));
        }
        probability_and_positive(0.0, &[("norm_eps", self.norm_eps, "1e-5")])
    }

    /// Parameter count, embeddings included.
    pub fn num_params(&self) -> usize {
        let (d, n, r) = (self.d_inner(), self.d_state, self.dt_rank);
        let mixer = self.d_model * 2 * d + d * (self.d_conv + 1) + d * (r + 2 * n) + (r + 1) * d + d * n + d + d * self.d_model;
        let head = if self.tie_embeddings { 0 } else { self.vocab_size * self.d_model };
        self.vocab_size * self.d_model + self.n_layers * (mixer + self.d_model) + self.d_model + head
    }

    /// Training FLOPs per token: 6 per weight of the matmuls (head included, embedding not),
    /// plus the scan and convolution, about 3 × (9·N + 2·d_conv) per inner channel and layer.
    pub fn train_flops_per_token(&self) -> f64 {
        let embed = self.vocab_size * self.d_model;
        let head = if self.tie_embeddings { embed } else { 0 };
        let weights = (self.num_params() - embed + head) as f64;
        let scan = 3.0 * (9 * self.d_state + 2 * self.d_conv) as f64 * (self.d_inner() * self.n_layers) as f64;
        6.0 * weights + scan
    }

    /// f32 bytes of activations one micro-batch keeps for backward: per layer and token the
    /// block's input and its norm's output (2·d_model), x and z (2·d_inner), the convolution's
    /// output before and after SiLU, Δ before and after softplus, the scan's output, SiLU(z) and
    /// the gated product (7·d_inner), and x_proj's dt_rank + 2·N (the fused scan keeps its
    /// inputs and recomputes its states); plus the logits and their gradient. Checkpointing as
    /// for transformers.
    pub fn activation_bytes(&self, batch: usize, seq: usize, recompute_every: Option<usize>) -> f64 {
        let tokens = (batch * seq) as f64;
        let per_layer = 4.0 * tokens * (2 * self.d_model + 9 * self.d_inner() + self.dt_rank + 2 * self.d_state) as f64;
        let input = 4.0 * tokens * self.d_model as f64;
        let logits = 2.0 * 4.0 * tokens * self.vocab_size as f64;
        super::chain_activation_bytes(self.n_layers, per_layer, input, recompute_every, true) + logits
    }
}
