//! Cross-layer equalization (Nagel et al. 2019, "Data-free quantization"): for two layers
//! joined only through ops that commute with a positive per-channel scale (ReLU, pooling,
//! identity, flatten), divide output channel `i` of the first by `sᵢ` and multiply the matching
//! inputs of the second by `sᵢ`, with `sᵢ = √(r1ᵢ / r2ᵢ)`, so both layers' per-channel weight
//! ranges become `√(r1ᵢ·r2ᵢ)`. The network computes the same function, and a per-tensor weight
//! scale no longer has to cover one channel's outliers at the cost of every other channel.

use shrink_core::graph::{Graph, NodeId, Op, ValueShape};

use crate::kernels::is_depthwise;

/// A pair of layers equalized together.
#[derive(Clone, Debug, PartialEq)]
pub struct EqualizedPair {
    /// The layer whose output channels were scaled down.
    pub first: String,
    /// The layer whose matching inputs were scaled up.
    pub second: String,
}

/// The layer pairs of `graph` that can be equalized: `first` (a conv with groups = 1, a
/// depthwise conv or a linear layer) reaches `second` (the same kinds) through a chain of ReLU,
/// pooling, identity or flatten nodes, each read by exactly one node and none of them the
/// output. Returns `(first, second, features per channel)` where the last is `h·w` when a
/// flatten sits between. A depthwise conv pairs on both sides (MobileNet's pointwise →
/// depthwise → pointwise): filter `c` is both its output channel `c` and what reads input
/// channel `c`.
fn pairs(graph: &Graph) -> shrink_core::Result<Vec<(NodeId, NodeId, usize)>> {
    let shapes = graph.shapes()?;
    let dense = |op: &Op| matches!(op, Op::Conv2d { groups: 1, .. } | Op::Linear { .. }) || is_depthwise(op);
    let mut out = Vec::new();
    for (id, node) in graph.layers() {
        if !dense(&node.op) {
            continue;
        }
        let mut at = id;
        let mut per_channel = 1;
        loop {
            let consumers = graph.consumers(at);
            if consumers.len() != 1 || at == graph.output {
                break;
            }
            let next = consumers[0];
            let op = &graph.nodes[next].op;
            if dense(op) {
                out.push((id, next, per_channel));
                break;
            }
            match op {
                Op::Relu | Op::Identity | Op::MaxPool2d { .. } | Op::AvgPool2d { .. } | Op::GlobalAvgPool => {}
                Op::Flatten => {
                    if let ValueShape::Map { height, width, .. } = shapes[at] {
                        per_channel = height * width;
                    }
                }
                _ => break,
            }
            at = next;
        }
    }
    Ok(out)
}

fn weight(graph: &Graph, id: NodeId) -> shrink_core::Result<(Vec<f32>, Vec<usize>)> {
    Ok(graph.layer_weight(id)?.expect("equalized pairs are conv or linear layers"))
}

/// Divides the bias of layer `id` (if it has one) by `s` per output channel.
fn scale_bias(graph: &mut Graph, id: NodeId, s: &[f32]) -> shrink_core::Result<()> {
    if let Some(bias) = graph.layer_bias(id)? {
        graph.set_layer_bias(id, bias.iter().zip(s).map(|(x, s)| x / s).collect())?;
    }
    Ok(())
}

