//! Data parallelism over the ranks mpirun started: the same starting weights everywhere,
//! gradients averaged in buckets (PyTorch DDP's arithmetic) after each step's backward passes,
//! or under activation checkpointing part by part as backward goes (`GradientReduction`),
//! and under ZeRO-1/2 the optimizer state (and with 2 the reduced gradients) kept only by the
//! rank that owns each parameter, which then broadcasts its updated values. Under FSDP the
//! owner alone holds the parameter between uses: `release` swaps the others' copies for
//! placeholders and `gather` brings a selection back from the owners. World size 1 makes every
//! operation here a no-op.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::marker::PhantomData;

use anyhow::{bail, Result};
use burn::module::{AutodiffModule, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use furnace_configs::{CollectiveBackend, Recipe, Strategy};
use furnace_core::params::{map_with_paths, visit_with_paths, PathMapper, PathVisitor};
use furnace_distributed::{Collective, Partition, PendingSum, Transport, World};
use furnace_optim::global_grad_norm;

pub struct Parallel {
    collective: Box<dyn Collective>,
    pub world: World,
    pub strategy: Strategy,
    bucket_elements: usize,
    /// ZeRO: the rank owning each trainable parameter, by path.
    owners: HashMap<String, usize>,
    /// ZeRO and FSDP: each trainable parameter's full shape (what a gather allocates; under
    /// FSDP a released parameter holds a placeholder).
    shapes: HashMap<String, Vec<usize>>,
    /// FSDP: the block each block parameter belongs to, by path, as the model says.
    blocks: BTreeMap<String, usize>,
}

impl Parallel {
    pub fn new(collective: Box<dyn Collective>, recipe: &Recipe) -> Self {
        let world = collective.world();
        let bucket_elements = ((recipe.distributed.bucket_mb * 1e6 / 4.0) as usize).max(1);
        Self {
            collective,
            world,
            strategy: recipe.distributed.strategy,
            bucket_elements,
            owners: HashMap::new(),
            shapes: HashMap::new(),
            blocks: BTreeMap::new(),
        }
    }

    /// FSDP over more than one rank: parameters are held by their owners between uses.
    pub fn fsdp(&self) -> bool {
        self.sharded() && self.strategy == Strategy::Fsdp
    }

    /// Whether each gradient is reduced to its owner only (ZeRO-2 and FSDP).
    fn reduces_to_owner(&self) -> bool {
        self.sharded() && matches!(self.strategy, Strategy::Zero2 | Strategy::Fsdp)
    }

    pub fn is_main(&self) -> bool {
        self.world.is_main()
    }

    fn sharded(&self) -> bool {
        self.world.size > 1 && self.strategy != Strategy::Ddp
    }

    /// Fail on every rank, naming the odd ones out, when ranks were given different recipes
    /// (another file on another node, a different `--set`): they would silently train apart.
    pub fn check_same_recipe(&self, recipe_toml: &str) -> Result<()> {
        let mut hasher = DefaultHasher::new();
        recipe_toml.hash(&mut hasher);
        let hashes = self.collective.all_gather_u64(hasher.finish());
        let differing: Vec<usize> = (0..hashes.len()).filter(|&r| hashes[r] != hashes[0]).collect();
        if !differing.is_empty() {
            bail!(
                "rank(s) {differing:?} of {} were given a different recipe than rank 0 (after --set overrides); launch every rank with the same recipe file and overrides",
                self.world.size
            );
        }
        Ok(())
    }

    pub fn collective(&self) -> &dyn Collective {
        self.collective.as_ref()
    }

    pub fn barrier(&self) {
        self.collective.barrier();
    }

    /// The sum over ranks of each value.
    pub fn sum(&self, values: &mut [f64]) {
        self.collective.all_reduce_sum_f64(values);
    }

    /// The mean over ranks of a per-rank count or loss.
    pub fn mean(&self, value: f64) -> f64 {
        let mut v = [value];
        self.sum(&mut v);
        v[0] / self.world.size as f64
    }

    /// Rank 0's parameters on every rank (DDP's broadcast at construction), so ranks start
    /// equal whatever their initialisation did.
    pub fn broadcast_model<B: Backend, M: Module<B>>(&self, model: M) -> M {
        if self.world.size == 1 {
            return model;
        }
        struct Broadcast<'a>(&'a dyn Collective);
        impl<B: Backend> PathMapper<B> for Broadcast<'_> {
            fn map<const D: usize>(&mut self, _: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                let (id, tensor, mapper) = param.consume();
                let shape = tensor.shape().dims::<D>().to_vec();
                let value = broadcast_tensor(self.0, tensor, 0, &shape);
                Param::from_mapped_value(id, value, mapper)
            }
        }
        map_with_paths(model, &mut Broadcast(self.collective.as_ref()))
    }

    /// ZeRO: split the trainable parameters into contiguous runs, one per rank. Returns this
    /// rank's share of the trainable elements and the total. `blocks` (the model's
    /// `param_blocks`) is what FSDP gathers one block at a time.
    pub fn partition<B: Backend, M: Module<B>>(&mut self, model: &M, blocks: BTreeMap<String, usize>) -> (usize, usize) {
        self.blocks = blocks;
        struct Trainable(Vec<(String, Vec<usize>)>);
        impl<B: Backend> PathVisitor<B> for Trainable {
            fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
                if param.val().is_require_grad() {
                    self.0.push((path.to_string(), param.lazy_shape().dims::<D>().to_vec()));
                }
            }
        }
        let mut trainable = Trainable(Vec::new());
        visit_with_paths(model, &mut trainable);
        let sizes: Vec<usize> = trainable.0.iter().map(|(_, shape)| shape.iter().product()).collect();
        let total = sizes.iter().sum();
        if !self.sharded() {
            return (total, total);
        }
        let partition = Partition::contiguous(&sizes, self.world.size);
        self.owners = trainable.0.iter().enumerate().map(|(i, (path, _))| (path.clone(), partition.owner(i))).collect();
        self.shapes = trainable.0.into_iter().collect();
        (partition.shares(&sizes)[self.world.rank], total)
    }

    /// Whether this rank updates (and keeps optimizer state for) the parameter at `path`.
    pub fn owns(&self, path: &str) -> bool {
        !self.sharded() || self.owners.get(path).is_none_or(|&owner| owner == self.world.rank)
    }

    /// Average every gradient over ranks, bucket by bucket. Under ZeRO-2 each gradient goes
    /// to its owner only and the other ranks drop theirs.
    pub fn reduce_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(&self, model: &M, grads: GradientsParams) -> GradientsParams {
        if self.world.size == 1 {
            return grads;
        }
        let mut reduction = self.reduction(None, false);
        reduction.add(model, grads);
        reduction.finish(model)
    }

    /// A reduction fed part by part (the recompute path hands over each block's gradients as
    /// its backward ends): data-parallel buckets are summed by nonblocking all-reduces that run
    /// while the next parts are computed; ZeRO-2's and FSDP's reductions to an owner block.
    /// `carried` gradients (earlier micro-batches' of a step) join the first part that holds
    /// the same parameter.
    pub fn start_reduction(&self, carried: Option<GradientsParams>) -> GradientReduction<'_> {
        self.reduction(carried, true)
    }

    /// With nothing left to overlap (after a whole backward pass) the blocking all-reduce is
    /// used: OpenMPI's nonblocking collectives (libnbc) reach about 70% of its tuned blocking
    /// ones' throughput here (`furnace bench allreduce`).
    fn reduction(&self, carried: Option<GradientsParams>, overlapped: bool) -> GradientReduction<'_> {
        GradientReduction {
            parallel: self,
            overlapped,
            receive: Vec::new(),
            carried,
            reduced: GradientsParams::new(),
            to_owner: self.reduces_to_owner(),
            flat: Vec::new(),
            pending: Vec::new(),
            in_flight: VecDeque::new(),
            owner: None,
            scale: 1.0 / self.world.size as f32,
        }
    }

    /// The global gradient norm: from the full averaged gradients that every rank holds, or
    /// under ZeRO-2 and FSDP from each owner's share, summed over ranks.
    pub fn grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(&self, model: &M, grads: &GradientsParams) -> f64 {
        let local = global_grad_norm::<B, M>(model, grads);
        if self.reduces_to_owner() {
            let mut squares = [local * local];
            self.sum(&mut squares);
            squares[0].sqrt()
        } else {
            local
        }
    }

    /// ZeRO-1: keep only the gradients of this rank's parameters (ZeRO-2 already did).
    pub fn drop_unowned<B: AutodiffBackend, M: AutodiffModule<B>>(&self, model: &M, mut grads: GradientsParams) -> GradientsParams {
        if !self.sharded() {
            return grads;
        }
        struct Drop<'a, B: AutodiffBackend> {
            parallel: &'a Parallel,
            grads: &'a mut GradientsParams,
            _backend: std::marker::PhantomData<B>,
        }
        impl<B: AutodiffBackend> PathVisitor<B> for Drop<'_, B> {
            fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
                if !self.parallel.owns(path) {
                    self.grads.remove::<B::InnerBackend, D>(param.id);
                }
            }
        }
        visit_with_paths(model, &mut Drop::<B> { parallel: self, grads: &mut grads, _backend: std::marker::PhantomData });
        grads
    }

    /// After a sharded step: under ZeRO every parameter's new value from its owner (the
    /// all-gather); under FSDP each rank keeps its own and releases the rest.
    pub fn gather_parameters<B: Backend, M: Module<B>>(&self, model: M) -> M {
        match self.fsdp() {
            true => self.release(model, |_| true),
            false => self.gather(model, |_| true),
        }
    }

    /// The parameters whose path `selects` holds, from their owners, on every rank (a
    /// collective: every rank calls it alike).
    pub fn gather<B: Backend, M: Module<B>>(&self, model: M, selects: impl Fn(&str) -> bool) -> M {
        if !self.sharded() {
            return model;
        }
        struct Gather<'a, F>(&'a Parallel, F);
        impl<B: Backend, F: Fn(&str) -> bool> PathMapper<B> for Gather<'_, F> {
            fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                let Some(&owner) = self.0.owners.get(path).filter(|_| (self.1)(path)) else { return param };
                let (id, tensor, mapper) = param.consume();
                let value = broadcast_tensor(self.0.collective.as_ref(), tensor, owner, &self.0.shapes[path]);
                Param::from_mapped_value(id, value, mapper)
            }
        }
        map_with_paths(model, &mut Gather(self, selects))
    }

    /// FSDP: block `index`'s parameters from their owners; `None` gathers those outside every
    /// block (embeddings, final norm, heads), which a step holds throughout.
    pub fn gather_block<B: Backend, M: Module<B>>(&self, model: M, index: Option<usize>) -> M {
        self.gather(model, |path| self.blocks.get(path).copied() == index)
    }

    /// FSDP: the parameters whose path `selects` holds and that another rank owns, replaced by
    /// a one-element placeholder until `gather` brings them back.
    pub fn release<B: Backend, M: Module<B>>(&self, model: M, selects: impl Fn(&str) -> bool) -> M {
        if !self.fsdp() {
            return model;
        }
        struct Release<'a, F>(&'a Parallel, F);
        impl<B: Backend, F: Fn(&str) -> bool> PathMapper<B> for Release<'_, F> {
            fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
                if self.0.owns(path) || !(self.1)(path) {
                    return param;
                }
                let (id, tensor, mapper) = param.consume();
                let placeholder = Tensor::<B, D>::zeros([1; D], &tensor.device()).cast(tensor.dtype());
                let placeholder = if tensor.is_require_grad() { placeholder.require_grad() } else { placeholder };
                Param::from_mapped_value(id, placeholder, mapper)
            }
        }
        map_with_paths(model, &mut Release(self, selects))
    }
}

