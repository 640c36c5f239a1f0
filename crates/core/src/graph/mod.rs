//! The graph IR: a network as an explicit list of named, typed nodes and the edges between them.
//!
//! Every compression technique is a pass over a [`Graph`]: structured pruning reads its channel
//! coupling from the edges ([`Graph::coupling_groups`]), quantization places observers on nodes
//! and folds batch norms, distillation taps features by node name
//! ([`Graph::forward_with_taps`]), and the CPU runtime freezes it.
//!
//! A `Graph` is a burn [`Module`]: its parameters are burn tensors, so burn's autodiff,
//! optimisers and module mappers work on it unchanged. The structure (names, ops and edges) is
//! plain data beside the parameters.
//!
//! # Invariants
//! - Nodes are stored in topological order: a node's inputs all have smaller indices.
//! - Node 0 is the single [`Op::Input`] node; [`Graph::output`] is the logits node.
//! - Names are unique, and every [`Op`] agrees with the shapes of its parameters
//!   ([`Graph::validate`] checks both).

mod builder;
mod coupling;
mod fold;

pub(crate) use builder::batch_norm_from;
pub use builder::{Conv2dSpec, GraphBuilder};
pub use coupling::{ChannelRole, CouplingGroup, CouplingMember};
pub use fold::BatchNormFold;

use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::nn::BatchNorm;
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, activation, module as F};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Index of a node in [`Graph::nodes`].
pub type NodeId = usize;

/// What a node computes. Channel counts live here, so the description of a graph is complete
/// without its tensors (model files store it as their header).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The graph input, images of `[channels, height, width]` (batch excluded).
    Input {
        /// Input channels.
        channels: usize,
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
    },
    /// 2-d convolution; weight `[out, in / groups, kh, kw]`, optional bias `[out]`.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels (filters).
        out_channels: usize,
        /// Kernel height and width.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Symmetric zero padding.
        padding: [usize; 2],
        /// Dilation.
        dilation: [usize; 2],
        /// Groups (1: dense; `in_channels`: depthwise).
        groups: usize,
        /// Whether the layer has a bias.
        bias: bool,
    },
    /// Batch normalisation over the channels of a feature map.
    BatchNorm2d {
        /// Channels.
        features: usize,
        /// Added to the variance.
        epsilon: f64,
        /// Running-statistics momentum.
        momentum: f64,
    },
    /// Fully connected layer; weight `[out, in]` (PyTorch's layout), optional bias `[out]`.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features (neurons).
        out_features: usize,
        /// Whether the layer has a bias.
        bias: bool,
    },
    /// Rectified linear unit.
    Relu,
    /// Max pooling.
    MaxPool2d {
        /// Window.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Symmetric padding.
        padding: [usize; 2],
    },
    /// Average pooling (padding counted in the divisor, as PyTorch's default).
    AvgPool2d {
        /// Window.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Symmetric padding.
        padding: [usize; 2],
    },
    /// Mean over the spatial axes: `[n, c, h, w] -> [n, c, 1, 1]`.
    GlobalAvgPool,
    /// `[n, c, h, w] -> [n, c * h * w]`, channel-major.
    Flatten,
    /// Element-wise sum of two or more inputs of the same shape (residual connections).
    Add,
    /// Passes its input through.
    Identity,
}

impl Op {
    /// Short lower-case name of the op kind, as in model-file headers.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Conv2d { .. } => "conv2d",
            Op::BatchNorm2d { .. } => "batch_norm2d",
            Op::Linear { .. } => "linear",
            Op::Relu => "relu",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::AvgPool2d { .. } => "avg_pool2d",
            Op::GlobalAvgPool => "global_avg_pool",
            Op::Flatten => "flatten",
            Op::Add => "add",
            Op::Identity => "identity",
        }
    }

    /// Whether the op carries parameters.
    pub fn has_params(&self) -> bool {
        matches!(self, Op::Conv2d { .. } | Op::BatchNorm2d { .. } | Op::Linear { .. })
    }
}

/// The shape of one value flowing along an edge, batch excluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueShape {
    /// A feature map `[channels, height, width]`.
    Map {
        /// Channels.
        channels: usize,
        /// Height.
        height: usize,
        /// Width.
        width: usize,
    },
    /// A feature vector `[features]`.
    Flat {
        /// Features.
        features: usize,
    },
}

