"""The ``rankshrink`` command line: ``compress``, ``verify``, ``inspect``.

Each command is thin: it checks its flags, calls the library, renders with rich, and turns the
project's error types into one red line and an exit code (2 bad input, 3 gate failed, 130/143
interrupted). Nothing is written unless the run succeeded and every gate passed (the report is
written either way when asked for, so a CI job can read why a gate failed).
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

from rankshrink import __version__
from rankshrink.errors import GateError, InputError, RankshrinkError
from rankshrink.io.outputs import check_outputs, write_all
from rankshrink.onnx.export import ExportConfig
from rankshrink.onnx.gates import Tolerances
from rankshrink.pipeline.config import require as _require
from rankshrink.pipeline.methods import METHODS, check_settings
from rankshrink.train.rare_loop import StepStats, TrainConfig

# click's UsageError (typer vendors click and exports only this subclass of it)
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]


class _OneLineUsageError(_UsageError):  # type: ignore[misc,valid-type]
    """A usage error shown as one line, like every other bad input (SPEC §6), not click's
    four-line usage block."""

    def show(self, file: Any = None) -> None:
        ctx = getattr(self, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        typer.echo(f"error: {self.format_message()}{hint}", err=True)


class _Command(TyperCommand):
    """A command whose bad flags and arguments are reported in one line (exit 2)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except _UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # help was asked for, in effect
                raise
            raise _OneLineUsageError(exc.format_message(), ctx) from None  # type: ignore[attr-defined]


