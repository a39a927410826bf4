//! Losses live here, apart from the model (which only returns logits).

use burn::prelude::*;
use burn::tensor::activation::{log_sigmoid, softmax};
use furnace_configs::{Arch, DpoLoss, DpoSection, GrpoLoss, GrpoSection, PpoSection, Recipe, SENTINELS};
use furnace_core::rng::SeededRng;
use furnace_data::mlm::Masking;
use furnace_data::span_corruption::SpanCorruption;
use furnace_data::{Batch, TextTokenizer};
use furnace_models::kernels::{cross_entropy, FusedOps};
use furnace_models::{MoeConfig, RouterLossWeights, Routing};

use crate::metrics::Sums;

/// Summed cross-entropy over the positions with a target — the next token, or under masked LM
/// the hidden one (an ignored target, -1, counts nothing and gets no gradient: prompts and
/// padding under SFT, unmasked tokens under masked LM): the caller divides by
/// the step's count of targets, so accumulated micro-batches average over tokens, not batches.
pub fn lm_loss_sum<B: FusedOps>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    cross_entropy(logits.reshape([batch * seq, vocab]), targets.reshape([batch * seq])).sum()
}

/// How text batches are noised for a denoising objective: BERT's masks, or T5's spans.
#[derive(Debug, Clone)]
pub enum Denoising {
    MaskedLm(Masking),
    SpanCorruption(SpanCorruption),
}

impl Denoising {
    /// The recipe's denoising objective for its tokenizer, which must have the tokens it needs
    /// (`[MASK]`, T5's sentinels); None when the model reads its batches as they come.
    pub fn for_recipe(recipe: &Recipe, tokenizer: &TextTokenizer, text: bool) -> anyhow::Result<Option<Self>> {
        let t = &recipe.training;
        let needs = |what: &str, flag: &str| {
            anyhow::anyhow!(
                "recipe key data.tokenizer = {}: this tokenizer has no {what}, which model.arch = \"{}\" needs; leave data.tokenizer empty to train one with it, or build one with `furnace data tokenizer {flag}`",
                recipe.data.tokenizer,
                recipe.model.arch()
            )
        };
        Ok(match recipe.model.arch() {
            Arch::Bert => {
                let mask = tokenizer.mask().ok_or_else(|| needs("[MASK] token", "--masked-lm"))?;
                Some(Self::MaskedLm(Masking {
                    probability: t.mlm_probability,
                    mask,
                    vocab_size: tokenizer.vocab_size(),
                    special: vec![tokenizer.eos(), mask],
                }))
            }
            Arch::T5 if text => {
                let sentinels = tokenizer.sentinels();
                if sentinels.len() < SENTINELS {
                    return Err(needs(&format!("{SENTINELS} sentinels <extra_id_0>… (it has {})", sentinels.len()), "--sentinels"));
                }
                Some(Self::SpanCorruption(SpanCorruption {
                    noise_density: t.mlm_probability,
                    mean_noise_span_length: t.mean_noise_span_length,
                    sentinels,
                    eos: tokenizer.eos(),
                    start: tokenizer.pad(),
                }))
            }
            _ => None,
        })
    }

    /// The batch noised; the same seed noises it the same way (so resume replays it).
    pub fn apply(&self, batch: Batch, seed: u64) -> Batch {
        match self {
            Self::MaskedLm(masking) => masking.apply(batch, seed),
            Self::SpanCorruption(spans) => spans.apply(batch, seed),
        }
    }
}

