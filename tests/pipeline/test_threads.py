"""The thread policy (rankshrink.pipeline.threads): its decisions, that every stage of every method runs
on the count it decides, and that the default result does not depend on the core count.

The policy's speed claims (a busy machine costs its share, not an order of magnitude) are
measured by ``benchmarks/bench_contention.py``, not asserted here.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shared_runs import DIGITS, MLP, TRANSFORMER
from torch import nn

from rankshrink.pipeline.compress import compress
from rankshrink.pipeline.config import CompressConfig, MethodConfig
from rankshrink.pipeline.threads import (
    FLOPS_PER_THREAD,
    SMALL_STEP_FLOPS,
    available_cores,
    choose_threads,
    intra_op_threads,
    policy_threads,
    step_flops,
)
from rankshrink.train.rare_config import TrainConfig

MODEL = MLP
DATA = DIGITS


# --- the decisions ---------------------------------------------------------------------------


def test_step_flops_counts_every_linear_forward_and_backward() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    # 2·(4·8 + 8·2) FLOPs a sample forward, ×3 for the backward, ×10 samples a step
    assert step_flops(model, torch.zeros(1, 4), batch_size=10) == 3 * 10 * 2 * (32 + 16)


def test_step_flops_counts_tokens_as_rows_and_leaves_modes_alone() -> None:
    inner = nn.Linear(6, 6).eval()
    wrapper = nn.Sequential(inner)  # a wrapper in training mode around an eval-mode model
    assert step_flops(wrapper, torch.zeros(1, 5, 6), batch_size=1) == 3 * 5 * 2 * 36
    assert wrapper.training and not inner.training


def test_small_steps_get_one_thread_whatever_the_core_count() -> None:
    for cores in (1, 2, 16, 128):
        assert policy_threads(SMALL_STEP_FLOPS / 2, cores=cores) == 1


def test_big_steps_get_a_thread_per_share_of_work_up_to_the_cores() -> None:
    assert policy_threads(6 * FLOPS_PER_THREAD, cores=16) == 6
    assert policy_threads(6 * FLOPS_PER_THREAD, cores=4) == 4
    assert policy_threads(1e15, cores=1) == 1


@pytest.mark.parametrize("model", [MODEL, TRANSFORMER], ids=["mlp", "transformer"])
def test_the_bundled_samples_are_small(model: Path) -> None:
    from rankshrink.pipeline.subject import load_subject

    subject = load_subject(model, DATA, None, False, 0)
    one = subject.data.x_train[:1]
    flops = step_flops(subject.model, one, TrainConfig().batch_size)
    assert flops < SMALL_STEP_FLOPS
    assert choose_threads(None, subject.model, one, 128) == 1
    assert choose_threads(0, subject.model, one, 128) == 1


def test_an_explicit_count_overrides_the_policy() -> None:
    model = nn.Linear(2, 2)
    assert choose_threads(3, model, torch.zeros(1, 2), batch_size=1) == 3


def test_omp_num_threads_caps_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    free = available_cores()
    assert free == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert available_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")  # ignored, as OpenMP ignores it
    assert available_cores() == free


def test_intra_op_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), intra_op_threads(1):
        raise RuntimeError("a failing run")
    assert torch.get_num_threads() == before


def test_passive_waiting_is_set_before_torch_loads_unless_the_user_chose() -> None:
    code = "import rankshrink, os; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ACTIVE"


# --- every stage runs on the decided count ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "threads", "expected"),
    [("rare", None, 1), ("rare", 2, 2), ("svd", 2, 2), ("layer-sparsity", None, 1)],
)
def test_every_stage_runs_on_the_decided_count(
    method: str, threads: int | None, expected: int
) -> None:
    seen: list[tuple[str, int]] = []
    before = torch.get_num_threads()
    cfg = CompressConfig(
        model=MODEL,
        data=DATA,
        method=MethodConfig(method, refit_steps=2 if method == "layer-sparsity" else None),
        train=TrainConfig(steps=3, seed=0),
        measure_latency=False,
        threads=threads,
    )
    result = compress(
        cfg,
        progress=lambda _stats: seen.append(("step", torch.get_num_threads())),
        stage=lambda msg: seen.append((msg, torch.get_num_threads())),
    )
    stages = [msg for msg, _ in seen]
    assert "exporting" in stages and "verifying" in stages
    # loading comes before the decision; everything after it (fine-tuning, folding, the SVD
    # stages, export, verification) runs on the decided count
    assert {n for msg, n in seen if msg != "loading"} == {expected}
    assert result.report["config"]["threads"] == expected
    assert torch.get_num_threads() == before


# --- the same bytes on any core count ---------------------------------------------------------


@pytest.mark.slow
def test_default_result_is_byte_identical_on_one_core_and_on_all(tmp_path: Path) -> None:
    """The quick start's model, a short run with loose thresholds (so that it fuses and is
    written): on one pinned core, and on every core with OMP_NUM_THREADS set. (The default quick
    start on one core and on all is compared in test_determinism.) The pinned run also runs under
    umask 022: its outputs must be 0644 (SPEC §6; write_all's own test covers other umasks)."""
    argv = [sys.executable, "-m", "rankshrink", "compress", str(MODEL), "--data", str(DATA)]
    argv += ["--steps", "30", "--tau-cos", "0.5", "--tau-euc", "5", "-q"]
    base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    variants = {
        "one core": (pin, base),
        "all cores, OMP_NUM_THREADS set": ([], {**base, "OMP_NUM_THREADS": "3"}),
    }
    runs = {}
    for name, (prefix, env) in variants.items():
        out = tmp_path / name.replace(" ", "_")
        out.mkdir()
        cmd = [*prefix, *argv, "--out", str(out / "m.onnx"), "--save-pt", str(out / "m.pt")]
        umask = (lambda: os.umask(0o022)) if name == "one core" else None  # the child's only
        runs[name] = (
            out,
            subprocess.Popen(cmd, cwd=out, env=env, stderr=subprocess.PIPE, preexec_fn=umask),
        )
    try:
        errors = {name: run.communicate(timeout=600)[1].decode() for name, (_, run) in runs.items()}
    finally:
        for _, run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
    for name, (_, run) in runs.items():
        assert run.returncode == 0, f"{name}: {errors[name]}"

    outs = [out for out, _ in runs.values()]
    reports = [json.loads((out / "m.json").read_text()) for out in outs]
    assert reports[0]["training"]["fusions"] > 0, "the run should fuse, to exercise folding"
    assert [r["config"]["threads"] for r in reports] == [1, 1]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in outs[0].iterdir()}
    assert modes == {"m.onnx": 0o644, "m.json": 0o644, "m.pt": 0o644}, modes
    for out in outs[1:]:
        assert (out / "m.onnx").read_bytes() == (outs[0] / "m.onnx").read_bytes()
        assert (out / "m.pt").read_bytes() == (outs[0] / "m.pt").read_bytes()
    for report in reports[1:]:
        assert report["verification"] == reports[0]["verification"]
        assert report["training"]["history"] == reports[0]["training"]["history"]
