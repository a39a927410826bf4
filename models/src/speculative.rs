//! Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a cheap drafter proposes k
//! tokens, the target scores all of them in one forward, and rejection sampling keeps a prefix
//! of them and draws one more, so every token comes from the target's own distribution
//! (greedy: exactly the target's greedy choice). Drafters: a smaller model with the same
//! vocabulary, or prompt lookup (transformers' `prompt_lookup_num_tokens`): the tokens that
//! followed the latest earlier occurrence of the last n-gram.

use burn::prelude::*;

use crate::causal_lm::CausalLm;
use crate::generate::GenerateConfig;
use crate::sampling::Sampler;
use furnace_core::rng::{derive_seed, Stream};

/// Where drafts come from.
pub enum Drafter<'a, D> {
    /// A model sharing the target's vocabulary, sampled with the target's settings.
    Model(&'a D),
    /// The tokens after the latest earlier match of the last `max_ngram`..1 tokens.
    PromptLookup { max_ngram: usize },
}

/// How the drafts fared.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Speculation {
    /// Target forwards (verification steps) run.
    pub rounds: usize,
    pub drafted: usize,
    pub accepted: usize,
}

impl Speculation {
    pub fn acceptance(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }
}

/// A model's decoding state and how many tokens of the history it has read.
struct Reader<S> {
    state: S,
    seen: usize,
}

impl<S: Clone> Reader<S> {
    /// Logits `[positions, vocab]` after reading `tokens`, which follow what it has seen.
    fn read<B: Backend, M: CausalLm<B, State = S>>(&mut self, model: &M, tokens: &[u32], device: &B::Device) -> Vec<Vec<f32>> {
        let ids = TensorData::new(tokens.iter().map(|&t| t as i64).collect::<Vec<_>>(), [1, tokens.len()]);
        let logits = model.forward_step(Tensor::from_data(ids, device), &mut self.state);
        self.seen += tokens.len();
        let vocab = logits.dims()[2];
        let flat: Vec<f32> = logits.into_data().convert::<f32>().into_vec().expect("f32 logits");
        flat.chunks(vocab).map(<[f32]>::to_vec).collect()
    }

    /// Keep only the first `len` tokens read: the model rewinds its state, or, where it cannot
    /// (Mamba's recurrent state), reads them again from the state saved before the round.
    fn keep<B: Backend, M: CausalLm<B, State = S>>(
        &mut self,
        model: &M,
        len: usize,
        saved: Reader<S>,
        history: &[u32],
        device: &B::Device,
    ) {
        if self.seen <= len || model.rewind(&mut self.state, len) {
            self.seen = self.seen.min(len);
            return;
        }
        *self = saved;
        if self.seen < len {
            self.read(model, &history[self.seen..len], device);
        }
    }

    fn saved(&self) -> Reader<S> {
        Reader { state: self.state.clone(), seen: self.seen }
    }
}

/// The tokens after the latest earlier occurrence of the last n tokens of `history` (n from
/// `max_ngram` down to 1), at most `k` of them.
pub fn prompt_lookup(history: &[u32], max_ngram: usize, k: usize) -> Vec<u32> {
    for n in (1..=max_ngram.min(history.len().saturating_sub(1))).rev() {
        let tail = &history[history.len() - n..];
        if let Some(start) = (0..history.len() - n).rev().find(|&i| &history[i..i + n] == tail) {
            let from = start + n;
            return history[from..(from + k).min(history.len())].to_vec();
        }
    }
    Vec::new()
}

