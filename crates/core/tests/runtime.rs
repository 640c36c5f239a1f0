//! The frozen CPU plan computes what burn's forward computes, for every zoo model.

use burn::module::Module;
use burn::tensor::Distribution;
use shrink_core::InitRng;
use shrink_core::graph::{Conv2dSpec, GraphBuilder};
use shrink_core::runtime::{FreezeOptions, KernelRegistry, freeze, freeze_with};
use shrink_core::zoo::ModelSpec;
use shrink_core::{BackendKind, Graph};

/// Trains nothing, but gives batch norms non-trivial statistics, so folding is really tested.
fn with_random_bn_stats(graph: Graph) -> Graph {
    use burn::module::{Param, RunningState};
    use shrink_core::graph::Params;
    let device = BackendKind::Flex.device().unwrap();
    let mut g = graph;
    for node in &mut g.nodes {
        if let Some(Params::BatchNorm(bn)) = &mut node.params {
            let c = bn.gamma.dims()[0];
            bn.gamma = Param::from_tensor(InitRng::seeded(107).tensor([c], Distribution::Uniform(0.5, 1.5), &device));
            bn.beta = Param::from_tensor(InitRng::seeded(108).tensor([c], Distribution::Uniform(-0.5, 0.5), &device));
            bn.running_mean =
                RunningState::new(InitRng::seeded(109).tensor([c], Distribution::Uniform(-0.3, 0.3), &device));
            bn.running_var =
                RunningState::new(InitRng::seeded(110).tensor([c], Distribution::Uniform(0.5, 2.0), &device));
        }
    }
    g
}

fn assert_close(graph: &Graph, batch: usize, threads: usize) {
    // The default kernels (rten-gemm) and the `gemm`-crate alternative.
    for registry in [KernelRegistry::default(), KernelRegistry::gemm_crate()] {
        assert_close_with(graph, batch, threads, &registry);
    }
}

fn assert_close_with(graph: &Graph, batch: usize, threads: usize, registry: &KernelRegistry) {
    let device = BackendKind::Flex.device().unwrap();
    let g = graph.clone().valid();
    let [c, h, w] = g.input_shape();
    let x = InitRng::seeded(111).tensor([batch, c, h, w], Distribution::Normal(0.0, 1.0), &device);
    let expected: Vec<f32> = g.forward(x.clone()).into_data().try_to_vec().unwrap();
    let input: Vec<f32> = x.into_data().try_to_vec().unwrap();
    let mut plan = freeze_with(&g, registry, &FreezeOptions { threads }).unwrap();
    for _ in 0..2 {
        let got = plan.run(&input, batch).unwrap();
        assert_eq!(got.len(), expected.len());
        let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (a, b) in got.iter().zip(&expected) {
            assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b} (scale {scale})");
        }
    }
}

#[test]
fn every_zoo_model_matches_burn() {
    let device = BackendKind::Flex.device().unwrap();
    let cases = [
        (ModelSpec::CifarResnet { depth: 20, width: 1.0 }, [3, 32, 32]),
        (ModelSpec::CifarResnet { depth: 8, width: 0.5 }, [1, 28, 28]),
        (ModelSpec::Resnet { depth: 18 }, [3, 64, 64]),
        (ModelSpec::Resnet { depth: 34 }, [3, 32, 32]),
        (ModelSpec::Lenet5, [1, 28, 28]),
        (ModelSpec::Mlp { hidden: vec![32, 16] }, [1, 28, 28]),
    ];
    for (spec, input) in cases {
        let g = with_random_bn_stats(spec.build(input, 10, 9, &device).unwrap());
        assert_close(&g, 3, 1);
    }
    let g = with_random_bn_stats(
        ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([3, 16, 16], 10, 9, &device).unwrap(),
    );
    assert_close(&g, 4, 2);
    assert_close(&g, 1, 2);
}

