"""Plain fine-tuning: task loss (+ an optional penalty), Adam, no fusion.

The recovery phase of the low-rank methods and the training/refit phases of layer sparsity
(SPEC §5). The task loss is RaRe training's own (:func:`rankshrink.train.rare_loop._task_loss`:
cross-entropy, plus distillation from the original when its outputs are given, or distillation
alone without labels), so the methods are compared on the same objective.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rankshrink.errors import TrainingDivergedError
from rankshrink.train.rare_loop import TrainConfig, _task_loss

#: Non-finite steps in a row before giving up (each one halves the learning rate).
MAX_BAD_STEPS = 20


@dataclass
class FineTuneReport:
    """The outcome of :func:`fine_tune_plain`."""

    steps: int
    seconds: float  # wall time of the loop alone
    skipped_steps: int  # non-finite loss or gradients: no update
    history: list[dict[str, float]] = field(default_factory=list)  # every 10th step


def fine_tune_plain(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    teacher: Tensor | None,
    steps: int,
    lr: float = 1e-3,
    batch: int = 128,
    seed: int = 0,
    penalty: Callable[[], Tensor] | None = None,
    distill: bool = True,
    after_step: Callable[[], None] | None = None,
    cosine: bool = False,
) -> FineTuneReport:
    """Fine-tune every parameter of ``model`` in place for ``steps`` Adam steps.

    Args:
        model: left in eval mode afterwards (train mode during the loop, so dropout is active).
        x: training inputs ``(N, ...)``; y: class labels ``(N,)`` or ``None``.
        teacher: the original model's outputs on ``x`` (distillation targets) or ``None``.
        penalty: a term added to every step's loss (e.g. layer sparsity's group penalty, already
            weighted).
        distill: add distillation to the label loss when ``teacher`` is given.
        after_step: called after every optimizer update (e.g. to project weights).
        cosine: decay the learning rate from ``lr`` to 0 along a half cosine (the last steps then
            settle instead of ending on a full-size Adam step).

    Deterministic for a seed: batches come from a seeded generator and the model's randomness
    (dropout) from ``torch.manual_seed(seed)``.

    Raises:
        ValueError: neither labels nor teacher outputs are given.
        TrainingDivergedError: the loss or gradients stayed non-finite for ``MAX_BAD_STEPS`` steps.
    """
    if y is None and teacher is None:
        raise ValueError("fine-tuning needs labels, teacher outputs, or both")
    cfg = TrainConfig(steps=steps, batch_size=batch, lr=lr, distill=distill, seed=seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = x.shape[0]
    order, cursor = torch.randperm(n, generator=gen), 0
    skipped = bad_in_a_row = 0
    lr_scale = 1.0  # halved on every non-finite step
    history: list[dict[str, float]] = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        if cursor + batch > n:  # a fresh permutation each epoch; the tail is dropped
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch

        out = model(x[idx])
        task = _task_loss(
            out, None if y is None else y[idx], None if teacher is None else teacher[idx], cfg
        )
        extra = penalty() if penalty is not None else None
        loss = task if extra is None else task + extra

        opt.zero_grad(set_to_none=True)
        finite = math.isfinite(float(loss.detach()))
        if finite:
            loss.backward()
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            finite = bool(torch.isfinite(total))
        if finite:
            if cosine:
                for group in opt.param_groups:
                    group["lr"] = lr_scale * lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            opt.step()
            if after_step is not None:
                after_step()
            bad_in_a_row = 0
        else:  # never step on non-finite values; back off the learning rate instead
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
                    f" in a row (at step {step}); try a lower learning rate"
                )
        if step % 10 == 0 or step == steps - 1:
            history.append(
                {
                    "step": step + 1,
                    "loss": float(loss.detach()),
                    "task_loss": float(task.detach()),
                    "penalty": 0.0 if extra is None else float(extra.detach()),
                }
            )
    model.eval()
    return FineTuneReport(steps, time.perf_counter() - start, skipped, history)
