//! Preference pairs. DPO: the frozen reference's log-probabilities, computed once from the
//! starting model before the first step (so a resumed run recomputes the same values from
//! `init_from`), and the loss and TRL's metrics for a batch of pairs. Reward models: the
//! Bradley-Terry loss on the score head's outputs.

use std::ops::Range;

use burn::module::{ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use furnace_configs::{DpoLoss, DpoSection};
use furnace_data::loader::IGNORE;
use furnace_data::{Batch, Loader};
use furnace_models::kernels::FusedOps;
use furnace_models::{CausalLm, LanguageModel, Unsupported};
use rayon::prelude::*;

use crate::metrics::Sums;
use crate::objective::{dpo_loss, reward_loss, sequence_log_probs};

/// A completion's summed log-probability and its number of tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowLogp {
    pub sum: f64,
    pub count: usize,
}

/// Chosen, then rejected.
pub type PairLogps = [RowLogp; 2];

/// Tokens the loss counts in each row of `batch`.
fn row_counts(batch: &Batch) -> Vec<usize> {
    batch.targets.chunks(batch.seq_len).map(|row| row.iter().filter(|&&t| t != IGNORE).count()).collect()
}

fn tensors<B: Backend>(batch: &Batch, device: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
    let shape = [batch.batch, batch.seq_len];
    (
        Tensor::from_data(TensorData::new(batch.inputs.clone(), shape), device),
        Tensor::from_data(TensorData::new(batch.targets.clone(), shape), device),
    )
}

/// The log-probabilities of a batch's pairs under `model`, in batch order.
pub fn batch_log_probs<B: FusedOps, M: CausalLm<B>>(model: &M, batch: &Batch, device: &B::Device) -> Vec<PairLogps> {
    let counts = row_counts(batch);
    let (inputs, targets) = tensors::<B>(batch, device);
    let sums: Vec<f32> = sequence_log_probs(model.forward(inputs), targets).into_data().convert::<f32>().into_vec().expect("f32");
    (0..batch.items.len())
        .map(|k| {
            [RowLogp { sum: sums[2 * k] as f64, count: counts[2 * k] }, RowLogp { sum: sums[2 * k + 1] as f64, count: counts[2 * k + 1] }]
        })
        .collect()
}

/// Every pair's log-probabilities under `model` (the reference), read from an unshuffled loader.
pub fn reference_log_probs<B: FusedOps, M: CausalLm<B>>(
    model: &M,
    loader: &mut Loader,
    pairs: usize,
    device: &B::Device,
) -> Vec<PairLogps> {
    let mut out = vec![[RowLogp { sum: 0.0, count: 0 }; 2]; pairs];
    let mut seen = 0;
    while seen < pairs {
        let batch = loader.next_batch();
        for (&item, logps) in batch.items.iter().zip(batch_log_probs(model, &batch, device)) {
            out[item] = logps;
        }
        seen += batch.items.len();
    }
    out
}

/// DPO's reference: log-probabilities of every train and val pair computed before the first
/// step (`dpo.precompute_ref_log_probs`), or the frozen starting model run on each batch.
pub enum DpoReference<B: Backend> {
    Precomputed { train: Vec<PairLogps>, val: Vec<PairLogps> },
    Model(LanguageModel<B>),
}

impl<B: FusedOps> DpoReference<B> {
    /// The reference log-probabilities of `batch`'s pairs, in batch order.
    pub fn of_batch(&self, batch: &Batch, validation: bool, device: &B::Device) -> Result<Vec<PairLogps>, Unsupported> {
        Ok(match self {
            Self::Precomputed { train, val } => {
                let all = if validation { val } else { train };
                batch.items.iter().map(|&item| all[item]).collect()
            }
            Self::Model(model) => batch_log_probs(&model.as_causal()?, batch, device),
        })
    }
}

/// A batch's DPO losses (one per pair, still on the device) and its metrics summed over pairs.
pub struct PairBatch<B: Backend> {
    pub losses: Tensor<B, 1>,
    pub stats: Sums,
}

