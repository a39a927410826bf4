//! Post-training through the `furnace` binary. SFT: conversations from the user's JSONL files
//! rendered by their chat template, malformed lines reported or skipped, exact resume, the
//! built-in arithmetic chat task with its held-out exact match. DPO: preference pairs against
//! the starting model as reference, TRL's metrics, exact resume.

use std::path::PathBuf;
use std::process::Output;

mod common;
use common::{furnace, losses, run_ok, text};

const BASE: &str = r#"
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
steps = 3
eval_every = 0
log_every = 1
save_every = 0
[logging]
progress = false
peak_tflops = 1.0
[eval]
max_new_tokens = 4
"#;

const SFT: &str = r#"
[run]
seed = 5
[model]
init_from = "BASE"
[data]
source = "chat"
files = ["CHAT"]
val_fraction = 0.1
chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
[training]
mode = "sft"
local_batch_size = 4
seq_len = 48
steps = 6
eval_every = 0
log_every = 1
save_every = 0
keep_last = 0
[optimizer]
lr = 3e-3
[lr_scheduler]
warmup_steps = 1
[logging]
progress = false
peak_tflops = 1.0
[eval]
max_new_tokens = 4
"#;

struct Setup {
    dir: tempfile::TempDir,
    recipe: PathBuf,
}

/// A trained base, a chat file with one malformed line, and an SFT recipe over both.
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    std::fs::write(dir.path().join("base.toml"), BASE).unwrap();
    run_ok(&["train", "--config", dir.path().join("base.toml").to_str().unwrap(), "--set", &format!("run.output_dir={}", base.display())]);
    let words = ["fox", "owl", "kite", "shell", "apple", "river"];
    let mut lines: Vec<String> = (0..60)
        .map(|i| {
            let w = words[i % words.len()];
            format!(r#"{{"messages": [{{"role": "system", "content": "Be brief."}}, {{"role": "user", "content": "Say {w}."}}, {{"role": "assistant", "content": "{w}"}}]}}"#)
        })
        .collect();
    lines.insert(7, r#"{"messages": "not a list"}"#.into());
    let chat = dir.path().join("chat.jsonl");
    std::fs::write(&chat, lines.join("\n")).unwrap();
    let recipe = dir.path().join("sft.toml");
    std::fs::write(&recipe, SFT.replace("BASE", base.to_str().unwrap()).replace("CHAT", chat.to_str().unwrap())).unwrap();
    Setup { dir, recipe }
}

impl Setup {
    fn train(&self, name: &str, extra: &[&str]) -> Output {
        let set = format!("run.output_dir={}", self.dir.path().join(name).display());
        furnace(&[&["train", "--config", self.recipe.to_str().unwrap(), "--set", &set][..], extra].concat())
    }
}

#[test]
fn sft_reports_bad_lines_and_resumes_exactly() {
    let s = setup();
    let refused = s.train("refused", &[]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("chat.jsonl:8") && text(&refused).contains("skip_bad_lines"), "{}", text(&refused));

    let skip = ["--set", "data.skip_bad_lines=true"];
    let straight = s.train("straight", &skip);
    assert!(straight.status.success(), "{}", text(&straight));
    assert!(text(&straight).contains("1 malformed lines skipped"), "{}", text(&straight));
    assert!(s.train("split", &[&skip[..], &["--max-steps", "3"]].concat()).status.success());
    let split = s.dir.path().join("split");
    let resumed = s.train("split", &[&skip[..], &["--resume", split.to_str().unwrap()]].concat());
    assert!(resumed.status.success(), "{}", text(&resumed));
    let (a, b) = (losses(&s.dir.path().join("straight")), losses(&split));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "a resumed SFT run repeats the straight one");
    assert!(a[5] < a[0], "the assistant tokens get learned: {a:?}");
}

