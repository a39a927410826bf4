//! Multi-process training under OpenMPI's `mpirun`: data parallel, ZeRO-1/2 and FSDP equal one
//! process with the global batch, over TCP as between nodes; checkpoints reshard to another
//! world size; mismatched recipes and a lost rank stop every rank with a clear message.
#![cfg(feature = "mpi")]

#[allow(dead_code)]
mod common;
use common::{logged_by_step, text};

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const FURNACE: &str = env!("CARGO_BIN_EXE_furnace");

/// A small, fast recipe; `local_batch_size` is set per run.
const TINY: &str = r#"
[run]
seed = 11
[model]
flavor = "tiny"
n_kv_heads = 2
max_seq_len = 32
[data]
source = "stories"
num_examples = 400
num_val_examples = 20
tokenizer_vocab_size = 300
[training]
seq_len = 32
grad_accum_steps = 2
steps = 6
eval_every = 0
log_every = 1
save_every = 0
keep_last = 0
[lr_scheduler]
warmup_steps = 2
[logging]
progress = false
peak_tflops = 1.0
[eval]
max_new_tokens = 4
"#;

/// `furnace train` on `ranks` processes (1: no mpirun). Byte transfer goes over TCP (`btl
/// tcp,self`), the path ranks on different nodes take, not shared memory.
fn train(ranks: usize, recipe: &Path, run: &Path, extra: &[&str]) -> Output {
    let set = format!("run.output_dir={}", run.display());
    let args = [&["train", "--config", recipe.to_str().unwrap(), "--set", set.as_str()][..], extra].concat();
    if ranks == 1 {
        return Command::new(FURNACE).args(&args).output().expect("furnace runs");
    }
    mpirun(ranks).arg(FURNACE).args(&args).output().expect("mpirun runs")
}

fn mpirun(ranks: usize) -> Command {
    let mut command = Command::new("mpirun");
    // Root in CI containers; more ranks than the CI machine's 2 cores.
    command.args(["--allow-run-as-root", "--oversubscribe", "--mca", "btl", "tcp,self", "-np", &ranks.to_string()]);
    command.args(session_dir());
    command
}

/// Each job its own OpenMPI session directory: the tests' jobs run at once, and in one shared
/// /tmp/ompi.<host>.<uid> one job's set-up and another's clean-up can race ("mkdir ... File exists").
fn session_dir() -> [String; 3] {
    static JOBS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let job = JOBS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("furnace-ompi-{}-{job}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    ["--mca".into(), "orte_tmpdir_base".into(), dir.display().to_string()]
}

fn recipe(dir: &Path) -> PathBuf {
    let path = dir.join("recipe.toml");
    std::fs::write(&path, TINY).unwrap();
    path
}

/// A logged value of every step that logged it.
fn logged(run: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v.get(key)?.as_f64()?))
        })
        .collect()
}

fn assert_same_losses(expected: &Path, actual: &Path, what: &str) {
    assert_close_losses(expected, actual, 1e-5, what);
}

fn assert_close_losses(expected: &Path, actual: &Path, tolerance: f64, what: &str) {
    let (a, b) = (logged(expected, "loss"), logged(actual, "loss"));
    assert!(!a.is_empty() && a.len() == b.len(), "{what}: {a:?} vs {b:?}");
    for ((step, x), (step_b, y)) in a.iter().zip(&b) {
        assert_eq!(step, step_b);
        assert!((x - y).abs() <= tolerance, "{what} step {step}: one process {x} vs {y}");
    }
}

