//! Encoder-decoder transformer (T5, Raffel et al., 2020), as transformers'
//! `T5ForConditionalGeneration`: a shared token embedding; an encoder of pre-norm blocks
//! (RMS norm, bidirectional self-attention, ReLU or gated-GELU MLP) and a decoder whose blocks
//! add cross-attention over the encoder's output; no position embeddings but a learned
//! relative position bias per stack (bucketed distances, one scalar per head), computed once
//! and shared by the stack's layers; attention scores unscaled (the initialisation absorbs
//! it); the head tied to the embedding and fed hidden states × d_model^-0.5 (T5), or untied
//! and unscaled (T5 v1.1).
//!
//! encode: embed → encoder blocks → norm. decode: embed → decoder blocks (self, cross, MLP)
//! → norm → head.

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;
use burn::tensor::module::embedding;

use crate::blocks::*;
use crate::causal_lm::CausalLm;
use crate::init::normal_param;
use crate::kernels::{multi_head_attention, multi_head_attention_learned_bias, FusedOps};
use crate::lora::LinearLayers;
use crate::model::Init;
pub use furnace_core::arch::T5Config;
use furnace_core::params::f32_val;
use furnace_core::rng::SeededRng;

impl Init for T5Config {
    type Model<B: Backend> = T5<B>;

    fn init<B: Backend>(&self, seed: u64, device: &B::Device) -> T5<B> {
        let mut rng = SeededRng::new(seed);
        let (d, inner) = (self.d_model as f64, (self.n_heads * self.head_dim) as f64);
        let attention_std = [(d * self.head_dim as f64).powf(-0.5), d.powf(-0.5), inner.powf(-0.5)];
        let norm = || Norm::new(NormKind::RmsNorm, self.d_model, self.norm_eps, false, device);
        let attention = |rng: &mut SeededRng| {
            let mut a =
                Attention::with_head_dim(self.d_model, self.n_heads, self.n_heads, self.head_dim, false, attention_std, rng, device);
            a.scale = 1.0;
            a
        };
        let block = |cross: bool, rng: &mut SeededRng| T5Block {
            self_attention_norm: norm(),
            self_attention: attention(rng),
            cross_attention_norm: cross.then(norm),
            cross_attention: cross.then(|| attention(rng)),
            ffn_norm: norm(),
            feed_forward: FeedForward::new(
                self.mlp,
                self.d_model,
                self.d_ff,
                false,
                d.powf(-0.5),
                (self.d_ff as f64).powf(-0.5),
                rng,
                device,
            ),
            dropout: DropoutConfig::new(self.dropout).init(),
        };
        let embed_tokens = normal_param([self.vocab_size, self.d_model], 1.0, &mut rng, device);
        let buckets = [self.relative_attention_num_buckets, self.n_heads];
        let encoder_relative_bias = normal_param(buckets, d.powf(-0.5), &mut rng, device);
        let encoder_layers = (0..self.n_layers).map(|_| block(false, &mut rng)).collect();
        let decoder_relative_bias = normal_param(buckets, d.powf(-0.5), &mut rng, device);
        let decoder_layers = (0..self.n_decoder_layers).map(|_| block(true, &mut rng)).collect();
        T5 {
            embed_tokens,
            encoder_relative_bias,
            encoder_layers,
            encoder_norm: norm(),
            decoder_relative_bias,
            decoder_layers,
            decoder_norm: norm(),
            lm_head: (!self.tie_embeddings).then(|| Linear::new(self.d_model, self.vocab_size, false, 1.0, &mut rng, device)),
            dropout: DropoutConfig::new(self.dropout).init(),
            relative_attention_num_buckets: self.relative_attention_num_buckets,
            relative_attention_max_distance: self.relative_attention_max_distance,
            vocab_size: self.vocab_size,
        }
    }
}

