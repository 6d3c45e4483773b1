"""Fuzzing Hugging Face folders and ``--text`` files: only the project's own one-line errors.

The counterpart of ``test_fuzz.py`` for the other inputs the CLI reads. Tiny BERT folders (made
locally with ``save_pretrained``; nothing is downloaded) are copied and mutated:

- ``config.json``: fields dropped, retyped, set to zero, negative or huge sizes, other model
  types, odd ``architectures`` lists; the file garbled or not an object;
- ``model.safetensors``: its JSON header (garbled bytes, wrong offsets, dtype names, shapes, the
  length prefix) and its tensors (wrong shapes and dtypes, NaN/Inf, keys missing, renamed, added);
  the file deleted or joined by pickled ``.bin`` weights;
- sharded weights: ``model.safetensors.index.json`` (missing shards, a wrong ``weight_map``,
  path traversal such as ``../x.safetensors``), shards deleted;
- tokenizer files (``vocab.txt``, ``tokenizer.json``, ``tokenizer_config.json``): missing,
  empty, garbled, JSON fields replaced, vocabulary lines dropped or added;
- ``--text`` files: binary bytes, invalid UTF-8, NUL bytes, empty or blank-only, huge lines,
  odd line separators.

Each mutant goes to the loaders the CLI uses — :func:`rankshrink.io.hf_folder.load_model_or_folder` for a
folder, :func:`rankshrink.io.token_data.load_for_encoder` for a ``.txt`` — and must load or raise a
:class:`~rankshrink.errors.RankshrinkError` with one line (see ``fuzz_util.py``). Sockets are
closed for the whole module: a loader that tried to download would fail the case.
"""

from __future__ import annotations

import functools
import json
import shutil
import socket
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fuzz_util import Mutant, Outcomes, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'rankshrink[hf]')"
)
from safetensors.torch import load_file, save_file  # noqa: E402

from rankshrink.errors import InputError, RankshrinkError  # noqa: E402
from rankshrink.io.hf_folder import (  # noqa: E402
    INDEX_FILE,
    WEIGHTS_FILE,
    load_hf_folder,
    load_model_or_folder,
)
from rankshrink.io.token_data import load_for_encoder  # noqa: E402
from rankshrink.nn.token_encoder import TokenEncoderConfig  # noqa: E402

OUTCOMES = Outcomes()
SCRATCH = Path(tempfile.mkdtemp(prefix="rankshrink-fuzz-hf-"))
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"the cat sat on a mat dog ran".split()]
SIZES = dict(
    vocab_size=len(WORDS),
    hidden_size=8,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=16,
)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json")
SENTENCES = "the cat sat on the mat\na dog ran\nthe dog sat on a cat\nthe mat\n"


# ---------------------------------------------------------------------------------------------
# The folders every case starts from, and the module's fixtures.


@functools.cache
def bases() -> dict[str, Path]:
    """Tiny folders written once: a base model with its tokenizer, a classifier, the classifier
    sharded into three files, and a RoBERTa base model."""
    root = SCRATCH / "bases"
    root.mkdir()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folders = {
            "bert": transformers.BertModel(transformers.BertConfig(**SIZES)),
            "classifier": transformers.BertForSequenceClassification(
                transformers.BertConfig(**SIZES, num_labels=3)
            ),
            "roberta": transformers.RobertaModel(
                transformers.RobertaConfig(**{**SIZES, "max_position_embeddings": 18})
            ),
        }
        for name, model in folders.items():
            model.eval().save_pretrained(root / name, safe_serialization=True)
        folders["classifier"].save_pretrained(
            root / "sharded", safe_serialization=True, max_shard_size="2KB"
        )
        (root / "bert" / "vocab.txt").write_text("\n".join(WORDS) + "\n")
        transformers.BertTokenizerFast(str(root / "bert" / "vocab.txt")).save_pretrained(
            root / "bert"
        )
    assert len(list((root / "sharded").glob("*.safetensors"))) >= 2
    return {name: root / name for name in (*folders, "sharded")}


