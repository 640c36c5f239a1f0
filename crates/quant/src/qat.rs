//! Quantization-aware training: the network is fine-tuned while its forward pass rounds weights
//! and layer inputs exactly as the integer kernels will, so training learns to absorb the
//! rounding; the result is a [`QuantizedModel`] that runs on those kernels.
//!
//! Batch norms are folded into their convolutions first (as the integer model has them), so QAT
//! trains the folded weights and biases and there are no batch-norm statistics left to freeze.
//! Rounding passes gradients straight through (the straight-through estimator); values clipped
//! at the ends of the range pass none. Scales either follow the data — weights their max-abs per
//! output channel at every step, activations a moving average of each batch's range until the
//! observers freeze — or are learned by gradient descent (LSQ, Esser et al. 2020), starting from
//! the calibrated ones, with LSQ's gradient scaling.

use std::collections::BTreeMap;

use burn::module::{Module, Param};
use burn::tensor::activation::softmax;
use burn::tensor::{Tensor, TensorData};
use shrink_core::graph::{Activation, ForwardHooks, Graph, NodeId, Params};
use shrink_core::train::{
    Batch, EpochRecord, LossAndLogits, TrainData, TrainRun, TrainSettings, Trainable, cross_entropy, distillation_loss,
    train_module,
};

use crate::ptq::{LayerPlan, PtqSettings, QuantizedModel, WeightScheme, calibrate, plan_layers, quantize_weights};
use crate::{ActivationType, Error, QuantParams, params_for_range, symmetric_max};

/// Distillation during QAT: the f32 model QAT starts from is the teacher, its softened outputs
/// guiding the quantized network alongside the labels (distillation as recovery from
/// quantization).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QatDistill {
    /// Softening temperature T (> 0).
    pub temperature: f64,
    /// Weight α of the teacher term; `1 − α` weighs the labels.
    pub alpha: f64,
}

/// Settings of quantization-aware training.
#[derive(Clone, Debug, PartialEq)]
pub struct QatSettings {
    /// Weight bits, per-channel weights, the calibrator that sets the initial activation ranges,
    /// the activation type (u8 asymmetric or i8 symmetric; training rounds as that type does),
    /// overrides (`dynamic` must be false).
    pub ptq: PtqSettings,
    /// The fine-tuning: epochs, batch size, optimiser, schedule.
    pub train: TrainSettings,
    /// Learn weight and activation scales by gradient descent (LSQ) instead of deriving them
    /// from the data.
    pub learn_scales: bool,
    /// Without LSQ: the activation observers follow each training batch (moving average,
    /// momentum 0.9) until this epoch, then keep their range (`None`: until the end).
    pub freeze_observers_epoch: Option<f64>,
    /// Train against the f32 model's softened outputs as well as the labels
    /// ([`shrink_core::train::distillation_loss`]); `None`: cross-entropy on the labels.
    pub distill: Option<QatDistill>,
}

/// One quantized layer during QAT.
#[derive(Clone, Debug)]
pub struct QatLayer {
    /// The conv or linear node.
    pub node: NodeId,
    /// Weight bits.
    pub bits: u32,
    /// Zero point of the layer's input on the kernels' u8 grid (fixed after calibration; 128 for
    /// i8 activations).
    pub input_zero_point: i32,
    /// Without LSQ: the observed input range `(min, max)`.
    pub range: (f32, f32),
    /// Elements per image of the layer's input (LSQ's gradient scale).
    pub input_elements: usize,
}

/// The folded graph being trained, with LSQ's learned scales when asked for. A burn module, so
/// one optimiser steps weights and scales.
#[derive(Module, Debug)]
pub struct QatModel {
    /// The folded network (f32 latent weights).
    pub graph: Graph,
    /// LSQ: per-output-channel weight scales, one tensor per quantized layer (empty without LSQ).
    pub weight_scales: Vec<Param<Tensor<1>>>,
    /// LSQ: the input scale (`[1]`) of each quantized layer (empty without LSQ).
    pub input_scales: Vec<Param<Tensor<1>>>,
    /// The quantized layers, in the order of the scales.
    #[module(skip)]
    pub layers: Vec<QatLayer>,
    /// Per-channel weight scales (false: one per layer).
    #[module(skip)]
    pub per_channel: bool,
}

