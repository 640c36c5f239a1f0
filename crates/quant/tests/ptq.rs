//! Static PTQ end to end on small graphs: the integer kernels against a reference integer loop,
//! the integer plan against the simulated (fake-quant) forward, overrides, error budgets.

use burn::tensor::{Distribution, Tensor};
use shrink_core::BackendKind;
use shrink_core::InitRng;
use shrink_core::graph::{Conv2dSpec, GraphBuilder};
use shrink_core::zoo::ModelSpec;
use shrink_quant::calibrate::Calibrator;
use shrink_quant::{Override, PtqSettings, QuantScheme, quantize_static};

fn device() -> burn::tensor::Device {
    BackendKind::Flex.device().unwrap()
}

/// `n` batches of 8 images drawn from `seed`.
fn batches(shape: [usize; 3], n: usize, seed: u64) -> Vec<Tensor<4>> {
    let mut rng = InitRng::seeded(seed);
    (0..n).map(|_| rng.tensor([8, shape[0], shape[1], shape[2]], Distribution::Normal(0.0, 1.0), &device())).collect()
}

fn to_vec<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

/// One conv (+bias, ReLU) and a linear layer, quantized, against the same integer arithmetic
/// written out as plain loops: `side`×`side` inputs, the given stride (where the CPU has AVX-512
/// VNNI the 16, 28 and 32 wide inputs and the 14-wide strided one, whose 7-wide output the
/// kernel computes two rows at a time, run on the direct kernel; the 9×9 one on im2col + GEMM),
/// symmetric or asymmetric weights.
///
/// With `depthwise`, the convolution is a depthwise one over 16 channels instead (one filter per
/// channel: the integer depthwise kernel).
fn check_against_reference_loop(side: usize, stride: usize, settings: &PtqSettings, depthwise: bool) {
    let cout = 16;
    let (cin, groups) = if depthwise { (cout, cout) } else { (3, 1) };
    let mut b = GraphBuilder::new([cin, side, side]);
    let x = b.input();
    let c = b.conv2d("conv", x, Conv2dSpec { stride, padding: 1, bias: true, groups, ..Conv2dSpec::new(cout, 3) });
    let r = b.relu("relu", c);
    let f = b.flatten("flat", r);
    let o = (side + 2 - 3) / stride + 1;
    let features = cout * o * o;
    let l = b.linear("fc", f, 4, true);
    let mut g = b.build(l, &mut InitRng::seeded(3), &device()).unwrap();
    // Skewed weights (each shifted by a third of its layer's largest magnitude), so asymmetric
    // ranges get zero points far from the middle.
    fn skew<const D: usize>(w: &mut burn::module::Param<Tensor<D>>) {
        let t = w.val();
        let shift = t.clone().abs().max().into_scalar::<f32>() / 3.0;
        *w = burn::module::Param::from_tensor(t.add_scalar(shift));
    }
    for node in &mut g.nodes {
        match &mut node.params {
            Some(shrink_core::graph::Params::Conv(p)) => skew(&mut p.weight),
            Some(shrink_core::graph::Params::Linear(p)) => skew(&mut p.weight),
            _ => {}
        }
    }
    let calib = batches([cin, side, side], 2, 5);
    let q = quantize_static(&g, &mut calib.clone().into_iter(), settings).unwrap();
    let mut plan = q.freeze(1).unwrap();
    let labels = plan.kernels();
    let conv_kernel = if depthwise { "conv2d/int8-depthwise" } else { "conv2d/int8" };
    assert!(labels.iter().any(|(n, k)| n == "conv" && k.starts_with(conv_kernel)), "{labels:?}");
    assert!(labels.iter().any(|(n, k)| n == "fc" && k.starts_with("linear/int8")), "{labels:?}");
    let context = format!("{side}x{side} stride {stride}, {settings:?}, kernels {labels:?}");

    let input = to_vec(calib[0].clone().narrow(0, 0, 1));
    // The kernels' rounding: multiply by the reciprocal scale, round half to even, saturate.
    let quant_u8 = |v: f32, s: f32, zp: i32| (v * (1.0 / s) + zp as f32).clamp(0.0, 255.0).round_ties_even() as i32;
    // A stored weight and its zero point: symmetric rounds w / s; asymmetric adds the zero point
    // and saturates to the signed range of the bits.
    let int_weight = |lq: &shrink_quant::LayerQuant, w: f32, o: usize| -> (i32, i32) {
        let half = 1 << (lq.weight_bits - 1);
        match lq.weight_zero_points.get(o) {
            Some(&z) => (((w / lq.weight_scales[o]).round() as i32 + z).clamp(-half, half - 1), z),
            None => ((w / lq.weight_scales[o]).round() as i32, 0),
        }
    };
    let lq = &q.layers["conv"];
    assert_eq!(lq.weight_zero_points.is_empty(), !settings.asymmetric_weights);
    if settings.asymmetric_weights {
        // Some zero point is not 0, so the kernels' correction for it runs.
        assert!(lq.weight_zero_points.iter().any(|&z| z != 0), "{:?}", lq.weight_zero_points);
        assert!(q.layers["fc"].weight_zero_points.iter().any(|&z| z != 0));
    }
    let node = &q.graph.nodes[q.graph.node_id("conv").unwrap()];
    let shrink_core::graph::Params::Conv(p) = node.params.as_ref().unwrap() else { panic!() };
    let w = to_vec(p.weight.val());
    let bias = to_vec(p.bias.as_ref().unwrap().val());
    let mut conv_out = vec![0f32; features];
    for oc in 0..cout {
        for oy in 0..o {
            for ox in 0..o {
                let mut acc = 0i32;
                let (channels, weight_cin) = if depthwise { (oc..oc + 1, 1) } else { (0..3, 3) };
                for c in channels {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = ((oy * stride + ky) as isize - 1, (ox * stride + kx) as isize - 1);
                            let inside = (0..side as isize).contains(&iy) && (0..side as isize).contains(&ix);
                            let xq = if inside {
                                let v = input[(c * side + iy as usize) * side + ix as usize];
                                quant_u8(v, lq.input_scale, lq.input_zero_point)
                            } else {
                                lq.input_zero_point
                            };
                            let tap = if depthwise { 0 } else { c };
                            let (wq, wz) = int_weight(lq, w[((oc * weight_cin + tap) * 3 + ky) * 3 + kx], oc);
                            acc += (xq - lq.input_zero_point) * (wq - wz);
                        }
                    }
                }
                let y = acc as f32 * (lq.weight_scales[oc] * lq.input_scale) + bias[oc];
                conv_out[(oc * o + oy) * o + ox] = y.max(0.0);
            }
        }
    }
    let lf = &q.layers["fc"];
    let node = &q.graph.nodes[q.graph.node_id("fc").unwrap()];
    let shrink_core::graph::Params::Linear(p) = node.params.as_ref().unwrap() else { panic!() };
    let (w, bias) = (to_vec(p.weight.val()), to_vec(p.bias.as_ref().unwrap().val()));
    let expected: Vec<f32> = (0..4)
        .map(|oc| {
            let acc: i32 = (0..features)
                .map(|i| {
                    let xq = quant_u8(conv_out[i], lf.input_scale, lf.input_zero_point) - lf.input_zero_point;
                    let (wq, wz) = int_weight(lf, w[oc * features + i], oc);
                    xq * (wq - wz)
                })
                .sum();
            acc as f32 * (lf.weight_scales[oc] * lf.input_scale) + bias[oc]
        })
        .collect();
    let got = plan.run(&input, 1).unwrap();
    assert_eq!(got, &expected[..], "integer plan vs reference loop: {context}");

    // Several images in one call (the im2col conv then multiplies them side by side in one
    // GEMM) give exactly what each gives alone.
    let batch = to_vec(calib[1].clone());
    let together = plan.run(&batch, 8).unwrap().to_vec();
    for (i, image) in batch.chunks_exact(cin * side * side).enumerate() {
        assert_eq!(plan.run(image, 1).unwrap(), &together[i * 4..(i + 1) * 4], "image {i}: {context}");
    }
}

