"""The quality gates (rankshrink.onnx.gates) and verify's check that a file belongs to its model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rankshrink.errors import InputError
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.onnx.gates import Gate, failures, quality_gates, size_gates
from rankshrink.onnx.provenance import (
    ForeignFileError,
    check_belongs,
    stamp_provenance,
    weights_sha256,
)
from rankshrink.onnx.quality import Quality, measure
from rankshrink.onnx.task import (
    APPLIES,
    Task,
    Tolerances,
    ends_in_sigmoid,
    model_task,
    resolve_task,
)
from rankshrink.onnx.verify import verify_export, with_gates

# -- task kinds and flags -------------------------------------------------------------------------


def test_the_kind_follows_the_output_width_unless_task_says_otherwise() -> None:
    assert resolve_task(10, Tolerances(), has_labels=True).kind == "classifier"
    assert resolve_task(1, Tolerances(), has_labels=False).kind == "binary"
    assert resolve_task(32, Tolerances(), has_labels=False, hidden=True).kind == "hidden"
    assert resolve_task(3, Tolerances(task="regression"), has_labels=False).kind == "regression"
    assert resolve_task(1, Tolerances(task="regression"), has_labels=False).kind == "regression"
    sig = resolve_task(1, Tolerances(), has_labels=False, sigmoid=True)
    assert sig == Task("binary", 1, sigmoid=True)


@pytest.mark.parametrize(
    "outputs, tol, labels, hidden, message",
    [
        (1, Tolerances(task="classifier"), False, False, "--task classifier needs two or more"),
        (4, Tolerances(task="binary"), False, False, "--task binary needs one output column"),
        (32, Tolerances(task="binary"), False, True, "the model outputs hidden states"),
        (3, Tolerances(task="regression"), True, False, "--task regression takes label-free"),
        (10, Tolerances(min_cosine=0.9), True, False, "--min-cosine does not apply to a class"),
        (10, Tolerances(max_prob_diff=0.1), True, False, "--max-prob-diff does not apply"),
        (1, Tolerances(max_rel_error=0.1), False, False, "--max-rel-error does not apply"),
        (32, Tolerances(min_agreement=0.9), False, True, "does not apply to a hidden-state"),
        (3, Tolerances(task="regression", max_accuracy_drop=2), False, False, "regression model"),
        (10, Tolerances(min_agreement=1.5), True, False, "--min-agreement must be in [0, 1]"),
        (10, Tolerances(max_accuracy_drop=float("nan")), True, False, "must be in [-100, 100]"),
        (3, Tolerances(task="regression", max_rel_error=float("inf")), False, False, "finite"),
        (32, Tolerances(min_cosine=-2), False, True, "--min-cosine must be in [-1, 1]"),
        (10, Tolerances(task="ranking"), True, False, "--task must be one of auto"),
    ],
)
def test_flags_that_do_not_fit_the_model_are_one_line_of_bad_input(
    outputs: int, tol: Tolerances, labels: bool, hidden: bool, message: str
) -> None:
    with pytest.raises(InputError) as info:
        resolve_task(outputs, tol, labels, hidden=hidden)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_every_threshold_flag_applies_to_the_kinds_whose_gates_it_sets() -> None:
    for field, kinds in APPLIES.items():
        for kind, outputs in (("classifier", 4), ("binary", 1), ("regression", 2)):
            tol = Tolerances(**{field: 0.5}, task="auto" if kind != "regression" else kind)
            if kind in kinds:
                task = resolve_task(outputs, tol, has_labels=False)
                quality = Quality(0.0, 1.0, None, None, 0.0, 0.0, 1.0)
                gates = quality_gates(task, quality, tol, has_labels=kind != "regression")
                assert any(g.source == "flag" and g.threshold == 0.5 for g in gates), (field, kind)
            else:
                with pytest.raises(InputError, match="does not apply"):
                    resolve_task(outputs, tol, has_labels=False)


# -- classifier -----------------------------------------------------------------------------------

LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])


def _logits(classes: list[int]) -> np.ndarray:
    out = np.zeros((len(classes), 3), dtype=np.float32)
    out[np.arange(len(classes)), classes] = 5.0
    return out


def test_classifier_with_labels_gates_the_accuracy_drop_at_one_point() -> None:
    task = Task("classifier", 3)
    before = _logits(LABELS.tolist())  # 100 %
    after = _logits([0, 1, 2, 0, 1, 2, 0, 1, 2, 1])  # one of ten wrong: 90 %, a 10-point drop
    quality = measure(task, before, after, LABELS)
    assert quality.accuracy_before == 100.0 and quality.accuracy_after == 90.0
    assert quality.agreement == pytest.approx(0.9) and quality.max_abs_diff == 5.0
    (gate,) = quality_gates(task, quality, Tolerances(), has_labels=True)
    assert (gate.name, gate.value, gate.threshold) == ("accuracy drop", 10.0, 1.0)
    assert gate.comparison == "<="
    assert gate.passed is False and gate.source == "default" and gate.flag == "--max-accuracy-drop"
    assert failures([gate]) == [
        "gate failed: accuracy drop 10.00 points > 1 (default for classifiers;"
        " --max-accuracy-drop to change)"
    ]
    # the user's threshold replaces the default, and the record says so
    (flagged,) = quality_gates(task, quality, Tolerances(max_accuracy_drop=12), has_labels=True)
    assert flagged.passed is True and flagged.source == "flag" and flagged.threshold == 12
    assert flagged.message() == "accuracy drop 10.00 points ≤ 12 (--max-accuracy-drop)"
    # --min-agreement adds the agreement gate next to the default one
    both = quality_gates(task, quality, Tolerances(min_agreement=0.95), has_labels=True)
    assert [(g.name, g.source, g.passed) for g in both] == [
        ("accuracy drop", "default", False),
        ("top-1 agreement", "flag", False),
    ]


def test_classifier_without_labels_gates_agreement_and_skips_the_accuracy_gate() -> None:
    task = Task("classifier", 3)
    before = _logits([0, 1, 2] * 20)  # 60 samples
    after = before.copy()
    after[:2] = _logits([1, 2])  # 58 of 60 agree: 96.7 %
    quality = measure(task, before, after, None)
    gates = quality_gates(task, quality, Tolerances(), has_labels=False)
    assert [(g.name, g.passed) for g in gates] == [
        ("accuracy drop", None),
        ("top-1 agreement", True),
    ]
    assert gates[0].value is None and gates[0].note == "the data has no labels"
    assert gates[1].threshold == 0.95 and gates[1].value == pytest.approx(58 / 60)
    assert failures(gates) == []
    after[:4] = _logits([1, 2, 0, 2])  # 56 of 60: 93.3 % < 95 %
    gates = quality_gates(task, measure(task, before, after, None), Tolerances(), False)
    assert failures(gates) == [
        "gate failed: top-1 agreement 0.9333 < 0.95 (default for classifiers;"
        " --min-agreement to change)"
    ]


# -- binary: one sigmoid output ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sigmoid_mlp() -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """A ReLU MLP ending in nn.Sigmoid, trained with BCE on a linearly separable problem."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=gen)
    y = (x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5, -1.0]) > 0).float()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.binary_cross_entropy(model(x)[:, 0], y).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float(((model(x)[:, 0] > 0.5).float() == y).float().mean())
    assert accuracy > 0.95, accuracy
    return model, x, y.long()


