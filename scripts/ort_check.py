#!/usr/bin/env python3
"""ONNX Runtime's check of a shrink export (issue #20).

Runs the exported f32 and QDQ int8 models in ONNX Runtime (CPU, full graph optimisation, one
thread) on the images shrink evaluated, and compares with shrink's own logits:
  - f32: the largest difference relative to the largest |logit|;
  - int8: top-1 of both on the labels, the share of logits within 2 output quantization steps
    (the calibrated step of the classifier's output), the largest difference in steps;
  - which operators ONNX Runtime's optimised graph runs (`optimized_model_filepath`), and for
    each layer shrink quantized whether ONNX Runtime runs it as an integer operator
    (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, ConvInteger, MatMulInteger).

Input: a directory written by shrink (see `check.json` in it for the file names and
parameters). Output: JSON on stdout. Exit 3 when onnxruntime cannot be imported (the caller
reports it as not installed), 2 for a bad directory.
"""

import json
import os
import re
import sys
import tempfile

try:
    import numpy as np
    import onnxruntime as ort
    import onnx
except ImportError as e:  # reported by the caller
    print(f"onnxruntime, onnx and numpy are needed: {e}", file=sys.stderr)
    sys.exit(3)

INTEGER_OPS = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "ConvInteger", "MatMulInteger",
               "DynamicQuantizeMatMul"}


def session(path, optimized=None):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def run(sess, images, batch=100):
    name = sess.get_inputs()[0].name
    out = [sess.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(out, axis=0)


def integer_layers(optimized_path, layers):
    """For each quantized layer, the integer op ONNX Runtime fused it into (or None)."""
    m = onnx.load(optimized_path)
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    found = {}
    for layer in layers:
        # ONNX Runtime names a fused node after the node it replaced, with suffixes such as
        # `_token_12` or `_quant`; the name without them must be the layer's (a prefix alone
        # would let `conv10` answer for `conv1`).
        hits = [n.op_type for n in m.graph.node
                if n.op_type in INTEGER_OPS and re.sub(r"(_token_\d+|_quant)+$", "", n.name) == layer]
        found[layer] = hits[0] if hits else None
    return ops, found


def main():
    if len(sys.argv) != 2:
        print("usage: ort_check.py DIR (holding check.json)", file=sys.stderr)
        sys.exit(2)
    d = sys.argv[1]
    try:
        with open(os.path.join(d, "check.json")) as f:
            spec = json.load(f)
        shape = [-1] + spec["input_shape"]
        images = np.fromfile(os.path.join(d, spec["images"]), dtype=np.float32).reshape(shape)
        labels = np.fromfile(os.path.join(d, spec["labels"]), dtype=np.uint32)
    except (OSError, KeyError, ValueError) as e:
        print(f"{d}: {e}", file=sys.stderr)
        sys.exit(2)
    result = {"onnxruntime": ort.__version__, "images": int(len(images))}
    if spec.get("f32"):
        f = spec["f32"]
        ours = np.fromfile(os.path.join(d, f["shrink_logits"]), dtype=np.float32).reshape(len(images), -1)
        theirs = run(session(f["model"]), images)
        scale = max(float(np.abs(ours).max()), 1e-12)
        result["f32"] = {
            "max_relative_difference": float(np.abs(theirs - ours).max() / scale),
            "top1_onnxruntime": float((theirs.argmax(1) == labels).mean()),
            "top1_shrink": float((ours.argmax(1) == labels).mean()),
        }
    if spec.get("int8"):
        q = spec["int8"]
        ours = np.fromfile(os.path.join(d, q["shrink_logits"]), dtype=np.float32).reshape(len(images), -1)
        with tempfile.TemporaryDirectory() as tmp:
            optimized = os.path.join(tmp, "optimized.onnx")
            theirs = run(session(q["model"], optimized), images)
            ops, found = integer_layers(optimized, q["layers"])
        step = q["output_step"]
        steps = np.abs(theirs - ours) / step
        result["int8"] = {
            "top1_onnxruntime": float((theirs.argmax(1) == labels).mean()),
            "top1_shrink": float((ours.argmax(1) == labels).mean()),
            "output_step": step,
            "within_2_steps": float((steps <= 2.0).mean()),
            "max_steps": float(steps.max()),
            "optimized_ops": ops,
            "layers": found,
        }
    json.dump(result, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
