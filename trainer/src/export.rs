//! `furnace export`: a checkpoint as a Hugging Face model folder that
//! `transformers.AutoModelForCausalLM.from_pretrained` loads offline, as a GGUF file for
//! llama.cpp, or (LoRA runs) as a PEFT adapter folder.

use std::path::Path;

use anyhow::{bail, Context, Result};
use furnace_configs::Recipe;
use furnace_configs::TrainMode;
use furnace_core::fsutil::{atomic_write, sync_dir, write_synced};
use furnace_core::params::{to_safetensors_as, HostTensor, NamedTensors, StoreDtype};
use furnace_data::TextTokenizer;
use furnace_models::hf::{config_to_hf, hf_arch_for, to_hf, to_peft, HfArch};
use furnace_models::lora::{has_lora, merge_lora, LoraInit};
use furnace_models::nf4::Nf4Matrix;
use serde_json::json;

use crate::checkpoint::{self, TOKENIZER_FILE};
use crate::gguf::{encode, GgmlType, Gguf, GgufTensor, Value};
use crate::gguf_layout::{gguf_architecture, gguf_metadata, to_gguf_tensors};
use crate::model::{base_for, lora_config};

/// What an export reads from a checkpoint: the model's weights under Hugging Face names.
struct Source {
    dir: std::path::PathBuf,
    recipe: Recipe,
    tokenizer: TextTokenizer,
    config: furnace_models::ModelConfig,
    arch: furnace_models::hf::HfArch,
    hf: NamedTensors,
}

/// A checkpoint's recipe, tokenizer, model config and weights under our names.
fn read_checkpoint(checkpoint: &Path) -> Result<(std::path::PathBuf, Recipe, TextTokenizer, furnace_models::ModelConfig, NamedTensors)> {
    let checkpoint::StoredModel { dir, recipe, mut weights } = checkpoint::read_model(checkpoint)?;
    let tokenizer = TextTokenizer::load(&dir.join(TOKENIZER_FILE)).map_err(anyhow::Error::msg)?;
    let config = recipe.model.model(Some(tokenizer.vocab_size()));
    // QLoRA checkpoints leave out the NF4 base layers: what trained was their dequantization.
    for (name, tensor) in base_for(&recipe)?.unwrap_or_default() {
        if let std::collections::btree_map::Entry::Vacant(e) = weights.entry(name) {
            let nf4 = Nf4Matrix::quantize(&tensor.data, [tensor.shape[0], tensor.shape[1]]);
            e.insert(HostTensor { shape: tensor.shape, data: nf4.dequantize() });
        }
    }
    Ok((dir, recipe, tokenizer, config, weights))
}

/// A checkpoint's whole model under Hugging Face names; LoRA adapters are folded into the base
/// weights when `merge_adapters`, and refused otherwise (an export holds one set of weights).
fn read_source(checkpoint: &Path, merge_adapters: bool) -> Result<Source> {
    let (dir, recipe, tokenizer, config, mut weights) = read_checkpoint(checkpoint)?;
    if has_lora(&weights) {
        if !merge_adapters {
            bail!(
                "{} holds LoRA adapters: add --merge-lora to fold them into the base weights, or export them alone with --format peft",
                dir.display()
            );
        }
        let lora = lora_config(&recipe.lora).with_context(|| format!("{}: adapters present but [lora] r = 0", dir.display()))?;
        weights = merge_lora(&weights, lora.scale());
    }
    if recipe.training.mode == TrainMode::Ppo {
        // PPO's value head trains the policy and is not part of it (TRL saves the policy alone).
        weights.retain(|name, _| !name.starts_with("score."));
    }
    let arch = hf_arch_for(&config).map_err(|e| anyhow::anyhow!("cannot export {}: {e}", dir.display()))?;
    let hf = to_hf(arch, &weights, config.n_layers()).map_err(anyhow::Error::msg)?;
    Ok(Source { dir, recipe, tokenizer, config, arch, hf })
}

