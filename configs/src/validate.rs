//! Checks on values that parse but cannot work, each reported with the line, key and fix: one
//! function per concern, run in order, the first failure reported.

use std::path::Path;

use crate::capabilities::{capabilities, Capabilities, CAPABILITIES};
use crate::error::line_of_key;
use crate::*;

pub(crate) fn validate(recipe: &Recipe, file: &str, text: &str, check_files: bool) -> Result<(), RecipeError> {
    let check = Check {
        recipe,
        file,
        text,
        check_files,
        m: recipe.model.config(),
        checkpointing: recipe.activation_checkpoint.mode != CheckpointMode::None,
    };
    for section in [
        finite,
        bounded,
        model,
        supported,
        activation_checkpoint,
        runtime,
        distributed,
        training,
        optimizer,
        lr_scheduler,
        data,
        post_training,
        init_from,
        lora,
    ] {
        section(&check)?;
    }
    Ok(())
}

/// A recipe being checked, and what several checks read.
struct Check<'a> {
    recipe: &'a Recipe,
    file: &'a str,
    text: &'a str,
    /// Whether named files must exist (not for a recipe stored in a checkpoint).
    check_files: bool,
    m: &'a ModelConfig,
    checkpointing: bool,
}

impl Check<'_> {
    fn fail(&self, section: &str, key: &str, message: String, fix: String) -> Result<(), RecipeError> {
        Err(RecipeError {
            file: self.file.into(),
            line: line_of_key(self.text, section, key),
            key: format!("{section}.{key}"),
            message,
            fix,
        })
    }
}

/// Every number of the recipe finite: a NaN or an infinity would pass every range check below
/// (each comparison is false) and surface steps later as a non-finite loss.
fn finite(c: &Check<'_>) -> Result<(), RecipeError> {
    let table = toml::Table::try_from(c.recipe).expect("a recipe always serializes");
    for (section, keys) in table.iter().filter_map(|(s, v)| Some((s, v.as_table()?))) {
        for (key, value) in keys {
            if let Some(x) = value.as_float().filter(|x| !x.is_finite()) {
                return c.fail(section, key, format!("{key} = {x} is not a finite number"), format!("give {section}.{key} a finite value"));
            }
        }
    }
    Ok(())
}

/// Upper bounds on what sizes one run can hold: past them a typo (an extra zero or three)
/// would reach an allocation abort instead of this message. The memory estimate of the whole
/// model is checked against the machine by the trainer (it needs the model's parameter count).
fn bounded(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    for (section, key, value, limit) in [
        ("data", "tokenizer_vocab_size", recipe.data.tokenizer_vocab_size, 1 << 22),
        ("runtime", "threads", recipe.runtime.threads, 1 << 10),
        ("lora", "r", recipe.lora.r, 1 << 14),
    ] {
        if value > limit {
            return c.fail(
                section,
                key,
                format!("{key} = {value} is beyond what Furnace trains (at most {limit})"),
                format!("lower {section}.{key}; a typo of a few zeros is the usual cause"),
            );
        }
    }
    Ok(())
}

/// The model's keys (each architecture's checks, `ModelConfig::check`) and what its data needs.
fn model(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let arch = recipe.model.arch();
    if let Some(problem) = recipe.model.problem() {
        return c.fail("model", &problem.key, problem.message.clone(), problem.fix.clone());
    }
    if let Err(problem) = c.m.check() {
        return c.fail("model", &problem.key, problem.message, problem.fix);
    }
    if arch != Arch::T5 && matches!(recipe.data.source, DataSource::Seq2seq | DataSource::ArithmeticWords) {
        return c.fail(
            "data",
            "source",
            format!("data.source = \"{}\" holds (input, target) pairs for an encoder-decoder; this model is {}", recipe.data.source, arch),
            "set model.arch = \"t5\", or pick a text source (arithmetic, stories, files)".into(),
        );
    }
    if arch == Arch::T5 && !recipe.trains_on_pairs() {
        let t = &recipe.training;
        if !(t.mlm_probability > 0.0 && t.mlm_probability < 1.0 && t.mean_noise_span_length >= 1.0) {
            return c.fail(
                "training",
                "mean_noise_span_length",
                format!(
                    "span corruption needs mlm_probability (the noise density) in (0, 1) and mean_noise_span_length ≥ 1; got {} and {}",
                    t.mlm_probability, t.mean_noise_span_length
                ),
                "use T5's: mlm_probability = 0.15, mean_noise_span_length = 3.0".into(),
            );
        }
        let spans = ((t.seq_len as f64 * t.mlm_probability).round() / t.mean_noise_span_length).round();
        if spans > SENTINELS as f64 {
            return c.fail(
                "training",
                "seq_len",
                format!("span corruption of {} tokens makes {spans} spans, more than T5's {SENTINELS} sentinels", t.seq_len),
                "lower training.seq_len or raise training.mean_noise_span_length".into(),
            );
        }
    }
    if arch == Arch::Bert && !(recipe.training.mlm_probability > 0.0 && recipe.training.mlm_probability < 1.0) {
        return c.fail(
            "training",
            "mlm_probability",
            format!("mlm_probability = {} is outside (0, 1)", recipe.training.mlm_probability),
            "use BERT's 0.15".into(),
        );
    }
    Ok(())
}

