//! Building blocks shared by every architecture. Each lives here once.

mod attention;
mod linear;
mod mlp;
mod norm;

pub use attention::{alibi_slopes, attention_bias, extend_cache, packed_attention_bias, Attention, AttentionContext, LayerKv, Rope};
pub use linear::{lm_logits, with_autocast, Linear};
pub use mlp::{FeedForward, MlpKind};
pub use norm::{Norm, NormKind};
