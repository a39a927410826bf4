//! Knowledge distillation (Hinton et al., 2015; torchtune's knowledge-distillation recipe):
//! pretrain or SFT a student on the usual data while pulling its next-token distribution towards
//! a frozen teacher's (`training.teacher`). The loss over the counted targets is
//! `(1 − kd_ratio)·CE(student, labels) + kd_ratio·T²·KL(softmax(teacher/T) ‖ softmax(student/T))`.

use std::path::Path;

use anyhow::{bail, Result};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use furnace_configs::Arch;
use furnace_data::loader::IGNORE;
use furnace_data::{Batch, TextTokenizer};
use furnace_models::kernels::FusedOps;
use furnace_models::{Init, LanguageModel};

use super::language::{log_validation, report_next_token};
use super::{Accumulated, Gradients, Objective, Setup};
use crate::backend::TrainBackend;
use crate::context::Context;
use crate::metrics::Sums;
use crate::model::load_companion;
use crate::objective::lm_loss_sum;

pub struct Distillation<B: TrainBackend> {
    teacher: LanguageModel<B::InnerBackend>,
    kd_ratio: f64,
    temperature: f64,
    /// KL to the teacher and the count of targets it was summed over, since the last log line.
    window: Sums,
}

impl<B: TrainBackend> Distillation<B> {
    pub fn new(setup: &Setup<'_, B>) -> Result<Self> {
        let t = &setup.recipe.training;
        let (teacher, theirs) = load_teacher(Path::new(&t.teacher), setup.tokenizer, setup.recipe.data.packing, setup.device)?;
        let ours = setup.recipe.model.model(Some(setup.tokenizer.vocab_size())).vocab_size();
        if ours != theirs {
            bail!(
                "training.teacher = {}: its vocabulary has {theirs} rows and the student's {ours}; set model.vocab_size = {theirs}",
                t.teacher
            );
        }
        Ok(Self { teacher, kd_ratio: t.kd_ratio, temperature: t.kd_temperature, window: Sums::default() })
    }
}

/// The teacher: any Furnace run or checkpoint, Hugging Face folder or GGUF file that
/// `model.init_from` takes, on the student's tokenizer; and its vocabulary size.
/// It reads the student's rows, so it is a decoder, and a transformer when rows are packed.
fn load_teacher<B: Backend>(path: &Path, tokenizer: &TextTokenizer, packed: bool, device: &B::Device) -> Result<(LanguageModel<B>, usize)> {
    let base = load_companion("training.teacher", path, tokenizer, "distil on the teacher's tokenizer (data.tokenizer)")?;
    let key = format!("training.teacher = {}", path.display());
    let arch = base.model.arch();
    if !matches!(arch, Arch::Llama | Arch::Gpt2 | Arch::Mixtral | Arch::Mamba) {
        bail!("{key}: a teacher predicts the next token (llama, gpt2, mixtral or mamba); this one is {arch}");
    }
    if packed && arch == Arch::Mamba {
        bail!("{key}: packed rows (data.packing) keep their conversations apart by attention masks, which a mamba teacher has not; set data.packing = false");
    }
    let model = base.model.init::<B>(0, device);
    let model = furnace_core::params::load_named(model, &base.weights).map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
    Ok((model, base.model.vocab_size()))
}

/// `T²·Σ KL(softmax(teacher/T) ‖ softmax(student/T))` over the positions with a target (the
/// ones the cross-entropy counts): the caller divides by the step's count, as for `lm_loss_sum`.
pub fn distillation_loss_sum<B: FusedOps>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    temperature: f64,
) -> Tensor<B, 1> {
    let student = log_softmax(student / temperature, 2);
    let teacher = log_softmax(teacher / temperature, 2);
    let kl = (teacher.clone().exp() * (teacher - student)).sum_dim(2).squeeze_dim::<2>(2);
    let counted = targets.not_equal_elem(IGNORE).float();
    (kl * counted).sum() * (temperature * temperature)
}

