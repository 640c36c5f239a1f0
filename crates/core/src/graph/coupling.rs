//! Channel coupling: which (node, axis) pairs must keep the same set of channels.
//!
//! Removing output channel `k` of a convolution also removes entry `k` of the batch norm after
//! it, input channel `k` of every convolution or linear layer that reads it, and — through a
//! residual add — channel `k` of every other branch that meets at that add. A
//! [`CouplingGroup`] lists all of those places, so structured pruning can remove a channel
//! consistently or not at all.

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
}

/// A set of channels that must be pruned together, and every place they appear.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CouplingGroup {
    /// Number of channels in the group.
    pub channels: usize,
    /// Parameterised nodes touching the group, in graph order.
    pub members: Vec<CouplingMember>,
    /// Nodes whose output carries these channels (including parameter-free ones such as ReLU
    /// and add), in graph order.
    pub carriers: Vec<NodeId>,
    /// Whether channels of this group may be removed: false for the network input, the output
    /// (logits), and channels entering or leaving a grouped (non-depthwise) convolution.
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

impl Graph {
    /// The channel-coupling groups of the graph, in order of their first carrier.
    ///
    /// # Errors
    /// [`crate::Error::InvalidGraph`] if shape inference fails.
    pub fn coupling_groups(&self) -> Result<Vec<CouplingGroup>> {
        let shapes = self.shapes()?;
        let mut uf = UnionFind(Vec::new());
        // space[i]: the channel space of node i's output; block[i]: features per channel.
        let mut space = vec![0usize; self.nodes.len()];
        let mut block = vec![1usize; self.nodes.len()];
        let mut fixed = Vec::new();
        let mut members: Vec<(usize, CouplingMember)> = Vec::new();
        for (id, node) in self.nodes.iter().enumerate() {
            let input = node.inputs.first().copied();
            let same_as_input = |space: &[usize]| space[input.expect("has an input")];
            match &node.op {
                Op::Input { .. } => {
                    space[id] = uf.fresh();
                    fixed.push(space[id]);
                }
                Op::Conv2d { in_channels, out_channels, groups, .. } => {
                    let i = input.expect("conv has an input");
                    if *groups > 1 && groups == in_channels && groups == out_channels {
                        space[id] = space[i];
                        members.push((space[i], CouplingMember { node: id, role: ChannelRole::Follows }));
                    } else {
                        space[id] = uf.fresh();
                        members.push((space[i], consumes(id, block[i])));
                        members.push((space[id], CouplingMember { node: id, role: ChannelRole::Produces }));
                        if *groups > 1 {
                            fixed.push(space[i]);
                            fixed.push(space[id]);
                        }
                    }
                }
                Op::Linear { .. } => {
                    let i = input.expect("linear has an input");
                    space[id] = uf.fresh();
                    members.push((space[i], consumes(id, block[i] * spatial(&shapes[i]))));
                    members.push((space[id], CouplingMember { node: id, role: ChannelRole::Produces }));
                }
                Op::BatchNorm2d { .. } => {
                    space[id] = same_as_input(&space);
                    block[id] = block[input.expect("has an input")];
                    members.push((space[id], CouplingMember { node: id, role: ChannelRole::Follows }));
                }
                Op::Flatten => {
                    let i = input.expect("flatten has an input");
                    space[id] = space[i];
                    block[id] = block[i] * spatial(&shapes[i]);
                }
                Op::Add => {
                    for &i in &node.inputs[1..] {
                        uf.union(space[node.inputs[0]], space[i]);
                    }
                    space[id] = space[node.inputs[0]];
                    block[id] = block[node.inputs[0]];
                }
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
                | Op::Pad { .. } => {
                    space[id] = same_as_input(&space);
                    block[id] = block[input.expect("has an input")];
                }
                Op::Mul => {
                    // Both factors carry the same channels (a squeeze-and-excitation scale is the
                    // excitation's output channels): removing one removes it from both.
                    uf.union(space[node.inputs[0]], space[node.inputs[1]]);
                    space[id] = space[node.inputs[0]];
                    block[id] = block[node.inputs[0]];
                }
                Op::Unflatten { .. } => {
                    // A vector `[c]` viewed as `[c, 1, 1]` keeps its channels; any other view
                    // mixes them with positions, so they stay.
                    let i = input.expect("unflatten has an input");
                    let per_channel = shapes[id].numel() == shapes[id].channels();
                    if per_channel && block[i] == 1 && shapes[i].channels() == shapes[id].channels() {
                        space[id] = space[i];
                        block[id] = block[i];
                    } else {
                        space[id] = uf.fresh();
                        fixed.push(space[id]);
                        fixed.push(space[i]);
                    }
                }
                Op::Lrn { .. } | Op::ChannelShuffle { .. } => {
                    // Each output channel depends on its neighbours (LRN) or is another input
                    // channel (shuffle): the channels on both sides stay.
                    let i = input.expect("has an input");
                    space[id] = uf.fresh();
                    fixed.push(space[id]);
                    fixed.push(space[i]);
                }
                Op::Concat => {
                    // Channels of a concatenation are not coupled to their sources yet: neither
                    // they nor the inputs' channels are removed.
                    space[id] = uf.fresh();
                    fixed.push(space[id]);
                    fixed.extend(node.inputs.iter().map(|&i| space[i]));
                }
            }
        }
        fixed.push(space[self.output]);

        let mut roots: Vec<usize> = Vec::new();
        let mut groups: Vec<CouplingGroup> = Vec::new();
        for id in 0..self.nodes.len() {
            let root = uf.find(space[id]);
            let g = match roots.iter().position(|&r| r == root) {
                Some(g) => g,
                None => {
                    roots.push(root);
                    groups.push(CouplingGroup {
                        channels: shapes[id].channels() / block[id],
                        members: Vec::new(),
                        carriers: Vec::new(),
                        prunable: true,
                    });
                    groups.len() - 1
                }
            };
            groups[g].carriers.push(id);
        }
        for (s, member) in members {
            let root = uf.find(s);
            let g = roots.iter().position(|&r| r == root).expect("every space has a carrier");
            groups[g].members.push(member);
        }
        for s in fixed {
            let root = uf.find(s);
            if let Some(g) = roots.iter().position(|&r| r == root) {
                groups[g].prunable = false;
            }
        }
        for g in &mut groups {
            g.members.sort_by_key(|m| m.node);
            if g.producers().next().is_none() {
                g.prunable = false;
            }
        }
        Ok(groups)
    }
}

