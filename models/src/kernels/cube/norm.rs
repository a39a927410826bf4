//! RMSNorm and LayerNorm over the last dimension: one cube per row, its units striding over
//! the row and summing through shared memory. The backward's weight and bias gradients are
//! column sums over rows, from each row's mean and 1/σ that the row pass writes: one unit per
//! (column, chunk of rows), then the chunks' partial sums added in order.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::empty_like;
use crate::blocks::NormKind;

/// Units per row: a power of two, for the halving sum.
const ROW_UNITS: usize = 128;
const COLUMN_UNITS: u32 = 128;
/// Rows one unit sums for the weight and bias gradients (the partial sums are then added).
const ROW_CHUNK: usize = 256;

/// Every unit's `value` combined over the cube, the sum (or with `maximum` the largest),
/// returned to every unit. `shared` holds a float per unit; the cube's size is a power of two.
#[cube]
pub(super) fn cube_reduce(shared: &mut SharedMemory<f32>, value: f32, #[comptime] maximum: bool) -> f32 {
    let unit = UNIT_POS_X as usize;
    shared[unit] = value;
    sync_cube();
    let mut stride = CUBE_DIM_X as usize / 2;
    while stride > 0 {
        if unit < stride {
            if maximum {
                shared[unit] = max(shared[unit], shared[unit + stride]);
            } else {
                shared[unit] += shared[unit + stride];
            }
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    sync_cube();
    total
}

/// A row's mean (0 unless `centred`) and 1/σ, from the cube's units striding over its `cols`
/// values from `start`.
#[cube]
fn row_stats<F: Float>(
    x: &Tensor<F>,
    start: usize,
    cols: usize,
    shared: &mut SharedMemory<f32>,
    eps: f32,
    #[comptime] centred: bool,
) -> (f32, f32) {
    let (unit, units) = (UNIT_POS_X as usize, CUBE_DIM_X as usize);
    let n = f32::cast_from(cols as u32);
    let mut mean = 0.0f32;
    if centred {
        let mut sum = 0.0f32;
        let mut c = unit;
        while c < cols {
            sum += f32::cast_from(x[start + c]);
            c += units;
        }
        mean = cube_reduce(shared, sum, false) / n;
    }
    let mut squares = 0.0f32;
    let mut c = unit;
    while c < cols {
        let centred_x = f32::cast_from(x[start + c]) - mean;
        squares += centred_x * centred_x;
        c += units;
    }
    (mean, (cube_reduce(shared, squares, false) / n + eps).inverse_sqrt())
}

/// Each row normalised (centred first for LayerNorm), scaled and shifted.
#[cube(launch)]
fn norm_forward_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    bias: &Tensor<F>,
    out: &mut Tensor<F>,
    eps: f32,
    #[comptime] centred: bool,
    #[comptime] with_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);
    let cols = weight.len();
    let start = CUBE_POS_X as usize * cols;
    let unit = UNIT_POS_X as usize;
    let units = CUBE_DIM_X as usize;
    let (mean, rstd) = row_stats(x, start, cols, &mut shared, eps, centred);
    let mut c = unit;
    while c < cols {
        let mut y = (f32::cast_from(x[start + c]) - mean) * rstd * f32::cast_from(weight[c]);
        if with_bias {
            y += f32::cast_from(bias[c]);
        }
        out[start + c] = F::cast_from(y);
        c += units;
    }
}

/// The gradient of the input row, and the row's mean and 1/σ into `stats` `[rows, 2]` for the
/// column pass.
#[cube(launch)]
fn norm_backward_rows_kernel<F: Float>(
    x: &Tensor<F>,
    weight: &Tensor<F>,
    grad: &Tensor<F>,
    grad_x: &mut Tensor<F>,
    stats: &mut Tensor<f32>,
    eps: f32,
    #[comptime] centred: bool,
    #[define(F)] _dtype: StorageType,
) {
    let mut shared = SharedMemory::<f32>::new(ROW_UNITS);
    let cols = weight.len();
    let row = CUBE_POS_X as usize;
    let start = row * cols;
    let unit = UNIT_POS_X as usize;
    let units = CUBE_DIM_X as usize;
    let n = f32::cast_from(cols as u32);
    let (mean, rstd) = row_stats(x, start, cols, &mut shared, eps, centred);
    // mean(g·x̂) and mean(g), g = grad·weight.
    let mut projection = 0.0f32;
    let mut grad_sum = 0.0f32;
    let mut c = unit;
    while c < cols {
        let g = f32::cast_from(grad[start + c]) * f32::cast_from(weight[c]);
        projection += g * (f32::cast_from(x[start + c]) - mean) * rstd;
        grad_sum += g;
        c += units;
    }
    let projection = cube_reduce(&mut shared, projection, false) / n;
    let mut grad_mean = 0.0f32;
    if centred {
        grad_mean = cube_reduce(&mut shared, grad_sum, false) / n;
    }
    let mut c = unit;
    while c < cols {
        let g = f32::cast_from(grad[start + c]) * f32::cast_from(weight[c]);
        let normed = (f32::cast_from(x[start + c]) - mean) * rstd;
        grad_x[start + c] = F::cast_from((g - grad_mean - normed * projection) * rstd);
        c += units;
    }
    if unit == 0 {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

/// Partial column sums over one chunk of rows (`CUBE_POS_Y`) of `grad·x̂` and `grad`, into row
/// `CUBE_POS_Y` of `partial_weight` and `partial_bias` `[chunks, cols]`.
#[cube(launch)]
fn norm_backward_columns_kernel<F: Float>(
    x: &Tensor<F>,
    grad: &Tensor<F>,
    stats: &Tensor<f32>,
    partial_weight: &mut Tensor<f32>,
    partial_bias: &mut Tensor<f32>,
    #[comptime] with_bias: bool,
    #[define(F)] _dtype: StorageType,
) {
    let c = ABSOLUTE_POS_X as usize;
    let cols = partial_weight.shape(1);
    if c >= cols {
        terminate!();
    }
    let rows = grad.len() / cols;
    let chunk = CUBE_POS_Y as usize;
    let first = chunk * ROW_CHUNK;
    let mut last = first + ROW_CHUNK;
    if last > rows {
        last = rows;
    }
    let mut weight_sum = 0.0f32;
    let mut bias_sum = 0.0f32;
    for row in first..last {
        let g = f32::cast_from(grad[row * cols + c]);
        weight_sum += g * (f32::cast_from(x[row * cols + c]) - stats[2 * row]) * stats[2 * row + 1];
        bias_sum += g;
    }
    partial_weight[chunk * cols + c] = weight_sum;
    if with_bias {
        partial_bias[chunk * cols + c] = bias_sum;
    }
}

/// Each column's partial sums added in chunk order.
#[cube(launch)]
fn fold_columns_kernel<F: Float>(partial: &Tensor<f32>, out: &mut Tensor<F>, #[define(F)] _dtype: StorageType) {
    let c = ABSOLUTE_POS;
    let cols = out.len();
    if c >= cols {
        terminate!();
    }
    let mut sum = 0.0f32;
    for chunk in 0..partial.shape(0) {
        sum += partial[chunk * cols + c];
    }
    out[c] = F::cast_from(sum);
}

fn rows_of<R: CubeRuntime>(x: &CubeTensor<R>, cols: usize) -> usize {
    x.shape().num_elements() / cols
}

/// The norm of contiguous `x` over its last dimension.
pub fn forward<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    bias: Option<CubeTensor<R>>,
    kind: NormKind,
    eps: f32,
) -> CubeTensor<R> {
    let out = empty_like(&x, x.shape());
    let rows = rows_of(&x, weight.shape().num_elements());
    let with_bias = bias.is_some();
    let bias = bias.unwrap_or_else(|| weight.clone());
    let dtype = x.dtype;
    norm_forward_kernel::launch::<R>(
        &x.client.clone(),
        CubeCount::new_1d(rows as u32),
        CubeDim::new_1d(ROW_UNITS as u32),
        x.into_tensor_arg(),
        weight.into_tensor_arg(),
        bias.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        eps,
        kind == NormKind::LayerNorm,
        with_bias,
        dtype.into(),
    );
    out
}

/// Gradients of [`forward`] with respect to `x`, the weight and (when `with_bias`) the bias.
pub fn backward<R: CubeRuntime>(
    x: CubeTensor<R>,
    weight: CubeTensor<R>,
    grad: CubeTensor<R>,
    kind: NormKind,
    eps: f32,
    with_bias: bool,
) -> (CubeTensor<R>, CubeTensor<R>, Option<CubeTensor<R>>) {
    let cols = weight.shape().num_elements();
    let rows = rows_of(&x, cols);
    let dtype = x.dtype;
    let client = x.client.clone();
    let grad_x = empty_like(&x, x.shape());
    let stats = empty_device_dtype(client.clone(), x.device.clone(), Shape::new([rows, 2]), DType::F32);
    norm_backward_rows_kernel::launch::<R>(
        &client,
        CubeCount::new_1d(rows as u32),
        CubeDim::new_1d(ROW_UNITS as u32),
        x.clone().into_tensor_arg(),
        weight.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        grad_x.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        eps,
        kind == NormKind::LayerNorm,
        dtype.into(),
    );
    let chunks = rows.div_ceil(ROW_CHUNK).max(1);
    let f32_tensor = |shape: Shape| empty_device_dtype(client.clone(), x.device.clone(), shape, DType::F32);
    let (partial_weight, partial_bias) = (f32_tensor(Shape::new([chunks, cols])), f32_tensor(Shape::new([chunks, cols])));
    norm_backward_columns_kernel::launch::<R>(
        &client,
        CubeCount::new_2d((cols as u32).div_ceil(COLUMN_UNITS), chunks as u32),
        CubeDim::new_1d(COLUMN_UNITS),
        x.into_tensor_arg(),
        grad.into_tensor_arg(),
        stats.into_tensor_arg(),
        partial_weight.clone().into_tensor_arg(),
        partial_bias.clone().into_tensor_arg(),
        with_bias,
        dtype.into(),
    );
    let fold = |partial: CubeTensor<R>| {
        let out = empty_like(&weight, weight.shape());
        fold_columns_kernel::launch::<R>(
            &client,
            CubeCount::new_1d((cols as u32).div_ceil(COLUMN_UNITS)),
            CubeDim::new_1d(COLUMN_UNITS),
            partial.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtype.into(),
        );
        out
    };
    let grad_weight = fold(partial_weight);
    let grad_bias = with_bias.then(|| fold(partial_bias));
    (grad_x, grad_weight, grad_bias)
}
