//! Each architecture's model configuration, declared once: the recipe's `[model]` section is
//! deserialised into it (tagged by `arch`), the models are built from it, checkpoints store it
//! and the Hugging Face tables map it to and from `config.json`. One file per family holds its
//! keys with their defaults and documentation, its arch and size defaults, and its checks.

use serde_json::{Map, Value};

use crate::choice;
use crate::schema::{OptionDoc, Section};

mod bert;
mod decoder;
mod mamba;
mod t5;

pub use bert::BertConfig;
pub use decoder::{DecoderConfig, MoeConfig};
pub use mamba::MambaConfig;
pub use t5::T5Config;

choice!(
    /// Model family.
    Arch { Llama = "llama", Gpt2 = "gpt2", Mamba = "mamba", Mixtral = "mixtral", Bert = "bert", T5 = "t5" }
);

choice!(
    /// Named size presets; explicit `[model]` dimensions override them.
    Flavor {
        /// 2 layers, d_model 64: unit tests and smoke runs.
        Tiny = "tiny",
        /// 4 layers, d_model 128: the quickstart model.
        Quickstart = "quickstart",
        /// 4 layers, d_model 256, 4 heads: the benchmark shape (a).
        Small = "small",
        /// GPT-2 small: 12 layers, d_model 768, 12 heads, vocab 50257, context 1024.
        Gpt2_124m = "gpt2-124m",
    }
);

/// The sizes a flavor gives the keys a recipe leaves unset.
pub(crate) struct Preset {
    pub d_model: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub max_seq_len: usize,
    /// 0: the tokenizer's.
    pub vocab_size: usize,
}

impl Flavor {
    pub(crate) fn preset(self) -> Preset {
        let (d_model, n_layers, n_heads, max_seq_len, vocab_size) = match self {
            Flavor::Tiny => (64, 2, 4, 256, 0),
            Flavor::Quickstart => (128, 4, 4, 256, 0),
            Flavor::Small => (256, 4, 4, 1024, 0),
            Flavor::Gpt2_124m => (768, 12, 12, 1024, 50257),
        };
        Preset { d_model, n_layers, n_heads, max_seq_len, vocab_size }
    }
}

/// A `[model]` key that cannot be used: which key, what is wrong, how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyError {
    pub key: String,
    pub message: String,
    pub fix: String,
}

impl KeyError {
    pub fn new(key: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        KeyError { key: key.into(), message: message.into(), fix: fix.into() }
    }
}

/// The model, one configuration per architecture; Llama, GPT-2 and Mixtral share the decoder's
/// (a Mixtral's carries its experts).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Llama(DecoderConfig),
    Gpt2(DecoderConfig),
    Mixtral(DecoderConfig),
    Mamba(MambaConfig),
    /// BERT-style encoders, trained on masked tokens.
    Bert(BertConfig),
    /// T5-style encoder-decoders, trained on (input, target) pairs.
    T5(T5Config),
}

impl ModelConfig {
    /// The model of `arch` that `keys` (a `[model]` table without arch, flavor and init_from)
    /// describe, the keys it leaves unset taken from the architecture and the flavor. A key
    /// the architecture does not have, or a value of the wrong type, is an error naming it.
    pub fn from_keys(arch: Arch, flavor: Flavor, keys: &Map<String, Value>) -> Result<Self, KeyError> {
        let preset = flavor.preset();
        Ok(match arch {
            Arch::Llama | Arch::Gpt2 | Arch::Mixtral => decoder::from_keys(arch, &preset, keys)?,
            Arch::Mamba => ModelConfig::Mamba(mamba::from_keys(&preset, keys)?),
            Arch::Bert => ModelConfig::Bert(bert::from_keys(&preset, keys)?),
            Arch::T5 => ModelConfig::T5(t5::from_keys(&preset, keys)?),
        })
    }

    /// Every key of this model with its value (the inverse of `from_keys`).
    pub fn keys(&self) -> Map<String, Value> {
        match self {
            Self::Llama(c) | Self::Gpt2(c) => table(c),
            Self::Mixtral(c) => table(c).into_iter().chain(table(&c.moe.clone().unwrap_or_default())).collect(),
            Self::Mamba(c) => table(c),
            Self::Bert(c) => table(c),
            Self::T5(c) => table(c),
        }
    }

