//! `[export]` and `cargo xtask export`: the run's final model as ONNX — `model.onnx` (f32) and,
//! once quantized, `model.int8.onnx` (QDQ) — and, when asked, ONNX Runtime's check of both
//! against shrink's own plans on the test images ([`crate::onnxruntime`]).

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use shrink_core::graph::Graph;
use shrink_core::onnx::ExportOptions;
use shrink_quant::QuantizedModel;
use shrink_quant::onnx::{QdqSummary, export_qdq};
use xtask::config::ExportSettings;
use xtask::onnxruntime::{CheckSpec, ModelCheck, OrtResult};

/// What the export wrote, for the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ExportReport {
    /// Files written into the run directory.
    pub files: Vec<ExportedFile>,
    /// What the QDQ file holds, when the model was quantized.
    pub qdq: Option<QdqSummary>,
    /// What a reader of the files should know (dense sparsity, widened weights…).
    pub notes: Vec<String>,
    /// ONNX Runtime's check, when `check_onnxruntime` asked for it.
    pub onnxruntime: Option<OrtResult>,
}

/// One exported file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ExportedFile {
    /// Its name in the run directory.
    pub file: String,
    /// What it holds.
    pub format: String,
    /// Its size.
    pub bytes: usize,
}

/// The model files' metadata: shrink's version, the revision, the config.
pub fn options(settings: &ExportSettings, config_name: &str, revision: &str) -> ExportOptions {
    ExportOptions {
        opset: settings.opset,
        fold_batch_norms: settings.fold_batch_norms,
        metadata: vec![
            ("shrink_version".into(), env!("CARGO_PKG_VERSION").into()),
            ("git_revision".into(), revision.into()),
            ("config".into(), config_name.into()),
        ],
    }
}

/// Writes the ONNX files of `graph` (and `quantized`) into `dir`, each atomically.
///
/// # Errors
/// From the exporters, or writing.
pub fn write_files(
    graph: &Graph,
    quantized: Option<&QuantizedModel>,
    options: &ExportOptions,
    dir: &Path,
) -> Result<ExportReport> {
    let mut report = ExportReport::default();
    let f32_bytes = shrink_core::onnx::export(graph, options).context("ONNX export of the f32 model")?;
    shrink_core::io::write_atomic(&dir.join("model.onnx"), &f32_bytes)?;
    let folded = if options.fold_batch_norms { ", batch norms folded" } else { "" };
    report.files.push(ExportedFile {
        file: "model.onnx".into(),
        format: format!("ONNX f32, opset {}{folded}", options.opset),
        bytes: f32_bytes.len(),
    });
    let (weights, zeros) = zero_weights(graph)?;
    if zeros * 10 >= weights && weights > 0 {
        report.notes.push(format!(
            "{:.1} % of the conv and linear weights are zero (unstructured sparsity): ONNX has no sparse convolution \
             weights, so the files store them dense; shrink's sparse plan is where that sparsity runs faster",
            100.0 * zeros as f64 / weights as f64
        ));
    }
    if let Some(q) = quantized {
        let (bytes, summary) = export_qdq(q, options).context("QDQ export of the quantized model")?;
        shrink_core::io::write_atomic(&dir.join("model.int8.onnx"), &bytes)?;
        report.files.push(ExportedFile {
            file: "model.int8.onnx".into(),
            format: format!("ONNX QDQ int8 (u8 activations, int8 weights), opset {}", options.opset),
            bytes: bytes.len(),
        });
        if !summary.widened.is_empty() {
            report.notes.push(format!(
                "{} layer(s) with fewer than 8 weight bits are written as int8 with the same values (ONNX Runtime's \
                 integer convolutions take 8-bit weights); shrink's own model file packs them",
                summary.widened.len()
            ));
        }
        if !summary.requantized_outputs.is_empty() {
            report.notes.push(format!(
                "{} convolution(s) feeding a residual add, a pooling or a float layer round their output to a \
                 calibrated u8 grid, in the file as in shrink's integer plan",
                summary.requantized_outputs.len()
            ));
        }
        report.qdq = Some(summary);
    }
    Ok(report)
}

/// Conv and linear weights, and how many are exactly zero.
fn zero_weights(graph: &Graph) -> Result<(usize, usize)> {
    let (mut all, mut zeros) = (0, 0);
    for id in 0..graph.nodes.len() {
        if let Some((w, _)) = graph.layer_weight(id)? {
            all += w.len();
            zeros += w.iter().filter(|v| **v == 0.0).count();
        }
    }
    Ok((all, zeros))
}

/// Runs ONNX Runtime's check of the files [`write_files`] wrote into `dir`, on `images`
/// (normalised as shrink evaluates them, `[n, c, h, w]`) with `labels`; the check's files go into
/// a directory that is removed afterwards.
///
/// # Errors
/// From the plans, writing the check's files, or the check.
pub fn check_with_onnxruntime(
    graph: &Graph,
    quantized: Option<&QuantizedModel>,
    images: &[f32],
    labels: &[u32],
    dir: &Path,
) -> Result<OrtResult> {
    let shape = graph.input_shape();
    let n = labels.len();
    let check_dir = dir.join("onnxruntime_check");
    std::fs::create_dir_all(&check_dir).with_context(|| format!("cannot create {}", check_dir.display()))?;
    let write = |name: &str, bytes: Vec<u8>| -> Result<String> {
        std::fs::write(check_dir.join(name), bytes).with_context(|| format!("cannot write {name}"))?;
        Ok(name.to_string())
    };
    let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let result = (|| {
        let images_file = write("images.f32", le(images))?;
        let labels_file = write("labels.u32", labels.iter().flat_map(|l| l.to_le_bytes()).collect())?;
        let f32_logits = run_in_chunks(&mut shrink_core::runtime::freeze(graph)?, images, n)?;
        let f32_check = ModelCheck {
            model: dir.join("model.onnx").display().to_string(),
            shrink_logits: write("shrink_f32.f32", le(&f32_logits))?,
            output_step: None,
            layers: Vec::new(),
        };
        let int8_check = match quantized {
            Some(q) => {
                let logits = run_in_chunks(&mut q.freeze(1)?, images, n)?;
                let (lo, hi) = logits.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                Some(ModelCheck {
                    model: dir.join("model.int8.onnx").display().to_string(),
                    shrink_logits: write("shrink_int8.f32", le(&logits))?,
                    output_step: Some(((hi - lo) / 255.0).max(f32::MIN_POSITIVE)),
                    layers: q.layers.keys().cloned().collect(),
                })
            }
            None => None,
        };
        let spec = CheckSpec {
            input_shape: shape,
            images: images_file,
            labels: labels_file,
            f32: Some(f32_check),
            int8: int8_check,
        };
        write("check.json", serde_json::to_vec_pretty(&spec)?)?;
        xtask::onnxruntime::check(&check_dir)
    })();
    let _ = std::fs::remove_dir_all(&check_dir);
    result
}

/// The logits of `n` images, 250 at a time.
fn run_in_chunks(plan: &mut shrink_core::runtime::Plan, images: &[f32], n: usize) -> Result<Vec<f32>> {
    let per = images.len() / n.max(1);
    let mut out = Vec::new();
    for chunk in images.chunks(250 * per) {
        out.extend_from_slice(plan.run(chunk, chunk.len() / per)?);
    }
    Ok(out)
}
