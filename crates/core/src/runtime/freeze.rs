//! [`freeze_with`]: a graph becomes a plan — one kernel per step of [`fusion::fuse`], and
//! buffers planned by liveness.

use burn::module::Module;

use super::fusion::{self, Fused};
use super::{
    FreezeOptions, Kernel, KernelRegistry, LayerLink, LayerView, MAX_INPUTS, Plan, PoolKind, Simple, Step, Team, Unary,
    Workspace, thread_pool,
};
use crate::graph::{BatchNormFold, Graph, NodeId, Op, Params, PoolWindow, ValueShape};
use crate::host::floats;
use crate::{Error, Result};

/// Freezes `graph` with the default f32 kernels on one thread.
///
/// # Errors
/// As [`freeze_with`].
pub fn freeze(graph: &Graph) -> Result<Plan> {
    freeze_with(graph, &KernelRegistry::default(), &FreezeOptions::default())
}

/// Freezes `graph` into a plan, choosing each layer's kernel from `registry`.
///
/// # Errors
/// [`Error::InvalidGraph`] if the graph does not validate or has a node the plan cannot run;
/// [`Error::TensorRead`] if a parameter cannot be read; [`Error::RunFailed`] if the thread pool
/// cannot start.
pub fn freeze_with(graph: &Graph, registry: &KernelRegistry, options: &FreezeOptions) -> Result<Plan> {
    graph.validate()?;
    let graph = graph.clone().valid();
    let shapes = graph.shapes()?;
    let fused = fusion::fuse(&graph, registry.fuses_epilogues());
    let pairs = fusion::layer_pairs(&graph, &fused);
    // Layer step `i` as its neighbour sees it, sharing the value `producer` computes.
    let link = |i: usize, producer: usize| -> LayerLink<'_> {
        let node = &graph.nodes[fused[i].node];
        LayerLink {
            name: &node.name,
            op: &node.op,
            input: shapes[node.inputs[0]],
            output: shapes[fused[i].node],
            value: shapes[fused[producer].tail()],
            activation: fused[i].activation,
        }
    };
    // Values: 0 is the input; each step computes one; aliases share their input's.
    let mut value_of: Vec<Option<usize>> = vec![None; graph.nodes.len()];
    let mut value_len: Vec<usize> = vec![shapes[0].numel()];
    value_of[0] = Some(0);
    let mut next_step = fused.iter().enumerate().peekable();
    let mut steps: Vec<Step> = Vec::new();
    for (id, node) in graph.nodes.iter().enumerate().skip(1) {
        if fusion::is_alias(&node.op) {
            value_of[id] = value_of[node.inputs[0]];
            continue;
        }
        let Some((i, step)) = next_step.next_if(|(_, s)| s.node == id) else { continue };
        let mut inputs: Vec<usize> = node.inputs.iter().map(|&i| value_of[i].expect("topological order")).collect();
        if let Some((_, other)) = step.residual {
            inputs.push(value_of[other].expect("computed by an earlier step"));
        }
        if inputs.len() > MAX_INPUTS {
            return Err(Error::graph(&node.name, format!("the CPU plan takes at most {MAX_INPUTS} inputs per node")));
        }
        let neighbours = Neighbours {
            read_by: pairs.iter().find(|p| p.0 == i).map(|p| link(p.1, i)),
            reads_from: pairs.iter().find(|p| p.1 == i).map(|p| link(p.0, p.0)),
        };
        let kernel = build_kernel(&graph, step, &shapes, registry, neighbours)?;
        let value = value_len.len();
        value_len.push(shapes[step.tail()].numel().max(kernel.output_len_per_image().unwrap_or(0)));
        for v in std::iter::once(id).chain(step.absorbed.iter().copied()) {
            value_of[v] = Some(value);
        }
        let macs = crate::metrics::layer_macs(&node.op, shapes[step.node]);
        steps.push(Step { node: node.name.clone(), kernel, inputs, output: value, macs });
    }
    let output_value = value_of[graph.output].expect("output computed");
    let (slot_of, slot_len) = plan_buffers(&steps, &value_len, output_value);
    let [c, h, w] = graph.input_shape();
    let threads = options.threads.max(1);
    Ok(Plan {
        steps,
        value_len,
        slot_of,
        main: Workspace::new(slot_len.len()),
        workers: (0..threads).map(|_| Workspace::new(slot_len.len())).collect(),
        slot_len,
        input_shape: [c, h, w],
        output_value,
        output: super::Aligned::new(64),
        outer: if threads > 1 { Some(thread_pool(threads)?) } else { None },
        team: Team::new(threads).map_err(|e| Error::RunFailed(format!("cannot start {threads} threads: {e}")))?,
        single: (0..threads).map(|_| thread_pool(1)).collect::<Result<_>>()?,
    })
}

