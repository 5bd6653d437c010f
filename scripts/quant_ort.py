#!/usr/bin/env python3
"""onnxruntime's own quantization of the reference models: the comparison column of the
quantization table in BENCHMARKS.md (issue 8).

For each model it writes, into --out-dir (not committed: mobilenetish's are several MB):
  NAME.float.onnx      a copy of the float model
  NAME.dynamic.onnx    quantize_dynamic (int8 weights, activations quantized at run time)
  NAME.qdq.onnx        quantize_static, QDQ form, per-channel int8 weights, uint8 activations, MinMax
  NAME.qop.onnx        quantize_static, QOperator form (QLinearConv / QLinearMatMul), same settings
and prints one line per (model, variant): file size, quality, and onnxruntime latency at batch 1
(1 intra-op and 1 inter-op thread, sequential; median and p95 of single requests, as
scripts/bench_ort.py measures).

Quality: accuracy on the test labels (digits_mlp, digits_cnn); ROC AUC of the reconstruction
error against the anomaly labels (vibration_ae); for mobilenetish (random weights) the SNR of the
output logits against the float model's and the top-1 agreement with it.

Calibration: calib_input.npy where the model has one, else the test inputs (mobilenetish: 4
samples). Softmax nodes are excluded from quantization (kept in float) in every variant.

    pip install onnxruntime onnx numpy
    python3 scripts/quant_ort.py --out-dir /tmp/ortq [--seconds 2] [--models digits_mlp,...]
"""
import argparse
import os
import shutil
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "models")
MODELS = "digits_mlp,digits_cnn,vibration_ae,mobilenetish"


class Reader(CalibrationDataReader):
    def __init__(self, name, x):
        self.rows = iter([{name: x[i : i + 1]} for i in range(len(x))])

    def get_next(self):
        return next(self.rows, None)


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


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
    return pick(0.5), pick(0.95)


def run_all(sess, x):
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 32]})[0] for i in range(0, len(x), 32)])


def roc_auc(score, labels):
    """Probability that an anomalous sample scores above a normal one (ties count half)."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def snr_db(ref, got):
    noise = np.sum((ref - got) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(ref**2) / noise)


def quality(name, x, out, float_out):
    d = os.path.join(ROOT, name)
    if name == "vibration_ae":
        labels = np.load(os.path.join(d, "test_labels.npy")).reshape(-1)
        err = ((x.reshape(len(x), -1) - out.reshape(len(x), -1)) ** 2).mean(axis=1)
        return f"auc {roc_auc(err, labels):.4f}"
    if os.path.exists(os.path.join(d, "test_labels.npy")):
        labels = np.load(os.path.join(d, "test_labels.npy")).reshape(-1)
        return f"accuracy {(out.argmax(axis=1) == labels).mean():.4f}"
    agree = (out.argmax(axis=1) == float_out.argmax(axis=1)).mean()
    return f"snr_db {snr_db(float_out, out):.1f} top1_agreement {agree:.2f}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--models", default=MODELS)
    a = p.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    print(f"# quant_ort onnxruntime {ort.__version__} intra_op_threads=1 batch=1 (latency in µs)")
    for name in a.models.split(","):
        d = os.path.join(ROOT, name)
        src = os.path.join(d, f"{name}.onnx")
        x = np.load(os.path.join(d, "test_input.npy"))
        calib_path = os.path.join(d, "calib_input.npy")
        calib = np.load(calib_path) if os.path.exists(calib_path) else x
        model = onnx.load(src)
        input_name = model.graph.input[0].name
        softmax = [n.name for n in model.graph.node if n.op_type == "Softmax"]
        paths = {v: os.path.join(a.out_dir, f"{name}.{v}.onnx") for v in ("float", "dynamic", "qdq", "qop")}
        shutil.copyfile(src, paths["float"])
        quantize_dynamic(src, paths["dynamic"], weight_type=QuantType.QInt8, nodes_to_exclude=softmax)
        for form, path in ((QuantFormat.QDQ, paths["qdq"]), (QuantFormat.QOperator, paths["qop"])):
            quantize_static(
                src,
                path,
                Reader(input_name, calib),
                quant_format=form,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=softmax,
            )
        float_out = None
        for variant, path in paths.items():
            sess = session(path)
            out = run_all(sess, x)
            if float_out is None:
                float_out = out
            feed = {sess.get_inputs()[0].name: x[:1].copy()}
            median, p95 = timed(a.seconds, lambda: sess.run(None, feed))
            print(
                f"ort {name:<13} {variant:<8} size {os.path.getsize(path):>9} "
                f"{quality(name, x, out, float_out):<34} median_us {median:>9.1f} p95_us {p95:>9.1f}"
            )


if __name__ == "__main__":
    main()
