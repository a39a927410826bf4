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
        let distribution = self.distribution(logits, history);
        self.draw(&distribution)
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
