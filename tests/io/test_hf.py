"""Hugging Face BERT folders: safe loading, token data, padding, compress → export → verify,
``verify`` and ``inspect`` on a folder, and ``--save-pt`` checkpoints of the compressed encoder.

Oracles: the ``transformers`` forward ↔ rankshrink's :class:`TokenEncoder` (same weights) ↔ the
compressed ONNX run by onnxruntime at batch sizes and sequence lengths the export never saw ↔ the
``--save-pt`` checkpoint rebuilt by ``load_model``. Folders are tiny random configs written locally
with ``save_pretrained``; nothing is downloaded (the other families: ``test_hf_families.py``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from rankshrink.cli.app import app
from rankshrink.errors import InputError

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'rankshrink[hf]')"
)

from rankshrink.io.checkpoint import load_model  # noqa: E402
from rankshrink.io.hf_folder import TokenEncoder, load_hf_folder  # noqa: E402
from rankshrink.models.arch import make_checkpoint  # noqa: E402
from rankshrink.onnx.tokens import padded  # noqa: E402

runner = CliRunner()
VOCAB, T = 100, 16
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)




def _save(path: Path, arch: str, seed: int = 0, **extra: int) -> Path:
    torch.manual_seed(seed)
    config = transformers.BertConfig(**SIZES, **extra)
    getattr(transformers, arch)(config).eval().save_pretrained(path, safe_serialization=True)
    return path


def _tokens(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded sequences of 4..T tokens: ids, mask, two segments."""
    g = np.random.default_rng(seed)
    ids = g.integers(1, VOCAB, (n, T))
    mask = np.ones((n, T), dtype=np.int64)
    types = np.zeros((n, T), dtype=np.int64)
    for i, length in enumerate(g.integers(4, T + 1, n)):
        mask[i, length:] = 0
        ids[i, length:] = 0
        types[i, length // 2 : length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "base": _save(root / "base", "BertModel"),
        "classifier": _save(root / "cls", "BertForSequenceClassification", num_labels=3),
    }


def _hf(folder: Path) -> torch.nn.Module:
    cls = getattr(
        transformers, json.loads((folder / "config.json").read_text())["architectures"][0]
    )
    return cls.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()


def _one_error_line(result, *needles: str) -> str:
    shown = f"exit {result.exit_code}\n{result.output}"
    assert result.exit_code == 2, shown
    assert "Traceback" not in result.output, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for needle in needles:
        assert needle in lines[0], shown
    return lines[0]


# -- loading -----------------------------------------------------------------------------------


