//! The MPI transport (OpenMPI from Debian through the `mpi` crate): `mpirun` is the launcher,
//! its byte transfer layers (shared memory within a node, TCP or InfiniBand between nodes) the
//! wire. A rank that dies makes mpirun stop every other rank (MPI's default
//! errors-are-fatal handling), so no rank waits forever on a lost peer.

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;

use crate::{Collective, PendingSum, Summed, World};

/// Largest message in elements: MPI counts are C ints, and a bounded scratch buffer keeps the
/// copy that out-of-place reductions need small.
const CHUNK: usize = 1 << 24;

pub struct MpiCollective {
    world: World,
    communicator: SimpleCommunicator,
    /// Finalizes MPI when dropped; kept last so the communicator goes first.
    _universe: Universe,
}

impl MpiCollective {
    /// MPI_Init_thread (funneled: only the main thread calls MPI; the compute pool never does).
    pub fn init(launcher: World) -> Result<Self, String> {
        let (universe, _) =
            mpi::initialize_with_threading(Threading::Funneled).ok_or_else(|| "MPI was already initialized in this process".to_string())?;
        let communicator = universe.world();
        let (rank, size) = (communicator.rank() as usize, communicator.size() as usize);
        if (rank, size) != (launcher.rank, launcher.size) {
            return Err(format!(
                "MPI says rank {rank} of {size}, the launcher's environment rank {} of {}; launch with the mpirun that matches the linked MPI",
                launcher.rank, launcher.size
            ));
        }
        Ok(Self { world: launcher, communicator, _universe: universe })
    }

    /// Copy `root`'s bytes to every rank (NCCL's unique id).
    pub fn broadcast_bytes(&self, buffer: &mut [u8], root: usize) {
        self.communicator.process_at_rank(root as i32).broadcast_into(buffer);
    }
}

impl Collective for MpiCollective {
    fn world(&self) -> World {
        self.world
    }

    fn all_reduce_sum_f64(&self, buffer: &mut [f64]) {
        let send = buffer.to_vec();
        for (send, receive) in send.chunks(CHUNK).zip(buffer.chunks_mut(CHUNK)) {
            self.communicator.all_reduce_into(send, receive, SystemOperation::sum());
        }
    }

    fn all_reduce_sum_into(&self, send: &[f32], receive: &mut [f32]) {
        // One call up to the largest count MPI takes.
        for (send, receive) in send.chunks(i32::MAX as usize).zip(receive.chunks_mut(i32::MAX as usize)) {
            self.communicator.all_reduce_into(send, receive, SystemOperation::sum());
        }
    }

    fn reduce_sum(&self, buffer: &mut [f32], root: usize) {
        let process = self.communicator.process_at_rank(root as i32);
        let mut scratch = Vec::with_capacity(CHUNK.min(buffer.len()));
        for chunk in buffer.chunks_mut(CHUNK) {
            scratch.clear();
            scratch.extend_from_slice(chunk);
            if self.world.rank == root {
                process.reduce_into_root(&scratch[..], chunk, SystemOperation::sum());
            } else {
                process.reduce_into(&scratch[..], SystemOperation::sum());
            }
        }
    }

    fn broadcast(&self, buffer: &mut [f32], root: usize) {
        let process = self.communicator.process_at_rank(root as i32);
        for chunk in buffer.chunks_mut(CHUNK) {
            process.broadcast_into(chunk);
        }
    }

    fn all_gather_u64(&self, value: u64) -> Vec<u64> {
        let mut values = vec![0u64; self.world.size];
        self.communicator.all_gather_into(&value, &mut values[..]);
        values
    }

    fn barrier(&self) {
        self.communicator.barrier();
    }

    fn start_all_reduce(&self, values: Vec<f32>) -> Box<dyn PendingSum + '_> {
        if values.len() > i32::MAX as usize {
            let mut sums = vec![0.0; values.len()];
            self.all_reduce_sum_into(&values, &mut sums);
            return Box::new(Summed(sums));
        }
        // MPI reads and writes the buffers until the request completes: they are moved to the
        // heap here and freed (or returned) only after it has.
        let send: &'static mut [f32] = Box::leak(values.into_boxed_slice());
        let receive: &'static mut [f32] = Box::leak(vec![0.0; send.len()].into_boxed_slice());
        let buffers = (send as *mut [f32], receive as *mut [f32]);
        // Safety: both pointers come from the leaked boxes above and are only turned back into
        // boxes once the request is done (in `finish`).
        let (send, receive) = unsafe { (&*buffers.0, &mut *buffers.1) };
        let request = self.communicator.immediate_all_reduce_into(StaticScope, send, receive, SystemOperation::sum());
        Box::new(MpiPendingSum { request: Some(request), buffers: Some(buffers) })
    }
}

/// An MPI_Iallreduce in flight, owning its send and receive buffers.
struct MpiPendingSum {
    request: Option<Request<'static, [f32], StaticScope>>,
    /// The leaked send and receive buffers, reclaimed once the request is done.
    buffers: Option<(*mut [f32], *mut [f32])>,
}

impl MpiPendingSum {
    /// Waits for the request and frees the buffers, returning the sums.
    fn finish(&mut self) -> Vec<f32> {
        if let Some(request) = self.request.take() {
            request.wait();
        }
        let (send, receive) = self.buffers.take().expect("finished once");
        // Safety: the request no longer touches the buffers, which came from leaked boxes.
        unsafe {
            drop(Box::from_raw(send));
            Box::from_raw(receive).into_vec()
        }
    }
}

impl PendingSum for MpiPendingSum {
    fn poll(&mut self) {
        if let Some(Err(request)) = self.request.take().map(Request::test) {
            self.request = Some(request);
        }
    }

    fn wait(mut self: Box<Self>) -> Vec<f32> {
        self.finish()
    }
}

impl Drop for MpiPendingSum {
    /// A sum dropped unfinished (a step abandoned by an error) still completes before its
    /// buffers go.
    fn drop(&mut self) {
        if self.buffers.is_some() {
            self.finish();
        }
    }
}
