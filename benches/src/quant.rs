//! The `quant` suite: shrink-quant's integer kernels against the f32 CPU plan they replace, on
//! the shapes issue #4 names. Each case runs every contender on the same inputs.

use shrink_core::burn::module::Module;
use shrink_core::burn::tensor::{Tensor, TensorData};
use shrink_core::runtime::{Plan, freeze};
use shrink_core::{BackendKind, Graph};
use shrink_quant::{PtqSettings, QuantParams, quantize_static};

use crate::runtime::{Case, Contender, conv3x3_graph, random, resnet20_graph};

fn gemm_case(m: usize, k: usize, n: usize) -> Case {
    let (a, b) = (random(m * k, 1), random(k * n, 2));
    // f32: the plan's GEMM (rten-gemm, right-hand side packed once).
    let f32_gemm = {
        let exec = rten_gemm::GemmExecutor::<f32, f32, f32>::default();
        let packed = exec.prepack_b(rten_tensor::NdTensorView::from_data([k, n], &b[..]));
        let a = shrink_core::runtime::aligned(&a);
        let mut c = vec![0.0f32; m * n];
        Contender {
            runner: "f32 cpu-plan".into(),
            run: Box::new(move || {
                exec.gemm(
                    &mut c,
                    rten_gemm::GemmInputA::Unpacked(rten_tensor::NdTensorView::from_data([m, k], &a[..])),
                    rten_gemm::GemmInputB::Packed(&packed),
                    rten_gemm::GemmOptions::default(),
                )
                .expect("valid shapes");
            }),
        }
    };
    // int8: u8 activations with a zero point × i8 weights packed once, as the integer kernels run it.
    let int8_gemm = {
        let exec = rten_gemm::GemmExecutor::<u8, i8, i32>::default();
        let qa: Vec<u8> = a.iter().map(|v| ((v + 0.5) * 255.0) as u8).collect();
        let qb: Vec<i8> = b.iter().map(|v| (v * 254.0) as i8).collect();
        let packed = exec.prepack_b(rten_tensor::NdTensorView::from_data([k, n], &qb[..]));
        let (za, zb) = (vec![128u8; m], vec![0i8; n]);
        let mut c = vec![0i32; m * n];
        Contender {
            runner: format!("int8 {}", exec.kernel_name()),
            run: Box::new(move || {
                let opts = rten_gemm::GemmOptions {
                    a_quant: Some(rten_gemm::QuantParams { zero_point: &za }),
                    b_quant: Some(rten_gemm::QuantParams { zero_point: &zb }),
                    ..Default::default()
                };
                exec.gemm(
                    &mut c,
                    rten_gemm::GemmInputA::Unpacked(rten_tensor::NdTensorView::from_data([m, k], &qa[..])),
                    rten_gemm::GemmInputB::Packed(&packed),
                    opts,
                )
                .expect("valid shapes");
            }),
        }
    };
    let mut contenders = vec![int8_gemm, f32_gemm];
    // Our integer GEMM on the selected path (the plans' kernel on x86): weights packed once, the
    // activations read as they are; the zero point is subtracted in the plans' epilogue.
    if cfg!(target_arch = "x86_64") {
        let isa = shrink_core::kernels::int8::path();
        let qa: Vec<u8> = a.iter().map(|v| ((v + 0.5) * 255.0) as u8).collect();
        let qb: Vec<i8> = b.iter().map(|v| (v * 254.0) as i8).collect();
        let packed = shrink_core::kernels::int8::PackedWeights::with_isa(&qb, k, n, isa);
        let lda = packed.padded_depth();
        let mut rows = vec![0u8; m * lda];
        for (dst, src) in rows.chunks_exact_mut(lda).zip(qa.chunks_exact(k)) {
            dst[..k].copy_from_slice(src);
        }
        let mut c = vec![0i32; m * packed.padded_columns()];
        contenders.insert(
            0,
            Contender {
                runner: format!("int8 shrink-{}", isa.name()),
                run: Box::new(move || shrink_core::kernels::int8::gemm(&rows, lda, m, &packed, &mut c)),
            },
        );
    }
    Case {
        name: format!("gemm {m}x{k}x{n}"),
        flops: 2.0 * (m * n * k) as f64,
        baseline: "f32 cpu-plan".into(),
        contenders,
    }
}

