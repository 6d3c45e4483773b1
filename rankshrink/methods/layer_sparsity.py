"""Layer sparsity: train some ReLUs into the identity, then merge the layers around them.

Seed ``003_…`` (Hebiri & Lederer, "Layer sparsity in neural networks", 2020) and SPEC §5. The
seed in ``shared/seeds`` is only the abstract; this is the reading implemented here, from the
paper's construction as SPEC §5 restates it:

- A hidden layer ``z ↦ f(W_j z + b_j)`` whose input ``z`` is non-negative (it comes out of a ReLU)
  and whose ``Ŵ_j = [W_j | b_j]`` is entrywise ``≥ 0`` has non-negative pre-activations, so a
  ReLU ``f`` after it is the identity. Then ``W_{j+1} f(W_j z + b_j) + b_{j+1}`` is the affine map
  ``(W_{j+1} W_j) z + (W_{j+1} b_j + b_{j+1})``: the two layers are one. The penalty therefore
  sits on layer ``j`` itself — the layer *before* the ReLU to be removed — and only on layers
  whose input is ``≥ 0`` (after a ReLU or a sigmoid, or the model's input when the caller says
  it is non-negative) and whose output goes through a ReLU (or LeakyReLU, also the identity on
  ``t ≥ 0``) into another Linear. The first layer (arbitrary-signed inputs) and the output layer
  (no ReLU after it) are never penalized.
- The regularizer is the group penalty ``Σ_j ‖min(Ŵ_j, 0)‖_F``: one group per layer, so, like the
  group lasso, it drives a layer's *whole* negative part to zero rather than single entries.
- Training with the penalty (sub)gradient and Adam leaves the negative entries of a "won" layer
  oscillating at about the learning rate instead of exactly 0, so detection is explicit: clamp a
  candidate's negative entries to 0 and keep the clamp only if the model's outputs on the
  training data change by at most ``max_change`` (relative Frobenius norm). A clamped layer's ReLU
  is then exactly the identity for every input, and the merge below is exact.
- Merged layers are kept only when smaller (``m_{j+1}·n_j`` vs ``m_j·n_j + m_{j+1}·m_j``, plus
  biases); a run of identity ReLUs merges left to right (the product of non-negative layers is
  non-negative, so the chain stays exact). Then the smaller network is refitted without the
  penalty — the paper's refitting step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rankshrink.errors import UnsupportedModelError
from rankshrink.models.chain import ATTENTION, PASSTHROUGH, prepare_chain

#: Activations whose outputs are never negative: a Linear after one sees inputs ``≥ 0``.
NONNEGATIVE_OUTPUT = (nn.ReLU, nn.Sigmoid)
#: Activations that are the identity on ``t ≥ 0``: they vanish after a non-negative layer.
IDENTITY_ON_NONNEGATIVE = (nn.ReLU, nn.LeakyReLU)
#: Modules that keep the sign of every coordinate (at eval and, for Dropout, in training too).
SIGN_PRESERVING = (*PASSTHROUGH, nn.Flatten)


@dataclass(frozen=True)
class LayerSparsityConfig:
    """Settings of :func:`layer_sparsity`."""

    lam: float = 0.1  # weight of Σ_j ‖min(Ŵ_j, 0)‖_F in the loss
    steps: int = 500  # fine-tuning with the penalty
    refit_steps: int = 500  # fine-tuning of the merged network, no penalty
    lr: float = 1e-3
    batch: int = 128
    seed: int = 0
    input_nonnegative: bool = False  # the model's inputs are ≥ 0: its first layer may merge too
    max_change: float = 1e-2  # clamping may change the outputs by this (relative Frobenius)


@dataclass(frozen=True)
class Merge:
    """Two (or, chained, more) consecutive Linear layers that became one."""

    layers: list[str]  # chain indices of the merged Linear layers, in order
    shapes: list[tuple[int, int]]  # their (out_features, in_features)
    shape: tuple[int, int]  # the merged layer's
    params_before: int
    params_after: int


def as_chain(model: nn.Module) -> nn.Sequential:
    """A flat eval-mode copy of an MLP (BatchNorm folded), or a clear refusal.

    Raises:
        UnsupportedModelError: the model is a Transformer or not a sequential chain.
    """
    attention = next((m for m in model.modules() if isinstance(m, ATTENTION)), None)
    if attention is not None:
        raise UnsupportedModelError(
            f"layer sparsity applies to ReLU MLPs; {type(model).__name__} is a Transformer"
            " (attention, GELU and residual adds leave no ReLU between two Linear layers)"
        )
    try:
        return prepare_chain(model)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"layer sparsity applies to ReLU MLPs: {exc}") from None


def penalized_layers(chain: nn.Sequential, input_nonnegative: bool = False) -> list[int]:
    """Indices of the Linear layers whose ReLU can become the identity and then merge.

    A layer qualifies when its input is ``≥ 0`` and it is followed, through sign-preserving
    modules only, by one :data:`IDENTITY_ON_NONNEGATIVE` activation and then another Linear.

    Raises:
        UnsupportedModelError: no layer qualifies (named with the activations the model has).
    """
    mods = list(chain)
    out = []
    for i, mod in enumerate(mods):
        if type(mod) is nn.Linear and _input_nonnegative(mods, i, input_nonnegative):
            act, nxt = _after(mods, i)
            if isinstance(act, IDENTITY_ON_NONNEGATIVE) and nxt is not None:
                out.append(i)
    if not out:
        acts = sorted(
            {type(m).__name__ for m in mods if not isinstance(m, (nn.Linear, *SIGN_PRESERVING))}
        )
        raise UnsupportedModelError(
            "layer sparsity needs a hidden Linear whose input is ≥ 0 (after a ReLU) and whose"
            " output goes through a ReLU into another Linear; this model has none (activations:"
            f" {', '.join(acts) or 'none'})"
        )
    return out


def _input_nonnegative(mods: list[nn.Module], i: int, model_input: bool) -> bool:
    for j in range(i - 1, -1, -1):
        if isinstance(mods[j], SIGN_PRESERVING):
            continue
        return isinstance(mods[j], NONNEGATIVE_OUTPUT)
    return model_input


def _after(mods: list[nn.Module], i: int) -> tuple[nn.Module | None, int | None]:
    """The one activation between Linear ``i`` and the next Linear, and that Linear's index."""
    act: nn.Module | None = None
    for j in range(i + 1, len(mods)):
        mod = mods[j]
        if isinstance(mod, SIGN_PRESERVING):
            continue
        if type(mod) is nn.Linear:
            return act, j
        if act is not None:
            return None, None  # two activations in a row: not a plain Linear-ReLU-Linear
        act = mod
    return act, None


