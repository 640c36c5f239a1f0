//! Pruning on the real MNIST-5k digits with a trained LeNet-5 and on ResNets: exact sparsity,
//! untouched survivors, masks that survive fine-tuning, N:M groups, global bounds, and channels
//! removed physically through residual coupling.

use burn::tensor::Distribution;
use shrink_core::InitRng;
use std::path::Path;

use burn::module::Module;
use shrink_core::BackendKind;
use shrink_core::data::{Augmentation, Batcher, Dataset, load_mnist_dir, shuffled};
use shrink_core::graph::{Graph, NodeId, Params};
use shrink_core::metrics::model_stats;
use shrink_core::train::{OptimizerSettings, Quiet, Schedule, TrainData, TrainRun, TrainSettings, evaluate, train};
use shrink_core::zoo::ModelSpec;
use shrink_prune::{Criterion, Granularity, PruneOptions, PruneSchedule, PruneSettings, SparsityOverride, prune};

struct Setup {
    train: Dataset,
    test: Dataset,
    batcher: Batcher,
    device: burn::tensor::Device,
    baseline: Graph,
}

fn build(spec: ModelSpec, shape: [usize; 3], seed: u64, device: &burn::tensor::Device) -> Graph {
    spec.build(shape, 10, seed, device).unwrap()
}

fn setup() -> Setup {
    let (train_set, test_set) =
        load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k")).unwrap();
    let train_set = train_set.subset(&shuffled(train_set.len(), 3)[..1500]);
    let test_set = test_set.subset(&shuffled(test_set.len(), 4)[..500]);
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let device = BackendKind::Flex.device().unwrap();
    let g = build(ModelSpec::Lenet5, [1, 28, 28], 1, &device);
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let baseline = train(g, data, &settings(3, 0.003), &device, 1, &mut Quiet).unwrap().0;
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

fn weights(g: &Graph, id: NodeId) -> Vec<f32> {
    match g.nodes[id].params.as_ref().unwrap() {
        Params::Conv(p) => p.weight.val().into_data().try_to_vec().unwrap(),
        Params::Linear(p) => p.weight.val().into_data().try_to_vec().unwrap(),
        Params::BatchNorm(_) => panic!("not a weight layer"),
    }
}

fn zeros(v: &[f32]) -> usize {
    v.iter().filter(|x| **x == 0.0).count()
}

#[test]
fn one_shot_reaches_the_sparsity_exactly_and_leaves_survivors_untouched() {
    let s = setup();
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let ps = PruneSettings {
        sparsity: 0.7,
        skip: vec!["conv1".into()],
        overrides: vec![SparsityOverride { pattern: "fc3".into(), sparsity: 0.25 }],
        ..PruneSettings::default()
    };
    let out = prune(
        &s.baseline,
        &ps,
        &PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: None, rewind_to: None },
        data,
        TrainRun { device: &s.device, seed: 0, observer: &mut Quiet },
    )
    .unwrap();
    for (id, node) in s.baseline.layers() {
        if !matches!(node.op, shrink_core::graph::Op::Conv2d { .. } | shrink_core::graph::Op::Linear { .. }) {
            continue;
        }
        let (before, after) = (weights(&s.baseline, id), weights(&out.graph, id));
        let expected = match node.name.as_str() {
            "conv1" => 0,
            "fc3" => (0.25 * before.len() as f64).floor() as usize,
            _ => (0.7 * before.len() as f64).floor() as usize,
        };
        assert_eq!(zeros(&after), expected, "{}", node.name);
        // Survivors are bit-identical, and the removed ones are the smallest.
        let kept_min = after.iter().filter(|v| **v != 0.0).map(|v| v.abs()).fold(f32::INFINITY, f32::min);
        for (b, a) in before.iter().zip(&after) {
            assert!(*a == *b || (*a == 0.0 && b.abs() <= kept_min), "{}", node.name);
        }
    }
    let mask = out.masks.as_ref().unwrap();
    assert!(mask.layers.iter().all(|l| l.name != "conv1"));
}

