//! Training modes behind one trait, as Burn's `TrainStep` and torchtitan's loss components keep
//! them: what a mode computes each step, the metrics it adds to the log line, how it evaluates
//! and what its finished run reports. The loop in `train.rs` calls these and names no mode.
//!
//! To add a mode: write one file here implementing [`Objective`] and add its arm to [`build`].

mod distillation;
mod language;
mod preference;
mod rollouts;

use anyhow::Result;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use furnace_configs::{Recipe, TrainMode};
use furnace_data::chat::ChatTemplate;
use furnace_data::{Loader, TextTokenizer};
use furnace_models::LanguageModel;

use crate::backend::TrainBackend;
use crate::context::Context;

/// One step's accumulated gradients, its loss, the inputs of its last micro-batch (for
/// Sophia's curvature estimate) and the tokens it trained on.
pub struct Gradients<B: TrainBackend> {
    pub grads: GradientsParams,
    /// Already averaged over ranks (the recompute path reduces as backward goes).
    pub reduced: bool,
    pub loss: Tensor<B::InnerBackend, 1>,
    pub last_inputs: Tensor<B, 2, Int>,
    pub tokens: usize,
}

/// A step's micro-batches as they are added: their gradients, summed loss and last inputs.
pub struct Accumulated<B: TrainBackend> {
    grads: GradientsAccumulator<LanguageModel<B>>,
    loss: Option<Tensor<B::InnerBackend, 1>>,
    last_inputs: Option<Tensor<B, 2, Int>>,
}

impl<B: TrainBackend> Default for Accumulated<B> {
    fn default() -> Self {
        Self { grads: GradientsAccumulator::new(), loss: None, last_inputs: None }
    }
}

impl<B: TrainBackend> Accumulated<B> {
    /// One micro-batch: its gradients, its loss (detached) and its inputs.
    pub fn add(&mut self, model: &LanguageModel<B>, grads: GradientsParams, loss: Tensor<B::InnerBackend, 1>, inputs: Tensor<B, 2, Int>) {
        self.grads.accumulate(model, grads);
        self.loss = Some(match self.loss.take() {
            Some(total) => total + loss,
            None => loss,
        });
        self.last_inputs = Some(inputs);
    }

    /// The gradients added so far, leaving none (the losses stay).
    pub fn take_grads(&mut self) -> GradientsParams {
        std::mem::replace(&mut self.grads, GradientsAccumulator::new()).grads()
    }

    pub fn finish(mut self, reduced: bool, tokens: usize) -> Gradients<B> {
        Gradients {
            grads: self.take_grads(),
            reduced,
            loss: self.loss.expect("at least one micro-batch"),
            last_inputs: self.last_inputs.expect("at least one micro-batch"),
            tokens,
        }
    }
}

/// What one optimisation step left: the updated model, its loss (still on the device), the
/// pre-clip global gradient norm and the tokens trained on (this rank's).
pub struct Stepped<B: TrainBackend> {
    pub model: LanguageModel<B>,
    pub loss: Tensor<B::InnerBackend, 1>,
    pub grad_norm: f64,
    pub tokens: usize,
}

/// A training mode.
pub trait Objective<B: TrainBackend> {
    /// The step's gradients on this rank (micro-batches accumulated).
    fn gradients(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<Gradients<B>>;

    /// One optimisation step: the gradients averaged over ranks, then clipped and applied. A
    /// mode with its own optimisation (PPO's epochs) overrides it.
    fn step(&mut self, cx: &mut Context<B>, model: LanguageModel<B>, lr: f64) -> Result<Stepped<B>> {
        let gradients = self.gradients(cx, &model)?;
        apply(cx, model, gradients, lr)
    }

    /// The mode's metrics since the last log line, summed over ranks (every rank calls it),
    /// as means under the names they are logged with.
    fn window_metrics(&mut self, cx: &Context<B>) -> Vec<(String, f64)>;

    /// Which of `window_metrics` the progress line shows.
    fn progress_metrics(&self) -> &'static [&'static str] {
        &[]
    }

    /// Before the first step of a new run (rank 0): a baseline to improve on.
    fn before_training(&mut self, _cx: &mut Context<B>, _model: &LanguageModel<B>) -> Result<()> {
        Ok(())
    }

    /// Validation every `training.eval_every` steps (rank 0, on the whole model): logged and printed.
    fn evaluate(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>, step: usize) -> Result<()>;

    /// What the finished run measured (rank 0, on the whole model).
    fn report(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<()>;
}

/// The step's gradients averaged over ranks (unless already), then clipped and applied.
pub fn apply<B: TrainBackend>(cx: &mut Context<B>, model: LanguageModel<B>, gradients: Gradients<B>, lr: f64) -> Result<Stepped<B>> {
    let Gradients { grads, reduced, loss, last_inputs, tokens } = gradients;
    let grads = match reduced {
        true => grads,
        false => cx.parallel.reduce_gradients(&model, grads),
    };
    let (model, grad_norm) = cx.apply_gradients(model, grads, last_inputs, lr)?;
    Ok(Stepped { model, loss, grad_norm, tokens })
}

/// What a mode is set up from, before a resumed run loads its later weights.
pub struct Setup<'a, B: TrainBackend> {
    pub recipe: &'a Recipe,
    pub tokenizer: &'a TextTokenizer,
    pub chat_template: Option<&'a ChatTemplate>,
    pub device: &'a B::Device,
    /// The starting model: the frozen reference of DPO, GRPO and PPO.
    pub model: &'a LanguageModel<B>,
    /// DPO's pairs (train, validation) for its reference log-probabilities.
    pub reference_pairs: Option<(Loader, Loader)>,
}

/// The objective of `recipe.training.mode`.
pub fn build<B: TrainBackend>(setup: Setup<'_, B>) -> Result<Box<dyn Objective<B>>> {
    Ok(match setup.recipe.training.mode {
        TrainMode::Pretrain | TrainMode::Sft if !setup.recipe.training.teacher.is_empty() => {
            Box::new(distillation::Distillation::new(&setup)?)
        }
        TrainMode::Pretrain | TrainMode::Sft => Box::new(language::LanguageModelling::new(&setup)?),
        TrainMode::Dpo | TrainMode::Reward => Box::new(preference::Preference::new(setup)?),
        TrainMode::Grpo | TrainMode::Ppo => Box::new(rollouts::Rollouts::new(&setup)?),
    })
}
