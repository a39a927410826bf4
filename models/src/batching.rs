//! Continuous batching (Orca's iteration-level scheduling): sequences at different lengths
//! decode together, one token each per step; a sequence joins after its own prefill and leaves
//! when it is done, between steps. Each row's logits equal those of the sequence decoded alone.
//!
//! A transformer's batch keeps every row's keys and values left-padded to the longest row, so a
//! step appends one column for all rows at once; padded slots are masked out of attention and
//! each row's positions (RoPE, learned, ALiBi, sliding window) are its own. Mamba's rows are its
//! fixed-size recurrent states, stacked.

use burn::prelude::*;

use crate::blocks::bias_value;
use crate::causal_lm::CausalLm;
use crate::decoder::{Decoder, KvCache};
use crate::kernels::FusedOps;
use crate::mamba::{Mamba, MambaState};
use crate::model::{Causal, DecodeState, StateOf};

/// A model that decodes many sequences, each at its own length, in one forward per step.
pub trait BatchedDecoding<B: Backend>: CausalLm<B> {
    /// The rows' decoding states together.
    type Batch;

    fn empty_batch(&self) -> Self::Batch;

    /// Adds a row (the last) whose state a single-sequence prefill (`forward_step`) left.
    fn join(&self, batch: &mut Self::Batch, state: Self::State);

    /// Removes row `row`; the rows after it move up by one.
    fn leave(&self, batch: &mut Self::Batch, row: usize);

    /// Next-token logits `[rows, vocab]` after each row's `tokens[row]`; every row advances by one.
    fn step(&self, batch: &mut Self::Batch, tokens: &[u32]) -> Tensor<B, 2>;
}

/// A transformer's rows: every layer's keys and values `[rows, longest, kv_heads, head_dim]`,
/// row `i` in the last `lengths[i]` positions.
#[derive(Debug, Clone)]
pub struct DecoderBatch<B: Backend> {
    cache: KvCache<B>,
    lengths: Vec<usize>,
}

impl<B: Backend> DecoderBatch<B> {
    fn longest(&self) -> usize {
        self.cache.len()
    }
}

/// `t` `[rows, len, …]` with `pad` zero positions before its first.
fn left_pad<B: Backend>(t: Tensor<B, 4>, pad: usize) -> Tensor<B, 4> {
    if pad == 0 {
        return t;
    }
    let [rows, _, heads, dim] = t.dims();
    let zeros = Tensor::<B, 4>::zeros([rows, pad, heads, dim], &t.device()).cast(t.dtype());
    Tensor::cat(vec![zeros, t], 1)
}

/// `t` without row `row` (dimension 0).
fn without_row<B: Backend, const D: usize>(t: Tensor<B, D>, row: usize) -> Tensor<B, D> {
    let rows = t.dims()[0];
    let keep: Vec<i64> = (0..rows as i64).filter(|&r| r != row as i64).collect();
    let n = keep.len();
    t.clone().select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(keep, [n]), &t.device()))
}

impl<B: FusedOps> BatchedDecoding<B> for Decoder<B> {
    type Batch = DecoderBatch<B>;

    fn empty_batch(&self) -> DecoderBatch<B> {
        DecoderBatch { cache: self.init_state(), lengths: Vec::new() }
    }

    fn join(&self, batch: &mut DecoderBatch<B>, state: KvCache<B>) {
        let (longest, length) = (batch.longest(), state.len());
        let width = longest.max(length);
        for (ours, theirs) in batch.cache.layers.iter_mut().zip(state.layers) {
            let (k, v) = theirs.expect("a prefilled state holds every layer's keys and values");
            let (k, v) = (left_pad(k, width - length), left_pad(v, width - length));
            *ours = Some(match ours.take() {
                None => (k, v),
                Some((past_k, past_v)) => {
                    (Tensor::cat(vec![left_pad(past_k, width - longest), k], 0), Tensor::cat(vec![left_pad(past_v, width - longest), v], 0))
                }
            });
        }
        batch.lengths.push(length);
    }

    fn leave(&self, batch: &mut DecoderBatch<B>, row: usize) {
        batch.lengths.remove(row);
        // The padding every remaining row has goes too.
        let longest = batch.longest();
        let trim = longest - batch.lengths.iter().copied().max().unwrap_or(0);
        for layer in &mut batch.cache.layers {
            *layer = match (layer.take(), batch.lengths.is_empty()) {
                (Some((k, v)), false) => {
                    let (k, v) = (without_row(k, row), without_row(v, row));
                    Some((k.narrow(1, trim, longest - trim), v.narrow(1, trim, longest - trim)))
                }
                _ => None,
            };
        }
    }

