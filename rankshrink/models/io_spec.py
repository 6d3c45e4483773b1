"""What a model takes and returns, as the exporter and onnxruntime see it.

One object per model kind (as optimum's ``OnnxConfig``): export, onnxruntime feeds, latency and
verification read it instead of branching on the model. Every model rankshrink trains takes one
tensor ``x``: features ``(N, F…)`` for an MLP or the sample Transformer, stacked token ids, mask
and types ``(N, 3, T)`` for a Hugging Face encoder (:class:`~rankshrink.nn.token_encoder.PackedTokens`).
The file a user deploys takes what the model's own forward takes: one float input ``x``, or the
three int64 inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` with dynamic batch and
sequence axes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor, nn

from rankshrink.nn.token_encoder import PackedTokens

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class ModelIO:
    """Names, dtypes and dynamic axes of a model's inputs and output."""

    inputs: tuple[str, ...] = ("x",)
    output: str = "y"
    tokens: bool = False  # x is (N, 3, T) stacked tokens: three int64 inputs, dynamic T
    pad_id: int = 0  # the token a padded position holds (the padding check appends it)

    def exported(self, model: nn.Module) -> nn.Module:
        """The module whose forward the file computes (a token encoder takes three tensors)."""
        return model.encoder if self.tokens and isinstance(model, PackedTokens) else model

    def args(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x`` as the exported module's positional arguments."""
        if self.tokens:
            return tuple(x[:, i].contiguous() for i in range(len(TOKEN_INPUTS)))
        return (x,)

    def feeds(self, x: Tensor, names: list[str]) -> dict[str, np.ndarray]:
        """onnxruntime's inputs for ``x``; ``names`` are the file's input names (a plain model's
        one input may be named anything: files exported by other tools are verified too)."""
        if self.tokens:
            return {n: x[:, TOKEN_INPUTS.index(n)].numpy().astype(np.int64) for n in names}
        return {names[0]: x.detach().cpu().numpy().astype(np.float32)}

    def dynamic_axes(self) -> dict[int, str]:
        """The axes of every input that the file leaves dynamic."""
        return {0: "batch", 1: "sequence"} if self.tokens else {0: "batch"}


#: An MLP, a traced module, the sample Transformer: one float input, one output.
FEATURES = ModelIO()


def token_io(base: bool, pad_id: int) -> ModelIO:
    """A Hugging Face encoder's: its last hidden state (a base model) or its logits."""
    return ModelIO(TOKEN_INPUTS, "last_hidden_state" if base else "logits", True, pad_id)
