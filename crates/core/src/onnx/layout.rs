//! Shape rules of the conversion: reshape targets, squeeze and unsqueeze, transposes that only
//! change the layout, and constants broadcast over channels.

use super::values::{Const, Dim, axis};
use crate::graph::ValueShape;

/// The dims a `Reshape` to `target` gives. For a computed value (`batch` is `Some(declared
/// batch)`) `input` excludes the batch and so does the result; the target's first entry must
/// keep the batch (symbolic, `0`, `-1`, or the batch size the model declares). For a
/// constant (`batch` is `None`) both are the full dims.
pub(super) fn resolve(input: &[usize], batch: Option<Option<usize>>, target: &[Dim]) -> Result<Vec<usize>, String> {
    let offset = usize::from(batch.is_some());
    let rest = match batch {
        None => target,
        Some(declared) => {
            let keeps_batch = match target.first() {
                Some(Dim::Batch) | Some(Dim::Known(0)) | Some(Dim::Known(-1)) => true,
                Some(Dim::Known(b)) => declared.is_some_and(|d| d as i64 == *b),
                None => false,
            };
            if !keeps_batch {
                return Err(format!("reshape to {target:?} changes the batch axis"));
            }
            &target[1..]
        }
    };
    let numel: usize = input.iter().product();
    let mut dims = Vec::with_capacity(rest.len());
    let mut infer = None;
    for (i, d) in rest.iter().enumerate() {
        match *d {
            Dim::Batch => return Err(format!("reshape to {target:?} moves the batch axis")),
            Dim::Known(0) => {
                let at = i + offset;
                let full: Vec<usize> = if offset == 1 { [&[0][..], input].concat() } else { input.to_vec() };
                dims.push(*full.get(at).ok_or_else(|| format!("reshape copies axis {at}, which the input lacks"))?);
            }
            Dim::Known(-1) if infer.is_none() => {
                infer = Some(i);
                dims.push(1);
            }
            Dim::Known(v) if v > 0 => dims.push(v as usize),
            Dim::Known(v) => return Err(format!("reshape dimension {v} in {target:?} is not valid")),
        }
    }
    if matches!(target.first(), Some(Dim::Known(-1))) && batch.is_some() && infer.is_some() {
        return Err(format!("reshape to {target:?} infers both the batch and another axis"));
    }
    let known: usize = dims.iter().product();
    if let Some(i) = infer {
        if known == 0 || !numel.is_multiple_of(known) {
            return Err(format!("reshape of {input:?} to {target:?}: sizes do not divide"));
        }
        dims[i] = numel / known;
    } else if known != numel {
        return Err(format!("reshape of {input:?} to {target:?}: {numel} values do not fill {known}"));
    }
    Ok(dims)
}

/// `dims` without the axes listed (every axis of size 1 if `axes` is `None`); with
/// `keep_first`, axis 0 (the batch) stays.
pub(super) fn squeezed(dims: &[usize], axes: Option<&[i64]>, keep_first: bool) -> Result<Vec<usize>, String> {
    let drop: Vec<usize> = match axes {
        None => (0..dims.len()).filter(|&a| dims[a] == 1 && !(keep_first && a == 0)).collect(),
        Some(list) => list.iter().map(|&a| axis(a, dims.len())).collect::<Result<_, _>>()?,
    };
    if keep_first && drop.contains(&0) {
        return Err("squeezing the batch axis is not supported".into());
    }
    if let Some(&a) = drop.iter().find(|&&a| dims[a] != 1) {
        return Err(format!("axis {a} of {dims:?} is not of size 1"));
    }
    Ok((0..dims.len()).filter(|a| !drop.contains(a)).map(|a| dims[a]).collect())
}

/// `dims` with axes of size 1 inserted at `axes` (positions in the result).
pub(super) fn unsqueezed(dims: &[usize], axes: &[i64]) -> Result<Vec<usize>, String> {
    let rank = dims.len() + axes.len();
    let mut at: Vec<usize> = axes.iter().map(|&a| axis(a, rank)).collect::<Result<_, _>>()?;
    at.sort_unstable();
    if at.windows(2).any(|w| w[0] == w[1]) {
        return Err(format!("repeated unsqueeze axes {axes:?}"));
    }
    let mut rest = dims.iter();
    Ok((0..rank).map(|i| if at.contains(&i) { 1 } else { *rest.next().expect("rank counted") }).collect())
}