impl Trainable for QatModel {
    fn graph(&self) -> &Graph {
        &self.graph
    }
}

/// `v` rounded to the nearest integer (ties to even) in the forward pass, unchanged in the
/// backward pass: the straight-through estimator.
fn round_ste<const D: usize>(v: Tensor<D>) -> Tensor<D> {
    v.clone() + (v.clone().round() - v).detach()
}

/// `s` in the forward pass, its gradient multiplied by `g` (LSQ's step-size gradient scale).
fn grad_scaled(s: Tensor<1>, g: f64) -> Tensor<1> {
    let scaled = s.clone().mul_scalar(g);
    scaled.clone() + (s - scaled).detach()
}

/// Symmetric fake-quant of a weight whose axis 0 is the output channel; `scale` is `[out]`.
fn fake_quant_weight<const D: usize>(w: Tensor<D>, scale: Tensor<1>, qmax: i32) -> Tensor<D> {
    let out = w.dims()[0];
    let mut shape = [1usize; D];
    shape[0] = out;
    let s = scale.reshape(shape);
    let q = round_ste(w / s.clone()).clamp(-(qmax as f32), qmax as f32);
    q * s
}

/// The u8 kernel parameters of a layer input observed in `[lo, hi]`: u8 asymmetric, or i8
/// symmetric run as u8 with zero point 128 (see [`ActivationType`]).
fn input_params(lo: f32, hi: f32, activations: ActivationType) -> QuantParams {
    activations.kernel_params(params_for_range(lo, hi, activations.scheme()))
}

/// u8 fake-quant of an activation with a `[1]` scale tensor, as the kernels round it (i8
/// activations arrive here as u8 with zero point 128).
fn fake_quant_input<const D: usize>(x: Tensor<D>, scale: Tensor<1>, zero_point: i32) -> Tensor<D> {
    let s = scale.reshape([1usize; D]);
    let zp = zero_point as f32;
    let q = round_ste(x / s.clone() + zp).clamp(0.0, 255.0);
    (q - zp) * s
}

fn max_abs_scales<const D: usize>(w: &Tensor<D>, qmax: i32, per_channel: bool) -> Tensor<1> {
    let out = w.dims()[0];
    let flat: Tensor<2> = w.clone().detach().abs().reshape([out as i32, -1]);
    let m = if per_channel { flat.max_dim(1).reshape([out]) } else { flat.max().expand([out]) };
    m.div_scalar(qmax as f64).clamp_min(f32::MIN_POSITIVE as f64)
}

/// The hooks of one QAT forward pass.
struct QatHooks<'a> {
    model: &'a QatModel,
    index: &'a BTreeMap<NodeId, usize>,
    /// Without LSQ: activation parameters of this step.
    fixed: &'a [QuantParams],
    /// Without LSQ: each layer's input range in this batch, when the observers are live.
    seen: Option<&'a mut Vec<(f32, f32)>>,
}

impl QatHooks<'_> {
    fn weight_scale<const D: usize>(&self, k: usize, w: &Tensor<D>) -> Tensor<1> {
        let layer = &self.model.layers[k];
        let qmax = symmetric_max(layer.bits);
        if self.model.weight_scales.is_empty() {
            max_abs_scales(w, qmax, self.model.per_channel)
        } else {
            let per = w.dims()[1..].iter().product::<usize>();
            let g = 1.0 / ((per * qmax as usize) as f64).sqrt();
            grad_scaled(self.model.weight_scales[k].val(), g).clamp_min(1e-12)
        }
    }

    fn input_scale(&self, k: usize) -> Tensor<1> {
        let layer = &self.model.layers[k];
        let g = 1.0 / ((layer.input_elements * 255) as f64).sqrt();
        grad_scaled(self.model.input_scales[k].val(), g).clamp_min(1e-12)
    }
}

