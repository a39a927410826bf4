//! The recipe's `[runtime] backend` picks one of the backends compiled into this binary.

use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use furnace_configs::{Backend, Recipe};
use furnace_models::kernels::FusedOps;
use furnace_optim::FusedUpdate;

/// A backend that trains Furnace models: autodiff over a backend with the fused model kernels
/// and the fused optimizer update.
pub trait TrainBackend: AutodiffBackend<InnerBackend: FusedOps + FusedUpdate> + FusedOps {}

impl<B: AutodiffBackend<InnerBackend: FusedOps + FusedUpdate> + FusedOps> TrainBackend for B {}

/// Work that runs on whichever backend the recipe selects.
pub trait BackendJob {
    fn run<B: TrainBackend>(self, device: B::Device) -> Result<()>;
}

pub fn dispatch(recipe: &Recipe, job: impl BackendJob) -> Result<()> {
    set_threads(recipe.runtime.threads, recipe.runtime.flush_denormals)?;
    watch_backend_threads();
    match recipe.runtime.backend {
        Backend::Flex => job.run::<Autodiff<burn::backend::Flex>>(Default::default()),
        Backend::Cuda => {
            #[cfg(feature = "cuda")]
            {
                check_cuda_driver()?;
                return job.run::<Autodiff<burn::backend::Cuda>>(Default::default());
            }
            #[cfg(not(feature = "cuda"))]
            bail!(not_compiled("cuda"))
        }
        Backend::Wgpu => {
            #[cfg(feature = "wgpu")]
            {
                use cubecl::Runtime;
                let device = burn::backend::wgpu::WgpuDevice::default();
                let largest = burn::backend::wgpu::WgpuRuntime::client(&device).properties().memory.max_page_size;
                check_device_buffers(recipe, largest)?;
                return job.run::<Autodiff<burn::backend::Wgpu>>(device);
            }
            #[cfg(not(feature = "wgpu"))]
            bail!(not_compiled("wgpu"))
        }
    }
}

/// The largest tensors a run allocates (parameters and their gradients and optimizer moments,
/// one micro-batch's logits and attention scores), named by the recipe keys that size them.
fn largest_tensors(recipe: &Recipe) -> Vec<(String, u64)> {
    let model = recipe.model.model(Some(recipe.planned_vocab_size()));
    let t = &recipe.training;
    let (v, d, b, s) = (model.vocab_size() as u64, model.d_model() as u64, t.local_batch_size as u64, t.seq_len as u64);
    let mut tensors = vec![
        (format!("the embedding, model.vocab_size × model.d_model = {v} × {d} floats"), 4 * v * d),
        (
            format!("one micro-batch's logits, training.local_batch_size × training.seq_len × model.vocab_size = {b} × {s} × {v} floats"),
            4 * b * s * v,
        ),
    ];
    let (f, width_key) = model.widest_layer();
    let f = f as u64;
    tensors.push((format!("the widest layer's matrix, {width_key} × model.d_model = {f} × {d} floats"), 4 * f * d));
    if let Some(heads) = model.attention_heads() {
        let h = heads as u64;
        tensors.push((
            format!("one micro-batch's attention scores, training.local_batch_size × model.n_heads × training.seq_len² = {b} × {h} × {s}² floats"),
            4 * b * h * s * s,
        ));
    }
    tensors
}

/// Refuse at start a run with a tensor larger than the device's largest buffer (wgpu's
/// max_storage_buffer_binding_size: 128 MiB on many devices), which would otherwise fail inside
/// the backend at its first allocation.
#[cfg_attr(not(feature = "wgpu"), allow(dead_code))]
fn check_device_buffers(recipe: &Recipe, largest_buffer: u64) -> Result<()> {
    match largest_tensors(recipe).into_iter().find(|(_, bytes)| *bytes > largest_buffer) {
        Some((what, bytes)) => bail!(
            "recipe key runtime.backend = \"{}\": {what} take {:.1} MB, more than this device's largest buffer ({:.1} MB); \
             lower those keys, or train on runtime.backend = \"flex\" (no such limit)",
            recipe.runtime.backend,
            bytes as f64 / 1e6,
            largest_buffer as f64 / 1e6
        ),
        None => Ok(()),
    }
}

