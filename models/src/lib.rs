//! Furnace models. Shared blocks live in `blocks`; each architecture is one file, built
//! (`Init`) from its configuration in `furnace_core::arch`, which the recipe, the checkpoints
//! and the Hugging Face tables share; generation and sampling are written once against
//! `CausalLm`.

pub mod batching;
pub mod beam;
pub mod bert;
pub mod blocks;
pub mod causal_lm;
pub mod decoder;
pub mod generate;
pub mod hf;
pub mod init;
pub mod kernels;
pub mod lora;
pub mod mamba;
pub mod mixtral;
pub mod model;
pub mod nf4;
pub mod paged;
pub mod sampling;
pub mod speculative;
pub mod t5;

pub use batching::{BatchedDecoding, CausalBatch, SequenceCache};
pub use bert::{Bert, BertConfig};
pub use causal_lm::CausalLm;
pub use decoder::{Decoder, DecoderConfig, KvCache, PositionKind};
pub use furnace_core::arch::{Arch, T5Config};
pub use mamba::{Mamba, MambaConfig, MambaState};
pub use mixtral::{MoeConfig, RouterLossWeights, Routing};
pub use model::{BlockContext, Blocks, Causal, DecodeState, Init, LanguageModel, ModelConfig, Unsupported};

#[cfg(test)]
mod tests;