#[test]
fn arithmetic_chat_reports_exact_match_through_the_template() {
    let s = setup();
    let out = s.train(
        "arith",
        &[
            "--set",
            "data.source=\"arithmetic-chat\"",
            "--set",
            "data.num_examples=200",
            "--set",
            "eval.arithmetic_problems=4",
            "--set",
            "lora.r=4",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("exact match on 4 held-out problems") && log.contains("What is "), "{log}");
    assert!(log.contains("trainable params"), "{log}");
    let run = s.dir.path().join("arith");
    let reply = run_ok(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is 2+3?",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
    ]);
    assert!(!reply.contains("What is") && !reply.contains("<assistant>"), "the reply alone: {reply:?}");
}

/// The tool-use task trains through the default template (tools listed, calls in `<tool_call>`
/// tags) on a context longer than the base's (RoPE positions are computed) and ends with the
/// tool loop on held-out problems; a base with learned positions refuses a new context.
#[test]
fn arithmetic_tools_trains_on_a_longer_context_and_reports_the_tool_loop() {
    let s = setup();
    let tools = [
        "--set",
        "data.source=\"arithmetic-tools\"",
        "--set",
        "data.chat_template=\"\"",
        "--set",
        "data.num_examples=100",
        "--set",
        "eval.arithmetic_problems=3",
        "--set",
        "eval.max_new_tokens=96",
        "--set",
        "training.seq_len=200",
    ];
    let short = s.train("short", &tools);
    assert!(!short.status.success() && text(&short).contains("seq_len"), "the base's 64 positions are too few: {}", text(&short));
    let out = s.train("tools", &[&tools[..], &["--set", "model.max_seq_len=256"]].concat());
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("tool use on 3 held-out problems") && log.contains("calls well-formed with the right arguments"), "{log}");
    assert!(!log.contains("sample (greedy)"), "the tool loop's lines are the samples: {log}");

    let gpt2 = s.dir.path().join("gpt2-base");
    std::fs::write(s.dir.path().join("gpt2.toml"), BASE).unwrap();
    let config = s.dir.path().join("gpt2.toml");
    run_ok(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "model.arch=\"gpt2\"",
        "--set",
        &format!("run.output_dir={}", gpt2.display()),
    ]);
    let init = format!("model.init_from=\"{}\"", gpt2.display());
    let refused = s.train("gpt2-long", &[&tools[..], &["--set", &init, "--set", "model.max_seq_len=256"]].concat());
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("learned table of 64 positions"), "{}", text(&refused));
}

#[test]
fn sft_needs_chat_data_and_a_base() {
    let s = setup();
    let wrong = s.train("wrong", &["--set", "data.source=\"stories\""]);
    assert!(!wrong.status.success() && text(&wrong).contains("training.mode"), "{}", text(&wrong));
    let no_base = s.train("nobase", &["--set", "model.init_from=\"\""]);
    assert!(!no_base.status.success() && text(&no_base).contains("model.init_from"), "{}", text(&no_base));
}

const PAIRS_TAIL: &str = r#"
[dpo]
beta = 0.2
"#;

