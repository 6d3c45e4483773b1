"""Low-rank math and surgery (SPEC §5): MP fit, truncated SVD, LowRankLinear, ONNX, sample MLP."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_runs import DIGITS, MLP, TRANSFORMER
from torch import nn

from rankshrink.errors import InputError
from rankshrink.io.checkpoint import load_model
from rankshrink.io.data import load_data
from rankshrink.math.lowrank import (
    TW1_95,
    energy_rank,
    energy_ranks,
    mp_edges,
    mp_fit,
    mp_quantiles,
    rank_for_budget,
    split_is_smaller,
    truncated_svd,
)
from rankshrink.methods.lowrank_layers import (
    LowRankConfig,
    LowRankLinear,
    expand_low_rank,
    linear_names,
    low_rank,
    low_rank_,
    plan_low_rank,
)
from rankshrink.models.arch import count_params
from rankshrink.nn.encoder import EncoderConfig, TokenClassifier
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.onnx.session import run, session
from rankshrink.train.finetune import fine_tune_plain


def _noise(m: int, n: int, std: float, seed: int) -> torch.Tensor:
    return std * torch.randn(
        m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _planted(m: int, n: int, k: int, std: float, seed: int) -> torch.Tensor:
    """Noise plus a rank-``k`` signal whose singular values are 1.5–3× the noise edge."""
    g = torch.Generator().manual_seed(seed + 1000)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    edge = std * (m**0.5 + n**0.5)
    spikes = torch.linspace(1.5, 3.0, k, dtype=torch.float64) * edge
    return _noise(m, n, std, seed) + U @ torch.diag(spikes) @ V.T


# --- Marchenko–Pastur ---------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.05, 0.25, 0.5, 1.0])
def test_mp_quantile_function_has_the_laws_moments_and_edges(gamma: float) -> None:
    # Oracle: the MP law with ratio γ and scale σ² has mean σ² and variance γσ⁴, support [λ₋, λ₊].
    sigma2 = 1.7
    u = (np.arange(100_000) + 0.5) / 100_000
    q = mp_quantiles(u, gamma, sigma2)
    assert abs(q.mean() / sigma2 - 1) < 1e-4, f"MP mean {q.mean():.6f} != σ² {sigma2}"
    assert abs(q.var() / (gamma * sigma2**2) - 1) < 1e-3, f"MP variance {q.var():.6f} != γσ⁴"
    lo, hi = mp_edges(gamma, sigma2)
    assert np.allclose(mp_quantiles(np.array([0.0, 1.0]), gamma, sigma2), [lo, hi]), "MP edges"
    assert np.all(np.diff(q) >= 0), "MP quantile function is not monotone"


@pytest.mark.parametrize("shape", [(256, 512), (512, 256), (200, 200), (40, 300)])
def test_mp_fit_recovers_the_noise_variance_of_a_pure_noise_matrix(
    shape: tuple[int, int],
) -> None:
    m, n = shape
    std = 0.3
    fit = mp_fit(_noise(m, n, std, seed=m + n))
    # λ = s²/n: σ² is the entry variance when n is the longer side, scaled by N/p otherwise
    expected = std**2 * max(m, n) / n
    assert abs(fit.sigma2 / expected - 1) < 0.04, (
        f"fitted σ² {fit.sigma2:.5f} vs true {expected:.5f} (relative error > 4 %)"
    )
    assert fit.rank <= 1, f"pure noise kept rank {fit.rank} at the bare MP edge (expected 0-1)"
    assert mp_fit(_noise(m, n, std, seed=m + n), tw_margin=TW1_95).rank == 0, (
        "pure noise kept a singular value above the Tracy–Widom 95 % edge"
    )
    assert fit.bulk_fraction >= 1 - 1 / min(m, n)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [8, 30])
def test_mp_fit_keeps_a_planted_low_rank_signal(seed: int, k: int) -> None:
    m, n, std = 200, 400, 0.05
    fit = mp_fit(_planted(m, n, k, std, seed))
    assert fit.rank == k, f"kept rank {fit.rank}, planted {k}"
    assert abs(fit.sigma2 / std**2 - 1) < 0.04, (
        f"σ² {fit.sigma2:.5f} vs {std**2} with {k} spikes (relative error > 4 %)"
    )
    naive = mp_fit(_planted(m, n, k, std, seed), deflate=False)
    assert naive.sigma2 > fit.sigma2, "deflation should remove the spikes' upward bias"


def test_mp_fit_scales_with_the_matrix() -> None:
    W = _planted(120, 300, 5, 0.1, seed=3)
    a, b = mp_fit(W), mp_fit(7.0 * W)
    assert a.rank == b.rank, "the kept rank must not depend on the weights' scale"
    assert b.sigma2 == pytest.approx(49.0 * a.sigma2, rel=1e-9)
    assert mp_fit(W.T).rank == a.rank, "W and Wᵀ have the same singular values"


# --- truncated SVD and budgets -----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 99))
def test_truncated_svd_is_exact_at_full_rank_and_optimal_below(m: int, n: int, seed: int) -> None:
    W = _noise(m, n, 1.0, seed)
    A, B = truncated_svd(W, min(m, n))
    assert torch.allclose(A @ B, W, atol=1e-10), "full-rank truncated SVD is not exact"
    s = torch.linalg.svdvals(W)
    for k in range(min(m, n) + 1):
        A, B = truncated_svd(W, k)
        assert A.shape == (m, k) and B.shape == (k, n)
        err = torch.linalg.matrix_norm(W - A @ B)
        # Eckart–Young: the error is the norm of the dropped singular values
        assert torch.isclose(err, s[k:].norm(), atol=1e-9), f"rank {k}: error {err} != tail"


@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 10**6))
def test_rank_for_budget_is_the_largest_rank_within_the_budget(m: int, n: int, params: int) -> None:
    k = rank_for_budget(m, n, params)
    assert 0 <= k <= min(m, n)
    assert k * (m + n) <= params or k == 0
    assert k == min(m, n) or (k + 1) * (m + n) > params
    assert split_is_smaller(m, n, k) == (k * (m + n) < m * n)


def test_energy_ranks_meet_the_budget_and_grow_with_it() -> None:
    shapes = [(256, 64), (256, 256), (10, 256)]
    svals = [torch.linalg.svdvals(_noise(m, n, 1.0, i)) for i, (m, n) in enumerate(shapes)]
    dense = sum(m * n for m, n in shapes)
    previous = None
    for frac in (0.05, 0.2, 0.4, 0.6, 0.9):
        ranks = energy_ranks(svals, shapes, int(frac * dense))
        cost = sum(
            m * n if k is None else k * (m + n) for k, (m, n) in zip(ranks, shapes, strict=True)
        )
        assert cost <= frac * dense, f"budget {frac}: {cost} weights > {frac * dense}"
        for k, (m, n) in zip(ranks, shapes, strict=True):
            assert k is None or split_is_smaller(m, n, k), "a factored rank that is not smaller"
        if previous is not None:
            full = [min(m, n) if k is None else k for k, (m, n) in zip(ranks, shapes, strict=True)]
            assert all(a >= b for a, b in zip(full, previous, strict=True)), "ranks shrank"
        previous = [min(m, n) if k is None else k for k, (m, n) in zip(ranks, shapes, strict=True)]
    with pytest.raises(ValueError, match="below"):
        energy_ranks(svals, shapes, 10)


# --- LowRankLinear and surgery -----------------------------------------------------------------


def test_low_rank_linear_at_full_rank_equals_the_linear_on_any_batch_shape() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    layer = LowRankLinear.from_linear(linear, 7)
    x = torch.randn(3, 5, 12)  # (B, T, C) as inside the Transformer
    assert torch.allclose(layer(x), linear(x), atol=1e-5), "full-rank LowRankLinear != Linear"
    dense = layer.to_linear()
    assert torch.allclose(dense(x), layer(x), atol=1e-5), "to_linear changed the function"
    assert layer.rank == 7 and layer.in_features == 12 and layer.out_features == 7
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(12, 7, 0)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )  # fmt: skip


def test_fixed_rank_factors_only_where_the_split_is_smaller() -> None:
    model = _mlp()
    _, report = low_rank(model, LowRankConfig(method="svd", rank=4, min_dim=1))
    kinds = {e.name: e.kind for e in report}
    # 5×64 at rank 4: 4·69 = 276 < 320, factored; all others too
    assert kinds == {"0": "factored", "2": "factored", "4": "factored"}, kinds
    for e in report:
        m, n = e.shape
        assert e.params_after < e.params_before, f"{e.name}: not smaller"
        assert e.params_after == e.rank * (m + n) + m
    _, report = low_rank(model, LowRankConfig(method="svd", rank=4, min_dim=1), names=["4"])
    assert [e.name for e in report] == ["4"]
    # rank 5 on the 5×64 head is full rank: 5·69 = 345 >= 320, so it stays dense
    _, report = low_rank(model, LowRankConfig(method="svd", rank=5, min_dim=1))
    assert {e.name: e.kind for e in report}["4"] == "kept"
    # by default a layer thinner than min_dim (the 5-row head) is left alone
    _, report = low_rank(model, LowRankConfig(method="svd", rank=4))
    assert {e.name: e.kind for e in report} == {"0": "factored", "2": "factored", "4": "kept"}
    assert isinstance(model[0], nn.Linear), "low_rank must not change its input model"


def test_svd_budget_is_met_on_the_linear_parameters() -> None:
    model = _mlp()
    linear = sum(
        p.numel() for name in linear_names(model) for p in model.get_submodule(name).parameters()
    )
    for budget in (0.3, 0.6):
        out, report = low_rank(model, LowRankConfig(method="svd", budget=budget))
        after = sum(e.params_after for e in report)
        assert after <= budget * linear, f"budget {budget}: {after} > {budget * linear:.0f}"
        assert count_params(out) == after  # the MLP is all Linear
    with pytest.raises(InputError, match="budget"):
        plan_low_rank(model, LowRankConfig(method="svd", budget=0.001))


def _kept_energy(W: torch.Tensor, rank: int) -> float:
    """``‖W_k‖²_F / ‖W‖²_F`` measured on the rank-``k`` reconstruction itself."""
    W = W.detach().double()
    A, B = truncated_svd(W, rank)
    return float((A @ B).square().sum() / W.square().sum())


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_energy_rank_is_the_smallest_rank_within_the_error_bound(fraction: float) -> None:
    # Oracle: the energy the rank-k reconstruction really keeps (Eckart–Young: ‖W_k‖² = Σ_{i≤k} s²)
    W = _planted(60, 90, 5, 0.1, seed=7)
    k = energy_rank(torch.linalg.svdvals(W), fraction)
    assert _kept_energy(W, k) >= fraction - 1e-9, f"rank {k} keeps less energy than {fraction}"
    if k > 0:
        assert _kept_energy(W, k - 1) < fraction, f"rank {k - 1} already keeps {fraction}"
    with pytest.raises(ValueError, match="at most 1"):
        energy_rank(torch.linalg.svdvals(W), 1.5)


def test_rmt_svd_recovers_planted_ranks_inside_a_model() -> None:
    model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
    W = _planted(200, 300, 6, 0.05, seed=4)
    with torch.no_grad():
        model[0].weight.copy_(W.float())
    plan = plan_low_rank(model, LowRankConfig(method="rmt-svd", min_energy=0.0))
    assert plan[0].kind == "factored" and plan[0].rank == 6, plan[0]
    assert plan[1].kind == "kept", "a 10-row head is below min_dim and must be left alone"
    # here the noise holds about two thirds of the energy: the default floor keeps more than
    # the six spikes, exactly the smallest rank holding half of it
    plan = plan_low_rank(model, LowRankConfig(method="rmt-svd"))
    k = plan[0].rank
    assert plan[0].mp.rank == 6 and k > 6, plan[0]
    assert _kept_energy(W, k) >= 0.5 > _kept_energy(W, k - 1), f"rank {k} is not the floor"


def test_rmt_svd_truncates_dense_when_the_split_is_not_smaller() -> None:
    # A split of a square matrix pays only below half its rank, and then the central quantiles
    # hold signal; fit σ² on the lowest fifth instead, which the 40 − 25 bulk values cover.
    model = nn.Sequential(nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3))
    with torch.no_grad():
        model[0].weight.copy_(_planted(40, 40, 25, 0.05, seed=5).float())
    before = copy.deepcopy(model)
    plan = plan_low_rank(model, LowRankConfig(method="rmt-svd", quantiles=(0.0, 0.2)))
    # with only 15 bulk values the fit is rough (it keeps a few noise directions); what matters
    # here is the form: a rank at or above the break-even 20 stays a dense Linear
    assert 25 <= plan[0].rank < 40, plan[0]
    assert plan[0].kind == "truncated", plan[0]  # 25·80 >= 1600: no split, but denoised
    report = low_rank_(model, plan)
    assert isinstance(model[0], nn.Linear) and report[0].params_after == report[0].params_before
    assert int(torch.linalg.matrix_rank(model[0].weight.double(), rtol=1e-5)) == plan[0].rank
    assert not torch.equal(model[0].weight, before[0].weight)


def test_transformer_linears_are_replaced_by_name_and_a_bad_plan_changes_nothing() -> None:
    torch.manual_seed(0)
    model = TokenClassifier(EncoderConfig(8, 8, 32, 4, 1, 64, 10)).eval()
    x = torch.randn(4, 64)
    out, report = low_rank(model, LowRankConfig(method="svd", budget=0.5))
    assert {e.name for e in report} == set(linear_names(model))
    factored = [e.name for e in report if e.kind == "factored"]
    assert "layers.0.attn.q" in factored
    assert isinstance(out.get_submodule("layers.0.attn.q"), LowRankLinear)
    assert out(x).shape == (4, 10)
    assert count_params(out) < count_params(model)

    full = copy.deepcopy(model)
    plan = plan_low_rank(full, LowRankConfig(method="svd", rank=1))
    bad = [*plan, type(plan[0])("layers.0.nope", (32, 32), 1, "factored")]
    with pytest.raises(InputError, match="no layer named"):
        low_rank_(full, bad)
    assert all(type(full.get_submodule(n)) is nn.Linear for n in linear_names(model)), (
        "a failed plan must leave the model unchanged"
    )


def test_expand_low_rank_gives_a_plain_sequential_with_the_same_function() -> None:
    model, _ = low_rank(_mlp(), LowRankConfig(method="svd", rank=3))
    flat = expand_low_rank(model)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in flat)
    x = torch.randn(6, 32)
    assert torch.allclose(flat(x), model(x), atol=1e-6)


def test_low_rank_mlp_exports_to_onnx_and_matches_torch(tmp_path: Path) -> None:
    model, report = low_rank(_mlp(), LowRankConfig(method="svd", rank=4, min_dim=1))
    x = torch.randn(16, 32)
    path = tmp_path / "lr.onnx"
    export_onnx(model.eval(), x[:2], path, ExportConfig())
    got = run(session(path), x)
    want = model(x).detach().numpy()
    diff = float(np.abs(got - want).max())
    assert diff < 1e-5, f"onnxruntime vs torch max abs diff {diff:.3g} > 1e-5"
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    matmuls = sum(op in ("MatMul", "Gemm") for op in ops)
    assert matmuls == 2 * len(report), f"expected two MatMul/Gemm per factored layer, got {ops}"


# --- the sample MLP ----------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    "cfg",
    [LowRankConfig(method="svd", budget=0.5), LowRankConfig(method="rmt-svd")],
    ids=["svd-0.5", "rmt-svd"],
)
def test_sample_mlp_low_rank_with_a_short_fine_tune_keeps_accuracy(digits, cfg) -> None:
    model, data, teacher = digits
    before = _accuracy(model, data)
    out, report = low_rank(model, cfg)
    fine_tune_plain(out, data.x_train, data.y_train, teacher, steps=300, seed=0)
    after = _accuracy(out, data)
    assert count_params(out) < count_params(model), "not smaller"
    assert any(e.kind == "factored" for e in report)
    assert after >= before - 1.0, (
        f"{cfg.method}: test accuracy {after:.2f} % after vs {before:.2f} % before (> 1 point drop)"
    )


def test_rmt_svd_energy_floor_on_the_sample_models() -> None:
    # The sample Transformer's attention value/output projections keep only 13–26 % of their
    # energy at the bare MP edge; the default floor keeps half of every layer. The sample MLP's
    # MP ranks already keep more than half, so the floor must leave its plan unchanged.
    transformer = load_model(TRANSFORMER).model
    plan = plan_low_rank(transformer, LowRankConfig(method="rmt-svd"))
    raised = [e.name for e in plan if e.mp is not None and e.rank > e.mp.rank]
    assert "layers.1.attn.out" in raised, f"the floor raised no attention projection: {raised}"
    for e in plan:
        if e.kind == "factored":
            W = transformer.get_submodule(e.name).weight
            kept = _kept_energy(W, e.rank)
            assert kept >= 0.5, f"{e.name}: rank {e.rank} keeps {kept:.1%} of the energy (< 50 %)"
    mlp = load_model(MLP).model
    floored = plan_low_rank(mlp, LowRankConfig(method="rmt-svd"))
    bare = plan_low_rank(mlp, LowRankConfig(method="rmt-svd", min_energy=0.0))
    assert [e.rank for e in floored] == [e.rank for e in bare] == [11, 20, 15, 10], (
        "the energy floor changed the sample MLP's RMT-SVD ranks"
    )
