//! The fuzz corpus of the model-file parser (`fuzz/corpus/model_file`) as an ordinary test:
//! every input gives a model or an error, never a panic. The seeds — dense, sparse, int8 and
//! int4 model files of a small CNN — are written by the ignored test `write_seeds`
//! (`cargo test --release -p shrink-quant --test fuzz_corpus -- --ignored`); `cargo +nightly
//! fuzz run model_file` (in `fuzz/`) adds what it finds.

use shrink_core::InitRng;
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Distribution, Tensor};
use shrink_core::graph::{Conv2dSpec, GraphBuilder, Params};
use shrink_core::{BackendKind, io};
use shrink_quant::{PtqSettings, QuantizedModel, quantize_static};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/model_file")
}

#[test]
fn model_file_corpus_loads_or_is_refused() {
    let device = BackendKind::Flex.device().unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus()).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 4, "the seeds are there");
    let (mut graphs, mut quantized) = (0, 0);
    for path in &files {
        let bytes = std::fs::read(path).unwrap();
        match io::from_bytes_with(&bytes, path, &device) {
            Ok(m) => {
                m.graph.validate().unwrap();
                graphs += 1;
            }
            Err(e) => assert!(e.to_string().contains("byte"), "{}: gives the offset: {e}", path.display()),
        }
        if QuantizedModel::from_bytes(&bytes, path, &device).is_ok() {
            quantized += 1;
        }
    }
    assert!(graphs >= 4 && quantized >= 2, "the seeds load: {graphs} graphs, {quantized} quantized");
}

#[test]
#[ignore = "writes the seed corpus; run by hand when the format changes"]
fn write_seeds() {
    let device = BackendKind::Flex.device().unwrap();
    let mut b = GraphBuilder::new([1, 6, 6]);
    let x = b.input();
    let x = b.conv2d("conv", x, Conv2dSpec::new(4, 3).padding(1));
    let x = b.batch_norm("bn", x);
    let x = b.relu("relu", x);
    let x = b.max_pool("pool", x, 2, 2, 0);
    let x = b.linear("fc", x, 3, true);
    let graph = b.build(x, &mut InitRng::seeded(11), &device).unwrap();
    let dir = corpus();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("seed-dense.safetensors"), io::to_bytes(&graph).unwrap()).unwrap();

    // 80 % of the linear layer's weights zero: stored as a bitmask and the non-zeros.
    let mut sparse = graph.clone();
    let fc = sparse.node_id("fc").unwrap();
    if let Some(Params::Linear(p)) = sparse.nodes[fc].params.as_mut() {
        let w = p.weight.val();
        let keep =
            InitRng::seeded(116).tensor(w.dims(), Distribution::Uniform(0.0, 1.0), &device).greater_elem(0.8).float();
        p.weight = Param::from_tensor(w * keep);
    }
    std::fs::write(dir.join("seed-sparse.safetensors"), io::to_bytes(&sparse).unwrap()).unwrap();

    let calibration: Vec<Tensor<4>> = (0..2)
        .map(|i| InitRng::seeded(117 + i).tensor([4, 1, 6, 6], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    for bits in [8, 4] {
        let settings = PtqSettings { weight_bits: bits, ..PtqSettings::default() };
        let q = quantize_static(&graph, &mut calibration.clone().into_iter(), &settings).unwrap();
        std::fs::write(dir.join(format!("seed-int{bits}.safetensors")), q.to_bytes().unwrap()).unwrap();
    }
}
