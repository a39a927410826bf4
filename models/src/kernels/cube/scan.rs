//! Mamba's selective scan: one unit per (batch row, channel) walks time once, its state (`state`
//! floats, the loops over it unrolled) in registers. The backward walks time forward to write
//! every step's state into a scratch buffer, then backwards carrying the state's gradient;
//! what sums over channels (the gradients of B and C) or over the batch (A, D) is written per
//! unit and summed by the caller.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::empty_like;

/// Channels per cube, one per unit.
const UNITS: usize = 64;
/// The most steps one unit walks (each pass), under lavapipe's bound on a shader's loop
/// iterations (see `attention::MAX_KEYS_PER_UNIT`); longer scans take the composition.
pub const MAX_STEPS: usize = 8192;

/// Δ = softplus(dt), as `max(x, 0) + log1p(exp(−|x|))`.
#[cube]
fn softplus(x: f32) -> f32 {
    max(x, 0.0) + (min(x, -x)).exp().log1p()
}

#[cube(launch)]
fn forward_kernel<F: Float>(
    u: &Tensor<F>,
    dt: &Tensor<F>,
    a: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    d: &Tensor<F>,
    y: &mut Tensor<F>,
    #[comptime] state: usize,
    #[define(F)] _dtype: StorageType,
) {
    let channel = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let batch = CUBE_POS_Y as usize;
    let (seq, channels) = (u.shape(1), u.shape(2));
    if channel >= channels {
        terminate!();
    }
    let mut h = Array::<f32>::new(state);
    let mut decay_rate = Array::<f32>::new(state);
    #[unroll]
    for n in 0..state {
        h[n] = 0.0;
        decay_rate[n] = f32::cast_from(a[channel * state + n]);
    }
    let skip = f32::cast_from(d[channel]);
    for t in 0..seq {
        let at = (batch * seq + t) * channels + channel;
        let x = f32::cast_from(u[at]);
        let delta = softplus(f32::cast_from(dt[at]));
        let bc_at = (batch * seq + t) * state;
        let mut out = skip * x;
        #[unroll]
        for n in 0..state {
            h[n] = (delta * decay_rate[n]).exp() * h[n] + delta * f32::cast_from(b[bc_at + n]) * x;
            out += f32::cast_from(c[bc_at + n]) * h[n];
        }
        y[at] = F::cast_from(out);
    }
}

#[cube(launch)]
fn backward_kernel<F: Float>(
    u: &Tensor<F>,
    dt: &Tensor<F>,
    a: &Tensor<F>,
    b: &Tensor<F>,
    c: &Tensor<F>,
    d: &Tensor<F>,
    grad: &Tensor<F>,
    states: &mut Tensor<f32>,
    grad_u: &mut Tensor<F>,
    grad_dt: &mut Tensor<F>,
    grad_a: &mut Tensor<F>,
    grad_b: &mut Tensor<F>,
    grad_c: &mut Tensor<F>,
    grad_d: &mut Tensor<F>,
    #[comptime] state: usize,
    #[define(F)] _dtype: StorageType,
) {
    let channel = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let batch = CUBE_POS_Y as usize;
    let (seq, channels) = (u.shape(1), u.shape(2));
    if channel >= channels {
        terminate!();
    }
    let mut h = Array::<f32>::new(state);
    let mut decay_rate = Array::<f32>::new(state);
    let mut dh = Array::<f32>::new(state);
    let mut grad_rate = Array::<f32>::new(state);
    #[unroll]
    for n in 0..state {
        h[n] = 0.0;
        dh[n] = 0.0;
        grad_rate[n] = 0.0;
        decay_rate[n] = f32::cast_from(a[channel * state + n]);
    }
    // Forward: every step's state, [batch, seq, channels, state].
    for t in 0..seq {
        let at = (batch * seq + t) * channels + channel;
        let x = f32::cast_from(u[at]);
        let delta = softplus(f32::cast_from(dt[at]));
        let bc_at = (batch * seq + t) * state;
        #[unroll]
        for n in 0..state {
            h[n] = (delta * decay_rate[n]).exp() * h[n] + delta * f32::cast_from(b[bc_at + n]) * x;
            states[at * state + n] = h[n];
        }
    }
    // Backward: dh_t = C_t·dy_t + exp(Δ_{t+1}·A)·dh_{t+1}, carried in `dh`.
    let skip = f32::cast_from(d[channel]);
    let mut grad_skip = 0.0f32;
    for step in 0..seq {
        let t = seq - 1 - step;
        let at = (batch * seq + t) * channels + channel;
        let x = f32::cast_from(u[at]);
        let raw = f32::cast_from(dt[at]);
        let delta = softplus(raw);
        let dy = f32::cast_from(grad[at]);
        let bc_at = (batch * seq + t) * state;
        grad_skip += dy * x;
        let mut grad_delta = 0.0f32;
        let mut grad_x = dy * skip;
        #[unroll]
        for n in 0..state {
            let mut before = 0.0f32;
            if t > 0 {
                before = states[(at - channels) * state + n];
            }
            let state_grad = dh[n] + f32::cast_from(c[bc_at + n]) * dy;
            let decay = (delta * decay_rate[n]).exp();
            let input_rate = f32::cast_from(b[bc_at + n]);
            // ∂L/∂(Δ·A) of this step.
            let through_decay = state_grad * decay * before;
            grad_rate[n] += through_decay * delta;
            grad_delta += through_decay * decay_rate[n] + state_grad * input_rate * x;
            grad_x += state_grad * input_rate * delta;
            grad_b[at * state + n] = F::cast_from(state_grad * delta * x);
            grad_c[at * state + n] = F::cast_from(states[at * state + n] * dy);
            dh[n] = state_grad * decay;
        }
        grad_u[at] = F::cast_from(grad_x);
        grad_dt[at] = F::cast_from(grad_delta / (1.0 + (-raw).exp()));
    }
    #[unroll]
    for n in 0..state {
        grad_a[(batch * channels + channel) * state + n] = F::cast_from(grad_rate[n]);
    }
    grad_d[batch * channels + channel] = F::cast_from(grad_skip);
}

