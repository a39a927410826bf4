//! Training batches, visited in an order shuffled from (seed, epoch), split across ranks, with a
//! cursor that a checkpoint saves and restores. Items are either packed windows (the token
//! stream cut into windows of seq_len+1 tokens: input and shifted target), labelled examples
//! (SFT: one conversation per row, padded, targets only where the loss counts) or
//! encoder-decoder pairs (the encoder's input rows beside the decoder's).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::chat::{LabeledPair, LabeledTokens};
use crate::seq2seq::Seq2SeqExample;
use crate::shards::Tokens;
use furnace_core::rng::{derive_seed, SeededRng, Stream};

/// Target id of a position the loss ignores (padding, prompts).
pub const IGNORE: i64 = -1;

/// Where the loader is: which epoch and how many of this rank's windows it has consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: usize,
}

/// A batch of `batch × seq_len` inputs and the targets one position later.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    pub batch: usize,
    pub seq_len: usize,
    /// The dataset index of each item in the batch (a pair fills two rows: chosen, rejected).
    pub items: Vec<usize>,
    /// Packed rows: each token's position in its own example (`[batch·seq_len]`), restarting at
    /// 0 where an example starts; None when each row holds one item.
    pub positions: Option<Vec<usize>>,
    /// Encoder-decoder batches: the encoder's input; `inputs` and `targets` are then the
    /// decoder's (the target behind the start token, and the target).
    pub encoder: Option<EncoderRows>,
}

/// The encoder's input of a batch: `batch × len` tokens, row r's first `lengths[r]` real and
/// the rest padding.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderRows {
    pub tokens: Vec<i64>,
    pub len: usize,
    pub lengths: Vec<usize>,
}

impl Batch {
    /// The positions with a target: what a loss over this batch averages over.
    pub fn counted_targets(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    /// Real (not padding) tokens read by the model: the encoder's and the decoder's targets
    /// for an encoder-decoder, every position otherwise.
    pub fn tokens(&self) -> usize {
        match &self.encoder {
            Some(encoder) => encoder.lengths.iter().sum::<usize>() + self.counted_targets(),
            None => self.batch * self.seq_len,
        }
    }
}

/// One source of a weighted mixture of token streams.
pub struct MixtureStream {
    pub name: String,
    pub tokens: Tokens,
    pub weight: f64,
    /// At most this many passes over the source per pass of the mixture; 0: no cap.
    pub epochs: usize,
}

struct Mixture {
    streams: Vec<MixtureStream>,
    /// Windows of each stream, and where each stream's items start.
    windows: Vec<usize>,
    starts: Vec<usize>,
}

impl Mixture {
    fn new(streams: Vec<MixtureStream>, seq_len: usize) -> Self {
        let windows: Vec<usize> = streams.iter().map(|s| s.tokens.len().saturating_sub(1) / seq_len).collect();
        let starts = windows.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        Self { streams, windows, starts }
    }

    /// The stream item `item` is a window of.
    fn stream_of(&self, item: usize) -> usize {
        self.starts.partition_point(|&s| s <= item) - 1
    }
}

enum Items {
    Windows(Tokens),
    /// Windows of several streams, drawn by weight; items index them one stream after another.
    Mixture(Mixture),
    /// Examples and the id that pads their rows.
    Examples(Vec<LabeledTokens>, u32),
    /// Preference pairs, two rows each, and the padding id.
    Pairs(Vec<LabeledPair>, u32),
    /// Encoder-decoder pairs and the id that pads rows and starts the decoder.
    Seq2Seq(Vec<Seq2SeqExample>, u32),
}

pub struct Loader {
    /// Shared with the thread that assembles the next batch ahead of its use.
    items: Arc<Items>,
    seq_len: usize,
    batch: usize,
    seed: u64,
    rank: usize,
    world: usize,
    shuffle: bool,
    cursor: Cursor,
    order: Arc<[usize]>,
    /// Examples packed several to a row (see [`Loader::with_packing`]).
    pack: bool,
    waited: Duration,
    /// Windows drawn from each mixture source since [`Loader::take_source_draws`].
    source_draws: Vec<u64>,
    /// The thread assembling the next batch while the step computes (started by the first
    /// [`Loader::next_batch`]).
    worker: Option<Worker>,
}

/// A thread that assembles batches ahead, as a PyTorch DataLoader's persistent worker: it is
/// sent a copy of the loader and sends it back advanced past one batch, with the batch. It ends
/// when its loader is dropped.
struct Worker {
    jobs: Sender<Loader>,
    done: Receiver<(Batch, Loader)>,
    /// The cursor the batch in progress starts at.
    busy_from: Option<Cursor>,
}

impl Worker {
    fn start() -> Option<Self> {
        let (jobs, inbox) = channel::<Loader>();
        let (outbox, done) = channel();
        let assemble = move || {
            while let Ok(mut loader) = inbox.recv() {
                let batch = loader.assemble_next();
                if outbox.send((batch, loader)).is_err() {
                    break;
                }
            }
        };
        std::thread::Builder::new().name("furnace-loader".into()).spawn(assemble).ok()?;
        Some(Self { jobs, done, busy_from: None })
    }

