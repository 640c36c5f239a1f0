//! QDQ export of quantized models: the PyTorch-trained ResNet of `data/onnx`, imported and
//! quantized statically (per channel, and per tensor with asymmetric 4-bit weights), written
//! as QDQ ONNX and read back: every quantized weight's integers times its scales are the
//! model's weights, every bias is its int32 at input scale × weight scale, every layer reads
//! its input through a Q/DQ pair with the calibrated parameters. `SHRINK_EXPORT_DIR` keeps the
//! files, the images and shrink's logits for `scripts/ort_check.py`.

use std::collections::HashMap;
use std::path::Path;

use onnx_ir::{Message, ModelProto, TensorProto};
use shrink_core::BackendKind;
use shrink_core::data::{Augmentation, Batcher, load_mnist_dir, shuffled};
use shrink_core::onnx::{ExportOptions, ImportOptions, import};
use shrink_quant::onnx::export_qdq;
use shrink_quant::{Calibrator, PtqSettings, QuantizedModel, quantize_static};

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

fn raw_f32(t: &TensorProto) -> Vec<f32> {
    t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

fn raw_i32(t: &TensorProto) -> Vec<i32> {
    t.raw_data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// Reads the QDQ file back and checks every tensor of every quantized layer against `model`.
fn check_tensors(model: &QuantizedModel, bytes: &[u8]) {
    let m = ModelProto::parse_from_bytes(bytes).unwrap();
    let g = m.graph.as_ref().unwrap();
    let init: HashMap<&str, &TensorProto> = g.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    assert!(g.node.iter().all(|n| n.domain.is_empty()), "standard operators only");
    // The `DequantizeLinear` node that writes `value`, and its initializers.
    let dequantized = |value: &str| {
        let dq = g.node.iter().find(|n| n.output[0] == value).unwrap_or_else(|| panic!("nothing writes {value}"));
        assert_eq!(dq.op_type, "DequantizeLinear", "{value}");
        dq.input.iter().map(|i| init[i.as_str()]).collect::<Vec<_>>()
    };
    for (name, l) in &model.layers {
        let id = model.graph.node_id(name).unwrap();
        let (w, dims) = model.graph.layer_weight(id).unwrap().unwrap();
        let node = g.node.iter().find(|n| n.name == *name).unwrap();
        let weight = dequantized(&node.input[1]);
        let q = weight[0];
        assert_eq!(q.data_type, 3, "{name}: int8 weights");
        assert_eq!(q.dims, dims.iter().map(|&d| d as i64).collect::<Vec<_>>());
        let scales = raw_f32(weight[1]);
        // Left out: all 0 (a convolution's).
        let zeros: Vec<i32> = match weight.get(2) {
            Some(z) => z.raw_data.iter().map(|&b| b as i8 as i32).collect(),
            None => vec![0; scales.len()],
        };
        let per = w.len() / dims[0];
        for (i, (&b, &v)) in q.raw_data.iter().zip(&w).enumerate() {
            let o = if scales.len() == 1 { 0 } else { i / per };
            let back = (b as i8 as i32 - zeros[o]) as f32 * scales[o];
            assert_eq!(back, v, "{name}[{i}]: {b} at scale {}", scales[o]);
            let range = 1 << (l.weight_bits - 1);
            assert!((-range..range).contains(&(b as i8 as i32)), "{name}: {}-bit values", l.weight_bits);
        }
        let bias = model.graph.layer_bias(id).unwrap().unwrap();
        let b = dequantized(&node.input[2]);
        assert_eq!(b[0].data_type, 6, "{name}: int32 bias");
        let (bq, bs) = (raw_i32(b[0]), raw_f32(b[1]));
        for o in 0..bias.len() {
            let s = l.input_scale * l.weight_scales[o];
            assert_eq!(bs[o], s, "{name}: bias scale = input scale × weight scale");
            assert!((bq[o] as f32 * s - bias[o]).abs() <= 0.51 * s, "{name}: bias {o}: {} × {s} vs {}", bq[o], bias[o]);
        }
        // The layer reads a dequantized value with its calibrated input parameters.
        let dq = g.node.iter().find(|n| n.output[0] == node.input[0]).unwrap();
        assert_eq!(dq.op_type, "DequantizeLinear", "{name} reads {}", node.input[0]);
        assert_eq!(raw_f32(init[dq.input[1].as_str()]), vec![l.input_scale], "{name}: input scale");
        assert_eq!(
            init[dq.input[2].as_str()].raw_data.to_vec(),
            vec![l.input_zero_point as u8],
            "{name}: input zero point"
        );
    }
}

#[test]
fn qdq_export_writes_the_integer_model() {
    let device = BackendKind::Flex.device().unwrap();
    let imported =
        import(&root().join("data/onnx/resnet_mnist_opset11.onnx"), &ImportOptions::default(), &device).unwrap();
    let (train, test) = load_mnist_dir(&root().join("data/mnist5k")).unwrap();
    let batcher = Batcher { normalization: train.channel_stats(), augmentation: Augmentation::default() };
    let order = shuffled(train.len(), 5);
    let batches: Vec<_> = order.chunks(64).take(4).map(|c| batcher.batch(&train, c, &device, None).0).collect();
    let keep = std::env::var_os("SHRINK_EXPORT_DIR").map(std::path::PathBuf::from);
    for (tag, settings) in [
        (
            "per-channel",
            PtqSettings { calibrator: Calibrator::Percentile { percentile: 99.99 }, ..PtqSettings::default() },
        ),
        (
            "int4-asymmetric-per-tensor",
            PtqSettings { weight_bits: 4, per_channel: false, asymmetric_weights: true, ..PtqSettings::default() },
        ),
    ] {
        let q = quantize_static(&imported.graph, &mut batches.clone().into_iter(), &settings).unwrap();
        let (bytes, summary) = export_qdq(&q, &ExportOptions::default()).unwrap();
        // The convolutions whose output reaches a residual add (the second of each block, the
        // shortcuts, and the stem, read by the first block's identity shortcut) round it to a
        // grid of their own, in the plan as in the file; the others need none.
        let own: Vec<&String> = q.outputs.keys().collect();
        let expected: Vec<&String> =
            q.layers.keys().filter(|n| n.contains("conv2") || n.contains("shortcut") || n.contains("stem")).collect();
        assert_eq!(own, expected, "{tag}");
        let mut written: Vec<&String> = summary.requantized_outputs.iter().collect();
        written.sort();
        assert_eq!(written, own, "{tag}");
        assert_eq!(summary.integer_layers.len(), q.layers.len(), "{tag}");
        assert!(summary.float_outputs.is_empty(), "{tag}: {:?}", summary.float_outputs);
        assert_eq!(summary.widened.len(), if settings.weight_bits < 8 { q.layers.len() } else { 0 }, "{tag}");
        check_tensors(&q, &bytes);
        // Through a model file (which records the output ranges) the export is the same.
        let reloaded = QuantizedModel::from_bytes(&q.to_bytes().unwrap(), Path::new("q"), &device).unwrap();
        assert_eq!(reloaded.outputs, q.outputs, "{tag}");
        assert_eq!(export_qdq(&reloaded, &ExportOptions::default()).unwrap().0, bytes, "{tag}");
        if let Some(dir) = &keep {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join(format!("resnet-{tag}.int8.onnx")), &bytes).unwrap();
            let f32_bytes = shrink_core::onnx::export(&imported.graph, &ExportOptions::default()).unwrap();
            std::fs::write(dir.join("resnet.onnx"), f32_bytes).unwrap();
            let idx: Vec<usize> = (0..test.len()).collect();
            let (x, labels) = batcher.batch(&test, &idx, &device, None);
            let mut plan = q.freeze(1).unwrap();
            let dims = x.dims();
            let xs = shrink_core::host::floats(x).unwrap();
            let logits = plan.run(&xs, dims[0]).unwrap().to_vec();
            let f32_plan = shrink_core::runtime::freeze(&imported.graph).unwrap().run(&xs, dims[0]).unwrap().to_vec();
            let bytes = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
            std::fs::write(dir.join("images.f32"), bytes(&xs)).unwrap();
            std::fs::write(dir.join(format!("resnet-{tag}.shrink-int8.f32")), bytes(&logits)).unwrap();
            std::fs::write(dir.join("resnet.shrink-f32.f32"), bytes(&f32_plan)).unwrap();
            std::fs::write(
                dir.join("labels.u32"),
                labels.into_data().iter::<i64>().flat_map(|l| (l as u32).to_le_bytes()).collect::<Vec<u8>>(),
            )
            .unwrap();
        }
    }
}

#[test]
fn added_tensor_names_never_take_a_layers_name() {
    use shrink_core::burn::tensor::Distribution;
    use shrink_core::graph::{Conv2dSpec, GraphBuilder};
    let device = BackendKind::Flex.device().unwrap();
    // Layers named as the export names its own tensors (`wk`, `bk`, `aj`, `ajq`).
    let mut b = GraphBuilder::new([1, 8, 8]);
    let x = b.input();
    let x = b.conv2d("w0", x, Conv2dSpec::new(4, 3).padding(1).bias(true));
    let x = b.relu("a0", x);
    let x = b.conv2d("b1", x, Conv2dSpec::new(4, 3).padding(1).bias(true));
    let x = b.relu("a1q", x);
    let x = b.flatten("flatten", x);
    let x = b.linear("w1", x, 3, true);
    let g = b.build(x, &mut shrink_core::InitRng::seeded(3), &device).unwrap();
    let calib: Vec<_> = (0..2)
        .map(|s| shrink_core::InitRng::seeded(s).tensor([4, 1, 8, 8], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    let q = quantize_static(&g, &mut calib.into_iter(), &PtqSettings::default()).unwrap();
    let (bytes, _) = export_qdq(&q, &ExportOptions::default()).unwrap();
    check_tensors(&q, &bytes);
    let m = ModelProto::parse_from_bytes(&bytes).unwrap();
    let g = m.graph.as_ref().unwrap();
    let mut names: Vec<&str> = g.node.iter().map(|n| n.output[0].as_str()).collect();
    names.extend(g.initializer.iter().map(|t| t.name.as_str()));
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), count, "every value is written once: {names:?}");
}
