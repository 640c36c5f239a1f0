//! Training and evaluation on burn autodiff: SGD (momentum, Nesterov, weight decay), Adam and
//! AdamW; constant, step and cosine schedules with linear warm-up; top-1/top-5 accuracy, loss,
//! per-class accuracy and a confusion matrix.
//!
//! The loop reports progress through a [`TrainObserver`], so the caller decides how to show it
//! (the xtask draws progress bars); this crate only emits `tracing` events.

use std::time::Instant;

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamConfig, AdamWConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Int, Tensor, activation};
use serde::{Deserialize, Serialize};

use crate::data::{Batcher, Dataset, rng, shuffled};
use crate::graph::Graph;
use crate::{Error, Result};

/// The optimiser and its hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum OptimizerSettings {
    /// Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.
    Sgd {
        /// Peak learning rate.
        lr: f64,
        /// Momentum (0 disables it).
        #[serde(default)]
        momentum: f64,
        /// Nesterov momentum.
        #[serde(default)]
        nesterov: bool,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
    },
    /// Adam with optional L2 weight decay.
    Adam {
        /// Peak learning rate.
        lr: f64,
        /// L2 penalty added to the gradient.
        #[serde(default)]
        weight_decay: f64,
    },
    /// AdamW (decoupled weight decay).
    Adamw {
        /// Peak learning rate.
        lr: f64,
        /// Decoupled weight decay.
        #[serde(default = "adamw_decay")]
        weight_decay: f64,
    },
}

fn adamw_decay() -> f64 {
    0.01
}

impl OptimizerSettings {
    /// The peak learning rate.
    pub fn lr(&self) -> f64 {
        match *self {
            OptimizerSettings::Sgd { lr, .. }
            | OptimizerSettings::Adam { lr, .. }
            | OptimizerSettings::Adamw { lr, .. } => lr,
        }
    }

    fn init(&self) -> ModuleOptimizer {
        match *self {
            OptimizerSettings::Sgd { momentum, nesterov, weight_decay, .. } => SgdConfig::new()
                .with_momentum((momentum > 0.0).then(|| {
                    // PyTorch's SGD has no dampening by default; burn's default is 0.1.
                    MomentumConfig::new().with_momentum(momentum).with_dampening(0.0).with_nesterov(nesterov)
                }))
                .with_weight_decay((weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay as f32)))
                .init(),
            OptimizerSettings::Adam { weight_decay, .. } => AdamConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay((weight_decay > 0.0).then(|| WeightDecayConfig::new(weight_decay as f32)))
                .init(),
            OptimizerSettings::Adamw { weight_decay, .. } => {
                AdamWConfig::new().with_epsilon(1e-8).with_weight_decay(weight_decay as f32).init()
            }
        }
    }
}

/// How the learning rate changes over training (after warm-up).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Schedule {
    /// The peak rate throughout.
    #[default]
    Constant,
    /// Multiply by `gamma` at each listed epoch.
    Step {
        /// Epochs (0-based) at which the rate drops.
        milestones: Vec<usize>,
        /// Factor applied at each milestone.
        #[serde(default = "tenth")]
        gamma: f64,
    },
    /// Cosine decay from the peak to `min_lr` at the end of training.
    Cosine {
        /// Final learning rate.
        #[serde(default)]
        min_lr: f64,
    },
}

fn tenth() -> f64 {
    0.1
}

/// Everything that defines a training run besides the model and data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch_size: usize,
    /// Optimiser.
    pub optimizer: OptimizerSettings,
    /// Learning-rate schedule.
    #[serde(default)]
    pub schedule: Schedule,
    /// Epochs of linear warm-up from 0 to the peak rate (may be fractional).
    #[serde(default)]
    pub warmup_epochs: f64,
}

