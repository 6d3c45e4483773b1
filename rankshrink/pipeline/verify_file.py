"""``rankshrink verify``: re-check an ONNX file against a model on a data file's held-out split.

Any model ``compress`` takes works here — a checkpoint (with ``--arch`` or ``--trust-pickle`` as
needed), a Hugging Face folder, or a ``--save-pt`` output (against its own ONNX): it is loaded and
adapted the same way, so the split, the task kind and the metrics are the ones ``compress`` used.
"""

from __future__ import annotations

from pathlib import Path

from rankshrink.errors import InputError
from rankshrink.onnx.task import Tolerances
from rankshrink.onnx.verify import Verification, verify_export
from rankshrink.pipeline.subject import load_subject


def verify_file(
    model: Path,
    onnx_path: Path,
    data: Path,
    tol: Tolerances,
    seed: int = 0,
    arch: str | None = None,
    trust_pickle: bool = False,
) -> Verification:
    """Check ``onnx_path`` against ``model`` (no compressed torch module: the file alone).

    Raises:
        InputError: bad model, data or file, or a gate flag that does not fit the model (exit 2).
        ForeignFileError, UntrustedGraphError: the file is not the model's, or cannot be
            vouched for (exit 3).
    """
    if not Path(onnx_path).is_file():
        raise InputError(f"ONNX file not found: {onnx_path}")
    subject = load_subject(Path(model), Path(data), arch, trust_pickle, seed)
    ds = subject.data
    task = subject.task(tol)
    return verify_export(
        subject.model, None, Path(onnx_path), ds.x_test, ds.y_test, tol, task, subject.io,
        weights=subject.loaded.model,
    )  # fmt: skip
