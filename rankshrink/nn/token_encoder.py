"""A BERT-family token encoder in plain torch: what a Hugging Face folder is compressed as.

:mod:`rankshrink.io.hf_folder` copies a folder's weights into a :class:`TokenEncoder` (and checks that it
computes what ``transformers`` computes); from then on nothing of ``transformers`` is needed: the
training loop, the folding, the ONNX export and a ``--save-pt`` checkpoint all see these modules.
Submodules keep BERT's names (``layers.{i}.attention.self.query``, ``attention.output.dense``,
``intermediate.dense``, ``output.dense`` …) so the surgery finds them where the library put them.

The encoder families differ in three places only, all read from :class:`TokenEncoderConfig`:

- positions: BERT and ELECTRA number tokens ``0 … T-1``; RoBERTa (and XLM-R, CamemBERT) count
  only tokens whose id is not ``pad_token_id``, starting at ``pad_token_id + 1`` — so a padding
  token never shifts a real token's position, and the longest sequence is
  ``max_positions - pad_token_id - 1``;
- ELECTRA may embed into a narrower ``embedding_size`` and project up (``embeddings_project``);
- the classifier head: BERT's pooler (``tanh(dense(first token))``) then ``classifier``; RoBERTa's
  and ELECTRA's ``classifier.dense`` → tanh / GELU → ``classifier.out_proj`` on the first token.

The self-attention is a :class:`SelfAttentionCore` with the call signature of
:class:`~rankshrink.nn.folded_encoder.HeadwiseAttention` (``x, attn_bias``), so folding swaps one for
the other in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "silu", "swish")
POSITIONS = ("absolute", "padding")
HEADS = ("none", "pooler", "tanh", "gelu")


def activation(name: str) -> nn.Module:
    """The torch module for a Hugging Face ``hidden_act`` name in :data:`ACTIVATIONS`."""
    if name == "gelu":
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):  # the same tanh approximation
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


@dataclass(frozen=True)
class TokenEncoderConfig:
    """Shape and family of a :class:`TokenEncoder` (plain values: a checkpoint stores it)."""

    kind: str  # "base" (returns the last hidden state) or "classifier" (returns logits)
    vocab_size: int
    hidden_size: int  # C, the residual stream
    embedding_size: int  # E; ≠ C only for ELECTRA, which projects E → C
    layers: int
    heads: int
    intermediate_size: int  # FFN width
    max_positions: int  # rows of the position table
    type_vocab_size: int
    pad_token_id: int
    positions: str  # "absolute" (BERT, ELECTRA) or "padding" (RoBERTa), see the module docstring
    hidden_act: str
    layer_norm_eps: float
    head: str  # "none" (base), "pooler" (BERT), "tanh" (RoBERTa), "gelu" (ELECTRA)
    classes: int  # 0 for a base model
    dropout: float = 0.0  # hidden dropout, fine-tuning only
    classifier_dropout: float = 0.0

    @property
    def max_length(self) -> int:
        """The longest sequence the position table serves."""
        if self.positions == "padding":
            return self.max_positions - self.pad_token_id - 1
        return self.max_positions


class Embeddings(nn.Module):
    """Word + token type + position embeddings, then LayerNorm (and dropout while training)."""

    def __init__(self, cfg: TokenEncoderConfig) -> None:
        super().__init__()
        E = cfg.embedding_size
        # padding_idx as the library sets it: the pad rows get no gradient while fine-tuning
        pad = cfg.pad_token_id if cfg.pad_token_id < cfg.vocab_size else None
        self.word_embeddings = nn.Embedding(cfg.vocab_size, E, padding_idx=pad)
        self.position_embeddings = nn.Embedding(
            cfg.max_positions,
            E,
            padding_idx=cfg.pad_token_id if cfg.positions == "padding" else None,
        )
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, E)
        self.LayerNorm = nn.LayerNorm(E, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.pad_token_id = cfg.pad_token_id
        self.padding_positions = cfg.positions == "padding"

    def positions(self, input_ids: Tensor) -> Tensor:
        """Position ids, (B, T) or (1, T)."""
        if self.padding_positions:  # RoBERTa: pads keep pad_token_id, real tokens count from +1
            real = input_ids.ne(self.pad_token_id).long()  # (B, T)
            return torch.cumsum(real, dim=1) * real + self.pad_token_id
        return torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(self.positions(input_ids))  # (B, T, E)
        return self.dropout(self.LayerNorm(x))


class SelfAttentionCore(nn.Module):
    """Multi-head self-attention over separate ``query``/``key``/``value`` projections.

    The same call signature as :class:`~rankshrink.nn.folded_encoder.HeadwiseAttention`: ``x`` (B, T, C)
    and an additive ``attn_bias`` (B, 1, T) → the heads' mixes side by side (B, T, width).
    """

    def __init__(self, query: nn.Module, key: nn.Module, value: nn.Module, heads: int) -> None:
        super().__init__()
        self.query, self.key, self.value = query, key, value
        self.heads = heads

    def forward(self, x: Tensor, attn_bias: Tensor | None = None) -> Tensor:
        # no attention dropout: fine-tuning a trained model post hoc, the teacher runs without it
        q, k, v = (
            p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, T, d)
            for p in (self.query, self.key, self.value)
        )
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, T)
        if attn_bias is not None:
            scores = scores + attn_bias.unsqueeze(1)  # (B, 1, 1, T): the same for every head
        mixed = torch.softmax(scores, dim=-1) @ v  # (B, H, T, d)
        return mixed.transpose(1, 2).flatten(-2)  # (B, T, H·d)


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(h)) + x)``: BERT's ``attention.output`` and ``output``."""

    def __init__(self, in_features: int, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + x)


