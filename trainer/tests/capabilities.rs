//! The capability table against the binary: every pretraining feature an architecture's row
//! grants trains a step, and every one it lacks is refused before any work with the key named
//! (the recipe check's side of the table, modes included, is tested in configs).

use furnace_configs::capabilities::{Capabilities, CAPABILITIES};

mod common;
use common::{arch_settings, furnace, losses, run_ok, text, TINY_ARCH};

#[test]
fn every_granted_feature_trains_a_step_and_every_other_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("tiny.toml");
    std::fs::write(&recipe, TINY_ARCH).unwrap();
    let teacher = dir.path().join("teacher");
    let train = |name: &str, sets: &[String]| {
        let mut args = vec!["train".to_string(), "--config".into(), recipe.display().to_string()];
        args.extend(["--set".into(), format!("run.output_dir={}", dir.path().join(name).display())]);
        for set in sets {
            args.extend(["--set".into(), set.clone()]);
        }
        furnace(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    run_ok(&["train", "--config", recipe.to_str().unwrap(), "--set", &format!("run.output_dir={}", teacher.display())]);
    let features: [(&str, Vec<String>, fn(&Capabilities) -> bool); 5] = [
        ("lora.r", vec!["lora.r=4".into(), "lora.target_modules=[\"all-linear\"]".into()], |c| c.lora),
        ("activation_checkpoint.mode", vec!["activation_checkpoint.mode=\"full\"".into()], |c| c.checkpointing),
        ("distributed.strategy", vec!["distributed.strategy=\"fsdp\"".into()], |c| c.fsdp),
        ("optimizer.name", vec!["optimizer.name=\"sophia\"".into()], |c| c.sophia),
        ("training.teacher", vec![format!("training.teacher={}", teacher.display())], |c| c.distillation),
    ];
    for caps in &CAPABILITIES {
        for (key, sets, has) in &features {
            let name = format!("{}-{}", caps.arch, key.replace('.', "-"));
            let out = train(&name, &[arch_settings(caps.arch.as_str()), sets.clone()].concat());
            match has(caps) {
                true => {
                    assert!(out.status.success(), "{name}: {}", text(&out));
                    let logged = losses(&dir.path().join(&name));
                    assert!(logged.len() == 1 && logged[0].is_finite(), "{name} logs its step's loss: {logged:?}");
                }
                false => assert!(!out.status.success() && text(&out).contains(key), "{name} is refused naming {key}: {}", text(&out)),
            }
        }
    }
}
