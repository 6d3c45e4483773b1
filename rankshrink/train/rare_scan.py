"""One step's RaRe scan: score the candidate pairs once, fuse what qualifies, build the RaRe term.

One scoring serves both the fusion test and the argmin pair of every RaRe axis (:func:`scan_`).
The term's gradient is added after ``backward`` in closed form (:class:`RareTerm`), touching only
the argmin pairs. :class:`rankshrink.train.rare_loop.RareHooks` runs the scan before every step.
"""

from __future__ import annotations

import math
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
from rankshrink.train.rare_config import TrainConfig


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


def scan_(
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
