//! Causal self-attention shared by every decoder: GQA/MQA/MHA, RoPE or ALiBi or none,
//! an optional sliding window, and an explicit KV cache for decoding.

use burn::prelude::*;

use super::Linear;
use crate::kernels::{multi_head_attention, rope, FusedOps};
use crate::paged::{PagedLayer, PagedStep};
use furnace_core::rng::SeededRng;

/// Keys and values of one layer for the positions decoded so far: `[batch, len, kv_heads, head_dim]`.
pub type LayerKv<B> = Option<(Tensor<B, 4>, Tensor<B, 4>)>;

/// Where a layer keeps the keys and values of a forward that decodes.
pub enum LayerCache<'a, B: Backend> {
    /// Grown by each forward (one sequence, or rows of equal length).
    Contiguous(&'a mut LayerKv<B>),
    /// A paged cache's pool, written and read through the step's block tables; the step masks
    /// attention itself, so the context's bias is not read.
    Paged(&'a mut PagedLayer<B>, &'a PagedStep),
}

/// Per-forward inputs every layer shares: rotary tables for the current positions and the
/// additive mask/bias. Built once per forward by the model, not per layer.
#[derive(Debug, Clone)]
pub struct AttentionContext<B: Backend> {
    /// cos and sin, `[1, T, 1, head_dim]` for positions `offset..offset+T`, or `[batch, T, 1,
    /// head_dim]` for packed rows.
    pub rope: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Added to the scores: 0 where attention is allowed, -inf where masked, plus the ALiBi
    /// distance penalty. `[1 or batch, 1 or heads, T, offset+T]`.
    pub bias: Tensor<B, 4>,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies the scores: head_dim^-0.5, or 1 where the initialisation absorbed it (T5).
    pub scale: f32,
}

impl<B: Backend> Attention<B> {
    /// Heads of `d_model / n_heads` dimensions.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        d_model: usize,
        n_heads: usize,
        n_kv_heads: usize,
        bias: bool,
        std: f64,
        out_std: f64,
        rng: &mut SeededRng,
        device: &B::Device,
    ) -> Self {
        Self::with_head_dim(d_model, n_heads, n_kv_heads, d_model / n_heads, bias, [std, std, out_std], rng, device)
    }

    /// Heads of `head_dim` dimensions (T5's d_kv need not be d_model / n_heads), projections
    /// initialised with standard deviations `[query, key and value, output]`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_head_dim(
        d_model: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        bias: bool,
        [q_std, kv_std, out_std]: [f64; 3],
        rng: &mut SeededRng,
        device: &B::Device,
    ) -> Self {
        Self {
            q_proj: Linear::new(d_model, n_heads * head_dim, bias, q_std, rng, device),
            k_proj: Linear::new(d_model, n_kv_heads * head_dim, bias, kv_std, rng, device),
            v_proj: Linear::new(d_model, n_kv_heads * head_dim, bias, kv_std, rng, device),
            o_proj: Linear::new(n_heads * head_dim, d_model, bias, out_std, rng, device),
            n_heads,
            n_kv_heads,
            head_dim,
            scale: (head_dim as f32).powf(-0.5),
        }
    }

    /// The four projections under their PEFT names (what LoRA's `target_modules` match).
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear<B>); 4] {
        [("q_proj", &mut self.q_proj), ("k_proj", &mut self.k_proj), ("v_proj", &mut self.v_proj), ("o_proj", &mut self.o_proj)]
    }
}

impl<B: FusedOps> Attention<B> {
    /// Heads stay in the projections' `[batch, seq, heads, head_dim]` layout throughout: the
    /// fused attention reads them with strides, so nothing is transposed or repeated.
    pub fn forward(&self, x: Tensor<B, 3>, ctx: &AttentionContext<B>, cache: Option<LayerCache<'_, B>>) -> Tensor<B, 3> {
        let mut q = self.queries(x.clone());
        let (mut k, v) = self.keys_values(x);
        if let Some((cos, sin)) = &ctx.rope {
            q = rope(q, cos.clone(), sin.clone());
            k = rope(k, cos.clone(), sin.clone());
        }
        let heads = match cache {
            None => multi_head_attention(q, k, v, ctx.bias.clone(), self.scale),
            Some(LayerCache::Contiguous(cache)) => {
                let (k, v) = extend_cache(cache, k, v);
                multi_head_attention(q, k, v, ctx.bias.clone(), self.scale)
            }
            Some(LayerCache::Paged(pool, step)) => pool.attend(q, k, v, step, self.scale),
        };
        self.output(heads)
    }

    /// `[batch, seq, heads, head_dim]` queries of `x`.
    pub fn queries(&self, x: Tensor<B, 3>) -> Tensor<B, 4> {
        let [batch, seq, _] = x.dims();
        self.q_proj.forward(x).reshape([batch, seq, self.n_heads, self.head_dim])
    }

    /// `[batch, seq, kv_heads, head_dim]` keys and values of `x`.
    pub fn keys_values(&self, x: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, seq, _] = x.dims();
        let heads = |t: Tensor<B, 3>| t.reshape([batch, seq, self.n_kv_heads, self.head_dim]);
        (heads(self.k_proj.forward(x.clone())), heads(self.v_proj.forward(x)))
    }

    /// The output projection of the heads' results `[batch, seq, heads, head_dim]`.
    pub fn output(&self, heads: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, seq, _, _] = heads.dims();
        self.o_proj.forward(heads.reshape([batch, seq, self.n_heads * self.head_dim]))
    }
}

