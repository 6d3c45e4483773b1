"""Task kinds: what the model outputs decides which quality gates it gets.

``--task`` and the output width decide the kind (:func:`resolve_task`): one output column is a
binary classifier, two or more a classifier, a Hugging Face base model's last hidden state is
``hidden``, and ``regression`` is chosen with ``--task regression``. :class:`Tolerances` holds the
export tolerance and the gate thresholds the user gave; :func:`validate` checks their ranges, and
:func:`resolve_task` rejects a flag that does not apply to the kind, before any work is done. The
gates themselves are in :mod:`rankshrink.onnx.gates`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rankshrink.errors import InputError

#: What ``--task`` accepts; ``auto`` decides from the model (one output: binary, else classifier).
TASKS = ("auto", "classifier", "binary", "regression")
#: The task kinds gates are chosen by (``hidden`` is decided by a Hugging Face folder, not a flag).
KINDS = ("classifier", "binary", "hidden", "regression")


@dataclass(frozen=True)
class Tolerances:
    """What counts as a passed verification: the export tolerance and the quality thresholds.

    A threshold left ``None`` takes its default for the model's kind (see
    :mod:`rankshrink.onnx.gates`); ``task`` is ``--task``.
    """

    export_atol: float = 1e-4  # compressed torch vs its ONNX, max abs diff
    max_accuracy_drop: float | None = None  # points
    min_agreement: float | None = None  # fraction of held-out samples
    min_cosine: float | None = None  # mean pooled cosine of hidden states
    max_prob_diff: float | None = None  # mean |Δp| of a binary classifier
    max_rel_error: float | None = None  # ‖after − before‖_F / ‖before‖_F
    task: str = "auto"


#: How messages name each kind ("default for classifiers").
PLURAL = {
    "classifier": "classifiers",
    "binary": "binary classifiers",
    "hidden": "hidden-state models",
    "regression": "regression outputs",
}
#: The kinds each threshold applies to (a flag given for another kind is bad input).
APPLIES = {
    "max_accuracy_drop": ("classifier", "binary"),
    "min_agreement": ("classifier", "binary"),
    "min_cosine": ("hidden",),
    "max_prob_diff": ("binary",),
    "max_rel_error": ("regression",),
}


def cli_flag(field: str) -> str:
    """The flag that sets a :class:`Tolerances` field (``max_rel_error``: ``--max-rel-error``)."""
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class Task:
    """What a model outputs, which decides its quality gates."""

    kind: str  # one of KINDS
    outputs: int  # output width (classes, 1, hidden size, or regression targets)
    sigmoid: bool = False  # binary: the model ends in nn.Sigmoid, so it outputs probabilities


def validate(tol: Tolerances) -> None:
    """Check the thresholds' ranges and ``task``.

    Raises:
        InputError: one line naming the flag, its range and the value given.
    """
    if tol.task not in TASKS:
        raise InputError(f"--task must be one of {', '.join(TASKS)}, got {tol.task!r}")
    ranges = {
        "max_accuracy_drop": (-100.0, 100.0),  # negative: the compressed model must be better
        "min_agreement": (0.0, 1.0),
        "min_cosine": (-1.0, 1.0),
        "max_prob_diff": (0.0, 1.0),
        "max_rel_error": (0.0, float("inf")),
    }
    for field, (low, high) in ranges.items():
        value = getattr(tol, field)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            bounds = f"in [{low:g}, {high:g}]"
            if high == float("inf"):
                bounds = f"a finite number ≥ {low:g}"
            raise InputError(f"{cli_flag(field)} must be {bounds}, got {value}")


def resolve_task(
    outputs: int, tol: Tolerances, has_labels: bool, *, hidden: bool = False, sigmoid: bool = False
) -> Task:
    """Decide the task kind from what the model outputs and ``--task``; check the gate flags.

    Args:
        outputs: the output width (classes, 1, hidden size).
        hidden: the model outputs hidden states (a Hugging Face base model).
        sigmoid: the model ends in ``nn.Sigmoid``.

    Raises:
        InputError: ``--task`` does not fit the model, or a gate flag does not apply to its kind
            (before any work is done).
    """
    validate(tol)
    if hidden:
        if tol.task != "auto":
            raise InputError(
                f"--task {tol.task} does not apply: the model outputs hidden states; drop --task"
            )
        kind = "hidden"
    elif tol.task == "auto":
        kind = "binary" if outputs == 1 else "classifier"
    else:
        kind = tol.task
    if kind == "classifier" and outputs < 2:
        raise InputError(
            f"--task classifier needs two or more outputs; the model has {outputs}"
            " (use --task binary or regression)"
        )
    if kind == "binary" and outputs != 1:
        raise InputError(
            f"--task binary needs one output column; the model has {outputs}"
            " (use --task classifier or regression)"
        )
    if kind == "regression" and has_labels:
        raise InputError(
            "--task regression takes label-free data (y holds class labels); drop y from the"
            " data file or use --task classifier"
        )
    what = {
        "classifier": f"a classifier ({outputs} outputs)",
        "binary": "a binary classifier (one output)",
        "hidden": "a hidden-state model",
        "regression": "a regression model (--task regression)",
    }[kind]
    for field, allowed in APPLIES.items():
        if getattr(tol, field) is not None and kind not in allowed:
            raise InputError(
                f"{cli_flag(field)} does not apply to {what}; it gates"
                f" {' and '.join(PLURAL[k] for k in allowed)}"
            )
    return Task(kind, outputs, sigmoid and kind == "binary")


@torch.no_grad()
def model_task(model: nn.Module, x: Tensor, tol: Tolerances, has_labels: bool) -> Task:
    """:func:`resolve_task` for a checkpoint model, from its output on two samples of ``x``."""
    out = model.eval()(x[:2])
    return resolve_task(int(out.shape[-1]), tol, has_labels, sigmoid=ends_in_sigmoid(model))


def ends_in_sigmoid(model: nn.Module) -> bool:
    """Whether the last module registered (the last layer of a Sequential) is ``nn.Sigmoid``."""
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    return bool(leaves) and isinstance(leaves[-1], nn.Sigmoid)
