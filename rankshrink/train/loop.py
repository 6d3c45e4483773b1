"""The one fine-tuning loop: seeded batches, the task loss, Adam, and non-finite steps skipped.

Every training phase runs it: RaRe with live fusion (:mod:`rankshrink.train.rare_loop`) and plain
fine-tuning with an optional penalty (:mod:`rankshrink.train.finetune`). What a phase adds comes in
through :class:`Hooks`; the methods of the base class do nothing, so ``Hooks()`` is plain
fine-tuning on the task loss. A seed reproduces a run: the model's randomness (dropout) comes from
``torch.manual_seed(seed)``, the batches from their own seeded generator.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rankshrink.errors import TrainingDivergedError

#: Non-finite steps in a row before giving up (each one halves the learning rate).
MAX_BAD_STEPS = 20


@dataclass
class LoopConfig:
    """What every phase sets; a phase's own settings live in its hooks."""

    steps: int
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    distill: bool = True  # add distillation from the teacher to the label loss
    temperature: float = 2.0  # of the distillation
    cosine: bool = False  # decay the lr from ``lr`` to 0 along a half cosine
    foreach: bool | None = None  # for Adam and the gradient-norm check; None: torch's default
    diverged_hint: str = "try a lower learning rate"  # ends the TrainingDivergedError message


@dataclass
class StepOutcome:
    """One step as :meth:`Hooks.end_step` sees it."""

    step: int  # 0-based
    loss: Tensor  # task + extra: what backward ran on
    task: Tensor
    extra: Tensor | None
    finite: bool  # False: no update (non-finite loss or gradients)


@dataclass
class LoopResult:
    """The outcome of :func:`train_`."""

    seconds: float  # wall time of the loop alone
    skipped_steps: int  # non-finite loss or gradients: no update
    history: list[dict[str, float]] = field(default_factory=list)  # end_step's row, every 10th


class Hooks:
    """What a phase adds to the loop, in the order the loop calls it. Every default is a no-op."""

    def start(self, opt: torch.optim.Optimizer) -> None:
        """Once, after seeding and before the first step (``opt`` is the loop's Adam)."""

    def before_step(self, step: int) -> None:
        """Before the batch is drawn (RaRe: score candidate pairs and fuse)."""

    def extra_loss(self) -> Tensor | None:
        """A term added to the task loss, after the forward pass (e.g. a weighted penalty)."""
        return None

    def hand_loss(self) -> float:
        """The value of a term whose gradient :meth:`after_backward` adds by hand, outside the
        graph (RaRe's); a non-finite value skips the step."""
        return 0.0

    def after_backward(self) -> None:
        """After ``loss.backward()``, before the gradients are checked for non-finite values."""

    def after_update(self) -> None:
        """After each optimizer update; not called on skipped steps (e.g. a projection)."""

    def end_step(self, s: StepOutcome) -> dict[str, float]:
        """After every step, skipped or not; returns the step's history row."""
        return {
            "step": s.step + 1,
            "loss": float(s.loss.detach()),
            "task_loss": float(s.task.detach()),
            "penalty": 0.0 if s.extra is None else float(s.extra.detach()),
        }


def task_loss(
    out: Tensor,
    y: Tensor | None,
    teacher: Tensor | None,
    distill: bool = True,
    temperature: float = 2.0,
) -> Tensor:
    """Cross-entropy on the labels, plus distillation from ``teacher`` when given and ``distill``;
    without labels, the mean squared error to ``teacher``."""
    if y is None:
        assert teacher is not None, "distillation needs teacher outputs when there are no labels"
        return F.mse_loss(out, teacher)
    loss = F.cross_entropy(out, y)
    if distill and teacher is not None:
        t = temperature
        soft = F.kl_div(
            F.log_softmax(out / t, dim=-1),
            F.log_softmax(teacher / t, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        loss = loss + soft * t * t
    return loss


def train_(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    teacher: Tensor | None,
    cfg: LoopConfig,
    hooks: Hooks | None = None,
) -> LoopResult:
    """Fine-tune every parameter of ``model`` in place for ``cfg.steps`` Adam steps.

    Args:
        model: in train mode during the loop (dropout active), left in eval mode.
        x: training inputs ``(N, ...)``; y: class labels ``(N,)`` or ``None``.
        teacher: the original model's outputs on ``x`` (distillation targets) or ``None``.
        hooks: what the phase adds (:class:`Hooks`); ``None``: the task loss alone.

    Raises:
        TrainingDivergedError: the loss or gradients stayed non-finite for ``MAX_BAD_STEPS``
            steps in a row (the model is left in eval mode).
    """
    hooks = hooks if hooks is not None else Hooks()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=cfg.foreach)
    hooks.start(opt)
    n, batch = x.shape[0], cfg.batch_size
    order, cursor = torch.randperm(n, generator=gen), 0
    skipped = bad_in_a_row = 0
    lr_scale = 1.0  # halved on every non-finite step
    history: list[dict[str, float]] = []
    model.train()
    start = time.perf_counter()
    for step in range(cfg.steps):
        hooks.before_step(step)

        if cursor + batch > n:  # a fresh permutation each epoch; the tail is dropped
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch

        out = model(x[idx])
        yb = None if y is None else y[idx]
        tb = None if teacher is None else teacher[idx]
        task = task_loss(out, yb, tb, cfg.distill, cfg.temperature)
        extra = hooks.extra_loss()
        loss = task if extra is None else task + extra

        # the update, never with non-finite values
        opt.zero_grad(set_to_none=True)
        finite = math.isfinite(float(loss.detach())) and math.isfinite(hooks.hand_loss())
        if finite:
            loss.backward()
            hooks.after_backward()
            # one norm over all gradients: non-finite iff any entry is
            total = nn.utils.clip_grad_norm_(model.parameters(), math.inf, foreach=cfg.foreach)
            finite = bool(torch.isfinite(total))
        if finite:
            if cfg.cosine:
                lr = lr_scale * cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
                for group in opt.param_groups:
                    group["lr"] = lr
            opt.step()
            hooks.after_update()
            bad_in_a_row = 0
        else:  # back off the learning rate instead
            skipped += 1
            bad_in_a_row += 1
            opt.zero_grad(set_to_none=True)
            lr_scale *= 0.5
            for group in opt.param_groups:
                group["lr"] *= 0.5
            if bad_in_a_row >= MAX_BAD_STEPS:
                model.eval()
                raise TrainingDivergedError(
                    f"fine-tuning diverged: non-finite loss or gradients for {MAX_BAD_STEPS} steps"
                    f" in a row (at step {step}); {cfg.diverged_hint}"
                )

        row = hooks.end_step(StepOutcome(step, loss, task, extra, finite))
        if step % 10 == 0 or step == cfg.steps - 1:
            history.append(row)
    seconds = time.perf_counter() - start
    model.eval()
    return LoopResult(seconds, skipped, history)
