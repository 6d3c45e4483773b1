"""``compress --method``: the seed methods besides RaRe, and combinations, with RaRe's checks.

Truncated SVD (the baseline), RMT-SVD and layer sparsity (SPEC §5) each produce a smaller torch
model (:mod:`rankshrink.pipeline.stages`); a combination runs a structural method first and RMT-SVD on
what it left (``rare+rmt-svd``, ``layer-sparsity+rmt-svd``). This module runs them on a loaded
model and data file, then exports, verifies and reports exactly as
:func:`rankshrink.pipeline.compress.compress` does for RaRe, so the CLI, the gates and ``compare`` treat
every method alike. ``"rare"`` is passed through to the pipeline unchanged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankshrink import __version__
from rankshrink.errors import InputError
from rankshrink.io.checkpoint import LoadedModel
from rankshrink.io.data import Dataset
from rankshrink.methods.layer_sparsity import LayerSparsityConfig
from rankshrink.methods.lowrank_layers import LowRankConfig
from rankshrink.models.arch import count_params, make_checkpoint
from rankshrink.models.transformer_layout import is_transformer
from rankshrink.onnx.export import check_single_file, export_onnx
from rankshrink.onnx.gates import model_task, size_gates
from rankshrink.onnx.verify import latency_ms, session, stamp_provenance, verify_export, with_gates
from rankshrink.pipeline.compress import (
    CompressConfig,
    CompressResult,
    _layer_dict,
    compress,
    gate_config,
    load_inputs,
    rare_stage,
)
from rankshrink.pipeline.report import build_report, verification_dict
from rankshrink.pipeline.stages import Phase, Stage, low_rank_stage, sparsity_stage, then
from rankshrink.pipeline.threads import choose_threads, intra_op_threads
from rankshrink.train.rare_loop import StepStats, TrainConfig, TrainReport

#: Single methods, then combinations: a structural stage followed by RMT-SVD on what it left.
SINGLE = ("rare", "svd", "rmt-svd", "layer-sparsity")
COMBINED = ("rare+rmt-svd", "layer-sparsity+rmt-svd")
METHODS = SINGLE + COMBINED


@dataclass(frozen=True)
class MethodConfig:
    """The method and its own settings; the shared ones (steps, lr, batch, seed, distillation,
    export, tolerances) come from :class:`~rankshrink.pipeline.compress.CompressConfig`."""

    method: str = "rare"
    # svd: keep this fraction of the Linear layers' parameters ... or this rank in every layer
    budget: float | None = 0.5
    rank: int | None = None
    # rmt-svd: Tracy–Widom units above the Marchenko–Pastur edge, a rank floor per layer, and
    # the share of each layer's spectral energy always kept (see LowRankConfig.min_energy)
    tw_margin: float = 0.0
    min_rank: int = 1
    min_energy: float = 0.5
    # layer-sparsity: weight of the negative-part penalty; layer-sparsity and the combinations:
    # steps of the refit after the last stage (None: as many as the first stage's --steps)
    lam: float = 0.1
    refit_steps: int | None = None
    # the caller will save a checkpoint: build one (CompressResult.checkpoint)
    checkpoint: bool = False


def compress_method(
    cfg: CompressConfig,
    mcfg: MethodConfig,
    progress: Callable[[StepStats], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> CompressResult:
    """Compress ``cfg.model`` with ``mcfg.method``; nothing is written to disk.

    ``progress`` is only used by RaRe's fine-tuning (also in ``rare+rmt-svd``); the other
    stages report through ``stage``.

    Raises:
        InputError: bad model, data or settings, or a method that does not apply to the model
            (e.g. layer sparsity on a Transformer) — before any fine-tuning (exit 2).
        TrainingDivergedError, ExportError: no trustworthy model came out (exit 3).
    """
    if mcfg.method == "rare":
        return compress(cfg, progress, stage)
    if mcfg.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {mcfg.method!r}")
    if Path(cfg.model).is_dir():  # token inputs and their own export path: RaRe only, for now
        raise InputError(
            f"--method {mcfg.method} does not take a Hugging Face folder yet ({cfg.model});"
            " use --method rare"
        )
    say = stage or (lambda _msg: None)
    say("loading")
    loaded, data, _ = load_inputs(cfg.model, cfg.data, cfg.arch, cfg.trust_pickle, cfg.train.seed)
    # everything after loading computes on the thread policy's count (rankshrink.pipeline.threads)
    threads = choose_threads(cfg.threads, loaded.model, data.x_train[:1], cfg.train.batch_size)
    with intra_op_threads(threads):
        return _compress_loaded(replace(cfg, threads=threads), mcfg, loaded, data, progress, say)


def _compress_loaded(
    cfg: CompressConfig,
    mcfg: MethodConfig,
    loaded: LoadedModel,
    data: Dataset,
    progress: Callable[[StepStats], None] | None,
    say: Callable[[str], None],
) -> CompressResult:
    """:func:`compress_method` once the inputs are loaded and ``cfg.threads`` is decided."""
    original = loaded.model.eval()
    task = model_task(original, data.x_test, cfg.tolerances, data.has_labels)  # see pipeline
    check_single_file(original)
    family = "transformer" if is_transformer(original) else "chain"
    teacher = None
    if not data.has_labels or cfg.train.distill:
        with torch.no_grad():
            teacher = original(data.x_train)

    result = _run_stages(original, family, data, teacher, cfg, mcfg, progress, say)
    compressed = result.model.eval()
    detail, layers = result.detail, result.layers

    say("exporting")
    example = data.x_train[: min(4, len(data.x_train))]
    with tempfile.TemporaryDirectory(prefix="rankshrink-") as tmp:
        before_path, after_path = Path(tmp, "original.onnx"), Path(tmp, "compressed.onnx")
        bytes_before = export_onnx(original, example, before_path, cfg.export)
        export_onnx(compressed, example, after_path, cfg.export)
        bytes_after = stamp_provenance(after_path, original, compressed)  # verify reads it
        say("verifying")
        verification = verify_export(
            original, compressed, after_path, data.x_test, data.y_test, cfg.tolerances, task
        )
        lat_before = lat_after = None
        if cfg.measure_latency:
            one = data.x_test[:1]
            lat_before = latency_ms(session(before_path), one)
            lat_after = latency_ms(session(after_path), one)
        onnx_blob = after_path.read_bytes()

    verification = with_gates(verification, size_gates(bytes_before, bytes_after, cfg.max_bytes))
    failures = verification.failures
    training = _training(result.phases, bytes_after / bytes_before)
    report = build_report(
        method=mcfg.method,
        loaded=loaded,
        data_path=cfg.data,
        data=data,
        family=family,
        config={
            "method": _method_dict(mcfg),
            "train": {
                "steps": cfg.train.steps,
                "batch_size": cfg.train.batch_size,
                "lr": cfg.train.lr,
                "distill": cfg.train.distill,
                "seed": cfg.train.seed,
            },
            "exporter": cfg.export.exporter,
            "opset": cfg.export.opset,
            "threads": cfg.threads,
            **gate_config(cfg),
        },
        params=(count_params(original), count_params(compressed)),
        onnx_bytes=(bytes_before, bytes_after),
        layers=layers,
        heads=None,
        extra=detail,
        verification=verification_dict(verification),
        training=training,
        latency_ms=(lat_before, lat_after),
        failures=failures,
    )
    meta = {
        "compressed_by": f"rankshrink {__version__}",
        "source_sha256": loaded.sha256,
        "method": mcfg.method,
    }
    checkpoint = make_checkpoint(compressed, meta) if mcfg.checkpoint else {}
    return CompressResult(
        report=report,
        onnx=onnx_blob,
        checkpoint=checkpoint,
        fold=None,  # nothing is folded: the model exports as it is
        verification=verification,
        training=training,
        gate_failures=failures,
    )


def _run_stages(
    original: nn.Module,
    family: str,
    data: Dataset,
    teacher: torch.Tensor | None,
    cfg: CompressConfig,
    mcfg: MethodConfig,
    progress: Callable[[StepStats], None] | None,
    say: Callable[[str], None],
) -> Stage:
    """Run ``mcfg.method``'s stages on ``original`` (not changed)."""
    t = cfg.train
    chain = family == "chain"
    refit = t.steps if mcfg.refit_steps is None else mcfg.refit_steps
    if mcfg.method in ("svd", "rmt-svd"):
        return low_rank_stage(
            original, chain, _low_rank_config(mcfg), data, teacher, t, t.steps, say
        )
    if mcfg.method == "layer-sparsity":
        return sparsity_stage(
            original, _sparsity_config(mcfg, t.steps, refit, t), data, teacher, say
        )
    rmt = _low_rank_config(mcfg)
    if mcfg.method == "layer-sparsity+rmt-svd":
        # no refit between the stages: the one after RMT-SVD refits the merged, truncated network
        first = sparsity_stage(original, _sparsity_config(mcfg, t.steps, 0, t), data, teacher, say)
        return then(first, low_rank_stage(first.model, True, rmt, data, teacher, t, refit, say))
    if mcfg.method == "rare+rmt-svd":
        run = rare_stage(original, family, data, teacher, cfg, progress, say)
        first = Stage(
            run.folded.model,
            [Phase(run.training)],
            [_layer_dict(lf) for lf in run.folded.layers],
            {"rare": {"train": _plain(asdict(run.train_cfg)), "recovery": asdict(run.recovery)}},
        )
        # the folded MLP is a plain chain again; a folded Transformer keeps its fused qkv
        return then(first, low_rank_stage(first.model, chain, rmt, data, teacher, t, refit, say))
    raise InputError(f"--method must be one of {', '.join(METHODS)}, got {mcfg.method!r}")