/// What the architecture's row of the capability table lacks.
fn supported(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let m = &c.m;
    let caps = capabilities(m.arch());
    let checkpointing = c.checkpointing;
    let mode = recipe.training.mode;
    let asked: [(bool, &str, &str, String, &dyn Fn(&Capabilities) -> bool); 7] = [
        (true, "training", "mode", format!("training.mode = \"{mode}\""), &|c| c.modes.contains(&mode)),
        (recipe.lora.r > 0, "lora", "r", "LoRA".into(), &|c| c.lora),
        (checkpointing, "activation_checkpoint", "mode", "activation checkpointing".into(), &|c| c.checkpointing),
        (recipe.distributed.strategy == Strategy::Fsdp, "distributed", "strategy", "fsdp".into(), &|c| c.fsdp),
        (recipe.optimizer.name == OptimizerName::Sophia, "optimizer", "name", "Sophia".into(), &|c| c.sophia),
        (recipe.data.packing, "data", "packing", "packing".into(), &|c| c.packing),
        (!recipe.training.teacher.is_empty(), "training", "teacher", "distillation".into(), &|c| c.distillation),
    ];
    for (wanted, section, key, feature, has) in asked {
        if wanted && !has(caps) {
            let archs: Vec<String> = CAPABILITIES.iter().filter(|c| has(c)).map(|c| c.arch.to_string()).collect();
            return c.fail(
                section,
                key,
                format!("model.arch = \"{}\" ({}) does not support {feature}", m.arch(), caps.what),
                format!("{feature} is available for {}; change model.arch or {section}.{key}", archs.join(", ")),
            );
        }
    }
    Ok(())
}

/// Which blocks recompute, and what recompute covers.
fn activation_checkpoint(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let m = &c.m;
    let checkpointing = c.checkpointing;
    if recipe.activation_checkpoint.mode == CheckpointMode::Selective
        && !matches!(recipe.activation_checkpoint.selective_ac_option.trim().parse::<usize>(), Ok(n) if n >= 1)
    {
        return c.fail(
            "activation_checkpoint",
            "selective_ac_option",
            format!(
                "selective_ac_option = {:?} is not a positive block count (op-level selective checkpointing is not offered)",
                recipe.activation_checkpoint.selective_ac_option
            ),
            "give a count such as \"2\" (recompute every second block)".into(),
        );
    }
    if checkpointing && m.dropout() > 0.0 {
        return c.fail(
            "activation_checkpoint",
            "mode",
            "activation checkpointing recomputes blocks and does not yet replay dropout masks".into(),
            "set model.dropout = 0 (as LLM pretraining usually does) or activation_checkpoint.mode = \"none\"".into(),
        );
    }
    if checkpointing && !matches!(recipe.training.mode, TrainMode::Pretrain | TrainMode::Sft) {
        return c.fail(
            "activation_checkpoint",
            "mode",
            format!(
                "activation checkpointing covers pretrain and sft (every architecture); this is {} in {}",
                m.arch(),
                recipe.training.mode
            ),
            "set activation_checkpoint.mode = \"none\"".into(),
        );
    }
    Ok(())
}