#[test]
fn global_scope_prunes_the_pool_exactly_within_per_layer_bounds() {
    let s = setup();
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let ps = PruneSettings {
        sparsity: 0.8,
        global: true,
        min_layer_sparsity: 0.3,
        max_layer_sparsity: 0.9,
        ..PruneSettings::default()
    };
    let out = prune(
        &s.baseline,
        &ps,
        &PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: None, rewind_to: None },
        data,
        TrainRun { device: &s.device, seed: 0, observer: &mut Quiet },
    )
    .unwrap();
    let masks = out.masks.unwrap();
    let total: usize = masks.layers.iter().map(|l| l.keep.len()).sum();
    let removed: usize = masks.layers.iter().map(|l| l.keep.iter().filter(|k| !**k).count()).sum();
    assert_eq!(removed, (0.8 * total as f64).floor() as usize);
    for l in &masks.layers {
        let sp = l.sparsity();
        assert!((0.3 - 1e-3..=0.9 + 1e-3).contains(&sp), "{} at {sp}", l.name);
    }
    // Global magnitude ranking differs between layers: not every layer sits at 0.8.
    assert!(masks.layers.iter().any(|l| (l.sparsity() - 0.8).abs() > 0.05));
}

#[test]
fn masks_survive_fine_tuning_and_gradual_pruning_keeps_accuracy() {
    let s = setup();
    let base_acc = evaluate(&s.baseline, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    let data = TrainData { train: &s.train, validation: Some(&s.test), batcher: &s.batcher };
    let ps = PruneSettings { sparsity: 0.9, global: true, ..PruneSettings::default() };
    let schedule = PruneSchedule::Agp { initial_sparsity: 0.0, start_epoch: 0.0, end_epoch: Some(2.0), updates: 4 };
    let out = prune(
        &s.baseline,
        &ps,
        &PruneOptions { schedule: schedule.clone(), fine_tune: Some(settings(3, 0.001)), rewind_to: None },
        data,
        TrainRun { device: &s.device, seed: 5, observer: &mut Quiet },
    )
    .unwrap();
    // Four increasing steps, the last at the target.
    let sp: Vec<f64> = out.events.iter().map(|e| e.sparsity).collect();
    assert_eq!(sp.len(), 4);
    assert!(sp.windows(2).all(|w| w[0] < w[1]) && (sp[3] - 0.9).abs() < 1e-12, "{sp:?}");
    let masks = out.masks.as_ref().unwrap();
    assert!((masks.sparsity() - 0.9).abs() < 1e-4);
    // Every masked weight is +0.0 in the result (so files store it as a zero), every kept one
    // was trained.
    let mut changed = 0;
    for l in &masks.layers {
        let (before, after) = (weights(&s.baseline, l.node), weights(&out.graph, l.node));
        for ((b, a), keep) in before.iter().zip(&after).zip(&l.keep) {
            if !keep {
                assert_eq!(a.to_bits(), 0);
            } else if a != b {
                changed += 1;
            }
        }
    }
    assert!(changed > 0);
    // The model file stores the pruned layers as bitmask + non-zeros: 90 % sparse weights take
    // about 13 % of their dense bytes.
    let (dense, sparse) =
        (shrink_core::io::to_bytes(&s.baseline).unwrap(), shrink_core::io::to_bytes(&out.graph).unwrap());
    assert!((sparse.len() as f64) < 0.2 * dense.len() as f64, "{} of {} bytes", sparse.len(), dense.len());
    // The validation accuracy recorded after the last epoch is the masked model's.
    let acc = evaluate(&out.graph, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    let recorded = out.history.last().unwrap().validation.as_ref().unwrap().top1;
    assert!((acc - recorded).abs() < 1e-9, "evaluated {acc}, recorded {recorded}");
    eprintln!("LeNet-5, 1500 images: dense {base_acc}, AGP to 90 % over 3 epochs {acc}");
    // 90 % of LeNet-5's weights removed gradually: within 2 pp of the dense model on 500 images.
    assert!(acc >= base_acc - 0.02, "dense {base_acc}, 90 % sparse {acc}");
}

#[test]
fn n_of_m_keeps_at_most_n_in_every_group() {
    let s = setup();
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let ps = PruneSettings { granularity: Granularity::NOfM { n: 2, m: 4 }, ..PruneSettings::default() };
    let out = prune(
        &s.baseline,
        &ps,
        &PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: Some(settings(1, 0.001)), rewind_to: None },
        data,
        TrainRun { device: &s.device, seed: 0, observer: &mut Quiet },
    )
    .unwrap();
    let masks = out.masks.unwrap();
    // conv1 and conv2 read 1 and 6 channels, not multiples of 4: left dense.
    let names: Vec<&str> = masks.layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["fc1", "fc2", "fc3"]);
    for l in &masks.layers {
        let w = weights(&out.graph, l.node);
        let (out_ch, inp) = (l.dims[0], l.dims[1]);
        let spatial: usize = l.dims[2..].iter().product();
        for o in 0..out_ch {
            for g in 0..inp / 4 {
                for pos in 0..spatial {
                    let nz = (0..4).filter(|j| w[(o * inp + g * 4 + j) * spatial + pos] != 0.0).count();
                    assert!(nz <= 2, "{}", l.name);
                }
            }
        }
        assert!((l.sparsity() - 0.5).abs() < 1e-9);
    }
}

