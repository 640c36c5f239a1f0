//! The distill stage: teachers (the uncompressed model, or cached baselines of their own),
//! their ensemble, and for each seed a student distilled from them and, for comparison, the same
//! student trained alone.

use std::time::Instant;

use anyhow::{Context, Result};
use shrink_core::graph::Graph;
use shrink_core::train::{EpochRecord, Evaluation, evaluate, evaluate_with};
use shrink_core::zoo::ModelSpec;
use shrink_distill::{Teacher, distill, ensemble_log_probs};

use super::{RunState, StageContext};
use crate::plan::{DistillStage, Plan, StagePlan};
use crate::progress::Progress;
use crate::report::{DistillSummary, ModelResult, StageReport, StudentRun};

pub fn run(stage: &DistillStage, cx: &StageContext<'_>, state: &mut RunState, report: &mut StageReport) -> Result<()> {
    let (teachers, teacher_results) = teachers(stage, cx, state)?;
    let ensemble = ensemble(cx, &teachers)?;
    let t0 = Instant::now();
    let students = students(stage, cx, &state.graph, &teachers)?;
    let name = stage.student.as_ref().map_or_else(|| "the current model".into(), |s| s.name());
    report.distillation = Some(DistillSummary::new(
        &stage.distill,
        teacher_results,
        ensemble,
        name,
        students.runs,
        students.teacher_outputs_cached,
        students.adapters,
    ));
    state.graph = students.first;
    if stage.student.is_some() {
        state.uncompressed = Some(state.graph.clone());
    }
    state.fresh = false;
    report.history = students.history;
    report.train_seconds = Some(t0.elapsed().as_secs_f64());
    Ok(())
}

fn model_result(label: String, model: &ModelSpec, seed: Option<u64>, eval: &Evaluation) -> ModelResult {
    ModelResult { label, model: model.name(), seed, top1: eval.top1, errors: eval.errors(), loss: eval.loss }
}

fn test(cx: &StageContext<'_>, graph: &Graph) -> Result<Evaluation> {
    Ok(evaluate(graph, &cx.data.test, &cx.data.batcher, 250, cx.device)?)
}

/// The teachers and their test results: the uncompressed model, or each teacher spec trained
/// (or reused from the cache) with the settings of the first train stage.
fn teachers(stage: &DistillStage, cx: &StageContext<'_>, state: &RunState) -> Result<(Vec<Teacher>, Vec<ModelResult>)> {
    let plan = cx.plan;
    let (mut teachers, mut results) = (Vec::new(), Vec::new());
    if stage.teachers.is_empty() {
        let graph = state.uncompressed.clone().context("a distill stage needs a trained teacher")?;
        let r = test(cx, &graph)?;
        results.push(model_result("teacher (the uncompressed model)".into(), &plan.model, None, &r));
        teachers.push(Teacher { graph, weight: 1.0 });
        return Ok((teachers, results));
    }
    for (j, t) in teacher_trainings(stage, plan).into_iter().enumerate() {
        let trained = crate::cache::train_cached(cx, &t.model, t.seed, t.train, t.index, &t.label)?;
        let (spec, seed, label) = (t.model, t.seed, t.label);
        let r = test(cx, &trained.graph)?;
        tracing::info!(teacher = j, model = %spec.name(), seed, top1 = r.top1, reused = trained.reused, "teacher ready");
        let mut result = model_result(label, &spec, Some(seed), &r);
        if trained.reused {
            result.label += &format!(" (cached {})", trained.key);
        }
        results.push(result);
        teachers.push(Teacher { graph: trained.graph, weight: stage.teachers[j].weight });
    }
    Ok((teachers, results))
}