impl ValueShape {
    /// Size of the channel axis (axis 1 with the batch).
    pub fn channels(&self) -> usize {
        match *self {
            ValueShape::Map { channels, .. } => channels,
            ValueShape::Flat { features } => features,
        }
    }

    /// Number of elements per sample.
    pub fn numel(&self) -> usize {
        match *self {
            ValueShape::Map { channels, height, width } => channels * height * width,
            ValueShape::Flat { features } => features,
        }
    }

    /// As a list of dimensions, batch excluded.
    pub fn dims(&self) -> Vec<usize> {
        match *self {
            ValueShape::Map { channels, height, width } => vec![channels, height, width],
            ValueShape::Flat { features } => vec![features],
        }
    }
}

/// Parameters of a convolution.
#[derive(Module, Debug)]
pub struct ConvParams {
    /// `[out, in / groups, kh, kw]`.
    pub weight: Param<Tensor<4>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
}

/// Parameters of a linear layer.
#[derive(Module, Debug)]
pub struct LinearParams {
    /// `[out, in]`.
    pub weight: Param<Tensor<2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<1>>>,
}

/// The parameters a node may carry. Batch norm reuses burn's own layer, running statistics and
/// train/eval switch included.
#[derive(Module, Debug)]
pub enum Params {
    /// A convolution's weight and bias.
    Conv(ConvParams),
    /// A linear layer's weight and bias.
    Linear(LinearParams),
    /// A batch norm's γ, β and running statistics.
    BatchNorm(BatchNorm),
}

/// One node: a name, what it computes, where its inputs come from, and its parameters.
#[derive(Module, Debug)]
pub struct Node {
    /// Parameters, for the ops that have them.
    pub params: Option<Params>,
    /// Unique name, used by configs (overrides, feature taps) and model files.
    #[module(skip)]
    pub name: String,
    /// What the node computes.
    #[module(skip)]
    pub op: Op,
    /// Producers of this node's inputs, in order.
    #[module(skip)]
    pub inputs: Vec<NodeId>,
}

/// A network as a graph of typed nodes; a burn [`Module`].
#[derive(Module, Debug)]
pub struct Graph {
    /// Nodes in topological order; node 0 is the input.
    pub nodes: Vec<Node>,
    /// The node whose value is the network's output (logits).
    #[module(skip)]
    pub output: NodeId,
}

/// A value during a forward pass.
#[derive(Clone, Debug)]
pub enum Activation {
    /// A feature map `[batch, channels, height, width]`.
    Map(Tensor<4>),
    /// A feature vector `[batch, features]`.
    Flat(Tensor<2>),
}

impl Activation {
    /// The value as a 2-d tensor `[batch, rest]` (feature maps are flattened channel-major).
    pub fn flatten(self) -> Tensor<2> {
        match self {
            Activation::Map(t) => t.flatten(1, 3),
            Activation::Flat(t) => t,
        }
    }

    /// The value as a feature map, if it is one.
    pub fn map(self) -> Option<Tensor<4>> {
        match self {
            Activation::Map(t) => Some(t),
            Activation::Flat(_) => None,
        }
    }

    fn add(self, other: Activation) -> Activation {
        match (self, other) {
            (Activation::Map(a), Activation::Map(b)) => Activation::Map(a + b),
            (a, b) => Activation::Flat(a.flatten() + b.flatten()),
        }
    }
}

impl Graph {
    /// The input shape `[channels, height, width]`.
    pub fn input_shape(&self) -> [usize; 3] {
        match self.nodes[0].op {
            Op::Input { channels, height, width } => [channels, height, width],
            _ => unreachable!("validated graphs start with an input node"),
        }
    }

    /// The number of outputs (classes) of the network.
    pub fn num_outputs(&self) -> usize {
        self.shapes().map(|s| s[self.output].channels()).unwrap_or(0)
    }

    /// The f32 weights of conv or linear node `id` (`[out, in/groups, kh, kw]` or `[out, in]`,
    /// row-major) and their shape; `None` for any other node.
    ///
    /// # Errors
    /// [`Error::TensorRead`] when the weights cannot be read.
    pub fn layer_weight(&self, id: NodeId) -> Result<Option<(Vec<f32>, Vec<usize>)>> {
        let weight = match &self.nodes[id].params {
            Some(Params::Conv(p)) => p.weight.val(),
            Some(Params::Linear(p)) => {
                return Ok(Some((crate::host::floats(p.weight.val())?, p.weight.dims().to_vec())));
            }
            _ => return Ok(None),
        };
        let dims = weight.dims().to_vec();
        Ok(Some((crate::host::floats(weight)?, dims)))
    }

