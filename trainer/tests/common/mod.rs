//! Helpers the end-to-end test files share: run the `furnace` binary, read what it wrote.
// Each test file uses the helpers it needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `furnace args`, run from the workspace root (so `recipes/...` resolves, as in the README).
pub fn furnace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_furnace")).args(args).current_dir(workspace()).output().expect("furnace runs")
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
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

/// A temporary folder holding the TINY recipe and a run folder for it.
pub struct TinyRun {
    pub dir: tempfile::TempDir,
    pub recipe: PathBuf,
    pub run: PathBuf,
}

impl TinyRun {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let recipe = write_recipe(dir.path(), TINY);
        let run = dir.path().join("run");
        Self { dir, recipe, run }
    }

    /// `furnace train` on the tiny recipe into the run folder, with `extra` arguments.
    pub fn train(&self, extra: &[&str]) -> Output {
        let set = format!("run.output_dir={}", self.run.display());
        furnace(&[&["train", "--config", self.recipe.to_str().unwrap(), "--set", set.as_str()][..], extra].concat())
    }
}

pub fn write_recipe(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("recipe.toml");
    std::fs::write(&path, body).unwrap();
    path
}