impl ForwardHooks for QatHooks<'_> {
    fn layer_input(&mut self, node: NodeId, x: Activation) -> Activation {
        let Some(&k) = self.index.get(&node) else { return x };
        if let Some(seen) = self.seen.as_deref_mut() {
            let t = x.clone().flatten().detach();
            seen[k] = (t.clone().min().into_scalar::<f32>(), t.max().into_scalar::<f32>());
        }
        let (scale, zp) = if self.model.input_scales.is_empty() {
            let p = self.fixed[k];
            let device = match &x {
                Activation::Map(t) => t.device(),
                Activation::Flat(t) => t.device(),
            };
            (Tensor::<1>::from_data(TensorData::new(vec![p.scale], [1]), &device), p.zero_point)
        } else {
            (self.input_scale(k), self.model.layers[k].input_zero_point)
        };
        match x {
            Activation::Map(t) => Activation::Map(fake_quant_input(t, scale, zp)),
            Activation::Flat(t) => Activation::Flat(fake_quant_input(t, scale, zp)),
        }
    }

    fn conv_weight(&mut self, node: NodeId, w: Tensor<4>) -> Tensor<4> {
        let Some(&k) = self.index.get(&node) else { return w };
        let s = self.weight_scale(k, &w);
        fake_quant_weight(w, s, symmetric_max(self.model.layers[k].bits))
    }

    fn linear_weight(&mut self, node: NodeId, w: Tensor<2>) -> Tensor<2> {
        let Some(&k) = self.index.get(&node) else { return w };
        let s = self.weight_scale(k, &w);
        fake_quant_weight(w, s, symmetric_max(self.model.layers[k].bits))
    }
}

/// What [`quantization_aware_training`] returns.
#[derive(Debug)]
pub struct QatOutcome {
    /// The trained model, ready for the integer kernels.
    pub model: QuantizedModel,
    /// One record per epoch: training loss and accuracy on the fake-quantized forward; a
    /// validation accuracy, when there is a validation set, is of the latent f32 weights.
    pub history: Vec<EpochRecord>,
    /// Images the initial calibration saw.
    pub calibration_images: usize,
}