/// The bucket of a key `relative` positions after the query (negative: before), as Mesh
/// TensorFlow and transformers compute it: exact buckets for the nearest half, logarithmic
/// ones up to `max_distance`; bidirectional (encoder) buckets split by direction, causal
/// (decoder) ones see only the past.
pub fn relative_position_bucket(relative: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut buckets = num_buckets as i64;
    let mut bucket = 0;
    let distance = if bidirectional {
        buckets /= 2;
        if relative > 0 {
            bucket += buckets;
        }
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let max_exact = buckets / 2;
    if distance < max_exact {
        return (bucket + distance) as usize;
    }
    // In f32, as transformers computes it, so the same distances land in the same buckets.
    let log_ratio = (distance as f32 / max_exact as f32).ln() / ((max_distance as f64 / max_exact as f64).ln() as f32);
    let large = max_exact + (log_ratio * (buckets - max_exact) as f32) as i64;
    (bucket + large.min(buckets - 1)) as usize
}

/// Pre-norm block: self-attention, (decoder) cross-attention over the encoder's output, MLP,
/// each added to the residual stream.
#[derive(Module, Debug)]
pub struct T5Block<B: Backend> {
    pub self_attention_norm: Norm<B>,
    pub self_attention: Attention<B>,
    pub cross_attention_norm: Option<Norm<B>>,
    pub cross_attention: Option<Attention<B>>,
    pub ffn_norm: Norm<B>,
    pub feed_forward: FeedForward<B>,
    pub dropout: Dropout,
}

/// What a decoder block reads from the encoder: its output's keys and values for this block's
/// cross-attention (computed once per input) and the bias over them (−∞ on padding).
pub struct CrossInput<'a, B: Backend> {
    pub keys_values: &'a (Tensor<B, 4>, Tensor<B, 4>),
    pub bias: &'a Tensor<B, 4>,
}

