//! llama.cpp's layouts of a GGUF file, both ways, for its `llama` architecture (Llama, and
//! Mixtral with its experts stacked into one tensor per layer and matrix; Q/K rows permuted for
//! its RoPE) and its `gpt2` architecture (fused QKV, learned positions, LayerNorm biases;
//! Conv1D weights transposed to nn.Linear's layout): tensor names and `<arch>.*` keys; and such
//! a file read back into Hugging Face tensors, a model config and a tokenizer
//! (`model.init_from = "x.gguf"`, `generate --checkpoint x.gguf`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use furnace_core::params::{HostTensor, NamedTensors};
use furnace_models::blocks::{MlpKind, NormKind};
use furnace_models::hf::HfArch;
use furnace_models::{DecoderConfig, ModelConfig, MoeConfig, PositionKind};
use serde_json::json;

use crate::gguf::{decode, Gguf, Value};

/// Hugging Face names of the tensors outside the layers, and inside each layer, with their
/// GGUF names (`blk.N.` prefixed for layers).
const GLOBAL_NAMES: &[(&str, &str)] =
    &[("model.embed_tokens.weight", "token_embd.weight"), ("model.norm.weight", "output_norm.weight"), ("lm_head.weight", "output.weight")];
const GPT2_GLOBAL_NAMES: &[(&str, &str)] = &[
    ("transformer.wte.weight", "token_embd.weight"),
    ("transformer.wpe.weight", "position_embd.weight"),
    ("transformer.ln_f.weight", "output_norm.weight"),
    ("transformer.ln_f.bias", "output_norm.bias"),
    ("lm_head.weight", "output.weight"),
];
/// GPT-2's Conv1D weights (`[in, out]`) are transposed for GGUF, as llama.cpp's converter does.
const GPT2_LAYER_NAMES: &[(&str, &str)] = &[
    ("ln_1.weight", "attn_norm.weight"),
    ("ln_1.bias", "attn_norm.bias"),
    ("attn.c_attn.weight", "attn_qkv.weight"),
    ("attn.c_attn.bias", "attn_qkv.bias"),
    ("attn.c_proj.weight", "attn_output.weight"),
    ("attn.c_proj.bias", "attn_output.bias"),
    ("ln_2.weight", "ffn_norm.weight"),
    ("ln_2.bias", "ffn_norm.bias"),
    ("mlp.c_fc.weight", "ffn_up.weight"),
    ("mlp.c_fc.bias", "ffn_up.bias"),
    ("mlp.c_proj.weight", "ffn_down.weight"),
    ("mlp.c_proj.bias", "ffn_down.bias"),
];
const LAYER_NAMES: &[(&str, &str)] = &[
    ("input_layernorm.weight", "attn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"),
    ("self_attn.k_proj.weight", "attn_k.weight"),
    ("self_attn.v_proj.weight", "attn_v.weight"),
    ("self_attn.o_proj.weight", "attn_output.weight"),
    ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp.down_proj.weight", "ffn_down.weight"),
    ("block_sparse_moe.gate.weight", "ffn_gate_inp.weight"),
];
/// Mixtral's per-expert matrices and the stacked GGUF tensor each goes into.
const EXPERT_NAMES: &[(&str, &str)] = &[("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")];

/// The name tables of a layout and the prefix of its Hugging Face layer names.
fn tables(gpt2: bool) -> (&'static [(&'static str, &'static str)], &'static [(&'static str, &'static str)], &'static str) {
    if gpt2 {
        (GPT2_GLOBAL_NAMES, GPT2_LAYER_NAMES, "transformer.h.")
    } else {
        (GLOBAL_NAMES, LAYER_NAMES, "model.layers.")
    }
}

fn gguf_name(hf: &str, gpt2: bool) -> Option<String> {
    let (global, layers, prefix) = tables(gpt2);
    if let Some((_, g)) = global.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let (layer, part) = hf.strip_prefix(prefix)?.split_once('.')?;
    let (_, g) = layers.iter().find(|(h, _)| *h == part)?;
    Some(format!("blk.{layer}.{g}"))
}

