"""Hugging Face BERT-family folders: load them safely and run them as a plain token encoder.

A folder is ``config.json`` plus ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Loading never downloads (``local_files_only``), never runs code
from the folder (``trust_remote_code=False``, and a config with an ``auto_map`` is refused) and
never unpickles (``use_safetensors=True``; a folder holding only ``.bin`` weights is refused).

The loaded model is re-expressed as a :class:`TokenEncoder` that reuses the Hugging Face
submodules (embeddings, LayerNorms, FFN, pooler, classifier) but runs its own forward: the
self-attention becomes a :class:`SelfAttentionCore` with the call signature of
:class:`~rankshrink.folded_encoder.HeadwiseAttention` (``x, attn_bias``), so that folding can swap
one for the other, and the export does not trace the library's mask utilities, whose code differs
between ``transformers`` versions. That the re-expression computes what the library computes is
checked on every load.

:class:`PackedTokens` feeds the training loop, which indexes one tensor ``x``: it takes
``input_ids``, ``attention_mask`` and ``token_type_ids`` stacked as ``(B, 3, T)``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from rankshrink.checkpoint import LoadedModel, sha256_file
from rankshrink.errors import InputError, UnsupportedModelError
from rankshrink.transformer_surgery import BlockLayout, TransformerLayout

#: architectures (``config.json``'s ``architectures[0]``) -> what the encoder returns
SUPPORTED = {"BertModel": "base", "BertForSequenceClassification": "classifier"}
#: model types whose module names match BERT's (``encoder.layer.{i}.attention.self.query`` …)
MODEL_TYPES = ("bert",)
INSTALL_HINT = "pip install 'rankshrink[hf]'"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


class UnsafeWeightsError(UnsupportedModelError):
    """A folder's weights are pickles: loading them could run code (exit 2)."""


def require_transformers() -> ModuleType:
    """The ``transformers`` module, or one clear line saying how to install it.

    Raises:
        InputError: ``transformers`` is not installed.
    """
    try:
        import transformers
    except ImportError:
        raise InputError(
            f"Hugging Face model folders need the optional extra: {INSTALL_HINT}"
            " (transformers is not installed)"
        ) from None
    return transformers


def is_hf_folder(path: Path) -> bool:
    """Is ``path`` a folder that looks like a Hugging Face model (has a ``config.json``)?"""
    return path.is_dir() and (path / "config.json").is_file()


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a folder, checked for what rankshrink supports.

    Raises:
        InputError: missing or unreadable config, remote code, or an unsupported architecture.
    """
    file = path / "config.json"
    if not file.is_file():
        raise InputError(f"{path} is a directory without config.json; not a Hugging Face folder")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{file} is not readable JSON ({str(exc)[:120]})") from None
    if not isinstance(config, dict):
        raise InputError(f"{file} must hold a JSON object")
    if "auto_map" in config:  # the model's code lives in the folder: never run it
        raise UnsupportedModelError(
            f"{file} maps to custom code (auto_map); rankshrink never uses trust_remote_code"
        )
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedModelError(
            f"{file}: model_type {model_type!r:.40} is not supported (supported: {', '.join(MODEL_TYPES)})"
        )
    archs = config.get("architectures") or ["BertModel"]
    if not isinstance(archs, list) or archs[0] not in SUPPORTED:
        raise UnsupportedModelError(
            f"{file}: architecture {archs!r:.60} is not supported (supported: {', '.join(SUPPORTED)})"
        )
    return config


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder (one file, or the shards its index lists).

    Raises:
        InputError: no safetensors weights (pickled ``.bin`` weights are refused), or an index
            whose entries are not plain file names present in the folder.
    """
    single, index = path / WEIGHTS_FILE, path / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{index} is not a safetensors index ({str(exc)[:120]})") from None
        files = []
        for name in names:
            # a shard must be a file in this folder: no paths, no "..", nothing outside it
            if (
                not isinstance(name, str)
                or Path(name).name != name
                or name in ("", ".", "..")
                or "\\" in name
                or not name.endswith(".safetensors")
            ):
                raise InputError(
                    f"{index}: shard {name!r:.60} is not a plain .safetensors file name in the folder"
                )
            if not (path / name).is_file():
                raise InputError(f"{index} lists {name}, which is not in {path}")
            files.append(path / name)
        if not files:
            raise InputError(f"{index} lists no shards")
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeightsError(
            f"{path} holds only pickled weights ({', '.join(pickles[:3])}); rankshrink reads"
            " safetensors only (convert with save_pretrained(..., safe_serialization=True))"
        )
    raise InputError(f"{path} has no {WEIGHTS_FILE} or {INDEX_FILE}")


def load_hf_folder(path: str | Path) -> LoadedModel:
    """Load a BERT-family folder as a :class:`TokenEncoder` (eval mode).

    Raises:
        InputError: see :func:`read_config`, :func:`weight_files`; the weights do not match the
            config; or ``transformers`` is missing.
        UnsupportedModelError: the encoder does not reproduce the library's forward.
    """
    path = Path(path)
    config = read_config(path)
    files = weight_files(path)
    transformers = require_transformers()
    arch = (config.get("architectures") or ["BertModel"])[0]
    cls = getattr(transformers, arch)
    transformers.utils.logging.set_verbosity_error()  # library code never prints
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            str(path),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            attn_implementation="eager",
            output_loading_info=True,
        )
    except Exception as exc:  # the library raises many types for a bad folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: cannot load the model ({first[:200]})") from None
    missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if missing:  # the library would fill them with random values; that is not the user's model
        raise InputError(
            f"{path}: the weights lack {len(missing)} tensors the config needs"
            f" (e.g. {str(missing[0])[:80]})"
        )
    model = model.float().eval()
    kind = SUPPORTED[arch]
    batch, reference = _reference(model, kind, config, path)  # before the encoder takes it over
    encoder = TokenEncoder(model, kind).eval()
    _check_same_forward(encoder, batch, reference, config, path)
    digest = sha256_file(files[0]) if len(files) == 1 else _folder_digest(files)
    meta = {"architecture": arch, "config": config}
    return LoadedModel(encoder, path, "huggingface", digest, meta)


