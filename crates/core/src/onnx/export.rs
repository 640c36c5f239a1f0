//! ONNX export of f32 graphs: every [`Op`] as standard ONNX operators (default domain, opset
//! 13 or 17), weights as initializers, a dynamic batch dimension, node names kept (an ONNX
//! node and its output value are named as the graph node), metadata as the caller gives it.
//!
//! The ops map one to one, except: [`Op::Linear`] is `Gemm` with `transB = 1` (weights stay in
//! PyTorch's `[out, in]` layout), [`Op::Unflatten`] a `Reshape` to `[0, c, h, w]` (0 keeps the
//! batch), [`Op::ChannelShuffle`] `Reshape → Transpose → Reshape` as ShuffleNet's exporters
//! write it, [`Op::HardSwish`] at opset 13 (which has no `HardSwish`) `HardSigmoid` and `Mul`,
//! and [`Op::Clip`] takes its bounds as inputs (opset ≥ 11).

use burn::tensor::Tensor;
use onnx_ir::{AttributeProto, GraphProto, Message, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto};

use crate::graph::{Graph, Op, PadMode, Params, ValueShape};
use crate::host::floats;
use crate::{Error, Result};

/// How a graph is exported.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportOptions {
    /// Opset of the default domain: 13 or 17.
    pub opset: i64,
    /// `metadata_props` of the model (shrink's version, the git revision, the config…).
    pub metadata: Vec<(String, String)>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self { opset: 17, metadata: vec![("shrink_version".into(), env!("CARGO_PKG_VERSION").into())] }
    }
}

