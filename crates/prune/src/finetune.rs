//! Pruning with fine-tuning, on core's training loop: masks for weights and N:M (updated on the
//! schedule while training), physical channel removal in rounds for structured pruning.

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};
use shrink_core::Graph;
use shrink_core::data::shuffled;
use shrink_core::train::{
    Batch, EpochRecord, LossAndLogits, TrainData, TrainObserver, TrainSettings, Trainable, cross_entropy, train,
    train_module,
};

use crate::importance::{TaylorStats, taylor_stats, weight_scores};
use crate::masks::{MaskHooks, Masks, weight_masks};
use crate::structured::{GroupPlan, plan_channels, remove_channels};
use crate::{Criterion, Error, Granularity, PruneSchedule, PruneSettings};

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
    /// The pruning steps, in order.
    pub events: Vec<PruneEvent>,
    /// Fine-tuning epochs (all rounds together).
    pub history: Vec<EpochRecord>,
}

/// The graph in training with its current masks: evaluation sees the masked weights.
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

/// Batches of training images (no augmentation) for the Taylor criterion, on `device`.
fn taylor_batches(
    data: &TrainData<'_>,
    count: usize,
    batch: usize,
    seed: u64,
    device: &Device,
) -> Vec<(Tensor<4>, Tensor<1, Int>)> {
    let order = shuffled(data.train.len(), seed ^ 0x007A_710E);
    order.chunks(batch).take(count).map(|c| data.batcher.batch(data.train, c, device, None)).collect()
}

/// Prunes `graph` as `settings` say, on `schedule`, fine-tuning with `train_settings` on
/// `data` (none: prune once, without fine-tuning). Returns the pruned graph on `device`.
///
/// - Weights and N:M: masks are held beside the graph and multiplied into the weights in the
///   forward pass, so a pruned weight has no effect and gets no gradient; they are recomputed at
///   each of the schedule's events (one-shot: before the first step; iterative: at the start of
///   each round; AGP: on the cubic) from the current weights and stay removed once removed; at the
///   end they are multiplied in.
/// - Channels: each round (one for one-shot) ranks the channels, removes them physically through
///   the coupling groups, then fine-tunes its share of the epochs (the learning-rate schedule
///   restarts each round, the optimiser state too, since the tensors changed shape).
///
/// # Errors
/// [`Error::Setting`] for bad settings; [`Error::Core`] from training (e.g. a NaN loss).
#[allow(clippy::too_many_arguments)]
pub fn prune(
    graph: &Graph,
    data: TrainData<'_>,
    train_settings: Option<&TrainSettings>,
    settings: &PruneSettings,
    schedule: &PruneSchedule,
    device: &Device,
    seed: u64,
    observer: &mut dyn TrainObserver,
) -> Result<PruneOutcome, Error> {
    settings.validate()?;
    let epochs = train_settings.map_or(0, |t| t.epochs);
    schedule.validate(epochs, settings.granularity)?;
    match settings.granularity {
        Granularity::Channels => {
            prune_channels(graph, data, train_settings, settings, schedule, device, seed, observer)
        }
        Granularity::Weights | Granularity::NOfM { .. } => {
            prune_weights(graph, data, train_settings, settings, schedule, device, seed, observer)
        }
    }
}

/// Masks for `graph` at `sparsity`, from the criterion's scores.
fn masks_at(
    graph: &Graph,
    data: &TrainData<'_>,
    settings: &PruneSettings,
    sparsity: f64,
    previous: Option<&Masks>,
    device: &Device,
    seed: u64,
) -> Result<Masks, Error> {
    let layers: Vec<usize> = crate::masks::weight_units(graph, settings)?.into_iter().map(|(id, _)| id).collect();
    let taylor = taylor_if_needed(graph, data, settings, previous, device, seed)?;
    let scores = weight_scores(graph, &layers, settings.criterion, taylor.as_ref(), settings.seed)?;
    weight_masks(graph, settings, sparsity, &scores, previous)
}

