//! Model files: a graph and its weights in one safetensors file.
//!
//! Tensors are stored under `<node>.<param>` (`weight`, `bias`, `gamma`, `beta`,
//! `running_mean`, `running_var`) in little-endian f32, so a round trip is bit-exact and any
//! safetensors reader can open the file. The graph (format tag, names, ops, edges, output) is
//! JSON in the header's `__metadata__` under `shrink.graph`, which makes the file self-describing: a pruned
//! model with new shapes loads back as it is, without the config that made it.
//!
//! Every file is written atomically (a temporary file beside it, then a rename), so a crash
//! never leaves half a model.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use crate::graph::batch_norm_from;
use crate::graph::{ConvParams, Graph, GraphBuilder, LinearParams, NodeId, Op, Params};
use crate::{Error, Result};

/// Format tag in the header, checked on load.
pub const FORMAT: &str = "shrink-graph/1";

#[derive(Serialize, Deserialize)]
struct NodeHeader {
    name: String,
    #[serde(flatten)]
    op: Op,
    inputs: Vec<NodeId>,
}

#[derive(Serialize, Deserialize)]
struct GraphHeader {
    format: String,
    nodes: Vec<NodeHeader>,
    output: NodeId,
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, synced, then
/// renamed over `path`.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

fn to_f32<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<u8>) {
    let data = t.into_data().convert::<f32>();
    let shape = data.shape().to_vec();
    let values: Vec<f32> = data.try_to_vec().expect("converted to f32");
    (shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// The model file's bytes for `graph`.
///
/// # Errors
/// [`Error::InvalidGraph`] if the graph does not validate.
pub fn to_bytes(graph: &Graph) -> Result<Vec<u8>> {
    graph.validate()?;
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for node in &graph.nodes {
        let mut put = |param: &str, value: (Vec<usize>, Vec<u8>)| {
            tensors.insert(format!("{}.{param}", node.name), value);
        };
        match &node.params {
            Some(Params::Conv(p)) => {
                put("weight", to_f32(p.weight.val()));
                if let Some(b) = &p.bias {
                    put("bias", to_f32(b.val()));
                }
            }
            Some(Params::Linear(p)) => {
                put("weight", to_f32(p.weight.val()));
                if let Some(b) = &p.bias {
                    put("bias", to_f32(b.val()));
                }
            }
            Some(Params::BatchNorm(bn)) => {
                put("gamma", to_f32(bn.gamma.val()));
                put("beta", to_f32(bn.beta.val()));
                put("running_mean", to_f32(bn.running_mean.value()));
                put("running_var", to_f32(bn.running_var.value()));
            }
            None => {}
        }
    }
    let header = GraphHeader {
        format: FORMAT.to_string(),
        nodes: graph
            .nodes
            .iter()
            .map(|n| NodeHeader { name: n.name.clone(), op: n.op.clone(), inputs: n.inputs.clone() })
            .collect(),
        output: graph.output,
    };
    // One metadata entry only: safetensors writes its metadata map in hash order, and a model
    // file should be byte-for-byte reproducible.
    let mut meta = HashMap::new();
    meta.insert("shrink.graph".to_string(), serde_json::to_string(&header).expect("serialisable"));
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes))| {
            (k.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).expect("consistent view"))
        })
        .collect();
    Ok(safetensors::serialize(views, Some(meta)).expect("in-memory serialisation"))
}

/// Saves `graph` to `path` (atomically).
///
/// # Errors
/// As [`to_bytes`] and [`write_atomic`].
pub fn save(graph: &Graph, path: &Path) -> Result<()> {
    write_atomic(path, &to_bytes(graph)?)
}

/// Loads a model file onto `device`.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] if it is not a shrink model
/// file, its graph is invalid, a tensor is missing, extra, of the wrong dtype or shape, or holds
/// NaN or infinite values.
pub fn load(path: &Path, device: &Device) -> Result<Graph> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    from_bytes(&bytes, path, device)
}