/// Precision, loss scaling and batch shards.
fn runtime(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    if recipe.runtime.precision == Precision::Bf16True
        && (!matches!(recipe.training.mode, TrainMode::Pretrain | TrainMode::Sft) || recipe.lora.r > 0)
    {
        return c.fail(
            "runtime",
            "precision",
            format!(
                "bf16-true covers pretrain and sft (every architecture and distributed strategy) without LoRA; this is {}{}",
                recipe.training.mode,
                if recipe.lora.r > 0 { " with LoRA" } else { "" }
            ),
            "use runtime.precision = \"bf16-mixed\"".into(),
        );
    }
    let r = &recipe.runtime;
    if !(r.initial_loss_scale >= 1.0 && r.initial_loss_scale.is_finite()) || r.loss_scale_growth_interval == 0 {
        return c.fail(
            "runtime",
            if r.loss_scale_growth_interval == 0 { "loss_scale_growth_interval" } else { "initial_loss_scale" },
            format!(
                "initial_loss_scale = {} must be finite and at least 1, loss_scale_growth_interval = {} at least 1",
                r.initial_loss_scale, r.loss_scale_growth_interval
            ),
            "use GradScaler's defaults: initial_loss_scale = 65536.0, loss_scale_growth_interval = 2000".into(),
        );
    }
    let pairs = matches!(recipe.training.mode, TrainMode::Reward | TrainMode::Dpo);
    if r.batch_shards == 0 || (r.batch_shards > 1 && (!pairs || r.backend != Backend::Flex)) {
        return c.fail(
            "runtime",
            "batch_shards",
            format!(
                "batch_shards = {} on the {} backend in {} mode: shards are 1 or more, and more than 1 only split preference pairs (reward and dpo) on the flex CPU backend",
                r.batch_shards, r.backend, recipe.training.mode
            ),
            "set runtime.batch_shards = 1 (or remove it)".into(),
        );
    }
    Ok(())
}

/// Gradient buckets, and what FSDP covers.
fn distributed(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let m = &c.m;
    if !(recipe.distributed.bucket_mb > 0.0 && recipe.distributed.bucket_mb.is_finite()) {
        return c.fail(
            "distributed",
            "bucket_mb",
            format!("bucket_mb = {} must be a positive number of megabytes", recipe.distributed.bucket_mb),
            "use PyTorch's default 25, or any size above 0".into(),
        );
    }
    let fsdp = recipe.distributed.strategy == Strategy::Fsdp;
    if fsdp
        && (!matches!(recipe.training.mode, TrainMode::Pretrain | TrainMode::Sft)
            || m.dropout() > 0.0
            || recipe.lora.r > 0
            || recipe.optimizer.name == OptimizerName::Sophia)
    {
        return c.fail(
            "distributed",
            "strategy",
            format!(
                "fsdp recomputes every block in backward: decoder-only transformers (llama, gpt2, mixtral) and mamba, in pretrain and sft, without dropout, LoRA or Sophia (its curvature pass needs the whole model); this is {} in {}",
                m.arch(), recipe.training.mode
            ),
            "use distributed.strategy = \"zero2\" (its memory saving short of the parameters) or remove what fsdp does not cover".into(),
        );
    }
    Ok(())
}

