//! `cargo xtask profile RUN_DIR`: where a run's model spends its time on the CPU plans, step by
//! step (`Plan::profile`), one thread — the f32 plan of the model's graph and, for a quantized
//! model, its integer plan — printed as Markdown tables (median over the repeats).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// Profiles the model of `run` (its `model.safetensors`) at `batch` images, `repeats` times.
pub fn profile_run(run: &Path, batch: usize, repeats: usize) -> Result<String> {
    let file = run.join("model.safetensors");
    if !file.is_file() {
        bail!("{} has no model.safetensors: profile a run directory whose run finished", run.display());
    }
    let threads = shrink_core::backend::set_cpu_threads(1);
    if threads != 1 {
        bail!("the thread pool was already started with {threads} threads");
    }
    let device = shrink_core::BackendKind::Flex.device()?;
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    // A quantized model file has integer annotations; any other is a plain graph.
    let (graph, quantized) = match shrink_quant::QuantizedModel::from_bytes(&bytes, &file, &device) {
        Ok(q) => (q.graph.clone(), Some(q)),
        Err(_) => (shrink_core::io::from_bytes(&bytes, &file, &device)?, None),
    };
    let [c, h, w] = graph.input_shape();
    let input: Vec<f32> = (0..batch * c * h * w).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let mut out = format!(
        "# profile of `{}` — batch {batch}, one thread, median of {repeats}\n\ngit {}; CPU {}\n",
        run.display(),
        crate::report::git_revision(),
        crate::report::cpu_model()
    );
    let mut f32_plan = shrink_core::runtime::freeze(&graph)?;
    out += &table("f32 plan", &mut f32_plan, &input, batch, repeats)?;
    if let Some(q) = quantized {
        let mut int8_plan = q.freeze(1)?;
        out += &table("integer plan", &mut int8_plan, &input, batch, repeats)?;
        if !q.float_layers.is_empty() {
            out += "\nLayers left in f32 by quantization:\n\n";
            for (name, why) in &q.float_layers {
                out += &format!("- `{name}`: {why}\n");
            }
        }
    }
    Ok(out)
}

/// One plan's steps: node, kernel, median time and share of the total.
fn table(
    title: &str,
    plan: &mut shrink_core::runtime::Plan,
    input: &[f32],
    batch: usize,
    repeats: usize,
) -> Result<String> {
    plan.profile(input, batch)?;
    let mut runs: Vec<Vec<(String, String, Duration)>> = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        runs.push(plan.profile(input, batch)?);
    }
    let steps = runs[0].len();
    let medians: Vec<f64> = (0..steps)
        .map(|i| {
            let mut t: Vec<f64> = runs.iter().map(|r| r[i].2.as_secs_f64() * 1e3).collect();
            crate::bench::median(&mut t)
        })
        .collect();
    let total: f64 = medians.iter().sum();
    let mut s = format!(
        "\n## {title}: {total:.3} ms (sum of the steps' medians)\n\n| step | kernel | ms | share |\n|---|---|---|---|\n"
    );
    for (i, (node, kernel, _)) in runs[0].iter().enumerate() {
        s += &format!("| `{node}` | {kernel} | {:.4} | {:.1} % |\n", medians[i], 100.0 * medians[i] / total.max(1e-12));
    }
    Ok(s)
}
