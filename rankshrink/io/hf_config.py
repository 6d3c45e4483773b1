"""A Hugging Face folder's ``config.json``, checked before the library builds anything from it.

:func:`read_config` refuses a config that maps to code in the folder (``auto_map``), a model type
or architecture rankshrink does not support, and sizes or rates that no model has (the library
would allocate for them before any error). :func:`architecture` names what a checked config is
loaded as. The weights and the loading itself are :mod:`rankshrink.io.hf_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rankshrink.errors import InputError, UnsupportedModelError
from rankshrink.models.hf_families import BASE_ARCHITECTURE, FAMILIES, SUPPORTED
from rankshrink.models.token_spec import MAX_FIELD, MAX_PARAMS

#: model types whose module names match BERT's (``encoder.layer.{i}.attention.self.query`` …)
MODEL_TYPES = tuple(FAMILIES)


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
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
            f"{file}: model_type {model_type!r:.40} is not supported"
            f" (supported: {', '.join(MODEL_TYPES)})"
        )
    archs = config.get("architectures") or [BASE_ARCHITECTURE[model_type]]
    if not isinstance(archs, list) or not isinstance(archs[0], str) or archs[0] not in SUPPORTED:
        names = ", ".join(a for a, (mt, _) in SUPPORTED.items() if mt == model_type)
        raise UnsupportedModelError(
            f"{file}: architecture {archs!r:.60} is not supported (supported: {names})"
        )
    if SUPPORTED[archs[0]][0] != model_type:
        raise UnsupportedModelError(
            f"{file}: architecture {archs[0]} does not go with model_type {model_type!r}"
        )
    _check_values(config, file)
    return config


#: config.json's integer fields -> the lowest and highest value accepted. Checked before the
#: library builds anything: it would allocate a 2**40-row table, spend minutes building 10**6
#: layers, or fill a 10**12-entry id2label dict before any error. The bounds of a token_encoder
#: checkpoint (rankshrink.models.token_spec), but layers, which cost Python objects, not just memory.
_INT_FIELDS = {
    "vocab_size": (1, MAX_FIELD),
    "hidden_size": (1, MAX_FIELD),
    "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, MAX_FIELD),
    "intermediate_size": (1, MAX_FIELD),
    "max_position_embeddings": (1, MAX_FIELD),
    "type_vocab_size": (1, MAX_FIELD),
    "num_labels": (1, MAX_FIELD),
    "pad_token_id": (0, MAX_FIELD),  # or null
    "embedding_size": (1, MAX_FIELD),  # ELECTRA only; the other families ignore it
}
#: config.json's numbers in [0, 1) (the eps not 0; classifier_dropout may be null)
_RATE_FIELDS = (
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
)
#: what a field left out of config.json defaults to (BERT-base): an upper bound for the others
_DEFAULT_SIZES = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}


def _check_values(config: dict[str, Any], file: Path) -> None:
    """Refuse sizes and rates that no model has, before the library allocates for them."""
    for name, (low, high) in _INT_FIELDS.items():
        if name not in config or (name == "embedding_size" and config["model_type"] != "electra"):
            continue
        value = config[name]
        if value is None and name == "pad_token_id":
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InputError(
                f"{file}: {name} must be an integer in [{low}, {high}], got {value!r:.40}"
            )
    for name in _RATE_FIELDS:
        value = config.get(name)
        if value is None and (name not in config or name == "classifier_dropout"):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        # NaN fails both comparisons; an eps of 0 divides by zero on a constant input
        if not number or not 0 <= value < 1 or (name == "layer_norm_eps" and value == 0):
            raise InputError(f"{file}: {name} must be a number in [0, 1), got {value!r:.40}")
    size = {k: config.get(k, v) for k, v in _DEFAULT_SIZES.items()}
    C, N = size["hidden_size"], size["intermediate_size"]
    E = config.get("embedding_size", C) if config["model_type"] == "electra" else C
    rows = size["vocab_size"] + size["max_position_embeddings"] + size["type_vocab_size"]
    params = rows * E + E * C + size["num_hidden_layers"] * (4 * C * C + 2 * C * N) + C * C
    if params > MAX_PARAMS:
        raise InputError(f"{file}: its sizes describe {params:,} parameters; that is too large")


def architecture(config: dict[str, Any]) -> str:
    """The architecture a checked config (:func:`read_config`) is loaded as."""
    return str((config.get("architectures") or [BASE_ARCHITECTURE[config["model_type"]]])[0])
