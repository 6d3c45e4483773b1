"""The same inputs and ``--seed`` give the same bytes (SPEC §6, issue 5).

Each bundled sample is compressed at the defaults by two ``rankshrink compress`` processes, with
different hash seeds, one of them pinned to one core, side by side with each other and with the
rest of the suite (a busy machine). The first is the run the README and Transformer tests read
(tests/shared_runs.py). Their ONNX files and checkpoints must be byte-identical, and their
reports identical once the wall-clock fields are set aside: the thread policy makes the default
result independent of the core count.
(``test_pipeline.py`` repeats a run within one process; this test is the across-processes half.)
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from shared_runs import TRANSFORMER_DEFAULT, FinishedRun, quick_start_args

TIMING_FIELDS = (("training", "seconds"), ("latency_ms_before",), ("latency_ms_after",))


def _without_timings(report: dict[str, Any]) -> dict[str, Any]:
    for path in TIMING_FIELDS:
        parent = report
        for key in path[:-1]:
            parent = parent[key]
        assert isinstance(parent.pop(path[-1]), float), f"timing field {path} missing"
    return report


def _assert_same_bytes(first: FinishedRun, second: FinishedRun, files: list[str]) -> None:
    for run in (first, second):
        run.check_ok()
        assert sorted(os.listdir(run.dir)) == files, f"{run.dir}: {sorted(os.listdir(run.dir))}"
    reports = [run.report() for run in (first, second)]
    assert reports[0]["training"]["fusions"] > 0, "the run should fuse, to exercise fusion"
    for name in files:
        if not name.endswith(".json"):
            same = (first.dir / name).read_bytes() == (second.dir / name).read_bytes()
            assert same, f"{name} differs between two runs with the same seed"
    assert _without_timings(reports[0]) == _without_timings(reports[1])


@pytest.mark.slow
@pytest.mark.cli_run(*quick_start_args())
@pytest.mark.cli_run(*quick_start_args(), hash_seed=2, one_core=True)
def test_same_seed_gives_byte_identical_outputs_for_the_sample_mlp(
    cli_runs: list[FinishedRun],
) -> None:
    first, second = cli_runs
    names = sorted(os.listdir(first.dir))  # the quick start's default output names
    assert [name.rsplit(".", 1)[-1] for name in names] == ["json", "onnx"], names
    _assert_same_bytes(first, second, names)


@pytest.mark.slow
@pytest.mark.cli_run(*TRANSFORMER_DEFAULT)
@pytest.mark.cli_run(*TRANSFORMER_DEFAULT, hash_seed=2, one_core=True)
def test_same_seed_gives_byte_identical_outputs_and_checkpoints_for_the_sample_transformer(
    cli_runs: list[FinishedRun],
) -> None:
    first, second = cli_runs
    _assert_same_bytes(first, second, ["t.json", "t.onnx", "t.pt"])
