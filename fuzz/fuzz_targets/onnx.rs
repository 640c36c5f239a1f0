//! ONNX models (protobuf, converted into the graph IR): a graph that validates, or an error
//! naming the file — never a panic or an abort.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shrink_core::BackendKind;
use shrink_core::onnx::{ImportOptions, import_bytes};

fuzz_target!(|bytes: &[u8]| {
    let device = BackendKind::Flex.device().expect("the default CPU backend");
    let options = ImportOptions { input_shape: Some([1, 28, 28]), ..Default::default() };
    if let Ok(imported) = import_bytes(bytes, std::path::Path::new("fuzz.onnx"), &options, &device) {
        imported.graph.validate().expect("an imported graph validates");
    }
});