@functools.cache
def bert_config() -> TokenEncoderConfig:
    """The encoder config the CLI would hand ``load_for_encoder`` for the base folder."""
    return load_hf_folder(bases()["bert"]).model.config


NET_ATTEMPTS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """No network while the module runs; one thread; the counts printed at the end."""

    def refuse(*args: Any, **_kwargs: Any) -> Any:
        NET_ATTEMPTS.append(repr(args)[:120])
        raise OSError("network access in a fuzz test")

    saved = socket.socket.connect, socket.getaddrinfo, socket.create_connection
    socket.socket.connect = refuse  # type: ignore[method-assign]
    socket.getaddrinfo = refuse  # type: ignore[assignment]
    socket.create_connection = refuse  # type: ignore[assignment]
    try:
        yield from OUTCOMES.report(request)
    finally:
        socket.socket.connect, socket.getaddrinfo, socket.create_connection = saved


def _check(target: str, load: Callable[[], object]) -> None:
    OUTCOMES.expect_own_errors(target, load)
    assert not NET_ATTEMPTS, f"a loader tried the network: {NET_ATTEMPTS}"


def _case(base: str) -> Path:
    """A fresh copy of a base folder to mutate."""
    folder = SCRATCH / "case"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(bases()[base], folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Values.

SPECIAL_INTS = [0, -1, 1, 3, 7, 2**20 + 1, 2**31, 2**63, 10**30]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from(SPECIAL_INTS)
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def garbled(draw: st.DrawFn, blob: bytes) -> tuple[bytes, str]:
    """Bytes with a few flips, cuts, insertions or overwrites (test_fuzz.py's byte level)."""
    data, log = bytearray(blob), []
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        else:
            patch = draw(st.binary(min_size=1, max_size=16))
            data[pos : pos + (len(patch) if op == "overwrite" else 0)] = patch
        log.append(f"{op}@{pos}")
    return bytes(data), "garble " + ",".join(log)


def _mutate_json(draw: st.DrawFn, root: Any) -> tuple[Any, str]:
    """Walk down a random path of a JSON document and replace, drop or duplicate what is there."""
    holder = [root]
    parent: Any = holder
    key: Any = 0
    path = ""
    while True:
        node = parent[key]
        children = list(node) if isinstance(node, (dict, list)) else []
        if isinstance(node, list):
            children = list(range(len(node)))
        if not children or draw(st.integers(0, 2)) == 0:
            break
        parent, key = node, draw(st.sampled_from(children))
        path += f"[{key!r:.30}]"
    op = draw(st.sampled_from(["replace", "drop", "dup"]))
    if op == "replace" or parent is holder:
        parent[key] = draw(json_values)
        return holder[0], f"{path or 'root'} = {parent[key]!r:.40}"
    if op == "drop":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[f"{key}_"] = parent[key]
    return holder[0], f"{path}: {op}"


def _write_json(path: Path, value: Any) -> None:
    # allow_nan: NaN and Infinity are what a careless writer produces
    path.write_text(json.dumps(value, allow_nan=True))


# ---------------------------------------------------------------------------------------------
# config.json

CONFIG_KEYS = [
    *SIZES,
    "model_type",
    "architectures",
    "type_vocab_size",
    "hidden_act",
    "layer_norm_eps",
    "pad_token_id",
    "position_embedding_type",
    "is_decoder",
    "add_cross_attention",
    "num_labels",
    "id2label",
    "label2id",
    "problem_type",
    "dtype",
    "torch_dtype",
    "auto_map",
    "classifier_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "embedding_size",
    "tie_word_embeddings",
]
MODEL_TYPES = ["bert", "roberta", "electra", "xlm-roberta", "camembert", "gpt2", "t5", "", "BERT"]
ARCHITECTURES = [
    [],
    [""],
    ["BertModel", "GPT2Model"],
    ["RobertaModel"],
    ["BertForSequenceClassification"],
    ["BertForMaskedLM"],
    ["ElectraModel"],
    "BertModel",
    [1],
    [None],
    ["BertModel"] * 3,
    {"BertModel": 1},
]


@st.composite
def mutated_config(draw: st.DrawFn, config: dict[str, Any]) -> Mutant:
    log = []
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(CONFIG_KEYS))
        op = draw(st.sampled_from(["drop", "value", "size", "model_type", "architectures"]))
        if op == "drop":
            config.pop(key, None)
            log.append(f"drop {key}")
            continue
        if op == "size":
            value: Any = draw(st.sampled_from([*SPECIAL_INTS, 2.0, 8.5, "8", True, None]))
        elif op == "model_type":
            key, value = "model_type", draw(st.sampled_from([*MODEL_TYPES, None, 5]))
        elif op == "architectures":
            key, value = "architectures", draw(st.sampled_from([*ARCHITECTURES, None]))
        else:
            value = draw(json_values)
        config[key] = value
        log.append(f"{key} = {value!r:.40}")
    return Mutant(config, log)


