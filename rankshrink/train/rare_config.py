"""What RaRe fine-tuning takes and gives back: its settings, per-step stats, report and τ schedule.

:class:`TrainConfig` holds the paper's defaults (λ1, λ2, τ, Adam lr) and this package's own
(distillation, the target size ratio, the search budget). :class:`ThresholdSchedule` turns the
target into thresholds step by step: it relaxes τ_cos/τ_euc while the model is above a target
size trajectory, since the paper's thresholds fuse only a few vectors per hundred steps post hoc.
The loop that uses them is :mod:`rankshrink.train.rare_loop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Fine-tuning settings. Defaults are the paper's where it has one (λ1, λ2, τ, Adam lr)."""

    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    lambda_rank: float = 20.0
    lambda_l2: float = 0.1
    tau_cos: float = 1e-4
    tau_euc: float = 0.1
    fusion: bool = True
    distill: bool = True  # add distillation from the original to the label loss
    distill_temperature: float = 2.0
    target_ratio: float | None = 0.6  # export-size ratio the schedule aims for; None: fixed τ
    ramp_fraction: float = 0.6  # reach the target by this fraction of the steps
    max_pairs_per_step: int | None = None  # per layer; None: max(1, axis length // 64)
    search_budget: float = 0.05  # amortized cost of full pair searches, as a fraction of a step
    search_refresh: int | None = None  # full search every N steps; None: from search_budget
    seed: int = 0


@dataclass
class StepStats:
    """What the progress callback receives after every step."""

    step: int
    steps: int
    loss: float
    task_loss: float
    rare_loss: float
    core_params: int
    size_ratio: float
    fusions: int
    tau_cos: float


@dataclass
class TrainReport:
    """The outcome of :func:`fine_tune_`."""

    steps: int
    seconds: float
    fusions: int
    fusions_by_layer: dict[str, int]
    skipped_steps: int
    search_refresh: int
    history: list[dict[str, float]] = field(default_factory=list)


class ThresholdSchedule:
    """Relax τ_cos (and τ_euc ∝ √τ_cos) while above the target trajectory, tighten when below.

    The trajectory falls linearly from 1 to ``target`` over the first ``ramp_fraction`` of the
    steps; afterwards the thresholds return to the paper's values and training recovers accuracy.
    """

    GROWTH = 1.15
    MAX_TAU_COS = 0.5

    def __init__(self, cfg: TrainConfig) -> None:
        self.base_cos, self.base_euc = cfg.tau_cos, cfg.tau_euc
        self.target = cfg.target_ratio
        self.ramp_steps = max(1, int(cfg.ramp_fraction * cfg.steps))
        self.mult = 1.0

    def goal(self, step: int) -> float:
        if self.target is None:
            return 1.0
        return 1.0 - (1.0 - self.target) * min(1.0, (step + 1) / self.ramp_steps)

    def update(self, step: int, size_ratio: float) -> tuple[float, float]:
        """The thresholds for the next fusion pass."""
        if self.target is not None and step < self.ramp_steps and size_ratio > self.goal(step):
            self.mult = min(self.mult * self.GROWTH, self.MAX_TAU_COS / self.base_cos)
        else:
            self.mult = max(1.0, self.mult / self.GROWTH)
        return self.base_cos * self.mult, self.base_euc * math.sqrt(self.mult)
