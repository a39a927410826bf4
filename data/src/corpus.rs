//! From a recipe's `[data]` section to a tokenizer and train/val token shards in the run folder:
//! documents streamed from the inputs, tokenized in parallel, appended to shards in bounded
//! memory. Prepared data is reused while the `[data]` section, seed and inputs are unchanged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use furnace_configs::{Arch, DataSection, DataSource, Recipe};
use furnace_core::fsutil::atomic_write;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::generators::{arithmetic, stories, ArithmeticConfig};
use crate::inputs::{self, Format, Input, Piece, Reading, TextOptions};
use crate::shards::{Manifest, Segment, Shard, ShardWriter, Tokens};
use crate::tokenizer::{ExtraTokens, TextTokenizer};

/// What `prepare` leaves in `<output_dir>`: the tokenizer, and the train and validation token
/// streams as manifests (`data/train.json`, `data/val.json`) over shards.
pub struct Prepared {
    pub tokenizer: TextTokenizer,
    pub tokenizer_path: PathBuf,
    pub train: PathBuf,
    pub val: PathBuf,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// A mixture's sources (`train` then holds all of them, one after another); empty otherwise.
    pub sources: Vec<PreparedSource>,
    pub reused: bool,
    /// What this preparation read and how long it took (zero when reused).
    pub input_bytes: u64,
    pub seconds: f64,
    /// Malformed records skipped (data.skip_bad_lines).
    pub skipped: usize,
    /// Documents dropped as exact duplicates of earlier ones (data.dedup).
    pub duplicates: usize,
}

pub fn arithmetic_config(data: &DataSection) -> ArithmeticConfig {
    ArithmeticConfig { digits: data.digits, operators: data.operators.iter().filter_map(|o| o.chars().next()).collect() }
}

/// Seed of the held-out set, distinct from the training seed.
pub fn val_seed(seed: u64) -> u64 {
    seed ^ 0x5EED_0F_7E57
}

/// Where a split's documents come from.
enum Documents {
    Generated(Vec<String>),
    Files(Vec<Input>),
    /// Token files: read as they are, not tokenized.
    Tokens(Vec<Input>),
}

impl Documents {
    /// The documents of `data.files` (or `val_files`, as `key` says): text, or token files.
    fn of_files(entries: &[String], key: &str) -> Result<Self, String> {
        let inputs = inputs::expand(entries, key)?;
        match inputs.iter().filter(|i| i.format == Format::Tokens).count() {
            0 => Ok(Documents::Files(inputs)),
            n if n == inputs.len() => Ok(Documents::Tokens(inputs)),
            _ => Err(format!("{key} mixes token files (.bin) with text files: list one kind")),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Documents::Generated(docs) => docs.is_empty(),
            Documents::Files(inputs) | Documents::Tokens(inputs) => inputs.is_empty(),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Documents::Generated(docs) => docs.iter().map(|d| d.len() as u64).sum(),
            Documents::Files(inputs) | Documents::Tokens(inputs) => inputs.iter().map(Input::size).sum(),
        }
    }

    fn inputs(&self) -> &[Input] {
        match self {
            Documents::Generated(_) => &[],
            Documents::Files(inputs) | Documents::Tokens(inputs) => inputs,
        }
    }

    /// Call `emit` with each piece, in order; what was skipped or dropped is counted in the
    /// returned [`Reading`].
    fn for_each_piece(
        &self,
        d: &DataSection,
        read: &Arc<AtomicU64>,
        emit: &mut dyn FnMut(Piece) -> Result<(), String>,
    ) -> Result<Reading, String> {
        let mut reading = Reading::new(d.dedup);
        match self {
            Documents::Generated(docs) => {
                for doc in docs {
                    inputs::emit_pieces(doc, true, emit)?;
                    read.fetch_add(doc.len() as u64, Ordering::Relaxed);
                }
            }
            Documents::Files(inputs) | Documents::Tokens(inputs) => {
                let options = TextOptions { field: &d.text_field, documents: d.text_documents, skip_bad: d.skip_bad_lines };
                for input in inputs {
                    inputs::for_each_piece(input, options, read, &mut reading, emit)?;
                }
            }
        }
        Ok(reading)
    }
}

