"""Ctrl-C and SIGTERM stop a run cleanly: exit 130 / 143, one line saying so, no partial output.

The end-to-end tests run ``python -m rankshrink compress`` as a child process and signal it while
it fine-tunes or exports. The child's stdout goes to a file, which is polled for the stage lines
the CLI prints when it is not on a terminal (``fine-tuning…``, ``exporting…``) — reading a pipe
line by line could block forever, a file read cannot. Every wait has a deadline and the child is
killed in a ``finally``, so a regression fails the test instead of hanging it.
"""

from __future__ import annotations

import getpass
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from shared_runs import DIGITS, MLP
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.io import outputs
from rankshrink.io.outputs import signals_deferred, write_all

ROOT = Path(__file__).resolve().parents[2]
MODEL = MLP
DATA = DIGITS
# What torch (its compile cache) and onnxruntime (a session-id file) keep in TMPDIR on any run.
THIRD_PARTY_TMP = {f"torchinductor_{getpass.getuser()}", ".ses"}
DEADLINE = 120.0  # seconds for any one wait; far above the ~5 s a run takes here


@dataclass
class Scenario:
    """One child run and when to signal it."""

    sig: signal.Signals
    code: int  # the exit code it must end with
    word: str  # how its one stderr line starts
    stage: str
    steps: int
    marker: str  # signal this long after the line ``marker`` appears on stdout ...
    delay: float
    not_reached: str  # ... and the run must stop before it prints this one
    dir: Path = Path()
    child: subprocess.Popen[bytes] | None = None
    signalled_at: float | None = None

    @property
    def name(self) -> str:
        return f"{self.sig.name} during {self.stage}"


def _sigint_default() -> None:
    # A child inherits an *ignored* SIGINT (e.g. when CI runs pytest in the background), and
    # Python then keeps ignoring it; give the child the terminal's default, as a user has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(sc: Scenario, root: Path) -> None:
    sc.dir = root / f"{sc.sig.name}-{sc.stage}"
    for sub in ("out", "systmp"):
        (sc.dir / sub).mkdir(parents=True)
    argv = [sys.executable, "-m", "rankshrink", "compress", str(MODEL), "--data", str(DATA)]
    argv += ["--out", str(sc.dir / "out" / "small.onnx")]
    argv += ["--save-pt", str(sc.dir / "out" / "small.pt"), "--steps", str(sc.steps)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(sc.dir / "systmp")}
    with open(sc.dir / "stdout.txt", "wb") as out, open(sc.dir / "stderr.txt", "wb") as err:
        sc.child = subprocess.Popen(
            argv, stdout=out, stderr=err, env=env, cwd=sc.dir, preexec_fn=_sigint_default
        )


def _drive(scenarios: list[Scenario]) -> None:
    """Signal each child ``delay`` seconds after its marker; return when all have ended."""
    marker_seen: dict[int, float] = {}
    start = time.monotonic()
    while any(sc.child.poll() is None for sc in scenarios):  # type: ignore[union-attr]
        if time.monotonic() - start > DEADLINE:
            pytest.fail(f"runs still going after {DEADLINE:.0f} s")
        for i, sc in enumerate(scenarios):
            if sc.signalled_at is not None or sc.child.poll() is not None:  # type: ignore[union-attr]
                continue
            if i not in marker_seen and sc.marker in (sc.dir / "stdout.txt").read_text("utf-8"):
                marker_seen[i] = time.monotonic()
            if i in marker_seen and time.monotonic() - marker_seen[i] >= sc.delay:
                sc.child.send_signal(sc.sig)  # type: ignore[union-attr]
                sc.signalled_at = time.monotonic()
        time.sleep(0.02)


SCENARIOS = [
    # A million steps: whenever the signal lands after "fine-tuning…", training is running.
    *(
        Scenario(sig, code, word, "fine-tuning", 1_000_000, "fine-tuning…", 1.0, "folding…")
        for sig, code, word in (
            (signal.SIGINT, 130, "interrupted"),
            (signal.SIGTERM, 143, "terminated"),
        )
    ),
    # Three steps, then two ONNX exports that take seconds; "verifying…" comes after them.
    *(
        Scenario(sig, code, word, "export", 3, "exporting…", 0.2, "verifying…")
        for sig, code, word in (
            (signal.SIGINT, 130, "interrupted"),
            (signal.SIGTERM, 143, "terminated"),
        )
    ),
]


