//! Attention in FlashAttention-2's form (Dao, 2023): the scores never exist as a tensor.
//!
//! Forward: one cube per (block of query rows, head, batch), one unit per query row. The cube
//! stages tiles of keys and values in shared memory; each unit scores its row against the tile,
//! keeps a running maximum and sum (online softmax) and rescales its output accumulator once
//! per tile. Only each row's log-sum-exp is kept for the backward: `batch·heads·queries` floats
//! instead of the `batch·heads·queries·keys` probabilities.
//!
//! Backward, without atomics (so it is deterministic): one pass over query rows for `dq` and
//! one over key rows for `dk` and `dv` (each key/value head's rows summing over the query heads
//! of its group), both recomputing each probability from the log-sum-exp, staging the other
//! side's tiles in shared memory. `δ_i = Σ_d dO·O` comes from a small pass before them.
//!
//! Attention takes this kernel where the composition's probabilities would be large (from
//! [`FLASH_MIN_BYTES`]); below that the composition of matmuls is faster and small.
//!
//! The bias (`[1 or batch, 1 or heads, 1 or queries, keys]`, any strides: a causal or packed mask,
//! a sliding window, ALiBi) is read per score; where it is −∞ the score's dot products are
//! skipped, which halves a causal mask's work.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::empty_like;

/// Scores at or below this are masked (the bias's −∞); also the running maximum's start.
const MASKED: f32 = -1.0e30;
/// The probabilities' size from which attention takes this kernel. Below it the matmul
/// composition is faster (1.6–3.4× on lavapipe at head_dim 64: this kernel's inner products are
/// a unit's loops, not tiled matrix products) and its memory small.
pub const FLASH_MIN_BYTES: usize = 16 << 20;
/// The most keys (times the query heads sharing a key/value head) one unit walks. Lavapipe
/// (llvmpipe) bounds the iterations of a shader's loops per invocation, counted over every
/// entry of a loop, and returns wrong results past the bound; loops over the head dimension are
/// unrolled for that reason, and longer attention takes the composition.
const MAX_KEYS_PER_UNIT: usize = 8192;
/// Query (or key) rows per cube, one per unit.
const ROWS: usize = 64;
/// Floats of shared memory for the staged tiles (12 KiB, under every Vulkan device's minimum of 16).
const TILE_FLOATS: usize = 3072;

/// Tile sizes for a head dimension.
#[derive(Debug, Clone, Copy)]
pub struct Blocks {
    dim: usize,
    /// Keys (forward, dq) or queries (dk, dv) staged per tile.
    tile: usize,
}

/// Whether attention of `q` `[batch, queries, heads, head_dim]` over `k` takes this kernel:
/// where the reference's probabilities would be large (from [`FLASH_MIN_BYTES`]),
/// and no unit would walk more than [`MAX_KEYS_PER_UNIT`] keys.
pub fn worth_it<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>) -> bool {
    let [batch, queries, heads, _] = q.shape().dims();
    let [_, keys, kv_heads, _] = k.shape().dims();
    let group = heads / kv_heads.max(1);
    batch * heads * queries * keys * size_of::<f32>() >= FLASH_MIN_BYTES && keys.max(queries) * group <= MAX_KEYS_PER_UNIT
}

/// The kernel's tiles for `q` `[batch, queries, heads, head_dim]`, or None where the head is
/// too wide for the per-unit accumulators (the reference composition then runs).
pub fn blocks<R: CubeRuntime>(q: &CubeTensor<R>) -> Option<Blocks> {
    let dim = q.shape()[3];
    (1..=256).contains(&dim).then(|| Blocks { dim, tile: (TILE_FLOATS / (2 * dim + 2)).clamp(1, 64) })
}

