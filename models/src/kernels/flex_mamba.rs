//! Mamba's ops on the flex CPU backend: the selective scan and the causal convolution.
//!
//! Scan: one task walks time once for a block of channels of one batch row, keeping each
//! channel's state in cache; tasks run in parallel. The backward pass recomputes the task's
//! states (cheaper than keeping `[batch, seq, channels, state]` of them between the passes),
//! then walks time backwards. Convolution: tasks take blocks of positions, the inner loops run
//! across channels. Partial sums over tasks are added in task order, so results do not depend
//! on scheduling.

use burn::backend::Flex;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorMetadata};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::flex::{contiguous_f32, from_vec, values};
use super::math::{self, multiversion};
use super::{reference, Scan, ScanPrimitives};

/// Channels per task, one per vector lane (an AVX-512 register of f32).
const LANES: usize = 16;

/// The scan's inputs as contiguous host slices, and its sizes.
struct ScanData<'a> {
    u: &'a [f32],
    dt: &'a [f32],
    a: &'a [f32],
    b: &'a [f32],
    c: &'a [f32],
    d: &'a [f32],
    seq: usize,
    channels: usize,
    state: usize,
}

/// One task's share: batch row and first channel, and how many channels.
#[derive(Clone, Copy)]
struct Task {
    row: usize,
    first: usize,
    width: usize,
}

fn tasks(batch: usize, channels: usize) -> Vec<Task> {
    let blocks = channels.div_ceil(LANES);
    (0..batch * blocks)
        .map(|i| {
            let first = (i % blocks) * LANES;
            Task { row: i / blocks, first, width: LANES.min(channels - first) }
        })
        .collect()
}

/// The inputs as contiguous f32, or None (another dtype: the reference path takes it).
fn contiguous(s: &ScanPrimitives<Flex>) -> Option<[FlexTensor; 6]> {
    let [u, dt, a, b, c, d] = [&s.u, &s.dt, &s.a, &s.b, &s.c, &s.d].map(contiguous_f32);
    Some([u?, dt?, a?, b?, c?, d?])
}

impl<'a> ScanData<'a> {
    fn new([u, dt, a, b, c, d]: &'a [FlexTensor; 6]) -> (Self, usize) {
        let [batch, seq, channels] = u.shape().dims();
        let state = a.shape()[1];
        let data = Self { u: values(u), dt: values(dt), a: values(a), b: values(b), c: values(c), d: values(d), seq, channels, state };
        (data, batch)
    }
}

/// Copies each task's `[seq, width]` block into its columns of a `[batch, seq, channels]` buffer.
fn scatter(blocks: &[Vec<f32>], tasks: &[Task], batch: usize, seq: usize, channels: usize) -> FlexTensor {
    let mut out = vec![0.0; batch * seq * channels];
    for (block, task) in blocks.iter().zip(tasks) {
        for t in 0..seq {
            let at = (task.row * seq + t) * channels + task.first;
            out[at..at + task.width].copy_from_slice(&block[t * task.width..][..task.width]);
        }
    }
    from_vec(Shape::new([batch, seq, channels]), out)
}

pub fn selective_scan(s: ScanPrimitives<Flex>) -> FloatTensor<Flex> {
    let Some(inputs) = contiguous(&s) else { return reference::selective_scan::<Flex>(s) };
    let (x, batch) = ScanData::new(&inputs);
    let tasks = tasks(batch, x.channels);
    let blocks: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|task| {
            let mut y = vec![0.0; x.seq * task.width];
            scan_forward(&x, *task, &mut y, &mut []);
            y
        })
        .collect();
    scatter(&blocks, &tasks, batch, x.seq, x.channels)
}

/// One task's gradients: its own columns of u and dt, and its partial sums of the rest.
struct TaskGrads {
    u: Vec<f32>,
    dt: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    d: Vec<f32>,
}

