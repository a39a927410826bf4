//! The fused ops on the flex CPU backend: one pass over memory per op, split across the
//! rayon pool in fixed-size pieces, inner loops vectorised through [`multiversion`]. Tensors
//! of other dtypes than f32 take the composed path.

use burn::backend::Flex;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Bytes, DType, Shape, TensorMetadata};
use burn_flex::{FlexTensor, Layout};
use rayon::prelude::*;

use super::math::{self, multiversion};
use super::{reference, FusedOps};
use crate::blocks::NormKind;

/// Elements per parallel task: big enough to amortise scheduling, small enough to balance.
const TASK_ELEMS: usize = 1 << 14;

/// Independent accumulators per reduction, so sums vectorise while staying deterministic.
const LANES: usize = 16;

impl FusedOps for Flex {
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let Some(x) = contiguous_f32(&x) else { return reference::gelu_tanh::<Self>(x) };
        let input = values(&x);
        let mut out = vec![0.0; input.len()];
        out.par_chunks_mut(TASK_ELEMS).zip(input.par_chunks(TASK_ELEMS)).for_each(|(out, x)| gelu_tanh_kernel(x, out));
        from_vec(x.shape(), out)
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(x), Some(grad)) = (contiguous_f32(&x), contiguous_f32(&grad)) else {
            return reference::gelu_tanh_backward::<Self>(x, grad);
        };
        let (input, grad_out) = (values(&x), values(&grad));
        let mut out = vec![0.0; input.len()];
        out.par_chunks_mut(TASK_ELEMS)
            .zip(input.par_chunks(TASK_ELEMS).zip(grad_out.par_chunks(TASK_ELEMS)))
            .for_each(|(out, (x, grad))| gelu_tanh_backward_kernel(x, grad, out));
        from_vec(x.shape(), out)
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(gate), Some(up)) = (contiguous_f32(&gate), contiguous_f32(&up)) else {
            return reference::swiglu::<Self>(gate, up);
        };
        let (g, u) = (values(&gate), values(&up));
        let mut out = vec![0.0; g.len()];
        out.par_chunks_mut(TASK_ELEMS)
            .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
            .for_each(|(out, (g, u))| swiglu_kernel(g, u, out));
        from_vec(gate.shape(), out)
    }

    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (Some(gate), Some(up), Some(grad)) = (contiguous_f32(&gate), contiguous_f32(&up), contiguous_f32(&grad)) else {
            return reference::swiglu_backward::<Self>(gate, up, grad);
        };
        let (g, u, dy) = (values(&gate), values(&up), values(&grad));
        let mut grad_gate = vec![0.0; g.len()];
        let mut grad_up = vec![0.0; g.len()];
        grad_gate
            .par_chunks_mut(TASK_ELEMS)
            .zip(grad_up.par_chunks_mut(TASK_ELEMS))
            .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)).zip(dy.par_chunks(TASK_ELEMS)))
            .for_each(|((dg, du), ((g, u), dy))| swiglu_backward_kernel(g, u, dy, dg, du));
        (from_vec(gate.shape(), grad_gate), from_vec(gate.shape(), grad_up))
    }

    fn attention_softmax(scores: FloatTensor<Self>, scale: f32, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(scores), Some(bias)) = (contiguous_f32(&scores), contiguous_f32(&bias)) else {
            return reference::attention_softmax::<Self>(scores, scale, bias);
        };
        let shape = scores.shape();
        let (dims, bias_dims) = (shape.as_slice(), bias.shape().to_vec());
        assert!(
            dims.len() == 4 && bias_dims.len() == 4 && bias_dims[3] == dims[3],
            "attention_softmax: scores {dims:?}, bias {bias_dims:?}"
        );
        let keys = dims[3];
        // Row (b, h, q) of the scores reads bias row (b or 0, h or 0, q or 0).
        let bias_row = |row: usize| {
            let (q, h, b) = (row % dims[2], (row / dims[2]) % dims[1], row / (dims[2] * dims[1]));
            let pick = |i: usize, axis: usize| if bias_dims[axis] == 1 { 0 } else { i };
            (pick(b, 0) * bias_dims[1] + pick(h, 1)) * bias_dims[2] + pick(q, 2)
        };
        let (x, bias_values) = (values(&scores), values(&bias));
        let mut out = vec![0.0; x.len()];
        let rows_per_task = (TASK_ELEMS / keys).max(1);
        out.par_chunks_mut(rows_per_task * keys).enumerate().for_each(|(task, out)| {
            for (i, out_row) in out.chunks_mut(keys).enumerate() {
                let row = task * rows_per_task + i;
                let bias = &bias_values[bias_row(row) * keys..][..keys];
                softmax_row(&x[row * keys..][..keys], bias, scale, out_row);
            }
        });
        from_vec(shape, out)
    }

    fn attention_softmax_backward(probs: FloatTensor<Self>, grad: FloatTensor<Self>, scale: f32) -> FloatTensor<Self> {
        let (Some(probs), Some(grad)) = (contiguous_f32(&probs), contiguous_f32(&grad)) else {
            return reference::attention_softmax_backward::<Self>(probs, grad, scale);
        };
        let shape = probs.shape();
        let keys = shape[shape.num_dims() - 1];
        let (y, dy) = (values(&probs), values(&grad));
        let mut out = vec![0.0; y.len()];
        let task = (TASK_ELEMS / keys).max(1) * keys;
        out.par_chunks_mut(task)
            .zip(y.par_chunks(task).zip(dy.par_chunks(task)))
            .for_each(|(out, (y, dy))| softmax_backward_rows(y, dy, scale, keys, out));
        from_vec(shape, out)
    }

    fn norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        kind: NormKind,
        eps: f32,
    ) -> FloatTensor<Self> {
        let bias_f32 = bias.as_ref().map(contiguous_f32);
        let (Some(x), Some(weight), None | Some(Some(_))) = (contiguous_f32(&x), contiguous_f32(&weight), &bias_f32) else {
            return reference::norm::<Self>(x, weight, bias, kind, eps);
        };
        let shape = x.shape();
        let dim = shape[shape.num_dims() - 1];
        let (input, w) = (values(&x), values(&weight));
        let b = bias_f32.as_ref().map(|b| values(b.as_ref().expect("checked above")));
        let mut out = vec![0.0; input.len()];
        let task = (TASK_ELEMS / dim).max(1) * dim;
        out.par_chunks_mut(task).zip(input.par_chunks(task)).for_each(|(out, x)| {
            for (out_row, x_row) in out.chunks_mut(dim).zip(x.chunks(dim)) {
                norm_row(x_row, w, b, kind == NormKind::LayerNorm, eps, out_row);
            }
        });
        from_vec(shape, out)
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: NormKind,
        eps: f32,
        with_bias: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
        let (Some(x), Some(weight), Some(grad)) = (contiguous_f32(&x), contiguous_f32(&weight), contiguous_f32(&grad)) else {
            return reference::norm_backward::<Self>(x, weight, grad, kind, eps, with_bias);
        };
        let shape = x.shape();
        let dim = shape[shape.num_dims() - 1];
        let (input, w, dy) = (values(&x), values(&weight), values(&grad));
        let mut grad_x = vec![0.0; input.len()];
        let task = (TASK_ELEMS / dim).max(1) * dim;
        // Each task returns its partial weight and bias gradients; they are summed in task order.
        let partials: Vec<(Vec<f32>, Vec<f32>)> = grad_x
            .par_chunks_mut(task)
            .zip(input.par_chunks(task).zip(dy.par_chunks(task)))
            .map(|(dx, (x, dy))| {
                let (mut dw, mut db) = (vec![0.0; dim], vec![0.0; dim]);
                for ((dx, x), dy) in dx.chunks_mut(dim).zip(x.chunks(dim)).zip(dy.chunks(dim)) {
                    norm_backward_row(x, w, dy, kind == NormKind::LayerNorm, eps, dx, &mut dw, &mut db);
                }
                (dw, db)
            })
            .collect();
        let (mut grad_w, mut grad_b) = (vec![0.0; dim], vec![0.0; dim]);
        for (dw, db) in &partials {
            add_assign(&mut grad_w, dw);
            add_assign(&mut grad_b, db);
        }
        let grad_b = with_bias.then(|| from_vec(Shape::new([dim]), grad_b));
        (from_vec(shape, grad_x), from_vec(Shape::new([dim]), grad_w), grad_b)
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let Some(logits) = contiguous_f32(&logits) else { return reference::cross_entropy::<Self>(logits, targets) };
        let &[rows, vocab] = logits.shape().as_slice() else { panic!("cross_entropy: logits must be [rows, vocab]") };
        let targets = target_indices(&targets, rows, vocab);
        let x = values(&logits);
        let mut loss = vec![0.0; rows];
        loss.par_iter_mut().zip(x.par_chunks(vocab)).zip(targets.par_iter()).for_each(|((loss, row), &target)| {
            if let Some(target) = target {
                *loss = log_sum_exp(row) - row[target];
            }
        });
        from_vec(Shape::new([rows]), loss)
    }

    fn cross_entropy_with_grad(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(logits) = contiguous_f32(&logits) else { return reference::cross_entropy_with_grad::<Self>(logits, targets) };
        let shape = logits.shape();
        let &[rows, vocab] = shape.as_slice() else { panic!("cross_entropy: logits must be [rows, vocab]") };
        let targets = target_indices(&targets, rows, vocab);
        let x = values(&logits);
        let mut loss = vec![0.0; rows];
        let mut grad = vec![0.0; x.len()];
        grad.par_chunks_mut(vocab).zip(loss.par_iter_mut()).zip(x.par_chunks(vocab)).zip(targets.par_iter()).for_each(
            |(((grad, loss), x), &target)| {
                if let Some(target) = target {
                    *loss = softmax_and_log_sum_exp(x, grad) - x[target];
                    grad[target] -= 1.0;
                }
            },
        );
        (from_vec(Shape::new([rows]), loss), from_vec(shape, grad))
    }

    fn scale_rows(x: FloatTensor<Self>, factors: FloatTensor<Self>) -> FloatTensor<Self> {
        let Some(factors) = contiguous_f32(&factors) else { return reference::scale_rows::<Self>(x, factors) };
        if x.dtype() != DType::F32 {
            return reference::scale_rows::<Self>(x, factors);
        }
        let mut x = {
            let contiguous = x.to_contiguous();
            // Dropping the original handle leaves the buffer unshared, so it is written in place
            // (the usual case: the unit gradient saved by the forward pass).
            drop(x);
            contiguous
        };
        let factors = values(&factors);
        let cols = x.shape()[1];
        x.storage_mut::<f32>().par_chunks_mut(cols).zip(factors.par_iter()).for_each(|(row, &f)| scale_kernel(row, f));
        x
    }
}