/// `generate`'s output drawn speculatively: up to `k` drafted tokens per target forward.
/// Returns the new tokens (a stop token, when hit, included) and how the drafts fared.
pub fn generate_speculative<B: Backend, M: CausalLm<B>, D: CausalLm<B>>(
    target: &M,
    drafter: Drafter<'_, D>,
    k: usize,
    prompt: &[u32],
    config: &GenerateConfig,
    device: &B::Device,
    mut on_token: impl FnMut(u32),
) -> (Vec<u32>, Speculation)
where
    M::State: Clone,
    D::State: Clone,
{
    assert!(!prompt.is_empty(), "generation needs at least one prompt token");
    let seed = |index| derive_seed(config.sampling.seed, Stream::Speculation, index);
    let mut sampler = Sampler::new(config.sampling.clone());
    // The drafter's draws and the acceptance tests use their own streams (index 0 would be the
    // seed itself: the model's own stream).
    let mut draft_sampler = Sampler::new(crate::sampling::SamplingConfig { seed: seed(1), ..config.sampling.clone() });
    let mut acceptance = Sampler::new(crate::sampling::SamplingConfig { seed: seed(2), ..config.sampling.clone() });
    let mut target_reader = Reader { state: target.init_state(), seen: 0 };
    let mut draft_reader = match &drafter {
        Drafter::Model(model) => Some(Reader { state: model.init_state(), seen: 0 }),
        Drafter::PromptLookup { .. } => None,
    };
    let mut history = prompt.to_vec();
    let mut produced = Vec::new();
    let mut stats = Speculation::default();
    let context = target.max_seq_len();
    // A draft model past its own context drafts nothing: the target goes on alone.
    let draft_context = match &drafter {
        Drafter::Model(model) => model.max_seq_len(),
        Drafter::PromptLookup { .. } => usize::MAX,
    };
    while produced.len() < config.max_new_tokens && history.len() < context {
        // Room for the drafts and the token after them, in the context and in max_new_tokens.
        let room =
            (config.max_new_tokens - produced.len() - 1).min(context - history.len() - 1).min(draft_context.saturating_sub(history.len()));
        let k = k.min(room);
        let (drafts, draft_probs): (Vec<u32>, Vec<Vec<(u32, f64)>>) = match (&drafter, draft_reader.as_mut()) {
            (Drafter::Model(model), Some(reader)) => {
                let mut drafts = Vec::with_capacity(k);
                let mut probs = Vec::with_capacity(k);
                for _ in 0..k {
                    let seen_history = [&history[..], &drafts[..]].concat();
                    let logits = reader.read(*model, &seen_history[reader.seen..], device);
                    let q = normalised(draft_sampler.distribution(logits.last().expect("a row"), &seen_history));
                    let token = draft_sampler.draw(&q);
                    drafts.push(token);
                    probs.push(q);
                }
                (drafts, probs)
            }
            _ => {
                let drafts = match drafter {
                    Drafter::PromptLookup { max_ngram } => prompt_lookup(&history, max_ngram, k),
                    Drafter::Model(_) => Vec::new(),
                };
                let probs = drafts.iter().map(|&t| vec![(t, 1.0)]).collect();
                (drafts, probs)
            }
        };
        // The target reads what it has not seen and the drafts: one row per draft, and one more.
        let saved = target_reader.saved();
        let draft_saved = draft_reader.as_ref().map(Reader::saved);
        let unseen = [&history[target_reader.seen..], &drafts[..]].concat();
        let logits = target_reader.read(target, &unseen, device);
        let rows = &logits[logits.len() - drafts.len() - 1..];
        stats.rounds += 1;
        stats.drafted += drafts.len();
        let mut next = Vec::with_capacity(drafts.len() + 1);
        let mut context_so_far = history.clone();
        let mut rejected = None;
        for (i, &draft) in drafts.iter().enumerate() {
            let p = normalised(sampler.distribution(&rows[i], &context_so_far));
            let q = &draft_probs[i];
            let (p_draft, q_draft) = (weight(&p, draft), weight(q, draft));
            // Accept with probability min(1, p/q); greedy accepts exactly the target's argmax.
            let accepted = if sampler.greedy() { p[0].0 == draft } else { acceptance.uniform() * q_draft < p_draft };
            if !accepted {
                rejected = Some(residual(&p, q));
                break;
            }
            next.push(draft);
            context_so_far.push(draft);
        }
        stats.accepted += next.len();
        // Greedy, a rejected draft is not the argmax, so the residual is the argmax alone.
        let last = match rejected {
            Some(residual) => sampler.draw(&residual),
            None => sampler.sample(&rows[drafts.len()], &context_so_far),
        };
        next.push(last);
        // Both models keep what they read up to the last accepted draft; `last` is read next round.
        let kept = history.len() + next.len() - 1;
        history.extend_from_slice(&next);
        target_reader.keep(target, kept, saved, &history, device);
        if let (Drafter::Model(model), Some(reader), Some(saved)) = (&drafter, draft_reader.as_mut(), draft_saved) {
            reader.keep(*model, kept.min(reader.seen), saved, &history, device);
        }
        for token in next {
            produced.push(token);
            on_token(token);
            if config.stop_tokens.contains(&token) || produced.len() == config.max_new_tokens {
                return (produced, stats);
            }
        }
    }
    (produced, stats)
}

fn normalised(mut distribution: Vec<(u32, f64)>) -> Vec<(u32, f64)> {
    let total: f64 = distribution.iter().map(|p| p.1).sum();
    for p in &mut distribution {
        p.1 /= total;
    }
    distribution
}

fn weight(distribution: &[(u32, f64)], token: u32) -> f64 {
    distribution.iter().find(|p| p.0 == token).map_or(0.0, |p| p.1)
}

/// The distribution a rejected draft's replacement comes from: max(0, p − q), normalised (p
/// itself where that is empty, which exact arithmetic never gives).
fn residual(p: &[(u32, f64)], q: &[(u32, f64)]) -> Vec<(u32, f64)> {
    let rest: Vec<(u32, f64)> = p.iter().map(|&(t, w)| (t, (w - weight(q, t)).max(0.0))).filter(|p| p.1 > 0.0).collect();
    if rest.is_empty() {
        p.to_vec()
    } else {
        normalised(rest)
    }
}
