//! The engine: one thread that owns the model and runs continuous batching. Each step is one
//! forward in which every running sequence reads its next token, and sequences still reading
//! their prompts read up to `--prefill-chunk` prompt tokens in all (chunked prefill: a long
//! prompt takes several steps, and the others keep getting their tokens meanwhile). Keys and
//! values live in a paged cache of `--kv-cache-mb`: a new sequence joins when the cache has
//! room (taking any cached blocks of its prompt's prefix), and when it runs out the newest
//! sequence is preempted and recomputed later. A sequence leaves at its stop token or string,
//! its `max_tokens`, the model's context, or when its client goes away.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use furnace_data::{Detokenizer, TextTokenizer};
use furnace_models::generate::TokenConstraint;
use furnace_models::kernels::FusedOps;
use furnace_models::paged::SeqId;
use furnace_models::sampling::{Sampler, SamplingConfig};
use furnace_models::{BatchedDecoding, Causal, CausalBatch, CausalLm, SequenceCache};
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
    /// Prompt tokens one step reads at most (beside one token of each decoding sequence).
    pub prefill_chunk: usize,
    /// Blocks of the paged KV cache (none for Mamba).
    pub kv_blocks: usize,
}

/// A sequence the engine has taken: waiting for room, or in the batch.
struct Active {
    id: SeqId,
    seq: Sequence,
    sampler: Sampler,
    /// The prompt, then the tokens generated.
    tokens: Vec<u32>,
    /// How many of `tokens` the batch's cache holds.
    cached: usize,
    /// The reply's text, decoded as it grows.
    detokenizer: Detokenizer,
    /// Bytes of the decoded reply already sent.
    sent: usize,
    last_token_at: Instant,
}

impl Active {
    fn generated(&self) -> &[u32] {
        &self.tokens[self.seq.prompt.len()..]
    }
}

enum Outcome {
    Continue,
    Finished,
}

/// Shares of the shared gauges and counters this engine last reported: the engines of several
/// adapters add theirs into the same metrics.
#[derive(Default, Clone, Copy)]
struct Reported {
    running: usize,
    waiting: usize,
    blocks: (usize, usize),
    prefix: (u64, u64),
}

pub struct Engine<'a, B: FusedOps> {
    model: &'a Causal<'a, B>,
    tokenizer: &'a TextTokenizer,
    metrics: Arc<Metrics>,
    limits: Limits,
    device: B::Device,
    /// Taken but not in the batch: new, or preempted (first in line again).
    waiting: VecDeque<Active>,
    /// In the batch, oldest first.
    running: Vec<Active>,
    batch: CausalBatch<B>,
    next_id: SeqId,
    reported: Reported,
}

impl<'a, B: FusedOps> Engine<'a, B> {
    pub fn new(model: &'a Causal<'a, B>, tokenizer: &'a TextTokenizer, metrics: Arc<Metrics>, limits: Limits, device: B::Device) -> Self {
        let batch = model.new_batch(limits.kv_blocks);
        Self {
            model,
            tokenizer,
            metrics,
            limits,
            device,
            waiting: VecDeque::new(),
            running: Vec::new(),
            batch,
            next_id: 0,
            reported: Reported::default(),
        }
    }