fn hf_name(gguf: &str, gpt2: bool) -> Option<String> {
    let (global, layers, prefix) = tables(gpt2);
    if let Some((h, _)) = global.iter().find(|(_, g)| *g == gguf) {
        return Some(h.to_string());
    }
    let (layer, part) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (h, _) = layers.iter().find(|(_, g)| *g == part)?;
    Some(format!("{prefix}{layer}.{h}"))
}

/// A GPT-2 Conv1D weight, stored `[in, out]` by Hugging Face and `[out, in]` in GGUF.
fn is_conv1d_weight(gguf: &str) -> bool {
    ["attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight"].iter().any(|s| gguf.ends_with(s))
}

/// llama.cpp applies RoPE to adjacent pairs, Hugging Face to the two halves of each head:
/// reorder each head's rows from (half, i) to (i, half), as llama.cpp's converter does
/// (`inverse` undoes it).
fn permute_rope_rows(t: &HostTensor, heads: usize, inverse: bool) -> HostTensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let head_dim = rows / heads;
    let mut data = vec![0.0; t.data.len()];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..head_dim / 2 {
                let hf_row = h * head_dim + half * head_dim / 2 + i;
                let gguf_row = h * head_dim + i * 2 + half;
                let (from, to) = if inverse { (gguf_row, hf_row) } else { (hf_row, gguf_row) };
                data[to * cols..(to + 1) * cols].copy_from_slice(&t.data[from * cols..(from + 1) * cols]);
            }
        }
    }
    HostTensor { shape: t.shape.clone(), data }
}

/// llama.cpp's architecture for a Hugging Face layout, or None when it has no GGUF layout here.
pub fn gguf_architecture(arch: HfArch) -> Option<&'static str> {
    match arch {
        HfArch::Llama | HfArch::Mixtral { .. } => Some("llama"),
        HfArch::Gpt2 => Some("gpt2"),
        HfArch::Mamba | HfArch::Bert | HfArch::T5 { .. } => None,
    }
}

/// The model's hyper-parameters as llama.cpp's `<arch>.*` keys.
pub fn gguf_metadata(arch: HfArch, c: &DecoderConfig) -> Vec<(&'static str, Value)> {
    if arch == HfArch::Gpt2 {
        return vec![
            ("gpt2.context_length", Value::U32(c.max_seq_len as u32)),
            ("gpt2.embedding_length", Value::U32(c.d_model as u32)),
            ("gpt2.block_count", Value::U32(c.n_layers as u32)),
            ("gpt2.feed_forward_length", Value::U32(c.d_ff as u32)),
            ("gpt2.attention.head_count", Value::U32(c.n_heads as u32)),
            ("gpt2.attention.layer_norm_epsilon", Value::F32(c.norm_eps as f32)),
        ];
    }
    let mut meta = vec![
        ("llama.context_length", Value::U32(c.max_seq_len as u32)),
        ("llama.embedding_length", Value::U32(c.d_model as u32)),
        ("llama.block_count", Value::U32(c.n_layers as u32)),
        ("llama.feed_forward_length", Value::U32(c.d_ff as u32)),
        ("llama.attention.head_count", Value::U32(c.n_heads as u32)),
        ("llama.attention.head_count_kv", Value::U32(c.kv_heads() as u32)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(c.norm_eps as f32)),
        ("llama.rope.freq_base", Value::F32(c.rope_theta as f32)),
        ("llama.rope.dimension_count", Value::U32(c.head_dim() as u32)),
        ("llama.vocab_size", Value::U32(c.vocab_size as u32)),
    ];
    if let Some(moe) = &c.moe {
        meta.push(("llama.expert_count", Value::U32(moe.n_experts as u32)));
        meta.push(("llama.expert_used_count", Value::U32(moe.experts_per_token as u32)));
    }
    meta
}

