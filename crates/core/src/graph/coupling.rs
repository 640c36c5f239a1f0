//! Channel coupling: which (node, axis) pairs must keep the same set of channels.
//!
//! Removing output channel `k` of a convolution also removes entry `k` of the batch norm after
//! it, input channel `k` of every convolution or linear layer that reads it, and — through a
//! residual add — channel `k` of every other branch that meets at that add. A
//! [`CouplingGroup`] lists all of those places, so structured pruning can remove a channel
//! consistently or not at all.
//!
//! A value's channels are a list of segments, each a run of one group's channels: one segment
//! for most values, several after a concatenation (DenseNet, Inception, SqueezeNet's fire
//! modules), which places each input's channels at an offset. A member records that offset, so
//! a layer reading a concatenation loses the right input channels when any of its sources is
//! pruned.

use super::{Graph, NodeId, Op, ValueShape};
use crate::Result;

/// How a node touches the channels of a coupling group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelRole {
    /// Produces the channels: axis 0 of its weight and bias (conv filters, linear neurons).
    Produces,
    /// Carries per-channel parameters along: batch-norm γ/β/statistics, or a depthwise
    /// convolution's filters (axis 0 of its weight).
    Follows,
    /// Reads the channels: axis 1 of its weight. `features_per_channel` is the number of
    /// consecutive input features that belong to one channel (h·w after a flatten, else 1).
    Consumes {
        /// Input features per channel of the group.
        features_per_channel: usize,
    },
}

/// One place a coupling group touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CouplingMember {
    /// The node.
    pub node: NodeId,
    /// How it touches the channels.
    pub role: ChannelRole,
    /// Where the group's channels start on the node's channel axis (axis 0 for producers and
    /// followers, the input channels for consumers, counted in channels): 0 unless the node
    /// reads or carries a concatenation.
    pub offset: usize,
}

/// A set of channels that must be pruned together, and every place they appear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CouplingGroup {
    /// Number of channels in the group.
    pub channels: usize,
    /// Parameterised nodes touching the group, in graph order.
    pub members: Vec<CouplingMember>,
    /// Nodes whose output carries these channels (including parameter-free ones such as ReLU,
    /// add and concat), in graph order.
    pub carriers: Vec<NodeId>,
    /// Whether channels of this group may be removed: false for the network input, the output
    /// (logits), channels entering or leaving a grouped (non-depthwise) convolution, and
    /// channels that an op mixes with others (LRN's window, a channel shuffle).
    pub prunable: bool,
}

impl CouplingGroup {
    /// The producers of the group (convolutions and linear layers whose outputs are its channels).
    pub fn producers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.members.iter().filter(|m| m.role == ChannelRole::Produces).map(|m| m.node)
    }
}

struct UnionFind(Vec<usize>);

impl UnionFind {
    fn find(&mut self, mut x: usize) -> usize {
        while self.0[x] != x {
            self.0[x] = self.0[self.0[x]];
            x = self.0[x];
        }
        x
    }
    fn union(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.0[b.max(a)] = a.min(b);
        }
    }
    fn fresh(&mut self) -> usize {
        self.0.push(self.0.len());
        self.0.len() - 1
    }
}

/// A run of one channel space's channels within a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    /// The channel space (a union-find element).
    space: usize,
    /// Its channels.
    channels: usize,
}

/// The analysis in progress: each node's segments and features per channel, the members found,
/// and the spaces that may not be pruned.
struct Analysis {
    uf: UnionFind,
    segments: Vec<Vec<Segment>>,
    block: Vec<usize>,
    members: Vec<(usize, CouplingMember)>,
    fixed: Vec<usize>,
}

impl Analysis {
    /// A node whose output is one new space of `channels`, fixed or not.
    fn fresh(&mut self, id: NodeId, channels: usize, fixed: bool) -> usize {
        let space = self.uf.fresh();
        self.segments[id] = vec![Segment { space, channels }];
        if fixed {
            self.fixed.push(space);
        }
        space
    }

    /// `id` carries its input's channels unchanged.
    fn pass(&mut self, id: NodeId, input: NodeId) {
        self.segments[id] = self.segments[input].clone();
        self.block[id] = self.block[input];
    }

    /// A member for every segment of `input`'s channels, at its offset.
    fn each_segment(&mut self, input: NodeId, node: NodeId, role: ChannelRole) {
        let mut offset = 0;
        for seg in self.segments[input].clone() {
            self.members.push((seg.space, CouplingMember { node, role, offset }));
            offset += seg.channels;
        }
    }

