//! The training loop, shaped like torchtitan's train.py: setup, then repeat
//! { step += 1; train_step; log; evaluate; checkpoint }, then a final report.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::FloatDType;
use furnace_configs::rng::SeededRng;
use furnace_configs::{Arch, DataSource, Precision, Recipe, Strategy, TrainMode};
use furnace_data::chat::{ChatTemplate, Message};
use furnace_data::corpus::{arithmetic_config, val_seed};
use furnace_data::generators::arithmetic;
use furnace_data::loader::IGNORE;
use furnace_data::{Batch, Loader, TextTokenizer};
use furnace_models::blocks::with_autocast;
use furnace_models::params::{cast_params, load_named, named_tensors, trainable_params};
use furnace_models::{CausalLm, LanguageModel, ModelConfig};
use furnace_optim::{clip_factor, Algorithm, DecayGroups, Optimizer, Schedule};

use crate::backend::{BackendJob, TrainBackend};
use crate::bench::matmul_gflops;
use crate::checkpoint::{self, Checkpointer, TrainState};
use crate::datasets::{self, Datasets};
use crate::evaluate::{
    arithmetic_exact_match, encode_prompt, fill_mask_line, fill_spans_line, greedy, reply, validation, Asked, Validation,
};
use crate::evaluate::{encoder_input, forward_batch, FILL_MASK_PROMPT, FILL_SPAN_PROMPT};
use crate::memory::{collect_freed_memory, peak_rss_mb, reset_peak_rss, retain_freed_memory};
use crate::metrics::Metrics;
use crate::model::{build_model, describe, load_base, load_reward_model, model_config, with_base};
use crate::objective::{grpo_loss, ppo_advantages, ppo_loss, token_log_probs, PpoTargets};
use crate::objective::{lm_loss_sum, router_losses, sample_labels, Denoising, RouterStats};
use crate::parallel::{held_parameter_bytes, in_block, quiet_stdout, transport, Parallel};
use crate::precision::{compute_dtype, LossScaler};
use crate::preference::{self, pair_batch, pair_gradients, reference_log_probs, reward_batch, DpoReference, DpoStats};
use crate::recompute::{recomputed_gradients, recomputed_seq2seq_gradients};
use crate::rollout::{self, rollout, step_prompts, RolloutStats, Sampling};

/// One step's accumulated gradients, its loss, the inputs of its last micro-batch (for
/// Sophia's curvature estimate) and the tokens it trained on.
struct Gradients<B: TrainBackend> {
    grads: GradientsParams,
    /// Already averaged over ranks (the recompute path reduces as backward goes).
    reduced: bool,
    loss: Tensor<B::InnerBackend, 1>,
    last_inputs: Tensor<B, 2, Int>,
    tokens: usize,
}

/// GRPO and PPO: the prompts, the frozen starting model, the reward model, and metrics since the
/// last log line.
struct Rl<B: TrainBackend> {
    prompts: Vec<rollout::Prompt>,
    reference: LanguageModel<B::InnerBackend>,
    /// `training.reward_model`, or None for the verifier.
    reward_model: Option<LanguageModel<B::InnerBackend>>,
    window: RolloutStats,
}

pub struct TrainJob {
    pub recipe: Recipe,
    pub output_dir: PathBuf,
    pub resume: bool,
    pub max_steps: Option<usize>,
}

impl BackendJob for TrainJob {
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<()> {
        let (trainer, model) = Trainer::<B>::setup(self, device)?;
        trainer.train(model)
    }
}

struct Trainer<B: TrainBackend> {
    recipe: Recipe,
    out: PathBuf,
    device: B::Device,
    model_config: ModelConfig,
    optimizer: Optimizer<B>,
    schedule: Schedule,
    loader: Loader,
    val_loader: Loader,
    tokenizer: TextTokenizer,
    /// SFT and DPO: how evaluation prompts are rendered.
    chat_template: Option<ChatTemplate>,
    /// DPO: the reference (precomputed log-probabilities or the frozen starting model).
    reference: Option<DpoReference<B::InnerBackend>>,
    /// DPO: metrics summed since the last log line.
    dpo_window: DpoStats,
    /// Mixture of experts: router metrics summed since the last log line.
    router_window: RouterStats,
    /// GRPO and PPO: what sampling replies needs.
    rl: Option<Rl<B>>,
    /// BERT's masked LM, T5's span corruption: how each text batch is noised.
    denoising: Option<Denoising>,
    checkpointer: Checkpointer,
    metrics: Metrics,
    state: TrainState,
    stop_at: usize,
    peak_flops: f64,
    /// Frozen base parameters held in NF4 (QLoRA), outside the module's parameters.
    nf4_params: usize,
    /// The ranks mpirun started (world size 1 without it).
    parallel: Parallel,
    /// Mixed precision: the dtype of the dense layers' matmuls.
    compute_dtype: Option<FloatDType>,
    /// fp16-mixed: the loss scale after the last step, when that step overflowed and was skipped.
    skipped_at_scale: Option<f64>,
}

