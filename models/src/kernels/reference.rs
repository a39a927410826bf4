//! The fused ops written with Burn's tensor API: the default for backends without their own
//! kernels (CUDA, wgpu) and the reference the fused kernels are tested against.

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, sigmoid, silu, softmax};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Shape, TensorMetadata};

use super::{primitive, tensor, Scan, ScanPrimitives};
use crate::blocks::NormKind;
use crate::nf4::Nf4Matrix;
use crate::paged::PagedStep;

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

/// `[-second half, first half]` of the last dimension: the "rotate_half" of Hugging Face's Llama.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    Tensor::cat(vec![x.clone().narrow(3, half, half).neg(), x.narrow(3, 0, half)], 3)
}

pub fn rope<B: Backend>(x: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>) -> FloatTensor<B> {
    let x = tensor::<B, 4>(x);
    primitive(x.clone() * tensor::<B, 4>(cos) + rotate_half(x) * tensor::<B, 4>(sin))
}

/// rotate_half is a linear map whose transpose is minus itself: the gradient of
/// `x·cos + rotate_half(x)·sin` is `grad·cos − rotate_half(grad·sin)`.
pub fn rope_backward<B: Backend>(grad: FloatTensor<B>, cos: FloatTensor<B>, sin: FloatTensor<B>) -> FloatTensor<B> {
    let grad = tensor::<B, 4>(grad);
    primitive(grad.clone() * tensor::<B, 4>(cos) - rotate_half(grad * tensor::<B, 4>(sin)))
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

/// The causal convolution over `padded` (`width − 1` earlier inputs, then the new ones),
/// before the activation: `[batch, padded − width + 1, channels]`.
pub fn causal_conv<B: Backend>(padded: Tensor<B, 3>, weight: Tensor<B, 2>, bias: Tensor<B, 1>) -> Tensor<B, 3> {
    let [_, len, channels] = padded.dims();
    let width = weight.dims()[1];
    let seq = len - width + 1;
    let mut out = bias.reshape([1, 1, channels]);
    for tap in 0..width {
        out = out + padded.clone().narrow(1, tap, seq) * weight.clone().narrow(1, tap, 1).reshape([1, 1, channels]);
    }
    out
}

/// `x` after `width − 1` zero positions.
pub(crate) fn zero_history<B: Backend>(x: Tensor<B, 3>, width: usize) -> Tensor<B, 3> {
    let [batch, _, channels] = x.dims();
    Tensor::cat(vec![Tensor::zeros([batch, width - 1, channels], &x.device()), x], 1)
}

pub fn causal_conv_silu<B: Backend>(x: FloatTensor<B>, weight: FloatTensor<B>, bias: FloatTensor<B>) -> FloatTensor<B> {
    let weight = tensor::<B, 2>(weight);
    let padded = zero_history(tensor::<B, 3>(x), weight.dims()[1]);
    primitive(silu(causal_conv(padded, weight, tensor(bias))))
}

pub fn causal_conv_silu_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let weight = tensor::<B, 2>(weight);
    let [channels, width] = weight.dims();
    let x = tensor::<B, 3>(x);
    let seq = x.dims()[1];
    let padded = zero_history(x, width);
    let pre = causal_conv(padded.clone(), weight.clone(), tensor(bias));
    let s = sigmoid(pre.clone());
    let grad_pre = tensor::<B, 3>(grad) * s.clone() * ((s.neg() + 1.0) * pre + 1.0);
    // x[t] feeds outputs t .. t + width − 1 (tap width − 1 − j for output t + j).
    let [batch, _, _] = grad_pre.dims();
    let ahead = Tensor::cat(vec![grad_pre.clone(), Tensor::zeros([batch, width - 1, channels], &grad_pre.device())], 1);
    let mut grad_x = grad_pre.zeros_like();
    let mut grad_weight = Vec::with_capacity(width);
    for tap in 0..width {
        let w = weight.clone().narrow(1, tap, 1).reshape([1, 1, channels]);
        grad_x = grad_x + ahead.clone().narrow(1, width - 1 - tap, seq) * w;
        grad_weight.push((grad_pre.clone() * padded.clone().narrow(1, tap, seq)).sum_dim(1).sum_dim(0).reshape([channels, 1]));
    }
    let grad_bias = grad_pre.sum_dim(1).sum_dim(0).reshape([channels]);
    (primitive(grad_x), primitive(Tensor::cat(grad_weight, 1)), primitive(grad_bias))
}

