//! Zoo models: shapes, published parameter counts, forward passes.

use burn::tensor::Distribution;
use shrink_core::BackendKind;
use shrink_core::InitRng;
use shrink_core::metrics::model_stats;
use shrink_core::zoo::ModelSpec;

fn params(spec: ModelSpec, input: [usize; 3], classes: usize) -> usize {
    let device = BackendKind::Flex.device().unwrap();
    model_stats(&spec.build(input, classes, 0, &device).unwrap()).unwrap().params
}

#[test]
fn cifar_resnets_match_published_sizes() {
    // He et al. 2016, Table 6: ResNet-20 0.27M, ResNet-56 0.85M (option-A shortcuts; our
    // projection shortcuts add 2,752 parameters).
    let r20 = params(ModelSpec::CifarResnet { depth: 20, width: 1.0 }, [3, 32, 32], 10);
    let r56 = params(ModelSpec::CifarResnet { depth: 56, width: 1.0 }, [3, 32, 32], 10);
    assert!((0.265e6..0.275e6).contains(&(r20 as f64)), "resnet20 has {r20}");
    assert!((0.845e6..0.860e6).contains(&(r56 as f64)), "resnet56 has {r56}");
    // Exact count for ResNet-20 with projection shortcuts: 269,722 (option A) + 2,752.
    assert_eq!(r20, 269_722 + 2_752);
}

#[test]
fn imagenet_resnet18_has_11_69m_parameters() {
    let device = BackendKind::Flex.device().unwrap();
    let g = ModelSpec::Resnet { depth: 18 }.build([3, 224, 224], 1000, 0, &device).unwrap();
    let stats = model_stats(&g).unwrap();
    assert_eq!(stats.params, 11_689_512);
    // torchvision's ResNet-18: 1.814 GMACs at 224×224.
    assert!((1.80e9..1.83e9).contains(&(stats.macs as f64)), "{}", stats.macs);
    let r34 = ModelSpec::Resnet { depth: 34 }.build([3, 224, 224], 1000, 0, &device).unwrap();
    assert_eq!(model_stats(&r34).unwrap().params, 21_797_672);
}

#[test]
fn lenet5_and_mlp_sizes() {
    // LeNet-5 with 28×28 input padded to 32×32: 61,706 parameters.
    assert_eq!(params(ModelSpec::Lenet5, [1, 28, 28], 10), 61_706);
    assert_eq!(params(ModelSpec::Mlp { hidden: vec![100] }, [1, 28, 28], 10), 784 * 100 + 100 + 100 * 10 + 10);
}

#[test]
fn forward_shapes_and_bad_inputs() {
    let device = BackendKind::Flex.device().unwrap();
    for spec in
        [ModelSpec::CifarResnet { depth: 8, width: 0.5 }, ModelSpec::Lenet5, ModelSpec::Mlp { hidden: vec![32, 16] }]
    {
        let g = spec.build([1, 28, 28], 10, 0, &device).unwrap();
        let y = g.forward(InitRng::seeded(113).tensor([3, 1, 28, 28], Distribution::Default, &device));
        assert_eq!(y.dims(), [3, 10], "{}", spec.name());
        assert!(g.check_input(&[3, 1, 28, 28]).is_ok());
        assert!(g.check_input(&[3, 3, 28, 28]).is_err());
    }
    let e = ModelSpec::CifarResnet { depth: 21, width: 1.0 }.build([1, 28, 28], 10, 0, &device).unwrap_err();
    assert!(e.to_string().contains("6n+2"), "{e}");
    let e = ModelSpec::Lenet5.build([1, 8, 8], 10, 0, &device).unwrap_err();
    assert!(e.to_string().contains("conv2"), "{e}");
}
