"""``rankshrink compare``: every method on one model and split, at matched budgets, side by side.

Budgets are fractions of the original: truncated SVD keeps that fraction of the Linear layers'
parameters (``--budget``), RaRe aims its export size at it (``--target-ratio``); RMT-SVD, layer
sparsity and the combinations have no budget (the spectrum, resp. the penalty, decides) and give
one point each. ``rare+rmt-svd`` is not run unless asked for: on both sample models it was larger
than RMT-SVD alone at the same accuracy (see the README).
Since the two budget notions differ, the table and plot put every run at the ONNX size it
actually reached: that, not the nominal budget, is what a comparison should be read against.

Every run uses the same data split (the file's, or the seed's), the same number of fine-tuning
steps and the same objective (cross-entropy plus distillation), and is exported and verified
like ``compress``. Latency is onnxruntime's (one thread, median) at batch 1 and 256, measured
here for every file in turn so the numbers come from the same conditions.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rankshrink.errors import GateError, UnsupportedModelError
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.onnx.session import latency_ms, session
from rankshrink.pipeline.compress import compress_subject
from rankshrink.pipeline.config import CompressConfig, MethodConfig
from rankshrink.pipeline.methods import METHODS
from rankshrink.pipeline.subject import Subject, load_subject
from rankshrink.pipeline.threads import choose_threads, intra_op_threads
from rankshrink.train.rare_config import TrainConfig

#: The methods run when none are named (every method, but combinations only where they helped).
DEFAULT_METHODS = tuple(name for name, m in METHODS.items() if m.in_compare)

#: The batch sizes latency is measured at (one request; a throughput-sized batch).
LATENCY_BATCHES = (1, 256)


@dataclass(frozen=True)
class CompareConfig:
    """What ``rankshrink compare`` runs."""

    model: Path
    data: Path
    budgets: tuple[float, ...] = (0.3, 0.5, 0.7)
    steps: int = 1000
    seed: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    arch: str | None = None
    trust_pickle: bool = False
    # intra-op threads for every run, as compress's --threads (None: the thread policy's count,
    # rankshrink.pipeline.threads; it depends only on the model and the batch, so every run gets the same
    # count and the "seconds" column stays comparable)
    threads: int | None = None


@dataclass
class Comparison:
    """The table rows (the original first), and the methods that did not apply, with why."""

    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]]


def _runs(cfg: CompareConfig) -> list[tuple[str, float | None, MethodConfig, TrainConfig]]:
    base = TrainConfig(steps=cfg.steps, seed=cfg.seed)
    runs: list[tuple[str, float | None, MethodConfig, TrainConfig]] = []
    for name in cfg.methods:
        where = METHODS[name].budget
        if where is None:
            runs.append((name, None, MethodConfig(name), base))
        elif where == "budget":
            runs += [(name, b, MethodConfig(name, budget=b), base) for b in cfg.budgets]
        else:  # aims its export size at the budget
            runs += [
                (name, b, MethodConfig(name), replace(base, target_ratio=b)) for b in cfg.budgets
            ]
    return runs


def compare(cfg: CompareConfig, on_run: Callable[[str], None] | None = None) -> Comparison:
    """Run every method of ``cfg`` and measure each result.

    Args:
        on_run: called with a label ("svd budget 0.3") before each run starts.

    Raises:
        InputError: bad model, data or settings (the first run finds them).
    """
    runs = _runs(cfg)
    subject = load_subject(Path(cfg.model), Path(cfg.data), cfg.arch, cfg.trust_pickle, cfg.seed)
    one = subject.data.x_train[:1]
    threads = choose_threads(cfg.threads, subject.model, one, runs[0][3].batch_size)
    with intra_op_threads(threads):
        return _compare(cfg, subject, runs, threads, on_run)


def _compare(
    cfg: CompareConfig,
    subject: Subject,
    runs: list[tuple[str, float | None, MethodConfig, TrainConfig]],
    threads: int,
    on_run: Callable[[str], None] | None,
) -> Comparison:
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    original: dict[str, Any] | None = None
    for method, budget, mcfg, train in runs:
        label = method if budget is None else f"{method} budget {budget:g}"
        if on_run:
            on_run(label)
        ccfg = CompressConfig(
            model=cfg.model,
            data=cfg.data,
            method=mcfg,
            arch=cfg.arch,
            trust_pickle=cfg.trust_pickle,
            train=train,
            measure_latency=False,  # measured below, at every batch size, for every file
            threads=threads,
            # RaRe inside a combination aims at the family's default target, as compress does
            auto_target=method == "rare+rmt-svd",
        )
        start = time.perf_counter()
        try:
            result = compress_subject(subject, ccfg)
        except UnsupportedModelError as exc:
            skipped.append({"method": method, "reason": str(exc)})
            continue
        except GateError as exc:  # diverged or unexportable: a row that says so
            rows.append({"method": method, "budget": budget, "error": str(exc)})
            continue
        seconds = time.perf_counter() - start
        rep = result.report
        ver = rep["verification"]
        if original is None:
            original = _original_row(subject, rep)
            rows.insert(0, original)
        rows.append(
            {
                "method": method,
                "budget": budget,
                "params": rep["params_after"],
                "param_ratio": rep["param_ratio"],
                "onnx_bytes": rep["onnx_bytes_after"],
                "onnx_ratio": rep["onnx_ratio"],
                "accuracy": ver["accuracy_after"],
                "agreement": ver["agreement"],
                "pooled_cosine": ver.get("pooled_cosine_mean"),  # token models' hidden states
                "max_abs_diff": ver["max_abs_diff"],
                "samples": ver["samples"],  # held-out samples: one of them is 100/n points
                **_latencies(result.onnx, subject),
                "seconds": seconds,
                "passed": ver["passed"],
                "failures": ver["failures"],
            }
        )
    return Comparison(rows, skipped)


def _original_row(subject: Subject, rep: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="rankshrink-") as tmp:
        path = Path(tmp, "original.onnx")
        example = subject.data.x_train[:4]
        export_onnx(subject.model, example, path, ExportConfig(), subject.io)
        blob = path.read_bytes()
    ver = rep["verification"]
    return {
        "method": "original",
        "budget": None,
        "params": rep["params_before"],
        "param_ratio": 1.0,
        "onnx_bytes": rep["onnx_bytes_before"],
        "onnx_ratio": 1.0,
        "accuracy": ver["accuracy_before"],
        "agreement": 1.0 if ver["agreement"] is not None else None,
        "pooled_cosine": 1.0 if ver.get("pooled_cosine_mean") is not None else None,
        "max_abs_diff": 0.0,
        "samples": ver["samples"],
        **_latencies(blob, subject),
        "seconds": 0.0,
        "passed": True,
    }


def _latencies(onnx: bytes, subject: Subject) -> dict[str, float]:
    x = subject.data.x_test
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="rankshrink-") as tmp:
        path = Path(tmp, "m.onnx")
        path.write_bytes(onnx)
        sess = session(path)
        for batch in LATENCY_BATCHES:
            xb = x[:batch]
            if len(xb) < batch:  # a small test split: repeat it up to the batch size
                xb = x.repeat((batch + len(x) - 1) // len(x), *[1] * (x.dim() - 1))[:batch]
            out[f"latency_ms_b{batch}"] = latency_ms(sess, xb, repeats=20, io=subject.io)
    return out