fn taylor_if_needed(
    graph: &Graph,
    data: &TrainData<'_>,
    settings: &PruneSettings,
    masks: Option<&Masks>,
    device: &Device,
    seed: u64,
) -> Result<Option<TaylorStats>, Error> {
    if settings.criterion != Criterion::Taylor {
        return Ok(None);
    }
    let ad = device.clone().autodiff();
    let batches = taylor_batches(data, settings.taylor_batches, 64, seed, &ad);
    let mut hooks = masks.map(|m| m.hooks(&ad)).unwrap_or_default();
    Ok(Some(taylor_stats(graph, &mut batches.into_iter(), &ad, &mut hooks)?))
}

#[allow(clippy::too_many_arguments)]
fn prune_weights(
    graph: &Graph,
    data: TrainData<'_>,
    train_settings: Option<&TrainSettings>,
    settings: &PruneSettings,
    schedule: &PruneSchedule,
    device: &Device,
    seed: u64,
    observer: &mut dyn TrainObserver,
) -> Result<PruneOutcome, Error> {
    let target = settings.final_sparsity();
    let Some(ts) = train_settings else {
        let masks = masks_at(graph, &data, settings, target, None, device, seed)?;
        tracing::info!(sparsity = masks.sparsity(), "pruned without fine-tuning");
        return Ok(PruneOutcome {
            graph: masks.apply(graph),
            masks: Some(masks),
            rounds: Vec::new(),
            events: vec![PruneEvent { epoch: 0.0, sparsity: target }],
            history: Vec::new(),
        });
    };
    let steps = data.train.len().div_ceil(ts.batch_size);
    let events = schedule.events(ts.epochs, steps, target);
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
            match masks_at(&current, &data, settings, events[next].1, Some(&previous), device, seed + next as u64) {
                Ok(masks) => {
                    tracing::info!(step, sparsity = masks.sparsity(), "pruning step");
                    hooks = masks.hooks(&ad);
                    *shared.lock().expect("masks lock") = masks;
                    done.push(PruneEvent { epoch: step as f64 / steps as f64, sparsity: events[next].1 });
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
    for (i, &(_, s)) in events.iter().enumerate().skip(next) {
        masks = masks_at(&trained.graph, &data, settings, s, Some(&masks), device, seed + i as u64)?;
        done.push(PruneEvent { epoch: ts.epochs as f64, sparsity: s });
    }
    Ok(PruneOutcome {
        graph: masks.apply(&trained.graph),
        masks: Some(masks),
        rounds: Vec::new(),
        events: done,
        history,
    })
}

#[allow(clippy::too_many_arguments)]
fn prune_channels(
    graph: &Graph,
    data: TrainData<'_>,
    train_settings: Option<&TrainSettings>,
    settings: &PruneSettings,
    schedule: &PruneSchedule,
    device: &Device,
    seed: u64,
    observer: &mut dyn TrainObserver,
) -> Result<PruneOutcome, Error> {
    let target = settings.final_sparsity();
    let epochs = train_settings.map_or(0, |t| t.epochs);
    let sparsities: Vec<f64> = match (schedule, train_settings) {
        (PruneSchedule::Iterative { rounds }, Some(_)) => {
            (1..=*rounds).map(|k| 1.0 - (1.0 - target).powf(k as f64 / *rounds as f64)).collect()
        }
        _ => vec![target],
    };
    let original: Vec<usize> = graph.coupling_groups()?.iter().map(|g| g.channels).collect();
    let mut current = graph.clone();
    let mut rounds = Vec::new();
    let mut events = Vec::new();
    let mut history: Vec<EpochRecord> = Vec::new();
    let mut epoch_offset = 0usize;
    for (k, &s) in sparsities.iter().enumerate() {
        let groups = current.coupling_groups()?;
        let taylor = taylor_if_needed(&current, &data, settings, None, device, seed + k as u64)?;
        let plans = plan_channels(&current, &groups, settings, s, &original, taylor.as_ref())?;
        current = remove_channels(&current, &groups, &plans)?;
        let removed: usize = plans.iter().map(|p| p.channels - p.keep.len()).sum();
        tracing::info!(round = k + 1, sparsity = s, removed, "channels removed");
        events.push(PruneEvent { epoch: epoch_offset as f64, sparsity: s });
        rounds.push(plans);
        if let Some(ts) = train_settings {
            // Round k fine-tunes its share of the epochs; the last round takes the remainder.
            let share = if k + 1 == sparsities.len() { epochs - epoch_offset } else { epochs / sparsities.len() };
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
    Ok(PruneOutcome { graph: current, masks: None, rounds, events, history })
}
