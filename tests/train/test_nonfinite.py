"""Non-finite training: a NaN loss or gradient never reaches the weights (issue 5).

NaNs are injected into a real ``compress`` run by wrapping the pipeline's fine-tuning call: a
forward hook poisons the model's output, or a gradient hook poisons a weight's gradient, for a
given number of steps. A few bad steps are skipped and the run recovers (exit 0, counted in the
report); bad steps without end stop the run with exit 3 and one line, with nothing written and the
weights untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.models.arch import make_checkpoint
from rankshrink.pipeline import rare_stage as pipeline

NAN = float("nan")


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    torch.manual_seed(0)
    # the BatchNorm folds into the Linear before it, so even a run that never fuses exports a
    # smaller file, as it must to pass the not-smaller gate (rankshrink.onnx.gates.size_gates)
    model = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3))
    gen = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    torch.save(make_checkpoint(model), tmp_path / "in" / "m.pt")
    np.savez(
        tmp_path / "in" / "d.npz",
        x=gen.normal(size=(80, 8)).astype(np.float32),
        y=gen.integers(0, 3, 80),
    )
    return tmp_path / "in" / "m.pt", tmp_path / "in" / "d.npz", tmp_path / "out"


def _poison(
    monkeypatch: pytest.MonkeyPatch, where: str, bad_steps: int, seen: dict[str, Any]
) -> None:
    """Make the first ``bad_steps`` training steps non-finite, in the loss or the gradients.

    The count runs across the fine-tuning calls of one run (the RaRe phase, then recovery).
    """
    real = pipeline.fine_tune_
    calls = [0]

    def fine_tune_(chain: Any, *args: Any, **kwargs: Any) -> Any:
        model: nn.Module = chain.model
        first = next(p for p in model.parameters() if p.requires_grad)
        if where == "loss":

            def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> torch.Tensor | None:
                calls[0] += 1
                return out * NAN if calls[0] <= bad_steps else None

            handle = model.register_forward_hook(hook)
        else:

            def grad_hook(grad: torch.Tensor) -> torch.Tensor | None:
                calls[0] += 1
                return grad * NAN if calls[0] <= bad_steps else None

            handle = first.register_hook(grad_hook)
        seen.setdefault("before", {k: v.clone() for k, v in model.state_dict().items()})
        try:
            return real(chain, *args, **kwargs)
        finally:
            handle.remove()
            seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(pipeline, "fine_tune_", fine_tune_)


def _compress(model: Path, data: Path, out: Path, *flags: str) -> Any:
    argv = ["compress", str(model), "--data", str(data), "--out", str(out / "m.onnx")]
    # random labels on 16 held-out samples (one is 6.25 points): a mechanics test, not a quality one
    gate = ["--max-accuracy-drop", "100"]
    return CliRunner().invoke(app, [*argv, "--steps", "8", "--no-fusion", *gate, "-q", *flags])


@pytest.mark.parametrize("where", ["loss", "gradients"])
def test_a_few_non_finite_steps_are_skipped_and_the_run_recovers(
    inputs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    model, data, out = inputs
    seen: dict[str, Any] = {}
    _poison(monkeypatch, where, bad_steps=3, seen=seen)
    result = _compress(model, data, out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "m.json").read_text())
    assert report["training"]["skipped_steps"] == 3
    assert report["verification"]["passed"] is True
    assert all(
        bool(torch.isfinite(v).all()) for v in seen["after"].values() if v.is_floating_point()
    )
    sess = ort.InferenceSession(str(out / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.load(data)["x"][:5]
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: x})[0]).all()


@pytest.mark.parametrize("where", ["loss", "gradients"])
def test_endless_non_finite_steps_stop_with_exit_3_and_untouched_weights(
    inputs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    model, data, out = inputs
    seen: dict[str, Any] = {}
    _poison(monkeypatch, where, bad_steps=10**9, seen=seen)
    result = _compress(model, data, out, "--steps", "40")
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "diverged" in lines[0], result.output
    assert os.listdir(out) == [], "nothing may be written when training diverged"
    changed: list[str] = [
        k for k in seen["before"] if not torch.equal(seen["before"][k], seen["after"][k])
    ]
    assert changed == [], f"a non-finite step reached the weights: {changed}"