impl<B: FusedOps> T5Block<B> {
    /// `bias`: the stack's relative position bias plus its mask, `[1, heads, queries, keys]`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        bias: &Tensor<B, 4>,
        cross: Option<CrossInput<'_, B>>,
        cache: Option<&mut LayerKv<B>>,
    ) -> Tensor<B, 3> {
        let attention = &self.self_attention;
        let h = self.self_attention_norm.forward(x.clone());
        let q = attention.queries(h.clone());
        let (mut k, mut v) = attention.keys_values(h);
        if let Some(cache) = cache {
            (k, v) = extend_cache(cache, k, v);
        }
        let heads = multi_head_attention_learned_bias(q, k, v, bias.clone(), attention.scale);
        let mut x = x + self.dropout.forward(attention.output(heads));
        if let (Some(norm), Some(attention), Some(cross)) = (&self.cross_attention_norm, &self.cross_attention, cross) {
            let q = attention.queries(norm.forward(x.clone()));
            let (k, v) = cross.keys_values.clone();
            let heads = multi_head_attention(q, k, v, cross.bias.clone(), attention.scale);
            x = x + self.dropout.forward(attention.output(heads));
        }
        x.clone() + self.dropout.forward(self.feed_forward.forward(self.ffn_norm.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct T5<B: Backend> {
    /// `[vocab_size, d_model]`, shared by both stacks (and the head when tied).
    pub embed_tokens: Param<Tensor<B, 2>>,
    /// `[num_buckets, heads]`.
    pub encoder_relative_bias: Param<Tensor<B, 2>>,
    pub encoder_layers: Vec<T5Block<B>>,
    pub encoder_norm: Norm<B>,
    pub decoder_relative_bias: Param<Tensor<B, 2>>,
    pub decoder_layers: Vec<T5Block<B>>,
    pub decoder_norm: Norm<B>,
    /// None when the head is the token embedding.
    pub lm_head: Option<Linear<B>>,
    pub dropout: Dropout,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub vocab_size: usize,
}

/// The decoder's state while generating: the encoder's keys and values for each layer's
/// cross-attention (computed once) and each layer's self-attention cache.
#[derive(Debug, Clone)]
pub struct T5State<B: Backend> {
    pub cross: Vec<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// `[batch, 1, 1, input_len]`: 0 on each row's input tokens, −∞ on its padding.
    pub padding: Tensor<B, 4>,
    pub layers: Vec<LayerKv<B>>,
}

impl<B: FusedOps> T5<B> {
    /// The relative position bias `[1, heads, queries, keys]` for queries at positions
    /// `offset..offset+queries` over keys `0..keys`, plus −∞ on future keys when causal.
    fn position_bias(&self, table: &Param<Tensor<B, 2>>, queries: usize, offset: usize, keys: usize, causal: bool) -> Tensor<B, 4> {
        let device = table.device();
        let mut buckets = Vec::with_capacity(queries * keys);
        let mut mask = Vec::with_capacity(queries * keys);
        for i in 0..queries {
            for j in 0..keys {
                let relative = j as i64 - (offset + i) as i64;
                let (num, max) = (self.relative_attention_num_buckets, self.relative_attention_max_distance);
                buckets.push(relative_position_bucket(relative, !causal, num, max) as i64);
                mask.push(if causal && relative > 0 { f32::NEG_INFINITY } else { 0.0 });
            }
        }
        let buckets = Tensor::<B, 2, Int>::from_data(TensorData::new(buckets, [1, queries * keys]), &device);
        let heads = table.dims()[1];
        let values = embedding(f32_val(table), buckets).reshape([queries, keys, heads]).permute([2, 0, 1]).unsqueeze::<4>();
        values + Tensor::<B, 2>::from_data(TensorData::new(mask, [queries, keys]), &device).unsqueeze::<4>()
    }

    /// `[batch, 1, 1, len]`: 0 on the first `lengths[row]` positions of each row, −∞ after.
    fn padding_bias(lengths: &[usize], len: usize, device: &B::Device) -> Tensor<B, 4> {
        let values = lengths.iter().flat_map(|&n| (0..len).map(move |j| if j < n { 0.0 } else { f32::NEG_INFINITY })).collect::<Vec<_>>();
        Tensor::<B, 2>::from_data(TensorData::new(values, [lengths.len(), len]), device).reshape([lengths.len(), 1, 1, len])
    }

    /// The encoder's output `[batch, input_len, d_model]` for rows whose first `lengths[row]`
    /// tokens are input and the rest padding (which no position attends to).
    pub fn encode(&self, input: Tensor<B, 2, Int>, lengths: &[usize]) -> Tensor<B, 3> {
        let bias = self.encoder_bias(input.dims()[1], lengths);
        let x = self.embed(input);
        let x = self.encoder_layers.iter().fold(x, |x, layer| layer.forward(x, &bias, None, None));
        self.encoder_finish(x)
    }

    /// A fresh decoding state for the encoder's output `encoded` of inputs `lengths` long.
    pub fn start_decoding(&self, encoded: Tensor<B, 3>, lengths: &[usize]) -> T5State<B> {
        let [_, len, _] = encoded.dims();
        let padding = Self::padding_bias(lengths, len, &encoded.device());
        let cross = self
            .decoder_layers
            .iter()
            .map(|l| l.cross_attention.as_ref().expect("decoder blocks cross-attend").keys_values(encoded.clone()))
            .collect();
        T5State { cross, padding, layers: vec![None; self.decoder_layers.len()] }
    }

    /// Logits `[batch, len, vocab]` for decoder tokens `[batch, len]` following those already
    /// in `state` (all of them at once for training, one at a time for generation).
    pub fn decode(&self, tokens: Tensor<B, 2, Int>, state: &mut T5State<B>) -> Tensor<B, 3> {
        let [_, len] = tokens.dims();
        let offset = state.layers[0].as_ref().map_or(0, |(k, _)| k.dims()[1]);
        let bias = self.position_bias(&self.decoder_relative_bias, len, offset, offset + len, true);
        let cross_bias = state.padding.clone().repeat_dim(2, len);
        let mut x = self.embed(tokens);
        for ((layer, cache), keys_values) in self.decoder_layers.iter().zip(&mut state.layers).zip(&state.cross) {
            let cross = CrossInput { keys_values, bias: &cross_bias };
            x = layer.forward(x, &bias, Some(cross), Some(cache));
        }
        self.decoder_finish(x)
    }

    /// Training's forward: logits `[batch, target_len, vocab]` of the decoder reading
    /// `decoder_input` (the targets shifted right behind the start token) over `input` (rows
    /// `lengths` long, padded after).
    pub fn forward(&self, input: Tensor<B, 2, Int>, lengths: &[usize], decoder_input: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let mut state = self.start_decoding(self.encode(input, lengths), lengths);
        self.decode(decoder_input, &mut state)
    }
}

/// Training's forward in pieces, for activation checkpointing: each stack as a chain embed →
/// blocks → finish, the decoder's blocks also reading the encoder's output. A block's biases
/// are built from the position table by whoever runs it, so a recomputed block's graph holds
/// its own share of the table's gradient.
impl<B: FusedOps> T5<B> {
    /// The token embedding, either stack's first block's input.
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.dropout.forward(embedding(f32_val(&self.embed_tokens), tokens))
    }

    /// The encoder's self-attention bias `[batch, heads, len, len]`: relative positions, −∞
    /// on each row's padding.
    pub fn encoder_bias(&self, len: usize, lengths: &[usize]) -> Tensor<B, 4> {
        let device = self.embed_tokens.device();
        self.position_bias(&self.encoder_relative_bias, len, 0, len, false) + Self::padding_bias(lengths, len, &device)
    }

    /// The decoder's causal self-attention bias `[1, heads, len, len]` and its cross-attention
    /// bias `[batch, 1, len, input_len]` over inputs `lengths` long.
    pub fn decoder_biases(&self, len: usize, input_len: usize, lengths: &[usize]) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let device = self.embed_tokens.device();
        let cross = Self::padding_bias(lengths, input_len, &device).repeat_dim(2, len);
        (self.position_bias(&self.decoder_relative_bias, len, 0, len, true), cross)
    }

    /// The encoder's output from its last block's.
    pub fn encoder_finish(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.dropout.forward(self.encoder_norm.forward(x))
    }

    /// Decoder block `index` over the encoder's output `encoded`, with `decoder_biases`.
    pub fn decoder_block(
        &self,
        index: usize,
        x: Tensor<B, 3>,
        encoded: Tensor<B, 3>,
        biases: &(Tensor<B, 4>, Tensor<B, 4>),
    ) -> Tensor<B, 3> {
        let layer = &self.decoder_layers[index];
        let keys_values = layer.cross_attention.as_ref().expect("decoder blocks cross-attend").keys_values(encoded);
        layer.forward(x, &biases.0, Some(CrossInput { keys_values: &keys_values, bias: &biases.1 }), None)
    }

    /// Logits from the decoder's last block's output.
    pub fn decoder_finish(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = self.dropout.forward(self.decoder_norm.forward(x));
        // Tied, the head reads the states scaled by d_model^-0.5, as T5's.
        let hidden = match &self.lm_head {
            Some(_) => hidden,
            None => hidden * (self.embed_tokens.dims()[1] as f64).powf(-0.5),
        };
        lm_logits(hidden, self.lm_head.as_ref(), &self.embed_tokens)
    }
}

impl<B: Backend> LinearLayers<B> for T5<B> {
    fn linear_layers_mut(&mut self) -> Vec<(&'static str, &mut Linear<B>)> {
        let mut out: Vec<(&'static str, &mut Linear<B>)> = Vec::new();
        for layer in self.encoder_layers.iter_mut().chain(&mut self.decoder_layers) {
            out.extend(layer.self_attention.projections_mut());
            out.extend(layer.cross_attention.iter_mut().flat_map(Attention::projections_mut));
            out.extend(layer.feed_forward.projections_mut());
        }
        out
    }
}

/// A T5 reading one input: its decoder as a causal language model over that input, so the
/// generator (sampling, stop tokens, streaming) decodes T5 as it decodes every other model,
/// starting from the decoder's start token. The encoder runs once, when decoding starts.
pub struct Conditioned<'a, B: Backend> {
    pub model: &'a T5<B>,
    /// `[1, input_len]` for `generate` (one row per reply decoded together).
    pub input: Tensor<B, 2, Int>,
    /// Each row's input tokens before its padding.
    pub lengths: Vec<usize>,
}

impl<B: FusedOps> CausalLm<B> for Conditioned<'_, B> {
    type State = T5State<B>;

    fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.model.forward(self.input.clone(), &self.lengths, tokens)
    }

    fn init_state(&self) -> T5State<B> {
        self.model.start_decoding(self.model.encode(self.input.clone(), &self.lengths), &self.lengths)
    }

    fn forward_step(&self, tokens: Tensor<B, 2, Int>, state: &mut T5State<B>) -> Tensor<B, 3> {
        self.model.decode(tokens, state)
    }

    /// Relative positions have no table to run out of.
    fn max_seq_len(&self) -> usize {
        usize::MAX
    }

    fn vocab_size(&self) -> usize {
        self.model.vocab_size
    }
}
