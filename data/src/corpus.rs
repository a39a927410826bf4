//! From a recipe's `[data]` section to a tokenizer and train/val token shards in the run folder.
//! Prepared data is reused when the `[data]` section and seed are unchanged.

use std::path::{Path, PathBuf};

use furnace_configs::{Arch, DataSection, DataSource, Recipe, TextDocuments};
use furnace_core::fsutil::atomic_write;

use crate::generators::{arithmetic, stories, ArithmeticConfig};
use crate::shards::write_shard;
use crate::tokenizer::{ExtraTokens, TextTokenizer};

/// What `prepare` leaves in `<output_dir>`.
pub struct Prepared {
    pub tokenizer: TextTokenizer,
    pub tokenizer_path: PathBuf,
    pub train: PathBuf,
    pub val: PathBuf,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub reused: bool,
}

pub fn arithmetic_config(data: &DataSection) -> ArithmeticConfig {
    ArithmeticConfig { digits: data.digits, operators: data.operators.iter().filter_map(|o| o.chars().next()).collect() }
}

/// Seed of the held-out set, distinct from the training seed.
pub fn val_seed(seed: u64) -> u64 {
    seed ^ 0x5EED_0F_7E57
}

/// Train and validation documents for the recipe.
pub fn documents(recipe: &Recipe) -> Result<(Vec<String>, Vec<String>), String> {
    let d = &recipe.data;
    let seed = recipe.run.seed;
    Ok(match d.source {
        DataSource::Arithmetic => {
            let config = arithmetic_config(d);
            let text = |held_out, count, seed| arithmetic(&config, count, seed, held_out).iter().map(|p| p.text()).collect();
            (text(false, d.num_examples, seed), text(true, d.num_val_examples, val_seed(seed)))
        }
        DataSource::Stories => (stories(d.num_examples, seed), stories(d.num_val_examples, val_seed(seed))),
        DataSource::Chat | DataSource::ArithmeticChat | DataSource::Preferences | DataSource::ArithmeticPreferences => {
            return Err(format!("data.source = \"{}\" is fine-tuning data: set training.mode to sft or dpo", d.source))
        }
        DataSource::Seq2seq | DataSource::ArithmeticWords => {
            return Err(format!("data.source = \"{}\" holds (input, target) pairs: set model.arch = \"t5\"", d.source))
        }
        DataSource::Files => {
            let mut train = Vec::new();
            for f in &d.files {
                train.extend(read_documents(Path::new(f), &d.text_field, d.text_documents, d.skip_bad_lines)?);
            }
            let mut val = Vec::new();
            for f in &d.val_files {
                val.extend(read_documents(Path::new(f), &d.text_field, d.text_documents, d.skip_bad_lines)?);
            }
            if val.is_empty() {
                val = held_out(&mut train, d.val_fraction);
            }
            (train, val)
        }
    })
}

/// The validation documents when no val_files are given: the last `fraction` of the documents
/// when there are enough of them for that to be at least one, else the last `fraction` of the
/// text (a few long documents, such as a book in one file, still leave a validation set), cut at
/// the start of the line the cut falls in.
fn held_out(train: &mut Vec<String>, fraction: f64) -> Vec<String> {
    if train.len() as f64 * fraction >= 1.0 {
        let held = ((train.len() as f64 * fraction).ceil() as usize).min(train.len() - 1);
        return train.split_off(train.len() - held);
    }
    let total: usize = train.iter().map(String::len).sum();
    let mut wanted = (total as f64 * fraction).ceil() as usize;
    let mut val = Vec::new();
    while wanted > 0 {
        let documents = train.len();
        let Some(last) = train.last_mut() else { break };
        if last.len() <= wanted && documents > 1 {
            wanted -= last.len();
            val.extend(train.pop());
            continue;
        }
        let mut cut = last.len().saturating_sub(wanted);
        while !last.is_char_boundary(cut) {
            cut += 1;
        }
        // Start the held-out text at the line it cuts into, when training text stays before it.
        if let Some(newline) = last[..cut].rfind('\n').filter(|&i| i > 0) {
            cut = newline + 1;
        }
        val.push(last.split_off(cut));
        break;
    }
    val.reverse();
    val
}

/// Documents of a `.jsonl` file (one object per line, text under `field`) or a text file (the
/// whole file, its blank-line blocks or its lines, as `documents` says).
pub fn read_documents(path: &Path, field: &str, documents: TextDocuments, skip_bad_lines: bool) -> Result<Vec<String>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        let (mut texts, mut skipped) = (Vec::new(), 0);
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let parsed = serde_json::from_str::<serde_json::Value>(line).map_err(|e| format!("invalid JSON: {e}")).and_then(|value| {
                value
                    .get(field)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or(format!("no string field `{field}` (set data.text_field)"))
            });
            match parsed {
                Ok(document) => texts.push(document),
                Err(_) if skip_bad_lines => skipped += 1,
                Err(e) => return Err(format!("{}:{}: {e} (or set data.skip_bad_lines = true)", path.display(), i + 1)),
            }
        }
        if skipped > 0 {
            eprintln!("warning: {}: skipped {skipped} malformed line(s) (data.skip_bad_lines = true)", path.display());
        }
        Ok(texts)
    } else {
        Ok(match documents {
            TextDocuments::File if text.trim().is_empty() => Vec::new(),
            TextDocuments::File => vec![text],
            TextDocuments::BlankLine => text.split("\n\n").map(str::trim).filter(|d| !d.is_empty()).map(str::to_string).collect(),
            TextDocuments::Line => text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect(),
        })
    }
}

