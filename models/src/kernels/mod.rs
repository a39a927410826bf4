//! Fused kernels for the ops that dominate a training step once the matmuls are fast.
//!
//! Built from Burn's tensor API, each of these is 5–10 separate ops, every one with its own
//! output buffer, autodiff node and backward pass. `FusedOps` is a backend extension (Burn's
//! idiom for custom ops): every backend gets the composed version from [`reference`] by
//! default, the flex CPU backend overrides it with single-pass, multi-threaded, vectorised
//! kernels ([`flex`]), and `Autodiff<B>` records each op as one node whose backward is the
//! fused backward ([`autodiff`]). Results are deterministic: work is split by size, never by
//! thread timing, and partial sums are combined in a fixed order.

mod autodiff;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;
mod flex;
mod flex_mamba;
mod math;
pub mod reference;

use std::sync::Arc;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::TensorPrimitive;

use crate::blocks::NormKind;
use crate::nf4::Nf4Matrix;
use crate::paged::PagedStep;

/// Ops with a fused forward and backward. Every method has the composed reference as default.
pub trait FusedOps: Backend {
    /// GPT-2's `gelu_new`: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, elementwise.
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::gelu_tanh::<Self>(x)
    }

    /// Gradient of [`Self::gelu_tanh`] with respect to `x`, given the output gradient.
    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::gelu_tanh_backward::<Self>(x, grad)
    }

    /// Llama's gated MLP activation `silu(gate) · up`, elementwise.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::swiglu::<Self>(gate, up)
    }

    /// Gradients of [`Self::swiglu`] with respect to `gate` and `up`.
    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::swiglu_backward::<Self>(gate, up, grad)
    }

    /// Rotary position embedding in the "rotate_half" layout Hugging Face's Llama uses: the
    /// pairs (i, i + head_dim/2) of `x` `[batch, seq, heads, head_dim]` turned by the angles
    /// whose `cos` and `sin` are `[1 or batch, seq, 1, head_dim]` (constants, no gradient).
    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::rope::<Self>(x, cos, sin)
    }

    /// Gradient of [`Self::rope`] with respect to `x`: `grad` turned back by the same angles.
    fn rope_backward(grad: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::rope_backward::<Self>(grad, cos, sin)
    }

    /// Multi-head attention `softmax(q·kᵀ·scale + bias)·v` with grouped key/value heads.
    /// `q` is `[batch, queries, heads, head_dim]`, `k` and `v` are `[batch, keys, kv_heads,
    /// head_dim]` (the projections' own layout: no transposes), `bias` (mask and position
    /// bias, `[1 or batch, 1 or heads, queries, keys]`) is a constant without gradient.
    /// Returns `[batch, queries, heads, head_dim]`.
    fn multi_head_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        Self::multi_head_attention_forward(q, k, v, bias, scale).0
    }

    /// [`Self::multi_head_attention`] and what its backward needs besides the inputs and the
    /// output: the probabilities `[batch, heads, queries, keys]` (reference, flex) or each query
    /// row's log-sum-exp `[batch, heads, queries]` (the flash kernel of the GPU backends).
    fn multi_head_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::attention_forward::<Self>(q, k, v, bias, scale)
    }

    /// Gradients of [`Self::multi_head_attention`] with respect to `q`, `k` and `v`.
    fn multi_head_attention_backward(
        saved: AttentionSaved<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::attention_backward::<Self>(saved.q, saved.k, saved.v, saved.kept, grad, scale)
    }

    /// RMSNorm or LayerNorm over the last dimension, with a learned weight (and bias).
    fn norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        kind: NormKind,
        eps: f32,
    ) -> FloatTensor<Self> {
        reference::norm::<Self>(x, weight, bias, kind, eps)
    }

    /// Gradients of [`Self::norm`] with respect to `x`, `weight` and (when `with_bias`) the bias.
    fn norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: NormKind,
        eps: f32,
        with_bias: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
        reference::norm_backward::<Self>(x, weight, grad, kind, eps, with_bias)
    }

    /// Per-row cross-entropy `logsumexp(logits) − logits[target]` for `[rows, vocab]` logits
    /// and `[rows]` targets; a negative target marks a row to ignore (loss 0, no gradient).
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        reference::cross_entropy::<Self>(logits, targets)
    }

    /// [`Self::cross_entropy`] and, from the same pass over the logits, its gradient for an
    /// output gradient of 1 per row: `softmax(logits) − onehot(target)` (0 on ignored rows).
    /// Training keeps this instead of the logits; the backward pass only scales its rows.
    fn cross_entropy_with_grad(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::cross_entropy_with_grad::<Self>(logits, targets)
    }

    /// Row `i` of the `[rows, cols]` tensor `x` times `factors[i]`.
    fn scale_rows(x: FloatTensor<Self>, factors: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::scale_rows::<Self>(x, factors)
    }

    /// Depthwise causal convolution, then SiLU (see [`causal_conv_silu`]).
    fn causal_conv_silu(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::causal_conv_silu::<Self>(x, weight, bias)
    }

    /// Gradients of [`Self::causal_conv_silu`] with respect to `x`, `weight` and `bias`.
    fn causal_conv_silu_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::causal_conv_silu_backward::<Self>(x, weight, bias, grad)
    }

    /// Mamba's selective scan (see [`selective_scan`]).
    fn selective_scan(inputs: ScanPrimitives<Self>) -> FloatTensor<Self> {
        reference::selective_scan::<Self>(inputs)
    }

    /// Gradients of [`Self::selective_scan`] with respect to each of its inputs.
    fn selective_scan_backward(inputs: ScanPrimitives<Self>, grad: FloatTensor<Self>) -> ScanPrimitives<Self> {
        reference::selective_scan_backward::<Self>(inputs, grad)
    }

    /// `x · W` for `[rows, d_in]` rows and an NF4 weight `[d_in, d_out]` (`x · Wᵀ` when
    /// `transpose`), the weight dequantized for this product only and dropped after it.
    fn nf4_matmul(x: FloatTensor<Self>, weight: &Arc<Nf4Matrix>, transpose: bool) -> FloatTensor<Self> {
        reference::nf4_matmul::<Self>(x, weight, transpose)
    }

    /// A paged cache's pool `[rows, kv_heads, head_dim]` with `values` `[1, tokens, kv_heads,
    /// head_dim]` written to rows `slots` (one per token). Writes in place where the backend can.
    fn paged_kv_write(pool: FloatTensor<Self>, values: FloatTensor<Self>, slots: &[usize]) -> FloatTensor<Self> {
        reference::paged_kv_write::<Self>(pool, values, slots)
    }

    /// Attention of a step's queries `[1, tokens, heads, head_dim]` (its sequences' new tokens,
    /// one sequence after another) over each one's own keys and values, read from the pools
    /// `[rows, kv_heads, head_dim]` through its block table and masked as `step` says.
    /// Returns `[1, tokens, heads, head_dim]`.
    fn paged_attention(
        q: FloatTensor<Self>,
        keys: FloatTensor<Self>,
        values: FloatTensor<Self>,
        step: &PagedStep,
        scale: f32,
    ) -> FloatTensor<Self> {
        reference::paged_attention::<Self>(q, keys, values, step, scale)
    }
}

