"""Errors a new user meets name the problem and the fix, in one line, with exit 2.

Three mistakes that used to surface as library internals:

- data of the wrong width (torch's ``mat1 and mat2 shapes cannot be multiplied``) — now "the
  model expects 64 input features; the data has 32 (x in FILE)", the width read from the model's
  spec or the first Linear its forward calls;
- a data file given as MODEL (``[enforce fail at inline_container.cc:180]``) — now "looks like a
  data file …; pass it as --data", told by content, whatever the file is named;
- an ``--arch`` module that is not importable from here (``No module named 'mymodel'``) — now
  where Python looked and how to make it look in the right place.

Each goes through ``compress``, ``verify`` and ``inspect`` (whichever take that input): exit 2,
one ``error:`` line on stderr, and nothing written in the run's tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.errors import InputError
from rankshrink.io.data import Dataset
from rankshrink.io.data_fit import check_fit
from rankshrink.nn.indexed import IndexedLinear
from rankshrink.onnx.export import ExportConfig, export_onnx

runner = CliRunner()
SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
MODELS = {"mlp": SAMPLES / "mlp_digits.pt", "transformer": SAMPLES / "transformer_digits.pt"}
DIGITS = SAMPLES / "digits.npz"


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A watched tree: ``inputs/`` for what a test builds, ``out/`` the run's cwd, ``tmp/`` its
    TMPDIR. Training and export fail loudly: every case here must stop while loading."""
    for name in ("inputs", "out", "tmp"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.chdir(tmp_path / "out")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ from --arch modules

    def reached(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("bad input reached fine-tuning or export")

    monkeypatch.setattr("rankshrink.pipeline.rare_stage.fine_tune_", reached)
    monkeypatch.setattr("rankshrink.pipeline.compress.export_onnx", reached)
    return tmp_path


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The samples exported as they are: a real OUT.onnx for ``verify`` to be handed."""
    from rankshrink.io.checkpoint import load_model

    root = tmp_path_factory.mktemp("onnx")
    files = {}
    for name, path in MODELS.items():
        files[name] = root / f"{name}.onnx"
        model = load_model(path).model
        export_onnx(model, torch.zeros(4, 64), files[name], ExportConfig(exporter="torchscript"))
    return files


def _tree(root: Path) -> dict[str, str]:
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            entries[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def _argv(command: str, model: Path, data: Path | None, ws: Path, onnx: Path | None) -> list[str]:
    if command == "compress":
        out = ws / "out"
        argv = ["compress", str(model), "--data", str(data), "--out", str(out / "m.onnx")]
        return [*argv, "--report", str(out / "m.json"), "--steps", "5", "--quiet"]
    if command == "verify":
        return ["verify", str(model), str(onnx), "--data", str(data)]
    return ["inspect", str(model)]


def _one_line(ws: Path, argv: list[str], *needles: str) -> str:
    """Run ``argv``; it must exit 2 with one error line holding every needle, writing nothing."""
    before = _tree(ws)
    result = runner.invoke(app, argv)
    shown = f"argv: {argv}\nexit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert result.exit_code == 2, shown
    assert "Traceback" not in result.output, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for needle in needles:
        assert needle in lines[0], f"missing {needle!r}\n{shown}"
    assert _tree(ws) == before, "a file was written"
    return lines[0]


# -- wrong data width --------------------------------------------------------------------------


def _narrow(ws: Path, width: int = 32) -> Path:
    with np.load(DIGITS) as npz:
        path = ws / "inputs" / "narrow.npz"
        np.savez(path, x=npz["x"][:, :width], y=npz["y"])
    return path


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("command", ["compress", "verify"])
def test_wrong_width_names_both_widths(
    ws: Path, onnx_files: dict[str, Path], command: str, model: str
) -> None:
    data = _narrow(ws)
    argv = _argv(command, MODELS[model], data, ws, onnx_files[model])
    line = _one_line(ws, argv, "the model expects 64 input features; the data has 32", str(data))
    assert "mat1" not in line and "cannot be multiplied" not in line


def _dataset(x: torch.Tensor) -> Dataset:
    return Dataset(x, x, None, None, "recorded")


class HeadFirst(nn.Module):
    """Registers its head before its body: the first Linear *called* is what counts."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.body = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_width_comes_from_the_first_linear_the_forward_calls() -> None:
    with pytest.raises(InputError, match="expects 8 input features; the data has 5"):
        check_fit(HeadFirst(), _dataset(torch.zeros(4, 5)), Path("d.npz"))
    assert check_fit(HeadFirst(), _dataset(torch.zeros(4, 8)), Path("d.npz")).shape == (2, 3)


def test_a_gather_layer_does_not_hide_a_wider_input() -> None:
    # IndexedLinear picks columns by index, so a wider x runs without error: refuse it anyway
    layer = IndexedLinear(
        torch.ones(2, 3), None, torch.tensor([[0], [3], [7]]), torch.ones(3, 1), in_features=8
    )
    model = nn.Sequential(layer)
    model(torch.zeros(2, 10))  # the silent case
    with pytest.raises(InputError, match="expects 8 input features; the data has 10"):
        check_fit(model, _dataset(torch.zeros(4, 10)), Path("d.npz"))


def test_an_extra_axis_is_named_with_the_sample_shape() -> None:
    with pytest.raises(InputError, match=r"expects 8 input features; the data's samples have"):
        check_fit(HeadFirst(), _dataset(torch.zeros(4, 8, 1)), Path("d.npz"))


class Reshaper(nn.Module):
    """Fails before any Linear sees the input: no width to name, so the generic line."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(x.shape[0], 3, 4)).mean(1)


def test_generic_fallback_when_the_width_cannot_be_known() -> None:
    with pytest.raises(InputError) as info:
        check_fit(Reshaper(), _dataset(torch.zeros(4, 10)), Path("d.npz"))
    message = str(info.value)
    assert "inputs of shape (10,) do not fit the model" in message and "\n" not in message
    assert check_fit(Reshaper(), _dataset(torch.zeros(4, 12)), Path("d.npz")).shape == (2, 2)


# -- a data file given as MODEL ----------------------------------------------------------------


def _data_files(ws: Path) -> dict[str, tuple[Path, str]]:
    """Data files in every format, some under a model's suffix: (path, what the line says)."""
    inputs = ws / "inputs"
    with np.load(DIGITS) as npz:
        x, y = torch.from_numpy(npz["x"]), torch.from_numpy(npz["y"])
    shutil.copy(DIGITS, inputs / "digits.npz")
    shutil.copy(DIGITS, inputs / "renamed.pt")  # the suffix lies; the content does not
    torch.save({"x": x, "y": y}, inputs / "data.pt")
    save_file({"x": x.contiguous(), "y": y.contiguous()}, str(inputs / "data.safetensors"))
    np.savez(inputs / "tokens.npz", input_ids=np.ones((4, 5), np.int64))
    return {
        "npz": (inputs / "digits.npz", "(.npz arrays x, y, train_idx, test_idx)"),
        "npz named .pt": (inputs / "renamed.pt", "(.npz arrays x, y, train_idx, test_idx)"),
        "pt": (inputs / "data.pt", "(.pt tensors x, y)"),
        "safetensors": (inputs / "data.safetensors", ".safetensors tensors"),
        "token npz": (inputs / "tokens.npz", "(.npz arrays input_ids)"),
    }


@pytest.mark.parametrize("kind", ["npz", "npz named .pt", "pt", "safetensors", "token npz"])
@pytest.mark.parametrize("command", ["compress", "verify", "inspect"])
def test_data_file_as_model_says_so(
    ws: Path, onnx_files: dict[str, Path], command: str, kind: str
) -> None:
    path, what = _data_files(ws)[kind]
    argv = _argv(command, path, DIGITS, ws, onnx_files["mlp"])
    line = _one_line(ws, argv, str(path), "looks like a data file", what, "pass it as --data")
    assert "enforce fail" not in line and "inline_container" not in line


def test_other_array_files_as_model(ws: Path) -> None:
    inputs = ws / "inputs"
    np.save(inputs / "x.npy", np.zeros((3, 4), np.float32))
    np.savez(inputs / "weights.npz", fc=np.zeros((3, 4), np.float32))
    save_file({"0.weight": torch.zeros(3, 4)}, str(inputs / "weights.safetensors"))
    _one_line(ws, ["inspect", str(inputs / "x.npy")], "NumPy array file, not a model")
    _one_line(ws, ["inspect", str(inputs / "weights.npz")], "NumPy archive, not a model")
    _one_line(
        ws,
        ["inspect", str(inputs / "weights.safetensors")],
        "safetensors file of bare tensors (0.weight)",
        "Hugging Face folder",
    )


def test_checkpoint_as_data_says_so(ws: Path) -> None:
    argv = _argv("compress", MODELS["mlp"], MODELS["transformer"], ws, None)
    _one_line(ws, argv, "looks like a model checkpoint, not a data file", "as MODEL")


# -- --arch modules that do not import ---------------------------------------------------------


@pytest.fixture
def bare(ws: Path) -> tuple[Path, str]:
    """A bare state_dict in ``inputs/`` and a fresh module name whose file builds its model."""
    torch.manual_seed(0)
    build = "nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))"
    name = f"rs_arch_{uuid.uuid4().hex[:8]}"  # unique: nothing cached in sys.modules
    source = f"from torch import nn\n\n\ndef build():\n    return {build}\n"
    (ws / "inputs" / f"{name}.py").write_text(source)
    state = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).state_dict()
    torch.save(state, ws / "inputs" / "bare.pt")
    return ws / "inputs" / "bare.pt", name


@pytest.mark.parametrize("command", ["compress", "verify", "inspect"])
def test_arch_module_not_found_says_where_it_looked(
    ws: Path, onnx_files: dict[str, Path], bare: tuple[Path, str], command: str
) -> None:
    model, name = bare
    argv = [*_argv(command, model, DIGITS, ws, onnx_files["mlp"]), "--arch", f"{name}:build"]
    _one_line(
        ws,
        argv,
        f"no module '{name}'",
        f"current directory ({ws / 'out'})",
        "PYTHONPATH (not set)",
        f"run from the directory that holds {name}.py, or set PYTHONPATH",
        f"it is beside the model: PYTHONPATH={ws / 'inputs'}",
    )


def test_arch_not_found_lists_pythonpath(
    ws: Path, bare: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, name = bare
    monkeypatch.setenv("PYTHONPATH", str(ws / "tmp"))
    line = _one_line(ws, ["inspect", str(model), "--arch", f"{name}:build"], f"no module '{name}'")
    assert f"PYTHONPATH ({ws / 'tmp'})" in line


def test_arch_found_on_the_path_loads(
    ws: Path, bare: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, name = bare
    monkeypatch.syspath_prepend(str(ws / "inputs"))  # what PYTHONPATH=inputs does at startup
    result = runner.invoke(app, ["inspect", str(model), "--arch", f"{name}:build"])
    assert result.exit_code == 0, result.output
    assert "state_dict+arch" in result.output


def test_arch_given_as_a_path(ws: Path, bare: tuple[Path, str]) -> None:
    model, name = bare
    argv = ["inspect", str(model), "--arch", f"../inputs/{name}.py:build"]
    _one_line(ws, argv, "not a file", f"--arch {name}:build", "PYTHONPATH=../inputs")


@pytest.mark.parametrize(
    "source, needles",
    [
        ("import rs_not_installed_zz\n", ("imports 'rs_not_installed_zz', which is not",)),
        ("def build(:\n", ("raised SyntaxError",)),
        ("raise RuntimeError('no GPU here')\n", ("raised RuntimeError", "no GPU here")),
        ("x = 1\n", ("has no function 'build'",)),
    ],
    ids=["missing dependency", "syntax error", "raises at import", "no factory"],
)
def test_arch_module_that_fails_to_import(
    ws: Path, monkeypatch: pytest.MonkeyPatch, source: str, needles: tuple[str, ...]
) -> None:
    name = f"rs_arch_{uuid.uuid4().hex[:8]}"
    (ws / "tmp" / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(ws / "tmp"))
    torch.save(nn.Linear(64, 10).state_dict(), ws / "inputs" / "bare.pt")
    _one_line(ws, ["inspect", str(ws / "inputs" / "bare.pt"), "--arch", f"{name}:build"], *needles)
