"""``--quantize``: store the compressed file at low precision, verified, accuracy-aware.

The whole file is quantized and verified against the original with the run's gates. If a gate
fails, the nodes whose quantization moves the outputs most are kept in float32 — 1, 2, 4, … of
them, most sensitive first, as Neural Compressor and Olive fall back op by op — until the file
passes or every weight node is float again. Each node's sensitivity is measured once: the max
abs difference from the float file on held-out inputs with only that node quantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from rankshrink.models.io_spec import ModelIO
from rankshrink.onnx.quantize import quantize_file, weight_nodes
from rankshrink.onnx.session import run, session
from rankshrink.onnx.verify import Verification


@dataclass
class Quantized:
    """The stored file, its verification, and what stayed in float32."""

    path: Path
    verification: Verification
    kept_float: list[str] = field(default_factory=list)
    tries: list[dict[str, Any]] = field(default_factory=list)  # kept, bytes, passed per try


def quantize_verified(
    float_path: Path,
    mode: str,
    verify: Callable[[Path], Verification],
    x: Tensor,
    io: ModelIO,
) -> Quantized:
    """Quantize ``float_path`` (a file in a temporary folder) and verify it, falling back to
    float32 on the most sensitive nodes while a gate fails."""
    folder = float_path.parent
    sensitive: list[str] | None = None
    keep: list[str] = []
    tries: list[dict[str, Any]] = []
    while True:
        path = folder / f"quantized-{len(tries)}.onnx"
        size = quantize_file(float_path, path, mode, keep_float=keep)
        verification = verify(path)
        tries.append({"kept_float": len(keep), "bytes": size, "passed": verification.passed})
        gates_only = all(f.startswith("gate failed") for f in verification.failures)
        if verification.passed or not gates_only:  # a fidelity failure is not precision's
            return Quantized(path, verification, keep, tries)
        if sensitive is None:
            sensitive = _by_sensitivity(float_path, mode, x, io)
        if len(keep) >= len(sensitive):
            return Quantized(path, verification, keep, tries)
        keep = sensitive[: max(1, 2 * len(keep))]


def _by_sensitivity(float_path: Path, mode: str, x: Tensor, io: ModelIO) -> list[str]:
    """Weight nodes, most sensitive first: the output change with only that node quantized."""
    want = run(session(float_path), x, io)
    scores: list[tuple[float, int, str]] = []
    probe = float_path.parent / "probe.onnx"
    for i, name in enumerate(weight_nodes(float_path)):
        quantize_file(float_path, probe, mode, only=[name])
        got = run(session(probe), x, io)
        scores.append((float(np.abs(got - want).max()), -i, name))
    return [name for _, _, name in sorted(scores, reverse=True)]