    /// The weight shape of conv or linear node `id` (read from the tensor's metadata, not its
    /// values); `None` for any other node.
    pub fn layer_weight_shape(&self, id: NodeId) -> Option<Vec<usize>> {
        match &self.nodes[id].params {
            Some(Params::Conv(p)) => Some(p.weight.dims().to_vec()),
            Some(Params::Linear(p)) => Some(p.weight.dims().to_vec()),
            _ => None,
        }
    }

    /// Replaces the weights of conv or linear node `id` with `values` (same shape, row-major),
    /// on the device they were on.
    ///
    /// # Errors
    /// [`Error::InvalidGraph`] when `id` is not a conv or linear layer or the count differs.
    pub fn set_layer_weight(&mut self, id: NodeId, values: Vec<f32>) -> Result<()> {
        fn set<const D: usize>(w: &mut Param<Tensor<D>>, values: Vec<f32>, name: &str) -> Result<()> {
            let (dims, device) = (w.dims(), w.val().device());
            if dims.iter().product::<usize>() != values.len() {
                return Err(Error::graph(
                    name,
                    format!("{} weight values for a weight of shape {dims:?}", values.len()),
                ));
            }
            *w = Param::from_tensor(Tensor::from_data(burn::tensor::TensorData::new(values, dims), &device));
            Ok(())
        }
        let node = &mut self.nodes[id];
        match &mut node.params {
            Some(Params::Conv(p)) => set(&mut p.weight, values, &node.name),
            Some(Params::Linear(p)) => set(&mut p.weight, values, &node.name),
            _ => Err(Error::graph(&node.name, "weights set on a node that is not a conv or linear layer")),
        }
    }

    /// The bias of conv or linear node `id`: `None` for a layer without one or another node.
    ///
    /// # Errors
    /// [`Error::TensorRead`] when the bias cannot be read.
    pub fn layer_bias(&self, id: NodeId) -> Result<Option<Vec<f32>>> {
        let bias = match &self.nodes[id].params {
            Some(Params::Conv(p)) => p.bias.as_ref(),
            Some(Params::Linear(p)) => p.bias.as_ref(),
            _ => None,
        };
        bias.map(|b| crate::host::floats(b.val())).transpose()
    }

    /// Sets the bias of conv or linear node `id` (one value per output channel), giving the layer
    /// one if it had none.
    ///
    /// # Errors
    /// [`Error::InvalidGraph`] when `id` is not a conv or linear layer or the count differs.
    pub fn set_layer_bias(&mut self, id: NodeId, values: Vec<f32>) -> Result<()> {
        let node = &mut self.nodes[id];
        let (bias, weight_device, channels) = match &mut node.params {
            Some(Params::Conv(p)) => (&mut p.bias, p.weight.val().device(), p.weight.dims()[0]),
            Some(Params::Linear(p)) => (&mut p.bias, p.weight.val().device(), p.weight.dims()[0]),
            _ => return Err(Error::graph(&node.name, "a bias set on a node that is not a conv or linear layer")),
        };
        if values.len() != channels {
            return Err(Error::graph(
                &node.name,
                format!("{} bias values for {channels} output channels", values.len()),
            ));
        }
        *bias = Some(Param::from_tensor(Tensor::from_data(
            burn::tensor::TensorData::new(values, [channels]),
            &weight_device,
        )));
        if let Op::Conv2d { bias, .. } | Op::Linear { bias, .. } = &mut node.op {
            *bias = true;
        }
        Ok(())
    }

    /// The id of the node called `name`.
    ///
    /// # Errors
    /// [`Error::UnknownNode`] if there is none.
    pub fn node_id(&self, name: &str) -> Result<NodeId> {
        self.nodes.iter().position(|n| n.name == name).ok_or_else(|| Error::UnknownNode(name.to_string()))
    }