/// Write the LoRA adapters of `checkpoint` alone, as PEFT saves them: `adapter_config.json` and
/// `adapter_model.safetensors`, loadable with `PeftModel.from_pretrained(base, out)` on the
/// base model exported with `--format safetensors` (of the base run, or of this one merged
/// with zero adapters — the frozen weights are the base's).
pub fn export_peft(checkpoint: &Path, out: &Path, force: bool) -> Result<()> {
    let (dir, recipe, _, config, weights) = read_checkpoint(checkpoint)?;
    let lora = lora_config(&recipe.lora).filter(|_| has_lora(&weights)).with_context(|| {
        format!("{} holds no LoRA adapters (its recipe has lora.r = 0); export the whole model with --format safetensors", dir.display())
    })?;
    check_target(out, &dir, force)?;
    let arch = hf_arch_for(&config).map_err(|e| anyhow::anyhow!("cannot export {}: {e}", dir.display()))?;
    let adapters = to_peft(arch, &weights, config.n_layers(), lora.scale(), lora.use_rslora).map_err(anyhow::Error::msg)?;
    // PEFT takes one r and alpha plus per-module patterns; modules whose rank differs (GPT-2's
    // fused c_attn) go into the patterns.
    let rank_pattern: serde_json::Map<String, serde_json::Value> =
        adapters.modules.iter().filter(|(_, (r, _))| *r != lora.r).map(|(m, (r, _))| (m.clone(), json!(r))).collect();
    let alpha_pattern: serde_json::Map<String, serde_json::Value> =
        adapters.modules.iter().filter(|(_, (r, _))| *r != lora.r).map(|(m, (_, a))| (m.clone(), json!(a))).collect();
    let config_json = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": adapters.modules.keys().collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": arch == HfArch::Gpt2,
        "use_rslora": lora.use_rslora,
        "init_lora_weights": match lora.init { LoraInit::Kaiming => json!(true), LoraInit::Gaussian => json!("gaussian") },
        "modules_to_save": null,
        "base_model_name_or_path": recipe.model.init_from,
        "inference_mode": true,
    });
    publish_folder(out, |staged| {
        let write = |name: &str, bytes: &[u8]| write_into(staged, name, bytes);
        write("adapter_model.safetensors", &to_safetensors_as(&adapters.tensors, StoreDtype::F32))?;
        write("adapter_config.json", serde_json::to_string_pretty(&config_json)?.as_bytes())
    })?;
    println!(
        "exported the LoRA adapters of {} ({} modules, {} tensors) to {}",
        dir.display(),
        adapters.modules.len(),
        adapters.tensors.len(),
        out.display()
    );
    Ok(())
}

/// Write `checkpoint` (a run folder or a step folder) to `out` in Hugging Face layout: weights
/// (sharded above `max_shard_bytes`, with `model.safetensors.index.json`), config.json,
/// generation_config.json and the tokenizer files.
pub fn export_hf(
    checkpoint: &Path,
    out: &Path,
    force: bool,
    dtype: StoreDtype,
    max_shard_bytes: usize,
    merge_adapters: bool,
) -> Result<()> {
    let source = read_source(checkpoint, merge_adapters)?;
    check_target(out, &source.dir, force)?;
    publish_folder(out, |staged| write_hf(&source, dtype, max_shard_bytes, |name, bytes| write_into(staged, name, bytes)))?;
    println!(
        "exported {} ({:?}, {} tensors, {}) to {}",
        source.dir.display(),
        source.arch,
        source.hf.len(),
        dtype.torch_name(),
        out.display()
    );
    Ok(())
}

