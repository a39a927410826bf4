//! BERT's masked-LM objective on a batch: choose tokens to predict, hide them, and make the
//! targets the original tokens at the chosen positions only.

use furnace_core::rng::SeededRng;

use crate::loader::{Batch, IGNORE};

/// How tokens are chosen and hidden (Devlin et al., 2019, as transformers'
/// DataCollatorForLanguageModeling): each token but the special ones is chosen with
/// `probability`; a chosen token becomes `mask` 80% of the time, a uniformly random token 10%,
/// and stays itself 10%.
#[derive(Debug, Clone)]
pub struct Masking {
    pub probability: f64,
    pub mask: u32,
    pub vocab_size: usize,
    /// Tokens never chosen (the document separator, the mask itself).
    pub special: Vec<u32>,
}

impl Masking {
    /// The batch with its inputs masked and its targets set to the chosen tokens ([`IGNORE`]
    /// elsewhere). The same seed chooses the same tokens, so a resumed run masks as the
    /// uninterrupted one did.
    pub fn apply(&self, mut batch: Batch, seed: u64) -> Batch {
        let mut rng = SeededRng::new(seed);
        batch.targets = batch
            .inputs
            .iter_mut()
            .map(|token| {
                let original = *token;
                if self.special.contains(&(original as u32)) || rng.uniform() >= self.probability {
                    return IGNORE;
                }
                let how = rng.uniform();
                if how < 0.8 {
                    *token = self.mask as i64;
                } else if how < 0.9 {
                    *token = rng.below(self.vocab_size) as i64;
                }
                original
            })
            .collect();
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chooses_about_the_probability_and_hides_eighty_ten_ten() {
        let n = 200_000;
        let inputs: Vec<i64> = (0..n).map(|i| 2 + (i % 97) as i64).collect();
        let batch =
            Batch { inputs: inputs.clone(), targets: vec![0; n], batch: 1, seq_len: n, items: vec![0], positions: None, encoder: None };
        let masking = Masking { probability: 0.15, mask: 1, vocab_size: 100, special: vec![0, 1] };
        let out = masking.apply(batch.clone(), 7);
        let chosen: Vec<usize> = (0..n).filter(|&i| out.targets[i] != IGNORE).collect();
        let share = |count: usize, of: usize| count as f64 / of as f64;
        assert!((share(chosen.len(), n) - 0.15).abs() < 0.005, "{}", share(chosen.len(), n));
        assert!(chosen.iter().all(|&i| out.targets[i] == inputs[i]), "targets are the original tokens");
        assert!((0..n).filter(|&i| out.targets[i] == IGNORE).all(|i| out.inputs[i] == inputs[i]), "unchosen tokens stay");
        let masked = chosen.iter().filter(|&&i| out.inputs[i] == 1).count();
        let kept = chosen.iter().filter(|&&i| out.inputs[i] == inputs[i]).count();
        assert!((share(masked, chosen.len()) - 0.8).abs() < 0.01, "{}", share(masked, chosen.len()));
        // A random replacement equals the original 1 time in 100.
        assert!((share(kept, chosen.len()) - 0.101).abs() < 0.01, "{}", share(kept, chosen.len()));
        assert_eq!(masking.apply(batch.clone(), 7), out, "the seed decides");
        assert_ne!(masking.apply(batch, 8), out);
    }

    #[test]
    fn special_tokens_are_never_chosen() {
        let inputs: Vec<i64> = (0..10_000).map(|i| (i % 3) as i64).collect();
        let batch = Batch { inputs, targets: vec![0; 10_000], batch: 1, seq_len: 10_000, items: vec![0], positions: None, encoder: None };
        let out = Masking { probability: 0.5, mask: 1, vocab_size: 3, special: vec![0, 1] }.apply(batch, 3);
        assert!(out.targets.iter().all(|&t| t == IGNORE || t == 2));
        assert!(out.targets.contains(&2));
    }
}
