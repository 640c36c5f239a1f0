//! Graph queries: coupling groups, producers/consumers, feature taps, validation.

use burn::module::Module;
use burn::tensor::{Distribution, Tensor, Tolerance};
use shrink_core::BackendKind;
use shrink_core::InitRng;
use shrink_core::graph::{ChannelRole, Conv2dSpec, GraphBuilder, Op};
use shrink_core::zoo::ModelSpec;

#[test]
fn resnet_coupling_groups_follow_residual_adds() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 20, width: 1.0 }.build([3, 32, 32], 10, 0, &device).unwrap();
    let groups = g.coupling_groups().unwrap();
    let name = |id: usize| g.nodes[id].name.as_str();

    // The stem's channels flow through every block of stage 1 via the identity shortcuts:
    // stem.conv and each layer1.*.2.conv produce them; stem.bn and layer1.*.2.bn follow.
    let stem = groups.iter().find(|gr| gr.producers().any(|p| name(p) == "stem.conv")).unwrap();
    let producers: Vec<&str> = stem.producers().map(name).collect();
    assert_eq!(producers, ["stem.conv", "layer1.0.2.conv", "layer1.1.2.conv", "layer1.2.2.conv"]);
    assert_eq!(stem.channels, 16);
    assert!(stem.prunable);
    // Consumers: the first conv of each block of stage 1, and stage 2's first block (both paths).
    let consumers: Vec<&str> =
        stem.members.iter().filter(|m| matches!(m.role, ChannelRole::Consumes { .. })).map(|m| name(m.node)).collect();
    assert_eq!(
        consumers,
        ["layer1.0.1.conv", "layer1.1.1.conv", "layer1.2.1.conv", "layer2.0.1.conv", "layer2.0.shortcut.conv"]
    );

    // Stage 3 channels reach the classifier through pool and flatten: fc consumes them 1:1.
    let last = groups.iter().find(|gr| gr.producers().any(|p| name(p) == "layer3.0.shortcut.conv")).unwrap();
    assert!(
        last.members
            .iter()
            .any(|m| name(m.node) == "fc" && m.role == ChannelRole::Consumes { features_per_channel: 1 })
    );

    // The inner channels of a block are a group of their own: one conv, one bn, one consumer.
    let inner = groups.iter().find(|gr| gr.producers().any(|p| name(p) == "layer2.1.1.conv")).unwrap();
    assert_eq!(inner.members.len(), 3);

    // The input and the logits cannot be pruned.
    assert!(!groups.iter().find(|gr| gr.carriers.contains(&0)).unwrap().prunable);
    assert!(!groups.iter().find(|gr| gr.carriers.contains(&g.output)).unwrap().prunable);
    // ResNet-20: 1 input + stage groups (3) + 9 inner groups + logits = 14 groups.
    assert_eq!(groups.len(), 14);
}

#[test]
fn flatten_couples_channels_in_blocks() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Lenet5.build([1, 28, 28], 10, 0, &device).unwrap();
    let groups = g.coupling_groups().unwrap();
    let conv2 = g.node_id("conv2").unwrap();
    let fc1 = g.node_id("fc1").unwrap();
    let gr = groups.iter().find(|gr| gr.producers().any(|p| p == conv2)).unwrap();
    assert_eq!(gr.channels, 16);
    assert!(gr.members.iter().any(|m| m.node == fc1 && m.role == ChannelRole::Consumes { features_per_channel: 25 }));
    assert_eq!(g.producers(fc1), &[g.node_id("flatten").unwrap()]);
    assert_eq!(g.consumers(conv2), vec![g.node_id("relu2").unwrap()]);
}

