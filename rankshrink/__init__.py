"""rankshrink: post-hoc compression of trained PyTorch models with RaRe and live fusion.

The package is layered; each subpackage imports only from the ones below it (checked by the
import-linter contract in ``pyproject.toml``):

- :mod:`rankshrink.cli` — the command line, terminal rendering, plots
- :mod:`rankshrink.pipeline` — one ``compress()`` over every model and method, ``compare``, reports
- :mod:`rankshrink.io` — checkpoints, data files, Hugging Face folders, atomic output writing
- :mod:`rankshrink.onnx` — export, onnxruntime sessions, verification and its quality gates
- :mod:`rankshrink.fold` — factorized models into the plain, smaller modules that are exported
- :mod:`rankshrink.train` — fine-tuning
- :mod:`rankshrink.methods` — each method's surgery: RaRe, low rank, layer sparsity
- :mod:`rankshrink.models` — adapters: a model's Linear sites and layouts, its saved form
- :mod:`rankshrink.nn` — torch modules (factorized, indexed, low-rank layers; encoders)
- :mod:`rankshrink.math` — index maps, the RaRe loss, spectra
"""

import os

# OpenMP reads this once, when torch loads it, so it is set here, before any module imports torch;
# a user's own setting wins. A waiting worker sleeps instead of spinning: on a busy machine a
# spinning worker holds a core that the thread it waits for (or the main thread) needs, and a
# multi-threaded step slowed by an order of magnitude (see rankshrink.pipeline.threads and
# benchmarks/bench_contention.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

#: The Python API, loaded on first use so that ``import rankshrink`` stays cheap (no torch).
_API = {
    "compress": "rankshrink.pipeline.compress",
    "CompressResult": "rankshrink.pipeline.compress",
    "CompressConfig": "rankshrink.pipeline.config",
    "MethodConfig": "rankshrink.pipeline.config",
    "TrainConfig": "rankshrink.train.rare_config",
    "Tolerances": "rankshrink.onnx.task",
    "ExportConfig": "rankshrink.onnx.export",
    "verify_file": "rankshrink.pipeline.verify_file",
    "compare": "rankshrink.pipeline.compare",
    "CompareConfig": "rankshrink.pipeline.compare",
    "METHODS": "rankshrink.pipeline.methods",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    """``from rankshrink import compress, CompressConfig``: see :data:`_API`."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rankshrink' has no attribute {name!r}")