def _low_rank_config(mcfg: MethodConfig) -> LowRankConfig:
    if mcfg.method == "svd":
        return LowRankConfig("svd", budget=mcfg.budget, rank=mcfg.rank, min_rank=mcfg.min_rank)
    return LowRankConfig(
        "rmt-svd", tw_margin=mcfg.tw_margin, min_rank=mcfg.min_rank, min_energy=mcfg.min_energy
    )


def _sparsity_config(
    mcfg: MethodConfig, steps: int, refit_steps: int, t: TrainConfig
) -> LayerSparsityConfig:
    return LayerSparsityConfig(
        lam=mcfg.lam,
        steps=steps,
        refit_steps=refit_steps,
        lr=t.lr,
        batch=t.batch_size,
        seed=t.seed,
    )


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: NaN (an unset float setting) as null."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in values.items()}


#: The method's own settings recorded in the report.
_SETTINGS = {
    "svd": ("budget", "rank", "min_rank"),
    "rmt-svd": ("tw_margin", "min_rank", "min_energy"),
    "layer-sparsity": ("lam", "refit_steps"),
    "rare+rmt-svd": ("tw_margin", "min_rank", "min_energy", "refit_steps"),
    "layer-sparsity+rmt-svd": ("lam", "tw_margin", "min_rank", "min_energy", "refit_steps"),
}