/// Bytes of the parameters this rank holds now (under FSDP, between steps, about 1/W).
pub fn held_parameter_bytes<B: Backend, M: Module<B>>(model: &M) -> usize {
    struct Count(usize);
    impl<B: Backend> PathVisitor<B> for Count {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<B, D>>) {
            self.0 += param.val().dtype().size() * param.lazy_shape().num_elements();
        }
    }
    let mut count = Count(0);
    visit_with_paths(model, &mut count);
    count.0
}

/// The transport `[distributed] backend` asks for.
pub fn transport(recipe: &Recipe) -> Transport {
    match recipe.distributed.backend {
        CollectiveBackend::Mpi => Transport::Mpi,
        CollectiveBackend::Nccl => Transport::Nccl,
    }
}

/// Ranks other than 0 keep stderr (errors, panics) and drop stdout, as torchtitan logs from
/// rank 0 only: N copies of every line would bury the one that matters.
pub fn quiet_stdout() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let _ = std::io::stdout().flush();
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // Safety: duplicates an open descriptor onto stdout's; both stay valid.
        unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) };
    }
}

/// `root`'s value of `tensor` (of `shape` there: under FSDP the other ranks may hold a
/// placeholder) on every rank, keeping its autodiff status and its dtype (bf16-true's
/// parameters travel as f32, which holds every bf16 value exactly).
fn broadcast_tensor<B: Backend, const D: usize>(
    collective: &dyn Collective,
    tensor: Tensor<B, D>,
    root: usize,
    shape: &[usize],
) -> Tensor<B, D> {
    let (device, trainable, dtype) = (tensor.device(), tensor.is_require_grad(), tensor.dtype());
    let mut values: Vec<f32> = match collective.world().rank == root {
        true => tensor.into_data().convert::<f32>().into_vec().expect("float parameter"),
        false => vec![0.0; shape.iter().product()],
    };
    collective.broadcast(&mut values, root);
    let value = Tensor::<B, D>::from_data(TensorData::new(values, shape.to_vec()), &device).cast(dtype);
    if trainable {
        value.require_grad()
    } else {
        value
    }
}

