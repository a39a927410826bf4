//! The fused ops as CubeCL kernels, for Burn's CubeCL backends (wgpu, CUDA): one `#[cube]`
//! source that CubeCL compiles for each runtime, launched on the backend's own tensors.
//!
//! Every kernel computes in f32 whatever the tensors store (f32, or f16 under fp16-mixed), and
//! each is tested against the composition in [`super::reference`] on the same device
//! (`trainer/tests/gpu_parity.rs`, on lavapipe in CI). `FURNACE_KERNELS=reference` turns them
//! off for the process, so that `scripts/bench_gpu.sh` can measure what they save. The paged
//! cache takes the reference path on these backends; QLoRA's NF4 weights are dequantized on
//! the device (`nf4.rs`).

mod attention;
mod conv;
mod cross_entropy;
mod elementwise;
mod nf4;
mod norm;
mod scan;

use std::sync::{Arc, OnceLock};

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor, IntTensorOps};
use burn::tensor::{DType, TensorData, TensorMetadata};
use burn_cubecl::cubecl::server::ComputeServer;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

use super::{reference, AttentionSaved, FusedOps, Scan, ScanPrimitives};
use crate::blocks::NormKind;
use crate::nf4::Nf4Matrix;

/// Whether the fused kernels run (the default) or the reference compositions
/// (`FURNACE_KERNELS=reference`), read once per process.
fn fused() -> bool {
    static FUSED: OnceLock<bool> = OnceLock::new();
    *FUSED.get_or_init(|| std::env::var("FURNACE_KERNELS").map_or(true, |v| v != "reference"))
}

/// A new contiguous tensor of `shape` on `like`'s device, in `like`'s dtype.
fn empty_like<R: CubeRuntime>(like: &CubeTensor<R>, shape: burn::tensor::Shape) -> CubeTensor<R> {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
}

