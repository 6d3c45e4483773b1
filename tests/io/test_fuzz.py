"""Fuzzing the loaders: whatever the bytes, only the project's own errors come out.

Hypothesis mutates the bundled sample checkpoints and data file at three levels — raw bytes
(flips, truncation, insertion, deletion), zip members (dropped, renamed, cut, garbled, swapped,
added) and the objects inside (tensors of the wrong shape, dtype or values; keys renamed or
dropped; architecture fields set to nonsense) — and feeds each result to
:func:`rankshrink.io.checkpoint.load_model`, :func:`rankshrink.io.data.load_data` and
:func:`rankshrink.pipeline.subject.load_subject`. Each case must either load or raise a
:class:`~rankshrink.errors.RankshrinkError` whose message is one non-empty line; anything else
escaping (a ``RuntimeError`` from torch, a ``KeyError`` from our own code) fails the test, and
Hypothesis shrinks it to a minimal reproducer.

The default run is derandomized (the same cases every time, so CI cannot flake) and small; set
``RANKSHRINK_FUZZ_EXAMPLES=5000`` for a long randomized run. The number of cases run and how they
ended are printed at the end of the module (the machinery is shared with ``test_fuzz_hf.py``, in
``fuzz_util.py``).
"""

from __future__ import annotations

import io
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fuzz_util import Mutant, Outcomes, fuzz_settings
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from rankshrink.io.checkpoint import load_model
from rankshrink.io.data import load_data
from rankshrink.pipeline.subject import load_subject

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_models"
CHECKPOINTS = {
    name: (SAMPLES / name).read_bytes() for name in ("mlp_digits.pt", "transformer_digits.pt")
}
DIGITS = (SAMPLES / "digits.npz").read_bytes()