/// The layers a layer step is paired with (see [`LayerView::read_by`]).
struct Neighbours<'a> {
    read_by: Option<LayerLink<'a>>,
    reads_from: Option<LayerLink<'a>>,
}

/// The kernel of one step: conv and linear layers from the registry (with their batch norm
/// folded in), the rest from [`Simple`].
fn build_kernel(
    graph: &Graph,
    step: &Fused,
    shapes: &[ValueShape],
    registry: &KernelRegistry,
    neighbours: Neighbours<'_>,
) -> Result<Box<dyn Kernel>> {
    let node = &graph.nodes[step.node];
    let batch_norm = |id: NodeId| -> Result<BatchNormFold> {
        let (Op::BatchNorm2d { epsilon, .. }, Some(Params::BatchNorm(bn))) =
            (&graph.nodes[id].op, &graph.nodes[id].params)
        else {
            unreachable!("validated: a batch norm has its parameters")
        };
        BatchNormFold::of(bn, *epsilon)
    };
    let layer = |weight: &[f32], weight_shape: &[usize], bias: Option<&[f32]>| {
        registry.build(&LayerView {
            name: &node.name,
            op: &node.op,
            weight,
            weight_shape,
            bias,
            input: shapes[node.inputs[0]],
            output: shapes[step.node],
            relu: step.relu,
            activation: step.activation,
            residual: step.residual.is_some(),
            read_by: neighbours.read_by,
            reads_from: neighbours.reads_from,
        })
    };
    Ok(match (&node.op, &node.params) {
        (Op::Conv2d { .. }, Some(Params::Conv(p))) => {
            let mut weight = floats(p.weight.val())?;
            let mut bias = p.bias.as_ref().map(|b| floats(b.val())).transpose()?;
            if let Some(bn) = step.batch_norm {
                bias = Some(batch_norm(bn)?.fold_into(&mut weight, bias.as_deref()));
            }
            layer(&weight, &p.weight.dims(), bias.as_deref())
        }
        (Op::Linear { .. }, Some(Params::Linear(p))) => {
            let bias = p.bias.as_ref().map(|b| floats(b.val())).transpose()?;
            layer(&floats(p.weight.val())?, &p.weight.dims(), bias.as_deref())
        }
        (Op::BatchNorm2d { .. }, Some(Params::BatchNorm(_))) => {
            let (scale, shift) = batch_norm(step.node)?.affine();
            let plane = shapes[step.node].numel() / scale.len();
            Box::new(Simple::Affine { scale, shift, plane, relu: step.relu })
        }
        (Op::Add, _) => Box::new(Simple::Add { relu: step.relu }),
        (Op::Relu, _) => Box::new(Simple::Relu),
        (Op::MaxPool2d { .. } | Op::AvgPool2d { .. }, _) => Box::new(Simple::Pool {
            kind: match node.op {
                Op::MaxPool2d { .. } => PoolKind::Max,
                Op::AvgPool2d { count_include_pad: true, .. } => PoolKind::AvgWithPadding,
                _ => PoolKind::AvgWithoutPadding,
            },
            input: map_dims(shapes[node.inputs[0]]),
            output: map_dims(shapes[step.node]),
            window: PoolWindow::of(&node.op).expect("a pool"),
        }),
        (Op::Pad { begin, mode, .. }, _) => Box::new(Simple::Pad {
            input: map_dims(shapes[node.inputs[0]]),
            begin: *begin,
            output: map_dims(shapes[step.node]),
            mode: *mode,
        }),
        (Op::Lrn { size, alpha, beta, bias }, _) => {
            let s = shapes[step.node];
            Box::new(Simple::Lrn {
                channels: s.channels(),
                plane: s.numel() / s.channels(),
                size: *size,
                alpha: *alpha,
                beta: *beta,
                bias: *bias,
            })
        }
        (Op::Unflatten { .. }, _) => Box::new(Simple::Copy),
        (Op::ChannelShuffle { groups }, _) => {
            let s = shapes[step.node];
            Box::new(Simple::ChannelShuffle {
                channels: s.channels(),
                groups: *groups,
                plane: s.numel() / s.channels(),
            })
        }
        (Op::GlobalAvgPool, _) => {
            let s = shapes[node.inputs[0]];
            Box::new(Simple::GlobalAvgPool { channels: s.channels(), plane: s.numel() / s.channels() })
        }
        (Op::Clip { min, max }, _) => Box::new(Simple::Unary(Unary::Clip { min: *min, max: *max })),
        (Op::Sigmoid, _) => Box::new(Simple::Unary(Unary::Sigmoid)),
        (Op::HardSigmoid { alpha, beta }, _) if step.gate => {
            Box::new(Simple::Unary(Unary::HardSigmoidGate { alpha: *alpha, beta: *beta }))
        }
        (Op::HardSigmoid { alpha, beta }, _) => {
            Box::new(Simple::Unary(Unary::HardSigmoid { alpha: *alpha, beta: *beta }))
        }
        (Op::HardSwish, _) => Box::new(Simple::Unary(Unary::HardSwish)),
        (Op::LeakyRelu { alpha }, _) => Box::new(Simple::Unary(Unary::LeakyRelu { alpha: *alpha })),
        (Op::Mul, _) => {
            let (a, b) = (shapes[node.inputs[0]], shapes[node.inputs[1]]);
            Box::new(Simple::Mul { plane: a.numel() / b.numel() })
        }
        (Op::Concat, _) => Box::new(Simple::Concat { parts: node.inputs.iter().map(|&i| shapes[i].numel()).collect() }),
        (Op::Softmax, _) => Box::new(Simple::Softmax { classes: shapes[step.node].numel() }),
        (op, _) => return Err(Error::graph(&node.name, format!("{} cannot be frozen", op.kind()))),
    })
}

