//! Models shrink did not make, imported: ResNet- and MobileNet-style classifiers trained in
//! PyTorch and exported at opsets 11, 13 and 17 (`data/onnx/make_models.py`), checked against
//! ONNX Runtime's outputs stored beside them; and models shrink must refuse, refused with every
//! node at fault named.

use std::path::{Path, PathBuf};

use onnx_ir::{Message, ModelProto, TensorProto};
use shrink_core::burn::tensor::{Tensor, TensorData};
use shrink_core::graph::Op;
use shrink_core::onnx::{ImportOptions, import, import_bytes};
use shrink_core::{BackendKind, Error, io, runtime};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/onnx")
}

fn tensor(path: &Path) -> (Vec<usize>, Vec<f32>) {
    let t = TensorProto::parse_from_bytes(&std::fs::read(path).unwrap()).unwrap();
    let values = if t.float_data.is_empty() {
        t.raw_data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    } else {
        t.float_data.clone()
    };
    (t.dims.iter().map(|&d| d as usize).collect(), values)
}

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-4 + 1e-3 * w.abs(), "{what}: value {i} is {g}, ONNX Runtime says {w}");
    }
}

#[test]
fn pytorch_exports_match_onnx_runtime_on_burn_and_the_cpu_plan() {
    let device = BackendKind::Flex.device().unwrap();
    let (dims, input) = tensor(&models().join("reference_input.pb"));
    assert_eq!(dims, [16, 1, 28, 28]);
    for name in ["resnet_mnist_opset11", "resnet_mnist_opset17", "mobilenet_mnist_opset13"] {
        let imported = import(&models().join(format!("{name}.onnx")), &ImportOptions::default(), &device).unwrap();
        let summary = &imported.summary;
        assert!(summary.dynamic_batch && summary.input == [1, 28, 28], "{summary}");
        let graph = imported.graph;
        assert_eq!(graph.num_outputs(), 10);
        let (_, want) = tensor(&models().join(format!("{name}_reference_output.pb")));
        let x = Tensor::from_data(TensorData::new(input.clone(), [16, 1, 28, 28]), &device);
        let burn: Vec<f32> = graph.forward(x).into_data().try_to_vec().unwrap();
        close(&burn, &want, &format!("{name} on burn"));
        let mut plan = runtime::freeze(&graph).unwrap();
        close(plan.run(&input, 16).unwrap(), &want, &format!("{name} on the CPU plan"));
        // The model file keeps the imported graph: same outputs after a round trip.
        let bytes = io::to_bytes(&graph).unwrap();
        let back = io::from_bytes(&bytes, Path::new("roundtrip.safetensors"), &device).unwrap();
        let again: Vec<f32> = back
            .forward(Tensor::from_data(TensorData::new(input.clone(), [16, 1, 28, 28]), &device))
            .into_data()
            .try_to_vec()
            .unwrap();
        assert_eq!(burn, again, "{name}: model-file round trip");
    }
}

#[test]
fn mobilenet_ops_land_in_the_ir() {
    let device = BackendKind::Flex.device().unwrap();
    let path = models().join("mobilenet_mnist_opset13.onnx");
    let g = import(&path, &ImportOptions::default(), &device).unwrap().graph;
    let count = |kind: &str| g.nodes.iter().filter(|n| n.op.kind() == kind).count();
    let depthwise = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Conv2d { groups, in_channels, .. } if groups > 1 && groups == in_channels))
        .count();
    assert_eq!(depthwise, 5, "one depthwise conv per inverted residual");
    assert_eq!(count("clip"), 4, "ReLU6");
    assert!(count("hard_sigmoid") >= 3 && count("mul") >= 3, "squeeze-and-excitation and hard-swish");
    // Names are the exporter's, so configs can name layers as Netron shows them.
    assert!(
        g.nodes.iter().any(|n| n.name.starts_with("/blocks/blocks.2/se/")),
        "{:?}",
        g.nodes.iter().map(|n| &n.name).collect::<Vec<_>>()
    );
    // Squeeze-and-excitation couples the excitation's channels to the block's.
    let groups = g.coupling_groups().unwrap();
    let se_mul = g.nodes.iter().position(|n| n.name.contains("blocks.2/se/Mul")).unwrap();
    let group = groups.iter().find(|grp| grp.carriers.contains(&se_mul)).unwrap();
    assert!(group.members.len() >= 4, "expand conv, depthwise, SE expand, project: {group:?}");
}

