//! Model files: a graph and its weights in one safetensors file.
//!
//! Tensors are stored under `<node>.<param>` (`weight`, `bias`, `gamma`, `beta`,
//! `running_mean`, `running_var`) in little-endian f32, so a round trip is bit-exact and any
//! safetensors reader can open the file. The graph (format tag, names, ops, edges, output) is
//! JSON in the header's `__metadata__` under `shrink.graph`, which makes the file self-describing: a pruned
//! model with new shapes loads back as it is, without the config that made it.
//!
//! Sparse weights (pruned: at most [`SPARSE_FILE_MAX_DENSITY`] of the values non-zero) are
//! stored as a bitmask of the non-zeros (`<node>.weight_mask`, U8, bit `i % 8` of byte `i / 8`)
//! and the non-zero values in order (`<node>.weight_nz`, F32, or `<node>.weight_q8_nz`, I8, for
//! int8 weights), which is exact and, at 90 % sparsity, 7.6× (f32) or 4.4× (int8) smaller.
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

/// Weights with at most this fraction of non-zero values are stored as bitmask + non-zeros (the
/// bitmask costs 1/32 of the f32 values, 1/8 of the int8 ones).
pub const SPARSE_FILE_MAX_DENSITY: f64 = 0.75;

type Stored = BTreeMap<String, (Vec<usize>, Vec<u8>)>;

fn put(tensors: &mut Stored, node: &str, param: &str, value: (Vec<usize>, Vec<u8>)) {
    tensors.insert(format!("{node}.{param}"), value);
}

/// An f32 weight, as `weight` or — when sparse enough — as `weight_mask` and `weight_nz`.
fn put_weight(tensors: &mut Stored, node: &str, value: (Vec<usize>, Vec<u8>)) {
    let (shape, bytes) = value;
    let count = bytes.len() / 4;
    let floats = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    // Zero is +0.0 exactly: a -0.0 is kept as a value, so the round trip stays bit-exact.
    let nnz = floats.clone().filter(|v| v.to_bits() != 0).count();
    if count > 0 && (nnz as f64) <= SPARSE_FILE_MAX_DENSITY * count as f64 {
        let mask = bitmask(floats.clone().map(|v| v.to_bits() != 0), count);
        put(tensors, node, "weight_mask", (vec![mask.len()], mask));
        let nz: Vec<u8> = floats.filter(|v| v.to_bits() != 0).flat_map(|v| v.to_le_bytes()).collect();
        put(tensors, node, "weight_nz", (vec![nnz], nz));
    } else {
        put(tensors, node, "weight", (shape, bytes));
    }
}

/// The bitmask of the non-zeros among `is_nz` (bit `i % 8` of byte `i / 8`).
fn bitmask(is_nz: impl Iterator<Item = bool>, count: usize) -> Vec<u8> {
    let mut mask = vec![0u8; count.div_ceil(8)];
    for (i, nz) in is_nz.enumerate() {
        if nz {
            mask[i / 8] |= 1 << (i % 8);
        }
    }
    mask
}

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
    /// What a technique crate records about the model (quantization parameters, …), opaque here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    annotations: Option<serde_json::Value>,
}

/// A conv or linear weight stored as integers:
/// `weight = scales[o] · (values − zero_points[o])` for output channel `o`.
#[derive(Clone, Debug, PartialEq)]
pub struct IntWeights {
    /// Bits per value: 8 (stored as I8), 4 or 2 (packed into bytes, low bits first).
    pub bits: u32,
    /// Integers in the weight's layout, each in `[-2^(bits-1), 2^(bits-1) - 1]` (symmetric
    /// int8 weights never use -128).
    pub values: Vec<i8>,
    /// One scale per output channel.
    pub scales: Vec<f32>,
    /// Asymmetric weights: one zero point per output channel, in the values' range (stored as
    /// `<node>.weight_zero_point`, I8). Empty: symmetric, every zero point 0.
    pub zero_points: Vec<i8>,
}

impl IntWeights {
    /// The weight in f32: `scales[o] · (values − zero_points[o])`.
    pub fn dequantize(&self) -> Vec<f32> {
        let per = self.values.len() / self.scales.len().max(1);
        self.values
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let z = self.zero_points.get(i / per).map_or(0, |&z| z as i32);
                (q as i32 - z) as f32 * self.scales[i / per]
            })
            .collect()
    }
}

