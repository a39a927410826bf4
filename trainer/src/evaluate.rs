//! Evaluation: validation loss, exact match on held-out arithmetic, and a sample.

use burn::prelude::*;
use furnace_data::seq2seq::with_eos;
use furnace_data::{Batch, Loader, TextTokenizer};
use furnace_models::generate::{generate, GenerateConfig, TokenConstraint};
use furnace_models::kernels::FusedOps;
use furnace_models::sampling::SamplingConfig;
use furnace_models::t5::Conditioned;
use furnace_models::{Bert, LanguageModel, Unsupported};

use crate::objective::{lm_loss_sum, Denoising};

/// What a validation pass measured.
pub struct Validation {
    /// Mean loss over the counted targets.
    pub loss: f64,
    /// Masked LM: the share of masked tokens predicted exactly (argmax).
    pub mlm_accuracy: Option<f64>,
}

/// Mean loss over the counted targets of `steps` validation batches (the same batches every
/// time): next-token, target-given-input for an encoder-decoder, or with `denoising` the
/// masked-LM loss and accuracy or T5's span-corruption loss (batch i noised with seed i, so
/// every evaluation hides the same tokens).
pub fn validation<B: FusedOps>(
    model: &LanguageModel<B>,
    loader: &mut Loader,
    steps: usize,
    denoising: Option<&Denoising>,
    device: &B::Device,
) -> Result<Validation, Unsupported> {
    loader.set_cursor(Default::default());
    let masked_lm = matches!(denoising, Some(Denoising::MaskedLm(_)));
    let (mut total, mut tokens, mut correct) = (0.0, 0usize, 0usize);
    for i in 0..steps.max(1) {
        let batch = match denoising {
            Some(denoising) => denoising.apply(loader.next_batch(), i as u64),
            None => loader.next_batch(),
        };
        tokens += batch.counted_targets();
        let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.targets.clone(), [batch.batch, batch.seq_len]), device);
        let logits = forward_batch(model, &batch, device)?;
        if masked_lm {
            let predicted: Vec<i64> = logits.clone().argmax(2).into_data().convert::<i64>().into_vec().expect("int predictions");
            correct += predicted.iter().zip(&batch.targets).filter(|(p, t)| p == t).count();
        }
        total += lm_loss_sum(logits, targets).into_scalar().elem::<f64>();
    }
    let tokens = tokens.max(1) as f64;
    Ok(Validation { loss: total / tokens, mlm_accuracy: masked_lm.then(|| correct as f64 / tokens) })
}

/// Logits for a batch as training computes them (packed rows aside): the decoder's over the
/// encoder's input for an encoder-decoder batch, the model's over the inputs otherwise.
pub fn forward_batch<B: FusedOps>(model: &LanguageModel<B>, batch: &Batch, device: &B::Device) -> Result<Tensor<B, 3>, Unsupported> {
    let inputs = Tensor::<B, 2, Int>::from_data(TensorData::new(batch.inputs.clone(), [batch.batch, batch.seq_len]), device);
    match &batch.encoder {
        Some(encoder) => model.forward_seq2seq(encoder_input(batch, device), &encoder.lengths, inputs),
        None => model.forward(inputs),
    }
}

/// An encoder-decoder batch's encoder rows as a tensor `[batch, input_len]`.
pub fn encoder_input<B: Backend>(batch: &Batch, device: &B::Device) -> Tensor<B, 2, Int> {
    let encoder = batch.encoder.as_ref().expect("an encoder-decoder batch");
    Tensor::from_data(TensorData::new(encoder.tokens.clone(), [batch.batch, encoder.len]), device)
}

