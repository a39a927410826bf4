//! Each fused op recorded as one autodiff node whose backward calls the fused backward of the
//! inner backend. State holds the inputs the backward needs (no recomputation of the forward).

use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::ops::{FloatTensor, IntTensor};

use super::{AttentionSaved, FusedOps, Scan, ScanPrimitives};
use crate::blocks::NormKind;
use crate::nf4::Nf4Matrix;

type AdTensor<B, C> = FloatTensor<Autodiff<B, C>>;

pub fn gelu_tanh<B: FusedOps, C: CheckpointStrategy>(x: AdTensor<B, C>) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct GeluTanh;

    impl<B: FusedOps> Backward<B, 1> for GeluTanh {
        type State = FloatTensor<B>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let x = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| B::gelu_tanh_backward(x, grad));
        }
    }

    match GeluTanh.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(x.primitive.clone(), B::gelu_tanh(x.primitive)),
        OpsKind::UnTracked(prep) => prep.finish(B::gelu_tanh(x.primitive)),
    }
}

pub fn swiglu<B: FusedOps, C: CheckpointStrategy>(gate: AdTensor<B, C>, up: AdTensor<B, C>) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct SwiGlu;

    impl<B: FusedOps> Backward<B, 2> for SwiGlu {
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (gate, up) = ops.state;
            let grad = grads.consume::<B>(&ops.node);
            let (grad_gate, grad_up) = B::swiglu_backward(gate, up, grad);
            let [gate_node, up_node] = ops.parents;
            if let Some(node) = gate_node {
                grads.register::<B>(node.id, grad_gate);
            }
            if let Some(node) = up_node {
                grads.register::<B>(node.id, grad_up);
            }
        }
    }

    match SwiGlu.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = (gate.primitive.clone(), up.primitive.clone());
            prep.finish(state, B::swiglu(gate.primitive, up.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.primitive, up.primitive)),
    }
}

pub fn rope<B: FusedOps, C: CheckpointStrategy>(x: AdTensor<B, C>, cos: AdTensor<B, C>, sin: AdTensor<B, C>) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct Rope;

    impl<B: FusedOps> Backward<B, 1> for Rope {
        /// cos and sin.
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (cos, sin) = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| B::rope_backward(grad, cos, sin));
        }
    }

    match Rope.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let state = (cos.primitive.clone(), sin.primitive.clone());
            prep.finish(state, B::rope(x.primitive, cos.primitive, sin.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(B::rope(x.primitive, cos.primitive, sin.primitive)),
    }
}