impl IntWeights {
    /// The tensor name suffix and the stored bytes.
    fn encode(&self) -> (String, Vec<u8>) {
        match self.bits {
            8 => ("weight_q8".into(), self.values.iter().map(|&v| v as u8).collect()),
            bits => {
                let per = 8 / bits as usize;
                let mask = (1u8 << bits) - 1;
                let bytes = self
                    .values
                    .chunks(per)
                    .map(|c| {
                        c.iter().enumerate().fold(0u8, |acc, (i, &v)| acc | (((v as u8) & mask) << (i * bits as usize)))
                    })
                    .collect();
                (format!("weight_q{bits}"), bytes)
            }
        }
    }

    /// The inverse of `encode` for `count` values.
    fn decode(bits: u32, bytes: &[u8], count: usize) -> Vec<i8> {
        if bits == 8 {
            return bytes.iter().map(|&b| b as i8).collect();
        }
        let per = 8 / bits as usize;
        let shift = 8 - bits;
        (0..count)
            .map(|i| {
                let raw = bytes[i / per] >> ((i % per) * bits as usize);
                // Sign-extend the low `bits` bits.
                ((raw << shift) as i8) >> shift
            })
            .collect()
    }
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same folder, synced,
/// renamed over `path`, then the folder synced, so after a power loss `path` holds either the old
/// bytes or the new ones.
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
        std::fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Makes a rename in `dir` durable: the new directory entry reaches the disk, not only the
/// file's contents (POSIX leaves the entry in the page cache until the directory is synced).
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir; // Windows cannot open a directory as a file; its renames are journaled by NTFS.
    Ok(())
}