#[test]
fn channels_are_removed_through_residual_coupling_by_every_criterion() {
    let device = BackendKind::Flex.device().unwrap();
    let g = build(ModelSpec::CifarResnet { depth: 8, width: 1.0 }, [1, 28, 28], 2, &device);
    let (train_set, _) = load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k")).unwrap();
    let train_set = train_set.subset(&shuffled(train_set.len(), 3)[..256]);
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let before = model_stats(&g).unwrap();
    for criterion in [Criterion::L1, Criterion::L2, Criterion::BnGamma, Criterion::Taylor, Criterion::Random] {
        let ps = PruneSettings {
            granularity: Granularity::Channels,
            criterion,
            sparsity: 0.5,
            round_to: 4,
            taylor_batches: 2,
            ..PruneSettings::default()
        };
        let out = prune(
            &g,
            &ps,
            &PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: None, rewind_to: None },
            data,
            TrainRun { device: &device, seed: 0, observer: &mut Quiet },
        )
        .unwrap();
        out.graph.validate().unwrap();
        let plans = &out.rounds[0];
        // Every prunable group: the stem's residual group, the stage groups and the inner ones.
        assert_eq!(plans.len(), g.coupling_groups().unwrap().iter().filter(|gr| gr.prunable).count());
        for p in plans {
            assert_eq!(p.keep.len() % 4, 0, "{:?}", p.producers);
            assert_eq!(p.keep.len(), p.channels / 2, "{criterion:?} {:?}", p.producers);
        }
        let after = model_stats(&out.graph).unwrap();
        // Half the channels on both sides of each conv: about a quarter of the MACs remain.
        let ratio = after.macs as f64 / before.macs as f64;
        assert!((0.2..0.3).contains(&ratio), "{criterion:?}: MACs ratio {ratio}");
        // It still runs, and the tensors really shrank.
        let x = burn::tensor::Tensor::<4>::zeros([2, 1, 28, 28], &device);
        assert_eq!(out.graph.forward(x).dims(), [2, 10]);
        assert!(after.bytes < before.bytes / 3);
        // Exported as ONNX, the pruned model's file is smaller by as much, and it imports back
        // to the same logits.
        if matches!(criterion, Criterion::L1) {
            let options = shrink_core::onnx::ExportOptions::default();
            let full = shrink_core::onnx::export(&g, &options).unwrap();
            let small = shrink_core::onnx::export(&out.graph, &options).unwrap();
            assert!(small.len() * 3 < full.len(), "{} bytes pruned, {} before", small.len(), full.len());
            let path = Path::new("pruned.onnx");
            let back = shrink_core::onnx::import_bytes(&small, path, &Default::default(), &device).unwrap().graph;
            let x = shrink_core::InitRng::seeded(7).tensor([2, 1, 28, 28], Distribution::Normal(0.0, 1.0), &device);
            let (a, b) = (out.graph.forward(x.clone()).into_data(), back.forward(x).into_data());
            a.assert_approx_eq::<f32>(&b, burn::tensor::Tolerance::absolute(1e-4));
        }
    }
    // An unknown skip pattern is an error naming the setting and the layers.
    let bad = PruneSettings { granularity: Granularity::Channels, skip: vec!["conv9".into()], ..Default::default() };
    let err = prune(
        &g,
        &bad,
        &PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: None, rewind_to: None },
        data,
        TrainRun { device: &device, seed: 0, observer: &mut Quiet },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("skip[0]") && err.contains("stem.conv"), "{err}");
}