/// Where a bias row starts for (batch, head, row), broadcasting its dimensions of size 1.
#[cube]
fn bias_row_start<F: Float>(bias: &Tensor<F>, batch: usize, head: usize, row: usize) -> usize {
    let mut b = batch;
    if bias.shape(0) == 1 {
        b = 0;
    }
    let mut h = head;
    if bias.shape(1) == 1 {
        h = 0;
    }
    let mut r = row;
    if bias.shape(2) == 1 {
        r = 0;
    }
    b * bias.stride(0) + h * bias.stride(1) + r * bias.stride(2)
}

/// Rows `start..start + tile` of a `[batch, len, heads, dim]` tensor's head, from `at` (the
/// batch and head offset), into `tile` shared floats; rows past `len` are left as they were.
#[cube]
fn stage<F: Float>(
    x: &Tensor<F>,
    at: usize,
    start: usize,
    shared: &mut SharedMemory<f32>,
    #[comptime] dim: usize,
    #[comptime] tile: usize,
) {
    let len = x.shape(1);
    #[unroll]
    for pass in 0..(tile * dim).div_ceil(ROWS) {
        let e = pass * ROWS + UNIT_POS_X as usize;
        let row = start + e / dim;
        if e < tile * dim && row < len {
            shared[e] = f32::cast_from(x[at + row * x.stride(1) + (e % dim) * x.stride(3)]);
        }
    }
}

#[cube(launch)]
fn forward_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<F>,
    out: &mut Tensor<F>,
    lse: &mut Tensor<F>,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] tile: usize,
    #[define(F)] _dtype: StorageType,
) {
    let masked = f32::new(MASKED);
    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let (queries, heads, keys) = (q.shape(1), q.shape(2), k.shape(1));
    let kv_head = head / (heads / k.shape(2));
    let row = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    // Rows past the end still stage tiles; they read row 0 and write nothing.
    let active = row < queries;
    let mut read_row = 0;
    if active {
        read_row = row;
    }
    let bias_at = bias_row_start(bias, batch, head, read_row);
    let q_at = batch * q.stride(0) + read_row * q.stride(1) + head * q.stride(2);
    let k_at = batch * k.stride(0) + kv_head * k.stride(2);
    let v_at = batch * v.stride(0) + kv_head * v.stride(2);

    let mut q_row = Array::<f32>::new(dim);
    let mut acc = Array::<f32>::new(dim);
    #[unroll]
    for d in 0..dim {
        q_row[d] = f32::cast_from(q[q_at + d * q.stride(3)]);
        acc[d] = 0.0;
    }
    let mut k_tile = SharedMemory::<f32>::new(tile * dim);
    let mut v_tile = SharedMemory::<f32>::new(tile * dim);
    let mut scores = Array::<f32>::new(tile);
    let mut m = masked;
    let mut l = 0.0f32;
    let mut start = 0;
    while start < keys {
        stage(k, k_at, start, &mut k_tile, dim, tile);
        stage(v, v_at, start, &mut v_tile, dim, tile);
        sync_cube();
        if active {
            let mut tile_max = masked;
            for t in 0..tile {
                let j = start + t;
                let mut s = masked;
                if j < keys {
                    let b = f32::cast_from(bias[bias_at + j * bias.stride(3)]);
                    if b > masked {
                        let mut dot = 0.0f32;
                        #[unroll]
                        for d in 0..dim {
                            dot += q_row[d] * k_tile[t * dim + d];
                        }
                        s = dot * scale + b;
                    }
                }
                scores[t] = s;
                tile_max = max(tile_max, s);
            }
            let m_new = max(m, tile_max);
            let correction = (m - m_new).exp();
            l *= correction;
            #[unroll]
            for d in 0..dim {
                acc[d] *= correction;
            }
            for t in 0..tile {
                let s = scores[t];
                if s > masked {
                    let p = (s - m_new).exp();
                    l += p;
                    #[unroll]
                    for d in 0..dim {
                        acc[d] += p * v_tile[t * dim + d];
                    }
                }
            }
            m = m_new;
        }
        sync_cube();
        start += tile;
    }
    if active {
        let out_at = batch * out.stride(0) + row * out.stride(1) + head * out.stride(2);
        #[unroll]
        for d in 0..dim {
            out[out_at + d * out.stride(3)] = F::cast_from(acc[d] / l);
        }
        lse[(batch * heads + head) * queries + row] = F::cast_from(m + l.ln());
    }
}