fn to_f32<const D: usize>(t: Tensor<D>) -> Result<(Vec<usize>, Vec<u8>)> {
    let shape = t.dims().to_vec();
    let values = crate::host::floats(t)?;
    Ok((shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
}

/// The model file's bytes for `graph`.
///
/// # Errors
/// [`Error::InvalidGraph`] if the graph does not validate.
pub fn to_bytes(graph: &Graph) -> Result<Vec<u8>> {
    to_bytes_with(graph, &BTreeMap::new(), None)
}

/// The model file's bytes for `graph`, with the weights of the layers named in `ints` stored as
/// integers and scales instead of f32 (the values in `graph` are not read for them), and
/// `annotations` kept in the header.
///
/// # Errors
/// [`Error::InvalidGraph`] if the graph does not validate, or an entry of `ints` names no conv
/// or linear layer, or does not fit its weight; [`Error::TensorRead`] if a parameter cannot be
/// read.
pub fn to_bytes_with(
    graph: &Graph,
    ints: &BTreeMap<String, IntWeights>,
    annotations: Option<&serde_json::Value>,
) -> Result<Vec<u8>> {
    graph.validate()?;
    for (name, w) in ints {
        let id =
            graph.node_id(name).map_err(|_| Error::graph(name, "integer weights for a node that does not exist"))?;
        let dims = match &graph.nodes[id].params {
            Some(Params::Conv(p)) => p.weight.dims().to_vec(),
            Some(Params::Linear(p)) => p.weight.dims().to_vec(),
            _ => return Err(Error::graph(name, "integer weights for a node that is not a conv or linear layer")),
        };
        let lo = -(1i32 << (w.bits.clamp(1, 8) - 1));
        let out_of_range = |v: &i8| (*v as i32) < lo || (*v as i32) > -lo - 1;
        if ![2, 4, 8].contains(&w.bits)
            || w.values.len() != dims.iter().product::<usize>()
            || w.scales.len() != dims[0]
            || w.values.iter().any(out_of_range)
            || !(w.zero_points.is_empty() || w.zero_points.len() == dims[0])
            || w.zero_points.iter().any(out_of_range)
        {
            return Err(Error::graph(name, "integer weights do not fit the layer's weight"));
        }
    }
    let mut tensors: Stored = BTreeMap::new();
    for node in &graph.nodes {
        if let Some(w) = ints.get(&node.name) {
            let nnz = w.values.iter().filter(|v| **v != 0).count();
            if w.bits == 8 && (nnz as f64) <= SPARSE_FILE_MAX_DENSITY * w.values.len() as f64 {
                let mask = bitmask(w.values.iter().map(|v| *v != 0), w.values.len());
                put(&mut tensors, &node.name, "weight_mask", (vec![mask.len()], mask));
                let nz: Vec<u8> = w.values.iter().filter(|v| **v != 0).map(|&v| v as u8).collect();
                put(&mut tensors, &node.name, "weight_q8_nz", (vec![nz.len()], nz));
            } else {
                let (suffix, bytes) = w.encode();
                let len = bytes.len();
                put(&mut tensors, &node.name, &suffix, (vec![len], bytes));
            }
            put(
                &mut tensors,
                &node.name,
                "weight_scale",
                (vec![w.scales.len()], w.scales.iter().flat_map(|v| v.to_le_bytes()).collect()),
            );
            if !w.zero_points.is_empty() {
                let zeros = w.zero_points.iter().map(|&z| z as u8).collect();
                put(&mut tensors, &node.name, "weight_zero_point", (vec![w.zero_points.len()], zeros));
            }
        }
        let quantized = ints.contains_key(&node.name);
        match &node.params {
            Some(Params::Conv(p)) => {
                if !quantized {
                    put_weight(&mut tensors, &node.name, to_f32(p.weight.val())?);
                }
                if let Some(b) = &p.bias {
                    put(&mut tensors, &node.name, "bias", to_f32(b.val())?);
                }
            }
            Some(Params::Linear(p)) => {
                if !quantized {
                    put_weight(&mut tensors, &node.name, to_f32(p.weight.val())?);
                }
                if let Some(b) = &p.bias {
                    put(&mut tensors, &node.name, "bias", to_f32(b.val())?);
                }
            }
            Some(Params::BatchNorm(bn)) => {
                put(&mut tensors, &node.name, "gamma", to_f32(bn.gamma.val())?);
                put(&mut tensors, &node.name, "beta", to_f32(bn.beta.val())?);
                put(&mut tensors, &node.name, "running_mean", to_f32(bn.running_mean.value())?);
                put(&mut tensors, &node.name, "running_var", to_f32(bn.running_var.value())?);
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
        annotations: annotations.cloned(),
    };
    // One metadata entry only: safetensors writes its metadata map in hash order, and a model
    // file should be byte-for-byte reproducible.
    let mut meta = HashMap::new();
    meta.insert("shrink.graph".to_string(), serde_json::to_string(&header).expect("serialisable"));
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes))| {
            let dtype =
                if k.ends_with(".weight_q8") || k.ends_with(".weight_q8_nz") || k.ends_with(".weight_zero_point") {
                    Dtype::I8
                } else if k.ends_with(".weight_q4") || k.ends_with(".weight_q2") || k.ends_with(".weight_mask") {
                    Dtype::U8
                } else {
                    Dtype::F32
                };
            (k.clone(), TensorView::new(dtype, shape.clone(), bytes).expect("consistent view"))
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
    from_bytes_with(bytes, path, device).map(|m| m.graph)
}

/// A model file as read by [`from_bytes_with`].
#[derive(Debug)]
pub struct LoadedModel {
    /// The graph; integer weights dequantized (`value * scale`) into its f32 weights.
    pub graph: Graph,
    /// The integer weights as stored, by node name.
    pub int_weights: BTreeMap<String, IntWeights>,
    /// The header's annotations.
    pub annotations: Option<serde_json::Value>,
}

/// As [`from_bytes`], also returning the integer weights and the header's annotations.
///
/// # Errors
/// As [`load`]; also integer weights out of their range, and scales that are not finite and
/// positive.
pub fn from_bytes_with(bytes: &[u8], path: &Path, device: &Device) -> Result<LoadedModel> {
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
    let used = std::cell::RefCell::new(HashSet::new());
    let ints = std::cell::RefCell::new(BTreeMap::new());
    let f32_values = |name: &str, param: &str, shape: &[usize]| -> Result<Vec<f32>> {
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
        used.borrow_mut().insert(key);
        Ok(values)
    };
    let tensor = |name: &str, param: &str, shape: &[usize]| -> Result<TensorData> {
        Ok(TensorData::new(f32_values(name, param, shape)?, shape.to_vec()))
    };
    // Asymmetric integer weights' zero points (`<name>.weight_zero_point`, I8 [out], in the
    // range of `bits`), or none (symmetric).
    let zero_points = |name: &str, out: usize, bits: u32| -> Result<Vec<i8>> {
        let key = format!("{name}.weight_zero_point");
        let Ok(view) = st.tensor(&key) else { return Ok(Vec::new()) };
        let offset = data_start + metadata.info(&key).map(|i| i.data_offsets.0 as u64).unwrap_or(0);
        if view.dtype() != Dtype::I8 || view.shape() != [out] {
            return Err(bad(
                offset,
                format!("tensor `{key}` is {:?} {:?}, expected I8 [{out}]", view.dtype(), view.shape()),
            ));
        }
        let zeros: Vec<i8> = view.data().iter().map(|&b| b as i8).collect();
        let lo = -(1i32 << (bits - 1));
        if let Some(i) = zeros.iter().position(|&z| (z as i32) < lo || (z as i32) > -lo - 1) {
            return Err(bad(
                offset + i as u64,
                format!("tensor `{key}` holds {} at index {i}: outside the {bits}-bit range", zeros[i]),
            ));
        }
        used.borrow_mut().insert(key);
        Ok(zeros)
    };
    // A sparse weight: the bitmask of its non-zeros, checked against the values stored, and the
    // values spread back into place (int8 values with their scales).
    let sparse = |name: &str, shape: &[usize]| -> Result<Option<TensorData>> {
        let mask_key = format!("{name}.weight_mask");
        let Ok(mask) = st.tensor(&mask_key) else { return Ok(None) };
        let offset_of = |key: &str| data_start + metadata.info(key).map(|i| i.data_offsets.0 as u64).unwrap_or(0);
        let count: usize = shape.iter().product();
        if mask.dtype() != Dtype::U8 || mask.shape() != [count.div_ceil(8)] {
            return Err(bad(
                offset_of(&mask_key),
                format!(
                    "tensor `{mask_key}` is {:?} {:?}, expected U8 [{}] for a weight of shape {shape:?}",
                    mask.dtype(),
                    mask.shape(),
                    count.div_ceil(8)
                ),
            ));
        }
        let bits = mask.data();
        if !count.is_multiple_of(8) && bits[bits.len() - 1] >> (count % 8) != 0 {
            return Err(bad(
                offset_of(&mask_key) + bits.len() as u64 - 1,
                format!("tensor `{mask_key}` marks values past the weight's {count}"),
            ));
        }
        let nnz: usize = bits.iter().map(|b| b.count_ones() as usize).sum();
        let (f32_key, q8_key) = (format!("{name}.weight_nz"), format!("{name}.weight_q8_nz"));
        let (key, int8) = match (st.tensor(&f32_key).is_ok(), st.tensor(&q8_key).is_ok()) {
            (true, false) => (f32_key, false),
            (false, true) => (q8_key, true),
            _ => {
                return Err(bad(
                    offset_of(&mask_key),
                    format!("tensor `{mask_key}` needs exactly one of `{f32_key}` and `{q8_key}`"),
                ));
            }
        };
        let view = st.tensor(&key).expect("found above");
        let (dtype, size) = if int8 { (Dtype::I8, 1) } else { (Dtype::F32, 4) };
        if view.dtype() != dtype || view.shape() != [nnz] {
            return Err(bad(
                offset_of(&key),
                format!(
                    "tensor `{key}` is {:?} {:?}, expected {dtype:?} [{nnz}] (the non-zeros its mask marks)",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        let positions = (0..count).filter(|i| bits[i / 8] >> (i % 8) & 1 == 1);
        let data = view.data();
        used.borrow_mut().insert(mask_key);
        used.borrow_mut().insert(key.clone());
        if !int8 {
            let mut dense = vec![0.0f32; count];
            for (j, i) in positions.enumerate() {
                let c = &data[j * size..j * size + 4];
                let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                if !v.is_finite() {
                    return Err(bad(offset_of(&key) + 4 * j as u64, format!("tensor `{key}` holds {v} at index {j}")));
                }
                dense[i] = v;
            }
            return Ok(Some(TensorData::new(dense, shape.to_vec())));
        }
        let zero_points = zero_points(name, shape[0], 8)?;
        let mut values = vec![0i8; count];
        for (j, i) in positions.enumerate() {
            values[i] = data[j] as i8;
            if values[i] == i8::MIN && zero_points.is_empty() {
                return Err(bad(
                    offset_of(&key) + j as u64,
                    format!("tensor `{key}` holds -128 at index {j}: symmetric int8 weights stop at -127"),
                ));
            }
        }
        let scales = f32_values(name, "weight_scale", &[shape[0]])?;
        if let Some(i) = scales.iter().position(|&s| s <= 0.0) {
            return Err(bad(
                8,
                format!("tensor `{name}.weight_scale` holds {} at index {i}: scales must be positive", scales[i]),
            ));
        }
        let w = IntWeights { bits: 8, values, scales, zero_points };
        let deq = w.dequantize();
        ints.borrow_mut().insert(name.to_string(), w);
        Ok(Some(TensorData::new(deq, shape.to_vec())))
    };
    // A weight: f32, or integers and per-channel scales, dense or sparse.
    let weight = |name: &str, shape: &[usize]| -> Result<TensorData> {
        if let Some(w) = sparse(name, shape)? {
            return Ok(w);
        }
        let q = [8u32, 4, 2].into_iter().find(|b| st.tensor(&format!("{name}.weight_q{b}")).is_ok());
        let Some(bits) = q else { return tensor(name, "weight", shape) };
        let key = format!("{name}.weight_q{bits}");
        let view = st.tensor(&key).expect("found above");
        let offset = data_start + metadata.info(&key).map(|i| i.data_offsets.0 as u64).unwrap_or(0);
        let count: usize = shape.iter().product();
        let (dtype, stored) =
            if bits == 8 { (Dtype::I8, count) } else { (Dtype::U8, count.div_ceil(8 / bits as usize)) };
        if view.dtype() != dtype || view.shape() != [stored] {
            return Err(bad(
                offset,
                format!(
                    "tensor `{key}` is {:?} {:?}, expected {dtype:?} [{stored}] for a weight of shape {shape:?}",
                    view.dtype(),
                    view.shape()
                ),
            ));
        }
        let values = IntWeights::decode(bits, view.data(), count);
        let zero_points = zero_points(name, shape[0], bits)?;
        if bits == 8
            && zero_points.is_empty()
            && let Some(i) = values.iter().position(|&v| v == i8::MIN)
        {
            return Err(bad(
                offset + i as u64,
                format!("tensor `{key}` holds -128 at index {i}: symmetric int8 weights stop at -127"),
            ));
        }
        used.borrow_mut().insert(key);
        let scales = f32_values(name, "weight_scale", &[shape[0]])?;
        if let Some(i) = scales.iter().position(|&s| s <= 0.0) {
            return Err(bad(
                8,
                format!("tensor `{name}.weight_scale` holds {} at index {i}: scales must be positive", scales[i]),
            ));
        }
        let w = IntWeights { bits, values, scales, zero_points };
        let deq = w.dequantize();
        ints.borrow_mut().insert(name.to_string(), w);
        Ok(TensorData::new(deq, shape.to_vec()))
    };
    let graph = builder
        .build_with(header.output, |name, op| {
            Ok(match *op {
                Op::Conv2d { in_channels, out_channels, kernel, groups, bias, .. } => {
                    let w = weight(name, &[out_channels, in_channels / groups, kernel[0], kernel[1]])?;
                    let b = if bias { Some(tensor(name, "bias", &[out_channels])?) } else { None };
                    Params::Conv(ConvParams {
                        weight: Param::from_tensor(Tensor::from_data(w, device)),
                        bias: b.map(|b| Param::from_tensor(Tensor::from_data(b, device))),
                    })
                }
                Op::Linear { in_features, out_features, bias } => {
                    let w = weight(name, &[out_features, in_features])?;
                    let b = if bias { Some(tensor(name, "bias", &[out_features])?) } else { None };
                    Params::Linear(LinearParams {
                        weight: Param::from_tensor(Tensor::from_data(w, device)),
                        bias: b.map(|b| Param::from_tensor(Tensor::from_data(b, device))),
                    })
                }
                Op::BatchNorm2d { features, epsilon, momentum } => {
                    let t = |p: &str| tensor(name, p, &[features]).map(|d| Tensor::<1>::from_data(d, device));
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
    let used = used.into_inner();
    let extra: Vec<&str> = st.names().into_iter().filter(|n| !used.contains(*n)).collect();
    if let Some(name) = extra.first() {
        return Err(bad(8, format!("tensor `{name}` belongs to no node of the graph")));
    }
    Ok(LoadedModel { graph, int_weights: ints.into_inner(), annotations: header.annotations })
}
