//! The fuzz corpus of the config parser (`fuzz/corpus/config`) and every config in the
//! repository as ordinary tests: each text gives a plan or an error naming the file, never a
//! panic. `cargo +nightly fuzz run config corpus/config ../configs ../configs/smoke
//! ../configs/broken` (in `fuzz/`) adds what it finds to `corpus/config`.

use std::path::{Path, PathBuf};

fn files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

#[test]
fn config_corpus_parses_or_is_refused_naming_the_file() {
    // Data paths are relative to the repository root, as for `cargo xtask run`.
    std::env::set_current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("..")).unwrap();
    let mut all = files("fuzz/corpus/config");
    let seeds = all.len();
    for dir in ["configs", "configs/smoke", "configs/bench", "configs/broken"] {
        all.extend(files(dir).into_iter().filter(|p| p.extension().is_some_and(|x| x == "toml")));
    }
    assert!(all.len() > seeds + 100);
    let (mut ok, mut refused) = (0, 0);
    for path in &all {
        let bytes = std::fs::read(path).unwrap();
        let Ok(text) = std::str::from_utf8(&bytes) else { continue };
        match xtask::config::parse_plan(text, path) {
            Ok(_) => ok += 1,
            Err(e) => {
                assert!(format!("{e:#}").contains(&path.display().to_string()), "{}: {e:#}", path.display());
                refused += 1;
            }
        }
    }
    assert!(ok >= 15 && refused >= 99, "{ok} plans, {refused} refused");
}
