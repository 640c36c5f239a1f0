#!/usr/bin/env python3
"""Trains two small classifiers on the MNIST-5k digits in PyTorch and exports them to ONNX:
models that shrink did not make, for the end-to-end import tests and configs.

  resnet_mnist_opset11.onnx     a CIFAR-style ResNet (conv-bn-relu stem, 3 stages of basic blocks
                                with projection shortcuts, global average pool, linear), exported
                                at opset 11 with `x.view(x.size(0), -1)` (a Shape/Gather/Concat/
                                Reshape chain and a dynamic batch).
  resnet_mnist_opset17.onnx     the same weights exported at opset 17.
  mobilenet_mnist_opset13.onnx  a MobileNetV3-style network (inverted residuals with depthwise
                                3x3 convs, hard-swish, ReLU6, squeeze-and-excitation with
                                hard-sigmoid), exported at opset 13 with torch.flatten.
  reference_input.pb            the first 16 test digits, normalised as the models expect
                                ((x / 255 - 0.1307) / 0.3081), an ONNX TensorProto [16, 1, 28, 28];
  <model>_reference_output.pb   ONNX Runtime's outputs (logits [16, 10]) for that input.
  pytorch_accuracy.txt          each model's test top-1 on the 1,000 test digits, in PyTorch.
  unsupported_ops.onnx          a small graph with ops shrink does not import (Resize, Erf,
                                GridSample), written with onnx.helper: what a refusal looks like.

Run from the repository root: python3 data/onnx/make_models.py
Needs torch, onnx, onnxruntime and numpy (versions it was made with are printed and written to
versions.txt). Deterministic on CPU for a given torch version (seeded, one thread).
"""
import gzip
import os
import struct

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "mnist5k")
MEAN, STD = 0.1307, 0.3081


def idx(path):
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


def load(split):
    x = idx(os.path.join(DATA, f"{split}-images-idx3-ubyte.gz")).astype(np.float32) / 255.0
    y = idx(os.path.join(DATA, f"{split}-labels-idx1-ubyte.gz")).astype(np.int64)
    return torch.from_numpy(((x - MEAN) / STD)[:, None]), torch.from_numpy(y)


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1)
        return self.fc(x.view(x.size(0), -1))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.expand = nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.expand(F.relu(self.reduce(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, expand, stride, se, act):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), act())
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), act())
        self.se = SqueezeExcite(mid) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 2, 1, False, nn.ReLU6),
            InvertedResidual(16, 24, 3, 2, False, nn.ReLU6),
            InvertedResidual(24, 24, 3, 1, True, nn.Hardswish),
            InvertedResidual(24, 40, 3, 2, True, nn.Hardswish),
            InvertedResidual(40, 40, 3, 1, True, nn.Hardswish),
        )
        self.head = nn.Sequential(nn.Conv2d(40, 96, 1, bias=False), nn.BatchNorm2d(96), nn.Hardswish())
        self.classifier = nn.Sequential(nn.Linear(96, 64), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.head(self.blocks(self.stem(x))), 1)
        return self.classifier(torch.flatten(x, 1))


def train(model, x, y, epochs, lr):
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            b = order[i : i + 64]
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    model.eval()
    return model


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def export(model, name, opset, sample):
    path = os.path.join(HERE, name)
    torch.onnx.export(
        model, sample, path, opset_version=opset, dynamo=False,
        input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
    )
    onnx.checker.check_model(onnx.load(path))
    return path


def unsupported_ops():
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], dtype=np.float32), "scales")
    grid = numpy_helper.from_array(rng.uniform(-1, 1, (1, 8, 8, 2)).astype(np.float32), "grid")
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c", "", "scales"], ["r"], name="upsample", mode="nearest"),
        helper.make_node("Erf", ["r"], ["e"], name="gelu_erf"),
        helper.make_node("GridSample", ["e", "grid"], ["g"], name="warp"),
        helper.make_node("GlobalAveragePool", ["g"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["logits"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes, "unsupported", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], [w, scales, grid],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="make_models.py")
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(HERE, "unsupported_ops.onnx"))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    xt, yt = load("train")
    xs, ys = load("t10k")
    reference = xs[:16].numpy()
    with open(os.path.join(HERE, "reference_input.pb"), "wb") as f:
        f.write(numpy_helper.from_array(reference, "image").SerializeToString())
    made = []
    resnet = train(ResNet(), xt, yt, epochs=6, lr=1e-3)
    measured = {"resnet_mnist": accuracy(resnet, xs, ys)}
    made += [export(resnet, "resnet_mnist_opset11.onnx", 11, xs[:1]), export(resnet, "resnet_mnist_opset17.onnx", 17, xs[:1])]
    mobilenet = train(MobileNet(), xt, yt, epochs=6, lr=3e-3)
    measured["mobilenet_mnist"] = accuracy(mobilenet, xs, ys)
    # Test top-1 on the 1,000 MNIST-5k test digits, measured in PyTorch (the import test checks
    # that shrink measures the same on the imported models).
    with open(os.path.join(HERE, "pytorch_accuracy.txt"), "w") as f:
        for name, acc in measured.items():
            print(f"{name}: test top-1 {acc:.4f} (PyTorch)")
            f.write(f"{name} {acc:.4f}\n")
    made.append(export(mobilenet, "mobilenet_mnist_opset13.onnx", 13, xs[:1]))
    for path in made:
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"image": reference})
        out = path.replace(".onnx", "_reference_output.pb")
        with open(out, "wb") as f:
            f.write(numpy_helper.from_array(logits.astype(np.float32), "logits").SerializeToString())
        print(f"{os.path.basename(path)}: {os.path.getsize(path)} bytes")
    unsupported_ops()
    with open(os.path.join(HERE, "versions.txt"), "w") as f:
        f.write(f"torch {torch.__version__}\nonnx {onnx.__version__}\nonnxruntime {ort.__version__}\nnumpy {np.__version__}\n")


if __name__ == "__main__":
    main()
