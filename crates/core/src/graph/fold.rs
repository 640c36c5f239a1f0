//! Folding each batch norm into the convolution before it: the graph quantization works on, and
//! what the CPU plan computes.

use burn::module::Param;
use burn::tensor::{Tensor, TensorData};

use super::{ConvParams, Graph, Op, Params};

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().expect("converted to f32")
}

impl Graph {
    /// A copy of the graph in which every batch norm that is the only consumer of a convolution
    /// is folded into it: the conv's weights are scaled per output channel and it gains a bias,
    /// and the batch norm becomes an [`Op::Identity`] node with the same name (node ids, names
    /// and edges stay as they were). Returns the graph and the names of the folded batch norms.
    ///
    /// In evaluation mode the result computes the same function (within f32 rounding); it is
    /// what integer kernels quantize, since the CPU plan folds the same way.
    pub fn fold_batch_norms(&self) -> (Graph, Vec<String>) {
        let mut graph = self.clone();
        let mut folded = Vec::new();
        for bn_id in 0..graph.nodes.len() {
            let Op::BatchNorm2d { epsilon, .. } = graph.nodes[bn_id].op else { continue };
            let [conv_id] = graph.nodes[bn_id].inputs[..] else { continue };
            let Op::Conv2d { out_channels, .. } = graph.nodes[conv_id].op else { continue };
            if graph.consumers(conv_id).len() != 1 || conv_id == graph.output {
                continue;
            }
            let (Some(Params::BatchNorm(bn)), Some(Params::Conv(conv))) =
                (&graph.nodes[bn_id].params, &graph.nodes[conv_id].params)
            else {
                continue;
            };
            let (gamma, beta) = (floats(bn.gamma.val()), floats(bn.beta.val()));
            let (mean, var) = (floats(bn.running_mean.value()), floats(bn.running_var.value()));
            let w = conv.weight.val();
            let (dims, device) = (w.dims(), w.device());
            let mut weight = floats(w);
            let mut bias = conv.bias.as_ref().map(|b| floats(b.val())).unwrap_or_else(|| vec![0.0; out_channels]);
            let per = weight.len() / out_channels;
            for c in 0..out_channels {
                let s = gamma[c] / (var[c] + epsilon as f32).sqrt();
                weight[c * per..(c + 1) * per].iter_mut().for_each(|w| *w *= s);
                bias[c] = (bias[c] - mean[c]) * s + beta[c];
            }
            graph.nodes[conv_id].params = Some(Params::Conv(ConvParams {
                weight: Param::from_tensor(Tensor::from_data(TensorData::new(weight, dims), &device)),
                bias: Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias, [out_channels]), &device))),
            }));
            if let Op::Conv2d { bias, .. } = &mut graph.nodes[conv_id].op {
                *bias = true;
            }
            let node = &mut graph.nodes[bn_id];
            node.op = Op::Identity;
            node.params = None;
            folded.push(node.name.clone());
        }
        (graph, folded)
    }
}
