//! Model files round-trip bit-exactly and refuse damage with a clear message.

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use shrink_core::InitRng;
use shrink_core::graph::Params;
use shrink_core::zoo::ModelSpec;
use shrink_core::{BackendKind, io};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("shrink-io-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn round_trip_is_bit_exact() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 28, 28], 10, 3, &device).unwrap();
    let path = tmp("r8.safetensors");
    io::save(&g, &path).unwrap();
    let back = io::load(&path, &device).unwrap();
    assert_eq!(io::to_bytes(&back).unwrap(), io::to_bytes(&g).unwrap());
    let x = InitRng::seeded(104).tensor([2, 1, 28, 28], Distribution::Default, &device);
    let (a, b) = (g.valid().forward(x.clone()), back.valid().forward(x));
    assert_eq!(a.into_data().as_slice::<f32>().unwrap(), b.into_data().as_slice::<f32>().unwrap());
}

#[test]
fn changed_shapes_load_back_as_they_are() {
    // A graph whose conv lost filters (as after structured pruning) is described by its header.
    let device = BackendKind::Flex.device().unwrap();
    let mut b = shrink_core::graph::GraphBuilder::new([1, 8, 8]);
    let x = b.input();
    let x = b.conv2d("conv", x, shrink_core::graph::Conv2dSpec::new(3, 3).padding(1).bias(true));
    let x = b.batch_norm("bn", x);
    let x = b.linear("fc", x, 4, true);
    let g = b.build(x, &mut InitRng::seeded(0), &device).unwrap();
    let path = tmp("small.safetensors");
    io::save(&g, &path).unwrap();
    let back = io::load(&path, &device).unwrap();
    let Some(Params::Conv(p)) = &back.nodes[1].params else { panic!() };
    assert_eq!(p.weight.dims(), [3, 1, 3, 3]);
}

#[test]
fn damaged_files_are_refused() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Mlp { hidden: vec![8] }.build([1, 4, 4], 3, 0, &device).unwrap();
    let bytes = io::to_bytes(&g).unwrap();
    let path = tmp("bad.safetensors");

    let err = |bytes: &[u8]| io::from_bytes(bytes, &path, &device).unwrap_err().to_string();
    assert!(err(&bytes[..bytes.len() - 3]).contains("not a valid safetensors"));
    assert!(err(b"hello").contains("bad.safetensors"));

    // NaN in a weight: named, with the byte offset of the value.
    let mut nan = bytes.clone();
    let n = nan.len();
    nan[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = err(&nan);
    assert!(e.contains("NaN") && e.contains("byte "), "{e}");

    // A file that is safetensors but not ours.
    let other = safetensors::serialize(Vec::<(String, safetensors::tensor::TensorView<'_>)>::new(), None).unwrap();
    assert!(err(&other).contains("not a shrink model file"));

    assert!(io::load(&tmp("missing.safetensors"), &device).unwrap_err().to_string().contains("missing.safetensors"));
}

#[test]
fn burn_records_work_on_the_graph() {
    // The graph is a burn Module: burn's own records (burnpack) save and load its parameters.
    let device = BackendKind::Flex.device().unwrap();
    let a = ModelSpec::CifarResnet { depth: 8, width: 0.5 }.build([1, 12, 12], 4, 1, &device).unwrap();
    let b = ModelSpec::CifarResnet { depth: 8, width: 0.5 }.build([1, 12, 12], 4, 2, &device).unwrap();
    let x = InitRng::seeded(105).tensor([2, 1, 12, 12], Distribution::Default, &device);
    let ya: Vec<f32> = a.clone().valid().forward(x.clone()).into_data().try_to_vec().unwrap();
    let yb: Vec<f32> = b.clone().valid().forward(x.clone()).into_data().try_to_vec().unwrap();
    assert_ne!(ya, yb);
    let path = tmp("a.bpk");
    a.save_file(&path).unwrap();
    let loaded = b.load_file(&path);
    let yl: Vec<f32> = loaded.valid().forward(x).into_data().try_to_vec().unwrap();
    assert_eq!(ya, yl);
}

#[test]
fn layers_lists_parameterised_nodes_in_order() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Lenet5.build([1, 28, 28], 10, 0, &device).unwrap();
    let names: Vec<&str> = g.layers().map(|(_, n)| n.name.as_str()).collect();
    assert_eq!(names, ["conv1", "conv2", "fc1", "fc2", "fc3"]);
}

/// `g` with every conv and linear weight's entries at index `i % 10 != 3` set to zero (90 %).
fn sparsified(g: &shrink_core::Graph) -> shrink_core::Graph {
    use burn::module::Param;
    use burn::tensor::TensorData;
    let mut g = g.clone();
    for node in &mut g.nodes {
        let zero = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter().enumerate().map(|(i, x)| if i % 10 == 3 { x } else { 0.0 }).collect()
        };
        match node.params.as_mut() {
            Some(Params::Conv(p)) => {
                let (dims, d) = (p.weight.dims(), p.weight.device());
                let v = zero(p.weight.val().into_data().try_to_vec().unwrap());
                p.weight = Param::from_tensor(Tensor::from_data(TensorData::new(v, dims), &d));
            }
            Some(Params::Linear(p)) => {
                let (dims, d) = (p.weight.dims(), p.weight.device());
                let v = zero(p.weight.val().into_data().try_to_vec().unwrap());
                p.weight = Param::from_tensor(Tensor::from_data(TensorData::new(v, dims), &d));
            }
            _ => {}
        }
    }
    g
}

