"""Low-rank model surgery: swap ``nn.Linear`` layers for two-factor :class:`LowRankLinear` ones.

Two steps, as in torchao's quantize API: :func:`plan_low_rank` reads the weights and decides a rank
per layer (a pure function of the model and a :class:`LowRankConfig`); :func:`low_rank_` applies
that plan in place and returns a per-layer account. Layers are addressed by their
``named_modules`` name, so the same code serves a flat MLP (``"3"``) and the Transformer
(``"layers.0.attn.q"``).

Methods (SPEC §5):

- ``"svd"`` — truncated SVD, the baseline: either one fixed ``rank`` for every layer, or a global
  ``budget`` (a fraction of the selected layers' parameters) spread at a common spectral-energy
  fraction (:func:`rankshrink.math.lowrank.energy_ranks`): every layer keeps the same share of its
  ``Σ s²``, which equalises the layers' relative approximation error instead of their rank.
- ``"rmt-svd"`` — per layer, drop the singular values inside the Marchenko–Pastur bulk
  (:func:`rankshrink.math.lowrank.mp_fit`); no budget, the spectrum decides — but never more than half
  of the layer's spectral energy (``min_energy``, see :class:`LowRankConfig`).

Layers with ``min(m, n) < min_dim`` (16: a classifier head, a token embedding) are left alone by
both methods. On the sample Transformer the energy rule cut its 64×8 token embedding to rank 5
and its 10×64 head to rank 6 for a few hundred weights, and accuracy right after truncation fell
to 38 %. A layer is factored only when the two factors hold fewer weights than the dense matrix
(``k(m+n) < mn``). Otherwise ``"svd"`` leaves it untouched and ``"rmt-svd"`` (with
``denoise_dense``) keeps it dense but replaces ``W`` by its bulk-free rank-``k`` approximation —
the paper's denoising, at no change in size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from rankshrink.errors import InputError
from rankshrink.math.lowrank import (
    MPFit,
    energy_rank,
    energy_ranks,
    mp_fit_svals,
    split_is_smaller,
    truncated_svd,
)
from rankshrink.nn.lowrank_linear import LowRankLinear

METHODS = ("svd", "rmt-svd")


@dataclass(frozen=True)
class LowRankConfig:
    """How :func:`plan_low_rank` chooses ranks."""

    method: Literal["svd", "rmt-svd"] = "svd"
    # svd: keep this fraction of the selected layers' parameters (weights + biases) ...
    budget: float | None = 0.5
    # ... or give every layer this rank (capped at min(m, n)); overrides budget
    rank: int | None = None
    # rmt-svd: the central probability range that fits σ², and Tracy–Widom units above the edge
    quantiles: tuple[float, float] = (0.25, 0.75)
    tw_margin: float = 0.0
    # layers with min(m, n) below this (a classifier head, a token embedding) are left alone:
    # splitting them saves little and drops whole input/output directions, and the MP fit would
    # rest on too few eigenvalues (the central half of 8 values is 4 points)
    min_dim: int = 16
    # rmt-svd: a layer whose split is not smaller keeps a dense W with its bulk removed
    denoise_dense: bool = True
    min_rank: int = 1  # no layer goes below this rank (rank 0 would cut the network)
    # rmt-svd: keep at least this fraction of each layer's spectral energy Σ s², i.e. a relative
    # truncation error ‖W − W_k‖²_F/‖W‖²_F ≤ 1 − min_energy (0: the bare MP edge). The MP edge
    # says which directions are indistinguishable from i.i.d. noise, not whether the rest of the
    # network relies on them: a layer whose bulk holds most of its energy is still mostly its
    # random initialisation, and its neighbours were trained on exactly that "noise". 0.5 is the
    # break-even point — what is removed is never larger than what is kept. (The sample MLP's
    # MP ranks already keep 55–73 % of their layers' energy, so this changes nothing there; in
    # the sample Transformer the bare edge kept 13–26 % of the attention value/output
    # projections' energy and lost 3.3 points.)
    min_energy: float = 0.5


@dataclass(frozen=True)
class LayerRank:
    """One layer's entry in a plan."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features) of the original
    rank: int  # the rank its weight will have (min(m, n) when kept)
    kind: str  # "factored" | "truncated" (dense, rank-reduced) | "kept"
    mp: MPFit | None = None  # rmt-svd only