/// A stream of training documents: its name (its prepared files' prefix), its documents, and
/// its share of a mixture.
struct TrainStream {
    name: String,
    docs: Documents,
    weight: f64,
    epochs: usize,
    /// The source's name in a mixture; None for the one stream of unmixed data.
    source: Option<String>,
}

/// The training streams (one, or a mixture's) and the validation documents (empty: each
/// stream's tail is held out).
fn documents(recipe: &Recipe) -> Result<(Vec<TrainStream>, Documents), String> {
    let d = &recipe.data;
    let seed = recipe.run.seed;
    let one = |docs| vec![TrainStream { name: "train".into(), docs, weight: 1.0, epochs: 0, source: None }];
    Ok(match d.source {
        DataSource::Arithmetic => {
            let config = arithmetic_config(d);
            let text = |held_out, count, seed| arithmetic(&config, count, seed, held_out).iter().map(|p| p.text()).collect();
            (
                one(Documents::Generated(text(false, d.num_examples, seed))),
                Documents::Generated(text(true, d.num_val_examples, val_seed(seed))),
            )
        }
        DataSource::Stories => {
            (one(Documents::Generated(stories(d.num_examples, seed))), Documents::Generated(stories(d.num_val_examples, val_seed(seed))))
        }
        DataSource::Chat
        | DataSource::ArithmeticChat
        | DataSource::ArithmeticTools
        | DataSource::Preferences
        | DataSource::ArithmeticPreferences => {
            return Err(format!("data.source = \"{}\" is fine-tuning data: set training.mode to sft or dpo", d.source))
        }
        DataSource::Seq2seq | DataSource::ArithmeticWords => {
            return Err(format!("data.source = \"{}\" holds (input, target) pairs: set model.arch = \"t5\"", d.source))
        }
        DataSource::Files if d.sources.is_empty() => {
            (one(Documents::of_files(&d.files, "data.files")?), Documents::of_files(&d.val_files, "data.val_files")?)
        }
        DataSource::Files => {
            let mut streams = Vec::new();
            for s in &d.sources {
                let docs = Documents::of_files(&s.files, &format!("data.sources \"{}\"", s.name))?;
                streams.push(TrainStream {
                    name: format!("mix-{}", s.name),
                    docs,
                    weight: s.weight,
                    epochs: s.epochs,
                    source: Some(s.name.clone()),
                });
            }
            (streams, Documents::of_files(&d.val_files, "data.val_files")?)
        }
    })
}

/// Where an interrupted preparation stopped: the shards each stream completed and how many
/// pieces of its documents they hold. Saved after every shard; read back to continue.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Progress {
    stamp: String,
    streams: std::collections::BTreeMap<String, StreamProgress>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StreamProgress {
    pieces: usize,
    shards: Vec<Segment>,
    done: bool,
    skipped: usize,
    duplicates: usize,
}

impl Progress {
    fn of(&mut self, stream: &str) -> &mut StreamProgress {
        self.streams.entry(stream.to_string()).or_default()
    }

    /// Whether any stream has written anything (so the tokenizer on disk is the one it used).
    fn started(&self) -> bool {
        self.streams.values().any(|s| s.pieces > 0 || s.done)
    }

    fn save(&self, path: &Path) -> std::io::Result<()> {
        atomic_write(path, serde_json::to_string_pretty(self).expect("progress serializes").as_bytes())
    }
}

/// Pieces handed to the tokenizing threads at once.
const BATCH_BYTES: usize = 8 << 20;
const BATCH_PIECES: usize = 8192;

/// What the progress bar shows: input bytes read and tokens written.
struct Meter {
    read: Arc<AtomicU64>,
    tokens: AtomicU64,
    bar: ProgressBar,
}