/// Equalizes every eligible pair of `graph` (batch norms should be folded first), repeating the
/// sweep `iterations` times so chains of more than two layers settle. Returns the equalized graph
/// and the pairs.
///
/// # Errors
/// If the graph's shapes cannot be inferred or a weight cannot be read.
pub fn equalize_cross_layer(graph: &Graph, iterations: usize) -> shrink_core::Result<(Graph, Vec<EqualizedPair>)> {
    let mut g = graph.clone();
    let found = pairs(&g)?;
    for _ in 0..iterations {
        for &(a, b, per_channel) in &found {
            let (wa, da) = weight(&g, a)?;
            let (mut wb, db) = weight(&g, b)?;
            let out = da[0];
            let per_a = wa.len() / out;
            let r1: Vec<f32> = wa.chunks_exact(per_a).map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
            // Weight index of `b` → channel of `a`: conv weights [o, c, kh, kw] (c = index / taps
            // within a row); linear weights [o, f] after a flatten (c = f / per_channel); a
            // depthwise conv's [c, 1, kh, kw] (c = the row: filter c reads channel c).
            let depthwise = is_depthwise(&g.nodes[b].op);
            let row = wb.len() / db[0];
            let taps = if db.len() == 4 { db[2] * db[3] } else { per_channel };
            let channel_of = |k: usize| if depthwise { k / row } else { k % row / taps };
            if (depthwise && db[0] != out) || (!depthwise && row != out * taps) {
                continue; // not a channel-for-channel match (should not happen in a valid graph)
            }
            let mut r2 = vec![0f32; out];
            for (k, v) in wb.iter().enumerate() {
                let c = channel_of(k);
                r2[c] = r2[c].max(v.abs());
            }
            // Channels that are zero on either side keep their scale.
            let s: Vec<f32> =
                r1.iter().zip(&r2).map(|(&x, &y)| if x > 0.0 && y > 0.0 { (x / y).sqrt() } else { 1.0 }).collect();
            let wa: Vec<f32> = wa.iter().enumerate().map(|(k, v)| v / s[k / per_a]).collect();
            for (k, v) in wb.iter_mut().enumerate() {
                *v *= s[channel_of(k)];
            }
            g.set_layer_weight(a, wa)?;
            scale_bias(&mut g, a, &s)?;
            g.set_layer_weight(b, wb)?;
        }
    }
    let names = found
        .iter()
        .map(|&(a, b, _)| EqualizedPair { first: g.nodes[a].name.clone(), second: g.nodes[b].name.clone() })
        .collect();
    Ok((g, names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use shrink_core::zoo::ModelSpec;

    fn channel_ranges(g: &Graph, name: &str) -> Vec<f32> {
        let (w, d) = weight(g, g.node_id(name).unwrap()).unwrap();
        w.chunks_exact(w.len() / d[0]).map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs()))).collect()
    }

    #[test]
    fn one_pair_ends_with_equal_ranges_per_channel() {
        use shrink_core::graph::GraphBuilder;
        let device = shrink_core::BackendKind::Flex.device().unwrap();
        let mut b = GraphBuilder::new([1, 1, 3]);
        let x = b.input();
        let f = b.flatten("flat", x);
        let l1 = b.linear("fc1", f, 2, true);
        let r = b.relu("relu", l1);
        let l2 = b.linear("fc2", r, 2, false);
        let mut g = b.build(l2, &mut shrink_core::InitRng::seeded(1), &device).unwrap();
        // Channel 0 of fc1 is 100x larger than channel 1; fc2 reads it 100x smaller.
        let id1 = g.node_id("fc1").unwrap();
        let id2 = g.node_id("fc2").unwrap();
        g.set_layer_weight(id1, vec![100.0, -50.0, 20.0, 1.0, 0.5, -0.25]).unwrap();
        g.set_layer_weight(id2, vec![0.01, 2.0, -0.03, 1.0]).unwrap();
        let (e, pairs) = equalize_cross_layer(&g, 1).unwrap();
        assert_eq!(pairs, vec![EqualizedPair { first: "fc1".into(), second: "fc2".into() }]);
        // r1 = [100, 1], r2 = [0.03, 2]: s = [sqrt(100 / 0.03), sqrt(1 / 2)], and both sides
        // end at sqrt(r1 * r2) = [sqrt(3), sqrt(2)].
        let r1 = channel_ranges(&e, "fc1");
        let (w2, _) = weight(&e, id2).unwrap();
        let r2 = [w2[0].abs().max(w2[2].abs()), w2[1].abs().max(w2[3].abs())];
        for (k, want) in [3f32.sqrt(), 2f32.sqrt()].into_iter().enumerate() {
            assert!((r1[k] - want).abs() < 1e-4 && (r2[k] - want).abs() < 1e-4, "{r1:?} {r2:?}");
        }
    }

    #[test]
    fn zoo_models_compute_the_same_function_after_equalization() {
        let device = shrink_core::BackendKind::Flex.device().unwrap();
        let mut rng = shrink_core::InitRng::seeded(4);
        for spec in [ModelSpec::Lenet5, ModelSpec::CifarResnet { depth: 8, width: 0.5 }] {
            let (g, _) = spec.build([1, 28, 28], 10, 4, &device).unwrap().fold_batch_norms().unwrap();
            let (e, pairs) = equalize_cross_layer(&g, 4).unwrap();
            let x = rng.tensor([3, 1, 28, 28], burn::tensor::Distribution::Normal(0.0, 1.0), &device);
            let floats = |t| shrink_core::host::floats(t).unwrap();
            let (a, b): (Vec<f32>, Vec<f32>) = (floats(g.forward(x.clone())), floats(e.forward(x)));
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-4 * scale.max(1.0), "{spec:?}: {p} vs {q}");
            }
            assert!(!pairs.is_empty());
            if spec == ModelSpec::Lenet5 {
                let names: Vec<(&str, &str)> = pairs.iter().map(|p| (p.first.as_str(), p.second.as_str())).collect();
                assert_eq!(names, vec![("conv1", "conv2"), ("conv2", "fc1"), ("fc1", "fc2"), ("fc2", "fc3")]);
            } else {
                // In a ResNet only the inside of each block qualifies (a block's output feeds an add).
                assert!(
                    pairs.iter().all(|p| p.first.ends_with(".1.conv") && p.second.ends_with(".2.conv")),
                    "{pairs:?}"
                );
            }
        }
    }

    /// MobileNetV1-style pointwise → ReLU → depthwise → ReLU → pointwise: both joints pair, the
    /// depthwise conv's filters are scaled on both sides, and the function is unchanged.
    #[test]
    fn depthwise_convolutions_equalize_on_both_sides() {
        use shrink_core::graph::{Conv2dSpec, GraphBuilder};
        let device = shrink_core::BackendKind::Flex.device().unwrap();
        let mut b = GraphBuilder::new([3, 10, 10]);
        let x = b.input();
        let c1 = b.conv2d("expand", x, Conv2dSpec::new(8, 1).bias(true));
        let r1 = b.relu("r1", c1);
        let dw = b.conv2d("dw", r1, Conv2dSpec::new(8, 3).padding(1).groups(8).bias(true));
        let r2 = b.relu("r2", dw);
        let c2 = b.conv2d("project", r2, Conv2dSpec::new(4, 1));
        let p = b.global_avg_pool("pool", c2);
        let f = b.flatten("flat", p);
        let out = b.linear("fc", f, 3, true);
        let mut g = b.build(out, &mut shrink_core::InitRng::seeded(9), &device).unwrap();
        // Depthwise filter 0 is 50× the others: its channel needs the rescaling.
        let id = g.node_id("dw").unwrap();
        let (mut w, _) = weight(&g, id).unwrap();
        w[..9].iter_mut().for_each(|v| *v *= 50.0);
        g.set_layer_weight(id, w).unwrap();
        let (e, pairs) = equalize_cross_layer(&g, 8).unwrap();
        let names: Vec<(&str, &str)> = pairs.iter().map(|p| (p.first.as_str(), p.second.as_str())).collect();
        assert_eq!(names, vec![("expand", "dw"), ("dw", "project"), ("project", "fc")]);
        let x = shrink_core::InitRng::seeded(5).tensor(
            [2, 3, 10, 10],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &device,
        );
        let floats = |t| shrink_core::host::floats(t).unwrap();
        let (a, b): (Vec<f32>, Vec<f32>) = (floats(g.forward(x.clone())), floats(e.forward(x)));
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() <= 1e-4 * scale.max(1.0), "{p} vs {q}");
        }
        // The outlier filter's range came down towards the others'.
        let (before, after) = (channel_ranges(&g, "dw"), channel_ranges(&e, "dw"));
        let spread = |r: &[f32]| r.iter().fold(0f32, |m, v| m.max(*v)) / r.iter().fold(f32::MAX, |m, v| m.min(*v));
        assert!(spread(&after) < spread(&before) / 4.0, "{before:?} → {after:?}");
    }
}