/// Step shape and clipping; the reward model and the teacher.
fn training(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let m = &c.m;
    let check_files = c.check_files;
    let checkpointing = c.checkpointing;
    let t = &recipe.training;
    for (key, value) in [
        ("local_batch_size", t.local_batch_size),
        ("seq_len", t.seq_len),
        ("grad_accum_steps", t.grad_accum_steps),
        ("steps", t.steps),
        ("log_every", t.log_every),
    ] {
        if value == 0 {
            return c.fail("training", key, format!("{key} must be at least 1"), format!("set training.{key} to a positive integer"));
        }
    }
    // With init_from the model comes from the base; the trainer checks seq_len against it.
    if t.seq_len > m.max_seq_len() && recipe.model.init_from.is_empty() {
        return c.fail(
            "training",
            "seq_len",
            format!("seq_len = {} exceeds the model's max_seq_len = {}", t.seq_len, m.max_seq_len()),
            "lower training.seq_len or raise model.max_seq_len".into(),
        );
    }
    if t.max_norm < 0.0 || !t.max_norm.is_finite() {
        return c.fail(
            "training",
            "max_norm",
            format!("max_norm = {} must be finite and >= 0", t.max_norm),
            "use 1.0, or 0 to disable clipping".into(),
        );
    }
    let reward_model = &recipe.training.reward_model;
    if check_files && !reward_model.is_empty() && !Path::new(reward_model).is_dir() {
        return c.fail(
            "training",
            "reward_model",
            format!("reward_model = `{reward_model}` is not a folder"),
            "point it at a run trained with training.mode = \"reward\", or leave it empty for the verifier".into(),
        );
    }
    let t = &recipe.training;
    if !t.teacher.is_empty() {
        if !matches!(t.mode, TrainMode::Pretrain | TrainMode::Sft) {
            return c.fail(
                "training",
                "teacher",
                format!("distillation trains in pretrain or sft; this is {}", t.mode),
                "remove training.teacher, or set training.mode = \"pretrain\" or \"sft\"".into(),
            );
        }
        if checkpointing || recipe.distributed.strategy == Strategy::Fsdp {
            return c.fail(
                "training",
                "teacher",
                "distillation runs whole forward passes: no activation checkpointing or fsdp".into(),
                "set activation_checkpoint.mode = \"none\" and a distributed.strategy other than fsdp".into(),
            );
        }
        if check_files && !Path::new(&t.teacher).exists() {
            return c.fail(
                "training",
                "teacher",
                format!("teacher = `{}` does not exist", t.teacher),
                "point it at a Furnace run or checkpoint folder, a Hugging Face model folder or a GGUF file".into(),
            );
        }
    }
    if !(0.0..=1.0).contains(&t.kd_ratio) || !(t.kd_temperature > 0.0 && t.kd_temperature.is_finite()) {
        return c.fail(
            "training",
            if (0.0..=1.0).contains(&t.kd_ratio) { "kd_temperature" } else { "kd_ratio" },
            format!("kd_ratio = {} must be in [0, 1] and kd_temperature = {} positive", t.kd_ratio, t.kd_temperature),
            "use e.g. kd_ratio = 0.5, kd_temperature = 1.0".into(),
        );
    }
    Ok(())
}

/// The optimizer's hyper-parameters.
fn optimizer(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let o = &recipe.optimizer;
    if !(o.lr > 0.0 && o.lr.is_finite()) {
        return c.fail("optimizer", "lr", format!("lr = {} must be positive and finite", o.lr), "use e.g. lr = 3e-4".into());
    }
    for (key, value) in [("beta1", o.beta1), ("beta2", o.beta2)] {
        if let Some(value) = value.filter(|v| !(0.0..1.0).contains(v)) {
            return c.fail(
                "optimizer",
                key,
                format!("{key} = {value} is outside [0, 1)"),
                "use e.g. beta1 = 0.9, beta2 = 0.95, or leave unset for the optimizer's default".into(),
            );
        }
    }
    if o.eps.is_some_and(|e| e < 0.0 || !e.is_finite()) {
        return c.fail("optimizer", "eps", "eps must be finite and >= 0".into(), "use e.g. eps = 1e-8, or leave unset".into());
    }
    if o.weight_decay < 0.0 || !o.weight_decay.is_finite() {
        return c.fail(
            "optimizer",
            "weight_decay",
            format!("weight_decay = {} must be finite and >= 0", o.weight_decay),
            "use e.g. weight_decay = 0.1".into(),
        );
    }
    if !(o.rho > 0.0 && o.rho.is_finite()) {
        return c.fail("optimizer", "rho", format!("rho = {} must be positive", o.rho), "use e.g. rho = 0.01 (Sophia's γ)".into());
    }
    if o.hessian_interval == 0 {
        return c.fail(
            "optimizer",
            "hessian_interval",
            "hessian_interval must be at least 1".into(),
            "use e.g. hessian_interval = 10".into(),
        );
    }
    Ok(())
}

/// The schedule's ratios.
fn lr_scheduler(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let s = &recipe.lr_scheduler;
    if !(0.0..=1.0).contains(&s.min_lr_ratio) {
        return c.fail(
            "lr_scheduler",
            "min_lr_ratio",
            format!("min_lr_ratio = {} is outside [0, 1]", s.min_lr_ratio),
            "use e.g. 0.1".into(),
        );
    }
    if !(s.decay_ratio > 0.0 && s.decay_ratio <= 1.0) {
        return c.fail("lr_scheduler", "decay_ratio", format!("decay_ratio = {} is outside (0, 1]", s.decay_ratio), "use e.g. 0.2".into());
    }
    Ok(())
}