/// A gradient copied into the current bucket: where its values sit and how to put them back
/// (added to what the reduction already holds for the same parameter).
type Restore = Box<dyn FnOnce(Vec<f32>, &mut GradientsParams)>;

/// Data-parallel sums in flight at most (each holds its bucket's send and receive copies).
const MAX_IN_FLIGHT: usize = 4;

/// Gradients copied to the host bucket by bucket in the model's parameter order (the same on
/// every rank), reduced when a bucket fills, and put back; a data-parallel gradient of a quarter
/// bucket or more is reduced on its own.
pub struct GradientReduction<'a> {
    parallel: &'a Parallel,
    /// Data-parallel sums start without waiting (else each completes at once).
    overlapped: bool,
    /// Where a blocking sum lands (reused: out of place, no copy of the bucket is made).
    receive: Vec<f32>,
    carried: Option<GradientsParams>,
    reduced: GradientsParams,
    to_owner: bool,
    flat: Vec<f32>,
    pending: Vec<(usize, Restore)>,
    /// Data-parallel sums started and not yet put back, oldest first.
    in_flight: VecDeque<(Box<dyn PendingSum + 'a>, Vec<(usize, Restore)>)>,
    /// ZeRO-2: the rank the current bucket is reduced to (a bucket never spans two owners).
    owner: Option<usize>,
    scale: f32,
}

