//! GPT-2: its tensor names (`Conv1D` weights, fused `c_attn`) and `config.json`.

use serde_json::Value;

use super::{field, flag, float, rule, HfArch, Layout::*, Rule};
use crate::blocks::{MlpKind, NormKind};
use crate::decoder::{DecoderConfig, PositionKind};
use crate::model::ModelConfig;

/// GPT-2 uses `Conv1D`, whose weight is already `[in, out]`.
pub(super) const GPT2: &[Rule] = &[
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

pub(super) fn read(json: &Value) -> Result<(HfArch, ModelConfig), String> {
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
    Ok((HfArch::Gpt2, ModelConfig::Gpt2(config)))
}

/// `GPT2LMHeadModel`'s `config.json`.
pub(super) fn write(c: &DecoderConfig, bos: u32, eos: u32, dtype: &str) -> Value {
    serde_json::json!({
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
    })
}