app = typer.Typer(
    name="rankshrink",
    help="Compress a trained PyTorch model into a smaller, verified ONNX file (RaRe + live fusion).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


#: --method's choices: the registry's names (rankshrink.pipeline.methods.METHODS)
Method = StrEnum("Method", {name.replace("-", "_").replace("+", "_"): name for name in METHODS})  # type: ignore[misc]

#: compress's method-setting options, by the MethodConfig field each sets
_METHOD_OPTIONS = {
    "budget": "budget",
    "rank": "rank",
    "tw_margin": "tw_margin",
    "min_rank": "min_rank",
    "min_energy": "min_energy",
    "lambda_sparsity": "lam",
    "refit_steps": "refit_steps",
}


def _given(ctx: typer.Context, names: dict[str, str]) -> set[str]:
    """The fields whose options were given on the command line (or in the environment): click
    knows, so no default is written twice to guess it."""
    # typer bundles its own click: compare the source's name, not the enum of another copy
    given = ("COMMANDLINE", "ENVIRONMENT")
    sources = {param: ctx.get_parameter_source(param) for param in names}
    return {
        field
        for param, field in names.items()
        if sources[param] is not None and sources[param].name in given
    }


class AxisPolicy(StrEnum):
    fold = "fold"
    longer = "longer"


class Exporter(StrEnum):
    dynamo = "dynamo"
    torchscript = "torchscript"


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


class _Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no ``except Exception``
    on the way up (the exporters have many) turns it into an ordinary failure."""


@dataclass
class _Run:
    """What a command has done so far, for an honest message when it is interrupted."""

    written: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def _errors(console: Console) -> Iterator[_Run]:
    """Map the project's errors and interrupts to one line and an exit code."""
    previous = signal.getsignal(signal.SIGTERM)
    previous_int = signal.getsignal(signal.SIGINT)
    run = _Run()

    def on_term(_signum: int, _frame: Any) -> None:
        _PENDING.append(_Terminated)
        raise _Terminated()

    def on_int(_signum: int, _frame: Any) -> None:
        _PENDING.append(KeyboardInterrupt)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    if previous_int is signal.default_int_handler:  # not when SIGINT is ignored (background jobs)
        signal.signal(signal.SIGINT, on_int)
    try:
        yield run
    except RankshrinkError as exc:
        # the message quotes user paths, which may contain [markup]
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _forget_unhandled_interrupt()
        console.print(f"[red]interrupted[/red]: {_stopped(run)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except _Terminated:
        console.print(f"[red]terminated[/red]: {_stopped(run)}", highlight=False, soft_wrap=True)
        raise typer.Exit(143) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        _PENDING.clear()


def _forget_unhandled_interrupt() -> None:
    """Clear CPython's "KeyboardInterrupt went unhandled" flag, so that exit 130 stays 130.

    When Ctrl-C lands inside an ``exec`` of a string (dataclasses and namedtuples build their
    methods that way, so any lazy import can be in one), CPython sets that flag as the exception
    leaves the ``exec``, and never clears it when we catch the exception further up. Under
    ``python -m`` the interpreter checks the flag after a normal ``sys.exit`` and kills itself
    with SIGINT, so the caller saw "killed by signal 2" in place of our exit code. Every ``exec``
    of a string resets the flag first; an empty one does nothing else.
    """
    exec("")  # a constant empty string, run only for its side effect above


#: Signals already raised as exceptions. Python runs a handler wherever the main thread happens
#: to be; when that is a weakref or import-lock callback, the exception is printed and dropped
#: ("Exception ignored in ...") and the run would go on. Every training step and every stage
#: change re-raises a pending one (:func:`_raise_pending`).
_PENDING: list[type[BaseException]] = []


def _raise_pending(*_args: Any) -> None:
    if _PENDING:
        raise _PENDING[0]()


def _checked(callback: Callable[..., None] | None) -> Callable[..., None]:
    """``callback`` (or nothing) after re-raising a signal some callback swallowed."""

    def call(*args: Any) -> None:
        _raise_pending()
        if callback is not None:
            callback(*args)

    return call


def _stopped(run: _Run) -> str:
    if not run.written:
        return "stopped cleanly, nothing was written"
    # The signal came while the outputs were being renamed into place; that step is held back
    # from interrupts (see outputs.signals_deferred), so they are complete.
    names = ", ".join(escape(str(p)) for p in run.written)
    return f"stopped after writing {names} (complete)"


def _err_console() -> Console:
    return Console(stderr=True, highlight=False, width=_width())


def _console(quiet: bool = False) -> Console:
    return Console(quiet=quiet, highlight=False, width=_width())


def _width() -> int | None:
    """A terminal's own width; off a terminal (a pipe, a CI log) the width the tables are laid
    out for, where rich would otherwise assume 80 columns."""
    from rankshrink.cli.render import WIDTH

    return None if sys.stdout.isatty() else WIDTH


def _tolerances(
    task: TaskKind,
    max_accuracy_drop: float | None,
    min_agreement: float | None,
    min_cosine: float | None,
    max_prob_diff: float | None,
    max_rel_error: float | None,
    export_atol: float = 1e-4,
) -> Tolerances:
    """The quality-gate flags, checked (finite, in range), as Tolerances."""
    from rankshrink.onnx.gates import validate

    tol = Tolerances(
        export_atol=export_atol,
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        min_cosine=min_cosine,
        max_prob_diff=max_prob_diff,
        max_rel_error=max_rel_error,
        task=task.value,
    )
    validate(tol)
    return tol


#: --threads of compress and compare: one meaning for both (rankshrink.pipeline.threads).
_THREADS_HELP = (
    "Intra-op threads; 0: the thread policy (one for small training steps, more for big ones;"
    " the report records the count)."
)


@app.command(cls=_Command)
def compress(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            help="Checkpoint: self-describing .pt, state_dict (+ --arch), or pickle (+ --trust-pickle),"
            " or a Hugging Face folder (config.json + safetensors)."
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Data file (.npz/.pt/.safetensors) with inputs x, optional labels y and split;"
            " for a Hugging Face folder input_ids (+ attention_mask, token_type_ids, y)."
        ),
    ] = "",
    text: Annotated[
        str,
        typer.Option(
            help="Hugging Face folder only: a text file, one sentence a line, tokenized with the"
            " folder's tokenizer (instead of --data)."
        ),
    ] = "",
    out: Annotated[
        str | None, typer.Option(help="Compressed ONNX path [default: ./<model>.rankshrink.onnx].")
    ] = None,
    report: Annotated[
        str | None, typer.Option(help="JSON report path [default: <out without .onnx>.json].")
    ] = None,
    save_pt: Annotated[
        str | None,
        typer.Option("--save-pt", help="Also write the compressed model as a loadable checkpoint."),
    ] = None,
    method: Annotated[Method, typer.Option(help="Compression method.")] = Method.rare,
    steps: Annotated[
        int, typer.Option(help="Fine-tuning steps (layer-sparsity: the penalized phase).")
    ] = 1000,
    budget: Annotated[
        float | None,
        typer.Option(help="svd: fraction of the Linear layers' parameters to keep. [default: 0.5]"),
    ] = None,
    rank: Annotated[
        int | None, typer.Option(help="svd: one rank for every layer (instead of --budget).")
    ] = None,
    tw_margin: Annotated[
        float, typer.Option(help="rmt-svd: Tracy–Widom units kept above the MP edge.")
    ] = 0.0,
    min_rank: Annotated[int, typer.Option(help="svd/rmt-svd: no layer goes below this rank.")] = 1,
    min_energy: Annotated[
        float,
        typer.Option(
            help="rmt-svd: keep at least this share of each layer's spectral energy Σs², even"
            " below the MP edge (0: the bare edge)."
        ),
    ] = 0.5,
    lambda_sparsity: Annotated[
        float, typer.Option(help="layer-sparsity: weight of the negative-part group penalty.")
    ] = 0.1,
    refit_steps: Annotated[
        int | None,
        typer.Option(
            help="layer-sparsity and the X+rmt-svd combinations: refit steps after the last"
            " stage. [default: --steps]"
        ),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(help="Also draw the run's size and loss over the steps to this PNG file."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Fine-tuning batch size.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 1e-3,
    lambda_rank: Annotated[
        float, typer.Option(help="λ1, weight of the RaRe loss (0 turns it off).")
    ] = 20.0,
    lambda_l2: Annotated[float, typer.Option(help="λ2, weight of the L2 loss.")] = 0.1,
    tau_cos: Annotated[float, typer.Option(help="Fusion threshold on 1 − |cos|.")] = 1e-4,
    tau_euc: Annotated[float, typer.Option(help="Fusion threshold on the Euclidean gap.")] = 0.1,
    target_ratio: Annotated[
        float | None,
        typer.Option(
            help="Export size to aim for, relative to the original; the fusion thresholds relax until the run is on track. [default: 0.6 for MLPs, 0.7 for Transformers]"
        ),
    ] = None,
    no_target: Annotated[
        bool,
        typer.Option(
            "--no-target",
            help="Keep τ fixed (the paper's behaviour; shrinks far less in a post-hoc run).",
        ),
    ] = False,
    no_fusion: Annotated[
        bool,
        typer.Option("--no-fusion", help="Never fuse (with --lambda-rank 0: plain fine-tuning)."),
    ] = False,
    no_frobenius: Annotated[
        bool, typer.Option("--no-frobenius", help="Turn off Frobenius normalization.")
    ] = False,
    axis_policy: Annotated[
        AxisPolicy,
        typer.Option(
            help="fold: fuse only axes that shrink the export; longer: the paper's longer-axis rule."
        ),
    ] = AxisPolicy.fold,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill/--no-distill",
            help="Distill from the original model alongside the labels (without labels it is the"
            " whole task loss).",
        ),
    ] = True,
    seed: Annotated[int, typer.Option(help="Random seed (batches, dropout, split).")] = 0,
    threads: Annotated[int, typer.Option(help=_THREADS_HELP)] = 0,
    max_bytes: Annotated[
        int | None, typer.Option(help="Gate: fail (exit 3) if the compressed ONNX is larger.")
    ] = None,
    task: TaskOption = TaskKind.auto,
    max_accuracy_drop: MaxAccuracyDrop = None,
    min_agreement: MinAgreement = None,
    min_cosine: MinCosine = None,
    max_prob_diff: MaxProbDiff = None,
    max_rel_error: MaxRelError = None,
    export_atol: Annotated[
        float,
        typer.Option(help="Max abs diff allowed between the compressed torch model and its ONNX."),
    ] = 1e-4,
    exporter: Annotated[Exporter, typer.Option(help="ONNX exporter.")] = Exporter.dynamo,
    opset: Annotated[int, typer.Option(help="ONNX opset.")] = 18,
    arch: Annotated[
        str | None, typer.Option(help="module:factory building the model for a bare state_dict.")
    ] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle", help="Allow unpickling a full nn.Module (runs code from the file)."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing output files.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or tables; errors only.")
    ] = False,
) -> None:
    """Compress (RaRe + live fusion by default; or svd, rmt-svd, layer-sparsity, or a structural
    method followed by RMT-SVD on what it left), export a smaller ONNX and verify it."""
    from rankshrink.pipeline.compress import compress as run_compress
    from rankshrink.pipeline.config import CompressConfig, MethodConfig, require_finite

    console = _console(quiet)
    err = _err_console()
    with _errors(err) as run:
        _require(not (data and text), "give --data or --text, not both")
        if text:  # the Hugging Face adapter tokenizes a .txt data file (rankshrink.io.token_data)
            _require(Path(model).is_dir(), "--text needs a Hugging Face model folder")
            _require(text.endswith(".txt"), f"--text must name a .txt file, got {text}")
            data = text
        _require(
            bool(data),
            "compress needs --data FILE (inputs x, optional labels y) to fine-tune and verify",
        )
        require_finite(export_atol=export_atol)
        tolerances = _tolerances(
            task,
            max_accuracy_drop,
            min_agreement,
            min_cosine,
            max_prob_diff,
            max_rel_error,
            export_atol=export_atol,
        )
        check_settings(method.value, _given(ctx, _METHOD_OPTIONS))
        mcfg = MethodConfig(
            method=method.value,
            budget=budget,
            rank=rank,
            tw_margin=tw_margin,
            min_rank=min_rank,
            min_energy=min_energy,
            lam=lambda_sparsity,
            refit_steps=refit_steps,
        )
        if plot:
            from rankshrink.cli.plots import require_matplotlib

            require_matplotlib()
            _require(plot.endswith(".png"), f"--plot must end in .png, got {plot}")
        train = TrainConfig(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            lambda_rank=lambda_rank,
            lambda_l2=lambda_l2,
            tau_cos=tau_cos,
            tau_euc=tau_euc,
            fusion=not no_fusion,
            distill=distill,
            target_ratio=None if no_target or no_fusion else target_ratio or 0.6,
            seed=seed,
        )
        _require(
            target_ratio is None or 0 < target_ratio < 1,
            f"--target-ratio must be in (0, 1), got {target_ratio}",
        )
        model_path, data_path = Path(model), Path(data)
        cfg = CompressConfig(  # checks every setting's range
            model=model_path,
            data=data_path,
            method=mcfg,
            arch=arch,
            trust_pickle=trust_pickle,
            train=train,
            frobenius=not no_frobenius,
            axis_policy=axis_policy.value,
            export=ExportConfig(exporter=exporter.value, opset=opset),
            tolerances=tolerances,
            max_bytes=max_bytes,
            threads=threads or None,
            # no --target-ratio: the pipeline picks the model family's default
            auto_target=target_ratio is None and not (no_target or no_fusion),
            checkpoint=bool(save_pt),
        )
        out_path = Path(out) if out else Path.cwd() / f"{model_path.stem}.rankshrink.onnx"
        _require(out_path.suffix == ".onnx", f"--out must end in .onnx, got {out_path}")
        report_path = Path(report) if report else out_path.with_suffix(".json")
        outputs = [out_path, report_path] + [Path(p) for p in (save_pt, plot) if p]
        check_outputs(outputs, [model_path, data_path], overwrite)

        result = _run_with_progress(
            console,
            quiet or method != Method.rare,  # the other methods report phases, not steps
            lambda progress, stage: run_compress(cfg, progress, stage),
            steps,
            stages=not quiet,
        )
        rep = result.report
        files = {report_path: (json.dumps(rep, indent=2) + "\n").encode()}
        if not result.gate_failures:
            files[out_path] = result.onnx
            if save_pt:
                buf = io.BytesIO()
                torch.save(result.checkpoint, buf)
                files[Path(save_pt)] = buf.getvalue()
            if plot:
                from rankshrink.cli.plots import trajectory_png

                files[Path(plot)] = trajectory_png(rep)
        write_all(files, on_done=run.written.extend)
        _print_result(console, rep)
        if result.gate_failures:
            raise GateError(
                "; ".join(result.gate_failures)
                + f" — nothing but the report ({report_path}) was written"
            )
        console.print(
            f"wrote {out_path} ({rep['onnx_bytes_after']:,} bytes) and {report_path}"
            + "".join(f" and {p}" for p in (save_pt, plot) if p)
        )


