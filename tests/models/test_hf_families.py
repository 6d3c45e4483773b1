"""Encoder families with BERT's module names: RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA.

Oracle: the ``transformers`` forward of each family on the same weights, with the family's own
padding id; then compress → export → verify → ``--save-pt`` from the CLI for two of them (the
others share their code path: only positions, the embedding projection and the head differ).
RoBERTa numbers positions from ``pad_token_id + 1`` over non-pad ids only, so a left-padded
sequence must give its real tokens the outputs of the unpadded one, and the longest sequence is
``max_position_embeddings - pad_token_id - 1``. Folders are tiny random configs written locally.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from rankshrink.cli.app import app

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'rankshrink[hf]')"
)

from rankshrink.io.checkpoint import load_model  # noqa: E402
from rankshrink.io.hf_folder import load_hf_folder  # noqa: E402
from rankshrink.onnx.tokens import padded  # noqa: E402

runner = CliRunner()
VOCAB, T, MAX_POS = 100, 16, 64
SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=MAX_POS,
)
ROBERTA_LIKE = dict(pad_token_id=1, type_vocab_size=1)
#: model_type -> (class prefix, config class, extra config)
FAMILIES = {
    "roberta": ("Roberta", "RobertaConfig", ROBERTA_LIKE),
    "xlm-roberta": ("XLMRoberta", "XLMRobertaConfig", ROBERTA_LIKE),
    "camembert": ("Camembert", "CamembertConfig", ROBERTA_LIKE),
    # ELECTRA embeds into a narrower width and projects up
    "electra": ("Electra", "ElectraConfig", dict(embedding_size=16)),
}
NAMES = ("input_ids", "attention_mask", "token_type_ids")




def _save(path: Path, model_type: str, kind: str, seed: int = 0, **extra: object) -> Path:
    prefix, config_cls, family = FAMILIES[model_type]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**SIZES, **family, **extra)
    suffix = "Model" if kind == "base" else "ForSequenceClassification"
    if kind == "classifier":
        config.num_labels = 3
    model = getattr(transformers, prefix + suffix)(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("families")
    return {
        (mt, kind): _save(root / f"{mt}-{kind}", mt, kind)
        for mt in FAMILIES
        for kind in ("base", "classifier")
    }


def _pad_id(model_type: str) -> int:
    return int(FAMILIES[model_type][2].get("pad_token_id", 0))


def _tokens(n: int, pad: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded sequences of 4..T tokens padded with ``pad`` (real ids avoid it)."""
    g = np.random.default_rng(seed)
    ids = g.integers(3, VOCAB, (n, T))
    mask = np.ones((n, T), dtype=np.int64)
    for i, length in enumerate(g.integers(4, T + 1, n)):
        mask[i, length:] = 0
        ids[i, length:] = pad
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _hf(folder: Path) -> torch.nn.Module:
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    cls = getattr(transformers, arch)
    return cls.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()


def _one_error_line(result, *needles: str) -> None:
    shown = f"exit {result.exit_code}\n{result.output}"
    assert result.exit_code == 2 and "Traceback" not in result.output, shown
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert all(needle in lines[0] for needle in needles), shown


# -- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
@torch.no_grad()
def test_family_matches_transformers_and_ignores_padding(
    folders: dict[tuple[str, str], Path], model_type: str
) -> None:
    pad = _pad_id(model_type)
    x = torch.stack([torch.from_numpy(v) for v in _tokens(6, pad, seed=3).values()], 1)
    mask = x[:, 1].bool()
    for kind in ("base", "classifier"):
        folder = folders[(model_type, kind)]
        theirs = _hf(folder)(**dict(zip(NAMES, x.unbind(1), strict=True)))
        encoder = load_hf_folder(folder).model
        ours = encoder(*x.unbind(1))
        if kind == "base":
            torch.testing.assert_close(
                ours[mask], theirs.last_hidden_state[mask], atol=1e-5, rtol=0
            )
        else:
            torch.testing.assert_close(ours, theirs.logits, atol=1e-5, rtol=0)
        longer = encoder(*padded(x, pad_id=pad).unbind(1))  # three more padding tokens
        if kind == "base":
            longer, ours = longer[:, :T][mask], ours[mask]
        diff = float((longer - ours).abs().max())
        assert diff <= 1e-6, f"{model_type} {kind}: padding moved unpadded outputs by {diff:.3g}"


@torch.no_grad()
def test_roberta_positions_start_after_the_padding_id(
    folders: dict[tuple[str, str], Path],
) -> None:
    folder = folders[("roberta", "base")]
    encoder = load_hf_folder(folder).model
    ids = torch.tensor([[5, 6, 7, 1, 1], [1, 1, 5, 6, 7]])  # right- and left-padded (pad id 1)
    positions = encoder.embeddings.positions(ids)
    assert positions.tolist() == [[2, 3, 4, 1, 1], [1, 1, 2, 3, 4]], positions
    # so the real tokens of a left-padded row get exactly the unpadded row's outputs
    mask = (ids != 1).long()
    types = torch.zeros_like(ids)
    both = encoder(ids, mask, types)
    alone = encoder(ids[:1, :3], mask[:1, :3], types[:1, :3])
    left = float((both[1, 2:] - alone[0]).abs().max())
    assert left <= 1e-5, f"left padding moved RoBERTa's outputs by {left:.3g}"
    theirs = _hf(folder)(input_ids=ids, attention_mask=mask, token_type_ids=types)
    ref = float((theirs.last_hidden_state[mask.bool()] - both[mask.bool()]).abs().max())
    assert ref <= 1e-5, f"left-padded RoBERTa differs from transformers by {ref:.3g}"


