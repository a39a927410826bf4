//! Encoder-only transformer (BERT, Devlin et al., 2019), as transformers' `BertForMaskedLM`:
//! token + learned position + token-type embeddings and a LayerNorm; post-norm blocks of
//! bidirectional attention and an exact-GELU MLP; the masked-LM head (dense → GELU →
//! LayerNorm → the tied token embedding, plus a bias).
//!
//! embed → blocks (each residual followed by its norm) → MLM head.

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::embedding;

use crate::blocks::*;
use crate::init::{constant_param, normal_param};
use crate::kernels::FusedOps;
use crate::lora::LinearLayers;
use crate::model::Init;
pub use furnace_core::arch::BertConfig;
use furnace_core::params::f32_val;
use furnace_core::rng::SeededRng;

impl Init for BertConfig {
    type Model<B: Backend> = Bert<B>;

    fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> Bert<B> {
        let mut rng = SeededRng::new(seed);
        let (d, std) = (self.d_model, self.init_std);
        let layer_norm = || Norm::new(NormKind::LayerNorm, d, self.norm_eps, true, device);
        let embed_tokens = normal_param([self.vocab_size, d], std, &mut rng, device);
        let embed_positions = normal_param([self.max_seq_len, d], std, &mut rng, device);
        let embed_token_types = normal_param([self.type_vocab_size, d], std, &mut rng, device);
        let layers = (0..self.n_layers)
            .map(|_| EncoderBlock {
                attention: Attention::new(d, self.n_heads, self.n_heads, true, std, std, &mut rng, device),
                attention_norm: layer_norm(),
                feed_forward: FeedForward::new(MlpKind::GeluExact, d, self.d_ff, true, std, std, &mut rng, device),
                ffn_norm: layer_norm(),
                dropout: DropoutConfig::new(self.dropout).init(),
            })
            .collect();
        Bert {
            embed_tokens,
            embed_positions,
            embed_token_types,
            embed_norm: layer_norm(),
            layers,
            mlm_dense: Linear::new(d, d, true, std, &mut rng, device),
            mlm_norm: layer_norm(),
            mlm_bias: constant_param([self.vocab_size], 0.0, device),
            embed_dropout: DropoutConfig::new(self.dropout).init(),
            max_seq_len: self.max_seq_len,
            vocab_size: self.vocab_size,
        }
    }
}

/// Post-norm block: each sub-layer's output is added to its input and then normalised.
#[derive(Module, Debug)]
pub struct EncoderBlock<B: Backend> {
    pub attention: Attention<B>,
    pub attention_norm: Norm<B>,
    pub feed_forward: FeedForward<B>,
    pub ffn_norm: Norm<B>,
    pub dropout: Dropout,
}

impl<B: FusedOps> EncoderBlock<B> {
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &AttentionContext<B>) -> Tensor<B, 3> {
        let x = self.attention_norm.forward(x.clone() + self.dropout.forward(self.attention.forward(x, ctx, None)));
        self.ffn_norm.forward(x.clone() + self.dropout.forward(self.feed_forward.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct Bert<B: Backend> {
    /// `[vocab_size, d_model]`, also the MLM head's output matrix.
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// `[max_seq_len, d_model]`.
    pub embed_positions: Param<Tensor<B, 2>>,
    /// `[type_vocab_size, d_model]`.
    pub embed_token_types: Param<Tensor<B, 2>>,
    pub embed_norm: Norm<B>,
    pub layers: Vec<EncoderBlock<B>>,
    /// The MLM head's transform: dense, GELU, LayerNorm.
    pub mlm_dense: Linear<B>,
    pub mlm_norm: Norm<B>,
    /// `[vocab_size]`, added to the logits.
    pub mlm_bias: Param<Tensor<B, 1>>,
    pub embed_dropout: Dropout,
    pub max_seq_len: usize,
    pub vocab_size: usize,
}

impl<B: FusedOps> Bert<B> {
    /// Final hidden states `[batch, seq, d_model]`; every token sees every other (no padding:
    /// rows are full windows or a single prompt).
    pub fn forward_hidden(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let (x, ctx) = self.embed(tokens);
        self.layers.iter().fold(x, |x, layer| layer.forward(x, &ctx))
    }

    /// The first block's input (token, position and segment embeddings, normed) and the
    /// attention context of full attention.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> (Tensor<B, 3>, AttentionContext<B>) {
        let [_, seq] = tokens.dims();
        let device = tokens.device();
        assert!(seq <= self.max_seq_len, "sequence of {seq} positions exceeds max_seq_len = {}", self.max_seq_len);
        let positions = f32_val(&self.embed_positions).narrow(0, 0, seq).unsqueeze::<3>();
        let segment = f32_val(&self.embed_token_types).narrow(0, 0, 1).unsqueeze::<3>();
        let x = self.embed_norm.forward(embedding(f32_val(&self.embed_tokens), tokens) + positions + segment);
        let ctx = AttentionContext { rope: None, bias: Tensor::zeros([1, 1, seq, seq], &device) };
        (self.embed_dropout.forward(x), ctx)
    }

    /// Masked-LM logits from the last block's output.
    pub fn finish(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = self.mlm_norm.forward(gelu(self.mlm_dense.forward(hidden)));
        lm_logits(hidden, None, &self.embed_tokens) + f32_val(&self.mlm_bias).unsqueeze::<3>()
    }

    /// Masked-LM logits `[batch, seq, vocab]` at every position.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.finish(self.forward_hidden(tokens))
    }

    /// The `top_k` likeliest tokens, with their probabilities, at each position of `tokens`
    /// holding `mask` (what transformers' fill-mask pipeline returns), in position order.
    pub fn fill_mask(&self, tokens: &[u32], mask: u32, top_k: usize, device: &B::Device) -> Vec<Vec<(u32, f32)>> {
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let logits = self.forward(Tensor::from_data(TensorData::new(ids, [1, tokens.len()]), device));
        let probs: Vec<f32> = softmax(logits, 2).into_data().convert::<f32>().into_vec().expect("f32 probabilities");
        tokens
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == mask)
            .map(|(position, _)| {
                let row = &probs[position * self.vocab_size..(position + 1) * self.vocab_size];
                let mut ranked: Vec<(u32, f32)> = row.iter().enumerate().map(|(id, &p)| (id as u32, p)).collect();
                ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
                ranked.truncate(top_k);
                ranked
            })
            .collect()
    }
}

impl<B: Backend> LinearLayers<B> for Bert<B> {
    fn linear_layers_mut(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out: Vec<(&'static str, &mut Linear<B>)> = Vec::new();
        for layer in &mut self.layers {
            out.extend(layer.attention.projections_mut());
            out.extend(layer.feed_forward.projections_mut());
        }
        out
    }
}
