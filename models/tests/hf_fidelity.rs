//! Same weights, same answer: tiny Hugging Face models (built by
//! scripts/reference/make_hf_fixtures.py) loaded through our name table reproduce
//! transformers' logits to 1e-4.

use std::path::PathBuf;

use burn::module::Param;
use burn::prelude::*;
use furnace_core::params::{from_safetensors, load_named, visit_with_paths, HostTensor, NamedTensors, PathVisitor};
use furnace_models::hf::{config_from_hf, from_hf};
use furnace_models::kernels::cross_entropy;
use furnace_models::{Init, LanguageModel, ModelConfig};

type B = burn::backend::Flex;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// The fixture's model loaded through our name table.
fn model_of(name: &str) -> LanguageModel<B> {
    let dir = fixture(name);
    let config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (arch, config) = config_from_hf(&config_json).unwrap();
    let hf = from_safetensors(&std::fs::read(dir.join("model.safetensors")).unwrap()).unwrap();
    let ours = from_hf(arch, &hf, config.n_layers(), config.tie_embeddings()).unwrap();
    load_named(config.init::<B>(0, &Default::default()), &ours).unwrap()
}

/// The fixture's model and its batch of tokens.
fn load(name: &str) -> (LanguageModel<B>, Tensor<B, 2, Int>) {
    let dir = fixture(name);
    let device = Default::default();
    let model = model_of(name);
    let tokens: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(dir.join("tokens.json")).unwrap()).unwrap();
    let (batch, seq) = (tokens.len(), tokens[0].len());
    (model, Tensor::from_data(TensorData::new(tokens.concat(), [batch, seq]), &device))
}

