//! The recipe's `[runtime] backend` picks one of the backends compiled into this binary.

use anyhow::{bail, Result};
use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use furnace_configs::{Backend, Recipe};

/// Work that runs on whichever backend the recipe selects.
pub trait BackendJob {
    fn run<B: AutodiffBackend>(self, device: B::Device) -> Result<()>;
}

pub fn dispatch(recipe: &Recipe, job: impl BackendJob) -> Result<()> {
    set_threads(recipe.runtime.threads)?;
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

fn set_threads(threads: usize) -> Result<()> {
    if threads > 0 {
        // Only the first call can set the global pool; later calls in the same process keep it.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).build_global();
    }
    Ok(())
}
