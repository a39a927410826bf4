//! The server's Prometheus metrics (`GET /metrics`, text format 0.0.4), named as vLLM names
//! its own where one exists: requests by status, tokens, time to first token and inter-token
//! latency, queue depth, running sequences, the KV cache's blocks, prefix-cache hits and preemptions.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Cumulative buckets over fixed upper bounds, in seconds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    const fn new(bounds: &'static [f64]) -> Self {
        Self { bounds, counts: Mutex::new((Vec::new(), 0.0, 0)) }
    }

    pub fn observe(&self, seconds: f64) {
        let mut guard = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (buckets, sum, count) = &mut *guard;
        buckets.resize(self.bounds.len(), 0);
        for (bucket, &bound) in buckets.iter_mut().zip(self.bounds) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
        *sum += seconds;
        *count += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let guard = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (buckets, sum, count) = &*guard;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in self.bounds.iter().enumerate() {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", buckets.get(i).copied().unwrap_or(0));
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}");
    }
}

const LATENCY_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0];

pub struct Metrics {
    requests_by_status: Mutex<BTreeMap<u16, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks: AtomicUsize,
    /// Prompt tokens looked up in the prefix cache, and those found there.
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    pub preemptions: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests_by_status: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(LATENCY_BOUNDS),
            inter_token_latency: Histogram::new(LATENCY_BOUNDS),
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            kv_blocks_used: AtomicUsize::new(0),
            kv_blocks: AtomicUsize::new(0),
            prefix_cache_queries: AtomicU64::new(0),
            prefix_cache_hits: AtomicU64::new(0),
            preemptions: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    pub fn count_request(&self, status: u16) {
        *self.requests_by_status.lock().unwrap_or_else(|e| e.into_inner()).entry(status).or_default() += 1;
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP furnace_requests_total Requests answered, by HTTP status.\n# TYPE furnace_requests_total counter");
        for (status, n) in self.requests_by_status.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "furnace_requests_total{{status=\"{status}\"}} {n}");
        }
        let counters = [
            ("furnace_prompt_tokens_total", "Prompt tokens read.", self.prompt_tokens.load(Ordering::Relaxed)),
            ("furnace_generation_tokens_total", "Tokens generated.", self.generation_tokens.load(Ordering::Relaxed)),
            (
                "furnace_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
                self.prefix_cache_queries.load(Ordering::Relaxed),
            ),
            ("furnace_prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", self.prefix_cache_hits.load(Ordering::Relaxed)),
            ("furnace_num_preemptions_total", "Sequences preempted for want of KV-cache blocks.", self.preemptions.load(Ordering::Relaxed)),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        }
        let (used, blocks) = (self.kv_blocks_used.load(Ordering::Relaxed) as f64, self.kv_blocks.load(Ordering::Relaxed) as f64);
        let (queries, hits) = (self.prefix_cache_queries.load(Ordering::Relaxed), self.prefix_cache_hits.load(Ordering::Relaxed));
        let gauges = [
            ("furnace_num_requests_waiting", "Requests queued, not yet in the batch.", self.waiting.load(Ordering::Relaxed) as f64),
            ("furnace_num_requests_running", "Sequences in the running batch.", self.running.load(Ordering::Relaxed) as f64),
            ("furnace_kv_cache_blocks_used", "KV-cache blocks the running sequences hold.", used),
            ("furnace_kv_cache_blocks_free", "KV-cache blocks free or holding only cached prefixes.", blocks - used),
            ("furnace_kv_cache_usage_perc", "KV-cache blocks in use as a fraction of the pool.", used / blocks.max(1.0)),
            (
                "furnace_prefix_cache_hit_rate",
                "Prompt tokens found in the prefix cache as a fraction of those looked up.",
                hits as f64 / queries.max(1) as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
        }
        self.time_to_first_token.render("furnace_time_to_first_token_seconds", "From a request's arrival to its first token.", &mut out);
        self.inter_token_latency.render("furnace_inter_token_latency_seconds", "Between a sequence's consecutive tokens.", &mut out);
        out
    }
}
