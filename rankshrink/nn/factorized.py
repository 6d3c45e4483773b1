"""``FactorizedLinear``: ``y = P · (W' · (Q · x) + b')`` with Frobenius normalization (SPEC §1–2).

Only ``V`` (W' before normalization), ``bias`` (b') and the gain ``g`` are trainable. With Frobenius
normalization the effective weight is ``W' = k · V / ‖V‖_F · g`` where ``k`` is the initial norm, so
L2 on ``V`` no longer shrinks the function. ``P`` and ``Q`` are :class:`IndexMap` s; they change only
through :func:`rankshrink.methods.fusion.fuse_`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rankshrink.math.indexmap import IndexMap


class FactorizedLinear(nn.Module):
    """A drop-in replacement for ``nn.Linear`` holding the factorized form of SPEC §1."""

    def __init__(self, linear: nn.Linear, frobenius: bool = True) -> None:
        super().__init__()
        weight = linear.weight.detach().clone().float()  # (m, n)
        self.out_features, self.in_features = weight.shape
        self.V = nn.Parameter(weight)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone().float())
        )
        self.frobenius = frobenius
        norm = float(weight.norm())
        self.register_buffer("k", torch.tensor(norm if norm > 0 else 1.0))
        self.gain = nn.Parameter(torch.tensor(1.0)) if frobenius else None
        self.P = IndexMap.identity(self.out_features)  # rows: (m,) -> m'
        self.Q = IndexMap.identity(self.in_features)  # cols: (n,) -> n'
        self._p_identity = True
        self._q_identity = True
        self._next_weight: Tensor | None = None

    # -- the function --------------------------------------------------------------------------

    def scale_factor(self) -> Tensor:
        """``c`` with ``W' = c · V`` (1 without Frobenius normalization)."""
        if self.gain is None:
            return torch.ones((), dtype=self.V.dtype)
        return self.k * self.gain / self.V.norm()

    def weight(self) -> Tensor:
        """The effective core ``W'`` (m' × n')."""
        return self.V * self.scale_factor() if self.gain is not None else self.V

    def weight_parts(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(W', c, ‖V‖_F)`` with ``W' = c · V``, computed once (``c = 1`` without Frobenius
        normalization). The training step needs ``c`` and ``‖V‖`` again for the RaRe gradient."""
        norm = self.V.norm()
        if self.gain is None:
            return self.V, torch.ones((), dtype=self.V.dtype), norm
        c = self.k * self.gain / norm
        return self.V * c, c, norm

    def bias_or_zeros(self) -> Tensor:
        return self.bias if self.bias is not None else self.V.new_zeros(self.V.shape[0])

    def use_weight_once(self, weight: Tensor) -> None:
        """Make the next forward call use ``weight`` (``W'`` computed already, in the same graph).

        The training step computes ``W'`` for the pair scan and the RaRe term before the forward
        pass; handing it over saves computing it twice.
        """
        self._next_weight = weight

    def forward(self, x: Tensor) -> Tensor:
        # P·W'·Q is applied by expanding the weight (O(m·n) index work, independent of the batch,
        # and the original's matmul) — or, for P, by expanding the outputs of the smaller matmul
        # when the batch has fewer rows than the weight has columns (O(batch·m) index work).
        W, b = self._next_weight, self.bias
        self._next_weight = None
        if W is None:
            W = self.weight()
        # index_select, not W[idx]: its gradient is an index_add, which is deterministic and far
        # cheaper than the sorted index_put that deterministic mode imposes on advanced indexing.
        # The products are in place: their backward needs only the (constant) scales, and a
        # fresh result per op costs more than the op on small layers.
        if not self._q_identity:
            W = W.index_select(1, self.Q.index).mul_(self.Q.scale)  # (m', n)
        if self._p_identity:
            return F.linear(x, W, b)
        if x.numel() // max(x.shape[-1], 1) < W.shape[1]:
            z = F.linear(x, W, b)  # (..., m')
            return z.index_select(-1, self.P.index).mul_(self.P.scale)
        W = W.index_select(0, self.P.index).mul_(self.P.scale[:, None])  # (m, n)
        b = None if b is None else b.index_select(0, self.P.index).mul_(self.P.scale)
        return F.linear(x, W, b)

    def dense_weight(self) -> Tensor:
        """``P · W' · Q`` as a dense (m × n) float64 matrix (for tests and folding)."""
        W = self.weight().detach().double()
        return self.P.as_gather() @ W @ self.Q.as_segment_sum()

    def dense_bias(self) -> Tensor:
        """``P · b'`` as a dense (m,) float64 vector."""
        return self.P.as_gather() @ self.bias_or_zeros().detach().double()

    # -- bookkeeping ---------------------------------------------------------------------------

    @property
    def reduced_shape(self) -> tuple[int, int]:
        """``(m', n')``."""
        # read from the parameter dict: ``self.V`` goes through nn.Module.__getattr__, and the
        # training loop asks for this shape many times a step
        m, n = self._parameters["V"].shape  # type: ignore[union-attr]
        return m, n

    def set_maps(self, P: IndexMap, Q: IndexMap) -> None:
        """Install new index maps (called by fusion only)."""
        # a fusion changes one map: only a new map needs the identity test
        if P is not self.P:
            self.P, self._p_identity = P, P.is_identity()
        if Q is not self.Q:
            self.Q, self._q_identity = Q, Q.is_identity()

    def extra_repr(self) -> str:
        m2, n2 = self.reduced_shape
        return f"{self.in_features} -> {self.out_features}, core=({m2}, {n2})"
