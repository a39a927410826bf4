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
    match recipe.runtime.backend {
        Backend::Flex => job.run::<Autodiff<burn::backend::Flex>>(Default::default()),
        Backend::Cuda => {
            #[cfg(feature = "cuda")]
            return job.run::<Autodiff<burn::backend::Cuda>>(Default::default());
            #[cfg(not(feature = "cuda"))]
            bail!(not_compiled("cuda"))
        }
        Backend::Wgpu => {
            #[cfg(feature = "wgpu")]
            return job.run::<Autodiff<burn::backend::Wgpu>>(Default::default());
            #[cfg(not(feature = "wgpu"))]
            bail!(not_compiled("wgpu"))
        }
    }
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