/// The files of a Hugging Face model folder, each handed to `write`.
fn write_hf(source: &Source, dtype: StoreDtype, max_shard_bytes: usize, write: impl Fn(&str, &[u8]) -> Result<()>) -> Result<()> {
    let Source { tokenizer, config, hf, .. } = source;

    let shards = shard(hf, dtype, max_shard_bytes);
    if shards.len() == 1 {
        write("model.safetensors", &to_safetensors_as(&shards[0], dtype))?;
    } else {
        let mut weight_map = serde_json::Map::new();
        let total: usize = hf.values().map(|t| t.data.len() * dtype.bytes()).sum();
        for (i, part) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
            write(&name, &to_safetensors_as(part, dtype))?;
            for key in part.keys() {
                weight_map.insert(key.clone(), json!(name));
            }
        }
        let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        write("model.safetensors.index.json", serde_json::to_string_pretty(&index)?.as_bytes())?;
    }

    // Furnace separates documents with the end-of-text token and starts prompts with it, so it
    // serves as both bos and eos.
    let (eos, pad) = (tokenizer.eos(), tokenizer.pad());
    let hf_config = config_to_hf(config, eos, eos, pad, dtype.torch_name()).map_err(anyhow::Error::msg)?;
    write("config.json", serde_json::to_string_pretty(&hf_config)?.as_bytes())?;
    let mut generation = json!({ "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad });
    if let furnace_models::ModelConfig::T5(_) = config {
        generation["decoder_start_token_id"] = json!(pad);
    }
    write("generation_config.json", serde_json::to_string_pretty(&generation)?.as_bytes())?;
    write("tokenizer.json", tokenizer.to_json().as_bytes())?;
    let eos_text = tokenizer.decode_special(eos);
    let mut tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_text,
        "eos_token": eos_text,
        "pad_token": tokenizer.decode_special(pad),
        "model_max_length": config.max_seq_len(),
        "clean_up_tokenization_spaces": false,
        "add_bos_token": false,
    });
    // transformers' fill-mask pipeline finds the placeholder through `mask_token`.
    if let Some(mask) = tokenizer.mask() {
        tokenizer_config["mask_token"] = json!(tokenizer.decode_special(mask));
    }
    write("tokenizer_config.json", serde_json::to_string_pretty(&tokenizer_config)?.as_bytes())
}

/// Refuse an `--out` that would destroy what the user did not ask to replace: the checkpoint
/// being exported (or a folder holding it), anything inside a run's `checkpoints/`, a symbolic
/// link or a device; an existing file or folder is replaced only with `--force`.
fn check_target(out: &Path, source: &Path, force: bool) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(out) {
        if meta.file_type().is_symlink() {
            bail!(
                "--out {} is a symbolic link; Furnace does not write through or replace links: give the path it points to",
                out.display()
            );
        }
        if !meta.is_file() && !meta.is_dir() {
            bail!("--out {} is not a regular file or folder (a device, pipe or socket); choose a new path", out.display());
        }
    }
    let target = absolute(out)?;
    let source = source.canonicalize().with_context(|| format!("cannot resolve {}", source.display()))?;
    if target.starts_with(&source) || source.starts_with(&target) {
        bail!("--out {} would overwrite the checkpoint it exports ({}); choose a path outside it", out.display(), source.display());
    }
    if let Some(inside) =
        target.ancestors().find(|a| a.file_name().is_some_and(|n| n == "checkpoints") || a.join(checkpoint::STATE_FILE).is_file())
    {
        bail!("--out {} is inside {}, where a run keeps its checkpoints; choose a path outside it", out.display(), inside.display());
    }
    if out.exists() && !force {
        bail!("--out {} exists; pass --force to replace it (the export is written beside it first, then swapped in)", out.display());
    }
    Ok(())
}

/// `path` made absolute with its existing part's links resolved (the rest need not exist yet).
fn absolute(path: &Path) -> Result<std::path::PathBuf> {
    let path = std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))?;
    let existing = path.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    let rest = path.strip_prefix(existing).unwrap_or(Path::new(""));
    Ok(existing.canonicalize().with_context(|| format!("cannot resolve {}", existing.display()))?.join(rest))
}

