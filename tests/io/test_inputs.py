"""Bad input to the ``rankshrink`` CLI never produces a traceback.

For every malformed model, data file or flag, ``rankshrink compress`` must exit with code 2, print
exactly one ``error: `` line on stderr that names the offending file or flag, and give up before any
fine-tuning or ONNX export starts (both are patched to fail loudly here). Nothing may be written,
removed or changed in the case's scratch tree — not even a temp file, since the run's temp dir is
redirected into it::

    inputs/   model.pt, data.npz and the bad files a case builds
    out/      the working directory of the run; --out points here
    systmp/   TMPDIR of the run

Hostile pickles must never run without ``--trust-pickle``; a few good inputs check the happy path.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.models.arch import make_checkpoint
from rankshrink.nn.indexed import IndexedLinear

runner = CliRunner()


def _tiny_module() -> nn.Sequential:
    """An untrained, seeded 8 → 16 → 3 ReLU MLP in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


@dataclass
class Workspace:
    root: Path  # the watched tree: inputs/, out/, systmp/
    inputs: Path  # the valid model.pt and data.npz, and whatever bad files a case writes
    out: Path  # cwd of the run and home of --out
    model: Path
    data: Path


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    inputs, out, systmp = tmp_path / "inputs", tmp_path / "out", tmp_path / "systmp"
    for folder in (inputs, out, systmp):
        folder.mkdir()
    torch.save(make_checkpoint(_tiny_module()), inputs / "model.pt")
    gen = np.random.default_rng(0)
    np.savez(
        inputs / "data.npz",
        x=gen.normal(size=(60, 8)).astype(np.float32),
        y=gen.integers(0, 3, size=60).astype(np.int64),
    )
    monkeypatch.setenv("TMPDIR", str(systmp))  # leaked temp files land in the watched tree
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    monkeypatch.chdir(out)  # the default --out is ./<model>.rankshrink.onnx
    return Workspace(tmp_path, inputs, out, inputs / "model.pt", inputs / "data.npz")


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (hidden ones too): sha256 for files, link target for symlinks."""
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                entries[rel] = f"symlink -> {os.readlink(path)}"
            elif path.is_dir():
                entries[rel] = "dir"
            else:
                entries[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


# ---------------------------------------------------------------------------------------------
# Makers: each writes one bad input into ws.inputs and returns its path.

Maker = Callable[[Workspace], Path]


def missing(name: str) -> Maker:
    return lambda w: w.inputs / name


def raw(name: str, blob: bytes) -> Maker:
    def make(w: Workspace) -> Path:
        (w.inputs / name).write_bytes(blob)
        return w.inputs / name

    return make


def directory(name: str) -> Maker:
    def make(w: Workspace) -> Path:
        (w.inputs / name).mkdir()
        return w.inputs / name

    return make


def truncated(w: Workspace) -> Path:
    blob = w.model.read_bytes()
    return raw("truncated.pt", blob[: len(blob) // 2])(w)


def zip_without_data(w: Workspace) -> Path:
    with zipfile.ZipFile(w.inputs / "nodata.pt", "w") as zf:
        zf.writestr("archive/readme.txt", "no data.pkl in here")
    return w.inputs / "nodata.pt"


def torchscript(w: Workspace) -> Path:
    torch.jit.save(torch.jit.script(_tiny_module()), w.inputs / "scripted.pt")
    return w.inputs / "scripted.pt"


def saved(name: str, build: Callable[[dict[str, Any]], Any]) -> Maker:
    """torch.save ``build(valid checkpoint dict)`` (pickles anything: weights_only is a load flag)."""

    def make(w: Workspace) -> Path:
        torch.save(build(torch.load(w.model, weights_only=True)), w.inputs / name)
        return w.inputs / name

    return make


def edited(name: str, edit: Callable[[dict[str, Any]], None]) -> Maker:
    """The valid checkpoint with ``edit`` applied in place."""

    def build(ckpt: dict[str, Any]) -> dict[str, Any]:
        edit(ckpt)
        return ckpt

    return saved(name, build)


def _set_weight(ckpt: dict[str, Any], key: str, value: torch.Tensor) -> None:
    ckpt["state_dict"][key] = value


def _nan_bias(ckpt: dict[str, Any]) -> None:
    ckpt["state_dict"]["2.bias"][1] = float("nan")


def npz(name: str = "bad.npz", **arrays: np.ndarray) -> Maker:
    def make(w: Workspace) -> Path:
        np.savez(w.inputs / name, **arrays)
        return w.inputs / name

    return make


def pt_data(name: str, obj: Any) -> Maker:
    def make(w: Workspace) -> Path:
        torch.save(obj, w.inputs / name)
        return w.inputs / name

    return make


def legacy_module(w: Workspace) -> Path:
    """A full nn.Module in torch's pre-1.6 (non-zip) format: pickles back to back."""
    torch.save(_tiny_module(), w.inputs / "legacy.pt", _use_new_zipfile_serialization=False)
    return w.inputs / "legacy.pt"