/// TRL's preference metrics as means over pairs (`prefix` "" for training, "eval/" for
/// validation), from the sums `pair_batch` and `reward_batch` add; a reward model has rewards
/// but no log-probabilities.
pub fn pair_means(sums: &Sums, prefix: &str) -> Vec<(String, f64)> {
    let per_pair = |sum: f64| sum / sums.get(PAIRS).max(1.0);
    let mut named = vec![
        ("rewards/chosen", per_pair(sums.get(CHOSEN))),
        ("rewards/rejected", per_pair(sums.get(REJECTED))),
        ("rewards/margins", per_pair(sums.get(CHOSEN) - sums.get(REJECTED))),
        ("rewards/accuracies", per_pair(sums.get(ACCURACIES))),
    ];
    for logps in ["logps/chosen", "logps/rejected"] {
        if sums.has(logps) {
            named.push((logps, per_pair(sums.get(logps))));
        }
    }
    named.into_iter().map(|(name, mean)| (format!("{prefix}{name}"), mean)).collect()
}

/// The names of the sums a batch of pairs adds.
pub const PAIRS: &str = "pairs";
pub const LOSS: &str = "loss";
pub const CHOSEN: &str = "rewards/chosen";
pub const REJECTED: &str = "rewards/rejected";
pub const ACCURACIES: &str = "rewards/accuracies";

/// Sums over a batch's pairs of their loss, rewards and accuracy (chosen rewarded above rejected).
fn pair_sums(losses: &[f64], chosen: &[f64], rejected: &[f64]) -> Sums {
    let mut sums = Sums::default();
    sums.add(PAIRS, chosen.len() as f64);
    sums.add(LOSS, losses.iter().sum());
    sums.add(CHOSEN, chosen.iter().sum());
    sums.add(REJECTED, rejected.iter().sum());
    sums.add(ACCURACIES, chosen.iter().zip(rejected).filter(|(c, r)| c > r).count() as f64);
    sums
}

/// The pairs of `batch` in at most `shards` batches of consecutive pairs, as even as the count allows.
fn pair_shards(batch: &Batch, shards: usize) -> Vec<Batch> {
    let (pairs, row) = (batch.items.len(), batch.seq_len);
    let shards = shards.clamp(1, pairs.max(1));
    (0..shards)
        .map(|s| {
            let (first, end) = (s * pairs / shards, (s + 1) * pairs / shards);
            let rows = 2 * first * row..2 * end * row;
            Batch {
                inputs: batch.inputs[rows.clone()].to_vec(),
                targets: batch.targets[rows].to_vec(),
                batch: 2 * (end - first),
                seq_len: row,
                items: batch.items[first..end].to_vec(),
                positions: None,
                encoder: None,
            }
        })
        .collect()
}

/// The gradients of `pair_losses` summed over `batch`'s pairs and divided by `divisor`, with the
/// pairs split into `shards` that run at once on the CPU pool's threads (`runtime.batch_shards`).
/// Each shard works on its own copy of the model ([`fresh_leaves`]): the same parameter values
/// and ids in a separate autodiff graph, so the shards' backward passes do not share a graph's lock. Returns
/// the loss (detached), the gradients (of the loss times `scale`), summed in shard order so that
/// a run is deterministic, and the pairs' metrics.
pub fn pair_gradients<B, F>(
    model: &LanguageModel<B>,
    batch: &Batch,
    shards: usize,
    divisor: f64,
    scale: f64,
    pair_losses: F,
) -> Result<(Tensor<B::InnerBackend, 1>, GradientsParams, Sums), Unsupported>
where
    B: AutodiffBackend + FusedOps,
    F: Fn(&LanguageModel<B>, &Batch, Range<usize>) -> Result<PairBatch<B>, Unsupported> + Sync,
{
    let gradients = |model: &LanguageModel<B>, batch: &Batch, pairs: Range<usize>| {
        let PairBatch { losses, stats } = pair_losses(model, batch, pairs)?;
        let loss = losses.sum() / divisor;
        Ok((loss.clone().inner(), GradientsParams::from_grads((loss * scale).backward(), model), stats))
    };
    if shards <= 1 {
        return gradients(model, batch, 0..batch.items.len());
    }
    let parts = pair_shards(batch, shards);
    let starts: Vec<usize> = parts.iter().scan(0, |start, part| Some(std::mem::replace(start, *start + part.items.len()))).collect();
    let results: Vec<_> = parts
        .par_iter()
        .zip(starts)
        .map(|(part, start)| gradients(&fresh_leaves(model.clone()), part, start..start + part.items.len()))
        .collect::<Result<_, Unsupported>>()?;
    let mut accumulator = GradientsAccumulator::new();
    let (mut loss, mut all_stats) = (None, Sums::default());
    for (part_loss, grads, stats) in results {
        accumulator.accumulate(model, grads);
        all_stats.merge(&stats);
        loss = Some(match loss {
            Some(total) => total + part_loss,
            None => part_loss,
        });
    }
    Ok((loss.expect("at least one shard"), accumulator.grads(), all_stats))
}