/// Build a folder export in a hidden staging folder beside `out`, then swap it in: `out` holds
/// the old export or the new one, and a failed export leaves nothing behind.
fn publish_folder(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = out.file_name().and_then(|n| n.to_str()).with_context(|| format!("--out {} has no folder name", out.display()))?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    let staged = parent.join(format!(".{name}.export-{}", std::process::id()));
    let replaced = parent.join(format!(".{name}.replaced-{}", std::process::id()));
    let built = (|| {
        if staged.exists() {
            std::fs::remove_dir_all(&staged)?;
        }
        std::fs::create_dir(&staged).with_context(|| format!("cannot create {}", staged.display()))?;
        fill(&staged)?;
        sync_dir(&staged)?;
        if out.exists() {
            std::fs::rename(out, &replaced).with_context(|| format!("cannot move {} aside", out.display()))?;
        }
        std::fs::rename(&staged, out).with_context(|| format!("cannot move the export into {}", out.display()))
    })();
    if let Err(err) = built {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(err.context(format!("exporting to {} failed; nothing was written there", out.display())));
    }
    if replaced.exists() {
        std::fs::remove_dir_all(&replaced).with_context(|| format!("cannot remove the replaced export {}", replaced.display()))?;
    }
    sync_dir(parent).with_context(|| format!("cannot sync {}", parent.display()))
}

/// One file of a staged export, fsynced (the folder is renamed into place as a whole).
fn write_into(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    write_synced(&dir.join(name), bytes).with_context(|| format!("cannot write {}", dir.join(name).display()))
}

/// `general.file_type` for a quantization choice.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q8_0 => 7,
    }
}

/// Write `checkpoint` as a GGUF file llama.cpp loads (Llama architecture). Matrices whose rows
/// are a multiple of 32 take `quant`; norms stay f32, as llama.cpp's converter keeps them.
pub fn export_gguf(checkpoint: &Path, out: &Path, force: bool, quant: GgmlType, merge_adapters: bool) -> Result<()> {
    let Source { dir, recipe, tokenizer, config, arch, hf } = read_source(checkpoint, merge_adapters)?;
    check_target(out, &dir, force)?;
    let (Some(c), Some(architecture)) = (config.as_decoder(), gguf_architecture(arch)) else {
        anyhow::bail!("GGUF export of {} is not available yet: Llama, Mixtral and GPT-2 are written so far", dir.display());
    };
    let mut g = Gguf::default();
    let mut meta = |k: &str, v: Value| g.metadata.insert(k.to_string(), v);
    meta("general.architecture", Value::Str(architecture.into()));
    meta("general.name", Value::Str(recipe.run.name.clone()));
    meta("general.file_type", Value::U32(file_type(quant)));
    meta("general.quantization_version", Value::U32(2));
    meta("general.alignment", Value::U32(crate::gguf::ALIGNMENT as u32));
    for (key, value) in gguf_metadata(arch, c) {
        meta(key, value);
    }
    let vocab = gguf_vocabulary(&tokenizer, c.vocab_size)?;
    meta("tokenizer.ggml.model", Value::Str("gpt2".into()));
    meta("tokenizer.ggml.pre", Value::Str("default".into()));
    meta("tokenizer.ggml.tokens", Value::ArrStr(vocab.tokens));
    meta("tokenizer.ggml.token_type", Value::ArrI32(vocab.types));
    meta("tokenizer.ggml.merges", Value::ArrStr(vocab.merges));
    meta("tokenizer.ggml.bos_token_id", Value::U32(tokenizer.eos()));
    meta("tokenizer.ggml.eos_token_id", Value::U32(tokenizer.eos()));
    meta("tokenizer.ggml.padding_token_id", Value::U32(tokenizer.eos()));
    meta("tokenizer.ggml.add_bos_token", Value::Bool(true));
    // The whole tokenizer too (a key of the GGUF spec), so Furnace reads it back exactly.
    meta("tokenizer.huggingface.json", Value::Str(tokenizer.to_json()));
    let tensors = to_gguf_tensors(arch, &hf, c)?;
    for (name, tensor) in tensors {
        let dims: Vec<usize> = tensor.shape.iter().rev().copied().collect();
        // The router and position table stay f32, as llama.cpp's converter keeps them.
        let kept_f32 = ["ffn_gate_inp.weight", "position_embd.weight"].iter().any(|s| name.ends_with(s));
        let quantizable = dims.len() >= 2 && dims[0].is_multiple_of(32) && !kept_f32;
        let ty = if quantizable { quant } else { GgmlType::F32 };
        g.tensors.push((name, GgufTensor { dims, ty, bytes: encode(&tensor.data, ty) }));
    }
    atomic_write(out, &g.to_bytes()).with_context(|| format!("cannot write {}", out.display()))?;
    println!("exported {} ({architecture}, {:?}, {} tensors) to {}", dir.display(), quant, g.tensors.len(), out.display());
    Ok(())
}

