"""Writing results: checked up front, written atomically, never over an input.

All outputs of a run are first written to temporary files in their target directories and only
then renamed into place, so a failure or an interrupt leaves no partial file behind. The renames
run with SIGINT and SIGTERM held back, so a run's outputs appear all together or not at all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends; then deliver the first one that came.

    Python runs signal handlers in the main thread between bytecodes, so swapping the handlers
    for a recorder defers them whatever thread the OS delivered to (``pthread_sigmask`` would
    not: torch's worker threads leave the signals unblocked). A nested block hands what it held
    to the outer one. Off the main thread, where handlers cannot be set, this is a no-op.
    """
    held: list[int] = []

    def hold(signum: int, _frame: Any) -> None:
        held.append(signum)

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not None:  # None: a handler set outside Python; leave it
                previous[sig] = signal.signal(sig, hold)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:
            signal.raise_signal(held[0])  # the restored handler sees it now


def write_all(
    files: dict[Path, bytes], on_done: Callable[[list[Path]], None] | None = None
) -> None:
    """Write every file to a temp file beside it, then rename them all into place.

    The files get ordinary permissions, as ``open()`` would create them: 0666 less the umask
    (0644 under the usual umask 022), so another user — a serving container, a CI artifact
    step — can read them.

    An exception or interrupt while writing removes the temp files and leaves the targets as they
    were. The renames cannot be interrupted halfway (see :func:`signals_deferred`); should one of
    them fail (a full disk, a target turned into a directory), the files it had already created
    are removed again.

    Args:
        files: target path -> bytes.
        on_done: called with the targets once all are in place, before a signal that arrived
            during the renames is delivered (so the caller can say the outputs are complete).
    """
    staged: list[tuple[str, Path]] = []
    placed: list[Path] = []  # renamed into place and new: removed again if a later rename fails
    mode = 0o666 & ~_umask()  # what open() would give; mkstemp's files are 0600
    try:
        for path, data in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            staged.append((tmp, path))
            with os.fdopen(fd, "wb") as fh:
                os.fchmod(fh.fileno(), mode)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        with signals_deferred():
            for tmp, path in staged:
                existed = path.exists()
                os.replace(tmp, path)
                if not existed:
                    placed.append(path)
            staged.clear()
            placed.clear()
            if on_done is not None:
                on_done(list(files))
    finally:
        for path in placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _umask() -> int:
    """The process's umask. Reading it means setting it, so it is set straight back."""
    current = os.umask(0o022)
    os.umask(current)
    return current
