//! T5 (ReLU) and T5 v1.1 (gated-GELU): their tensor names and `config.json`.

use serde_json::Value;

use super::{field, flag, float, rule, HfArch, Layout::*, Rule};
use crate::blocks::MlpKind;
use crate::model::ModelConfig;
use crate::t5::T5Config;

/// T5: `{i}` indexes encoder blocks, `{j}` decoder blocks; the relative position bias lives in
/// each stack's first block. Attention projections have no bias; norms are RMS (weight only).
pub(super) const T5_CORE: &[Rule] = &[
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
pub(super) const T5_RELU: &[Rule] = &[
    rule("encoder.block.{i}.layer.1.DenseReluDense.wi.weight", &["encoder_layers.{i}.feed_forward.up_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.2.DenseReluDense.wi.weight", &["decoder_layers.{j}.feed_forward.up_proj.weight"], Transpose),
];

/// T5 v1.1's gated-GELU MLP inputs: `wi_0` through the GELU (our gate), `wi_1` linear.
pub(super) const T5_GATED: &[Rule] = &[
    rule("encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight", &["encoder_layers.{i}.feed_forward.gate_proj.weight"], Transpose),
    rule("encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight", &["encoder_layers.{i}.feed_forward.up_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.2.DenseReluDense.wi_0.weight", &["decoder_layers.{j}.feed_forward.gate_proj.weight"], Transpose),
    rule("decoder.block.{j}.layer.2.DenseReluDense.wi_1.weight", &["decoder_layers.{j}.feed_forward.up_proj.weight"], Transpose),
];

pub(super) fn read(json: &Value) -> Result<(HfArch, ModelConfig), String> {
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

/// `T5ForConditionalGeneration`'s `config.json`.
pub(super) fn write(c: &T5Config, eos: u32, pad: u32, dtype: &str) -> Value {
    serde_json::json!({
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": c.vocab_size,
        "d_model": c.d_model,
        "d_kv": c.head_dim,
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
    })
}