/// `δ = Σ_d dO·O` per (batch, head, query row), `[batch, heads, queries]`.
#[cube(launch)]
fn delta_kernel<F: Float>(grad: &Tensor<F>, out: &Tensor<F>, delta: &mut Tensor<f32>, #[define(F)] _dtype: StorageType) {
    let i = ABSOLUTE_POS;
    if i >= delta.len() {
        terminate!();
    }
    let (queries, heads, dim) = (grad.shape(1), grad.shape(2), grad.shape(3));
    let row = i % queries;
    let head = (i / queries) % heads;
    let batch = i / (queries * heads);
    let g_at = batch * grad.stride(0) + row * grad.stride(1) + head * grad.stride(2);
    let o_at = batch * out.stride(0) + row * out.stride(1) + head * out.stride(2);
    let mut sum = 0.0f32;
    for d in 0..dim {
        sum += f32::cast_from(grad[g_at + d * grad.stride(3)]) * f32::cast_from(out[o_at + d * out.stride(3)]);
    }
    delta[i] = sum;
}

/// `dq` for one query row per unit: `Σ_j p_ij·(dO_i·v_j − δ_i)·k_j·scale`.
#[cube(launch)]
fn query_grad_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<F>,
    grad: &Tensor<F>,
    lse: &Tensor<F>,
    delta: &Tensor<f32>,
    grad_q: &mut Tensor<F>,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] tile: usize,
    #[define(F)] _dtype: StorageType,
) {
    let masked = f32::new(MASKED);
    let batch = CUBE_POS_Z as usize;
    let head = CUBE_POS_Y as usize;
    let (queries, heads, keys) = (q.shape(1), q.shape(2), k.shape(1));
    let kv_head = head / (heads / k.shape(2));
    let row = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let active = row < queries;
    let mut read_row = 0;
    if active {
        read_row = row;
    }
    let bias_at = bias_row_start(bias, batch, head, read_row);
    let q_at = batch * q.stride(0) + read_row * q.stride(1) + head * q.stride(2);
    let g_at = batch * grad.stride(0) + read_row * grad.stride(1) + head * grad.stride(2);
    let k_at = batch * k.stride(0) + kv_head * k.stride(2);
    let v_at = batch * v.stride(0) + kv_head * v.stride(2);
    let stat = (batch * heads + head) * queries + read_row;
    let row_lse = f32::cast_from(lse[stat]);
    let row_delta = delta[stat];

    let mut q_row = Array::<f32>::new(dim);
    let mut g_row = Array::<f32>::new(dim);
    let mut dq = Array::<f32>::new(dim);
    #[unroll]
    for d in 0..dim {
        q_row[d] = f32::cast_from(q[q_at + d * q.stride(3)]);
        g_row[d] = f32::cast_from(grad[g_at + d * grad.stride(3)]);
        dq[d] = 0.0;
    }
    let mut k_tile = SharedMemory::<f32>::new(tile * dim);
    let mut v_tile = SharedMemory::<f32>::new(tile * dim);
    let mut start = 0;
    while start < keys {
        stage(k, k_at, start, &mut k_tile, dim, tile);
        stage(v, v_at, start, &mut v_tile, dim, tile);
        sync_cube();
        if active {
            for t in 0..tile {
                let j = start + t;
                if j < keys {
                    let b = f32::cast_from(bias[bias_at + j * bias.stride(3)]);
                    if b > masked {
                        let mut qk = 0.0f32;
                        let mut gv = 0.0f32;
                        #[unroll]
                        for d in 0..dim {
                            qk += q_row[d] * k_tile[t * dim + d];
                            gv += g_row[d] * v_tile[t * dim + d];
                        }
                        let p = (qk * scale + b - row_lse).exp();
                        let ds = p * (gv - row_delta);
                        #[unroll]
                        for d in 0..dim {
                            dq[d] += ds * k_tile[t * dim + d];
                        }
                    }
                }
            }
        }
        sync_cube();
        start += tile;
    }
    if active {
        let out_at = batch * grad_q.stride(0) + row * grad_q.stride(1) + head * grad_q.stride(2);
        #[unroll]
        for d in 0..dim {
            grad_q[out_at + d * grad_q.stride(3)] = F::cast_from(dq[d] * scale);
        }
    }
}

