#!/usr/bin/env python3
"""Vendors the ONNX project's own conformance data for the ops shrink imports.

Writes, under crates/core/tests/fixtures/onnx/:
  node/<test>/model.onnx + test_data_set_0/{input,output}_<k>.pb
      every node test of the `onnx` package (onnx/backend/test/case/node, generated exactly as
      `backend-test-tools generate-data` generates the model tests) whose nodes all have an op
      type in shrink's supported list, with the test's rtol/atol in tolerance.txt;
  light/light_<model>.onnx + light_<model>_output_0.pb
      the package's "light" model-zoo graphs and their expected outputs, copied unchanged.

Run with the onnx version in ONNX_VERSION below (pip install onnx==1.23.2); the data is
Apache-2.0 (ONNX Project Contributors), see NOTICE in that folder.
"""
import os
import shutil
import sys

import onnx
from onnx import numpy_helper
from onnx.backend.test.case import node as node_cases

ONNX_VERSION = "1.23.2"
ROOT = os.path.join(os.path.dirname(__file__), "..", "crates", "core", "tests", "fixtures", "onnx")

# Must match shrink_core::onnx::SUPPORTED_OPS.
SUPPORTED = {
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "Div", "Dropout", "Flatten", "Gather", "Gemm",
    "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity", "LRN",
    "LeakyRelu", "MatMul", "MaxPool", "Mul", "Pad", "ReduceMean", "Relu", "Reshape", "Shape",
    "Sigmoid", "Slice", "Softmax", "Squeeze", "Sub", "Sum", "Swish", "Transpose", "Unsqueeze",
}


def write_tensor(path, value, name):
    with open(path, "wb") as f:
        f.write(numpy_helper.from_array(value, name).SerializeToString())


def main():
    if onnx.__version__ != ONNX_VERSION:
        sys.exit(f"expected onnx {ONNX_VERSION}, found {onnx.__version__}")
    node_dir = os.path.join(ROOT, "node")
    shutil.rmtree(node_dir, ignore_errors=True)
    count = 0
    for case in node_cases.collect_testcases(None):
        ops = {n.op_type for n in case.model.graph.node}
        if not ops <= SUPPORTED or not case.data_sets:
            continue
        inputs, outputs = case.data_sets[0]
        if any(getattr(v, "dtype", None) is None for v in list(inputs) + list(outputs)):
            continue
        out = os.path.join(node_dir, case.name)
        data = os.path.join(out, "test_data_set_0")
        os.makedirs(data)
        with open(os.path.join(out, "model.onnx"), "wb") as f:
            f.write(case.model.SerializeToString())
        for j, value in enumerate(inputs):
            write_tensor(os.path.join(data, f"input_{j}.pb"), value, case.model.graph.input[j].name)
        for j, value in enumerate(outputs):
            write_tensor(os.path.join(data, f"output_{j}.pb"), value, case.model.graph.output[j].name)
        with open(os.path.join(out, "tolerance.txt"), "w") as f:
            f.write(f"rtol {case.rtol}\natol {case.atol}\n")
        count += 1
    light_src = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    light_dir = os.path.join(ROOT, "light")
    shutil.rmtree(light_dir, ignore_errors=True)
    shutil.copytree(light_src, light_dir)
    print(f"{count} node tests, {len(os.listdir(light_dir)) // 2} light models -> {ROOT}")


if __name__ == "__main__":
    main()
