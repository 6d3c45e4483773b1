"""What a pickle would import, read without unpickling it.

Unpickling runs code: every ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` opcode imports a module
attribute, and ``REDUCE`` then calls it. :func:`pickle_globals` disassembles the opcodes with
:mod:`pickletools` (which only parses, never executes) so a refusal can name what a file would
import, and so the loader can tell a legacy ``torch.save`` file from any other pickle.

Handles the three containers a checkpoint comes in: the zip archive of ``torch.save`` (its
``data.pkl`` member), the legacy ``torch.save`` stream (several pickles back to back, then raw
storage bytes) and a plain pickle file.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

# torch.serialization.MAGIC_NUMBER: the first pickle of a legacy torch.save stream is this int.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MAX_PICKLES = 5  # a legacy stream has 5 pickles before its raw storage bytes
_UNKNOWN = "?"  # a module or name computed at load time, not spelled out in the bytes

_STRING_OPS = {
    "STRING",
    "BINSTRING",
    "SHORT_BINSTRING",
    "UNICODE",
    "BINUNICODE",
    "SHORT_BINUNICODE",
    "BINUNICODE8",
}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_FRAMING = {"PROTO", "FRAME", "STOP"}


@dataclass
class PickleScan:
    """The result of disassembling a file's pickles."""

    container: str  # "zip", "legacy-torch" or "pickle"; "unreadable" when no opcode parsed
    globals: list[str] = field(default_factory=list)  # "module.name", in order of appearance


def pickle_globals(path: Path) -> PickleScan:
    """List the globals the pickles in ``path`` would import, without importing anything.

    Never raises for bad bytes: what could not be parsed is simply not listed.

    Raises:
        OSError: the file cannot be opened.
    """
    if _is_zip(path):
        try:
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return PickleScan("zip")
                size = zf.getinfo(member).file_size
                with zf.open(member) as fh:
                    found, _ = _scan_stream(_Capped(fh, size), max_pickles=1)
                return PickleScan("zip", found)
        except Exception:  # BadZipFile, UnicodeDecodeError on a garbled name, zlib.error, ...
            return PickleScan("zip")
    with open(path, "rb") as fh:
        found, first = _scan_stream(_Capped(fh, path.stat().st_size), max_pickles=_MAX_PICKLES)
    if first is None and not found:
        return PickleScan("unreadable", found)
    return PickleScan("legacy-torch" if first == TORCH_LEGACY_MAGIC else "pickle", found)


class _Capped:
    """A reader that never asks for more than is left: a garbled length prefix in the bytes
    (BINBYTES says 4 GB follow) must not make the scan allocate that much."""

    def __init__(self, fh: IO[bytes], size: int) -> None:
        self.fh, self.left = fh, size

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.fh.readline(self.left)
        self.left -= len(line)
        return line


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except Exception:  # garbled headers can raise more than the OSError is_zipfile catches
        return False


def unsafe_globals(names: list[str]) -> list[str]:
    """The names among ``names`` that ``torch.load(weights_only=True)`` does not allow."""
    import torch  # only here: the scan itself needs nothing but the standard library

    try:  # torch's own allowlist; private, so fall back to listing everything
        allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    except Exception:
        allowed = set()
    return [n for n in names if n not in allowed]


def _scan_stream(fh: _Capped, max_pickles: int) -> tuple[list[str], object | None]:
    """Globals of up to ``max_pickles`` consecutive pickles, and the first pickle's first value.

    Returns ``(globals, first)``; ``first`` is None when no opcode with a value parsed.
    """
    found: list[str] = []
    first: object | None = None
    for index in range(max_pickles):
        names: list[str] = []
        value: object | None = None
        recent: list[object] = []  # values pushed, as far as a stack-free model can tell
        memo: dict[int, object] = {}
        try:
            for opcode, arg, _pos in pickletools.genops(fh):
                name = opcode.name
                if value is None and arg is not None and name not in _FRAMING:
                    value = arg
                if name in ("GLOBAL", "INST"):
                    module, _, attr = str(arg).partition(" ")
                    _add(names, _py3_name(module, attr))
                elif name == "STACK_GLOBAL":
                    module, attr = recent[-2:] if len(recent) >= 2 else (None, None)
                    _add(names, f"{_text(module)}.{_text(attr)}")
                    recent.append(None)
                elif name in _STRING_OPS:
                    recent.append(arg if isinstance(arg, str) else _decode(arg))
                elif name in _GET_OPS:
                    recent.append(memo.get(int(arg)))  # type: ignore[arg-type]
                elif name in _PUT_OPS:
                    memo[int(arg)] = recent[-1] if recent else None  # type: ignore[arg-type]
                elif name == "MEMOIZE":
                    memo[len(memo)] = recent[-1] if recent else None
                elif name not in _FRAMING:
                    recent.append(None)
                del recent[:-4]  # only the last two values ever matter
        except Exception:  # ValueError/EOFError/... on bytes that are not (or no longer) a pickle
            break  # an incomplete pickle's "globals" would be guesses from noise: not listed
        for item in names:
            _add(found, item)
        if index == 0:
            first = value
    return found, first


def _py3_name(module: str, attr: str) -> str:
    """The name Python 3 imports for a protocol 0–2 global (``__builtin__.set`` is
    ``builtins.set``), as :class:`pickle.Unpickler` maps it with ``fix_imports``."""
    module, attr = _compat_pickle.NAME_MAPPING.get((module, attr), (module, attr))
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{attr}"


def _add(found: list[str], name: str) -> None:
    if name not in found:
        found.append(name)


def _text(value: object) -> str:
    return value if isinstance(value, str) and value else _UNKNOWN


def _decode(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return None