#[test]
fn integer_conv_equals_a_reference_integer_loop() {
    for (side, stride) in [(9, 2), (16, 1), (32, 2), (28, 1), (14, 2)] {
        for (bits, asymmetric_weights, per_channel) in
            [(8, false, true), (8, true, true), (4, true, false), (2, true, true)]
        {
            let settings = PtqSettings { weight_bits: bits, asymmetric_weights, per_channel, ..PtqSettings::default() };
            check_against_reference_loop(side, stride, &settings, false);
        }
    }
}

/// The integer depthwise kernel computes the reference integer loop exactly: strides 1 and 2,
/// padding, symmetric and asymmetric weights (whose zero points it folds into the stored
/// weights), 8, 4 and 2 bits, several images per call.
#[test]
fn integer_depthwise_conv_equals_a_reference_integer_loop() {
    for (side, stride) in [(9, 2), (16, 1), (14, 2), (5, 1)] {
        for (bits, asymmetric_weights, per_channel) in
            [(8, false, true), (8, true, true), (4, true, false), (2, true, true)]
        {
            let settings = PtqSettings { weight_bits: bits, asymmetric_weights, per_channel, ..PtqSettings::default() };
            check_against_reference_loop(side, stride, &settings, true);
        }
    }
}

#[test]
fn integer_plan_agrees_with_the_simulated_forward() {
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 16, 16], 10, 11, &device()).unwrap();
    let calib = batches([1, 16, 16], 4, 12);
    for (calibrator, asymmetric_weights) in [
        (Calibrator::MinMax, false),
        (Calibrator::Percentile { percentile: 99.99 }, false),
        (Calibrator::Mse, false),
        (Calibrator::MinMax, true),
    ] {
        let settings = PtqSettings { calibrator, asymmetric_weights, ..PtqSettings::default() };
        let q = quantize_static(&g, &mut calib.clone().into_iter(), &settings).unwrap();
        // Every conv and the classifier run in integers.
        let int_layers = q.freeze(1).unwrap().kernels().iter().filter(|(_, k)| k.contains("int8")).count();
        assert_eq!(int_layers, q.layers.len());
        assert_eq!(q.layers.len(), g.layers().filter(|(_, n)| n.op.kind() != "batch_norm2d").count());
        let x = batches([1, 16, 16], 1, 99).remove(0);
        let simulated = to_vec(q.forward_simulated(x.clone()));
        let input = to_vec(x);
        for threads in [1, 2] {
            let mut plan = q.freeze(threads).unwrap();
            let got = plan.run(&input, 8).unwrap();
            let scale = simulated.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&simulated).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            // Rounding ties and float summation order differ; a flipped rounding in one layer moves
            // the logits by about one input step of the next layers, far below 2 % of their range.
            assert!(worst <= 0.02 * scale, "{calibrator:?}, {threads} threads: {worst} vs scale {scale}");
        }
    }
}

