"""The ONNX boundary, checking side: run exported files with onnxruntime and compare.

Sessions run on the CPU with one thread and sequential execution, so results do not depend on
thread scheduling. :func:`verify_export` collects every failed check before deciding, in the manner
of optimum's ``validate_model_outputs``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from rankshrink.errors import InputError


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
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(
            f"{path} is not a loadable ONNX model ({str(exc).splitlines()[0][:160]})"
        ) from None


def run(sess: ort.InferenceSession, x: Tensor) -> np.ndarray:
    """Run the session's first output on ``x``."""
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0]


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


@torch.no_grad()
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

    1. compressed torch vs its ONNX at two batch sizes (a few rows, then the whole held-out split,
       neither equal to the export example's batch) — the export is faithful;
    2. compressed ONNX vs the original torch model on the held-out split — the compression kept
       the behaviour: max abs diff, top-1 agreement and accuracy before/after.
    """
    sess = session(onnx_path)
    failures: list[str] = []
    export_diff: float | None = None
    batches = sorted({min(3, len(x_test)), len(x_test)})
    if compressed is not None:
        compressed.eval()
        export_diff = 0.0
        for b in batches:
            ours = compressed(x_test[:b]).numpy()
            theirs = run(sess, x_test[:b])
            if ours.shape != theirs.shape:
                failures.append(
                    f"export output shape {theirs.shape} != torch {ours.shape} at batch {b}"
                )
                continue
            export_diff = max(export_diff, float(np.abs(ours - theirs).max()))
        if export_diff > tol.export_atol:
            failures.append(
                f"export max abs diff {export_diff:.3g} > tolerance {tol.export_atol:g}"
                " (compressed torch vs its ONNX)"
            )
    after = run(sess, x_test)
    before = original.eval()(x_test).numpy()
    if before.shape != after.shape:
        raise InputError(
            f"ONNX output shape {after.shape} does not match the model's {before.shape}"
        )
    max_diff = float(np.abs(before - after).max())
    agreement = float((before.argmax(-1) == after.argmax(-1)).mean()) if classifier else None
    acc_before, acc_after = accuracy(before, y_test), accuracy(after, y_test)
    if tol.min_agreement is not None and agreement is not None and agreement < tol.min_agreement:
        failures.append(f"top-1 agreement {agreement:.4f} < --min-agreement {tol.min_agreement:g}")
    if tol.max_accuracy_drop is not None and acc_before is not None and acc_after is not None:
        drop = acc_before - acc_after
        if drop > tol.max_accuracy_drop:
            failures.append(
                f"accuracy drop {drop:.2f} points > --max-accuracy-drop {tol.max_accuracy_drop:g}"
            )
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