#[test]
fn grouped_depthwise_strided_dilated_and_pooling_layers_match() {
    let device = BackendKind::Flex.device().unwrap();
    let mut b = GraphBuilder::new([4, 13, 11]);
    let x = b.input();
    let a = b.conv2d("grouped", x, Conv2dSpec::new(8, 3).groups(2).padding(1).bias(true));
    let a = b.conv2d("depthwise", a, Conv2dSpec::new(8, 3).groups(8).stride(2).padding(1));
    let a = b.batch_norm("bn", a);
    let a = b.conv2d("dilated", a, Conv2dSpec::new(6, 3).dilation(2).padding(2).bias(true));
    let r = b.relu("relu", a);
    let m = b.max_pool("max", r, 3, 2, 1);
    let v = b.avg_pool("avg", r, 3, 2, 1);
    let s = b.add("sum", &[m, v]);
    let y = b.linear("fc", s, 5, true);
    let g = with_random_bn_stats(b.build(y, &mut InitRng::seeded(4), &device).unwrap());
    assert_close(&g, 2, 1);
}

#[test]
fn batch_norm_is_folded_and_relu_fused() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 28, 28], 10, 0, &device).unwrap();
    let plan = freeze(&g).unwrap();
    let kernels = plan.kernels();
    // No batch norm and no standalone ReLU survive in a ResNet: all are folded or fused.
    assert!(kernels.iter().all(|(_, k)| !k.starts_with("batch_norm") && k != "relu/f32"), "{kernels:?}");
    // The convolutions run on the direct kernel of the CPU's best path (im2col on rten-gemm
    // where it has none); each block's residual add and ReLU join the convolution before them.
    let isa = shrink_core::kernels::isa::selected();
    let how = if isa == shrink_core::kernels::isa::Isa::Portable {
        "im2col-rten-gemm".to_string()
    } else {
        format!("direct-{}", isa.f32_path().name())
    };
    let stem = kernels.iter().find(|(n, _)| n == "stem.conv").unwrap();
    assert_eq!(stem.1, format!("conv2d/f32-{how}+relu"));
    let second = kernels.iter().find(|(n, _)| n == "layer1.0.2.conv").unwrap();
    // (On AVX2, eight lanes: the 16-channel layers take the channel algorithm, `-channels`.)
    assert!(second.1.starts_with(&format!("conv2d/f32-{how}")) && second.1.ends_with("+add+relu"), "{second:?}");
    assert!(kernels.iter().all(|(_, k)| !k.starts_with("add")), "{kernels:?}");
    // Buffers are reused: far fewer than steps.
    assert!(plan.buffer_count() <= 5, "{} buffers for {} steps", plan.buffer_count(), kernels.len());
}

/// Convolutions on the channel algorithm hand their output to the next one in its blocked
/// layout where the plan paired them: the same bits as the same kernels without hand-overs (a
/// registry whose one builder declines every layer has none), at 1 and 2 threads, batch 1 and 3.
#[test]
fn blocked_hand_overs_give_the_same_bits() {
    let device = BackendKind::Flex.device().unwrap();
    let g = with_random_bn_stats(
        ModelSpec::CifarResnet { depth: 8, width: 2.0 }.build([3, 16, 16], 10, 0, &device).unwrap(),
    );
    let mut without = KernelRegistry::fusing_epilogues();
    without.register("declines", |_: &shrink_core::runtime::LayerView<'_>| None);
    for threads in [1, 2] {
        let mut plan = freeze_with(&g, &KernelRegistry::default(), &FreezeOptions { threads }).unwrap();
        let mut plain = freeze_with(&g, &without, &FreezeOptions { threads }).unwrap();
        let labels = plan.kernels();
        let isa = shrink_core::kernels::isa::selected();
        if isa != shrink_core::kernels::isa::Isa::Portable {
            // Each block's first convolution (32 or more channels) hands over to its second.
            let out = labels.iter().filter(|(_, k)| k.contains("-blocked-out")).count();
            let inn = labels.iter().filter(|(_, k)| k.contains("-blocked-in")).count();
            assert!(out >= 2 && out == inn, "{labels:?}");
            assert!(plain.kernels().iter().all(|(_, k)| !k.contains("blocked")));
        }
        for batch in [1, 3] {
            let x: Vec<f32> = (0..batch * 3 * 16 * 16).map(|i| (i % 29) as f32 / 29.0 - 0.5).collect();
            let want = plain.run(&x, batch).unwrap().to_vec();
            assert_eq!(plan.run(&x, batch).unwrap(), &want[..], "{threads} threads, batch {batch}");
        }
    }
}

#[test]
fn wrong_input_size_is_an_error() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Lenet5.build([1, 28, 28], 10, 0, &device).unwrap();
    let mut plan = freeze(&g).unwrap();
    assert!(plan.run(&[0.0; 100], 1).is_err());
    assert!(plan.run(&[], 0).is_err());
    assert_eq!(plan.run(&vec![0.0; 2 * 784], 2).unwrap().len(), 20);
}