    fn fix_all(&mut self, input: NodeId) {
        let spaces: Vec<usize> = self.segments[input].iter().map(|s| s.space).collect();
        self.fixed.extend(spaces);
    }

    /// Inputs whose channel `k` is the same channel (add, mul): their segments are joined one
    /// to one when they line up; when they do not, all of them stay.
    fn join(&mut self, id: NodeId, inputs: &[NodeId]) {
        let first = self.segments[inputs[0]].clone();
        let lined_up =
            |s: &[Segment]| s.len() == first.len() && s.iter().zip(&first).all(|(a, b)| a.channels == b.channels);
        if inputs.iter().all(|&i| lined_up(&self.segments[i])) {
            for &i in &inputs[1..] {
                for (a, b) in first.iter().zip(self.segments[i].clone()) {
                    self.uf.union(a.space, b.space);
                }
            }
        } else {
            for &i in inputs {
                self.fix_all(i);
            }
        }
        self.pass(id, inputs[0]);
    }
}

impl Graph {
    /// The channel-coupling groups of the graph, in order of their first carrier.
    ///
    /// # Errors
    /// [`crate::Error::InvalidGraph`] if shape inference fails.
    pub fn coupling_groups(&self) -> Result<Vec<CouplingGroup>> {
        let shapes = self.shapes()?;
        let n = self.nodes.len();
        let mut a = Analysis {
            uf: UnionFind(Vec::new()),
            segments: vec![Vec::new(); n],
            block: vec![1; n],
            members: Vec::new(),
            fixed: Vec::new(),
        };
        for (id, node) in self.nodes.iter().enumerate() {
            let input = node.inputs.first().copied().unwrap_or(0);
            let channels = shapes[id].channels();
            match &node.op {
                Op::Input { .. } => {
                    a.fresh(id, channels, true);
                }
                Op::Conv2d { in_channels, out_channels, groups, .. } => {
                    if *groups > 1 && groups == in_channels && groups == out_channels {
                        a.pass(id, input);
                        a.each_segment(input, id, ChannelRole::Follows);
                    } else {
                        let f = a.block[input];
                        a.each_segment(input, id, ChannelRole::Consumes { features_per_channel: f });
                        let space = a.fresh(id, channels, *groups > 1);
                        a.members.push((space, CouplingMember { node: id, role: ChannelRole::Produces, offset: 0 }));
                        if *groups > 1 {
                            a.fix_all(input);
                        }
                    }
                }
                Op::Linear { .. } => {
                    let f = a.block[input] * spatial(&shapes[input]);
                    a.each_segment(input, id, ChannelRole::Consumes { features_per_channel: f });
                    let space = a.fresh(id, channels, false);
                    a.members.push((space, CouplingMember { node: id, role: ChannelRole::Produces, offset: 0 }));
                }
                Op::BatchNorm2d { .. } => {
                    a.pass(id, input);
                    a.each_segment(input, id, ChannelRole::Follows);
                }
                Op::Flatten => {
                    a.pass(id, input);
                    a.block[id] = a.block[input] * spatial(&shapes[input]);
                }
                Op::Add | Op::Mul => a.join(id, &node.inputs),
                Op::Relu
                | Op::Identity
                | Op::MaxPool2d { .. }
                | Op::AvgPool2d { .. }
                | Op::GlobalAvgPool
                | Op::Clip { .. }
                | Op::Sigmoid
                | Op::HardSigmoid { .. }
                | Op::HardSwish
                | Op::LeakyRelu { .. }
                | Op::Softmax
                | Op::Pad { .. } => a.pass(id, input),
                Op::Unflatten { .. } => {
                    // A vector `[c]` viewed as `[c, 1, 1]` keeps its channels; any other view
                    // mixes them with positions, so they stay.
                    if shapes[id].numel() == channels && a.block[input] == 1 && shapes[input].channels() == channels {
                        a.pass(id, input);
                    } else {
                        a.fix_all(input);
                        a.fresh(id, channels, true);
                    }
                }
                Op::Lrn { .. } | Op::ChannelShuffle { .. } => {
                    // Each output channel depends on its neighbours (LRN) or is another input
                    // channel (shuffle, between grouped convolutions that fix them anyway): the
                    // channels on both sides stay.
                    a.fix_all(input);
                    a.fresh(id, channels, true);
                }
                Op::Concat => {
                    // The inputs' segments one after the other (channels of maps, or blocks of
                    // features of equal size).
                    let block = a.block[input];
                    if node.inputs.iter().all(|&i| a.block[i] == block) {
                        a.segments[id] = node.inputs.iter().flat_map(|&i| a.segments[i].clone()).collect();
                        a.block[id] = block;
                    } else {
                        for &i in &node.inputs {
                            a.fix_all(i);
                        }
                        a.fresh(id, channels, true);
                    }
                }
            }
        }
        a.fix_all(self.output);
        Ok(groups_of(a))
    }
}