/// A weighted mixture: for text files, instead of data.files, with named, weighted sources.
fn mixture(c: &Check<'_>) -> Result<(), RecipeError> {
    let d = &c.recipe.data;
    if d.source != DataSource::Files {
        return c.fail(
            "data",
            "sources",
            format!("data.sources mixes text files, but data.source = \"{}\"", d.source),
            "set data.source = \"files\", or remove the [[data.sources]] entries".into(),
        );
    }
    if !d.files.is_empty() {
        return c.fail(
            "data",
            "files",
            "both data.files and [[data.sources]] are given".into(),
            "list the files in a [[data.sources]] entry of their own (with its weight)".into(),
        );
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, s) in d.sources.iter().enumerate() {
        let valid_name = !s.name.is_empty() && s.name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-');
        if !valid_name || !names.insert(s.name.as_str()) {
            return c.fail(
                "data",
                "sources",
                format!("data.sources[{i}].name = {:?} is empty, repeated or not made of letters, digits, '_' and '-'", s.name),
                "give each source a distinct name such as \"web\" or \"code\"".into(),
            );
        }
        if !(s.weight.is_finite() && s.weight > 0.0) {
            return c.fail(
                "data",
                "sources",
                format!("data.sources \"{}\": weight = {} must be positive", s.name, s.weight),
                "use e.g. weight = 0.3 (weights are normalised to probabilities)".into(),
            );
        }
        if s.files.is_empty() {
            return c.fail(
                "data",
                "sources",
                format!("data.sources \"{}\" lists no files", s.name),
                "give it files = [\"corpus/*.jsonl\"]".into(),
            );
        }
    }
    Ok(())
}

/// Files, the tokenizer, the generated tasks' settings and packing.
fn data(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let m = &c.m;
    let check_files = c.check_files;
    let d = &recipe.data;
    if !d.sources.is_empty() {
        mixture(c)?;
    }
    let mixed = d.source == DataSource::Files && !d.sources.is_empty();
    if matches!(d.source, DataSource::Files | DataSource::Chat | DataSource::Preferences | DataSource::Seq2seq)
        && d.files.is_empty()
        && !mixed
    {
        return c.fail(
            "data",
            "files",
            "source = \"files\" but no files are listed".into(),
            "list text or JSONL files: files = [\"corpus.txt\"]".into(),
        );
    }
    if !matches!(d.source, DataSource::Files | DataSource::Chat | DataSource::Preferences | DataSource::Seq2seq) {
        for (key, value) in [("num_examples", d.num_examples), ("num_val_examples", d.num_val_examples)] {
            if value == 0 {
                return c.fail(
                    "data",
                    key,
                    format!("{key} = 0: source = \"{}\" generates no examples for this split", d.source),
                    format!("set data.{key} to at least 1"),
                );
            }
        }
    }
    let all_files = || d.files.iter().chain(&d.val_files).chain(d.sources.iter().flat_map(|s| &s.files));
    if d.tokenizer.is_empty() && all_files().any(|f| f.to_ascii_lowercase().ends_with(".bin")) {
        return c.fail(
            "data",
            "tokenizer",
            "data.files holds token files (.bin) but no tokenizer is given".into(),
            "set data.tokenizer to the tokenizer.json that wrote them (GPT-2's for llm.c's and nanoGPT's files)".into(),
        );
    }
    let listed = d.files.iter().map(|f| ("files", f)).chain(d.val_files.iter().map(|f| ("val_files", f)));
    let in_sources = d.sources.iter().flat_map(|s| s.files.iter().map(|f| ("sources", f)));
    for (key, f) in listed.chain(in_sources).filter(|_| check_files) {
        let pattern = f.contains(['*', '?', '[']);
        let found = match pattern {
            // As a shell globs: `*` does not match a hidden file's leading dot.
            true => glob::glob_with(f, glob::MatchOptions { require_literal_leading_dot: true, ..Default::default() })
                .is_ok_and(|mut paths| paths.any(|p| p.is_ok_and(|p| p.is_file()))),
            false => Path::new(f).exists(),
        };
        if !found {
            return c.fail(
                "data",
                key,
                match pattern {
                    true => format!("the glob `{f}` matches no file"),
                    false => format!("data file `{f}` does not exist"),
                },
                "give paths (files, folders or globs) relative to where furnace runs, or absolute".into(),
            );
        }
    }
    let defaults = crate::DataSection::default();
    for (key, value, default) in [
        ("shard_tokens", d.shard_tokens, defaults.shard_tokens),
        ("tokenizer_sample_mb", d.tokenizer_sample_mb, defaults.tokenizer_sample_mb),
    ] {
        if value == 0 {
            return c.fail("data", key, format!("{key} = 0"), format!("set data.{key} above 0 (the default is {default})"));
        }
    }
    if check_files && !d.tokenizer.is_empty() && !Path::new(&d.tokenizer).is_file() {
        return c.fail(
            "data",
            "tokenizer",
            format!("tokenizer file `{}` does not exist", d.tokenizer),
            "point to a Hugging Face tokenizer.json, or leave empty to train one".into(),
        );
    }
    if !(1..=9).contains(&d.digits) {
        return c.fail("data", "digits", format!("digits = {} is outside 1..=9", d.digits), "use e.g. digits = 2".into());
    }
    if let Some(op) = d.operators.iter().find(|op| !["+", "-", "*"].contains(&op.as_str())) {
        return c.fail("data", "operators", format!("unknown operator `{op}`"), "accepted operators are \"+\", \"-\", \"*\"".into());
    }
    if d.operators.is_empty() {
        return c.fail("data", "operators", "no operators given".into(), "accepted operators are \"+\", \"-\", \"*\"".into());
    }
    if !(0.0..0.5).contains(&d.val_fraction) {
        return c.fail("data", "val_fraction", format!("val_fraction = {} is outside [0, 0.5)", d.val_fraction), "use e.g. 0.05".into());
    }
    if d.tokenizer.is_empty() && d.tokenizer_vocab_size < 260 {
        return c.fail(
            "data",
            "tokenizer_vocab_size",
            format!("tokenizer_vocab_size = {} is below the 256 byte tokens plus specials", d.tokenizer_vocab_size),
            "use at least 260".into(),
        );
    }
    if d.packing && recipe.training.mode != TrainMode::Sft {
        return c.fail(
            "data",
            "packing",
            format!(
                "packing packs SFT conversations for a transformer; this is training.mode = \"{}\" on {}",
                recipe.training.mode,
                m.arch()
            ),
            "set data.packing = false".into(),
        );
    }
    Ok(())
}