impl TrainSettings {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] naming the key.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::setting("epochs", "must be at least 1"));
        }
        if self.batch_size == 0 {
            return Err(Error::setting("batch_size", "must be at least 1"));
        }
        let lr = self.optimizer.lr();
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(Error::setting("optimizer.lr", format!("must be a positive number, got {lr}")));
        }
        match &self.optimizer {
            OptimizerSettings::Sgd { momentum, weight_decay, .. } => {
                if !(0.0..1.0).contains(momentum) {
                    return Err(Error::setting("optimizer.momentum", format!("must be in [0, 1), got {momentum}")));
                }
                if *weight_decay < 0.0 {
                    return Err(Error::setting("optimizer.weight_decay", "must not be negative"));
                }
            }
            OptimizerSettings::Adam { weight_decay, .. } | OptimizerSettings::Adamw { weight_decay, .. } => {
                if *weight_decay < 0.0 {
                    return Err(Error::setting("optimizer.weight_decay", "must not be negative"));
                }
            }
        }
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs <= self.epochs as f64) {
            return Err(Error::setting("warmup_epochs", "must be between 0 and epochs"));
        }
        match &self.schedule {
            Schedule::Step { gamma, .. } if !(gamma.is_finite() && *gamma > 0.0) => {
                Err(Error::setting("schedule.gamma", "must be positive"))
            }
            Schedule::Cosine { min_lr } if !(*min_lr >= 0.0 && *min_lr <= lr) => {
                Err(Error::setting("schedule.min_lr", "must be between 0 and the learning rate"))
            }
            _ => Ok(()),
        }
    }

    /// The learning rate at `progress` epochs into training (fractional: step / steps per epoch).
    pub fn lr_at(&self, progress: f64) -> f64 {
        let peak = self.optimizer.lr();
        if progress < self.warmup_epochs {
            return peak * (progress + 1e-3).min(self.warmup_epochs) / self.warmup_epochs;
        }
        match &self.schedule {
            Schedule::Constant => peak,
            Schedule::Step { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| progress >= m as f64).count();
                peak * gamma.powi(passed as i32)
            }
            Schedule::Cosine { min_lr } => {
                let span = (self.epochs as f64 - self.warmup_epochs).max(1e-9);
                let t = ((progress - self.warmup_epochs) / span).clamp(0.0, 1.0);
                min_lr + 0.5 * (peak - min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// What one epoch did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Training accuracy over the epoch (on augmented batches, in training mode).
    pub train_accuracy: f64,
    /// Validation metrics, when a validation set was given.
    pub validation: Option<Evaluation>,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Wall time of the epoch, seconds.
    pub seconds: f64,
}

/// Receives progress from [`train`].
pub trait TrainObserver {
    /// After every optimisation step.
    fn on_step(&mut self, _epoch: usize, _step: usize, _steps_per_epoch: usize, _loss: f64) {}
    /// After every epoch.
    fn on_epoch(&mut self, _record: &EpochRecord) {}
}

/// An observer that ignores everything.
#[derive(Debug, Default)]
pub struct Quiet;
impl TrainObserver for Quiet {}

/// The run-time side of a call that trains: the device it trains on, the seed of its data order
/// and augmentation, and the observer that hears of its progress. The techniques that train
/// (shrink-prune's `prune`, shrink-quant's QAT) take it beside their settings.
pub struct TrainRun<'a> {
    /// The device (the technique adds autodiff where it trains).
    pub device: &'a Device,
    /// Seed of the data order and augmentation.
    pub seed: u64,
    /// Progress: every step and epoch.
    pub observer: &'a mut dyn TrainObserver,
}

impl std::fmt::Debug for TrainRun<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainRun").field("device", self.device).field("seed", &self.seed).finish_non_exhaustive()
    }
}

/// Cross-entropy of logits `[b, k]` against labels `[b]`, averaged over the batch.
pub fn cross_entropy(logits: Tensor<2>, labels: Tensor<1, Int>) -> Tensor<1> {
    let log_p = activation::log_softmax(logits, 1);
    log_p.gather(1, labels.unsqueeze_dim(1)).mean().neg()
}

