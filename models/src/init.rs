//! Deterministic host-side initialisation: the same seed gives the same weights on every backend.

use burn::module::Param;
use burn::prelude::*;
use furnace_core::rng::SeededRng;

pub fn normal_param<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    rng: &mut SeededRng,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| (rng.normal() * std) as f32).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

pub fn constant_param<B: Backend, const D: usize>(shape: [usize; D], value: f32, device: &B::Device) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::full(shape, value, device))
}

/// U(−bound, bound), as PyTorch's default for convolutions and Mamba's `dt_proj` weight.
pub fn uniform_param<B: Backend, const D: usize>(
    shape: [usize; D],
    bound: f64,
    rng: &mut SeededRng,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}
