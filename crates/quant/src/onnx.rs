//! ONNX export of a quantized model in QDQ form, the form ONNX Runtime (and TensorRT, OpenVINO)
//! fuse into integer kernels: standard operators only, no contrib ops.
//!
//! - Each quantized layer's weight is an int8 initializer behind `DequantizeLinear` with one
//!   scale (and zero point) per output channel (`axis = 0`), or one for the layer; weights of
//!   fewer bits are written as int8 with the same values ([`QdqSummary::widened`]).
//! - Its bias is int32 with scale `input scale × weight scale` per output channel.
//! - The value it reads passes through `QuantizeLinear → DequantizeLinear` with the calibrated
//!   u8 scale and zero point the integer kernels use (one pair per value and parameters, shared
//!   by the layers that read it).
//! - Its output is quantized where ONNX Runtime needs it to run the layer in integers and
//!   nothing else does: not when it feeds the next quantized layer directly, nor through a ReLU
//!   that the next layer's zero point 0 already clips (ONNX Runtime removes that ReLU); with the
//!   next layer's own parameters when it reaches quantized layers only through max pooling,
//!   flattening or ReLUs (the same values, as those commute with rounding); otherwise, for a
//!   convolution, with its calibrated output range ([`QuantizedModel::outputs`]) — a rounding
//!   shrink's plan does not do, listed in [`QdqSummary::requantized_outputs`]. A linear layer
//!   that feeds no quantized layer keeps an f32 output (ONNX Runtime: `MatMulIntegerToFloat`).
//! - Layers left in f32 by quantization are written in f32.
//!
//! Names: the layers keep theirs (node and output); the tensors the encoding adds have short
//! ones, which keeps the file near a quarter of the f32 one (long layer names repeated in
//! every tensor name cost ResNet-20 1 % of the f32 file): the `k`-th quantized layer reads its
//! weight as `wk` (the `DequantizeLinear` output) from `wkq` (int8), `wks` (scales) and `wkz`
//! (zero points), its bias as `bk` from `bkq` and `bks`; the `j`-th Q/DQ pair writes `ajq`
//! and `aj` with `ajs` and `ajz`. The added nodes have no names.
//!
//! Size: small constants of equal type, shape and bytes (the zero points 0 of most pairs, the
//! scales of two pairs on one grid) are written once and shared, and a convolution's weight
//! zero points are left out when all are 0 (ONNX Runtime fuses a `Gemm` only with them, so a
//! linear layer keeps its). A smoke LeNet-5 (62k parameters, 236 output channels) writes 0.270×
//! its f32 file, ResNet-20 0.266×.
//!
//! ```no_run
//! # fn quantized() -> shrink_quant::QuantizedModel { unimplemented!() }
//! let model: shrink_quant::QuantizedModel = quantized();
//! let (bytes, summary) = shrink_quant::onnx::export_qdq(&model, &shrink_core::onnx::ExportOptions::default())?;
//! std::fs::write("model.int8.onnx", bytes)?;
//! println!("{} integer layers, {} widened to int8", summary.integer_layers.len(), summary.widened.len());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use shrink_core::graph::{Graph, NodeId, Op};
use shrink_core::onnx::{Attr, Elem, ExportOptions, LayerEncoding, Writer, export_encoded};

use crate::ptq::LayerQuant;
use crate::{Error, QuantParams, QuantizedModel, output_grid};

/// What a QDQ export wrote.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QdqSummary {
    /// Layers written with integer weights.
    pub integer_layers: Vec<String>,
    /// Layers whose weights have fewer than 8 bits, written as int8 with the same values (ONNX
    /// Runtime's integer convolutions and matrix products take 8-bit weights), with their bits.
    pub widened: Vec<(String, u32)>,
    /// Convolutions whose output gets a `QuantizeLinear`/`DequantizeLinear` pair at its
    /// calibrated range: shrink's plan keeps that value in f32 (it feeds a residual add, a
    /// pooling, a layer left in f32 or the model's output), ONNX Runtime needs it quantized.
    pub requantized_outputs: Vec<String>,
    /// Convolutions ONNX Runtime will run in f32: their output feeds no quantized layer and
    /// no output range was calibrated (a model file written before ranges were recorded).
    pub float_outputs: Vec<String>,
    /// Layers left in f32 by quantization, with the reason.
    pub float_layers: Vec<(String, String)>,
}

