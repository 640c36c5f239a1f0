//! Image classification data: loaders for standard formats, normalisation, seeded shuffling,
//! batching, validation splits and augmentation.
//!
//! Images are kept as bytes (`u8`, `[n, channels, height, width]`) and turned into normalised
//! `f32` tensors one batch at a time, so even CIFAR-10's 50,000 images take 150 MB, not 600.

mod cifar;
mod folder;
mod idx;
mod mapped;

pub use cifar::{load_cifar10_bin, parse_cifar10_records};
pub use folder::load_image_folder;
pub use idx::{
    IdxArray, idx_dims, idx_image_shape, load_idx_images, load_idx_labels, load_idx_pair, parse_idx_bytes, read_idx,
};

use std::path::Path;
use std::sync::Arc;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Labelled images as bytes: in memory, or in a file the OS maps into memory and pages in as
/// batches read it (image folders, see [`load_image_folder`]). Subsets share the bytes.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// `[channels, height, width]` of every image.
    pub shape: [usize; 3],
    /// The images' bytes, image after image, channel-major.
    storage: Storage,
    /// Which image of `storage` each image of this set is (`None`: image `i` is image `i`).
    rows: Option<Arc<[u32]>>,
    /// One label per image, each `< classes`.
    pub labels: Vec<u32>,
    /// Number of classes.
    pub classes: usize,
    /// Class names when the source has them (image folders), else `"0"`, `"1"`, ….
    pub class_names: Vec<String>,
}

/// Where a dataset's bytes live.
#[derive(Clone)]
enum Storage {
    // A Vec rather than a slice: `Arc<[u8]>::from(Vec)` would copy every byte once more.
    Memory(Arc<Vec<u8>>),
    Mapped(Arc<mapped::MappedFile>),
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Memory(b) => write!(f, "Memory({} bytes)", b.len()),
            Storage::Mapped(m) => write!(f, "Mapped({} bytes)", m.bytes().len()),
        }
    }
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Memory(b) => b,
            Storage::Mapped(m) => m.bytes(),
        }
    }
}

/// Two datasets are equal when their images, labels and classes are (wherever the bytes live).
impl PartialEq for Dataset {
    fn eq(&self, other: &Self) -> bool {
        self.shape == other.shape
            && self.labels == other.labels
            && self.classes == other.classes
            && self.class_names == other.class_names
            && (0..self.len()).all(|i| self.image(i) == other.image(i))
    }
}

