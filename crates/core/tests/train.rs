//! Training on the real MNIST-5k data: loss goes down, accuracy goes up, runs are deterministic.

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
    device.seed(seed);
    let graph = ModelSpec::Mlp { hidden: vec![64] }.build([1, 28, 28], 10, &device).unwrap();
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
