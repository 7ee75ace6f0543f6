"""Small real ONNX classifiers built with ``onnx.helper`` (no torch), and their numpy reference.

The graph reads each modality ``m`` as float32 ``[batch, tokens, token_dim]`` (input name ``m``), optionally
with a token mask ``m_mask`` ``[batch, tokens]`` (bool) and ``presence`` ``[batch, modalities]``, the layout
``device_sdk.local_model`` feeds. It pools tokens (sum, or a masked mean with masks), projects each modality
with its own weight matrix, adds a bias and gives softmax probabilities: ``reference`` computes the same in
numpy, so a test's expected output never comes from the code under test.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from broker.wire.model import ModelUpdate


def weights(inputs: dict[str, tuple[int, int]], classes: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {m: rng.normal(size=(d, classes)).astype(np.float32) for m, (_, d) in sorted(inputs.items())}
    out["bias"] = rng.normal(size=(classes,)).astype(np.float32)
    return out


def build(inputs: dict[str, tuple[int, int]], classes: int, *, seed: int = 0, masks: bool = False,
          declared: dict[str, tuple[int, int]] | None = None, out_classes: int | None = None) -> bytes:
    """The serialized model. ``declared`` overrides the graph's input shapes and ``out_classes`` its output width
    (to build models that lie about their layout)."""
    w = weights(inputs, classes, seed)
    nodes, inits, graph_inputs = [], [numpy_helper.from_array(np.array([1], np.int64), "axis1")], []
    projected = []
    for m, (t, d) in sorted(inputs.items()):
        dt, dd = (declared or {}).get(m, (t, d))
        graph_inputs.append(helper.make_tensor_value_info(m, TensorProto.FLOAT, ["batch", dt, dd]))
        inits.append(numpy_helper.from_array(w[m], f"W_{m}"))
        if masks:
            graph_inputs.append(helper.make_tensor_value_info(f"{m}_mask", TensorProto.BOOL, ["batch", dt]))
            nodes += [helper.make_node("Cast", [f"{m}_mask"], [f"{m}_mf"], to=TensorProto.FLOAT),
                      helper.make_node("Unsqueeze", [f"{m}_mf", "axis2"], [f"{m}_m3"]),
                      helper.make_node("Mul", [m, f"{m}_m3"], [f"{m}_x"]),
                      helper.make_node("ReduceSum", [f"{m}_x", "axis1"], [f"{m}_s"], keepdims=0),
                      helper.make_node("ReduceSum", [f"{m}_mf", "axis1"], [f"{m}_n"], keepdims=1),
                      helper.make_node("Max", [f"{m}_n", "one"], [f"{m}_nc"]),
                      helper.make_node("Div", [f"{m}_s", f"{m}_nc"], [f"{m}_p"])]
        else:
            nodes.append(helper.make_node("ReduceSum", [m, "axis1"], [f"{m}_p"], keepdims=0))
        nodes.append(helper.make_node("MatMul", [f"{m}_p", f"W_{m}"], [f"{m}_z"]))
        projected.append(f"{m}_z")
    if masks:
        inits += [numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                  numpy_helper.from_array(np.array([1.0], np.float32), "one")]
        graph_inputs.append(helper.make_tensor_value_info("presence", TensorProto.BOOL, ["batch", len(inputs)]))
    inits.append(numpy_helper.from_array(w["bias"], "bias"))
    nodes.append(helper.make_node("Sum", [*projected, "bias"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    output = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", out_classes or classes])
    graph = helper.make_graph(nodes, "megace_test", graph_inputs, [output], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="megace-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def reference(sample: dict[str, np.ndarray], inputs: dict[str, tuple[int, int]], classes: int, *, seed: int = 0,
              masks: bool = False) -> np.ndarray:
    """What the graph gives for one sample (``modality -> [tokens, token_dim]``), computed with numpy alone."""
    w = weights(inputs, classes, seed)
    z = w["bias"].astype(np.float64).copy()
    for m, (t, _) in sorted(inputs.items()):
        if m not in sample:
            continue
        x = np.atleast_2d(np.asarray(sample[m], np.float64))[-t:]
        pooled = x.sum(0) / (len(x) if masks else 1)
        z += pooled @ w[m].astype(np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def update(data: bytes, inputs: dict[str, tuple[int, int]], classes: int, version: int,
           **changes: Any) -> ModelUpdate:
    """A ``model`` body for ``data``; ``changes`` override fields (to forge a bad one)."""
    fields: dict[str, Any] = {
        "model_version": version, "sha256": hashlib.sha256(data).digest(), "inputs": dict(inputs),
        "classes": classes, "data": data,
    }
    if "input_names" not in changes:  # the graph's own names (a forged body names others)
        fields["input_names"] = [i.name for i in onnx.load_from_string(data).graph.input]
    fields.update(changes)
    return ModelUpdate(**fields)
