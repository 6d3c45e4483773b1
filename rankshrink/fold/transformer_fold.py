"""Folding a factorized Transformer (SPEC §4): attention per head, the FFN by its cheapest exact form.

**Query/key**, head h: ``scores = (P_q z_q)ᵀ(P_k z_k) = z_qᵀ (P_qᵀ P_k) z_k`` with ``P_q`` the
head's block of the query's P. The small matrix ``M = P_qᵀ P_k`` (r_q × r_k) is absorbed into the
wider side, so both end at width ``min(r_q, r_k)``. The ``1/√d_head`` scale is absorbed
into the query weights.

**Value/out**, head h: the attention mix acts on tokens and ``P_v`` on features, so they commute:
``out = Σ_h W'_o Q_o,h P_v,h (A_h z_v,h)``. ``N = Q_o,h P_v,h`` (c_h × r_v) goes into whichever side
is wider, so the head's value width is ``min(r_v, c_h)``.

**FFN** (GELU or any elementwise activation): a fused row's scale does not commute with the
activation, so only *exact duplicates* — rows of P with the same reduced row and the same scale —
share a hidden unit. The hidden layer keeps one *feature* per distinct ``(row, scale)``; the input
projection is either multiplied out (dense, one row per feature) or a dense core plus a gather, and
the output projection either dense over the features or a dense core after a padded segment-sum
(:class:`~rankshrink.nn.indexed.IndexedLinear`), whichever stores fewest bytes. Never larger than the
original: the dense forms are at most its size.

:func:`~rankshrink.fold.transformer_plan.plan_block` decides widths and forms from the index maps
alone (cheap enough for the training loop's size tracking); :func:`fold_transformer` builds the
folded model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rankshrink.fold.chain_fold import FLOAT_BYTES, LayerFold
from rankshrink.fold.transformer_plan import (
    FfnPlan,
    factorized_layer,
    ffn_features,
    head_members,
    plan_block,
)
from rankshrink.methods.transformer_surgery import TransformerChain
from rankshrink.nn.factorized import FactorizedLinear
from rankshrink.nn.folded_encoder import AttentionWithOut, HeadwiseAttention
from rankshrink.nn.indexed import IndexedLinear


@dataclass
class TransformerFold:
    """The folded model, a per-projection account, and each block's per-head widths."""

    model: nn.Module
    layers: list[LayerFold]
    heads: list[dict[str, Any]]


def _core(layer: FactorizedLinear) -> tuple[Tensor, Tensor]:
    """``(W'·Q, b')`` in float64: the reduced rows over the original inputs."""
    W = layer.weight().detach().double() @ layer.Q.as_segment_sum()
    return W, layer.bias_or_zeros().detach().double()


def _linear(weight: Tensor, bias: Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight.float())
        layer.bias.copy_(bias.float())
    return layer


@torch.no_grad()
def fold_attention(
    q: FactorizedLinear,
    k: FactorizedLinear,
    v: FactorizedLinear,
    out: FactorizedLinear,
    heads: int,
) -> tuple[HeadwiseAttention, nn.Linear]:
    """Fold one factorized attention block into per-head dense projections.

    Returns:
        ``(core, out)``: ``out(core(x))`` equals the factorized block's output.
    """
    head_dim = q.out_features // heads
    scale = 1.0 / math.sqrt(head_dim)  # the original's score scale, folded into the queries
    (Aq, bq), (Ak, bk), (Av, bv) = _core(q), _core(k), _core(v)
    Pq, Pk, Pv = q.P.as_gather(), k.P.as_gather(), v.P.as_gather()  # (width, r)
    Qo = out.Q.as_segment_sum()  # (c, width)
    Po = out.P.as_gather()
    Bo = Po @ out.weight().detach().double()  # (hidden, c): rows multiplied out (protected)
    bo = Po @ out.bias_or_zeros().detach().double()
    gq, gk, gv = (head_members(m.P, heads) for m in (q, k, v))
    go = head_members(out.Q, heads)
    qs, ks, vs, outs = [], [], [], []
    qk_widths, v_widths = [], []
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        M = Pq[rows][:, gq[h]].T @ Pk[rows][:, gk[h]]  # (r_q, r_k) = P_q,hᵀ P_k,h
        wq, bq_h, wk, bk_h = Aq[gq[h]], bq[gq[h]], Ak[gk[h]], bk[gk[h]]
        if len(gq[h]) <= len(gk[h]):
            wk, bk_h = M @ wk, M @ bk_h
        else:
            wq, bq_h = M.T @ wq, M.T @ bq_h
        qs.append((wq * scale, bq_h * scale))
        ks.append((wk, bk_h))
        N = Qo[go[h]][:, rows] @ Pv[rows][:, gv[h]]  # (c_h, r_v) = Q_o,h P_v,h
        wv, bv_h, wo = Av[gv[h]], bv[gv[h]], Bo[:, go[h]]
        if len(gv[h]) <= len(go[h]):
            wo = wo @ N
        else:
            wv, bv_h = N @ wv, N @ bv_h
        vs.append((wv, bv_h))
        outs.append(wo)
        qk_widths.append(int(wq.shape[0]))
        v_widths.append(int(wv.shape[0]))
    # heads of equal widths side by side, so that they run as one batched attention
    order = sorted(range(heads), key=lambda h: (qk_widths[h], v_widths[h]))
    core = HeadwiseAttention(
        q.in_features, [qk_widths[h] for h in order], [v_widths[h] for h in order]
    )
    parts = [qs[h] for h in order] + [ks[h] for h in order] + [vs[h] for h in order]
    core.qkv.weight.copy_(torch.cat([w for w, _ in parts]).float())
    core.qkv.bias.copy_(torch.cat([b for _, b in parts]).float())
    return core, _linear(torch.cat([outs[h] for h in order], dim=1), bo)


