//! Furnace optimizers: AdamW, Lion and Sophia over parameter groups, global-norm clipping,
//! LR schedules.

pub mod algorithm;
pub mod clip;
pub mod fused;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod fused_cube;
pub mod groups;
pub mod optimizer;
pub mod schedule;

pub use algorithm::Algorithm;
pub use clip::{clip_factor, global_grad_norm};
pub use fused::FusedUpdate;
pub use groups::DecayGroups;
pub use optimizer::Optimizer;
pub use schedule::Schedule;

#[cfg(test)]
mod tests;
