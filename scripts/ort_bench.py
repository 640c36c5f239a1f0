#!/usr/bin/env python3
"""ONNX Runtime's side of `cargo xtask bench onnxruntime` (issue #20).

A server on stdin/stdout, so that the xtask can interleave ONNX Runtime's runs with shrink's in
one benchmark loop. Each session is CPU, full graph optimisation, one inter-op thread and one
intra-op thread unless THREADS says more (ONNX Runtime's default spinning thread pool).
Commands, one per line:
  load ID PATH [THREADS]  -> "ok" (the session is created and run once)
  run ID BATCH C H W      -> milliseconds of one `session.run` on a fixed random batch,
                             timed here with perf_counter (no pipe overhead in the number)
  quit
Exit 3 when onnxruntime or numpy cannot be imported.
"""

import sys
import time

try:
    import numpy as np
    import onnxruntime as ort
except ImportError as e:
    print(f"onnxruntime and numpy are needed: {e}", file=sys.stderr)
    sys.exit(3)


def main():
    sessions = {}
    inputs = {}
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "quit":
            break
        if parts[0] == "load":
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = int(parts[3]) if len(parts) > 3 else 1
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            sessions[parts[1]] = ort.InferenceSession(parts[2], so, providers=["CPUExecutionProvider"])
            print("ok", flush=True)
        elif parts[0] == "run":
            sid, shape = parts[1], tuple(int(v) for v in parts[2:6])
            sess = sessions[sid]
            name = sess.get_inputs()[0].name
            key = (sid, shape)
            if key not in inputs:
                inputs[key] = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
            x = {name: inputs[key]}
            start = time.perf_counter()
            sess.run(None, x)
            print(f"{(time.perf_counter() - start) * 1e3:.6f}", flush=True)
        else:
            print(f"unknown command {parts[0]}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":
    main()
