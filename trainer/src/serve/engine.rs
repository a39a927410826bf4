//! The engine: one thread that owns the model and runs continuous batching. Each iteration
//! admits waiting sequences while the batch has room (`--max-num-seqs`, `--kv-cache-mb`),
//! prefills at most `--prefill-chunk` prompt tokens (a long prompt takes several iterations, so
//! the running sequences keep getting their next token), then decodes one token for every
//! running sequence in one batched forward. A sequence leaves at its stop token or string, its
//! `max_tokens`, the model's context, or when its client goes away.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use burn::prelude::*;
use furnace_data::{Detokenizer, TextTokenizer};
use furnace_models::generate::TokenConstraint;
use furnace_models::kernels::FusedOps;
use furnace_models::sampling::{Sampler, SamplingConfig};
use furnace_models::{BatchedDecoding, Causal, CausalBatch, CausalLm, DecodeState};
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::structured::Structured;

/// What one choice of a request asks for.
#[derive(Debug, Clone)]
pub struct Params {
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Log-probabilities of the chosen tokens, with this many alternatives each.
    pub logprobs: Option<usize>,
}

/// What the HTTP side asks of the engine.
pub enum Job {
    Generate(Box<Sequence>),
    /// Mean-pooled last hidden states of each input, sent back on `reply`.
    Embed {
        inputs: Vec<Vec<u32>>,
        reply: tokio::sync::oneshot::Sender<Vec<Vec<f32>>>,
    },
}

/// One sequence to decode: a request's choice.
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub params: Params,
    /// Structured output's matcher for this choice.
    pub constraint: Option<Structured>,
    pub choice: usize,
    pub arrived: Instant,
    pub events: UnboundedSender<Event>,
}

/// A token's log-probability, and those of the most likely alternatives.
#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    pub top: Vec<(TokenText, f32)>,
}

/// A token as OpenAI shows it: its text, or `bytes:\xNN…` when it holds part of a character,
/// and its bytes (which, joined over a reply, are the reply's UTF-8).
#[derive(Debug, Clone)]
pub struct TokenText {
    pub text: String,
    pub bytes: Vec<u8>,
}

impl TokenText {
    fn of(tokenizer: &TextTokenizer, id: u32) -> Self {
        let bytes = tokenizer.token_bytes(id);
        let text = match std::str::from_utf8(&bytes) {
            Ok(text) => text.to_string(),
            Err(_) => format!("bytes:{}", bytes.iter().map(|b| format!("\\x{b:02x}")).collect::<String>()),
        };
        Self { text, bytes }
    }
}

/// What the engine tells a request's HTTP side, per choice.
#[derive(Debug, Clone)]
pub enum Event {
    /// New text (complete UTF-8 characters, never a part of a stop string) and the log-probability
    /// of the token that produced it, when asked for.
    Text {
        choice: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        choice: usize,
        finish_reason: &'static str,
        completion_tokens: usize,
    },
}

/// The engine's limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_num_seqs: usize,
    pub prefill_chunk: usize,
    /// Bytes of keys and values one position of one sequence takes (0 for Mamba).
    pub kv_bytes_per_position: usize,
    pub kv_budget_bytes: usize,
}

struct Prefilling<S> {
    seq: Sequence,
    state: S,
    read: usize,
}

struct Running {
    seq: Sequence,
    sampler: Sampler,
    generated: Vec<u32>,
    /// The reply's text, decoded as it grows.
    detokenizer: Detokenizer,
    /// Bytes of the decoded reply already sent.
    sent: usize,
    last_token_at: Instant,
}

enum Outcome {
    Continue,
    Finished,
}

pub struct Engine<'a, B: FusedOps> {
    model: &'a Causal<'a, B>,
    tokenizer: &'a TextTokenizer,
    metrics: Arc<Metrics>,
    limits: Limits,
    device: B::Device,
    prefilling: VecDeque<Prefilling<DecodeState<B>>>,
    running: Vec<Running>,
    batch: CausalBatch<B>,
    /// This engine's share of the gauges (running sequences, KV bytes) as last reported: the
    /// engines of several adapters add theirs into the same gauges.
    reported: (usize, usize),
}

impl<'a, B: FusedOps> Engine<'a, B> {
    pub fn new(model: &'a Causal<'a, B>, tokenizer: &'a TextTokenizer, metrics: Arc<Metrics>, limits: Limits, device: B::Device) -> Self {
        metrics.kv_cache_budget_bytes.fetch_add(limits.kv_budget_bytes, Ordering::Relaxed);
        let batch = model.empty_batch();
        Self { model, tokenizer, metrics, limits, device, prefilling: VecDeque::new(), running: Vec::new(), batch, reported: (0, 0) }
    }

