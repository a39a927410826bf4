//! Hugging Face layouts. One table per architecture maps our parameter paths to transformers'
//! names; the same table drives import (`from_hf`) and export (`to_hf`).

use serde_json::Value;

use crate::bert::BertConfig;
use crate::blocks::{MlpKind, NormKind};
use crate::decoder::{DecoderConfig, PositionKind};
use crate::mamba::MambaConfig;
use crate::mixtral::MoeConfig;
use crate::model::ModelConfig;
use crate::t5::T5Config;
use furnace_core::params::{HostTensor, NamedTensors};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfArch {
    /// `LlamaForCausalLM`.
    Llama,
    /// `GPT2LMHeadModel`.
    Gpt2,
    /// `MambaForCausalLM`.
    Mamba,
    /// `MixtralForCausalLM` with this many experts per layer.
    Mixtral { n_experts: usize },
    /// `BertForMaskedLM`.
    Bert,
    /// `T5ForConditionalGeneration` with this many decoder blocks, its MLPs gated-GELU (T5
    /// v1.1) or ReLU.
    T5 { n_decoder_layers: usize, gated: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Same shape and order.
    Same,
    /// 2-D transpose: torch `nn.Linear` keeps `[out, in]`, we keep `[in, out]`.
    Transpose,
    /// Our tensors concatenated along the last axis (GPT-2's fused `c_attn`).
    Fused,
}

struct Rule {
    hf: &'static str,
    ours: &'static [&'static str],
    layout: Layout,
}