    /// The keys an architecture's `[model]` section takes, documented.
    pub fn options(arch: Arch) -> Vec<OptionDoc> {
        match arch {
            Arch::Llama | Arch::Gpt2 => DecoderConfig::options(),
            Arch::Mixtral => DecoderConfig::options().into_iter().chain(MoeConfig::options()).collect(),
            Arch::Mamba => MambaConfig::options(),
            Arch::Bert => BertConfig::options(),
            Arch::T5 => T5Config::options(),
        }
    }

    /// Values that parse but cannot build a model, as the first key at fault.
    pub fn check(&self) -> Result<(), KeyError> {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.check(self.arch()),
            Self::Mamba(c) => c.check(),
            Self::Bert(c) => c.check(),
            Self::T5(c) => c.check(),
        }
    }

    pub fn arch(&self) -> Arch {
        match self {
            Self::Llama(_) => Arch::Llama,
            Self::Gpt2(_) => Arch::Gpt2,
            Self::Mixtral(_) => Arch::Mixtral,
            Self::Mamba(_) => Arch::Mamba,
            Self::Bert(_) => Arch::Bert,
            Self::T5(_) => Arch::T5,
        }
    }

    /// The decoder of a Llama, GPT-2 or Mixtral.
    pub fn as_decoder(&self) -> Option<&DecoderConfig> {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => Some(c),
            _ => None,
        }
    }

    /// 0 until the tokenizer is known (`with_vocab_size`).
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.vocab_size,
            Self::Mamba(c) => c.vocab_size,
            Self::Bert(c) => c.vocab_size,
            Self::T5(c) => c.vocab_size,
        }
    }

    pub fn with_vocab_size(mut self, vocab_size: usize) -> Self {
        match &mut self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.vocab_size = vocab_size,
            Self::Mamba(c) => c.vocab_size = vocab_size,
            Self::Bert(c) => c.vocab_size = vocab_size,
            Self::T5(c) => c.vocab_size = vocab_size,
        }
        self
    }

    pub fn d_model(&self) -> usize {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.d_model,
            Self::Mamba(c) => c.d_model,
            Self::Bert(c) => c.d_model,
            Self::T5(c) => c.d_model,
        }
    }

    pub fn n_layers(&self) -> usize {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.n_layers,
            Self::Mamba(c) => c.n_layers,
            Self::Bert(c) => c.n_layers,
            Self::T5(c) => c.n_layers,
        }
    }

    /// The widest layer's output width and what sizes it: the MLP's `model.d_ff`, or Mamba's
    /// input projection (x and the gate).
    pub fn widest_layer(&self) -> (usize, &'static str) {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => (c.d_ff, "model.d_ff"),
            Self::Mamba(c) => (2 * c.d_inner(), "2·model.expand·model.d_model"),
            Self::Bert(c) => (c.d_ff, "model.d_ff"),
            Self::T5(c) => (c.d_ff, "model.d_ff"),
        }
    }

    /// Query heads of each attention layer; None for a model without attention (Mamba).
    pub fn attention_heads(&self) -> Option<usize> {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => Some(c.n_heads),
            Self::Mamba(_) => None,
            Self::Bert(c) => Some(c.n_heads),
            Self::T5(c) => Some(c.n_heads),
        }
    }

    pub fn max_seq_len(&self) -> usize {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.max_seq_len,
            Self::Mamba(c) => c.max_seq_len,
            Self::Bert(c) => c.max_seq_len,
            Self::T5(c) => c.max_seq_len,
        }
    }

    /// Whether positions come from a learned table (which cannot grow past max_seq_len).
    pub fn learned_positions(&self) -> bool {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.position == crate::blocks::PositionKind::Learned,
            Self::Bert(_) => true,
            Self::Mamba(_) | Self::T5(_) => false,
        }
    }

    /// The model trained or generating to `max_seq_len` positions.
    pub fn with_max_seq_len(mut self, max_seq_len: usize) -> Self {
        match &mut self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.max_seq_len = max_seq_len,
            Self::Mamba(c) => c.max_seq_len = max_seq_len,
            Self::Bert(c) => c.max_seq_len = max_seq_len,
            Self::T5(c) => c.max_seq_len = max_seq_len,
        }
        self
    }

    /// A decoder with (or without) a scalar head on its last hidden state: a reward model, or
    /// PPO's value. Other architectures have none.
    pub fn with_score_head(mut self, score_head: bool) -> Self {
        if let Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) = &mut self {
            c.score_head = score_head;
        }
        self
    }

    /// Dropout on attention and MLP outputs (Mamba has none).
    pub fn dropout(&self) -> f64 {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.dropout,
            Self::Mamba(_) => 0.0,
            Self::Bert(c) => c.dropout,
            Self::T5(c) => c.dropout,
        }
    }

    pub fn with_dropout(mut self, dropout: f64) -> Self {
        match &mut self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.dropout = dropout,
            Self::Mamba(_) => {}
            Self::Bert(c) => c.dropout = dropout,
            Self::T5(c) => c.dropout = dropout,
        }
        self
    }

    pub fn tie_embeddings(&self) -> bool {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.tie_embeddings,
            Self::Mamba(c) => c.tie_embeddings,
            Self::Bert(_) => true,
            Self::T5(c) => c.tie_embeddings,
        }
    }

    /// Parameter count, embeddings included.
    pub fn num_params(&self) -> usize {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.num_params(),
            Self::Mamba(c) => c.num_params(),
            Self::Bert(c) => c.num_params(),
            Self::T5(c) => c.num_params(),
        }
    }

    /// Training FLOPs per token at context `seq_len`, for MFU.
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.train_flops_per_token(seq_len),
            Self::Mamba(c) => c.train_flops_per_token(),
            Self::Bert(c) => c.train_flops_per_token(seq_len),
            Self::T5(c) => c.train_flops_per_token(seq_len),
        }
    }

    /// Estimated bytes of activations one micro-batch keeps for backward.
    pub fn activation_bytes(&self, batch: usize, seq: usize, recompute_every: Option<usize>) -> f64 {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => c.activation_bytes(batch, seq, recompute_every),
            // An encoder block keeps what a decoder block of its dimensions keeps.
            Self::Bert(c) => DecoderConfig::new(c.vocab_size, c.d_model, c.n_layers, c.n_heads, c.d_ff, c.max_seq_len).activation_bytes(
                batch,
                seq,
                recompute_every,
            ),
            Self::Mamba(c) => c.activation_bytes(batch, seq, recompute_every),
            Self::T5(c) => c.activation_bytes(batch, seq, recompute_every),
        }
    }

    /// The dimensions that matter for this architecture, for the start-up banner.
    pub fn summary(&self) -> String {
        match self {
            Self::Llama(c) | Self::Gpt2(c) | Self::Mixtral(c) => {
                let experts =
                    c.moe.as_ref().map(|m| format!(", {} experts (top {})", m.n_experts, m.experts_per_token)).unwrap_or_default();
                format!("{} layers, d_model {}, {} heads ({} kv){experts}", c.n_layers, c.d_model, c.n_heads, c.kv_heads())
            }
            Self::Mamba(c) => format!("{} layers, d_model {}, d_inner {}, d_state {}", c.n_layers, c.d_model, c.d_inner(), c.d_state),
            Self::Bert(c) => format!("{} layers, d_model {}, {} heads, d_ff {}", c.n_layers, c.d_model, c.n_heads, c.d_ff),
            Self::T5(c) => format!(
                "{} encoder + {} decoder layers, d_model {}, {} heads × {}, d_ff {} ({})",
                c.n_layers, c.n_decoder_layers, c.d_model, c.n_heads, c.head_dim, c.d_ff, c.mlp
            ),
        }
    }
}

