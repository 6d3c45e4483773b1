"""The ONNX boundary, checking side: one verifier for every model rankshrink exports.

:func:`verify_export` runs every check, collects every failure, then decides once (in the manner
of optimum's ``validate_model_outputs``). What it feeds the file and how it reads the outputs come
from the model's :class:`~rankshrink.models.io_spec.ModelIO`: a token encoder is also checked at a
second sequence length, for padding that moves no unpadded output, and, with a last hidden state,
by the cosine of its mask-mean pooling (:mod:`rankshrink.onnx.tokens`).

Sessions run on one thread, sequentially (:mod:`rankshrink.onnx.session`), and the check runs in
two sessions: outputs must be bit-identical. Before anything runs, the graph is scanned for what
would make a check meaningless (:mod:`rankshrink.onnx.graph_scan`) and the file must belong to the
model (:mod:`rankshrink.onnx.provenance`). The comparison with the original is decided by the
quality gates of :mod:`rankshrink.onnx.gates`; ``passed`` means every check and every gate passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rankshrink.models.io_spec import FEATURES, ModelIO
from rankshrink.onnx import gates as gating
from rankshrink.onnx.gates import Gate
from rankshrink.onnx.graph_scan import UntrustedGraphError, scan_graph
from rankshrink.onnx.provenance import ForeignFileError, check_belongs
from rankshrink.onnx.quality import Quality, measure
from rankshrink.onnx.session import run, session
from rankshrink.onnx.task import Task, Tolerances, model_task
from rankshrink.onnx.tokens import PAD_TOKENS, cosines, padded, pooled, shorter, unpadded


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
    task: str = "classifier"  # the kind the gates were chosen by (rankshrink.onnx.task.KINDS)
    gates: list[Gate] = field(default_factory=list)
    mean_prob_diff: float | None = None  # binary
    rel_error: float | None = None  # regression
    # token encoders: the checks beyond these fields (sequence lengths, batch and padding
    # consistency, pooled cosine per length); None for one-input models
    checks: dict[str, Any] | None = None


def with_gates(v: Verification, extra: list[Gate]) -> Verification:
    """``v`` with more gates decided (the size gates, known once both files are exported)."""
    failures = v.failures + gating.failures(extra)
    return replace(v, gates=v.gates + extra, failures=failures, passed=not failures)


def decided(
    task: Task,
    measured: Quality,
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
    gates = gating.quality_gates(task, measured, tol, has_labels)
    failures = fidelity + gating.failures(gates)
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


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Max abs difference; inf for arrays that cannot be compared, 0 for empty ones."""
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a - b).max()) if a.size else 0.0