/// Time steps per chunk of the chunked linear scan.
const SCAN_CHUNK: usize = 32;

/// `h_t = decay_t · h_{t−1} + input_t` along dim 1 of `[batch, seq, channels, state]`
/// tensors, from `h_0 = initial` (zeros when None); returns every `h_t`. Chunked: inside each
/// chunk a parallel (Hillis–Steele) scan composes the steps pairwise in log2(chunk) batched
/// ops, multiplying decays only (no division, so it stays finite however strong the decay);
/// then a short sequential pass carries the state across chunk boundaries.
pub fn linear_scan<B: Backend>(decay: Tensor<B, 4>, input: Tensor<B, 4>, initial: Option<Tensor<B, 3>>) -> Tensor<B, 4> {
    let [batch, seq, channels, state] = decay.dims();
    let device = decay.device();
    let chunk = SCAN_CHUNK.min(seq.next_power_of_two());
    let chunks = seq.div_ceil(chunk);
    let pad = chunks * chunk - seq;
    let (decay, input) = if pad == 0 {
        (decay, input)
    } else {
        // Identity steps (decay 1, input 0) fill the last chunk.
        let ones = Tensor::ones([batch, pad, channels, state], &device);
        (Tensor::cat(vec![decay, ones.clone()], 1), Tensor::cat(vec![input, ones.zeros_like()], 1))
    };
    let mut a: Tensor<B, 5> = decay.reshape([batch, chunks, chunk, channels, state]);
    let mut b: Tensor<B, 5> = input.reshape([batch, chunks, chunk, channels, state]);
    let mut step = 1;
    while step < chunk {
        let ones = Tensor::ones([batch, chunks, step, channels, state], &device);
        let a_before = Tensor::cat(vec![ones.clone(), a.clone().narrow(2, 0, chunk - step)], 2);
        let b_before = Tensor::cat(vec![ones.zeros_like(), b.clone().narrow(2, 0, chunk - step)], 2);
        b = b + a.clone() * b_before;
        a = a * a_before;
        step *= 2;
    }
    let chunk_end = |x: &Tensor<B, 5>, i: usize| x.clone().narrow(1, i, 1).narrow(2, chunk - 1, 1).reshape([batch, channels, state]);
    let mut carry = initial.unwrap_or_else(|| Tensor::zeros([batch, channels, state], &device));
    let mut carries = Vec::with_capacity(chunks);
    for i in 0..chunks {
        carries.push(carry.clone());
        carry = chunk_end(&a, i) * carry + chunk_end(&b, i);
    }
    let carries = Tensor::stack::<4>(carries, 1).unsqueeze_dim::<5>(2);
    (a * carries + b).reshape([batch, chunks * chunk, channels, state]).narrow(1, 0, seq)
}

/// `softplus(x) = ln(1 + eˣ)`, written so that large inputs neither overflow nor lose precision.
pub fn softplus<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clone().clamp_min(0.0) + x.abs().neg().exp().log1p()
}

/// The decay `exp(Δ·A)` and input `Δ·B·u` of every step, `[batch, seq, channels, state]`.
fn scan_terms<B: Backend>(u: Tensor<B, 3>, delta: Tensor<B, 3>, a: Tensor<B, 2>, b: Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let decay = (delta.clone().unsqueeze_dim::<4>(3) * a.unsqueeze::<4>()).exp();
    let input = (delta * u).unsqueeze_dim::<4>(3) * b.unsqueeze_dim::<4>(2);
    (decay, input)
}

