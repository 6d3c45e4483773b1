"""Terminal presentation with rich: the progress bar, the per-layer table and the summary, and
the ``inspect`` and ``compare`` tables.

Every table fits :data:`WIDTH` columns without cutting a number or a shape: headers are short
and break over two lines, columns that would only repeat another or the JSON report are left
to the JSON, and the one column of names (layers, methods) takes the room the numbers leave and
breaks after ``.``, ``+``, ``(`` or ``-`` (:func:`_grid`). Nothing is ever cut with ``…``: a
console narrower than that folds cells onto more lines instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from rankshrink.cli.numfmt import num
from rankshrink.onnx.gates import Gate
from rankshrink.train.rare_loop import StepStats

#: The width every table is laid out for (the CLI's console width off a terminal, too).
WIDTH = 100

#: A name column is never made narrower than this; below it, rich folds it further.
_MIN_NAME = 12

#: Characters a name may break after (``layers.0.attn.q``, ``kept+factored``, ``indexed(…)``).
_BREAKS = ".+(-"


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


@dataclass(frozen=True)
class _Col:
    """A column of :func:`_grid`: its header (``\\n`` breaks it) and whether it holds text."""

    header: str
    text: bool = False


def _grid(
    title: str,
    cols: Sequence[_Col],
    rows: Sequence[Sequence[str | Text]],
    *,
    names: int = 0,
    caption: str | None = None,
    width: int = WIDTH,
) -> Table:
    """A table of already formatted cells that fits ``width`` columns.

    Column ``names`` gets the room the other columns leave (at least :data:`_MIN_NAME`) and its
    cells break after :data:`_BREAKS`; every other cell keeps its natural width. Numbers are
    right-aligned. No column cuts with an ellipsis: on a narrower console rich folds cells.
    """
    cells = [[c if isinstance(c, Text) else Text(c) for c in row] for row in rows]
    natural = [
        max([_cell_width(Text(col.header))] + [_cell_width(row[i]) for row in cells])
        for i, col in enumerate(cols)
    ]
    border = 3 * len(cols) + 1  # "│ " before each cell, " │" after the last
    room = width - border - sum(w for i, w in enumerate(natural) if i != names)
    name_width = max(_MIN_NAME, room)
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, col in enumerate(cols):
        header = _break(col.header, name_width) if i == names else col.header
        table.add_column(header, justify="left" if col.text else "right", overflow="fold")
    for row in cells:
        row[names] = Text(_break(row[names].plain, name_width), style=row[names].style)
        table.add_row(*row)
    return table


def _cell_width(text: Text) -> int:
    return max((line.cell_len for line in text.split("\n")), default=0)


def _break(name: str, width: int) -> str:
    """``name`` in lines of at most ``width`` cells, broken after :data:`_BREAKS` where possible
    (``encoder.layers.11.`` / ``attention.output.dense``), folded only where a piece is longer."""
    pieces, piece = [], ""
    for ch in name:
        piece += ch
        if ch in _BREAKS:
            pieces.append(piece)
            piece = ""
    pieces += [piece] if piece else []
    lines = [""]
    for p in pieces:
        if len(lines[-1]) + len(p) <= width:
            lines[-1] += p
            continue
        while len(p) > width:  # a piece longer than a line: fold it
            lines.append(p[:width])
            p = p[width:]
        lines.append(p)
    return "\n".join(line for line in lines if line)


def _shape(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape))


def layer_table(report: dict[str, Any]) -> Table:
    """One row per Linear: original shape, W' shape, the exported weight(s), fold kind, and the
    parameters it keeps. The feature width, and everything else per layer, is in the report.

    For a Transformer the caption lists each block's per-head query/key and value widths.
    """
    cols = [
        _Col("layer", text=True),
        _Col("original\n(out×in)"),
        _Col("W'\n(m'×n')"),
        _Col("exported\n(out×in)"),
        _Col("fold kind", text=True),
        _Col("params"),
        _Col("of\noriginal"),
    ]
    rows = []
    for lay in report["layers"]:
        core = _shape(lay["core_shape"])
        if lay.get("rank") is not None and lay["fold_kind"].split("+")[-1] != "kept":  # (rmt-)svd
            core += f"\nrank {lay['rank']}"
        exported = _shape(lay["weight_shape"])
        if lay.get("factors"):  # two MatMuls in the ONNX: B (down), then A (up)
            exported = " ·\n".join(_shape(f) for f in lay["factors"])
        elif "gather-out" in lay["fold_kind"]:  # the rows are gathered out to the layer's width
            exported += f"\n→ {lay['feature_width']}"
        rows.append(
            [
                lay["name"],
                _shape(lay["original_shape"]),
                core,
                exported,
                _break(lay["fold_kind"], 14),
                f"{lay['params']:,}",
                f"{lay['params'] / lay['original_params']:.1%}",
            ]
        )
    return _grid("layers", cols, rows, caption=head_caption(report))


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
    cols = [_Col("", text=True), _Col("original"), _Col("compressed"), _Col("change")]
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
    return _grid("summary", cols, rows)


def verification_lines(report: dict[str, Any]) -> list[str]:
    """Lines on what was verified: fine-tuning, the export check, the comparison with the
    original (its max diff named by what the outputs are), then one line per gate."""
    ver, train = report["verification"], report["training"]
    lines = [
        f"fine-tuning: {train['steps']} steps in {train['seconds']:.1f} s, {train['fusions']} fusions",
    ]
    if ver.get("export_max_abs_diff") is not None:
        lines.append(
            f"export check: max |diff| {ver['export_max_abs_diff']:.2e} (torch vs onnxruntime,"
            f" batches {_joined(ver['export_batches'])}"
            + (  # token models: also at two sequence lengths
                f", lengths {_joined(ver['sequence_lengths'])})"
                if ver.get("sequence_lengths")
                else ")"
            )
        )
    # the summary table above holds the test accuracy
    metrics = [f"{name} {value}" for name, value in _metrics(ver) if name != "test accuracy"]
    lines.append(f"vs original on {ver['samples']} held-out samples: {', '.join(metrics)}")
    for g in ver.get("gates", []):
        if g["passed"] is None:
            lines.append(f"gate not run: {g['name']} ({escape(g['note'])})")
        else:
            lines.append(f"gate {_result(g)}: {escape(Gate(**g).message())}")
    return lines


#: What ``max_abs_diff`` measures, per task kind (rankshrink.onnx.gates.KINDS).
_DIFF_LABEL = {
    "classifier": "max |logit diff|",
    "binary": "max |Δp|",
    "hidden": "max |hidden diff|",
    "regression": "max |output diff|",
}


def _metrics(ver: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, value) of the comparison with the original, each number with its meaning."""
    task = ver.get("task", "classifier")
    rows = [(_DIFF_LABEL.get(task, "max |diff|"), f"{ver['max_abs_diff']:.3g}")]
    if ver.get("accuracy_before") is not None:
        rows.append(
            ("test accuracy", f"{ver['accuracy_before']:.2f}% → {ver['accuracy_after']:.2f}%")
        )
    if ver.get("agreement") is not None:
        name = "decision agreement" if task == "binary" else "top-1 agreement"
        rows.append((name, f"{ver['agreement']:.2%}"))
    if ver.get("mean_prob_diff") is not None:
        rows.append(("mean |Δp|", f"{ver['mean_prob_diff']:.4f}"))
    if ver.get("pooled_cosine_mean") is not None:  # a base token model's last hidden state
        rows.append(("pooled cosine mean", f"{ver['pooled_cosine_mean']:.4f}"))
        rows.append(("pooled cosine min", f"{ver['pooled_cosine_min']:.4f}"))
    if ver.get("rel_error") is not None:
        rows.append(("relative error", f"{ver['rel_error']:.4f}"))
    return rows


