//! Batch norms folded into the convolutions before them: the one copy of the arithmetic, used by
//! [`Graph::fold_batch_norms`] (the graph quantization works on) and by the CPU plan (which folds
//! while it freezes, and runs a batch norm it cannot fold as the same affine map).

use burn::module::Param;
use burn::nn::BatchNorm;
use burn::tensor::{Tensor, TensorData};

use super::{ConvParams, Graph, Op, Params};
use crate::Result;
use crate::host::floats;

/// A batch norm in evaluation mode, per channel `c`: `y = s[c] · (x − mean[c]) + β[c]` with
/// `s = γ / √(var + ε)`.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormFold {
    scale: Vec<f32>,
    mean: Vec<f32>,
    beta: Vec<f32>,
}

impl BatchNormFold {
    /// The fold of `bn` with `epsilon` (the op's).
    ///
    /// # Errors
    /// [`crate::Error::TensorRead`] when a parameter cannot be read.
    pub fn of(bn: &BatchNorm, epsilon: f64) -> Result<Self> {
        let gamma = floats(bn.gamma.val())?;
        let var = floats(bn.running_var.value())?;
        let scale = gamma.iter().zip(&var).map(|(g, v)| g / (v + epsilon as f32).sqrt()).collect();
        Ok(Self { scale, mean: floats(bn.running_mean.value())?, beta: floats(bn.beta.val())? })
    }

    /// Folds the batch norm into the layer before it: `weight` (`[channels, …]`, row-major) is
    /// scaled per output channel in place, and the bias it then needs is returned:
    /// `(b − mean) · s + β`, with `b` = 0 when the layer had none.
    pub fn fold_into(&self, weight: &mut [f32], bias: Option<&[f32]>) -> Vec<f32> {
        let per = weight.len() / self.scale.len().max(1);
        for (w, s) in weight.chunks_exact_mut(per.max(1)).zip(&self.scale) {
            w.iter_mut().for_each(|w| *w *= s);
        }
        (0..self.scale.len())
            .map(|c| (bias.map_or(0.0, |b| b[c]) - self.mean[c]) * self.scale[c] + self.beta[c])
            .collect()
    }

    /// The batch norm alone as `y = scale · x + shift` per channel: the fold into an identity,
    /// so it computes exactly what a folded batch norm adds to a layer without a bias.
    pub fn affine(&self) -> (Vec<f32>, Vec<f32>) {
        let shift = self.fold_into(&mut [], None);
        (self.scale.clone(), shift)
    }
}

impl Graph {
    /// A copy of the graph in which every batch norm that is the only consumer of a convolution
    /// (the rule of [`crate::runtime::batch_norm_after`], which the CPU plan folds by) is folded
    /// into it: the conv's weights are scaled per output channel and it gains a bias, and the
    /// batch norm becomes an [`Op::Identity`] node with the same name (node ids, names and edges
    /// stay as they were). Returns the graph and the names of the folded batch norms.
    ///
    /// In evaluation mode the result computes the same function (within f32 rounding); it is
    /// what integer kernels quantize, and its weights are bit for bit those the plan folds.
    ///
    /// # Errors
    /// [`crate::Error::TensorRead`] when a parameter cannot be read.
    pub fn fold_batch_norms(&self) -> Result<(Graph, Vec<String>)> {
        let mut graph = self.clone();
        let mut folded = Vec::new();
        for conv_id in 0..graph.nodes.len() {
            let Some(bn_id) = crate::runtime::batch_norm_after(&graph, conv_id) else { continue };
            let (Op::BatchNorm2d { epsilon, .. }, Some(Params::BatchNorm(bn))) =
                (&graph.nodes[bn_id].op, &graph.nodes[bn_id].params)
            else {
                continue;
            };
            let Some(Params::Conv(conv)) = &graph.nodes[conv_id].params else { continue };
            let fold = BatchNormFold::of(bn, *epsilon)?;
            let w = conv.weight.val();
            let (dims, device) = (w.dims(), w.device());
            let mut weight = floats(w)?;
            let bias = conv.bias.as_ref().map(|b| floats(b.val())).transpose()?;
            let bias = fold.fold_into(&mut weight, bias.as_deref());
            let channels = bias.len();
            graph.nodes[conv_id].params = Some(Params::Conv(ConvParams {
                weight: Param::from_tensor(Tensor::from_data(TensorData::new(weight, dims), &device)),
                bias: Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias, [channels]), &device))),
            }));
            if let Op::Conv2d { bias, .. } = &mut graph.nodes[conv_id].op {
                *bias = true;
            }
            let node = &mut graph.nodes[bn_id];
            node.op = Op::Identity;
            node.params = None;
            folded.push((bn_id, node.name.clone()));
        }
        folded.sort();
        Ok((graph, folded.into_iter().map(|(_, name)| name).collect()))
    }
}
