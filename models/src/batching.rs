//! Continuous batching (Orca's iteration-level scheduling): sequences at different lengths run
//! together, and each step is one forward over all of them, whatever each reads: a chunk of its
//! prompt (chunked prefill) or the token it sampled last. Sequences join and leave between
//! steps. Each sequence's logits equal those of the sequence decoded alone.
//!
//! A transformer's sequences keep their keys and values in a paged cache ([`PagedKv`]): the
//! step's tokens are one row, and attention reads each token's own sequence through its block
//! table. Mamba's sequences keep their fixed-size recurrent states, stacked for a step.

use std::collections::HashMap;

use burn::prelude::*;

use crate::causal_lm::CausalLm;
use crate::decoder::{Decoder, DecoderCache};
use crate::kernels::FusedOps;
use crate::mamba::{LayerState, Mamba, MambaState};
use crate::model::Causal;
use crate::paged::{PagedKv, SeqId, BLOCK_SIZE};

/// A model that runs many sequences, each at its own length, in one forward per step.
pub trait BatchedDecoding<B: Backend>: CausalLm<B> {
    type Batch: SequenceCache;

    /// An empty batch; a transformer's paged cache of `kv_blocks` blocks is allocated here,
    /// never grown (see [`Decoder::kv_cache_blocks`]).
    fn new_batch(&self, kv_blocks: usize) -> Self::Batch;

    /// Logits `[entries, vocab]` after the last token of each entry, where sequence `id` reads
    /// `tokens` after those it holds. Each entry's room is reserved first.
    fn step(&self, batch: &mut Self::Batch, entries: &[(SeqId, &[u32])]) -> Tensor<B, 2>;
}

/// The sequences a batch holds, and their cache.
pub trait SequenceCache {
    /// Starts sequence `id` with `prompt`: returns how many of its tokens the prefix cache
    /// already holds (the sequence reads the rest).
    fn add(&mut self, id: SeqId, prompt: &[u32]) -> usize;

    /// Makes room for `tokens` more tokens of sequence `id`: false, with nothing taken, when
    /// the cache is full.
    fn reserve(&mut self, id: SeqId, tokens: usize) -> bool;

    /// Ends sequence `id` and frees its share of the cache.
    fn remove(&mut self, id: SeqId);

    /// (blocks in use, blocks) of a paged cache; (0, 0) for recurrent states.
    fn blocks(&self) -> (usize, usize);

    /// (prompt tokens looked up in the prefix cache, tokens found there).
    fn prefix_stats(&self) -> (u64, u64);
}

impl<B: Backend> SequenceCache for PagedKv<B> {
    fn add(&mut self, id: SeqId, prompt: &[u32]) -> usize {
        PagedKv::add(self, id, prompt)
    }

    fn reserve(&mut self, id: SeqId, tokens: usize) -> bool {
        PagedKv::reserve(self, id, tokens)
    }

    fn remove(&mut self, id: SeqId) {
        PagedKv::remove(self, id)
    }

    fn blocks(&self) -> (usize, usize) {
        (self.pool().used(), self.pool().blocks())
    }

    fn prefix_stats(&self) -> (u64, u64) {
        PagedKv::prefix_stats(self)
    }
}

impl<B: FusedOps> Decoder<B> {
    /// Bytes of keys and values (f32) one position takes across all layers.
    pub fn kv_bytes_per_position(&self) -> usize {
        self.layers.iter().map(|l| 2 * 4 * l.attention.n_kv_heads * l.attention.head_dim).sum()
    }

    /// Blocks of a paged cache of `kv_cache_bytes`, no more than `max_sequences` could ever fill.
    pub fn kv_cache_blocks(&self, max_sequences: usize, kv_cache_bytes: usize) -> usize {
        let most = max_sequences * self.max_seq_len.div_ceil(BLOCK_SIZE);
        (kv_cache_bytes / (BLOCK_SIZE * self.kv_bytes_per_position())).min(most)
    }
}