    /// The nodes whose inputs include `id`, in order.
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        (0..self.nodes.len()).filter(|&c| self.nodes[c].inputs.contains(&id)).collect()
    }

    /// The producers of `id`'s inputs.
    pub fn producers(&self, id: NodeId) -> &[NodeId] {
        &self.nodes[id].inputs
    }

    /// The nodes that carry parameters (conv, batch norm, linear), in order.
    pub fn layers(&self) -> impl Iterator<Item = (NodeId, &Node)> {
        self.nodes.iter().enumerate().filter(|(_, n)| n.params.is_some())
    }

    /// Output shape of every node (batch excluded), checking every edge on the way.
    ///
    /// # Errors
    /// [`Error::InvalidGraph`] naming the first node whose input does not fit its op.
    pub fn shapes(&self) -> Result<Vec<ValueShape>> {
        infer_shapes(self.nodes.iter().map(|n| (&n.name, &n.op, n.inputs.as_slice())))
    }

    /// Checks the invariants: topological order, unique names, one input node, shapes that fit,
    /// and parameters whose shapes agree with their ops.
    ///
    /// # Errors
    /// [`Error::InvalidGraph`] naming the node at fault.
    pub fn validate(&self) -> Result<()> {
        let mut seen = HashMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if seen.insert(node.name.as_str(), i).is_some() {
                return Err(Error::graph(&node.name, "duplicate node name"));
            }
            check_params(node)?;
        }
        if self.output >= self.nodes.len() {
            return Err(Error::graph("<output>", format!("output id {} out of range", self.output)));
        }
        self.shapes()?;
        Ok(())
    }

    /// Runs the network on a batch of images `[batch, channels, height, width]`; returns the
    /// output of [`Graph::output`] as `[batch, outputs]`.
    ///
    /// # Shapes
    /// - input: `[batch, channels, height, width]` as [`Graph::input_shape`]
    /// - output: `[batch, num_outputs]`
    ///
    /// # Panics
    /// If the input's shape is not the graph's (burn panics on shape mismatches); check it first
    /// with [`Graph::check_input`] where the input comes from outside.
    pub fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        self.forward_with_taps(input, &[]).0
    }

    /// Checks that `dims` is `[batch, channels, height, width]` with the graph's input shape.
    ///
    /// # Errors
    /// [`Error::InputShape`] otherwise.
    pub fn check_input(&self, dims: &[usize]) -> Result<()> {
        let expected = self.input_shape();
        if dims.len() != 4 || dims[1..] != expected || dims[0] == 0 {
            return Err(Error::InputShape { got: dims.to_vec(), expected });
        }
        Ok(())
    }

    /// Runs the network and also returns the values of the `taps` nodes, in the order asked.
    /// This is how distillation reads features and how calibration observes activations.
    ///
    /// # Panics
    /// As [`Graph::forward`]; a tap id out of range also panics (ids come from
    /// [`Graph::node_id`]).
    pub fn forward_with_taps(&self, input: Tensor<4>, taps: &[NodeId]) -> (Tensor<2>, Vec<Activation>) {
        self.forward_hooked(input, taps, &mut |_, x| x)
    }

    /// As [`Graph::forward_with_taps`], with `layer_input(node, x)` applied to the input of
    /// every convolution and linear layer before the layer runs: how quantization observes the
    /// values its integer kernels will see (calibration) and simulates their rounding
    /// (fake-quant), without changing what the other consumers of the same value read.
    ///
    /// # Panics
    /// As [`Graph::forward_with_taps`].
    pub fn forward_hooked(
        &self,
        input: Tensor<4>,
        taps: &[NodeId],
        layer_input: &mut dyn FnMut(NodeId, Activation) -> Activation,
    ) -> (Tensor<2>, Vec<Activation>) {
        struct Inputs<'a>(&'a mut dyn FnMut(NodeId, Activation) -> Activation);
        impl ForwardHooks for Inputs<'_> {
            fn layer_input(&mut self, node: NodeId, x: Activation) -> Activation {
                (self.0)(node, x)
            }
        }
        self.forward_with_hooks(input, taps, &mut Inputs(layer_input))
    }

    /// As [`Graph::forward_hooked`], with every hook of [`ForwardHooks`]: also the weights of
    /// convolutions and linear layers can be replaced by a function of them (quantization-aware
    /// training fake-quantizes them there, and gradients flow through the hook to the weights).
    ///
    /// # Panics
    /// As [`Graph::forward_with_taps`].
    pub fn forward_with_hooks(
        &self,
        input: Tensor<4>,
        taps: &[NodeId],
        hooks: &mut dyn ForwardHooks,
    ) -> (Tensor<2>, Vec<Activation>) {
        // Count uses so that each intermediate value is dropped as soon as its last consumer ran.
        let mut uses = vec![0usize; self.nodes.len()];
        for node in &self.nodes {
            for &i in &node.inputs {
                uses[i] += 1;
            }
        }
        uses[self.output] += 1;
        for &t in taps {
            uses[t] += 1;
        }
        let mut values: Vec<Option<Activation>> = vec![None; self.nodes.len()];
        let mut tapped: Vec<Option<Activation>> = vec![None; taps.len()];
        let mut input = Some(input);
        for (id, node) in self.nodes.iter().enumerate() {
            let mut args: Vec<Activation> = node
                .inputs
                .iter()
                .map(|&i| {
                    uses[i] -= 1;
                    if uses[i] == 0 { values[i].take() } else { values[i].clone() }
                        .expect("topological order guarantees inputs are computed")
                })
                .collect();
            if matches!(node.op, Op::Conv2d { .. } | Op::Linear { .. }) {
                let x = args.remove(0);
                args.insert(0, hooks.layer_input(id, x));
            }
            let out = match &node.op {
                Op::Input { .. } => Activation::Map(input.take().expect("one input node")),
                op => apply(op, node.params.as_ref(), args, id, hooks),
            };
            for (k, &t) in taps.iter().enumerate() {
                if t == id {
                    tapped[k] = Some(out.clone());
                    uses[id] -= 1;
                }
            }
            if uses[id] > 0 {
                values[id] = Some(out);
            }
        }
        let logits = values[self.output].take().expect("output computed").flatten();
        (logits, tapped.into_iter().map(|t| t.expect("tap computed")).collect())
    }

    /// The graph on another device (a deep copy of the parameters).
    pub fn on_device(&self, device: &Device) -> Graph {
        self.clone().to_device(device)
    }
}