/// Hugging Face tensors (Llama, Mixtral or GPT-2 names) as GGUF tensors, in llama.cpp's layout.
pub fn to_gguf_tensors(arch: HfArch, hf: &NamedTensors, c: &DecoderConfig) -> Result<Vec<(String, HostTensor)>> {
    let gpt2 = arch == HfArch::Gpt2;
    let mut tensors = Vec::new();
    for (hf_name, tensor) in hf {
        if hf_name.contains(".block_sparse_moe.experts.") {
            continue;
        }
        let name = gguf_name(hf_name, gpt2).with_context(|| format!("no GGUF name for `{hf_name}`"))?;
        let tensor = match name.rsplit('.').nth(1) {
            _ if gpt2 && is_conv1d_weight(&name) => tensor.transposed(),
            Some("attn_q") if !gpt2 => permute_rope_rows(tensor, c.n_heads, false),
            Some("attn_k") if !gpt2 => permute_rope_rows(tensor, c.kv_heads(), false),
            _ => tensor.clone(),
        };
        tensors.push((name, tensor));
    }
    // llama.cpp keeps a layer's experts as one 3-D tensor per matrix, experts outermost.
    let n_experts = c.moe.as_ref().map_or(0, |m| m.n_experts);
    for layer in 0..if n_experts > 0 { c.n_layers } else { 0 } {
        for (hf_part, gguf_part) in EXPERT_NAMES {
            let experts: Vec<&HostTensor> = (0..n_experts)
                .map(|e| {
                    let name = format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{hf_part}.weight");
                    hf.get(&name).with_context(|| format!("the checkpoint lacks `{name}`"))
                })
                .collect::<Result<_>>()?;
            let mut shape = vec![n_experts];
            shape.extend(&experts[0].shape);
            let data = experts.iter().flat_map(|t| t.data.iter().copied()).collect();
            tensors.push((format!("blk.{layer}.{gguf_part}.weight"), HostTensor { shape, data }));
        }
    }
    Ok(tensors)
}

/// A GGUF file read back: the Hugging Face layout it came from, its config, its tensors under
/// Hugging Face names (dequantized to f32) and its tokenizer as a tokenizer.json.
pub struct GgufModel {
    pub arch: HfArch,
    pub config: ModelConfig,
    pub hf: NamedTensors,
    pub tokenizer_json: String,
}

