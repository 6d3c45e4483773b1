"""RaRe as a stage: factorize the model's Linear sites, fine-tune with live fusion, fold.

The family decides the surgery and the fold (SPEC §3–4): a chain folds into a narrower chain, a
traced graph folds each of its Linear chains in place, a Transformer folds per head. What comes
out is a :class:`~rankshrink.pipeline.stages.Stage` like every other method's.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import torch
from torch import Tensor

from rankshrink.fold.chain_fold import FoldResult, export_bytes, fold
from rankshrink.fold.graph_fold import fold_graph, graph_export_bytes
from rankshrink.fold.transformer_fold import TransformerFold, fold_transformer
from rankshrink.fold.transformer_plan import export_bytes as transformer_bytes
from rankshrink.methods.graph_surgery import factorize_graph_
from rankshrink.methods.surgery import FactorizedChain, factorize_
from rankshrink.methods.transformer_surgery import factorize_transformer_
from rankshrink.models.chain import prepare_chain
from rankshrink.pipeline.config import DEFAULT_RECOVERY, DEFAULT_TARGET_RATIO, CompressConfig
from rankshrink.pipeline.stages import Phase, Stage
from rankshrink.pipeline.subject import Subject
from rankshrink.train.rare_config import StepStats
from rankshrink.train.rare_loop import fine_tune_
from rankshrink.train.recovery import fine_tune_with_recovery_


def rare_stage(
    subject: Subject,
    cfg: CompressConfig,
    teacher: Tensor | None,
    progress: Callable[[StepStats], None] | None = None,
    say: Callable[[str], None] = lambda _msg: None,
) -> Stage:
    """Factorize a copy of ``subject.model``, fine-tune it with RaRe and live fusion, fold it.

    ``subject.model`` is not changed. The stage's ``detail["rare"]`` records the fine-tuning
    settings used (the family's target ratio and recovery filled in).
    """
    train_cfg = cfg.train
    if cfg.auto_target:
        train_cfg = replace(train_cfg, target_ratio=DEFAULT_TARGET_RATIO[subject.family])
    recovery = cfg.recovery if cfg.recovery is not None else DEFAULT_RECOVERY[subject.family]
    chain, size_fn, fold_fn = _prepare(subject, cfg)

    say("fine-tuning")
    data = subject.data
    training = fine_tune_with_recovery_(
        chain, data.x_train, data.y_train, teacher, train_cfg, recovery,
        size_fn=size_fn, progress=progress, fine_tune=fine_tune_,
    )  # fmt: skip

    say("folding")
    folded = fold_fn()
    with torch.no_grad():
        fold_diff = float((folded.model(data.x_test) - chain.model(data.x_test)).abs().max())
    settings = {"train": _plain(asdict(train_cfg)), "recovery": asdict(recovery)}
    return Stage(
        folded.model.eval(),
        [Phase(training)],
        [layer_dict(lf) for lf in folded.layers],
        {"rare": settings},
        fold_diff=fold_diff,
        heads=folded.heads if isinstance(folded, TransformerFold) else None,
    )


def _prepare(
    subject: Subject, cfg: CompressConfig
) -> tuple[FactorizedChain, Callable[[], int], Callable[[], FoldResult | TransformerFold]]:
    """Factorize a copy of the subject's model; return it with its export-size and fold functions."""
    if subject.family == "transformer":
        assert subject.layout is not None
        tchain = factorize_transformer_(
            copy.deepcopy(subject.model).eval(),
            subject.layout,
            frobenius=cfg.frobenius,
            axis_policy=cfg.axis_policy,
            ffn_fusion=cfg.ffn_fusion,
        )
        return tchain, lambda: transformer_bytes(tchain), lambda: fold_transformer(tchain)
    if subject.family == "graph":
        assert subject.traced is not None
        gchain = factorize_graph_(
            copy.deepcopy(subject.traced), frobenius=cfg.frobenius, axis_policy=cfg.axis_policy
        )
        names = subject.traced.chains
        return gchain, lambda: graph_export_bytes(gchain, names), lambda: fold_graph(gchain, names)
    chain = factorize_(
        prepare_chain(subject.model), frobenius=cfg.frobenius, axis_policy=cfg.axis_policy
    )
    return chain, lambda: export_bytes(chain.model), lambda: fold(chain.model)


def layer_dict(lf: Any) -> dict[str, Any]:
    """SPEC §6's entry for one folded layer."""
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


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: NaN (an unset float setting) as null."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}
