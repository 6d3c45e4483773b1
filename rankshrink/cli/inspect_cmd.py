"""``rankshrink inspect``: a model's layers and a data-free redundancy estimate; no training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from rankshrink.cli.options import Arch, JsonOut, TrustPickle
from rankshrink.cli.runner import errors, stderr_console, stdout_console


def inspect(
    model: Annotated[str, typer.Argument(help="A checkpoint, or a Hugging Face folder.")],
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    tau_cos: Annotated[
        float, typer.Option(help="Threshold for counting near-parallel pairs.")
    ] = 1e-4,
    json_out: JsonOut = False,
) -> None:
    """List the layers, their shapes and a data-free redundancy estimate; no training."""
    from rankshrink.cli.render_inspect import inspect_summary, inspect_table
    from rankshrink.io.hf_folder import (
        load_model_or_folder,  # a checkpoint or a Hugging Face folder
    )
    from rankshrink.methods.redundancy import inspect_model

    console = stdout_console()
    with errors(stderr_console()):
        loaded = load_model_or_folder(Path(model), arch=arch, trust_pickle=trust_pickle)
        rows = inspect_model(loaded.model, tau_cos=tau_cos)
        if json_out:
            console.print_json(
                json.dumps({"model": model, "sha256": loaded.sha256, "layers": rows})
            )
        else:
            console.print(f"{escape(model)}  ({loaded.source}, sha256 {loaded.sha256[:12]})")
            console.print(inspect_table(rows, tau_cos))
            console.print(inspect_summary(rows))
