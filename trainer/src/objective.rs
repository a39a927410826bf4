//! Losses live here, apart from the model (which only returns logits).

use burn::prelude::*;
use burn::tensor::activation::softmax;
use furnace_configs::rng::SeededRng;
use furnace_models::kernels::{cross_entropy, FusedOps};

/// Summed next-token cross-entropy over the positions with a target (an ignored target, -1,
/// counts nothing and gets no gradient: prompts and padding under SFT): the caller divides by
/// the step's count of targets, so accumulated micro-batches average over tokens, not batches.
pub fn causal_lm_loss_sum<B: FusedOps>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    cross_entropy(logits.reshape([batch * seq, vocab]), targets.reshape([batch * seq])).sum()
}

/// One label per position drawn from the model's own predictive distribution (inverse-CDF
/// sampling on the host with a seeded RNG, so the draw is reproducible).
pub fn sample_labels<B: Backend>(logits: Tensor<B, 3>, rng: &mut SeededRng) -> Tensor<B, 2, Int> {
    let [batch, seq, vocab] = logits.dims();
    let device = logits.device();
    let probs: Vec<f32> =
        softmax(logits.reshape([batch * seq, vocab]), 1).into_data().convert::<f32>().into_vec().expect("f32 probabilities");
    let labels: Vec<i64> = probs
        .chunks(vocab)
        .map(|row| {
            let mut target = rng.uniform() as f32;
            row.iter()
                .position(|&p| {
                    target -= p;
                    target <= 0.0
                })
                .unwrap_or(vocab - 1) as i64
        })
        .collect();
    Tensor::from_data(TensorData::new(labels, [batch, seq]), &device)
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    #[test]
    fn sampled_labels_follow_the_softmax() {
        let device = Default::default();
        // Position 0 puts all mass on token 2; position 1 splits evenly between tokens 0 and 1.
        let logits = Tensor::<B, 3>::from_data(TensorData::new(vec![-30.0f32, -30.0, 30.0, 0.0, 0.0, -30.0], [1, 2, 3]), &device);
        let mut rng = SeededRng::new(1);
        let mut counts = [0usize; 3];
        for _ in 0..400 {
            let labels: Vec<i64> = sample_labels(logits.clone(), &mut rng).into_data().convert::<i64>().into_vec().unwrap();
            assert_eq!(labels[0], 2);
            counts[labels[1] as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!((150..250).contains(&counts[0]), "{counts:?}");
    }

    /// SFT masking: logits at positions without a target (prompt, padding) move neither the
    /// loss nor the gradient anywhere.
    #[test]
    fn ignored_positions_change_neither_loss_nor_gradient() {
        type AB = burn::backend::Autodiff<B>;
        let device = Default::default();
        let (seq, vocab) = (6, 7);
        let mut rng = SeededRng::new(3);
        let base: Vec<f32> = (0..seq * vocab).map(|_| rng.normal() as f32).collect();
        let targets = Tensor::<AB, 2, Int>::from_data(TensorData::new(vec![-1i64, -1, 3, 5, -1, 0], [1, seq]), &device);
        let ignored = [0usize, 1, 4];
        let run = |values: Vec<f32>| {
            let logits = Tensor::<AB, 3>::from_data(TensorData::new(values, [1, seq, vocab]), &device).require_grad();
            let loss = causal_lm_loss_sum(logits.clone(), targets.clone());
            let grads = loss.backward();
            let grad: Vec<f32> = logits.grad(&grads).unwrap().into_data().into_vec().unwrap();
            (loss.into_scalar(), grad)
        };
        let mut perturbed = base.clone();
        for &p in &ignored {
            perturbed[p * vocab..(p + 1) * vocab].iter_mut().for_each(|v| *v += 10.0 * rng.normal() as f32);
        }
        let ((loss_a, grad_a), (loss_b, grad_b)) = (run(base), run(perturbed));
        assert_eq!(loss_a, loss_b);
        assert_eq!(grad_a, grad_b);
        for &p in &ignored {
            assert!(grad_a[p * vocab..(p + 1) * vocab].iter().all(|g| *g == 0.0));
        }
        assert!(grad_a[2 * vocab..3 * vocab].iter().any(|g| *g != 0.0));
    }
}
