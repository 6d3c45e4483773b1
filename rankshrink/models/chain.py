"""Sequential chains: flattening, BatchNorm folding and the activation facts folding relies on.

A *chain* is a flat list of modules applied one after the other. rankshrink folds chains fully;
``prepare_chain`` turns nested ``nn.Sequential`` models into one flat ``nn.Sequential`` and folds
eval-mode BatchNorm into the neighbouring Linear, both exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rankshrink.errors import UnsupportedModelError
from rankshrink.nn.encoder import SelfAttention
from rankshrink.nn.factorized import FactorizedLinear

#: Modules that are the identity at export time.
PASSTHROUGH = (nn.Dropout, nn.Identity)
#: Positively homogeneous activations: f(a·t) = a·f(t) for a > 0 (SPEC §4).
HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU)
#: Modules a chain may hold besides Linear layers.
SUPPORTED = (
    nn.Linear,
    nn.ReLU,
    nn.LeakyReLU,
    nn.GELU,
    nn.Tanh,
    nn.Sigmoid,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Dropout,
    nn.Identity,
    nn.BatchNorm1d,
    nn.Flatten,
)
#: Attention modules: a model holding one is a Transformer, which is no chain (see
#: :mod:`rankshrink.methods.transformer_surgery`).
ATTENTION = (SelfAttention, nn.MultiheadAttention)


def flatten_sequential(model: nn.Module) -> list[nn.Module]:
    """The leaf modules of a (possibly nested) ``nn.Sequential``, in call order.

    Raises:
        UnsupportedModelError: the model is not a sequential chain of supported modules.
    """
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in flatten_sequential(child)]
    if isinstance(model, SUPPORTED):
        return [model]
    raise UnsupportedModelError(
        f"rankshrink compresses sequential models of {', '.join(c.__name__ for c in SUPPORTED)};"
        f" found {type(model).__name__}"
    )


def prepare_chain(model: nn.Module) -> nn.Sequential:
    """A flat eval-mode copy of ``model`` with every foldable BatchNorm folded into a Linear.

    ``Linear → BatchNorm`` folds into the Linear's output; ``BatchNorm → [Dropout] → Linear`` into
    the next Linear's input. A BatchNorm with neither neighbour stays (and blocks folding there).

    Raises:
        UnsupportedModelError: the model is a Transformer (holds an attention module), is not a
            sequential chain of supported modules, or has no ``nn.Linear``.
    """
    # Name the real reason for a Transformer up front; flatten_sequential would only say "found
    # TokenClassifier". The pipeline routes Transformers to transformer_surgery instead.
    attention = next((m for m in model.modules() if isinstance(m, ATTENTION)), None)
    if attention is not None:
        raise UnsupportedModelError(
            f"{type(model).__name__} contains {type(attention).__name__}: a Transformer is not a"
            " sequential chain (use rankshrink.methods.transformer_surgery.factorize_transformer_)"
        )
    modules = [copy.deepcopy(m) for m in flatten_sequential(model)]
    if not any(isinstance(m, nn.Linear) for m in modules):
        raise UnsupportedModelError("the model has no nn.Linear layer to compress")
    out: list[nn.Module] = []
    i = 0
    while i < len(modules):
        mod = modules[i]
        if isinstance(mod, nn.BatchNorm1d):
            scale, shift = _bn_affine(mod)
            prev = out[-1] if out else None
            nxt = _next_linear(modules, i + 1)
            if isinstance(prev, nn.Linear):  # y = s ⊙ (W x + b) + t
                _set_linear(prev, prev.weight * scale[:, None], _bias(prev) * scale + shift)
                i += 1
                continue
            if nxt is not None:  # W (s ⊙ x + t) + b
                lin = modules[nxt]
                _set_linear(lin, lin.weight * scale[None, :], _bias(lin) + lin.weight @ shift)
                i += 1
                continue
        out.append(mod)
        i += 1
    return nn.Sequential(*out).eval()


def _next_linear(modules: list[nn.Module], start: int) -> int | None:
    for j in range(start, len(modules)):
        if isinstance(modules[j], nn.Linear):
            return j
        if not isinstance(modules[j], PASSTHROUGH):
            return None
    return None


@torch.no_grad()
def _bn_affine(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedModelError("BatchNorm1d without running statistics cannot be folded")
    scale = 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = -bn.running_mean * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale.detach(), shift.detach()


def _bias(linear: nn.Linear) -> torch.Tensor:
    if linear.bias is not None:
        return linear.bias.detach()
    return torch.zeros(linear.out_features, dtype=linear.weight.dtype)


@torch.no_grad()
def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    linear.weight.copy_(weight)
    if linear.bias is None:
        linear.bias = nn.Parameter(bias.clone())
    else:
        linear.bias.copy_(bias)


def activation_after(modules: list[nn.Module], index: int) -> tuple[nn.Module | None, int | None]:
    """The first non-passthrough module after ``index`` and the index of the next Linear.

    Returns ``(activation, next_linear)``: ``activation`` is ``None`` when the next non-passthrough
    module is a Linear (or nothing); ``next_linear`` is ``None`` when a non-homogeneous module or
    the end of the chain comes first.
    """
    act: nn.Module | None = None
    for j in range(index + 1, len(modules)):
        mod = modules[j]
        if isinstance(mod, PASSTHROUGH):
            continue
        if isinstance(mod, (nn.Linear, FactorizedLinear)):
            return act, j
        if act is None and isinstance(mod, HOMOGENEOUS):
            act = mod
            continue
        return (act if act is not None else mod), None
    return act, None
