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

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

_EPS = 1e-12


@dataclass(slots=True)
class AxisVectors:
    """The vectors compared along one axis: rows of ``[W' | b']`` or columns of ``W'``.

    Never materializes ``[W' | b']``: on a wide layer that copy alone costs as much as a large
    elementwise op, every step. Vectors are read by index; the Gram matrix is ``W'W'ᵀ + b'b'ᵀ``.
    Differentiable when ``weight``/``bias`` are.
    """

    weight: Tensor  # (m', n')
    bias: Tensor | None  # (m',) or None (rows then compare W' rows alone)
    axis: str  # "rows" | "cols"

    def __post_init__(self) -> None:
        if self.axis not in ("rows", "cols"):
            raise ValueError(f"axis must be 'rows' or 'cols', got {self.axis!r}")

    def __len__(self) -> int:
        return int(self.weight.shape[0 if self.axis == "rows" else 1])

    def select(self, idx: Tensor) -> Tensor:
        """The vectors ``idx`` (k × d)."""
        if self.axis == "cols":
            return self.weight.index_select(1, idx).T
        rows = self.weight.index_select(0, idx)
        if self.bias is None:
            return rows
        return torch.cat([rows, self.bias.index_select(0, idx)[:, None]], dim=1)

    def dense(self) -> Tensor:
        """All vectors as one (count × d) matrix."""
        return self.select(torch.arange(len(self)))

    @torch.no_grad()
    def cosine_matrix(self) -> Tensor:
        """All-pairs cosine similarity (count × count), no autograd."""
        W = self.weight
        if self.axis == "cols":
            gram = W.T @ W
        elif self.bias is None:
            gram = W @ W.T
        else:
            gram = torch.addmm(torch.outer(self.bias, self.bias), W, W.T)
        inv = gram.diagonal().clamp_min(_EPS).rsqrt()
        return gram.mul_(inv[:, None]).mul_(inv[None, :])

    def pair_cosines(self, pairs: Tensor) -> Tensor:
        """Cosine of each pair ``(i, j)`` in ``pairs`` (T × 2); differentiable."""
        a, b = self.select(pairs[:, 0]), self.select(pairs[:, 1])
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_EPS)

    def score(self, pairs: Tensor) -> ScoredPairs:
        """Each pair's 2 × 2 Gram matrix and cosine, without autograd.

        One gather of the pairs' weight vectors and one batched 2 × 2 product: the bias enters as
        an outer product, so ``[W'|b']`` is never assembled. Everything fusion needs (norms, dot
        product, cosine) follows from the Gram entries.
        """
        # detached inputs instead of a no_grad block: this runs for every axis at every step, and
        # entering and leaving the block costs more than the two detaches
        count = int(pairs.shape[0])
        flat = pairs.reshape(-1)  # a0, b0, a1, b1, ...
        weight = self.weight.detach()
        source = weight.T if self.axis == "cols" else weight
        X = source.index_select(0, flat).view(count, 2, -1)
        bp = None
        if self.axis == "rows" and self.bias is not None:
            bp = self.bias.detach().index_select(0, flat).view(count, 2)
            gram = torch.baddbmm(bp[:, :, None] * bp[:, None, :], X, X.transpose(1, 2))
        else:
            gram = torch.bmm(X, X.transpose(1, 2))
        g = gram.view(count, 4)
        sq, dot = g[:, 0::3], g[:, 1]  # views: (‖a‖², ‖b‖²) and a·b
        cos = dot * (sq[:, 0] * sq[:, 1]).clamp_min(_EPS * _EPS).rsqrt()
        return ScoredPairs(pairs, sq, dot, cos, self, g, X, bp)


