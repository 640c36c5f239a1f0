//! Model files round-trip bit-exactly and refuse damage with a clear message.

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
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
    device.seed(3);
    let g = ModelSpec::CifarResnet { depth: 8, width: 1.0 }.build([1, 28, 28], 10, &device).unwrap();
    let path = tmp("r8.safetensors");
    io::save(&g, &path).unwrap();
    let back = io::load(&path, &device).unwrap();
    assert_eq!(io::to_bytes(&back).unwrap(), io::to_bytes(&g).unwrap());
    let x = Tensor::<4>::random([2, 1, 28, 28], Distribution::Default, &device);
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
    let g = b.build(x, &device).unwrap();
    let path = tmp("small.safetensors");
    io::save(&g, &path).unwrap();
    let back = io::load(&path, &device).unwrap();
    let Some(Params::Conv(p)) = &back.nodes[1].params else { panic!() };
    assert_eq!(p.weight.dims(), [3, 1, 3, 3]);
}

#[test]
fn damaged_files_are_refused() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Mlp { hidden: vec![8] }.build([1, 4, 4], 3, &device).unwrap();
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
    device.seed(1);
    let a = ModelSpec::CifarResnet { depth: 8, width: 0.5 }.build([1, 12, 12], 4, &device).unwrap();
    device.seed(2);
    let b = ModelSpec::CifarResnet { depth: 8, width: 0.5 }.build([1, 12, 12], 4, &device).unwrap();
    let x = Tensor::<4>::random([2, 1, 12, 12], Distribution::Default, &device);
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
    let g = ModelSpec::Lenet5.build([1, 28, 28], 10, &device).unwrap();
    let names: Vec<&str> = g.layers().map(|(_, n)| n.name.as_str()).collect();
    assert_eq!(names, ["conv1", "conv2", "fc1", "fc2", "fc3"]);
}
