//! Which graph nodes each step of a plan computes: the plan's fusion rules, in one place.
//!
//! A node's value is absorbed by its only consumer when that consumer can be computed in the
//! same pass — a batch norm folded into the convolution before it, a ReLU fused into the
//! epilogue of its producer, and (for the plan's own kernels and registries that take them)
//! the residual add a convolution's value meets, when the add's other input is computed before
//! the convolution, and the clip or hard-swish after a conv or linear layer — unless the node
//! is the graph's output. [`Graph::fold_batch_norms`]
//! folds by the same rule ([`batch_norm_after`]), and kernel builders learn the decisions
//! through [`super::LayerView`]'s `read_by` and `reads_from` instead of working them out again.

use crate::graph::{Graph, NodeId, Op, Params};

/// What one step computes: `node`, and the nodes whose values it absorbs up to `tail`, whose
/// value the step's output is.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Fused {
    /// The node the step is built from.
    pub node: NodeId,
    /// A batch norm folded into a convolution's weights and bias.
    pub batch_norm: Option<NodeId>,
    /// Every node absorbed, in order (the folded batch norm or the identity a folded one left,
    /// then a fused ReLU).
    pub absorbed: Vec<NodeId>,
    /// Whether a ReLU is fused into the step.
    pub relu: bool,
    /// A two-input add fused into a convolution's epilogue, and its other input (computed by an
    /// earlier step), which the step reads as its second input.
    pub residual: Option<(NodeId, NodeId)>,
    /// A `HardSigmoid` step absorbed the `Mul` of its own input by its value (hard-swish as
    /// exporters write it before opset 14): the step computes `x · hard_sigmoid(x)`.
    pub gate: bool,
    /// A conv or linear layer absorbed the clip or hard-swish after it (never with a ReLU).
    pub activation: Option<crate::kernels::activation::Activation>,
}

impl Fused {
    /// The node whose value the step's output is: the last absorbed one, or the node itself.
    pub fn tail(&self) -> NodeId {
        self.absorbed.last().copied().unwrap_or(self.node)
    }
}

/// The only consumer of `id` when it satisfies `pred` and `id` is not the graph's output.
fn sole_consumer(graph: &Graph, id: NodeId, pred: impl Fn(&Op) -> bool) -> Option<NodeId> {
    match graph.consumers(id)[..] {
        [c] if id != graph.output && pred(&graph.nodes[c].op) => Some(c),
        _ => None,
    }
}

/// The batch norm that is the only consumer of convolution `conv` (and has its parameters), so
/// that it can be folded into the convolution's weights and bias. The one rule both the plan and
/// [`Graph::fold_batch_norms`] fold by.
pub fn batch_norm_after(graph: &Graph, conv: NodeId) -> Option<NodeId> {
    if !matches!(graph.nodes[conv].op, Op::Conv2d { .. }) || !matches!(graph.nodes[conv].params, Some(Params::Conv(_)))
    {
        return None;
    }
    sole_consumer(graph, conv, |op| matches!(op, Op::BatchNorm2d { .. }))
        .filter(|&bn| matches!(graph.nodes[bn].params, Some(Params::BatchNorm(_))))
}

/// The `Mul` that is the only consumer of `HardSigmoid` node `id` and multiplies the hard
/// sigmoid's own input by it: `x · hard_sigmoid(x)`, one step.
fn gate_after(graph: &Graph, id: NodeId) -> Option<NodeId> {
    if !matches!(graph.nodes[id].op, Op::HardSigmoid { .. }) {
        return None;
    }
    let x = graph.nodes[id].inputs[0];
    let mul = sole_consumer(graph, id, |op| matches!(op, Op::Mul))?;
    let inputs = &graph.nodes[mul].inputs;
    (inputs.len() == 2 && inputs.contains(&x) && inputs.contains(&id)).then_some(mul)
}

