"""Fine-tuning with the RaRe loss and live fusion (SPEC §2–3).

One step: fuse the pairs that qualify after the previous update, add the RaRe term of each
fusable axis (its argmin pair only), the L2 term and the task loss, then one Adam update. A
:class:`ThresholdSchedule` optionally relaxes τ_cos/τ_euc while the model is above a target size
trajectory — the paper's thresholds fuse only a few vectors per hundred steps post hoc.

The loop itself (batches, task loss, Adam, non-finite steps) is
:func:`rankshrink.train.loop.train_`; this module supplies its hooks (:class:`RareHooks`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rankshrink.math.rare import (
    AxisVectors,
    PairCandidates,
    PairTerm,
    ScoredPairs,
)
from rankshrink.methods.fusion import fuse_, plan_fusions
from rankshrink.methods.surgery import FactorizedChain, fusable_axis, rare_axes
from rankshrink.nn.factorized import FactorizedLinear
from rankshrink.train.loop import Hooks, LoopConfig, StepOutcome, train_


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
    with _deterministic():
        return _fine_tune(chain, x, y, teacher, cfg, size_fn, progress)


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


def _fine_tune(
    chain: FactorizedChain,
    x: Tensor,
    y: Tensor | None,
    teacher: Tensor | None,
    cfg: TrainConfig,
    size_fn: Callable[[], int],
    progress: Callable[[StepStats], None] | None,
) -> TrainReport:
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
        self.rare, fused = _scan_(
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


@dataclass
class LayerRare:
    """The RaRe pairs of one layer: the argmin pair of each of its axes, with its gradient."""

    layer: FactorizedLinear
    c: Tensor  # W' = c · V at scoring time (detached)
    norm: Tensor  # ‖V‖_F at scoring time (detached)
    parts: list[tuple[str, PairTerm]] = field(default_factory=list)  # per RaRe axis


@dataclass
class RareTerm:
    """One step's RaRe term: its value and its gradient, added after ``backward``.

    The gradient of the ``min`` flows through the argmin pair only: a few rows or columns of ``W'``.
    Autograd would route it through an index-select whose backward allocates and adds a full-size
    matrix per axis — on a wide layer more than the rest of the step's overhead. The closed form
    (:func:`rankshrink.math.rare.rare_pair_grad`) touches only the pair, plus one in-place pass over
    ``V`` for the Frobenius normalization's projection.
    """

    value: float
    layers: list[LayerRare]
    scale: float  # 1 / (2c), applied to every part

    @torch.no_grad()
    def add_grad_(self, lam: float) -> None:
        """Add ``lam ·`` the gradient of :attr:`value` to the parameters' ``.grad``."""
        for entry in self.layers:
            _add_layer_grad_(entry, lam * self.scale)


def _add_layer_grad_(entry: LayerRare, factor: float) -> None:
    """Chain ``G = ∂T/∂W'`` (nonzero on a few rows/columns) through ``W' = s·V``, ``s = k·g/‖V‖``:
    ``∂T/∂V = s·(G − ⟨G,V⟩/‖V‖²·V)``, ``∂T/∂g = ⟨G,V⟩·k/‖V‖``, ``∂T/∂b' = G_b``."""
    layer = entry.layer
    V, bias, gain = layer.V, layer.bias, layer.gain  # nn.Module attribute reads are slow
    s = float(entry.c)
    dot = 0.0  # ⟨G, V⟩ from the pair rows/columns only
    grad_v = V.grad if V.grad is not None else torch.zeros_like(V)
    for axis, term in entry.parts:
        dot += term.w_dot / s * factor  # ⟨G_w, V_pair⟩ = ⟨G_w, W'_pair⟩ / s
        if axis == "rows":
            grad_v.index_add_(0, term.idx, term.grad_w, alpha=s * factor)
            if term.grad_b is not None and bias is not None:
                if bias.grad is None:
                    bias.grad = torch.zeros_like(bias)
                bias.grad.index_add_(0, term.idx, term.grad_b, alpha=factor)
        else:
            grad_v.index_add_(1, term.idx, term.grad_w.T, alpha=s * factor)
    # ⟨G, V⟩ is zero unless a rows axis has a bias (see PairTerm): skip the pass over V then
    if gain is not None and dot != 0.0:
        norm = float(entry.norm)
        grad_v.add_(V, alpha=-s * dot / (norm * norm))
        if gain.grad is None:
            gain.grad = torch.zeros_like(gain)
        gain.grad.add_(dot * float(layer.k) / norm)
    V.grad = grad_v