impl<B: FusedOps> BatchedDecoding<B> for Decoder<B> {
    type Batch = PagedKv<B>;

    fn new_batch(&self, kv_blocks: usize) -> PagedKv<B> {
        let attention = &self.layers[0].attention;
        PagedKv::new(self.layers.len(), kv_blocks, attention.n_kv_heads, attention.head_dim, &self.embed_tokens.device())
    }

    fn step(&self, batch: &mut PagedKv<B>, entries: &[(SeqId, &[u32])]) -> Tensor<B, 2> {
        let device = self.embed_tokens.device();
        let step = batch.plan(entries, self.sliding_window, self.alibi_slopes.clone());
        let ids: Vec<i64> = entries.iter().flat_map(|(_, tokens)| tokens.iter().map(|&t| t as i64)).collect();
        let positions: Vec<usize> = step.sequences.iter().flat_map(|s| s.context - s.queries..s.context).collect();
        let total = ids.len();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, total]), &device);
        // The step masks attention by its block tables: no bias is built.
        let (x, ctx) = self.embed_at(tokens, &positions, Tensor::zeros([1, 1, 1, 1], &device));
        let hidden = self.blocks(x, &ctx, Some(DecoderCache::Paged(batch, &step))).0;
        batch.advance(entries);
        // Only each entry's last token needs logits.
        let lasts: Vec<i64> = step
            .sequences
            .iter()
            .scan(0, |end, s| {
                *end += s.queries;
                Some(*end as i64 - 1)
            })
            .collect();
        let rows = lasts.len();
        let lasts = Tensor::<B, 1, Int>::from_data(TensorData::new(lasts, [rows]), &device);
        self.head(hidden.select(1, lasts)).reshape([rows, self.vocab_size])
    }
}

/// Mamba's sequences: each one's recurrent state, by id.
#[derive(Debug)]
pub struct MambaBatch<B: Backend> {
    states: HashMap<SeqId, MambaState<B>>,
    layers: usize,
}

impl<B: Backend> SequenceCache for MambaBatch<B> {
    fn add(&mut self, id: SeqId, _prompt: &[u32]) -> usize {
        self.states.insert(id, MambaState { layers: vec![None; self.layers], len: 0 });
        0
    }

    /// A state's size is fixed: there is always room.
    fn reserve(&mut self, _id: SeqId, _tokens: usize) -> bool {
        true
    }

    fn remove(&mut self, id: SeqId) {
        self.states.remove(&id);
    }

    fn blocks(&self) -> (usize, usize) {
        (0, 0)
    }

    fn prefix_stats(&self) -> (u64, u64) {
        (0, 0)
    }
}

impl<B: FusedOps> BatchedDecoding<B> for Mamba<B> {
    type Batch = MambaBatch<B>;

    fn new_batch(&self, _kv_blocks: usize) -> MambaBatch<B> {
        MambaBatch { states: HashMap::new(), layers: self.layers.len() }
    }

