//! Cross-entropy of `[rows, vocab]` logits, with its gradient from the same pass: one cube
//! per row, each unit keeping a running maximum and sum of exponentials over its stride of the
//! vocabulary (online softmax), the units' pairs combined through shared memory. No softmax is
//! kept; the gradient `softmax − onehot` is written in place of nothing else.

use burn::tensor::{Shape, TensorMetadata};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use super::empty_like;
use super::norm::cube_reduce;

const UNITS: usize = 256;

#[cube(launch)]
fn cross_entropy_kernel<F: Float, I: Int>(
    logits: &Tensor<F>,
    targets: &Tensor<I>,
    loss: &mut Tensor<F>,
    grad: &mut Tensor<F>,
    #[comptime] with_grad: bool,
    #[define(F, I)] _dtypes: [StorageType; 2],
) {
    let mut shared = SharedMemory::<f32>::new(UNITS);
    let row = CUBE_POS_X as usize;
    let vocab = logits.len() / loss.len();
    let start = row * vocab;
    let unit = UNIT_POS_X as usize;
    let units = CUBE_DIM_X as usize;
    let target = i32::cast_from(targets[row]);
    // A running maximum m and Σ exp(x − m) over this unit's columns.
    let mut m = f32::new(-1.0e30);
    let mut sum = 0.0f32;
    let mut c = unit;
    while c < vocab {
        let x = f32::cast_from(logits[start + c]);
        if x > m {
            sum = sum * (m - x).exp() + 1.0;
            m = x;
        } else {
            sum += (x - m).exp();
        }
        c += units;
    }
    let row_max = cube_reduce(&mut shared, m, true);
    let total = cube_reduce(&mut shared, sum * (m - row_max).exp(), false);
    let lse = row_max + total.ln();
    let ignored = target < 0;
    if unit == 0 {
        let mut value = 0.0f32;
        if !ignored {
            value = lse - f32::cast_from(logits[start + target as usize]);
        }
        loss[row] = F::cast_from(value);
    }
    if with_grad {
        let mut c = unit;
        while c < vocab {
            let mut g = 0.0f32;
            if !ignored {
                g = (f32::cast_from(logits[start + c]) - lse).exp();
                if c == target as usize {
                    g -= 1.0;
                }
            }
            grad[start + c] = F::cast_from(g);
            c += units;
        }
    }
}

fn launch<R: CubeRuntime>(logits: CubeTensor<R>, targets: CubeTensor<R>, grad: Option<&CubeTensor<R>>) -> CubeTensor<R> {
    let [rows, _] = logits.shape().dims();
    let loss = empty_like(&logits, Shape::new([rows]));
    let dtypes = [logits.dtype.into(), targets.dtype.into()];
    cross_entropy_kernel::launch::<R>(
        &logits.client.clone(),
        CubeCount::new_1d(rows as u32),
        CubeDim::new_1d(UNITS as u32),
        logits.into_tensor_arg(),
        targets.into_tensor_arg(),
        loss.clone().into_tensor_arg(),
        // Without a gradient the kernel never writes this argument.
        grad.unwrap_or(&loss).clone().into_tensor_arg(),
        grad.is_some(),
        dtypes,
    );
    loss
}

/// Per-row `logsumexp(logits) − logits[target]` (0 where the target is negative).
pub fn loss<R: CubeRuntime>(logits: CubeTensor<R>, targets: CubeTensor<R>) -> CubeTensor<R> {
    launch(logits, targets, None)
}

/// [`loss`] and its gradient for an output gradient of 1 per row, `softmax − onehot`.
pub fn loss_and_grad<R: CubeRuntime>(logits: CubeTensor<R>, targets: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
    let grad = empty_like(&logits, logits.shape());
    (launch(logits, targets, Some(&grad)), grad)
}
