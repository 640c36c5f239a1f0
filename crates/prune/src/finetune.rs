//! Pruning with fine-tuning, on core's training loop: masks for weights and N:M (updated on the
//! schedule while training), physical channel removal in rounds for structured pruning.

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::tensor::Device;
use serde::{Deserialize, Serialize};
use shrink_core::Graph;
use shrink_core::train::{
    Batch, EpochRecord, LossAndLogits, TrainData, TrainObserver, TrainRun, TrainSettings, Trainable, cross_entropy,
    train, train_module,
};

use crate::importance::weight_scores;
use crate::masks::{MaskHooks, Masks, taylor_if_needed, weight_masks};
use crate::structured::{GroupPlan, plan_channels, remove_channels};
use crate::{Error, Granularity, PruneSchedule, PruneSettings};

/// One pruning step of a schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneEvent {
    /// When, in epochs of the fine-tuning (0: before it).
    pub epoch: f64,
    /// The sparsity reached (of weights, or of channels).
    pub sparsity: f64,
}

/// What [`prune`] produced.
#[derive(Debug)]
pub struct PruneOutcome {
    /// The pruned (and fine-tuned) graph: masked weights are zero; removed channels are gone.
    pub graph: Graph,
    /// The final masks (weights and N:M).
    pub masks: Option<Masks>,
    /// The channels each round kept (structured).
    pub rounds: Vec<Vec<GroupPlan>>,
    /// Lottery tickets: each round's sparsity and the record of its last retraining epoch.
    pub tickets: Vec<(f64, Option<EpochRecord>)>,
    /// The pruning steps, in order.
    pub events: Vec<PruneEvent>,
    /// Fine-tuning epochs (all rounds together).
    pub history: Vec<EpochRecord>,
}

/// The graph in training with its current masks: evaluation sees the masked weights. The masks
/// are shared because the objective, which sees the model only by reference, replaces them at
/// the schedule's events.
#[derive(Module, Debug)]
struct Masked {
    graph: Graph,
    #[module(skip)]
    masks: Arc<Mutex<Masks>>,
}

impl Trainable for Masked {
    fn graph(&self) -> &Graph {
        &self.graph
    }
    fn evaluation_graph(&self) -> Graph {
        // On the inner device: a masked weight is no leaf of the autodiff graph.
        self.masks.lock().expect("masks lock").apply(&self.graph.valid())
    }
}

/// How [`prune`] runs: when it prunes, the fine-tuning, and the weights lottery tickets rewind
/// to.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions<'a> {
    /// When pruning happens: one shot, iterative rounds, AGP's cubic, lottery tickets.
    pub schedule: PruneSchedule,
    /// Fine-tuning (`None`: prune once, without training).
    pub fine_tune: Option<TrainSettings>,
    /// Lottery tickets: the weights the model was trained from, rewound to in every round.
    pub rewind_to: Option<&'a Graph>,
}

/// What every step of one [`prune`] call reads.
struct Job<'a> {
    data: TrainData<'a>,
    settings: &'a PruneSettings,
    schedule: &'a PruneSchedule,
    fine_tune: Option<&'a TrainSettings>,
    device: &'a Device,
    /// Seed of the fine-tuning's data order (and, offset per event, of the Taylor batches).
    seed: u64,
}

/// Prunes `graph` as `settings` say, on `options.schedule`, fine-tuning with
/// `options.fine_tune` on `data` (none: prune once, without fine-tuning), on `run`'s device,
/// data order and observer. Returns the pruned graph on that device.
///
/// - Weights and N:M: masks are held beside the graph and multiplied into the weights in the
///   forward pass, so a pruned weight has no effect and gets no gradient; they are recomputed at
///   each of the schedule's events (one-shot: before the first step; iterative: at the start of
///   each round; AGP: on the cubic) from the current weights and stay removed once removed; at the
///   end they are multiplied in.
/// - Lottery tickets: each round prunes the trained weights, rewinds every parameter to
///   `options.rewind_to`, and retrains for the fine-tuning's epochs under the mask.
/// - Channels: each round (one for one-shot) ranks the channels, removes them physically through
///   the coupling groups, then fine-tunes its share of the epochs (the learning-rate schedule
///   restarts each round, the optimiser state too, since the tensors changed shape).
///
/// # Errors
/// [`Error::Setting`] for bad settings; [`Error::Core`] from training (e.g. a NaN loss).
pub fn prune(
    graph: &Graph,
    settings: &PruneSettings,
    options: &PruneOptions<'_>,
    data: TrainData<'_>,
    run: TrainRun<'_>,
) -> Result<PruneOutcome, Error> {
    settings.validate()?;
    let epochs = options.fine_tune.as_ref().map_or(0, |t| t.epochs);
    options.schedule.validate(epochs, settings.granularity)?;
    let job = Job {
        data,
        settings,
        schedule: &options.schedule,
        fine_tune: options.fine_tune.as_ref(),
        device: run.device,
        seed: run.seed,
    };
    if let (PruneSchedule::Lottery { rounds }, Some(ts)) = (&options.schedule, &options.fine_tune) {
        let initial = options.rewind_to.ok_or_else(|| {
            Error::setting("prune_schedule", "lottery tickets rewind to the initial weights, and none were given")
        })?;
        return lottery(graph, initial, &job, ts, *rounds, run.observer);
    }
    match settings.granularity {
        Granularity::Channels => prune_channels(graph, &job, run.observer),
        Granularity::Weights | Granularity::NOfM { .. } => prune_weights(graph, &job, run.observer),
    }
}