/// A mixture of experts' auxiliary losses, weighted as the recipe says, to add to the
/// language-model loss (as transformers adds `router_aux_loss_coef · aux_loss`), and what each
/// layer's share of them needs (see [`RouterLossWeights`]: activation checkpointing
/// back-propagates a layer's share when it recomputes the layer); their values and the
/// experts' load go into `stats`.
pub fn router_losses<B: Backend>(routing: &Routing<B>, experts: &MoeConfig, stats: &mut Sums) -> (Tensor<B, 1>, RouterLossWeights) {
    let weights = routing.loss_weights(experts.router_aux_loss_coef, experts.router_z_loss_coef);
    let over_layers = |share: &dyn Fn(Tensor<B, 2>) -> Tensor<B, 1>| {
        routing.logits.iter().map(|l| share(l.clone())).reduce(|a, b| a + b).expect("one MoE layer")
    };
    let (balance, z) = (over_layers(&|l| weights.load_balancing(l)), over_layers(&|l| weights.z(l)));
    let scalar = |t: &Tensor<B, 1>| t.clone().into_scalar().elem::<f64>();
    stats.add(ROUTED_BATCHES, 1.0);
    stats.add("moe/aux_loss", scalar(&balance));
    stats.add("moe/z_loss", scalar(&z));
    for (expert, fraction) in weights.expert_fractions().iter().enumerate() {
        stats.add(&format!("moe/expert_fraction/{expert}"), *fraction);
    }
    (balance * weights.aux_coef + z * weights.z_coef, weights)
}

/// Mixture-of-experts metrics per routed batch: `moe/aux_loss` (the load-balancing loss, k when
/// even), `moe/z_loss` and `moe/expert_fraction/<e>`; nothing when no batch was routed.
pub fn router_means(sums: &Sums) -> Vec<(String, f64)> {
    if sums.get(ROUTED_BATCHES) == 0.0 {
        return Vec::new();
    }
    sums.under("moe/").map(|(name, sum)| (name.to_string(), sum / sums.get(ROUTED_BATCHES))).collect()
}

const ROUTED_BATCHES: &str = "routed_batches";

/// Per-row sums of the targets' log-probabilities `[rows]` (ignored targets count nothing):
/// the log-likelihood of each row's completion.
pub fn sequence_log_probs<B: FusedOps>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    cross_entropy(logits.reshape([batch * seq, vocab]), targets.reshape([batch * seq]))
        .reshape([batch, seq])
        .sum_dim(1)
        .reshape([batch])
        .neg()
}

/// DPO's loss per pair from the completions' log-probabilities under the policy and the
/// reference, and the implicit rewards β·(log π − log ref) of chosen and rejected, as TRL's
/// `dpo_loss` computes them (IPO expects length-averaged log-probabilities).
pub fn dpo_loss<B: Backend>(
    policy_chosen: Tensor<B, 1>,
    policy_rejected: Tensor<B, 1>,
    ref_chosen: Tensor<B, 1>,
    ref_rejected: Tensor<B, 1>,
    config: &DpoSection,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let beta = config.beta;
    let chosen_rewards = (policy_chosen.clone() - ref_chosen.clone()).detach() * beta;
    let rejected_rewards = (policy_rejected.clone() - ref_rejected.clone()).detach() * beta;
    let margin = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected);
    let losses = match config.loss_type {
        DpoLoss::Sigmoid => {
            let smoothing = config.label_smoothing;
            log_sigmoid(margin.clone() * beta).neg() * (1.0 - smoothing) - log_sigmoid(margin.neg() * beta) * smoothing
        }
        DpoLoss::Ipo => (margin - 1.0 / (2.0 * beta)).powi_scalar(2),
    };
    (losses, chosen_rewards, rejected_rewards)
}

/// A reward model's Bradley-Terry loss per pair, −log σ(r_chosen − r_rejected), as TRL's
/// RewardTrainer computes it (without its optional margin).
pub fn reward_loss<B: Backend>(chosen: Tensor<B, 1>, rejected: Tensor<B, 1>) -> Tensor<B, 1> {
    log_sigmoid(chosen - rejected).neg()
}

/// Per-token log-probabilities `[rows, seq]` of the targets (0 where ignored).
pub fn token_log_probs<B: FusedOps>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 2> {
    let [batch, seq, vocab] = logits.dims();
    cross_entropy(logits.reshape([batch * seq, vocab]), targets.reshape([batch * seq])).reshape([batch, seq]).neg()
}

