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
use burn::tensor::ops::{AvgPoolOptions, ConvOptions, MaxPoolOptions, PadMode as BurnPadMode};
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
    /// Max pooling (padding never wins: it is minus infinity).
    MaxPool2d {
        /// Window.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Padding at the top and left (and at the bottom and right unless `padding_end` says
        /// otherwise).
        padding: [usize; 2],
        /// Padding at the bottom and right where it differs from `padding`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        padding_end: Option<[usize; 2]>,
        /// Spacing of the window's taps.
        #[serde(default = "unit_pair", skip_serializing_if = "is_unit_pair")]
        dilation: [usize; 2],
        /// Output size rounded up (a last, partial window) instead of down.
        #[serde(default, skip_serializing_if = "is_false")]
        ceil_mode: bool,
    },
    /// Average pooling.
    AvgPool2d {
        /// Window.
        kernel: [usize; 2],
        /// Stride.
        stride: [usize; 2],
        /// Padding at the top and left (and at the bottom and right unless `padding_end` says
        /// otherwise).
        padding: [usize; 2],
        /// Padding at the bottom and right where it differs from `padding`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        padding_end: Option<[usize; 2]>,
        /// Output size rounded up (a last, partial window) instead of down.
        #[serde(default, skip_serializing_if = "is_false")]
        ceil_mode: bool,
        /// Whether padding counts in the divisor (PyTorch's default; ONNX's is not to).
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        count_include_pad: bool,
    },
    /// Mean over the spatial axes: `[n, c, h, w] -> [n, c, 1, 1]`.
    GlobalAvgPool,
    /// `[n, c, h, w] -> [n, c * h * w]`, channel-major.
    Flatten,
    /// Element-wise sum of two or more inputs of the same shape (residual connections).
    Add,
    /// Passes its input through.
    Identity,
    /// `min(max(x, min), max)` element-wise (ReLU6 is `min = 0, max = 6`).
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// `1 / (1 + e^−x)` element-wise.
    Sigmoid,
    /// `max(0, min(1, alpha · x + beta))` element-wise (ONNX's HardSigmoid).
    HardSigmoid {
        /// Slope.
        alpha: f32,
        /// Offset.
        beta: f32,
    },
    /// `x · max(0, min(1, x / 6 + 1/2))` element-wise (MobileNetV3's h-swish).
    HardSwish,
    /// `x` where `x > 0`, else `alpha · x`.
    LeakyRelu {
        /// Slope of the negative part.
        alpha: f32,
    },
    /// Element-wise product of two inputs: of the same shape, or a feature map and one value per
    /// channel (`[c, 1, 1]`, broadcast over the map: squeeze-and-excitation).
    Mul,
    /// Concatenation along the channels (feature maps of equal height and width) or the features
    /// (vectors).
    Concat,
    /// Softmax over the features of a vector.
    Softmax,
    /// Padding of a feature map's height and width.
    Pad {
        /// Rows and columns added at the top and left.
        begin: [usize; 2],
        /// Rows and columns added at the bottom and right.
        end: [usize; 2],
        /// What the new pixels hold.
        mode: PadMode,
    },
    /// Local response normalisation across channels (AlexNet, GoogLeNet):
    /// `x / (bias + alpha / size · Σ x²)^beta`, the sum over the `size` channels around each one.
    Lrn {
        /// Channels in the window.
        size: usize,
        /// Scale of the sum.
        alpha: f32,
        /// Exponent.
        beta: f32,
        /// Offset.
        bias: f32,
    },
    /// The same values, in the same order, as a feature map (a vector `[c]` becomes `[c, 1, 1]`).
    Unflatten {
        /// Channels.
        channels: usize,
        /// Height.
        height: usize,
        /// Width.
        width: usize,
    },
    /// ShuffleNet's channel shuffle: the channels, seen as `[groups, c / groups]`, transposed to
    /// `[c / groups, groups]`.
    ChannelShuffle {
        /// Groups.
        groups: usize,
    },
}

