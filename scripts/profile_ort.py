#!/usr/bin/env python3
"""onnxruntime's per-node times on one example model, for a per-layer comparison with the engine's
`PROFILE_ALL=1 engine_profile MODEL RUNS` (BENCHMARKS.md, issue 3, session 16).

Same settings as bench_ort.py (1 intra-op and 1 inter-op thread, sequential, batch 1, the first
test sample); 20 warm-up runs, then RUNS profiled ones; prints each node's median `kernel_time`
in µs, in graph order (onnxruntime's graph after its own optimisations: fused NCHWc convolutions).

    python3 scripts/profile_ort.py [--model mobilenetish] [--runs 100]
"""
import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "models")
WARMUP = 20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="mobilenetish")
    p.add_argument("--runs", type=int, default=100)
    a = p.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    path = os.path.join(ROOT, a.model, f"{a.model}.onnx")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = np.load(os.path.join(ROOT, a.model, "test_input.npy"))[:1].copy()
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(WARMUP + a.runs):
        sess.run(None, feed)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    times = collections.defaultdict(list)
    ops = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name].append(e["dur"])
            ops[name] = e["args"].get("op_name")
    rows = []
    for name, v in times.items():
        v = sorted(v[WARMUP:])
        rows.append((v[len(v) // 2], name, ops[name]))
    print(f"# onnxruntime {ort.__version__} {a.model}: per-node median kernel_time over {a.runs} runs")
    print(f"total of medians {sum(r[0] for r in rows):.0f} µs")
    for t, name, op in rows:
        print(f"{t:8.0f} µs  {op:<20} {name}")


if __name__ == "__main__":
    main()
