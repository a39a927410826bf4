//! `scripts/gpu_check.sh` on a machine it cannot use: a one-line reason and exit status 2 before
//! any work, whether nvidia-smi is missing, sees no GPU, or the prepared binaries were not carried.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

mod common;
use common::{text, workspace};

/// The script run with only `tools` (plus `dirname`) on its PATH and `GPU_DIST` pointing at an
/// empty folder; returns (exit status, what it printed) and checks it wrote nothing to `$OUT`.
fn gpu_check(tools: &Path) -> (Option<i32>, String) {
    std::os::unix::fs::symlink(which("dirname"), tools.join("dirname")).unwrap();
    let (out, dist) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let output = Command::new(which("bash"))
        .arg(workspace().join("scripts/gpu_check.sh"))
        .env("PATH", tools)
        .env("OUT", out.path())
        .env("GPU_DIST", dist.path())
        .output()
        .unwrap();
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0, "no work before the checks: {}", text(&output));
    (output.status.code(), text(&output))
}

fn which(tool: &str) -> String {
    let out = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A stand-in `nvidia-smi` that prints `names` for any query.
fn fake_nvidia_smi(tools: &Path, names: &str) {
    let path = tools.join("nvidia-smi");
    std::fs::write(&path, format!("#!{}\nprintf '{names}'\n", which("sh"))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn gpu_check_fails_fast_and_clearly_without_a_gpu() {
    let tools = tempfile::tempdir().unwrap();
    let (status, printed) = gpu_check(tools.path());
    assert_eq!(status, Some(2), "{printed}");
    assert!(printed.contains("gpu_check: no NVIDIA GPU here") && printed.contains("lavapipe"), "{printed}");

    let tools = tempfile::tempdir().unwrap();
    fake_nvidia_smi(tools.path(), "");
    let (status, printed) = gpu_check(tools.path());
    assert_eq!(status, Some(2), "{printed}");
    assert!(printed.contains("nvidia-smi lists no GPU"), "{printed}");

    let tools = tempfile::tempdir().unwrap();
    fake_nvidia_smi(tools.path(), "NVIDIA H100 80GB HBM3\\n");
    let (status, printed) = gpu_check(tools.path());
    assert_eq!(status, Some(2), "{printed}");
    assert!(printed.contains("furnace.gz is missing: run scripts/gpu_prepare.sh"), "{printed}");
}
