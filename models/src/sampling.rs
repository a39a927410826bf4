//! Turning next-token logits into a token: greedy, temperature, top-k, top-p, min-p and a
//! repetition penalty, or Mirostat 2.0, on the host with a seeded RNG so a seed reproduces a
//! sample.

use furnace_core::rng::SeededRng;

#[derive(Debug, Clone)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1.0 keeps all.
    pub top_p: f64,
    /// Drop tokens less likely than min_p × the most likely one; 0 keeps all.
    pub min_p: f64,
    /// Divide positive logits (multiply negative ones) of tokens already seen; 1.0 is off.
    pub repetition_penalty: f64,
    pub seed: u64,
    /// Mirostat 2.0 in place of top-k, top-p, min-p and the repetition penalty (after the
    /// temperature, as llama.cpp chains them).
    pub mirostat: Option<Mirostat>,
}

/// Mirostat 2.0 (Basu et al. 2021, as llama.cpp's `mirostat_v2` sampler): keep the tokens
/// whose surprise −log2 p is at most μ, draw among them, then move μ by η times the distance
/// of the drawn token's surprise from τ, so the text's surprise holds near τ. μ starts at 2τ.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mirostat {
    /// The target surprise τ, in bits (llama.cpp's default 5).
    pub tau: f64,
    /// The learning rate η (llama.cpp's default 0.1).
    pub eta: f64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0, mirostat: None }
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: SeededRng,
    /// Mirostat's running truncation threshold μ.
    mu: f64,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = SeededRng::new(config.seed);
        let mu = config.mirostat.map_or(0.0, |m| 2.0 * m.tau);
        Self { config, rng, mu }
    }

    /// Pick the next token from `logits` (one row over the vocabulary), given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if let (Some(mirostat), false) = (self.config.mirostat, self.greedy()) {
            return self.mirostat(logits, mirostat).0;
        }
        let distribution = self.distribution(logits, history);
        self.draw(&distribution)
    }

    /// One Mirostat 2.0 step: the drawn token and the kept set's size.
    pub fn mirostat(&mut self, logits: &[f32], m: Mirostat) -> (u32, usize) {
        let kept = self.mirostat_kept(logits);
        let token = self.draw(&kept);
        self.mirostat_update(&kept, token, m);
        (token, kept.len())
    }

    /// The tokens Mirostat keeps at the current μ, renormalised, most likely first: those whose
    /// surprise is at most μ (at least the most likely one).
    pub fn mirostat_kept(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let mut probs = softmax_sorted(logits.iter().map(|&l| l as f64 / self.config.temperature));
        let kept = probs.iter().position(|&(_, p)| -p.log2() > self.mu).unwrap_or(probs.len()).max(1);
        probs.truncate(kept);
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.into_iter().map(|(t, p)| (t, p / total)).collect()
    }

    /// μ moves by η times the drawn token's surprise (within the kept set) minus τ.
    pub fn mirostat_update(&mut self, kept: &[(u32, f64)], token: u32, m: Mirostat) {
        let surprise = -kept.iter().find(|p| p.0 == token).map_or(1.0, |p| p.1).log2();
        self.mu -= m.eta * (surprise - m.tau);
    }

    /// Mirostat's μ now.
    pub fn mirostat_mu(&self) -> f64 {
        self.mu
    }

    /// What `sample` draws from: each token the filters keep with its weight (not normalised),
    /// most likely first; the argmax alone when greedy. Never empty: non-finite logits (a
    /// damaged model) that leave no token give the greedy choice.
    pub fn distribution(&self, logits: &[f32], history: &[u32]) -> Vec<(u32, f64)> {
        let mut logits = logits.to_vec();
        let c = &self.config;
        if c.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(s) = seen.get_mut(t as usize) {
                    *s = true;
                }
            }
            for (l, s) in logits.iter_mut().zip(seen) {
                if s {
                    *l = if *l > 0.0 { *l / c.repetition_penalty as f32 } else { *l * c.repetition_penalty as f32 };
                }
            }
        }
        if self.greedy() {
            return vec![(argmax(&logits), 1.0)];
        }
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, (((l - max) as f64) / c.temperature).exp())).collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if c.top_k > 0 {
            probs.truncate(c.top_k);
        }
        if c.min_p > 0.0 {
            let threshold = probs[0].1 * c.min_p;
            probs.retain(|&(_, p)| p >= threshold);
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if c.top_p < 1.0 {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|&(_, p)| {
                    cumulative += p / total;
                    cumulative >= c.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        probs.retain(|p| p.1 > 0.0);
        if probs.is_empty() {
            probs.push((argmax(&logits), 1.0));
        }
        probs
    }

    /// A token drawn from `distribution` (weights as `distribution` gives them); greedy takes the
    /// first without drawing.
    pub fn draw(&mut self, distribution: &[(u32, f64)]) -> u32 {
        if self.greedy() {
            return distribution[0].0;
        }
        let total: f64 = distribution.iter().map(|p| p.1).sum();
        let mut target = self.uniform() * total;
        for &(token, p) in distribution {
            target -= p;
            if target <= 0.0 {
                return token;
            }
        }
        distribution[distribution.len() - 1].0
    }

    /// A uniform draw in [0, 1) from this sampler's stream.
    pub fn uniform(&mut self) -> f64 {
        self.rng.uniform()
    }

    pub fn greedy(&self) -> bool {
        self.config.temperature <= 0.0
    }
}

/// softmax of `logits`, as (token, probability), most likely first (ties by token id).
fn softmax_sorted(logits: impl Iterator<Item = f64>) -> Vec<(u32, f64)> {
    let mut probs: Vec<(u32, f64)> = logits.enumerate().map(|(i, l)| (i as u32, l)).collect();
    let max = probs.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let mut total = 0.0;
    for p in &mut probs {
        p.1 = (p.1 - max).exp();
        total += p.1;
    }
    for p in &mut probs {
        p.1 /= total;
    }
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    probs
}

pub fn argmax(values: &[f32]) -> u32 {
    values.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0 as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplingConfig { temperature: 5.0, top_k: 1, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.1, 3.0, 2.9], &[]), 1);
        }
    }

    #[test]
    fn min_p_and_top_p_remove_unlikely_tokens() {
        let logits = [10.0, 9.5, 0.0, -5.0];
        let mut s = Sampler::new(SamplingConfig { temperature: 1.0, min_p: 0.1, seed: 3, ..Default::default() });
        let mut t = Sampler::new(SamplingConfig { temperature: 1.0, top_p: 0.9, seed: 3, ..Default::default() });
        for _ in 0..200 {
            assert!(s.sample(&logits, &[]) < 2);
            assert!(t.sample(&logits, &[]) < 2);
        }
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let mut s = Sampler::new(SamplingConfig { repetition_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&[3.0, 2.0], &[0]), 1);
    }

    /// Mirostat holds the text's surprise at τ: over 3,000 draws from a fixed Zipf-like
    /// distribution the mean surprise of the last 2,000 is within 0.1 bit of τ, μ settles, and
    /// the kept set is exactly the tokens whose surprise is at most μ.
    #[test]
    fn mirostat_holds_the_surprise_at_tau() {
        let logits: Vec<f32> = (1..=200).map(|rank| -(rank as f32).ln() * 1.1).collect();
        for tau in [3.0, 5.0] {
            let mirostat = Mirostat { tau, eta: 0.1 };
            let mut s = Sampler::new(SamplingConfig { temperature: 1.0, seed: 11, mirostat: Some(mirostat), ..Default::default() });
            assert_eq!(s.mirostat_mu(), 2.0 * tau);
            let probs = softmax_sorted(logits.iter().map(|&l| l as f64));
            let mut surprises = Vec::new();
            for _ in 0..3000 {
                let mu = s.mirostat_mu();
                let (token, kept) = s.mirostat(&logits, mirostat);
                let expected = probs.iter().filter(|p| -p.1.log2() <= mu).count().max(1);
                assert_eq!(kept, expected, "μ = {mu}");
                let rank = probs.iter().position(|p| p.0 == token).unwrap();
                assert!(rank < kept, "the token is one of the kept");
                let kept_total: f64 = probs[..kept].iter().map(|p| p.1).sum();
                surprises.push(-(probs[rank].1 / kept_total).log2());
            }
            let late = &surprises[1000..];
            let mean = late.iter().sum::<f64>() / late.len() as f64;
            eprintln!("τ = {tau}: mean surprise {mean:.3} bits over draws 1000..3000, μ now {:.3}", s.mirostat_mu());
            assert!((mean - tau).abs() < 0.1, "τ = {tau}: mean surprise {mean}");
        }
    }

    /// llama.cpp's own Mirostat 2.0 after its temperature (tests/fixtures/mirostat.json, written
    /// by scripts/reference/make_mirostat_fixture.py through llama-cpp-python): following its
    /// draws over 300 steps, every step keeps the tokens llama.cpp kept, so μ moves alike.
    #[test]
    fn mirostat_keeps_what_llama_cpp_keeps() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mirostat.json");
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let logits: Vec<Vec<f32>> = serde_json::from_value(fixture["logits"].clone()).unwrap();
        for case in fixture["cases"].as_array().unwrap() {
            let mirostat = Mirostat { tau: case["tau"].as_f64().unwrap(), eta: case["eta"].as_f64().unwrap() };
            let temperature = case["temperature"].as_f64().unwrap();
            let mut s = Sampler::new(SamplingConfig { temperature, mirostat: Some(mirostat), ..Default::default() });
            let mut sizes = std::collections::BTreeSet::new();
            for (step, row) in logits.iter().enumerate() {
                let kept = s.mirostat_kept(row);
                assert_eq!(kept.len() as u64, case["kept"][step].as_u64().unwrap(), "{case:?} step {step}");
                let drawn = case["drawn"][step].as_u64().unwrap() as u32;
                assert!(kept.iter().any(|p| p.0 == drawn), "step {step}: llama.cpp drew a token this set lacks");
                s.mirostat_update(&kept, drawn, mirostat);
                sizes.insert(kept.len());
            }
            assert!(sizes.len() > 5, "the kept set's size varied: {sizes:?}");
        }
    }

    #[test]
    fn same_seed_same_samples() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingConfig { temperature: 1.0, seed, ..Default::default() });
            (0..30).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
