//! The `prune` suite: shrink-prune's sparse kernels against the dense f32 GEMM of the CPU plan,
//! at the sparsities issue #5 names, and pruned ResNet-20 plans against the dense one. FLOPs
//! (and so GFLOP/s) count the dense work: the sparse rows' GFLOP/s are "effective".

use shrink_core::Graph;
use shrink_core::runtime::{FreezeOptions, KernelRegistry, Plan, freeze_with};
use shrink_prune::kernels::{Csr, spmm};
use shrink_prune::{Granularity, PruneOptions, PruneSettings, prune, sparse_registry};

use crate::runtime::{Case, Contender, conv3x3_graph, random, resnet20_graph};

/// `values` with the `sparsity` fraction of smallest magnitudes set to zero (what magnitude
/// pruning leaves: scattered, unstructured zeros).
fn pruned(values: &[f32], sparsity: f64) -> Vec<f32> {
    let keep = shrink_prune::magnitude_mask(values, sparsity);
    values.iter().zip(keep).map(|(v, k)| v * k).collect()
}

fn gemm_case(m: usize, k: usize, n: usize, sparsity: f64) -> Case {
    let a = pruned(&random(m * k, 1), sparsity);
    let b = random(k * n, 2);
    // Dense: the plan's conv GEMM — rten-gemm with the weights (A) packed once.
    let dense = {
        let exec = rten_gemm::GemmExecutor::<f32, f32, f32>::default();
        let packed = exec.prepack_a(rten_tensor::NdTensorView::from_data([m, k], &a[..]));
        let b = shrink_core::runtime::aligned(&b);
        let mut c = vec![0.0f32; m * n];
        Contender {
            runner: "dense f32 cpu-plan".into(),
            run: Box::new(move || {
                exec.gemm(
                    &mut c,
                    rten_gemm::GemmInputA::Packed(&packed),
                    rten_gemm::GemmInputB::Unpacked(rten_tensor::NdTensorView::from_data([k, n], &b[..])),
                    rten_gemm::GemmOptions::default(),
                )
                .expect("valid shapes");
            }),
        }
    };
    let sparse = {
        let csr = Csr::from_dense(&a, m, k);
        let mut c = vec![0.0f32; m * n];
        Contender {
            runner: "sparse csr".into(),
            run: Box::new(move || {
                spmm(&csr, &b, n, n, &mut c, n);
                std::hint::black_box(&c);
            }),
        }
    };
    Case {
        name: format!("gemm {m}x{k}x{n} at {:.0} % sparsity", sparsity * 100.0),
        flops: 2.0 * (m * n * k) as f64,
        baseline: "dense f32 cpu-plan".into(),
        contenders: vec![sparse, dense],
    }
}

fn plan(graph: &Graph, registry: &KernelRegistry) -> Plan {
    freeze_with(graph, registry, &FreezeOptions { threads: 1 }).expect("freezable")
}

fn plan_contender(runner: &str, mut plan: Plan, input: &[f32], batch: usize) -> Contender {
    let input = input.to_vec();
    Contender {
        runner: runner.into(),
        run: Box::new(move || {
            plan.run(&input, batch).expect("valid input");
        }),
    }
}

/// `graph` pruned without fine-tuning (the speed does not depend on training).
fn pruned_graph(graph: &Graph, granularity: Granularity, sparsity: f64) -> Graph {
    let device = shrink_core::BackendKind::Flex.device().expect("flex");
    let shape = graph.input_shape();
    let data = shrink_core::data::Dataset::new(shape, Vec::new(), Vec::new(), 10).expect("an empty set");
    let normalization = shrink_core::data::Normalization { mean: vec![0.0; shape[0]], std: vec![1.0; shape[0]] };
    let batcher = shrink_core::data::Batcher { normalization, augmentation: Default::default() };
    let settings =
        PruneSettings { granularity, sparsity, global: granularity == Granularity::Weights, ..Default::default() };
    let data = shrink_core::train::TrainData { train: &data, validation: None, batcher: &batcher };
    let run = shrink_core::train::TrainRun { device: &device, seed: 0, observer: &mut shrink_core::train::Quiet };
    prune(graph, &settings, &PruneOptions::default(), data, run).expect("prunable").graph
}

fn conv_case(sparsity: f64) -> Case {
    let batch = 8;
    let graph = pruned_graph(&conv3x3_graph(), Granularity::Weights, sparsity);
    let input = random(batch * 64 * 32 * 32, 3);
    Case {
        name: format!("conv3x3 64->64 32x32 b8 at {:.0} % sparsity", sparsity * 100.0),
        flops: 2.0 * (batch * 64 * 32 * 32 * 64 * 9) as f64,
        baseline: "dense f32 cpu-plan".into(),
        contenders: vec![
            plan_contender("sparse cpu-plan", plan(&graph, &sparse_registry()), &input, batch),
            plan_contender("dense f32 cpu-plan", plan(&graph, &KernelRegistry::default()), &input, batch),
        ],
    }
}

fn resnet_case(batch: usize) -> Vec<Case> {
    let (graph, macs) = resnet20_graph();
    let input = random(batch * 3 * 32 * 32, 4);
    let dense = || plan_contender("dense f32 cpu-plan", plan(&graph, &KernelRegistry::default()), &input, batch);
    let channels = pruned_graph(&graph, Granularity::Channels, 0.5);
    let sparse = pruned_graph(&graph, Granularity::Weights, 0.9);
    vec![
        Case {
            name: format!("resnet20 cifar b{batch}, 50 % of channels removed"),
            flops: 2.0 * macs * batch as f64,
            baseline: "dense f32 cpu-plan".into(),
            contenders: vec![
                plan_contender("channel-pruned cpu-plan", plan(&channels, &KernelRegistry::default()), &input, batch),
                dense(),
            ],
        },
        Case {
            name: format!("resnet20 cifar b{batch}, 90 % of weights zero (global)"),
            flops: 2.0 * macs * batch as f64,
            baseline: "dense f32 cpu-plan".into(),
            contenders: vec![
                plan_contender("sparse cpu-plan", plan(&sparse, &sparse_registry()), &input, batch),
                dense(),
            ],
        },
    ]
}

/// The cases of the `prune` suite.
pub fn prune_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (m, k, n) in [(512, 512, 512), (64, 576, 1024)] {
        for s in [0.5, 0.7, 0.8, 0.9, 0.95] {
            cases.push(gemm_case(m, k, n, s));
        }
    }
    cases.push(conv_case(0.9));
    cases.extend(resnet_case(64));
    cases
}
