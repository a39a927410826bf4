//! Fault injection: what a hostile user, a failing disk or a scheduler does to a run, and what
//! Furnace must answer — a named error, a refusal, a fallback to a good checkpoint, a saved
//! stop — never a panic, never a destroyed file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{furnace, logged_by_step, text, TinyRun};

/// A finished tiny run with checkpoints at steps 2 and 4.
fn run_with_two_checkpoints() -> TinyRun {
    let tiny = TinyRun::new();
    let out = tiny.train(&["--max-steps", "4", "--set", "training.save_every=2"]);
    assert!(out.status.success(), "{}", text(&out));
    tiny
}

fn step(tiny: &TinyRun, n: usize) -> PathBuf {
    tiny.run.join(format!("checkpoints/step_{n}"))
}

/// Flip `count` bytes in the middle of a file, keeping its length.
fn flip_bytes(path: &Path, count: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + count] {
        *b ^= 0x5a;
    }
    std::fs::write(path, bytes).unwrap();
}

fn generate(checkpoint: &Path, extra: &[&str]) -> std::process::Output {
    let checkpoint = checkpoint.to_str().unwrap();
    furnace(
        &[&["generate", "--checkpoint", checkpoint, "--prompt", "Once", "--max-new-tokens", "4", "--temperature", "0"][..], extra].concat(),
    )
}

#[test]
fn corrupted_checkpoints_are_named_and_resume_falls_back_to_one_that_verifies() {
    let straight = TinyRun::new();
    assert!(straight.train(&["--max-steps", "6"]).status.success());
    let tiny = run_with_two_checkpoints();
    flip_bytes(&step(&tiny, 4).join("model.safetensors"), 10);

    // Named by file when asked for directly; passed over when a run folder is given.
    let out = generate(&step(&tiny, 4), &[]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("model.safetensors is corrupted"), "{}", text(&out));
    let out = generate(&tiny.run, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("passing over") && text(&out).contains("step_2"), "{}", text(&out));
    // --no-verify reads it as it is.
    assert!(generate(&step(&tiny, 4), &["--no-verify"]).status.success());

    // Resume continues from step 2 and reproduces the straight run exactly.
    let out = tiny.train(&["--resume", tiny.run.to_str().unwrap(), "--max-steps", "6"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("resumed from") && text(&out).contains("step_2 (step 2)"), "{}", text(&out));
    let (resumed, expected) = (logged_by_step(&tiny.run, "loss"), logged_by_step(&straight.run, "loss"));
    for s in 3..=6 {
        assert_eq!(resumed[&s], expected[&s], "step {s}");
    }
    // Steps 3 and 4 ran twice: metrics.jsonl keeps the resumed run's lines, and TensorBoard
    // (told of the restart) shows each step once, with the resumed values.
    let steps: Vec<u64> = logged_steps(&tiny.run);
    assert_eq!(steps, (1..=6).collect::<Vec<_>>(), "metrics.jsonl after the resume");
    let script = "import sys\n\
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
acc = EventAccumulator(sys.argv[1], purge_orphaned_data=True); acc.Reload()\n\
print(' '.join(f'{e.step}:{e.value!r}' for e in acc.Scalars('loss')))\n";
    let py = Command::new("python3").arg("-c").arg(script).arg(tiny.run.join("tb")).output().expect("python3 runs");
    assert!(py.status.success(), "tensorboard could not read the events (pip install tensorboard): {}", text(&py));
    let shown: Vec<(u64, f32)> = String::from_utf8_lossy(&py.stdout)
        .split_whitespace()
        .map(|pair| {
            let (step, value) = pair.split_once(':').unwrap();
            (step.parse().unwrap(), value.parse().unwrap())
        })
        .collect();
    let expected: Vec<(u64, f32)> = resumed.iter().map(|(s, l)| (*s, *l as f32)).collect();
    assert_eq!(shown, expected);
}

/// The step of every line of metrics.jsonl, in file order.
fn logged_steps(run: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64()).collect()
}

