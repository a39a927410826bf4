//! A tiny model must be able to memorise one fixed batch: the loop, loss, gradients and
//! optimizer wired together actually learn.

use burn::backend::Autodiff;
use burn::optim::GradientsParams;
use burn::prelude::*;
use furnace_core::rng::SeededRng;
use furnace_models::{CausalLm, DecoderConfig, Init};
use furnace_optim::{Algorithm, DecayGroups, Optimizer};
use furnace_trainer::objective::lm_loss_sum;

type B = Autodiff<burn::backend::Flex>;

#[test]
fn tiny_model_overfits_one_fixed_batch() {
    let device = Default::default();
    let (batch, seq, vocab) = (4, 16, 64);
    let mut rng = SeededRng::new(5);
    let tokens: Vec<i64> = (0..batch * (seq + 1)).map(|_| rng.below(vocab) as i64).collect();
    let rows: Vec<&[i64]> = tokens.chunks(seq + 1).collect();
    let inputs: Vec<i64> = rows.iter().flat_map(|r| r[..seq].to_vec()).collect();
    let targets: Vec<i64> = rows.iter().flat_map(|r| r[1..].to_vec()).collect();
    let mut model = DecoderConfig::new(vocab, 64, 2, 4, 128, 32).with_n_kv_heads(2).init::<B>(1, &device);
    let mut optimizer = Optimizer::<B>::new(
        Algorithm::AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-8 },
        DecayGroups { weight_decay: 0.0, decay_norms: false, decay_biases: false, decay_embeddings: false },
        Default::default(),
    );
    let mut loss_value = f64::INFINITY;
    for _ in 0..300 {
        let x = Tensor::<B, 2, Int>::from_data(TensorData::new(inputs.clone(), [batch, seq]), &device);
        let y = Tensor::<B, 2, Int>::from_data(TensorData::new(targets.clone(), [batch, seq]), &device);
        let loss = lm_loss_sum(model.forward(x), y) / (batch * seq) as f64;
        loss_value = loss.clone().into_scalar().elem::<f64>();
        if loss_value < 0.05 {
            break;
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optimizer.step(3e-3, model, grads, 1.0);
    }
    assert!(loss_value < 0.05, "loss stayed at {loss_value}");
}
