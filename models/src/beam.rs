//! Beam search as transformers' `generate(num_beams=N)` runs it (its refactored `_beam_search`):
//! each step keeps the 2·N best continuations of the running beams by summed log-probability;
//! those that end (end-of-text, or the length limit) among the first N join the finished
//! hypotheses, scored by their sum over `generated_length ^ length_penalty`; the N best that go
//! on are the next running beams. Each beam carries its own decoding state (a KV cache or a
//! recurrent state), cloned from its parent's, so it works for every `CausalLm`.

use burn::prelude::*;

use crate::causal_lm::CausalLm;

/// transformers' `early_stopping`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EarlyStopping {
    /// `False`: stop once the best running beam, scored at its current length, cannot beat the
    /// worst of N finished hypotheses (the default).
    Heuristic,
    /// `True`: stop as soon as N hypotheses are finished.
    WhenFull,
    /// `"never"`: as `False`, but with a positive length penalty the running beams are scored
    /// at the longest length they could reach (the canonical beam search with penalty 0).
    Never,
}

#[derive(Debug, Clone)]
pub struct BeamConfig {
    pub num_beams: usize,
    pub max_new_tokens: usize,
    /// Scores are divided by `generated_length ^ length_penalty`: above 0 favours longer
    /// replies, below 0 shorter ones.
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    /// The tokens that end a hypothesis.
    pub stop_tokens: Vec<u32>,
}

/// A finished hypothesis: the generated tokens (its stop token included) and its score.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    pub score: f32,
}

/// What transformers adds to the score of a candidate that must not be chosen.
const EXCLUDED: f32 = -1.0e9;

struct Running<S> {
    tokens: Vec<u32>,
    score: f32,
    state: S,
    /// Log-probabilities of the next token.
    next: Vec<f32>,
}

/// The `config.num_beams` best hypotheses after `prompt`, best first.
pub fn beam_search<B: Backend, M: CausalLm<B>>(model: &M, prompt: &[u32], config: &BeamConfig, device: &B::Device) -> Vec<Hypothesis>
where
    M::State: Clone,
{
    assert!(!prompt.is_empty() && config.num_beams > 0, "beam search needs a prompt and at least one beam");
    let n = config.num_beams;
    let prompt_len = prompt.len();
    let max_len = (prompt_len + config.max_new_tokens).min(model.max_seq_len());
    let forward = |tokens: &[u32], state: &mut M::State| -> Vec<f32> {
        let ids = Tensor::<B, 2, Int>::from_data(
            TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, tokens.len()]),
            device,
        );
        let logits = model.forward_step(ids, state);
        let [_, seq, vocab] = logits.dims();
        log_softmax(&logits.slice([0..1, seq - 1..seq, 0..vocab]).into_data().convert::<f32>().into_vec::<f32>().expect("f32 logits"))
    };
    let mut state = model.init_state();
    let next = forward(prompt, &mut state);
    // Every beam starts as the prompt; all but the first are excluded so that the first step
    // does not pick the same continuation N times.
    let mut running: Vec<Running<M::State>> = (0..n)
        .map(|i| Running { tokens: Vec::new(), score: if i == 0 { 0.0 } else { EXCLUDED }, state: state.clone(), next: next.clone() })
        .collect();
    let mut finished: Vec<(Hypothesis, bool)> = vec![(Hypothesis { tokens: Vec::new(), score: EXCLUDED }, false); n];
    let mut improvable = true;
    // As transformers: enough continuations that N go on even if every stop token is among them.
    let keep = 2.max(1 + config.stop_tokens.len()) * n;
    let mut cur_len = prompt_len;
    loop {
        // The `keep` best continuations of every running beam, by summed log-probability.
        let vocab = running[0].next.len();
        let mut candidates: Vec<(f32, usize, u32)> = Vec::with_capacity(n * vocab);
        for (b, beam) in running.iter().enumerate() {
            candidates.extend(beam.next.iter().enumerate().map(|(v, &lp)| (lp + beam.score, b, v as u32)));
        }
        // Descending score; equal scores in index order, as a stable top-k keeps them.
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        candidates.truncate(keep);
        let ends = |token: u32| config.stop_tokens.contains(&token) || cur_len + 1 >= max_len;
        let hits: Vec<bool> = candidates.iter().map(|&(_, _, token)| ends(token)).collect();

        // Finished: the ending continuations among the first N, length-penalised, merged with
        // the hypotheses so far (the N best kept).
        let all_finished = finished.iter().all(|(_, done)| *done);
        let length = (cur_len + 1 - prompt_len) as f32;
        let mut merged: Vec<(Hypothesis, bool)> = finished.clone();
        for (k, &(score, b, token)) in candidates.iter().enumerate() {
            let mut score = score / length.powf(config.length_penalty);
            if all_finished && config.early_stopping == EarlyStopping::WhenFull {
                score += EXCLUDED;
            }
            if !improvable {
                score += EXCLUDED;
            }
            let just_finished = hits[k] && k < n;
            if !just_finished {
                score += EXCLUDED;
            }
            let tokens = [running[b].tokens.as_slice(), &[token]].concat();
            merged.push((Hypothesis { tokens, score }, just_finished));
        }
        merged.sort_by(|a, b| b.0.score.total_cmp(&a.0.score));
        merged.truncate(n);
        finished = merged;

        // Running: the N best continuations that did not end.
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        let kept = |k: usize| candidates[k].0 + if hits[k] { EXCLUDED } else { 0.0 };
        order.sort_by(|&a, &b| kept(b).total_cmp(&kept(a)).then(a.cmp(&b)));
        let chosen: Vec<(usize, f32)> = order[..n].iter().map(|&k| (k, kept(k))).collect();
        cur_len += 1;

        // Could a running beam still beat the worst finished hypothesis?
        let hypothetical_len = match config.early_stopping {
            EarlyStopping::Never if config.length_penalty > 0.0 => max_len - prompt_len,
            _ => cur_len - prompt_len,
        } as f32;
        let best_running = chosen[0].1 / hypothetical_len.powf(config.length_penalty);
        let worst_finished = finished.iter().map(|(h, _)| h.score).fold(f32::INFINITY, f32::min);
        let all_finished = finished.iter().all(|(_, done)| *done);
        improvable = improvable && finished.iter().any(|(_, done)| best_running > if *done { worst_finished } else { EXCLUDED });
        let full = all_finished && config.early_stopping == EarlyStopping::WhenFull;
        if !improvable || full || hits.iter().all(|&h| h) {
            break;
        }
        running = chosen
            .into_iter()
            .map(|(k, score)| {
                let (_, b, token) = candidates[k];
                let mut state = running[b].state.clone();
                let next = forward(&[token], &mut state);
                Running { tokens: [running[b].tokens.as_slice(), &[token]].concat(), score, state, next }
            })
            .collect();
    }
    finished.into_iter().map(|(h, _)| h).collect()
}

/// Log-probabilities of one row of logits, in f32 as torch's `log_softmax` computes them.
fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_sum = sum.ln();
    logits.iter().map(|&l| l - max - log_sum).collect()
}