#[test]
fn taps_return_intermediate_values() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 16, 16], 10, 0, &device).unwrap().valid_graph();
    let x = InitRng::seeded(101).tensor([2, 1, 16, 16], Distribution::Default, &device);
    let pool = g.node_id("pool").unwrap();
    let stem = g.node_id("stem.relu").unwrap();
    let (y, taps) = g.forward_with_taps(x.clone(), &[pool, stem]);
    assert_eq!(taps[0].clone().map().unwrap().dims(), [2, 64, 1, 1]);
    assert_eq!(taps[1].clone().map().unwrap().dims(), [2, 16, 16, 16]);
    // The classifier applied to the tapped pool output gives the logits.
    let fc = g.node_id("fc").unwrap();
    let Some(shrink_core::graph::Params::Linear(p)) = &g.nodes[fc].params else { panic!() };
    let manual =
        taps[0].clone().flatten().matmul(p.weight.val().transpose()) + p.bias.as_ref().unwrap().val().unsqueeze::<2>();
    y.into_data().assert_approx_eq::<f32>(&manual.into_data(), Tolerance::default());
    assert!(g.forward(x).into_data().as_slice::<f32>().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn builder_reports_the_node_at_fault() {
    let device = BackendKind::Flex.device().unwrap();
    let mut b = GraphBuilder::new([3, 8, 8]);
    let x = b.input();
    let a = b.conv2d("a", x, Conv2dSpec::new(4, 3).padding(1));
    let c = b.conv2d("c", x, Conv2dSpec::new(5, 3).padding(1));
    let s = b.add("sum", &[a, c]);
    let e = b.build(s, &mut InitRng::seeded(0), &device).unwrap_err().to_string();
    assert!(e.contains("`sum`") && e.contains("differ"), "{e}");

    let mut b = GraphBuilder::new([3, 8, 8]);
    let x = b.input();
    let a = b.conv2d("a", x, Conv2dSpec::new(4, 3));
    let a2 = b.conv2d("a", a, Conv2dSpec::new(4, 3));
    assert!(b.build(a2, &mut InitRng::seeded(0), &device).unwrap_err().to_string().contains("duplicate"));

    let mut b = GraphBuilder::new([3, 8, 8]);
    let x = b.input();
    let bad = b.push("bn", Op::BatchNorm2d { features: 7, epsilon: 1e-5, momentum: 0.1 }, vec![x]);
    assert!(b.build(bad, &mut InitRng::seeded(0), &device).unwrap_err().to_string().contains("7 features"));
}

trait Valid {
    fn valid_graph(self) -> Self;
}
impl Valid for shrink_core::Graph {
    fn valid_graph(self) -> Self {
        use burn::module::Module;
        self.valid()
    }
}

#[test]
fn folding_batch_norms_keeps_the_function_and_the_names() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 12, 12], 10, 4, &device).unwrap();
    let g = g.valid();
    let x = InitRng::seeded(102).tensor([3, 1, 12, 12], Distribution::Normal(0.0, 1.0), &device);
    let (folded, names) = g.fold_batch_norms().unwrap();
    folded.validate().unwrap();
    assert_eq!(names.len(), g.nodes.iter().filter(|n| n.op.kind() == "batch_norm2d").count());
    assert!(folded.nodes.iter().all(|n| n.op.kind() != "batch_norm2d"));
    assert_eq!(folded.nodes.len(), g.nodes.len());
    let a: Vec<f32> = g.forward(x.clone()).into_data().try_to_vec().unwrap();
    let b: Vec<f32> = folded.forward(x).into_data().try_to_vec().unwrap();
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (a, b) in a.iter().zip(&b) {
        assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b}");
    }
}

/// Zeroes channels `removed` of a group's producers and followers (filters, biases, γ, β): the
/// masked dense model that channel removal must equal.
fn zero_channels(g: &mut shrink_core::Graph, group: &shrink_core::graph::CouplingGroup, removed: &[usize]) {
    use burn::module::Param;
    use shrink_core::graph::Params;
    for member in group.members.iter().filter(|m| !matches!(m.role, ChannelRole::Consumes { .. })) {
        // The group's channels start at the member's offset (after a concatenation).
        let mask_of = |n: usize, device: &burn::tensor::Device| {
            let m: Vec<f32> = (0..n)
                .map(|c| if c >= member.offset && removed.contains(&(c - member.offset)) { 0.0 } else { 1.0 })
                .collect();
            Tensor::<1>::from_data(burn::tensor::TensorData::new(m, [n]), device)
        };
        match g.nodes[member.node].params.as_mut().unwrap() {
            Params::Conv(p) => {
                let w = p.weight.val();
                let m = mask_of(w.dims()[0], &w.device());
                p.weight = Param::from_tensor(w * m.clone().reshape([-1, 1, 1, 1]));
                if let Some(b) = &p.bias {
                    p.bias = Some(Param::from_tensor(b.val() * m));
                }
            }
            Params::Linear(p) => {
                let w = p.weight.val();
                let m = mask_of(w.dims()[0], &w.device());
                p.weight = Param::from_tensor(w * m.clone().reshape([-1, 1]));
                if let Some(b) = &p.bias {
                    p.bias = Some(Param::from_tensor(b.val() * m));
                }
            }
            Params::BatchNorm(bn) => {
                let m = mask_of(bn.gamma.dims()[0], &bn.gamma.device());
                bn.gamma = Param::from_tensor(bn.gamma.val() * m.clone());
                bn.beta = Param::from_tensor(bn.beta.val() * m);
            }
        }
    }
}

