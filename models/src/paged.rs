//! A paged KV cache (vLLM's PagedAttention): every layer's keys and values live in one pool of
//! fixed-size blocks, each sequence holds a table of its blocks, and attention reads keys and
//! values through the table. A sequence grows a block at a time without copying what it has,
//! and the blocks one sequence frees serve the next.
//!
//! Prefix caching: a full block is also keyed by the hash of its tokens and of every token
//! before it, so a sequence that starts with the same tokens (a shared system prompt) takes
//! those blocks instead of computing them again. Blocks are reference-counted; a block no
//! sequence holds stays cached until the pool needs it, least recently used first.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use burn::prelude::*;

use crate::kernels::{paged_attention, paged_kv_write, FusedOps};

/// Positions per block (vLLM's default).
pub const BLOCK_SIZE: usize = 16;

/// A sequence in a batch, as its caller numbers it.
pub type SeqId = u64;

/// The blocks of the pool: which are free, held (and by how many sequences), or cached.
#[derive(Debug)]
pub struct BlockPool {
    refs: Vec<u32>,
    /// The prefix hash of each cached block.
    hashes: Vec<Option<u64>>,
    cached: HashMap<u64, u32>,
    /// Blocks that were never cached or lost their hash, ready to use.
    free: Vec<u32>,
    /// Cached blocks no sequence holds, by last use: the first is evicted first.
    evictable: BTreeMap<u64, u32>,
    last_use: Vec<u64>,
    clock: u64,
    /// Keys the hashes, so that no client can choose token blocks that collide.
    hasher: RandomState,
}

impl BlockPool {
    pub fn new(blocks: usize) -> Self {
        Self {
            refs: vec![0; blocks],
            hashes: vec![None; blocks],
            cached: HashMap::new(),
            free: (0..blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            last_use: vec![0; blocks],
            clock: 0,
            hasher: RandomState::new(),
        }
    }

    pub fn blocks(&self) -> usize {
        self.refs.len()
    }

    /// Blocks some sequence holds.
    pub fn used(&self) -> usize {
        self.blocks() - self.free.len() - self.evictable.len()
    }

    /// Blocks a sequence could take now (free ones and cached ones no sequence holds).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// The prefix hash of a block of `tokens` after the block whose hash is `parent`.
    pub fn prefix_hash(&self, parent: Option<u64>, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        h.finish()
    }

    /// A free block, evicting the least recently used cached one if need be.
    fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(block) => block,
            None => {
                let (_, block) = self.evictable.pop_first()?;
                if let Some(hash) = self.hashes[block as usize].take() {
                    self.cached.remove(&hash);
                }
                block
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Takes the cached block of `hash`, if there is one.
    fn share(&mut self, hash: u64) -> Option<u32> {
        let block = *self.cached.get(&hash)?;
        if self.refs[block as usize] == 0 {
            self.evictable.remove(&self.last_use[block as usize]);
        }
        self.refs[block as usize] += 1;
        Some(block)
    }

    /// Records that `block`, now full, holds the prefix of `hash` (unless another block already does).
    fn register(&mut self, block: u32, hash: u64) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hashes[block as usize] = Some(hash);
        }
    }

    fn release(&mut self, block: u32) {
        let b = block as usize;
        self.refs[b] -= 1;
        if self.refs[b] > 0 {
            return;
        }
        if self.hashes[b].is_some() {
            self.clock += 1;
            self.last_use[b] = self.clock;
            self.evictable.insert(self.clock, block);
        } else {
            self.free.push(block);
        }
    }
}

/// One sequence's share of the cache.
#[derive(Debug)]
struct PagedSequence {
    table: Vec<u32>,
    /// The tokens whose keys and values the cache holds, in order.
    tokens: Vec<u32>,
    /// Prefix hashes of its full blocks.
    hashes: Vec<u64>,
}

/// One layer's pool: keys and values `[blocks · BLOCK_SIZE, kv_heads, head_dim]`. Taken out
/// while a step writes to it, so the write happens in place.
#[derive(Debug)]
pub struct PagedLayer<B: Backend> {
    pool: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
}

