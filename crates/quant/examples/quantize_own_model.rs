//! Weight-only quantization of a burn model defined right here — not a shrink graph — in a few
//! lines: int8 and int4 per output channel, with the accuracy and the stored size measured.
//!
//! `cargo run --release -p shrink-quant --example quantize_own_model`

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Distribution, Int, Tensor};
use shrink_core::BackendKind;
use shrink_quant::{Granularity, QuantScheme, WeightQuantizer};

/// The user's own model: a two-layer perceptron.
#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    relu: Relu,
}

impl Mlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.relu.forward(self.fc1.forward(x)))
    }
}

/// A task with a known answer: the class is which quarter of the 32 inputs has the largest sum.
fn batch(n: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let x = Tensor::<2>::random([n, 32], Distribution::Normal(0.0, 1.0), device);
    let y = x.clone().reshape([n, 4, 8]).sum_dim(2).reshape([n, 4]).argmax(1).reshape([n]);
    (x, y)
}

fn accuracy(model: &Mlp, x: Tensor<2>, y: Tensor<1, Int>) -> f64 {
    let n = y.dims()[0];
    let hits: i64 = model.forward(x).argmax(1).reshape([n]).equal(y).int().sum().into_scalar();
    hits as f64 / n as f64
}

fn main() {
    let device = BackendKind::Flex.device().expect("the default CPU backend");
    device.seed(3);
    let ad = device.clone().autodiff();
    let mut model =
        Mlp { fc1: LinearConfig::new(32, 128).init(&ad), fc2: LinearConfig::new(128, 4).init(&ad), relu: Relu::new() };
    let mut optim = AdamConfig::new().init();
    for _ in 0..400 {
        let (x, y) = batch(128, &ad);
        let loss = log_softmax(model.forward(x), 1).gather(1, y.unsqueeze_dim(1)).mean().neg();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(0.01, model, grads);
    }
    let model = model.valid();
    let (x, y) = batch(4000, &device);
    let dense = accuracy(&model, x.clone(), y.clone());
    let f32_bytes = (32 * 128 + 128 * 4) * 4;
    println!("f32: top-1 {dense:.4}, weights {f32_bytes} bytes");
    let mut results = Vec::new();
    for bits in [8, 4] {
        // The whole API: a scheme, a mapper, one `map`.
        let scheme = QuantScheme { bits, symmetric: true, granularity: Granularity::PerChannel };
        let mut quantizer = WeightQuantizer::new(scheme).expect("2 to 8 bits");
        let quantized = quantizer.quantize(model.clone()).expect("weights on the host");
        let acc = accuracy(&quantized, x.clone(), y.clone());
        let bytes = quantizer.stored_bytes();
        println!(
            "int{bits} weights, per channel: top-1 {acc:.4} ({:+.2} pp), weights {bytes} bytes ({:.3}× f32)",
            (acc - dense) * 100.0,
            bytes as f64 / f32_bytes as f64
        );
        results.push((bits, acc, bytes));
    }

    // What the example promises, checked.
    assert!(dense > 0.9, "the f32 model learned the task: {dense}");
    let (_, acc8, bytes8) = results[0];
    let (_, acc4, bytes4) = results[1];
    assert!(acc8 >= dense - 0.005, "int8 costs at most 0.5 pp: {acc8} vs {dense}");
    assert!(acc4 >= dense - 0.03, "int4 costs at most 3 pp: {acc4} vs {dense}");
    assert!(bytes8 * 3 < f32_bytes && bytes4 * 6 < f32_bytes, "{bytes8} and {bytes4} of {f32_bytes} bytes");
}