#[test]
fn removing_channels_equals_zeroing_them_and_shrinks_every_coupled_tensor() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 16, 16], 10, 7, &device).unwrap();
    // Give the batch norms non-trivial statistics, so a wrong slice would show.
    let x = InitRng::seeded(103).tensor([8, 1, 16, 16], Distribution::Default, &device);
    let g = {
        let ad = device.clone().autodiff();
        let t = g.fork(&ad).train();
        let _ = t.forward(x.clone().to_device(&ad));
        t.valid().to_device(&device)
    };
    let groups = g.coupling_groups().unwrap();
    // The stem group (through residual adds) and an inner group.
    let name = |id: usize| g.nodes[id].name.clone();
    let stem = groups.iter().position(|gr| gr.producers().any(|p| name(p) == "stem.conv")).unwrap();
    let inner = groups.iter().position(|gr| gr.producers().any(|p| name(p) == "layer2.0.1.conv")).unwrap();
    let last = groups.iter().position(|gr| gr.producers().any(|p| name(p) == "layer3.0.shortcut.conv")).unwrap();
    let keep_stem: Vec<usize> = (0..16).filter(|c| c % 3 != 1).collect();
    let keep_inner: Vec<usize> = vec![0, 5, 6, 30, 31];
    let keep_last: Vec<usize> = (0..64).filter(|c| c % 2 == 0).collect();
    let pruned = g
        .keep_channels(&groups, &[(stem, keep_stem.clone()), (inner, keep_inner.clone()), (last, keep_last.clone())])
        .unwrap();

    let mut masked = g.clone();
    for (gi, keep) in [(stem, &keep_stem), (inner, &keep_inner), (last, &keep_last)] {
        let removed: Vec<usize> = (0..groups[gi].channels).filter(|c| !keep.contains(c)).collect();
        zero_channels(&mut masked, &groups[gi], &removed);
    }
    pruned.forward(x.clone()).into_data().assert_approx_eq::<f32>(&masked.forward(x).into_data(), Tolerance::default());

    // Every coupled tensor shrank: the stem's producers and consumers, the classifier's input.
    let shapes = pruned.shapes().unwrap();
    assert_eq!(shapes[pruned.node_id("stem.conv").unwrap()].channels(), keep_stem.len());
    assert_eq!(shapes[pruned.node_id("layer1.0.2.conv").unwrap()].channels(), keep_stem.len());
    assert!(matches!(pruned.nodes[pruned.node_id("layer1.0.1.conv").unwrap()].op,
        Op::Conv2d { in_channels, .. } if in_channels == keep_stem.len()));
    assert!(matches!(
        pruned.nodes[pruned.node_id("fc").unwrap()].op,
        Op::Linear { in_features: 32, out_features: 10, .. }
    ));
    assert!(
        shrink_core::metrics::model_stats(&pruned).unwrap().macs < shrink_core::metrics::model_stats(&g).unwrap().macs
    );

    // Bad selections are refused, not half-applied.
    assert!(g.keep_channels(&groups, &[(inner, vec![])]).is_err());
    assert!(g.keep_channels(&groups, &[(inner, vec![3, 2])]).is_err());
    assert!(g.keep_channels(&groups, &[(inner, vec![64])]).is_err());
    let logits = groups.iter().position(|gr| gr.carriers.contains(&g.output)).unwrap();
    assert!(g.keep_channels(&groups, &[(logits, vec![0])]).is_err());
}

