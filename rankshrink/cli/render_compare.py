"""``compare``'s output: one row per method run side by side with the original."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from rankshrink.cli.grid import Col, grid
from rankshrink.cli.numfmt import num


def compare_table(rows: list[dict[str, Any]], title: str) -> Table:
    """One row per run of ``rankshrink compare`` (the original first): its ONNX size, test
    accuracy (and the change from the original in points) and top-1 agreement with the
    original (a hidden-state model: the pooled cosine), onnxruntime latency and compression time. Parameter counts are in the JSON; a
    run that failed, or whose file did not pass verification, says why in the caption."""
    has_accuracy = any(r.get("accuracy") is not None for r in rows)
    # a model whose output is a hidden state is compared by the cosine of its pooled states
    cosine = any(r.get("pooled_cosine") is not None for r in rows)
    cols = [
        Col("method\n(budget)", text=True),
        Col("ONNX\nbytes"),
        Col("size"),
        *([Col("test accuracy\n(change, pt)")] if has_accuracy else []),
        Col("pooled\ncosine" if cosine else "top-1\nagreement"),
        Col("ms,\nbatch 1"),
        Col("ms,\nbatch 256"),
        Col("seconds"),
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
        if not r.get("passed", True):  # compress would have refused to write this file
            why = "; ".join(r.get("failures") or []) or "see the JSON"
            errors.append(f"{label} did not pass verification: {why}")
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
                _similarity(r, cosine),
                f"{r['latency_ms_b1']:.3f}",
                f"{r['latency_ms_b256']:.3f}",
                f"{r['seconds']:.1f}",
            ]
        )
    caption = "\n".join(escape(e) for e in errors) or None
    return grid(escape(title), cols, cells, caption=caption)  # the title names a user's file


def _similarity(row: dict[str, Any], cosine: bool) -> str:
    value = row.get("pooled_cosine" if cosine else "agreement")
    if value is None:
        return "—"
    return f"{value:.4f}" if cosine else f"{value:.2%}"
