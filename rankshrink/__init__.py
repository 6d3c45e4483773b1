"""rankshrink: post-hoc compression of trained PyTorch models with RaRe and live fusion.

The package is layered, each layer importing only from the ones above it in this list:

- math: :mod:`~rankshrink.indexmap`, :mod:`~rankshrink.rare`, :mod:`~rankshrink.fusion`,
  :mod:`~rankshrink.factorized`, :mod:`~rankshrink.indexed`, :mod:`~rankshrink.lowrank` (SVD,
  Marchenko–Pastur)
- model surgery and training: :mod:`~rankshrink.encoder` (the Transformer sample's modules),
  :mod:`~rankshrink.arch`, :mod:`~rankshrink.chain`,
  :mod:`~rankshrink.surgery`, :mod:`~rankshrink.train`, :mod:`~rankshrink.checkpoint`,
  :mod:`~rankshrink.data`; the other seed methods :mod:`~rankshrink.lowrank_layers` (SVD and
  RMT-SVD), :mod:`~rankshrink.layer_sparsity` and their plain fine-tuning
  :mod:`~rankshrink.finetune`; the thread policy every run computes under
  :mod:`~rankshrink.threads`
- folding: :mod:`~rankshrink.fold`
- the ONNX boundary: :mod:`~rankshrink.onnx_export`, :mod:`~rankshrink.verify`
- orchestration and presentation: :mod:`~rankshrink.pipeline`, :mod:`~rankshrink.outputs`,
  :mod:`~rankshrink.render`, :mod:`~rankshrink.cli`
"""

import os

# OpenMP reads this once, when torch loads it, so it is set here, before any module imports torch;
# a user's own setting wins. A waiting worker sleeps instead of spinning: on a busy machine a
# spinning worker holds a core that the thread it waits for (or the main thread) needs, and a
# multi-threaded step slowed by an order of magnitude (see rankshrink.threads and
# benchmarks/bench_contention.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