/// `dk` and `dv` for one key row of one key/value head per unit, summed over its query heads.
#[cube(launch)]
fn key_grad_kernel<F: Float>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    bias: &Tensor<F>,
    grad: &Tensor<F>,
    lse: &Tensor<F>,
    delta: &Tensor<f32>,
    grad_k: &mut Tensor<F>,
    grad_v: &mut Tensor<F>,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] tile: usize,
    #[define(F)] _dtype: StorageType,
) {
    let masked = f32::new(MASKED);
    let batch = CUBE_POS_Z as usize;
    let kv_head = CUBE_POS_Y as usize;
    let (queries, heads, keys) = (q.shape(1), q.shape(2), k.shape(1));
    let group = heads / k.shape(2);
    let row = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let active = row < keys;
    let mut read_row = 0;
    if active {
        read_row = row;
    }
    let k_at = batch * k.stride(0) + read_row * k.stride(1) + kv_head * k.stride(2);
    let v_at = batch * v.stride(0) + read_row * v.stride(1) + kv_head * v.stride(2);
    let mut k_row = Array::<f32>::new(dim);
    let mut v_row = Array::<f32>::new(dim);
    let mut dk = Array::<f32>::new(dim);
    let mut dv = Array::<f32>::new(dim);
    #[unroll]
    for d in 0..dim {
        k_row[d] = f32::cast_from(k[k_at + d * k.stride(3)]);
        v_row[d] = f32::cast_from(v[v_at + d * v.stride(3)]);
        dk[d] = 0.0;
        dv[d] = 0.0;
    }
    let mut q_tile = SharedMemory::<f32>::new(tile * dim);
    let mut g_tile = SharedMemory::<f32>::new(tile * dim);
    let mut lse_tile = SharedMemory::<f32>::new(tile);
    let mut delta_tile = SharedMemory::<f32>::new(tile);
    for member in 0..group {
        let head = kv_head * group + member;
        let q_at = batch * q.stride(0) + head * q.stride(2);
        let g_at = batch * grad.stride(0) + head * grad.stride(2);
        let stats = (batch * heads + head) * queries;
        // The bias of (query 0, this key); a bias broadcast over query rows has stride 0 there.
        let bias_at = bias_row_start(bias, batch, head, 0) + row * bias.stride(3);
        let mut bias_row_stride = bias.stride(2);
        if bias.shape(2) == 1 {
            bias_row_stride = 0;
        }
        let mut start = 0;
        while start < queries {
            stage(q, q_at, start, &mut q_tile, dim, tile);
            stage(grad, g_at, start, &mut g_tile, dim, tile);
            let t = UNIT_POS_X as usize;
            if t < tile && start + t < queries {
                lse_tile[t] = f32::cast_from(lse[stats + start + t]);
                delta_tile[t] = delta[stats + start + t];
            }
            sync_cube();
            if active {
                for t in 0..tile {
                    let i = start + t;
                    if i < queries {
                        let b = f32::cast_from(bias[bias_at + i * bias_row_stride]);
                        if b > masked {
                            let mut qk = 0.0f32;
                            let mut gv = 0.0f32;
                            #[unroll]
                            for d in 0..dim {
                                qk += q_tile[t * dim + d] * k_row[d];
                                gv += g_tile[t * dim + d] * v_row[d];
                            }
                            let p = (qk * scale + b - lse_tile[t]).exp();
                            let ds = p * (gv - delta_tile[t]);
                            #[unroll]
                            for d in 0..dim {
                                dv[d] += p * g_tile[t * dim + d];
                                dk[d] += ds * q_tile[t * dim + d];
                            }
                        }
                    }
                }
            }
            sync_cube();
            start += tile;
        }
    }
    if active {
        let k_out = batch * grad_k.stride(0) + row * grad_k.stride(1) + kv_head * grad_k.stride(2);
        let v_out = batch * grad_v.stride(0) + row * grad_v.stride(1) + kv_head * grad_v.stride(2);
        #[unroll]
        for d in 0..dim {
            grad_k[k_out + d * grad_k.stride(3)] = F::cast_from(dk[d] * scale);
            grad_v[v_out + d * grad_v.stride(3)] = F::cast_from(dv[d]);
        }
    }
}