/// GRPO's advantages, as TRL computes them: each reward minus its group's mean (groups are
/// `group` consecutive rows), divided by the group's standard deviation (unbiased) + 1e-4 when
/// `scale`.
pub fn group_advantages(rewards: &[f64], group: usize, scale: bool) -> Vec<f64> {
    rewards
        .chunks(group)
        .flat_map(|g| {
            let mean = g.iter().sum::<f64>() / g.len() as f64;
            let std = (g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (g.len() as f64 - 1.0).max(1.0)).sqrt();
            g.iter().map(move |r| if scale { (r - mean) / (std + 1e-4) } else { r - mean })
        })
        .collect()
}

/// GRPO's loss (TRL's `_compute_loss`, one optimisation step per generation batch) from the
/// sampled replies' per-token log-probabilities `[rows, seq]` under the policy and the
/// reference, the 0/1 `mask` of reply tokens and each row's advantage: per token
/// `−exp(logp − sg(logp))·A + β·(exp(ref − logp) − (ref − logp) − 1)` (the ratio is 1 in
/// value, ∇logp in gradient; the k3 KL estimate), averaged as `loss_type` says. Returns the
/// loss and the mean per-token KL.
pub fn grpo_loss<B: Backend>(
    logps: Tensor<B, 2>,
    ref_logps: Tensor<B, 2>,
    mask: Tensor<B, 2>,
    advantages: Tensor<B, 1>,
    config: &GrpoSection,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let rows = logps.dims()[0];
    let ratio = (logps.clone() - logps.clone().detach()).exp();
    let log_ref_ratio = ref_logps - logps;
    let kl = log_ref_ratio.clone().exp() - log_ref_ratio - 1.0;
    let mut per_token = (ratio * advantages.unsqueeze_dim::<2>(1)).neg();
    if config.beta != 0.0 {
        per_token = per_token + kl.clone() * config.beta;
    }
    let masked = per_token * mask.clone();
    let loss = match config.loss_type {
        GrpoLoss::Grpo => (masked.sum_dim(1) / mask.clone().sum_dim(1).clamp_min(1.0)).mean().reshape([1]),
        GrpoLoss::Dapo => masked.sum() / mask.clone().sum().clamp_min(1.0),
        GrpoLoss::DrGrpo => masked.sum() / (rows * config.max_completion_length) as f64,
    };
    let mean_kl = (kl * mask.clone()).sum().detach() / mask.sum().clamp_min(1.0);
    (loss, mean_kl)
}

/// PPO's advantages and returns, as TRL's PPOTrainer computes them, over `[rows, len]`
/// row-major arrays (`mask` marks reply tokens): per-token rewards `−kl_coef·(logp − ref)` with
/// each reply's score added at its last token, GAE backwards along each row (values and
/// rewards 0 outside the reply), returns = advantages + values, then advantages whitened over
/// the reply tokens (unbiased variance) and zeroed elsewhere.
pub fn ppo_advantages(
    logps: &[f64],
    ref_logps: &[f64],
    values: &[f64],
    scores: &[f64],
    mask: &[bool],
    len: usize,
    config: &PpoSection,
) -> (Vec<f64>, Vec<f64>) {
    let masked = |x: &[f64], i: usize| if mask[i] { x[i] } else { 0.0 };
    let mut advantages = vec![0.0; mask.len()];
    let mut returns = vec![0.0; mask.len()];
    for (row, score) in scores.iter().enumerate() {
        let at = row * len;
        let last_token = (0..len).rev().find(|&t| mask[at + t]);
        let mut running = 0.0;
        for t in (0..len).rev() {
            let i = at + t;
            let mut reward = if mask[i] { -config.kl_coef * (logps[i] - ref_logps[i]) } else { 0.0 };
            if Some(t) == last_token {
                reward += score;
            }
            let next = if t + 1 < len { masked(values, i + 1) } else { 0.0 };
            running = reward + config.gamma * next - masked(values, i) + config.gamma * config.lam * running;
            advantages[i] = running;
            returns[i] = running + masked(values, i);
        }
    }
    let count = mask.iter().filter(|&&m| m).count() as f64;
    let mean = advantages.iter().zip(mask).filter(|(_, &m)| m).map(|(a, _)| a).sum::<f64>() / count;
    let var = advantages.iter().zip(mask).filter(|(_, &m)| m).map(|(a, _)| (a - mean).powi(2)).sum::<f64>() / (count - 1.0).max(1.0);
    let scale = 1.0 / (var + 1e-8).sqrt();
    for (a, &m) in advantages.iter_mut().zip(mask) {
        *a = if m { (*a - mean) * scale } else { 0.0 };
    }
    (advantages, returns)
}