pub fn read_gguf(path: &Path) -> Result<GgufModel> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let gguf = Gguf::from_bytes(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let at = |key: &str| format!("{}: metadata `{key}`", path.display());
    let text = |key: &str| match gguf.metadata.get(key) {
        Some(Value::Str(s)) => Ok(s.clone()),
        _ => bail!("{} is missing or not a string", at(key)),
    };
    let number = |key: &str| match gguf.metadata.get(key) {
        Some(Value::U32(v)) => Ok(*v as f64),
        Some(Value::I32(v)) => Ok(*v as f64),
        Some(Value::F32(v)) => Ok(*v as f64),
        _ => bail!("{} is missing or not a number", at(key)),
    };
    let architecture = text("general.architecture")?;
    let gpt2 = match architecture.as_str() {
        "llama" => false,
        "gpt2" => true,
        other => bail!("{}: architecture `{other}` cannot be read yet (llama, Mixtral-as-llama and gpt2 can)", path.display()),
    };
    let mut hf = NamedTensors::new();
    for (name, tensor) in &gguf.tensors {
        let shape: Vec<usize> = tensor.dims.iter().rev().copied().collect();
        let host = HostTensor { data: decode(&tensor.bytes, tensor.ty), shape };
        if let Some(expert_part) = EXPERT_NAMES.iter().find(|(_, g)| name.ends_with(&format!(".{g}.weight"))) {
            let layer = name.trim_start_matches("blk.").split('.').next().unwrap_or_default();
            let per_expert: usize = host.shape[1..].iter().product();
            for (e, values) in host.data.chunks(per_expert).enumerate() {
                let name = format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{}.weight", expert_part.0);
                hf.insert(name, HostTensor { shape: host.shape[1..].to_vec(), data: values.to_vec() });
            }
            continue;
        }
        let hf_name =
            hf_name(name, gpt2).with_context(|| format!("{}: tensor `{name}` has no place in a {architecture} model", path.display()))?;
        hf.insert(hf_name, if gpt2 && is_conv1d_weight(name) { host.transposed() } else { host });
    }
    if gpt2 {
        let wte = hf.get("transformer.wte.weight").with_context(|| format!("{}: no token_embd.weight", path.display()))?;
        let config = DecoderConfig::new(
            wte.shape[0],
            number("gpt2.embedding_length")? as usize,
            number("gpt2.block_count")? as usize,
            number("gpt2.attention.head_count")? as usize,
            number("gpt2.feed_forward_length")? as usize,
            number("gpt2.context_length")? as usize,
        )
        .with_norm(NormKind::LayerNorm)
        .with_norm_eps(number("gpt2.attention.layer_norm_epsilon")?)
        .with_position(PositionKind::Learned)
        .with_mlp(MlpKind::Gelu)
        .with_bias(true)
        .with_tie_embeddings(!hf.contains_key("lm_head.weight"));
        let tokenizer_json = tokenizer_json(&gguf).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok(GgufModel { arch: HfArch::Gpt2, config: ModelConfig::Gpt2(config), hf, tokenizer_json });
    }
    let (n_heads, n_kv_heads) = (number("llama.attention.head_count")? as usize, number("llama.attention.head_count_kv")? as usize);
    for (name, tensor) in hf.iter_mut() {
        if name.ends_with("self_attn.q_proj.weight") {
            *tensor = permute_rope_rows(tensor, n_heads, true);
        } else if name.ends_with("self_attn.k_proj.weight") {
            *tensor = permute_rope_rows(tensor, n_kv_heads, true);
        }
    }
    let embedding = hf.get("model.embed_tokens.weight").with_context(|| format!("{}: no token_embd.weight", path.display()))?;
    let config = DecoderConfig::new(
        embedding.shape[0],
        number("llama.embedding_length")? as usize,
        number("llama.block_count")? as usize,
        n_heads,
        number("llama.feed_forward_length")? as usize,
        number("llama.context_length")? as usize,
    )
    .with_n_kv_heads(n_kv_heads)
    .with_norm_eps(number("llama.attention.layer_norm_rms_epsilon")?)
    .with_rope_theta(number("llama.rope.freq_base").unwrap_or(10000.0))
    .with_tie_embeddings(!hf.contains_key("lm_head.weight"));
    if let Ok(n_experts) = number("llama.expert_count") {
        let moe = MoeConfig::new().with_n_experts(n_experts as usize).with_experts_per_token(number("llama.expert_used_count")? as usize);
        let tokenizer_json = tokenizer_json(&gguf).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let arch = HfArch::Mixtral { n_experts: moe.n_experts };
        return Ok(GgufModel { arch, config: ModelConfig::Mixtral(config.with_moe(Some(moe))), hf, tokenizer_json });
    }
    let tokenizer_json = tokenizer_json(&gguf).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(GgufModel { arch: HfArch::Llama, config: ModelConfig::Llama(config), hf, tokenizer_json })
}

/// The file's tokenizer: the whole tokenizer.json when it carries one, else one rebuilt from
/// its vocabulary.
fn tokenizer_json(gguf: &Gguf) -> Result<String, String> {
    match gguf.metadata.get("tokenizer.huggingface.json") {
        Some(Value::Str(json)) => Ok(json.clone()),
        _ => byte_level_bpe_tokenizer(gguf),
    }
}