@dataclass(frozen=True)
class LowRankLayer:
    """One layer's account after :func:`low_rank_`."""

    name: str
    shape: tuple[int, int]
    rank: int
    kind: str
    params_before: int
    params_after: int
    sigma2: float | None = None
    bulk_fraction: float | None = None
    mp_rank: int | None = None  # rmt-svd: singular values above the MP edge (before any floor)


def linear_names(model: nn.Module) -> list[str]:
    """The ``named_modules`` names of every ``nn.Linear`` in ``model``, in registration order."""
    return [name for name, mod in model.named_modules() if type(mod) is nn.Linear]


def plan_low_rank(
    model: nn.Module, cfg: LowRankConfig, names: list[str] | None = None
) -> list[LayerRank]:
    """Decide each selected layer's rank and form without changing ``model``.

    Args:
        model: any module; its ``nn.Linear`` layers are the candidates.
        cfg: the method and its settings.
        names: the layers to consider (default: every ``nn.Linear``).

    Raises:
        InputError: an unknown method or layer name, a setting out of range, or a budget below
            what rank ``cfg.min_rank`` in every layer needs.
    """
    if cfg.method not in METHODS:
        raise InputError(f"low-rank method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    layers = _select(model, names)
    shapes = [(int(l.out_features), int(l.in_features)) for _, l in layers]
    svals = [torch.linalg.svdvals(l.weight.detach().double()) for _, l in layers]
    if cfg.method == "rmt-svd":
        if not 0 <= cfg.min_energy < 1:
            raise InputError(f"min_energy must be a fraction in [0, 1), got {cfg.min_energy}")
        return [
            _mp_entry(name, shape, s, cfg)
            for (name, _), shape, s in zip(layers, shapes, svals, strict=True)
        ]
    thin = [min(shape) < cfg.min_dim for shape in shapes]
    if cfg.rank is not None:
        if cfg.rank < 1:
            raise InputError(f"rank must be a positive integer, got {cfg.rank}")
        ranks: list[int | None] = [
            None if t or not split_is_smaller(m, n, min(cfg.rank, m, n)) else min(cfg.rank, m, n)
            for t, (m, n) in zip(thin, shapes, strict=True)
        ]
    else:
        if cfg.budget is None or not 0 < cfg.budget <= 1:
            raise InputError(f"budget must be a fraction in (0, 1], got {cfg.budget}")
        total = sum(m * n + _bias_count(l) for (m, n), (_, l) in zip(shapes, layers, strict=True))
        # biases and thin layers stay whatever the ranks: the rest of the budget is for the others
        fixed = sum(_bias_count(l) for _, l in layers)
        fixed += sum(m * n for t, (m, n) in zip(thin, shapes, strict=True) if t)
        wide = [i for i, t in enumerate(thin) if not t]
        left = int(cfg.budget * total) - fixed
        if not wide or left <= 0:
            raise InputError(
                f"svd budget {cfg.budget:g}: the layers thinner than {cfg.min_dim} (never"
                f" truncated) and the biases already hold {fixed:,} of the {total:,} weights,"
                f" leaving {max(left, 0):,} for the {len(wide)} others; give a larger --budget"
                " or --rank"
            )
        try:
            chosen = energy_ranks(
                [svals[i] for i in wide],
                [shapes[i] for i in wide],
                left,
                cfg.min_rank,
            )
        except ValueError as exc:
            raise InputError(f"svd budget {cfg.budget:g}: {exc}") from None
        ranks = [None] * len(layers)
        for i, k in zip(wide, chosen, strict=True):
            ranks[i] = k
    return [
        LayerRank(name, shape, min(shape) if k is None else k, "kept" if k is None else "factored")
        for (name, _), shape, k in zip(layers, shapes, ranks, strict=True)
    ]


def _mp_entry(name: str, shape: tuple[int, int], s: Tensor, cfg: LowRankConfig) -> LayerRank:
    m, n = shape
    if min(m, n) < cfg.min_dim:
        return LayerRank(name, shape, min(m, n), "kept")
    fit = mp_fit_svals(s, shape, cfg.quantiles, cfg.tw_margin)
    k = min(max(fit.rank, cfg.min_rank, energy_rank(s, cfg.min_energy)), min(m, n))
    if split_is_smaller(m, n, k):
        return LayerRank(name, shape, k, "factored", fit)
    if cfg.denoise_dense and k < min(m, n):
        return LayerRank(name, shape, k, "truncated", fit)
    return LayerRank(name, shape, min(m, n), "kept", fit)


def low_rank_(model: nn.Module, plan: list[LayerRank]) -> list[LowRankLayer]:
    """Apply ``plan`` to ``model`` in place; return one account per planned layer.

    Every name and shape is checked before the first layer changes, so a bad plan leaves the
    model as it was.

    Raises:
        InputError: a planned layer is missing or no longer matches the plan's shape.
    """
    targets = []
    for entry in plan:
        linear = _get_linear(model, entry.name)
        shape = (linear.out_features, linear.in_features)
        if shape != entry.shape:
            raise InputError(f"layer {entry.name!r} is {shape}, the plan expected {entry.shape}")
        targets.append((entry, linear))
    report = []
    for entry, linear in targets:
        before = sum(p.numel() for p in linear.parameters())
        if entry.kind == "factored":
            new: nn.Module = LowRankLinear.from_linear(linear, entry.rank)
            _set_module(model, entry.name, new)
        elif entry.kind == "truncated":
            with torch.no_grad():
                A, B = truncated_svd(linear.weight, entry.rank)
                linear.weight.copy_(A @ B)
            new = linear
        else:
            new = linear
        report.append(
            LowRankLayer(
                name=entry.name,
                shape=entry.shape,
                rank=entry.rank,
                kind=entry.kind,
                params_before=before,
                params_after=sum(p.numel() for p in new.parameters()),
                sigma2=None if entry.mp is None else entry.mp.sigma2,
                bulk_fraction=None if entry.mp is None else entry.mp.bulk_fraction,
                mp_rank=None if entry.mp is None else entry.mp.rank,
            )
        )
    return report


def low_rank(
    model: nn.Module, cfg: LowRankConfig, names: list[str] | None = None
) -> tuple[nn.Module, list[LowRankLayer]]:
    """Plan and apply on a deep copy; ``model`` itself is not changed."""
    out = copy.deepcopy(model)
    return out, low_rank_(out, plan_low_rank(out, cfg, names))


def expand_low_rank(model: nn.Sequential) -> nn.Sequential:
    """A flat ``nn.Sequential`` with every :class:`LowRankLinear` as two plain ``nn.Linear``.

    The result computes the same function and holds only modules a sequential checkpoint spec
    describes (:func:`rankshrink.models.arch.sequential_spec`), so a low-rank MLP can be saved as one.
    """
    out: list[nn.Module] = []
    for mod in model:
        if isinstance(mod, LowRankLinear):
            out += [mod.down, mod.up]
        else:
            out.append(mod)
    return nn.Sequential(*out)


def _select(model: nn.Module, names: list[str] | None) -> list[tuple[str, nn.Linear]]:
    if type(model) is nn.Linear:
        raise InputError("a bare nn.Linear cannot be replaced in place; wrap it in a module")
    if names is None:
        names = linear_names(model)
        if not names:
            raise InputError(f"{type(model).__name__} has no nn.Linear layer to factor")
    return [(name, _get_linear(model, name)) for name in names]


def _get_linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise InputError(f"the model has no layer named {name!r}") from None
    if type(mod) is not nn.Linear:
        raise InputError(f"layer {name!r} is a {type(mod).__name__}, not an nn.Linear")
    return mod


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _bias_count(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else linear.bias.numel()
