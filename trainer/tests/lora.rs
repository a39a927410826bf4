//! LoRA end to end through the `furnace` binary: fine-tune a trained base with adapters while
//! its weights stay frozen, resume exactly, and ship the result as merged weights or PEFT files.

use std::path::{Path, PathBuf};

use furnace_core::params::{from_safetensors, NamedTensors};

mod common;
use common::{furnace, losses, run_ok, text};

const BASE: &str = r#"
[run]
seed = 3
[model]
flavor = "tiny"
n_kv_heads = 2
max_seq_len = 32
[data]
source = "stories"
num_examples = 300
num_val_examples = 20
tokenizer_vocab_size = 300
[training]
local_batch_size = 4
seq_len = 32
steps = 4
eval_every = 0
log_every = 1
save_every = 0
[logging]
progress = false
peak_tflops = 1.0
[eval]
max_new_tokens = 4
"#;

/// The fine-tuning recipe: arithmetic instead of stories, adapters on three kinds of layer.
const LORA: &str = r#"
[run]
seed = 5
[model]
init_from = "BASE"
[data]
source = "arithmetic"
num_examples = 400
num_val_examples = 20
[training]
local_batch_size = 4
seq_len = 32
steps = 6
eval_every = 0
log_every = 1
save_every = 0
keep_last = 0
[optimizer]
lr = 1e-2
[lr_scheduler]
warmup_steps = 1
[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj", "down_proj"]
[logging]
progress = false
peak_tflops = 1.0
[eval]
arithmetic_problems = 4
max_new_tokens = 4
"#;

struct Runs {
    dir: tempfile::TempDir,
    base: PathBuf,
    lora_recipe: PathBuf,
}

/// A trained base run and a LoRA recipe that starts from it.
fn setup() -> Runs {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::write(dir.path().join("base.toml"), BASE).unwrap();
    run_ok(&["train", "--config", dir.path().join("base.toml").to_str().unwrap(), "--set", &format!("run.output_dir={}", base.display())]);
    let lora_recipe = dir.path().join("lora.toml");
    std::fs::write(&lora_recipe, LORA.replace("BASE", base.to_str().unwrap())).unwrap();
    Runs { dir, base, lora_recipe }
}

impl Runs {
    fn train(&self, name: &str, extra: &[&str]) -> (PathBuf, String) {
        let out = self.dir.path().join(name);
        let set = format!("run.output_dir={}", out.display());
        let log = run_ok(&[&["train", "--config", self.lora_recipe.to_str().unwrap(), "--set", &set][..], extra].concat());
        (out, log)
    }
}

fn weights(checkpoint: &Path) -> NamedTensors {
    from_safetensors(&std::fs::read(checkpoint.join("model.safetensors")).unwrap()).unwrap()
}

fn logits(checkpoint: &Path, out: &Path) -> Vec<f32> {
    run_ok(&[
        "generate",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--prompt",
        "12+34=",
        "--max-new-tokens",
        "1",
        "--logits-out",
        out.to_str().unwrap(),
    ]);
    from_safetensors(&std::fs::read(out).unwrap()).unwrap()["logits"].data.clone()
}

#[test]
fn lora_trains_only_the_adapters_and_resumes_exactly() {
    let runs = setup();
    let (straight, log) = runs.train("straight", &[]);
    assert!(log.contains("trainable params 3840 || all params"), "{log}");
    let (split, _) = runs.train("split", &["--max-steps", "3"]);
    runs.train("split", &["--resume", split.to_str().unwrap()]);
    let (a, b) = (losses(&straight), losses(&split));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "resumed LoRA run repeats the straight one");
    assert!(a[5] < a[0], "the adapters learn: {a:?}");

    let base = weights(&runs.base.join("checkpoints/step_4"));
    let tuned = weights(&straight.join("checkpoints/step_6"));
    let adapters: Vec<&String> = tuned.keys().filter(|k| k.contains(".lora.")).collect();
    assert_eq!(adapters.len(), 2 * 3 * 2, "A and B for q, v and down in both layers");
    for (name, tensor) in &base {
        assert_eq!(&tuned[name], tensor, "{name} is frozen");
    }
    assert!(tuned.iter().filter(|(k, _)| k.ends_with(".lora.b")).all(|(_, t)| t.data.iter().any(|v| *v != 0.0)));
}

