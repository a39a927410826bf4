//! What GRPO and PPO share: prompts from chat files or the built-in arithmetic task, replies sampled from the
//! current model (batched through its decoding state) and scored by the exact-match verifier or
//! a reward model, laid out as training rows, and the metrics TRL logs. The losses are in
//! `objective` (`grpo_loss`, `ppo_advantages` / `ppo_loss`). Prompts and sampling seeds are
//! functions of the step, so a resumed run draws exactly what the uninterrupted one would.

use anyhow::Result;
use burn::prelude::*;
use furnace_configs::{DataSource, Recipe};
use furnace_core::rng::{derive_seed, Stream};
use furnace_data::chat::{read_conversations, read_train_and_val, ChatTemplate};
use furnace_data::corpus::arithmetic_config;
use furnace_data::generators::arithmetic_conversations;
use furnace_data::loader::IGNORE;
use furnace_data::TextTokenizer;
use furnace_distributed::World;
use furnace_models::generate::{generate_group, GenerateConfig};
use furnace_models::kernels::FusedOps;
use furnace_models::sampling::SamplingConfig;
use furnace_models::{LanguageModel, Unsupported};

use crate::metrics::Sums;
use crate::objective::{group_advantages, token_log_probs};

/// A question as the model is asked it, and the reply the verifier accepts (None: only a
/// reward model can score replies to it).
pub struct Prompt {
    pub ids: Vec<u32>,
    pub expected: Option<String>,
}

/// The training prompts: each conversation up to its last assistant turn, rendered with the
/// assistant's turn opened; that turn is the answer the verifier accepts. Conversations come
/// from `data.files` (chat JSONL, TRL's conversational prompt datasets with their answers) or the
/// built-in arithmetic task (never its held-out problems).
pub fn prompts(recipe: &Recipe, template: &ChatTemplate, tokenizer: &TextTokenizer) -> Result<Vec<Prompt>> {
    let d = &recipe.data;
    let conversations = match d.source {
        DataSource::Chat => read_train_and_val(d, read_conversations).map_err(anyhow::Error::msg)?.0,
        _ => arithmetic_conversations(&arithmetic_config(d), d.num_examples, recipe.run.seed, false),
    };
    conversations
        .into_iter()
        .map(|c| {
            let (turns, expected) = match c.messages.split_last() {
                Some((last, turns)) if last.role == "assistant" => (turns, Some(last.content.clone())),
                _ => (&c.messages[..], None),
            };
            let question = template.render(turns, &c.tools, true).map_err(anyhow::Error::msg)?;
            Ok(Prompt { ids: tokenizer.encode(&question), expected })
        })
        .collect()
}

/// The replies of one micro-batch as training rows: `prompt ++ reply` shifted by one, targets
/// on the reply's tokens only (the stop token included), padded to the longest row.
pub struct Rollout {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    pub rows: usize,
    pub len: usize,
    /// The rewards trained on (the verifier's or the reward model's), `num_generations`
    /// consecutive rows per prompt.
    pub rewards: Vec<f64>,
    /// Which replies the verifier accepts (logged whatever the reward is).
    pub correct: Vec<bool>,
    pub reply_tokens: usize,
}

/// How replies are drawn.
pub struct Sampling {
    pub replies_per_prompt: usize,
    pub max_completion_length: usize,
    pub temperature: f64,
}

/// Sample and score `replies_per_prompt` replies to each prompt with `policy` (its inner,
/// autodiff-free copy): by `reward_model` when given, read at each reply's last token as it was
/// trained, else by the verifier. `seed` fixes every draw.
pub fn rollout<B: FusedOps>(
    policy: &LanguageModel<B>,
    reward_model: Option<&LanguageModel<B>>,
    prompts: &[&Prompt],
    config: &Sampling,
    tokenizer: &TextTokenizer,
    seed: u64,
    device: &B::Device,
) -> Result<Rollout, Unsupported> {
    let eos = tokenizer.eos();
    let mut rows: Vec<(Vec<u32>, usize)> = Vec::new();
    let mut correct = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        let sampling =
            SamplingConfig { temperature: config.temperature, seed: derive_seed(seed, Stream::Reply, i as u64 + 1), ..Default::default() };
        let generate = GenerateConfig { max_new_tokens: config.max_completion_length, stop_tokens: vec![eos], sampling };
        for reply in generate_group(&policy.as_causal()?, &prompt.ids, config.replies_per_prompt, &generate, device) {
            let text = reply.strip_suffix(&[eos]).unwrap_or(&reply);
            correct.push(prompt.expected.as_deref() == Some(tokenizer.decode(text).trim()));
            rows.push(([prompt.ids.as_slice(), reply.as_slice()].concat(), prompt.ids.len()));
        }
    }
    let len = rows.iter().map(|(row, _)| row.len() - 1).max().unwrap_or(1);
    let (mut inputs, mut targets) = (Vec::with_capacity(rows.len() * len), Vec::with_capacity(rows.len() * len));
    let mut reply_tokens = 0;
    for (row, prompt_len) in &rows {
        for p in 0..len {
            inputs.push(row.get(p).map_or(eos as i64, |&t| t as i64));
            let target = row.get(p + 1).filter(|_| p + 1 >= *prompt_len);
            reply_tokens += target.is_some() as usize;
            targets.push(target.map_or(IGNORE, |&t| t as i64));
        }
    }
    let mut rollout = Rollout { inputs, targets, rows: rows.len(), len, rewards: Vec::new(), correct, reply_tokens };
    rollout.rewards = match reward_model {
        Some(model) => {
            let positions: Vec<usize> =
                rollout.targets.chunks(len).map(|row| row.iter().rposition(|&t| t != IGNORE).unwrap_or(0)).collect();
            let scores = model.as_decoder()?.scores(rollout.tensors::<B>(device).0, &positions);
            scores.into_data().convert::<f64>().into_vec().expect("f64 scores")
        }
        None => rollout.correct.iter().map(|&ok| ok as u8 as f64).collect(),
    };
    Ok(rollout)
}

