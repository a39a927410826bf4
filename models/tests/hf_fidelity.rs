//! Same weights, same answer: tiny Hugging Face models (built by
//! scripts/reference/make_hf_fixtures.py) loaded through our name table reproduce
//! transformers' logits to 1e-4.

use std::path::PathBuf;

use burn::prelude::*;
use furnace_models::hf::{config_from_hf, from_hf};
use furnace_models::params::{from_safetensors, load_named};
use furnace_models::CausalLm;

type B = burn::backend::Flex;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

fn check(name: &str) {
    let dir = fixture(name);
    let config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (arch, config) = config_from_hf(&config_json).unwrap();
    let device = Default::default();
    let hf = from_safetensors(&std::fs::read(dir.join("model.safetensors")).unwrap()).unwrap();
    let ours = from_hf(arch, &hf, config.n_layers(), config.tie_embeddings()).unwrap();
    let model = load_named(config.init::<B>(0, &device), &ours).unwrap();

    let tokens: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();
    let (batch, seq) = (tokens.len(), tokens[0].len());
    let flat: Vec<i64> = tokens.concat();
    let logits = model.forward(Tensor::<B, 2, Int>::from_data(TensorData::new(flat, [batch, seq]), &device));
    let ours: Vec<f32> = logits.into_data().into_vec().unwrap();
    let expected = &from_safetensors(&std::fs::read(dir.join("logits.safetensors")).unwrap()).unwrap()["logits"];
    assert_eq!(expected.data.len(), ours.len());
    let scale = expected.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (a, b)) in ours.iter().zip(&expected.data).enumerate() {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(scale), "{name} logit {i}: ours {a}, transformers {b}");
    }
}

#[test]
fn llama_with_gqa_matches_transformers() {
    check("tiny_llama");
}

#[test]
fn gpt2_matches_transformers() {
    check("tiny_gpt2");
}

#[test]
fn mamba_matches_transformers() {
    check("tiny_mamba");
}