/// Hooks into [`Graph::forward_with_hooks`]; each defaults to passing its value through.
pub trait ForwardHooks {
    /// The input of convolution or linear layer `node`, before the layer reads it.
    fn layer_input(&mut self, _node: NodeId, x: Activation) -> Activation {
        x
    }
    /// The weight `[out, in / groups, kh, kw]` of convolution `node`, as the layer uses it.
    fn conv_weight(&mut self, _node: NodeId, w: Tensor<4>) -> Tensor<4> {
        w
    }
    /// The weight `[out, in]` of linear layer `node`, as the layer uses it.
    fn linear_weight(&mut self, _node: NodeId, w: Tensor<2>) -> Tensor<2> {
        w
    }
}

fn apply(
    op: &Op,
    params: Option<&Params>,
    mut args: Vec<Activation>,
    id: NodeId,
    hooks: &mut dyn ForwardHooks,
) -> Activation {
    let first = || -> Activation { args[0].clone() };
    match (op, params) {
        (Op::Conv2d { stride, padding, dilation, groups, .. }, Some(Params::Conv(p))) => {
            let x = first().map().expect("conv input is a feature map");
            let options = ConvOptions::new(*stride, *padding, *dilation, *groups);
            let w = hooks.conv_weight(id, p.weight.val());
            Activation::Map(F::conv2d(x, w, p.bias.as_ref().map(|b| b.val()), options))
        }
        (Op::BatchNorm2d { .. }, Some(Params::BatchNorm(bn))) => match first() {
            Activation::Map(x) => Activation::Map(bn.forward(x)),
            Activation::Flat(x) => Activation::Flat(bn.forward(x)),
        },
        (Op::Linear { .. }, Some(Params::Linear(p))) => {
            let x = first().flatten();
            let y = x.matmul(hooks.linear_weight(id, p.weight.val()).transpose());
            Activation::Flat(match &p.bias {
                Some(b) => y + b.val().unsqueeze::<2>(),
                None => y,
            })
        }
        (Op::Relu, _) => match first() {
            Activation::Map(x) => Activation::Map(activation::relu(x)),
            Activation::Flat(x) => Activation::Flat(activation::relu(x)),
        },
        (Op::MaxPool2d { kernel, stride, padding }, _) => {
            let x = first().map().expect("pool input is a feature map");
            let options = MaxPoolOptions::new(*kernel).with_stride(*stride).with_padding(*padding);
            Activation::Map(F::max_pool2d(x, options))
        }
        (Op::AvgPool2d { kernel, stride, padding }, _) => {
            let x = first().map().expect("pool input is a feature map");
            let options = AvgPoolOptions::new(*kernel).with_stride(*stride).with_padding(*padding);
            Activation::Map(F::avg_pool2d(x, options))
        }
        (Op::GlobalAvgPool, _) => {
            let x = first().map().expect("pool input is a feature map");
            Activation::Map(F::adaptive_avg_pool2d(x, [1, 1]))
        }
        (Op::Flatten, _) => Activation::Flat(first().flatten()),
        (Op::Add, _) => {
            let mut acc = args.remove(0);
            for a in args {
                acc = acc.add(a);
            }
            acc
        }
        (Op::Identity, _) => first(),
        (op, _) => unreachable!("validated graph: {} has matching params", op.kind()),
    }
}