/// What PPO's loss needs from the rollout, `[rows, len]` each (`advantages` `[rows, len]` too).
pub struct PpoTargets<B: Backend> {
    pub old_logps: Tensor<B, 2>,
    pub old_values: Tensor<B, 2>,
    pub advantages: Tensor<B, 2>,
    pub returns: Tensor<B, 2>,
    pub mask: Tensor<B, 2>,
}

/// PPO's loss (TRL's PPOTrainer): the clipped policy loss `max(−A·ρ, −A·clip(ρ, 1 ± ε))` and
/// the clipped value loss `½·max((v − R)², (clip(v, v_old ± ε_v) − R)²)`, masked means over the
/// reply tokens, combined as `pg + vf_coef·vf`. Returns the loss, the policy and value losses
/// and the fraction of tokens whose ratio was clipped.
pub fn ppo_loss<B: Backend>(
    logps: Tensor<B, 2>,
    values: Tensor<B, 2>,
    targets: &PpoTargets<B>,
    config: &PpoSection,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let PpoTargets { old_logps, old_values, advantages, returns, mask } = targets;
    let count = mask.clone().sum().clamp_min(1.0);
    let masked_mean = |x: Tensor<B, 2>| (x * mask.clone()).sum() / count.clone();
    let eps_v = config.cliprange_value;
    let clipped_values = old_values.clone() + (values.clone() - old_values.clone()).clamp(-eps_v, eps_v);
    let value_losses = (values - returns.clone()).powi_scalar(2).max_pair((clipped_values - returns.clone()).powi_scalar(2));
    let vf_loss = masked_mean(value_losses) * 0.5;
    let ratio = (logps - old_logps.clone()).exp();
    let eps = config.cliprange;
    let unclipped = advantages.clone().neg() * ratio.clone();
    let clipped = advantages.clone().neg() * ratio.clamp(1.0 - eps, 1.0 + eps);
    let clip_fraction = masked_mean(clipped.clone().greater(unclipped.clone()).float()).detach();
    let pg_loss = masked_mean(unclipped.max_pair(clipped));
    let loss = pg_loss.clone() + vf_loss.clone() * config.vf_coef;
    (loss, pg_loss.detach(), vf_loss.detach(), clip_fraction)
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

    /// Against TRL's formulas (scripts/reference/dpo_reference.py → tests/fixtures/dpo.json).
    #[test]
    fn dpo_losses_and_rewards_match_trl() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!("../../tests/fixtures/dpo.json")).unwrap();
        let values = |key: &str| -> Vec<f64> { fixture[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect() };
        let tensor = |v: &[f64]| {
            Tensor::<B, 1>::from_data(TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), [v.len()]), &Default::default())
        };
        let (counts_c, counts_r) = (values("count_chosen"), values("count_rejected"));
        for case in fixture["cases"].as_array().unwrap() {
            let config = DpoSection {
                beta: case["beta"].as_f64().unwrap(),
                loss_type: if case["loss_type"] == "ipo" { DpoLoss::Ipo } else { DpoLoss::Sigmoid },
                label_smoothing: case["label_smoothing"].as_f64().unwrap(),
                ..Default::default()
            };
            let averaged = |key: &str, counts: &[f64]| -> Vec<f64> {
                values(key).iter().zip(counts).map(|(v, c)| if config.loss_type == DpoLoss::Ipo { v / c } else { *v }).collect()
            };
            let (losses, chosen, rejected) = dpo_loss(
                tensor(&averaged("policy_chosen", &counts_c)),
                tensor(&averaged("policy_rejected", &counts_r)),
                tensor(&averaged("ref_chosen", &counts_c)),
                tensor(&averaged("ref_rejected", &counts_r)),
                &config,
            );
            for (name, ours) in [("losses", losses), ("chosen_rewards", chosen), ("rejected_rewards", rejected)] {
                let ours: Vec<f32> = ours.into_data().into_vec().unwrap();
                for (a, b) in ours.iter().zip(case[name].as_array().unwrap()) {
                    let b = b.as_f64().unwrap();
                    assert!((*a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0) * 10.0, "{} {name}: {a} vs {b}", case["loss_type"]);
                }
            }
        }
    }

    #[test]
    fn reward_loss_matches_trl() {
        let fixture: serde_json::Value = serde_json::from_str(include_str!("../../tests/fixtures/dpo.json")).unwrap();
        let values =
            |key: &str| -> Vec<f32> { fixture["reward"][key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect() };
        let tensor = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v.clone(), [v.len()]), &Default::default());
        let ours: Vec<f32> = reward_loss(tensor(values("chosen")), tensor(values("rejected"))).into_data().into_vec().unwrap();
        for (a, b) in ours.iter().zip(values("losses")) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    /// A fixture's number, list or list of lists, flattened row-major.
    fn flat(v: &serde_json::Value) -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|x| x.as_array().cloned().unwrap_or_else(|| vec![x.clone()]))
            .map(|x| x.as_f64().unwrap())
            .collect()
    }

    /// Against TRL's formulas (scripts/reference/grpo_reference.py → tests/fixtures/grpo.json):
    /// advantages, and each loss type's value, mean KL and gradient with respect to the
    /// policy's log-probabilities.
    #[test]
    fn grpo_advantages_and_losses_match_trl() {
        type AB = burn::backend::Autodiff<B>;
        let fixture: serde_json::Value = serde_json::from_str(include_str!("../../tests/fixtures/grpo.json")).unwrap();
        let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{what}: {a} vs {b}");
        let group = fixture["group"].as_u64().unwrap() as usize;
        let rewards = flat(&fixture["rewards"]);
        for (scale, key) in [(true, "scaled"), (false, "unscaled")] {
            for (a, b) in group_advantages(&rewards, group, scale).iter().zip(flat(&fixture["advantages"][key])) {
                close(*a, b, key);
            }
        }
        let rows = rewards.len();
        let len = flat(&fixture["logps"]).len() / rows;
        let device = Default::default();
        let tensor = |v: Vec<f64>, shape: [usize; 2]| {
            Tensor::<AB, 2>::from_data(TensorData::new(v.into_iter().map(|x| x as f32).collect::<Vec<_>>(), shape), &device)
        };
        let advantages = group_advantages(&rewards, group, true);
        let advantages =
            Tensor::<AB, 1>::from_data(TensorData::new(advantages.iter().map(|&x| x as f32).collect::<Vec<_>>(), [rows]), &device);
        for case in fixture["cases"].as_array().unwrap() {
            let config = GrpoSection {
                beta: case["beta"].as_f64().unwrap(),
                loss_type: match case["loss_type"].as_str().unwrap() {
                    "grpo" => GrpoLoss::Grpo,
                    "dr_grpo" => GrpoLoss::DrGrpo,
                    _ => GrpoLoss::Dapo,
                },
                max_completion_length: fixture["max_completion_length"].as_u64().unwrap() as usize,
                ..Default::default()
            };
            let logps = tensor(flat(&fixture["logps"]), [rows, len]).require_grad();
            let (loss, kl) = grpo_loss(
                logps.clone(),
                tensor(flat(&fixture["ref_logps"]), [rows, len]),
                tensor(flat(&fixture["mask"]), [rows, len]),
                advantages.clone(),
                &config,
            );
            let what = format!("{} beta {}", config.loss_type, config.beta);
            close(kl.into_scalar() as f64, case["mean_kl"].as_f64().unwrap(), &format!("{what} mean kl"));
            let grads = loss.backward();
            close(loss.into_scalar() as f64, case["loss"].as_f64().unwrap(), &format!("{what} loss"));
            let grad: Vec<f32> = logps.grad(&grads).unwrap().into_data().into_vec().unwrap();
            for (a, b) in grad.iter().zip(flat(&case["grad"])) {
                close(*a as f64, b, &format!("{what} grad"));
            }
        }
    }

    /// Against TRL's formulas (scripts/reference/ppo_reference.py → tests/fixtures/ppo.json):
    /// advantages and returns, both losses, and their gradients with respect to the new
    /// log-probabilities and values.
    #[test]
    fn ppo_advantages_and_losses_match_trl() {
        type AB = burn::backend::Autodiff<B>;
        let fixture: serde_json::Value = serde_json::from_str(include_str!("../../tests/fixtures/ppo.json")).unwrap();
        let close = |a: f64, b: f64, what: &str| assert!((a - b).abs() <= 2e-6 * b.abs().max(1.0), "{what}: {a} vs {b}");
        let mask_values = flat(&fixture["mask"]);
        let mask: Vec<bool> = mask_values.iter().map(|&m| m > 0.5).collect();
        let rows = flat(&fixture["scores"]).len();
        let len = mask.len() / rows;
        let device = Default::default();
        let tensor =
            |v: &[f64]| Tensor::<AB, 2>::from_data(TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), [rows, len]), &device);
        for case in fixture["cases"].as_array().unwrap() {
            let num = |k: &str| case[k].as_f64().unwrap();
            let config = PpoSection {
                kl_coef: num("kl_coef"),
                gamma: num("gamma"),
                lam: num("lam"),
                cliprange: num("cliprange"),
                cliprange_value: num("cliprange_value"),
                vf_coef: num("vf_coef"),
                ..Default::default()
            };
            let (old, values) = (flat(&fixture["old_logps"]), flat(&fixture["values"]));
            let (advantages, returns) =
                ppo_advantages(&old, &flat(&fixture["ref_logps"]), &values, &flat(&fixture["scores"]), &mask, len, &config);
            for (name, ours) in [("advantages", &advantages), ("returns", &returns)] {
                for (i, (a, b)) in ours.iter().zip(flat(&case[name])).enumerate() {
                    if mask[i] {
                        close(*a, b, name);
                    }
                }
            }
            let targets = PpoTargets {
                old_logps: tensor(&old),
                old_values: tensor(&values),
                advantages: tensor(&advantages),
                returns: tensor(&returns),
                mask: tensor(&mask_values),
            };
            let logps = tensor(&flat(&fixture["new_logps"])).require_grad();
            let new_values = tensor(&flat(&fixture["new_values"])).require_grad();
            let (loss, pg, vf, _) = ppo_loss(logps.clone(), new_values.clone(), &targets, &config);
            close(pg.into_scalar() as f64, num("pg_loss"), "pg_loss");
            close(vf.into_scalar() as f64, num("vf_loss"), "vf_loss");
            let grads = loss.backward();
            close(loss.into_scalar() as f64, num("loss"), "loss");
            for (name, input) in [("grad_logps", &logps), ("grad_values", &new_values)] {
                let grad: Vec<f32> = input.grad(&grads).unwrap().into_data().into_vec().unwrap();
                for (a, b) in grad.iter().zip(flat(&case[name])) {
                    close(*a as f64, b, name);
                }
            }
        }
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
            let loss = lm_loss_sum(logits.clone(), targets.clone());
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