#[test]
fn overrides_keep_layers_float_or_change_their_bits_and_typos_are_errors() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 0.5 }.build([1, 12, 12], 10, 0, &device).unwrap();
    let calib = batches([1, 12, 12], 1, 1);
    let settings = PtqSettings {
        overrides: vec![
            Override { pattern: "stem\\.conv".into(), keep_float: true, weight_bits: None },
            Override { pattern: "layer2\\..*".into(), keep_float: false, weight_bits: Some(4) },
        ],
        ..PtqSettings::default()
    };
    let q = quantize_static(&g, &mut calib.clone().into_iter(), &settings).unwrap();
    assert!(!q.layers.contains_key("stem.conv"));
    assert!(q.float_layers.iter().any(|(n, _)| n == "stem.conv"));
    assert!(q.layers.iter().filter(|(n, _)| n.starts_with("layer2.")).all(|(_, l)| l.weight_bits == 4));
    assert!(q.layers.iter().filter(|(n, _)| n.starts_with("layer1.")).all(|(_, l)| l.weight_bits == 8));
    let labels = q.freeze(1).unwrap().kernels();
    assert!(labels.iter().any(|(n, k)| n == "stem.conv" && k.starts_with("conv2d/f32")), "{labels:?}");

    let typo = PtqSettings {
        overrides: vec![Override { pattern: "stem\\.cnv".into(), keep_float: true, weight_bits: None }],
        ..PtqSettings::default()
    };
    let err = quantize_static(&g, &mut calib.clone().into_iter(), &typo).unwrap_err().to_string();
    assert!(err.contains("matches no conv or linear layer") && err.contains("stem.conv"), "{err}");
    let bad_bits = PtqSettings { weight_bits: 3, ..PtqSettings::default() };
    assert!(quantize_static(&g, &mut calib.into_iter(), &bad_bits).is_err());
    assert!(quantize_static(&g, &mut std::iter::empty(), &PtqSettings::default()).is_err());
}