/// The dims after transposing `dims` by `perm`, when that only moves axes of size 1 (the
/// values keep their order); an error for a real transpose.
pub(super) fn transposed_view(dims: &[usize], perm: &[i64]) -> Result<Vec<usize>, String> {
    if perm.len() != dims.len() {
        return Err(format!("permutation {perm:?} for a value of rank {}", dims.len()));
    }
    let perm: Vec<usize> = perm.iter().map(|&p| axis(p, dims.len())).collect::<Result<_, _>>()?;
    let moved: Vec<usize> = perm.iter().copied().filter(|&p| dims[p] != 1).collect();
    if perm[0] != 0 || moved.windows(2).any(|w| w[0] > w[1]) {
        return Err(format!(
            "permutation {perm:?} of {dims:?} moves data; only transposes that keep the values in order (layout \
             changes) and ShuffleNet's channel shuffle are supported"
        ));
    }
    Ok(perm.iter().map(|&p| dims[p]).collect())
}

/// The values of constant `c` broadcast over a value of `shape` (batch first), one per
/// channel: `c` may hold one value, or one per channel on the channel axis with every other
/// axis of size 1.
pub(super) fn per_channel(c: &Const, shape: ValueShape) -> Result<Vec<f64>, String> {
    let channels = shape.channels();
    let rank = shape.dims().len() + 1;
    if c.dims.len() > rank {
        return Err(format!("a constant of {:?} does not broadcast over a value of rank {rank}", c.dims));
    }
    let mut dims = vec![1; rank - c.dims.len()];
    dims.extend_from_slice(&c.dims);
    let other_axes_one = dims.iter().enumerate().all(|(a, &d)| a == 1 || d == 1);
    match (other_axes_one, dims[1]) {
        (true, 1) => Ok(vec![c.data[0]; channels]),
        (true, n) if n == channels => Ok(c.data.clone()),
        _ => Err(format!(
            "a constant of {:?} over a value of {:?} (batch first): only one value, or one per channel, is supported",
            c.dims,
            [&[1][..], &shape.dims()].concat()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reshape_targets_keep_the_batch() {
        let k = Dim::Known;
        assert_eq!(resolve(&[8, 2, 2], Some(None), &[Dim::Batch, k(-1)]).unwrap(), vec![32]);
        assert_eq!(resolve(&[8, 2, 2], Some(Some(1)), &[k(1), k(32)]).unwrap(), vec![32]);
        assert_eq!(resolve(&[8, 2, 2], Some(None), &[k(0), k(2), k(4), k(0), k(2)]).unwrap(), vec![2, 4, 2, 2]);
        assert!(resolve(&[8, 2, 2], Some(None), &[k(4), k(-1)]).is_err());
        assert!(resolve(&[8, 2, 2], Some(None), &[k(-1), k(-1)]).is_err());
        assert!(resolve(&[8, 2, 2], Some(None), &[k(0), k(5)]).is_err());
        assert_eq!(resolve(&[6], None, &[k(2), k(-1)]).unwrap(), vec![2, 3]);
    }

    #[test]
    fn squeeze_and_unsqueeze_move_unit_axes() {
        assert_eq!(squeezed(&[1, 8, 1, 1], Some(&[2, 3]), true).unwrap(), vec![1, 8]);
        assert_eq!(squeezed(&[1, 8, 1, 1], None, true).unwrap(), vec![1, 8]);
        assert!(squeezed(&[1, 8, 2, 1], Some(&[2]), true).is_err());
        assert!(squeezed(&[1, 8], Some(&[0]), true).is_err());
        assert_eq!(unsqueezed(&[1, 8], &[2, 3]).unwrap(), vec![1, 8, 1, 1]);
        assert_eq!(unsqueezed(&[8], &[-1, -2]).unwrap(), vec![8, 1, 1]);
    }

    #[test]
    fn only_layout_transposes_are_views() {
        assert_eq!(transposed_view(&[1, 8, 1, 1], &[0, 2, 3, 1]).unwrap(), vec![1, 1, 1, 8]);
        assert!(transposed_view(&[1, 8, 2, 2], &[0, 2, 3, 1]).is_err());
        assert!(transposed_view(&[1, 8], &[1, 0]).is_err());
    }

    #[test]
    fn constants_broadcast_per_channel() {
        let map = ValueShape::Map { channels: 3, height: 4, width: 4 };
        let c = Const::new(vec![1, 3, 1, 1], vec![1.0, 2.0, 3.0]);
        assert_eq!(per_channel(&c, map).unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(per_channel(&Const::new(vec![3, 1, 1], vec![1.0, 2.0, 3.0]), map).unwrap().len(), 3);
        assert_eq!(per_channel(&Const::new(vec![], vec![2.0]), map).unwrap(), vec![2.0; 3]);
        assert!(per_channel(&Const::new(vec![4], vec![0.0; 4]), map).is_err());
        let flat = ValueShape::Flat { features: 4 };
        assert_eq!(per_channel(&Const::new(vec![4], vec![1.0; 4]), flat).unwrap().len(), 4);
    }
}