def _run_with_progress(
    console: Console, quiet: bool, fn: Callable[..., Any], steps: int, stages: bool = False
) -> Any:
    def run(progress: Callable[..., None] | None, stage: Callable[[str], None]) -> Any:
        return fn(_checked(progress), _checked(stage))

    return _show_progress(console, quiet, run, steps, stages)


def _show_progress(
    console: Console, quiet: bool, fn: Callable[..., Any], steps: int, stages: bool
) -> Any:
    if quiet and stages:  # no per-step progress, but say which phase is running
        return fn(None, lambda msg: console.print(f"[dim]{msg}…[/dim]"))
    if quiet or (not console.is_terminal and not console.file.isatty()):
        last = [0]

        def plain(stats: StepStats) -> None:  # one line every 10% when not on a terminal
            from rankshrink.cli.render import progress_line

            if (not quiet and stats.step >= last[0] + max(1, steps // 10)) or stats.step == steps:
                last[0] = stats.step
                console.print(progress_line(stats))

        return fn(plain, lambda msg: console.print(f"[dim]{msg}…[/dim]"))
    from rankshrink.cli.render import progress_fields, training_progress

    with training_progress(console) as bar:
        task = bar.add_task("fine-tuning", total=steps, loss=0.0, size=1.0, fusions=0)

        def update(stats: StepStats) -> None:
            bar.update(task, completed=stats.step, **progress_fields(stats))

        return fn(update, lambda msg: console.print(f"[dim]{msg}…[/dim]"))


def _print_result(console: Console, rep: dict[str, Any]) -> None:
    from rankshrink.cli.render import layer_table, summary_table, verification_lines

    console.print(layer_table(rep))
    console.print(summary_table(rep))
    for line in verification_lines(rep):
        console.print(line)
    status = "[green]passed[/green]" if rep["gates"]["passed"] else "[red]FAILED[/red]"
    console.print(f"verification {status}")


@app.command(cls=_Command)
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
    arch: Annotated[str | None, typer.Option(help="module:factory for a bare state_dict.")] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow unpickling a full nn.Module.")
    ] = False,
    task: TaskOption = TaskKind.auto,
    max_accuracy_drop: MaxAccuracyDrop = None,
    min_agreement: MinAgreement = None,
    min_cosine: MinCosine = None,
    max_prob_diff: MaxProbDiff = None,
    max_rel_error: MaxRelError = None,
    seed: Annotated[
        int, typer.Option(help="Seed of the split when the data file records none.")
    ] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Re-check an exported ONNX file against its original model on held-out data: first that
    the file belongs to the model, then fidelity and the quality gates (exit 3 if any fails)."""
    from rankshrink.cli.render import verdict_line, verification_table
    from rankshrink.pipeline.report import verification_dict
    from rankshrink.pipeline.verify_file import verify_file

    console, err = _console(), _err_console()
    with _errors(err):
        _require(bool(data), "verify needs --data FILE to compare outputs")
        tol = _tolerances(
            task, max_accuracy_drop, min_agreement, min_cosine, max_prob_diff, max_rel_error
        )
        onnx_path = Path(onnx_file)
        _require(onnx_path.is_file(), f"ONNX file not found: {onnx_path}")
        args = (Path(model), onnx_path, Path(data), tol, seed, arch, trust_pickle)
        result = verify_file(*args)
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


@app.command(cls=_Command)
def inspect(
    model: Annotated[str, typer.Argument(help="A checkpoint, or a Hugging Face folder.")],
    arch: Annotated[str | None, typer.Option(help="module:factory for a bare state_dict.")] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow unpickling a full nn.Module.")
    ] = False,
    tau_cos: Annotated[
        float, typer.Option(help="Threshold for counting near-parallel pairs.")
    ] = 1e-4,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """List the layers, their shapes and a data-free redundancy estimate; no training."""
    from rankshrink.cli.render import inspect_summary, inspect_table
    from rankshrink.io.hf_folder import (
        load_model_or_folder,  # a checkpoint or a Hugging Face folder
    )
    from rankshrink.methods.redundancy import inspect_model

    console, err = _console(), _err_console()
    with _errors(err):
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


@app.command(cls=_Command)
def compare(
    model: Annotated[str, typer.Argument(help="A checkpoint.")],
    data: Annotated[str, typer.Option(help="Data file (.npz/.pt/.safetensors).")] = "",
    budgets: Annotated[
        str,
        typer.Option(
            help="Comma-separated size budgets (fractions): svd --budget, RaRe --target-ratio."
        ),
    ] = "0.3,0.5,0.7",
    steps: Annotated[int, typer.Option(help="Fine-tuning steps of every run.")] = 1000,
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods to run.")
    ] = "rare,svd,rmt-svd,layer-sparsity,layer-sparsity+rmt-svd",
    seed: Annotated[int, typer.Option(help="Random seed (batches, split).")] = 0,
    threads: Annotated[int, typer.Option(help=_THREADS_HELP)] = 0,
    out_json: Annotated[
        str | None, typer.Option("--out-json", help="Write the table as JSON here.")
    ] = None,
    plot: Annotated[
        str | None, typer.Option(help="Draw accuracy against ONNX size to this PNG file.")
    ] = None,
    arch: Annotated[str | None, typer.Option(help="module:factory for a bare state_dict.")] = None,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow unpickling a full nn.Module.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing output files.")
    ] = False,
) -> None:
    """Run every method at matched budgets on the same split; print one table (+ JSON, PNG)."""
    from rankshrink.cli.render import compare_table
    from rankshrink.pipeline.compare import CompareConfig
    from rankshrink.pipeline.compare import compare as run_compare
    from rankshrink.pipeline.methods import METHODS

    console, err = _console(), _err_console()
    with _errors(err) as run:
        _require(bool(data), "compare needs --data FILE (inputs x, optional labels y)")
        _require(steps > 0, f"--steps must be positive, got {steps}")
        _require(threads >= 0, f"--threads must be ≥ 0 (0: the thread policy), got {threads}")
        try:
            fractions = tuple(float(b) for b in budgets.split(",") if b.strip())
        except ValueError:
            raise InputError(
                f"--budgets must be comma-separated numbers, got {budgets!r}"
            ) from None
        _require(
            bool(fractions) and all(0 < b < 1 for b in fractions),
            f"--budgets must be fractions in (0, 1), got {budgets!r}",
        )
        chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
        bad = [m for m in chosen if m not in METHODS]
        _require(
            bool(chosen) and not bad,
            f"--methods: unknown {', '.join(bad) or '(none given)'} (choose from {', '.join(METHODS)})",
        )
        if plot:
            from rankshrink.cli.plots import require_matplotlib

            require_matplotlib()
            _require(plot.endswith(".png"), f"--plot must end in .png, got {plot}")
        model_path, data_path = Path(model), Path(data)
        outputs = [Path(p) for p in (out_json, plot) if p]
        check_outputs(outputs, [model_path, data_path], overwrite)
        cfg = CompareConfig(
            model=model_path,
            data=data_path,
            budgets=fractions,
            steps=steps,
            seed=seed,
            methods=chosen,
            threads=threads or None,
            arch=arch,
            trust_pickle=trust_pickle,
        )
        result = run_compare(cfg, on_run=lambda label: console.print(f"[dim]{label}…[/dim]"))
        title = f"{model_path.name}: {steps} fine-tuning steps per run, seed {seed}"
        console.print(compare_table(result.rows, title))
        for s in result.skipped:
            console.print(f"{s['method']}: not applicable — {escape(s['reason'])}")
        files: dict[Path, bytes] = {}
        if out_json:
            payload = {
                "model": str(model_path),
                "data": str(data_path),
                "steps": steps,
                "seed": seed,
                "rows": result.rows,
                "skipped": result.skipped,
            }
            files[Path(out_json)] = (json.dumps(payload, indent=2) + "\n").encode()
        if plot:
            from rankshrink.cli.plots import compare_png

            files[Path(plot)] = compare_png(result.rows, title)
        if files:
            write_all(files, on_done=run.written.extend)
            console.print("wrote " + " and ".join(str(p) for p in files))


def _version(value: bool) -> None:
    if value:
        print(f"rankshrink {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """rankshrink: make a trained model physically smaller, with proof that it still behaves."""


def run() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    sys.exit(app())