/// Hinton's distillation loss on teacher probabilities already softened at `temperature`:
/// `α · T² · KL(p_t ‖ softmax(s/T)) + (1 − α) · CE(s, labels)`, averaged over the batch; the
/// teacher side is detached. It lives here because more than one technique trains with it
/// (shrink-distill's `distill`, shrink-quant's QAT with a teacher), and those crates depend on
/// shrink-core only.
///
/// # Panics
/// If the shapes differ, or `temperature <= 0`.
pub fn distillation_loss(
    student: Tensor<2>,
    teacher_probs: Tensor<2>,
    labels: Tensor<1, Int>,
    temperature: f64,
    alpha: f64,
) -> Tensor<1> {
    assert!(temperature > 0.0, "temperature must be positive");
    assert_eq!(student.dims(), teacher_probs.dims(), "student logits and teacher probabilities differ in shape");
    let [batch, _] = student.dims();
    let p_t = teacher_probs.detach();
    // p·log p is 0 at p = 0; the clamp only keeps log finite there.
    let log_p_t = p_t.clone().clamp_min(1e-30).log();
    let log_p_s = activation::log_softmax(student.clone().div_scalar(temperature), 1);
    let kl = (p_t * (log_p_t - log_p_s)).sum().div_scalar(batch as f64);
    let hard = cross_entropy(student, labels);
    kl.mul_scalar(alpha * temperature * temperature) + hard.mul_scalar(1.0 - alpha)
}

/// The data a training run reads.
#[derive(Clone, Copy, Debug)]
pub struct TrainData<'a> {
    /// Training images.
    pub train: &'a Dataset,
    /// Images evaluated after each epoch, if any.
    pub validation: Option<&'a Dataset>,
    /// Normalisation and augmentation.
    pub batcher: &'a Batcher,
}

/// Trains `graph` on `data.train` with cross-entropy on the labels, evaluating on
/// `data.validation` after each epoch when given. Returns the trained graph (in evaluation mode,
/// on `device`) and one record per epoch.
///
/// `device` is the inference device; training uses its autodiff counterpart. The data order and
/// augmentation are seeded with `seed`.
///
/// # Errors
/// [`Error::InvalidSetting`] for bad settings or data whose image shape is not the graph's;
/// [`Error::RunFailed`] when the loss becomes NaN or infinite (naming the epoch and step).
pub fn train(
    graph: Graph,
    data: TrainData<'_>,
    settings: &TrainSettings,
    device: &Device,
    seed: u64,
    observer: &mut dyn TrainObserver,
) -> Result<(Graph, Vec<EpochRecord>)> {
    train_module(graph, data, settings, device, seed, observer, &mut |model: &Graph, batch: Batch| {
        let logits = model.forward(batch.images);
        Ok((cross_entropy(logits.clone(), batch.labels), logits))
    })
}

/// One training batch, as handed to a [`train_module`] objective.
#[derive(Clone, Debug)]
pub struct Batch<'a> {
    /// Normalised (and, in training, augmented) images `[b, c, h, w]` on the autodiff device.
    pub images: Tensor<4>,
    /// Labels `[b]`.
    pub labels: Tensor<1, Int>,
    /// The images' indices in the training set (to look up anything cached per image).
    pub indices: &'a [usize],
}

/// What a [`train_module`] objective returns for a batch: the loss (averaged over the batch) and
/// the logits that training accuracy is counted on.
pub type LossAndLogits = (Tensor<1>, Tensor<2>);

/// A model [`train_module`] can train: a burn module holding the graph that is evaluated.
///
/// The graph itself is one; so is a graph with extra trained parts (distillation adapters).
pub trait Trainable: Module {
    /// The network being trained.
    fn graph(&self) -> &Graph;

    /// The network as it is evaluated on the validation set after each epoch: the graph itself,
    /// unless training sees it through something (pruning masks) that evaluation must see too.
    fn evaluation_graph(&self) -> Graph {
        self.graph().clone()
    }
}

impl Trainable for Graph {
    fn graph(&self) -> &Graph {
        self
    }
}