    /// The batch in progress, where it started and the loader advanced past it; None when
    /// there is none or the thread has ended (a panic there: assembling in line repeats it).
    fn finish(&mut self) -> Option<(Cursor, Batch, Loader)> {
        let from = self.busy_from.take()?;
        let (batch, advanced) = self.done.recv().ok()?;
        Some((from, batch, advanced))
    }
}

impl Loader {
    /// `rank`/`world` give this process its share: windows `rank, rank+world, ...` of each epoch's order.
    pub fn new(stream: Tokens, seq_len: usize, batch: usize, seed: u64, rank: usize, world: usize, shuffle: bool) -> Result<Self, String> {
        let tokens = stream.len();
        let loader = Self::with_items(Items::Windows(stream), seq_len, batch, seed, rank, world, shuffle);
        if loader.items() < batch * world {
            return Err(format!(
                "the data holds {tokens} tokens: too few for one batch of {batch} × {seq_len} on {world} rank(s); generate more examples or lower training.seq_len"
            ));
        }
        Ok(loader)
    }

    /// Packed windows drawn from weighted streams, as Megatron's blend draws them: each epoch's
    /// order gives source k its share `weight_k / Σ weight` of the positions at every prefix
    /// (the source furthest below its share goes next), and takes each source's windows in an
    /// order shuffled per pass over it (a small source is passed over again; `epochs` caps
    /// that). The order is a pure function of (seed, epoch), so the cursor resumes it exactly.
    pub fn mixture(
        streams: Vec<MixtureStream>,
        seq_len: usize,
        batch: usize,
        seed: u64,
        rank: usize,
        world: usize,
    ) -> Result<Self, String> {
        if let Some(s) = streams.iter().find(|s| s.tokens.len().saturating_sub(1) / seq_len == 0) {
            return Err(format!("data source \"{}\" holds {} tokens: too few for one window of {seq_len}", s.name, s.tokens.len()));
        }
        let loader = Self::with_items(Items::Mixture(Mixture::new(streams, seq_len)), seq_len, batch, seed, rank, world, true);
        if loader.order.len() < batch {
            return Err(format!("the mixture gives each rank {} windows: too few for one batch of {batch}", loader.order.len()));
        }
        Ok(loader)
    }

    /// Windows drawn from each mixture source since the last call, by name (none for other data).
    pub fn take_source_draws(&mut self) -> Vec<(String, u64)> {
        let Items::Mixture(mixture) = &*self.items else { return Vec::new() };
        let mut draws = std::mem::take(&mut self.source_draws);
        draws.resize(mixture.streams.len(), 0);
        mixture.streams.iter().map(|s| s.name.clone()).zip(draws).collect()
    }

    /// A mixture's items for `epoch`, before the split across ranks (see [`Loader::mixture`]).
    fn mixture_order(&self, epoch: u64) -> Vec<usize> {
        let Items::Mixture(Mixture { streams, windows, starts }) = &*self.items else { unreachable!("called for a mixture") };
        let total: usize = windows.iter().sum();
        let caps: Vec<usize> =
            streams.iter().zip(windows.iter()).map(|(s, &n)| if s.epochs == 0 { usize::MAX } else { s.epochs * n }).collect();
        let epoch_seed = derive_seed(self.seed, Stream::Shuffle, epoch);
        // Each source's windows in the order of its current pass.
        let pass_order = |k: usize, pass: usize| {
            let mut order: Vec<usize> = (0..windows[k]).collect();
            let mut rng = SeededRng::new(derive_seed(epoch_seed, Stream::MixturePass, ((k as u64) << 32) | pass as u64));
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
            order
        };
        let mut drawn = vec![0usize; streams.len()];
        let mut passes: Vec<Vec<usize>> = (0..streams.len()).map(|k| pass_order(k, 0)).collect();
        let mut order = Vec::with_capacity(total);
        for _ in 0..total {
            let next = (0..streams.len())
                .filter(|&k| drawn[k] < caps[k])
                .min_by(|&a, &b| (drawn[a] as f64 / streams[a].weight).total_cmp(&(drawn[b] as f64 / streams[b].weight)));
            let Some(k) = next else { break };
            let (pass, at) = (drawn[k] / windows[k], drawn[k] % windows[k]);
            if at == 0 && pass > 0 {
                passes[k] = pass_order(k, pass);
            }
            order.push(starts[k] + passes[k][at]);
            drawn[k] += 1;
        }
        order
    }

