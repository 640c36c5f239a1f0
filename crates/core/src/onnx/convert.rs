//! onnx-ir's typed nodes onto shrink's ops, one node at a time.

use std::collections::{BTreeMap, HashMap};

use onnx_ir::{ArgType, Argument, Node, OnnxGraph, TensorDataExt};

use super::layout;
use super::values::{self, Const, Dim, Value, axis, dims_of, slice};
use crate::graph::{GraphBuilder, NodeId, Op, PadMode, ValueShape};

/// The parameters of a converted layer, on the host until the graph is built.
pub(super) enum HostParams {
    /// Convolution weight of `dims` `[out, in / groups, kh, kw]`, and bias.
    Conv { weight: Vec<f32>, bias: Option<Vec<f32>>, dims: [usize; 4] },
    /// Linear weight of `dims` `[out, in]`, and bias.
    Linear { weight: Vec<f32>, bias: Option<Vec<f32>>, dims: [usize; 2] },
    /// Batch norm γ, β, running mean, running variance, ε, and momentum (burn's convention).
    BatchNorm { gamma: Vec<f32>, beta: Vec<f32>, mean: Vec<f32>, var: Vec<f32>, epsilon: f64, momentum: f64 },
}

/// The conversion in progress: nodes pushed into a [`GraphBuilder`] (which infers every
/// shape), parameters kept by node name, and the problems met, all of them.
pub(super) struct Converter<'a> {
    pub builder: GraphBuilder,
    /// `(name, op, inputs)` of every node pushed, as the builder holds them.
    pub nodes: Vec<(String, Op, Vec<NodeId>)>,
    pub params: HashMap<String, HostParams>,
    pub values: HashMap<String, Value>,
    pub problems: Vec<String>,
    /// ONNX op types converted into graph nodes, and how many of each.
    pub ops: BTreeMap<String, usize>,
    /// The batch size the model declares (`None`: dynamic).
    pub batch: Option<usize>,
    opset: i64,
    original: &'a HashMap<String, String>,
    /// How many nodes read each ONNX value (to fuse constant affines into one node).
    uses: HashMap<String, usize>,
    /// Nodes made from constant scale-and-shift (1×1 depthwise convolutions), by id.
    affines: Vec<NodeId>,
}

type Step = Result<Vec<Value>, String>;

impl<'a> Converter<'a> {
    pub fn new(
        input: [usize; 3],
        batch: Option<usize>,
        opset: i64,
        original: &'a HashMap<String, String>,
        graph: &OnnxGraph,
    ) -> Self {
        let mut uses = HashMap::new();
        for node in &graph.nodes {
            for arg in node.inputs() {
                *uses.entry(arg.name.clone()).or_insert(0) += 1;
            }
        }
        for out in &graph.outputs {
            *uses.entry(out.name.clone()).or_insert(0) += 1;
        }
        let builder = GraphBuilder::new(input);
        let nodes =
            vec![("input".to_string(), Op::Input { channels: input[0], height: input[1], width: input[2] }, vec![])];
        Self {
            builder,
            nodes,
            params: HashMap::new(),
            values: HashMap::new(),
            problems: Vec::new(),
            ops: BTreeMap::new(),
            batch,
            opset,
            original,
            uses,
            affines: Vec::new(),
        }
    }

    /// The file's name for an onnx-ir node (onnx-ir renames every node).
    pub fn describe(&self, node: &Node) -> String {
        match self.original.get(node.name()) {
            Some(orig) if !orig.is_empty() => format!("`{orig}` ({})", node.node_type()),
            _ => format!("`{}` ({})", node.name(), node.node_type()),
        }
    }

    fn base_name(&self, node: &Node) -> String {
        match self.original.get(node.name()) {
            Some(orig) if !orig.is_empty() => orig.clone(),
            _ => node.name().to_string(),
        }
    }

    /// Converts one node, recording its outputs (or its problem).
    pub fn convert(&mut self, node: &Node) {
        if self.builder.error().is_some() {
            return;
        }
        let outputs: Vec<String> = node.outputs().iter().map(|o| o.name.clone()).collect();
        let before = self.nodes.len();
        let result = if node.inputs().iter().any(|a| matches!(self.values.get(&a.name), Some(Value::Failed))) {
            Ok(vec![Value::Failed; outputs.len()])
        } else {
            self.step(node)
        };
        let values = match result {
            Ok(values) => values,
            Err(problem) => {
                self.problems.push(format!("{}: {problem}", self.describe(node)));
                vec![Value::Failed; outputs.len()]
            }
        };
        if self.nodes.len() > before {
            *self.ops.entry(node.node_type().to_string()).or_insert(0) += 1;
        }
        for (name, value) in outputs.into_iter().zip(values) {
            self.values.insert(name, value);
        }
    }

    /// The value an argument holds.
    pub fn value(&self, arg: &Argument) -> Result<Value, String> {
        if arg.is_optional() {
            return Err("a required input is missing".into());
        }
        if let Some(data) = arg.value() {
            let dims = data.shape().to_vec();
            let values = data.to_f64_vec().map_err(|e| format!("constant `{}` cannot be read: {e:?}", arg.name))?;
            return Ok(Value::Const(Const::new(dims, values)));
        }
        self.values.get(&arg.name).cloned().ok_or_else(|| format!("input `{}` is not computed by any node", arg.name))
    }

