//! Hugging Face layouts: the rule engine. Each architecture's file holds its table, which maps
//! our parameter paths to transformers' names, and its `config.json` reading and writing; the
//! same table drives import (`from_hf`), export (`to_hf`) and PEFT's adapters (`peft.rs`).

use serde_json::Value;

use crate::blocks::{MlpKind, NormKind};
use crate::decoder::{DecoderConfig, PositionKind};
use crate::model::ModelConfig;
use furnace_core::arch::Arch;
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

impl HfArch {
    /// The architecture this transformers class holds.
    pub fn arch(self) -> Arch {
        match self {
            HfArch::Llama => Arch::Llama,
            HfArch::Gpt2 => Arch::Gpt2,
            HfArch::Mamba => Arch::Mamba,
            HfArch::Mixtral { .. } => Arch::Mixtral,
            HfArch::Bert => Arch::Bert,
            HfArch::T5 { .. } => Arch::T5,
        }
    }
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

mod bert;
mod gpt2;
mod llama;
mod mamba;
mod peft;
mod t5;

pub use peft::{from_peft, to_peft, PeftAdapters};
use Layout::*;

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
        HfArch::Llama => [llama::LLAMA_CORE, llama::LLAMA_MLP],
        HfArch::Gpt2 => [gpt2::GPT2, &[]],
        HfArch::Mamba => [mamba::MAMBA, &[]],
        HfArch::Mixtral { .. } => [llama::LLAMA_CORE, llama::MIXTRAL_EXPERTS],
        HfArch::Bert => [bert::BERT, &[]],
        HfArch::T5 { gated: false, .. } => [t5::T5_CORE, t5::T5_RELU],
        HfArch::T5 { gated: true, .. } => [t5::T5_CORE, t5::T5_GATED],
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
        "llama" | "mistral" | "mixtral" => llama::read(json, model_type),
        "gpt2" => gpt2::read(json),
        "mamba" => mamba::read(json),
        "bert" => bert::read(json),
        "t5" => t5::read(json),
        other => Err(format!("model_type `{other}` is not supported (llama, mistral, mixtral, gpt2, mamba, bert, t5 are)")),
    }
}

/// The transformers class that can hold `config` exactly, or why none can.
pub fn hf_arch_for(config: &ModelConfig) -> Result<HfArch, String> {
    match config {
        ModelConfig::Llama(c) | ModelConfig::Gpt2(c) | ModelConfig::Mixtral(c) => decoder_hf_arch(c),
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
    Ok(match config {
        ModelConfig::Mamba(c) => mamba::write(c, bos, eos, dtype),
        ModelConfig::Bert(c) => bert::write(c, eos, dtype),
        ModelConfig::T5(c) => t5::write(c, eos, pad, dtype),
        ModelConfig::Llama(c) | ModelConfig::Gpt2(c) | ModelConfig::Mixtral(c) => match decoder_hf_arch(c)? {
            HfArch::Llama => llama::write(c, bos, eos, dtype),
            HfArch::Gpt2 => gpt2::write(c, bos, eos, dtype),
            HfArch::Mixtral { n_experts } => llama::write_mixtral(c, n_experts, bos, eos, dtype),
            HfArch::Mamba | HfArch::Bert | HfArch::T5 { .. } => unreachable!("decoder_hf_arch names decoder transformer classes only"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::BertConfig;
    use crate::mamba::MambaConfig;

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
        let llama = DecoderConfig::new(97, 64, 2, 8, 160, 64).with_n_kv_heads(2).with_rope_theta(5e5);
        let gpt2 = DecoderConfig::new(101, 48, 2, 4, 192, 64)
            .with_norm(NormKind::LayerNorm)
            .with_norm_eps(1e-5)
            .with_position(PositionKind::Learned)
            .with_mlp(MlpKind::Gelu)
            .with_bias(true)
            .with_tie_embeddings(true);
        let mamba = MambaConfig::new(89, 32, 2, 2048).with_d_state(8).with_dt_rank(3).with_expand(3);
        let bert = BertConfig::new(79, 32, 2, 4, 64, 48).with_type_vocab_size(2).with_norm_eps(1e-12);
        for config in [ModelConfig::Llama(llama), ModelConfig::Gpt2(gpt2), ModelConfig::Mamba(mamba), ModelConfig::Bert(bert)] {
            let json = config_to_hf(&config, 1, 2, 2, "float32").unwrap();
            let (_, back) = config_from_hf(&json).unwrap();
            assert_eq!(format!("{back:?}"), format!("{config:?}"));
        }
        let alibi = DecoderConfig::new(97, 64, 2, 8, 160, 64).with_position(PositionKind::Alibi);
        assert!(config_to_hf(&ModelConfig::Llama(alibi), 1, 2, 2, "float32").unwrap_err().contains("mixes"));
        let window = DecoderConfig::new(97, 64, 2, 8, 160, 64).with_sliding_window(8);
        assert!(config_to_hf(&ModelConfig::Llama(window), 1, 2, 2, "float32").unwrap_err().contains("sliding"));
    }

    #[test]
    fn unknown_hf_tensor_is_an_error() {
        let mut hf = NamedTensors::new();
        hf.insert("model.layers.0.self_attn.rotary_extra".into(), t(&[1], 0.0));
        assert!(from_hf(HfArch::Llama, &hf, 1, false).is_err());
    }
}
