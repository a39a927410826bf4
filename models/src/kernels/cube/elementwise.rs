//! GELU (tanh), SwiGLU and RoPE, forward and backward: one unit per element, one kernel each.

use burn::tensor::TensorMetadata;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::empty_like;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;
/// |u| past which tanh(u) is ±1 in f32; clamping keeps a backend's exp-based tanh finite.
const TANH_SATURATED: f32 = 10.0;

const UNITS: u32 = 256;

fn launch_shape<R: CubeRuntime>(elements: usize) -> (CubeCount, CubeDim) {
    (CubeCount::new_1d((elements as u32).div_ceil(UNITS).max(1)), CubeDim::new_1d(UNITS))
}

/// `gelu_new(x)`, or with `grad` its gradient `grad · gelu_new'(x)`.
#[cube(launch)]
fn gelu_tanh_kernel<F: Float>(
    x: &Tensor<F>,
    grad: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] backward: bool,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let x = f32::cast_from(x[i]);
    let x2 = x * x;
    let (cubic, sqrt_2_over_pi, saturated) = (f32::new(GELU_CUBIC), f32::new(SQRT_2_OVER_PI), f32::new(TANH_SATURATED));
    let u = clamp(sqrt_2_over_pi * (x + cubic * x2 * x), -saturated, saturated);
    let t = u.tanh();
    if backward {
        let dt = (1.0 - t * t) * sqrt_2_over_pi * (1.0 + 3.0 * cubic * x2);
        out[i] = F::cast_from(f32::cast_from(grad[i]) * (0.5 * (1.0 + t) + 0.5 * x * dt));
    } else {
        out[i] = F::cast_from(0.5 * x * (1.0 + t));
    }
}

/// GELU (tanh) of `x`, or its backward for the output gradient `grad`.
pub fn gelu_tanh<R: CubeRuntime>(x: CubeTensor<R>, grad: Option<CubeTensor<R>>) -> CubeTensor<R> {
    let out = empty_like(&x, x.shape());
    let (count, dim) = launch_shape::<R>(x.shape().num_elements());
    let backward = grad.is_some();
    let grad = grad.unwrap_or_else(|| x.clone());
    gelu_tanh_kernel::launch::<R>(
        &x.client,
        count,
        dim,
        x.clone().into_tensor_arg(),
        grad.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        backward,
        x.dtype.into(),
    );
    out
}

#[cube(launch)]
fn swiglu_kernel<F: Float>(gate: &Tensor<F>, up: &Tensor<F>, out: &mut Tensor<F>, #[define(F)] _dtype: StorageType) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[i]);
    out[i] = F::cast_from(g / (1.0 + (-g).exp()) * f32::cast_from(up[i]));
}

#[cube(launch)]
fn swiglu_backward_kernel<F: Float>(
    gate: &Tensor<F>,
    up: &Tensor<F>,
    grad: &Tensor<F>,
    grad_gate: &mut Tensor<F>,
    grad_up: &mut Tensor<F>,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= grad_up.len() {
        terminate!();
    }
    let g = f32::cast_from(gate[i]);
    let dy = f32::cast_from(grad[i]);
    let s = 1.0 / (1.0 + (-g).exp());
    grad_gate[i] = F::cast_from(dy * f32::cast_from(up[i]) * s * (1.0 + g * (1.0 - s)));
    grad_up[i] = F::cast_from(dy * g * s);
}

/// `silu(gate) · up`.
pub fn swiglu<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>) -> CubeTensor<R> {
    let out = empty_like(&gate, gate.shape());
    let (count, dim) = launch_shape::<R>(gate.shape().num_elements());
    let dtype = gate.dtype;
    swiglu_kernel::launch::<R>(
        &gate.client.clone(),
        count,
        dim,
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype.into(),
    );
    out
}

/// Gradients of [`swiglu`] with respect to `gate` and `up`.
pub fn swiglu_backward<R: CubeRuntime>(gate: CubeTensor<R>, up: CubeTensor<R>, grad: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
    let (grad_gate, grad_up) = (empty_like(&gate, gate.shape()), empty_like(&gate, gate.shape()));
    let (count, dim) = launch_shape::<R>(gate.shape().num_elements());
    let dtype = gate.dtype;
    swiglu_backward_kernel::launch::<R>(
        &gate.client.clone(),
        count,
        dim,
        gate.into_tensor_arg(),
        up.into_tensor_arg(),
        grad.into_tensor_arg(),
        grad_gate.clone().into_tensor_arg(),
        grad_up.clone().into_tensor_arg(),
        dtype.into(),
    );
    (grad_gate, grad_up)
}

/// Rotate each pair (i, i + half) of a head by its angle: `x·cos + rotate_half(x)·sin`, or with
/// `inverse` the transpose (the backward), `x·cos − rotate_half(x·sin)`. `x` is contiguous
/// `[batch, seq, heads, head_dim]`; `cos` and `sin` `[1 or batch, seq, 1, head_dim]`, any strides.
#[cube(launch)]
fn rope_kernel<F: Float>(
    x: &Tensor<F>,
    cos: &Tensor<F>,
    sin: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] inverse: bool,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let dim = x.shape(3);
    let half = dim / 2;
    let d = i % dim;
    let position = (i / (dim * x.shape(2))) % x.shape(1);
    let mut batch = i / (dim * x.shape(2) * x.shape(1));
    if cos.shape(0) == 1 {
        batch = 0;
    }
    let angle_row = batch * cos.stride(0) + position * cos.stride(1);
    // rotate_half pairs d with d + half (negated) in the first half, with d − half in the
    // second; the transpose reads sin at the partner's position, with the opposite sign.
    let first_half = d < half;
    let mut partner = i + half;
    let mut partner_d = d + half;
    if !first_half {
        partner = i - half;
        partner_d = d - half;
    }
    let mut sin_d = d;
    if inverse {
        sin_d = partner_d;
    }
    let c = f32::cast_from(cos[angle_row + d * cos.stride(3)]);
    let rotated = f32::cast_from(x[partner]) * f32::cast_from(sin[angle_row + sin_d * sin.stride(3)]);
    let mut y = f32::cast_from(x[i]) * c + rotated;
    if first_half != inverse {
        y = f32::cast_from(x[i]) * c - rotated;
    }
    out[i] = F::cast_from(y);
}

/// RoPE of `x` (or with `inverse`, its backward applied to the gradient `x`).
pub fn rope<R: CubeRuntime>(x: CubeTensor<R>, cos: CubeTensor<R>, sin: CubeTensor<R>, inverse: bool) -> CubeTensor<R> {
    let out = empty_like(&x, x.shape());
    let (count, dim) = launch_shape::<R>(x.shape().num_elements());
    let dtype = x.dtype;
    rope_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        cos.into_tensor_arg(),
        sin.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        inverse,
        dtype.into(),
    );
    out
}
