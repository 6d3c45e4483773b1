"""Folding (SPEC §4): turn a factorized chain into the smaller plain model that is exported.

Across a positively homogeneous activation f (ReLU, LeakyReLU) ``f(p·z) = p·f(z)`` for ``p > 0`` and
``|p|·f(−z)`` for ``p < 0``, so layer i's output is ``P⁺ · u`` with ``u`` the *features*
``f(±z_g)`` (one per reduced row and sign present) and ``P⁺ ≥ 0``. The next layer absorbs
``Q_{i+1} · P⁺`` into its dense weight, so a ReLU MLP folds into a plain, narrower MLP.

Where no dense fold exists (the next module is not homogeneous, or the layer writes the model's
output) the layer takes the cheapest exact form by stored bytes: the product multiplied out, or a
dense core with a gather (P) and/or a padded segment-sum (Q) — never more than the original.

:func:`plan_fold` decides shapes and forms from the index maps alone (cheap: the training loop uses
it to track the export size); :func:`fold` builds the modules.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rankshrink.math.indexmap import IndexMap
from rankshrink.models.chain import HOMOGENEOUS, PASSTHROUGH, activation_after
from rankshrink.nn.factorized import FactorizedLinear
from rankshrink.nn.indexed import IndexedLinear

FLOAT_BYTES, INDEX_BYTES = 4, 8


@dataclass(frozen=True)
class LayerFold:
    """How one Linear is exported."""

    name: str
    original_shape: tuple[int, int]  # (out, in) of the original nn.Linear
    core_shape: tuple[int, int]  # (m', n') of W' after fusion
    weight_shape: tuple[int, int]  # (rows, cols) of the exported dense weight
    feature_width: int  # width of the exported layer's output
    kind: str  # "dense", "dense-feature", or "indexed" (+ which ops)
    segment_in: bool
    gather_out: bool
    params: int  # numbers stored for the layer (floats and indices)
    bytes: int


@dataclass
class FoldResult:
    """The folded model and a per-layer account."""

    model: nn.Module  # an nn.Sequential, or a GraphModule of folded chains (fold.graph_fold)
    layers: list[LayerFold]


def sign_features(P: IndexMap) -> tuple[Tensor, Tensor]:
    """Feature space of a homogeneous fold: ``(group, sign)`` per feature, and each row's feature.

    Returns:
        ``features`` (F × 2) int64 rows ``(g, ±1)`` sorted by group then sign (+ first), and
        ``row_feature`` (m,) the feature each original output reads.
    """
    sign = torch.where(P.scale < 0, 1, 0)  # 0: positive member, 1: negative member
    key = P.index * 2 + sign
    uniq, row_feature = torch.unique(key, sorted=True, return_inverse=True)
    features = torch.stack([uniq // 2, 1 - 2 * (uniq % 2)], dim=1)
    return features, row_feature


def feature_count(P: IndexMap) -> int:
    """``len(sign_features(P)[0])`` without sorting (cached per map: asked after every fusion)."""
    return P.signed_count


@dataclass(frozen=True)
class _Plan:
    in_width: int  # exported input width (features of the previous fold, or n)
    rows: int  # exported weight rows
    cols: int
    segment_in: bool
    gather_out: bool
    feature_mode: str | None  # None, "signed" (identity between linears) or "split"
    out_width: int

    @property
    def bytes(self) -> int:
        extra = 0
        if self.segment_in:
            extra += self.cols * self._group_width * (FLOAT_BYTES + INDEX_BYTES)
        if self.gather_out:
            extra += self.out_width * (FLOAT_BYTES + INDEX_BYTES)
        return (self.rows * self.cols + self.rows) * FLOAT_BYTES + extra

    _group_width: int = 1


def plan_fold(modules: list[nn.Module]) -> list[_Plan | None]:
    """The export form of every module (``None`` for non-Linear ones), from sizes alone."""
    plans: list[_Plan | None] = []
    in_width: int | None = None  # width of the folded input basis, None: original coordinates
    for i, mod in enumerate(modules):
        if not isinstance(mod, FactorizedLinear):
            plans.append(None)
            continue
        m2, n2 = mod.reduced_shape
        act, nxt = activation_after(modules, i)
        mode: str | None = None
        if nxt is not None and (act is None or isinstance(act, HOMOGENEOUS)):
            mode = "signed" if act is None else "split"
        feat = m2 if mode == "signed" else (feature_count(mod.P) if mode else None)
        options: list[_Plan] = []
        in_choices = [(False, in_width if in_width is not None else mod.in_features)]
        if in_width is None and not mod._q_identity:
            in_choices.append((True, n2))
        group = mod.Q.max_group if not mod._q_identity else 1
        for seg, cols in in_choices:
            outs = [(False, feat)] if mode else [(False, mod.out_features)]
            if not mode and not mod._p_identity:
                outs.append((True, m2))
            for gather, rows in outs:
                assert rows is not None
                out_width = feat if mode else mod.out_features
                options.append(_Plan(cols, rows, cols, seg, gather, mode, out_width, group))
        best = min(options, key=lambda p: (p.bytes, p.segment_in + p.gather_out))
        plans.append(best)
        in_width = best.out_width if mode else None
    return plans


def export_bytes(model: nn.Sequential) -> int:
    """Bytes of weights the folded export of ``model`` will store (Linear layers and the rest)."""
    modules = list(model)
    total = 0
    for mod, plan in zip(modules, plan_fold(modules), strict=True):
        if plan is not None:
            total += plan.bytes
        elif not isinstance(mod, PASSTHROUGH):
            # parameters and buffers: what state_dict() holds, without building it every call
            tensors = itertools.chain(mod.parameters(), mod.buffers())
            total += FLOAT_BYTES * sum(t.numel() for t in tensors)
    return total


@torch.no_grad()
def fold(model: nn.Sequential) -> FoldResult:
    """Fold a factorized chain into plain modules computing exactly ``P·(W'·Q·x + b')`` per layer.

    Dropout and Identity are dropped (the export is for inference); everything that is not a
    ``FactorizedLinear`` is copied unchanged.
    """
    modules = list(model)
    plans = plan_fold(modules)
    out: list[nn.Module] = []
    folds: list[LayerFold] = []
    basis: Tensor | None = None  # h = basis @ u: original activation from the folded features
    for i, (mod, plan) in enumerate(zip(modules, plans, strict=True)):
        if plan is None:
            if not isinstance(mod, PASSTHROUGH):
                out.append(copy.deepcopy(mod).eval())
            continue
        assert isinstance(mod, FactorizedLinear)
        W = mod.weight().detach().double()  # (m', n')
        b = mod.bias_or_zeros().detach().double()
        Q = mod.Q.as_segment_sum()  # (n', n)
        if basis is not None:
            core = W @ (Q @ basis)  # (m', F_prev)
        elif plan.segment_in:
            core = W
        else:
            core = W @ Q  # (m', n)
        in_index = in_scale = out_index = out_scale = None
        if plan.segment_in:
            in_index, in_scale = mod.Q.padded_groups()
            in_scale = in_scale.float()
        if plan.feature_mode == "signed":
            basis = mod.P.as_gather()  # (m, m'), signed scales pass through linearly
        elif plan.feature_mode == "split":
            features, row_feature = sign_features(mod.P)
            select = torch.zeros(len(features), core.shape[0], dtype=torch.float64)
            select[torch.arange(len(features)), features[:, 0]] = features[:, 1].double()
            core, b = select @ core, select @ b  # (F, ·): the feature pre-activations ±z_g
            basis = torch.zeros(mod.out_features, len(features), dtype=torch.float64)
            basis[torch.arange(mod.out_features), row_feature] = mod.P.scale.double().abs()
        else:
            basis = None
            if plan.gather_out:
                out_index, out_scale = mod.P.index, mod.P.scale.float()
            else:
                P = mod.P.as_gather()
                core, b = P @ core, P @ b
        weight, bias = core.float(), b.float()
        name = f"{i}"
        if plan.segment_in or plan.gather_out:
            layer: nn.Module = IndexedLinear(
                weight, bias, in_index, in_scale, out_index, out_scale, in_features=mod.in_features
            )
            ops = [
                n
                for n, on in (("segment-in", plan.segment_in), ("gather-out", plan.gather_out))
                if on
            ]
            kind = "indexed(" + "+".join(ops) + ")"
        else:
            layer = nn.Linear(weight.shape[1], weight.shape[0])
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
            kind = "dense-feature" if plan.feature_mode else "dense"
        out.append(layer)
        params = sum(t.numel() for t in layer.state_dict().values())
        folds.append(
            LayerFold(
                name=name,
                original_shape=(mod.out_features, mod.in_features),
                core_shape=mod.reduced_shape,
                weight_shape=(int(weight.shape[0]), int(weight.shape[1])),
                feature_width=plan.out_width,
                kind=kind,
                segment_in=plan.segment_in,
                gather_out=plan.gather_out,
                params=params,
                bytes=plan.bytes,
            )
        )
    return FoldResult(nn.Sequential(*out).eval(), folds)
