"""Session-wide test machinery: ``rankshrink`` commands shared by the tests that read them.

A test marked ``@pytest.mark.cli_run(*args, hash_seed=1, one_core=False)`` gets the finished run
of ``rankshrink *args`` from the ``cli_run`` fixture (``cli_runs`` when it declares several).
Every declared command starts at the session's first test, in a child process, once however
many tests declare it, and the tests that read runs go last: see tests/shared_runs.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from shared_runs import FinishedRun, RunPool, RunSpec

_POOL = pytest.StashKey[RunPool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cli_run(*args, hash_seed=1, one_core=False): read `rankshrink *args`, run once per"
        " session in a child process, from the cli_run / cli_runs fixture",
    )


def _specs(item: pytest.Item) -> list[RunSpec]:
    return [RunSpec.of(mark) for mark in item.iter_markers("cli_run")]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Readers of runs go last: the runs have the rest of the session to finish."""
    items.sort(key=lambda item: bool(_specs(item)))  # stable: both groups keep their order


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread() -> Iterator[None]:
    """Tests compute on small tensors, which one thread does fastest (as the thread policy decides
    for small work); two threads wait at every op's barrier for a core that a run's child or
    another process holds (a 1.5 s test took 17 s so). ``compress`` sets its own count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _run_pool(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunPool]:
    """At the session's first test, start the runs the selected tests declare."""
    specs = [spec for item in request.session.items for spec in _specs(item)]
    pool = RunPool(specs, lambda: tmp_path_factory.mktemp("cli_run"))
    request.config.stash[_POOL] = pool
    pool.refill()
    try:
        yield pool
    finally:  # a session stopped early (-x) leaves no child running
        pool.stop()


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """After each test, start the next waiting runs in place of those that ended."""
    pool = item.config.stash.get(_POOL, None)
    if pool is not None:
        pool.refill()


@pytest.fixture
def cli_runs(request: pytest.FixtureRequest, _run_pool: RunPool) -> list[FinishedRun]:
    """The finished runs of the test's ``cli_run`` marks."""
    specs = _specs(request.node)
    assert specs, "cli_runs needs at least one @pytest.mark.cli_run(...) on the test"
    return [_run_pool.wait(spec) for spec in specs]


@pytest.fixture
def cli_run(cli_runs: list[FinishedRun]) -> FinishedRun:
    """The finished run of the test's one ``cli_run`` mark."""
    assert len(cli_runs) == 1, f"cli_run needs exactly one cli_run mark, got {len(cli_runs)}"
    return cli_runs[0]