/// The f32 plan and the int8 plan of `graph` (calibrated on two random batches), as contenders.
fn plan_pair(graph: &Graph, input: &[f32], batch: usize) -> Vec<Contender> {
    let device = BackendKind::Flex.device().expect("flex");
    let [c, h, w] = graph.input_shape();
    let calibration: Vec<Tensor<4>> = (0..2)
        .map(|i| Tensor::from_data(TensorData::new(random(8 * c * h * w, 10 + i), [8, c, h, w]), &device))
        .collect();
    let q = quantize_static(graph, &mut calibration.into_iter(), &PtqSettings::default()).expect("quantizable");
    let mut int8: Plan = q.freeze(1).expect("freezable");
    let mut f32_plan: Plan = freeze(&q.graph).expect("freezable");
    let (i1, i2) = (input.to_vec(), input.to_vec());
    vec![
        Contender {
            runner: "int8 cpu-plan".into(),
            run: Box::new(move || {
                int8.run(&i1, batch).expect("valid input");
            }),
        },
        Contender {
            runner: "f32 cpu-plan".into(),
            run: Box::new(move || {
                f32_plan.run(&i2, batch).expect("valid input");
            }),
        },
    ]
}

fn conv_case() -> Case {
    let (batch, c, h, w) = (8, 64, 32, 32);
    let graph = conv3x3_graph();
    let input = random(batch * c * h * w, 3);
    let flops = 2.0 * (batch * 64 * h * w * c * 9) as f64;
    Case {
        name: "conv3x3 64->64 32x32 b8".into(),
        flops,
        baseline: "f32 cpu-plan".into(),
        contenders: plan_pair(&graph, &input, batch),
    }
}

/// A MobileNet-style depthwise 3×3 layer alone (padding 1, random weights, calibrated on random
/// batches) as the int8 plan and the f32 plan: the integer depthwise kernel with its input
/// quantization and epilogue against the f32 one.
fn depthwise_layer_case(channels: usize, size: usize, stride: usize, batch: usize) -> Case {
    use shrink_core::graph::{Conv2dSpec, GraphBuilder};
    let device = BackendKind::Flex.device().expect("flex");
    let mut b = GraphBuilder::new([channels, size, size]);
    let x = b.input();
    let y = b.conv2d("dw", x, Conv2dSpec::new(channels, 3).padding(1).stride(stride).groups(channels));
    let graph: Graph = b.build(y, &mut shrink_core::InitRng::seeded(2), &device).expect("valid conv").valid();
    let out = (size - 1) / stride + 1;
    let input = random(batch * channels * size * size, 3);
    Case {
        name: format!("depthwise3x3 {channels}ch {size}x{size} s{stride} b{batch}"),
        flops: 2.0 * (batch * channels * out * out * 9) as f64,
        baseline: "f32 cpu-plan".into(),
        contenders: plan_pair(&graph, &input, batch),
    }
}

fn resnet20_case(batch: usize) -> Case {
    let (graph, macs) = resnet20_graph();
    let input = random(batch * 3 * 32 * 32, 4);
    Case {
        name: format!("resnet20 cifar b{batch}"),
        flops: 2.0 * macs * batch as f64,
        baseline: "f32 cpu-plan".into(),
        contenders: plan_pair(&graph, &input, batch),
    }
}

/// Quantizing a tensor far larger than the caches (16 Mi values, 64 MiB) against copying it:
/// "GFLOP/s" counts values per second here.
fn quantize_case() -> Case {
    let len = 16 << 20;
    let x = random(len, 7);
    let p = QuantParams { scale: 1.0 / 255.0, zero_point: 128 };
    let (x1, x2) = (x.clone(), x);
    let mut q = vec![0u8; len];
    let mut copy = vec![0f32; len];
    Case {
        name: "quantize 16Mi f32 (values/s)".into(),
        flops: len as f64,
        baseline: "memcpy f32".into(),
        contenders: vec![
            Contender {
                runner: "quantize f32->u8".into(),
                run: Box::new(move || {
                    shrink_quant::scheme::quantize_u8(&x1, p, &mut q);
                    std::hint::black_box(&q);
                }),
            },
            Contender {
                runner: "memcpy f32".into(),
                run: Box::new(move || {
                    copy.copy_from_slice(&x2);
                    std::hint::black_box(&copy);
                }),
            },
        ],
    }
}

