use std::time::Instant;

use burn::prelude::*;

/// Float matmul throughput in GFLOP/s: best of several `size × size` products.
pub fn matmul_gflops<B: Backend>(size: usize, device: &B::Device) -> f64 {
    let a = Tensor::<B, 2>::ones([size, size], device) * 0.5;
    let b = Tensor::<B, 2>::ones([size, size], device) * 0.25;
    let run = || a.clone().matmul(b.clone()).slice([0..1, 0..1]).into_scalar();
    run();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..4 {
            run();
        }
        best = best.min(start.elapsed().as_secs_f64() / 4.0);
    }
    2.0 * (size as f64).powi(3) / best / 1e9
}