class Attention(nn.Module):
    """``self`` (the attention core) and ``output`` (out projection, residual, LayerNorm)."""

    def __init__(self, cfg: TokenEncoderConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.self = SelfAttentionCore(nn.Linear(C, C), nn.Linear(C, C), nn.Linear(C, C), cfg.heads)
        self.output = AddNorm(C, C, cfg.layer_norm_eps, cfg.dropout)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        return self.output(self.self(x, attn_bias), x)


class Intermediate(nn.Module):
    """The FFN's first half: ``act(dense(x))``."""

    def __init__(self, cfg: TokenEncoderConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    """One post-LayerNorm encoder layer, as BERT has it."""

    def __init__(self, cfg: TokenEncoderConfig) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = AddNorm(
            cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, cfg.dropout
        )

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        x = self.attention(x, attn_bias)
        return self.output(self.intermediate(x), x)


class Pooler(nn.Module):
    """BERT's pooler: ``tanh(dense(first token))``."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class ClassificationHead(nn.Module):
    """RoBERTa's and ELECTRA's head: ``out_proj(act(dense(first token)))``."""

    def __init__(self, cfg: TokenEncoderConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = nn.Tanh() if cfg.head == "tanh" else nn.GELU()
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.dense(self.dropout(x[:, 0])))
        return self.out_proj(self.dropout(x))


class TokenEncoder(nn.Module):
    """``(input_ids, attention_mask, token_type_ids)`` (B, T) each → the encoder's output.

    The output is the last hidden state (B, T, C) for a base model and the logits (B, classes)
    for a sequence classifier. Padded keys get the most negative float as score bias, so a padded
    token changes no unpadded token's output.
    """

    def __init__(self, cfg: TokenEncoderConfig) -> None:
        super().__init__()
        if cfg.kind not in ("base", "classifier") or (cfg.kind == "base") != (cfg.head == "none"):
            raise ValueError(f"kind {cfg.kind!r} does not go with head {cfg.head!r}")
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.embeddings_project = (
            nn.Linear(cfg.embedding_size, cfg.hidden_size)
            if cfg.embedding_size != cfg.hidden_size
            else None
        )
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.layers))
        self.pooler = Pooler(cfg.hidden_size) if cfg.head == "pooler" else None
        self.dropout = nn.Dropout(cfg.classifier_dropout)
        self.classifier: nn.Module | None = None
        if cfg.head == "pooler":
            self.classifier = nn.Linear(cfg.hidden_size, cfg.classes)
        elif cfg.head != "none":
            self.classifier = ClassificationHead(cfg)

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def heads(self) -> int:
        return self.config.heads

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, E)
        if self.embeddings_project is not None:
            x = self.embeddings_project(x)  # (B, T, C)
        keep = attention_mask[:, None, :].to(x.dtype)  # (B, 1, T)
        bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, bias)
        if self.classifier is None:
            return x
        if self.pooler is not None:
            return self.classifier(self.dropout(self.pooler(x)))
        return self.classifier(x)


class PackedTokens(nn.Module):
    """``x`` (B, 3, T) = ids, mask, types stacked → the encoder's output, for the training loop.

    A base model's padded positions are zeroed, so that distilling the last hidden state does not
    spend capacity on tokens no one reads.
    """

    def __init__(self, encoder: TokenEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        ids, mask, types = x[:, 0], x[:, 1], x[:, 2]
        out = self.encoder(ids, mask, types)
        if self.encoder.kind == "base":
            out = out * mask[..., None].to(out.dtype)
        return out