/// The groups: one per union-find root, in order of first carrier.
fn groups_of(mut a: Analysis) -> Vec<CouplingGroup> {
    let mut roots: Vec<usize> = Vec::new();
    let mut groups: Vec<CouplingGroup> = Vec::new();
    for id in 0..a.segments.len() {
        for seg in a.segments[id].clone() {
            let root = a.uf.find(seg.space);
            let g = match roots.iter().position(|&r| r == root) {
                Some(g) => g,
                None => {
                    roots.push(root);
                    groups.push(CouplingGroup {
                        channels: seg.channels,
                        members: Vec::new(),
                        carriers: Vec::new(),
                        prunable: true,
                    });
                    groups.len() - 1
                }
            };
            if groups[g].carriers.last() != Some(&id) {
                groups[g].carriers.push(id);
            }
        }
    }
    for (s, member) in a.members.clone() {
        let root = a.uf.find(s);
        let g = roots.iter().position(|&r| r == root).expect("every space has a carrier");
        groups[g].members.push(member);
    }
    for s in a.fixed.clone() {
        let root = a.uf.find(s);
        if let Some(g) = roots.iter().position(|&r| r == root) {
            groups[g].prunable = false;
        }
    }
    for g in &mut groups {
        g.members.sort_by_key(|m| (m.node, m.offset));
        if g.producers().next().is_none() {
            g.prunable = false;
        }
    }
    groups
}

/// Features per channel when a feature map is read as a vector.
fn spatial(shape: &ValueShape) -> usize {
    match *shape {
        ValueShape::Map { height, width, .. } => height * width,
        ValueShape::Flat { .. } => 1,
    }
}

/// Indices as an int tensor on `device`.
fn index_tensor(indices: &[usize], device: &burn::tensor::Device) -> burn::tensor::Tensor<1, burn::tensor::Int> {
    let values: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
    burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(values, [indices.len()]), device)
}

impl Graph {
    /// A copy of the graph in which each listed coupling group keeps only the channels given
    /// (ascending indices into the group's channels): the producers lose filters or neurons,
    /// batch norms and depthwise convolutions lose the matching entries, and every consumer
    /// loses the matching input channels (or, after a flatten, the matching blocks of input
    /// features). Tensors really shrink; node ids, names and edges stay as they were.
    ///
    /// `groups` are this graph's [`Graph::coupling_groups`]; `keep` pairs a group's index with the
    /// channels it keeps. In evaluation mode the result computes what the original computes with
    /// the removed channels' filters, biases and batch-norm γ and β zeroed (physical removal, not
    /// a mask).
    ///
    /// # Errors
    /// [`crate::Error::InvalidGraph`] if a group is not prunable, a selection is empty, unsorted or
    /// out of range, or the result does not validate.
    pub fn keep_channels(&self, groups: &[CouplingGroup], keep: &[(usize, Vec<usize>)]) -> Result<Graph> {
        // Every member of every group listed, then applied from the highest offset down, so a
        // node that reads several groups (a concatenation) keeps valid offsets for the rest.
        let mut edits: Vec<(CouplingMember, usize, &[usize])> = Vec::new();
        for (g, channels) in keep {
            let group =
                groups.get(*g).ok_or_else(|| crate::Error::graph("<coupling>", format!("no coupling group {g}")))?;
            let what = || format!("coupling group {g} (carried by {})", self.nodes[group.carriers[0]].name);
            if !group.prunable {
                return Err(crate::Error::graph(what(), "its channels cannot be removed"));
            }
            if channels.is_empty()
                || channels.windows(2).any(|w| w[0] >= w[1])
                || channels[channels.len() - 1] >= group.channels
            {
                return Err(crate::Error::graph(
                    what(),
                    format!("kept channels must be ascending, non-empty and below {}", group.channels),
                ));
            }
            edits.extend(group.members.iter().map(|m| (*m, group.channels, channels.as_slice())));
        }
        edits.sort_by_key(|(m, _, _)| std::cmp::Reverse(m.offset));
        let mut graph = self.clone();
        for (member, group_channels, channels) in edits {
            keep_member(&mut graph.nodes[member.node], member, group_channels, channels)?;
        }
        graph.validate()?;
        Ok(graph)
    }
}