#[test]
fn edited_deleted_and_truncated_checkpoint_files_are_named() {
    let tiny = run_with_two_checkpoints();
    let state = step(&tiny, 4).join("train_state.json");
    let edited = std::fs::read_to_string(&state).unwrap().replace("\"step\": 4", "\"step\": 99");
    std::fs::write(&state, edited).unwrap();
    let out = generate(&step(&tiny, 4), &[]);
    assert!(text(&out).contains("train_state.json"), "{}", text(&out));

    std::fs::remove_file(step(&tiny, 2).join("model.safetensors")).unwrap();
    let out = generate(&step(&tiny, 2), &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("step_2/model.safetensors is missing"), "{}", text(&out));

    // Every checkpoint is bad now: resume refuses, naming each.
    let out = tiny.train(&["--resume", tiny.run.to_str().unwrap(), "--max-steps", "6"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("none of the 2 checkpoints"), "{}", text(&out));

    let tiny = run_with_two_checkpoints();
    let optimizer = step(&tiny, 4).join("optimizer.safetensors");
    let bytes = std::fs::read(&optimizer).unwrap();
    std::fs::write(&optimizer, &bytes[..bytes.len() - 100]).unwrap();
    let out = tiny.train(&["--resume", tiny.run.to_str().unwrap(), "--max-steps", "6"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("optimizer.safetensors has") && text(&out).contains("truncated"), "{}", text(&out));
}

#[test]
fn export_never_destroys_what_it_was_not_asked_to_replace() {
    let tiny = run_with_two_checkpoints();
    let run = tiny.run.to_str().unwrap();
    let export =
        |out: &Path, extra: &[&str]| furnace(&[&["export", "--checkpoint", run, "--out", out.to_str().unwrap()][..], extra].concat());
    let refused = |out: &Path, extra: &[&str], why: &str| {
        let result = export(out, extra);
        assert!(!result.status.success(), "{out:?} {extra:?}: {}", text(&result));
        assert!(text(&result).contains(why), "{out:?}: {}", text(&result));
    };
    // Into the checkpoint it reads, any checkpoint, or a folder holding the run.
    refused(&step(&tiny, 4), &["--force"], "would overwrite the checkpoint it exports");
    refused(&step(&tiny, 2), &["--force"], "where a run keeps its checkpoints");
    refused(&tiny.run, &["--force"], "would overwrite the checkpoint it exports");
    refused(&tiny.run.join("checkpoints/hf"), &[], "where a run keeps its checkpoints");
    assert!(generate(&step(&tiny, 4), &[]).status.success(), "the checkpoint still reads");

    // An existing folder needs --force; the replacement is whole (no stale file survives).
    let hf = tiny.dir.path().join("hf");
    assert!(export(&hf, &[]).status.success());
    std::fs::write(hf.join("stale.txt"), "old").unwrap();
    refused(&hf, &[], "exists; pass --force");
    assert!(hf.join("stale.txt").exists());
    let out = export(&hf, &["--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(hf.join("config.json").exists() && !hf.join("stale.txt").exists());

    // Links and devices are never written through; an existing GGUF needs --force.
    let link = tiny.dir.path().join("link");
    std::os::unix::fs::symlink(&hf, &link).unwrap();
    refused(&link, &["--force"], "is a symbolic link");
    refused(Path::new("/dev/null"), &["--force", "--format", "gguf"], "not a regular file or folder");
    let gguf = tiny.dir.path().join("m.gguf");
    std::fs::write(&gguf, "mine").unwrap();
    refused(&gguf, &["--format", "gguf"], "exists; pass --force");
    assert_eq!(std::fs::read_to_string(&gguf).unwrap(), "mine");
    assert!(export(&gguf, &["--format", "gguf", "--force"]).status.success());

    // Nothing staged is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(tiny.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// Start training the tiny recipe for many steps in the background; wait until it has logged
/// `steps` steps.
fn start_long_run(tiny: &TinyRun, steps: usize) -> std::process::Child {
    let child = tiny.spawn_train(&["--set", "training.steps=100000", "--set", "training.save_every=100000"]);
    let started = Instant::now();
    while logged_by_step(&tiny.run, "loss").len() < steps {
        assert!(started.elapsed() < Duration::from_secs(600), "the run never logged {steps} steps");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn signal(child: &std::process::Child, signal: libc::c_int) {
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
}

#[test]
fn sigterm_saves_a_checkpoint_at_that_step_and_the_resume_is_exact() {
    let tiny = TinyRun::new();
    let child = start_long_run(&tiny, 3);
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{stderr}");
    assert!(stderr.contains("stopped by a signal at step"), "{stderr}");
    let saved: Vec<_> = std::fs::read_dir(tiny.run.join("checkpoints")).unwrap().filter_map(|e| e.ok()).collect();
    assert_eq!(saved.len(), 1, "one checkpoint, at the stop");
    let stopped_at: usize = saved[0].file_name().to_str().unwrap().strip_prefix("step_").unwrap().parse().unwrap();
    assert_eq!(logged_by_step(&tiny.run, "loss").keys().last(), Some(&(stopped_at as u64)));

    // Resume three more steps; a straight run of the same length logs the same losses.
    let until = (stopped_at + 3).to_string();
    let steps = ["--set", "training.steps=100000", "--set", "training.save_every=100000"];
    let out = tiny.train(&[&["--resume", tiny.run.to_str().unwrap(), "--max-steps", &until][..], &steps].concat());
    assert!(out.status.success(), "{}", text(&out));
    let straight = TinyRun::new();
    let out = straight.train(&[&["--max-steps", until.as_str()][..], &steps].concat());
    assert!(out.status.success(), "{}", text(&out));
    let (resumed, expected) = (logged_by_step(&tiny.run, "loss"), logged_by_step(&straight.run, "loss"));
    for s in 1..=stopped_at as u64 + 3 {
        assert_eq!(resumed[&s], expected[&s], "step {s}");
    }
}

#[test]
fn a_second_signal_exits_at_once() {
    let tiny = TinyRun::new();
    let child = start_long_run(&tiny, 2);
    signal(&child, libc::SIGINT);
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    // 128 + the number of whichever signal the kernel delivered second; not the saved stop's 75.
    let code = out.status.code();
    assert!(code == Some(128 + libc::SIGINT) || code == Some(128 + libc::SIGTERM), "{code:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn pruning_and_saving_leftovers_never_count_as_checkpoints_and_are_cleaned() {
    let tiny = run_with_two_checkpoints();
    // What a kill during a prune or a save leaves behind.
    let pruned = tiny.run.join("checkpoints/.pruned-step_1");
    let staged = tiny.run.join("checkpoints/.tmp-step_5");
    for dir in [&pruned, &staged] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), "partial").unwrap();
    }
    let out = tiny.train(&["--resume", tiny.run.to_str().unwrap(), "--max-steps", "5"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("step_4 (step 4)"), "{}", text(&out));
    assert!(!pruned.exists() && !staged.exists());
}

#[test]
fn generate_refuses_flags_out_of_range_and_says_when_it_cuts_a_prompt() {
    let tiny = run_with_two_checkpoints();
    let rows: &[(&str, &str)] = &[
        ("--temperature", "-1"),
        ("--temperature", "NaN"),
        ("--temperature", "inf"),
        ("--top-p", "2"),
        ("--top-p", "-1"),
        ("--top-p", "NaN"),
        ("--min-p", "1.5"),
        ("--min-p", "-1"),
        ("--min-p", "NaN"),
        ("--repetition-penalty", "0"),
        ("--repetition-penalty", "-2"),
        ("--repetition-penalty", "NaN"),
        ("--repetition-penalty", "inf"),
    ];
    for (flag, value) in rows {
        let out = furnace(&["generate", "--checkpoint", tiny.run.to_str().unwrap(), "--prompt", "Once", &format!("{flag}={value}")]);
        assert!(!out.status.success(), "{flag} {value}: {}", text(&out));
        assert!(text(&out).contains(&format!("{flag} {value}")) && !text(&out).contains("panicked"), "{}", text(&out));
    }
    // The edges of each range are accepted.
    let edges = ["--min-p", "1", "--temperature", "1", "--top-p", "1", "--max-new-tokens", "4"];
    assert!(furnace(&[&["generate", "--checkpoint", tiny.run.to_str().unwrap()][..], &edges].concat()).status.success());

    let long = "Once upon a time there was a tiny cat. ".repeat(20);
    let out = furnace(&["generate", "--checkpoint", tiny.run.to_str().unwrap(), "--prompt", &long, "--max-new-tokens", "4"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("model's context is 32 (model.max_seq_len): using its last 31 tokens"), "{}", text(&out));
}

#[test]
fn a_diverging_run_stops_with_a_named_cause_in_every_precision() {
    for precision in ["fp32", "fp16-mixed"] {
        let tiny = TinyRun::new();
        let set = format!("runtime.precision={precision}");
        let out = tiny.train(&["--set", &set, "--set", "optimizer.lr=1e6", "--set", "lr_scheduler.warmup_steps=0"]);
        let log = text(&out);
        assert!(!log.contains("panicked"), "{log}");
        // Either it diverges to a stop, or its gradient vanishes, which is reported.
        assert!(
            (!out.status.success() && log.contains("the run is diverging")) || log.contains("the gradient norm is 0"),
            "{precision}: {log}"
        );
        if precision == "fp16-mixed" {
            assert!(!out.status.success(), "fp16 may not skip its way to the end: {log}");
        }
    }
}

#[test]
fn a_recipe_beyond_the_machine_is_refused_before_any_work() {
    let tiny = TinyRun::new();
    let recipe = tiny.recipe.to_str().unwrap();
    let out = furnace(&["recipe", "check", recipe]);
    assert!(out.status.success() && text(&out).contains(" MB of memory;"), "the estimate is shown: {}", text(&out));
    let out = furnace(&["recipe", "check", recipe.as_ref(), "--set", "model.d_model=16384", "--set", "model.n_layers=512"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("the memory estimate is") && text(&out).contains("model.d_model = 16384"), "{}", text(&out));
    let out = tiny.train(&["--set", "runtime.max_memory_gb=0.0001"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("more than runtime.max_memory_gb"), "{}", text(&out));
    assert!(!tiny.run.exists(), "nothing was written");
}

/// Bytes a folder's files take, each rounded up to whole 4 KiB pages (as tmpfs stores them).
fn disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| match e.file_type().unwrap().is_dir() {
            true => disk_bytes(&e.path()),
            false => e.metadata().unwrap().len().div_ceil(4096) * 4096,
        })
        .sum()
}

/// Unmounts its folder when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_save_by_name_and_keeps_the_earlier_checkpoint() {
    // Sized from a run on the ordinary disk: room for everything up to step 2's checkpoint and
    // half of step 4's.
    let reference = run_with_two_checkpoints();
    let before_step_4 = disk_bytes(&reference.run) - disk_bytes(&step(&reference, 4));
    let size = before_step_4 + disk_bytes(&step(&reference, 4)) / 2;
    let mut tiny = TinyRun::new();
    let mount = tiny.dir.path().join("small-disk");
    std::fs::create_dir(&mount).unwrap();
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&mount).output();
    if !mounted.is_ok_and(|m| m.status.success()) {
        eprintln!("skipped: mounting a small tmpfs needs root (CI runs as root)");
        return;
    }
    let _unmount = Mounted(mount.clone());
    tiny.run = mount.join("run");
    let out = tiny.train(&["--max-steps", "4", "--set", "training.save_every=2"]);
    let log = text(&out);
    assert!(!out.status.success() && !log.contains("panicked"), "{log}");
    assert!(log.contains("saving checkpoint step_4") && log.contains("earlier checkpoints are intact"), "{log}");
    assert!(log.contains("cannot write") && log.contains(".tmp-step_4/") && log.contains("No space left on device"), "{log}");
    assert!(!tiny.run.join("checkpoints/.tmp-step_4").exists(), "the partial checkpoint is removed");
    assert!(generate(&tiny.run, &[]).status.success(), "step 2 still reads");
}

#[test]
fn random_kills_while_training_and_saving_resume_to_the_straight_runs_bytes() {
    // ~2 s of steps, each followed by a save (and a prune): most kills land in one or the other.
    let steps = ["--set", "training.steps=60", "--set", "training.save_every=1", "--set", "training.keep_last=2"];
    let straight = TinyRun::new();
    let out = straight.train(&steps);
    assert!(out.status.success(), "{}", text(&out));
    let tiny = TinyRun::new();
    // Six kills, each once the run has logged a chosen step, a few (pseudo-random) milliseconds
    // later: inside the next step, the save that follows a step, or the prune after it.
    let mut state = 0x2545_f491_u64;
    let mut random = move |below: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % below
    };
    let (mut kills, mut finished) = (0, false);
    while !finished {
        let has_checkpoint = tiny
            .run
            .join("checkpoints")
            .read_dir()
            .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))));
        let mut args = steps.to_vec();
        if has_checkpoint {
            args.extend(["--resume", tiny.run.to_str().unwrap()]);
        }
        let mut child = tiny.spawn_train(&args);
        if kills < 6 {
            let target = 8 * (kills + 1) + random(6);
            let last_logged = || logged_by_step(&tiny.run, "loss").keys().next_back().copied().unwrap_or(0);
            while last_logged() < target && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(random(15)));
            if child.try_wait().unwrap().is_none() {
                child.kill().unwrap();
                kills += 1;
            }
        }
        let out = child.wait_with_output().unwrap();
        finished = out.status.success();
        assert!(finished || out.status.code().is_none(), "a run failed on its own: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(kills >= 3, "only {kills} kills landed");
    for file in ["model.safetensors", "optimizer.safetensors", "train_state.json"] {
        let read = |run: &TinyRun| std::fs::read(step(run, 60).join(file)).unwrap();
        assert!(read(&straight) == read(&tiny), "{file} after {kills} kills differs from the straight run's");
    }
}
