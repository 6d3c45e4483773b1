"""Low-precision storage (``--quantize int8|fp16``): onnxruntime's tools, then verified again.

The quantized file takes and returns what the float file does, is smaller, stays close to it,
and goes through the same verification and gates as any other output; a gate it fails exits 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_runs import DIGITS, MLP
from torch import nn
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.errors import InputError
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.onnx.quantize import quantize_file
from rankshrink.onnx.session import run, session
from rankshrink.pipeline.config import CompressConfig

runner = CliRunner()


@pytest.mark.parametrize(("mode", "most_ratio", "atol"), [("int8", 0.35, 0.5), ("fp16", 0.55, 1e-2)])
def test_a_quantized_file_is_smaller_and_close_to_the_float_one(
    mode: str, most_ratio: float, atol: float, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))
    x = torch.randn(50, 32)
    float_bytes = export_onnx(model.eval(), x[:4], tmp_path / "f.onnx", ExportConfig())
    q_bytes = quantize_file(tmp_path / "f.onnx", tmp_path / "q.onnx", mode)
    assert q_bytes <= most_ratio * float_bytes, (mode, q_bytes, float_bytes)
    want, got = run(session(tmp_path / "f.onnx"), x), run(session(tmp_path / "q.onnx"), x)
    assert got.dtype == np.float32  # float inputs and outputs are kept
    diff = float(np.abs(got - want).max())
    assert diff <= atol, f"{mode} vs float max abs diff {diff:.3g}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "q.onnx"]  # no side files


def test_an_unknown_mode_is_refused_before_anything_runs() -> None:
    with pytest.raises(InputError, match="--quantize must be one of int8, fp16, got 'int4'"):
        CompressConfig(MLP, DIGITS, quantize="int4")


@pytest.mark.slow
def test_compress_quantize_int8_writes_a_verified_smaller_file(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    argv = ["compress", str(MLP), "--data", str(DIGITS), "--out", str(out), "--steps", "150"]
    result = runner.invoke(app, [*argv, "--quantize", "int8", "-q"])
    assert result.exit_code == 0, result.output
    rep = json.loads(out.with_suffix(".json").read_text())
    quantized = rep["quantize"]
    assert quantized["mode"] == "int8" and rep["onnx_bytes_after"] == out.stat().st_size
    assert rep["onnx_bytes_after"] < 0.4 * quantized["float_onnx_bytes"], rep["onnx_bytes_after"]
    ver = rep["verification"]
    # the float file matched the compressed torch model; the int8 file passed the gates
    assert ver["passed"] and ver["export_max_abs_diff"] <= 1e-4, ver
    check = runner.invoke(app, ["verify", str(MLP), str(out), "--data", str(DIGITS), "--json"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["accuracy_after"] == pytest.approx(ver["accuracy_after"])
    # a gate the int8 file cannot meet fails it: exit 3, only the report written
    strict = tmp_path / "strict.onnx"
    argv = ["compress", str(MLP), "--data", str(DIGITS), "--out", str(strict), "--steps", "150"]
    result = runner.invoke(app, [*argv, "--quantize", "int8", "--min-agreement", "1", "-q"])
    assert result.exit_code == 3, result.output
    assert not strict.exists() and strict.with_suffix(".json").exists()


def test_a_failing_gate_keeps_the_most_sensitive_nodes_in_float_until_it_passes(
    tmp_path: Path,
) -> None:
    from rankshrink.models.io_spec import FEATURES
    from rankshrink.onnx.quantize import weight_nodes
    from rankshrink.onnx.verify import Verification
    from rankshrink.pipeline.quantize_stage import quantize_verified

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    x = torch.randn(40, 16)
    # one input feature 1000x larger (its weights 1000x smaller: the same function): the first
    # layer's dynamically quantized input loses the other features, so that layer is the one
    # int8 hurts most
    x[:, 0] *= 1000.0
    with torch.no_grad():
        model[0].weight[:, 0] /= 1000.0
    export_onnx(model.eval(), x[:4], tmp_path / "f.onnx", ExportConfig())
    nodes = weight_nodes(tmp_path / "f.onnx")
    assert len(nodes) == 3, nodes
    want = run(session(tmp_path / "f.onnx"), x)

    def diff_of(path: Path) -> float:
        return float(np.abs(run(session(path), x) - want).max())

    quantize_file(tmp_path / "f.onnx", tmp_path / "all.onnx", "int8")
    quantize_file(tmp_path / "f.onnx", tmp_path / "k.onnx", "int8", keep_float=[nodes[0]])
    everything, but_first = diff_of(tmp_path / "all.onnx"), diff_of(tmp_path / "k.onnx")
    assert but_first < everything / 4, (everything, but_first)
    limit = (everything * but_first) ** 0.5  # a stand-in gate between the two

    def verify(path: Path) -> Verification:
        diff = diff_of(path)
        failures = [] if diff <= limit else [f"gate failed: diff {diff:.3g} > {limit:.3g}"]
        return Verification(not failures, None, [], diff, None, None, None, len(x), failures)

    stored = quantize_verified(tmp_path / "f.onnx", "int8", verify, x, FEATURES)
    assert stored.verification.passed, stored.tries
    assert stored.kept_float == [nodes[0]], stored.kept_float
    assert [(t["kept_float"], t["passed"]) for t in stored.tries] == [(0, False), (1, True)]
    assert stored.tries[0]["bytes"] < stored.tries[1]["bytes"]  # a float node costs its bytes