/// A copy of `model` on fresh autodiff leaves: the same parameter values and ids, tracked in a
/// graph of its own. (`Module::fork` would also record a device move on each parameter of the
/// original, and Burn's graph bookkeeping then grows with every step's shards.)
fn fresh_leaves<B: AutodiffBackend, M: Module<B>>(model: M) -> M {
    struct FreshLeaves;
    impl<B: AutodiffBackend> ModuleMapper<B> for FreshLeaves {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let fresh = Tensor::from_inner(tensor.clone().inner());
            let fresh = if tensor.is_require_grad() { fresh.require_grad() } else { fresh };
            Param::from_mapped_value(id, fresh, mapper)
        }
    }
    model.map(&mut FreshLeaves)
}

/// DPO on one batch of pairs (rows chosen, rejected, chosen, ...), given the reference's
/// log-probabilities of the same pairs in batch order.
pub fn pair_batch<B: FusedOps, M: CausalLm<B>>(
    model: &M,
    batch: &Batch,
    reference: &[PairLogps],
    config: &DpoSection,
    device: &B::Device,
) -> PairBatch<B> {
    let pairs = batch.items.len();
    let counts = row_counts(batch);
    let (inputs, targets) = tensors::<B>(batch, device);
    let logps = sequence_log_probs(model.forward(inputs), targets).reshape([pairs, 2]);
    let column = |t: &Tensor<B, 2>, i: usize| t.clone().narrow(1, i, 1).reshape([pairs]);
    let (mut policy_chosen, mut policy_rejected) = (column(&logps, 0), column(&logps, 1));
    // IPO compares length-averaged log-probabilities, as TRL does.
    let ipo = config.loss_type == DpoLoss::Ipo;
    let scale = |row: usize| if ipo { 1.0 / counts[row].max(1) as f64 } else { 1.0 };
    let host = |values: Vec<f64>| {
        Tensor::<B, 1>::from_data(TensorData::new(values.into_iter().map(|v| v as f32).collect::<Vec<f32>>(), [pairs]), device)
    };
    if ipo {
        policy_chosen = policy_chosen * host((0..pairs).map(|k| scale(2 * k)).collect());
        policy_rejected = policy_rejected * host((0..pairs).map(|k| scale(2 * k + 1)).collect());
    }
    let ref_of = |k: usize, side: usize| {
        let r = reference[k][side];
        r.sum * if ipo { 1.0 / r.count.max(1) as f64 } else { 1.0 }
    };
    let ref_chosen = host((0..pairs).map(|k| ref_of(k, 0)).collect());
    let ref_rejected = host((0..pairs).map(|k| ref_of(k, 1)).collect());
    let read = |t: Tensor<B, 1>| -> Vec<f64> { t.into_data().convert::<f64>().into_vec().expect("f64") };
    let (chosen_logps, rejected_logps) = (read(policy_chosen.clone().detach()), read(policy_rejected.clone().detach()));
    let (losses, chosen_rewards, rejected_rewards) = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, config);
    let (chosen_rewards, rejected_rewards) = (read(chosen_rewards), read(rejected_rewards));
    let mut stats = pair_sums(&read(losses.clone().detach()), &chosen_rewards, &rejected_rewards);
    stats.add("logps/chosen", chosen_logps.iter().sum());
    stats.add("logps/rejected", rejected_logps.iter().sum());
    PairBatch { losses, stats }
}