def plain_pickle_module(w: Workspace) -> Path:
    """A full nn.Module written with pickle.dump, not torch.save."""
    (w.inputs / "module.pkl").write_bytes(pickle.dumps(_tiny_module(), protocol=4))
    return w.inputs / "module.pkl"


def indexed(name: str, edit: Callable[[dict[str, Any]], None]) -> Maker:
    """A checkpoint of an 8 -> 3 IndexedLinear model (segment-sum to 4, core 3x4), edited."""

    def make(w: Workspace) -> Path:
        layer = IndexedLinear(
            torch.randn(3, 4),
            torch.zeros(3),
            in_index=torch.arange(8).view(4, 2),
            in_scale=torch.ones(4, 2),
            in_features=8,
        )
        ckpt = make_checkpoint(nn.Sequential(layer))
        edit(ckpt)
        torch.save(ckpt, w.inputs / name)
        return w.inputs / name

    return make


def _wider_core(ckpt: dict[str, Any]) -> None:
    ckpt["arch"]["layers"][0]["core"] = [3, 5]  # 5 columns fed by 4 index groups
    ckpt["state_dict"]["0.weight"] = torch.zeros(3, 5)


def _rename_key(ckpt: dict[str, Any]) -> None:
    ckpt["state_dict"]["0.W"] = ckpt["state_dict"].pop("0.weight")


def safetensors_file(name: str, **tensors: torch.Tensor) -> Maker:
    def make(w: Workspace) -> Path:
        from safetensors.torch import save_file

        save_file(tensors, str(w.inputs / name))
        return w.inputs / name

    return make


