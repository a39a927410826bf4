//! Knowledge distillation through the `furnace` binary: a student pulled towards a frozen
//! teacher's next-token distribution (`training.teacher`, `kd_ratio`, `kd_temperature`).

use std::path::Path;

mod common;
use common::{furnace, losses, run_ok, text};

const RECIPE: &str = r#"
[run]
seed = 3
[model]
flavor = "tiny"
max_seq_len = 64
[data]
source = "stories"
num_examples = 300
num_val_examples = 20
tokenizer_vocab_size = 300
[training]
local_batch_size = 4
seq_len = 32
steps = 12
eval_every = 0
log_every = 1
save_every = 0
[optimizer]
lr = 3e-3
[logging]
progress = false
peak_tflops = 1.0
[eval]
max_new_tokens = 4
"#;

/// Every logged value of `key` in a run's metrics.jsonl.
fn logged(run: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap().get(key)?.as_f64())
        .collect()
}

fn train(dir: &Path, name: &str, sets: &[String]) -> String {
    let mut args = vec!["train".to_string(), "--config".into(), dir.join("recipe.toml").display().to_string()];
    args.extend(["--set".into(), format!("run.output_dir={}", dir.join(name).display())]);
    for set in sets {
        args.extend(["--set".into(), set.clone()]);
    }
    run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

#[test]
fn a_student_distils_from_a_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("recipe.toml"), RECIPE).unwrap();
    train(dir, "teacher", &["training.steps=40".into()]);
    let teacher = format!("training.teacher={}", dir.join("teacher").display());

    // A student that starts as the teacher is at KL 0 before its first update.
    train(dir, "same", &[teacher.clone(), "training.kd_ratio=1.0".into(), format!("model.init_from={}", dir.join("teacher").display())]);
    let kl = logged(&dir.join("same"), "distill/kl");
    assert!(kl[0].abs() < 1e-5, "the teacher's own weights are {} from it", kl[0]);

    // From a random init the KL to the teacher falls as the student learns.
    let out = train(dir, "student", &[teacher.clone(), "training.kd_ratio=1.0".into(), "training.kd_temperature=2.0".into()]);
    assert!(out.contains("distill/kl"), "the progress line shows the KL: {out}");
    let kl = logged(&dir.join("student"), "distill/kl");
    assert_eq!(kl.len(), 12);
    assert!(kl[0] > 0.1 && kl[11] < 0.8 * kl[0], "KL to the teacher {kl:?}");

    // kd_ratio = 0 is plain language modelling: the same losses as a run without a teacher.
    train(dir, "plain", &[]);
    train(dir, "ratio0", &[teacher, "training.kd_ratio=0.0".into()]);
    let (plain, ratio0) = (losses(&dir.join("plain")), losses(&dir.join("ratio0")));
    assert_eq!(plain.len(), ratio0.len());
    for (a, b) in plain.iter().zip(&ratio0) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "plain {plain:?} vs kd_ratio 0 {ratio0:?}");
    }
}

#[test]
fn a_teacher_must_exist_and_the_ratio_be_a_fraction() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(&recipe, RECIPE).unwrap();
    let out = dir.path().join("run");
    let train = |set: &str| {
        let output =
            furnace(&["train", "--config", recipe.to_str().unwrap(), "--set", set, "--set", &format!("run.output_dir={}", out.display())]);
        assert!(!output.status.success(), "{set} is refused");
        text(&output)
    };
    let missing = train("training.teacher=/nonexistent/teacher");
    assert!(missing.contains("training") && missing.contains("teacher") && missing.contains("/nonexistent/teacher"), "{missing}");
    let ratio = train("training.kd_ratio=1.5");
    assert!(ratio.contains("kd_ratio"), "{ratio}");
}

#[test]
fn packed_rows_need_a_transformer_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(dir.join("recipe.toml"), RECIPE).unwrap();
    train(dir, "base", &[]);
    let tokenizer = format!("data.tokenizer={}", dir.join("base/tokenizer.json").display());
    train(dir, "mamba", &["model.arch=\"mamba\"".into(), tokenizer.clone()]);
    let chat: String = (0..40)
        .map(|i| format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"Say {i}.\"}}, {{\"role\": \"assistant\", \"content\": \"{i}\"}}]}}\n"))
        .collect();
    std::fs::write(dir.join("chat.jsonl"), chat).unwrap();
    let sets = [
        "training.mode=\"sft\"".to_string(),
        "data.source=\"chat\"".into(),
        format!("data.files=[\"{}\"]", dir.join("chat.jsonl").display()),
        "data.packing=true".into(),
        "data.val_fraction=0.2".into(),
        "training.seq_len=48".into(),
        format!("model.init_from={}", dir.join("base").display()),
        format!("training.teacher={}", dir.join("mamba").display()),
    ];
    let mut args = vec!["train".to_string(), "--config".into(), dir.join("recipe.toml").display().to_string()];
    args.extend(["--set".into(), format!("run.output_dir={}", dir.join("student").display())]);
    for set in &sets {
        args.extend(["--set".into(), set.clone()]);
    }
    let out = furnace(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success() && text(&out).contains("a mamba teacher has not"), "{}", text(&out));
}
