//! Each optimizer against its reference (tests/fixtures/optim.json, written by
//! scripts/reference/optim_reference.py): torch.optim.AdamW, and float64 transcriptions of
//! the Lion and Sophia papers' pseudo-code. Parameter groups, weight decay, bias correction,
//! global-norm clipping and Sophia's clip and curvature schedule all take part.

use burn::backend::Autodiff;
use burn::module::Param;
use burn::optim::GradientsParams;
use burn::prelude::*;
use furnace_core::params::ParamKind;
use serde_json::Value;

use crate::*;

type B = Autodiff<burn::backend::Flex>;
type Inner = burn::backend::Flex;

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

fn fixture() -> Value {
    serde_json::from_str(include_str!("../../tests/fixtures/optim.json")).unwrap()
}

fn grads_for(model: &Toy<B>, g: &Value) -> GradientsParams {
    let device = Default::default();
    let mut grads = GradientsParams::new();
    grads.register(model.weight.id, Tensor::<Inner, 1>::from_floats(flat(&g["weight"]).as_slice(), &device).reshape([3, 4]));
    grads.register(model.norm.id, Tensor::<Inner, 1>::from_floats(flat(&g["norm"]).as_slice(), &device));
    grads
}

/// Run the fixture's steps with `algorithm`; returns final (weight, norm) and per-step metrics.
fn run(algorithm: Algorithm, fx: &Value) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
    let device = Default::default();
    let tensor = |v: &Value| Tensor::<B, 1>::from_floats(flat(v).as_slice(), &device);
    let mut model = Toy::<B> {
        weight: Param::from_tensor(tensor(&fx["init"]["weight"]).reshape([3, 4]).require_grad()),
        norm: Param::from_tensor(tensor(&fx["init"]["norm"]).require_grad()),
    };
    let groups = DecayGroups {
        weight_decay: fx["weight_decay"].as_f64().unwrap(),
        decay_norms: false,
        decay_biases: false,
        decay_embeddings: false,
    };
    let kinds = [("weight".to_string(), ParamKind::Matrix), ("norm".to_string(), ParamKind::Norm)].into();
    let mut optimizer = Optimizer::<B>::new(algorithm, groups, kinds);
    let max_norm = fx["max_norm"].as_f64().unwrap();
    let batch = fx["sophia"]["config"]["batch"].as_f64().unwrap();
    let mut clip_fractions = Vec::new();
    for (step, g) in fx["grads"].as_array().unwrap().iter().enumerate() {
        if optimizer.needs_curvature(step as u64 + 1) {
            let curvature = grads_for(&model, &fx["curvature_grads"][step]);
            optimizer.update_curvature(&model, &curvature, batch);
        }
        let grads = grads_for(&model, g);
        let norm = global_grad_norm::<B, _>(&model, &grads);
        let expected = fx["grad_norms"][step].as_f64().unwrap();
        assert!((norm - expected).abs() < 1e-5 * expected, "step {step}: norm {norm} vs {expected}");
        model = optimizer.step(fx["lr"][step].as_f64().unwrap(), model, grads, clip_factor(norm, max_norm));
        clip_fractions.extend(optimizer.take_metrics().into_iter().map(|(_, v)| v));
    }
    (model.weight.val().into_data().into_vec().unwrap(), model.norm.val().into_data().into_vec().unwrap(), clip_fractions)
}

fn assert_matches(name: &str, fx: &Value, got: (Vec<f32>, Vec<f32>, Vec<f64>)) {
    let want_w = flat(&fx[name]["final"]["weight"]);
    let want_n = flat(&fx[name]["final"]["norm"]);
    for (i, (g, w)) in got.0.iter().chain(&got.1).zip(want_w.iter().chain(&want_n)).enumerate() {
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{name} value {i}: ours {g}, reference {w}");
    }
}

fn config(fx: &Value, name: &str, key: &str) -> f64 {
    fx[name]["config"][key].as_f64().unwrap()
}

#[test]
fn adamw_matches_pytorch() {
    let fx = fixture();
    let algorithm =
        Algorithm::AdamW { beta1: config(&fx, "adamw", "beta1"), beta2: config(&fx, "adamw", "beta2"), eps: config(&fx, "adamw", "eps") };
    assert_matches("adamw", &fx, run(algorithm, &fx));
}

#[test]
fn lion_matches_the_paper() {
    let fx = fixture();
    let algorithm = Algorithm::Lion { beta1: config(&fx, "lion", "beta1"), beta2: config(&fx, "lion", "beta2") };
    assert_matches("lion", &fx, run(algorithm, &fx));
}

#[test]
fn sophia_matches_the_paper_with_its_clip_fraction() {
    let fx = fixture();
    let algorithm = Algorithm::Sophia {
        beta1: config(&fx, "sophia", "beta1"),
        beta2: config(&fx, "sophia", "beta2"),
        rho: config(&fx, "sophia", "rho"),
        eps: config(&fx, "sophia", "eps"),
        hessian_interval: config(&fx, "sophia", "hessian_interval") as usize,
    };
    let got = run(algorithm, &fx);
    let want: Vec<f64> = fx["sophia"]["clip_fractions"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(got.2, want);
    assert_matches("sophia", &fx, got);
}

#[test]
fn only_sophia_asks_for_curvature_every_k_steps() {
    let sophia = Algorithm::Sophia { beta1: 0.9, beta2: 0.99, rho: 0.01, eps: 1e-12, hessian_interval: 10 };
    let asks: Vec<u64> = (1..=25).filter(|&s| sophia.needs_curvature(s)).collect();
    assert_eq!(asks, vec![1, 11, 21]);
    assert!(!(1..=25).any(|s| Algorithm::Lion { beta1: 0.9, beta2: 0.99 }.needs_curvature(s)));
}

#[test]
fn decay_groups_follow_kinds() {
    let groups = DecayGroups { weight_decay: 0.1, decay_norms: false, decay_biases: true, decay_embeddings: false };
    assert_eq!(groups.weight_decay_for(ParamKind::Matrix), 0.1);
    assert_eq!(groups.weight_decay_for(ParamKind::Bias), 0.1);
    assert_eq!(groups.weight_decay_for(ParamKind::Norm), 0.0);
    assert_eq!(groups.weight_decay_for(ParamKind::Embedding), 0.0);
    let all = DecayGroups { weight_decay: 0.1, decay_norms: true, decay_biases: false, decay_embeddings: true };
    assert_eq!(all.weight_decay_for(ParamKind::Norm), 0.1);
    assert_eq!(all.weight_decay_for(ParamKind::Embedding), 0.1);
    assert_eq!(all.weight_decay_for(ParamKind::Bias), 0.0);
}
