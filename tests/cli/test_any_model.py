"""Every command on every kind of model, from the command line.

- a Hugging Face folder: ``compress --method svd`` and ``--method rmt-svd``, ``compare``, and
  ``verify`` of a ``--save-pt`` output against its own file;
- ``class Net(nn.Module)`` (a state_dict with ``--arch``): RaRe and SVD compress, fold and
  verify; its ``--save-pt`` is a sequential checkpoint;
- a residual MLP: RaRe and SVD compress, fold and verify; its ``--save-pt`` is a graph spec that
  loads safely and compresses again; layer sparsity is refused in one line (exit 2), and so is a
  module with an op the fold cannot handle.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.io.checkpoint import load_model
from rankshrink.onnx.session import run, session

transformers = pytest.importorskip("transformers", reason="pip install 'rankshrink[hf]'")

runner = CliRunner()
#: a short run that shrinks: fuse readily, keep the quality gates out of these mechanics tests
SHORT = ["--steps", "30", "--tau-cos", "0.5", "--tau-euc", "10", "--max-accuracy-drop", "100"]
SHORT += ["--min-agreement", "0", "-q"]

MODULES = textwrap.dedent(
    """
    import torch
    from torch import nn
    from torch.nn import functional as F


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 96), nn.Linear(96, 3)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x)))


    class ResMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 128), nn.Linear(128, 32)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(h + self.down(torch.relu(self.up(h))))


    class ResGelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 128), nn.Linear(128, 32)
            self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.head(self.norm(h + self.down(F.gelu(self.up(h)))))


    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv1d(1, 2, 3, padding=1), nn.Linear(32, 3)

        def forward(self, x):
            return self.fc(self.conv(x[:, None]).flatten(1))
    """
)


def _one_error_line(result: object) -> str:
    out = result.output.strip()  # type: ignore[attr-defined]
    assert result.exit_code == 2, out  # type: ignore[attr-defined]
    assert len(out.splitlines()) == 1 and "Traceback" not in out, out
    return out


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("modules")
    (root / "user_models.py").write_text(MODULES)
    sys.path.insert(0, str(root))
    import user_models

    torch.manual_seed(0)
    x = torch.randn(300, 16)
    paths = {}
    for name in ("Net", "ResMLP", "ResGelu", "Conv"):
        model = getattr(user_models, name)().eval()
        torch.save(model.state_dict(), root / f"{name}.pt")
        paths[name] = root / f"{name}.pt"
    with torch.no_grad():
        y = user_models.Net().eval()(x).argmax(-1)
    np.savez(root / "data.npz", x=x.numpy(), y=y.numpy())
    paths["data"] = root / "data.npz"
    return paths


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(config).eval().save_pretrained(root / "bert", safe_serialization=True)
    g = np.random.default_rng(0)
    ids = g.integers(1, 100, (120, 16))
    mask = np.ones_like(ids)
    for i, length in enumerate(g.integers(4, 17, len(ids))):
        mask[i, length:], ids[i, length:] = 0, 0
    np.savez(root / "t.npz", input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    return root / "bert", root / "t.npz"


def _report(out: Path) -> dict:
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["svd", "rmt-svd"])
def test_a_folder_compresses_with_the_low_rank_methods_and_its_save_pt_verifies(
    method: str, bert: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, data = bert
    out, pt = tmp_path / "b.onnx", tmp_path / "b.pt"
    argv = ["compress", str(folder), "--data", str(data), "--method", method, "--out", str(out)]
    result = runner.invoke(app, [*argv, "--save-pt", str(pt), "--steps", "20", "-q"])
    assert result.exit_code == 0, result.output
    rep = _report(out)
    ver = rep["verification"]
    assert ver["passed"] and ver["task"] == "hidden", ver
    assert rep["onnx_ratio"] < 1.0 and ver["sequence_lengths"] == [8, 16], rep["onnx_ratio"]
    assert any(layer["fold_kind"] == "factored" for layer in rep["layers"]), rep["layers"]
    # the saved encoder against its own file: the file records both weights it belongs to
    check = runner.invoke(app, ["verify", str(pt), str(out), "--data", str(data), "--json"])
    assert check.exit_code == 0, check.output
    shown = json.loads(check.stdout)
    assert shown["passed"] and shown["max_abs_diff"] <= 1e-4, shown
    # ... and the folder against it, reproducing the report's numbers
    again = runner.invoke(app, ["verify", str(folder), str(out), "--data", str(data), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["pooled_cosine_mean"] == pytest.approx(
        ver["pooled_cosine_mean"], rel=1e-6
    )


@pytest.mark.slow
def test_compare_runs_on_a_folder(bert: tuple[Path, Path], tmp_path: Path) -> None:
    folder, data = bert
    out = tmp_path / "cmp.json"
    argv = ["compare", str(folder), "--data", str(data), "--steps", "10", "--budgets", "0.5"]
    result = runner.invoke(
        app, [*argv, "--methods", "svd,rmt-svd,layer-sparsity", "--out-json", str(out)]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    rows = {row["method"]: row for row in payload["rows"]}
    assert set(rows) == {"original", "svd", "rmt-svd"}, rows
    assert rows["svd"]["onnx_ratio"] < 1.0 and rows["svd"]["latency_ms_b1"] > 0
    # a base model has no top-1: its rows carry the pooled cosine, and so does the table
    assert rows["original"]["pooled_cosine"] == 1.0 and rows["svd"]["pooled_cosine"] > 0.9
    assert "pooled" in result.output and "cosine" in result.output
    assert [s["method"] for s in payload["skipped"]] == ["layer-sparsity"]
    assert "ReLU chain" in payload["skipped"][0]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rare", "svd"])
def test_a_net_class_compresses_folds_and_verifies(
    method: str, modules: dict[str, Path], tmp_path: Path
) -> None:
    model, data = modules["Net"], modules["data"]
    arch = ["--arch", "user_models:Net"]
    out, pt = tmp_path / "n.onnx", tmp_path / "n.pt"
    argv = ["compress", str(model), "--data", str(data), *arch, "--method", method]
    result = runner.invoke(app, [*argv, "--out", str(out), "--save-pt", str(pt), *SHORT])
    assert result.exit_code == 0, result.output
    rep = _report(out)
    assert rep["model_family"] == "chain" and rep["onnx_ratio"] < 1.0, rep["onnx_ratio"]
    assert rep["verification"]["passed"], rep["verification"]["failures"]
    gates = ["--max-accuracy-drop", "100", "--min-agreement", "0", "--json"]
    check = runner.invoke(app, ["verify", str(model), str(out), "--data", str(data), *arch, *gates])
    assert check.exit_code == 0, check.output
    # the traced Net is a chain: its compressed form saves as a sequential checkpoint
    assert torch.load(pt, weights_only=True)["arch"]["type"] == "sequential"
    saved = runner.invoke(app, ["verify", str(pt), str(out), "--data", str(data), *gates])
    assert saved.exit_code == 0, saved.output


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rare", "svd"])
def test_a_residual_mlp_compresses_folds_and_verifies(
    method: str, modules: dict[str, Path], tmp_path: Path
) -> None:
    model, data = modules["ResMLP"], modules["data"]
    arch = ["--arch", "user_models:ResMLP"]
    out, pt = tmp_path / "r.onnx", tmp_path / "r.pt"
    argv = ["compress", str(model), "--data", str(data), *arch, "--method", method]
    result = runner.invoke(app, [*argv, "--out", str(out), "--save-pt", str(pt), *SHORT])
    assert result.exit_code == 0, result.output
    rep = _report(out)
    assert rep["model_family"] == "graph" and rep["onnx_ratio"] < 1.0, rep["onnx_ratio"]
    ver = rep["verification"]
    assert ver["passed"] and ver["export_max_abs_diff"] <= 1e-4, ver
    if method == "rare":  # only the block's hidden axis may fuse; it folds in place
        assert ver["fold_max_abs_diff"] <= 1e-4 and rep["training"]["fusions"] > 0
        assert {layer["name"].split(".")[0] for layer in rep["layers"]} == {
            "chain0", "chain1", "chain2",
        }  # fmt: skip
    gates = ["--max-accuracy-drop", "100", "--min-agreement", "0"]
    check = runner.invoke(app, ["verify", str(model), str(out), "--data", str(data), *arch, *gates])
    assert check.exit_code == 0, check.output
    # the compressed graph saves as a graph spec: it loads with weights_only, computes what the
    # file does, verifies against it, and compresses again
    ckpt = torch.load(pt, weights_only=True)
    assert ckpt["arch"]["type"] == ("low_rank" if method == "svd" else "graph"), ckpt["arch"]
    x = torch.randn(7, 16)
    with torch.no_grad():
        ours = load_model(pt).model(x).numpy()
    theirs = run(session(out), x)
    assert float(np.abs(ours - theirs).max()) <= 1e-5
    saved = runner.invoke(app, ["verify", str(pt), str(out), "--data", str(data), *gates])
    assert saved.exit_code == 0, saved.output
    again = ["compress", str(pt), "--data", str(data), "--out", str(tmp_path / "again.onnx")]
    result = runner.invoke(app, [*again, "--method", "rmt-svd", *SHORT])
    if method == "rare":
        assert result.exit_code == 0, result.output
    else:  # its factors are thinner than any layer the low-rank methods truncate
        assert result.exit_code == 3 and "not smaller" in result.output, result.output


@pytest.mark.slow
def test_a_saved_graph_with_an_index_fold_and_a_layernorm_verifies_and_compresses_again(
    modules: dict[str, Path], tmp_path: Path
) -> None:
    """GELU: fused rows fold with a gather (an IndexedLinear) into the residual stream; the
    LayerNorm is registered before the chains. The saved graph must still belong to its file
    (same fingerprint), trace again (the folded layer kept whole) and compress again."""
    data, out, pt = str(modules["data"]), tmp_path / "g.onnx", tmp_path / "g.pt"
    argv = ["compress", str(modules["ResGelu"]), "--data", data, "--arch", "user_models:ResGelu"]
    result = runner.invoke(app, [*argv, "--out", str(out), "--save-pt", str(pt), *SHORT])
    assert result.exit_code == 0, result.output
    kinds = [layer["fold_kind"] for layer in _report(out)["layers"]]
    assert any(k.startswith("indexed") for k in kinds), kinds
    gates = ["--max-accuracy-drop", "100", "--min-agreement", "0"]
    check = runner.invoke(app, ["verify", str(pt), str(out), "--data", data, *gates])
    assert check.exit_code == 0, check.output
    again = ["compress", str(pt), "--data", data, "--out", str(tmp_path / "again.onnx")]
    result = runner.invoke(app, [*again, "--method", "svd", *SHORT])
    assert result.exit_code == 0, result.output


def test_what_a_traced_graph_cannot_do_is_one_line(
    modules: dict[str, Path], tmp_path: Path
) -> None:
    data = str(modules["data"])
    res = ["compress", str(modules["ResMLP"]), "--data", data, "--arch", "user_models:ResMLP"]
    res += ["--out", str(tmp_path / "r.onnx"), "-q"]
    line = _one_error_line(runner.invoke(app, [*res, "--method", "layer-sparsity"]))
    assert "ReLU chain" in line and "ResMLP" in line, line
    conv = ["compress", str(modules["Conv"]), "--data", data, "--arch", "user_models:Conv"]
    line = _one_error_line(runner.invoke(app, [*conv, "--out", str(tmp_path / "c.onnx"), "-q"]))
    assert "Conv1d (self.conv)" in line and "cannot compress Conv" in line, line
    assert list(tmp_path.iterdir()) == []