#[test]
fn int8_per_channel_weights_keep_38_db_of_sqnr() {
    // N(0,1) weights, 64 channels of 576: the error budget of int8 per-channel symmetric.
    let w = to_vec(InitRng::seeded(21).tensor([64, 576], Distribution::Normal(0.0, 1.0), &device()));
    let scheme = QuantScheme { bits: 8, symmetric: true, granularity: shrink_quant::Granularity::PerChannel };
    let (q, _) = shrink_quant::fake_quantize(&w, &[64, 576], scheme).unwrap();
    let signal: f64 = w.iter().map(|v| (*v as f64).powi(2)).sum();
    let noise: f64 = w.iter().zip(&q).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let sqnr = 10.0 * (signal / noise).log10();
    assert!(sqnr >= 38.0, "SQNR {sqnr:.1} dB");
    let scheme4 = QuantScheme { bits: 4, ..scheme };
    let (q4, _) = shrink_quant::fake_quantize(&w, &[64, 576], scheme4).unwrap();
    let noise4: f64 = w.iter().zip(&q4).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    assert!(noise4 > noise * 100.0, "4 bits must be far noisier than 8");
}

#[test]
fn model_file_is_compact_and_loads_back_bit_identical() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 16, 16], 10, 31, &device).unwrap();
    let calib = batches([1, 16, 16], 2, 32);
    let dir = std::env::temp_dir().join(format!("shrink-quant-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = to_vec(batches([1, 16, 16], 1, 77).remove(0));
    let mut sizes = Vec::new();
    for (bits, asymmetric_weights) in [(8, false), (4, false), (2, false), (8, true), (4, true), (2, true)] {
        let settings = PtqSettings { weight_bits: bits, asymmetric_weights, ..PtqSettings::default() };
        let q = quantize_static(&g, &mut calib.clone().into_iter(), &settings).unwrap();
        let path = dir.join(format!("int{bits}-{asymmetric_weights}.safetensors"));
        q.save(&path).unwrap();
        let size = std::fs::metadata(&path).unwrap().len() as usize;
        if !asymmetric_weights {
            sizes.push(size);
        }
        let loaded = shrink_quant::QuantizedModel::load(&path, &device).unwrap();
        assert_eq!(loaded.layers, q.layers);
        let a = q.freeze(1).unwrap().run(&input, 8).unwrap().to_vec();
        let b = loaded.freeze(1).unwrap().run(&input, 8).unwrap().to_vec();
        assert_eq!(a, b, "int{bits} (asymmetric {asymmetric_weights}): outputs after reload must be bit-identical");
    }
    assert!(sizes[1] < sizes[0] && sizes[2] < sizes[1], "{sizes:?}");
    // ResNet-20's int8 file against its f32 model file.
    let g20 = ModelSpec::CifarResnet { depth: 20, width: 1.0 }.build([3, 16, 16], 10, 0, &device).unwrap();
    let q20 = quantize_static(&g20, &mut batches([3, 16, 16], 1, 5).into_iter(), &PtqSettings::default()).unwrap();
    let (int8, f32_file) = (q20.to_bytes().unwrap().len(), shrink_core::io::to_bytes(&g20).unwrap().len());
    let ratio = int8 as f64 / f32_file as f64;
    assert!(ratio <= 0.27, "ResNet-20 int8 file is {ratio:.3} of the f32 file ({int8} vs {f32_file} bytes)");
    // A plain f32 model file is not a quantized one.
    let plain = dir.join("plain.safetensors");
    shrink_core::io::save(&g, &plain).unwrap();
    let err = shrink_quant::QuantizedModel::load(&plain, &device).unwrap_err().to_string();
    assert!(err.contains("not a quantized model file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_layer_at_a_time_models_quantize_exactly_that_layer() {
    let g = ModelSpec::CifarResnet { depth: 8, width: 0.5 }.build([1, 12, 12], 10, 41, &device()).unwrap();
    let q = quantize_static(&g, &mut batches([1, 12, 12], 1, 2).into_iter(), &PtqSettings::default()).unwrap();
    let input = to_vec(batches([1, 12, 12], 1, 3).remove(0));
    let f32_out = shrink_core::runtime::freeze(&g).unwrap().run(&input, 8).unwrap().to_vec();
    for name in q.layers.keys() {
        let one = q.with_only(&g, name).unwrap();
        let labels = one.freeze(1).unwrap().kernels();
        let ints: Vec<&String> = labels.iter().filter(|(_, k)| k.contains("int8")).map(|(n, _)| n).collect();
        assert_eq!(ints, vec![name], "{labels:?}");
        // Close to f32, not equal to it: that layer's rounding is all that differs.
        let out = one.freeze(1).unwrap().run(&input, 8).unwrap().to_vec();
        assert_ne!(out, f32_out, "{name}");
        let scale = f32_out.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(out.iter().zip(&f32_out).all(|(a, b)| (a - b).abs() < 0.05 * scale), "{name}");
    }
    assert!(q.with_only(&g, "nope").is_err());
}

#[test]
fn dynamic_quantization_covers_linear_layers_without_calibration() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Lenet5.build([1, 28, 28], 10, 51, &device).unwrap();
    let settings = PtqSettings { dynamic: true, ..PtqSettings::default() };
    let q = quantize_static(&g, &mut std::iter::empty(), &settings).unwrap();
    assert_eq!(q.layers.keys().cloned().collect::<Vec<_>>(), ["fc1", "fc2", "fc3"]);
    assert!(q.layers.values().all(|l| l.dynamic));
    assert!(q.float_layers.iter().any(|(n, why)| n == "conv1" && why.contains("linear layers only")));
    let labels = q.freeze(1).unwrap().kernels();
    assert!(labels.iter().any(|(n, k)| n == "fc1" && k.starts_with("linear/int8-dynamic")), "{labels:?}");
    assert!(labels.iter().any(|(n, k)| n == "conv1" && k.starts_with("conv2d/f32")), "{labels:?}");
    // Each batch brings its own range: the integer plan agrees with the simulated forward, on
    // inputs of very different scales.
    for scale in [0.1f32, 1.0, 30.0] {
        let x = batches([1, 28, 28], 1, 52).remove(0).mul_scalar(scale);
        let simulated = to_vec(q.forward_simulated(x.clone()));
        let got = q.freeze(1).unwrap().run(&to_vec(x), 8).unwrap().to_vec();
        let range = simulated.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&simulated).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 0.02 * range, "input scale {scale}: {worst} vs {range}");
    }
    // The flag survives the model file.
    let path = std::env::temp_dir().join(format!("shrink-dynamic-{}.safetensors", std::process::id()));
    q.save(&path).unwrap();
    let loaded = shrink_quant::QuantizedModel::load(&path, &device).unwrap();
    assert_eq!(loaded.layers, q.layers);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn i8_activations_are_symmetric_and_the_plan_computes_them_exactly() {
    use shrink_quant::ActivationType;
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 16, 16], 10, 11, &device()).unwrap();
    let calib = batches([1, 16, 16], 4, 12);
    let settings = PtqSettings { activations: ActivationType::I8, ..PtqSettings::default() };
    let q = quantize_static(&g, &mut calib.clone().into_iter(), &settings).unwrap();
    // The first conv reads the images: its scale is max |x| / 127 over the calibration batches,
    // on the i8 grid shifted by 128 for the u8 kernels.
    let amax = calib.iter().map(|t| to_vec(t.clone()).iter().fold(0f32, |m, v| m.max(v.abs()))).fold(0f32, f32::max);
    let stem = &q.layers["stem.conv"];
    assert_eq!(stem.input_zero_point, 128);
    assert!((stem.input_scale - amax / 127.0).abs() <= 1e-6 * amax, "{} vs {}", stem.input_scale, amax / 127.0);
    assert!(q.layers.values().all(|l| l.input_zero_point == 128));

    // The integer plan against the simulated forward, as for u8.
    let x = batches([1, 16, 16], 1, 99).remove(0);
    let simulated = to_vec(q.forward_simulated(x.clone()));
    let got = q.freeze(1).unwrap().run(&to_vec(x.clone()), 8).unwrap().to_vec();
    let scale = simulated.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&simulated).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 0.02 * scale, "{worst} vs scale {scale}");

    // The model file keeps them.
    let dir = std::env::temp_dir().join(format!("shrink-i8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    q.save(&dir.join("m.safetensors")).unwrap();
    let loaded =
        shrink_quant::QuantizedModel::load(&dir.join("m.safetensors"), &BackendKind::Flex.device().unwrap()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(loaded.layers, q.layers);
    assert_eq!(loaded.freeze(1).unwrap().run(&to_vec(x), 8).unwrap(), &got[..]);

    // Dynamic quantization measures u8 ranges at run time: i8 is refused there.
    let dynamic = PtqSettings { dynamic: true, activations: ActivationType::I8, ..PtqSettings::default() };
    let err = quantize_static(&g, &mut calib.into_iter(), &dynamic).unwrap_err().to_string();
    assert!(err.contains("i8") && err.contains("dynamic"), "{err}");
}

#[test]
fn fused_adds_and_requantization_give_the_same_bits() {
    for (side, asymmetric_weights) in [(16, false), (28, false), (28, true)] {
        let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, side, side], 10, 13, &device()).unwrap();
        let calib = batches([1, side, side], 2, 14);
        let settings = PtqSettings { asymmetric_weights, ..PtqSettings::default() };
        let q = quantize_static(&g, &mut calib.clone().into_iter(), &settings).unwrap();
        let input = to_vec(batches([1, side, side], 1, 15).remove(0));
        let unfused_registry = q.registry_with(false);
        for threads in [1, 2] {
            let options = shrink_core::runtime::FreezeOptions { threads };
            let mut fused = shrink_core::runtime::freeze_with(&q.graph, &q.registry(), &options).unwrap();
            let mut unfused = shrink_core::runtime::freeze_with(&q.graph, &unfused_registry, &options).unwrap();
            let labels = fused.kernels();
            let producers = labels.iter().filter(|(_, k)| k.contains("+requantize-u8")).count();
            let consumers = labels.iter().filter(|(_, k)| k.contains("(u8 input)")).count();
            assert_eq!(producers, consumers, "{labels:?}");
            if shrink_core::kernels::int8::direct_for_test("fused_adds_and_requantization_give_the_same_bits") {
                // Each residual block's first conv feeds its second: one pair per block whose
                // maps the direct kernel takes (not 4×4 ones: its 8-wide grid would double them).
                assert_eq!(producers, if side == 16 { 2 } else { 3 }, "{labels:?}");
            }
            assert!(unfused.kernels().iter().all(|(_, k)| !k.contains("requantize") && !k.contains("+add")));
            // Every residual add joins a convolution: one per block (depth 8: three blocks).
            assert_eq!(labels.iter().filter(|(_, k)| k.contains("+add+relu")).count(), 3, "{labels:?}");
            assert!(labels.iter().all(|(_, k)| !k.starts_with("add")), "{labels:?}");
            assert_eq!(unfused.kernels().iter().filter(|(_, k)| k.starts_with("add/f32+relu")).count(), 3);
            let (a, b) = (fused.run(&input, 8).unwrap().to_vec(), unfused.run(&input, 8).unwrap().to_vec());
            assert_eq!(a, b, "{side}x{side}, asymmetric {asymmetric_weights}, {threads} threads");
            // One image at a time gives the same as the batch.
            assert_eq!(fused.run(&input[..side * side], 1).unwrap(), &a[..10]);
        }
    }
}

