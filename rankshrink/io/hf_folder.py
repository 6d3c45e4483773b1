"""Hugging Face BERT-family folders: load them safely as a plain-torch token encoder.

A folder is ``config.json`` plus ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``). Loading never downloads (``local_files_only``), never runs code
from the folder (``trust_remote_code=False``, and a config with an ``auto_map`` is refused) and
never unpickles (``use_safetensors=True``; a folder holding only ``.bin`` weights is refused).

The loaded model's weights move into a :class:`~rankshrink.nn.token_encoder.TokenEncoder`
(:mod:`rankshrink.models.hf_families` says how, per family): plain torch modules with BERT's names, so
the export does not trace the library's mask utilities, whose code differs between
``transformers`` versions, and a compressed encoder saves as a checkpoint that rebuilds without
``transformers``. That the encoder computes what the library computes is checked on every load.

What the folder's ``config.json`` must hold is checked first (:mod:`rankshrink.io.hf_config`);
this module finds the safetensors weights (pickled weights are refused) and loads them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from rankshrink.errors import InputError, UnsupportedModelError
from rankshrink.io.checkpoint import LoadedModel, checked_weights, load_model, sha256_file
from rankshrink.io.hf_config import architecture, is_hf_folder, read_config
from rankshrink.models.hf_families import (
    SUPPORTED,
    encoder_config,
    encoder_from_hf,
    token_layout,
)
from rankshrink.nn.token_encoder import (
    PackedTokens,
    SelfAttentionCore,
    TokenEncoder,
    TokenEncoderConfig,
)

__all__ = [
    "SUPPORTED",
    "PackedTokens",
    "SelfAttentionCore",
    "TokenEncoder",
    "is_hf_folder",
    "load_hf_folder",
    "load_model_or_folder",
    "read_config",
    "token_layout",
    "weight_files",
]

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
            document = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"{index} is not a safetensors index ({str(exc)[:120]})") from None
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
        if not isinstance(weight_map, dict):
            raise InputError(f"{index} has no 'weight_map' object (tensor name -> shard file)")
        names: set[str] = set()
        for name in weight_map.values():
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
            names.add(name)
        files = []
        for name in sorted(names):
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
        InputError: see :func:`~rankshrink.io.hf_config.read_config`, :func:`weight_files`; the
            weights do not match the config; or ``transformers`` is missing.
        UnsupportedModelError: the encoder does not reproduce the library's forward.
    """
    path = Path(path)
    config = read_config(path)
    files = weight_files(path)
    transformers = require_transformers()
    arch = architecture(config)
    model_type, kind = SUPPORTED[arch]
    cls = getattr(transformers, arch, None)
    if cls is None:
        raise UnsupportedModelError(
            f"{path}: transformers {transformers.__version__} has no {arch}; upgrade it"
        )
    transformers.utils.logging.set_verbosity_error()  # library code never prints
    transformers.utils.logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            str(path),
            local_files_only=True,
            trust_remote_code=False,
            use_safetensors=True,
            attn_implementation="eager",
            ignore_mismatched_sizes=True,  # reported below in our words, not the library's
            output_loading_info=True,
        )
    except Exception as exc:  # the library raises many types for a bad folder
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path}: cannot load the model ({first[:200]})") from None
    # the library fills missing or mismatched tensors with random values: not the user's model
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        raise InputError(
            f"{path}: config.json gives other shapes than the weights for"
            f" {_tensors(len(mismatched))} (e.g. {_mismatch(mismatched[0])})"
        )
    missing = sorted(map(str, info.get("missing_keys") or []))
    if missing:
        raise InputError(
            f"{path}: the weights lack {_tensors(len(missing))} the config needs"
            f" (e.g. {missing[0][:80]})"
        )
    model = checked_weights(model.float().eval(), path)  # NaN/Inf: refused like a checkpoint's
    cfg = encoder_config(model.config, model_type, kind, str(path))
    batch, reference = _reference(model, cfg, path)  # before the encoder takes the weights
    encoder = encoder_from_hf(model, cfg, str(path))
    _check_same_forward(encoder, batch, reference, model_type, path)
    digest = sha256_file(files[0]) if len(files) == 1 else _folder_digest(files)
    meta = {"architecture": arch, "model_type": model_type, "config": config}
    return LoadedModel(encoder, path, "huggingface", digest, meta)


def _tensors(n: int) -> str:
    return f"{n} tensor" if n == 1 else f"{n} tensors"


def _mismatch(entry: Any) -> str:
    """``(name, shape in the file, shape the config gives)``, as transformers reports it."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, in_file, wanted = entry
        return f"{name}: {tuple(in_file)} in the weights, {tuple(wanted)} by the config"
    return str(entry)[:120]


def load_model_or_folder(
    path: str | Path, arch: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """A Hugging Face folder (:func:`load_hf_folder`) or a checkpoint file
    (:func:`~rankshrink.io.checkpoint.load_model`).

    Raises:
        InputError: as those do; ``--arch``/``--trust-pickle`` given with a folder.
    """
    path = Path(path)
    if not is_hf_folder(path):
        return load_model(path, arch=arch, trust_pickle=trust_pickle)
    if arch is not None or trust_pickle:
        raise InputError(f"{path} is a Hugging Face folder; drop --arch and --trust-pickle")
    return load_hf_folder(path)


def _folder_digest(files: list[Path]) -> str:
    """One digest for a sharded checkpoint: the shards' names and digests, in order."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return digest.hexdigest()


@torch.no_grad()
def _reference(
    model: nn.Module, cfg: TokenEncoderConfig, path: Path
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """The library's own output on a small padded batch (unpadded positions for a base model)."""
    gen = torch.Generator().manual_seed(0)
    T = max(2, min(8, cfg.max_length))
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=gen)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T // 2 :] = 0
    types = torch.zeros(2, T, dtype=torch.long)
    try:
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"{path}: cannot run the model ({first[:160]})") from None
    ref = out.last_hidden_state[mask.bool()] if cfg.kind == "base" else out.logits
    if not bool(torch.isfinite(ref).all()):  # finite weights can still overflow (1e38 * 1e38)
        raise InputError(
            f"{path}: the library's own forward gives NaN or Inf on a test batch; the weights"
            " hold values too large to compute with"
        )
    return (ids, mask, types), ref


@torch.no_grad()
def _check_same_forward(
    encoder: TokenEncoder,
    batch: tuple[Tensor, Tensor, Tensor],
    reference: Tensor,
    model_type: str,
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
            f"{path}: this {model_type} variant computes something rankshrink's"
            f" encoder does not reproduce (max abs diff {diff:.3g}); not supported"
        )
