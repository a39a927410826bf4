//! Checkpoints: `<output_dir>/checkpoints/step_<N>/` holding the model (safetensors, our
//! parameter names), the optimizer moments, the train state (step, data cursor), the resolved
//! recipe and the tokenizer. A checkpoint is written into a hidden temporary folder, fsynced,
//! then renamed: it is either complete or absent.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use furnace_configs::fsutil::sync_dir;
use furnace_data::Cursor;
use furnace_models::params::{from_safetensors, to_safetensors, NamedTensors};
use serde::{Deserialize, Serialize};

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "train_state.json";
pub const RECIPE_FILE: &str = "recipe.toml";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// The AdamW step counter (bias correction).
    pub optimizer_step: u64,
    pub data_cursor: Cursor,
    pub tokens_seen: u64,
}

pub struct Checkpointer {
    dir: PathBuf,
    save_every: usize,
    keep_last: usize,
}

/// Everything a checkpoint holds, read back.
pub struct Loaded {
    pub model: NamedTensors,
    pub optimizer: NamedTensors,
    pub state: TrainState,
    pub recipe: String,
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

fn step_of(path: &Path) -> Option<usize> {
    path.file_name()?.to_str()?.strip_prefix("step_")?.parse().ok()
}

impl Checkpointer {
    pub fn new(output_dir: &Path, save_every: usize, keep_last: usize) -> Self {
        Self { dir: output_dir.join("checkpoints"), save_every, keep_last }
    }

    pub fn should_save(&self, step: usize, last: bool) -> bool {
        last || (self.save_every > 0 && step % self.save_every == 0)
    }

    /// Complete checkpoints, oldest first.
    pub fn list(&self) -> Vec<(usize, PathBuf)> {
        let mut found: Vec<(usize, PathBuf)> = fs::read_dir(&self.dir)
            .map(|entries| entries.filter_map(|e| e.ok()).map(|e| e.path()).filter_map(|p| step_of(&p).map(|s| (s, p))).collect())
            .unwrap_or_default();
        found.sort();
        found
    }

    pub fn latest(&self) -> Option<PathBuf> {
        self.list().pop().map(|(_, p)| p)
    }

    pub fn save(
        &self,
        step: usize,
        model: &NamedTensors,
        optimizer: &NamedTensors,
        state: &TrainState,
        recipe: &str,
        tokenizer: &str,
    ) -> Result<PathBuf> {
        fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let final_dir = self.dir.join(format!("step_{step}"));
        if final_dir.exists() {
            bail!("{} already exists; refusing to overwrite a written checkpoint", final_dir.display());
        }
        let tmp = self.dir.join(format!(".tmp-step_{step}"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp)?;
        write_synced(&tmp.join(MODEL_FILE), &to_safetensors(model))?;
        write_synced(&tmp.join(OPTIMIZER_FILE), &to_safetensors(optimizer))?;
        write_synced(&tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())?;
        write_synced(&tmp.join(RECIPE_FILE), recipe.as_bytes())?;
        write_synced(&tmp.join(TOKENIZER_FILE), tokenizer.as_bytes())?;
        sync_dir(&tmp)?;
        fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move the checkpoint into {}", final_dir.display()))?;
        sync_dir(&self.dir)?;
        self.prune()?;
        Ok(final_dir)
    }

    /// Keep the newest `keep_last` checkpoints (0 keeps all).
    fn prune(&self) -> Result<()> {
        if self.keep_last == 0 {
            return Ok(());
        }
        let all = self.list();
        for (_, path) in all.iter().take(all.len().saturating_sub(self.keep_last)) {
            fs::remove_dir_all(path).with_context(|| format!("cannot prune {}", path.display()))?;
        }
        Ok(())
    }
}

/// A run folder (→ its newest checkpoint) or a checkpoint folder itself.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(MODEL_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    Checkpointer::new(path, 0, 0).latest().with_context(|| {
        format!("no checkpoint in {} (expected {}/checkpoints/step_<N>/ or a folder holding {MODEL_FILE})", path.display(), path.display())
    })
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>> {
    let path = dir.join(name);
    fs::read(&path).with_context(|| format!("checkpoint file {} is missing or unreadable", path.display()))
}

fn tensors(dir: &Path, name: &str) -> Result<NamedTensors> {
    from_safetensors(&read(dir, name)?).map_err(|e| {
        anyhow::anyhow!(
            "checkpoint file {} is damaged ({e}); it may be truncated: resume from an older step_<N> by moving this folder away",
            dir.join(name).display()
        )
    })
}

pub fn load(dir: &Path) -> Result<Loaded> {
    let state: TrainState = serde_json::from_slice(&read(dir, STATE_FILE)?)
        .with_context(|| format!("checkpoint file {} is damaged", dir.join(STATE_FILE).display()))?;
    Ok(Loaded {
        model: tensors(dir, MODEL_FILE)?,
        optimizer: tensors(dir, OPTIMIZER_FILE)?,
        state,
        recipe: String::from_utf8(read(dir, RECIPE_FILE)?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use furnace_models::params::HostTensor;

    fn sample() -> NamedTensors {
        let mut t = NamedTensors::new();
        t.insert("w".into(), HostTensor { shape: vec![2], data: vec![1.0, 2.0] });
        t
    }

    fn state(step: usize) -> TrainState {
        TrainState { step, optimizer_step: step as u64, data_cursor: Cursor { epoch: 1, position: 3 }, tokens_seen: 10 }
    }

    #[test]
    fn save_keeps_last_k_checkpoints_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(dir.path(), 10, 2);
        for step in [10, 20, 30] {
            ck.save(step, &sample(), &sample(), &state(step), "recipe", "{}").unwrap();
        }
        let steps: Vec<usize> = ck.list().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        let loaded = load(&resolve(dir.path()).unwrap()).unwrap();
        assert_eq!(loaded.state, state(30));
        assert_eq!(loaded.model, sample());
    }

    #[test]
    fn unfinished_temporary_folders_are_not_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(dir.path(), 10, 0);
        ck.save(10, &sample(), &sample(), &state(10), "r", "{}").unwrap();
        fs::create_dir_all(dir.path().join("checkpoints/.tmp-step_20")).unwrap();
        assert!(ck.latest().unwrap().ends_with("step_10"));
    }

    #[test]
    fn truncated_checkpoint_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(dir.path(), 10, 0);
        let path = ck.save(10, &sample(), &sample(), &state(10), "r", "{}").unwrap();
        let bytes = fs::read(path.join(MODEL_FILE)).unwrap();
        fs::write(path.join(MODEL_FILE), &bytes[..bytes.len() / 2]).unwrap();
        let err = load(&path).err().unwrap().to_string();
        assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
    }

    #[test]
    fn an_existing_checkpoint_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(dir.path(), 10, 0);
        ck.save(10, &sample(), &sample(), &state(10), "r", "{}").unwrap();
        assert!(ck.save(10, &sample(), &sample(), &state(10), "r", "{}").is_err());
        assert_eq!(load(&ck.latest().unwrap()).unwrap().model, sample());
    }
}
