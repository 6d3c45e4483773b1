"""``compress``: load → factorize → fine-tune with RaRe and live fusion → fold → export → verify.

This is the library entry point the CLI calls. It writes nothing to the user's directories: the
ONNX bytes, the report and the compressed checkpoint come back in a :class:`CompressResult`, and
the caller writes them (atomically) once the gates have been decided.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rankshrink import __version__
from rankshrink.arch import count_params, make_checkpoint
from rankshrink.chain import prepare_chain
from rankshrink.checkpoint import LoadedModel, load_model
from rankshrink.data import Dataset, load_data
from rankshrink.errors import InputError
from rankshrink.fold import FoldResult, export_bytes, fold
from rankshrink.onnx_export import ExportConfig, export_onnx
from rankshrink.surgery import factorize_
from rankshrink.train import StepStats, TrainConfig, TrainReport, fine_tune_
from rankshrink.verify import Tolerances, Verification, latency_ms, session, verify_export


@dataclass
class CompressConfig:
    """Everything ``rankshrink compress`` can be told."""

    model: Path
    data: Path
    arch: str | None = None
    trust_pickle: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    frobenius: bool = True
    axis_policy: str = "fold"
    export: ExportConfig = field(default_factory=ExportConfig)
    tolerances: Tolerances = field(default_factory=Tolerances)
    max_bytes: int | None = None
    measure_latency: bool = True


@dataclass
class CompressResult:
    """What a compression run produced; nothing of it is on disk yet."""

    report: dict[str, Any]
    onnx: bytes
    checkpoint: dict[str, Any]
    fold: FoldResult
    verification: Verification
    training: TrainReport
    gate_failures: list[str]


def load_inputs(
    model_path: Path, data_path: Path, arch: str | None, trust_pickle: bool, seed: int
) -> tuple[LoadedModel, Dataset, bool]:
    """Load and cross-check a model and a data file; return them and whether it is a classifier."""
    loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle)
    data = load_data(data_path, seed=seed)
    try:
        with torch.no_grad():
            out = loaded.model(data.x_train[:2])
    except Exception as exc:  # wrong width or rank: the model tells us in its own words
        raise InputError(
            f"{data_path}: inputs of shape {tuple(data.x_train.shape[1:])} do not fit the model"
            f" ({str(exc).splitlines()[0][:160]})"
        ) from None
    if out.dim() != 2:
        raise InputError(
            f"the model's output has shape {tuple(out.shape)}; expected (batch, outputs)"
        )
    if data.y_train is not None:
        top = int(max(data.y_train.max(), data.y_test.max()))  # type: ignore[union-attr]
        if top >= out.shape[-1]:
            raise InputError(
                f"{data_path}: label {top} is out of range for a model with {out.shape[-1]} outputs"
            )
    return loaded, data, data.has_labels


def compress(
    cfg: CompressConfig,
    progress: Callable[[StepStats], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> CompressResult:
    """Run the whole pipeline of SPEC §1–4 on one model.

    Raises:
        InputError: bad model or data (exit 2).
        TrainingDivergedError, ExportError: the run could not produce a trustworthy model (exit 3).
    """
    say = stage or (lambda _msg: None)
    say("loading")
    loaded, data, classifier = load_inputs(
        cfg.model, cfg.data, cfg.arch, cfg.trust_pickle, cfg.train.seed
    )
    original = loaded.model
    chain = factorize_(
        prepare_chain(original), frobenius=cfg.frobenius, axis_policy=cfg.axis_policy
    )
    teacher = None
    if not data.has_labels or cfg.train.distill:
        with torch.no_grad():
            teacher = original(data.x_train)

    say("fine-tuning")
    training = fine_tune_(
        chain,
        data.x_train,
        data.y_train,
        teacher,
        cfg.train,
        size_fn=lambda: export_bytes(chain.model),
        progress=progress,
    )

    say("folding")
    folded = fold(chain.model)
    with torch.no_grad():
        fold_diff = float((folded.model(data.x_test) - chain.model(data.x_test)).abs().max())

    say("exporting")
    example = data.x_train[: min(4, len(data.x_train))]
    with tempfile.TemporaryDirectory(prefix="rankshrink-") as tmp:
        before_path, after_path = Path(tmp, "original.onnx"), Path(tmp, "compressed.onnx")
        bytes_before = export_onnx(original, example, before_path, cfg.export)
        bytes_after = export_onnx(folded.model, example, after_path, cfg.export)
        say("verifying")
        verification = verify_export(
            original, folded.model, after_path, data.x_test, data.y_test, cfg.tolerances, classifier
        )
        lat_before = lat_after = None
        if cfg.measure_latency:
            one = data.x_test[:1]
            lat_before = latency_ms(session(before_path), one)
            lat_after = latency_ms(session(after_path), one)
        onnx_blob = after_path.read_bytes()

    gate_failures = list(verification.failures)
    if cfg.max_bytes is not None and bytes_after > cfg.max_bytes:
        gate_failures.append(f"ONNX size {bytes_after} bytes > --max-bytes {cfg.max_bytes}")

    params_before, params_after = count_params(original), count_params(folded.model)
    report = {
        "rankshrink_version": __version__,
        "method": "rare",
        "input": {"path": str(loaded.path), "sha256": loaded.sha256, "source": loaded.source},
        "data": {
            "path": str(cfg.data),
            "split": data.split,
            "train": len(data.x_train),
            "test": len(data.x_test),
            "labels": data.has_labels,
        },
        "config": _config_dict(cfg),
        "params_before": params_before,
        "params_after": params_after,
        "param_ratio": params_after / params_before,
        "onnx_bytes_before": bytes_before,
        "onnx_bytes_after": bytes_after,
        "onnx_ratio": bytes_after / bytes_before,
        "layers": [_layer_dict(lf) for lf in folded.layers],
        "verification": {
            "passed": verification.passed,
            "export_max_abs_diff": verification.export_max_abs_diff,
            "export_batches": verification.export_batches,
            "fold_max_abs_diff": fold_diff,
            "max_abs_diff": verification.max_abs_diff,
            "agreement": verification.agreement,
            "accuracy_before": verification.accuracy_before,
            "accuracy_after": verification.accuracy_after,
            "samples": verification.samples,
            "failures": verification.failures,
        },
        "training": {
            "steps": training.steps,
            "seconds": training.seconds,
            "fusions": training.fusions,
            "fusions_by_layer": training.fusions_by_layer,
            "skipped_steps": training.skipped_steps,
            "search_refresh": training.search_refresh,
            "history": training.history,
        },
        "latency_ms_before": lat_before,
        "latency_ms_after": lat_after,
        "gates": {"passed": not gate_failures, "failures": gate_failures},
    }
    meta = {
        "compressed_by": f"rankshrink {__version__}",
        "source_sha256": loaded.sha256,
        "method": "rare",
    }
    return CompressResult(
        report=report,
        onnx=onnx_blob,
        checkpoint=make_checkpoint(folded.model, meta),
        fold=folded,
        verification=verification,
        training=training,
        gate_failures=gate_failures,
    )


def _layer_dict(lf: Any) -> dict[str, Any]:
    return {
        "name": lf.name,
        "original_shape": list(lf.original_shape),
        "core_shape": list(lf.core_shape),
        "weight_shape": list(lf.weight_shape),
        "feature_width": lf.feature_width,
        "fold_kind": lf.kind,
        "params": lf.params,
        "original_params": lf.original_shape[0] * lf.original_shape[1] + lf.original_shape[0],
    }


def _config_dict(cfg: CompressConfig) -> dict[str, Any]:
    train = asdict(cfg.train)
    return {
        "train": {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in train.items()
        },
        "frobenius": cfg.frobenius,
        "axis_policy": cfg.axis_policy,
        "exporter": cfg.export.exporter,
        "opset": cfg.export.opset,
        "export_atol": cfg.tolerances.export_atol,
        "max_accuracy_drop": cfg.tolerances.max_accuracy_drop,
        "min_agreement": cfg.tolerances.min_agreement,
        "max_bytes": cfg.max_bytes,
    }