/// The training loop behind [`train`], for any [`Trainable`] module and any objective:
/// `objective(model, batch)` returns the batch's loss (averaged over the batch) and the logits
/// that training accuracy is counted on.
///
/// # Errors
/// As [`train`]; whatever `objective` returns.
pub fn train_module<M: Trainable>(
    model: M,
    data: TrainData<'_>,
    settings: &TrainSettings,
    device: &Device,
    seed: u64,
    observer: &mut dyn TrainObserver,
    objective: &mut dyn FnMut(&M, Batch<'_>) -> Result<LossAndLogits>,
) -> Result<(M, Vec<EpochRecord>)> {
    let TrainData { train: train_set, validation, batcher } = data;
    settings.validate()?;
    if train_set.shape != model.graph().input_shape() {
        return Err(Error::setting(
            "data",
            format!("images are {:?}, the model takes {:?}", train_set.shape, model.graph().input_shape()),
        ));
    }
    if train_set.is_empty() {
        return Err(Error::setting("data", "the training set is empty"));
    }
    crate::metrics::check_batch_fits(model.graph(), settings.batch_size.min(train_set.len()), true, "batch_size")?;
    let ad_device = device.clone().autodiff();
    let mut model = model.fork(&ad_device).train();
    let mut optim = settings.optimizer.init();
    let steps = train_set.len().div_ceil(settings.batch_size);
    let mut records = Vec::with_capacity(settings.epochs);
    let mut aug_rng = rng(seed ^ 0xA5A5_5A5A);
    for epoch in 0..settings.epochs {
        let _span = tracing::info_span!("epoch", epoch = epoch + 1).entered();
        let start = Instant::now();
        let order = shuffled(train_set.len(), seed.wrapping_add(epoch as u64 * 7919));
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        let mut lr = settings.lr_at(epoch as f64);
        for (step, chunk) in order.chunks(settings.batch_size).enumerate() {
            lr = settings.lr_at(epoch as f64 + step as f64 / steps as f64);
            let (images, labels) = batcher.batch(train_set, chunk, &ad_device, Some(&mut aug_rng));
            // A handle (not a copy) kept for the diagnosis: the batch as trained, augmentation included.
            let trained_images = images.clone();
            let (loss, logits) = objective(&model, Batch { images, labels: labels.clone(), indices: chunk })?;
            let loss_value: f64 = loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                let source = locate_non_finite(&model.graph().valid(), trained_images.inner())?;
                return Err(Error::RunFailed(format!(
                    "loss is {loss_value} at epoch {} step {}: {source}",
                    epoch + 1,
                    step + 1
                )));
            }
            let hits = count_correct(logits.detach(), labels);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            loss_sum += loss_value * chunk.len() as f64;
            correct += hits;
            seen += chunk.len();
            observer.on_step(epoch + 1, step + 1, steps, loss_value);
        }
        let validation = match validation {
            Some(v) if !v.is_empty() => {
                let eval_graph = model.evaluation_graph().valid().to_device(device);
                Some(evaluate(&eval_graph, v, batcher, settings.batch_size.max(256), device)?)
            }
            _ => None,
        };
        let record = EpochRecord {
            epoch: epoch + 1,
            train_loss: loss_sum / seen as f64,
            train_accuracy: correct as f64 / seen as f64,
            validation,
            lr,
            seconds: start.elapsed().as_secs_f64(),
        };
        tracing::info!(
            epoch = record.epoch,
            train_loss = record.train_loss,
            train_accuracy = record.train_accuracy,
            val_accuracy = record.validation.as_ref().map(|v| v.top1),
            seconds = record.seconds,
            "epoch done"
        );
        observer.on_epoch(&record);
        records.push(record);
        // The last step's update may have been non-finite without any loss showing it yet.
        if let Some(node) = non_finite_parameters(&model.graph().valid())? {
            return Err(Error::RunFailed(format!(
                "the parameters of node `{node}` are not finite after epoch {} (an optimiser step had a \
                 non-finite gradient; lower the learning rate)",
                epoch + 1
            )));
        }
    }
    Ok((model.valid().to_device(device), records))
}

fn non_finite<const D: usize>(t: Tensor<D>) -> Result<bool> {
    Ok(crate::host::floats(t)?.iter().any(|v| !v.is_finite()))
}

