//! Mamba: its tensor names and `config.json`.

use serde_json::Value;

use super::{field, flag, float, rule, HfArch, Layout::*, Rule};
use crate::mamba::MambaConfig;
use crate::model::ModelConfig;

/// Mamba's depthwise `conv1d.weight` is `[d_inner, 1, d_conv]` on both sides.
pub(super) const MAMBA: &[Rule] = &[
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

pub(super) fn read(json: &Value) -> Result<(HfArch, ModelConfig), String> {
    if flag(json, "use_bias", false) || !flag(json, "use_conv_bias", true) {
        return Err("Mamba with use_bias = true or use_conv_bias = false is not supported".into());
    }
    let d_model = field(json, "hidden_size")?;
    let expand = field(json, "expand")?;
    if json.get("intermediate_size").and_then(Value::as_u64).is_some_and(|i| i as usize != expand * d_model) {
        return Err("Mamba intermediate_size other than expand × hidden_size is not supported".into());
    }
    let dt_rank = match json.get("time_step_rank") {
        Some(Value::String(s)) if s == "auto" => d_model.div_ceil(16),
        _ => field(json, "time_step_rank")?,
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

/// `MambaForCausalLM`'s `config.json`.
pub(super) fn write(c: &MambaConfig, bos: u32, eos: u32, dtype: &str) -> Value {
    serde_json::json!({
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "state_size": c.d_state,
        "num_hidden_layers": c.n_layers,
        "expand": c.expand,
        "intermediate_size": c.d_inner(),
        "conv_kernel": c.d_conv,
        "time_step_rank": c.dt_rank,
        "use_bias": false,
        "use_conv_bias": true,
        "hidden_act": "silu",
        "layer_norm_epsilon": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "torch_dtype": dtype,
    })
}
