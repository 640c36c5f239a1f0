//! What an ONNX value is while a model is converted: a node of the graph, a constant, a shape
//! (with a symbolic batch), or one of the two views a channel shuffle passes through.
//!
//! Constants are folded here (weights computed by `ConstantOfShape`, `Unsqueeze`, arithmetic
//! on initializers), and shape arithmetic (`Shape → Gather/Slice → Concat → Reshape`, as
//! PyTorch writes `x.view(x.size(0), -1)`) is evaluated with the batch left symbolic.

use crate::graph::NodeId;

/// A constant tensor, values widened to f64 (weights are f32, shapes i64: both fit exactly).
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Const {
    /// Dimensions (empty for a scalar).
    pub dims: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<f64>,
}

/// One entry of a shape vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Dim {
    /// The batch size, whatever it is at run time.
    Batch,
    /// A known size (or a `Reshape` code: `0` copy, `-1` infer).
    Known(i64),
}

/// An ONNX value during conversion.
#[derive(Clone, Debug)]
pub(super) enum Value {
    /// The output of a graph node.
    Node(NodeId),
    /// A constant.
    Const(Const),
    /// A 1-d shape vector (a scalar is a vector of one).
    Dims(Vec<Dim>),
    /// A feature map `[n, c, h, w]` viewed as `[n, groups, c / groups, h, w]`.
    Grouped {
        /// The map.
        node: NodeId,
        /// Groups.
        groups: usize,
    },
    /// The grouped view transposed to `[n, c / groups, groups, h, w]`.
    Shuffled {
        /// The map.
        node: NodeId,
        /// Groups.
        groups: usize,
    },
    /// A value whose producer could not be converted (reported once, where it failed).
    Failed,
}

impl Const {
    /// A constant of `dims` holding `data`.
    pub fn new(dims: Vec<usize>, data: Vec<f64>) -> Self {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        Self { dims, data }
    }

    /// The values as f32.
    pub fn floats(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }

    /// The values as integers (shapes, axes, pads).
    pub fn ints(&self) -> Vec<i64> {
        self.data.iter().map(|&v| v as i64).collect()
    }

    /// The single value of a one-element constant.
    pub fn scalar(&self) -> Option<f64> {
        (self.data.len() == 1).then(|| self.data[0])
    }

    /// The same values with new dimensions.
    pub fn reshaped(&self, dims: Vec<usize>) -> Result<Const, String> {
        if dims.iter().product::<usize>() != self.data.len() {
            return Err(format!("cannot reshape a constant of {:?} to {dims:?}", self.dims));
        }
        Ok(Const::new(dims, self.data.clone()))
    }

    /// Element-wise `f(a, b)` with NumPy broadcasting.
    pub fn broadcast(&self, other: &Const, f: impl Fn(f64, f64) -> f64) -> Result<Const, String> {
        let rank = self.dims.len().max(other.dims.len());
        let pad = |d: &[usize]| -> Vec<usize> {
            let mut v = vec![1; rank - d.len()];
            v.extend_from_slice(d);
            v
        };
        let (a, b) = (pad(&self.dims), pad(&other.dims));
        let mut dims = Vec::with_capacity(rank);
        for (&x, &y) in a.iter().zip(&b) {
            if x != y && x != 1 && y != 1 {
                return Err(format!("constants of {:?} and {:?} do not broadcast", self.dims, other.dims));
            }
            dims.push(x.max(y));
        }
        let count = checked_count(&dims)?;
        let index = |shape: &[usize], flat: usize| -> usize {
            // The element of `shape` (broadcast to `dims`) at output position `flat`.
            let (mut rest, mut at, mut stride) = (flat, 0, 1);
            for axis in (0..rank).rev() {
                let i = rest % dims[axis];
                rest /= dims[axis];
                if shape[axis] != 1 {
                    at += i * stride;
                }
                stride *= shape[axis];
            }
            at
        };
        let data = (0..count).map(|i| f(self.data[index(&a, i)], other.data[index(&b, i)])).collect();
        Ok(Const::new(dims, data))
    }
}

/// The most elements a folded constant may have (2^27, 1 GiB as f64): a shape that asks for
/// more is a damaged or hostile file, refused rather than allocated.
pub(super) const MAX_CONSTANT: usize = 1 << 27;

/// The element count of `dims`, if it is at most [`MAX_CONSTANT`].
pub(super) fn checked_count(dims: &[usize]) -> Result<usize, String> {
    dims.iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_CONSTANT)
        .ok_or_else(|| format!("a constant of {dims:?} is larger than {MAX_CONSTANT} values"))
}

/// Normalises an ONNX axis (negative counts from the end) for a tensor of `rank`.
pub(super) fn axis(axis: i64, rank: usize) -> Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a >= rank as i64 {
        return Err(format!("axis {axis} is out of range for rank {rank}"));
    }
    Ok(a as usize)
}

/// `Slice` on a 1-d list: ONNX's clamping of `start` and `end`, steps of 1 or more.
pub(super) fn slice<T: Clone>(items: &[T], start: i64, end: i64, step: i64) -> Result<Vec<T>, String> {
    if step < 1 {
        return Err(format!("slice step {step} on a shape is not supported"));
    }
    let n = items.len() as i64;
    let clamp = |v: i64| -> usize { (if v < 0 { v + n } else { v }).clamp(0, n) as usize };
    let (s, e) = (clamp(start), clamp(end));
    Ok(if s >= e { Vec::new() } else { items[s..e].iter().step_by(step as usize).cloned().collect() })
}

/// Dims of a shape vector (a constant's integers, or a symbolic shape).
pub(super) fn dims_of(v: &Value) -> Option<Vec<Dim>> {
    match v {
        Value::Dims(d) => Some(d.clone()),
        Value::Const(c) if c.dims.len() <= 1 => Some(c.ints().into_iter().map(Dim::Known).collect()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_follows_numpy() {
        let a = Const::new(vec![2, 1], vec![1.0, 2.0]);
        let b = Const::new(vec![3], vec![10.0, 20.0, 30.0]);
        let c = a.broadcast(&b, |x, y| x + y).unwrap();
        assert_eq!(c.dims, vec![2, 3]);
        assert_eq!(c.data, vec![11.0, 21.0, 31.0, 12.0, 22.0, 32.0]);
        assert!(a.broadcast(&Const::new(vec![3, 2], vec![0.0; 6]), |x, _| x).is_err());
    }

    #[test]
    fn slices_clamp_as_onnx_does() {
        let v = [1, 2, 3, 4];
        assert_eq!(slice(&v, 0, 1, 1).unwrap(), vec![1]);
        assert_eq!(slice(&v, -2, i64::MAX, 1).unwrap(), vec![3, 4]);
        assert_eq!(slice(&v, 1, 100, 2).unwrap(), vec![2, 4]);
        assert!(slice(&v, 3, 1, 1).unwrap().is_empty());
        assert!(slice(&v, 0, 1, -1).is_err());
    }

    #[test]
    fn axes_count_from_the_end() {
        assert_eq!(axis(-1, 4).unwrap(), 3);
        assert_eq!(axis(1, 4).unwrap(), 1);
        assert!(axis(4, 4).is_err());
        assert!(axis(-5, 4).is_err());
    }
}