/// A reward model on one batch of pairs: Bradley-Terry losses and the scores as rewards, each
/// reply scored at its last counted position (the end of the reply). Chosen and rejected share
/// their prompt, which is computed once per pair (see [`SharedPrefixRows`]).
pub fn reward_batch<B: FusedOps>(model: &LanguageModel<B>, batch: &Batch, device: &B::Device) -> Result<PairBatch<B>, Unsupported> {
    let pairs = batch.items.len();
    let rows = SharedPrefixRows::of_pairs(batch);
    let tokens = Tensor::from_data(TensorData::new(rows.tokens, [pairs, rows.len]), device);
    let scores = model.as_decoder()?.branched_scores(tokens, &rows.positions, &rows.branches, &rows.reads).reshape([pairs, 2]);
    let (chosen, rejected) = (scores.clone().narrow(1, 0, 1).reshape([pairs]), scores.narrow(1, 1, 1).reshape([pairs]));
    let read = |t: Tensor<B, 1>| -> Vec<f64> { t.into_data().convert::<f64>().into_vec().expect("f64") };
    let (c, r) = (read(chosen.clone().detach()), read(rejected.clone().detach()));
    let losses = reward_loss(chosen, rejected);
    let stats = pair_sums(&read(losses.clone().detach()), &c, &r);
    Ok(PairBatch { losses, stats })
}

/// Preference pairs laid out with the tokens both replies share computed once (prefix sharing,
/// as Wang et al., 2024, "Accelerating Direct Preference Optimization with Prefix Sharing"): one
/// row per pair holds the shared prefix, then the rest of the chosen row, then the rest of the
/// rejected row, which sees the prefix but not the chosen reply and continues the prefix's
/// positions. Arithmetic pairs share all but a digit or two of ~50 tokens, so a step computes
/// about half the tokens that two rows per pair would.
#[derive(Debug, PartialEq)]
struct SharedPrefixRows {
    /// `[pairs, len]`, padded after each row's end.
    tokens: Vec<i64>,
    len: usize,
    /// Each token's position in its own sequence (the prompt's, then the reply's).
    positions: Vec<usize>,
    /// 0 for the shared prefix, 1 for the chosen reply's rest, 2 for the rejected one's, 3 for padding.
    branches: Vec<u32>,
    /// Flat indices into `[pairs·len]` of each pair's chosen and rejected last token, in that order.
    reads: Vec<usize>,
}

impl SharedPrefixRows {
    /// The pairs of `batch` (rows chosen, rejected, chosen, ...), each row read up to its last
    /// counted position.
    fn of_pairs(batch: &Batch) -> Self {
        let rows: Vec<(&[i64], &[i64])> = batch.inputs.chunks(batch.seq_len).zip(batch.targets.chunks(batch.seq_len)).collect();
        let ends: Vec<usize> = rows.iter().map(|(_, targets)| targets.iter().rposition(|&t| t != IGNORE).unwrap_or(0) + 1).collect();
        let pairs: Vec<(&[i64], &[i64], usize)> = (0..rows.len() / 2)
            .map(|k| {
                let (chosen, rejected) = (&rows[2 * k].0[..ends[2 * k]], &rows[2 * k + 1].0[..ends[2 * k + 1]]);
                // Each reply keeps at least its last token, where its score is read.
                let common = chosen.iter().zip(rejected).take_while(|(c, r)| c == r).count();
                (chosen, rejected, common.min(chosen.len() - 1).min(rejected.len() - 1))
            })
            .collect();
        let len = pairs.iter().map(|(chosen, rejected, shared)| chosen.len() + rejected.len() - shared).max().unwrap_or(1);
        let mut layout = Self { tokens: Vec::new(), len, positions: Vec::new(), branches: Vec::new(), reads: Vec::new() };
        for (k, &(chosen, rejected, shared)) in pairs.iter().enumerate() {
            let rest = &rejected[shared..];
            layout.tokens.extend(chosen.iter().chain(rest));
            layout.positions.extend((0..chosen.len()).chain(shared..rejected.len()));
            layout.branches.extend((0..chosen.len()).map(|t| u32::from(t >= shared)));
            layout.branches.extend(std::iter::repeat_n(2, rest.len()));
            layout.reads.extend([k * len + chosen.len() - 1, k * len + chosen.len() + rest.len() - 1]);
            let padding = len - chosen.len() - rest.len();
            layout.tokens.extend(std::iter::repeat_n(0, padding));
            layout.positions.extend(std::iter::repeat_n(0, padding));
            layout.branches.extend(std::iter::repeat_n(3, padding));
        }
        layout
    }
}

