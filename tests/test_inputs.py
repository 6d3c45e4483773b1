"""Bad input never produces a traceback: exit 2, one line naming the problem, nothing written.

Each case builds its inputs in a scratch directory, runs the CLI, and checks the exit code, that
the error is a single line, that no file appeared (temp files included) and that the inputs are
byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rankshrink.arch import make_checkpoint
from rankshrink.cli import app

runner = CliRunner()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _valid(d: Path) -> tuple[Path, Path]:
    torch.save(make_checkpoint(_model()), d / "model.pt")
    gen = np.random.default_rng(0)
    np.savez(d / "data.npz", x=gen.normal(size=(60, 8)).astype(np.float32), y=gen.integers(0, 3, 60))
    return d / "model.pt", d / "data.npz"


def _data(d: Path, **arrays: np.ndarray) -> Path:
    np.savez(d / "bad.npz", **arrays)
    return d / "bad.npz"


class Evil:
    """Unpickling this touches a canary file: proof that code from the file ran."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.canary,))


def _evil(d: Path) -> Path:
    torch.save({"state_dict": _model().state_dict(), "hook": Evil(d / "CANARY")}, d / "evil.pt")
    return d / "evil.pt"


def _pickled_module(d: Path) -> Path:
    torch.save(_model(), d / "module.pt")
    return d / "module.pt"