fn tokenize(tokenizer: &TextTokenizer, docs: &[String]) -> Vec<u32> {
    let mut tokens = Vec::new();
    for doc in docs {
        tokens.push(tokenizer.eos());
        tokens.extend(tokenizer.encode(doc));
    }
    tokens
}

/// Build (or reuse) the tokenizer and the token shards for `recipe` under `out`.
pub fn prepare(recipe: &Recipe, out: &Path) -> Result<Prepared, String> {
    let data_dir = out.join("data");
    let stamp_path = data_dir.join("data_section.toml");
    let stamp = data_stamp(recipe);
    let tokenizer_path = if recipe.data.tokenizer.is_empty() { out.join("tokenizer.json") } else { PathBuf::from(&recipe.data.tokenizer) };
    let (train, val) = (data_dir.join("train.bin"), data_dir.join("val.bin"));
    let io = |e: std::io::Error| format!("cannot write prepared data under {}: {e}", data_dir.display());
    if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str())
        && train.is_file()
        && val.is_file()
        && tokenizer_path.is_file()
    {
        let tokenizer = TextTokenizer::load(&tokenizer_path)?;
        let (train_tokens, val_tokens) = (crate::Shard::open(&train)?.len(), crate::Shard::open(&val)?.len());
        return Ok(Prepared { tokenizer, tokenizer_path, train, val, train_tokens, val_tokens, reused: true });
    }
    let (train_docs, val_docs) = documents(recipe)?;
    if train_docs.is_empty() || val_docs.is_empty() {
        return Err("no training or validation documents: check data.files / data.num_examples".into());
    }
    let tokenizer = if recipe.data.tokenizer.is_empty() {
        let tokenizer = TextTokenizer::train(&train_docs, recipe.data.tokenizer_vocab_size, extra_tokens(recipe))?;
        atomic_write(&tokenizer_path, tokenizer.to_json().as_bytes()).map_err(io)?;
        tokenizer
    } else {
        TextTokenizer::load(&tokenizer_path)?
    };
    let train_ids = tokenize(&tokenizer, &train_docs);
    let val_ids = tokenize(&tokenizer, &val_docs);
    write_shard(&train, &train_ids, tokenizer.vocab_size()).map_err(io)?;
    write_shard(&val, &val_ids, tokenizer.vocab_size()).map_err(io)?;
    atomic_write(&stamp_path, stamp.as_bytes()).map_err(io)?;
    Ok(Prepared { tokenizer, tokenizer_path, train, val, train_tokens: train_ids.len(), val_tokens: val_ids.len(), reused: false })
}

/// The special tokens the recipe's model needs from a tokenizer trained for it.
pub fn extra_tokens(recipe: &Recipe) -> ExtraTokens {
    match recipe.model.arch {
        Arch::Bert => ExtraTokens::Mask,
        Arch::T5 => ExtraTokens::Sentinels,
        _ => ExtraTokens::None,
    }
}

/// What prepared data depends on: the seed, the tokens the model needs and the `[data]`
/// section. Prepared data with the same stamp is reused.
pub(crate) fn data_stamp(recipe: &Recipe) -> String {
    let data = furnace_configs::Recipe { data: recipe.data.clone(), ..Default::default() }.to_toml();
    format!("seed = {}\nextra_tokens = \"{:?}\"\n{data}", recipe.run.seed, extra_tokens(recipe))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAY: &str = "ROMEO: But soft.\nWhat light?\n\nJULIET: Ay me.\n\n\nROMEO: She speaks.\n";

    fn documents_of(text: &str, documents: TextDocuments) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("play.txt");
        std::fs::write(&path, text).unwrap();
        read_documents(&path, "text", documents, false).unwrap()
    }

    #[test]
    fn a_text_file_is_one_document_a_block_or_a_line_as_asked() {
        assert_eq!(documents_of(PLAY, TextDocuments::File), [PLAY], "the whole file, blank lines kept");
        assert_eq!(documents_of(PLAY, TextDocuments::BlankLine), ["ROMEO: But soft.\nWhat light?", "JULIET: Ay me.", "ROMEO: She speaks."]);
        assert_eq!(documents_of(PLAY, TextDocuments::Line), ["ROMEO: But soft.", "What light?", "JULIET: Ay me.", "ROMEO: She speaks."]);
        assert!(documents_of("\n\n  \n", TextDocuments::File).is_empty());
    }

    #[test]
    fn malformed_jsonl_lines_stop_the_read_unless_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.jsonl");
        std::fs::write(&path, "{\"text\": \"one\"}\nnot json\n{\"other\": 1}\n{\"text\": \"two\"}\n").unwrap();
        let err = read_documents(&path, "text", TextDocuments::File, false).unwrap_err();
        assert!(err.contains("docs.jsonl:2: invalid JSON") && err.contains("skip_bad_lines"), "{err}");
        assert_eq!(read_documents(&path, "text", TextDocuments::File, true).unwrap(), ["one", "two"]);
    }

    #[test]
    fn few_long_documents_still_leave_a_validation_set() {
        // One book: its last tenth, from a line start, is held out, and nothing is lost.
        let book: String = (0..100).map(|i| format!("line {i} of the book\n")).collect();
        let mut train = vec![book.clone()];
        let val = held_out(&mut train, 0.1);
        assert_eq!(val.len(), 1);
        assert!(val[0].starts_with("line ") && val[0].len() >= book.len() / 10 && val[0].len() < book.len() / 5, "{:?}", val[0]);
        assert_eq!(format!("{}{}", train[0], val[0]), book);
        // Many documents: whole documents are held out.
        let mut many: Vec<String> = (0..40).map(|i| format!("doc {i}")).collect();
        let val = held_out(&mut many, 0.05);
        assert_eq!((many.len(), val), (38, vec!["doc 38".to_string(), "doc 39".to_string()]));
    }
}
