//! Furnace data: tokenizers, generated corpora, token shards, and the packed, shuffled,
//! rank-split, resumable loader.

pub mod chat;
pub mod corpus;
pub mod generators;
pub mod inputs;
pub mod loader;
pub mod mlm;
mod parquet;
pub mod seq2seq;
pub mod shards;
pub mod span_corruption;
pub mod tokenizer;

pub use loader::{Batch, Cursor, Loader};
pub use shards::{Shard, Tokens};
pub use tokenizer::{Detokenizer, TextTokenizer};