impl<B: TrainBackend> Trainer<B> {
    fn setup(job: TrainJob, device: B::Device) -> Result<(Self, LanguageModel<B>)> {
        let TrainJob { mut recipe, output_dir: out, resume, max_steps } = job;
        retain_freed_memory(false);
        let base = if recipe.model.init_from.is_empty() {
            None
        } else {
            println!("loading base weights from {}", recipe.model.init_from);
            let base = load_base(Path::new(&recipe.model.init_from))?;
            recipe = with_base(recipe, &base);
            Some(base)
        };
        let t = &recipe.training;
        let checkpointer = Checkpointer::new(&out, t.save_every, t.keep_last);
        let latest = checkpointer.latest();
        if !resume {
            if let Some(latest) = &latest {
                bail!(
                    "{} already holds checkpoints (newest: {}); continue it with `--resume {}`, or set run.output_dir (or run.name) to start a new run",
                    out.display(),
                    latest.display(),
                    out.display()
                );
            }
        }
        std::fs::create_dir_all(&out).with_context(|| format!("cannot create the output folder {}", out.display()))?;
        let mut parallel = Parallel::new(furnace_distributed::connect(transport(&recipe)).map_err(anyhow::Error::msg)?, &recipe);
        parallel.check_same_recipe(&recipe.to_toml())?;
        let world = parallel.world;
        if world.size > 1 {
            if !world.is_main() {
                quiet_stdout();
            }
            println!("rank 0 of {} ({}); the other ranks print errors only", world.size, recipe.distributed.strategy);
        }
        // One rank per node prepares the data (tokenizer, shards); the others then reuse it.
        if world.local_rank != 0 {
            parallel.barrier();
        }
        let Datasets { tokenizer, train: mut loader, val: val_loader, chat_template, reference_pairs } =
            datasets::load(&recipe, &out, world.rank, world.size)?;
        if world.local_rank == 0 {
            parallel.barrier();
        }
        let resolved = recipe.model.resolve(Some(tokenizer.vocab_size()));
        if resolved.vocab_size < tokenizer.vocab_size() {
            bail!(
                "recipe key model.vocab_size = {} is smaller than the tokenizer's vocabulary ({}); raise it or leave it unset",
                resolved.vocab_size,
                tokenizer.vocab_size()
            );
        }
        if t.seq_len > resolved.max_seq_len {
            bail!(
                "recipe key training.seq_len = {} exceeds the model's max_seq_len = {} ({}); lower training.seq_len",
                t.seq_len,
                resolved.max_seq_len,
                describe(&recipe.model)
            );
        }
        let model_config = model_config(&resolved);
        let denoising = Denoising::for_recipe(&recipe, &tokenizer, !recipe.trains_on_pairs())?;
        let compute_dtype = compute_dtype::<B::InnerBackend>(&recipe, &device)?;
        let built = build_model::<B>(&recipe, tokenizer.vocab_size(), base.as_ref().map(|b| &b.weights), &device)?;
        drop(base);
        let mut model = built.model;
        let nf4_params = built.nf4_bytes.map_or(0, |(_, bf16)| bf16 / 2);
        if let Some((nf4, bf16)) = built.nf4_bytes {
            println!(
                "QLoRA: base linear layers in NF4: {:.2} MB ({:.2} MB in bf16, {:.3}x)",
                nf4 as f64 / 1e6,
                bf16 as f64 / 1e6,
                nf4 as f64 / bf16 as f64
            );
        }
        // DPO's reference is the starting model: its log-probabilities are computed now, before a
        // resumed run loads its later weights.
        let reference = reference_pairs.map(|(mut train_pairs, mut val_pairs)| {
            let valid = model.valid();
            if !recipe.dpo.precompute_ref_log_probs {
                return DpoReference::Model(valid);
            }
            println!("reference log-probabilities of {} + {} pairs from the starting model", train_pairs.items(), val_pairs.items());
            let (n_train, n_val) = (train_pairs.items(), val_pairs.items());
            DpoReference::Precomputed {
                train: reference_log_probs(&valid, &mut train_pairs, n_train, &device),
                val: reference_log_probs(&valid, &mut val_pairs, n_val, &device),
            }
        });
        // GRPO's and PPO's reference is the starting model too, kept whole (their KL terms
        // need every token).
        let rl = match (recipe.training.mode, &chat_template) {
            (TrainMode::Grpo | TrainMode::Ppo, Some(template)) => {
                let reward_model = match recipe.training.reward_model.as_str() {
                    "" => None,
                    path => Some(load_reward_model(Path::new(path), &tokenizer, &device)?),
                };
                let prompts = rollout::prompts(&recipe, template, &tokenizer)?;
                Some(Rl { prompts, reference: model.valid(), reward_model, window: RolloutStats::default() })
            }
            _ => None,
        };
        let mut optimizer = Optimizer::<B>::new(Algorithm::from_recipe(&recipe), DecayGroups::from(&recipe.optimizer));
        let shards = if world.size > 1 && recipe.distributed.strategy != Strategy::Ddp { world.size } else { 1 };
        let mut state = TrainState::new(loader.cursor(), world.size, shards);
        let fp16 = recipe.runtime.precision == Precision::Fp16Mixed;
        state.loss_scaler = fp16.then(|| LossScaler::new(recipe.runtime.initial_loss_scale));
        if resume {
            let dir =
                latest.with_context(|| format!("--resume {}: no checkpoint found under {}/checkpoints", out.display(), out.display()))?;
            let loaded = checkpoint::load(&dir)?;
            let saved = Recipe::from_stored(&loaded.recipe, &dir.join(checkpoint::RECIPE_FILE).display().to_string())?;
            if saved.model.resolve(Some(tokenizer.vocab_size())) != resolved {
                bail!(
                    "the recipe's [model] section differs from the one this checkpoint was trained with ({}); resume with the same model",
                    dir.join(checkpoint::RECIPE_FILE).display()
                );
            }
            model = load_named(model, &loaded.model).map_err(|e| anyhow::anyhow!("checkpoint {}: {e}", dir.display()))?;
            optimizer
                .load_state(loaded.state.optimizer_step, &loaded.optimizer, &device)
                .map_err(|e| anyhow::anyhow!("checkpoint {}: {e}", dir.display()))?;
            let scaler = state.loss_scaler.take();
            state = loaded.state.resharded(world.size, shards);
            state.loss_scaler = if fp16 { state.loss_scaler.or(scaler) } else { None };
            loader.set_cursor(state.data_cursor);
            println!("resumed from {} (step {})", dir.display(), state.step);
        }
        // Ranks start from rank 0's weights; under ZeRO each keeps its own parameters' state.
        model = parallel.broadcast_model(model);
        let (owned, trainable) = parallel.partition(&model);
        optimizer.retain_state(|path| parallel.owns(path));
        model = parallel.release(model, |_| true);
        if recipe.runtime.precision == Precision::Bf16True {
            model = cast_params(model, FloatDType::BF16);
            eprintln!(
                "warning: runtime.precision = \"bf16-true\" stores the parameters and their gradients in bf16 (the optimizer state stays f32): an update below 1/256 of a weight rounds away, so long or low-learning-rate runs lose progress; \"bf16-mixed\" keeps f32 weights"
            );
        }
        if world.size > 1 && owned != trainable {
            println!(
                "{}: this rank updates {owned} of {trainable} trainable parameters ({:.1}%) and holds their optimizer state{}",
                recipe.distributed.strategy,
                100.0 * owned as f64 / trainable as f64,
                match parallel.fsdp() {
                    true => format!(" and, between steps, only their values ({:.1} MB)", held_parameter_bytes(&model) as f64 / 1e6),
                    false => String::new(),
                }
            );
        }
        let stop_at = max_steps.unwrap_or(t.steps).min(t.steps);
        let logging = &recipe.logging;
        let main = world.is_main();
        let metrics =
            Metrics::new(&out, logging.jsonl && main, logging.tensorboard && main, logging.progress && main, t.steps, state.step)?;
        let peak_flops = if recipe.logging.peak_tflops > 0.0 {
            recipe.logging.peak_tflops * 1e12
        } else {
            matmul_gflops::<B::InnerBackend>(1024, &device) * 1e9
        };
        let schedule = Schedule::new(recipe.optimizer.lr, t.steps, &recipe.lr_scheduler);
        // Setup buffers are gone: from here the logged peak_rss_mb is the training steps' own.
        collect_freed_memory();
        retain_freed_memory(true);
        if let (Some(setup_peak), true) = (peak_rss_mb(), reset_peak_rss()) {
            println!("setup peak RSS {setup_peak:.0} MB; peak_rss_mb in metrics.jsonl counts from the first step");
        }
        let trainer = Self {
            recipe,
            out,
            device,
            model_config,
            optimizer,
            schedule,
            loader,
            val_loader,
            tokenizer,
            chat_template,
            reference,
            dpo_window: DpoStats::default(),
            router_window: RouterStats::default(),
            rl,
            denoising,
            checkpointer,
            metrics,
            state,
            stop_at,
            peak_flops,
            nf4_params,
            parallel,
            compute_dtype,
            skipped_at_scale: None,
        };
        Ok((trainer, model))
    }

