//! The fused ops on the flex CPU backend: one pass over memory per op, split across the
//! rayon pool in fixed-size pieces, inner loops vectorised through [`multiversion`]. Tensors
//! of other dtypes than f32 take the composed path.

use burn::backend::Flex;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Bytes, DType, Shape, TensorMetadata};
use burn_flex::{FlexTensor, Layout};
use rayon::prelude::*;

use super::math::{self, multiversion};
use super::{flex_mamba, reference, AttentionSaved, FusedOps, ScanPrimitives};
use crate::blocks::NormKind;
use crate::paged::PagedStep;

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

    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let [Some(x), Some(cos), Some(sin)] = [&x, &cos, &sin].map(contiguous_f32) else {
            return reference::rope::<Self>(x, cos, sin);
        };
        rotate(&x, &cos, &sin, 1.0)
    }

    fn rope_backward(grad: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let [Some(grad), Some(cos), Some(sin)] = [&grad, &cos, &sin].map(contiguous_f32) else {
            return reference::rope_backward::<Self>(grad, cos, sin);
        };
        rotate(&grad, &cos, &sin, -1.0)
    }

    fn multi_head_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let inputs = [&q, &k, &v, &bias].map(contiguous_f32);
        let [Some(q), Some(k), Some(v), Some(bias)] = inputs else {
            return reference::attention_forward::<Self>(q, k, v, bias, scale);
        };
        let dims = AttentionDims::new(&q, &k, bias.shape().dims());
        let AttentionDims { batch, queries, keys, heads, dim, .. } = dims;
        let (q, k, v, bias) = (values(&q), values(&k), values(&v), values(&bias));
        let mut out = vec![0.0; batch * queries * heads * dim];
        let mut probs = vec![0.0; batch * heads * queries * keys];
        let out_ptr = SharedMut(out.as_mut_ptr());
        // One task per (batch, head), in blocks of query rows: scores = q·kᵀ straight from the
        // strided inputs over the keys some row of the block sees (a causal mask's block sees
        // the keys up to its last row: half the work at long context), softmax in place, then
        // probs·v written into this head's columns of the output. Probabilities outside stay 0.
        probs.par_chunks_mut(queries * keys).enumerate().for_each(|(task, probs)| {
            let (b, h) = (task / heads, task % heads);
            let out_ptr = &out_ptr;
            let (q_at, kv_at) = (dims.q_offset(b, h), dims.kv_offset(b, h));
            for first in (0..queries).step_by(ROW_BLOCK) {
                let rows = ROW_BLOCK.min(queries - first);
                let bias_row = |i: usize| &bias[dims.bias_offset(b, h, i)..][..keys];
                let (lo, hi) = span((first..first + rows).map(&bias_row), |x| x > f32::NEG_INFINITY);
                if lo >= hi {
                    continue;
                }
                let block = &mut probs[first * keys..(first + rows) * keys];
                // Safety: every strided element lies inside its buffer (shapes checked by
                // AttentionDims::new), and each task writes only head h's columns of `out`.
                unsafe {
                    let (q, k) = (q.as_ptr().add(q_at + first * dims.q_row()), k.as_ptr().add(kv_at + lo * dims.kv_row()));
                    matmul([rows, hi - lo, dim], (block.as_mut_ptr().add(lo), keys, 1), false, (q, dims.q_row(), 1), (k, 1, dims.kv_row()));
                }
                for (i, row) in block.chunks_mut(keys).enumerate() {
                    softmax_in_place(&mut row[lo..hi], &bias_row(first + i)[lo..hi], scale);
                }
                unsafe {
                    let (out, v) = (out_ptr.0.add(q_at + first * dims.q_row()), v.as_ptr().add(kv_at + lo * dims.kv_row()));
                    matmul([rows, dim, hi - lo], (out, dims.q_row(), 1), false, (block.as_ptr().add(lo), keys, 1), (v, dims.kv_row(), 1));
                }
            }
        });
        (from_vec(Shape::new([batch, queries, heads, dim]), out), from_vec(Shape::new([batch, heads, queries, keys]), probs))
    }

    fn paged_kv_write(pool: FloatTensor<Self>, rows: FloatTensor<Self>, slots: &[usize]) -> FloatTensor<Self> {
        let in_pool = pool.layout().contiguous_offsets().filter(|_| pool.dtype() == DType::F32);
        let (Some(written), Some((start, end))) = (contiguous_f32(&rows), in_pool) else {
            return reference::paged_kv_write::<Self>(pool, rows, slots);
        };
        let mut pool = pool;
        let row = written.shape().num_elements() / slots.len().max(1);
        // In place when the pool is not shared (the cache hands it over for the write).
        let dst = &mut pool.storage_mut::<f32>()[start..end];
        for (&slot, src) in slots.iter().zip(values(&written).chunks_exact(row)) {
            dst[slot * row..][..row].copy_from_slice(src);
        }
        pool
    }

    fn paged_attention(
        q: FloatTensor<Self>,
        key_pool: FloatTensor<Self>,
        value_pool: FloatTensor<Self>,
        step: &PagedStep,
        scale: f32,
    ) -> FloatTensor<Self> {
        let [Some(q), Some(keys), Some(vals)] = [&q, &key_pool, &value_pool].map(contiguous_f32) else {
            return reference::paged_attention::<Self>(q, key_pool, value_pool, step, scale);
        };
        let [_, tokens, heads, dim] = q.shape().dims();
        let kv_heads = keys.shape().dims::<3>()[1];
        let group = heads / kv_heads;
        let (q, k, v) = (values(&q), values(&keys), values(&vals));
        let mut out = vec![0.0; tokens * heads * dim];
        let out_ptr = SharedMut(out.as_mut_ptr());
        let firsts: Vec<usize> = step.sequences.iter().scan(0, |token, s| Some(std::mem::replace(token, *token + s.queries))).collect();
        let (bs, kv_row, q_row) = (step.block_size, kv_heads * dim, heads * dim);
        // One task per (sequence, key/value head): scores against each block of the sequence's
        // table straight from the pool, softmax under the step's mask, then probs·v block by block.
        (0..step.sequences.len() * kv_heads).into_par_iter().for_each(|task| {
            let (s, g) = (&step.sequences[task / kv_heads], task % kv_heads);
            let (first_token, first_position) = (firsts[task / kv_heads], s.context - s.queries);
            let (queries, context) = (s.queries, s.context);
            let out_ptr = &out_ptr;
            let mut scores = vec![0.0; queries * context];
            let mut bias = vec![0.0; context];
            for h in g * group..(g + 1) * group {
                let q_at = (first_token * heads + h) * dim;
                let blocks = s
                    .table
                    .iter()
                    .enumerate()
                    .take(context.div_ceil(bs))
                    .map(|(b, &block)| (b * bs, bs.min(context - b * bs), (block as usize * bs * kv_heads + g) * dim));
                if queries == 1 {
                    // A decode token: dot products and a weighted sum of rows, no matmul calls
                    // (tens of thousands of 1×16 products per step would cost more in calls).
                    let query = &q[q_at..q_at + dim];
                    for (start, n, kv_at) in blocks.clone() {
                        dot_rows(query, &k[kv_at..kv_at + (n - 1) * kv_row + dim], kv_row, &mut scores[start..start + n]);
                    }
                    bias.iter_mut().enumerate().for_each(|(j, b)| *b = step.bias(first_position, j, h));
                    softmax_in_place(&mut scores, &bias, scale);
                    // Safety: this task alone writes head h's columns of its sequence's row.
                    let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.0.add(q_at), dim) };
                    for (start, n, kv_at) in blocks {
                        add_weighted_rows(&scores[start..start + n], &v[kv_at..kv_at + (n - 1) * kv_row + dim], kv_row, out);
                    }
                    continue;
                }
                for (start, n, kv_at) in blocks.clone() {
                    // Safety: the block's rows lie inside the pool, the sequence's queries inside q.
                    unsafe {
                        matmul(
                            [queries, n, dim],
                            (scores.as_mut_ptr().add(start), context, 1),
                            false,
                            (q.as_ptr().add(q_at), q_row, 1),
                            (k.as_ptr().add(kv_at), 1, kv_row),
                        );
                    }
                }
                for (i, row) in scores.chunks_mut(context).enumerate() {
                    bias.iter_mut().enumerate().for_each(|(j, b)| *b = step.bias(first_position + i, j, h));
                    softmax_in_place(row, &bias, scale);
                }
                for (start, n, kv_at) in blocks {
                    // Safety: as above; this task alone writes head h's columns of its sequence's rows.
                    unsafe {
                        matmul(
                            [queries, dim, n],
                            (out_ptr.0.add(q_at), q_row, 1),
                            start > 0,
                            (scores.as_ptr().add(start), context, 1),
                            (v.as_ptr().add(kv_at), kv_row, 1),
                        );
                    }
                }
            }
        });
        from_vec(Shape::new([1, tokens, heads, dim]), out)
    }

    fn multi_head_attention_backward(
        saved: AttentionSaved<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let AttentionSaved { q, k, v, kept: probs, .. } = saved;
        let inputs = [&q, &k, &v, &probs, &grad].map(contiguous_f32);
        let [Some(q), Some(k), Some(v), Some(probs), Some(grad)] = inputs else {
            return reference::attention_backward::<Self>(q, k, v, probs, grad, scale);
        };
        let [_, _, queries, keys] = probs.shape().dims();
        let dims = AttentionDims::new(&q, &k, [1, 1, queries, keys]);
        let AttentionDims { batch, heads, kv_heads, group, dim, .. } = dims;
        let (q, k, v, probs, grad) = (values(&q), values(&k), values(&v), values(&probs), values(&grad));
        let mut grad_q = vec![0.0; q.len()];
        let mut grad_k = vec![0.0; k.len()];
        let mut grad_v = vec![0.0; v.len()];
        let outs = [SharedMut(grad_q.as_mut_ptr()), SharedMut(grad_k.as_mut_ptr()), SharedMut(grad_v.as_mut_ptr())];
        // One task per (batch, key/value head): the query heads sharing it add their key and
        // value gradients one after another, in a fixed order, without racing. Blocks of query
        // rows read only the keys they gave probability to (a zero probability adds nothing).
        (0..batch * kv_heads).into_par_iter().for_each(|task| {
            let (b, kv_head) = (task / kv_heads, task % kv_heads);
            let [grad_q, grad_k, grad_v] = &outs;
            let mut grad_scores = vec![0.0; ROW_BLOCK * keys];
            for h in kv_head * group..(kv_head + 1) * group {
                let probs = &probs[(b * heads + h) * queries * keys..][..queries * keys];
                let (q_at, kv_at) = (dims.q_offset(b, h), dims.kv_offset(b, h));
                for first in (0..queries).step_by(ROW_BLOCK) {
                    let rows = ROW_BLOCK.min(queries - first);
                    let p = &probs[first * keys..(first + rows) * keys];
                    let (lo, hi) = span(p.chunks(keys), |x| x != 0.0);
                    if lo >= hi {
                        continue;
                    }
                    let (q_at, kv_at) = (q_at + first * dims.q_row(), kv_at + lo * dims.kv_row());
                    // Safety: every strided element lies inside its buffer; head h's columns of
                    // grad_q and this key/value head's columns of grad_k and grad_v are this task's.
                    unsafe {
                        let (q, k, v, dout) = (q.as_ptr().add(q_at), k.as_ptr().add(kv_at), v.as_ptr().add(kv_at), grad.as_ptr().add(q_at));
                        let scores = grad_scores.as_mut_ptr().add(lo);
                        // d probs = d out · vᵀ; d scores = scale · p ∘ (d probs − rowdot(d probs, p)).
                        matmul([rows, hi - lo, dim], (scores, keys, 1), false, (dout, dims.q_row(), 1), (v, 1, dims.kv_row()));
                        for (p, g) in p.chunks(keys).zip(grad_scores.chunks_mut(keys)) {
                            softmax_backward_in_place(&p[lo..hi], &mut g[lo..hi], scale, hi - lo);
                        }
                        let scores = grad_scores.as_ptr().add(lo);
                        // d q = d scores · k; d k += d scoresᵀ · q; d v += pᵀ · d out.
                        matmul(
                            [rows, dim, hi - lo],
                            (grad_q.0.add(q_at), dims.q_row(), 1),
                            false,
                            (scores, keys, 1),
                            (k, dims.kv_row(), 1),
                        );
                        matmul(
                            [hi - lo, dim, rows],
                            (grad_k.0.add(kv_at), dims.kv_row(), 1),
                            true,
                            (scores, 1, keys),
                            (q, dims.q_row(), 1),
                        );
                        matmul(
                            [hi - lo, dim, rows],
                            (grad_v.0.add(kv_at), dims.kv_row(), 1),
                            true,
                            (p.as_ptr().add(lo), 1, keys),
                            (dout, dims.q_row(), 1),
                        );
                    }
                }
            }
        });
        let kv_shape = Shape::new([batch, dims.keys, kv_heads, dim]);
        (from_vec(Shape::new([batch, queries, heads, dim]), grad_q), from_vec(kv_shape.clone(), grad_k), from_vec(kv_shape, grad_v))
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

    fn causal_conv_silu(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        flex_mamba::causal_conv_silu(x, weight, bias)
    }

    fn causal_conv_silu_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        flex_mamba::causal_conv_silu_backward(x, weight, bias, grad)
    }

    fn selective_scan(inputs: ScanPrimitives<Self>) -> FloatTensor<Self> {
        flex_mamba::selective_scan(inputs)
    }

    fn selective_scan_backward(inputs: ScanPrimitives<Self>, grad: FloatTensor<Self>) -> ScanPrimitives<Self> {
        flex_mamba::selective_scan_backward(inputs, grad)
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

/// Each head of contiguous `x` `[batch, seq, heads, head_dim]` turned by the angles of its
/// position (`cos`, `sin` `[1 or batch, seq, 1, head_dim]`); `direction` −1 turns it back (the
/// backward pass). One task per run of positions, every head of a position at once.
fn rotate(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, direction: f32) -> FlexTensor {
    let shape = x.shape();
    let (seq, heads, head_dim) = (shape[1], shape[2], shape[3]);
    let table_rows = cos.shape()[0] * seq;
    let (input, cos, sin) = (values(x), values(cos), values(sin));
    let row = heads * head_dim;
    let mut out = vec![0.0; input.len()];
    let rows_per_task = (TASK_ELEMS / row).max(1);
    out.par_chunks_mut(rows_per_task * row).zip(input.par_chunks(rows_per_task * row)).enumerate().for_each(|(task, (out, x))| {
        for (r, (out, x)) in out.chunks_mut(row).zip(x.chunks(row)).enumerate() {
            // Tables with one batch row serve every batch row.
            let t = (task * rows_per_task + r) % table_rows;
            let angles = t * head_dim..(t + 1) * head_dim;
            for (out, x) in out.chunks_mut(head_dim).zip(x.chunks(head_dim)) {
                rope_kernel(x, &cos[angles.clone()], &sin[angles.clone()], direction, out);
            }
        }
    });
    from_vec(shape, out)
}

/// Sizes and strides of one attention call over `[batch, seq, heads, head_dim]` buffers.
#[derive(Clone, Copy)]
struct AttentionDims {
    batch: usize,
    queries: usize,
    keys: usize,
    heads: usize,
    kv_heads: usize,
    group: usize,
    dim: usize,
    /// Bias extent over `[batch, heads]` (1 where it broadcasts).
    bias_dims: [usize; 2],
}

impl AttentionDims {
    fn new(q: &FlexTensor, k: &FlexTensor, bias: [usize; 4]) -> Self {
        let [batch, queries, heads, dim] = q.shape().dims();
        let [k_batch, keys, kv_heads, k_dim] = k.shape().dims();
        assert!(
            k_batch == batch && k_dim == dim && kv_heads > 0 && heads % kv_heads == 0,
            "attention: q {:?} does not match k {:?}",
            q.shape(),
            k.shape()
        );
        let broadcasts = |extent: usize, full: usize| extent == 1 || extent == full;
        assert!(
            broadcasts(bias[0], batch) && broadcasts(bias[1], heads) && bias[2] == queries && bias[3] == keys,
            "attention: bias {bias:?} for {queries} queries and {keys} keys"
        );
        Self { batch, queries, keys, heads, kv_heads, group: heads / kv_heads, dim, bias_dims: [bias[0], bias[1]] }
    }

    /// Row stride of q, the output and its gradient.
    fn q_row(&self) -> usize {
        self.heads * self.dim
    }

    /// Row stride of k and v.
    fn kv_row(&self) -> usize {
        self.kv_heads * self.dim
    }

    fn q_offset(&self, b: usize, h: usize) -> usize {
        (b * self.queries * self.heads + h) * self.dim
    }

    /// Where the key/value head serving query head `h` starts.
    fn kv_offset(&self, b: usize, h: usize) -> usize {
        (b * self.keys * self.kv_heads + h / self.group) * self.dim
    }

    fn bias_offset(&self, b: usize, h: usize, query: usize) -> usize {
        let pick = |i: usize, axis: usize| if self.bias_dims[axis] == 1 { 0 } else { i };
        ((pick(b, 0) * self.bias_dims[1] + pick(h, 1)) * self.queries + query) * self.keys
    }
}

/// Query rows attention handles together: the keys a block reads are those any of its rows sees.
const ROW_BLOCK: usize = 64;

/// The smallest range of columns holding every element of `rows` that passes `keep` (empty: lo ≥ hi).
fn span<'a>(rows: impl Iterator<Item = &'a [f32]>, keep: impl Fn(f32) -> bool) -> (usize, usize) {
    rows.fold((usize::MAX, 0), |(lo, hi), row| {
        let first = row.iter().position(|&x| keep(x)).unwrap_or(usize::MAX);
        let last = row.iter().rposition(|&x| keep(x)).map_or(0, |j| j + 1);
        (lo.min(first), hi.max(last))
    })
}