impl<B: FusedOps> PagedLayer<B> {
    /// Writes the step's keys and values `[1, tokens, kv_heads, head_dim]` into their slots,
    /// then attends with queries `[1, tokens, heads, head_dim]` through the block tables.
    pub fn attend(&mut self, q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, step: &PagedStep, scale: f32) -> Tensor<B, 4> {
        let (keys, values) = self.pool.take().expect("a layer's pool is back after every step");
        let keys = paged_kv_write(keys, k, &step.slots);
        let values = paged_kv_write(values, v, &step.slots);
        let out = paged_attention(q, keys.clone(), values.clone(), step, scale);
        self.pool = Some((keys, values));
        out
    }
}

/// What one forward over a paged cache reads and writes, the same for every layer.
#[derive(Debug, Clone)]
pub struct PagedStep {
    /// The step's sequences in order; their new tokens follow one another in the step's input.
    pub sequences: Vec<StepSequence>,
    /// The pool row each new token's keys and values go to, in input order.
    pub slots: Vec<usize>,
    pub block_size: usize,
    /// Keys at this distance or more are masked (0: no window).
    pub sliding_window: usize,
    /// ALiBi's slope per query head.
    pub alibi: Option<Vec<f32>>,
}

/// A sequence in a step: its block table, the positions it holds once the step has written,
/// and how many of them are the step's new tokens (the last ones).
#[derive(Debug, Clone)]
pub struct StepSequence {
    pub table: Vec<u32>,
    pub context: usize,
    pub queries: usize,
}

impl PagedStep {
    /// The pool row of a sequence's position.
    pub fn slot(&self, sequence: &StepSequence, position: usize) -> usize {
        sequence.table[position / self.block_size] as usize * self.block_size + position % self.block_size
    }

    /// The additive bias of a query at `position` for the key at `key` (masked: −∞) and head `head`.
    pub fn bias(&self, position: usize, key: usize, head: usize) -> f32 {
        let visible = key <= position && (self.sliding_window == 0 || position - key < self.sliding_window);
        crate::blocks::bias_value(visible, position.saturating_sub(key), self.alibi.as_ref().map(|s| s[head]))
    }
}

/// A transformer's batch: the pool of every layer and the sequences holding blocks of it.
#[derive(Debug)]
pub struct PagedKv<B: Backend> {
    pub(crate) layers: Vec<PagedLayer<B>>,
    pool: BlockPool,
    sequences: HashMap<SeqId, PagedSequence>,
    /// Prompt tokens looked up in the prefix cache, and those found.
    prefix_queries: u64,
    prefix_hits: u64,
}