@dataclass(slots=True)
class ScoredPairs:
    """Candidate pairs scored on one axis: squared norms, dot products and cosines."""

    pairs: Tensor  # (T, 2) indices (i, j)
    sq: Tensor  # (T, 2) ‖a_i‖², ‖a_j‖²
    dot: Tensor  # (T,) a_i · a_j
    cos: Tensor  # (T,)
    vectors: AxisVectors | None = None  # what was scored (the current ``W'``)
    # What the scoring gathered, kept so that the argmin pair's RaRe gradient needs no second
    # gather: the 2 × 2 Gram matrices (T, 4), the weight parts of the vectors (T, 2, d) and, on a
    # rows axis with a bias, the bias entries (T, 2). ``None`` once stale (after a fusion).
    gram: Tensor | None = None
    gathered: Tensor | None = None
    bias: Tensor | None = None

    def subset(self, keep: Tensor, pairs: Tensor, vectors: AxisVectors) -> ScoredPairs:
        """The pairs in ``keep``, renumbered to ``pairs``, of ``vectors`` (after a fusion).

        Fusion scales a kept vector by ``s > 0`` and drops its partner: cosines of the surviving
        pairs do not change, so they need no re-scoring. (Norms, dot products and the gathered
        vectors do; only the cosines are read after a fusion, and the gathered data is dropped.)
        """
        return ScoredPairs(pairs, self.sq[keep], self.dot[keep], self.cos[keep], vectors)

    def rare_term(self, index: int, weight: float) -> PairTerm:
        """``weight · (1 − cos²)`` of pair ``index`` with its gradient, in closed form.

        Reads the Gram entries and vectors the scoring gathered; after a fusion (stale data) it
        gathers the pair from :attr:`vectors`, the current ``W'``, instead.
        """
        idx = self.pairs[index]
        if self.gram is None or self.gathered is None:
            vectors = self.vectors
            assert vectors is not None, "scored pairs without their vectors"
            pair = vectors.select(idx)
            (sa, d), (_, sb) = (pair @ pair.T).tolist()
            with_bias = vectors.axis == "rows" and vectors.bias is not None
            w, b = (pair[:, :-1], pair[:, -1].tolist()) if with_bias else (pair, None)
        else:
            sa, d, _, sb = self.gram[index].tolist()
            w = self.gathered[index]
            b = None if self.bias is None else self.bias[index].tolist()
        value, mix = _rare_mix(sa, d, sb)
        mix = [[weight * m for m in row] for row in mix]
        grad_w = torch.tensor(mix, dtype=w.dtype) @ w
        if b is None:
            # 1 − cos² ignores each vector's scale, so G is orthogonal to each vector: ⟨G, w⟩ = 0
            return PairTerm(weight * value, idx, grad_w, None, 0.0)
        grad_b = [mix[0][0] * b[0] + mix[0][1] * b[1], mix[1][0] * b[0] + mix[1][1] * b[1]]
        # ⟨G, [w | b]⟩ = 0 as above, so the weight part is minus the 2-entry bias part
        w_dot = -(grad_b[0] * b[0] + grad_b[1] * b[1])
        return PairTerm(weight * value, idx, grad_w, torch.tensor(grad_b, dtype=w.dtype), w_dot)

    def best(self, positive_only: bool) -> tuple[float, int]:
        """The most parallel pair: its score (|cos|, or cos when ``positive_only``) and index.

        It is the argmin of RaRe, and it decides whether any pair can pass τ_cos this step.
        """
        score = self.cos if positive_only else self.cos.abs()
        value, index = score.max(0)
        return float(value), int(index)


def axis_vectors(weight: Tensor, bias: Tensor, axis: str) -> Tensor:
    """The vectors compared along ``axis`` as one matrix (see :class:`AxisVectors`)."""
    return AxisVectors(weight, bias, axis).dense()


def cosine_matrix(vectors: Tensor) -> Tensor:
    """All-pairs cosine similarity of the rows of ``vectors`` (k × k), no autograd."""
    with torch.no_grad():
        unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(_EPS)
        return unit @ unit.T


def pair_cosines(vectors: Tensor, pairs: Tensor) -> Tensor:
    """Cosine of each pair ``(i, j)`` of rows of ``vectors`` in ``pairs`` (T × 2); differentiable."""
    a, b = vectors.index_select(0, pairs[:, 0]), vectors.index_select(0, pairs[:, 1])
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_EPS)


def rare_value(cos: Tensor) -> Tensor:
    """``1 − cos²`` (the RaRe term of one pair)."""
    return 1.0 - cos * cos


@dataclass(slots=True)
class PairTerm:
    """One axis's RaRe term: ``weight · (1 − cos²)`` of its argmin pair and the gradient.

    ``grad_w`` is the gradient with respect to the pair's weight parts (2 × d: rows of ``W'``,
    or columns as rows), ``grad_b`` the one for their bias entries (a rows axis with a bias), and
    ``w_dot`` is ``⟨grad_w, weight parts⟩``, which the Frobenius normalization's chain rule needs.
    """

    value: float
    idx: Tensor  # the pair's indices (2,)
    grad_w: Tensor
    grad_b: Tensor | None
    w_dot: float


