//! T5's keys: an encoder-decoder with a relative position bias, pre-norm RMS blocks without
//! biases, cross-attention, and relu (T5) or gated-gelu (T5 v1.1) MLPs.

use serde_json::{Map, Value};

use super::{bounded, default_d_ff, fill_from_preset, parse, positive, probability_and_positive, Arch, KeyError, Preset};
use crate::blocks::MlpKind;
use crate::section;

section! {
    /// A T5 encoder-decoder, as transformers' T5ForConditionalGeneration. Unset keys take the
    /// flavor's sizes.
    T5Config = "model" {
        /// Vocabulary size. 0 (unset): the tokenizer's.
        vocab_size: usize = 0,
        /// Hidden size.
        d_model: usize = 64,
        /// Number of encoder blocks.
        n_layers: usize = 2,
        /// Number of decoder blocks. Unset: n_layers.
        n_decoder_layers: usize = 2,
        /// Number of attention heads.
        n_heads: usize = 4,
        /// Dimensions per attention head (transformers' d_kv; need not be d_model / n_heads).
        /// Unset: d_model / n_heads.
        head_dim: usize = 16,
        /// Longest input or target trained on (relative positions have no table: the model itself
        /// has no limit).
        max_seq_len: usize = 256,
        /// Feed-forward hidden size. Unset: 4·d_model for relu, 8/3·d_model rounded up to 32 for gated-gelu.
        d_ff: usize = 256,
        /// Buckets of the relative position bias.
        relative_attention_num_buckets: usize = 32,
        /// Distance at which the relative position buckets stop growing.
        relative_attention_max_distance: usize = 128,
        /// Epsilon inside the norms.
        norm_eps: f64 = 1e-6,
        /// Feed-forward: relu (T5) or gated-gelu (T5 v1.1, Flan-T5).
        mlp: MlpKind = MlpKind::Relu,
        /// Share the input embedding with the output head, fed hidden states × d_model^-0.5
        /// (T5); otherwise its own matrix on unscaled states (T5 v1.1).
        tie_embeddings: bool = true,
        /// Dropout probability on attention output and MLP output (0 for exact resume).
        dropout: f64 = 0.0,
    }
}

pub(super) fn from_keys(p: &Preset, keys: &Map<String, Value>) -> Result<T5Config, KeyError> {
    let mut c: T5Config = parse(Arch::T5, keys)?;
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
    if !given("n_decoder_layers") {
        c.n_decoder_layers = c.n_layers;
    }
    if !given("head_dim") {
        if c.n_heads > 0 && !c.d_model.is_multiple_of(c.n_heads) {
            return Err(KeyError::new(
                "n_heads",
                format!("d_model = {} is not divisible by n_heads = {}", c.d_model, c.n_heads),
                "pick n_heads dividing d_model, or give model.head_dim",
            ));
        }
        c.head_dim = c.d_model / c.n_heads.max(1);
    }
    if !given("d_ff") {
        c.d_ff = default_d_ff(c.mlp, c.d_model);
    }
    Ok(c)
}

impl T5Config {
    /// A T5 of these sizes, the other keys at their defaults.
    pub fn new(
        vocab_size: usize,
        d_model: usize,
        head_dim: usize,
        d_ff: usize,
        n_heads: usize,
        n_layers: usize,
        n_decoder_layers: usize,
    ) -> Self {
        T5Config { vocab_size, d_model, head_dim, d_ff, n_heads, n_layers, n_decoder_layers, ..Default::default() }
    }

