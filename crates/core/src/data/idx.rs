//! The IDX format of MNIST and Fashion-MNIST, raw or gzip-compressed.
//!
//! Header: two zero bytes, a type code (`0x08` = unsigned byte, the only one image sets use),
//! the number of dimensions, then each dimension as a big-endian `u32`. Nothing is allocated
//! from what the header claims: data is read as it arrives and then checked against it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use std::cell::Cell;
use std::rc::Rc;

use flate2::read::MultiGzDecoder;

use super::Dataset;
use crate::{Error, Result};

/// An IDX file's dimensions and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions from the header.
    pub dims: Vec<usize>,
    /// The data, `dims.iter().product()` bytes.
    pub data: Vec<u8>,
    /// Whether the file was gzip-compressed (its byte offsets then count decompressed bytes).
    pub compressed: bool,
}

/// An IDX stream as stored, or decompressed when it starts with gzip's magic number (every
/// member of a multi-member file, as `gzip -d` reads it).
struct Stream<'a> {
    reader: Box<dyn Read + 'a>,
    /// For a compressed file: how many of its bytes the decoder has read.
    compressed_read: Option<Rc<Cell<u64>>>,
}

/// A reader that counts the bytes read through it.
struct Counting<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

impl Stream<'_> {
    /// A read error: in a compressed file the gzip stream is damaged, and the decoder reads
    /// ahead, so the place is given as the compressed bytes read when it failed.
    fn read_error(&self, path: &Path, e: &std::io::Error) -> Error {
        match &self.compressed_read {
            Some(count) => Error::bad_file(
                path,
                count.get(),
                format!("damaged gzip stream, found by the decoder within the file's first {} bytes: {e}", count.get()),
            ),
            None => Error::bad_file(path, 0, format!("cannot read: {e}")),
        }
    }

    /// Where offsets into the data point, for messages.
    fn offsets_note(&self) -> &'static str {
        if self.compressed_read.is_some() { " (offsets count the decompressed bytes)" } else { "" }
    }
}

impl Read for Stream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

fn maybe_gzip<'a>(mut raw: impl Read + 'a, path: &Path) -> Result<Stream<'a>> {
    let mut magic = [0u8; 2];
    let n = read_up_to(&mut raw, &mut magic).map_err(|e| Error::io(path, e))?;
    let head = std::io::Cursor::new(magic[..n].to_vec());
    let chained = head.chain(raw);
    if n == 2 && magic == [0x1f, 0x8b] {
        let count = Rc::new(Cell::new(0));
        let counting = Counting { inner: chained, count: count.clone() };
        Ok(Stream { reader: Box::new(MultiGzDecoder::new(counting)), compressed_read: Some(count) })
    } else {
        Ok(Stream { reader: Box::new(chained), compressed_read: None })
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads an IDX file (raw or gzip) of unsigned bytes.
///
/// # Errors
/// [`Error::BadFile`] with the byte offset (in the decompressed stream) for a wrong magic
/// number, an unsupported type, a zero dimension, or data shorter or longer than the header says;
/// [`Error::Io`] when the file cannot be read.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    parse_idx(maybe_gzip(file, path)?, path)
}

/// Parses an IDX file's bytes (raw or gzip) as [`read_idx`] does; `path` names it in errors.
///
/// # Errors
/// As [`read_idx`].
pub fn parse_idx_bytes(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    parse_idx(maybe_gzip(bytes, path)?, path)
}

fn parse_idx(mut r: Stream<'_>, path: &Path) -> Result<IdxArray> {
    let note = r.offsets_note();
    let bad = |offset: u64, msg: String| Error::bad_file(path, offset, format!("{msg}{note}"));
    let dims = parse_header(&mut r, path)?;
    let header = 4 + 4 * dims.len() as u64;
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let Some(expected) = expected else {
        return Err(bad(4, format!("dimensions {dims:?} overflow")));
    };
    // Read at most one byte more than announced, without reserving what the header claims.
    let mut data = Vec::new();
    if let Err(e) = (&mut r).take(expected as u64 + 1).read_to_end(&mut data) {
        return Err(r.read_error(path, &e));
    }
    if data.len() < expected {
        return Err(bad(
            header + data.len() as u64,
            format!("truncated: header announces {dims:?} = {expected} bytes of data, file has {}", data.len()),
        ));
    }
    if data.len() > expected {
        return Err(bad(
            header + expected as u64,
            format!("trailing data after the {expected} bytes the header announces"),
        ));
    }
    Ok(IdxArray { dims, data, compressed: !note.is_empty() })
}

