"""Verifying a token encoder's ONNX: after ``compress``, and again later with ``verify``.

It follows :func:`rankshrink.onnx.verify.verify_export` — every check runs, then one decision — with
what changes for tokens: outputs are checked at two sequence lengths and two batch sizes, padding
must not move any unpadded output, and a base model is compared with the original by the cosine
similarity of its mask-mean-pooled last hidden state (a classifier by top-1 agreement and, with
labels, accuracy). The quality gates are those of :mod:`rankshrink.onnx.gates` (``hidden`` for a base
model), and the file must take the token inputs by name and give the model's output width.

``compress`` has the compressed torch module and checks the export against it
(``export_max_abs_diff``); ``verify`` has only the file, so it checks that the file agrees with
itself across batch sizes (``batch_max_abs_diff``, computed in both cases) and compares it with the
original at both lengths. The metrics at the data's own length are computed the same way in both,
so ``verify`` reproduces the numbers the ``compress`` report holds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rankshrink.nn.token_encoder import TokenEncoder
from rankshrink.onnx.gates import Quality, Task, Tolerances, measure, resolve_task
from rankshrink.onnx.tokens import INPUTS, PAD_TOKENS, padded, run_tokens, shorter
from rankshrink.onnx.verify import (
    ForeignFileError,
    UntrustedGraphError,
    Verification,
    check_belongs,
    decided,
    scan_graph,
    session,
)


@dataclass
class TokenChecks:
    """What verification measured beyond :class:`~rankshrink.onnx.verify.Verification`."""

    sequence_lengths: list[int]
    batch_max_abs_diff: float  # the ONNX at a small batch vs the same rows of the whole split
    padding_max_abs_diff: float
    pooled_cosine_mean: float | None
    pooled_cosine_min: float | None
    # the comparison with the original at each length: pooled cosine, or top-1 agreement
    by_length: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for the report's ``verification`` block and ``verify --json``."""
        return asdict(self)


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-mean pooling of (B, T, C) hidden states over the unpadded tokens → (B, C)."""
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)


def _masked(out: np.ndarray, x: Tensor, base: bool) -> np.ndarray:
    """A base model's outputs at unpadded positions only; a classifier's logits as they are."""
    return out[x[:, 1].numpy().astype(bool)] if base else out


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.size else 0.0


def encoder_task(encoder: TokenEncoder, tol: Tolerances, has_labels: bool) -> Task:
    """The task kind of a folder's model: ``hidden`` for a base model, else by its classes
    (see :func:`rankshrink.onnx.gates.resolve_task`).

    Raises:
        InputError: ``--task`` or a gate flag does not fit the model.
    """
    cfg = encoder.config
    base = cfg.kind == "base"
    return resolve_task(cfg.hidden_size if base else cfg.classes, tol, has_labels, hidden=base)


@torch.no_grad()
def verify_tokens(
    original: nn.Module,
    compressed: nn.Module | None,
    onnx_path: Path,
    x_test: Tensor,
    y_test: Tensor | None,
    tol: Tolerances,
    task: Task,
    pad_id: int = 0,
) -> tuple[Verification, TokenChecks]:
    """Check a token encoder's ONNX against its torch module (if given) and the original.

    0. the graph holds no order-dependent scatter and no out-of-range constant index;
    1. at two sequence lengths × two batch sizes: the ONNX at the small batch equals the same
       rows of the whole split, and (with ``compressed``) the compressed torch module;
    2. two sessions give bit-identical outputs on the held-out split;
    3. padding: ``PAD_TOKENS`` tokens of id ``pad_id`` appended change no unpadded output;
    4. the ONNX vs the original torch model: a base model's pooled-cosine mean and min and max
       abs diff at unpadded positions; a classifier's top-1 agreement and accuracy before/after
       — at the data's length, and the same similarity at the shorter length (``by_length``);
       the quality gates of ``task``'s kind decide on the data's length.

    Args:
        original, compressed: ``(input_ids, attention_mask, token_type_ids)`` encoders;
            ``compressed`` is None when only the file is at hand (``rankshrink verify``).
        x_test: (N, 3, T) stacked held-out tokens.
        task: what the model outputs (:func:`encoder_task`); ``hidden``: a last hidden state.

    Raises:
        ForeignFileError: the file's inputs or output width are not the model's (exit 3).
        UntrustedGraphError: step 0 failed (exit 3).
        InputError: the file cannot be loaded or run.
    """
    base = task.kind == "hidden"
    original.eval()

    def torch_run(model: nn.Module, x: Tensor) -> np.ndarray:
        return model(x[:, 0], x[:, 1], x[:, 2]).numpy()

    scan = scan_graph(onnx_path)
    if scan.problems:
        raise UntrustedGraphError(f"cannot vouch for {onnx_path}: " + "; ".join(scan.problems[:3]))
    width = "hidden features" if base else "logits"
    one = tuple(torch_run(original, x_test[:2]).shape[1:])
    check_belongs(
        onnx_path, original, tuple(x_test.shape[2:]), one, input_names=INPUTS, output_what=width
    )
    sess = session(onnx_path)

    failures: list[str] = []
    short = shorter(x_test)
    variants = {short.shape[-1]: short, x_test.shape[-1]: x_test}  # length -> tokens
    batches = sorted({min(3, len(x_test)), len(x_test)})
    onnx_out: dict[int, np.ndarray] = {}
    originals: dict[int, np.ndarray] = {}
    for length, xs in variants.items():  # a file for another model fails here, in one line
        onnx_out[length], originals[length] = run_tokens(sess, xs), torch_run(original, xs)
        if originals[length].shape != onnx_out[length].shape:
            raise ForeignFileError(
                f"{onnx_path} does not belong to this model: it outputs shape"
                f" {onnx_out[length].shape}, the model {originals[length].shape}"
                f" (tokens of length {length})"
            )
    export_diffs, batch_diffs = [0.0], [0.0]
    for length, xs in variants.items():
        whole = onnx_out[length]
        for b in batches:
            theirs = whole if b == len(xs) else run_tokens(sess, xs[:b])
            if b < len(xs):
                part = xs[:b]
                batch_diffs.append(
                    _max_abs(_masked(theirs, part, base), _masked(whole[:b], part, base))
                )
            if compressed is None:
                continue
            ours = torch_run(compressed.eval(), xs[:b])
            if ours.shape != theirs.shape:
                failures.append(
                    f"export output shape {theirs.shape} != torch {ours.shape}"
                    f" at batch {b}, length {length}"
                )
                continue
            export_diffs.append(_max_abs(ours, theirs))
    export_diff = float(np.max(export_diffs)) if compressed is not None else None
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
    if not all(np.isfinite(out).all() for out in onnx_out.values()):
        failures.append("the ONNX model's outputs hold NaN or Inf on the held-out split")
    again = run_tokens(session(onnx_path), x_test)
    if after.shape != again.shape or after.tobytes() != again.tobytes():
        failures.append("onnxruntime gave different outputs on two identical runs")

    longer = run_tokens(sess, padded(short, pad_id=pad_id))
    if base:
        longer = longer[:, : short.shape[-1]]
    plain = onnx_out[short.shape[-1]]
    pad_diff = _max_abs(_masked(longer, short, base), _masked(plain, short, base))
    if not pad_diff <= tol.export_atol:
        failures.append(
            f"{PAD_TOKENS} padding tokens change unpadded outputs by {pad_diff:.3g}"
            f" > {tol.export_atol:g}"
        )

    by_length: list[dict[str, Any]] = []
    for length, xs in variants.items():
        before = originals[length]
        if base:
            mask = xs[:, 1].numpy()
            cos = _cosines(pooled(before, mask), pooled(onnx_out[length], mask))
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
    before = originals[x_test.shape[-1]]
    at_length = by_length[-1]  # the data's own length comes last
    if base:  # hidden states at unpadded positions; the gate is the pooled cosine
        diff = _max_abs(_masked(before, x_test, base), _masked(after, x_test, base))
        measured = Quality(max_abs_diff=diff, pooled_cosine=at_length["pooled_cosine_mean"])
    else:
        measured = measure(task, before, after, y_test)
    verification = decided(
        task,
        measured,
        failures,
        tol,
        y_test is not None,
        export_max_abs_diff=export_diff,
        export_batches=batches,
        samples=len(x_test),
    )
    checks = TokenChecks(
        sequence_lengths=sorted(variants),
        batch_max_abs_diff=batch_diff,
        padding_max_abs_diff=pad_diff,
        pooled_cosine_mean=at_length.get("pooled_cosine_mean"),
        pooled_cosine_min=at_length.get("pooled_cosine_min"),
        by_length=by_length,
    )
    return verification, checks
