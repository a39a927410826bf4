//! The training loop, shaped like torchtitan's train.py: setup, then repeat
//! { step += 1; train_step; log; evaluate; checkpoint }, then a final report. What a training
//! mode computes, logs, evaluates and reports is its `Objective` (`crate::objectives`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use burn::prelude::*;
use burn::tensor::FloatDType;
use furnace_configs::{Precision, Recipe, Strategy};
use furnace_core::params::{cast_params, load_named, named_tensors, trainable_params};
use furnace_core::rng::Stream;
use furnace_models::blocks::with_autocast;
use furnace_models::LanguageModel;
use furnace_optim::{Algorithm, DecayGroups, Optimizer, Schedule};

use crate::backend::{backend_failure, BackendJob, TrainBackend};
use crate::bench::matmul_gflops;
use crate::checkpoint::{self, Checkpointer, TrainState};
use crate::context::Context;
use crate::datasets::{self, Datasets};
use crate::memory::{collect_freed_memory, parameter_bytes, peak_rss_mb, reset_peak_rss, retain_freed_memory};
use crate::metrics::Metrics;
use crate::model::{build_model, describe, load_base, with_base};
use crate::objectives::{self, Objective, Setup, Stepped};
use crate::parallel::{held_parameter_bytes, quiet_stdout, transport, Parallel};
use crate::precision::{compute_dtype, LossScaler};
use crate::signals::{self, Stopped};

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
    cx: Context<B>,
    objective: Box<dyn Objective<B>>,
    out: PathBuf,
    schedule: Schedule,
    stop_at: usize,
    peak_flops: f64,
    /// Frozen base parameters held in NF4 (QLoRA), outside the module's parameters.
    nf4_params: usize,
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
            recipe = with_base(recipe, &base)?;
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
        checkpointer.clean_leftovers()?;
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
        let model_config = recipe.model.model(Some(tokenizer.vocab_size()));
        if model_config.vocab_size() < tokenizer.vocab_size() {
            bail!(
                "recipe key model.vocab_size = {} is smaller than the tokenizer's vocabulary ({}); raise it or leave it unset",
                model_config.vocab_size(),
                tokenizer.vocab_size()
            );
        }
        if t.seq_len > model_config.max_seq_len() {
            bail!(
                "recipe key training.seq_len = {} exceeds the model's max_seq_len = {} ({}); lower training.seq_len",
                t.seq_len,
                model_config.max_seq_len(),
                describe(&recipe.model)
            );
        }
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
        // The objective is set up from the starting model (the frozen reference of the
        // preference and rollout objectives), before a resumed run loads its later weights.
        let objective = objectives::build(Setup {
            recipe: &recipe,
            tokenizer: &tokenizer,
            chat_template: chat_template.as_ref(),
            device: &device,
            model: &model,
            reference_pairs,
        })?;
        let mut optimizer = Optimizer::<B>::new(Algorithm::from_recipe(&recipe), DecayGroups::from(&recipe.optimizer), model.param_kinds());
        let shards = if world.size > 1 && recipe.distributed.strategy != Strategy::Ddp { world.size } else { 1 };
        let mut state = TrainState::new(loader.cursor(), world.size, shards);
        let fp16 = recipe.runtime.precision == Precision::Fp16Mixed;
        state.loss_scaler = fp16.then(|| LossScaler::new(recipe.runtime.initial_loss_scale));
        if resume {
            if latest.is_none() {
                bail!("--resume {}: no checkpoint found under {}/checkpoints", out.display(), out.display());
            }
            let dir = checkpointer.newest_verified()?;
            let loaded = checkpoint::load(&dir)?;
            let saved = Recipe::from_checkpoint(&loaded.recipe, &dir.join(checkpoint::RECIPE_FILE).display().to_string())?;
            if saved.model.model(Some(tokenizer.vocab_size())) != model_config {
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
        let (owned, trainable) = parallel.partition(&model, model.param_blocks());
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
        let resumed_at = resume.then_some(state.step);
        let cx = Context {
            recipe,
            device,
            model_config,
            optimizer,
            loader,
            val_loader,
            tokenizer,
            chat_template,
            checkpointer,
            metrics,
            state,
            parallel,
            compute_dtype,
            skipped_at_scale: None,
            resumed_at,
            warned_zero_gradient: false,
        };
        Ok((Self { cx, objective, out, schedule, stop_at, peak_flops, nf4_params }, model))
    }

    fn train(mut self, mut model: LanguageModel<B>) -> Result<()> {
        let t = self.cx.recipe.training.clone();
        self.print_banner(&model);
        if self.cx.state.step == 0 && self.cx.parallel.is_main() {
            self.objective.before_training(&mut self.cx, &model)?;
        }
        // Tokens/s counts training time only: evaluation and checkpoint writes are paused out.
        let mut window = Window::start();
        signals::install();
        let mut stopped_by_signal = false;
        while self.cx.state.step < self.stop_at {
            self.cx.state.step += 1;
            let step = self.cx.state.step;
            let lr = self.schedule.lr(step);
            let Stepped { model: updated, loss, grad_norm, tokens } = with_autocast(self.cx.compute_dtype, || self.train_step(model, lr))?;
            model = updated;
            if let Some(failure) = backend_failure() {
                bail!(
                    "step {step}: the {} backend failed on one of its threads ({failure}); the run stops here (its last checkpoint is intact)",
                    self.cx.recipe.runtime.backend
                );
            }
            if let Some(scale) = self.cx.skipped_at_scale.take() {
                self.cx.metrics.log_skip(step, scale)?;
            }
            // One reduction: the step's tokens, and whether any rank was asked to stop (so
            // every rank stops at the same step).
            let mut reduced = [tokens as f64, signals::stop_requested() as u8 as f64];
            self.cx.parallel.sum(&mut reduced);
            stopped_by_signal = reduced[1] > 0.0;
            let state = &mut self.cx.state;
            state.tokens_seen += reduced[0] as u64;
            state.optimizer_step = self.cx.optimizer.step;
            state.data_cursor = self.cx.loader.cursor();
            window.tokens += reduced[0] as usize;
            window.steps += 1;
            let last = step == self.stop_at || stopped_by_signal;
            if step.is_multiple_of(t.log_every) || last {
                let loss = self.cx.parallel.mean(loss.into_scalar().elem::<f64>());
                if !loss.is_finite() {
                    return Err(self.cx.diverged(format!("the training loss is {loss}")));
                }
                self.log_step(&model, step, loss, lr, grad_norm, &window)?;
                window = Window::start();
            }
            let pause = Instant::now();
            if t.eval_every > 0 && (step.is_multiple_of(t.eval_every) || step == t.steps) {
                let whole = self.cx.whole(&model);
                if self.cx.parallel.is_main() {
                    self.objective.evaluate(&mut self.cx, &whole, step)?;
                }
            }
            if self.cx.checkpointer.should_save(step, last) {
                if let Some(path) = self.save(&model)? {
                    self.cx.metrics.println(format!("step {step:>6} | checkpoint {}", path.display()));
                }
            }
            window.paused += pause.elapsed();
            if stopped_by_signal {
                break;
            }
        }
        self.cx.metrics.finish();
        if stopped_by_signal {
            return Err(Stopped { step: self.cx.state.step, output_dir: self.out.clone() }.into());
        }
        let model = self.cx.whole(&model);
        if !self.cx.parallel.is_main() {
            return Ok(());
        }
        if self.cx.state.step < t.steps {
            println!("stopped at step {} of {}; continue with --resume {}", self.cx.state.step, t.steps, self.out.display());
            return Ok(());
        }
        println!("\n== result after {} steps ({} tokens) ==", self.cx.state.step, self.cx.state.tokens_seen);
        self.objective.report(&mut self.cx, &model)
    }

    /// Seeds, FSDP's gather, then the objective's step. Dropout draws from the backend RNG:
    /// reseeding it from (seed, step) makes every mask a pure function of the step, so a
    /// resumed run draws the same masks.
    fn train_step(&mut self, model: LanguageModel<B>, lr: f64) -> Result<Stepped<B>> {
        B::seed(&self.cx.device, self.cx.rank_seed(Stream::Dropout, self.cx.state.step));
        // FSDP holds the parameters outside the blocks for the whole step (both ends use them).
        let model = match self.cx.parallel.fsdp() {
            true => self.cx.parallel.gather_block(model, None),
            false => model,
        };
        self.objective.step(&mut self.cx, model, lr)
    }

    /// The start-up lines: the model, the memory estimate, LoRA's trainable share.
    fn print_banner(&self, model: &LanguageModel<B>) {
        let cx = &self.cx;
        let tokens_per_step = cx.recipe.tokens_per_step() * cx.parallel.world.size;
        cx.metrics.println(format!(
            "model: {} {}, {:.2}M parameters | {} tokens/step | peak {:.1} GFLOP/s for MFU",
            cx.recipe.model.arch(),
            cx.model_config.summary(),
            cx.model_config.num_params() as f64 / 1e6,
            tokens_per_step,
            self.peak_flops / 1e9
        ));
        cx.metrics.println(self.memory_estimate(model));
        if cx.recipe.lora.r > 0 {
            let (trainable, dense) = trainable_params(model);
            let total = dense + self.nf4_params;
            let l = &cx.recipe.lora;
            cx.metrics.println(format!(
                "LoRA r={} alpha={} on {:?}: trainable params {trainable} || all params {total} || trainable% {:.4}",
                l.r,
                l.alpha,
                l.target_modules,
                100.0 * trainable as f64 / total as f64
            ));
        }
    }

    /// One log line: the loop's metrics, the optimizer's, memory, and the objective's window.
    fn log_step(&mut self, model: &LanguageModel<B>, step: usize, loss: f64, lr: f64, grad_norm: f64, window: &Window) -> Result<()> {
        let tokens_per_sec = window.tokens as f64 / (window.started.elapsed() - window.paused).as_secs_f64();
        let flops_per_token = self.cx.model_config.train_flops_per_token(self.cx.recipe.training.seq_len);
        let mfu = tokens_per_sec * flops_per_token / (self.peak_flops * self.cx.parallel.world.size as f64);
        let mode_metrics = self.objective.window_metrics(&self.cx);
        let cx = &mut self.cx;
        // What a step waited for its batches (the loader reads memory-mapped shards in line).
        let data_wait_ms = cx.loader.take_wait().as_secs_f64() * 1e3 / window.steps.max(1) as f64;
        let mut values = vec![
            ("loss", loss),
            ("lr", lr),
            ("grad_norm", grad_norm),
            ("tokens_per_sec", tokens_per_sec),
            ("mfu", mfu),
            ("tokens", cx.state.tokens_seen as f64),
            ("data_wait_ms", data_wait_ms),
        ];
        values.extend(cx.optimizer.take_metrics());
        values.push(("optimizer_state_mb", cx.optimizer.state_bytes() as f64 / 1e6));
        values.push(("parameter_mb", held_parameter_bytes(model) as f64 / 1e6));
        values.extend(peak_rss_mb().map(|mb| ("peak_rss_mb", mb)));
        values.extend(cx.state.loss_scaler.as_ref().map(|s| ("loss_scale", s.scale)));
        values.extend(mode_metrics.iter().map(|(name, v)| (name.as_str(), *v)));
        // A mixture's realised proportions over the window (this rank's draws).
        let draws = cx.loader.take_source_draws();
        let drawn = draws.iter().map(|(_, n)| n).sum::<u64>().max(1) as f64;
        let fractions: Vec<(String, f64)> =
            draws.iter().map(|(name, n)| (format!("data/source_fraction/{name}"), *n as f64 / drawn)).collect();
        values.extend(fractions.iter().map(|(name, v)| (name.as_str(), *v)));
        cx.metrics.log(step, &values)?;
        let mut line =
            format!("loss {loss:.4} | lr {lr:.2e} | grad_norm {grad_norm:.3} | {tokens_per_sec:.0} tok/s | MFU {:.1}%", mfu * 100.0);
        let shown = self.objective.progress_metrics();
        for (name, value) in mode_metrics.iter().filter(|(name, _)| shown.contains(&name.as_str())) {
            line.push_str(&format!(" | {name} {value:.3}"));
        }
        cx.metrics.advance(step, line.clone());
        if !cx.recipe.logging.progress || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            cx.metrics.println(format!("step {step:>6}/{} | {line}", cx.recipe.training.steps));
        }
        Ok(())
    }

    /// What a step should hold, for the start-up banner: f32 parameters, gradients of the
    /// trainable ones, this rank's optimizer state and the activations of one micro-batch.
    fn memory_estimate(&self, model: &LanguageModel<B>) -> String {
        let (recipe, parallel) = (&self.cx.recipe, &self.cx.parallel);
        let t = &recipe.training;
        let (trainable, all) = trainable_params(model);
        // Under FSDP the model holds only this rank's parameters between steps (placeholders
        // for the rest), so its counts are this rank's share already; every block is recomputed.
        let (owned, held, recompute_every) = match parallel.fsdp() {
            true => (trainable, " held between steps (and one block's more while it runs)", Some(1)),
            false => (trainable / parallel.world.size.max(1), "", recipe.activation_checkpoint.recompute_every()),
        };
        let state_elements = if parallel.strategy == Strategy::Ddp { trainable } else { owned };
        let mb = |bytes: f64| bytes / 1e6;
        let activations = self.cx.model_config.activation_bytes(t.local_batch_size, t.seq_len, recompute_every);
        let activations = format!("~{:.0} MB per micro-batch", mb(activations));
        // bf16-true stores parameters and gradients in two bytes; everything else is f32.
        let width = parameter_bytes(recipe.runtime.precision);
        let stored = if width == 2.0 { "parameters and gradients bf16, the rest f32" } else { "f32" };
        format!(
            "memory estimate ({stored}): parameters {:.1} MB{held}, gradients {:.1} MB, optimizer state {:.1} MB, activations {activations}; measured peak_rss_mb goes to metrics.jsonl",
            mb(width * all as f64),
            mb(width * trainable as f64),
            mb(4.0 * (self.cx.optimizer.algorithm.state_slots() * state_elements) as f64),
        )
    }

    /// Rank 0 writes the checkpoint; under ZeRO every rank first writes its optimizer shard
    /// into the staging folder. Returns the checkpoint's folder on rank 0.
    fn save(&self, model: &LanguageModel<B>) -> Result<Option<PathBuf>> {
        let cx = &self.cx;
        let (world, step) = (cx.parallel.world, cx.state.step);
        let model = &cx.whole(model);
        let optimizer = cx.optimizer.state_tensors();
        let shards = cx.state.optimizer_shards;
        if shards > 1 {
            if world.is_main() {
                cx.checkpointer.stage(step)?;
            }
            cx.parallel.barrier();
            if !world.is_main() {
                cx.checkpointer.write_optimizer_shard(step, world.rank, shards, &optimizer)?;
            }
            cx.parallel.barrier();
        }
        if !world.is_main() {
            return Ok(None);
        }
        let checkpoint =
            cx.checkpointer.save(step, &named_tensors(model), &optimizer, &cx.state, &cx.recipe.to_toml(), &cx.tokenizer.to_json())?;
        Ok(Some(checkpoint))
    }
}

/// Tokens trained on since the last log line, and the time they took (evaluation and
/// checkpoint writes paused out).
struct Window {
    started: Instant,
    paused: Duration,
    tokens: usize,
    steps: usize,
}

impl Window {
    fn start() -> Self {
        Self { started: Instant::now(), paused: Duration::ZERO, tokens: 0, steps: 0 }
    }
}

/// Where a run writes: `--resume DIR` wins over the recipe's run.output_dir.
pub fn output_dir(recipe: &Recipe, resume: Option<&Path>) -> PathBuf {
    resume.map(Path::to_path_buf).unwrap_or_else(|| recipe.output_dir())
}