impl Dataset {
    /// A dataset from parts, checking that they agree: `pixels` holds the images one after the
    /// other, channel-major (`n * c * h * w` bytes).
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] when sizes disagree or a label is out of range.
    pub fn new(shape: [usize; 3], pixels: Vec<u8>, labels: Vec<u32>, classes: usize) -> Result<Self> {
        Self::with_storage(shape, Storage::Memory(Arc::new(pixels)), labels, classes)
    }

    fn with_storage(shape: [usize; 3], storage: Storage, labels: Vec<u32>, classes: usize) -> Result<Self> {
        let per = shape.iter().product::<usize>();
        let bytes = storage.bytes().len();
        if per == 0 || Some(bytes) != per.checked_mul(labels.len()) {
            return Err(Error::setting(
                "dataset",
                format!("{bytes} bytes of pixels for {} images of {shape:?}", labels.len()),
            ));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, l)| **l as usize >= classes) {
            return Err(Error::setting("dataset", format!("label {l} of image {i} is not below {classes} classes")));
        }
        if labels.len() > u32::MAX as usize {
            return Err(Error::setting("dataset", format!("{} images: at most 2^32 - 1", labels.len())));
        }
        let class_names = (0..classes).map(|c| c.to_string()).collect();
        Ok(Self { shape, storage, rows: None, labels, classes, class_names })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Whether the bytes are in a file mapped into memory rather than on the heap.
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped(_))
    }

    /// Image `i`'s bytes (`c * h * w`, channel-major).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        let per = self.shape.iter().product::<usize>();
        let row = self.rows.as_ref().map_or(i, |r| r[i] as usize);
        &self.storage.bytes()[row * per..(row + 1) * per]
    }

    /// The images at `indices`, as a new dataset sharing these bytes.
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let n = self.len();
        let rows: Arc<[u32]> = indices
            .iter()
            .map(|&i| {
                assert!(i < n, "image {i} of {n}");
                self.rows.as_ref().map_or(i as u32, |r| r[i])
            })
            .collect();
        Dataset {
            shape: self.shape,
            storage: self.storage.clone(),
            rows: Some(rows),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes,
            class_names: self.class_names.clone(),
        }
    }

    /// Splits off a validation set: a seeded shuffle, then the last `fraction` of the images.
    /// Returns `(train, validation)`.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] unless `0 <= fraction < 1`.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(Error::setting("data.validation_fraction", format!("expected [0, 1), got {fraction}")));
        }
        let order = shuffled(self.len(), seed);
        let n_val = (self.len() as f64 * fraction).round() as usize;
        let (train, val) = order.split_at(self.len() - n_val);
        Ok((self.subset(train), self.subset(val)))
    }

    /// The images as `[channels, height, width]`: resized (bilinear, as image folders are) and
    /// turned grey (luma) or RGB (the grey value in all three) — what a model made for other
    /// images needs, e.g. an imported ImageNet classifier on MNIST digits. The same set when
    /// the shape is already that.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for a channel count other than 1 or 3 or an empty size.
    pub fn converted(&self, shape: [usize; 3]) -> Result<Dataset> {
        if shape == self.shape {
            return Ok(self.clone());
        }
        let [c, h, w] = shape;
        if !matches!(c, 1 | 3) || !matches!(self.shape[0], 1 | 3) || h == 0 || w == 0 {
            return Err(Error::setting(
                "data.channels",
                format!("images of {:?} cannot become {shape:?}: 1 or 3 channels, positive sizes", self.shape),
            ));
        }
        let [c0, h0, w0] = self.shape;
        let mut pixels = Vec::with_capacity(self.len() * c * h * w);
        for i in 0..self.len() {
            let img = self.image(i);
            let dynamic = if c0 == 1 {
                image::DynamicImage::ImageLuma8(
                    image::GrayImage::from_raw(w0 as u32, h0 as u32, img.to_vec()).expect("sized"),
                )
            } else {
                let hwc: Vec<u8> = (0..h0 * w0).flat_map(|p| (0..3).map(move |ch| img[ch * h0 * w0 + p])).collect();
                image::DynamicImage::ImageRgb8(image::RgbImage::from_raw(w0 as u32, h0 as u32, hwc).expect("sized"))
            };
            let resized = if [h0, w0] == [h, w] {
                dynamic
            } else {
                dynamic.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
            };
            if c == 1 {
                pixels.extend_from_slice(resized.to_luma8().as_raw());
            } else {
                let rgb = resized.to_rgb8();
                let raw = rgb.as_raw();
                pixels.extend((0..3).flat_map(|ch| raw.iter().skip(ch).step_by(3).copied()));
            }
        }
        let labels = (0..self.len()).map(|i| self.labels[i]).collect();
        let mut d = Dataset::new(shape, pixels, labels, self.classes)?;
        d.class_names = self.class_names.clone();
        Ok(d)
    }

    /// Mean and standard deviation of each channel, on the 0..1 scale.
    pub fn channel_stats(&self) -> Normalization {
        let [c, h, w] = self.shape;
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for img in (0..self.len()).map(|i| self.image(i)) {
            for (ch, plane) in img.chunks_exact(h * w).enumerate() {
                for &p in plane {
                    let v = p as f64 / 255.0;
                    sum[ch] += v;
                    sq[ch] += v * v;
                }
            }
        }
        let n = (self.len() * h * w).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq.iter().zip(&mean).map(|(s, m)| (s / n - m * m).max(1e-12).sqrt()).collect();
        Normalization { mean, std }
    }

    /// Number of images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// Per-channel normalisation `(x / 255 - mean) / std`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Mean per channel (0..1 scale).
    pub mean: Vec<f64>,
    /// Standard deviation per channel (0..1 scale).
    pub std: Vec<f64>,
}

