//! What each architecture can do, declared once. The recipe check refuses a recipe that asks an
//! architecture for what its row lacks, naming the key and the reason; the README's feature
//! matrix is generated from the same rows (a test keeps the two equal).

use crate::{Arch, TrainMode};

/// One architecture's row.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub arch: Arch,
    /// The training modes it trains in (`training.mode`).
    pub modes: &'static [TrainMode],
    /// LoRA adapters on its linear layers (`lora.r`), and QLoRA's NF4 base under them
    /// (`lora.quantize_base`).
    pub lora: bool,
    /// Block-by-block recompute in backward (`activation_checkpoint.mode`).
    pub checkpointing: bool,
    /// FSDP's sharded parameters, gathered block by block (`distributed.strategy = "fsdp"`).
    pub fsdp: bool,
    /// Sophia's curvature, estimated from the model's own samples (`optimizer.name = "sophia"`).
    pub sophia: bool,
    /// Several SFT conversations packed into one row (`data.packing`).
    pub packing: bool,
    /// A student distilled from a teacher's logits (`training.teacher`).
    pub distillation: bool,
    /// One GGUF file for llama.cpp (`furnace export --format gguf`).
    pub gguf_export: bool,
    /// What the architecture is, in the recipe check's refusals.
    pub what: &'static str,
}

const ALL_MODES: &[TrainMode] = TrainMode::ALL;

const DECODER: Capabilities = Capabilities {
    arch: Arch::Llama,
    modes: ALL_MODES,
    lora: true,
    checkpointing: true,
    fsdp: true,
    sophia: true,
    packing: true,
    distillation: true,
    gguf_export: true,
    what: "a decoder-only transformer",
};

/// Every architecture's row, in the order the docs list them.
pub const CAPABILITIES: [Capabilities; 6] = [
    DECODER,
    Capabilities { arch: Arch::Gpt2, ..DECODER },
    Capabilities {
        arch: Arch::Mixtral,
        // The distillation loss leaves out the router's auxiliary losses.
        distillation: false,
        what: "a mixture of experts whose router has its own auxiliary losses",
        ..DECODER
    },
    Capabilities {
        arch: Arch::Mamba,
        // Reward models and PPO's value head are a scalar head on a transformer's hidden states.
        modes: &[TrainMode::Pretrain, TrainMode::Sft, TrainMode::Dpo, TrainMode::Grpo],
        packing: false,
        gguf_export: false,
        what: "a state-space model (no attention mask to keep packed conversations apart, no scalar head)",
        ..DECODER
    },
    Capabilities {
        arch: Arch::Bert,
        modes: &[TrainMode::Pretrain],
        fsdp: false,
        packing: false,
        distillation: false,
        gguf_export: false,
        what: "an encoder trained with the masked-LM objective (pretrain)",
        ..DECODER
    },
    Capabilities {
        arch: Arch::T5,
        modes: &[TrainMode::Pretrain],
        lora: false,
        fsdp: false,
        sophia: false,
        packing: false,
        distillation: false,
        gguf_export: false,
        what: "an encoder-decoder trained on (input, target) pairs or span corruption (pretrain)",
        ..DECODER
    },
];

pub fn capabilities(arch: Arch) -> &'static Capabilities {
    CAPABILITIES.iter().find(|c| c.arch == arch).expect("every architecture has a row")
}

/// The feature matrix as a Markdown table: one row per feature, one column per architecture.
pub fn capability_matrix() -> String {
    let mark = |yes: bool| if yes { "✓" } else { "–" };
    let mut rows: Vec<(String, Vec<bool>)> = ALL_MODES
        .iter()
        .map(|mode| (format!("`training.mode = \"{mode}\"`"), CAPABILITIES.iter().map(|c| c.modes.contains(mode)).collect()))
        .collect();
    let features: [(&str, fn(&Capabilities) -> bool); 7] = [
        ("LoRA, QLoRA (`lora.r`, `lora.quantize_base`)", |c| c.lora),
        ("activation checkpointing", |c| c.checkpointing),
        ("FSDP (`distributed.strategy = \"fsdp\"`)", |c| c.fsdp),
        ("Sophia (`optimizer.name = \"sophia\"`)", |c| c.sophia),
        ("packed SFT (`data.packing`)", |c| c.packing),
        ("distillation student (`training.teacher`)", |c| c.distillation),
        ("GGUF export (`--format gguf`)", |c| c.gguf_export),
    ];
    rows.extend(features.iter().map(|(name, has)| (name.to_string(), CAPABILITIES.iter().map(has).collect())));
    let mut out = format!("| feature | {} |\n", CAPABILITIES.iter().map(|c| c.arch.to_string()).collect::<Vec<_>>().join(" | "));
    out.push_str(&format!("| --- |{}\n", " --- |".repeat(CAPABILITIES.len())));
    for (name, marks) in rows {
        out.push_str(&format!("| {name} | {} |\n", marks.into_iter().map(mark).collect::<Vec<_>>().join(" | ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_architecture_has_one_row() {
        for arch in Arch::ALL {
            assert_eq!(CAPABILITIES.iter().filter(|c| c.arch == *arch).count(), 1, "{arch}");
        }
    }
}
