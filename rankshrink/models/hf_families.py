"""Which Hugging Face encoder families rankshrink reads, and how each maps onto a TokenEncoder.

Every family here keeps BERT's module names (``encoder.layer.{i}.attention.self.query``, …,
``intermediate.dense``, ``output.dense``); they differ in how positions are numbered, in ELECTRA's
optional embedding projection and in the classifier head (see :mod:`rankshrink.nn.token_encoder`).
:func:`encoder_config` reads those differences from the library's config, refusing what the plain
encoder does not compute (a decoder, relative positions, a regression head, an unknown activation)
with one line; :func:`encoder_from_hf` moves the weights over by name, so a tensor the layout does
not know about is refused instead of dropped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankshrink.errors import UnsupportedModelError
from rankshrink.models.transformer_layout import BlockLayout, TransformerLayout
from rankshrink.nn.token_encoder import ACTIVATIONS, PackedTokens, TokenEncoder, TokenEncoderConfig

#: ``config.json``'s ``model_type`` -> the family whose positions and head it uses
FAMILIES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "electra": "electra",
}
#: architectures (``config.json``'s ``architectures[0]``) -> (model_type, what the encoder returns)
SUPPORTED = {
    f"{prefix}{suffix}": (model_type, kind)
    for model_type, prefix in (
        ("bert", "Bert"),
        ("roberta", "Roberta"),
        ("xlm-roberta", "XLMRoberta"),
        ("camembert", "Camembert"),
        ("electra", "Electra"),
    )
    for suffix, kind in (("Model", "base"), ("ForSequenceClassification", "classifier"))
}
#: the architecture a config without ``architectures`` is loaded as
BASE_ARCHITECTURE = {mt: arch for arch, (mt, kind) in SUPPORTED.items() if kind == "base"}
_HEADS = {"bert": "pooler", "roberta": "tanh", "electra": "gelu"}


def encoder_config(config: Any, model_type: str, kind: str, where: str) -> TokenEncoderConfig:
    """The :class:`TokenEncoderConfig` of a loaded library config (``PretrainedConfig``).

    Raises:
        UnsupportedModelError: a setting the plain encoder does not reproduce.
    """
    family = FAMILIES[model_type]

    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{where}: {what} is not supported")

    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise refuse("a decoder (is_decoder / add_cross_attention)")
    positions = getattr(config, "position_embedding_type", "absolute")  # transformers 4.x
    if positions != "absolute":
        raise refuse(f"position_embedding_type {positions!r:.40}")
    act = config.hidden_act
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise refuse(f"hidden_act {act!r:.40} (supported: {', '.join(ACTIVATIONS)})")
    classes = 0
    if kind == "classifier":
        classes = int(config.num_labels)
        problem = getattr(config, "problem_type", None)
        # verification compares top-1 classes: a regression or multi-label head has none
        if classes < 2 or problem in ("regression", "multi_label_classification"):
            raise refuse(f"a {problem or 'regression'} head ({classes} labels)")
    hidden = int(config.hidden_size)
    dropout = float(config.hidden_dropout_prob)
    cls_dropout = getattr(config, "classifier_dropout", None)
    return TokenEncoderConfig(
        kind=kind,
        vocab_size=int(config.vocab_size),
        hidden_size=hidden,
        # only ELECTRA embeds into its own width; the others ignore a stray embedding_size
        embedding_size=int(config.embedding_size) if family == "electra" else hidden,
        layers=int(config.num_hidden_layers),
        heads=int(config.num_attention_heads),
        intermediate_size=int(config.intermediate_size),
        max_positions=int(config.max_position_embeddings),
        type_vocab_size=int(config.type_vocab_size),
        pad_token_id=int(config.pad_token_id or 0),
        positions="padding" if family == "roberta" else "absolute",
        hidden_act=act,
        layer_norm_eps=float(config.layer_norm_eps),
        head="none" if kind == "base" else _HEADS[family],
        classes=classes,
        dropout=dropout,
        classifier_dropout=dropout if cls_dropout is None else float(cls_dropout),
    )


@torch.no_grad()
def encoder_from_hf(model: nn.Module, cfg: TokenEncoderConfig, where: str) -> TokenEncoder:
    """Move a library model's weights into a :class:`TokenEncoder` (no copy: they are shared).

    Raises:
        UnsupportedModelError: the library model has tensors the BERT layout has no place for,
            or lacks some it needs.
    """
    state: dict[str, torch.Tensor] = {}
    for name, value in model.base_model.named_parameters():  # buffers are position tables
        if name.startswith("pooler.") and cfg.head != "pooler":
            continue  # a base model's pooler is not part of its output
        state[name.replace("encoder.layer.", "layers.", 1)] = value
    if cfg.kind == "classifier":
        for name, value in model.classifier.named_parameters():
            state[f"classifier.{name}"] = value
    with torch.device("meta"):  # every tensor comes from the library model
        encoder = TokenEncoder(cfg)
    try:
        encoder.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UnsupportedModelError(
            f"{where}: the weights do not fit BERT's module layout ({detail})"
        ) from None
    return encoder.eval()


def token_layout(packed: PackedTokens) -> TransformerLayout:
    """The surgery layout of a packed encoder: BERT's module names under ``encoder.layers``.

    The classifier head (BERT's pooler and classifier, RoBERTa's and ELECTRA's dense and
    out_proj) is protected: its input is the residual stream, its output the model's.
    """
    enc = packed.encoder
    roles = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "out": "attention.output.dense",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
        "attention": "attention.self",
    }
    # out_inside=False: attention.output applies the output projection, then dropout and LayerNorm
    blocks = tuple(
        BlockLayout.under(f"encoder.layers.{i}", roles, out_inside=False, heads=enc.heads)
        for i in range(len(enc.layers))
    )
    head = enc.config.head
    protected: tuple[str, ...] = ()
    if head == "pooler":
        protected = ("encoder.pooler.dense", "encoder.classifier")
    elif head != "none":
        protected = ("encoder.classifier.dense", "encoder.classifier.out_proj")
    return TransformerLayout(blocks, protected=protected)