/// A raw output pointer that parallel tasks share, each writing only its own elements.
struct SharedMut(*mut f32);
// Safety: the tasks that share it write disjoint elements (see each use).
unsafe impl Sync for SharedMut {}

/// A matrix operand: pointer, row stride, column stride (in elements).
type Strided<P> = (P, usize, usize);

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` (added to `dst` when `accumulate`), single-threaded since
/// callers run many at once.
///
/// # Safety
/// Every strided element of the three operands must lie inside its allocation.
unsafe fn matmul([m, n, k]: [usize; 3], dst: Strided<*mut f32>, accumulate: bool, lhs: Strided<*const f32>, rhs: Strided<*const f32>) {
    let s = |stride: usize| stride as isize;
    gemm::gemm(
        m,
        n,
        k,
        dst.0,
        s(dst.2),
        s(dst.1),
        accumulate,
        lhs.0,
        s(lhs.2),
        s(lhs.1),
        rhs.0,
        s(rhs.2),
        s(rhs.1),
        1.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// The tensor as contiguous f32, or None when it holds another dtype.
pub(super) fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

pub(super) fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

pub(super) fn from_vec(shape: Shape, data: Vec<f32>) -> FlexTensor {
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
    /// One head: `out = x·cos + rotate_half(x)·sin`, rotate_half(x) = [−x₂, x₁]; direction −1
    /// applies the transpose instead, `x·cos − rotate_half(x·sin)`.
    fn rope_kernel(x: &[f32], cos: &[f32], sin: &[f32], direction: f32, out: &mut [f32]) {
        let half = x.len() / 2;
        let (x1, x2) = x.split_at(half);
        let (out1, out2) = out.split_at_mut(half);
        let (cos1, cos2) = cos.split_at(half);
        let (sin1, sin2) = sin.split_at(half);
        // Forward: out₁ = x₁cos₁ − x₂sin₁, out₂ = x₂cos₂ + x₁sin₂.
        // Backward: out₁ = x₁cos₁ + x₂sin₂, out₂ = x₂cos₂ − x₁sin₁.
        let (s1, s2) = if direction > 0.0 { (sin1, sin2) } else { (sin2, sin1) };
        for i in 0..half {
            out1[i] = x1[i] * cos1[i] - direction * x2[i] * s1[i];
            out2[i] = x2[i] * cos2[i] + direction * x1[i] * s2[i];
        }
    }
}

multiversion! {
    /// `scores[j] = query · row j` for rows `stride` apart in `rows`.
    fn dot_rows(query: &[f32], rows: &[f32], stride: usize, scores: &mut [f32]) {
        let dim = query.len();
        for (j, score) in scores.iter_mut().enumerate() {
            *score = sum_by2(query, &rows[j * stride..j * stride + dim], |a, b| a * b);
        }
    }
}

multiversion! {
    /// `out += Σ weights[j] · row j` for rows `stride` apart in `rows`.
    fn add_weighted_rows(weights: &[f32], rows: &[f32], stride: usize, out: &mut [f32]) {
        let dim = out.len();
        for (j, &w) in weights.iter().enumerate() {
            for (o, &x) in out.iter_mut().zip(&rows[j * stride..j * stride + dim]) {
                *o += w * x;
            }
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
    /// `row ← softmax(row · scale + bias)`.
    fn softmax_in_place(row: &mut [f32], bias: &[f32], scale: f32) {
        for (v, &b) in row.iter_mut().zip(bias) {
            *v = *v * scale + b;
        }
        let max = max_of(row);
        if max == f32::NEG_INFINITY {
            // A fully masked row attends to nothing.
            row.fill(0.0);
            return;
        }
        row.iter_mut().for_each(|v| *v = math::exp(*v - max));
        let inv_sum = 1.0 / sum_by(row, |v| v);
        row.iter_mut().for_each(|v| *v *= inv_sum);
    }
}

multiversion! {
    /// `grad ← scale · p ∘ (grad − rowdot(grad, p))`, row by row: the softmax backward.
    fn softmax_backward_in_place(probs: &[f32], grad: &mut [f32], scale: f32, keys: usize) {
        for (p, g) in probs.chunks(keys).zip(grad.chunks_mut(keys)) {
            let dot = sum_by2(p, g, |p, g| p * g);
            for (g, &p) in g.iter_mut().zip(p) {
                *g = scale * p * (*g - dot);
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