FUZZ = fuzz_settings(120)
OUTCOMES = Outcomes()
_expect_own_errors = OUTCOMES.expect_own_errors
SCRATCH = Path(tempfile.mkdtemp(prefix="rankshrink-fuzz-"))


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many cases ran and how they ended (for the issue's closing figures)."""
    yield from OUTCOMES.report(request)


def _write(name: str, blob: bytes) -> Path:
    path = SCRATCH / name
    path.write_bytes(blob)
    return path


# ---------------------------------------------------------------------------------------------
# Byte-level mutations.


@st.composite
def _position(draw: st.DrawFn, size: int) -> int:
    # Structure lives at the start (zip local header, data.pkl) and the end (central directory).
    region = draw(st.sampled_from(["head", "tail", "anywhere"]))
    if region == "head":
        return draw(st.integers(0, min(size - 1, 2048)))
    if region == "tail":
        return draw(st.integers(max(0, size - 1024), size - 1))
    return draw(st.integers(0, size - 1))


@st.composite
def mutated_bytes(draw: st.DrawFn, blob: bytes) -> Mutant:
    data, log = bytearray(blob), []
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite"]))
        pos = draw(_position(len(data)))
        if op == "flip":
            mask = draw(st.integers(1, 255))
            data[pos] ^= mask
            log.append(f"flip byte {pos} ^ {mask:#x}")
        elif op == "truncate":
            del data[pos:]
            log.append(f"truncate at {pos}")
        elif op == "insert":
            patch = draw(st.binary(min_size=1, max_size=64))
            data[pos:pos] = patch
            log.append(f"insert {patch!r} at {pos}")
        elif op == "delete":
            n = draw(st.integers(1, 256))
            del data[pos : pos + n]
            log.append(f"delete {n} bytes at {pos}")
        else:
            patch = draw(st.binary(min_size=1, max_size=64))
            data[pos : pos + len(patch)] = patch
            log.append(f"overwrite {patch!r} at {pos}")
    return Mutant(bytes(data), log)


# ---------------------------------------------------------------------------------------------
# Zip-member-level mutations.


def _members(blob: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


@st.composite
def mutated_zip(draw: st.DrawFn, blob: bytes) -> Mutant:
    members, log = _members(blob), []
    for _ in range(draw(st.integers(1, 3))):
        if not members:
            break
        i = draw(st.integers(0, len(members) - 1))
        name, data = members[i]
        op = draw(
            st.sampled_from(["drop", "rename", "cut", "garble", "random", "swap", "add", "empty"])
        )
        if op == "drop":
            del members[i]
        elif op == "rename":
            other = draw(st.sampled_from([n for n, _ in members] + ["x/data.pkl", "x/data/99"]))
            members[i] = (other, data)
            op = f"rename to {other}"
        elif op == "cut":
            n = draw(st.integers(0, max(0, len(data) - 1)))
            members[i] = (name, data[:n])
            op = f"cut to {n} bytes"
        elif op == "garble" and data:
            garbled = draw(mutated_bytes(data))
            members[i] = (name, garbled.value)
            op = f"garble ({garbled!r})"
        elif op == "random":
            members[i] = (name, draw(st.binary(max_size=256)))
        elif op == "swap":
            j = draw(st.integers(0, len(members) - 1))
            members[i], members[j] = (name, members[j][1]), (members[j][0], data)
            op = f"swap contents with {members[j][0]}"
        elif op == "add":
            extra = draw(st.sampled_from(["constants.pkl", "data/99", "code/x.py", "data.pkl"]))
            name = f"{name.split('/')[0]}/{extra}"
            members.append((name, draw(st.binary(max_size=64))))
        else:
            members[i] = (name, b"")
        log.append(f"{name}: {op}")
    return Mutant(_zip(members), log)


# ---------------------------------------------------------------------------------------------
# Object-level mutations of a checkpoint dict.

DTYPES = [
    torch.float32,
    torch.float16,
    torch.float64,
    torch.bfloat16,
    torch.int64,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, 1e38, -1e-45]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def tensors(draw: st.DrawFn, like: torch.Tensor | None = None) -> torch.Tensor:
    """A tensor: ``like`` with a changed shape, dtype or values, or something new."""
    if like is not None and draw(st.booleans()):
        t = like.clone()
        change = draw(st.sampled_from(["dtype", "special", "shape", "transpose"]))
        if change == "dtype":
            return t.to(draw(st.sampled_from(DTYPES)))
        if change == "special" and t.numel():
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from(SPECIALS))
            return t
        if change == "transpose" and t.dim() == 2:
            return t.t().contiguous()
        return t.flatten()[: draw(st.integers(0, max(0, t.numel() - 1)))]
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    dtype = draw(st.sampled_from(DTYPES))
    return torch.zeros(shape).to(dtype)


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    return repr(value)[:60]


@st.composite
def mutated_checkpoint(draw: st.DrawFn, blob: bytes) -> Mutant:
    ckpt, log = torch.load(io.BytesIO(blob), weights_only=True), []
    state: dict[str, Any] = ckpt["state_dict"]
    for _ in range(draw(st.integers(1, 3))):
        keys = list(state) if isinstance(state, dict) else []
        target = draw(st.sampled_from(["tensor", "key", "arch", "top"]))
        if target == "tensor" and keys:
            key = draw(st.sampled_from(keys))
            like = state[key] if isinstance(state[key], torch.Tensor) else None
            state[key] = draw(st.one_of(tensors(like), json_values))
            log.append(f"state_dict[{key!r}] = {_short(state[key])}")
        elif target == "key" and keys:
            key = draw(st.sampled_from(keys))
            op = draw(st.sampled_from(["drop", "rename", "extra"]))
            value = state.pop(key)
            if op == "rename":
                new = draw(st.text(max_size=10))
                state[new] = value
                op = f"rename to {new!r}"
            elif op == "extra":
                state[key] = value
                state[key + ".extra"] = draw(tensors())
            log.append(f"state_dict key {key!r}: {op}")
        elif target == "arch" and "arch" in ckpt:
            log.append("arch" + _mutate_json(draw, ckpt, "arch"))
        else:
            key = draw(st.sampled_from(["format", "arch", "state_dict", "meta"]))
            ckpt[key] = draw(json_values)
            log.append(f"{key} = {_short(ckpt[key])}")
    return Mutant(ckpt, log)


def _mutate_json(draw: st.DrawFn, parent: Any, key: Any) -> str:
    """Walk down a random path from ``parent[key]`` and replace, drop or duplicate what is there;
    return the path and what was done."""
    path = ""
    while True:
        node = parent[key]
        if isinstance(node, dict):
            children = list(node)
        elif isinstance(node, list):
            children = list(range(len(node)))
        else:
            children = []
        if not children or draw(st.integers(0, 2)) == 0:
            break
        parent, key = node, draw(st.sampled_from(children))
        path += f"[{key!r}]"
    op = draw(st.sampled_from(["replace", "drop", "dup"]))
    if op == "replace" or not isinstance(parent, (dict, list)):
        parent[key] = draw(json_values)
        return f"{path} = {_short(parent[key])}"
    if op == "drop":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[f"{key}_"] = parent[key]
    return f"{path}: {op}"


# ---------------------------------------------------------------------------------------------
# Array-level mutations of the data file.

ARRAY_DTYPES = [
    np.dtype(t)
    for t in (
        "float32",
        "float64",
        "float16",
        "int8",
        "int64",
        "uint64",
        "bool",
        "complex64",
        "U3",
        "S2",
        "M8[D]",
    )
]


@st.composite
def arrays(draw: st.DrawFn, like: np.ndarray) -> np.ndarray:
    change = draw(st.sampled_from(["random", "dtype", "special", "rows", "reshape", "values"]))
    if change == "random":
        dtype = draw(st.sampled_from(ARRAY_DTYPES))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
        return draw(hnp.arrays(dtype, shape))
    if change == "dtype" and like.dtype.kind in "biufc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NaN to int, complex to real: odd values are the point
            return like.astype(draw(st.sampled_from(ARRAY_DTYPES[:7])))
    if change == "special" and like.dtype.kind == "f" and like.size:
        out = like.copy()
        out.flat[draw(st.integers(0, like.size - 1))] = draw(st.sampled_from(SPECIALS))
        return out
    if change == "rows" and like.ndim:
        return like[: draw(st.integers(0, len(like)))]
    if change == "reshape" and like.size:
        return like.reshape(-1) if like.ndim > 1 else like.reshape(-1, 1)
    if change == "values" and like.size and like.dtype.kind in "iuf":
        # out of range for a label or a split index; wraps around in narrow integer types
        value = draw(st.sampled_from([-1, 10, 2**40, (like.shape[0] if like.ndim else 0) + 3]))
        out = like.astype(np.int64 if like.dtype.kind in "iu" else like.dtype)
        out.flat[draw(st.integers(0, like.size - 1))] = value
        return out
    return like


@st.composite
def mutated_arrays(draw: st.DrawFn) -> Mutant:
    with np.load(io.BytesIO(DIGITS)) as npz:
        data = {k: npz[k] for k in npz.files}
    log = []
    for _ in range(draw(st.integers(1, 3))):
        keys = list(data)
        if not keys:
            break
        op = draw(st.sampled_from(["array", "array", "drop", "rename", "extra"]))
        key = draw(st.sampled_from(keys))
        if op == "array":
            data[key] = draw(arrays(data[key]))
            log.append(f"{key} = array{data[key].shape}:{data[key].dtype}")
        elif op == "drop":
            del data[key]
            log.append(f"drop {key}")
        elif op == "rename":
            new = draw(st.sampled_from(["X", "inputs", "y", "x", "labels", "test_idx"]))
            data[new] = data.pop(key)
            log.append(f"rename {key} to {new}")
        else:
            new = draw(st.text(alphabet="abcxy_", min_size=1, max_size=5))
            data[new] = draw(arrays(data[key]))
            log.append(f"add {new} = array{data[new].shape}:{data[new].dtype}")
    return Mutant(data, log)


# ---------------------------------------------------------------------------------------------
# The tests.


@FUZZ
@given(name=st.sampled_from(sorted(CHECKPOINTS)), data=st.data())
def test_checkpoint_bytes(name: str, data: st.DataObject) -> None:
    path = _write("bytes.pt", data.draw(mutated_bytes(CHECKPOINTS[name])).value)
    _expect_own_errors("checkpoint bytes", lambda: load_model(path))


@FUZZ
@given(name=st.sampled_from(sorted(CHECKPOINTS)), data=st.data())
def test_checkpoint_zip_members(name: str, data: st.DataObject) -> None:
    path = _write("members.pt", data.draw(mutated_zip(CHECKPOINTS[name])).value)
    _expect_own_errors("checkpoint zip members", lambda: load_model(path))


@FUZZ
@given(name=st.sampled_from(sorted(CHECKPOINTS)), data=st.data())
def test_checkpoint_objects(name: str, data: st.DataObject) -> None:
    buf = io.BytesIO()
    torch.save(data.draw(mutated_checkpoint(CHECKPOINTS[name])).value, buf)
    path = _write("objects.pt", buf.getvalue())
    _expect_own_errors("checkpoint objects", lambda: load_model(path))


@FUZZ
@given(mutant=mutated_bytes(DIGITS))
def test_data_bytes(mutant: Mutant) -> None:
    path = _write("bytes.npz", mutant.value)
    _expect_own_errors("data bytes", lambda: load_data(path))


@FUZZ
@given(mutant=mutated_arrays(), suffix=st.sampled_from([".npz", ".pt"]))
def test_data_arrays_against_the_model(mutant: Mutant, suffix: str) -> None:
    path = SCRATCH / f"arrays{suffix}"
    if suffix == ".npz":
        np.savez(path, **mutant.value)
    else:  # torch holds no strings or dates: those arrays stay numpy (refused by the loader)
        torch.save(
            {
                k: torch.from_numpy(v) if v.dtype.kind in "biufc" else v
                for k, v in mutant.value.items()
            },
            path,
        )
    model = SAMPLES / "mlp_digits.pt"
    _expect_own_errors("data arrays", lambda: load_subject(model, path, None, False, 0))