    /// Serves `queue` until every sender is gone.
    pub fn run(mut self, queue: Receiver<Job>) {
        loop {
            if self.waiting.is_empty() && self.running.is_empty() {
                match queue.recv() {
                    Ok(job) => self.take(job),
                    Err(_) => return,
                }
            }
            while self.waiting.len() + self.running.len() < self.limits.max_num_seqs {
                match queue.try_recv() {
                    Ok(job) => self.take(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            self.step();
            self.report();
        }
    }

    /// This engine's sequences, cache blocks and prefix-cache lookups into the shared metrics, as changes.
    fn report(&mut self) {
        let now = Reported {
            running: self.running.len(),
            waiting: self.waiting.len(),
            blocks: self.batch.blocks(),
            prefix: self.batch.prefix_stats(),
        };
        let was = std::mem::replace(&mut self.reported, now);
        let m = &self.metrics;
        for (gauge, now, was) in [
            (&m.running, now.running, was.running),
            (&m.waiting, now.waiting, was.waiting),
            (&m.kv_blocks_used, now.blocks.0, was.blocks.0),
            (&m.kv_blocks, now.blocks.1, was.blocks.1),
        ] {
            gauge.fetch_add(now, Ordering::Relaxed);
            gauge.fetch_sub(was, Ordering::Relaxed);
        }
        m.prefix_cache_queries.fetch_add(now.prefix.0 - was.prefix.0, Ordering::Relaxed);
        m.prefix_cache_hits.fetch_add(now.prefix.1 - was.prefix.1, Ordering::Relaxed);
    }

    /// A sequence joins the line; embeddings are computed at once (one forward each).
    fn take(&mut self, job: Job) {
        self.metrics.waiting.fetch_sub(1, Ordering::Relaxed);
        match job {
            Job::Generate(seq) => {
                self.metrics.prompt_tokens.fetch_add(seq.prompt.len() as u64, Ordering::Relaxed);
                self.next_id += 1;
                self.waiting.push_back(Active {
                    id: self.next_id,
                    sampler: Sampler::new(seq.params.sampling.clone()),
                    tokens: seq.prompt.clone(),
                    seq: *seq,
                    cached: 0,
                    detokenizer: Detokenizer::new(false),
                    sent: 0,
                    last_token_at: Instant::now(),
                });
            }
            Job::Embed { inputs, reply } => {
                self.metrics.prompt_tokens.fetch_add(inputs.iter().map(Vec::len).sum::<usize>() as u64, Ordering::Relaxed);
                let _ = reply.send(inputs.iter().map(|tokens| self.model.mean_hidden(tokens, &self.device)).collect());
            }
        }
    }

    /// Out of the batch, its blocks freed, first in line to come back: it reads its prompt and
    /// what it generated again (vLLM's recompute preemption).
    fn preempt(&mut self, index: usize) {
        let mut active = self.running.remove(index);
        self.batch.remove(active.id);
        active.cached = 0;
        self.metrics.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(active);
    }

    /// Plans one step (vLLM's scheduler): every running sequence reads its next token or a
    /// chunk of its prompt, within `prefill_chunk` prompt tokens in all; where the cache has no
    /// room the newest running sequence is preempted. Waiting sequences then join while
    /// tokens and blocks remain. Returns each running sequence's tokens to read (0: none).
    fn schedule(&mut self) -> Vec<usize> {
        // Sequences whose clients went away leave first (their blocks are freed).
        for i in (0..self.running.len()).rev() {
            if self.running[i].seq.events.is_closed() {
                self.batch.remove(self.running.remove(i).id);
            }
        }
        self.waiting.retain(|a| !a.seq.events.is_closed());
        let mut budget = self.limits.prefill_chunk.max(1);
        let mut reads = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() {
            let a = &self.running[i];
            let left = a.tokens.len() - a.cached;
            // A decoding sequence reads its last token; a prefilling one what the budget allows.
            let n = if left == 1 { 1 } else { left.min(budget) };
            if n == 0 {
                reads.push(0);
                i += 1;
                continue;
            }
            if self.batch.reserve(a.id, n) {
                if left > 1 {
                    budget -= n;
                }
                reads.push(n);
                i += 1;
            } else {
                // The newest goes; when that is this one, it waits.
                self.preempt(self.running.len() - 1);
                preempted = true;
            }
        }
        // After a preemption the cache is full: nobody joins this step (the preempted would
        // come straight back).
        while !preempted && budget > 0 && self.running.len() < self.limits.max_num_seqs {
            let Some(mut a) = self.waiting.pop_front() else { break };
            a.cached = self.batch.add(a.id, &a.tokens);
            let left = a.tokens.len() - a.cached;
            let n = if left == 1 { 1 } else { left.min(budget) };
            if !self.batch.reserve(a.id, n) {
                self.batch.remove(a.id);
                self.waiting.push_front(a);
                break;
            }
            if left > 1 {
                budget -= n;
            }
            reads.push(n);
            self.running.push(a);
        }
        reads
    }

    /// One forward over every scheduled sequence's tokens; those that read their last token
    /// sample the next one.
    fn step(&mut self) {
        let reads = self.schedule();
        let entries: Vec<(SeqId, &[u32])> =
            self.running.iter().zip(&reads).filter(|(_, &n)| n > 0).map(|(a, &n)| (a.id, &a.tokens[a.cached..a.cached + n])).collect();
        if entries.is_empty() {
            return;
        }
        let logits = self.model.step(&mut self.batch, &entries);
        let vocab = logits.dims()[1];
        let logits: Vec<f32> = logits.into_data().convert::<f32>().into_vec().expect("f32 logits");
        let mut running = std::mem::take(&mut self.running);
        let mut row = 0;
        let mut finished = Vec::new();
        for (i, (a, &n)) in running.iter_mut().zip(&reads).enumerate() {
            if n == 0 {
                continue;
            }
            a.cached += n;
            if a.cached == a.tokens.len() {
                if let Outcome::Finished = self.accept(a, logits[row * vocab..(row + 1) * vocab].to_vec()) {
                    finished.push(i);
                }
            }
            row += 1;
        }
        for &i in finished.iter().rev() {
            self.batch.remove(running.remove(i).id);
        }
        self.running = running;
    }

    /// Samples a sequence's next token from `logits`, sends what text it completes, and says
    /// whether the sequence goes on.
    fn accept(&self, r: &mut Active, mut logits: Vec<f32>) -> Outcome {
        let params = &r.seq.params;
        let logprobs = params.logprobs.map(|top| log_softmax(&logits, top));
        if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<u32, f32>::new();
            for &t in r.generated() {
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
        let token = r.sampler.sample(&logits, &r.tokens);
        if let Some(constraint) = r.seq.constraint.as_mut() {
            constraint.advance(token);
            // A failed matcher allows end-of-text alone: the reply ends at it.
            if let Some(error) = constraint.error().filter(|_| token == self.tokenizer.eos()) {
                eprintln!("warning: structured output failed mid-reply, which ends here: {error}");
            }
        }
        let now = Instant::now();
        if r.generated().is_empty() {
            self.metrics.time_to_first_token.observe(now.duration_since(r.seq.arrived).as_secs_f64());
        } else {
            self.metrics.inter_token_latency.observe(now.duration_since(r.last_token_at).as_secs_f64());
        }
        r.last_token_at = now;
        self.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
        // A grammar ends at end-of-text, ignore_eos or not.
        let eos = token == self.tokenizer.eos() && (!params.ignore_eos || r.seq.constraint.is_some());
        r.tokens.push(token);
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
        let length = r.generated().len() >= params.max_tokens || r.tokens.len() >= self.model.max_seq_len();
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
                let completion_tokens = r.generated().len();
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
