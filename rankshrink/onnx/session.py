"""onnxruntime sessions: deterministic CPU sessions, runs and latency, fed as a model's IO says.

Sessions run on the CPU with one thread and sequential execution, so results do not depend on
thread scheduling.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from torch import Tensor

from rankshrink.errors import InputError
from rankshrink.models.io_spec import FEATURES, ModelIO


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A deterministic CPU onnxruntime session."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 4  # fatal only: a run-time error is raised, and shown once, by us
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(
            f"{path} is not a loadable ONNX model ({str(exc).splitlines()[0][:160]})"
        ) from None


def run(sess: ort.InferenceSession, x: Tensor, io: ModelIO = FEATURES) -> np.ndarray:
    """Run the session's first output on ``x`` (fed as ``io`` says).

    Raises:
        InputError: the file's inputs are not ``io``'s, or onnxruntime rejects the input or fails
            while running the graph.
    """
    names = [i.name for i in sess.get_inputs()]
    if io.tokens and sorted(names) != sorted(io.inputs):
        raise InputError(f"the ONNX model's inputs are {names}; expected {list(io.inputs)}")
    shape = tuple(x[:, 0].shape) if io.tokens else tuple(x.shape)
    try:
        return sess.run(None, io.feeds(x, names))[0]
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument types
        what = "tokens" if io.tokens else "inputs"
        raise InputError(
            f"onnxruntime cannot run the model on {what} of shape {shape}"
            f" ({str(exc).splitlines()[0][:200]})"
        ) from None


def latency_ms(
    sess: ort.InferenceSession, x: Tensor, repeats: int = 50, io: ModelIO = FEATURES
) -> float:
    """Median wall time of one run on ``x`` in milliseconds (after a warm-up)."""
    feed = io.feeds(x, [i.name for i in sess.get_inputs()])
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