/// The layer's keys and values so far followed by `k` and `v`, which the cache then holds.
pub fn extend_cache<B: Backend>(cache: &mut LayerKv<B>, mut k: Tensor<B, 4>, mut v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
    if let Some((past_k, past_v)) = cache.take() {
        k = Tensor::cat(vec![past_k, k], 1);
        v = Tensor::cat(vec![past_v, v], 1);
    }
    *cache = Some((k.clone(), v.clone()));
    (k, v)
}

/// Rotary position tables, built once per model: `[max_seq_len, head_dim]` cos and sin.
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    pub fn new(head_dim: usize, max_seq_len: usize, theta: f64, device: &B::Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq_len * head_dim);
        let mut sin = Vec::with_capacity(max_seq_len * head_dim);
        for pos in 0..max_seq_len {
            for i in 0..head_dim {
                let inv_freq = 1.0 / theta.powf((2 * (i % half)) as f64 / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [max_seq_len, head_dim]), device);
        Self { cos: table(cos), sin: table(sin) }
    }

    /// Tables for each token's own position (`[batch, len]`), `[batch, len, 1, head_dim]`.
    pub fn gather(&self, positions: Tensor<B, 2, Int>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [batch, len] = positions.dims();
        let flat = positions.reshape([batch * len]);
        let pick = |t: &Tensor<B, 2>| t.clone().select(0, flat.clone()).reshape([batch, len, 1, t.dims()[1]]);
        (pick(&self.cos), pick(&self.sin))
    }

    /// Tables for positions `offset..offset+len`, shaped to broadcast over `[batch, heads, len, head_dim]`.
    pub fn slice(&self, offset: usize, len: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let cut = |t: &Tensor<B, 2>| t.clone().narrow(0, offset, len).reshape([1, len, 1, t.dims()[1]]);
        (cut(&self.cos), cut(&self.sin))
    }
}

/// ALiBi slopes (Press et al.): a geometric sequence per head, extended for non powers of two.
pub fn alibi_slopes(n_heads: usize) -> Vec<f32> {
    fn power_of_two(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    let closest = 1usize << (usize::BITS - 1 - n_heads.leading_zeros());
    let mut slopes = power_of_two(closest);
    if closest < n_heads {
        slopes.extend(power_of_two(2 * closest).into_iter().step_by(2).take(n_heads - closest));
    }
    slopes.into_iter().map(|s| s as f32).collect()
}

/// The bias of a query over a key `distance` positions back: −∞ unless visible, else the ALiBi
/// penalty (0 without ALiBi).
pub(crate) fn bias_value(visible: bool, distance: usize, slope: Option<f32>) -> f32 {
    match (visible, slope) {
        (false, _) => f32::NEG_INFINITY,
        (true, Some(slope)) => -slope * distance as f32,
        (true, None) => 0.0,
    }
}

/// Additive attention bias for queries at `offset..offset+len` over keys `0..offset+len`:
/// causal mask, optional sliding window, optional ALiBi penalty per head.
pub fn attention_bias<B: Backend>(len: usize, offset: usize, window: usize, alibi: Option<&[f32]>, device: &B::Device) -> Tensor<B, 4> {
    let keys = offset + len;
    let heads = alibi.map_or(1, |s| s.len());
    let mut bias = Vec::with_capacity(heads * len * keys);
    for h in 0..heads {
        for i in 0..len {
            let q_pos = offset + i;
            for k_pos in 0..keys {
                let visible = k_pos <= q_pos && (window == 0 || q_pos - k_pos < window);
                bias.push(bias_value(visible, q_pos.saturating_sub(k_pos), alibi.map(|s| s[h])));
            }
        }
    }
    Tensor::from_data(TensorData::new(bias, [1, heads, len, keys]), device)
}

/// Attention bias for rows that pack several sequences, `[batch, 1 or heads, len, len]`:
/// `positions` (`[batch·len]`) restart at 0 where a sequence starts, and a token sees only the
/// earlier tokens of its own sequence.
pub fn packed_attention_bias<B: Backend>(
    positions: &[usize],
    len: usize,
    window: usize,
    alibi: Option<&[f32]>,
    device: &B::Device,
) -> Tensor<B, 4> {
    // Each sequence its own branch (numbered from 1: none is a shared prefix).
    let sequences: Vec<u32> = positions
        .chunks(len)
        .flat_map(|row| {
            let mut sequence = 0;
            row.iter().enumerate().map(move |(t, &position)| {
                if t == 0 || position == 0 {
                    sequence += 1;
                }
                sequence
            })
        })
        .collect();
    branched_attention_bias(positions, &sequences, len, window, alibi, device)
}

/// Attention bias for rows whose tokens form branches, `[batch, 1 or heads, len, len]`: a token
/// sees the earlier tokens of its own branch and of branch 0, a prefix the branches share (a
/// prompt before the replies to it). `positions` (`[batch·len]`) are each token's position in
/// its own sequence: the sliding window and ALiBi measure distances by them.
pub fn branched_attention_bias<B: Backend>(
    positions: &[usize],
    branches: &[u32],
    len: usize,
    window: usize,
    alibi: Option<&[f32]>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let batch = positions.len() / len;
    let heads = alibi.map_or(1, |s| s.len());
    let mut bias = Vec::with_capacity(batch * heads * len * len);
    for (row, row_branches) in positions.chunks(len).zip(branches.chunks(len)) {
        for h in 0..heads {
            for (i, (&position, &branch)) in row.iter().zip(row_branches).enumerate() {
                for j in 0..len {
                    let distance = position.saturating_sub(row[j]);
                    let related = row_branches[j] == 0 || row_branches[j] == branch;
                    let visible = j <= i && related && (window == 0 || distance < window);
                    bias.push(bias_value(visible, distance, alibi.map(|s| s[h])));
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(bias, [batch, heads, len, len]), device)
}