fn onnx_error(bytes: &[u8], options: &ImportOptions) -> String {
    let device = BackendKind::Flex.device().unwrap();
    match import_bytes(bytes, Path::new("user.onnx"), options, &device) {
        Err(e @ Error::Onnx { .. }) => e.to_string(),
        Err(other) => panic!("expected an ONNX error, got {other}"),
        Ok(_) => panic!("imported a model that should be refused"),
    }
}

#[test]
fn unsupported_ops_are_all_listed_with_their_names() {
    let bytes = std::fs::read(models().join("resnet_mnist_opset11.onnx")).unwrap();
    let mut model = ModelProto::parse_from_bytes(&bytes).unwrap();
    let graph = model.graph.mut_or_insert_default();
    let names: Vec<String> = graph.node.iter().map(|n| n.name.clone()).collect();
    graph.node[2].op_type = "Resize".into();
    graph.node[5].op_type = "Erf".into();
    graph.node[7].op_type = "GridSample".into();
    let message = onnx_error(&model.write_to_bytes().unwrap(), &ImportOptions::default());
    assert!(message.starts_with("user.onnx: 3 node(s) of 3 op type(s)"), "{message}");
    for (op, i) in [("Resize", 2), ("Erf", 5), ("GridSample", 7)] {
        assert!(message.contains(&format!("{op} (node `{}`)", names[i])), "{message}");
    }
    assert!(message.contains("supported ONNX ops: Add, AveragePool"), "{message}");
}

#[test]
fn damaged_files_and_inputs_that_do_not_fit_are_errors() {
    let bytes = std::fs::read(models().join("resnet_mnist_opset11.onnx")).unwrap();
    for cut in [0, 1, 100, bytes.len() / 2, bytes.len() - 3] {
        let message = onnx_error(&bytes[..cut], &ImportOptions::default());
        assert!(message.starts_with("user.onnx: "), "{message}");
    }
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    onnx_error(&garbage, &ImportOptions::default());
    let wrong = ImportOptions { input_shape: Some([3, 28, 28]), ..Default::default() };
    let message = onnx_error(&bytes, &wrong);
    assert!(message.contains("input `image`") && message.contains("[3, 28, 28]"), "{message}");
    // A dynamic spatial size needs the config to fix it.
    let mut model = ModelProto::parse_from_bytes(&bytes).unwrap();
    let dims = &mut model.graph.mut_or_insert_default().input[0]
        .type_
        .mut_or_insert_default()
        .mut_tensor_type()
        .shape
        .mut_or_insert_default()
        .dim;
    dims[2].set_dim_param("height".into());
    let dynamic = model.write_to_bytes().unwrap();
    let message = onnx_error(&dynamic, &ImportOptions::default());
    assert!(message.contains("dynamic dimension") && message.contains("input_shape"), "{message}");
    let fixed = ImportOptions { input_shape: Some([1, 28, 28]), ..Default::default() };
    let device = BackendKind::Flex.device().unwrap();
    assert!(import_bytes(&dynamic, Path::new("user.onnx"), &fixed, &device).is_ok());
}

#[test]
fn a_final_softmax_is_removed_unless_kept() {
    let device = BackendKind::Flex.device().unwrap();
    let light = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx/light/light_squeezenet.onnx");
    let removed = import(&light, &ImportOptions::default(), &device).unwrap();
    assert!(removed.summary.removed_softmax);
    assert!(!matches!(removed.graph.nodes[removed.graph.output].op, Op::Softmax));
    let kept = ImportOptions { keep_final_softmax: true, ..Default::default() };
    let kept = import(&light, &kept, &device).unwrap();
    assert!(matches!(kept.graph.nodes[kept.graph.output].op, Op::Softmax));
}
