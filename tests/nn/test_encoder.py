"""The Transformer encoder sample: spec round-trip, attention oracle, checkpoint, CLI behaviour."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from shared_runs import DIGITS, TRANSFORMER
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.errors import InputError
from rankshrink.io.checkpoint import load_model
from rankshrink.models.arch import CHECKPOINT_FORMAT, build_model, make_checkpoint
from rankshrink.nn.encoder import (
    EncoderConfig,
    SelfAttention,
    TokenClassifier,
    build_encoder,
    encoder_spec,
)

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = TRANSFORMER

runner = CliRunner()

SMALL = EncoderConfig(
    tokens=5, token_dim=3, d_model=12, heads=3, layers=2, ffn=20, classes=4, dropout=0.1
)


def _small_model(seed: int = 0) -> TokenClassifier:
    torch.manual_seed(seed)
    return TokenClassifier(SMALL).eval()


def _valid_spec() -> dict[str, Any]:
    return encoder_spec(_small_model())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The bundled sample.


def test_sample_loads_with_weights_only_and_rebuilds() -> None:
    assert SAMPLE.stat().st_size < 1_000_000, f"sample is {SAMPLE.stat().st_size:,} bytes"
    ckpt = torch.load(SAMPLE, weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT
    assert ckpt["arch"] == {
        "type": "token_classifier",
        "tokens": 8,
        "token_dim": 8,
        "d_model": 64,
        "heads": 4,
        "layers": 2,
        "ffn": 128,
        "classes": 10,
        "dropout": 0.1,
    }
    model = build_model(ckpt["arch"])
    assert isinstance(model, TokenClassifier)
    model.load_state_dict(ckpt["state_dict"], strict=True)
    for key in ("description", "seed", "epochs", "train_accuracy", "test_accuracy"):
        assert key in ckpt["meta"], f"meta lacks {key!r}"

    loaded = load_model(SAMPLE)
    assert loaded.source == "checkpoint" and isinstance(loaded.model, TokenClassifier)
    assert not loaded.model.training


def test_sample_reported_test_accuracy_is_reproduced() -> None:
    loaded = load_model(SAMPLE)
    data = np.load(DIGITS)
    test = data["test_idx"]
    x, y = torch.from_numpy(data["x"][test]), torch.from_numpy(data["y"][test])
    with torch.no_grad():
        logits = loaded.model(x)
    accuracy = 100.0 * int((logits.argmax(1) == y).sum()) / len(y)
    assert accuracy == loaded.meta["test_accuracy"], (
        f"test accuracy {accuracy} != {loaded.meta['test_accuracy']} recorded in the checkpoint"
    )
    assert accuracy >= 95.0, f"sample test accuracy {accuracy:.2f}% is below 95%"


def test_sample_generator_is_deterministic(tmp_path: Path) -> None:
    """Two runs of make_transformer_digits write identical bytes (2 epochs over 256 training
    samples, to stay fast: shuffling, dropout and the schedule still run across epochs)."""
    spec = importlib.util.spec_from_file_location(
        "make_samples", ROOT / "sample_models" / "make_samples.py"
    )
    assert spec is not None and spec.loader is not None
    make_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_samples)
    data = dict(np.load(DIGITS))
    data["train_idx"] = data["train_idx"][:256]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as make_samples.main does; intra-op splits change float sums
    try:
        digests = []
        for run in ("a", "b"):
            (tmp_path / run).mkdir()
            make_samples.make_transformer_digits(tmp_path / run, data, epochs=2)
            digests.append(_sha(tmp_path / run / "transformer_digits.pt"))
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1], "two seeded runs wrote different transformer_digits.pt"


# ---------------------------------------------------------------------------------------------
# Spec round-trip.


def test_spec_round_trip_same_state_dict_and_outputs() -> None:
    model = _small_model(seed=1)
    spec = encoder_spec(model)
    assert json.loads(json.dumps(spec)) == spec, "the spec must hold plain JSON values only"
    rebuilt = build_encoder(spec)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    assert got == want
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    rebuilt.eval()
    x = torch.randn(7, SMALL.tokens * SMALL.token_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x)), "rebuilt model computes something else"


def test_checkpoint_round_trip_through_load_model(tmp_path: Path) -> None:
    model = _small_model(seed=3)
    torch.save(make_checkpoint(model, {"note": "test"}), tmp_path / "enc.pt")
    loaded = load_model(tmp_path / "enc.pt")
    x = torch.randn(4, 15, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.meta == {"note": "test"}


def test_num_params_matches_the_built_model() -> None:
    """The bound checked before allocation must count what the model really holds."""
    for config in (SMALL, EncoderConfig(8, 8, 64, 4, 2, 128, 10, 0.1)):
        model = TokenClassifier(config)
        assert config.num_params() == sum(p.numel() for p in model.parameters())


def test_spec_refuses_a_model_that_no_longer_matches_its_config() -> None:
    model = _small_model()
    model.layers[0].ffn_in = nn.Linear(SMALL.d_model, SMALL.ffn - 1)  # e.g. after a fusion
    with pytest.raises(InputError, match=r"layers\.0\.ffn_in"):
        encoder_spec(model)


def test_make_checkpoint_refuses_other_modules() -> None:
    with pytest.raises(InputError, match="cannot describe a Linear"):
        make_checkpoint(nn.Linear(2, 2))


def test_wrong_input_width_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"expected inputs of shape \(batch, 15\)"):
        _small_model()(torch.zeros(2, 16))


# ---------------------------------------------------------------------------------------------
# The explicit attention against torch's fused kernel (an oracle).


@pytest.mark.parametrize(
    ("d_model", "heads", "tokens", "dtype", "atol"),
    [
        (12, 3, 5, torch.float64, 1e-12),
        (64, 4, 8, torch.float64, 1e-12),
        (64, 4, 8, torch.float32, 1e-5),
        (16, 1, 9, torch.float32, 1e-5),
        (32, 8, 3, torch.float32, 1e-5),
    ],
)
def test_attention_equals_scaled_dot_product_attention(
    d_model: int, heads: int, tokens: int, dtype: torch.dtype, atol: float
) -> None:
    torch.manual_seed(d_model * heads + tokens)
    attn = SelfAttention(d_model, heads).to(dtype)
    x = torch.randn(6, tokens, d_model, dtype=dtype)
    B, T, C, D = 6, tokens, d_model, d_model // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, T, heads, D).transpose(1, 2)

    with torch.no_grad():
        got = attn(x)
        mixed = F.scaled_dot_product_attention(split(attn.q(x)), split(attn.k(x)), split(attn.v(x)))
        want = attn.out(mixed.transpose(1, 2).reshape(B, T, C))
    diff = float((got - want).abs().max())
    assert diff <= atol, (
        f"explicit attention vs F.scaled_dot_product_attention: max abs diff {diff:.2e} > {atol:.0e}"
    )


def test_attention_is_not_trivially_uniform() -> None:
    """Guard for the oracle: with these weights the softmax really is far from uniform."""
    torch.manual_seed(0)
    attn = SelfAttention(16, 2)
    x = torch.randn(1, 6, 16) * 3
    with torch.no_grad():
        q = attn.q(x).view(1, 6, 2, 8).transpose(1, 2)
        k = attn.k(x).view(1, 6, 2, 8).transpose(1, 2)
        weights = F.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
    assert float(weights.max()) > 2.0 / 6, "attention weights are nearly uniform"


# ---------------------------------------------------------------------------------------------
# Every bad spec field is an InputError of one line that names the field.

Edit = Callable[[dict[str, Any]], None]


def _set(key: str, value: Any) -> Edit:
    return lambda spec: spec.__setitem__(key, value)


def _drop(key: str) -> Edit:
    return lambda spec: spec.pop(key)


INT_FIELDS = ("tokens", "token_dim", "d_model", "heads", "layers", "ffn", "classes")
BAD_SPECS: list[tuple[str, Edit, str]] = [
    *(
        (f"{field} {label}", _set(field, value), field)
        for field in INT_FIELDS
        for label, value in (
            ("zero", 0),
            ("negative", -3),
            ("float", 4.0),
            ("bool", True),
            ("string", "8"),
            ("none", None),
            ("huge", 2**40),
        )
    ),
    *((f"{field} missing", _drop(field), field) for field in INT_FIELDS),
    ("dropout negative", _set("dropout", -0.1), "dropout"),
    ("dropout one", _set("dropout", 1.0), "dropout"),
    ("dropout nan", _set("dropout", float("nan")), "dropout"),
    ("dropout inf", _set("dropout", float("inf")), "dropout"),
    ("dropout string", _set("dropout", "0.1"), "dropout"),
    ("dropout bool", _set("dropout", False), "dropout"),
    ("dropout missing", _drop("dropout"), "dropout"),
    ("d_model not divisible by heads", _set("heads", 5), "divisible by heads"),
    ("unknown field", _set("bias", True), "bias"),
    ("wrong type", _set("type", "sequential_v2"), "type"),
    (
        "too many parameters",
        lambda s: s.update(d_model=2**15, heads=1, ffn=2**15, layers=64),
        "parameters",
    ),
]


@pytest.mark.parametrize(
    ("edit", "needle"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_bad_spec_field_is_input_error_naming_it(edit: Edit, needle: str) -> None:
    spec = _valid_spec()
    edit(spec)
    with pytest.raises(InputError) as info:
        build_encoder(spec)
    message = str(info.value)
    assert "\n" not in message, f"error is not one line: {message!r}"
    assert needle in message, f"error should name {needle!r}: {message!r}"


@pytest.mark.parametrize("arch", [None, [], "token_classifier", {"type": "conv"}, {}])
def test_build_model_names_the_supported_types(arch: Any) -> None:
    with pytest.raises(InputError, match="supported: 'sequential', 'token_classifier'"):
        build_model(arch)


def test_encoder_spec_is_not_a_dict() -> None:
    with pytest.raises(InputError, match="must be a dict"):
        build_encoder(["token_classifier"])  # type: ignore[arg-type]


def test_bad_spec_in_a_file_exits_2_naming_file_and_field(tmp_path: Path) -> None:
    ckpt = make_checkpoint(_small_model())
    ckpt["arch"]["heads"] = 0
    path = tmp_path / "bad_heads.pt"
    torch.save(ckpt, path)
    result = runner.invoke(app, ["inspect", str(path)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert str(path) in lines[0] and "heads" in lines[0], result.output


# ---------------------------------------------------------------------------------------------
# CLI: inspect; compress refuses bad data before any work (compression itself:
# tests/methods/test_transformer.py).


def test_inspect_lists_every_linear_layer() -> None:
    result = runner.invoke(app, ["inspect", str(SAMPLE), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["layers"]
    model = load_model(SAMPLE).model
    want = [
        (name, [m.out_features, m.in_features])
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
    ]
    assert [(r["name"], r["shape"]) for r in rows] == want
    assert len(rows) == 2 + 6 * 2  # embed, head, and q/k/v/out/ffn_in/ffn_out per layer

    result = runner.invoke(app, ["inspect", str(SAMPLE)])
    assert result.exit_code == 0, result.output
    assert "layers.1.attn.q" in result.stdout and "128×64" in result.stdout


def _fail_if_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a refused run reached fine-tuning")

    monkeypatch.setattr("rankshrink.pipeline.rare_stage.fine_tune_", reached)


def test_compress_transformer_with_wrong_data_width_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_if_reached(monkeypatch)
    data = tmp_path / "narrow.npz"
    np.savez(data, x=np.zeros((20, 63), np.float32), y=np.zeros(20, np.int64))
    out = tmp_path / "out.onnx"
    result = runner.invoke(
        app, ["compress", str(SAMPLE), "--data", str(data), "--out", str(out), "--quiet"]
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    assert "expects 64 input features; the data has 63" in lines[0], result.output
