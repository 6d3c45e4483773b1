"""``rankshrink compare``: every method at matched budgets on one split, in one table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from rankshrink.cli.options import Arch, Overwrite, Threads, TrustPickle, check_plot
from rankshrink.cli.runner import errors, stderr_console, stdout_console
from rankshrink.errors import InputError
from rankshrink.io.outputs import check_outputs, write_all
from rankshrink.pipeline.compare import DEFAULT_METHODS
from rankshrink.pipeline.config import require
from rankshrink.pipeline.methods import METHODS


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
    ] = ",".join(DEFAULT_METHODS),
    seed: Annotated[int, typer.Option(help="Random seed (batches, split).")] = 0,
    threads: Threads = 0,
    out_json: Annotated[
        str | None, typer.Option("--out-json", help="Write the table as JSON here.")
    ] = None,
    plot: Annotated[
        str | None, typer.Option(help="Draw accuracy against ONNX size to this PNG file.")
    ] = None,
    arch: Arch = None,
    trust_pickle: TrustPickle = False,
    overwrite: Overwrite = False,
) -> None:
    """Run every method at matched budgets on the same split; print one table (+ JSON, PNG)."""
    from rankshrink.cli.render_compare import compare_table
    from rankshrink.pipeline.compare import CompareConfig
    from rankshrink.pipeline.compare import compare as run_compare

    console = stdout_console()
    with errors(stderr_console()) as run:
        require(bool(data), "compare needs --data FILE (inputs x, optional labels y)")
        # CompareConfig does not check its settings; the CompressConfig of each run would, but
        # only after the model has loaded
        require(steps > 0, f"--steps must be positive, got {steps}")
        require(threads >= 0, f"--threads must be ≥ 0 (0: the thread policy), got {threads}")
        fractions, chosen = _budgets(budgets), _methods(methods)
        if plot:
            check_plot(plot)
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


def _budgets(text: str) -> tuple[float, ...]:
    """``--budgets 0.3,0.5``: fractions in (0, 1)."""
    try:
        fractions = tuple(float(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise InputError(f"--budgets must be comma-separated numbers, got {text!r}") from None
    require(
        bool(fractions) and all(0 < b < 1 for b in fractions),
        f"--budgets must be fractions in (0, 1), got {text!r}",
    )
    return fractions


def _methods(text: str) -> tuple[str, ...]:
    """``--methods rare,svd``: names from the registry."""
    chosen = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in chosen if m not in METHODS]
    require(
        bool(chosen) and not bad,
        f"--methods: unknown {', '.join(bad) or '(none given)'} (choose from {', '.join(METHODS)})",
    )
    return chosen