/// Mamba's selective scan from state `initial` (zeros when None): the output `[batch, seq,
/// channels]` and the state after the last step `[batch, channels, state]`. See
/// [`super::selective_scan`] for the shapes.
pub fn selective_scan_with_state<B: Backend>(
    s: Scan<Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 1>>,
    initial: Option<Tensor<B, 3>>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let seq = s.u.dims()[1];
    let (decay, input) = scan_terms(s.u.clone(), softplus(s.dt), s.a, s.b);
    let h = linear_scan(decay, input, initial);
    let last = h.clone().narrow(1, seq - 1, 1).squeeze_dim::<3>(1);
    let y = (h * s.c.unsqueeze_dim::<4>(2)).sum_dim(3).squeeze_dim::<3>(3) + s.u * s.d.unsqueeze::<3>();
    (y, last)
}

pub fn selective_scan<B: Backend>(s: ScanPrimitives<B>) -> FloatTensor<B> {
    primitive(selective_scan_with_state(scan_tensors::<B>(s), None).0)
}

/// The scan one step at a time (T small ops per call): the definition the chunked scan and
/// the fused kernels are tested against.
pub fn selective_scan_sequential<B: Backend>(s: Scan<Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 1>>) -> Tensor<B, 3> {
    let [batch, seq, channels] = s.u.dims();
    let state = s.a.dims()[1];
    let (decay, input) = scan_terms(s.u.clone(), softplus(s.dt), s.a, s.b);
    let mut h = Tensor::<B, 3>::zeros([batch, channels, state], &s.u.device());
    let mut ys = Vec::with_capacity(seq);
    for t in 0..seq {
        h = decay.clone().narrow(1, t, 1).squeeze_dim::<3>(1) * h + input.clone().narrow(1, t, 1).squeeze_dim::<3>(1);
        ys.push((h.clone() * s.c.clone().narrow(1, t, 1)).sum_dim(2).reshape([batch, 1, channels]));
    }
    Tensor::cat(ys, 1) + s.u * s.d.unsqueeze::<3>()
}

/// Gradients of the selective scan. The state gradient runs backwards through time as a scan
/// of its own (`dh_t = C_t·dy_t + exp(Δ_{t+1}·A)·dh_{t+1}`), so it is chunked the same way.
pub fn selective_scan_backward<B: Backend>(s: ScanPrimitives<B>, grad: FloatTensor<B>) -> ScanPrimitives<B> {
    let Scan { u, dt, a, b, c, d } = scan_tensors::<B>(s);
    let delta = softplus(dt.clone());
    let grad = tensor::<B, 3>(grad);
    let [batch, seq, channels] = u.dims();
    let state = a.dims()[1];
    let (decay, input) = scan_terms(u.clone(), delta.clone(), a.clone(), b.clone());
    let h = linear_scan(decay.clone(), input, None);
    let zeros = Tensor::<B, 4>::zeros([batch, 1, channels, state], &u.device());
    let (h_before, decay_after) = if seq == 1 {
        (zeros.clone(), zeros.ones_like())
    } else {
        (
            Tensor::cat(vec![zeros.clone(), h.clone().narrow(1, 0, seq - 1)], 1),
            Tensor::cat(vec![decay.clone().narrow(1, 1, seq - 1), zeros.ones_like()], 1),
        )
    };
    let grad_4 = grad.clone().unsqueeze_dim::<4>(3);
    let dh_in = grad_4.clone() * c.unsqueeze_dim::<4>(2);
    let dh = linear_scan(decay_after.flip([1]), dh_in.flip([1]), None).flip([1]);
    let grad_c = (h * grad_4).sum_dim(2).squeeze_dim::<3>(2);
    let grad_d = (grad.clone() * u.clone()).sum_dim(1).sum_dim(0).reshape([channels]);
    // ∂L/∂(Δ·A) at every (t, channel, state).
    let dh_decay = dh.clone() * decay * h_before;
    let grad_a = (dh_decay.clone() * delta.clone().unsqueeze_dim::<4>(3)).sum_dim(1).sum_dim(0).reshape([channels, state]);
    let dh_b = (dh.clone() * b.unsqueeze_dim::<4>(2)).sum_dim(3).squeeze_dim::<3>(3);
    let grad_delta = (dh_decay * a.unsqueeze::<4>()).sum_dim(3).squeeze_dim::<3>(3) + dh_b.clone() * u.clone();
    let grad_dt = grad_delta * burn::tensor::activation::sigmoid(dt);
    let grad_b = (dh * (delta.clone() * u).unsqueeze_dim::<4>(3)).sum_dim(2).squeeze_dim::<3>(2);
    let grad_u = grad * d.unsqueeze::<3>() + dh_b * delta;
    Scan {
        u: primitive(grad_u),
        dt: primitive(grad_dt),
        a: primitive(grad_a),
        b: primitive(grad_b),
        c: primitive(grad_c),
        d: primitive(grad_d),
    }
}

