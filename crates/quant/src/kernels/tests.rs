//! The integer kernels against each other and against rten: every path gives the same bits.
//! (rten is the reference only where its kernel is exact: its AVX2 and AVX-512-without-VNNI
//! kernels saturate pairs of products, and the plan never uses them — see [`reference_gemm`].)

use rten_gemm::{GemmInputA, GemmInputB, GemmOptions, QuantParams as RtenQuant};
use rten_tensor::NdTensorView;
use shrink_core::graph::{Op, ValueShape};
use shrink_core::runtime::{Kernel, LayerView, RunContext};

use super::*;
use crate::QuantParams;
use crate::scheme::quantize_u8;

#[test]
fn quantization_rounds_ties_to_even_and_saturates() {
    let p = QuantParams { scale: 0.5, zero_point: 10 };
    let x = [0.0, 0.25, 0.75, -0.25, 1000.0, -1000.0, 122.5, f32::NAN, 1.2];
    let mut q = [0u8; 9];
    quantize_u8(&x, p, &mut q);
    // 0.25/0.5 = 0.5 -> 0 (even), 0.75/0.5 = 1.5 -> 2, -0.5 -> -0 -> 10, 255 clamp, 0 clamp.
    assert_eq!(q, [10, 10, 12, 10, 255, 0, 255, 0, 12]);
    for (&v, &q) in x.iter().zip(&q).filter(|(v, _)| v.is_finite()) {
        assert_eq!(q as f32, (v / 0.5 + 10.0).clamp(0.0, 255.0).round_ties_even());
    }
}

/// The GEMM the other kernels are compared with: rten where its kernel on this CPU is exact, else
/// shrink's AVX2 one (itself held to a scalar loop in shrink-kernels' tests).
fn reference_gemm() -> Int8Gemm {
    if rten_int8_saturates() {
        eprintln!(
            "rten's integer kernel here ({}) saturates: the reference is shrink's AVX2 GEMM",
            INT8.with(|e| e.kernel_name().to_string())
        );
        Int8Gemm::Shrink(shrink_core::kernels::isa::Isa::Avx2)
    } else {
        Int8Gemm::Rten
    }
}

/// A pseudo-random f32 in [-1, 1) from `i` (deterministic, no RNG crate).
fn noise(i: usize, salt: usize) -> f32 {
    let x = (i.wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503)) % 10_007;
    x as f32 / 5_003.5 - 1.0
}

