"""Verification is only worth something if its own runs can be trusted.

- sessions are single-threaded and sequential, and the check runs twice: outputs must be
  bit-identical;
- graphs with order-dependent scatters (``reduction=...``) are refused before anything runs;
- constant indices outside the tensor they index are refused before anything runs;
- an ONNX file onnxruntime cannot run on the data is bad input (exit 2), not a traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.errors import InputError
from rankshrink.models.arch import make_checkpoint
from rankshrink.nn.indexed import IndexedLinear
from rankshrink.onnx import session as session_mod
from rankshrink.onnx import verify
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.onnx.graph_scan import UntrustedGraphError, scan_graph
from rankshrink.onnx.session import session
from rankshrink.onnx.task import Tolerances
from rankshrink.onnx.verify import verify_export

X = torch.from_numpy(np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32))


def _indexed_model() -> nn.Sequential:
    """8 inputs -> segment-sum to 4 -> 3x4 core -> gather to 5 outputs: two Gathers in ONNX."""
    torch.manual_seed(0)
    layer = IndexedLinear(
        torch.randn(3, 4),
        torch.randn(3),
        in_index=torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]),
        in_scale=torch.ones(4, 2),
        out_index=torch.tensor([0, 1, 2, 2, 1]),
        out_scale=torch.ones(5),
        in_features=8,
    )
    return nn.Sequential(layer).eval()


@pytest.fixture(scope="module")
def indexed_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "indexed.onnx"
    export_onnx(_indexed_model(), X[:4], path, ExportConfig())
    return path


def _graph_with(node: onnx.NodeProto, *consts: onnx.TensorProto, opset: int = 18) -> bytes:
    """x (batch, 8) -> node -> y, with ``consts`` as initializers."""
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=list(consts),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model.SerializeToString()


def _scatter(op: str, reduction: str) -> bytes:
    if op == "ScatterND":  # element (0, 1) updated twice: the sum's order is unspecified
        idx, upd = np.array([[0, 1], [0, 1]], np.int64), np.array([1.0, 2.0], np.float32)
        kwargs = {}
    else:
        idx, upd = np.array([[1, 1]], np.int64), np.array([[1.0, 2.0]], np.float32)
        kwargs = {"axis": 1}
    node = helper.make_node(op, ["x", "idx", "upd"], ["y"], reduction=reduction, **kwargs)
    return _graph_with(
        node, numpy_helper.from_array(idx, "idx"), numpy_helper.from_array(upd, "upd")
    )


@pytest.mark.parametrize("op", ["ScatterND", "ScatterElements"])
def test_scatter_with_a_reduction_is_refused(tmp_path: Path, op: str) -> None:
    safe, unsafe = tmp_path / "none.onnx", tmp_path / "add.onnx"
    safe.write_bytes(_scatter(op, "none"))
    unsafe.write_bytes(_scatter(op, "add"))
    assert scan_graph(safe).problems == []  # the check is about the reduction, not the op

    problems = scan_graph(unsafe).problems
    assert len(problems) == 1 and op in problems[0] and "reduction='add'" in problems[0]
    with pytest.raises(UntrustedGraphError, match="cannot vouch"):
        verify_export(nn.Identity(), None, unsafe, X, None, Tolerances())
    # the file runs fine in onnxruntime: only the scan stands between it and a "passed"
    assert session_mod.run(session(unsafe), X).shape == (40, 8)


def test_exported_gathers_have_their_index_ranges_checked(indexed_onnx: Path) -> None:
    scan = scan_graph(indexed_onnx)
    assert scan.problems == []
    assert scan.index_tensors_checked == 2  # the segment-sum's and the output gather's


@pytest.mark.parametrize(
    ("bad", "extent"),
    [(8, 8), (-9, 8)],  # the input Gather indexes x's 8 features; valid: [-8, 8)
    ids=["past the end", "before the start"],
)
def test_out_of_range_constant_index_is_refused(
    indexed_onnx: Path, tmp_path: Path, bad: int, extent: int
) -> None:
    model = onnx.load(str(indexed_onnx))
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "x")
    init = next(t for t in model.graph.initializer if t.name == gather.input[1])
    values = numpy_helper.to_array(init).copy()
    values[3] = bad
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))

    problems = scan_graph(tampered).problems
    assert len(problems) == 1, problems
    assert f"index {bad} outside [-{extent}, {extent})" in problems[0]
    with pytest.raises(UntrustedGraphError):
        verify_export(_indexed_model(), None, tampered, X, None, Tolerances())

    # and from the command line: exit 3, one line, no traceback
    ckpt, data = tmp_path / "orig.pt", tmp_path / "data.npz"
    torch.save(make_checkpoint(nn.Sequential(nn.Linear(8, 5))), ckpt)
    np.savez(data, x=X.numpy())
    result = CliRunner().invoke(app, ["verify", str(ckpt), str(tampered), "--data", str(data)])
    assert result.exit_code == 3, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot vouch"), result.output
    assert "Traceback" not in result.output


def test_two_runs_must_give_identical_outputs(
    indexed_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _indexed_model()
    passed = verify_export(model, model, indexed_onnx, X, None, Tolerances())
    assert passed.passed, passed.failures

    real_run, calls = session_mod.run, []

    def drifting(sess: object, x: torch.Tensor, io: object) -> np.ndarray:
        calls.append(len(x))
        out = real_run(sess, x, io)  # type: ignore[arg-type]
        # the second whole-split run (the repeat, in a new session) comes back one ulp off
        return np.nextafter(out, np.inf) if calls.count(len(X)) == 2 else out

    monkeypatch.setattr(verify, "run", drifting)
    result = verify_export(model, model, indexed_onnx, X, None, Tolerances())
    assert not result.passed
    assert any("two identical runs" in f for f in result.failures), result.failures


def test_nan_outputs_fail_verification(indexed_onnx: Path, tmp_path: Path) -> None:
    """NaN compares false with every tolerance; it must fail, not slip through as "passed"."""
    model = onnx.load(str(indexed_onnx))
    weight = next(t for t in model.graph.initializer if t.name.endswith("weight"))
    values = numpy_helper.to_array(weight).copy()
    values[0, 0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    poisoned = tmp_path / "nan.onnx"
    onnx.save(model, str(poisoned))
    torch_model = _indexed_model()
    result = verify_export(torch_model, torch_model, poisoned, X, None, Tolerances())
    assert not result.passed
    assert any("NaN or Inf on 40 of 40" in f for f in result.failures), result.failures
    assert any("export max abs diff nan" in f for f in result.failures), result.failures


def test_check_sessions_are_single_threaded_and_sequential(indexed_onnx: Path) -> None:
    opts = session(indexed_onnx).get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == session_mod.ort.ExecutionMode.ORT_SEQUENTIAL


def test_onnx_that_cannot_run_on_the_data_is_bad_input(tmp_path: Path) -> None:
    narrow = tmp_path / "narrow.onnx"  # expects 7 features; the data has 8
    export_onnx(nn.Sequential(nn.Linear(7, 5)).eval(), X[:4, :7], narrow, ExportConfig())
    with pytest.raises(InputError, match="onnxruntime cannot run"):
        session_mod.run(session(narrow), X)
    ckpt, data = tmp_path / "orig.pt", tmp_path / "data.npz"
    torch.save(make_checkpoint(nn.Sequential(nn.Linear(8, 5))), ckpt)
    np.savez(data, x=X.numpy())
    # `verify` reads the file's widths before running it: another model's file, exit 3 (gates.py)
    result = CliRunner().invoke(app, ["verify", str(ckpt), str(narrow), "--data", str(data)])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    assert "does not belong to this model: it takes 7 input features, the model takes 8" in (
        result.stderr
    )
