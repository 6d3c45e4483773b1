"""The options more than one command takes, their choices, and how they become settings.

Choices come from the library where it has a list (``--method``: the registry's names), so the
command line cannot offer what the pipeline does not run. Ranges are checked by the config
dataclasses and :func:`rankshrink.onnx.task.validate`, not here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from rankshrink.onnx.task import Tolerances
from rankshrink.pipeline.config import require
from rankshrink.pipeline.methods import METHODS

#: --method's choices: the registry's names (rankshrink.pipeline.methods.METHODS)
Method = StrEnum("Method", {name.replace("-", "_").replace("+", "_"): name for name in METHODS})  # type: ignore[misc]

#: compress's method-setting options, by the MethodConfig field each sets
METHOD_OPTIONS = {
    "budget": "budget",
    "rank": "rank",
    "tw_margin": "tw_margin",
    "min_rank": "min_rank",
    "min_energy": "min_energy",
    "lambda_sparsity": "lam",
    "refit_steps": "refit_steps",
}


def given(ctx: typer.Context, names: dict[str, str]) -> set[str]:
    """The fields whose options were given on the command line (or in the environment): click
    knows, so no default is written twice to guess it."""
    # typer bundles its own click: compare the source's name, not the enum of another copy
    sources = {param: ctx.get_parameter_source(param) for param in names}
    return {
        field
        for param, field in names.items()
        if sources[param] is not None and sources[param].name in ("COMMANDLINE", "ENVIRONMENT")
    }


class AxisPolicy(StrEnum):
    fold = "fold"
    longer = "longer"


class Exporter(StrEnum):
    dynamo = "dynamo"
    torchscript = "torchscript"


class Quantize(StrEnum):
    none = "none"
    int8 = "int8"
    fp16 = "fp16"


class TaskKind(StrEnum):
    auto = "auto"
    classifier = "classifier"
    binary = "binary"
    regression = "regression"


# The quality-gate options, shared by compress and verify (defaults: rankshrink.onnx.gates).
TaskOption = Annotated[
    TaskKind,
    typer.Option(
        help="What the model outputs; picks the default gates"
        " (auto: 1 output binary, else classifier)."
    ),
]
MaxAccuracyDrop = Annotated[
    float | None,
    typer.Option(help="Gate: max test-accuracy drop in points. [default: 1, with labels]"),
]
MinAgreement = Annotated[
    float | None,
    typer.Option(help="Gate: min top-1/decision agreement with the original, 0–1. [default: 0.95]"),
]
MinCosine = Annotated[
    float | None,
    typer.Option(help="Gate (hidden states): min mean pooled cosine, -1–1. [default: 0.98]"),
]
MaxProbDiff = Annotated[
    float | None, typer.Option(help="Gate (binary): max mean |Δp|, 0–1. [default: 0.05]")
]
MaxRelError = Annotated[
    float | None,
    typer.Option(help="Gate (regression): max ‖after − before‖/‖before‖. [default: 0.05]"),
]


def tolerances(
    task: TaskKind,
    max_accuracy_drop: float | None,
    min_agreement: float | None,
    min_cosine: float | None,
    max_prob_diff: float | None,
    max_rel_error: float | None,
    export_atol: float = 1e-4,
) -> Tolerances:
    """The quality-gate flags as Tolerances (not checked: see rankshrink.onnx.task.validate)."""
    return Tolerances(
        export_atol=export_atol,
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        min_cosine=min_cosine,
        max_prob_diff=max_prob_diff,
        max_rel_error=max_rel_error,
        task=task.value,
    )


#: --threads of compress and compare: one meaning for both (rankshrink.pipeline.threads).
Threads = Annotated[
    int,
    typer.Option(
        help="Intra-op threads; 0: the thread policy (one for small training steps, more for big"
        " ones; the report records the count)."
    ),
]

# How verify, inspect and compare load a bare state_dict or a pickled module (compress says more).
Arch = Annotated[str | None, typer.Option(help="module:factory for a bare state_dict.")]
TrustPickle = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow unpickling a full nn.Module.")
]

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def check_plot(plot: str) -> None:
    """``--plot FILE``: matplotlib is there and the file is a PNG (before any work is done).

    Raises:
        InputError: one line naming what is missing.
    """
    from rankshrink.cli.plots import require_matplotlib

    require_matplotlib()
    require(plot.endswith(".png"), f"--plot must end in .png, got {plot}")