    fn step(&self, batch: &mut DecoderBatch<B>, tokens: &[u32]) -> Tensor<B, 2> {
        let rows = tokens.len();
        assert_eq!(rows, batch.lengths.len(), "one token per row");
        let device = self.embed_tokens.device();
        let longest = batch.longest();
        // Row i's key slot j holds its position j − pad_i; the new token is slot `longest`.
        let heads = self.alibi_slopes.as_ref().map_or(1, Vec::len);
        let mut bias = Vec::with_capacity(rows * heads * (longest + 1));
        for &length in &batch.lengths {
            let pad = longest - length;
            for h in 0..heads {
                for slot in 0..=longest {
                    let visible = slot >= pad && (self.sliding_window == 0 || longest - slot < self.sliding_window);
                    let slope = self.alibi_slopes.as_ref().map(|s| s[h]);
                    bias.push(bias_value(visible, longest - slot, slope));
                }
            }
        }
        let bias = Tensor::from_data(TensorData::new(bias, [rows, heads, 1, longest + 1]), &device);
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, 1]), &device);
        let (x, ctx) = self.embed_at(tokens, &batch.lengths, bias);
        let hidden = self.blocks(x, &ctx, Some(&mut batch.cache)).0;
        for length in &mut batch.lengths {
            *length += 1;
        }
        self.head(hidden).reshape([rows, self.vocab_size])
    }
}

/// Mamba's rows: every layer's recurrent state, stacked on dimension 0.
#[derive(Debug, Clone)]
pub struct MambaBatch<B: Backend> {
    state: MambaState<B>,
    rows: usize,
}

impl<B: FusedOps> BatchedDecoding<B> for Mamba<B> {
    type Batch = MambaBatch<B>;

    fn empty_batch(&self) -> MambaBatch<B> {
        MambaBatch { state: self.init_state(), rows: 0 }
    }

    fn join(&self, batch: &mut MambaBatch<B>, state: MambaState<B>) {
        for (ours, theirs) in batch.state.layers.iter_mut().zip(state.layers) {
            let theirs = theirs.expect("a prefilled state holds every layer's state");
            *ours = Some(match ours.take() {
                None => theirs,
                Some(mut past) => {
                    past.conv = Tensor::cat(vec![past.conv, theirs.conv], 0);
                    past.ssm = Tensor::cat(vec![past.ssm, theirs.ssm], 0);
                    past
                }
            });
        }
        batch.rows += 1;
    }

    fn leave(&self, batch: &mut MambaBatch<B>, row: usize) {
        batch.rows -= 1;
        for layer in &mut batch.state.layers {
            *layer = match (layer.take(), batch.rows) {
                (Some(mut s), 1..) => {
                    s.conv = without_row(s.conv, row);
                    s.ssm = without_row(s.ssm, row);
                    Some(s)
                }
                _ => None,
            };
        }
    }

    fn step(&self, batch: &mut MambaBatch<B>, tokens: &[u32]) -> Tensor<B, 2> {
        let rows = tokens.len();
        assert_eq!(rows, batch.rows, "one token per row");
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, 1]), &self.embed_tokens.device());
        self.forward_step(tokens, &mut batch.state).reshape([rows, self.vocab_size])
    }
}

/// The rows of a [`Causal`] model.
#[derive(Debug, Clone)]
pub enum CausalBatch<B: Backend> {
    Decoder(DecoderBatch<B>),
    Mamba(MambaBatch<B>),
}

impl<B: FusedOps> BatchedDecoding<B> for Causal<'_, B> {
    type Batch = CausalBatch<B>;

    fn empty_batch(&self) -> CausalBatch<B> {
        match self {
            Self::Decoder(m) => CausalBatch::Decoder(m.empty_batch()),
            Self::Mamba(m) => CausalBatch::Mamba(m.empty_batch()),
        }
    }

    fn join(&self, batch: &mut CausalBatch<B>, state: DecodeState<B>) {
        match (self, batch, state.0) {
            (Self::Decoder(m), CausalBatch::Decoder(b), StateOf::Decoder(s)) => m.join(b, s),
            (Self::Mamba(m), CausalBatch::Mamba(b), StateOf::Mamba(s)) => m.join(b, s),
            // Batches and states are made by the same model's `empty_batch` and `init_state`.
            _ => unreachable!("a batch and a decoding state belong to the model that made them"),
        }
    }

    fn leave(&self, batch: &mut CausalBatch<B>, row: usize) {
        match (self, batch) {
            (Self::Decoder(m), CausalBatch::Decoder(b)) => m.leave(b, row),
            (Self::Mamba(m), CausalBatch::Mamba(b)) => m.leave(b, row),
            _ => unreachable!("a batch belongs to the model that made it"),
        }
    }

    fn step(&self, batch: &mut CausalBatch<B>, tokens: &[u32]) -> Tensor<B, 2> {
        match (self, batch) {
            (Self::Decoder(m), CausalBatch::Decoder(b)) => m.step(b, tokens),
            (Self::Mamba(m), CausalBatch::Mamba(b)) => m.step(b, tokens),
            _ => unreachable!("a batch belongs to the model that made it"),
        }
    }
}
