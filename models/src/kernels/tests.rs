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

/// Causal mask (−∞ above the diagonal, and `window` or more positions back unless 0) plus a
/// per-head slope, as ALiBi builds it.
fn causal_bias(heads: usize, queries: usize, keys: usize, window: usize) -> Tensor<Ad, 4> {
    let offset = keys - queries;
    let mut data = Vec::new();
    for h in 0..heads {
        for q in 0..queries {
            for k in 0..keys {
                let allowed = k <= q + offset && (window == 0 || q + offset - k < window);
                data.push(if allowed { -0.1 * (h as f32 + 1.0) * (q + offset - k) as f32 } else { f32::NEG_INFINITY });
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [1, heads, queries, keys]), &Default::default())
}

#[test]
fn attention_matches_reference() {
    // (batch, queries, keys, heads, kv_heads, per-head bias, window): training with a shared
    // causal mask, grouped key/value heads with a per-head (ALiBi-like) bias, one decode step on
    // a cache, and a sliding window over several blocks of query rows (each reads a band of keys).
    let cases = [(2, 67, 67, 4, 4, 1, 0), (2, 37, 37, 6, 2, 6, 0), (3, 1, 40, 4, 1, 1, 0), (1, 150, 150, 4, 2, 1, 40)];
    for (batch, queries, keys, heads, kv_heads, bias_heads, window) in cases {
        let dim = 24;
        let q = random([batch, queries, heads, dim], 1.0, 6).require_grad();
        let k = random([batch, keys, kv_heads, dim], 1.0, 7).require_grad();
        let v = random([batch, keys, kv_heads, dim], 1.0, 8).require_grad();
        let weights = random([batch, queries, heads, dim], 1.0, 9);
        let bias = causal_bias(bias_heads, queries, keys, window);
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

type ScanTensors<B> = Scan<Tensor<B, 3>, Tensor<B, 2>, Tensor<B, 1>>;

/// Scan inputs in the ranges a Mamba layer feeds it: dt around softplus⁻¹ of 0.3, A < 0.
fn scan_inputs(batch: usize, seq: usize, channels: usize, state: usize, seed: u64) -> ScanTensors<Ad> {
    Scan {
        u: random([batch, seq, channels], 1.0, seed).require_grad(),
        dt: (random([batch, seq, channels], 1.0, seed + 1) - 1.0).require_grad(),
        a: random([channels, state], 0.5, seed + 2).exp().neg().detach().require_grad(),
        b: random([batch, seq, state], 1.0, seed + 3).require_grad(),
        c: random([batch, seq, state], 1.0, seed + 4).require_grad(),
        d: random([channels], 1.0, seed + 5).require_grad(),
    }
}

fn scan_primitives<B: Backend>(s: &ScanTensors<B>) -> ScanPrimitives<B> {
    Scan {
        u: s.u.clone().into_primitive().tensor(),
        dt: s.dt.clone().into_primitive().tensor(),
        a: s.a.clone().into_primitive().tensor(),
        b: s.b.clone().into_primitive().tensor(),
        c: s.c.clone().into_primitive().tensor(),
        d: s.d.clone().into_primitive().tensor(),
    }
}

/// The six input gradients of `sum(y · weights)`.
fn scan_grads(s: &ScanTensors<Ad>, y: Tensor<Ad, 3>, weights: &Tensor<Ad, 3>) -> [(&'static str, Vec<f32>); 6] {
    let grads = (y * weights.clone()).sum().backward();
    [
        ("u", values(s.u.grad(&grads).unwrap())),
        ("dt", values(s.dt.grad(&grads).unwrap())),
        ("a", values(s.a.grad(&grads).unwrap())),
        ("b", values(s.b.grad(&grads).unwrap())),
        ("c", values(s.c.grad(&grads).unwrap())),
        ("d", values(s.d.grad(&grads).unwrap())),
    ]
}

#[track_caller]
fn assert_all_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: {g} vs sequential {w}");
    }
}

#[test]
fn chunked_and_fused_scans_match_the_sequential_scan() {
    // Lengths below, at and across the chunk size (32), most not a multiple of it; channel
    // counts that do not fill the fused kernel's 16-channel tasks.
    for (batch, seq, channels, state) in [(2, 1, 5, 4), (2, 7, 37, 16), (1, 32, 16, 3), (3, 45, 21, 8), (1, 100, 9, 16)] {
        let what = format!("scan b{batch} t{seq} d{channels} n{state}");
        let s = scan_inputs(batch, seq, channels, state, seq as u64);
        let weights = random([batch, seq, channels], 1.0, 99);
        let want = reference::selective_scan_sequential(s.clone());
        let want_grads = scan_grads(&s, want.clone(), &weights);
        // The chunked scan, differentiated by Burn's autodiff through its tensor ops.
        let chunked = fused::<3>(reference::selective_scan::<Ad>(scan_primitives(&s)));
        assert_close(chunked.clone().inner(), want.clone().inner(), 1e-5, &format!("{what} chunked"));
        for ((name, got), (_, want)) in scan_grads(&s, chunked, &weights).iter().zip(&want_grads) {
            assert_all_close(got, want, 1e-4, &format!("{what} chunked autodiff grad {name}"));
        }
        // The chunked hand-written backward (what GPU backends run).
        let inner = Scan {
            u: s.u.clone().inner(),
            dt: s.dt.clone().inner(),
            a: s.a.clone().inner(),
            b: s.b.clone().inner(),
            c: s.c.clone().inner(),
            d: s.d.clone().inner(),
        };
        let g = reference::selective_scan_backward::<Flex>(scan_primitives(&inner), weights.clone().inner().into_primitive().tensor());
        for (got, (name, want)) in [g.u, g.dt, g.a, g.b, g.c, g.d].into_iter().zip(&want_grads) {
            let got = values(Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(got)).flatten::<1>(0, 0));
            assert_all_close(&got, want, 1e-4, &format!("{what} chunked backward grad {name}"));
        }
        // The fused flex kernel, one autodiff node.
        let got = selective_scan(s.clone());
        assert_close(got.clone().inner(), want.inner(), 1e-5, &format!("{what} fused"));
        for ((name, got), (_, want)) in scan_grads(&s, got, &weights).iter().zip(&want_grads) {
            assert_all_close(got, want, 1e-4, &format!("{what} fused grad {name}"));
        }
    }
}

#[test]
fn scan_gradients_match_finite_differences() {
    let (batch, seq, channels, state) = (1, 6, 3, 2);
    let s = scan_inputs(batch, seq, channels, state, 7);
    let weights = random([batch, seq, channels], 1.0, 8);
    let analytic = scan_grads(&s, selective_scan(s.clone()), &weights);
    let host = |t: &Tensor<Ad, 3>| values(t.clone().inner());
    let base = [host(&s.u), host(&s.dt), values(s.a.clone().inner()), host(&s.b), host(&s.c), values(s.d.clone().inner())];
    let loss = |inputs: &[Vec<f32>; 6]| -> f64 {
        let device = Default::default();
        let t3 = |v: &Vec<f32>, last: usize| Tensor::<Flex, 3>::from_data(TensorData::new(v.clone(), [batch, seq, last]), &device);
        let y = selective_scan(Scan {
            u: t3(&inputs[0], channels),
            dt: t3(&inputs[1], channels),
            a: Tensor::<Flex, 2>::from_data(TensorData::new(inputs[2].clone(), [channels, state]), &device),
            b: t3(&inputs[3], state),
            c: t3(&inputs[4], state),
            d: Tensor::<Flex, 1>::from_data(TensorData::new(inputs[5].clone(), [channels]), &device),
        });
        values(y).iter().zip(values(weights.clone().inner())).map(|(y, w)| (y * w) as f64).sum()
    };
    let eps = 1e-2;
    for (input, (name, grad)) in analytic.iter().enumerate() {
        for (i, &g) in grad.iter().enumerate() {
            let (mut plus, mut minus) = (base.clone(), base.clone());
            plus[input][i] += eps;
            minus[input][i] -= eps;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * eps as f64);
            assert!(
                (g as f64 - numeric).abs() <= 2e-3 * (1.0 + numeric.abs()),
                "d/d{name}[{i}]: analytic {g} vs finite difference {numeric}"
            );
        }
    }
}

