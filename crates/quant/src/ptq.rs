//! Static post-training quantization of a graph: batch norms folded, per-channel (or per-tensor)
//! symmetric or asymmetric weights, per-tensor u8 (or i8) activations calibrated on data,
//! per-layer overrides by node name.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};
use shrink_core::graph::{Activation, ForwardHooks, Graph, NodeId, Op};
use shrink_core::runtime::{FreezeOptions, KernelRegistry, Plan, freeze_with};

use crate::calibrate::{Calibrator, Observer};
use crate::kernels::IntLayer;
use crate::scheme::{ACTIVATION_SCHEME, ActivationType, int_weight, quantize_weight};
use crate::{Error, Granularity, QuantParams, QuantScheme};

/// What an override does to the layers whose names it matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Regular expression over node names (anchored: it must match the whole name).
    pub pattern: String,
    /// Keep matching layers in f32.
    #[serde(default)]
    pub keep_float: bool,
    /// Weight bits for matching layers (2, 4 or 8), instead of the config's.
    #[serde(default)]
    pub weight_bits: Option<u32>,
}

/// Settings of static post-training quantization.
#[derive(Clone, Debug, PartialEq)]
pub struct PtqSettings {
    /// Weight bits: 8, 4 or 2 (int4/int2 weights run on the int8 kernels and are stored
    /// packed).
    pub weight_bits: u32,
    /// One weight scale per output channel (true) or one per layer.
    pub per_channel: bool,
    /// Asymmetric weights: each channel's (or the layer's) `[min, max]` onto all `2^bits`
    /// levels with a zero point, instead of `[-max|w|, max|w|]` onto `2^bits − 1` levels.
    /// Matters most at 2 and 4 bits (int2 symmetric has three levels, asymmetric four); the
    /// kernels subtract `zero_point · Σ (a − a_zero)` per output, one more sum per pixel.
    pub asymmetric_weights: bool,
    /// How activation ranges are chosen.
    pub calibrator: Calibrator,
    /// Per-layer exceptions; the first matching override wins.
    pub overrides: Vec<Override>,
    /// Dynamic quantization: linear layers only, their inputs quantized with each batch's own
    /// range at run time; no calibration (the calibration batches may be empty).
    pub dynamic: bool,
    /// Bias correction: each layer's bias absorbs the mean shift its weight rounding causes,
    /// measured with the input means seen during calibration (static quantization only).
    pub bias_correction: bool,
    /// Cross-layer equalization of the folded graph before calibration (see [`crate::equalize`]);
    /// helps most with per-layer weight scales.
    pub cross_layer_equalization: bool,
    /// Learned rounding of the weights, layer by layer, on the calibration images (see
    /// [`crate::adaround`]); `None`: round to nearest.
    pub adaround: Option<crate::adaround::AdaRoundSettings>,
    /// How activations are stored: u8 with a zero point (default), or i8 symmetric.
    pub activations: ActivationType,
}

/// Sweeps of cross-layer equalization over the graph's pairs.
pub(crate) const EQUALIZATION_SWEEPS: usize = 4;

impl Default for PtqSettings {
    fn default() -> Self {
        Self {
            weight_bits: 8,
            per_channel: true,
            asymmetric_weights: false,
            calibrator: Calibrator::MinMax,
            overrides: Vec::new(),
            dynamic: false,
            bias_correction: false,
            cross_layer_equalization: false,
            adaround: None,
            activations: ActivationType::U8,
        }
    }
}

/// How one layer is quantized.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerQuant {
    /// Weight bits.
    pub weight_bits: u32,
    /// Weight scale per output channel (all equal for per-tensor).
    pub weight_scales: Vec<f32>,
    /// Asymmetric weights: zero point per output channel, in the signed storage range (see
    /// [`IntLayer::weight_zero_points`]); empty for symmetric weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub weight_zero_points: Vec<i32>,
    /// Scale of the layer's u8 input.
    pub input_scale: f32,
    /// Zero point of the layer's u8 input.
    pub input_zero_point: i32,
    /// Dynamic quantization: the input's range is measured on each batch at run time (the two
    /// fields above are then unused).
    #[serde(default)]
    pub dynamic: bool,
}

impl LayerQuant {
    /// The input's quantization parameters.
    pub fn input(&self) -> QuantParams {
        QuantParams { scale: self.input_scale, zero_point: self.input_zero_point }
    }

    pub(crate) fn int_layer(&self) -> IntLayer {
        IntLayer {
            weight_bits: self.weight_bits,
            weight_scales: self.weight_scales.clone(),
            weight_zero_points: self.weight_zero_points.clone(),
            input: self.input(),
            dynamic: self.dynamic,
            output: None,
        }
    }
}