    fn train(mut self, mut model: LanguageModel<B>) -> Result<()> {
        let t = self.recipe.training.clone();
        let tokens_per_step = self.recipe.tokens_per_step() * self.parallel.world.size;
        let flops_per_token = self.model_config.train_flops_per_token(t.seq_len);
        self.metrics.println(format!(
            "model: {} {}, {:.2}M parameters | {} tokens/step | peak {:.1} GFLOP/s for MFU",
            self.recipe.model.arch,
            self.model_config.summary(),
            self.model_config.num_params() as f64 / 1e6,
            tokens_per_step,
            self.peak_flops / 1e9
        ));
        self.metrics.println(self.memory_estimate(&model));
        if self.recipe.lora.r > 0 {
            let (trainable, dense) = trainable_params(&model);
            let total = dense + self.nf4_params;
            let l = &self.recipe.lora;
            self.metrics.println(format!(
                "LoRA r={} alpha={} on {:?}: trainable params {trainable} || all params {total} || trainable% {:.4}",
                l.r,
                l.alpha,
                l.target_modules,
                100.0 * trainable as f64 / total as f64
            ));
        }
        if self.rl.is_some() && self.state.step == 0 && self.parallel.is_main() {
            // The verifier's mean reward before any step: what the run improves on.
            let when = format!(" before {}", self.recipe.training.mode.to_string().to_uppercase());
            self.held_out_exact_match(&model.valid(), &when)?;
        }
        // Tokens/s counts training time only: evaluation and checkpoint writes are paused out.
        let mut window_start = Instant::now();
        let mut window_paused = Duration::ZERO;
        let mut window_tokens = 0usize;
        while self.state.step < self.stop_at {
            self.state.step += 1;
            let step = self.state.step;
            let lr = self.schedule.lr(step);
            let (updated, loss, grad_norm, tokens) = with_autocast(self.compute_dtype, || self.train_step(model, lr))?;
            if let Some(scale) = self.skipped_at_scale.take() {
                self.metrics.log_skip(step, scale)?;
            }
            let mut tokens = [tokens as f64];
            self.parallel.sum(&mut tokens);
            let tokens = tokens[0] as usize;
            model = updated;
            self.state.tokens_seen += tokens as u64;
            self.state.optimizer_step = self.optimizer.step;
            self.state.data_cursor = self.loader.cursor();
            window_tokens += tokens;
            let last = step == self.stop_at;
            if step % t.log_every == 0 || last {
                let loss = self.parallel.mean(loss.into_scalar().elem::<f64>());
                let seconds = (window_start.elapsed() - window_paused).as_secs_f64();
                let tokens_per_sec = window_tokens as f64 / seconds;
                let mfu = tokens_per_sec * flops_per_token / (self.peak_flops * self.parallel.world.size as f64);
                let sum = |values: &mut [f64]| self.parallel.sum(values);
                let mut mode_metrics = match self.recipe.training.mode {
                    TrainMode::Dpo | TrainMode::Reward => {
                        std::mem::take(&mut self.dpo_window).summed_over_ranks(sum).means("", self.reference.is_some())
                    }
                    _ => Vec::new(),
                };
                mode_metrics.extend(std::mem::take(&mut self.router_window).summed_over_ranks(sum).means());
                if let Some(rl) = &mut self.rl {
                    let window = std::mem::take(&mut rl.window).summed_over_ranks(sum);
                    mode_metrics.extend(window.means().into_iter().map(|(name, v)| (name.to_string(), v)));
                }
                let mut values = vec![
                    ("loss", loss),
                    ("lr", lr),
                    ("grad_norm", grad_norm),
                    ("tokens_per_sec", tokens_per_sec),
                    ("mfu", mfu),
                    ("tokens", self.state.tokens_seen as f64),
                ];
                values.extend(self.optimizer.take_metrics());
                values.push(("optimizer_state_mb", self.optimizer.state_bytes() as f64 / 1e6));
                values.push(("parameter_mb", held_parameter_bytes(&model) as f64 / 1e6));
                values.extend(peak_rss_mb().map(|mb| ("peak_rss_mb", mb)));
                values.extend(self.state.loss_scaler.as_ref().map(|s| ("loss_scale", s.scale)));
                values.extend(mode_metrics.iter().map(|(name, v)| (name.as_str(), *v)));
                self.metrics.log(step, &values)?;
                let mut line = format!(
                    "loss {loss:.4} | lr {lr:.2e} | grad_norm {grad_norm:.3} | {tokens_per_sec:.0} tok/s | MFU {:.1}%",
                    mfu * 100.0
                );
                for (name, value) in mode_metrics.iter().filter(|(name, _)| ["reward", "kl", "moe/aux_loss"].contains(&name.as_str())) {
                    line.push_str(&format!(" | {name} {value:.3}"));
                }
                self.metrics.advance(step, line.clone());
                if self.metrics_plain() {
                    self.metrics.println(format!("step {step:>6}/{} | {line}", t.steps));
                }
                window_start = Instant::now();
                window_paused = Duration::ZERO;
                window_tokens = 0;
            }
            let pause = Instant::now();
            if t.eval_every > 0 && (step % t.eval_every == 0 || step == t.steps) {
                let whole = self.whole(&model);
                if self.parallel.is_main() {
                    self.log_validation(&whole, step)?;
                }
            }
            if self.checkpointer.should_save(step, last) {
                if let Some(path) = self.save(&model)? {
                    self.metrics.println(format!("step {step:>6} | checkpoint {}", path.display()));
                }
            }
            window_paused += pause.elapsed();
        }
        self.metrics.finish();
        let model = self.whole(&model);
        if !self.parallel.is_main() {
            return Ok(());
        }
        if self.state.step < t.steps {
            println!("stopped at step {} of {}; continue with --resume {}", self.state.step, t.steps, self.out.display());
            return Ok(());
        }
        self.report(&model)
    }

