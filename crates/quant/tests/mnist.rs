//! Quantization on the real MNIST-5k digits with a trained LeNet-5. QAT: with 2-bit weights,
//! where post-training quantization loses much of the accuracy, a short QAT recovers it; the
//! result runs on the integer kernels and agrees with its simulation; LSQ learns its scales.
//! Bias correction: it removes the output mean shift of weight rounding and helps at low bits.

use std::path::Path;

use shrink_core::BackendKind;
use shrink_core::data::{Augmentation, Batcher, Dataset, load_mnist_dir, shuffled};
use shrink_core::graph::Graph;
use shrink_core::train::{
    OptimizerSettings, Quiet, Schedule, TrainData, TrainRun, TrainSettings, evaluate, evaluate_plan, evaluate_with,
    train,
};
use shrink_core::zoo::ModelSpec;
use shrink_quant::{Calibrator, PtqSettings, QatSettings, quantization_aware_training, quantize_static};

struct Setup {
    train: Dataset,
    test: Dataset,
    batcher: Batcher,
    device: burn::tensor::Device,
    baseline: Graph,
}

fn setup() -> Setup {
    let (train_set, test_set) =
        load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k")).unwrap();
    let train_set = train_set.subset(&shuffled(train_set.len(), 3)[..1500]);
    let test_set = test_set.subset(&shuffled(test_set.len(), 4)[..500]);
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Lenet5.build([1, 28, 28], 10, 1, &device).unwrap();
    let settings = settings(3, 0.003);
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let baseline = train(g, data, &settings, &device, 1, &mut Quiet).unwrap().0;
    Setup { train: train_set, test: test_set, batcher, device, baseline }
}

fn settings(epochs: usize, lr: f64) -> TrainSettings {
    TrainSettings {
        epochs,
        batch_size: 50,
        optimizer: OptimizerSettings::Adam { lr, weight_decay: 0.0 },
        schedule: Schedule::Constant,
        warmup_epochs: 0.0,
    }
}

fn ptq(bits: u32) -> PtqSettings {
    PtqSettings { weight_bits: bits, calibrator: Calibrator::MinMax, ..PtqSettings::default() }
}

fn calibration(s: &Setup) -> Vec<burn::tensor::Tensor<4>> {
    let order = shuffled(s.train.len(), 9);
    order.chunks(100).take(3).map(|c| s.batcher.batch(&s.train, c, &s.device, None).0).collect()
}

/// The (dequantized) weights of quantized layer `name`.
fn layer_weights(q: &shrink_quant::QuantizedModel, name: &str) -> Vec<f32> {
    let id = q.graph.node_id(name).unwrap();
    match &q.graph.nodes[id].params {
        Some(shrink_core::graph::Params::Conv(p)) => p.weight.val().into_data().try_to_vec().unwrap(),
        Some(shrink_core::graph::Params::Linear(p)) => p.weight.val().into_data().try_to_vec().unwrap(),
        _ => unreachable!("a quantized layer is a conv or linear layer"),
    }
}

/// QAT of the baseline, calibrated on [`calibration`].
fn run_qat(s: &Setup, qat: &QatSettings) -> shrink_quant::QatOutcome {
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let mut calib = calibration(s).into_iter();
    let run = TrainRun { device: &s.device, seed: 1, observer: &mut Quiet };
    quantization_aware_training(&s.baseline, &mut calib, data, qat, run).unwrap()
}

/// QAT settings for `epochs` at lr 0.001.
fn qat_settings(ptq: PtqSettings, epochs: usize, learn_scales: bool, freeze: Option<f64>) -> QatSettings {
    QatSettings { ptq, train: settings(epochs, 0.001), learn_scales, freeze_observers_epoch: freeze, distill: None }
}

