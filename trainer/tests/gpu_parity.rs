//! The wgpu backend against flex, on whatever Vulkan device the machine has: Mesa's lavapipe (a
//! Vulkan device on the CPU) in CI, where no GPU exists, runs the same CubeCL kernels, fusion and
//! autodiff a GPU runs. Every architecture trains the same steps on both backends to the same
//! losses, gradient norms and weights; checkpoints move between the devices; a model too large
//! for the device's buffers is refused at start. Built only with `--features wgpu`
//! (`cargo test -p furnace-trainer --features wgpu --test gpu_parity`); without a Vulkan driver
//! the tests skip with a note, unless FURNACE_REQUIRE_VULKAN=1 (CI) makes that a failure.
#![cfg(feature = "wgpu")]

use std::collections::BTreeMap;
use std::path::Path;

use furnace_configs::capabilities::CAPABILITIES;
use furnace_core::params::{from_safetensors, NamedTensors};

mod common;
use common::{furnace, text};

const TINY: &str = r#"
[run]
seed = 7
[model]
flavor = "tiny"
max_seq_len = 32
[data]
source = "stories"
num_examples = 200
num_val_examples = 10
tokenizer_vocab_size = 300
[training]
local_batch_size = 2
seq_len = 32
steps = 3
eval_every = 0
save_every = 0
keep_last = 0
log_every = 1
[logging]
progress = false
peak_tflops = 1.0
[eval]
max_new_tokens = 2
"#;

/// Whether a Vulkan driver is installed; a missing one fails the test under FURNACE_REQUIRE_VULKAN=1.
fn vulkan() -> bool {
    let found = ["/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d"]
        .iter()
        .any(|dir| std::fs::read_dir(dir).is_ok_and(|mut entries| entries.any(|e| e.is_ok())));
    if !found {
        assert!(
            std::env::var("FURNACE_REQUIRE_VULKAN").as_deref() != Ok("1"),
            "FURNACE_REQUIRE_VULKAN=1 but no Vulkan driver is installed: apt install mesa-vulkan-drivers"
        );
        eprintln!("skipped: no Vulkan driver (apt install mesa-vulkan-drivers gives lavapipe)");
    }
    found
}

/// `furnace train` on TINY with `sets` overrides into `run`; must succeed.
fn train(dir: &Path, run: &str, sets: &[String], extra: &[&str]) -> String {
    let recipe = dir.join("tiny.toml");
    std::fs::write(&recipe, TINY).unwrap();
    let mut args = vec!["train".to_string(), "--config".into(), recipe.display().to_string()];
    args.extend(["--set".into(), format!("run.output_dir={}", dir.join(run).display())]);
    for set in sets {
        args.extend(["--set".into(), set.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = furnace(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{run}: {}", text(&out));
    text(&out)
}

/// Each logged step's value of `key`.
fn logged(run: &Path, key: &str) -> BTreeMap<u64, f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v.get(key)?.as_f64()?))
        })
        .collect()
}

fn weights(run: &Path, step: usize) -> NamedTensors {
    from_safetensors(&std::fs::read(run.join(format!("checkpoints/step_{step}/model.safetensors"))).unwrap()).unwrap()
}

fn assert_close(what: &str, flex: f64, wgpu: f64, relative: f64) {
    assert!((flex - wgpu).abs() <= relative * flex.abs().max(1e-6), "{what}: flex {flex} vs wgpu {wgpu} (relative tolerance {relative})");
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

/// Each architecture's settings over TINY (BERT's and T5's layouts are fixed; Llama keeps GQA).
fn arch_settings(arch: &str) -> Vec<String> {
    let mut settings = vec![format!("model.arch={arch}")];
    match arch {
        "llama" | "mixtral" => settings.push("model.n_kv_heads=2".into()),
        "bert" => settings.push("model.n_kv_heads=4".into()),
        "t5" => settings.extend(["model.n_kv_heads=4".into(), "model.n_decoder_layers=2".into()]),
        _ => {}
    }
    settings
}

#[test]
fn every_architecture_trains_on_wgpu_as_on_flex() {
    if !vulkan() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for caps in &CAPABILITIES {
        let arch = caps.arch.to_string();
        let on = |backend: &str| {
            let run = format!("{arch}-{backend}");
            let sets = [arch_settings(&arch), vec![format!("runtime.backend={backend}")]].concat();
            train(dir.path(), &run, &sets, &[]);
            dir.path().join(run)
        };
        let (flex, wgpu) = (on("flex"), on("wgpu"));
        let (flex_loss, wgpu_loss) = (logged(&flex, "loss"), logged(&wgpu, "loss"));
        assert_eq!(flex_loss.len(), 3, "{arch}");
        for (step, loss) in &flex_loss {
            assert_close(&format!("{arch} loss at step {step}"), *loss, wgpu_loss[step], 1e-4);
        }
        let (flex_norm, wgpu_norm) = (logged(&flex, "grad_norm"), logged(&wgpu, "grad_norm"));
        for (step, norm) in &flex_norm {
            assert_close(&format!("{arch} gradient norm at step {step}"), *norm, wgpu_norm[step], 1e-3);
        }
        assert_same_weights(&arch, &weights(&flex, 3), &weights(&wgpu, 3), 1e-4);
    }
}

/// A checkpoint written on one device resumes on the other, and its steps are the straight
/// run's; exports and decoding read a wgpu run's checkpoint as any other.
#[test]
fn checkpoints_move_between_devices_and_decode_alike() {
    if !vulkan() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = |name: &str| vec![format!("runtime.backend={name}"), "training.steps=4".into()];
    train(dir.path(), "straight", &backend("flex"), &[]);
    for (first, second) in [("wgpu", "flex"), ("flex", "wgpu")] {
        let run = format!("{first}-then-{second}");
        train(dir.path(), &run, &backend(first), &["--max-steps", "2"]);
        let resume = dir.path().join(&run).display().to_string();
        let printed = train(dir.path(), &run, &backend(second), &["--resume", &resume]);
        assert!(printed.contains("resumed from"), "{printed}");
        let (expected, resumed) = (logged(&dir.path().join("straight"), "loss"), logged(&dir.path().join(&run), "loss"));
        for step in 3..=4 {
            assert_close(&format!("{run} loss at step {step}"), expected[&step], resumed[&step], 1e-4);
        }
        assert_same_weights(&run, &weights(&dir.path().join("straight"), 4), &weights(&dir.path().join(&run), 4), 1e-4);
    }
    // Greedy decoding with the KV cache gives the same tokens on both devices from the same weights.
    let checkpoint = dir.path().join("flex-then-wgpu").display().to_string();
    let decode = |backend: &str| {
        let args = ["generate", "--checkpoint", &checkpoint, "--backend", backend, "--prompt", "Once upon", "--temperature", "0"];
        let out = furnace(&[&args[..], &["--max-new-tokens", "12"]].concat());
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(decode("flex"), decode("wgpu"), "the step-4 weights decode alike on both devices");
    let hf = dir.path().join("hf");
    let out =
        furnace(&["export", "--checkpoint", &dir.path().join("flex-then-wgpu").display().to_string(), "--out", &hf.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(hf.join("model.safetensors").is_file());
}

/// GPT-2's 50257 × 768 embedding (154 MB) is past lavapipe's largest buffer (128 MiB, a limit many
/// GPUs share under wgpu): refused at start naming the keys, not a panic inside the backend. A
/// device with larger buffers trains it.
#[test]
fn a_model_beyond_the_devices_buffers_is_refused_at_start() {
    if !vulkan() {
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
