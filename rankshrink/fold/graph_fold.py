"""Folding a factorized GraphModule (SPEC §4): fold each Linear chain, keep the rest of the graph.

:func:`rankshrink.methods.graph_surgery.factorize_graph_` leaves a GraphModule whose chain
submodules are factorized flat chains. Each one folds on its own
(:func:`rankshrink.fold.chain_fold.fold`): its ends are protected, so its input and output keep
the original coordinates that the residual adds, LayerNorm and reshapes between chains read.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

from torch import nn

from rankshrink.fold.chain_fold import FLOAT_BYTES, FoldResult, LayerFold, export_bytes, fold
from rankshrink.methods.surgery import FactorizedChain


def _chain(model: nn.Module, name: str) -> nn.Sequential:
    sub = model.get_submodule(name)
    if not isinstance(sub, nn.Sequential):
        raise TypeError(f"submodule {name!r} is a {type(sub).__name__}, not a chain")
    return sub


def graph_export_bytes(chain: FactorizedChain, chains: list[str]) -> int:
    """Bytes of weights the folded export of a factorized GraphModule will store.

    Args:
        chain: from :func:`rankshrink.methods.graph_surgery.factorize_graph_`.
        chains: the chain submodule names (``TracedModel.chains``).

    Returns:
        The chains' :func:`~rankshrink.fold.chain_fold.export_bytes` plus 4 bytes per element of
        every parameter and buffer outside them (LayerNorm, unchained Linears).
    """
    model = chain.model
    total = sum(export_bytes(_chain(model, name)) for name in chains)
    inside = set(chains)
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    outside = (t for key, t in tensors if key.partition(".")[0] not in inside)
    return total + FLOAT_BYTES * sum(t.numel() for t in outside)


def fold_graph(chain: FactorizedChain, chains: list[str]) -> FoldResult:
    """A copy of the factorized GraphModule with every chain submodule folded.

    Args:
        chain: from :func:`rankshrink.methods.graph_surgery.factorize_graph_`; not modified.
        chains: the chain submodule names (``TracedModel.chains``).

    Returns:
        The folded GraphModule (eval mode) and the LayerFold entries of all chains, renamed
        ``"<chain>.<index>"`` (``"chain1.2"``).
    """
    folded = {name: fold(_chain(chain.model, name)) for name in chains}
    # Copy the graph and the modules between chains, not the factorized chains themselves: the
    # memo hands deepcopy each folded chain in place of the factorized one it would copy.
    memo = {id(chain.model.get_submodule(name)): res.model for name, res in folded.items()}
    model = copy.deepcopy(chain.model, memo)
    layers: list[LayerFold] = [
        replace(lf, name=f"{name}.{lf.name}") for name, res in folded.items() for lf in res.layers
    ]
    return FoldResult(model.eval(), layers)
