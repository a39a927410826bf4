//! Every fused op against its composed reference, forward values and gradients, on inputs
//! large enough to be split over several parallel tasks and with lengths that are not
//! multiples of the vector width. Gradients of the reference come from Burn's autodiff of the
//! composed graph, so the hand-written backward passes are checked independently.

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorPrimitive};

use super::*;
use crate::blocks::NormKind;

type Ad = Autodiff<Flex>;

fn random<const D: usize>(shape: [usize; D], scale: f64, seed: u64) -> Tensor<Ad, D> {
    let device = Default::default();
    Ad::seed(&device, seed);
    Tensor::<Ad, D>::random(shape, Distribution::Normal(0.0, scale), &device)
}

fn values<B: Backend, const D: usize>(x: Tensor<B, D>) -> Vec<f32> {
    x.into_data().convert::<f32>().into_vec().unwrap()
}

#[track_caller]
fn assert_close<B: Backend, const D: usize>(got: Tensor<B, D>, want: Tensor<B, D>, tol: f32, what: &str) {
    let (got, want) = (values(got), values(want));
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: fused {g} vs reference {w}");
    }
}

fn fused<const D: usize>(x: FloatTensor<Ad>) -> Tensor<Ad, D> {
    Tensor::from_primitive(TensorPrimitive::Float(x))
}

/// Gradient of `sum(f(x) · weights)` with respect to `x`.
fn grad_of<const D: usize, const E: usize>(x: &Tensor<Ad, D>, out: Tensor<Ad, E>, weights: &Tensor<Ad, E>) -> Tensor<Flex, D> {
    let grads = (out * weights.clone()).sum().backward();
    x.grad(&grads).expect("a gradient")
}

#[test]
fn gelu_tanh_matches_reference() {
    let x = random([3, 37, 300], 2.5, 1).require_grad();
    let weights = random([3, 37, 300], 1.0, 2);
    let want = fused::<3>(reference::gelu_tanh::<Ad>(x.clone().into_primitive().tensor()));
    let got = gelu_tanh(x.clone());
    assert_close(got.clone().inner(), want.clone().inner(), 2e-6, "gelu_tanh");
    assert_close(grad_of(&x, got, &weights), grad_of(&x, want, &weights), 2e-6, "gelu_tanh grad");
}

#[test]
fn swiglu_matches_reference() {
    let gate = random([2, 41, 250], 3.0, 3).require_grad();
    let up = random([2, 41, 250], 1.0, 4).require_grad();
    let weights = random([2, 41, 250], 1.0, 5);
    let want = fused::<3>(reference::swiglu::<Ad>(gate.clone().into_primitive().tensor(), up.clone().into_primitive().tensor()));
    let got = swiglu(gate.clone(), up.clone());
    assert_close(got.clone().inner(), want.clone().inner(), 2e-6, "swiglu");
    let grads_got = (got * weights.clone()).sum().backward();
    let grads_want = (want * weights).sum().backward();
    assert_close(gate.grad(&grads_got).unwrap(), gate.grad(&grads_want).unwrap(), 2e-6, "swiglu grad gate");
    assert_close(up.grad(&grads_got).unwrap(), up.grad(&grads_want).unwrap(), 2e-6, "swiglu grad up");
}

