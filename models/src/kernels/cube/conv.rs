//! Mamba's depthwise causal convolution and SiLU: one unit per output element, its `width` taps
//! (the loop unrolled) read from the input's last `width` positions, zeros before the start.
//! The backward recomputes each pre-activation for its SiLU gradient, then one unit per input
//! element gathers the taps it fed; the weight and bias gradients are sums over the batch and
//! time of those products, left to the caller.

use burn::tensor::TensorMetadata;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::empty_like;

const UNITS: u32 = 256;
/// The widest filter the kernels take (unrolled); wider ones take the composition.
pub const MAX_WIDTH: usize = 8;

/// The convolution before SiLU at `[batch, t, channel]`, in f32.
#[cube]
fn pre_activation<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    row: usize,
    t: usize,
    channel: usize,
    seq: usize,
    channels: usize,
    #[comptime] width: usize,
) -> f32 {
    let mut sum = f32::cast_from(bias[channel]);
    #[unroll]
    for tap in 0..width {
        // Tap `tap` reads position t − (width − 1 − tap).
        let back = width - 1 - tap;
        if t >= back {
            sum += f32::cast_from(x[(row * seq + t - back) * channels + channel]) * f32::cast_from(weight[channel * width + tap]);
        }
    }
    sum
}

#[cube(launch)]
fn forward_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    out: &mut Tensor<F>,
    seq: usize,
    channels: usize,
    #[comptime] width: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let channel = i % channels;
    let t = (i / channels) % seq;
    let row = i / (channels * seq);
    let pre = pre_activation::<F>(x, weight, bias, row, t, channel, seq, channels, width);
    out[i] = F::cast_from(pre / (1.0 + (-pre).exp()));
}

/// The gradient at the pre-activation: grad · silu'(pre).
#[cube(launch)]
fn grad_pre_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    grad: &Tensor<F>,
    grad_pre: &mut Tensor<F>,
    seq: usize,
    channels: usize,
    #[comptime] width: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= grad_pre.len() {
        terminate!();
    }
    let channel = i % channels;
    let t = (i / channels) % seq;
    let row = i / (channels * seq);
    let pre = pre_activation::<F>(x, weight, bias, row, t, channel, seq, channels, width);
    let s = 1.0 / (1.0 + (-pre).exp());
    grad_pre[i] = F::cast_from(f32::cast_from(grad[i]) * s * (1.0 + pre * (1.0 - s)));
}

/// The gradient at input position t: the outputs t … t + width − 1 it fed, each through its tap.
#[cube(launch)]
fn grad_x_kernel<F: Float>(
    grad_pre: &Tensor<F>,
    weight: &Tensor<F>,
    grad_x: &mut Tensor<F>,
    seq: usize,
    channels: usize,
    #[comptime] width: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= grad_x.len() {
        terminate!();
    }
    let channel = i % channels;
    let t = (i / channels) % seq;
    let mut sum = 0.0;
    #[unroll]
    for ahead in 0..width {
        if t + ahead < seq {
            sum += f32::cast_from(grad_pre[i + ahead * channels]) * f32::cast_from(weight[channel * width + width - 1 - ahead]);
        }
    }
    grad_x[i] = F::cast_from(sum);
}

fn launch_shape(elements: usize) -> (CubeCount, CubeDim) {
    (CubeCount::new_1d((elements as u32).div_ceil(UNITS).max(1)), CubeDim::new_1d(UNITS))
}

/// silu(causal_conv(x)) of `x` `[batch, seq, channels]`, `weight` `[channels, width]`, `bias`
/// `[channels]`; all contiguous, one dtype.
pub fn forward<R: CubeRuntime>(x: CubeTensor<R>, weight: CubeTensor<R>, bias: CubeTensor<R>) -> CubeTensor<R> {
    let [_, seq, channels] = x.shape().dims();
    let width = weight.shape()[1];
    let out = empty_like(&x, x.shape());
    let (count, dim) = launch_shape(x.shape().num_elements());
    let dtype = x.dtype;
    forward_kernel::launch::<R>(
        &x.client.clone(),
        count,
        dim,
        x.into_tensor_arg(),
        weight.into_tensor_arg(),
        bias.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        seq,
        channels,
        width,
        dtype.into(),
    );
    out
}

/// The gradient at the pre-activation and the gradient of `x`, for the output gradient `grad`.
pub fn backward<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    bias: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [_, seq, channels] = x.shape().dims();
    let width = weight.shape()[1];
    let (grad_pre, grad_x) = (empty_like(&x, x.shape()), empty_like(&x, x.shape()));
    let (count, dim) = launch_shape(x.shape().num_elements());
    let (client, dtype) = (x.client.clone(), x.dtype);
    grad_pre_kernel::launch::<R>(
        &client,
        count.clone(),
        dim,
        x.into_tensor_arg(),
        weight.clone().into_tensor_arg(),
        bias.into_tensor_arg(),
        grad.into_tensor_arg(),
        grad_pre.clone().into_tensor_arg(),
        seq,
        channels,
        width,
        dtype.into(),
    );
    grad_x_kernel::launch::<R>(
        &client,
        count,
        dim,
        grad_pre.clone().into_tensor_arg(),
        weight.into_tensor_arg(),
        grad_x.clone().into_tensor_arg(),
        seq,
        channels,
        width,
        dtype.into(),
    );
    (grad_pre, grad_x)
}
