"""A small Transformer encoder classifier whose every projection is a plain ``nn.Linear``.

This is the Transformer that rankshrink's sample model uses and that Transformer compression will
operate on. It is written out by hand rather than with ``nn.MultiheadAttention`` or
``F.scaled_dot_product_attention`` because compression has to reach inside attention: q, k, v and
the output projection must be separate ``nn.Linear`` modules (fusion factorizes each of them), and
the head split must be visible in the forward (row fusions in q/k/v stay within one head, SPEC §3;
``P_qᵀ P_k`` and ``P_v`` fold per head, SPEC §4).

Input is a flat ``(batch, tokens · token_dim)`` tensor, reshaped inside the model, so the same data
files that feed the MLP samples (``x`` of shape ``(N, 64)``) feed this model unchanged.

The architecture round-trips through a plain dict (:func:`encoder_spec` / :func:`build_encoder`)
holding only ints, floats and strings, so a checkpoint of it loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from rankshrink.errors import InputError

SPEC_TYPE = "token_classifier"

# Each integer field must lie in [1, _MAX_FIELD]: far above anything this tool targets, yet small
# enough that products of a few fields cannot overflow before the parameter bound below is checked.
_MAX_FIELD = 2**20
# Refuse specs whose parameters would not fit in 8 GiB of float32 before the allocator tries (and
# the OOM killer answers) — the same bound arch.py puts on one sequential Linear layer.
_MAX_PARAMS = 2**31
_INT_FIELDS = ("tokens", "token_dim", "d_model", "heads", "layers", "ffn", "classes")


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a :class:`TokenClassifier`; the spec is this plus ``"type"``."""

    tokens: int  # sequence length T
    token_dim: int  # features per token in the flat input
    d_model: int  # residual-stream width C
    heads: int  # attention heads; d_model must be divisible by it
    layers: int  # encoder layers
    ffn: int  # hidden width of each feed-forward block
    classes: int  # outputs of the classifier head
    dropout: float = 0.0  # on both residual branches, training only

    def num_params(self) -> int:
        """Parameter count of the model this config builds (checked before allocating it)."""
        C, N = self.d_model, self.ffn
        per_layer = 4 * (C * C + C) + (C * N + N) + (N * C + C) + 2 * 2 * C  # attn, ffn, 2 LN
        embed = self.token_dim * C + C + self.tokens * C
        return embed + self.layers * per_layer + 2 * C + C * self.classes + self.classes


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit q, k, v and output projections (no mask)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H = self.heads
        D = C // H
        # split the width into heads: (B, T, C) -> (B, H, T, D)
        q = self.q(x).view(B, T, H, D).transpose(1, 2)
        k = self.k(x).view(B, T, H, D).transpose(1, 2)
        v = self.v(x).view(B, T, H, D).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))  # (B, H, T, T)
        weights = F.softmax(scores, dim=-1)
        mixed = weights @ v  # (B, H, T, D)
        merged = mixed.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.out(merged)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm encoder layer: ``x + attn(ln1(x))``, then ``x + ffn(ln2(x))`` with GELU."""

    def __init__(self, d_model: int, heads: int, ffn: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn_in = nn.Linear(d_model, ffn)
        self.ffn_out = nn.Linear(ffn, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(self.ln2(x)))))


class TokenClassifier(nn.Module):
    """A Transformer encoder classifier over a flat input read as a sequence of tokens.

    ``(B, tokens·token_dim)`` → tokens ``(B, T, token_dim)`` → ``embed`` + learned positions
    ``pos`` → encoder layers → ``ln_f`` → mean over tokens → ``head`` → logits ``(B, classes)``.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.token_dim, config.d_model)
        # small random init, as GPT-2 does for its position table; zeros would make every token
        # position look the same until the gradient separates them
        self.pos = nn.Parameter(0.02 * torch.randn(config.tokens, config.d_model))
        self.layers = nn.ModuleList(
            EncoderLayer(config.d_model, config.heads, config.ffn, config.dropout)
            for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, E = self.config.tokens, self.config.token_dim
        if x.dim() != 2 or x.shape[1] != T * E:
            raise ValueError(
                f"expected inputs of shape (batch, {T * E}) read as {T} tokens of {E} features,"
                f" got {tuple(x.shape)}"
            )
        h = self.embed(x.reshape(x.shape[0], T, E)) + self.pos  # (B, T, C)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.ln_f(h).mean(dim=1))  # (B, classes)


def encoder_spec(model: TokenClassifier) -> dict[str, Any]:
    """The architecture spec of ``model`` (the inverse of :func:`build_encoder`).

    Raises:
        InputError: the model's tensors no longer match its config (e.g. a layer was replaced or
            resized), so the spec would not rebuild it.
    """
    spec = {"type": SPEC_TYPE, **asdict(model.config)}
    # Compare against a weightless twin: the meta device gives shapes without memory or RNG draws.
    with torch.device("meta"):
        twin = TokenClassifier(model.config)
    expected = {k: tuple(v.shape) for k, v in twin.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if actual != expected:
        diff = sorted(set(actual.items()) ^ set(expected.items()))
        raise InputError(
            f"cannot describe this TokenClassifier: its tensors differ from its config at {diff[0][0]}"
        )
    return spec


def build_encoder(spec: dict[str, Any]) -> TokenClassifier:
    """Build the :class:`TokenClassifier` a spec describes (weights freshly initialised).

    Args:
        spec: ``{"type": "token_classifier", "tokens", "token_dim", "d_model", "heads", "layers",
            "ffn", "classes", "dropout"}``.

    Raises:
        InputError: a field is missing, unknown, of the wrong type or out of range (one line naming
            the field), or the model would be unreasonably large.
    """
    return TokenClassifier(config_from_spec(spec))


def config_from_spec(spec: Any) -> EncoderConfig:
    if not isinstance(spec, dict):
        raise InputError(f"{SPEC_TYPE} spec must be a dict, got {type(spec).__name__}")
    if spec.get("type") != SPEC_TYPE:
        raise InputError(
            f"{SPEC_TYPE} spec: type must be {SPEC_TYPE!r}, got {spec.get('type')!r:.40}"
        )
    known = {"type", *_INT_FIELDS, "dropout"}
    unknown = sorted(str(k) for k in spec if k not in known)
    if unknown:  # a newer writer's field this version would silently ignore
        raise InputError(f"{SPEC_TYPE} spec: unknown field {unknown[0]!r:.40}")
    values: dict[str, Any] = {name: _field_int(spec, name) for name in _INT_FIELDS}
    if values["d_model"] % values["heads"]:
        raise InputError(
            f"{SPEC_TYPE} spec: d_model ({values['d_model']}) must be divisible by heads"
            f" ({values['heads']})"
        )
    values["dropout"] = _field_dropout(spec)
    config = EncoderConfig(**values)
    if config.num_params() > _MAX_PARAMS:
        raise InputError(
            f"{SPEC_TYPE} spec: {config.num_params():,} parameters is too large"
            f" (limit {_MAX_PARAMS:,})"
        )
    return config


def _field_int(spec: dict[str, Any], name: str) -> int:
    if name not in spec:
        raise InputError(f"{SPEC_TYPE} spec: missing field {name!r}")
    value = spec[name]
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= _MAX_FIELD:
        raise InputError(
            f"{SPEC_TYPE} spec: {name} must be an integer in [1, {_MAX_FIELD}], got {value!r:.40}"
        )
    return value


def _field_dropout(spec: dict[str, Any]) -> float:
    if "dropout" not in spec:
        raise InputError(f"{SPEC_TYPE} spec: missing field 'dropout'")
    value = spec["dropout"]
    # NaN fails both comparisons, so it is refused along with out-of-range values
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise InputError(f"{SPEC_TYPE} spec: dropout must be a number in [0, 1), got {value!r:.40}")
    return float(value)
