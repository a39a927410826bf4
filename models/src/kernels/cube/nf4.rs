//! QLoRA's frozen NF4 weights dequantized on the device: the packed 4-bit codes and the block
//! maxima stay there (about an eighth of the f32 matrix's bytes, uploaded once) and one kernel
//! builds the dense matrix for each matmul, instead of dequantizing on the host and uploading it
//! in f32 every time.

use std::sync::Arc;

use burn::tensor::{DType, Shape, TensorData};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;

use crate::nf4::{dynamic_map, Nf4Matrix, NF4_BLOCK, NF4_LEVELS};

const UNITS: u32 = 256;

/// Element `i` of the matrix: its code, the high nibble of byte i/2 for even i and the low one
/// for odd i (bytes packed four to a word, the first lowest), times its block's maximum.
#[cube(launch)]
fn nf4_dequantize_kernel<F: Float>(
    packed: &Tensor<u32>,
    absmax: &Tensor<f32>,
    levels: &Tensor<f32>,
    out: &mut Tensor<F>,
    #[comptime] block: usize,
    #[define(F)] _dtype: StorageType,
) {
    let i = ABSOLUTE_POS;
    if i >= out.len() {
        terminate!();
    }
    let byte_at = i / 2;
    let word = packed[byte_at / 4];
    let byte = (word >> (u32::cast_from(byte_at % 4) * 8)) & 0xFF;
    let code = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
    out[i] = F::cast_from(levels[usize::cast_from(code)] * absmax[i / block]);
}

/// The matrix's codes and block maxima on one device.
struct Resident<R: CubeRuntime> {
    device: R::Device,
    packed: CubeTensor<R>,
    absmax: CubeTensor<R>,
    levels: CubeTensor<R>,
}

/// `weight`'s codes and block maxima put on the device by `upload` (host data in its own dtype).
fn resident<R: CubeRuntime>(weight: &Nf4Matrix, device: &R::Device, upload: impl Fn(TensorData) -> CubeTensor<R>) -> Resident<R> {
    // NF4 blocks hold 64 codes, 32 bytes: the packed bytes always fill whole words.
    let words = weight.packed.len() / 4;
    let absmax = weight.absmax.absmax(&dynamic_map());
    Resident {
        device: device.clone(),
        packed: upload(TensorData::from_bytes_vec(weight.packed.clone(), [words], DType::U32)),
        absmax: upload(TensorData::new(absmax.clone(), [absmax.len()])),
        levels: upload(TensorData::new(NF4_LEVELS.to_vec(), [NF4_LEVELS.len()])),
    }
}

/// The dense `[d_in, d_out]` matrix of `weight` on `like`'s device, in `like`'s dtype. The
/// codes go up once, by the first call, and stay with the matrix (a matrix used on a second
/// device uploads them there for each call).
pub fn dequantize<R: CubeRuntime>(weight: &Nf4Matrix, like: &CubeTensor<R>, upload: impl Fn(TensorData) -> CubeTensor<R>) -> CubeTensor<R> {
    let kept = weight.resident.get_or_init(|| Arc::new(resident(weight, &like.device, &upload)));
    let transient;
    let on_device = match kept.downcast_ref::<Resident<R>>() {
        Some(kept) if kept.device == like.device => kept,
        _ => {
            transient = resident(weight, &like.device, &upload);
            &transient
        }
    };
    let out = empty_device_dtype(like.client.clone(), like.device.clone(), Shape::new(weight.shape), like.dtype);
    let elements = (weight.shape[0] * weight.shape[1]) as u32;
    nf4_dequantize_kernel::launch::<R>(
        &like.client,
        CubeCount::new_1d(elements.div_ceil(UNITS).max(1)),
        CubeDim::new_1d(UNITS),
        on_device.packed.clone().into_tensor_arg(),
        on_device.absmax.clone().into_tensor_arg(),
        on_device.levels.clone().into_tensor_arg(),
        out.clone().into_tensor_arg(),
        NF4_BLOCK,
        like.dtype.into(),
    );
    out
}