impl Rollout {
    pub fn tensors<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>) {
        let shape = [self.rows, self.len];
        (
            Tensor::from_data(TensorData::new(self.inputs.clone(), shape), device),
            Tensor::from_data(TensorData::new(self.targets.clone(), shape), device),
        )
    }

    /// 1 on reply tokens, 0 elsewhere.
    pub fn mask<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let mask: Vec<f32> = self.targets.iter().map(|&t| (t != IGNORE) as u8 as f32).collect();
        Tensor::from_data(TensorData::new(mask, [self.rows, self.len]), device)
    }

    /// GRPO's advantages, one per row.
    pub fn group_advantages<B: Backend>(&self, group: usize, scale: bool, device: &B::Device) -> Tensor<B, 1> {
        let advantages: Vec<f32> = group_advantages(&self.rewards, group, scale).into_iter().map(|a| a as f32).collect();
        Tensor::from_data(TensorData::new(advantages, [self.rows]), device)
    }

    /// The reference model's per-token log-probabilities of the replies, `[rows, len]` on the host.
    pub fn reference_log_probs<B: FusedOps>(&self, reference: &LanguageModel<B>, device: &B::Device) -> Result<Vec<f32>, Unsupported> {
        let (inputs, targets) = self.tensors::<B>(device);
        Ok(token_log_probs(reference.forward(inputs)?, targets).into_data().convert::<f32>().into_vec().expect("f32 log-probabilities"))
    }
}

/// A rollout's metrics, added to `sums` under the names `rollout_means` reads: the rewards,
/// the verifier's verdicts, the spread of rewards within each group of `group` replies, the
/// reply lengths and the batch's KL to the reference.
pub fn add_rollout(sums: &mut Sums, rollout: &Rollout, group: usize, kl: f64) {
    sums.add("rewards", rollout.rewards.iter().sum::<f64>());
    sums.add("correct", rollout.correct.iter().filter(|&&ok| ok).count() as f64);
    for g in rollout.rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        sums.add("reward_stds", (g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (g.len() as f64 - 1.0).max(1.0)).sqrt());
        sums.add("groups", 1.0);
    }
    sums.add("replies", rollout.rows as f64);
    sums.add("reply_tokens", rollout.reply_tokens as f64);
    sums.add("kl", kl);
    sums.add("batches", 1.0);
}

/// One PPO optimiser step's losses and clipped fraction.
pub fn add_ppo_update(sums: &mut Sums, policy_loss: f64, value_loss: f64, clip_fraction: f64) {
    sums.add("ppo_updates", 1.0);
    sums.add("policy_loss", policy_loss);
    sums.add("value_loss", value_loss);
    sums.add("clip_fraction", clip_fraction);
}

/// The rollout metrics as TRL logs them; PPO adds its losses, GRPO the spread of its groups' rewards.
pub fn rollout_means(sums: &Sums) -> Vec<(String, f64)> {
    let mut out = vec![
        ("reward", sums.per("rewards", "replies")),
        ("rewards/exact_match/mean", sums.per("correct", "replies")),
        ("kl", sums.per("kl", "batches")),
        ("completions/mean_length", sums.per("reply_tokens", "replies")),
    ];
    if sums.get("ppo_updates") > 0.0 {
        out.extend([
            ("loss/policy_avg", sums.per("policy_loss", "ppo_updates")),
            ("loss/value_avg", sums.per("value_loss", "ppo_updates")),
            ("policy/clipfrac_avg", sums.per("clip_fraction", "ppo_updates")),
        ]);
    } else {
        out.push(("reward_std", sums.per("reward_stds", "groups")));
    }
    out.into_iter().map(|(name, mean)| (name.to_string(), mean)).collect()
}

/// The prompts micro-batch `micro` of `step` trains on on this rank: consecutive prompts,
/// wrapping around; the ranks take consecutive slices of each micro-batch's global batch.
pub fn step_prompts(prompts: &[Prompt], step: usize, micro: usize, micro_batches: usize, per_batch: usize, world: World) -> Vec<&Prompt> {
    let first = (((step - 1) * micro_batches + micro) * world.size + world.rank) * per_batch;
    (first..first + per_batch).map(|i| &prompts[i % prompts.len()]).collect()
}
