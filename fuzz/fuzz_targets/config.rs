//! Experiment configs: any text gives a validated plan or an error naming the problem.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(text) = std::str::from_utf8(bytes) {
        // Data paths are relative to the repository root, as for `cargo xtask run`. Only for the
        // call: libFuzzer's own paths (corpus, merge) stay relative to where it was started.
        let here = std::env::current_dir().expect("a current directory");
        std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).expect("the repository root");
        let _ = xtask::config::parse_plan(text, std::path::Path::new("fuzz.toml"));
        std::env::set_current_dir(here).expect("back where libFuzzer started");
    }
});
