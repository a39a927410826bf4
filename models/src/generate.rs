//! Generation written once against `CausalLm`: prefill the prompt, then one token at a time
//! through the model's decoding state.

use burn::prelude::*;

use crate::causal_lm::CausalLm;
use crate::sampling::{Sampler, SamplingConfig};

/// What a grammar allows at each step of a reply (structured output): the trainer's
/// llguidance matcher is one. A constraint that fails keeps its error and allows only the
/// end of the reply from then on.
pub trait TokenConstraint {
    /// Set the logits (one row over the model's vocabulary) of every token the grammar does
    /// not allow next to −∞.
    fn mask(&mut self, logits: &mut [f32]);
    /// Advance past the sampled `token`. Returns the tokens the grammar forces after it,
    /// already advanced past: they join the reply without being sampled.
    fn commit(&mut self, token: u32) -> Vec<u32>;
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    pub stop_tokens: Vec<u32>,
    pub sampling: SamplingConfig,
}

/// Generate after `prompt`; `on_token` sees each new token as it is produced (for streaming).
/// Returns the new tokens (a stop token, when hit, is included). Under a `constraint` each
/// sampled token is one the grammar allows, and the tokens it then forces are appended and fed
/// to the model in one forward with the sampled one.
pub fn generate<B: Backend, M: CausalLm<B>>(
    model: &M,
    prompt: &[u32],
    config: &GenerateConfig,
    mut constraint: Option<&mut dyn TokenConstraint>,
    device: &B::Device,
    mut on_token: impl FnMut(u32),
) -> Vec<u32> {
    assert!(!prompt.is_empty(), "generation needs at least one prompt token");
    let mut sampler = Sampler::new(config.sampling.clone());
    let mut state = model.init_state();
    let mut history = prompt.to_vec();
    let mut input = prompt.to_vec();
    let mut produced = Vec::new();
    while produced.len() < config.max_new_tokens && history.len() < model.max_seq_len() {
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(input.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, input.len()]), device);
        let logits = model.forward_step(tokens, &mut state);
        let [_, seq, vocab] = logits.dims();
        let mut last: Vec<f32> = logits.slice([0..1, seq - 1..seq, 0..vocab]).into_data().convert::<f32>().into_vec().expect("f32 logits");
        if let Some(constraint) = constraint.as_deref_mut() {
            constraint.mask(&mut last);
        }
        let token = sampler.sample(&last, &history);
        let forced = constraint.as_deref_mut().map(|c| c.commit(token)).unwrap_or_default();
        input.clear();
        for token in std::iter::once(token).chain(forced) {
            if produced.len() == config.max_new_tokens || history.len() == model.max_seq_len() {
                break;
            }
            produced.push(token);
            history.push(token);
            input.push(token);
            on_token(token);
            if config.stop_tokens.contains(&token) {
                return produced;
            }
        }
    }
    produced
}

/// `count` replies to one prompt, decoded together: one batched forward per step through the
/// model's decoding state. Each reply ends at a stop token (included) or after
/// `config.max_new_tokens`; rows already finished keep being fed their last token, and what
/// they produce is dropped. Rows draw from one sampler in row order, so a seed reproduces the
/// whole group.
pub fn generate_group<B: Backend, M: CausalLm<B>>(
    model: &M,
    prompt: &[u32],
    count: usize,
    config: &GenerateConfig,
    device: &B::Device,
) -> Vec<Vec<u32>> {
    assert!(!prompt.is_empty(), "generation needs at least one prompt token");
    let mut sampler = Sampler::new(config.sampling.clone());
    let mut state = model.init_state();
    let mut replies: Vec<Vec<u32>> = vec![Vec::new(); count];
    let mut done = vec![false; count];
    let ids = |tokens: Vec<u32>, len: usize| {
        Tensor::<B, 2, Int>::from_data(TensorData::new(tokens.into_iter().map(|t| t as i64).collect::<Vec<_>>(), [count, len]), device)
    };
    let mut input = ids(prompt.repeat(count), prompt.len());
    let mut position = prompt.len();
    while position < model.max_seq_len() && replies.iter().any(|r| r.len() < config.max_new_tokens) && done.iter().any(|d| !d) {
        let logits = model.forward_step(input, &mut state);
        let [_, seq, vocab] = logits.dims();
        let last: Vec<f32> = logits.slice([0..count, seq - 1..seq, 0..vocab]).into_data().convert::<f32>().into_vec().expect("f32 logits");
        let mut next = Vec::with_capacity(count);
        for (row, reply) in replies.iter_mut().enumerate() {
            if done[row] || reply.len() >= config.max_new_tokens {
                next.push(reply.last().copied().unwrap_or(prompt[prompt.len() - 1]));
                continue;
            }
            let history = [prompt, reply.as_slice()].concat();
            let token = sampler.sample(&last[row * vocab..(row + 1) * vocab], &history);
            reply.push(token);
            done[row] = config.stop_tokens.contains(&token);
            next.push(token);
        }
        input = ids(next, 1);
        position += 1;
    }
    replies
}