@fuzz_settings(15)
@given(base=st.sampled_from(["bert", "classifier", "roberta"]), data=st.data())
def test_config_json(base: str, data: st.DataObject) -> None:
    folder = _case(base)
    file = folder / "config.json"
    how = data.draw(
        st.sampled_from(["fields", "fields", "fields", "json", "bytes", "not object", "deep"])
    )
    if how == "deep":  # nesting past Python's recursion limit
        file.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "fields":
        _write_json(file, data.draw(mutated_config(json.loads(file.read_text()))).value)
    elif how == "json":
        _write_json(file, _mutate_json(data.draw, json.loads(file.read_text()))[0])
    elif how == "bytes":
        file.write_bytes(data.draw(garbled(file.read_bytes()))[0])
    else:
        _write_json(file, data.draw(json_values))
    _check("hf config.json", lambda: load_model_or_folder(folder))


# ---------------------------------------------------------------------------------------------
# model.safetensors: the header, the tensors, the file itself

DTYPE_NAMES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64"]


def _split_safetensors(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


def _join_safetensors(header: bytes, body: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + body


@st.composite
def mutated_header(draw: st.DrawFn, blob: bytes) -> Mutant:
    header, body = _split_safetensors(blob)
    names = [k for k in header if k != "__metadata__"]
    op = draw(
        st.sampled_from(
            ["dtype", "shape", "offsets", "drop", "rename", "metadata", "json", "bytes", "length"]
        )
    )
    name = draw(st.sampled_from(names))
    entry = header[name]
    if op == "dtype":
        entry["dtype"] = draw(st.sampled_from([*DTYPE_NAMES, "XYZ", "", 3, None]))
        log = f"{name}.dtype = {entry['dtype']!r}"
    elif op == "shape":
        shape = entry["shape"]
        entry["shape"] = draw(
            st.sampled_from(
                [
                    shape[::-1],
                    [*shape, 1],
                    shape[:-1],
                    [0, *shape],
                    [-1, *shape[1:]],
                    [2**40, *shape[1:]],
                    [float(s) for s in shape],
                    [str(s) for s in shape],
                    "8",
                    None,
                ]
            )
        )
        log = f"{name}.shape = {entry['shape']!r}"
    elif op == "offsets":
        start, end = entry["data_offsets"]
        entry["data_offsets"] = draw(
            st.sampled_from(
                [
                    [end, start],
                    [start, end + 4],
                    [start + 4, end + 4],
                    [0, end - start],
                    [start, 2**62],
                    [-4, end],
                    [start],
                    [start, end, end],
                    [float(start), float(end)],
                    "0,4",
                ]
            )
        )
        log = f"{name}.data_offsets = {entry['data_offsets']!r}"
    elif op == "drop":
        del header[name]
        log = f"drop {name}"
    elif op == "rename":
        new = draw(st.sampled_from(["", "x", f"{name}.extra", "../" + name, name.upper()]))
        header[new] = header.pop(name)
        log = f"rename {name} to {new!r}"
    elif op == "metadata":
        header["__metadata__"] = draw(json_values)
        log = f"__metadata__ = {header['__metadata__']!r:.40}"
    elif op == "json":
        header, log = _mutate_json(draw, header)
    if op == "bytes":
        raw, log = draw(garbled(json.dumps(header).encode()))
        return Mutant(_join_safetensors(raw, body), [log])
    raw = json.dumps(header, allow_nan=True).encode()
    if op == "length":
        length = draw(st.sampled_from([0, 1, len(raw) - 1, len(raw) + 1, len(raw) + len(body) + 9]))
        return Mutant(_join_safetensors(raw, body, length), [f"header length {length}"])
    return Mutant(_join_safetensors(raw, body), [log])


@fuzz_settings(15)
@given(base=st.sampled_from(["bert", "classifier"]), data=st.data())
def test_safetensors_header(base: str, data: st.DataObject) -> None:
    folder = _case(base)
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(data.draw(mutated_header(weights.read_bytes())).value)
    _check("hf safetensors header", lambda: load_model_or_folder(folder))


TENSOR_DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool]
SPECIALS = [float("nan"), float("inf"), -float("inf"), 1e38, 0.0]


@st.composite
def mutated_tensors(draw: st.DrawFn, state: dict[str, torch.Tensor]) -> Mutant:
    log = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(state)))
        t = state[name]
        op = draw(st.sampled_from(["shape", "dtype", "special", "drop", "rename", "extra"]))
        if op == "shape":
            change = draw(st.sampled_from(["transpose", "flatten", "cut", "grow", "scalar"]))
            if change == "transpose" and t.dim() == 2:
                t = t.t()
            elif change == "flatten":
                t = t.flatten()
            elif change == "cut":
                t = t.flatten()[: draw(st.integers(0, max(0, t.numel() - 1)))]
            elif change == "grow":  # one more row (a 0-d tensor becomes two elements)
                t = torch.cat([t, t[:1]]) if t.dim() else t.reshape(1).repeat(2)
            else:  # a 0-d tensor (an empty one has no element to keep)
                t = t.flatten()[:1].reshape(()) if t.numel() else torch.zeros(())
            state[name] = t.contiguous()
            log.append(f"{name}: {change} -> {tuple(t.shape)}")
        elif op == "dtype":
            state[name] = t.to(draw(st.sampled_from(TENSOR_DTYPES)))
            log.append(f"{name}: {state[name].dtype}")
        elif op == "special" and t.numel():
            t = t.clone() if t.is_floating_point() else t.float()  # NaN fits no integer type
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIALS))
            state[name] = t
            log.append(f"{name}: special value")
        elif op == "drop":
            del state[name]
            log.append(f"drop {name}")
        elif op == "rename":
            new = draw(st.sampled_from(["x", name.replace("layer.0", "layer.1"), name + "_"]))
            state[new] = state.pop(name)
            log.append(f"rename {name} to {new}")
        else:
            new = draw(st.sampled_from(["encoder.layer.1.output.dense.weight", "pooler.x", "z"]))
            state[new] = torch.zeros(draw(st.lists(st.integers(0, 4), max_size=3)))
            log.append(f"add {new} {tuple(state[new].shape)}")
        if not state:
            break
    return Mutant(state, log)