pub fn selective_scan_backward(s: ScanPrimitives<Flex>, grad: FloatTensor<Flex>) -> ScanPrimitives<Flex> {
    let (Some(inputs), Some(grad_y)) = (contiguous(&s), contiguous_f32(&grad)) else {
        return reference::selective_scan_backward::<Flex>(s, grad);
    };
    let (x, batch) = ScanData::new(&inputs);
    let (seq, channels, state) = (x.seq, x.channels, x.state);
    let grad_y = values(&grad_y);
    let tasks = tasks(batch, channels);
    let partials: Vec<TaskGrads> = tasks
        .par_iter()
        .map(|&task| {
            let mut states = vec![[0.0; LANES]; seq * state];
            let mut y = vec![0.0; seq * task.width];
            scan_forward(&x, task, &mut y, &mut states);
            let mut g = TaskGrads {
                u: vec![0.0; seq * task.width],
                dt: vec![0.0; seq * task.width],
                a: vec![0.0; task.width * state],
                b: vec![0.0; seq * state],
                c: vec![0.0; seq * state],
                d: vec![0.0; task.width],
            };
            scan_backward(&x, task, grad_y, &states, &mut g);
            g
        })
        .collect();
    let mut grad_a = vec![0.0; channels * state];
    let mut grad_d = vec![0.0; channels];
    let mut grad_b = vec![0.0; batch * seq * state];
    let mut grad_c = vec![0.0; batch * seq * state];
    for (g, task) in partials.iter().zip(&tasks) {
        add(&mut grad_a[task.first * state..][..task.width * state], &g.a);
        add(&mut grad_d[task.first..][..task.width], &g.d);
        add(&mut grad_b[task.row * seq * state..][..seq * state], &g.b);
        add(&mut grad_c[task.row * seq * state..][..seq * state], &g.c);
    }
    let (grads_u, grads_dt): (Vec<Vec<f32>>, Vec<Vec<f32>>) = partials.into_iter().map(|g| (g.u, g.dt)).unzip();
    Scan {
        u: scatter(&grads_u, &tasks, batch, seq, channels),
        dt: scatter(&grads_dt, &tasks, batch, seq, channels),
        a: from_vec(Shape::new([channels, state]), grad_a),
        b: from_vec(Shape::new([batch, seq, state]), grad_b),
        c: from_vec(Shape::new([batch, seq, state]), grad_c),
        d: from_vec(Shape::new([channels]), grad_d),
    }
}

/// Positions (rows of `[batch·seq, channels]`) per convolution task.
const CONV_ROWS: usize = 64;

/// `[channels, width]` → `[width, channels]`, so each tap is a contiguous row.
fn taps_by_width(weight: &[f32], channels: usize, width: usize) -> Vec<f32> {
    (0..width * channels).map(|i| weight[(i % channels) * width + i / channels]).collect()
}

pub fn causal_conv_silu(x: FloatTensor<Flex>, weight: FloatTensor<Flex>, bias: FloatTensor<Flex>) -> FloatTensor<Flex> {
    let (Some(xs), Some(w), Some(b)) = (contiguous_f32(&x), contiguous_f32(&weight), contiguous_f32(&bias)) else {
        return reference::causal_conv_silu::<Flex>(x, weight, bias);
    };
    let [batch, seq, channels] = xs.shape().dims();
    let width = w.shape()[1];
    let taps = taps_by_width(values(&w), channels, width);
    let (input, bias) = (values(&xs), values(&b));
    let mut out = vec![0.0; batch * seq * channels];
    out.par_chunks_mut(CONV_ROWS * channels).enumerate().for_each(|(task, out)| {
        conv_rows(input, &taps, bias, seq, task * CONV_ROWS, out);
        silu_in_place(out);
    });
    from_vec(Shape::new([batch, seq, channels]), out)
}

pub fn causal_conv_silu_backward(
    x: FloatTensor<Flex>,
    weight: FloatTensor<Flex>,
    bias: FloatTensor<Flex>,
    grad: FloatTensor<Flex>,
) -> (FloatTensor<Flex>, FloatTensor<Flex>, FloatTensor<Flex>) {
    let inputs = [&x, &weight, &bias, &grad].map(contiguous_f32);
    let [Some(xs), Some(w), Some(b), Some(g)] = inputs else {
        return reference::causal_conv_silu_backward::<Flex>(x, weight, bias, grad);
    };
    let [batch, seq, channels] = xs.shape().dims();
    let width = w.shape()[1];
    let taps = taps_by_width(values(&w), channels, width);
    let (input, bias, grad) = (values(&xs), values(&b), values(&g));
    let chunk = CONV_ROWS * channels;
    // The gradient at the pre-activation, from the recomputed pre-activation.
    let mut grad_pre = vec![0.0; batch * seq * channels];
    grad_pre.par_chunks_mut(chunk).zip(grad.par_chunks(chunk)).enumerate().for_each(|(task, (out, grad))| {
        conv_rows(input, &taps, bias, seq, task * CONV_ROWS, out);
        silu_backward_in_place(out, grad);
    });
    // x at position t feeds outputs t .. t + width − 1; the tap gradients are partial sums per task.
    let mut grad_x = vec![0.0; batch * seq * channels];
    let partials: Vec<Vec<f32>> = grad_x
        .par_chunks_mut(chunk)
        .enumerate()
        .map(|(task, grad_x)| conv_backward_rows(input, &grad_pre, &taps, seq, channels, task * CONV_ROWS, grad_x))
        .collect();
    let mut sums = vec![0.0; (width + 1) * channels];
    for partial in &partials {
        add(&mut sums, partial);
    }
    let grad_weight = (0..channels * width).map(|i| sums[(i % width) * channels + i / width]).collect();
    (
        from_vec(Shape::new([batch, seq, channels]), grad_x),
        from_vec(Shape::new([channels, width]), grad_weight),
        from_vec(Shape::new([channels]), sums[width * channels..].to_vec()),
    )
}