/// The tensor as contiguous f32, or None when it holds another dtype.
fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

fn from_vec(shape: Shape, data: Vec<f32>) -> FlexTensor {
    FlexTensor::new(Bytes::from_elems(data), Layout::contiguous(shape), DType::F32)
}

/// Targets as column indices, `None` for ignored (negative) rows.
fn target_indices(targets: &IntTensor<Flex>, rows: usize, vocab: usize) -> Vec<Option<usize>> {
    let targets = targets.to_contiguous();
    let raw: Vec<i64> = match targets.dtype() {
        DType::I64 => targets.as_slice::<i64>().expect("contiguous").to_vec(),
        DType::I32 => targets.as_slice::<i32>().expect("contiguous").iter().map(|&t| t as i64).collect(),
        other => panic!("cross_entropy: integer targets expected, got {other:?}"),
    };
    assert_eq!(raw.len(), rows, "cross_entropy: one target per row");
    raw.into_iter()
        .map(|t| {
            assert!(t < vocab as i64, "cross_entropy: target {t} outside a vocabulary of {vocab}");
            (t >= 0).then_some(t as usize)
        })
        .collect()
}

fn add_assign(into: &mut [f32], from: &[f32]) {
    into.iter_mut().zip(from).for_each(|(a, b)| *a += b);
}