@torch.no_grad()
def test_a_sigmoid_model_is_a_binary_classifier_gated_on_decisions_and_mean_dp(
    sigmoid_mlp: tuple[nn.Sequential, torch.Tensor, torch.Tensor],
) -> None:
    model, x, _ = sigmoid_mlp
    assert ends_in_sigmoid(model) and not ends_in_sigmoid(model[:3])
    task = model_task(model, x, Tolerances(), has_labels=False)
    assert task == Task("binary", 1, sigmoid=True)
    before = model(x).numpy()

    same = quality_gates(task, measure(task, before, before.copy(), None), Tolerances(), False)
    assert [(g.name, g.threshold, g.passed) for g in same] == [
        ("accuracy drop", 1.0, None),  # no labels
        ("decision agreement", 0.95, True),
        ("mean |Δp|", 0.05, True),
    ]

    # every probability pulled a third of the way towards 0.5: decisions all agree, but the
    # probabilities moved — the agreement alone would call this model unchanged
    shrunk = 0.5 + (before - 0.5) * (2 / 3)
    quality = measure(task, before, shrunk, None)
    assert quality.agreement == 1.0 and quality.mean_prob_diff > 0.05
    assert quality.max_abs_diff == pytest.approx(float(np.abs(before - shrunk).max()), rel=1e-5)
    gates = quality_gates(task, quality, Tolerances(), False)
    (failed,) = [g for g in gates if g.passed is False]
    assert failed.name == "mean |Δp|"
    assert failures(gates)[0].startswith("gate failed: mean |Δp| 0.")
    assert failures(gates)[0].endswith(
        "> 0.05 (default for binary classifiers; --max-prob-diff to change)"
    )
    relaxed = Tolerances(max_prob_diff=0.5)
    assert failures(quality_gates(task, quality, relaxed, False)) == []

    # the same net without its Sigmoid gives logits: p = sigmoid(out), the same decisions
    logits_task = model_task(model[:3], x, Tolerances(), has_labels=False)
    assert logits_task == Task("binary", 1, sigmoid=False)
    logits = model[:3](x).numpy()
    assert (logits < 0).any() and (logits > 1).any()
    flipped = logits.copy()
    flipped[:40] = -flipped[:40]  # 40 of 400 decisions flip: 90 % agreement
    quality = measure(logits_task, logits, flipped, None)
    assert quality.agreement == pytest.approx(0.9)
    gates = quality_gates(logits_task, quality, Tolerances(), False)
    assert [g.name for g in gates if g.passed is False] == ["decision agreement", "mean |Δp|"]


