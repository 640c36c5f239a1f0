//! Model files (safetensors with the graph in the header; dense, sparse and integer weights;
//! quantization annotations): a graph that validates and runs, or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shrink_core::BackendKind;

fuzz_target!(|bytes: &[u8]| {
    let device = BackendKind::Flex.device().expect("the default CPU backend");
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(model) = shrink_core::io::from_bytes_with(bytes, path, &device) {
        model.graph.validate().expect("a loaded graph validates");
    }
    let _ = shrink_quant::QuantizedModel::from_bytes(bytes, path, &device);
});