/// A panic on a thread the backend owns (a device's server, a worker) does not reach the loop,
/// which would go on with broken tensors: it is recorded here, and the loop stops on it.
static BACKEND_PANIC: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn watch_backend_threads() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() != Some("main") {
            let _ = BACKEND_PANIC.set(format!("{info}"));
        }
        report(info);
    }));
}

/// Refuse `runtime.backend = "cuda"` where the CUDA driver cannot be loaded (no NVIDIA driver
/// on this machine), which the backend would only find as a panic on its first kernel.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn check_cuda_driver() -> Result<()> {
    // The library the CUDA runtime itself loads; kept loaded for the backend.
    for name in [c"libcuda.so.1", c"libcuda.so"] {
        // SAFETY: dlopen reads a NUL-terminated name and returns a handle or null.
        if !unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) }.is_null() {
            return Ok(());
        }
    }
    bail!(
        "recipe key runtime.backend = \"cuda\": the NVIDIA CUDA driver (libcuda.so.1) cannot be loaded on this machine; \
         install the NVIDIA driver (or add its folder to LD_LIBRARY_PATH), or set runtime.backend = \"flex\" (CPU) or \"wgpu\""
    )
}

/// The first panic of a thread other than the main one, if any.
pub fn backend_failure() -> Option<&'static str> {
    BACKEND_PANIC.get().map(String::as_str)
}

#[cfg(not(all(feature = "cuda", feature = "wgpu")))]
fn not_compiled(name: &str) -> String {
    format!(
        "recipe key runtime.backend = \"{name}\": this furnace binary was built without the `{name}` feature; \
         rebuild with `cargo build --release -p furnace-trainer --features {name}`, or set runtime.backend = \"flex\""
    )
}

fn set_threads(threads: usize, flush_denormals: bool) -> Result<()> {
    if flush_denormals {
        set_flush_denormals();
    }
    // Ranks sharing a node share its cores (as torchrun sets OMP_NUM_THREADS), else the pools
    // oversubscribe the cores and every rank slows down.
    let local_ranks = furnace_distributed::World::from_env().local_size;
    let threads = match threads {
        0 if local_ranks > 1 => std::thread::available_parallelism().map_or(1, |n| (n.get() / local_ranks).max(1)),
        n => n,
    };
    // The global pool serves gemm and burn-flex's parallel kernels; only the first call in a
    // process can build it, later ones keep it.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .start_handler(move |_| {
            if flush_denormals {
                set_flush_denormals();
            }
        })
        .build_global();
    Ok(())
}

/// Treat subnormal floats as zero on this thread (x86 MXCSR FTZ and DAZ), as
/// `torch.set_flush_denormal(True)` does. Tiny squared gradients and far-tail softmax values
/// otherwise turn into subnormals, which x86 computes on 10-100x more slowly.
fn set_flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    {
        let mut csr: u32 = 0;
        // Safety: reads and writes this thread's SSE control register only.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
            csr |= 0x8040; // FTZ (bit 15) | DAZ (bit 6)
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tensor_beyond_the_device_buffer_is_refused_naming_its_keys() {
        let recipe = Recipe::from_toml("[model]\nflavor = \"gpt2-124m\"\nn_layers = 2\n", "test.toml", &[]).unwrap();
        let err = check_device_buffers(&recipe, 128 << 20).unwrap_err().to_string();
        assert!(err.contains("model.vocab_size × model.d_model = 50257 × 768") && err.contains("154.4 MB"), "{err}");
        check_device_buffers(&recipe, 1 << 30).unwrap();
    }

    #[test]
    fn a_panic_on_another_thread_is_recorded_for_the_loop() {
        watch_backend_threads();
        let _ = std::thread::Builder::new().name("device-server".into()).spawn(|| panic!("can't allocate buffer")).unwrap().join();
        assert!(backend_failure().is_some_and(|m| m.contains("can't allocate buffer")));
    }

    /// Without an NVIDIA driver the CUDA backend is refused with the key and the fix.
    #[test]
    fn cuda_without_a_driver_is_refused_naming_the_key() {
        match check_cuda_driver() {
            Ok(()) => {
                assert!(std::path::Path::new("/proc/driver/nvidia").exists(), "libcuda loaded on a machine without the NVIDIA driver")
            }
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains("runtime.backend = \"cuda\"") && message.contains("libcuda.so.1"), "{message}");
            }
        }
    }
}