/// Parses model-file bytes; `path` is only used in error messages.
///
/// # Errors
/// As [`load`].
pub fn from_bytes(bytes: &[u8], path: &Path, device: &Device) -> Result<Graph> {
    let bad = |offset: u64, msg: String| Error::bad_file(path, offset, msg);
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(0, format!("not a valid safetensors file: {e}")))?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| bad(0, format!("not a valid safetensors file: {e}")))?;
    let data_start = 8 + header_len as u64;
    let meta = metadata.metadata().clone().unwrap_or_default();
    let graph_json = meta.get("shrink.graph").ok_or_else(|| {
        bad(8, format!("no `shrink.graph` in the header: not a shrink model file (expected `{FORMAT}`)"))
    })?;
    let header: GraphHeader =
        serde_json::from_str(graph_json).map_err(|e| bad(8, format!("the graph in the header is not valid: {e}")))?;
    if header.format != FORMAT {
        return Err(bad(8, format!("format `{}` is not supported: expected `{FORMAT}`", header.format)));
    }
    let Some(first) = header.nodes.first() else {
        return Err(bad(8, "the graph has no nodes".into()));
    };
    let Op::Input { channels, height, width } = first.op else {
        return Err(bad(8, format!("the first node `{}` is not the input", first.name)));
    };
    let mut builder = GraphBuilder::new([channels, height, width]);
    for node in &header.nodes[1..] {
        builder.push(node.name.clone(), node.op.clone(), node.inputs.clone());
    }
    let names: Vec<String> = header.nodes.iter().map(|n| n.name.clone()).collect();
    if names[0] != "input" {
        return Err(bad(8, format!("the input node must be called `input`, not `{}`", names[0])));
    }
    let mut used = HashSet::new();
    let mut tensor = |name: &str, param: &str, shape: &[usize]| -> Result<TensorData> {
        let key = format!("{name}.{param}");
        let view = st.tensor(&key).map_err(|_| bad(8, format!("tensor `{key}` is missing")))?;
        let offset = data_start + metadata.info(&key).map(|i| i.data_offsets.0 as u64).unwrap_or(0);
        if view.dtype() != Dtype::F32 {
            return Err(bad(offset, format!("tensor `{key}` is {:?}, expected F32", view.dtype())));
        }
        if view.shape() != shape {
            return Err(bad(offset, format!("tensor `{key}` has shape {:?}, the graph says {shape:?}", view.shape())));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(offset + 4 * i as u64, format!("tensor `{key}` holds {} at index {i}", values[i])));
        }
        used.insert(key);
        Ok(TensorData::new(values, shape.to_vec()))
    };
    let graph = builder
        .build_with(header.output, |name, op| {
            Ok(match *op {
                Op::Conv2d { in_channels, out_channels, kernel, groups, bias, .. } => {
                    let w = tensor(name, "weight", &[out_channels, in_channels / groups, kernel[0], kernel[1]])?;
                    let b = if bias { Some(tensor(name, "bias", &[out_channels])?) } else { None };
                    Params::Conv(ConvParams {
                        weight: Param::from_tensor(Tensor::from_data(w, device)),
                        bias: b.map(|b| Param::from_tensor(Tensor::from_data(b, device))),
                    })
                }
                Op::Linear { in_features, out_features, bias } => {
                    let w = tensor(name, "weight", &[out_features, in_features])?;
                    let b = if bias { Some(tensor(name, "bias", &[out_features])?) } else { None };
                    Params::Linear(LinearParams {
                        weight: Param::from_tensor(Tensor::from_data(w, device)),
                        bias: b.map(|b| Param::from_tensor(Tensor::from_data(b, device))),
                    })
                }
                Op::BatchNorm2d { features, epsilon, momentum } => {
                    let mut t = |p: &str| tensor(name, p, &[features]).map(|d| Tensor::<1>::from_data(d, device));
                    Params::BatchNorm(batch_norm_from(
                        t("gamma")?,
                        t("beta")?,
                        t("running_mean")?,
                        t("running_var")?,
                        epsilon,
                        momentum,
                    ))
                }
                _ => unreachable!("only ops with parameters"),
            })
        })
        .map_err(|e| match e {
            Error::InvalidGraph { node, message } => {
                bad(8, format!("invalid graph in the header: node `{node}`: {message}"))
            }
            other => other,
        })?;
    let extra: Vec<&str> = st.names().into_iter().filter(|n| !used.contains(*n)).collect();
    if let Some(name) = extra.first() {
        return Err(bad(8, format!("tensor `{name}` belongs to no node of the graph")));
    }
    Ok(graph)
}
