//! The GPU backends against flex: every architecture trains the same steps on both to the same
//! losses, gradient norms and weights; logits, gradients and cached decoding agree; checkpoints
//! move between the devices; a model too large for wgpu's buffers is refused at start.
//!
//! FURNACE_GPU picks the backend: `wgpu` (the default with `--features wgpu`) runs on whatever
//! Vulkan device the machine has — Mesa's lavapipe (a Vulkan device on the CPU) in CI, where no
//! GPU exists, runs the same CubeCL kernels, fusion and autodiff a GPU runs — and `cuda` on an
//! NVIDIA GPU (`--features cuda`; `scripts/gpu_check.sh` runs both there). Without the device the
//! tests skip with a note, unless FURNACE_REQUIRE_GPU=1 (CI, gpu_check.sh) makes that a failure.
//!
//!     FURNACE_REQUIRE_GPU=1 cargo test -p furnace-trainer --features wgpu --test gpu_parity
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use furnace_configs::capabilities::CAPABILITIES;
use furnace_configs::Recipe;
use furnace_core::params::{from_safetensors, load_named, named_tensors, visit_with_paths, HostTensor, NamedTensors, PathVisitor};
use furnace_models::kernels::FusedOps;
use furnace_models::{CausalLm, Init, LanguageModel, ModelConfig};

mod common;
use common::{arch_settings, furnace, logged_by_step, text, TINY_ARCH};

/// The GPU backend under test (`runtime.backend`'s name for it), when its device is present; a
/// missing one fails the test under FURNACE_REQUIRE_GPU=1.
fn gpu() -> Option<&'static str> {
    let default = if cfg!(feature = "wgpu") { "wgpu" } else { "cuda" };
    let backend = match std::env::var("FURNACE_GPU").as_deref().unwrap_or(default) {
        "wgpu" => "wgpu",
        "cuda" => "cuda",
        other => panic!("FURNACE_GPU={other}: the GPU backends are wgpu and cuda"),
    };
    let (present, install) = match backend {
        "wgpu" => (
            ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
                .iter()
                .any(|dir| std::fs::read_dir(dir).is_ok_and(|mut entries| entries.any(|e| e.is_ok()))),
            "no Vulkan driver is installed: apt install mesa-vulkan-drivers (lavapipe)",
        ),
        _ => (Path::new("/proc/driver/nvidia/version").exists(), "no NVIDIA driver is loaded"),
    };
    if !present {
        assert!(std::env::var("FURNACE_REQUIRE_GPU").as_deref() != Ok("1"), "FURNACE_REQUIRE_GPU=1 but {install}");
        eprintln!("skipped: {install}");
        return None;
    }
    Some(backend)
}

/// `$check::<G>(args…)` with `G` the backend `gpu()` named, as this binary was built for it.
macro_rules! on_gpu {
    ($gpu:expr, $check:ident($($arg:expr),* $(,)?)) => {
        match $gpu {
            #[cfg(feature = "wgpu")]
            "wgpu" => $check::<burn::backend::Wgpu>($($arg),*),
            #[cfg(feature = "cuda")]
            "cuda" => $check::<burn::backend::Cuda>($($arg),*),
            other => panic!("FURNACE_GPU={other}: this test binary was built without --features {other}"),
        }
    };
}