impl<B: Backend> PagedKv<B> {
    /// `blocks` blocks for `layers` layers of `kv_heads` × `head_dim`.
    pub fn new(layers: usize, blocks: usize, kv_heads: usize, head_dim: usize, device: &B::Device) -> Self {
        let shape = [blocks * BLOCK_SIZE, kv_heads, head_dim];
        let layers = (0..layers).map(|_| PagedLayer { pool: Some((Tensor::zeros(shape, device), Tensor::zeros(shape, device))) }).collect();
        Self { layers, pool: BlockPool::new(blocks), sequences: HashMap::new(), prefix_queries: 0, prefix_hits: 0 }
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    /// (prompt tokens looked up in the prefix cache, tokens found there).
    pub fn prefix_stats(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    /// Starts sequence `id` with `prompt`, taking the cached blocks of its longest cached prefix
    /// of whole blocks: returns how many of its tokens are already computed. At least the last
    /// token is left to compute, since its logits are what the sequence needs next.
    pub fn add(&mut self, id: SeqId, prompt: &[u32]) -> usize {
        let mut seq = PagedSequence { table: Vec::new(), tokens: Vec::new(), hashes: Vec::new() };
        let whole = prompt.len().saturating_sub(1) / BLOCK_SIZE;
        for block in prompt.chunks(BLOCK_SIZE).take(whole) {
            let hash = self.pool.prefix_hash(seq.hashes.last().copied(), block);
            let Some(shared) = self.pool.share(hash) else { break };
            seq.table.push(shared);
            seq.hashes.push(hash);
            seq.tokens.extend_from_slice(block);
        }
        self.prefix_queries += prompt.len() as u64;
        self.prefix_hits += seq.tokens.len() as u64;
        let cached = seq.tokens.len();
        self.sequences.insert(id, seq);
        cached
    }

    /// Makes room for `n` more tokens of sequence `id`: false, with nothing taken, when the pool
    /// has too few blocks.
    pub fn reserve(&mut self, id: SeqId, n: usize) -> bool {
        let seq = self.sequences.get_mut(&id).expect("a sequence is added before it steps");
        let needed = (seq.tokens.len() + n).div_ceil(BLOCK_SIZE).saturating_sub(seq.table.len());
        if needed > self.pool.available() {
            return false;
        }
        for _ in 0..needed {
            seq.table.push(self.pool.allocate().expect("counted as available"));
        }
        true
    }

    /// Ends sequence `id`: its blocks go back to the pool (full ones stay cached).
    pub fn remove(&mut self, id: SeqId) {
        if let Some(seq) = self.sequences.remove(&id) {
            for block in seq.table {
                self.pool.release(block);
            }
        }
    }

    /// The plan of a step in which each entry's sequence reads its tokens (room reserved).
    pub(crate) fn plan(&self, entries: &[(SeqId, &[u32])], sliding_window: usize, alibi: Option<Vec<f32>>) -> PagedStep {
        let mut step = PagedStep { sequences: Vec::new(), slots: Vec::new(), block_size: BLOCK_SIZE, sliding_window, alibi };
        for &(id, tokens) in entries {
            let seq = &self.sequences[&id];
            let start = seq.tokens.len();
            let sequence = StepSequence { table: seq.table.clone(), context: start + tokens.len(), queries: tokens.len() };
            assert!(sequence.context <= sequence.table.len() * BLOCK_SIZE, "room is reserved before a step");
            let slots: Vec<usize> = (start..sequence.context).map(|p| step.slot(&sequence, p)).collect();
            step.slots.extend(slots);
            step.sequences.push(sequence);
        }
        step
    }

    /// Records that the entries' tokens are now cached; blocks they fill join the prefix cache.
    pub(crate) fn advance(&mut self, entries: &[(SeqId, &[u32])]) {
        for &(id, tokens) in entries {
            let seq = self.sequences.get_mut(&id).expect("a stepped sequence");
            seq.tokens.extend_from_slice(tokens);
            while seq.hashes.len() < seq.tokens.len() / BLOCK_SIZE {
                let i = seq.hashes.len();
                let hash = self.pool.prefix_hash(seq.hashes.last().copied(), &seq.tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
                self.pool.register(seq.table[i], hash);
                seq.hashes.push(hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reused_shared_and_evicted_least_recently_used_first() {
        type F = burn::backend::Flex;
        let mut kv = PagedKv::<F>::new(1, 4, 1, 2, &Default::default());
        let prompt: Vec<u32> = (0..40).collect();
        // 40 tokens: 3 blocks, the last partly full.
        assert_eq!(kv.add(1, &prompt), 0);
        assert!(kv.reserve(1, 40));
        assert_eq!(kv.pool().used(), 3);
        kv.advance(&[(1, &prompt)]);
        // The same prompt shares the two full blocks; its last token is always computed.
        assert_eq!(kv.add(2, &prompt), 32);
        assert_eq!(kv.pool().used(), 3);
        assert!(kv.reserve(2, 8), "one more block for the rest");
        assert!(!kv.reserve(2, 17), "the pool is full");
        assert_eq!(kv.pool().available(), 0);
        kv.remove(1);
        kv.remove(2);
        assert_eq!((kv.pool().used(), kv.pool().available()), (0, 4));
        // A prompt of exactly two blocks finds only the first: its last token is computed again.
        assert_eq!(kv.add(3, &prompt[..32]), 16);
        kv.remove(3);
        // A new prompt takes the free blocks first, then evicts the cached ones, oldest first.
        let other: Vec<u32> = (100..164).collect();
        assert_eq!(kv.add(4, &other), 0);
        assert!(kv.reserve(4, 64));
        kv.advance(&[(4, &other)]);
        assert_eq!(kv.add(5, &prompt), 0, "the old prompt's blocks were evicted");
        assert_eq!(kv.prefix_stats(), (40 + 40 + 32 + 64 + 40, 32 + 16));
    }
}
