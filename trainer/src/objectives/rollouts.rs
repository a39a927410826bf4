//! Reinforcement learning on sampled replies: GRPO (a group of replies per prompt, advantages
//! within the group) and PPO (one reply per prompt, a value head, GAE, several clipped epochs
//! per rollout). Sampling, scoring and TRL's metrics live in `crate::rollout`, the losses in
//! `crate::objective`.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use furnace_configs::TrainMode;
use furnace_core::rng::Stream;
use furnace_data::loader::IGNORE;
use furnace_models::LanguageModel;

use super::language::{log_validation, report_next_token};
use super::{apply, Accumulated, Gradients, Objective, Setup, Stepped};
use crate::backend::TrainBackend;
use crate::context::Context;
use crate::metrics::Sums;
use crate::model::load_reward_model;
use crate::objective::{grpo_loss, ppo_advantages, ppo_loss, token_log_probs, PpoTargets};
use crate::rollout::{self, add_ppo_update, add_rollout, rollout, rollout_means, step_prompts, Sampling};
use crate::tasks::held_out_exact_match;

pub struct Rollouts<B: TrainBackend> {
    mode: TrainMode,
    prompts: Vec<rollout::Prompt>,
    /// The frozen starting model, kept whole (the KL terms need every token).
    reference: LanguageModel<B::InnerBackend>,
    /// `training.reward_model`, or None for the verifier.
    reward_model: Option<LanguageModel<B::InnerBackend>>,
    /// Metrics summed since the last log line.
    window: Sums,
}

impl<B: TrainBackend> Rollouts<B> {
    pub fn new(setup: &Setup<'_, B>) -> Result<Self> {
        let template = setup.chat_template.context("grpo and ppo render their prompts with a chat template; none was loaded")?;
        let reward_model = match setup.recipe.training.reward_model.as_str() {
            "" => None,
            path => Some(load_reward_model(Path::new(path), setup.tokenizer, setup.device)?),
        };
        let prompts = rollout::prompts(setup.recipe, template, setup.tokenizer)?;
        let unanswered = prompts.iter().filter(|p| p.expected.is_none()).count();
        if reward_model.is_none() && unanswered > 0 {
            bail!(
                "data.files: {unanswered} of {} conversations end without an assistant turn, which the verifier compares replies with; end each with its answer, or set training.reward_model",
                prompts.len()
            );
        }
        let reference = setup.model.valid();
        Ok(Self { mode: setup.recipe.training.mode, prompts, reference, reward_model, window: Sums::default() })
    }

    /// PPO: sample one reply per prompt, score it, compute the rollout's log-probabilities,
    /// values, GAE advantages and returns, then take `num_ppo_epochs` optimiser steps on the
    /// clipped losses. Returns the last epoch's loss and gradient norm.
    fn ppo_step(&mut self, cx: &mut Context<B>, mut model: LanguageModel<B>, lr: f64) -> Result<Stepped<B>> {
        let (t, config) = (cx.recipe.training.clone(), cx.recipe.ppo.clone());
        let device = cx.device.clone();
        let sampling =
            Sampling { replies_per_prompt: 1, max_completion_length: config.max_completion_length, temperature: config.temperature };
        let prompts = step_prompts(&self.prompts, cx.state.step, 0, 1, t.local_batch_size, cx.parallel.world);
        let seed = cx.rank_seed(Stream::Rollout, cx.state.step);
        let policy = model.valid();
        let rollout = rollout(&policy, self.reward_model.as_ref(), &prompts, &sampling, &cx.tokenizer, seed, &device)?;
        let host = |x: Tensor<B::InnerBackend, 2>| -> Vec<f64> { x.into_data().convert::<f64>().into_vec().expect("f64") };
        let (inputs, targets) = rollout.tensors::<B::InnerBackend>(&device);
        let (logits, values) = policy.as_decoder()?.logits_and_values(inputs);
        let (old_logps, old_values) = (host(token_log_probs(logits, targets)), host(values));
        let ref_logps: Vec<f64> = rollout.reference_log_probs(&self.reference, &device)?.into_iter().map(f64::from).collect();
        let mask: Vec<bool> = rollout.targets.iter().map(|&t| t != IGNORE).collect();
        let (advantages, returns) = ppo_advantages(&old_logps, &ref_logps, &old_values, &rollout.rewards, &mask, rollout.len, &config);
        let kl: f64 = old_logps.iter().zip(&ref_logps).zip(&mask).filter(|(_, &m)| m).map(|((a, b), _)| a - b).sum::<f64>();
        add_rollout(&mut self.window, &rollout, 1, kl / rollout.rows as f64);
        let shape = [rollout.rows, rollout.len];
        let tensor =
            |v: &[f64]| Tensor::<B, 2>::from_data(TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), shape), &device);
        let targets = PpoTargets {
            old_logps: tensor(&old_logps),
            old_values: tensor(&old_values),
            advantages: tensor(&advantages),
            returns: tensor(&returns),
            mask: rollout.mask(&device),
        };
        let (inputs, labels) = rollout.tensors::<B>(&device);
        let mut last = None;
        for _ in 0..config.num_ppo_epochs {
            let (logits, values) = model.as_decoder()?.logits_and_values(inputs.clone());
            let (loss, policy_loss, value_loss, clip_fraction) =
                ppo_loss(token_log_probs(logits, labels.clone()), values, &targets, &config);
            let scalar = |x: Tensor<B, 1>| x.into_scalar().elem::<f64>();
            add_ppo_update(&mut self.window, scalar(policy_loss), scalar(value_loss), scalar(clip_fraction));
            let detached = loss.clone().inner();
            let grads = GradientsParams::from_grads((loss * cx.loss_scale()).backward(), &model);
            let gradients = Gradients { grads, reduced: false, loss: detached, last_inputs: inputs.clone(), tokens: 0 };
            let stepped = apply(cx, model, gradients, lr)?;
            model = stepped.model;
            last = Some((stepped.loss, stepped.grad_norm));
        }
        let (loss, grad_norm) = last.expect("num_ppo_epochs > 0");
        Ok(Stepped { model, loss, grad_norm, tokens: rollout.rows * rollout.len * config.num_ppo_epochs })
    }
}

