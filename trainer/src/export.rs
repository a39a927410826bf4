//! `furnace export`: a checkpoint as a Hugging Face model folder that
//! `transformers.AutoModelForCausalLM.from_pretrained` loads offline, as a GGUF file for
//! llama.cpp, or (LoRA runs) as a PEFT adapter folder.

use std::path::Path;

use anyhow::{bail, Context, Result};
use furnace_configs::Recipe;
use furnace_configs::TrainMode;
use furnace_core::fsutil::atomic_write;
use furnace_core::params::{from_safetensors, to_safetensors_as, HostTensor, NamedTensors, StoreDtype};
use furnace_data::TextTokenizer;
use furnace_models::hf::{config_to_hf, hf_arch_for, to_hf, to_peft, HfArch};
use furnace_models::lora::{has_lora, merge_lora, LoraInit};
use furnace_models::nf4::Nf4Matrix;
use serde_json::json;

use crate::checkpoint::{self, MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE};
use crate::gguf::{encode, GgmlType, Gguf, GgufTensor, Value};
use crate::gguf_layout::{gguf_architecture, gguf_metadata, to_gguf_tensors};
use crate::model::{base_for, lora_config, model_config};

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
    let dir = checkpoint::resolve(checkpoint)?;
    let recipe_path = dir.join(RECIPE_FILE);
    let recipe = Recipe::from_stored(
        &std::fs::read_to_string(&recipe_path).with_context(|| format!("cannot read {}", recipe_path.display()))?,
        &recipe_path.display().to_string(),
    )?;
    let tokenizer = TextTokenizer::load(&dir.join(TOKENIZER_FILE)).map_err(anyhow::Error::msg)?;
    let config = model_config(&recipe.model.resolve(Some(tokenizer.vocab_size())));
    let mut weights =
        from_safetensors(&std::fs::read(dir.join(MODEL_FILE))?).map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(MODEL_FILE).display()))?;
    // QLoRA checkpoints leave out the NF4 base layers: what trained was their dequantization.
    for (name, tensor) in base_for(&recipe)?.unwrap_or_default() {
        if !weights.contains_key(&name) {
            let nf4 = Nf4Matrix::quantize(&tensor.data, [tensor.shape[0], tensor.shape[1]]);
            weights.insert(name, HostTensor { shape: tensor.shape, data: nf4.dequantize() });
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
pub fn export_peft(checkpoint: &Path, out: &Path) -> Result<()> {
    let (dir, recipe, _, config, weights) = read_checkpoint(checkpoint)?;
    let lora = lora_config(&recipe.lora).filter(|_| has_lora(&weights)).with_context(|| {
        format!("{} holds no LoRA adapters (its recipe has lora.r = 0); export the whole model with --format safetensors", dir.display())
    })?;
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
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        atomic_write(&out.join(name), bytes).with_context(|| format!("cannot write {}", out.join(name).display()))
    };
    write("adapter_model.safetensors", &to_safetensors_as(&adapters.tensors, StoreDtype::F32))?;
    write("adapter_config.json", serde_json::to_string_pretty(&config_json)?.as_bytes())?;
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
pub fn export_hf(checkpoint: &Path, out: &Path, dtype: StoreDtype, max_shard_bytes: usize, merge_adapters: bool) -> Result<()> {
    let Source { dir, tokenizer, config, arch, hf, .. } = read_source(checkpoint, merge_adapters)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        atomic_write(&out.join(name), bytes).with_context(|| format!("cannot write {}", out.join(name).display()))
    };

    let shards = shard(&hf, dtype, max_shard_bytes);
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
    let hf_config = config_to_hf(&config, eos, eos, pad, dtype.torch_name()).map_err(anyhow::Error::msg)?;
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
    write("tokenizer_config.json", serde_json::to_string_pretty(&tokenizer_config)?.as_bytes())?;
    println!("exported {} ({:?}, {} tensors, {}) to {}", dir.display(), arch, hf.len(), dtype.torch_name(), out.display());
    Ok(())
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
pub fn export_gguf(checkpoint: &Path, out: &Path, quant: GgmlType, merge_adapters: bool) -> Result<()> {
    let Source { dir, recipe, tokenizer, config, arch, hf } = read_source(checkpoint, merge_adapters)?;
    let (furnace_models::ModelConfig::Decoder(c), Some(architecture)) = (&config, gguf_architecture(arch)) else {
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
        let quantizable = dims.len() >= 2 && dims[0] % 32 == 0 && !kept_f32;
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