/// Every conv kernel this CPU can run (direct VNNI, im2col on our VNNI GEMM, im2col on
/// rten) gives the same bits as im2col on rten, for geometries that cover each path of the
/// direct kernel (stride 1 and 2, rows of 32, 16 and 2 × 8 pixels, channels not a multiple
/// of 4 or 8, 1×1 (pointwise too), 3×3 and 5×5 kernels) and inputs that saturate the u8 range.
#[test]
fn every_int8_conv_kernel_gives_the_same_bits() {
    // (cin, h, w, cout, kernel, stride, padding, relu)
    let cases = [
        (3, 32, 32, 16, 3, 1, 1, true),
        (16, 16, 16, 32, 3, 2, 1, false),
        (16, 32, 32, 32, 3, 2, 1, true),
        (5, 16, 16, 10, 3, 1, 1, false),
        (16, 16, 16, 24, 1, 2, 0, false),
        (8, 8, 8, 16, 3, 1, 1, true),
        (4, 64, 64, 8, 1, 2, 0, false),
        (7, 20, 20, 9, 5, 1, 0, true),
        (6, 12, 12, 8, 3, 1, 1, false),
        // MNIST-sized maps: 28 → a 32-wide grid, 14 → 16, 7 → 8 (two rows per vector, odd
        // height), strided 28 → 14 and 14 → 7, and 17 (declined).
        (5, 28, 28, 16, 3, 1, 1, true),
        (16, 14, 14, 24, 3, 1, 1, false),
        (12, 7, 7, 8, 3, 1, 1, true),
        (16, 28, 28, 32, 3, 2, 1, false),
        (32, 14, 14, 16, 1, 2, 0, true),
        (4, 17, 17, 8, 3, 1, 1, false),
        // Pointwise (1×1, stride 1, no padding: im2col writes the quantized pixels straight
        // into the GEMM's rows), on maps the direct kernel also takes.
        (24, 7, 7, 72, 1, 1, 0, false),
        (40, 8, 8, 20, 1, 1, 0, true),
    ];
    for (case, &(cin, h, w, cout, k, stride, pad, relu)) in cases.iter().enumerate() {
        let op = Op::Conv2d {
            in_channels: cin,
            out_channels: cout,
            kernel: [k, k],
            stride: [stride, stride],
            padding: [pad, pad],
            dilation: [1, 1],
            groups: 1,
            bias: true,
        };
        let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
        let weight: Vec<f32> = (0..cout * cin * k * k).map(|i| noise(i, case) * 0.5).collect();
        let bias: Vec<f32> = (0..cout).map(|i| noise(i, 99 + case)).collect();
        let view = LayerView {
            name: "conv",
            op: &op,
            weight: &weight,
            weight_shape: &[cout, cin, k, k],
            bias: Some(&bias),
            input: ValueShape::Map { channels: cin, height: h, width: w },
            output: ValueShape::Map { channels: cout, height: oh, width: ow },
            relu,
            activation: None,
            residual: false,
            read_by: None,
            reads_from: None,
        };
        let symmetric = IntLayer {
            weight_bits: 8,
            weight_scales: (0..cout).map(|o| 0.5 / 127.0 * (1.0 + o as f32 / cout as f32)).collect(),
            weight_zero_points: Vec::new(),
            // Inputs span [-1.2, 1.2) against a range of about [-0.9, 1.1]: some saturate.
            input: QuantParams { scale: 2.0 / 255.0, zero_point: 115 },
            dynamic: false,
            output: None,
        };
        // Asymmetric weights (zero points −3..=3, int4 on the last cases).
        let asymmetric = IntLayer {
            weight_bits: if case % 3 == 2 { 4 } else { 8 },
            weight_zero_points: (0..cout).map(|o| (o as i32 % 7) - 3).collect(),
            ..symmetric.clone()
        };
        for layer in [symmetric, asymmetric] {
            let batch = 3;
            let input: Vec<f32> = (0..batch * cin * h * w).map(|i| noise(i, 7 + case) * 1.2).collect();
            let run = |kernel: &dyn Kernel| {
                let mut out = vec![f32::NAN; batch * cout * oh * ow];
                kernel.run(&[&input], &mut out, batch, &mut [], &RunContext::sequential());
                out
            };
            let reference = run(&ConvInt8::with_gemm(&view, &layer, reference_gemm()).expect("conv"));
            assert!(reference.iter().all(|v| v.is_finite()));
            for isa in shrink_core::kernels::int8::paths_for_test("every_int8_conv_kernel_gives_the_same_bits") {
                let im2col = run(&ConvInt8::with_gemm(&view, &layer, Int8Gemm::Shrink(isa)).expect("conv"));
                assert_eq!(im2col, reference, "im2col on the {isa:?} GEMM, case {case}");
                // Rows of 17 pixels (a 32-wide grid) are left to im2col.
                let direct_path = shrink_core::kernels::int8::DirectConv::runs_on(isa);
                match ConvDirectInt8::with_isa(&view, &layer, isa) {
                    Some(direct) => assert_eq!(run(&direct), reference, "direct {isa:?}, case {case}"),
                    None => assert!(!direct_path || ow == 17, "the direct kernel declined case {case} on {isa:?}"),
                }
            }
        }
    }
}

