//! Language modelling, the architecture's own objective (pretrain and SFT): next-token loss over
//! the counted targets, masked LM for BERT, target-given-input or span corruption for T5, the
//! router's auxiliary losses for a mixture of experts, and block-by-block recompute under
//! activation checkpointing or FSDP.

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use furnace_core::rng::Stream;
use furnace_data::Batch;
use furnace_models::blocks::with_autocast;
use furnace_models::{LanguageModel, MoeConfig};

use super::{Accumulated, Gradients, Objective, Setup};
use crate::backend::TrainBackend;
use crate::context::Context;
use crate::evaluate::{encoder_input, fill_mask_line, fill_spans_line, forward_batch, validation, Validation};
use crate::evaluate::{FILL_MASK_PROMPT, FILL_SPAN_PROMPT};
use crate::metrics::Sums;
use crate::objective::{lm_loss_sum, router_losses, router_means, Denoising};
use crate::recompute::{recomputed_gradients, recomputed_seq2seq_gradients};
use crate::tasks::exact_match_and_sample;

pub struct LanguageModelling {
    /// BERT's masked LM, T5's span corruption: how each text batch is noised.
    denoising: Option<Denoising>,
    /// Mixture of experts: the router losses' weights (a model without experts routes nothing).
    experts: MoeConfig,
    /// Mixture of experts: router metrics summed since the last log line.
    router_window: Sums,
}

impl LanguageModelling {
    pub fn new<B: TrainBackend>(setup: &Setup<'_, B>) -> Result<Self> {
        let denoising = Denoising::for_recipe(setup.recipe, setup.tokenizer, !setup.recipe.trains_on_pairs())?;
        let experts = setup.recipe.model.config().as_decoder().and_then(|c| c.moe.clone()).unwrap_or_default();
        Ok(Self { denoising, experts, router_window: Sums::default() })
    }
}

impl<B: TrainBackend> Objective<B> for LanguageModelling {
    /// The step's micro-batches from the loader. The loss is the mean over the step's counted
    /// targets: every position when pretraining, the hidden tokens under masked LM, the
    /// targets' tokens of an encoder-decoder, the assistant's tokens under SFT (as TRL averages
    /// over completion tokens). Over ranks the count is their mean, so averaging the ranks'
    /// gradients gives the global mean.
    fn gradients(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<Gradients<B>> {
        let batches: Vec<_> = (0..cx.recipe.training.grad_accum_steps)
            .map(|micro| {
                let seed = cx.micro_batch_seed(Stream::Denoising, micro);
                let batch = cx.loader.next_batch();
                match &self.denoising {
                    Some(denoising) => denoising.apply(batch, seed),
                    None => batch,
                }
            })
            .collect();
        let t = &cx.recipe.training;
        let counted = batches.iter().map(Batch::counted_targets).sum::<usize>() as f64;
        // An encoder-decoder's batches vary in length: count the tokens it read.
        let tokens = match batches[0].encoder {
            Some(_) => batches.iter().map(Batch::tokens).sum(),
            None => cx.recipe.tokens_per_step(),
        };
        let counted = cx.parallel.mean(counted).max(1.0);
        let mut accumulated = Accumulated::default();
        // FSDP runs every block through the recompute path, which gathers its parameters.
        let sharded = cx.parallel.fsdp().then_some(&cx.parallel);
        let recompute_every = match sharded {
            Some(_) => Some(1),
            None => cx.recipe.activation_checkpoint.recompute_every(),
        };
        let scale = cx.loss_scale();
        let backward = |loss: Tensor<B, 1>| (loss.clone().inner(), GradientsParams::from_grads((loss * scale).backward(), model));
        // Under checkpointing the last micro-batch's parts go to the ranks' reduction as their
        // backward ends (the earlier micro-batches' gradients join them), overlapping the
        // transfer with the rest of backward; FSDP reduces every micro-batch so (to owners).
        let overlap = recompute_every.is_some() && cx.parallel.world.size > 1;
        let n_batches = batches.len();
        let mut reduced = sharded.is_some();
        for (micro, batch) in batches.into_iter().enumerate() {
            let shape = [batch.batch, batch.seq_len];
            let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs.clone(), shape), &cx.device);
            let targets = || Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), shape), &cx.device);
            let (detached, grads) = match recompute_every {
                Some(every) if batch.encoder.is_some() => {
                    let (LanguageModel::T5(t5), Some(encoder)) = (model, &batch.encoder) else {
                        unreachable!("only T5 reads encoder rows")
                    };
                    let input = encoder_input(&batch, &cx.device);
                    let (grads, loss) = recomputed_seq2seq_gradients(t5, input, &encoder.lengths, inputs.clone(), every, |logits| {
                        lm_loss_sum(logits, targets()) * (scale / counted)
                    });
                    (loss / scale, grads)
                }
                Some(every) => {
                    let (experts, router_window) = (&self.experts, &mut self.router_window);
                    let reduction = match sharded {
                        Some(parallel) => Some(parallel.start_reduction(None)),
                        None if overlap && micro + 1 == n_batches => {
                            reduced = true;
                            Some(cx.parallel.start_reduction(Some(accumulated.take_grads())))
                        }
                        None => None,
                    };
                    let (grads, loss) = recomputed_gradients(
                        model,
                        inputs.clone(),
                        batch.positions.as_deref(),
                        every,
                        sharded,
                        reduction,
                        |logits| lm_loss_sum(logits, targets()) * (scale / counted),
                        |routing| {
                            let (losses, weights) = router_losses(routing, experts, router_window);
                            let share = scale / t.grad_accum_steps as f64;
                            (losses * share, weights.scaled(share))
                        },
                    )?;
                    (loss / scale, grads)
                }
                None if batch.encoder.is_some() => backward(lm_loss_sum(forward_batch(model, &batch, &cx.device)?, targets()) / counted),
                None => {
                    let (logits, routing) = model.forward_routed(inputs.clone(), batch.positions.as_deref())?;
                    let loss = lm_loss_sum(logits, targets()) / counted;
                    backward(match routing {
                        Some(routing) => {
                            let (router, _) = router_losses(&routing, &self.experts, &mut self.router_window);
                            loss + router / t.grad_accum_steps as f64
                        }
                        None => loss,
                    })
                }
            };
            accumulated.add(model, grads, detached, inputs);
        }
        Ok(accumulated.finish(reduced, tokens))
    }

    fn window_metrics(&mut self, cx: &Context<B>) -> Vec<(String, f64)> {
        router_means(&std::mem::take(&mut self.router_window).summed_over_ranks(|values| cx.parallel.sum(values)))
    }

    fn progress_metrics(&self) -> &'static [&'static str] {
        &["moe/aux_loss"]
    }

    fn evaluate(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>, step: usize) -> Result<()> {
        log_validation(cx, model, self.denoising.as_ref(), step)
    }

    fn report(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<()> {
        let Validation { mlm_accuracy, .. } = print_validation(cx, model, self.denoising.as_ref())?;
        if let Some(accuracy) = mlm_accuracy {
            println!("masked-token accuracy on held-out text: {:.1}%", 100.0 * accuracy);
        }
        let model = model.valid();
        let prompt = |default: &'static str| match cx.recipe.eval.prompt.as_str() {
            "" => default.to_string(),
            prompt => prompt.to_string(),
        };
        if let LanguageModel::Bert(bert) = &model {
            match fill_mask_line(bert, &cx.tokenizer, &prompt(FILL_MASK_PROMPT), &cx.device) {
                Ok(line) => println!("sample (fill-mask): {line}"),
                Err(e) => println!("sample (fill-mask) skipped: {e}"),
            }
            cx.print_checkpoint();
            return Ok(());
        }
        if let Some(Denoising::SpanCorruption(_)) = self.denoising {
            let prompt = prompt(FILL_SPAN_PROMPT);
            match fill_spans_line(&model, &cx.tokenizer, &prompt, cx.recipe.eval.max_new_tokens, &cx.device) {
                Ok(line) => println!("sample (span filling): {prompt} → {line}"),
                Err(e) => println!("sample (span filling) skipped: {e}"),
            }
            cx.print_checkpoint();
            return Ok(());
        }
        exact_match_and_sample(cx, &model)
    }
}