multiversion! {
    /// Pre-activations of the positions `out` covers, from row `first` of `[batch·seq, channels]`.
    fn conv_rows(x: &[f32], taps: &[f32], bias: &[f32], seq: usize, first: usize, out: &mut [f32]) {
        let channels = bias.len();
        let width = taps.len() / channels;
        for (i, out) in out.chunks_mut(channels).enumerate() {
            let row = first + i;
            let t = row % seq;
            out.copy_from_slice(bias);
            for tap in 0..width {
                // Tap k reads position t − width + 1 + k of the same sequence (zero before 0).
                let Some(back) = (t + 1 + tap).checked_sub(width) else { continue };
                let x = &x[(row - t + back) * channels..][..channels];
                let w = &taps[tap * channels..][..channels];
                for c in 0..channels {
                    out[c] += w[c] * x[c];
                }
            }
        }
    }
}

multiversion! {
    fn silu_in_place(x: &mut [f32]) {
        for x in x.iter_mut() {
            *x *= math::sigmoid(*x);
        }
    }
}

multiversion! {
    /// `pre` becomes `grad · silu'(pre)`.
    fn silu_backward_in_place(pre: &mut [f32], grad: &[f32]) {
        for (p, &g) in pre.iter_mut().zip(grad) {
            let s = math::sigmoid(*p);
            *p = g * s * (1.0 + *p * (1.0 - s));
        }
    }
}

multiversion! {
    /// The input gradient of the positions `grad_x` covers (from row `first`), and this task's
    /// partial sums of the tap gradients `[width, channels]` followed by the bias gradient.
    fn conv_backward_rows(
        x: &[f32],
        grad_pre: &[f32],
        taps: &[f32],
        seq: usize,
        channels: usize,
        first: usize,
        grad_x: &mut [f32],
    ) -> Vec<f32> {
        let width = taps.len() / channels;
        let mut sums = vec![0.0f32; (width + 1) * channels];
        for (i, grad_x) in grad_x.chunks_mut(channels).enumerate() {
            let row = first + i;
            let (t, start) = (row % seq, row - row % seq);
            let grad_here = &grad_pre[row * channels..][..channels];
            let grad_bias = &mut sums[width * channels..];
            for c in 0..channels {
                grad_bias[c] += grad_here[c];
            }
            for tap in 0..width {
                let w = &taps[tap * channels..][..channels];
                // Output t + width − 1 − tap read this position through this tap.
                let ahead = t + width - 1 - tap;
                if ahead < seq {
                    let grad = &grad_pre[(start + ahead) * channels..][..channels];
                    for c in 0..channels {
                        grad_x[c] += w[c] * grad[c];
                    }
                }
                if let Some(back) = (t + 1 + tap).checked_sub(width) {
                    let x = &x[(start + back) * channels..][..channels];
                    let grad_tap = &mut sums[tap * channels..][..channels];
                    for c in 0..channels {
                        grad_tap[c] += grad_here[c] * x[c];
                    }
                }
            }
        }
        sums
    }
}

fn add(into: &mut [f32], from: &[f32]) {
    into.iter_mut().zip(from).for_each(|(a, b)| *a += b);
}

/// A task's channels as one vector: lanes past the task's width stay 0, which makes them
/// inert (decay 1, input 0, no gradient).
type Lanes = [f32; LANES];

/// Channels in a task's slice of `values` (`[batch, seq, channels]`) at one time step.
#[inline(always)]
fn lanes(values: &[f32], at: usize, width: usize) -> Lanes {
    let mut out = [0.0; LANES];
    out[..width].copy_from_slice(&values[at..at + width]);
    out
}

/// Sum of the lanes by halving, which vectorises (a running sum would not).
#[inline(always)]
fn sum_lanes(mut v: Lanes) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            v[i] += v[i + half];
        }
        half /= 2;
    }
    v[0]
}

/// The task's A transposed to `[state][lane]`, so the inner loops run across channels.
fn a_by_state(x: &ScanData, task: Task) -> Vec<Lanes> {
    (0..x.state).map(|k| std::array::from_fn(|j| if j < task.width { x.a[(task.first + j) * x.state + k] } else { 0.0 })).collect()
}

