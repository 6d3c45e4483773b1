"""``rankshrink compress``: options → :class:`CompressConfig` → :func:`compress` → rich tables.

Nothing is written unless the run succeeded and every gate passed; the report is written either
way, so a CI job can read why a gate failed.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import torch
import typer
from rich.console import Console

from rankshrink.cli.options import (
    METHOD_OPTIONS,
    AxisPolicy,
    Exporter,
    MaxAccuracyDrop,
    MaxProbDiff,
    MaxRelError,
    Method,
    MinAgreement,
    MinCosine,
    Overwrite,
    Quantize,
    TaskKind,
    TaskOption,
    Threads,
    check_plot,
    given,
    tolerances,
)
from rankshrink.cli.runner import errors, run_with_progress, stderr_console, stdout_console
from rankshrink.errors import GateError
from rankshrink.io.outputs import check_outputs, write_all
from rankshrink.onnx.export import ExportConfig
from rankshrink.pipeline.config import CompressConfig, MethodConfig, check_settings, require
from rankshrink.train.rare_config import TrainConfig

if TYPE_CHECKING:
    from rankshrink.pipeline.compress import CompressResult


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
    threads: Threads = 0,
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
    quantize: Annotated[
        Quantize,
        typer.Option(
            help="Store the compressed file's weights as int8 (per-channel, onnxruntime's"
            " quantize_dynamic) or fp16; the stored file is verified against the original again."
        ),
    ] = Quantize.none,
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
    overwrite: Overwrite = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or tables; errors only.")
    ] = False,
) -> None:
    """Compress (RaRe + live fusion by default; or svd, rmt-svd, layer-sparsity, or a structural
    method followed by RMT-SVD on what it left), export a smaller ONNX and verify it."""
    from rankshrink.pipeline.compress import compress as run_compress

    console = stdout_console(quiet)
    with errors(stderr_console()) as run:
        data = _data_file(model, data, text)
        check_settings(method.value, given(ctx, METHOD_OPTIONS))
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
            check_plot(plot)
        fixed_tau = no_target or no_fusion
        # the option as given, even when --no-target or --no-fusion leaves it unused
        require(
            target_ratio is None or 0 < target_ratio < 1,
            f"--target-ratio must be in (0, 1), got {target_ratio}",
        )
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
            # without --target-ratio the pipeline replaces 0.6 by the family's default
            target_ratio=None if fixed_tau else target_ratio or 0.6,
            seed=seed,
        )
        gates = (max_accuracy_drop, min_agreement, min_cosine, max_prob_diff, max_rel_error)
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
            tolerances=tolerances(task, *gates, export_atol=export_atol),
            max_bytes=max_bytes,
            threads=threads or None,
            auto_target=target_ratio is None and not fixed_tau,
            checkpoint=bool(save_pt),
            quantize=None if quantize == Quantize.none else quantize.value,
        )
        out_path = Path(out) if out else Path.cwd() / f"{model_path.stem}.rankshrink.onnx"
        require(out_path.suffix == ".onnx", f"--out must end in .onnx, got {out_path}")
        report_path = Path(report) if report else out_path.with_suffix(".json")
        extra = [Path(p) for p in (save_pt, plot) if p]
        check_outputs([out_path, report_path, *extra], [model_path, data_path], overwrite)

        result = run_with_progress(
            console,
            quiet or method != Method.rare,  # the other methods report phases, not steps
            lambda progress, stage: run_compress(cfg, progress, stage),
            steps,
            stages=not quiet,
        )
        rep = result.report
        files = {report_path: (json.dumps(rep, indent=2) + "\n").encode()}
        if not result.gate_failures:
            files.update(_outputs(result, out_path, save_pt, plot))
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


def _data_file(model: str, data: str, text: str) -> str:
    """``--data``, or ``--text`` for a Hugging Face folder (the adapter tokenizes a .txt data
    file, see rankshrink.io.token_data)."""
    require(not (data and text), "give --data or --text, not both")
    if text:
        require(Path(model).is_dir(), "--text needs a Hugging Face model folder")
        require(text.endswith(".txt"), f"--text must name a .txt file, got {text}")
        data = text
    require(
        bool(data),
        "compress needs --data FILE (inputs x, optional labels y) to fine-tune and verify",
    )
    return data


def _outputs(
    result: CompressResult, out: Path, save_pt: str | None, plot: str | None
) -> dict[Path, bytes]:
    """The files written when every gate passed: the ONNX file, and the checkpoint and the plot
    when asked for."""
    files = {out: result.onnx}
    if save_pt:
        buf = io.BytesIO()
        torch.save(result.checkpoint, buf)
        files[Path(save_pt)] = buf.getvalue()
    if plot:
        from rankshrink.cli.plots import trajectory_png

        files[Path(plot)] = trajectory_png(result.report)
    return files


def _print_result(console: Console, rep: dict[str, Any]) -> None:
    from rankshrink.cli.render_compress import layer_table, summary_table
    from rankshrink.cli.render_verify import verification_lines

    console.print(layer_table(rep))
    console.print(summary_table(rep))
    for line in verification_lines(rep):
        console.print(line)
    status = "[green]passed[/green]" if rep["gates"]["passed"] else "[red]FAILED[/red]"
    console.print(f"verification {status}")