impl<B: TrainBackend> Objective<B> for Rollouts<B> {
    /// GRPO: per micro-batch, sample replies to its prompts with the current weights, score
    /// them, and take the gradient of GRPO's loss on them.
    fn gradients(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<Gradients<B>> {
        let scale = cx.loss_scale();
        let (t, config) = (&cx.recipe.training, &cx.recipe.grpo);
        let sampling = Sampling {
            replies_per_prompt: config.num_generations,
            max_completion_length: config.max_completion_length,
            temperature: config.temperature,
        };
        let policy = model.valid();
        let (mut accumulated, mut tokens) = (Accumulated::default(), 0);
        for micro in 0..t.grad_accum_steps {
            let prompts = step_prompts(&self.prompts, cx.state.step, micro, t.grad_accum_steps, t.local_batch_size, cx.parallel.world);
            let seed = cx.micro_batch_seed(Stream::Rollout, micro);
            let rollout = rollout(&policy, self.reward_model.as_ref(), &prompts, &sampling, &cx.tokenizer, seed, &cx.device)?;
            let reference = rollout.reference_log_probs(&self.reference, &cx.device)?;
            let (inputs, targets) = rollout.tensors::<B>(&cx.device);
            let logps = token_log_probs(model.forward(inputs.clone())?, targets);
            let reference = Tensor::from_data(TensorData::new(reference, [rollout.rows, rollout.len]), &cx.device);
            let advantages = rollout.group_advantages(config.num_generations, config.scale_rewards, &cx.device);
            let (loss, kl) = grpo_loss(logps, reference, rollout.mask(&cx.device), advantages, config);
            let loss = loss / t.grad_accum_steps as f64;
            add_rollout(&mut self.window, &rollout, config.num_generations, kl.into_scalar().elem::<f64>());
            tokens += rollout.rows * rollout.len;
            let detached = loss.clone().inner();
            accumulated.add(model, GradientsParams::from_grads((loss * scale).backward(), model), detached, inputs);
        }
        Ok(accumulated.finish(false, tokens))
    }

    fn step(&mut self, cx: &mut Context<B>, model: LanguageModel<B>, lr: f64) -> Result<Stepped<B>> {
        match self.mode {
            TrainMode::Ppo => self.ppo_step(cx, model, lr),
            _ => {
                let gradients = self.gradients(cx, &model)?;
                apply(cx, model, gradients, lr)
            }
        }
    }

    fn window_metrics(&mut self, cx: &Context<B>) -> Vec<(String, f64)> {
        let window = std::mem::take(&mut self.window).summed_over_ranks(|values| cx.parallel.sum(values));
        rollout_means(&window)
    }

    fn progress_metrics(&self) -> &'static [&'static str] {
        &["reward", "kl"]
    }

    /// The verifier's mean reward before any step: what the run improves on.
    fn before_training(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<()> {
        let when = format!(" before {}", self.mode.to_string().to_uppercase());
        held_out_exact_match(cx, &model.valid(), &when).map(drop)
    }

    fn evaluate(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>, step: usize) -> Result<()> {
        log_validation(cx, model, None, step)
    }

    fn report(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<()> {
        report_next_token(cx, model)
    }
}
