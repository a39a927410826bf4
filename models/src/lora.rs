//! LoRA (Hu et al., 2021): a frozen linear layer `x·W` learns a low-rank update
//! `x·W + dropout(x)·A·B·scale`, A `[d_in, r]`, B `[r, d_out]`, B starting at zero so the
//! adapted model equals the base model until the first step. Names, initialisation and scaling
//! follow Hugging Face PEFT, whose files `hf::to_peft` / `hf::from_peft` write and read.

use std::collections::BTreeSet;

use burn::module::Param;
use burn::nn::{Dropout, DropoutConfig};
use burn::prelude::*;

use crate::blocks::Linear;
use crate::init::constant_param;
use furnace_core::params::NamedTensors;
use furnace_core::rng::SeededRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LoraInit {
    /// Kaiming-uniform with a = √5: U(−1/√d_in, 1/√d_in), PEFT's default.
    Kaiming,
    /// N(0, 1/r), PEFT's "gaussian".
    Gaussian,
}

#[derive(Config, Debug)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    /// Layer names to adapt (see `LORA_TARGETS`).
    pub target_modules: Vec<String>,
    #[config(default = 0.0)]
    pub dropout: f64,
    #[config(default = "LoraInit::Kaiming")]
    pub init: LoraInit,
    #[config(default = false)]
    pub use_rslora: bool,
}

impl LoraConfig {
    /// alpha/r, or alpha/√r when rank-stabilised.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The low-rank update of one linear layer.
#[derive(Module, Debug)]
pub struct LoraAdapter<B: Backend> {
    /// `[d_in, r]`.
    pub a: Param<Tensor<B, 2>>,
    /// `[r, d_out]`, zero at initialisation.
    pub b: Param<Tensor<B, 2>>,
    pub scale: f64,
    pub dropout: Dropout,
}

impl<B: Backend> LoraAdapter<B> {
    pub fn new(d_in: usize, d_out: usize, config: &LoraConfig, rng: &mut SeededRng, device: &B::Device) -> Self {
        let r = config.r;
        let values: Vec<f32> = match config.init {
            LoraInit::Kaiming => {
                let bound = 1.0 / (d_in as f64).sqrt();
                (0..d_in * r).map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32).collect()
            }
            LoraInit::Gaussian => (0..d_in * r).map(|_| (rng.normal() / r as f64) as f32).collect(),
        };
        Self {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(values, [d_in, r]), device)),
            b: constant_param([r, d_out], 0.0, device),
            scale: config.scale(),
            dropout: DropoutConfig::new(config.dropout).init(),
        }
    }

    /// The update for rows `x` `[rows, d_in]`: `dropout(x)·A·B·scale`, `[rows, d_out]`.
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.dropout.forward(x).matmul(self.a.val()).matmul(self.b.val()) * self.scale
    }
}

/// Our names for the linear layers of a model, as PEFT's `target_modules` names them.
pub const LORA_TARGETS: &[&str] =
    &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "x_proj", "dt_proj", "out_proj", "lm_head"];

/// Names that stand for several of our layers: GPT-2's fused and shared Conv1D names, and PEFT's
/// "all-linear" (every linear layer but the output head).
const ALIASES: &[(&str, &[&str])] = &[
    ("c_attn", &["q_proj", "k_proj", "v_proj"]),
    ("attn.c_proj", &["o_proj"]),
    ("mlp.c_proj", &["down_proj"]),
    ("c_proj", &["o_proj", "down_proj"]),
    ("c_fc", &["up_proj"]),
    (
        "all-linear",
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "x_proj", "dt_proj", "out_proj"],
    ),
];