multiversion! {
    /// The task's outputs into `y` (`[seq, width]`) and, unless `states` is empty, every
    /// state `h_t` into `states` (`[seq, state]` vectors of lanes). The loops over lanes are
    /// the vector loops: one channel per lane.
    fn scan_forward(x: &ScanData, task: Task, y: &mut [f32], states: &mut [Lanes]) {
        let (seq, channels, n, width) = (x.seq, x.channels, x.state, task.width);
        let a = a_by_state(x, task);
        let d = lanes(x.d, task.first, width);
        let mut h = vec![[0.0f32; LANES]; n];
        for t in 0..seq {
            let row = task.row * seq + t;
            let (b, c) = (&x.b[row * n..][..n], &x.c[row * n..][..n]);
            let at = row * channels + task.first;
            let (dt, u) = (lanes(x.dt, at, width), lanes(x.u, at, width));
            let delta: Lanes = std::array::from_fn(|j| math::softplus(dt[j]));
            let delta_u: Lanes = std::array::from_fn(|j| delta[j] * u[j]);
            let mut out: Lanes = std::array::from_fn(|j| d[j] * u[j]);
            for k in 0..n {
                let (h, a) = (&mut h[k], &a[k]);
                for j in 0..LANES {
                    h[j] = math::exp(delta[j] * a[j]) * h[j] + delta_u[j] * b[k];
                    out[j] += c[k] * h[j];
                }
            }
            y[t * width..][..width].copy_from_slice(&out[..width]);
            if !states.is_empty() {
                states[t * n..][..n].copy_from_slice(&h);
            }
        }
    }
}

multiversion! {
    /// The task's gradients, walking time backwards with the state gradient `dh` carried from
    /// step t+1 (already multiplied by that step's decay).
    fn scan_backward(x: &ScanData, task: Task, grad_y: &[f32], states: &[Lanes], g: &mut TaskGrads) {
        let (seq, channels, n, width) = (x.seq, x.channels, x.state, task.width);
        let a = a_by_state(x, task);
        let d = lanes(x.d, task.first, width);
        let mut dh = vec![[0.0f32; LANES]; n];
        let mut grad_a = vec![[0.0f32; LANES]; n];
        let mut grad_d = [0.0f32; LANES];
        let zeros = [0.0f32; LANES];
        for t in (0..seq).rev() {
            let row = task.row * seq + t;
            let (b, c) = (&x.b[row * n..][..n], &x.c[row * n..][..n]);
            let at = row * channels + task.first;
            let (dt, u, dy) = (lanes(x.dt, at, width), lanes(x.u, at, width), lanes(grad_y, at, width));
            let delta: Lanes = std::array::from_fn(|j| math::softplus(dt[j]));
            let delta_u: Lanes = std::array::from_fn(|j| delta[j] * u[j]);
            let (mut grad_delta, mut dh_b) = ([0.0f32; LANES], [0.0f32; LANES]);
            for k in 0..n {
                let h = &states[t * n + k];
                let h_before = if t > 0 { &states[(t - 1) * n + k] } else { &zeros };
                let (dh, a, grad_a) = (&mut dh[k], &a[k], &mut grad_a[k]);
                let (mut grad_b, mut grad_c) = ([0.0f32; LANES], [0.0f32; LANES]);
                for j in 0..LANES {
                    dh[j] += dy[j] * c[k];
                    grad_c[j] = dy[j] * h[j];
                    let decay = math::exp(delta[j] * a[j]);
                    let dh_decay = dh[j] * decay * h_before[j];
                    grad_a[j] += dh_decay * delta[j];
                    grad_delta[j] += dh_decay * a[j];
                    dh_b[j] += dh[j] * b[k];
                    grad_b[j] = dh[j] * delta_u[j];
                    dh[j] *= decay;
                }
                g.b[t * n + k] += sum_lanes(grad_b);
                g.c[t * n + k] += sum_lanes(grad_c);
            }
            for j in 0..width {
                g.u[t * width + j] = dy[j] * d[j] + dh_b[j] * delta[j];
                // dΔ/d(dt) = sigmoid(dt).
                g.dt[t * width + j] = (grad_delta[j] + dh_b[j] * u[j]) * math::sigmoid(dt[j]);
                grad_d[j] += dy[j] * u[j];
            }
        }
        for j in 0..width {
            for k in 0..n {
                g.a[j * n + k] = grad_a[k][j];
            }
            g.d[j] = grad_d[j];
        }
    }
}