/// Exports `model` as a QDQ ONNX model (`options.fold_batch_norms` is moot: a quantized
/// model's batch norms are folded).
///
/// # Errors
/// [`Error::Setting`] for a dynamically quantized model (its QDQ form, `DynamicQuantizeLinear`
/// with `MatMulInteger`, is not written yet) or a bias that does not fit int32 at its scale; core's
/// export errors.
pub fn export_qdq(model: &QuantizedModel, options: &ExportOptions) -> Result<(Vec<u8>, QdqSummary), Error> {
    if let Some((name, _)) = model.layers.iter().find(|(_, l)| l.dynamic) {
        return Err(Error::Setting(format!(
            "layer `{name}` is quantized dynamically: only static quantization exports as QDQ (export the f32 \
             model and let the deployment runtime quantize it dynamically)"
        )));
    }
    let mut encoding = Qdq {
        model,
        quantized: HashMap::new(),
        pairs: HashMap::new(),
        indices: HashMap::new(),
        node_names: model.graph.nodes.iter().map(|n| n.name.clone()).collect(),
        constants: HashMap::new(),
        summary: QdqSummary { float_layers: model.float_layers.clone(), ..QdqSummary::default() },
    };
    let options = ExportOptions { fold_batch_norms: false, ..options.clone() };
    let bytes = export_encoded(&model.graph, &options, &mut encoding)?;
    Ok((bytes, encoding.summary))
}

struct Qdq<'a> {
    model: &'a QuantizedModel,
    /// Values already dequantized from a grid, with its parameters.
    quantized: HashMap<String, QuantParams>,
    /// The pair written for each value and parameters (scale as bits).
    pairs: HashMap<(String, u32, i32), String>,
    /// Each quantized layer's index, for its tensors' names.
    indices: HashMap<NodeId, usize>,
    /// The graph's node names, which the added tensors' names must not take.
    node_names: HashSet<String>,
    /// The small constants written, by type, shape and bytes.
    constants: HashMap<(Elem, Vec<usize>, Vec<u8>), String>,
    summary: QdqSummary,
}

impl Qdq<'_> {
    fn layer(&self, graph: &Graph, id: NodeId) -> Option<&LayerQuant> {
        self.model.layers.get(&graph.nodes[id].name)
    }

    /// `value` quantized to `p` and dequantized back (one pair per value and parameters).
    fn pair(&mut self, w: &mut Writer, value: &str, p: QuantParams) -> String {
        if self.quantized.get(value) == Some(&p) {
            return value.into();
        }
        let key = (value.to_string(), p.scale.to_bits(), p.zero_point);
        if let Some(dq) = self.pairs.get(&key) {
            return dq.clone();
        }
        let stem = self.fresh(format!("a{}", self.pairs.len()));
        let scale = self.constant(w, &format!("{stem}s"), Elem::F32, &[], p.scale.to_le_bytes().to_vec());
        let zero = self.constant(w, &format!("{stem}z"), Elem::U8, &[], vec![p.zero_point as u8]);
        let (q, dq) = (format!("{stem}q"), stem);
        w.node("", "QuantizeLinear", vec![value.into(), scale.clone(), zero.clone()], &q, &[]);
        w.node("", "DequantizeLinear", vec![q, scale, zero], &dq, &[]);
        self.quantized.insert(dq.clone(), p);
        self.pairs.insert(key, dq.clone());
        dq
    }

    /// The short name stem of layer `id`'s tensors (`w3`, `b3`: the fourth quantized layer).
    fn index(&mut self, id: NodeId) -> usize {
        let next = self.indices.len();
        *self.indices.entry(id).or_insert(next)
    }

    /// `stem`, or `stem` with `_` appended until neither it nor a name derived from it (`q`,
    /// `s`, `z` appended) is the name of a graph node (whose value the export names after it).
    fn fresh(&self, mut stem: String) -> String {
        while ["", "q", "s", "z"].iter().any(|suffix| self.node_names.contains(&format!("{stem}{suffix}"))) {
            stem.push('_');
        }
        stem
    }

    /// Initializer `name`, or the constant of equal type, shape and bytes written before (small
    /// ones only: zero points and scales); returns the name to read.
    fn constant(&mut self, w: &mut Writer, name: &str, elem: Elem, dims: &[usize], raw: Vec<u8>) -> String {
        if raw.len() > SHARED_BYTES {
            return w.tensor(name, elem, dims, raw);
        }
        let key = (elem, dims.to_vec(), raw);
        if let Some(existing) = self.constants.get(&key) {
            return existing.clone();
        }
        let name = w.tensor(name, elem, dims, key.2.clone());
        self.constants.insert(key, name.clone());
        name
    }
}

/// The largest constant [`Qdq::constant`] shares (a layer's zero points fit).
const SHARED_BYTES: usize = 1024;