/// The model's reply to `prompt`: a decoder continues it; T5 reads it with its encoder and
/// decodes from its start token `start`. `on_token` sees each token as it comes; a
/// `constraint` keeps the reply inside its grammar.
pub fn reply<B: FusedOps>(
    model: &LanguageModel<B>,
    prompt: &[u32],
    start: u32,
    config: &GenerateConfig,
    constraint: Option<&mut dyn TokenConstraint>,
    device: &B::Device,
    on_token: impl FnMut(u32),
) -> Result<Vec<u32>, Unsupported> {
    Ok(match model {
        LanguageModel::T5(t5) => {
            let ids = prompt.iter().map(|&t| t as i64).collect::<Vec<_>>();
            let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, prompt.len()]), device);
            let conditioned = Conditioned { model: t5, input, lengths: vec![prompt.len()] };
            generate(&conditioned, &[start], config, constraint, device, on_token)
        }
        _ => generate(&model.as_causal()?, prompt, config, constraint, device, on_token),
    })
}

/// The prompt as the model saw its inputs in training: a decoder's documents after an
/// end-of-text token, an encoder-decoder's inputs followed by one (as T5 appends `</s>`).
pub fn encode_prompt(tokenizer: &TextTokenizer, prompt: &str, encoder_decoder: bool) -> Vec<u32> {
    if encoder_decoder {
        return with_eos(tokenizer, prompt);
    }
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
pub fn arithmetic_exact_match<B: FusedOps>(
    model: &LanguageModel<B>,
    tokenizer: &TextTokenizer,
    problems: &[Asked],
    device: &B::Device,
) -> Result<(usize, usize, Vec<(String, String, bool)>), Unsupported> {
    let config = greedy(tokenizer, 16);
    let mut correct = 0;
    let mut shown = Vec::new();
    for problem in problems {
        let out = reply(model, &problem.ids, tokenizer.pad(), &config, None, device, |_| {})?;
        let answer = tokenizer.decode(&out).trim().to_string();
        let ok = answer == problem.expected;
        correct += ok as usize;
        if shown.len() < 5 {
            shown.push((problem.question.clone(), answer, ok));
        }
    }
    Ok((correct, problems.len(), shown))
}

/// The fill-mask sample a BERT run ends with: the second name is the first one again, which
/// only a model reading both directions can know.
pub const FILL_MASK_PROMPT: &str = "Once upon a time, there was a little fox named Tim. [MASK] lived near the river.";

/// `prompt` with each `[MASK]` filled by the model's likeliest token, then each mask's five
/// likeliest tokens with their probabilities (transformers' fill-mask pipeline's answer).
pub fn fill_mask_line<B: FusedOps>(model: &Bert<B>, tokenizer: &TextTokenizer, prompt: &str, device: &B::Device) -> anyhow::Result<String> {
    let mask = tokenizer.mask().ok_or_else(|| anyhow::anyhow!("the tokenizer has no [MASK] token to fill"))?;
    let ids = encode_prompt(tokenizer, prompt, false);
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

/// The span-filling sample a T5 run on text ends with: as BERT's, the hidden name is the
/// first one again.
pub const FILL_SPAN_PROMPT: &str = "Once upon a time, there was a little fox named Tim. <extra_id_0> lived near the river.";

/// What a span-corruption T5 writes for a prompt holding sentinels: each sentinel followed by
/// the tokens it stands for, greedily (`<extra_id_0> Tim <extra_id_1>`).
pub fn fill_spans_line<B: FusedOps>(
    model: &LanguageModel<B>,
    tokenizer: &TextTokenizer,
    prompt: &str,
    max_new_tokens: usize,
    device: &B::Device,
) -> anyhow::Result<String> {
    let ids = encode_prompt(tokenizer, prompt, true);
    let sentinels = tokenizer.sentinels();
    if !ids.iter().any(|id| sentinels.contains(id)) {
        anyhow::bail!("the prompt {prompt:?} has no sentinel to fill; write <extra_id_0> where a span should go");
    }
    let out = reply(model, &ids, tokenizer.pad(), &greedy(tokenizer, max_new_tokens), None, device, |_| {})?;
    Ok(tokenizer.decode_keeping_special(&out))
}
