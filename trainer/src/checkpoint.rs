//! Checkpoints: `<output_dir>/checkpoints/step_<N>/` holding the model (safetensors, our
//! parameter names), the optimizer moments, the train state (step, data cursor), the resolved
//! recipe, the tokenizer and, written last, a manifest of every file's size and content hash.
//! A checkpoint is written into a hidden temporary folder, fsynced, then renamed: it is either
//! complete or absent. Reading one verifies it against its manifest first, and a resume moves
//! past checkpoints that fail to the newest one that verifies.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use furnace_configs::Recipe;
use furnace_core::fsutil::{sync_dir, write_synced};
use furnace_core::params::{from_safetensors, to_safetensors, NamedTensors};
use furnace_data::Cursor;
use serde::{Deserialize, Serialize};

use crate::precision::LossScaler;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "train_state.json";
pub const RECIPE_FILE: &str = "recipe.toml";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const MANIFEST_FILE: &str = "manifest.json";

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
        if !consumed.is_multiple_of(world_size) {
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

/// Write one file of a checkpoint being staged, naming it when that fails (a full disk).
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    write_synced(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

fn step_of(path: &Path) -> Option<usize> {
    path.file_name()?.to_str()?.strip_prefix("step_")?.parse().ok()
}

impl Checkpointer {
    pub fn new(output_dir: &Path, save_every: usize, keep_last: usize) -> Self {
        Self { dir: output_dir.join("checkpoints"), save_every, keep_last }
    }

    pub fn should_save(&self, step: usize, last: bool) -> bool {
        last || (self.save_every > 0 && step.is_multiple_of(self.save_every))
    }

    /// Complete checkpoints, oldest first (hidden folders — a save in progress, a checkpoint
    /// being pruned — are not among them).
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

    /// The newest checkpoint that verifies against its manifest; each newer one that fails is
    /// reported with the reason and passed over.
    pub fn newest_verified(&self) -> Result<PathBuf> {
        let all = self.list();
        let mut failures = Vec::new();
        for (_, dir) in all.iter().rev() {
            match verify(dir) {
                Ok(()) => {
                    if !failures.is_empty() {
                        eprintln!("warning: using {}, the newest checkpoint that verifies", dir.display());
                    }
                    return Ok(dir.clone());
                }
                Err(err) => {
                    eprintln!("warning: passing over {}: {err:#}", dir.display());
                    failures.push(format!("{err:#}"));
                }
            }
        }
        match failures.is_empty() {
            true => bail!("no checkpoint under {}", self.dir.display()),
            false => bail!(
                "none of the {} checkpoints under {} verifies ({}); restore one from a backup, or pass --no-verify to read one as it is",
                failures.len(),
                self.dir.display(),
                failures.join("; ")
            ),
        }
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
        let written = (|| {
            let optimizer_file = if state.optimizer_shards > 1 {
                optimizer_shard_file(0, state.optimizer_shards)
            } else {
                self.stage(step)?;
                OPTIMIZER_FILE.to_string()
            };
            let mut written = BTreeMap::new();
            let mut write = |name: &str, bytes: &[u8]| -> Result<()> {
                write_file(&tmp.join(name), bytes)?;
                written.insert(name.to_string(), digest(bytes));
                Ok(())
            };
            write(MODEL_FILE, &to_safetensors(model))?;
            write(&optimizer_file, &to_safetensors(optimizer))?;
            write(STATE_FILE, serde_json::to_string_pretty(state)?.as_bytes())?;
            write(RECIPE_FILE, recipe.as_bytes())?;
            write(TOKENIZER_FILE, tokenizer.as_bytes())?;
            write_manifest(&tmp, step, written)?;
            sync_dir(&tmp)?;
            fs::rename(&tmp, &final_dir).with_context(|| format!("cannot move the checkpoint into {}", final_dir.display()))?;
            sync_dir(&self.dir).with_context(|| format!("cannot sync {}", self.dir.display()))
        })();
        if let Err(err) = written {
            // The partial checkpoint would keep holding the space a full disk lacks.
            let _ = fs::remove_dir_all(&tmp);
            return Err(err.context(format!(
                "saving checkpoint step_{step} under {} failed (the earlier checkpoints are intact)",
                self.dir.display()
            )));
        }
        self.prune()?;
        Ok(final_dir)
    }

    /// Remove what interrupted saves and prunes left behind (hidden folders, never a checkpoint).
    pub fn clean_leftovers(&self) -> Result<()> {
        let Ok(entries) = fs::read_dir(&self.dir) else { return Ok(()) };
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with(".tmp-step_") || name.starts_with(".pruned-step_") {
                fs::remove_dir_all(&path).with_context(|| format!("cannot remove the leftover {}", path.display()))?;
            }
        }
        Ok(())
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
        write_file(&self.staging(step).join(optimizer_shard_file(rank, shards)), &to_safetensors(optimizer))
    }

    /// Keep the newest `keep_last` checkpoints (0 keeps all).
    fn prune(&self) -> Result<()> {
        if self.keep_last == 0 {
            return Ok(());
        }
        let all = self.list();
        for (step, path) in all.iter().take(all.len().saturating_sub(self.keep_last)) {
            // Renamed out of the list first: a kill while deleting leaves a hidden leftover
            // (removed at the next start), never a half-deleted checkpoint.
            let doomed = self.dir.join(format!(".pruned-step_{step}"));
            fs::rename(path, &doomed).with_context(|| format!("cannot prune {}", path.display()))?;
            fs::remove_dir_all(&doomed).with_context(|| format!("cannot remove {}", doomed.display()))?;
        }
        Ok(())
    }
}

/// Each file of a checkpoint: its size and content hash.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct FileDigest {
    bytes: u64,
    xxh3: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    step: usize,
    files: BTreeMap<String, FileDigest>,
}

