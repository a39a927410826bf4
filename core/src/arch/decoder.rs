//! Llama, GPT-2 and Mixtral: the decoder-only transformer's keys. Llama: RMSNorm, RoPE,
//! SwiGLU, no biases, an untied head; GPT-2: LayerNorm, learned positions, GELU, biases, a tied
//! head; Mixtral: a Llama whose MLPs are each a sparse mixture of SwiGLU experts.

use serde_json::{Map, Value};

use super::{bounded, default_d_ff, fill_from_preset, parse, positive, probability_and_positive, Arch, KeyError, ModelConfig, Preset};
use crate::blocks::{MlpKind, NormKind, PositionKind};
use crate::schema::Section;
use crate::section;

section! {
    /// A decoder-only transformer (llama, gpt2, mixtral). Unset keys take the flavor's sizes
    /// and the arch's layout.
    DecoderConfig = "model" {
        /// Vocabulary size. 0 (unset): the tokenizer's.
        vocab_size: usize = 0,
        /// Hidden size.
        d_model: usize = 64,
        /// Number of transformer blocks.
        n_layers: usize = 2,
        /// Number of attention (query) heads.
        n_heads: usize = 4,
        /// Number of key/value heads: equal to n_heads is MHA, 1 is MQA, between is GQA. Unset: n_heads.
        n_kv_heads: usize = 4,
        /// Feed-forward hidden size. Unset: 4·d_model for gelu, 8/3·d_model rounded up to 32 for swiglu.
        d_ff: usize = 192,
        /// Longest sequence the model accepts (size of the learned position table, RoPE table).
        max_seq_len: usize = 256,
        /// Normalisation: rmsnorm or layernorm. Unset: the arch's (llama rmsnorm, gpt2 layernorm).
        norm: NormKind = NormKind::RmsNorm,
        /// Epsilon inside the norms. Unset: the arch's (llama 1e-6, gpt2 1e-5).
        norm_eps: f64 = 1e-6,
        /// Position encoding: rope, alibi or learned. Unset: the arch's (llama rope, gpt2 learned).
        position: PositionKind = PositionKind::Rope,
        /// RoPE base frequency.
        rope_theta: f64 = 10000.0,
        /// Feed-forward: swiglu, gelu (the tanh approximation, GPT-2's) or gelu-exact (erf).
        /// Unset: the arch's (llama and mixtral swiglu, gpt2 gelu).
        mlp: MlpKind = MlpKind::SwiGlu,
        /// Biases in linear layers and norms. Unset: the arch's (gpt2 yes, llama no).
        bias: bool = false,
        /// Share the input embedding with the output head. Unset: the arch's (gpt2 yes, llama no).
        tie_embeddings: bool = false,
        /// Attend only to the last N positions (Mistral-style). 0: full causal attention.
        sliding_window: usize = 0,
        /// Attention and MLP in parallel from one norm (GPT-J / PaLM style).
        parallel_block: bool = false,
        /// Dropout probability on attention output and MLP output (0 for exact resume).
        dropout: f64 = 0.0,
        init_std: f64 = 0.02; internal,
        /// A scalar head on the final hidden state, as Hugging Face's `score` layer of a
        /// sequence-classification model: what a reward model (and PPO's value) outputs.
        score_head: bool = false; internal,
        /// Mixtral: every MLP a sparse mixture of SwiGLU experts (its keys are MoeConfig's).
        moe: Option<MoeConfig> = None; internal,
    }
}

section! {
    /// Mixtral's experts.
    MoeConfig = "model" {
        /// Mixtral: experts per layer (transformers' num_local_experts).
        n_experts: usize = 8,
        /// Mixtral: experts each token is routed to, top-k of the router's softmax
        /// (num_experts_per_tok).
        experts_per_token: usize = 2,
        /// Mixtral: tokens one expert takes per batch, as a multiple of the even share
        /// tokens·k/n_experts; the tokens past it skip that expert (Switch Transformer's token
        /// dropping). 0: no limit (dropless, as Mixtral).
        capacity_factor: f64 = 0.0,
        /// Mixtral: weight of the load-balancing loss n_experts·Σ f_e·P_e (Switch Transformer;
        /// transformers' router_aux_loss_coef) added to the training loss.
        router_aux_loss_coef: f64 = 0.01,
        /// Mixtral: weight of the router z-loss, the mean squared logsumexp of router logits
        /// (ST-MoE), which keeps router logits small.
        router_z_loss_coef: f64 = 0.001,
    }
}