/// `furnace train` on TINY_ARCH (3 steps, each logged) with `sets` overrides into `run`; must succeed.
fn train(dir: &Path, run: &str, sets: &[String], extra: &[&str]) -> String {
    let recipe = dir.join("tiny.toml");
    std::fs::write(&recipe, TINY_ARCH).unwrap();
    let mut args = vec!["train".to_string(), "--config".into(), recipe.display().to_string()];
    args.extend(["--set".into(), format!("run.output_dir={}", dir.join(run).display())]);
    args.extend(["--set", "training.steps=3", "--set", "training.log_every=1"].map(String::from));
    for set in sets {
        args.extend(["--set".into(), set.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = furnace(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{run}: {}", text(&out));
    text(&out)
}

fn weights(run: &Path, step: usize) -> NamedTensors {
    from_safetensors(&std::fs::read(run.join(format!("checkpoints/step_{step}/model.safetensors"))).unwrap()).unwrap()
}

fn assert_close(what: &str, flex: f64, gpu: f64, relative: f64) {
    assert!(
        (flex - gpu).abs() <= relative * flex.abs().max(1e-6),
        "{what}: flex {flex} vs the GPU's {gpu} (relative tolerance {relative})"
    );
}

/// Every parameter of `b` within `tolerance` (absolute, on values of order 0.1) of `a`.
fn assert_same_weights(what: &str, a: &NamedTensors, b: &NamedTensors, tolerance: f32) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: parameter names");
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.shape, y.shape, "{what}: {name}");
        let worst = x.data.iter().zip(&y.data).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(worst <= tolerance, "{what}: {name} differs by up to {worst}");
    }
}

/// Each architecture's settings, with grouped-query attention where it has it.
fn gqa_arch_settings(arch: &str) -> Vec<String> {
    let mut settings = arch_settings(arch);
    if matches!(arch, "llama" | "mixtral") {
        settings.push("model.n_kv_heads=2".into());
    }
    settings
}

#[test]
fn every_architecture_trains_on_the_gpu_as_on_flex() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    for caps in &CAPABILITIES {
        let arch = caps.arch.to_string();
        let on = |backend: &str| {
            let run = format!("{arch}-{backend}");
            let sets = [gqa_arch_settings(&arch), vec![format!("runtime.backend={backend}")]].concat();
            train(dir.path(), &run, &sets, &[]);
            dir.path().join(run)
        };
        let (flex, on_gpu) = (on("flex"), on(gpu));
        let (flex_loss, gpu_loss) = (logged_by_step(&flex, "loss"), logged_by_step(&on_gpu, "loss"));
        assert_eq!(flex_loss.len(), 3, "{arch}");
        for (step, loss) in &flex_loss {
            assert_close(&format!("{arch} loss at step {step}"), *loss, gpu_loss[step], 1e-4);
        }
        let (flex_norm, gpu_norm) = (logged_by_step(&flex, "grad_norm"), logged_by_step(&on_gpu, "grad_norm"));
        for (step, norm) in &flex_norm {
            assert_close(&format!("{arch} gradient norm at step {step}"), *norm, gpu_norm[step], 1e-3);
        }
        assert_same_weights(&arch, &weights(&flex, 3), &weights(&on_gpu, 3), 1e-4);
    }
}

/// A checkpoint written on one device resumes on the other, and its steps are the straight
/// run's; exports and decoding read a GPU run's checkpoint as any other.
#[test]
fn checkpoints_move_between_devices_and_decode_alike() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let backend = |name: &str| vec![format!("runtime.backend={name}"), "training.steps=4".into()];
    train(dir.path(), "straight", &backend("flex"), &[]);
    for (first, second) in [(gpu, "flex"), ("flex", gpu)] {
        let run = format!("{first}-then-{second}");
        train(dir.path(), &run, &backend(first), &["--max-steps", "2"]);
        let resume = dir.path().join(&run).display().to_string();
        let printed = train(dir.path(), &run, &backend(second), &["--resume", &resume]);
        assert!(printed.contains("resumed from"), "{printed}");
        let (expected, resumed) = (logged_by_step(&dir.path().join("straight"), "loss"), logged_by_step(&dir.path().join(&run), "loss"));
        for step in 3..=4 {
            assert_close(&format!("{run} loss at step {step}"), expected[&step], resumed[&step], 1e-4);
        }
        assert_same_weights(&run, &weights(&dir.path().join("straight"), 4), &weights(&dir.path().join(&run), 4), 1e-4);
    }
    // Greedy decoding with the KV cache gives the same tokens on both devices from the same weights.
    let run = dir.path().join(format!("flex-then-{gpu}"));
    let checkpoint = run.display().to_string();
    let decode = |backend: &str| {
        let args = ["generate", "--checkpoint", &checkpoint, "--backend", backend, "--prompt", "Once upon", "--temperature", "0"];
        let out = furnace(&[&args[..], &["--max-new-tokens", "12"]].concat());
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(decode("flex"), decode(gpu), "the step-4 weights decode alike on both devices");
    let hf = dir.path().join("hf");
    let out = furnace(&["export", "--checkpoint", &checkpoint, "--out", &hf.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(hf.join("model.safetensors").is_file());
}

/// GPT-2's 50257 × 768 embedding (154 MB) is past lavapipe's largest buffer (128 MiB, a limit many
/// GPUs share under wgpu): refused at start naming the keys, not a panic inside the backend. A
/// device with larger buffers trains it.
#[test]
fn a_model_beyond_the_devices_buffers_is_refused_at_start() {
    if gpu() != Some("wgpu") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let set = format!("run.output_dir={}", dir.path().join("gpt2").display());
    let sets =
        ["--set", "model.n_layers=2", "--set", "runtime.backend=wgpu", "--set", "training.steps=1", "--set", "training.local_batch_size=1"];
    let out = furnace(&[&["train", "--config", "recipes/gpt2-124m.toml", "--set", &set][..], &sets].concat());
    let printed = text(&out);
    assert!(!printed.contains("panicked"), "{printed}");
    if !out.status.success() {
        assert!(printed.contains("model.vocab_size × model.d_model = 50257 × 768") && printed.contains("largest buffer"), "{printed}");
    }
}

/// Every parameter's gradient, by path.
fn gradients<B: AutodiffBackend>(model: &LanguageModel<B>, grads: &B::Gradients) -> NamedTensors {
    struct Collect<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        out: NamedTensors,
    }
    impl<B: AutodiffBackend> PathVisitor<B> for Collect<'_, B> {
        fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
            if let Some(grad) = param.grad(self.grads) {
                self.out.insert(path.to_string(), HostTensor::from_tensor(grad));
            }
        }
    }
    let mut collect = Collect { grads, out: NamedTensors::new() };
    visit_with_paths(model, &mut collect);
    collect.out
}

