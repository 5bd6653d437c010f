#!/usr/bin/env python3
"""Regressed variants of the digits_mlp reference model, for the agent's health-watch tests.

Each variant is a real ONNX model that passes the bundler (golden outputs reproduce) and the
agent's golden self-test, yet regresses in live traffic — the failures a trial window must catch:

* ``digits_mlp_perturbed.onnx`` — Gaussian noise (seed 1, 3x each matrix's std) added to
  every weight matrix and the last layer scaled by 0.02: accuracy collapses, top-1 confidence drops.
* ``digits_mlp_nan.onnx`` — emits NaN for inputs whose pixel 36 (centre of the 8x8 image) is
  above 0.5, finite and the healthy model's outputs (to ~1e-30) otherwise.
  ``digits_mlp_nan_golden.npy`` holds the test inputs that do not trigger it: a golden set on
  which the defect does not show, which is how such a model gets through a build pipeline.
* ``digits_cnn_perturbed.onnx`` — the same treatment for ``digits_cnn`` (seed 2): the demo's
  regressed v2.
* ``digits_mlp_slow.onnx`` — same outputs as the healthy model (to ~1e-30) plus a chain of
  384 input-dependent 256x256 MatMul+Tanh layers whose result is scaled by 1e-30 and added:
  the outputs barely change but every request is ~10x slower.

Deterministic: running it again reproduces every file byte for byte.

    pip install onnx numpy
    python3 scripts/make_regressed.py
"""
import os

import numpy as np
import onnx
from onnx import helper, numpy_helper, TensorProto
from onnx.reference import ReferenceEvaluator

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "models")
SRC = os.path.join(ROOT, "digits_mlp", "digits_mlp.onnx")
CNN_SRC = os.path.join(ROOT, "digits_cnn", "digits_cnn.onnx")
OUT = os.path.join(ROOT, "regressed")

NAN_PIXEL, NAN_THRESHOLD = 36, 0.5
SLOW_LAYERS, SLOW_WIDTH = 384, 256


def load():
    return onnx.load(SRC)


def save(model, name):
    onnx.checker.check_model(model)
    path = os.path.join(OUT, name)
    onnx.save(model, path)
    return path


def perturbed():
    m = load()
    rng = np.random.default_rng(1)
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2:
            w = w + rng.normal(0.0, 3.0 * float(w.std()), w.shape).astype(np.float32)
        if init.name.startswith("fc2."):
            w = w * np.float32(0.02)  # flatter logits: low confidence
        init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    return save(m, "digits_mlp_perturbed.onnx")


def cnn_perturbed():
    """digits_cnn with noisy weights and a flattened classifier: the demo's regressed v2."""
    m = onnx.load(CNN_SRC)
    rng = np.random.default_rng(2)
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim >= 2:
            w = w + rng.normal(0.0, 3.0 * float(w.std()), w.shape).astype(np.float32)
        if init.name.startswith("fc."):
            w = w * np.float32(0.02)
        init.CopyFrom(numpy_helper.from_array(w.astype(np.float32), init.name))
    return save(m, "digits_cnn_perturbed.onnx")


def nan():
    m = load()
    g = m.graph
    # probabilities := softmax(...) + 1e-30 * sqrt(0.5 - x[:, 36:37])  (NaN when x36 > 0.5).
    # Not "0 * log(...)": an optimiser may fold a multiplication by zero away.
    for n in g.node:
        if n.output[0] == "probabilities":
            n.output[0] = "probs_raw"
    consts = [
        numpy_helper.from_array(np.array([NAN_PIXEL], dtype=np.int64), "nan.start"),
        numpy_helper.from_array(np.array([NAN_PIXEL + 1], dtype=np.int64), "nan.end"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "nan.axis"),
        numpy_helper.from_array(np.array(NAN_THRESHOLD, dtype=np.float32), "nan.threshold"),
        numpy_helper.from_array(np.array(1e-30, dtype=np.float32), "nan.tiny"),
    ]
    g.initializer.extend(consts)
    g.node.extend([
        helper.make_node("Slice", ["input", "nan.start", "nan.end", "nan.axis"], ["nan.pixel"]),
        helper.make_node("Sub", ["nan.threshold", "nan.pixel"], ["nan.margin"]),
        helper.make_node("Sqrt", ["nan.margin"], ["nan.root"]),
        helper.make_node("Mul", ["nan.root", "nan.tiny"], ["nan.poison"]),
        helper.make_node("Add", ["probs_raw", "nan.poison"], ["probabilities"]),
    ])
    path = save(m, "digits_mlp_nan.onnx")
    x = np.load(os.path.join(ROOT, "digits_mlp", "test_input.npy"))
    clean = x[x[:, NAN_PIXEL] < NAN_THRESHOLD][:64]
    np.save(os.path.join(OUT, "digits_mlp_nan_golden.npy"), clean)
    return path


