//! The NCCL transport (NVIDIA's collectives through `cudarc`, the library loaded at run time):
//! each rank drives the GPU of its local rank; rank 0 creates NCCL's unique id and MPI
//! broadcasts it, as torch.distributed does over its store. Buffers cross to the GPU and back
//! around each collective, so any backend's host gradients can use it; losses, counts and
//! barriers stay on MPI.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::{Collective, MpiCollective, World};

pub struct NcclCollective {
    communicator: Comm,
    stream: Arc<CudaStream>,
    /// Launcher, id exchange and the host-side collectives; dropped after the communicator.
    mpi: MpiCollective,
}

/// Whether this machine can load the CUDA driver and NCCL (`libcuda.so`, `libnccl.so.2`).
pub fn nccl_present() -> bool {
    // SAFETY: these only try to open the shared libraries.
    unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present() }
}

impl NcclCollective {
    pub fn init(launcher: World) -> Result<Self, String> {
        if !nccl_present() {
            return Err(
                "distributed.backend = \"nccl\": the CUDA driver or NCCL (libcuda.so, libnccl.so.2) cannot be loaded on this machine; install NVIDIA's driver and NCCL, or use backend = \"mpi\"".into()
            );
        }
        let mpi = MpiCollective::init(launcher)?;
        let world = mpi.world();
        let context = CudaContext::new(world.local_rank).map_err(|e| format!("CUDA device {} (local rank): {e:?}", world.local_rank))?;
        let stream = context.default_stream();
        let mut id = [0u8; 128];
        if world.is_main() {
            let created = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
            id.iter_mut().zip(created.internal()).for_each(|(byte, &c)| *byte = c as u8);
        }
        mpi.broadcast_bytes(&mut id, 0);
        let id = Id::uninit(id.map(|b| b as core::ffi::c_char));
        let communicator = Comm::from_rank(stream.clone(), world.rank, world.size, id).map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
        Ok(Self { communicator, stream, mpi })
    }

    /// `op` on a device copy of `buffer`, written back into it.
    fn on_device(&self, buffer: &mut [f32], what: &str, op: impl FnOnce(&Comm, &mut cudarc::driver::CudaSlice<f32>) -> Result<(), String>) {
        let run = || -> Result<(), String> {
            let mut device = self.stream.clone_htod(buffer).map_err(|e| format!("{e:?}"))?;
            op(&self.communicator, &mut device)?;
            self.stream.memcpy_dtoh(&device, buffer).map_err(|e| format!("{e:?}"))?;
            self.stream.synchronize().map_err(|e| format!("{e:?}"))
        };
        // As MPI's errors are fatal, a failed collective stops the rank (and mpirun the others).
        if let Err(e) = run() {
            panic!("NCCL {what} failed on rank {}: {e}", self.mpi.world().rank);
        }
    }
}

impl Collective for NcclCollective {
    fn world(&self) -> World {
        self.mpi.world()
    }

    fn all_reduce_sum_f64(&self, buffer: &mut [f64]) {
        self.mpi.all_reduce_sum_f64(buffer);
    }

    fn all_reduce_sum_into(&self, send: &[f32], receive: &mut [f32]) {
        receive.copy_from_slice(send);
        self.on_device(receive, "all-reduce", |comm, data| {
            comm.all_reduce_in_place(data, &ReduceOp::Sum).map(drop).map_err(|e| format!("{e:?}"))
        });
    }

    fn reduce_sum(&self, buffer: &mut [f32], root: usize) {
        self.on_device(buffer, "reduce", |comm, data| {
            comm.reduce_in_place(data, &ReduceOp::Sum, root as i32).map(drop).map_err(|e| format!("{e:?}"))
        });
    }

    fn broadcast(&self, buffer: &mut [f32], root: usize) {
        self.on_device(buffer, "broadcast", |comm, data| {
            comm.broadcast_in_place(data, root as i32).map(drop).map_err(|e| format!("{e:?}"))
        });
    }

    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        self.mpi.all_gather_u64(value)
    }

    fn barrier(&self) {
        self.mpi.barrier();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With CUDA, NCCL and a GPU (a device machine; alone or under `mpirun -np 1`): world size 1
    /// goes through NCCL and every collective gives the buffer back. Without them: the error
    /// names the libraries and the other backend.
    #[test]
    fn nccl_initialises_or_says_what_is_missing() {
        match NcclCollective::init(World::from_env()) {
            Ok(nccl) => {
                assert_eq!(nccl.world().size, 1, "run this test as one rank");
                let values = [1.5f32, -2.0, 3.25];
                let mut reduced = [0.0; 3];
                nccl.all_reduce_sum_into(&values, &mut reduced);
                assert_eq!(reduced, values);
                let mut buffer = values;
                nccl.reduce_sum(&mut buffer, 0);
                nccl.broadcast(&mut buffer, 0);
                assert_eq!(buffer, values);
                assert_eq!(nccl.all_gather_u64(7), vec![7]);
            }
            Err(e) if !nccl_present() => assert!(e.contains("libnccl.so.2") && e.contains("backend = \"mpi\""), "{e}"),
            Err(e) => panic!("CUDA and NCCL load, yet NCCL does not start: {e}"),
        }
    }
}
