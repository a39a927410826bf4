//! What every training mode's step and evaluation use: the recipe, the data, the ranks, the
//! optimizer and the run's state. The loop owns it and lends it to the objective.

use anyhow::Result;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::FloatDType;
use furnace_configs::{Arch, Recipe};
use furnace_core::rng::{derive_seed, SeededRng, Stream};
use furnace_data::chat::{ChatTemplate, Message};
use furnace_data::{Loader, TextTokenizer};
use furnace_models::{LanguageModel, ModelConfig, Unsupported};
use furnace_optim::{clip_factor, Optimizer};

use crate::backend::TrainBackend;
use crate::checkpoint::{Checkpointer, TrainState};
use crate::evaluate::encode_prompt;
use crate::metrics::Metrics;
use crate::objective::{lm_loss_sum, sample_labels};
use crate::parallel::Parallel;

/// Below this loss scale fp16 gradients overflow even at the loss's own size: the run diverges
/// (PyTorch's GradScaler would keep halving towards 0 and skip every step).
const MIN_LOSS_SCALE: f64 = 1.0;

pub struct Context<B: TrainBackend> {
    pub recipe: Recipe,
    pub device: B::Device,
    pub model_config: ModelConfig,
    pub optimizer: Optimizer<B>,
    pub loader: Loader,
    pub val_loader: Loader,
    pub tokenizer: TextTokenizer,
    /// SFT, DPO and the RL modes: how prompts are rendered.
    pub chat_template: Option<ChatTemplate>,
    pub checkpointer: Checkpointer,
    pub metrics: Metrics,
    pub state: TrainState,
    /// The ranks mpirun started (world size 1 without it).
    pub parallel: Parallel,
    /// Mixed precision: the dtype of the dense layers' matmuls.
    pub compute_dtype: Option<FloatDType>,
    /// fp16-mixed: the loss scale after the last step, when that step overflowed and was skipped.
    pub skipped_at_scale: Option<f64>,
    /// The step a resumed run continued from (a non-finite first step then points at the checkpoint).
    pub resumed_at: Option<usize>,
    /// Whether a step with a zero gradient norm has been reported.
    pub warned_zero_gradient: bool,
}

impl<B: TrainBackend> Context<B> {
    /// The whole model on every rank: under FSDP gathered from the parameters' owners (a
    /// collective, so every rank calls it), else the model itself.
    pub fn whole(&self, model: &LanguageModel<B>) -> LanguageModel<B> {
        match self.parallel.fsdp() {
            true => self.parallel.gather(model.clone(), |_| true),
            false => model.clone(),
        }
    }

    /// The factor the loss is multiplied by before backward: fp16-mixed's loss scale, else 1.
    pub fn loss_scale(&self) -> f64 {
        self.state.loss_scaler.as_ref().map_or(1.0, |s| s.scale)
    }

    /// The seed of `stream` at `index` on this rank: the run's seed varied by rank (so ranks
    /// draw different masks and samples; rank 0 draws what a single process would).
    pub fn rank_seed(&self, stream: Stream, index: usize) -> u64 {
        let rank = derive_seed(self.recipe.run.seed, Stream::Rank, self.parallel.world.rank as u64);
        derive_seed(rank, stream, index as u64)
    }

    /// The seed of `stream` for micro-batch `micro` of the current step.
    pub fn micro_batch_seed(&self, stream: Stream, micro: usize) -> u64 {
        self.rank_seed(stream, self.state.step * self.recipe.training.grad_accum_steps + micro)
    }