impl GradientReduction<'_> {
    /// Hands over `grads` of `module`'s parameters (a block's, or the whole model's).
    pub fn add<B: AutodiffBackend, M: AutodiffModule<B>>(&mut self, module: &M, grads: GradientsParams) {
        visit_with_paths(module, &mut Part::<B> { reduction: self, grads, _backend: PhantomData });
        // MPI moves a nonblocking sum along only inside its calls.
        self.in_flight.iter_mut().for_each(|(sum, _)| sum.poll());
    }

    /// Every gradient handed over, averaged (under ZeRO-2 and FSDP: this rank's own). `model`
    /// is the whole model, for carried gradients no part held.
    pub fn finish<B: AutodiffBackend, M: AutodiffModule<B>>(mut self, model: &M) -> GradientsParams {
        if let Some(carried) = self.carried.take() {
            self.add(model, carried);
        }
        self.flush();
        while !self.in_flight.is_empty() {
            self.put_back_oldest();
        }
        self.reduced
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let flat = std::mem::take(&mut self.flat);
        match self.owner.take() {
            Some(root) => {
                let mut sums = flat;
                self.parallel.collective.reduce_sum(&mut sums, root);
                if root == self.parallel.world.rank {
                    self.put_back(&sums, pending);
                }
            }
            None => self.start(flat, pending),
        }
    }

    /// Starts the data-parallel sum of `values` (overlapped: putting back the oldest when too
    /// many are in flight).
    fn start(&mut self, values: Vec<f32>, pending: Vec<(usize, Restore)>) {
        if !self.overlapped {
            let mut sums = std::mem::take(&mut self.receive);
            sums.resize(values.len(), 0.0);
            self.parallel.collective.all_reduce_sum_into(&values, &mut sums);
            match <[_; 1]>::try_from(pending) {
                // A gradient reduced alone is averaged back into its own buffer.
                Ok([(_, restore)]) => {
                    let mut values = values;
                    values.iter_mut().zip(&sums).for_each(|(v, sum)| *v = sum * self.scale);
                    restore(values, &mut self.reduced);
                }
                Err(pending) => self.put_back(&sums, pending),
            }
            self.receive = sums;
            return;
        }
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.put_back_oldest();
        }
        let sum = self.parallel.collective.start_all_reduce(values);
        self.in_flight.push_back((sum, pending));
    }

    fn put_back_oldest(&mut self) {
        let (sum, pending) = self.in_flight.pop_front().expect("a sum in flight");
        self.put_back(&sum.wait(), pending);
    }

    fn put_back(&mut self, sums: &[f32], pending: Vec<(usize, Restore)>) {
        let mut start = 0;
        for (len, restore) in pending {
            restore(sums[start..start + len].iter().map(|v| v * self.scale).collect(), &mut self.reduced);
            start += len;
        }
    }
}