    fn input(&self, node: &Node, i: usize) -> Result<Value, String> {
        let arg = node.inputs().get(i).ok_or_else(|| format!("input {i} is missing"))?;
        self.value(arg)
    }

    fn optional_input(&self, node: &Node, i: usize) -> Result<Option<Value>, String> {
        match node.inputs().get(i) {
            Some(arg) if !arg.is_optional() => self.value(arg).map(Some),
            _ => Ok(None),
        }
    }

    fn constant(&self, node: &Node, i: usize, what: &str) -> Result<Const, String> {
        match self.input(node, i)? {
            Value::Const(c) => Ok(c),
            _ => Err(format!("its {what} (input {i}) must be a constant")),
        }
    }

    fn node_input(&self, node: &Node, i: usize) -> Result<NodeId, String> {
        match self.input(node, i)? {
            Value::Node(id) => Ok(id),
            Value::Const(_) | Value::Dims(_) => {
                Err(format!("input {i} is a constant where a computed value was expected"))
            }
            _ => Err(format!("input {i} is a 5-d view that only a channel shuffle may read")),
        }
    }

    /// The shape of a node's output (the builder checked it).
    pub fn shape(&self, id: NodeId) -> ValueShape {
        self.builder.shape(id).expect("nodes are only used while the builder has no error")
    }

    /// Adds a node named after `name` (made unique), returning its id.
    pub fn push(&mut self, name: &str, op: Op, inputs: Vec<NodeId>) -> Result<NodeId, String> {
        let mut unique = name.to_string();
        let mut k = 1;
        while unique == "input" || self.nodes.iter().any(|(n, _, _)| *n == unique) {
            k += 1;
            unique = format!("{name}.{k}");
        }
        let id = self.builder.push(unique.clone(), op.clone(), inputs.clone());
        self.nodes.push((unique, op, inputs));
        match self.builder.error() {
            Some(e) => Err(e.to_string()),
            None => Ok(id),
        }
    }

    fn last_name(&self) -> String {
        self.nodes.last().map(|n| n.0.clone()).unwrap_or_default()
    }

