//! ONNX export of f32 graphs: every [`Op`] as standard ONNX operators (default domain, opset
//! 13 or 17), weights as initializers, a dynamic batch dimension, node names kept (an ONNX
//! node and its output value are named as the graph node), metadata as the caller gives it.
//!
//! The ops map one to one, except: [`Op::Linear`] is `Gemm` with `transB = 1` (weights stay in
//! PyTorch's `[out, in]` layout), [`Op::Unflatten`] a `Reshape` to `[0, c, h, w]` (0 keeps the
//! batch), [`Op::ChannelShuffle`] `Reshape → Transpose → Reshape` as ShuffleNet's exporters
//! write it, [`Op::HardSwish`] at opset 13 (which has no `HardSwish`) `HardSigmoid` and `Mul`,
//! and [`Op::Clip`] takes its bounds as inputs (opset ≥ 11).

use onnx_ir::{AttributeProto, GraphProto, Message, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto};

use crate::graph::{Graph, NodeId, Op, PadMode, Params, ValueShape};
use crate::host::floats;
use crate::{Error, Result};

/// How a graph is exported.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportOptions {
    /// Opset of the default domain: 13 or 17.
    pub opset: i64,
    /// Fold each batch norm that follows a convolution into its weights and bias (as the CPU
    /// plan and quantization do) instead of writing a `BatchNormalization` node.
    pub fold_batch_norms: bool,
    /// `metadata_props` of the model (shrink's version, the git revision, the config…).
    pub metadata: Vec<(String, String)>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            opset: 17,
            fold_batch_norms: false,
            metadata: vec![("shrink_version".into(), env!("CARGO_PKG_VERSION").into())],
        }
    }
}

/// ONNX's element types, as written here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Elem {
    /// `FLOAT`.
    F32,
    /// `UINT8`.
    U8,
    /// `INT8`.
    I8,
    /// `INT32`.
    I32,
    /// `INT64`.
    I64,
}

impl Elem {
    fn code(self) -> i32 {
        match self {
            Elem::F32 => 1,
            Elem::U8 => 2,
            Elem::I8 => 3,
            Elem::I32 => 6,
            Elem::I64 => 7,
        }
    }
}

/// A node attribute.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    /// `INT`.
    Int(i64),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `FLOAT`.
    Float(f32),
    /// `STRING`.
    Str(String),
}

/// The ONNX graph being written: nodes in order and initializers. Encodings
/// ([`LayerEncoding`]) add their own nodes and tensors through it.
pub struct Writer {
    g: GraphProto,
}

impl Writer {
    /// Appends node `name` (`op_type` of the default domain) writing the value `output`.
    pub fn node(&mut self, name: &str, op_type: &str, inputs: Vec<String>, output: &str, attributes: &[(&str, Attr)]) {
        let mut n = NodeProto::new();
        n.name = name.into();
        n.op_type = op_type.into();
        n.input = inputs;
        n.output = vec![output.into()];
        n.attribute = attributes.iter().map(|(k, v)| attribute(k, v)).collect();
        self.g.node.push(n);
    }

    /// Adds initializer `name` of `elem` and `dims` (empty: a scalar) from its little-endian
    /// bytes; returns the name.
    pub fn tensor(&mut self, name: &str, elem: Elem, dims: &[usize], raw: Vec<u8>) -> String {
        let mut p = TensorProto::new();
        p.name = name.into();
        p.data_type = elem.code();
        p.dims = dims.iter().map(|&d| d as i64).collect();
        p.raw_data = raw.into();
        self.g.initializer.push(p);
        name.into()
    }