def augmented(linear: nn.Linear) -> Tensor:
    """``Ŵ = [W | b]`` (bias as an extra column; zeros when there is none)."""
    b = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
    return torch.cat([linear.weight, b[:, None]], dim=1)


def negative_part_penalty(chain: nn.Sequential, indices: list[int]) -> Tensor:
    """``Σ_j ‖min(Ŵ_j, 0)‖_F`` over the layers at ``indices`` (differentiable)."""
    return torch.stack(
        [torch.linalg.vector_norm(augmented(chain[i]).clamp(max=0)) for i in indices]
    ).sum()


@torch.no_grad()
def clamp_nonnegative_(linear: nn.Linear) -> None:
    """Set the negative entries of ``W`` and ``b`` to 0 in place."""
    linear.weight.clamp_(min=0)
    if linear.bias is not None:
        linear.bias.clamp_(min=0)


@torch.no_grad()
def find_identity_layers_(
    chain: nn.Sequential, indices: list[int], x: Tensor, max_change: float
) -> tuple[list[int], float]:
    """Clamp, in place, the candidates whose clamping barely changes the outputs on ``x``.

    Candidates are tried from the smallest relative negative part ``‖min(Ŵ,0)‖/‖Ŵ‖`` up; each
    clamp is kept only if the outputs stay within ``max_change`` (relative Frobenius norm, all
    accepted clamps together) of the outputs before any clamp, and rolled back otherwise.

    Returns:
        The clamped indices (ascending) and the relative output change they cause.
    """
    chain.eval()
    ref = chain(x)
    scale = float(torch.linalg.vector_norm(ref)) or 1.0

    def rel_neg(i: int) -> float:
        W = augmented(chain[i])
        return float(torch.linalg.vector_norm(W.clamp(max=0)) / torch.linalg.vector_norm(W))

    accepted: list[int] = []
    change = 0.0
    for i in sorted(indices, key=rel_neg):
        saved = {k: v.clone() for k, v in chain[i].state_dict().items()}
        clamp_nonnegative_(chain[i])
        new = float(torch.linalg.vector_norm(chain(x) - ref)) / scale
        if new <= max_change:
            accepted.append(i)
            change = new
        else:
            chain[i].load_state_dict(saved)
    return sorted(accepted), change


@torch.no_grad()
def collapse(chain: nn.Sequential, identity: list[int]) -> tuple[nn.Sequential, list[Merge]]:
    """Merge every Linear in ``identity`` with the next Linear when that is smaller.

    The layers in ``identity`` must be entrywise non-negative with non-negative inputs (as
    :func:`find_identity_layers_` leaves them): the activation between is then the identity and
    the merge is exact. ``chain`` itself is not changed.
    """
    mods = list(chain)
    merged_from: dict[int, list[int]] = {}  # index of a (possibly merged) Linear -> its sources
    keep = [True] * len(mods)
    merges: list[Merge] = []
    for i in range(len(mods)):
        if i not in identity or not keep[i]:
            continue
        _, j = _after(mods, i)
        if j is None:
            continue
        first, second = mods[i], mods[j]
        fused = _compose(first, second)
        before = _params(first) + _params(second)
        if _params(fused) >= before:
            continue
        sources = merged_from.pop(i, [i]) + merged_from.pop(j, [j])
        merged_from[j] = sources
        mods[j] = fused
        for k in range(i, j):  # the Linear, its activation and the passthroughs between
            keep[k] = False
        # if j is in identity too, the loop reaches it next and merges on: its ReLU was the
        # identity on the merged layer's (unchanged) outputs, so the chain stays exact
    for j, sources in sorted(merged_from.items()):
        shapes = [(chain[s].out_features, chain[s].in_features) for s in sources]
        merges.append(
            Merge(
                layers=[str(s) for s in sources],
                shapes=shapes,
                shape=(mods[j].out_features, mods[j].in_features),
                params_before=sum(_params(chain[s]) for s in sources),
                params_after=_params(mods[j]),
            )
        )
    return nn.Sequential(*(m for m, k in zip(mods, keep, strict=True) if k)).eval(), merges


def _compose(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """``second ∘ first`` as one Linear: ``W₂W₁ x + (W₂b₁ + b₂)``."""
    bias = first.bias is not None or second.bias is not None
    out = nn.Linear(first.in_features, second.out_features, bias=bias)
    out.weight.copy_(second.weight @ first.weight)
    if bias:
        b = torch.zeros(second.out_features, dtype=second.weight.dtype)
        if first.bias is not None:
            b += second.weight @ first.bias
        if second.bias is not None:
            b += second.bias
        out.bias.copy_(b)
    return out


def _params(linear: nn.Linear) -> int:
    return sum(p.numel() for p in linear.parameters())