    fn step(&mut self, node: &Node) -> Step {
        let name = self.base_name(node);
        let one = |v: Value| -> Step { Ok(vec![v]) };
        match node {
            Node::Constant(_) => {
                let out = &node.outputs()[0];
                let arg = node.inputs().first().filter(|a| a.value().is_some()).unwrap_or(out);
                one(self.value(arg)?)
            }
            Node::ConstantOfShape(n) => {
                let dims: Vec<i64> = match &n.config.shape {
                    onnx_ir::constant_of_shape::ConstantOfShapeShape::Static(d) => d.clone(),
                    onnx_ir::constant_of_shape::ConstantOfShapeShape::Runtime(_) => {
                        self.constant(node, 0, "shape")?.ints()
                    }
                };
                if dims.iter().any(|&d| d < 0) {
                    return Err(format!("negative dimension in {dims:?}"));
                }
                let fill = match &n.config.value {
                    Some(v) => v.scalar_f64().map_err(|e| format!("fill value: {e:?}"))?,
                    None => 0.0,
                };
                let dims: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
                let count = values::checked_count(&dims)?;
                one(Value::Const(Const::new(dims, vec![fill; count])))
            }
            Node::Identity(_) | Node::Dropout(_) => {
                let mut v = vec![self.input(node, 0)?];
                if node.outputs().len() > 1 && self.uses.get(&node.outputs()[1].name).copied().unwrap_or(0) > 0 {
                    return Err("its mask output is used; only inference (the first output) is supported".into());
                }
                v.resize(node.outputs().len(), Value::Failed);
                Ok(v)
            }
            Node::Cast(n) => {
                let x = self.input(node, 0)?;
                match x {
                    Value::Node(_) if n.config.to != burn::tensor::DType::F32 => {
                        Err(format!("cast of a computed value to {:?}; only f32 is supported", n.config.to))
                    }
                    other => one(other),
                }
            }
            Node::Shape(n) => {
                let dims = match self.input(node, 0)? {
                    Value::Node(id) => {
                        let mut d = vec![Dim::Batch];
                        d.extend(self.onnx_dims(id).into_iter().map(|v| Dim::Known(v as i64)));
                        d
                    }
                    Value::Const(c) => c.dims.iter().map(|&v| Dim::Known(v as i64)).collect(),
                    _ => return Err("shape of a value that has none here".into()),
                };
                let end = n.config.end.min(dims.len());
                one(Value::Dims(dims[n.config.start.min(end)..end].to_vec()))
            }
            Node::Gather(n) => self.gather(node, n.config.axis),
            Node::Slice(n) => self.slice(node, &n.config),
            Node::Conv2d(n) => self.conv(node, &name, &n.config).map(|v| vec![v]),
            Node::BatchNormalization(n) => {
                let (epsilon, momentum) = match &n.config {
                    onnx_ir::node::batch_norm::BatchNormConfig::Static(c) => (c.epsilon, c.momentum),
                    onnx_ir::node::batch_norm::BatchNormConfig::Runtime(c) => (c.epsilon, c.momentum),
                };
                // onnx-ir reads a missing epsilon or momentum as 0; ONNX's defaults are 1e-5 and
                // 0.9 (a zero epsilon is no valid model's choice: it divides by zero variances).
                let epsilon = if epsilon > 0.0 { epsilon } else { 1e-5 };
                let momentum = if momentum > 0.0 { momentum } else { 0.9 };
                let x = self.node_input(node, 0)?;
                let c = self.shape(x).channels();
                let mut vectors = Vec::new();
                for (i, what) in [(1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")] {
                    let v = self.constant(node, i, what)?;
                    if v.data.len() != c {
                        return Err(format!("{what} has {} values for {c} channels", v.data.len()));
                    }
                    vectors.push(v.floats());
                }
                // ONNX's momentum weighs the old running value, burn's (PyTorch's) the new one.
                let momentum = (1.0 - momentum).clamp(0.0, 1.0);
                let op = Op::BatchNorm2d { features: c, epsilon, momentum };
                let id = self.push(&name, op, vec![x])?;
                let [gamma, beta, mean, var]: [Vec<f32>; 4] = vectors.try_into().expect("four vectors");
                let params = HostParams::BatchNorm { gamma, beta, mean, var, epsilon, momentum };
                self.params.insert(self.last_name(), params);
                one(Value::Node(id))
            }
            Node::Linear(n) => {
                let w = self.constant(node, 1, "weight")?;
                let bias = self.optional_input(node, 2)?;
                self.linear(node, &name, w, !n.config.transpose_weight, 1.0, bias, 1.0)
            }
            Node::Gemm(n) => {
                if n.config.trans_a != 0 {
                    return Err("transA = 1 is not supported (the input must be [batch, features])".into());
                }
                let w = self.constant(node, 1, "weight")?;
                let bias = self.optional_input(node, 2)?;
                self.linear(node, &name, w, n.config.trans_b == 0, n.config.alpha, bias, n.config.beta)
            }
            Node::MatMul(_) => match self.input(node, 1)? {
                Value::Const(w) if w.dims.len() == 2 => self.linear(node, &name, w, true, 1.0, None, 1.0),
                _ => Err("only a product with a constant 2-d weight is supported".into()),
            },
            Node::Relu(_) => self.unary(node, &name, Op::Relu),
            Node::Sigmoid(_) => self.unary(node, &name, Op::Sigmoid),
            Node::HardSwish(_) => self.unary(node, &name, Op::HardSwish),
            Node::HardSigmoid(n) => {
                let (alpha, beta) = (n.config.alpha as f32, n.config.beta as f32);
                self.unary(node, &name, Op::HardSigmoid { alpha, beta })
            }
            Node::LeakyRelu(n) => self.unary(node, &name, Op::LeakyRelu { alpha: n.config.alpha as f32 }),
            Node::Clip(n) => {
                let bound = |c: &Option<onnx_ir::clip::ClipInput>, default: f32| -> Result<f32, String> {
                    Ok(match c {
                        None => default,
                        Some(onnx_ir::clip::ClipInput::Static(v)) => *v as f32,
                        Some(onnx_ir::clip::ClipInput::Runtime(r)) => {
                            match self.value(&node.inputs()[r.input_index])? {
                                Value::Const(c) => c.scalar().ok_or("clip bound is not a scalar")? as f32,
                                _ => return Err("clip bounds must be constants".into()),
                            }
                        }
                    })
                };
                let (min, max) = (bound(&n.config.min, f32::MIN)?, bound(&n.config.max, f32::MAX)?);
                self.unary(node, &name, Op::Clip { min, max })
            }
            Node::Swish(_) => {
                let x = self.node_input(node, 0)?;
                let s = self.push(&format!("{name}.sigmoid"), Op::Sigmoid, vec![x])?;
                one(Value::Node(self.push(&name, Op::Mul, vec![x, s])?))
            }
            Node::Add(_) | Node::Sub(_) | Node::Mul(_) | Node::Div(_) => self.arithmetic(node, &name),
            Node::Sum(_) => {
                let inputs: Vec<Value> =
                    (0..node.inputs().len()).map(|i| self.input(node, i)).collect::<Result<_, _>>()?;
                let ids: Option<Vec<NodeId>> =
                    inputs.iter().map(|v| if let Value::Node(id) = v { Some(*id) } else { None }).collect();
                match ids {
                    Some(ids) if ids.len() == 1 => one(Value::Node(ids[0])),
                    Some(ids) => one(Value::Node(self.push(&name, Op::Add, ids)?)),
                    None => Err("sum of constants and computed values is not supported".into()),
                }
            }
            Node::Concat(n) => self.concat(node, &name, n.config.axis),
            Node::MaxPool2d(n) => {
                let c = &n.config;
                let x = self.node_input(node, 0)?;
                let (begin, end) = self.pads(x, &c.padding, &c.auto_pad, c.kernel_size, c.strides, c.dilation)?;
                let op = Op::MaxPool2d {
                    kernel: c.kernel_size,
                    stride: c.strides,
                    padding: begin,
                    padding_end: (end != begin).then_some(end),
                    dilation: c.dilation,
                    ceil_mode: c.ceil_mode,
                };
                one(Value::Node(self.push(&name, op, vec![x])?))
            }
            Node::AveragePool2d(n) => {
                let c = &n.config;
                if c.dilation != [1, 1] {
                    return Err(format!("dilations {:?} are not supported for average pooling", c.dilation));
                }
                let x = self.node_input(node, 0)?;
                let (begin, end) = self.pads(x, &c.padding, &c.auto_pad, c.kernel_size, c.strides, [1, 1])?;
                let op = Op::AvgPool2d {
                    kernel: c.kernel_size,
                    stride: c.strides,
                    padding: begin,
                    padding_end: (end != begin).then_some(end),
                    ceil_mode: c.ceil_mode,
                    count_include_pad: c.count_include_pad,
                };
                one(Value::Node(self.push(&name, op, vec![x])?))
            }
            Node::GlobalAveragePool(_) => self.unary(node, &name, Op::GlobalAvgPool),
            Node::GlobalMaxPool(_) => {
                let x = self.node_input(node, 0)?;
                let [_, h, w] = self.map_dims(x)?;
                let op = Op::MaxPool2d {
                    kernel: [h, w],
                    stride: [1, 1],
                    padding: [0, 0],
                    padding_end: None,
                    dilation: [1, 1],
                    ceil_mode: false,
                };
                one(Value::Node(self.push(&name, op, vec![x])?))
            }
            Node::ReduceMean(n) => {
                let x = self.node_input(node, 0)?;
                let axes = match &n.config.axes {
                    onnx_ir::reduce::ReduceAxes::Static(a) => a.clone(),
                    onnx_ir::reduce::ReduceAxes::Runtime(r) => match self.value(&node.inputs()[r.input_index])? {
                        Value::Const(c) => c.ints().iter().map(|&a| axis(a, 4)).collect::<Result<_, _>>()?,
                        _ => return Err("reduction axes must be constants".into()),
                    },
                };
                let mut sorted = axes.clone();
                sorted.sort_unstable();
                if sorted != [2, 3] || !matches!(self.shape(x), ValueShape::Map { .. }) {
                    return Err(format!(
                        "only a mean over height and width (axes 2, 3) is supported, got axes {axes:?}"
                    ));
                }
                let gap = self.push(&name, Op::GlobalAvgPool, vec![x])?;
                if n.config.keepdims {
                    one(Value::Node(gap))
                } else {
                    one(Value::Node(self.push(&format!("{name}.flatten"), Op::Flatten, vec![gap])?))
                }
            }
            Node::Lrn(n) => {
                let c = &n.config;
                if c.size < 1 {
                    return Err(format!("size {} must be positive", c.size));
                }
                self.unary(node, &name, Op::Lrn { size: c.size as usize, alpha: c.alpha, beta: c.beta, bias: c.bias })
            }
            Node::Pad(n) => self.pad(node, &name, &n.config),
            Node::Softmax(n) => {
                let x = self.node_input(node, 0)?;
                let shape = self.shape(x);
                let rank = shape.dims().len() + 1;
                let spatial = shape.numel() / shape.channels();
                // Opsets before 13 flatten from `axis` on; from 13 softmax runs along `axis` only.
                let whole_sample = n.config.axis == 1 && (self.opset < 13 || spatial == 1);
                if !(whole_sample || (rank == 2 && n.config.axis == 1)) {
                    return Err(format!(
                        "softmax along axis {} of a {rank}-d value is not supported (only over each sample's values)",
                        n.config.axis
                    ));
                }
                one(Value::Node(self.push(&name, Op::Softmax, vec![x])?))
            }
            Node::Flatten(n) => {
                let x = self.node_input(node, 0)?;
                if n.config.axis != 1 {
                    return Err(format!(
                        "flatten at axis {} mixes the batch with the features; only axis 1 is supported",
                        n.config.axis
                    ));
                }
                let numel = self.shape(x).numel();
                one(self.view(&name, x, &[numel])?)
            }
            Node::Reshape(n) => self.reshape(node, &name, &n.config.shape),
            Node::Squeeze(n) => self.squeeze(node, &name, n.config.axes.as_ref()),
            Node::Unsqueeze(n) => self.unsqueeze(node, &name, &n.config),
            Node::Transpose(n) => self.transpose(node, &name, &n.config.perm),
            _ => Err("this op is not supported".into()),
        }
    }

    /// `[c, h, w]` of a feature map.
    fn map_dims(&self, id: NodeId) -> Result<[usize; 3], String> {
        match self.shape(id) {
            ValueShape::Map { channels, height, width } => Ok([channels, height, width]),
            ValueShape::Flat { features } => Err(format!("expects a feature map, got a vector of {features}")),
        }
    }

    /// The ONNX dims of a node's output, batch excluded.
    pub fn onnx_dims(&self, id: NodeId) -> Vec<usize> {
        self.shape(id).dims()
    }

    fn unary(&mut self, node: &Node, name: &str, op: Op) -> Step {
        let x = self.node_input(node, 0)?;
        Ok(vec![Value::Node(self.push(name, op, vec![x])?)])
    }

    /// Padding `(begin, end)` of a conv or pool, explicit or from `auto_pad`.
    fn pads(
        &self,
        x: NodeId,
        padding: &onnx_ir::padding::PaddingConfig2d,
        auto_pad: &onnx_ir::padding::AutoPad,
        kernel: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
    ) -> Result<([usize; 2], [usize; 2]), String> {
        use onnx_ir::padding::AutoPad;
        let [_, h, w] = self.map_dims(x)?;
        Ok(match auto_pad {
            AutoPad::NotSet => {
                let (top, left, bottom, right) = padding.as_tuple();
                ([top, left], [bottom, right])
            }
            AutoPad::Valid => ([0, 0], [0, 0]),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let (mut begin, mut end) = ([0; 2], [0; 2]);
                for (a, size) in [h, w].into_iter().enumerate() {
                    let span = dilation[a] * (kernel[a] - 1) + 1;
                    let out = size.div_ceil(stride[a]);
                    let total = ((out - 1) * stride[a] + span).saturating_sub(size);
                    let small = total / 2;
                    (begin[a], end[a]) =
                        if *auto_pad == AutoPad::SameUpper { (small, total - small) } else { (total - small, small) };
                }
                (begin, end)
            }
        })
    }

