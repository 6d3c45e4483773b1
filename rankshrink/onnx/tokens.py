"""The ONNX boundary for token encoders: export with dynamic batch and sequence axes, and run.

An encoder takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, (B, T)) and
returns ``last_hidden_state`` (B, T, C) or ``logits`` (B, classes). The inputs travel stacked as
one (B, 3, T) tensor; :func:`shorter` and :func:`padded` make the second sequence length and the
padded copy that verification (:mod:`rankshrink.onnx.verify_tokens`) checks at.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from rankshrink.errors import InputError
from rankshrink.onnx.export import (
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
from rankshrink.onnx.verify import session

__all__ = [
    "INPUTS",
    "export_tokens",
    "padded",
    "run_tokens",
    "session",
    "shorter",
    "token_latency_ms",
]

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


def padded(x: Tensor, extra: int = PAD_TOKENS, pad_id: int = 0) -> Tensor:
    """``x`` with ``extra`` padding tokens (id ``pad_id``, mask 0, type 0) appended to every
    sequence."""
    pad = torch.zeros(*x.shape[:2], extra, dtype=x.dtype)
    pad[:, 0] = pad_id
    return torch.cat([x, pad], dim=-1)
