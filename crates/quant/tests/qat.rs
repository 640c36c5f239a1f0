//! Quantization-aware training on the real MNIST-5k digits: with 2-bit weights, where
//! post-training quantization loses much of the accuracy, a short QAT recovers it; the result
//! runs on the integer kernels and agrees with its simulation; LSQ learns its scales.

use std::path::Path;

use shrink_core::BackendKind;
use shrink_core::data::{Augmentation, Batcher, Dataset, load_mnist_dir, shuffled};
use shrink_core::graph::Graph;
use shrink_core::train::{
    OptimizerSettings, Quiet, Schedule, TrainData, TrainSettings, evaluate, evaluate_plan, evaluate_with, train,
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
    device.seed(1);
    let g = ModelSpec::Lenet5.build([1, 28, 28], 10, &device).unwrap();
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

#[test]
fn qat_recovers_what_2bit_ptq_loses_and_runs_on_the_integer_kernels() {
    let s = setup();
    let f32_acc = evaluate(&s.baseline, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    let post = quantize_static(&s.baseline, &mut calibration(&s).into_iter(), &ptq(2)).unwrap();
    let ptq_acc = evaluate_plan(&mut post.freeze(1).unwrap(), &s.test, &s.batcher, 250, &s.device).unwrap().top1;

    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let qat = QatSettings { ptq: ptq(2), learn_scales: false, freeze_observers_epoch: Some(1.0) };
    let out = quantization_aware_training(
        &s.baseline,
        &mut calibration(&s).into_iter(),
        data,
        &settings(2, 0.001),
        &qat,
        &s.device,
        1,
        &mut Quiet,
    )
    .unwrap();
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
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let qat = QatSettings { ptq: ptq(4), learn_scales: true, freeze_observers_epoch: None };
    let post = quantize_static(&s.baseline, &mut calibration(&s).into_iter(), &ptq(4)).unwrap();
    let out = quantization_aware_training(
        &s.baseline,
        &mut calibration(&s).into_iter(),
        data,
        &settings(1, 0.001),
        &qat,
        &s.device,
        1,
        &mut Quiet,
    )
    .unwrap();
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