/// The first `pairs` validation pairs (the same ones every time) in batches of at most
/// `batch_size`: each pair counted once, however the batch size divides them.
fn validation_batches(loader: &mut Loader, pairs: usize, batch_size: usize) -> impl Iterator<Item = Batch> + '_ {
    loader.set_cursor(Default::default());
    let (pairs, batch_size) = (pairs.max(1), batch_size.max(1));
    (0..pairs.div_ceil(batch_size)).map(move |i| loader.next_batch_of(batch_size.min(pairs - i * batch_size)))
}

/// Reward-model loss and metrics over the first `pairs` validation pairs.
pub fn evaluate_rewards<B: FusedOps>(
    model: &LanguageModel<B>,
    loader: &mut Loader,
    pairs: usize,
    batch_size: usize,
    device: &B::Device,
) -> Result<Sums, Unsupported> {
    let mut stats = Sums::default();
    for batch in validation_batches(loader, pairs, batch_size) {
        stats.merge(&reward_batch(model, &batch, device)?.stats);
    }
    Ok(stats)
}

/// DPO loss and metrics over the first `pairs` validation pairs.
#[allow(clippy::too_many_arguments)]
pub fn evaluate<B: FusedOps, M: CausalLm<B>>(
    model: &M,
    loader: &mut Loader,
    reference: &DpoReference<B>,
    pairs: usize,
    batch_size: usize,
    config: &DpoSection,
    device: &B::Device,
) -> Result<Sums, Unsupported> {
    let mut stats = Sums::default();
    for batch in validation_batches(loader, pairs, batch_size) {
        let reference = reference.of_batch(&batch, true, device)?;
        stats.merge(&pair_batch(model, &batch, &reference, config, device).stats);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use furnace_data::chat::LabeledTokens;

    use super::*;

    #[test]
    fn validation_counts_every_pair_once() {
        let example = |tokens: Vec<u32>| LabeledTokens { trained: vec![true; tokens.len()], tokens };
        let pairs: Vec<_> = (0..5).map(|i| (example(vec![1, i]), example(vec![1, i + 10]))).collect();
        let mut loader = Loader::pairs(pairs, 0, 8, 2, 1, 0, 1, false).unwrap();
        loader.next_batch();
        let batches: Vec<Batch> = validation_batches(&mut loader, 5, 2).collect();
        let items: Vec<Vec<usize>> = batches.iter().map(|b| b.items.clone()).collect();
        assert_eq!(items, [vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(batches[2].batch, 2, "the last batch holds one pair: two rows");
    }

    /// Pairs whose replies are trained from token 2 on: two rows each, as the loader builds them.
    fn pair_batch_of(pairs: &[(Vec<u32>, Vec<u32>)]) -> Batch {
        let example = |tokens: &Vec<u32>| LabeledTokens { trained: (0..tokens.len()).map(|i| i >= 2).collect(), tokens: tokens.clone() };
        let pairs: Vec<_> = pairs.iter().map(|(c, r)| (example(c), example(r))).collect();
        let n = pairs.len();
        Loader::pairs(pairs, 0, 16, n, 1, 0, 1, false).unwrap().next_batch()
    }

    /// A two-layer transformer with a score head over a vocabulary of 16.
    fn tiny_reward_model<B: FusedOps>(seed: u64) -> LanguageModel<B> {
        let config = furnace_models::DecoderConfig::new(16, 32, 2, 4, 48, 16).with_score_head(true);
        LanguageModel::Decoder(furnace_models::Init::init(&config, seed, &Default::default()))
    }

    #[test]
    fn shared_prefix_rows_hold_each_prompt_once() {
        // Inputs are a row's tokens but the last: [1,2,3,4,8] and [1,2,3,5] share 3 tokens; [1,2]
        // and [1,2,3,6] share 2, but the chosen reply keeps its last token (where it is scored).
        let batch = pair_batch_of(&[(vec![1, 2, 3, 4, 8, 9], vec![1, 2, 3, 5, 9]), (vec![1, 2, 7], vec![1, 2, 3, 6, 9])]);
        let rows = SharedPrefixRows::of_pairs(&batch);
        let expected = SharedPrefixRows {
            tokens: vec![1, 2, 3, 4, 8, 5, 1, 2, 2, 3, 6, 0],
            len: 6,
            positions: vec![0, 1, 2, 3, 4, 3, 0, 1, 1, 2, 3, 0],
            branches: vec![0, 0, 0, 1, 1, 2, 0, 1, 2, 2, 2, 3],
            reads: vec![4, 5, 7, 10],
        };
        assert_eq!(rows, expected);
    }

    #[test]
    fn sharded_pair_gradients_equal_one_pass() {
        type A = burn::backend::Autodiff<burn::backend::Flex>;
        let device = Default::default();
        let model = tiny_reward_model::<A>(5);
        let batch = pair_batch_of(&[
            (vec![1, 2, 3, 4, 8, 9], vec![1, 2, 3, 5, 9]),
            (vec![1, 2, 7], vec![1, 2, 3, 6, 9]),
            (vec![4, 4, 4, 10, 11, 12, 13], vec![4, 4, 4, 10, 11, 12, 14]),
            (vec![5, 6, 7, 8], vec![5, 6, 7, 9]),
            (vec![9, 8, 7, 6, 5], vec![9, 8, 7, 6, 4]),
        ]);
        let LanguageModel::Decoder(decoder) = &model else { unreachable!() };
        let ids = [decoder.embed_tokens.id, decoder.score.as_ref().unwrap().weight.as_ref().unwrap().id];
        let mut seen = Vec::new();
        let run = |shards: usize, seen: &mut Vec<(usize, Range<usize>)>| {
            let seen = std::sync::Mutex::new(seen);
            let (loss, grads, stats) = pair_gradients(&model, &batch, shards, 5.0, 2.0, |model, part, pairs| {
                seen.lock().unwrap().push((part.items.len(), pairs));
                reward_batch(model, part, &device)
            })
            .unwrap();
            let grads: Vec<Vec<f32>> =
                ids.iter().map(|&id| grads.get::<burn::backend::Flex, 2>(id).unwrap().into_data().into_vec().unwrap()).collect();
            (loss.into_scalar(), grads, stats.get(ACCURACIES))
        };
        let (one_loss, one_grads, one_accuracies) = run(1, &mut seen);
        let (loss, grads, accuracies) = run(3, &mut seen);
        seen.sort_by_key(|(_, pairs)| (pairs.end - pairs.start, pairs.start));
        assert_eq!(seen, [(1, 0..1), (2, 1..3), (2, 3..5), (5, 0..5)], "three shards of the five pairs, then one of all");
        assert!((loss - one_loss).abs() <= 1e-6, "sharded loss {loss} vs one pass {one_loss}");
        assert_eq!(accuracies, one_accuracies);
        for (sharded, one) in grads.iter().zip(&one_grads) {
            for (got, want) in sharded.iter().zip(one) {
                assert!((got - want).abs() <= 1e-6 + 1e-5 * want.abs(), "sharded gradient {got} vs one pass {want}");
            }
        }
        assert!(one_grads.iter().all(|g| g.iter().any(|v| *v != 0.0)), "the gradients checked are not all zero");
    }

    #[test]
    fn reward_scores_with_shared_prefixes_equal_two_rows_per_pair() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let model = tiny_reward_model::<B>(3);
        let batch = pair_batch_of(&[
            (vec![1, 2, 3, 4, 8, 9], vec![1, 2, 3, 5, 9]),
            (vec![1, 2, 7], vec![1, 2, 3, 6, 9]),
            (vec![4, 4, 4, 10, 11, 12, 13], vec![4, 4, 4, 10, 11, 12, 14]),
        ]);
        let (inputs, _) = tensors::<B>(&batch, &device);
        let ends: Vec<usize> = batch.targets.chunks(batch.seq_len).map(|row| row.iter().rposition(|&t| t != IGNORE).unwrap()).collect();
        let alone: Vec<f32> = model.as_decoder().unwrap().scores(inputs, &ends).into_data().into_vec().unwrap();
        let (chosen, rejected) =
            (alone.iter().step_by(2).cloned().collect::<Vec<_>>(), alone.iter().skip(1).step_by(2).cloned().collect::<Vec<_>>());
        let host = |v: Vec<f32>| Tensor::<B, 1>::from_data(TensorData::new(v, [3]), &device);
        let want: Vec<f32> = reward_loss(host(chosen), host(rejected)).into_data().into_vec().unwrap();
        let got: Vec<f32> = reward_batch(&model, &batch, &device).unwrap().losses.into_data().into_vec().unwrap();
        for (i, (got, want)) in got.iter().zip(&want).enumerate() {
            assert!((got - want).abs() <= 1e-6, "pair {i}: shared-prefix loss {got} vs two rows {want}");
        }
    }
}
