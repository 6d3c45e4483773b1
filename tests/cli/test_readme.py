"""The README's quick start is a contract: its commands are run here as a new user would.

The install half of each command is what ``.ci/run`` does; the rest — the ``rankshrink`` command
on the bundled sample, in a scratch directory — runs once per session (tests/shared_runs.py; the
determinism test shares it), and its report must meet the issue's acceptance numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from shared_runs import FinishedRun, quick_start_args, quick_start_commands

ROOT = Path(__file__).resolve().parents[2]


def test_quick_start_is_two_commands_install_then_run_and_install_then_test() -> None:
    first, second = quick_start_commands()
    assert "pip install" in first and "rankshrink compress sample_models/mlp_digits.pt" in first
    assert "pip install" in second and "pytest" in second
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest" in second and "python -m pytest" in ci, (
        "CI must run the README's test command"
    )


@pytest.mark.slow
@pytest.mark.cli_run(*quick_start_args())
def test_quick_start_compress_command_meets_the_acceptance_numbers(cli_run: FinishedRun) -> None:
    cli_run.check_ok()
    onnx_files = list(cli_run.dir.glob("*.onnx"))
    reports = list(cli_run.dir.glob("*.json"))
    assert len(onnx_files) == 1 and len(reports) == 1, (
        f"expected one ONNX and one report, got {sorted(p.name for p in cli_run.dir.iterdir())}"
    )
    report = cli_run.report()
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
