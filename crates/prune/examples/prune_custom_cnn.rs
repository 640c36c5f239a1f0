//! Structured pruning of a network of your own: a small CNN with a residual block, described as
//! a shrink graph with `GraphBuilder`, trained on the MNIST digits that ship with shrink, then
//! half the channels of every coupling group removed by L1 norm — physically, so the convolutions
//! themselves shrink — with the residual add keeping the stem and the block's output consistent,
//! and one epoch of fine-tuning. Prints the accuracy, parameters, MACs and CPU-plan latency
//! before and after.
//!
//! `cargo run --release -p shrink-prune --example prune_custom_cnn`

use std::path::Path;

use shrink_core::data::{Augmentation, Batcher, load_mnist_dir};
use shrink_core::graph::{Conv2dSpec, GraphBuilder};
use shrink_core::metrics::{LatencySettings, measure_plan_latency, model_stats};
use shrink_core::train::{OptimizerSettings, Quiet, Schedule, TrainData, TrainRun, TrainSettings, evaluate, train};
use shrink_core::{BackendKind, Graph};
use shrink_prune::{Criterion, Granularity, PruneOptions, PruneSchedule, PruneSettings, prune};

/// conv-bn-relu → [conv-bn-relu → conv-bn] + skip → relu → pool → conv-bn-relu (stride 2) →
/// flatten → linear.
/// The network, its initial weights drawn from `seed`.
fn custom_cnn(seed: u64, device: &burn::tensor::Device) -> shrink_core::Result<Graph> {
    let mut b = GraphBuilder::new([1, 28, 28]);
    let x = b.input();
    let x = b.conv2d("stem.conv", x, Conv2dSpec::new(16, 3).padding(1));
    let x = b.batch_norm("stem.bn", x);
    let stem = b.relu("stem.relu", x);
    let y = b.conv2d("block.conv1", stem, Conv2dSpec::new(16, 3).padding(1));
    let y = b.batch_norm("block.bn1", y);
    let y = b.relu("block.relu1", y);
    let y = b.conv2d("block.conv2", y, Conv2dSpec::new(16, 3).padding(1));
    let y = b.batch_norm("block.bn2", y);
    let x = b.add("block.add", &[stem, y]);
    let x = b.relu("block.relu", x);
    let x = b.max_pool("pool", x, 2, 2, 0);
    let x = b.conv2d("head.conv", x, Conv2dSpec::new(32, 3).stride(2).padding(1));
    let x = b.batch_norm("head.bn", x);
    let x = b.relu("head.relu", x);
    let x = b.flatten("flatten", x);
    let x = b.linear("fc", x, 10, true);
    b.build(x, &mut shrink_core::InitRng::seeded(seed), device)
}

fn plan_ms(graph: &Graph) -> shrink_core::Result<f64> {
    let settings = LatencySettings { batch_sizes: vec![64], warmup: 3, repeats: 15 };
    Ok(measure_plan_latency(graph, 1, &settings)?[0].median_ms)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = BackendKind::Flex.device()?;
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k");
    let (train_set, test_set) = load_mnist_dir(&data_dir)?;
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let adam = |epochs| TrainSettings {
        epochs,
        batch_size: 64,
        optimizer: OptimizerSettings::Adam { lr: 0.01, weight_decay: 0.0 },
        schedule: Schedule::Cosine { min_lr: 0.0 },
        warmup_epochs: 0.0,
    };
    let (dense, _) = train(custom_cnn(1, &device)?, data, &adam(3), &device, 7, &mut Quiet)?;

    // Half the channels of every prunable group, ranked by the L1 norm of their filters; the
    // logits (the last linear layer's outputs) are never removed.
    let settings = PruneSettings {
        granularity: Granularity::Channels,
        criterion: Criterion::L1,
        sparsity: 0.5,
        ..PruneSettings::default()
    };
    let tune = TrainSettings { optimizer: OptimizerSettings::Adam { lr: 0.002, weight_decay: 0.0 }, ..adam(1) };
    let outcome = prune(
        &dense,
        &settings,
        &PruneOptions { schedule: PruneSchedule::OneShot, fine_tune: Some(tune.clone()), rewind_to: None },
        data,
        TrainRun { device: &device, seed: 7, observer: &mut Quiet },
    )?;
    let pruned = outcome.graph;

    let (before, after) = (model_stats(&dense)?, model_stats(&pruned)?);
    let (acc_before, acc_after) =
        (evaluate(&dense, &test_set, &batcher, 250, &device)?, evaluate(&pruned, &test_set, &batcher, 250, &device)?);
    let (ms_before, ms_after) = (plan_ms(&dense)?, plan_ms(&pruned)?);
    for plan in &outcome.rounds[0] {
        println!("  {:?}: {} of {} channels kept", plan.producers, plan.keep.len(), plan.channels);
    }
    println!(
        "test top-1 {:.3} → {:.3}; parameters {} → {} ({:.3}×); MACs {:.2} M → {:.2} M ({:.3}×)",
        acc_before.top1,
        acc_after.top1,
        before.params,
        after.params,
        after.params as f64 / before.params as f64,
        before.macs as f64 / 1e6,
        after.macs as f64 / 1e6,
        after.macs as f64 / before.macs as f64,
    );
    println!(
        "CPU plan, batch 64, 1 thread: {ms_before:.2} ms → {ms_after:.2} ms (one measurement each, not a benchmark)"
    );

    // What the example promises, checked.
    let stem = pruned.node_id("stem.conv")?;
    let conv2 = pruned.node_id("block.conv2")?;
    let out_channels = |id: usize| pruned.shapes().map(|s| s[id].channels());
    assert_eq!(out_channels(stem)?, 8, "half of the stem's 16 channels removed");
    assert_eq!(out_channels(stem)?, out_channels(conv2)?, "the residual add keeps both sides equal");
    assert!(after.macs * 10 < before.macs * 4, "at least 60 % of the MACs removed: {} of {}", after.macs, before.macs);
    assert!(acc_before.top1 > 0.9, "the dense CNN learned the digits: {}", acc_before.top1);
    assert!(acc_after.top1 > acc_before.top1 - 0.02, "within 2 pp after fine-tuning: {}", acc_after.top1);
    Ok(())
}
