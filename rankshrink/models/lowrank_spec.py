"""The checkpoint spec of a model some of whose Linears are two-factor :class:`LowRankLinear` s.

``{"type": "low_rank", "base": <spec>, "ranks": {"layers.0.attn.q": 8, ...}}``: ``base`` is the
spec of the same model with every low-rank layer as a dense ``nn.Linear`` of the same shape (any
spec type :func:`rankshrink.models.arch.build_model` knows except this one), and ``ranks`` names the
layers to swap back, by their ``named_modules`` name. The state_dict then holds each swapped
layer's ``down.weight``, ``up.weight`` and ``up.bias``. Like every spec it holds only plain
values, so the checkpoint loads with ``torch.load(weights_only=True)``.

A flat MLP does not need this (its factors save as two plain Linears in a sequential spec, see
:func:`rankshrink.methods.lowrank_layers.expand_low_rank`); a Transformer does, because its projections
sit inside attention modules.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import nn

from rankshrink.errors import InputError
from rankshrink.nn.lowrank_linear import LowRankLinear

SPEC_TYPE = "low_rank"


def has_low_rank(model: nn.Module) -> bool:
    """Whether ``model`` holds a :class:`LowRankLinear` (and so needs this spec)."""
    return any(isinstance(m, LowRankLinear) for m in model.modules())


def low_rank_spec(
    model: nn.Module, describe: Callable[[nn.Module], dict[str, Any]]
) -> dict[str, Any]:
    """The spec of ``model``; ``describe`` gives the base spec of its dense twin.

    Raises:
        InputError: ``model`` is itself a :class:`LowRankLinear`, or ``describe`` refuses the
            dense twin.
    """
    if isinstance(model, LowRankLinear):
        raise InputError("a bare LowRankLinear has no checkpoint spec; wrap it in a model")
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    twin = copy.deepcopy(model)  # the model itself is not changed
    for name in ranks:
        layer = twin.get_submodule(name)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.up.bias is not None)
        twin.set_submodule(name, dense)
    return {"type": SPEC_TYPE, "base": describe(twin), "ranks": ranks}


def build_low_rank(
    spec: dict[str, Any], build_base: Callable[[dict[str, Any]], nn.Module]
) -> nn.Module:
    """Build the model ``spec`` describes (weights uninitialised; inverse of
    :func:`low_rank_spec`).

    Every named layer must be a plain ``nn.Linear`` of the base and every rank in
    ``[1, min(in_features, out_features)]``, so a forged spec cannot allocate more than its base.

    Raises:
        InputError: the spec is malformed, nests another low-rank spec, or names a layer the
            base does not have.
    """
    base, ranks = spec.get("base"), spec.get("ranks")
    if not isinstance(base, dict) or base.get("type") == SPEC_TYPE:
        raise InputError(f"{SPEC_TYPE} spec needs a 'base' spec of another type")
    if not isinstance(ranks, dict) or not ranks:
        raise InputError(f"{SPEC_TYPE} spec needs a non-empty 'ranks' dict (layer name → rank)")
    model = build_base(base)
    for name, rank in ranks.items():
        try:
            layer = model.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            layer = None
        if type(layer) is not nn.Linear:
            raise InputError(f"{SPEC_TYPE} spec: {name!r:.60} is not a Linear layer of the base")
        top = min(layer.in_features, layer.out_features)
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= top:
            raise InputError(
                f"{SPEC_TYPE} spec: the rank of {name} must be an integer in [1, {top}],"
                f" got {rank!r:.40}"
            )
        bias = layer.bias is not None
        model.set_submodule(name, LowRankLinear(layer.in_features, layer.out_features, rank, bias))
    return model.eval()
