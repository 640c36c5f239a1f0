//! Size, cost and speed of a graph, measured in one place for every report.
//!
//! Conventions:
//! - **MACs**: one multiply and one add. Only convolutions and linear layers are counted (batch
//!   norm folds into the convolution before deployment; ReLU, pooling and adds are memory-bound
//!   and are not multiply-adds). FLOPs = 2 × MACs.
//! - **Parameters** are the trainable tensors (weights, biases, batch-norm γ and β); the
//!   running statistics of batch norms are counted in **bytes** but not in parameters, as
//!   PyTorch's `numel` over `parameters()`.
//! - **Bytes** are at the storage the model really uses: f32 here, 4 bytes per value.
//! - **Latency** is wall time of a forward pass including the read-back of the output, after
//!   warm-up; median and 90th percentile over repeats. burn's forward and shrink's frozen CPU
//!   plan are measured side by side, each labelled with what ran it.

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use crate::graph::{Graph, Op, Params, ValueShape};
use crate::{BackendKind, Result};

/// Size and cost of one parameterised layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerStats {
    /// Node name.
    pub name: String,
    /// Op kind (`conv2d`, `linear`, `batch_norm2d`).
    pub kind: String,
    /// Trainable values.
    pub params: usize,
    /// Trainable values that are not exactly zero.
    pub nonzeros: usize,
    /// Bytes stored (parameters and buffers).
    pub bytes: usize,
    /// Multiply-accumulates per image.
    pub macs: u64,
    /// Output shape, batch excluded.
    pub output: Vec<usize>,
}

/// Size and cost of a whole graph.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelStats {
    /// Per parameterised layer, in graph order.
    pub layers: Vec<LayerStats>,
    /// Total trainable values.
    pub params: usize,
    /// Total non-zero trainable values.
    pub nonzeros: usize,
    /// Total bytes stored.
    pub bytes: usize,
    /// Total multiply-accumulates per image.
    pub macs: u64,
}

impl ModelStats {
    /// FLOPs per image (2 × MACs).
    pub fn flops(&self) -> u64 {
        2 * self.macs
    }
}

fn values_and_nonzeros<const D: usize>(t: Tensor<D>) -> Result<(usize, usize)> {
    let v = crate::host::floats(t)?;
    Ok((v.len(), v.iter().filter(|x| **x != 0.0).count()))
}

/// Multiply-adds per image of a conv or linear layer whose output has shape `output` (0 for any
/// other op): the one formula the reports and the plan's threading use.
pub fn layer_macs(op: &Op, output: ValueShape) -> u64 {
    match (op, output) {
        (&Op::Conv2d { in_channels, kernel, groups, .. }, ValueShape::Map { channels, height, width }) => {
            (channels * height * width * (in_channels / groups) * kernel[0] * kernel[1]) as u64
        }
        (&Op::Linear { in_features, out_features, .. }, _) => (in_features * out_features) as u64,
        _ => 0,
    }
}

/// Parameters, non-zeros, bytes and MACs of every layer of `graph`.
///
/// # Errors
/// [`crate::Error::InvalidGraph`] if shape inference fails.
pub fn model_stats(graph: &Graph) -> Result<ModelStats> {
    let shapes = graph.shapes()?;
    let mut layers = Vec::new();
    for (id, node) in graph.layers() {
        let out = shapes[id];
        let (params, nonzeros, buffers, macs) = match (&node.params, &node.op) {
            (Some(Params::Conv(p)), Op::Conv2d { .. }) => {
                let (n, nz) = values_and_nonzeros(p.weight.val())?;
                let (bn, bnz) = p.bias.as_ref().map_or(Ok((0, 0)), |b| values_and_nonzeros(b.val()))?;
                (n + bn, nz + bnz, 0, layer_macs(&node.op, out))
            }
            (Some(Params::Linear(p)), Op::Linear { .. }) => {
                let (n, nz) = values_and_nonzeros(p.weight.val())?;
                let (bn, bnz) = p.bias.as_ref().map_or(Ok((0, 0)), |b| values_and_nonzeros(b.val()))?;
                (n + bn, nz + bnz, 0, layer_macs(&node.op, out))
            }
            (Some(Params::BatchNorm(bn)), _) => {
                let (g, gz) = values_and_nonzeros(bn.gamma.val())?;
                let (b, bz) = values_and_nonzeros(bn.beta.val())?;
                (g + b, gz + bz, 2 * g, 0)
            }
            _ => continue,
        };
        layers.push(LayerStats {
            name: node.name.clone(),
            kind: node.op.kind().to_string(),
            params,
            nonzeros,
            bytes: 4 * (params + buffers),
            macs,
            output: out.dims(),
        });
    }
    Ok(ModelStats {
        params: layers.iter().map(|l| l.params).sum(),
        nonzeros: layers.iter().map(|l| l.nonzeros).sum(),
        bytes: layers.iter().map(|l| l.bytes).sum(),
        macs: layers.iter().map(|l| l.macs).sum(),
        layers,
    })
}

