//! The `runtime` suite: shrink's CPU plan against burn-ndarray (and burn-flex, for reference),
//! on the shapes issue #3 names. Each case runs every contender on the same inputs.

use shrink_core::burn::module::Module;
use shrink_core::burn::tensor::module::conv2d;
use shrink_core::burn::tensor::ops::ConvOptions;
use shrink_core::burn::tensor::{Tensor, TensorData};
use shrink_core::graph::{Conv2dSpec, GraphBuilder};
use shrink_core::runtime::{Plan, sgemm};
use shrink_core::zoo::ModelSpec;
use shrink_core::{BackendKind, Graph};

/// One thing to time, prepared so that `run` does only the work being measured.
pub struct Contender {
    /// Who runs it: `cpu-plan`, `burn-ndarray`, `burn-flex`.
    pub runner: String,
    /// Runs the work once (outputs are read back, so lazy backends finish).
    pub run: Box<dyn FnMut()>,
}

/// A benchmark case: a name, its work in FLOPs, and the contenders; the first contender is
/// ours and `baseline` names the one ratios are taken against.
pub struct Case {
    /// Case name.
    pub name: String,
    /// Floating-point operations per run (2 × MACs).
    pub flops: f64,
    /// Runner the ratio is measured against.
    pub baseline: String,
    /// Contenders, ours first.
    pub contenders: Vec<Contender>,
}

pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// The frozen plan of `graph` as a contender: default kernels (rten-gemm) or the `gemm`-crate ones.
fn plan_contender(graph: &Graph, input: &[f32], batch: usize, gemm_crate: bool) -> Contender {
    use shrink_core::runtime::{FreezeOptions, KernelRegistry, freeze_with};
    let registry = if gemm_crate { KernelRegistry::gemm_crate() } else { KernelRegistry::default() };
    let mut plan: Plan = freeze_with(graph, &registry, &FreezeOptions::default()).expect("freezable");
    let input = input.to_vec();
    Contender {
        runner: if gemm_crate { "cpu-plan-gemm-crate".into() } else { "cpu-plan".into() },
        run: Box::new(move || {
            plan.run(&input, batch).expect("valid input");
        }),
    }
}

fn burn_backends() -> Vec<BackendKind> {
    [BackendKind::Ndarray, BackendKind::Flex].into_iter().filter(|b| b.is_compiled_in()).collect()
}

fn gemm_case(m: usize, k: usize, n: usize) -> Case {
    let (a, b) = (random(m * k, 1), random(k * n, 2));
    let c = vec![0.0f32; m * n];
    let ours = {
        // Operands in 64-byte-aligned storage, as the plan keeps weights and activations (and as
        // burn's backends keep tensors).
        let (a, b) = (shrink_core::runtime::aligned(&a), shrink_core::runtime::aligned(&b));
        let mut c = shrink_core::runtime::aligned(&c);
        Contender {
            runner: "gemm-crate".into(),
            run: Box::new(move || sgemm(m, n, k, &a, k, &b, n, &mut c, n, false, 1)),
        }
    };
    let rten = {
        let (a, b) = (a.clone(), b.clone());
        let exec = rten_gemm::GemmExecutor::<f32, f32, f32>::default();
        let mut c = vec![0.0f32; m * n];
        Contender {
            runner: "rten-gemm".into(),
            run: Box::new(move || {
                let a = rten_tensor::NdTensorView::from_data([m, k], &a[..]);
                let b = rten_tensor::NdTensorView::from_data([k, n], &b[..]);
                exec.gemm(
                    &mut c,
                    rten_gemm::GemmInputA::Unpacked(a),
                    rten_gemm::GemmInputB::Unpacked(b),
                    rten_gemm::GemmOptions::default(),
                )
                .expect("valid shapes");
            }),
        }
    };
    let rten_prepacked = {
        let b = b.clone();
        let exec = rten_gemm::GemmExecutor::<f32, f32, f32>::default();
        // The weight-like operand packed once, outside the timed loop.
        let packed = exec.prepack_a(rten_tensor::NdTensorView::from_data([m, k], &a[..]));
        let mut c = vec![0.0f32; m * n];
        Contender {
            // What the plan's convolutions run: weights packed once, at freeze time.
            runner: "cpu-plan".into(),
            run: Box::new(move || {
                let b = rten_tensor::NdTensorView::from_data([k, n], &b[..]);
                exec.gemm(
                    &mut c,
                    rten_gemm::GemmInputA::Packed(&packed),
                    rten_gemm::GemmInputB::Unpacked(b),
                    rten_gemm::GemmOptions::default(),
                )
                .expect("valid shapes");
            }),
        }
    };
    let mut contenders = vec![rten_prepacked, ours, rten];
    for backend in burn_backends() {
        let device = backend.device().expect("compiled in");
        let ta = Tensor::<2>::from_data(TensorData::new(a.clone(), [m, k]), &device);
        let tb = Tensor::<2>::from_data(TensorData::new(b.clone(), [k, n]), &device);
        contenders.push(Contender {
            runner: backend.runner_label().into(),
            run: Box::new(move || {
                let _ = ta.clone().matmul(tb.clone()).into_data();
            }),
        });
    }
    Case {
        name: format!("gemm {m}x{k}x{n}"),
        flops: 2.0 * (m * n * k) as f64,
        baseline: "burn-ndarray".into(),
        contenders,
    }
}

