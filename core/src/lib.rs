//! The bottom of the crate graph, depended on by every other Furnace crate and depending on
//! none: parameters read and written by module path (checkpoints, the optimizer and the
//! Hugging Face tables all key on these paths), the seeded RNG with the one rule that derives
//! every stream's seed, and crash-safe file writes.

pub mod arch;
pub mod blocks;
pub mod fsutil;
pub mod params;
pub mod rng;
pub mod schema;

#[doc(hidden)]
pub use paste;