#[test]
fn iterative_structured_pruning_fine_tunes_between_rounds() {
    let s = setup();
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let ps = PruneSettings { granularity: Granularity::Channels, sparsity: 0.5, ..PruneSettings::default() };
    let out = prune(
        &s.baseline,
        &ps,
        &PruneOptions {
            schedule: PruneSchedule::Iterative { rounds: 2 },
            fine_tune: Some(settings(2, 0.001)),
            rewind_to: None,
        },
        data,
        TrainRun { device: &s.device, seed: 0, observer: &mut Quiet },
    )
    .unwrap();
    assert_eq!(out.rounds.len(), 2);
    assert_eq!(out.history.len(), 2);
    assert_eq!(out.history.iter().map(|r| r.epoch).collect::<Vec<_>>(), [1, 2]);
    // LeNet's channel groups: conv1 (6), conv2 (16), fc1 (120), fc2 (84); half of each in the end.
    let shapes = out.graph.shapes().unwrap();
    for (name, n) in [("conv1", 3), ("conv2", 8), ("fc1", 60), ("fc2", 42)] {
        assert_eq!(shapes[out.graph.node_id(name).unwrap()].channels(), n, "{name}");
    }
    let acc = evaluate(&out.graph, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    eprintln!("LeNet-5: half the channels, two rounds with an epoch each: {acc}");
    assert!(acc > 0.85, "half the channels, fine-tuned: {acc}");
}

#[test]
fn the_sparse_plan_computes_what_the_dense_plan_computes() {
    use shrink_core::runtime::{FreezeOptions, KernelRegistry, freeze_with};
    let device = BackendKind::Flex.device().unwrap();
    let g = build(ModelSpec::CifarResnet { depth: 8, width: 1.0 }, [1, 28, 28], 4, &device).valid();
    let (train_set, _) = load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k")).unwrap();
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let ps = PruneSettings { sparsity: 0.9, ..PruneSettings::default() };
    let pruned = prune(
        &g,
        &ps,
        &PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: None, rewind_to: None },
        data,
        TrainRun { device: &device, seed: 0, observer: &mut Quiet },
    )
    .unwrap()
    .graph;
    let mut dense = freeze_with(&pruned, &KernelRegistry::default(), &FreezeOptions::default()).unwrap();
    let mut sparse = freeze_with(&pruned, &shrink_prune::sparse_registry(), &FreezeOptions::default()).unwrap();
    let kernels = sparse.kernels();
    // Every conv and the classifier run sparse (stem.conv has 9 weights per filter: 90 % leaves 1).
    assert!(kernels.iter().filter(|(_, k)| k.contains("spmm")).count() >= 10, "{kernels:?}");
    for batch in [1, 3, 16] {
        let (x, _) = batcher.batch(&train_set, &(0..batch).collect::<Vec<_>>(), &device, None);
        let x: Vec<f32> = x.into_data().try_to_vec().unwrap();
        let a = dense.run(&x, batch).unwrap().to_vec();
        let b = sparse.run(&x, batch).unwrap().to_vec();
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() < 1e-3 * (1.0 + u.abs()), "batch {batch}: {u} vs {v}");
        }
    }
}