    pub(super) fn check(&self) -> Result<(), KeyError> {
        positive(&[("d_model", self.d_model), ("n_layers", self.n_layers), ("n_heads", self.n_heads), ("d_ff", self.d_ff)])?;
        bounded(&[
            ("d_model", self.d_model, 1 << 16),
            ("n_layers", self.n_layers, 1 << 10),
            ("n_heads", self.n_heads, 1 << 10),
            ("d_ff", self.d_ff, 1 << 18),
            ("max_seq_len", self.max_seq_len, 1 << 20),
            ("vocab_size", self.vocab_size, 1 << 22),
        ])?;
        if !matches!(self.mlp, MlpKind::Relu | MlpKind::GatedGelu) {
            return Err(KeyError::new(
                "mlp",
                "T5's layout is fixed (relative position bias, pre-norm RMS blocks without biases, relu or gated-gelu MLPs, full attention); model.mlp does not fit it",
                "remove model.mlp or set it to relu or gated-gelu",
            ));
        }
        if self.n_decoder_layers == 0
            || self.head_dim == 0
            || self.relative_attention_num_buckets < 2
            || self.relative_attention_max_distance == 0
        {
            return Err(KeyError::new(
                "n_decoder_layers",
                "T5 needs n_decoder_layers, head_dim and relative_attention_max_distance above 0 and at least 2 relative_attention_num_buckets",
                "use T5's: n_decoder_layers = n_layers, relative_attention_num_buckets = 32, relative_attention_max_distance = 128",
            ));
        }
        probability_and_positive(self.dropout, &[("norm_eps", self.norm_eps, "1e-6")])
    }

    pub fn num_params(&self) -> usize {
        let (d, inner, f) = (self.d_model, self.n_heads * self.head_dim, self.d_ff);
        let attention = 4 * d * inner;
        let mlp = f * d * if self.mlp == MlpKind::GatedGelu { 3 } else { 2 };
        let bias_tables = 2 * self.relative_attention_num_buckets * self.n_heads;
        let encoder = self.n_layers * (attention + mlp + 2 * d) + d;
        let decoder = self.n_decoder_layers * (2 * attention + mlp + 3 * d) + d;
        let head = if self.tie_embeddings { 0 } else { self.vocab_size * d };
        self.vocab_size * d + bias_tables + encoder + decoder + head
    }

    /// Training FLOPs per token, for MFU, counting an encoder token and a decoder token as
    /// one pair's average (a pair's input and target are about as long): 6 per multiply-add
    /// of the stack a token goes through (the decoder's with the head), plus attention scores
    /// over `seq_len` keys (cross-attention's included).
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let (d, inner, f) = (self.d_model as f64, (self.n_heads * self.head_dim) as f64, self.d_ff as f64);
        let mlp = f * d * if self.mlp == MlpKind::GatedGelu { 3.0 } else { 2.0 };
        let encoder = self.n_layers as f64 * (4.0 * d * inner + mlp + 2.0 * seq_len as f64 * inner);
        let decoder = self.n_decoder_layers as f64 * (8.0 * d * inner + mlp + 4.0 * seq_len as f64 * inner);
        6.0 * (encoder + decoder + self.vocab_size as f64 * d) / 2.0
    }

    /// f32 bytes of activations one micro-batch keeps for backward, input and target taken
    /// `seq` long (the batch pads both to at most that): each encoder block as a transformer
    /// block, each decoder block as one plus its cross-attention (11·s·b·d + 5·a·s²·b
    /// half-precision bytes, doubled), the encoder's output and the logits. Under checkpointing
    /// as `recomputed_seq2seq_gradients` runs it: every encoder block and every N-th decoder
    /// block but the last keep only their input.
    pub fn activation_bytes(&self, batch: usize, seq: usize, recompute_every: Option<usize>) -> f64 {
        let (s, b, d, a) = (seq as f64, batch as f64, self.d_model as f64, self.n_heads as f64);
        let block = super::transformer_layer_bytes(batch, seq, seq, self.d_model, self.n_heads);
        let cross = 2.0 * s * b * (11.0 * d + 5.0 * a * s);
        let input = 4.0 * s * b * d;
        let logits = 2.0 * 4.0 * s * b * self.vocab_size as f64;
        let encoder = super::chain_activation_bytes(self.n_layers, block, input, recompute_every.map(|_| 1), false);
        let decoder = super::chain_activation_bytes(self.n_decoder_layers, block + cross, input, recompute_every, true);
        encoder + decoder + input + logits
    }
}
