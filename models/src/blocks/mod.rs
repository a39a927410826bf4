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
