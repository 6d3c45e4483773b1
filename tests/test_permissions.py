"""Output files get ordinary permissions, the umask's (SPEC §6): 0644 under umask 022, so a serving
container or a CI artifact step running as another user can read them. (The temp file that makes
a write atomic is created 0600 by ``tempfile.mkstemp``; that must not leak into the output.)
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rankshrink.outputs import write_all

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "sample_models" / "mlp_digits.pt"
DATA = ROOT / "sample_models" / "digits.npz"


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


@pytest.mark.slow
def test_compress_outputs_are_0644_under_umask_022(tmp_path: Path) -> None:
    """The ONNX file, the report and the --save-pt checkpoint of a real run; a short run with
    loose thresholds, so that it fuses, passes its gates and writes every output."""
    argv = [sys.executable, "-m", "rankshrink", "compress", str(MODEL), "--data", str(DATA)]
    argv += ["--steps", "30", "--tau-cos", "0.5", "--tau-euc", "5", "-q"]
    argv += ["--out", "m.onnx", "--save-pt", "m.pt"]
    run = subprocess.run(
        argv,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=lambda: os.umask(0o022),  # the child's umask only
    )
    assert run.returncode == 0, run.stderr
    modes = {p.name: _mode(p) for p in tmp_path.iterdir()}
    assert modes == {"m.onnx": 0o644, "m.json": 0o644, "m.pt": 0o644}