/// A Llama, GPT-2 or Mixtral from a `[model]` table.
pub(super) fn from_keys(arch: Arch, p: &Preset, keys: &Map<String, Value>) -> Result<ModelConfig, KeyError> {
    let moe_keys: Vec<&str> = MoeConfig::options().iter().map(|o| o.key).collect();
    let (moe, own): (Map<_, _>, Map<_, _>) =
        keys.clone().into_iter().partition(|(k, _)| arch == Arch::Mixtral && moe_keys.contains(&k.as_str()));
    let mut c: DecoderConfig = parse(arch, &own)?;
    let given = |key: &str| keys.contains_key(key);
    fill_from_preset(
        keys,
        &mut [
            ("vocab_size", &mut c.vocab_size, p.vocab_size),
            ("d_model", &mut c.d_model, p.d_model),
            ("n_layers", &mut c.n_layers, p.n_layers),
            ("n_heads", &mut c.n_heads, p.n_heads),
            ("max_seq_len", &mut c.max_seq_len, p.max_seq_len),
        ],
    );
    if arch == Arch::Gpt2 {
        if !given("norm") {
            c.norm = NormKind::LayerNorm;
        }
        if !given("norm_eps") {
            c.norm_eps = 1e-5;
        }
        if !given("position") {
            c.position = PositionKind::Learned;
        }
        if !given("mlp") {
            c.mlp = MlpKind::Gelu;
        }
        if !given("bias") {
            c.bias = true;
        }
        if !given("tie_embeddings") {
            c.tie_embeddings = true;
        }
    }
    if !given("n_kv_heads") {
        c.n_kv_heads = c.n_heads;
    }
    if !given("d_ff") {
        c.d_ff = default_d_ff(c.mlp, c.d_model);
    }
    Ok(match arch {
        Arch::Llama => ModelConfig::Llama(c),
        Arch::Gpt2 => ModelConfig::Gpt2(c),
        _ => ModelConfig::Mixtral(c.with_moe(Some(parse(arch, &moe)?))),
    })
}

