//! ONNX import: a model trained and exported elsewhere becomes a [`Graph`], the one IR every
//! stage (training, pruning, quantization, distillation, the CPU plan, model files) works on.
//!
//! The file is parsed by [onnx-ir](https://docs.rs/onnx-ir), burn's own ONNX front end: it
//! reads every opset, types every value, infers static shapes and folds constants. This module
//! maps its typed nodes onto shrink's ops ([`SUPPORTED_OPS`]) and refuses, before anything
//! runs, a model with any op or attribute outside that set, naming every node at fault.
//!
//! How ONNX constructs land in the IR:
//! - `Conv` with asymmetric or `SAME_*` padding: a [`Op::Pad`] node, then the convolution
//!   with the symmetric part (the kernels pad symmetrically).
//! - `Gemm` and `MatMul` by a constant matrix: [`Op::Linear`] (`alpha`, `beta`, `transB`
//!   folded into the weight and bias).
//! - `Add`/`Sub`/`Mul`/`Div` by a constant of one value or one per channel: a 1×1 depthwise
//!   convolution with bias (consecutive ones merged), so that pruning, quantization and the
//!   CPU plan handle it as any other layer. Between two computed values: `Add` of equal
//!   shapes, `Mul` of equal shapes or by one value per channel (squeeze-and-excitation).
//! - `Reshape`/`Flatten`/`Squeeze`/`Unsqueeze`/`Transpose` that keep the values in order:
//!   [`Op::Flatten`], [`Op::Unflatten`] or nothing; `Reshape → Transpose → Reshape` of
//!   ShuffleNet: [`Op::ChannelShuffle`]. Shapes computed at run time from `Shape` (PyTorch's
//!   `x.view(x.size(0), -1)`) are evaluated with a symbolic batch.
//! - `ReduceMean` over height and width: [`Op::GlobalAvgPool`]; `GlobalMaxPool`: a max pool
//!   over the whole map; `Swish`: sigmoid and product; `Sum`: [`Op::Add`].
//! - `Identity`, `Dropout` and casts to f32 disappear; `Constant`, `ConstantOfShape` and
//!   arithmetic on constants are folded.
//! - A final `Softmax` is removed unless [`ImportOptions::keep_final_softmax`]: shrink's
//!   losses and accuracy take logits.
//!
//! ```no_run
//! use shrink_core::onnx::{ImportOptions, import};
//! let device = shrink_core::BackendKind::Flex.device()?;
//! let imported = import(std::path::Path::new("model.onnx"), &ImportOptions::default(), &device)?;
//! println!("{}", imported.summary);
//! let graph = imported.graph; // train, prune, quantize, freeze… as any graph
//! # Ok::<(), shrink_core::Error>(())
//! ```

mod convert;
mod export;
mod layout;
mod scan;
mod values;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use onnx_ir::{Message, ModelProto, OnnxGraph, OnnxGraphBuilder};
use serde::{Deserialize, Serialize};

use self::convert::{Converter, HostParams, input_dims};
pub use self::export::{Attr, Elem, ExportOptions, Float, LayerEncoding, Writer, export, export_encoded};
pub use self::scan::SUPPORTED_OPS;
use self::values::Value;
use crate::graph::{ConvParams, Graph, GraphBuilder, LinearParams, NodeId, Op, Params, batch_norm_from};
use crate::{Error, Result};

/// How a model is imported.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportOptions {
    /// `[channels, height, width]` of the images: fills the dims the model leaves dynamic and
    /// replaces a fixed height and width (a fully convolutional model takes any size); the
    /// channels must be the model's.
    #[serde(default)]
    pub input_shape: Option<[usize; 3]>,
    /// Keep a final `Softmax` (by default it is removed and the graph outputs logits).
    #[serde(default)]
    pub keep_final_softmax: bool,
    /// The graph output to import, by its name in the file (needed when there are several).
    #[serde(default)]
    pub output: Option<String>,
}