impl<B: TrainBackend> Objective<B> for Distillation<B> {
    fn gradients(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<Gradients<B>> {
        let accum = cx.recipe.training.grad_accum_steps;
        let batches: Vec<Batch> = (0..accum).map(|_| cx.loader.next_batch()).collect();
        let counted = batches.iter().map(Batch::counted_targets).sum::<usize>() as f64;
        let counted = cx.parallel.mean(counted).max(1.0);
        let scale = cx.loss_scale();
        let mut accumulated = Accumulated::default();
        for batch in &batches {
            let shape = [batch.batch, batch.seq_len];
            let ids = |values: &[i64]| TensorData::new(values.to_vec(), shape);
            let inputs = Tensor::<B, 2, Int>::from_data(ids(&batch.inputs), &cx.device);
            let targets = Tensor::<B, 2, Int>::from_data(ids(&batch.targets), &cx.device);
            let teacher = self.teacher.forward_routed(inputs.clone().inner(), batch.positions.as_deref())?.0;
            let (student, _) = model.forward_routed(inputs.clone(), batch.positions.as_deref())?;
            let kl = distillation_loss_sum(student.clone(), Tensor::from_inner(teacher), targets.clone(), self.temperature);
            self.window.add("kl", kl.clone().into_scalar().elem::<f64>());
            self.window.add("targets", batch.counted_targets() as f64);
            let loss = (lm_loss_sum(student, targets) * (1.0 - self.kd_ratio) + kl * self.kd_ratio) / counted;
            let detached = loss.clone().inner();
            accumulated.add(model, GradientsParams::from_grads((loss * scale).backward(), model), detached, inputs);
        }
        Ok(accumulated.finish(false, cx.recipe.tokens_per_step()))
    }

    fn window_metrics(&mut self, cx: &Context<B>) -> Vec<(String, f64)> {
        let window = std::mem::take(&mut self.window).summed_over_ranks(|values| cx.parallel.sum(values));
        vec![("distill/kl".to_string(), window.per("kl", "targets"))]
    }

    fn progress_metrics(&self) -> &'static [&'static str] {
        &["distill/kl"]
    }

    fn evaluate(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>, step: usize) -> Result<()> {
        log_validation(cx, model, None, step)
    }

    fn report(&mut self, cx: &mut Context<B>, model: &LanguageModel<B>) -> Result<()> {
        report_next_token(cx, model)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;

    use super::*;

    /// The KL written out in f64 from its definition, `Σ_v p_t(v)·(log p_t(v) − log p_s(v))`
    /// with `p = softmax(z/T)`, times T², over the positions with a target.
    fn kl_by_definition(student: &[f64], teacher: &[f64], targets: &[i64], vocab: usize, temperature: f64) -> f64 {
        let log_softmax = |z: &[f64]| {
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = z.iter().map(|v| ((v - max) / temperature).exp()).sum::<f64>().ln();
            z.iter().map(|v| (v - max) / temperature - log_sum).collect::<Vec<f64>>()
        };
        let mut total = 0.0;
        for (position, &target) in targets.iter().enumerate() {
            if target == IGNORE {
                continue;
            }
            let row = position * vocab..(position + 1) * vocab;
            let (s, t) = (log_softmax(&student[row.clone()]), log_softmax(&teacher[row]));
            total += t.iter().zip(&s).map(|(t, s)| t.exp() * (t - s)).sum::<f64>();
        }
        total * temperature * temperature
    }

    #[test]
    fn the_loss_is_the_tempered_kl_over_counted_positions() {
        let (batch, seq, vocab) = (2, 3, 5);
        let mut rng = furnace_core::rng::SeededRng::new(7);
        let mut draw = || (0..batch * seq * vocab).map(|_| 3.0 * rng.normal()).collect::<Vec<f64>>();
        let (student, teacher) = (draw(), draw());
        let targets = vec![1, IGNORE, 4, 0, 2, IGNORE];
        let device = Default::default();
        let tensor = |v: &[f64]| {
            Tensor::<Flex, 3>::from_data(TensorData::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), [batch, seq, vocab]), &device)
        };
        let ids = Tensor::<Flex, 2, Int>::from_data(TensorData::new(targets.clone(), [batch, seq]), &device);
        for temperature in [1.0, 2.0] {
            let ours = distillation_loss_sum(tensor(&student), tensor(&teacher), ids.clone(), temperature).into_scalar().elem::<f64>();
            let expected = kl_by_definition(&student, &teacher, &targets, vocab, temperature);
            assert!((ours - expected).abs() <= 1e-5 * expected.abs(), "T = {temperature}: {ours} vs {expected}");
        }
        let same = distillation_loss_sum(tensor(&student), tensor(&student), ids, 1.0).into_scalar().elem::<f64>();
        assert!(same.abs() < 1e-5, "a distribution is {same} from itself");
    }
}
