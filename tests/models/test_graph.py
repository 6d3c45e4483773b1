"""The torch.fx adapter (rankshrink.models.graph) and RaRe on a traced graph: every result is
checked against the unmodified model (traced ↔ original, factorized ↔ original, folded ↔
factorized, onnxruntime ↔ folded)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankshrink.errors import UnsupportedModelError
from rankshrink.fold.graph_fold import fold_graph, graph_export_bytes
from rankshrink.methods.graph_surgery import factorize_graph_
from rankshrink.models.arch import build_sequential, sequential_spec
from rankshrink.models.chain import prepare_chain
from rankshrink.models.graph import trace
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.onnx.verify import run, session
from rankshrink.train.rare_config import TrainConfig
from rankshrink.train.rare_loop import fine_tune_

D_IN, HIDDEN, CLASSES = 12, 24, 5


class Net(nn.Module):
    """The plain way: two Linears and a functional ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class NetModules(nn.Module):
    """Module activations, BatchNorm1d and dropout, a flatten first and a log-softmax last."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.bn = nn.BatchNorm1d(HIDDEN)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(HIDDEN, CLASSES)
        with torch.no_grad():  # running statistics that are not the identity
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.act(self.bn(self.fc1(self.flatten(x)))))
        return F.log_softmax(self.fc2(h), dim=-1)


class ResMLP(nn.Module):
    """Two residual blocks, a LayerNorm, functional dropout and a view before the head."""

    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(D_IN, width)
        self.b1_fc1, self.b1_fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.norm = nn.LayerNorm(width)
        self.b2_fc1, self.b2_fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.b1_fc2(torch.relu(self.b1_fc1(h)))
        z = F.dropout(self.b2_fc1(self.norm(h)).relu(), 0.1, self.training)
        h = h + self.b2_fc2(z)
        return self.head(h.view(h.size(0), -1))


def _x(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))


def _model(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# Tracing.


@pytest.mark.parametrize(
    ("cls", "chains"),
    [(Net, [[nn.Linear, nn.ReLU, nn.Linear]]),
     (NetModules, [[nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout, nn.Linear]]),
     (ResMLP, [[nn.Linear], [nn.Linear, nn.ReLU, nn.Linear],
               [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear], [nn.Linear]])],
)  # fmt: skip
def test_traced_module_computes_what_the_model_computes(
    cls: type[nn.Module], chains: list[list[type[nn.Module]]]
) -> None:
    model = _model(cls)
    before = copy.deepcopy(model.state_dict())
    traced = trace(model)
    assert traced.chains == [f"chain{k}" for k in range(len(chains))]
    got = [[type(m) for m in traced.module.get_submodule(name)] for name in traced.chains]
    assert got == chains
    x = _x()
    with torch.no_grad():
        diff = _max_diff(traced.module(x), model(x))
    assert diff <= 1e-6, f"traced vs original: max abs diff {diff:.2e}"
    assert not traced.module.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"trace changed the model's {key}"


def test_functional_activations_become_modules_with_their_parameters() -> None:
    class Acts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.leaky_relu(self.a(x), 0.3)
            h = F.softplus(F.elu(self.b(h), alpha=0.5), 2.0)
            return self.c(F.dropout(F.gelu(h, approximate="tanh"), p=0.25, training=self.training))

    model = _model(Acts)
    traced = trace(model)
    mods = list(traced.module.get_submodule("chain0"))
    assert [type(m) for m in mods] == [
        nn.Linear, nn.LeakyReLU, nn.Linear, nn.ELU, nn.Softplus, nn.GELU, nn.Dropout, nn.Linear,
    ]  # fmt: skip
    assert (mods[1].negative_slope, mods[3].alpha, mods[4].beta) == (0.3, 0.5, 2.0)
    assert (mods[5].approximate, mods[6].p) == ("tanh", 0.25)
    x = torch.randn(8, 4)
    with torch.no_grad():
        assert _max_diff(traced.module(x), model(x)) <= 1e-6
    seq = nn.Sequential(*mods)  # a sequential checkpoint describes every one of them
    rebuilt = build_sequential(sequential_spec(seq))
    assert [repr(m) for m in rebuilt] == [repr(m) for m in seq]


def test_a_linear_whose_output_is_read_twice_ends_its_chain() -> None:
    model = _model(ResMLP)
    traced = trace(model)
    code = traced.module.code
    # inp's output feeds both the residual add and block 1: it is a chain of its own
    assert "chain0 = self.chain0(x)" in code and "chain1 = self.chain1(chain0)" in code
    assert not hasattr(traced.module, "b1_fc1"), "the original Linears must live in the chains"


def test_tracing_a_traced_module_finds_the_same_chains_under_the_same_names() -> None:
    model = _model(ResMLP)
    once = trace(model)
    twice = trace(once.module)  # its own chain0... are absorbed into the new chains
    assert twice.chains == once.chains
    assert [len(twice.module.get_submodule(c)) for c in twice.chains] == [1, 3, 4, 1]
    x = _x()
    with torch.no_grad():
        assert _max_diff(twice.module(x), model(x)) <= 1e-6


def test_as_sequential_for_one_chain_and_none_for_a_graph() -> None:
    x = _x()
    for cls, first in ((Net, nn.Linear), (NetModules, nn.Flatten)):
        model = _model(cls)
        seq = trace(model).as_sequential()
        assert isinstance(seq, nn.Sequential) and isinstance(seq[0], first)
        with torch.no_grad():
            assert _max_diff(seq(x), model(x)) <= 1e-6
        # the existing chain path takes it, and a sequential checkpoint describes it
        with torch.no_grad():
            assert _max_diff(prepare_chain(seq)(x), model(x)) <= 1e-5
        rebuilt = build_sequential(sequential_spec(seq))
        rebuilt.load_state_dict(seq.state_dict())
        with torch.no_grad():
            assert _max_diff(rebuilt.eval()(x), model(x)) <= 1e-6
    assert trace(_model(ResMLP)).as_sequential() is None


# Refusals: one line naming the op.


def test_an_op_outside_the_allowlist_is_refused_by_name() -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 1, 3, 3))
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.conv2d(x, self.w).flatten(1))

    with pytest.raises(UnsupportedModelError) as err:
        trace(Conv())
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("rankshrink cannot compress Conv: its forward calls torch.conv2d")
    assert "(node conv2d)" in msg and "supported: Linear" in msg

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * self.b(x)

    with pytest.raises(UnsupportedModelError, match=r"operator\.mul of two tensors \(node mul\)"):
        trace(Gate())


def test_data_dependent_control_flow_is_refused_with_the_tracer_reason() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(UnsupportedModelError) as err:
        trace(Branchy())
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("rankshrink cannot trace Branchy's forward with torch.fx (")
    assert "control flow" in msg and "nn.Sequential" in msg


# RaRe on the residual MLP: factorize, fine-tune with live fusion, fold, export.


def _factorized(model: nn.Module):
    traced = trace(model)
    return traced, factorize_graph_(traced)


def _param_bytes(model: nn.Module) -> int:
    return 4 * sum(t.numel() for t in model.state_dict().values())


def test_factorize_graph_keeps_the_function_and_prefixes_policy_names() -> None:
    model = _model(ResMLP)
    traced, chain = _factorized(model)
    names = [p.name for p in chain.policies]
    assert names == ["chain0.0", "chain1.0", "chain1.2", "chain2.0", "chain2.3", "chain3.0"]
    # chain ends touch the residual stream or the model's input/output: protected
    rules = {p.name: (p.fuse_rows, p.fuse_cols, p.positive_rows) for p in chain.policies}
    assert rules["chain1.0"] == (True, False, True)  # hidden rows, through a ReLU
    assert rules["chain1.2"] == (False, False, False)  # fed by the fold, writes the stream
    assert rules["chain0.0"] == rules["chain3.0"] == (False, False, False)
    x = _x()
    with torch.no_grad():
        assert _max_diff(chain.model(x), model(x)) <= 1e-5
    assert graph_export_bytes(chain, traced.chains) == _param_bytes(model)


def test_exact_parallel_hidden_rows_fuse_losslessly_through_the_graph() -> None:
    model = _model(ResMLP, seed=3)
    with torch.no_grad():  # a hidden unit that is 2.5x another: fusing it changes nothing
        model.b1_fc1.weight[1] = 2.5 * model.b1_fc1.weight[0]
        model.b1_fc1.bias[1] = 2.5 * model.b1_fc1.bias[0]
    x = _x()
    with torch.no_grad():
        want = model(x)
    traced, chain = _factorized(model)
    cfg = TrainConfig(
        steps=3, batch_size=16, lr=0.0, lambda_rank=0.0, lambda_l2=0.0, target_ratio=None,
        tau_cos=1e-6, tau_euc=1e-3,
    )  # fmt: skip
    y = torch.zeros(len(x), dtype=torch.long)
    size = lambda: graph_export_bytes(chain, traced.chains)  # noqa: E731
    report = fine_tune_(chain, x, y, None, cfg, size_fn=size)
    assert report.fusions_by_layer["chain1.0"] == 1 and report.fusions == 1, report
    folded = fold_graph(chain, traced.chains)
    with torch.no_grad():
        assert _max_diff(chain.model(x), want) <= 1e-5
        assert _max_diff(folded.model(x), want) <= 1e-5
    assert graph_export_bytes(chain, traced.chains) < _param_bytes(model)


def test_rare_on_a_residual_mlp_fuses_folds_and_exports(tmp_path) -> None:
    model = _model(ResMLP, seed=5)
    x = _x(128, seed=6)
    with torch.no_grad():
        teacher = model(x)
    y = teacher.argmax(dim=1)
    traced, chain = _factorized(model)
    cfg = TrainConfig(
        steps=30, batch_size=32, target_ratio=0.6, tau_cos=0.3, tau_euc=2.0, seed=0
    )
    size = lambda: graph_export_bytes(chain, traced.chains)  # noqa: E731
    report = fine_tune_(chain, x, y, teacher, cfg, size_fn=size)
    hidden = report.fusions_by_layer["chain1.0"] + report.fusions_by_layer["chain2.0"]
    assert hidden > 0, f"nothing fused on the hidden axes: {report.fusions_by_layer}"
    assert report.fusions == hidden, "only the hidden rows may fuse"
    assert not chain.model.training

    folded = fold_graph(chain, traced.chains)
    with torch.no_grad():
        want = chain.model(x)
        diff = _max_diff(folded.model(x), want)
    assert diff <= 1e-4, f"folded vs factorized: max abs diff {diff:.2e}"
    assert [lf.name for lf in folded.layers] == [p.name for p in chain.policies]
    assert graph_export_bytes(chain, traced.chains) < _param_bytes(model)
    assert _param_bytes(folded.model) < _param_bytes(model)

    path = tmp_path / "res.onnx"
    export_onnx(folded.model, x[:4], path, ExportConfig())
    got = run(session(path), x)
    diff = float(abs(got - want.numpy()).max())
    assert diff <= 1e-4, f"onnxruntime vs factorized: max abs diff {diff:.2e}"
