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
  :mod:`~rankshrink.finetune`
- folding: :mod:`~rankshrink.fold`
- the ONNX boundary: :mod:`~rankshrink.onnx_export`, :mod:`~rankshrink.verify`
- orchestration and presentation: :mod:`~rankshrink.pipeline`, :mod:`~rankshrink.outputs`,
  :mod:`~rankshrink.render`, :mod:`~rankshrink.cli`
"""

__version__ = "0.1.0"