/// What an import did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImportSummary {
    /// The model file.
    pub path: PathBuf,
    /// Opset of the default domain.
    pub opset: i64,
    /// The exporter, as the file names it.
    pub producer: String,
    /// Nodes in the file.
    pub onnx_nodes: usize,
    /// Nodes of the graph built (input included).
    pub graph_nodes: usize,
    /// ONNX op types that became graph nodes, and how many of each (constants folded away are
    /// not counted).
    pub ops: BTreeMap<String, usize>,
    /// `[channels, height, width]` of the input.
    pub input: [usize; 3],
    /// Whether the model declares a dynamic batch.
    pub dynamic_batch: bool,
    /// Whether a final softmax was removed.
    pub removed_softmax: bool,
}

impl fmt::Display for ImportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ops: Vec<String> = self.ops.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        write!(
            f,
            "{}: opset {}, from {}; {} ONNX nodes → {} graph nodes ({}); input {:?}{}{}",
            self.path.display(),
            self.opset,
            if self.producer.is_empty() { "an unnamed exporter" } else { &self.producer },
            self.onnx_nodes,
            self.graph_nodes,
            ops.join(", "),
            self.input,
            if self.dynamic_batch { ", dynamic batch" } else { "" },
            if self.removed_softmax { "; final softmax removed (the graph outputs logits)" } else { "" },
        )
    }
}

/// An imported model.
#[derive(Debug)]
pub struct Imported {
    /// The graph, parameters on the device asked for.
    pub graph: Graph,
    /// What the import did.
    pub summary: ImportSummary,
}

/// Imports the ONNX model at `path` (external weight files next to it are read too).
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::Onnx`] naming the file and every node
/// that cannot be converted (unsupported op types are all listed at once, with the supported
/// set), or a model that is not valid ONNX.
pub fn import(path: &Path, options: &ImportOptions, device: &Device) -> Result<Imported> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    import_with(&bytes, path, true, options, device)
}

/// Imports an ONNX model held in memory; `origin` names it in messages.
///
/// # Errors
/// As [`import`].
pub fn import_bytes(bytes: &[u8], origin: &Path, options: &ImportOptions, device: &Device) -> Result<Imported> {
    import_with(bytes, origin, false, options, device)
}

fn import_with(
    bytes: &[u8],
    path: &Path,
    from_file: bool,
    options: &ImportOptions,
    device: &Device,
) -> Result<Imported> {
    let fail = |message: String| Error::Onnx { path: path.to_path_buf(), message };
    let model = ModelProto::parse_from_bytes(bytes).map_err(|e| fail(format!("not an ONNX model: {e}")))?;
    let file_outputs: Vec<String> = model.graph.output.iter().map(|o| o.name.clone()).collect();
    let output_index = match (&options.output, file_outputs.len()) {
        (Some(name), _) => file_outputs.iter().position(|o| o == name).ok_or_else(|| {
            fail(format!("`model.output = \"{name}\"` is not a graph output; the outputs are {file_outputs:?}"))
        })?,
        (None, 1) => 0,
        (None, 0) => return Err(fail("the graph has no outputs".into())),
        (None, _) => {
            return Err(fail(format!(
                "the graph has {} outputs {file_outputs:?}: choose one with `output` (config key `model.output`)",
                file_outputs.len()
            )));
        }
    };
    let facts = scan::scan(&model, &file_outputs[output_index..=output_index]);
    if !facts.unsupported.is_empty() {
        let list: Vec<String> = facts
            .unsupported
            .iter()
            .map(|(op, name, why)| match why {
                Some(why) => format!("  {op} (node `{name}`): {why}"),
                None => format!("  {op} (node `{name}`)"),
            })
            .collect();
        let kinds: HashSet<&str> = facts.unsupported.iter().map(|(op, _, _)| op.as_str()).collect();
        return Err(fail(format!(
            "{} node(s) of {} op type(s) shrink cannot import:\n{}\nsupported ONNX ops: {}",
            list.len(),
            kinds.len(),
            list.join("\n"),
            SUPPORTED_OPS.join(", ")
        )));
    }
    drop(model);
    let parsed = catch_unwind(AssertUnwindSafe(|| {
        let builder = OnnxGraphBuilder::new();
        if from_file { builder.parse_file(path) } else { builder.parse_bytes(bytes) }
    }));
    let onnx = match parsed {
        Ok(Ok(graph)) => graph,
        Ok(Err(e)) => return Err(fail(format!("onnx-ir could not read the model: {e}"))),
        Err(_) => return Err(fail("onnx-ir stopped on this model (a panic while parsing)".into())),
    };
    let (graph, removed_softmax, ops, input, dynamic_batch) =
        convert_graph(&onnx, &facts, output_index, options, device).map_err(fail)?.map_err(|e| fail(e.to_string()))?;
    let summary = ImportSummary {
        path: path.to_path_buf(),
        opset: facts.opset,
        producer: facts.producer,
        onnx_nodes: facts.nodes,
        graph_nodes: graph.nodes.len(),
        ops,
        input,
        dynamic_batch,
        removed_softmax,
    };
    tracing::info!(target: "shrink::onnx", "imported {summary}");
    Ok(Imported { graph, summary })
}

