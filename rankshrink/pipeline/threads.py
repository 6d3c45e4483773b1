"""The intra-op thread policy: how many threads torch computes with, decided from the work.

Every model family and method runs its whole computation — the teacher's outputs, fine-tuning,
folding, the SVD stages, export and verification — inside :func:`intra_op_threads` with the
count :func:`choose_threads` gives. The count comes from the FLOPs of one training step, never
from the machine's load, and for small steps not from its core count either:

- **Small steps run on one thread.** A step under :data:`SMALL_STEP_FLOPS` is hundreds of tiny
  ops whose cost is per-op overhead, which a second thread does not split; and every
  multi-threaded op ends in a barrier, so when another process holds a core each op waits for a
  descheduled worker (the sample Transformer under load: 33 ms/step on one thread, 165–436 ms on
  two; the quick start on a busy 2-core machine: 42 s on one thread, 252 s on two). One thread
  also makes the result independent of the core count: a float reduction split over threads
  sums in another order, which changed the quick start's ONNX (344,311 bytes on two threads,
  344,559 on one).
- **Big steps** get one thread per :data:`FLOPS_PER_THREAD` of step work, at most the cores this
  process may use (its CPU affinity, e.g. ``taskset``, capped by ``OMP_NUM_THREADS`` when set).
  Their result then depends on that count, so the report records it and ``--threads N``
  reproduces it elsewhere.
- ``--threads N`` (N > 0) overrides the policy; 0 or absent means the policy.

Waiting at those barriers must not burn a core either: ``rankshrink/__init__.py`` sets
``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) before torch is imported, so an idle worker
sleeps instead of spinning while its partner is descheduled. On the busy 2-core dev machine a
MiniLM-sized step on two threads took 11.6 s spinning and 2.2 s passive (1.3 s on one thread);
benchmarks/bench_contention.py measures it side by side.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

#: A training step costing fewer FLOPs (its Linear layers, forward and backward) than this runs
#: on one thread. The sample MLP's default step is ~0.12 GFLOP, the sample Transformer's ~0.41;
#: a MiniLM-L6-sized encoder at batch 8 × 64 tokens ~33.
SMALL_STEP_FLOPS = 2e9
#: Above it, one thread per this many FLOPs of step work: a thread's share of every matmul must
#: be large against the ~10–50 µs it costs to wake and join it at each op's barrier.
FLOPS_PER_THREAD = 2e9


def step_flops(model: nn.Module, one: torch.Tensor, batch_size: int) -> float:
    """FLOPs of one training step's ``nn.Linear`` layers (~3× the forward), from one sample.

    Args:
        model: the model to be fine-tuned (the original: factorizing keeps every Linear's shape
            until fusion shrinks it).
        one: a batch of one input sample (a Transformer's tokens count as rows).
        batch_size: samples per training step.
    """
    flops = [0.0]

    def count(module: nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
        rows = args[0].numel() / args[0].shape[-1]  # tokens per sample for a Transformer
        flops[0] += 2.0 * rows * module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear)]
    modes = {m: m.training for m in model.modules()}  # restored one by one: a wrapper's own
    try:  # flag may differ from the wrapped model's
        with torch.no_grad(), intra_op_threads(1):
            model.eval()(one)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return 3.0 * flops[0] * batch_size


def available_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by ``OMP_NUM_THREADS``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        cores = min(cores, int(env))
    return cores


def policy_threads(flops: float, cores: int | None = None) -> int:
    """The policy's thread count for a training step of ``flops`` FLOPs (see the module doc)."""
    if flops < SMALL_STEP_FLOPS:
        return 1
    cores = available_cores() if cores is None else cores
    return max(1, min(cores, math.floor(flops / FLOPS_PER_THREAD)))


def choose_threads(
    requested: int | None, model: nn.Module, one: torch.Tensor, batch_size: int
) -> int:
    """``requested`` when it is a positive count (``--threads N``), else the policy's count."""
    if requested:
        return requested
    return policy_threads(step_flops(model, one, batch_size))


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads; restore the previous count after it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