/// The conv case's layer: 3×3, 64 → 64 channels, padding 1, on 32×32 maps (seeded weights).
pub(crate) fn conv3x3_graph() -> Graph {
    let device = BackendKind::Flex.device().expect("flex");
    let mut b = GraphBuilder::new([64, 32, 32]);
    let x = b.input();
    let y = b.conv2d("conv", x, Conv2dSpec::new(64, 3).padding(1));
    b.build(y, &mut shrink_core::InitRng::seeded(1), &device).expect("valid conv").valid()
}

/// ResNet-20 for 3×32×32 inputs (seeded weights) and its MACs per image.
pub(crate) fn resnet20_graph() -> (Graph, f64) {
    let device = BackendKind::Flex.device().expect("flex");
    let graph: Graph =
        ModelSpec::CifarResnet { depth: 20, width: 1.0 }.build([3, 32, 32], 10, 2, &device).expect("zoo").valid();
    let macs = shrink_core::metrics::model_stats(&graph).expect("stats").macs as f64;
    (graph, macs)
}

fn conv_case() -> Case {
    let (batch, c, h, w) = (8, 64, 32, 32);
    let graph = conv3x3_graph();
    let input = random(batch * c * h * w, 3);
    let ours = plan_contender(&graph, &input, batch, false);
    let rten = plan_contender(&graph, &input, batch, true);
    let weight = match &graph.nodes[1].params {
        Some(shrink_core::graph::Params::Conv(p)) => p.weight.val().into_data(),
        _ => unreachable!("a conv node"),
    };
    let mut contenders = vec![ours, rten];
    for backend in burn_backends() {
        let device = backend.device().expect("compiled in");
        let tx = Tensor::<4>::from_data(TensorData::new(input.clone(), [batch, c, h, w]), &device);
        let tw = Tensor::<4>::from_data(weight.clone(), &device);
        contenders.push(Contender {
            runner: backend.runner_label().into(),
            run: Box::new(move || {
                let _ = conv2d(tx.clone(), tw.clone(), None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1)).into_data();
            }),
        });
    }
    let flops = 2.0 * (batch * 64 * h * w * c * 9) as f64;
    Case { name: "conv3x3 64->64 32x32 b8".into(), flops, baseline: "burn-ndarray".into(), contenders }
}

/// A MobileNet-style depthwise 3×3 layer on one image: shrink's kernel (the plan's, in the layout
/// it picks for the shape, and in each layout) against the scalar loop it replaced (the ratio's
/// baseline) and burn's grouped convolution.
fn depthwise_case(channels: usize, size: usize, stride: usize) -> Case {
    use shrink_core::kernels::depthwise::{
        DepthwiseLayout, DepthwiseShape, depthwise, depthwise_reference, depthwise_with,
    };
    fn planar(s: &DepthwiseShape, x: &[f32], w: &[f32], o: &mut [f32]) {
        depthwise_with(s, x, w, o, DepthwiseLayout::Planar)
    }
    fn channels_last(s: &DepthwiseShape, x: &[f32], w: &[f32], o: &mut [f32]) {
        depthwise_with(s, x, w, o, DepthwiseLayout::ChannelsLast)
    }
    let out = (size + 2 - 3) / stride + 1;
    let shape = DepthwiseShape {
        channels,
        input: [size, size],
        output: [out, out],
        kernel: [3, 3],
        stride: [stride, stride],
        padding: [1, 1],
        dilation: [1, 1],
    };
    let (image, weights) = (random(channels * size * size, 5), random(channels * 9, 6));
    let mut contenders = Vec::new();
    for (runner, kernel) in [
        ("cpu-plan", depthwise as fn(&DepthwiseShape, &[f32], &[f32], &mut [f32])),
        ("planar", planar),
        ("channels-last", channels_last),
        ("scalar-loop", depthwise_reference),
    ] {
        let (image, weights) = (image.clone(), weights.clone());
        let mut output = vec![0.0f32; channels * out * out];
        contenders.push(Contender {
            runner: runner.into(),
            run: Box::new(move || {
                kernel(&shape, &image, &weights, &mut output);
                std::hint::black_box(&output);
            }),
        });
    }
    for backend in burn_backends() {
        let device = backend.device().expect("compiled in");
        let tx = Tensor::<4>::from_data(TensorData::new(image.clone(), [1, channels, size, size]), &device);
        let tw = Tensor::<4>::from_data(TensorData::new(weights.clone(), [channels, 1, 3, 3]), &device);
        contenders.push(Contender {
            runner: backend.runner_label().into(),
            run: Box::new(move || {
                let options = ConvOptions::new([stride, stride], [1, 1], [1, 1], channels);
                let _ = conv2d(tx.clone(), tw.clone(), None, options).into_data();
            }),
        });
    }
    let flops = 2.0 * (channels * out * out * 9) as f64;
    Case {
        name: format!("depthwise3x3 {channels}ch {size}x{size} s{stride} b1"),
        flops,
        baseline: "scalar-loop".into(),
        contenders,
    }
}