#[test]
fn concatenated_channels_are_coupled_at_their_offsets() {
    // Two branches of 4 and 6 channels concatenated, a batch norm and a depthwise conv over the
    // concatenation, then a conv and a linear layer reading it (DenseNet, Inception, fire modules).
    let device = BackendKind::Flex.device().unwrap();
    let mut b = GraphBuilder::new([2, 8, 8]);
    let x = b.input();
    let a = b.conv2d("a", x, Conv2dSpec::new(4, 3).padding(1));
    let a = b.relu("a.relu", a);
    let c = b.conv2d("b", x, Conv2dSpec::new(6, 1));
    let cat = b.push("cat", Op::Concat, vec![a, c]);
    let bn = b.batch_norm("bn", cat);
    let dw = b.conv2d("dw", bn, Conv2dSpec::new(10, 3).padding(1).groups(10));
    let next = b.conv2d("next", dw, Conv2dSpec::new(5, 1));
    let pool = b.global_avg_pool("pool", next);
    let flat = b.flatten("flat", cat);
    let head = b.linear("head", flat, 3, true);
    let pooled = b.flatten("pooled", pool);
    let side = b.linear("side", pooled, 3, true);
    let out = b.add("out", &[head, side]);
    let g = b.build(out, &mut InitRng::seeded(5), &device).unwrap();
    // Non-trivial batch-norm statistics, so a wrong slice shows.
    let x = InitRng::seeded(6).tensor([4, 2, 8, 8], Distribution::Default, &device);
    let g = {
        let ad = device.clone().autodiff();
        let t = g.fork(&ad).train();
        let _ = t.forward(x.clone().to_device(&ad));
        t.valid().to_device(&device)
    };
    let groups = g.coupling_groups().unwrap();
    let id = |n: &str| g.node_id(n).unwrap();
    let of = |producer: &str| groups.iter().position(|gr| gr.producers().any(|p| p == id(producer))).unwrap();
    let (ga, gb) = (&groups[of("a")], &groups[of("b")]);
    assert!(ga.prunable && gb.prunable);
    let at = |gr: &shrink_core::graph::CouplingGroup, node: &str| {
        gr.members.iter().filter(|m| m.node == id(node)).map(|m| (m.role, m.offset)).collect::<Vec<_>>()
    };
    assert_eq!(at(ga, "bn"), [(ChannelRole::Follows, 0)]);
    assert_eq!(at(gb, "bn"), [(ChannelRole::Follows, 4)]);
    assert_eq!(at(gb, "dw"), [(ChannelRole::Follows, 4)]);
    assert_eq!(at(gb, "next"), [(ChannelRole::Consumes { features_per_channel: 1 }, 4)]);
    assert_eq!(at(gb, "head"), [(ChannelRole::Consumes { features_per_channel: 64 }, 4)]);
    assert!(ga.carriers.contains(&id("cat")) && gb.carriers.contains(&id("cat")));

    let (keep_a, keep_b) = (vec![0, 3], vec![1, 2, 5]);
    let pruned = g.keep_channels(&groups, &[(of("b"), keep_b.clone()), (of("a"), keep_a.clone())]).unwrap();
    let mut masked = g.clone();
    for (gi, keep) in [(of("a"), &keep_a), (of("b"), &keep_b)] {
        let removed: Vec<usize> = (0..groups[gi].channels).filter(|c| !keep.contains(c)).collect();
        zero_channels(&mut masked, &groups[gi], &removed);
    }
    pruned.forward(x.clone()).into_data().assert_approx_eq::<f32>(&masked.forward(x).into_data(), Tolerance::default());
    assert_eq!(pruned.shapes().unwrap()[id("cat")].channels(), 5);
    assert!(matches!(pruned.nodes[id("head")].op, Op::Linear { in_features: 320, .. }));
    assert!(matches!(pruned.nodes[id("dw")].op, Op::Conv2d { groups: 5, in_channels: 5, out_channels: 5, .. }));
}

#[test]
fn lrn_and_channel_shuffle_keep_their_channels() {
    let device = BackendKind::Flex.device().unwrap();
    let mut b = GraphBuilder::new([1, 8, 8]);
    let x = b.input();
    let a = b.conv2d("a", x, Conv2dSpec::new(8, 3).padding(1));
    let l = b.push("lrn", Op::Lrn { size: 3, alpha: 1e-4, beta: 0.75, bias: 1.0 }, vec![a]);
    let c = b.conv2d("c", l, Conv2dSpec::new(8, 1));
    let s = b.push("shuffle", Op::ChannelShuffle { groups: 2 }, vec![c]);
    let d = b.conv2d("d", s, Conv2dSpec::new(4, 1));
    let p = b.global_avg_pool("pool", d);
    let f = b.flatten("flat", p);
    let out = b.linear("fc", f, 2, true);
    let g = b.build(out, &mut InitRng::seeded(1), &device).unwrap();
    let groups = g.coupling_groups().unwrap();
    let group_of = |n: &str| groups.iter().find(|gr| gr.producers().any(|p| p == g.node_id(n).unwrap())).unwrap();
    assert!(!group_of("a").prunable, "LRN mixes neighbouring channels");
    assert!(!group_of("c").prunable, "a shuffle moves channels between groups");
    assert!(group_of("d").prunable);
}
