"""The RaRe loss (SPEC §2) and the pair search that feeds it and fusion.

``RaRe(A) = min_{i≠j} (1 − cos(a_i, a_j)²)``. The gradient of a ``min`` flows only through its argmin
pair, so the all-pairs cosine matrix is computed without autograd and only the chosen pair's term
is differentiated — the same gradient, far cheaper.

The all-pairs search is a Gram matrix, O(k²·d) per axis, which for wide layers costs more than the
training step itself. :class:`PairCandidates` therefore keeps the ``top`` most parallel pairs from
the last full search and re-scores only those, exactly, at every step; the full search is redone
every ``refresh`` steps. With ``refresh=1`` this is the exact argmin of the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_EPS = 1e-12


def axis_vectors(weight: Tensor, bias: Tensor, axis: str) -> Tensor:
    """The vectors compared along ``axis``: rows of ``[W' | b']`` or columns of ``W'``."""
    if axis == "rows":
        return torch.cat([weight, bias[:, None]], dim=1)  # (m', n'+1)
    if axis == "cols":
        return weight.T  # (n', m')
    raise ValueError(f"axis must be 'rows' or 'cols', got {axis!r}")


def cosine_matrix(vectors: Tensor) -> Tensor:
    """All-pairs cosine similarity of the rows of ``vectors`` (k × k), no autograd."""
    with torch.no_grad():
        unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return unit @ unit.T


def pair_cosines(vectors: Tensor, pairs: Tensor) -> Tensor:
    """Cosine of each pair ``(i, j)`` in ``pairs`` (T × 2); differentiable."""
    a, b = vectors.index_select(0, pairs[:, 0]), vectors.index_select(0, pairs[:, 1])
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_EPS)


def rare_value(cos: Tensor) -> Tensor:
    """``1 − cos²`` (the RaRe term of one pair)."""
    return 1.0 - cos * cos


def top_pairs(vectors: Tensor, top: int, positive_only: bool) -> Tensor:
    """The ``top`` most parallel pairs ``(i < j)`` by |cos| (or by cos when ``positive_only``)."""
    count = vectors.shape[0]
    if count < 2:
        return torch.empty(0, 2, dtype=torch.long)
    cos = cosine_matrix(vectors)
    score = cos if positive_only else cos.abs()
    i, j = torch.triu_indices(count, count, offset=1)
    flat = score[i, j]
    k = min(top, flat.numel())
    best = torch.topk(flat, k, sorted=True).indices
    return torch.stack([i[best], j[best]], dim=1)


@dataclass
class PairCandidates:
    """Candidate pairs for one layer axis, refreshed by a full search every ``refresh`` steps."""

    top: int
    refresh: int
    positive_only: bool
    pairs: Tensor | None = None
    searched_at: int = -(10**9)

    def get(self, vectors: Tensor, step: int) -> Tensor:
        """The candidate pairs for the current vectors (a full search when one is due)."""
        due = step - self.searched_at >= self.refresh
        if self.pairs is None or due or self.pairs.numel() == 0:
            self.pairs = top_pairs(vectors.detach(), self.top, self.positive_only)
            self.searched_at = step
        return self.pairs

    def remap(self, dropped: Tensor, size_before: int) -> Tensor:
        """Renumber after ``dropped`` vectors were removed; pairs that lost a member go.

        Returns the mask of the pairs that stayed (to filter values computed for them).
        """
        if self.pairs is None or self.pairs.numel() == 0:
            return torch.zeros(0, dtype=torch.bool)
        alive = torch.ones(size_before, dtype=torch.bool)
        alive[dropped] = False
        keep = alive[self.pairs].all(dim=1)
        renumber = torch.cumsum(alive.long(), 0) - 1
        self.pairs = renumber[self.pairs[keep]]
        return keep


def argmin_pair(cos: Tensor, positive_only: bool) -> int:
    """Index (into the candidates) of the pair with the smallest RaRe term."""
    score = cos if positive_only else cos.abs()
    return int(torch.argmax(score))
