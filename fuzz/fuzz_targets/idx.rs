//! IDX (MNIST) files, raw or gzip: any bytes give an array or an error, never a panic, and no
//! allocation beyond what the stream holds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let path = std::path::Path::new("fuzz.idx");
    if let Ok(a) = shrink_core::data::parse_idx_bytes(bytes, path) {
        assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
    }
});
