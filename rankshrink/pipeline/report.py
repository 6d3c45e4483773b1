"""The JSON report of a compression run (SPEC §6), shared by every method and model family.

Each pipeline (RaRe on chains and Transformers, the other methods, Hugging Face folders) measures
different things, but the report they write has one shape; the pieces here build it so that a
key added for one pipeline is added for all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rankshrink import __version__
from rankshrink.io.checkpoint import LoadedModel
from rankshrink.io.data import Dataset
from rankshrink.onnx.verify import Verification
from rankshrink.train.rare_config import TrainReport


def build_report(
    *,
    method: str,
    loaded: LoadedModel,
    data_path: Path,
    data: Dataset,
    family: str,
    config: dict[str, Any],
    params: tuple[int, int],
    onnx_bytes: tuple[int, int],
    layers: list[dict[str, Any]],
    heads: Any,
    verification: dict[str, Any],
    training: TrainReport,
    latency_ms: tuple[float | None, float | None],
    failures: list[str],
    extra: dict[str, Any] | None = None,
    input_extra: dict[str, Any] | None = None,
    data_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report: ``params`` and ``onnx_bytes`` are (before, after); ``extra`` keys go after
    ``attention_heads``."""
    (params_before, params_after), (bytes_before, bytes_after) = params, onnx_bytes
    return {
        "rankshrink_version": __version__,
        "method": method,
        "input": {
            "path": str(loaded.path),
            "sha256": loaded.sha256,
            "source": loaded.source,
            **(input_extra or {}),
        },
        "data": {
            "path": str(data_path),
            "split": data.split,
            "train": len(data.x_train),
            "test": len(data.x_test),
            "labels": data.has_labels,
            **(data_extra or {}),
        },
        "model_family": family,
        "config": config,
        "params_before": params_before,
        "params_after": params_after,
        "param_ratio": params_after / params_before,
        "onnx_bytes_before": bytes_before,
        "onnx_bytes_after": bytes_after,
        "onnx_ratio": bytes_after / bytes_before,
        "layers": layers,
        "attention_heads": heads,
        **(extra or {}),
        "verification": verification,
        "training": {
            "steps": training.steps,
            "seconds": training.seconds,
            "fusions": training.fusions,
            "fusions_by_layer": training.fusions_by_layer,
            "skipped_steps": training.skipped_steps,
            "search_refresh": training.search_refresh,
            "history": training.history,
        },
        "latency_ms_before": latency_ms[0],
        "latency_ms_after": latency_ms[1],
        "gates": {"passed": not failures, "failures": failures},
    }


def verification_dict(
    v: Verification, fold_diff: float | None = None, **extra: Any
) -> dict[str, Any]:
    """The report's ``verification`` block (and ``verify --json``); ``fold_max_abs_diff`` only
    where a fold happened. ``gates`` lists every gate with its metric, threshold, value, source
    (default or flag) and result; ``passed`` is true only when every check and gate passed."""
    out: dict[str, Any] = {
        "passed": v.passed,
        "task": v.task,
        "export_max_abs_diff": v.export_max_abs_diff,
        "export_batches": v.export_batches,
    }
    if fold_diff is not None:
        out["fold_max_abs_diff"] = fold_diff
    out.update(
        max_abs_diff=v.max_abs_diff,
        agreement=v.agreement,
        accuracy_before=v.accuracy_before,
        accuracy_after=v.accuracy_after,
        mean_prob_diff=v.mean_prob_diff,
        rel_error=v.rel_error,
        samples=v.samples,
        gates=[g.as_dict() for g in v.gates],
        failures=v.failures,
        **(v.checks or {}),
        **extra,
    )
    return out