def _zip_without_data(d: Path) -> Path:
    with zipfile.ZipFile(d / "z.pt", "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    return d / "z.pt"


def _truncated(d: Path) -> Path:
    model, _ = _valid(d)
    blob = model.read_bytes()
    (d / "cut.pt").write_bytes(blob[: len(blob) // 2])
    return d / "cut.pt"


def _mismatched(d: Path) -> Path:
    ckpt = make_checkpoint(_model())
    ckpt["state_dict"]["0.weight"] = torch.zeros(16, 9)
    torch.save(ckpt, d / "mismatch.pt")
    return d / "mismatch.pt"


def _nan_weights(d: Path) -> Path:
    ckpt = make_checkpoint(_model())
    ckpt["state_dict"]["2.bias"][1] = float("nan")
    torch.save(ckpt, d / "nan.pt")
    return d / "nan.pt"


def _bare_state_dict(d: Path) -> Path:
    torch.save(_model().state_dict(), d / "sd.pt")
    return d / "sd.pt"


def _unknown_arch(d: Path) -> Path:
    ckpt = make_checkpoint(_model())
    ckpt["arch"]["layers"][1] = {"kind": "conv7d"}
    torch.save(ckpt, d / "arch.pt")
    return d / "arch.pt"


def _torchscript(d: Path) -> Path:
    torch.jit.save(torch.jit.script(_model()), d / "ts.pt")
    return d / "ts.pt"


def _write(name: str, blob: bytes) -> Callable[[Path], Path]:
    def make(d: Path) -> Path:
        (d / name).write_bytes(blob)
        return d / name

    return make


def _dir(d: Path) -> Path:
    (d / "folder").mkdir()
    return d / "folder"


rng = np.random.default_rng(1)
# (id, model maker or None for the valid one, data maker or None, extra args, expected words)
MODEL_CASES = [
    ("missing model", lambda d: d / "nope.pt", None, [], "not found"),
    ("empty model", _write("empty.pt", b""), None, [], "empty"),
    ("truncated model", _truncated, None, [], "not a readable"),
    ("random bytes model", _write("rand.pt", rng.bytes(4096)), None, [], "not a readable"),
    ("model is a directory", _dir, None, [], "directory"),
    ("zip without data", _zip_without_data, None, [], "not a readable"),
    ("state_dict without architecture", _bare_state_dict, None, [], "--arch"),
    ("architecture mismatch", _mismatched, None, [], "do not match"),
    ("NaN weights", _nan_weights, None, [], "NaN"),
    ("unknown layer kind", _unknown_arch, None, [], "unknown layer kind"),
    ("torchscript archive", _torchscript, None, [], "TorchScript"),
    ("pickled module", _pickled_module, None, [], "--trust-pickle"),
    ("bad --arch", _bare_state_dict, None, ["--arch", "no_such_module:make"], "cannot import"),
]
DATA_CASES = [
    ("missing data", None, lambda d: d / "nope.npz", [], "not found"),
    ("empty data", None, _write("e.npz", b""), [], "empty"),
    ("random bytes data", None, _write("r.npz", rng.bytes(2048)), [], "not a readable"),
    ("npz that is text", None, _write("t.npz", b"x,y\n1,2\n"), [], "not a readable"),
    ("unsupported data suffix", None, _write("d.csv", b"1,2"), [], "unsupported data format"),
    ("no x key", None, lambda d: _data(d, inputs=np.zeros((10, 8), np.float32)), [], "no array 'x'"),
    ("wrong width", None, lambda d: _data(d, x=np.zeros((20, 7), np.float32)), [], "do not fit"),
    ("object dtype", None, lambda d: _data(d, x=np.array([["a"] * 8] * 4, dtype=object)), [], "not a readable"),
    ("string dtype", None, lambda d: _data(d, x=np.array([["a"] * 8] * 4)), [], "dtype"),
    ("NaN data", None, lambda d: _data(d, x=np.full((20, 8), np.nan, np.float32)), [], "NaN"),
    ("labels out of range", None, lambda d: _data(d, x=np.zeros((20, 8), np.float32), y=np.full(20, 5)), [], "out of range"),
    ("negative labels", None, lambda d: _data(d, x=np.zeros((20, 8), np.float32), y=np.full(20, -1)), [], "negative"),
    ("fractional labels", None, lambda d: _data(d, x=np.zeros((20, 8), np.float32), y=np.full(20, 0.5)), [], "integer"),
    ("labels of the wrong length", None, lambda d: _data(d, x=np.zeros((20, 8), np.float32), y=np.zeros(7, np.int64)), [], "shape"),
    ("empty x", None, lambda d: _data(d, x=np.zeros((0, 8), np.float32)), [], "shape"),
    ("one sample", None, lambda d: _data(d, x=np.zeros((1, 8), np.float32)), [], "at least one"),
    ("overlapping split", None, lambda d: _data(d, x=np.zeros((10, 8), np.float32), train_idx=np.arange(6), test_idx=np.arange(5, 10)), [], "overlap"),
    ("split out of range", None, lambda d: _data(d, x=np.zeros((10, 8), np.float32), train_idx=np.arange(6), test_idx=np.arange(6, 12)), [], "outside"),
]
FLAG_CASES = [
    ("zero steps", None, None, ["--steps", "0"], "--steps"),
    ("negative steps", None, None, ["--steps", "-5"], "--steps"),
    ("tau-cos zero", None, None, ["--tau-cos", "0"], "--tau-cos"),
    ("tau-cos above one", None, None, ["--tau-cos", "2"], "--tau-cos"),
    ("negative tau-euc", None, None, ["--tau-euc", "-1"], "--tau-euc"),
    ("target ratio 1.5", None, None, ["--target-ratio", "1.5"], "--target-ratio"),
    ("negative lambda", None, None, ["--lambda-rank", "-1"], "--lambda"),
    ("zero batch", None, None, ["--batch-size", "0"], "--batch-size"),
    ("no data flag", None, None, ["--no-data-marker"], "--data"),
    ("out is not .onnx", None, None, ["--out", "{d}/x.txt"], ".onnx"),
    ("out equals model", None, None, ["--out", "{d}/m.onnx", "--save-pt", "{model}"], "inputs"),
    ("out is not .onnx but the model", None, None, ["--out", "{model}"], ".onnx"),
    ("report equals data", None, None, ["--report", "{data}"], "inputs"),
    ("out in a missing directory", None, None, ["--out", "{d}/missing/x.onnx"], "does not exist"),
    ("out exists", None, None, ["--out", "{d}/exists.onnx"], "--overwrite"),
]


def _files(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


@pytest.mark.parametrize(
    ("model_maker", "data_maker", "extra", "words"),
    [case[1:] for case in MODEL_CASES + DATA_CASES + FLAG_CASES],
    ids=[case[0] for case in MODEL_CASES + DATA_CASES + FLAG_CASES],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, model_maker: Callable | None, data_maker: Callable | None, extra: list[str], words: str
) -> None:
    model, data = _valid(tmp_path)
    if model_maker is not None:
        model = model_maker(tmp_path)
    if data_maker is not None:
        data = data_maker(tmp_path)
    (tmp_path / "exists.onnx").write_bytes(b"keep me")
    args = [a.format(d=tmp_path, model=model, data=data) for a in extra]
    base = ["compress", str(model)]
    if "--no-data-marker" in args:
        args.remove("--no-data-marker")
    else:
        base += ["--data", str(data)]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out.onnx")]
    before = _files(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = runner.invoke(app, [*base, *args, "--steps", "3", "--quiet"] if "--steps" not in args else [*base, *args, "--quiet"])
    finally:
        os.chdir(cwd)
    output = result.output.strip()
    assert result.exit_code == 2, f"exit {result.exit_code}, output:\n{output}\n{result.exception!r}"
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, f"expected one line, got:\n{output}"
    assert words.lower() in output.lower(), f"error should mention {words!r}: {output}"
    assert _files(tmp_path) == before, "files were written or inputs changed"


def test_hostile_pickle_never_runs_without_trust_pickle(tmp_path: Path) -> None:
    evil = _evil(tmp_path)
    _, data = _valid(tmp_path)
    for argv in (["compress", str(evil), "--data", str(data), "--out", str(tmp_path / "o.onnx")], ["inspect", str(evil)],
                 ["verify", str(evil), str(evil), "--data", str(data)]):
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, result.output
        assert "--trust-pickle" in result.output
        assert "pathlib" in result.output, f"refusal should name the globals: {result.output}"
        assert not (tmp_path / "CANARY").exists(), f"payload ran during {argv[0]}"
    # With the explicit flag the payload does run: the flag is the only door.
    result = runner.invoke(app, ["inspect", str(evil), "--trust-pickle"])
    assert (tmp_path / "CANARY").exists()
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_inspect_and_help(tmp_path: Path) -> None:
    model, _ = _valid(tmp_path)
    result = runner.invoke(app, ["inspect", str(model)])
    assert result.exit_code == 0, result.output
    assert "16×8" in result.output and "3×16" in result.output
    for argv in (["--help"], ["compress", "--help"], ["verify", "--help"], ["inspect", "--help"]):
        assert runner.invoke(app, argv).exit_code == 0


def test_trusted_pickled_module_compresses(tmp_path: Path) -> None:
    module = _pickled_module(tmp_path)
    _, data = _valid(tmp_path)
    result = runner.invoke(app, ["compress", str(module), "--data", str(data), "--trust-pickle", "--steps", "5",
                                 "--out", str(tmp_path / "m.onnx"), "-q", "--exporter", "torchscript"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.onnx").exists()


def test_stream_bytes_helper_is_a_real_file() -> None:
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    assert buf.getvalue()[:2] == b"PK"
