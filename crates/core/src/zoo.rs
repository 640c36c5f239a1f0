//! Reference models, built as [`Graph`]s so every pass applies to them.
//!
//! - [`ModelSpec::CifarResnet`]: the CIFAR ResNets of He et al. (2016), depth 6n+2
//!   (8, 14, 20, 32, 56, …), three stages of 16/32/64 × width channels. Where a block changes
//!   shape the shortcut is a 1×1 convolution with batch norm (option B), so that every
//!   residual add is a real coupling point for structured pruning.
//! - [`ModelSpec::Resnet`]: the ImageNet ResNet-18/34 of torchvision.
//! - [`ModelSpec::Lenet5`]: LeNet-5 with ReLU and max pooling.
//! - [`ModelSpec::Mlp`]: a multi-layer perceptron.
//! - [`ModelSpec::Onnx`]: a model of the user's own, from an ONNX file.

use std::path::PathBuf;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::data::Normalization;
use crate::graph::{Conv2dSpec, Graph, GraphBuilder, NodeId};
use crate::init::InitRng;
use crate::{Error, Result};

/// Which model to build, as written in an experiment config (`[model] kind = "cifar_resnet"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSpec {
    /// CIFAR-style ResNet of depth 6n+2.
    CifarResnet {
        /// 8, 14, 20, 32, 44, 56, 110, … (6n+2).
        depth: usize,
        /// Channel multiplier on 16/32/64 (default 1.0).
        #[serde(default = "one")]
        width: f64,
    },
    /// ImageNet-style ResNet with basic blocks.
    Resnet {
        /// 18 or 34.
        depth: usize,
    },
    /// LeNet-5 (conv 6 → conv 16 → 120 → 84 → classes).
    Lenet5,
    /// Fully connected network on the flattened input.
    Mlp {
        /// Sizes of the hidden layers.
        hidden: Vec<usize>,
    },
    /// A model from an ONNX file (exported by PyTorch, TensorFlow, Paddle…), imported with its
    /// weights ([`crate::onnx`]); its input is the data's image shape.
    Onnx {
        /// The `.onnx` file.
        path: PathBuf,
        /// Mean per channel (0..1 scale) the model's inputs are normalised with:
        /// `(pixel / 255 − mean) / std`, as the model was trained.
        mean: Vec<f64>,
        /// Standard deviation per channel (0..1 scale).
        std: Vec<f64>,
        /// The graph output to use, by name, when the model has several.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<String>,
    },
}

/// A lower bound of a model's size ([`ModelSpec::size_floor`]), as floats so that no setting
/// overflows it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SizeFloor {
    /// Trainable values.
    pub params: f64,
    /// Graph nodes.
    pub nodes: f64,
    /// Activation values one image produces (every node's output).
    pub activations: f64,
}

fn one() -> f64 {
    1.0
}

impl ModelSpec {
    /// A short human name such as `resnet20` or `mlp-256-128`.
    pub fn name(&self) -> String {
        match self {
            ModelSpec::CifarResnet { depth, width } if *width == 1.0 => format!("resnet{depth}"),
            ModelSpec::CifarResnet { depth, width } => format!("resnet{depth}-w{width}"),
            ModelSpec::Resnet { depth } => format!("resnet{depth}-imagenet"),
            ModelSpec::Lenet5 => "lenet5".into(),
            ModelSpec::Mlp { hidden } if hidden.len() > 8 => {
                format!("mlp-{}-…-{} ({} hidden layers)", hidden[0], hidden[hidden.len() - 1], hidden.len())
            }
            ModelSpec::Mlp { hidden } => {
                let sizes: Vec<String> = hidden.iter().map(|h| h.to_string()).collect();
                format!("mlp-{}", sizes.join("-"))
            }
            ModelSpec::Onnx { path, .. } => {
                format!("onnx:{}", path.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default())
            }
        }
    }