type Converted = (Graph, bool, BTreeMap<String, usize>, [usize; 3], bool);

/// The conversion proper. The outer error lists the nodes at fault; the inner one is a graph
/// that does not build (a parameter that is not finite).
fn convert_graph(
    onnx: &OnnxGraph,
    facts: &scan::Scan,
    output_index: usize,
    options: &ImportOptions,
    device: &Device,
) -> std::result::Result<Result<Converted>, String> {
    let inputs: Vec<_> = onnx.inputs.iter().filter(|a| a.value().is_none()).collect();
    let [arg] = inputs.as_slice() else {
        let names: Vec<&str> = inputs.iter().map(|a| a.name.as_str()).collect();
        return Err(format!(
            "the model has {} inputs {names:?}; shrink imports models with one image input",
            names.len()
        ));
    };
    let dims = input_dims(arg)?;
    let (input, batch, flat) = input_layout(&arg.name, &dims, options.input_shape)?;
    let mut conv = Converter::new(input, batch, facts.opset, &facts.original_names, onnx);
    let mut input_value = 0;
    if flat {
        input_value = conv.push("input.flatten", Op::Flatten, vec![0])?;
    }
    conv.values.insert(arg.name.clone(), Value::Node(input_value));
    for node in &onnx.nodes {
        conv.convert(node);
    }
    let out_arg = onnx.outputs.get(output_index).ok_or("onnx-ir lost the graph output")?;
    let mut output = match conv.values.get(&out_arg.name) {
        Some(Value::Node(id)) => Some(*id),
        _ if !conv.problems.is_empty() => None,
        _ => {
            conv.problems.push("the graph output is a constant or a 5-d view, not a computed value".into());
            None
        }
    };
    if !conv.problems.is_empty() {
        return Err(format!("{} node(s) cannot be converted:\n  {}", conv.problems.len(), conv.problems.join("\n  ")));
    }
    let mut id = output.take().expect("no problems: the output is a node");
    let removed_softmax = !options.keep_final_softmax && matches!(conv.nodes[id].1, Op::Softmax);
    if removed_softmax {
        id = conv.nodes[id].2[0];
    }
    let (graph_nodes, output) = live_nodes(&conv.nodes, id);
    let mut builder = GraphBuilder::new(input);
    for (name, op, inputs) in graph_nodes.into_iter().skip(1) {
        builder.push(name, op, inputs);
    }
    let params = conv.params;
    let graph = builder.build_with(output, |name, _| make_params(name, params.get(name), device));
    Ok(graph.map(|g| (g, removed_softmax, conv.ops, input, batch.is_none())))
}

