"""Token data for Hugging Face encoders (``--data`` with a model folder).

The file (``.npz``, ``.pt`` or ``.safetensors``) holds ``input_ids`` (N, T) and optionally
``attention_mask`` and ``token_type_ids`` of the same shape — the names Hugging Face tokenizers
give them — with or without labels ``y`` (N,) and a recorded ``train_idx``/``test_idx`` split.
The three arrays are stacked into one ``x`` (N, 3, T) of int64 so that the training loop, which
indexes a single input tensor, runs unchanged (:class:`~rankshrink.io.hf_folder.PackedTokens` unstacks it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rankshrink.errors import InputError
from rankshrink.io.data import Dataset, as_tensor, checked_labels, read_arrays, split_dataset
from rankshrink.nn.token_encoder import TokenEncoderConfig

TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
#: a folder's tokenizer files --text can use (a fast tokenizer, or BERT's WordPiece vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def load_token_data(
    path: str | Path,
    vocab_size: int,
    max_length: int,
    type_vocab_size: int = 2,
    seed: int = 0,
) -> Dataset:
    """Read, check and split a token data file.

    Args:
        vocab_size: ids must lie in ``[0, vocab_size)``.
        max_length: the model's ``max_position_embeddings``; T may not exceed it.
        type_vocab_size: token type ids must lie in ``[0, type_vocab_size)``.

    Returns:
        A :class:`~rankshrink.io.data.Dataset` whose ``x`` is (N, 3, T) int64: ids, mask, types.

    Raises:
        InputError: missing ``input_ids``, bad shapes or values, a mask row with no token, bad
            labels or split.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    return token_dataset(read_arrays(path), path, vocab_size, max_length, type_vocab_size, seed)


def load_text_data(
    path: str | Path,
    folder: str | Path,
    vocab_size: int,
    max_length: int,
    type_vocab_size: int = 2,
    seed: int = 0,
) -> Dataset:
    """Tokenize a text file (one sentence a line) with the tokenizer a model folder ships.

    Sentences are padded to the longest one and truncated to ``max_length`` tokens; there are no
    labels (the compressed model distills the original). The tokenizer is read from the folder
    only (``local_files_only``, never ``trust_remote_code``).

    Raises:
        InputError: unreadable or empty text, fewer than two sentences, or no usable tokenizer.
    """
    from rankshrink.io.hf_folder import require_transformers

    path, folder = Path(path), Path(folder)
    if not path.is_file():
        raise InputError(f"text file not found: {path}")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not readable UTF-8 text ({str(exc)[:120]})") from None
    lines = [line for line in lines if line]
    if len(lines) < 2:
        raise InputError(f"{path}: need at least two non-empty lines, got {len(lines)}")
    # without its files the library builds an empty tokenizer that maps every word to [UNK]
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            f"{folder} ships no usable tokenizer for --text (none of {', '.join(TOKENIZER_FILES)})"
        )
    transformers = require_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
        encoded = tokenizer(
            lines, padding="longest", truncation=True, max_length=max_length, return_tensors="np"
        )
    except Exception as exc:  # no tokenizer files, custom code, a broken vocabulary, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{folder} ships no usable tokenizer for --text ({first[:160]})") from None
    arrays = {k: encoded[k] for k in TOKEN_KEYS if k in encoded}
    return token_dataset(arrays, path, vocab_size, max_length, type_vocab_size, seed)


def token_dataset(
    arrays: dict[str, Any],
    path: Path,
    vocab_size: int,
    max_length: int,
    type_vocab_size: int = 2,
    seed: int = 0,
) -> Dataset:
    """Check token arrays (named as in :data:`TOKEN_KEYS`, plus ``y`` and a split) and split them.

    Raises:
        InputError: see :func:`load_token_data`.
    """
    if "input_ids" not in arrays:
        found = ", ".join(sorted(map(str, arrays))) or "nothing"
        raise InputError(
            f"{path}: a Hugging Face model needs token data with 'input_ids' (and optionally"
            f" 'attention_mask', 'token_type_ids'); found: {found}"
        )
    ids = _ints(arrays["input_ids"], "input_ids", path, None)
    n, T = ids.shape
    if T > max_length:
        raise InputError(f"{path}: sequences of {T} tokens exceed the model's {max_length}")
    mask = (
        _ints(arrays["attention_mask"], "attention_mask", path, (n, T))
        if "attention_mask" in arrays
        else torch.ones_like(ids)
    )
    types = (
        _ints(arrays["token_type_ids"], "token_type_ids", path, (n, T))
        if "token_type_ids" in arrays
        else torch.zeros_like(ids)
    )
    _in_range(ids, vocab_size, "input_ids", path)
    _in_range(types, type_vocab_size, "token_type_ids", path)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InputError(f"{path}: 'attention_mask' must hold only 0 and 1")
    empty = int((mask.sum(1) == 0).sum())
    if empty:
        raise InputError(f"{path}: {empty} rows of 'attention_mask' mask out every token")
    x = torch.stack([ids, mask, types], dim=1)  # (N, 3, T)
    y = checked_labels(arrays["y"], n, path) if "y" in arrays else None
    return split_dataset(x, y, arrays, path, seed)


def _ints(value: Any, name: str, path: Path, shape: tuple[int, int] | None) -> Tensor:
    t = as_tensor(value, name, path)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise InputError(f"{path}: '{name}' has dtype {t.dtype}; expected integers")
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(
            f"{path}: '{name}' must have shape (samples, tokens), got {tuple(t.shape)}"
        )
    if shape is not None and tuple(t.shape) != shape:
        raise InputError(
            f"{path}: '{name}' must have the shape of 'input_ids' {shape}, got {tuple(t.shape)}"
        )
    return t.long()


def _in_range(t: Tensor, bound: int, name: str, path: Path) -> None:
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= bound:
        raise InputError(f"{path}: '{name}' holds values {lo}..{hi} outside [0, {bound})")


def load_for_encoder(
    path: str | Path, folder: str | Path, cfg: TokenEncoderConfig, seed: int = 0
) -> Dataset:
    """``--data`` for a token encoder: a ``.txt`` file is tokenized with ``folder``'s tokenizer
    (:func:`load_text_data`), anything else read as token arrays (:func:`load_token_data`); ids,
    lengths and labels are checked against the encoder's ``cfg``.

    Raises:
        InputError: see those functions; labels given to a base model, or out of range.
    """
    path = Path(path)
    sizes = {
        "vocab_size": cfg.vocab_size,
        "max_length": cfg.max_length,
        "type_vocab_size": cfg.type_vocab_size,
        "seed": seed,
    }
    if path.suffix.lower() == ".txt":
        data = load_text_data(path, folder, **sizes)
    else:
        data = load_token_data(path, **sizes)
    if data.has_labels:
        if cfg.kind == "base":
            raise InputError(f"{path} has labels 'y', but {folder} is a base model")
        top = int(max(data.y_train.max(), data.y_test.max()))  # type: ignore[union-attr]
        if top >= cfg.classes:
            raise InputError(f"{path}: label {top} is out of range for {cfg.classes} classes")
    return data