/// A model whose linear layers LoRA can adapt.
pub trait LinearLayers<B: Backend> {
    /// Every linear layer with its name from `LORA_TARGETS`.
    fn linear_layers_mut(&mut self) -> Vec<(&'static str, &mut Linear<B>)>;
}

/// Freeze every parameter of `model`, then give each targeted linear layer an adapter (the only
/// parameters left to train). Returns the model and how many layers were adapted.
pub fn attach_lora<B: Backend, M: Module<B> + LinearLayers<B>>(
    model: M,
    config: &LoraConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(M, usize), String> {
    let mut model = model.no_grad();
    let mut layers = model.linear_layers_mut();
    let present: BTreeSet<&str> = layers.iter().map(|(name, _)| *name).collect();
    let targets = resolve_targets(&config.target_modules, &present)?;
    let mut rng = SeededRng::new(seed ^ 0x10_5A_AD);
    let mut adapted = 0;
    for (name, linear) in layers.iter_mut() {
        if targets.contains(name) {
            let [d_in, d_out] = linear.dims();
            linear.lora = Some(LoraAdapter::new(d_in, d_out, config, &mut rng, device));
            adapted += 1;
        }
    }
    drop(layers);
    Ok((model, adapted))
}

/// Our layer names for the requested PEFT names. A name that matches no layer of this model is
/// an error listing the names that would.
fn resolve_targets<'a>(requested: &[String], present: &BTreeSet<&'a str>) -> Result<BTreeSet<&'a str>, String> {
    let mut out = BTreeSet::new();
    for name in requested {
        let expanded: Vec<&str> = match ALIASES.iter().find(|(alias, _)| alias == name) {
            Some((_, ours)) => ours.to_vec(),
            None => vec![name.as_str()],
        };
        let matched: Vec<&'a str> = present.iter().copied().filter(|p| expanded.contains(p)).collect();
        if matched.is_empty() {
            let mut available: Vec<&str> = present.iter().copied().collect();
            available.extend(ALIASES.iter().filter(|(_, ours)| ours.iter().any(|o| present.contains(o))).map(|(a, _)| *a));
            return Err(format!(
                "lora.target_modules: `{name}` matches no linear layer of this model; available: {}",
                available.join(", ")
            ));
        }
        out.extend(matched);
    }
    Ok(out)
}

/// Fold every adapter of a parameter map into its base weight, `W + A·B·scale`, and drop the
/// adapter tensors: the result loads into the model without adapters.
pub fn merge_lora(tensors: &NamedTensors, scale: f64) -> NamedTensors {
    let mut merged = NamedTensors::new();
    for (name, tensor) in tensors {
        if name.contains(".lora.") {
            continue;
        }
        let mut tensor = tensor.clone();
        if let Some(prefix) = name.strip_suffix(".weight") {
            if let (Some(a), Some(b)) = (tensors.get(&format!("{prefix}.lora.a")), tensors.get(&format!("{prefix}.lora.b"))) {
                let (d_in, r, d_out) = (a.shape[0], a.shape[1], b.shape[1]);
                for i in 0..d_in {
                    for j in 0..d_out {
                        let update: f64 = (0..r).map(|k| a.data[i * r + k] as f64 * b.data[k * d_out + j] as f64).sum();
                        tensor.data[i * d_out + j] += (update * scale) as f32;
                    }
                }
            }
        }
        merged.insert(name.clone(), tensor);
    }
    merged
}

/// True when the parameter map holds LoRA adapters.
pub fn has_lora(tensors: &NamedTensors) -> bool {
    tensors.keys().any(|k| k.contains(".lora."))
}

/// QLoRA: store every linear layer of the transformer blocks in NF4, frozen (the output head
/// stays dense, as bitsandbytes leaves `lm_head`). Returns the model and the bytes of the
/// quantized layers: (in NF4, as bf16 would hold them).
pub fn quantize_base<B: Backend, M: LinearLayers<B>>(mut model: M) -> (M, usize, usize) {
    let (mut nf4_bytes, mut bf16_bytes) = (0, 0);
    for (name, linear) in model.linear_layers_mut() {
        if name == "lm_head" {
            continue;
        }
        linear.quantize_nf4();
        let nf4 = linear.nf4.as_ref().expect("just quantized");
        nf4_bytes += nf4.bytes();
        bf16_bytes += 2 * nf4.shape[0] * nf4.shape[1];
    }
    (model, nf4_bytes, bf16_bytes)
}
