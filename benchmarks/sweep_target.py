"""Size against accuracy: ``rankshrink compress`` on the bundled sample under ten configurations.

    python benchmarks/sweep_target.py            # the full sweep, a few minutes on 2 cores
    python benchmarks/sweep_target.py --quick    # default and --target-ratio 0.4, 300 steps each
    python benchmarks/sweep_target.py --keep     # keep the output directory and print its path
    python benchmarks/sweep_target.py --threads 1  # fewer torch threads on a busy machine

Compresses ``sample_models/mlp_digits.pt`` (64-256-256-256-10 MLP) on ``sample_models/digits.npz``
once per configuration, calling :func:`rankshrink.pipeline.compress.compress` in-process the way
``rankshrink compress`` does: every flag starts from the CLI's own default (read from the signature
of :func:`rankshrink.cli.app.compress`), the configuration's flags are applied on top, and
``CompressConfig``/``TrainConfig`` are built from them exactly as the CLI builds them. Outputs go to
a temporary directory, again as the CLI writes them: the report always, the ONNX file only when
every gate passed.

Configurations: the default (``--target-ratio 0.6``); ``--target-ratio`` 0.4, 0.5 and 0.7;
``--no-target`` (the paper's fixed τ thresholds); ``--axis-policy longer`` (the paper's longer-axis
rule); ``--no-distill`` (labels only); ``--steps`` 500 and 2000 (default 1000); ``--no-frobenius``.

One Markdown table row per configuration, all numbers taken from the run's report:

- param ratio, ONNX ratio: ``params_after / params_before`` and ``onnx_bytes_after /
  onnx_bytes_before`` (both models exported the same way);
- acc before / after: top-1 test accuracy (%) of the original and of the compressed ONNX on the
  held-out split;
- agreement: fraction of held-out samples where the compressed ONNX's top-1 equals the original's;
- fusions: vector fusions during fine-tuning; ft s: seconds of the fine-tuning loop alone;
- export diff: max abs diff of the compressed torch model against its own ONNX (tolerance 1e-4);
- passed: verification and gates passed. A configuration that fails verification, or raises one of
  rankshrink's errors (diverged training, failed export), still gets its row, with ``no``, and the
  reasons are listed under the table. Any other exception is also reported as a row (traceback on
  stderr) and makes the script exit 1.

Above the table: torch and onnxruntime versions, torch's thread count and the load average at the
start and at the end (timings are only comparable on a quiet machine). Progress goes to stderr.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from rankshrink import __version__
from rankshrink.cli import app as rankshrink_cli
from rankshrink.errors import RankshrinkError
from rankshrink.io.outputs import check_outputs, write_all
from rankshrink.onnx.export import ExportConfig
from rankshrink.onnx.task import Tolerances
from rankshrink.pipeline.compress import compress
from rankshrink.pipeline.config import CompressConfig
from rankshrink.train.rare_config import TrainConfig

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
QUICK_STEPS = 300


def cli_defaults() -> dict[str, Any]:
    """The default of every ``rankshrink compress`` option, enums as their string values."""
    defaults: dict[str, Any] = {}
    for name, param in inspect.signature(rankshrink_cli.compress).parameters.items():
        if param.default is inspect.Parameter.empty:
            continue
        value = param.default
        defaults[name] = value.value if isinstance(value, Enum) else value
    return defaults


CLI_DEFAULTS = cli_defaults()


@dataclass(frozen=True)
class Variant:
    """One configuration: a label (its CLI flags) and the option values it overrides."""

    label: str
    flags: dict[str, Any] = field(default_factory=dict)


def variants(quick: bool) -> list[Variant]:
    default = Variant(f"default (--target-ratio {CLI_DEFAULTS['target_ratio']:g})")
    ratios = [Variant(f"--target-ratio {r:g}", {"target_ratio": r}) for r in (0.4, 0.5, 0.7)]
    if quick:
        return [
            Variant(f"{v.label} --steps {QUICK_STEPS}", {**v.flags, "steps": QUICK_STEPS})
            for v in (default, ratios[0])
        ]
    return [
        default,
        *ratios,
        Variant("--no-target", {"no_target": True}),
        Variant("--axis-policy longer", {"axis_policy": "longer"}),
        Variant("--no-distill", {"distill": False}),
        Variant("--steps 500", {"steps": 500}),
        Variant("--steps 2000", {"steps": 2000}),
        Variant("--no-frobenius", {"no_frobenius": True}),
    ]


def build_config(model: Path, data: Path, overrides: dict[str, Any]) -> CompressConfig:
    """``CompressConfig`` from CLI option values, the way ``rankshrink.cli.app.compress`` builds it."""
    unknown = set(overrides) - set(CLI_DEFAULTS)
    if unknown:
        raise ValueError(f"not options of rankshrink compress: {sorted(unknown)}")
    o = {**CLI_DEFAULTS, **overrides}
    return CompressConfig(
        model=model,
        data=data,
        arch=o["arch"],
        trust_pickle=o["trust_pickle"],
        train=TrainConfig(
            steps=o["steps"],
            batch_size=o["batch_size"],
            lr=o["lr"],
            lambda_rank=o["lambda_rank"],
            lambda_l2=o["lambda_l2"],
            tau_cos=o["tau_cos"],
            tau_euc=o["tau_euc"],
            fusion=not o["no_fusion"],
            distill=o["distill"],
            target_ratio=None if o["no_target"] or o["no_fusion"] else o["target_ratio"],
            seed=o["seed"],
        ),
        frobenius=not o["no_frobenius"],
        axis_policy=o["axis_policy"],
        export=ExportConfig(exporter=o["exporter"], opset=o["opset"]),
        tolerances=Tolerances(o["export_atol"], o["max_accuracy_drop"], o["min_agreement"]),
        max_bytes=o["max_bytes"],
    )


@dataclass
class Row:
    label: str
    report: dict[str, Any] | None = None
    failures: list[str] = field(default_factory=list)
    unexpected: bool = False  # an exception that is not one of rankshrink's own errors

    @property
    def passed(self) -> bool:
        return self.report is not None and bool(self.report["gates"]["passed"])


def run_variant(variant: Variant, index: int, model: Path, data: Path, out_dir: Path) -> Row:
    """Compress once and write the outputs as the CLI would; never raises (but on Ctrl-C)."""
    row = Row(variant.label)
    out_path = out_dir / f"{index:02d}.onnx"
    report_path = out_path.with_suffix(".json")
    try:
        cfg = build_config(model, data, variant.flags)
        check_outputs([out_path, report_path], [model, data], overwrite=False)
        result = compress(cfg, stage=lambda msg: log(f"  {msg}…"))
    except RankshrinkError as exc:  # diverged training, failed export, bad input
        row.failures = [f"{type(exc).__name__}: {exc}"]
        return row
    except Exception as exc:  # a bug: keep the sweep going, but say so loudly
        traceback.print_exc()
        row.failures = [f"unexpected {type(exc).__name__}: {exc}"]
        row.unexpected = True
        return row
    row.report, row.failures = result.report, list(result.gate_failures)
    files = {report_path: (json.dumps(result.report, indent=2) + "\n").encode()}
    if not result.gate_failures:
        files[out_path] = result.onnx
    write_all(files)
    return row


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(rows: list[Row]) -> list[str]:
    head = [
        "config",
        "param ratio",
        "ONNX ratio",
        "acc before %",
        "acc after %",
        "agreement",
        "fusions",
        "ft s",
        "export diff",
        "passed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    for row in rows:
        rep = row.report
        if rep is None:
            cells = [row.label] + ["–"] * (len(head) - 2) + ["no (error)"]
        else:
            ver, tr = rep["verification"], rep["training"]
            cells = [
                row.label,
                fmt(rep["param_ratio"], ".3f"),
                fmt(rep["onnx_ratio"], ".3f"),
                fmt(ver["accuracy_before"], ".2f"),
                fmt(ver["accuracy_after"], ".2f"),
                fmt(ver["agreement"], ".4f"),
                str(tr["fusions"]),
                fmt(tr["seconds"], ".1f"),
                fmt(ver["export_max_abs_diff"], ".1e"),
                "yes" if row.passed else "no",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"only the default and --target-ratio 0.4, {QUICK_STEPS} steps each",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the output directory and print its path"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) first [default: torch's own choice, as the CLI]",
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    model, data = SAMPLES / "mlp_digits.pt", SAMPLES / "digits.npz"
    missing = [str(p) for p in (model, data) if not p.is_file()]
    if missing:
        log(f"sample files missing: {', '.join(missing)}")
        log("run `python sample_models/make_samples.py` first")
        return 1

    load_start = load_average()
    todo = variants(args.quick)
    rows: list[Row] = []
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.keep:
            out_dir = Path(tempfile.mkdtemp(prefix="sweep-target-"))
        else:
            out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sweep-target-")))
        for i, variant in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {variant.label}")
            rows.append(run_variant(variant, i, model, data, out_dir))
    wall = time.perf_counter() - start

    print(
        f"rankshrink {__version__}, torch {torch.__version__}, onnxruntime {ort.__version__},"
        f" {torch.get_num_threads()} torch threads; load average (1/5/15 min) {load_start}"
        f" at start, {load_average()} at end; {wall:.0f} s in all"
    )
    print(f"model {model.name}, data {data.name}; every other flag at the CLI default")
    print()
    print("\n".join(table(rows)))
    failed = [row for row in rows if not row.passed]
    if failed:
        print()
        for row in failed:
            print(f"- {row.label}: " + ("; ".join(row.failures) or "verification failed"))
    if args.keep:
        print()
        print(f"outputs kept in {out_dir}")
    return 1 if any(row.unexpected for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
