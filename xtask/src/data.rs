//! A run's data, loaded as its plan says: the format's files, the limits, the validation split,
//! and the batcher that normalises and augments.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use shrink_core::data::{Batcher, Dataset, load_cifar10_bin, load_idx_pair, load_image_folder, shuffled};
use shrink_core::train::TrainData;

use crate::plan::{DataSource, Plan};

/// The loaded data of a run.
pub struct Data {
    pub train: Dataset,
    pub validation: Option<Dataset>,
    pub test: Dataset,
    pub batcher: Batcher,
}

impl Data {
    /// What a training call reads.
    pub fn train_data(&self) -> TrainData<'_> {
        TrainData { train: &self.train, validation: self.validation.as_ref(), batcher: &self.batcher }
    }
}

/// Data that cannot be used as the plan says (files that do not fit each other or the plan):
/// the user's input, so exit code 2 like a config error.
#[derive(Debug)]
pub struct DataError(pub String);

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// Loads the data of `plan`; every error is a [`DataError`].
///
/// # Errors
/// As [`load_files`].
pub fn load(plan: &Plan) -> Result<Data> {
    load_files(plan).map_err(|e| DataError(format!("{e:#}")).into())
}

/// Loads the data of `plan`.
///
/// # Errors
/// A file that is missing or damaged (naming it and the byte), training and test images of
/// different shapes, or images of another shape than validation read from the header.
fn load_files(plan: &Plan) -> Result<Data> {
    let d = &plan.data;
    let p = &d.path;
    let find = |stem: &str| crate::plan::idx_file(p, stem);
    let (train_set, test_set) = match d.source {
        DataSource::Mnist5k | DataSource::Idx => {
            // The test labels must be among the training set's classes.
            let train = load_idx_pair(&find("train-images-idx3-ubyte"), &find("train-labels-idx1-ubyte"), d.classes)?;
            let classes = Some(train.classes);
            (train, load_idx_pair(&find("t10k-images-idx3-ubyte"), &find("t10k-labels-idx1-ubyte"), classes)?)
        }
        DataSource::Cifar10 => {
            let train_files: Vec<PathBuf> = (1..=5).map(|i| p.join(format!("data_batch_{i}.bin"))).collect();
            let refs: Vec<&Path> = train_files.iter().map(|f| f.as_path()).collect();
            (load_cifar10_bin(&refs)?, load_cifar10_bin(&[&p.join("test_batch.bin")])?)
        }
        DataSource::ImageFolder { image_size, channels } => (
            load_image_folder(&p.join("train"), image_size, channels)?,
            load_image_folder(&p.join("test"), image_size, channels)?,
        ),
    };
    if let Some(classes) = d.classes.filter(|&c| c != train_set.classes) {
        return Err(anyhow!("key `data.classes`: {classes}, but {} has {} classes", p.display(), train_set.classes));
    }
    if train_set.shape != test_set.shape {
        return Err(anyhow!(
            "{}: training images are {:?} but test images are {:?}",
            p.display(),
            train_set.shape,
            test_set.shape
        ));
    }
    if train_set.shape != d.native_shape {
        return Err(anyhow!(
            "{}: the images are {:?}, but were {:?} when the config was checked (did the files change?)",
            p.display(),
            train_set.shape,
            d.native_shape
        ));
    }
    let (train_set, test_set) = if d.shape != d.native_shape {
        tracing::info!("images converted from {:?} to {:?} (data.image_size, data.channels)", d.native_shape, d.shape);
        (train_set.converted(d.shape)?, test_set.converted(d.shape)?)
    } else {
        (train_set, test_set)
    };
    let seed = plan.seed;
    let limit = |set: Dataset, limit: Option<usize>, salt: u64| match limit {
        Some(n) if n < set.len() => set.subset(&shuffled(set.len(), seed ^ salt)[..n]),
        _ => set,
    };
    let train_set = limit(train_set, d.train_limit, 0x7472);
    let test_set = limit(test_set, d.test_limit, 0x7465);
    let (train_set, validation) = if d.validation_fraction > 0.0 {
        let (t, v) = train_set.split(d.validation_fraction, seed)?;
        (t, Some(v))
    } else {
        (train_set, None)
    };
    // An imported model was trained with its own normalisation; the zoo's learn on the data's.
    let normalization = plan.model.normalization().unwrap_or_else(|| train_set.channel_stats());
    let batcher = Batcher { normalization, augmentation: d.augmentation.clone() };
    tracing::info!(train = train_set.len(), test = test_set.len(), "data loaded from {}", p.display());
    Ok(Data { train: train_set, validation, test: test_set, batcher })
}
