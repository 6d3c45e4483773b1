"""Terminal presentation with rich: the progress bar, the per-layer table and the summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rankshrink.train import StepStats


def training_progress(console: Console) -> Progress:
    """A progress bar showing step, loss, size left and fusions."""
    return Progress(
        TextColumn("fine-tuning"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:>7.4f}"),
        TextColumn("size {task.fields[size]:>6.1%}"),
        TextColumn("core params {task.fields[params]:>8,}"),
        TextColumn("fusions {task.fields[fusions]:>5}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def progress_fields(stats: StepStats) -> dict[str, Any]:
    return {
        "loss": stats.loss,
        "size": stats.size_ratio,
        "params": stats.core_params,
        "fusions": stats.fusions,
    }


def layer_table(report: dict[str, Any]) -> Table:
    """One row per Linear: original shape, W' shape, exported width, fold kind, parameters.

    For a Transformer the caption lists each block's per-head query/key and value widths.
    """
    table = Table(title="layers", title_justify="left", caption=head_caption(report))
    for col in (
        "layer",
        "original (out×in)",
        "W' (m'×n')",
        "exported (out×in)",
        "feature width",
        "fold kind",
        "params",
        "of original",
    ):
        text = col in ("layer", "fold kind")
        # a layer name stays whole (Transformer names are long); the other headers may wrap
        table.add_column(col, justify="left" if text else "right", no_wrap=col == "layer")
    for lay in report["layers"]:
        core = "×".join(map(str, lay["core_shape"]))
        if lay.get("rank") is not None and lay["fold_kind"] != "kept":  # svd / rmt-svd
            core += f" rank {lay['rank']}"
        exported = "×".join(map(str, lay["weight_shape"]))
        if lay.get("factors"):  # two MatMuls in the ONNX: B (down), then A (up)
            exported = " · ".join("×".join(map(str, f)) for f in lay["factors"])
        table.add_row(
            lay["name"],
            "×".join(map(str, lay["original_shape"])),
            core,
            exported,
            str(lay["feature_width"]),
            lay["fold_kind"],
            f"{lay['params']:,}",
            f"{lay['params'] / lay['original_params']:.1%}",
        )
    return table


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
    """Sizes, verification and timing side by side."""
    ver = report["verification"]
    table = Table(title="summary", title_justify="left", show_header=True)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("ratio", justify="right")
    table.add_row(
        "parameters",
        f"{report['params_before']:,}",
        f"{report['params_after']:,}",
        f"{report['param_ratio']:.3f}",
    )
    table.add_row(
        "ONNX bytes",
        f"{report['onnx_bytes_before']:,}",
        f"{report['onnx_bytes_after']:,}",
        f"{report['onnx_ratio']:.3f}",
    )
    if ver.get("accuracy_before") is not None:
        drop = ver["accuracy_before"] - ver["accuracy_after"]
        table.add_row(
            "test accuracy",
            f"{ver['accuracy_before']:.2f}%",
            f"{ver['accuracy_after']:.2f}%",
            f"{-drop:+.2f} pt",
        )
    if report.get("latency_ms_before") is not None:
        table.add_row(
            "latency, batch 1",
            f"{report['latency_ms_before']:.3f} ms",
            f"{report['latency_ms_after']:.3f} ms",
            f"{report['latency_ms_after'] / report['latency_ms_before']:.3f}",
        )
    return table


def verification_lines(report: dict[str, Any]) -> list[str]:
    """Plain lines on what was verified."""
    ver, train = report["verification"], report["training"]
    lines = [
        f"fine-tuning: {train['steps']} steps in {train['seconds']:.1f} s, {train['fusions']} fusions",
    ]
    if ver.get("export_max_abs_diff") is not None:
        lines.append(
            f"export check: max abs diff {ver['export_max_abs_diff']:.2e} (torch vs onnxruntime,"
            f" batches {ver['export_batches']}"
            + (  # token models: also at two sequence lengths
                f", lengths {ver['sequence_lengths']})" if ver.get("sequence_lengths") else ")"
            )
        )
    line = (
        f"vs original on {ver['samples']} held-out samples: max abs diff {ver['max_abs_diff']:.3g}"
    )
    if ver.get("agreement") is not None:
        line += f", top-1 agreement {ver['agreement']:.2%}"
    if ver.get("pooled_cosine_mean") is not None:  # a base token model's last hidden state
        line += (
            f", pooled cosine mean {ver['pooled_cosine_mean']:.4f}"
            f" min {ver['pooled_cosine_min']:.4f}"
        )
    lines.append(line)
    return lines


def inspect_table(rows: list[dict[str, Any]]) -> Table:
    """The ``inspect`` table."""
    table = Table(title="Linear layers", title_justify="left")
    for col in (
        "layer",
        "out×in",
        "params",
        "∥ row pairs",
        "max |cos| rows",
        "∥ col pairs",
        "max |cos| cols",
        "effective rank",
        "MP rank",
        "MP bulk",
        "RMT-SVD size",
    ):
        # a layer name stays whole (Transformer names are long); the headers may wrap
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=col == "layer")
    for r in rows:
        table.add_row(
            r["name"],
            "×".join(map(str, r["shape"])),
            f"{r['params']:,}",
            str(r["parallel_row_pairs"]),
            f"{r['max_row_cos']:.4f}",
            str(r["parallel_col_pairs"]),
            f"{r['max_col_cos']:.4f}",
            f"{r['effective_rank']:.1f}/{r['max_rank']}",
            # the Marchenko–Pastur reading: singular values above the noise edge, the share
            # inside the bulk, and the layer's weight once split at that rank (SPEC §5), as a
            # share of its weight now
            f"{r['mp_rank']}/{r['max_rank']}",
            f"{r['mp_bulk_fraction']:.0%}",
            f"{r['mp_params'] / r['params']:.0%}",
        )
    return table


def compare_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per run of ``rankshrink compare`` (the original first)."""
    table = Table(title=title, title_justify="left")
    metric = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "agreement"
    for col in (
        "method",
        "budget",
        "params",
        "ONNX bytes",
        "size",
        "test accuracy" if metric == "accuracy" else "agreement",
        "ms, batch 1",
        "ms, batch 256",
        "seconds",
    ):
        # method names ("layer-sparsity+rmt-svd") and accuracies are never cut or wrapped; the
        # other headers wrap first
        method = col == "method"
        keep = method or col in ("test accuracy", "agreement")
        table.add_column(col, justify="left" if method else "right", no_wrap=keep)
    base = rows[0] if rows and rows[0]["method"] == "original" else None
    for r in rows:
        if "error" in r:
            table.add_row(r["method"], _budget(r), "", "", "", f"[red]{r['error']}[/red]")
            continue
        value = r.get(metric)
        if value is None:
            shown = "—"
        elif metric == "accuracy":
            shown = f"{value:.2f} %"
            if base is not None and r is not base and base.get("accuracy") is not None:
                shown += f" ({value - base['accuracy']:+.2f})"
        else:
            shown = f"{value:.2%}"
        table.add_row(
            r["method"],
            _budget(r),
            f"{r['params']:,}",
            f"{r['onnx_bytes']:,}",
            f"{r['onnx_ratio']:.3f}",
            shown,
            f"{r['latency_ms_b1']:.3f}",
            f"{r['latency_ms_b256']:.3f}",
            f"{r['seconds']:.1f}",
        )
    return table


def _budget(row: dict[str, Any]) -> str:
    return "—" if row.get("budget") is None else f"{row['budget']:g}"
