"""Loading models safely (SPEC §6) and saving compressed ones.

Three input forms, tried in this order and never silently downgraded to an unsafe one:

1. a self-describing checkpoint ``{"format", "arch", "state_dict"}`` (what rankshrink writes and the
   sample models use), loaded with ``torch.load(weights_only=True)``;
2. a plain state_dict plus ``--arch module:factory`` (the factory builds the module; that is code
   the user chose to run);
3. a pickled full ``nn.Module`` — only with ``trust_pickle=True``, because unpickling runs code.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankshrink.errors import InputError, UnsafeCheckpointError
from rankshrink.io.factory import build_from_factory
from rankshrink.io.pickles import pickle_globals, unsafe_globals
from rankshrink.io.sniff import sniff
from rankshrink.io.token_data import TOKEN_KEYS
from rankshrink.models.arch import CHECKPOINT_FORMAT, build_model, make_checkpoint
from rankshrink.nn.indexed import IndexedLinear


@dataclass
class LoadedModel:
    """A model ready for compression, in eval mode, and where it came from."""

    model: nn.Module
    path: Path
    source: str  # "checkpoint", "state_dict+arch" or "pickle"
    sha256: str
    meta: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(
    path: str | Path, arch: str | None = None, trust_pickle: bool = False
) -> LoadedModel:
    """Load a model checkpoint without executing code from the file.

    Args:
        path: the checkpoint file.
        arch: ``"module:factory"`` that builds the module a plain state_dict belongs to.
        trust_pickle: allow unpickling a full ``nn.Module`` (runs code from the file).

    Raises:
        InputError: the file is missing, unreadable, not a checkpoint, or does not match.
        UnsafeCheckpointError: loading would run code and ``trust_pickle`` is off.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(
            f"{path} is a directory; pass a checkpoint file (.pt) — Hugging Face folders"
            " (config.json + safetensors) are read by compress, verify and inspect"
        )
    if path.stat().st_size == 0:
        raise InputError(f"model file is empty: {path}")
    _refuse_foreign(path)
    obj = _torch_load(path, trust_pickle)
    digest = sha256_file(path)
    if isinstance(obj, nn.Module):
        return LoadedModel(checked_weights(obj.float().eval(), path), path, "pickle", digest)
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a checkpoint or state_dict")
    if obj.get("format") == CHECKPOINT_FORMAT:
        if arch is not None:
            raise InputError(f"{path} describes its own architecture; drop --arch")
        try:
            model = build_model(obj.get("arch"))  # type: ignore[arg-type]
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from None
        except Exception as exc:  # the spec comes from the file: missing keys, absurd sizes
            raise InputError(
                f"{path}: cannot build the architecture it describes ({_first_line(exc)})"
            ) from None
        _load_state(model, obj.get("state_dict"), path)
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        return LoadedModel(checked_weights(model.eval(), path), path, "checkpoint", digest, meta)
    if "format" in obj:
        raise InputError(f"{path}: unknown checkpoint format {obj['format']!r}")
    if _looks_like_data(list(obj)):  # torch.save({"x": ..., "y": ...}): a .pt data file
        raise _data_file_error(path, ".pt tensors", [str(k) for k in obj])
    state = obj.get("state_dict", obj)
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise InputError(f"{path} is a dict but neither a rankshrink checkpoint nor a state_dict")
    if arch is None:
        raise InputError(
            f"{path} is a bare state_dict with no architecture; pass --arch module:factory"
        )
    model = build_from_factory(arch, path)
    _load_state(model, state, path)
    return LoadedModel(checked_weights(model.float().eval(), path), path, "state_dict+arch", digest)


#: the array names of a data file (rankshrink.io.data, rankshrink.io.token_data)
_DATA_KEYS = frozenset({"x", "y", "train_idx", "test_idx", *TOKEN_KEYS})


def _refuse_foreign(path: Path) -> None:
    """Refuse, by content, files that are not checkpoints before torch.load reports them in its
    own words (``[enforce fail at inline_container.cc:180] ...`` for an .npz)."""
    try:
        found = sniff(path)
    except OSError as exc:
        raise InputError(f"cannot read the model file {path} ({exc.strerror or exc})") from None
    if found.kind == "torchscript":
        raise InputError(
            f"{path} is a TorchScript archive; rankshrink needs a state_dict or checkpoint"
            " (save with torch.save(model.state_dict(), ...))"
        )
    if found.kind in ("npz", "safetensors") and _looks_like_data(found.names):
        kind = ".npz arrays" if found.kind == "npz" else ".safetensors tensors"
        raise _data_file_error(path, kind, found.names)
    if found.kind in ("npz", "npy"):
        raise InputError(
            f"{path} is a NumPy {'archive' if found.kind == 'npz' else 'array file'}, not a"
            " model; give a checkpoint saved with torch.save (or a Hugging Face folder) as MODEL"
        )
    if found.kind == "safetensors":
        raise InputError(
            f"{path} is a safetensors file of bare tensors ({_listed(found.names)});"
            " rankshrink reads safetensors weights inside a Hugging Face folder (with"
            " config.json): pass the folder, or a checkpoint saved with torch.save"
        )