    /// An f32 initializer.
    pub fn floats(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        self.tensor(name, Elem::F32, dims, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// An int64 initializer.
    pub fn int64s(&mut self, name: &str, dims: &[usize], values: &[i64]) -> String {
        self.tensor(name, Elem::I64, dims, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }
}

/// How the tensors of conv and linear layers are written. [`Float`] writes them as they are;
/// shrink-quant's QDQ export writes integer weights behind `DequantizeLinear` and
/// `QuantizeLinear`/`DequantizeLinear` pairs on the values the layers read and write.
pub trait LayerEncoding {
    /// The value layer `id` reads instead of `input` (the name of its input value).
    ///
    /// # Errors
    /// The encoding's own (a layer it cannot write).
    fn input(&mut self, w: &mut Writer, graph: &Graph, id: NodeId, input: &str) -> Result<String> {
        let _ = (w, graph, id);
        Ok(input.into())
    }

    /// The value holding layer `id`'s weight `values` of shape `dims` (output channels first;
    /// `[out, in]` for a linear layer), to be named `name`.
    ///
    /// # Errors
    /// As [`LayerEncoding::input`].
    fn weight(
        &mut self,
        w: &mut Writer,
        graph: &Graph,
        id: NodeId,
        name: &str,
        values: &[f32],
        dims: &[usize],
    ) -> Result<String> {
        let _ = (graph, id);
        Ok(w.floats(name, dims, values))
    }

    /// The value holding layer `id`'s bias, to be named `name`.
    ///
    /// # Errors
    /// As [`LayerEncoding::input`].
    fn bias(&mut self, w: &mut Writer, graph: &Graph, id: NodeId, name: &str, values: &[f32]) -> Result<String> {
        let _ = (graph, id);
        Ok(w.floats(name, &[values.len()], values))
    }

    /// The value the consumers of layer `id` read instead of its output `output`.
    ///
    /// # Errors
    /// As [`LayerEncoding::input`].
    fn output(&mut self, w: &mut Writer, graph: &Graph, id: NodeId, output: &str) -> Result<String> {
        let _ = (w, graph, id);
        Ok(output.into())
    }
}

/// The f32 encoding: weights and biases as f32 initializers, values as they are.
pub struct Float;

impl LayerEncoding for Float {}

/// Exports `graph` (f32) as ONNX model bytes.
///
/// # Errors
/// [`Error::InvalidSetting`] for an opset other than 13 or 17; [`Error::InvalidGraph`] when
/// shape inference fails; [`Error::TensorRead`] when a weight cannot be read back.
pub fn export(graph: &Graph, options: &ExportOptions) -> Result<Vec<u8>> {
    export_encoded(graph, options, &mut Float)
}

/// As [`export`], with conv and linear layers written by `encoding` (batch norms folded first
/// when the options say so; an encoding that quantizes is given a folded graph).
///
/// # Errors
/// As [`export`], and the encoding's.
pub fn export_encoded(graph: &Graph, options: &ExportOptions, encoding: &mut dyn LayerEncoding) -> Result<Vec<u8>> {
    if ![13, 17].contains(&options.opset) {
        return Err(Error::setting("opset", format!("13 or 17, got {}", options.opset)));
    }
    let folded;
    let graph = if options.fold_batch_norms {
        folded = graph.fold_batch_norms()?.0;
        &folded
    } else {
        graph
    };
    let shapes = graph.shapes()?;
    let mut w = Writer { g: GraphProto::new() };
    w.g.name = "shrink".into();
    // The name of the value each node's consumers read (an encoding may put nodes after a layer;
    // a folded batch norm, now an identity, is read as its input).
    let mut value: Vec<String> = Vec::with_capacity(graph.nodes.len());
    for (id, node) in graph.nodes.iter().enumerate() {
        let inputs: Vec<String> = node.inputs.iter().map(|&i| value[i].clone()).collect();
        let name = node.name.as_str();
        let input_shape = node.inputs.first().map(|&i| shapes[i]);
        let mut out = name.to_string();
        match (&node.op, &node.params) {
            (Op::Input { channels, height, width }, _) => {
                w.g.input.push(value_info(name, &[*channels, *height, *width]));
            }
            (Op::Conv2d { kernel, stride, padding, dilation, groups, .. }, Some(Params::Conv(p))) => {
                let mut ins = vec![encoding.input(&mut w, graph, id, &inputs[0])?];
                let weight = p.weight.val();
                let dims = weight.dims().to_vec();
                ins.push(encoding.weight(&mut w, graph, id, &format!("{name}.weight"), &floats(weight)?, &dims)?);
                if let Some(b) = &p.bias {
                    ins.push(encoding.bias(&mut w, graph, id, &format!("{name}.bias"), &floats(b.val())?)?);
                }
                let attrs = [
                    ("kernel_shape", ints(kernel)),
                    ("strides", ints(stride)),
                    ("pads", ints(&[padding[0], padding[1], padding[0], padding[1]])),
                    ("dilations", ints(dilation)),
                    ("group", Attr::Int(*groups as i64)),
                ];
                w.node(name, "Conv", ins, name, &attrs);
                out = encoding.output(&mut w, graph, id, name)?;
            }
            (Op::BatchNorm2d { epsilon, .. }, Some(Params::BatchNorm(bn))) => {
                let mut ins = inputs.clone();
                for (suffix, t) in [
                    ("weight", bn.gamma.val()),
                    ("bias", bn.beta.val()),
                    ("running_mean", bn.running_mean.value()),
                    ("running_var", bn.running_var.value()),
                ] {
                    let dims = t.dims().to_vec();
                    ins.push(w.floats(&format!("{name}.{suffix}"), &dims, &floats(t)?));
                }
                w.node(name, "BatchNormalization", ins, name, &[("epsilon", Attr::Float(*epsilon as f32))]);
            }
            (Op::Linear { .. }, Some(Params::Linear(p))) => {
                let mut ins = vec![encoding.input(&mut w, graph, id, &inputs[0])?];
                let weight = p.weight.val();
                let dims = weight.dims().to_vec();
                ins.push(encoding.weight(&mut w, graph, id, &format!("{name}.weight"), &floats(weight)?, &dims)?);
                if let Some(b) = &p.bias {
                    ins.push(encoding.bias(&mut w, graph, id, &format!("{name}.bias"), &floats(b.val())?)?);
                }
                w.node(name, "Gemm", ins, name, &[("transB", Attr::Int(1))]);
                out = encoding.output(&mut w, graph, id, name)?;
            }
            (Op::Identity, _) if id != graph.output => out = inputs[0].clone(),
            (Op::Relu, _) => w.node(name, "Relu", inputs, name, &[]),
            (Op::Sigmoid, _) => w.node(name, "Sigmoid", inputs, name, &[]),
            (Op::Identity, _) => w.node(name, "Identity", inputs, name, &[]),
            (Op::GlobalAvgPool, _) => w.node(name, "GlobalAveragePool", inputs, name, &[]),
            (Op::Flatten, _) => w.node(name, "Flatten", inputs, name, &[("axis", Attr::Int(1))]),
            (Op::Add, _) => {
                let op = if inputs.len() == 2 { "Add" } else { "Sum" };
                w.node(name, op, inputs, name, &[]);
            }
            (Op::Mul, _) => w.node(name, "Mul", inputs, name, &[]),
            (Op::Concat, _) => w.node(name, "Concat", inputs, name, &[("axis", Attr::Int(1))]),
            (Op::Softmax, _) => {
                // The IR's softmax runs over all of a value's features: a map is flattened first.
                let mut ins = inputs;
                if let Some(ValueShape::Map { .. }) = input_shape {
                    let flat = format!("{name}.flat");
                    w.node(&flat, "Flatten", ins, &flat, &[("axis", Attr::Int(1))]);
                    ins = vec![flat];
                }
                w.node(name, "Softmax", ins, name, &[("axis", Attr::Int(1))]);
            }
            (Op::LeakyRelu { alpha }, _) => w.node(name, "LeakyRelu", inputs, name, &[("alpha", Attr::Float(*alpha))]),
            (Op::HardSigmoid { alpha, beta }, _) => w.node(
                name,
                "HardSigmoid",
                inputs,
                name,
                &[("alpha", Attr::Float(*alpha)), ("beta", Attr::Float(*beta))],
            ),
            (Op::HardSwish, _) if options.opset >= 14 => w.node(name, "HardSwish", inputs, name, &[]),
            (Op::HardSwish, _) => {
                let gate = format!("{name}.gate");
                let attrs = [("alpha", Attr::Float(1.0 / 6.0)), ("beta", Attr::Float(0.5))];
                w.node(&gate, "HardSigmoid", inputs.clone(), &gate, &attrs);
                w.node(name, "Mul", vec![inputs[0].clone(), gate], name, &[]);
            }
            (Op::Clip { min, max }, _) => {
                let lo = w.floats(&format!("{name}.min"), &[], &[*min]);
                let hi = w.floats(&format!("{name}.max"), &[], &[*max]);
                w.node(name, "Clip", vec![inputs[0].clone(), lo, hi], name, &[]);
            }
            (Op::MaxPool2d { kernel, stride, padding, padding_end, dilation, ceil_mode }, _) => {
                let end = padding_end.unwrap_or(*padding);
                let attrs = [
                    ("kernel_shape", ints(kernel)),
                    ("strides", ints(stride)),
                    ("pads", ints(&[padding[0], padding[1], end[0], end[1]])),
                    ("dilations", ints(dilation)),
                    ("ceil_mode", Attr::Int(*ceil_mode as i64)),
                ];
                w.node(name, "MaxPool", inputs, name, &attrs);
            }
            (Op::AvgPool2d { kernel, stride, padding, padding_end, ceil_mode, count_include_pad }, _) => {
                let end = padding_end.unwrap_or(*padding);
                let attrs = [
                    ("kernel_shape", ints(kernel)),
                    ("strides", ints(stride)),
                    ("pads", ints(&[padding[0], padding[1], end[0], end[1]])),
                    ("ceil_mode", Attr::Int(*ceil_mode as i64)),
                    ("count_include_pad", Attr::Int(*count_include_pad as i64)),
                ];
                w.node(name, "AveragePool", inputs, name, &attrs);
            }
            (Op::Pad { begin, end, mode }, _) => {
                let pads = [0, 0, begin[0], begin[1], 0, 0, end[0], end[1]].map(|v| v as i64);
                let pads = w.int64s(&format!("{name}.pads"), &[8], &pads);
                let (mode, value) = match mode {
                    PadMode::Constant { value } => ("constant", *value),
                    PadMode::Reflect => ("reflect", 0.0),
                    PadMode::Edge => ("edge", 0.0),
                };
                let value = w.floats(&format!("{name}.value"), &[], &[value]);
                w.node(name, "Pad", vec![inputs[0].clone(), pads, value], name, &[("mode", Attr::Str(mode.into()))]);
            }
            (Op::Lrn { size, alpha, beta, bias }, _) => w.node(
                name,
                "LRN",
                inputs,
                name,
                &[
                    ("size", Attr::Int(*size as i64)),
                    ("alpha", Attr::Float(*alpha)),
                    ("beta", Attr::Float(*beta)),
                    ("bias", Attr::Float(*bias)),
                ],
            ),
            (Op::Unflatten { channels, height, width }, _) => {
                let dims = [0, *channels as i64, *height as i64, *width as i64];
                let shape = w.int64s(&format!("{name}.shape"), &[4], &dims);
                w.node(name, "Reshape", vec![inputs[0].clone(), shape], name, &[]);
            }
            (Op::ChannelShuffle { groups }, _) => {
                let Some(ValueShape::Map { channels, height, width }) = input_shape else {
                    return Err(Error::graph(name, "a channel shuffle needs a feature map"));
                };
                let (g_, c, h, w_) = (*groups as i64, channels as i64, height as i64, width as i64);
                let split = w.int64s(&format!("{name}.split"), &[5], &[0, g_, c / g_, h, w_]);
                let merged = w.int64s(&format!("{name}.merged"), &[4], &[0, c, h, w_]);
                let (a, b) = (format!("{name}.grouped"), format!("{name}.transposed"));
                w.node(&a, "Reshape", vec![inputs[0].clone(), split], &a, &[]);
                w.node(&b, "Transpose", vec![a.clone()], &b, &[("perm", Attr::Ints(vec![0, 2, 1, 3, 4]))]);
                w.node(name, "Reshape", vec![b, merged], name, &[]);
            }
            (op, _) => {
                return Err(Error::graph(name, format!("{} without its parameters cannot be exported", op.kind())));
            }
        }
        if id == graph.output {
            w.g.output.push(value_info(&out, &shapes[id].dims()));
        }
        value.push(out);
    }
    let mut model = ModelProto::new();
    model.ir_version = if options.opset >= 17 { 8 } else { 7 };
    model.producer_name = "shrink".into();
    model.producer_version = env!("CARGO_PKG_VERSION").into();
    // The default domain's opset (its type is not re-exported by onnx-ir: filled in place).
    model.opset_import.push(Default::default());
    if let Some(opset) = model.opset_import.last_mut() {
        opset.version = options.opset;
    }
    for (key, value) in &options.metadata {
        model.metadata_props.push(Default::default());
        if let Some(p) = model.metadata_props.last_mut() {
            p.key = key.clone();
            p.value = value.clone();
        }
    }
    model.graph = Some(w.g).into();
    model.write_to_bytes().map_err(|e| Error::graph("<graph>", format!("cannot encode the ONNX model: {e}")))
}

/// A graph input or output: f32 of `[batch, dims…]`, the batch dynamic.
fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    let mut t = TypeProto::new();
    let tensor = t.mut_tensor_type();
    tensor.elem_type = Elem::F32.code();
    let mut shape = onnx_ir::TensorShapeProto::new();
    shape.dim.push(Default::default());
    if let Some(batch) = shape.dim.last_mut() {
        batch.set_dim_param("batch".into());
    }
    for &d in dims {
        shape.dim.push(Default::default());
        if let Some(dim) = shape.dim.last_mut() {
            dim.set_dim_value(d as i64);
        }
    }
    tensor.shape = Some(shape).into();
    v.type_ = Some(t).into();
    v
}

fn ints(values: &[usize]) -> Attr {
    Attr::Ints(values.iter().map(|&v| v as i64).collect())
}

fn attribute(name: &str, value: &Attr) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    match value {
        Attr::Int(v) => {
            a.type_ = onnx_ir::AttributeType::INT.into();
            a.i = *v;
        }
        Attr::Ints(v) => {
            a.type_ = onnx_ir::AttributeType::INTS.into();
            a.ints = v.clone();
        }
        Attr::Float(v) => {
            a.type_ = onnx_ir::AttributeType::FLOAT.into();
            a.f = *v;
        }
        Attr::Str(v) => {
            a.type_ = onnx_ir::AttributeType::STRING.into();
            a.s = v.as_bytes().to_vec().into();
        }
    }
    a
}
