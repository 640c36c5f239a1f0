//! The fuzz corpora of the data parsers (`fuzz/corpus/idx`, `fuzz/corpus/cifar`) as ordinary
//! tests: every input gives a value or an error, never a panic. The seeds are written by the
//! ignored test `write_seeds` (`cargo test --release -p shrink-core --test fuzz_corpus --
//! --ignored`); `cargo +nightly fuzz run idx` (in `fuzz/`) adds what it finds.

use std::io::Write;
use std::path::{Path, PathBuf};

use shrink_core::data::{parse_cifar10_records, parse_idx_bytes};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus(target))
        .unwrap_or_else(|e| panic!("{}: {e}", corpus(target).display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.into_iter().map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect()
}

#[test]
fn idx_corpus_parses_or_is_refused() {
    let all = inputs("idx");
    assert!(all.len() >= 6, "the seeds are there");
    let mut ok = 0;
    for (path, bytes) in &all {
        match parse_idx_bytes(bytes, path) {
            Ok(a) => {
                assert_eq!(a.data.len(), a.dims.iter().product::<usize>(), "{}", path.display());
                ok += 1;
            }
            Err(e) => assert!(e.to_string().contains(&path.display().to_string()), "names the file: {e}"),
        }
    }
    assert!(ok >= 3, "the valid seeds parse");
}

#[test]
fn cifar_corpus_parses_or_is_refused() {
    let all = inputs("cifar");
    assert!(all.len() >= 3, "the seeds are there");
    let mut ok = 0;
    for (path, bytes) in &all {
        let (mut pixels, mut labels) = (Vec::new(), Vec::new());
        match parse_cifar10_records(bytes, path, &mut pixels, &mut labels) {
            Ok(()) => {
                assert_eq!(pixels.len(), labels.len() * 3072);
                ok += 1;
            }
            Err(e) => {
                assert!(pixels.is_empty() && labels.is_empty());
                assert!(e.to_string().contains("byte"), "gives the offset: {e}");
            }
        }
    }
    assert!(ok >= 1, "the valid seed parses");
}

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        b.extend(d.to_be_bytes());
    }
    b.extend(data);
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
#[ignore = "writes the seed corpora; run by hand when the formats change"]
fn write_seeds() {
    let images: Vec<u8> = (0..2 * 4 * 4).map(|i| (i * 37 % 256) as u8).collect();
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("images-2x4x4", idx(&[2, 4, 4], &images)),
        ("images-1x3x2x2", idx(&[1, 3, 2, 2], &images[..12])),
        ("labels-5", idx(&[5], &[0, 1, 2, 9, 3])),
        ("images-2x4x4.gz", gzip(&idx(&[2, 4, 4], &images))),
        ("truncated", idx(&[2, 4, 4], &images[..20])),
        ("trailing", idx(&[2], &[1, 2, 3])),
        ("huge-claim", idx(&[60000, 60000, 60000], &images)),
        ("bad-magic", vec![1, 0, 8, 1, 0, 0, 0, 1, 7]),
        ("bad-type", vec![0, 0, 0x0d, 1, 0, 0, 0, 1, 7]),
        ("zero-dim", idx(&[0, 4], &[])),
    ];
    write(corpus("idx"), seeds);
    let record = |label: u8| {
        let mut r = vec![label];
        r.extend((0..3072).map(|i| (i % 253) as u8));
        r
    };
    let two: Vec<u8> = [record(3), record(9)].concat();
    let cifar: Vec<(&str, Vec<u8>)> = vec![
        ("one-record", record(1)),
        ("two-records", two.clone()),
        ("bad-label", [record(2), record(10)].concat()),
        ("partial-record", two[..3073 + 100].to_vec()),
    ];
    write(corpus("cifar"), cifar);
}

fn write(dir: PathBuf, seeds: Vec<(&str, Vec<u8>)>) {
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in seeds {
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    }
}
