//! A readable way to describe a network as a [`Graph`].

use burn::module::{Param, RunningState};
use burn::nn::{BatchNorm, BatchNormConfig};
use burn::tensor::{Device, Distribution, Tensor};

use super::{ConvParams, Graph, LinearParams, Node, NodeId, Op, Params, ValueShape, node_shape};
use crate::init::InitRng;
use crate::{Error, Result};

/// Settings of a convolution for [`GraphBuilder::conv2d`]:
/// `Conv2dSpec::new(out_channels, kernel).stride(2).padding(1)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Conv2dSpec {
    /// Output channels.
    pub out_channels: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride (default 1).
    pub stride: usize,
    /// Zero padding (default 0).
    pub padding: usize,
    /// Dilation (default 1).
    pub dilation: usize,
    /// Groups (default 1).
    pub groups: usize,
    /// Bias (default false: convolutions here are usually followed by batch norm).
    pub bias: bool,
}

impl Conv2dSpec {
    /// A `kernel`×`kernel` convolution to `out_channels`, stride 1, no padding, no bias.
    pub fn new(out_channels: usize, kernel: usize) -> Self {
        Self { out_channels, kernel, stride: 1, padding: 0, dilation: 1, groups: 1, bias: false }
    }
    /// With this stride.
    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
    /// With this padding.
    pub fn padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }
    /// With this dilation.
    pub fn dilation(mut self, dilation: usize) -> Self {
        self.dilation = dilation;
        self
    }
    /// With this many groups.
    pub fn groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }
    /// With a bias.
    pub fn bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
}

/// Builds a [`Graph`] node by node. Each method returns the new node's id, which later nodes
/// take as input; mistakes (a wrong channel count, a duplicate name) are reported by
/// [`GraphBuilder::build`] with the node's name.
///
/// ```
/// use shrink_core::graph::{Conv2dSpec, GraphBuilder};
/// let device = shrink_core::BackendKind::Flex.device().unwrap();
/// let mut b = GraphBuilder::new([1, 28, 28]);
/// let x = b.input();
/// let x = b.conv2d("conv", x, Conv2dSpec::new(8, 3).padding(1));
/// let x = b.relu("relu", x);
/// let x = b.global_avg_pool("pool", x);
/// let x = b.linear("fc", x, 10, true);
/// let graph = b.build(x, &mut shrink_core::InitRng::seeded(42), &device).unwrap();
/// assert_eq!(graph.num_outputs(), 10);
/// ```
#[derive(Debug)]
pub struct GraphBuilder {
    nodes: Vec<(String, Op, Vec<NodeId>)>,
    shapes: Vec<Option<ValueShape>>,
    /// The shapes of the nodes so far while every one was valid (inference is incremental, so
    /// building a graph of n nodes takes time linear in n).
    valid_shapes: Vec<ValueShape>,
    names: std::collections::HashSet<String>,
    first_error: Option<Error>,
}

impl GraphBuilder {
    /// A builder for images of `[channels, height, width]`; the input node is called `input`.
    pub fn new(input: [usize; 3]) -> Self {
        let mut b = Self {
            nodes: Vec::new(),
            shapes: Vec::new(),
            valid_shapes: Vec::new(),
            names: Default::default(),
            first_error: None,
        };
        b.push("input", Op::Input { channels: input[0], height: input[1], width: input[2] }, vec![]);
        b
    }

    /// The id of the input node.
    pub fn input(&self) -> NodeId {
        0
    }

    /// The shape of a node's output, if everything up to it was valid.
    pub fn shape(&self, id: NodeId) -> Option<ValueShape> {
        self.shapes.get(id).copied().flatten()
    }

    /// The first error met while adding nodes, if any (the graph will not build).
    pub fn error(&self) -> Option<&Error> {
        self.first_error.as_ref()
    }

    fn channels(&self, id: NodeId) -> usize {
        self.shape(id).map(|s| s.channels()).unwrap_or(0)
    }

    /// Adds a node with an explicit op (the other methods are shorthands).
    pub fn push(&mut self, name: impl Into<String>, op: Op, inputs: Vec<NodeId>) -> NodeId {
        let name = name.into();
        let id = self.nodes.len();
        if !self.names.insert(name.clone()) && self.first_error.is_none() {
            self.first_error = Some(Error::graph(&name, "duplicate node name"));
        }
        // Once a node's shape cannot be inferred, no later one can.
        let shape = if self.valid_shapes.len() == id {
            match node_shape(id, &name, &op, &inputs, &self.valid_shapes) {
                Ok(shape) => {
                    self.valid_shapes.push(shape);
                    Some(shape)
                }
                Err(e) => {
                    self.first_error.get_or_insert(e);
                    None
                }
            }
        } else {
            None
        };
        self.nodes.push((name, op, inputs));
        self.shapes.push(shape);
        id
    }

    /// A convolution of `input`.
    pub fn conv2d(&mut self, name: impl Into<String>, input: NodeId, spec: Conv2dSpec) -> NodeId {
        let op = Op::Conv2d {
            in_channels: self.channels(input),
            out_channels: spec.out_channels,
            kernel: [spec.kernel; 2],
            stride: [spec.stride; 2],
            padding: [spec.padding; 2],
            dilation: [spec.dilation; 2],
            groups: spec.groups,
            bias: spec.bias,
        };
        self.push(name, op, vec![input])
    }

    /// A batch norm (ε = 1e-5, momentum 0.1 as in PyTorch).
    pub fn batch_norm(&mut self, name: impl Into<String>, input: NodeId) -> NodeId {
        let op = Op::BatchNorm2d { features: self.channels(input), epsilon: 1e-5, momentum: 0.1 };
        self.push(name, op, vec![input])
    }