/// ONNX's element types used here.
const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// Exports `graph` (f32; batch norms kept as `BatchNormalization`) as ONNX model bytes.
///
/// # Errors
/// [`Error::InvalidSetting`] for an opset other than 13 or 17; [`Error::InvalidGraph`] when
/// shape inference fails; [`Error::TensorRead`] when a weight cannot be read back.
pub fn export(graph: &Graph, options: &ExportOptions) -> Result<Vec<u8>> {
    if ![13, 17].contains(&options.opset) {
        return Err(Error::setting("opset", format!("13 or 17, got {}", options.opset)));
    }
    let shapes = graph.shapes()?;
    let mut g = GraphProto::new();
    g.name = "shrink".into();
    for (id, node) in graph.nodes.iter().enumerate() {
        let inputs: Vec<String> = node.inputs.iter().map(|&i| graph.nodes[i].name.clone()).collect();
        let name = node.name.as_str();
        let input_shape = node.inputs.first().map(|&i| shapes[i]);
        match (&node.op, &node.params) {
            (Op::Input { channels, height, width }, _) => {
                g.input.push(value_info(name, &[*channels, *height, *width]));
            }
            (Op::Conv2d { kernel, stride, padding, dilation, groups, .. }, Some(Params::Conv(p))) => {
                let mut ins = inputs.clone();
                ins.push(initializer(&mut g, &format!("{name}.weight"), p.weight.val())?);
                if let Some(b) = &p.bias {
                    ins.push(initializer(&mut g, &format!("{name}.bias"), b.val())?);
                }
                let attrs = vec![
                    ints("kernel_shape", kernel),
                    ints("strides", stride),
                    ints("pads", &[padding[0], padding[1], padding[0], padding[1]]),
                    ints("dilations", dilation),
                    int("group", *groups as i64),
                ];
                g.node.push(node_proto(name, "Conv", ins, name, attrs));
            }
            (Op::BatchNorm2d { epsilon, .. }, Some(Params::BatchNorm(bn))) => {
                let mut ins = inputs.clone();
                ins.push(initializer(&mut g, &format!("{name}.weight"), bn.gamma.val())?);
                ins.push(initializer(&mut g, &format!("{name}.bias"), bn.beta.val())?);
                ins.push(initializer(&mut g, &format!("{name}.running_mean"), bn.running_mean.value())?);
                ins.push(initializer(&mut g, &format!("{name}.running_var"), bn.running_var.value())?);
                g.node.push(node_proto(name, "BatchNormalization", ins, name, vec![float("epsilon", *epsilon as f32)]));
            }
            (Op::Linear { .. }, Some(Params::Linear(p))) => {
                let mut ins = inputs.clone();
                ins.push(initializer(&mut g, &format!("{name}.weight"), p.weight.val())?);
                if let Some(b) = &p.bias {
                    ins.push(initializer(&mut g, &format!("{name}.bias"), b.val())?);
                }
                g.node.push(node_proto(name, "Gemm", ins, name, vec![int("transB", 1)]));
            }
            (Op::Relu, _) => g.node.push(node_proto(name, "Relu", inputs, name, vec![])),
            (Op::Sigmoid, _) => g.node.push(node_proto(name, "Sigmoid", inputs, name, vec![])),
            (Op::Identity, _) => g.node.push(node_proto(name, "Identity", inputs, name, vec![])),
            (Op::GlobalAvgPool, _) => g.node.push(node_proto(name, "GlobalAveragePool", inputs, name, vec![])),
            (Op::Flatten, _) => g.node.push(node_proto(name, "Flatten", inputs, name, vec![int("axis", 1)])),
            (Op::Add, _) => {
                let op = if inputs.len() == 2 { "Add" } else { "Sum" };
                g.node.push(node_proto(name, op, inputs, name, vec![]));
            }
            (Op::Mul, _) => g.node.push(node_proto(name, "Mul", inputs, name, vec![])),
            (Op::Concat, _) => g.node.push(node_proto(name, "Concat", inputs, name, vec![int("axis", 1)])),
            (Op::Softmax, _) => {
                // The IR's softmax runs over all of a value's features: a map is flattened first.
                let mut ins = inputs;
                if let Some(ValueShape::Map { .. }) = input_shape {
                    let flat = format!("{name}.flat");
                    g.node.push(node_proto(&flat, "Flatten", ins, &flat, vec![int("axis", 1)]));
                    ins = vec![flat];
                }
                g.node.push(node_proto(name, "Softmax", ins, name, vec![int("axis", 1)]));
            }
            (Op::LeakyRelu { alpha }, _) => {
                g.node.push(node_proto(name, "LeakyRelu", inputs, name, vec![float("alpha", *alpha)]))
            }
            (Op::HardSigmoid { alpha, beta }, _) => g.node.push(node_proto(
                name,
                "HardSigmoid",
                inputs,
                name,
                vec![float("alpha", *alpha), float("beta", *beta)],
            )),
            (Op::HardSwish, _) if options.opset >= 14 => {
                g.node.push(node_proto(name, "HardSwish", inputs, name, vec![]))
            }
            (Op::HardSwish, _) => {
                let gate = format!("{name}.gate");
                let attrs = vec![float("alpha", 1.0 / 6.0), float("beta", 0.5)];
                g.node.push(node_proto(&gate, "HardSigmoid", inputs.clone(), &gate, attrs));
                g.node.push(node_proto(name, "Mul", vec![inputs[0].clone(), gate], name, vec![]));
            }
            (Op::Clip { min, max }, _) => {
                let lo = scalar(&mut g, &format!("{name}.min"), *min);
                let hi = scalar(&mut g, &format!("{name}.max"), *max);
                g.node.push(node_proto(name, "Clip", vec![inputs[0].clone(), lo, hi], name, vec![]));
            }
            (Op::MaxPool2d { kernel, stride, padding, padding_end, dilation, ceil_mode }, _) => {
                let end = padding_end.unwrap_or(*padding);
                let attrs = vec![
                    ints("kernel_shape", kernel),
                    ints("strides", stride),
                    ints("pads", &[padding[0], padding[1], end[0], end[1]]),
                    ints("dilations", dilation),
                    int("ceil_mode", *ceil_mode as i64),
                ];
                g.node.push(node_proto(name, "MaxPool", inputs, name, attrs));
            }
            (Op::AvgPool2d { kernel, stride, padding, padding_end, ceil_mode, count_include_pad }, _) => {
                let end = padding_end.unwrap_or(*padding);
                let attrs = vec![
                    ints("kernel_shape", kernel),
                    ints("strides", stride),
                    ints("pads", &[padding[0], padding[1], end[0], end[1]]),
                    int("ceil_mode", *ceil_mode as i64),
                    int("count_include_pad", *count_include_pad as i64),
                ];
                g.node.push(node_proto(name, "AveragePool", inputs, name, attrs));
            }
            (Op::Pad { begin, end, mode }, _) => {
                let pads = [0, 0, begin[0], begin[1], 0, 0, end[0], end[1]].map(|v| v as i64);
                let pads = int64s(&mut g, &format!("{name}.pads"), &pads);
                let (mode, value) = match mode {
                    PadMode::Constant { value } => ("constant", *value),
                    PadMode::Reflect => ("reflect", 0.0),
                    PadMode::Edge => ("edge", 0.0),
                };
                let value = scalar(&mut g, &format!("{name}.value"), value);
                let attrs = vec![string("mode", mode)];
                g.node.push(node_proto(name, "Pad", vec![inputs[0].clone(), pads, value], name, attrs));
            }
            (Op::Lrn { size, alpha, beta, bias }, _) => g.node.push(node_proto(
                name,
                "LRN",
                inputs,
                name,
                vec![int("size", *size as i64), float("alpha", *alpha), float("beta", *beta), float("bias", *bias)],
            )),
            (Op::Unflatten { channels, height, width }, _) => {
                let shape =
                    int64s(&mut g, &format!("{name}.shape"), &[0, *channels as i64, *height as i64, *width as i64]);
                g.node.push(node_proto(name, "Reshape", vec![inputs[0].clone(), shape], name, vec![]));
            }
            (Op::ChannelShuffle { groups }, _) => {
                let Some(ValueShape::Map { channels, height, width }) = input_shape else {
                    return Err(Error::graph(name, "a channel shuffle needs a feature map"));
                };
                let (g_, c, h, w) = (*groups as i64, channels as i64, height as i64, width as i64);
                let split = int64s(&mut g, &format!("{name}.split"), &[0, g_, c / g_, h, w]);
                let merged = int64s(&mut g, &format!("{name}.merged"), &[0, c, h, w]);
                let (a, b) = (format!("{name}.grouped"), format!("{name}.transposed"));
                g.node.push(node_proto(&a, "Reshape", vec![inputs[0].clone(), split], &a, vec![]));
                g.node.push(node_proto(&b, "Transpose", vec![a.clone()], &b, vec![ints("perm", &[0, 2, 1, 3, 4])]));
                g.node.push(node_proto(name, "Reshape", vec![b, merged], name, vec![]));
            }
            (op, _) => {
                return Err(Error::graph(name, format!("{} without its parameters cannot be exported", op.kind())));
            }
        }
        if id == graph.output {
            g.output.push(value_info(name, &shapes[id].dims()));
        }
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
    model.graph = Some(g).into();
    model.write_to_bytes().map_err(|e| Error::graph("<graph>", format!("cannot encode the ONNX model: {e}")))
}

/// A graph input or output: f32 of `[batch, dims…]`, the batch dynamic.
fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
    let mut v = ValueInfoProto::new();
    v.name = name.into();
    let mut t = TypeProto::new();
    let tensor = t.mut_tensor_type();
    tensor.elem_type = FLOAT;
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

fn node_proto(name: &str, op: &str, inputs: Vec<String>, output: &str, attributes: Vec<AttributeProto>) -> NodeProto {
    let mut n = NodeProto::new();
    n.name = name.into();
    n.op_type = op.into();
    n.input = inputs;
    n.output = vec![output.into()];
    n.attribute = attributes;
    n
}

fn attribute(name: &str, kind: onnx_ir::AttributeType) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.name = name.into();
    a.type_ = kind.into();
    a
}

