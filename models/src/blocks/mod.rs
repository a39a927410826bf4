//! Building blocks shared by every architecture. Each lives here once.

mod attention;
mod linear;
mod mlp;
mod norm;

pub(crate) use attention::bias_value;
pub use attention::{
    alibi_slopes, attention_bias, branched_attention_bias, extend_cache, packed_attention_bias, Attention, AttentionContext, LayerCache,
    LayerKv, Rope,
};
pub use linear::{lm_logits, with_autocast, Linear};
pub use mlp::{FeedForward, MlpKind};
pub use norm::{Norm, NormKind};

/// f32 bytes a pre-norm transformer block keeps for backward over `batch` rows of `queries`
/// positions attending to `keys`: s·b·d·(34 + 5·a·s/d) half-precision bytes (Korthikanti et
/// al., 2022, with `keys` in the score terms), doubled for f32.
pub fn transformer_layer_bytes(batch: usize, queries: usize, keys: usize, d_model: usize, heads: usize) -> f64 {
    let (q, k, b, d, a) = (queries as f64, keys as f64, batch as f64, d_model as f64, heads as f64);
    2.0 * q * b * d * (34.0 + 5.0 * a * k / d)
}

/// Activation bytes of a chain of `n` blocks keeping `per_block` bytes each, when every
/// `recompute_every`-th block keeps only its input (`input` bytes; recomputing one needs no
/// more than the kept blocks have freed). With `last_kept` the last block is never recomputed
/// (its backward follows the forward at once).
pub fn chain_activation_bytes(n: usize, per_block: f64, input: f64, recompute_every: Option<usize>, last_kept: bool) -> f64 {
    let candidates = if last_kept { n.saturating_sub(1) } else { n };
    let recomputed = recompute_every.map_or(0, |every| candidates / every.max(1));
    (n - recomputed) as f64 * per_block + recomputed as f64 * input
}
