//! Turning next-token logits into a token: greedy, temperature, top-k, top-p, min-p and a
//! repetition penalty, on the host with a seeded RNG so a seed reproduces a sample.

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
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: SeededRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = SeededRng::new(config.seed);
        Self { config, rng }
    }

    /// Pick the next token from `logits` (one row over the vocabulary), given the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
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
        if c.temperature <= 0.0 {
            return argmax(&logits);
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
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut target = self.rng.uniform() * total;
        for &(token, p) in &probs {
            target -= p;
            if target <= 0.0 {
                return token;
            }
        }
        // Filters keep the most likely token for valid settings; non-finite logits (a damaged
        // model) may leave none, and then the choice is the greedy one.
        probs.last().map_or_else(|| argmax(&logits), |p| p.0)
    }
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