/// One part's gradients on their way into the reduction.
struct Part<'r, 'a, B> {
    reduction: &'r mut GradientReduction<'a>,
    grads: GradientsParams,
    _backend: PhantomData<B>,
}

impl<B: AutodiffBackend> PathVisitor<B> for Part<'_, '_, B> {
    fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<B, D>>) {
        let Some(mut grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else { return };
        let reduction = &mut *self.reduction;
        if let Some(earlier) = reduction.carried.as_mut().and_then(|c| c.remove::<B::InnerBackend, D>(param.id)) {
            grad = grad + earlier;
        }
        if reduction.to_owner {
            let owner = reduction.parallel.owners.get(path).copied().unwrap_or(0);
            if reduction.owner.is_some_and(|current| current != owner) {
                reduction.flush();
            }
            reduction.owner = Some(owner);
        }
        let (shape, device, id): (_, _, ParamId) = (grad.shape(), grad.device(), param.id);
        let values: Vec<f32> = grad.into_data().convert::<f32>().into_vec().expect("float gradient");
        let restore: Restore = Box::new(move |values: Vec<f32>, grads: &mut GradientsParams| {
            let value = Tensor::<B::InnerBackend, D>::from_data(TensorData::new(values, shape), &device);
            // A parameter read in two parts (a tied embedding: the head and the input) gets
            // both parts' sums.
            let value = match grads.remove::<B::InnerBackend, D>(id) {
                Some(other) => other + value,
                None => value,
            };
            grads.register::<B::InnerBackend, D>(id, value);
        });
        if !reduction.to_owner && values.len() >= reduction.parallel.bucket_elements / 4 {
            // A gradient of a quarter bucket or more is a large enough message alone: reduced
            // from its own buffer, it skips the bucket's copy (which PyTorch avoids by making
            // gradients views of their bucket).
            let len = values.len();
            reduction.start(values, vec![(len, restore)]);
            return;
        }
        reduction.flat.extend_from_slice(&values);
        reduction.pending.push((values.len(), restore));
        if reduction.flat.len() >= reduction.parallel.bucket_elements {
            reduction.flush();
        }
    }
}