/// Logits of a fixed batch and every parameter's gradient of a fixed weighting of them.
fn logits_and_gradients<B: AutodiffBackend + FusedOps>(
    config: &ModelConfig,
    weights: &NamedTensors,
    device: &B::Device,
) -> (HostTensor, NamedTensors) {
    let model = load_named(config.init::<B>(7, device), weights).unwrap();
    let (batch, seq) = (2, 16);
    let ids: Vec<i64> = (0..batch * seq).map(|i| ((i * 37 + 11) % 290) as i64).collect();
    let tokens = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [batch, seq]), device);
    let logits = match config {
        ModelConfig::T5(_) => model.forward_seq2seq(tokens.clone(), &[seq, seq], tokens).unwrap(),
        _ => model.forward_routed(tokens, None).unwrap().0,
    };
    let [b, t, v] = logits.dims();
    let weighting: Vec<f32> = (0..b * t * v).map(|i| ((i as f32) * 0.618).sin()).collect();
    let weighting = Tensor::<B, 3>::from_data(TensorData::new(weighting, [b, t, v]), device);
    let loss = (logits.clone() * weighting).sum();
    let grads = loss.backward();
    (HostTensor::from_tensor(logits), gradients(&model, &grads))
}

fn largest_magnitude(t: &HostTensor) -> f32 {
    t.data.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// `b` within `relative` of `a`, relative to `a`'s largest magnitude or `floor`, whichever is
/// larger (a gradient that is zero in exact arithmetic, as a key bias's, is rounding noise).
fn assert_close_tensor(what: &str, a: &HostTensor, b: &HostTensor, relative: f32, floor: f32) {
    assert_eq!(a.shape, b.shape, "{what}");
    let scale = largest_magnitude(a).max(floor).max(1e-12);
    let worst = a.data.iter().zip(&b.data).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst <= relative * scale, "{what}: differs by {worst} (largest magnitude {scale}, relative tolerance {relative})");
}

/// The forward logits (1e-4 relative) and every parameter's gradient (1e-3 relative) of each
/// architecture on the GPU against flex, from the same weights.
#[test]
fn every_architectures_logits_and_gradients_on_the_gpu_equal_flex() {
    let Some(gpu) = gpu() else { return };
    for caps in &CAPABILITIES {
        let arch = caps.arch.to_string();
        let sets: Vec<String> = gqa_arch_settings(&arch);
        let recipe = Recipe::from_toml(TINY_ARCH, "tiny.toml", &sets).unwrap();
        let config = recipe.model.model(Some(300));
        let weights = named_tensors(&config.init::<Flex>(7, &Default::default()));
        let (flex_logits, flex_grads) = logits_and_gradients::<Autodiff<Flex>>(&config, &weights, &Default::default());
        let (gpu_logits, gpu_grads) = on_gpu!(gpu, logits_and_gradients_on(&config, &weights));
        assert_close_tensor(&format!("{arch} logits"), &flex_logits, &gpu_logits, 1e-4, 0.0);
        assert_eq!(flex_grads.keys().collect::<Vec<_>>(), gpu_grads.keys().collect::<Vec<_>>(), "{arch}: parameters with gradients");
        // (A mixture of experts' experts that no token of the batch chose get no gradient.)
        if arch != "mixtral" {
            assert_eq!(flex_grads.len(), weights.len(), "{arch}: every parameter has a gradient");
        }
        let largest = flex_grads.values().map(largest_magnitude).fold(0.0f32, f32::max);
        for (name, grad) in &flex_grads {
            assert_close_tensor(&format!("{arch} gradient of {name}"), grad, &gpu_grads[name], 1e-3, 1e-5 * largest);
        }
    }
}