@torch.no_grad()
def test_a_binary_classifier_with_0_1_labels_gates_the_accuracy_drop(
    sigmoid_mlp: tuple[nn.Sequential, torch.Tensor, torch.Tensor],
) -> None:
    model, x, y = sigmoid_mlp
    task = model_task(model, x, Tolerances(), has_labels=True)
    before = model(x).numpy()
    after = before.copy()
    after[:20] = 1.0 - after[:20]  # 20 decisions flip: accuracy falls by about 5 points
    quality = measure(task, before, after, y)
    assert quality.accuracy_before > 95.0
    assert quality.accuracy_before - quality.accuracy_after >= 3.0
    gates = quality_gates(task, quality, Tolerances(), has_labels=True)
    # 5 % of the probabilities moved by nearly 1: a mean |Δp| just under 0.05, so only the
    # accuracy gate catches the flipped decisions
    assert [(g.name, g.passed) for g in gates] == [("accuracy drop", False), ("mean |Δp|", True)]
    assert 0.04 < quality.mean_prob_diff < 0.05


# -- hidden states and regression -----------------------------------------------------------------


def test_hidden_states_are_gated_on_the_pooled_cosine() -> None:
    task = resolve_task(32, Tolerances(), has_labels=False, hidden=True)
    low = quality_gates(task, Quality(0.4, pooled_cosine=0.97), Tolerances(), False)
    assert failures(low) == [
        "gate failed: pooled cosine 0.9700 < 0.98 (default for hidden-state models;"
        " --min-cosine to change)"
    ]
    (high,) = quality_gates(task, Quality(0.4, pooled_cosine=0.99), Tolerances(), False)
    assert high.passed and high.message() == "pooled cosine 0.9900 ≥ 0.98 (default)"
    flagged = quality_gates(
        task, Quality(0.4, pooled_cosine=0.97), Tolerances(min_cosine=0.9), False
    )
    assert flagged[0].passed and flagged[0].source == "flag"


def test_regression_outputs_are_gated_on_the_relative_error() -> None:
    task = resolve_task(2, Tolerances(task="regression"), has_labels=False)
    before = np.random.default_rng(0).normal(size=(50, 2)).astype(np.float32)
    small = before * 1.01  # relative error 0.01
    quality = measure(task, before, small, None)
    assert quality.rel_error == pytest.approx(0.01, rel=1e-4) and quality.agreement is None
    assert quality_gates(task, quality, Tolerances(), False)[0].passed is True
    large = before * 1.2
    gates = quality_gates(task, measure(task, before, large, None), Tolerances(), False)
    assert failures(gates) == [
        "gate failed: relative error 0.2000 > 0.05 (default for regression outputs;"
        " --max-rel-error to change)"
    ]
    nan = measure(task, before, before * np.float32("nan"), None)
    assert quality_gates(task, nan, Tolerances(), False)[0].passed is False  # NaN never passes


# -- size gates and the decision ------------------------------------------------------------------


