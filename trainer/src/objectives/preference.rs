//! Preference pairs: DPO against the frozen starting model (its log-probabilities precomputed
//! or computed per batch) and reward models (Bradley-Terry on the score head). The pair
//! arithmetic lives in `crate::preference`; this file is the mode.

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::prelude::*;
use furnace_models::{LanguageModel, Unsupported};

use super::{Accumulated, Gradients, Objective, Setup};
use crate::backend::TrainBackend;
use crate::context::Context;
use crate::metrics::Sums;
use crate::preference::{self, pair_batch, pair_gradients, pair_means, reference_log_probs, reward_batch, DpoReference};
use crate::preference::{ACCURACIES, CHOSEN, LOSS, PAIRS, REJECTED};
use crate::tasks::exact_match_and_sample;

pub struct Preference<B: TrainBackend> {
    /// DPO: the reference (precomputed log-probabilities or the frozen starting model); a
    /// reward model has none.
    reference: Option<DpoReference<B::InnerBackend>>,
    /// Metrics summed since the last log line.
    window: Sums,
}

impl<B: TrainBackend> Preference<B> {
    /// DPO's reference is the starting model: its log-probabilities are computed now, before a
    /// resumed run loads its later weights. Reference pairs are given in DPO mode only.
    pub fn new(setup: Setup<'_, B>) -> Result<Self, Unsupported> {
        let reference = setup
            .reference_pairs
            .map(|(mut train_pairs, mut val_pairs)| {
                let valid = setup.model.valid();
                if !setup.recipe.dpo.precompute_ref_log_probs {
                    return Ok(DpoReference::Model(valid));
                }
                let (n_train, n_val) = (train_pairs.items(), val_pairs.items());
                println!("reference log-probabilities of {n_train} + {n_val} pairs from the starting model");
                let causal = valid.as_causal()?;
                Ok(DpoReference::Precomputed {
                    train: reference_log_probs(&causal, &mut train_pairs, n_train, setup.device),
                    val: reference_log_probs(&causal, &mut val_pairs, n_val, setup.device),
                })
            })
            .transpose()?;
        Ok(Self { reference, window: Sums::default() })
    }

    /// DPO or the reward model on the first `pairs` validation pairs: loss and TRL's metrics.
    fn evaluate_pairs(&self, cx: &mut Context<B>, model: &LanguageModel<B>, pairs: usize) -> Result<Sums> {
        let valid = model.valid();
        let (loader, batch, device) = (&mut cx.val_loader, cx.recipe.training.local_batch_size, &cx.device);
        Ok(match &self.reference {
            Some(reference) => preference::evaluate(&valid.as_causal()?, loader, reference, pairs, batch, &cx.recipe.dpo, device)?,
            None => preference::evaluate_rewards(&valid, loader, pairs, batch, device)?,
        })
    }

    fn log_means(&self, cx: &mut Context<B>, stats: &Sums, first: Option<(&str, f64)>) -> Result<()> {
        let means = pair_means(stats, "eval/");
        let mut values: Vec<(&str, f64)> = first.into_iter().collect();
        values.extend(means.iter().map(|(name, v)| (name.as_str(), *v)));
        cx.metrics.log(cx.state.step, &values)
    }
}

impl<B: TrainBackend> Objective<B> for Preference<B> {
    fn gradients(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<Gradients<B>> {
        let t = &cx.recipe.training;
        let scale = cx.loss_scale();
        let (mut accumulated, mut step_stats) = (Accumulated::default(), Sums::default());
        for _ in 0..t.grad_accum_steps {
            let batch = cx.loader.next_batch();
            let shape = [batch.batch, batch.seq_len];
            let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs.clone(), shape), &cx.device);
            let reference = self.reference.as_ref().map(|r| r.of_batch(&batch, false, &cx.device)).transpose()?;
            let (dpo, device) = (&cx.recipe.dpo, &cx.device);
            // The mean over the step's pairs.
            let divisor = (batch.items.len() * t.grad_accum_steps) as f64;
            let (loss, grads, stats) =
                pair_gradients(model, &batch, cx.recipe.runtime.batch_shards, divisor, scale, |model, part, pairs| match &reference {
                    Some(reference) => Ok(pair_batch(&model.as_causal()?, part, &reference[pairs], dpo, device)),
                    None => reward_batch(model, part, device),
                })?;
            step_stats.merge(&stats);
            accumulated.add(model, grads, loss, inputs);
        }
        self.window.merge(&step_stats);
        Ok(accumulated.finish(false, cx.recipe.tokens_per_step()))
    }

    fn window_metrics(&mut self, cx: &Context<B>) -> Vec<(String, f64)> {
        let window = std::mem::take(&mut self.window).summed_over_ranks(|values| cx.parallel.sum(values));
        pair_means(&window, "")
    }

    fn evaluate(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>, step: usize) -> Result<()> {
        let t = &cx.recipe.training;
        let stats = self.evaluate_pairs(cx, model, t.eval_steps.max(1) * t.local_batch_size)?;
        let loss = stats.per(LOSS, PAIRS);
        self.log_means(cx, &stats, Some(("val_loss", loss)))?;
        let accuracy = stats.per(ACCURACIES, PAIRS);
        let margin = (stats.get(CHOSEN) - stats.get(REJECTED)) / stats.get(PAIRS).max(1.0);
        cx.metrics.println(format!(
            "step {step:>6} | val_loss {loss:.4} | preference accuracy {:.1}% | reward margin {margin:.3}",
            100.0 * accuracy
        ));
        Ok(())
    }

    /// Every held-out pair; then DPO's policy, a generative model, answers as the others do.
    fn report(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<()> {
        let pairs = cx.val_loader.items();
        let stats = self.evaluate_pairs(cx, model, pairs)?;
        println!(
            "held-out preference pairs: chosen scored above rejected in {:.1}% (reward margin {:.3}, loss {:.4})",
            100.0 * stats.per(ACCURACIES, PAIRS),
            (stats.get(CHOSEN) - stats.get(REJECTED)) / stats.get(PAIRS).max(1.0),
            stats.per(LOSS, PAIRS)
        );
        self.log_means(cx, &stats, None)?;
        match self.reference {
            Some(_) => exact_match_and_sample(cx, &model.valid()),
            None => {
                cx.print_checkpoint();
                Ok(())
            }
        }
    }
}