/// The trainings of a distill stage's own teachers: each teacher spec trained from scratch
/// with the settings of the plan's first train stage, cached like a baseline.
pub(crate) fn teacher_trainings<'p>(stage: &DistillStage, plan: &'p Plan) -> Vec<super::SharedTraining<'p>> {
    let (first_train, settings) = plan
        .stages
        .iter()
        .enumerate()
        .find_map(|(i, s)| match s {
            StagePlan::Train(t) => Some((i, &t.train)),
            _ => None,
        })
        .expect("validated: a train stage comes before a distill stage");
    stage
        .teachers
        .iter()
        .enumerate()
        .map(|(j, t)| super::SharedTraining {
            model: t.model.clone().unwrap_or_else(|| plan.model.clone()),
            seed: t.seed.unwrap_or(plan.seed),
            train: settings,
            index: first_train,
            label: format!("teacher {j}"),
        })
        .collect()
}

/// With several teachers: their ensemble's test result (the mean of their probabilities).
fn ensemble(cx: &StageContext<'_>, teachers: &[Teacher]) -> Result<Option<ModelResult>> {
    if teachers.len() < 2 {
        return Ok(None);
    }
    let (data, classes) = (cx.data, teachers[0].graph.num_outputs());
    let r = evaluate_with(&data.test, &data.batcher, 250, classes, cx.device, &mut |x| {
        Ok(ensemble_log_probs(teachers, x))
    })?;
    Ok(Some(ModelResult {
        label: format!("ensemble of {} (mean of probabilities)", teachers.len()),
        model: String::new(),
        seed: None,
        top1: r.top1,
        errors: r.errors(),
        loss: r.loss,
    }))
}

/// What the students of a distill stage gave.
struct Students {
    runs: Vec<StudentRun>,
    /// The first seed's distilled student: the stage's model.
    first: Graph,
    history: Vec<EpochRecord>,
    teacher_outputs_cached: bool,
    adapters: Vec<shrink_distill::AdapterInfo>,
}

/// Distils one student per seed (and trains it alone, for comparison, when asked).
fn students(stage: &DistillStage, cx: &StageContext<'_>, current: &Graph, teachers: &[Teacher]) -> Result<Students> {
    let (plan, data, device, index) = (cx.plan, cx.data, cx.device, cx.index);
    let mut runs = Vec::new();
    let mut first: Option<(Graph, Vec<EpochRecord>)> = None;
    let (mut cached_outputs, mut adapters) = (false, Vec::new());
    for r in 0..stage.seeds {
        let seed = plan.seed.wrapping_add(r as u64);
        let initial = match &stage.student {
            Some(spec) => spec.build(data.train.shape, data.train.classes, seed, device)?,
            None => current.clone(),
        };
        let mut progress = Progress::new(cx.opts.progress, stage.train.epochs, &format!("distill (seed {seed})"));
        let train_seed = seed.wrapping_add(index as u64);
        let out = distill(
            initial,
            teachers,
            data.train_data(),
            &stage.train,
            &stage.distill,
            device,
            train_seed,
            &mut progress,
        )
        .with_context(|| format!("stage {index} (distill), student seed {seed}"))?;
        progress.finish();
        cached_outputs = out.teacher_outputs_cached;
        adapters = out.adapters;
        let name = stage.student.as_ref().map_or_else(|| "current model".into(), |s| s.name());
        let distilled = test(cx, &out.student)?;
        tracing::info!(seed, top1 = distilled.top1, errors = distilled.errors(), "distilled student");
        let mut run = StudentRun {
            seed,
            distilled: ModelResult {
                label: "distilled".into(),
                model: name,
                seed: Some(seed),
                top1: distilled.top1,
                errors: distilled.errors(),
                loss: distilled.loss,
            },
            scratch: None,
        };
        if let (true, Some(spec)) = (stage.compare_scratch, &stage.student) {
            let alone = crate::cache::train_cached(cx, spec, seed, &stage.train, index, "student alone")?;
            let a = test(cx, &alone.graph)?;
            tracing::info!(seed, top1 = a.top1, errors = a.errors(), "student trained alone");
            run.scratch = Some(model_result("trained alone".into(), spec, Some(seed), &a));
        }
        runs.push(run);
        if first.is_none() {
            first = Some((out.student, out.history));
        }
    }
    let (first, history) = first.expect("validated: at least one seed");
    Ok(Students { runs, first, history, teacher_outputs_cached: cached_outputs, adapters })
}