fn ints(name: &str, values: &[usize]) -> AttributeProto {
    let mut a = attribute(name, onnx_ir::AttributeType::INTS);
    a.ints = values.iter().map(|&v| v as i64).collect();
    a
}

fn int(name: &str, value: i64) -> AttributeProto {
    let mut a = attribute(name, onnx_ir::AttributeType::INT);
    a.i = value;
    a
}

fn float(name: &str, value: f32) -> AttributeProto {
    let mut a = attribute(name, onnx_ir::AttributeType::FLOAT);
    a.f = value;
    a
}

fn string(name: &str, value: &str) -> AttributeProto {
    let mut a = attribute(name, onnx_ir::AttributeType::STRING);
    a.s = value.as_bytes().to_vec().into();
    a
}

/// Adds a weight as an f32 initializer named `name`; returns the name.
fn initializer<const D: usize>(g: &mut GraphProto, name: &str, t: Tensor<D>) -> Result<String> {
    let dims: Vec<i64> = t.dims().iter().map(|&d| d as i64).collect();
    let values = floats(t)?;
    let mut p = TensorProto::new();
    p.name = name.into();
    p.data_type = FLOAT;
    p.dims = dims;
    p.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    g.initializer.push(p);
    Ok(name.into())
}

/// A scalar f32 initializer.
fn scalar(g: &mut GraphProto, name: &str, value: f32) -> String {
    let mut p = TensorProto::new();
    p.name = name.into();
    p.data_type = FLOAT;
    p.raw_data = value.to_le_bytes().to_vec().into();
    g.initializer.push(p);
    name.into()
}

/// A 1-d int64 initializer (shapes, pads).
fn int64s(g: &mut GraphProto, name: &str, values: &[i64]) -> String {
    let mut p = TensorProto::new();
    p.name = name.into();
    p.data_type = INT64;
    p.dims = vec![values.len() as i64];
    p.raw_data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    g.initializer.push(p);
    name.into()
}
