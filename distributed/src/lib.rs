//! Where this process sits in a job, and the collective operations ranks share: the
//! `Collective` trait with a single-process transport and (feature `mpi`) OpenMPI, and the
//! parameter partition ZeRO shards optimizer state by.

#[cfg(feature = "mpi")]
mod mpi_transport;
#[cfg(feature = "nccl")]
mod nccl_transport;
mod partition;

#[cfg(feature = "mpi")]
pub use mpi_transport::MpiCollective;
#[cfg(feature = "nccl")]
pub use nccl_transport::{nccl_present, NcclCollective};
pub use partition::Partition;

/// This process's rank and the job's world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    /// Ranks on this node (for sizing the CPU thread pool).
    pub local_size: usize,
}

impl World {
    pub const SINGLE: World = World { rank: 0, size: 1, local_rank: 0, local_size: 1 };

    /// Read the rank from the launcher's environment (`mpirun`: `OMPI_COMM_WORLD_*`, PMIx:
    /// `PMIX_RANK`); a plain process is world size 1.
    pub fn from_env() -> World {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> World {
        let num = |k: &str| var(k).and_then(|v| v.parse::<usize>().ok());
        let rank = num("OMPI_COMM_WORLD_RANK").or_else(|| num("PMIX_RANK"));
        let size = num("OMPI_COMM_WORLD_SIZE");
        match (rank, size) {
            (Some(rank), Some(size)) if size > 0 && rank < size => World {
                rank,
                size,
                local_rank: num("OMPI_COMM_WORLD_LOCAL_RANK").unwrap_or(rank),
                local_size: num("OMPI_COMM_WORLD_LOCAL_SIZE").unwrap_or(size).max(1),
            },
            _ => World::SINGLE,
        }
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// Collective operations over flat buffers, the contract every transport implements. Every
/// rank calls the same operations in the same order with buffers of the same length.
pub trait Collective {
    fn world(&self) -> World;
    /// Element-wise sum across ranks, in place, in f64 (losses and counts).
    fn all_reduce_sum_f64(&self, buffer: &mut [f64]);
    /// The sum of every rank's `send` into `receive`, out of place, as the library does it (one
    /// MPI_Allreduce per 2³¹ elements, no copies): DDP's bucket reduction, and the baseline
    /// `furnace bench allreduce` holds the training path against.
    fn all_reduce_sum_into(&self, send: &[f32], receive: &mut [f32]);
    /// Element-wise sum across ranks, delivered to `root` only (other ranks' buffers are left
    /// unspecified): ZeRO-2's gradient reduction to the rank that owns the parameter.
    fn reduce_sum(&self, buffer: &mut [f32], root: usize);
    /// Copy `root`'s buffer to every rank.
    fn broadcast(&self, buffer: &mut [f32], root: usize);
    /// Every rank's value, in rank order.
    fn all_gather_u64(&self, value: u64) -> Vec<u64>;
    fn barrier(&self);
    /// Starts the sum of every rank's `values` without waiting for it (MPI_Iallreduce), so
    /// that computation overlaps the transfer; the result comes from [`PendingSum::wait`].
    /// Ranks start the same sums in the same order. By default the blocking all-reduce, done
    /// at once.
    fn start_all_reduce(&self, values: Vec<f32>) -> Box<dyn PendingSum + '_> {
        let mut sums = vec![0.0; values.len()];
        self.all_reduce_sum_into(&values, &mut sums);
        Box::new(Summed(sums))
    }
}

/// A sum started by [`Collective::start_all_reduce`].
pub trait PendingSum {
    /// Lets the transport move the transfer along (MPI progresses a nonblocking collective only
    /// inside its calls).
    fn poll(&mut self);
    /// The sums, once every rank's values have arrived.
    fn wait(self: Box<Self>) -> Vec<f32>;
}

/// A sum already complete.
pub(crate) struct Summed(pub(crate) Vec<f32>);

impl PendingSum for Summed {
    fn poll(&mut self) {}
    fn wait(self: Box<Self>) -> Vec<f32> {
        self.0
    }
}

/// World size 1: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn world(&self) -> World {
        World::SINGLE
    }
    fn all_reduce_sum_f64(&self, _buffer: &mut [f64]) {}
    fn all_reduce_sum_into(&self, send: &[f32], receive: &mut [f32]) {
        receive.copy_from_slice(send);
    }
    fn reduce_sum(&self, _buffer: &mut [f32], _root: usize) {}
    fn broadcast(&self, _buffer: &mut [f32], _root: usize) {}
    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        vec![value]
    }
    fn barrier(&self) {}
}

/// The wire between ranks, as `[distributed] backend` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Mpi,
    Nccl,
}

/// The transport for this process: MPI when a launcher started it with world size > 1,
/// otherwise the single process; NCCL whenever asked (world size 1 included, so one GPU can
/// check it). Errors when the transport asked for is not compiled in.
pub fn connect(transport: Transport) -> Result<Box<dyn Collective>, String> {
    let world = World::from_env();
    if transport == Transport::Nccl {
        #[cfg(feature = "nccl")]
        return NcclCollective::init(world).map(|c| Box::new(c) as Box<dyn Collective>);
        #[cfg(not(feature = "nccl"))]
        return Err("distributed.backend = \"nccl\", but this furnace binary was built without NCCL; rebuild with `cargo build --release -p furnace-trainer --features nccl` (CUDA's driver and NCCL are loaded at run time)".into());
    }
    if world.size == 1 {
        return Ok(Box::new(SingleProcess));
    }
    #[cfg(feature = "mpi")]
    {
        MpiCollective::init(world).map(|c| Box::new(c) as Box<dyn Collective>)
    }
    #[cfg(not(feature = "mpi"))]
    Err(format!(
        "launched as rank {} of {} (mpirun), but this furnace binary was built without MPI; install OpenMPI's \
         headers (`apt install libopenmpi-dev libclang-dev`) and rebuild with `cargo build --release -p furnace-trainer --features mpi`",
        world.rank, world.size
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_comes_from_open_mpi_variables_or_defaults_to_one() {
        let vars =
            |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(World::from_vars(vars(&[])), World::SINGLE);
        let w = World::from_vars(vars(&[
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ]));
        assert_eq!(w, World { rank: 2, size: 4, local_rank: 0, local_size: 2 });
        assert_eq!(World::from_vars(vars(&[("OMPI_COMM_WORLD_RANK", "5"), ("OMPI_COMM_WORLD_SIZE", "4")])), World::SINGLE);
    }
}