@fuzz_settings(15)
@given(base=st.sampled_from(["bert", "classifier", "roberta"]), data=st.data())
def test_safetensors_tensors(base: str, data: st.DataObject) -> None:
    folder = _case(base)
    weights = folder / WEIGHTS_FILE
    state = data.draw(mutated_tensors(load_file(str(weights)))).value
    if state:
        save_file(state, str(weights), metadata={"format": "pt"})
    else:
        weights.write_bytes(_join_safetensors(b"{}", b""))
    _check("hf safetensors tensors", lambda: load_model_or_folder(folder))


@fuzz_settings(10)
@given(
    base=st.sampled_from(["bert", "classifier"]),
    op=st.sampled_from(["delete", "bin beside", "bin instead", "directory", "empty", "noise"]),
    noise=st.binary(max_size=64),
)
def test_weights_file(base: str, op: str, noise: bytes) -> None:
    folder = _case(base)
    weights = folder / WEIGHTS_FILE
    if op in ("delete", "bin instead", "directory"):
        weights.unlink()
    if op.startswith("bin"):
        torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    if op == "directory":
        weights.mkdir()
    if op == "empty":
        weights.write_bytes(b"")
    if op == "noise":
        weights.write_bytes(noise)
    _check("hf weights file", lambda: load_model_or_folder(folder))