fn scan_tensors<B: Backend>(s: ScanPrimitives<B>) -> Scan<Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 1>> {
    Scan { u: tensor(s.u), dt: tensor(s.dt), a: tensor(s.a), b: tensor(s.b), c: tensor(s.c), d: tensor(s.d) }
}

pub fn paged_kv_write<B: Backend>(pool: FloatTensor<B>, values: FloatTensor<B>, slots: &[usize]) -> FloatTensor<B> {
    let pool = tensor::<B, 3>(pool);
    let [_, heads, dim] = pool.dims();
    let device = pool.device();
    let values = tensor::<B, 4>(values).reshape([slots.len(), heads, dim]);
    let rows = slots.iter().map(|&s| s as i64).collect();
    let rows = Tensor::<B, 2, Int>::from_data(TensorData::new(rows, [slots.len(), 1]), &device);
    primitive(pool.scatter_nd(rows, values, burn::tensor::IndexingUpdateOp::Assign))
}

/// Every sequence's keys and values gathered from the pools one after another, and queries
/// masked to their own sequence's: the dense attention the paged kernel must equal.
pub fn paged_attention<B: super::FusedOps>(
    q: FloatTensor<B>,
    keys: FloatTensor<B>,
    values: FloatTensor<B>,
    step: &PagedStep,
    scale: f32,
) -> FloatTensor<B> {
    let q = tensor::<B, 4>(q);
    let device = q.device();
    let tokens = q.dims()[1];
    let rows: Vec<i64> = step.sequences.iter().flat_map(|s| (0..s.context).map(|p| step.slot(s, p) as i64)).collect();
    let total = rows.len();
    let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [total]), &device);
    let gather = |pool: FloatTensor<B>| tensor::<B, 3>(pool).select(0, rows.clone()).unsqueeze::<4>();
    let bias_heads = step.alibi.as_ref().map_or(1, Vec::len);
    let mut bias = vec![f32::NEG_INFINITY; bias_heads * tokens * total];
    let (mut token, mut key) = (0, 0);
    for s in &step.sequences {
        for i in 0..s.queries {
            let position = s.context - s.queries + i;
            for h in 0..bias_heads {
                for j in 0..s.context {
                    bias[(h * tokens + token + i) * total + key + j] = step.bias(position, j, h);
                }
            }
        }
        (token, key) = (token + s.queries, key + s.context);
    }
    let bias = Tensor::<B, 4>::from_data(TensorData::new(bias, [1, bias_heads, tokens, total]), &device);
    B::multi_head_attention(primitive(q), primitive(gather(keys)), primitive(gather(values)), primitive(bias), scale)
}
