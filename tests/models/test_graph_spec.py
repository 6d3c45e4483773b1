"""The checkpoint spec of a traced graph: round trip, and forged specs refused in one line."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from rankshrink.errors import InputError
from rankshrink.models.arch import build_model, make_checkpoint
from rankshrink.models.graph import trace


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 32), nn.Linear(32, 16)
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.view(x.size(0), -1))
        h = h + 0.5 * self.down(torch.relu(self.up(h)))
        return torch.log_softmax(self.head(self.norm(h)), dim=-1)


def _rebuilt(ckpt: dict) -> nn.Module:
    model = build_model(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def test_a_loaded_graph_has_the_fingerprint_of_the_saved_one() -> None:
    """Modules registered before the chains (the LayerNorm here) keep their place in the
    state_dict, so a file stamped with the saved model's weights belongs to the loaded one."""
    from rankshrink.onnx.provenance import weights_sha256

    gm = trace(Residual().eval()).module
    children = [name for name, _ in gm.named_children()]
    assert children.index("norm") < children.index("chain0"), children
    assert weights_sha256(_rebuilt(make_checkpoint(gm))) == weights_sha256(gm)


def test_a_traced_graph_saves_and_loads_with_the_same_outputs() -> None:
    torch.manual_seed(0)
    gm = trace(Residual().eval()).module
    ckpt = make_checkpoint(gm)
    assert ckpt["arch"]["type"] == "graph"
    assert {"chain0", "chain1", "norm"} <= set(ckpt["arch"]["modules"]), ckpt["arch"]["modules"]
    # plain values only: what torch.load(weights_only=True) reads back
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    x = torch.randn(5, 8)
    with torch.no_grad():
        got = _rebuilt(torch.load(buf, weights_only=True))(x)
        assert torch.equal(got, gm(x)), float((got - gm(x)).abs().max())


@pytest.mark.parametrize(
    ("forge", "needle"),
    [
        (lambda s: s["nodes"][5].update(target="os.system"), "not allowed"),
        (lambda s: s["nodes"][1].update(target="__reduce__"), "not allowed"),
        (lambda s: s["nodes"][3].update(target="nowhere"), "not a listed module"),
        (lambda s: s["nodes"][6].update(args={"tuple": [{"node": "later"}]}), "cannot read"),
        (lambda s: s["modules"].update({"a..b": {"kind": "relu"}}), "bad module name"),
        (lambda s: s.update(nodes=[]), "'nodes' list"),
        (lambda s: s["nodes"][4].update(name="chain0"), "unique name"),
        # strings fx writes into the generated forward as code must be plain identifiers
        (lambda s: s["nodes"][0].update(target="x=__import__('os').getcwd()"), "not an identifier"),
        (lambda s: s["nodes"][6].update(kwargs={"dict": {"alpha=print(1) or 1,_x": 1}}),
         "not an identifier"),
        (lambda s: s["nodes"][1].update(op="call_function", target="builtins.getattr",
                                        args={"tuple": [{"node": "x"}, "__class__"]}),
         "other than .shape"),
    ],
)
def test_forged_graph_specs_are_one_line(forge: object, needle: str) -> None:
    spec = copy.deepcopy(make_checkpoint(trace(Residual().eval()).module)["arch"])
    ops = [(n["op"], n["target"]) for n in spec["nodes"]]
    assert ops[5] == ("call_function", "operator.mul") and ops[1] == ("call_method", "size"), ops
    forge(spec)  # type: ignore[operator]
    with pytest.raises(InputError) as refused:
        build_model(spec)
    line = str(refused.value)
    assert needle in line and "\n" not in line, line
