//! The cache of models trained from scratch: the baseline, a distill stage's teachers and its
//! students trained alone. A model is cached under a key of everything that decides its
//! weights, so a teacher with the baseline's settings is the baseline.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shrink_core::graph::Graph;
use shrink_core::io;
use shrink_core::train::{EpochRecord, TrainSettings, train};
use shrink_core::zoo::ModelSpec;

use crate::plan::{Plan, train_stage};
use crate::progress::Progress;
use crate::stages::StageContext;

/// What a cached model keeps beside its model file, including what the file must be: its
/// SHA-256 and the architecture it holds, checked before the file is used.
#[derive(Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    /// The model's name ([`ModelSpec::name`]) and trainable values.
    model: String,
    params: usize,
    /// SHA-256 of the model file as written.
    model_sha256: String,
    history: Vec<EpochRecord>,
    train_seconds: f64,
}

/// SHA-256 of `bytes` in hex: what cache entries and checkpoints record of their files.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The cached model and entry under `key`: `Ok(None)` when nothing is cached there, `Err(why)`
/// when something is but cannot be trusted (damaged, another key's, another model, a file
/// changed since it was cached). `fresh` is the model as a fresh build makes it: the cached
/// graph must have its nodes, ops and parameter shapes.
fn cached(
    model_file: &Path,
    meta: &Path,
    key: &str,
    fresh: &Graph,
    device: &burn::tensor::Device,
) -> std::result::Result<Option<(Graph, CacheEntry)>, String> {
    if !meta.exists() && !model_file.exists() {
        return Ok(None);
    }
    let bytes = std::fs::read(meta).map_err(|e| format!("{}: {e}", meta.display()))?;
    let entry: CacheEntry = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a cache entry of this version: {e}", meta.display()))?;
    if entry.key != key {
        return Err(format!("{}: made for key {}, not {key}", meta.display(), entry.key));
    }
    let model_bytes = std::fs::read(model_file).map_err(|e| format!("{}: {e}", model_file.display()))?;
    if sha256_hex(&model_bytes) != entry.model_sha256 {
        return Err(format!(
            "{}: the file is not the one cached (its SHA-256 differs from the entry's)",
            model_file.display()
        ));
    }
    let graph = io::load(model_file, device).map_err(|e| format!("{e}"))?;
    let structure = |g: &Graph| -> Vec<(String, String, Vec<usize>)> {
        g.nodes.iter().map(|n| (n.name.clone(), format!("{:?}", n.op), n.inputs.clone())).collect()
    };
    if structure(&graph) != structure(fresh) {
        return Err(format!(
            "{}: holds another architecture than the key's `{}` ({} parameters recorded)",
            model_file.display(),
            entry.model,
            entry.params
        ));
    }
    Ok(Some((graph, entry)))
}

/// A model trained from a fresh build (or reused from the cache).
pub struct Trained {
    pub graph: Graph,
    pub history: Vec<EpochRecord>,
    pub train_seconds: f64,
    pub key: String,
    pub reused: bool,
}

/// The cache key of a model trained from scratch: everything that decides its weights (the
/// architecture, the seed of its initial weights, the data, the training settings, and the
/// stage's position, which offsets the seed of the data order).
///
/// The thread count is not in it: training on the CPU backends gives the same weights, bit for
/// bit, at any thread count (`xtask/tests/runs.rs` trains a ResNet at 1 and 3 threads on flex and
/// ndarray and compares the files), so sweep trials run at other thread counts share the
/// baseline.
fn key(plan: &Plan, model: &ModelSpec, seed: u64, train: &TrainSettings, index: usize) -> String {
    let mut described = serde_json::json!({
        "model": model, "data": plan.data.to_config(), "stage": train_stage(train), "seed": seed,
        "backend": plan.backend,
        "shrink": env!("CARGO_PKG_VERSION"), "burn": shrink_core::BURN_VERSION,
    });
    if let ModelSpec::Onnx { path, .. } = model {
        // An imported model's weights are the file's: its bytes are part of the key.
        let bytes = std::fs::read(path).unwrap_or_default();
        described["model_file_sha256"] = sha256_hex(&bytes).into();
    }
    if index != 0 {
        // Keys of first-stage baselines stay as they were before the index counted.
        described["stage_index"] = index.into();
    }
    let digest = Sha256::digest(described.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Holds the cache's lock file of `key` (released when the returned file is dropped, or when
/// the process dies): while one process trains or reads a key, another waits.
fn lock_key(cache: &Path, key: &str, label: &str) -> Result<std::fs::File> {
    std::fs::create_dir_all(cache).with_context(|| format!("cannot create the cache {}", cache.display()))?;
    let path = cache.join(format!("{key}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            tracing::info!(%key, %label, "another process holds {}; waiting for it", path.display());
            eprintln!("waiting for another process training {label} {key} ({})", path.display());
            file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    Ok(file)
}

/// Builds `model` with `seed`, trains it with `train` as the stage at position `index` would
/// and caches it; a second call with the same inputs loads the cached model instead.
pub fn train_cached(
    cx: &StageContext<'_>,
    model: &ModelSpec,
    seed: u64,
    train_settings: &TrainSettings,
    index: usize,
    label: &str,
) -> Result<Trained> {
    let (cache, device) = (&cx.opts.cache, cx.device);
    let key = key(cx.plan, model, seed, train_settings, index);
    let model_file = cache.join(format!("{key}.safetensors"));
    let meta = cache.join(format!("{key}.json"));
    let data = cx.data;
    let graph = model.build(data.train.shape, data.train.classes, seed, device)?;
    // One process trains a key; others (sweep trials in parallel) wait here and then load it.
    let _lock = lock_key(cache, &key, label)?;
    match cached(&model_file, &meta, &key, &graph, device) {
        Ok(Some((graph, entry))) => {
            tracing::info!(%key, %label, "reusing the cached model from {}", cache.display());
            eprintln!("reusing cached {label} {key} ({})", cache.display());
            return Ok(Trained {
                graph,
                history: entry.history,
                train_seconds: entry.train_seconds,
                key,
                reused: true,
            });
        }
        Ok(None) => {}
        Err(why) => tracing::warn!("the cached {label} cannot be used, training it again: {why}"),
    }
    let mut progress = Progress::new(cx.opts.progress, train_settings.epochs, label);
    let t0 = Instant::now();
    let (graph, history) =
        train(graph, data.train_data(), train_settings, device, seed.wrapping_add(index as u64), &mut progress)
            .with_context(|| format!("training the {label}"))?;
    progress.finish();
    let train_seconds = t0.elapsed().as_secs_f64();
    io::save(&graph, &model_file)?;
    let model_bytes = std::fs::read(&model_file).with_context(|| format!("reading back {}", model_file.display()))?;
    let params = shrink_core::metrics::model_stats(&graph)?.params;
    let entry = CacheEntry {
        key: key.clone(),
        model: model.name(),
        params,
        model_sha256: sha256_hex(&model_bytes),
        history: history.clone(),
        train_seconds,
    };
    io::write_atomic(&meta, serde_json::to_string_pretty(&entry)?.as_bytes())?;
    tracing::info!(%key, %label, "cached in {}", cache.display());
    Ok(Trained { graph, history, train_seconds, key, reused: false })
}