fn consumes(node: NodeId, features_per_channel: usize) -> CouplingMember {
    CouplingMember { node, role: ChannelRole::Consumes { features_per_channel } }
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
        use super::{ConvParams, LinearParams, Params, builder::batch_norm_from};
        use burn::module::Param;
        let mut graph = self.clone();
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
            let n = channels.len();
            for member in &group.members {
                let node = &mut graph.nodes[member.node];
                let params = node.params.take().expect("coupling members carry parameters");
                let device = match &params {
                    Params::Conv(p) => p.weight.device(),
                    Params::Linear(p) => p.weight.device(),
                    Params::BatchNorm(bn) => bn.gamma.device(),
                };
                let axis0 = index_tensor(channels, &device);
                node.params = Some(match (member.role, params) {
                    (ChannelRole::Produces | ChannelRole::Follows, Params::Conv(p)) => {
                        if let Op::Conv2d { in_channels, out_channels, groups, .. } = &mut node.op {
                            *out_channels = n;
                            if member.role == ChannelRole::Follows {
                                (*in_channels, *groups) = (n, n);
                            }
                        }
                        Params::Conv(ConvParams {
                            weight: Param::from_tensor(p.weight.val().select(0, axis0.clone())),
                            bias: p.bias.map(|b| Param::from_tensor(b.val().select(0, axis0))),
                        })
                    }
                    (ChannelRole::Produces, Params::Linear(p)) => {
                        if let Op::Linear { out_features, .. } = &mut node.op {
                            *out_features = n;
                        }
                        Params::Linear(LinearParams {
                            weight: Param::from_tensor(p.weight.val().select(0, axis0.clone())),
                            bias: p.bias.map(|b| Param::from_tensor(b.val().select(0, axis0))),
                        })
                    }
                    (ChannelRole::Follows, Params::BatchNorm(bn)) => {
                        let (epsilon, momentum) = match node.op {
                            Op::BatchNorm2d { epsilon, momentum, .. } => (epsilon, momentum),
                            _ => unreachable!("batch-norm params belong to a batch-norm op"),
                        };
                        node.op = Op::BatchNorm2d { features: n, epsilon, momentum };
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
                        if let Op::Conv2d { in_channels, .. } = &mut node.op {
                            *in_channels = n * f;
                        }
                        let features: Vec<usize> = channels.iter().flat_map(|&c| c * f..(c + 1) * f).collect();
                        Params::Conv(ConvParams {
                            weight: Param::from_tensor(p.weight.val().select(1, index_tensor(&features, &device))),
                            bias: p.bias,
                        })
                    }
                    (ChannelRole::Consumes { features_per_channel: f }, Params::Linear(p)) => {
                        if let Op::Linear { in_features, .. } = &mut node.op {
                            *in_features = n * f;
                        }
                        let features: Vec<usize> = channels.iter().flat_map(|&c| c * f..(c + 1) * f).collect();
                        Params::Linear(LinearParams {
                            weight: Param::from_tensor(p.weight.val().select(1, index_tensor(&features, &device))),
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
            }
        }
        graph.validate()?;
        Ok(graph)
    }
}