    /// Serves `queue` until every sender is gone.
    pub fn run(mut self, queue: Receiver<Job>) {
        loop {
            if self.prefilling.is_empty() && self.running.is_empty() {
                match queue.recv() {
                    Ok(job) => self.take(job),
                    Err(_) => return,
                }
            }
            while self.has_room() {
                match queue.try_recv() {
                    Ok(job) => self.take(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            self.prefill();
            self.decode();
            self.report();
        }
    }

    /// This engine's running sequences and KV bytes into the shared gauges, as a change.
    fn report(&mut self) {
        let running = self.prefilling.len() + self.running.len();
        let longest = self.running.iter().map(|r| r.seq.prompt.len() + r.generated.len()).max().unwrap_or(0);
        let kv_bytes = self.running.len() * longest * self.limits.kv_bytes_per_position;
        let (was_running, was_kv) = std::mem::replace(&mut self.reported, (running, kv_bytes));
        self.metrics.running.fetch_add(running, Ordering::Relaxed);
        self.metrics.running.fetch_sub(was_running, Ordering::Relaxed);
        self.metrics.kv_cache_bytes.fetch_add(kv_bytes, Ordering::Relaxed);
        self.metrics.kv_cache_bytes.fetch_sub(was_kv, Ordering::Relaxed);
    }

    /// Whether one more sequence fits beside those admitted: by count, and by the keys and
    /// values all of them would hold at their longest (the batch pads rows to its longest).
    fn has_room(&self) -> bool {
        let admitted = self.prefilling.len() + self.running.len();
        if admitted >= self.limits.max_num_seqs {
            return false;
        }
        if admitted == 0 || self.limits.kv_bytes_per_position == 0 {
            return true;
        }
        let longest = self
            .running
            .iter()
            .map(|r| &r.seq)
            .chain(self.prefilling.iter().map(|p| &p.seq))
            .map(|s| s.prompt.len() + s.params.max_tokens)
            .max()
            .unwrap_or(0);
        // The next one is unknown until received: assume it is no longer than the longest.
        (admitted + 1) * longest * self.limits.kv_bytes_per_position <= self.limits.kv_budget_bytes
    }

    /// A sequence joins the prefill queue; embeddings are computed at once (one forward each).
    fn take(&mut self, job: Job) {
        self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        match job {
            Job::Generate(seq) => self.admit(*seq),
            Job::Embed { inputs, reply } => {
                self.metrics.prompt_tokens.fetch_add(inputs.iter().map(Vec::len).sum::<usize>() as u64, Ordering::Relaxed);
                let _ = reply.send(inputs.iter().map(|tokens| self.model.mean_hidden(tokens, &self.device)).collect());
            }
        }
    }

    fn admit(&mut self, seq: Sequence) {
        self.metrics.prompt_tokens.fetch_add(seq.prompt.len() as u64, Ordering::Relaxed);
        self.prefilling.push_back(Prefilling { state: self.model.init_state(), seq, read: 0 });
    }

    /// Up to `prefill_chunk` prompt tokens of the oldest prefilling sequence; a finished prefill
    /// samples the first token and joins the batch.
    fn prefill(&mut self) {
        let Some(mut p) = self.prefilling.pop_front() else { return };
        if p.seq.events.is_closed() {
            return;
        }
        let end = (p.read + self.limits.prefill_chunk.max(1)).min(p.seq.prompt.len());
        let chunk: Vec<i64> = p.seq.prompt[p.read..end].iter().map(|&t| t as i64).collect();
        let len = chunk.len();
        let logits = self.model.forward_step(Tensor::from_data(TensorData::new(chunk, [1, len]), &self.device), &mut p.state);
        p.read = end;
        if p.read < p.seq.prompt.len() {
            self.prefilling.push_front(p);
            return;
        }
        let vocab = logits.dims()[2];
        let last: Vec<f32> = logits.narrow(1, len - 1, 1).reshape([vocab]).into_data().convert::<f32>().into_vec().expect("f32 logits");
        let mut running = Running {
            sampler: Sampler::new(p.seq.params.sampling.clone()),
            seq: p.seq,
            generated: Vec::new(),
            detokenizer: Detokenizer::new(false),
            sent: 0,
            last_token_at: Instant::now(),
        };
        if let Outcome::Continue = self.accept(&mut running, last) {
            self.model.join(&mut self.batch, p.state);
            self.running.push(running);
        }
    }

    /// One token for every running sequence, in one batched forward.
    fn decode(&mut self) {
        // Sequences whose clients went away leave first (their rows are freed).
        for i in (0..self.running.len()).rev() {
            if self.running[i].seq.events.is_closed() {
                self.model.leave(&mut self.batch, i);
                self.running.remove(i);
            }
        }
        if self.running.is_empty() {
            return;
        }
        let tokens: Vec<u32> = self.running.iter().map(|r| *r.generated.last().expect("a running sequence has its first token")).collect();
        let logits = self.model.step(&mut self.batch, &tokens);
        let vocab = logits.dims()[1];
        let logits: Vec<f32> = logits.into_data().convert::<f32>().into_vec().expect("f32 logits");
        let mut running = std::mem::take(&mut self.running);
        let mut finished = Vec::new();
        for (i, r) in running.iter_mut().enumerate() {
            if let Outcome::Finished = self.accept(r, logits[i * vocab..(i + 1) * vocab].to_vec()) {
                finished.push(i);
            }
        }
        for &i in finished.iter().rev() {
            self.model.leave(&mut self.batch, i);
            running.remove(i);
        }
        self.running = running;
    }

    /// Samples a sequence's next token from `logits`, sends what text it completes, and says
    /// whether the sequence goes on.
    fn accept(&self, r: &mut Running, mut logits: Vec<f32>) -> Outcome {
        let params = &r.seq.params;
        let logprobs = params.logprobs.map(|top| log_softmax(&logits, top));
        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, f32>::new();
            for &t in &r.generated {
                *counts.entry(t).or_default() += 1.0;
            }
            for (&t, &n) in &counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= params.frequency_penalty * n + params.presence_penalty;
                }
            }
        }
        if let Some(constraint) = r.seq.constraint.as_mut() {
            constraint.mask(&mut logits);
        }
        let history: Vec<u32> = r.seq.prompt.iter().chain(&r.generated).copied().collect();
        let token = r.sampler.sample(&logits, &history);
        if let Some(constraint) = r.seq.constraint.as_mut() {
            constraint.advance(token);
            // A failed matcher allows end-of-text alone: the reply ends at it.
            if let Some(error) = constraint.error().filter(|_| token == self.tokenizer.eos()) {
                eprintln!("warning: structured output failed mid-reply, which ends here: {error}");
            }
        }
        let now = Instant::now();
        if r.generated.is_empty() {
            self.metrics.time_to_first_token.observe(now.duration_since(r.seq.arrived).as_secs_f64());
        } else {
            self.metrics.inter_token_latency.observe(now.duration_since(r.last_token_at).as_secs_f64());
        }
        r.last_token_at = now;
        self.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
        // A grammar ends at end-of-text, ignore_eos or not.
        let eos = token == self.tokenizer.eos() && (!params.ignore_eos || r.seq.constraint.is_some());
        r.generated.push(token);
        // The end-of-text token is not part of the reply, nor is its log-probability.
        let logprob = logprobs.filter(|_| !eos).map(|(all, top)| TokenLogprob {
            token: TokenText::of(self.tokenizer, token),
            logprob: all[token as usize],
            top: top.into_iter().map(|(t, l)| (TokenText::of(self.tokenizer, t), l)).collect(),
        });
        if !eos {
            r.detokenizer.push(self.tokenizer, token);
        }
        // The text so far up to its last complete character: a partial one waits for its bytes.
        let complete = r.detokenizer.text();
        let stop_at = params.stop.iter().filter_map(|s| complete[r.sent.min(complete.len())..].find(s.as_str()).map(|i| r.sent + i)).min();
        let length = r.generated.len() >= params.max_tokens || r.seq.prompt.len() + r.generated.len() >= self.model.max_seq_len();
        let finish = match (stop_at, eos, length) {
            (Some(_), _, _) | (_, true, _) => Some("stop"),
            (_, _, true) => Some("length"),
            _ => None,
        };
        // A reply that ends other than at a stop string sends all it has, a partial character too.
        let whole = (finish.is_some() && stop_at.is_none()).then(|| r.detokenizer.finish(self.tokenizer));
        let source = whole.as_deref().unwrap_or(complete);
        // Text that could begin a stop string is held back until the string is ruled out.
        let end = match (stop_at, finish) {
            (Some(at), _) => at,
            (None, Some(_)) => source.len(),
            (None, None) => {
                let hold = params.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
                let mut end = complete.len().saturating_sub(hold).max(r.sent);
                while !complete.is_char_boundary(end) {
                    end -= 1;
                }
                end
            }
        };
        let end = end.max(r.sent);
        let new_text = source.get(r.sent..end).unwrap_or("").to_string();
        r.sent = end;
        if !new_text.is_empty() || logprob.is_some() {
            let _ = r.seq.events.send(Event::Text { choice: r.seq.choice, text: new_text, logprob });
        }
        match finish {
            Some(finish_reason) => {
                let completion_tokens = r.generated.len();
                let _ = r.seq.events.send(Event::Done { choice: r.seq.choice, finish_reason, completion_tokens });
                Outcome::Finished
            }
            None => Outcome::Continue,
        }
    }
}

/// Log-probabilities of every token, and the `top` most likely (token, log-probability).
fn log_softmax(logits: &[f32], top: usize) -> (Vec<f32>, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let log_total = total.ln() as f32 + max;
    let all: Vec<f32> = logits.iter().map(|&l| l - log_total).collect();
    let mut order: Vec<u32> = (0..all.len() as u32).collect();
    order.sort_by(|&a, &b| all[b as usize].total_cmp(&all[a as usize]).then(a.cmp(&b)));
    let top = order.into_iter().take(top).map(|t| (t, all[t as usize])).collect();
    (all, top)
}