/// The SFT recipe turned into DPO on a preference file (one malformed line).
fn dpo_setup() -> Setup {
    let s = setup();
    let words = ["fox", "owl", "kite", "shell", "apple", "river"];
    let mut lines: Vec<String> = (0..40)
        .map(|i| {
            let (w, other) = (words[i % words.len()], words[(i + 1) % words.len()]);
            format!(r#"{{"prompt": "Say {w}.", "chosen": "{w}", "rejected": "{other}"}}"#)
        })
        .collect();
    lines.insert(3, r#"{"prompt": "no replies"}"#.into());
    let pairs = s.dir.path().join("pairs.jsonl");
    std::fs::write(&pairs, lines.join("\n")).unwrap();
    let recipe = std::fs::read_to_string(&s.recipe).unwrap();
    let chat = s.dir.path().join("chat.jsonl");
    let recipe = recipe
        .replace("source = \"chat\"", "source = \"preferences\"")
        .replace(chat.to_str().unwrap(), pairs.to_str().unwrap())
        .replace("mode = \"sft\"", "mode = \"dpo\"")
        + PAIRS_TAIL;
    std::fs::write(&s.recipe, recipe).unwrap();
    s
}

#[test]
fn dpo_logs_trl_metrics_and_resumes_exactly() {
    let s = dpo_setup();
    let refused = s.train("refused", &[]);
    assert!(!refused.status.success() && text(&refused).contains("pairs.jsonl:4"), "{}", text(&refused));
    let skip = ["--set", "data.skip_bad_lines=true", "--set", "training.eval_every=3"];
    let straight = s.train("straight", &skip);
    assert!(straight.status.success(), "{}", text(&straight));
    let log = text(&straight);
    assert!(
        log.contains("reference log-probabilities of 36 + 4 pairs")
            && log.contains("held-out preference pairs: chosen scored above rejected"),
        "{log}"
    );
    assert!(s.train("split", &[&skip[..], &["--max-steps", "3"]].concat()).status.success());
    let split = s.dir.path().join("split");
    assert!(s.train("split", &[&skip[..], &["--resume", split.to_str().unwrap()]].concat()).status.success());
    let (a, b) = (losses(&s.dir.path().join("straight")), losses(&split));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "a resumed DPO run recomputes the same reference and repeats the straight one");
    assert!((a[0] - std::f64::consts::LN_2).abs() < 1e-4, "step 1: policy = reference, loss ln 2: {}", a[0]);
    // The reference run on each batch instead of precomputed: the same losses.
    let on_the_fly = s.train("on_the_fly", &[&skip[..], &["--set", "dpo.precompute_ref_log_probs=false"]].concat());
    assert!(on_the_fly.status.success() && !text(&on_the_fly).contains("reference log-probabilities of"), "{}", text(&on_the_fly));
    let b = losses(&s.dir.path().join("on_the_fly"));
    assert_eq!(a.len(), b.len());
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x - y).abs() < 1e-5, "step {}: precomputed reference {x} vs on the fly {y}", step + 1);
    }
    let metrics = std::fs::read_to_string(s.dir.path().join("straight/metrics.jsonl")).unwrap();
    for name in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "eval/rewards/accuracies",
    ] {
        assert!(metrics.contains(&format!("\"{name}\"")), "metrics.jsonl lacks {name}");
    }
}

