"""The ONNX boundary, checking side: run exported files with onnxruntime and compare.

Sessions run on the CPU with one thread and sequential execution, so results do not depend on
thread scheduling, and the check runs twice in two sessions: outputs must be bit-identical. Before
anything runs, :func:`scan_graph` reads the graph for what would make a check meaningless: scatters
with a ``reduction`` (their sums depend on the order of duplicate indices, which onnxruntime's CPU
kernels do not fix) and constant indices outside the tensor they index. :func:`verify_export`
collects every failed check before deciding, in the manner of optimum's ``validate_model_outputs``.

Before any of that, :func:`check_belongs` compares the file's inputs and outputs with the model's
(count, names where they matter, feature and output widths): a file exported from another model
is refused in one line. The comparison with the original is then decided by the quality gates of
:mod:`rankshrink.onnx.gates`, and ``passed`` means every check and every gate passed.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from rankshrink.errors import GateError, InputError
from rankshrink.onnx import gates as quality
from rankshrink.onnx.gates import Gate, Task, Tolerances  # Tolerances: imported from here too

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


class ForeignFileError(GateError):
    """The ONNX file's inputs or outputs do not fit the model: it was exported from another
    model (exit 3)."""


@dataclass
class GraphScan:
    """What :func:`scan_graph` found."""

    problems: list[str]
    index_tensors_checked: int  # constant index tensors whose range was checked


@dataclass
class Verification:
    """Everything measured when checking an exported model.

    ``passed`` is true only when every fidelity check and every gate passed; ``failures`` holds
    one message for each that did not (fidelity first, then ``gate failed: …``).
    """

    passed: bool
    export_max_abs_diff: float | None
    export_batches: list[int]
    max_abs_diff: float  # logits, probabilities (binary), hidden states or outputs: see ``task``
    agreement: float | None
    accuracy_before: float | None
    accuracy_after: float | None
    samples: int
    failures: list[str] = field(default_factory=list)
    task: str = "classifier"  # the kind the gates were chosen by (rankshrink.onnx.gates.KINDS)
    gates: list[Gate] = field(default_factory=list)
    mean_prob_diff: float | None = None  # binary
    rel_error: float | None = None  # regression


def with_gates(v: Verification, extra: list[Gate]) -> Verification:
    """``v`` with more gates decided (the size gates, known once both files are exported)."""
    failures = v.failures + quality.failures(extra)
    return replace(v, gates=v.gates + extra, failures=failures, passed=not failures)


def decided(
    task: Task,
    measured: quality.Quality,
    fidelity: list[str],
    tol: Tolerances,
    has_labels: bool,
    *,
    export_max_abs_diff: float | None,
    export_batches: list[int],
    samples: int,
) -> Verification:
    """The verification of fidelity checks ``fidelity`` (failure messages) and the quality gates
    decided on ``measured``: the one place where ``passed`` is decided."""
    gates = quality.quality_gates(task, measured, tol, has_labels)
    failures = fidelity + quality.failures(gates)
    return Verification(
        passed=not failures,
        export_max_abs_diff=export_max_abs_diff,
        export_batches=export_batches,
        max_abs_diff=measured.max_abs_diff,
        agreement=measured.agreement,
        accuracy_before=measured.accuracy_before,
        accuracy_after=measured.accuracy_after,
        samples=samples,
        failures=failures,
        task=task.kind,
        gates=gates,
        mean_prob_diff=measured.mean_prob_diff,
        rel_error=measured.rel_error,
    )


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


#: Metadata a compressed file carries: the weights it was compressed from, and its own weights
#: (so that a ``--save-pt`` checkpoint of the compressed model belongs to it too).
#: Each is the first 16 hex digits of :func:`weights_sha256` (64 bits tell models apart; the
#: record stays small, since it counts against the not-smaller gate).
SOURCE_KEY = "rankshrink.source_sha256"
OWN_KEY = "rankshrink.sha256"


def weights_sha256(model: nn.Module) -> str:
    """A fingerprint of ``model``'s weights: sha256 over its state_dict's names, dtypes, shapes
    and bytes. A checkpoint saved again, or in another format, keeps it; other weights do not."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stamp_provenance(path: Path, source: nn.Module, compressed: nn.Module) -> int:
    """Record in the file which weights it was compressed from (and its own); return its bytes.

    The entries are deterministic (no time, no host), so the same run gives the same bytes.
    """
    model = onnx.load(str(path))
    for key, module in ((SOURCE_KEY, source), (OWN_KEY, compressed)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, weights_sha256(module)[:16]
    onnx.save(model, str(path))
    return path.stat().st_size


@dataclass
class Signature:
    """What a file says about itself: its inputs (name, dims; ``None`` for a dynamic dim), its
    outputs' dims, and its metadata (see :func:`stamp_provenance`)."""

    inputs: list[tuple[str, list[int | None]]]
    outputs: list[list[int | None]]
    metadata: dict[str, str]


def io_signature(path: Path) -> Signature:
    """Read a file's :class:`Signature` without running it.

    Raises:
        InputError: the file is not a readable ONNX model.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(
            f"{path} is not a readable ONNX model ({str(exc).splitlines()[0][:160]})"
        ) from None
    graph = model.graph

    def dims(value: onnx.ValueInfoProto) -> list[int | None]:
        shape = value.type.tensor_type.shape
        return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]

    weights = {t.name for t in graph.initializer}  # old exporters list weights as inputs too
    return Signature(
        inputs=[(v.name, dims(v)) for v in graph.input if v.name not in weights],
        outputs=[dims(v) for v in graph.output],
        metadata={p.key: p.value for p in model.metadata_props},
    )


def check_belongs(
    path: Path,
    model: nn.Module,
    sample_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    input_names: tuple[str, ...] | None = None,
    output_what: str = "values",
) -> None:
    """Refuse a file that is not ``model``'s, before comparing numbers: its inputs or outputs do
    not fit the model, or it records (:func:`stamp_provenance`) that it was compressed from other
    weights. A file without that record (exported by other means) is judged by its widths, and
    then by the quality gates.

    Args:
        sample_shape: one input sample's shape as the model takes it (its last dim is the
            feature width).
        output_shape: one sample's output shape as the model gives it (its last dim: classes,
            1, hidden size).
        input_names: the inputs the file must take by name (token models); ``None``: one input,
            any name (the data is fed to the file's first input).
        output_what: what the output's last dim counts, for the message ("hidden features").

    Raises:
        ForeignFileError: ``<path> does not belong to this model: it takes 784 input features,
            the model takes 64`` (exit 3).
    """
    sig = io_signature(path)
    inputs, outputs = sig.inputs, sig.outputs
    names = [name for name, _ in inputs]
    problem = None
    if input_names is not None and sorted(names) != sorted(input_names):
        problem = f"it takes inputs {', '.join(names) or 'none'}, the model takes {', '.join(input_names)}"
    elif input_names is None and len(inputs) != 1:
        problem = f"it takes {len(inputs)} inputs ({', '.join(names)}), the model takes one"
    elif not outputs:
        problem = "it has no output"
    else:
        problem = _shape_problem(
            [d for _, d in inputs],
            sample_shape,
            outputs[0],
            output_shape,
            output_what,
            tokens=input_names is not None,
        )
    recorded = [sig.metadata[k] for k in (SOURCE_KEY, OWN_KEY) if k in sig.metadata]
    if not problem and recorded:
        ours = weights_sha256(model)[:16]
        if ours not in recorded:
            problem = (
                f"it was compressed from other weights (sha256 {recorded[0]}…;"
                f" this model's {ours}…)"
            )
    if problem:
        raise ForeignFileError(f"{path} does not belong to this model: {problem}")


def _shape_problem(
    in_dims: list[list[int | None]],
    sample_shape: tuple[int, ...],
    out_dims: list[int | None],
    output_shape: tuple[int, ...],
    output_what: str,
    tokens: bool,
) -> str | None:
    """The first way the file's dims (batch first) differ from one sample's shapes."""
    for dims in in_dims:
        if tokens:  # (batch, sequence): any length, so only the rank says anything
            if len(dims) != 2:
                return f"its token inputs have rank {len(dims)}, the model's have rank 2"
            continue
        if len(dims) != len(sample_shape) + 1:
            return (
                f"it takes inputs of shape {_shape(dims)}, the model takes"
                f" {_shape([None, *sample_shape])}"
            )
        if dims[-1] is not None and dims[-1] != sample_shape[-1]:
            return f"it takes {dims[-1]} input features, the model takes {sample_shape[-1]}"
    if len(out_dims) != len(output_shape) + 1:
        return (
            f"it outputs shape {_shape(out_dims)}, the model outputs"
            f" {_shape([None, *output_shape])}"
        )
    if out_dims[-1] is not None and out_dims[-1] != output_shape[-1]:
        return f"it outputs {out_dims[-1]} {output_what}, the model outputs {output_shape[-1]}"
    return None


def _shape(dims: list[int | None]) -> str:
    """``(batch, 8, ?)``: the first dim is the batch; ``?`` a dynamic dim."""
    shown = ["batch" if i == 0 else "?" if d is None else str(d) for i, d in enumerate(dims)]
    return "(" + ", ".join(shown) + ")"


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.shape == b.shape and a.size else float("inf")


@torch.no_grad()  # verification never needs gradients, and .numpy() refuses tensors that track them
def verify_export(
    original: nn.Module,
    compressed: nn.Module | None,
    onnx_path: Path,
    x_test: Tensor,
    y_test: Tensor | None,
    tol: Tolerances,
    task: Task | None = None,
) -> Verification:
    """Check a compressed ONNX file against its torch module and against the original model.

    0. the graph holds no order-dependent scatter and no out-of-range constant index, and the
       file belongs to the model (:func:`check_belongs`: its widths, its recorded source);
    1. compressed torch vs its ONNX at two batch sizes (a few rows, then the whole held-out split,
       neither equal to the export example's batch) — the export is faithful;
    2. the ONNX run on the held-out split twice, in two sessions, gives bit-identical outputs;
    3. compressed ONNX vs the original torch model on the held-out split — the compression kept
       the behaviour: the quality gates of ``task``'s kind (:mod:`rankshrink.onnx.gates`).

    Args:
        task: what the model outputs; ``None``: decided from ``original`` and ``tol.task``.

    Raises:
        ForeignFileError, UntrustedGraphError: step 0 failed (exit 3).
        InputError: the file cannot be loaded or run; a gate flag does not fit the model.
    """
    has_labels = y_test is not None
    if task is None:
        task = quality.model_task(original, x_test, tol, has_labels)
    scan = scan_graph(onnx_path)
    if scan.problems:
        raise UntrustedGraphError(
            f"cannot vouch for {onnx_path}: "
            + "; ".join(scan.problems[:3])
            + (f" (and {len(scan.problems) - 3} more)" if len(scan.problems) > 3 else "")
        )
    before = original.eval()(x_test).numpy()
    check_belongs(onnx_path, original, tuple(x_test.shape[1:]), tuple(before.shape[1:]))
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
    if before.shape != after.shape:  # dims the file leaves dynamic: caught only when run
        raise ForeignFileError(
            f"{onnx_path} does not belong to this model: it outputs shape {after.shape},"
            f" the model {before.shape}"
        )
    return decided(
        task,
        quality.measure(task, before, after, y_test),
        failures,
        tol,
        has_labels,
        export_max_abs_diff=export_diff,
        export_batches=batches,
        samples=len(x_test),
    )
