//! Which graph nodes each step of a plan computes: the plan's fusion rules, in one place.
//!
//! A node's value is absorbed by its only consumer when that consumer can be computed in the
//! same pass — a batch norm folded into the convolution before it, a ReLU fused into the
//! epilogue of its producer, and (for the plan's own f32 kernels) the residual add a
//! convolution's value meets, when the add's other input is computed before the convolution —
//! unless the node is the graph's output. [`Graph::fold_batch_norms`]
//! folds by the same rule ([`batch_norm_after`]), and kernel builders learn the decisions
//! through [`super::LayerView`]'s `read_by` and `reads_from` instead of working them out again.

use crate::graph::{Graph, NodeId, Op, Params};

/// What one step computes: `node`, and the nodes whose values it absorbs up to `tail`, whose
/// value the step's output is.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// Whether the plan shares the input's value instead of computing a step (ops that change
/// nothing in memory).
pub(crate) fn is_alias(op: &Op) -> bool {
    matches!(op, Op::Identity | Op::Flatten)
}

/// The steps of `graph`'s plan in order; alias nodes ([`is_alias`]) and absorbed nodes have
/// none. `residual`: whether convolutions absorb the add after them (the plan's own kernels
/// take it, and those of registries that say so: `KernelRegistry::fuses_residuals`).
pub(crate) fn fuse(graph: &Graph, residual: bool) -> Vec<Fused> {
    let mut absorbed = vec![false; graph.nodes.len()];
    let mut steps = Vec::new();
    for (id, node) in graph.nodes.iter().enumerate().skip(1) {
        if absorbed[id] || is_alias(&node.op) {
            continue;
        }
        let mut step =
            Fused { node: id, batch_norm: None, absorbed: Vec::new(), relu: false, residual: None, gate: false };
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
        if residual
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
        assert!(labels.contains(&"hard_sigmoid+mul/f32".to_string()), "{labels:?}");
        let fused = plan.run(&x, 2).unwrap().to_vec();
        let t = burn::tensor::Tensor::<4>::from_data(burn::tensor::TensorData::new(x.clone(), [2, 3, 6, 6]), &device);
        let want = crate::host::floats(g.forward(t)).unwrap();
        for (a, b) in fused.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