impl Meter {
    fn tick(&self) {
        self.bar.set_position(self.read.load(Ordering::Relaxed));
        let seconds = self.bar.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!("{:.2} M tokens/s", self.tokens.load(Ordering::Relaxed) as f64 / seconds / 1e6));
    }
}

/// Tokenize a stream's documents into shards `<stream>-NNNNN.bin` of at least `shard_tokens`
/// tokens (cut at piece boundaries), continuing where `progress` says an earlier run stopped.
/// One thread reads and decompresses; all cores tokenize.
#[allow(clippy::too_many_arguments)]
fn tokenize_stream(
    split: &str,
    docs: &Documents,
    d: &DataSection,
    tokenizer: &TextTokenizer,
    data_dir: &Path,
    progress: &mut Progress,
    progress_path: &Path,
    meter: &Meter,
) -> Result<(), String> {
    if progress.of(split).done {
        return Ok(());
    }
    let skip = progress.of(split).pieces;
    let io = |e: std::io::Error| format!("cannot write prepared data under {}: {e}", data_dir.display());
    let shard_name = |index: usize| format!("{split}-{index:05}.bin");
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<Piece>>(4);
    let read = meter.read.clone();
    let writing = &mut *progress;
    let (written, reading) = std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<Reading, String> {
            let (mut batch, mut batch_bytes, mut seen) = (Vec::new(), 0, 0usize);
            let stopped = || "the tokenizing threads stopped".to_string();
            let reading = docs.for_each_piece(d, &read, &mut |piece| {
                seen += 1;
                if seen <= skip {
                    return Ok(());
                }
                batch_bytes += piece.text.len();
                batch.push(piece);
                if batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_PIECES {
                    batch_bytes = 0;
                    sender.send(std::mem::take(&mut batch)).map_err(|_| stopped())?;
                }
                Ok(())
            })?;
            if !batch.is_empty() {
                sender.send(batch).map_err(|_| stopped())?;
            }
            Ok(reading)
        });
        // Owns the receiver: a write error drops it, which stops the reader.
        let written = (move || -> Result<(), String> {
            let mut writer: Option<ShardWriter> = None;
            for batch in receiver {
                let encoded: Vec<Vec<u32>> = batch.par_iter().map(|piece| tokenizer.encode(&piece.text)).collect();
                for (piece, ids) in batch.iter().zip(encoded) {
                    let w = match &mut writer {
                        Some(w) => w,
                        None => writer.insert(
                            ShardWriter::create(&data_dir.join(shard_name(writing.of(split).shards.len())), tokenizer.vocab_size())
                                .map_err(io)?,
                        ),
                    };
                    if piece.starts_document {
                        w.push(&[tokenizer.eos()]).map_err(io)?;
                    }
                    w.push(&ids).map_err(io)?;
                    meter.tokens.fetch_add(ids.len() as u64 + piece.starts_document as u64, Ordering::Relaxed);
                    writing.of(split).pieces += 1;
                    if w.len() >= d.shard_tokens {
                        let state = writing.of(split);
                        let file = shard_name(state.shards.len());
                        let len = writer.take().expect("open").finish().map_err(io)?;
                        state.shards.push(Segment { file, start: 0, len, external: false });
                        writing.save(progress_path).map_err(io)?;
                    }
                }
                meter.tick();
            }
            if let Some(w) = writer.take().filter(|w| !w.is_empty()) {
                let state = writing.of(split);
                let file = shard_name(state.shards.len());
                let len = w.finish().map_err(io)?;
                state.shards.push(Segment { file, start: 0, len, external: false });
            }
            Ok(())
        })();
        let reading = reader.join().unwrap_or_else(|_| Err(format!("reading the {split} documents panicked")));
        (written, reading)
    });
    // A write error explains a reader stopped by it, so it comes first.
    written?;
    let reading = reading?;
    let state = progress.of(split);
    (state.skipped, state.duplicates, state.done) = (reading.skipped, reading.duplicates, true);
    progress.save(progress_path).map_err(io)
}