fn digest(bytes: &[u8]) -> FileDigest {
    FileDigest { bytes: bytes.len() as u64, xxh3: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes)) }
}

/// The manifest of every file staged in `dir`: `files`, the ones this process wrote, and the
/// other ranks' optimizer shards, read back.
fn write_manifest(dir: &Path, step: usize, mut files: BTreeMap<String, FileDigest>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if path.is_file() && name != MANIFEST_FILE && !files.contains_key(&name) {
            files.insert(name, digest(&fs::read(&path).with_context(|| format!("cannot read back {}", path.display()))?));
        }
    }
    write_file(&dir.join(MANIFEST_FILE), serde_json::to_string_pretty(&Manifest { step, files })?.as_bytes())
}

/// Whether reads verify checkpoints (`--no-verify` turns it off for a command, for models so
/// large that hashing them costs too much).
static VERIFY: AtomicBool = AtomicBool::new(true);

pub fn set_verification(on: bool) {
    VERIFY.store(on, Ordering::Relaxed);
}

/// Check checkpoint `dir` against its manifest: every file present, of its size and content,
/// and the step in train_state.json that of the folder's name.
pub fn verify(dir: &Path) -> Result<()> {
    if !VERIFY.load(Ordering::Relaxed) {
        return Ok(());
    }
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.is_file() {
        if dir.join(MODEL_FILE).is_file() && dir.join(STATE_FILE).is_file() {
            eprintln!("warning: {} has no {MANIFEST_FILE} (written by a Furnace before manifests): not verified", dir.display());
            return Ok(());
        }
        bail!("{} is missing: the checkpoint is incomplete", manifest_path.display());
    }
    let manifest: Manifest =
        serde_json::from_slice(&fs::read(&manifest_path).with_context(|| format!("cannot read {}", manifest_path.display()))?)
            .with_context(|| format!("{} is damaged", manifest_path.display()))?;
    for (name, expected) in &manifest.files {
        let path = dir.join(name);
        let bytes = fs::read(&path).with_context(|| format!("{} is missing or unreadable (listed in {MANIFEST_FILE})", path.display()))?;
        let found = digest(&bytes);
        if found.bytes != expected.bytes {
            bail!(
                "{} has {} bytes where {MANIFEST_FILE} recorded {}: the file is truncated or replaced",
                path.display(),
                found.bytes,
                expected.bytes
            );
        }
        if found.xxh3 != expected.xxh3 {
            bail!("{} is corrupted: its content hash {} differs from {} in {MANIFEST_FILE}", path.display(), found.xxh3, expected.xxh3);
        }
    }
    for required in [MODEL_FILE, STATE_FILE, RECIPE_FILE, TOKENIZER_FILE] {
        if !manifest.files.contains_key(required) {
            bail!("{} does not list {required}: the checkpoint is incomplete", manifest_path.display());
        }
    }
    let state: TrainState = serde_json::from_slice(&read(dir, STATE_FILE)?)
        .with_context(|| format!("checkpoint file {} is damaged", dir.join(STATE_FILE).display()))?;
    let named = step_of(dir);
    if state.step != manifest.step || named.is_some_and(|n| n != state.step) {
        bail!(
            "{} says step {} but the checkpoint is step {}: the train state does not belong here",
            dir.join(STATE_FILE).display(),
            state.step,
            named.unwrap_or(manifest.step)
        );
    }
    Ok(())
}