def _method_dict(mcfg: MethodConfig) -> dict[str, Any]:
    return {"name": mcfg.method, **{k: getattr(mcfg, k) for k in _SETTINGS[mcfg.method]}}


def _training(phases: list[Phase], onnx_ratio: float) -> TrainReport:
    """One account of the stages' fine-tuning phases, with a size trajectory for ``--plot``.

    A phase at a known size (layer sparsity's penalized phase: full size) or at the final one
    (every phase after the last shrink) gets that ratio at each step; a RaRe phase keeps the
    ratio its own history recorded as fusions shrank the model.
    """
    history: list[dict[str, float]] = []
    offset = fusions = refresh = 0
    by_layer: dict[str, int] = {}
    for phase in phases:
        rep = phase.report
        ratio = onnx_ratio if phase.size_ratio is None else phase.size_ratio
        for h in rep.history:
            own = h.get("size_ratio") if isinstance(rep, TrainReport) else None
            history.append(
                {
                    **h,
                    "step": h["step"] + offset,
                    "size_ratio": ratio if own is None else own,
                    "fusions": h.get("fusions", 0),
                }
            )
        offset += rep.steps
        if isinstance(rep, TrainReport):
            fusions += rep.fusions
            refresh += rep.search_refresh
            by_layer.update(rep.fusions_by_layer)
    return TrainReport(
        steps=offset,
        seconds=sum(p.report.seconds for p in phases),
        fusions=fusions,
        fusions_by_layer=by_layer,
        skipped_steps=sum(p.report.skipped_steps for p in phases),
        search_refresh=refresh,
        history=history,
    )
