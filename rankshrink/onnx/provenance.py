"""Does a file belong to a model? Its inputs and outputs, and the weights it records it came from.

:func:`check_belongs` compares the file's inputs and outputs with the model's (count, names where
they matter, feature and output widths): a file exported from another model is refused in one
line. ``compress`` stamps every file with fingerprints of its source weights and its own
(:func:`stamp_provenance`), which catches a file of another model with the same widths.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from rankshrink.errors import GateError, InputError


class ForeignFileError(GateError):
    """The ONNX file's inputs or outputs do not fit the model: it was exported from another
    model (exit 3)."""


#: Metadata a compressed file carries: the weights it was compressed from, and its own weights
#: (so that a ``--save-pt`` checkpoint of the compressed model belongs to it too).
#: Each is the first 16 hex digits of :func:`weights_sha256` (64 bits tell models apart; the
#: record stays small, since it counts against the not-smaller gate).
SOURCE_KEY = "rankshrink.source_sha256"
OWN_KEY = "rankshrink.sha256"


def weights_sha256(model: nn.Module) -> str:
    """A fingerprint of ``model``'s weights: sha256 over its state_dict's names, dtypes, shapes
    and bytes. A checkpoint saved again, or in another format, keeps it; other weights do not."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stamp_provenance(path: Path, source: nn.Module, compressed: nn.Module) -> int:
    """Record in the file which weights it was compressed from (and its own); return its bytes.

    The entries are deterministic (no time, no host), so the same run gives the same bytes.
    """
    model = onnx.load(str(path))
    for key, module in ((SOURCE_KEY, source), (OWN_KEY, compressed)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, weights_sha256(module)[:16]
    onnx.save(model, str(path))
    return path.stat().st_size


@dataclass
class Signature:
    """What a file says about itself: its inputs (name, dims; ``None`` for a dynamic dim), its
    outputs' dims, and its metadata (see :func:`stamp_provenance`)."""

    inputs: list[tuple[str, list[int | None]]]
    outputs: list[list[int | None]]
    metadata: dict[str, str]


def io_signature(path: Path) -> Signature:
    """Read a file's :class:`Signature` without running it.

    Raises:
        InputError: the file is not a readable ONNX model.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(
            f"{path} is not a readable ONNX model ({str(exc).splitlines()[0][:160]})"
        ) from None
    graph = model.graph

    def dims(value: onnx.ValueInfoProto) -> list[int | None]:
        shape = value.type.tensor_type.shape
        return [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]

    weights = {t.name for t in graph.initializer}  # old exporters list weights as inputs too
    return Signature(
        inputs=[(v.name, dims(v)) for v in graph.input if v.name not in weights],
        outputs=[dims(v) for v in graph.output],
        metadata={p.key: p.value for p in model.metadata_props},
    )


def check_belongs(
    path: Path,
    model: nn.Module,
    sample_shape: tuple[int, ...],
    output_shape: tuple[int, ...],
    input_names: tuple[str, ...] | None = None,
    output_what: str = "values",
) -> None:
    """Refuse a file that is not ``model``'s, before comparing numbers: its inputs or outputs do
    not fit the model, or it records (:func:`stamp_provenance`) that it was compressed from other
    weights. A file without that record (exported by other means) is judged by its widths, and
    then by the quality gates.

    Args:
        sample_shape: one input sample's shape as the model takes it (its last dim is the
            feature width).
        output_shape: one sample's output shape as the model gives it (its last dim: classes,
            1, hidden size).
        input_names: the inputs the file must take by name (token models); ``None``: one input,
            any name (the data is fed to the file's first input).
        output_what: what the output's last dim counts, for the message ("hidden features").

    Raises:
        ForeignFileError: ``<path> does not belong to this model: it takes 784 input features,
            the model takes 64`` (exit 3).
    """
    sig = io_signature(path)
    inputs, outputs = sig.inputs, sig.outputs
    names = [name for name, _ in inputs]
    problem = None
    if input_names is not None and sorted(names) != sorted(input_names):
        problem = f"it takes inputs {', '.join(names) or 'none'}, the model takes {', '.join(input_names)}"
    elif input_names is None and len(inputs) != 1:
        problem = f"it takes {len(inputs)} inputs ({', '.join(names)}), the model takes one"
    elif not outputs:
        problem = "it has no output"
    else:
        problem = _shape_problem(
            [d for _, d in inputs],
            sample_shape,
            outputs[0],
            output_shape,
            output_what,
            tokens=input_names is not None,
        )
    recorded = [sig.metadata[k] for k in (SOURCE_KEY, OWN_KEY) if k in sig.metadata]
    if not problem and recorded:
        ours = weights_sha256(model)[:16]
        if ours not in recorded:
            problem = (
                f"it was compressed from other weights (sha256 {recorded[0]}…;"
                f" this model's {ours}…)"
            )
    if problem:
        raise ForeignFileError(f"{path} does not belong to this model: {problem}")


def _shape_problem(
    in_dims: list[list[int | None]],
    sample_shape: tuple[int, ...],
    out_dims: list[int | None],
    output_shape: tuple[int, ...],
    output_what: str,
    tokens: bool,
) -> str | None:
    """The first way the file's dims (batch first) differ from one sample's shapes."""
    for dims in in_dims:
        if tokens:  # (batch, sequence): any length, so only the rank says anything
            if len(dims) != 2:
                return f"its token inputs have rank {len(dims)}, the model's have rank 2"
            continue
        if len(dims) != len(sample_shape) + 1:
            return (
                f"it takes inputs of shape {_shape(dims)}, the model takes"
                f" {_shape([None, *sample_shape])}"
            )
        if dims[-1] is not None and dims[-1] != sample_shape[-1]:
            return f"it takes {dims[-1]} input features, the model takes {sample_shape[-1]}"
    if len(out_dims) != len(output_shape) + 1:
        return (
            f"it outputs shape {_shape(out_dims)}, the model outputs"
            f" {_shape([None, *output_shape])}"
        )
    if out_dims[-1] is not None and out_dims[-1] != output_shape[-1]:
        return f"it outputs {out_dims[-1]} {output_what}, the model outputs {output_shape[-1]}"
    return None


def _shape(dims: list[int | None]) -> str:
    """``(batch, 8, ?)``: the first dim is the batch; ``?`` a dynamic dim."""
    shown = ["batch" if i == 0 else "?" if d is None else str(d) for i, d in enumerate(dims)]
    return "(" + ", ".join(shown) + ")"