/// Training-time augmentation, as in the CIFAR ResNet paper.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augmentation {
    /// Zero-pad by this many pixels, then crop back to size at a random offset (0: off).
    #[serde(default)]
    pub random_crop_padding: usize,
    /// Flip horizontally with probability 1/2 (wrong for digits; meant for natural images).
    #[serde(default)]
    pub horizontal_flip: bool,
}

impl Augmentation {
    /// Whether any augmentation is on.
    pub fn is_active(&self) -> bool {
        self.random_crop_padding > 0 || self.horizontal_flip
    }
}

/// A permutation of `0..n` from a seed (ChaCha8, stable across platforms and versions).
pub fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    order
}

/// Turns images into normalised tensor batches, with optional augmentation.
#[derive(Clone, Debug)]
pub struct Batcher {
    /// Normalisation applied to every batch.
    pub normalization: Normalization,
    /// Augmentation (only applied when a random generator is passed to [`Batcher::batch`]).
    pub augmentation: Augmentation,
}

impl Batcher {
    /// The images and labels at `indices` as `([b, c, h, w], [b])` tensors on `device`.
    /// Augmentation is applied when `rng` is given.
    pub fn batch(
        &self,
        data: &Dataset,
        indices: &[usize],
        device: &Device,
        rng: Option<&mut ChaCha8Rng>,
    ) -> (Tensor<4>, Tensor<1, Int>) {
        let [c, h, w] = data.shape;
        let mut values = Vec::with_capacity(indices.len() * c * h * w);
        let scale: Vec<(f32, f32)> = (0..c)
            .map(|ch| {
                let m = self.normalization.mean.get(ch).copied().unwrap_or(0.0);
                let s = self.normalization.std.get(ch).copied().unwrap_or(1.0);
                ((1.0 / (255.0 * s)) as f32, (-m / s) as f32)
            })
            .collect();
        let mut rng = rng;
        for &i in indices {
            let img = data.image(i);
            let (dy, dx, flip) = match rng.as_deref_mut() {
                Some(r) if self.augmentation.is_active() => {
                    let p = self.augmentation.random_crop_padding as i64;
                    let dy = if p > 0 { r.random_range(-p..=p) as isize } else { 0 };
                    let dx = if p > 0 { r.random_range(-p..=p) as isize } else { 0 };
                    (dy, dx, self.augmentation.horizontal_flip && r.random_bool(0.5))
                }
                _ => (0, 0, false),
            };
            for (ch, &(mul, add)) in scale.iter().enumerate() {
                let plane = &img[ch * h * w..(ch + 1) * h * w];
                for y in 0..h as isize {
                    for x in 0..w as isize {
                        let sy = y + dy;
                        let sx0 = x + dx;
                        let sx = if flip { w as isize - 1 - sx0 } else { sx0 };
                        // Pixels shifted in from outside are the zero padding (black, 0).
                        let p = if sy >= 0 && sy < h as isize && sx >= 0 && sx < w as isize {
                            plane[sy as usize * w + sx as usize]
                        } else {
                            0
                        };
                        values.push(p as f32 * mul + add);
                    }
                }
            }
        }
        let images = Tensor::<4>::from_data(TensorData::new(values, [indices.len(), c, h, w]), device);
        let labels: Vec<i64> = indices.iter().map(|&i| data.labels[i] as i64).collect();
        let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [indices.len()]), device);
        (images, labels)
    }
}

