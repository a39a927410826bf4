//! Losses live here, apart from the model (which only returns logits).

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Summed next-token cross-entropy over every position: the caller divides by the global
/// token count of the step, so accumulated micro-batches average over tokens, not batches.
pub fn causal_lm_loss_sum<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    let log_probs = log_softmax(logits.reshape([batch * seq, vocab]), 1);
    log_probs.gather(1, targets.reshape([batch * seq, 1])).sum().neg()
}