/// Models trained and exported by PyTorch (data/onnx), imported: static PTQ puts every layer it
/// can on the integer kernels (the MobileNet's depthwise convolutions on the integer depthwise
/// kernel, none left in f32) and names any other with the reason, dynamic PTQ quantizes their
/// linear layers, and the integer plan agrees with the simulated forward on both.
#[test]
fn imported_models_quantize_static_and_dynamic() {
    let device = device();
    for file in ["resnet_mnist_opset11.onnx", "mobilenet_mnist_opset13.onnx"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/onnx").join(file);
        let g = shrink_core::onnx::import(&path, &Default::default(), &device).unwrap().graph;
        let calib = batches([1, 28, 28], 2, 61);
        let x = batches([1, 28, 28], 1, 62).remove(0);
        for dynamic in [false, true] {
            let settings = PtqSettings { dynamic, ..PtqSettings::default() };
            let q = quantize_static(&g, &mut calib.clone().into_iter(), &settings).unwrap();
            let context = format!("{file}, dynamic {dynamic}");
            let labels = q.freeze(1).unwrap().kernels();
            for name in q.layers.keys() {
                let kernel = labels.iter().find(|(n, _)| n == name).map(|(_, k)| k.as_str());
                let expected = if dynamic { "int8-dynamic" } else { "int8" };
                assert!(kernel.is_some_and(|k| k.contains(expected)), "{context}: {name} ran {kernel:?}");
            }
            // Every weighted layer is either quantized or named with its reason.
            for (_, node) in g.layers().filter(|(_, n)| n.op.kind() != "batch_norm2d") {
                let name = &node.name;
                let why = q.float_layers.iter().find(|(n, _)| n == name).map(|(_, w)| w.as_str());
                assert!(
                    q.layers.contains_key(name) || why.is_some_and(|w| !w.is_empty()),
                    "{context}: {name} {:?}",
                    node.op
                );
            }
            let linear = g.layers().filter(|(_, n)| n.op.kind() == "linear").count();
            if dynamic {
                assert_eq!(q.layers.len(), linear, "{context}");
            } else {
                assert!(q.layers.len() > linear, "{context}: only {:?}", q.layers.keys());
            }
            if !dynamic {
                assert!(q.float_layers.is_empty(), "{context}: {:?}", q.float_layers);
            }
            if file.starts_with("mobilenet") && !dynamic {
                let depthwise = labels.iter().filter(|(_, k)| k.starts_with("conv2d/int8-depthwise")).count();
                assert_eq!(depthwise, 5, "{context}: {labels:?}");
            }
            let simulated = to_vec(q.forward_simulated(x.clone()));
            let got = q.freeze(1).unwrap().run(&to_vec(x.clone()), 8).unwrap().to_vec();
            let range = simulated.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&simulated).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= 0.02 * range, "{context}: {worst} vs {range}");
        }
    }
}