fn cubes(rows: usize, heads: usize, batch: usize) -> CubeCount {
    CubeCount::Static(rows.div_ceil(ROWS) as u32, heads as u32, batch as u32)
}

/// The attention output `[batch, queries, heads, head_dim]` and each row's log-sum-exp
/// `[batch, heads, queries]`.
pub fn forward<R: CubeRuntime>(
    q: CubeTensor<R>,
    k: CubeTensor<R>,
    v: CubeTensor<R>,
    bias: CubeTensor<R>,
    scale: f32,
    blocks: Blocks,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let [batch, queries, heads, _] = q.shape().dims();
    let out = empty_like(&q, q.shape());
    let lse = empty_like(&q, Shape::new([batch, heads, queries]));
    let dtype = q.dtype;
    forward_kernel::launch::<R>(
        &q.client.clone(),
        cubes(queries, heads, batch),
        CubeDim::new_1d(ROWS as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        bias.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        scale,
        blocks.dim,
        blocks.tile,
        dtype.into(),
    );
    (out, lse)
}

/// The forward's inputs, its output and log-sum-exp.
pub struct Saved<R: CubeRuntime> {
    pub q: CubeTensor<R>,
    pub k: CubeTensor<R>,
    pub v: CubeTensor<R>,
    pub bias: CubeTensor<R>,
    pub out: CubeTensor<R>,
    pub lse: CubeTensor<R>,
}

/// Gradients with respect to `q`, `k` and `v` for the output gradient `grad`.
pub fn backward<R: CubeRuntime>(
    saved: Saved<R>,
    grad: CubeTensor<R>,
    scale: f32,
    blocks: Blocks,
) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let Saved { q, k, v, bias, out, lse } = saved;
    let [batch, queries, heads, _] = q.shape().dims();
    let [_, keys, kv_heads, _] = k.shape().dims();
    let client = q.client.clone();
    let dtype = q.dtype;
    let delta = empty_device_dtype(client.clone(), q.device.clone(), Shape::new([batch, heads, queries]), DType::F32);
    let rows = batch * heads * queries;
    delta_kernel::launch::<R>(
        &client,
        CubeCount::new_1d(rows.div_ceil(256) as u32),
        CubeDim::new_1d(256),
        grad.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        dtype.into(),
    );
    let grad_q = empty_like(&q, q.shape());
    query_grad_kernel::launch::<R>(
        &client,
        cubes(queries, heads, batch),
        CubeDim::new_1d(ROWS as u32),
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        bias.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        lse.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        grad_q.clone().into_tensor_arg(),
        scale,
        blocks.dim,
        blocks.tile,
        dtype.into(),
    );
    let (grad_k, grad_v) = (empty_like(&k, k.shape()), empty_like(&k, k.shape()));
    key_grad_kernel::launch::<R>(
        &client,
        cubes(keys, kv_heads, batch),
        CubeDim::new_1d(ROWS as u32),
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        bias.into_tensor_arg(),
        grad.into_tensor_arg(),
        lse.into_tensor_arg(),
        delta.into_tensor_arg(),
        grad_k.clone().into_tensor_arg(),
        grad_v.clone().into_tensor_arg(),
        scale,
        blocks.dim,
        blocks.tile,
        dtype.into(),
    );
    (grad_q, grad_k, grad_v)
}
