//! Property tests: every integer convolution kernel on every ISA path this CPU has — the direct
//! convolution and im2col on our GEMM, on AVX-512 VNNI and on AVX2, and im2col on rten-gemm
//! (which picks its kernel itself; held to the reference only where that kernel is exact) — and
//! our GEMMs alone give exactly the bits of a plain scalar reference, over random geometries,
//! weights (symmetric and asymmetric, 2 to 8 bits) and inputs. A path the CPU lacks is skipped
//! with a message, and fails where `SHRINK_REQUIRE_ISA` names it.

use proptest::prelude::*;
use shrink_core::graph::{Op, ValueShape};
use shrink_core::kernels::activation::Activation;
use shrink_core::kernels::int8;
use shrink_core::runtime::{Kernel, LayerView, RunContext};
use shrink_quant::QuantParams;
use shrink_quant::kernels::{ConvDirectInt8, ConvInt8, Int8Gemm, IntLayer, dequantize, rten_int8_saturates};
use shrink_quant::scheme::quantize_u8;

/// One random convolution: geometry, integer weights and their zero points, input.
#[derive(Clone, Debug)]
struct ConvCase {
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    relu: bool,
    /// A clip or hard-swish fused after the layer (the plan's `LayerView::activation`).
    activation: Option<Activation>,
    bits: u32,
    asymmetric: bool,
    /// `[cout, cin, k, k]`, in the signed storage range of `bits`.
    weights: Vec<i8>,
    /// One per output channel (all 0 when symmetric).
    weight_zero: Vec<i8>,
    weight_scale: Vec<f32>,
    bias: Vec<f32>,
    input_zero: i32,
    /// `[batch, cin, h, w]`.
    input: Vec<f32>,
    batch: usize,
}

impl ConvCase {
    fn output(&self) -> (usize, usize) {
        let o = |n: usize| (n + 2 * self.padding - self.kernel) / self.stride + 1;
        (o(self.h), o(self.w))
    }
}

fn conv_case() -> impl Strategy<Value = ConvCase> {
    (1usize..=12, 1usize..=34, 1usize..=34, 1usize..=20, prop_oneof![Just(1usize), Just(3), Just(5)], 1usize..=2)
        .prop_flat_map(|(cin, h, w, cout, kernel, stride)| {
            // Padding that leaves at least one output pixel.
            let min_pad = kernel.saturating_sub(h.min(w)).div_ceil(2);
            (
                Just((cin, h, w, cout, kernel, stride)),
                min_pad..=min_pad + 2,
                any::<bool>(),
                prop_oneof![Just(2u32), Just(4), Just(8)],
                any::<bool>(),
                1usize..=3,
                prop_oneof![
                    Just(None),
                    Just(Some(Activation::Clip { min: -0.4, max: 0.7 })),
                    Just(Some(Activation::HARD_SWISH))
                ],
            )
        })
        .prop_flat_map(|((cin, h, w, cout, kernel, stride), padding, relu, bits, asymmetric, batch, activation)| {
            let half = 1i32 << (bits - 1);
            let (lo, hi) = if asymmetric { (-half, half - 1) } else { (-(half - 1), half - 1) };
            let n = cout * cin * kernel * kernel;
            (
                Just((cin, h, w, cout, kernel, stride, padding, relu, activation, bits, asymmetric, batch)),
                // A third of the cases pruned (90 % of the stored weights 0: the direct
                // kernel's sparse path, which skips zero words).
                (
                    proptest::collection::vec((lo..=hi).prop_map(|v| v as i8), n),
                    0u8..3,
                    proptest::collection::vec(0u8..10, n),
                )
                    .prop_map(|(w, pruned, mask)| {
                        w.into_iter().zip(mask).map(|(w, m)| if pruned == 0 && m < 9 { 0 } else { w }).collect()
                    }),
                proptest::collection::vec((lo..=hi).prop_map(|v| v as i8), cout),
                proptest::collection::vec(0.001f32..0.05, cout),
                proptest::collection::vec(-1.0f32..1.0, cout),
                0i32..=255,
                proptest::collection::vec(-3.0f32..3.0, batch * cin * h * w),
            )
        })
        .prop_map(|(g, weights, zeros, weight_scale, bias, input_zero, input)| {
            let (cin, h, w, cout, kernel, stride, padding, relu, activation, bits, asymmetric, batch) = g;
            let weight_zero = if asymmetric { zeros } else { vec![0; cout] };
            ConvCase {
                cin,
                h,
                w,
                cout,
                kernel,
                stride,
                padding,
                relu,
                activation,
                bits,
                asymmetric,
                weights,
                weight_zero,
                weight_scale,
                bias,
                input_zero,
                input,
                batch,
            }
        })
}