# ---------------------------------------------------------------------------------------------
# Sharded weights: the index and the shards

SHARD_NAMES = [
    "missing.safetensors",
    "../outside.safetensors",
    "/etc/passwd",
    "sub/model.safetensors",
    "..\\outside.safetensors",
    "",
    ".",
    "..",
    "config.json",
    "model.safetensors.index.json",
    "model-00001-of-00003.safetensors",
]


@st.composite
def mutated_index(draw: st.DrawFn, index: dict[str, Any]) -> Mutant:
    weight_map: dict[str, Any] = index["weight_map"]
    log = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["entry", "drop entry", "add entry", "map", "json"]))
        name = draw(st.sampled_from(sorted(weight_map))) if weight_map else "x"
        if op == "entry" and weight_map:
            weight_map[name] = draw(st.one_of(st.sampled_from(SHARD_NAMES), json_values))
            log.append(f"weight_map[{name}] = {weight_map[name]!r:.40}")
        elif op == "drop entry" and weight_map:
            del weight_map[name]
            log.append(f"drop weight_map[{name}]")
        elif op == "add entry":
            weight_map["extra.weight"] = draw(st.sampled_from(SHARD_NAMES))
            log.append(f"weight_map[extra.weight] = {weight_map['extra.weight']!r}")
        elif op == "map":
            index["weight_map"] = draw(st.one_of(json_values, st.just({})))
            log.append(f"weight_map = {index['weight_map']!r:.40}")
            break
        else:
            index, what = _mutate_json(draw, index)
            log.append(what)
            break
    return Mutant(index, log)


@fuzz_settings(15)
@given(data=st.data())
def test_shard_index(data: st.DataObject) -> None:
    folder = _case("sharded")
    index_file = folder / INDEX_FILE
    shards = sorted(folder.glob("model-*.safetensors"))
    shutil.copy(shards[0], folder.parent / "outside.safetensors")  # bait for a path traversal
    how = data.draw(
        st.sampled_from(["index", "index", "delete shard", "garble shard", "bytes", "deep"])
    )
    if how == "deep":
        index_file.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif how == "index":
        _write_json(index_file, data.draw(mutated_index(json.loads(index_file.read_text()))).value)
    elif how == "delete shard":
        data.draw(st.sampled_from(shards)).unlink()
    elif how == "garble shard":
        shard = data.draw(st.sampled_from(shards))
        shard.write_bytes(data.draw(garbled(shard.read_bytes()))[0])
    else:
        index_file.write_bytes(data.draw(garbled(index_file.read_bytes()))[0])
    _check("hf shard index", lambda: load_model_or_folder(folder))


# ---------------------------------------------------------------------------------------------
# Tokenizer files, with a good --text file