impl LayerEncoding for Qdq<'_> {
    fn input(&mut self, w: &mut Writer, graph: &Graph, id: NodeId, input: &str) -> shrink_core::Result<String> {
        match self.layer(graph, id) {
            Some(l) => {
                let p = l.input();
                Ok(self.pair(w, input, p))
            }
            None => Ok(input.into()),
        }
    }

    fn weight(
        &mut self,
        w: &mut Writer,
        graph: &Graph,
        id: NodeId,
        name: &str,
        values: &[f32],
        dims: &[usize],
    ) -> shrink_core::Result<String> {
        let Some(l) = self.layer(graph, id).cloned() else { return Ok(w.floats(name, dims, values)) };
        let layer = l.int_layer();
        let out = dims[0];
        let per = values.len() / out.max(1);
        let ints: Vec<u8> = values.iter().enumerate().map(|(i, &v)| layer.int_weight(v, i / per) as u8).collect();
        let zeros: Vec<u8> = (0..out).map(|o| l.weight_zero_points.get(o).copied().unwrap_or(0) as i8 as u8).collect();
        let per_tensor =
            l.weight_scales.iter().all(|&s| s == l.weight_scales[0]) && zeros.iter().all(|&z| z == zeros[0]);
        let (scale_dims, scales, zeros): (&[usize], &[f32], &[u8]) =
            if per_tensor { (&[], &l.weight_scales[..1], &zeros[..1]) } else { (&[out], &l.weight_scales, &zeros) };
        let node_name = graph.nodes[id].name.clone();
        let bits = l.weight_bits;
        let k = self.index(id);
        let stem = self.fresh(format!("w{k}"));
        let q = w.tensor(&format!("{stem}q"), Elem::I8, dims, ints);
        let scale = self.constant(w, &format!("{stem}s"), Elem::F32, scale_dims, f32_bytes(scales));
        let mut inputs = vec![q, scale];
        // The zero point unless a convolution's are all 0 (the default): ONNX Runtime fuses a
        // Gemm only with it.
        if !(matches!(graph.nodes[id].op, Op::Conv2d { .. }) && zeros.iter().all(|&z| z == 0)) {
            inputs.push(self.constant(w, &format!("{stem}z"), Elem::I8, scale_dims, zeros.to_vec()));
        }
        let attrs: &[(&str, Attr)] = if per_tensor { &[] } else { &[("axis", Attr::Int(0))] };
        w.node("", "DequantizeLinear", inputs, &stem, attrs);
        if bits < 8 {
            self.summary.widened.push((node_name.clone(), bits));
        }
        self.summary.integer_layers.push(node_name);
        Ok(stem)
    }

    fn bias(
        &mut self,
        w: &mut Writer,
        graph: &Graph,
        id: NodeId,
        name: &str,
        values: &[f32],
    ) -> shrink_core::Result<String> {
        let Some(l) = self.layer(graph, id).cloned() else { return Ok(w.floats(name, &[values.len()], values)) };
        let scales: Vec<f32> = l.weight_scales.iter().map(|&s| l.input_scale * s).collect();
        let k = self.index(id);
        let stem = self.fresh(format!("b{k}"));
        let mut ints = Vec::with_capacity(values.len());
        for (o, (&b, &s)) in values.iter().zip(&scales).enumerate() {
            let q = (b / s).round();
            if !q.is_finite() || q.abs() > i32::MAX as f32 {
                return Err(shrink_core::Error::InvalidGraph {
                    node: graph.nodes[id].name.clone(),
                    message: format!(
                        "bias {b} of output channel {o} is {q} steps of input scale × weight scale ({s}): it does not \
                         fit the int32 bias of a QDQ layer"
                    ),
                });
            }
            ints.push(q as i32);
        }
        let q = w.tensor(
            &format!("{stem}q"),
            Elem::I32,
            &[values.len()],
            ints.iter().flat_map(|v| v.to_le_bytes()).collect(),
        );
        let scale = self.constant(w, &format!("{stem}s"), Elem::F32, &[values.len()], f32_bytes(&scales));
        // The zero point is left out: 0, of the int32 type.
        w.node("", "DequantizeLinear", vec![q, scale], &stem, &[("axis", Attr::Int(0))]);
        Ok(stem)
    }

    fn output(&mut self, w: &mut Writer, graph: &Graph, id: NodeId, output: &str) -> shrink_core::Result<String> {
        if self.layer(graph, id).is_none() {
            return Ok(output.into());
        }
        let name = graph.nodes[id].name.clone();
        // A grid of the model's own: the plan rounds there too.
        if let Some(&p) = self.model.outputs.get(&name) {
            self.summary.requantized_outputs.push(name);
            return Ok(self.pair(w, output, p));
        }
        let input_grid = |c: NodeId| self.layer(graph, c).map(|l| l.input());
        let consumers = graph.consumers(id);
        // The next quantized layer's pair serves: it reads this value directly, or through a
        // ReLU that ONNX Runtime folds into a quantization with zero point 0.
        if !consumers.is_empty() && id != graph.output {
            if consumers.iter().all(|&c| input_grid(c).is_some()) {
                return Ok(output.into());
            }
            if let [relu] = consumers[..]
                && matches!(graph.nodes[relu].op, Op::Relu)
                && relu != graph.output
            {
                let after = graph.consumers(relu);
                let grids: Vec<Option<QuantParams>> = after.iter().map(|&c| input_grid(c)).collect();
                if !grids.is_empty() && grids.iter().all(|g| g.is_some_and(|p| p.zero_point == 0) && *g == grids[0]) {
                    return Ok(output.into());
                }
            }
        }
        // The grid downstream layers read it on: rounding here changes nothing.
        if let Some(p) = output_grid(graph, &input_grid, id) {
            return Ok(self.pair(w, output, p));
        }
        if matches!(graph.nodes[id].op, Op::Conv2d { .. }) {
            self.summary.float_outputs.push(name);
        }
        Ok(output.into())
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}