fn logits_and_gradients_on<G: FusedOps>(config: &ModelConfig, weights: &NamedTensors) -> (HostTensor, NamedTensors)
where
    Autodiff<G>: FusedOps,
{
    logits_and_gradients::<Autodiff<G>>(config, weights, &Default::default())
}

/// Fine-tuning, preference and memory features: two steps on each backend log the same losses
/// and gradient norms (fp16-mixed to its precision).
#[test]
fn post_training_and_memory_features_step_alike() {
    let Some(gpu) = gpu() else { return };
    let dir = tempfile::tempdir().unwrap();
    train(dir.path(), "base", &[], &[]);
    let base = format!("model.init_from={}", dir.path().join("base").display());
    // Preference pairs need a longer context than the stories.
    train(dir.path(), "base-64", &["model.max_seq_len=64".into(), "training.seq_len=64".into()], &[]);
    let base_64 = format!("model.init_from={}", dir.path().join("base-64").display());
    let features: [(&str, Vec<String>, f64); 6] = [
        ("checkpoint-full", vec!["activation_checkpoint.mode=full".into()], 1e-4),
        ("checkpoint-selective", vec!["activation_checkpoint.mode=selective".into()], 1e-4),
        ("lora", vec!["lora.r=4".into()], 1e-4),
        ("qlora", vec![base.clone(), "lora.r=4".into(), "lora.quantize_base=nf4".into()], 1e-4),
        ("dpo", vec![base_64, "training.mode=dpo".into(), "data.source=arithmetic-preferences".into(), "training.seq_len=64".into()], 1e-4),
        ("fp16-mixed", vec!["runtime.precision=fp16-mixed".into()], 1e-3),
    ];
    for (name, sets, tolerance) in features {
        let on = |backend: &str| {
            let run = format!("{name}-{backend}");
            let sets = [sets.clone(), vec![format!("runtime.backend={backend}"), "training.steps=2".into()]].concat();
            train(dir.path(), &run, &sets, &[]);
            dir.path().join(run)
        };
        let (flex, on_gpu) = (on("flex"), on(gpu));
        for key in ["loss", "grad_norm"] {
            let (expected, found) = (logged_by_step(&flex, key), logged_by_step(&on_gpu, key));
            assert_eq!(expected.len(), 2, "{name}: {key}");
            for (step, value) in &expected {
                assert_close(
                    &format!("{name} {key} at step {step}"),
                    *value,
                    found[step],
                    tolerance * 10.0_f64.powi((key == "grad_norm") as i32),
                );
            }
        }
    }
}

/// Decoding on the GPU with the KV cache (transformers) or the recurrent state (Mamba), a prompt
/// then one token at a time, gives the full forward's logits at every position (1e-4 relative),
/// and those equal flex's full forward.
#[test]
fn cached_and_recurrent_decoding_on_the_gpu_equal_the_full_forward() {
    let Some(gpu) = gpu() else { return };
    for arch in ["llama", "gpt2", "mixtral", "mamba"] {
        on_gpu!(gpu, check_decoding(arch));
    }
}

fn check_decoding<G: FusedOps>(arch: &str) {
    let recipe = Recipe::from_toml(TINY_ARCH, "tiny.toml", &gqa_arch_settings(arch)).unwrap();
    let config = recipe.model.model(Some(300));
    let weights = named_tensors(&config.init::<Flex>(7, &Default::default()));
    let ids: Vec<i64> = (0..12).map(|i| ((i * 53 + 5) % 290) as i64).collect();
    let device = G::Device::default();
    let model = load_named(config.init::<G>(7, &device), &weights).unwrap();
    let model = model.as_causal().unwrap();
    let tokens = Tensor::<G, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device);
    let full_logits = HostTensor::from_tensor(model.forward(tokens));
    let flex_model = load_named(config.init::<Flex>(7, &Default::default()), &weights).unwrap();
    let flex_tokens = Tensor::<Flex, 2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &Default::default());
    assert_close_tensor(
        &format!("{arch} full forward"),
        &HostTensor::from_tensor(flex_model.forward(flex_tokens).unwrap()),
        &full_logits,
        1e-4,
        0.0,
    );
    // A 5-token prompt, then the rest one token at a time.
    let mut state = model.init_state();
    let step = |from: usize, to: usize, state: &mut _| {
        let tokens = Tensor::<G, 2, Int>::from_data(TensorData::new(ids[from..to].to_vec(), [1, to - from]), &device);
        HostTensor::from_tensor(model.forward_step(tokens, state))
    };
    let mut cached = step(0, 5, &mut state).data;
    for i in 5..ids.len() {
        cached.extend(step(i, i + 1, &mut state).data);
    }
    let cached = HostTensor { shape: full_logits.shape.clone(), data: cached };
    assert_close_tensor(&format!("{arch} decoding with its cache or state"), &full_logits, &cached, 1e-4, 0.0);
}