/// The activation that alone reads the value of step `tail` (a clip, a hard-swish, or a
/// `HardSigmoid` and the `Mul` of `tail` by it), with the nodes it is made of.
fn activation_after(graph: &Graph, tail: NodeId) -> Option<(crate::kernels::activation::Activation, Vec<NodeId>)> {
    use crate::kernels::activation::Activation;
    if tail == graph.output {
        return None;
    }
    match graph.consumers(tail)[..] {
        [c] => match graph.nodes[c].op {
            Op::Clip { min, max } => Some((Activation::Clip { min, max }, vec![c])),
            Op::HardSwish => Some((Activation::HARD_SWISH, vec![c])),
            _ => None,
        },
        // `tail · hard_sigmoid(tail)`: the hard sigmoid and the multiplication read it.
        [a, b] => {
            let (sigmoid, mul) = if matches!(graph.nodes[a].op, Op::HardSigmoid { .. }) { (a, b) } else { (b, a) };
            let Op::HardSigmoid { alpha, beta } = graph.nodes[sigmoid].op else { return None };
            (gate_after(graph, sigmoid) == Some(mul))
                .then(|| (Activation::HardSigmoidGate { alpha, beta }, vec![sigmoid, mul]))
        }
        _ => None,
    }
}

/// Whether the plan shares the input's value instead of computing a step (ops that change
/// nothing in memory).
pub(crate) fn is_alias(op: &Op) -> bool {
    matches!(op, Op::Identity | Op::Flatten)
}

/// The steps of `graph`'s plan in order; alias nodes ([`is_alias`]) and absorbed nodes have
/// none. `epilogues`: whether convolutions absorb the add after them and layers the clip or
/// hard-swish after them (the plan's own kernels take them, and those of registries that say
/// so: `KernelRegistry::fuses_epilogues`).
pub(crate) fn fuse(graph: &Graph, epilogues: bool) -> Vec<Fused> {
    let mut absorbed = vec![false; graph.nodes.len()];
    let mut steps = Vec::new();
    for (id, node) in graph.nodes.iter().enumerate().skip(1) {
        if absorbed[id] || is_alias(&node.op) {
            continue;
        }
        let mut step = Fused {
            node: id,
            batch_norm: None,
            absorbed: Vec::new(),
            relu: false,
            residual: None,
            gate: false,
            activation: None,
        };
        if let Some(mul) = gate_after(graph, id) {
            step.gate = true;
            step.absorbed.push(mul);
        }
        if matches!(node.op, Op::Conv2d { .. }) {
            if let Some(bn) = batch_norm_after(graph, id) {
                step.batch_norm = Some(bn);
                step.absorbed.push(bn);
            } else if let Some(identity) = sole_consumer(graph, id, |op| matches!(op, Op::Identity)) {
                // The identity a batch norm folded by `Graph::fold_batch_norms` left: look
                // through it for a ReLU to fuse.
                step.absorbed.push(identity);
            }
        }
        if epilogues
            && matches!(node.op, Op::Conv2d { .. })
            && let Some(add) = sole_consumer(graph, step.tail(), |op| matches!(op, Op::Add))
            && let [a, b] = graph.nodes[add].inputs[..]
        {
            let other = if a == step.tail() { b } else { a };
            // Computed by an earlier step (node ids are in topological order), and not this
            // convolution's own value twice.
            if other < id {
                step.residual = Some((add, other));
                step.absorbed.push(add);
            }
        }
        let takes_relu = matches!(node.op, Op::Conv2d { .. } | Op::Linear { .. } | Op::BatchNorm2d { .. } | Op::Add);
        if takes_relu && let Some(relu) = sole_consumer(graph, step.tail(), |op| matches!(op, Op::Relu)) {
            step.relu = true;
            step.absorbed.push(relu);
        }
        if epilogues
            && !step.relu
            && matches!(node.op, Op::Conv2d { .. } | Op::Linear { .. })
            && let Some((activation, nodes)) = activation_after(graph, step.tail())
        {
            step.activation = Some(activation);
            step.absorbed.extend(nodes);
        }
        for &a in &step.absorbed {
            absorbed[a] = true;
        }
        steps.push(step);
    }
    steps
}