/// The linear layer gives the same bits on shrink's GEMMs as on the reference, static and dynamic,
/// with input widths that are not a multiple of 4 and outputs that are not of 16.
#[test]
fn int8_linear_gives_the_same_bits_on_both_gemms() {
    for (case, &(k, n, dynamic, relu)) in
        [(10, 3, false, true), (64, 16, true, false), (301, 45, false, false), (7, 130, true, true)].iter().enumerate()
    {
        let op = Op::Linear { in_features: k, out_features: n, bias: true };
        let weight: Vec<f32> = (0..n * k).map(|i| noise(i, 20 + case) * 0.3).collect();
        let bias: Vec<f32> = (0..n).map(|i| noise(i, 30 + case)).collect();
        let view = LayerView {
            name: "fc",
            op: &op,
            weight: &weight,
            weight_shape: &[n, k],
            bias: Some(&bias),
            input: ValueShape::Flat { features: k },
            output: ValueShape::Flat { features: n },
            relu,
            activation: None,
            residual: false,
            read_by: None,
            reads_from: None,
        };
        let layer = IntLayer {
            weight_bits: 8,
            weight_scales: (0..n).map(|o| 0.3 / 127.0 * (1.0 + o as f32 / n as f32)).collect(),
            // Asymmetric weights in the odd cases.
            weight_zero_points: if case % 2 == 1 { (0..n).map(|o| (o as i32 % 5) - 2).collect() } else { Vec::new() },
            input: QuantParams { scale: 1.5 / 255.0, zero_point: 140 },
            dynamic,
            output: None,
        };
        let batch = 5;
        let input: Vec<f32> = (0..batch * k).map(|i| noise(i, 40 + case)).collect();
        let run = |kernel: &dyn Kernel| {
            let mut out = vec![f32::NAN; batch * n];
            kernel.run(&[&input], &mut out, batch, &mut [], &RunContext::sequential());
            out
        };
        let reference = run(&LinearInt8::with_gemm(&view, &layer, reference_gemm()).expect("linear"));
        assert!(reference.iter().all(|v| v.is_finite()));
        // Close to the f32 layer on the inputs clipped to the calibrated range (static), so
        // the reference itself is right.
        let p = layer.input;
        let (lo, hi) =
            if dynamic { (-1.0, 1.0) } else { (-p.zero_point as f32 * p.scale, (255 - p.zero_point) as f32 * p.scale) };
        for (b, row) in reference.chunks_exact(n).enumerate() {
            for (j, &y) in row.iter().enumerate() {
                let x = &input[b * k..(b + 1) * k];
                let w = &weight[j * k..(j + 1) * k];
                let f: f32 = x.iter().zip(w).map(|(x, w)| x.clamp(lo, hi) * w).sum::<f32>() + bias[j];
                let f = if relu { f.max(0.0) } else { f };
                assert!((y - f).abs() < 0.05 * (1.0 + f.abs()), "case {case} ({b},{j}): {y} vs {f}");
            }
        }
        for isa in shrink_core::kernels::int8::paths_for_test("int8_linear_gives_the_same_bits_on_both_gemms") {
            let ours = run(&LinearInt8::with_gemm(&view, &layer, Int8Gemm::Shrink(isa)).expect("linear"));
            assert_eq!(ours, reference, "{isa:?}, case {case}");
        }
    }
}

#[test]
fn rten_int8_gemm_subtracts_zero_points() {
    let (m, k, n) = (3, 5, 4);
    let a: Vec<u8> = (0..m * k).map(|i| (i * 37 % 251) as u8).collect();
    let b: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
    let (za, zb) = (vec![128u8; m], vec![-3i8; n]);
    let mut c = vec![0i32; m * n];
    INT8.with(|e| {
        let opts = GemmOptions {
            a_quant: Some(RtenQuant { zero_point: &za }),
            b_quant: Some(RtenQuant { zero_point: &zb }),
            ..Default::default()
        };
        e.gemm(
            &mut c,
            GemmInputA::Unpacked(NdTensorView::from_data([m, k], &a[..])),
            GemmInputB::Unpacked(NdTensorView::from_data([k, n], &b[..])),
            opts,
        )
        .unwrap();
    });
    for i in 0..m {
        for j in 0..n {
            let r: i32 = (0..k).map(|p| (a[i * k + p] as i32 - 128) * (b[p * n + j] as i32 + 3)).sum();
            assert_eq!(c[i * n + j], r, "({i},{j})");
        }
    }
}

/// What the kernels rely on: B (the weights) pre-packed once with a zero point of 0, A
/// (activations) with a zero point per row. (rten's `prepack_a` ignores zero points, which
/// is why weights go on the B side.)
#[test]
fn rten_int8_gemm_with_prepacked_weights_on_the_right() {
    let (m, k, n) = (7, 300, 19);
    let a: Vec<u8> = (0..m * k).map(|i| (i * 37 % 251) as u8).collect();
    let b: Vec<i8> = (0..k * n).map(|i| ((i * 53 % 255) as i32 - 127) as i8).collect();
    let (za, zb) = (vec![77u8; m], vec![0i8; n]);
    let mut c = vec![0i32; m * n];
    INT8.with(|e| {
        let packed = e.prepack_b(NdTensorView::from_data([k, n], &b[..]));
        let opts = GemmOptions {
            a_quant: Some(RtenQuant { zero_point: &za }),
            b_quant: Some(RtenQuant { zero_point: &zb }),
            ..Default::default()
        };
        e.gemm(
            &mut c,
            GemmInputA::Unpacked(NdTensorView::from_data([m, k], &a[..])),
            GemmInputB::Packed(&packed),
            opts,
        )
        .unwrap();
    });
    for i in 0..m {
        for j in 0..n {
            let r: i32 = (0..k).map(|p| (a[i * k + p] as i32 - 77) * b[p * n + j] as i32).sum();
            assert_eq!(c[i * n + j], r, "({i},{j})");
        }
    }
}