#[test]
fn causal_conv_silu_matches_reference() {
    // Sequences shorter than the filter, and position blocks that straddle two sequences.
    for (batch, seq, channels, width) in [(3, 2, 5, 4), (2, 100, 37, 4), (3, 45, 16, 3)] {
        let what = format!("conv b{batch} t{seq} d{channels} w{width}");
        let x = random([batch, seq, channels], 1.0, 21).require_grad();
        let weight = random([channels, width], 0.5, 22).require_grad();
        let bias = random([channels], 0.5, 23).require_grad();
        let weights = random([batch, seq, channels], 1.0, 24);
        let p = |t: &Tensor<Ad, 3>| t.clone().into_primitive().tensor();
        let want = fused::<3>(reference::causal_conv_silu::<Ad>(
            p(&x),
            weight.clone().into_primitive().tensor(),
            bias.clone().into_primitive().tensor(),
        ));
        let got = causal_conv_silu(x.clone(), weight.clone(), bias.clone());
        assert_close(got.clone().inner(), want.clone().inner(), 1e-5, &what);
        let grads_got = (got * weights.clone()).sum().backward();
        let grads_want = (want * weights.clone()).sum().backward();
        assert_close(x.grad(&grads_got).unwrap(), x.grad(&grads_want).unwrap(), 1e-5, &format!("{what} grad x"));
        assert_close(weight.grad(&grads_got).unwrap(), weight.grad(&grads_want).unwrap(), 1e-4, &format!("{what} grad weight"));
        assert_close(bias.grad(&grads_got).unwrap(), bias.grad(&grads_want).unwrap(), 1e-4, &format!("{what} grad bias"));
        // The hand-written tensor-op backward (what GPU backends run) against autodiff.
        let (gx, gw, gb) = reference::causal_conv_silu_backward::<Flex>(
            x.clone().inner().into_primitive().tensor(),
            weight.clone().inner().into_primitive().tensor(),
            bias.clone().inner().into_primitive().tensor(),
            weights.clone().inner().into_primitive().tensor(),
        );
        let t = |g| Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(g));
        assert_close(t(gx), x.grad(&grads_want).unwrap(), 1e-5, &format!("{what} reference grad x"));
        assert_close(
            Tensor::<Flex, 2>::from_primitive(TensorPrimitive::Float(gw)),
            weight.grad(&grads_want).unwrap(),
            1e-4,
            &format!("{what} reference grad weight"),
        );
        assert_close(
            Tensor::<Flex, 1>::from_primitive(TensorPrimitive::Float(gb)),
            bias.grad(&grads_want).unwrap(),
            1e-4,
            &format!("{what} reference grad bias"),
        );
    }
}

