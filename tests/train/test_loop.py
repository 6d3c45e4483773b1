"""The one training loop (rankshrink.train.loop): hook order, skipped steps, lr, the task loss."""

from __future__ import annotations

import math
from collections.abc import Collection

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rankshrink.errors import TrainingDivergedError
from rankshrink.train.finetune import fine_tune_plain
from rankshrink.train.loop import (
    MAX_BAD_STEPS,
    Hooks,
    LoopConfig,
    StepOutcome,
    task_loss,
    train_,
)


def _problem(seed: int = 0) -> tuple[nn.Sequential, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    x = torch.randn(40, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return model, x, y


class Recorder(Hooks):
    """Logs every call; the step in ``bad_steps`` gets a non-finite hand-added term."""

    def __init__(self, bad_steps: Collection[int] = ()) -> None:
        self.calls: list[str] = []
        self.lrs: list[float] = []
        self.bad_steps = bad_steps
        self.step = -1

    def start(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt
        self.calls.append("start")

    def before_step(self, step: int) -> None:
        self.step = step
        self.calls.append(f"before_step {step}")

    def extra_loss(self) -> Tensor | None:
        self.calls.append("extra_loss")
        return None

    def hand_loss(self) -> float:
        self.calls.append("hand_loss")
        return math.nan if self.step in self.bad_steps else 0.0

    def after_backward(self) -> None:
        self.calls.append("after_backward")

    def after_update(self) -> None:
        self.lrs.append(self.opt.param_groups[0]["lr"])
        self.calls.append("after_update")

    def end_step(self, s: StepOutcome) -> dict[str, float]:
        self.calls.append(f"end_step {s.step} {'ok' if s.finite else 'skipped'}")
        return super().end_step(s)


def test_hooks_are_called_in_order_and_a_skipped_step_gets_no_backward_or_update() -> None:
    model, x, y = _problem()
    hooks = Recorder(bad_steps={1})
    result = train_(model, x, y, None, LoopConfig(steps=3, batch_size=8), hooks)
    step = ["extra_loss", "hand_loss", "after_backward", "after_update"]
    assert hooks.calls == [
        "start",
        "before_step 0", *step, "end_step 0 ok",
        "before_step 1", "extra_loss", "hand_loss", "end_step 1 skipped",
        "before_step 2", *step, "end_step 2 ok",
    ]  # fmt: skip
    assert result.skipped_steps == 1
    assert [row["step"] for row in result.history] == [1, 3]  # every 10th step and the last
    # the skipped step halved the lr for the rest of the run
    assert hooks.lrs == [1e-3, 5e-4]
    assert not model.training


def test_cosine_decays_the_lr_to_zero_from_the_halved_lr_after_a_skipped_step() -> None:
    model, x, y = _problem()
    steps = 8
    hooks = Recorder(bad_steps={0})
    train_(model, x, y, None, LoopConfig(steps=steps, batch_size=8, lr=0.1, cosine=True), hooks)
    want = [0.05 * 0.5 * (1 + math.cos(math.pi * s / steps)) for s in range(1, steps)]
    assert hooks.lrs == pytest.approx(want, rel=1e-12)


def test_default_hooks_are_plain_fine_tuning_bit_for_bit() -> None:
    a, x, y = _problem()
    b, _, _ = _problem()
    teacher = torch.randn(40, 3)
    cfg = LoopConfig(steps=12, batch_size=16, lr=1e-2, seed=5)
    loop = train_(a, x, y, teacher, cfg)
    plain = fine_tune_plain(b, x, y, teacher, steps=12, lr=1e-2, batch=16, seed=5)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"{name} differs"
    assert loop.history == plain.history
    assert set(loop.history[0]) == {"step", "loss", "task_loss", "penalty"}


def test_endless_non_finite_steps_raise_with_the_hint_and_leave_weights_untouched() -> None:
    model, x, y = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = Recorder(bad_steps=set(range(100)))
    cfg = LoopConfig(steps=MAX_BAD_STEPS + 5, batch_size=8, diverged_hint="try --lr 1e-4")
    with pytest.raises(TrainingDivergedError) as info:
        train_(model, x, y, None, cfg, hooks)
    assert str(info.value) == (
        f"fine-tuning diverged: non-finite loss or gradients for {MAX_BAD_STEPS} steps in a row"
        f" (at step {MAX_BAD_STEPS - 1}); try --lr 1e-4"
    )
    assert "after_backward" not in hooks.calls
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although no step was finite"
    assert not model.training, "the model must be left in eval mode"


def test_a_non_finite_gradient_skips_the_step() -> None:
    model, x, y = _problem()

    class PoisonGrad(Hooks):
        def after_backward(self) -> None:
            model[0].weight.grad[0, 0] = math.inf

    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_(model, x, y, None, LoopConfig(steps=3, batch_size=8), PoisonGrad())
    assert result.skipped_steps == 3
    assert all(math.isfinite(row["loss"]) for row in result.history)  # the loss itself was fine
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_task_loss_is_cross_entropy_plus_scaled_distillation_or_mse_without_labels() -> None:
    torch.manual_seed(0)
    out, teacher = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    ce = F.cross_entropy(out, y)
    assert torch.equal(task_loss(out, y, None), ce)
    assert torch.equal(task_loss(out, y, teacher, distill=False), ce)
    t = 3.0
    p_teacher = F.softmax(teacher / t, dim=-1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(out / t, dim=-1))).sum(-1).mean()
    got = task_loss(out, y, teacher, temperature=t)
    assert torch.allclose(got, ce + kl * t * t, atol=1e-6)
    assert torch.equal(task_loss(out, None, teacher), F.mse_loss(out, teacher))
