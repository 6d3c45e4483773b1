"""How a factorized Transformer will fold, decided from its index maps alone (SPEC §4).

Per block: the per-head widths of its folded attention (:class:`AttentionPlan`) and the cheapest
exact export form of its FFN (:class:`FfnPlan`), and from them the bytes the folded export stores
(:func:`export_bytes`) — cheap enough for the training loop's size tracking. The fold that
follows these plans, and why the widths are what they are, is
:mod:`rankshrink.fold.transformer_fold`.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain as chained

import torch
from torch import Tensor, nn

from rankshrink.fold.chain_fold import FLOAT_BYTES, INDEX_BYTES
from rankshrink.math.indexmap import IndexMap
from rankshrink.methods.transformer_surgery import TransformerChain
from rankshrink.models.transformer_layout import BlockLayout
from rankshrink.nn.factorized import FactorizedLinear


def head_members(P: IndexMap, heads: int) -> list[Tensor]:
    """The reduced coordinates each head's original coordinates map to (sorted, disjoint).

    Raises:
        ValueError: a reduced coordinate serves two heads (a fusion crossed a head boundary).
    """
    width = P.size // heads
    groups = [torch.unique(P.index[h * width : (h + 1) * width]) for h in range(heads)]
    members = torch.cat(groups)
    if members.numel() != torch.unique(members).numel():
        raise ValueError("a fused coordinate spans two attention heads; cannot fold per head")
    return groups


def ffn_features(P: IndexMap) -> tuple[Tensor, Tensor, Tensor]:
    """The hidden units an elementwise activation needs after a row fusion: distinct (row, scale).

    Returns:
        ``index`` (F,) and ``scale`` (F,): feature f is ``act(scale[f] · z[index[f]])``, in order of
        first use; ``row_feature`` (m,): the feature each original hidden unit equals. Without
        duplicates F = m and ``row_feature`` is the identity.
    """
    key = torch.stack([P.index.double(), P.scale.double()], dim=1)
    uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
    first = torch.full((len(uniq),), P.size, dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(P.size), "amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return uniq[order, 0].long(), uniq[order, 1].to(P.scale.dtype), rank[inverse]


@dataclass(frozen=True)
class AttentionPlan:
    """Per-head widths of one folded attention block."""

    hidden: int  # residual width (input of q/k/v, output of out)
    q_rows: list[int]  # reduced rows per head of each factorized projection
    k_rows: list[int]
    v_rows: list[int]
    out_cols: list[int]

    @property
    def qk_widths(self) -> list[int]:
        return [min(a, b) for a, b in zip(self.q_rows, self.k_rows, strict=True)]

    @property
    def v_widths(self) -> list[int]:
        return [min(a, b) for a, b in zip(self.v_rows, self.out_cols, strict=True)]

    @property
    def qkv_rows(self) -> int:
        return 2 * sum(self.qk_widths) + sum(self.v_widths)

    @property
    def bytes(self) -> int:
        qkv = self.qkv_rows * (self.hidden + 1)
        out = self.hidden * (sum(self.v_widths) + 1)
        return (qkv + out) * FLOAT_BYTES


@dataclass(frozen=True)
class FfnPlan:
    """The export form of one FFN: ``in_form`` dense|gather, ``out_form`` dense|segment."""

    in_form: str
    out_form: str
    in_features: int  # n
    hidden: int  # m
    features: int  # F ≤ m
    core_rows: int  # r (reduced rows of ffn_in)
    out_features: int
    core_cols: int  # c (reduced columns of ffn_out)
    group: int  # widest segment of ffn_out's Q

    @property
    def in_bytes(self) -> int:
        if self.in_form == "dense":
            return (self.features * (self.in_features + 1)) * FLOAT_BYTES
        core = self.core_rows * (self.in_features + 1) * FLOAT_BYTES
        return core + self.features * (FLOAT_BYTES + INDEX_BYTES)

    @property
    def out_bytes(self) -> int:
        if self.out_form == "dense":
            return self.out_features * (self.features + 1) * FLOAT_BYTES
        core = self.out_features * (self.core_cols + 1) * FLOAT_BYTES
        return core + self.core_cols * self.group * (FLOAT_BYTES + INDEX_BYTES)

    @property
    def bytes(self) -> int:
        return self.in_bytes + self.out_bytes


@dataclass(frozen=True)
class BlockPlan:
    attention: AttentionPlan
    ffn: FfnPlan

    @property
    def bytes(self) -> int:
        return self.attention.bytes + self.ffn.bytes


def factorized_layer(model: nn.Module, name: str) -> FactorizedLinear:
    """The submodule ``name`` of ``model``, which must be a :class:`FactorizedLinear`."""
    layer = model.get_submodule(name)
    if not isinstance(layer, FactorizedLinear):
        raise TypeError(f"{name} is a {type(layer).__name__}, not a FactorizedLinear")
    return layer


def plan_attention(model: nn.Module, block: BlockLayout) -> AttentionPlan:
    """Per-head widths of a block's folded attention, from its index maps alone."""
    q, k, v, out = (factorized_layer(model, block.module(r)) for r in ("q", "k", "v", "out"))

    def counts(P: IndexMap) -> list[int]:
        return [int(g.numel()) for g in head_members(P, block.heads)]

    return AttentionPlan(q.in_features, counts(q.P), counts(k.P), counts(v.P), counts(out.Q))


def plan_ffn(model: nn.Module, block: BlockLayout) -> FfnPlan:
    """The cheapest exact export form of a block's FFN (ties go to the dense, index-free form)."""
    fin, fout = factorized_layer(model, block.ffn_in), factorized_layer(model, block.ffn_out)
    features = int(ffn_features(fin.P)[0].numel()) if not fin._p_identity else fin.out_features
    group = int(torch.bincount(fout.Q.index).max()) if not fout._q_identity else 1
    options = []
    for in_form in ("dense", "gather"):
        for out_form in ("dense", "segment"):
            if in_form == "gather" and fin._p_identity:
                continue
            # a segment-sum reads the original hidden units: only when no duplicate merged them
            if out_form == "segment" and (fout._q_identity or features != fin.out_features):
                continue
            options.append(
                FfnPlan(
                    in_form,
                    out_form,
                    in_features=fin.in_features,
                    hidden=fin.out_features,
                    features=features,
                    core_rows=fin.reduced_shape[0],
                    out_features=fout.out_features,
                    core_cols=fout.reduced_shape[1],
                    group=group,
                )
            )
    return min(options, key=lambda p: (p.bytes, (p.in_form, p.out_form) != ("dense", "dense")))


def plan_block(model: nn.Module, block: BlockLayout) -> BlockPlan:
    """How one block folds."""
    return BlockPlan(plan_attention(model, block), plan_ffn(model, block))


def export_bytes(chain: TransformerChain) -> int:
    """Bytes of weights the folded export of ``chain`` stores (the training loop's size measure)."""
    model = chain.model
    total = sum(plan_block(model, block).bytes for block in chain.layout.blocks)
    for name in chain.layout.protected:
        layer = factorized_layer(model, name)
        total += layer.out_features * (layer.in_features + 1) * FLOAT_BYTES
    for mod in model.modules():  # embeddings, LayerNorms, ...: exported as they are
        if not isinstance(mod, FactorizedLinear):
            tensors = chained(mod.parameters(recurse=False), mod.buffers(recurse=False))
            total += sum(t.numel() for t in tensors if t.is_floating_point()) * FLOAT_BYTES
    return total
