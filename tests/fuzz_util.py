"""What the fuzz tests share: Hypothesis settings, the outcome check, and the counts at the end.

``test_fuzz.py`` (checkpoints, data files) and ``test_fuzz_hf.py`` (Hugging Face folders,
``--text`` files) feed mutated inputs to the loaders the CLI uses. Every case must either load or
raise a :class:`~rankshrink.errors.RankshrinkError` whose message is one non-empty line; anything
else propagates and fails the test (Hypothesis then shrinks it to a minimal reproducer).

The default run is derandomized (the same cases every time, so CI cannot flake) and small; set
``RANKSHRINK_FUZZ_EXAMPLES=N`` for a randomized run of N cases per test. Each module prints how
many cases ran and how they ended when it finishes.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

from rankshrink.errors import RankshrinkError

EXAMPLES = int(os.environ.get("RANKSHRINK_FUZZ_EXAMPLES", "0"))


def fuzz_settings(default_examples: int) -> settings:
    """``default_examples`` derandomized cases, or ``RANKSHRINK_FUZZ_EXAMPLES`` random ones."""
    return settings(
        max_examples=EXAMPLES or default_examples,
        derandomize=not EXAMPLES,
        deadline=None,
        database=None,  # no .hypothesis/ directory in the work tree
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Outcomes:
    """How each fuzz target's cases ended: ``"loaded"`` or the RankshrinkError's type name."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}

    def expect_own_errors(self, target: str, load: Callable[[], object]) -> None:
        """Run ``load``; a RankshrinkError must carry one line, anything else propagates."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # odd files make libraries warn; the outcome counts
            try:
                load()
                outcome = "loaded"
            except RankshrinkError as exc:
                message = str(exc)
                one_line = message.strip() and not any(c in message for c in "\n\r")
                assert one_line, f"not one line: {message!r}"
                outcome = type(exc).__name__
        self.counts.setdefault(target, Counter())[outcome] += 1

    def lines(self) -> list[str]:
        total = sum(sum(c.values()) for c in self.counts.values())
        lines = [f"fuzz: {total} cases, every one loaded or raised a RankshrinkError"]
        for target, counts in self.counts.items():
            lines.append(
                f"  {target}: {sum(counts.values())} — "
                + ", ".join(f"{n} {outcome}" for outcome, n in counts.most_common())
            )
        return lines

    def report(self, request: pytest.FixtureRequest) -> Iterator[None]:
        """The body of a module-scoped autouse fixture: one intra-op thread while the module
        runs (thousands of tiny tensor ops: OpenMP's spinning dominates on a busy machine), then
        print the counts."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None and self.counts:
            with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
                reporter.write_line("")
                for line in self.lines():
                    reporter.write_line(line)


class Mutant:
    """A mutated value with a short account of how it was made: Hypothesis prints the account
    (not megabytes of bytes) when it reports a failing case."""

    def __init__(self, value: Any, log: list[str]) -> None:
        self.value, self.log = value, log

    def __repr__(self) -> str:
        return "Mutant(" + "; ".join(self.log) + ")"
