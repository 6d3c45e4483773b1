"""Transformer surgery: factorize the projections of every encoder block in place (SPEC §3).

A :class:`TransformerLayout` names, by dotted module path, where each block keeps its query, key,
value and output projections and its two FFN projections, so the same surgery and folding serve any
encoder family whose projections are ``nn.Linear`` (the bundled :class:`TokenClassifier` here; a
Hugging Face BERT needs only another layout: ``encoder.layer.{i}.attention.self.query`` …).

Which axes may fuse:

- the residual stream is protected — columns of q/k/v/ffn-in and rows of out/ffn-out, because
  LayerNorm and the residual adds need every coordinate; so are both axes of a classifier head
  (its input is the residual stream, its output the model's);
- rows of q/k/v fuse only within one head (``row_groups`` = head id), columns of the output
  projection only within one head (``col_groups``): its input is the heads side by side, and a
  fused column only commutes with the attention mix of its own head;
- with ``axis_policy="fold"`` only the axes whose fusion shrinks the export fuse. A head's folded
  query/key width is ``min(q rows, k rows)`` and its value width ``min(v rows, out columns)``
  (:mod:`rankshrink.fold.transformer_fold`): a fusion on whichever side stays wider saves nothing, so
  one side of each pair fuses — q rows and v rows; k rows and out columns stay. The GELU FFN does not commute with
  a fused row's scale, so its axes shrink the export only through index ops; they fuse only when
  ``ffn_fusion`` is on. ``axis_policy="longer"`` frees every unprotected axis (the paper's rule;
  each Transformer projection has at most one free axis).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankshrink.errors import UnsupportedModelError
from rankshrink.methods.surgery import AXIS_POLICIES, FactorizedChain, LayerPolicy
from rankshrink.models.transformer_layout import ROLES, BlockLayout, TransformerLayout
from rankshrink.nn.factorized import FactorizedLinear


@dataclass
class TransformerChain(FactorizedChain):
    """A Transformer whose projections are factorized, with their layout."""

    layout: TransformerLayout
    names: list[str]  # module name of each entry of ``layers``



def factorize_transformer_(
    model: nn.Module,
    layout: TransformerLayout,
    frobenius: bool = True,
    axis_policy: str = "fold",
    ffn_fusion: bool = False,
) -> TransformerChain:
    """Replace every projection ``layout`` names by a :class:`FactorizedLinear`, in place.

    Args:
        model: the Transformer (a copy: it is modified).
        layout: where its projections are (see :func:`transformer_layout`).
        frobenius: use Frobenius normalization (SPEC §2).
        axis_policy: ``"fold"`` or ``"longer"`` (see the module docstring).
        ffn_fusion: with ``"fold"``, also fuse FFN rows/columns (exported with index ops).

    Returns:
        The factorized chain; the model computes exactly what it computed before.

    Raises:
        UnsupportedModelError: a named module is not an ``nn.Linear`` of the expected shape.
    """
    if axis_policy not in AXIS_POLICIES:
        raise ValueError(f"axis_policy must be one of {AXIS_POLICIES}, got {axis_policy!r}")
    longer = axis_policy == "longer"
    layers: list[FactorizedLinear] = []
    policies: list[LayerPolicy] = []
    names: list[str] = []

    def swap(name: str) -> FactorizedLinear:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise UnsupportedModelError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        layer = FactorizedLinear(linear, frobenius=frobenius)
        model.set_submodule(name, layer)
        layers.append(layer)
        names.append(name)
        return layer

    for block in layout.blocks:
        width = _check_block(model, block)
        head_dim = width // block.heads
        heads = torch.arange(width) // head_dim  # head id of each q/k/v row, each out column
        free = {  # role -> (fuse rows, fuse cols)
            "q": (True, False),
            "k": (longer, False),
            "v": (True, False),
            "out": (False, longer),
            "ffn_in": (longer or ffn_fusion, False),
            "ffn_out": (False, longer or ffn_fusion),
        }
        for role in ROLES:
            name = block.module(role)
            swap(name)
            rows, cols = free[role]
            policy = LayerPolicy(name, fuse_rows=rows, fuse_cols=cols, positive_rows=False)
            if role in ("q", "k", "v"):
                policy.row_groups = heads.clone()
            elif role == "out":
                policy.col_groups = heads.clone()
            policies.append(policy)
    for name in layout.protected:
        swap(name)
        policies.append(LayerPolicy(name, fuse_rows=False, fuse_cols=False, positive_rows=False))
    return TransformerChain(model, layers, policies, layout=layout, names=names)  # type: ignore[arg-type]


def _check_block(model: nn.Module, block: BlockLayout) -> int:
    """The attention width of a block, after checking its projections' shapes fit together."""
    shapes = {}
    for role in ROLES:
        mod = model.get_submodule(block.module(role))
        if not isinstance(mod, nn.Linear):
            raise UnsupportedModelError(
                f"{block.module(role)} is a {type(mod).__name__}, not an nn.Linear"
            )
        shapes[role] = (mod.out_features, mod.in_features)
    width, hidden = shapes["q"]
    ok = (
        shapes["k"] == shapes["v"] == (width, hidden)
        and shapes["out"] == (hidden, width)
        and shapes["ffn_in"][1] == hidden
        and shapes["ffn_out"] == (hidden, shapes["ffn_in"][0])
        and width % block.heads == 0
    )
    if not ok:
        raise UnsupportedModelError(
            f"{block.name}: projection shapes {shapes} do not form an attention block"
            f" with {block.heads} heads"
        )
    return width