    /// One labelled example per row: inputs are its tokens, padded with `pad` to the batch's
    /// longest; targets are the next token where `trained`, [`IGNORE`] elsewhere. Longer
    /// examples are cut at `seq_len`.
    #[allow(clippy::too_many_arguments)]
    pub fn examples(
        examples: Vec<LabeledTokens>,
        pad: u32,
        seq_len: usize,
        batch: usize,
        seed: u64,
        rank: usize,
        world: usize,
        shuffle: bool,
    ) -> Result<Self, String> {
        Self::labelled(Items::Examples(examples, pad), "examples", seq_len, batch, seed, rank, world, shuffle)
    }

    /// Preference pairs: each fills two rows as [`Loader::examples`] does, chosen then
    /// rejected, so a batch of `batch` pairs has `2·batch` rows.
    #[allow(clippy::too_many_arguments)]
    pub fn pairs(
        pairs: Vec<LabeledPair>,
        pad: u32,
        seq_len: usize,
        batch: usize,
        seed: u64,
        rank: usize,
        world: usize,
        shuffle: bool,
    ) -> Result<Self, String> {
        Self::labelled(Items::Pairs(pairs, pad), "pairs", seq_len, batch, seed, rank, world, shuffle)
    }

    /// Encoder-decoder pairs, a batch of `batch` rows padded to its longest input and its
    /// longest target (each cut at `seq_len`); the decoder reads `pad` as its start token, as T5.
    #[allow(clippy::too_many_arguments)]
    pub fn seq2seq(
        examples: Vec<Seq2SeqExample>,
        pad: u32,
        seq_len: usize,
        batch: usize,
        seed: u64,
        rank: usize,
        world: usize,
        shuffle: bool,
    ) -> Result<Self, String> {
        Self::labelled(Items::Seq2Seq(examples, pad), "pairs", seq_len, batch, seed, rank, world, shuffle)
    }

    /// A loader over labelled items (`what` names them in errors), at least one batch of them.
    #[allow(clippy::too_many_arguments)]
    fn labelled(
        items: Items,
        what: &str,
        seq_len: usize,
        batch: usize,
        seed: u64,
        rank: usize,
        world: usize,
        shuffle: bool,
    ) -> Result<Self, String> {
        let loader = Self::with_items(items, seq_len, batch, seed, rank, world, shuffle);
        let count = loader.items();
        if count < batch * world {
            return Err(format!(
                "{count} {what}: too few for one batch of {batch} on {world} rank(s); add {what} or lower training.local_batch_size"
            ));
        }
        Ok(loader)
    }

    fn with_items(items: Items, seq_len: usize, batch: usize, seed: u64, rank: usize, world: usize, shuffle: bool) -> Self {
        let mut loader = Self {
            items: Arc::new(items),
            seq_len,
            batch,
            seed,
            rank,
            world,
            shuffle,
            cursor: Cursor::default(),
            order: Arc::new([]),
            pack: false,
            waited: Duration::ZERO,
            source_draws: Vec::new(),
            worker: None,
        };
        loader.order = loader.epoch_order(0);
        loader
    }

    /// Items in the whole dataset: windows, examples or pairs.
    pub fn items(&self) -> usize {
        match &*self.items {
            Items::Windows(shard) => shard.len().saturating_sub(1) / self.seq_len,
            Items::Mixture(mixture) => mixture.windows.iter().sum(),
            Items::Examples(examples, _) => examples.len(),
            Items::Pairs(pairs, _) => pairs.len(),
            Items::Seq2Seq(examples, _) => examples.len(),
        }
    }

