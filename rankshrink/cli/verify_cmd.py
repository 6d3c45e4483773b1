"""``rankshrink verify``: re-check an exported ONNX file against its original model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from rankshrink.cli.options import (
    Arch,
    JsonOut,
    MaxAccuracyDrop,
    MaxProbDiff,
    MaxRelError,
    MinAgreement,
    MinCosine,
    TaskKind,
    TaskOption,
    TrustPickle,
    tolerances,
)
from rankshrink.cli.runner import errors, stderr_console, stdout_console
from rankshrink.errors import GateError
from rankshrink.pipeline.config import require


def verify(
    model: Annotated[
        str,
        typer.Argument(
            help="The original checkpoint, a Hugging Face folder, or a --save-pt output."
        ),
    ],
    onnx_file: Annotated[
        str, typer.Argument(metavar="OUT.onnx", help="An exported (compressed) ONNX file.")
    ],
    data: Annotated[str, typer.Option(help="Data file; its held-out split is used.")] = "",
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    task: TaskOption = TaskKind.auto,
    max_accuracy_drop: MaxAccuracyDrop = None,
    min_agreement: MinAgreement = None,
    min_cosine: MinCosine = None,
    max_prob_diff: MaxProbDiff = None,
    max_rel_error: MaxRelError = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the split when the data file records none.")
    ] = 0,
    json_out: JsonOut = False,
) -> None:
    """Re-check an exported ONNX file against its original model on held-out data: first that
    the file belongs to the model, then fidelity and the quality gates (exit 3 if any fails)."""
    from rankshrink.cli.render_verify import verdict_line, verification_table
    from rankshrink.onnx.task import validate
    from rankshrink.pipeline.report import verification_dict
    from rankshrink.pipeline.verify_file import verify_file

    console = stdout_console()
    with errors(stderr_console()):
        require(bool(data), "verify needs --data FILE to compare outputs")
        tol = tolerances(
            task, max_accuracy_drop, min_agreement, min_cosine, max_prob_diff, max_rel_error
        )
        validate(tol)  # before the model loads: verify_file checks them only after
        result = verify_file(
            Path(model), Path(onnx_file), Path(data), tol, seed, arch, trust_pickle
        )
        payload = verification_dict(result)
        if json_out:
            console.print_json(json.dumps(payload))
            if not result.passed:  # the JSON is on stdout; the reason, in one line, on stderr
                raise GateError("; ".join(result.failures))
            return
        console.print(verification_table(payload))
        console.print(verdict_line(payload), soft_wrap=True)
        if not result.passed:
            raise typer.Exit(3)  # the verdict line said which gate failed, and by how much
