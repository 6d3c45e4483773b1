"""``rankshrink`` commands run once per session in child processes, shared by their readers.

A test that only reads what a command wrote declares the command with a mark instead of running
it, and gets the finished run from a fixture (tests/conftest.py)::

    @pytest.mark.cli_run("compress", MODEL, "--data", DATA, "--out", "m.onnx")
    def test_it(cli_run: FinishedRun) -> None:
        cli_run.check_ok()
        report = cli_run.report()

Tests that declare the same command share one run: the bundled samples at the defaults (the
sample Transformer's 1000 steps take ~45 s on an idle machine, the quick start ~20 s) run once
for the README, the Transformer and the determinism tests. The commands start with the session's
first test and the tests that read them run last, so the children compute on the second core
while the rest of the suite runs. The thread policy (rankshrink/threads.py) runs the samples on
one thread, so a child takes one core and its bytes do not depend on how busy the machine is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
MLP = SAMPLES / "mlp_digits.pt"
TRANSFORMER = SAMPLES / "transformer_digits.pt"
DIGITS = SAMPLES / "digits.npz"
#: Seconds a test waits for its run to end; a run at the defaults takes ~20–45 s on an idle
#: machine, and several times that on a busy one.
WAIT = 1200

#: The sample Transformer at the defaults, with ``--save-pt`` for the checkpoint checks.
TRANSFORMER_DEFAULT = (
    "compress", "sample_models/transformer_digits.pt", "--data", "sample_models/digits.npz",
    "--out", "t.onnx", "--save-pt", "t.pt", "-q",
)  # fmt: skip


def quick_start_commands() -> list[str]:
    """The README quick start's command lines (install + compress, install + test)."""
    text = (ROOT / "README.md").read_text()
    assert "## Quick start" in text, "README has no '## Quick start' section"
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    assert block, "README quick start has no code block"
    return [
        line.strip()
        for line in block.group(1).splitlines()
        if line.strip() and not line.startswith("#")
    ]


def quick_start_args() -> tuple[str, ...]:
    """The arguments of the ``rankshrink`` step of the first quick-start command."""
    first = quick_start_commands()[0]
    step = next(
        part.strip() for part in first.split("&&") if part.strip().startswith("rankshrink ")
    )
    return tuple(shlex.split(step)[1:])


@dataclass(frozen=True)
class RunSpec:
    """A ``rankshrink`` command line and how its process runs; equal specs share one run."""

    args: tuple[str, ...]  # after ``rankshrink``; relative paths resolve in a scratch directory
    hash_seed: int = 1  # PYTHONHASHSEED: runs that differ in it show any order taken from a set
    one_core: bool = False  # pinned to one core (as ``taskset -c N``), where the OS can pin

    @classmethod
    def of(cls, mark: pytest.Mark) -> RunSpec:
        """The spec a ``cli_run`` mark declares: ``cli_run(*args, hash_seed=1, one_core=False)``."""
        return cls(tuple(str(a) for a in mark.args), **mark.kwargs)


@dataclass(frozen=True)
class FinishedRun:
    """What a run left: its exit code, its output, and the directory it ran in."""

    dir: Path  # the working directory: the files the command wrote and nothing else; shared by
    # every test that declares the command, so read-only
    returncode: int
    stdout: str
    stderr: str

    def report(self) -> dict[str, Any]:
        """The run's one JSON report."""
        reports = list(self.dir.glob("*.json"))
        assert len(reports) == 1, f"expected one report, got {sorted(os.listdir(self.dir))}"
        return json.loads(reports[0].read_text())

    def check_ok(self) -> None:
        """Exit 0 and no traceback; says what the run printed if not."""
        shown = f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"
        assert self.returncode == 0 and "Traceback" not in self.stderr, (
            f"exit {self.returncode}\n{shown}"
        )


def _executable() -> list[str]:
    """``rankshrink`` as a user runs it: the command installed beside this Python (not another
    one on the PATH), else ``python -m rankshrink``."""
    exe = Path(sys.executable).parent / "rankshrink"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "rankshrink"]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _on_one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


@dataclass
class CliRun:
    """One child process running a :class:`RunSpec`, started once and waited for by its readers."""

    spec: RunSpec
    root: Path  # holds the log files and ``work``, the child's working directory
    child: subprocess.Popen[bytes] | None = None
    finished: FinishedRun | None = None

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def running(self) -> bool:
        return self.child is not None and self.child.poll() is None

    def start(self) -> None:
        self.work.mkdir(parents=True)
        (self.work / "sample_models").symlink_to(SAMPLES)  # the README's relative paths
        env = {**os.environ, "PYTHONHASHSEED": str(self.spec.hash_seed)}
        pin = _on_one_core if self.spec.one_core and hasattr(os, "sched_setaffinity") else None
        argv = [*_executable(), *self.spec.args]
        with (
            open(self.root / "stdout.txt", "wb") as out,
            open(self.root / "stderr.txt", "wb") as err,
        ):
            self.child = subprocess.Popen(
                argv, cwd=self.work, env=env, stdout=out, stderr=err, preexec_fn=pin
            )

    def wait(self) -> FinishedRun:
        if self.finished is None:
            if self.child is None:
                self.start()
            assert self.child is not None
            try:
                code = self.child.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.stop()
                pytest.fail(
                    f"rankshrink {shlex.join(self.spec.args)}: still running after {WAIT} s"
                )
            (self.work / "sample_models").unlink()
            self.finished = FinishedRun(
                self.work,
                code,
                (self.root / "stdout.txt").read_text("utf-8", "replace"),
                (self.root / "stderr.txt").read_text("utf-8", "replace"),
            )
        return self.finished

    def stop(self) -> None:
        if self.running:
            assert self.child is not None
            self.child.kill()
            self.child.wait()


class RunPool:
    """The session's runs, in the order their readers need them, a few children at a time (each
    holds a few hundred MB; more would not finish sooner on a small machine)."""

    def __init__(self, specs: list[RunSpec], make_root: Callable[[], Path]) -> None:
        self.runs = {spec: CliRun(spec, make_root()) for spec in dict.fromkeys(specs)}
        # one core stays with the main pytest process, whose tests are the suite's critical path
        # (measured on 2 idle cores: two children at once made the whole suite slower, 308 s)
        self.parallel = min(4, max(1, _cores() - 1))

    def refill(self) -> None:
        """Start waiting runs while fewer than ``parallel`` are running."""
        waiting = (run for run in self.runs.values() if run.child is None)
        while sum(run.running for run in self.runs.values()) < self.parallel:
            run = next(waiting, None)
            if run is None:
                return
            run.start()

    def wait(self, spec: RunSpec) -> FinishedRun:
        finished = self.runs[spec].wait()
        self.refill()
        return finished

    def stop(self) -> None:
        for run in self.runs.values():
            run.stop()