/// f32 bytes a pre-norm transformer block keeps for backward over `batch` rows of `queries`
/// positions attending to `keys`: s·b·d·(34 + 5·a·s/d) half-precision bytes (Korthikanti et
/// al., 2022, with `keys` in the score terms), doubled for f32.
pub(crate) fn transformer_layer_bytes(batch: usize, queries: usize, keys: usize, d_model: usize, heads: usize) -> f64 {
    let (q, k, b, d, a) = (queries as f64, keys as f64, batch as f64, d_model as f64, heads as f64);
    2.0 * q * b * d * (34.0 + 5.0 * a * k / d)
}

/// Activation bytes of a chain of `n` blocks keeping `per_block` bytes each, when every
/// `recompute_every`-th block keeps only its input (`input` bytes; recomputing one needs no
/// more than the kept blocks have freed). With `last_kept` the last block is never recomputed
/// (its backward follows the forward at once).
pub(crate) fn chain_activation_bytes(n: usize, per_block: f64, input: f64, recompute_every: Option<usize>, last_kept: bool) -> f64 {
    let candidates = if last_kept { n.saturating_sub(1) } else { n };
    let recomputed = recompute_every.map_or(0, |every| candidates / every.max(1));
    (n - recomputed) as f64 * per_block + recomputed as f64 * input
}