/// The cases of the `isa` suite: ResNet-20 (CIFAR-sized, random weights, calibrated on random
/// batches) as the f32 plan and the int8 plan, built on every kernel path this CPU has
/// ([`shrink_core::kernels::isa::with_selected`]), at batch 1 and 64. Each case times one path's
/// two plans interleaved, so the int8 / f32 ratio of a path is measured side by side.
pub fn isa_cases() -> Vec<Case> {
    use shrink_core::kernels::isa::{self, Isa};
    let (graph, macs) = resnet20_graph();
    let mut cases = Vec::new();
    for path in Isa::ALL.into_iter().filter(|i| i.available()) {
        for batch in [1, 64] {
            let input = random(batch * 3 * 32 * 32, 4);
            let integer = isa::with_selected(path, shrink_quant::kernels::int8_gemm_kernel_name);
            cases.push(Case {
                name: format!("resnet20 cifar b{batch} [{}; int8 on {integer}]", path.name()),
                flops: 2.0 * macs * batch as f64,
                baseline: "f32 cpu-plan".into(),
                contenders: isa::with_selected(path, || plan_pair(&graph, &input, batch)),
            });
        }
    }
    cases
}

/// The integer direct convolution on pruned weights, dense against sparse
/// (`DirectConv::into_sparse`) on the same i8 weights with a fraction `zero` of them zero (at
/// random places, as magnitude pruning leaves them), one image, f32 output: where the sparse
/// path starts to pay (`int8::sparse_max_word_density`). `None` where the selected integer path has
/// no direct convolution.
fn sparse_conv_case(channels: usize, side: usize, zero: f64) -> Option<Case> {
    use shrink_core::kernels::int8::{DirectConv, Epilogue, Output, path};
    if !DirectConv::runs_on(path()) {
        return None;
    }
    let taps = 9;
    let values = random(channels * channels * taps, 21);
    let keep = random(channels * channels * taps, 22);
    // `random` is uniform in [-0.5, 0.5): a weight is zeroed with probability `zero`.
    let weight: Vec<i8> = values
        .iter()
        .zip(&keep)
        .map(|(&v, &k)| if f64::from(k + 0.5) < zero { 0 } else { (v * 254.0) as i8 })
        .collect();
    let dense = DirectConv::new(&weight, channels, channels, [3, 3], 1);
    let density = dense.word_density();
    let (hp, wp) = DirectConv::image_size([3, 3], 1, side + 2, side + 2, side, side);
    let sparse = dense.clone().into_sparse(hp, wp);
    let image: Vec<u8> =
        random(dense.quads() * hp * wp * 4 + DirectConv::SLACK, 23).iter().map(|v| ((v + 0.5) * 255.0) as u8).collect();
    let (zeros, ones, nothing) = (vec![0i32; channels], vec![1e-3f32; channels], vec![0f32; channels]);
    let contender = |conv: DirectConv, runner: &str| {
        let (image, zeros, ones, nothing) = (image.clone(), zeros.clone(), ones.clone(), nothing.clone());
        let mut out = vec![0f32; channels * side * side];
        Contender {
            runner: runner.into(),
            run: Box::new(move || {
                let epilogue = Epilogue {
                    correction: &zeros,
                    scale: &ones,
                    bias: &nothing,
                    relu: true,
                    weight_zero: &[],
                    window_sums: &[],
                    grid: None,
                    residual: &[],
                    activation: None,
                };
                conv.run(&image, hp, wp, side, side, Output::F32(&mut out), &epilogue);
                std::hint::black_box(&out);
            }),
        }
    };
    Some(Case {
        name: format!(
            "int8 conv3x3 {channels}->{channels} {side}x{side}, {:.0} % zero (word density {density:.2})",
            zero * 100.0
        ),
        flops: 2.0 * (channels * channels * taps * side * side) as f64,
        baseline: "int8 dense direct".into(),
        contenders: vec![contender(sparse, "int8 sparse direct"), contender(dense, "int8 dense direct")],
    })
}

/// The cases of the `quant` suite.
pub fn quant_cases() -> Vec<Case> {
    let mut cases = vec![
        gemm_case(256, 256, 256),
        gemm_case(512, 512, 512),
        gemm_case(1024, 1024, 1024),
        gemm_case(64, 576, 1024),
        conv_case(),
        resnet20_case(1),
        resnet20_case(64),
        quantize_case(),
        depthwise_layer_case(32, 28, 2, 1),
        depthwise_layer_case(72, 14, 1, 1),
        depthwise_layer_case(96, 56, 1, 1),
    ];
    for (channels, side) in [(64, 32), (16, 28)] {
        for zero in [0.5, 0.7, 0.8, 0.9, 0.95] {
            cases.extend(sparse_conv_case(channels, side, zero));
        }
    }
    cases
}
