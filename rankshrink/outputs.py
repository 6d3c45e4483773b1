"""Writing results: checked up front, written atomically, never over an input.

All outputs of a run are first written to temporary files in their target directories and only
then renamed into place, so a failure or an interrupt leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from rankshrink.errors import InputError


def check_outputs(outputs: list[Path], inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that would clobber an input, sit in a missing directory, or exist already.

    Raises:
        InputError: with the offending path and the fix.
    """
    real_inputs = {os.path.realpath(p) for p in inputs}
    seen: set[str] = set()
    for out in outputs:
        real = os.path.realpath(out)
        if real in real_inputs:
            raise InputError(f"output {out} is one of the inputs; choose another output path")
        if real in seen:
            raise InputError(f"output {out} is named twice; give each output its own path")
        seen.add(real)
        if not out.parent.exists() or not out.parent.is_dir():
            raise InputError(f"output directory {out.parent} does not exist; create it first")
        if out.is_dir():
            raise InputError(f"output {out} is a directory; name a file")
        if out.exists() and not overwrite:
            raise InputError(f"output {out} already exists; pass --overwrite to replace it")


def write_all(files: dict[Path, bytes]) -> None:
    """Write every file to a temp file beside it, then rename them all into place."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for tmp, path in staged:
            os.replace(tmp, path)
        staged.clear()
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
