"""Low-precision storage for an exported file, through onnxruntime's own tools (no hand-written
quantizer): ``int8`` is ``quantize_dynamic`` with per-channel int8 weights, ``fp16`` is
``onnxruntime.transformers.float16`` with float32 inputs and outputs kept, so the quantized file
takes and returns exactly what the float file does and verification feeds it the same way.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import onnx

from rankshrink.onnx.export import ExportError, check_onnx, onnx_size, quiet

QUANTIZE_MODES = ("int8", "fp16")


def quantize_file(
    src: Path, dst: Path, mode: str, keep_float: Sequence[str] = (), only: Sequence[str] = ()
) -> int:
    """Write ``src`` stored at ``mode`` precision to ``dst``; return its bytes.

    Args:
        keep_float: names of nodes (:func:`weight_nodes`) left in float32.
        only: if given, the only nodes stored at ``mode`` (to measure one node's sensitivity).

    Raises:
        ValueError: an unknown mode.
        ExportError: the tool failed or its file does not pass the ONNX checker.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {QUANTIZE_MODES}, got {mode!r}")
    try:
        with quiet():
            if only:  # every other weight node stays float
                keep_float = [n for n in weight_nodes(src) if n not in set(only)]
            if mode == "int8":
                _int8(src, dst, list(keep_float))
            else:
                _fp16(src, dst, list(keep_float))
    except Exception as exc:  # the tools raise many unrelated types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"--quantize {mode} failed: {first}") from None
    check_onnx(dst)
    return onnx_size(dst)


def weight_nodes(path: Path) -> list[str]:
    """The nodes that read a weight (MatMul, Gemm, Gather with an initializer input), in graph
    order: what low precision stores, and what can be kept in float32."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm", "Gather") and any(i in weights for i in n.input)
    ]


def _int8(src: Path, dst: Path, keep_float: list[str]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("root").setLevel(logging.ERROR)  # its pre-processing hint is a warning
    with tempfile.TemporaryDirectory(prefix="rankshrink-q-") as tmp:
        # quantize_dynamic writes shape-inference files beside its output; keep them in tmp
        out = Path(tmp, "q.onnx")
        quantize_dynamic(
            src, out, per_channel=True, weight_type=QuantType.QInt8,
            # it rewrites a Gemm as MatMul + Add first, naming the MatMul after the Gemm
            nodes_to_exclude=[*keep_float, *(f"{n}_MatMul" for n in keep_float)] or None,
        )  # fmt: skip
        dst.write_bytes(out.read_bytes())


def _fp16(src: Path, dst: Path, keep_float: list[str]) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = convert_float_to_float16(
        onnx.load(str(src)), keep_io_types=True, node_block_list=keep_float or None
    )
    wrapped = OnnxModel(model)
    wrapped.topological_sort()  # the casts it adds for the kept inputs come last otherwise
    onnx.save(wrapped.model, str(dst))


__all__ = ["QUANTIZE_MODES", "ExportError", "quantize_file", "weight_nodes"]