#[test]
fn qat_recovers_what_2bit_ptq_loses_and_runs_on_the_integer_kernels() {
    let s = setup();
    let f32_acc = evaluate(&s.baseline, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    let post = quantize_static(&s.baseline, &mut calibration(&s).into_iter(), &ptq(2)).unwrap();
    let ptq_acc = evaluate_plan(&mut post.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1;

    let out = run_qat(&s, &qat_settings(ptq(2), 2, false, Some(1.0)));
    assert_eq!(out.calibration_images, 300);
    assert!(out.model.layers.values().all(|l| l.weight_bits == 2));
    let int_acc = evaluate_plan(&mut out.model.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    let sim = evaluate_with(&s.test, &s.batcher, 250, 10, &s.device, &mut |x| Ok(out.model.forward_simulated(x)))
        .unwrap()
        .top1;
    eprintln!("f32 {f32_acc} ptq int2 {ptq_acc} qat int2 {int_acc} (simulated {sim})");
    assert!(int_acc > ptq_acc + 0.05, "QAT {int_acc} vs PTQ {ptq_acc} at 2-bit weights");
    assert!(int_acc > f32_acc - 0.05, "QAT {int_acc} vs f32 {f32_acc}");
    assert!((int_acc - sim).abs() <= 0.01, "integer {int_acc} vs simulated {sim}");
}

#[test]
fn lsq_learns_its_scales() {
    let s = setup();
    let post = quantize_static(&s.baseline, &mut calibration(&s).into_iter(), &ptq(4)).unwrap();
    let out = run_qat(&s, &qat_settings(ptq(4), 1, true, None));
    let moved = out
        .model
        .layers
        .iter()
        .filter(|(name, l)| {
            let before = &post.layers[*name];
            (l.input_scale - before.input_scale).abs() > 1e-3 * before.input_scale
                && l.weight_scales.iter().zip(&before.weight_scales).any(|(a, b)| (a - b).abs() > 1e-3 * b)
        })
        .count();
    assert_eq!(moved, out.model.layers.len(), "every layer's input and weight scales moved from their start");
    let acc = evaluate_plan(&mut out.model.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    assert!(acc > 0.85, "LSQ int4 LeNet: {acc}");
}

#[test]
fn bias_correction_removes_the_mean_shift_of_weight_rounding() {
    let s = setup();
    let calib = calibration(&s);
    let (plain, corrected) = (ptq(2), PtqSettings { bias_correction: true, ..ptq(2) });
    let q0 = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &plain).unwrap();
    let q1 = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &corrected).unwrap();
    // Mean logits over the calibration images: f32, 2-bit, 2-bit corrected (simulated).
    let mean_logits = |f: &dyn Fn(burn::tensor::Tensor<4>) -> burn::tensor::Tensor<2>| -> Vec<f32> {
        let all: Vec<burn::tensor::Tensor<2>> = calib.iter().map(|x| f(x.clone())).collect();
        burn::tensor::Tensor::cat(all, 0).mean_dim(0).into_data().try_to_vec::<f32>().unwrap()
    };
    let reference = mean_logits(&|x| s.baseline.forward(x));
    let shift = |m: Vec<f32>| m.iter().zip(&reference).map(|(a, b)| (a - b).abs()).sum::<f32>();
    let (before, after) =
        (shift(mean_logits(&|x| q0.forward_simulated(x))), shift(mean_logits(&|x| q1.forward_simulated(x))));
    eprintln!("summed |mean logit shift|: plain {before}, corrected {after}");
    // Measured: 14.4 -> 7.0. What remains is presumably the upstream layers' shift, which the
    // per-layer analytic correction does not see, and activation rounding.
    assert!(after < 0.7 * before, "corrected {after} vs plain {before}");
    // On held-out digits, on the integer kernels.
    let acc = |q: &shrink_quant::QuantizedModel| {
        evaluate_plan(&mut q.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1
    };
    let (a0, a1) = (acc(&q0), acc(&q1));
    eprintln!("2-bit PTQ test top-1: plain {a0}, corrected {a1}");
    assert!(a1 > a0, "corrected {a1} vs plain {a0}");
    // The corrected model (LeNet's convs and linears already have biases) reloads to the same
    // integer accuracy.
    let path = std::env::temp_dir().join(format!("shrink-bias-corr-{}.safetensors", std::process::id()));
    q1.save(&path).unwrap();
    let back = shrink_quant::QuantizedModel::load(&path, &s.device).unwrap();
    assert_eq!(acc(&back), a1);
}

#[test]
fn cross_layer_equalization_helps_per_layer_weight_scales() {
    let s = setup();
    let calib = calibration(&s);
    let per_layer = PtqSettings { per_channel: false, ..ptq(4) };
    let equalized = PtqSettings { cross_layer_equalization: true, ..per_layer.clone() };
    let q0 = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &per_layer).unwrap();
    let q1 = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &equalized).unwrap();
    assert_eq!(q1.equalized.len(), 4, "LeNet-5: conv1-conv2, conv2-fc1, fc1-fc2, fc2-fc3");
    let acc = |q: &shrink_quant::QuantizedModel| {
        evaluate_plan(&mut q.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1
    };
    let (a0, a1) = (acc(&q0), acc(&q1));
    eprintln!("4-bit per-layer PTQ test top-1: plain {a0}, equalized {a1}");
    assert!(a1 >= a0, "equalized {a1} vs plain {a0}");
    // Sensitivity analysis builds each one-layer model on the equalized f32 graph: with only one
    // layer quantized at 8 bits the accuracy stays near f32, which it would not if the rescaling
    // of its neighbours were missing.
    let eq8 = PtqSettings { cross_layer_equalization: true, ..ptq(8) };
    let q8 = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &eq8).unwrap();
    let f32_acc = evaluate(&s.baseline, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    for name in q8.layers.keys() {
        let one = acc(&q8.with_only(&s.baseline, name).unwrap());
        assert!((one - f32_acc).abs() <= 0.02, "{name} alone: {one} vs f32 {f32_acc}");
    }
}

#[test]
fn adaround_beats_rounding_to_nearest_at_low_bits() {
    let s = setup();
    let calib = calibration(&s);
    let ada = shrink_quant::adaround::AdaRoundSettings { iterations: 300, images: 128, ..Default::default() };
    let acc = |q: &shrink_quant::QuantizedModel| {
        evaluate_plan(&mut q.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1
    };
    let nearest = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &ptq(2)).unwrap();
    let learned = PtqSettings { adaround: Some(ada), ..ptq(2) };
    let started = std::time::Instant::now();
    let rounded = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &learned).unwrap();
    let (a0, a1) = (acc(&nearest), acc(&rounded));
    eprintln!("2-bit PTQ test top-1: nearest {a0}, AdaRound {a1} ({:.1} s)", started.elapsed().as_secs_f64());
    assert!(a1 > a0 + 0.05, "AdaRound {a1} vs nearest {a0}");
    // Every weight stays on its grid, within one step of the nearest level.
    for (name, l) in &rounded.layers {
        let w = layer_weights(&rounded, name);
        let per = w.len() / l.weight_scales.len();
        for (k, v) in w.iter().enumerate() {
            let level = v / l.weight_scales[k / per];
            assert!((level - level.round()).abs() < 1e-3 && level.abs() <= 1.0 + 1e-3, "{name}: {level}");
        }
    }
}

#[test]
fn qat_with_the_f32_model_as_teacher() {
    // α = 0 is plain QAT exactly; with α > 0 the f32 model teaches the 2-bit one, which still
    // recovers far above post-training quantization.
    let s = setup();
    let run = |distill: Option<shrink_quant::QatDistill>| {
        run_qat(&s, &QatSettings { distill, ..qat_settings(ptq(2), 2, false, Some(1.0)) })
    };
    let teacher = |alpha| Some(shrink_quant::QatDistill { temperature: 4.0, alpha });
    let plain = run(None);
    let zero = run(teacher(0.0));
    for (a, b) in plain.history.iter().zip(&zero.history) {
        assert!((a.train_loss - b.train_loss).abs() < 1e-6, "{} vs {}", a.train_loss, b.train_loss);
    }
    let taught = run(teacher(0.7));
    let acc = evaluate_plan(&mut taught.model.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    eprintln!("2-bit QAT with the f32 teacher: {acc}");
    assert!(acc > 0.85, "{acc}");
}

#[test]
fn int8_with_i8_activations_keeps_the_accuracy_on_the_integer_kernels() {
    let s = setup();
    let f32_eval = evaluate(&s.baseline, &s.test, &s.batcher, 250, &s.device).unwrap();
    let settings = PtqSettings { activations: shrink_quant::ActivationType::I8, ..ptq(8) };
    let q = quantize_static(&s.baseline, &mut calibration(&s).into_iter(), &settings).unwrap();
    let int8 = evaluate_plan(&mut q.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap();
    eprintln!("f32 {} errors, int8 with i8 activations {} errors", f32_eval.errors(), int8.errors());
    // 500 test images: 0.4 pp is two of them. ReLU outputs use half of the i8 grid, so this is the
    // scheme's honest cost next to u8 on this net, not a free lunch.
    assert!(int8.top1 >= f32_eval.top1 - 0.004, "i8 activations {} vs f32 {}", int8.top1, f32_eval.top1);
}

#[test]
fn qat_with_i8_activations_trains_on_the_symmetric_grid_and_runs_on_the_integer_kernels() {
    let s = setup();
    let f32_acc = evaluate(&s.baseline, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    for learn_scales in [false, true] {
        let ptq = PtqSettings { activations: shrink_quant::ActivationType::I8, ..ptq(4) };
        let out = run_qat(&s, &qat_settings(ptq, 1, learn_scales, None));
        // i8 symmetric: zero point 0, which the u8 kernels see as 128.
        for (name, l) in &out.model.layers {
            assert_eq!(l.input_zero_point, 128, "{name} (learned scales: {learn_scales})");
        }
        let int_acc =
            evaluate_plan(&mut out.model.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1;
        let sim = evaluate_with(&s.test, &s.batcher, 250, 10, &s.device, &mut |x| Ok(out.model.forward_simulated(x)))
            .unwrap()
            .top1;
        eprintln!(
            "f32 {f32_acc}; QAT int4 weights, i8 activations (learned scales: {learn_scales}): {int_acc} (simulated {sim})"
        );
        assert!((int_acc - sim).abs() <= 0.01, "integer {int_acc} vs simulated {sim}");
        assert!(int_acc >= f32_acc - 0.02, "QAT with i8 activations {int_acc} vs f32 {f32_acc}");
    }
}

#[test]
fn asymmetric_weights_use_every_level_and_help_at_low_bits() {
    let s = setup();
    let calib = calibration(&s);
    let acc = |q: &shrink_quant::QuantizedModel| {
        evaluate_plan(&mut q.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1
    };
    let f32_top1 = evaluate(&s.baseline, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    let mut line = format!("LeNet-5 test top-1: f32 {f32_top1:.3}");
    let mut results = Vec::new();
    for bits in [8, 4, 2] {
        let sym = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &ptq(bits)).unwrap();
        let asym_settings = PtqSettings { asymmetric_weights: true, ..ptq(bits) };
        let asym = quantize_static(&s.baseline, &mut calib.clone().into_iter(), &asym_settings).unwrap();
        let (a_sym, a_asym) = (acc(&sym), acc(&asym));
        line += &format!("; int{bits} symmetric {a_sym:.3}, asymmetric {a_asym:.3}");
        results.push((bits, a_sym, a_asym));
        // Each asymmetric channel spans its own [min, max] with all 2^bits levels: the stored
        // integers reach both ends of the signed range in some channel of every layer.
        for (name, l) in &asym.layers {
            let w = layer_weights(&asym, name);
            let per = w.len() / l.weight_scales.len();
            let half = 1 << (bits - 1);
            let stored: Vec<i32> = w
                .iter()
                .enumerate()
                .map(|(k, v)| (v / l.weight_scales[k / per]).round() as i32 + l.weight_zero_points[k / per])
                .collect();
            assert!(stored.iter().all(|q| (-half..half).contains(q)), "{name}");
            assert!(stored.contains(&-half) && stored.contains(&(half - 1)), "{name}: int{bits} levels unused");
        }
    }
    eprintln!("{line}");
    let (_, s8, a8) = results[0];
    // int8 either way stays within a point of f32; at 2 bits (three symmetric levels against
    // four) asymmetric weights keep clearly more of it.
    assert!(a8 >= f32_top1 - 0.01 && s8 >= f32_top1 - 0.01, "{line}");
    let (_, s2, a2) = results[2];
    assert!(a2 > s2 + 0.1, "{line}");
}
