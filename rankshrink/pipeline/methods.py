"""The methods, in one registry: what each runs, which settings it reads, where it applies.

A method is a sequence of stages (:mod:`rankshrink.pipeline.stages`): RaRe, truncated SVD,
RMT-SVD, layer sparsity, or a structural stage followed by RMT-SVD on what it left. The registry
feeds the command line's choices, ``compare`` and the check that a flag belongs to the method;
:func:`run_method` runs a method's stages on a :class:`~rankshrink.pipeline.subject.Subject`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from rankshrink.errors import InputError, UnsupportedModelError
from rankshrink.methods.layer_sparsity import LayerSparsityConfig
from rankshrink.methods.lowrank_layers import LowRankConfig
from rankshrink.pipeline.config import METHOD_SETTINGS, CompressConfig, MethodConfig
from rankshrink.pipeline.rare_stage import rare_stage
from rankshrink.pipeline.stages import Phase, Stage, low_rank_stage, sparsity_stage, then
from rankshrink.pipeline.subject import Subject
from rankshrink.train.rare_config import StepStats, TrainReport


@dataclass(frozen=True)
class Method:
    """One entry of the registry."""

    name: str
    stages: tuple[str, ...]  # "rare", "svd", "rmt-svd", "layer-sparsity", in order
    help: str
    # the setting a size budget goes to: compare runs the method once per budget ("budget":
    # MethodConfig.budget, a share of the parameters; "target_ratio": TrainConfig.target_ratio,
    # an export size); None: the method has no budget and runs once
    budget: str | None = None
    in_compare: bool = True  # run by compare when no methods are named

    @property
    def settings(self) -> tuple[str, ...]:
        """The MethodConfig fields it reads (and the report records)."""
        return METHOD_SETTINGS[self.name]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("rare", ("rare",), "RaRe fine-tuning with live fusion, folded", "target_ratio"),
        Method("svd", ("svd",), "truncated SVD", "budget"),
        Method("rmt-svd", ("rmt-svd",), "SVD truncated at the Marchenko–Pastur edge"),
        Method("layer-sparsity", ("layer-sparsity",), "merge layers whose ReLU became the identity"),
        # on both samples larger than RMT-SVD alone at the same accuracy (docs/methods.md)
        Method(
            "rare+rmt-svd",
            ("rare", "rmt-svd"),
            "RaRe, then RMT-SVD on the folded model",
            in_compare=False,
        ),
        Method(
            "layer-sparsity+rmt-svd",
            ("layer-sparsity", "rmt-svd"),
            "layer sparsity, then RMT-SVD on the merged model",
        ),
    )
}


def method(name: str) -> Method:
    """The registry entry of ``name``.

    Raises:
        InputError: no such method.
    """
    if name not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name]


def run_method(
    subject: Subject,
    cfg: CompressConfig,
    teacher: Tensor | None,
    progress: Callable[[StepStats], None] | None,
    say: Callable[[str], None],
) -> Stage:
    """Run ``cfg.method``'s stages on ``subject.model`` (not changed), each on what the last left.

    Raises:
        UnsupportedModelError: a stage does not apply to the model (layer sparsity without a
            ReLU chain) — before any training.
    """
    m, mcfg, t = method(cfg.method.method), cfg.method, cfg.train
    refusal = not_applicable(m, subject)
    if refusal:
        raise UnsupportedModelError(refusal)
    refit = t.steps if mcfg.refit_steps is None else mcfg.refit_steps
    last = len(m.stages) - 1
    result: Stage | None = None
    for i, name in enumerate(m.stages):
        model = subject.model if result is None else result.model
        # the folded MLP is a plain chain again, flattened for the next stage; so is a merged one
        chain = subject.family == "chain"
        if name == "rare":
            stage = rare_stage(subject, cfg, teacher, progress, say)
        elif name in ("svd", "rmt-svd"):
            # the last stage's fine-tuning is the one refit of a combination
            steps = t.steps if i == 0 else refit
            lr_cfg = _low_rank_config(name, mcfg)
            stage = low_rank_stage(model, chain, lr_cfg, subject.data, teacher, t, steps, say)
        else:  # layer sparsity; inside a combination the refit comes after the last stage
            lcfg = _sparsity_config(mcfg, t.steps, refit if i == last else 0, cfg)
            stage = sparsity_stage(model, lcfg, subject.data, teacher, say)
        result = stage if result is None else _then(result, stage)
    assert result is not None
    return result


#: How each family is described when a method does not apply to it.
_FAMILY = {
    "graph": "traced module with residual adds or other ops between its Linear chains",
    "transformer": "Transformer",
}


def not_applicable(m: Method, subject: Subject) -> str | None:
    """Why ``m`` does not apply to the subject's model, in one line; None when it does.

    Layer sparsity merges consecutive Linear layers across a ReLU that became the identity: it
    needs a chain of Linear layers. RaRe and the low-rank methods apply to every family.
    """
    if "layer-sparsity" in m.stages and subject.family != "chain":
        name = type(subject.loaded.model).__name__
        return (
            f"--method {m.name} merges consecutive Linear layers of a ReLU chain; {name} is a"
            f" {_FAMILY[subject.family]} (use rare, svd or rmt-svd)"
        )
    return None


def _then(first: Stage, second: Stage) -> Stage:
    combined = then(first, second)
    combined.fold_diff, combined.heads = None, None  # describe the first stage's model only
    return combined


def _low_rank_config(name: str, mcfg: MethodConfig) -> LowRankConfig:
    if name == "svd":
        return LowRankConfig("svd", budget=mcfg.svd_budget, rank=mcfg.rank, min_rank=mcfg.min_rank)
    return LowRankConfig(
        "rmt-svd", tw_margin=mcfg.tw_margin, min_rank=mcfg.min_rank, min_energy=mcfg.min_energy
    )


def _sparsity_config(
    mcfg: MethodConfig, steps: int, refit_steps: int, cfg: CompressConfig
) -> LayerSparsityConfig:
    t = cfg.train
    return LayerSparsityConfig(
        lam=mcfg.lam, steps=steps, refit_steps=refit_steps, lr=t.lr, batch=t.batch_size, seed=t.seed
    )


def method_dict(mcfg: MethodConfig) -> dict[str, Any]:
    """The method's own settings, as the report records them."""
    settings = {k: getattr(mcfg, k) for k in method(mcfg.method).settings}
    if "budget" in settings:
        settings["budget"] = mcfg.svd_budget
    return {"name": mcfg.method, **settings}


def training_account(phases: list[Phase], onnx_ratio: float) -> TrainReport:
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
