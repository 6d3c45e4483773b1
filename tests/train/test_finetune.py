"""Plain fine-tuning (rankshrink.train.finetune): determinism, non-finite steps, the penalty hook."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankshrink.errors import TrainingDivergedError
from rankshrink.train.finetune import MAX_BAD_STEPS, fine_tune_plain


def _problem(seed: int = 0) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return model, x, y


def test_same_seed_gives_bit_identical_weights_and_the_loss_falls() -> None:
    runs = []
    for _ in range(2):
        model, x, y = _problem()
        report = fine_tune_plain(model, x, y, None, steps=60, lr=1e-2, batch=16, seed=3)
        runs.append(model.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), f"{key} differs between identical runs"
    first, last = report.history[0]["task_loss"], report.history[-1]["task_loss"]
    assert last < first, f"task loss did not fall: {first:.3f} -> {last:.3f}"
    assert not model.training, "the model must be left in eval mode"


def test_non_finite_steps_are_skipped_without_touching_the_weights() -> None:
    model, x, y = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = {"n": 0}

    def nan_on_odd_calls() -> torch.Tensor:
        calls["n"] += 1
        return torch.tensor(math.nan if calls["n"] % 2 else 0.0)

    report = fine_tune_plain(
        model, x, y, None, steps=10, lr=1e-2, batch=16, penalty=nan_on_odd_calls
    )
    assert report.skipped_steps == 5
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())

    model, x, y = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDivergedError, match="non-finite"):
        fine_tune_plain(
            model, x, y, None, steps=MAX_BAD_STEPS + 5, penalty=lambda: torch.tensor(math.inf)
        )
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although no step was finite"


def test_distillation_alone_needs_teacher_outputs() -> None:
    model, x, _ = _problem()
    with pytest.raises(ValueError, match="labels"):
        fine_tune_plain(model, x, None, None, steps=1)
    teacher = torch.randn(64, 3)
    report = fine_tune_plain(model, x, None, teacher, steps=5, batch=16)
    assert report.steps == 5 and report.skipped_steps == 0