fn resnet20_case(batch: usize) -> Case {
    let (graph, macs) = resnet20_graph();
    let input = random(batch * 3 * 32 * 32, 4);
    let ours = plan_contender(&graph, &input, batch, false);
    let rten = plan_contender(&graph, &input, batch, true);
    let mut contenders = vec![ours, rten];
    for backend in burn_backends() {
        let device = backend.device().expect("compiled in");
        let g = graph.clone().to_device(&device);
        let x = Tensor::<4>::from_data(TensorData::new(input.clone(), [batch, 3, 32, 32]), &device);
        contenders.push(Contender {
            runner: backend.runner_label().into(),
            run: Box::new(move || {
                let _ = g.forward(x.clone()).into_data();
            }),
        });
    }
    Case {
        name: format!("resnet20 cifar b{batch}"),
        flops: 2.0 * macs * batch as f64,
        baseline: "burn-ndarray".into(),
        contenders,
    }
}

/// Threads that keep every core busy while a contender runs ([`Hogs::set_busy`]) and sleep
/// otherwise, standing in for the other work of a shared machine. Stopped when dropped.
pub struct Hogs {
    busy: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Hogs {
    /// Whether the hogs spin (or sleep).
    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, std::sync::atomic::Ordering::Relaxed);
    }

    /// Starts `count` hogs, asleep.
    pub fn start(count: usize) -> Self {
        use std::sync::atomic::Ordering;
        let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        for _ in 0..count {
            let (busy, stop) = (busy.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut x = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    if busy.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                        }
                    } else {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            });
        }
        Self { busy, stop }
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One thread against two for the plan on ResNet-20 at batch 64: on an idle machine, and with
/// `hogs` threads spinning beside it (on a busy 2-core machine two threads must not be slower
/// than one).
fn threads_case(hogs: usize) -> Case {
    use shrink_core::runtime::{FreezeOptions, KernelRegistry, freeze_with};
    let (graph, macs) = resnet20_graph();
    let batch = 64;
    let input = random(batch * 3 * 32 * 32, 5);
    let load = std::sync::Arc::new(Hogs::start(hogs));
    let contenders = [1usize, 2]
        .into_iter()
        .map(|threads| {
            let mut plan =
                freeze_with(&graph, &KernelRegistry::default(), &FreezeOptions { threads }).expect("freezable");
            let input = input.clone();
            let load = load.clone();
            Contender {
                runner: if threads == 1 { "cpu-plan".into() } else { format!("cpu-plan-{threads}t") },
                run: Box::new(move || {
                    load.busy.store(true, std::sync::atomic::Ordering::Relaxed);
                    plan.run(&input, batch).expect("valid input");
                    load.busy.store(false, std::sync::atomic::Ordering::Relaxed);
                }),
            }
        })
        .collect();
    let name = match hogs {
        0 => "resnet20 cifar b64 threads".into(),
        n => format!("resnet20 cifar b64 threads, {n} busy threads beside"),
    };
    Case { name, flops: 2.0 * macs * batch as f64, baseline: "cpu-plan".into(), contenders }
}

/// The cases of the `runtime` suite (inputs are fixed pseudo-random values: speed does not
/// depend on them).
pub fn runtime_cases() -> Vec<Case> {
    vec![
        gemm_case(512, 512, 512),
        gemm_case(64, 576, 1024),
        conv_case(),
        depthwise_case(96, 56, 1),
        depthwise_case(144, 56, 2),
        depthwise_case(128, 28, 1),
        depthwise_case(72, 14, 1),
        depthwise_case(32, 28, 2),
        depthwise_case(256, 7, 1),
        resnet20_case(1),
        resnet20_case(64),
        threads_case(0),
        threads_case(2),
    ]
}
