"""``IndexedLinear``: a dense core between optional index maps, for layers that cannot fold dense.

Computes ``y = P · (W · (Q · x) + b)`` where

- ``Q`` (optional) is a scaled segment-sum stored as padded groups: reduced input ``h`` is
  ``Σ_g in_scale[h, g] · x[in_index[h, g]]`` (padding entries have scale 0). In ONNX this is a
  Gather + Mul + ReduceSum, which is exact and deterministic — unlike ScatterND with
  ``reduction="add"`` on onnxruntime's CPU kernels (SPEC §4).
- ``P`` (optional) is a scaled gather: output ``k`` is ``out_scale[k] · z[out_index[k]]``.

It is only emitted where the dense fold is impossible and the index form is smaller than the
dense product; everything here is a buffer, so it carries no trainable state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class IndexedLinear(nn.Module):
    """A linear layer with an optional input segment-sum and an optional output gather."""

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        in_index: Tensor | None = None,
        in_scale: Tensor | None = None,
        out_index: Tensor | None = None,
        out_scale: Tensor | None = None,
        in_features: int | None = None,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        )
        self.register_buffer("in_index", None if in_index is None else in_index.long().clone())
        self.register_buffer("in_scale", None if in_scale is None else in_scale.clone())
        self.register_buffer("out_index", None if out_index is None else out_index.long().clone())
        self.register_buffer("out_scale", None if out_scale is None else out_scale.clone())
        self.in_features = int(in_features if in_features is not None else weight.shape[1])
        self.out_features = int(out_index.numel() if out_index is not None else weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        if self.in_index is not None:
            # index_select exports as one Gather; x[..., idx] becomes Transpose+GatherND.
            picked = x.index_select(-1, self.in_index.flatten())  # (..., n'·G)
            picked = picked.unflatten(-1, tuple(self.in_index.shape))  # (..., n', G)
            x = (picked * self.in_scale).sum(-1)  # (..., n')
        y = F.linear(x, self.weight, self.bias)
        if self.out_index is not None:
            y = y.index_select(-1, self.out_index) * self.out_scale  # (..., m') -> (..., m)
        return y

    def spec(self) -> dict[str, Any]:
        """The architecture spec (see :mod:`rankshrink.models.arch`)."""
        return {
            "kind": "indexed_linear",
            "in_features": self.in_features,
            "core": list(self.weight.shape),
            "bias": self.bias is not None,
            "in_groups": None if self.in_index is None else list(self.in_index.shape),
            "out_features": self.out_features if self.out_index is not None else None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> IndexedLinear:
        """An empty layer of the shapes ``spec`` names, to receive a state_dict."""
        rows, cols = (int(v) for v in spec["core"])
        groups = spec.get("in_groups")
        out = spec.get("out_features")
        return cls(
            torch.zeros(rows, cols),
            torch.zeros(rows) if spec.get("bias", True) else None,
            None if groups is None else torch.zeros(*groups, dtype=torch.long),
            None if groups is None else torch.zeros(*groups),
            None if out is None else torch.zeros(int(out), dtype=torch.long),
            None if out is None else torch.zeros(int(out)),
            in_features=int(spec["in_features"]),
        )
