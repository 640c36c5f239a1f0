//! Training on the real MNIST-5k data: loss goes down, accuracy goes up, runs are deterministic.

use shrink_core::InitRng;
use std::path::Path;

use shrink_core::BackendKind;
use shrink_core::data::{Augmentation, Batcher, load_mnist_dir};
use shrink_core::train::{OptimizerSettings, Quiet, Schedule, TrainData, TrainSettings, evaluate, train};
use shrink_core::zoo::ModelSpec;

fn mnist() -> (shrink_core::data::Dataset, shrink_core::data::Dataset) {
    load_mnist_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k")).unwrap()
}

#[test]
fn mnist5k_loads_as_documented() {
    let (train_set, test_set) = mnist();
    assert_eq!((train_set.len(), test_set.len()), (4000, 1000));
    assert_eq!(train_set.shape, [1, 28, 28]);
    assert_eq!(train_set.class_counts(), vec![400; 10]);
    assert_eq!(test_set.class_counts(), vec![100; 10]);
}

fn run(seed: u64) -> (Vec<f64>, f64, Vec<Vec<usize>>) {
    let (train_set, test_set) = mnist();
    let train_set = train_set.subset(&shrink_core::data::shuffled(train_set.len(), 1)[..1000]);
    let device = BackendKind::Flex.device().unwrap();
    let graph = ModelSpec::Mlp { hidden: vec![64] }.build([1, 28, 28], 10, seed, &device).unwrap();
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let settings = TrainSettings {
        epochs: 3,
        batch_size: 50,
        optimizer: OptimizerSettings::Sgd { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 5e-4 },
        schedule: Schedule::Cosine { min_lr: 0.0 },
        warmup_epochs: 0.0,
    };
    let before = evaluate(&graph, &test_set, &batcher, 500, &device).unwrap();
    let (trained, history) = train(
        graph,
        TrainData { train: &train_set, validation: None, batcher: &batcher },
        &settings,
        &device,
        seed,
        &mut Quiet,
    )
    .unwrap();
    let after = evaluate(&trained, &test_set, &batcher, 500, &device).unwrap();
    assert!(before.top1 < 0.3, "untrained accuracy {}", before.top1);
    let losses: Vec<f64> = history.iter().map(|r| r.train_loss).collect();
    (losses, after.top1, after.confusion)
}

#[test]
fn training_lowers_the_loss_and_is_deterministic() {
    let (losses, acc, confusion) = run(5);
    assert!(losses[2] < losses[0] * 0.7, "losses {losses:?}");
    assert!(acc > 0.8, "test accuracy after 3 epochs on 1000 images: {acc}");
    assert_eq!(confusion.iter().flatten().sum::<usize>(), 1000);
    let again = run(5);
    assert_eq!(again.0, losses, "same seed, same losses");
    assert_eq!(again.1, acc);
}

#[test]
fn a_diverging_run_stops_at_its_step_naming_the_node() {
    let (train_set, _) = mnist();
    let train_set = train_set.subset(&(0..200).collect::<Vec<_>>());
    let device = BackendKind::Flex.device().unwrap();
    let graph = ModelSpec::Mlp { hidden: vec![32] }.build([1, 28, 28], 10, 0, &device).unwrap();
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let settings = TrainSettings {
        epochs: 2,
        batch_size: 20,
        optimizer: OptimizerSettings::Sgd { lr: 1e30, momentum: 0.0, nesterov: false, weight_decay: 0.0 },
        schedule: Schedule::Constant,
        warmup_epochs: 0.0,
    };
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let err = train(graph.clone(), data, &settings, &device, 1, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains("at epoch 1 step"), "{err}");
    let names: Vec<&str> = graph.nodes.iter().map(|n| n.name.as_str()).collect();
    assert!(names.iter().any(|n| err.contains(&format!("node `{n}`"))), "names a node of {names:?}: {err}");
}

#[test]
fn a_batch_that_cannot_fit_is_refused_before_it_is_allocated() {
    use shrink_core::graph::{Conv2dSpec, GraphBuilder};
    use shrink_core::metrics::{activation_bytes, available_memory};
    let device = BackendKind::Flex.device().unwrap();
    let mut b = GraphBuilder::new([1, 1024, 1024]);
    let x = b.input();
    let x = b.conv2d("wide", x, Conv2dSpec::new(256, 3).padding(1));
    let x = b.relu("relu", x);
    let x = b.global_avg_pool("pool", x);
    let x = b.linear("fc", x, 2, true);
    let graph = b.build(x, &mut InitRng::seeded(0), &device).unwrap();
    let n = 64;
    let need = activation_bytes(&graph, n).unwrap();
    assert!(need > 100 << 30, "{need} bytes");
    let Some(available) = available_memory() else { return };
    assert!(need > available, "the test needs a machine with less than {need} bytes available");
    let data = shrink_core::data::Dataset::new([1, 1024, 1024], vec![0; n << 20], vec![0; n], 2).unwrap();
    let batcher = Batcher { normalization: data.channel_stats(), augmentation: Augmentation::default() };
    let settings = TrainSettings {
        epochs: 1,
        batch_size: n,
        optimizer: OptimizerSettings::Sgd { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0 },
        schedule: Schedule::Constant,
        warmup_epochs: 0.0,
    };
    let train_data = TrainData { train: &data, validation: None, batcher: &batcher };
    let err = train(graph.clone(), train_data, &settings, &device, 1, &mut Quiet).unwrap_err().to_string();
    assert!(err.contains("batch_size") && err.contains("GiB") && err.contains("smaller batch"), "{err}");
    let err = evaluate(&graph, &data, &batcher, n, &device).unwrap_err().to_string();
    assert!(err.contains("batch_size") && err.contains("GiB"), "{err}");
}