/// Random angle tables (unlike Llama's, whose halves repeat, so a swapped half shows), for
/// `batch_rows` rows of positions.
fn rope_tables(batch_rows: usize, seq: usize, head_dim: usize, seed: u64) -> (Tensor<Ad, 4>, Tensor<Ad, 4>) {
    let angles = random([batch_rows, seq, 1, head_dim], 2.0, seed);
    (angles.clone().cos(), angles.sin())
}

#[test]
fn rope_matches_reference() {
    // One row of tables broadcast over the batch (positions 0..seq), and one per row (packed).
    for table_rows in [1, 3] {
        let x = random([3, 29, 5, 24], 1.0, 6).require_grad();
        let weights = random([3, 29, 5, 24], 1.0, 7);
        let (cos, sin) = rope_tables(table_rows, 29, 24, 8);
        let prim = |t: &Tensor<Ad, 4>| t.clone().into_primitive().tensor();
        let want = fused::<4>(reference::rope::<Ad>(prim(&x), prim(&cos), prim(&sin)));
        let got = rope(x.clone(), cos, sin);
        assert_close(got.clone().inner(), want.clone().inner(), 2e-6, "rope");
        assert_close(grad_of(&x, got, &weights), grad_of(&x, want, &weights), 2e-6, "rope grad");
    }
}