/// A random generator for augmentation and shuffling from a seed.
pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// The MNIST-5k data that ships with shrink (`data/mnist5k`): 4,000 training and 1,000 test
/// images. Returns `(train, test)`.
///
/// # Errors
/// As [`load_idx_pair`], when the files are missing or damaged.
pub fn load_mnist_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
    let train = load_idx_pair(&dir.join("train-images-idx3-ubyte.gz"), &dir.join("train-labels-idx1-ubyte.gz"), None)?;
    let test = load_idx_pair(
        &dir.join("t10k-images-idx3-ubyte.gz"),
        &dir.join("t10k-labels-idx1-ubyte.gz"),
        Some(train.classes),
    )?;
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        // 4 images of 1×2×2, labels 0..4 % 2.
        Dataset::new([1, 2, 2], (0..16).map(|v| v as u8 * 10).collect(), vec![0, 1, 0, 1], 2).unwrap()
    }

    #[test]
    fn shuffle_is_seeded_and_a_permutation() {
        let a = shuffled(100, 7);
        assert_eq!(a, shuffled(100, 7));
        assert_ne!(a, shuffled(100, 8));
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn conversion_resizes_and_changes_channels() {
        let d = tiny();
        let rgb = d.converted([3, 2, 2]).unwrap();
        assert_eq!(rgb.shape, [3, 2, 2]);
        // Grey to RGB: the grey value in each of the three planes.
        assert_eq!(rgb.image(1), &[40, 50, 60, 70, 40, 50, 60, 70, 40, 50, 60, 70]);
        assert_eq!(rgb.converted([1, 2, 2]).unwrap().image(1), d.image(1));
        let big = d.converted([1, 4, 4]).unwrap();
        assert_eq!((big.shape, big.len(), big.labels.clone()), ([1, 4, 4], 4, d.labels.clone()));
        // Bilinear: the corners keep their values' order, the mean stays about the same.
        let px = big.image(1);
        assert!(px[0] < px[15]);
        let mean = px.iter().map(|&p| p as f64).sum::<f64>() / 16.0;
        assert!((mean - 55.0).abs() < 3.0, "{mean}");
        assert!(d.converted([2, 2, 2]).is_err());
        assert!(d.converted([1, 0, 2]).is_err());
    }

    #[test]
    fn split_partitions_the_images() {
        let d = tiny();
        let (t, v) = d.split(0.25, 1).unwrap();
        assert_eq!((t.len(), v.len()), (3, 1));
        let pixels = |d: &Dataset| (0..d.len()).flat_map(|i| d.image(i).to_vec()).collect::<Vec<u8>>();
        let mut all: Vec<u8> = pixels(&t).into_iter().chain(pixels(&v)).collect();
        all.sort();
        let mut orig = pixels(&d);
        orig.sort();
        assert_eq!(all, orig);
        assert!(d.split(1.0, 1).is_err());
    }

    #[test]
    fn batch_normalises_and_flip_mirrors() {
        let d = tiny();
        let device = Device::flex();
        let b = Batcher {
            normalization: Normalization { mean: vec![0.0], std: vec![1.0] },
            augmentation: Augmentation::default(),
        };
        let (x, y) = b.batch(&d, &[1], &device, None);
        let v: Vec<f32> = x.into_data().try_to_vec().unwrap();
        let expect: Vec<f32> = [40u8, 50, 60, 70].iter().map(|&p| p as f32 / 255.0).collect();
        for (a, e) in v.iter().zip(&expect) {
            assert!((a - e).abs() < 1e-6);
        }
        assert_eq!(y.into_data().convert::<i64>().try_to_vec::<i64>().unwrap(), vec![1]);

        let flip = Batcher { augmentation: Augmentation { random_crop_padding: 0, horizontal_flip: true }, ..b };
        let mut r = rng(0);
        let mut saw_flip = false;
        for _ in 0..20 {
            let (x, _) = flip.batch(&d, &[1], &device, Some(&mut r));
            let v: Vec<f32> = x.into_data().try_to_vec().unwrap();
            if (v[0] - 50.0 / 255.0).abs() < 1e-6 {
                assert!((v[1] - 40.0 / 255.0).abs() < 1e-6 && (v[2] - 70.0 / 255.0).abs() < 1e-6);
                saw_flip = true;
            }
        }
        assert!(saw_flip);
    }

    #[test]
    fn label_out_of_range_is_refused() {
        assert!(Dataset::new([1, 1, 1], vec![0, 0], vec![0, 5], 3).is_err());
        assert!(Dataset::new([1, 1, 1], vec![0], vec![0, 1], 3).is_err());
    }

    #[test]
    fn channel_stats_of_constant_image() {
        let d = Dataset::new([2, 1, 1], vec![255, 0, 255, 0], vec![0, 0], 1).unwrap();
        let n = d.channel_stats();
        assert!((n.mean[0] - 1.0).abs() < 1e-9 && n.mean[1].abs() < 1e-9);
    }
}