const fn rule(hf: &'static str, ours: &'static [&'static str], layout: Layout) -> Rule {
    Rule { hf, ours, layout }
}

use Layout::*;

/// `{i}` stands for the layer index, `{e}` for the expert index. Llama's embedding, attention,
/// norms and head; its MLP (or Mixtral's experts) follow in their own table.
const LLAMA_CORE: &[Rule] = &[
    rule("model.embed_tokens.weight", &["embed_tokens"], Same),
    rule("model.layers.{i}.input_layernorm.weight", &["layers.{i}.attention_norm.weight"], Same),
    rule("model.layers.{i}.self_attn.q_proj.weight", &["layers.{i}.attention.q_proj.weight"], Transpose),
    rule("model.layers.{i}.self_attn.k_proj.weight", &["layers.{i}.attention.k_proj.weight"], Transpose),
    rule("model.layers.{i}.self_attn.v_proj.weight", &["layers.{i}.attention.v_proj.weight"], Transpose),
    rule("model.layers.{i}.self_attn.o_proj.weight", &["layers.{i}.attention.o_proj.weight"], Transpose),
    rule("model.layers.{i}.self_attn.q_proj.bias", &["layers.{i}.attention.q_proj.bias"], Same),
    rule("model.layers.{i}.self_attn.k_proj.bias", &["layers.{i}.attention.k_proj.bias"], Same),
    rule("model.layers.{i}.self_attn.v_proj.bias", &["layers.{i}.attention.v_proj.bias"], Same),
    rule("model.layers.{i}.self_attn.o_proj.bias", &["layers.{i}.attention.o_proj.bias"], Same),
    rule("model.layers.{i}.post_attention_layernorm.weight", &["layers.{i}.ffn_norm.weight"], Same),
    rule("model.norm.weight", &["norm.weight"], Same),
    rule("lm_head.weight", &["lm_head.weight"], Transpose),
];

const LLAMA_MLP: &[Rule] = &[
    rule("model.layers.{i}.mlp.gate_proj.weight", &["layers.{i}.feed_forward.gate_proj.weight"], Transpose),
    rule("model.layers.{i}.mlp.up_proj.weight", &["layers.{i}.feed_forward.up_proj.weight"], Transpose),
    rule("model.layers.{i}.mlp.down_proj.weight", &["layers.{i}.feed_forward.down_proj.weight"], Transpose),
    rule("model.layers.{i}.mlp.gate_proj.bias", &["layers.{i}.feed_forward.gate_proj.bias"], Same),
    rule("model.layers.{i}.mlp.up_proj.bias", &["layers.{i}.feed_forward.up_proj.bias"], Same),
    rule("model.layers.{i}.mlp.down_proj.bias", &["layers.{i}.feed_forward.down_proj.bias"], Same),
];

/// Mixtral's sparse mixture of experts in place of Llama's MLP, in the per-expert layout
/// transformers saves (w1 = gate, w2 = down, w3 = up).
const MIXTRAL_EXPERTS: &[Rule] = &[
    rule("model.layers.{i}.block_sparse_moe.gate.weight", &["layers.{i}.feed_forward.router.weight"], Transpose),
    rule("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", &["layers.{i}.feed_forward.experts.{e}.gate_proj.weight"], Transpose),
    rule("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", &["layers.{i}.feed_forward.experts.{e}.down_proj.weight"], Transpose),
    rule("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", &["layers.{i}.feed_forward.experts.{e}.up_proj.weight"], Transpose),
];

/// GPT-2 uses `Conv1D`, whose weight is already `[in, out]`.
const GPT2: &[Rule] = &[
    rule("transformer.wte.weight", &["embed_tokens"], Same),
    rule("transformer.wpe.weight", &["embed_positions"], Same),
    rule("transformer.h.{i}.ln_1.weight", &["layers.{i}.attention_norm.weight"], Same),
    rule("transformer.h.{i}.ln_1.bias", &["layers.{i}.attention_norm.bias"], Same),
    rule(
        "transformer.h.{i}.attn.c_attn.weight",
        &["layers.{i}.attention.q_proj.weight", "layers.{i}.attention.k_proj.weight", "layers.{i}.attention.v_proj.weight"],
        Fused,
    ),
    rule(
        "transformer.h.{i}.attn.c_attn.bias",
        &["layers.{i}.attention.q_proj.bias", "layers.{i}.attention.k_proj.bias", "layers.{i}.attention.v_proj.bias"],
        Fused,
    ),
    rule("transformer.h.{i}.attn.c_proj.weight", &["layers.{i}.attention.o_proj.weight"], Same),
    rule("transformer.h.{i}.attn.c_proj.bias", &["layers.{i}.attention.o_proj.bias"], Same),
    rule("transformer.h.{i}.ln_2.weight", &["layers.{i}.ffn_norm.weight"], Same),
    rule("transformer.h.{i}.ln_2.bias", &["layers.{i}.ffn_norm.bias"], Same),
    rule("transformer.h.{i}.mlp.c_fc.weight", &["layers.{i}.feed_forward.up_proj.weight"], Same),
    rule("transformer.h.{i}.mlp.c_fc.bias", &["layers.{i}.feed_forward.up_proj.bias"], Same),
    rule("transformer.h.{i}.mlp.c_proj.weight", &["layers.{i}.feed_forward.down_proj.weight"], Same),
    rule("transformer.h.{i}.mlp.c_proj.bias", &["layers.{i}.feed_forward.down_proj.bias"], Same),
    rule("transformer.ln_f.weight", &["norm.weight"], Same),
    rule("transformer.ln_f.bias", &["norm.bias"], Same),
    rule("lm_head.weight", &["lm_head.weight"], Transpose),
];

/// Mamba's depthwise `conv1d.weight` is `[d_inner, 1, d_conv]` on both sides.
const MAMBA: &[Rule] = &[
    rule("backbone.embeddings.weight", &["embed_tokens"], Same),
    rule("backbone.layers.{i}.norm.weight", &["layers.{i}.norm.weight"], Same),
    rule("backbone.layers.{i}.mixer.in_proj.weight", &["layers.{i}.mixer.in_proj.weight"], Transpose),
    rule("backbone.layers.{i}.mixer.conv1d.weight", &["layers.{i}.mixer.conv_weight"], Same),
    rule("backbone.layers.{i}.mixer.conv1d.bias", &["layers.{i}.mixer.conv_bias"], Same),
    rule("backbone.layers.{i}.mixer.x_proj.weight", &["layers.{i}.mixer.x_proj.weight"], Transpose),
    rule("backbone.layers.{i}.mixer.dt_proj.weight", &["layers.{i}.mixer.dt_proj.weight"], Transpose),
    rule("backbone.layers.{i}.mixer.dt_proj.bias", &["layers.{i}.mixer.dt_proj.bias"], Same),
    rule("backbone.layers.{i}.mixer.A_log", &["layers.{i}.mixer.a_log"], Same),
    rule("backbone.layers.{i}.mixer.D", &["layers.{i}.mixer.d"], Same),
    rule("backbone.layers.{i}.mixer.out_proj.weight", &["layers.{i}.mixer.out_proj.weight"], Transpose),
    rule("backbone.norm_f.weight", &["norm.weight"], Same),
    rule("lm_head.weight", &["lm_head.weight"], Transpose),
];

/// BERT's masked-LM model; its decoder is tied to the word embeddings (see `IGNORED_SUFFIXES`).
const BERT: &[Rule] = &[
    rule("bert.embeddings.word_embeddings.weight", &["embed_tokens"], Same),
    rule("bert.embeddings.position_embeddings.weight", &["embed_positions"], Same),
    rule("bert.embeddings.token_type_embeddings.weight", &["embed_token_types"], Same),
    rule("bert.embeddings.LayerNorm.weight", &["embed_norm.weight"], Same),
    rule("bert.embeddings.LayerNorm.bias", &["embed_norm.bias"], Same),
    rule("bert.encoder.layer.{i}.attention.self.query.weight", &["layers.{i}.attention.q_proj.weight"], Transpose),
    rule("bert.encoder.layer.{i}.attention.self.query.bias", &["layers.{i}.attention.q_proj.bias"], Same),
    rule("bert.encoder.layer.{i}.attention.self.key.weight", &["layers.{i}.attention.k_proj.weight"], Transpose),
    rule("bert.encoder.layer.{i}.attention.self.key.bias", &["layers.{i}.attention.k_proj.bias"], Same),
    rule("bert.encoder.layer.{i}.attention.self.value.weight", &["layers.{i}.attention.v_proj.weight"], Transpose),
    rule("bert.encoder.layer.{i}.attention.self.value.bias", &["layers.{i}.attention.v_proj.bias"], Same),
    rule("bert.encoder.layer.{i}.attention.output.dense.weight", &["layers.{i}.attention.o_proj.weight"], Transpose),
    rule("bert.encoder.layer.{i}.attention.output.dense.bias", &["layers.{i}.attention.o_proj.bias"], Same),
    rule("bert.encoder.layer.{i}.attention.output.LayerNorm.weight", &["layers.{i}.attention_norm.weight"], Same),
    rule("bert.encoder.layer.{i}.attention.output.LayerNorm.bias", &["layers.{i}.attention_norm.bias"], Same),
    rule("bert.encoder.layer.{i}.intermediate.dense.weight", &["layers.{i}.feed_forward.up_proj.weight"], Transpose),
    rule("bert.encoder.layer.{i}.intermediate.dense.bias", &["layers.{i}.feed_forward.up_proj.bias"], Same),
    rule("bert.encoder.layer.{i}.output.dense.weight", &["layers.{i}.feed_forward.down_proj.weight"], Transpose),
    rule("bert.encoder.layer.{i}.output.dense.bias", &["layers.{i}.feed_forward.down_proj.bias"], Same),
    rule("bert.encoder.layer.{i}.output.LayerNorm.weight", &["layers.{i}.ffn_norm.weight"], Same),
    rule("bert.encoder.layer.{i}.output.LayerNorm.bias", &["layers.{i}.ffn_norm.bias"], Same),
    rule("cls.predictions.transform.dense.weight", &["mlm_dense.weight"], Transpose),
    rule("cls.predictions.transform.dense.bias", &["mlm_dense.bias"], Same),
    rule("cls.predictions.transform.LayerNorm.weight", &["mlm_norm.weight"], Same),
    rule("cls.predictions.transform.LayerNorm.bias", &["mlm_norm.bias"], Same),
    rule("cls.predictions.bias", &["mlm_bias"], Same),
];

/// T5: `{i}` indexes encoder blocks, `{j}` decoder blocks; the relative position bias lives in
/// each stack's first block. Attention projections have no bias; norms are RMS (weight only).
const T5_CORE: &[Rule] = &[
    rule("shared.weight", &["embed_tokens"], Same),
    rule("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", &["encoder_relative_bias"], Same),
    rule("encoder.block.{i}.layer.0.layer_norm.weight", &["encoder_layers.{i}.self_attention_norm.weight"], Same),
    rule("encoder.block.{i}.layer.0.SelfAttention.q.weight", &["encoder_layers.{i}.self_attention.q_proj.weight"], Transpose),
    rule("encoder.block.{i}.layer.0.SelfAttention.k.weight", &["encoder_layers.{i}.self_attention.k_proj.weight"], Transpose),
    rule("encoder.block.{i}.layer.0.SelfAttention.v.weight", &["encoder_layers.{i}.self_attention.v_proj.weight"], Transpose),
    rule("encoder.block.{i}.layer.0.SelfAttention.o.weight", &["encoder_layers.{i}.self_attention.o_proj.weight"], Transpose),
    rule("encoder.block.{i}.layer.1.layer_norm.weight", &["encoder_layers.{i}.ffn_norm.weight"], Same),
    rule("encoder.block.{i}.layer.1.DenseReluDense.wo.weight", &["encoder_layers.{i}.feed_forward.down_proj.weight"], Transpose),
    rule("encoder.final_layer_norm.weight", &["encoder_norm.weight"], Same),
    rule("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", &["decoder_relative_bias"], Same),
    rule("decoder.block.{j}.layer.0.layer_norm.weight", &["decoder_layers.{j}.self_attention_norm.weight"], Same),
    rule("decoder.block.{j}.layer.0.SelfAttention.q.weight", &["decoder_layers.{j}.self_attention.q_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.0.SelfAttention.k.weight", &["decoder_layers.{j}.self_attention.k_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.0.SelfAttention.v.weight", &["decoder_layers.{j}.self_attention.v_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.0.SelfAttention.o.weight", &["decoder_layers.{j}.self_attention.o_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.1.layer_norm.weight", &["decoder_layers.{j}.cross_attention_norm.weight"], Same),
    rule("decoder.block.{j}.layer.1.EncDecAttention.q.weight", &["decoder_layers.{j}.cross_attention.q_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.1.EncDecAttention.k.weight", &["decoder_layers.{j}.cross_attention.k_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.1.EncDecAttention.v.weight", &["decoder_layers.{j}.cross_attention.v_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.1.EncDecAttention.o.weight", &["decoder_layers.{j}.cross_attention.o_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.2.layer_norm.weight", &["decoder_layers.{j}.ffn_norm.weight"], Same),
    rule("decoder.block.{j}.layer.2.DenseReluDense.wo.weight", &["decoder_layers.{j}.feed_forward.down_proj.weight"], Transpose),
    rule("decoder.final_layer_norm.weight", &["decoder_norm.weight"], Same),
    rule("lm_head.weight", &["lm_head.weight"], Transpose),
];

/// T5's ReLU MLP input `wi`.
const T5_RELU: &[Rule] = &[
    rule("encoder.block.{i}.layer.1.DenseReluDense.wi.weight", &["encoder_layers.{i}.feed_forward.up_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.2.DenseReluDense.wi.weight", &["decoder_layers.{j}.feed_forward.up_proj.weight"], Transpose),
];

/// T5 v1.1's gated-GELU MLP inputs: `wi_0` through the GELU (our gate), `wi_1` linear.
const T5_GATED: &[Rule] = &[
    rule("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", &["encoder_layers.{i}.feed_forward.gate_proj.weight"], Transpose),
    rule("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", &["encoder_layers.{i}.feed_forward.up_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.2.DenseReluDense.wi_0.weight", &["decoder_layers.{j}.feed_forward.gate_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.2.DenseReluDense.wi_1.weight", &["decoder_layers.{j}.feed_forward.up_proj.weight"], Transpose),
];

/// HF keys that carry no parameter of ours (buffers, or a head tied to the embedding; BERT's
/// decoder bias is `cls.predictions.bias` again).
const IGNORED_SUFFIXES: &[&str] = &[
    ".attn.bias",
    ".attn.masked_bias",
    "rotary_emb.inv_freq",
    "embeddings.position_ids",
    "cls.predictions.decoder.weight",
    "cls.predictions.decoder.bias",
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
];

fn table(arch: HfArch) -> impl Iterator<Item = &'static Rule> {
    let parts: [&'static [Rule]; 2] = match arch {
        HfArch::Llama => [LLAMA_CORE, LLAMA_MLP],
        HfArch::Gpt2 => [GPT2, &[]],
        HfArch::Mamba => [MAMBA, &[]],
        HfArch::Mixtral { .. } => [LLAMA_CORE, MIXTRAL_EXPERTS],
        HfArch::Bert => [BERT, &[]],
        HfArch::T5 { gated: false, .. } => [T5_CORE, T5_RELU],
        HfArch::T5 { gated: true, .. } => [T5_CORE, T5_GATED],
    };
    parts.into_iter().flatten()
}

/// Expand `{i}` rules for `n_layers` layers (`{j}` for T5's decoder blocks, `{e}` for each
/// expert) into (hf name, our names, layout).
fn expanded(arch: HfArch, n_layers: usize) -> Vec<(String, Vec<String>, Layout)> {
    let (n_experts, n_decoder_layers) = match arch {
        HfArch::Mixtral { n_experts } => (n_experts, 0),
        HfArch::T5 { n_decoder_layers, .. } => (0, n_decoder_layers),
        _ => (0, 0),
    };
    let indices = |pattern: &str, key: &str, n: usize| -> Vec<Option<usize>> {
        if pattern.contains(key) {
            (0..n).map(Some).collect()
        } else {
            vec![None]
        }
    };
    let mut out = Vec::new();
    for r in table(arch) {
        for i in indices(r.hf, "{i}", n_layers) {
            for j in indices(r.hf, "{j}", n_decoder_layers) {
                for e in indices(r.hf, "{e}", n_experts) {
                    let fill = |s: &str| {
                        [("{i}", i), ("{j}", j), ("{e}", e)]
                            .iter()
                            .fold(s.to_string(), |s, (key, index)| index.map_or(s.clone(), |n| s.replace(key, &n.to_string())))
                    };
                    out.push((fill(r.hf), r.ours.iter().map(|s| fill(s)).collect(), r.layout));
                }
            }
        }
    }
    out
}

fn concat_last_axis(parts: &[&HostTensor]) -> HostTensor {
    let rows: usize = parts[0].shape[..parts[0].shape.len() - 1].iter().product();
    let widths: Vec<usize> = parts.iter().map(|p| *p.shape.last().unwrap()).collect();
    let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
    for r in 0..rows {
        for (p, &w) in parts.iter().zip(&widths) {
            data.extend_from_slice(&p.data[r * w..(r + 1) * w]);
        }
    }
    let mut shape = parts[0].shape.clone();
    *shape.last_mut().unwrap() = widths.iter().sum();
    HostTensor { shape, data }
}

fn split_last_axis(t: &HostTensor, parts: usize) -> Vec<HostTensor> {
    let width = *t.shape.last().unwrap() / parts;
    let rows = t.data.len() / t.shape.last().unwrap();
    (0..parts)
        .map(|p| {
            let mut data = Vec::with_capacity(rows * width);
            for r in 0..rows {
                let start = r * width * parts + p * width;
                data.extend_from_slice(&t.data[start..start + width]);
            }
            let mut shape = t.shape.clone();
            *shape.last_mut().unwrap() = width;
            HostTensor { shape, data }
        })
        .collect()
}

/// Our parameters under Hugging Face names and layouts.
pub fn to_hf(arch: HfArch, ours: &NamedTensors, n_layers: usize) -> Result<NamedTensors, String> {
    let mut out = NamedTensors::new();
    let mut used = 0;
    for (hf, names, layout) in expanded(arch, n_layers) {
        let parts: Vec<&HostTensor> = names.iter().filter_map(|n| ours.get(n)).collect();
        if parts.is_empty() {
            continue;
        }
        if parts.len() != names.len() {
            return Err(format!("`{hf}` needs all of {names:?}"));
        }
        used += parts.len();
        let tensor = match layout {
            Same => parts[0].clone(),
            Transpose => parts[0].transposed(),
            Fused => concat_last_axis(&parts),
        };
        out.insert(hf, tensor);
    }
    if used != ours.len() {
        let known: Vec<String> = expanded(arch, n_layers).into_iter().flat_map(|(_, n, _)| n).collect();
        let missing: Vec<_> = ours.keys().filter(|k| !known.contains(k)).collect();
        return Err(format!("no Hugging Face name for {missing:?}"));
    }
    Ok(out)
}

/// Hugging Face tensors under our names and layouts. `tied` drops a head that repeats the embedding.
pub fn from_hf(arch: HfArch, hf: &NamedTensors, n_layers: usize, tied: bool) -> Result<NamedTensors, String> {
    let mut out = NamedTensors::new();
    let mut used = 0;
    for (hf_name, names, layout) in expanded(arch, n_layers) {
        let Some(tensor) = hf.get(&hf_name) else { continue };
        used += 1;
        if tied && hf_name == "lm_head.weight" {
            continue;
        }
        match layout {
            Same => drop(out.insert(names[0].clone(), tensor.clone())),
            Transpose => drop(out.insert(names[0].clone(), tensor.transposed())),
            Fused => {
                for (name, part) in names.iter().zip(split_last_axis(tensor, names.len())) {
                    out.insert(name.clone(), part);
                }
            }
        }
    }
    let unknown: Vec<_> = hf
        .keys()
        .filter(|k| !IGNORED_SUFFIXES.iter().any(|s| k.ends_with(s)))
        .filter(|k| !expanded(arch, n_layers).iter().any(|(h, _, _)| h == *k))
        .collect();
    if !unknown.is_empty() {
        return Err(format!("Hugging Face tensors with no place in the model: {unknown:?}"));
    }
    if used == 0 {
        return Err("no tensor of the expected Hugging Face layout was found".into());
    }
    Ok(out)
}

fn field(json: &Value, key: &str) -> Result<usize, String> {
    json.get(key).and_then(Value::as_u64).map(|v| v as usize).ok_or_else(|| format!("config.json lacks integer `{key}`"))
}

fn float(json: &Value, key: &str, default: f64) -> f64 {
    json.get(key).and_then(Value::as_f64).unwrap_or(default)
}

fn flag(json: &Value, key: &str, default: bool) -> bool {
    json.get(key).and_then(Value::as_bool).unwrap_or(default)
}

/// Read a transformers `config.json` into our model config.
pub fn config_from_hf(json: &Value) -> Result<(HfArch, ModelConfig), String> {
    let model_type = json.get("model_type").and_then(Value::as_str).unwrap_or("");
    match model_type {
        "llama" | "mistral" | "mixtral" => {
            let d_model = field(json, "hidden_size")?;
            let n_heads = field(json, "num_attention_heads")?;
            if json.get("head_dim").and_then(Value::as_u64).is_some_and(|h| h as usize != d_model / n_heads) {
                return Err("head_dim other than hidden_size / num_attention_heads is not supported".into());
            }
            let bias = flag(json, "attention_bias", false);
            if flag(json, "mlp_bias", false) != bias {
                return Err("attention_bias and mlp_bias must agree".into());
            }
            let rope_theta = json
                .get("rope_parameters")
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or_else(|| float(json, "rope_theta", 10000.0));
            let config = DecoderConfig::new(
                field(json, "vocab_size")?,
                d_model,
                field(json, "num_hidden_layers")?,
                n_heads,
                field(json, "intermediate_size")?,
                field(json, "max_position_embeddings")?,
            )
            .with_n_kv_heads(Some(json.get("num_key_value_heads").and_then(Value::as_u64).map_or(n_heads, |v| v as usize)))
            .with_norm_eps(float(json, "rms_norm_eps", 1e-6))
            .with_rope_theta(rope_theta)
            .with_bias(bias)
            .with_sliding_window(json.get("sliding_window").and_then(Value::as_u64).unwrap_or(0) as usize)
            .with_tie_embeddings(flag(json, "tie_word_embeddings", false));
            if model_type != "mixtral" {
                return Ok((HfArch::Llama, ModelConfig::Decoder(config)));
            }
            let moe = MoeConfig::new().with_n_experts(field(json, "num_local_experts")?).with_top_k(field(json, "num_experts_per_tok")?);
            Ok((HfArch::Mixtral { n_experts: moe.n_experts }, ModelConfig::Decoder(config.with_moe(Some(moe)))))
        }
        "gpt2" => {
            let act = json.get("activation_function").and_then(Value::as_str).unwrap_or("gelu_new");
            if !["gelu_new", "gelu_pytorch_tanh"].contains(&act) {
                return Err(format!("GPT-2 activation `{act}` is not supported (gelu_new is)"));
            }
            let d_model = field(json, "n_embd")?;
            let d_ff = json.get("n_inner").and_then(Value::as_u64).map_or(4 * d_model, |v| v as usize);
            let config = DecoderConfig::new(
                field(json, "vocab_size")?,
                d_model,
                field(json, "n_layer")?,
                field(json, "n_head")?,
                d_ff,
                field(json, "n_positions")?,
            )
            .with_norm(NormKind::LayerNorm)
            .with_norm_eps(float(json, "layer_norm_epsilon", 1e-5))
            .with_position(PositionKind::Learned)
            .with_mlp(MlpKind::Gelu)
            .with_bias(true)
            .with_tie_embeddings(flag(json, "tie_word_embeddings", true));
            Ok((HfArch::Gpt2, ModelConfig::Decoder(config)))
        }
        "mamba" => {
            if flag(json, "use_bias", false) || !flag(json, "use_conv_bias", true) {
                return Err("Mamba with use_bias = true or use_conv_bias = false is not supported".into());
            }
            let d_model = field(json, "hidden_size")?;
            let expand = field(json, "expand")?;
            if json.get("intermediate_size").and_then(Value::as_u64).is_some_and(|i| i as usize != expand * d_model) {
                return Err("Mamba intermediate_size other than expand × hidden_size is not supported".into());
            }
            let dt_rank = match json.get("time_step_rank") {
                Some(Value::String(s)) if s == "auto" => None,
                _ => Some(field(json, "time_step_rank")?),
            };
            let config = MambaConfig::new(field(json, "vocab_size")?, d_model, field(json, "num_hidden_layers")?, 2048)
                .with_d_state(field(json, "state_size")?)
                .with_d_conv(field(json, "conv_kernel")?)
                .with_expand(expand)
                .with_dt_rank(dt_rank)
                .with_norm_eps(float(json, "layer_norm_epsilon", 1e-5))
                .with_tie_embeddings(flag(json, "tie_word_embeddings", true));
            Ok((HfArch::Mamba, ModelConfig::Mamba(config)))
        }
        "bert" => {
            let act = json.get("hidden_act").and_then(Value::as_str).unwrap_or("gelu");
            if act != "gelu" {
                return Err(format!("BERT activation `{act}` is not supported (gelu is)"));
            }
            if json.get("position_embedding_type").and_then(Value::as_str).is_some_and(|p| p != "absolute") {
                return Err("BERT position_embedding_type other than absolute is not supported".into());
            }
            let config = BertConfig::new(
                field(json, "vocab_size")?,
                field(json, "hidden_size")?,
                field(json, "num_hidden_layers")?,
                field(json, "num_attention_heads")?,
                field(json, "intermediate_size")?,
                field(json, "max_position_embeddings")?,
            )
            .with_type_vocab_size(field(json, "type_vocab_size")?)
            .with_norm_eps(float(json, "layer_norm_eps", 1e-12));
            Ok((HfArch::Bert, ModelConfig::Bert(config)))
        }
        "t5" => {
            let mlp = match json.get("feed_forward_proj").and_then(Value::as_str).unwrap_or("relu") {
                "relu" => MlpKind::Relu,
                "gated-gelu" => MlpKind::GatedGelu,
                other => return Err(format!("T5 feed_forward_proj `{other}` is not supported (relu and gated-gelu are)")),
            };
            let n_layers = field(json, "num_layers")?;
            let n_decoder_layers = json.get("num_decoder_layers").and_then(Value::as_u64).map_or(n_layers, |v| v as usize);
            let config = T5Config::new(
                field(json, "vocab_size")?,
                field(json, "d_model")?,
                field(json, "d_kv")?,
                field(json, "d_ff")?,
                field(json, "num_heads")?,
                n_layers,
                n_decoder_layers,
            )
            .with_relative_attention_num_buckets(field(json, "relative_attention_num_buckets")?)
            .with_relative_attention_max_distance(field(json, "relative_attention_max_distance")?)
            .with_norm_eps(float(json, "layer_norm_epsilon", 1e-6))
            .with_mlp(mlp)
            .with_tie_embeddings(flag(json, "tie_word_embeddings", true));
            Ok((HfArch::T5 { n_decoder_layers, gated: mlp == MlpKind::GatedGelu }, ModelConfig::T5(config)))
        }
        other => Err(format!("model_type `{other}` is not supported (llama, mistral, mixtral, gpt2, mamba, bert, t5 are)")),
    }
}

/// The transformers class that can hold `config` exactly, or why none can.
pub fn hf_arch_for(config: &ModelConfig) -> Result<HfArch, String> {
    match config {
        ModelConfig::Decoder(c) => decoder_hf_arch(c),
        ModelConfig::Mamba(_) => Ok(HfArch::Mamba),
        ModelConfig::Bert(_) => Ok(HfArch::Bert),
        ModelConfig::T5(c) => Ok(HfArch::T5 { n_decoder_layers: c.n_decoder_layers, gated: c.mlp == MlpKind::GatedGelu }),
    }
}

fn decoder_hf_arch(config: &DecoderConfig) -> Result<HfArch, String> {
    let llama_like = config.norm == NormKind::RmsNorm && config.position == PositionKind::Rope && config.mlp == MlpKind::SwiGlu;
    let gpt2_like = config.norm == NormKind::LayerNorm
        && config.position == PositionKind::Learned
        && config.mlp == MlpKind::Gelu
        && config.bias
        && config.kv_heads() == config.n_heads;
    let unsupported = if config.parallel_block {
        Some("parallel attention+MLP blocks")
    } else if config.sliding_window > 0 {
        Some("sliding-window attention")
    } else {
        None
    };
    match (unsupported, llama_like, gpt2_like) {
        (Some(what), _, _) => Err(format!("the model uses {what}, which neither LlamaForCausalLM nor GPT2LMHeadModel expresses")),
        (None, true, _) if config.moe.is_some() && config.bias => Err("MixtralForCausalLM has no biases".into()),
        (None, true, _) => Ok(config.moe.as_ref().map_or(HfArch::Llama, |moe| HfArch::Mixtral { n_experts: moe.n_experts })),
        (None, _, true) => Ok(HfArch::Gpt2),
        _ => Err("the model mixes Llama and GPT-2 parts (norm, positions, MLP, bias); Hugging Face export needs RMSNorm+RoPE+SwiGLU (Llama) or LayerNorm+learned positions+GELU+bias with MHA (GPT-2)".into()),
    }
}

/// A transformers `config.json` for `config` (the inverse of `config_from_hf`); `pad` also
/// starts T5's decoder.
pub fn config_to_hf(config: &ModelConfig, bos: u32, eos: u32, pad: u32, dtype: &str) -> Result<Value, String> {
    let c = match config {
        ModelConfig::Decoder(c) => c,
        ModelConfig::Mamba(c) => {
            return Ok(serde_json::json!({
                "architectures": ["MambaForCausalLM"],
                "model_type": "mamba",
                "vocab_size": c.vocab_size,
                "hidden_size": c.d_model,
                "state_size": c.d_state,
                "num_hidden_layers": c.n_layers,
                "expand": c.expand,
                "intermediate_size": c.d_inner(),
                "conv_kernel": c.d_conv,
                "time_step_rank": c.dt_rank(),
                "use_bias": false,
                "use_conv_bias": true,
                "hidden_act": "silu",
                "layer_norm_epsilon": c.norm_eps,
                "tie_word_embeddings": c.tie_embeddings,
                "bos_token_id": bos,
                "eos_token_id": eos,
                "pad_token_id": eos,
                "torch_dtype": dtype,
            }))
        }
        ModelConfig::Bert(c) => {
            return Ok(serde_json::json!({
                "architectures": ["BertForMaskedLM"],
                "model_type": "bert",
                "vocab_size": c.vocab_size,
                "hidden_size": c.d_model,
                "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads,
                "intermediate_size": c.d_ff,
                "max_position_embeddings": c.max_seq_len,
                "type_vocab_size": c.type_vocab_size,
                "hidden_act": "gelu",
                "layer_norm_eps": c.norm_eps,
                "position_embedding_type": "absolute",
                "hidden_dropout_prob": 0.0,
                "attention_probs_dropout_prob": 0.0,
                "tie_word_embeddings": true,
                "pad_token_id": eos,
                "torch_dtype": dtype,
            }))
        }
        ModelConfig::T5(c) => {
            return Ok(serde_json::json!({
                "architectures": ["T5ForConditionalGeneration"],
                "model_type": "t5",
                "vocab_size": c.vocab_size,
                "d_model": c.d_model,
                "d_kv": c.d_kv,
                "d_ff": c.d_ff,
                "num_heads": c.n_heads,
                "num_layers": c.n_layers,
                "num_decoder_layers": c.n_decoder_layers,
                "relative_attention_num_buckets": c.relative_attention_num_buckets,
                "relative_attention_max_distance": c.relative_attention_max_distance,
                "layer_norm_epsilon": c.norm_eps,
                "feed_forward_proj": if c.mlp == MlpKind::GatedGelu { "gated-gelu" } else { "relu" },
                "dropout_rate": 0.0,
                "tie_word_embeddings": c.tie_embeddings,
                "is_encoder_decoder": true,
                "decoder_start_token_id": pad,
                "pad_token_id": pad,
                "eos_token_id": eos,
                "torch_dtype": dtype,
            }));
        }
    };
    Ok(match decoder_hf_arch(c)? {
        HfArch::Llama => serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.d_model,
            "intermediate_size": c.d_ff,
            "num_hidden_layers": c.n_layers,
            "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.kv_heads(),
            "head_dim": c.head_dim(),
            "max_position_embeddings": c.max_seq_len,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "hidden_act": "silu",
            "attention_bias": c.bias,
            "mlp_bias": c.bias,
            "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": dtype,
        }),
        HfArch::Gpt2 => serde_json::json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_embd": c.d_model,
            "n_inner": c.d_ff,
            "n_layer": c.n_layers,
            "n_head": c.n_heads,
            "n_positions": c.max_seq_len,
            "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": c.tie_embeddings,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": dtype,
        }),
        HfArch::Mixtral { n_experts } => {
            let moe = c.moe.as_ref().expect("a Mixtral has experts");
            serde_json::json!({
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "vocab_size": c.vocab_size,
                "hidden_size": c.d_model,
                "intermediate_size": c.d_ff,
                "num_hidden_layers": c.n_layers,
                "num_attention_heads": c.n_heads,
                "num_key_value_heads": c.kv_heads(),
                "head_dim": c.head_dim(),
                "num_local_experts": n_experts,
                "num_experts_per_tok": moe.top_k,
                "max_position_embeddings": c.max_seq_len,
                "rms_norm_eps": c.norm_eps,
                "rope_theta": c.rope_theta,
                "hidden_act": "silu",
                "router_jitter_noise": 0.0,
                "tie_word_embeddings": c.tie_embeddings,
                "bos_token_id": bos,
                "eos_token_id": eos,
                "torch_dtype": dtype,
            })
        }
        HfArch::Mamba | HfArch::Bert | HfArch::T5 { .. } => unreachable!("decoder_hf_arch names decoder transformer classes only"),
    })
}

/// LoRA adapters in Hugging Face PEFT's layout: `base_model.model.<hf module>.lora_A.weight`
/// `[r, d_in]` and `lora_B.weight` `[d_out, r]` (torch `nn.Linear` layout, also for GPT-2's
/// Conv1D). Our q/k/v adapters on GPT-2 become one adapter on the fused `c_attn`: A stacks
/// theirs, B is block-diagonal (zero blocks for parts without an adapter), so its rank is 3·r
/// and `rank_pattern`/`alpha_pattern` keep its scale. Returns the tensors and the adapted modules (PEFT target names, ranks, alphas).
pub fn to_peft(arch: HfArch, ours: &NamedTensors, n_layers: usize, scale: f64, rslora: bool) -> Result<PeftAdapters, String> {
    let mut adapters = PeftAdapters::default();
    for (hf_name, names, _) in expanded(arch, n_layers) {
        let Some(module) = hf_name.strip_suffix(".weight") else { continue };
        let prefixes: Vec<&str> = names.iter().filter_map(|n| n.strip_suffix(".weight")).collect();
        let parts: Vec<Option<(&HostTensor, &HostTensor)>> =
            prefixes.iter().map(|p| Some((ours.get(&format!("{p}.lora.a"))?, ours.get(&format!("{p}.lora.b"))?))).collect();
        if parts.iter().all(Option::is_none) {
            continue;
        }
        let widths: Vec<usize> = names
            .iter()
            .map(|n| ours.get(n).map(|w| w.shape[1]).ok_or_else(|| format!("no base weight `{n}`")))
            .collect::<Result<_, _>>()?;
        let (d_in, r) = {
            let a = parts.iter().flatten().next().expect("one adapter").0;
            (a.shape[0], a.shape[1])
        };
        // One rank-r block per part; a part without an adapter keeps a zero block.
        let rank = parts.len() * r;
        let d_out: usize = widths.iter().sum();
        let mut lora_a = HostTensor { shape: vec![rank, d_in], data: vec![0.0; rank * d_in] };
        let mut lora_b = HostTensor { shape: vec![d_out, rank], data: vec![0.0; d_out * rank] };
        let mut row0 = 0;
        for (p, (part, &width)) in parts.iter().zip(&widths).enumerate() {
            if let Some((a, b)) = part {
                for i in 0..d_in {
                    for k in 0..r {
                        lora_a.data[(p * r + k) * d_in + i] = a.data[i * r + k];
                    }
                }
                for k in 0..r {
                    for j in 0..width {
                        lora_b.data[(row0 + j) * rank + p * r + k] = b.data[k * width + j];
                    }
                }
            }
            row0 += width;
        }
        let target = peft_target(module);
        let alpha = if rslora { scale * (rank as f64).sqrt() } else { scale * rank as f64 };
        adapters.tensors.insert(format!("base_model.model.{module}.lora_A.weight"), lora_a);
        adapters.tensors.insert(format!("base_model.model.{module}.lora_B.weight"), lora_b);
        adapters.modules.insert(target, (rank, alpha));
    }
    if adapters.tensors.is_empty() {
        return Err("the checkpoint holds no LoRA adapters".into());
    }
    Ok(adapters)
}

/// PEFT adapter tensors (`base_model.model.<hf module>.lora_A.weight` / `lora_B.weight`) under
/// our names (`<layer>.lora.a` `[d_in, r]`, `<layer>.lora.b` `[r, d_out]`), the inverse of
/// `to_peft`. A fused GPT-2 `c_attn` adapter is split into q/k/v adapters of rank `r` each, which
/// needs the block-diagonal form `to_peft` writes; anything else there is refused.
pub fn from_peft(arch: HfArch, peft: &NamedTensors, n_layers: usize, r: usize) -> Result<NamedTensors, String> {
    let mut out = NamedTensors::new();
    let mut consumed = std::collections::BTreeSet::new();
    for (hf_name, names, layout) in expanded(arch, n_layers) {
        let Some(module) = hf_name.strip_suffix(".weight") else { continue };
        let (key_a, key_b) = (format!("base_model.model.{module}.lora_A.weight"), format!("base_model.model.{module}.lora_B.weight"));
        let (Some(a), Some(b)) = (peft.get(&key_a), peft.get(&key_b)) else { continue };
        let (rank, d_in, d_out) = (a.shape[0], a.shape[1], b.shape[0]);
        let parts = if layout == Fused { names.len() } else { 1 };
        if b.shape[1] != rank || rank != parts * r {
            return Err(format!(
                "`{module}`: lora_A {:?} and lora_B {:?} do not make {parts} adapter(s) of the recipe's rank lora.r = {r}",
                a.shape, b.shape
            ));
        }
        let width = d_out / parts;
        let mixed = (0..d_out).any(|j| (0..rank).any(|k| j / width != k / r && b.data[j * rank + k] != 0.0));
        if mixed {
            return Err(format!("`{module}`: this fused adapter mixes q, k and v; Furnace keeps them as separate adapters"));
        }
        for (p, name) in names.iter().enumerate() {
            let prefix = name.strip_suffix(".weight").expect("a weight rule");
            let mut ours_a = HostTensor { shape: vec![d_in, r], data: vec![0.0; d_in * r] };
            let mut ours_b = HostTensor { shape: vec![r, width], data: vec![0.0; r * width] };
            for k in 0..r {
                for i in 0..d_in {
                    ours_a.data[i * r + k] = a.data[(p * r + k) * d_in + i];
                }
                for j in 0..width {
                    ours_b.data[k * width + j] = b.data[(p * width + j) * rank + p * r + k];
                }
            }
            // A zero block is a part `to_peft` had no adapter for.
            if ours_a.data.iter().chain(&ours_b.data).any(|v| *v != 0.0) {
                out.insert(format!("{prefix}.lora.a"), ours_a);
                out.insert(format!("{prefix}.lora.b"), ours_b);
            }
        }
        consumed.extend([key_a, key_b]);
    }
    let unknown: Vec<&String> = peft.keys().filter(|k| !consumed.contains(*k)).collect();
    if !unknown.is_empty() {
        return Err(format!("adapter tensors that match no layer of this model: {unknown:?}"));
    }
    Ok(out)
}

/// What `to_peft` produces.
#[derive(Debug, Default)]
pub struct PeftAdapters {
    pub tensors: NamedTensors,
    /// PEFT target name → (rank, alpha) of every adapted module.
    pub modules: std::collections::BTreeMap<String, (usize, f64)>,
}

/// The module's name below its layer (`self_attn.q_proj`, `attn.c_attn`, `lm_head`): what
/// PEFT's `target_modules` matches as a suffix.
fn peft_target(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.iter().position(|p| p.parse::<usize>().is_ok()) {
        Some(i) => parts[i + 1..].join("."),
        None => module.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], start: f32) -> HostTensor {
        let n = shape.iter().product();
        HostTensor { shape: shape.to_vec(), data: (0..n).map(|i| start + i as f32).collect() }
    }

    #[test]
    fn gpt2_fused_attention_round_trips() {
        let mut ours = NamedTensors::new();
        ours.insert("layers.0.attention.q_proj.weight".into(), t(&[2, 2], 0.0));
        ours.insert("layers.0.attention.k_proj.weight".into(), t(&[2, 2], 10.0));
        ours.insert("layers.0.attention.v_proj.weight".into(), t(&[2, 2], 20.0));
        let hf = to_hf(HfArch::Gpt2, &ours, 1).unwrap();
        let fused = &hf["transformer.h.0.attn.c_attn.weight"];
        assert_eq!(fused.shape, vec![2, 6]);
        assert_eq!(fused.data, vec![0., 1., 10., 11., 20., 21., 2., 3., 12., 13., 22., 23.]);
        assert_eq!(from_hf(HfArch::Gpt2, &hf, 1, false).unwrap(), ours);
    }

    #[test]
    fn llama_linear_is_transposed_and_round_trips() {
        let mut ours = NamedTensors::new();
        ours.insert("layers.0.attention.q_proj.weight".into(), t(&[2, 3], 0.0));
        let hf = to_hf(HfArch::Llama, &ours, 1).unwrap();
        assert_eq!(hf["model.layers.0.self_attn.q_proj.weight"].shape, vec![3, 2]);
        assert_eq!(from_hf(HfArch::Llama, &hf, 1, false).unwrap(), ours);
    }

    #[test]
    fn config_round_trips_through_config_json() {
        let llama = DecoderConfig::new(97, 64, 2, 8, 160, 64).with_n_kv_heads(Some(2)).with_rope_theta(5e5);
        let gpt2 = DecoderConfig::new(101, 48, 2, 4, 192, 64)
            .with_norm(NormKind::LayerNorm)
            .with_norm_eps(1e-5)
            .with_position(PositionKind::Learned)
            .with_mlp(MlpKind::Gelu)
            .with_bias(true)
            .with_tie_embeddings(true);
        let mamba = MambaConfig::new(89, 32, 2, 2048).with_d_state(8).with_dt_rank(Some(3)).with_expand(3);
        let bert = BertConfig::new(79, 32, 2, 4, 64, 48).with_type_vocab_size(2).with_norm_eps(1e-12);
        for config in [ModelConfig::Decoder(llama), ModelConfig::Decoder(gpt2), ModelConfig::Mamba(mamba), ModelConfig::Bert(bert)] {
            let json = config_to_hf(&config, 1, 2, 2, "float32").unwrap();
            let (_, back) = config_from_hf(&json).unwrap();
            assert_eq!(format!("{back:?}"), format!("{config:?}"));
        }
        let alibi = DecoderConfig::new(97, 64, 2, 8, 160, 64).with_position(PositionKind::Alibi);
        assert!(config_to_hf(&ModelConfig::Decoder(alibi), 1, 2, 2, "float32").unwrap_err().contains("mixes"));
        let window = DecoderConfig::new(97, 64, 2, 8, 160, 64).with_sliding_window(8);
        assert!(config_to_hf(&ModelConfig::Decoder(window), 1, 2, 2, "float32").unwrap_err().contains("sliding"));
    }

    #[test]
    fn unknown_hf_tensor_is_an_error() {
        let mut hf = NamedTensors::new();
        hf.insert("model.layers.0.self_attn.rotary_extra".into(), t(&[1], 0.0));
        assert!(from_hf(HfArch::Llama, &hf, 1, false).is_err());
    }
}