/// The dimensions an IDX header announces, the stream left at the first data byte.
fn parse_header(r: &mut Stream<'_>, path: &Path) -> Result<Vec<usize>> {
    let note = r.offsets_note();
    let bad = |offset: u64, msg: String| Error::bad_file(path, offset, format!("{msg}{note}"));
    let mut head = [0u8; 4];
    let n = read_up_to(r, &mut head).map_err(|e| r.read_error(path, &e))?;
    if n < 4 {
        return Err(bad(n as u64, format!("file ends after {n} bytes; an IDX header has at least 4")));
    }
    if head[0] != 0 || head[1] != 0 {
        return Err(bad(0, format!("not an IDX file: magic starts {:02x} {:02x}, expected 00 00", head[0], head[1])));
    }
    if head[2] != 0x08 {
        return Err(bad(2, format!("IDX type code 0x{:02x} is not supported: expected 0x08 (unsigned byte)", head[2])));
    }
    let ndim = head[3] as usize;
    if ndim == 0 || ndim > 4 {
        return Err(bad(3, format!("IDX file with {ndim} dimensions: expected 1 to 4")));
    }
    let mut dims = Vec::with_capacity(ndim);
    for d in 0..ndim {
        let offset = 4 + 4 * d as u64;
        let mut b = [0u8; 4];
        if read_up_to(r, &mut b).map_err(|e| r.read_error(path, &e))? < 4 {
            return Err(bad(offset, format!("file ends inside the header (dimension {d} of {ndim})")));
        }
        let v = u32::from_be_bytes(b) as usize;
        if v == 0 {
            return Err(bad(offset, format!("dimension {d} is 0")));
        }
        dims.push(v);
    }
    Ok(dims)
}

/// The image shape `[channels, height, width]` of an IDX image file (raw or gzip), from its
/// header alone: what a config's validation needs to build the model before any data loads.
///
/// # Errors
/// As [`read_idx`] for the header, and [`Error::BadFile`] for a file that is not 3- or
/// 4-dimensional.
pub fn idx_image_shape(path: &Path) -> Result<[usize; 3]> {
    image_shape(&idx_dims(path)?, path)
}

/// The dimensions an IDX file's header announces (raw or gzip), read from the header alone.
///
/// # Errors
/// As [`read_idx`] for the header.
pub fn idx_dims(path: &Path) -> Result<Vec<usize>> {
    let file = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    parse_header(&mut maybe_gzip(file, path)?, path)
}

fn image_shape(dims: &[usize], path: &Path) -> Result<[usize; 3]> {
    match dims[..] {
        [_, h, w] => Ok([1, h, w]),
        [_, c, h, w] => Ok([c, h, w]),
        _ => Err(Error::bad_file(path, 3, format!("images need 3 or 4 dimensions, file has {dims:?}"))),
    }
}

/// Reads an IDX image file: `[n, height, width]` (grey) or `[n, channels, height, width]`.
/// Returns `([channels, height, width], pixels, n)`.
///
/// # Errors
/// As [`read_idx`], and [`Error::BadFile`] for a file that is not 3- or 4-dimensional.
pub fn load_idx_images(path: &Path) -> Result<([usize; 3], Vec<u8>, usize)> {
    let a = read_idx(path)?;
    let shape = image_shape(&a.dims, path)?;
    Ok((shape, a.data, a.dims[0]))
}

/// Reads an IDX label file (one dimension).
///
/// # Errors
/// As [`read_idx`], and [`Error::BadFile`] for a file that is not 1-dimensional.
pub fn load_idx_labels(path: &Path) -> Result<Vec<u32>> {
    Ok(read_idx_labels(path)?.0)
}

/// The labels, and whether the file was compressed.
fn read_idx_labels(path: &Path) -> Result<(Vec<u32>, bool)> {
    let a = read_idx(path)?;
    if a.dims.len() != 1 {
        return Err(Error::bad_file(path, 3, format!("labels need 1 dimension, file has {:?}", a.dims)));
    }
    Ok((a.data.into_iter().map(u32::from).collect(), a.compressed))
}