def _looks_like_data(names: list[object]) -> bool:
    """Inputs (``x`` or ``input_ids``) and nothing a data file would not hold."""
    return not {"x", "input_ids"}.isdisjoint(names) and set(names) <= _DATA_KEYS


def _data_file_error(path: Path, kind: str, names: list[str]) -> InputError:
    return InputError(
        f"{path} looks like a data file ({kind} {_listed(names)}), not a model; pass it as"
        " --data and give the checkpoint as MODEL"
    )


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        scan = pickle_globals(path)
        names = unsafe_globals(scan.globals)
        if not names:  # not a refusal of globals: the bytes are simply not a pickle we can read
            raise InputError(
                f"{path} is not a readable checkpoint ({_unpickling_detail(exc)})"
            ) from None
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{path} is a pickled object that would import {_listed(names)} when loaded;"
                " refusing (pass --trust-pickle only if you trust the file's author)"
            ) from None
    except Exception as exc:  # torch raises RuntimeError/EOFError/ValueError/... for bad bytes
        raise InputError(
            f"{path} is not a readable PyTorch checkpoint ({_first_line(exc)})"
        ) from None
    try:
        if scan.container == "pickle":  # pickle.dump'ed, not torch.save'd: torch.load wants a
            with open(path, "rb") as fh:  # torch header and would fail after running the file
                return pickle.load(fh)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(f"{path} could not be unpickled ({_first_line(exc)})") from None


def _unpickling_detail(exc: BaseException) -> str:
    """torch's weights-only refusal is a paragraph of advice; its last part names the problem."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        detail = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        return " ".join(detail.split())[:160]
    return _first_line(exc)


def _listed(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _load_state(model: nn.Module, state: Any, path: Path) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise InputError(f"{path}: state_dict missing or not a dict with string keys")
    expected = model.state_dict()
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"{path}: state_dict entry {name} is a {type(value).__name__}, not a tensor"
            )
        if value.layout != torch.strided or value.is_meta or value.is_quantized:
            raise InputError(f"{path}: tensor {name} is not a dense tensor with data")
        want = expected.get(name)
        # load_state_dict would copy complex into real (dropping the imaginary part), floats into
        # integer index maps (truncating), bools into weights: all silently. Refuse instead.
        if want is not None and _kind(value.dtype) != _kind(want.dtype):
            raise InputError(
                f"{path}: tensor {name} has dtype {str(value.dtype).removeprefix('torch.')},"
                f" expected {str(want.dtype).removeprefix('torch.')}"
            )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:240]
        raise InputError(f"{path}: weights do not match the architecture ({detail})") from None


def _kind(dtype: torch.dtype) -> str:
    """What a tensor's values mean: precision may change on load, the kind may not."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "int"


def checked_weights(model: nn.Module, path: Path) -> nn.Module:
    """``model``, once its weights are known to be finite and its index maps to stay inside
    their layer.

    Raises:
        InputError: a NaN or Inf value, a tensor that is not dense and real, or an index map
            out of range (naming the tensor and ``path``).
    """
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.dtype.is_complex or tensor.is_meta or tensor.layout != torch.strided:
            raise InputError(f"{path}: tensor {name} is not a dense real tensor ({tensor.dtype})")
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{path}: tensor {name} holds NaN or Inf values")
    for name, module in model.named_modules():
        if isinstance(module, IndexedLinear):
            _check_indexed(module, f"{name}." if name else "", path)
    return model


def _check_indexed(layer: IndexedLinear, prefix: str, path: Path) -> None:
    """An index map read from a file must stay inside the tensor it indexes (else the forward
    reads out of bounds or, in ONNX, fails at run time), and its scales must match it."""
    rows, cols = layer.weight.shape
    maps = (
        ("in_index", layer.in_index, layer.in_scale, "in_scale", layer.in_features, cols),
        ("out_index", layer.out_index, layer.out_scale, "out_scale", rows, None),
    )
    for name, index, scale, scale_name, bound, width in maps:
        if index is None:
            continue
        if scale is None or scale.shape != index.shape:
            raise InputError(
                f"{path}: {prefix}{scale_name} must have the shape of {prefix}{name}"
                f" {tuple(index.shape)}, got {None if scale is None else tuple(scale.shape)}"
            )
        if width is not None and (index.dim() != 2 or index.shape[0] != width):
            raise InputError(
                f"{path}: {prefix}{name} must have shape ({width}, groups) to feed a core of"
                f" {cols} columns, got {tuple(index.shape)}"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= bound):
            raise InputError(
                f"{path}: {prefix}{name} holds indices outside [0, {bound})"
                f" (found {int(index.min())}..{int(index.max())})"
            )


def save_checkpoint(model: nn.Sequential, meta: dict[str, Any]) -> dict[str, Any]:
    """The self-describing checkpoint dict of a (compressed) sequential model."""
    return make_checkpoint(model, meta)