#[test]
fn sparse_weights_are_stored_compactly_and_round_trip_bit_exactly() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 28, 28], 10, 5, &device).unwrap();
    let s = sparsified(&g);
    let (dense_bytes, sparse_bytes) = (io::to_bytes(&g).unwrap(), io::to_bytes(&s).unwrap());
    // Weights: 1 bit of mask + 10 % of 32 bits per value, against 32 bits.
    assert!(sparse_bytes.len() * 5 < dense_bytes.len(), "{} vs {}", sparse_bytes.len(), dense_bytes.len());
    let names = safetensors::SafeTensors::deserialize(&sparse_bytes).unwrap().names().join(" ");
    assert!(names.contains("layer1.0.1.conv.weight_mask") && names.contains("fc.weight_nz"), "{names}");
    let back = io::from_bytes(&sparse_bytes, &tmp("sparse.safetensors"), &device).unwrap();
    assert_eq!(io::to_bytes(&back).unwrap(), sparse_bytes);
    let x = InitRng::seeded(106).tensor([2, 1, 28, 28], Distribution::Default, &device);
    let (a, b) = (s.valid().forward(x.clone()), back.valid().forward(x));
    assert_eq!(a.into_data().as_slice::<f32>().unwrap(), b.into_data().as_slice::<f32>().unwrap());

    // int8 weights with zeros: bitmask + int8 non-zeros.
    let fc = s.node_id("fc").unwrap();
    let Some(Params::Linear(p)) = &s.nodes[fc].params else { panic!() };
    let values: Vec<i8> = p
        .weight
        .val()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| if *v == 0.0 { 0 } else { 1 + (v.abs() * 50.0) as i8 % 100 })
        .collect();
    let ints = std::collections::BTreeMap::from([(
        "fc".to_string(),
        io::IntWeights { bits: 8, values: values.clone(), scales: vec![0.01; 10], zero_points: Vec::new() },
    )]);
    let bytes = io::to_bytes_with(&s, &ints, None).unwrap();
    let loaded = io::from_bytes_with(&bytes, &tmp("sparse8.safetensors"), &device).unwrap();
    assert_eq!(loaded.int_weights["fc"].values, values);
    assert!(safetensors::SafeTensors::deserialize(&bytes).unwrap().names().contains(&"fc.weight_q8_nz"));
}