struct GgufVocabulary {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
}

/// Tokens in id order (padded to the model's vocabulary), their types (1 normal, 3 control)
/// and the BPE merges, read from the tokenizer.json.
fn gguf_vocabulary(tokenizer: &TextTokenizer, vocab_size: usize) -> Result<GgufVocabulary> {
    let json: serde_json::Value = serde_json::from_str(&tokenizer.to_json())?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        anyhow::bail!("GGUF export needs a BPE tokenizer; this one is {:?}", model["type"]);
    }
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![1i32; vocab_size];
    for (token, id) in model["vocab"].as_object().context("tokenizer.json has no model.vocab")? {
        let id = id.as_u64().context("token ids are integers")? as usize;
        if id < vocab_size {
            tokens[id] = token.clone();
        }
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let id = added["id"].as_u64().unwrap_or(0) as usize;
        if id < vocab_size {
            tokens[id] = added["content"].as_str().unwrap_or_default().to_string();
            if added["special"].as_bool() == Some(true) {
                types[id] = 3;
            }
        }
    }
    for (id, token) in tokens.iter().enumerate() {
        if token.starts_with("[PAD") && id >= tokenizer.vocab_size() {
            types[id] = 5; // unused
        }
    }
    let merges = model["merges"]
        .as_array()
        .context("tokenizer.json has no model.merges")?
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(pair) => format!("{} {}", pair[0].as_str().unwrap_or_default(), pair[1].as_str().unwrap_or_default()),
            other => other.as_str().unwrap_or_default().to_string(),
        })
        .collect();
    Ok(GgufVocabulary { tokens, types, merges })
}

/// Split tensors, in name order, into groups of at most `max_bytes` (a larger tensor alone).
fn shard(tensors: &NamedTensors, dtype: StoreDtype, max_bytes: usize) -> Vec<NamedTensors> {
    let mut shards = vec![NamedTensors::new()];
    let mut size = 0;
    for (name, tensor) in tensors {
        let bytes = tensor.data.len() * dtype.bytes();
        if size + bytes > max_bytes && !shards.last().unwrap().is_empty() {
            shards.push(NamedTensors::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().unwrap().insert(name.clone(), tensor.clone());
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;
    use furnace_core::params::HostTensor;

    #[test]
    fn shards_respect_the_size_limit_and_keep_every_tensor() {
        let mut tensors = NamedTensors::new();
        for i in 0..5 {
            tensors.insert(format!("t{i}"), HostTensor { shape: vec![10], data: vec![i as f32; 10] });
        }
        let shards = shard(&tensors, StoreDtype::F32, 80);
        assert_eq!(shards.len(), 3);
        assert!(shards.iter().all(|s| s.values().map(|t| t.data.len() * 4).sum::<usize>() <= 80));
        assert_eq!(shards.iter().map(|s| s.len()).sum::<usize>(), 5);
    }
}
