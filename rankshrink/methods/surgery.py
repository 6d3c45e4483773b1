"""Model surgery: swap every ``nn.Linear`` of a chain for a :class:`FactorizedLinear` (in place).

It also decides, per layer, which axes may fuse (SPEC §3) and under which sign rule:

- protected: columns of the layer that reads the model's input, rows of the layer that writes the
  model's output;
- ``axis_policy="fold"`` (default) keeps only the axes whose fusion shrinks the exported model:
  rows of a layer whose output reaches the next Linear through a positively homogeneous activation
  (folded into a narrower dense layer, SPEC §4) fuse only with *positive* partners, because an
  anti-parallel pair still needs two features after folding; the columns of a layer whose input
  comes from such a fold never shrink the export, so they do not fuse;
- ``axis_policy="longer"`` is the paper's rule: the longer unprotected axis, any sign.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from rankshrink.models.chain import HOMOGENEOUS, activation_after
from rankshrink.nn.factorized import FactorizedLinear

AXIS_POLICIES = ("fold", "longer")


@dataclass
class LayerPolicy:
    """What fusion may do to one factorized layer."""

    name: str
    fuse_rows: bool
    fuse_cols: bool
    positive_rows: bool  # rows fuse only with positively parallel partners
    dropouts: list[nn.Dropout] = field(default_factory=list)  # decayed as rows fuse (eq. 14)
    dropout_rates: list[float] = field(default_factory=list)
    # group id per original row / column: fusions stay within a group (attention heads); None: one
    row_groups: Tensor | None = None
    col_groups: Tensor | None = None


@dataclass
class FactorizedChain:
    """A chain whose Linear layers are factorized, with their fusion policies."""

    model: nn.Module  # the flat chain, or a GraphModule of chains (methods.graph_surgery)
    layers: list[FactorizedLinear]
    policies: list[LayerPolicy]


def factorize_(
    model: nn.Sequential, frobenius: bool = True, axis_policy: str = "fold"
) -> FactorizedChain:
    """Replace every ``nn.Linear`` in the flat chain ``model`` by a ``FactorizedLinear``.

    Args:
        model: a flat chain from :func:`rankshrink.models.chain.prepare_chain`; modified in place.
        frobenius: use Frobenius normalization (SPEC §2).
        axis_policy: ``"fold"`` or ``"longer"`` (see the module docstring).

    Returns:
        The factorized chain. The model computes exactly what it computed before.
    """
    if axis_policy not in AXIS_POLICIES:
        raise ValueError(f"axis_policy must be one of {AXIS_POLICIES}, got {axis_policy!r}")
    modules = list(model)
    linear_at = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)]
    layers: list[FactorizedLinear] = []
    policies: list[LayerPolicy] = []
    fed_by_fold = False  # does this layer's input come from a dense fold of the previous one?
    for pos, i in enumerate(linear_at):
        layer = FactorizedLinear(modules[i], frobenius=frobenius)
        model[i] = layer
        modules[i] = layer
        act, nxt = activation_after(modules, i)
        folds_forward = nxt is not None and (act is None or isinstance(act, HOMOGENEOUS))
        rows_free = pos != len(linear_at) - 1
        cols_free = pos != 0
        if axis_policy == "fold":
            policy = LayerPolicy(
                name=f"{i}",
                fuse_rows=rows_free,
                fuse_cols=cols_free and not fed_by_fold,
                positive_rows=folds_forward and act is not None,
            )
        else:
            policy = LayerPolicy(f"{i}", rows_free, cols_free, positive_rows=False)
        end = nxt if nxt is not None else len(modules)
        policy.dropouts = [m for m in modules[i + 1 : end] if isinstance(m, nn.Dropout)]
        policy.dropout_rates = [float(m.p) for m in policy.dropouts]
        layers.append(layer)
        policies.append(policy)
        fed_by_fold = folds_forward
    return FactorizedChain(model, layers, policies)


def fusable_axis(layer: FactorizedLinear, policy: LayerPolicy) -> str | None:
    """The axis fusion works on this step: the longer allowed one (rows on a tie-break loss)."""
    rows, cols = layer.reduced_shape
    if policy.fuse_rows and policy.fuse_cols:
        return "rows" if rows > cols else "cols"
    if policy.fuse_rows:
        return "rows"
    if policy.fuse_cols:
        return "cols"
    return None


def rare_axes(policy: LayerPolicy) -> list[str]:
    """The axes that carry a RaRe term (axes that can never fuse need none)."""
    return [a for a, ok in (("rows", policy.fuse_rows), ("cols", policy.fuse_cols)) if ok]