/// W ranks with local batch b give the loss of one process with batch W·b at every step,
/// for every strategy; ZeRO and FSDP ranks hold 1/W of the optimizer state, and FSDP ranks
/// 1/W of the parameters between steps.
fn check_equivalence(ranks: usize, strategies: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let single = dir.path().join("single");
    let global_batch = format!("training.local_batch_size={}", 2 * ranks);
    let out = train(1, &recipe, &single, &["--set", &global_batch]);
    assert!(out.status.success(), "{}", text(&out));
    let single_state = logged(&single, "optimizer_state_mb")[0].1;
    let single_params = logged(&single, "parameter_mb")[0].1;
    for strategy in strategies {
        let run = dir.path().join(strategy);
        let strategy_key = format!("distributed.strategy={strategy}");
        // Buckets of 10 kB: the embedding table (19,200 floats) is reduced on its own, the
        // smaller gradients through several buckets.
        let small_buckets = ["--set", "distributed.bucket_mb=0.01"];
        let out =
            train(ranks, &recipe, &run, &[&["--set", "training.local_batch_size=2", "--set", &strategy_key][..], &small_buckets].concat());
        assert!(out.status.success(), "{strategy}: {}", text(&out));
        let printed = text(&out);
        assert!(printed.contains(&format!("rank 0 of {ranks} ({strategy})")), "{printed}");
        assert_eq!(printed.matches("step      6/6").count(), 1, "only rank 0 prints: {printed}");
        assert_same_losses(&single, &run, &format!("{ranks} ranks {strategy}"));
        let (state, params) = (logged(&run, "optimizer_state_mb")[0].1, logged(&run, "parameter_mb")[0].1);
        // Whole parameters per rank: at most one embedding table (300 × 64 floats) off an
        // even split.
        let largest_mb = (300 * 64 * 4) as f64 / 1e6;
        if *strategy == "ddp" {
            assert_eq!(state, single_state);
        } else {
            let (expected, slack) = (single_state / ranks as f64, 2.0 * largest_mb);
            assert!((state - expected).abs() <= slack, "{strategy}: {state} MB vs {single_state} MB / {ranks}");
            assert!(state < single_state);
        }
        if *strategy == "fsdp" {
            let expected = single_params / ranks as f64;
            assert!((params - expected).abs() <= largest_mb, "fsdp parameters: {params} MB vs {single_params} MB / {ranks}");
        } else {
            assert_eq!(params, single_params, "{strategy} holds every parameter");
        }
    }
}

#[test]
fn two_ranks_over_tcp_equal_one_process_for_ddp_zero1_zero2_and_fsdp() {
    check_equivalence(2, &["ddp", "zero1", "zero2", "fsdp"]);
}

/// Under activation checkpointing each part's gradients start their (nonblocking) reduction as
/// the part's backward ends, joined by the earlier micro-batch's (grad_accum_steps = 2): the
/// losses equal one process's for every strategy that reduces so. GPT-2's tied embedding gets
/// gradients from two parts (the head and the input), whose sums add.
#[test]
fn reductions_overlapping_backward_equal_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let cases =
        [("llama", &[("ddp", "full"), ("ddp", "selective"), ("zero1", "full"), ("zero2", "full")][..]), ("gpt2", &[("ddp", "full")])];
    for (arch, runs) in cases {
        let single = dir.path().join(format!("single-{arch}"));
        let arch_key = format!("model.arch={arch}");
        let out = train(1, &recipe, &single, &["--set", "training.local_batch_size=4", "--set", &arch_key]);
        assert!(out.status.success(), "{}", text(&out));
        for (strategy, mode) in runs {
            let run = dir.path().join(format!("{arch}-{strategy}-{mode}"));
            let (strategy_key, mode_key) = (format!("distributed.strategy={strategy}"), format!("activation_checkpoint.mode={mode}"));
            let args = [
                "--set",
                "training.local_batch_size=2",
                "--set",
                &arch_key,
                "--set",
                &strategy_key,
                "--set",
                &mode_key,
                "--set",
                "distributed.bucket_mb=0.01",
            ];
            let out = train(2, &recipe, &run, &args);
            assert!(out.status.success(), "{arch} {strategy} {mode}: {}", text(&out));
            assert_same_losses(&single, &run, &format!("{arch} {strategy} {mode}"));
        }
    }
}

/// bf16-true under ZeRO-2 and FSDP: parameters keep their dtype through the broadcasts and
/// gathers (FSDP ranks hold half of the single process's bf16 bytes), and the losses follow one
/// process. Not to 1e-5: the gradients sum in another order, and a sum that differs in its last
/// f32 bit can round a weight to the neighbouring bf16 value (1/256 apart), which moves this
/// loss by about 1e-5 per flipped weight; measured differences are up to 3e-5.
#[test]
fn bf16_true_under_zero2_and_fsdp_follows_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let (single, bf16) = (dir.path().join("single"), ["--set", "runtime.precision=bf16-true"]);
    let out = train(1, &recipe, &single, &[&["--set", "training.local_batch_size=4"][..], &bf16].concat());
    assert!(out.status.success(), "{}", text(&out));
    let single_params = logged(&single, "parameter_mb")[0].1;
    for strategy in ["zero2", "fsdp"] {
        let run = dir.path().join(strategy);
        let strategy_key = format!("distributed.strategy={strategy}");
        let out = train(2, &recipe, &run, &[&["--set", "training.local_batch_size=2", "--set", &strategy_key][..], &bf16].concat());
        assert!(out.status.success(), "{strategy}: {}", text(&out));
        assert_close_losses(&single, &run, 1e-4, &format!("bf16-true {strategy}"));
        let params = logged(&run, "parameter_mb")[0].1;
        let expected = if strategy == "fsdp" { single_params / 2.0 } else { single_params };
        // Whole parameters per rank: at most one bf16 embedding table (300 × 64) off.
        assert!((params - expected).abs() <= (300 * 64 * 2) as f64 / 1e6, "{strategy}: {params} MB vs {expected} MB");
    }
}

