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
