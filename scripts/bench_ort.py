#!/usr/bin/env python3
"""onnxruntime reference latency at batch 1 on the modelfleet example models.

Same protocol as `cargo run --release -p modelfleet-engine --example engine_bench`:
1 intra-op thread, 1 inter-op thread, first test sample, warm-up for a fifth of the
measuring time, then time single requests for about --seconds; report median and p95 in µs
and the session creation time in ms (median of 3).

    pip install onnxruntime numpy
    python3 scripts/bench_ort.py [--seconds 3] [--models digits_mlp,digits_cnn,mobilenetish]
"""
import argparse
import os
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "models")


def timed(seconds, f):
    end = time.perf_counter() + seconds / 5
    while time.perf_counter() < end:
        f()
    samples = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(samples) < 20:
        t = time.perf_counter()
        f()
        samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    pick = lambda q: samples[round((len(samples) - 1) * q)]
    return pick(0.5), pick(0.95), len(samples)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--models", default="digits_mlp,digits_cnn,mobilenetish")
    a = p.parse_args()
    print(f"# bench_ort onnxruntime {ort.__version__} intra_op_threads=1 batch=1 (times in µs; load in ms)")
    for name in a.models.split(","):
        path = os.path.join(ROOT, name, f"{name}.onnx")
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        loads = []
        for _ in range(3):
            t = time.perf_counter()
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            loads.append((time.perf_counter() - t) * 1e3)
        loads.sort()
        x = np.load(os.path.join(ROOT, name, "test_input.npy"))[:1].copy()
        feed = {sess.get_inputs()[0].name: x}
        median, p95, n = timed(a.seconds, lambda: sess.run(None, feed))
        print(f"ort    {name:<14} median_us {median:>10.1f} p95_us {p95:>10.1f} n {n:>7} load_ms {loads[1]:>8.1f}")


if __name__ == "__main__":
    main()
