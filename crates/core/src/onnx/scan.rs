//! What the raw model says before onnx-ir rewrites it: the opset, the producer, the op types
//! the graph's outputs depend on (so every unsupported one is listed at once, by the name the
//! user's exporter gave it), and the original name of each node onnx-ir renames.

use std::collections::{HashMap, HashSet};

use onnx_ir::{AttributeProto, ModelProto, NodeProto, TensorProto};

/// The ONNX op types shrink converts (domain `ai.onnx`), some only in the forms the
/// conversion accepts (see the module docs of [`super`]).
pub const SUPPORTED_OPS: &[&str] = &[
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "Div",
    "Dropout",
    "Flatten",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "LRN",
    "LeakyRelu",
    "MatMul",
    "MaxPool",
    "Mul",
    "Pad",
    "ReduceMean",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Squeeze",
    "Sub",
    "Sum",
    "Swish",
    "Transpose",
    "Unsqueeze",
];

/// Facts read from the raw model.
pub(super) struct Scan {
    /// The default domain's opset.
    pub opset: i64,
    /// `producer_name producer_version`.
    pub producer: String,
    /// Nodes in the file's main graph.
    pub nodes: usize,
    /// `(op type, node name, reason)` of every node the outputs depend on that shrink cannot
    /// convert (the reason when the op type is supported but this use of it is not).
    pub unsupported: Vec<(String, String, Option<String>)>,
    /// onnx-ir's node names (`conv2d3`) to the names in the file.
    pub original_names: HashMap<String, String>,
}

/// Scans `model`, looking at the nodes that `outputs` (all graph outputs if empty) depend on.
pub(super) fn scan(model: &ModelProto, outputs: &[String]) -> Scan {
    let graph = &model.graph;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(0);
    let producer = format!("{} {}", model.producer_name, model.producer_version).trim().to_string();
    let wanted: Vec<String> =
        if outputs.is_empty() { graph.output.iter().map(|o| o.name.clone()).collect() } else { outputs.to_vec() };
    let needed = needed_nodes(&graph.node, &wanted);
    let constants: HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let unsupported = graph
        .node
        .iter()
        .enumerate()
        .filter(|(i, _)| needed.contains(i))
        .filter_map(|(_, n)| {
            if !is_supported(n) {
                return Some((qualified_op(n), display_name(n), None));
            }
            // onnx-ir drops a Dropout before its training flag is seen: check it here.
            let training = n.op_type == "Dropout"
                && n.input.get(2).and_then(|m| constants.get(m.as_str())).is_some_and(|t| is_true(t));
            training.then(|| {
                let why = "training_mode = true drops values at random; import the inference graph";
                (n.op_type.clone(), display_name(n), Some(why.to_string()))
            })
        })
        .collect();
    Scan { opset, producer, nodes: graph.node.len(), unsupported, original_names: original_names(model) }
}

/// Whether a boolean (or numeric) constant holds a non-zero value.
fn is_true(t: &TensorProto) -> bool {
    t.raw_data.iter().any(|&b| b != 0) || t.int32_data.iter().any(|&v| v != 0) || t.int64_data.iter().any(|&v| v != 0)
}

fn is_supported(node: &NodeProto) -> bool {
    (node.domain.is_empty() || node.domain == "ai.onnx") && SUPPORTED_OPS.contains(&node.op_type.as_str())
}

fn qualified_op(node: &NodeProto) -> String {
    if node.domain.is_empty() || node.domain == "ai.onnx" {
        node.op_type.clone()
    } else {
        format!("{}::{}", node.domain, node.op_type)
    }
}

/// The node's name, or its first output's when the exporter left the name empty.
pub(super) fn display_name(node: &NodeProto) -> String {
    if !node.name.is_empty() { node.name.clone() } else { node.output.first().cloned().unwrap_or_default() }
}

/// Indices of the nodes the values `outputs` are computed from.
fn needed_nodes(nodes: &[NodeProto], outputs: &[String]) -> HashSet<usize> {
    let producer: HashMap<&str, usize> =
        nodes.iter().enumerate().flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i))).collect();
    let mut needed = HashSet::new();
    let mut todo: Vec<&str> = outputs.iter().map(String::as_str).collect();
    while let Some(name) = todo.pop() {
        if let Some(&i) = producer.get(name)
            && needed.insert(i)
        {
            todo.extend(nodes[i].input.iter().filter(|s| !s.is_empty()).map(String::as_str));
        }
    }
    needed
}

fn attribute<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

/// onnx-ir names each node `<type><n>`, counting per type in file order, after turning `Conv`
/// into `Conv2d` (and the pools likewise), `Gemm` with explicit `alpha = beta = transB = 1`
/// into `Linear`, and `MatMul` by a constant matrix into `Linear` (absorbing an `Add` of a
/// constant right after it). The same walk over the file gives each of those names back its
/// original.
fn original_names(model: &ModelProto) -> HashMap<String, String> {
    let graph = &model.graph;
    let mut constants: HashMap<&str, usize> =
        graph.initializer.iter().map(|t| (t.name.as_str(), t.dims.len())).collect();
    let mut counters: HashMap<String, usize> = HashMap::new();
    let mut names = HashMap::new();
    let next = |counters: &mut HashMap<String, usize>, kind: &str| -> String {
        let n = counters.entry(kind.to_string()).or_insert(0);
        *n += 1;
        format!("{kind}{n}")
    };
    let mut skip_next = false;
    for (i, node) in graph.node.iter().enumerate() {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        if node.op_type == "Constant"
            && let (Some(out), Some(t)) = (node.output.first(), attribute(node, "value"))
        {
            constants.insert(out.as_str(), t.t.dims.len());
        }
        let spatial = |n: &NodeProto| {
            attribute(n, "kernel_shape")
                .map(|a| a.ints.len())
                .or_else(|| n.input.get(1).and_then(|w| constants.get(w.as_str())).map(|r| r.saturating_sub(2)))
                .unwrap_or(2)
        };
        let kind = match node.op_type.as_str() {
            "Conv" => format!("conv{}d", spatial(node)),
            "MaxPool" => format!("maxpool{}d", spatial(node)),
            "AveragePool" => format!("averagepool{}d", spatial(node)),
            "Gemm" => {
                let f = |name: &str| attribute(node, name).map(|a| a.f);
                let i = |name: &str| attribute(node, name).map(|a| a.i);
                let linear = f("alpha") == Some(1.0)
                    && f("beta") == Some(1.0)
                    && i("transB") == Some(1)
                    && i("transA") != Some(1);
                if linear {
                    next(&mut counters, "gemm");
                    "linear".into()
                } else {
                    "gemm".into()
                }
            }
            "MatMul" if node.input.get(1).and_then(|w| constants.get(w.as_str())) == Some(&2) => {
                next(&mut counters, "matmul");
                if let (Some(add), Some(out)) = (graph.node.get(i + 1), node.output.first()) {
                    let bias = |k: usize| add.input.get(k).is_some_and(|b| constants.contains_key(b.as_str()));
                    skip_next = add.op_type == "Add"
                        && add.input.len() == 2
                        && ((add.input[0] == *out && bias(1)) || (add.input[1] == *out && bias(0)));
                }
                "linear".into()
            }
            other => other.to_lowercase(),
        };
        names.insert(next(&mut counters, &kind), display_name(node));
    }
    names
}