/// Sum of `f(a_i)` with `LANES` independent accumulators.
#[inline(always)]
fn sum_by(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        for lane in 0..LANES {
            acc[lane] += f(chunk[lane]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of `f(a_i, b_i)` with `LANES` independent accumulators.
#[inline(always)]
fn sum_by2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(&x, &y)| f(x, y)).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            acc[lane] += f(x[lane], y[lane]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Sum of `f(a_i, b_i, c_i)` with `LANES` independent accumulators.
#[inline(always)]
fn sum_by3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (a_chunks, b_chunks, c_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).zip(c_chunks.remainder()).map(|((&x, &y), &z)| f(x, y, z)).sum();
    for ((x, y), z) in a_chunks.zip(b_chunks).zip(c_chunks) {
        for lane in 0..LANES {
            acc[lane] += f(x[lane], y[lane], z[lane]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max_of(a: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for chunk in chunks {
        for lane in 0..LANES {
            acc[lane] = if chunk[lane] > acc[lane] { chunk[lane] } else { acc[lane] };
        }
    }
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

/// `(1 + tanh(u), 1 − tanh(u))` without cancellation: from `e = exp(−2|u|)`, each is `2/(1+e)`
/// or `2e/(1+e)` by the sign of `u`. (`1 − tanh²` from `tanh` loses most digits in the tails.)
#[inline(always)]
fn one_plus_minus_tanh(u: f32) -> (f32, f32) {
    let e = math::exp(-2.0 * u.abs());
    let r = 2.0 / (1.0 + e);
    if u >= 0.0 {
        (r, e * r)
    } else {
        (e * r, r)
    }
}

multiversion! {
    fn gelu_tanh_kernel(x: &[f32], out: &mut [f32]) {
        for (out, &x) in out.iter_mut().zip(x) {
            let (one_plus_t, _) = one_plus_minus_tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x));
            *out = 0.5 * x * one_plus_t;
        }
    }
}

multiversion! {
    fn gelu_tanh_backward_kernel(x: &[f32], grad: &[f32], out: &mut [f32]) {
        for ((out, &x), &grad) in out.iter_mut().zip(x).zip(grad) {
            let x2 = x * x;
            let (one_plus_t, one_minus_t) = one_plus_minus_tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x2 * x));
            let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x2);
            *out = grad * 0.5 * one_plus_t * (1.0 + x * one_minus_t * du);
        }
    }
}

multiversion! {
    fn swiglu_kernel(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((out, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *out = g * math::sigmoid(g) * u;
        }
    }
}

multiversion! {
    fn swiglu_backward_kernel(gate: &[f32], up: &[f32], grad: &[f32], grad_gate: &mut [f32], grad_up: &mut [f32]) {
        for (((dg, du), (&g, &u)), &dy) in grad_gate.iter_mut().zip(grad_up.iter_mut()).zip(gate.iter().zip(up)).zip(grad) {
            let s = math::sigmoid(g);
            *dg = dy * u * s * (1.0 + g * (1.0 - s));
            *du = dy * g * s;
        }
    }
}

multiversion! {
    fn softmax_row(x: &[f32], bias: &[f32], scale: f32, out: &mut [f32]) {
        for ((out, &x), &b) in out.iter_mut().zip(x).zip(bias) {
            *out = x * scale + b;
        }
        let max = max_of(out);
        if max == f32::NEG_INFINITY {
            // A fully masked row attends to nothing.
            out.fill(0.0);
            return;
        }
        out.iter_mut().for_each(|v| *v = math::exp(*v - max));
        let inv_sum = 1.0 / sum_by(out, |v| v);
        out.iter_mut().for_each(|v| *v *= inv_sum);
    }
}

multiversion! {
    fn softmax_backward_rows(probs: &[f32], grad: &[f32], scale: f32, keys: usize, out: &mut [f32]) {
        for ((out, y), dy) in out.chunks_mut(keys).zip(probs.chunks(keys)).zip(grad.chunks(keys)) {
            let dot = sum_by2(y, dy, |y, dy| y * dy);
            for ((out, &y), &dy) in out.iter_mut().zip(y).zip(dy) {
                *out = scale * y * (dy - dot);
            }
        }
    }
}

multiversion! {
    fn norm_row(x: &[f32], weight: &[f32], bias: Option<&[f32]>, centre: bool, eps: f32, out: &mut [f32]) {
        let n = x.len() as f32;
        let mean = if centre { sum_by(x, |v| v) / n } else { 0.0 };
        let rstd = 1.0 / (sum_by(x, |v| (v - mean) * (v - mean)) / n + eps).sqrt();
        for ((out, &x), &w) in out.iter_mut().zip(x).zip(weight) {
            *out = (x - mean) * rstd * w;
        }
        if let Some(bias) = bias {
            out.iter_mut().zip(bias).for_each(|(out, &b)| *out += b);
        }
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn norm_backward_row(
        x: &[f32],
        weight: &[f32],
        grad: &[f32],
        centre: bool,
        eps: f32,
        grad_x: &mut [f32],
        grad_weight: &mut [f32],
        grad_bias: &mut [f32],
    ) {
        let n = x.len() as f32;
        let mean = if centre { sum_by(x, |v| v) / n } else { 0.0 };
        let rstd = 1.0 / (sum_by(x, |v| (v - mean) * (v - mean)) / n + eps).sqrt();
        // grad_x = rstd · (g·w − mean(g·w) − x̂ · mean(g·w·x̂)); the first mean only for LayerNorm.
        let mean_gw = if centre { sum_by2(grad, weight, |g, w| g * w) / n } else { 0.0 };
        let mean_gwx = sum_by3(x, grad, weight, |x, g, w| g * w * (x - mean) * rstd) / n;
        for (i, ((&x, &g), &w)) in x.iter().zip(grad).zip(weight).enumerate() {
            let xhat = (x - mean) * rstd;
            grad_x[i] = rstd * (g * w - mean_gw - xhat * mean_gwx);
            grad_weight[i] += g * xhat;
            grad_bias[i] += g;
        }
    }
}

multiversion! {
    fn log_sum_exp(x: &[f32]) -> f32 {
        let max = max_of(x);
        max + sum_by(x, |v| math::exp(v - max)).ln()
    }
}

multiversion! {
    /// Writes `softmax(x)` to `out` and returns `logsumexp(x)`, with one `exp` per element.
    fn softmax_and_log_sum_exp(x: &[f32], out: &mut [f32]) -> f32 {
        let max = max_of(x);
        for (out, &x) in out.iter_mut().zip(x) {
            *out = math::exp(x - max);
        }
        let sum = sum_by(out, |v| v);
        let inv_sum = 1.0 / sum;
        out.iter_mut().for_each(|v| *v *= inv_sum);
        max + sum.ln()
    }
}

multiversion! {
    fn scale_kernel(x: &mut [f32], factor: f32) {
        x.iter_mut().for_each(|v| *v *= factor);
    }
}