/// `(c, h, w)` of a value (a vector is `(features, 1, 1)`).
fn map_dims(s: ValueShape) -> (usize, usize, usize) {
    match s {
        ValueShape::Map { channels, height, width } => (channels, height, width),
        ValueShape::Flat { features } => (features, 1, 1),
    }
}

/// Buffer planning: a value's slot is freed after its last reader and reused. Returns each
/// value's slot and each slot's length per image.
fn plan_buffers(steps: &[Step], value_len: &[usize], output_value: usize) -> (Vec<usize>, Vec<usize>) {
    let mut last_use = vec![0usize; value_len.len()];
    for (s, step) in steps.iter().enumerate() {
        for &v in &step.inputs {
            last_use[v] = s;
        }
    }
    last_use[output_value] = usize::MAX;
    let mut slot_of = vec![usize::MAX; value_len.len()];
    let mut slot_len: Vec<usize> = vec![value_len[0]];
    slot_of[0] = 0;
    let mut free: Vec<usize> = Vec::new();
    for (s, step) in steps.iter().enumerate() {
        let slot = match free.pop() {
            Some(slot) => slot,
            None => {
                slot_len.push(0);
                slot_len.len() - 1
            }
        };
        slot_len[slot] = slot_len[slot].max(value_len[step.output]);
        slot_of[step.output] = slot;
        for &v in &step.inputs {
            if last_use[v] == s && !free.contains(&slot_of[v]) && v != step.output {
                free.push(slot_of[v]);
            }
        }
    }
    (slot_of, slot_len)
}
