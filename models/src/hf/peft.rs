//! LoRA adapters in Hugging Face PEFT's layout, through the same name tables as the weights.

use super::{expanded, HfArch, Layout::Fused};
use furnace_core::params::{HostTensor, NamedTensors};

/// LoRA adapters in Hugging Face PEFT's layout: `base_model.model.<hf module>.lora_A.weight`
/// `[r, d_in]` and `lora_B.weight` `[d_out, r]` (torch `nn.Linear` layout, also for GPT-2's
/// Conv1D). Our q/k/v adapters on GPT-2 become one adapter on the fused `c_attn`: A stacks
/// theirs, B is block-diagonal (zero blocks for parts without an adapter), so its rank is 3·r
/// and `rank_pattern`/`alpha_pattern` keep its scale. Returns the tensors and the adapted modules (PEFT target names, ranks, alphas).
pub fn to_peft(arch: HfArch, ours: &NamedTensors, n_layers: usize, scale: f64, rslora: bool) -> Result<PeftAdapters, String> {
    let mut adapters = PeftAdapters::default();
    for (hf_name, names, _) in expanded(arch, n_layers) {
        let Some(module) = hf_name.strip_suffix(".weight") else { continue };
        let prefixes: Vec<&str> = names.iter().filter_map(|n| n.strip_suffix(".weight")).collect();
        let parts: Vec<Option<(&HostTensor, &HostTensor)>> =
            prefixes.iter().map(|p| Some((ours.get(&format!("{p}.lora.a"))?, ours.get(&format!("{p}.lora.b"))?))).collect();
        if parts.iter().all(Option::is_none) {
            continue;
        }
        let widths: Vec<usize> = names
            .iter()
            .map(|n| ours.get(n).map(|w| w.shape[1]).ok_or_else(|| format!("no base weight `{n}`")))
            .collect::<Result<_, _>>()?;
        let (d_in, r) = {
            let a = parts.iter().flatten().next().expect("one adapter").0;
            (a.shape[0], a.shape[1])
        };
        // One rank-r block per part; a part without an adapter keeps a zero block.
        let rank = parts.len() * r;
        let d_out: usize = widths.iter().sum();
        let mut lora_a = HostTensor { shape: vec![rank, d_in], data: vec![0.0; rank * d_in] };
        let mut lora_b = HostTensor { shape: vec![d_out, rank], data: vec![0.0; d_out * rank] };
        let mut row0 = 0;
        for (p, (part, &width)) in parts.iter().zip(&widths).enumerate() {
            if let Some((a, b)) = part {
                for i in 0..d_in {
                    for k in 0..r {
                        lora_a.data[(p * r + k) * d_in + i] = a.data[i * r + k];
                    }
                }
                for k in 0..r {
                    for j in 0..width {
                        lora_b.data[(row0 + j) * rank + p * r + k] = b.data[k * width + j];
                    }
                }
            }
            row0 += width;
        }
        let target = peft_target(module);
        let alpha = if rslora { scale * (rank as f64).sqrt() } else { scale * rank as f64 };
        adapters.tensors.insert(format!("base_model.model.{module}.lora_A.weight"), lora_a);
        adapters.tensors.insert(format!("base_model.model.{module}.lora_B.weight"), lora_b);
        adapters.modules.insert(target, (rank, alpha));
    }
    if adapters.tensors.is_empty() {
        return Err("the checkpoint holds no LoRA adapters".into());
    }
    Ok(adapters)
}

/// PEFT adapter tensors (`base_model.model.<hf module>.lora_A.weight` / `lora_B.weight`) under
/// our names (`<layer>.lora.a` `[d_in, r]`, `<layer>.lora.b` `[r, d_out]`), the inverse of
/// `to_peft`. A fused GPT-2 `c_attn` adapter is split into q/k/v adapters of rank `r` each, which
/// needs the block-diagonal form `to_peft` writes; anything else there is refused.
pub fn from_peft(arch: HfArch, peft: &NamedTensors, n_layers: usize, r: usize) -> Result<NamedTensors, String> {
    let mut out = NamedTensors::new();
    let mut consumed = std::collections::BTreeSet::new();
    for (hf_name, names, layout) in expanded(arch, n_layers) {
        let Some(module) = hf_name.strip_suffix(".weight") else { continue };
        let (key_a, key_b) = (format!("base_model.model.{module}.lora_A.weight"), format!("base_model.model.{module}.lora_B.weight"));
        let (Some(a), Some(b)) = (peft.get(&key_a), peft.get(&key_b)) else { continue };
        let (rank, d_in, d_out) = (a.shape[0], a.shape[1], b.shape[0]);
        let parts = if layout == Fused { names.len() } else { 1 };
        if b.shape[1] != rank || rank != parts * r {
            return Err(format!(
                "`{module}`: lora_A {:?} and lora_B {:?} do not make {parts} adapter(s) of the recipe's rank lora.r = {r}",
                a.shape, b.shape
            ));
        }
        let width = d_out / parts;
        let mixed = (0..d_out).any(|j| (0..rank).any(|k| j / width != k / r && b.data[j * rank + k] != 0.0));
        if mixed {
            return Err(format!("`{module}`: this fused adapter mixes q, k and v; Furnace keeps them as separate adapters"));
        }
        for (p, name) in names.iter().enumerate() {
            let prefix = name.strip_suffix(".weight").expect("a weight rule");
            let mut ours_a = HostTensor { shape: vec![d_in, r], data: vec![0.0; d_in * r] };
            let mut ours_b = HostTensor { shape: vec![r, width], data: vec![0.0; r * width] };
            for k in 0..r {
                for i in 0..d_in {
                    ours_a.data[i * r + k] = a.data[(p * r + k) * d_in + i];
                }
                for j in 0..width {
                    ours_b.data[k * width + j] = b.data[(p * width + j) * rank + p * r + k];
                }
            }
            // A zero block is a part `to_peft` had no adapter for.
            if ours_a.data.iter().chain(&ours_b.data).any(|v| *v != 0.0) {
                out.insert(format!("{prefix}.lora.a"), ours_a);
                out.insert(format!("{prefix}.lora.b"), ours_b);
            }
        }
        consumed.extend([key_a, key_b]);
    }
    let unknown: Vec<&String> = peft.keys().filter(|k| !consumed.contains(*k)).collect();
    if !unknown.is_empty() {
        return Err(format!("adapter tensors that match no layer of this model: {unknown:?}"));
    }
    Ok(out)
}

/// What `to_peft` produces.
#[derive(Debug, Default)]
pub struct PeftAdapters {
    pub tensors: NamedTensors,
    /// PEFT target name → (rank, alpha) of every adapted module.
    pub modules: std::collections::BTreeMap<String, (usize, f64)>,
}

/// The module's name below its layer (`self_attn.q_proj`, `attn.c_attn`, `lm_head`): what
/// PEFT's `target_modules` matches as a suffix.
fn peft_target(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    match parts.iter().position(|p| p.parse::<usize>().is_ok()) {
        Some(i) => parts[i + 1..].join("."),
        None => module.to_string(),
    }
}
