"""``compress``: load → adapt → the method's stages → export → verify → report, for every model.

This is the library entry point (``from rankshrink import compress``) and the one path the CLI,
``compare`` and the benchmarks call. It writes nothing to the user's directories: the ONNX bytes,
the report and the compressed checkpoint come back in a :class:`CompressResult`, and the caller
writes them (atomically) once the gates have been decided.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from rankshrink import __version__
from rankshrink.models.arch import count_params, make_checkpoint
from rankshrink.onnx.export import check_single_file, export_onnx
from rankshrink.onnx.gates import size_gates
from rankshrink.onnx.provenance import stamp_provenance
from rankshrink.onnx.session import latency_ms, session
from rankshrink.onnx.verify import Verification, verify_export, with_gates
from rankshrink.pipeline.config import CompressConfig
from rankshrink.pipeline.methods import method_dict, run_method, training_account
from rankshrink.pipeline.quantize_stage import quantize_verified
from rankshrink.pipeline.report import build_report, verification_dict
from rankshrink.pipeline.stages import Stage
from rankshrink.pipeline.subject import Subject, load_subject
from rankshrink.pipeline.threads import choose_threads, intra_op_threads
from rankshrink.train.rare_config import StepStats, TrainReport


@dataclass
class CompressResult:
    """What a compression run produced; nothing of it is on disk yet."""

    report: dict[str, Any]
    onnx: bytes
    checkpoint: dict[str, Any]  # empty unless CompressConfig.checkpoint
    model: nn.Module  # the compressed model (takes x as the data holds it)
    verification: Verification
    training: TrainReport
    gate_failures: list[str]


def compress(
    cfg: CompressConfig,
    progress: Callable[[StepStats], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> CompressResult:
    """Compress ``cfg.model`` with ``cfg.method`` (SPEC §1–6); nothing is written to disk.

    Args:
        progress: called after every RaRe fine-tuning step (the other stages report phases
            through ``stage``).
        stage: called with a short phase name ("loading", "fine-tuning", "exporting", …).

    Raises:
        InputError, UnsupportedModelError: bad model, data or settings, or a method that does
            not apply to the model — before any fine-tuning (exit 2).
        TrainingDivergedError, ExportError: no trustworthy model came out (exit 3).
    """
    say = stage or (lambda _msg: None)
    say("loading")
    t = cfg.train
    subject = load_subject(cfg.model, cfg.data, cfg.arch, cfg.trust_pickle, t.seed)
    # everything after loading computes on the thread policy's count (rankshrink.pipeline.threads)
    threads = choose_threads(cfg.threads, subject.model, subject.data.x_train[:1], t.batch_size)
    with intra_op_threads(threads):
        return compress_subject(subject, replace(cfg, threads=threads), progress, say)


def compress_subject(
    subject: Subject,
    cfg: CompressConfig,
    progress: Callable[[StepStats], None] | None = None,
    say: Callable[[str], None] = lambda _msg: None,
) -> CompressResult:
    """:func:`compress` on a loaded, adapted model (on the caller's thread count)."""
    data, io = subject.data, subject.io
    original = subject.model
    # what the model outputs decides its quality gates; a flag that does not fit fails here
    task = subject.task(cfg.tolerances)
    check_single_file(original)  # refuse before fine-tuning, not after
    teacher = subject.teacher() if not data.has_labels or cfg.train.distill else None
    result = run_method(subject, cfg, teacher, progress, say)
    compressed = result.model.eval()

    say("exporting")
    example = data.x_train[: min(4, len(data.x_train))]
    with tempfile.TemporaryDirectory(prefix="rankshrink-") as tmp:
        before_path, after_path = Path(tmp, "original.onnx"), Path(tmp, "compressed.onnx")
        bytes_before = export_onnx(original, example, before_path, cfg.export, io)
        export_onnx(compressed, example, after_path, cfg.export, io)
        # verify reads it: the weights the file came from (the model as loaded), and its own
        source = subject.loaded.model
        bytes_after = stamp_provenance(after_path, source, io.exported(compressed))
        say("verifying")
        verification = verify_export(
            original, compressed, after_path, data.x_test, data.y_test, cfg.tolerances, task, io,
            weights=source,
        )  # fmt: skip
        quantized = None
        if cfg.quantize is not None:  # the stored precision: the file is verified again
            say("quantizing")

            def verify_stored(path: Path) -> Verification:
                stamp_provenance(path, source, io.exported(compressed))
                stored = verify_export(
                    original, None, path, data.x_test, data.y_test, cfg.tolerances, task, io,
                    weights=source,
                )  # fmt: skip
                with_size = with_gates(
                    stored, size_gates(bytes_before, path.stat().st_size, cfg.max_bytes)
                )
                return _quantized_verification(verification, with_size)

            stored = quantize_verified(after_path, cfg.quantize, verify_stored, data.x_test, io)
            quantized = {
                "mode": cfg.quantize,
                "float_onnx_bytes": bytes_after,
                "kept_float": stored.kept_float,
                "tries": stored.tries,
            }
            after_path, verification = stored.path, stored.verification
            bytes_after = after_path.stat().st_size
        lat_before = lat_after = None
        if cfg.measure_latency:
            one = data.x_test[:1]
            lat_before = latency_ms(session(before_path), one, io=io)
            lat_after = latency_ms(session(after_path), one, io=io)
        onnx_blob = after_path.read_bytes()

    if quantized is None:  # the stored file's size gates were decided with its verification
        verification = with_gates(
            verification, size_gates(bytes_before, bytes_after, cfg.max_bytes)
        )
    failures = verification.failures
    training = _training(result, bytes_after / bytes_before)
    loaded = subject.loaded
    tokens = {"tokens": int(data.x_train.shape[-1])} if io.tokens else None
    folder = {k: loaded.meta[k] for k in ("architecture", "model_type")} if io.tokens else None
    report = build_report(
        method=cfg.method.method,
        loaded=loaded,
        data_path=cfg.data,
        data=data,
        family=subject.family,
        config=_config_dict(cfg, result),
        params=(count_params(io.exported(original)), count_params(io.exported(compressed))),
        onnx_bytes=(bytes_before, bytes_after),
        layers=result.layers,
        heads=result.heads,
        extra={
            **{k: v for k, v in result.detail.items() if not _is_rare_only(cfg, k)},
            **({"quantize": quantized} if quantized else {}),
        },
        verification=verification_dict(verification, result.fold_diff),
        training=training,
        latency_ms=(lat_before, lat_after),
        failures=failures,
        input_extra=folder,
        data_extra=tokens,
    )
    checkpoint = {}
    if cfg.checkpoint:
        meta = {
            "compressed_by": f"rankshrink {__version__}",
            "source_sha256": loaded.sha256,
            "method": cfg.method.method,
        }
        if io.tokens:
            meta.update(architecture=loaded.meta["architecture"], output=io.output)
        # the exported module itself: loads through load_model and computes what the ONNX does
        checkpoint = make_checkpoint(io.exported(compressed), meta)
    return CompressResult(
        report=report,
        onnx=onnx_blob,
        checkpoint=checkpoint,
        model=compressed,
        verification=verification,
        training=training,
        gate_failures=failures,
    )


def _quantized_verification(float_check: Verification, quantized: Verification) -> Verification:
    """The quantized file's verification, with the float file's fidelity checks.

    The float file must match the compressed torch model (``--export-atol``): that checks the
    export. The quantized file cannot match it that closely by design; it is judged by the
    quality gates against the original, and by every check that needs only the file.
    """
    fidelity = [f for f in float_check.failures if not f.startswith("gate failed")]
    failures = fidelity + quantized.failures
    return replace(
        quantized,
        export_max_abs_diff=float_check.export_max_abs_diff,
        failures=failures,
        passed=not failures,
    )


def _is_rare_only(cfg: CompressConfig, key: str) -> bool:
    """RaRe alone records its settings in ``config``, not in a section of its own."""
    return cfg.method.method == "rare" and key == "rare"


def _training(result: Stage, onnx_ratio: float) -> TrainReport:
    """RaRe alone: its own account; stages: one account of all their phases."""
    only = result.phases[0].report if len(result.phases) == 1 else None
    if isinstance(only, TrainReport):
        return only
    return training_account(result.phases, onnx_ratio)


def _config_dict(cfg: CompressConfig, result: Stage) -> dict[str, Any]:
    """The report's ``config``: RaRe's full fine-tuning settings, or the method's own."""
    gates = {**asdict(cfg.tolerances), "max_bytes": cfg.max_bytes}
    common = {"threads": cfg.threads, "exporter": cfg.export.exporter, "opset": cfg.export.opset}
    if cfg.method.method == "rare":
        rare = result.detail["rare"]
        return {
            "train": rare["train"],
            "frobenius": cfg.frobenius,
            "axis_policy": cfg.axis_policy,
            "ffn_fusion": cfg.ffn_fusion,
            "recovery": rare["recovery"],
            **common,
            **gates,
        }
    t = cfg.train
    train = {
        "steps": t.steps, "batch_size": t.batch_size, "lr": t.lr, "distill": t.distill,
        "seed": t.seed,
    }  # fmt: skip
    return {"method": method_dict(cfg.method), "train": train, **common, **gates}
