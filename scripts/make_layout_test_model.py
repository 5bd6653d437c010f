#!/usr/bin/env python3
"""Writes engine/testdata/depthwise_maxpool.onnx: a small graph where the engine's layout pass
(engine/src/layout.rs) must leave transposes — depthwise convolutions on both sides of a max
pool, which runs channels-first — for `layout::tests::transposes_left_where_layouts_meet`.

    python3 scripts/make_layout_test_model.py
"""
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(17)


def const(name, shape):
    return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.5, name)


inits = [
    const("dw1_w", (8, 1, 3, 3)), const("dw1_b", (8,)),
    const("pw_w", (16, 8, 1, 1)), const("pw_b", (16,)),
    const("dw2_w", (16, 1, 3, 3)), const("dw2_b", (16,)),
    numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
    numpy_helper.from_array(np.array(6.0, np.float32), "six"),
]
nodes = [
    helper.make_node("Conv", ["x", "dw1_w", "dw1_b"], ["dw1"], group=8, pads=[1, 1, 1, 1]),
    helper.make_node("Clip", ["dw1", "zero", "six"], ["relu1"]),
    helper.make_node("MaxPool", ["relu1"], ["pool"], kernel_shape=[2, 2], strides=[2, 2]),
    helper.make_node("Conv", ["pool", "pw_w", "pw_b"], ["pw"]),
    helper.make_node("Conv", ["pw", "dw2_w", "dw2_b"], ["dw2"], group=16, pads=[1, 1, 1, 1],
                     strides=[2, 2]),
    helper.make_node("Add", ["dw2", "dw2"], ["y"]),
]
graph = helper.make_graph(
    nodes, "depthwise_maxpool",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 12, 12])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 3, 3])],
    inits,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.checker.check_model(model)
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine", "testdata",
                   "depthwise_maxpool.onnx")
onnx.save(model, out)
print(out, os.path.getsize(out), "bytes")