    /// The input normalisation the model needs, when it fixes one (imported models were trained
    /// with their own); `None` for the zoo, which learns on the data's own statistics.
    pub fn normalization(&self) -> Option<Normalization> {
        match self {
            ModelSpec::Onnx { mean, std, .. } => Some(Normalization { mean: mean.clone(), std: std.clone() }),
            _ => None,
        }
    }

    /// Checks the settings without building anything.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        match self {
            ModelSpec::CifarResnet { depth, width } => {
                if *depth < 8 || (depth - 2) % 6 != 0 {
                    return Err(Error::setting(
                        "model.depth",
                        format!("a CIFAR ResNet has depth 6n+2 (8, 14, 20, 32, 56, …), got {depth}"),
                    ));
                }
                if !(*width > 0.0 && *width <= 64.0) {
                    return Err(Error::setting(
                        "model.width",
                        format!("expected a multiplier in (0, 64], got {width}"),
                    ));
                }
            }
            ModelSpec::Resnet { depth } => {
                if *depth != 18 && *depth != 34 {
                    return Err(Error::setting(
                        "model.depth",
                        format!("an ImageNet ResNet here is 18 or 34, got {depth}"),
                    ));
                }
            }
            ModelSpec::Lenet5 => {}
            ModelSpec::Mlp { hidden } => {
                if hidden.contains(&0) {
                    return Err(Error::setting("model.hidden", "layer sizes must be positive"));
                }
            }
            ModelSpec::Onnx { path, mean, std, .. } => {
                if !path.is_file() {
                    return Err(Error::setting("model.path", format!("{} is not a file", path.display())));
                }
                if mean.len() != std.len() || mean.is_empty() {
                    return Err(Error::setting(
                        "model.mean",
                        format!("mean and std need one value per input channel, got {} and {}", mean.len(), std.len()),
                    ));
                }
                if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                    return Err(Error::setting("model.std", format!("every std must be positive, got {s}")));
                }
                if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
                    return Err(Error::setting("model.mean", format!("every mean must be finite, got {m}")));
                }
            }
        }
        Ok(())
    }

    /// What building this model for `[channels, height, width]` inputs would take at least,
    /// computed from its settings without building it: the zoo's sizes are settings (`hidden`,
    /// `depth`, `width`), so a config can ask for more than any machine has, and this is how
    /// that is refused before anything is allocated. Kinds of a fixed size (LeNet-5, the
    /// ImageNet ResNets, an ONNX file already on disk) give zeros: building them is bounded.
    pub fn size_floor(&self, input: [usize; 3]) -> SizeFloor {
        let [c, h, w] = input.map(|v| v as f64);
        match self {
            ModelSpec::Mlp { hidden } => {
                let mut previous = c * h * w;
                let mut floor = SizeFloor { params: 0.0, nodes: 2.0, activations: previous };
                for &size in hidden {
                    let size = size as f64;
                    floor.params += previous * size;
                    floor.nodes += 2.0;
                    floor.activations += 2.0 * size;
                    previous = size;
                }
                floor
            }
            ModelSpec::CifarResnet { depth, width } => {
                let n = (depth.saturating_sub(2) / 6) as f64;
                let mut floor = SizeFloor { params: 0.0, nodes: 4.0, activations: c * h * w };
                for (stage, channels) in [16.0, 32.0, 64.0].into_iter().enumerate() {
                    let channels = (channels * width).round().max(1.0);
                    let side = 2f64.powi(stage as i32);
                    // Per block at least two 3×3 convolutions and seven outputs of the stage's
                    // resolution (convs, batch norms, ReLUs, the add).
                    floor.params += n * 18.0 * channels * channels;
                    floor.nodes += n * 7.0;
                    floor.activations += n * 7.0 * channels * (h / side).ceil() * (w / side).ceil();
                }
                floor
            }
            ModelSpec::Resnet { .. } | ModelSpec::Lenet5 | ModelSpec::Onnx { .. } => SizeFloor::default(),
        }
    }

    /// Imports an ONNX model for inputs of `input`, checking the normalisation's channels.
    fn import(&self, input: [usize; 3], device: &Device) -> Result<Option<Graph>> {
        let ModelSpec::Onnx { path, mean, output, .. } = self else { return Ok(None) };
        if mean.len() != input[0] {
            return Err(Error::setting(
                "model.mean",
                format!("{} values for images of {} channels", mean.len(), input[0]),
            ));
        }
        let options =
            crate::onnx::ImportOptions { input_shape: Some(input), keep_final_softmax: false, output: output.clone() };
        Ok(Some(crate::onnx::import(path, &options, device)?.graph))
    }

    /// The model as [`ModelSpec::build`] makes it, but with any number of outputs: the node
    /// names and shapes that configs refer to (hint pairs, prune patterns), checked before the
    /// data loads.
    ///
    /// # Errors
    /// As [`ModelSpec::build`].
    pub fn build_for_names(&self, input: [usize; 3], device: &Device) -> Result<Graph> {
        match self.import(input, device)? {
            Some(graph) => Ok(graph),
            None => self.build(input, 10, 0, device),
        }
    }

    /// Builds the model for inputs of `[channels, height, width]` and `classes` outputs, its
    /// initial weights drawn from a generator seeded with `seed` ([`InitRng`]): the same seed
    /// gives the same weights on every backend, so runs on different backends start from the
    /// same model and can be compared. An ONNX model is imported with its own weights (the
    /// seed is not used), and its outputs must be the data's classes.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for bad settings, [`Error::InvalidGraph`] when the input is too
    /// small for the model (e.g. LeNet-5 on 8×8 images).
    pub fn build(&self, input: [usize; 3], classes: usize, seed: u64, device: &Device) -> Result<Graph> {
        self.validate()?;
        if classes == 0 {
            return Err(Error::setting("classes", "at least one class is needed"));
        }
        if let Some(graph) = self.import(input, device)? {
            let outputs = graph.num_outputs();
            if outputs != classes {
                let ModelSpec::Onnx { path, .. } = self else { unreachable!("imported") };
                return Err(Error::setting(
                    "model.path",
                    format!("{} has {outputs} outputs, but the data has {classes} classes", path.display()),
                ));
            }
            return Ok(graph);
        }
        let rng = &mut InitRng::seeded(seed);
        match self {
            ModelSpec::CifarResnet { depth, width } => cifar_resnet(*depth, *width, input, classes, rng, device),
            ModelSpec::Resnet { depth } => imagenet_resnet(*depth, input, classes, rng, device),
            ModelSpec::Lenet5 => lenet5(input, classes, rng, device),
            ModelSpec::Mlp { hidden } => mlp(hidden, input, classes, rng, device),
            ModelSpec::Onnx { .. } => unreachable!("imported above"),
        }
    }
}