/// The hand-written reference backward (other backends' default) is the composed forward's
/// autodiff gradient.
#[test]
fn rope_reference_backward_is_the_gradient() {
    let x = random([2, 11, 3, 8], 1.0, 9).require_grad();
    let weights = random([2, 11, 3, 8], 1.0, 10);
    let (cos, sin) = rope_tables(2, 11, 8, 11);
    let prim = |t: &Tensor<Ad, 4>| t.clone().into_primitive().tensor();
    let out = fused::<4>(reference::rope::<Ad>(prim(&x), prim(&cos), prim(&sin)));
    let want = grad_of(&x, out, &weights);
    let inner = |t: Tensor<Ad, 4>| t.inner().into_primitive().tensor();
    let got = reference::rope_backward::<Flex>(inner(weights), inner(cos), inner(sin));
    assert_close(Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(got)), want, 1e-6, "rope reference backward");
}

#[test]
fn paged_attention_matches_reference() {
    use crate::paged::{PagedStep, StepSequence};
    let (heads, kv_heads, dim, rows) = (6, 2, 24, 12 * 16);
    let flex = |t: Tensor<Ad, 3>| t.inner().into_primitive().tensor();
    let (keys, vals) = (flex(random([rows, kv_heads, dim], 1.0, 30)), flex(random([rows, kv_heads, dim], 1.0, 31)));
    // A decode step, a prompt chunk after earlier ones, and a whole first block, each through
    // a table of scattered blocks.
    let sequences = vec![
        StepSequence { table: vec![5, 2, 9], context: 40, queries: 1 },
        StepSequence { table: vec![0, 11], context: 21, queries: 5 },
        StepSequence { table: vec![7], context: 16, queries: 16 },
    ];
    let tokens = 1 + 5 + 16;
    let q = random([1, tokens, heads, dim], 1.0, 32).inner();
    for (sliding_window, alibi) in [(0, None), (5, Some(crate::blocks::alibi_slopes(heads)))] {
        let mut step = PagedStep { sequences: sequences.clone(), slots: Vec::new(), block_size: 16, sliding_window, alibi };
        step.slots = step.sequences.iter().flat_map(|s| (s.context - s.queries..s.context).map(|p| step.slot(s, p))).collect();
        let scale = (dim as f32).powf(-0.5);
        let got = Flex::paged_attention(q.clone().into_primitive().tensor(), keys.clone(), vals.clone(), &step, scale);
        let want = reference::paged_attention::<Flex>(q.clone().into_primitive().tensor(), keys.clone(), vals.clone(), &step, scale);
        let as_tensor = |t| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(t));
        assert_close(as_tensor(got), as_tensor(want), 1e-5, &format!("paged attention, window {sliding_window}"));
        // Writing the step's keys: in place, equal to the composed scatter.
        let new = random([1, tokens, kv_heads, dim], 1.0, 33).inner().into_primitive().tensor();
        let got = Flex::paged_kv_write(keys.clone(), new.clone(), &step.slots);
        let want = reference::paged_kv_write::<Flex>(keys.clone(), new, &step.slots);
        let as_tensor = |t| Tensor::<Flex, 3>::from_primitive(TensorPrimitive::Float(t));
        assert_close(as_tensor(got), as_tensor(want), 0.0, "paged kv write");
    }
}
