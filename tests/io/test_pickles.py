"""``pickle_globals`` names what a pickle would import, in every container and protocol, without
importing or running anything."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from rankshrink.io.pickles import TORCH_LEGACY_MAGIC, pickle_globals, unsafe_globals


class Payload:
    """Never instantiated by a scan: its ``__reduce__`` points at ``os.system``."""

    def __reduce__(self) -> tuple[object, ...]:
        import os

        return (os.system, ("echo pwned",))


def _module() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 2))


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_every_protocol_names_the_call_target(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "p.pkl"
    # the same payload twice: from protocol 4 on, the second reference to the module name is a
    # memo lookup (BINGET), which the scan has to follow
    path.write_bytes(pickle.dumps([Payload(), Payload()], protocol=protocol))
    scan = pickle_globals(path)
    assert scan.container == "pickle"
    assert scan.globals == ["posix.system"]  # os.system pickles under its real module


@pytest.mark.parametrize(
    ("save", "container"),
    [
        (lambda m, p: torch.save(m, p), "zip"),
        (lambda m, p: torch.save(m, p, _use_new_zipfile_serialization=False), "legacy-torch"),
        (lambda m, p: p.write_bytes(pickle.dumps(m)), "pickle"),
    ],
    ids=["torch zip", "torch legacy", "pickle.dump"],
)
def test_each_container_lists_the_module_classes(tmp_path: Path, save, container: str) -> None:
    path = tmp_path / "m.pt"
    save(_module(), path)
    scan = pickle_globals(path)
    assert scan.container == container
    unsafe = unsafe_globals(scan.globals)
    assert "torch.nn.modules.container.Sequential" in unsafe
    assert "torch.nn.modules.linear.Linear" in unsafe
    assert "collections.OrderedDict" in scan.globals and "collections.OrderedDict" not in unsafe


def test_a_weights_only_checkpoint_imports_nothing_unsafe(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    scan = pickle_globals(tmp_path / "w.pt")
    assert scan.globals and unsafe_globals(scan.globals) == []


def test_legacy_header_is_recognized(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps(TORCH_LEGACY_MAGIC, protocol=2) + pickle.dumps(1001))
    assert pickle_globals(path).container == "legacy-torch"


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"weights: 1\n",
        b"B\xff\xff\xff\xf0abc",  # BINBYTES announcing ~4 GB: must not be read (or allocated)
        b"\x8e" + b"\xff" * 8,  # BINBYTES8 announcing 2**64 - 1 bytes
        pickle.dumps(Payload())[:-3],  # cut before STOP: the globals of a broken pickle are noise
    ],
    ids=["empty", "text", "BINBYTES 4 GB", "BINBYTES8", "truncated"],
)
def test_bytes_that_are_no_complete_pickle_list_nothing(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(blob)
    scan = pickle_globals(path)
    assert scan.globals == []