/// `0..offset`, then `offset + k` for each kept `k` (each as `per` consecutive entries), then
/// everything after the group's `channels`: the entries of an axis of `len` that stay.
fn kept_entries(len: usize, offset: usize, channels: usize, keep: &[usize], per: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..offset * per).collect();
    v.extend(keep.iter().flat_map(|&c| (offset + c) * per..(offset + c + 1) * per));
    v.extend((offset + channels) * per..len);
    v
}

/// Shrinks one member's parameters (and its op's channel counts) to the kept channels.
fn keep_member(
    node: &mut super::Node,
    member: CouplingMember,
    group_channels: usize,
    channels: &[usize],
) -> Result<()> {
    use super::{ConvParams, LinearParams, Params, builder::batch_norm_from};
    use burn::module::Param;
    let params = node.params.take().expect("coupling members carry parameters");
    let device = match &params {
        Params::Conv(p) => p.weight.device(),
        Params::Linear(p) => p.weight.device(),
        Params::BatchNorm(bn) => bn.gamma.device(),
    };
    let o = member.offset;
    node.params = Some(match (member.role, params) {
        (ChannelRole::Produces | ChannelRole::Follows, Params::Conv(p)) => {
            let rows = kept_entries(p.weight.dims()[0], o, group_channels, channels, 1);
            let n = rows.len();
            if let Op::Conv2d { in_channels, out_channels, groups, .. } = &mut node.op {
                *out_channels = n;
                if member.role == ChannelRole::Follows {
                    (*in_channels, *groups) = (n, n);
                }
            }
            let axis0 = index_tensor(&rows, &device);
            Params::Conv(ConvParams {
                weight: Param::from_tensor(p.weight.val().select(0, axis0.clone())),
                bias: p.bias.map(|b| Param::from_tensor(b.val().select(0, axis0))),
            })
        }
        (ChannelRole::Produces, Params::Linear(p)) => {
            let rows = kept_entries(p.weight.dims()[0], o, group_channels, channels, 1);
            if let Op::Linear { out_features, .. } = &mut node.op {
                *out_features = rows.len();
            }
            let axis0 = index_tensor(&rows, &device);
            Params::Linear(LinearParams {
                weight: Param::from_tensor(p.weight.val().select(0, axis0.clone())),
                bias: p.bias.map(|b| Param::from_tensor(b.val().select(0, axis0))),
            })
        }
        (ChannelRole::Follows, Params::BatchNorm(bn)) => {
            let rows = kept_entries(bn.gamma.dims()[0], o, group_channels, channels, 1);
            let (epsilon, momentum) = match node.op {
                Op::BatchNorm2d { epsilon, momentum, .. } => (epsilon, momentum),
                _ => unreachable!("batch-norm params belong to a batch-norm op"),
            };
            node.op = Op::BatchNorm2d { features: rows.len(), epsilon, momentum };
            let axis0 = index_tensor(&rows, &device);
            Params::BatchNorm(batch_norm_from(
                bn.gamma.val().select(0, axis0.clone()),
                bn.beta.val().select(0, axis0.clone()),
                bn.running_mean.value().select(0, axis0.clone()),
                bn.running_var.value().select(0, axis0),
                epsilon,
                momentum,
            ))
        }
        (ChannelRole::Consumes { features_per_channel: f }, Params::Conv(p)) => {
            let cols = kept_entries(p.weight.dims()[1], o, group_channels, channels, f);
            if let Op::Conv2d { in_channels, .. } = &mut node.op {
                *in_channels = cols.len();
            }
            Params::Conv(ConvParams {
                weight: Param::from_tensor(p.weight.val().select(1, index_tensor(&cols, &device))),
                bias: p.bias,
            })
        }
        (ChannelRole::Consumes { features_per_channel: f }, Params::Linear(p)) => {
            let cols = kept_entries(p.weight.dims()[1], o, group_channels, channels, f);
            if let Op::Linear { in_features, .. } = &mut node.op {
                *in_features = cols.len();
            }
            Params::Linear(LinearParams {
                weight: Param::from_tensor(p.weight.val().select(1, index_tensor(&cols, &device))),
                bias: p.bias,
            })
        }
        (role, _) => {
            return Err(crate::Error::graph(
                &node.name,
                format!("{role:?} is not a role a {} can have", node.op.kind()),
            ));
        }
    });
    Ok(())
}