/// On the imported MobileNet, every clip and hard-swish after a layer joins that layer's
/// integer epilogue (none left as a step of its own, none applied by an extra pass), and the plan
/// gives the same bits as with separate steps, on one thread and two, both weight schemes.
#[test]
fn fused_activations_give_the_same_bits_on_the_imported_mobilenet() {
    let device = device();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/onnx/mobilenet_mnist_opset13.onnx");
    let g = shrink_core::onnx::import(&path, &Default::default(), &device).unwrap().graph;
    let calib = batches([1, 28, 28], 2, 71);
    let input = to_vec(batches([1, 28, 28], 1, 72).remove(0));
    for asymmetric_weights in [false, true] {
        let settings = PtqSettings { asymmetric_weights, ..PtqSettings::default() };
        let q = quantize_static(&g, &mut calib.clone().into_iter(), &settings).unwrap();
        for threads in [1, 2] {
            let options = shrink_core::runtime::FreezeOptions { threads };
            let mut fused = shrink_core::runtime::freeze_with(&q.graph, &q.registry(), &options).unwrap();
            let mut unfused = shrink_core::runtime::freeze_with(&q.graph, &q.registry_with(false), &options).unwrap();
            let labels = fused.kernels();
            let context = format!("asymmetric {asymmetric_weights}, {threads} threads: {labels:?}");
            // The stem, every expansion and depthwise conv, the head and the first classifier
            // layer: 1 + 5 + 5 + 1 + 1.
            let activated = labels.iter().filter(|(_, k)| k.ends_with("+clip") || k.ends_with("+hard_sigmoid+mul"));
            assert_eq!(activated.count(), 13, "{context}");
            assert!(labels.iter().all(|(_, k)| !k.starts_with("clip") && !k.contains(", then ")), "{context}");
            let separate = unfused.kernels();
            assert_eq!(separate.iter().filter(|(_, k)| k.starts_with("clip/f32")).count(), 4, "{separate:?}");
            let (a, b) = (fused.run(&input, 8).unwrap().to_vec(), unfused.run(&input, 8).unwrap().to_vec());
            assert_eq!(a, b, "{context}");
        }
    }
}

