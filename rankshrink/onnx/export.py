"""The ONNX boundary, export side: torch module -> checked ``.onnx`` file.

The exporter is chosen explicitly: ``"dynamo"`` (``torch.export``-based, the supported one since
torch 2.9) or ``"torchscript"`` (the legacy exporter, deprecated upstream). Both get a dynamic batch
axis and a fixed opset, and the result passes ``onnx.checker`` with ``full_check=True``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from rankshrink.errors import RankshrinkError, UnsupportedModelError
from rankshrink.models.io_spec import FEATURES, ModelIO

EXPORTERS = ("dynamo", "torchscript")

#: Weights beyond this many bytes make torch's exporters write ONNX external-data files beside
#: the model (protobuf cannot hold 2 GB in one message). rankshrink writes single-file ONNX only:
#: its outputs are staged, renamed, sized and gated as one file each.
SINGLE_FILE_LIMIT = 1536 * 1024 * 1024


class ExportError(RankshrinkError):
    """The exporter failed or produced a model that does not pass the ONNX checker."""

    exit_code = 3


@dataclass(frozen=True)
class ExportConfig:
    """How to export."""

    exporter: str = "dynamo"
    opset: int = 18


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    cfg: ExportConfig,
    io: ModelIO = FEATURES,
) -> int:
    """Export ``model`` (eval mode) to ``path`` with ``io``'s names and dynamic axes; return the
    file's bytes.

    Args:
        model: takes ``x`` as the training loop feeds it (``io.exported`` picks the module the
            file computes: a token encoder's three-input forward).
        example: a few samples of ``x``; a batch of 1 is repeated (torch.export specializes a
            size of 1 to a constant), so is a token length of 1 impossible (≥ 2 required).

    Raises:
        ExportError: the exporter failed or the checker rejected the result.
    """
    if cfg.exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {cfg.exporter!r}")
    module = io.exported(model).eval()
    if example.shape[0] < 2:
        example = example.repeat(2, *([1] * (example.dim() - 1)))
    args = io.args(example)
    axes = io.dynamic_axes()
    try:
        with quiet(), torch.no_grad():
            if cfg.exporter == "dynamo":
                dims = {i: torch.export.Dim(name) for i, name in axes.items()}
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    opset_version=cfg.opset,
                    input_names=list(io.inputs),
                    output_names=[io.output],
                    dynamic_shapes=tuple(dims for _ in io.inputs),
                    verbose=False,
                    optimize=True,
                )
                program.save(str(path))
            else:
                dynamic = {name: axes for name in io.inputs}
                # a hidden state keeps the sequence axis; logits and features have batch only
                dynamic[io.output] = axes if io.output == "last_hidden_state" else {0: "batch"}
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=cfg.opset,
                    input_names=list(io.inputs),
                    output_names=[io.output],
                    dynamic_axes=dynamic,
                )
    except Exception as exc:  # the exporters raise many unrelated types
        raise ExportError(f"ONNX export ({cfg.exporter}) failed: {_first(exc)}") from None
    refuse_external_data(path)
    _strip_metadata(path)
    check_onnx(path)
    return onnx_size(path)


def check_single_file(model: nn.Module) -> None:
    """Refuse a model whose weights are too big for a single-file ONNX export (before training).

    Raises:
        UnsupportedModelError: the parameters and buffers exceed :data:`SINGLE_FILE_LIMIT`.
    """
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if size > SINGLE_FILE_LIMIT:
        raise UnsupportedModelError(
            f"the model holds {size / 2**30:.2f} GiB of weights; rankshrink writes single-file"
            f" ONNX, which holds at most {SINGLE_FILE_LIMIT / 2**30:.1f} GiB (larger exports need"
            " external-data files, not supported yet)"
        )


def refuse_external_data(path: Path) -> None:
    """Refuse an export that put weights in external-data files beside ``path``.

    Raises:
        ExportError: some initializer lives outside the ``.onnx`` file.
    """
    model = onnx.load(str(path), load_external_data=False)
    external = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    if external:
        raise ExportError(
            f"the exporter stored {len(external)} weight tensors in external-data files (a model"
            " over the single-file ONNX limit); rankshrink writes single-file ONNX only"
        )


def _strip_metadata(path: Path) -> None:
    """Drop doc strings and per-node metadata (source locations): they are not part of the
    computation, differ between machines and can be most of a small model's file."""
    model = onnx.load(str(path))
    for graph in (model.graph,):
        graph.doc_string = ""
        for node in graph.node:
            node.doc_string = ""
            del node.metadata_props[:]
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            value.doc_string = ""
            del value.metadata_props[:]
    for func in model.functions:
        for node in func.node:
            node.doc_string = ""
            del node.metadata_props[:]
    model.doc_string = ""
    del model.metadata_props[:]
    onnx.save(model, str(path))


def check_onnx(path: Path) -> None:
    """Run the full ONNX checker (with shape inference) on a file."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"exported model fails onnx.checker: {_first(exc)}") from None


def onnx_size(path: Path) -> int:
    """Bytes of an ONNX model including any external-data files beside it."""
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    seen: set[str] = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.add(entry.value)
                total += (path.parent / entry.value).stat().st_size
    return total


@contextlib.contextmanager
def quiet():
    """Silence the exporters' progress prints, warnings and logging."""
    loggers = [
        logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


__all__ = [
    "EXPORTERS",
    "SINGLE_FILE_LIMIT",
    "ExportConfig",
    "ExportError",
    "check_onnx",
    "check_single_file",
    "export_onnx",
    "onnx_size",
    "refuse_external_data",
]
