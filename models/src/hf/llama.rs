//! Llama (and Mistral's config) and Mixtral: their tensor names and `config.json`.

use serde_json::Value;

use super::{field, flag, float, rule, HfArch, Layout::*, Rule};
use crate::decoder::DecoderConfig;
use crate::mixtral::MoeConfig;
use crate::model::ModelConfig;

/// `{i}` stands for the layer index, `{e}` for the expert index. Llama's embedding, attention,
/// norms and head; its MLP (or Mixtral's experts) follow in their own table.
pub(super) const LLAMA_CORE: &[Rule] = &[
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

pub(super) const LLAMA_MLP: &[Rule] = &[
    rule("model.layers.{i}.mlp.gate_proj.weight", &["layers.{i}.feed_forward.gate_proj.weight"], Transpose),
    rule("model.layers.{i}.mlp.up_proj.weight", &["layers.{i}.feed_forward.up_proj.weight"], Transpose),
    rule("model.layers.{i}.mlp.down_proj.weight", &["layers.{i}.feed_forward.down_proj.weight"], Transpose),
    rule("model.layers.{i}.mlp.gate_proj.bias", &["layers.{i}.feed_forward.gate_proj.bias"], Same),
    rule("model.layers.{i}.mlp.up_proj.bias", &["layers.{i}.feed_forward.up_proj.bias"], Same),
    rule("model.layers.{i}.mlp.down_proj.bias", &["layers.{i}.feed_forward.down_proj.bias"], Same),
];

/// Mixtral's sparse mixture of experts in place of Llama's MLP, in the per-expert layout
/// transformers saves (w1 = gate, w2 = down, w3 = up).
pub(super) const MIXTRAL_EXPERTS: &[Rule] = &[
    rule("model.layers.{i}.block_sparse_moe.gate.weight", &["layers.{i}.feed_forward.router.weight"], Transpose),
    rule("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", &["layers.{i}.feed_forward.experts.{e}.gate_proj.weight"], Transpose),
    rule("model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", &["layers.{i}.feed_forward.experts.{e}.down_proj.weight"], Transpose),
    rule("model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", &["layers.{i}.feed_forward.experts.{e}.up_proj.weight"], Transpose),
];

/// A `llama`, `mistral` or `mixtral` `config.json`.
pub(super) fn read(json: &Value, model_type: &str) -> Result<(HfArch, ModelConfig), String> {
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
    .with_n_kv_heads(json.get("num_key_value_heads").and_then(Value::as_u64).map_or(n_heads, |v| v as usize))
    .with_norm_eps(float(json, "rms_norm_eps", 1e-6))
    .with_rope_theta(rope_theta)
    .with_bias(bias)
    .with_sliding_window(json.get("sliding_window").and_then(Value::as_u64).unwrap_or(0) as usize)
    .with_tie_embeddings(flag(json, "tie_word_embeddings", false));
    if model_type != "mixtral" {
        return Ok((HfArch::Llama, ModelConfig::Llama(config)));
    }
    let moe =
        MoeConfig::new().with_n_experts(field(json, "num_local_experts")?).with_experts_per_token(field(json, "num_experts_per_tok")?);
    Ok((HfArch::Mixtral { n_experts: moe.n_experts }, ModelConfig::Mixtral(config.with_moe(Some(moe)))))
}

/// `LlamaForCausalLM`'s `config.json`.
pub(super) fn write(c: &DecoderConfig, bos: u32, eos: u32, dtype: &str) -> Value {
    serde_json::json!({
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
    })
}

/// `MixtralForCausalLM`'s `config.json`.
pub(super) fn write_mixtral(c: &DecoderConfig, n_experts: usize, bos: u32, eos: u32, dtype: &str) -> Value {
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
        "num_experts_per_tok": moe.experts_per_token,
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