/// Which data each mode trains on, GRPO's, PPO's and DPO's settings, and the base a fine-tuning mode needs.
fn post_training(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let d = &recipe.data;
    let modes_of_source: &[TrainMode] = match d.source {
        DataSource::Chat | DataSource::ArithmeticChat => &[TrainMode::Sft, TrainMode::Grpo, TrainMode::Ppo],
        DataSource::ArithmeticTools => &[TrainMode::Sft],
        DataSource::Preferences | DataSource::ArithmeticPreferences => &[TrainMode::Dpo, TrainMode::Reward],
        _ => &[TrainMode::Pretrain],
    };
    if !modes_of_source.contains(&recipe.training.mode) {
        return c.fail(
            "training",
            "mode",
            format!("training.mode = \"{}\" does not train on data.source = \"{}\"", recipe.training.mode, d.source),
            "sft, grpo and ppo take source = \"chat\" or \"arithmetic-chat\" (sft also \"arithmetic-tools\"; grpo's and ppo's prompts end where a conversation's last assistant turn, the verifier's answer, begins); dpo and reward take \"preferences\" or \"arithmetic-preferences\"; pretrain the others".into(),
        );
    }
    let g = &recipe.grpo;
    if recipe.training.mode == TrainMode::Grpo
        && (g.num_generations < 2 || g.max_completion_length == 0 || !(g.temperature > 0.0) || g.beta < 0.0)
    {
        return c.fail(
            "grpo",
            "num_generations",
            format!(
                "GRPO needs num_generations ≥ 2 (got {}), max_completion_length > 0 (got {}), temperature > 0 (got {}) and beta ≥ 0 (got {})",
                g.num_generations, g.max_completion_length, g.temperature, g.beta
            ),
            "use e.g. num_generations = 8, max_completion_length = 16, temperature = 1.0, beta = 0.04".into(),
        );
    }
    let p = &recipe.ppo;
    if recipe.training.mode == TrainMode::Ppo
        && (p.num_ppo_epochs == 0
            || p.max_completion_length == 0
            || !(p.temperature > 0.0)
            || !(0.0..=1.0).contains(&p.lam)
            || !(0.0..=1.0).contains(&p.gamma))
    {
        return c.fail(
            "ppo",
            "num_ppo_epochs",
            "PPO needs num_ppo_epochs and max_completion_length above 0, temperature > 0, and gamma and lam in [0, 1]".into(),
            "use e.g. num_ppo_epochs = 4, max_completion_length = 16, temperature = 1.0, gamma = 1.0, lam = 0.95".into(),
        );
    }
    let chat_data = recipe.training.mode != TrainMode::Pretrain;
    let p = &recipe.dpo;
    if !(p.beta > 0.0 && p.beta.is_finite()) || !(0.0..0.5).contains(&p.label_smoothing) {
        return c.fail(
            "dpo",
            if p.beta > 0.0 { "label_smoothing" } else { "beta" },
            format!("beta = {} must be positive and label_smoothing = {} in [0, 0.5)", p.beta, p.label_smoothing),
            "use e.g. beta = 0.1, label_smoothing = 0.0".into(),
        );
    }
    if chat_data && recipe.model.init_from.is_empty() && d.tokenizer.is_empty() {
        return c.fail(
            "model",
            "init_from",
            format!("training.mode = \"{}\" fine-tunes a trained model, and none is given", recipe.training.mode),
            "set model.init_from to a Furnace run or a Hugging Face folder (or data.tokenizer to start from scratch)".into(),
        );
    }
    Ok(())
}

