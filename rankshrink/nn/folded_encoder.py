"""The modules a folded Transformer is made of, and their self-describing spec.

Folding (:mod:`rankshrink.fold.transformer_fold`) turns a factorized attention block into a
:class:`HeadwiseAttention` — one fused ``qkv`` projection whose heads may have different widths —
followed by a plain ``nn.Linear`` output projection. Keeping the output projection outside the
attention core is what lets other encoder families reuse it: a Hugging Face BERT layer keeps its
output projection in a different module (``attention.output.dense``) from its self-attention.

A folded :class:`~rankshrink.nn.encoder.TokenClassifier` is the original class with some modules
swapped; :func:`folded_spec` / :func:`build_folded` describe and rebuild it from plain values so that
``--save-pt`` writes a checkpoint that loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rankshrink.errors import InputError
from rankshrink.nn.encoder import SPEC_TYPE as BASE_TYPE
from rankshrink.nn.encoder import TokenClassifier, config_from_spec
from rankshrink.nn.indexed import IndexedLinear

SPEC_TYPE = "folded_token_classifier"


class HeadwiseAttention(nn.Module):
    """Multi-head self-attention whose heads have their own query/key and value widths.

    ``qkv`` projects the input to ``[q_0 … q_{H-1} | k_0 … k_{H-1} | v_0 … v_{H-1}]`` with
    ``q_h, k_h`` of width ``qk_widths[h]`` and ``v_h`` of width ``v_widths[h]``; the output is the
    per-head mixes ``softmax(q_h k_hᵀ + bias) v_h`` side by side, of width ``Σ v_widths``. The
    ``1/√d_head`` score scale of the original is already folded into the query weights. Works for
    any sequence length.

    Consecutive heads of equal widths run as one batched attention (the fold orders heads so that
    equal ones are adjacent): an unfused block exports like the original, and a block with a few
    distinct widths costs a few attention ops rather than one per head.
    """

    def __init__(self, in_features: int, qk_widths: list[int], v_widths: list[int]) -> None:
        super().__init__()
        if len(qk_widths) != len(v_widths) or not qk_widths:
            raise ValueError(
                f"need one query/key and one value width per head, got {qk_widths} and {v_widths}"
            )
        if min(qk_widths + v_widths) < 1:
            raise ValueError(f"head widths must be positive, got {qk_widths} and {v_widths}")
        self.qk_widths = [int(w) for w in qk_widths]
        self.v_widths = [int(w) for w in v_widths]
        self.qkv = nn.Linear(in_features, 2 * sum(self.qk_widths) + sum(self.v_widths))
        # runs of equal (qk, v) widths: (heads, qk width, v width)
        self.runs: list[tuple[int, int, int]] = []
        for wq, wv in zip(self.qk_widths, self.v_widths, strict=True):
            if self.runs and self.runs[-1][1:] == (wq, wv):
                self.runs[-1] = (self.runs[-1][0] + 1, wq, wv)
            else:
                self.runs.append((1, wq, wv))

    @property
    def heads(self) -> int:
        return len(self.qk_widths)

    @property
    def out_features(self) -> int:
        return sum(self.v_widths)

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        """``x`` (B, T, C) → (B, T, Σ v_widths); ``attn_bias`` (B, T, T) or (B, 1, T) is added to
        every head's scores (a key-padding mask is ``-inf`` at padded keys)."""
        qk = [n * wq for n, wq, _ in self.runs]
        vv = [n * wv for n, _, wv in self.runs]
        # one Split into static pieces: exports as a single ONNX Split, any T
        parts = torch.split(self.qkv(x), qk + qk + vv, dim=-1)
        R = len(self.runs)
        mixed = []
        for r, (n, _, _) in enumerate(self.runs):
            q, k, v = parts[r], parts[R + r], parts[2 * R + r]  # (B, T, n·w)
            if n > 1:  # (B, T, n·w) -> (B, n, T, w)
                q, k, v = (t.unflatten(-1, (n, -1)).transpose(1, 2) for t in (q, k, v))
            scores = q @ k.transpose(-2, -1)  # (B, [n,] T, T)
            if attn_bias is not None:
                scores = scores + (attn_bias.unsqueeze(1) if n > 1 else attn_bias)
            out = F.softmax(scores, dim=-1) @ v  # (B, [n,] T, wv)
            mixed.append(out.transpose(1, 2).flatten(-2) if n > 1 else out)  # (B, T, n·wv)
        return mixed[0] if R == 1 else torch.cat(mixed, dim=-1)

    def extra_repr(self) -> str:
        return f"qk_widths={self.qk_widths}, v_widths={self.v_widths}"


class AttentionWithOut(nn.Module):
    """``out(core(x))``: a drop-in for :class:`~rankshrink.nn.encoder.SelfAttention`."""

    def __init__(self, core: HeadwiseAttention, out: nn.Linear) -> None:
        super().__init__()
        self.core = core
        self.out = out

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.core(x))