/// A configuration's keys and values (a struct of plain values always serializes as a table).
fn table<C: serde::Serialize>(config: &C) -> Map<String, Value> {
    match serde_json::to_value(config) {
        Ok(Value::Object(keys)) => keys,
        _ => Map::new(),
    }
}

/// The architectures that have `key`, for an error on a key this one lacks.
fn owners_of(key: &str) -> Vec<String> {
    Arch::ALL.iter().filter(|&&arch| ModelConfig::options(arch).iter().any(|o| o.key == key)).map(|a| a.to_string()).collect()
}

/// `keys` read into `C` (every key one of its options), the first key at fault named.
fn parse<C: Section + serde::de::DeserializeOwned>(arch: Arch, keys: &Map<String, Value>) -> Result<C, KeyError> {
    let options = C::options();
    if let Some(key) = keys.keys().find(|k| !options.iter().any(|o| o.key == k.as_str())) {
        let owners = owners_of(key);
        let whose = if owners.is_empty() { String::new() } else { format!(" (it is a key of {})", owners.join(", ")) };
        return Err(KeyError::new(
            key,
            format!("model.arch = \"{arch}\" has no key `{key}`{whose}"),
            format!("remove model.{key}; `furnace recipe explain` lists each architecture's keys"),
        ));
    }
    serde_json::from_value(Value::Object(keys.clone())).map_err(|e| {
        // Name the key whose value is wrong by reading the keys one at a time.
        let key = keys
            .iter()
            .find(|(k, v)| serde_json::from_value::<C>(Value::Object(Map::from_iter([((*k).clone(), (*v).clone())]))).is_err())
            .map_or(String::new(), |(k, _)| k.clone());
        KeyError::new(&key, e.to_string(), "see `furnace recipe explain` for the key's type and accepted values")
    })
}

/// Each `(key, field, preset value)` the recipe left unset takes the flavor's value.
fn fill_from_preset(keys: &Map<String, Value>, fields: &mut [(&str, &mut usize, usize)]) {
    for (key, field, value) in fields.iter_mut() {
        if !keys.contains_key(*key) {
            **field = *value;
        }
    }
}

/// Positive dimensions, the first zero named.
fn positive(dims: &[(&str, usize)]) -> Result<(), KeyError> {
    match dims.iter().find(|(_, value)| *value == 0) {
        Some((key, _)) => {
            Err(KeyError::new(key, format!("{key} = 0: model dimensions must be positive"), format!("set model.{key} above 0")))
        }
        None => Ok(()),
    }
}

/// Sizes one run can hold: past them a typo (an extra zero or three) would reach an
/// allocation abort instead of this message.
fn bounded(dims: &[(&str, usize, usize)]) -> Result<(), KeyError> {
    match dims.iter().find(|(_, value, limit)| value > limit) {
        Some((key, value, limit)) => Err(KeyError::new(
            key,
            format!("{key} = {value} is beyond what Furnace trains (at most {limit})"),
            format!("lower model.{key}; a typo of a few zeros is the usual cause"),
        )),
        None => Ok(()),
    }
}

/// Dropout a probability below 1, epsilons and bases positive.
fn probability_and_positive(dropout: f64, positive: &[(&str, f64, &str)]) -> Result<(), KeyError> {
    if !(0.0..1.0).contains(&dropout) {
        return Err(KeyError::new("dropout", format!("dropout = {dropout} is outside [0, 1)"), "use a probability such as 0.0 or 0.1"));
    }
    match positive.iter().find(|(_, value, _)| value.is_nan() || *value <= 0.0) {
        Some((key, value, example)) => {
            Err(KeyError::new(key, format!("{key} = {value} must be positive"), format!("use e.g. model.{key} = {example}")))
        }
        None => Ok(()),
    }
}

/// The feed-forward width an MLP kind takes by default: 4·d_model, or 8/3·d_model rounded up
/// to 32 for the gated ones (as many weights in three matrices as in two).
fn default_d_ff(mlp: crate::blocks::MlpKind, d_model: usize) -> usize {
    use crate::blocks::MlpKind;
    match mlp {
        MlpKind::Gelu | MlpKind::GeluExact | MlpKind::Relu => 4 * d_model,
        MlpKind::SwiGlu | MlpKind::GatedGelu => (8 * d_model / 3).div_ceil(32) * 32,
    }
}

#[cfg(test)]
mod tests;
