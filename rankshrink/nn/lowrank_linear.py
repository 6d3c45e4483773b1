"""A Linear through a rank-``k`` bottleneck: the module truncated SVD and RMT-SVD swap in."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rankshrink.math.lowrank import truncated_svd


class LowRankLinear(nn.Module):
    """``y = A (B x) + b``: a Linear through a rank-``k`` bottleneck, two MatMul/Gemm in ONNX.

    ``down`` holds ``B`` (``k × in_features``, no bias), ``up`` holds ``A`` (``out_features × k``)
    and the bias. Works on any leading batch dimensions, like ``nn.Linear``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if not 0 < rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, {min(in_features, out_features)}] for a"
                f" {out_features}×{in_features} layer, got {rank}"
            )
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.down.out_features

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-``rank`` approximation of ``linear`` (exact at full rank)."""
        layer = cls(linear.in_features, linear.out_features, rank, bias=linear.bias is not None)
        A, B = truncated_svd(linear.weight, rank)
        layer.down.weight.copy_(B)
        layer.up.weight.copy_(A)
        if linear.bias is not None:
            layer.up.bias.copy_(linear.bias)
        return layer.to(linear.weight.device)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The same map as one dense ``nn.Linear`` (``W = A @ B``)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None)
        linear.weight.copy_(self.up.weight @ self.down.weight)
        if self.up.bias is not None:
            linear.bias.copy_(self.up.bias)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))  # (..., n) -> (..., k) -> (..., m)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
