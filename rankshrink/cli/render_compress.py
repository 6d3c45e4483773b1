"""``compress``'s output: the progress bar while fine-tuning, the per-layer table and the summary.

The lines on what was verified are :func:`rankshrink.cli.render_verify.verification_lines`.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rankshrink.cli.grid import Col, break_name, format_shape, grid
from rankshrink.cli.numfmt import num
from rankshrink.train.rare_config import StepStats


def training_progress(console: Console) -> Progress:
    """A progress bar showing step, loss, the export size estimate and fusions.

    The size is the one number the summary reports as the ONNX bytes ratio (estimated from the
    factorized layers while training, measured on the exported file after), so the bar and the
    summary never show two different counts for one thing.
    """
    return Progress(
        TextColumn("fine-tuning"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>7.4f}"),
        TextColumn("ONNX size ≈{task.fields[size]:.3f}×"),
        TextColumn("fusions {task.fields[fusions]:>5}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def progress_fields(stats: StepStats) -> dict[str, Any]:
    """The bar's fields after a step (:func:`training_progress`)."""
    return {"loss": stats.loss, "size": stats.size_ratio, "fusions": stats.fusions}


def progress_line(stats: StepStats) -> str:
    """The bar's content as one plain line, for logs and pipes."""
    return (
        f"step {stats.step}/{stats.steps}  loss {stats.loss:.4f}"
        f"  ONNX size ≈{stats.size_ratio:.3f}×  fusions {stats.fusions}"
    )


def layer_table(report: dict[str, Any]) -> Table:
    """One row per Linear: original shape, W' shape, the exported weight(s), fold kind, and the
    parameters it keeps. The feature width, and everything else per layer, is in the report.

    For a Transformer the caption lists each block's per-head query/key and value widths.
    """
    cols = [
        Col("layer", text=True),
        Col("original\n(out×in)"),
        Col("W'\n(m'×n')"),
        Col("exported\n(out×in)"),
        Col("fold kind", text=True),
        Col("params"),
        Col("of\noriginal"),
    ]
    rows = []
    for lay in report["layers"]:
        core = format_shape(lay["core_shape"])
        if lay.get("rank") is not None and lay["fold_kind"].split("+")[-1] != "kept":  # (rmt-)svd
            core += f"\nrank {lay['rank']}"
        exported = format_shape(lay["weight_shape"])
        if lay.get("factors"):  # two MatMuls in the ONNX: B (down), then A (up)
            exported = " ·\n".join(format_shape(f) for f in lay["factors"])
        elif "gather-out" in lay["fold_kind"]:  # the rows are gathered out to the layer's width
            exported += f"\n→ {lay['feature_width']}"
        rows.append(
            [
                lay["name"],
                format_shape(lay["original_shape"]),
                core,
                exported,
                break_name(lay["fold_kind"], 14),
                f"{lay['params']:,}",
                f"{lay['params'] / lay['original_params']:.1%}",
            ]
        )
    return grid("layers", cols, rows, caption=head_caption(report))


def head_caption(report: dict[str, Any]) -> str | None:
    """``layers.0 heads: q·k 5 3 4 3, v 7 8 9 10`` per attention block, or None for an MLP."""
    heads = report.get("attention_heads")
    if not heads:
        return None
    return "\n".join(
        f"{h['block']} heads: q·k {' '.join(map(str, h['qk_widths']))},"
        f" v {' '.join(map(str, h['v_widths']))}"
        for h in heads
    )


def summary_table(report: dict[str, Any]) -> Table:
    """Sizes, test accuracy and latency, original against compressed, and the change: a ratio
    (``0.593×``) or, for accuracy, a difference in points."""
    ver = report["verification"]
    cols = [Col("", text=True), Col("original"), Col("compressed"), Col("change")]
    rows = [
        [
            "parameters",
            f"{report['params_before']:,}",
            f"{report['params_after']:,}",
            f"{report['param_ratio']:.3f}×",
        ],
        [
            "ONNX bytes",
            f"{report['onnx_bytes_before']:,}",
            f"{report['onnx_bytes_after']:,}",
            f"{report['onnx_ratio']:.3f}×",
        ],
    ]
    if ver.get("accuracy_before") is not None:
        rows.append(
            [
                "test accuracy",
                f"{ver['accuracy_before']:.2f}%",
                f"{ver['accuracy_after']:.2f}%",
                num(ver["accuracy_after"] - ver["accuracy_before"], "+.2f") + " pt",
            ]
        )
    if report.get("latency_ms_before") is not None:
        rows.append(
            [
                "latency, batch 1",
                f"{report['latency_ms_before']:.3f} ms",
                f"{report['latency_ms_after']:.3f} ms",
                f"{report['latency_ms_after'] / report['latency_ms_before']:.3f}×",
            ]
        )
    return grid("summary", cols, rows)