/// The scalar reference: the input rounded to u8 as the kernels define it (`quantize_u8`),
/// padding holding the zero point, `Σ (a − a_zero)(w − w_zero)` in i32, then the epilogue and
/// the activation.
fn reference(c: &ConvCase, input: QuantParams) -> Vec<f32> {
    let (oh, ow) = c.output();
    let (k, p, s) = (c.kernel, c.padding as isize, c.stride);
    let mut out = Vec::with_capacity(c.batch * c.cout * oh * ow);
    let mut q = vec![0u8; c.cin * c.h * c.w];
    for b in 0..c.batch {
        quantize_u8(&c.input[b * q.len()..(b + 1) * q.len()], input, &mut q);
        for o in 0..c.cout {
            let (scale, wz) = (input.scale * c.weight_scale[o], c.weight_zero[o] as i32);
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0i32;
                    for ch in 0..c.cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (y, x) = ((oy * s + ky) as isize - p, (ox * s + kx) as isize - p);
                                let inside = y >= 0 && x >= 0 && (y as usize) < c.h && (x as usize) < c.w;
                                let a = if inside {
                                    q[(ch * c.h + y as usize) * c.w + x as usize] as i32
                                } else {
                                    input.zero_point
                                };
                                let wq = c.weights[((o * c.cin + ch) * k + ky) * k + kx] as i32;
                                acc += (a - input.zero_point) * (wq - wz);
                            }
                        }
                    }
                    let y = dequantize(acc, 0, 0, 0, scale, c.bias[o], c.relu);
                    out.push(c.activation.map_or(y, |a| a.apply(y)));
                }
            }
        }
    }
    out
}

