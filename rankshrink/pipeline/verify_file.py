"""``rankshrink verify`` for a Hugging Face folder: re-check a file against the folder's model."""

from __future__ import annotations

from pathlib import Path

from rankshrink.errors import InputError
from rankshrink.io.hf_folder import load_hf_folder
from rankshrink.io.token_data import load_for_encoder
from rankshrink.nn.token_encoder import TokenEncoder
from rankshrink.onnx.gates import Tolerances
from rankshrink.onnx.verify import Verification
from rankshrink.onnx.verify_tokens import TokenChecks, encoder_task, verify_tokens


def verify_folder(
    folder: Path,
    onnx_path: Path,
    data: Path,
    tol: Tolerances,
    seed: int = 0,
    arch: str | None = None,
    trust_pickle: bool = False,
) -> tuple[Verification, TokenChecks]:
    """``rankshrink verify FOLDER OUT.onnx --data FILE``: re-check an exported file against the
    folder's model on the data's held-out split (the split ``compress`` used with this seed).

    Raises:
        InputError: bad folder, data or file, ``--arch``/``--trust-pickle`` given, or a gate
            flag that does not fit the model (exit 2).
        ForeignFileError, UntrustedGraphError: see :func:`verify_tokens` (exit 3).
    """
    if arch is not None or trust_pickle:
        raise InputError(f"{folder} is a Hugging Face folder; drop --arch and --trust-pickle")
    if not onnx_path.is_file():
        raise InputError(f"ONNX file not found: {onnx_path}")
    encoder: TokenEncoder = load_hf_folder(folder).model  # type: ignore[assignment]
    ds = load_for_encoder(data, folder, encoder.config, seed)
    task = encoder_task(encoder, tol, ds.has_labels)
    return verify_tokens(
        encoder,
        None,
        onnx_path,
        ds.x_test,
        ds.y_test,
        tol,
        task,
        pad_id=encoder.config.pad_token_id,
    )