def _scan_(
    chain: FactorizedChain,
    cands: dict[tuple[int, str], PairCandidates],
    opt: torch.optim.Optimizer,
    step: int,
    tau_cos: float,
    tau_euc: float,
    cfg: TrainConfig,
) -> tuple[RareTerm | None, dict[str, int]]:
    """Score candidates, apply this step's fusions, and build the RaRe term.

    One scoring serves the fusion test and the argmin pair of every RaRe axis. The ``W'`` computed
    here is handed to the forward pass.

    Returns:
        ``1/(2c) Σ m'n' [RaRe(cols) + RaRe(rows)]`` with its gradient (``None`` when λ1 = 0),
        and ``{layer name: fusions}``.
    """
    value = 0.0
    entries: list[LayerRare] = []
    fused: dict[str, int] = {}
    c = 0
    for li, (layer, pol) in enumerate(zip(chain.layers, chain.policies, strict=True)):
        axes = rare_axes(pol)
        if not axes:
            c += math.prod(layer.reduced_shape)
            continue
        W, scale, norm = layer.weight_parts()  # in the graph: the forward pass reuses W
        scored = _score(W, layer, li, axes, cands, step)
        best = {ax: sp.best(cands[(li, ax)].positive_only) for ax, sp in scored.items()}
        axis = fusable_axis(layer, pol) if cfg.fusion and step > 0 else None
        # nothing can fuse unless the most parallel candidate passes τ_cos: skip the plan then
        if axis in scored and 1.0 - best[axis][0] < tau_cos:
            cand = cands[(li, axis)]
            size = layer.reduced_shape[0 if axis == "rows" else 1]
            limit = cfg.max_pairs_per_step or max(1, size // 64)
            plan = plan_fusions(
                scored[axis], axis, tau_cos, tau_euc,
                positive_only=cand.positive_only, max_pairs=limit,
            )  # fmt: skip
            if plan is not None:
                fuse_(layer, plan, opt, scale)
                keep = cand.remap(plan.drop, size)
                assert cand.pairs is not None
                W, scale, norm = layer.weight_parts()
                # the fused axis's surviving cosines are unchanged; the other axis lost or
                # rescaled entries in every vector and is scored again
                bias = None if layer.bias is None else layer.bias.detach()
                vectors = AxisVectors(W.detach(), bias, axis)
                survivors = scored[axis].subset(keep, cand.pairs, vectors)
                scored = _score(W, layer, li, [a for a in axes if a != axis], cands, None)
                if len(survivors.pairs):
                    scored[axis] = survivors
                best = {ax: sp.best(cands[(li, ax)].positive_only) for ax, sp in scored.items()}
                fused[pol.name] = len(plan)
        layer.use_weight_once(W)
        rows, cols = layer.reduced_shape
        c += rows * cols
        if cfg.lambda_rank > 0 and scored:
            entry = LayerRare(layer, scale.detach(), norm.detach())
            for ax, pairs in scored.items():
                term = pairs.rare_term(best[ax][1], float(rows * cols))
                value += term.value
                entry.parts.append((ax, term))
            entries.append(entry)
    if cfg.lambda_rank == 0:
        return None, fused
    return RareTerm(value / (2 * c), entries, 1.0 / (2 * c)), fused


def _score(
    W: Tensor,
    layer: FactorizedLinear,
    li: int,
    axes: list[str],
    cands: dict[tuple[int, str], PairCandidates],
    step: int | None,
) -> dict[str, ScoredPairs]:
    """Per axis with candidates: the candidate pairs scored on the current (detached) ``W'``.

    ``step=None`` re-scores the current candidates without ever running a full search.
    """
    bias = None if layer.bias is None else layer.bias.detach()
    scored: dict[str, ScoredPairs] = {}
    for axis in axes:
        vectors = AxisVectors(W.detach(), bias, axis)
        if len(vectors) < 2:
            continue
        cand = cands[(li, axis)]
        pairs = cand.pairs if step is None else cand.get(vectors, step)
        if pairs is None or pairs.numel() == 0:
            continue
        scored[axis] = vectors.score(pairs)
    return scored


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