/// conv → bn → relu, the stem of every ResNet here.
fn conv_bn(b: &mut GraphBuilder, prefix: &str, x: NodeId, spec: Conv2dSpec) -> NodeId {
    let x = b.conv2d(format!("{prefix}.conv"), x, spec);
    b.batch_norm(format!("{prefix}.bn"), x)
}

/// A basic residual block: two 3×3 conv-bn pairs, with a projection shortcut when the shape
/// changes.
fn basic_block(b: &mut GraphBuilder, name: &str, x: NodeId, out: usize, stride: usize) -> NodeId {
    let in_channels = b.shape(x).map(|s| s.channels()).unwrap_or(0);
    let y = conv_bn(b, &format!("{name}.1"), x, Conv2dSpec::new(out, 3).stride(stride).padding(1));
    let y = b.relu(format!("{name}.1.relu"), y);
    let y = conv_bn(b, &format!("{name}.2"), y, Conv2dSpec::new(out, 3).padding(1));
    let shortcut = if stride != 1 || in_channels != out {
        conv_bn(b, &format!("{name}.shortcut"), x, Conv2dSpec::new(out, 1).stride(stride))
    } else {
        x
    };
    let sum = b.add(format!("{name}.add"), &[y, shortcut]);
    b.relu(format!("{name}.relu"), sum)
}