#[test]
fn damaged_sparse_weights_are_refused_with_the_offset() {
    let device = BackendKind::Flex.device().unwrap();
    let g = sparsified(&ModelSpec::Mlp { hidden: vec![8] }.build([1, 4, 4], 3, 0, &device).unwrap());
    let bytes = io::to_bytes(&g).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let header = 8 + bytes[..8].iter().rev().fold(0usize, |a, b| a * 256 + *b as usize);
    let mask_at = header + meta.info("fc1.weight_mask").unwrap().data_offsets.0;
    assert_eq!(st.tensor("fc1.weight_mask").unwrap().data().len(), 16);
    let err = |b: &[u8]| io::from_bytes(b, &tmp("badsparse.safetensors"), &device).unwrap_err().to_string();
    // One more bit set than there are values stored: the count disagrees.
    let mut extra = bytes.clone();
    extra[mask_at] |= 0xFF;
    let e = err(&extra);
    assert!(e.contains("fc1.weight_nz") && e.contains("the non-zeros its mask marks"), "{e}");
    // A NaN among the non-zeros is named with its byte offset.
    let nz_at = header + meta.info("fc1.weight_nz").unwrap().data_offsets.0;
    let mut nan = bytes.clone();
    nan[nz_at..nz_at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = err(&nan);
    assert!(e.contains("NaN") && e.contains(&format!("byte {nz_at}")), "{e}");
}

#[test]
fn a_mask_marking_values_past_the_weight_is_refused() {
    // fc2 of this MLP has 3 × 5 = 15 weights: its 2-byte mask has one bit past them.
    let device = BackendKind::Flex.device().unwrap();
    let g = sparsified(&ModelSpec::Mlp { hidden: vec![5] }.build([1, 4, 4], 3, 0, &device).unwrap());
    let bytes = io::to_bytes(&g).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let header = 8 + bytes[..8].iter().rev().fold(0usize, |a, b| a * 256 + *b as usize);
    let last = header + meta.info("fc2.weight_mask").unwrap().data_offsets.1 - 1;
    let mut tail = bytes.clone();
    tail[last] |= 0x80;
    let e = io::from_bytes(&tail, &tmp("tail.safetensors"), &device).unwrap_err().to_string();
    assert!(e.contains("marks values past the weight's 15") && e.contains(&format!("byte {last}")), "{e}");
    assert!(io::from_bytes(&bytes, &tmp("tail.safetensors"), &device).is_ok());
}

#[test]
fn asymmetric_int_weights_round_trip_and_bad_zero_points_are_refused() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Mlp { hidden: vec![6] }.build([1, 4, 4], 3, 0, &device).unwrap();
    // fc1: 6 × 16 int4 weights with zero points; -8 is a valid stored value when asymmetric.
    let values: Vec<i8> = (0..96).map(|i| (i % 16) as i8 - 8).collect();
    let zero_points: Vec<i8> = vec![-3, 0, 2, -8, 7, 1];
    let w = io::IntWeights { bits: 4, values: values.clone(), scales: vec![0.02; 6], zero_points: zero_points.clone() };
    let ints = std::collections::BTreeMap::from([("fc1".to_string(), w.clone())]);
    let bytes = io::to_bytes_with(&g, &ints, None).unwrap();
    let loaded = io::from_bytes_with(&bytes, &tmp("asym4.safetensors"), &device).unwrap();
    assert_eq!(loaded.int_weights["fc1"], w);
    // The graph's f32 weight is scale · (q − zero point).
    let fc1 = loaded.graph.node_id("fc1").unwrap();
    let Some(Params::Linear(p)) = &loaded.graph.nodes[fc1].params else { panic!() };
    let deq = p.weight.val().into_data().try_to_vec::<f32>().unwrap();
    assert_eq!(deq, w.dequantize());
    assert_eq!(deq[0], 0.02 * (-8.0 - -3.0));
    // A zero point outside the 4-bit range is refused, naming the tensor and its byte.
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let header = 8 + bytes[..8].iter().rev().fold(0usize, |a, b| a * 256 + *b as usize);
    let at = header + meta.info("fc1.weight_zero_point").unwrap().data_offsets.0 + 2;
    let mut bad = bytes.clone();
    bad[at] = 9;
    let e = io::from_bytes(&bad, &tmp("asym4bad.safetensors"), &device).unwrap_err().to_string();
    assert!(
        e.contains("fc1.weight_zero_point")
            && e.contains("outside the 4-bit range")
            && e.contains(&format!("byte {at}")),
        "{e}"
    );
    // Writing refuses zero points that do not fit either.
    let mut wrong = w.clone();
    wrong.zero_points = vec![0; 5];
    assert!(io::to_bytes_with(&g, &std::collections::BTreeMap::from([("fc1".to_string(), wrong)]), None).is_err());
}