def _folder_digest(files: list[Path]) -> str:
    """One digest for a sharded checkpoint: the shards' names and digests, in order."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return digest.hexdigest()


class SelfAttentionCore(nn.Module):
    """Multi-head self-attention over separate ``query``/``key``/``value`` projections.

    The same call signature as :class:`~rankshrink.folded_encoder.HeadwiseAttention`: ``x`` (B, T, C)
    and an additive ``attn_bias`` (B, 1, T) → the heads' mixes side by side (B, T, width). The
    projections keep BERT's names so that the surgery finds them where the library put them.
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


class TokenEncoder(nn.Module):
    """A BERT-family model as ``(input_ids, attention_mask, token_type_ids) → output``.

    The output is the last hidden state (B, T, C) for a base model and the logits (B, classes) for
    a sequence classifier. Padded keys get the most negative float as score bias, so a padded
    token changes no unpadded token's output.
    """

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        if kind not in ("base", "classifier"):
            raise ValueError(f"kind must be 'base' or 'classifier', got {kind!r}")
        self.kind = kind
        base = model.bert if kind == "classifier" else model
        heads = int(model.config.num_attention_heads)
        self.embeddings = base.embeddings
        self.layers = base.encoder.layer
        for layer in self.layers:
            old = layer.attention.self
            layer.attention.self = SelfAttentionCore(old.query, old.key, old.value, heads)
        self.heads = heads
        self.pooler: nn.Module | None = base.pooler if kind == "classifier" else None
        self.classifier: nn.Module | None = model.classifier if kind == "classifier" else None
        if kind == "classifier" and self.pooler is None:
            raise UnsupportedModelError("a sequence classifier without a pooler is not supported")

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, T, C)
        keep = attention_mask[:, None, :].to(x.dtype)  # (B, 1, T)
        bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.layers:
            mixed = layer.attention.self(x, bias)
            x = layer.attention.output(mixed, x)  # out projection, dropout, LayerNorm(· + x)
            x = layer.output(layer.intermediate(x), x)
        if self.classifier is None:
            return x
        return self.classifier(self.pooler(x))  # type: ignore[misc]


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


def token_layout(packed: PackedTokens) -> TransformerLayout:
    """The surgery layout of a packed encoder: BERT's module names under ``encoder.layers``."""
    enc = packed.encoder
    blocks = tuple(
        BlockLayout(
            name=f"encoder.layers.{i}",
            q=f"encoder.layers.{i}.attention.self.query",
            k=f"encoder.layers.{i}.attention.self.key",
            v=f"encoder.layers.{i}.attention.self.value",
            out=f"encoder.layers.{i}.attention.output.dense",
            ffn_in=f"encoder.layers.{i}.intermediate.dense",
            ffn_out=f"encoder.layers.{i}.output.dense",
            attention=f"encoder.layers.{i}.attention.self",
            out_inside=False,  # BertSelfOutput applies it, then dropout and the LayerNorm
            heads=enc.heads,
        )
        for i in range(len(enc.layers))
    )
    protected = ("encoder.pooler.dense", "encoder.classifier") if enc.kind == "classifier" else ()
    return TransformerLayout(blocks, protected=protected)


@torch.no_grad()
def _reference(
    model: nn.Module, kind: str, config: dict[str, Any], path: Path
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """The library's own output on a small padded batch (unpadded positions for a base model)."""
    gen = torch.Generator().manual_seed(0)
    vocab = int(config.get("vocab_size", 2))
    T = min(8, int(config.get("max_position_embeddings", 8)))
    ids = torch.randint(0, vocab, (2, T), generator=gen)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T // 2 :] = 0
    types = torch.zeros(2, T, dtype=torch.long)
    try:
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"{path}: cannot run the model ({first[:160]})") from None
    ref = out.last_hidden_state[mask.bool()] if kind == "base" else out.logits
    return (ids, mask, types), ref


@torch.no_grad()
def _check_same_forward(
    encoder: TokenEncoder,
    batch: tuple[Tensor, Tensor, Tensor],
    reference: Tensor,
    config: dict[str, Any],
    path: Path,
) -> None:
    """Refuse a variant (relative positions, a decoder, …) whose forward the encoder does not
    reproduce."""
    ours = encoder(*batch)
    if encoder.kind == "base":
        ours = ours[batch[1].bool()]
    diff = float((reference - ours).abs().max())
    scale = float(reference.abs().max()) + 1.0
    if not diff <= 1e-4 * scale:
        raise UnsupportedModelError(
            f"{path}: this {config.get('model_type')} variant computes something rankshrink's"
            f" encoder does not reproduce (max abs diff {diff:.3g}); not supported"
        )
