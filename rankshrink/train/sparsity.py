"""Layer sparsity's training procedure: penalized fine-tuning, clamping, merging, refit.

The method's pieces (which layers the penalty is on, the penalty, the clamp test, the merge) are
in :mod:`rankshrink.methods.layer_sparsity`; this module runs them around the fine-tuning loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from rankshrink.methods.layer_sparsity import (
    LayerSparsityConfig,
    Merge,
    as_chain,
    collapse,
    find_identity_layers_,
    negative_part_penalty,
    penalized_layers,
)
from rankshrink.models.arch import count_params
from rankshrink.train.finetune import FineTuneReport, fine_tune_plain


@dataclass
class LayerSparsityReport:
    """What :func:`layer_sparsity` did."""

    penalized: list[str]  # chain indices of the layers the penalty was on
    identity: list[str]  # of those, the ones clamped non-negative (their ReLU is the identity)
    merges: list[Merge]
    clamp_change: float  # relative output change the accepted clamps caused on the data
    params_before: int
    params_after: int
    train: FineTuneReport
    refit: FineTuneReport | None


def layer_sparsity(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    teacher: Tensor | None,
    cfg: LayerSparsityConfig,
    progress: Callable[[str], None] | None = None,
) -> tuple[nn.Sequential, LayerSparsityReport]:
    """Penalized fine-tuning, clamping, merging and refitting; ``model`` itself is not changed.

    Args:
        model: a ReLU MLP (anything :func:`rankshrink.chain.prepare_chain` accepts).
        x, y: training inputs and labels (``y`` may be ``None``); also the data the clamps are
            checked on. teacher: the original model's outputs on ``x`` (distillation) or ``None``.
        cfg: the settings.
        progress: called with a short phase name ("penalty", "merge", "refit").

    Returns:
        The compressed flat ``nn.Sequential`` (eval mode) and the report.

    Raises:
        UnsupportedModelError: the model has no layer the method applies to (before training).
        TrainingDivergedError: fine-tuning stayed non-finite.
    """
    chain = as_chain(model)
    indices = penalized_layers(chain, cfg.input_nonnegative)
    params_before = count_params(chain)

    if progress:
        progress("penalty")
    train = fine_tune_plain(
        chain, x, y, teacher, cfg.steps, cfg.lr, cfg.batch, cfg.seed,
        penalty=lambda: cfg.lam * negative_part_penalty(chain, indices),
    )  # fmt: skip

    if progress:
        progress("merge")
    identity, change = find_identity_layers_(chain, indices, x, cfg.max_change)
    merged, merges = collapse(chain, identity)

    refit = None
    if cfg.refit_steps > 0:
        if progress:
            progress("refit")
        refit = fine_tune_plain(
            merged, x, y, teacher, cfg.refit_steps, cfg.lr, cfg.batch, cfg.seed + 1
        )
    report = LayerSparsityReport(
        penalized=[str(i) for i in indices],
        identity=[str(i) for i in identity],
        merges=merges,
        clamp_change=change,
        params_before=params_before,
        params_after=count_params(merged),
        train=train,
        refit=refit,
    )
    return merged, report
