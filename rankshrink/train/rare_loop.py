"""Fine-tuning with the RaRe loss and live fusion (SPEC §2–3).

One step: fuse the pairs that qualify after the previous update, add the RaRe term of each
fusable axis (its argmin pair only), the L2 term and the task loss, then one Adam update. A
:class:`~rankshrink.train.rare_config.ThresholdSchedule` optionally relaxes τ_cos/τ_euc while the
model is above a target size trajectory — the paper's thresholds fuse only a few vectors per
hundred steps post hoc.

The loop itself (batches, task loss, Adam, non-finite steps) is
:func:`rankshrink.train.loop.train_`; this module supplies its hooks (:class:`RareHooks`).

The settings, stats and report live in :mod:`rankshrink.train.rare_config`; one step's scoring,
fusions and RaRe term in :mod:`rankshrink.train.rare_scan`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from rankshrink.math.rare import PairCandidates
from rankshrink.methods.surgery import FactorizedChain, rare_axes
from rankshrink.nn.factorized import FactorizedLinear
from rankshrink.train.loop import Hooks, LoopConfig, StepOutcome, train_
from rankshrink.train.rare_config import StepStats, ThresholdSchedule, TrainConfig, TrainReport
from rankshrink.train.rare_scan import RareTerm, scan_


def fine_tune_(
    chain: FactorizedChain,
    x: Tensor,
    y: Tensor | None,
    teacher: Tensor | None,
    cfg: TrainConfig,
    size_fn: Callable[[], int],
    progress: Callable[[StepStats], None] | None = None,
) -> TrainReport:
    """Fine-tune ``chain`` in place for ``cfg.steps`` steps.

    Args:
        chain: the factorized model and its fusion policies.
        x: training inputs (N, ...); y: class labels (N,) or ``None``.
        teacher: the original model's outputs on ``x`` (distillation targets) or ``None``.
        size_fn: the current export size (any unit); the target ratio is relative to its
            value before training.
        progress: called after every step.

    Raises:
        TrainingDivergedError: the loss or gradients stayed non-finite despite lowering the lr.
    """
    hooks = RareHooks(chain, cfg, size_fn, progress)
    loop_cfg = LoopConfig(
        cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=cfg.seed,
        distill=cfg.distill,
        temperature=cfg.distill_temperature,
        foreach=True,  # one fused kernel per op over all parameters
        diverged_hint="try a lower --lr or fewer --steps",
    )
    with _deterministic():
        result = train_(chain.model, x, y, teacher, loop_cfg, hooks)
    return TrainReport(
        cfg.steps,
        result.seconds,
        hooks.fusions,
        hooks.fusions_by_layer,
        result.skipped_steps,
        hooks.refresh,
        result.history,
    )


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels (the gradient of a gather with repeated indices otherwise sums in
    thread order), so that a seed reproduces a run bit for bit."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new uninitialized tensor with NaN, a memset per
    # allocation that only helps to catch reads of uninitialized memory, which no op here does;
    # it made the fusion scan's many small allocations ~50 % slower.
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        torch.utils.deterministic.fill_uninitialized_memory = previous_fill


class RareHooks(Hooks):
    """RaRe and live fusion as hooks of :func:`rankshrink.train.loop.train_`.

    Before each step, score the candidate pairs once and fuse what qualifies after the previous
    update (the paper fuses after every step); the same scoring gives the RaRe term. The loss is
    task + λ2·L2 in the graph, and λ1·RaRe's gradient is added after backward. After each step
    the threshold schedule sets τ for the next one and the progress callback hears of the step.
    """

    def __init__(
        self,
        chain: FactorizedChain,
        cfg: TrainConfig,
        size_fn: Callable[[], int],
        progress: Callable[[StepStats], None] | None,
    ) -> None:
        self.chain, self.cfg, self.size_fn, self.progress = chain, cfg, size_fn, progress
        self.schedule = ThresholdSchedule(cfg)
        self.refresh = cfg.search_refresh or _search_refresh(chain, cfg)
        # plain fine-tuning (no RaRe, no fusion) scores no pairs at all: benchmark (a)'s baseline
        self.scan = cfg.fusion or cfg.lambda_rank > 0
        self.cands = {
            (li, axis): PairCandidates(
                top=_top(layer, axis),
                refresh=self.refresh,
                positive_only=axis == "rows" and pol.positive_rows,
                groups=pol.row_groups if axis == "rows" else pol.col_groups,
            )
            for li, (layer, pol) in enumerate(zip(chain.layers, chain.policies, strict=True))
            for axis in (rare_axes(pol) if self.scan else [])
        }
        self.tau_cos, self.tau_euc = cfg.tau_cos, cfg.tau_euc
        self.fusions_by_layer = {pol.name: 0 for pol in chain.policies}
        self.fusions = 0
        self.size0, self.size_ratio = 1, 1.0
        self.rare: RareTerm | None = None  # this step's RaRe term

    def start(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt  # fusion shrinks the optimizer's state along with the parameters
        self.size0 = max(self.size_fn(), 1)

    def before_step(self, step: int) -> None:
        if not self.scan:
            return
        self.rare, fused = scan_(
            self.chain, self.cands, self.opt, step, self.tau_cos, self.tau_euc, self.cfg
        )
        if fused:
            for name, count in fused.items():
                self.fusions_by_layer[name] += count
                self.fusions += count
            self.size_ratio = self.size_fn() / self.size0
            _decay_dropout(self.chain)

    def extra_loss(self) -> Tensor:
        l2 = torch.stack([(layer.V * layer.V).sum() for layer in self.chain.layers]).mean()
        return self.cfg.lambda_l2 * l2

    def hand_loss(self) -> float:
        return 0.0 if self.rare is None else self.rare.value

    def after_backward(self) -> None:
        if self.rare is not None:
            self.rare.add_grad_(self.cfg.lambda_rank)

    def end_step(self, s: StepOutcome) -> dict[str, float]:
        cfg, rare = self.cfg, self.hand_loss()
        self.tau_cos, self.tau_euc = self.schedule.update(s.step, self.size_ratio)
        stats = StepStats(
            step=s.step + 1,
            steps=cfg.steps,
            loss=float(s.loss.detach()) + cfg.lambda_rank * rare if s.finite else float("nan"),
            task_loss=float(s.task.detach()),
            rare_loss=rare,
            core_params=sum(math.prod(layer.reduced_shape) for layer in self.chain.layers),
            size_ratio=self.size_ratio,
            fusions=self.fusions,
            tau_cos=self.tau_cos,
        )
        if self.progress is not None:
            self.progress(stats)
        return {
            "step": stats.step,
            "loss": stats.loss,
            "size_ratio": self.size_ratio,
            "fusions": self.fusions,
        }


def _decay_dropout(chain: FactorizedChain) -> None:
    """``rate = (n / n0) · rate0`` for the dropouts after a layer whose rows fused (eq. 14)."""
    for layer, pol in zip(chain.layers, chain.policies, strict=True):
        frac = layer.reduced_shape[0] / layer.out_features
        for drop, rate0 in zip(pol.dropouts, pol.dropout_rates, strict=True):
            drop.p = rate0 * frac


def _top(layer: FactorizedLinear, axis: str) -> int:
    """Candidates kept between full searches: enough for the argmin and a step's fusions."""
    count = layer.reduced_shape[0 if axis == "rows" else 1]
    return min(count * (count - 1) // 2, max(32, min(256, count // 4)))


def _search_refresh(chain: FactorizedChain, cfg: TrainConfig) -> int:
    """Steps between full pair searches so that they cost ~``search_budget`` of a step.

    Estimated from FLOPs, not timed, so that runs are deterministic: a training step is
    ~6·batch·Σmn, a full search on an axis of k vectors of length d is ~2·k²·d.
    """
    step_flops = 6 * cfg.batch_size * sum(l.in_features * l.out_features for l in chain.layers)
    search_flops = 0
    for layer, pol in zip(chain.layers, chain.policies, strict=True):
        m, n = layer.reduced_shape
        if pol.fuse_rows:
            search_flops += 2 * m * m * (n + 1)
        if pol.fuse_cols:
            search_flops += 2 * n * n * m
    if search_flops == 0:
        return 1
    return max(1, math.ceil(search_flops / (cfg.search_budget * step_flops)))
