//! Pruning a burn model defined right here — not a shrink graph — in a few lines, in the user's
//! own training loop: 80 % of its weights removed by global magnitude, the masks kept through
//! the user's own optimiser steps, and the model still learning.
//!
//! `cargo run --release -p shrink-prune --example prune_own_model`

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Distribution, Int, Tensor};
use shrink_core::BackendKind;

/// The user's own model: a two-layer perceptron.
#[derive(Module, Debug)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
    relu: Relu,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            fc1: LinearConfig::new(16, 64).init(device),
            fc2: LinearConfig::new(64, 4).init(device),
            relu: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(self.relu.forward(self.fc1.forward(x)))
    }
}

/// A task with a known answer: the class is which quarter of the 16 inputs has the largest sum.
fn batch(n: usize, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let x = Tensor::<2>::random([n, 16], Distribution::Normal(0.0, 1.0), device);
    let y = x.clone().reshape([n, 4, 4]).sum_dim(2).reshape([n, 4]).argmax(1).reshape([n]);
    (x, y)
}

fn accuracy(model: &Mlp, x: Tensor<2>, y: Tensor<1, Int>) -> f64 {
    let n = y.dims()[0];
    let hits: i64 = model.forward(x).argmax(1).reshape([n]).equal(y).int().sum().into_scalar();
    hits as f64 / n as f64
}

fn zeros(model: &Mlp) -> (usize, usize) {
    let w: Vec<f32> = model.fc1.weight.val().into_data().try_to_vec().unwrap();
    let v: Vec<f32> = model.fc2.weight.val().into_data().try_to_vec().unwrap();
    let all = w.iter().chain(&v);
    (all.clone().filter(|x| **x == 0.0).count(), all.count())
}

fn main() {
    let device = BackendKind::Flex.device().expect("the default CPU backend");
    device.seed(7);
    let ad = device.clone().autodiff();
    let mut model = Mlp::new(&ad);
    let mut optim = AdamConfig::new().init();
    let (test_x, test_y) = batch(2000, &device);
    let mut train = |mut model: Mlp, steps: usize, masks: Option<&mut shrink_prune::ParamMasks>| {
        let mut masks = masks;
        for _ in 0..steps {
            let (x, y) = batch(128, &ad);
            let logits = model.forward(x);
            let loss = log_softmax(logits, 1).gather(1, y.unsqueeze_dim(1)).mean().neg();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(0.01, model, grads);
            // The one line pruning adds to a training loop: pruned weights stay zero.
            if let Some(m) = masks.as_deref_mut() {
                model = model.map(m);
            }
        }
        model
    };
    model = train(model, 300, None);
    let dense = accuracy(&model.valid(), test_x.clone(), test_y.clone());

    let (pruned, mut masks) = shrink_prune::prune_global(model, 0.8).expect("a valid sparsity");
    let at_once = accuracy(&pruned.valid(), test_x.clone(), test_y.clone());
    let model = train(pruned, 300, Some(&mut masks));
    let tuned = accuracy(&model.valid(), test_x, test_y);
    let (z, n) = zeros(&model.valid());
    println!("dense {dense:.3}; 80 % of the weights pruned: {at_once:.3} at once, {tuned:.3} after fine-tuning");
    println!("{z} of {n} weights are zero after 300 optimiser steps ({:.1} %)", 100.0 * z as f64 / n as f64);

    // What the example promises, checked.
    assert_eq!(z, (0.8 * n as f64).floor() as usize, "the masks held through the optimiser's steps");
    assert!(dense > 0.8, "the dense model learned the task: {dense}");
    assert!(tuned > dense - 0.05, "fine-tuning recovers the accuracy: {tuned} vs {dense}");
}