/// Shape inference over `(name, op, inputs)` triples in topological order.
pub(crate) fn infer_shapes<'a>(
    nodes: impl Iterator<Item = (&'a String, &'a Op, &'a [NodeId])>,
) -> Result<Vec<ValueShape>> {
    let mut shapes: Vec<ValueShape> = Vec::new();
    for (id, (name, op, inputs)) in nodes.enumerate() {
        if let Some(&bad) = inputs.iter().find(|&&i| i >= id) {
            return Err(Error::graph(name, format!("input {bad} is not an earlier node")));
        }
        let arity = match op {
            Op::Input { .. } => 0,
            Op::Add => inputs.len().max(2),
            _ => 1,
        };
        if inputs.len() != arity {
            return Err(Error::graph(name, format!("{} takes {arity} input(s), got {}", op.kind(), inputs.len())));
        }
        if id == 0 && !matches!(op, Op::Input { .. }) {
            return Err(Error::graph(name, "the first node must be the input"));
        }
        if id > 0 && matches!(op, Op::Input { .. }) {
            return Err(Error::graph(name, "only the first node may be an input"));
        }
        let ins: Vec<ValueShape> = inputs.iter().map(|&i| shapes[i]).collect();
        let map_input = |what: &str| -> Result<(usize, usize, usize)> {
            match ins[0] {
                ValueShape::Map { channels, height, width } => Ok((channels, height, width)),
                ValueShape::Flat { .. } => {
                    Err(Error::graph(name, format!("{what} needs a feature map, got a flat vector")))
                }
            }
        };
        let out = match op {
            Op::Input { channels, height, width } => {
                if *channels == 0 || *height == 0 || *width == 0 {
                    return Err(Error::graph(name, "input dimensions must be positive"));
                }
                ValueShape::Map { channels: *channels, height: *height, width: *width }
            }
            Op::Conv2d { in_channels, out_channels, kernel, stride, padding, dilation, groups, .. } => {
                let (c, h, w) = map_input("conv2d")?;
                if c != *in_channels {
                    return Err(Error::graph(name, format!("expects {in_channels} input channels, gets {c}")));
                }
                if *groups == 0 || in_channels % groups != 0 || out_channels % groups != 0 || *out_channels == 0 {
                    return Err(Error::graph(
                        name,
                        format!("groups {groups} must divide in {in_channels} and out {out_channels} channels"),
                    ));
                }
                if stride.contains(&0) || dilation.contains(&0) || kernel.contains(&0) {
                    return Err(Error::graph(name, "kernel, stride and dilation must be positive"));
                }
                let height = conv_out(h, kernel[0], stride[0], padding[0], dilation[0])
                    .ok_or_else(|| Error::graph(name, format!("kernel does not fit height {h}")))?;
                let width = conv_out(w, kernel[1], stride[1], padding[1], dilation[1])
                    .ok_or_else(|| Error::graph(name, format!("kernel does not fit width {w}")))?;
                ValueShape::Map { channels: *out_channels, height, width }
            }
            Op::BatchNorm2d { features, epsilon, momentum } => {
                let (c, _, _) = map_input("batch_norm2d")?;
                if c != *features {
                    return Err(Error::graph(name, format!("has {features} features, input has {c} channels")));
                }
                if !(epsilon.is_finite() && *epsilon > 0.0 && (0.0..=1.0).contains(momentum)) {
                    return Err(Error::graph(name, "epsilon must be > 0 and momentum in [0, 1]"));
                }
                ins[0]
            }
            Op::Linear { in_features, out_features, .. } => {
                let n = ins[0].numel();
                if n != *in_features || *out_features == 0 {
                    return Err(Error::graph(name, format!("expects {in_features} input features, gets {n}")));
                }
                ValueShape::Flat { features: *out_features }
            }
            Op::Relu | Op::Identity => ins[0],
            Op::MaxPool2d { kernel, stride, padding } | Op::AvgPool2d { kernel, stride, padding } => {
                let (c, h, w) = map_input(op.kind())?;
                if stride.contains(&0) || kernel.contains(&0) {
                    return Err(Error::graph(name, "kernel and stride must be positive"));
                }
                if padding[0] * 2 > kernel[0] || padding[1] * 2 > kernel[1] {
                    return Err(Error::graph(name, "padding must be at most half the window"));
                }
                let height = conv_out(h, kernel[0], stride[0], padding[0], 1)
                    .ok_or_else(|| Error::graph(name, format!("window does not fit height {h}")))?;
                let width = conv_out(w, kernel[1], stride[1], padding[1], 1)
                    .ok_or_else(|| Error::graph(name, format!("window does not fit width {w}")))?;
                ValueShape::Map { channels: c, height, width }
            }
            Op::GlobalAvgPool => {
                let (c, _, _) = map_input("global_avg_pool")?;
                ValueShape::Map { channels: c, height: 1, width: 1 }
            }
            Op::Flatten => ValueShape::Flat { features: ins[0].numel() },
            Op::Add => {
                if ins.iter().any(|s| *s != ins[0]) {
                    let all: Vec<_> = ins.iter().map(|s| s.dims()).collect();
                    return Err(Error::graph(name, format!("add inputs differ in shape: {all:?}")));
                }
                ins[0]
            }
        };
        shapes.push(out);
    }
    if shapes.is_empty() {
        return Err(Error::graph("<graph>", "a graph needs at least an input node"));
    }
    Ok(shapes)
}