/// The report's first line: validation loss and perplexity.
fn print_validation<B: TrainBackend>(cx: &mut Context<B>, model: &LanguageModel<B>, denoising: Option<&Denoising>) -> Result<Validation> {
    let validation = validate(cx, model, denoising)?;
    println!("validation loss {:.4} (perplexity {:.2})", validation.loss, validation.loss.exp());
    Ok(validation)
}

/// The report of a mode that trains a next-token model on text it did not denoise (RL,
/// distillation): validation loss, then held-out exact match and a greedy sample.
pub fn report_next_token<B: TrainBackend>(cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<()> {
    print_validation(cx, model, None)?;
    exact_match_and_sample(cx, &model.valid())
}

/// Validation loss (and masked-token accuracy under masked LM) on the validation set.
fn validate<B: TrainBackend>(cx: &mut Context<B>, model: &LanguageModel<B>, denoising: Option<&Denoising>) -> Result<Validation> {
    let (loader, steps) = (&mut cx.val_loader, cx.recipe.training.eval_steps);
    Ok(with_autocast(cx.compute_dtype, || validation(&model.valid(), loader, steps, denoising, &cx.device))?)
}

/// `validate`, logged as `val_loss`, `val_perplexity` (and `val_mlm_accuracy`) and printed.
pub fn log_validation<B: TrainBackend>(
    cx: &mut Context<B>,
    model: &LanguageModel<B>,
    denoising: Option<&Denoising>,
    step: usize,
) -> Result<()> {
    let Validation { loss: val, mlm_accuracy } = validate(cx, model, denoising)?;
    let mut values = vec![("val_loss", val), ("val_perplexity", val.exp())];
    values.extend(mlm_accuracy.map(|a| ("val_mlm_accuracy", a)));
    cx.metrics.log(step, &values)?;
    let accuracy = mlm_accuracy.map(|a| format!(" | masked-token accuracy {:.1}%", 100.0 * a)).unwrap_or_default();
    cx.metrics.println(format!("step {step:>6} | val_loss {val:.4} | val_perplexity {:.2}{accuracy}", val.exp()));
    Ok(())
}
