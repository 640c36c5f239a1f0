//! ONNX export, first part (#20): every graph exports at opsets 13 and 17 and imports back (with
//! shrink's own importer, onnx-ir) to a graph that computes the same logits — zoo models, the
//! PyTorch-trained models of data/onnx, and model-zoo graphs with concat, LRN, pads and channel
//! shuffles. ONNX Runtime's own check of the exported files is the next part.

use std::path::{Path, PathBuf};

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

/// Exports `g` at both opsets, imports each file back, and compares the logits on `x`.
fn round_trip(g: &Graph, x: Tensor<4>, what: &str) {
    let device = BackendKind::Flex.device().unwrap();
    let want = logits(g, x.clone());
    let shape = g.shapes().unwrap()[0].dims();
    for opset in [13, 17] {
        let bytes = export(g, &ExportOptions { opset, metadata: vec![("config".into(), what.into())] }).unwrap();
        // SHRINK_EXPORT_DIR keeps the files (to run them in ONNX Runtime by hand).
        if let Ok(dir) = std::env::var("SHRINK_EXPORT_DIR") {
            std::fs::write(Path::new(&dir).join(format!("{what}.opset{opset}.onnx")), &bytes).unwrap();
        }
        let options = ImportOptions { keep_final_softmax: true, ..ImportOptions::default() };
        let back = import_bytes(&bytes, Path::new(what), &options, &device)
            .unwrap_or_else(|e| panic!("{what}, opset {opset}: {e}"))
            .graph;
        assert_eq!(back.shapes().unwrap()[0].dims(), shape, "{what}");
        let got = logits(&back, x.clone());
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert_eq!(got.len(), want.len(), "{what}");
        assert!(worst <= 1e-5 * scale.max(1.0), "{what}, opset {opset}: worst difference {worst} (scale {scale})");
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
