#!/usr/bin/env python3
"""Small ONNX models for what the ONNX node tests leave out (their inputs are often rank 3 or
integer) but shrink claims to import, with ONNX Runtime's outputs as the expected ones.

Writes crates/core/tests/fixtures/onnx/extra/<case>/model.onnx + test_data_set_0/{input,output}_0.pb,
the layout of the ONNX node tests, which crates/core/tests/onnx_conformance.rs runs the same way
(its own table section). Weights are initializers; the one input is an [n, c, h, w] image (or
[n, f]). Run: python3 scripts/onnx_extra_cases.py (onnx 1.23.2, onnxruntime 1.23+).
"""
import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.join(os.path.dirname(__file__), "..", "crates", "core", "tests", "fixtures", "onnx", "extra")
RNG = np.random.default_rng(0)


def init(name, shape, scale=0.5):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.array(values, dtype=dtype), name)


def case(name, nodes, x_shape, inits=(), opset=17):
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx_extra_cases.py")
    model.ir_version = 8
    x = RNG.standard_normal(x_shape).astype(np.float32)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    # The output's shape as ONNX Runtime computed it, then the model checked.
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y.shape)))
    onnx.checker.check_model(model, full_check=True)
    out = os.path.join(ROOT, name)
    data = os.path.join(out, "test_data_set_0")
    os.makedirs(data)
    onnx.save(model, os.path.join(out, "model.onnx"))
    with open(os.path.join(data, "input_0.pb"), "wb") as f:
        f.write(numpy_helper.from_array(x, "x").SerializeToString())
    with open(os.path.join(data, "output_0.pb"), "wb") as f:
        f.write(numpy_helper.from_array(y.astype(np.float32), "y").SerializeToString())


def main():
    shutil.rmtree(ROOT, ignore_errors=True)
    n = helper.make_node
    img = (2, 4, 7, 9)
    case("reduce_mean_hw_keepdims", [n("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=1)], img, opset=13)
    case("reduce_mean_hw_flat", [n("ReduceMean", ["x", "axes"], ["y"], keepdims=0)], img, [const("axes", [-1, -2])], opset=18)
    case("pad_reflect", [n("Pad", ["x", "pads"], ["y"], mode="reflect")], img, [const("pads", [0, 0, 2, 1, 0, 0, 1, 3])])
    case("pad_edge", [n("Pad", ["x", "pads"], ["y"], mode="edge")], img, [const("pads", [0, 0, 0, 2, 0, 0, 3, 1])])
    case("pad_constant_value", [n("Pad", ["x", "pads", "v"], ["y"])], img,
         [const("pads", [0, 0, 1, 1, 0, 0, 1, 1]), const("v", 0.5, np.float32)])
    case("conv_depthwise_dilated", [n("Conv", ["x", "w", "b"], ["y"], group=4, dilations=[2, 2], pads=[2, 2, 2, 2])], img,
         [init("w", (4, 1, 3, 3)), init("b", (4,))])
    case("conv_same_lower_stride2", [n("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER", strides=[2, 2])], img,
         [init("w", (6, 4, 3, 3))])
    case("conv_grouped", [n("Conv", ["x", "w"], ["y"], group=2, pads=[1, 0, 1, 0])], img, [init("w", (6, 2, 3, 1))])
    case("avgpool_ceil_pads_count_include_pad",
         [n("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1, count_include_pad=1)], img, opset=19)
    case("maxpool_asymmetric_pads", [n("MaxPool", ["x"], ["y"], kernel_shape=[2, 3], strides=[2, 1], pads=[0, 1, 1, 2])], img)
    case("lrn_size5_attributes", [n("LRN", ["x"], ["y"], size=5, alpha=0.01, beta=0.6, bias=2.0)], img)
    case("mul_div_sub_per_channel",
         [n("Mul", ["x", "s"], ["a"]), n("Div", ["a", "d"], ["b"]), n("Sub", ["c", "b"], ["y"])], img,
         [init("s", (1, 4, 1, 1)), numpy_helper.from_array(np.array([[[2.0]], [[0.5]], [[4.0]], [[-1.0]]], np.float32), "d"),
          init("c", (4, 1, 1))])
    case("squeeze_excitation",
         [n("GlobalAveragePool", ["x"], ["p"]), n("Squeeze", ["p", "ax"], ["q"]), n("Gemm", ["q", "w1", "b1"], ["r"], transB=1),
          n("Relu", ["r"], ["s"]), n("Gemm", ["s", "w2"], ["t"]), n("Sigmoid", ["t"], ["u"]),
          n("Unsqueeze", ["u", "ax"], ["v"]), n("Mul", ["x", "v"], ["y"])], img,
         [const("ax", [2, 3]), init("w1", (2, 4)), init("b1", (2,)), init("w2", (2, 4))])
    case("swish_and_hardswish", [n("Sigmoid", ["x"], ["s"]), n("Mul", ["x", "s"], ["m"]), n("HardSwish", ["m"], ["y"])], img)
    case("transpose_layout_only",
         [n("GlobalMaxPool", ["x"], ["p"]), n("Transpose", ["p"], ["t"], perm=[0, 2, 3, 1]), n("Flatten", ["t"], ["y"])], img)
    case("gemm_alpha_beta_no_transpose", [n("Flatten", ["x"], ["f"]), n("Gemm", ["f", "w", "c"], ["y"], alpha=0.5, beta=2.0)],
         img, [init("w", (252, 5), 0.1), init("c", (5,))])
    case("matmul_add_vector", [n("MatMul", ["x", "w"], ["m"]), n("Add", ["m", "b"], ["y"])], (3, 10),
         [init("w", (10, 6)), init("b", (6,))])
    case("softmax_opset11_map", [n("Softmax", ["x"], ["y"], axis=1)], (2, 3, 2, 2), opset=11)
    case("shape_reshape_dynamic_batch",
         [n("Shape", ["x"], ["s"]), n("Gather", ["s", "zero"], ["n"], axis=0), n("Unsqueeze", ["n", "ax0"], ["nn"]),
          n("Concat", ["nn", "minus1"], ["shape"], axis=0), n("Reshape", ["x", "shape"], ["y"])], img,
         [const("zero", 0), const("ax0", [0]), const("minus1", [-1])])
    case("clip_relu6_leaky", [n("Clip", ["x", "lo", "hi"], ["c"]), n("LeakyRelu", ["c"], ["y"], alpha=0.2)], img,
         [const("lo", -1.0, np.float32), const("hi", 6.0, np.float32)])
    print(f"{len(os.listdir(ROOT))} cases -> {ROOT}")


if __name__ == "__main__":
    main()
