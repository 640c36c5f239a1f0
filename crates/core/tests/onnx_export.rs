//! ONNX export, first part (#20): every graph exports at opsets 13 and 17 and imports back (with
//! shrink's own importer, onnx-ir) to a graph that computes the same logits — zoo models, the
//! PyTorch-trained models of data/onnx, and model-zoo graphs with concat, LRN, pads and channel
//! shuffles; with batch norms kept and folded; metadata written.

use std::path::{Path, PathBuf};

use onnx_ir::Message;
use shrink_core::burn::tensor::{Distribution, Tensor};
use shrink_core::onnx::{ExportOptions, ImportOptions, export, import, import_bytes};
use shrink_core::zoo::ModelSpec;
use shrink_core::{BackendKind, Graph, InitRng};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn logits(g: &Graph, x: Tensor<4>) -> Vec<f32> {
    g.forward(x).into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Exports `g` at both opsets, batch norms kept and folded, imports each file back, and
/// compares the logits on `x`.
fn round_trip(g: &Graph, x: Tensor<4>, what: &str) {
    let device = BackendKind::Flex.device().unwrap();
    let want = logits(g, x.clone());
    let shape = g.shapes().unwrap()[0].dims();
    let batch_norms = g.nodes.iter().filter(|n| n.op.kind() == "batch_norm2d").count();
    for opset in [13, 17] {
        for fold_batch_norms in [false, true] {
            let metadata = vec![("config".to_string(), what.to_string())];
            let bytes = export(g, &ExportOptions { opset, fold_batch_norms, metadata }).unwrap();
            // SHRINK_EXPORT_DIR keeps the files (to run them in ONNX Runtime by hand).
            if let Ok(dir) = std::env::var("SHRINK_EXPORT_DIR") {
                let name = format!("{what}.opset{opset}{}.onnx", if fold_batch_norms { ".folded" } else { "" });
                std::fs::write(Path::new(&dir).join(name), &bytes).unwrap();
            }
            let proto = onnx_ir::ModelProto::parse_from_bytes(&bytes).unwrap();
            let written = proto.graph.node.iter().filter(|n| n.op_type == "BatchNormalization").count();
            assert_eq!(written, if fold_batch_norms { 0 } else { batch_norms }, "{what}: batch norms written");
            assert!(proto.metadata_props.iter().any(|p| p.key == "config" && p.value == what), "{what}: metadata");
            let options = ImportOptions { keep_final_softmax: true, ..ImportOptions::default() };
            let back = import_bytes(&bytes, Path::new(what), &options, &device)
                .unwrap_or_else(|e| panic!("{what}, opset {opset}: {e}"))
                .graph;
            assert_eq!(back.shapes().unwrap()[0].dims(), shape, "{what}");
            let got = logits(&back, x.clone());
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert_eq!(got.len(), want.len(), "{what}");
            // Folding rounds the weights once more in f32.
            let tolerance = if fold_batch_norms { 1e-4 } else { 1e-5 };
            assert!(
                worst <= tolerance * scale.max(1.0),
                "{what}, opset {opset}, folded {fold_batch_norms}: worst difference {worst} (scale {scale})"
            );
        }
    }
}

#[test]
fn zoo_models_export_and_import_back_to_the_same_logits() {
    let device = BackendKind::Flex.device().unwrap();
    for (spec, input) in [
        (ModelSpec::Lenet5, [1, 28, 28]),
        (ModelSpec::Mlp { hidden: vec![32, 16] }, [1, 28, 28]),
        (ModelSpec::CifarResnet { depth: 8, width: 0.5 }, [3, 16, 16]),
    ] {
        let g = spec.build(input, 10, 3, &device).unwrap();
        let x = InitRng::seeded(4).tensor([2, input[0], input[1], input[2]], Distribution::Normal(0.0, 1.0), &device);
        round_trip(&g, x, &spec.name());
    }
}

#[test]
fn imported_models_export_and_import_back_to_the_same_logits() {
    let device = BackendKind::Flex.device().unwrap();
    let light = root().join("crates/core/tests/fixtures/onnx/light");
    let cases = [
        (root().join("data/onnx/resnet_mnist_opset11.onnx"), [1, 28, 28]),
        (root().join("data/onnx/mobilenet_mnist_opset13.onnx"), [1, 28, 28]),
        (light.join("light_shufflenet.onnx"), [3, 224, 224]),
        (light.join("light_squeezenet.onnx"), [3, 224, 224]),
        (light.join("light_inception_v1.onnx"), [3, 224, 224]),
    ];
    for (path, input) in cases {
        let options = ImportOptions { keep_final_softmax: true, ..ImportOptions::default() };
        let g = import(&path, &options, &device).unwrap().graph;
        let x = InitRng::seeded(5).tensor([1, input[0], input[1], input[2]], Distribution::Normal(0.0, 1.0), &device);
        round_trip(&g, x, &path.file_name().unwrap().to_string_lossy());
    }
}