# -- spec ------------------------------------------------------------------------------------


def linear_spec(module: nn.Module) -> dict[str, Any]:
    if isinstance(module, IndexedLinear):
        return module.spec()
    if isinstance(module, nn.Linear):
        return {
            "kind": "linear",
            "in_features": module.in_features,
            "out_features": module.out_features,
        }
    raise InputError(f"cannot describe a folded FFN layer of type {type(module).__name__}")


def build_linear(spec: Any, limit: int, label: str = SPEC_TYPE) -> nn.Module:
    """An FFN layer from its spec; every size in it must be at most ``limit`` (max(d_model, ffn)),
    so that a forged spec cannot make the loader allocate more than the original model holds.
    ``label`` names the spec type in errors."""
    if not isinstance(spec, dict):
        raise InputError(f"{label} spec: layer spec must be a dict, got {spec!r:.40}")
    kind = spec.get("kind")
    sizes = [spec.get("in_features")]
    if kind == "linear":
        sizes.append(spec.get("out_features"))
    elif kind == "indexed_linear":
        for key in ("core", "in_groups"):
            value = spec.get(key)
            if value is not None and not (isinstance(value, list) and len(value) == 2):
                raise InputError(f"{label} spec: {key} must be a pair of sizes")
            sizes += value or []
        if spec.get("core") is None:
            raise InputError(f"{label} spec: an indexed layer needs its core shape")
        if spec.get("out_features") is not None:
            sizes.append(spec["out_features"])
    else:
        raise InputError(f"{label} spec: unknown layer kind {kind!r:.40}")
    for size in sizes:
        if _positive(size, label) > limit:
            raise InputError(f"{label} spec: layer size {size} exceeds the model's {limit}")
    if kind == "linear":
        return nn.Linear(spec["in_features"], spec["out_features"])
    return IndexedLinear.from_spec(spec)


def _positive(value: Any, label: str = SPEC_TYPE) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 2**31:
        raise InputError(f"{label} spec: expected a positive integer, got {value!r:.40}")
    return value


def head_widths(value: Any, heads: int, head_dim: int, what: str, label: str = SPEC_TYPE) -> list[int]:
    # a folded head is never wider than the original's head
    if (
        not isinstance(value, list)
        or len(value) != heads
        or not all(_positive(v, label) <= head_dim for v in value)
    ):
        raise InputError(
            f"{label} spec: {what} must list {heads} head widths of at most {head_dim}"
        )
    return list(value)


def folded_spec(model: TokenClassifier) -> dict[str, Any]:
    """The spec of a folded :class:`TokenClassifier` (inverse of :func:`build_folded`).

    Raises:
        InputError: a layer's attention was not folded into an :class:`AttentionWithOut`.
    """
    blocks = []
    for i, layer in enumerate(model.layers):
        attn = layer.attn
        if not isinstance(attn, AttentionWithOut):
            raise InputError(f"layers.{i}.attn is not a folded attention")
        blocks.append(
            {
                "qk_widths": list(attn.core.qk_widths),
                "v_widths": list(attn.core.v_widths),
                "ffn_in": linear_spec(layer.ffn_in),
                "ffn_out": linear_spec(layer.ffn_out),
            }
        )
    return {"type": SPEC_TYPE, "base": asdict(model.config), "blocks": blocks}


def build_folded(spec: dict[str, Any]) -> TokenClassifier:
    """Build the folded classifier a spec describes (weights uninitialised).

    Raises:
        InputError: a field is missing or malformed.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("base"), dict):
        raise InputError(f"{SPEC_TYPE} spec needs a 'base' encoder spec")
    config = config_from_spec({"type": BASE_TYPE, **spec["base"]})
    blocks = spec.get("blocks")
    if not isinstance(blocks, list) or len(blocks) != config.layers:
        raise InputError(f"{SPEC_TYPE} spec: 'blocks' must list {config.layers} layers")
    with torch.device("meta"):  # no memory or RNG draws for modules about to be replaced
        model = TokenClassifier(config)
    model = model.to_empty(device="cpu")
    for layer, block in zip(model.layers, blocks, strict=True):
        if not isinstance(block, dict):
            raise InputError(f"{SPEC_TYPE} spec: each block must be a dict")
        head_dim = config.d_model // config.heads
        core = HeadwiseAttention(
            config.d_model,
            head_widths(block.get("qk_widths"), config.heads, head_dim, "qk_widths"),
            head_widths(block.get("v_widths"), config.heads, head_dim, "v_widths"),
        )
        layer.attn = AttentionWithOut(core, nn.Linear(core.out_features, config.d_model))
        limit = max(config.d_model, config.ffn)
        layer.ffn_in = build_linear(block.get("ffn_in"), limit)
        layer.ffn_out = build_linear(block.get("ffn_out"), limit)
    return model.eval()


__all__ = [
    "SPEC_TYPE",
    "AttentionWithOut",
    "HeadwiseAttention",
    "build_folded",
    "folded_spec",
]
