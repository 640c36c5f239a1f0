//! A network of your own, described as a shrink graph with `GraphBuilder` — a small CNN with a
//! residual block — then trained on the MNIST digits that ship with shrink, frozen into the CPU
//! inference plan, saved and loaded back. Because it is a graph, shrink's passes see its
//! structure: the coupling groups printed below are what structured pruning removes channels by
//! (the residual add ties the stem's channels to the block's last convolution), and the same
//! graph goes to static quantization and the CPU plan.
//!
//! `cargo run --release -p shrink-core --example custom_cnn`

use std::path::Path;

use shrink_core::data::{Augmentation, Batcher, load_mnist_dir};
use shrink_core::graph::{Conv2dSpec, GraphBuilder};
use shrink_core::metrics::model_stats;
use shrink_core::train::{
    OptimizerSettings, Quiet, Schedule, TrainData, TrainSettings, evaluate, evaluate_plan, train,
};
use shrink_core::{BackendKind, Graph, io, runtime};

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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = BackendKind::Flex.device()?;
    let graph = custom_cnn(1, &device)?;
    let stats = model_stats(&graph)?;
    println!("custom CNN: {} nodes, {} parameters, {:.2} M MACs per image", graph.nodes.len(), stats.params, {
        stats.macs as f64 / 1e6
    });

    // Structure the passes read: channels that must be kept or removed together.
    let groups = graph.coupling_groups()?;
    for g in groups.iter().filter(|g| g.prunable) {
        let names: Vec<&str> = g.producers().map(|id| graph.nodes[id].name.as_str()).collect();
        println!("  coupling group of {} channels produced by {names:?}", g.channels);
    }
    let residual = groups.iter().find(|g| g.producers().count() == 2).expect("the residual add couples two convs");
    let producers: Vec<&str> = residual.producers().map(|id| graph.nodes[id].name.as_str()).collect();
    assert_eq!(producers, ["stem.conv", "block.conv2"], "the skip ties the stem to the block's output");

    // Train on the digits that ship with shrink (4,000 training, 1,000 test images).
    let data_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/mnist5k");
    let (train_set, test_set) = load_mnist_dir(&data_dir)?;
    let batcher = Batcher { normalization: train_set.channel_stats(), augmentation: Augmentation::default() };
    let settings = TrainSettings {
        epochs: 3,
        batch_size: 64,
        optimizer: OptimizerSettings::Adam { lr: 0.01, weight_decay: 0.0 },
        schedule: Schedule::Cosine { min_lr: 0.0 },
        warmup_epochs: 0.0,
    };
    let data = TrainData { train: &train_set, validation: None, batcher: &batcher };
    let (trained, epochs) = train(graph, data, &settings, &device, 7, &mut Quiet)?;
    let on_burn = evaluate(&trained, &test_set, &batcher, 250, &device)?;
    let last = epochs.last().expect("three epochs");
    println!("trained {} epochs: loss {:.3}; test top-1 on burn {:.3}", epochs.len(), last.train_loss, on_burn.top1);

    // The CPU inference plan: batch norms folded into the convolutions, ReLUs fused, f32 GEMMs.
    let mut plan = runtime::freeze(&trained)?;
    let on_plan = evaluate_plan(&mut plan, &test_set, &batcher, 250, &device)?;
    println!("CPU plan: test top-1 {:.3} ({} kernels)", on_plan.top1, plan.kernels().len());

    // A model file (safetensors, the graph in its header), loaded back.
    let path = std::env::temp_dir().join(format!("shrink-custom-cnn-{}.safetensors", std::process::id()));
    io::save(&trained, &path)?;
    let bytes = std::fs::metadata(&path)?.len();
    let loaded = io::load(&path, &device)?;
    std::fs::remove_file(&path)?;
    let again = evaluate(&loaded, &test_set, &batcher, 250, &device)?;
    println!("model file: {bytes} bytes; loaded back: test top-1 {:.3}", again.top1);

    // What the example promises, checked.
    assert!(on_burn.top1 > 0.9, "the custom CNN learned the digits: {}", on_burn.top1);
    assert!(
        on_plan.errors().abs_diff(on_burn.errors()) <= 1,
        "the plan computes the same network: {} vs {} errors",
        on_plan.errors(),
        on_burn.errors()
    );
    assert_eq!(again.confusion, on_burn.confusion, "the loaded model predicts exactly as the saved one");
    Ok(())
}
