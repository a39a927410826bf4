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
use burn::tensor::backend::AutodiffBackend;

use furnace_models::t5::T5;
use furnace_models::{LanguageModel, RouterLossWeights, Routing, Unsupported};

use crate::backend::TrainBackend;
use crate::parallel::{GradientReduction, Parallel};

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
        Some(parallel) => Cow::Owned(parallel.gather_block(model.clone(), Some(block))),
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
/// With a `reduction`, each part's gradients (the head's, each block's, the embedding's) go
/// into it as soon as that part's backward ends, so their transfer overlaps the rest of
/// backward, and the result is the reduced gradients. Under FSDP (`sharded`, with every = 1)
/// `model` holds the parameters outside the blocks and only its own share of the blocks'; each
/// block's are gathered just before it runs, forward and again in backward, and released after.
#[allow(clippy::too_many_arguments)]
pub fn recomputed_gradients<B: TrainBackend>(
    model: &LanguageModel<B>,
    tokens: Tensor<B, 2, Int>,
    packed: Option<&[usize]>,
    every: usize,
    sharded: Option<&Parallel>,
    mut reduction: Option<GradientReduction<'_>>,
    loss: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 1>,
    router: impl FnOnce(&Routing<B::InnerBackend>) -> (Tensor<B::InnerBackend, 1>, RouterLossWeights),
) -> Result<(GradientsParams, Tensor<B::InnerBackend, 1>), Unsupported> {
    let mut accumulator = GradientsAccumulator::new();
    let mut hand_over = |part: &LanguageModel<B>, grads: GradientsParams| match reduction.as_mut() {
        Some(reduction) => reduction.add(part, grads),
        None => accumulator.accumulate(model, grads),
    };
    let valid = model.valid();
    let (mut x, valid_ctx) = valid.blocks()?.embed(tokens.clone().inner(), packed);
    let (_, ctx) = model.blocks()?.embed(tokens.clone(), packed);
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
            let (output, router) = block_valid.blocks()?.block(i, x.clone(), &valid_ctx)?;
            router_logits.extend(router);
            kept.push(Kept::<B>::Input(std::mem::replace(&mut x, output)));
        } else {
            let input = Tensor::<B, 3>::from_inner(x).require_grad();
            let (output, router) = block_model.blocks()?.block(i, input.clone(), &ctx)?;
            router_logits.extend(router.as_ref().map(|r| r.clone().inner()));
            x = output.clone().inner();
            kept.push(Kept::Graph { input, output, router, gathered: sharded.map(|_| block_model.into_owned()) });
        }
    }
    let router_weights = valid.blocks()?.routing(router_logits).map(|routing| {
        let (total, weights) = router(&routing);
        (weights, total)
    });
    drop((valid, valid_ctx));
    let last = Tensor::<B, 3>::from_inner(x).require_grad();
    let loss = loss(model.blocks()?.finish(last.clone()));
    let detached_loss = match &router_weights {
        Some((_, router_total)) => loss.clone().inner() + router_total.clone(),
        None => loss.clone().inner(),
    };
    let grads = loss.backward();
    let mut upstream = last.grad(&grads).expect("the head reads the last block's output");
    hand_over(model, GradientsParams::from_grads(grads, model));
    for i in (0..n_blocks).rev() {
        let (input, output, router, block_model) = match kept.pop().expect("one kept entry per block") {
            Kept::Input(x) => {
                let block_model = with_block(model, i, sharded);
                let input = Tensor::<B, 3>::from_inner(x).require_grad();
                let (output, router) = block_model.blocks()?.block(i, input.clone(), &ctx)?;
                (input, output, router, block_model)
            }
            Kept::Graph { input, output, router, gathered } => (input, output, router, gathered.map_or(Cow::Borrowed(model), Cow::Owned)),
        };
        let router_share = match (router, &router_weights) {
            (Some(logits), Some((weights, _))) => Some(weights.layer_loss(logits)),
            _ => None,
        };
        let grads;
        (grads, upstream) = through_block(&input, output, upstream, router_share);
        hand_over(block_model.as_ref(), GradientsParams::from_grads(grads, block_model.as_ref()));
    }
    let (embedded, _) = model.blocks()?.embed(tokens, packed);
    let grads = (embedded * Tensor::from_inner(upstream)).sum().backward();
    hand_over(model, GradientsParams::from_grads(grads, model));
    Ok(match reduction {
        Some(reduction) => (reduction.finish(model), detached_loss),
        None => (accumulator.grads(), detached_loss),
    })
}

/// Back-propagates `upstream`, the gradient reaching a block's output, through the block's
/// graph (plus `extra`, a loss term read inside the block): the gradients, and the one at the
/// block's input.
fn through_block<B: TrainBackend>(
    input: &Tensor<B, 3>,
    output: Tensor<B, 3>,
    upstream: Tensor<B::InnerBackend, 3>,
    extra: Option<Tensor<B, 1>>,
) -> (<B as AutodiffBackend>::Gradients, Tensor<B::InnerBackend, 3>) {
    let through_output = (output * Tensor::from_inner(upstream)).sum();
    let grads = match extra {
        Some(extra) => (through_output + extra).backward(),
        None => through_output.backward(),
    };
    let upstream = input.grad(&grads).expect("a block reads its input");
    (grads, upstream)
}

