"""The gates from the command line: a failed quality or size gate is exit 3 with only the report
written, ``verify`` refuses another model's file in one line, and its table reads at 100 columns."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.cli.render_verify import verdict_line, verification_lines, verification_table
from rankshrink.models.arch import make_checkpoint

runner = CliRunner()
SAMPLES = Path(__file__).resolve().parents[2] / "sample_models"
MLP, TRANSFORMER = SAMPLES / "mlp_digits.pt", SAMPLES / "transformer_digits.pt"
DIGITS = SAMPLES / "digits.npz"


def _error_lines(result: object) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]  # type: ignore[attr-defined]


def test_a_rank_1_svd_fails_the_default_accuracy_gate_and_writes_only_the_report(
    tmp_path: Path,
) -> None:
    out = tmp_path / "r1.onnx"
    args = ["compress", str(MLP), "--data", str(DIGITS), "--out", str(out)]
    result = runner.invoke(app, [*args, "--method", "svd", "--rank", "1", "--steps", "50", "-q"])
    assert result.exit_code == 3, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r1.json"], "only the report"
    report = json.loads((tmp_path / "r1.json").read_text())
    ver = report["verification"]
    drop = ver["accuracy_before"] - ver["accuracy_after"]
    assert drop > 50, ver  # the run: 97.78 % -> 21.39 %
    assert ver["passed"] is False and report["gates"]["passed"] is False
    assert ver["task"] == "classifier"
    gates = {g["name"]: g for g in ver["gates"]}
    assert gates["accuracy drop"] == {
        "name": "accuracy drop",
        "metric": "test accuracy of the original minus the compressed model's, in points",
        "value": pytest.approx(drop),
        "threshold": 1.0,
        "comparison": "<=",
        "passed": False,
        "source": "default",
        "flag": "--max-accuracy-drop",
        "unit": " points",
        "kind": "classifier",
        "note": "",
    }
    assert gates["not smaller"]["passed"] is True  # small, just useless
    (line,) = _error_lines(result)
    assert line == (
        f"error: gate failed: accuracy drop {drop:.2f} points > 1 (default for classifiers;"
        f" --max-accuracy-drop to change) — nothing but the report ({tmp_path / 'r1.json'})"
        " was written"
    )


def test_a_run_that_cannot_shrink_fails_the_not_smaller_gate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(100, 6)
    torch.save(make_checkpoint(model), tmp_path / "tiny.pt")
    np.savez(tmp_path / "tiny.npz", x=x.numpy())  # label-free: distilled, gated on agreement
    out = tmp_path / "out" / "t.onnx"
    out.parent.mkdir()
    args = ["compress", str(tmp_path / "tiny.pt"), "--data", str(tmp_path / "tiny.npz")]
    result = runner.invoke(app, [*args, "--out", str(out), "--steps", "1", "--no-fusion", "-q"])
    assert result.exit_code == 3, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    before, after = report["onnx_bytes_before"], report["onnx_bytes_after"]
    assert after >= before
    (line,) = _error_lines(result)
    assert f"gate failed: not smaller: {before:,} → {after:,} bytes" in line, line
    assert "agreement" not in line, "one step without fusion keeps the function"
    assert [p.name for p in out.parent.iterdir()] == ["t.json"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--min-cosine", "0.9"], "--min-cosine does not apply to a classifier (10 outputs)"),
        (["--task", "binary"], "--task binary needs one output column; the model has 10"),
        (["--min-agreement", "1.2"], "--min-agreement must be in [0, 1], got 1.2"),
        (["--max-rel-error", "0.1"], "--max-rel-error does not apply to a classifier"),
    ],
)
def test_a_gate_flag_that_does_not_fit_is_one_line_before_any_work(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    out = tmp_path / "m.onnx"
    args = ["compress", str(MLP), "--data", str(DIGITS), "--out", str(out), *flags]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = _error_lines(result)
    assert line.startswith("error: ") and message in line, line
    assert "fine-tuning" not in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample MLP compressed by a short SVD run (it passes every gate)."""
    out = tmp_path_factory.mktemp("svd") / "mlp.onnx"
    args = ["compress", str(MLP), "--data", str(DIGITS), "--out", str(out), "--method", "svd"]
    result = runner.invoke(app, [*args, "--budget", "0.7", "--steps", "30", "-q"])
    assert result.exit_code == 0, result.output
    return out


def test_verify_refuses_another_models_file_in_one_line(mlp_onnx: Path, tmp_path: Path) -> None:
    # the sample Transformer takes the same 64 features and gives the same 10 logits
    args = ["verify", str(TRANSFORMER), str(mlp_onnx), "--data", str(DIGITS)]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    (line,) = _error_lines(result)
    assert line.startswith(
        f"error: {mlp_onnx} does not belong to this model: it was compressed from other weights"
    ), line
    assert result.stdout == "", "nothing is compared once the file is known to be another's"

    # other widths: a model of 32 features against the 64-feature MLP
    torch.manual_seed(0)
    narrow = nn.Sequential(nn.Linear(32, 10)).eval()
    from rankshrink.onnx.export import ExportConfig, export_onnx

    path = tmp_path / "narrow.onnx"
    export_onnx(narrow, torch.randn(4, 32), path, ExportConfig())
    result = runner.invoke(app, ["verify", str(MLP), str(path), "--data", str(DIGITS)])
    assert result.exit_code == 3, result.output
    assert _error_lines(result) == [
        f"error: {path} does not belong to this model: it takes 32 input features,"
        " the model takes 64"
    ]


