"""``compress``: load → factorize → fine-tune with RaRe and live fusion → fold → export → verify.

This is the library entry point the CLI calls. It writes nothing to the user's directories: the
ONNX bytes, the report and the compressed checkpoint come back in a :class:`CompressResult`, and
the caller writes them (atomically) once the gates have been decided.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rankshrink import __version__
from rankshrink.fold.chain_fold import FoldResult, export_bytes, fold
from rankshrink.fold.transformer_fold import TransformerFold, fold_transformer
from rankshrink.fold.transformer_fold import export_bytes as transformer_bytes
from rankshrink.io.checkpoint import LoadedModel, load_model
from rankshrink.io.data import Dataset, load_data
from rankshrink.io.data_fit import check_fit
from rankshrink.methods.surgery import FactorizedChain, factorize_
from rankshrink.methods.transformer_surgery import factorize_transformer_
from rankshrink.models.arch import count_params, make_checkpoint
from rankshrink.models.chain import prepare_chain
from rankshrink.models.transformer_layout import is_transformer, transformer_layout
from rankshrink.onnx.export import ExportConfig, check_single_file, export_onnx
from rankshrink.onnx.gates import model_task, size_gates
from rankshrink.onnx.verify import (
    Tolerances,
    Verification,
    latency_ms,
    session,
    stamp_provenance,
    verify_export,
    with_gates,
)
from rankshrink.pipeline.report import build_report, verification_dict
from rankshrink.pipeline.threads import choose_threads, intra_op_threads
from rankshrink.train.rare_loop import StepStats, TrainConfig, TrainReport, fine_tune_
from rankshrink.train.recovery import RecoveryConfig, fine_tune_with_recovery_


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
    # --target-ratio was not given: use the model family's default (DEFAULT_TARGET_RATIO)
    auto_target: bool = False
    ffn_fusion: bool = False  # Transformers: also fuse FFN axes (exported with index ops)
    recovery: RecoveryConfig | None = None  # None: the model family's default (DEFAULT_RECOVERY)
    # intra-op threads (--threads); None: the thread policy's count (rankshrink.pipeline.threads)
    threads: int | None = None


#: The export-size target per model family when none is given. A Transformer's residual stream,
#: embeddings, LayerNorms and head never shrink, and its GELU FFN only through index ops, so the
#: attention projections alone carry the reduction: a lower target would cut them too deep.
DEFAULT_TARGET_RATIO = {"chain": 0.6, "transformer": 0.7}
#: The plain recovery phase at the end of fine-tuning (see rankshrink.train.recovery) per family. On the
#: sample MLP, without it the test accuracy of the default run moved between 96.67 and 98.33 % over
#: seeds and with float-rounding-level changes to the RaRe gradient; with it, seeds 0-3 gave
#: 97.22-97.78 % (original 97.78 %) at the same size.
DEFAULT_RECOVERY = {"chain": RecoveryConfig(), "transformer": RecoveryConfig()}


@dataclass
class CompressResult:
    """What a compression run produced; nothing of it is on disk yet."""

    report: dict[str, Any]
    onnx: bytes
    checkpoint: dict[str, Any]
    fold: FoldResult | TransformerFold | None  # None: a method that folds nothing (methods.py)
    verification: Verification
    training: TrainReport
    gate_failures: list[str]


def load_inputs(
    model_path: Path, data_path: Path, arch: str | None, trust_pickle: bool, seed: int
) -> tuple[LoadedModel, Dataset, bool]:
    """Load and cross-check a model and a data file; return them and whether it is a classifier."""
    loaded = load_model(model_path, arch=arch, trust_pickle=trust_pickle)
    data = load_data(data_path, seed=seed)
    check_fit(loaded.model, data, data_path)  # input width, output shape, labels: one line each
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
    if Path(cfg.model).is_dir():  # a Hugging Face folder: token inputs, its own export/verify
        from rankshrink.pipeline.hf_compress import compress_hf  # imports this module

        return compress_hf(cfg, progress, stage)
    say = stage or (lambda _msg: None)
    say("loading")
    loaded, data, _ = load_inputs(cfg.model, cfg.data, cfg.arch, cfg.trust_pickle, cfg.train.seed)
    # everything after loading computes on the thread policy's count (rankshrink.pipeline.threads)
    threads = choose_threads(cfg.threads, loaded.model, data.x_train[:1], cfg.train.batch_size)
    with intra_op_threads(threads):
        return _compress_loaded(replace(cfg, threads=threads), loaded, data, progress, say)


def _compress_loaded(
    cfg: CompressConfig,
    loaded: LoadedModel,
    data: Dataset,
    progress: Callable[[StepStats], None] | None,
    say: Callable[[str], None],
) -> CompressResult:
    """:func:`compress` once the inputs are loaded and ``cfg.threads`` is decided."""
    original = loaded.model
    # what the model outputs decides its quality gates; a flag that does not fit fails here
    task = model_task(original, data.x_test, cfg.tolerances, data.has_labels)
    check_single_file(original)  # refuse before fine-tuning, not after
    family = "transformer" if is_transformer(original) else "chain"
    teacher = None
    if not data.has_labels or cfg.train.distill:
        with torch.no_grad():
            teacher = original(data.x_train)
    run = rare_stage(original, family, data, teacher, cfg, progress, say)
    folded, training, train_cfg, recovery = run.folded, run.training, run.train_cfg, run.recovery
    with torch.no_grad():
        fold_diff = float((folded.model(data.x_test) - run.chain.model(data.x_test)).abs().max())

    say("exporting")
    example = data.x_train[: min(4, len(data.x_train))]
    with tempfile.TemporaryDirectory(prefix="rankshrink-") as tmp:
        before_path, after_path = Path(tmp, "original.onnx"), Path(tmp, "compressed.onnx")
        bytes_before = export_onnx(original, example, before_path, cfg.export)
        export_onnx(folded.model, example, after_path, cfg.export)
        bytes_after = stamp_provenance(after_path, original, folded.model)  # verify reads it
        say("verifying")
        verification = verify_export(
            original, folded.model, after_path, data.x_test, data.y_test, cfg.tolerances, task
        )
        lat_before = lat_after = None
        if cfg.measure_latency:
            one = data.x_test[:1]
            lat_before = latency_ms(session(before_path), one)
            lat_after = latency_ms(session(after_path), one)
        onnx_blob = after_path.read_bytes()

    verification = with_gates(verification, size_gates(bytes_before, bytes_after, cfg.max_bytes))
    failures = verification.failures
    report = build_report(
        method="rare",
        loaded=loaded,
        data_path=cfg.data,
        data=data,
        family=family,
        config=_config_dict(cfg, train_cfg, recovery),
        params=(count_params(original), count_params(folded.model)),
        onnx_bytes=(bytes_before, bytes_after),
        layers=[_layer_dict(lf) for lf in folded.layers],
        heads=folded.heads if isinstance(folded, TransformerFold) else None,
        verification=verification_dict(verification, fold_diff),
        training=training,
        latency_ms=(lat_before, lat_after),
        failures=failures,
    )
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
        gate_failures=failures,
    )


@dataclass
class RareRun:
    """RaRe's fine-tuning and fold, before any export: what :func:`rare_stage` returns."""

    chain: FactorizedChain  # the factorized model as trained
    folded: FoldResult | TransformerFold  # its folded (exportable) form
    training: TrainReport
    train_cfg: TrainConfig  # the settings used (the family's target ratio filled in)
    recovery: RecoveryConfig


