//! Tensor values on the host: the one conversion every pass uses to read a tensor back.
//!
//! Reading a tensor can fail: a GPU backend may report an execution error, and a dtype may not
//! convert. Every caller receives that failure as [`Error::TensorRead`] — never a panic, and
//! never an empty vector standing in for the values.

use burn::tensor::{Tensor, TensorData};

use crate::{Error, Result};

/// The values of `tensor` as f32, in row-major order.
///
/// # Errors
/// [`Error::TensorRead`] when the backend cannot read the tensor or its values do not convert
/// to f32.
pub fn floats<const D: usize>(tensor: Tensor<D>) -> Result<Vec<f32>> {
    tensor.try_into_vec_as::<f32>().map_err(|e| Error::TensorRead(e.to_string()))
}

/// Reads `tensor` back and drops the values: waits until the device has computed it, so a
/// timing includes the work of an asynchronous backend.
///
/// # Errors
/// [`Error::TensorRead`] when the backend cannot read the tensor.
pub fn wait_for<const D: usize>(tensor: Tensor<D>) -> Result<()> {
    tensor.try_into_data().map(drop).map_err(|e| Error::TensorRead(format!("{e:?}")))
}

/// The values of `data` (already read back) as f32, in row-major order.
///
/// # Errors
/// [`Error::TensorRead`] when its values do not convert to f32.
pub fn data_floats(data: TensorData) -> Result<Vec<f32>> {
    data.try_into_vec_as::<f32>().map_err(|e| Error::TensorRead(format!("{e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Int;

    #[test]
    fn reads_floats_and_converts_other_dtypes() {
        let device = crate::BackendKind::Flex.device().unwrap();
        let t = Tensor::<2>::from_data(TensorData::new(vec![1.5f32, -2.0, 0.0, 3.25], [2, 2]), &device);
        assert_eq!(floats(t).unwrap(), vec![1.5, -2.0, 0.0, 3.25]);
        let ints = Tensor::<1, Int>::from_data(TensorData::new(vec![3i64, -1], [2]), &device);
        assert_eq!(data_floats(ints.into_data()).unwrap(), vec![3.0, -1.0]);
    }
}