#[test]
fn lora_runs_export_merged_or_as_peft_adapters() {
    let runs = setup();
    let (run, _) = runs.train("run", &[]);
    let run_arg = run.to_str().unwrap();
    let hf = runs.dir.path().join("merged");
    let refused = furnace(&["export", "--checkpoint", run_arg, "--out", hf.to_str().unwrap()]);
    assert!(!refused.status.success() && text(&refused).contains("--merge-lora"), "{}", text(&refused));
    run_ok(&["export", "--checkpoint", run_arg, "--merge-lora", "--out", hf.to_str().unwrap()]);
    let (adapted, merged) = (logits(&run, &runs.dir.path().join("a.st")), logits(&hf, &runs.dir.path().join("b.st")));
    let scale = adapted.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = adapted.iter().zip(&merged).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * scale, "merged export vs adapters: {diff} (logits up to {scale})");

    let peft = runs.dir.path().join("peft");
    run_ok(&["export", "--checkpoint", run_arg, "--format", "peft", "--out", peft.to_str().unwrap()]);
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["target_modules"], serde_json::json!(["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]));
    let tensors = from_safetensors(&std::fs::read(peft.join("adapter_model.safetensors")).unwrap()).unwrap();
    assert_eq!(tensors.len(), 12);
    assert_eq!(tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].shape, vec![4, 64]);
    assert_eq!(tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape, vec![32, 4]);

    // The adapters read back over the base in Hugging Face layout give the run's logits.
    let base_hf = runs.dir.path().join("base_hf");
    run_ok(&["export", "--checkpoint", runs.base.to_str().unwrap(), "--out", base_hf.to_str().unwrap()]);
    let out = runs.dir.path().join("c.st");
    run_ok(&[
        "generate",
        "--checkpoint",
        base_hf.to_str().unwrap(),
        "--adapter",
        peft.to_str().unwrap(),
        "--prompt",
        "12+34=",
        "--max-new-tokens",
        "1",
        "--logits-out",
        out.to_str().unwrap(),
    ]);
    let applied = from_safetensors(&std::fs::read(&out).unwrap()).unwrap()["logits"].data.clone();
    let diff = adapted.iter().zip(&applied).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * scale, "PEFT adapters over the HF base vs the run: {diff}");

    // Training continues from the PEFT folder: the adapters start where the run ended.
    let from = format!("lora.adapter_from={}", peft.display());
    let (continued, _) = runs.train("continued", &["--set", &from, "--set", "optimizer.lr=1e-12", "--max-steps", "1"]);
    let resumed = logits(&continued, &runs.dir.path().join("d.st"));
    let diff = adapted.iter().zip(&resumed).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * scale, "adapters loaded from PEFT files vs the run: {diff}");
    let wrong_rank = furnace(&[
        "train",
        "--config",
        runs.lora_recipe.to_str().unwrap(),
        "--set",
        &format!("run.output_dir={}", runs.dir.path().join("wrong").display()),
        "--set",
        &from,
        "--set",
        "lora.r=8",
    ]);
    assert!(!wrong_rank.status.success() && text(&wrong_rank).contains("lora.r = 8"), "{}", text(&wrong_rank));

    let no_adapters =
        furnace(&["export", "--checkpoint", runs.base.to_str().unwrap(), "--format", "peft", "--out", peft.to_str().unwrap()]);
    assert!(!no_adapters.status.success() && text(&no_adapters).contains("no LoRA adapters"), "{}", text(&no_adapters));
}

#[test]
fn lora_target_names_that_match_nothing_are_listed() {
    let runs = setup();
    let out = runs.dir.path().join("bad");
    let result = furnace(&[
        "train",
        "--config",
        runs.lora_recipe.to_str().unwrap(),
        "--set",
        &format!("run.output_dir={}", out.display()),
        "--set",
        "lora.target_modules=[\"qkv_proj\"]",
    ]);
    assert!(!result.status.success());
    let message = text(&result);
    assert!(message.contains("`qkv_proj`") && message.contains("available: ") && message.contains("down_proj"), "{message}");
    assert!(!out.join("checkpoints").exists());
}

#[test]
fn qlora_keeps_the_base_in_nf4_resumes_exactly_and_exports_what_it_computes() {
    let runs = setup();
    let nf4 = ["--set", "lora.quantize_base=\"nf4\""];
    let (straight, log) = runs.train("straight", &nf4);
    assert!(log.contains("QLoRA: base linear layers in NF4") && log.contains("0.258x"), "{log}");
    let (split, _) = runs.train("split", &[&nf4[..], &["--max-steps", "3"]].concat());
    runs.train("split", &[&nf4[..], &["--resume", split.to_str().unwrap()]].concat());
    assert_eq!(losses(&straight), losses(&split), "resumed QLoRA run repeats the straight one");

    let saved = weights(&straight.join("checkpoints/step_6"));
    assert!(!saved.contains_key("layers.0.attention.q_proj.weight"), "NF4 layers are not in the checkpoint");
    assert!(saved.contains_key("layers.0.attention.q_proj.lora.a") && saved.contains_key("lm_head.weight"));

    let hf = runs.dir.path().join("merged");
    run_ok(&["export", "--checkpoint", straight.to_str().unwrap(), "--merge-lora", "--out", hf.to_str().unwrap()]);
    let (adapted, merged) = (logits(&straight, &runs.dir.path().join("a.st")), logits(&hf, &runs.dir.path().join("b.st")));
    let scale = adapted.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = adapted.iter().zip(&merged).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5 * scale, "merged export vs NF4 + adapters: {diff} (logits up to {scale})");

    let no_base = furnace(&[
        "train",
        "--config",
        runs.lora_recipe.to_str().unwrap(),
        "--set",
        "model.init_from=\"\"",
        "--set",
        "lora.quantize_base=\"nf4\"",
    ]);
    assert!(!no_base.status.success() && text(&no_base).contains("model.init_from"), "{}", text(&no_base));
}
