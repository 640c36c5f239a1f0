//! Distilling one or more frozen teacher graphs into a student graph on the core training loop.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};
use shrink_core::graph::{Activation, Graph, NodeId, ValueShape};
use shrink_core::train::{
    Batch, EpochRecord, LossAndLogits, TrainData, TrainObserver, TrainSettings, Trainable, train_module,
};

use crate::losses::{attention_loss, distillation_loss, hint_loss, soft_targets};
use crate::{Error, Result};

/// A pair of features compared during distillation, named by node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturePair {
    /// Node of the student whose output is compared.
    pub student: String,
    /// Node of the (first) teacher whose output it is compared with.
    pub teacher: String,
    /// Factor on this pair's loss.
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// What the student learns from besides the labels.
#[derive(Clone, Debug, PartialEq)]
pub struct DistillSettings {
    /// Softening temperature T of the output distillation (> 0).
    pub temperature: f64,
    /// Weight α of the soft (teacher) term; `1 − α` goes to the labels. In [0, 1].
    pub alpha: f64,
    /// FitNets hints: the student's feature, through a learned 1×1 conv when the channel counts
    /// differ, regressed on the first teacher's by mean squared error.
    pub hints: Vec<FeaturePair>,
    /// Attention transfer between spatial attention maps of equal size (weights of about 1000
    /// are usual).
    pub attention: Vec<FeaturePair>,
}

impl Default for DistillSettings {
    fn default() -> Self {
        DistillSettings { temperature: 4.0, alpha: 0.9, hints: Vec::new(), attention: Vec::new() }
    }
}

/// A frozen teacher and its weight in the ensemble.
#[derive(Debug, Clone)]
pub struct Teacher {
    /// The trained network (evaluated in inference mode, without autodiff).
    pub graph: Graph,
    /// Weight of its softened outputs in the ensemble mean.
    pub weight: f64,
}

/// One learned adapter of a hint pair.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdapterInfo {
    /// The student node.
    pub student: String,
    /// The teacher node.
    pub teacher: String,
    /// Channels in (student) and out (teacher).
    pub channels: [usize; 2],
}

/// The outcome of [`distill`].
#[derive(Debug)]
pub struct Distilled {
    /// The trained student, in inference mode (adapters dropped).
    pub student: Graph,
    /// One record per epoch.
    pub history: Vec<EpochRecord>,
    /// Whether the teachers' softened outputs were computed once before training and reused
    /// every epoch (possible without augmentation and without feature pairs).
    pub teacher_outputs_cached: bool,
    /// The 1×1 conv adapters learned for hint pairs whose channel counts differ.
    pub adapters: Vec<AdapterInfo>,
}

/// The student with the parts trained only for distillation. A burn module, so one optimiser
/// steps both.
#[derive(Module, Debug)]
pub struct Learner {
    /// The network being distilled into.
    pub student: Graph,
    /// One 1×1 conv per hint pair whose channel counts differ, in [`DistillSettings::hints`] order.
    pub adapters: Vec<Conv2d>,
}

impl Trainable for Learner {
    fn graph(&self) -> &Graph {
        &self.student
    }
}

/// A feature pair resolved to node ids and shapes.
struct Resolved {
    student: NodeId,
    teacher: NodeId,
    adapter: Option<usize>,
    weight: f64,
}

