//! Evaluation: validation loss, exact match on held-out arithmetic, and a sample.

use burn::prelude::*;
use furnace_data::loader::IGNORE;
use furnace_data::{Loader, TextTokenizer};
use furnace_models::generate::{generate, GenerateConfig};
use furnace_models::kernels::FusedOps;
use furnace_models::sampling::SamplingConfig;
use furnace_models::CausalLm;

use crate::objective::causal_lm_loss_sum;

/// Mean next-token loss over the counted targets of `steps` validation batches (the same
/// batches every time).
pub fn validation_loss<B: FusedOps, M: CausalLm<B>>(model: &M, loader: &mut Loader, steps: usize, device: &B::Device) -> f64 {
    loader.set_cursor(Default::default());
    let mut total = 0.0;
    let mut tokens = 0usize;
    for _ in 0..steps.max(1) {
        let batch = loader.next_batch();
        let shape = [batch.batch, batch.seq_len];
        tokens += batch.targets.iter().filter(|&&t| t != IGNORE).count();
        let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs, shape), device);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets, shape), device);
        total += causal_lm_loss_sum(model.forward(inputs), targets).into_scalar().elem::<f64>();
    }
    total / tokens.max(1) as f64
}

/// The prompt as the model saw documents in training: after an end-of-text token.
pub fn encode_prompt(tokenizer: &TextTokenizer, prompt: &str) -> Vec<u32> {
    let mut ids = vec![tokenizer.eos()];
    ids.extend(tokenizer.encode(prompt));
    ids
}

pub fn greedy(tokenizer: &TextTokenizer, max_new_tokens: usize) -> GenerateConfig {
    GenerateConfig { max_new_tokens, stop_tokens: vec![tokenizer.eos()], sampling: SamplingConfig::default() }
}

/// A held-out problem as the model is asked it: the question shown, its token ids, and the
/// reply that counts as correct.
pub struct Asked {
    pub question: String,
    pub ids: Vec<u32>,
    pub expected: String,
}

/// Greedy answers to held-out problems: (correct, total, a few (question, answer given,
/// correct) triples).
pub fn arithmetic_exact_match<B: Backend, M: CausalLm<B>>(
    model: &M,
    tokenizer: &TextTokenizer,
    problems: &[Asked],
    device: &B::Device,
) -> (usize, usize, Vec<(String, String, bool)>) {
    let config = greedy(tokenizer, 16);
    let mut correct = 0;
    let mut shown = Vec::new();
    for problem in problems {
        let out = generate(model, &problem.ids, &config, device, |_| {});
        let answer = tokenizer.decode(&out).trim().to_string();
        let ok = answer == problem.expected;
        correct += ok as usize;
        if shown.len() < 5 {
            shown.push((problem.question.clone(), answer, ok));
        }
    }
    (correct, problems.len(), shown)
}
