"""The Python API: ``from rankshrink import compress``, and configs that check themselves.

A library caller gets the checks the command line gets, with the same one-line messages, when a
config is built — before anything loads.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from shared_runs import DIGITS, MLP
from typer.testing import CliRunner

import rankshrink
from rankshrink.cli.app import app
from rankshrink.errors import InputError


def test_import_rankshrink_is_cheap_and_names_the_api() -> None:
    # the API loads on first use: importing the package alone pulls in no torch
    code = "import sys, rankshrink; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from rankshrink.pipeline.compress import compress

    assert rankshrink.compress is compress
    assert {"compress", "CompressConfig", "MethodConfig", "verify_file"} <= set(rankshrink.__all__)
    with pytest.raises(AttributeError):
        rankshrink.no_such_name  # noqa: B018


@pytest.mark.parametrize(
    ("build", "flags", "message"),
    [
        (lambda r: r.MethodConfig("svd", tw_margin=1.0), ["--method", "svd", "--tw-margin", "1"],
         "--tw-margin does not apply to --method svd"),
        (lambda r: r.MethodConfig("svd", budget=1.5), ["--method", "svd", "--budget", "1.5"],
         "--budget must be in (0, 1], got 1.5"),
        (lambda r: r.MethodConfig("rmt-svd", min_energy=1.0),
         ["--method", "rmt-svd", "--min-energy", "1"], "--min-energy must be in [0, 1), got 1.0"),
        (lambda r: r.CompressConfig(MLP, DIGITS, train=r.TrainConfig(steps=0)),
         ["--steps", "0"], "--steps must be positive, got 0"),
        (lambda r: r.CompressConfig(MLP, DIGITS, train=r.TrainConfig(lr=float("nan"))),
         ["--lr", "nan"], "--lr must be a finite number, got nan"),
        (lambda r: r.CompressConfig(MLP, DIGITS, max_bytes=0), ["--max-bytes", "0"],
         "--max-bytes must be positive"),
    ],
)  # fmt: skip
def test_a_config_refuses_what_the_command_line_refuses_in_the_same_words(
    build: object, flags: list[str], message: str, tmp_path: Path
) -> None:
    with pytest.raises(InputError) as raised:
        build(rankshrink)  # type: ignore[operator]
    assert str(raised.value) == message
    argv = ["compress", str(MLP), "--data", str(DIGITS), "--out", str(tmp_path / "m.onnx"), "-q"]
    result = CliRunner().invoke(app, [*argv, *flags])
    assert result.exit_code == 2 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_method_is_one_line() -> None:
    with pytest.raises(InputError, match="--method must be one of rare, svd"):
        rankshrink.MethodConfig("pruning")
