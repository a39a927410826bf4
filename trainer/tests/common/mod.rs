//! Helpers the end-to-end test files share: run the `furnace` binary, read what it wrote.
// Each test file uses the helpers it needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `furnace args`, run from the workspace root (so `recipes/...` resolves, as in the README).
pub fn furnace(args: &[&str]) -> Output {
    Command::new(furnace_bin()).args(args).current_dir(workspace()).output().expect("furnace runs")
}

/// The binary cargo built beside the tests, or FURNACE_BIN where a test binary travels without
/// its build tree (scripts/gpu_check.sh on a GPU machine).
pub fn furnace_bin() -> PathBuf {
    std::env::var_os("FURNACE_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_furnace")), PathBuf::from)
}

/// The workspace root, or FURNACE_WORKSPACE (as FURNACE_BIN).
pub fn workspace() -> PathBuf {
    std::env::var_os("FURNACE_WORKSPACE").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."), PathBuf::from)
}

pub fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// `furnace args`, which must succeed; its stdout and stderr.
pub fn run_ok(args: &[&str]) -> String {
    let out = furnace(args);
    assert!(out.status.success(), "furnace {args:?}: {}", text(&out));
    text(&out)
}

/// The training loss of every logged step of a run.
pub fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get("loss")?.as_f64())
        .collect()
}

/// A small, fast recipe for tests.
pub const TINY: &str = r#"
[run]
seed = 7
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
grad_accum_steps = 2
steps = 20
eval_every = 0
log_every = 1
save_every = 0
keep_last = 0
[lr_scheduler]
warmup_steps = 5
[logging]
progress = false
peak_tflops = 1.0
[eval]
max_new_tokens = 8
"#;

/// TINY for `arch`: its `[model]` names the arch and keeps only keys the arch has (grouped-query
/// attention is the decoders').
pub fn tiny_for(arch: &str) -> String {
    let tiny = TINY.replace("[model]\n", &format!("[model]\narch = \"{arch}\"\n"));
    match arch {
        "llama" | "gpt2" | "mixtral" => tiny,
        _ => tiny.replace("n_kv_heads = 2\n", ""),
    }
}

/// A temporary folder holding the TINY recipe and a run folder for it.
pub struct TinyRun {
    pub dir: tempfile::TempDir,
    pub recipe: PathBuf,
    pub run: PathBuf,
}

impl TinyRun {
    pub fn new() -> Self {
        Self::for_arch("llama")
    }

    /// The TINY recipe of `arch` (see `tiny_for`).
    pub fn for_arch(arch: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let recipe = write_recipe(dir.path(), &tiny_for(arch));
        let run = dir.path().join("run");
        Self { dir, recipe, run }
    }

    /// `furnace train` on the tiny recipe into the run folder, with `extra` arguments.
    pub fn train(&self, extra: &[&str]) -> Output {
        furnace(&self.train_args(extra).iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `train`, started in the background (stdout dropped, stderr kept).
    pub fn spawn_train(&self, extra: &[&str]) -> std::process::Child {
        Command::new(furnace_bin())
            .args(self.train_args(extra))
            .current_dir(workspace())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("furnace starts")
    }

    fn train_args(&self, extra: &[&str]) -> Vec<String> {
        let fixed = ["train".to_string(), "--config".into(), self.recipe.display().to_string(), "--set".into()];
        let output = format!("run.output_dir={}", self.run.display());
        fixed.into_iter().chain([output]).chain(extra.iter().map(|s| s.to_string())).collect()
    }
}

pub fn write_recipe(dir: &Path, body: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("recipe.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// A one-step recipe every architecture trains (with `arch_settings`): the stories, a 300-token
/// vocabulary, 2 × 32 tokens a step.
pub const TINY_ARCH: &str = r#"
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
steps = 1
eval_every = 0
save_every = 0
keep_last = 0
[logging]
progress = false
peak_tflops = 1.0
[eval]
max_new_tokens = 2
"#;

/// Each architecture's own settings over TINY_ARCH.
pub fn arch_settings(arch: &str) -> Vec<String> {
    let mut settings = vec![format!("model.arch={arch}")];
    if arch == "t5" {
        settings.push("model.n_decoder_layers=2".into());
    }
    settings
}

/// The value of `key` at each logged step (the last line logged for a step wins); empty before
/// metrics.jsonl exists, and a line still being written is not read.
pub fn logged_by_step(run: &Path, key: &str) -> std::collections::BTreeMap<u64, f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((v["step"].as_u64()?, v.get(key)?.as_f64()?))
        })
        .collect()
}

/// A trained tiny checkpoint (2 steps of the stories corpus, context 256) in `dir/run-<arch>`.
pub fn tiny_checkpoint(dir: &Path, arch: &str) -> String {
    let recipe = dir.join("tiny.toml");
    std::fs::write(&recipe, TINY_ARCH.replace("max_seq_len = 32", "max_seq_len = 256")).unwrap();
    let run = dir.join(format!("run-{arch}"));
    let out = furnace(&[
        "train",
        "--config",
        &recipe.display().to_string(),
        "--set",
        &format!("model.arch={arch}"),
        "--set",
        "training.steps=2",
        "--set",
        &format!("run.output_dir={}", run.display()),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    run.display().to_string()
}
