"""Output files get ordinary permissions, the umask's (SPEC §6): 0644 under umask 022, so a serving
container or a CI artifact step running as another user can read them. (The temp file that makes
a write atomic is created 0600 by ``tempfile.mkstemp``; that must not leak into the output.)
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from rankshrink.io.outputs import write_all


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask() -> Iterator[None]:
    """Restore the process's umask after a test that sets it."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_write_all_gives_files_the_umasks_permissions(
    tmp_path: Path, umask: None, mask: int, expected: int
) -> None:
    os.umask(mask)
    new, old = tmp_path / "new.onnx", tmp_path / "old.json"
    old.write_bytes(b"old")
    old.chmod(0o600)  # a replaced file gets the umask's permissions too, like a new one
    write_all({new: b"model", old: b"report"})
    assert (_mode(new), _mode(old)) == (expected, expected)
    assert new.read_bytes() == b"model" and old.read_bytes() == b"report"
    assert os.umask(mask) == mask, "write_all must leave the umask as it found it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.onnx", "old.json"]
