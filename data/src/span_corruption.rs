//! T5's span corruption on a batch of text windows (Raffel et al., 2020): hide spans of tokens,
//! each replaced in the encoder's input by one sentinel; the decoder's target lists every
//! sentinel followed by the tokens it hid.

use furnace_core::rng::SeededRng;

use crate::loader::{Batch, EncoderRows};

/// How much is hidden and where the sentinels are: `noise_density` of each window's tokens in
/// spans of `mean_noise_span_length` on average, as T5's `random_spans_noise_mask`.
#[derive(Debug, Clone)]
pub struct SpanCorruption {
    pub noise_density: f64,
    pub mean_noise_span_length: f64,
    /// `<extra_id_0>`, `<extra_id_1>`, … in order.
    pub sentinels: Vec<u32>,
    /// Ends the input and the target.
    pub eos: u32,
    /// Starts the decoder (T5's padding token).
    pub start: u32,
}

impl SpanCorruption {
    /// Which of `length` tokens are noise, as T5 draws it: round(length·density) noise tokens
    /// (at least 1, at most length − 1) in round(noise / mean span) spans; both the noise and
    /// the kept tokens are cut into that many non-empty runs at random, and the runs alternate,
    /// kept first.
    pub fn noise_mask(&self, length: usize, rng: &mut SeededRng) -> Vec<bool> {
        let noise = ((length as f64 * self.noise_density).round() as usize).clamp(1, length - 1);
        let kept = length - noise;
        let spans = ((noise.min(kept) as f64 / self.mean_noise_span_length).round() as usize).max(1);
        let noise_runs = random_segmentation(noise, spans, rng);
        let kept_runs = random_segmentation(kept, spans, rng);
        let mut mask = Vec::with_capacity(length);
        for (k, n) in kept_runs.into_iter().zip(noise_runs) {
            mask.extend(std::iter::repeat_n(false, k));
            mask.extend(std::iter::repeat_n(true, n));
        }
        mask
    }

    /// The window batch (`inputs` rows of text; `targets` unused) as an encoder-decoder batch:
    /// the encoder reads each row with its spans replaced by sentinels, the decoder predicts
    /// `<extra_id_0> span₀ <extra_id_1> span₁ … </s>`. Every row of a batch has the same
    /// counts, so the shapes are fixed. The same seed hides the same spans.
    pub fn apply(&self, batch: Batch, seed: u64) -> Batch {
        let mut rng = SeededRng::new(seed);
        let (mut encoder, mut decoder) = (Vec::new(), Vec::new());
        for row in batch.inputs.chunks(batch.seq_len) {
            let mask = self.noise_mask(row.len(), &mut rng);
            let mut spans = 0;
            for (j, (&token, &noise)) in row.iter().zip(&mask).enumerate() {
                let starts_span = noise && (j == 0 || !mask[j - 1]);
                if starts_span {
                    let sentinel = *self.sentinels.get(spans).expect("the recipe check bounds the spans by the sentinels") as i64;
                    encoder.push(sentinel);
                    decoder.push(sentinel);
                    spans += 1;
                }
                if noise { &mut decoder } else { &mut encoder }.push(token);
            }
            encoder.push(self.eos as i64);
            decoder.push(self.eos as i64);
        }
        let rows = batch.batch;
        let (input_len, target_len) = (encoder.len() / rows, decoder.len() / rows);
        let inputs = decoder.chunks(target_len).flat_map(|t| std::iter::once(self.start as i64).chain(t[..target_len - 1].iter().copied()));
        Batch {
            inputs: inputs.collect(),
            targets: decoder,
            batch: rows,
            seq_len: target_len,
            items: batch.items,
            positions: None,
            encoder: Some(EncoderRows { tokens: encoder, len: input_len, lengths: vec![input_len; rows] }),
        }
    }
}

/// `items` cut into `segments` non-empty runs at random: the lengths, in order.
fn random_segmentation(items: usize, segments: usize, rng: &mut SeededRng) -> Vec<usize> {
    // Shuffle segments − 1 "a new run starts after this item" marks among the items − 1 gaps.
    let mut starts: Vec<bool> = (0..items - 1).map(|i| i < segments - 1).collect();
    for i in (1..starts.len()).rev() {
        starts.swap(i, rng.below(i + 1));
    }
    let mut lengths = vec![1];
    for start in starts {
        match start {
            true => lengths.push(1),
            false => *lengths.last_mut().expect("one run at least") += 1,
        }
    }
    lengths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corruption() -> SpanCorruption {
        SpanCorruption { noise_density: 0.15, mean_noise_span_length: 3.0, sentinels: (1000..1100).collect(), eos: 0, start: 0 }
    }

    #[test]
    fn noise_mask_has_t5s_counts() {
        let mut rng = SeededRng::new(3);
        for length in [20, 114, 512] {
            let mask = corruption().noise_mask(length, &mut rng);
            let noise = mask.iter().filter(|&&n| n).count();
            let spans = (0..length).filter(|&j| mask[j] && (j == 0 || !mask[j - 1])).count();
            let expected_noise = (length as f64 * 0.15).round() as usize;
            assert_eq!((mask.len(), noise), (length, expected_noise));
            assert_eq!(spans, (expected_noise as f64 / 3.0).round() as usize);
            assert!(!mask[0], "a kept run comes first");
        }
    }

    #[test]
    fn inputs_and_targets_together_restore_the_text() {
        let text: Vec<i64> = (0..2 * 100).map(|i| 1 + i % 500).collect();
        let batch = Batch {
            inputs: text.clone(),
            targets: vec![0; 200],
            batch: 2,
            seq_len: 100,
            items: vec![4, 9],
            positions: None,
            encoder: None,
        };
        let out = corruption().apply(batch.clone(), 11);
        let encoder = out.encoder.as_ref().unwrap();
        // 100 tokens: 15 noise in 5 spans → inputs 85 + 5 sentinels + eos, targets 15 + 5 + eos.
        assert_eq!((encoder.len, out.seq_len, out.items.clone()), (91, 21, vec![4, 9]));
        for row in 0..2 {
            let input = &encoder.tokens[row * 91..(row + 1) * 91];
            let target = &out.targets[row * 21..(row + 1) * 21];
            assert_eq!(&out.inputs[row * 21..(row + 1) * 21], &[&[0], &target[..20]].concat()[..], "decoder input is the shifted target");
            let mut restored = Vec::new();
            let sentinel_at = |s: &[i64], id: i64| s.iter().position(|&t| t == id).unwrap();
            for &token in &input[..90] {
                if (1000..1100).contains(&token) {
                    let from = sentinel_at(target, token) + 1;
                    let to = target[from..].iter().position(|&t| (1000..1100).contains(&t) || t == 0).unwrap() + from;
                    restored.extend_from_slice(&target[from..to]);
                } else {
                    restored.push(token);
                }
            }
            assert_eq!(restored, text[row * 100..(row + 1) * 100]);
        }
        assert_eq!(corruption().apply(batch.clone(), 11), out, "the seed decides");
        assert_ne!(corruption().apply(batch, 12), out);
    }
}
