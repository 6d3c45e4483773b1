"""Transformer compression: surgery, per-head fusion, folding, ONNX, and the CLI end to end.

Oracles, each against the previous stage: original ↔ factorized (exact before training) ↔ fused
(unchanged when the fused vectors are exactly parallel) ↔ folded (per-head widths, FFN forms) ↔
onnxruntime.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from shared_runs import DIGITS, TRANSFORMER_DEFAULT, FinishedRun
from torch import nn

from rankshrink.errors import InputError, UnsupportedModelError
from rankshrink.fold.transformer_fold import fold_transformer
from rankshrink.fold.transformer_plan import export_bytes, ffn_features
from rankshrink.io.checkpoint import load_model
from rankshrink.methods.fusion import FusionPlan, fuse_
from rankshrink.methods.transformer_surgery import TransformerChain, factorize_transformer_
from rankshrink.models.arch import make_checkpoint
from rankshrink.models.transformer_layout import transformer_layout
from rankshrink.nn.encoder import EncoderConfig, TokenClassifier
from rankshrink.nn.factorized import FactorizedLinear
from rankshrink.nn.folded_encoder import AttentionWithOut, HeadwiseAttention, build_folded
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.train.rare_config import StepStats, TrainConfig
from rankshrink.train.rare_loop import fine_tune_

SMALL = EncoderConfig(
    tokens=5, token_dim=3, d_model=12, heads=3, layers=2, ffn=20, classes=4, dropout=0.0
)
HEAD_DIM = SMALL.d_model // SMALL.heads


def _model(seed: int = 0) -> TokenClassifier:
    torch.manual_seed(seed)
    return TokenClassifier(SMALL).eval()


def _x(n: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randn(
        n, SMALL.tokens * SMALL.token_dim, generator=torch.Generator().manual_seed(seed)
    )


def _factorize(
    model: TokenClassifier, axis_policy: str = "fold", ffn: bool = False
) -> TransformerChain:
    return factorize_transformer_(
        model, transformer_layout(model), axis_policy=axis_policy, ffn_fusion=ffn
    )


def _layer(chain: TransformerChain, name: str) -> FactorizedLinear:
    layer = chain.model.get_submodule(name)
    assert isinstance(layer, FactorizedLinear)
    return layer


def _fuse(layer: FactorizedLinear, axis: str, drop: int, keep: int, ratio: float) -> None:
    plan = FusionPlan(axis, torch.tensor([drop]), torch.tensor([keep]), torch.tensor([ratio]))
    fuse_(layer, plan, None)


def _reduced_head(layer: FactorizedLinear, axis: str) -> torch.Tensor:
    """Head id of each reduced row (or column), read back from P (or Q)."""
    m = layer.P if axis == "rows" else layer.Q
    head = torch.full((m.reduced,), -1)
    head[m.index] = torch.arange(m.size) // HEAD_DIM
    return head


def _fuse_within_heads(
    layer: FactorizedLinear,
    axis: str,
    count: int,
    gen: torch.Generator,
    only_head: int | None = None,
) -> None:
    """``count`` inexact fusions (ratios drawn at random), each between two vectors of one head."""
    for _ in range(count):
        head = _reduced_head(layer, axis)
        heads = [only_head] if only_head is not None else list(range(SMALL.heads))
        options = [h for h in heads if int((head == h).sum()) >= 2]
        if not options:
            return
        h = options[int(torch.randint(len(options), (1,), generator=gen))]
        members = torch.nonzero(head == h).flatten()
        pick = members[torch.randperm(len(members), generator=gen)[:2]]
        ratio = float(torch.empty(1).uniform_(-2.0, 2.0, generator=gen))
        _fuse(layer, axis, int(pick[0]), int(pick[1]), ratio)


# ---------------------------------------------------------------------------------------------
# Surgery.


def test_factorized_transformer_equals_the_original_exactly() -> None:
    model = _model()
    x = _x()
    with torch.no_grad():
        want = model(x)
        chain = _factorize(copy.deepcopy(model), axis_policy="longer", ffn=True)
        got = chain.model(x)
    assert torch.equal(got, want), f"max abs diff {float((got - want).abs().max()):.2e}, want 0"
    assert len(chain.layers) == 6 * SMALL.layers + 1, "q/k/v/out/ffn_in/ffn_out per block + head"


def test_protected_axes_and_head_groups() -> None:
    chain = _factorize(_model())
    pol = {p.name: p for p in chain.policies}
    heads = torch.arange(SMALL.d_model) // HEAD_DIM
    for i in range(SMALL.layers):
        a = f"layers.{i}.attn"
        # residual stream: never fused
        for name in (f"{a}.q", f"{a}.k", f"{a}.v", f"layers.{i}.ffn_in"):
            assert not pol[name].fuse_cols, f"{name} columns read the residual stream"
        for name in (f"{a}.out", f"layers.{i}.ffn_out"):
            assert not pol[name].fuse_rows, f"{name} rows write the residual stream"
        # "fold": one side of each head's pair fuses (the folded width is the min of both)
        assert pol[f"{a}.q"].fuse_rows and pol[f"{a}.v"].fuse_rows
        assert not pol[f"{a}.k"].fuse_rows and not pol[f"{a}.out"].fuse_cols
        assert torch.equal(pol[f"{a}.q"].row_groups, heads)
        assert torch.equal(pol[f"{a}.v"].row_groups, heads)
    assert not pol["head"].fuse_rows and not pol["head"].fuse_cols
    longer = {p.name: p for p in _factorize(_model(), axis_policy="longer").policies}
    assert longer["layers.0.attn.k"].fuse_rows and longer["layers.0.attn.out"].fuse_cols
    assert torch.equal(longer["layers.0.attn.out"].col_groups, heads)


def test_attention_models_without_linear_projections_are_refused() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    with pytest.raises(UnsupportedModelError, match="MultiheadAttention"):
        transformer_layout(Wrapped())


def test_exactly_parallel_rows_within_a_head_fuse_without_changing_the_function() -> None:
    """Plant an exactly parallel q row pair (and v pair) inside one head and an exactly parallel
    pair across two heads; the grouped search fuses the former and never the latter."""
    model = _model(seed=3)
    with torch.no_grad():
        for name in ("q", "v"):
            lin = getattr(model.layers[0].attn, name)
            lin.weight[1] = -2.5 * lin.weight[0]  # head 0, anti-parallel
            lin.bias[1] = -2.5 * lin.bias[0]
            lin.weight[HEAD_DIM] = 3.0 * lin.weight[2]  # head 1 vs head 0: must not fuse
            lin.bias[HEAD_DIM] = 3.0 * lin.bias[2]
    x = _x()
    with torch.no_grad():
        want = model(x)
    chain = _factorize(copy.deepcopy(model))
    # two steps of the real training loop with lr 0: the weights stay, so only fusion acts
    cfg = TrainConfig(
        steps=3, batch_size=4, lr=0.0, lambda_rank=0.0, lambda_l2=0.0, target_ratio=None,
        tau_cos=1e-6, tau_euc=1e-3,
    )  # fmt: skip
    y = torch.zeros(len(x), dtype=torch.long)
    report = fine_tune_(chain, x, y, None, cfg, size_fn=lambda: export_bytes(chain))
    assert report.fusions_by_layer["layers.0.attn.q"] == 1, report.fusions_by_layer
    assert report.fusions_by_layer["layers.0.attn.v"] == 1, report.fusions_by_layer
    assert report.fusions == 2, f"only the two in-head pairs may fuse: {report.fusions_by_layer}"
    with torch.no_grad():
        got = chain.model(x)
    diff = float((got - want).abs().max())
    assert diff <= 1e-5, f"exact in-head fusion changed the output: max abs diff {diff:.2e}"
    folded = fold_transformer(chain)
    with torch.no_grad():
        diff = float((folded.model(x) - want).abs().max())
    assert diff <= 1e-5, f"folded vs original after an exact fusion: max abs diff {diff:.2e}"
    assert folded.heads[0]["qk_widths"] == [HEAD_DIM - 1, HEAD_DIM, HEAD_DIM]
    assert folded.heads[0]["v_widths"] == [HEAD_DIM - 1, HEAD_DIM, HEAD_DIM]


# ---------------------------------------------------------------------------------------------
# Folding.


def _scenario(name: str) -> tuple[TransformerChain, torch.Tensor]:
    """A factorized model with inexact in-head fusions on every free axis (heads of different
    widths), and FFN fusions of the kind the scenario names."""
    model = _model(seed=5)
    if name == "ffn-duplicates":  # exact duplicate hidden units: equal rows, so r = 1
        with torch.no_grad():
            for layer in model.layers:
                for j in range(0, 12, 2):
                    layer.ffn_in.weight[j + 1] = layer.ffn_in.weight[j]
                    layer.ffn_in.bias[j + 1] = layer.ffn_in.bias[j]
    chain = _factorize(model, axis_policy="longer")
    gen = torch.Generator().manual_seed(7)
    for i in range(SMALL.layers):
        a = f"layers.{i}.attn"
        _fuse_within_heads(_layer(chain, f"{a}.q"), "rows", 3, gen, only_head=0)  # q narrower
        _fuse_within_heads(_layer(chain, f"{a}.k"), "rows", 2, gen, only_head=1)  # k narrower
        _fuse_within_heads(_layer(chain, f"{a}.v"), "rows", 3, gen)
        _fuse_within_heads(_layer(chain, f"{a}.out"), "cols", 3, gen)
        fin, fout = _layer(chain, f"layers.{i}.ffn_in"), _layer(chain, f"layers.{i}.ffn_out")
        if name == "ffn-index":
            for t in range(10):  # deep enough that gather/segment-sum beat the dense forms
                _fuse(fin, "rows", fin.reduced_shape[0] - 1, t, 0.6)  # pairs {t, 19 - t}
                _fuse(fout, "cols", fout.reduced_shape[1] - 1, t, -1.3)
        if name == "ffn-duplicates":
            for j in range(0, 12, 2):  # fuse each planted pair exactly (r = 1): equal scales
                k = j // 2  # earlier drops shifted the numbering by k
                _fuse(fin, "rows", j + 1 - k, j - k, 1.0)
    return chain, _x(11, seed=8)


@pytest.mark.parametrize("name", ["attention", "ffn-index", "ffn-duplicates"])
def test_folded_equals_factorized(name: str) -> None:
    chain, x = _scenario(name)
    with torch.no_grad():
        want = chain.model(x)
    folded = fold_transformer(chain)
    with torch.no_grad():
        got = folded.model(x)
    diff = float((got - want).abs().max())
    assert diff <= 2e-5, f"{name}: folded vs factorized max abs diff {diff:.2e} > 2e-5"
    assert not any(isinstance(m, FactorizedLinear) for m in folded.model.modules())

    widths = [w for h in folded.heads for w in h["qk_widths"] + h["v_widths"]]
    assert len(set(widths)) > 1, f"{name}: heads should end at different widths, got {widths}"
    for h in folded.heads:
        assert h["qk_widths"] == [min(a, b) for a, b in zip(h["q_rows"], h["k_rows"], strict=True)]
        assert h["v_widths"] == [min(a, b) for a, b in zip(h["v_rows"], h["out_cols"], strict=True)]

    # the size the training loop tracks is exactly what the folded model stores
    stored = sum(t.numel() * t.element_size() for t in folded.model.state_dict().values())
    assert export_bytes(chain) == stored, f"planned {export_bytes(chain)} B, stored {stored} B"
    for lf in folded.layers:  # never larger than the original layer
        out_f, in_f = lf.original_shape
        assert lf.bytes <= (out_f * in_f + out_f) * 4, f"{lf.name} grew: {lf}"
    kinds = {lf.name: lf.kind for lf in folded.layers}
    if name == "ffn-index":
        assert kinds["layers.0.ffn_in"] == "indexed(gather-out)", kinds
        assert kinds["layers.0.ffn_out"] == "indexed(segment-in)", kinds
    if name == "ffn-duplicates":
        assert kinds["layers.0.ffn_in"] == "dense-feature", kinds
        assert folded.layers[4].weight_shape == (SMALL.ffn - 6, SMALL.d_model)


def test_ffn_features_merge_only_exact_duplicates() -> None:
    from rankshrink.math.indexmap import IndexMap

    P = IndexMap(torch.tensor([0, 1, 0, 2, 1, 0]), torch.tensor([1.0, 2.0, 1.0, 1.0, -2.0, 0.5]), 3)
    index, scale, row_feature = ffn_features(P)
    assert index.tolist() == [0, 1, 2, 1, 0] and scale.tolist() == [1.0, 2.0, 1.0, -2.0, 0.5]
    assert row_feature.tolist() == [0, 1, 0, 2, 3, 4]


@pytest.mark.parametrize(
    ("qk", "v"), [([3, 1, 2], [2, 4, 1]), ([2, 2, 2, 3], [4, 4, 4, 1]), ([4, 4], [4, 4])]
)
def test_headwise_attention_equals_one_attention_per_head(qk: list[int], v: list[int]) -> None:
    """Runs of equal-width heads are batched; the result is the plain per-head loop."""
    torch.manual_seed(sum(qk))
    core = HeadwiseAttention(8, qk, v)
    x = torch.randn(3, 6, 8, dtype=torch.float64)
    core = core.double()
    W, b = core.qkv.weight, core.qkv.bias
    q_at = np.cumsum([0, *qk])
    k_at = q_at + sum(qk)
    v_at = np.cumsum([0, *v]) + 2 * sum(qk)
    want = []
    for h in range(len(qk)):
        q = x @ W[q_at[h] : q_at[h + 1]].T + b[q_at[h] : q_at[h + 1]]
        k = x @ W[k_at[h] : k_at[h + 1]].T + b[k_at[h] : k_at[h + 1]]
        val = x @ W[v_at[h] : v_at[h + 1]].T + b[v_at[h] : v_at[h + 1]]
        want.append(torch.softmax(q @ k.transpose(1, 2), -1) @ val)
    with torch.no_grad():
        diff = float((core(x) - torch.cat(want, -1)).abs().max())
    assert diff <= 1e-12, f"headwise attention vs a per-head loop: max abs diff {diff:.2e}"


def test_headwise_attention_handles_any_length_and_ignores_masked_keys() -> None:
    torch.manual_seed(0)
    core = HeadwiseAttention(8, [1, 3, 3], [4, 2, 2])
    x = torch.randn(2, 7, 8)
    bias = torch.zeros(2, 1, 7)
    bias[:, :, 5:] = -math.inf  # keys 5, 6 are padding
    with torch.no_grad():
        masked = core(x, bias)[:, :5]
        short = core(x[:, :5])
    assert masked.shape == (2, 5, 8)
    diff = float((masked - short).abs().max())
    assert diff <= 1e-6, f"padding keys changed unpadded outputs: max abs diff {diff:.2e}"


class _BertLikeSelf(nn.Module):
    """q/k/v only, returning the heads side by side (like BERT's BertSelfAttention)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.heads, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(C // self.heads)
        if attn_bias is not None:
            scores = scores + attn_bias.unsqueeze(1)
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(B, T, C)


class _BertLikeBlock(nn.Module):
    """Post-LN block whose output projection lives outside the attention module."""

    def __init__(self, width: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.attention = _BertLikeSelf(width, heads)
        self.dense = nn.Linear(width, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.intermediate = nn.Linear(width, 2 * width)
        self.output = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln1(x + self.dense(self.attention(x, attn_bias)))
        return self.ln2(h + self.output(torch.nn.functional.gelu(self.intermediate(h))))


def test_a_layout_with_the_output_projection_outside_attention_folds_with_masks() -> None:
    """The surgery and fold reach a block through module names alone (as a BERT layout will):
    the core replaces ``attention``, the output projection stays at ``dense``; masks and any
    sequence length pass through."""
    from rankshrink.models.transformer_layout import BlockLayout, TransformerLayout

    torch.manual_seed(11)
    block = _BertLikeBlock().eval()
    layout = TransformerLayout(
        (
            BlockLayout(
                name="block", q="attention.q", k="attention.k", v="attention.v", out="dense",
                ffn_in="intermediate", ffn_out="output", attention="attention", out_inside=False,
                heads=3,
            ),
        )
    )  # fmt: skip
    chain = factorize_transformer_(block, layout, axis_policy="longer")
    gen = torch.Generator().manual_seed(12)
    for name, axis in (("attention.q", "rows"), ("attention.v", "rows"), ("dense", "cols")):
        _fuse_within_heads(_layer(chain, name), axis, 4, gen)
    folded = fold_transformer(chain).model
    assert isinstance(folded.attention, HeadwiseAttention) and isinstance(folded.dense, nn.Linear)
    for T in (4, 9):
        x = torch.randn(2, T, 12, generator=gen)
        bias = torch.zeros(2, 1, T)
        bias[1, :, T - 2 :] = -math.inf  # the second sequence is padded
        with torch.no_grad():
            diff = float((folded(x, bias) - chain.model(x, bias)).abs().max())
        assert diff <= 2e-5, f"T={T}: folded vs factorized with a mask: max abs diff {diff:.2e}"


# ---------------------------------------------------------------------------------------------
# Training: fusion phase, then a plain recovery phase.


def test_recovery_phase_fuses_nothing_and_progress_spans_both_phases() -> None:
    from rankshrink.train.recovery import RecoveryConfig, fine_tune_with_recovery_

    chain = _factorize(_model(seed=9))
    x = _x(64, seed=10)
    y = torch.randint(0, SMALL.classes, (64,), generator=torch.Generator().manual_seed(11))
    cfg = TrainConfig(steps=20, batch_size=16, target_ratio=0.5, tau_cos=0.3, tau_euc=2.0)
    seen: list[tuple[int, int, int]] = []
    sizes: dict[int, int] = {}

    def progress(stats: StepStats) -> None:
        seen.append((stats.step, stats.steps, stats.fusions))
        sizes[stats.step] = export_bytes(chain)

    report = fine_tune_with_recovery_(
        chain, x, y, None, cfg, RecoveryConfig(fraction=0.25), lambda: export_bytes(chain), progress
    )
    assert [s[0] for s in seen] == list(range(1, 21)) and {s[1] for s in seen} == {20}
    assert report.steps == 20 and report.fusions > 0, report
    assert len({sizes[step] for step in range(15, 21)}) == 1, "the recovery phase changed the size"
    assert {s[2] for s in seen[15:]} == {report.fusions}


# ---------------------------------------------------------------------------------------------
# ONNX and checkpoints.


def _ort(path: Path, x: torch.Tensor, threads: int) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_folded_onnx_matches_torch_at_two_batch_sizes(tmp_path: Path) -> None:
    chain, x = _scenario("ffn-index")
    folded = fold_transformer(chain).model
    path = tmp_path / "folded.onnx"
    export_onnx(folded, x[:4], path, ExportConfig())
    for batch, threads in ((1, 1), (11, 2)):
        with torch.no_grad():
            want = folded(x[:batch]).numpy()
        got = _ort(path, x[:batch], threads)
        diff = float(np.abs(got - want).max())
        assert diff <= 1e-5, f"onnxruntime vs torch at batch {batch}: max abs diff {diff:.2e}"


def test_folded_checkpoint_round_trips(tmp_path: Path) -> None:
    chain, x = _scenario("ffn-index")
    folded = fold_transformer(chain).model
    torch.save(make_checkpoint(folded, {"note": "t"}), tmp_path / "f.pt")
    loaded = load_model(tmp_path / "f.pt")
    with torch.no_grad():
        assert torch.equal(loaded.model(x), folded(x)), "the reloaded folded model differs"
    assert isinstance(loaded.model.layers[0].attn, AttentionWithOut)

    # a forged spec is refused before anything is allocated
    for edit, needle in (
        (lambda b: b.__setitem__("qk_widths", [1, 2]), "qk_widths"),
        (lambda b: b.__setitem__("v_widths", [HEAD_DIM + 1, 1, 1]), "v_widths"),
        (lambda b: b["ffn_in"].__setitem__("core", [10**9, SMALL.d_model]), "exceeds"),
        (lambda b: b["ffn_out"].__setitem__("in_groups", [3]), "in_groups"),
        (lambda b: b.__setitem__("ffn_out", {"kind": "conv"}), "unknown layer kind"),
    ):
        spec = make_checkpoint(folded)["arch"]
        edit(spec["blocks"][0])
        with pytest.raises(InputError, match=needle):
            build_folded(spec)


# ---------------------------------------------------------------------------------------------
# The CLI end to end on the bundled sample at the defaults: one run per session, shared by the
# two tests below and tests/pipeline/test_determinism.py (``--out t.onnx --save-pt t.pt``).


@pytest.mark.cli_run(*TRANSFORMER_DEFAULT)
def test_cli_compresses_the_sample_transformer(cli_run: FinishedRun) -> None:
    cli_run.check_ok()
    rep, out = cli_run.report(), cli_run.dir / "t.onnx"
    ver = rep["verification"]
    assert rep["model_family"] == "transformer"
    assert ver["passed"], ver["failures"]
    assert ver["export_max_abs_diff"] <= 1e-4, ver
    assert ver["fold_max_abs_diff"] <= 1e-4, ver
    assert rep["onnx_bytes_after"] == out.stat().st_size
    assert rep["onnx_bytes_after"] < rep["onnx_bytes_before"], "the default run must shrink it"
    assert rep["config"]["train"]["target_ratio"] == 0.7, "the Transformer default target"
    names = [lay["name"] for lay in rep["layers"]]
    assert (
        names[:6]
        == [
            "layers.0.attn.q",
            "layers.0.attn.k",
            "layers.0.attn.v",
            "layers.0.attn.out",
            "layers.0.ffn_in",
            "layers.0.ffn_out",
        ]
        and names[-1] == "head"
    )
    heads = rep["attention_heads"]
    assert [h["block"] for h in heads] == ["layers.0", "layers.1"]
    assert all(len(h["qk_widths"]) == 4 and max(h["qk_widths"]) <= 16 for h in heads)

    # the saved checkpoint reloads safely and computes what the ONNX computes
    loaded = load_model(cli_run.dir / "t.pt")
    data = np.load(DIGITS)
    x = torch.from_numpy(data["x"][data["test_idx"][:16]])
    with torch.no_grad():
        want = loaded.model(x).numpy()
    diff = float(np.abs(_ort(out, x, 1) - want).max())
    assert diff <= 1e-4, f"saved checkpoint vs written ONNX: max abs diff {diff:.2e}"


@pytest.mark.slow
@pytest.mark.cli_run(*TRANSFORMER_DEFAULT)
def test_cli_defaults_meet_the_transformer_acceptance_numbers(cli_run: FinishedRun) -> None:
    cli_run.check_ok()
    rep = cli_run.report()
    ver = rep["verification"]
    assert ver["passed"], ver["failures"]
    assert rep["onnx_ratio"] <= 0.75, f"ONNX size ratio {rep['onnx_ratio']:.3f} > 0.75"
    drop = ver["accuracy_before"] - ver["accuracy_after"]
    assert drop <= 1.0, f"test accuracy drop {drop:.2f} points > 1"
    assert ver["export_max_abs_diff"] <= 1e-4, ver["export_max_abs_diff"]
