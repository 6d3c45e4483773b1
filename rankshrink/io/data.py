"""Loading and checking data files (``--data``): inputs ``x``, optional labels ``y``, a split.

A ``.npz``, ``.pt`` or ``.safetensors`` file holds ``x`` (N, features) and optionally ``y`` (N,)
integer class labels and ``train_idx``/``test_idx``. Without a recorded split a seeded 80/20 split
is made. The held-out part is used for verification only, never for training.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rankshrink.errors import InputError
from rankshrink.io.pickles import pickle_globals, unsafe_globals


@dataclass
class Dataset:
    """A train/test split of inputs and optional labels."""

    x_train: Tensor
    x_test: Tensor
    y_train: Tensor | None
    y_test: Tensor | None
    split: str  # "recorded" or "seeded 80/20"

    @property
    def has_labels(self) -> bool:
        return self.y_train is not None


def load_data(path: str | Path, seed: int = 0) -> Dataset:
    """Read, check and split a data file.

    Raises:
        InputError: missing or unreadable file, missing ``x``, bad shapes, dtypes, NaN/Inf, labels
            that are not non-negative integers, or an invalid recorded split.
    """
    path = Path(path)
    if not -(2**63) <= seed < 2**64:  # torch generators take a 64-bit seed
        raise InputError(f"--seed must fit in 64 bits, got {seed}")
    if not path.is_file():
        raise InputError(
            f"data file not found: {path}" + (" (it is a directory)" if path.is_dir() else "")
        )
    if path.stat().st_size == 0:
        raise InputError(f"data file is empty: {path}")
    arrays = read_arrays(path)
    if "x" not in arrays and {"state_dict", "arch"} & set(arrays):  # the two files swapped
        raise InputError(
            f"{path} looks like a model checkpoint, not a data file; give it as MODEL and the"
            " data (arrays x, optional y) as --data"
        )
    if "x" not in arrays:
        raise InputError(
            f"{path} has no array 'x' (found: {', '.join(sorted(map(str, arrays))) or 'nothing'})"
        )
    x = _as_float(arrays["x"], path)
    n = x.shape[0]
    y = checked_labels(arrays["y"], n, path) if "y" in arrays else None
    return split_dataset(x, y, arrays, path, seed)


def split_dataset(
    x: Tensor, y: Tensor | None, arrays: dict[str, Any], path: Path, seed: int
) -> Dataset:
    """Split ``x``/``y`` by the file's recorded ``train_idx``/``test_idx``, else seeded 80/20.

    Raises:
        InputError: a bad recorded split, or a side left empty.
    """
    n = x.shape[0]
    if "train_idx" in arrays or "test_idx" in arrays:
        train, test = _split(arrays, n, path)
        split = "recorded"
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cut = max(1, min(n - 1, round(0.8 * n)))  # two samples: one each side, not 2/0
        train, test = perm[:cut].sort().values, perm[cut:].sort().values
        split = "seeded 80/20"
    if train.numel() == 0 or test.numel() == 0:
        raise InputError(
            f"{path}: need at least one training and one held-out sample, got {n} in all"
        )
    return Dataset(
        x[train], x[test], None if y is None else y[train], None if y is None else y[test], split
    )


def read_arrays(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(obj, dict):
                raise InputError(f"{path} holds a {type(obj).__name__}; expected a dict with 'x'")
            return obj
    except InputError:
        raise
    except pickle.UnpicklingError as exc:
        names = unsafe_globals(pickle_globals(path).globals)
        if names:  # a data file has no business importing anything: never offer to trust it
            listed = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            raise InputError(
                f"{path} holds pickled objects that would import {listed}; a data file must hold"
                " only tensors or arrays"
            ) from None
        raise InputError(f"{path} is not a readable {suffix} data file ({_short(exc)})") from None
    except (zipfile.BadZipFile, ValueError, OSError, RuntimeError, EOFError, KeyError) as exc:
        raise InputError(f"{path} is not a readable {suffix} data file ({_short(exc)})") from None
    except Exception as exc:  # pickle and safetensors raise their own types on bad bytes
        raise InputError(f"{path} is not a readable {suffix} data file ({_short(exc)})") from None
    raise InputError(f"{path}: unsupported data format {suffix!r} (use .npz, .pt or .safetensors)")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:120]


def as_tensor(value: Any, name: str, path: Path) -> Tensor:
    if isinstance(value, Tensor):
        if value.layout != torch.strided or value.is_nested or value.is_meta or value.is_quantized:
            raise InputError(f"{path}: '{name}' is not a dense tensor with data; save a dense one")
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":  # strings, objects, dates, complex: not model inputs
            raise InputError(f"{path}: '{name}' has dtype {value.dtype}; expected numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise InputError(f"{path}: '{name}' is a {type(value).__name__}, expected an array")


def _as_float(value: Any, path: Path) -> Tensor:
    x = as_tensor(value, "x", path)
    if not (
        x.dtype.is_floating_point
        or x.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
    ):
        raise InputError(f"{path}: 'x' has dtype {x.dtype}; expected floating point numbers")
    if x.dim() < 2 or x.shape[0] == 0 or x.numel() == 0:
        raise InputError(
            f"{path}: 'x' must have shape (samples, features...), got {tuple(x.shape)}"
        )
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{path}: 'x' holds NaN or Inf values")
    return x


def checked_labels(value: Any, n: int, path: Path) -> Tensor:
    y = as_tensor(value, "y", path)
    if y.dtype.is_floating_point:
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise InputError(f"{path}: 'y' must hold integer class labels, found fractions or NaN")
    elif y.dtype == torch.bool:
        raise InputError(f"{path}: 'y' is boolean; expected integer class labels")
    if y.dim() != 1 or y.shape[0] != n:
        raise InputError(f"{path}: 'y' must have shape ({n},) to match 'x', got {tuple(y.shape)}")
    y = y.long()
    if bool((y < 0).any()):
        raise InputError(f"{path}: 'y' holds negative labels (min {int(y.min())})")
    return y


def _split(arrays: dict[str, Any], n: int, path: Path) -> tuple[Tensor, Tensor]:
    if "train_idx" not in arrays or "test_idx" not in arrays:
        raise InputError(f"{path}: a recorded split needs both 'train_idx' and 'test_idx'")
    parts = []
    for name in ("train_idx", "test_idx"):
        idx = as_tensor(arrays[name], name, path)
        if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dim() != 1:
            raise InputError(f"{path}: '{name}' must be a 1-D integer array")
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise InputError(f"{path}: '{name}' has indices outside [0, {n})")
        parts.append(idx)
    if np.intersect1d(parts[0].numpy(), parts[1].numpy()).size:
        raise InputError(
            f"{path}: 'train_idx' and 'test_idx' overlap; held-out data must be unseen"
        )
    return parts[0], parts[1]

