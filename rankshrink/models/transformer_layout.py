"""Transformer layouts: where each encoder block keeps its projections, by dotted module name.

A :class:`TransformerLayout` is what the Transformer surgery (:mod:`rankshrink.methods.transformer_surgery`)
and fold (:mod:`rankshrink.fold.transformer_fold`) read instead of branching on the model class: the
bundled :class:`~rankshrink.nn.encoder.TokenClassifier` has one (:func:`transformer_layout`), a
Hugging Face BERT another (:func:`rankshrink.models.hf_families.token_layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from rankshrink.errors import UnsupportedModelError
from rankshrink.models.chain import ATTENTION
from rankshrink.nn.encoder import TokenClassifier

ROLES = ("q", "k", "v", "out", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class BlockLayout:
    """Where one encoder block's projections live: dotted module names inside the model."""

    name: str  # the block itself, for reports
    q: str
    k: str
    v: str
    out: str
    ffn_in: str
    ffn_out: str
    attention: str  # the module the folded attention replaces
    # does ``attention``'s forward apply ``out`` itself (the sample's SelfAttention) or does a
    # sibling module apply it (BERT's BertSelfOutput)? Decides how the fold is installed.
    out_inside: bool
    heads: int  # the FFN between ffn_in and ffn_out may use any elementwise activation
    # with ``out_inside=False``: wraps the folded attention core into the module the family's
    # block calls (e.g. BERT's passes a mask and expects a tuple back); None installs it as is
    wrap_core: Callable[[nn.Module], nn.Module] | None = None

    @classmethod
    def under(
        cls,
        prefix: str,
        roles: dict[str, str],
        *,
        out_inside: bool,
        heads: int,
        wrap_core: Callable[[nn.Module], nn.Module] | None = None,
    ) -> BlockLayout:
        """The layout of the block at ``prefix`` whose projections (and ``attention``) sit at
        the dotted paths ``roles`` below it."""
        names = {role: f"{prefix}.{path}" for role, path in roles.items()}
        return cls(prefix, **names, out_inside=out_inside, heads=heads, wrap_core=wrap_core)

    def module(self, role: str) -> str:
        """The module name of a role in :data:`ROLES`."""
        return str(getattr(self, role))


@dataclass(frozen=True)
class TransformerLayout:
    """Every block of an encoder, plus Linear layers with no free axis (classifier heads)."""

    blocks: tuple[BlockLayout, ...]
    protected: tuple[str, ...] = ()  # factorized for fine-tuning, never fused



def is_transformer(model: nn.Module) -> bool:
    """Does ``model`` contain an attention module?"""
    return any(isinstance(m, ATTENTION) for m in model.modules())


def transformer_layout(model: nn.Module) -> TransformerLayout:
    """The layout of a supported Transformer.

    Raises:
        UnsupportedModelError: the model holds attention rankshrink cannot reach into (e.g.
            ``nn.MultiheadAttention``, whose projections are not separate ``nn.Linear`` modules).
    """
    if isinstance(model, TokenClassifier):
        roles = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "out": "attn.out"}
        roles |= {"ffn_in": "ffn_in", "ffn_out": "ffn_out", "attention": "attn"}
        blocks = tuple(
            BlockLayout.under(f"layers.{i}", roles, out_inside=True, heads=model.config.heads)
            for i in range(len(model.layers))
        )
        return TransformerLayout(blocks, protected=("head",))
    attention = next((m for m in model.modules() if isinstance(m, ATTENTION)), None)
    found = type(attention).__name__ if attention is not None else "no attention module"
    raise UnsupportedModelError(
        f"rankshrink compresses Transformers whose q/k/v/out and FFN projections are separate"
        f" nn.Linear modules (TokenClassifier); {type(model).__name__} contains {found}"
    )
