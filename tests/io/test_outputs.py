"""Writing results: staged and renamed as a whole, and single-file ONNX only.

The refusals of bad output paths (an input, a symlink to one, a missing directory, an existing
file without ``--overwrite``) are cases of the table in ``test_inputs.py``; interrupts during the
renames are in ``test_interrupts.py``.
"""

from __future__ import annotations

import os
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.io import outputs
from rankshrink.io.outputs import write_all
from rankshrink.models.arch import make_checkpoint
from rankshrink.onnx import export as onnx_export
from rankshrink.onnx.export import ExportConfig, ExportError, export_onnx, refuse_external_data


def test_write_all_failing_rename_removes_what_it_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "old.json").write_bytes(b"old")
    files = {tmp_path / "new.onnx": b"A", tmp_path / "other.onnx": b"B"}
    real_replace = os.replace

    def fail_second(src: str, dst: Path) -> None:
        if Path(dst).name == "other.onnx":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    # only the outputs module sees the failing rename
    fake_os = types.SimpleNamespace(**{**vars(os), "replace": fail_second})
    monkeypatch.setattr(outputs, "os", fake_os)
    with pytest.raises(OSError, match="No space"):
        write_all(files)
    assert sorted(os.listdir(tmp_path)) == ["old.json"], "a new file or a temp file was left"


def test_write_all_replaces_existing_files_whole(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_bytes(b"old and longer")
    write_all({tmp_path / "a.json": b"new", tmp_path / "a.onnx": b"onnx"})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == {
        "a.json": b"new",
        "a.onnx": b"onnx",
    }


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_onnx_with_external_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(_tiny(), torch.randn(4, 8), path, ExportConfig())
    refuse_external_data(path)  # a single-file export passes

    model = onnx.load(str(path))
    onnx.save(
        model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0
    )
    assert (tmp_path / "m.onnx.data").exists()
    with pytest.raises(ExportError, match="external-data"):
        refuse_external_data(path)


def test_an_export_that_writes_external_data_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's dynamo exporter writes external data above a size threshold; pretend a tiny
    model is over it, as a >1.5 GB one would be."""
    program = pytest.importorskip("torch.onnx._internal.exporter._onnx_program")
    if not hasattr(program, "_LARGE_MODEL_THRESHOLD"):
        pytest.skip("this torch decides external data differently")
    monkeypatch.setattr(program, "_LARGE_MODEL_THRESHOLD", 0)
    with pytest.raises(ExportError, match="external-data files"):
        export_onnx(_tiny(), torch.randn(4, 8), tmp_path / "m.onnx", ExportConfig())


def test_models_over_the_single_file_limit_are_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = tmp_path / "m.pt", tmp_path / "d.npz"
    torch.save(make_checkpoint(_tiny()), model)
    gen = np.random.default_rng(0)
    np.savez(data, x=gen.normal(size=(40, 8)).astype(np.float32), y=np.arange(40) % 3)
    monkeypatch.setattr(onnx_export, "SINGLE_FILE_LIMIT", 100)  # the tiny model has 780 bytes

    def never(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("fine-tuning started")

    monkeypatch.setattr("rankshrink.pipeline.rare_stage.fine_tune_", never)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(
        app, ["compress", str(model), "--data", str(data), "--out", str(out), "-q"]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "single-file" in lines[0] and "GiB" in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npz", "m.pt"]