    /// What a step should hold, for the start-up banner: f32 parameters, gradients of the
    /// trainable ones, this rank's optimizer state and the activations of one micro-batch.
    fn memory_estimate(&self, model: &LanguageModel<B>) -> String {
        let t = &self.recipe.training;
        let (trainable, all) = trainable_params(model);
        // Under FSDP the model holds only this rank's parameters between steps (placeholders
        // for the rest), so its counts are this rank's share already; every block is recomputed.
        let fsdp = self.parallel.fsdp();
        let (owned, held, recompute_every) = match fsdp {
            true => (trainable, " held between steps (and one block's more while it runs)", Some(1)),
            false => (trainable / self.parallel.world.size.max(1), "", self.recipe.activation_checkpoint.recompute_every()),
        };
        let state_elements = if self.parallel.strategy == Strategy::Ddp { trainable } else { owned };
        let mb = |bytes: f64| bytes / 1e6;
        let activations = self
            .model_config
            .activation_bytes(t.local_batch_size, t.seq_len, recompute_every)
            .map_or("not estimated for this architecture".into(), |b| format!("~{:.0} MB per micro-batch", mb(b)));
        // bf16-true stores parameters and gradients in two bytes; everything else is f32.
        let (stored, width) = match self.recipe.runtime.precision {
            Precision::Bf16True => ("parameters and gradients bf16, the rest f32", 2.0),
            _ => ("f32", 4.0),
        };
        format!(
            "memory estimate ({stored}): parameters {:.1} MB{held}, gradients {:.1} MB, optimizer state {:.1} MB, activations {activations}; measured peak_rss_mb goes to metrics.jsonl",
            mb(width * all as f64),
            mb(width * trainable as f64),
            mb(4.0 * (self.optimizer.algorithm.state_slots() * state_elements) as f64),
        )
    }

    fn metrics_plain(&self) -> bool {
        !self.recipe.logging.progress || !std::io::IsTerminal::is_terminal(&std::io::stderr())
    }

    /// Zero grads, micro-batches, clip, optimizer step. Returns the step's loss (still on the
    /// device), the pre-clip global gradient norm and the tokens trained on.
    fn train_step(&mut self, model: LanguageModel<B>, lr: f64) -> Result<(LanguageModel<B>, Tensor<B::InnerBackend, 1>, f64, usize)> {
        // Dropout draws from the backend RNG: reseeding it from (seed, step) makes every mask a
        // pure function of the step, so a resumed run draws the same masks.
        B::seed(&self.device, self.rank_seed() ^ (self.state.step as u64).wrapping_mul(0x9E37_79B9));
        // FSDP holds the parameters outside the blocks for the whole step (both ends use them).
        let model = match self.parallel.fsdp() {
            true => self.parallel.gather(model, |path| in_block(path, None)),
            false => model,
        };
        let Gradients { grads, reduced, loss, last_inputs, tokens } = match self.recipe.training.mode {
            TrainMode::Ppo => return self.ppo_step(model, lr),
            TrainMode::Grpo => self.grpo_gradients(&model),
            _ => self.batch_gradients(&model),
        };
        let grads = match reduced {
            true => grads,
            false => self.parallel.reduce_gradients(&model, grads),
        };
        let (model, grad_norm) = self.apply_gradients(model, grads, last_inputs, lr)?;
        Ok((model, loss, grad_norm, tokens))
    }

    /// The whole model on every rank: under FSDP gathered from the parameters' owners (a
    /// collective, so every rank calls it), else the model itself.
    fn whole(&self, model: &LanguageModel<B>) -> LanguageModel<B> {
        match self.parallel.fsdp() {
            true => self.parallel.gather(model.clone(), |_| true),
            false => model.clone(),
        }
    }

    /// The factor the loss is multiplied by before backward: fp16-mixed's loss scale, else 1.
    fn loss_scale(&self) -> f64 {
        self.state.loss_scaler.as_ref().map_or(1.0, |s| s.scale)
    }

    /// The run's seed, varied by rank so ranks draw different dropout masks and samples
    /// (rank 0 draws what a single process would).
    fn rank_seed(&self) -> u64 {
        self.recipe.run.seed ^ (self.parallel.world.rank as u64).wrapping_mul(0x6A09_E667_F3BC_C909)
    }