def test_a_file_that_is_not_smaller_fails_a_gate() -> None:
    (gate,) = size_gates(108_270, 109_450, None)
    assert gate.passed is False and failures([gate]) == [
        "gate failed: not smaller: 108,270 → 109,450 bytes"
    ]
    assert size_gates(1000, 1000, None)[0].passed is False  # equal is not smaller
    smaller, cap = size_gates(1000, 900, 800)
    assert smaller.passed and smaller.message() == "smaller: 1,000 → 900 bytes"
    assert cap.passed is False and cap.source == "flag"
    assert failures([cap]) == ["gate failed: ONNX size 900 bytes > 800 bytes (--max-bytes)"]


def test_passed_means_every_check_and_every_gate_passed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(30, 8)
    path = tmp_path / "m.onnx"
    export_onnx(model, x[:4], path, ExportConfig())
    result = verify_export(model, model, path, x, None, Tolerances())
    assert result.passed and result.task == "classifier"
    assert [(g.name, g.passed) for g in result.gates] == [
        ("accuracy drop", None),
        ("top-1 agreement", True),
    ]
    grown = with_gates(result, size_gates(100, 120, None))
    assert not grown.passed and grown.failures == ["gate failed: not smaller: 100 → 120 bytes"]
    assert result.passed, "with_gates returns a new verification"
    # a fidelity failure alone fails it too: here the torch model is not the file's
    drifted = type(model)(*[nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)]).eval()
    unfaithful = verify_export(model, drifted, path, x, None, Tolerances())
    assert all(g.passed is not False for g in unfaithful.gates), "the file itself is fine"
    assert not unfaithful.passed
    assert unfaithful.failures[0].startswith("export max abs diff"), unfaithful.failures
    assert Gate(**result.gates[1].as_dict()) == result.gates[1]


# -- verify: the file belongs to the model --------------------------------------------------------


def _mlp(features: int, outputs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, outputs)).eval()


def test_a_file_with_other_widths_does_not_belong(tmp_path: Path) -> None:
    model, x = _mlp(8, 3, 0), torch.randn(20, 8)
    wide, narrow_out = tmp_path / "wide.onnx", tmp_path / "out.onnx"
    export_onnx(_mlp(12, 3, 1), torch.randn(4, 12), wide, ExportConfig())
    export_onnx(_mlp(8, 5, 1), x[:4], narrow_out, ExportConfig())
    with pytest.raises(ForeignFileError) as info:
        verify_export(model, None, wide, x, None, Tolerances())
    assert str(info.value) == (
        f"{wide} does not belong to this model: it takes 12 input features, the model takes 8"
    )
    with pytest.raises(ForeignFileError, match="it outputs 5 values, the model outputs 3"):
        check_belongs(narrow_out, model, (8,), (3,))
    assert ForeignFileError.exit_code == 3


def test_a_stamped_file_of_other_weights_does_not_belong_even_with_the_same_widths(
    tmp_path: Path,
) -> None:
    original, other, x = _mlp(8, 3, 0), _mlp(8, 3, 1), torch.randn(20, 8)
    path = tmp_path / "c.onnx"
    export_onnx(original, x[:4], path, ExportConfig())
    plain = path.stat().st_size
    assert stamp_provenance(path, original, original) == path.stat().st_size > plain
    assert verify_export(original, None, path, x, None, Tolerances()).passed
    with pytest.raises(ForeignFileError, match="it was compressed from other weights"):
        verify_export(other, None, path, x, None, Tolerances())
    # the fingerprint is of the weights, not of a file: a copy of the model has the same one
    copy = _mlp(8, 3, 0)
    assert weights_sha256(copy) == weights_sha256(original) != weights_sha256(other)
    assert verify_export(copy, None, path, x, None, Tolerances()).passed


def test_an_unstamped_file_of_another_model_fails_the_quality_gates(tmp_path: Path) -> None:
    original, other, x = _mlp(8, 3, 0), _mlp(8, 3, 1), torch.randn(200, 8)
    path = tmp_path / "other.onnx"
    export_onnx(other, x[:4], path, ExportConfig())  # no provenance: judged by its numbers
    result = verify_export(original, None, path, x, None, Tolerances())
    assert not result.passed
    assert [g.name for g in result.gates if g.passed is False] == ["top-1 agreement"]