/// Continuous batching on the GPU (the paged KV cache's reference path there: keys and values
/// scattered into the pool, gathered back through the block tables) gives each sequence its own
/// full forward's logits (1e-4 relative): two sequences joining at different steps, their
/// prompts read three tokens a step beside the other's decoding.
#[test]
fn continuous_batching_on_the_gpu_equals_the_full_forward() {
    let Some(gpu) = gpu() else { return };
    for arch in ["llama", "gpt2", "mamba"] {
        on_gpu!(gpu, check_batching(arch));
    }
}

fn check_batching<G: FusedOps>(arch: &str) {
    use furnace_models::{BatchedDecoding, SequenceCache};
    let recipe = Recipe::from_toml(TINY_ARCH, "tiny.toml", &gqa_arch_settings(arch)).unwrap();
    let config = recipe.model.model(Some(300));
    let weights = named_tensors(&config.init::<Flex>(7, &Default::default()));
    let device = G::Device::default();
    let model = load_named(config.init::<G>(7, &device), &weights).unwrap();
    let model = model.as_causal().unwrap();
    let sequences: Vec<Vec<u32>> = [(12, 53), (9, 31)].iter().map(|&(len, mul)| (0..len).map(|i| (i * mul + 5) % 290).collect()).collect();
    let full: Vec<HostTensor> = sequences
        .iter()
        .map(|s| {
            let ids: Vec<i64> = s.iter().map(|&t| t as i64).collect();
            HostTensor::from_tensor(model.forward(Tensor::<G, 2, Int>::from_data(TensorData::new(ids, [1, s.len()]), &device)))
        })
        .collect();
    let vocab = *full[0].shape.last().unwrap();
    let mut batch = model.new_batch(8);
    // (sequence, tokens it holds); sequence 1 joins at step 2.
    let mut live: Vec<(usize, usize)> = Vec::new();
    for step in 0.. {
        for (s, joins) in [(0, 0), (1, 2)] {
            if step == joins {
                assert_eq!(batch.add(s as u64, &sequences[s]), 0, "nothing cached yet");
                live.push((s, 0));
            }
        }
        live.retain(|&(s, held)| held < sequences[s].len());
        if live.is_empty() && step > 2 {
            break;
        }
        // A 6-token prompt in two chunks, then one token at a time.
        let entries: Vec<(u64, &[u32])> =
            live.iter().map(|&(s, held)| (s as u64, &sequences[s][held..held + if held < 6 { 3 } else { 1 }])).collect();
        for &(id, tokens) in &entries {
            assert!(batch.reserve(id, tokens.len()));
        }
        let logits = HostTensor::from_tensor(model.step(&mut batch, &entries));
        for (e, (s, held)) in live.iter_mut().enumerate() {
            *held += entries[e].1.len();
            let at = (*held - 1) * vocab;
            let want = HostTensor { shape: vec![vocab], data: full[*s].data[at..at + vocab].to_vec() };
            let got = HostTensor { shape: vec![vocab], data: logits.data[e * vocab..(e + 1) * vocab].to_vec() };
            assert_close_tensor(&format!("{arch} sequence {s} after {held} tokens, batched"), &want, &got, 1e-4, 0.0);
        }
    }
}

/// What causal attention keeps on the device for its backward, as `furnace bench attention`
/// measures it: the reference composition keeps the probabilities (`heads·T²` floats), the
/// flash kernel (which attention takes from 16 MiB of probabilities) a log-sum-exp per row.
#[test]
fn flash_attention_keeps_a_row_statistic_instead_of_the_probabilities() {
    if gpu() != Some("wgpu") {
        return;
    }
    let kept = |kernels: &str| -> u64 {
        let out = std::process::Command::new(common::furnace_bin())
            .args(["bench", "attention", "--seq", "2048", "--heads", "1", "--dim", "16"])
            .env("FURNACE_KERNELS", kernels)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let report = text(&out);
        let bytes = report.split("MiB (").nth(1).and_then(|rest| rest.split(' ').next()).and_then(|n| n.parse().ok());
        bytes.unwrap_or_else(|| panic!("no kept bytes in: {report}"))
    };
    let (reference, fused) = (kept("reference"), kept("fused"));
    assert!(reference >= 2048 * 2048 * 4, "the reference keeps the probabilities: {reference} bytes");
    assert!(fused <= 4 * 2048 * 4, "the flash kernel keeps a statistic per row: {fused} bytes (reference {reference})");
}

