"""``--arch module:factory``: import the user's module and build the model a state_dict fits.

The module is imported by name, as Python would: from the current directory, then ``sys.path``
(``PYTHONPATH`` and the installed packages). When it is not found, the error says where it
looked and how to make it findable — the usual mistake is running from another directory than
the one that holds ``mymodel.py``, so a module file beside the checkpoint is pointed out.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

from torch import nn

from rankshrink.errors import InputError


def build_from_factory(arch: str, model_path: Path | None = None) -> nn.Module:
    """Import ``module`` and call ``factory()`` for ``arch = "module:factory"``.

    Args:
        arch: ``"module:factory"``; ``module`` is a dotted module name, not a file path.
        model_path: the checkpoint, where a module file beside it is looked for in the hint.

    Raises:
        InputError: a malformed ``arch``, a module that does not import (saying where it was
            looked for), no such factory, a factory that raises or returns no ``nn.Module``.
    """
    module_name, _, factory_name = arch.partition(":")
    if not module_name or not factory_name:
        raise InputError(f"--arch must look like module:factory, got {arch!r}")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        name = Path(module_name.replace("\\", "/")).name.removesuffix(".py")
        folder = str(Path(module_name).parent)
        raise InputError(
            f"--arch takes a module name, not a file: use --arch {name}:{factory_name} and run"
            f" from the directory that holds {name}.py or set PYTHONPATH={folder}"
        )
    module = _import(module_name, arch, model_path)
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        where = getattr(module, "__file__", None) or module_name
        raise InputError(f"--arch {arch}: {where} has no function {factory_name!r}")
    try:
        model = factory()
    except Exception as exc:  # the user's code failing is still bad input to this tool
        raise InputError(
            f"--arch {arch}: the factory raised {type(exc).__name__} ({_first_line(exc)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch {arch} returned a {type(model).__name__}, not an nn.Module")
    return model


def _import(module_name: str, arch: str, model_path: Path | None) -> ModuleType:
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let --arch name a module in the current directory
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if module_name == missing or module_name.startswith(missing + "."):
            raise InputError(_not_found(arch, missing, model_path)) from None
        raise InputError(  # the user's module imports something that is not installed
            f"--arch {arch}: {module_name} imports {missing!r}, which is not installed here"
        ) from None
    except Exception as exc:  # a SyntaxError, or the module's own code raising at import time
        raise InputError(
            f"--arch {arch}: importing {module_name} raised {type(exc).__name__}"
            f" ({_first_line(exc)})"
        ) from None


def _not_found(arch: str, missing: str, model_path: Path | None) -> str:
    """Where Python looked for ``missing``, and how to make it look in the right place."""
    relative = Path(*missing.split("."))
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    on_path = f"PYTHONPATH ({os.pathsep.join(entries)})" if entries else "PYTHONPATH (not set)"
    text = (
        f"--arch {arch}: no module {missing!r} in the current directory ({Path.cwd()}), on"
        f" {on_path} or among the installed packages; run from the directory that holds"
        f" {relative}.py, or set PYTHONPATH to that directory"
    )
    if model_path is not None:
        folder = model_path.resolve().parent
        if (folder / f"{relative}.py").is_file() or (folder / relative / "__init__.py").is_file():
            text += f" (it is beside the model: PYTHONPATH={folder})"
    return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]