@pytest.mark.slow
def test_sigint_and_sigterm_during_fine_tuning_and_export_stop_cleanly(tmp_path: Path) -> None:
    """The four runs go side by side (each is mostly waiting for torch to import)."""
    scenarios = [Scenario(**{k: v for k, v in vars(sc).items()}) for sc in SCENARIOS]
    try:
        for sc in scenarios:
            _start(sc, tmp_path)
        _drive(scenarios)
    finally:
        for sc in scenarios:
            if sc.child is not None and sc.child.poll() is None:
                sc.child.kill()
                sc.child.wait(timeout=DEADLINE)

    failures = []
    for sc in scenarios:
        printed = (sc.dir / "stdout.txt").read_text("utf-8")
        errors = (sc.dir / "stderr.txt").read_text("utf-8")
        lines = [line for line in errors.splitlines() if line.strip()]
        leftovers = sorted(os.listdir(sc.dir / "out")) + [
            n for n in os.listdir(sc.dir / "systmp") if n not in THIRD_PARTY_TMP
        ]
        checks = {
            "was signalled": sc.signalled_at is not None,
            f"exit code {sc.code}": sc.child.returncode == sc.code,  # type: ignore[union-attr]
            f"stopped before {sc.not_reached!r}": sc.not_reached not in printed,
            "one line saying it stopped": lines
            == [f"{sc.word}: stopped cleanly, nothing was written"],
            "no output, partial or temp file left": leftovers == [],
        }
        failures += [
            f"{sc.name}: expected {what}\n  exit {sc.child.returncode}, left {leftovers}"  # type: ignore[union-attr]
            f"\n  stdout: {printed[-400:]!r}\n  stderr: {errors[-800:]!r}"
            for what, ok in checks.items()
            if not ok
        ]
    assert not failures, "\n".join(failures)


_CTRL_C_IN_EXEC = """
import typer
from rich.console import Console

from rankshrink.cli.runner import errors as _errors

app = typer.Typer()


@app.command()
def main() -> None:
    with _errors(Console(stderr=True)):
        exec("raise KeyboardInterrupt")  # where Ctrl-C lands inside a lazy import's dataclass


app()
"""


def test_ctrl_c_inside_an_exec_still_exits_130_under_python_m(tmp_path: Path) -> None:
    """CI once saw "killed by signal 2" after the clean message: CPython flags an interrupt that
    leaves an ``exec`` of a string as unhandled, and ``python -m`` re-kills itself at exit."""
    (tmp_path / "ctrl_c_in_exec.py").write_text(_CTRL_C_IN_EXEC, "utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    done = subprocess.run(
        [sys.executable, "-m", "ctrl_c_in_exec"], env=env, capture_output=True, timeout=DEADLINE
    )
    errors = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 130, f"exit code {done.returncode}, stderr {errors!r}"
    assert errors.strip() == "interrupted: stopped cleanly, nothing was written", errors


# ---------------------------------------------------------------------------------------------
# The commit step: outputs appear all together or not at all.


@pytest.fixture(autouse=True)
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt here even if pytest was started with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


class _OsWith:
    """``os`` as the outputs module sees it, with ``replace`` swapped (torch and tempfile keep
    the real one)."""

    def __init__(self, replace: Callable[[str, Path], None]) -> None:
        self.replace = replace

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_signals_deferred_holds_a_signal_until_the_block_ends() -> None:
    reached_end = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred():
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.01)  # a handler would run here, between bytecodes, if not held
            reached_end = True
    assert reached_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_write_all_interrupted_during_renames_writes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {tmp_path / "a.onnx": b"A", tmp_path / "a.json": b"{}"}
    real_replace = os.replace
    done: list[Path] = []

    def replace_then_signal(src: str, dst: Path) -> None:
        real_replace(src, dst)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C right after the first rename

    monkeypatch.setattr(outputs, "os", _OsWith(replace_then_signal))
    with pytest.raises(KeyboardInterrupt):
        write_all(files, on_done=done.extend)
    assert done == list(files), "on_done must run before the held signal is delivered"
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {"a.onnx": b"A", "a.json": b"{}"}


def test_interrupt_while_committing_says_the_outputs_are_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C that arrives during the final renames is answered after them, truthfully."""
    real_replace = os.replace
    calls = [0]

    def replace_then_signal(src: str, dst: Path) -> None:
        real_replace(src, dst)
        calls[0] += 1
        if calls[0] == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(outputs, "os", _OsWith(replace_then_signal))
    monkeypatch.chdir(tmp_path)
    # Loose fusion thresholds shrink the model within 8 steps, so the not-smaller gate passes and
    # both files are committed; this checks the commit, not the quality (hence the loose gate).
    fast = ["--steps", "8", "--tau-cos", "0.5", "--tau-euc", "5", "--max-accuracy-drop", "100"]
    result = CliRunner().invoke(
        app, ["compress", str(MODEL), "--data", str(DATA), "--out", "m.onnx", *fast, "-q"]
    )
    assert result.exit_code == 130, result.output
    error = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and error[0].startswith("interrupted: stopped after writing"), error
    assert "m.onnx" in error[0] and "m.json" in error[0] and "(complete)" in error[0]
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.onnx"]
