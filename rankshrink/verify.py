"""The ONNX boundary, checking side: run exported files with onnxruntime and compare.

Sessions run on the CPU with one thread and sequential execution, so results do not depend on
thread scheduling, and the check runs twice in two sessions: outputs must be bit-identical. Before
anything runs, :func:`scan_graph` reads the graph for what would make a check meaningless: scatters
with a ``reduction`` (their sums depend on the order of duplicate indices, which onnxruntime's CPU
kernels do not fix) and constant indices outside the tensor they index. :func:`verify_export`
collects every failed check before deciding, in the manner of optimum's ``validate_model_outputs``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from rankshrink.errors import GateError, InputError

# op type -> (index of the ``indices`` input, how its values address the ``data`` input 0)
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


@dataclass(frozen=True)
class Tolerances:
    """What counts as a passed verification."""

    export_atol: float = 1e-4  # compressed torch vs its ONNX, max abs diff
    max_accuracy_drop: float | None = None  # points; a gate (exit 3) when set
    min_agreement: float | None = None  # fraction; a gate (exit 3) when set


@dataclass
class Verification:
    """Everything measured when checking an exported model."""

    passed: bool
    export_max_abs_diff: float | None
    export_batches: list[int]
    max_abs_diff: float
    agreement: float | None
    accuracy_before: float | None
    accuracy_after: float | None
    samples: int
    failures: list[str] = field(default_factory=list)


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A deterministic CPU onnxruntime session."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # fatal only: a run-time error is raised, and shown once, by us
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(
            f"{path} is not a loadable ONNX model ({str(exc).splitlines()[0][:160]})"
        ) from None


def run(sess: ort.InferenceSession, x: Tensor) -> np.ndarray:
    """Run the session's first output on ``x``.

    Raises:
        InputError: onnxruntime rejects the input or fails while running the graph.
    """
    name = sess.get_inputs()[0].name
    try:
        return sess.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        raise InputError(
            f"onnxruntime cannot run the model on inputs of shape {tuple(x.shape)}"
            f" ({str(exc).splitlines()[0][:200]})"
        ) from None


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


def latency_ms(sess: ort.InferenceSession, x: Tensor, repeats: int = 50) -> float:
    """Median wall time of one run on ``x`` in milliseconds (after a warm-up)."""
    feed = {sess.get_inputs()[0].name: x.detach().cpu().numpy().astype(np.float32)}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def accuracy(logits: np.ndarray, y: Tensor | None) -> float | None:
    """Top-1 accuracy in percent, or None without labels."""
    if y is None:
        return None
    return float((logits.argmax(-1) == y.numpy()).mean() * 100.0)


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.shape == b.shape and a.size else float("inf")


@torch.no_grad()
def comparison_failures(
    tol: Tolerances,
    agreement: float | None,
    acc_before: float | None,
    acc_after: float | None,
) -> list[str]:
    """The ``--min-agreement`` and ``--max-accuracy-drop`` gates, one message per failure."""
    failures = []
    if tol.min_agreement is not None and agreement is not None and agreement < tol.min_agreement:
        failures.append(f"top-1 agreement {agreement:.4f} < --min-agreement {tol.min_agreement:g}")
    if tol.max_accuracy_drop is not None and acc_before is not None and acc_after is not None:
        drop = acc_before - acc_after
        if drop > tol.max_accuracy_drop:
            failures.append(
                f"accuracy drop {drop:.2f} points > --max-accuracy-drop {tol.max_accuracy_drop:g}"
            )
    return failures


@torch.no_grad()  # verification never needs gradients, and .numpy() refuses tensors that track them
def verify_export(
    original: nn.Module,
    compressed: nn.Module | None,
    onnx_path: Path,
    x_test: Tensor,
    y_test: Tensor | None,
    tol: Tolerances,
    classifier: bool,
) -> Verification:
    """Check a compressed ONNX file against its torch module and against the original model.

    0. the graph holds no order-dependent scatter and no out-of-range constant index;
    1. compressed torch vs its ONNX at two batch sizes (a few rows, then the whole held-out split,
       neither equal to the export example's batch) — the export is faithful;
    2. the ONNX run on the held-out split twice, in two sessions, gives bit-identical outputs;
    3. compressed ONNX vs the original torch model on the held-out split — the compression kept
       the behaviour: max abs diff, top-1 agreement and accuracy before/after.

    Raises:
        UntrustedGraphError: step 0 failed (exit 3).
        InputError: the file cannot be loaded or run, or its outputs do not match the model's.
    """
    scan = scan_graph(onnx_path)
    if scan.problems:
        raise UntrustedGraphError(
            f"cannot vouch for {onnx_path}: "
            + "; ".join(scan.problems[:3])
            + (f" (and {len(scan.problems) - 3} more)" if len(scan.problems) > 3 else "")
        )
    sess = session(onnx_path)
    failures: list[str] = []
    export_diff: float | None = None
    batches = sorted({min(3, len(x_test)), len(x_test)})
    if compressed is not None:
        compressed.eval()
        diffs = [0.0]
        for b in batches:
            ours = compressed(x_test[:b]).numpy()
            theirs = run(sess, x_test[:b])
            if ours.shape != theirs.shape:
                failures.append(
                    f"export output shape {theirs.shape} != torch {ours.shape} at batch {b}"
                )
                continue
            diffs.append(float(np.abs(ours - theirs).max()))
        export_diff = float(np.max(diffs))  # unlike max(), keeps a NaN
        if not export_diff <= tol.export_atol:  # written so that a NaN difference fails too
            failures.append(
                f"export max abs diff {export_diff:.3g} > tolerance {tol.export_atol:g}"
                " (compressed torch vs its ONNX)"
            )
    after = run(sess, x_test)
    if not np.isfinite(after).all():  # NaN compares false with every tolerance: catch it here
        failures.append(
            f"the ONNX model's outputs hold NaN or Inf on {int((~np.isfinite(after)).any(-1).sum())}"
            f" of {len(x_test)} held-out samples"
        )
    again = run(session(onnx_path), x_test)  # a second session: nothing carried over
    if after.shape != again.shape or after.tobytes() != again.tobytes():
        failures.append(
            "onnxruntime gave different outputs on two identical runs"
            f" (max diff {_max_diff(after, again):.3g}); the file's results are not reproducible"
        )
    before = original.eval()(x_test).numpy()
    if before.shape != after.shape:
        raise InputError(
            f"ONNX output shape {after.shape} does not match the model's {before.shape}"
        )
    max_diff = float(np.abs(before - after).max())
    agreement = float((before.argmax(-1) == after.argmax(-1)).mean()) if classifier else None
    acc_before, acc_after = accuracy(before, y_test), accuracy(after, y_test)
    failures += comparison_failures(tol, agreement, acc_before, acc_after)
    return Verification(
        passed=not failures,
        export_max_abs_diff=export_diff,
        export_batches=batches,
        max_abs_diff=max_diff,
        agreement=agreement,
        accuracy_before=acc_before,
        accuracy_after=acc_after,
        samples=len(x_test),
        failures=failures,
    )