/// The first node whose parameters are NaN or infinite.
fn non_finite_parameters(graph: &Graph) -> Result<Option<String>> {
    use crate::graph::Params;
    let bias = |b: &Option<burn::module::Param<Tensor<1>>>| b.as_ref().map_or(Ok(false), |b| non_finite(b.val()));
    for node in &graph.nodes {
        let bad = match &node.params {
            None => false,
            Some(Params::Conv(p)) => non_finite(p.weight.val())? || bias(&p.bias)?,
            Some(Params::Linear(p)) => non_finite(p.weight.val())? || bias(&p.bias)?,
            Some(Params::BatchNorm(bn)) => {
                non_finite(bn.gamma.val())?
                    || non_finite(bn.beta.val())?
                    || non_finite(bn.running_mean.value())?
                    || non_finite(bn.running_var.value())?
            }
        };
        if bad {
            return Ok(Some(node.name.clone()));
        }
    }
    Ok(None)
}

/// Where a non-finite loss came from: the first node with non-finite parameters, else the first
/// node whose output is not finite on the batch, else the objective itself.
fn locate_non_finite(graph: &Graph, images: Tensor<4>) -> Result<String> {
    if let Some(node) = non_finite_parameters(graph)? {
        return Ok(format!("the parameters of node `{node}` are not finite (an earlier step's gradient was not)"));
    }
    if non_finite(images.clone())? {
        return Ok("the input batch is not finite".into());
    }
    let taps: Vec<_> = (0..graph.nodes.len()).collect();
    let (_, outputs) = graph.forward_with_taps(images, &taps);
    for (id, out) in taps.into_iter().zip(outputs) {
        if non_finite(out.flatten())? {
            return Ok(format!("the output of node `{}` is the first that is not finite", graph.nodes[id].name));
        }
    }
    Ok("every node's output is finite: the objective itself is not".into())
}

fn count_correct(logits: Tensor<2>, labels: Tensor<1, Int>) -> usize {
    let pred = logits.argmax(1).squeeze_dim::<1>(1);
    pred.equal(labels).int().sum().into_scalar::<i64>() as usize
}

/// Metrics of a model on a labelled set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Images evaluated.
    pub samples: usize,
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Top-1 accuracy.
    pub top1: f64,
    /// Top-5 accuracy (equal to 1 when there are 5 classes or fewer).
    pub top5: f64,
    /// Accuracy per class (NaN-free: a class with no image gets 0 and count 0).
    pub per_class_accuracy: Vec<f64>,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<usize>>,
}

impl Evaluation {
    /// Number of misclassified images.
    pub fn errors(&self) -> usize {
        self.samples - self.confusion.iter().enumerate().map(|(i, row)| row[i]).sum::<usize>()
    }
}

/// Evaluates `graph` (in evaluation mode) on `data` in batches of `batch_size`.
///
/// # Errors
/// [`Error::InvalidSetting`] if the images do not fit the model or the set is empty.
pub fn evaluate(
    graph: &Graph,
    data: &Dataset,
    batcher: &Batcher,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    if data.shape != graph.input_shape() {
        return Err(Error::setting(
            "data",
            format!("images are {:?}, the model takes {:?}", data.shape, graph.input_shape()),
        ));
    }
    if data.is_empty() {
        return Err(Error::setting("data", "the evaluation set is empty"));
    }
    crate::metrics::check_batch_fits(graph, batch_size.min(data.len()), false, "batch_size")?;
    let classes = graph.num_outputs();
    evaluate_with(data, batcher, batch_size, classes, device, &mut |x| Ok(graph.forward(x)))
}

/// As [`evaluate`], on a frozen CPU plan (its kernels decide the arithmetic: f32, int8, …).
///
/// # Errors
/// As [`evaluate_with`]; [`Error::InputShape`] if the data does not fit the plan.
pub fn evaluate_plan(
    plan: &mut crate::runtime::Plan,
    data: &Dataset,
    batcher: &Batcher,
    batch_size: usize,
    device: &Device,
) -> Result<Evaluation> {
    let classes = plan.output_len();
    evaluate_with(data, batcher, batch_size, classes, device, &mut |x| {
        let batch = x.dims()[0];
        let input = crate::host::floats(x)?;
        let logits = plan.run(&input, batch)?.to_vec();
        Ok(Tensor::from_data(burn::tensor::TensorData::new(logits, [batch, classes]), device))
    })
}