#[test]
fn arithmetic_preferences_report_accuracy_and_exact_match() {
    let s = dpo_setup();
    let out = s.train(
        "arith",
        &[
            "--set",
            "data.source=\"arithmetic-preferences\"",
            "--set",
            "data.num_examples=100",
            "--set",
            "eval.arithmetic_problems=4",
            "--set",
            "dpo.loss_type=\"ipo\"",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(log.contains("held-out preference pairs") && log.contains("exact match on 4 held-out problems"), "{log}");
}

#[test]
fn a_reward_model_learns_to_score_the_chosen_reply_higher() {
    // Separable pairs: whatever the question, "yes" is chosen over "no".
    let s = dpo_setup();
    let lines: Vec<String> = (0..40).map(|i| format!(r#"{{"prompt": "Question {i}?", "chosen": "yes", "rejected": "no"}}"#)).collect();
    std::fs::write(s.dir.path().join("pairs.jsonl"), lines.join("\n")).unwrap();
    let args = ["--set", "training.mode=\"reward\"", "--set", "training.steps=30", "--set", "optimizer.lr=3e-3"];
    let out = s.train("reward", &args);
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    let accuracy: f64 = log
        .split("chosen scored above rejected in ")
        .nth(1)
        .and_then(|rest| rest.split('%').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy line: {log}"));
    assert_eq!(accuracy, 100.0, "held-out pairwise accuracy: {log}");
    let metrics = std::fs::read_to_string(s.dir.path().join("reward/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"rewards/accuracies\"") && !metrics.contains("logps/chosen"));
    let losses = losses(&s.dir.path().join("reward"));
    assert!(losses[losses.len() - 1] < 0.5 * losses[0], "the Bradley-Terry loss falls: {losses:?}");
    // A window too short to reach any reply makes every pair the same row twice: refused.
    let blind = s.train("blind", &[&args[..], &["--set", "training.seq_len=6"]].concat());
    assert!(
        !blind.status.success() && text(&blind).contains("training.seq_len = 6: 40 of 40 preference pairs are cut"),
        "{}",
        text(&blind)
    );
}

/// GRPO's and PPO's task: the built-in arithmetic questions, a few held-out ones at the end.
const RL_TASK: [&str; 6] =
    ["--set", "data.source=\"arithmetic-chat\"", "--set", "data.num_examples=200", "--set", "eval.arithmetic_problems=4"];

#[test]
fn grpo_samples_scores_and_resumes_exactly() {
    let s = setup();
    let grpo = [
        &RL_TASK[..],
        &[
            "--set",
            "training.mode=\"grpo\"",
            "--set",
            "grpo.num_generations=4",
            "--set",
            "grpo.max_completion_length=6",
            "--set",
            "training.local_batch_size=2",
            "--set",
            "training.grad_accum_steps=2",
            "--set",
            "training.steps=4",
        ][..],
    ]
    .concat();
    let straight = s.train("straight", &grpo);
    assert!(straight.status.success(), "{}", text(&straight));
    let log = text(&straight);
    assert!(log.contains("held-out problems (never seen in training) before GRPO") && log.contains("| reward "), "{log}");
    let metrics = std::fs::read_to_string(s.dir.path().join("straight/metrics.jsonl")).unwrap();
    for key in ["\"reward\"", "\"reward_std\"", "\"kl\"", "\"completions/mean_length\"", "\"eval/exact_match\""] {
        assert!(metrics.contains(key), "{key} in {metrics}");
    }
    assert!(s.train("split", &[&grpo[..], &["--max-steps", "2"]].concat()).status.success());
    let split = s.dir.path().join("split");
    let resumed = s.train("split", &[&grpo[..], &["--resume", split.to_str().unwrap()]].concat());
    assert!(resumed.status.success(), "{}", text(&resumed));
    let (a, b) = (losses(&s.dir.path().join("straight")), losses(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "a resumed GRPO run samples and trains as the straight one");
    // Prompts from the user's chat file: each conversation up to its last assistant turn, which
    // the verifier compares replies with; without that turn only a reward model can score.
    let chat_source = ["--set", "data.source=\"chat\"", "--set", "data.skip_bad_lines=true", "--max-steps", "2"];
    let chat = s.train("chat", &[&grpo[..], &chat_source[..]].concat());
    assert!(chat.status.success() && text(&chat).contains("| reward "), "{}", text(&chat));
    let questions = s.dir.path().join("questions.jsonl");
    std::fs::write(&questions, "{\"messages\": [{\"role\": \"user\", \"content\": \"Say fox.\"}]}\n".repeat(20)).unwrap();
    let files = format!("data.files=[\"{}\"]", questions.display());
    let unanswered = s.train("unanswered", &[&grpo[..], &chat_source[..], &["--set", &files]].concat());
    assert!(!unanswered.status.success() && text(&unanswered).contains("end without an assistant turn"), "{}", text(&unanswered));

    // Rewards from a reward model trained from the same base instead of the verifier.
    let reward = [
        "--set",
        "training.mode=\"reward\"",
        "--set",
        "data.source=\"arithmetic-preferences\"",
        "--set",
        "data.num_examples=100",
        "--set",
        "training.steps=2",
    ];
    assert!(s.train("rm", &reward).status.success());
    let rm = format!("training.reward_model={}", s.dir.path().join("rm").display());
    let scored = s.train("scored", &[&grpo[..], &["--max-steps", "2", "--set", &rm]].concat());
    assert!(scored.status.success(), "{}", text(&scored));
    let metrics = std::fs::read_to_string(s.dir.path().join("scored/metrics.jsonl")).unwrap();
    let rewards: Vec<f64> =
        metrics.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["reward"].as_f64()).collect();
    assert!(rewards.iter().all(|r| r.fract() != 0.0), "reward-model scores, not 0/1: {rewards:?}");
    let not_rm = format!("training.reward_model={}", s.dir.path().join("straight").display());
    let refused = s.train("refused", &[&grpo[..], &["--set", &not_rm]].concat());
    assert!(!refused.status.success() && text(&refused).contains("no score head"), "{}", text(&refused));
}

#[test]
fn ppo_trains_with_a_value_head_resumes_exactly_and_exports_the_policy() {
    let s = setup();
    let ppo = [
        &RL_TASK[..],
        &[
            "--set",
            "training.mode=\"ppo\"",
            "--set",
            "ppo.max_completion_length=6",
            "--set",
            "ppo.num_ppo_epochs=2",
            "--set",
            "training.local_batch_size=4",
            "--set",
            "training.steps=4",
        ][..],
    ]
    .concat();
    let straight = s.train("straight", &ppo);
    assert!(straight.status.success(), "{}", text(&straight));
    assert!(text(&straight).contains("before PPO"), "{}", text(&straight));
    let metrics = std::fs::read_to_string(s.dir.path().join("straight/metrics.jsonl")).unwrap();
    for key in ["\"reward\"", "\"kl\"", "\"loss/policy_avg\"", "\"loss/value_avg\"", "\"policy/clipfrac_avg\""] {
        assert!(metrics.contains(key), "{key} in {metrics}");
    }
    assert!(s.train("split", &[&ppo[..], &["--max-steps", "2"]].concat()).status.success());
    let split = s.dir.path().join("split");
    let resumed = s.train("split", &[&ppo[..], &["--resume", split.to_str().unwrap()]].concat());
    assert!(resumed.status.success(), "{}", text(&resumed));
    let (a, b) = (losses(&s.dir.path().join("straight")), losses(&split));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b, "a resumed PPO run samples and trains as the straight one");
    // The value head trains the policy but is not exported with it.
    let hf = s.dir.path().join("hf");
    let run = s.dir.path().join("straight");
    run_ok(&["export", "--checkpoint", run.to_str().unwrap(), "--format", "safetensors", "--out", hf.to_str().unwrap()]);
    let tensors = furnace_core::params::from_safetensors(&std::fs::read(hf.join("model.safetensors")).unwrap()).unwrap();
    assert!(!tensors.keys().any(|k| k.contains("score")), "{:?}", tensors.keys().collect::<Vec<_>>());
}

#[test]
fn sft_packing_trains_and_resumes_exactly() {
    let s = setup();
    let packed = ["--set", "data.skip_bad_lines=true", "--set", "data.packing=true"];
    let straight = s.train("straight", &packed);
    assert!(straight.status.success(), "{}", text(&straight));
    assert!(s.train("split", &[&packed[..], &["--max-steps", "3"]].concat()).status.success());
    let split = s.dir.path().join("split");
    assert!(s.train("split", &[&packed[..], &["--resume", split.to_str().unwrap()]].concat()).status.success());
    let (a, b) = (losses(&s.dir.path().join("straight")), losses(&split));
    assert_eq!(a.len(), 6);
    assert_eq!(a, b, "a resumed packed SFT run repeats the straight one");
    assert!(a[5] < a[0], "the assistant tokens get learned: {a:?}");
    let pretrain =
        s.train("pretrain", &[&packed[..], &["--set", "training.mode=\"pretrain\"", "--set", "data.source=\"stories\""]].concat());
    assert!(!pretrain.status.success() && text(&pretrain).contains("data.packing"), "{}", text(&pretrain));
}
