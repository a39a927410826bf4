//! Mamba's selective scan on the flex CPU backend. One task walks time once for a block of
//! channels of one batch row, keeping each channel's state in cache; tasks run in parallel.
//! The backward pass recomputes the task's states (cheaper than keeping
//! `[batch, seq, channels, state]` of them between the passes), then walks time backwards.
//! Partial sums over tasks are added in task order, so results do not depend on scheduling.

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
    delta: &'a [f32],
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
    let [u, delta, a, b, c, d] = [&s.u, &s.delta, &s.a, &s.b, &s.c, &s.d].map(contiguous_f32);
    Some([u?, delta?, a?, b?, c?, d?])
}

impl<'a> ScanData<'a> {
    fn new([u, delta, a, b, c, d]: &'a [FlexTensor; 6]) -> (Self, usize) {
        let [batch, seq, channels] = u.shape().dims();
        let state = a.shape()[1];
        let data =
            Self { u: values(u), delta: values(delta), a: values(a), b: values(b), c: values(c), d: values(d), seq, channels, state };
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

/// One task's gradients: its own columns of u and Δ, and its partial sums of the rest.
struct TaskGrads {
    u: Vec<f32>,
    delta: Vec<f32>,
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
                delta: vec![0.0; seq * task.width],
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
    let (grads_u, grads_delta): (Vec<Vec<f32>>, Vec<Vec<f32>>) = partials.into_iter().map(|g| (g.u, g.delta)).unzip();
    Scan {
        u: scatter(&grads_u, &tasks, batch, seq, channels),
        delta: scatter(&grads_delta, &tasks, batch, seq, channels),
        a: from_vec(Shape::new([channels, state]), grad_a),
        b: from_vec(Shape::new([batch, seq, state]), grad_b),
        c: from_vec(Shape::new([batch, seq, state]), grad_c),
        d: from_vec(Shape::new([channels]), grad_d),
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
            let (delta, u) = (lanes(x.delta, at, width), lanes(x.u, at, width));
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
            let (delta, u, dy) = (lanes(x.delta, at, width), lanes(x.u, at, width), lanes(grad_y, at, width));
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
                g.delta[t * width + j] = grad_delta[j] + dh_b[j] * u[j];
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
