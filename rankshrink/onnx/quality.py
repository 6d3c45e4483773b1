"""Quality: how the compressed model's outputs compare with the original's on held-out data.

:func:`measure` computes what the gates of :mod:`rankshrink.onnx.gates` decide on, per task kind
(:mod:`rankshrink.onnx.task`): accuracy and top-1 or decision agreement for classifiers, the mean
|Δp| of a binary model's probabilities, the relative error of regression outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from rankshrink.onnx.task import Task


@dataclass
class Quality:
    """The comparison of the compressed model's outputs with the original's on held-out data."""

    max_abs_diff: float  # logits, probabilities (binary), hidden states or outputs
    agreement: float | None = None  # top-1 (classifier) or decision (binary) agreement
    accuracy_before: float | None = None  # percent
    accuracy_after: float | None = None
    mean_prob_diff: float | None = None  # binary
    rel_error: float | None = None  # regression
    pooled_cosine: float | None = None  # hidden states; measured by the caller


def probabilities(out: np.ndarray, task: Task, reference: np.ndarray) -> np.ndarray:
    """A binary model's p: its outputs when they are probabilities (it ends in nn.Sigmoid, or
    every one of the original's outputs ``reference`` lies in [0, 1]), else sigmoid(outputs)."""
    if task.sigmoid or (reference.size and reference.min() >= 0.0 and reference.max() <= 1.0):
        return out.astype(np.float64)
    return 1.0 / (1.0 + np.exp(-out.astype(np.float64)))


def measure(task: Task, before: np.ndarray, after: np.ndarray, y: Tensor | None) -> Quality:
    """Compare the outputs ``before`` (original) and ``after`` (compressed), both (N, outputs).

    A hidden-state model's pooled cosine needs its attention mask; its caller measures it and
    sets :attr:`Quality.pooled_cosine`.
    """
    labels = None if y is None else y.numpy()
    if task.kind == "binary":
        p_before, p_after = probabilities(before, task, before), probabilities(after, task, before)
        dec_before, dec_after = p_before[:, 0] > 0.5, p_after[:, 0] > 0.5
        acc = (
            (None, None)
            if labels is None
            else tuple(float((d == labels).mean() * 100.0) for d in (dec_before, dec_after))
        )
        return Quality(
            max_abs_diff=_max_abs(p_before, p_after),
            agreement=float((dec_before == dec_after).mean()),
            accuracy_before=acc[0],
            accuracy_after=acc[1],
            mean_prob_diff=float(np.abs(p_before - p_after).mean()),
        )
    quality = Quality(max_abs_diff=_max_abs(before, after))
    if task.kind == "classifier":
        quality.agreement = float((before.argmax(-1) == after.argmax(-1)).mean())
        if labels is not None:
            quality.accuracy_before = float((before.argmax(-1) == labels).mean() * 100.0)
            quality.accuracy_after = float((after.argmax(-1) == labels).mean() * 100.0)
    elif task.kind == "regression":
        diff = np.linalg.norm((after - before).astype(np.float64))
        norm = np.linalg.norm(before.astype(np.float64))
        quality.rel_error = float(diff / norm) if norm > 0 else (0.0 if diff == 0 else np.inf)
    return quality


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.size else 0.0