/// For each step that computes a conv or linear layer: the layer step that alone reads its
/// output, if any — the value between the two is read by nothing else and is not the graph's
/// output. Indices are into `steps`.
pub(crate) fn layer_pairs(graph: &Graph, steps: &[Fused]) -> Vec<(usize, usize)> {
    let is_layer = |id: NodeId| matches!(graph.nodes[id].op, Op::Conv2d { .. } | Op::Linear { .. });
    let step_of: std::collections::BTreeMap<NodeId, usize> =
        steps.iter().enumerate().map(|(i, s)| (s.node, i)).collect();
    steps
        .iter()
        .enumerate()
        .filter(|(_, s)| is_layer(s.node))
        .filter_map(|(i, s)| {
            let next = sole_consumer(graph, s.tail(), |op| matches!(op, Op::Conv2d { .. } | Op::Linear { .. }))?;
            Some((i, *step_of.get(&next)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Conv2dSpec, GraphBuilder};
    use crate::init::InitRng;

    fn graph() -> Graph {
        let device = crate::BackendKind::Flex.device().unwrap();
        let mut b = GraphBuilder::new([3, 8, 8]);
        let x = b.input();
        let c1 = b.conv2d("c1", x, Conv2dSpec::new(4, 3).padding(1));
        let n1 = b.batch_norm("bn1", c1);
        let r1 = b.relu("r1", n1);
        let c2 = b.conv2d("c2", r1, Conv2dSpec::new(4, 3).padding(1));
        let n2 = b.batch_norm("bn2", c2);
        // r1 is read twice (c2 and the add): c1's step is not paired with c2.
        let sum = b.add("add", &[n2, r1]);
        let r2 = b.relu("r2", sum);
        let c3 = b.conv2d("c3", r2, Conv2dSpec::new(4, 1));
        let f = b.flatten("flat", c3);
        let out = b.linear("fc", f, 2, true);
        b.build(out, &mut InitRng::seeded(1), &device).unwrap()
    }

    #[test]
    fn steps_absorb_batch_norms_and_relus_and_skip_aliases() {
        let g = graph();
        let id = |n: &str| g.node_id(n).unwrap();
        let steps = fuse(&g, false);
        let nodes: Vec<&str> = steps.iter().map(|s| g.nodes[s.node].name.as_str()).collect();
        assert_eq!(nodes, ["c1", "c2", "add", "c3", "fc"]);
        assert_eq!(steps[0].absorbed, [id("bn1"), id("r1")]);
        assert_eq!(steps[0].batch_norm, Some(id("bn1")));
        assert!(steps[0].relu && !steps[1].relu && steps[2].relu);
        assert_eq!(steps[1].tail(), id("bn2"));
        assert_eq!(steps[2].tail(), id("r2"));
        // c3 feeds the flatten (an alias), not fc: no pair; c1's value is read twice.
        assert!(layer_pairs(&g, &steps).is_empty());
    }

    #[test]
    fn a_residual_add_and_its_relu_join_the_convolution_that_reaches_them_last() {
        let g = graph();
        let id = |n: &str| g.node_id(n).unwrap();
        let steps = fuse(&g, true);
        let nodes: Vec<&str> = steps.iter().map(|s| g.nodes[s.node].name.as_str()).collect();
        assert_eq!(nodes, ["c1", "c2", "c3", "fc"]);
        assert_eq!(steps[1].absorbed, [id("bn2"), id("add"), id("r2")]);
        assert_eq!(steps[1].residual, Some((id("add"), id("r1"))));
        assert!(steps[1].relu);
        // c1's value reaches the add too, but through r1, which c2 also reads: not fused there.
        assert_eq!(steps[0].residual, None);
        // A shortcut convolution built after the main path takes the add instead.
        let device = crate::BackendKind::Flex.device().unwrap();
        let mut b = GraphBuilder::new([3, 8, 8]);
        let x = b.input();
        let main = b.conv2d("main", x, Conv2dSpec::new(4, 3).padding(1));
        let short = b.conv2d("short", x, Conv2dSpec::new(4, 1));
        let sum = b.add("add", &[main, short]);
        let out = b.relu("out", sum);
        let g = b.build(out, &mut InitRng::seeded(1), &device).unwrap();
        let steps = fuse(&g, true);
        assert_eq!(steps[0].residual, None);
        assert_eq!(steps[1].residual, Some((g.node_id("add").unwrap(), g.node_id("main").unwrap())));
        // The ReLU after it too, although it is the graph's output: the step computes it.
        assert!(steps[1].relu);
        assert_eq!(steps[1].tail(), g.output);
    }

    #[test]
    fn a_folded_graph_fuses_through_the_identities_and_pairs_layers() {
        let device = crate::BackendKind::Flex.device().unwrap();
        let mut b = GraphBuilder::new([3, 8, 8]);
        let x = b.input();
        let c1 = b.conv2d("c1", x, Conv2dSpec::new(4, 3).padding(1));
        let n1 = b.batch_norm("bn1", c1);
        let r1 = b.relu("r1", n1);
        let c2 = b.conv2d("c2", r1, Conv2dSpec::new(4, 3).padding(1));
        let p = b.global_avg_pool("pool", c2);
        let f = b.flatten("flat", p);
        let out = b.linear("fc", f, 2, true);
        let g = b.build(out, &mut InitRng::seeded(2), &device).unwrap();
        let (folded, names) = g.fold_batch_norms().unwrap();
        assert_eq!(names, ["bn1"]);
        let steps = fuse(&folded, false);
        assert_eq!(steps[0].absorbed, [folded.node_id("bn1").unwrap(), folded.node_id("r1").unwrap()]);
        assert_eq!(steps[0].batch_norm, None);
        assert_eq!(layer_pairs(&folded, &steps), [(0, 1)]);
        // The graph's output is never absorbed, nor paired.
        assert_eq!(steps.last().unwrap().tail(), folded.output);
    }

    #[test]
    fn a_hard_sigmoid_gating_its_own_input_is_one_step_with_the_same_bits() {
        let device = crate::BackendKind::Flex.device().unwrap();
        let build = |gate_input_is_x: bool| {
            let mut b = GraphBuilder::new([3, 6, 6]);
            let x = b.input();
            let c = b.conv2d("c", x, Conv2dSpec::new(4, 3).padding(1));
            let h = b.push("hs", Op::HardSigmoid { alpha: 1.0 / 6.0, beta: 0.5 }, vec![c]);
            // Mul(h, c): the hard sigmoid's own input (a gate) or another value (no gate).
            let other = if gate_input_is_x { c } else { b.conv2d("d", c, Conv2dSpec::new(4, 1)) };
            let m = b.push("mul", Op::Mul, vec![h, other]);
            let out = b.global_avg_pool("pool", m);
            b.build(out, &mut InitRng::seeded(3), &device).unwrap()
        };
        let g = build(true);
        let steps = fuse(&g, false);
        let hs = steps.iter().find(|s| g.nodes[s.node].name == "hs").unwrap();
        assert!(hs.gate);
        assert_eq!(hs.absorbed, [g.node_id("mul").unwrap()]);
        assert_eq!(steps.len(), 3);
        let other = build(false);
        assert!(fuse(&other, false).iter().all(|s| !s.gate));
        // The fused step computes what the two steps compute, bit for bit, and what burn does.
        let (gate, sigmoid) = (
            super::super::Unary::HardSigmoidGate { alpha: 0.2, beta: 0.5 },
            super::super::Unary::HardSigmoid { alpha: 0.2, beta: 0.5 },
        );
        for i in -2000..2000 {
            let v = i as f32 * 0.0037;
            assert_eq!(gate.apply(v).to_bits(), (v * sigmoid.apply(v)).to_bits(), "{v}");
        }
        let x: Vec<f32> = (0..2 * 3 * 36).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let mut plan = crate::runtime::freeze(&g).unwrap();
        let labels: Vec<String> = plan.profile(&x, 2).unwrap().into_iter().map(|s| s.1).collect();
        // The plan's conv absorbs the gate (`Fused::activation`) and applies it after its kernel.
        assert!(labels[0].ends_with(", then hard_sigmoid+mul/f32") && labels.len() == 2, "{labels:?}");
        let fused = plan.run(&x, 2).unwrap().to_vec();
        let t = burn::tensor::Tensor::<4>::from_data(burn::tensor::TensorData::new(x.clone(), [2, 3, 6, 6]), &device);
        let want = crate::host::floats(g.forward(t)).unwrap();
        for (a, b) in fused.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    /// A conv or linear layer absorbs the clip, hard-swish or hard-sigmoid gate that alone reads
    /// it (not after a ReLU, not a value read twice), and the plan computes the same bits as
    /// with separate steps, whether the kernel or the plan's extra pass applies it.
    #[test]
    fn layers_absorb_the_activation_after_them_with_the_same_bits() {
        use crate::kernels::activation::Activation;
        let device = crate::BackendKind::Flex.device().unwrap();
        let mut b = GraphBuilder::new([3, 6, 6]);
        let x = b.input();
        let c1 = b.conv2d("c1", x, Conv2dSpec::new(4, 3).padding(1));
        let a1 = b.push("relu6", Op::Clip { min: 0.0, max: 6.0 }, vec![c1]);
        let c2 = b.conv2d("c2", a1, Conv2dSpec::new(5, 3).padding(1));
        let a2 = b.push("hswish", Op::HardSwish, vec![c2]);
        let c3 = b.conv2d("c3", a2, Conv2dSpec::new(4, 1));
        let h = b.push("hs", Op::HardSigmoid { alpha: 0.2, beta: 0.5 }, vec![c3]);
        let a3 = b.push("gate", Op::Mul, vec![h, c3]);
        // A ReLU then a clip: the ReLU is fused, the clip stays a step.
        let c4 = b.conv2d("c4", a3, Conv2dSpec::new(4, 1));
        let r4 = b.relu("r4", c4);
        let a4 = b.push("clip4", Op::Clip { min: -1.0, max: 0.5 }, vec![r4]);
        // Read twice (the clip and the add): not absorbed.
        let c5 = b.conv2d("c5", a4, Conv2dSpec::new(4, 1));
        let a5 = b.push("clip5", Op::Clip { min: -0.25, max: 0.25 }, vec![c5]);
        let sum = b.add("sum", &[c5, a5]);
        let p = b.global_avg_pool("pool", sum);
        let f = b.flatten("flat", p);
        let l = b.linear("fc", f, 3, true);
        let out = b.push("clip_out", Op::Clip { min: -0.1, max: 0.1 }, vec![l]);
        let g = b.build(out, &mut InitRng::seeded(4), &device).unwrap();
        let steps = fuse(&g, true);
        let of = |name: &str| steps.iter().find(|s| g.nodes[s.node].name == name).unwrap();
        let id = |name: &str| g.node_id(name).unwrap();
        assert_eq!(of("c1").activation, Some(Activation::Clip { min: 0.0, max: 6.0 }));
        assert_eq!(of("c1").absorbed, [id("relu6")]);
        assert_eq!(of("c2").activation, Some(Activation::HARD_SWISH));
        assert_eq!(of("c3").activation, Some(Activation::HardSigmoidGate { alpha: 0.2, beta: 0.5 }));
        assert_eq!(of("c3").absorbed, [id("hs"), id("gate")]);
        assert!(of("c4").relu && of("c4").activation.is_none());
        assert!(of("c5").activation.is_none());
        // The graph's output may be the activation a layer absorbs.
        assert_eq!(of("fc").activation, Some(Activation::Clip { min: -0.1, max: 0.1 }));
        assert_eq!(of("fc").tail(), g.output);
        assert!(fuse(&g, false).iter().all(|s| s.activation.is_none()));
        // Pairs form across the absorbed activation.
        assert!(layer_pairs(&g, &steps).contains(&(0, 1)));

        let input: Vec<f32> = (0..2 * 3 * 36).map(|i| ((i * 53 % 97) as f32 - 48.0) / 9.0).collect();
        let mut fused = crate::runtime::freeze(&g).unwrap();
        // A registry with a builder that takes nothing: no fused epilogues, separate steps.
        let mut separate = crate::runtime::KernelRegistry::default();
        separate.register("none", |_: &crate::runtime::LayerView<'_>| None);
        let options = crate::runtime::FreezeOptions::default();
        let mut unfused = crate::runtime::freeze_with(&g, &separate, &options).unwrap();
        let labels: Vec<String> = fused.profile(&input, 2).unwrap().into_iter().map(|s| s.1).collect();
        assert_eq!(labels.iter().filter(|l| l.contains(", then ")).count(), 4, "{labels:?}");
        assert_eq!(unfused.kernels().len(), fused.kernels().len() + 4);
        let (a, b) = (fused.run(&input, 2).unwrap().to_vec(), unfused.run(&input, 2).unwrap().to_vec());
        assert_eq!(
            a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(a.iter().any(|&v| v.abs() == 0.1), "the output clip bites: {a:?}");
    }
}