    /// A linear layer to `out_features` (its input is flattened if it is a feature map).
    pub fn linear(&mut self, name: impl Into<String>, input: NodeId, out_features: usize, bias: bool) -> NodeId {
        let in_features = self.shape(input).map(|s| s.numel()).unwrap_or(0);
        self.push(name, Op::Linear { in_features, out_features, bias }, vec![input])
    }

    /// A ReLU.
    pub fn relu(&mut self, name: impl Into<String>, input: NodeId) -> NodeId {
        self.push(name, Op::Relu, vec![input])
    }

    /// A max pooling with a square window.
    pub fn max_pool(
        &mut self,
        name: impl Into<String>,
        input: NodeId,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> NodeId {
        let op = Op::MaxPool2d {
            kernel: [kernel; 2],
            stride: [stride; 2],
            padding: [padding; 2],
            padding_end: None,
            dilation: [1, 1],
            ceil_mode: false,
        };
        self.push(name, op, vec![input])
    }

    /// An average pooling with a square window.
    pub fn avg_pool(
        &mut self,
        name: impl Into<String>,
        input: NodeId,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> NodeId {
        let op = Op::AvgPool2d {
            kernel: [kernel; 2],
            stride: [stride; 2],
            padding: [padding; 2],
            padding_end: None,
            ceil_mode: false,
            count_include_pad: true,
        };
        self.push(name, op, vec![input])
    }

    /// A global average pooling.
    pub fn global_avg_pool(&mut self, name: impl Into<String>, input: NodeId) -> NodeId {
        self.push(name, Op::GlobalAvgPool, vec![input])
    }

    /// A flatten.
    pub fn flatten(&mut self, name: impl Into<String>, input: NodeId) -> NodeId {
        self.push(name, Op::Flatten, vec![input])
    }

    /// The sum of two or more nodes of the same shape.
    pub fn add(&mut self, name: impl Into<String>, inputs: &[NodeId]) -> NodeId {
        self.push(name, Op::Add, inputs.to_vec())
    }

    /// An identity.
    pub fn identity(&mut self, name: impl Into<String>, input: NodeId) -> NodeId {
        self.push(name, Op::Identity, vec![input])
    }

    /// Builds the graph with `output` as its output, its parameters drawn from `rng` and placed
    /// on `device` (He-normal for convolutions, as torchvision's ResNets; PyTorch's uniform
    /// default for linear layers; γ = 1, β = 0 for batch norms). The same seed gives the same
    /// weights on every backend.
    ///
    /// # Errors
    /// [`Error::InvalidGraph`] for the first node that did not fit.
    pub fn build(self, output: NodeId, rng: &mut InitRng, device: &Device) -> Result<Graph> {
        self.build_with(output, |_, op| Ok(init_params(op, rng, device)))
    }

    /// Builds the graph with parameters made by `make(name, op)` for each op that has them (model files
    /// use it to fill in stored tensors).
    ///
    /// # Errors
    /// As [`GraphBuilder::build`], and whatever `make` returns.
    pub fn build_with(self, output: NodeId, mut make: impl FnMut(&str, &Op) -> Result<Params>) -> Result<Graph> {
        if let Some(e) = self.first_error {
            return Err(e);
        }
        if output >= self.nodes.len() {
            return Err(Error::graph("<output>", format!("output id {output} is not a node")));
        }
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for (name, op, inputs) in self.nodes {
            let params = if op.has_params() { Some(make(&name, &op)?) } else { None };
            nodes.push(Node { params, name, op, inputs });
        }
        let graph = Graph { nodes, output };
        graph.validate()?;
        Ok(graph)
    }
}

fn init_params(op: &Op, rng: &mut InitRng, device: &Device) -> Params {
    match *op {
        Op::Conv2d { in_channels, out_channels, kernel, groups, bias, .. } => {
            // He initialisation with fan-out, as torchvision's ResNets (kaiming_normal_, mode=fan_out).
            let fan_out = out_channels * kernel[0] * kernel[1] / groups;
            let std = (2.0 / fan_out as f64).sqrt();
            let shape = [out_channels, in_channels / groups, kernel[0], kernel[1]];
            let weight = rng.tensor(shape, Distribution::Normal(0.0, std), device);
            let bias = bias.then(|| Param::from_tensor(Tensor::<1>::zeros([out_channels], device)));
            Params::Conv(ConvParams { weight: Param::from_tensor(weight), bias })
        }
        Op::Linear { in_features, out_features, bias } => {
            // PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias.
            let bound = 1.0 / (in_features as f64).sqrt();
            let dist = Distribution::Uniform(-bound, bound);
            let weight = rng.tensor([out_features, in_features], dist, device);
            let bias = bias.then(|| Param::from_tensor(rng.tensor([out_features], dist, device)));
            Params::Linear(LinearParams { weight: Param::from_tensor(weight), bias })
        }
        Op::BatchNorm2d { features, epsilon, momentum } => {
            Params::BatchNorm(BatchNormConfig::new(features).with_epsilon(epsilon).with_momentum(momentum).init(device))
        }
        _ => unreachable!("only called for ops with parameters"),
    }
}

/// A batch norm made from stored tensors (γ, β, running mean, running variance).
pub(crate) fn batch_norm_from(
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    var: Tensor<1>,
    epsilon: f64,
    momentum: f64,
) -> BatchNorm {
    let device = gamma.device();
    let mut bn = BatchNormConfig::new(gamma.dims()[0]).with_epsilon(epsilon).with_momentum(momentum).init(&device);
    bn.gamma = Param::from_tensor(gamma);
    bn.beta = Param::from_tensor(beta);
    bn.running_mean = RunningState::new(mean);
    bn.running_var = RunningState::new(var);
    bn
}
