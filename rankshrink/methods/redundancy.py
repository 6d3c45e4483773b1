"""A data-free look at a model's Linear layers: shapes and how redundant they already are.

For each layer: near-parallel pairs of rows (of ``[W|b]``) and of columns at a cosine threshold,
the most parallel pair, and the effective rank ``exp(H(σ/Σσ))`` (Roy & Vetterli) — what the
fusion search would find on the trained weights before any fine-tuning — and the
Marchenko–Pastur reading of RMT-SVD (:func:`rankshrink.math.lowrank.mp_fit`): how many singular values
stand above the noise bulk, and what the layer would weigh split at the rank ``compress --method
rmt-svd`` keeps by default (that count, floored at half the layer's spectral energy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rankshrink.math.lowrank import energy_rank, mp_fit_svals, split_is_smaller
from rankshrink.math.rare import cosine_matrix
from rankshrink.methods.lowrank_layers import LowRankConfig


def _pairs_below(vectors: torch.Tensor, tau_cos: float) -> tuple[int, float]:
    if vectors.shape[0] < 2:
        return 0, 0.0
    cos = cosine_matrix(vectors.double()).abs()
    i, j = torch.triu_indices(len(cos), len(cos), offset=1)
    upper = cos[i, j]
    return int((1 - upper < tau_cos).sum()), float(upper.max())


@torch.no_grad()
def inspect_model(model: nn.Module, tau_cos: float = 1e-4) -> list[dict[str, Any]]:
    """One dict per ``nn.Linear`` in ``model`` (named as in ``named_modules``)."""
    rows: list[dict[str, Any]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        W = mod.weight.detach().double()
        b = (
            mod.bias.detach().double()
            if mod.bias is not None
            else torch.zeros(W.shape[0], dtype=W.dtype)
        )
        row_pairs, row_max = _pairs_below(torch.cat([W, b[:, None]], 1), tau_cos)
        col_pairs, col_max = _pairs_below(W.T, tau_cos)
        sv = torch.linalg.svdvals(W)
        p = sv / sv.sum() if float(sv.sum()) > 0 else sv
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        m, n = W.shape
        mp = mp_fit_svals(sv, (m, n))
        # the rank compress --method rmt-svd keeps by default: the MP edge, floored at half the
        # layer's spectral energy
        k = max(mp.rank, 1, energy_rank(sv, LowRankConfig().min_energy))
        bias = 0 if mod.bias is None else mod.bias.numel()
        rows.append(
            {
                "name": name or "(model)",
                "shape": [int(W.shape[0]), int(W.shape[1])],
                "params": int(W.numel() + (0 if mod.bias is None else mod.bias.numel())),
                "parallel_row_pairs": row_pairs,
                "max_row_cos": row_max,
                "parallel_col_pairs": col_pairs,
                "max_col_cos": col_max,
                "effective_rank": float(torch.exp(torch.tensor(entropy))),
                "max_rank": int(min(W.shape)),
                "mp_rank": mp.rank,  # singular values above the MP edge
                "mp_bulk_fraction": mp.bulk_fraction,
                # weights + bias after an RMT-SVD split (dense when a split is not smaller)
                "mp_params": (k * (m + n) if split_is_smaller(m, n, k) else m * n) + bias,
            }
        )
    return rows
