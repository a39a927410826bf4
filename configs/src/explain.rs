use crate::schema::{OptionDoc, Section};
use crate::*;

fn section_text<S: Section>(out: &mut String) {
    let defaults = toml::Table::try_from(S::default()).expect("defaults serialize");
    out.push_str(&format!("[{}]\n", S::NAME));
    for line in S::DOC.lines() {
        out.push_str(&format!("# {}\n", line.trim()));
    }
    options_text(&S::options(), &defaults, out);
    out.push('\n');
}

fn options_text(options: &[OptionDoc], defaults: &toml::Table, out: &mut String) {
    for opt in options {
        for line in opt.doc.lines() {
            out.push_str(&format!("  # {}\n", line.trim()));
        }
        let default = defaults.get(opt.key).map(|v| v.to_string()).unwrap_or_else(|| "(unset)".into());
        out.push_str(&format!("  {} = {}    # type: {}\n", opt.key, default, opt.ty.replace(' ', "")));
    }
}

/// `[model]`: its own keys, then each configuration's (defaults at the tiny flavor).
fn model_text(out: &mut String) {
    use furnace_core::arch::{BertConfig, DecoderConfig, MambaConfig, MoeConfig, T5Config};
    out.push_str("[model]\n# The model: arch picks the architecture, whose own keys follow; flavor picks a size preset that\n");
    out.push_str("# the keys given override; unset keys take the arch's layout.\n");
    let section = toml::Table::try_from(ModelSection::default()).expect("defaults serialize");
    options_text(&ModelSection::options(), &section, out);
    for (label, arch, options) in [
        ("llama, gpt2 or mixtral (defaults: llama's)", Arch::Llama, DecoderConfig::options()),
        ("mixtral, besides", Arch::Mixtral, MoeConfig::options()),
        ("mamba", Arch::Mamba, MambaConfig::options()),
        ("bert", Arch::Bert, BertConfig::options()),
        ("t5", Arch::T5, T5Config::options()),
    ] {
        let config = ModelConfig::from_keys(arch, Flavor::Tiny, &Default::default()).expect("the defaults make a model");
        let defaults = toml::Table::try_from(config.keys()).expect("defaults serialize");
        out.push_str(&format!("  # --- arch = {label}:\n"));
        options_text(&options, &defaults, out);
    }
    out.push('\n');
}

/// Every section and option with its default, type and meaning, as commented TOML.
pub fn explain() -> String {
    let mut out = String::from("# Furnace recipe: every option, its default and meaning.\n\n");
    section_text::<RunSection>(&mut out);
    model_text(&mut out);
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