impl DecoderConfig {
    /// A Llama-layout decoder of these sizes (MHA), the other keys at their defaults.
    pub fn new(vocab_size: usize, d_model: usize, n_layers: usize, n_heads: usize, d_ff: usize, max_seq_len: usize) -> Self {
        DecoderConfig { vocab_size, d_model, n_layers, n_heads, n_kv_heads: n_heads, d_ff, max_seq_len, ..Default::default() }
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads
    }

    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    pub(super) fn check(&self, arch: Arch) -> Result<(), KeyError> {
        positive(&[
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("d_ff", self.d_ff),
        ])?;
        bounded(&[
            ("d_model", self.d_model, 1 << 16),
            ("n_layers", self.n_layers, 1 << 10),
            ("n_heads", self.n_heads, 1 << 10),
            ("d_ff", self.d_ff, 1 << 18),
            ("max_seq_len", self.max_seq_len, 1 << 20),
            ("vocab_size", self.vocab_size, 1 << 22),
        ])?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(KeyError::new(
                "n_heads",
                format!("d_model = {} is not divisible by n_heads = {}", self.d_model, self.n_heads),
                "pick n_heads dividing d_model",
            ));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return Err(KeyError::new(
                "n_kv_heads",
                format!("n_heads = {} is not a multiple of n_kv_heads = {}", self.n_heads, self.n_kv_heads),
                "pick n_kv_heads dividing n_heads (1 = MQA, n_heads = MHA)",
            ));
        }
        if self.position == PositionKind::Rope && !self.head_dim().is_multiple_of(2) {
            return Err(KeyError::new(
                "n_heads",
                format!("RoPE needs an even head dimension, got {}", self.head_dim()),
                "change d_model or n_heads",
            ));
        }
        let t5_only =
            [("position", self.position == PositionKind::Relative), ("mlp", matches!(self.mlp, MlpKind::Relu | MlpKind::GatedGelu))];
        if let Some((key, _)) = t5_only.iter().find(|(_, set)| *set) {
            return Err(KeyError::new(
                key,
                format!("model.{key} as given is T5's; this model is {arch}"),
                format!("remove model.{key}, or set model.arch = \"t5\""),
            ));
        }
        if let Some(moe) = &self.moe {
            bounded(&[("n_experts", moe.n_experts, 1 << 10)])?;
            if moe.n_experts == 0 || moe.experts_per_token == 0 || moe.experts_per_token > moe.n_experts {
                return Err(KeyError::new(
                    "experts_per_token",
                    format!("experts_per_token = {} must be between 1 and n_experts = {}", moe.experts_per_token, moe.n_experts),
                    "Mixtral routes each token to 2 of 8 experts: n_experts = 8, experts_per_token = 2",
                ));
            }
            if self.mlp != MlpKind::SwiGlu {
                return Err(KeyError::new("mlp", "Mixtral's experts are SwiGLU MLPs", "remove model.mlp or set it to \"swiglu\""));
            }
            if moe.capacity_factor < 0.0 || moe.router_aux_loss_coef < 0.0 || moe.router_z_loss_coef < 0.0 {
                return Err(KeyError::new(
                    "capacity_factor",
                    "capacity_factor, router_aux_loss_coef and router_z_loss_coef must not be negative",
                    "use 0 for dropless routing or no auxiliary loss",
                ));
            }
        }
        probability_and_positive(self.dropout, &[("norm_eps", self.norm_eps, "1e-5"), ("rope_theta", self.rope_theta, "10000.0")])
    }

    /// Parameter count, embeddings included.
    pub fn num_params(&self) -> usize {
        self.params(false)
    }

    /// All parameters, or (`active_only`) those one token runs through: a mixture of experts
    /// counts its k routed experts.
    fn params(&self, active_only: bool) -> usize {
        let kv = self.kv_heads() * self.head_dim();
        let b = self.bias as usize;
        let attn = self.d_model * (self.d_model + 2 * kv) + self.d_model * self.d_model + b * (2 * self.d_model + 2 * kv);
        let mats = if self.mlp == MlpKind::SwiGlu { 3 } else { 2 };
        let mlp = match &self.moe {
            Some(moe) if active_only => moe.active_params(self.d_model, self.d_ff),
            Some(moe) => moe.num_params(self.d_model, self.d_ff),
            None => mats * self.d_model * self.d_ff + b * (self.d_ff * (mats - 1) + self.d_model),
        };
        let norm = self.d_model * (1 + (self.bias && self.norm == NormKind::LayerNorm) as usize);
        let norms_per_block = if self.parallel_block { 1 } else { 2 };
        let block = attn + mlp + norms_per_block * norm;
        let positions = if self.position == PositionKind::Learned { self.max_seq_len * self.d_model } else { 0 };
        let head = if self.tie_embeddings { 0 } else { self.vocab_size * self.d_model };
        let score = if self.score_head { self.d_model } else { 0 };
        self.vocab_size * self.d_model + positions + self.n_layers * block + norm + head + score
    }

    /// Training FLOPs per token at context `seq_len` (PaLM appendix B: 6N + 12·L·d·T,
    /// with N the non-embedding parameters a token runs through, plus the head).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let embed =
            self.vocab_size * self.d_model + if self.position == PositionKind::Learned { self.max_seq_len * self.d_model } else { 0 };
        let head_matmul = if self.tie_embeddings { self.vocab_size * self.d_model } else { 0 };
        let n = (self.params(true) - embed + head_matmul) as f64;
        6.0 * n + 12.0 * (self.n_layers * self.d_model * seq_len) as f64
    }

    /// Bytes of f32 activations backward keeps for one micro-batch of `batch × seq` tokens: per
    /// layer s·b·d·(34 + 5·a·s/d) half-precision bytes (Korthikanti et al., 2022), doubled for
    /// f32, plus the logits and their gradient. When every `recompute_every`-th block but the
    /// last is recomputed, those keep only their input; recomputing one needs no more than the
    /// kept blocks' activations (the last block's among them) have freed.
    pub fn activation_bytes(&self, batch: usize, seq: usize, recompute_every: Option<usize>) -> f64 {
        let per_layer = super::transformer_layer_bytes(batch, seq, seq, self.d_model, self.n_heads);
        let input = 4.0 * (batch * seq * self.d_model) as f64;
        let logits = 2.0 * 4.0 * (seq * batch * self.vocab_size) as f64;
        super::chain_activation_bytes(self.n_layers, per_layer, input, recompute_every, true) + logits
    }
}

impl MoeConfig {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parameters of one MoE layer: the router and E SwiGLU experts.
    pub fn num_params(&self, d_model: usize, d_ff: usize) -> usize {
        d_model * self.n_experts + self.n_experts * 3 * d_model * d_ff
    }

    /// Parameters one token runs through: the router and k experts.
    pub fn active_params(&self, d_model: usize, d_ff: usize) -> usize {
        d_model * self.n_experts + self.experts_per_token * 3 * d_model * d_ff
    }
}
