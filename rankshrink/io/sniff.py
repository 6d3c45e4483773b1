"""What a file is, told by its content rather than its name.

A data file passed where a model belongs (or a TorchScript archive, a safetensors file of bare
weights) otherwise meets ``torch.load``, whose complaint (``[enforce fail at
inline_container.cc:180] ...``) names neither the problem nor the fix. :func:`sniff` reads only
headers and a zip's member list — it never unpickles or loads an array — and never raises for
bad bytes: a file it cannot place is ``"other"``.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

_NPY_MAGIC = b"\x93NUMPY"
_MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit on the JSON header


@dataclass(frozen=True)
class FileKind:
    """A file's format and, where the format names them, the arrays or tensors it holds."""

    kind: str  # "npz", "npy", "safetensors", "torchscript", "torch-zip" or "other"
    names: list[str] = field(default_factory=list)


def sniff(path: Path) -> FileKind:
    """Tell a file's format from its first bytes and, for a zip, its member names.

    Raises:
        OSError: the file cannot be opened.
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
        if head.startswith(_NPY_MAGIC):
            return FileKind("npy")
        names = _safetensors_names(fh, head, path.stat().st_size)
    if names is not None:
        return FileKind("safetensors", names)
    return _zip_kind(path)


def _safetensors_names(fh: BinaryIO, head: bytes, size: int) -> list[str] | None:
    """A safetensors file is a little-endian u64 header length, then a JSON object."""
    if len(head) < 8:
        return None
    (length,) = struct.unpack("<Q", head)
    if not 2 <= length <= min(size - 8, _MAX_SAFETENSORS_HEADER):
        return None
    header = fh.read(length)
    if not header.startswith(b"{"):
        return None
    try:
        table = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(table, dict):
        return None
    return [str(k) for k in table if k != "__metadata__"]


def _zip_kind(path: Path) -> FileKind:
    try:
        if not zipfile.is_zipfile(path):
            return FileKind("other")
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:  # BadZipFile, OSError, UnicodeDecodeError on a garbled name, ...
        return FileKind("other")  # not a readable zip: the loader will say what is wrong
    if names and all(n.endswith(".npy") and "/" not in n for n in names):
        return FileKind("npz", [n.removesuffix(".npy") for n in names])  # numpy.savez's layout
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return FileKind("torchscript")
    return FileKind("torch-zip")