    fn conv(&mut self, node: &Node, name: &str, c: &onnx_ir::conv2d::Conv2dConfig) -> Result<Value, String> {
        let mut x = self.node_input(node, 0)?;
        let w = self.constant(node, 1, "weight")?;
        let bias = match self.optional_input(node, 2)? {
            None => None,
            Some(Value::Const(b)) => Some(b.floats()),
            Some(_) => return Err("its bias must be a constant".into()),
        };
        let [cin, ..] = self.map_dims(x)?;
        let [out, per_group, kh, kw]: [usize; 4] =
            w.dims.clone().try_into().map_err(|_| format!("weight of {:?} is not 4-d", w.dims))?;
        if [kh, kw] != c.kernel_size {
            return Err(format!("weight {:?} does not match kernel_shape {:?}", w.dims, c.kernel_size));
        }
        if per_group * c.groups != cin {
            return Err(format!("weight {:?} with {} groups does not fit {cin} input channels", w.dims, c.groups));
        }
        if bias.as_ref().is_some_and(|b| b.len() != out) {
            return Err(format!("bias has {} values for {out} filters", bias.map_or(0, |b| b.len())));
        }
        let (begin, end) = self.pads(x, &c.padding, &c.auto_pad, c.kernel_size, c.stride, c.dilation)?;
        // The kernels pad symmetrically; the rest of an asymmetric padding is a pad node before.
        let sym = [begin[0].min(end[0]), begin[1].min(end[1])];
        if begin != sym || end != sym {
            let op = Op::Pad {
                begin: [begin[0] - sym[0], begin[1] - sym[1]],
                end: [end[0] - sym[0], end[1] - sym[1]],
                mode: PadMode::Constant { value: 0.0 },
            };
            x = self.push(&format!("{name}.pad"), op, vec![x])?;
        }
        let op = Op::Conv2d {
            in_channels: cin,
            out_channels: out,
            kernel: c.kernel_size,
            stride: c.stride,
            padding: sym,
            dilation: c.dilation,
            groups: c.groups,
            bias: bias.is_some(),
        };
        let id = self.push(name, op, vec![x])?;
        let dims = [out, per_group, kh, kw];
        self.params.insert(self.last_name(), HostParams::Conv { weight: w.floats(), bias, dims });
        Ok(Value::Node(id))
    }

