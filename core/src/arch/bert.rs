//! BERT's keys: an encoder whose layout is fixed (learned positions, post-norm LayerNorm
//! blocks, exact GELU, biases, the tied masked-LM head, full attention).

use serde_json::{Map, Value};

use super::{bounded, default_d_ff, fill_from_preset, parse, positive, probability_and_positive, Arch, KeyError, Preset};
use crate::blocks::MlpKind;
use crate::section;

section! {
    /// A BERT encoder, trained with the masked-LM objective (the tokenizer then needs a
    /// `[MASK]` token). Unset keys take the flavor's sizes.
    BertConfig = "model" {
        /// Vocabulary size. 0 (unset): the tokenizer's.
        vocab_size: usize = 0,
        /// Hidden size.
        d_model: usize = 64,
        /// Number of encoder blocks.
        n_layers: usize = 2,
        /// Number of attention heads.
        n_heads: usize = 4,
        /// Feed-forward hidden size. Unset: 4·d_model.
        d_ff: usize = 256,
        /// Longest sequence the model accepts (size of the learned position table).
        max_seq_len: usize = 256,
        /// Segments (sentence A/B); every token here is type 0, the table is kept for Hugging Face.
        type_vocab_size: usize = 2,
        /// Epsilon inside the norms.
        norm_eps: f64 = 1e-12,
        /// Dropout probability on attention output and MLP output (0 for exact resume).
        dropout: f64 = 0.0,
        init_std: f64 = 0.02; internal,
    }
}

pub(super) fn from_keys(p: &Preset, keys: &Map<String, Value>) -> Result<BertConfig, KeyError> {
    let mut c: BertConfig = parse(Arch::Bert, keys)?;
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
    if !given("d_ff") {
        c.d_ff = default_d_ff(MlpKind::GeluExact, c.d_model);
    }
    Ok(c)
}

impl BertConfig {
    /// A BERT of these sizes, the other keys at their defaults.
    pub fn new(vocab_size: usize, d_model: usize, n_layers: usize, n_heads: usize, d_ff: usize, max_seq_len: usize) -> Self {
        BertConfig { vocab_size, d_model, n_layers, n_heads, d_ff, max_seq_len, ..Default::default() }
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
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(KeyError::new(
                "n_heads",
                format!("d_model = {} is not divisible by n_heads = {}", self.d_model, self.n_heads),
                "pick n_heads dividing d_model",
            ));
        }
        probability_and_positive(self.dropout, &[("norm_eps", self.norm_eps, "1e-12")])
    }

    /// Parameter count, embeddings included.
    pub fn num_params(&self) -> usize {
        let (d, f) = (self.d_model, self.d_ff);
        let norm = 2 * d;
        let block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * norm;
        let embeddings = (self.vocab_size + self.max_seq_len + self.type_vocab_size) * d + norm;
        let head = d * d + d + norm + self.vocab_size;
        embeddings + self.n_layers * block + head
    }

    /// Training FLOPs per token at context `seq_len`: 6N for the parameters a token runs
    /// through (the tied output matmul included) plus attention's 12·L·d·T, as for decoders.
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let tables = (self.max_seq_len + self.type_vocab_size) * self.d_model;
        let n = (self.num_params() - tables) as f64;
        6.0 * n + 12.0 * (self.n_layers * self.d_model * seq_len) as f64
    }
}