    /// Given gradients averaged over ranks: Sophia's curvature refresh when due, the global
    /// gradient norm, clipping and one optimizer step (of this rank's parameters under ZeRO,
    /// which then go to every rank). Returns the model and the pre-clip norm.
    fn apply_gradients(
        &mut self,
        model: LanguageModel<B>,
        grads: GradientsParams,
        inputs: Tensor<B, 2, Int>,
        lr: f64,
    ) -> Result<(LanguageModel<B>, f64)> {
        if self.optimizer.needs_curvature(self.optimizer.step + 1) {
            let (curvature, batch_tokens) = self.curvature_grads(&model, inputs);
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
                self.skipped_at_scale = Some(scaler.scale);
                return Ok((self.parallel.release(model, |_| true), grad_norm));
            }
        }
        if !grad_norm.is_finite() {
            bail!("step {}: the gradient norm is {grad_norm}; lower optimizer.lr or raise lr_scheduler.warmup_steps", self.state.step);
        }
        let grads = self.parallel.drop_unowned(&model, grads);
        let model = self.optimizer.step(lr, model, grads, clip_factor(grad_norm, self.recipe.training.max_norm) / scale);
        Ok((self.parallel.gather_parameters(model), grad_norm))
    }

    /// Gradients of the step's micro-batches from the loader: next-token loss, or DPO's or the
    /// reward model's loss on preference pairs.
    fn batch_gradients(&mut self, model: &LanguageModel<B>) -> Gradients<B> {
        let t = &self.recipe.training;
        let rank_seed = self.rank_seed();
        let batches: Vec<_> = (0..t.grad_accum_steps)
            .map(|micro| {
                let batch = self.loader.next_batch();
                match &self.denoising {
                    Some(denoising) => {
                        let seed = rank_seed ^ ((self.state.step * t.grad_accum_steps + micro) as u64).wrapping_mul(0xA24B_AED4_963E_E407);
                        denoising.apply(batch, seed)
                    }
                    None => batch,
                }
            })
            .collect();
        // The loss is the mean over the step's counted targets: every position when pretraining,
        // the hidden tokens under masked LM, the targets' tokens of an encoder-decoder, the
        // assistant's tokens under SFT (as TRL averages over completion tokens). Over ranks the
        // count is their mean, so averaging the ranks' gradients gives the global mean.
        let counted = batches.iter().map(Batch::counted_targets).sum::<usize>() as f64;
        // An encoder-decoder's batches vary in length: count the tokens it read.
        let tokens = match batches[0].encoder {
            Some(_) => batches.iter().map(Batch::tokens).sum(),
            None => self.recipe.tokens_per_step(),
        };
        let counted = self.parallel.mean(counted).max(1.0);
        let mut accumulator = GradientsAccumulator::new();
        let mut step_loss: Option<Tensor<B::InnerBackend, 1>> = None;
        let mut last_inputs = None;
        let mut dpo_stats = DpoStats::default();
        // FSDP runs every block through the recompute path, which gathers its parameters.
        let sharded = self.parallel.fsdp().then_some(&self.parallel);
        let recompute_every = match sharded {
            Some(_) => Some(1),
            None => self.recipe.activation_checkpoint.recompute_every(),
        };
        let scale = self.loss_scale();
        let backward = |loss: Tensor<B, 1>| (loss.clone().inner(), GradientsParams::from_grads((loss * scale).backward(), model));
        // Under checkpointing the last micro-batch's parts go to the ranks' reduction as their
        // backward ends (the earlier micro-batches' gradients join them), overlapping the
        // transfer with the rest of backward; FSDP reduces every micro-batch so (to owners).
        let overlap = recompute_every.is_some() && self.parallel.world.size > 1;
        let n_batches = batches.len();
        let mut reduced = sharded.is_some();
        for (micro, batch) in batches.into_iter().enumerate() {
            let shape = [batch.batch, batch.seq_len];
            let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs.clone(), shape), &self.device);
            last_inputs = Some(inputs.clone());
            let preference_gradients =
                (self.reference.is_some() || t.mode == TrainMode::Reward).then(|| {
                    let reference = self.reference.as_ref().map(|r| r.of_batch(&batch, false, &self.device));
                    let (dpo, device) = (&self.recipe.dpo, &self.device);
                    // The mean over the step's pairs.
                    let divisor = (batch.items.len() * t.grad_accum_steps) as f64;
                    let (loss, grads, stats) =
                        pair_gradients(model, &batch, self.recipe.runtime.batch_shards, divisor, scale, |model, part, pairs| {
                            match &reference {
                                Some(reference) => pair_batch(model, part, &reference[pairs], dpo, device),
                                None => reward_batch(model, part, device),
                            }
                        });
                    dpo_stats.add(&stats);
                    (loss, grads)
                });
            let targets = || Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), shape), &self.device);
            let (detached, grads) = match (preference_gradients, recompute_every) {
                (Some(gradients), _) => gradients,
                (None, Some(every)) if batch.encoder.is_some() => {
                    let (LanguageModel::T5(t5), Some(encoder)) = (model, &batch.encoder) else {
                        unreachable!("only T5 reads encoder rows")
                    };
                    let input = encoder_input(&batch, &self.device);
                    let (grads, loss) = recomputed_seq2seq_gradients(t5, input, &encoder.lengths, inputs, every, |logits| {
                        lm_loss_sum(logits, targets()) * (scale / counted)
                    });
                    (loss / scale, grads)
                }
                (None, Some(every)) => {
                    let (model_section, router_window) = (&self.recipe.model, &mut self.router_window);
                    let reduction = match sharded {
                        Some(parallel) => Some(parallel.start_reduction(None)),
                        None if overlap && micro + 1 == n_batches => {
                            reduced = true;
                            let earlier = std::mem::replace(&mut accumulator, GradientsAccumulator::new()).grads();
                            Some(self.parallel.start_reduction(Some(earlier)))
                        }
                        None => None,
                    };
                    let (grads, loss) = recomputed_gradients(
                        model,
                        inputs,
                        batch.positions.as_deref(),
                        every,
                        sharded,
                        reduction,
                        |logits| lm_loss_sum(logits, targets()) * (scale / counted),
                        |routing| {
                            let (losses, weights) = router_losses(routing, model_section, router_window);
                            let share = scale / t.grad_accum_steps as f64;
                            (losses * share, weights.scaled(share))
                        },
                    );
                    (loss / scale, grads)
                }
                (None, None) if batch.encoder.is_some() => {
                    backward(lm_loss_sum(forward_batch(model, &batch, &self.device), targets()) / counted)
                }
                (None, None) => {
                    let (logits, routing) = model.forward_routed(inputs, batch.positions.as_deref());
                    let loss = lm_loss_sum(logits, targets()) / counted;
                    backward(match routing {
                        Some(routing) => {
                            let (router, _) = router_losses(&routing, &self.recipe.model, &mut self.router_window);
                            loss + router / t.grad_accum_steps as f64
                        }
                        None => loss,
                    })
                }
            };
            step_loss = Some(match step_loss.take() {
                Some(total) => total + detached,
                None => detached,
            });
            accumulator.accumulate(model, grads);
        }
        self.dpo_window.add(&dpo_stats);
        Gradients {
            grads: accumulator.grads(),
            reduced,
            loss: step_loss.expect("at least one micro-batch"),
            last_inputs: last_inputs.expect("at least one micro-batch"),
            tokens,
        }
    }

    /// GRPO: per micro-batch, sample replies to its prompts with the current weights, score
    /// them, and take the gradient of GRPO's loss on them.
    fn grpo_gradients(&mut self, model: &LanguageModel<B>) -> Gradients<B> {
        let (rank_seed, scale) = (self.rank_seed(), self.loss_scale());
        let (t, config) = (&self.recipe.training, &self.recipe.grpo);
        let rl = self.rl.as_mut().expect("rollout state in grpo mode");
        let sampling = Sampling {
            replies_per_prompt: config.num_generations,
            max_completion_length: config.max_completion_length,
            temperature: config.temperature,
        };
        let policy = model.valid();
        let mut accumulator = GradientsAccumulator::new();
        let (mut step_loss, mut last_inputs, mut tokens) = (None, None, 0);
        for micro in 0..t.grad_accum_steps {
            let prompts = step_prompts(&rl.prompts, self.state.step, micro, t.grad_accum_steps, t.local_batch_size, self.parallel.world);
            let seed = rank_seed ^ ((self.state.step * t.grad_accum_steps + micro) as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
            let rollout = rollout(&policy, rl.reward_model.as_ref(), &prompts, &sampling, &self.tokenizer, seed, &self.device);
            let reference = rollout.reference_log_probs(&rl.reference, &self.device);
            let (inputs, targets) = rollout.tensors::<B>(&self.device);
            let logps = token_log_probs(model.forward(inputs.clone()), targets);
            let reference = Tensor::from_data(TensorData::new(reference, [rollout.rows, rollout.len]), &self.device);
            let advantages = rollout.group_advantages(config.num_generations, config.scale_rewards, &self.device);
            let (loss, kl) = grpo_loss(logps, reference, rollout.mask(&self.device), advantages, config);
            let loss = loss / t.grad_accum_steps as f64;
            rl.window.add(&rollout, config.num_generations, kl.into_scalar().elem::<f64>());
            tokens += rollout.rows * rollout.len;
            let detached = loss.clone().inner();
            step_loss = Some(match step_loss.take() {
                Some(total) => total + detached,
                None => detached,
            });
            accumulator.accumulate(model, GradientsParams::from_grads((loss * scale).backward(), model));
            last_inputs = Some(inputs);
        }
        Gradients {
            grads: accumulator.grads(),
            reduced: false,
            loss: step_loss.expect("at least one micro-batch"),
            last_inputs: last_inputs.expect("at least one micro-batch"),
            tokens,
        }
    }

    /// PPO: sample one reply per prompt, score it, compute the rollout's log-probabilities,
    /// values, GAE advantages and returns, then take `num_ppo_epochs` optimiser steps on the
    /// clipped losses. Returns the last epoch's loss and gradient norm.
    fn ppo_step(&mut self, mut model: LanguageModel<B>, lr: f64) -> Result<(LanguageModel<B>, Tensor<B::InnerBackend, 1>, f64, usize)> {
        let (t, config) = (self.recipe.training.clone(), self.recipe.ppo.clone());
        let rank_seed = self.rank_seed();
        let rl = self.rl.as_mut().expect("rollout state in ppo mode");
        let device = self.device.clone();
        let sampling =
            Sampling { replies_per_prompt: 1, max_completion_length: config.max_completion_length, temperature: config.temperature };
        let prompts = step_prompts(&rl.prompts, self.state.step, 0, 1, t.local_batch_size, self.parallel.world);
        let seed = rank_seed ^ (self.state.step as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        let policy = model.valid();
        let rollout = rollout(&policy, rl.reward_model.as_ref(), &prompts, &sampling, &self.tokenizer, seed, &device);
        let host = |x: Tensor<B::InnerBackend, 2>| -> Vec<f64> { x.into_data().convert::<f64>().into_vec().expect("f64") };
        let (inputs, targets) = rollout.tensors::<B::InnerBackend>(&device);
        let (logits, values) = policy.logits_and_values(inputs);
        let (old_logps, old_values) = (host(token_log_probs(logits, targets)), host(values));
        let ref_logps: Vec<f64> = rollout.reference_log_probs(&rl.reference, &device).into_iter().map(f64::from).collect();
        let mask: Vec<bool> = rollout.targets.iter().map(|&t| t != IGNORE).collect();
        let (advantages, returns) = ppo_advantages(&old_logps, &ref_logps, &old_values, &rollout.rewards, &mask, rollout.len, &config);
        let kl: f64 = old_logps.iter().zip(&ref_logps).zip(&mask).filter(|(_, &m)| m).map(|((a, b), _)| a - b).sum::<f64>();
        rl.window.add(&rollout, 1, kl / rollout.rows as f64);
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
            let (logits, values) = model.logits_and_values(inputs.clone());
            let (loss, policy_loss, value_loss, clip_fraction) =
                ppo_loss(token_log_probs(logits, labels.clone()), values, &targets, &config);
            let scalar = |x: Tensor<B, 1>| x.into_scalar().elem::<f64>();
            let window = &mut self.rl.as_mut().expect("rollout state in ppo mode").window;
            window.add_ppo_update(scalar(policy_loss), scalar(value_loss), scalar(clip_fraction));
            let detached = loss.clone().inner();
            let grads = GradientsParams::from_grads((loss * self.loss_scale()).backward(), &model);
            let grads = self.parallel.reduce_gradients(&model, grads);
            let (updated, grad_norm) = self.apply_gradients(model, grads, inputs.clone(), lr)?;
            model = updated;
            last = Some((detached, grad_norm));
        }
        let (loss, grad_norm) = last.expect("num_ppo_epochs > 0");
        Ok((model, loss, grad_norm, rollout.rows * rollout.len * config.num_ppo_epochs))
    }

    /// Gauss-Newton-Bartlett (Sophia-G): gradients of the mean loss on labels sampled from the
    /// model's own softmax, on the current parameters. Labels come from the seeded RNG so a
    /// resumed run draws the same ones. Returns the gradients and the batch size in tokens,
    /// the scale of the estimate B·ĝ⊙ĝ (as the Sophia authors' code scales it).
    fn curvature_grads(&self, model: &LanguageModel<B>, inputs: Tensor<B, 2, Int>) -> (GradientsParams, f64) {
        let [batch, seq] = inputs.dims();
        let tokens = (batch * seq) as f64;
        let logits = model.forward(inputs);
        let mut rng = SeededRng::new(self.recipe.run.seed ^ (self.optimizer.step + 1).wrapping_mul(0x2545_F491_4F6C_DD1D));
        let labels = sample_labels(logits.clone().detach(), &mut rng);
        let loss = lm_loss_sum(logits, labels) / tokens;
        (GradientsParams::from_grads(loss.backward(), model), tokens)
    }

    fn validate(&mut self, model: &LanguageModel<B>) -> Validation {
        let (loader, steps, denoising) = (&mut self.val_loader, self.recipe.training.eval_steps, self.denoising.as_ref());
        with_autocast(self.compute_dtype, || validation(&model.valid(), loader, steps, denoising, &self.device))
    }

    /// DPO or the reward model on the first `pairs` validation pairs: loss and TRL's metrics.
    fn evaluate_pairs(&mut self, model: &LanguageModel<B>, pairs: usize) -> Option<DpoStats> {
        let valid = model.valid();
        let (loader, batch, device) = (&mut self.val_loader, self.recipe.training.local_batch_size, &self.device);
        match (&self.reference, self.recipe.training.mode) {
            (Some(reference), _) => Some(preference::evaluate(&valid, loader, reference, pairs, batch, &self.recipe.dpo, device)),
            (None, TrainMode::Reward) => Some(preference::evaluate_rewards(&valid, loader, pairs, batch, device)),
            _ => None,
        }
    }

    fn log_validation(&mut self, model: &LanguageModel<B>, step: usize) -> Result<()> {
        let t = &self.recipe.training;
        if let Some(stats) = self.evaluate_pairs(model, t.eval_steps.max(1) * t.local_batch_size) {
            let loss = stats.loss / stats.pairs.max(1) as f64;
            let means = stats.means("eval/", self.reference.is_some());
            let mut values: Vec<(&str, f64)> = vec![("val_loss", loss)];
            values.extend(means.iter().map(|(name, v)| (name.as_str(), *v)));
            self.metrics.log(step, &values)?;
            let accuracy = stats.accuracies / stats.pairs.max(1) as f64;
            let margin = (stats.chosen_rewards - stats.rejected_rewards) / stats.pairs.max(1) as f64;
            self.metrics.println(format!(
                "step {step:>6} | val_loss {loss:.4} | preference accuracy {:.1}% | reward margin {margin:.3}",
                100.0 * accuracy
            ));
            return Ok(());
        }
        let Validation { loss: val, mlm_accuracy } = self.validate(model);
        let mut values = vec![("val_loss", val), ("val_perplexity", val.exp())];
        values.extend(mlm_accuracy.map(|a| ("val_mlm_accuracy", a)));
        self.metrics.log(step, &values)?;
        let accuracy = mlm_accuracy.map(|a| format!(" | masked-token accuracy {:.1}%", 100.0 * a)).unwrap_or_default();
        self.metrics.println(format!("step {step:>6} | val_loss {val:.4} | val_perplexity {:.2}{accuracy}", val.exp()));
        Ok(())
    }

    /// A question as the model is asked it: raw text after end-of-text (an encoder-decoder's
    /// input: the text then end-of-text), or under SFT, DPO and GRPO a user turn rendered by
    /// the chat template with the assistant's turn opened.
    fn encode_question(&self, text: &str) -> Result<Vec<u32>> {
        Ok(match &self.chat_template {
            Some(template) => {
                let turn = [Message { role: "user".into(), content: text.into() }];
                self.tokenizer.encode(&template.render(&turn, true).map_err(anyhow::Error::msg)?)
            }
            None => encode_prompt(&self.tokenizer, text, self.recipe.model.arch == Arch::T5),
        })
    }

    /// Greedy exact match on the held-out arithmetic problems (the verifier's mean reward),
    /// printed and logged as `eval/exact_match`; `when` labels the line. Returns the first
    /// question, or None when the data is not arithmetic.
    fn held_out_exact_match(&mut self, model: &LanguageModel<B::InnerBackend>, when: &str) -> Result<Option<String>> {
        let (eval, data) = (&self.recipe.eval, &self.recipe.data);
        let arithmetic_data = matches!(
            data.source,
            DataSource::Arithmetic | DataSource::ArithmeticWords | DataSource::ArithmeticChat | DataSource::ArithmeticPreferences
        );
        if !arithmetic_data || eval.arithmetic_problems == 0 {
            return Ok(None);
        }
        let chat = self.chat_template.is_some();
        let problems = arithmetic(&arithmetic_config(data), eval.arithmetic_problems, val_seed(self.recipe.run.seed), true);
        let asked = problems
            .iter()
            .map(|p| {
                let (question, expected) = match data.source {
                    _ if chat => (p.question(0), p.text()),
                    DataSource::ArithmeticWords => (p.words(), p.answer().to_string()),
                    _ => (p.prompt(), p.answer().to_string()),
                };
                Ok(Asked { ids: self.encode_question(&question)?, question, expected })
            })
            .collect::<Result<Vec<_>>>()?;
        let (correct, total, shown) = arithmetic_exact_match(model, &self.tokenizer, &asked, &self.device);
        println!(
            "exact match on {total} held-out problems (never seen in training){when}: {correct}/{total} = {:.1}%",
            100.0 * correct as f64 / total as f64
        );
        let separator = if chat || self.recipe.model.arch == Arch::T5 { " → " } else { "" };
        for (question, answer, ok) in shown {
            println!("  {question}{separator}{answer}  {}", if ok { "✓" } else { "✗" });
        }
        self.metrics.log(self.state.step, &[("eval/exact_match", correct as f64 / total as f64)])?;
        Ok(asked.into_iter().next().map(|a| a.question))
    }

    /// Rank 0 writes the checkpoint; under ZeRO every rank first writes its optimizer shard
    /// into the staging folder. Returns the checkpoint's folder on rank 0.
    fn save(&self, model: &LanguageModel<B>) -> Result<Option<PathBuf>> {
        let (world, step) = (self.parallel.world, self.state.step);
        let model = &self.whole(model);
        let optimizer = self.optimizer.state_tensors();
        let shards = self.state.optimizer_shards;
        if shards > 1 {
            if world.is_main() {
                self.checkpointer.stage(step)?;
            }
            self.parallel.barrier();
            if !world.is_main() {
                self.checkpointer.write_optimizer_shard(step, world.rank, shards, &optimizer)?;
            }
            self.parallel.barrier();
        }
        if !world.is_main() {
            return Ok(None);
        }
        let checkpoint = self.checkpointer.save(
            step,
            &named_tensors(model),
            &optimizer,
            &self.state,
            &self.recipe.to_toml(),
            &self.tokenizer.to_json(),
        )?;
        Ok(Some(checkpoint))
    }

    /// What the finished run measured: validation loss, held-out exact match, a sample.
    fn report(&mut self, model: &LanguageModel<B>) -> Result<()> {
        println!("\n== result after {} steps ({} tokens) ==", self.state.step, self.state.tokens_seen);
        let pairs = match self.recipe.training.mode {
            TrainMode::Dpo | TrainMode::Reward => Some(self.val_loader.items()),
            _ => None,
        };
        match pairs {
            Some(n) => {
                let stats = self.evaluate_pairs(model, n).expect("pairs are evaluated in dpo and reward modes");
                let per_pair = |sum: f64| sum / stats.pairs.max(1) as f64;
                println!(
                    "held-out preference pairs: chosen scored above rejected in {:.1}% (reward margin {:.3}, loss {:.4})",
                    100.0 * per_pair(stats.accuracies),
                    per_pair(stats.chosen_rewards - stats.rejected_rewards),
                    per_pair(stats.loss)
                );
                let means = stats.means("eval/", self.reference.is_some());
                let values: Vec<(&str, f64)> = means.iter().map(|(name, v)| (name.as_str(), *v)).collect();
                self.metrics.log(self.state.step, &values)?;
                if self.recipe.training.mode == TrainMode::Reward {
                    println!("checkpoint: {}", self.checkpointer.latest().map(|p| p.display().to_string()).unwrap_or_default());
                    return Ok(());
                }
            }
            None => {
                let Validation { loss: val, mlm_accuracy } = self.validate(model);
                println!("validation loss {val:.4} (perplexity {:.2})", val.exp());
                if let Some(accuracy) = mlm_accuracy {
                    println!("masked-token accuracy on held-out text: {:.1}%", 100.0 * accuracy);
                }
            }
        }
        let model = model.valid();
        if let LanguageModel::Bert(bert) = &model {
            let prompt = match self.recipe.eval.prompt.as_str() {
                "" => FILL_MASK_PROMPT,
                prompt => prompt,
            };
            match fill_mask_line(bert, &self.tokenizer, prompt, &self.device) {
                Ok(line) => println!("sample (fill-mask): {line}"),
                Err(e) => println!("sample (fill-mask) skipped: {e}"),
            }
            println!("checkpoint: {}", self.checkpointer.latest().map(|p| p.display().to_string()).unwrap_or_default());
            return Ok(());
        }
        if let Some(Denoising::SpanCorruption(_)) = self.denoising {
            let prompt = match self.recipe.eval.prompt.as_str() {
                "" => FILL_SPAN_PROMPT,
                prompt => prompt,
            };
            match fill_spans_line(&model, &self.tokenizer, prompt, self.recipe.eval.max_new_tokens, &self.device) {
                Ok(line) => println!("sample (span filling): {prompt} → {line}"),
                Err(e) => println!("sample (span filling) skipped: {e}"),
            }
            println!("checkpoint: {}", self.checkpointer.latest().map(|p| p.display().to_string()).unwrap_or_default());
            return Ok(());
        }
        let mut prompt = self.recipe.eval.prompt.clone();
        if let Some(first_question) = self.held_out_exact_match(&model, "")? {
            if prompt.is_empty() {
                prompt = first_question;
            }
        }
        let tokenizer = &self.tokenizer;
        let eval = &self.recipe.eval;
        let reply_apart = self.chat_template.is_some() || self.recipe.model.arch == Arch::T5;
        if prompt.is_empty() {
            prompt = "Once upon a time".into();
        }
        let config = greedy(tokenizer, eval.max_new_tokens);
        let out = reply(&model, &self.encode_question(&prompt)?, tokenizer.pad(), &config, &self.device, |_| {});
        println!("sample (greedy): {prompt}{}{}", if reply_apart { " → " } else { "" }, tokenizer.decode(&out));
        println!("checkpoint: {}", self.checkpointer.latest().map(|p| p.display().to_string()).unwrap_or_default());
        Ok(())
    }
}

/// Where a run writes: `--resume DIR` wins over the recipe's run.output_dir.
pub fn output_dir(recipe: &Recipe, resume: Option<&Path>) -> PathBuf {
    resume.map(Path::to_path_buf).unwrap_or_else(|| recipe.output_dir())
}