fn conv_out(size: usize, kernel: usize, stride: usize, padding: usize, dilation: usize) -> Option<usize> {
    let span = dilation * (kernel - 1) + 1;
    let padded = size + 2 * padding;
    (padded >= span).then(|| (padded - span) / stride + 1)
}

fn check_params(node: &Node) -> Result<()> {
    let bad = |what: String| Err(Error::graph(&node.name, what));
    match (&node.op, &node.params) {
        (Op::Conv2d { in_channels, out_channels, kernel, groups, bias, .. }, Some(Params::Conv(p))) => {
            let expected = [*out_channels, in_channels / groups.max(&1), kernel[0], kernel[1]];
            if p.weight.dims() != expected {
                return bad(format!("weight shape {:?}, op says {expected:?}", p.weight.dims()));
            }
            check_bias(node, *bias, p.bias.as_ref(), *out_channels)
        }
        (Op::Linear { in_features, out_features, bias }, Some(Params::Linear(p))) => {
            let expected = [*out_features, *in_features];
            if p.weight.dims() != expected {
                return bad(format!("weight shape {:?}, op says {expected:?}", p.weight.dims()));
            }
            check_bias(node, *bias, p.bias.as_ref(), *out_features)
        }
        (Op::BatchNorm2d { features, .. }, Some(Params::BatchNorm(bn))) => {
            let dims = [bn.gamma.dims()[0], bn.beta.dims()[0]];
            if dims != [*features; 2] {
                return bad(format!("gamma/beta have {dims:?} entries, op says {features}"));
            }
            Ok(())
        }
        (op, None) if !op.has_params() => Ok(()),
        (op, _) => bad(format!("{} has parameters of the wrong kind or none", op.kind())),
    }
}

fn check_bias(node: &Node, has_bias: bool, bias: Option<&Param<Tensor<1>>>, out: usize) -> Result<()> {
    match (has_bias, bias) {
        (false, None) => Ok(()),
        (true, Some(b)) if b.dims() == [out] => Ok(()),
        _ => Err(Error::graph(&node.name, "bias does not match the op")),
    }
}