/// A quantized model: the graph with batch norms folded and every quantized weight replaced by
/// its dequantized value (so burn's forward shows the weight rounding), and the integer form of
/// each quantized layer, by node name.
#[derive(Clone, Debug)]
pub struct QuantizedModel {
    /// The folded graph with dequantized weights.
    pub graph: Graph,
    /// Quantized layers by node name.
    pub layers: BTreeMap<String, LayerQuant>,
    /// Layers left in f32, with the reason.
    pub float_layers: Vec<(String, String)>,
    /// Convolutions whose output is rounded to a u8 grid of its own (calibrated), by node name:
    /// those whose output reaches something other than quantized layers (a residual add, a
    /// pooling, a layer left in f32, the model's output; see [`output_grid`]). The simulation
    /// and the integer plan round there, and a QDQ export ([`crate::onnx`]) writes the same
    /// rounding as a `QuantizeLinear`/`DequantizeLinear` pair, which is what lets ONNX Runtime
    /// run such a convolution in integers: so the exported model computes what the plan does.
    /// Empty for dynamic quantization and for model files written before this rounding.
    pub outputs: BTreeMap<String, QuantParams>,
    /// The layer pairs cross-layer equalization rescaled before quantizing (empty when it was
    /// off; not kept in model files, whose weights already carry it).
    pub equalized: Vec<crate::equalize::EqualizedPair>,
}

/// Checks `overrides` against the conv and linear layers of `graph` as quantizing it will, so
/// that a config's patterns are checked before anything trains.
///
/// # Errors
/// [`Error::Setting`] for a pattern that is not a regex or matches no conv or linear layer.
pub fn check_overrides(graph: &Graph, overrides: &[Override]) -> Result<(), Error> {
    resolve_overrides(graph, overrides).map(|_| ())
}

