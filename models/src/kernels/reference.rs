//! The fused ops written with Burn's tensor API: the default for backends without their own
//! kernels (CUDA, wgpu) and the reference the fused kernels are tested against.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Shape, TensorMetadata};

use super::{primitive, tensor};
use crate::blocks::NormKind;
use crate::nf4::Nf4Matrix;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

/// The tensor as `[rows, last_dim]`, and its original shape.
fn as_rows<B: Backend>(x: FloatTensor<B>) -> (Tensor<B, 2>, Shape) {
    let shape = x.shape();
    let last = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / last;
    (tensor::<B, 2>(x).reshape([rows, last]), shape)
}

fn restore<B: Backend, const D: usize>(x: Tensor<B, D>, shape: Shape) -> FloatTensor<B> {
    B::float_reshape(primitive(x), shape)
}

pub fn gelu_tanh<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let (x, shape) = as_rows::<B>(x);
    let inner = (x.clone() + x.clone().powi_scalar(3) * GELU_CUBIC) * SQRT_2_OVER_PI;
    restore((x * (inner.tanh() + 1.0)) * 0.5, shape)
}

pub fn gelu_tanh_backward<B: Backend>(x: FloatTensor<B>, grad: FloatTensor<B>) -> FloatTensor<B> {
    let (x, shape) = as_rows::<B>(x);
    let (grad, _) = as_rows::<B>(grad);
    let x2 = x.clone().powi_scalar(2);
    let t = ((x.clone() + x.clone() * x2.clone() * GELU_CUBIC) * SQRT_2_OVER_PI).tanh();
    let dt = (t.clone().powi_scalar(2).neg() + 1.0) * ((x2 * (3.0 * GELU_CUBIC) + 1.0) * SQRT_2_OVER_PI);
    let derivative = (t + 1.0) * 0.5 + x * dt * 0.5;
    restore(grad * derivative, shape)
}

pub fn swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let (gate, shape) = as_rows::<B>(gate);
    let (up, _) = as_rows::<B>(up);
    restore(gate.clone() * sigmoid(gate) * up, shape)
}

pub fn swiglu_backward<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>, grad: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let (gate, shape) = as_rows::<B>(gate);
    let (up, _) = as_rows::<B>(up);
    let (grad, _) = as_rows::<B>(grad);
    let s = sigmoid(gate.clone());
    let silu = gate.clone() * s.clone();
    let dsilu = s.clone() * ((s.neg() + 1.0) * gate + 1.0);
    (restore(grad.clone() * up * dsilu, shape.clone()), restore(grad * silu, shape))
}

/// `[batch, seq, kv_heads, head_dim]` → `[batch, heads, seq, head_dim]`, each key/value head
/// repeated for the `group` query heads it serves.
fn heads_first_repeated<B: Backend>(x: FloatTensor<B>, group: usize) -> Tensor<B, 4> {
    let x = tensor::<B, 4>(x).swap_dims(1, 2);
    let [batch, kv_heads, seq, dim] = x.dims();
    x.unsqueeze_dim::<5>(2).expand([batch, kv_heads, group, seq, dim]).reshape([batch, kv_heads * group, seq, dim])
}

/// Sum the gradients of the `group` query heads that share each key/value head, back to
/// `[batch, seq, kv_heads, head_dim]`.
fn fold_groups<B: Backend>(x: Tensor<B, 4>, group: usize) -> FloatTensor<B> {
    let [batch, heads, seq, dim] = x.dims();
    let folded = x.reshape([batch, heads / group, group, seq, dim]).sum_dim(2).reshape([batch, heads / group, seq, dim]);
    primitive(folded.swap_dims(1, 2))
}

fn group_size<B: Backend>(q: &FloatTensor<B>, k: &FloatTensor<B>) -> usize {
    q.shape()[2] / k.shape()[2]
}

pub fn attention_forward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    bias: FloatTensor<B>,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let group = group_size::<B>(&q, &k);
    let q = tensor::<B, 4>(q).swap_dims(1, 2);
    let (k, v) = (heads_first_repeated::<B>(k, group), heads_first_repeated::<B>(v, group));
    let probs = softmax(q.matmul(k.swap_dims(2, 3)) * scale + tensor::<B, 4>(bias), 3);
    let out = probs.clone().matmul(v).swap_dims(1, 2);
    (primitive(out), primitive(probs))
}

