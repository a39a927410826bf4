//! Decoder-only transformer: one module family for Llama (RMSNorm, RoPE, SwiGLU, GQA, no bias)
//! and GPT-2 (LayerNorm, learned positions, GELU, bias, tied head), with sliding-window
//! attention, ALiBi and parallel attention+MLP blocks as options, and Mixtral's sparse
//! mixture-of-experts MLPs (`mixtral.rs`).
//!
//! embed → blocks (pre-norm, two residuals) → final norm → head.

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use burn::tensor::module::embedding;

use crate::blocks::*;
use crate::causal_lm::CausalLm;
use crate::init::normal_param;
use crate::kernels::FusedOps;
use crate::lora::LinearLayers;
use crate::mixtral::{sparse_moe, Routing, SparseMoe};
use crate::model::Init;
use crate::paged::{PagedKv, PagedStep};
use furnace_core::params::f32_val;
use furnace_core::rng::SeededRng;

pub use furnace_core::arch::DecoderConfig;
pub use furnace_core::blocks::PositionKind;

impl Init for DecoderConfig {
    type Model<B: Backend> = Decoder<B>;

    fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> Decoder<B> {
        let mut rng = SeededRng::new(seed);
        let std = self.init_std;
        // GPT-2: residual projections scaled by 1/sqrt(2·n_layers).
        let out_std = std / (2.0 * self.n_layers as f64).sqrt();
        let embed_tokens = normal_param([self.vocab_size, self.d_model], std, &mut rng, device);
        let embed_positions =
            (self.position == PositionKind::Learned).then(|| normal_param([self.max_seq_len, self.d_model], std / 2.0, &mut rng, device));
        let layers = (0..self.n_layers)
            .map(|_| Block {
                attention_norm: Norm::new(self.norm, self.d_model, self.norm_eps, self.bias, device),
                attention: Attention::new(self.d_model, self.n_heads, self.kv_heads(), self.bias, std, out_std, &mut rng, device),
                ffn_norm: (!self.parallel_block).then(|| Norm::new(self.norm, self.d_model, self.norm_eps, self.bias, device)),
                feed_forward: match &self.moe {
                    Some(moe) => MlpLayer::Sparse(sparse_moe(moe, self.d_model, self.d_ff, std, out_std, &mut rng, device)),
                    None => MlpLayer::Dense(FeedForward::new(self.mlp, self.d_model, self.d_ff, self.bias, std, out_std, &mut rng, device)),
                },
                dropout: DropoutConfig::new(self.dropout).init(),
            })
            .collect();
        Decoder {
            embed_tokens,
            embed_positions,
            layers,
            norm: Norm::new(self.norm, self.d_model, self.norm_eps, self.bias, device),
            lm_head: (!self.tie_embeddings).then(|| Linear::new(self.d_model, self.vocab_size, false, std, &mut rng, device)),
            score: self.score_head.then(|| Linear::new(self.d_model, 1, false, std, &mut rng, device)),
            rope: (self.position == PositionKind::Rope).then(|| Rope::new(self.head_dim(), self.max_seq_len, self.rope_theta, device)),
            alibi_slopes: (self.position == PositionKind::Alibi).then(|| alibi_slopes(self.n_heads)),
            sliding_window: self.sliding_window,
            max_seq_len: self.max_seq_len,
            vocab_size: self.vocab_size,
            embed_dropout: DropoutConfig::new(self.dropout).init(),
        }
    }
}

/// A block's MLP: dense, or Mixtral's sparse mixture of experts.
#[derive(Module, Debug)]
pub enum MlpLayer<B: Backend> {
    Dense(FeedForward<B>),
    Sparse(SparseMoe<B>),
}

impl<B: FusedOps> MlpLayer<B> {
    /// The output, and a mixture's router logits.
    fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Option<Tensor<B, 2>>) {
        match self {
            Self::Dense(mlp) => (mlp.forward(x), None),
            Self::Sparse(moe) => {
                let (out, logits) = moe.forward(x);
                (out, Some(logits))
            }
        }
    }
}

