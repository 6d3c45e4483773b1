"""Plain fine-tuning: task loss (+ an optional penalty), Adam, no fusion.

The recovery phase of the low-rank methods and the training/refit phases of layer sparsity
(SPEC §5). It is the loop of :mod:`rankshrink.train.loop` with two hooks (a penalty, a projection
after each update); its task loss is RaRe training's own (:func:`rankshrink.train.loop.task_loss`:
cross-entropy, plus distillation from the original when its outputs are given, or distillation
alone without labels), so the methods are compared on the same objective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from rankshrink.train.loop import MAX_BAD_STEPS, Hooks, LoopConfig, train_

__all__ = ["MAX_BAD_STEPS", "FineTuneReport", "fine_tune_plain"]


@dataclass
class FineTuneReport:
    """The outcome of :func:`fine_tune_plain`."""

    steps: int
    seconds: float  # wall time of the loop alone
    skipped_steps: int  # non-finite loss or gradients: no update
    history: list[dict[str, float]] = field(default_factory=list)  # every 10th step


class _PenaltyHooks(Hooks):
    """A penalty added to every step's loss, a callback after every update."""

    def __init__(
        self, penalty: Callable[[], Tensor] | None, after_step: Callable[[], None] | None
    ) -> None:
        self.penalty, self.after_step = penalty, after_step

    def extra_loss(self) -> Tensor | None:
        return None if self.penalty is None else self.penalty()

    def after_update(self) -> None:
        if self.after_step is not None:
            self.after_step()


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
    cfg = LoopConfig(steps, batch_size=batch, lr=lr, seed=seed, distill=distill, cosine=cosine)
    result = train_(model, x, y, teacher, cfg, _PenaltyHooks(penalty, after_step))
    return FineTuneReport(steps, result.seconds, result.skipped_steps, result.history)