@st.composite
def mutated_tokenizer(draw: st.DrawFn, folder: Path) -> Mutant:
    log = []
    for _ in range(draw(st.integers(1, 2))):
        name = draw(st.sampled_from(TOKENIZER_FILES))
        file = folder / name
        ops = ["delete", "empty", "bytes", "json" if name.endswith(".json") else "lines"]
        op = draw(st.sampled_from(ops))
        if not file.is_file():
            op = "delete"
        if op == "delete":
            file.unlink(missing_ok=True)
        elif op == "empty":
            file.write_bytes(b"")
        elif op == "bytes":
            raw, op = draw(garbled(file.read_bytes()))
            file.write_bytes(raw)
        elif op == "json":
            try:
                doc = json.loads(file.read_text())
            except ValueError:
                doc = {}
            doc, op = _mutate_json(draw, doc)
            _write_json(file, doc)
        else:
            lines = file.read_bytes().splitlines()  # bytes: an earlier garble may not decode
            change = draw(st.sampled_from(["drop", "dup", "add", "huge", "reverse"]))
            i = draw(st.integers(0, max(0, len(lines) - 1)))
            if change == "drop" and lines:
                del lines[i]
            elif change == "dup" and lines:
                lines.insert(i, lines[i])
            elif change == "add":
                lines += [f"word{k}".encode() for k in range(draw(st.integers(1, 40)))]
            elif change == "huge":
                lines.insert(i, b"w" * 100_000)
            else:
                lines.reverse()
            file.write_bytes(b"\n".join(lines) + b"\n")
            op = f"lines: {change} at {i}"
        log.append(f"{name}: {op}")
    return Mutant(folder, log)


@fuzz_settings(20)
@given(data=st.data())
def test_tokenizer_files(data: st.DataObject) -> None:
    cfg = bert_config()
    folder = data.draw(mutated_tokenizer(_case("bert"))).value
    text = SCRATCH / "sentences.txt"
    text.write_text(SENTENCES)
    _check("hf tokenizer files", lambda: load_for_encoder(text, folder, cfg))


# ---------------------------------------------------------------------------------------------
# --text files

SEPARATORS = ["\n", "\r\n", "\r", "\x00", "\u2028", "\x0b", "\x1c", "\x85"]


@st.composite
def text_lines(draw: st.DrawFn) -> bytes:
    """Text-file bytes: pieces of sentences, noise, blanks and huge lines, joined oddly."""
    kind = draw(
        st.sampled_from(["lines", "lines", "lines", "binary", "empty", "blank", "huge", "many"])
    )
    if kind == "binary":
        return draw(st.binary(max_size=512))
    if kind == "empty":
        return b""
    if kind == "blank":
        return draw(st.text(alphabet=" \t\n\r\x0b\x0c", max_size=40)).encode()
    if kind == "huge":
        return ("the cat sat " * draw(st.integers(10_000, 40_000)) + "\nthe mat\n" * 3).encode()
    if kind == "many":
        return ("the cat sat on the mat\n" * draw(st.integers(500, 3000))).encode()
    pieces = draw(
        st.lists(
            st.one_of(
                st.sampled_from(SENTENCES.splitlines()),
                st.text(max_size=30),
                st.sampled_from(["", " ", "\x00", "\ufeff", "[CLS] [SEP] [PAD]", "\U0001f600"]),
            ),
            max_size=12,
        )
    )
    text = draw(st.sampled_from(SEPARATORS)).join(pieces)
    blob = text.encode("utf-8", "surrogatepass")  # lone surrogates: invalid UTF-8
    if draw(st.booleans()):  # a stray byte that no UTF-8 sequence starts with
        pos = draw(st.integers(0, len(blob)))
        stray = draw(st.sampled_from([b"\xff", b"\xc3", b"\x80", b"\xed\xa0\x80"]))
        blob = blob[:pos] + stray + blob[pos:]
    return blob


@fuzz_settings(40)
@given(blob=text_lines())
def test_text_file(blob: bytes) -> None:
    cfg = bert_config()
    text = SCRATCH / "fuzz.txt"
    text.write_bytes(blob)
    _check("text files", lambda: load_for_encoder(text, bases()["bert"], cfg))