/// Every CubeCL kernel of the GPU backends against the reference composition of Burn ops on
/// the same device: values (1e-5 of the largest magnitude) and gradients (1e-4). Attention (at a
/// length where it takes the flash kernel) runs over many query blocks and key tiles, with
/// grouped heads, a causal mask, a sliding window with ALiBi (a bias per head), and a padding
/// mask broadcast over the query rows. The
/// optimizer's fused AdamW and Lion updates equal the composed update over three steps, and
/// Mamba's selective scan its chunked composition.
#[test]
fn every_fused_kernel_on_the_gpu_equals_its_reference() {
    let Some(gpu) = gpu() else { return };
    on_gpu!(gpu, check_kernels());
}

fn check_kernels<G: FusedOps + furnace_optim::FusedUpdate>() {
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{TensorMetadata, TensorPrimitive};
    use furnace_models::blocks::NormKind;
    use furnace_models::kernels::{reference, AttentionSaved, Scan};

    let device = G::Device::default();
    let mut seed = 0x2545_f491_u64;
    let mut random = |shape: &[usize]| -> FloatTensor<G> {
        let values: Vec<f32> = (0..shape.iter().product::<usize>())
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        let flat = Tensor::<G, 1>::from_data(TensorData::new(values, [shape.iter().product::<usize>()]), &device);
        G::float_reshape(flat.into_primitive().tensor(), shape.into())
    };
    fn host<G: FusedOps>(x: FloatTensor<G>) -> HostTensor {
        HostTensor::from_tensor(Tensor::<G, 1>::from_primitive(TensorPrimitive::Float(x)).flatten::<1>(0, 0))
    }
    let same = |what: &str, want: FloatTensor<G>, got: FloatTensor<G>, relative: f32| {
        assert_close_tensor(what, &host::<G>(want), &host::<G>(got), relative, 0.0);
    };

    let (x, grad) = (random(&[3, 5, 40]), random(&[3, 5, 40]));
    same("gelu_tanh", reference::gelu_tanh::<G>(x.clone()), G::gelu_tanh(x.clone()), 1e-5);
    same(
        "gelu_tanh backward",
        reference::gelu_tanh_backward::<G>(x.clone(), grad.clone()),
        G::gelu_tanh_backward(x.clone(), grad.clone()),
        1e-5,
    );
    let up = random(&[3, 5, 40]);
    same("swiglu", reference::swiglu::<G>(x.clone(), up.clone()), G::swiglu(x.clone(), up.clone()), 1e-5);
    let (want_gate, want_up) = reference::swiglu_backward::<G>(x.clone(), up.clone(), grad.clone());
    let (got_gate, got_up) = G::swiglu_backward(x.clone(), up.clone(), grad.clone());
    same("swiglu backward (gate)", want_gate, got_gate, 1e-5);
    same("swiglu backward (up)", want_up, got_up, 1e-5);

    // QLoRA's NF4 weight [192, 96] (288 blocks of 64, more than one absmax block of 256),
    // times inputs on both sides: x·W forward, dy·Wᵀ in backward.
    let values: Vec<f32> = host::<G>(random(&[192 * 96])).data.iter().map(|v| v * 3.0).collect();
    let nf4 = std::sync::Arc::new(furnace_models::nf4::Nf4Matrix::quantize(&values, [192, 96]));
    let (x, dy) = (random(&[7, 192]), random(&[7, 96]));
    same("nf4_matmul", reference::nf4_matmul::<G>(x.clone(), &nf4, false), G::nf4_matmul(x, &nf4, false), 1e-5);
    same("nf4_matmul transposed", reference::nf4_matmul::<G>(dy.clone(), &nf4, true), G::nf4_matmul(dy, &nf4, true), 1e-5);

    // Mamba's causal convolution and SiLU over [batch 2, seq 37, channels 70], filters of 4.
    let (x, weight, bias, grad) = (random(&[2, 37, 70]), random(&[70, 4]), random(&[70]), random(&[2, 37, 70]));
    same(
        "causal_conv_silu",
        reference::causal_conv_silu::<G>(x.clone(), weight.clone(), bias.clone()),
        G::causal_conv_silu(x.clone(), weight.clone(), bias.clone()),
        1e-5,
    );
    let want = reference::causal_conv_silu_backward::<G>(x.clone(), weight.clone(), bias.clone(), grad.clone());
    let got = G::causal_conv_silu_backward(x, weight, bias, grad);
    same("causal_conv_silu backward (x)", want.0, got.0, 1e-5);
    same("causal_conv_silu backward (weight)", want.1, got.1, 1e-4);
    same("causal_conv_silu backward (bias)", want.2, got.2, 1e-4);

    // RoPE over [batch 2, seq 6, heads 3, head_dim 8], angles shared by the batch.
    let (q, cos, sin, grad_q) = (random(&[2, 6, 3, 8]), random(&[1, 6, 1, 8]), random(&[1, 6, 1, 8]), random(&[2, 6, 3, 8]));
    same("rope", reference::rope::<G>(q.clone(), cos.clone(), sin.clone()), G::rope(q.clone(), cos.clone(), sin.clone()), 1e-5);
    same(
        "rope backward",
        reference::rope_backward::<G>(grad_q.clone(), cos.clone(), sin.clone()),
        G::rope_backward(grad_q, cos, sin),
        1e-5,
    );

    // Norms over rows of 300 (more than one pass of a row's units).
    let (x, grad, weight, bias) = (random(&[4, 3, 300]), random(&[4, 3, 300]), random(&[300]), random(&[300]));
    for kind in [NormKind::RmsNorm, NormKind::LayerNorm] {
        for with_bias in [false, true] {
            let b = with_bias.then(|| bias.clone());
            same(
                &format!("{kind} (bias {with_bias})"),
                reference::norm::<G>(x.clone(), weight.clone(), b.clone(), kind, 1e-5),
                G::norm(x.clone(), weight.clone(), b, kind, 1e-5),
                1e-5,
            );
            let want = reference::norm_backward::<G>(x.clone(), weight.clone(), grad.clone(), kind, 1e-5, with_bias);
            let got = G::norm_backward(x.clone(), weight.clone(), grad.clone(), kind, 1e-5, with_bias);
            same(&format!("{kind} backward: x"), want.0, got.0, 1e-4);
            same(&format!("{kind} backward: weight"), want.1, got.1, 1e-4);
            assert_eq!(want.2.is_some(), got.2.is_some(), "{kind}: a bias gradient exactly when asked");
            if let (Some(want), Some(got)) = (want.2, got.2) {
                same(&format!("{kind} backward: bias"), want, got, 1e-4);
            }
        }
    }

    // Cross-entropy over a vocabulary of 1000 (several strides of a row's units), a row ignored.
    let logits = G::float_mul_scalar(random(&[5, 1000]), 8.0.into());
    let targets = Tensor::<G, 1, Int>::from_data(TensorData::new(vec![3i64, 999, -1, 0, 512], [5]), &device).into_primitive();
    same(
        "cross_entropy",
        reference::cross_entropy::<G>(logits.clone(), targets.clone()),
        G::cross_entropy(logits.clone(), targets.clone()),
        1e-5,
    );
    let (want_loss, want_grad) = reference::cross_entropy_with_grad::<G>(logits.clone(), targets.clone());
    let (got_loss, got_grad) = G::cross_entropy_with_grad(logits, targets);
    same("cross_entropy with grad: loss", want_loss, got_loss, 1e-5);
    same("cross_entropy with grad: gradient", want_grad, got_grad, 1e-5);

    // Attention over 1030 and 1100 positions (17 and 18 blocks of 64, the last partial), over
    // the flash kernel's threshold: 4 heads on 2 key/value heads of 16 dimensions (the unrolled
    // path) under three masks, and 2 heads on 1 of 64 dimensions (the looped path), causal.
    let slopes = [0.5f32, 0.25, 0.125, 0.0625];
    let scale = 0.25;
    for (batch, len, heads, kv_heads, dim) in [(2, 1030, 4, 2, 16), (2, 1100, 2, 1, 64)] {
        let q = random(&[batch, len, heads, dim]);
        let (k, v) = (random(&[batch, len, kv_heads, dim]), random(&[batch, len, kv_heads, dim]));
        let grad = random(&[batch, len, heads, dim]);
        let padding: Vec<f32> = (0..batch * len).map(|i| if i % len < len - 50 * (i / len) { 0.0 } else { f32::NEG_INFINITY }).collect();
        let mut biases: Vec<(&str, FloatTensor<G>)> =
            vec![("causal", furnace_models::blocks::attention_bias::<G>(len, 0, 0, None, &device).into_primitive().tensor())];
        if heads == slopes.len() {
            let window = furnace_models::blocks::attention_bias::<G>(len, 0, 200, Some(&slopes), &device);
            let padding = Tensor::<G, 1>::from_data(TensorData::new(padding, [batch * len]), &device).reshape([batch, 1, 1, len]);
            biases.extend([("window + alibi", window.into_primitive().tensor()), ("padding", padding.into_primitive().tensor())]);
        }
        let short = |x: &FloatTensor<G>| {
            Tensor::<G, 4>::from_primitive(TensorPrimitive::Float(x.clone())).narrow(1, 0, 8).into_primitive().tensor()
        };
        let short_bias = furnace_models::blocks::attention_bias::<G>(8, 0, 0, None, &device).into_primitive().tensor();
        let (_, kept) = G::multi_head_attention_forward(short(&q), short(&k), short(&v), short_bias, scale);
        assert_eq!(kept.shape().num_dims(), 4, "short attention takes the composition, which keeps the probabilities");
        for (what, bias) in biases {
            let what = format!("attention, head_dim {dim}, {what}");
            let (want_out, probs) = reference::attention_forward::<G>(q.clone(), k.clone(), v.clone(), bias.clone(), scale);
            let (got_out, kept) = G::multi_head_attention_forward(q.clone(), k.clone(), v.clone(), bias.clone(), scale);
            assert_eq!(kept.shape().num_dims(), 3, "{what}: at this size a log-sum-exp per row is kept");
            same(&what, want_out.clone(), got_out.clone(), 1e-5);
            let want = reference::attention_backward::<G>(q.clone(), k.clone(), v.clone(), probs, grad.clone(), scale);
            let saved = AttentionSaved { q: q.clone(), k: k.clone(), v: v.clone(), bias, out: got_out, kept };
            let got = G::multi_head_attention_backward(saved, grad.clone(), scale);
            same(&format!("{what}, backward: q"), want.0, got.0, 1e-4);
            same(&format!("{what}, backward: k"), want.1, got.1, 1e-4);
            same(&format!("{what}, backward: v"), want.2, got.2, 1e-4);
        }
    }

    // Mamba's selective scan over 70 channels (two cubes of 64), 37 steps, a state of 16.
    let (batch, seq, channels, state) = (2, 37, 70, 16);
    let inputs = Scan {
        u: random(&[batch, seq, channels]),
        dt: random(&[batch, seq, channels]),
        a: G::float_mul_scalar(G::float_abs(random(&[channels, state])), (-2.0).into()),
        b: random(&[batch, seq, state]),
        c: random(&[batch, seq, state]),
        d: random(&[channels]),
    };
    let grad = random(&[batch, seq, channels]);
    same("selective scan", reference::selective_scan::<G>(inputs.clone()), G::selective_scan(inputs.clone()), 1e-5);
    let want = reference::selective_scan_backward::<G>(inputs.clone(), grad.clone());
    let got = G::selective_scan_backward(inputs, grad);
    for (name, want, got) in [
        ("u", want.u, got.u),
        ("dt", want.dt, got.dt),
        ("a", want.a, got.a),
        ("b", want.b, got.b),
        ("c", want.c, got.c),
        ("d", want.d, got.d),
    ] {
        same(&format!("selective scan backward: {name}"), want, got, 1e-4);
    }

    use furnace_optim::algorithm::Slots;
    use furnace_optim::fused::composed_update;
    use furnace_optim::Algorithm;
    let to_tensor = |x: FloatTensor<G>| Tensor::<G, 1>::from_primitive(TensorPrimitive::Float(x));
    for algorithm in [Algorithm::AdamW { beta1: 0.9, beta2: 0.95, eps: 1e-8 }, Algorithm::Lion { beta1: 0.9, beta2: 0.99 }] {
        let start = to_tensor(random(&[1000]));
        let (mut want, mut got) = (start.clone(), start);
        let (mut want_slots, mut got_slots) = (Slots::<G>::new(), Slots::<G>::new());
        for step in 1..=3 {
            let grad = to_tensor(random(&[1000]));
            want = composed_update(&algorithm, step, 1e-2, 0.1, 0.5, want, grad.clone(), &mut want_slots, &mut None);
            got = G::update(&algorithm, step, 1e-2, 0.1, 0.5, got, grad, &mut got_slots, &mut None);
        }
        same(&format!("{algorithm:?}: parameters"), want.into_primitive().tensor(), got.into_primitive().tensor(), 1e-5);
        assert_eq!(want_slots.keys().collect::<Vec<_>>(), got_slots.keys().collect::<Vec<_>>(), "{algorithm:?}: state slots");
        for (name, slot) in want_slots {
            same(
                &format!("{algorithm:?}: {name}"),
                slot.into_primitive().tensor(),
                got_slots.remove(&name).unwrap().into_primitive().tensor(),
                1e-5,
            );
        }
    }
}
