//! Where this process sits in a job, and the collective operations ranks share.
//! Today only the single-process world exists; MPI and NCCL implement the same trait.

/// This process's rank and the job's world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
}

impl World {
    pub const SINGLE: World = World { rank: 0, size: 1, local_rank: 0 };

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
            (Some(rank), Some(size)) if size > 0 && rank < size => {
                World { rank, size, local_rank: num("OMPI_COMM_WORLD_LOCAL_RANK").unwrap_or(rank) }
            }
            _ => World::SINGLE,
        }
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// Collective operations over flat f32 buffers, the contract every transport implements.
pub trait Collective {
    fn world(&self) -> World;
    /// Element-wise sum across ranks, in place.
    fn all_reduce_sum(&self, buffer: &mut [f32]);
    /// Copy `root`'s buffer to every rank.
    fn broadcast(&self, buffer: &mut [f32], root: usize);
    fn barrier(&self);
}

/// World size 1: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn world(&self) -> World {
        World::SINGLE
    }
    fn all_reduce_sum(&self, _buffer: &mut [f32]) {}
    fn broadcast(&self, _buffer: &mut [f32], _root: usize) {}
    fn barrier(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_comes_from_open_mpi_variables_or_defaults_to_one() {
        let vars =
            |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(World::from_vars(vars(&[])), World::SINGLE);
        let w =
            World::from_vars(vars(&[("OMPI_COMM_WORLD_RANK", "2"), ("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_LOCAL_RANK", "0")]));
        assert_eq!(w, World { rank: 2, size: 4, local_rank: 0 });
        assert_eq!(World::from_vars(vars(&[("OMPI_COMM_WORLD_RANK", "5"), ("OMPI_COMM_WORLD_SIZE", "4")])), World::SINGLE);
    }
}
