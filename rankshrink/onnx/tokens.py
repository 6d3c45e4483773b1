"""What verification does differently for token encoders: a second sequence length, padding, and
comparing hidden states by the cosine of their mask-mean pooling.

An encoder takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64, (B, T)) and
returns ``last_hidden_state`` (B, T, C) or ``logits`` (B, classes); they travel stacked as one
(B, 3, T) tensor. :func:`shorter` and :func:`padded` make the second sequence length and the
padded copy that :func:`rankshrink.onnx.verify.verify_export` checks at.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rankshrink.nn.token_encoder import TokenEncoder
from rankshrink.onnx.task import Task, Tolerances, resolve_task

PAD_TOKENS = 3  # appended by the padding check


def shorter(x: Tensor) -> Tensor:
    """The first half of every sequence (at least 2 tokens), a second length to check at; a row
    whose mask would end up empty keeps its first token."""
    T = max(2, x.shape[-1] // 2)
    out = x[..., :T].clone()
    out[:, 1, 0] = torch.where(out[:, 1].sum(1) == 0, 1, out[:, 1, 0])
    return out


def padded(x: Tensor, extra: int = PAD_TOKENS, pad_id: int = 0) -> Tensor:
    """``x`` with ``extra`` padding tokens (id ``pad_id``, mask 0, type 0) appended to every
    sequence."""
    pad = torch.zeros(*x.shape[:2], extra, dtype=x.dtype)
    pad[:, 0] = pad_id
    return torch.cat([x, pad], dim=-1)


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask-mean pooling of (B, T, C) hidden states over the unpadded tokens → (B, C)."""
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1.0)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (B, C) arrays."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return num / np.maximum(den, 1e-30)


def unpadded(out: np.ndarray, x: Tensor, hidden: bool) -> np.ndarray:
    """Hidden states at unpadded positions only (what a reader of the output uses); any other
    output as it is."""
    return out[x[:, 1].numpy().astype(bool)] if hidden else out


def encoder_task(encoder: TokenEncoder, tol: Tolerances, has_labels: bool) -> Task:
    """The task kind of a folder's model: ``hidden`` for a base model, else by its classes
    (see :func:`rankshrink.onnx.task.resolve_task`).

    Raises:
        InputError: ``--task`` or a gate flag does not fit the model.
    """
    cfg = encoder.config
    base = cfg.kind == "base"
    return resolve_task(cfg.hidden_size if base else cfg.classes, tol, has_labels, hidden=base)
