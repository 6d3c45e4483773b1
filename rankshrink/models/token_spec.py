"""The self-describing spec of a :class:`~rankshrink.nn.token_encoder.TokenEncoder`, plain or folded.

``--save-pt`` on a Hugging Face folder writes ``{"format", "arch", "state_dict", "meta"}`` with::

    arch = {"type": "token_encoder",
            "config": {...TokenEncoderConfig fields...},
            "blocks": [None | {"qk_widths": [...], "v_widths": [...],
                               "ffn_in": layer spec, "ffn_out": layer spec}, ...]}

A ``None`` block is an encoder layer as loaded (separate query/key/value); a dict is one that
rankshrink folded: a :class:`~rankshrink.nn.folded_encoder.HeadwiseAttention` with per-head widths,
a narrower output projection, and FFN layers that are dense or
:class:`~rankshrink.nn.indexed.IndexedLinear`. Only plain values, so the checkpoint loads with
``torch.load(weights_only=True)`` and rebuilds without ``transformers``. Every field read from a
file is checked before anything is allocated.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import torch
from torch import nn

from rankshrink.errors import InputError
from rankshrink.nn.folded_encoder import HeadwiseAttention, build_linear, head_widths, linear_spec
from rankshrink.nn.token_encoder import (
    ACTIVATIONS,
    HEADS,
    POSITIONS,
    SelfAttentionCore,
    TokenEncoder,
    TokenEncoderConfig,
)

SPEC_TYPE = "token_encoder"
MAX_FIELD = 2**20  # per integer field; products of a few cannot overflow before the bound below
MAX_PARAMS = 2**31  # 8 GiB of float32, as for the other spec types
_CHOICES = {
    "kind": ("base", "classifier"),
    "positions": POSITIONS,
    "hidden_act": ACTIVATIONS,
    "head": HEADS,
}
_FLOATS = ("layer_norm_eps", "dropout", "classifier_dropout")
_AT_LEAST_ZERO = ("pad_token_id", "classes")


def token_encoder_spec(model: TokenEncoder) -> dict[str, Any]:
    """The spec of ``model`` (the inverse of :func:`build_token_encoder`).

    Raises:
        InputError: a layer is neither as loaded nor folded by rankshrink, so no spec rebuilds it.
    """
    blocks: list[dict[str, Any] | None] = []
    for i, layer in enumerate(model.layers):
        core = layer.attention.self
        if isinstance(core, SelfAttentionCore):
            blocks.append(None)
        elif isinstance(core, HeadwiseAttention):
            blocks.append(
                {
                    "qk_widths": list(core.qk_widths),
                    "v_widths": list(core.v_widths),
                    "ffn_in": linear_spec(layer.intermediate.dense),
                    "ffn_out": linear_spec(layer.output.dense),
                }
            )
        else:
            raise InputError(f"layers.{i}.attention.self is a {type(core).__name__}; no spec")
    spec = {"type": SPEC_TYPE, "config": asdict(model.config), "blocks": blocks}
    # the spec must rebuild exactly these tensors: compare with a weightless twin
    twin = _build(spec, torch.device("meta"))
    expected = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if actual != expected:
        diff = sorted(set(actual.items()) ^ set(expected.items()))
        raise InputError(f"cannot describe this TokenEncoder: its tensors differ at {diff[0][0]}")
    return spec


def build_token_encoder(spec: dict[str, Any]) -> TokenEncoder:
    """Build the encoder a spec describes (weights uninitialised, eval mode).

    Raises:
        InputError: a field is missing, unknown, of the wrong type or out of range (one line
            naming it), or the model would be unreasonably large.
    """
    return _build(spec, torch.device("cpu")).eval()


def _build(spec: Any, device: torch.device) -> TokenEncoder:
    if not isinstance(spec, dict) or spec.get("type") != SPEC_TYPE:
        raise InputError(f"{SPEC_TYPE} spec must be a dict with type {SPEC_TYPE!r}")
    unknown = sorted(str(k) for k in spec if k not in ("type", "config", "blocks"))
    if unknown:
        raise InputError(f"{SPEC_TYPE} spec: unknown field {unknown[0]!r:.40}")
    cfg = config_from_dict(spec.get("config"))
    blocks = spec.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != cfg.layers:
        raise InputError(f"{SPEC_TYPE} spec: 'blocks' must list {cfg.layers} layers")
    with torch.device("meta"):  # no memory or RNG draws: load_state_dict fills every tensor
        model = TokenEncoder(cfg)
    C, head_dim = cfg.hidden_size, cfg.hidden_size // cfg.heads
    limit = max(C, cfg.intermediate_size)
    for i, (layer, block) in enumerate(zip(model.layers, blocks, strict=True)):
        if block is None:
            continue
        if not isinstance(block, dict):
            raise InputError(f"{SPEC_TYPE} spec: block {i} must be null or a dict")
        with torch.device("meta"):
            core = HeadwiseAttention(
                C,
                head_widths(block.get("qk_widths"), cfg.heads, head_dim, "qk_widths", SPEC_TYPE),
                head_widths(block.get("v_widths"), cfg.heads, head_dim, "v_widths", SPEC_TYPE),
            )
            first = build_linear(block.get("ffn_in"), limit, SPEC_TYPE)
            second = build_linear(block.get("ffn_out"), limit, SPEC_TYPE)
            layer.attention.output.dense = nn.Linear(core.out_features, C)
        # the FFN's sizes must chain, or the forward would fail long after loading
        if (first.in_features, first.out_features, second.out_features) != (
            C,
            second.in_features,
            C,
        ):
            raise InputError(
                f"{SPEC_TYPE} spec: block {i}'s FFN maps {first.in_features} → {first.out_features}"
                f" → {second.in_features} → {second.out_features}; expected {C} → n → n → {C}"
            )
        layer.attention.self = core
        layer.intermediate.dense, layer.output.dense = first, second
    return model if device.type == "meta" else model.to_empty(device=device)


def config_from_dict(values: Any) -> TokenEncoderConfig:
    """A :class:`TokenEncoderConfig` from plain values read from a file, checked field by field.

    Raises:
        InputError: see :func:`build_token_encoder`.
    """
    if not isinstance(values, dict):
        raise InputError(f"{SPEC_TYPE} spec: 'config' must be a dict")
    names = [f.name for f in fields(TokenEncoderConfig)]
    unknown = sorted(str(k) for k in values if k not in names)
    if unknown:  # a newer writer's field this version would silently ignore
        raise InputError(f"{SPEC_TYPE} spec: unknown config field {unknown[0]!r:.40}")
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(f"{SPEC_TYPE} spec: missing config field {missing[0]!r}")
    for name in names:
        value = values[name]
        if name in _CHOICES:
            if value not in _CHOICES[name]:
                raise InputError(
                    f"{SPEC_TYPE} spec: {name} must be one of {', '.join(_CHOICES[name])},"
                    f" got {value!r:.40}"
                )
        elif name in _FLOATS:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            # eps in (0, 1), dropout rates in [0, 1); NaN fails every comparison, so it is refused
            ok = number and (0 < value < 1 if name == "layer_norm_eps" else 0 <= value < 1)
            if not ok:
                raise InputError(f"{SPEC_TYPE} spec: {name} out of range, got {value!r:.40}")
        else:
            low = 0 if name in _AT_LEAST_ZERO else 1
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or not (low <= value <= MAX_FIELD)
            ):
                raise InputError(
                    f"{SPEC_TYPE} spec: {name} must be an integer in [{low}, {MAX_FIELD}],"
                    f" got {value!r:.40}"
                )
    cfg = TokenEncoderConfig(**values)
    problems = {
        "hidden_size must be divisible by heads": cfg.hidden_size % cfg.heads,
        "a classifier needs classes and a head; a base model neither": (
            (cfg.kind == "classifier") != (cfg.classes > 0)
            or (cfg.kind == "classifier") != (cfg.head != "none")
        ),
        "the position table leaves no room for a token": cfg.max_length < 1,
    }
    for problem, bad in problems.items():
        if bad:
            raise InputError(f"{SPEC_TYPE} spec: {problem}")
    if _num_params(cfg) > MAX_PARAMS:
        raise InputError(f"{SPEC_TYPE} spec: {_num_params(cfg):,} parameters is too large")
    return cfg


def _num_params(cfg: TokenEncoderConfig) -> int:
    """Parameters of the unfolded encoder (an upper bound for a folded one)."""
    C, E, N = cfg.hidden_size, cfg.embedding_size, cfg.intermediate_size
    embed = (cfg.vocab_size + cfg.max_positions + cfg.type_vocab_size + 2) * E + (E + 1) * C
    layer = 4 * (C * C + C) + (C * N + N) + (N * C + C) + 4 * C
    return embed + cfg.layers * layer + (C + 1) * (C + cfg.classes)