/// Pre-norm transformer block with two residuals (or one, when parallel).
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attention_norm: Norm<B>,
    pub attention: Attention<B>,
    /// None in a parallel block: attention and MLP read the same normed input.
    pub ffn_norm: Option<Norm<B>>,
    pub feed_forward: MlpLayer<B>,
    pub dropout: Dropout,
}

impl<B: FusedOps> Block<B> {
    /// The block's output, and its router logits when its MLP is a mixture of experts.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
        cache: Option<LayerCache<'_, B>>,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 2>>) {
        let h = self.attention_norm.forward(x.clone());
        let attn = self.dropout.forward(self.attention.forward(h.clone(), ctx, cache));
        match &self.ffn_norm {
            None => {
                let (ff, router) = self.feed_forward.forward(h);
                (x + attn + self.dropout.forward(ff), router)
            }
            Some(ffn_norm) => {
                let x = x + attn;
                let (ff, router) = self.feed_forward.forward(ffn_norm.forward(x.clone()));
                (x + self.dropout.forward(ff), router)
            }
        }
    }
}

#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// `[vocab_size, d_model]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// `[max_seq_len, d_model]`, only with learned positions.
    pub embed_positions: Option<Param<Tensor<B, 2>>>,
    pub layers: Vec<Block<B>>,
    pub norm: Norm<B>,
    /// None when the head is tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    /// `[d_model, 1]`, reward models only.
    pub score: Option<Linear<B>>,
    pub rope: Option<Rope<B>>,
    #[module(skip)]
    pub alibi_slopes: Option<Vec<f32>>,
    pub sliding_window: usize,
    pub max_seq_len: usize,
    pub vocab_size: usize,
    pub embed_dropout: Dropout,
}

impl<B: Backend> LinearLayers<B> for Decoder<B> {
    fn linear_layers_mut(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out: Vec<(&'static str, &mut Linear<B>)> = Vec::new();
        for layer in &mut self.layers {
            out.extend(layer.attention.projections_mut());
            // Experts are weight tensors, not linear layers, in transformers' Mixtral, so PEFT's
            // targets (and so ours) stop at attention there.
            if let MlpLayer::Dense(ffn) = &mut layer.feed_forward {
                out.extend(ffn.projections_mut());
            }
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head", head));
        }
        out
    }
}

/// Where every layer keeps the keys and values of a forward that decodes.
pub(crate) enum DecoderCache<'a, B: Backend> {
    Contiguous(&'a mut KvCache<B>),
    Paged(&'a mut PagedKv<B>, &'a PagedStep),
}

/// Keys and values of every layer, passed to `forward_step` by the caller.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<LayerKv<B>>,
}

impl<B: Backend> KvCache<B> {
    /// Positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |(k, _)| k.dims()[1])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<B: FusedOps> Decoder<B> {
    /// Final hidden states `[batch, seq, d_model]` (after the final norm).
    pub fn forward_hidden(&self, tokens: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        self.hidden_states(tokens, cache, None).0
    }

    /// Final hidden states and the router logits of every MoE layer.
    fn hidden_states(
        &self,
        tokens: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
        packed: Option<&[usize]>,
    ) -> (Tensor<B, 3>, Vec<Tensor<B, 2>>) {
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let (x, ctx) = self.embed(tokens, offset, packed);
        self.blocks(x, &ctx, cache.map(DecoderCache::Contiguous))
    }