    /// Given gradients averaged over ranks: Sophia's curvature refresh when due, the global
    /// gradient norm, clipping and one optimizer step (of this rank's parameters under ZeRO,
    /// which then go to every rank). Returns the model and the pre-clip norm.
    pub fn apply_gradients(
        &mut self,
        model: LanguageModel<B>,
        grads: GradientsParams,
        inputs: Tensor<B, 2, Int>,
        lr: f64,
    ) -> Result<(LanguageModel<B>, f64)> {
        if self.optimizer.needs_curvature(self.optimizer.step + 1) {
            let (curvature, batch_tokens) = self.curvature_grads(&model, inputs)?;
            let curvature = self.parallel.drop_unowned(&model, self.parallel.reduce_gradients(&model, curvature));
            let global_tokens = batch_tokens * self.parallel.world.size as f64;
            self.optimizer.update_curvature(&model, &curvature, global_tokens);
        }
        // fp16-mixed: the gradients are of the scaled loss; the norm and the step unscale them.
        let scale = self.loss_scale();
        let grad_norm = self.parallel.grad_norm(&model, &grads) / scale;
        if let Some(scaler) = &mut self.state.loss_scaler {
            // The norm is global, so every rank skips the same steps.
            if !scaler.update(grad_norm.is_finite(), self.recipe.runtime.loss_scale_growth_interval) {
                if scaler.scale < MIN_LOSS_SCALE {
                    let scale = scaler.scale;
                    return Err(self.diverged(format!(
                        "fp16's loss scale fell to {scale} after overflow upon overflow: the gradients overflow even unscaled"
                    )));
                }
                self.skipped_at_scale = Some(scaler.scale);
                return Ok((self.parallel.release(model, |_| true), grad_norm));
            }
        }
        if !grad_norm.is_finite() {
            return Err(self.diverged(format!("the gradient norm is {grad_norm}")));
        }
        if grad_norm == 0.0 && !self.warned_zero_gradient && self.parallel.is_main() {
            self.warned_zero_gradient = true;
            eprintln!(
                "warning: step {}: the gradient norm is 0, so this step learns nothing; after a too-large optimizer.lr the activations saturate this way (or every label of the batch is masked)",
                self.state.step
            );
        }
        let grads = self.parallel.drop_unowned(&model, grads);
        let model = self.optimizer.step(lr, model, grads, clip_factor(grad_norm, self.recipe.training.max_norm) / scale);
        Ok((self.parallel.gather_parameters(model), grad_norm))
    }

    /// The error a run stops with when its numbers stop being finite; on the first step after
    /// a resume the checkpoint is the likelier cause.
    pub fn diverged(&self, what: String) -> anyhow::Error {
        let step = self.state.step;
        let hint = match self.resumed_at {
            Some(resumed) if step == resumed + 1 => format!(
                "this is the first step after resuming from step {resumed}: its checkpoint may be damaged; resume from an older step_<N> (move the newest aside), or lower optimizer.lr"
            ),
            _ => "lower optimizer.lr or raise lr_scheduler.warmup_steps".into(),
        };
        anyhow::anyhow!("step {step}: {what}; the run is diverging and stops here (its last checkpoint is intact): {hint}")
    }

    /// Gauss-Newton-Bartlett (Sophia-G): gradients of the mean loss on labels sampled from the
    /// model's own softmax, on the current parameters. Labels come from the seeded RNG so a
    /// resumed run draws the same ones. Returns the gradients and the batch size in tokens,
    /// the scale of the estimate B·ĝ⊙ĝ (as the Sophia authors' code scales it).
    fn curvature_grads(&self, model: &LanguageModel<B>, inputs: Tensor<B, 2, Int>) -> Result<(GradientsParams, f64), Unsupported> {
        let [batch, seq] = inputs.dims();
        let tokens = (batch * seq) as f64;
        let logits = model.forward(inputs)?;
        let mut rng = SeededRng::new(derive_seed(self.recipe.run.seed, Stream::Curvature, self.optimizer.step + 1));
        let labels = sample_labels(logits.clone().detach(), &mut rng);
        let loss = lm_loss_sum(logits, labels) / tokens;
        Ok((GradientsParams::from_grads(loss.backward(), model), tokens))
    }

    /// A question as the model is asked it: raw text after end-of-text (an encoder-decoder's
    /// input: the text then end-of-text), or under a chat template a user turn rendered with
    /// the assistant's turn opened.
    pub fn encode_question(&self, text: &str) -> Result<Vec<u32>> {
        Ok(match &self.chat_template {
            Some(template) => {
                let turn = [Message::new("user", text)];
                self.tokenizer.encode(&template.render(&turn, &[], true).map_err(anyhow::Error::msg)?)
            }
            None => encode_prompt(&self.tokenizer, text, self.recipe.model.arch() == Arch::T5),
        })
    }

    /// Whether the model's reply prints apart from the question (" → "): under a chat template
    /// and for an encoder-decoder, whose reply does not continue the prompt's text.
    pub fn reply_apart(&self) -> bool {
        self.chat_template.is_some() || self.recipe.model.arch() == Arch::T5
    }

    /// The report's last line: where the newest checkpoint is.
    pub fn print_checkpoint(&self) {
        println!("checkpoint: {}", self.checkpointer.latest().map(|p| p.display().to_string()).unwrap_or_default());
    }
}