fn cifar_resnet(
    depth: usize,
    width: f64,
    input: [usize; 3],
    classes: usize,
    rng: &mut InitRng,
    device: &Device,
) -> Result<Graph> {
    let n = (depth - 2) / 6;
    let widths = [16.0, 32.0, 64.0].map(|c: f64| ((c * width).round() as usize).max(1));
    let mut b = GraphBuilder::new(input);
    let input = b.input();
    let x = conv_bn(&mut b, "stem", input, Conv2dSpec::new(widths[0], 3).padding(1));
    let x = b.relu("stem.relu", x);
    let stages: Vec<(usize, usize)> = widths.iter().map(|&w| (n, w)).collect();
    resnet_body(b, x, &stages, classes, rng, device)
}

/// Stages of basic blocks (`(blocks, width)`, stride 2 at the start of every stage but the
/// first), then global pooling and the classifier.
fn resnet_body(
    mut b: GraphBuilder,
    mut x: NodeId,
    stages: &[(usize, usize)],
    classes: usize,
    rng: &mut InitRng,
    device: &Device,
) -> Result<Graph> {
    for (stage, &(n, w)) in stages.iter().enumerate() {
        for block in 0..n {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            x = basic_block(&mut b, &format!("layer{}.{block}", stage + 1), x, w, stride);
        }
    }
    let x = b.global_avg_pool("pool", x);
    let x = b.flatten("flatten", x);
    let x = b.linear("fc", x, classes, true);
    b.build(x, rng, device)
}

fn imagenet_resnet(
    depth: usize,
    input: [usize; 3],
    classes: usize,
    rng: &mut InitRng,
    device: &Device,
) -> Result<Graph> {
    let blocks = if depth == 18 { [2, 2, 2, 2] } else { [3, 4, 6, 3] };
    let mut b = GraphBuilder::new(input);
    let input = b.input();
    let x = conv_bn(&mut b, "stem", input, Conv2dSpec::new(64, 7).stride(2).padding(3));
    let x = b.relu("stem.relu", x);
    let x = b.max_pool("stem.pool", x, 3, 2, 1);
    let stages: Vec<(usize, usize)> = blocks.into_iter().zip([64, 128, 256, 512]).collect();
    resnet_body(b, x, &stages, classes, rng, device)
}

fn lenet5(input: [usize; 3], classes: usize, rng: &mut InitRng, device: &Device) -> Result<Graph> {
    let mut b = GraphBuilder::new(input);
    // 28×28 inputs (MNIST) get the padding of 2 that makes them the 32×32 of the original paper.
    let pad = if input[1] == 28 && input[2] == 28 { 2 } else { 0 };
    let input = b.input();
    let x = b.conv2d("conv1", input, Conv2dSpec::new(6, 5).padding(pad).bias(true));
    let x = b.relu("relu1", x);
    let x = b.max_pool("pool1", x, 2, 2, 0);
    let x = b.conv2d("conv2", x, Conv2dSpec::new(16, 5).bias(true));
    let x = b.relu("relu2", x);
    let x = b.max_pool("pool2", x, 2, 2, 0);
    let x = b.flatten("flatten", x);
    let x = b.linear("fc1", x, 120, true);
    let x = b.relu("relu3", x);
    let x = b.linear("fc2", x, 84, true);
    let x = b.relu("relu4", x);
    let x = b.linear("fc3", x, classes, true);
    b.build(x, rng, device)
}

fn mlp(hidden: &[usize], input: [usize; 3], classes: usize, rng: &mut InitRng, device: &Device) -> Result<Graph> {
    let mut b = GraphBuilder::new(input);
    let input = b.input();
    let mut x = b.flatten("flatten", input);
    for (i, &h) in hidden.iter().enumerate() {
        x = b.linear(format!("fc{}", i + 1), x, h, true);
        x = b.relu(format!("relu{}", i + 1), x);
    }
    let x = b.linear(format!("fc{}", hidden.len() + 1), x, classes, true);
    b.build(x, rng, device)
}