#[test]
fn four_ranks_equal_one_process() {
    check_equivalence(4, &["ddp", "zero2", "fsdp"]);
}

/// A ZeRO or FSDP checkpoint written by 2 ranks (one optimizer shard each) resumes on 1
/// process, and a 1-process checkpoint on 2 ranks, continuing exactly as the straight run.
#[test]
fn checkpoints_reshard_to_another_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let straight = dir.path().join("straight");
    let out = train(1, &recipe, &straight, &["--set", "training.local_batch_size=4"]);
    assert!(out.status.success(), "{}", text(&out));
    for (first, second, strategy) in [(2, 1, "zero2"), (1, 2, "zero2"), (2, 1, "fsdp"), (1, 2, "fsdp")] {
        let name = &format!("{strategy}_{first}_then_{second}");
        let run = dir.path().join(name);
        let batch = |ranks: usize| format!("training.local_batch_size={}", 4 / ranks);
        let strategy_key = format!("distributed.strategy={strategy}");
        let zero = ["--set", strategy_key.as_str()];
        let out = train(first, &recipe, &run, &[&["--set", &batch(first), "--max-steps", "3"][..], &zero].concat());
        assert!(out.status.success(), "{name}: {}", text(&out));
        let shards = std::fs::read_dir(run.join("checkpoints/step_3"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("optimizer-"));
        assert_eq!(shards.count(), if first == 2 { 2 } else { 0 }, "{name}: one optimizer shard per ZeRO rank");
        let resume = run.to_str().unwrap();
        let out = train(second, &recipe, &run, &[&["--set", &batch(second), "--resume", resume][..], &zero].concat());
        assert!(out.status.success(), "{name}: {}", text(&out));
        assert_same_losses(&straight, &run, name);
    }
}

#[test]
fn ranks_given_different_recipes_stop_with_the_rank_named() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let run = dir.path().join("run");
    let set = format!("run.output_dir={}", run.display());
    let common = ["train", "--config", recipe.to_str().unwrap(), "--set", set.as_str()];
    let out = mpirun(1)
        .arg(FURNACE)
        .args(common)
        .args([":", "-np", "1", FURNACE])
        .args(common)
        .args(["--set", "optimizer.lr=1e-2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let printed = text(&out);
    assert!(printed.contains("rank(s) [1] of 2 were given a different recipe than rank 0"), "{printed}");
    assert!(!run.join("checkpoints").exists());
}

/// The pids of the processes whose environment says they are rank `rank` of a run writing
/// to `run`.
fn rank_pids(run: &Path, rank: usize) -> Vec<u32> {
    let wanted_rank = format!("OMPI_COMM_WORLD_RANK={rank}");
    let wanted_run = run.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let read = |f: &str| std::fs::read(format!("/proc/{pid}/{f}")).map(|b| String::from_utf8_lossy(&b).into_owned());
            let (Ok(environ), Ok(cmdline)) = (read("environ"), read("cmdline")) else { return false };
            environ.split('\0').any(|v| v == wanted_rank) && cmdline.contains(&wanted_run) && cmdline.contains("train")
        })
        .collect()
}