def truncated_data(w: Workspace) -> Path:
    blob = w.data.read_bytes()
    return raw("truncated.npz", blob[: len(blob) // 2])(w)


def zip_named_npz(w: Workspace) -> Path:
    with zipfile.ZipFile(w.inputs / "readme.npz", "w") as zf:
        zf.writestr("readme.txt", "no arrays in here")
    return w.inputs / "readme.npz"


X = np.random.default_rng(1).normal(size=(60, 8)).astype(np.float32)
Y = np.arange(60, dtype=np.int64) % 3
NOISE = np.random.default_rng(2).bytes(4096)

# ---------------------------------------------------------------------------------------------
# The table. ``expect``: substrings the error line must contain (case-insensitive; "{model}" and
# "{data}" are the full paths the run was given, "{out}" the run's directory). ``flags`` are added
# to ``compress MODEL --data DATA --out out/OUT.onnx --steps 5 --quiet`` and replace those
# defaults when they name the same option (an empty value drops it).

NO_DATA = "no --data"


@dataclass(frozen=True)
class Case:
    expect: tuple[str, ...]
    model: Maker | None = None
    data: Maker | str | None = None
    flags: tuple[str, ...] = ()
    setup: Callable[[Workspace], None] | None = None


def case(
    id: str, *expect: str, marks: Any = (), **kw: Any
) -> Any:  # -> pytest.param, typed loosely for readability of the table
    return pytest.param(Case(expect, **kw), id=id, marks=marks)


def defect(reason: str) -> pytest.MarkDecorator:
    """A known defect in the package; strict, so a fix turns it red and the mark must go."""
    return pytest.mark.xfail(reason=reason, strict=True)


MODEL_CASES = [
    case("model missing", "{model}", "not found", model=missing("missing.pt")),
    case("model empty", "{model}", "empty", model=raw("empty.pt", b"")),
    case("model truncated", "{model}", "not a readable", model=truncated),
    case("model random bytes", "{model}", "not a readable", model=raw("noise.pt", NOISE)),
    case("model is a directory", "{model}", "directory", model=directory("ckpt_dir")),
    case("model zip without data", "{model}", "not a readable", model=zip_without_data),
    case(
        "model is a TorchScript archive",
        "{model}",
        "TorchScript",
        model=torchscript,
        marks=pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
    ),
    case(
        "state_dict without --arch",
        "{model}",
        "--arch",
        model=saved("bare.pt", lambda c: c["state_dict"]),
    ),
    case(
        "weights do not match the arch",
        "{model}",
        "do not match",
        model=edited("shape.pt", lambda c: _set_weight(c, "0.weight", torch.zeros(16, 9))),
    ),
    case("NaN weights", "{model}", "2.bias", "NaN", model=edited("nan.pt", _nan_bias)),
    case(
        "pickled nn.Module without --trust-pickle",
        "{model}",
        "--trust-pickle",
        "torch.nn.modules",  # names the globals it would import
        model=saved("module.pt", lambda c: _tiny_module()),
    ),
    case(
        "checkpoint is a bare tensor",
        "{model}",
        "Tensor",
        model=saved("tensor.pt", lambda c: torch.zeros(3)),
    ),
    case(
        "unknown layer kind",
        "{model}",
        "unknown layer kind",
        "conv7d",
        model=edited("kind.pt", lambda c: c["arch"]["layers"].__setitem__(1, {"kind": "conv7d"})),
    ),
    case(
        "state_dict entry is a list",
        "{model}",
        model=saved("sdlist.pt", lambda c: {"state_dict": [1, 2]}),
    ),
    case(
        "state_dict entry is a tensor",
        "{model}",
        model=saved("sdtensor.pt", lambda c: {"state_dict": torch.zeros(3)}),
    ),
    case(
        "state_dict with a non-string key",
        "{model}",
        model=edited("intkey.pt", lambda c: c["state_dict"].__setitem__(5, torch.zeros(1))),
    ),
    case(
        "arch layer spec missing keys",
        "{model}",
        "architecture",
        model=edited(
            "partial.pt", lambda c: c["arch"]["layers"].__setitem__(0, {"kind": "indexed_linear"})
        ),
    ),
    case(
        "arch layer too big to allocate",
        "{model}",
        "architecture",
        model=edited(  # 2**62 elements: torch refuses before allocating anything
            "huge.pt",
            lambda c: c["arch"]["layers"][0].update(in_features=2**31, out_features=2**31),
        ),
    ),
    case(
        "arch size overflows int64",
        "{model}",
        model=edited("overflow.pt", lambda c: c["arch"]["layers"][0].update(in_features=10**30)),
    ),
    case(
        "model path with [v2] in its name",
        "{model}",
        "not found",
        model=missing("model[v2].pt"),
    ),
    case(
        "model path with a [/closing] tag in its name",
        "{model}",
        "not found",
        model=missing("old[/closing].pt"),
    ),
]

DATA_CASES = [
    case("data missing", "{data}", "not found", data=missing("missing.npz")),
    case("data empty", "{data}", "empty", data=raw("empty.npz", b"")),
    case("data random bytes", "{data}", "not a readable", data=raw("noise.npz", NOISE)),
    case("data is a directory", "{data}", "directory", data=directory("data_dir")),
    case(
        "npz that is a text file",
        "{data}",
        "not a readable",
        data=raw("text.npz", b"x,y\n0.1,1\n0.2,0\n"),
    ),
    case(
        "data suffix .csv",
        "{data}",
        "unsupported data format",
        data=raw("data.csv", b"x,y\n0.1,1\n0.2,0\n"),
    ),
    case("data without x", "{data}", "no array 'x'", "found: inputs, y", data=npz(inputs=X, y=Y)),
    case(
        "data 7 features for 8 inputs",
        "{data}",
        "expects 8 input features; the data has 7",
        data=npz(x=X[:, :7], y=Y),
    ),
    case("x with no samples", "{data}", "'x'", "shape", data=npz(x=np.zeros((0, 8), np.float32))),
    case(
        "x of dtype object (needs pickle)",
        "{data}",
        "not a readable",
        "allow_pickle",
        data=npz(x=np.array([["a"] * 8] * 60, dtype=object), y=Y),
    ),
    case("x of strings", "{data}", "'x'", "dtype", data=npz(x=np.array([["a"] * 8] * 60), y=Y)),
    case(
        "NaN in x",
        "{data}",
        "'x'",
        "NaN",
        data=npz(x=np.where(np.eye(60, 8) > 0, np.nan, X), y=Y),
    ),
    case(
        "Inf in x",
        "{data}",
        "'x'",
        "Inf",
        data=npz(x=np.where(np.eye(60, 8) > 0, np.inf, X), y=Y),
    ),
    case(
        "label 5 for a 3-output model",
        "{data}",
        "label 5",
        "out of range",
        data=npz(x=X, y=np.where(np.arange(60) == 7, 5, Y)),
    ),
    case("negative labels", "{data}", "'y'", "negative", data=npz(x=X, y=np.where(Y == 2, -1, Y))),
    case("fractional labels", "{data}", "'y'", "integer", data=npz(x=X, y=np.full(60, 0.5))),
    case("7 labels for 60 samples", "{data}", "'y'", "shape", data=npz(x=X, y=Y[:7])),
    case("one sample only", "{data}", "at least one", data=npz(x=X[:1])),
    case(
        ".pt data with non-string keys",
        "{data}",
        "no array 'x'",
        data=pt_data("intkeys.pt", {1: torch.zeros(60, 8)}),
    ),
    case(
        "sparse x",
        "{data}",
        "'x'",
        "dense",
        data=pt_data("sparse.pt", {"x": torch.from_numpy(X).to_sparse(), "y": torch.from_numpy(Y)}),
    ),
    case(
        "meta-device x (no data)",
        "{data}",
        "'x'",
        "dense",
        data=pt_data("meta.pt", {"x": torch.empty(60, 8, device="meta")}),
    ),
    case(
        "boolean masks as split indices",
        "{data}",
        "'train_idx'",
        "integer",
        data=npz(x=X, y=Y, train_idx=np.arange(60) < 48, test_idx=np.arange(60) >= 48),
    ),
    case(
        "train and test split overlap",
        "{data}",
        "overlap",
        data=npz(x=X, y=Y, train_idx=np.arange(48), test_idx=np.arange(40, 60)),
    ),
    case(
        "split index beyond the samples",
        "{data}",
        "'test_idx'",
        "outside",
        data=npz(x=X, y=Y, train_idx=np.arange(48), test_idx=np.arange(48, 70)),
    ),
]

FLAG_CASES = [
    case("compress without --data", "--data", data=NO_DATA),
    case("zero steps", "--steps", flags=("--steps", "0")),
    case("negative steps", "--steps", flags=("--steps", "-5")),
    case("zero batch size", "--batch-size", flags=("--batch-size", "0")),
    case("tau-cos 0", "--tau-cos", flags=("--tau-cos", "0")),
    case("tau-cos 2", "--tau-cos", flags=("--tau-cos", "2")),
    case("tau-cos NaN", "--tau-cos", flags=("--tau-cos", "nan")),
    case("negative tau-euc", "--tau-euc", flags=("--tau-euc", "-1")),
    case("target ratio 1.5", "--target-ratio", flags=("--target-ratio", "1.5")),
    case("negative lambda-rank", "--lambda-rank", flags=("--lambda-rank", "-1")),
    case("seed beyond 64 bits", "--seed", flags=("--seed", str(2**70))),
    case("max-accuracy-drop NaN", "--max-accuracy-drop", flags=("--max-accuracy-drop", "nan")),
    case("learning rate inf", "--lr", flags=("--lr", "inf")),
    case(
        "--arch module that cannot be imported",
        "--arch",
        "no_such_module",
        "current directory",
        "PYTHONPATH",
        model=saved("bare.pt", lambda c: c["state_dict"]),
        flags=("--arch", "no_such_module:make"),
    ),
    case(
        "--arch factory that raises",
        "--arch",
        "json:loads",
        model=saved("bare.pt", lambda c: c["state_dict"]),
        flags=("--arch", "json:loads"),  # importable, but calling loads() raises TypeError
    ),
]

OUTPUT_CASES = [
    case("--out not ending in .onnx", "--out", ".onnx", flags=("--out", "{out}/OUT.txt")),
    case("--out is the model", "--out", ".onnx", "{model}", flags=("--out", "{model}")),
    case("--out is the data", "--out", ".onnx", "{data}", flags=("--out", "{data}")),
    case("--report is the model", "{model}", "one of the inputs", flags=("--report", "{model}")),
    case("--report is the data", "{data}", "one of the inputs", flags=("--report", "{data}")),
    case("--save-pt is the model", "{model}", "one of the inputs", flags=("--save-pt", "{model}")),
    case(
        "--out is a symlink to the model",
        "{out}/link.onnx",
        "one of the inputs",
        flags=("--out", "{out}/link.onnx"),
        setup=lambda w: (w.out / "link.onnx").symlink_to(w.model),
    ),
    case("--out twice", "{out}/OUT.onnx", "named twice", flags=("--report", "{out}/OUT.onnx")),
    case(
        "--out in a missing directory",
        "{out}/nope",
        "does not exist",
        flags=("--out", "{out}/nope/OUT.onnx"),
    ),
    case("--out under a file", "{model}", "does not exist", flags=("--out", "{model}/OUT.onnx")),
    case(
        "--out is a directory",
        "{out}/dir.onnx",
        "directory",
        flags=("--out", "{out}/dir.onnx"),
        setup=lambda w: (w.out / "dir.onnx").mkdir(),
    ),
    case(
        "--out exists without --overwrite",
        "{out}/OUT.onnx",
        "--overwrite",
        setup=lambda w: (w.out / "OUT.onnx").write_bytes(b"keep me"),
    ),
    case(
        "report exists without --overwrite",
        "{out}/OUT.json",
        "--overwrite",
        setup=lambda w: (w.out / "OUT.json").write_text("{}"),
    ),
    case(
        "default --out exists",
        "{out}/model.rankshrink.onnx",
        "--overwrite",
        flags=("--out", ""),
        setup=lambda w: (w.out / "model.rankshrink.onnx").write_bytes(b"keep me"),
    ),
]


# Added with issue 5: containers, dtypes and index maps the first table did not reach.
MORE_MODEL_CASES = [
    case(
        "model is a text file", "{model}", "not a readable", model=raw("notes.pt", b"weights: 1\n")
    ),
    case("model is an npz archive", "{model}", "data file", "--data", model=lambda w: w.data),
    case(
        "pickled nn.Module in the legacy format",
        "{model}",
        "--trust-pickle",
        "would import",
        "torch.nn.modules",
        model=legacy_module,
    ),
    case(
        "pickled nn.Module written by pickle.dump",
        "{model}",
        "--trust-pickle",
        "would import",
        "torch.nn.modules",
        model=plain_pickle_module,
        marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning"),
    ),
    case(
        "state_dict key renamed",
        "{model}",
        "do not match",
        "0.W",
        model=edited("ren.pt", _rename_key),
    ),
    case(
        "state_dict missing a bias",
        "{model}",
        "do not match",
        "2.bias",
        model=edited("nobias.pt", lambda c: c["state_dict"].pop("2.bias")),
    ),
    case(
        "state_dict with an unexpected tensor",
        "{model}",
        "do not match",
        "extra",
        model=edited("extra.pt", lambda c: _set_weight(c, "extra", torch.zeros(2))),
    ),
    case(
        "Inf weights",
        "{model}",
        "0.weight",
        "Inf",
        model=edited(
            "inf.pt", lambda c: c["state_dict"]["0.weight"].__setitem__((0, 0), float("inf"))
        ),
    ),
    case(
        "complex weights",
        "{model}",
        "0.weight",
        "complex64",
        model=edited(
            "cplx.pt",
            lambda c: _set_weight(c, "0.weight", torch.zeros(16, 8, dtype=torch.complex64)),
        ),
    ),
    case(
        "integer weights",
        "{model}",
        "0.weight",
        "int64",
        model=edited(
            "int.pt", lambda c: _set_weight(c, "0.weight", torch.zeros(16, 8, dtype=torch.long))
        ),
    ),
    case(
        "state_dict entry is a string",
        "{model}",
        "2.bias",
        "not a tensor",
        model=edited("str.pt", lambda c: _set_weight(c, "2.bias", "zeros")),  # type: ignore[arg-type]
    ),
    case(
        "index map pointing past the inputs",
        "{model}",
        "0.in_index",
        "outside [0, 8)",
        model=indexed("idx.pt", lambda c: c["state_dict"]["0.in_index"].__setitem__((1, 1), 8)),
    ),
    case(
        "index map that does not fit its core",
        "{model}",
        "0.in_index",
        "(5, groups)",
        model=indexed("core.pt", _wider_core),
    ),
]

MORE_DATA_CASES = [
    case("data truncated", "{data}", "not a readable", data=truncated_data),
    case(
        "zip named .npz without arrays", "{data}", "no array 'x'", "readme.txt", data=zip_named_npz
    ),
    case("npz with no arrays at all", "{data}", "no array 'x'", "nothing", data=npz("none.npz")),
    case("x of booleans", "{data}", "'x'", "bool", data=npz(x=X > 0, y=Y)),
    case(
        "x of complex numbers", "{data}", "'x'", "complex", data=npz(x=X.astype(np.complex64), y=Y)
    ),
    case("x one-dimensional", "{data}", "'x'", "shape", data=npz(x=X[:, 0], y=Y)),
    case(
        "x with an extra axis",
        "{data}",
        "(8, 1)",
        "expects 8 input features",
        data=npz(x=X[:, :, None], y=Y),
    ),
    case("y two-dimensional", "{data}", "'y'", "shape", data=npz(x=X, y=Y[:, None])),
    case("y of strings", "{data}", "'y'", "dtype", data=npz(x=X, y=Y.astype(str))),
    case(
        ".pt data holding pickled objects",
        "{data}",
        "would import",
        "numpy",
        data=pt_data("objects.pt", {"x": X, "y": Y}),  # numpy arrays pickle with numpy globals
    ),
    case(
        ".pt data holding a list", "{data}", "list", data=pt_data("list.pt", [torch.zeros(60, 8)])
    ),
    case(
        "safetensors that is not one",
        "{data}",
        "not a readable",
        data=raw("bad.safetensors", b"\x10" + b"\x00" * 7 + b'{"a":1}garbage'),
    ),
    case(
        "safetensors without x",
        "{data}",
        "no array 'x'",
        "found: inputs",
        data=safetensors_file("nox.safetensors", inputs=torch.zeros(60, 8)),
    ),
]

MORE_FLAG_CASES = [
    case("--steps not a number", "--steps", "integer", flags=("--steps", "many")),
    case("unknown option", "--bogus", "--help", flags=("--bogus", "1")),
    case("unknown --method", "--method", "rare", flags=("--method", "magic")),
    case("--max-bytes 0", "--max-bytes", flags=("--max-bytes", "0")),
    case("--min-agreement 2", "--min-agreement", flags=("--min-agreement", "2")),
    case("--export-atol 0", "--export-atol", flags=("--export-atol", "0")),
    case("--opset 99", "--opset", flags=("--opset", "99")),
    case("--target-ratio 0", "--target-ratio", flags=("--target-ratio", "0")),
    case("negative --lambda-l2", "--lambda-l2", flags=("--lambda-l2", "-0.1")),
    case("--lr 0", "--lr", flags=("--lr", "0")),
]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad input must be refused before fine-tuning or export; make reaching them an error."""

    def reached(what: str) -> Callable[..., Any]:
        def fail(*_args: Any, **_kwargs: Any) -> Any:
            raise AssertionError(f"bad input reached {what}")

        return fail

    monkeypatch.setattr("rankshrink.pipeline.rare_stage.fine_tune_", reached("fine-tuning"))
    monkeypatch.setattr("rankshrink.pipeline.compress.export_onnx", reached("ONNX export"))


def _argv(w: Workspace, c: Case) -> tuple[list[str], Callable[[str], str]]:
    """Build the case's bad files; return the argv and the filler of "{model}"-style fields."""
    model = c.model(w) if c.model else w.model
    data = c.data(w) if callable(c.data) else w.data

    def fill(text: str) -> str:
        return text.format(model=model, data=data, out=w.out)

    options = {"--out": str(w.out / "OUT.onnx"), "--steps": "5"}
    if c.data != NO_DATA:
        options["--data"] = str(data)
    flags = [fill(f) for f in c.flags]
    options.update(zip(flags[::2], flags[1::2], strict=True))
    argv = ["compress", str(model), *(x for kv in options.items() if kv[1] for x in kv)]
    return [*argv, "--quiet"], fill


ALL_CASES = (
    MODEL_CASES
    + MORE_MODEL_CASES
    + DATA_CASES
    + MORE_DATA_CASES
    + FLAG_CASES
    + MORE_FLAG_CASES
    + OUTPUT_CASES
)


@pytest.mark.usefixtures("no_training")
@pytest.mark.parametrize("c", ALL_CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(ws: Workspace, c: Case) -> None:
    argv, fill = _argv(ws, c)  # builds the bad files
    if c.setup:
        c.setup(ws)
    before = _tree(ws.root)

    result = runner.invoke(app, argv)

    shown = (
        f"argv: {argv}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n{result.exception!r}"
    )
    assert "Traceback" not in result.output, shown
    assert result.exit_code == 2, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one error line\n{shown}"
    assert lines[0].startswith("error: "), shown
    assert result.stdout.strip() == "", f"--quiet run printed to stdout\n{shown}"
    for word in c.expect:
        assert fill(word).lower() in lines[0].lower(), f"error should mention {word!r}\n{shown}"
    assert _tree(ws.root) == before, "a file was written, removed or changed"


# ---------------------------------------------------------------------------------------------
# Hostile pickles: the payload must never run without --trust-pickle.


class Evil:
    """Unpickling this touches ``canary``: proof that code from the file ran."""

    def __init__(self, canary: Path) -> None:
        self.canary = canary

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.canary,))


class EvilNet(nn.Sequential):
    """A full nn.Module that carries the payload."""

    def __init__(self, canary: Path) -> None:
        super().__init__(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.payload = Evil(canary)


@pytest.mark.usefixtures("no_training")
def test_hostile_pickles_never_run_without_trust_pickle(ws: Workspace) -> None:
    canary = ws.root / "CANARY"
    ckpt = torch.load(ws.model, weights_only=True)
    payloads = {
        "evil_dict.pt": {"state_dict": ckpt["state_dict"], "x": Evil(canary)},
        "evil_module.pt": EvilNet(canary),
    }
    for name, obj in payloads.items():
        torch.save(obj, ws.inputs / name)
    hostile_data = ws.inputs / "evil_data.pt"
    torch.save({"x": torch.from_numpy(X), "y": Evil(canary)}, hostile_data)
    before = _tree(ws.root)

    out = str(ws.out / "OUT.onnx")
    for name, globals_named in (("evil_dict.pt", "pathlib"), ("evil_module.pt", "EvilNet")):
        path = str(ws.inputs / name)
        for argv in (
            ["compress", path, "--data", str(ws.data), "--out", out, "--steps", "5"],
            ["inspect", path],
            ["verify", path, path, "--data", str(ws.data)],
        ):
            result = runner.invoke(app, argv)
            shown = f"{argv}\n{result.output}\n{result.exception!r}"
            assert result.exit_code == 2, shown
            assert "Traceback" not in result.output, shown
            error = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(error) == 1 and error[0].startswith("error: "), shown
            assert path in error[0] and "--trust-pickle" in error[0], shown
            assert "would import" in error[0] and globals_named in error[0], shown
            assert not canary.exists(), f"the payload ran during {argv[0]} {name}"

    result = runner.invoke(
        app, ["compress", str(ws.model), "--data", str(hostile_data), "--out", out]
    )
    assert result.exit_code == 2 and "evil_data.pt" in result.stderr, result.output
    assert not canary.exists(), "the payload in a data file ran"
    assert _tree(ws.root) == before

    # Positive control, and the flag is the only door: with --trust-pickle the payload does run
    # (the dict is then refused cleanly for lacking an architecture).
    result = runner.invoke(app, ["inspect", str(ws.inputs / "evil_dict.pt"), "--trust-pickle"])
    assert canary.exists(), "the payload should have run with --trust-pickle"
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output


@pytest.mark.usefixtures("no_training")
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("container", ["torch zip", "torch legacy", "pickle.dump"])
def test_hostile_pickle_in_any_container_runs_only_with_trust_pickle(
    ws: Workspace, container: str
) -> None:
    """The globals are read from the opcodes in all three containers, never by unpickling."""
    canary = ws.root / "CANARY"
    payload = {
        "state_dict": torch.load(ws.model, weights_only=True)["state_dict"],
        "x": Evil(canary),
    }
    path = ws.inputs / "evil.pt"
    if container == "torch zip":
        torch.save(payload, path)
    elif container == "torch legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    before = _tree(ws.root)

    result = runner.invoke(app, ["inspect", str(path)])
    error = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(error) == 1, result.output
    assert "would import" in error[0] and "pathlib.Path" in error[0], error
    assert "--trust-pickle" in error[0], error
    assert not canary.exists(), "the payload ran without --trust-pickle"
    assert _tree(ws.root) == before

    result = runner.invoke(app, ["inspect", str(path), "--trust-pickle"])
    assert canary.exists(), "with --trust-pickle the file is unpickled (the payload is real)"
    assert result.exit_code == 2 and "--arch" in result.stderr, result.output  # no architecture


# ---------------------------------------------------------------------------------------------
# Good input.


def test_inspect_valid_checkpoint(ws: Workspace) -> None:
    result = runner.invoke(app, ["inspect", str(ws.model)])
    assert result.exit_code == 0, result.output
    assert "16×8" in result.stdout and "3×16" in result.stdout
    result = runner.invoke(app, ["inspect", str(ws.model), "--json"])
    assert result.exit_code == 0, result.output
    assert [row["shape"] for row in json.loads(result.stdout)["layers"]] == [[16, 8], [3, 16]]


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["compress", "--help"], ["inspect", "--help"], ["verify", "--help"]],
    ids=["rankshrink", "compress", "inspect", "verify"],
)
def test_help(argv: list[str]) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