/// Loads an image file and a label file into a [`Dataset`] of `classes` classes, every label
/// checked to be below it; without a class count, the largest label plus one (at least 2), and
/// then every class below it must have an image: a label such as 255 in a set of digits would
/// otherwise silently make a 256-class model.
///
/// # Errors
/// As [`read_idx`]; [`Error::BadFile`] when the counts differ, or for a label outside the
/// classes (naming its record and byte).
pub fn load_idx_pair(images: &Path, labels: &Path, classes: Option<usize>) -> Result<Dataset> {
    let (shape, pixels, n) = load_idx_images(images)?;
    let (labels_v, compressed) = read_idx_labels(labels)?;
    if labels_v.len() != n {
        return Err(Error::bad_file(
            labels,
            4,
            format!("{} labels for the {n} images of {}", labels_v.len(), images.display()),
        ));
    }
    let classes = check_labels(&labels_v, labels, classes).map_err(|e| match e {
        Error::BadFile { path, offset, message } if compressed => {
            Error::BadFile { path, offset, message: format!("{message} (offsets count the decompressed bytes)") }
        }
        other => other,
    })?;
    Dataset::new(shape, pixels, labels_v, classes)
}

/// The class count of an IDX label file's labels (see [`load_idx_pair`]).
fn check_labels(labels: &[u32], path: &Path, declared: Option<usize>) -> Result<usize> {
    // Record i of a one-dimensional IDX file is its byte 8 + i.
    let byte = |i: usize| 8 + i as u64;
    if let Some(classes) = declared {
        if let Some(i) = labels.iter().position(|&l| l as usize >= classes) {
            return Err(Error::bad_file(
                path,
                byte(i),
                format!(
                    "record {i} has label {}, outside the {classes} classes (labels 0 to {})",
                    labels[i],
                    classes - 1
                ),
            ));
        }
        return Ok(classes);
    }
    let Some(&max) = labels.iter().max() else { return Ok(2) };
    let classes = max as usize + 1;
    let mut seen = vec![false; classes];
    for &l in labels {
        seen[l as usize] = true;
    }
    let missing: Vec<usize> = (0..classes).filter(|&c| !seen[c]).collect();
    if let Some(&first) = missing.first() {
        let i = labels.iter().position(|&l| l == max).unwrap_or(0);
        return Err(Error::bad_file(
            path,
            byte(i),
            format!(
                "record {i} has label {max}, which would make {classes} classes, but {} of them (label {first} first) have no image: a damaged label? If the data really has {classes} classes, declare them (`data.classes = {classes}`)",
                missing.len()
            ),
        ));
    }
    Ok(classes.max(2))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, bytes: &[u8], gz: bool) {
        let mut f = File::create(path).unwrap();
        if gz {
            let mut e = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap();
        } else {
            f.write_all(bytes).unwrap();
        }
    }

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn raw_and_gzip_load_the_same() {
        let dir = tempdir();
        let data: Vec<u8> = (0..2 * 3 * 4).map(|v| v as u8).collect();
        for gz in [false, true] {
            let p = dir.join(format!("img{gz}"));
            write(&p, &idx(&[2, 3, 4], &data), gz);
            let (shape, pixels, n) = load_idx_images(&p).unwrap();
            assert_eq!((shape, n), ([1, 3, 4], 2));
            assert_eq!(pixels, data);
        }
    }

    #[test]
    fn the_image_shape_comes_from_the_header_alone() {
        let dir = tempdir();
        for (gz, dims, want) in [(false, vec![5, 7, 9], [1, 7, 9]), (true, vec![2, 3, 16, 12], [3, 16, 12])] {
            let p = dir.join(format!("shape{gz}"));
            // Data far shorter than announced: only the header is read.
            write(&p, &idx(&dims, &[0; 3]), gz);
            assert_eq!(idx_image_shape(&p).unwrap(), want);
        }
        let p = dir.join("labels");
        write(&p, &idx(&[4], &[0; 4]), false);
        let e = idx_image_shape(&p).unwrap_err().to_string();
        assert!(e.contains("labels") && e.contains("3 or 4 dimensions"), "{e}");
        write(&p, &[0, 0, 8, 3, 0, 0], false);
        let e = idx_image_shape(&p).unwrap_err().to_string();
        assert!(e.contains("byte 4") && e.contains("inside the header"), "{e}");
    }

    #[test]
    fn damaged_files_name_the_offset() {
        let dir = tempdir();
        let p = dir.join("bad");
        write(&p, &idx(&[2, 3, 4], &[0; 10]), false);
        let e = read_idx(&p).unwrap_err().to_string();
        assert!(e.contains("byte 26") && e.contains("truncated"), "{e}");

        write(&p, &[1, 2, 8, 1], false);
        assert!(read_idx(&p).unwrap_err().to_string().contains("byte 0"));

        // A header that claims 4 GB must not allocate it.
        write(&p, &idx(&[65535, 65535], &[1, 2, 3]), true);
        let e = read_idx(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");

        write(&p, &idx(&[2], &[1, 2, 3]), false);
        assert!(read_idx(&p).unwrap_err().to_string().contains("trailing"));
    }

    #[test]
    fn label_count_must_match() {
        let dir = tempdir();
        let (i, l) = (dir.join("i"), dir.join("l"));
        write(&i, &idx(&[2, 1, 1], &[0, 1]), false);
        write(&l, &idx(&[3], &[0, 1, 1]), false);
        assert!(load_idx_pair(&i, &l, None).unwrap_err().to_string().contains("3 labels for the 2 images"));
    }

    #[test]
    fn labels_outside_the_classes_are_refused_at_their_record() {
        let dir = tempdir();
        let (i, l) = (dir.join("li"), dir.join("ll"));
        write(&i, &idx(&[4, 1, 1], &[0; 4]), false);
        // 0, 1, 2 and a 255: classes 3 to 254 have no image.
        write(&l, &idx(&[4], &[0, 1, 255, 2]), false);
        let e = load_idx_pair(&i, &l, None).unwrap_err().to_string();
        assert!(e.contains("byte 10") && e.contains("record 2 has label 255") && e.contains("252 of them"), "{e}");
        // A declared class count: the 255 is outside it; within it, the set loads.
        let e = load_idx_pair(&i, &l, Some(10)).unwrap_err().to_string();
        assert!(e.contains("record 2 has label 255, outside the 10 classes"), "{e}");
        write(&l, &idx(&[4], &[0, 1, 3, 2]), true);
        assert_eq!(load_idx_pair(&i, &l, None).unwrap().classes, 4);
        assert_eq!(load_idx_pair(&i, &l, Some(10)).unwrap().classes, 10);
        let e = load_idx_pair(&i, &l, Some(3)).unwrap_err().to_string();
        assert!(e.contains("record 2 has label 3") && e.contains("decompressed"), "{e}");
    }

    #[test]
    fn every_gzip_member_is_read_and_damage_is_placed_in_the_compressed_stream() {
        let dir = tempdir();
        let p = dir.join("members.gz");
        let whole = idx(&[6], &[1, 2, 3, 4, 5, 6]);
        // Two members, as `cat a.gz b.gz` makes: one stream to `gzip -d`.
        let mut bytes = Vec::new();
        for part in [&whole[..7], &whole[7..]] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            bytes.extend(e.finish().unwrap());
        }
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(read_idx(&p).unwrap().data, [1, 2, 3, 4, 5, 6]);
        // A damaged deflate stream: the error says so, and where the decoder was in the file.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::none());
        e.write_all(&idx(&[200], &[7; 200])).unwrap();
        let mut damaged = e.finish().unwrap();
        let n = damaged.len();
        damaged[10] ^= 0xff; // the stored block's header
        damaged.truncate(n - 4);
        std::fs::write(&p, &damaged).unwrap();
        let e = read_idx(&p).unwrap_err().to_string();
        assert!(e.contains("damaged gzip stream") && !e.contains("byte 0:"), "{e}");
    }

    /// A fresh, empty directory for the calling test: process ids repeat between runs, so what
    /// an earlier run left under the same name (its `broken.png`) is removed first.
    pub(crate) fn tempdir() -> std::path::PathBuf {
        let d =
            std::env::temp_dir().join(format!("shrink-idx-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