/// `[c, h, w]` of the input, the batch it declares (`None`: dynamic), and whether it is a
/// vector `[n, f]` (then the graph's input is `[f, 1, 1]`, flattened).
fn input_layout(
    name: &str,
    dims: &[Option<usize>],
    wanted: Option<[usize; 3]>,
) -> std::result::Result<([usize; 3], Option<usize>, bool), String> {
    let (batch, rest, flat) = match dims {
        [n, c, h, w] => (*n, vec![*c, *h, *w], false),
        [n, f] => (*n, vec![*f, Some(1), Some(1)], true),
        _ => {
            return Err(format!(
                "input `{name}` has rank {}; shrink imports [n, c, h, w] images (or [n, f] vectors)",
                dims.len()
            ));
        }
    };
    let mut input = [0; 3];
    for (i, d) in rest.iter().enumerate() {
        input[i] = match (d, wanted) {
            // Height and width may differ from what the model was exported with (a fully
            // convolutional model takes any size; one that bakes the size in fails to convert,
            // naming the node); the channels may not.
            (Some(d), Some(w)) if w[i] != *d && (i == 0 || flat) => {
                let declared: Vec<String> = rest.iter().map(|d| d.map_or("?".into(), |v| v.to_string())).collect();
                return Err(format!(
                    "input `{name}` is [{}] in the model, but the images are {w:?}",
                    declared.join(", ")
                ));
            }
            (_, Some(w)) => w[i],
            (Some(d), None) => *d,
            (None, None) => {
                return Err(format!(
                    "input `{name}` has a dynamic dimension {} (of {dims:?}): give the image shape \
                     (`ImportOptions::input_shape`; the runner passes the data's)",
                    i + 1
                ));
            }
        };
    }
    if input.contains(&0) {
        return Err(format!("input `{name}` has an empty dimension: {dims:?}"));
    }
    Ok((input, batch, flat))
}

/// The nodes `output` depends on, renumbered in order, and the output's new id.
fn live_nodes(nodes: &[(String, Op, Vec<NodeId>)], output: NodeId) -> (Vec<(String, Op, Vec<NodeId>)>, NodeId) {
    let mut live = vec![false; nodes.len()];
    live[0] = true;
    live[output] = true;
    for id in (0..=output).rev() {
        if live[id] {
            for &i in &nodes[id].2 {
                live[i] = true;
            }
        }
    }
    let mut new_id = vec![usize::MAX; nodes.len()];
    let mut kept = Vec::new();
    for (id, (name, op, inputs)) in nodes.iter().enumerate() {
        if live[id] {
            new_id[id] = kept.len();
            kept.push((name.clone(), op.clone(), inputs.iter().map(|&i| new_id[i]).collect()));
        }
    }
    (kept, new_id[output])
}

fn make_params(name: &str, host: Option<&HostParams>, device: &Device) -> Result<Params> {
    let finite = |values: &[f32], what: &str| -> Result<()> {
        match values.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(Error::graph(name, format!("{what} value {i} is {} in the model", values[i]))),
            None => Ok(()),
        }
    };
    fn tensor<const D: usize>(values: &[f32], dims: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values.to_vec(), dims), device)
    }
    let vector = |values: &[f32]| -> Tensor<1> { tensor(values, [values.len()], device) };
    let bias = |b: &Option<Vec<f32>>| -> Result<Option<Param<Tensor<1>>>> {
        b.as_ref().map(|b| finite(b, "bias").map(|_| Param::from_tensor(vector(b)))).transpose()
    };
    match host {
        Some(HostParams::Conv { weight, bias: b, dims }) => {
            finite(weight, "weight")?;
            Ok(Params::Conv(ConvParams { weight: Param::from_tensor(tensor(weight, *dims, device)), bias: bias(b)? }))
        }
        Some(HostParams::Linear { weight, bias: b, dims }) => {
            finite(weight, "weight")?;
            Ok(Params::Linear(LinearParams {
                weight: Param::from_tensor(tensor(weight, *dims, device)),
                bias: bias(b)?,
            }))
        }
        Some(HostParams::BatchNorm { gamma, beta, mean, var, epsilon, momentum }) => {
            for (v, what) in [(gamma, "scale"), (beta, "bias"), (mean, "mean"), (var, "variance")] {
                finite(v, what)?;
            }
            Ok(Params::BatchNorm(batch_norm_from(
                vector(gamma),
                vector(beta),
                vector(mean),
                vector(var),
                *epsilon,
                *momentum,
            )))
        }
        None => Err(Error::graph(name, "no parameters were converted for this layer")),
    }
}