    /// Entries that read one token after a started state run stacked, in one forward; the
    /// others (prompt chunks) one by one.
    fn step(&self, batch: &mut MambaBatch<B>, entries: &[(SeqId, &[u32])]) -> Tensor<B, 2> {
        let device = self.embed_tokens.device();
        let row = |tokens: &[u32]| {
            let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
            Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, tokens.len()]), &device)
        };
        let started = |id: &SeqId| batch.states[id].layers.iter().all(Option::is_some);
        let (stacked, alone): (Vec<usize>, Vec<usize>) =
            (0..entries.len()).partition(|&e| entries[e].1.len() == 1 && started(&entries[e].0));
        let mut logits: Vec<Option<Tensor<B, 2>>> = vec![None; entries.len()];
        for e in alone {
            let (id, tokens) = entries[e];
            let state = batch.states.get_mut(&id).expect("a sequence is added before it steps");
            let out = self.forward_step(row(tokens), state);
            logits[e] = Some(out.narrow(1, tokens.len() - 1, 1).reshape([1, self.vocab_size]));
        }
        if !stacked.is_empty() {
            let states: Vec<MambaState<B>> =
                stacked.iter().map(|&e| batch.states.remove(&entries[e].0).expect("an added sequence")).collect();
            let layers = (0..self.layers.len())
                .map(|l| {
                    let of = |pick: fn(&LayerState<B>) -> Tensor<B, 3>| {
                        Tensor::cat(states.iter().map(|s| pick(s.layers[l].as_ref().expect("a started state"))).collect(), 0)
                    };
                    Some(LayerState { conv: of(|s| s.conv.clone()), ssm: of(|s| s.ssm.clone()) })
                })
                .collect();
            let mut together = MambaState { layers, len: 0 };
            let tokens: Vec<u32> = stacked.iter().map(|&e| entries[e].1[0]).collect();
            let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
            let out = self.forward_step(Tensor::from_data(TensorData::new(ids, [tokens.len(), 1]), &device), &mut together);
            for (k, (&e, mut state)) in stacked.iter().zip(states).enumerate() {
                for (mine, ours) in state.layers.iter_mut().zip(&together.layers) {
                    let ours = ours.as_ref().expect("stepped layers hold their state");
                    *mine = Some(LayerState { conv: ours.conv.clone().narrow(0, k, 1), ssm: ours.ssm.clone().narrow(0, k, 1) });
                }
                state.len += 1;
                batch.states.insert(entries[e].0, state);
                logits[e] = Some(out.clone().narrow(0, k, 1).reshape([1, self.vocab_size]));
            }
        }
        Tensor::cat(logits.into_iter().map(|l| l.expect("every entry stepped")).collect(), 0)
    }
}

/// The sequences of a [`Causal`] model.
#[derive(Debug)]
pub enum CausalBatch<B: Backend> {
    Decoder(PagedKv<B>),
    Mamba(MambaBatch<B>),
}

impl<B: Backend> CausalBatch<B> {
    fn cache(&self) -> &dyn SequenceCache {
        match self {
            Self::Decoder(b) => b,
            Self::Mamba(b) => b,
        }
    }

    fn cache_mut(&mut self) -> &mut dyn SequenceCache {
        match self {
            Self::Decoder(b) => b,
            Self::Mamba(b) => b,
        }
    }
}

impl<B: Backend> SequenceCache for CausalBatch<B> {
    fn add(&mut self, id: SeqId, prompt: &[u32]) -> usize {
        self.cache_mut().add(id, prompt)
    }

    fn reserve(&mut self, id: SeqId, tokens: usize) -> bool {
        self.cache_mut().reserve(id, tokens)
    }

    fn remove(&mut self, id: SeqId) {
        self.cache_mut().remove(id)
    }

    fn blocks(&self) -> (usize, usize) {
        self.cache().blocks()
    }

    fn prefix_stats(&self) -> (u64, u64) {
        self.cache().prefix_stats()
    }
}

impl<B: FusedOps> BatchedDecoding<B> for Causal<'_, B> {
    type Batch = CausalBatch<B>;

    fn new_batch(&self, kv_blocks: usize) -> CausalBatch<B> {
        match self {
            Self::Decoder(m) => CausalBatch::Decoder(m.new_batch(kv_blocks)),
            Self::Mamba(m) => CausalBatch::Mamba(m.new_batch(kv_blocks)),
        }
    }

    fn step(&self, batch: &mut CausalBatch<B>, entries: &[(SeqId, &[u32])]) -> Tensor<B, 2> {
        match (self, batch) {
            (Self::Decoder(m), CausalBatch::Decoder(b)) => m.step(b, entries),
            (Self::Mamba(m), CausalBatch::Mamba(b)) => m.step(b, entries),
            // Batches are made by the same model's `new_batch`.
            _ => unreachable!("a batch belongs to the model that made it"),
        }
    }
}
