//! Distillation on the real MNIST-5k digits: the student learns from frozen teachers; the
//! degenerate settings reduce to plain training; bad pairs are clear errors.

use std::path::Path;

use burn::module::Module;
use shrink_core::data::{Augmentation, Batcher, Dataset, load_mnist_dir, shuffled};
use shrink_core::graph::Graph;
use shrink_core::train::{OptimizerSettings, Quiet, Schedule, TrainData, TrainSettings, evaluate, train};
use shrink_core::zoo::ModelSpec;
use shrink_core::{BackendKind, io};
use shrink_distill::{DistillSettings, Error, FeaturePair, Teacher, distill};

struct Setup {
    train: Dataset,
    test: Dataset,
    batcher: Batcher,
    device: burn::tensor::Device,
}

fn setup(images: usize, augmentation: Augmentation) -> Setup {
    let (train_set, test_set) =
        load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k")).unwrap();
    let train_set = train_set.subset(&shuffled(train_set.len(), 3)[..images]);
    let test_set = test_set.subset(&shuffled(test_set.len(), 4)[..500]);
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation };
    Setup { train: train_set, test: test_set, batcher, device: BackendKind::Flex.device().unwrap() }
}

fn settings(epochs: usize) -> TrainSettings {
    TrainSettings {
        epochs,
        batch_size: 50,
        optimizer: OptimizerSettings::Adam { lr: 0.003, weight_decay: 0.0 },
        schedule: Schedule::Constant,
        warmup_epochs: 0.0,
    }
}

fn build(spec: &ModelSpec, s: &Setup, seed: u64) -> Graph {
    spec.build([1, 28, 28], 10, seed, &s.device).unwrap()
}

fn teacher(s: &Setup, spec: &ModelSpec, epochs: usize) -> Graph {
    let g = build(spec, s, 11);
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    train(g, data, &settings(epochs), &s.device, 11, &mut Quiet).unwrap().0
}

fn file_bytes(g: &Graph) -> Vec<u8> {
    io::to_bytes(g).unwrap()
}