/// Kill rank 1 after the first checkpoint: mpirun stops every rank within a minute, names the
/// lost rank, and the checkpoint written before resumes.
#[test]
fn a_lost_rank_stops_the_job_and_the_last_checkpoint_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let run = dir.path().join("run");
    let mut job = start_long_job(&recipe, &run, "training.save_every=2");
    let started = Instant::now();
    while !run.join("checkpoints/step_2").exists() {
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint within 2 minutes");
        std::thread::sleep(Duration::from_millis(100));
    }
    let victims = rank_pids(&run, 1);
    assert_eq!(victims.len(), 1, "rank 1's process");
    Command::new("kill").args(["-9", &victims[0].to_string()]).status().unwrap();
    let killed = Instant::now();
    while job.try_wait().unwrap().is_none() {
        assert!(killed.elapsed() < Duration::from_secs(60), "mpirun still running 60 s after rank 1 died");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = job.wait_with_output().unwrap();
    assert!(!out.status.success());
    let printed = text(&out);
    assert!(printed.contains("rank 1"), "the lost rank is named: {printed}");
    assert!(rank_pids(&run, 0).is_empty(), "rank 0 exited too");
    let newest = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step_")?.parse::<usize>().ok())
        .max()
        .unwrap();
    let (resume, until) = (run.to_str().unwrap(), (newest + 1).to_string());
    let out = train(
        1,
        &recipe,
        &run,
        &["--set", "training.local_batch_size=4", "--set", "training.steps=100000", "--resume", resume, "--max-steps", &until],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("resumed from {}", run.join(format!("checkpoints/step_{newest}")).display())), "{}", text(&out));
}

#[test]
fn the_ddp_recipe_runs_on_two_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../recipes/ddp.toml");
    let run = dir.path().join("run");
    let small = ["--set", "data.num_examples=3000", "--set", "eval.arithmetic_problems=5", "--max-steps", "2"];
    let out = train(2, &recipe, &run, &small);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rank 0 of 2 (ddp)") && text(&out).contains("| 2048 tokens/step |"), "{}", text(&out));
    assert!(run.join("checkpoints/step_2/model.safetensors").is_file());
}

/// `furnace bench allreduce` reduces the model's gradients over 2 ranks both ways and reports
/// their times and ratio from rank 0 only.
#[test]
fn all_reduce_benchmark_runs_under_mpirun() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        mpirun(2).args([FURNACE, "bench", "allreduce", "--config", recipe(dir.path()).to_str().unwrap(), "--iters", "2"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("gradient all-reduce over 2 ranks"), "{stdout}");
    assert_eq!(stdout.matches("training path throughput / raw").count(), 1, "rank 0 reports: {stdout}");
}

/// Two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2): two nodes on one
/// machine, removed when dropped.
struct TwoNodes {
    namespaces: [String; 2],
    hostfile: PathBuf,
    agent: PathBuf,
}

const NODE_ADDRESSES: [&str; 2] = ["10.77.0.1", "10.77.0.2"];

