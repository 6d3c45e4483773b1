"""Layer sparsity (SPEC §5, seed 003): penalty, identity detection, exact merges, sample MLP."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from shared_runs import DIGITS, MLP
from torch import nn

from rankshrink.errors import UnsupportedModelError
from rankshrink.io.checkpoint import load_model
from rankshrink.io.data import load_data
from rankshrink.methods.layer_sparsity import (
    LayerSparsityConfig,
    as_chain,
    augmented,
    collapse,
    find_identity_layers_,
    negative_part_penalty,
    penalized_layers,
)
from rankshrink.models.arch import count_params
from rankshrink.nn.encoder import EncoderConfig, TokenClassifier
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.onnx.session import run, session
from rankshrink.train.sparsity import layer_sparsity

ATOL = 1e-5  # float32 forward passes of O(1) values




def _mlp(widths: list[int], act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods += [act(), nn.Dropout(0.1)]
    return nn.Sequential(*mods).eval()


@torch.no_grad()
def _make_nonnegative_(layer: nn.Linear) -> None:
    layer.weight.abs_()
    layer.bias.abs_()


def test_penalized_layers_are_the_hidden_layers_between_two_relus() -> None:
    chain = _mlp([16, 32, 32, 32, 4])  # Linear at 0, 3, 6, 9
    assert penalized_layers(chain) == [3, 6], "first (signed input) and last (no ReLU) excluded"
    assert penalized_layers(chain, input_nonnegative=True) == [0, 3, 6]
    sample = as_chain(load_model(MLP).model)
    assert penalized_layers(sample) == [3, 6]


def test_models_without_such_a_layer_are_refused_with_one_clear_line() -> None:
    with pytest.raises(UnsupportedModelError, match="GELU") as info:
        penalized_layers(_mlp([16, 32, 32, 4], act=nn.GELU))
    assert "\n" not in str(info.value)
    with pytest.raises(UnsupportedModelError, match="none"):
        penalized_layers(_mlp([16, 32, 4]))  # one hidden layer: its input is the signed model input
    transformer = TokenClassifier(EncoderConfig(8, 8, 16, 2, 1, 32, 10))
    x = torch.randn(8, 64)
    with pytest.raises(UnsupportedModelError, match="Transformer") as info:
        # refused before any training: with 10**6 steps this would otherwise run for minutes
        layer_sparsity(transformer, x, None, x[:, :10], LayerSparsityConfig(steps=10**6))
    assert "\n" not in str(info.value)


def test_penalty_is_the_frobenius_norm_of_each_negative_part() -> None:
    chain = _mlp([8, 12, 12, 12, 3])
    want = sum(
        float(torch.linalg.matrix_norm(augmented(chain[i]).detach().clamp(max=0))) for i in (3, 6)
    )
    value = negative_part_penalty(chain, [3, 6])
    assert value.item() == pytest.approx(want, rel=1e-6)
    value.backward()
    grad = chain[3].weight.grad
    assert grad is not None and torch.all(grad[chain[3].weight > 0] == 0), (
        "the penalty must not touch non-negative entries"
    )
    assert chain[0].weight.grad is None, "unpenalized layers get no gradient"


def test_collapse_of_nonnegative_layers_is_exact_and_chains() -> None:
    chain = _mlp([10, 24, 24, 24, 24, 5])  # Linear at 0, 3, 6, 9, 12
    for i in (3, 6):
        _make_nonnegative_(chain[i])
    x = torch.randn(50, 10)  # signed inputs: layer 0 keeps its ReLU
    merged, merges = collapse(chain, [3, 6])
    assert len(merges) == 1 and merges[0].layers == ["3", "6", "9"], merges
    assert merges[0].shape == (24, 24)
    assert merges[0].params_after < merges[0].params_before
    assert torch.allclose(merged(x), chain(x), atol=ATOL), (
        f"collapsed vs original max abs diff {float((merged(x) - chain(x)).abs().max()):.3g}"
    )
    assert sum(isinstance(m, nn.Linear) for m in merged) == 3
    assert count_params(merged) < count_params(chain)


def test_collapse_skips_a_merge_that_would_be_larger() -> None:
    chain = _mlp([10, 64, 4, 64, 5])  # a 4-wide bottleneck at index 3
    _make_nonnegative_(chain[3])
    merged, merges = collapse(chain, [3])
    assert merges == [], "64×64 merged is larger than 4×64 + 64×4"
    assert len(merged) == len(chain)


def test_identity_detection_clamps_tiny_negatives_and_restores_the_rest() -> None:
    chain = _mlp([10, 24, 24, 24, 5])  # Linear at 0, 3, 6
    with torch.no_grad():
        _make_nonnegative_(chain[3])
        chain[3].weight[0, :3] = -1e-7  # what Adam leaves behind: oscillation around zero
    before6 = {k: v.clone() for k, v in chain[6].state_dict().items()}
    x = torch.randn(200, 10)
    accepted, change = find_identity_layers_(chain, [3, 6], x, max_change=1e-3)
    assert accepted == [3], accepted
    assert change < 1e-3, f"relative output change {change:.3g} of the accepted clamp"
    assert torch.all(chain[3].weight >= 0) and torch.all(chain[3].bias >= 0)
    for k, v in chain[6].state_dict().items():
        assert torch.equal(v, before6[k]), f"rejected layer 6 was not restored ({k})"


@pytest.fixture(scope="module")
def digits():
    data = load_data(DIGITS)
    model = load_model(MLP).model
    with torch.no_grad():
        teacher = model(data.x_train)
    return model, data, teacher


def _accuracy(model: nn.Module, data) -> float:
    with torch.no_grad():
        return 100.0 * float((model(data.x_test).argmax(1) == data.y_test).float().mean())


@pytest.mark.slow
def test_sample_mlp_collapses_and_keeps_accuracy_and_exports(digits, tmp_path: Path) -> None:
    model, data, teacher = digits
    before = _accuracy(model, data)
    cfg = LayerSparsityConfig(lam=0.1, steps=300, refit_steps=300)
    out, report = layer_sparsity(model, data.x_train, data.y_train, teacher, cfg)
    after = _accuracy(out, data)
    assert report.identity, f"no ReLU became the identity (penalized {report.penalized})"
    assert report.merges, "no layers merged"
    assert report.clamp_change <= cfg.max_change
    assert report.params_after == count_params(out) < count_params(model)
    assert after >= before - 1.0, (
        f"test accuracy {after:.2f} % after vs {before:.2f} % before (> 1 point drop)"
    )
    path = tmp_path / "ls.onnx"
    export_onnx(out, data.x_test[:2], path, ExportConfig())
    diff = float(np.abs(run(session(path), data.x_test) - out(data.x_test).detach().numpy()).max())
    assert diff < 1e-4, f"onnxruntime vs torch max abs diff {diff:.3g}"
