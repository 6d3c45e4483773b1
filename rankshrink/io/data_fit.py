"""Does a data file fit a model? One trial forward pass, with errors in the user's terms.

:func:`check_fit` runs the model on two training samples and says, in one line, what does not
fit: the input width ("the model expects 64 input features; the data has 32"), the output shape,
or a label the model has no output for. The model's input width comes from its own description
(a :class:`~rankshrink.nn.encoder.TokenClassifier`'s spec) or from the first Linear layer the
forward calls, never from parsing torch's error text; a model where neither tells falls back to
the shapes and the model's own first line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rankshrink.errors import InputError
from rankshrink.io.data import Dataset
from rankshrink.nn.encoder import TokenClassifier


def check_fit(model: nn.Module, data: Dataset, path: Path) -> Tensor:
    """Run ``model`` on two training samples of ``data``; return its output ``(batch, outputs)``.

    Raises:
        InputError: the inputs' width or shape does not fit the model, the model does not return
            one ``(batch, outputs)`` tensor, or a label is out of range for its outputs.
    """
    x = data.x_train[:2]  # (2, features...)
    expected = spec_input_features(model)
    if expected is not None and x.shape[1:].numel() != expected:
        raise _width_error(expected, x, path)
    first: list[tuple[int, int]] = []  # (in_features, width given) of the first Linear called

    def record(module: nn.Module, args: tuple[Any, ...]) -> None:
        if not first and args and isinstance(args[0], Tensor) and args[0].dim() > 0:
            first.append((int(module.in_features), int(args[0].shape[-1])))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if _is_linear(m)]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # the model's own words are the fallback when no Linear told us
        _raise_if_width(first, x, path)
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise InputError(
            f"{path}: inputs of shape {tuple(x.shape[1:])} do not fit the model ({detail})"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
    # an index-gather layer (IndexedLinear) runs on a wider input without error: still refuse
    _raise_if_width(first, x, path)
    if not isinstance(out, Tensor) or out.dim() != 2:
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        raise InputError(f"the model's output has {got}; expected one tensor (batch, outputs)")
    if data.y_train is not None and data.y_test is not None:
        top = int(max(data.y_train.max(), data.y_test.max()))
        if top >= out.shape[-1]:
            raise InputError(
                f"{path}: label {top} is out of range for a model with {out.shape[-1]} outputs"
            )
    return out


def spec_input_features(model: nn.Module) -> int | None:
    """The input width a model's own description fixes, or None where only its Linear layers
    can tell (a :class:`TokenClassifier` reshapes its flat input before any Linear sees it)."""
    if isinstance(model, TokenClassifier):
        return model.config.tokens * model.config.token_dim
    return None


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear and rankshrink's Linear-shaped layers (IndexedLinear, LowRankLinear)."""
    width = getattr(module, "in_features", None)
    return isinstance(width, int) and not isinstance(width, bool)


def _raise_if_width(first: list[tuple[int, int]], x: Tensor, path: Path) -> None:
    """The first Linear was handed the data's own feature axis, of the wrong width."""
    if first and first[0][0] != first[0][1] and first[0][1] == x.shape[-1]:
        raise _width_error(first[0][0], x, path)


def _width_error(expected: int, x: Tensor, path: Path) -> InputError:
    if x.dim() == 2:
        has = f"the data has {x.shape[1]}"
    else:  # an extra axis: the width alone would mislead
        has = f"the data's samples have shape {tuple(x.shape[1:])}"
    return InputError(
        f"the model expects {expected} input features; {has} (x in {path});"
        f" pass x of shape (samples, {expected})"
    )
