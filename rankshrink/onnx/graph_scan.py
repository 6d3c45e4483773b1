"""Read an ONNX graph for what would make checking it meaningless, before anything runs.

Scatters with a ``reduction`` (their sums depend on the order of duplicate indices, which
onnxruntime's CPU kernels do not fix) and constant indices outside the tensor they index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from rankshrink.errors import GateError, InputError

_INDEXED_OPS = {
    "Gather": (1, "axis"),
    "GatherElements": (1, "axis"),
    "ScatterElements": (1, "axis"),
    "GatherND": (1, "nd"),
    "ScatterND": (1, "nd"),
}
_SCATTERS = ("ScatterND", "ScatterElements")
_INT_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)



class UntrustedGraphError(GateError):
    """The exported graph holds an op whose results a check cannot vouch for (exit 3)."""


@dataclass
class GraphScan:
    """What :func:`scan_graph` found."""

    problems: list[str]
    index_tensors_checked: int  # constant index tensors whose range was checked


def scan_graph(path: Path) -> GraphScan:
    """Find ops whose results cannot be trusted, without running anything.

    - ``ScatterND`` / ``ScatterElements`` with a ``reduction``: with duplicate indices the result
      depends on the order the updates are applied in, which the ONNX spec leaves open;
    - constant indices of Gather / GatherElements / GatherND / ScatterElements / ScatterND that
      fall outside the (statically known) extent of the tensor they index.

    Raises:
        InputError: the file is not a readable ONNX model.
    """
    try:  # external data is left alone: a file's "location" is not ours to follow here
        model = onnx.load(str(path), load_external_data=False)
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as exc:
        raise InputError(
            f"{path} is not a readable ONNX model ({str(exc).splitlines()[0][:160]})"
        ) from None
    graph = model.graph
    shapes: dict[str, list[int | None]] = {t.name: list(t.dims) for t in graph.initializer}
    consts: dict[str, np.ndarray] = {  # only integer tensors can be indices
        t.name: numpy_helper.to_array(t)
        for t in graph.initializer
        if t.data_type in _INT_TYPES and t.data_location != onnx.TensorProto.EXTERNAL
    }
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _INT_TYPES:
                    consts[node.output[0]] = numpy_helper.to_array(attr.t)
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor_type = value.type.tensor_type
        if tensor_type.HasField("shape"):
            shapes.setdefault(
                value.name,
                [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim],
            )

    problems: list[str] = []
    for node in [*graph.node, *(n for f in model.functions for n in f.node)]:
        reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
        if node.op_type in _SCATTERS and reduction != "none":
            problems.append(
                f"{node.op_type} node {node.name or node.output[0]!r} has"
                f" reduction={reduction!r}, whose result depends on the order of duplicate indices"
            )
    checked = 0
    for node in graph.node:  # names below are the main graph's; functions have their own
        if node.op_type not in _INDEXED_OPS or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        label = f"{node.op_type} node {node.name or node.output[0]!r}"
        slot, mode = _INDEXED_OPS[node.op_type]
        if len(node.input) <= slot or node.input[slot] not in consts:
            continue  # indices computed at run time: onnxruntime checks those itself
        indices = consts[node.input[slot]].astype(np.int64)
        shape = shapes.get(node.input[0])
        if shape is None or indices.size == 0:
            continue
        checked += 1
        problems += _index_problems(label, indices, shape, mode, attrs)
    return GraphScan(problems, checked)


def _index_problems(
    label: str, indices: np.ndarray, shape: list[int | None], mode: str, attrs: dict
) -> list[str]:
    """Index values outside ``[-extent, extent)`` of the dimension they address."""
    rank = len(shape)
    if mode == "axis":
        axis = int(attrs.get("axis", 0))
        axis = axis + rank if axis < 0 else axis
        columns = [(indices, axis)] if 0 <= axis < rank else []
    else:  # the last axis of the indices lists coordinates into the leading data dimensions
        batch = int(attrs.get("batch_dims", 0))
        if indices.ndim == 0 or indices.shape[-1] > rank - batch:
            return [f"{label} indexes {indices.shape[-1]} dimensions of a rank-{rank} tensor"]
        columns = [(indices[..., j], batch + j) for j in range(indices.shape[-1])]
    problems = []
    for values, dim in columns:
        extent = shape[dim]
        if extent is None:
            continue  # a dynamic dimension: only known at run time
        bad = values[(values < -extent) | (values >= extent)]
        if bad.size:
            problems.append(
                f"{label} has constant index {int(bad.flat[0])} outside [-{extent}, {extent})"
                f" on axis {dim} ({bad.size} such)"
            )
    return problems