/// A checkpoint read for its model: the folder, its recipe and weights (the tokenizer is
/// `dir/tokenizer.json`).
pub struct StoredModel {
    pub dir: PathBuf,
    pub recipe: Recipe,
    pub weights: NamedTensors,
}

/// The model of a run folder (its newest checkpoint that verifies) or of one checkpoint folder
/// (which must verify).
pub fn read_model(path: &Path) -> Result<StoredModel> {
    let dir = resolve(path)?;
    let recipe_path = dir.join(RECIPE_FILE);
    let text = String::from_utf8(read(&dir, RECIPE_FILE)?).with_context(|| format!("{} is not UTF-8 text", recipe_path.display()))?;
    let recipe = Recipe::from_checkpoint(&text, &recipe_path.display().to_string())?;
    Ok(StoredModel { weights: tensors(&dir, MODEL_FILE)?, recipe, dir })
}

/// A checkpoint folder itself (verified), or a run folder's newest checkpoint that verifies.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(MODEL_FILE).is_file() || path.join(MANIFEST_FILE).is_file() {
        verify(path).with_context(|| format!("checkpoint {} fails verification", path.display()))?;
        return Ok(path.to_path_buf());
    }
    let run = Checkpointer::new(path, 0, 0);
    if run.latest().is_none() {
        bail!("no checkpoint in {} (expected {}/checkpoints/step_<N>/ or a folder holding {MODEL_FILE})", path.display(), path.display());
    }
    run.newest_verified()
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
    fn a_checkpoint_under_another_step_name_fails_verification() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(dir.path(), 10, 0);
        let path = ck.save(10, &sample(), &sample(), &state(10), "r", "{}").unwrap();
        verify(&path).unwrap();
        let moved = dir.path().join("checkpoints/step_20");
        fs::rename(&path, &moved).unwrap();
        let err = format!("{:#}", verify(&moved).err().unwrap());
        assert!(err.contains("train_state.json says step 10 but the checkpoint is step 20"), "{err}");
    }

    #[test]
    fn a_failed_save_leaves_nothing_behind_and_names_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let ck = Checkpointer::new(dir.path(), 10, 0);
        ck.save(10, &sample(), &sample(), &state(10), "r", "{}").unwrap();
        // A file where the staging folder's manifest goes makes the last write fail.
        let mut bad = state(20);
        bad.optimizer_shards = 2;
        ck.stage(20).unwrap();
        fs::create_dir(ck.staging(20).join(MANIFEST_FILE)).unwrap();
        let err = format!("{:#}", ck.save(20, &sample(), &sample(), &bad, "r", "{}").err().unwrap());
        assert!(err.contains("saving checkpoint step_20") && err.contains("earlier checkpoints are intact"), "{err}");
        assert!(!ck.staging(20).exists());
        assert_eq!(ck.list().len(), 1);
        verify(&ck.latest().unwrap()).unwrap();
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