/// Fine-tunes `graph` with quantization in the loop and returns it quantized.
///
/// Batch norms are folded, the layers to quantize chosen as static PTQ chooses them (same
/// overrides), the initial activation ranges calibrated on `calibration`, then the core training
/// loop runs with `settings.train` on the fake-quantized forward (see the module docs), on
/// `run`'s device, data order and observer.
///
/// # Errors
/// [`Error::Setting`] for bad settings or overrides; [`Error::Calibration`] for a calibration
/// without batches or with non-finite values; training errors (a NaN loss names the step).
pub fn quantization_aware_training(
    graph: &Graph,
    calibration: &mut dyn Iterator<Item = Tensor<4>>,
    data: TrainData<'_>,
    settings: &QatSettings,
    run: TrainRun<'_>,
) -> Result<QatOutcome, Error> {
    let TrainRun { device, seed, observer } = run;
    let (ptq, train) = (&settings.ptq, &settings.train);
    if ptq.dynamic {
        return Err(Error::Setting("quantization-aware training is static: dynamic must be false".into()));
    }
    if ptq.asymmetric_weights {
        return Err(Error::Setting(
            "quantization-aware training learns symmetric weights: asymmetric_weights must be false".into(),
        ));
    }
    if ![2, 4, 8].contains(&ptq.weight_bits) {
        return Err(Error::Setting(format!("weight_bits must be 2, 4 or 8, got {}", ptq.weight_bits)));
    }
    if let Some(e) = settings.freeze_observers_epoch
        && !(e.is_finite() && e >= 0.0)
    {
        return Err(Error::Setting(format!("freeze_observers_epoch must be a non-negative number, got {e}")));
    }
    if let Some(d) = &settings.distill {
        if !(d.temperature.is_finite() && d.temperature > 0.0) {
            return Err(Error::Setting(format!("distill temperature must be positive, got {}", d.temperature)));
        }
        if !(0.0..=1.0).contains(&d.alpha) {
            return Err(Error::Setting(format!("distill alpha must be in [0, 1], got {}", d.alpha)));
        }
    }
    // The teacher: the f32 model as given (batch norms unfolded), without autodiff.
    let teacher = settings.distill.map(|d| (graph.valid().to_device(device), d.temperature, d.alpha));
    let (folded, _) = graph.valid().to_device(device).fold_batch_norms()?;
    let (plan, float_layers) = plan_layers(graph, &folded, ptq)?;
    let shapes = folded.shapes()?;

    // Initial activation ranges: the calibrator on the calibration batches.
    let mut images = 0usize;
    // The batches are kept to calibrate the trained layers' output ranges at the end.
    let mut kept: Vec<Tensor<4>> = Vec::new();
    let on_batch = &mut |x: &Tensor<4>| {
        images += x.dims()[0];
        kept.push(x.clone());
    };
    let observers = calibrate(&folded, &plan, ptq.calibrator, calibration, on_batch, &mut |_, _| Ok(()))?.inputs;
    let mut layers = Vec::new();
    let mut weight_scales = Vec::new();
    let mut input_scales = Vec::new();
    let mut index = BTreeMap::new();
    let activations = ptq.activations;
    for (&id, &bits) in &plan {
        let (lo, hi) = observers[&id].range(activations.scheme()).expect("observed");
        let p = input_params(lo, hi, activations);
        index.insert(id, layers.len());
        let input_elements = shapes[folded.nodes[id].inputs[0]].numel();
        layers.push(QatLayer { node: id, bits, input_zero_point: p.zero_point, range: (lo, hi), input_elements });
        if settings.learn_scales {
            let qmax = symmetric_max(bits);
            let w = match &folded.nodes[id].params {
                Some(Params::Conv(c)) => max_abs_scales(&c.weight.val(), qmax, ptq.per_channel),
                Some(Params::Linear(l)) => max_abs_scales(&l.weight.val(), qmax, ptq.per_channel),
                _ => unreachable!("conv or linear"),
            };
            weight_scales.push(Param::from_tensor(w));
            input_scales.push(Param::from_tensor(Tensor::from_data(TensorData::new(vec![p.scale], [1]), device)));
        }
    }
    tracing::info!(
        layers = layers.len(),
        float = float_layers.len(),
        calibration_images = images,
        learn_scales = settings.learn_scales,
        "QAT prepared"
    );
    let model = QatModel { graph: folded, weight_scales, input_scales, layers, per_channel: ptq.per_channel };

    // Observers (without LSQ): a moving average of each batch's range until they freeze.
    let steps_per_epoch = data.train.len().div_ceil(train.batch_size.max(1));
    let freeze_step = settings.freeze_observers_epoch.map(|e| (e * steps_per_epoch as f64).round() as usize);
    let mut ranges: Vec<(f32, f32)> = model.layers.iter().map(|l| l.range).collect();
    let mut step = 0usize;
    let mut objective = |m: &QatModel, batch: Batch<'_>| -> shrink_core::Result<LossAndLogits> {
        let live = !settings.learn_scales && freeze_step.is_none_or(|f| step < f);
        step += 1;
        let fixed: Vec<QuantParams> = ranges.iter().map(|&(lo, hi)| input_params(lo, hi, activations)).collect();
        let mut seen = vec![(0.0, 0.0); ranges.len()];
        // The teacher sees the same (augmented) images, without autodiff.
        let teacher_probs = teacher.as_ref().map(|(t, temperature, _)| {
            softmax(t.forward(batch.images.clone().inner()).div_scalar(*temperature), 1).autodiff()
        });
        let logits = {
            let mut hooks = QatHooks { model: m, index: &index, fixed: &fixed, seen: live.then_some(&mut seen) };
            m.graph.forward_with_hooks(batch.images, &[], &mut hooks).0
        };
        if live {
            for (r, &(lo, hi)) in ranges.iter_mut().zip(&seen) {
                if lo.is_finite() && hi.is_finite() {
                    *r = (0.9 * r.0 + 0.1 * lo, 0.9 * r.1 + 0.1 * hi);
                }
            }
        }
        let loss = match (&teacher, teacher_probs) {
            (Some((_, temperature, alpha)), Some(p)) => {
                distillation_loss(logits.clone(), p, batch.labels, *temperature, *alpha)
            }
            _ => cross_entropy(logits.clone(), batch.labels),
        };
        Ok((loss, logits))
    };
    let (trained, history) = train_module(model, data, train, device, seed, observer, &mut objective)?;

    // The integer model: the trained folded weights quantized with the final scales.
    let mut plan_out = BTreeMap::new();
    for (k, layer) in trained.layers.iter().enumerate() {
        let (input, weight_scales) = if settings.learn_scales {
            let scale = trained.input_scales[k].val().into_scalar::<f32>().max(1e-12);
            let ws: Vec<f32> =
                shrink_core::host::floats(trained.weight_scales[k].val())?.into_iter().map(|s| s.max(1e-12)).collect();
            (QuantParams { scale, zero_point: layer.input_zero_point }, Some(ws))
        } else {
            let (lo, hi) = ranges[k];
            (input_params(lo, hi, activations), None)
        };
        // No bias correction: training has already absorbed the rounding's mean shift.
        plan_out
            .insert(layer.node, LayerPlan { bits: layer.bits, input, weight_scales, input_mean: None, adaround: None });
    }
    let graph = trained.graph.valid().to_device(device);
    let observed = calibrate(&graph, &plan, ptq.calibrator, &mut kept.into_iter(), &mut |_| {}, &mut |_, _| Ok(()))?;
    let mut model = quantize_weights(
        graph,
        plan_out,
        WeightScheme { per_channel: ptq.per_channel, asymmetric: false },
        false,
        float_layers,
    )?;
    model.outputs = crate::ptq::rounded_outputs(&model.graph, &model.layers, &observed)?;
    Ok(QatOutcome { model, history, calibration_images: images })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> burn::tensor::Device {
        shrink_core::BackendKind::Flex.device().unwrap().autodiff()
    }

    #[test]
    fn rounding_passes_gradients_straight_through() {
        let x = Tensor::<1>::from_floats([0.4, 1.5, 2.5, -1.6], &device()).require_grad();
        let y = round_ste(x.clone());
        let v: Vec<f32> = y.clone().into_data().try_to_vec().unwrap();
        assert_eq!(v, vec![0.0, 2.0, 2.0, -2.0], "ties to even, as the kernels");
        let g: Vec<f32> = x.grad(&y.sum().backward()).unwrap().into_data().try_to_vec().unwrap();
        assert_eq!(g, vec![1.0; 4]);
    }

    #[test]
    fn input_parameters_follow_the_activation_type() {
        // u8: [-1, 3] onto 0..=255, zero point round(1 / (4/255)) = 64.
        let u = input_params(-1.0, 3.0, ActivationType::U8);
        assert!((u.scale - 4.0 / 255.0).abs() < 1e-7 && u.zero_point == 64, "{u:?}");
        // i8: [-3, 3] onto -127..=127, zero point 0, which the u8 kernels see as 128.
        let i = input_params(-1.0, 3.0, ActivationType::I8);
        assert!((i.scale - 3.0 / 127.0).abs() < 1e-7 && i.zero_point == 128, "{i:?}");
    }

    #[test]
    fn lsq_scale_gradient_matches_the_paper() {
        // One u8 value, zero point 10, scale 0.1: inside the range the gradient of the
        // fake-quantized value with respect to the scale is round(x/s) - x/s (Esser et al.,
        // eq. 3); clipped at the top it is the top level minus the zero point.
        let d = device();
        for (x, want) in [(0.73f32, (7.0 - 7.3) as f32), (100.0, 255.0 - 10.0)] {
            let s = Tensor::<1>::from_floats([0.1], &d).require_grad();
            let xs = Tensor::<2>::from_floats([[x]], &d);
            let y = fake_quant_input(xs, s.clone(), 10);
            let g: f32 = s.grad(&y.sum().backward()).unwrap().into_scalar();
            assert!((g - want).abs() < 1e-4, "x = {x}: {g} vs {want}");
        }
    }

    #[test]
    fn fake_quant_weight_rounds_per_channel_within_the_symmetric_range() {
        let d = device();
        let w = Tensor::<2>::from_floats([[0.26, -1.0, 0.55], [2.0, 0.9, -0.1]], &d);
        let s = max_abs_scales(&w, symmetric_max(4), true);
        let scales: Vec<f32> = s.clone().into_data().try_to_vec().unwrap();
        assert!((scales[0] - 1.0 / 7.0).abs() < 1e-6 && (scales[1] - 2.0 / 7.0).abs() < 1e-6);
        let q: Vec<f32> = fake_quant_weight(w, s, 7).into_data().try_to_vec().unwrap();
        let want = [2.0 / 7.0, -1.0, 4.0 / 7.0, 2.0, 6.0 / 7.0, 0.0];
        for (a, b) in q.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{q:?}");
        }
    }
}
