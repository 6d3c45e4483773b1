"""The ONNX boundary for token encoders: export with dynamic batch and sequence axes, and verify.

An encoder takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, (B, T)) and
returns ``last_hidden_state`` (B, T, C) or ``logits`` (B, classes). Verification follows
:func:`rankshrink.verify.verify_export` — every check runs, then one decision — with what changes
for tokens: the export is compared at two sequence lengths and two batch sizes, padding must not
move any unpadded output, and a base model is compared with the original by the cosine similarity
of its mask-mean-pooled last hidden state.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from rankshrink.errors import InputError
from rankshrink.onnx_export import (
    EXPORTERS,
    ExportConfig,
    ExportError,
    _first,
    _quiet,
    _strip_metadata,
    check_onnx,
    onnx_size,
    refuse_external_data,
)
from rankshrink.verify import (
    Tolerances,
    UntrustedGraphError,
    Verification,
    accuracy,
    scan_graph,
    session,
)

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PAD_TOKENS = 3  # appended by the padding check


def export_tokens(
    encoder: nn.Module, example: Tensor, path: Path, cfg: ExportConfig, output_name: str
) -> int:
    """Export ``encoder`` with dynamic batch and sequence axes; return the file's bytes.

    Args:
        example: (B, 3, T) stacked ids, mask, types; B ≥ 2 and T ≥ 2 (torch.export specializes
            a size of 1 to a constant).

    Raises:
        ExportError: the exporter failed or the checker rejected the result.
    """
    if cfg.exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {cfg.exporter!r}")
    encoder = encoder.eval()
    if example.shape[0] < 2:
        example = example.repeat(2, 1, 1)
    args = tuple(example[:, i].contiguous() for i in range(3))
    axes = {0: "batch", 1: "sequence"}
    try:
        with _quiet(), torch.no_grad():
            if cfg.exporter == "dynamo":
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                program = torch.onnx.export(
                    encoder,
                    args,
                    dynamo=True,
                    opset_version=cfg.opset,
                    input_names=list(INPUTS),
                    output_names=[output_name],
                    dynamic_shapes=tuple({0: batch, 1: seq} for _ in INPUTS),
                    verbose=False,
                    optimize=True,
                )
                program.save(str(path))
            else:
                dynamic = {name: axes for name in INPUTS}
                dynamic[output_name] = axes if output_name == "last_hidden_state" else {0: "batch"}
                torch.onnx.export(
                    encoder,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=cfg.opset,
                    input_names=list(INPUTS),
                    output_names=[output_name],
                    dynamic_axes=dynamic,
                )
    except Exception as exc:  # the exporters raise many unrelated types
        raise ExportError(f"ONNX export ({cfg.exporter}) failed: {_first(exc)}") from None
    refuse_external_data(path)
    _strip_metadata(path)
    check_onnx(path)
    return onnx_size(path)


def run_tokens(sess: ort.InferenceSession, x: Tensor) -> np.ndarray:
    """Run a token model's first output on stacked (B, 3, T) inputs.

    Raises:
        InputError: onnxruntime rejects the inputs or fails while running the graph.
    """
    names = [i.name for i in sess.get_inputs()]
    if sorted(names) != sorted(INPUTS):
        raise InputError(f"the ONNX model's inputs are {names}; expected {list(INPUTS)}")
    feed = {name: x[:, INPUTS.index(name)].numpy().astype(np.int64) for name in names}
    try:
        return sess.run(None, feed)[0]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        raise InputError(
            f"onnxruntime cannot run the model on tokens of shape {tuple(x[:, 0].shape)}"
            f" ({str(exc).splitlines()[0][:200]})"
        ) from None


def token_latency_ms(sess: ort.InferenceSession, x: Tensor, repeats: int = 30) -> float:
    """Median wall time of one run on stacked tokens ``x``, in milliseconds (after a warm-up)."""
    for _ in range(3):
        run_tokens(sess, x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_tokens(sess, x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def shorter(x: Tensor) -> Tensor:
    """The first half of every sequence (at least 2 tokens), a second length to check at; a row
    whose mask would end up empty keeps its first token."""
    T = max(2, x.shape[-1] // 2)
    out = x[..., :T].clone()
    out[:, 1, 0] = torch.where(out[:, 1].sum(1) == 0, 1, out[:, 1, 0])
    return out


def padded(x: Tensor, extra: int = PAD_TOKENS) -> Tensor:
    """``x`` with ``extra`` padding tokens (id 0, mask 0, type 0) appended to every sequence."""
    return torch.cat([x, torch.zeros(*x.shape[:2], extra, dtype=x.dtype)], dim=-1)


@dataclass
class TokenChecks:
    """What verification measured beyond :class:`~rankshrink.verify.Verification`."""

    sequence_lengths: list[int]
    padding_max_abs_diff: float
    pooled_cosine_mean: float | None
    pooled_cosine_min: float | None


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


@torch.no_grad()
def verify_tokens(
    original: nn.Module,
    compressed: nn.Module,
    onnx_path: Path,
    x_test: Tensor,
    y_test: Tensor | None,
    tol: Tolerances,
    base: bool,
) -> tuple[Verification, TokenChecks]:
    """Check a compressed token encoder's ONNX against its torch module and the original.

    0. the graph holds no order-dependent scatter and no out-of-range constant index;
    1. compressed torch vs its ONNX at two batch sizes × two sequence lengths;
    2. two sessions give bit-identical outputs on the held-out split;
    3. padding: ``PAD_TOKENS`` padding tokens appended change no unpadded output (ONNX);
    4. the compressed ONNX vs the original torch model on the held-out split: a base model's
       pooled-cosine mean and min and max abs diff at unpadded positions; a classifier's top-1
       agreement and accuracy before/after (gates as in :func:`~rankshrink.verify.verify_export`).

    Args:
        original, compressed: ``(input_ids, attention_mask, token_type_ids)`` encoders.
        x_test: (N, 3, T) stacked held-out tokens.
        base: the output is a last hidden state (else logits).

    Raises:
        UntrustedGraphError: step 0 failed (exit 3).
        InputError: the file cannot be loaded or run, or its outputs do not match the model's.
    """
    scan = scan_graph(onnx_path)
    if scan.problems:
        raise UntrustedGraphError(f"cannot vouch for {onnx_path}: " + "; ".join(scan.problems[:3]))
    sess = session(onnx_path)
    original.eval()
    compressed.eval()

    def torch_run(model: nn.Module, x: Tensor) -> np.ndarray:
        return model(x[:, 0], x[:, 1], x[:, 2]).numpy()

    failures: list[str] = []
    short = shorter(x_test)
    lengths = sorted({x_test.shape[-1], short.shape[-1]})
    batches = sorted({min(3, len(x_test)), len(x_test)})
    diffs = [0.0]
    for xs in (x_test, short):
        for b in batches:
            ours, theirs = torch_run(compressed, xs[:b]), run_tokens(sess, xs[:b])
            if ours.shape != theirs.shape:
                failures.append(
                    f"export output shape {theirs.shape} != torch {ours.shape}"
                    f" at batch {b}, length {xs.shape[-1]}"
                )
                continue
            diffs.append(float(np.abs(ours - theirs).max()))
    export_diff = float(np.max(diffs))  # unlike max(), keeps a NaN
    if not export_diff <= tol.export_atol:
        failures.append(
            f"export max abs diff {export_diff:.3g} > tolerance {tol.export_atol:g}"
            " (compressed torch vs its ONNX)"
        )
    after = run_tokens(sess, x_test)
    if not np.isfinite(after).all():
        failures.append("the ONNX model's outputs hold NaN or Inf on the held-out split")
    again = run_tokens(session(onnx_path), x_test)
    if after.shape != again.shape or after.tobytes() != again.tobytes():
        failures.append("onnxruntime gave different outputs on two identical runs")

    longer = run_tokens(sess, padded(short))
    plain = run_tokens(sess, short)
    if base:
        longer = longer[:, : short.shape[-1]]
    pad_diff = float(np.abs(_masked(longer, short, base) - _masked(plain, short, base)).max())
    if not pad_diff <= tol.export_atol:
        failures.append(
            f"{PAD_TOKENS} padding tokens change unpadded outputs by {pad_diff:.3g}"
            f" > {tol.export_atol:g}"
        )

    before = torch_run(original, x_test)
    if before.shape != after.shape:
        raise InputError(
            f"ONNX output shape {after.shape} does not match the model's {before.shape}"
        )
    max_diff = float(np.abs(_masked(before, x_test, base) - _masked(after, x_test, base)).max())
    cos_mean = cos_min = None
    agreement = acc_before = acc_after = None
    if base:
        mask = x_test[:, 1].numpy()
        cos = _cosines(pooled(before, mask), pooled(after, mask))
        cos_mean, cos_min = float(cos.mean()), float(cos.min())
    else:
        agreement = float((before.argmax(-1) == after.argmax(-1)).mean())
        acc_before, acc_after = accuracy(before, y_test), accuracy(after, y_test)
        if tol.min_agreement is not None and agreement < tol.min_agreement:
            failures.append(
                f"top-1 agreement {agreement:.4f} < --min-agreement {tol.min_agreement:g}"
            )
        if tol.max_accuracy_drop is not None and acc_before is not None and acc_after is not None:
            drop = acc_before - acc_after
            if drop > tol.max_accuracy_drop:
                failures.append(
                    f"accuracy drop {drop:.2f} points > --max-accuracy-drop"
                    f" {tol.max_accuracy_drop:g}"
                )
    verification = Verification(
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
    return verification, TokenChecks(lengths, pad_diff, cos_mean, cos_min)