impl<R, F, I, BT> FusedOps for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    R::Server: ComputeServer,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        if !fused() {
            return reference::gelu_tanh::<Self>(x);
        }
        elementwise::gelu_tanh(into_contiguous(x), None)
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        if !fused() {
            return reference::gelu_tanh_backward::<Self>(x, grad);
        }
        elementwise::gelu_tanh(into_contiguous(x), Some(into_contiguous(grad)))
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        if !fused() {
            return reference::swiglu::<Self>(gate, up);
        }
        elementwise::swiglu(into_contiguous(gate), into_contiguous(up))
    }

    fn swiglu_backward(gate: FloatTensor<Self>, up: FloatTensor<Self>, grad: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !fused() {
            return reference::swiglu_backward::<Self>(gate, up, grad);
        }
        elementwise::swiglu_backward(into_contiguous(gate), into_contiguous(up), into_contiguous(grad))
    }

    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        if !fused() || cos.dtype != x.dtype || sin.dtype != x.dtype {
            return reference::rope::<Self>(x, cos, sin);
        }
        elementwise::rope(into_contiguous(x), cos, sin, false)
    }

    fn rope_backward(grad: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        if !fused() || cos.dtype != grad.dtype || sin.dtype != grad.dtype {
            return reference::rope_backward::<Self>(grad, cos, sin);
        }
        elementwise::rope(into_contiguous(grad), cos, sin, true)
    }

    fn multi_head_attention_forward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let one_dtype = [&k, &v, &bias].iter().all(|t| t.dtype == q.dtype);
        match attention::blocks(&q) {
            Some(blocks) if fused() && one_dtype && attention::worth_it(&q, &k) => attention::forward(q, k, v, bias, scale, blocks),
            _ => reference::attention_forward::<Self>(q, k, v, bias, scale),
        }
    }

    fn multi_head_attention_backward(
        saved: AttentionSaved<Self>,
        grad: FloatTensor<Self>,
        scale: f32,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // What the forward kept says which forward ran: a log-sum-exp per row (rank 3) or the
        // probabilities (rank 4).
        let AttentionSaved { q, k, v, bias, out, kept } = saved;
        match attention::blocks(&q) {
            Some(blocks) if kept.rank() == 3 => {
                attention::backward(attention::Saved { q, k, v, bias, out, lse: kept }, grad, scale, blocks)
            }
            _ => reference::attention_backward::<Self>(q, k, v, kept, grad, scale),
        }
    }

    fn norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        kind: NormKind,
        eps: f32,
    ) -> FloatTensor<Self> {
        if !fused() {
            return reference::norm::<Self>(x, weight, bias, kind, eps);
        }
        norm::forward(into_contiguous(x), into_contiguous(weight), bias.map(into_contiguous), kind, eps)
    }

    fn norm_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        kind: NormKind,
        eps: f32,
        with_bias: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, Option<FloatTensor<Self>>) {
        if !fused() {
            return reference::norm_backward::<Self>(x, weight, grad, kind, eps, with_bias);
        }
        norm::backward(into_contiguous(x), into_contiguous(weight), into_contiguous(grad), kind, eps, with_bias)
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        if !fused() {
            return reference::cross_entropy::<Self>(logits, targets);
        }
        cross_entropy::loss(into_contiguous(logits), into_contiguous(targets))
    }

    fn cross_entropy_with_grad(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !fused() {
            return reference::cross_entropy_with_grad::<Self>(logits, targets);
        }
        cross_entropy::loss_and_grad(into_contiguous(logits), into_contiguous(targets))
    }

    fn selective_scan(inputs: ScanPrimitives<Self>) -> FloatTensor<Self> {
        match scan_inputs::<R, F, I, BT>(inputs) {
            Ok(inputs) => scan::forward(inputs),
            Err(inputs) => reference::selective_scan::<Self>(inputs),
        }
    }

    fn selective_scan_backward(inputs: ScanPrimitives<Self>, grad: FloatTensor<Self>) -> ScanPrimitives<Self> {
        let inputs = match scan_inputs::<R, F, I, BT>(inputs) {
            Ok(inputs) => inputs,
            Err(inputs) => return reference::selective_scan_backward::<Self>(inputs, grad),
        };
        let [batch, seq, channels] = inputs.u.shape().dims();
        let state = inputs.a.shape()[1];
        let g = scan::backward(inputs, into_contiguous(grad));
        // What the kernel leaves per unit, summed over the batch (A, D) or the channels (B, C).
        let summed = |x, dim, shape: Vec<usize>| Self::float_reshape(Self::float_sum_dim(x, dim), shape.into());
        Scan {
            u: g.u,
            dt: g.dt,
            a: summed(g.a, 0, vec![channels, state]),
            b: summed(g.b, 2, vec![batch, seq, state]),
            c: summed(g.c, 2, vec![batch, seq, state]),
            d: summed(g.d, 0, vec![channels]),
        }
    }

    fn causal_conv_silu(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        if !conv_fits(&x, &weight, &bias) {
            return reference::causal_conv_silu::<Self>(x, weight, bias);
        }
        conv::forward(into_contiguous(x), into_contiguous(weight), into_contiguous(bias))
    }

    fn causal_conv_silu_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !conv_fits(&x, &weight, &bias) || grad.dtype != x.dtype {
            return reference::causal_conv_silu_backward::<Self>(x, weight, bias, grad);
        }
        let [channels, width] = weight.shape().dims();
        let x = into_contiguous(x);
        let (grad_pre, grad_x) = conv::backward(x.clone(), into_contiguous(weight), into_contiguous(bias), into_contiguous(grad));
        // The weight's and bias's gradients sum over the batch and time: Burn's reductions.
        let (grad_pre, x) = (super::tensor::<Self, 3>(grad_pre), super::tensor::<Self, 3>(x));
        let seq = x.dims()[1];
        let padded = reference::zero_history(x, width);
        let summed = |t: burn::tensor::Tensor<Self, 3>| t.sum_dim(1).sum_dim(0).reshape([channels, 1]);
        let grad_weight = (0..width).map(|tap| summed(grad_pre.clone() * padded.clone().narrow(1, tap, seq))).collect();
        let grad_bias = summed(grad_pre).reshape([channels]);
        (grad_x, super::primitive(burn::tensor::Tensor::cat(grad_weight, 1)), super::primitive(grad_bias))
    }

    fn nf4_matmul(x: FloatTensor<Self>, weight: &Arc<Nf4Matrix>, transpose: bool) -> FloatTensor<Self> {
        if !fused() {
            return reference::nf4_matmul::<Self>(x, weight, transpose);
        }
        let device = x.device.clone();
        let upload = |data: TensorData| match data.dtype {
            DType::U32 => Self::int_from_data(data, &device),
            _ => Self::float_from_data(data, &device),
        };
        let dense = nf4::dequantize(weight, &x, upload);
        Self::float_matmul(x, if transpose { Self::float_transpose(dense) } else { dense })
    }
}

/// Whether the convolution kernels take these tensors: one dtype, a filter of at most
/// `conv::MAX_WIDTH` taps.
fn conv_fits<R: CubeRuntime>(x: &CubeTensor<R>, weight: &CubeTensor<R>, bias: &CubeTensor<R>) -> bool {
    fused() && weight.dtype == x.dtype && bias.dtype == x.dtype && weight.shape()[1] <= conv::MAX_WIDTH
}

/// The scan's inputs for the kernels, contiguous; or back as they came where the reference
/// runs (kernels off, mixed dtypes, a state over 64, more steps than a unit may walk).
#[allow(clippy::result_large_err)]
fn scan_inputs<R, F, I, BT>(
    s: ScanPrimitives<CubeBackend<R, F, I, BT>>,
) -> Result<scan::Inputs<R>, ScanPrimitives<CubeBackend<R, F, I, BT>>>
where
    R: CubeRuntime,
    R::Server: ComputeServer,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let one_dtype = [&s.dt, &s.a, &s.b, &s.c, &s.d].iter().all(|t| t.dtype == s.u.dtype);
    if !fused() || !one_dtype || s.a.shape()[1] > 64 || s.u.shape()[1] > scan::MAX_STEPS {
        return Err(s);
    }
    let Scan { u, dt, a, b, c, d } = s;
    Ok(scan::Inputs {
        u: into_contiguous(u),
        dt: into_contiguous(dt),
        a: into_contiguous(a),
        b: into_contiguous(b),
        c: into_contiguous(c),
        d: into_contiguous(d),
    })
}