def _rare_mix(sa: float, d: float, sb: float) -> tuple[float, list[list[float]]]:
    """``1 − cos²`` from a pair's Gram entries and the 2 × 2 matrix ``M`` with gradient ``M·pair``.

    ``∂cos/∂a = b/(‖a‖‖b‖) − cos·a/‖a‖²``, so ``∂(1 − cos²)/∂a = 2cos²/‖a‖²·a − 2cos/(‖a‖‖b‖)·b``
    and symmetrically for ``b``. Python scalars: this runs for every fusable axis at every step,
    where each extra tensor op costs more than the arithmetic.
    """
    sa, sb = max(sa, _EPS), max(sb, _EPS)
    inv = 1.0 / math.sqrt(sa * sb)
    cos = d * inv
    off = -2.0 * cos * inv
    return 1.0 - cos * cos, [[2.0 * cos * cos / sa, off], [off, 2.0 * cos * cos / sb]]


def rare_pair_grad(pair: Tensor) -> tuple[float, Tensor]:
    """``1 − cos(a, b)²`` of ``pair = [a; b]`` (2 × d) and its gradient (2 × d), in closed form."""
    (sa, d), (_, sb) = (pair @ pair.T).tolist()
    value, mix = _rare_mix(sa, d, sb)
    return value, torch.tensor(mix, dtype=pair.dtype) @ pair


def top_pairs(
    vectors: AxisVectors | Tensor,
    top: int,
    positive_only: bool,
    groups: Tensor | None = None,
) -> Tensor:
    """The ``top`` most parallel pairs ``(i < j)`` by |cos| (or by cos when ``positive_only``).

    With ``groups`` (one id per vector), only pairs within one group are candidates: rows of a
    query/key/value projection fuse within one attention head (SPEC §3).
    """
    count = len(vectors)
    if count < 2:
        return torch.empty(0, 2, dtype=torch.long)
    cos = vectors.cosine_matrix() if isinstance(vectors, AxisVectors) else cosine_matrix(vectors)
    score = cos if positive_only else cos.abs_()
    # one topk over the whole matrix with the lower triangle masked out: cheaper than gathering
    # the upper triangle's k(k-1)/2 entries first
    score.masked_fill_(_lower_triangle(count), -math.inf)
    if groups is not None:
        score.masked_fill_(groups[:, None] != groups[None, :], -math.inf)
    k = min(top, count * (count - 1) // 2)
    # Two stages: each row's best few, then the best of those. One topk over k² entries is
    # single-threaded and dominates a wide layer's search; this is ~10× cheaper. The most parallel
    # pair (the argmin of RaRe) is always exact; lower-ranked candidates are best-per-row.
    per_row = min(count, max(_PER_ROW, -(-k // count)))
    row_best, col = torch.topk(score, per_row, dim=1, sorted=False)
    values, best = torch.topk(row_best.flatten(), k, sorted=True)
    best = best[values > -math.inf]  # rows near the end have fewer than per_row pairs
    return torch.stack([best // per_row, col.flatten()[best]], dim=1)


_PER_ROW = 4


@functools.lru_cache(maxsize=8)
def _lower_triangle(count: int) -> Tensor:
    """Mask of the pairs ``i >= j`` (an axis shrinks a little between searches: cache per size)."""
    return torch.ones(count, count, dtype=torch.bool).tril_()


@dataclass
class PairCandidates:
    """Candidate pairs for one layer axis, refreshed by a full search every ``refresh`` steps."""

    top: int
    refresh: int
    positive_only: bool
    groups: Tensor | None = None  # group id per vector: pairs stay within a group
    pairs: Tensor | None = None
    searched_at: int = -(10**9)

    def get(self, vectors: AxisVectors, step: int) -> Tensor:
        """The candidate pairs for the current vectors (a full search when one is due)."""
        due = step - self.searched_at >= self.refresh
        if self.pairs is None or due or self.pairs.numel() == 0:
            self.pairs = top_pairs(vectors, self.top, self.positive_only, self.groups)
            self.searched_at = step
        return self.pairs

    def remap(self, dropped: Tensor, size_before: int) -> Tensor:
        """Renumber after ``dropped`` vectors were removed; pairs that lost a member go.

        Returns the mask of the pairs that stayed (to filter values computed for them).
        """
        alive = torch.ones(size_before, dtype=torch.bool)
        alive[dropped] = False
        if self.groups is not None:
            self.groups = self.groups[alive]
        if self.pairs is None or self.pairs.numel() == 0:
            return torch.zeros(0, dtype=torch.bool)
        keep = alive[self.pairs].all(dim=1)
        renumber = torch.cumsum(alive.long(), 0) - 1
        self.pairs = renumber[self.pairs[keep]]
        return keep
