//! CIFAR-10 binary batches: whole records with labels below 10, or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let path = std::path::Path::new("fuzz.bin");
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    match shrink_core::data::parse_cifar10_records(bytes, path, &mut pixels, &mut labels) {
        Ok(()) => assert_eq!(pixels.len(), labels.len() * 3072),
        Err(_) => assert!(pixels.is_empty() && labels.is_empty()),
    }
});