#[test]
fn lottery_tickets_rewind_to_the_initial_weights_and_retrain() {
    let s = setup();
    let initial = build(ModelSpec::Lenet5, [1, 28, 28], 1, &s.device);
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let ps = PruneSettings { sparsity: 0.8, global: true, ..PruneSettings::default() };
    let schedule = PruneSchedule::Lottery { rounds: 2 };
    let ts = settings(2, 0.003);
    let out = prune(
        &s.baseline,
        &ps,
        &PruneOptions { schedule: schedule.clone(), fine_tune: Some(ts.clone()), rewind_to: Some(&initial) },
        data,
        TrainRun { device: &s.device, seed: 3, observer: &mut Quiet },
    )
    .unwrap();
    assert_eq!(out.tickets.len(), 2);
    assert!((out.tickets[0].0 - (1.0 - 0.2f64.sqrt())).abs() < 1e-4 && (out.tickets[1].0 - 0.8).abs() < 1e-4);
    assert_eq!(out.history.len(), 4, "each round retrains for the fine-tuning's epochs");
    let masks = out.masks.as_ref().unwrap();
    assert!((masks.sparsity() - 0.8).abs() < 1e-4);
    let acc = evaluate(&out.graph, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    eprintln!("LeNet-5: lottery ticket at 80 %, two rounds of two epochs from initialisation: {acc}");
    assert!(acc > 0.85, "{acc}");
    // Retraining starts from the initial weights: with a vanishing learning rate the survivors
    // are the initial values, not the trained ones.
    let frozen = settings(1, 1e-12);
    let one = PruneSchedule::Lottery { rounds: 1 };
    let out = prune(
        &s.baseline,
        &ps,
        &PruneOptions { schedule: one.clone(), fine_tune: Some(frozen.clone()), rewind_to: Some(&initial) },
        data,
        TrainRun { device: &s.device, seed: 3, observer: &mut Quiet },
    )
    .unwrap();
    let fc1 = s.baseline.node_id("fc1").unwrap();
    let (init, trained, ticket) = (weights(&initial, fc1), weights(&s.baseline, fc1), weights(&out.graph, fc1));
    let survivors: Vec<usize> = (0..ticket.len()).filter(|&i| ticket[i] != 0.0).collect();
    assert!(survivors.len() > ticket.len() / 10);
    assert!(survivors.iter().all(|&i| (ticket[i] - init[i]).abs() < 1e-6));
    assert!(survivors.iter().any(|&i| (ticket[i] - trained[i]).abs() > 1e-3));
    // Without initial weights there is nothing to rewind to.
    let err = prune(
        &s.baseline,
        &ps,
        &PruneOptions { schedule: schedule.clone(), fine_tune: Some(ts.clone()), rewind_to: None },
        data,
        TrainRun { device: &s.device, seed: 3, observer: &mut Quiet },
    )
    .unwrap_err();
    assert!(err.to_string().contains("initial weights"), "{err}");
}

#[test]
fn sensitivity_measures_each_layer_alone_and_sets_ratios_for_a_budget() {
    let s = setup();
    let data = TrainData { train: &s.train, validation: None, batcher: &s.batcher };
    let reference = evaluate(&s.baseline, &s.test, &s.batcher, 250, &s.device).unwrap().top1;
    let mut measure = |g: &Graph| -> Result<(f64, f64), shrink_prune::Error> {
        let ev = evaluate(g, &s.test, &s.batcher, 250, &s.device)?;
        Ok((ev.top1, ev.loss))
    };
    let ps = PruneSettings { skip: vec!["fc3".into()], ..PruneSettings::default() };
    let units = shrink_prune::sensitivity(&s.baseline, data, &ps, &[0.5, 0.97], &s.device, &mut measure).unwrap();
    let names: Vec<&str> = units.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["conv1", "conv2", "fc1", "fc2"]);
    for u in &units {
        assert_eq!(u.points.len(), 2);
        // Removing 97 % of a layer's weights costs more than removing half.
        assert!(u.points[1].2 > u.points[0].2, "{}: {:?}", u.name, u.points);
    }
    eprintln!("sensitivity at 97 %: {:?}", units.iter().map(|u| (&u.name, u.points[1].1)).collect::<Vec<_>>());
    let chosen = shrink_prune::ratios_for_drop(&units, reference, 0.01);
    assert_eq!(chosen.len(), 4);
    for (o, u) in chosen.iter().zip(&units) {
        let ok: Vec<f64> = u.points.iter().filter(|p| p.1 >= reference - 0.01).map(|p| p.0).collect();
        assert_eq!(o.sparsity, ok.iter().copied().fold(0.0, f64::max), "{}", u.name);
        assert_eq!(o.pattern, u.name);
    }
    // Channel groups too: LeNet's four groups, each pruned alone.
    let pc = PruneSettings { granularity: Granularity::Channels, ..PruneSettings::default() };
    let groups = shrink_prune::sensitivity(&s.baseline, data, &pc, &[0.5], &s.device, &mut measure).unwrap();
    assert_eq!(groups.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["conv1", "conv2", "fc1", "fc2"]);
}