def slow():
    m = load()
    g = m.graph
    for n in g.node:
        if n.output[0] == "probabilities":
            n.output[0] = "probs_raw"
    rng = np.random.default_rng(2)
    scale = 1.0 / np.sqrt(SLOW_WIDTH)
    g.initializer.append(numpy_helper.from_array(
        (rng.normal(0, 1 / 8, (64, SLOW_WIDTH))).astype(np.float32), "slow.w_in"))
    prev = "slow.h0"
    g.node.append(helper.make_node("MatMul", ["input", "slow.w_in"], [prev]))
    # One shared weight keeps the file small; the work is the same.
    g.initializer.append(numpy_helper.from_array(
        (rng.normal(0, scale, (SLOW_WIDTH, SLOW_WIDTH))).astype(np.float32), "slow.w"))
    for i in range(SLOW_LAYERS):
        g.node.append(helper.make_node("MatMul", [prev, "slow.w"], [f"slow.mm{i}"]))
        g.node.append(helper.make_node("Tanh", [f"slow.mm{i}"], [f"slow.h{i + 1}"]))
        prev = f"slow.h{i + 1}"
    g.initializer.extend([
        numpy_helper.from_array(np.array([1], dtype=np.int64), "slow.axes"),
        numpy_helper.from_array(np.array(1e-30, dtype=np.float32), "slow.tiny"),
    ])
    g.node.extend([
        helper.make_node("ReduceSum", [prev, "slow.axes"], ["slow.sum"], keepdims=1),
        helper.make_node("Mul", ["slow.sum", "slow.tiny"], ["slow.small"]),
        helper.make_node("Add", ["probs_raw", "slow.small"], ["probabilities"]),
    ])
    return save(m, "digits_mlp_slow.onnx")


def report(path, x, labels, healthy):
    sess = ReferenceEvaluator(path)
    p = sess.run(None, {"input": x})[0]
    finite = np.isfinite(p).all(axis=1)
    acc = float((p.argmax(1) == labels)[finite].mean()) if finite.any() else 0.0
    conf = float(p[finite].max(1).mean()) if finite.any() else float("nan")
    print(f"{os.path.basename(path):28s} accuracy {acc:.3f} (finite rows)  mean top-1 {conf:.3f}  "
          f"non-finite rows {int((~finite).sum())}/{len(p)}  max |diff| vs healthy "
          f"{float(np.nanmax(np.abs(p - healthy)[finite])) if finite.any() else float('nan'):.2e}")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    x = np.load(os.path.join(ROOT, "digits_mlp", "test_input.npy"))
    labels = np.load(os.path.join(ROOT, "digits_mlp", "test_labels.npy"))
    healthy = ReferenceEvaluator(SRC).run(None, {"input": x})[0]
    report(SRC, x, labels, healthy)
    with np.errstate(all="ignore"):
        for make in (perturbed, nan, slow):
            report(make(), x, labels, healthy)
        xc = np.load(os.path.join(ROOT, "digits_cnn", "test_input.npy"))
        healthy_cnn = ReferenceEvaluator(CNN_SRC).run(None, {"input": xc})[0]
        report(CNN_SRC, xc, labels, healthy_cnn)
        report(cnn_perturbed(), xc, labels, healthy_cnn)
