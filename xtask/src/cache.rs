//! The cache of models trained from scratch: the baseline, a distill stage's teachers and its
//! students trained alone. A model is cached under a key of everything that decides its
//! weights, so a teacher with the baseline's settings is the baseline.

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

/// What a cached model keeps beside its model file.
#[derive(Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    history: Vec<EpochRecord>,
    train_seconds: f64,
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
fn key(plan: &Plan, model: &ModelSpec, seed: u64, train: &TrainSettings, index: usize) -> String {
    let mut described = serde_json::json!({
        "model": model, "data": plan.data.to_config(), "stage": train_stage(train), "seed": seed,
        "backend": plan.backend, "threads": plan.threads,
        "shrink": env!("CARGO_PKG_VERSION"), "burn": shrink_core::BURN_VERSION,
    });
    if let ModelSpec::Onnx { path, .. } = model {
        // An imported model's weights are the file's: its bytes are part of the key.
        let bytes = std::fs::read(path).unwrap_or_default();
        described["model_file_sha256"] = format!("{:x}", Sha256::digest(&bytes)).into();
    }
    if index != 0 {
        // Keys of first-stage baselines stay as they were before the index counted.
        described["stage_index"] = index.into();
    }
    let digest = Sha256::digest(described.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
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
    let hit = (|| {
        let entry: CacheEntry = serde_json::from_slice(&std::fs::read(&meta).ok()?).ok()?;
        let g = io::load(&model_file, device).ok()?;
        (entry.key == key).then_some((g, entry))
    })();
    if let Some((graph, entry)) = hit {
        tracing::info!(%key, %label, "reusing the cached model from {}", cache.display());
        eprintln!("reusing cached {label} {key} ({})", cache.display());
        return Ok(Trained { graph, history: entry.history, train_seconds: entry.train_seconds, key, reused: true });
    }
    let data = cx.data;
    let graph = model.build(data.train.shape, data.train.classes, seed, device)?;
    let mut progress = Progress::new(cx.opts.progress, train_settings.epochs, label);
    let t0 = Instant::now();
    let (graph, history) =
        train(graph, data.train_data(), train_settings, device, seed.wrapping_add(index as u64), &mut progress)
            .with_context(|| format!("training the {label}"))?;
    progress.finish();
    let train_seconds = t0.elapsed().as_secs_f64();
    let entry = CacheEntry { key: key.clone(), history: history.clone(), train_seconds };
    io::save(&graph, &model_file)?;
    io::write_atomic(&meta, serde_json::to_string_pretty(&entry)?.as_bytes())?;
    tracing::info!(%key, %label, "cached in {}", cache.display());
    Ok(Trained { graph, history, train_seconds, key, reused: false })
}
