//! `furnace export`: a checkpoint as a Hugging Face model folder that
//! `transformers.AutoModelForCausalLM.from_pretrained` loads offline.

use std::path::Path;

use anyhow::{Context, Result};
use furnace_configs::fsutil::atomic_write;
use furnace_configs::Recipe;
use furnace_data::TextTokenizer;
use furnace_models::hf::{config_to_hf, hf_arch_for, to_hf};
use furnace_models::params::{from_safetensors, to_safetensors_as, NamedTensors, StoreDtype};
use serde_json::json;

use crate::checkpoint::{self, MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE};
use crate::train::decoder_config;

/// Write `checkpoint` (a run folder or a step folder) to `out` in Hugging Face layout: weights
/// (sharded above `max_shard_bytes`, with `model.safetensors.index.json`), config.json,
/// generation_config.json and the tokenizer files.
pub fn export_hf(checkpoint: &Path, out: &Path, dtype: StoreDtype, max_shard_bytes: usize) -> Result<()> {
    let dir = checkpoint::resolve(checkpoint)?;
    let recipe_path = dir.join(RECIPE_FILE);
    let recipe = Recipe::from_stored(&std::fs::read_to_string(&recipe_path).with_context(|| format!("cannot read {}", recipe_path.display()))?, &recipe_path.display().to_string())?;
    let tokenizer = TextTokenizer::load(&dir.join(TOKENIZER_FILE)).map_err(anyhow::Error::msg)?;
    let config = decoder_config(&recipe.model.resolve(Some(tokenizer.vocab_size())));
    let arch = hf_arch_for(&config).map_err(|e| anyhow::anyhow!("cannot export {} to Hugging Face: {e}", dir.display()))?;
    let weights = from_safetensors(&std::fs::read(dir.join(MODEL_FILE))?).map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(MODEL_FILE).display()))?;
    let hf = to_hf(arch, &weights, config.n_layers).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let write = |name: &str, bytes: &[u8]| atomic_write(&out.join(name), bytes).with_context(|| format!("cannot write {}", out.join(name).display()));

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
    let eos = tokenizer.eos();
    let hf_config = config_to_hf(&config, eos, eos, dtype.torch_name()).map_err(anyhow::Error::msg)?;
    write("config.json", serde_json::to_string_pretty(&hf_config)?.as_bytes())?;
    let generation = json!({ "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos });
    write("generation_config.json", serde_json::to_string_pretty(&generation)?.as_bytes())?;
    write("tokenizer.json", tokenizer.to_json().as_bytes())?;
    let eos_text = tokenizer.decode_special(eos);
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_text,
        "eos_token": eos_text,
        "pad_token": eos_text,
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": false,
        "add_bos_token": false,
    });
    write("tokenizer_config.json", serde_json::to_string_pretty(&tokenizer_config)?.as_bytes())?;
    println!(
        "exported {} ({:?}, {} tensors, {}) to {}",
        dir.display(),
        arch,
        hf.len(),
        dtype.torch_name(),
        out.display()
    );
    Ok(())
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
    use furnace_models::params::HostTensor;

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
