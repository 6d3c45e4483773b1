"""Index maps: the sparse factors P and Q of SPEC §1, stored as one index and one scale per entry.

``P`` (m × m') is a scaled gather: original output ``k`` reads reduced output ``index[k]`` times
``scale[k]``. ``Q`` (n' × n) is a scaled segment-sum: original input ``j`` adds ``scale[j] · x_j`` to
reduced input ``index[j]``. Both are represented by the same pair of vectors; only the direction in
which they are applied differs. Everything here is pure: functions take and return tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class IndexMap:
    """``size`` original coordinates mapped onto ``reduced`` coordinates with per-entry scales."""

    index: Tensor  # (size,) int64, values in [0, reduced)
    scale: Tensor  # (size,) float
    reduced: int

    @staticmethod
    def identity(size: int, dtype: torch.dtype = torch.float32) -> IndexMap:
        """The identity map (no fusion yet)."""
        return IndexMap(torch.arange(size), torch.ones(size, dtype=dtype), size)

    @property
    def size(self) -> int:
        return int(self.index.numel())

    # The two counts below are read after every fusion (the training loop's size estimate) and
    # a map never changes once built (fusion makes a new one), so each is computed once.

    @functools.cached_property
    def signed_count(self) -> int:
        """Distinct ``(index, sign of scale)`` pairs: the features a sign-split fold needs."""
        key = self.index * 2 + (self.scale < 0).long()
        return int(torch.count_nonzero(torch.bincount(key, minlength=2 * self.reduced)))

    @functools.cached_property
    def max_group(self) -> int:
        """The most original coordinates mapped onto one reduced coordinate (at least 1)."""
        if self.index.numel() == 0:
            return 1
        return max(int(torch.bincount(self.index).max()), 1)

    def is_identity(self) -> bool:
        """True when the map is exactly the identity (no fused coordinates, unit scales)."""
        return (
            self.reduced == self.size
            and bool(torch.equal(self.index, torch.arange(self.size)))
            and bool(torch.all(self.scale == 1))
        )

    def as_gather(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Dense P (size × reduced): ``P[k, index[k]] = scale[k]``."""
        dense = torch.zeros(self.size, self.reduced, dtype=dtype)
        dense[torch.arange(self.size), self.index] = self.scale.to(dtype)
        return dense

    def as_segment_sum(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Dense Q (reduced × size): ``Q[index[j], j] = scale[j]``."""
        return self.as_gather(dtype).T.contiguous()

    def gather(self, z: Tensor) -> Tensor:
        """Apply P along the last axis: ``(..., reduced) -> (..., size)``."""
        return z[..., self.index] * self.scale.to(z.dtype)

    def segment_sum(self, x: Tensor) -> Tensor:
        """Apply Q along the last axis: ``(..., size) -> (..., reduced)``."""
        out = x.new_zeros(*x.shape[:-1], self.reduced)
        return out.index_add_(-1, self.index, x * self.scale.to(x.dtype))

    def padded_groups(self) -> tuple[Tensor, Tensor]:
        """Q as padded groups ``(index, scale)`` of shape (reduced, G) for a Gather+ReduceSum.

        Row ``h`` lists the original inputs that sum into reduced input ``h``; padding entries
        point at input 0 with scale 0, so they add nothing.
        """
        counts = torch.bincount(self.index, minlength=self.reduced)
        width = max(int(counts.max()) if counts.numel() else 1, 1)
        index = torch.zeros(self.reduced, width, dtype=torch.long)
        scale = torch.zeros(self.reduced, width, dtype=self.scale.dtype)
        order = torch.argsort(self.index, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(self.size) - starts[self.index[order]]
        index[self.index[order], slot] = order
        scale[self.index[order], slot] = self.scale[order]
        return index, scale

    def fuse(
        self, drop: Tensor, keep: Tensor, drop_factor: Tensor, keep_factor: Tensor
    ) -> IndexMap:
        """Merge reduced coordinates ``drop[t]`` into ``keep[t]`` and compact the numbering.

        Entries that pointed at ``drop[t]`` now point at ``keep[t]`` with their scale times
        ``drop_factor[t]``; entries at ``keep[t]`` keep pointing there with scale times
        ``keep_factor[t]``. The pairs must be disjoint.
        """
        index, scale = self.index.clone(), self.scale.clone()
        factor = torch.ones(self.reduced, dtype=scale.dtype)
        target = torch.arange(self.reduced)
        factor[drop] = drop_factor.to(scale.dtype)
        factor[keep] = keep_factor.to(scale.dtype)
        target[drop] = keep
        scale = scale * factor[index]
        index = target[index]
        alive = torch.ones(self.reduced, dtype=torch.bool)
        alive[drop] = False
        renumber = torch.cumsum(alive.long(), 0) - 1
        return IndexMap(renumber[index], scale, self.reduced - int(drop.numel()))