#[test]
fn profile_times_every_step_and_computes_what_run_computes() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([3, 16, 16], 10, 0, &device).unwrap();
    let mut plan = freeze(&g).unwrap();
    let x: Vec<f32> = (0..2 * 3 * 16 * 16).map(|i| (i % 17) as f32 / 17.0).collect();
    let expected = plan.run(&x, 2).unwrap().to_vec();
    let profile = plan.profile(&x, 2).unwrap();
    let steps: Vec<(String, String)> = profile.iter().map(|(n, k, _)| (n.clone(), k.clone())).collect();
    assert_eq!(steps, plan.kernels());
    assert!(profile.iter().any(|(_, _, t)| !t.is_zero()), "{profile:?}");
    // The profile ran the same pass: the plan's buffers hold the same output.
    assert_eq!(plan.run(&x, 2).unwrap(), &expected[..]);
    assert!(plan.profile(&x[1..], 2).is_err());
}

/// A batch larger than the images whose buffers fit the cache budget runs in chunks, on one
/// thread and on two: the same bits as the images one by one.
#[test]
fn large_batches_run_in_chunks_with_the_same_bits() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([3, 64, 64], 10, 0, &device).unwrap();
    let per = 3 * 64 * 64;
    for threads in [1, 2] {
        let mut plan = freeze_with(&g, &KernelRegistry::default(), &FreezeOptions { threads }).unwrap();
        let batch = 2 * plan.images_per_pass() + 1;
        assert!(plan.images_per_pass() < 4, "{}", plan.images_per_pass());
        let x: Vec<f32> = (0..batch * per).map(|i| (i % 23) as f32 / 23.0 - 0.5).collect();
        let one_by_one: Vec<f32> = x.chunks(per).flat_map(|image| plan.run(image, 1).unwrap().to_vec()).collect();
        assert_eq!(plan.run(&x, batch).unwrap(), &one_by_one[..], "{threads} threads");
    }
}

#[test]
fn folded_conv_batch_norm_matches_within_1e5() {
    let device = BackendKind::Flex.device().unwrap();
    let mut b = GraphBuilder::new([8, 10, 10]);
    let x = b.input();
    let c = b.conv2d("conv", x, Conv2dSpec::new(16, 3).padding(1).bias(true));
    let n = b.batch_norm("bn", c);
    let g = with_random_bn_stats(b.build(n, &mut InitRng::seeded(12), &device).unwrap()).valid();
    let xin = InitRng::seeded(112).tensor([2, 8, 10, 10], Distribution::Normal(0.0, 1.0), &device);
    let expected: Vec<f32> = g.forward(xin.clone()).into_data().try_to_vec().unwrap();
    let mut plan = freeze(&g).unwrap();
    assert_eq!(plan.kernels().len(), 1, "batch norm folded into the conv: one step");
    let got = plan.run(&xin.into_data().try_to_vec::<f32>().unwrap(), 2).unwrap();
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in got.iter().zip(&expected) {
        assert!((a - b).abs() <= 1e-5 * scale, "{a} vs {b}");
    }
}

#[test]
fn relu_fuses_through_a_folded_batch_norm() {
    let device = BackendKind::Flex.device().unwrap();
    let g = with_random_bn_stats(
        ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 12, 12], 10, 0, &device).unwrap(),
    );
    let (folded, _) = g.fold_batch_norms().unwrap();
    let kernels = freeze(&folded).unwrap().kernels();
    assert!(kernels.iter().all(|(_, k)| k != "relu/f32"), "{kernels:?}");
    assert_close(&folded, 2, 1);
}