fn resolve(
    pairs: &[FeaturePair],
    key: &str,
    student: &Graph,
    teacher: &Graph,
    attention: bool,
) -> Result<(Vec<Resolved>, Vec<AdapterInfo>)> {
    let s_shapes = student.shapes()?;
    let t_shapes = teacher.shapes()?;
    let mut out = Vec::new();
    let mut adapters = Vec::new();
    for (i, p) in pairs.iter().enumerate() {
        let at = format!("{key}[{i}]");
        if !(p.weight.is_finite() && p.weight >= 0.0) {
            return Err(Error::Setting(format!("{at}.weight: must be finite and non-negative, got {}", p.weight)));
        }
        let s = student.node_id(&p.student).map_err(|_| Error::UnknownNode {
            key: format!("{at}.student"),
            role: "student",
            name: p.student.clone(),
            known: sample_names(student),
        })?;
        let t = teacher.node_id(&p.teacher).map_err(|_| Error::UnknownNode {
            key: format!("{at}.teacher"),
            role: "teacher",
            name: p.teacher.clone(),
            known: sample_names(teacher),
        })?;
        let (ss, ts) = (s_shapes[s], t_shapes[t]);
        let spatial = |v: ValueShape| match v {
            ValueShape::Map { height, width, .. } => [height, width],
            ValueShape::Flat { .. } => [1, 1],
        };
        if attention && !(matches!(ss, ValueShape::Map { .. }) && matches!(ts, ValueShape::Map { .. })) {
            return Err(Error::Setting(format!(
                "{at}: attention transfer needs feature maps; `{}` gives {:?}, `{}` gives {:?}",
                p.student, ss, p.teacher, ts
            )));
        }
        if spatial(ss) != spatial(ts) {
            return Err(Error::Setting(format!(
                "{at}: spatial sizes differ: student `{}` is {:?}, teacher `{}` is {:?}; pick nodes at the same resolution",
                p.student,
                ss.dims(),
                p.teacher,
                ts.dims()
            )));
        }
        let adapter = (!attention && ss.channels() != ts.channels()).then(|| {
            adapters.push(AdapterInfo {
                student: p.student.clone(),
                teacher: p.teacher.clone(),
                channels: [ss.channels(), ts.channels()],
            });
            adapters.len() - 1
        });
        out.push(Resolved { student: s, teacher: t, adapter, weight: p.weight });
    }
    Ok((out, adapters))
}

fn sample_names(g: &Graph) -> String {
    let names: Vec<&str> = g.nodes.iter().skip(1).map(|n| n.name.as_str()).collect();
    let shown: Vec<&str> = names.iter().copied().take(16).collect();
    let more = if names.len() > shown.len() { format!(", … ({} in all)", names.len()) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

fn as_map(a: Activation) -> Tensor<4> {
    match a {
        Activation::Map(t) => t,
        Activation::Flat(t) => {
            let [b, f] = t.dims();
            t.reshape([b, f, 1, 1])
        }
    }
}

/// Checks that the hint and attention pairs of `settings` name nodes of `student` and `teacher`
/// whose shapes can be compared, without training anything (a quick check before teachers are
/// trained). Returns the adapters [`distill`] would learn.
///
/// # Errors
/// As [`distill`], for the pairs.
pub fn check_pairs(student: &Graph, teacher: &Graph, settings: &DistillSettings) -> Result<Vec<AdapterInfo>> {
    resolve(&settings.attention, "attention", student, teacher, true)?;
    Ok(resolve(&settings.hints, "hints", student, teacher, false)?.1)
}

/// Checks the settings and that every teacher fits the student.
fn check(student: &Graph, teachers: &[Teacher], settings: &DistillSettings) -> Result<()> {
    let t = settings.temperature;
    if !(t.is_finite() && t > 0.0) {
        return Err(Error::Setting(format!("temperature: must be a positive number, got {t}")));
    }
    if !(0.0..=1.0).contains(&settings.alpha) {
        return Err(Error::Setting(format!("alpha: expected a value in [0, 1], got {}", settings.alpha)));
    }
    if teachers.is_empty() {
        return Err(Error::Setting("teachers: at least one teacher is needed".into()));
    }
    for (i, teacher) in teachers.iter().enumerate() {
        if !(teacher.weight.is_finite() && teacher.weight > 0.0) {
            return Err(Error::Setting(format!("teachers[{i}].weight: must be positive, got {}", teacher.weight)));
        }
        if teacher.graph.input_shape() != student.input_shape() || teacher.graph.num_outputs() != student.num_outputs()
        {
            return Err(Error::Setting(format!(
                "teachers[{i}]: takes {:?} and gives {} outputs; the student takes {:?} and gives {}",
                teacher.graph.input_shape(),
                teacher.graph.num_outputs(),
                student.input_shape(),
                student.num_outputs()
            )));
        }
    }
    Ok(())
}

/// The ensemble's prediction as log-probabilities: `log Σᵢ wᵢ softmax(tᵢ)` (weights normalised).
/// Usable as logits: its arg-max is the ensemble's vote, its cross-entropy the ensemble's
/// negative log-likelihood.
pub fn ensemble_log_probs(teachers: &[Teacher], images: Tensor<4>) -> Tensor<2> {
    let logits: Vec<Tensor<2>> = teachers.iter().map(|t| t.graph.forward(images.clone())).collect();
    let weights: Vec<f64> = teachers.iter().map(|t| t.weight).collect();
    soft_targets(&logits, &weights, 1.0).clamp_min(1e-30).log()
}

/// A 1×1 conv adapter `[c_in → c_out]`, initialised as burn's `Conv2dConfig` default does
/// (Kaiming uniform with gain 1/√3: weights and bias uniform in ±1/√c_in), but from a host
/// generator seeded by `seed`, not the device's: the same seed gives the same adapter on every
/// backend.
fn adapter(channels: [usize; 2], seed: u64, device: &Device) -> Conv2d {
    use rand::Rng;
    let [c_in, c_out] = channels;
    let bound = 1.0 / (c_in as f32).sqrt();
    let mut rng = shrink_core::data::rng(seed);
    let mut draw = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-bound..bound)).collect() };
    let weight = draw(c_out * c_in);
    let bias = draw(c_out);
    let mut conv = Conv2dConfig::new(channels, [1, 1]).init(device);
    conv.weight = Param::from_tensor(Tensor::from_data(TensorData::new(weight, [c_out, c_in, 1, 1]), device));
    conv.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias, [c_out]), device)));
    conv
}