    /// `alpha · x · W + beta · bias` with `W` `[in, out]` (`transpose`) or `[out, in]`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &mut self,
        node: &Node,
        name: &str,
        w: Const,
        transpose: bool,
        alpha: f32,
        bias: Option<Value>,
        beta: f32,
    ) -> Step {
        let x = self.node_input(node, 0)?;
        let ValueShape::Flat { features } = self.shape(x) else {
            return Err(format!("expects [batch, features], got a feature map {:?}", self.shape(x).dims()));
        };
        let [rows, cols]: [usize; 2] =
            w.dims.clone().try_into().map_err(|_| format!("weight {:?} is not 2-d", w.dims))?;
        let (in_f, out_f) = if transpose { (rows, cols) } else { (cols, rows) };
        if in_f != features {
            return Err(format!("weight {:?} expects {in_f} input features, gets {features}", w.dims));
        }
        let values = w.floats();
        let mut weight = vec![0f32; in_f * out_f];
        for o in 0..out_f {
            for i in 0..in_f {
                let v = if transpose { values[i * out_f + o] } else { values[o * in_f + i] };
                weight[o * in_f + i] = alpha * v;
            }
        }
        let bias = match bias {
            None => None,
            Some(Value::Const(b)) => {
                let full = b
                    .broadcast(&Const::new(vec![1, out_f], vec![0.0; out_f]), |b, z| b + z)
                    .map_err(|e| format!("bias: {e}"))?;
                if full.dims != [1, out_f] {
                    return Err(format!("bias of {:?} does not broadcast to [1, {out_f}]", b.dims));
                }
                Some(full.data.iter().map(|&v| beta * v as f32).collect::<Vec<f32>>())
            }
            Some(_) => return Err("its bias must be a constant".into()),
        };
        let op = Op::Linear { in_features: in_f, out_features: out_f, bias: bias.is_some() };
        let id = self.push(name, op, vec![x])?;
        self.params.insert(self.last_name(), HostParams::Linear { weight, bias, dims: [out_f, in_f] });
        Ok(vec![Value::Node(id)])
    }

    fn arithmetic(&mut self, node: &Node, name: &str) -> Step {
        let (a, b) = (self.input(node, 0)?, self.input(node, 1)?);
        let kind = node.node_type().to_string();
        let f: fn(f64, f64) -> f64 = match kind.as_str() {
            "Add" => |x, y| x + y,
            "Sub" => |x, y| x - y,
            "Mul" => |x, y| x * y,
            _ => |x, y| x / y,
        };
        match (a, b) {
            (Value::Const(a), Value::Const(b)) => Ok(vec![Value::Const(a.broadcast(&b, f)?)]),
            (Value::Dims(a), Value::Dims(b)) if a.len() == b.len() => {
                let out = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| match (x, y) {
                        (Dim::Known(x), Dim::Known(y)) => Ok(Dim::Known(f(*x as f64, *y as f64) as i64)),
                        _ => Err("arithmetic on the batch size is not supported".to_string()),
                    })
                    .collect::<Result<_, _>>()?;
                Ok(vec![Value::Dims(out)])
            }
            (Value::Node(x), Value::Const(c)) => self.affine(node, name, x, &c, &kind, false),
            (Value::Const(c), Value::Node(x)) => self.affine(node, name, x, &c, &kind, true),
            (Value::Node(x), Value::Node(y)) => {
                let (sx, sy) = (self.shape(x), self.shape(y));
                let per_channel = |s: ValueShape| matches!(s, ValueShape::Map { height: 1, width: 1, .. });
                match kind.as_str() {
                    "Add" if sx == sy => Ok(vec![Value::Node(self.push(name, Op::Add, vec![x, y])?)]),
                    "Mul" if sx == sy || per_channel(sy) => {
                        Ok(vec![Value::Node(self.push(name, Op::Mul, vec![x, y])?)])
                    }
                    "Mul" if per_channel(sx) => Ok(vec![Value::Node(self.push(name, Op::Mul, vec![y, x])?)]),
                    _ => Err(format!(
                        "{kind} of two computed values of shapes {:?} and {:?} is not supported (supported: Add of equal \
                         shapes, Mul of equal shapes or by one value per channel)",
                        sx.dims(),
                        sy.dims()
                    )),
                }
            }
            _ => Err(format!("{kind} of these operands is not supported")),
        }
    }

    /// `x ∘ c` (or `c ∘ x`) for a constant `c` holding one value per channel, or one in all:
    /// a 1×1 depthwise convolution with bias (exact for add, sub and mul; div multiplies by
    /// the reciprocal). A scale-and-shift right after another whose result nothing else reads
    /// is merged into it.
    fn affine(&mut self, node: &Node, name: &str, x: NodeId, c: &Const, kind: &str, const_first: bool) -> Step {
        let shape = self.shape(x);
        let channels = shape.channels();
        let v = layout::per_channel(c, shape)?;
        let (scale, shift): (Vec<f64>, Vec<f64>) = match (kind, const_first) {
            ("Mul", _) => (v.clone(), vec![0.0; channels]),
            ("Add", _) => (vec![1.0; channels], v.clone()),
            ("Sub", false) => (vec![1.0; channels], v.iter().map(|s| -s).collect()),
            ("Sub", true) => (vec![-1.0; channels], v.clone()),
            ("Div", false) => (v.iter().map(|s| 1.0 / s).collect(), vec![0.0; channels]),
            _ => return Err("division of a constant by a computed value is not supported".into()),
        };
        if scale.iter().chain(&shift).any(|s| !s.is_finite()) {
            return Err("the constant gives a scale or shift that is not finite".into());
        }
        let input_name = node.inputs()[usize::from(const_first)].name.clone();
        if self.affines.contains(&x) && self.uses.get(&input_name) == Some(&1) {
            let node_name = self.nodes[x].0.clone();
            if let Some(HostParams::Conv { weight, bias, .. }) = self.params.get_mut(&node_name) {
                let b = bias.get_or_insert_with(|| vec![0.0; channels]);
                for k in 0..channels {
                    weight[k] = (weight[k] as f64 * scale[k]) as f32;
                    b[k] = (b[k] as f64 * scale[k] + shift[k]) as f32;
                }
                return Ok(vec![Value::Node(x)]);
            }
        }
        let flat = matches!(shape, ValueShape::Flat { .. });
        let mut input = x;
        if flat {
            let op = Op::Unflatten { channels, height: 1, width: 1 };
            input = self.push(&format!("{name}.unflatten"), op, vec![x])?;
        }
        let op = Op::Conv2d {
            in_channels: channels,
            out_channels: channels,
            kernel: [1, 1],
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: channels,
            bias: true,
        };
        let mut id = self.push(name, op, vec![input])?;
        let weight = scale.iter().map(|&s| s as f32).collect();
        let bias = Some(shift.iter().map(|&s| s as f32).collect());
        self.params.insert(self.last_name(), HostParams::Conv { weight, bias, dims: [channels, 1, 1, 1] });
        if flat {
            id = self.push(&format!("{name}.flatten"), Op::Flatten, vec![id])?;
        } else {
            self.affines.push(id);
        }
        Ok(vec![Value::Node(id)])
    }

    fn concat(&mut self, node: &Node, name: &str, axis_: usize) -> Step {
        let inputs: Vec<Value> = (0..node.inputs().len()).map(|i| self.input(node, i)).collect::<Result<_, _>>()?;
        if inputs.iter().all(|v| dims_of(v).is_some()) && axis_ == 0 {
            return Ok(vec![Value::Dims(inputs.iter().flat_map(|v| dims_of(v).expect("checked")).collect())]);
        }
        if inputs.iter().all(|v| matches!(v, Value::Const(_))) {
            return Err("concatenation of constants is not supported".into());
        }
        let ids: Vec<NodeId> = inputs
            .iter()
            .map(|v| {
                if let Value::Node(id) = v {
                    Ok(*id)
                } else {
                    Err("concatenation of a constant and a computed value".to_string())
                }
            })
            .collect::<Result<_, _>>()?;
        if axis_ != 1 {
            return Err(format!("concatenation along axis {axis_} is not supported (only the channels, axis 1)"));
        }
        if ids.len() == 1 {
            return Ok(vec![Value::Node(ids[0])]);
        }
        Ok(vec![Value::Node(self.push(name, Op::Concat, ids)?)])
    }

    fn pad(&mut self, node: &Node, name: &str, c: &onnx_ir::pad::PadConfig) -> Step {
        use onnx_ir::pad::{ConstantValueInput, PadInput, PadMode as OnnxPad};
        let x = self.node_input(node, 0)?;
        let [_, _, _] = self.map_dims(x)?;
        let pairs: Vec<(usize, usize)> = match &c.pads {
            PadInput::Static(p) => p.clone(),
            PadInput::Runtime { input, axes: None } => {
                let v = match self.value(&node.inputs()[input.input_index])? {
                    Value::Const(v) => v.ints(),
                    _ => return Err("pads must be constants".into()),
                };
                let half = v.len() / 2;
                if v.iter().any(|&p| p < 0) {
                    return Err(format!("negative pads {v:?} (cropping) are not supported"));
                }
                (0..half).map(|i| (v[i] as usize, v[half + i] as usize)).collect()
            }
            PadInput::Runtime { .. } => return Err("pads with an axes input are not supported".into()),
        };
        if pairs.len() != 4 || pairs[0] != (0, 0) || pairs[1] != (0, 0) {
            return Err(format!("only height and width of an [n, c, h, w] map may be padded, got pads {pairs:?}"));
        }
        let mode = match c.mode {
            OnnxPad::Constant => PadMode::Constant {
                value: match &c.constant_value {
                    ConstantValueInput::Static(v) => *v,
                    ConstantValueInput::Runtime(r) => match self.value(&node.inputs()[r.input_index])? {
                        Value::Const(v) => v.scalar().ok_or("the pad value is not a scalar")? as f32,
                        _ => return Err("the pad value must be a constant".into()),
                    },
                },
            },
            OnnxPad::Reflect => PadMode::Reflect,
            OnnxPad::Edge => PadMode::Edge,
        };
        let op = Op::Pad { begin: [pairs[2].0, pairs[3].0], end: [pairs[2].1, pairs[3].1], mode };
        Ok(vec![Value::Node(self.push(name, op, vec![x])?)])
    }

    fn gather(&mut self, node: &Node, axis_: usize) -> Step {
        let data = self.input(node, 0)?;
        let indices = match self.input(node, 1)? {
            Value::Const(c) => c,
            _ => return Err("gather indices must be constants".into()),
        };
        match (data, axis_) {
            (Value::Dims(d), 0) => {
                let picked = indices
                    .ints()
                    .iter()
                    .map(|&i| axis(i, d.len()).map(|i| d[i]))
                    .collect::<Result<Vec<Dim>, String>>()?;
                Ok(vec![Value::Dims(picked)])
            }
            (Value::Const(c), 0) if c.dims.len() == 1 => {
                let picked: Vec<f64> = indices
                    .ints()
                    .iter()
                    .map(|&i| axis(i, c.data.len()).map(|i| c.data[i]))
                    .collect::<Result<_, _>>()?;
                Ok(vec![Value::Const(Const::new(indices.dims.clone(), picked))])
            }
            _ => Err("gather is only supported on shapes and 1-d constants".into()),
        }
    }

    fn slice(&mut self, node: &Node, c: &onnx_ir::slice::SliceConfig) -> Step {
        use onnx_ir::slice::SliceInput;
        let list = |s: &SliceInput| -> Result<Vec<i64>, String> {
            match s {
                SliceInput::Static(v) => Ok(v.clone()),
                SliceInput::Runtime(r) => match self.value(&node.inputs()[r.input_index])? {
                    Value::Const(v) => Ok(v.ints()),
                    _ => Err("slice bounds must be constants".into()),
                },
            }
        };
        let (starts, ends) = (list(&c.starts)?, list(&c.ends)?);
        let steps = c.steps.as_ref().map(list).transpose()?.unwrap_or_else(|| vec![1]);
        if starts.len() != 1 || ends.len() != 1 {
            return Err("only 1-d slices of shapes are supported".into());
        }
        let step = steps.first().copied().unwrap_or(1);
        match self.input(node, 0)? {
            Value::Dims(d) => Ok(vec![Value::Dims(slice(&d, starts[0], ends[0], step)?)]),
            Value::Const(v) if v.dims.len() == 1 => {
                let data = slice(&v.data, starts[0], ends[0], step)?;
                Ok(vec![Value::Const(Const::new(vec![data.len()], data))])
            }
            _ => Err("slices are only supported on shapes and 1-d constants".into()),
        }
    }

    fn reshape(&mut self, node: &Node, name: &str, shape: &onnx_ir::reshape::ReshapeInput) -> Step {
        let target: Vec<Dim> = match shape {
            onnx_ir::reshape::ReshapeInput::Static(v) => v.iter().map(|&d| Dim::Known(d)).collect(),
            onnx_ir::reshape::ReshapeInput::Runtime(r) => dims_of(&self.value(&node.inputs()[r.input_index])?)
                .ok_or("the target shape must be a constant or computed from shapes")?,
        };
        match self.input(node, 0)? {
            Value::Const(c) => {
                let dims = layout::resolve(&c.dims, None, &target)?;
                Ok(vec![Value::Const(c.reshaped(dims)?)])
            }
            Value::Node(x) => {
                let dims = layout::resolve(&self.onnx_dims(x), Some(self.batch), &target)?;
                Ok(vec![self.view(name, x, &dims)?])
            }
            Value::Shuffled { node: x, groups } => {
                let dims = self.onnx_dims(x);
                let want = layout::resolve(&[dims[0] / groups, groups, dims[1], dims[2]], Some(self.batch), &target)?;
                if want != dims {
                    return Err(format!("a reshape of a shuffled view to {want:?} (only back to {dims:?})"));
                }
                Ok(vec![Value::Node(self.push(name, Op::ChannelShuffle { groups }, vec![x])?)])
            }
            _ => Err("reshape of this value is not supported".into()),
        }
    }

    /// `x` viewed as `dims` (batch excluded): itself, a flatten, an unflatten, or the grouped
    /// view of a channel shuffle.
    fn view(&mut self, name: &str, x: NodeId, dims: &[usize]) -> Result<Value, String> {
        let shape = self.shape(x);
        if dims == shape.dims().as_slice() {
            return Ok(Value::Node(x));
        }
        if dims.iter().product::<usize>() != shape.numel() {
            return Err(format!("cannot view {:?} as {dims:?}", shape.dims()));
        }
        match (dims, shape) {
            ([_], _) => Ok(Value::Node(self.push(name, Op::Flatten, vec![x])?)),
            (&[channels, height, width], _) => {
                Ok(Value::Node(self.push(name, Op::Unflatten { channels, height, width }, vec![x])?))
            }
            (&[groups, _, h, w], ValueShape::Map { height, width, .. }) if (h, w) == (height, width) => {
                Ok(Value::Grouped { node: x, groups })
            }
            _ => Err(format!(
                "a view of {:?} as {dims:?} (batch excluded) is not supported: shrink's values are [c, h, w] maps and \
                 vectors",
                shape.dims()
            )),
        }
    }

    fn squeeze(&mut self, node: &Node, name: &str, axes: Option<&onnx_ir::squeeze::SqueezeInput>) -> Step {
        let axes: Option<Vec<i64>> = match axes {
            None => None,
            Some(onnx_ir::squeeze::SqueezeInput::Static(a)) => Some(a.clone()),
            Some(onnx_ir::squeeze::SqueezeInput::Runtime(r)) => match self.value(&node.inputs()[r.input_index])? {
                Value::Const(c) => Some(c.ints()),
                _ => return Err("squeeze axes must be constants".into()),
            },
        };
        match self.input(node, 0)? {
            Value::Const(c) => {
                Ok(vec![Value::Const(c.reshaped(layout::squeezed(&c.dims, axes.as_deref(), false)?)?)])
            }
            Value::Dims(d) => Ok(vec![Value::Dims(d)]),
            Value::Node(x) => {
                let mut full = vec![1];
                full.extend(self.onnx_dims(x));
                let dims = layout::squeezed(&full, axes.as_deref(), true)?;
                Ok(vec![self.view(name, x, &dims[1..])?])
            }
            _ => Err("squeeze of this value is not supported".into()),
        }
    }

    fn unsqueeze(&mut self, node: &Node, name: &str, c: &onnx_ir::unsqueeze::UnsqueezeConfig) -> Step {
        let axes: Vec<i64> = match c {
            onnx_ir::unsqueeze::UnsqueezeConfig::Static(a) => a.clone(),
            onnx_ir::unsqueeze::UnsqueezeConfig::Runtime(r) => match self.value(&node.inputs()[r.input_index])? {
                Value::Const(c) => c.ints(),
                _ => return Err("unsqueeze axes must be constants".into()),
            },
        };
        match self.input(node, 0)? {
            Value::Const(c) => Ok(vec![Value::Const(c.reshaped(layout::unsqueezed(&c.dims, &axes)?)?)]),
            Value::Dims(d) => Ok(vec![Value::Dims(d)]),
            Value::Node(x) => {
                let mut full = vec![1];
                full.extend(self.onnx_dims(x));
                let dims = layout::unsqueezed(&full, &axes)?;
                if dims[0] != 1 || axes.contains(&0) {
                    return Err("unsqueeze before the batch axis is not supported".into());
                }
                Ok(vec![self.view(name, x, &dims[1..])?])
            }
            _ => Err("unsqueeze of this value is not supported".into()),
        }
    }

    fn transpose(&mut self, node: &Node, name: &str, perm: &[i64]) -> Step {
        match self.input(node, 0)? {
            Value::Grouped { node: x, groups } if perm == [0, 2, 1, 3, 4] => {
                Ok(vec![Value::Shuffled { node: x, groups }])
            }
            Value::Node(x) => {
                let mut full = vec![1];
                full.extend(self.onnx_dims(x));
                let dims = layout::transposed_view(&full, perm)?;
                Ok(vec![self.view(name, x, &dims[1..])?])
            }
            Value::Grouped { .. } => {
                Err(format!("permutation {perm:?} of a grouped view (only a channel shuffle, [0, 2, 1, 3, 4])"))
            }
            _ => Err("transpose of this value is not supported".into()),
        }
    }
}

/// The declared input of the model: `[n, c, h, w]` with `n` possibly dynamic.
pub(super) fn input_dims(arg: &Argument) -> Result<Vec<Option<usize>>, String> {
    match &arg.ty {
        ArgType::Tensor(t) => {
            if t.dtype != burn::tensor::DType::F32 {
                return Err(format!("input `{}` is {:?}; shrink imports models with f32 images", arg.name, t.dtype));
            }
            Ok(t.static_shape.clone().unwrap_or_else(|| vec![None; t.rank]))
        }
        other => Err(format!("input `{}` is a {other}, not a tensor", arg.name)),
    }
}