def test_verify_prints_a_table_and_json_with_the_gates(mlp_onnx: Path) -> None:
    args = ["verify", str(MLP), str(mlp_onnx), "--data", str(DIGITS)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "max |logit diff|" in text and "accuracy drop" in text and "≤ 1 pt (default)" in text
    assert text.rstrip().endswith("verification passed")
    for raw in ("True", "False", "None", "passed:"):
        assert raw not in text, text
    shown = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert shown["passed"] is True and shown["task"] == "classifier"
    assert [(g["name"], g["source"], g["passed"]) for g in shown["gates"]] == [
        ("accuracy drop", "default", True)
    ]
    # a user's threshold that the file misses: exit 3, and the last line says by how much
    strict = runner.invoke(app, [*args, "--max-accuracy-drop", "-50"])
    assert strict.exit_code == 3, strict.output
    last = strict.stdout.rstrip().splitlines()[-1]
    assert last.startswith("FAILED: accuracy drop ") and last.endswith(
        " points > -50 (--max-accuracy-drop)"
    ), last


#: A verify result (the report's verification block) as rendered at 100 columns.
PAYLOAD = {
    "passed": False,
    "task": "classifier",
    "export_max_abs_diff": None,
    "export_batches": [3, 360],
    "max_abs_diff": 28.512345,
    "agreement": 0.2138888888888889,
    "accuracy_before": 97.77777777777777,
    "accuracy_after": 21.38888888888889,
    "mean_prob_diff": None,
    "rel_error": None,
    "samples": 360,
    "gates": [
        {
            "name": "accuracy drop",
            "metric": "test accuracy of the original minus the compressed model's, in points",
            "value": 76.38888888888889,
            "threshold": 1.0,
            "comparison": "<=",
            "passed": False,
            "source": "default",
            "flag": "--max-accuracy-drop",
            "unit": " points",
            "kind": "classifier",
            "note": "",
        },
        {
            "name": "top-1 agreement",
            "metric": "share of held-out samples whose top-1 class is the original's (0-1)",
            "value": 0.2138888888888889,
            "threshold": 0.2,
            "comparison": ">=",
            "passed": True,
            "source": "flag",
            "flag": "--min-agreement",
            "unit": "",
            "kind": "classifier",
            "note": "",
        },
    ],
    "failures": [
        "gate failed: accuracy drop 76.39 points > 1 (default for classifiers;"
        " --max-accuracy-drop to change)"
    ],
}

GOLDEN = """\
verification
┏━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━┓
┃ metric           ┃           value ┃ gate                    ┃ result ┃
┡━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━┩
│ held-out samples │             360 │                         │        │
│ max |logit diff| │            28.5 │                         │        │
│ test accuracy    │ 97.78% → 21.39% │                         │        │
│ accuracy drop    │        76.39 pt │ ≤ 1 pt (default)        │ FAILED │
│ top-1 agreement  │          21.39% │ ≥ 20% (--min-agreement) │ passed │
└──────────────────┴─────────────────┴─────────────────────────┴────────┘
FAILED: accuracy drop 76.39 points > 1 (default for classifiers; --max-accuracy-drop to change)
"""


def test_the_verify_table_at_100_columns_golden() -> None:
    console = Console(file=StringIO(), width=100, color_system=None)
    console.print(verification_table(PAYLOAD))
    console.print(verdict_line(PAYLOAD), soft_wrap=True)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert [line.rstrip() for line in text.splitlines()] == GOLDEN.splitlines(), "\n" + text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_compress_prints_every_gate_with_its_result_golden() -> None:
    ver = {
        **PAYLOAD,
        "task": "binary",
        "export_max_abs_diff": 4.29e-06,
        "max_abs_diff": 0.997,
        "agreement": 0.97,
        "accuracy_before": None,
        "accuracy_after": None,
        "mean_prob_diff": 0.0378,
        "gates": [
            {**PAYLOAD["gates"][0], "value": None, "passed": None, "kind": "binary"},
            {
                **PAYLOAD["gates"][1],
                "name": "decision agreement",
                "value": 0.97,
                "threshold": 0.95,
                "source": "default",
                "kind": "binary",
            },
            {
                "name": "mean |Δp|",
                "metric": "mean absolute change of the predicted probability (0-1)",
                "value": 0.0718,
                "threshold": 0.05,
                "comparison": "<=",
                "passed": False,
                "source": "default",
                "flag": "--max-prob-diff",
                "unit": "",
                "kind": "binary",
                "note": "",
            },
        ],
    }
    ver["gates"][0]["note"] = "the data has no labels"
    report = {"verification": ver, "training": {"steps": 300, "seconds": 4.25, "fusions": 12}}
    console = Console(file=StringIO(), width=100, color_system=None)
    for line in verification_lines(report):
        console.print(line)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert text.splitlines() == [
        "fine-tuning: 300 steps in 4.2 s, 12 fusions",
        "export check: max |diff| 4.29e-06 (torch vs onnxruntime, batches 3, 360)",
        "vs original on 360 held-out samples: max |Δp| 0.997, decision agreement 97.00%,"
        " mean |Δp| 0.0378",
        "gate not run: accuracy drop (the data has no labels)",
        "gate passed: decision agreement 0.9700 ≥ 0.95 (default)",
        "gate FAILED: mean |Δp| 0.0718 > 0.05 (default for binary classifiers; --max-prob-diff"
        " to change)",
    ], "\n" + text