/// Trains `student` to match the teachers (softened outputs, and the hint and attention pairs
/// of `settings`) and the labels, with the core training loop: same optimiser, schedule, data
/// order and augmentation as [`shrink_core::train::train`] with the same settings and seed.
///
/// Teachers run in inference mode without autodiff, so no gradient reaches them. Feature pairs
/// name nodes of the student and of the first teacher. Without augmentation and feature pairs
/// the teachers' softened outputs are computed once for the whole training set and reused.
///
/// # Errors
/// [`Error::Setting`] for a bad temperature, α or weight, or a pair whose shapes cannot be
/// compared; [`Error::UnknownNode`] for a pair naming a node that does not exist; training
/// errors from shrink-core (a NaN loss names the epoch and step).
// The arguments of `shrink_core::train::train` plus the teachers and the distillation settings.
#[allow(clippy::too_many_arguments)]
pub fn distill(
    student: Graph,
    teachers: &[Teacher],
    data: TrainData<'_>,
    train: &TrainSettings,
    settings: &DistillSettings,
    device: &Device,
    seed: u64,
    observer: &mut dyn TrainObserver,
) -> Result<Distilled> {
    check(&student, teachers, settings)?;
    let teachers: Vec<Teacher> =
        teachers.iter().map(|t| Teacher { graph: t.graph.valid().to_device(device), weight: t.weight }).collect();
    let first = &teachers[0].graph;
    let (hints, adapter_info) = resolve(&settings.hints, "hints", &student, first, false)?;
    let (attention, _) = resolve(&settings.attention, "attention", &student, first, true)?;
    let weights: Vec<f64> = teachers.iter().map(|t| t.weight).collect();
    let temperature = settings.temperature;
    let student_taps: Vec<NodeId> = hints.iter().chain(&attention).map(|p| p.student).collect();
    let teacher_taps: Vec<NodeId> = hints.iter().chain(&attention).map(|p| p.teacher).collect();

    // Cache the soft targets of the whole training set when every epoch would recompute them
    // identically (no augmentation, no features to tap).
    let cache = (!data.batcher.augmentation.is_active() && teacher_taps.is_empty())
        .then(|| soft_targets_of_set(&teachers, &weights, temperature, data, device))
        .transpose()?;
    if cache.is_some() {
        tracing::info!(
            images = data.train.len(),
            teachers = teachers.len(),
            "teacher outputs cached: no augmentation, so they are computed once and reused every epoch"
        );
    }

    let adapters: Vec<Conv2d> = adapter_info
        .iter()
        .enumerate()
        .map(|(i, a)| adapter(a.channels, seed ^ (0xADA9_0000 + i as u64), device))
        .collect();
    let learner = Learner { student, adapters };
    let mut objective = |m: &Learner, batch: Batch<'_>| -> shrink_core::Result<LossAndLogits> {
        let (logits, s_feats) = m.student.forward_with_taps(batch.images.clone(), &student_taps);
        let (targets, t_feats) = match &cache {
            Some(all) => {
                let idx: Vec<i64> = batch.indices.iter().map(|&i| i as i64).collect();
                let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [batch.indices.len()]), device);
                (all.clone().select(0, idx), Vec::new())
            }
            None => {
                let x = batch.images.clone().inner();
                let mut t_logits = Vec::with_capacity(teachers.len());
                let mut t_feats = Vec::new();
                for (i, t) in teachers.iter().enumerate() {
                    let taps: &[NodeId] = if i == 0 { &teacher_taps } else { &[] };
                    let (l, f) = t.graph.forward_with_taps(x.clone(), taps);
                    t_logits.push(l);
                    if i == 0 {
                        t_feats = f;
                    }
                }
                (soft_targets(&t_logits, &weights, temperature), t_feats)
            }
        };
        // Teacher tensors carry no autodiff: they enter the student's graph as constants.
        let targets = targets.autodiff();
        let mut loss = distillation_loss(logits.clone(), targets, batch.labels, temperature, settings.alpha);
        let mut feats = s_feats.into_iter().zip(t_feats.into_iter().map(|t| as_map(t).autodiff()));
        for pair in &hints {
            let (s, t) = feats.next().expect("one tap per pair");
            let mut s = as_map(s);
            if let Some(a) = pair.adapter {
                s = m.adapters[a].forward(s);
            }
            loss = loss + hint_loss(s, t).mul_scalar(pair.weight);
        }
        for pair in &attention {
            let (s, t) = feats.next().expect("one tap per pair");
            loss = loss + attention_loss(as_map(s), t).mul_scalar(pair.weight);
        }
        Ok((loss, logits))
    };
    let (learner, history) = train_module(learner, data, train, device, seed, observer, &mut objective)?;
    Ok(Distilled { student: learner.student, history, teacher_outputs_cached: cache.is_some(), adapters: adapter_info })
}

/// Soft targets `[n, classes]` of every training image, in the set's order.
fn soft_targets_of_set(
    teachers: &[Teacher],
    weights: &[f64],
    temperature: f64,
    data: TrainData<'_>,
    device: &Device,
) -> Result<Tensor<2>> {
    let indices: Vec<usize> = (0..data.train.len()).collect();
    let mut parts = Vec::new();
    for chunk in indices.chunks(256) {
        let (x, _) = data.batcher.batch(data.train, chunk, device, None);
        let logits: Vec<Tensor<2>> = teachers.iter().map(|t| t.graph.forward(x.clone())).collect();
        parts.push(soft_targets(&logits, weights, temperature));
    }
    let all = Tensor::cat(parts, 0);
    let values = shrink_core::host::floats(all.clone())?;
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "teacher soft target of training image {}",
            bad / teachers[0].graph.num_outputs().max(1)
        )));
    }
    Ok(all)
}
