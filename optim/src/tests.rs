//! AdamW against torch.optim.AdamW (fixture from scripts/reference/make_optim_fixtures.py).

use burn::backend::Autodiff;
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde_json::Value;

use crate::*;

type B = Autodiff<burn::backend::Flex>;

#[derive(Module, Debug)]
struct Toy<B: Backend> {
    weight: Param<Tensor<B, 2>>,
    norm: Param<Tensor<B, 1>>,
}

fn flat(v: &Value) -> Vec<f32> {
    match v {
        Value::Array(items) => items.iter().flat_map(flat).collect(),
        other => vec![other.as_f64().unwrap() as f32],
    }
}

#[test]
fn adamw_with_groups_and_clipping_matches_pytorch() {
    let fixture: Value = serde_json::from_str(include_str!("../../tests/fixtures/adamw.json")).unwrap();
    let c = &fixture["config"];
    let device = Default::default();
    let mut model = Toy::<B> {
        weight: Param::from_tensor(Tensor::<B, 1>::from_floats(flat(&fixture["init"]["weight"]).as_slice(), &device).reshape([3, 4]).require_grad()),
        norm: Param::from_tensor(Tensor::<B, 1>::from_floats(flat(&fixture["init"]["norm"]).as_slice(), &device).require_grad()),
    };
    let mut adamw = AdamW::<B>::new(AdamWConfig {
        beta1: c["beta1"].as_f64().unwrap(),
        beta2: c["beta2"].as_f64().unwrap(),
        eps: c["eps"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
        decay_norms: false,
        decay_biases: false,
        decay_embeddings: false,
    });
    let max_norm = c["max_norm"].as_f64().unwrap();
    for (step, g) in fixture["grads"].as_array().unwrap().iter().enumerate() {
        let mut grads = GradientsParams::new();
        grads.register(model.weight.id, Tensor::<burn::backend::Flex, 1>::from_floats(flat(&g["weight"]).as_slice(), &device).reshape([3, 4]));
        grads.register(model.norm.id, Tensor::<burn::backend::Flex, 1>::from_floats(flat(&g["norm"]).as_slice(), &device));
        let norm = global_grad_norm::<B, _>(&model, &grads);
        let expected_norm = fixture["grad_norms"][step].as_f64().unwrap();
        assert!((norm - expected_norm).abs() < 1e-5 * expected_norm, "step {step}: norm {norm} vs {expected_norm}");
        let lr = c["lr"][step].as_f64().unwrap();
        model = adamw.step(lr, model, grads, clip_factor(norm, max_norm));
    }
    let got_w: Vec<f32> = model.weight.val().into_data().into_vec().unwrap();
    let got_n: Vec<f32> = model.norm.val().into_data().into_vec().unwrap();
    for (got, want) in got_w.iter().chain(&got_n).zip(flat(&fixture["final"]["weight"]).iter().chain(&flat(&fixture["final"]["norm"]))) {
        assert!((got - want).abs() < 1e-5, "ours {got}, pytorch {want}");
    }
}

#[test]
fn parameter_groups_follow_paths() {
    assert_eq!(ParamKind::classify("layers.0.attention.q_proj.weight", 2), ParamKind::Matrix);
    assert_eq!(ParamKind::classify("layers.0.attention.q_proj.bias", 1), ParamKind::Bias);
    assert_eq!(ParamKind::classify("layers.3.ffn_norm.weight", 1), ParamKind::Norm);
    assert_eq!(ParamKind::classify("embed_tokens", 2), ParamKind::Embedding);
    assert_eq!(ParamKind::classify("embed_positions", 2), ParamKind::Embedding);
}