def test_roberta_longest_sequence_leaves_room_for_the_offset(
    tmp_path: Path, folders: dict[tuple[str, str], Path]
) -> None:
    data, out = tmp_path / "long.npz", tmp_path / "out.onnx"
    np.savez(data, input_ids=np.full((10, MAX_POS - 1), 5, dtype=np.int64))  # 63 > 64 - 1 - 1
    args = ["compress", str(folders[("roberta", "base")]), "--data", str(data), "--out", str(out)]
    _one_error_line(runner.invoke(app, args), f"exceed the model's {MAX_POS - 2}")
    assert not out.exists()


def test_other_families_and_heads_are_refused_in_one_line(
    tmp_path: Path, folders: dict[tuple[str, str], Path]
) -> None:
    def edited(name: str, source: Path, **changes: object) -> Path:
        folder = tmp_path / name
        shutil.copytree(source, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    roberta = folders[("roberta", "base")]
    cases = [
        (edited("deberta", roberta, model_type="deberta-v2"), ["'deberta-v2' is not supported"]),
        (edited("mixed", roberta, model_type="bert"), ["RobertaModel does not go with", "'bert'"]),
        (edited("mlm", roberta, architectures=["RobertaForMaskedLM"]), ["RobertaForMaskedLM"]),
        (edited("act", roberta, hidden_act="quick_gelu"), ["hidden_act 'quick_gelu'"]),
    ]
    torch.manual_seed(0)
    regression = tmp_path / "regression"
    config = transformers.RobertaConfig(**SIZES, **ROBERTA_LIKE, num_labels=1)
    transformers.RobertaForSequenceClassification(config).save_pretrained(regression)
    cases.append((regression, ["regression head (1 labels)", "not supported"]))
    for folder, needles in cases:
        _one_error_line(runner.invoke(app, ["inspect", str(folder)]), *needles)


# -- end to end --------------------------------------------------------------------------------


def _run_onnx(path: Path, tokens: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: tokens[k] for k in NAMES})[0]


@pytest.mark.parametrize("model_type, kind", [("roberta", "base"), ("electra", "classifier")])
def test_family_compresses_verifies_and_saves(
    tmp_path: Path, folders: dict[tuple[str, str], Path], model_type: str, kind: str
) -> None:
    """A short run: export, padding, verify and --save-pt must agree. Loose fixed fusion
    thresholds fuse enough in 20 steps (~0.92x) for the not-smaller gate; quality is not the
    point here (tests/io/test_hf.py holds the folder quality run)."""
    folder, pad = folders[(model_type, kind)], _pad_id(model_type)
    tokens = _tokens(100, pad, seed=1)
    labels = {}
    if kind == "classifier":
        with torch.no_grad():
            logits = _hf(folder)(**{k: torch.from_numpy(v) for k, v in tokens.items()}).logits
        labels = {"y": logits.argmax(-1).numpy()}
    data, out, small = tmp_path / "tokens.npz", tmp_path / "out.onnx", tmp_path / "small.pt"
    np.savez(data, **tokens, **labels)
    args = ["compress", str(folder), "--data", str(data), "--out", str(out), "--save-pt"]
    fast = ["--steps", "20", "--tau-cos", "0.9", "--tau-euc", "10", "--no-target"]
    result = runner.invoke(app, [*args, str(small), *fast, "-q"])
    assert result.exit_code == 0, result.output
    rep = json.loads(out.with_suffix(".json").read_text())
    ver = rep["verification"]
    assert rep["input"]["model_type"] == model_type
    assert ver["passed"] and ver["sequence_lengths"] == [8, 16], ver
    assert ver["export_max_abs_diff"] <= 1e-4 and ver["padding_max_abs_diff"] <= 1e-4, ver
    if kind == "base":
        assert ver["pooled_cosine_min"] >= 0.95, ver
    else:
        assert ver["accuracy_before"] == 100.0 and ver["agreement"] >= 0.8, ver

    # the checkpoint and the ONNX compute the same thing at a batch and length never exported
    short = {k: v[:5, :11] for k, v in _tokens(5, pad, seed=6).items()}
    with torch.no_grad():
        ours = load_model(small).model(*(torch.from_numpy(short[k]) for k in NAMES)).numpy()
    diff = float(np.abs(ours - _run_onnx(out, short)).max())
    assert diff <= 1e-5, f"{model_type}: --save-pt checkpoint vs ONNX max abs diff {diff:.3g}"

    result = runner.invoke(app, ["verify", str(folder), str(out), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    key = "pooled_cosine_mean" if kind == "base" else "agreement"
    assert shown[key] == pytest.approx(ver[key], rel=1e-6), (key, shown[key], ver[key])