/// Where the held-out tail of a token stream of `len` tokens starts: the start of the
/// document nearest to the last `fraction` of the tokens, when one lies near it (so many
/// documents are held out whole), else exactly there (a few long documents, such as a book in
/// one file, still leave a validation set). `is_document_start(i)` tells whether token `i`
/// opens a document.
fn held_out_start(len: usize, fraction: f64, is_document_start: impl Fn(usize) -> bool) -> usize {
    let held = ((len as f64 * fraction).ceil() as usize).clamp(1, len.saturating_sub(1).max(1));
    let target = len - held;
    // Document starts within half the held-out size either side, nearest first.
    let reach = held / 2;
    (0..=reach)
        .flat_map(|k| [target.checked_sub(k), Some(target + k)])
        .flatten()
        .find(|&i| i > 0 && i < len && is_document_start(i))
        .unwrap_or(target)
}

/// A mixture source as prepared: its training tokens' manifest and its share.
pub struct PreparedSource {
    pub name: String,
    pub train: PathBuf,
    pub tokens: usize,
    pub weight: f64,
    pub epochs: usize,
}

/// Build (or reuse) the tokenizer and the token shards for `recipe` under `out`. Prepared data
/// is keyed by the `[data]` section, the seed and the inputs' names, sizes and modification
/// times; an interrupted preparation continues at its last complete shard.
pub fn prepare(recipe: &Recipe, out: &Path) -> Result<Prepared, String> {
    let d = &recipe.data;
    let data_dir = out.join("data");
    let stamp_path = data_dir.join("data_section.toml");
    let progress_path = data_dir.join("progress.json");
    let (streams, val_docs) = documents(recipe)?;
    let stamp = format!("{}{}", data_stamp(recipe), inputs_stamp(streams.iter().map(|s| &s.docs).chain([&val_docs])));
    let tokenizer_path = if d.tokenizer.is_empty() { out.join("tokenizer.json") } else { PathBuf::from(&d.tokenizer) };
    let (train, val) = (data_dir.join("train.json"), data_dir.join("val.json"));
    let manifest_of = |stream: &TrainStream| data_dir.join(format!("{}.json", stream.name));
    let sources_of = |streams: &[TrainStream], tokens: &[usize]| -> Vec<PreparedSource> {
        streams
            .iter()
            .zip(tokens)
            .filter_map(|(s, &tokens)| {
                let name = s.source.clone()?;
                Some(PreparedSource { name, train: manifest_of(s), tokens, weight: s.weight, epochs: s.epochs })
            })
            .collect()
    };
    let io = |e: std::io::Error| format!("cannot write prepared data under {}: {e}", data_dir.display());
    if std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) && tokenizer_path.is_file() {
        let opened: Result<Vec<Tokens>, String> = streams.iter().map(|s| Tokens::open(&manifest_of(s))).collect();
        if let (Ok(train_tokens), Ok(val_tokens), Ok(opened)) = (Tokens::open(&train), Tokens::open(&val), opened) {
            let tokenizer = TextTokenizer::load(&tokenizer_path)?;
            let lengths: Vec<usize> = opened.iter().map(Tokens::len).collect();
            return Ok(Prepared {
                tokenizer,
                tokenizer_path,
                train,
                val,
                train_tokens: train_tokens.len(),
                val_tokens: val_tokens.len(),
                sources: sources_of(&streams, &lengths),
                reused: true,
                input_bytes: 0,
                seconds: 0.0,
                skipped: 0,
                duplicates: 0,
            });
        }
    }
    if streams.iter().all(|s| s.docs.is_empty()) {
        return Err("no training documents: check data.files / data.num_examples".into());
    }
    let started = std::time::Instant::now();
    let mut progress = std::fs::read_to_string(&progress_path)
        .ok()
        .and_then(|text| serde_json::from_str::<Progress>(&text).ok())
        .filter(|p| p.stamp == stamp && p.started() && tokenizer_path.is_file())
        .unwrap_or_else(|| Progress { stamp: stamp.clone(), ..Default::default() });
    let continuing = progress.started();
    if !continuing {
        // Nothing of an earlier, different preparation is kept (its shards would be reused by name).
        let _ = std::fs::remove_file(&stamp_path);
        remove_shards(&data_dir).map_err(io)?;
    }
    let tokenizer = if continuing || !d.tokenizer.is_empty() {
        TextTokenizer::load(&tokenizer_path)?
    } else {
        let tokenizer = TextTokenizer::train(&sample(&streams, d)?, d.tokenizer_vocab_size, extra_tokens(recipe))?;
        atomic_write(&tokenizer_path, tokenizer.to_json().as_bytes()).map_err(io)?;
        tokenizer
    };
    let input_bytes = streams.iter().map(|s| s.docs.bytes()).sum::<u64>() + val_docs.bytes();
    let bar = ProgressBar::new(input_bytes).with_prefix("tokenizing");
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg} eta {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let meter = Meter { read: Arc::new(AtomicU64::new(0)), tokens: AtomicU64::new(0), bar };
    let mut trains = Vec::new();
    let mut held_out = Manifest::default();
    for stream in &streams {
        let all = match &stream.docs {
            Documents::Tokens(inputs) => token_files(inputs, &tokenizer)?,
            docs => {
                tokenize_stream(&stream.name, docs, d, &tokenizer, &data_dir, &mut progress, &progress_path, &meter)?;
                Manifest { segments: progress.of(&stream.name).shards.clone() }
            }
        };
        if val_docs.is_empty() {
            let tokens = Tokens::open_segments(&data_dir, &all)?;
            let cut = held_out_start(tokens.len(), d.val_fraction, |i| tokens.get(i) == tokenizer.eos());
            held_out.segments.extend(all.slice(cut..all.tokens()).segments);
            trains.push(all.slice(0..cut));
        } else {
            trains.push(all);
        }
    }
    let val_manifest = match &val_docs {
        _ if val_docs.is_empty() => held_out,
        Documents::Tokens(inputs) => token_files(inputs, &tokenizer)?,
        docs => {
            tokenize_stream("val", docs, d, &tokenizer, &data_dir, &mut progress, &progress_path, &meter)?;
            Manifest { segments: progress.of("val").shards.clone() }
        }
    };
    meter.bar.finish_and_clear();
    if let Some(empty) = streams.iter().zip(&trains).find(|(_, m)| m.tokens() == 0) {
        return Err(format!("no training tokens in {}: check data.files / data.sources / data.num_examples", empty.0.name));
    }
    if val_manifest.tokens() == 0 {
        return Err("no validation tokens: check data.val_files / data.val_fraction".into());
    }
    let train_manifest = Manifest { segments: trains.iter().flat_map(|m| m.segments.clone()).collect() };
    for (stream, manifest) in streams.iter().zip(&trains).filter(|(s, _)| s.source.is_some()) {
        manifest.save(&manifest_of(stream)).map_err(io)?;
    }
    train_manifest.save(&train).map_err(io)?;
    val_manifest.save(&val).map_err(io)?;
    atomic_write(&stamp_path, stamp.as_bytes()).map_err(io)?;
    let _ = std::fs::remove_file(&progress_path);
    let lengths: Vec<usize> = trains.iter().map(Manifest::tokens).collect();
    Ok(Prepared {
        tokenizer,
        tokenizer_path,
        train,
        val,
        train_tokens: train_manifest.tokens(),
        val_tokens: val_manifest.tokens(),
        sources: sources_of(&streams, &lengths),
        reused: false,
        input_bytes,
        seconds: started.elapsed().as_secs_f64(),
        skipped: progress.streams.values().map(|s| s.skipped).sum(),
        duplicates: progress.streams.values().map(|s| s.duplicates).sum(),
    })
}