pub fn multi_head_attention<B: FusedOps, C: CheckpointStrategy>(
    q: AdTensor<B, C>,
    k: AdTensor<B, C>,
    v: AdTensor<B, C>,
    bias: AdTensor<B, C>,
    scale: f32,
) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct Attention {
        scale: f32,
    }

    impl<B: FusedOps> Backward<B, 3> for Attention {
        type State = AttentionSaved<B>;

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<B>(&ops.node);
            let (grad_q, grad_k, grad_v) = B::multi_head_attention_backward(ops.state, grad, self.scale);
            for (node, grad) in ops.parents.into_iter().zip([grad_q, grad_k, grad_v]) {
                if let Some(node) = node {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    let prep = (Attention { scale }).prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful();
    match prep {
        OpsKind::Tracked(prep) => {
            let (out, kept) = B::multi_head_attention_forward(
                q.primitive.clone(),
                k.primitive.clone(),
                v.primitive.clone(),
                bias.primitive.clone(),
                scale,
            );
            let saved = AttentionSaved { q: q.primitive, k: k.primitive, v: v.primitive, bias: bias.primitive, out: out.clone(), kept };
            prep.finish(saved, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::multi_head_attention(q.primitive, k.primitive, v.primitive, bias.primitive, scale)),
    }
}

pub fn norm<B: FusedOps, C: CheckpointStrategy>(
    x: AdTensor<B, C>,
    weight: AdTensor<B, C>,
    bias: Option<AdTensor<B, C>>,
    kind: NormKind,
    eps: f32,
) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct Norm {
        kind: NormKind,
        eps: f32,
        with_bias: bool,
    }

    impl<B: FusedOps> Backward<B, 3> for Norm {
        type State = (FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (x, weight) = ops.state;
            let grad = grads.consume::<B>(&ops.node);
            let (grad_x, grad_weight, grad_bias) = B::norm_backward(x, weight, grad, self.kind, self.eps, self.with_bias);
            let [x_node, weight_node, bias_node] = ops.parents;
            if let Some(node) = x_node {
                grads.register::<B>(node.id, grad_x);
            }
            if let Some(node) = weight_node {
                grads.register::<B>(node.id, grad_weight);
            }
            if let (Some(node), Some(grad_bias)) = (bias_node, grad_bias) {
                grads.register::<B>(node.id, grad_bias);
            }
        }
    }

    // Without a bias the third parent is the weight again; its slot gets no gradient.
    let bias_node = bias.as_ref().unwrap_or(&weight).node.clone();
    let backward = Norm { kind, eps, with_bias: bias.is_some() };
    let prep = backward.prepare::<C>([x.node.clone(), weight.node.clone(), bias_node]).compute_bound().stateful();
    let output = |x, weight| B::norm(x, weight, bias.map(|b| b.primitive), kind, eps);
    match prep {
        OpsKind::Tracked(prep) => {
            let state = (x.primitive.clone(), weight.primitive.clone());
            prep.finish(state, output(x.primitive, weight.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(output(x.primitive, weight.primitive)),
    }
}

pub fn cross_entropy<B: FusedOps, C: CheckpointStrategy>(logits: AdTensor<B, C>, targets: IntTensor<Autodiff<B, C>>) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct CrossEntropy;

    impl<B: FusedOps> Backward<B, 1> for CrossEntropy {
        /// The gradient for unit output gradients, computed in the forward pass.
        type State = FloatTensor<B>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let unit_grad = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| B::scale_rows(unit_grad, grad));
        }
    }

    match CrossEntropy.prepare::<C>([logits.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (loss, unit_grad) = B::cross_entropy_with_grad(logits.primitive, targets);
            prep.finish(unit_grad, loss)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::cross_entropy(logits.primitive, targets)),
    }
}

pub fn nf4_matmul<B: FusedOps, C: CheckpointStrategy>(x: AdTensor<B, C>, weight: &Arc<Nf4Matrix>, transpose: bool) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct Nf4Matmul {
        transpose: bool,
    }

    impl<B: FusedOps> Backward<B, 1> for Nf4Matmul {
        /// The packed weight (shared, not copied): the backward dequantizes it again.
        type State = Arc<Nf4Matrix>;

        fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
            let weight = ops.state;
            unary::<B, _>(ops.parents, ops.node, grads, |grad| B::nf4_matmul(grad, &weight, !self.transpose));
        }
    }

    match (Nf4Matmul { transpose }).prepare::<C>([x.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = B::nf4_matmul(x.primitive, weight, transpose);
            prep.finish(weight.clone(), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::nf4_matmul(x.primitive, weight, transpose)),
    }
}

pub fn selective_scan<B: FusedOps, C: CheckpointStrategy>(s: ScanPrimitives<Autodiff<B, C>>) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct SelectiveScan;

    impl<B: FusedOps> Backward<B, 6> for SelectiveScan {
        /// The inputs: the backward recomputes the states rather than keeping
        /// `[batch, seq, channels, state]` of them alive between the passes.
        type State = ScanPrimitives<B>;

        fn backward(self, ops: Ops<Self::State, 6>, grads: &mut Gradients, _: &mut Checkpointer) {
            let grad = grads.consume::<B>(&ops.node);
            let g = B::selective_scan_backward(ops.state, grad);
            for (node, grad) in ops.parents.into_iter().zip([g.u, g.dt, g.a, g.b, g.c, g.d]) {
                if let Some(node) = node {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    let nodes = [&s.u, &s.dt, &s.a, &s.b, &s.c, &s.d].map(|t| t.node.clone());
    let inner = Scan { u: s.u.primitive, dt: s.dt.primitive, a: s.a.primitive, b: s.b.primitive, c: s.c.primitive, d: s.d.primitive };
    match SelectiveScan.prepare::<C>(nodes).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = B::selective_scan(inner.clone());
            prep.finish(inner, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::selective_scan(inner)),
    }
}

pub fn causal_conv_silu<B: FusedOps, C: CheckpointStrategy>(
    x: AdTensor<B, C>,
    weight: AdTensor<B, C>,
    bias: AdTensor<B, C>,
) -> AdTensor<B, C> {
    #[derive(Debug)]
    struct CausalConvSilu;

    impl<B: FusedOps> Backward<B, 3> for CausalConvSilu {
        /// The inputs: the backward recomputes the pre-activation.
        type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

        fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (x, weight, bias) = ops.state;
            let grad = grads.consume::<B>(&ops.node);
            let (grad_x, grad_weight, grad_bias) = B::causal_conv_silu_backward(x, weight, bias, grad);
            for (node, grad) in ops.parents.into_iter().zip([grad_x, grad_weight, grad_bias]) {
                if let Some(node) = node {
                    grads.register::<B>(node.id, grad);
                }
            }
        }
    }

    let prep = CausalConvSilu.prepare::<C>([x.node.clone(), weight.node.clone(), bias.node.clone()]).compute_bound().stateful();
    match prep {
        OpsKind::Tracked(prep) => {
            let out = B::causal_conv_silu(x.primitive.clone(), weight.primitive.clone(), bias.primitive.clone());
            prep.finish((x.primitive, weight.primitive, bias.primitive), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::causal_conv_silu(x.primitive, weight.primitive, bias.primitive)),
    }
}