/// Masks for `graph` at position `t` of `schedule`, from the criterion's scores (Taylor batches
/// drawn with `seed`).
fn masks_at(
    graph: &Graph,
    job: &Job<'_>,
    schedule: &PruneSchedule,
    t: f64,
    previous: Option<&Masks>,
    seed: u64,
) -> Result<Masks, Error> {
    let settings = job.settings;
    let layers: Vec<usize> = crate::masks::weight_units(graph, settings)?.into_iter().map(|(id, _)| id).collect();
    let taylor = taylor_if_needed(graph, &job.data, settings, previous, job.device, seed)?;
    let scores = weight_scores(graph, &layers, settings.criterion, taylor.as_ref(), settings.seed)?;
    weight_masks(graph, settings, &|s| schedule.sparsity_at(t, s), &scores, previous)
}

fn prune_weights(graph: &Graph, job: &Job<'_>, observer: &mut dyn TrainObserver) -> Result<PruneOutcome, Error> {
    let (data, schedule, device, seed) = (job.data, job.schedule, job.device, job.seed);
    let Some(ts) = job.fine_tune else {
        let masks = masks_at(graph, job, &PruneSchedule::OneShot, 1.0, None, seed)?;
        let sparsity_reached = masks.sparsity();
        tracing::info!(sparsity = sparsity_reached, "pruned without fine-tuning");
        return Ok(PruneOutcome {
            graph: masks.apply(graph),
            masks: Some(masks),
            rounds: Vec::new(),
            tickets: Vec::new(),
            events: vec![PruneEvent { epoch: 0.0, sparsity: sparsity_reached }],
            history: Vec::new(),
        });
    };
    let steps = data.train.len().div_ceil(ts.batch_size);
    let events = schedule.events(ts.epochs, steps);
    let ad = device.clone().autodiff();
    let shared = Arc::new(Mutex::new(Masks::default()));
    let model = Masked { graph: graph.clone(), masks: shared.clone() };
    let mut hooks = MaskHooks::default();
    let mut next = 0usize;
    let mut step = 0usize;
    let mut failure: Option<Error> = None;
    let mut done: Vec<PruneEvent> = Vec::new();
    let mut objective = |m: &Masked, batch: Batch<'_>| -> shrink_core::Result<LossAndLogits> {
        while next < events.len() && events[next].0 <= step {
            let current = m.graph.valid();
            let previous = shared.lock().expect("masks lock").clone();
            let t = events[next].1;
            match masks_at(&current, job, schedule, t, Some(&previous), seed + next as u64) {
                Ok(masks) => {
                    tracing::info!(step, sparsity = masks.sparsity(), "pruning step");
                    hooks = masks.hooks(&ad);
                    done.push(PruneEvent { epoch: step as f64 / steps as f64, sparsity: masks.sparsity() });
                    *shared.lock().expect("masks lock") = masks;
                }
                Err(e) => {
                    let message = e.to_string();
                    failure = Some(e);
                    return Err(shrink_core::Error::RunFailed(message));
                }
            }
            next += 1;
        }
        step += 1;
        let logits = m.graph.forward_with_hooks(batch.images, &[], &mut hooks).0;
        Ok((cross_entropy(logits.clone(), batch.labels), logits))
    };
    let result = train_module(model, data, ts, device, seed, observer, &mut objective);
    if let Some(e) = failure {
        return Err(e);
    }
    let (trained, history) = result?;
    let mut masks = shared.lock().expect("masks lock").clone();
    // Events at the very end of the schedule (AGP ending on the last epoch) apply to the result.
    for (i, &(_, t)) in events.iter().enumerate().skip(next) {
        masks = masks_at(&trained.graph, job, schedule, t, Some(&masks), seed + i as u64)?;
        done.push(PruneEvent { epoch: ts.epochs as f64, sparsity: masks.sparsity() });
    }
    Ok(PruneOutcome {
        graph: masks.apply(&trained.graph),
        masks: Some(masks),
        rounds: Vec::new(),
        tickets: Vec::new(),
        events: done,
        history,
    })
}

