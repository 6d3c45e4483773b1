"""The in-memory stages ``compress --method`` is built from: shrink a model, then fine-tune it.

- :func:`low_rank_stage` — truncated SVD or RMT-SVD on every ``nn.Linear``, then plain
  fine-tuning (SPEC §5);
- :func:`sparsity_stage` — layer sparsity's penalized fine-tuning, merge and (optional) refit;
- :func:`rare_stage` — factorize, fine-tune with RaRe and live fusion, fold (SPEC §2–4).

A combined method runs a structural stage first and a low-rank stage on the model it left
(:func:`then`): ``layer-sparsity+rmt-svd`` removes whole layers, then the Marchenko–Pastur bulk of
the ones that remain; ``rare+rmt-svd`` fuses rows and columns, then truncates the fused ``W'``.
The low-rank stage's fine-tuning is then the one refit of the combined result.

Each stage returns a :class:`Stage`: the model, its fine-tuning phases (for the report's training
account and ``--plot``), its SPEC §6 layer entries and a method-specific report section.
Nothing here exports, verifies or writes; :func:`rankshrink.pipeline.compress.compress` does that for
every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from rankshrink.io.data import Dataset
from rankshrink.methods.layer_sparsity import LayerSparsityConfig, as_chain
from rankshrink.methods.lowrank_layers import LowRankConfig, LowRankLayer, expand_low_rank, low_rank
from rankshrink.models.chain import prepare_chain
from rankshrink.train.finetune import FineTuneReport, fine_tune_plain
from rankshrink.train.rare_config import TrainConfig, TrainReport
from rankshrink.train.sparsity import LayerSparsityReport, layer_sparsity


@dataclass
class Phase:
    """One fine-tuning phase of a stage, and the model's export-size ratio while it ran."""

    report: FineTuneReport | TrainReport
    # None: the final ratio (the model was already at its final size); a RaRe phase's history
    # carries its own per-step ratio, which is kept
    size_ratio: float | None = None


@dataclass
class Stage:
    """What a stage produced."""

    model: nn.Module  # eval mode, exportable as it is
    phases: list[Phase]
    layers: list[dict[str, Any]]  # SPEC §6 layer entries of ``model``
    detail: dict[str, Any] = field(default_factory=dict)  # method-specific report sections
    # RaRe: max abs difference of the folded model from the factorized one on the held-out split
    fold_diff: float | None = None
    heads: Any = None  # RaRe on a Transformer: the heads each block kept


def low_rank_stage(
    model: nn.Module,
    chain: bool,
    cfg: LowRankConfig,
    data: Dataset,
    teacher: Tensor | None,
    train: TrainConfig,
    steps: int,
    say: Callable[[str], None] = lambda _msg: None,
) -> Stage:
    """Truncate a copy of ``model`` (:func:`~rankshrink.methods.lowrank_layers.low_rank`), fine-tune it.

    Args:
        chain: ``model`` is an MLP: it is flattened first (nested Sequentials, BatchNorm folded,
            as RaRe does) and its two-factor layers are expanded into plain Linears afterwards,
            so the result saves as a sequential checkpoint.
        steps: fine-tuning steps (cosine-decayed learning rate); 0 for none.
    """
    say("truncating")
    base = prepare_chain(model) if chain else model
    compressed, account = low_rank(base, cfg)
    say("fine-tuning")
    tune = fine_tune_plain(
        compressed, data.x_train, data.y_train, teacher, steps, train.lr, train.batch_size,
        train.seed, distill=train.distill, cosine=True,
    )  # fmt: skip
    if isinstance(compressed, nn.Sequential):
        compressed = expand_low_rank(compressed)
    return Stage(
        compressed.eval(),
        [Phase(tune)],
        [_low_rank_layer(a) for a in account],
        {"low_rank": {"config": asdict(cfg)}},
    )


def sparsity_stage(
    model: nn.Module,
    cfg: LayerSparsityConfig,
    data: Dataset,
    teacher: Tensor | None,
    say: Callable[[str], None] = lambda _msg: None,
) -> Stage:
    """Layer sparsity on ``model`` (not changed).

    Raises:
        UnsupportedModelError: no layer of ``model`` can merge (a Transformer, no ReLU chain) —
            before any training.
    """
    chain = as_chain(model)  # refuses a model with no ReLU chain before any training
    say("penalized fine-tuning, merging" + (", refit" if cfg.refit_steps else ""))
    merged, ls = layer_sparsity(model, data.x_train, data.y_train, teacher, cfg)
    phases = [Phase(ls.train, 1.0)] + ([Phase(ls.refit)] if ls.refit is not None else [])
    return Stage(
        merged,
        phases,
        _sparsity_layers(ls, chain, merged),
        {"layer_sparsity": _sparsity_dict(ls, cfg.lam)},
    )


def then(first: Stage, second: Stage) -> Stage:
    """The account of ``second`` run on ``first.model``: one model, both stages' phases.

    A layer entry of ``second`` whose layer ``first`` produced (the same position among the
    Linear layers, with the same shape) keeps ``first``'s original shape, ``W'`` shape and
    original parameter count, so the entries still describe the original model's layers. When
    the layers do not correspond one to one (RaRe folds a Transformer's q, k, v into one
    projection), ``second``'s entries stand, and ``first``'s are kept in ``first_stage_layers``.
    """
    layers = second.layers
    shapes = [entry.get("weight_shape") for entry in first.layers]
    if shapes == [entry["original_shape"] for entry in second.layers]:
        layers = [
            {
                **b,
                "name": a["name"],  # the original model's layer(s) it came from
                "original_shape": a["original_shape"],
                "core_shape": a["core_shape"],
                "original_params": a["original_params"],
                "fold_kind": f"{a['fold_kind']}+{b['fold_kind']}",
            }
            for a, b in zip(first.layers, second.layers, strict=True)
        ]
        detail = {**first.detail, **second.detail}
    else:
        detail = {**first.detail, **second.detail, "first_stage_layers": first.layers}
    return Stage(second.model, first.phases + second.phases, layers, detail)


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
        entry["mp_rank"] = a.mp_rank  # below "rank" when a floor (energy, --min-rank) raised it
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


def _sparsity_dict(ls: LayerSparsityReport, lam: float) -> dict[str, Any]:
    return {
        "lam": lam,
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