pub fn attention_backward<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    probs: FloatTensor<B>,
    grad: FloatTensor<B>,
    scale: f32,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let group = group_size::<B>(&q, &k);
    let q = tensor::<B, 4>(q).swap_dims(1, 2);
    let (k, v) = (heads_first_repeated::<B>(k, group), heads_first_repeated::<B>(v, group));
    let (probs, grad) = (tensor::<B, 4>(probs), tensor::<B, 4>(grad).swap_dims(1, 2));
    let grad_v = probs.clone().swap_dims(2, 3).matmul(grad.clone());
    let grad_probs = grad.matmul(v.swap_dims(2, 3));
    let dot = (grad_probs.clone() * probs.clone()).sum_dim(3);
    let grad_scores = probs * (grad_probs - dot) * scale;
    let grad_q = grad_scores.clone().matmul(k).swap_dims(1, 2);
    let grad_k = grad_scores.swap_dims(2, 3).matmul(q);
    (primitive(grad_q), fold_groups(grad_k, group), fold_groups(grad_v, group))
}

/// Normalised rows before the affine part, and 1/σ (or 1/rms) per row.
fn normalize<B: Backend>(x: Tensor<B, 2>, kind: NormKind, eps: f32) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let centred = match kind {
        NormKind::RmsNorm => x,
        NormKind::LayerNorm => x.clone() - x.mean_dim(1),
    };
    let rstd = (centred.clone().square().mean_dim(1) + eps).sqrt().recip();
    (centred * rstd.clone(), rstd)
}

pub fn norm<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    kind: NormKind,
    eps: f32,
) -> FloatTensor<B> {
    let (x, shape) = as_rows::<B>(x);
    let (normed, _) = normalize(x, kind, eps);
    let mut out = normed * tensor::<B, 1>(weight).unsqueeze::<2>();
    if let Some(bias) = bias {
        out = out + tensor::<B, 1>(bias).unsqueeze::<2>();
    }
    restore(out, shape)
}

pub fn norm_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    kind: NormKind,
    eps: f32,
    with_bias: bool,
) -> (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>) {
    let (x, shape) = as_rows::<B>(x);
    let (grad, _) = as_rows::<B>(grad);
    let (normed, rstd) = normalize(x, kind, eps);
    let grad_normed = grad.clone() * tensor::<B, 1>(weight).unsqueeze::<2>();
    let projection = (grad_normed.clone() * normed.clone()).mean_dim(1);
    let mut grad_x = grad_normed.clone() - normed.clone() * projection;
    if kind == NormKind::LayerNorm {
        grad_x = grad_x - grad_normed.mean_dim(1);
    }
    let grad_weight = (grad.clone() * normed).sum_dim(0).squeeze_dim::<1>(0);
    let grad_bias = with_bias.then(|| primitive(grad.sum_dim(0).squeeze_dim::<1>(0)));
    (restore(grad_x * rstd, shape), primitive(grad_weight), grad_bias)
}

/// Targets as `[rows, 1]` indices with ignored (negative) rows pointed at column 0, and the
/// `[rows, 1]` 0/1 mask of rows that count.
fn targets_and_mask<B: Backend>(targets: IntTensor<B>) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let targets = Tensor::<B, 1, Int>::from_primitive(targets).unsqueeze_dim::<2>(1);
    let keep = targets.clone().greater_equal_elem(0);
    (targets.clamp_min(0), keep.float())
}

pub fn cross_entropy<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> FloatTensor<B> {
    let logits = tensor::<B, 2>(logits);
    let (targets, keep) = targets_and_mask::<B>(targets);
    let picked = log_softmax(logits, 1).gather(1, targets);
    primitive((picked.neg() * keep).squeeze_dim::<1>(1))
}

pub fn cross_entropy_with_grad<B: Backend>(logits: FloatTensor<B>, targets: IntTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let loss = cross_entropy::<B>(logits.clone(), targets.clone());
    let logits = tensor::<B, 2>(logits);
    let (targets, keep) = targets_and_mask::<B>(targets);
    let onehot = logits.zeros_like().scatter(1, targets, keep.ones_like(), burn::tensor::IndexingUpdateOp::Add);
    (loss, primitive((softmax(logits, 1) - onehot) * keep))
}

pub fn scale_rows<B: Backend>(x: FloatTensor<B>, factors: FloatTensor<B>) -> FloatTensor<B> {
    primitive(tensor::<B, 2>(x) * tensor::<B, 1>(factors).unsqueeze_dim::<2>(1))
}

pub fn nf4_matmul<B: Backend>(x: FloatTensor<B>, weight: &Nf4Matrix, transpose: bool) -> FloatTensor<B> {
    let x = tensor::<B, 2>(x);
    let dense = Tensor::<B, 2>::from_data(TensorData::new(weight.dequantize(), weight.shape), &x.device());
    primitive(x.matmul(if transpose { dense.transpose() } else { dense }))
}