@torch.no_grad()
def fold_ffn(
    fin: FactorizedLinear, fout: FactorizedLinear, plan: FfnPlan
) -> tuple[nn.Module, nn.Module]:
    """Fold an FFN (``fout(act(fin(x)))``, any elementwise ``act``) into the forms ``plan`` chose."""
    A, b = _core(fin)  # (r, n), (r,)
    index, scale, row_feature = ffn_features(fin.P)
    s = scale.double()
    first: nn.Module
    if plan.in_form == "dense":
        first = _linear(s[:, None] * A[index], s * b[index])  # (F, n)
    else:
        first = IndexedLinear(
            A.float(), b.float(), out_index=index, out_scale=scale.float(), in_features=A.shape[1]
        )
    Po = fout.P.as_gather()
    Wo = Po @ fout.weight().detach().double()  # (out, c)
    bo = Po @ fout.bias_or_zeros().detach().double()
    second: nn.Module
    if plan.out_form == "dense":
        merge = torch.zeros(fin.out_features, plan.features, dtype=torch.float64)
        merge[torch.arange(fin.out_features), row_feature] = 1.0  # duplicates add up
        second = _linear(Wo @ fout.Q.as_segment_sum() @ merge, bo)  # (out, F)
    else:
        in_index, in_scale = fout.Q.padded_groups()
        second = IndexedLinear(
            Wo.float(), bo.float(), in_index, in_scale.float(), in_features=fout.in_features
        )
    return first, second


def _kind(module: nn.Module, dense: str) -> str:
    if not isinstance(module, IndexedLinear):
        return dense
    ops = [
        n
        for n, idx in (("segment-in", module.in_index), ("gather-out", module.out_index))
        if idx is not None
    ]
    return "indexed(" + "+".join(ops) + ")"


def _params(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


@torch.no_grad()
def fold_transformer(chain: TransformerChain) -> TransformerFold:
    """Fold a factorized Transformer into plain and headwise modules (the model is copied).

    Every block's attention becomes a :class:`HeadwiseAttention` plus a dense output projection
    (installed per :attr:`~rankshrink.models.transformer_layout.BlockLayout.out_inside`), its FFN
    the forms :func:`~rankshrink.fold.transformer_plan.plan_ffn` picks, and protected layers
    (classifier heads) dense ``nn.Linear``.
    """
    model = copy.deepcopy(chain.model).eval()
    folds: list[LayerFold] = []
    heads: list[dict[str, Any]] = []
    for block in chain.layout.blocks:
        plan = plan_block(model, block)
        q, k, v, out = (factorized_layer(model, block.module(r)) for r in ("q", "k", "v", "out"))
        fin, fout = factorized_layer(model, block.ffn_in), factorized_layer(model, block.ffn_out)
        core, out_proj = fold_attention(q, k, v, out, block.heads)
        first, second = fold_ffn(fin, fout, plan.ffn)
        hidden, a = plan.attention.hidden, plan.attention
        sq, sv = sum(a.qk_widths), sum(a.v_widths)
        for layer, name, shape, kind in (
            (q, block.q, (sq, hidden), "attention-qk"),
            (k, block.k, (sq, hidden), "attention-qk"),
            (v, block.v, (sv, hidden), "attention-v"),
            (out, block.out, (hidden, sv), "attention-out"),
        ):
            params = shape[0] * shape[1] + shape[0]
            folds.append(
                _fold_row(layer, name, shape, shape[0], kind, params, params * FLOAT_BYTES)
            )
        for layer, name, mod, width, nbytes in (
            (fin, block.ffn_in, first, plan.ffn.features, plan.ffn.in_bytes),
            (fout, block.ffn_out, second, fout.out_features, plan.ffn.out_bytes),
        ):
            shape = tuple(mod.weight.shape)
            dense = "dense-feature" if mod is first and width < fin.out_features else "dense"
            folds.append(
                _fold_row(layer, name, shape, width, _kind(mod, dense), _params(mod), nbytes)
            )
        heads.append(
            {
                "block": block.name,
                "qk_widths": a.qk_widths,
                "v_widths": a.v_widths,
                "q_rows": a.q_rows,
                "k_rows": a.k_rows,
                "v_rows": a.v_rows,
                "out_cols": a.out_cols,
            }
        )
        if block.out_inside:
            model.set_submodule(block.attention, AttentionWithOut(core, out_proj))
        else:  # the output projection stays where the family keeps it
            wrapped = block.wrap_core(core) if block.wrap_core is not None else core
            model.set_submodule(block.attention, wrapped)
            model.set_submodule(block.out, out_proj)
        model.set_submodule(block.ffn_in, first)
        model.set_submodule(block.ffn_out, second)
    for name in chain.layout.protected:
        layer = factorized_layer(model, name)
        dense = _linear(layer.dense_weight(), layer.dense_bias())
        model.set_submodule(name, dense)
        shape = (layer.out_features, layer.in_features)
        params = _params(dense)
        folds.append(
            _fold_row(layer, name, shape, layer.out_features, "dense", params, params * FLOAT_BYTES)
        )
    return TransformerFold(model.eval(), folds, heads)


def _fold_row(
    layer: FactorizedLinear,
    name: str,
    shape: tuple[int, ...],
    width: int,
    kind: str,
    params: int,
    nbytes: int,
) -> LayerFold:
    return LayerFold(
        name=name,
        original_shape=(layer.out_features, layer.in_features),
        core_shape=layer.reduced_shape,
        weight_shape=(int(shape[0]), int(shape[1])),
        feature_width=int(width),
        kind=kind,
        segment_in="segment-in" in kind,
        gather_out="gather-out" in kind,
        params=int(params),
        bytes=int(nbytes),
    )
