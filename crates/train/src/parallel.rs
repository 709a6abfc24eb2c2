//! Data parallelism: one rank per device, each with its own copy of the model (the 4-bit base once per device)
//! and of the optimizer, on its own slice of every step's micro-batches; the LoRA gradients are summed across
//! ranks once per optimizer step, after the local accumulation, so every rank applies the same update.
//!
//! The sum sits behind [`GradientSync`]: [`NcclSync`] is burn's NCCL all-reduce on CUDA (feature `cuda`);
//! [`HostSync`] reads each rank's gradients back, sums them on the host in rank order and uploads the sum — for
//! the CPU and wgpu ranks burn cannot all-reduce, i.e. tests and CPU use, not speed. Both put a host barrier in
//! front of the reduction that a failing rank can break ([`GradientSync::abort`]), so one rank's error stops
//! every rank with that error instead of leaving them waiting.
//!
//! Normalisation: every rank divides its losses by the target tokens of the whole step (all ranks), and rank r
//! takes micro-batches `r·k .. (r+1)·k` of the step's `N·k` with their global indices as dropout seeds, so N
//! ranks × k micro-batches give the losses and update of 1 rank × N·k micro-batches (up to the order of the sum).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use burn::tensor::{Device, Tensor, TensorData};
use optim::FlatTensor;

use crate::TrainError;
use crate::config::{DeviceSpec, TrainConfig};
use crate::family::{Family, TrainModel};
use crate::trainer::{RankStep, device_for_rank, guarded_step, load_for_training, optimizer_config, optimizer_step};

/// One optimizer step as a worker rank runs it.
struct Job<B> {
    batches: Vec<B>,
    first_index: usize,
    step_targets: usize,
    seed: u64,
    lr: f64,
    max_grad_norm: Option<f32>,
    step: u64,
}

/// Ranks 1.. of a data-parallel run, each on its own thread with its own model and optimizer (rank 0 is the
/// trainer's own thread). Empty for a single device.
pub struct Workers<B> {
    sync: Option<Arc<dyn GradientSync>>,
    jobs: Vec<Sender<Job<B>>>,
    results: Option<Receiver<(usize, Result<(), TrainError>)>>,
    handles: Vec<JoinHandle<()>>,
    names: Vec<String>,
    grad_accum: usize,
    max_grad_norm: Option<f32>,
}

