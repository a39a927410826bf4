//! Same weights, same answer: tiny Hugging Face models (built by
//! scripts/reference/make_hf_fixtures.py) loaded through our name table reproduce
//! transformers' logits to 1e-4.

use std::path::PathBuf;

use burn::prelude::*;
use furnace_models::hf::{config_from_hf, from_hf};
use furnace_models::params::{from_safetensors, load_named};
use furnace_models::{CausalLm, LanguageModel};

type B = burn::backend::Flex;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// The fixture's model loaded through our name table, and its batch of tokens.
fn load(name: &str) -> (LanguageModel<B>, Tensor<B, 2, Int>) {
    let dir = fixture(name);
    let config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (arch, config) = config_from_hf(&config_json).unwrap();
    let device = Default::default();
    let hf = from_safetensors(&std::fs::read(dir.join("model.safetensors")).unwrap()).unwrap();
    let ours = from_hf(arch, &hf, config.n_layers(), config.tie_embeddings()).unwrap();
    let model = load_named(config.init::<B>(0, &device), &ours).unwrap();
    let tokens: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();
    let (batch, seq) = (tokens.len(), tokens[0].len());
    (model, Tensor::from_data(TensorData::new(tokens.concat(), [batch, seq]), &device))
}

fn check(name: &str) {
    let (model, tokens) = load(name);
    let ours: Vec<f32> = model.forward(tokens).into_data().into_vec().unwrap();
    let expected = &from_safetensors(&std::fs::read(fixture(name).join("logits.safetensors")).unwrap()).unwrap()["logits"];
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

#[test]
fn mixtral_matches_transformers() {
    check("tiny_mixtral");
}

/// The load-balancing loss equals transformers' `aux_loss`; the z-loss equals ST-MoE's formula
/// on transformers' router logits.
#[test]
fn mixtral_router_losses_match_transformers() {
    let (model, tokens) = load("tiny_mixtral");
    let (_, routing) = model.forward_routed(tokens, None);
    let routing = routing.expect("a mixture of experts reports its routing");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_mixtral").join("losses.json")).unwrap()).unwrap();
    for (name, ours) in [("aux_loss", routing.load_balancing_loss()), ("z_loss", routing.z_loss())] {
        let (ours, theirs) = (ours.into_scalar() as f64, expected[name].as_f64().unwrap());
        assert!((ours - theirs).abs() <= 1e-5 * theirs.abs().max(1.0), "{name}: ours {ours}, reference {theirs}");
    }
    let fractions = routing.expert_fractions();
    assert_eq!(fractions.len(), 4);
    assert!((fractions.iter().sum::<f64>() - 1.0).abs() < 1e-9);
}
