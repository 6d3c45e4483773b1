"""Self-describing architecture specs: sequential models and the Transformer encoder.

A checkpoint written by rankshrink (and the bundled sample models) stores ``{"arch": spec,
"state_dict": ...}``. Two spec types exist, dispatched on ``spec["type"]`` by :func:`build_model`:

- ``{"type": "sequential", "layers": [...]}`` lists one dict per module; the weights live in the
  state_dict of the ``nn.Sequential`` that :func:`build_sequential` returns (keys ``"0.weight"``,
  ``"0.bias"``, ...);
- ``{"type": "token_classifier", ...}`` describes a :class:`~rankshrink.nn.encoder.TokenClassifier`
  (see :mod:`rankshrink.nn.encoder`);
- ``{"type": "folded_token_classifier", ...}`` describes one that rankshrink compressed (see
  :mod:`rankshrink.nn.folded_encoder`);
- ``{"type": "token_encoder", ...}`` describes a Hugging Face BERT-family encoder, plain or
  compressed (see :mod:`rankshrink.models.token_spec`);
- ``{"type": "low_rank", "base": ..., "ranks": ...}`` wraps any of these whose Linear layers are
  partly two-factor ``LowRankLinear`` s (see :mod:`rankshrink.models.lowrank_spec`).

A spec holds only str/int/float/bool/list/dict values so that the checkpoint loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx, nn

from rankshrink.errors import InputError
from rankshrink.models.graph_spec import build_graph, graph_spec
from rankshrink.models.lowrank_spec import build_low_rank, has_low_rank, low_rank_spec
from rankshrink.models.token_spec import build_token_encoder, token_encoder_spec
from rankshrink.nn.encoder import TokenClassifier, build_encoder, encoder_spec
from rankshrink.nn.folded_encoder import AttentionWithOut, build_folded, folded_spec
from rankshrink.nn.indexed import IndexedLinear
from rankshrink.nn.token_encoder import TokenEncoder

CHECKPOINT_FORMAT = "rankshrink.checkpoint/1"

# kind -> (constructor from spec, spec from module). Only modules with no hidden state beyond
# their parameters/buffers are listed, so spec + state_dict describe the model completely.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


def layer_spec(module: nn.Module) -> dict[str, Any]:
    """Describe one module of a sequential model as a plain dict.

    Raises:
        InputError: the module type has no spec (rankshrink cannot rebuild it).
    """
    if isinstance(module, IndexedLinear):
        return module.spec()
    if isinstance(module, nn.Linear):
        return {
            "kind": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
        }
    if isinstance(module, nn.LeakyReLU):
        return {"kind": "leaky_relu", "negative_slope": float(module.negative_slope)}
    if isinstance(module, nn.GELU):
        return {"kind": "gelu", "approximate": module.approximate}
    for kind, cls in _ACTIVATIONS.items():
        if type(module) is cls:
            return {"kind": kind}
    if isinstance(module, nn.ELU):
        return {"kind": "elu", "alpha": float(module.alpha)}
    if isinstance(module, nn.Softplus):
        return {"kind": "softplus", "beta": float(module.beta), "threshold": float(module.threshold)}
    if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
        kind = "softmax" if isinstance(module, nn.Softmax) else "log_softmax"
        return {"kind": kind, "dim": module.dim}
    if isinstance(module, nn.Dropout):
        return {"kind": "dropout", "p": float(module.p)}
    if isinstance(module, nn.BatchNorm1d):
        return {
            "kind": "batchnorm1d",
            "num_features": module.num_features,
            "eps": float(module.eps),
            "affine": module.affine,
        }
    if isinstance(module, nn.Flatten):
        return {"kind": "flatten", "start_dim": module.start_dim, "end_dim": module.end_dim}
    if isinstance(module, nn.LayerNorm):
        return {
            "kind": "layer_norm",
            "normalized_shape": list(module.normalized_shape),
            "eps": float(module.eps),
            "affine": module.elementwise_affine,
            "bias": module.bias is not None,
        }
    raise InputError(f"cannot describe module {type(module).__name__} in a sequential spec")


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """Build one module from its spec (the inverse of :func:`layer_spec`)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise InputError(f"architecture layer spec must be a dict with a 'kind', got {spec!r:.80}")
    kind = spec["kind"]
    try:
        if kind == "linear":
            n_in, n_out = _pos_int(spec, "in_features"), _pos_int(spec, "out_features")
            if (
                n_in * n_out > _MAX_ELEMENTS
            ):  # refuse before the allocator tries (and the OOM killer)
                raise InputError(f"architecture spec: a {n_out}x{n_in} linear layer is too large")
            return nn.Linear(n_in, n_out, bias=bool(spec.get("bias", True)))
        if kind == "indexed_linear":
            return IndexedLinear.from_spec(spec)
        if kind == "leaky_relu":
            return nn.LeakyReLU(float(spec.get("negative_slope", 0.01)))
        if kind == "gelu":
            return nn.GELU(approximate=str(spec.get("approximate", "none")))
        if kind in _ACTIVATIONS:
            return _ACTIVATIONS[kind]()
        if kind == "elu":
            return nn.ELU(float(spec.get("alpha", 1.0)))
        if kind == "softplus":
            return nn.Softplus(float(spec.get("beta", 1.0)), float(spec.get("threshold", 20.0)))
        if kind in ("softmax", "log_softmax"):
            dim = spec.get("dim")
            if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool)):
                raise InputError(f"{kind} dim must be an integer or null, got {dim!r:.40}")
            return nn.Softmax(dim) if kind == "softmax" else nn.LogSoftmax(dim)
        if kind == "dropout":
            p = float(spec.get("p", 0.5))
            if not 0.0 <= p < 1.0:
                raise InputError(f"dropout p must be in [0, 1), got {p}")
            return nn.Dropout(p)
        if kind == "batchnorm1d":
            return nn.BatchNorm1d(
                _pos_int(spec, "num_features"),
                eps=float(spec.get("eps", 1e-5)),
                affine=bool(spec.get("affine", True)),
            )
        if kind == "flatten":
            return nn.Flatten(int(spec.get("start_dim", 1)), int(spec.get("end_dim", -1)))
        if kind == "layer_norm":
            shape = spec.get("normalized_shape")
            if not isinstance(shape, list) or not shape:
                raise InputError(f"layer_norm normalized_shape must be a list, got {shape!r:.40}")
            dims = [_pos_int({"dim": d}, "dim") for d in shape]
            return nn.LayerNorm(
                dims,
                eps=float(spec.get("eps", 1e-5)),
                elementwise_affine=bool(spec.get("affine", True)),
                bias=bool(spec.get("bias", True)),
            )
    except (TypeError, ValueError, OverflowError, RuntimeError, MemoryError) as exc:
        # torch's C++ errors span many lines; the first names the problem
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"bad architecture spec for layer kind {kind!r}: {first}") from None
    raise InputError(f"unknown layer kind {kind!r} in architecture spec")