/// Which layers an override list sends where, checked against the graph: a pattern that matches
/// no layer is an error (a typo would otherwise silently quantize everything).
fn resolve_overrides<'a>(graph: &Graph, overrides: &'a [Override]) -> Result<Vec<(regex::Regex, &'a Override)>, Error> {
    let mut out = Vec::new();
    for (i, o) in overrides.iter().enumerate() {
        let re = regex::Regex::new(&format!("^(?:{})$", o.pattern))
            .map_err(|e| Error::Setting(format!("overrides[{i}].pattern `{}`: {e}", o.pattern)))?;
        if !graph.layers().any(|(_, n)| matches!(n.op, Op::Conv2d { .. } | Op::Linear { .. }) && re.is_match(&n.name)) {
            return Err(Error::Setting(format!(
                "overrides[{i}].pattern `{}` matches no conv or linear layer (layers: {})",
                o.pattern,
                graph
                    .layers()
                    .filter(|(_, n)| matches!(n.op, Op::Conv2d { .. } | Op::Linear { .. }))
                    .map(|(_, n)| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if let Some(bits) = o.weight_bits
            && ![2, 4, 8].contains(&bits)
        {
            return Err(Error::Setting(format!("overrides[{i}].weight_bits must be 2, 4 or 8, got {bits}")));
        }
        out.push((re, o));
    }
    Ok(out)
}

fn values(a: &Activation) -> Result<Vec<f32>, Error> {
    Ok(shrink_core::host::floats(a.clone().flatten())?)
}

/// Layers left in f32, each with the reason.
pub(crate) type FloatLayers = Vec<(String, String)>;

/// Which layers of the folded graph become integer layers, with how many weight bits, and which
/// stay in f32 and why; overrides are checked against `graph`.
pub(crate) fn plan_layers(
    graph: &Graph,
    folded: &Graph,
    settings: &PtqSettings,
) -> Result<(BTreeMap<NodeId, u32>, FloatLayers), Error> {
    let overrides = resolve_overrides(graph, &settings.overrides)?;
    let mut plan: BTreeMap<NodeId, u32> = BTreeMap::new();
    let mut float_layers = Vec::new();
    for (id, node) in folded.layers() {
        let grouped =
            matches!(node.op, Op::Conv2d { groups, .. } if groups != 1) && !crate::kernels::is_depthwise(&node.op);
        if !matches!(node.op, Op::Conv2d { .. } | Op::Linear { .. }) {
            continue;
        }
        let rule = overrides.iter().find(|(re, _)| re.is_match(&node.name)).map(|(_, o)| *o);
        if rule.is_some_and(|o| o.keep_float) {
            float_layers.push((node.name.clone(), "kept in f32 by an override".to_string()));
        } else if settings.dynamic && !matches!(node.op, Op::Linear { .. }) {
            float_layers.push((node.name.clone(), "dynamic quantization covers linear layers only".to_string()));
        } else if grouped {
            float_layers.push((
                node.name.clone(),
                "grouped convolution other than depthwise: no integer kernel yet".to_string(),
            ));
        } else {
            plan.insert(id, rule.and_then(|o| o.weight_bits).unwrap_or(settings.weight_bits));
        }
    }
    Ok((plan, float_layers))
}

/// Runs the calibration batches through `folded` and returns an observer of the input of each
/// `layers` node, having shown every batch to `on_batch` and every observed input to `on_input`.
///
/// # Errors
/// [`Error::Calibration`] for a non-finite input (naming the layer and the batch) or no batch;
/// the first error of reading an input back or of `on_input`.
pub(crate) fn calibrate(
    folded: &Graph,
    layers: &BTreeMap<NodeId, u32>,
    calibrator: Calibrator,
    calibration: &mut dyn Iterator<Item = Tensor<4>>,
    on_batch: &mut dyn FnMut(&Tensor<4>),
    on_input: &mut dyn FnMut(NodeId, &Activation) -> Result<(), Error>,
) -> Result<Observed, Error> {
    let mut observers: BTreeMap<NodeId, Observer> = layers.keys().map(|&id| (id, Observer::new(calibrator))).collect();
    let taps: Vec<NodeId> = layers.keys().copied().collect();
    let mut outputs: BTreeMap<NodeId, Observer> = layers.keys().map(|&id| (id, Observer::new(calibrator))).collect();
    let mut batches = 0;
    for x in calibration {
        batches += 1;
        on_batch(&x);
        let mut failure = None;
        let mut error = None;
        let (_, tapped) = folded.forward_hooked(x, &taps, &mut |id, a| {
            if let Some(o) = observers.get_mut(&id)
                && error.is_none()
            {
                let observed = values(&a).and_then(|v| {
                    if let Err(i) = o.observe(&v)
                        && failure.is_none()
                    {
                        failure = Some((id, i));
                    }
                    on_input(id, &a)
                });
                error = observed.err();
            }
            a
        });
        if let Some(e) = error {
            return Err(e);
        }
        if let Some((id, i)) = failure {
            return Err(Error::Calibration(format!(
                "the input of layer `{}` holds a non-finite value (element {i}) in calibration batch {batches}",
                folded.nodes[id].name
            )));
        }
        for (id, a) in taps.iter().zip(&tapped) {
            if let Err(i) = outputs.get_mut(id).expect("tapped layer").observe(&values(a)?) {
                return Err(Error::Calibration(format!(
                    "the output of layer `{}` holds a non-finite value (element {i}) in calibration batch {batches}",
                    folded.nodes[*id].name
                )));
            }
        }
    }
    if batches == 0 {
        return Err(Error::Calibration("no calibration batch".into()));
    }
    Ok(Observed { inputs: observers, outputs })
}

/// What calibration observed: the input and the output of each planned layer.
pub(crate) struct Observed {
    pub inputs: BTreeMap<NodeId, Observer>,
    pub outputs: BTreeMap<NodeId, Observer>,
}

impl Observed {
    /// The u8 parameters of each layer's output, by node name.
    pub(crate) fn output_params(&self, graph: &Graph) -> BTreeMap<String, QuantParams> {
        self.outputs
            .iter()
            .filter_map(|(&id, o)| Some((graph.nodes[id].name.clone(), o.params(ACTIVATION_SCHEME)?)))
            .collect()
    }
}

/// Quantizes `graph` statically: folds its batch norms, observes the input of every conv and
/// linear layer on the `calibration` batches, quantizes the weights.
///
/// # Errors
/// [`Error::Setting`] for bad settings or overrides; [`Error::Calibration`] if a calibration
/// value is not finite or there was no batch.
pub fn quantize_static(
    graph: &Graph,
    calibration: &mut dyn Iterator<Item = Tensor<4>>,
    settings: &PtqSettings,
) -> Result<QuantizedModel, Error> {
    if ![2, 4, 8].contains(&settings.weight_bits) {
        return Err(Error::Setting(format!("weight_bits must be 2, 4 or 8, got {}", settings.weight_bits)));
    }
    if settings.asymmetric_weights && settings.adaround.is_some() {
        return Err(Error::Setting(
            "AdaRound learns the rounding of symmetric weights: it cannot be combined with asymmetric_weights".into(),
        ));
    }
    if settings.dynamic && settings.bias_correction {
        return Err(Error::Setting("bias correction needs calibration: it applies to static quantization only".into()));
    }
    if settings.dynamic && settings.activations != ActivationType::U8 {
        return Err(Error::Setting(
            "activations = \"i8\" applies to static quantization: dynamic quantization measures each batch's \
             asymmetric u8 range at run time"
                .into(),
        ));
    }
    let (mut folded, _) = graph.valid().fold_batch_norms()?;
    let mut equalized = Vec::new();
    if settings.cross_layer_equalization {
        (folded, equalized) = crate::equalize::equalize_cross_layer(&folded, EQUALIZATION_SWEEPS)?;
        tracing::info!(pairs = equalized.len(), "cross-layer equalization");
    }
    let (plan, float_layers) = plan_layers(graph, &folded, settings)?;
    let mut means: BTreeMap<NodeId, ChannelMeans> = if settings.bias_correction && !settings.dynamic {
        plan.keys().map(|&id| (id, ChannelMeans::default())).collect()
    } else {
        BTreeMap::new()
    };
    let mut kept_images: Vec<Tensor<4>> = Vec::new();
    let mut kept = 0usize;
    // Dynamic quantization measures ranges at run time: the batches are not even drawn.
    let observed = if settings.dynamic {
        None
    } else {
        Some(calibrate(
            &folded,
            &plan,
            settings.calibrator,
            calibration,
            &mut |x| {
                if let Some(ada) = &settings.adaround
                    && kept < ada.images
                {
                    kept += x.dims()[0];
                    kept_images.push(x.clone());
                }
            },
            &mut |id, a| match means.get_mut(&id) {
                Some(m) => m.add(a),
                None => Ok(()),
            },
        )?)
    };
    let no_observers = BTreeMap::new();
    let observers = observed.as_ref().map_or(&no_observers, |o| &o.inputs);
    // AdaRound: each planned layer's input on the first calibration images, from one more
    // forward pass of the float model over them.
    let mut inputs: BTreeMap<NodeId, Tensor<4>> = BTreeMap::new();
    if let (Some(ada), false) = (&settings.adaround, settings.dynamic) {
        let kept = Tensor::cat(kept_images, 0);
        let n = kept.dims()[0].min(ada.images.max(1));
        folded.forward_hooked(kept.narrow(0, 0, n), &[], &mut |id, a| {
            if plan.contains_key(&id) {
                let x = match (&folded.nodes[id].op, a.clone()) {
                    (Op::Conv2d { .. }, Activation::Map(t)) => t,
                    (_, a) => {
                        let f = a.flatten();
                        let [b, k] = f.dims();
                        f.reshape([b, k, 1, 1])
                    }
                };
                inputs.insert(id, x);
            }
            a
        });
    }
    let layers = plan
        .iter()
        .map(|(&id, &bits)| {
            let input = match observers.get(&id) {
                Some(o) => {
                    settings.activations.kernel_params(o.params(settings.activations.scheme()).expect("observed"))
                }
                None => QuantParams { scale: 1.0, zero_point: 0 },
            };
            let input_mean = means.get(&id).map(|m| m.mean());
            let adaround = inputs.remove(&id).zip(settings.adaround.clone());
            (id, LayerPlan { bits, input, weight_scales: None, input_mean, adaround })
        })
        .collect();
    let mut model = quantize_weights(
        folded,
        layers,
        WeightScheme { per_channel: settings.per_channel, asymmetric: settings.asymmetric_weights },
        settings.dynamic,
        float_layers,
    )?;
    model.equalized = equalized;
    if let Some(observed) = &observed {
        model.outputs = rounded_outputs(&model.graph, &model.layers, observed)?;
    }
    Ok(model)
}

/// Running per-channel (or per-feature) sums of a layer's input, for bias correction.
#[derive(Default)]
struct ChannelMeans {
    sums: Vec<f64>,
    count: f64,
}

impl ChannelMeans {
    fn add(&mut self, a: &Activation) -> Result<(), Error> {
        let (per_channel, n): (Tensor<1>, usize) = match a {
            Activation::Map(t) => {
                let [b, c, h, w] = t.dims();
                (t.clone().swap_dims(0, 1).reshape([c, b * h * w]).sum_dim(1).reshape([c]), b * h * w)
            }
            Activation::Flat(t) => {
                let [b, f] = t.dims();
                (t.clone().sum_dim(0).reshape([f]), b)
            }
        };
        let v = shrink_core::host::floats(per_channel)?;
        if self.sums.is_empty() {
            self.sums = vec![0.0; v.len()];
        }
        for (s, x) in self.sums.iter_mut().zip(v) {
            *s += x as f64;
        }
        self.count += n as f64;
        Ok(())
    }

    fn mean(&self) -> Vec<f32> {
        self.sums.iter().map(|s| (s / self.count.max(1.0)) as f32).collect()
    }
}

/// How [`quantize_weights`] quantizes one layer.
pub(crate) struct LayerPlan {
    pub bits: u32,
    pub input: QuantParams,
    /// Scales chosen elsewhere (learned by QAT); `None`: the max-abs of each channel (or layer).
    pub weight_scales: Option<Vec<f32>>,
    /// Mean of the layer's input per channel (or feature), for bias correction.
    pub input_mean: Option<Vec<f32>>,
    /// AdaRound: the layer's calibration inputs (`[n, c, h, w]`, or `[n, in, 1, 1]` for a
    /// linear layer) and the settings; `None`: round to nearest.
    pub adaround: Option<(Tensor<4>, crate::adaround::AdaRoundSettings)>,
}

/// How weight ranges are chosen where a layer's scales are not given.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WeightScheme {
    pub per_channel: bool,
    pub asymmetric: bool,
}

/// Quantizes the weights of the planned layers of a folded graph: each weight replaced by its
/// dequantized value, and the integer form recorded by name.
pub(crate) fn quantize_weights(
    mut folded: Graph,
    plan: BTreeMap<NodeId, LayerPlan>,
    scheme: WeightScheme,
    dynamic: bool,
    float_layers: Vec<(String, String)>,
) -> Result<QuantizedModel, Error> {
    let mut layers = BTreeMap::new();
    for (id, LayerPlan { bits, input, weight_scales, input_mean, adaround }) in plan {
        let (w, dims) = folded.layer_weight(id)?.expect("planned layers are conv or linear");
        let node = &folded.nodes[id];
        let out = dims[0];
        let per = w.len() / out;
        let qmax = crate::symmetric_max(bits);
        let absmax = |s: &[f32]| s.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Asymmetric: [min, max] (widened to 0, so 0 stays exact) onto 0..2^bits − 1, the zero
        // point then shifted into the signed range the integers are stored in.
        let affine = |s: &[f32]| {
            let (lo, hi) = s.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let p = crate::params_for_range(
                lo,
                hi,
                QuantScheme { bits, symmetric: false, granularity: Granularity::PerTensor },
            );
            (p.scale.max(f32::MIN_POSITIVE), p.zero_point - (1 << (bits - 1)))
        };
        let (scales, zeros): (Vec<f32>, Vec<i32>) = if let Some(scales) = weight_scales {
            (scales, Vec::new())
        } else if scheme.asymmetric {
            let params: Vec<(f32, i32)> =
                if scheme.per_channel { w.chunks_exact(per).map(affine).collect() } else { vec![affine(&w); out] };
            params.into_iter().unzip()
        } else if scheme.per_channel {
            (w.chunks_exact(per).map(|c| (absmax(c) / qmax as f32).max(f32::MIN_POSITIVE)).collect(), Vec::new())
        } else {
            (vec![(absmax(&w) / qmax as f32).max(f32::MIN_POSITIVE); out], Vec::new())
        };
        let deq: Vec<f32> = match adaround {
            Some((inputs, settings)) => {
                let started = std::time::Instant::now();
                let deq = crate::adaround::adaround_weight(&node.op, &w, &dims, &scales, qmax, &inputs, &settings)?;
                let flipped = deq
                    .iter()
                    .zip(&w)
                    .enumerate()
                    .filter(|(k, (d, v))| **d != quantize_weight(**v, scales[k / per], qmax) as f32 * scales[k / per])
                    .count();
                tracing::info!(layer = %node.name, flipped, of = w.len(), seconds = started.elapsed().as_secs_f64(), "AdaRound");
                deq
            }
            None => w
                .chunks_exact(per)
                .enumerate()
                .flat_map(|(o, c)| {
                    let (s, z) = (scales[o], zeros.get(o).copied());
                    c.iter().map(move |&v| (int_weight(v, s, z, bits) as i32 - z.unwrap_or(0)) as f32 * s)
                })
                .collect(),
        };
        // Bias correction: the rounding shifts output o's mean by Σ (Wq − W)[o, i] · E[x_i];
        // subtract that shift from the bias (Nagel et al. 2019, with E[x] measured per input
        // channel on the calibration batches and shared by a channel's kernel taps).
        let correction: Option<Vec<f32>> = input_mean.map(|mean| {
            let taps = (per / mean.len().max(1)).max(1);
            deq.chunks_exact(per)
                .zip(w.chunks_exact(per))
                .map(|(q, f)| {
                    q.iter()
                        .zip(f)
                        .enumerate()
                        .map(|(i, (a, b))| ((a - b) * mean[(i / taps).min(mean.len() - 1)]) as f64)
                        .sum::<f64>() as f32
                })
                .collect()
        });
        let name = node.name.clone();
        folded.set_layer_weight(id, deq)?;
        if let Some(c) = correction {
            let bias = folded.layer_bias(id)?.unwrap_or_else(|| vec![0.0; c.len()]);
            folded.set_layer_bias(id, bias.iter().zip(&c).map(|(b, d)| b - d).collect())?;
        }
        tracing::debug!(layer = %name, bits, input_scale = input.scale, input_zero = input.zero_point, "quantized");
        layers.insert(
            name,
            LayerQuant {
                weight_bits: bits,
                weight_scales: scales,
                weight_zero_points: zeros,
                input_scale: input.scale,
                input_zero_point: input.zero_point,
                dynamic,
            },
        );
    }
    Ok(QuantizedModel { graph: folded, layers, float_layers, outputs: BTreeMap::new(), equalized: Vec::new() })
}

/// The one rule for where a quantized layer's output needs a grid of its own. Given the input
/// parameters of the quantized layers (`input_grid`), the grid every quantized layer downstream
/// of node `id` reads its value on — when the value reaches only quantized layers, through ops
/// that commute with rounding to that grid (ReLU, max pooling, flattening, identities), all
/// with the same parameters. Then rounding at `id` to that grid changes nothing the model
/// computes. `None` otherwise: a convolution there gets a grid of its own
/// ([`QuantizedModel::outputs`]).
pub fn output_grid(
    graph: &Graph,
    input_grid: &dyn Fn(NodeId) -> Option<QuantParams>,
    id: NodeId,
) -> Option<QuantParams> {
    let consumers = graph.consumers(id);
    if consumers.is_empty() || id == graph.output {
        return None;
    }
    let mut grid: Option<QuantParams> = None;
    for c in consumers {
        let p = match (&graph.nodes[c].op, input_grid(c)) {
            (_, Some(p)) => p,
            (Op::Relu | Op::MaxPool2d { .. } | Op::Flatten | Op::Identity | Op::Unflatten { .. }, None) => {
                output_grid(graph, input_grid, c)?
            }
            _ => return None,
        };
        if grid.is_some_and(|g| g != p) {
            return None;
        }
        grid = Some(p);
    }
    grid
}

/// The convolutions of `layers` (by id, with their input parameters) that get an output grid of
/// their own ([`output_grid`]).
fn own_output_grids(graph: &Graph, layers: &BTreeMap<NodeId, QuantParams>) -> Vec<NodeId> {
    let input_grid = |c: NodeId| layers.get(&c).copied();
    layers
        .keys()
        .copied()
        .filter(|&id| matches!(graph.nodes[id].op, Op::Conv2d { .. }) && output_grid(graph, &input_grid, id).is_none())
        .collect()
}

/// The calibrated output parameters of the convolutions that need them ([`own_output_grids`]).
pub(crate) fn rounded_outputs(
    graph: &Graph,
    layers: &BTreeMap<String, LayerQuant>,
    observed: &Observed,
) -> Result<BTreeMap<String, QuantParams>, Error> {
    let mut inputs = BTreeMap::new();
    for (name, l) in layers {
        inputs.insert(graph.node_id(name).map_err(|e| Error::Setting(e.to_string()))?, l.input());
    }
    let params = observed.output_params(graph);
    Ok(own_output_grids(graph, &inputs)
        .into_iter()
        .filter_map(|id| {
            let name = &graph.nodes[id].name;
            params.get(name).map(|p| (name.clone(), *p))
        })
        .collect())
}

/// `x` rounded as the integer kernels round it: `scale * (clamp(round(x / scale + zp)) - zp)`
/// (burn's `round` rounds ties to even, as the kernels do).
fn fake_quant_tensor<const D: usize>(x: Tensor<D>, p: QuantParams) -> Tensor<D> {
    let zp = p.zero_point as f32;
    x.mul_scalar(1.0 / p.scale).add_scalar(zp).round().clamp(0.0, 255.0).sub_scalar(zp).mul_scalar(p.scale)
}

impl QuantizedModel {
    /// Simulated (fake-quant) forward on burn: dequantized weights, and each quantized layer's
    /// input rounded to its u8 grid. The integer plan computes the same within float rounding.
    pub fn forward_simulated(&self, x: Tensor<4>) -> Tensor<2> {
        struct Simulated {
            inputs: BTreeMap<NodeId, (QuantParams, bool)>,
            outputs: BTreeMap<NodeId, QuantParams>,
        }
        fn round(a: Activation, p: QuantParams) -> Activation {
            match a {
                Activation::Map(t) => Activation::Map(fake_quant_tensor(t, p)),
                Activation::Flat(t) => Activation::Flat(fake_quant_tensor(t, p)),
            }
        }
        impl ForwardHooks for Simulated {
            fn layer_input(&mut self, id: NodeId, a: Activation) -> Activation {
                match self.inputs.get(&id) {
                    // Dynamic layers: the batch's own range, as the kernel measures it.
                    Some(&(_, true)) => {
                        let t = a.clone().flatten();
                        let lo = t.clone().min().into_scalar::<f32>().min(0.0);
                        let hi = t.max().into_scalar::<f32>().max(0.0);
                        round(a, crate::params_for_range(lo, hi, ACTIVATION_SCHEME))
                    }
                    Some(&(p, false)) => round(a, p),
                    None => a,
                }
            }
            fn layer_output(&mut self, id: NodeId, a: Activation) -> Activation {
                match self.outputs.get(&id) {
                    Some(&p) => round(a, p),
                    None => a,
                }
            }
        }
        let id = |name: &String| self.graph.node_id(name).expect("layer of this graph");
        let mut hooks = Simulated {
            inputs: self.layers.iter().map(|(name, l)| (id(name), (l.input(), l.dynamic))).collect(),
            outputs: self.outputs.iter().map(|(name, &p)| (id(name), p)).collect(),
        };
        self.graph.forward_with_hooks(x, &[], &mut hooks).0
    }

    /// A kernel registry whose builders give each quantized layer its integer kernel, with
    /// residual adds and the requantization between consecutive direct convolutions fused into
    /// their epilogues ([`Self::registry_with`]).
    pub fn registry(&self) -> KernelRegistry {
        self.registry_with(true)
    }

    /// As [`Self::registry`]; with `fuse`, a convolution whose value meets a residual add takes
    /// the add (and the ReLU after it) into its epilogue, and a direct convolution whose output
    /// (after its folded batch norm and ReLU) feeds only another direct convolution writes it
    /// requantized, in the layout that one reads, instead of f32 (same bits, fewer passes; see
    /// [`crate::kernels::int8_registry`]).
    pub fn registry_with(&self, fuse: bool) -> KernelRegistry {
        let layers = self
            .layers
            .iter()
            .map(|(name, l)| (name.clone(), IntLayer { output: self.outputs.get(name).copied(), ..l.int_layer() }))
            .collect();
        crate::kernels::int8_registry(layers, fuse)
    }

    /// Freezes the model into a CPU plan running the integer kernels.
    ///
    /// # Errors
    /// As [`freeze_with`].
    pub fn freeze(&self, threads: usize) -> shrink_core::Result<Plan> {
        freeze_with(&self.graph, &self.registry(), &FreezeOptions { threads })
    }
}

/// Format tag of the quantization annotations in a model file's header.
pub const ANNOTATION_FORMAT: &str = "shrink-quant/1";

/// What the header records per quantized layer (weight bits and scales are in the tensors).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputAnnotation {
    scale: f32,
    zero_point: i32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    dynamic: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Annotations {
    format: String,
    inputs: BTreeMap<String, InputAnnotation>,
    float_layers: Vec<(String, String)>,
    /// Calibrated output parameters (files written before they were recorded have none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    outputs: BTreeMap<String, InputAnnotation>,
}

impl QuantizedModel {
    /// The integer weights of every quantized layer, recovered exactly from the dequantized
    /// graph weights (`round(w / scale)` of `q * scale` is `q`).
    fn int_weights(&self) -> shrink_core::Result<BTreeMap<String, shrink_core::io::IntWeights>> {
        self.layers
            .iter()
            .map(|(name, l)| {
                let id = self.graph.node_id(name)?;
                let Some((w, _)) = self.graph.layer_weight(id)? else {
                    return Err(shrink_core::Error::InvalidGraph {
                        node: name.clone(),
                        message: "a quantized layer must be a conv or linear layer".into(),
                    });
                };
                let per = w.len() / l.weight_scales.len();
                let layer = l.int_layer();
                let values = w.iter().enumerate().map(|(i, &v)| layer.int_weight(v, i / per)).collect();
                let weights = shrink_core::io::IntWeights {
                    bits: l.weight_bits,
                    values,
                    scales: l.weight_scales.clone(),
                    zero_points: l.weight_zero_points.iter().map(|&z| z as i8).collect(),
                };
                Ok((name.clone(), weights))
            })
            .collect()
    }

    /// The model file: the folded graph, quantized weights as packed integers with their scales,
    /// f32 for the rest, the activation parameters in the header.
    ///
    /// # Errors
    /// As [`shrink_core::io::to_bytes_with`].
    pub fn to_bytes(&self) -> shrink_core::Result<Vec<u8>> {
        let annotations = Annotations {
            format: ANNOTATION_FORMAT.into(),
            inputs: self
                .layers
                .iter()
                .map(|(n, l)| {
                    (
                        n.clone(),
                        InputAnnotation { scale: l.input_scale, zero_point: l.input_zero_point, dynamic: l.dynamic },
                    )
                })
                .collect(),
            float_layers: self.float_layers.clone(),
            outputs: self
                .outputs
                .iter()
                .map(|(n, p)| (n.clone(), InputAnnotation { scale: p.scale, zero_point: p.zero_point, dynamic: false }))
                .collect(),
        };
        let value = serde_json::to_value(&annotations).expect("serialisable");
        shrink_core::io::to_bytes_with(&self.graph, &self.int_weights()?, Some(&value))
    }

    /// Saves the model file atomically.
    ///
    /// # Errors
    /// As [`QuantizedModel::to_bytes`] and [`shrink_core::io::write_atomic`].
    pub fn save(&self, path: &std::path::Path) -> shrink_core::Result<()> {
        shrink_core::io::write_atomic(path, &self.to_bytes()?)
    }

    /// Loads a quantized model file.
    ///
    /// # Errors
    /// As [`shrink_core::io::load`]; [`shrink_core::Error::BadFile`] when the header has no
    /// quantization annotations or they do not fit the graph.
    pub fn load(path: &std::path::Path, device: &burn::tensor::Device) -> shrink_core::Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| shrink_core::Error::Io { path: path.into(), error: e })?;
        Self::from_bytes(&bytes, path, device)
    }

    /// Parses a quantized model file's bytes; `path` names it in errors.
    ///
    /// # Errors
    /// As [`QuantizedModel::load`].
    pub fn from_bytes(
        bytes: &[u8],
        path: &std::path::Path,
        device: &burn::tensor::Device,
    ) -> shrink_core::Result<Self> {
        let loaded = shrink_core::io::from_bytes_with(bytes, path, device)?;
        let bad = |m: String| shrink_core::Error::BadFile { path: path.into(), offset: 8, message: m };
        let a: Annotations = serde_json::from_value(
            loaded.annotations.ok_or_else(|| bad("no quantization annotations: not a quantized model file".into()))?,
        )
        .map_err(|e| bad(format!("quantization annotations are not valid: {e}")))?;
        if a.format != ANNOTATION_FORMAT {
            return Err(bad(format!("annotations `{}` are not supported: expected `{ANNOTATION_FORMAT}`", a.format)));
        }
        let mut layers = BTreeMap::new();
        for (name, input) in a.inputs {
            let w = loaded
                .int_weights
                .get(&name)
                .ok_or_else(|| bad(format!("quantized layer `{name}` has no integer weights in the file")))?;
            if !(input.scale.is_finite() && input.scale > 0.0 && (0..=255).contains(&input.zero_point)) {
                return Err(bad(format!("input parameters of layer `{name}` are out of range")));
            }
            layers.insert(
                name,
                LayerQuant {
                    weight_bits: w.bits,
                    weight_scales: w.scales.clone(),
                    weight_zero_points: w.zero_points.iter().map(|&z| z as i32).collect(),
                    input_scale: input.scale,
                    input_zero_point: input.zero_point,
                    dynamic: input.dynamic,
                },
            );
        }
        if let Some(name) = loaded.int_weights.keys().find(|n| !layers.contains_key(*n)) {
            return Err(bad(format!("layer `{name}` has integer weights but no input parameters")));
        }
        let mut outputs = BTreeMap::new();
        for (name, p) in a.outputs {
            if !layers.contains_key(&name) {
                return Err(bad(format!("output parameters name `{name}`, which is not a quantized layer")));
            }
            if !(p.scale.is_finite() && p.scale > 0.0 && (0..=255).contains(&p.zero_point)) {
                return Err(bad(format!("output parameters of layer `{name}` are out of range")));
            }
            outputs.insert(name, QuantParams { scale: p.scale, zero_point: p.zero_point });
        }
        let graph = loaded.graph;
        Ok(Self { graph, layers, float_layers: a.float_layers, outputs, equalized: Vec::new() })
    }
}

impl QuantizedModel {
    /// The model with only `layer` quantized as in `self`, every other layer in f32: what
    /// per-layer sensitivity analysis measures. `original` is the graph `self` was quantized
    /// from.
    ///
    /// # Errors
    /// [`Error::Setting`] if `layer` is not one of the quantized layers.
    pub fn with_only(&self, original: &Graph, layer: &str) -> Result<QuantizedModel, Error> {
        let lq = self
            .layers
            .get(layer)
            .ok_or_else(|| Error::Setting(format!("`{layer}` is not a quantized layer of this model")))?;
        let (mut graph, _) = original.valid().fold_batch_norms()?;
        if !self.equalized.is_empty() {
            // The other layers must be the equalized f32 ones, or the rescaling would not cancel.
            graph = crate::equalize::equalize_cross_layer(&graph, EQUALIZATION_SWEEPS)?.0;
        }
        let id = self.graph.node_id(layer).map_err(|e| Error::Setting(e.to_string()))?;
        graph.nodes[id].params = self.graph.nodes[id].params.clone();
        // Bias correction may have given the layer a bias it did not have.
        graph.nodes[id].op = self.graph.nodes[id].op.clone();
        let float_layers = self
            .layers
            .keys()
            .filter(|n| n.as_str() != layer)
            .map(|n| (n.clone(), format!("f32 while `{layer}` alone is quantized")))
            .collect();
        Ok(QuantizedModel {
            graph,
            layers: BTreeMap::from([(layer.to_string(), lq.clone())]),
            float_layers,
            outputs: self.outputs.iter().filter(|(n, _)| n.as_str() == layer).map(|(n, p)| (n.clone(), *p)).collect(),
            equalized: self.equalized.clone(),
        })
    }
}