/// What [`Op::Pad`] fills the new pixels with.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PadMode {
    /// A constant.
    Constant {
        /// The value.
        value: f32,
    },
    /// The image mirrored at its border, the border pixel itself not repeated.
    Reflect,
    /// The border pixel repeated.
    Edge,
}

fn unit_pair() -> [usize; 2] {
    [1, 1]
}
fn is_unit_pair(v: &[usize; 2]) -> bool {
    *v == [1, 1]
}
fn is_false(v: &bool) -> bool {
    !*v
}
fn yes() -> bool {
    true
}
fn is_true(v: &bool) -> bool {
    *v
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
            Op::Clip { .. } => "clip",
            Op::Sigmoid => "sigmoid",
            Op::HardSigmoid { .. } => "hard_sigmoid",
            Op::HardSwish => "hard_swish",
            Op::LeakyRelu { .. } => "leaky_relu",
            Op::Mul => "mul",
            Op::Concat => "concat",
            Op::Softmax => "softmax",
            Op::Pad { .. } => "pad",
            Op::Lrn { .. } => "lrn",
            Op::Unflatten { .. } => "unflatten",
            Op::ChannelShuffle { .. } => "channel_shuffle",
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
                op @ (Op::Conv2d { .. } | Op::Linear { .. }) => {
                    let y = apply(op, node.params.as_ref(), args, id, hooks);
                    hooks.layer_output(id, y)
                }
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
    /// The output of convolution or linear layer `node`, before its consumers read it.
    fn layer_output(&mut self, _node: NodeId, y: Activation) -> Activation {
        y
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
        (Op::MaxPool2d { kernel, stride, padding, padding_end, dilation, ceil_mode }, _) => {
            let x = first().map().expect("pool input is a feature map");
            let options = MaxPoolOptions::new(*kernel)
                .with_stride(*stride)
                .with_padding_pairs(pad_pairs(*padding, *padding_end))
                .with_dilation(*dilation)
                .with_ceil_mode(*ceil_mode);
            Activation::Map(F::max_pool2d(x, options))
        }
        (Op::AvgPool2d { kernel, stride, padding, padding_end, ceil_mode, count_include_pad }, _) => {
            let x = first().map().expect("pool input is a feature map");
            let options = AvgPoolOptions::new(*kernel)
                .with_stride(*stride)
                .with_padding_pairs(pad_pairs(*padding, *padding_end))
                .with_ceil_mode(*ceil_mode)
                .with_count_include_pad(*count_include_pad);
            Activation::Map(F::avg_pool2d(x, options))
        }
        (Op::Pad { begin, end, mode }, _) => {
            let x = first().map().expect("pad input is a feature map");
            let pairs = [(begin[0], end[0]), (begin[1], end[1])];
            let mode = match *mode {
                PadMode::Constant { value } => BurnPadMode::Constant(value),
                PadMode::Reflect => BurnPadMode::Reflect,
                PadMode::Edge => BurnPadMode::Edge,
            };
            Activation::Map(x.pad(pairs, mode))
        }
        (Op::Lrn { size, alpha, beta, bias }, _) => {
            let x = first().map().expect("lrn input is a feature map");
            Activation::Map(local_response_norm(x, *size, *alpha, *beta, *bias))
        }
        (Op::Unflatten { channels, height, width }, _) => {
            let x = first().flatten();
            let batch = x.dims()[0];
            Activation::Map(x.reshape([batch, *channels, *height, *width]))
        }
        (Op::ChannelShuffle { groups }, _) => {
            let x = first().map().expect("channel shuffle input is a feature map");
            let [n, c, h, w] = x.dims();
            let y = x.reshape([n, *groups, c / groups, h * w]).swap_dims(1, 2);
            Activation::Map(y.reshape([n, c, h, w]))
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
        (Op::Clip { min, max }, _) => elementwise(first(), |x| x.clamp(*min, *max)),
        (Op::Sigmoid, _) => elementwise(first(), activation::sigmoid),
        (Op::HardSigmoid { alpha, beta }, _) => elementwise(first(), |x| hard_sigmoid(x, *alpha, *beta)),
        (Op::HardSwish, _) => elementwise(first(), |x| x.clone() * hard_sigmoid(x, 1.0 / 6.0, 0.5)),
        (Op::LeakyRelu { alpha }, _) => elementwise(first(), |x| activation::leaky_relu(x, *alpha as f64)),
        (Op::Mul, _) => {
            let b = args.remove(1);
            match (args.remove(0), b) {
                // Broadcasting: `[n, c, 1, 1]` scales every pixel of its channel.
                (Activation::Map(a), Activation::Map(b)) => Activation::Map(a * b),
                (a, b) => Activation::Flat(a.flatten() * b.flatten()),
            }
        }
        (Op::Concat, _) => match args[0] {
            Activation::Map(_) => {
                Activation::Map(Tensor::cat(args.into_iter().filter_map(Activation::map).collect(), 1))
            }
            Activation::Flat(_) => {
                Activation::Flat(Tensor::cat(args.into_iter().map(Activation::flatten).collect(), 1))
            }
        },
        (Op::Softmax, _) => Activation::Flat(activation::softmax(first().flatten(), 1)),
        (op, _) => unreachable!("validated graph: {} has matching params", op.kind()),
    }
}

/// `f` on the value, whichever its rank.
fn elementwise(x: Activation, f: impl Fn(Tensor<4>) -> Tensor<4>) -> Activation {
    match x {
        Activation::Map(t) => Activation::Map(f(t)),
        Activation::Flat(t) => {
            let [b, n] = t.dims();
            Activation::Flat(f(t.reshape([b, n, 1, 1])).reshape([b, n]))
        }
    }
}

/// `(begin, end)` padding pairs from a begin padding and an optional different end.
fn pad_pairs(begin: [usize; 2], end: Option<[usize; 2]>) -> [(usize, usize); 2] {
    let end = end.unwrap_or(begin);
    [(begin[0], end[0]), (begin[1], end[1])]
}

/// `x / (bias + alpha / size · Σ x²)^beta` over a window of `size` channels: `(size − 1) / 2`
/// before each channel and the rest after it, as ONNX defines it. The window sum is an average
/// pool over the channel axis (zero padding counted), times `size`.
fn local_response_norm(x: Tensor<4>, size: usize, alpha: f32, beta: f32, bias: f32) -> Tensor<4> {
    let [n, c, h, w] = x.dims();
    let before = (size - 1) / 2;
    let squares = (x.clone() * x.clone()).reshape([n, 1, c, h * w]);
    let options =
        AvgPoolOptions::new([size, 1]).with_stride([1, 1]).with_padding_pairs([(before, size - 1 - before), (0, 0)]);
    let mean = F::avg_pool2d(squares, options).reshape([n, c, h, w]);
    // alpha / size · Σ = alpha · mean.
    x / mean.mul_scalar(alpha).add_scalar(bias).powf_scalar(beta)
}

/// `max(0, min(1, alpha · x + beta))`.
fn hard_sigmoid(x: Tensor<4>, alpha: f32, beta: f32) -> Tensor<4> {
    x.mul_scalar(alpha).add_scalar(beta).clamp(0.0, 1.0)
}

/// Shape inference over `(name, op, inputs)` triples in topological order.
pub(crate) fn infer_shapes<'a>(
    nodes: impl Iterator<Item = (&'a String, &'a Op, &'a [NodeId])>,
) -> Result<Vec<ValueShape>> {
    let mut shapes: Vec<ValueShape> = Vec::new();
    for (id, (name, op, inputs)) in nodes.enumerate() {
        let out = node_shape(id, name, op, inputs, &shapes)?;
        shapes.push(out);
    }
    if shapes.is_empty() {
        return Err(Error::graph("<graph>", "a graph needs at least an input node"));
    }
    Ok(shapes)
}

/// The output shape of node `id` (`name`, `op`, `inputs`) given the shapes of the nodes before
/// it: one step of [`infer_shapes`], so that a builder adding nodes one by one stays linear.
pub(crate) fn node_shape(
    id: NodeId,
    name: &str,
    op: &Op,
    inputs: &[NodeId],
    shapes: &[ValueShape],
) -> Result<ValueShape> {
    if let Some(&bad) = inputs.iter().find(|&&i| i >= id) {
        return Err(Error::graph(name, format!("input {bad} is not an earlier node")));
    }
    let arity = match op {
        Op::Input { .. } => 0,
        Op::Add | Op::Concat => inputs.len().max(2),
        Op::Mul => 2,
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
        Op::Relu | Op::Identity | Op::Sigmoid | Op::HardSwish => ins[0],
        Op::Clip { min, max } => {
            if !(min.is_finite() && max.is_finite() && min <= max) {
                return Err(Error::graph(name, format!("clip bounds [{min}, {max}] must be finite and ordered")));
            }
            ins[0]
        }
        Op::HardSigmoid { alpha, beta } => {
            if !(alpha.is_finite() && beta.is_finite()) {
                return Err(Error::graph(name, "hard_sigmoid alpha and beta must be finite"));
            }
            ins[0]
        }
        Op::LeakyRelu { alpha } => {
            if !alpha.is_finite() {
                return Err(Error::graph(name, "leaky_relu alpha must be finite"));
            }
            ins[0]
        }
        Op::Mul => {
            let per_channel = matches!((ins[0], ins[1]),
                (ValueShape::Map { channels: c, .. }, ValueShape::Map { channels, height: 1, width: 1 }) if c == channels);
            if ins[0] != ins[1] && !per_channel {
                return Err(Error::graph(
                    name,
                    format!(
                        "mul takes equal shapes or a map and [c, 1, 1], got {:?} and {:?}",
                        ins[0].dims(),
                        ins[1].dims()
                    ),
                ));
            }
            ins[0]
        }
        Op::Concat => match ins[0] {
            ValueShape::Map { height, width, .. } => {
                if ins
                    .iter()
                    .any(|s| !matches!(*s, ValueShape::Map { height: h, width: w, .. } if (h, w) == (height, width)))
                {
                    let all: Vec<_> = ins.iter().map(|s| s.dims()).collect();
                    return Err(Error::graph(name, format!("concat inputs differ in height or width: {all:?}")));
                }
                ValueShape::Map { channels: ins.iter().map(|s| s.channels()).sum(), height, width }
            }
            ValueShape::Flat { .. } => {
                if ins.iter().any(|s| matches!(s, ValueShape::Map { .. })) {
                    return Err(Error::graph(name, "concat of vectors and feature maps"));
                }
                ValueShape::Flat { features: ins.iter().map(|s| s.numel()).sum() }
            }
        },
        Op::Softmax => ValueShape::Flat { features: ins[0].numel() },
        Op::MaxPool2d { .. } | Op::AvgPool2d { .. } => {
            let (c, h, w) = map_input(op.kind())?;
            let window = PoolWindow::of(op).expect("a pool");
            let [height, width] = window.output([h, w]).map_err(|e| Error::graph(name, e))?;
            ValueShape::Map { channels: c, height, width }
        }
        Op::Pad { begin, end, mode } => {
            let (c, h, w) = map_input("pad")?;
            match mode {
                PadMode::Constant { value } if !value.is_finite() => {
                    return Err(Error::graph(name, "the padding value must be finite"));
                }
                PadMode::Reflect if begin[0].max(end[0]) >= h || begin[1].max(end[1]) >= w => {
                    return Err(Error::graph(name, format!("reflect padding must be smaller than {h}×{w}")));
                }
                _ => {}
            }
            ValueShape::Map { channels: c, height: h + begin[0] + end[0], width: w + begin[1] + end[1] }
        }
        Op::Lrn { size, alpha, beta, bias } => {
            map_input("lrn")?;
            if *size == 0 || !(alpha.is_finite() && beta.is_finite() && bias.is_finite()) {
                return Err(Error::graph(name, "lrn needs a positive size and finite alpha, beta and bias"));
            }
            ins[0]
        }
        Op::Unflatten { channels, height, width } => {
            if channels * height * width != ins[0].numel() || *channels == 0 {
                return Err(Error::graph(
                    name,
                    format!("cannot view {:?} as [{channels}, {height}, {width}]", ins[0].dims()),
                ));
            }
            ValueShape::Map { channels: *channels, height: *height, width: *width }
        }
        Op::ChannelShuffle { groups } => {
            let (c, _, _) = map_input("channel_shuffle")?;
            if *groups == 0 || c % groups != 0 {
                return Err(Error::graph(name, format!("{groups} groups do not divide {c} channels")));
            }
            ins[0]
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
    Ok(out)
}

/// The geometry of a max or average pool, all of ONNX's attributes included; shared by shape
/// inference and the CPU plan's kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolWindow {
    /// Window.
    pub kernel: [usize; 2],
    /// Stride.
    pub stride: [usize; 2],
    /// Padding at the top and left.
    pub begin: [usize; 2],
    /// Padding at the bottom and right.
    pub end: [usize; 2],
    /// Spacing of the taps.
    pub dilation: [usize; 2],
    /// Output size rounded up.
    pub ceil_mode: bool,
}

impl PoolWindow {
    /// The window of a pooling op; `None` for any other op.
    pub fn of(op: &Op) -> Option<PoolWindow> {
        let (kernel, stride, padding, padding_end, dilation, ceil_mode) = match *op {
            Op::MaxPool2d { kernel, stride, padding, padding_end, dilation, ceil_mode } => {
                (kernel, stride, padding, padding_end, dilation, ceil_mode)
            }
            Op::AvgPool2d { kernel, stride, padding, padding_end, ceil_mode, .. } => {
                (kernel, stride, padding, padding_end, [1, 1], ceil_mode)
            }
            _ => return None,
        };
        Some(PoolWindow { kernel, stride, begin: padding, end: padding_end.unwrap_or(padding), dilation, ceil_mode })
    }

    /// Output `[height, width]` for an input of `size`. With `ceil_mode` a last window that would
    /// start in the end padding is dropped (PyTorch's and ONNX's rule).
    ///
    /// # Errors
    /// A message when the window is empty, a padding is not smaller than the window, or the
    /// window does not fit.
    pub fn output(&self, size: [usize; 2]) -> std::result::Result<[usize; 2], String> {
        let mut out = [0; 2];
        for a in 0..2 {
            let (k, s, d) = (self.kernel[a], self.stride[a], self.dilation[a]);
            if k == 0 || s == 0 || d == 0 {
                return Err("kernel, stride and dilation must be positive".into());
            }
            let span = d * (k - 1) + 1;
            if self.begin[a] >= span || self.end[a] >= span {
                return Err(format!("padding {:?}/{:?} must be smaller than the window {span}", self.begin, self.end));
            }
            let padded = size[a] + self.begin[a] + self.end[a];
            if padded < span {
                return Err(format!("window {span} does not fit {} (padded)", padded));
            }
            let steps = if self.ceil_mode { (padded - span).div_ceil(s) } else { (padded - span) / s };
            let mut n = steps + 1;
            if self.ceil_mode && (n - 1) * s >= size[a] + self.begin[a] {
                n -= 1;
            }
            out[a] = n;
        }
        Ok(out)
    }
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
