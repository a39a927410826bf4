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

#[test]
fn bert_masked_lm_matches_transformers() {
    check("tiny_bert");
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

/// Every parameter's gradient of the masked-LM loss (mean over the labelled positions of a
/// masked batch) equals transformers' (1e-4 of the largest entry of each gradient, at least 1e-7).
#[test]
fn bert_gradients_match_transformers() {
    use burn::backend::Autodiff;
    use burn::module::Param;
    use furnace_models::kernels::cross_entropy;
    use furnace_models::params::{visit_with_paths, HostTensor, NamedTensors, PathVisitor};
    type A = Autodiff<B>;

    struct Grads<'a> {
        grads: &'a <A as burn::tensor::backend::AutodiffBackend>::Gradients,
        out: NamedTensors,
    }
    impl PathVisitor<A> for Grads<'_> {
        fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<A, D>>) {
            let grad = param.val().grad(self.grads).expect("every parameter gets a gradient");
            self.out.insert(path.to_string(), HostTensor::from_tensor(grad));
        }
    }

    let dir = fixture("tiny_bert");
    let config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (arch, config) = config_from_hf(&config_json).unwrap();
    let device = Default::default();
    let hf = from_safetensors(&std::fs::read(dir.join("model.safetensors")).unwrap()).unwrap();
    let model = load_named(config.init::<A>(0, &device), &from_hf(arch, &hf, config.n_layers(), true).unwrap()).unwrap();
    let mut expected = from_safetensors(&std::fs::read(dir.join("grads.safetensors")).unwrap()).unwrap();
    let as_ids = |t: HostTensor| t.data.iter().map(|&v| if v < 0.0 { -1 } else { v as i64 }).collect::<Vec<i64>>();
    let (inputs, labels) = (as_ids(expected.remove("inputs").unwrap()), as_ids(expected.remove("labels").unwrap()));
    let n = inputs.len();
    let counted = labels.iter().filter(|&&l| l >= 0).count() as f64;
    let logits = model.forward(Tensor::from_data(TensorData::new(inputs, [2, n / 2]), &device));
    let vocab = logits.dims()[2];
    let loss = cross_entropy(logits.reshape([n, vocab]), Tensor::from_data(TensorData::new(labels, [n]), &device)).sum() / counted;
    let grads = loss.backward();
    let mut ours = Grads { grads: &grads, out: NamedTensors::new() };
    visit_with_paths(&model, &mut ours);
    let expected = from_hf(arch, &expected, config.n_layers(), true).unwrap();
    assert_eq!(expected.keys().collect::<Vec<_>>(), ours.out.keys().collect::<Vec<_>>());
    for (name, theirs) in &expected {
        let ours = &ours.out[name];
        // The key bias's gradient is 0 up to rounding (softmax ignores a per-query constant).
        let scale = theirs.data.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (a, b) in ours.data.iter().zip(&theirs.data) {
            assert!((a - b).abs() <= 1e-4 * scale, "{name}: ours {a}, transformers {b} (largest {scale})");
        }
    }
}