def verification_table(ver: dict[str, Any]) -> Table:
    """``verify``'s result: metric | value | gate | result, from a verification block
    (:func:`rankshrink.pipeline.report.verification_dict`)."""
    table = Table(title="verification", title_justify="left")
    table.add_column("metric", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("gate")
    table.add_column("result")
    table.add_row("held-out samples", f"{ver['samples']:,}", "", "")
    if ver.get("sequence_lengths"):  # token models: checked at two lengths and batch sizes
        table.add_row("sequence lengths", _joined(ver["sequence_lengths"]), "", "")
        table.add_row("max |batch diff|", f"{ver['batch_max_abs_diff']:.2e}", "", "")
        table.add_row("max |padding diff|", f"{ver['padding_max_abs_diff']:.2e}", "", "")
    gated = {g["name"] for g in ver.get("gates", [])}
    gated |= {"pooled cosine mean"} if "pooled cosine" in gated else set()
    for name, value in _metrics(ver):
        if name not in gated:  # a gated metric gets its row below, with the gate
            table.add_row(name, value, "", "")
    for g in ver.get("gates", []):
        value = "—" if g["value"] is None else _gate_value(g, g["value"])
        origin = "default" if g["source"] == "default" else g["flag"]
        bound = {"<=": "≤", ">=": "≥", "<": "<"}[g["comparison"]]
        gate = f"{bound} {_gate_value(g, g['threshold'], threshold=True)} ({origin})"
        table.add_row(g["name"], value, gate, _result(g))
    return table


def verdict_line(ver: dict[str, Any]) -> str:
    """``verification passed``, or ``FAILED: <what> by how much`` for every failure."""
    if ver["passed"]:
        return "verification [green]passed[/green]"
    reasons = [f.removeprefix("gate failed: ") for f in ver["failures"]]
    return "[red]FAILED[/red]: " + escape("; ".join(reasons))


def _gate_value(g: dict[str, Any], value: float, threshold: bool = False) -> str:
    """A gate's number with its unit: points, percent of samples, bytes, or a plain ratio."""
    if g["unit"] == " bytes":
        return f"{value:,.0f} bytes"
    if g["unit"] == " points":
        return f"{value:g} pt" if threshold else f"{_no_negative_zero(value, 2)} pt"
    if "agreement" in g["name"]:
        return f"{value:.0%}" if threshold and value * 100 == round(value * 100) else f"{value:.2%}"
    return f"{value:g}" if threshold else f"{value:.4f}"


def _no_negative_zero(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text


def _result(g: dict[str, Any]) -> str:
    if g["passed"] is None:
        return f"not run ({escape(g['note'])})" if g.get("note") else "not run"
    return "[green]passed[/green]" if g["passed"] else "[red]FAILED[/red]"


def _joined(values: list[int]) -> str:
    return ", ".join(map(str, values))


def inspect_table(rows: list[dict[str, Any]], tau_cos: float | None = None) -> Table:
    """The ``inspect`` table: per Linear, near-parallel pairs (``1 − |cos| < tau_cos``, named in
    the title) and the most parallel pair among rows of ``[W|b]`` / columns, the effective
    rank, the Marchenko–Pastur rank and the share of its weight an RMT-SVD split keeps. The
    maximum rank is the shape's smaller side; it, and the bulk fraction, are in the JSON."""
    cols = [
        _Col("layer", text=True),
        _Col("out×in"),
        _Col("params"),
        _Col("∥ pairs\nrow/col"),
        _Col("max |cos|\nrow/col"),
        _Col("eff.\nrank"),
        _Col("MP\nrank"),
        _Col("RMT-SVD\nsize"),
    ]
    cells = [
        [
            r["name"],
            _shape(r["shape"]),
            f"{r['params']:,}",
            f"{r['parallel_row_pairs']}/{r['parallel_col_pairs']}",
            f"{r['max_row_cos']:.4f}/{r['max_col_cos']:.4f}",
            f"{r['effective_rank']:.1f}",
            # the Marchenko–Pastur reading: singular values above the noise edge, and the
            # layer's weight once split at that rank (SPEC §5), as a share of its weight now
            str(r["mp_rank"]),
            f"{r['mp_params'] / r['params']:.0%}",
        ]
        for r in rows
    ]
    title = "Linear layers" + ("" if tau_cos is None else f" (∥: 1 − |cos| < {tau_cos:g})")
    return _grid(title, cols, cells)


def inspect_summary(rows: list[dict[str, Any]]) -> str:
    """The line under the ``inspect`` table: layers, parameters, near-parallel pairs, and what
    an RMT-SVD split at the Marchenko–Pastur rank would keep of the Linear layers' parameters
    (an estimate from the spectra alone, before any fine-tuning)."""
    params = sum(r["params"] for r in rows)
    kept = sum(r["mp_params"] for r in rows)
    pairs = sum(r["parallel_row_pairs"] + r["parallel_col_pairs"] for r in rows)
    share = f" ({kept / params:.0%})" if params else ""
    return (
        f"total: {len(rows)} layers, {params:,} params, {pairs:,} near-parallel pairs;"
        f" RMT-SVD would keep {kept:,}{share}"
    )


def compare_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per run of ``rankshrink compare`` (the original first): its ONNX size, test
    accuracy (and the change from the original in points) and top-1 agreement with the
    original, onnxruntime latency and compression time. Parameter counts are in the JSON; a
    run that failed says why in the caption."""
    has_accuracy = any(r.get("accuracy") is not None for r in rows)
    cols = [
        _Col("method\n(budget)", text=True),
        _Col("ONNX\nbytes"),
        _Col("size"),
        *([_Col("test accuracy\n(change, pt)")] if has_accuracy else []),
        _Col("top-1\nagreement"),
        _Col("ms,\nbatch 1"),
        _Col("ms,\nbatch 256"),
        _Col("seconds"),
    ]
    base = rows[0] if rows and rows[0]["method"] == "original" else None
    cells: list[list[str | Text]] = []
    errors: list[str] = []
    for r in rows:
        label = r["method"] + ("" if r.get("budget") is None else f" ({r['budget']:g})")
        if "error" in r:
            errors.append(f"{label}: {r['error']}")
            failed = Text("failed", style="red")  # under the first quality column
            cells.append([label, "", "", failed, *([""] if has_accuracy else []), "", "", ""])
            continue
        accuracy = []
        if has_accuracy:
            shown = "—" if r.get("accuracy") is None else f"{r['accuracy']:.2f}%"
            if r is not base and base is not None and None not in (r["accuracy"], base["accuracy"]):
                shown += f" ({num(r['accuracy'] - base['accuracy'], '+.2f')})"
            accuracy = [shown]
        cells.append(
            [
                label,
                f"{r['onnx_bytes']:,}",
                f"{r['onnx_ratio']:.3f}×",
                *accuracy,
                "—" if r.get("agreement") is None else f"{r['agreement']:.2%}",
                f"{r['latency_ms_b1']:.3f}",
                f"{r['latency_ms_b256']:.3f}",
                f"{r['seconds']:.1f}",
            ]
        )
    caption = "\n".join(escape(e) for e in errors) or None
    return _grid(escape(title), cols, cells, caption=caption)  # the title names a user's file