impl<B: FusedOps, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        autodiff::gelu_tanh::<B, C>(x)
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        autodiff::swiglu::<B, C>(gate, up)
    }

    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        autodiff::rope::<B, C>(x, cos, sin)
    }

    fn multi_head_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> FloatTensor<Self> {
        autodiff::multi_head_attention::<B, C>(q, k, v, bias, scale)
    }

    fn norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        kind: NormKind,
        eps: f32,
    ) -> FloatTensor<Self> {
        autodiff::norm::<B, C>(x, weight, bias, kind, eps)
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        autodiff::cross_entropy::<B, C>(logits, targets)
    }

    fn nf4_matmul(x: FloatTensor<Self>, weight: &Arc<Nf4Matrix>, transpose: bool) -> FloatTensor<Self> {
        autodiff::nf4_matmul::<B, C>(x, weight, transpose)
    }

    fn selective_scan(inputs: ScanPrimitives<Self>) -> FloatTensor<Self> {
        autodiff::selective_scan::<B, C>(inputs)
    }

    fn causal_conv_silu(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        autodiff::causal_conv_silu::<B, C>(x, weight, bias)
    }
}

/// The inputs of Mamba's selective scan, one field per tensor (or per gradient).
#[derive(Debug, Clone)]
pub struct Scan<T3, T2, T1> {
    /// `[batch, seq, channels]`: the sequence being scanned.
    pub u: T3,
    /// `[batch, seq, channels]`: the step size before its softplus, Δ = softplus(dt).
    pub dt: T3,
    /// `[channels, state]`: the continuous-time decay rates A (negative).
    pub a: T2,
    /// `[batch, seq, state]`: the input projection B of each step.
    pub b: T3,
    /// `[batch, seq, state]`: the output projection C of each step.
    pub c: T3,
    /// `[channels]`: the skip connection D.
    pub d: T1,
}

/// What attention's backward reads: the forward's inputs and output, and what
/// [`FusedOps::multi_head_attention_forward`] kept for it.
#[derive(Debug, Clone)]
pub struct AttentionSaved<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub bias: FloatTensor<B>,
    pub out: FloatTensor<B>,
    pub kept: FloatTensor<B>,
}

/// The scan's inputs as backend primitives.
pub type ScanPrimitives<B> = Scan<FloatTensor<B>, FloatTensor<B>, FloatTensor<B>>;

fn primitive<B: Backend, const D: usize>(x: Tensor<B, D>) -> FloatTensor<B> {
    x.into_primitive().tensor()
}

