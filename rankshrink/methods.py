"""``compress --method``: the seed methods besides RaRe, with RaRe's artifacts and checks.

Truncated SVD (the baseline), RMT-SVD and layer sparsity (SPEC §5) each produce a smaller torch
model (:mod:`rankshrink.lowrank_layers`, :mod:`rankshrink.layer_sparsity`); this module runs them
on a loaded model and data file, then exports, verifies and reports exactly as
:func:`rankshrink.pipeline.compress` does for RaRe, so the CLI, the gates and ``compare`` treat
every method alike. ``"rare"`` is passed through to the pipeline unchanged.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankshrink import __version__
from rankshrink.arch import count_params, make_checkpoint
from rankshrink.chain import prepare_chain
from rankshrink.errors import InputError
from rankshrink.finetune import FineTuneReport, fine_tune_plain
from rankshrink.layer_sparsity import (
    LayerSparsityConfig,
    LayerSparsityReport,
    as_chain,
    layer_sparsity,
)
from rankshrink.lowrank_layers import (
    LowRankConfig,
    LowRankLayer,
    LowRankLinear,
    expand_low_rank,
    low_rank,
)
from rankshrink.onnx_export import check_single_file, export_onnx
from rankshrink.pipeline import CompressConfig, CompressResult, compress, load_inputs
from rankshrink.report import build_report, gate_failures, verification_dict
from rankshrink.train import StepStats, TrainReport
from rankshrink.transformer_surgery import is_transformer
from rankshrink.verify import latency_ms, session, verify_export

METHODS = ("rare", "svd", "rmt-svd", "layer-sparsity")


@dataclass(frozen=True)
class MethodConfig:
    """The method and its own settings; the shared ones (steps, lr, batch, seed, distillation,
    export, tolerances) come from :class:`~rankshrink.pipeline.CompressConfig`."""

    method: str = "rare"
    # svd: keep this fraction of the Linear layers' parameters ... or this rank in every layer
    budget: float | None = 0.5
    rank: int | None = None
    # rmt-svd: Tracy–Widom units above the Marchenko–Pastur edge, and a rank floor per layer
    tw_margin: float = 0.0
    min_rank: int = 1
    # layer-sparsity: weight of the negative-part penalty, and refit steps (None: as many as
    # the penalized phase)
    lam: float = 0.1
    refit_steps: int | None = None
    # the caller will save a checkpoint: refuse before fine-tuning when the result has no spec
    checkpoint: bool = False


def compress_method(
    cfg: CompressConfig,
    mcfg: MethodConfig,
    progress: Callable[[StepStats], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> CompressResult:
    """Compress ``cfg.model`` with ``mcfg.method``; nothing is written to disk.

    ``progress`` is only used by RaRe (the other methods' fine-tuning reports through ``stage``).

    Raises:
        InputError: bad model, data or settings, or a method that does not apply to the model
            (e.g. layer sparsity on a Transformer), or ``checkpoint`` asked for a result no
            checkpoint spec describes — all before any fine-tuning (exit 2).
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
    loaded, data, classifier = load_inputs(
        cfg.model, cfg.data, cfg.arch, cfg.trust_pickle, cfg.train.seed
    )
    original = loaded.model.eval()
    check_single_file(original)
    family = "transformer" if is_transformer(original) else "chain"
    teacher = None
    if not data.has_labels or cfg.train.distill:
        with torch.no_grad():
            teacher = original(data.x_train)
    t = cfg.train

    with _intra_op_threads(1 if _small_model(original, data.x_train[:1]) else None):
        if mcfg.method == "layer-sparsity":
            say("penalized fine-tuning, merging, refit")
            ls_cfg = LayerSparsityConfig(
                lam=mcfg.lam,
                steps=t.steps,
                refit_steps=t.steps if mcfg.refit_steps is None else mcfg.refit_steps,
                lr=t.lr,
                batch=t.batch_size,
                seed=t.seed,
            )
            compressed, ls = layer_sparsity(original, data.x_train, data.y_train, teacher, ls_cfg)
            detail: dict[str, Any] = {"layer_sparsity": _sparsity_dict(ls, mcfg)}
            phases = [ls.train] + ([ls.refit] if ls.refit is not None else [])
            layers = _sparsity_layers(ls, as_chain(original), compressed)
        else:
            say("truncating")
            lr_cfg = _low_rank_config(mcfg)
            # an MLP as the flat chain RaRe also works on (nested Sequentials flattened,
            # BatchNorm folded), so the result saves as a sequential checkpoint
            base = prepare_chain(original) if family == "chain" else original
            compressed, account = low_rank(base, lr_cfg)
            factored = any(isinstance(m, LowRankLinear) for m in compressed.modules())
            if mcfg.checkpoint and family == "transformer" and factored:
                raise InputError(
                    "--save-pt: a low-rank Transformer has no checkpoint format yet (its"
                    " attention projections are two-factor layers); drop --save-pt and use the ONNX"
                )
            say("fine-tuning")
            tune = fine_tune_plain(
                compressed, data.x_train, data.y_train, teacher, t.steps, t.lr,
                t.batch_size, t.seed, distill=t.distill, cosine=True,
            )  # fmt: skip
            if isinstance(compressed, nn.Sequential):
                compressed = expand_low_rank(compressed)  # a flat chain a sequential spec saves
            detail = {"low_rank": {"config": asdict(lr_cfg)}}
            phases = [tune]
            layers = [_low_rank_layer(a) for a in account]
    compressed.eval()

    say("exporting")
    example = data.x_train[: min(4, len(data.x_train))]
    with tempfile.TemporaryDirectory(prefix="rankshrink-") as tmp:
        before_path, after_path = Path(tmp, "original.onnx"), Path(tmp, "compressed.onnx")
        bytes_before = export_onnx(original, example, before_path, cfg.export)
        bytes_after = export_onnx(compressed, example, after_path, cfg.export)
        say("verifying")
        verification = verify_export(
            original, compressed, after_path, data.x_test, data.y_test, cfg.tolerances, classifier
        )
        lat_before = lat_after = None
        if cfg.measure_latency:
            one = data.x_test[:1]
            lat_before = latency_ms(session(before_path), one)
            lat_after = latency_ms(session(after_path), one)
        onnx_blob = after_path.read_bytes()

    failures = gate_failures(verification, bytes_after, cfg.max_bytes)
    training = _training(phases, bytes_after / bytes_before, mcfg.method)
    report = build_report(
        method=mcfg.method,
        loaded=loaded,
        data_path=cfg.data,
        data=data,
        family=family,
        config={
            "method": _method_dict(mcfg),
            "train": {
                "steps": t.steps,
                "batch_size": t.batch_size,
                "lr": t.lr,
                "distill": t.distill,
                "seed": t.seed,
            },
            "exporter": cfg.export.exporter,
            "opset": cfg.export.opset,
            "export_atol": cfg.tolerances.export_atol,
            "max_accuracy_drop": cfg.tolerances.max_accuracy_drop,
            "min_agreement": cfg.tolerances.min_agreement,
            "max_bytes": cfg.max_bytes,
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


def _low_rank_config(mcfg: MethodConfig) -> LowRankConfig:
    if mcfg.method == "svd":
        return LowRankConfig("svd", budget=mcfg.budget, rank=mcfg.rank, min_rank=mcfg.min_rank)
    return LowRankConfig("rmt-svd", tw_margin=mcfg.tw_margin, min_rank=mcfg.min_rank)


def _method_dict(mcfg: MethodConfig) -> dict[str, Any]:
    keys = {
        "svd": ("budget", "rank", "min_rank"),
        "rmt-svd": ("tw_margin", "min_rank"),
        "layer-sparsity": ("lam", "refit_steps"),
    }[mcfg.method]
    return {"name": mcfg.method, **{k: getattr(mcfg, k) for k in keys}}


def _training(phases: list[FineTuneReport], onnx_ratio: float, method: str) -> TrainReport:
    """One account of the fine-tuning phases, with a size trajectory for ``--plot``.

    The low-rank methods shrink once, before fine-tuning, so their size ratio is the final one
    at every step; layer sparsity is full size while penalized and shrinks at the merge.
    """
    history: list[dict[str, float]] = []
    offset = 0
    for i, phase in enumerate(phases):
        ratio = 1.0 if method == "layer-sparsity" and i == 0 else onnx_ratio
        history += [
            {**h, "step": h["step"] + offset, "size_ratio": ratio, "fusions": 0}
            for h in phase.history
        ]
        offset += phase.steps
    return TrainReport(
        steps=offset,
        seconds=sum(p.seconds for p in phases),
        fusions=0,
        fusions_by_layer={},
        skipped_steps=sum(p.skipped_steps for p in phases),
        search_refresh=0,
        history=history,
    )


def _low_rank_layer(a: LowRankLayer) -> dict[str, Any]:
    """SPEC §6's layer keys for a low-rank layer: W' is the rank-k product, the feature width is
    the bottleneck k (what the ONNX carries between the two MatMuls)."""
    m, n = a.shape
    entry: dict[str, Any] = {
        "name": a.name,
        "original_shape": [m, n],
        "core_shape": [m, n],
        "weight_shape": [m, n],
        "feature_width": a.rank if a.kind == "factored" else n,
        "fold_kind": a.kind,
        "rank": a.rank,
        "params": a.params_after,
        "original_params": a.params_before,
    }
    if a.kind == "factored":
        entry["factors"] = [[a.rank, n], [m, a.rank]]  # B (down), then A (up)
    if a.bulk_fraction is not None:
        entry["mp_bulk_fraction"] = a.bulk_fraction
        entry["mp_sigma2"] = a.sigma2
    return entry


def _sparsity_layers(
    ls: LayerSparsityReport, chain: nn.Sequential, merged: nn.Sequential
) -> list[dict[str, Any]]:
    """One entry per Linear of the result, named by the chain indices it came from ("3+5")."""
    merge_of = {s: m for m in ls.merges for s in m.layers}
    # a merge replaces its sources where its last one stood; the order of the rest is kept
    names: list[str] = []
    for i, mod in enumerate(chain):
        if isinstance(mod, nn.Linear):
            merge = merge_of.get(str(i))
            if merge is None:
                names.append(str(i))
            elif merge.layers[-1] == str(i):
                names.append("+".join(merge.layers))
    linears = [mod for mod in merged if isinstance(mod, nn.Linear)]
    out: list[dict[str, Any]] = []
    for name, lin in zip(names, linears, strict=True):
        merge = merge_of.get(name.split("+")[0]) if "+" in name else None
        params = sum(p.numel() for p in lin.parameters())
        shape = [lin.out_features, lin.in_features]
        out.append(
            {
                "name": name,
                "original_shape": [merge.shapes[-1][0], merge.shapes[0][1]] if merge else shape,
                "core_shape": shape,
                "weight_shape": shape,
                "feature_width": lin.in_features,
                "fold_kind": "merged" if merge else "kept",
                "params": params,
                "original_params": merge.params_before if merge else params,
            }
        )
    return out


def _sparsity_dict(ls: LayerSparsityReport, mcfg: MethodConfig) -> dict[str, Any]:
    return {
        "lam": mcfg.lam,
        "penalized": ls.penalized,
        "identity": ls.identity,
        "merges": [
            {
                "layers": m.layers,
                "shapes": [list(s) for s in m.shapes],
                "shape": list(m.shape),
                "params_before": m.params_before,
                "params_after": m.params_after,
            }
            for m in ls.merges
        ],
        "clamp_change": ls.clamp_change,
    }


#: A model whose one-sample forward costs fewer Linear FLOPs than this fine-tunes on one intra-op
#: thread: its step is per-op overhead that a second thread does not split, and on a shared
#: machine every op's barrier waits for a descheduled worker (see pipeline.SMALL_STEP_FLOPS).
SMALL_FORWARD_FLOPS = 2e9 / (3 * 128)


@torch.no_grad()
def _small_model(model: nn.Module, one: torch.Tensor) -> bool:
    flops = [0.0]

    def count(module: nn.Linear, args: tuple[torch.Tensor, ...], _out: Any) -> None:
        rows = args[0].numel() / args[0].shape[-1]
        flops[0] += 2.0 * rows * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if type(m) is nn.Linear]
    try:
        model.eval()(one)
    finally:
        for hook in hooks:
            hook.remove()
    return flops[0] < SMALL_FORWARD_FLOPS


@contextlib.contextmanager
def _intra_op_threads(count: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
