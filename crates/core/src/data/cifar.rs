//! The CIFAR-10 binary format: records of one label byte and 3,072 pixel bytes (32×32, red
//! plane, green plane, blue plane).

use std::path::Path;

use super::Dataset;
use crate::{Error, Result};

const RECORD: usize = 1 + 3 * 32 * 32;

/// Loads one or more CIFAR-10 binary batch files (`data_batch_1.bin`, …, `test_batch.bin`)
/// into one dataset of 10 classes.
///
/// # Errors
/// [`Error::BadFile`] when a file's length is not a whole number of 3,073-byte records or a
/// label is not below 10 (with the byte offset of that record); [`Error::Io`] when a file
/// cannot be read.
pub fn load_cifar10_bin(files: &[&Path]) -> Result<Dataset> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for path in files {
        let bytes = std::fs::read(path).map_err(|e| Error::io(*path, e))?;
        parse_cifar10_records(&bytes, path, &mut pixels, &mut labels)?;
    }
    let mut d = Dataset::new([3, 32, 32], pixels, labels, 10)?;
    d.class_names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        .map(String::from)
        .to_vec();
    Ok(d)
}

/// Parses one CIFAR-10 binary batch file's bytes, appending its images and labels; `path`
/// names it in errors.
///
/// # Errors
/// As [`load_cifar10_bin`]; nothing is appended then.
pub fn parse_cifar10_records(bytes: &[u8], path: &Path, pixels: &mut Vec<u8>, labels: &mut Vec<u32>) -> Result<()> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(RECORD) {
        let whole = bytes.len() / RECORD * RECORD;
        return Err(Error::bad_file(
            path,
            whole as u64,
            format!("{} bytes is not a whole number of {RECORD}-byte CIFAR-10 records", bytes.len()),
        ));
    }
    if let Some(i) = bytes.chunks_exact(RECORD).position(|rec| rec[0] >= 10) {
        let label = bytes[i * RECORD];
        return Err(Error::bad_file(path, (i * RECORD) as u64, format!("label {label} is not below 10")));
    }
    for rec in bytes.chunks_exact(RECORD) {
        labels.push(rec[0] as u32);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_records_and_refuses_damage() {
        let dir = super::super::idx::tests::tempdir();
        let p = dir.join("batch.bin");
        let mut bytes = Vec::new();
        for label in [3u8, 7] {
            bytes.push(label);
            bytes.extend((0..RECORD - 1).map(|i| (i % 251) as u8 ^ label));
        }
        std::fs::write(&p, &bytes).unwrap();
        let d = load_cifar10_bin(&[&p]).unwrap();
        assert_eq!(d.labels, vec![3, 7]);
        assert_eq!(d.len(), 2);
        assert_eq!(d.image(1)[0], 7); // first pixel of the second image: 0 ^ 7
        assert_eq!(d.class_names[3], "cat");

        std::fs::write(&p, &bytes[..RECORD + 5]).unwrap();
        let e = load_cifar10_bin(&[&p]).unwrap_err().to_string();
        assert!(e.contains("byte 3073"), "{e}");

        bytes[RECORD] = 12;
        std::fs::write(&p, &bytes).unwrap();
        let e = load_cifar10_bin(&[&p]).unwrap_err().to_string();
        assert!(e.contains("byte 3073") && e.contains("label 12"), "{e}");
    }
}
