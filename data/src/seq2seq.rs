//! Encoder-decoder data: (input, target) pairs from JSONL files or generated arithmetic,
//! tokenized with the recipe's tokenizer or one trained on the pairs.

use std::path::Path;

use furnace_configs::{DataSource, Recipe};
use furnace_core::fsutil::atomic_write;
use serde::Deserialize;

use crate::chat::{read_records, read_train_and_val};
use crate::corpus::{arithmetic_config, data_stamp, extra_tokens, val_seed};
use crate::generators::arithmetic;
use crate::tokenizer::TextTokenizer;

/// One pair as text, as a `.jsonl` line gives it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TextPair {
    pub input: String,
    pub target: String,
}

/// One pair as token ids, each side ending with end-of-text (as T5 appends `</s>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seq2SeqExample {
    pub input: Vec<u32>,
    pub target: Vec<u32>,
}

impl Seq2SeqExample {
    pub fn encode(tokenizer: &TextTokenizer, pair: &TextPair) -> Self {
        Self { input: with_eos(tokenizer, &pair.input), target: with_eos(tokenizer, &pair.target) }
    }
}

/// Text as an encoder-decoder reads and writes it: its tokens, then end-of-text.
pub fn with_eos(tokenizer: &TextTokenizer, text: &str) -> Vec<u32> {
    let mut ids = tokenizer.encode(text);
    ids.push(tokenizer.eos());
    ids
}

/// Pairs of a JSONL, JSON or Parquet file, one `{"input": ..., "target": ...}` record each; a malformed record is an
/// error naming the file and line, or with `skip_bad` skipped and counted.
pub fn read_pairs(path: &Path, skip_bad: bool) -> Result<(Vec<TextPair>, usize), String> {
    read_records(path, skip_bad, "{\"input\": \"...\", \"target\": \"...\"}")
}

/// The recipe's train and validation pairs as text, and the malformed lines skipped.
pub fn text_pairs(recipe: &Recipe) -> Result<(Vec<TextPair>, Vec<TextPair>, usize), String> {
    let d = &recipe.data;
    let seed = recipe.run.seed;
    let generated = |words: bool| {
        let config = arithmetic_config(d);
        let pairs = |count, seed, held_out| {
            arithmetic(&config, count, seed, held_out)
                .iter()
                .map(|p| TextPair { input: if words { p.words() } else { p.prompt() }, target: p.answer().to_string() })
                .collect::<Vec<_>>()
        };
        (pairs(d.num_examples, seed, false), pairs(d.num_val_examples, val_seed(seed), true), 0)
    };
    Ok(match d.source {
        DataSource::Arithmetic => generated(false),
        DataSource::ArithmeticWords => generated(true),
        DataSource::Seq2seq => read_train_and_val(d, read_pairs)?,
        other => return Err(format!("data.source = \"{other}\" holds no (input, target) pairs")),
    })
}

/// Pairs ready for the loader.
pub struct PreparedPairs {
    pub tokenizer: TextTokenizer,
    pub train: Vec<Seq2SeqExample>,
    pub val: Vec<Seq2SeqExample>,
    pub skipped: usize,
    /// The tokenizer trained by an earlier run of the same `[data]` section was reused.
    pub reused: bool,
}

/// The recipe's pairs, tokenized by `data.tokenizer`, or by a byte-level BPE trained on the
/// training pairs' inputs and targets and saved as `<out>/tokenizer.json` (reused while the
/// `[data]` section is unchanged, so a resumed run reads the same ids).
pub fn prepare_seq2seq(recipe: &Recipe, out: &Path) -> Result<PreparedPairs, String> {
    let (train, val, skipped) = text_pairs(recipe)?;
    if train.is_empty() || val.is_empty() {
        return Err("no training or validation pairs: check data.files / data.num_examples".into());
    }
    let stamp_path = out.join("data").join("data_section.toml");
    let stamp = data_stamp(recipe);
    let trained_path = out.join("tokenizer.json");
    let io = |e: std::io::Error| format!("cannot write the tokenizer under {}: {e}", out.display());
    let (tokenizer, reused) = if !recipe.data.tokenizer.is_empty() {
        (TextTokenizer::load(Path::new(&recipe.data.tokenizer))?, false)
    } else if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) && trained_path.is_file() {
        (TextTokenizer::load(&trained_path)?, true)
    } else {
        let texts: Vec<String> = train.iter().flat_map(|p| [p.input.clone(), p.target.clone()]).collect();
        let tokenizer = TextTokenizer::train(&texts, recipe.data.tokenizer_vocab_size, extra_tokens(recipe))?;
        atomic_write(&trained_path, tokenizer.to_json().as_bytes()).map_err(io)?;
        std::fs::create_dir_all(out.join("data")).map_err(io)?;
        atomic_write(&stamp_path, stamp.as_bytes()).map_err(io)?;
        (tokenizer, false)
    };
    let encode = |pairs: &[TextPair]| pairs.iter().map(|p| Seq2SeqExample::encode(&tokenizer, p)).collect();
    Ok(PreparedPairs { train: encode(&train), val: encode(&val), tokenizer, skipped, reused })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_words_pairs_answer_in_digits() {
        let mut recipe = Recipe::default();
        recipe.data.source = DataSource::ArithmeticWords;
        recipe.data.num_examples = 20;
        let (train, val, _) = text_pairs(&recipe).unwrap();
        assert_eq!((train.len(), val.len()), (20, 500));
        for pair in &train {
            assert!(pair.input.chars().all(|c| c.is_ascii_lowercase() || c == ' ' || c == '-'), "{}", pair.input);
            assert!(pair.target.parse::<i64>().is_ok(), "{}", pair.target);
        }
    }

    #[test]
    fn jsonl_pairs_name_the_bad_line_and_prepare_with_eos() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pairs.jsonl");
        let lines: Vec<String> = (0..30).map(|i| format!("{{\"input\": \"reverse {i}\", \"target\": \"{}\"}}", i * 7)).collect();
        std::fs::write(&path, format!("{}\n{{\"input\": \"no target\"}}\n", lines.join("\n"))).unwrap();
        let err = read_pairs(&path, false).unwrap_err();
        assert!(err.contains("pairs.jsonl:31") && err.contains("\"target\""), "{err}");
        let mut recipe = Recipe::default();
        recipe.data.source = DataSource::Seq2seq;
        recipe.data.files = vec![path.display().to_string()];
        recipe.data.skip_bad_lines = true;
        recipe.data.val_fraction = 0.1;
        let out = dir.path().join("run");
        let prepared = prepare_seq2seq(&recipe, &out).unwrap();
        assert_eq!((prepared.train.len(), prepared.val.len(), prepared.skipped, prepared.reused), (27, 3, 1, false));
        let first = &prepared.train[0];
        let eos = prepared.tokenizer.eos();
        assert_eq!((first.input.last(), first.target.last()), (Some(&eos), Some(&eos)));
        assert_eq!(prepared.tokenizer.decode(&first.input), "reverse 0");
        assert!(prepare_seq2seq(&recipe, &out).unwrap().reused, "the trained tokenizer is reused");
    }
}
