use crate::schema::Section;
use crate::*;

fn section_text<S: Section>(out: &mut String) {
    let defaults = toml::Table::try_from(S::default()).expect("defaults serialize");
    out.push_str(&format!("[{}]\n", S::NAME));
    for line in S::DOC.lines() {
        out.push_str(&format!("# {}\n", line.trim()));
    }
    for opt in S::options() {
        for line in opt.doc.lines() {
            out.push_str(&format!("  # {}\n", line.trim()));
        }
        let default = defaults.get(opt.key).map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into());
        out.push_str(&format!("  {} = {}    # type: {}\n", opt.key, default, opt.ty.replace(' ', "")));
    }
    out.push('\n');
}

/// Every section and option with its default, type and meaning, as commented TOML.
pub fn explain() -> String {
    let mut out = String::from("# Furnace recipe: every option, its default and meaning.\n\n");
    section_text::<RunSection>(&mut out);
    section_text::<ModelSection>(&mut out);
    section_text::<DataSection>(&mut out);
    section_text::<TrainingSection>(&mut out);
    section_text::<OptimizerSection>(&mut out);
    section_text::<LrSchedulerSection>(&mut out);
    section_text::<RuntimeSection>(&mut out);
    section_text::<DistributedSection>(&mut out);
    section_text::<ActivationCheckpointSection>(&mut out);
    section_text::<LoggingSection>(&mut out);
    section_text::<EvalSection>(&mut out);
    section_text::<LoraSection>(&mut out);
    section_text::<DpoSection>(&mut out);
    section_text::<GrpoSection>(&mut out);
    section_text::<PpoSection>(&mut out);
    out.push_str("# Choices:\n");
    for (name, choices) in [
        ("model.arch", Arch::CHOICES),
        ("model.flavor", Flavor::CHOICES),
        ("model.norm", NormKind::CHOICES),
        ("model.position", PositionKind::CHOICES),
        ("model.mlp", MlpKind::CHOICES),
        ("data.source", DataSource::CHOICES),
        ("data.text_documents", TextDocuments::CHOICES),
        ("training.mode", TrainMode::CHOICES),
        ("optimizer.name", OptimizerName::CHOICES),
        ("lr_scheduler.decay", Decay::CHOICES),
        ("runtime.backend", Backend::CHOICES),
        ("runtime.precision", Precision::CHOICES),
        ("distributed.backend", CollectiveBackend::CHOICES),
        ("distributed.strategy", Strategy::CHOICES),
        ("activation_checkpoint.mode", CheckpointMode::CHOICES),
        ("lora.init", LoraInit::CHOICES),
        ("lora.quantize_base", BaseQuant::CHOICES),
        ("dpo.loss_type", DpoLoss::CHOICES),
        ("grpo.loss_type", GrpoLoss::CHOICES),
    ] {
        out.push_str(&format!("#   {name}: {}\n", choices.join(" | ")));
    }
    out
}