#[test]
fn sparse_convolutions_of_every_geometry_match_the_dense_ones() {
    use shrink_core::graph::{Conv2dSpec, GraphBuilder};
    use shrink_core::runtime::{FreezeOptions, KernelRegistry, freeze_with};
    let device = BackendKind::Flex.device().unwrap();
    let g = {
        let mut b = GraphBuilder::new([3, 13, 21]);
        let x = b.input();
        // Direct path: 5×5 padded, 1×1, 3×3 unpadded; im2col path: strided, dilated.
        let x = b.conv2d("c5", x, Conv2dSpec::new(8, 5).padding(2).bias(true));
        let x = b.relu("r5", x);
        let x = b.conv2d("c1", x, Conv2dSpec::new(8, 1));
        let x = b.conv2d("c3", x, Conv2dSpec::new(6, 3).bias(true));
        let x = b.conv2d("s2", x, Conv2dSpec::new(6, 3).stride(2).padding(1));
        let x = b.conv2d("d2", x, Conv2dSpec::new(4, 3).dilation(2).padding(2));
        let x = b.flatten("flat", x);
        let y = b.linear("fc", x, 5, true);
        b.build(y, &mut InitRng::seeded(11), &device).unwrap().valid()
    };
    let (train_set, _) = load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k")).unwrap();
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let ps = PruneSettings { sparsity: 0.8, ..PruneSettings::default() };
    let pruned = prune(
        &g,
        &ps,
        &PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: None, rewind_to: None },
        data,
        TrainRun { device: &device, seed: 0, observer: &mut Quiet },
    )
    .unwrap()
    .graph;
    let mut dense = freeze_with(&pruned, &KernelRegistry::default(), &FreezeOptions::default()).unwrap();
    let mut sparse = freeze_with(&pruned, &shrink_prune::sparse_registry(), &FreezeOptions::default()).unwrap();
    let kernels: Vec<String> = sparse.kernels().into_iter().map(|(_, k)| k).collect();
    assert_eq!(kernels.iter().filter(|k| k.contains("direct-spmm")).count(), 3, "{kernels:?}");
    assert_eq!(kernels.iter().filter(|k| k.contains("im2col-spmm")).count(), 2, "{kernels:?}");
    for batch in [1, 5] {
        let x: Vec<f32> = (0..batch * 3 * 13 * 21).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
        let (a, b) = (dense.run(&x, batch).unwrap().to_vec(), sparse.run(&x, batch).unwrap().to_vec());
        for (u, v) in a.iter().zip(&b) {
            assert!((u - v).abs() < 1e-4 * (1.0 + u.abs()), "batch {batch}: {u} vs {v}");
        }
    }
}

#[test]
fn imported_concatenating_models_lose_channels_through_their_concats() {
    // SqueezeNet's fire modules and DenseNet's dense blocks concatenate branches: from the ONNX
    // model zoo's graphs (imported at 32×32, which their pooling allows), channels are removed
    // from the branches and from every layer that reads the concatenation.
    let device = BackendKind::Flex.device().unwrap();
    let (train_set, _) = load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k")).unwrap();
    let train_set = train_set.subset(&shuffled(train_set.len(), 3)[..64]).converted([3, 32, 32]).unwrap();
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../core/tests/fixtures/onnx/light");
    for model in ["light_squeezenet.onnx", "light_densenet121.onnx"] {
        let options = shrink_core::onnx::ImportOptions { input_shape: Some([3, 32, 32]), ..Default::default() };
        let g = shrink_core::onnx::import(&fixtures.join(model), &options, &device).unwrap().graph;
        let groups = g.coupling_groups().unwrap();
        let concat_fed = |gr: &shrink_core::graph::CouplingGroup| {
            gr.prunable && gr.carriers.iter().any(|&c| g.nodes[c].op.kind() == "concat")
        };
        assert!(groups.iter().filter(|gr| concat_fed(gr)).count() >= 8, "{model}: groups through concats");
        let ps = PruneSettings { granularity: Granularity::Channels, sparsity: 0.25, ..PruneSettings::default() };
        let options = PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: None, rewind_to: None };
        let out = prune(&g, &ps, &options, data, TrainRun { device: &device, seed: 0, observer: &mut Quiet }).unwrap();
        out.graph.validate().unwrap();
        let thinned =
            out.rounds[0].iter().filter(|p| concat_fed(&groups[p.group]) && p.keep.len() < p.channels).count();
        assert!(thinned >= 8, "{model}: {thinned} concatenated groups thinned");
        let (before, after) = (model_stats(&g).unwrap(), model_stats(&out.graph).unwrap());
        assert!(after.params * 10 < before.params * 8, "{model}: {} → {} params", before.params, after.params);
        let x = burn::tensor::Tensor::<4>::zeros([2, 3, 32, 32], &device);
        assert_eq!(out.graph.forward(x).dims(), [2, 1000], "{model}");
    }
}
