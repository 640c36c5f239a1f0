//! One module per stage kind, each with one entry point `run(stage, cx, state, report)`: it
//! changes the run's state (the current model, the quantized model, …) and fills in what the
//! stage did in its report. The runner ([`crate::run`]) measures the model after every stage.

mod distill;
mod prune;
mod qat;
mod quantize;
mod train;

use std::path::Path;

use anyhow::Result;
use burn::tensor::Device;
use shrink_core::graph::Graph;
use shrink_quant::QuantizedModel;

use crate::data::Data;
use crate::plan::{Plan, StagePlan};
use crate::report::StageReport;
use crate::run::RunOptions;

/// What a stage reads: the plan, the options, the data, where it runs.
pub struct StageContext<'a> {
    pub plan: &'a Plan,
    pub opts: &'a RunOptions,
    pub data: &'a Data,
    pub device: &'a Device,
    /// The stage's position in the plan.
    pub index: usize,
    pub run_dir: &'a Path,
    /// The report of the stage before, if any (a prune stage compares against it).
    pub previous: Option<&'a StageReport>,
}

impl StageContext<'_> {
    /// The seed of this stage's data order: the experiment's, offset by the stage's position.
    pub fn stage_seed(&self) -> u64 {
        self.plan.seed.wrapping_add(self.index as u64)
    }
}

/// What the stages change as they go.
pub struct RunState {
    /// The current model.
    pub graph: Graph,
    /// Whether no stage has trained the model yet (the next train stage is the cached baseline).
    pub fresh: bool,
    /// The model as the last training stage left it: a distill stage's default teacher.
    pub uncompressed: Option<Graph>,
    /// The quantized model, once a quantize or qat stage ran.
    pub quantized: Option<QuantizedModel>,
}

/// A model trained from scratch that runs of the same data and settings share through the cache
/// ([`crate::cache::train_cached`]): a baseline, a distillation teacher, a student trained alone.
pub struct SharedTraining<'p> {
    pub model: shrink_core::zoo::ModelSpec,
    pub seed: u64,
    pub train: &'p shrink_core::train::TrainSettings,
    /// The stage's position (it offsets the seed of the data order).
    pub index: usize,
    pub label: String,
}

/// Every shared training `plan` does, in the order its stages do them: what a sweep's
/// preparation job trains before the trials start (`xtask prepare`).
pub fn shared_trainings(plan: &Plan) -> Vec<SharedTraining<'_>> {
    let mut out = Vec::new();
    let mut fresh = true;
    for (index, stage) in plan.stages.iter().enumerate() {
        match stage {
            StagePlan::Train(t) => {
                if fresh {
                    let (model, seed) = (plan.model.clone(), plan.seed);
                    out.push(SharedTraining { model, seed, train: &t.train, index, label: "baseline".into() });
                }
                fresh = false;
            }
            StagePlan::Distill(d) => {
                out.extend(distill::teacher_trainings(d, plan));
                if let (true, Some(spec)) = (d.compare_scratch, &d.student) {
                    for r in 0..d.seeds {
                        out.push(SharedTraining {
                            model: spec.clone(),
                            seed: plan.seed.wrapping_add(r as u64),
                            train: &d.train,
                            index,
                            label: "student alone".into(),
                        });
                    }
                }
                fresh = false;
            }
            _ => {}
        }
    }
    out
}

/// Runs `stage` on `state`, recording what it did in `report`.
///
/// # Errors
/// Whatever the stage's library call returns, with the stage named.
pub fn run(stage: &StagePlan, cx: &StageContext<'_>, state: &mut RunState, report: &mut StageReport) -> Result<()> {
    match stage {
        StagePlan::Train(s) => train::run(s, cx, state, report),
        StagePlan::Distill(s) => distill::run(s, cx, state, report),
        StagePlan::Prune(s) => prune::run(s, cx, state, report),
        StagePlan::Quantize(s) => quantize::run(s, cx, state, report),
        StagePlan::Qat(s) => qat::run(s, cx, state, report),
        // Evaluation is the measurement every stage ends with.
        StagePlan::Evaluate(_) => Ok(()),
    }
}