fn check_conv(c: &ConvCase) -> Result<(), TestCaseError> {
    let (oh, ow) = c.output();
    let op = Op::Conv2d {
        in_channels: c.cin,
        out_channels: c.cout,
        kernel: [c.kernel; 2],
        stride: [c.stride; 2],
        padding: [c.padding; 2],
        dilation: [1, 1],
        groups: 1,
        bias: true,
    };
    let per = c.cin * c.kernel * c.kernel;
    // The f32 weights the kernels are given: each stored integer's value, `scale · (q − zero)`.
    let weight: Vec<f32> = c
        .weights
        .iter()
        .enumerate()
        .map(|(i, &q)| c.weight_scale[i / per] * (q as i32 - c.weight_zero[i / per] as i32) as f32)
        .collect();
    let view = LayerView {
        name: "conv",
        op: &op,
        weight: &weight,
        weight_shape: &[c.cout, c.cin, c.kernel, c.kernel],
        bias: Some(&c.bias),
        input: ValueShape::Map { channels: c.cin, height: c.h, width: c.w },
        output: ValueShape::Map { channels: c.cout, height: oh, width: ow },
        relu: c.relu,
        activation: c.activation,
        residual: false,
        read_by: None,
        reads_from: None,
    };
    let input = QuantParams { scale: 4.0 / 255.0, zero_point: c.input_zero };
    let layer = IntLayer {
        weight_bits: c.bits,
        weight_scales: c.weight_scale.clone(),
        weight_zero_points: if c.asymmetric { c.weight_zero.iter().map(|&z| z as i32).collect() } else { Vec::new() },
        input,
        dynamic: false,
        output: None,
    };
    let want = reference(c, input);
    let run = |kernel: &dyn Kernel| {
        let mut out = vec![f32::NAN; want.len()];
        kernel.run(&[&c.input], &mut out, c.batch, &mut [], &RunContext::sequential());
        out
    };
    let same_bits = |got: &[f32], path: &str| -> Result<(), TestCaseError> {
        match got.iter().zip(&want).position(|(a, b)| a.to_bits() != b.to_bits()) {
            Some(i) => Err(TestCaseError::fail(format!(
                "{path}: output {i} is {} where the reference gives {}",
                got[i], want[i]
            ))),
            None => Ok(()),
        }
    };
    // rten's AVX2 kernel (and AVX-512 without VNNI) saturates pairs of products: the plan never
    // uses it, and it is held to the reference only where it is exact.
    if !rten_int8_saturates() {
        let rten = ConvInt8::with_gemm(&view, &layer, Int8Gemm::Rten).expect("groups = 1");
        same_bits(&run(&rten), "im2col on rten-gemm")?;
    }
    for isa in int8::paths_for_test("kernel_properties::integer_convolutions_equal_the_scalar_reference") {
        let im2col = ConvInt8::with_gemm(&view, &layer, Int8Gemm::Shrink(isa)).expect("groups = 1");
        same_bits(&run(&im2col), &format!("im2col on the {isa:?} GEMM"))?;
        match ConvDirectInt8::with_isa(&view, &layer, isa) {
            Some(direct) => {
                same_bits(&run(&direct), &format!("the direct {isa:?} convolution: {}", direct.label()))?;
                // Pruned weights take the sparse path, exactly below the crossover.
                let density =
                    int8::DirectConv::with_isa(&c.weights, c.cout, c.cin, [c.kernel; 2], c.stride, isa).word_density();
                prop_assert_eq!(
                    direct.label().contains("sparse"),
                    density <= int8::sparse_max_word_density(isa),
                    "word density {}",
                    density
                );
            }
            None => prop_assert!(
                !int8::DirectConv::runs_on(isa) || !int8::DirectConv::supports(oh, ow),
                "declined a supported {oh}x{ow} output on {isa:?}"
            ),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn integer_convolutions_equal_the_scalar_reference(c in conv_case()) {
        check_conv(&c)?;
    }

    /// shrink's integer GEMMs against `Σ a · w` in i32, with rows padded to any `lda`, on every
    /// path this CPU has.
    #[test]
    fn int8_gemm_equals_the_scalar_reference(
        (m, k, n, pad, seed) in (1usize..=40, 1usize..=300, 1usize..=70, 0usize..=9, any::<u64>())
    ) {
        for isa in int8::paths_for_test("kernel_properties::int8_gemm_equals_the_scalar_reference") {
        let mut state = seed | 1;
        let mut next = move || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; state };
        let a: Vec<u8> = (0..m * k).map(|_| next() as u8).collect();
        let w: Vec<i8> = (0..k * n).map(|_| next() as i8).collect();
        let packed = int8::PackedWeights::with_isa(&w, k, n, isa);
        let lda = packed.padded_depth() + pad;
        let mut rows = vec![0xA5u8; m * lda];
        for r in 0..m {
            rows[r * lda..r * lda + k].copy_from_slice(&a[r * k..(r + 1) * k]);
        }
        let ldc = packed.padded_columns();
        let mut c = vec![-1i32; m * ldc];
        int8::gemm(&rows, lda, m, &packed, &mut c);
        for r in 0..m {
            for j in 0..n {
                let want: i32 = (0..k).map(|p| a[r * k + p] as i32 * w[p * n + j] as i32).sum();
                prop_assert_eq!(c[r * ldc + j], want, "{:?} {}x{}x{} at ({}, {})", isa, m, k, n, r, j);
            }
        }
        }
    }
}