impl<B: Clone + Send + 'static> Workers<B> {
    /// No other ranks.
    pub fn none() -> Self {
        Workers {
            sync: None,
            jobs: Vec::new(),
            results: None,
            handles: Vec::new(),
            names: Vec::new(),
            grad_accum: 1,
            max_grad_norm: None,
        }
    }

    /// Starts ranks `1..specs.len()`: each opens its device, loads the model as configured, takes rank 0's
    /// adapter values (`rank0`) and optimizer checkpoint (when resuming), and waits for steps. A rank that cannot
    /// start is an error naming it.
    pub fn start<F: Family>(
        config: &TrainConfig,
        specs: &[DeviceSpec],
        rank0_device: &Device,
        rank0: &F::Model,
        optimizer_checkpoint: Option<PathBuf>,
    ) -> Result<Self, TrainError>
    where
        F::Model: TrainModel<Batch = B>,
    {
        let mut devices = vec![rank0_device.clone()];
        for (rank, spec) in specs.iter().enumerate().skip(1) {
            devices.push(
                device_for_rank(config, *spec).map_err(|e| TrainError::Device(format!("rank {rank} ({spec}): {e}")))?,
            );
        }
        let inner: Vec<Device> = devices.iter().map(|d| d.clone().inner()).collect();
        let sync = sync_for(&inner, specs.iter().all(|s| matches!(s, DeviceSpec::Cuda(_))));
        let adapter = optim::trainable_tensors(rank0)?;
        let (result_tx, results) = channel();
        let mut workers = Workers {
            sync: Some(sync.clone()),
            jobs: Vec::new(),
            results: Some(results),
            handles: Vec::new(),
            names: specs.iter().map(ToString::to_string).collect(),
            grad_accum: config.grad_accum,
            max_grad_norm: (config.max_grad_norm > 0.0).then_some(config.max_grad_norm as f32),
        };
        for (rank, device) in devices.into_iter().enumerate().skip(1) {
            let (job_tx, jobs) = channel::<Job<B>>();
            let (config, adapter, checkpoint) = (config.clone(), adapter.clone(), optimizer_checkpoint.clone());
            let (sync, results, name) = (sync.clone(), result_tx.clone(), specs[rank].to_string());
            workers.jobs.push(job_tx);
            workers.handles.push(std::thread::spawn(move || {
                worker::<F>(rank, &name, &config, device, adapter, checkpoint, sync, jobs, results)
            }));
        }
        for _ in 1..specs.len() {
            let (rank, started) = workers.receive()?;
            started.map_err(|e| {
                TrainError::Device(format!("rank {rank} ({}) could not start: {e}", workers.names[rank]))
            })?;
        }
        Ok(workers)
    }

    fn receive(&self) -> Result<(usize, Result<(), TrainError>), TrainError> {
        let results = self.results.as_ref().expect("workers started");
        results.recv().map_err(|_| TrainError::Device("a data-parallel rank stopped without a word".into()))
    }

    /// The ranks' gradient synchronisation (`None` for a single device).
    pub fn sync(&self) -> Option<&dyn GradientSync> {
        self.sync.as_deref()
    }

    /// Hands ranks 1.. their micro-batches of a step (rank r: `batches[r·k .. (r+1)·k]`).
    pub fn send_step(&self, batches: &[B], step_targets: usize, seed: u64, lr: f64, step: u64) {
        let k = self.grad_accum;
        for (i, jobs) in self.jobs.iter().enumerate() {
            let rank = i + 1;
            let job = Job {
                batches: batches[rank * k..(rank + 1) * k].to_vec(),
                first_index: rank * k,
                step_targets,
                seed,
                lr,
                max_grad_norm: self.max_grad_norm,
                step,
            };
            // A rank that already stopped has reported why; its error comes out of `wait_step`.
            let _ = jobs.send(job);
        }
    }

    /// Waits for ranks 1.. to finish the step; the first failure, naming its rank.
    pub fn wait_step(&self) -> Result<(), TrainError> {
        let mut first = None;
        for _ in 0..self.jobs.len() {
            let (rank, done) = self.receive()?;
            if let Err(e) = done {
                first.get_or_insert(TrainError::Device(format!("rank {rank} ({}): {e}", self.names[rank])));
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Rank `rank` failed: the others stop at their next reduction.
    pub fn abort(&self, rank: usize, message: String) {
        if let Some(sync) = &self.sync {
            sync.abort(rank, message);
        }
    }
}

impl<B> Drop for Workers<B> {
    fn drop(&mut self) {
        self.jobs.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A worker rank: set up, report, then run steps until the trainer stops sending them or a step fails.
#[allow(clippy::too_many_arguments)]
fn worker<F: Family>(
    rank: usize,
    name: &str,
    config: &TrainConfig,
    device: Device,
    adapter: BTreeMap<String, optim::HostTensor>,
    optimizer_checkpoint: Option<PathBuf>,
    sync: Arc<dyn GradientSync>,
    jobs: Receiver<Job<<F::Model as TrainModel>::Batch>>,
    results: Sender<(usize, Result<(), TrainError>)>,
) {
    let setup = || -> Result<_, TrainError> {
        let (loaded, _) = load_for_training::<F>(config, &device)?;
        let model = optim::write_tensors(loaded.model().clone(), &adapter)?;
        let mut optimizer = optimizer_config(config)?.init_on(optim::TensorPages::new(&device))?;
        if let Some(path) = &optimizer_checkpoint {
            optimizer.load(path)?;
        }
        Ok((model, optimizer))
    };
    let (mut model, mut optimizer) = match setup() {
        Ok(ready) => {
            let _ = results.send((rank, Ok(())));
            ready
        }
        Err(e) => {
            sync.abort(rank, e.to_string());
            let _ = results.send((rank, Err(e)));
            return;
        }
    };
    for job in jobs {
        let part = RankStep {
            batches: &job.batches,
            first_index: job.first_index,
            step_targets: job.step_targets,
            sync: Some((&*sync, rank)),
        };
        let last = rank + 1 == config.rank_devices().len();
        let stepped = guarded_step(job.step, config, name, last, || {
            optimizer_step(&model, &mut optimizer, &part, &device, job.seed, (job.lr, job.max_grad_norm), job.step)
        });
        match stepped {
            Ok((updated, _)) => {
                model = updated;
                let _ = results.send((rank, Ok(())));
            }
            Err(e) => {
                sync.abort(rank, e.to_string());
                let _ = results.send((rank, Err(e)));
                return;
            }
        }
    }
}

/// Sums gradients and the step's loss across ranks; every rank gets the totals.
pub trait GradientSync: Send + Sync {
    /// Rank `rank`'s contribution: its summed gradients (the same keys on every rank) and its summed loss.
    fn all_reduce_sum(
        &self,
        rank: usize,
        grads: BTreeMap<String, FlatTensor>,
        loss_sum: f64,
    ) -> Result<(BTreeMap<String, FlatTensor>, f64), TrainError>;

    /// Rank `rank` failed with `message`: every rank waiting in or arriving at a reduction gets the error.
    fn abort(&self, rank: usize, message: String);
}

/// The rank that failed first and why.
#[derive(Debug, Clone)]
struct Failure {
    rank: usize,
    message: String,
}

impl Failure {
    fn error(&self) -> TrainError {
        TrainError::Device(format!("rank {} failed: {}", self.rank, self.message))
    }
}

struct RoundState<T> {
    slots: Vec<Option<T>>,
    arrived: usize,
    generation: u64,
    failed: Option<Failure>,
}

/// A reusable barrier that gathers one value per rank, lets the last arrival combine them, and can be broken by
/// a failing rank.
struct Rounds<T, R> {
    ranks: usize,
    state: Mutex<(RoundState<T>, Option<Arc<R>>)>,
    wake: Condvar,
}

impl<T, R> Rounds<T, R> {
    fn new(ranks: usize) -> Self {
        let state = RoundState { slots: (0..ranks).map(|_| None).collect(), arrived: 0, generation: 0, failed: None };
        Rounds { ranks, state: Mutex::new((state, None)), wake: Condvar::new() }
    }

    /// Deposits `value` for `rank`, waits for every rank, and returns what `combine` (run once, by the last
    /// arrival, on the values in rank order) made of them.
    fn round(&self, rank: usize, value: T, combine: impl FnOnce(Vec<T>) -> R) -> Result<Arc<R>, TrainError> {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = &guard.0.failed {
            return Err(f.error());
        }
        let generation = guard.0.generation;
        guard.0.slots[rank] = Some(value);
        guard.0.arrived += 1;
        if guard.0.arrived == self.ranks {
            let values = guard.0.slots.iter_mut().map(|s| s.take().expect("every rank deposited")).collect();
            guard.1 = Some(Arc::new(combine(values)));
            guard.0.arrived = 0;
            guard.0.generation += 1;
            self.wake.notify_all();
        } else {
            while guard.0.generation == generation && guard.0.failed.is_none() {
                guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            if guard.0.generation == generation
                && let Some(f) = &guard.0.failed
            {
                return Err(f.error());
            }
        }
        Ok(guard.1.clone().expect("the round's result"))
    }

    fn abort(&self, rank: usize, message: String) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        guard.0.failed.get_or_insert(Failure { rank, message });
        self.wake.notify_all();
    }
}

/// Host values of one rank's gradients: shape and values by key.
type HostGrads = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The host all-reduce: for CPU and wgpu ranks (tests, CPU use). Gradients are read back, summed in rank order
/// in f32 (the same sum on every rank) and uploaded to each rank's device.
pub struct HostSync {
    rounds: Rounds<(HostGrads, f64), (HostGrads, f64)>,
}

impl HostSync {
    pub fn new(ranks: usize) -> Self {
        HostSync { rounds: Rounds::new(ranks) }
    }
}

impl GradientSync for HostSync {
    fn all_reduce_sum(
        &self,
        rank: usize,
        grads: BTreeMap<String, FlatTensor>,
        loss_sum: f64,
    ) -> Result<(BTreeMap<String, FlatTensor>, f64), TrainError> {
        let device = grads.values().next().map(|g| g.0.device());
        let mut host = HostGrads::new();
        for (key, g) in grads {
            let shape = g.0.shape().dims::<1>().to_vec();
            let data = g.0.into_data();
            optim::device::count_readback(data.as_bytes().len());
            let values = data.convert::<f32>().try_into_vec::<f32>().expect("f32 gradient");
            host.insert(key, (shape, values));
        }
        let summed = self.rounds.round(rank, (host, loss_sum), |all| {
            let mut all = all.into_iter();
            let (mut sum, mut loss) = all.next().expect("at least one rank");
            for (grads, l) in all {
                loss += l;
                for (key, (_, values)) in grads {
                    if let Some((_, acc)) = sum.get_mut(&key) {
                        acc.iter_mut().zip(values).for_each(|(a, v)| *a += v);
                    }
                }
            }
            (sum, loss)
        })?;
        let Some(device) = device else { return Ok((BTreeMap::new(), summed.1)) };
        let grads = summed
            .0
            .iter()
            .map(|(key, (shape, values))| {
                let t = Tensor::<1>::from_data(TensorData::new(values.clone(), shape.clone()), &device);
                (key.clone(), FlatTensor(t))
            })
            .collect();
        Ok((grads, summed.1))
    }

    fn abort(&self, rank: usize, message: String) {
        self.rounds.abort(rank, message)
    }
}

/// burn's NCCL all-reduce (CUDA ranks): each gradient is summed on the devices; a host barrier first, so a
/// rank that failed before the reduction stops the others (NCCL itself cannot be interrupted).
#[cfg(feature = "cuda")]
pub struct NcclSync {
    devices: Vec<Device>,
    ready: Rounds<f64, f64>,
    _context: burn::tensor::distributed::DistributedContext,
}

#[cfg(feature = "cuda")]
impl NcclSync {
    /// Starts the NCCL communicators for `devices` (one per rank, in rank order; inner devices, no autodiff).
    pub fn new(devices: Vec<Device>) -> Self {
        use burn::tensor::distributed::{DistributedConfig, DistributedContext, ReduceOperation};
        let context =
            DistributedContext::init(devices.clone(), DistributedConfig { all_reduce_op: ReduceOperation::Sum });
        NcclSync { ready: Rounds::new(devices.len()), devices, _context: context }
    }
}

#[cfg(feature = "cuda")]
impl GradientSync for NcclSync {
    fn all_reduce_sum(
        &self,
        rank: usize,
        grads: BTreeMap<String, FlatTensor>,
        loss_sum: f64,
    ) -> Result<(BTreeMap<String, FlatTensor>, f64), TrainError> {
        use burn::tensor::distributed::{ReduceOperation, all_reduce};
        // The loss goes through the host barrier (every rank alive and done with its micro-batches).
        let loss = self.ready.round(rank, loss_sum, |losses| losses.iter().sum())?;
        let grads = grads
            .into_iter()
            .map(|(key, g)| {
                let summed = all_reduce(g.0, ReduceOperation::Sum, self.devices.clone()).resolve();
                (key, FlatTensor(summed))
            })
            .collect();
        Ok((grads, *loss))
    }

    fn abort(&self, rank: usize, message: String) {
        self.ready.abort(rank, message)
    }
}

/// The synchronisation for `devices` (inner devices, in rank order): NCCL when every rank is a CUDA device
/// (in a build with the `cuda` feature), the host sum otherwise.
pub fn sync_for(devices: &[Device], all_cuda: bool) -> Arc<dyn GradientSync> {
    #[cfg(feature = "cuda")]
    if all_cuda {
        return Arc::new(NcclSync::new(devices.to_vec()));
    }
    let _ = all_cuda;
    Arc::new(HostSync::new(devices.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(values: &[f32]) -> FlatTensor {
        FlatTensor(Tensor::<1>::from_data(TensorData::new(values.to_vec(), [values.len()]), &Device::flex()))
    }

    fn values(g: &FlatTensor) -> Vec<f32> {
        g.0.clone().into_data().try_into_vec::<f32>().unwrap()
    }

    /// Three ranks on threads: every rank gets the rank-ordered sum of gradients and losses, round after round.
    #[test]
    fn host_sync_sums_in_rank_order_for_every_rank() {
        let sync = Arc::new(HostSync::new(3));
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let sync = sync.clone();
                std::thread::spawn(move || {
                    (0..4)
                        .map(|round| {
                            let r = (rank + 1) as f32 * (round + 1) as f32;
                            let grads = BTreeMap::from([("a".to_string(), flat(&[r, -r])), ("b".into(), flat(&[0.5]))]);
                            let (sum, loss) = sync.all_reduce_sum(rank, grads, r as f64).unwrap();
                            (values(&sum["a"]), values(&sum["b"]), loss)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for handle in handles {
            for (round, (a, b, loss)) in handle.join().unwrap().into_iter().enumerate() {
                let total = 6.0 * (round + 1) as f32;
                assert_eq!((a, b, loss), (vec![total, -total], vec![1.5], total as f64));
            }
        }
    }

    /// A rank that fails breaks the barrier: the ranks waiting get one error naming it, and so does every
    /// later round.
    #[test]
    fn a_failing_rank_stops_the_others() {
        let sync = Arc::new(HostSync::new(3));
        let waiting: Vec<_> = (0..2)
            .map(|rank| {
                let sync = sync.clone();
                std::thread::spawn(move || sync.all_reduce_sum(rank, BTreeMap::new(), 1.0).map(|_| ()).unwrap_err())
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        sync.abort(2, "the device ran out of memory".into());
        for handle in waiting {
            let err = handle.join().unwrap().to_string();
            assert!(err.contains("rank 2 failed: the device ran out of memory"), "{err}");
        }
        assert!(sync.all_reduce_sum(0, BTreeMap::new(), 1.0).is_err());
    }
}
