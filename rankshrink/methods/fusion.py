"""Live fusion (SPEC §3): find near-parallel pairs, then merge them exactly into P/Q.

:func:`plan_fusions` is pure: it returns a :class:`FusionPlan`. :func:`fuse_` applies a plan and is the
only function that mutates W', b', P, Q — and the optimizer's moments — together.

For a pair (i, j) with j the shorter vector, ``r = a_i·a_j / ‖a_j‖²`` (least squares, a_i ≈ r·a_j) and
``s = √(r² + 1)``: the kept vector becomes ``s·a_j``, the map entries that pointed at i point at j
with scale ×r/s, those at j keep scale ×1/s. When ``a_i = r·a_j`` exactly, the function is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rankshrink.math.rare import ScoredPairs
from rankshrink.nn.factorized import FactorizedLinear

_EPS = 1e-12


@dataclass(frozen=True)
class FusionPlan:
    """Disjoint pairs to fuse on one axis of one layer: ``drop[t]`` merges into ``keep[t]``."""

    axis: str  # "rows" | "cols"
    drop: Tensor  # (T,) int64
    keep: Tensor  # (T,) int64
    ratio: Tensor  # (T,) r with a_drop ≈ r · a_keep

    def __len__(self) -> int:
        return int(self.drop.numel())


def euclidean_gap(sq_keep: float, abs_gap: float) -> float:
    """``D_euc = ‖a_i·‖a_j‖/‖a_i‖ − sign(cos)·a_j‖`` (paper eq. 9) from the Gram entries.

    Both vectors inside the norm have length ‖a_j‖, so ``D_euc² = 2‖a_j‖²(1 − |cos|)``: no vector
    needs to be read. ``sq_keep`` is ‖a_j‖², ``abs_gap`` is ``1 − |cos|``. From float32 Gram
    entries this resolves ``D_euc`` down to ~1e-3·‖a_j‖, far below the thresholds in use
    (τ_euc = 0.1).
    """
    return math.sqrt(max(2.0 * sq_keep * abs_gap, 0.0))


def plan_fusions(
    scored: ScoredPairs,
    axis: str,
    tau_cos: float,
    tau_euc: float,
    positive_only: bool = False,
    max_pairs: int | None = None,
) -> FusionPlan | None:
    """Choose disjoint qualifying pairs, most parallel first.

    Args:
        scored: candidate pairs with their Gram entries (:meth:`AxisVectors.score`).
        axis: ``"rows"`` or ``"cols"`` (recorded in the plan).
        tau_cos: a pair qualifies when ``1 − |cos| < tau_cos`` ...
        tau_euc: ... and ``D_euc < tau_euc``.
        positive_only: only positively parallel pairs qualify (rows before a ReLU: an
            anti-parallel pair would need two features after folding, so fusing it saves nothing).
        max_pairs: at most this many pairs (``None``: no limit).

    Returns:
        The plan, or ``None`` when nothing qualifies.
    """
    cos = scored.cos
    if cos.numel() == 0:
        return None
    gap = 1.0 - (cos if positive_only else cos.abs())
    ok = gap < tau_cos
    if positive_only:
        ok &= cos > 0
    idx = torch.nonzero(ok).flatten()
    if idx.numel() == 0:
        return None
    # The qualifying pairs are few; a handful of scalars each is cheaper in Python than a
    # dozen tensor ops (this runs for every fusable axis at every step).
    rows = torch.stack([gap[idx], scored.sq[idx, 0], scored.sq[idx, 1], scored.dot[idx]], 1)
    pairs = scored.pairs[idx].tolist()
    limit = max_pairs if max_pairs is not None else len(pairs)
    used: set[int] = set()
    drop: list[int] = []
    keep: list[int] = []
    ratio: list[float] = []
    for (g, sq_a, sq_b, dot), (a, b) in sorted(
        zip(rows.tolist(), pairs, strict=True), key=lambda t: t[0][0]
    ):
        if len(drop) >= limit:
            break
        k, d, sq_keep = (a, b, sq_a) if sq_a < sq_b else (b, a, sq_b)
        if euclidean_gap(sq_keep, g) >= tau_euc or d in used or k in used:
            continue
        used.update((d, k))
        drop.append(d)
        keep.append(k)
        ratio.append(dot / max(sq_keep, _EPS))
    if not drop:
        return None
    return FusionPlan(
        axis, torch.tensor(drop), torch.tensor(keep), torch.tensor(ratio, dtype=cos.dtype)
    )


@torch.no_grad()
def fuse_(
    layer: FactorizedLinear,
    plan: FusionPlan,
    optimizer: torch.optim.Optimizer | None,
    scale: Tensor | None = None,
) -> None:
    """Apply ``plan`` to ``layer`` in place; keep Adam's moments of the surviving entries.

    The effective weight after the call is exactly the fused one: with Frobenius normalization the
    gain is re-set so that ``k · V / ‖V‖ · g`` equals it (SPEC §2). ``scale`` is the layer's
    current ``c`` of ``W' = c · V`` when the caller has it already.
    """
    c = layer.scale_factor() if scale is None else scale.detach()
    s = torch.sqrt(plan.ratio * plan.ratio + 1.0)
    dim = 0 if plan.axis == "rows" else 1
    alive = torch.ones(layer.V.shape[dim], dtype=torch.bool)
    alive[plan.drop] = False
    survivors = torch.nonzero(alive).flatten()
    kept = (torch.cumsum(alive.long(), 0) - 1)[plan.keep]  # plan.keep renumbered
    # W' = c·V is scaled per vector only, so V can be edited in place of W' (one copy of the
    # matrix instead of several: on a wide layer fusion runs most steps of the ramp)
    V_new = layer.V.detach().index_select(dim, survivors)
    b = layer.bias_or_zeros().detach()
    if plan.axis == "rows":
        V_new[kept] *= s[:, None]
        b = b.index_select(0, survivors)
        b[kept] *= s
        layer.set_maps(layer.P.fuse(plan.drop, plan.keep, plan.ratio / s, 1.0 / s), layer.Q)
    else:
        V_new[:, kept] *= s
        layer.set_maps(layer.P, layer.Q.fuse(plan.drop, plan.keep, plan.ratio / s, 1.0 / s))

    _replace_(layer, "V", V_new, optimizer, survivors, dim)
    if layer.bias is not None:
        _replace_(layer, "bias", b, optimizer, survivors if plan.axis == "rows" else None, 0)
    if layer.gain is not None:
        layer.gain.data = (c * V_new.norm() / layer.k).reshape(())


def _replace_(
    layer: FactorizedLinear,
    name: str,
    value: Tensor,
    optimizer: torch.optim.Optimizer | None,
    keep: Tensor | None,
    dim: int,
) -> None:
    """Swap a parameter for a new one holding ``value``; carry its optimizer state across.

    ``keep`` lists the surviving indices along ``dim`` (``None``: the shape did not change).

    A new ``Parameter`` is needed because autograd caches a leaf's shape in its gradient
    accumulator: changing ``.data`` to another shape breaks the next backward pass.
    """
    old: torch.nn.Parameter = getattr(layer, name)
    new = torch.nn.Parameter(value.contiguous())
    setattr(layer, name, new)
    if optimizer is None:
        return
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    for key, moment in list(state.items()):
        if keep is not None and isinstance(moment, Tensor) and moment.dim() > dim:
            state[key] = moment.index_select(dim, keep).contiguous()
    optimizer.state[new] = state
