//! The data a recipe trains on, as loaders: packed token windows for pretraining, labelled
//! conversations (one per row, loss on the assistant's tokens) for SFT, preference pairs (two
//! rows each) for DPO, (input, target) pairs for an encoder-decoder.

use std::path::Path;

use anyhow::{bail, Context, Result};
use furnace_configs::{Recipe, TrainMode};
use furnace_data::chat::{prepare_preferences, prepare_sft, ChatTemplate, DEFAULT_CHAT_TEMPLATE};
use furnace_data::corpus::prepare;
use furnace_data::loader::MixtureStream;
use furnace_data::seq2seq::prepare_seq2seq;
use furnace_data::{Loader, TextTokenizer, Tokens};

pub struct Datasets {
    pub tokenizer: TextTokenizer,
    pub train: Loader,
    pub val: Loader,
    /// SFT and DPO: how prompts are rendered for evaluation.
    pub chat_template: Option<ChatTemplate>,
    /// DPO: the train and val pairs in dataset order, unshuffled, for the reference pass.
    pub reference_pairs: Option<(Loader, Loader)>,
}

pub fn load(recipe: &Recipe, out: &Path, rank: usize, world: usize) -> Result<Datasets> {
    let t = &recipe.training;
    let seed = recipe.run.seed;
    if matches!(t.mode, TrainMode::Dpo | TrainMode::Reward) {
        let path = Path::new(&recipe.data.tokenizer);
        let tokenizer = TextTokenizer::load(path).map_err(anyhow::Error::msg)?;
        let template = ChatTemplate::new(&chat_template_source(recipe)?, &tokenizer).map_err(anyhow::Error::msg)?;
        println!("preparing preference pairs ({}) with the tokenizer {}", recipe.data.source, path.display());
        let (train, val, skipped) = prepare_preferences(recipe, &template, &tokenizer).map_err(anyhow::Error::msg)?;
        let cut = train.iter().filter(|(c, r)| c.tokens.len().max(r.tokens.len()) > t.seq_len + 1).count();
        // A pair cut before its replies differ is the same row twice: no signal, only cost.
        let window = t.seq_len + 1;
        let blind = train.iter().chain(&val).filter(|(c, r)| c.tokens.iter().take(window).eq(r.tokens.iter().take(window))).count();
        if blind > 0 {
            let longest = train.iter().chain(&val).map(|(c, r)| c.tokens.len().max(r.tokens.len())).max().unwrap_or(0);
            let message = format!(
                "recipe key training.seq_len = {}: {blind} of {} preference pairs are cut before chosen and rejected differ, so they teach nothing; raise it to {} (the longest pair, minus one)",
                t.seq_len,
                train.len() + val.len(),
                longest - 1
            );
            if blind == train.len() + val.len() {
                bail!(message);
            }
            eprintln!("warning: {message}");
        }
        println!(
            "  {} train and {} val pairs{}{}",
            train.len(),
            val.len(),
            if cut > 0 { format!(", {cut} cut at training.seq_len = {}", t.seq_len) } else { String::new() },
            if skipped > 0 { format!(", {skipped} malformed lines skipped") } else { String::new() },
        );
        let (pad, b) = (tokenizer.eos(), t.local_batch_size);
        let in_order = |pairs: &Vec<_>| Loader::pairs(Clone::clone(pairs), pad, t.seq_len, b.min(pairs.len()), seed, 0, 1, false);
        let reference = match t.mode {
            TrainMode::Dpo => Some((in_order(&train).map_err(anyhow::Error::msg)?, in_order(&val).map_err(anyhow::Error::msg)?)),
            _ => None,
        };
        let train = Loader::pairs(train, pad, t.seq_len, b, seed, rank, world, true).map_err(anyhow::Error::msg)?;
        let val = Loader::pairs(val, pad, t.seq_len, b, seed, 0, 1, false).map_err(|e| anyhow::anyhow!("validation data: {e}"))?;
        return Ok(Datasets { tokenizer, train, val, chat_template: Some(template), reference_pairs: reference });
    }
    if matches!(t.mode, TrainMode::Sft | TrainMode::Grpo | TrainMode::Ppo) {
        let path = Path::new(&recipe.data.tokenizer);
        let tokenizer = TextTokenizer::load(path).map_err(anyhow::Error::msg)?;
        let template = ChatTemplate::new(&chat_template_source(recipe)?, &tokenizer).map_err(anyhow::Error::msg)?;
        println!("preparing conversations ({}) with the tokenizer {}", recipe.data.source, path.display());
        let (train, val, skipped) = prepare_sft(recipe, &template, &tokenizer).map_err(anyhow::Error::msg)?;
        let trained: usize = train.iter().map(|e| e.trained.iter().filter(|&&x| x).count()).sum();
        let longest = train.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
        let cut = train.iter().filter(|e| e.tokens.len() > t.seq_len + 1).count();
        println!(
            "  {} train and {} val conversations, {trained} assistant tokens to learn, longest {longest} tokens{}{}",
            train.len(),
            val.len(),
            if cut > 0 { format!(", {cut} cut at training.seq_len = {}", t.seq_len) } else { String::new() },
            if skipped > 0 { format!(", {skipped} malformed lines skipped") } else { String::new() },
        );
        let pad = tokenizer.eos();
        let train = Loader::examples(train, pad, t.seq_len, t.local_batch_size, seed, rank, world, true)
            .map_err(anyhow::Error::msg)?
            .with_packing(recipe.data.packing);
        let val = Loader::examples(val, pad, t.seq_len, t.local_batch_size, seed, 0, 1, false)
            .map_err(|e| anyhow::anyhow!("validation data: {e}"))?;
        return Ok(Datasets { tokenizer, train, val, chat_template: Some(template), reference_pairs: None });
    }
    if recipe.trains_on_pairs() {
        println!("preparing (input, target) pairs ({})", recipe.data.source);
        let prepared = prepare_seq2seq(recipe, out).map_err(anyhow::Error::msg)?;
        let cut = prepared.train.iter().filter(|e| e.input.len().max(e.target.len()) > t.seq_len).count();
        println!(
            "  {} train and {} val pairs, tokenizer vocab {}{}{}{}",
            prepared.train.len(),
            prepared.val.len(),
            prepared.tokenizer.vocab_size(),
            if prepared.reused { " (reused)" } else { "" },
            if cut > 0 { format!(", {cut} cut at training.seq_len = {}", t.seq_len) } else { String::new() },
            if prepared.skipped > 0 { format!(", {} malformed lines skipped", prepared.skipped) } else { String::new() },
        );
        let pad = prepared.tokenizer.pad();
        let train =
            Loader::seq2seq(prepared.train, pad, t.seq_len, t.local_batch_size, seed, rank, world, true).map_err(anyhow::Error::msg)?;
        let val = Loader::seq2seq(prepared.val, pad, t.seq_len, t.local_batch_size, seed, 0, 1, false)
            .map_err(|e| anyhow::anyhow!("validation data: {e}"))?;
        return Ok(Datasets { tokenizer: prepared.tokenizer, train, val, chat_template: None, reference_pairs: None });
    }
    println!("preparing data ({}) under {}", recipe.data.source, out.join("data").display());
    let data = prepare(recipe, out).map_err(anyhow::Error::msg)?;
    println!(
        "  {} train tokens, {} val tokens, tokenizer vocab {}{}",
        data.train_tokens,
        data.val_tokens,
        data.tokenizer.vocab_size(),
        if data.reused { " (reused)" } else { "" }
    );
    if let Some(rates) = crate::commands::preparation_rates(&data) {
        println!("  {rates}");
    }
    let train = if data.sources.is_empty() {
        Loader::new(Tokens::open(&data.train).map_err(anyhow::Error::msg)?, t.seq_len, t.local_batch_size, seed, rank, world, true)
    } else {
        let mut streams = Vec::new();
        for s in &data.sources {
            let tokens = Tokens::open(&s.train).map_err(anyhow::Error::msg)?;
            println!("  source {}: {} train tokens, weight {}", s.name, tokens.len(), s.weight);
            streams.push(MixtureStream { name: s.name.clone(), tokens, weight: s.weight, epochs: s.epochs });
        }
        Loader::mixture(streams, t.seq_len, t.local_batch_size, seed, rank, world)
    }
    .map_err(anyhow::Error::msg)?;
    let val = Loader::new(Tokens::open(&data.val).map_err(anyhow::Error::msg)?, t.seq_len, t.local_batch_size, seed, 0, 1, false)
        .map_err(|e| anyhow::anyhow!("validation data: {e}"))?;
    Ok(Datasets { tokenizer: data.tokenizer, train, val, chat_template: None, reference_pairs: None })
}

/// The recipe's chat template, else the base model's (its tokenizer_config.json), else the default.
pub fn chat_template_source(recipe: &Recipe) -> Result<String> {
    if !recipe.data.chat_template.is_empty() {
        return Ok(recipe.data.chat_template.clone());
    }
    let config = Path::new(&recipe.model.init_from).join("tokenizer_config.json");
    if !recipe.model.init_from.is_empty() && config.is_file() {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config)?).with_context(|| format!("{} is not JSON", config.display()))?;
        if let Some(template) = json.get("chat_template").and_then(|t| t.as_str()) {
            return Ok(template.to_string());
        }
    }
    Ok(DEFAULT_CHAT_TEMPLATE.to_string())
}
