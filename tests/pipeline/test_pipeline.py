"""End-to-end behaviour of ``compress``/``verify`` on a small model: oracles, gates, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.models.arch import build_sequential, make_checkpoint
from rankshrink.onnx.export import ExportConfig
from rankshrink.onnx.session import run, session
from rankshrink.pipeline.compress import compress
from rankshrink.pipeline.config import CompressConfig
from rankshrink.train.rare_config import TrainConfig

runner = CliRunner()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ReLU MLP trained a little on separable blobs, and its data file."""
    root = tmp_path_factory.mktemp("small")
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 12, generator=gen) * 3
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 12, generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 48),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(48, 48),
        nn.ReLU(),
        nn.Linear(48, 4),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:320]), y[:320]).backward()
        opt.step()
    torch.save(make_checkpoint(model.eval()), root / "model.pt")
    np.savez(
        root / "data.npz",
        x=x.numpy(),
        y=y.numpy(),
        train_idx=np.arange(320),
        test_idx=np.arange(320, 400),
    )
    return root / "model.pt", root / "data.npz"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_compress_oracles_dense_factorized_folded_onnx(
    small: tuple[Path, Path], exporter: str, tmp_path: Path
) -> None:
    model, data = small
    cfg = CompressConfig(
        model, data, train=TrainConfig(steps=150, target_ratio=0.6), export=ExportConfig(exporter)
    )
    result = compress(cfg)
    rep = result.report
    ver = rep["verification"]
    assert ver["fold_max_abs_diff"] <= 1e-4, (
        f"fold vs factorized max abs diff {ver['fold_max_abs_diff']:.2e}"
    )
    assert ver["export_max_abs_diff"] <= 1e-4, (
        f"torch vs onnxruntime max abs diff {ver['export_max_abs_diff']:.2e}"
    )
    assert ver["passed"], ver["failures"]
    assert rep["training"]["fusions"] > 0, "the target schedule must make fusions happen"
    assert rep["onnx_bytes_after"] < rep["onnx_bytes_before"], "compressed ONNX is not smaller"
    assert rep["params_after"] < rep["params_before"]
    # The ONNX bytes are a runnable model whose outputs match the folded torch model.
    path = tmp_path / "m.onnx"
    path.write_bytes(result.onnx)
    x = torch.randn(7, 12)
    got = run(session(path), x)
    want = result.model(x).detach().numpy()
    assert np.abs(got - want).max() <= 1e-4, "onnxruntime output differs from the folded model"


def test_compress_cli_writes_onnx_report_and_checkpoint(
    small: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = small
    out, rep, pt = tmp_path / "c.onnx", tmp_path / "c.json", tmp_path / "c.pt"
    before = _sha(model)
    res = runner.invoke(
        app,
        [
            "compress",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--save-pt",
            str(pt),
            "--steps",
            "120",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert _sha(model) == before, "input was modified"
    report = json.loads(rep.read_text())
    assert report["onnx_bytes_after"] == out.stat().st_size
    # --save-pt writes a self-describing checkpoint that loads safely and equals the ONNX.
    ckpt = torch.load(pt, weights_only=True)
    folded = build_sequential(ckpt["arch"])
    folded.load_state_dict(ckpt["state_dict"])
    x = torch.randn(5, 12)
    assert np.abs(run(session(out), x) - folded.eval()(x).detach().numpy()).max() <= 1e-4
    # ... which verify accepts against the original, and which can be compressed again.
    res = runner.invoke(app, ["verify", str(model), str(out), "--data", str(data), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["passed"] is True


def test_same_seed_gives_byte_identical_onnx_and_report(
    small: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = small
    blobs = []
    for i in range(2):
        out = tmp_path / f"r{i}.onnx"
        res = runner.invoke(
            app,
            [
                "compress",
                str(model),
                "--data",
                str(data),
                "--out",
                str(out),
                "--steps",
                "100",
                "-q",
                "--seed",
                "3",
            ],
        )
        assert res.exit_code == 0, res.output
        report = json.loads(out.with_suffix(".json").read_text())
        for timing in ("latency_ms_before", "latency_ms_after"):
            report.pop(timing)
        report["training"].pop("seconds")
        blobs.append((out.read_bytes(), report))
    assert blobs[0][0] == blobs[1][0], "ONNX bytes differ between two runs with the same seed"
    assert blobs[0][1] == blobs[1][1], (
        "reports (timings aside) differ between two runs with the same seed"
    )


def test_size_gate_fails_with_exit_3_and_writes_only_the_report(
    small: tuple[Path, Path], tmp_path: Path
) -> None:
    model, data = small
    out = tmp_path / "g.onnx"
    res = runner.invoke(
        app,
        [
            "compress",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "20",
            "-q",
            "--max-bytes",
            "1000",
        ],
    )
    assert res.exit_code == 3, res.output
    assert "--max-bytes" in res.output
    assert not out.exists(), "a failed gate must not leave the ONNX file"
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["gates"]["passed"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"], "temp files left behind"


def test_accuracy_gate(small: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = small
    out = tmp_path / "a.onnx"
    # Requiring a top-1 agreement above 1 is impossible: the gate must trip.
    res = runner.invoke(app, ["verify", str(model), str(model), "--data", str(data)])
    assert res.exit_code == 2, "a .pt passed as ONNX must be bad input"
    res = runner.invoke(
        app,
        [
            "compress",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "20",
            "-q",
            "--max-accuracy-drop",
            "-1",
        ],
    )
    assert res.exit_code == 3, res.output
    assert "accuracy drop" in res.output


def test_state_dict_with_arch_factory_and_protected_axes(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, data = small
    ckpt = torch.load(model, weights_only=True)
    torch.save(ckpt["state_dict"], tmp_path / "sd.pt")
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Dropout(0.1),\n"
        "                         nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))\n"
    )
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sd.onnx"
    res = runner.invoke(
        app,
        [
            "compress",
            "sd.pt",
            "--arch",
            "my_models:make",
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "150",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    layers = json.loads(out.with_suffix(".json").read_text())["layers"]
    assert layers[0]["core_shape"][1] == 12, "columns of the input layer are protected"
    assert layers[-1]["core_shape"][0] == 4, "rows of the output layer are protected"
    assert any(lay["core_shape"][0] < lay["original_shape"][0] for lay in layers[:-1]), (
        "no hidden layer shrank"
    )