#[test]
fn the_student_learns_from_a_frozen_teacher_whose_outputs_are_cached() {
    let s = setup(1000, Augmentation::default());
    let t = teacher(&s, &ModelSpec::Mlp { hidden: vec![128] }, 3);
    let before = file_bytes(&t);
    let student = build(&ModelSpec::Mlp { hidden: vec![16] }, &s, 5);
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let out = distill(
        student,
        &[Teacher { graph: t.clone(), weight: 1.0 }],
        data,
        &settings(3),
        &DistillSettings::default(),
        &s.device,
        5,
        &mut Quiet,
    )
    .unwrap();
    assert!(out.teacher_outputs_cached, "no augmentation, no feature pairs: outputs are cached");
    assert_eq!(file_bytes(&t), before, "the teacher is not changed");
    let acc = evaluate(&out.student, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    assert!(acc > 0.8, "distilled MLP-16 after 3 epochs on 1000 digits: {acc}");
    let losses: Vec<f64> = out.history.iter().map(|r| r.train_loss).collect();
    assert!(losses[2] < losses[0], "{losses:?}");
}

#[test]
fn alpha_zero_at_t1_is_plain_training() {
    let s = setup(500, Augmentation::default());
    let t = teacher(&s, &ModelSpec::Mlp { hidden: vec![32] }, 1);
    let spec = ModelSpec::Mlp { hidden: vec![16] };
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let plain = train(build(&spec, &s, 9), data, &settings(2), &s.device, 9, &mut Quiet).unwrap();
    let kd = DistillSettings { temperature: 1.0, alpha: 0.0, ..DistillSettings::default() };
    let teachers = [Teacher { graph: t, weight: 1.0 }];
    let out = distill(build(&spec, &s, 9), &teachers, data, &settings(2), &kd, &s.device, 9, &mut Quiet).unwrap();
    for (a, b) in plain.1.iter().zip(&out.history) {
        assert!((a.train_loss - b.train_loss).abs() < 1e-6, "{} vs {}", a.train_loss, b.train_loss);
        assert_eq!(a.train_accuracy, b.train_accuracy);
    }
    let (ea, eb) = (
        evaluate(&plain.0, &s.test, &s.batcher, 250, &s.device).unwrap(),
        evaluate(&out.student, &s.test, &s.batcher, 250, &s.device).unwrap(),
    );
    assert!((ea.loss - eb.loss).abs() < 1e-5 && ea.confusion == eb.confusion, "{} vs {}", ea.loss, eb.loss);
}

#[test]
fn an_ensemble_of_identical_teachers_equals_one_teacher() {
    let s = setup(500, Augmentation::default());
    let t = teacher(&s, &ModelSpec::Mlp { hidden: vec![32] }, 1);
    let spec = ModelSpec::Mlp { hidden: vec![16] };
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let kd = DistillSettings::default();
    let one = [Teacher { graph: t.clone(), weight: 1.0 }];
    let three = [
        Teacher { graph: t.clone(), weight: 1.0 },
        Teacher { graph: t.clone(), weight: 2.0 },
        Teacher { graph: t, weight: 0.5 },
    ];
    let a = distill(build(&spec, &s, 2), &one, data, &settings(1), &kd, &s.device, 2, &mut Quiet).unwrap();
    let b = distill(build(&spec, &s, 2), &three, data, &settings(1), &kd, &s.device, 2, &mut Quiet).unwrap();
    assert!((a.history[0].train_loss - b.history[0].train_loss).abs() < 1e-5);
    let (ea, eb) = (
        evaluate(&a.student, &s.test, &s.batcher, 250, &s.device).unwrap(),
        evaluate(&b.student, &s.test, &s.batcher, 250, &s.device).unwrap(),
    );
    assert!((ea.loss - eb.loss).abs() < 1e-4, "{} vs {}", ea.loss, eb.loss);
}

#[test]
fn hints_train_an_adapter_and_attention_pairs_maps() {
    // With augmentation on, the teacher runs on every (augmented) batch instead of a cache.
    let s = setup(200, Augmentation { random_crop_padding: 2, horizontal_flip: false });
    let t = teacher(&s, &ModelSpec::CifarResnet { depth: 8, width: 0.5 }, 1);
    let student = build(&ModelSpec::CifarResnet { depth: 8, width: 0.25 }, &s, 4);
    let pair = |st: &str, te: &str, weight| FeaturePair { student: st.into(), teacher: te.into(), weight };
    let kd = DistillSettings {
        hints: vec![pair("layer2.0.relu", "layer2.0.relu", 1.0), pair("flatten", "flatten", 0.5)],
        attention: vec![pair("layer3.0.relu", "layer3.0.relu", 1000.0)],
        ..DistillSettings::default()
    };
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let teachers = [Teacher { graph: t, weight: 1.0 }];
    let out = distill(student, &teachers, data, &settings(1), &kd, &s.device, 4, &mut Quiet).unwrap();
    assert!(!out.teacher_outputs_cached);
    let channels: Vec<[usize; 2]> = out.adapters.iter().map(|a| a.channels).collect();
    assert_eq!(channels, vec![[8, 16], [16, 32]], "one 1×1 adapter per hint pair with different channels");
    assert!(out.history[0].train_loss.is_finite());
}

#[test]
fn gradients_reach_the_student_and_adapters_only() {
    use burn::nn::conv::Conv2dConfig;
    use shrink_core::graph::{Activation, Params};
    use shrink_distill::Learner;
    let s = setup(100, Augmentation::default());
    let ad = s.device.clone().autodiff();
    // Both tracked, so only the losses' detaching keeps gradients from the teacher.
    let t = teacher(&s, &ModelSpec::Mlp { hidden: vec![32] }, 1).fork(&ad).train();
    let student = build(&ModelSpec::Mlp { hidden: vec![8] }, &s, 1);
    let learner = Learner { student, adapters: vec![Conv2dConfig::new([8, 32], [1, 1]).init(&s.device)] };
    let learner = learner.fork(&ad).train();
    let (x, y) = s.batcher.batch(&s.train, &[0, 1, 2, 3], &ad, None);
    let (s_logits, s_feats) =
        learner.student.forward_with_taps(x.clone(), &[learner.student.node_id("relu1").unwrap()]);
    let (t_logits, t_feats) = t.forward_with_taps(x, &[t.node_id("relu1").unwrap()]);
    let map = |a: Activation| a.flatten().reshape([4, -1, 1, 1]);
    let [sf, tf] = [s_feats, t_feats].map(|mut f| map(f.remove(0)));
    let loss = shrink_distill::kd_loss(s_logits, t_logits, y, 4.0, 0.9)
        + shrink_distill::hint_loss(learner.adapters[0].forward(sf), tf);
    let grads = loss.backward();
    let fc1 = |g: &Graph| match &g.nodes[g.node_id("fc1").unwrap()].params {
        Some(Params::Linear(p)) => p.weight.val(),
        _ => unreachable!(),
    };
    assert!(fc1(&learner.student).grad(&grads).is_some(), "the student gets gradients");
    assert!(learner.adapters[0].weight.val().grad(&grads).is_some(), "the adapter gets gradients");
    assert!(fc1(&t).grad(&grads).is_none(), "the teacher gets none");
}

#[test]
fn bad_pairs_and_settings_are_clear_errors() {
    let s = setup(100, Augmentation::default());
    let t = teacher(&s, &ModelSpec::Lenet5, 1);
    let spec = ModelSpec::Mlp { hidden: vec![8] };
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let teachers = [Teacher { graph: t, weight: 1.0 }];
    let run = |kd: DistillSettings| {
        distill(build(&spec, &s, 1), &teachers, data, &settings(1), &kd, &s.device, 1, &mut Quiet).unwrap_err()
    };
    let pair = |st: &str, te: &str| FeaturePair { student: st.into(), teacher: te.into(), weight: 1.0 };
    let e = run(DistillSettings { hints: vec![pair("fc9", "fc1")], ..DistillSettings::default() });
    assert!(matches!(e, Error::UnknownNode { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("hints[0].student") && msg.contains("`fc9`") && msg.contains("relu1"), "{msg}");
    let e = run(DistillSettings { hints: vec![pair("fc1", "conv3")], ..DistillSettings::default() }).to_string();
    assert!(e.contains("hints[0].teacher") && e.contains("`conv3`"), "{e}");
    let e = run(DistillSettings { hints: vec![pair("relu1", "relu1")], ..DistillSettings::default() }).to_string();
    assert!(e.contains("spatial sizes differ"), "{e}");
    let e = run(DistillSettings { attention: vec![pair("relu1", "conv1")], ..DistillSettings::default() });
    assert!(e.to_string().contains("attention transfer needs feature maps"), "{e}");
    let e = run(DistillSettings { temperature: 0.0, ..DistillSettings::default() }).to_string();
    assert!(e.contains("temperature"), "{e}");
    let e = run(DistillSettings { alpha: 1.5, ..DistillSettings::default() }).to_string();
    assert!(e.contains("alpha"), "{e}");
}
