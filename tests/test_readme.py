"""The README's quick start is a contract: its commands are run here as a new user would.

The install half of each command is what ``.ci/run`` does; this test runs the rest — the
``rankshrink`` command on the bundled sample, in a scratch directory — and checks the issue's
acceptance numbers on the report it writes.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S)
    assert block, "README quick start has no code block"
    return [
        line.strip()
        for line in block.group(1).splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_quick_start_is_two_commands_install_then_run_and_install_then_test() -> None:
    first, second = quick_start_commands()
    assert "pip install" in first and "rankshrink compress sample_models/mlp_digits.pt" in first
    assert "pip install" in second and "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in second and "python -m pytest" in ci, (
        "CI must run the README's test command"
    )


@pytest.mark.slow
def test_quick_start_compress_command_meets_the_acceptance_numbers(tmp_path: Path) -> None:
    first, _ = quick_start_commands()
    step = next(
        part.strip() for part in first.split("&&") if part.strip().startswith("rankshrink ")
    )
    argv = shlex.split(step)
    (tmp_path / "sample_models").symlink_to(ROOT / "sample_models")
    exe = shutil.which("rankshrink")
    cmd = [exe, *argv[1:]] if exe else [sys.executable, "-m", "rankshrink", *argv[1:]]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"quick start failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Traceback" not in proc.stderr
    onnx_files = list(tmp_path.glob("*.onnx"))
    reports = list(tmp_path.glob("*.json"))
    assert len(onnx_files) == 1 and len(reports) == 1, (
        f"expected one ONNX and one report, got {list(tmp_path.iterdir())}"
    )
    report = json.loads(reports[0].read_text())
    ver = report["verification"]
    assert ver["passed"], ver["failures"]
    assert report["onnx_bytes_after"] == onnx_files[0].stat().st_size
    assert report["onnx_ratio"] <= 0.70, f"ONNX size ratio {report['onnx_ratio']:.3f} > 0.70"
    drop = ver["accuracy_before"] - ver["accuracy_after"]
    assert drop <= 0.5, f"test accuracy drop {drop:.2f} points > 0.5"
    assert ver["export_max_abs_diff"] <= 1e-4, (
        f"export max abs diff {ver['export_max_abs_diff']:.2e} > 1e-4"
    )
    for key in (
        "params_before",
        "params_after",
        "onnx_bytes_before",
        "layers",
        "training",
        "latency_ms_before",
        "latency_ms_after",
    ):
        assert key in report, f"report lacks {key}"
    assert {"name", "original_shape", "core_shape", "feature_width", "fold_kind"} <= set(
        report["layers"][0]
    )
