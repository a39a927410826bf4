//! Furnace optimizers: AdamW with parameter groups, global-norm clipping, LR schedules.

pub mod adamw;
pub mod clip;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig, ParamKind};
pub use clip::{clip_factor, global_grad_norm};
pub use schedule::Schedule;

#[cfg(test)]
mod tests;