@torch.no_grad()
def test_encoder_matches_transformers_and_ignores_padding(folders: dict[str, Path]) -> None:
    batch = {k: torch.from_numpy(v) for k, v in _tokens(6, seed=3).items()}
    mask = batch["attention_mask"].bool()
    for kind, folder in folders.items():
        theirs = _hf(folder)(**batch)
        encoder = load_hf_folder(folder).model
        assert isinstance(encoder, TokenEncoder) and encoder.kind == kind
        ours = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        if kind == "base":
            torch.testing.assert_close(
                ours[mask], theirs.last_hidden_state[mask], atol=1e-5, rtol=0
            )
        else:
            torch.testing.assert_close(ours, theirs.logits, atol=1e-5, rtol=0)
        # three more padding tokens change no unpadded output
        x = torch.stack([batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")], 1)
        longer = padded(x)
        out = encoder(longer[:, 0], longer[:, 1], longer[:, 2])
        if kind == "base":
            out, ours = out[:, :T][mask], ours[mask]
        torch.testing.assert_close(out, ours, atol=1e-6, rtol=0)


def test_sharded_safetensors_load(tmp_path: Path, folders: dict[str, Path]) -> None:
    model = _hf(folders["base"])
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    a = load_hf_folder(folders["base"]).model.state_dict()
    b = load_hf_folder(tmp_path / "sharded").model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unsafe_or_unsupported_folders_are_refused(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    data = tmp_path / "tokens.npz"
    np.savez(data, **_tokens(20))

    def compress(folder: Path):
        out = tmp_path / "out.onnx"
        return runner.invoke(
            app, ["compress", str(folder), "--data", str(data), "--out", str(out), "-q"]
        )

    # pickled weights only
    pickled = tmp_path / "pickled"
    shutil.copytree(folders["base"], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    _one_error_line(compress(pickled), "pytorch_model.bin", "safetensors only")
    # an index pointing outside the folder
    escape = tmp_path / "escape"
    shutil.copytree(folders["base"], escape)
    (escape / "model.safetensors").rename(tmp_path / "outside.safetensors")
    index = {"metadata": {}, "weight_map": {"pooler.dense.bias": "../outside.safetensors"}}
    (escape / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_error_line(compress(escape), "plain .safetensors file name")
    # custom code
    remote = tmp_path / "remote"
    shutil.copytree(folders["base"], remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (remote / "config.json").write_text(json.dumps(config))
    _one_error_line(compress(remote), "trust_remote_code")
    # an architecture outside the supported list
    other = tmp_path / "other"
    shutil.copytree(folders["base"], other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (other / "config.json").write_text(json.dumps(config))
    _one_error_line(compress(other), "BertForMaskedLM", "not supported")
    assert not (tmp_path / "out.onnx").exists()


def test_bad_token_data_is_refused(tmp_path: Path, folders: dict[str, Path]) -> None:
    out = tmp_path / "out.onnx"
    cases = {
        "dense.npz": ({"x": np.zeros((10, 4), np.float32)}, "input_ids"),
        "vocab.npz": ({"input_ids": np.full((10, 4), VOCAB)}, f"outside [0, {VOCAB})"),
        "long.npz": ({"input_ids": np.ones((10, 65), np.int64)}, "exceed the model's 64"),
        "mask.npz": (
            {"input_ids": np.ones((10, 4), np.int64), "attention_mask": np.zeros((10, 4))},
            "expected integers",
        ),
        "empty.npz": (
            {"input_ids": np.ones((10, 4), np.int64), "attention_mask": np.zeros((10, 4), int)},
            "mask out every token",
        ),
    }
    for name, (arrays, needle) in cases.items():
        np.savez(tmp_path / name, **arrays)
        result = runner.invoke(
            app,
            ["compress", str(folders["base"]), "--data", str(tmp_path / name), "--out", str(out)],
        )
        _one_error_line(result, needle)
    assert not out.exists()


def test_missing_transformers_is_one_line(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    with pytest.raises(InputError, match=r"pip install 'rankshrink\[hf\]'"):
        load_hf_folder(folders["base"])
    np.savez(tmp_path / "tokens.npz", **_tokens(10))
    result = runner.invoke(
        app, ["compress", str(folders["base"]), "--data", str(tmp_path / "tokens.npz")]
    )
    _one_error_line(result, "rankshrink[hf]")


# -- end to end ----------------------------------------------------------------------------------


def _run_onnx(path: Path, tokens: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sorted(i.name for i in sess.get_inputs()) == sorted(tokens)
    return sess.run(None, tokens)[0]


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)


@pytest.mark.slow
def test_base_model_compresses_exports_and_verifies(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    data, out = tmp_path / "tokens.npz", tmp_path / "base.onnx"
    np.savez(data, **_tokens(200))  # no labels: distills the last hidden state
    args = ["compress", str(folders["base"]), "--data", str(data), "--out", str(out)]
    result = runner.invoke(app, [*args, "--steps", "300", "--batch-size", "32", "-q"])
    assert result.exit_code == 0, result.output
    rep = json.loads(out.with_suffix(".json").read_text())
    ver = rep["verification"]
    assert ver["passed"] and rep["gates"]["passed"], ver
    assert ver["sequence_lengths"] == [8, 16] and ver["export_batches"] == [3, 40]
    assert ver["export_max_abs_diff"] <= 1e-4 and ver["padding_max_abs_diff"] <= 1e-4
    assert ver["pooled_cosine_mean"] >= 0.99 and ver["pooled_cosine_min"] >= 0.95, ver
    assert rep["training"]["fusions"] > 0
    assert rep["onnx_bytes_after"] < rep["onnx_bytes_before"], rep["onnx_ratio"]

    # the file on its own, at a batch size and length the export never saw, against transformers
    tokens = {k: v[:5, :11] for k, v in _tokens(5, seed=9).items()}
    tokens["attention_mask"][:, 0] = 1
    hidden = _run_onnx(out, tokens)
    assert hidden.shape == (5, 11, 32)
    with torch.no_grad():
        ref = _hf(folders["base"])(**{k: torch.from_numpy(v) for k, v in tokens.items()})
    a = _pooled(hidden, tokens["attention_mask"])
    b = _pooled(ref.last_hidden_state.numpy(), tokens["attention_mask"])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.95, cos

    # `verify` re-checks the file against the folder and reproduces the report's numbers
    args = ["verify", str(folders["base"]), str(out), "--data", str(data)]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    for key in ("pooled_cosine_mean", "pooled_cosine_min", "max_abs_diff"):
        assert shown[key] == pytest.approx(ver[key], rel=1e-6), (key, shown[key], ver[key])
    assert shown["sequence_lengths"] == [8, 16] and shown["agreement"] is None, shown
    assert shown["task"] == "hidden" and [g["name"] for g in shown["gates"]] == ["pooled cosine"]
    table = runner.invoke(app, args)  # the readable form: hidden states, gated on the cosine
    assert table.exit_code == 0 and "max |hidden diff|" in table.stdout, table.output
    assert "pooled cosine" in table.stdout and "≥ 0.98 (default)" in table.stdout, table.output


@pytest.mark.slow
def test_classifier_compresses_exports_and_verifies(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    tokens = _tokens(200, seed=1)
    with torch.no_grad():  # labels the original gets right: accuracy_before is 100 %
        logits = _hf(folders["classifier"])(
            **{k: torch.from_numpy(v) for k, v in tokens.items()}
        ).logits
    data, out = tmp_path / "tokens.npz", tmp_path / "cls.onnx"
    np.savez(data, **tokens, y=logits.argmax(-1).numpy())
    args = ["compress", str(folders["classifier"]), "--data", str(data), "--out", str(out)]
    # the tiny random BERT's logits are nearly flat, so a few changed decisions are many points:
    # this test's own bound (accuracy ≥ 80 % of 100 %) rather than the default 1-point gate
    args += ["--max-accuracy-drop", "20"]
    result = runner.invoke(app, [*args, "--steps", "200", "--batch-size", "32", "-q"])
    assert result.exit_code == 0, result.output
    rep = json.loads(out.with_suffix(".json").read_text())
    ver = rep["verification"]
    assert ver["passed"] and ver["sequence_lengths"] == [8, 16], ver
    assert ver["export_max_abs_diff"] <= 1e-4 and ver["padding_max_abs_diff"] <= 1e-4
    assert ver["accuracy_before"] == 100.0 and ver["accuracy_after"] >= 80.0, ver
    assert ver["agreement"] >= 0.8 and ver["pooled_cosine_mean"] is None
    assert rep["onnx_bytes_after"] < rep["onnx_bytes_before"], rep["onnx_ratio"]
    kinds = {lay["name"]: lay["fold_kind"] for lay in rep["layers"]}
    assert kinds["encoder.classifier"] == "dense"

    short = {k: v[:7, :9] for k, v in _tokens(7, seed=5).items()}
    assert _run_onnx(out, short).shape == (7, 3)


# -- --text --------------------------------------------------------------------------------------


def test_text_is_tokenized_with_the_folders_tokenizer(
    tmp_path: Path, folders: dict[str, Path]
) -> None:
    from rankshrink.io.token_data import load_text_data

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "on", "mat"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    folder = tmp_path / "with_tokenizer"
    shutil.copytree(folders["base"], folder)
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(folder)
    text = tmp_path / "sentences.txt"
    text.write_text("the cat sat on the mat\n\nthe dog sat\n" * 5)  # blank lines are skipped
    data = load_text_data(text, folder, vocab_size=VOCAB, max_length=64)
    x = torch.cat([data.x_train, data.x_test])
    assert x.shape == (10, 3, 8)  # [CLS] + 6 words + [SEP], the short ones padded
    rows = {tuple(r[0][r[1].bool()].tolist()) for r in x}
    assert rows == {(2, 5, 6, 8, 9, 5, 10, 3), (2, 5, 7, 8, 3)}
    assert set(x[:, 1].sum(1).tolist()) == {8, 5}

    # a folder without a tokenizer, and --text with a checkpoint: one line each, nothing written
    out = tmp_path / "out.onnx"
    result = runner.invoke(
        app, ["compress", str(folders["base"]), "--text", str(text), "--out", str(out)]
    )
    _one_error_line(result, "no usable tokenizer")
    sample = Path(__file__).resolve().parents[2] / "sample_models" / "transformer_digits.pt"
    result = runner.invoke(app, ["compress", str(sample), "--text", str(text), "--out", str(out)])
    _one_error_line(result, "--text needs a Hugging Face model folder")
    assert not out.exists()


# -- verify and inspect on a folder; --save-pt -------------------------------------------------


def test_inspect_reads_a_folder(folders: dict[str, Path]) -> None:
    result = runner.invoke(app, ["inspect", str(folders["classifier"]), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)["layers"]}
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value"]
    per_layer += ["attention.output.dense", "intermediate.dense", "output.dense"]
    expected = [f"layers.{i}.{name}" for i in range(2) for name in per_layer]
    assert list(rows) == [*expected, "pooler.dense", "classifier"], list(rows)
    assert rows["layers.1.intermediate.dense"]["shape"] == [64, 32]
    assert rows["classifier"]["shape"] == [3, 32]
    assert all(0 < r["effective_rank"] <= r["max_rank"] for r in rows.values())
    text = runner.invoke(app, ["inspect", str(folders["base"])])
    assert text.exit_code == 0 and "(huggingface, sha256" in text.stdout, text.output
    assert "pooler" not in text.stdout  # a base model's output does not use its pooler
    one_line = runner.invoke(app, ["inspect", str(folders["base"]), "--arch", "m:f"])
    _one_error_line(one_line, "drop --arch")


def test_a_loaded_folder_saves_as_a_checkpoint_that_needs_no_transformers(
    tmp_path: Path, folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    x = {k: torch.from_numpy(v) for k, v in _tokens(5, seed=2).items()}
    args = (x["input_ids"], x["attention_mask"], x["token_type_ids"])
    encoders = {kind: load_hf_folder(folder).model for kind, folder in folders.items()}
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now raises ImportError
    for kind, encoder in encoders.items():
        path = tmp_path / f"{kind}.pt"
        torch.save(make_checkpoint(encoder, {"kind": kind}), path)
        assert torch.load(path, weights_only=True)["arch"]["type"] == "token_encoder"
        loaded = load_model(path)
        assert isinstance(loaded.model, TokenEncoder) and loaded.meta == {"kind": kind}
        with torch.no_grad():
            assert torch.equal(loaded.model(*args), encoder(*args)), f"{kind}: outputs differ"


def test_forged_token_encoder_specs_are_one_line(tmp_path: Path, folders: dict[str, Path]) -> None:
    ckpt = make_checkpoint(load_hf_folder(folders["classifier"]).model)
    forgeries = {
        "heads": (("config", "heads"), 3, "divisible by heads"),
        "huge": (("config", "vocab_size"), 2**21, "vocab_size must be an integer"),
        "act": (("config", "hidden_act"), "gelu_fast", "hidden_act must be one of"),
        "eps": (("config", "layer_norm_eps"), float("nan"), "layer_norm_eps out of range"),
        "head": (("config", "head"), "none", "a classifier needs classes and a head"),
        "blocks": (("blocks",), [None], "'blocks' must list 2 layers"),
    }
    for name, (keys, value, needle) in forgeries.items():
        forged = {**ckpt, "arch": json.loads(json.dumps(ckpt["arch"]))}  # a deep copy
        *parents, last = keys
        target = forged["arch"]
        for key in parents:
            target = target[key]
        target[last] = value
        torch.save(forged, tmp_path / f"{name}.pt")
        result = runner.invoke(app, ["inspect", str(tmp_path / f"{name}.pt")])
        _one_error_line(result, needle)


def test_save_pt_verify_and_inspect_round_trip(tmp_path: Path, folders: dict[str, Path]) -> None:
    """A short run (no shrinking asserted): the outputs must agree with each other exactly."""
    tokens = _tokens(100, seed=4)
    with torch.no_grad():
        logits = _hf(folders["classifier"])(**{k: torch.from_numpy(v) for k, v in tokens.items()})
    data, out, small = tmp_path / "tokens.npz", tmp_path / "cls.onnx", tmp_path / "small.pt"
    np.savez(data, **tokens, y=logits.logits.argmax(-1).numpy())
    args = ["compress", str(folders["classifier"]), "--data", str(data), "--out", str(out)]
    # 30 steps at the default thresholds fuse nothing (a file that is not smaller fails its
    # gate): fuse any pair, and keep the quality gate out of this mechanics test
    args += ["--tau-cos", "1", "--tau-euc", "100", "--max-accuracy-drop", "100"]
    result = runner.invoke(app, [*args, "--save-pt", str(small), "--steps", "30", "-q"])
    assert result.exit_code == 0, result.output
    ver = json.loads(out.with_suffix(".json").read_text())["verification"]
    assert ver["batch_max_abs_diff"] <= 1e-4 and [b["length"] for b in ver["by_length"]] == [8, 16]

    # the checkpoint is the exported module: same outputs as the ONNX at an unseen batch/length
    ckpt = torch.load(small, weights_only=True)
    assert ckpt["arch"]["type"] == "token_encoder" and all(ckpt["arch"]["blocks"]), ckpt["arch"]
    assert ckpt["meta"]["output"] == "logits"
    short = {k: v[:5, :11] for k, v in _tokens(5, seed=8).items()}
    with torch.no_grad():
        ours = load_model(small).model(*(torch.from_numpy(short[k]) for k in short)).numpy()
    diff = float(np.abs(ours - _run_onnx(out, short)).max())
    assert diff <= 1e-5, f"--save-pt checkpoint vs ONNX max abs diff {diff:.3g}"
    listed = runner.invoke(app, ["inspect", str(small), "--json"])
    assert listed.exit_code == 0, listed.output
    names = [r["name"] for r in json.loads(listed.stdout)["layers"]]
    assert names[0] == "layers.0.attention.self.qkv" and names[-1] == "classifier", names

    # verify reproduces the report; a gate that fails exits 3; so does a file for another model
    gated = ["verify", str(folders["classifier"]), str(out), "--data", str(data)]
    result = runner.invoke(app, [*gated, "--json", "--max-accuracy-drop", "100"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["passed"] and shown["sequence_lengths"] == [8, 16], shown
    assert shown["export_batches"] == [3, 20] and shown["padding_max_abs_diff"] <= 1e-4, shown
    for key in ("agreement", "accuracy_before", "accuracy_after", "max_abs_diff"):
        assert shown[key] == pytest.approx(ver[key], rel=1e-6), (key, shown[key], ver[key])
    result = runner.invoke(app, [*gated, "--max-accuracy-drop", "-50"])
    assert result.exit_code == 3 and "FAILED: accuracy drop" in result.stdout, result.output
    other = _save(tmp_path / "other", "BertForSequenceClassification", seed=1, num_labels=3)
    result = runner.invoke(app, ["verify", str(other), str(out), "--data", str(data)])
    assert result.exit_code == 3, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"error: {out} does not belong to this model: it was compressed from other weights"
    ), result.output
    np.savez(tmp_path / "unlabelled.npz", **tokens)
    args = ["verify", str(folders["base"]), str(out), "--data", str(tmp_path / "unlabelled.npz")]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    assert result.stderr.strip() == (
        f"error: {out} does not belong to this model: it outputs shape (batch, 3),"
        f" the model outputs (batch, {T}, 32)"
    ), result.output