/// How to measure latency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySettings {
    /// Batch sizes to measure (e.g. 1 and 32).
    #[serde(default = "default_batches")]
    pub batch_sizes: Vec<usize>,
    /// Untimed runs first.
    #[serde(default = "default_warmup")]
    pub warmup: usize,
    /// Timed runs.
    #[serde(default = "default_repeats")]
    pub repeats: usize,
}

fn default_batches() -> Vec<usize> {
    vec![1, 32]
}
fn default_warmup() -> usize {
    3
}
fn default_repeats() -> usize {
    20
}

impl Default for LatencySettings {
    fn default() -> Self {
        Self { batch_sizes: default_batches(), warmup: default_warmup(), repeats: default_repeats() }
    }
}

/// Latency of a forward pass at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// What ran it: `burn-flex`, `burn-ndarray`, `burn-wgpu`, or `cpu-plan` (shrink's frozen plan).
    pub runner: String,
    /// Images per forward pass.
    pub batch_size: usize,
    /// CPU threads the backend was allowed.
    pub threads: usize,
    /// Median over repeats, milliseconds.
    pub median_ms: f64,
    /// 90th percentile, milliseconds.
    pub p90_ms: f64,
    /// Timed repeats.
    pub repeats: usize,
}

/// Measures burn's forward pass of `graph` on `backend` at each batch size of `settings`, with
/// random inputs. The output is read back each time, so asynchronous backends are timed to
/// completion.
///
/// # Errors
/// As [`BackendKind::device`].
pub fn measure_latency(graph: &Graph, backend: BackendKind, settings: &LatencySettings) -> Result<Vec<Latency>> {
    let device: Device = backend.device()?;
    let model = graph.clone().valid().to_device(&device);
    let [c, h, w] = graph.input_shape();
    let mut out = Vec::new();
    for &batch in &settings.batch_sizes {
        // Inputs from a local generator: timing draws nothing from the backend's own.
        let x =
            crate::init::InitRng::seeded(0).tensor([batch.max(1), c, h, w], Distribution::Normal(0.0, 1.0), &device);
        for _ in 0..settings.warmup {
            crate::host::wait_for(model.forward(x.clone()))?;
        }
        let mut times: Vec<f64> = (0..settings.repeats.max(1))
            .map(|_| {
                let start = Instant::now();
                crate::host::wait_for(model.forward(x.clone()))?;
                Ok(start.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_>>()?;
        times.sort_by(f64::total_cmp);
        let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        out.push(Latency {
            runner: backend.runner_label().to_string(),
            batch_size: batch.max(1),
            threads: rayon::current_num_threads(),
            median_ms: pick(0.5),
            p90_ms: pick(0.9),
            repeats: times.len(),
        });
    }
    Ok(out)
}

/// Measures the frozen CPU plan of `graph` ([`crate::runtime::freeze_with`]) at each batch size
/// of `settings`, on `threads` threads, with random inputs; labelled `cpu-plan`.
///
/// # Errors
/// As [`crate::runtime::freeze_with`].
pub fn measure_plan_latency(graph: &Graph, threads: usize, settings: &LatencySettings) -> Result<Vec<Latency>> {
    use crate::runtime::{FreezeOptions, KernelRegistry, freeze_with};
    let mut plan = freeze_with(graph, &KernelRegistry::default(), &FreezeOptions { threads })?;
    measure_frozen_latency(&mut plan, graph.input_shape(), "cpu-plan", settings)
}

/// Measures an already frozen plan (e.g. one on integer kernels) at each batch size of
/// `settings`, with a fixed input of `input_shape` images; labelled `runner`.
///
/// # Errors
/// [`crate::Error::InputShape`] if `input_shape` is not the plan's.
pub fn measure_frozen_latency(
    plan: &mut crate::runtime::Plan,
    input_shape: [usize; 3],
    runner: &str,
    settings: &LatencySettings,
) -> Result<Vec<Latency>> {
    let per = input_shape.iter().product::<usize>();
    let mut out = Vec::new();
    for &batch in &settings.batch_sizes {
        let batch = batch.max(1);
        // A fixed pseudo-random input: the plan's speed does not depend on the values.
        let input: Vec<f32> = (0..batch * per).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        for _ in 0..settings.warmup {
            plan.run(&input, batch)?;
        }
        let mut times: Vec<f64> = Vec::with_capacity(settings.repeats.max(1));
        for _ in 0..settings.repeats.max(1) {
            let start = Instant::now();
            plan.run(&input, batch)?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        out.push(Latency {
            runner: runner.into(),
            batch_size: batch,
            threads: plan.threads(),
            median_ms: pick(0.5),
            p90_ms: pick(0.9),
            repeats: times.len(),
        });
    }
    Ok(out)
}

/// Size, sparsity and value range of one float parameter of any burn module.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParamReport {
    /// Path in the module, e.g. `fc1.weight` (for a graph: `nodes.3.params.Linear.weight`).
    pub path: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub values: usize,
    /// Values that are not exactly zero.
    pub nonzeros: usize,
    /// Bytes as stored now (f32).
    pub bytes: usize,
    /// Smallest value.
    pub min: f32,
    /// Largest value.
    pub max: f32,
}

impl ParamReport {
    /// Fraction of the values that are zero.
    pub fn sparsity(&self) -> f64 {
        1.0 - self.nonzeros as f64 / self.values.max(1) as f64
    }
}

/// Every float parameter of `module` — any burn module, a user's own struct as well as a
/// [`Graph`] — with its path, shape, non-zeros, bytes and range, in visiting order (what
/// pruning and weight-only quantization of a module change, in one table).
///
/// # Errors
/// [`crate::Error::TensorRead`] when a parameter cannot be read.
pub fn param_report<M: Module>(module: &M) -> Result<Vec<ParamReport>> {
    struct Report {
        path: Vec<String>,
        out: Vec<ParamReport>,
        error: Option<crate::Error>,
    }
    impl burn::module::ModuleVisitor for Report {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let tensor = param.val();
            let v = match crate::host::floats(tensor.clone()) {
                Ok(v) => v,
                Err(e) => {
                    self.error.get_or_insert(e);
                    return;
                }
            };
            self.out.push(ParamReport {
                path: self.path.join("."),
                shape: tensor.dims().to_vec(),
                values: v.len(),
                nonzeros: v.iter().filter(|x| **x != 0.0).count(),
                bytes: 4 * v.len(),
                min: v.iter().copied().fold(f32::INFINITY, f32::min),
                max: v.iter().copied().fold(f32::NEG_INFINITY, f32::max),
            });
        }
    }
    let mut report = Report { path: Vec::new(), out: Vec::new(), error: None };
    module.visit(&mut report);
    match report.error {
        Some(e) => Err(e),
        None => Ok(report.out),
    }
}

/// Memory the system can still give this process, from `MemAvailable` in `/proc/meminfo`
/// (Linux); `None` where that is not known.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes of the f32 activations one forward pass of `batch` images keeps (every node's output,
/// as autodiff keeps them for the backward pass; the input included).
///
/// # Errors
/// As [`Graph::shapes`].
pub fn activation_bytes(graph: &Graph, batch: usize) -> Result<u64> {
    let per_image: u64 = graph.shapes()?.iter().map(|s| s.numel() as u64).sum();
    Ok(per_image.saturating_mul(batch as u64).saturating_mul(4))
}

/// Refuses a batch whose activations — twice over when `training`, for their gradients — would
/// not fit in the memory available now, before anything is allocated.
///
/// # Errors
/// [`crate::Error::InvalidSetting`] on `key`, with the sizes.
pub fn check_batch_fits(graph: &Graph, batch: usize, training: bool, key: &str) -> Result<()> {
    let Some(available) = available_memory() else { return Ok(()) };
    let need = activation_bytes(graph, batch)?.saturating_mul(if training { 2 } else { 1 });
    if need > available {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(crate::Error::setting(
            key,
            format!(
                "a batch of {batch} needs about {:.1} GiB of activations{}, more than the {:.1} GiB of memory available; \
                 use a smaller batch",
                gib(need),
                if training { " and gradients" } else { "" },
                gib(available)
            ),
        ));
    }
    Ok(())
}