fn tensor<B: Backend, const D: usize>(x: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

/// GPT-2's tanh-approximated GELU.
pub fn gelu_tanh<B: FusedOps, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    tensor(B::gelu_tanh(primitive(x)))
}

/// `silu(gate) · up`.
pub fn swiglu<B: FusedOps, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    tensor(B::swiglu(primitive(gate), primitive(up)))
}

/// Rotary position embedding of `[batch, seq, heads, head_dim]` queries or keys; see [`FusedOps::rope`].
pub fn rope<B: FusedOps>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    tensor(B::rope(primitive(x), primitive(cos), primitive(sin)))
}

/// Multi-head attention over `[batch, seq, heads, head_dim]` inputs; see [`FusedOps::multi_head_attention`].
pub fn multi_head_attention<B: FusedOps>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Tensor<B, 4>,
    scale: f32,
) -> Tensor<B, 4> {
    tensor(B::multi_head_attention(primitive(q), primitive(k), primitive(v), primitive(bias), scale))
}

/// A paged cache's pool with the step's keys or values written; see [`FusedOps::paged_kv_write`].
pub fn paged_kv_write<B: FusedOps>(pool: Tensor<B, 3>, values: Tensor<B, 4>, slots: &[usize]) -> Tensor<B, 3> {
    tensor(B::paged_kv_write(primitive(pool), primitive(values), slots))
}

/// Attention through a paged cache's block tables; see [`FusedOps::paged_attention`].
pub fn paged_attention<B: FusedOps>(
    q: Tensor<B, 4>,
    keys: Tensor<B, 3>,
    values: Tensor<B, 3>,
    step: &PagedStep,
    scale: f32,
) -> Tensor<B, 4> {
    tensor(B::paged_attention(primitive(q), primitive(keys), primitive(values), step, scale))
}

/// [`multi_head_attention`] whose `bias` is a learned function of the parameters (T5's relative
/// position bias): composed from tensor ops, so the bias gets its gradient, which the fused
/// kernel (bias as a constant mask) does not give.
pub fn multi_head_attention_learned_bias<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Tensor<B, 4>,
    scale: f32,
) -> Tensor<B, 4> {
    tensor(reference::attention_forward::<B>(primitive(q), primitive(k), primitive(v), primitive(bias), scale).0)
}

/// RMSNorm or LayerNorm over the last dimension.
pub fn norm<B: FusedOps, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
    kind: NormKind,
    eps: f32,
) -> Tensor<B, D> {
    tensor(B::norm(primitive(x), primitive(weight), bias.map(primitive), kind, eps))
}

/// Per-row cross-entropy of `[rows, vocab]` logits against `[rows]` targets (negative = ignored).
pub fn cross_entropy<B: FusedOps>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    tensor(B::cross_entropy(primitive(logits), targets.into_primitive()))
}

/// `x · W` for `[rows, d_in]` rows and a frozen NF4 weight; its backward dequantizes the weight
/// again rather than keeping a dense copy alive until the backward pass (QLoRA).
pub fn nf4_matmul<B: FusedOps>(x: Tensor<B, 2>, weight: &Arc<Nf4Matrix>) -> Tensor<B, 2> {
    tensor(B::nf4_matmul(primitive(x), weight, false))
}

/// Depthwise causal convolution then SiLU, Mamba's `act(conv1d(x))`: `y[t, c] = silu(bias[c] +
/// Σ_k weight[c, k]·x[t − width + 1 + k, c])` with zeros before the first position. `x` is
/// `[batch, seq, channels]`, `weight` `[channels, width]`, `bias` `[channels]`.
pub fn causal_conv_silu<B: FusedOps>(x: Tensor<B, 3>, weight: Tensor<B, 2>, bias: Tensor<B, 1>) -> Tensor<B, 3> {
    tensor(B::causal_conv_silu(primitive(x), primitive(weight), primitive(bias)))
}

/// Mamba's selective scan: `h_t = exp(Δ_t·A)·h_{t−1} + Δ_t·B_t·u_t` per channel (state of
/// size `state`, `h_0 = 0`) with `Δ_t = softplus(dt_t)`, read out as `y_t = C_t·h_t + D·u_t`.
/// The softplus is inside, as in Mamba's own kernel (`delta_softplus`), so Δ never needs a
/// tensor (or a backward pass) of its own. Returns `[batch, seq,
/// channels]`. Every backend has the chunked scan of [`reference`]; the flex CPU backend runs
/// one fused pass over time per channel, forward and backward.
pub fn selective_scan<B: FusedOps>(s: Scan<Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 1>>) -> Tensor<B, 3> {
    let inputs =
        Scan { u: primitive(s.u), dt: primitive(s.dt), a: primitive(s.a), b: primitive(s.b), c: primitive(s.c), d: primitive(s.d) };
    tensor(B::selective_scan(inputs))
}

#[cfg(test)]
mod tests;
