//! Weight-only quantization of any burn module — a user's own struct as well as a graph — as a
//! burn [`ModuleMapper`]: every weight tensor (rank ≥ 2; biases and norms stay f32) is rounded to
//! the scheme's integer grid and replaced by its dequantized value, and the integers and their
//! scales are kept, so the caller knows exactly what a compact file would store.

use std::collections::HashMap;

use burn::module::{ModuleMapper, Param, ParamId};
use burn::tensor::{Tensor, TensorData};

use crate::{Error, QuantParams, QuantScheme, fake_quantize};

/// One quantized weight tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeight {
    /// Shape of the tensor.
    pub shape: Vec<usize>,
    /// Scale and zero-point per slice (one, or one per output channel).
    pub params: Vec<QuantParams>,
    /// Largest error `|w − dequantized(w)|` over the tensor.
    pub max_error: f32,
}

/// Quantizes the weights of any burn module: `module.map(&mut WeightQuantizer::new(scheme)?)`.
#[derive(Clone, Debug)]
pub struct WeightQuantizer {
    scheme: QuantScheme,
    /// What was quantized, by parameter id.
    pub quantized: HashMap<ParamId, QuantizedWeight>,
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
        Ok(Self { scheme, quantized: HashMap::new() })
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
        let param = param.map(|tensor| {
            let shape = tensor.shape().dims::<D>().to_vec();
            let values: Vec<f32> = tensor.clone().into_data().convert::<f32>().try_to_vec().expect("f32 values");
            let (q, params) = fake_quantize(&values, &shape, scheme).expect("bits checked, shape from the tensor");
            let max_error = values.iter().zip(&q).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            record = Some(QuantizedWeight { shape: shape.clone(), params, max_error });
            let out = Tensor::<D>::from_data(TensorData::new(q, shape), &tensor.device());
            if tensor.is_require_grad() { out.require_grad() } else { out }
        });
        if let Some(r) = record {
            self.quantized.insert(id, r);
        }
        param
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Granularity;
    use burn::module::Module;

    #[test]
    fn any_module_gets_weight_only_quantization_within_half_a_step() {
        let device = shrink_core::BackendKind::Flex.device().unwrap();
        let g = shrink_core::zoo::ModelSpec::Lenet5.build([1, 28, 28], 10, &device).unwrap();
        let scheme = QuantScheme { bits: 4, symmetric: true, granularity: Granularity::PerChannel };
        let mut q = WeightQuantizer::new(scheme).unwrap();
        let out = g.clone().map(&mut q);
        assert_eq!(q.quantized.len(), 5, "conv1, conv2, fc1, fc2, fc3");
        for w in q.quantized.values() {
            assert_eq!(w.params.len(), w.shape[0], "one scale per output channel");
            let step = w.params.iter().map(|p| p.scale).fold(0.0, f32::max);
            assert!(w.max_error <= step / 2.0 + 1e-6);
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