def rare_stage(
    original: torch.nn.Module,
    family: str,
    data: Dataset,
    teacher: torch.Tensor | None,
    cfg: CompressConfig,
    progress: Callable[[StepStats], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> RareRun:
    """Factorize a copy of ``original``, fine-tune it with RaRe and live fusion, and fold it.

    The in-memory core of :func:`compress`, also the first stage of ``--method rare+rmt-svd``
    (:mod:`rankshrink.pipeline.methods`). ``original`` is not changed. It computes on the caller's thread
    count (:func:`rankshrink.pipeline.threads.intra_op_threads`).
    """
    say = stage or (lambda _msg: None)
    train_cfg = cfg.train
    if cfg.auto_target:
        train_cfg = replace(train_cfg, target_ratio=DEFAULT_TARGET_RATIO[family])
    recovery = cfg.recovery if cfg.recovery is not None else DEFAULT_RECOVERY[family]
    chain, size_fn, fold_fn = _prepare(original, family, cfg)

    say("fine-tuning")
    training = fine_tune_with_recovery_(
        chain,
        data.x_train,
        data.y_train,
        teacher,
        train_cfg,
        recovery,
        size_fn=size_fn,
        progress=progress,
        fine_tune=fine_tune_,
    )

    say("folding")
    return RareRun(chain, fold_fn(), training, train_cfg, recovery)


def _prepare(
    original: torch.nn.Module, family: str, cfg: CompressConfig
) -> tuple[FactorizedChain, Callable[[], int], Callable[[], FoldResult | TransformerFold]]:
    """Factorize a copy of ``original``; return it with its export-size and fold functions."""
    if family == "transformer":
        tchain = factorize_transformer_(
            copy.deepcopy(original).eval(),
            transformer_layout(original),
            frobenius=cfg.frobenius,
            axis_policy=cfg.axis_policy,
            ffn_fusion=cfg.ffn_fusion,
        )
        return tchain, lambda: transformer_bytes(tchain), lambda: fold_transformer(tchain)
    chain = factorize_(
        prepare_chain(original), frobenius=cfg.frobenius, axis_policy=cfg.axis_policy
    )
    return chain, lambda: export_bytes(chain.model), lambda: fold(chain.model)


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


def _config_dict(
    cfg: CompressConfig, train_cfg: TrainConfig, recovery: RecoveryConfig
) -> dict[str, Any]:
    train = asdict(train_cfg)
    return {
        "train": {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in train.items()
        },
        "frobenius": cfg.frobenius,
        "axis_policy": cfg.axis_policy,
        "ffn_fusion": cfg.ffn_fusion,
        "recovery": asdict(recovery),
        "threads": cfg.threads,
        "exporter": cfg.export.exporter,
        "opset": cfg.export.opset,
        **gate_config(cfg),
    }


def gate_config(cfg: CompressConfig) -> dict[str, Any]:
    """The report's record of the tolerances and gate flags as given (None: the default)."""
    return {**asdict(cfg.tolerances), "max_bytes": cfg.max_bytes}