#: These runs test the mechanics of a valid run, not quality: 5 steps on the untrained tiny MLP
#: fuse nothing at the default thresholds, and a file that is not smaller fails its gate; any
#: pair may fuse at these. Its labels are random, 12 held-out samples (8.3 points each).
SHRINK = ("--tau-cos", "1", "--tau-euc", "100", "--max-accuracy-drop", "100")


def test_valid_run_writes_onnx_and_report_only(ws: Workspace) -> None:
    before = _tree(ws.inputs)
    out = ws.out / "OUT.onnx"
    argv = ["compress", str(ws.model), "--data", str(ws.data), "--out", str(out)]
    result = runner.invoke(app, [*argv, "--steps", "5", *SHRINK, "--quiet"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    assert sorted(os.listdir(ws.out)) == ["OUT.json", "OUT.onnx"]  # no temp files left
    leftovers = [n for n in os.listdir(ws.root / "systmp") if "torchinductor" not in n]
    assert leftovers == [], "temp files left behind"  # torch's own compile cache may stay
    assert _tree(ws.inputs) == before, "inputs changed"
    assert out.stat().st_size > 0
    report = json.loads((ws.out / "OUT.json").read_text())
    for key in ("params_before", "params_after", "onnx_bytes_before", "onnx_bytes_after"):
        assert isinstance(report[key], int) and report[key] > 0, key
    assert report["onnx_bytes_after"] == out.stat().st_size
    assert [layer["original_shape"] for layer in report["layers"]] == [[16, 8], [3, 16]]
    assert report["verification"]["passed"] is True
    assert report["training"]["steps"] == 5


def test_trusted_pickled_module_compresses(ws: Workspace) -> None:
    module = ws.inputs / "module.pt"
    torch.save(_tiny_module(), module)
    out = ws.out / "m.onnx"
    argv = ["compress", str(module), "--data", str(ws.data), "--trust-pickle", "--out", str(out)]
    result = runner.invoke(app, [*argv, "--steps", "5", *SHRINK, "-q", "--exporter", "torchscript"])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert out.stat().st_size > 0


def test_torch_checkpoints_are_zip_archives() -> None:
    """The premise of the "model zip without data" case: torch.save writes a zip archive."""
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    assert buf.getvalue()[:2] == b"PK"