impl TwoNodes {
    fn create(dir: &Path) -> Result<Self, String> {
        let id = std::process::id();
        let namespaces = [format!("furnace-{id}-a"), format!("furnace-{id}-b")];
        let veths = [format!("fv{id}a"), format!("fv{id}b")];
        let nodes = Self { namespaces: namespaces.clone(), hostfile: dir.join("hosts"), agent: dir.join("agent.sh") };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("ip {}: {}", args.join(" "), text(&out)))
            }
        };
        for ns in &namespaces {
            ip(&["netns", "add", ns])?;
        }
        ip(&["link", "add", &veths[0], "type", "veth", "peer", "name", &veths[1]])?;
        for ((ns, veth), address) in namespaces.iter().zip(&veths).zip(NODE_ADDRESSES) {
            ip(&["link", "set", veth, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{address}/24"), "dev", veth])?;
            ip(&["-n", ns, "link", "set", veth, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        let hosts: String = NODE_ADDRESSES.iter().map(|a| format!("{a} slots=1\n")).collect();
        std::fs::write(&nodes.hostfile, hosts).unwrap();
        // What ssh does for a real second node: run the daemon's command on "that host", here
        // inside the namespace that holds its address.
        let agent = format!(
            "#!/bin/sh\nhost=\"$1\"; shift\ncase \"$host\" in {}) ns={};; {}) ns={};; *) echo \"unknown host $host\" >&2; exit 1;; esac\nexec ip netns exec \"$ns\" /bin/sh -c \"$*\"\n",
            NODE_ADDRESSES[0], namespaces[0], NODE_ADDRESSES[1], namespaces[1]
        );
        std::fs::write(&nodes.agent, agent).unwrap();
        std::fs::set_permissions(&nodes.agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        Ok(nodes)
    }

    /// mpirun started on the first node, one rank per node, traffic over the veth pair only.
    fn mpirun(&self) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespaces[0], "mpirun", "--allow-run-as-root", "-np", "2"]);
        command.args(session_dir());
        command.args(["--hostfile", self.hostfile.to_str().unwrap(), "--mca", "plm_rsh_agent", self.agent.to_str().unwrap()]);
        command.args([
            "--mca",
            "btl",
            "tcp,self",
            "--mca",
            "btl_tcp_if_include",
            "10.77.0.0/24",
            "--mca",
            "oob_tcp_if_include",
            "10.77.0.0/24",
        ]);
        command
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// Two nodes: each rank in its own network namespace, so every byte between them crosses a
/// network interface (a veth pair), and mpirun starts the second node's daemon through an rsh
/// agent that enters the other namespace, as ssh would on another machine. DDP over them gives
/// one process's losses. Needs root and iproute2 (CI has both, and sets FURNACE_REQUIRE_NETNS=1);
/// elsewhere it is skipped with a note.
#[test]
fn two_nodes_in_network_namespaces_equal_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = match TwoNodes::create(dir.path()) {
        Ok(nodes) => nodes,
        Err(e) if std::env::var("FURNACE_REQUIRE_NETNS").as_deref() != Ok("1") => {
            eprintln!("note: skipping the two-namespace test (needs root and iproute2): {e}");
            return;
        }
        Err(e) => panic!("FURNACE_REQUIRE_NETNS=1 but the namespaces cannot be made: {e}"),
    };
    let recipe = recipe(dir.path());
    let single = dir.path().join("single");
    let out = train(1, &recipe, &single, &["--set", "training.local_batch_size=4"]);
    assert!(out.status.success(), "{}", text(&out));
    let run = dir.path().join("two_nodes");
    let set = format!("run.output_dir={}", run.display());
    let out = nodes
        .mpirun()
        .args([FURNACE, "train", "--config", recipe.to_str().unwrap(), "--set", &set, "--set", "training.local_batch_size=2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rank 0 of 2 (ddp)"), "{}", text(&out));
    assert_same_losses(&single, &run, "two nodes");
}

/// SIGTERM to one rank only: the ranks agree (through the step's reduction) to stop at the same
/// step, rank 0 writes that step's checkpoint, every rank exits with the saved-stop status.
#[test]
fn a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path());
    let run = dir.path().join("run");
    let mut job = start_long_job(&recipe, &run, "training.save_every=100000");
    let started = Instant::now();
    while logged_by_step(&run, "loss").len() < 3 {
        if job.try_wait().unwrap().is_some() {
            panic!("the job ended before its third step: {}", text(&job.wait_with_output().unwrap()));
        }
        assert!(started.elapsed() < Duration::from_secs(300), "no 3 steps within 5 minutes");
        std::thread::sleep(Duration::from_millis(50));
    }
    let victims = rank_pids(&run, 1);
    assert_eq!(victims.len(), 1, "rank 1's process");
    Command::new("kill").args(["-TERM", &victims[0].to_string()]).status().unwrap();
    let out = job.wait_with_output().unwrap();
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(75), "{printed}");
    let saved: Vec<String> =
        std::fs::read_dir(run.join("checkpoints")).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    assert_eq!(saved.len(), 1, "{saved:?}");
    let step: usize = saved[0].strip_prefix("step_").unwrap().parse().unwrap();
    // Every rank that reports says the same step. mpirun may drop the last lines of a rank that
    // exits non-zero while it tears the job down, so a rank's silence is no evidence; a rank that
    // went on to another step would have failed its next reduction (an `error:` line, exit 1).
    let reports: Vec<&str> = printed.lines().filter(|l| l.starts_with("stopped by a signal at step ")).collect();
    assert!(!reports.is_empty(), "{printed}");
    assert!(reports.iter().all(|l| l.starts_with(&format!("stopped by a signal at step {step} "))), "all at step {step}: {printed}");
    assert!(!printed.contains("error:"), "{printed}");
    let until = (step + 1).to_string();
    let out = train(
        1,
        &recipe,
        &run,
        &[
            "--set",
            "training.local_batch_size=4",
            "--set",
            "training.steps=100000",
            "--resume",
            run.to_str().unwrap(),
            "--max-steps",
            &until,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}

/// A 2-rank job of (practically) unbounded steps in the background, with `save` setting its
/// checkpoints, for tests that stop it from outside.
fn start_long_job(recipe: &Path, run: &Path, save: &str) -> std::process::Child {
    let set = format!("run.output_dir={}", run.display());
    mpirun(2)
        .arg(FURNACE)
        .args(["train", "--config", recipe.to_str().unwrap(), "--set", &set])
        .args(["--set", "training.local_batch_size=2", "--set", "training.steps=100000", "--set", save])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}