    /// This rank's windows for `epoch`, shuffled by Fisher-Yates from (seed, epoch).
    fn epoch_order(&self, epoch: u64) -> Arc<[usize]> {
        let mut order: Vec<usize> = match *self.items {
            Items::Mixture(_) => self.mixture_order(epoch),
            _ => (0..self.items()).collect(),
        };
        if self.shuffle && !matches!(*self.items, Items::Mixture(_)) {
            let mut rng = SeededRng::new(derive_seed(self.seed, Stream::Shuffle, epoch));
            for i in (1..order.len()).rev() {
                order.swap(i, rng.below(i + 1));
            }
        }
        // Every rank gets as many items (as DistributedSampler with drop_last), so ranks keep
        // equal cursors and cross epochs together.
        order.truncate(order.len() / self.world * self.world);
        order.into_iter().skip(self.rank).step_by(self.world).collect()
    }

    /// SFT packing (TRL's padding-free packing): each row of examples takes as many whole
    /// examples as fit, in the epoch's order (one longer than a row is cut), and the batch gives
    /// each token's position in its example so the model resets attention and positions at each
    /// start. The cursor counts examples, so resume stays exact.
    pub fn with_packing(mut self, pack: bool) -> Self {
        self.pack = pack && matches!(*self.items, Items::Examples(..));
        self
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    pub fn set_cursor(&mut self, cursor: Cursor) {
        if cursor.epoch != self.cursor.epoch {
            self.order = self.epoch_order(cursor.epoch);
        }
        self.cursor = cursor;
    }

    /// The next batch. It was assembled on a thread while the last step computed (as a PyTorch
    /// DataLoader's worker prepares batches ahead), reading its windows from the shards, so a
    /// cold shard or a new epoch's order does not stall the step; the time this call takes is
    /// added to [`Loader::take_wait`]. The batches and the cursor are those of assembling each
    /// batch when asked: a copy of the loader assembles it from the same cursor.
    pub fn next_batch(&mut self) -> Batch {
        let started = Instant::now();
        let batch = match self.worker.as_mut().and_then(Worker::finish) {
            Some((from, batch, advanced)) if from == self.cursor => {
                self.advance_to(advanced);
                batch
            }
            // None ahead, or one from a cursor since moved.
            _ => self.assemble_next(),
        };
        self.assemble_ahead();
        self.waited += started.elapsed();
        batch
    }

    /// Have the worker assemble the batch after the cursor; where no thread runs, the next call
    /// assembles it in line.
    fn assemble_ahead(&mut self) {
        if self.worker.is_none() {
            self.worker = Worker::start();
        }
        let copy = Self {
            items: self.items.clone(),
            order: self.order.clone(),
            source_draws: Vec::new(),
            waited: Duration::ZERO,
            worker: None,
            ..*self
        };
        let Some(worker) = &mut self.worker else { return };
        match worker.jobs.send(copy) {
            Ok(()) => worker.busy_from = Some(self.cursor),
            Err(_) => self.worker = None,
        }
    }

    /// Take the cursor (and epoch order) of a copy that assembled the batch ahead, and count
    /// the windows it drew.
    fn advance_to(&mut self, advanced: Loader) {
        self.cursor = advanced.cursor;
        self.order = advanced.order;
        if self.source_draws.len() < advanced.source_draws.len() {
            self.source_draws.resize(advanced.source_draws.len(), 0);
        }
        for (total, drawn) in self.source_draws.iter_mut().zip(advanced.source_draws) {
            *total += drawn;
        }
    }

    /// Time spent assembling batches since the last call: what the step waited for data.
    pub fn take_wait(&mut self) -> Duration {
        std::mem::take(&mut self.waited)
    }

    fn assemble_next(&mut self) -> Batch {
        if self.pack {
            return self.next_packed_batch();
        }
        if let Items::Seq2Seq(..) = *self.items {
            return self.next_seq2seq_batch();
        }
        self.next_batch_of(self.batch)
    }

    /// The next `count` items as one batch, one item per row (never packed): the last batch of
    /// an evaluation over a set that the batch size does not divide.
    pub fn next_batch_of(&mut self, count: usize) -> Batch {
        let items: Vec<usize> = (0..count).map(|_| self.next_item()).collect();
        let seq_len = self.seq_len;
        // Labelled rows are padded to the batch's longest (as transformers' padding collators
        // do), cut at seq_len: the padding is masked, so only time changes.
        let longest = match &*self.items {
            Items::Windows(_) | Items::Mixture(_) => seq_len + 1,
            Items::Examples(examples, _) => items.iter().map(|&i| examples[i].tokens.len()).max().unwrap_or(0),
            Items::Pairs(pairs, _) => items.iter().map(|&i| pairs[i].0.tokens.len().max(pairs[i].1.tokens.len())).max().unwrap_or(0),
            Items::Seq2Seq(..) => unreachable!("encoder-decoder batches are built apart"),
        };
        // A row of n tokens gives n - 1 (input, target) positions.
        let row_len = longest.saturating_sub(1).clamp(1, seq_len);
        let rows = if matches!(*self.items, Items::Pairs(..)) { 2 * count } else { count };
        let mut inputs = Vec::with_capacity(rows * row_len);
        let mut targets = Vec::with_capacity(rows * row_len);
        let mut window = Vec::with_capacity(seq_len + 1);
        let labelled_row = |inputs: &mut Vec<i64>, targets: &mut Vec<i64>, example: &LabeledTokens, pad: u32| {
            let n = example.tokens.len().min(row_len + 1);
            for j in 0..row_len {
                inputs.push(if j + 1 < n { example.tokens[j] as i64 } else { pad as i64 });
                targets.push(if j + 1 < n && example.trained[j + 1] { example.tokens[j + 1] as i64 } else { IGNORE });
            }
        };
        for &item in &items {
            match &*self.items {
                Items::Windows(shard) => {
                    window.clear();
                    shard.read_into(item * seq_len, seq_len + 1, &mut window);
                    inputs.extend_from_slice(&window[..seq_len]);
                    targets.extend_from_slice(&window[1..]);
                }
                Items::Mixture(mixture) => {
                    let k = mixture.stream_of(item);
                    window.clear();
                    mixture.streams[k].tokens.read_into((item - mixture.starts[k]) * seq_len, seq_len + 1, &mut window);
                    inputs.extend_from_slice(&window[..seq_len]);
                    targets.extend_from_slice(&window[1..]);
                }
                Items::Examples(examples, pad) => labelled_row(&mut inputs, &mut targets, &examples[item], *pad),
                Items::Pairs(pairs, pad) => {
                    labelled_row(&mut inputs, &mut targets, &pairs[item].0, *pad);
                    labelled_row(&mut inputs, &mut targets, &pairs[item].1, *pad);
                }
                Items::Seq2Seq(..) => unreachable!("encoder-decoder batches are built apart"),
            }
        }
        Batch { inputs, targets, batch: rows, seq_len: row_len, items, positions: None, encoder: None }
    }

    /// The next item's index, starting a new epoch when this one is done.
    fn next_item(&mut self) -> usize {
        if self.cursor.position >= self.order.len() {
            self.set_cursor(Cursor { epoch: self.cursor.epoch + 1, position: 0 });
        }
        self.cursor.position += 1;
        let item = self.order[self.cursor.position - 1];
        if let Items::Mixture(mixture) = &*self.items {
            self.source_draws.resize(mixture.streams.len(), 0);
            self.source_draws[mixture.stream_of(item)] += 1;
        }
        item
    }

    fn next_seq2seq_batch(&mut self) -> Batch {
        let items: Vec<usize> = (0..self.batch).map(|_| self.next_item()).collect();
        let Items::Seq2Seq(examples, pad) = &*self.items else { unreachable!("called for encoder-decoder pairs") };
        let (pad, seq_len) = (*pad as i64, self.seq_len);
        let rows: Vec<&Seq2SeqExample> = items.iter().map(|&i| &examples[i]).collect();
        let lengths: Vec<usize> = rows.iter().map(|e| e.input.len().min(seq_len)).collect();
        let input_len = lengths.iter().copied().max().unwrap_or(1).max(1);
        let target_len = rows.iter().map(|e| e.target.len().min(seq_len)).max().unwrap_or(1).max(1);
        let (mut encoder, mut inputs, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        for example in &rows {
            encoder.extend((0..input_len).map(|j| example.input.get(j).map_or(pad, |&t| t as i64)));
            let target = &example.target[..example.target.len().min(seq_len)];
            for j in 0..target_len {
                inputs.push(match j {
                    0 => pad,
                    _ => target.get(j - 1).map_or(pad, |&t| t as i64),
                });
                targets.push(target.get(j).map_or(IGNORE, |&t| t as i64));
            }
        }
        Batch {
            inputs,
            targets,
            batch: self.batch,
            seq_len: target_len,
            items,
            positions: None,
            encoder: Some(EncoderRows { tokens: encoder, len: input_len, lengths }),
        }
    }

    fn next_packed_batch(&mut self) -> Batch {
        let seq_len = self.seq_len;
        let cells = self.batch * seq_len;
        let (mut inputs, mut targets, mut positions) = (Vec::with_capacity(cells), Vec::with_capacity(cells), Vec::with_capacity(cells));
        let mut items = Vec::new();
        for _ in 0..self.batch {
            let mut used = 0;
            while used < seq_len {
                if self.cursor.position >= self.order.len() {
                    self.set_cursor(Cursor { epoch: self.cursor.epoch + 1, position: 0 });
                }
                let item = self.order[self.cursor.position];
                let Items::Examples(examples, _) = &*self.items else { unreachable!("packing is for examples") };
                let example = &examples[item];
                // An example of n tokens gives n − 1 (input, target) positions.
                let length = example.tokens.len().saturating_sub(1).min(seq_len - used);
                if used > 0 && used + example.tokens.len().saturating_sub(1) > seq_len {
                    break;
                }
                for j in 0..length {
                    inputs.push(example.tokens[j] as i64);
                    targets.push(if example.trained[j + 1] { example.tokens[j + 1] as i64 } else { IGNORE });
                    positions.push(j);
                }
                used += length;
                items.push(item);
                self.cursor.position += 1;
            }
            let Items::Examples(_, pad) = &*self.items else { unreachable!("packing is for examples") };
            for j in 0..seq_len - used {
                inputs.push(*pad as i64);
                targets.push(IGNORE);
                positions.push(j);
            }
        }
        Batch { inputs, targets, batch: self.batch, seq_len, items, positions: Some(positions), encoder: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::LabeledTokens;
    use crate::shards::write_shard;

    fn loader(dir: &std::path::Path, rank: usize, world: usize) -> Loader {
        let path = dir.join("t.bin");
        if !path.exists() {
            write_shard(&path, &(0..1001).collect::<Vec<u32>>(), 2000).unwrap();
        }
        Loader::new(Tokens::whole(crate::Shard::open(&path).unwrap()), 10, 4, 9, rank, world, true).unwrap()
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let b = loader(dir.path(), 0, 1).next_batch();
        for row in 0..4 {
            assert_eq!(&b.inputs[row * 10 + 1..row * 10 + 10], &b.targets[row * 10..row * 10 + 9]);
        }
    }

    #[test]
    fn cursor_restores_the_exact_stream_across_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let mut straight = loader(dir.path(), 0, 1);
        let all: Vec<Batch> = (0..60).map(|_| straight.next_batch()).collect();
        let mut first = loader(dir.path(), 0, 1);
        (0..37).for_each(|_| drop(first.next_batch()));
        let mut resumed = loader(dir.path(), 0, 1);
        resumed.set_cursor(first.cursor());
        assert!(resumed.cursor().epoch >= 1, "test crosses an epoch boundary");
        assert_eq!((37..60).map(|_| resumed.next_batch()).collect::<Vec<_>>(), all[37..]);
    }

    /// Three sources of distinct token ranges (so a window tells its source): 0.5 / 0.3 / 0.2,
    /// the smallest source far smaller than its share (passed over again and again).
    fn mixture(dir: &std::path::Path, rank: usize, world: usize, epochs: [usize; 3]) -> Loader {
        let streams = [("web", 40_001u32, 0.5), ("books", 10_001, 0.3), ("code", 801, 0.2)]
            .iter()
            .enumerate()
            .map(|(k, &(name, len, weight))| {
                let path = dir.join(format!("{name}.bin"));
                if !path.exists() {
                    write_shard(&path, &vec![k as u32; len as usize], 10).unwrap();
                }
                MixtureStream { name: name.into(), tokens: Tokens::whole(crate::Shard::open(&path).unwrap()), weight, epochs: epochs[k] }
            })
            .collect();
        Loader::mixture(streams, 10, 4, 9, rank, world).unwrap()
    }

    #[test]
    fn a_mixture_draws_each_source_by_its_weight_and_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let mut loader = mixture(dir.path(), 0, 1, [0; 3]);
        let batches: Vec<Batch> = (0..2500).map(|_| loader.next_batch()).collect();
        // 10,000 sequences: each source's share within 1% of its weight.
        let mut counts = [0usize; 3];
        for b in &batches {
            for row in b.inputs.chunks(10) {
                counts[row[0] as usize] += 1;
                assert!(row.iter().all(|&t| t == row[0]), "a window never spans two sources");
            }
        }
        for (count, weight) in counts.iter().zip([0.5, 0.3, 0.2]) {
            assert!((*count as f64 / 10_000.0 - weight).abs() < 0.01, "{counts:?}");
        }
        let draws = loader.take_source_draws();
        assert_eq!(draws.iter().map(|(_, n)| *n as usize).collect::<Vec<_>>(), counts);
        assert_eq!(draws[2].0, "code");
        // A resumed loader continues with the same batches, past the mixture's first epoch.
        let mut first = mixture(dir.path(), 0, 1, [0; 3]);
        (0..1700).for_each(|_| drop(first.next_batch()));
        let mut resumed = mixture(dir.path(), 0, 1, [0; 3]);
        resumed.set_cursor(first.cursor());
        assert!(resumed.cursor().epoch >= 1, "the test crosses an epoch boundary");
        assert_eq!((1700..2500).map(|_| resumed.next_batch()).collect::<Vec<_>>(), batches[1700..]);
        // Two ranks: disjoint halves of the same order.
        let (mut r0, mut r1) = (mixture(dir.path(), 0, 2, [0; 3]), mixture(dir.path(), 1, 2, [0; 3]));
        let (b0, b1) = (r0.next_batch(), r1.next_batch());
        assert_ne!(b0.items, b1.items);
    }

    /// Batches assembled ahead on a thread are those assembled when asked, with the same cursor
    /// after each, across epochs and whatever moves the cursor in between.
    #[test]
    fn batches_assembled_ahead_are_those_assembled_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let compare = |mut ahead: Loader, mut in_line: Loader, steps: usize| {
            for step in 0..steps {
                if step == steps / 3 {
                    let back = Cursor { epoch: 0, position: 17 };
                    ahead.set_cursor(back);
                    in_line.set_cursor(back);
                }
                if step == steps / 2 {
                    assert_eq!(ahead.next_batch_of(3), in_line.next_batch_of(3));
                }
                assert_eq!(ahead.next_batch(), in_line.assemble_next(), "batch {step}");
                assert_eq!(ahead.cursor(), in_line.cursor(), "cursor after batch {step}");
                assert!(ahead.worker.as_ref().is_some_and(|w| w.busy_from.is_some()), "the next batch is being assembled");
            }
            assert!(ahead.cursor().epoch >= 1, "the test crosses an epoch boundary");
            assert_eq!(ahead.take_source_draws(), in_line.take_source_draws());
        };
        // 5,080 windows: 1,270 batches an epoch.
        compare(mixture(dir.path(), 0, 1, [0; 3]), mixture(dir.path(), 0, 1, [0; 3]), 2200);
        let examples: Vec<LabeledTokens> =
            (0..50u32).map(|i| LabeledTokens { tokens: (0..2 + i % 7).collect(), trained: vec![true; 2 + i as usize % 7] }).collect();
        let packed = || Loader::examples(examples.clone(), 0, 12, 2, 3, 0, 1, true).unwrap().with_packing(true);
        compare(packed(), packed(), 60);
    }

    #[test]
    fn a_mixture_source_capped_at_one_pass_is_not_repeated() {
        let dir = tempfile::tempdir().unwrap();
        let mut loader = mixture(dir.path(), 0, 1, [0, 0, 1]);
        let epoch = loader.order.len();
        let items: Vec<usize> = (0..epoch).map(|_| loader.next_item()).collect();
        let code: Vec<usize> = items.iter().copied().filter(|&i| i >= 4000 + 1000).collect();
        assert_eq!(code.len(), 80, "its 80 windows, once each");
        assert_eq!(code.iter().collect::<std::collections::BTreeSet<_>>().len(), 80);
    }

    #[test]
    fn examples_fill_rows_with_padding_and_ignored_targets() {
        let example = |tokens: Vec<u32>, trained: Vec<bool>| LabeledTokens { tokens, trained };
        let rows = vec![example(vec![1, 2, 3, 4], vec![false, false, true, true]), example((10..30).collect(), vec![true; 20])];
        let mut l = Loader::examples(rows, 0, 6, 2, 1, 0, 1, false).unwrap();
        let b = l.next_batch();
        assert_eq!(&b.inputs[..6], &[1, 2, 3, 0, 0, 0]);
        assert_eq!(&b.targets[..6], &[IGNORE, 3, 4, IGNORE, IGNORE, IGNORE]);
        assert_eq!(&b.inputs[6..], &[10, 11, 12, 13, 14, 15], "cut at seq_len");
        assert_eq!(&b.targets[6..], &[11, 12, 13, 14, 15, 16]);
    }

    #[test]
    fn packing_fills_rows_with_whole_examples_and_restarts_positions() {
        let example = |tokens: Vec<u32>| LabeledTokens { trained: vec![true; tokens.len()], tokens };
        // 4, 3 and 5 positions: a row of 8 takes the first two, the third starts the next row.
        let rows = vec![example(vec![1, 2, 3, 4, 5]), example(vec![6, 7, 8, 9]), example(vec![10, 11, 12, 13, 14, 15])];
        let mut l = Loader::examples(rows, 0, 8, 2, 1, 0, 1, false).unwrap().with_packing(true);
        let b = l.next_batch();
        assert_eq!(b.items, vec![0, 1, 2]);
        assert_eq!(b.inputs[..8], [1, 2, 3, 4, 6, 7, 8, 0]);
        assert_eq!(b.targets[..8], [2, 3, 4, 5, 7, 8, 9, IGNORE]);
        assert_eq!(b.positions.as_ref().unwrap()[..8], [0, 1, 2, 3, 0, 1, 2, 0]);
        assert_eq!(b.inputs[8..], [10, 11, 12, 13, 14, 0, 0, 0]);
        assert_eq!(b.positions.as_ref().unwrap()[8..], [0, 1, 2, 3, 4, 0, 1, 2]);
        // The cursor counts examples: the epoch is done, the next batch starts a new one.
        assert_eq!(l.cursor(), Cursor { epoch: 1, position: 0 });
        assert_eq!(l.next_batch().items[0], 0);
    }

    #[test]
    fn a_pair_fills_two_rows_chosen_first() {
        let example = |tokens: Vec<u32>| LabeledTokens { trained: vec![true; tokens.len()], tokens };
        let pairs = vec![(example(vec![1, 2, 3]), example(vec![1, 2, 4])), (example(vec![5, 6]), example(vec![5, 7]))];
        // seq_len 8: rows are padded to the batch's longest (3 tokens: 2 inputs), not to 8.
        let b = Loader::pairs(pairs.clone(), 0, 8, 2, 1, 0, 1, false).unwrap().next_batch();
        assert_eq!((b.batch, b.seq_len, b.items.clone()), (4, 2, vec![0, 1]));
        assert_eq!(&b.targets[..4], &[2, 3, 2, 4]);
        assert_eq!(&b.inputs[4..], &[5, 0, 5, 0]);
        assert_eq!(&b.targets[4..], &[6, IGNORE, 7, IGNORE]);
        // seq_len 1 cuts every row there.
        let b = Loader::pairs(pairs, 0, 1, 2, 1, 0, 1, false).unwrap().next_batch();
        assert_eq!((b.seq_len, &b.inputs[..], &b.targets[..]), (1, &[1, 1, 5, 5][..], &[2, 2, 6, 7][..]));
    }

    #[test]
    fn seq2seq_rows_pad_to_the_batch_and_shift_the_target_behind_the_start() {
        let pair = |input: Vec<u32>, target: Vec<u32>| Seq2SeqExample { input, target };
        let pairs = vec![pair(vec![5, 6, 7, 1], vec![8, 1]), pair(vec![9, 1], vec![10, 11, 12, 1])];
        let b = Loader::seq2seq(pairs, 0, 3, 2, 1, 0, 1, false).unwrap().next_batch();
        let encoder = b.encoder.as_ref().unwrap();
        assert_eq!((encoder.len, encoder.lengths.clone()), (3, vec![3, 2]), "inputs cut at seq_len");
        assert_eq!(encoder.tokens, [5, 6, 7, 9, 1, 0]);
        assert_eq!((b.batch, b.seq_len), (2, 3));
        assert_eq!(b.inputs, [0, 8, 1, 0, 10, 11], "the start token, then the target");
        assert_eq!(b.targets, [8, 1, IGNORE, 10, 11, 12]);
        assert_eq!((b.counted_targets(), b.tokens()), (5, 10));
    }

    #[test]
    fn epochs_are_reshuffled_and_ranks_disjoint() {
        let dir = tempfile::tempdir().unwrap();
        let l = loader(dir.path(), 0, 1);
        assert_ne!(l.epoch_order(0), l.epoch_order(1));
        let r0 = loader(dir.path(), 0, 2).epoch_order(0);
        let r1 = loader(dir.path(), 1, 2).epoch_order(0);
        assert!(r0.iter().all(|w| !r1.contains(w)));
        assert_eq!(r0.len() + r1.len(), 100);
    }
}
