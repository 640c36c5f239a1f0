//! Damaged ONNX files: every input gives a graph or an error — never a panic, an abort or a
//! hang. The seed corpus (`fuzz/corpus/onnx`, written by the ignored test `write_seeds`; the
//! `onnx` fuzz target in `fuzz/` adds what it finds) runs here, and so do seeded mutations of
//! real models (bytes flipped, inserted, cut), `SHRINK_ONNX_MUTATIONS` of them (default 300).

use std::path::{Path, PathBuf};

use shrink_core::BackendKind;
use shrink_core::onnx::{ImportOptions, import_bytes};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn corpus() -> PathBuf {
    root().join("fuzz/corpus/onnx")
}

/// What the fuzz target does with one input.
fn exercise(bytes: &[u8]) -> bool {
    let device = BackendKind::Flex.device().unwrap();
    let options = ImportOptions { input_shape: Some([1, 28, 28]), ..Default::default() };
    match import_bytes(bytes, Path::new("fuzz.onnx"), &options, &device) {
        Ok(imported) => {
            imported.graph.validate().expect("an imported graph validates");
            true
        }
        Err(e) => {
            assert!(e.to_string().starts_with("fuzz.onnx"), "names the file: {e}");
            false
        }
    }
}

#[test]
fn corpus_imports_or_is_refused() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 8, "the seeds are there");
    for f in files {
        let _ = exercise(&std::fs::read(&f).unwrap());
    }
}

/// xorshift64*: a few lines, seeded, the same everywhere.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn mutated_models_import_or_are_refused() {
    let n: usize = std::env::var("SHRINK_ONNX_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let models: Vec<Vec<u8>> = ["data/onnx/mobilenet_mnist_opset13.onnx", "data/onnx/resnet_mnist_opset11.onnx"]
        .iter()
        .map(|p| std::fs::read(root().join(p)).unwrap())
        .collect();
    let mut rng = Rng(0x005e_ed0f_0bb5);
    let mut imported = 0;
    for i in 0..n {
        let mut bytes = models[i % models.len()].clone();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(bytes.len());
            match rng.below(16) {
                0..=6 => bytes[at] ^= 1 << rng.below(8),
                7..=12 => bytes[at] = rng.next() as u8,
                13 | 14 => bytes.insert(at, rng.next() as u8),
                _ => bytes.truncate(at.max(1)),
            }
        }
        if std::env::var_os("SHRINK_ONNX_SAVE_MUTATIONS").is_some() {
            std::fs::write(std::env::temp_dir().join(format!("onnx-mutation-{i}.onnx")), &bytes).unwrap();
        }
        imported += usize::from(exercise(&bytes));
    }
    // Most mutations land in weights: those models still import (and must validate).
    assert!(imported * 5 >= n, "{imported} of {n} mutated models imported");
}

/// Mutations that keep the protobuf valid but break the model: attribute values, node inputs,
/// op types, initializer shapes.
#[test]
fn structurally_damaged_models_import_or_are_refused() {
    use onnx_ir::{Message, ModelProto};
    let n: usize = std::env::var("SHRINK_ONNX_MUTATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let sources: Vec<ModelProto> = ["data/onnx/mobilenet_mnist_opset13.onnx", "data/onnx/resnet_mnist_opset11.onnx"]
        .iter()
        .map(|p| ModelProto::parse_from_bytes(&std::fs::read(root().join(p)).unwrap()).unwrap())
        .collect();
    let ops = ["Conv", "Add", "Mul", "Reshape", "Concat", "MaxPool", "Gemm", "Transpose", "Softmax", "Pad", "Flatten"];
    let mut rng = Rng(0xdead_beef_5eed);
    for i in 0..n {
        let mut model = sources[i % sources.len()].clone();
        let graph = model.graph.mut_or_insert_default();
        for _ in 0..1 + rng.below(3) {
            let k = rng.below(graph.node.len());
            match rng.below(5) {
                0 => {
                    let node = &mut graph.node[k];
                    if !node.attribute.is_empty() {
                        let a = rng.below(node.attribute.len());
                        let attr = &mut node.attribute[a];
                        attr.i = rng.below(12) as i64 - 3;
                        for v in attr.ints.iter_mut() {
                            *v = rng.below(12) as i64 - 3;
                        }
                        attr.f = (rng.below(100) as f32 - 50.0) / 7.0;
                    }
                }
                1 => {
                    let name = graph.node[rng.below(graph.node.len())].output.first().cloned().unwrap_or_default();
                    let node = &mut graph.node[k];
                    if !node.input.is_empty() {
                        let j = rng.below(node.input.len());
                        node.input[j] = name;
                    }
                }
                2 => graph.node[k].op_type = ops[rng.below(ops.len())].into(),
                3 if !graph.initializer.is_empty() => {
                    let t = rng.below(graph.initializer.len());
                    let init = &mut graph.initializer[t];
                    if !init.dims.is_empty() {
                        let d = rng.below(init.dims.len());
                        init.dims[d] = rng.below(70) as i64 - 3;
                    }
                }
                _ => {
                    let other = rng.below(graph.node.len());
                    graph.node.swap(k, other);
                }
            }
        }
        let _ = exercise(&model.write_to_bytes().unwrap());
    }
}

/// Writes the seed corpus: real models, the refused one, and damaged copies.
#[test]
#[ignore]
fn write_seeds() {
    let dir = corpus();
    std::fs::create_dir_all(&dir).unwrap();
    let read = |p: &str| std::fs::read(root().join(p)).unwrap();
    let mobilenet = read("data/onnx/mobilenet_mnist_opset13.onnx");
    let resnet = read("data/onnx/resnet_mnist_opset11.onnx");
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("mobilenet", mobilenet.clone()),
        ("resnet", resnet.clone()),
        ("unsupported", read("data/onnx/unsupported_ops.onnx")),
        (
            "conv-asymmetric-pads",
            read("crates/core/tests/fixtures/onnx/node/test_conv_with_strides_and_asymmetric_padding/model.onnx"),
        ),
        ("lrn", read("crates/core/tests/fixtures/onnx/node/test_lrn/model.onnx")),
        ("empty", Vec::new()),
        ("truncated-half", mobilenet[..mobilenet.len() / 2].to_vec()),
        ("truncated-header", resnet[..40].to_vec()),
        ("not-protobuf", b"this is not an onnx model at all".to_vec()),
    ];
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}
