"""Property tests for the math layer: index maps, exact fusion, folding (SPEC §1, §3, §4)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from rankshrink.fold.chain_fold import fold
from rankshrink.math.indexmap import IndexMap
from rankshrink.math.rare import AxisVectors, axis_vectors, cosine_matrix, pair_cosines, top_pairs
from rankshrink.methods.fusion import FusionPlan, fuse_
from rankshrink.methods.surgery import factorize_
from rankshrink.models.chain import prepare_chain
from rankshrink.nn.factorized import FactorizedLinear
from rankshrink.nn.indexed import IndexedLinear

ATOL = 1e-5  # float32 forward passes of O(1) values


@st.composite
def index_maps(draw: st.DrawFn) -> IndexMap:
    reduced = draw(st.integers(1, 6))
    size = draw(st.integers(reduced, 12))
    # every reduced coordinate gets at least one member
    rest = draw(
        st.lists(st.integers(0, reduced - 1), min_size=size - reduced, max_size=size - reduced)
    )
    index = torch.tensor(list(range(reduced)) + rest)
    index = index[
        torch.randperm(size, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    ]
    scale = torch.tensor(
        draw(
            st.lists(st.floats(-3, 3).filter(lambda v: abs(v) > 0.05), min_size=size, max_size=size)
        )
    )
    return IndexMap(index, scale.float(), reduced)


@settings(max_examples=60, deadline=None)
@given(index_maps(), st.integers(1, 4))
def test_index_maps_equal_their_dense_matrices(P: IndexMap, batch: int) -> None:
    z = torch.randn(batch, P.reduced, dtype=torch.float64)
    assert torch.allclose(P.gather(z), z @ P.as_gather().T), "gather != dense P"
    x = torch.randn(batch, P.size, dtype=torch.float64)
    assert torch.allclose(P.segment_sum(x), x @ P.as_segment_sum().T), "segment-sum != dense Q"
    idx, scale = P.padded_groups()
    padded = (x[..., idx] * scale.double()).sum(-1)
    assert torch.allclose(padded, x @ P.as_segment_sum().T), "padded groups != dense Q"


def _layer(m: int, n: int, frobenius: bool, seed: int) -> FactorizedLinear:
    torch.manual_seed(seed)
    return FactorizedLinear(nn.Linear(n, m), frobenius=frobenius)


def _make_parallel_(layer: FactorizedLinear, axis: str, drop: int, keep: int, r: float) -> None:
    """Set vector ``drop`` to exactly ``r`` times vector ``keep`` (of the effective weight)."""
    with torch.no_grad():
        V = layer.V.data.clone()
        if axis == "rows":
            V[drop] = r * V[keep]
            layer.bias.data[drop] = r * layer.bias.data[keep]
        else:
            V[:, drop] = r * V[:, keep]
        layer.V.data = V


@settings(max_examples=40, deadline=None)
@given(
    axis=st.sampled_from(["rows", "cols"]),
    frobenius=st.booleans(),
    r=st.floats(-4, 4).filter(lambda v: abs(v) > 0.1),
    seed=st.integers(0, 1000),
    pre_fuse=st.booleans(),
)
def test_exactly_parallel_vectors_fuse_without_changing_the_function(
    axis: str, frobenius: bool, r: float, seed: int, pre_fuse: bool
) -> None:
    layer = _layer(7, 6, frobenius, seed)
    x = torch.randn(5, 6)
    if pre_fuse:  # a second fusion on top of non-identity maps
        _make_parallel_(layer, "cols" if axis == "rows" else "rows", 0, 1, 0.7)
        other = "cols" if axis == "rows" else "rows"
        fuse_(
            layer,
            FusionPlan(other, torch.tensor([0]), torch.tensor([1]), torch.tensor([0.7])),
            None,
        )
    _make_parallel_(layer, axis, 2, 4, r)
    before = layer(x).detach()
    vectors = axis_vectors(layer.weight().detach(), layer.bias_or_zeros().detach(), axis)
    ratio = (vectors[2] @ vectors[4]) / (vectors[4] @ vectors[4])
    count = layer.reduced_shape[0 if axis == "rows" else 1]
    fuse_(layer, FusionPlan(axis, torch.tensor([2]), torch.tensor([4]), ratio[None]), None)
    assert layer.reduced_shape[0 if axis == "rows" else 1] == count - 1
    after = layer(x).detach()
    assert torch.allclose(before, after, atol=ATOL), (
        f"fused output max abs diff {(before - after).abs().max():.3g}"
    )
    dense = x.double() @ layer.dense_weight().T + layer.dense_bias()
    assert torch.allclose(dense.float(), after, atol=ATOL), "P·W'·Q dense form != module forward"


def test_fusion_keeps_adam_state_of_survivors() -> None:
    layer = _layer(6, 5, True, 0)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(4, 5)).sum().backward()
    opt.step()
    moments = opt.state[layer.V]["exp_avg"].clone()
    _make_parallel_(layer, "rows", 1, 3, 2.0)
    fuse_(layer, FusionPlan("rows", torch.tensor([1]), torch.tensor([3]), torch.tensor([2.0])), opt)
    new_state = opt.state[layer.V]["exp_avg"]
    assert new_state.shape == layer.V.shape
    assert torch.equal(new_state, moments[[0, 2, 3, 4, 5]]), (
        "Adam moments of surviving rows changed"
    )
    assert any(p is layer.V for g in opt.param_groups for p in g["params"]), "optimizer lost V"
    layer(torch.randn(4, 5)).sum().backward()  # the next step works with the new shapes
    opt.step()


def test_plan_keeps_the_shorter_vector_and_only_qualifying_pairs() -> None:
    from rankshrink.methods.fusion import plan_fusions

    vectors = AxisVectors(
        torch.tensor([[1.0, 0.0], [3.0, 0.01], [0.0, 1.0], [0.0, -2.0]]), None, "rows"
    )
    pairs = top_pairs(vectors, 6, positive_only=False)
    scored = vectors.score(pairs)
    assert torch.allclose(scored.cos, vectors.pair_cosines(pairs)), "Gram cosines != direct ones"
    plan = plan_fusions(scored, "rows", 1e-4, 10.0)
    assert plan is not None
    got = {(int(d), int(k)) for d, k in zip(plan.drop, plan.keep, strict=True)}
    assert got == {(1, 0), (3, 2)}, f"expected the longer vector of each pair dropped, got {got}"
    positive = plan_fusions(scored, "rows", 1e-4, 10.0, positive_only=True)
    assert positive is not None and len(positive) == 1, (
        "anti-parallel pair fused under positive_only"
    )
    # D_euc of the inexact pair is ‖[3, .01]/‖·‖ − [1, 0]‖ ≈ 3.3e-3; of the exact one 0
    tight = plan_fusions(scored, "rows", 1e-4, 1e-3)
    assert tight is not None and [int(tight.drop[0])] == [3], (
        "τ_euc must exclude the inexact pair only"
    )


@st.composite
def chains(draw: st.DrawFn) -> nn.Sequential:
    acts = {
        "relu": nn.ReLU,
        "leaky": lambda: nn.LeakyReLU(0.1),
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "none": None,
    }
    widths = draw(st.lists(st.integers(3, 9), min_size=2, max_size=4))
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            act = acts[draw(st.sampled_from(list(acts)))]
            if act is not None:
                layers.append(act())
            if draw(st.booleans()):
                layers.append(nn.Dropout(0.1))
            if draw(st.booleans()):
                bn = nn.BatchNorm1d(widths[i + 1])
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                layers.append(bn)
    return nn.Sequential(*layers).eval()


@settings(max_examples=40, deadline=None)
@given(model=chains(), seed=st.integers(0, 10_000), fusions=st.integers(0, 6))
def test_fold_equals_the_factorized_forward(model: nn.Sequential, seed: int, fusions: int) -> None:
    torch.manual_seed(seed)
    x = torch.randn(6, model[0].in_features)
    reference = model(x)
    chain = factorize_(prepare_chain(model), frobenius=True, axis_policy="longer")
    assert torch.allclose(chain.model(x), reference, atol=ATOL), (
        "factorized(identity maps) != original"
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(fusions):  # fuse random pairs on random free axes (inexact: function changes)
        li = int(torch.randint(len(chain.layers), (1,), generator=gen))
        layer, pol = chain.layers[li], chain.policies[li]
        axes = [a for a, ok in (("rows", pol.fuse_rows), ("cols", pol.fuse_cols)) if ok]
        if not axes:
            continue
        axis = axes[int(torch.randint(len(axes), (1,), generator=gen))]
        count = layer.reduced_shape[0 if axis == "rows" else 1]
        if count < 2:
            continue
        d, k = torch.randperm(count, generator=gen)[:2]
        r = torch.empty(1).uniform_(-2, 2, generator=gen)
        fuse_(layer, FusionPlan(axis, d[None], k[None], r), None)
    with torch.no_grad():
        factorized = chain.model.eval()(x)
        result = fold(chain.model)
        folded = result.model(x)
    assert torch.allclose(folded, factorized, atol=1e-4), (
        f"fold max abs diff {(folded - factorized).abs().max():.3g}"
    )
    for lf in result.layers:
        m, n = lf.original_shape
        assert lf.bytes <= (m * n + m) * 4, f"layer {lf.name} exported larger than the original"


def test_relu_mlp_folds_to_a_plain_narrower_mlp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).eval()
    chain = factorize_(prepare_chain(model))
    first = chain.layers[0]
    _make_parallel_(first, "rows", 2, 6, 1.5)  # positive: one feature
    _make_parallel_(first, "rows", 3, 5, -0.5)  # negative: still two features
    x = torch.randn(9, 5)
    before = chain.model(x).detach()
    vec = axis_vectors(first.weight().detach(), first.bias_or_zeros().detach(), "rows")
    ratio = torch.stack(
        [(vec[2] @ vec[6]) / (vec[6] @ vec[6]), (vec[3] @ vec[5]) / (vec[5] @ vec[5])]
    )
    fuse_(first, FusionPlan("rows", torch.tensor([2, 3]), torch.tensor([6, 5]), ratio), None)
    result = fold(chain.model)
    kinds = [type(m) for m in result.model]
    assert IndexedLinear not in kinds, "a ReLU MLP must fold into plain Linear layers"
    assert result.layers[0].feature_width == 7, "6 reduced rows + 1 sign-split feature expected"
    assert result.model[0].out_features == 7 and result.model[2].in_features == 7
    assert torch.allclose(result.model(x), before, atol=ATOL)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 9), st.integers(1, 7), st.sampled_from(["rows", "cols"]), st.booleans(),
    st.integers(0, 2**16),
)  # fmt: skip
def test_axis_vectors_match_their_dense_matrix(
    m: int, n: int, axis: str, with_bias: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=gen, dtype=torch.float64)
    b = torch.randn(m, generator=gen, dtype=torch.float64) if with_bias else None
    view = AxisVectors(W, b, axis)
    dense = W.T if axis == "cols" else (W if b is None else torch.cat([W, b[:, None]], 1))
    assert torch.equal(view.dense(), dense), "AxisVectors.dense() != [W'|b'] rows / W' columns"
    assert torch.allclose(view.cosine_matrix(), cosine_matrix(dense), atol=1e-12), (
        "Gram-based cosine matrix differs from the dense one"
    )
    if len(view) >= 2:
        pairs = top_pairs(view, 5, positive_only=False)
        assert torch.allclose(view.pair_cosines(pairs), pair_cosines(dense, pairs), atol=1e-12), (
            "pair cosines through AxisVectors differ from the dense ones"
        )
        full = cosine_matrix(dense).abs()
        best = full[pairs[0, 0], pairs[0, 1]]
        assert torch.isclose(best, full.triu(1).max()), "top pair is not the most parallel"


@settings(max_examples=40, deadline=None)
@given(st.booleans(), st.booleans(), st.booleans(), st.integers(0, 2**16))
def test_rare_gradient_in_closed_form_equals_autograd(
    frobenius: bool, with_bias: bool, stale: bool, seed: int
) -> None:
    """The RaRe gradient added after backward is autograd's gradient of the argmin pairs' terms,
    both from what the scoring gathered and, after a fusion made that stale, from ``W'``."""
    from rankshrink.math.rare import rare_value
    from rankshrink.train.rare_scan import LayerRare, RareTerm

    torch.manual_seed(seed)
    layer = FactorizedLinear(nn.Linear(7, 5, bias=with_bias).double(), frobenius=frobenius).double()
    rows, cols = torch.tensor([1, 3]), torch.tensor([0, 6])
    scale = 0.37
    # oracle: autograd through the two pairs
    W = layer.weight()
    value = sum(
        w * rare_value(AxisVectors(W, layer.bias, axis).pair_cosines(idx[None])[0])
        for axis, idx, w in (("rows", rows, 3.0), ("cols", cols, 2.0))
    )
    (scale * value).backward()
    want = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    # closed form, added to empty gradients
    with torch.no_grad():
        Wd, c, norm = layer.weight_parts()
        bias = None if layer.bias is None else layer.bias.detach()
        entry, closed_value = LayerRare(layer, c, norm), 0.0
        for axis, idx, w in (("rows", rows, 3.0), ("cols", cols, 2.0)):
            vectors = AxisVectors(Wd, bias, axis)
            scored = vectors.score(idx[None])
            if stale:
                scored = scored.subset(torch.tensor([True]), idx[None], vectors)
            term = scored.rare_term(0, w)
            entry.parts.append((axis, term))
            closed_value += term.value
    assert abs(closed_value - float(value.detach())) < 1e-10, "closed-form RaRe value != autograd's"
    RareTerm(closed_value, [entry], scale).add_grad_(1.0)
    for name, p in layer.named_parameters():
        got = p.grad
        if got is None and name == "gain":
            # without a bias, ⟨G, W'⟩ = 0 (RaRe ignores scale): the gain's gradient is exactly
            # zero and is not written
            got = torch.zeros_like(p)
        assert got is not None, f"no RaRe gradient reached {name}"
        assert torch.allclose(got, want[name], atol=1e-10), (
            f"closed-form RaRe gradient of {name} differs from autograd by "
            f"{(got - want[name]).abs().max():.3g}"
        )


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(1, 6), st.integers(0, 2**16))
def test_pairs_stay_within_their_group(heads: int, width: int, seed: int) -> None:
    """With groups (attention heads), the search never pairs vectors of two groups, even when a
    cross-group pair is exactly parallel; after a fusion the groups follow the renumbering."""
    from rankshrink.math.rare import PairCandidates

    gen = torch.Generator().manual_seed(seed)
    count = heads * width
    W = torch.randn(count, 4, generator=gen, dtype=torch.float64)
    W[width] = 3.0 * W[0]  # exactly parallel, but head 0 vs head 1
    groups = torch.arange(count) // width
    pairs = top_pairs(AxisVectors(W, None, "rows"), count * count, False, groups)
    assert torch.equal(groups[pairs[:, 0]], groups[pairs[:, 1]]), "a pair crosses two heads"
    expected = heads * width * (width - 1) // 2
    assert len(pairs) == expected, f"{len(pairs)} within-head pairs found, expected {expected}"
    cand = PairCandidates(top=count * count, refresh=1, positive_only=False, groups=groups)
    cand.get(AxisVectors(W, None, "rows"), 0)
    cand.remap(torch.tensor([0]), count)
    assert torch.equal(cand.groups, groups[1:]), "groups were not renumbered after a drop"


@settings(max_examples=40, deadline=None)
@given(index_maps())
def test_feature_count_equals_sign_features(P: IndexMap) -> None:
    """The fast feature count the training loop uses equals the fold's feature space size."""
    from rankshrink.fold.chain_fold import feature_count, sign_features

    assert feature_count(P) == len(sign_features(P)[0]), "feature_count != |sign features|"
    counts = torch.bincount(P.index, minlength=P.reduced)
    assert P.max_group == max(int(counts.max()) if counts.numel() else 1, 1), "max_group"
    assert P.as_segment_sum().ne(0).sum(1).max() <= P.max_group, "a group wider than max_group"