/// A pruned-then-quantized model (90 % of each convolution's weights zero, as magnitude
/// pruning leaves them) runs its pruned convolutions on the integer kernels' sparse path, and the
/// integer plan still computes what the simulated forward computes.
#[test]
fn pruned_convolutions_run_on_the_sparse_integer_path() {
    if !shrink_core::kernels::int8::direct_for_test("pruned_convolutions_run_on_the_sparse_integer_path") {
        return;
    }
    let mut g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 28, 28], 10, 17, &device()).unwrap();
    for node in &mut g.nodes {
        if let Some(shrink_core::graph::Params::Conv(p)) = &mut node.params {
            let w = p.weight.val();
            let mut magnitudes = to_vec(w.clone().abs());
            magnitudes.sort_by(f32::total_cmp);
            let threshold = magnitudes[magnitudes.len() * 9 / 10];
            let keep = w.clone().abs().greater_equal_elem(threshold);
            p.weight = burn::module::Param::from_tensor(w.clone().mask_fill(keep.bool_not(), 0.0));
        }
    }
    let calib = batches([1, 28, 28], 2, 18);
    let q = quantize_static(&g, &mut calib.into_iter(), &PtqSettings::default()).unwrap();
    let mut plan = q.freeze(1).unwrap();
    let labels = plan.kernels();
    let sparse = labels.iter().filter(|(_, k)| k.starts_with("conv2d/int8-direct-sparse")).count();
    let convs = labels.iter().filter(|(_, k)| k.starts_with("conv2d/int8-direct")).count();
    // Every direct convolution with more than one input channel (the stem reads one: its words
    // hold one weight each, so they are 10 % non-zero too).
    assert!(sparse >= convs - 1 && sparse >= 7, "{labels:?}");
    let x = batches([1, 28, 28], 1, 19).remove(0);
    let simulated = to_vec(q.forward_simulated(x.clone()));
    let got = plan.run(&to_vec(x), 8).unwrap().to_vec();
    let scale = simulated.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&simulated).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= 0.02 * scale, "{worst} vs scale {scale}");
}