/// As [`evaluate`], with the logits of each batch computed by `forward` (a frozen plan, a
/// quantized model, …) for a model with `classes` outputs.
///
/// # Errors
/// [`Error::InvalidSetting`] for an empty set or more classes than outputs; whatever `forward`
/// returns.
pub fn evaluate_with(
    data: &Dataset,
    batcher: &Batcher,
    batch_size: usize,
    classes: usize,
    device: &Device,
    forward: &mut dyn FnMut(Tensor<4>) -> Result<Tensor<2>>,
) -> Result<Evaluation> {
    if data.is_empty() {
        return Err(Error::setting("data", "the evaluation set is empty"));
    }
    if data.classes > classes {
        return Err(Error::setting("data", format!("{} classes in the data, {classes} model outputs", data.classes)));
    }
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (mut loss_sum, mut top5) = (0.0f64, 0usize);
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(batch_size.max(1)) {
        let (x, y) = batcher.batch(data, chunk, device, None);
        let logits = forward(x)?;
        loss_sum += cross_entropy(logits.clone(), y).into_scalar::<f32>() as f64 * chunk.len() as f64;
        let values = crate::host::floats(logits)?;
        for (row, &i) in values.chunks_exact(classes).zip(chunk) {
            let label = data.labels[i] as usize;
            // Rank of the true class: how many classes score strictly higher (ties favour it).
            let target = row[label];
            let higher = row.iter().filter(|&&v| v > target).count();
            if higher < 5 {
                top5 += 1;
            }
            let pred = row.iter().enumerate().fold(0, |best, (k, &v)| if v > row[best] { k } else { best });
            confusion[label][pred] += 1;
        }
    }
    let n = data.len();
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(c, row)| {
            let total: usize = row.iter().sum();
            if total == 0 { 0.0 } else { row[c] as f64 / total as f64 }
        })
        .collect();
    let correct: usize = (0..classes).map(|c| confusion[c][c]).sum();
    Ok(Evaluation {
        samples: n,
        loss: loss_sum / n as f64,
        top1: correct as f64 / n as f64,
        top5: top5 as f64 / n as f64,
        per_class_accuracy,
        confusion,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(schedule: Schedule, warmup: f64) -> TrainSettings {
        TrainSettings {
            epochs: 10,
            batch_size: 8,
            optimizer: OptimizerSettings::Sgd { lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 0.0 },
            schedule,
            warmup_epochs: warmup,
        }
    }

    #[test]
    fn schedules() {
        let s = settings(Schedule::Step { milestones: vec![5, 8], gamma: 0.1 }, 0.0);
        assert!((s.lr_at(4.9) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(5.0) - 0.01).abs() < 1e-12);
        assert!((s.lr_at(9.0) - 0.001).abs() < 1e-12);
        let c = settings(Schedule::Cosine { min_lr: 0.0 }, 2.0);
        assert!(c.lr_at(0.0) < 0.001);
        assert!((c.lr_at(1.0) - 0.05).abs() < 1e-3);
        assert!((c.lr_at(2.0) - 0.1).abs() < 1e-12);
        assert!((c.lr_at(6.0) - 0.05).abs() < 1e-12);
        assert!(c.lr_at(10.0).abs() < 1e-12);
    }

    #[test]
    fn validation_names_the_key() {
        let mut s = settings(Schedule::Constant, 0.0);
        s.optimizer = OptimizerSettings::Sgd { lr: -1.0, momentum: 0.0, nesterov: false, weight_decay: 0.0 };
        assert!(s.validate().unwrap_err().to_string().contains("optimizer.lr"));
        let mut s = settings(Schedule::Constant, 0.0);
        s.epochs = 0;
        assert!(s.validate().unwrap_err().to_string().contains("epochs"));
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let device = Device::flex();
        let logits = Tensor::<2>::from_floats([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], &device);
        let labels = Tensor::<1, Int>::from_ints([2, 0], &device);
        let got = cross_entropy(logits, labels).into_scalar::<f32>() as f64;
        let lse = (1f64.exp() + 2f64.exp() + 3f64.exp()).ln();
        let expected = ((lse - 3.0) + 3f64.ln()) / 2.0;
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }
}
