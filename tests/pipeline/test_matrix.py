"""Every (adapter × method) pair: compressed end to end and verified, or refused in one line.

Adapters, each on a tiny model with data labelled by the model itself:

- ``sequential``: a self-describing ``nn.Sequential`` checkpoint;
- ``module``: ``class Net(nn.Module)`` (fc1 → relu → fc2 → relu → fc3 in ``forward``), a
  state_dict loaded with ``--arch``;
- ``residual``: a residual MLP with a LayerNorm (a traced graph, not a chain), also ``--arch``;
- ``transformer``: the bundled Transformer's class (``TokenClassifier``);
- ``hf``: a tiny Hugging Face BERT classifier folder with token data.

The quality gates are opened (these are untrained random models: their accuracy is not the
point); every fidelity check stays on: the file computes what the compressed torch model does
(1e-4), two sessions agree bit for bit, the file belongs to the model, a token model's padding
and second length. Each run must also be smaller than the original, or the size gate fails it.

With ``RANKSHRINK_MATRIX_OUT=path.json`` the cells' results are written there (the closing note's
table comes from that file).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rankshrink.errors import UnsupportedModelError
from rankshrink.models.arch import make_checkpoint
from rankshrink.nn.encoder import EncoderConfig, TokenClassifier
from rankshrink.onnx.task import Tolerances
from rankshrink.pipeline.compress import compress
from rankshrink.pipeline.config import CompressConfig, MethodConfig
from rankshrink.pipeline.methods import METHODS
from rankshrink.train.rare_config import TrainConfig

transformers = pytest.importorskip("transformers", reason="pip install 'rankshrink[hf]'")

ADAPTERS = ("sequential", "module", "residual", "transformer", "hf")
#: pairs that do not apply: layer sparsity needs a ReLU chain of Linear layers
REFUSED = {
    (a, m) for a in ("residual", "transformer", "hf") for m in METHODS if "layer-sparsity" in m
}
OPEN_GATES = Tolerances(max_accuracy_drop=100.0, min_agreement=0.0)
N, F, CLASSES = 240, 16, 3

MODULES = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn import functional as F


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 3)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


    class ResMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 32)
            self.up1, self.down1 = nn.Linear(32, 96), nn.Linear(96, 32)
            self.up2, self.down2 = nn.Linear(32, 96), nn.Linear(96, 32)
            self.norm = nn.LayerNorm(32)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.down1(torch.relu(self.up1(h)))
            h = h + self.down2(torch.relu(self.up2(h)))
            return self.head(self.norm(h))


    def net():
        return Net()


    def resmlp():
        return ResMLP()
    """
)


def _labelled(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with torch.no_grad():
        y = model(x).argmax(-1)
    np.savez(path, x=x.numpy(), y=y.numpy())
    return path


@pytest.fixture(scope="module")
def subjects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, str | None]]:
    """adapter -> (model path, data path, --arch)."""
    root = tmp_path_factory.mktemp("matrix")
    (root / "matrix_models.py").write_text(MODULES)
    sys.path.insert(0, str(root))
    import matrix_models  # the module --arch names

    torch.manual_seed(0)
    x = torch.randn(N, F)
    out: dict[str, tuple[Path, Path, str | None]] = {}
    seq = nn.Sequential(
        nn.Linear(F, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, CLASSES)
    ).eval()
    torch.save(make_checkpoint(seq), root / "seq.pt")
    out["sequential"] = (root / "seq.pt", _labelled(seq, x, root / "seq.npz"), None)
    for name, factory in (("module", "net"), ("residual", "resmlp")):
        model = getattr(matrix_models, factory)().eval()
        torch.save(model.state_dict(), root / f"{name}.pt")
        data = _labelled(model, x, root / f"{name}.npz")
        out[name] = (root / f"{name}.pt", data, f"matrix_models:{factory}")
    cfg = EncoderConfig(tokens=4, token_dim=4, d_model=32, heads=4, layers=1, ffn=64, classes=3)
    tc = TokenClassifier(cfg).eval()
    torch.save(make_checkpoint(tc), root / "tc.pt")
    out["transformer"] = (root / "tc.pt", _labelled(tc, x, root / "tc.npz"), None)
    out["hf"] = _hf_folder(root)
    return out


def _hf_folder(root: Path) -> tuple[Path, Path, None]:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(root / "bert", safe_serialization=True)
    g = np.random.default_rng(0)
    ids = g.integers(1, 100, (120, 16))
    mask = np.ones_like(ids)
    for i, length in enumerate(g.integers(4, 17, len(ids))):
        mask[i, length:], ids[i, length:] = 0, 0
    types = np.zeros_like(ids)
    with torch.no_grad():
        logits = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).logits
    data = root / "tokens.npz"
    np.savez(
        data, input_ids=ids, attention_mask=mask, token_type_ids=types, y=logits.argmax(-1).numpy()
    )
    return root / "bert", data, None


def _record(row: dict[str, object]) -> None:
    target = os.environ.get("RANKSHRINK_MATRIX_OUT")
    if target:
        with open(target, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_every_adapter_and_method(
    adapter: str, method: str, subjects: dict[str, tuple[Path, Path, str | None]]
) -> None:
    model, data, arch = subjects[adapter]
    sparsity = "layer-sparsity" in method
    # layer sparsity: a penalty strong enough to clamp a layer within the short run
    mcfg = MethodConfig(method, lam=1.0, refit_steps=10) if sparsity else MethodConfig(method)
    cfg = CompressConfig(
        model,
        data,
        method=mcfg,
        arch=arch,
        # fuse readily: 30 steps at the paper's thresholds fuse little on random weights
        train=TrainConfig(steps=30, lr=1e-2 if sparsity else 1e-3, tau_cos=0.5, tau_euc=10.0),
        tolerances=OPEN_GATES,
        measure_latency=False,
        checkpoint=True,
    )
    if (adapter, method) in REFUSED:
        with pytest.raises(UnsupportedModelError) as refused:
            compress(cfg)
        line = str(refused.value)
        assert "\n" not in line and "ReLU chain" in line, line
        _record({"adapter": adapter, "method": method, "result": "refused", "reason": line})
        return
    result = compress(cfg)
    rep, ver = result.report, result.report["verification"]
    _record(
        {
            "adapter": adapter,
            "method": method,
            "family": rep["model_family"],
            "onnx_ratio": rep["onnx_ratio"],
            "export_max_abs_diff": ver["export_max_abs_diff"],
            "agreement": ver["agreement"],
            "passed": ver["passed"],
        }
    )
    assert ver["passed"], (adapter, method, ver["failures"])
    assert ver["export_max_abs_diff"] <= 1e-4, ver["export_max_abs_diff"]
    assert rep["onnx_ratio"] < 1.0, rep["onnx_ratio"]
    assert result.checkpoint["format"].startswith("rankshrink.checkpoint")
