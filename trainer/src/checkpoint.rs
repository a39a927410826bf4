//! Checkpoints: `<output_dir>/checkpoints/step_<N>/` holding the model (safetensors, our
//! parameter names), the optimizer moments, the train state (step, data cursor), the resolved
//! recipe and the tokenizer. A checkpoint is written into a hidden temporary folder, fsynced,
//! then renamed: it is either complete or absent.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use furnace_core::fsutil::sync_dir;
use furnace_core::params::{from_safetensors, to_safetensors, NamedTensors};
use furnace_data::Cursor;
use serde::{Deserialize, Serialize};

use crate::precision::LossScaler;

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
    /// Ranks that trained it; the data cursor counts one rank's items.
    #[serde(default = "one")]
    pub world_size: usize,
    /// Files the optimizer state is split into: 1, or the world size under ZeRO (one per rank).
    #[serde(default = "one")]
    pub optimizer_shards: usize,
    /// fp16-mixed: the dynamic loss scale.
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
}

fn one() -> usize {
    1
}

impl TrainState {
    pub fn new(data_cursor: Cursor, world_size: usize, optimizer_shards: usize) -> Self {
        Self { step: 0, optimizer_step: 0, data_cursor, tokens_seen: 0, world_size, optimizer_shards, loss_scaler: None }
    }

    /// The state continued on `world_size` ranks (each rank's cursor rescaled: the ranks
    /// together have consumed the same items of the epoch) with `optimizer_shards` files.
    pub fn resharded(mut self, world_size: usize, optimizer_shards: usize) -> Self {
        let consumed = self.data_cursor.position * self.world_size;
        if consumed % world_size != 0 {
            println!(
                "resuming {} ranks' data position on {world_size}: {} item(s) of this epoch are seen again",
                self.world_size,
                consumed % world_size
            );
        }
        self.data_cursor.position = consumed / world_size;
        self.world_size = world_size;
        self.optimizer_shards = optimizer_shards;
        self
    }
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
        let final_dir = self.dir.join(format!("step_{step}"));
        if final_dir.exists() {
            bail!("{} already exists; refusing to overwrite a written checkpoint", final_dir.display());
        }
        let tmp = self.staging(step);
        let optimizer_file = if state.optimizer_shards > 1 {
            optimizer_shard_file(0, state.optimizer_shards)
        } else {
            self.stage(step)?;
            OPTIMIZER_FILE.to_string()
        };
        write_synced(&tmp.join(MODEL_FILE), &to_safetensors(model))?;
        write_synced(&tmp.join(optimizer_file), &to_safetensors(optimizer))?;
        write_synced(&tmp.join(STATE_FILE), serde_json::to_string_pretty(state)?.as_bytes())?;
        write_synced(&tmp.join(RECIPE_FILE), recipe.as_bytes())?;
        write_synced(&tmp.join(TOKENIZER_FILE), tokenizer.as_bytes())?;
        sync_dir(&tmp)?;
        fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move the checkpoint into {}", final_dir.display()))?;
        sync_dir(&self.dir)?;
        self.prune()?;
        Ok(final_dir)
    }

    /// Where checkpoint `step` is assembled before its rename into place.
    fn staging(&self, step: usize) -> PathBuf {
        self.dir.join(format!(".tmp-step_{step}"))
    }

    /// Start checkpoint `step`: an empty staging folder (a leftover of a crashed save is removed).
    pub fn stage(&self, step: usize) -> Result<()> {
        fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let tmp = self.staging(step);
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))
    }

    /// ZeRO: rank `rank`'s optimizer state into the staging folder of checkpoint `step`
    /// (rank 0 writes its own shard with the rest in `save`).
    pub fn write_optimizer_shard(&self, step: usize, rank: usize, shards: usize, optimizer: &NamedTensors) -> Result<()> {
        write_synced(&self.staging(step).join(optimizer_shard_file(rank, shards)), &to_safetensors(optimizer))
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

/// The file of rank `rank`'s optimizer state in a checkpoint split `shards` ways.
fn optimizer_shard_file(rank: usize, shards: usize) -> String {
    format!("optimizer-{:05}-of-{shards:05}.safetensors", rank + 1)
}

/// The whole optimizer state: one file, or the union of the ranks' shards (state is keyed by
/// parameter path, so any world size can take its own share of it).
fn optimizer_tensors(dir: &Path, shards: usize) -> Result<NamedTensors> {
    if shards <= 1 {
        return tensors(dir, OPTIMIZER_FILE);
    }
    let mut all = NamedTensors::new();
    for rank in 0..shards {
        all.extend(tensors(dir, &optimizer_shard_file(rank, shards))?);
    }
    Ok(all)
}

pub fn load(dir: &Path) -> Result<Loaded> {
    let state: TrainState = serde_json::from_slice(&read(dir, STATE_FILE)?)
        .with_context(|| format!("checkpoint file {} is damaged", dir.join(STATE_FILE).display()))?;
    Ok(Loaded {
        model: tensors(dir, MODEL_FILE)?,
        optimizer: optimizer_tensors(dir, state.optimizer_shards)?,
        state,
        recipe: String::from_utf8(read(dir, RECIPE_FILE)?)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use furnace_core::params::HostTensor;

    fn sample() -> NamedTensors {
        let mut t = NamedTensors::new();
        t.insert("w".into(), HostTensor { shape: vec![2], data: vec![1.0, 2.0] });
        t
    }

    fn state(step: usize) -> TrainState {
        TrainState {
            step,
            optimizer_step: step as u64,
            data_cursor: Cursor { epoch: 1, position: 3 },
            tokens_seen: 10,
            world_size: 1,
            optimizer_shards: 1,
            loss_scaler: Some(LossScaler { scale: 1024.0, good_steps: 7 }),
        }
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