    /// The blocks and the final norm over embedded `x`: hidden states and the MoE layers' router logits.
    pub(crate) fn blocks(
        &self,
        mut x: Tensor<B, 3>,
        ctx: &AttentionContext<B>,
        mut cache: Option<DecoderCache<'_, B>>,
    ) -> (Tensor<B, 3>, Vec<Tensor<B, 2>>) {
        let mut router_logits = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = match &mut cache {
                None => None,
                Some(DecoderCache::Contiguous(c)) => Some(LayerCache::Contiguous(&mut c.layers[i])),
                Some(DecoderCache::Paged(kv, step)) => Some(LayerCache::Paged(&mut kv.layers[i], step)),
            };
            let (out, router) = layer.forward(x, ctx, layer_cache);
            x = out;
            router_logits.extend(router);
        }
        (self.norm.forward(x), router_logits)
    }

    /// The blocks' input (token and position embeddings) and what attention needs, for
    /// positions from `offset`. With `packed`, rows pack several sequences: `packed`
    /// (`[batch·seq]`) gives each token's position in its own sequence, restarting at 0 where one
    /// starts, and attention and positions reset there.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>, offset: usize, packed: Option<&[usize]>) -> (Tensor<B, 3>, AttentionContext<B>) {
        let [_, seq] = tokens.dims();
        assert!(offset + seq <= self.max_seq_len, "sequence of {} positions exceeds max_seq_len = {}", offset + seq, self.max_seq_len);
        if let Some(positions) = packed {
            let bias = packed_attention_bias(positions, seq, self.sliding_window, self.alibi_slopes.as_deref(), &tokens.device());
            return self.embed_at(tokens, positions, bias);
        }
        let mut x = embedding(f32_val(&self.embed_tokens), tokens.clone());
        if let Some(table) = &self.embed_positions {
            x = x + f32_val(table).narrow(0, offset, seq).unsqueeze::<3>();
        }
        let ctx = AttentionContext {
            rope: self.rope.as_ref().map(|r| r.slice(offset, seq)),
            bias: attention_bias(seq, offset, self.sliding_window, self.alibi_slopes.as_deref(), &tokens.device()),
        };
        (self.embed_dropout.forward(x), ctx)
    }

    /// [`Self::embed`] of tokens at the given `positions` (`[batch·seq]`), attending as `bias` allows.
    pub(crate) fn embed_at(
        &self,
        tokens: Tensor<B, 2, Int>,
        positions: &[usize],
        bias: Tensor<B, 4>,
    ) -> (Tensor<B, 3>, AttentionContext<B>) {
        let [batch, seq] = tokens.dims();
        let device = tokens.device();
        assert!(positions.iter().all(|&p| p < self.max_seq_len), "a position beyond max_seq_len = {}", self.max_seq_len);
        let ids = positions.iter().map(|&p| p as i64).collect::<Vec<_>>();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), &device);
        let mut x = embedding(f32_val(&self.embed_tokens), tokens);
        if let Some(table) = &self.embed_positions {
            x = x + embedding(f32_val(table), ids.clone());
        }
        let ctx = AttentionContext { rope: self.rope.as_ref().map(|r| r.gather(ids)), bias };
        (self.embed_dropout.forward(x), ctx)
    }

    /// Logits from the last block's output: the final norm, then the head.
    pub fn finish(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.head(self.norm.forward(x))
    }

    /// Logits for rows that pack several sequences (see `hidden_states`), each sequence
    /// computed as if alone in its row.
    pub fn forward_packed(&self, tokens: Tensor<B, 2, Int>, positions: &[usize]) -> Tensor<B, 3> {
        self.forward_routed(tokens, Some(positions)).0
    }

    /// Training's forward: logits (of packed rows when `packed` is given) and, for a
    /// mixture of experts, the routing its auxiliary losses need.
    pub fn forward_routed(&self, tokens: Tensor<B, 2, Int>, packed: Option<&[usize]>) -> (Tensor<B, 3>, Option<Routing<B>>) {
        let (hidden, logits) = self.hidden_states(tokens, None, packed);
        (self.head(hidden), self.routing(logits))
    }

    /// The routing of a pass from its MoE layers' router logits (None for a dense model).
    pub fn routing(&self, logits: Vec<Tensor<B, 2>>) -> Option<Routing<B>> {
        let top_k = self.layers.iter().find_map(|l| match &l.feed_forward {
            MlpLayer::Sparse(moe) => Some(moe.top_k),
            MlpLayer::Dense(_) => None,
        });
        top_k.map(|top_k| Routing { logits, top_k })
    }

    /// One scalar per row from the score head, read at `positions[row]` (the last token of
    /// each row's sequence): a reward model's output `[batch]`.
    pub fn scores(&self, tokens: Tensor<B, 2, Int>, positions: &[usize]) -> Tensor<B, 1> {
        let seq = tokens.dims()[1];
        let reads: Vec<usize> = positions.iter().enumerate().map(|(b, &p)| b * seq + p).collect();
        self.scores_at(self.forward_hidden(tokens, None), &reads)
    }

    /// Scores of sequences that share prefixes, each computed once: row tokens lie in branches
    /// (see [`branched_attention_bias`]) at `positions` (`[batch·seq]`), and each score is read
    /// at a token `reads[i]` (an index into `[batch·seq]`). A sequence's score equals
    /// [`Self::scores`] of it alone in a row.
    pub fn branched_scores(&self, tokens: Tensor<B, 2, Int>, positions: &[usize], branches: &[u32], reads: &[usize]) -> Tensor<B, 1> {
        let seq = tokens.dims()[1];
        let bias = branched_attention_bias(positions, branches, seq, self.sliding_window, self.alibi_slopes.as_deref(), &tokens.device());
        let (x, ctx) = self.embed_at(tokens, positions, bias);
        self.scores_at(self.blocks(x, &ctx, None).0, reads)
    }

    /// The score head on the hidden states `[batch, seq, d_model]` at flat token indices `reads`.
    fn scores_at(&self, hidden: Tensor<B, 3>, reads: &[usize]) -> Tensor<B, 1> {
        let score = self.score.as_ref().expect("scores need a model built with score_head");
        let [batch, seq, d_model] = hidden.dims();
        let device = hidden.device();
        let rows = Tensor::from_data(TensorData::new(reads.iter().map(|&r| r as i64).collect(), [reads.len()]), &device);
        score.forward(hidden.reshape([batch * seq, d_model]).select(0, rows)).reshape([reads.len()])
    }

    /// Logits `[batch, seq, vocab]` and one value per position `[batch, seq]` from the score
    /// head, from one pass: a policy with a value head (PPO).
    pub fn logits_and_values(&self, tokens: Tensor<B, 2, Int>) -> (Tensor<B, 3>, Tensor<B, 2>) {
        let score = self.score.as_ref().expect("values need a model built with score_head");
        let [batch, seq] = tokens.dims();
        let hidden = self.forward_hidden(tokens, None);
        let values = score.forward(hidden.clone()).reshape([batch, seq]);
        (self.head(hidden), values)
    }

    /// Logits over the vocabulary for hidden states `[batch, seq, d_model]`.
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        lm_logits(hidden, self.lm_head.as_ref(), &self.embed_tokens)
    }
}

impl<B: FusedOps> CausalLm<B> for Decoder<B> {
    type State = KvCache<B>;

    fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.head(self.forward_hidden(tokens, None))
    }

    fn init_state(&self) -> KvCache<B> {
        KvCache { layers: vec![None; self.layers.len()] }
    }

    fn forward_step(&self, tokens: Tensor<B, 2, Int>, state: &mut KvCache<B>) -> Tensor<B, 3> {
        self.head(self.forward_hidden(tokens, Some(state)))
    }

    fn rewind(&self, state: &mut KvCache<B>, len: usize) -> bool {
        for (keys, values) in state.layers.iter_mut().flatten() {
            let kept = len.min(keys.dims()[1]);
            *keys = keys.clone().narrow(1, 0, kept);
            *values = values.clone().narrow(1, 0, kept);
        }
        true
    }

    fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}