@torch.no_grad()  # verification never needs gradients, and .numpy() refuses tensors that track them
def verify_export(
    original: nn.Module,
    compressed: nn.Module | None,
    onnx_path: Path,
    x_test: Tensor,
    y_test: Tensor | None,
    tol: Tolerances,
    task: Task | None = None,
    io: ModelIO = FEATURES,
    weights: nn.Module | None = None,
) -> Verification:
    """Check a compressed ONNX file against its torch module and against the original model.

    0. the graph holds no order-dependent scatter and no out-of-range constant index, and the
       file belongs to the model (its inputs, widths and recorded source);
    1. compressed torch vs its ONNX at two batch sizes (a few rows, then the whole held-out split,
       neither equal to the export example's batch) — the export is faithful; token models also
       at a second sequence length, and the small batch must equal the same rows of the whole
       split (which ``verify``, without the torch module, can still check);
    2. the ONNX run on the held-out split twice, in two sessions, gives bit-identical outputs;
    3. token models: padding tokens appended change no unpadded output;
    4. compressed ONNX vs the original torch model on the held-out split — the compression kept
       the behaviour: the quality gates of ``task``'s kind (a last hidden state: pooled cosine).

    Args:
        original, compressed: take ``x`` as the training loop does (``io.exported`` gives the
            module the file computes); ``compressed`` is None when only the file is at hand.
        task: what the model outputs; ``None``: decided from ``original`` and ``tol.task``.
        io: how ``x`` feeds the file and the modules.
        weights: the module whose weights the file must record as its source or its own
            (the model as loaded, before any adapting); ``None``: ``original``.

    Raises:
        ForeignFileError, UntrustedGraphError: step 0 failed (exit 3).
        InputError: the file cannot be loaded or run; a gate flag does not fit the model.
    """
    has_labels = y_test is not None
    source = io.exported(original).eval()
    if task is None:
        task = model_task(source, x_test, tol, has_labels)
    hidden = io.tokens and task.kind == "hidden"

    def torch_run(model: nn.Module, x: Tensor) -> np.ndarray:
        return model(*io.args(x)).numpy()

    scan = scan_graph(onnx_path)
    if scan.problems:
        raise UntrustedGraphError(
            f"cannot vouch for {onnx_path}: "
            + "; ".join(scan.problems[:3])
            + (f" (and {len(scan.problems) - 3} more)" if len(scan.problems) > 3 else "")
        )
    sample = tuple(x_test.shape[2:] if io.tokens else x_test.shape[1:])
    one = tuple(torch_run(source, x_test[:2]).shape[1:])
    names = io.inputs if io.tokens else None
    width = ("hidden features" if hidden else "logits") if io.tokens else "values"
    owner = source if weights is None else weights
    check_belongs(onnx_path, owner, sample, one, input_names=names, output_what=width)
    sess = session(onnx_path)

    # the data's own length last; a token model is checked at half of it too
    variants = {x_test.shape[-1]: x_test}
    if io.tokens:
        short = shorter(x_test)
        variants = {short.shape[-1]: short, x_test.shape[-1]: x_test}
    onnx_out: dict[int, np.ndarray] = {}
    originals: dict[int, np.ndarray] = {}
    for length, xs in variants.items():  # a file for another model fails here, in one line
        onnx_out[length], originals[length] = run(sess, xs, io), torch_run(source, xs)
        if originals[length].shape != onnx_out[length].shape:
            at = f" (tokens of length {length})" if io.tokens else ""
            raise ForeignFileError(
                f"{onnx_path} does not belong to this model: it outputs shape"
                f" {onnx_out[length].shape}, the model {originals[length].shape}{at}"
            )

    failures: list[str] = []
    batches = sorted({min(3, len(x_test)), len(x_test)})
    export_diffs, batch_diffs = [0.0], [0.0]
    module = io.exported(compressed).eval() if compressed is not None else None
    for length, xs in variants.items():
        whole = onnx_out[length]
        for b in batches:
            theirs = whole if b == len(xs) else run(sess, xs[:b], io)
            if io.tokens and b < len(xs):
                part = xs[:b]
                batch_diffs.append(
                    _max_abs(unpadded(theirs, part, hidden), unpadded(whole[:b], part, hidden))
                )
            if module is None:
                continue
            ours = torch_run(module, xs[:b])
            if ours.shape != theirs.shape:
                at = f", length {length}" if io.tokens else ""
                failures.append(
                    f"export output shape {theirs.shape} != torch {ours.shape} at batch {b}{at}"
                )
                continue
            export_diffs.append(float(np.abs(ours - theirs).max()) if ours.size else 0.0)
    export_diff = float(np.max(export_diffs)) if module is not None else None  # keeps a NaN
    if export_diff is not None and not export_diff <= tol.export_atol:  # a NaN fails too
        failures.append(
            f"export max abs diff {export_diff:.3g} > tolerance {tol.export_atol:g}"
            " (compressed torch vs its ONNX)"
        )
    batch_diff = float(np.max(batch_diffs))
    if not batch_diff <= tol.export_atol:
        failures.append(
            f"the ONNX's outputs at batch {batches[0]} differ from the same rows at batch"
            f" {batches[-1]} by {batch_diff:.3g} > {tol.export_atol:g}"
        )
    after = onnx_out[x_test.shape[-1]]
    bad = sum(int((~np.isfinite(out)).reshape(len(out), -1).any(-1).sum()) for out in onnx_out.values())
    if bad:  # NaN compares false with every tolerance: catch it here
        failures.append(
            f"the ONNX model's outputs hold NaN or Inf on {bad} of"
            f" {len(x_test) * len(variants)} held-out samples"
        )
    again = run(session(onnx_path), x_test, io)  # a second session: nothing carried over
    if after.shape != again.shape or after.tobytes() != again.tobytes():
        failures.append(
            "onnxruntime gave different outputs on two identical runs"
            f" (max diff {_max_abs(after, again):.3g}); the file's results are not reproducible"
        )

    checks = None
    before = originals[x_test.shape[-1]]
    if io.tokens:
        checks, pad_diff = _token_checks(sess, io, variants, onnx_out, originals, hidden)
        checks["batch_max_abs_diff"] = batch_diff
        if not pad_diff <= tol.export_atol:
            failures.append(
                f"{PAD_TOKENS} padding tokens change unpadded outputs by {pad_diff:.3g}"
                f" > {tol.export_atol:g}"
            )
    if hidden:  # hidden states at unpadded positions; the gate is the pooled cosine
        assert checks is not None
        diff = _max_abs(unpadded(before, x_test, True), unpadded(after, x_test, True))
        measured = Quality(max_abs_diff=diff, pooled_cosine=checks["pooled_cosine_mean"])
    else:
        measured = measure(task, before, after, y_test)
    verification = decided(
        task,
        measured,
        failures,
        tol,
        has_labels,
        export_max_abs_diff=export_diff,
        export_batches=batches,
        samples=len(x_test),
    )
    return replace(verification, checks=checks)


def _token_checks(
    sess: Any,
    io: ModelIO,
    variants: dict[int, Tensor],
    onnx_out: dict[int, np.ndarray],
    originals: dict[int, np.ndarray],
    hidden: bool,
) -> tuple[dict[str, Any], float]:
    """The padding check and the comparison with the original at each length: the report's
    token checks, and the padding difference."""
    short_len = min(variants)
    short = variants[short_len]
    longer = run(sess, padded(short, pad_id=io.pad_id), io)
    if hidden:
        longer = longer[:, :short_len]
    plain = onnx_out[short_len]
    pad_diff = _max_abs(unpadded(longer, short, hidden), unpadded(plain, short, hidden))
    by_length: list[dict[str, Any]] = []
    for length, xs in variants.items():
        before = originals[length]
        if hidden:
            mask = xs[:, 1].numpy()
            cos = cosines(pooled(before, mask), pooled(onnx_out[length], mask))
            by_length.append(
                {
                    "length": length,
                    "pooled_cosine_mean": float(cos.mean()),
                    "pooled_cosine_min": float(cos.min()),
                }
            )
        else:
            agree = float((before.argmax(-1) == onnx_out[length].argmax(-1)).mean())
            by_length.append({"length": length, "agreement": agree})
    at_length = by_length[-1]  # the data's own length comes last
    checks = {
        "sequence_lengths": sorted(variants),
        "batch_max_abs_diff": 0.0,  # filled in by the caller
        "padding_max_abs_diff": pad_diff,
        "pooled_cosine_mean": at_length.get("pooled_cosine_mean"),
        "pooled_cosine_min": at_length.get("pooled_cosine_min"),
        "by_length": by_length,
    }
    return checks, pad_diff
