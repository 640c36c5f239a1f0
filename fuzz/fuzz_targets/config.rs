//! Experiment configs: any text gives a validated plan or an error naming the problem.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(init: {
    // Data paths are relative to the repository root, as for `cargo xtask run`.
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).expect("the repository root");
}, |bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let _ = xtask::config::parse_plan(text, std::path::Path::new("fuzz.toml"));
    }
});
