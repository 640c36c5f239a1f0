//! `report.md`: the report as tables a person reads, one function per section.

use std::fmt::Write;

use shrink_core::metrics::Latency;

use super::{DistillSummary, ModelResult, PruneSummary, QuantSummary, Report, StageReport};

fn mb(bytes: usize) -> String {
    format!("{:.3} MB", bytes as f64 / 1e6)
}

/// The report as a table a person reads.
pub fn markdown(r: &Report) -> String {
    let mut s = header(r);
    s += &stage_table(r);
    for st in &r.stages {
        if let Some(p) = &st.pruning {
            s += &pruning(st, p);
        }
    }
    for st in &r.stages {
        if let Some(q) = &st.quantization {
            s += &quantization(st, q);
        }
    }
    for st in &r.stages {
        if let Some(d) = &st.distillation {
            s += &distillation(st.index, d);
        }
    }
    for st in r.stages.iter().filter(|st| !st.history.is_empty()) {
        s += &training(st);
    }
    if let Some(last) = r.stages.last() {
        s += &last_stage(last);
    }
    if let Some(x) = &r.export {
        s += &export(x, r.stages.last().map_or(0, |st| st.file_bytes));
    }
    s += "\n## Conventions\n\n";
    for c in &r.conventions {
        s += &format!("- {c}\n");
    }
    s
}

/// Title, provenance, data, resumptions and the error of a failed run.
fn header(r: &Report) -> String {
    let p = &r.provenance;
    let mut s = format!("# {} — {}\n\n", r.name, r.status);
    s += &format!(
        "- config: `{}`; model: `{}`\n- backend: {} ({} thread(s)); seed {}\n- git {}{}; host {}; CPU {}\n- shrink {}, burn {}, {} build\n- started {} finished {}\n",
        r.config,
        r.model,
        p.backend,
        p.threads,
        p.seed,
        p.git_revision,
        if p.git_dirty { " (dirty)" } else { "" },
        p.host,
        p.cpu,
        p.shrink_version,
        p.burn_version,
        p.profile,
        p.started_utc,
        if p.finished_utc.is_empty() { "-" } else { &p.finished_utc },
    );
    if let Some(d) = &r.data {
        s += &format!(
            "- data: {} train, {} validation, {} test images of {:?}, {} classes\n",
            d.train, d.validation, d.test, d.shape, d.classes
        );
    }
    for x in &r.resumed {
        s += &format!(
            "- resumed {} from its checkpoint after {} finished stage(s) (it had been left `{}`)\n",
            x.utc, x.stages_kept, x.previous_status
        );
    }
    if let Some(err) = &r.error {
        s += &format!("\n**Failed** in stage {}: {err}\n", r.current_stage.as_deref().unwrap_or("?"));
    }
    s
}

/// One row per stage: accuracy, size, cost, latency, wall time.
fn stage_table(r: &Report) -> String {
    let mut s = String::from(
        "\n| # | stage | test top-1 | top-5 | loss | evaluated on | params | non-zeros | file | MACs | latency (median / p90) | wall |\n",
    );
    s += "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for st in &r.stages {
        let (top1, top5, loss) = st
            .test
            .as_ref()
            .map(|t| (format!("{:.4}", t.top1), format!("{:.4}", t.top5), format!("{:.4}", t.loss)))
            .unwrap_or_default();
        let lat: Vec<String> = st
            .latency
            .iter()
            .map(|l| {
                format!("b{}: {:.3} / {:.3} ms ({}, {}t)", l.batch_size, l.median_ms, l.p90_ms, l.runner, l.threads)
            })
            .collect();
        let mut kind = st.kind.clone();
        if let Some(k) = &st.cached_baseline {
            kind += &format!(" (cached baseline {k})");
        }
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1}s |\n",
            st.index,
            kind,
            top1,
            top5,
            loss,
            st.evaluated_on,
            st.params,
            st.nonzeros,
            mb(st.file_bytes),
            st.macs,
            lat.join("<br>"),
            st.wall_seconds
        );
    }
    s
}