/// The base model to start from, and the vocabulary.
fn init_from(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let check_files = c.check_files;
    let d = &recipe.data;
    let init_from = Path::new(&recipe.model.init_from);
    let gguf_file = init_from.is_file() && init_from.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if check_files && !recipe.model.init_from.is_empty() && !init_from.is_dir() && !gguf_file {
        return c.fail(
            "model",
            "init_from",
            format!("init_from = `{}` is neither a folder nor a .gguf file", recipe.model.init_from),
            "point to a Furnace run or checkpoint folder, a Hugging Face model folder or a GGUF file".into(),
        );
    }
    if let Some(v) = recipe.model.vocab_size() {
        if d.tokenizer.is_empty() && v < d.tokenizer_vocab_size {
            return c.fail(
                "model",
                "vocab_size",
                format!("vocab_size = {v} is smaller than data.tokenizer_vocab_size = {}", d.tokenizer_vocab_size),
                "raise model.vocab_size or leave it unset to follow the tokenizer".into(),
            );
        }
    }
    Ok(())
}

/// LoRA's, PEFT adapters' and QLoRA's settings.
fn lora(c: &Check<'_>) -> Result<(), RecipeError> {
    let recipe = c.recipe;
    let check_files = c.check_files;
    let l = &recipe.lora;
    if l.r > 0 {
        if !(l.alpha > 0.0 && l.alpha.is_finite()) {
            return c.fail("lora", "alpha", format!("alpha = {} must be positive", l.alpha), "use e.g. alpha = 16 (or 2·r)".into());
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return c.fail("lora", "dropout", format!("dropout = {} is outside [0, 1)", l.dropout), "use e.g. dropout = 0.05".into());
        }
        if l.target_modules.is_empty() {
            return c.fail(
                "lora",
                "target_modules",
                "no target modules given".into(),
                "list layers such as [\"q_proj\", \"v_proj\"], or [\"all-linear\"]".into(),
            );
        }
    }
    if !l.adapter_from.is_empty() && (l.r == 0 || (check_files && !Path::new(&l.adapter_from).join("adapter_model.safetensors").is_file()))
    {
        return c.fail(
            "lora",
            "adapter_from",
            format!("adapter_from = `{}` needs lora.r > 0 and a folder holding adapter_model.safetensors", l.adapter_from),
            "point to a folder written by PEFT's save_pretrained or `furnace export --format peft`, and set lora.r to its rank".into(),
        );
    }
    if l.quantize_base == BaseQuant::Nf4 && (l.r == 0 || recipe.model.init_from.is_empty()) {
        return c.fail(
            "lora",
            "quantize_base",
            "quantize_base = \"nf4\" (QLoRA) freezes a pretrained base in 4 bits and trains adapters on it".into(),
            "set model.init_from to the base model and lora.r above 0".into(),
        );
    }
    Ok(())
}