/// The scan's inputs, contiguous: `u`, `dt` `[batch, seq, channels]`, `a` `[channels, state]`,
/// `b`, `c` `[batch, seq, state]`, `d` `[channels]`.
pub struct Inputs<R: CubeRuntime> {
    pub u: CubeTensor<R>,
    pub dt: CubeTensor<R>,
    pub a: CubeTensor<R>,
    pub b: CubeTensor<R>,
    pub c: CubeTensor<R>,
    pub d: CubeTensor<R>,
}

fn cubes<R: CubeRuntime>(u: &CubeTensor<R>) -> CubeCount {
    let [batch, _, channels] = u.shape().dims();
    CubeCount::new_2d(channels.div_ceil(UNITS) as u32, batch as u32)
}

/// `y` `[batch, seq, channels]`.
pub fn forward<R: CubeRuntime>(s: Inputs<R>) -> CubeTensor<R> {
    let state = s.a.shape()[1];
    let y = empty_like(&s.u, s.u.shape());
    let dtype = s.u.dtype;
    forward_kernel::launch::<R>(
        &s.u.client.clone(),
        cubes(&s.u),
        CubeDim::new_1d(UNITS as u32),
        s.u.into_tensor_arg(),
        s.dt.into_tensor_arg(),
        s.a.into_tensor_arg(),
        s.b.into_tensor_arg(),
        s.c.into_tensor_arg(),
        s.d.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        state,
        dtype.into(),
    );
    y
}

/// The gradients, with those that sum over units still per unit: `a` as `[batch, channels,
/// state]`, `b` and `c` as `[batch, seq, channels, state]`, `d` as `[batch, channels]`.
pub fn backward<R: CubeRuntime>(s: Inputs<R>, grad: CubeTensor<R>) -> Inputs<R> {
    let [batch, seq, channels] = s.u.shape().dims();
    let state = s.a.shape()[1];
    let client = s.u.client.clone();
    let dtype = s.u.dtype;
    let states = empty_device_dtype(client.clone(), s.u.device.clone(), Shape::new([batch, seq, channels, state]), DType::F32);
    let per_step = Shape::new([batch, seq, channels, state]);
    let grads = Inputs {
        u: empty_like(&s.u, s.u.shape()),
        dt: empty_like(&s.u, s.u.shape()),
        a: empty_like(&s.u, Shape::new([batch, channels, state])),
        b: empty_like(&s.u, per_step.clone()),
        c: empty_like(&s.u, per_step),
        d: empty_like(&s.u, Shape::new([batch, channels])),
    };
    backward_kernel::launch::<R>(
        &client,
        cubes(&s.u),
        CubeDim::new_1d(UNITS as u32),
        s.u.into_tensor_arg(),
        s.dt.into_tensor_arg(),
        s.a.into_tensor_arg(),
        s.b.into_tensor_arg(),
        s.c.into_tensor_arg(),
        s.d.into_tensor_arg(),
        grad.into_tensor_arg(),
        states.into_tensor_arg(),
        grads.u.clone().into_tensor_arg(),
        grads.dt.clone().into_tensor_arg(),
        grads.a.clone().into_tensor_arg(),
        grads.b.clone().into_tensor_arg(),
        grads.c.clone().into_tensor_arg(),
        grads.d.clone().into_tensor_arg(),
        state,
        dtype.into(),
    );
    grads
}