/// A prune stage: what changed, before and after, and its per-layer tables.
fn pruning(st: &StageReport, p: &PruneSummary) -> String {
    let mut s = format!("\n## Pruning, stage {}\n\n- method: {}\n- execution: {}\n", st.index, p.method, p.execution);
    if let (Some(before), Some(after)) = (&p.test_before, &st.test) {
        s += &format!(
            "- test top-1 {:.4} → **{:.4}** ({:+.2} pp), {} → {} errors\n",
            before.top1,
            after.top1,
            (after.top1 - before.top1) * 100.0,
            before.errors(),
            after.errors()
        );
    }
    if let Some(t) = &p.sparse_test {
        s += &format!(
            "- on the sparse CPU plan (`cpu-plan-sparse`): test top-1 {:.4}; sparse kernels for {}\n",
            t.top1,
            p.sparse_kernels.iter().map(|(l, k)| format!("{l} ({k})")).collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(w) = p.weight_sparsity {
        s += &format!("- weight sparsity of the pruned layers: **{:.2} %**\n", w * 100.0);
    }
    let ratio = |after: f64, before: f64| after / before.max(1.0);
    s += &format!(
        "- parameters {} → {} ({:.3}×); non-zeros {} → {} ({:.3}×); MACs per image {} → {} ({:.3}×); model file {} → {} ({:.3}×)\n",
        p.params_before,
        st.params,
        ratio(st.params as f64, p.params_before as f64),
        p.nonzeros_before,
        st.nonzeros,
        ratio(st.nonzeros as f64, p.nonzeros_before as f64),
        p.macs_before,
        st.macs,
        ratio(st.macs as f64, p.macs_before as f64),
        mb(p.file_bytes_before),
        mb(st.file_bytes),
        ratio(st.file_bytes as f64, p.file_bytes_before as f64)
    );
    s += &latency_changes(&p.latency_before, &st.latency);
    s += &pruning_steps(p);
    s += &pruning_tables(st, p);
    s
}

/// Each latency measured both before and after a prune stage, as a speed-up.
fn latency_changes(before: &[Latency], after: &[Latency]) -> String {
    let mut s = String::new();
    for a in after {
        // The sparse plan replaces the dense plan of the model before pruning.
        let runner = if a.runner == "cpu-plan-sparse" { "cpu-plan" } else { a.runner.as_str() };
        let Some(b) =
            before.iter().find(|b| b.runner == runner && b.batch_size == a.batch_size && b.threads == a.threads)
        else {
            continue;
        };
        let _ = writeln!(
            s,
            "- latency {} b{} ({}t): {:.3} → {:.3} ms median, **{:.2}×** faster (measured in this run, one after the other)",
            if runner == a.runner { a.runner.clone() } else { format!("{runner} → {}", a.runner) },
            a.batch_size,
            a.threads,
            b.median_ms,
            a.median_ms,
            b.median_ms / a.median_ms.max(1e-9)
        );
    }
    s
}

/// A prune stage's schedule, lottery rounds and sensitivity scan.
fn pruning_steps(p: &PruneSummary) -> String {
    let mut s = String::new();
    if !p.events.is_empty() {
        let ev: Vec<String> = p.events.iter().map(|e| format!("{:.2} @ epoch {:.2}", e.sparsity, e.epoch)).collect();
        s += &format!("- schedule: {}\n", ev.join(", "));
    }
    if !p.tickets.is_empty() {
        let t: Vec<String> = p
            .tickets
            .iter()
            .map(|(sp, acc)| match acc {
                Some(a) => format!("{:.3} (train top-1 {a:.4})", sp),
                None => format!("{sp:.3}"),
            })
            .collect();
        s += &format!("- lottery-ticket rounds (sparsity after each): {}\n", t.join(", "));
    }
    if let Some(sens) = &p.sensitivity {
        s += &format!(
            "\n### Sensitivity: one layer pruned at a time, no fine-tuning\n\nMeasured on the {} split (unpruned: top-1 {:.4}, loss {:.4}). Chart: `{}`.\n\n| layer | ratio: top-1 |\n|---|---|\n",
            sens.evaluated_on, sens.reference_top1, sens.reference_loss, sens.chart
        );
        for u in &sens.units {
            let pts: Vec<String> = u.points.iter().map(|(r, t, _)| format!("{r:.2}: {t:.4}")).collect();
            s += &format!("| {} | {} |\n", u.name, pts.join(", "));
        }
        if !sens.chosen.is_empty() {
            let c: Vec<String> = sens.chosen.iter().map(|(n, r)| format!("{n} {r:.2}")).collect();
            s += &format!("\nSparsity chosen per layer for the top-1 budget: {}\n", c.join(", "));
        }
    }
    s
}

/// A prune stage's channel groups and its layers before and after.
fn pruning_tables(st: &StageReport, p: &PruneSummary) -> String {
    let mut s = String::new();
    if !p.groups.is_empty() {
        s += "\n| channel group (producers) | channels | kept |\n|---|---|---|\n";
        for (name, n, kept) in &p.groups {
            s += &format!("| {name} | {n} | {kept} |\n");
        }
    }
    s += "\n| layer | params before | after | non-zeros before | after | removed or zero | MACs before | after |\n|---|---|---|---|---|---|---|---|\n";
    for b in &p.layers_before {
        let Some(a) = st.layers.iter().find(|l| l.name == b.name) else { continue };
        s += &format!(
            "| {} | {} | {} | {} | {} | {:.1} % | {} | {} |\n",
            b.name,
            b.params,
            a.params,
            b.nonzeros,
            a.nonzeros,
            100.0 * (1.0 - a.nonzeros as f64 / b.params.max(1) as f64),
            b.macs,
            a.macs
        );
    }
    s
}

/// A quantize or qat stage: the scheme, both accuracies, the file, the sensitivity scan and the
/// kernel of every layer.
fn quantization(st: &StageReport, q: &QuantSummary) -> String {
    let int = st.test.as_ref().map(|t| t.top1).unwrap_or_default();
    let mut s = format!("\n## Quantization, stage {}\n\n", st.index);
    s += &format!(
        "- method: {}; weights: {}; activations: {}; calibrator: {} on {} training images\n",
        q.method, q.weights, q.activations, q.calibrator, q.calibration_images
    );
    s += &format!(
        "- test top-1 **measured on the integer kernels** (`cpu-plan-int8`, {}): {int:.4}; simulated (fake-quant on `{}`, f32 arithmetic): {:.4}\n",
        q.int8_gemm, q.simulated_on, q.simulated_test.top1
    );
    if let Some(p) = &q.ptq_test {
        s += &format!(
            "- for comparison, post-training quantization with the same settings (integer kernels): {:.4}\n",
            p.top1
        );
    }
    s += &format!(
        "- model file: {} (f32 before: {}, ratio {:.3})\n",
        mb(st.file_bytes),
        mb(q.f32_file_bytes),
        st.file_bytes as f64 / q.f32_file_bytes.max(1) as f64
    );
    if let Some(sens) = &q.sensitivity {
        let worst: Vec<&str> = sens.layers.iter().take(3).map(|(n, _, _)| n.as_str()).collect();
        s += &format!(
            "\n### Sensitivity: one layer quantized at a time\n\nMeasured on the integer kernels against the f32 plan, on the {} images (top-1 {:.4}, loss {:.4}); most sensitive: {}. Chart: `{}`.\n\n| layer | top-1 | Δ top-1 (pp) | loss | Δ loss |\n|---|---|---|---|---|\n",
            sens.split,
            sens.reference_top1,
            sens.reference_loss,
            worst.join(", "),
            sens.chart
        );
        for (name, top1, loss) in &sens.layers {
            s += &format!(
                "| {name} | {top1:.4} | {:+.2} | {loss:.4} | {:+.5} |\n",
                (top1 - sens.reference_top1) * 100.0,
                loss - sens.reference_loss
            );
        }
    }
    s += "\n| layer | weight bits | kernel |\n|---|---|---|\n";
    for (name, bits, kernel) in &q.quantized_layers {
        s += &format!("| {name} | {bits} | {kernel} |\n");
    }
    for (name, why) in &q.float_layers {
        s += &format!("| {name} | f32 | {why} |\n");
    }
    s
}

/// A distill stage: the objective, every model's accuracy, and what distillation gained.
fn distillation(index: usize, d: &DistillSummary) -> String {
    let mut s = format!("\n## Distillation, stage {index}\n\n");
    s += &format!("- objective: {}\n", d.objective);
    s += &format!(
        "- teachers run frozen, without autodiff; their softened outputs were {}\n",
        if d.teacher_outputs_cached {
            "computed once and reused every epoch (no augmentation, no feature pairs)"
        } else {
            "computed on every batch"
        }
    );
    s += "- every accuracy below is measured on the test split, on burn (f32)\n\n";
    s += "| model | architecture | seed | test top-1 | errors | loss |\n|---|---|---|---|---|---|\n";
    let row = |m: &ModelResult| {
        format!(
            "| {} | {} | {} | {:.4} | {} | {:.4} |\n",
            m.label,
            m.model,
            m.seed.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            m.top1,
            m.errors,
            m.loss
        )
    };
    for t in d.teachers.iter().chain(&d.ensemble) {
        s += &row(t);
    }
    for run in &d.runs {
        if let Some(alone) = &run.scratch {
            s += &row(alone);
        }
        s += &row(&run.distilled);
    }
    s += &format!(
        "\nStudent `{}`, {} seed(s): mean test errors distilled {:.1}",
        d.student,
        d.runs.len(),
        d.mean_errors_distilled
    );
    if let Some(alone) = d.mean_errors_scratch {
        s += &format!(", trained alone {alone:.1}");
    }
    if let Some(red) = d.error_reduction {
        s += &format!("; distillation removed **{:.1} %** of the errors", red * 100.0);
    }
    s += ".\n";
    if let Some(en) = &d.ensemble {
        s += &match d.ensemble_gain_kept {
            Some(kept) => format!(
                "The ensemble makes {} errors; the student keeps **{:.0} %** of its gain over the best single teacher.\n",
                en.errors,
                kept * 100.0
            ),
            None => {
                format!("The ensemble ({} errors) is not better than its best teacher: no gain to keep.\n", en.errors)
            }
        };
    }
    s
}

/// A stage that trained: its time and one row per epoch.
fn training(st: &StageReport) -> String {
    let mut s = format!("\n## Training, stage {}\n\n", st.index);
    if let Some(t) = st.train_seconds {
        s += &format!(
            "Training time: {t:.1} s{}\n\n",
            if st.cached_baseline.is_some() { " (when the cached baseline was trained)" } else { "" }
        );
    }
    s += "| epoch | train loss | train acc | val acc | lr | seconds |\n|---|---|---|---|---|---|\n";
    for h in &st.history {
        let val = h.validation.as_ref().map(|v| format!("{:.4}", v.top1)).unwrap_or_else(|| "-".into());
        s += &format!(
            "| {} | {:.4} | {:.4} | {} | {:.5} | {:.1} |\n",
            h.epoch, h.train_loss, h.train_accuracy, val, h.lr, h.seconds
        );
    }
    s
}

/// The last stage's per-class accuracy and layers.
fn last_stage(last: &StageReport) -> String {
    let mut s = String::new();
    if let Some(t) = &last.test {
        s += "\n## Per-class test accuracy (last stage)\n\n| class | accuracy |\n|---|---|\n";
        for (c, a) in t.per_class_accuracy.iter().enumerate() {
            s += &format!("| {c} | {a:.4} |\n");
        }
    }
    s += "\n## Layers (last stage)\n\n| layer | kind | params | non-zeros | MACs | output |\n|---|---|---|---|---|---|\n";
    for l in &last.layers {
        s += &format!("| {} | {} | {} | {} | {} | {:?} |\n", l.name, l.kind, l.params, l.nonzeros, l.macs, l.output);
    }
    s
}

/// `[export]`: the ONNX files, what they hold, and ONNX Runtime's check of them.
fn export(x: &crate::export::ExportReport, shrink_bytes: usize) -> String {
    let mut s = "\n## ONNX export\n\n| file | format | size |\n|---|---|---|\n".to_string();
    for f in &x.files {
        s += &format!("| `{}` | {} | {} |\n", f.file, f.format, mb(f.bytes));
    }
    if let [f32_file, int8_file] = &x.files[..] {
        s += &format!(
            "\nThe QDQ file is {:.3}× the f32 one (shrink's own int8 model file: {}).\n",
            int8_file.bytes as f64 / f32_file.bytes.max(1) as f64,
            mb(shrink_bytes)
        );
    }
    for note in &x.notes {
        s += &format!("\n- {note}");
    }
    if !x.notes.is_empty() {
        s += "\n";
    }
    if let Some(q) = &x.qdq
        && !q.float_layers.is_empty()
    {
        s += "\nLayers left in f32 (written in f32):\n";
        for (name, why) in &q.float_layers {
            s += &format!("- `{name}`: {why}\n");
        }
    }
    let Some(o) = &x.onnxruntime else { return s };
    s += &format!(
        "\n### Checked by ONNX Runtime {} ({} test images, CPU, full graph optimisation, one thread)\n\n",
        o.onnxruntime, o.images
    );
    s += "| | shrink | ONNX Runtime | agreement |\n|---|---|---|---|\n";
    if let Some(f) = &o.f32 {
        s += &format!(
            "| f32 top-1 | {:.3} (f32 plan) | {:.3} | largest difference {:.2e} of the largest logit |\n",
            f.top1_shrink, f.top1_onnxruntime, f.max_relative_difference
        );
    }
    if let Some(q) = &o.int8 {
        s += &format!(
            "| int8 top-1 | {:.3} (integer plan) | {:.3} | {:.2} % of logits within 2 output steps ({:.4}: a u8 grid over the logits' range), largest {:.2} steps |\n",
            q.top1_shrink,
            q.top1_onnxruntime,
            100.0 * q.within_2_steps,
            q.output_step,
            q.max_steps
        );
        let integer = q.layers.values().filter(|v| v.is_some()).count();
        s += &format!(
            "\nONNX Runtime runs {integer} of the {} quantized layers on integer kernels (its optimised graph: {}).\n",
            q.layers.len(),
            q.optimized_ops.iter().map(|(op, n)| format!("{op} ×{n}")).collect::<Vec<_>>().join(", ")
        );
        let float: Vec<&str> = q.layers.iter().filter(|(_, v)| v.is_none()).map(|(k, _)| k.as_str()).collect();
        if !float.is_empty() {
            s += &format!("In f32 there: {}.\n", float.join(", "));
        }
    }
    s
}
