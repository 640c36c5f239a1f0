//! Weight-only quantization of any burn module — a user's own struct as well as a graph — as a
//! burn [`ModuleMapper`]: every weight tensor (rank ≥ 2; biases and norms stay f32) is rounded to
//! the scheme's integer grid and replaced by its dequantized value, and the integers and their
//! scales and zero points are kept ([`QuantizedWeight`]), so the caller holds exactly what a
//! compact file would store.

use std::collections::HashMap;

use burn::module::{ModuleMapper, Param, ParamId};
use burn::tensor::{Tensor, TensorData};

use crate::{Error, QuantParams, QuantScheme};

/// One quantized weight tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeight {
    /// Shape of the tensor.
    pub shape: Vec<usize>,
    /// The stored integers, row-major (see [`crate::scheme::Quantized::integers`]); the weight
    /// now holds `scale · (q − zero_point)` of its slice.
    pub integers: Vec<i16>,
    /// Scale and zero-point per slice (one, or one per output channel).
    pub params: Vec<QuantParams>,
    /// Largest error `|w − dequantized(w)|` over the tensor.
    pub max_error: f32,
}

/// Quantizes the weights of any burn module: `WeightQuantizer::new(scheme)?.quantize(module)?`,
/// or `module.map(&mut quantizer)` and then [`WeightQuantizer::failure`].
#[derive(Debug)]
pub struct WeightQuantizer {
    scheme: QuantScheme,
    /// What was quantized, by parameter id.
    pub quantized: HashMap<ParamId, QuantizedWeight>,
    /// The first weight that could not be read back (left unchanged), if any.
    failure: Option<Error>,
}

impl WeightQuantizer {
    /// A quantizer for `scheme` (2 to 8 bits, symmetric or not, per tensor or per output channel).
    ///
    /// # Errors
    /// [`Error::InvalidBits`] outside 2..=8.
    pub fn new(scheme: QuantScheme) -> Result<Self, Error> {
        if !(2..=8).contains(&scheme.bits) {
            return Err(Error::InvalidBits(scheme.bits));
        }
        Ok(Self { scheme, quantized: HashMap::new(), failure: None })
    }

    /// Quantizes the weights of `module` and returns it.
    ///
    /// # Errors
    /// [`Error::Core`] when a weight cannot be read back from its device.
    pub fn quantize<M: burn::module::Module>(&mut self, module: M) -> Result<M, Error> {
        let module = module.map(self);
        match self.failure.take() {
            Some(e) => Err(e),
            None => Ok(module),
        }
    }

    /// The first error of a [`ModuleMapper`] pass (a weight that could not be read back, left
    /// unchanged), if any.
    pub fn failure(&self) -> Option<&Error> {
        self.failure.as_ref()
    }

    /// Values quantized so far.
    pub fn values(&self) -> usize {
        self.quantized.values().map(|q| q.shape.iter().product::<usize>()).sum()
    }

    /// Bytes the quantized tensors take stored compactly: `bits` per value (packed), plus a 4-byte
    /// scale (and, asymmetric, a 4-byte zero-point) per slice.
    pub fn stored_bytes(&self) -> usize {
        let per_slice = if self.scheme.symmetric { 4 } else { 8 };
        let params: usize = self.quantized.values().map(|q| q.params.len() * per_slice).sum();
        (self.values() * self.scheme.bits as usize).div_ceil(8) + params
    }
}

impl ModuleMapper for WeightQuantizer {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D < 2 {
            return param;
        }
        let (id, scheme) = (param.id, self.scheme);
        let mut record = None;
        let mut failure = None;
        let param = param.map(|tensor| {
            let shape = tensor.shape().dims::<D>().to_vec();
            let values = match shrink_core::host::floats(tensor.clone()) {
                Ok(v) => v,
                Err(e) => {
                    failure = Some(Error::from(e));
                    return tensor;
                }
            };
            let q = crate::scheme::quantize(&values, &shape, scheme).expect("bits checked, shape from the tensor");
            let deq = q.dequantize();
            let max_error = values.iter().zip(&deq).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            record = Some(QuantizedWeight { shape: shape.clone(), integers: q.integers, params: q.params, max_error });
            let out = Tensor::<D>::from_data(TensorData::new(deq, shape), &tensor.device());
            if tensor.is_require_grad() { out.require_grad() } else { out }
        });
        if let Some(r) = record {
            self.quantized.insert(id, r);
        }
        if let Some(e) = failure {
            self.failure.get_or_insert(e);
        }
        param
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Granularity;

    #[test]
    fn any_module_gets_weight_only_quantization_within_half_a_step() {
        let device = shrink_core::BackendKind::Flex.device().unwrap();
        let g = shrink_core::zoo::ModelSpec::Lenet5.build([1, 28, 28], 10, 1, &device).unwrap();
        let scheme = QuantScheme { bits: 4, symmetric: true, granularity: Granularity::PerChannel };
        let mut q = WeightQuantizer::new(scheme).unwrap();
        let out = q.quantize(g.clone()).unwrap();
        assert_eq!(q.quantized.len(), 5, "conv1, conv2, fc1, fc2, fc3");
        for w in q.quantized.values() {
            assert_eq!(w.params.len(), w.shape[0], "one scale per output channel");
            let step = w.params.iter().map(|p| p.scale).fold(0.0, f32::max);
            assert!(w.max_error <= step / 2.0 + 1e-6);
            assert_eq!(w.integers.len(), w.shape.iter().product::<usize>());
            assert!(w.integers.iter().all(|q| (-7..=7).contains(q)), "int4 symmetric");
        }
        // The kept integers are the weights the module now holds: `scale · q` per channel.
        let conv1 = out.nodes[out.node_id("conv1").unwrap()].params.clone();
        let Some(shrink_core::graph::Params::Conv(conv1)) = conv1 else { panic!("conv1 is a conv") };
        let held = shrink_core::host::floats(conv1.weight.val()).unwrap();
        let kept = &q.quantized[&conv1.weight.id];
        let per = kept.integers.len() / kept.shape[0];
        for (i, (&w, &q)) in held.iter().zip(&kept.integers).enumerate() {
            assert_eq!(w, kept.params[i / per].scale * q as f32, "weight {i}");
        }
        // 61,470 weights at 4 bits, plus a scale per channel: about an eighth of their f32 bytes.
        assert_eq!(q.values(), 150 + 2400 + 48000 + 10080 + 840);
        assert!(q.stored_bytes() * 7 < q.values() * 4);
        // The model still runs, on 16 levels per channel.
        let x = burn::tensor::Tensor::<4>::zeros([1, 1, 28, 28], &device);
        assert_eq!(out.forward(x).dims(), [1, 10]);
        assert!(WeightQuantizer::new(QuantScheme { bits: 1, ..scheme }).is_err());
    }
}
