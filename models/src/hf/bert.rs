//! BERT's masked-LM model: its tensor names and `config.json`.

use serde_json::Value;

use super::{field, float, rule, HfArch, Layout::*, Rule};
use crate::bert::BertConfig;
use crate::model::ModelConfig;

/// BERT's masked-LM model; its decoder is tied to the word embeddings (see `IGNORED_SUFFIXES`).
pub(super) const BERT: &[Rule] = &[
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

pub(super) fn read(json: &Value) -> Result<(HfArch, ModelConfig), String> {
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

/// `BertForMaskedLM`'s `config.json`.
pub(super) fn write(c: &BertConfig, eos: u32, dtype: &str) -> Value {
    serde_json::json!({
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
    })
}
