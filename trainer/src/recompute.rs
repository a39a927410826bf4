//! Activation checkpointing (torchtitan's `mode = "full"`, PyTorch's `checkpoint(block, x)` on
//! every block, or on every N-th block in `mode = "selective"`): the forward pass keeps only a
//! checkpointed block's input and builds no autodiff graph for it; backward then walks the
//! blocks from the last, recomputing each checkpointed block's forward with autodiff from its
//! saved input and back-propagating the gradient that reached its output. In full mode
//! activation memory is one block's plus the saved inputs, for about one more forward pass per
//! step. Gradients are those of the plain backward (summed in another order). FSDP runs every
//! step through here, gathering each block's parameters just before the block runs.

use std::borrow::Cow;

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use furnace_models::{LanguageModel, RouterLossWeights, Routing};

use crate::backend::TrainBackend;
use crate::parallel::{in_block, Parallel};

/// What the forward pass kept of one block for backward.
enum Kept<B: TrainBackend> {
    /// A recomputed block: its input alone.
    Input(Tensor<B::InnerBackend, 3>),
    /// A block outside the checkpointed ones: its autodiff graph, from a leaf input to the
    /// output and router logits, and under FSDP the copy of the model holding its gathered
    /// parameters (their gradients are found through it).
    Graph { input: Tensor<B, 3>, output: Tensor<B, 3>, router: Option<Tensor<B, 2>>, gathered: Option<LanguageModel<B>> },
}

/// The model a block runs in: the one given, or under FSDP (`sharded`) a copy with that
/// block's parameters gathered from their owners, released when the copy is dropped.
fn with_block<'m, B: TrainBackend>(model: &'m LanguageModel<B>, block: usize, sharded: Option<&Parallel>) -> Cow<'m, LanguageModel<B>> {
    match sharded {
        Some(parallel) => Cow::Owned(parallel.gather(model.clone(), |path| in_block(path, Some(block)))),
        None => Cow::Borrowed(model),
    }
}

/// The gradients of `loss(logits)` for one micro-batch, and the loss (detached). Every
/// `every`-th block (1: each one, torchtitan's full mode; N: its layer-wise selective mode)
/// except the last runs forward without autodiff (Burn keeps a graph until a backward pass
/// consumes it, so a graph built and dropped per block would still be held) and is recomputed
/// with autodiff from its saved input in backward; the others keep their graphs from the
/// forward pass. Dropout must be off (the recipe check says so): the pass without autodiff
/// draws none.
///
/// A mixture of experts' router losses span every layer; `router` turns the pass's routing
/// into their value (added to the returned loss) and each layer's share of them (see
/// `RouterLossWeights`), back-propagated with that layer.
///
/// Under FSDP (`sharded`, with every = 1) `model` holds the parameters outside the blocks and
/// only its own share of the blocks'; each block's are gathered just before it runs, forward and
/// again in backward, and released after, and each part's gradients are reduced to their owners
/// as soon as its backward ends, so the result holds this rank's own gradients only.
pub fn recomputed_gradients<B: TrainBackend>(
    model: &LanguageModel<B>,
    tokens: Tensor<B, 2, Int>,
    packed: Option<&[usize]>,
    every: usize,
    sharded: Option<&Parallel>,
    loss: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 1>,
    router: impl FnOnce(&Routing<B::InnerBackend>) -> (Tensor<B::InnerBackend, 1>, RouterLossWeights),
) -> (GradientsParams, Tensor<B::InnerBackend, 1>) {
    let reduce = |model: &LanguageModel<B>, grads: GradientsParams| match sharded {
        Some(parallel) => parallel.reduce_gradients(model, grads),
        None => grads,
    };
    let valid = model.valid();
    let (mut x, valid_ctx) = valid.embed(tokens.clone().inner(), packed);
    let (_, ctx) = model.embed(tokens.clone(), packed);
    let n_blocks = model.n_blocks();
    let mut kept = Vec::with_capacity(n_blocks);
    let mut router_logits = Vec::new();
    for i in 0..n_blocks {
        let block_model = with_block(model, i, sharded);
        // The last block keeps its graph: its backward follows the forward pass at once, so
        // recomputing it would save nothing.
        if (i + 1) % every == 0 && i + 1 < n_blocks {
            let block_valid = match &block_model {
                Cow::Owned(gathered) => Cow::Owned(gathered.valid()),
                Cow::Borrowed(_) => Cow::Borrowed(&valid),
            };
            let (output, router) = block_valid.block(i, x.clone(), valid_ctx.as_ref());
            router_logits.extend(router);
            kept.push(Kept::<B>::Input(std::mem::replace(&mut x, output)));
        } else {
            let input = Tensor::<B, 3>::from_inner(x).require_grad();
            let (output, router) = block_model.block(i, input.clone(), ctx.as_ref());
            router_logits.extend(router.as_ref().map(|r| r.clone().inner()));
            x = output.clone().inner();
            kept.push(Kept::Graph { input, output, router, gathered: sharded.map(|_| block_model.into_owned()) });
        }
    }
    let router_weights = valid.routing(router_logits).map(|routing| {
        let (total, weights) = router(&routing);
        (weights, total)
    });
    drop((valid, valid_ctx));
    let mut accumulator = GradientsAccumulator::new();
    let last = Tensor::<B, 3>::from_inner(x).require_grad();
    let loss = loss(model.finish(last.clone()));
    let detached_loss = match &router_weights {
        Some((_, router_total)) => loss.clone().inner() + router_total.clone(),
        None => loss.clone().inner(),
    };
    let grads = loss.backward();
    let mut upstream = last.grad(&grads).expect("the head reads the last block's output");
    accumulator.accumulate(model, reduce(model, GradientsParams::from_grads(grads, model)));
    for i in (0..n_blocks).rev() {
        let (input, output, router, block_model) = match kept.pop().expect("one kept entry per block") {
            Kept::Input(x) => {
                let block_model = with_block(model, i, sharded);
                let input = Tensor::<B, 3>::from_inner(x).require_grad();
                let (output, router) = block_model.block(i, input.clone(), ctx.as_ref());
                (input, output, router, block_model)
            }
            Kept::Graph { input, output, router, gathered } => (input, output, router, gathered.map_or(Cow::Borrowed(model), Cow::Owned)),
        };
        let through_output = (output * Tensor::from_inner(upstream)).sum();
        let objective = match (router, &router_weights) {
            (Some(logits), Some((weights, _))) => through_output + weights.layer_loss(logits),
            _ => through_output,
        };
        let grads = objective.backward();
        upstream = input.grad(&grads).expect("a block reads its input");
        let grads = GradientsParams::from_grads(grads, block_model.as_ref());
        accumulator.accumulate(model, reduce(&block_model, grads));
    }
    let (embedded, _) = model.embed(tokens, packed);
    let grads = (embedded * Tensor::from_inner(upstream)).sum().backward();
    accumulator.accumulate(model, reduce(model, GradientsParams::from_grads(grads, model)));
    (accumulator.grads(), detached_loss)
}