_MAX_ELEMENTS = 2**31  # 8 GiB of float32 in one layer: far beyond anything this tool targets


def _pos_int(spec: dict[str, Any], key: str) -> int:
    value = spec.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise InputError(
            f"architecture spec: {key} must be a positive integer below 2**31, got {value!r:.40}"
        )
    return value


def build_sequential(arch: dict[str, Any]) -> nn.Sequential:
    """Build the ``nn.Sequential`` an architecture spec describes (weights uninitialised)."""
    if not isinstance(arch, dict) or arch.get("type") != "sequential":
        kind = arch.get("type") if isinstance(arch, dict) else type(arch).__name__
        raise InputError(f"unsupported architecture type {kind!r} (expected 'sequential')")
    layers = arch.get("layers")
    if not isinstance(layers, list) or not layers:
        raise InputError("architecture spec has no 'layers' list")
    return nn.Sequential(*(build_layer(spec) for spec in layers))


def sequential_spec(model: nn.Sequential) -> dict[str, Any]:
    """The architecture spec of a flat ``nn.Sequential`` (the inverse of :func:`build_sequential`)."""
    return {"type": "sequential", "layers": [layer_spec(m) for m in model]}


#: spec type -> builder; the spec types a checkpoint may hold.
_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "sequential": build_sequential,
    "token_classifier": build_encoder,
    "folded_token_classifier": build_folded,
    "token_encoder": build_token_encoder,
    "low_rank": lambda spec: build_low_rank(spec, build_model),
    "graph": lambda spec: build_graph(spec, _build_part),
}


def _build_part(spec: dict[str, Any]) -> nn.Module:
    """A submodule of a graph spec: a chain (a sequential spec) or one layer."""
    return build_sequential(spec) if spec.get("type") == "sequential" else build_layer(spec)


def _describe_part(module: nn.Module) -> dict[str, Any]:
    return sequential_spec(module) if isinstance(module, nn.Sequential) else layer_spec(module)


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Build the module any supported architecture spec describes (weights uninitialised).

    Raises:
        InputError: the spec is not a dict, its type is not supported, or the spec is invalid.
    """
    kind = arch.get("type") if isinstance(arch, dict) else None
    if not isinstance(kind, str) or kind not in _BUILDERS:
        got = kind if isinstance(arch, dict) else type(arch).__name__
        supported = ", ".join(repr(k) for k in _BUILDERS)
        raise InputError(f"unsupported architecture type {got!r:.40} (supported: {supported})")
    return _BUILDERS[kind](arch)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The architecture spec of a flat ``nn.Sequential``, a ``TokenClassifier`` or a
    ``TokenEncoder``.

    Raises:
        InputError: the model is neither, or holds a module a spec cannot describe.
    """
    if has_low_rank(model):  # two-factor layers: the dense twin's spec plus their ranks
        return low_rank_spec(model, model_spec)
    if isinstance(model, TokenClassifier):
        if any(isinstance(m, AttentionWithOut) for m in model.modules()):
            return folded_spec(model)  # compressed by rankshrink
        return encoder_spec(model)
    if isinstance(model, TokenEncoder):
        return token_encoder_spec(model)
    if isinstance(model, nn.Sequential):
        return sequential_spec(model)
    if isinstance(model, fx.GraphModule):  # a traced module, compressed chain by chain
        return graph_spec(model, _describe_part)
    raise InputError(
        f"cannot describe a {type(model).__name__}; a checkpoint needs an nn.Sequential, a"
        " traced graph, a TokenClassifier or a TokenEncoder"
    )


def make_checkpoint(model: nn.Module, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A self-describing checkpoint dict, loadable with ``torch.load(weights_only=True)``.

    Args:
        model: a flat ``nn.Sequential`` of described modules, or a ``TokenClassifier``.
        meta: free-form plain values stored beside the weights (description, accuracy, ...).

    Raises:
        InputError: the model's architecture cannot be described (see :func:`model_spec`).
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": model_spec(model),
        "state_dict": {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }


def count_params(model: nn.Module) -> int:
    """Parameters plus floating-point buffers that an export must store (BatchNorm stats, scales)."""
    total = sum(p.numel() for p in model.parameters())
    total += sum(b.numel() for b in model.buffers() if b.dtype.is_floating_point)
    return total
