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
