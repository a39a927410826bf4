//! Evaluation: validation loss, exact match on held-out arithmetic, and a sample.

use burn::prelude::*;
use furnace_data::loader::IGNORE;
use furnace_data::mlm::Masking;
use furnace_data::{Loader, TextTokenizer};
use furnace_models::generate::{generate, GenerateConfig};
use furnace_models::kernels::FusedOps;
use furnace_models::sampling::SamplingConfig;
use furnace_models::{Bert, CausalLm};

use crate::objective::lm_loss_sum;

/// What a validation pass measured.
pub struct Validation {
    /// Mean loss over the counted targets.
    pub loss: f64,
    /// Masked LM: the share of masked tokens predicted exactly (argmax).
    pub mlm_accuracy: Option<f64>,
}

/// Mean next-token loss over the counted targets of `steps` validation batches (the same
/// batches every time), or with `masking` the masked-LM loss and accuracy (batch i masked
/// with seed i, so every evaluation hides the same tokens).
pub fn validation<B: FusedOps, M: CausalLm<B>>(
    model: &M,
    loader: &mut Loader,
    steps: usize,
    masking: Option<&Masking>,
    device: &B::Device,
) -> Validation {
    loader.set_cursor(Default::default());
    let (mut total, mut tokens, mut correct) = (0.0, 0usize, 0usize);
    for i in 0..steps.max(1) {
        let batch = match masking {
            Some(masking) => masking.apply(loader.next_batch(), i as u64),
            None => loader.next_batch(),
        };
        let shape = [batch.batch, batch.seq_len];
        tokens += batch.targets.iter().filter(|&&t| t != IGNORE).count();
        let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs, shape), device);
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), shape), device);
        let logits = model.forward(inputs);
        if masking.is_some() {
            let predicted: Vec<i64> = logits.clone().argmax(2).into_data().convert::<i64>().into_vec().expect("int predictions");
            correct += predicted.iter().zip(&batch.targets).filter(|(p, t)| p == t).count();
        }
        total += lm_loss_sum(logits, targets).into_scalar().elem::<f64>();
    }
    let tokens = tokens.max(1) as f64;
    Validation { loss: total / tokens, mlm_accuracy: masking.map(|_| correct as f64 / tokens) }
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

/// The fill-mask sample a BERT run ends with: the second name is the first one again, which
/// only a model reading both directions can know.
pub const FILL_MASK_PROMPT: &str = "Once upon a time, there was a little fox named Tim. [MASK] lived near the river.";

/// `prompt` with each `[MASK]` filled by the model's likeliest token, then each mask's five
/// likeliest tokens with their probabilities (transformers' fill-mask pipeline's answer).
pub fn fill_mask_line<B: FusedOps>(model: &Bert<B>, tokenizer: &TextTokenizer, prompt: &str, device: &B::Device) -> anyhow::Result<String> {
    let mask = tokenizer.mask().ok_or_else(|| anyhow::anyhow!("the tokenizer has no [MASK] token to fill"))?;
    let ids = encode_prompt(tokenizer, prompt);
    if !ids.contains(&mask) {
        anyhow::bail!("the prompt {prompt:?} has no [MASK] to fill; write one where a word should go");
    }
    if ids.len() > model.max_seq_len {
        anyhow::bail!("the prompt is {} tokens, more than the model's max_seq_len = {}; shorten it", ids.len(), model.max_seq_len);
    }
    let candidates = model.fill_mask(&ids, mask, 5, device);
    let mut best = candidates.iter().map(|c| c[0].0);
    let filled: Vec<u32> = ids[1..].iter().map(|&t| if t == mask { best.next().expect("one answer per mask") } else { t }).collect();
    let mut line = tokenizer.decode(&filled);
    for (i, ranked) in candidates.iter().enumerate() {
        let listed: Vec<String> = ranked.iter().map(|&(id, p)| format!("{:?} {p:.3}", tokenizer.decode(&[id]))).collect();
        line.push_str(&format!("\n  [MASK] {}: {}", i + 1, listed.join(", ")));
    }
    Ok(line)
}