/// Causal mask (−∞ above the diagonal) plus a per-head slope, as ALiBi builds it.
fn causal_bias(heads: usize, queries: usize, keys: usize) -> Tensor<Ad, 4> {
    let offset = keys - queries;
    let mut data = Vec::new();
    for h in 0..heads {
        for q in 0..queries {
            for k in 0..keys {
                let allowed = k <= q + offset;
                data.push(if allowed { -0.1 * (h as f32 + 1.0) * (q + offset - k) as f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [1, heads, queries, keys]), &Default::default())
}

#[test]
fn attention_matches_reference() {
    // (batch, queries, keys, heads, kv_heads, per-head bias): training with a shared causal mask,
    // grouped key/value heads with a per-head (ALiBi-like) bias, and one decode step on a cache.
    for (batch, queries, keys, heads, kv_heads, bias_heads) in [(2, 67, 67, 4, 4, 1), (2, 37, 37, 6, 2, 6), (3, 1, 40, 4, 1, 1)] {
        let dim = 24;
        let q = random([batch, queries, heads, dim], 1.0, 6).require_grad();
        let k = random([batch, keys, kv_heads, dim], 1.0, 7).require_grad();
        let v = random([batch, keys, kv_heads, dim], 1.0, 8).require_grad();
        let weights = random([batch, queries, heads, dim], 1.0, 9);
        let bias = causal_bias(bias_heads, queries, keys);
        let scale = (dim as f32).powf(-0.5);
        let prim = |t: &Tensor<Ad, 4>| t.clone().into_primitive().tensor();
        let want = fused::<4>(reference::attention_forward::<Ad>(prim(&q), prim(&k), prim(&v), prim(&bias), scale).0);
        let got = multi_head_attention(q.clone(), k.clone(), v.clone(), bias, scale);
        let what = format!("attention b{batch} q{queries} k{keys} h{heads}/{kv_heads}");
        assert_close(got.clone().inner(), want.clone().inner(), 1e-5, &what);
        let grads_got = (got * weights.clone()).sum().backward();
        let grads_want = (want * weights).sum().backward();
        for (name, input) in [("q", &q), ("k", &k), ("v", &v)] {
            assert_close(input.grad(&grads_got).unwrap(), input.grad(&grads_want).unwrap(), 1e-5, &format!("{what} grad {name}"));
        }
    }
}

#[test]
fn norms_match_reference() {
    for (kind, with_bias) in [(NormKind::RmsNorm, false), (NormKind::LayerNorm, true), (NormKind::LayerNorm, false)] {
        let x = (random([5, 61, 70], 1.5, 8) + 0.3).require_grad();
        let weight = (random([70], 0.2, 9) + 1.0).require_grad();
        let bias = with_bias.then(|| random([70], 0.2, 10).require_grad());
        let weights = random([5, 61, 70], 1.0, 11);
        let want = fused::<3>(reference::norm::<Ad>(
            x.clone().into_primitive().tensor(),
            weight.clone().into_primitive().tensor(),
            bias.clone().map(|b| b.into_primitive().tensor()),
            kind,
            1e-5,
        ));
        let got = norm(x.clone(), weight.clone(), bias.clone(), kind, 1e-5);
        let what = format!("{kind:?} bias={with_bias}");
        assert_close(got.clone().inner(), want.clone().inner(), 2e-6, &what);
        let grads_got = (got * weights.clone()).sum().backward();
        let grads_want = (want * weights).sum().backward();
        assert_close(x.grad(&grads_got).unwrap(), x.grad(&grads_want).unwrap(), 1e-5, &format!("{what} grad x"));
        assert_close(weight.grad(&grads_got).unwrap(), weight.grad(&grads_want).unwrap(), 1e-5, &format!("{what} grad weight"));
        if let Some(bias) = bias {
            assert_close(bias.grad(&grads_got).unwrap(), bias.grad(&grads_want).unwrap(), 1e-5, &format!("{what} grad bias"));
        }
    }
}

#[test]
fn cross_entropy_matches_reference_and_ignores_negative_targets() {
    let (rows, vocab) = (67, 20_011);
    let logits = random([rows, vocab], 3.0, 12).require_grad();
    let targets: Vec<i64> = (0..rows).map(|r| if r % 7 == 3 { -100 } else { ((r * 7919) % vocab) as i64 }).collect();
    let targets = Tensor::<Ad, 1, Int>::from_data(TensorData::new(targets, [rows]), &Default::default());
    let weights = random([rows], 1.0, 13);
    let want = fused::<1>(reference::cross_entropy::<Ad>(logits.clone().into_primitive().tensor(), targets.clone().into_primitive()));
    let got = cross_entropy(logits.clone(), targets);
    assert_close(got.clone().inner(), want.clone().inner(), 2e-6, "cross_entropy");
    let loss = values(got.clone().inner());
    assert!(loss.iter().skip(3).step_by(7).all(|&l| l == 0.0), "ignored rows carry no loss");
    let grad = grad_of(&logits, got, &weights);
    assert!(values(grad.clone().narrow(0, 3, 1)).iter().all(|&g| g == 0.0), "ignored rows get no gradient");
    assert_close(grad, grad_of(&logits, want, &weights), 1e-6, "cross_entropy grad");
}
