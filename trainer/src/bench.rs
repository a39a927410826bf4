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

/// Seconds for one forward and backward pass of the selective scan on random inputs
/// `[batch, seq, channels]` with `state` per channel, three ways: the fused flex kernel, the
/// chunked tensor-op scan (what GPU backends run) and the step-by-step scan under autodiff.
/// Best of `repeats`.
pub fn scan_seconds(batch: usize, seq: usize, channels: usize, state: usize, repeats: usize) -> [(&'static str, f64); 3] {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, TensorPrimitive};
    use furnace_models::kernels::{reference, selective_scan, Scan};
    type Ad = Autodiff<Flex>;

    let device = Default::default();
    let normal = |shape: [usize; 3]| Tensor::<Flex, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let inputs = Scan {
        u: normal([batch, seq, channels]),
        dt: normal([batch, seq, channels]) - 3.0,
        a: Tensor::<Flex, 2>::random([channels, state], Distribution::Uniform(-3.0, -0.5), &device),
        b: normal([batch, seq, state]),
        c: normal([batch, seq, state]),
        d: Tensor::<Flex, 1>::ones([channels], &device),
    };
    let tracked = |s: &Scan<Tensor<Flex, 3>, Tensor<Flex, 2>, Tensor<Flex, 1>>| Scan {
        u: Tensor::<Ad, 3>::from_inner(s.u.clone()).require_grad(),
        dt: Tensor::<Ad, 3>::from_inner(s.dt.clone()).require_grad(),
        a: Tensor::<Ad, 2>::from_inner(s.a.clone()).require_grad(),
        b: Tensor::<Ad, 3>::from_inner(s.b.clone()).require_grad(),
        c: Tensor::<Ad, 3>::from_inner(s.c.clone()).require_grad(),
        d: Tensor::<Ad, 1>::from_inner(s.d.clone()).require_grad(),
    };
    let best = |run: &dyn Fn()| {
        run();
        (0..repeats)
            .map(|_| {
                let start = Instant::now();
                run();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    let fused = best(&|| {
        let s = tracked(&inputs);
        let _ = selective_scan(s.clone()).sum().backward();
    });
    let chunked = best(&|| {
        let p = |t: Tensor<Flex, 3>| t.into_primitive().tensor();
        let prims = || Scan {
            u: p(inputs.u.clone()),
            dt: p(inputs.dt.clone()),
            a: inputs.a.clone().into_primitive().tensor(),
            b: p(inputs.b.clone()),
            c: p(inputs.c.clone()),
            d: inputs.d.clone().into_primitive().tensor(),
        };
        let y = Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(reference::selective_scan::<Flex>(prims())));
        let grad = y.ones_like().into_primitive().tensor();
        let g = reference::selective_scan_backward::<Flex>(prims(), grad);
        let _ = Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(g.u)).into_data();
    });
    // One run: its time is graph bookkeeping, which a warm-up does not change.
    let start = Instant::now();
    let _ = reference::selective_scan_sequential(tracked(&inputs)).sum().backward();
    let sequential = start.elapsed().as_secs_f64();
    [("fused (flex kernel)", fused), ("chunked (tensor ops)", chunked), ("sequential (tensor ops)", sequential)]
}

/// What `furnace bench allreduce` measured on this rank: the best seconds of one gradient
/// reduction as training does it and of one raw all-reduce of the same number of floats.
pub struct AllReduceTimes {
    pub elements: usize,
    pub training: f64,
    pub raw: f64,
}

/// The recipe model's gradients reduced over the ranks mpirun started, the way a training step
/// reduces them (`Parallel::reduce_gradients`: bucketed by `distributed.bucket_mb`, copied to
/// the host and back, averaged), against one all-reduce of as many f32 through the transport
/// as the library offers it. Best of `iters`, every timing started together after a barrier.
pub fn all_reduce_seconds(recipe: &furnace_configs::Recipe, iters: usize) -> anyhow::Result<AllReduceTimes> {
    use burn::backend::{Autodiff, Flex};
    use burn::optim::GradientsParams;
    type Ad = Autodiff<Flex>;

    let device = Default::default();
    let parallel = crate::parallel::Parallel::new(
        furnace_distributed::connect(crate::parallel::transport(recipe)).map_err(anyhow::Error::msg)?,
        recipe,
    );
    let vocab = recipe.model.model(None).vocab_size();
    let model = crate::model::build_model::<Ad>(recipe, vocab, None, &device)?.model;
    let (_, elements) = furnace_core::params::trainable_params(&model);
    let tokens = Tensor::<Ad, 2, Int>::zeros([1, 8], &device);
    let send = vec![1.0f32; elements];
    let mut receive = vec![0.0f32; elements];
    let (mut training, mut raw) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..iters {
        let grads = GradientsParams::from_grads(model.forward(tokens.clone())?.mean().backward(), &model);
        parallel.barrier();
        let start = Instant::now();
        drop(parallel.reduce_gradients(&model, grads));
        training = training.min(start.elapsed().as_secs_f64());
        parallel.barrier();
        let start = Instant::now();
        parallel.collective().all_reduce_sum_into(&send, &mut receive);
        raw = raw.min(start.elapsed().as_secs_f64());
    }
    Ok(AllReduceTimes { elements, training, raw })
}

/// What attention leaves on a wgpu device after its forward under autodiff (its output and what
/// it keeps for the backward: the probabilities, or with the flash kernel a log-sum-exp per
/// row), and the best seconds of a forward and backward over `repeats`, for a causal mask over
/// `[batch, seq, heads, dim]` inputs. `FURNACE_KERNELS=reference` measures the composed path.
#[cfg(feature = "wgpu")]
pub struct AttentionMeasure {
    pub kept_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
}

#[cfg(feature = "wgpu")]
pub fn attention_on_wgpu(batch: usize, seq: usize, heads: usize, dim: usize, repeats: usize) -> AttentionMeasure {
    use burn::backend::wgpu::{WgpuDevice, WgpuRuntime};
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::Distribution;
    use cubecl::Runtime;
    type Ad = Autodiff<Wgpu>;

    let device = WgpuDevice::default();
    let client = WgpuRuntime::client(&device);
    let in_use = || {
        Ad::sync(&device).expect("the wgpu device stopped");
        client.memory_usage().expect("the wgpu device stopped").bytes_in_use
    };
    let input = || Tensor::<Ad, 4>::random([batch, seq, heads, dim], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let (q, k, v) = (input(), input(), input());
    let bias = furnace_models::blocks::attention_bias::<Ad>(seq, 0, 0, None, &device);
    let scale = 1.0 / (dim as f32).sqrt();
    let step = || {
        let out = furnace_models::kernels::multi_head_attention(q.clone(), k.clone(), v.clone(), bias.clone(), scale);
        let _ = out.sum().backward();
    };
    // The first pass compiles the kernels.
    step();
    let before = in_use();
    let out = furnace_models::kernels::multi_head_attention(q.clone(), k.clone(), v.clone(), bias.clone(), scale);
    let after = in_use();
    drop(out);
    let mut seconds = f64::INFINITY;
    for _ in 0..repeats {
        let start = Instant::now();
        step();
        Ad::sync(&device).expect("the wgpu device stopped");
        seconds = seconds.min(start.elapsed().as_secs_f64());
    }
    let output_bytes = (batch * seq * heads * dim * 4) as u64;
    AttentionMeasure { kept_bytes: after.saturating_sub(before).saturating_sub(output_bytes), output_bytes, seconds }
}