def test_the_network_guard_holds() -> None:
    """The guard that makes "never downloads" checkable: a connection attempt is recorded."""
    with pytest.raises(OSError, match="network access"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert NET_ATTEMPTS
    NET_ATTEMPTS.clear()


def test_the_base_folders_load() -> None:
    """The oracle for the fuzz above: unmutated, every base loads and a good text tokenizes."""
    for folder in bases().values():
        assert load_model_or_folder(folder).source == "huggingface"
    text = SCRATCH / "good.txt"
    text.write_text(SENTENCES)
    data = load_for_encoder(text, bases()["bert"], bert_config())
    assert data.x_train.shape[1] == 3 and len(data.x_train) + len(data.x_test) == 4
    assert np.isin(data.x_train[:, 0].numpy(), np.arange(len(WORDS))).all()


# ---------------------------------------------------------------------------------------------
# Reproducers of what the fuzz found (each escaped as a TypeError, RuntimeError, RecursionError
# or AttributeError, or allocated before any check), kept as plain tests.


def _edited(base: str, file: str, edit: Callable[[Any], Any]) -> Path:
    folder = _case(base)
    _write_json(folder / file, edit(json.loads((folder / file).read_text())))
    return folder


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"embedding_size": -1}, "loaded"),  # BERT ignores it: so does the encoder
        ({"embedding_size": None}, "loaded"),
        ({"model_type": "electra", "architectures": None, "embedding_size": -1}, "embedding_size"),
        ({"architectures": [[]]}, "architecture [[]] is not supported"),
        ({"num_labels": 10**12}, "num_labels must be an integer in [1, 1048576]"),
        ({"max_position_embeddings": 2**40}, "max_position_embeddings must be an integer"),
        ({"num_hidden_layers": 10**6}, "num_hidden_layers must be an integer in [1, 1024]"),
        ({"hidden_size": 2**20, "intermediate_size": 2**20}, "parameters; that is too large"),
        ({"layer_norm_eps": "1e-12"}, "layer_norm_eps must be a number in [0, 1)"),
        ({"hidden_dropout_prob": float("nan")}, "hidden_dropout_prob must be a number"),
        ({"vocab_size": 14}, "(13, 8) in the weights, (14, 8) by the config"),
    ],
)
def test_config_values_are_checked_before_the_library_sees_them(
    edit: dict[str, Any], needle: str
) -> None:
    folder = _edited("bert", "config.json", lambda c: {**c, **edit})
    try:
        load_model_or_folder(folder)
        outcome = "loaded"
    except RankshrinkError as exc:
        outcome = str(exc)
    assert needle in outcome


def test_nested_json_past_the_recursion_limit() -> None:
    folder = _case("bert")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InputError, match="is not readable JSON"):
        load_model_or_folder(folder)
    folder = _case("sharded")
    (folder / INDEX_FILE).write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(InputError, match="is not a safetensors index"):
        load_model_or_folder(folder)


@pytest.mark.parametrize("weight_map", ["model-00001-of-00002.safetensors", [], 3, None])
def test_index_weight_map_that_is_not_an_object(weight_map: Any) -> None:
    folder = _edited("sharded", INDEX_FILE, lambda i: {**i, "weight_map": weight_map})
    with pytest.raises(InputError, match="has no 'weight_map' object"):
        load_model_or_folder(folder)


def test_non_finite_weights_are_named() -> None:
    folder = _case("bert")
    state = load_file(str(folder / WEIGHTS_FILE))
    state["encoder.layer.0.output.dense.bias"][3] = float("nan")
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"encoder\.layer\.0\.output\.dense\.bias holds NaN"):
        load_model_or_folder(folder)


def test_finite_weights_that_overflow_are_named() -> None:
    # 1e38 is a finite float32, but squaring it in LayerNorm's variance is not
    folder = _case("bert")
    state = load_file(str(folder / WEIGHTS_FILE))
    state["embeddings.word_embeddings.weight"].fill_(1e38)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(InputError, match="NaN or Inf on a test batch"):
        load_model_or_folder(folder)


def test_two_sentences_split_one_and_one() -> None:
    text = SCRATCH / "two.txt"
    text.write_text("the cat sat\nthe dog ran\n")
    data = load_for_encoder(text, bases()["bert"], bert_config())
    assert (len(data.x_train), len(data.x_test)) == (1, 1)