/// Token files given as inputs, as a stream of their whole contents (read in place, not
/// copied), each checked against the tokenizer's vocabulary.
fn token_files(inputs: &[Input], tokenizer: &TextTokenizer) -> Result<Manifest, String> {
    let mut segments = Vec::new();
    for input in inputs {
        let shard = Shard::open_any(&input.path)?;
        if let Some(max) = shard.max_token().filter(|&m| m as usize >= tokenizer.vocab_size()) {
            return Err(format!(
                "{} holds token id {max}, past the tokenizer's {} ids: set data.tokenizer to the tokenizer that wrote it",
                input.path.display(),
                tokenizer.vocab_size()
            ));
        }
        let file = std::path::absolute(&input.path).map_err(|e| format!("{}: {e}", input.path.display()))?;
        segments.push(Segment { file: file.display().to_string(), start: 0, len: shard.len(), external: true });
    }
    Ok(Manifest { segments })
}

/// Remove the shards, manifests and progress of an earlier preparation.
fn remove_shards(data_dir: &Path) -> std::io::Result<()> {
    let Ok(entries) = std::fs::read_dir(data_dir) else { return Ok(()) };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let stem = name.strip_prefix('.').unwrap_or(name);
        let ours = (stem.starts_with("train") || stem.starts_with("val") || stem.starts_with("mix-"))
            && (name.ends_with(".bin") || name.ends_with(".json") || name.ends_with(".tmp"));
        if path.is_file() && (ours || name == "progress.json") {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// The text the tokenizer is trained on: the first `data.tokenizer_sample_mb` megabytes of
/// the training documents, as pieces (each mixture source its weight's share of them).
fn sample(streams: &[TrainStream], d: &DataSection) -> Result<Vec<String>, String> {
    let limit = d.tokenizer_sample_mb.saturating_mul(1 << 20) as f64;
    let total_weight: f64 = streams.iter().map(|s| s.weight).sum();
    let mut sample = Vec::new();
    for s in streams {
        let share = (limit * s.weight / total_weight) as usize;
        sample.extend(sample_pieces(share, &mut |emit| s.docs.for_each_piece(d, &Default::default(), emit).map(|_| ()))?);
    }
    Ok(sample)
}

/// The first `limit_mb` megabytes of text of `inputs`, as pieces (what `furnace data tokenizer`
/// trains on).
pub fn sample_inputs(inputs: &[Input], options: TextOptions<'_>, limit_mb: usize) -> Result<Vec<String>, String> {
    sample_pieces(limit_mb.saturating_mul(1 << 20), &mut |emit| {
        let mut reading = Reading::new(false);
        inputs.iter().try_for_each(|input| inputs::for_each_piece(input, options, &Default::default(), &mut reading, emit))
    })
}

type PieceSource<'a> = dyn FnMut(&mut dyn FnMut(Piece) -> Result<(), String>) -> Result<(), String> + 'a;

/// The pieces `source` emits until `limit` bytes are taken; the rest is not read.
fn sample_pieces(limit: usize, source: &mut PieceSource<'_>) -> Result<Vec<String>, String> {
    let (mut sample, mut bytes) = (Vec::new(), 0);
    let full = "sample complete";
    let read = source(&mut |piece| {
        if bytes >= limit {
            return Err(full.to_string());
        }
        bytes += piece.text.len();
        sample.push(piece.text);
        Ok(())
    });
    match read {
        Err(e) if e != full => Err(e),
        _ => Ok(sample),
    }
}

/// The inputs' names, sizes and modification times: prepared data of changed files is rebuilt.
fn inputs_stamp<'a>(docs: impl Iterator<Item = &'a Documents>) -> String {
    let mut stamp = String::new();
    for input in docs.flat_map(Documents::inputs) {
        let meta = std::fs::metadata(&input.path).ok();
        let modified = meta.as_ref().and_then(|m| m.modified().ok()).and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        stamp += &format!("# {} {} {}\n", input.path.display(), meta.map_or(0, |m| m.len()), modified.map_or(0, |t| t.as_nanos()));
    }
    stamp
}

/// The special tokens the recipe's model needs from a tokenizer trained for it.
pub fn extra_tokens(recipe: &Recipe) -> ExtraTokens {
    match recipe.model.arch() {
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

    #[test]
    fn held_out_tokens_start_at_a_document_near_the_cut_else_exactly_there() {
        // Many documents (one every 10 tokens): the tail starts at the document start nearest
        // to the last 5%.
        assert_eq!(held_out_start(1000, 0.05, |i| i % 10 == 0), 950);
        assert_eq!(held_out_start(1000, 0.052, |i| i % 10 == 0), 950);
        // One long document (a book in one file): exactly the last 10% of its tokens.
        assert_eq!(held_out_start(1000, 0.1, |i| i == 0), 900);
        // At least one token each side.
        assert_eq!(held_out_start(2, 0.01, |_| false), 1);
    }

    fn recipe_for(files: &[&Path], out: &Path) -> Recipe {
        let mut recipe = Recipe::default();
        recipe.data.source = DataSource::Files;
        recipe.data.files = files.iter().map(|f| f.display().to_string()).collect();
        recipe.data.tokenizer_vocab_size = 300;
        recipe.run.output_dir = out.display().to_string();
        recipe
    }

    fn stream(manifest: &Path) -> Vec<u32> {
        let tokens = Tokens::open(manifest).unwrap();
        (0..tokens.len()).map(|i| tokens.get(i)).collect()
    }

    #[test]
    fn an_interrupted_preparation_continues_at_its_last_complete_shard() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.jsonl");
        let lines: String = (0..400).map(|i| format!("{{\"text\": \"record {i} says {} things\"}}\n", i * 13 % 101)).collect();
        std::fs::write(&corpus, lines).unwrap();
        let whole = dir.path().join("whole");
        let mut recipe = recipe_for(&[&corpus], &whole);
        recipe.data.shard_tokens = 500;
        let reference = prepare(&recipe, &whole).unwrap();
        assert!(!reference.reused && reference.train_tokens > 2000, "{}", reference.train_tokens);
        assert!(whole.join("data/train-00003.bin").is_file() && !whole.join("data/progress.json").exists());

        // The third shard cannot be written (a folder holds its name): the run stops after two.
        let cut_short = dir.path().join("cut");
        std::fs::create_dir_all(cut_short.join("data/train-00002.bin")).unwrap();
        let err = prepare(&recipe, &cut_short).map(|_| ()).unwrap_err();
        assert!(err.contains("cannot write prepared data"), "{err}");
        let progress: Progress = serde_json::from_str(&std::fs::read_to_string(cut_short.join("data/progress.json")).unwrap()).unwrap();
        assert_eq!(progress.streams["train"].shards.len(), 2);
        std::fs::remove_dir(cut_short.join("data/train-00002.bin")).unwrap();
        let continued = prepare(&recipe, &cut_short).unwrap();
        assert_eq!((continued.train_tokens, continued.val_tokens), (reference.train_tokens, reference.val_tokens));
        assert_eq!(stream(&continued.train), stream(&reference.train));
        assert_eq!(stream(&continued.val), stream(&reference.val));
        assert_eq!(std::fs::read(&continued.tokenizer_path).unwrap(), std::fs::read(&reference.tokenizer_path).unwrap());
        // Unchanged inputs: reused; a changed input: prepared again.
        assert!(prepare(&recipe, &cut_short).unwrap().reused);
        std::fs::write(&corpus, "{\"text\": \"a different corpus, short but long enough to hold out a part\"}\n").unwrap();
        assert!(!prepare(&recipe, &cut_short).unwrap().reused);
    }

    #[test]
    fn generated_documents_are_end_of_text_then_their_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut recipe = Recipe::default();
        recipe.data.num_examples = 200;
        recipe.data.num_val_examples = 20;
        let prepared = prepare(&recipe, dir.path()).unwrap();
        let config = arithmetic_config(&recipe.data);
        let expected: Vec<u32> = arithmetic(&config, 20, val_seed(recipe.run.seed), true)
            .iter()
            .flat_map(|p| std::iter::once(prepared.tokenizer.eos()).chain(prepared.tokenizer.encode(&p.text())))
            .collect();
        assert_eq!(stream(&prepared.val), expected);
    }
}
