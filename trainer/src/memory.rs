//! Process memory: the allocator policy the binary sets, peak resident memory as the trainer
//! reports it, and the check that a recipe's estimate fits the machine before any work starts.

use anyhow::{bail, Result};
use furnace_configs::{Precision, Recipe};
use furnace_optim::Algorithm;

/// `mi_option_purge_delay` in mimalloc 2's option enum (libmimalloc-sys is pinned to match).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory mapped (`true`) instead of returning it to the OS: a training step frees
/// and reallocates the same large buffers every step, and each fresh page costs a fault and a
/// zeroing pass. Memory held stays at the step's peak, which the next step needs anyway. Setup
/// (a dense base loaded for QLoRA, file contents) runs with `false`, so its buffers go back.
pub fn retain_freed_memory(retain: bool) {
    // Safety: sets a process-wide allocator option; mimalloc reads it when memory is freed.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, if retain { -1 } else { 0 }) };
}

/// Return the free pages every thread's heap still holds to the OS now.
pub fn collect_freed_memory() {
    // Safety: collections of mimalloc's own free pages; each thread collects its own heap.
    rayon::broadcast(|_| unsafe { libmimalloc_sys::mi_collect(true) });
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// The process's peak resident memory since start or the last `reset_peak_rss`, in MB
/// (Linux `VmHWM`; None elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Start a new peak-RSS window (Linux: `clear_refs` 5); false where that is not possible.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes of one stored parameter (and of its gradient): bf16-true keeps both in bf16, every
/// other precision in f32 (the optimizer state is f32 always).
pub fn parameter_bytes(precision: Precision) -> f64 {
    match precision {
        Precision::Bf16True => 2.0,
        _ => 4.0,
    }
}

/// This machine's memory in GB (Linux `MemTotal`; None elsewhere).
fn machine_memory_gb() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: f64 = info.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0 / 1e9)
}

/// Refuse a recipe whose memory estimate exceeds `runtime.max_memory_gb` (or the machine's
/// memory), naming the figure and the keys that drive it; a typo such as `d_model = 100000`
/// then ends here instead of in an allocation abort minutes later. A model read from
/// model.init_from is sized by its base, not by the recipe, and is not estimated here. Returns
/// the estimate in GB when there is one.
pub fn check_fits(recipe: &Recipe) -> Result<Option<f64>> {
    if !recipe.model.init_from.is_empty() {
        return Ok(None);
    }
    let (limit, source) = match recipe.runtime.max_memory_gb {
        gb if gb > 0.0 => (gb, "runtime.max_memory_gb"),
        _ => (machine_memory_gb().unwrap_or(f64::INFINITY), "this machine's memory"),
    };
    let model = recipe.model.model(Some(recipe.planned_vocab_size()));
    let params = model.num_params() as f64;
    let d_model = model.d_model();
    let (widest, width_key) = model.widest_layer();
    // LoRA trains adapters of r·(in + out) on each targeted matrix (at most the attention's four
    // and the MLP's three per layer), held beside the frozen weights.
    let (adapters, trainable) = match recipe.lora.r {
        0 => (0.0, params),
        r => {
            let adapters = (r * (d_model + widest.max(d_model)) * 7 * model.n_layers()) as f64;
            (adapters, adapters)
        }
    };
    let width = parameter_bytes(recipe.runtime.precision);
    let t = &recipe.training;
    let activations = model.activation_bytes(t.local_batch_size, t.seq_len, recipe.activation_checkpoint.recompute_every());
    let slots = Algorithm::from_recipe(recipe).state_slots() as f64;
    let gb = |bytes: f64| bytes / 1e9;
    let (weights, gradients, state) = (gb(width * (params + adapters)), gb(width * trainable), gb(4.0 * slots * trainable));
    let total = weights + gradients + state + gb(activations);
    if total > limit {
        bail!(
            "recipe {}: the memory estimate is {total:.1} GB ({:.0}M parameters from model.d_model = {}, model.n_layers = {}, {width_key} = {}, vocabulary {}: weights {weights:.1} GB, gradients {gradients:.1} GB, optimizer state {state:.1} GB; activations of training.local_batch_size = {} × training.seq_len = {}: {:.1} GB), more than {source} ({limit:.1} GB)\n  fix: lower those keys{}, or raise runtime.max_memory_gb if the estimate is wrong for this run",
            recipe.run.name,
            params / 1e6,
            d_model,
            model.n_layers(),
            widest,
            model.vocab_size(),
            t.local_batch_size,
            t.seq_len,
            gb(activations),
            if recipe.lora.r > 0 { " (lora.r among them)" } else { "" },
        );
    }
    Ok(Some(total))
}