fn check(name: &str) {
    let (model, tokens) = load(name);
    let ours: Vec<f32> = model.forward(tokens).expect("a single-sequence model").into_data().into_vec().unwrap();
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
/// on transformers' router logits; their layer-by-layer shares (what activation checkpointing
/// back-propagates) add up to the weighted sum of both.
#[test]
fn mixtral_router_losses_match_transformers() {
    let (model, tokens) = load("tiny_mixtral");
    let (_, routing) = model.forward_routed(tokens, None).unwrap();
    let routing = routing.expect("a mixture of experts reports its routing");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny_mixtral").join("losses.json")).unwrap()).unwrap();
    for (name, ours) in [("aux_loss", routing.load_balancing_loss()), ("z_loss", routing.z_loss())] {
        let (ours, theirs) = (ours.into_scalar() as f64, expected[name].as_f64().unwrap());
        assert!((ours - theirs).abs() <= 1e-5 * theirs.abs().max(1.0), "{name}: ours {ours}, reference {theirs}");
    }
    let (aux_coef, z_coef) = (0.5, 0.25);
    let weights = routing.loss_weights(aux_coef, z_coef);
    let shares: f64 = routing.logits.iter().map(|l| weights.layer_loss(l.clone()).into_scalar() as f64).sum();
    let total = aux_coef * expected["aux_loss"].as_f64().unwrap() + z_coef * expected["z_loss"].as_f64().unwrap();
    assert!((shares - total).abs() <= 1e-5 * total.abs().max(1.0), "layer shares {shares}, weighted losses {total}");
    let fractions = routing.expert_fractions();
    assert_eq!(fractions.len(), 4);
    assert!((fractions.iter().sum::<f64>() - 1.0).abs() < 1e-9);
}

type A = burn::backend::Autodiff<B>;

/// Every parameter's gradient after `backward`, by parameter path.
fn named_grads<M: burn::module::Module<A>>(model: &M, grads: &<A as burn::tensor::backend::AutodiffBackend>::Gradients) -> NamedTensors {
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
    let mut visitor = Grads { grads, out: NamedTensors::new() };
    visit_with_paths(model, &mut visitor);
    visitor.out
}

/// Ours equal transformers' gradients (already under our names) to 1e-4 of each gradient's
/// largest entry, at least 1e-7: a gradient that is 0 up to rounding (the key bias's: softmax
/// ignores a per-query constant) is compared at that floor.
fn assert_grads_match(name: &str, ours: &NamedTensors, expected: &NamedTensors) {
    assert_eq!(expected.keys().collect::<Vec<_>>(), ours.keys().collect::<Vec<_>>(), "{name}");
    for (param, theirs) in expected {
        let scale = theirs.data.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (a, b) in ours[param].data.iter().zip(&theirs.data) {
            assert!((a - b).abs() <= 1e-4 * scale, "{name} {param}: ours {a}, transformers {b} (largest {scale})");
        }
    }
}

fn ids(t: &HostTensor) -> Vec<i64> {
    t.data.iter().map(|&v| if v < 0.0 { -1 } else { v as i64 }).collect()
}

/// Every parameter's gradient of the masked-LM loss (mean over the labelled positions of a
/// masked batch) equals transformers'.
#[test]
fn bert_gradients_match_transformers() {
    let dir = fixture("tiny_bert");
    let config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let (arch, config) = config_from_hf(&config_json).unwrap();
    let device = Default::default();
    let hf = from_safetensors(&std::fs::read(dir.join("model.safetensors")).unwrap()).unwrap();
    let model = load_named(config.init::<A>(0, &device), &from_hf(arch, &hf, config.n_layers(), true).unwrap()).unwrap();
    let mut expected = from_safetensors(&std::fs::read(dir.join("grads.safetensors")).unwrap()).unwrap();
    let (inputs, labels) = (ids(&expected.remove("inputs").unwrap()), ids(&expected.remove("labels").unwrap()));
    let n = inputs.len();
    let counted = labels.iter().filter(|&&l| l >= 0).count() as f64;
    let logits = model.forward(Tensor::from_data(TensorData::new(inputs, [2, n / 2]), &device)).expect("BERT reads single sequences");
    let vocab = logits.dims()[2];
    let loss = cross_entropy(logits.reshape([n, vocab]), Tensor::from_data(TensorData::new(labels, [n]), &device)).sum() / counted;
    let ours = named_grads(&model, &loss.backward());
    assert_grads_match("bert", &ours, &from_hf(arch, &expected, config.n_layers(), true).unwrap());
}

/// T5 (ReLU, and v1.1's gated GELU): logits of the decoder over an encoded input (one row
/// padded, masked from the encoder's and the cross-attention) equal
/// transformers' (1e-4), and so does every parameter's gradient of the loss on labels — the
/// relative position biases of both stacks and the cross-attention included.
#[test]
fn t5_logits_and_gradients_match_transformers() {
    for name in ["tiny_t5", "tiny_t5_gated"] {
        let dir = fixture(name);
        let config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let (arch, ModelConfig::T5(config)) = config_from_hf(&config_json).unwrap() else { panic!("{name} is a T5") };
        let device = Default::default();
        let hf = from_safetensors(&std::fs::read(dir.join("model.safetensors")).unwrap()).unwrap();
        let ours = from_hf(arch, &hf, config.n_layers, config.tie_embeddings).unwrap();
        let model = load_named(config.init::<A>(0, &device), &ours).unwrap();
        let reference = from_safetensors(&std::fs::read(dir.join("logits.safetensors")).unwrap()).unwrap();
        let batch = |key: &str| {
            let t = &reference[key];
            Tensor::<A, 2, Int>::from_data(TensorData::new(ids(t), [t.shape[0], t.shape[1]]), &device)
        };
        let lengths: Vec<usize> = reference["input_lengths"].data.iter().map(|&n| n as usize).collect();
        let logits = model.forward(batch("inputs"), &lengths, batch("decoder_inputs"));
        let expected = &reference["logits"];
        let values: Vec<f32> = logits.clone().into_data().into_vec().unwrap();
        let scale = expected.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in values.iter().zip(&expected.data).enumerate() {
            assert!((a - b).abs() <= 1e-4 * scale, "{name} logit {i}: ours {a}, transformers {b}");
        }
        let labels = ids(&reference["labels"]);
        let [rows, len, vocab] = logits.dims();
        let targets = Tensor::from_data(TensorData::new(labels, [rows * len]), &device);
        let loss = cross_entropy(logits.reshape([rows * len, vocab]), targets).sum() / (rows * len) as f64;
        let grads = named_grads(&model, &loss.backward());
        let hf_grads = from_safetensors(&std::fs::read(dir.join("grads.safetensors")).unwrap()).unwrap();
        assert_grads_match(name, &grads, &from_hf(arch, &hf_grads, config.n_layers, config.tie_embeddings).unwrap());
    }
}

/// Beam search on the decoder fixtures: the hypotheses transformers' `generate(num_beams=N)`
/// returns (scripts/reference/make_beam_fixture.py), token for token, scores to 1e-4, under
/// several beam counts, length penalties and early-stopping rules.
#[test]
fn beam_search_matches_transformers_generate() {
    use furnace_models::beam::{beam_search, BeamConfig, EarlyStopping};
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("beam_search.json")).unwrap()).unwrap();
    let device = Default::default();
    let mut checked = 0;
    for (name, cases) in cases.as_object().unwrap() {
        let (model, _) = load(name);
        let causal = model.as_causal().unwrap();
        for case in cases.as_array().unwrap() {
            let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect() };
            let config = BeamConfig {
                num_beams: case["num_beams"].as_u64().unwrap() as usize,
                max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
                length_penalty: case["length_penalty"].as_f64().unwrap() as f32,
                early_stopping: match &case["early_stopping"] {
                    serde_json::Value::Bool(true) => EarlyStopping::WhenFull,
                    serde_json::Value::Bool(false) => EarlyStopping::Heuristic,
                    _ => EarlyStopping::Never,
                },
                stop_tokens: vec![case["eos"].as_u64().unwrap() as u32],
            };
            let ours = beam_search(&causal, &ids(&case["prompt"]), &config, &device);
            let expected = case["beams"].as_array().unwrap();
            assert_eq!(ours.len(), expected.len(), "{name} {case}");
            for (hypothesis, beam) in ours.iter().zip(expected) {
                assert_eq!(hypothesis.tokens, ids(&beam["tokens"]), "{name}: {case}\nours: {ours:?}");
                let score = beam["score"].as_f64().unwrap() as f32;
                assert!(
                    (hypothesis.score - score).abs() <= 1e-4 * score.abs().max(1.0),
                    "{name}: score {} vs {score}: {case}",
                    hypothesis.score
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 4 * 3 * (4 + 4 + 3 + 2));
}

/// Sentence embeddings of the encoders, as `/v1/embeddings` serves them: BERT's last block's
/// output (transformers' `BertModel`) and T5's encoder output (`T5EncoderModel`) averaged over
/// positions, to 1e-4 (scripts/reference/make_embedding_fixture.py).
#[test]
fn encoder_embeddings_match_transformers() {
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("embeddings.json")).unwrap()).unwrap();
    let device = Default::default();
    for (name, cases) in cases.as_object().unwrap() {
        let model = model_of(name);
        for case in cases.as_array().unwrap() {
            let tokens: Vec<u32> = case["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
            let expected: Vec<f32> = case["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let ours = model.mean_hidden(&tokens, &device);
            assert_eq!(ours.len(), expected.len(), "{name}");
            let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
                assert!((a - b).abs() <= 1e-4 * scale, "{name} {tokens:?} dim {i}: ours {a}, transformers {b}");
            }
        }
    }
}
