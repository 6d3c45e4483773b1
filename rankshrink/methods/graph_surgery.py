"""Model surgery on a traced model: factorize every Linear chain of a GraphModule (in place).

:func:`rankshrink.models.graph.trace` turns an ordinary ``nn.Module`` (residual MLPs, LayerNorm)
into a GraphModule whose Linear chains are ``nn.Sequential`` submodules. Each chain is prepared
(BatchNorm folded) and factorized exactly as a whole sequential model is: the first Linear of a
chain has protected columns and the last protected rows, which is right here because a chain's
ends read from or write to the residual stream, the model's input or its output (SPEC §3).
"""

from __future__ import annotations

from dataclasses import replace

from rankshrink.methods.surgery import FactorizedChain, LayerPolicy, factorize_
from rankshrink.models.chain import prepare_chain
from rankshrink.models.graph import TracedModel
from rankshrink.nn.factorized import FactorizedLinear


def factorize_graph_(
    traced: TracedModel, frobenius: bool = True, axis_policy: str = "fold"
) -> FactorizedChain:
    """Replace each chain submodule of ``traced.module`` by its prepared, factorized chain.

    Args:
        traced: from :func:`rankshrink.models.graph.trace`; its module is modified in place.
        frobenius: use Frobenius normalization (SPEC §2).
        axis_policy: ``"fold"`` or ``"longer"`` (see :mod:`rankshrink.methods.surgery`).

    Returns:
        One :class:`FactorizedChain` whose ``model`` is the GraphModule and whose layers and
        policies are the chains' concatenated, policy names prefixed by the chain's name
        (``"chain1.2"``). The module computes exactly what it computed before.

    Raises:
        UnsupportedModelError: a chain cannot be prepared (see
            :func:`rankshrink.models.chain.prepare_chain`).
        ValueError: an unknown ``axis_policy``.
    """
    gm = traced.module
    # prepare every chain before touching the module, so a refusal leaves it as it was
    prepared = [prepare_chain(gm.get_submodule(name)) for name in traced.chains]
    layers: list[FactorizedLinear] = []
    policies: list[LayerPolicy] = []
    for name, flat in zip(traced.chains, prepared, strict=True):
        part = factorize_(flat, frobenius=frobenius, axis_policy=axis_policy)
        setattr(gm, name, part.model)  # the graph calls the submodule by name: no recompile
        layers += part.layers
        policies += [replace(p, name=f"{name}.{p.name}") for p in part.policies]
    return FactorizedChain(gm.eval(), layers, policies)
