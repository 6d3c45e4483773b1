"""Quality gates: what "verification passed" asks of a compressed model besides a faithful export.

A faithful export (the ONNX computes what the compressed torch model computes) says nothing about
whether the compressed model still behaves like the original. That is what these gates decide, and
they are on by default (SPEC §6), chosen by what the model outputs — its *task kind*:

- ``classifier`` (logits, two or more outputs): with labels, the test accuracy may drop at most
  1 point; without labels, the top-1 class must agree with the original's on ≥ 95 % of held-out
  samples.
- ``binary`` (one output column: a sigmoid or logit model): decisions are taken at p = 0.5. With
  0/1 labels the accuracy may drop at most 1 point, otherwise the decisions must agree on ≥ 95 %;
  and in both cases the mean |Δp| must stay ≤ 0.05 (see :data:`DEFAULT_MAX_PROB_DIFF`).
- ``hidden`` (a Hugging Face base model's last hidden state): the mean cosine of the mask-mean
  pooled states with the original's must be ≥ 0.98.
- ``regression`` (any other output, chosen with ``--task regression``): the relative error
  ‖after − before‖_F / ‖before‖_F must be ≤ 0.05 (see :data:`DEFAULT_MAX_REL_ERROR`).

Every threshold can be changed by its flag; a flag that does not apply to the model's kind is bad
input. Each gate is recorded (:class:`Gate`) with its metric, value, threshold and where the
threshold came from, so the report says exactly what "passed" meant. The size gates (the file must
be smaller than the original; ``--max-bytes``) are gates of the same kind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from rankshrink.errors import InputError

#: What ``--task`` accepts; ``auto`` decides from the model (one output: binary, else classifier).
TASKS = ("auto", "classifier", "binary", "regression")
#: The task kinds gates are chosen by (``hidden`` is decided by a Hugging Face folder, not a flag).
KINDS = ("classifier", "binary", "hidden", "regression")

DEFAULT_MAX_ACCURACY_DROP = 1.0  # points of test accuracy
DEFAULT_MIN_AGREEMENT = 0.95  # share of held-out samples with the original's top-1 / decision
#: Agreement of decisions alone ignores calibration: probabilities that all moved 0.3 towards 0.5
#: keep every decision. 0.05 is the step at which decision thresholds are usually tuned (a drift
#: below it does not move a tuned threshold by a step) and well under the 0.18 that a binary model
#: compressed far too hard showed while 84 % of its decisions still agreed.
DEFAULT_MAX_PROB_DIFF = 0.05
DEFAULT_MIN_COSINE = 0.98  # mean pooled cosine of hidden states
#: ε = 0.05 lets the change carry at most ε² = 0.25 % of the outputs' energy. For roughly
#: zero-mean outputs (standardized targets) that adds at most ~0.25 % of the target variance to
#: the mean squared error when the change is uncorrelated with the residual. Outputs with a large
#: constant offset make the bound looser: give --max-rel-error for those.
DEFAULT_MAX_REL_ERROR = 0.05


@dataclass(frozen=True)
class Tolerances:
    """What counts as a passed verification: the export tolerance and the quality thresholds.

    A threshold left ``None`` takes its default for the model's kind (see the module docstring);
    ``task`` is ``--task``.
    """

    export_atol: float = 1e-4  # compressed torch vs its ONNX, max abs diff
    max_accuracy_drop: float | None = None  # points
    min_agreement: float | None = None  # fraction of held-out samples
    min_cosine: float | None = None  # mean pooled cosine of hidden states
    max_prob_diff: float | None = None  # mean |Δp| of a binary classifier
    max_rel_error: float | None = None  # ‖after − before‖_F / ‖before‖_F
    task: str = "auto"


@dataclass(frozen=True)
class _Spec:
    """One quality gate: what it measures and the flag that sets its threshold."""

    name: str
    metric: str  # what the value is, with its unit
    flag: str  # the Tolerances field; the CLI flag is its name with dashes
    default: float
    upper: bool  # the threshold bounds the value from above (value ≤ threshold passes)
    unit: str  # appended to numbers in messages ("" for fractions)
    needs_labels: bool = False


_ACCURACY = _Spec(
    "accuracy drop",
    "test accuracy of the original minus the compressed model's, in points",
    "max_accuracy_drop",
    DEFAULT_MAX_ACCURACY_DROP,
    True,
    " points",
    needs_labels=True,
)
_AGREEMENT = _Spec(
    "top-1 agreement",
    "share of held-out samples whose top-1 class is the original's (0-1)",
    "min_agreement",
    DEFAULT_MIN_AGREEMENT,
    False,
    "",
)
_DECISIONS = _Spec(
    "decision agreement",
    "share of held-out samples whose decision at p = 0.5 is the original's (0-1)",
    "min_agreement",
    DEFAULT_MIN_AGREEMENT,
    False,
    "",
)
_PROB_DIFF = _Spec(
    "mean |Δp|",
    "mean absolute change of the predicted probability (0-1)",
    "max_prob_diff",
    DEFAULT_MAX_PROB_DIFF,
    True,
    "",
)
_COSINE = _Spec(
    "pooled cosine",
    "mean cosine of the mask-mean-pooled last hidden state with the original's",
    "min_cosine",
    DEFAULT_MIN_COSINE,
    False,
    "",
)
_REL_ERROR = _Spec(
    "relative error",
    "‖compressed − original‖_F / ‖original‖_F of the held-out outputs",
    "max_rel_error",
    DEFAULT_MAX_REL_ERROR,
    True,
    "",
)

#: Per kind: the gates with labels, the gates without, and the gates a flag may add.
_KIND_GATES: dict[str, tuple[tuple[_Spec, ...], tuple[_Spec, ...], tuple[_Spec, ...]]] = {
    "classifier": ((_ACCURACY,), (_ACCURACY, _AGREEMENT), (_AGREEMENT,)),
    "binary": ((_ACCURACY, _PROB_DIFF), (_ACCURACY, _DECISIONS, _PROB_DIFF), (_DECISIONS,)),
    "hidden": ((_COSINE,), (_COSINE,), ()),
    "regression": ((_REL_ERROR,), (_REL_ERROR,), ()),
}
#: How messages name each kind ("default for classifiers").
_PLURAL = {
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


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class Task:
    """What a model outputs, which decides its quality gates."""

    kind: str  # one of KINDS
    outputs: int  # output width (classes, 1, hidden size, or regression targets)
    sigmoid: bool = False  # binary: the model ends in nn.Sigmoid, so it outputs probabilities


@dataclass
class Gate:
    """One gate as it was decided: what it measured, against what, and the result."""

    name: str
    metric: str  # what ``value`` is, with its unit
    value: float | None  # None: not run
    threshold: float
    comparison: str  # how value must relate to threshold to pass: "<=", ">=" or "<"
    passed: bool | None  # None: not run (see ``note``)
    source: str  # "default" or "flag"
    flag: str | None  # the flag that changes the threshold; None: none does
    unit: str = ""  # appended to numbers in messages
    kind: str = ""  # the task kind whose default this is
    note: str = ""  # why it did not run

    def as_dict(self) -> dict[str, Any]:
        """Plain values for the report and ``verify --json``."""
        return asdict(self)

    def message(self) -> str:
        """``accuracy drop 76.39 points > 1 (default for classifiers; --max-accuracy-drop to
        change)``: the value, how it missed (or met) the threshold, and where that came from."""
        if self.value is None:
            return f"{self.name}: not run ({self.note})"
        if self.name == "not smaller":  # sizes read best as "before → after"
            said = "not smaller" if self.passed is False else "smaller"
            return f"{said}: {self.threshold:,.0f} → {self.value:,.0f} bytes"
        failed = self.passed is False
        relation = {
            "<=": ">" if failed else "≤",
            ">=": "<" if failed else "≥",
            "<": "≥" if failed else "<",
        }[self.comparison]
        if self.source == "flag":
            origin = self.flag or "flag"
        elif not failed:  # where the default came from matters when it fails
            origin = "default"
        else:
            origin = f"default for {_PLURAL.get(self.kind, 'this model')}"
            if self.flag:
                origin += f"; {self.flag} to change"
        return (
            f"{self.name} {format_value(self.value, self.unit)} {relation}"
            f" {format_value(self.threshold, self.unit, threshold=True)} ({origin})"
        )


def format_value(value: float, unit: str, threshold: bool = False) -> str:
    """A gate's number as messages show it: points to 2 decimals, bytes with separators,
    fractions to 4 decimals; a threshold as the flag takes it (``1``, ``0.95``)."""
    if unit == " bytes":
        return f"{value:,.0f} bytes"
    if threshold:
        return f"{value:g}"
    text = f"{value:.2f}" if unit == " points" else f"{value:.4f}"
    if float(text) == 0:  # no "-0.00"
        text = text.lstrip("-")
    return text + unit


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
            raise InputError(f"{_flag(field)} must be {bounds}, got {value}")


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
                f"{_flag(field)} does not apply to {what}; it gates"
                f" {' and '.join(_PLURAL[k] for k in allowed)}"
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


def quality_gates(task: Task, quality: Quality, tol: Tolerances, has_labels: bool) -> list[Gate]:
    """The kind's default gates plus the ones the user's flags add, each decided on ``quality``.

    A gate that needs labels is recorded as not run when there are none.
    """
    with_labels, without, optional = _KIND_GATES[task.kind]
    chosen = list(with_labels if has_labels else without)
    chosen += [s for s in optional if getattr(tol, s.flag) is not None and s not in chosen]
    values = {
        _ACCURACY: None
        if quality.accuracy_before is None or quality.accuracy_after is None
        else quality.accuracy_before - quality.accuracy_after,
        _AGREEMENT: quality.agreement,
        _DECISIONS: quality.agreement,
        _PROB_DIFF: quality.mean_prob_diff,
        _COSINE: quality.pooled_cosine,
        _REL_ERROR: quality.rel_error,
    }
    gates = []
    for spec in chosen:
        given = getattr(tol, spec.flag)
        threshold = spec.default if given is None else float(given)
        value = values[spec]
        note = ""
        if value is None:
            note = "the data has no labels" if spec.needs_labels else "not measured"
        gates.append(
            Gate(
                name=spec.name,
                metric=spec.metric,
                value=value,
                threshold=threshold,
                comparison="<=" if spec.upper else ">=",
                passed=None if value is None else _holds(value, threshold, spec.upper),
                source="default" if given is None else "flag",
                flag=_flag(spec.flag),
                unit=spec.unit,
                kind=task.kind,
                note=note,
            )
        )
    return gates


def _holds(value: float, threshold: float, upper: bool) -> bool:
    """Written so that a NaN value fails."""
    return bool(value <= threshold) if upper else bool(value >= threshold)


def size_gates(bytes_before: int, bytes_after: int, max_bytes: int | None) -> list[Gate]:
    """The file must be smaller than the original's export; and no larger than ``--max-bytes``."""
    gates = [
        Gate(
            name="not smaller",
            metric="ONNX bytes of the compressed model, which must be below the original's",
            value=float(bytes_after),
            threshold=float(bytes_before),
            comparison="<",
            passed=bytes_after < bytes_before,
            source="default",
            flag=None,
            unit=" bytes",
        )
    ]
    if max_bytes is not None:
        gates.append(
            Gate(
                name="ONNX size",
                metric="ONNX bytes of the compressed model",
                value=float(bytes_after),
                threshold=float(max_bytes),
                comparison="<=",
                passed=bytes_after <= max_bytes,
                source="flag",
                flag="--max-bytes",
                unit=" bytes",
            )
        )
    return gates


def failures(gates: list[Gate]) -> list[str]:
    """One ``gate failed: …`` message per failed gate (a gate that did not run did not fail)."""
    return [f"gate failed: {g.message()}" for g in gates if g.passed is False]
