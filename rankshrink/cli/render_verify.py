"""Verification as the terminal shows it: ``compress``'s verification lines and ``verify``'s table.

Both read a verification block of the report (:func:`rankshrink.pipeline.report.verification_dict`):
the comparison with the original, each number named by what the outputs are, and one entry per
gate with its threshold and where that came from.
"""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from rankshrink.onnx.gates import Gate


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


#: What ``max_abs_diff`` measures, per task kind (rankshrink.onnx.task.KINDS).
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
