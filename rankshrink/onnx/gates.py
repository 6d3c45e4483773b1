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

The task kind is decided in :mod:`rankshrink.onnx.task` and the metrics are measured in
:mod:`rankshrink.onnx.quality`; this module decides the gates on them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from rankshrink.onnx.quality import Quality
from rankshrink.onnx.task import PLURAL, Task, Tolerances, cli_flag

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
            origin = f"default for {PLURAL.get(self.kind, 'this model')}"
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
                flag=cli_flag(spec.flag),
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