fn prune_channels(graph: &Graph, job: &Job<'_>, observer: &mut dyn TrainObserver) -> Result<PruneOutcome, Error> {
    let (data, settings, schedule, train_settings) = (job.data, job.settings, job.schedule, job.fine_tune);
    let (device, seed) = (job.device, job.seed);
    let epochs = train_settings.map_or(0, |t| t.epochs);
    // Positions of the schedule: one round, or one per iterative round.
    let positions: Vec<f64> = match (schedule, train_settings) {
        (PruneSchedule::Iterative { rounds }, Some(_)) => (1..=*rounds).map(|k| k as f64 / *rounds as f64).collect(),
        _ => vec![1.0],
    };
    let total: usize = graph.coupling_groups()?.iter().filter(|g| g.prunable).map(|g| g.channels).sum();
    let original: Vec<usize> = graph.coupling_groups()?.iter().map(|g| g.channels).collect();
    let mut current = graph.clone();
    let mut rounds = Vec::new();
    let mut events = Vec::new();
    let mut history: Vec<EpochRecord> = Vec::new();
    let mut epoch_offset = 0usize;
    for (k, &t) in positions.iter().enumerate() {
        let groups = current.coupling_groups()?;
        let taylor = taylor_if_needed(&current, &data, settings, None, device, seed + k as u64)?;
        let now = |s: f64| schedule.sparsity_at(t, s);
        let plans = plan_channels(&current, &groups, settings, &now, &original, taylor.as_ref())?;
        current = remove_channels(&current, &groups, &plans)?;
        let left: usize = current.coupling_groups()?.iter().filter(|g| g.prunable).map(|g| g.channels).sum();
        let sparsity = 1.0 - left as f64 / total.max(1) as f64;
        tracing::info!(round = k + 1, sparsity, "channels removed");
        events.push(PruneEvent { epoch: epoch_offset as f64, sparsity });
        rounds.push(plans);
        if let Some(ts) = train_settings {
            // Round k fine-tunes its share of the epochs; the last round takes the remainder.
            let share = if k + 1 == positions.len() { epochs - epoch_offset } else { epochs / positions.len() };
            if share > 0 {
                let round_settings = TrainSettings { epochs: share, ..ts.clone() };
                let (trained, mut h) =
                    train(current, data, &round_settings, device, seed.wrapping_add(k as u64), observer)?;
                h.iter_mut().for_each(|r| r.epoch += epoch_offset);
                history.extend(h);
                current = trained;
                epoch_offset += share;
            }
        }
    }
    Ok(PruneOutcome { graph: current, masks: None, rounds, tickets: Vec::new(), events, history })
}

/// Lottery tickets: prune the trained weights, rewind to `initial`, retrain under the mask; repeat.
fn lottery(
    graph: &Graph,
    initial: &Graph,
    job: &Job<'_>,
    ts: &TrainSettings,
    rounds: usize,
    observer: &mut dyn TrainObserver,
) -> Result<PruneOutcome, Error> {
    let (data, device, seed) = (job.data, job.device, job.seed);
    if initial.shapes()? != graph.shapes()? {
        return Err(Error::setting("prune_schedule", "the initial weights do not have the trained model's shapes"));
    }
    let schedule = PruneSchedule::Lottery { rounds };
    let ad = device.clone().autodiff();
    let mut trained = graph.clone();
    let mut masks: Option<Masks> = None;
    let (mut events, mut tickets, mut history) = (Vec::new(), Vec::new(), Vec::new());
    for k in 1..=rounds {
        let t = k as f64 / rounds as f64;
        let m = masks_at(&trained, job, &schedule, t, masks.as_ref(), seed + k as u64)?;
        let s = m.sparsity();
        tracing::info!(round = k, sparsity = s, "lottery ticket: pruned, rewinding to the initial weights");
        events.push(PruneEvent { epoch: ((k - 1) * ts.epochs) as f64, sparsity: s });
        let model = Masked { graph: initial.clone(), masks: Arc::new(Mutex::new(m.clone())) };
        let mut hooks = m.hooks(&ad);
        let mut objective = |model: &Masked, batch: Batch<'_>| -> shrink_core::Result<LossAndLogits> {
            let logits = model.graph.forward_with_hooks(batch.images, &[], &mut hooks).0;
            Ok((cross_entropy(logits.clone(), batch.labels), logits))
        };
        let (t, mut h) = train_module(model, data, ts, device, seed.wrapping_add(k as u64), observer, &mut objective)?;
        let offset = (k - 1) * ts.epochs;
        h.iter_mut().for_each(|r| r.epoch += offset);
        tickets.push((s, h.last().cloned()));
        history.extend(h);
        trained = t.graph;
        masks = Some(m);
    }
    let masks = masks.expect("at least one round");
    Ok(PruneOutcome { graph: masks.apply(&trained), masks: Some(masks), rounds: Vec::new(), tickets, events, history })
}