/// T5's gradients under activation checkpointing, as [`recomputed_gradients`] for each stack:
/// every encoder block and every `every`-th decoder block but the last run without autodiff
/// and are recomputed in backward. (The encoder's blocks cannot keep their graphs: Burn 0.21's
/// autodiff memory management frees, nondeterministically, a graph kept from the forward pass
/// across the decoder's backward passes.) Every decoder block also reads the encoder's output,
/// through a leaf of its own; those leaves' gradients sum over the decoder's backward before the
/// encoder's begins. Each block run with autodiff builds its own position bias from the table,
/// so the table's gradient sums over blocks as in the plain pass.
pub fn recomputed_seq2seq_gradients<B: TrainBackend>(
    model: &T5<B>,
    input: Tensor<B, 2, Int>,
    lengths: &[usize],
    decoder_input: Tensor<B, 2, Int>,
    every: usize,
    loss: impl FnOnce(Tensor<B, 3>) -> Tensor<B, 1>,
) -> (GradientsParams, Tensor<B::InnerBackend, 1>) {
    let (input_len, target_len) = (input.dims()[1], decoder_input.dims()[1]);
    let recomputed = |index: usize| (index + 1).is_multiple_of(every);
    let valid = model.valid();
    let mut accumulator = GradientsAccumulator::new();
    let mut accumulate = |grads| accumulator.accumulate(model, GradientsParams::from_grads(grads, model));

    let encoder_bias = valid.encoder_bias(input_len, lengths);
    let mut x = valid.embed(input.clone().inner());
    let mut encoder_inputs = Vec::with_capacity(model.encoder_layers.len());
    for layer in &valid.encoder_layers {
        let output = layer.forward(x.clone(), &encoder_bias, None, None);
        encoder_inputs.push(std::mem::replace(&mut x, output));
    }
    let encoder_last = x;
    let encoded = valid.encoder_finish(encoder_last.clone());
    // Each decoder block reads the encoder's output through a leaf of its own (graphs kept
    // from the forward pass must share no node but the parameters).
    let memory = || Tensor::<B, 3>::from_inner(encoded.clone()).require_grad();

    let decoder_biases = valid.decoder_biases(target_len, input_len, lengths);
    let n_decoder = model.decoder_layers.len();
    let mut y = valid.embed(decoder_input.clone().inner());
    let mut decoder_kept = Vec::with_capacity(n_decoder);
    for i in 0..n_decoder {
        if recomputed(i) && i + 1 < n_decoder {
            let output = valid.decoder_block(i, y.clone(), encoded.clone(), &decoder_biases);
            decoder_kept.push((Kept::<B>::Input(std::mem::replace(&mut y, output)), None));
        } else {
            let (input, read) = (Tensor::<B, 3>::from_inner(y).require_grad(), memory());
            let biases = model.decoder_biases(target_len, input_len, lengths);
            let output = model.decoder_block(i, input.clone(), read.clone(), &biases);
            y = output.clone().inner();
            decoder_kept.push((Kept::Graph { input, output, router: None, gathered: None }, Some(read)));
        }
    }
    drop((valid, encoder_bias, decoder_biases));

    let last = Tensor::<B, 3>::from_inner(y).require_grad();
    let loss = loss(model.decoder_finish(last.clone()));
    let detached_loss = loss.clone().inner();
    let grads = loss.backward();
    let mut upstream = last.grad(&grads).expect("the head reads the last block's output");
    accumulate(grads);
    let mut memory_grad: Option<Tensor<B::InnerBackend, 3>> = None;
    for i in (0..n_decoder).rev() {
        let (input, output, read) = match decoder_kept.pop().expect("one kept entry per block") {
            (Kept::Input(y), _) => {
                let (input, read) = (Tensor::<B, 3>::from_inner(y).require_grad(), memory());
                let biases = model.decoder_biases(target_len, input_len, lengths);
                let output = model.decoder_block(i, input.clone(), read.clone(), &biases);
                (input, output, read)
            }
            (Kept::Graph { input, output, .. }, read) => (input, output, read.expect("a kept decoder block holds its read")),
        };
        let grads;
        (grads, upstream) = through_block(&input, output, upstream, None);
        let from_block = read.grad(&grads).expect("a decoder block reads the encoder's output");
        memory_grad = Some(match memory_grad.take() {
            Some(total) => total + from_block,
            None => from_block,
        });
        accumulate(grads);
    }
    accumulate((model.embed(decoder_input) * Tensor::from_inner(upstream)).sum().backward());

    let last = Tensor::<B, 3>::from_inner(encoder_last).require_grad();
    let memory_grad = memory_grad.expect("T5 has decoder blocks");
    let grads = (model.encoder_finish(last.clone()) * Tensor::from_inner(memory_grad)).sum().backward();
    let mut upstream = last.grad(&grads).expect("the encoder's norm reads its last block's output");
    accumulate(grads);
    for (layer, x) in model.encoder_layers.iter().zip(encoder_inputs).rev() {
        let input = Tensor::<B, 3>::from_inner(x).require_grad();
        let output = layer.forward(input.clone(), &model.encoder_bias(input_len, lengths), None, None);
        let grads;
        (grads, upstream) = through_block(&input, output, upstream, None);
        accumulate(grads);
    }
    accumulate((model.embed(input) * Tensor::from_inner(upstream)).sum().backward());
    (accumulator.grads(), detached_loss)
}
