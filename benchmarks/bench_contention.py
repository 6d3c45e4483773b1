"""A busy machine costs its share, not an order of magnitude: wall times idle vs next to busy loops.

    PYTHONPATH=. python benchmarks/bench_contention.py [--only quickstart|minilm] [--hogs 2]
        [--pin unpinned,pinned] [--variants policy,active,one-thread] [--minilm-steps 20]

Each measurement runs ``rankshrink compress`` through the command line in a fresh process, first
on the machine as it is ("idle"), then with ``--hogs`` busy-loop processes (plain Python
``while True: pass``) on the cores, unpinned (the scheduler places them) and pinned (hog i on core
i mod N); the hogs are killed after each run. Side by side in one run it prints:

1. **Quick start**: ``rankshrink compress sample_models/mlp_digits.pt --data
   sample_models/digits.npz`` (defaults: 1000 steps; the thread policy gives it one thread); wall
   times and the busy/idle ratio (issue 10's goal: <= 1.5). Then the same command under
   ``taskset -c 0``, and whether its ONNX is byte-identical to the idle run's on every core.
2. **MiniLM-sized steps**: ``rankshrink compress FOLDER --data tokens.npz --steps 20
   --batch-size 8`` on the random MiniLM-L6-shaped BERT of ``bench_minilm.py`` (its
   ``make_folder``; the policy gives it more than one thread where there are cores). The random
   model does not shrink in 20 steps, so the run ends at the size gate (exit 3) with its report
   written: the ratio of the report's ``training.seconds`` (the 20 steps) is the goal's (<= 2.5);
   the wall ratio (load, teacher, export, verification) is shown too.

``--variants`` adds, for the MiniLM part, what the policy is compared with: ``active`` (the same
threads with ``OMP_WAIT_POLICY=ACTIVE``, OpenMP's spinning wait, which rankshrink replaces with
PASSIVE unless the user set it) and ``one-thread`` (``--threads 1``).

Every line shows the process's CPU time (user + system) next to its wall time. CPU time that stays
the same while the wall time grows is the scheduler's share of the cores and nothing else (one
thread next to two unpinned hogs on two cores gets 2/3 of a core: 1.5x; with a hog pinned on each
core, 1/2: 2x); CPU time that grows is threads burning cycles while they wait. The load average is
printed before and after: other work on the machine makes "idle" not idle. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

MLP = ROOT / "sample_models" / "mlp_digits.pt"
DIGITS = ROOT / "sample_models" / "digits.npz"
GOALS = {"quickstart": 1.5, "minilm": 2.5}  # busy/idle wall-time ratios from issue 10
#: MiniLM variants: extra compress flags and environment
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "policy": ([], {}),
    "active": ([], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "one-thread": (["--threads", "1"], {}),
}


def load() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


@contextmanager
def hogs(count: int, pinned: bool) -> Iterator[None]:
    """``count`` busy-loop processes for the duration of the block (none when ``count`` is 0)."""
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    try:
        for i in range(count):
            prefix = ["taskset", "-c", str(cores[i % len(cores)])] if pinned else []
            procs.append(subprocess.Popen([*prefix, sys.executable, "-c", "while True: pass"]))
        time.sleep(1.0 if count else 0.0)  # let them take their cores
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@dataclass
class Run:
    """One ``rankshrink compress`` process: wall time, CPU time (user + system), its report."""

    wall: float
    cpu: float
    report: dict

    def describe(self) -> str:
        # CPU time that grows under load is work wasted waiting (spinning); CPU time that stays
        # while the wall time grows is the scheduler's share of the cores, nothing else
        return (
            f"wall {self.wall:6.1f} s  cpu {self.cpu:6.1f} s"
            f" (threads {self.report['config']['threads']})"
        )


def compress(
    model: Path, data: Path, out: Path, flags: list[str], env: dict[str, str], prefix: list[str]
) -> Run:
    """One ``rankshrink compress`` in a fresh process."""
    cmd = [*prefix, sys.executable, "-m", "rankshrink", "compress", str(model), "--data", str(data)]
    cmd += ["--out", str(out), "--overwrite", "-q", *flags]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the hogs are reaped outside this
    start = time.perf_counter()
    run = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode not in (0, 3):  # 3: a gate failed, the report is still written
        raise SystemExit(f"{' '.join(cmd)} exited {run.returncode}:\n{run.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Run(wall, cpu, json.loads(out.with_suffix(".json").read_text()))


def conditions(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    """(label, hogs, pinned): idle first, then each pinning asked for."""
    out = [("idle", 0, False)]
    for pin in args.pin:
        out.append((f"{args.hogs} hogs {pin}", args.hogs, pin == "pinned"))
    return out


def quickstart(tmp: Path, args: argparse.Namespace) -> None:
    print()
    model, data = MLP.relative_to(ROOT), DIGITS.relative_to(ROOT)
    print(f"quick start: rankshrink compress {model} --data {data}")
    idle: Run | None = None
    idle_onnx = b""
    for label, count, pinned in conditions(args):
        out = tmp / f"quick-{count}-{pinned}.onnx"
        with hogs(count, pinned):
            run = compress(MLP, DIGITS, out, [], {}, [])
        line = f"  {label:18s} {run.describe()}"
        if idle is None:
            idle, idle_onnx = run, out.read_bytes()
        else:
            line += f"  busy/idle wall {run.wall / idle.wall:.2f} (goal <= {GOALS['quickstart']}),"
            line += f" cpu {run.cpu / idle.cpu:.2f}"
        print(line, flush=True)
    if shutil.which("taskset") is None:
        print("  taskset not found: the one-core byte check is skipped")
        return
    out = tmp / "quick-core0.onnx"
    run = compress(MLP, DIGITS, out, [], {}, ["taskset", "-c", "0"])
    same = out.read_bytes() == idle_onnx
    cores = len(os.sched_getaffinity(0))
    print(f"  {'taskset -c 0':18s} {run.describe()}")
    print(
        f"  ONNX on one core byte-identical to the idle run's on {cores} cores:"
        f" {'yes' if same else 'NO'} ({len(idle_onnx):,} bytes)",
        flush=True,
    )


def minilm(tmp: Path, args: argparse.Namespace) -> None:
    from bench_minilm import make_folder
    from transformers.utils import logging

    logging.disable_progress_bar()  # save_pretrained's shard bar
    folder, data = make_folder(tmp)
    flags = ["--steps", str(args.minilm_steps), "--batch-size", "8"]
    print()
    print(
        f"MiniLM-sized random BERT (bench_minilm.make_folder): compress --steps {args.minilm_steps}"
        " --batch-size 8; 'steps' is the report's training.seconds"
    )
    for variant in args.variants:
        extra, env = VARIANTS[variant]
        idle: Run | None = None
        for label, count, pinned in conditions(args):
            out = tmp / f"minilm-{variant}-{count}-{pinned}.onnx"
            with hogs(count, pinned):
                run = compress(folder, data, out, [*flags, *extra], env, [])
            steps_s = run.report["training"]["seconds"]
            line = f"  {variant:10s} {label:18s} {run.describe()}  steps {steps_s:5.1f} s"
            line += f" ({steps_s / args.minilm_steps * 1e3:.0f} ms/step)"
            if idle is None:
                idle = run
            else:
                ratio = steps_s / idle.report["training"]["seconds"]
                line += f"\n      busy/idle steps {ratio:.2f} (goal <= {GOALS['minilm']}),"
                line += f" wall {run.wall / idle.wall:.2f}, cpu {run.cpu / idle.cpu:.2f}"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("quickstart", "minilm"), help="run one part only")
    parser.add_argument("--hogs", type=int, default=2, help="busy-loop processes [2]")
    parser.add_argument(
        "--pin",
        type=lambda s: [p for p in s.split(",") if p],
        default=["unpinned", "pinned"],
        help="comma-separated: unpinned, pinned [both]",
    )
    parser.add_argument(
        "--variants",
        type=lambda s: [v for v in s.split(",") if v],
        default=["policy"],
        help=f"MiniLM variants, comma-separated, of {', '.join(VARIANTS)} [policy]",
    )
    parser.add_argument("--minilm-steps", type=int, default=20)
    args = parser.parse_args()
    bad = [v for v in args.variants if v not in VARIANTS] + [
        p for p in args.pin if p not in ("unpinned", "pinned")
    ]
    if bad:
        parser.error(f"unknown: {', '.join(bad)}")

    cores = len(os.sched_getaffinity(0))
    wait = os.environ.get("OMP_WAIT_POLICY", "unset: rankshrink sets PASSIVE")
    print(f"torch {version('torch')}, {cores} cores, OMP_WAIT_POLICY {wait}")
    print(f"load average (1/5/15 min) at the start: {load()}")
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        if args.only != "minilm":
            quickstart(Path(tmp), args)
        if args.only != "quickstart":
            minilm(Path(tmp), args)
    print()
    print(f"load average at the end: {load()}")


if __name__ == "__main__":
    main()