/// A tokenizer.json for a GGUF `gpt2` (byte-level BPE) vocabulary: tokens, merges and control
/// tokens from `tokenizer.ggml.*`, GPT-2's byte-level pre-tokenizer and decoder.
fn byte_level_bpe_tokenizer(gguf: &Gguf) -> Result<String, String> {
    let get = |key: &str| gguf.metadata.get(key).ok_or_else(|| format!("metadata `{key}` is missing"));
    match get("tokenizer.ggml.model")? {
        Value::Str(model) if model == "gpt2" => {}
        other => return Err(format!("tokenizer model {other:?} cannot be read yet (gpt2, byte-level BPE, can)")),
    }
    let (Value::ArrStr(tokens), Value::ArrStr(merges)) = (get("tokenizer.ggml.tokens")?, get("tokenizer.ggml.merges")?) else {
        return Err("tokenizer.ggml.tokens and tokenizer.ggml.merges must be string arrays".into());
    };
    let types = match gguf.metadata.get("tokenizer.ggml.token_type") {
        Some(Value::ArrI32(types)) => types.clone(),
        _ => vec![1; tokens.len()],
    };
    // Type 5 marks unused rows (vocabulary padding), 3 control tokens.
    let kept = tokens.iter().zip(&types).enumerate().filter(|(_, (_, &ty))| ty != 5);
    let vocab: serde_json::Map<String, serde_json::Value> = kept.clone().map(|(id, (token, _))| (token.clone(), json!(id))).collect();
    let added: Vec<_> = kept
        .filter(|(_, (_, &ty))| ty == 3)
        .map(|(id, (token, _))| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    Ok(json!({
        "version": "1.0",
        "added_tokens": added,
        "pre_tokenizer": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false},
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capability_table_says_which_architectures_gguf_writes() {
        let archs = [
            HfArch::Llama,
            HfArch::Gpt2,
            HfArch::Mamba,
            HfArch::Mixtral { n_experts: 4 },
            HfArch::Bert,
            HfArch::T5 { n_decoder_layers: 2, gated: true },
        ];
        for arch in archs {
            let declared = furnace_configs::capabilities::capabilities(arch.arch()).gguf_export;
            assert_eq!(gguf_architecture(arch).is_some(), declared, "{arch:?}");
        }
    }

    #[test]
    fn names_and_rope_rows_round_trip() {
        for gpt2 in [false, true] {
            let (global, layers, prefix) = tables(gpt2);
            for (hf, _) in global {
                assert_eq!(hf_name(&gguf_name(hf, gpt2).unwrap(), gpt2).unwrap(), *hf);
            }
            for (part, _) in layers {
                let hf = format!("{prefix}3.{part}");
                assert_eq!(hf_name(&gguf_name(&hf, gpt2).unwrap(), gpt2).unwrap(), hf);
            }
        }
        let t = HostTensor { shape: vec![16, 3], data: (0..48).map(|v| v as f32).collect() };
        let permuted = permute_rope_rows(&t, 2, false);
        assert_ne!(permuted, t);
        // Head 0's row 1 (first half, i = 1) goes to row 2 (pair 1, first element).
        assert_eq!(permuted.data[6..9], t.data[3..6]);
        assert_eq!(permute_rope_rows(&permuted, 2, true), t);
    }

    /// A GGUF from elsewhere has no tokenizer.json inside: its byte-level BPE vocabulary and
    /// merges make one that encodes as the original does.
    #[test]
    fn a_gguf_vocabulary_becomes_a_working_tokenizer() {
        let docs: Vec<String> = (0..200).map(|i| format!("the cat {i} sat on the mat near the hat")).collect();
        let original = furnace_data::TextTokenizer::train(&docs, 300, furnace_data::tokenizer::ExtraTokens::None).unwrap();
        let json: serde_json::Value = serde_json::from_str(&original.to_json()).unwrap();
        let mut tokens = vec![String::new(); original.vocab_size()];
        for (token, id) in json["model"]["vocab"].as_object().unwrap() {
            tokens[id.as_u64().unwrap() as usize] = token.clone();
        }
        let mut types = vec![1; tokens.len()];
        types[original.eos() as usize] = 3;
        tokens.push("[PAD999]".into());
        types.push(5);
        let merges = json["model"]["merges"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                m.as_array()
                    .map_or_else(|| m.as_str().unwrap().to_string(), |p| format!("{} {}", p[0].as_str().unwrap(), p[1].as_str().unwrap()))
            })
            .collect();
        let mut gguf = Gguf::default();
        gguf.metadata.insert("tokenizer.ggml.model".into(), Value::Str("gpt2".into()));
        gguf.metadata.insert("tokenizer.ggml.tokens".into(), Value::ArrStr(tokens));
        gguf.metadata.insert("tokenizer.ggml.token_type".into(), Value::ArrI32(types));
        gguf.metadata.insert("tokenizer.ggml.merges".into(), Value::ArrStr(merges));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, byte_level_bpe_tokenizer(&gguf).unwrap()).unwrap();
        let rebuilt = furnace_data::TextTokenizer::load(&path).unwrap();
        // Words (GPT-2's byte-level pre-tokenizer splits numbers as words, not digit by digit).
        let text = "the cat sat on the mat";
        assert_eq!(rebuilt.encode(text), original.encode(text));
        assert_eq!(rebuilt.decode(&rebuilt.encode(text)), text);
        assert_eq!(rebuilt.eos(), original.eos());
    }
}
