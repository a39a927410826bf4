//! Full activation checkpointing (torchtitan's `mode = "full"`, PyTorch's
//! `checkpoint(block, x)` on every block): the forward pass keeps only each block's input and
//! builds no autodiff graph; backward then walks the
//! blocks from the last, recomputing one block's forward with autodiff from its saved input and
//! back-propagating the gradient that reached its output. Activation memory is one block's
//! plus the saved inputs, for about one more forward pass per step. Gradients are those of the
//! plain backward (summed in another order).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use furnace_models::LanguageModel;

use crate::backend::TrainBackend;

/// The gradients of `loss(logits)` for one micro-batch, and the loss (detached). The forward
/// pass runs without autodiff (Burn keeps a graph until a backward pass consumes it, so a
/// graph built and dropped per block would still be held); each block is then recomputed with
/// autodiff from its saved input. Dropout must be off (the recipe check says so): the pass
/// without autodiff draws none.
pub fn recomputed_gradients<B: TrainBackend>(
    model: &LanguageModel<B>,
    tokens: Tensor<B, 2, Int>,
    packed: Option<&[usize]>,
    loss: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 1>,
) -> (GradientsParams, Tensor<B::InnerBackend, 1>) {
    let valid = model.valid();
    let (embedded, ctx) = valid.embed(tokens.clone().inner(), packed);
    let mut inputs = vec![embedded];
    for i in 0..valid.n_blocks() {
        let output = valid.block(i, inputs[i].clone(), ctx.as_ref());
        inputs.push(output);
    }
    drop((valid, ctx));
    let (_, ctx) = model.embed(tokens.clone(), packed);
    let mut accumulator = GradientsAccumulator::new();
    let last = Tensor::<B, 3>::from_inner(inputs.pop().expect("the embedding")).require_grad();
    let loss = loss(model.finish(last.clone()));
    let detached_loss = loss.clone().inner();
    let grads = loss.backward();
    let mut upstream = last.grad(&grads).expect("the head reads the last block's output");
    accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    for i in (0..model.n_blocks()).rev() {
        let input = Tensor::<B, 3>::from_inner(inputs.pop().expect("a saved block input")).require_grad();
        let output = model.block(i, input.clone(), ctx.as_ref());
        let grads = (output * Tensor::from_inner(upstream)).sum().backward();
        upstream = input.grad(&grads).expect("a block reads its input");
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    let (embedded, _) = model.embed(tokens, packed);
    let grads = (embedded * Tensor::from_inner(upstream)).sum().backward();
    accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    (accumulator.grads(), detached_loss)
}
