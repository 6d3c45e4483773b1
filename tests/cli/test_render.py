"""Terminal output at 100 columns: golden text, and mechanical checks that nothing is cut.

The compress output (layer table + summary) is rendered from reports of real short runs stored
under ``tests/data/`` (the sample MLP, the sample Transformer, a tiny Hugging Face BERT
classifier with its long layer names, and the MLP through layer-sparsity+rmt-svd, whose layers
are rank-k factor pairs); ``inspect`` from the rows ``inspect_model`` gave for the same models;
``compare`` from the rows of a real ``rankshrink compare`` run on the sample MLP. Each rendering
is compared with a file under ``tests/golden/`` (``RANKSHRINK_UPDATE_GOLDEN=1`` rewrites them),
and checked without the golden file: no line wider than 100 columns, no ``…``, every number of
the input whole on one line, every name whole once its wrapped lines are joined, no ``-0.00``.
"""

from __future__ import annotations

import copy
import json
import os
import re
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.cells import cell_len
from rich.console import Console

from rankshrink.cli.numfmt import num
from rankshrink.cli.render_compare import compare_table
from rankshrink.cli.render_compress import (
    layer_table,
    progress_fields,
    progress_line,
    summary_table,
    training_progress,
)
from rankshrink.cli.render_inspect import inspect_summary, inspect_table
from rankshrink.train.rare_config import StepStats

DATA = Path(__file__).parent / "data"
GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("RANKSHRINK_UPDATE_GOLDEN") == "1"
WIDTH = 100

REPORTS = ["mlp", "transformer", "hf_bert", "mlp_layer_sparsity_rmt_svd"]
INSPECTS = ["mlp", "transformer", "hf_bert"]


def _load(name: str) -> Any:
    return json.loads((DATA / name).read_text())


def _render(*renderables: Any) -> str:
    console = Console(file=StringIO(), width=WIDTH, color_system=None, highlight=False, emoji=False)
    for r in renderables:
        console.print(r)
    text: str = console.file.getvalue()  # type: ignore[attr-defined]
    # rich pads titles to the table's width; golden files keep no trailing blanks
    return "".join(line.rstrip() + "\n" for line in text.splitlines())


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with RANKSHRINK_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{name} differs from its golden text:\n{text}"


def _fits(text: str) -> None:
    """No line wider than the console, nothing cut with an ellipsis, no negative zero."""
    for line in text.splitlines():
        assert cell_len(line) <= WIDTH, f"{cell_len(line)} columns: {line!r}"
    assert "…" not in text and "..." not in text
    assert not re.search(r"-0\.0+(?!\d*[1-9])", text), text


def _whole(text: str, numbers: list[str]) -> None:
    """Each number appears on one line, not glued to other digits (so not cut or folded)."""
    for n in numbers:
        pattern = rf"(?<![\d.,]){re.escape(n)}(?![\d,]|\.\d)"
        assert re.search(pattern, text), f"{n!r} is not shown whole in:\n{text}"


def _first_column(text: str) -> list[str]:
    """The first column's cells of every table in ``text``, wrapped lines joined: a row's
    continuation lines are those whose second column is empty."""
    cells: list[str] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        parts = [p.strip() for p in line.split("│")[1:-1]]
        if parts[1] == "" and cells:  # the same row, wrapped
            cells[-1] += parts[0]
        else:
            cells.append(parts[0])
    return cells


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape))


def _report_numbers(rep: dict[str, Any]) -> list[str]:
    ver = rep["verification"]
    out = [
        f"{rep['params_before']:,}",
        f"{rep['params_after']:,}",
        f"{rep['onnx_bytes_before']:,}",
        f"{rep['onnx_bytes_after']:,}",
        f"{rep['onnx_ratio']:.3f}",
        f"{rep['param_ratio']:.3f}",
    ]
    if ver.get("accuracy_before") is not None:
        out += [f"{ver['accuracy_before']:.2f}%", f"{ver['accuracy_after']:.2f}%"]
    for lay in rep["layers"]:
        out += [_shape(lay["original_shape"]), _shape(lay["core_shape"]), f"{lay['params']:,}"]
        out += [_shape(f) for f in lay.get("factors") or [lay["weight_shape"]]]
    return out


@pytest.mark.parametrize("name", REPORTS)
def test_compress_output_fits_100_columns(name: str) -> None:
    rep = _load(f"report_{name}.json")
    text = _render(layer_table(rep), summary_table(rep))
    _golden(f"compress_{name}.txt", text)
    _fits(text)
    _whole(text, _report_numbers(rep))
    names = _first_column(text)
    assert names[: len(rep["layers"])] == [lay["name"] for lay in rep["layers"]]
    kinds = _joined_column(text, 4)  # broken over lines, but whole once joined
    assert all(lay["fold_kind"] in kinds for lay in rep["layers"])


def _joined_column(text: str, index: int) -> str:
    """Column ``index`` of the tables in ``text``, all its lines run together."""
    cells = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    return "".join(c[index].strip() for c in cells if len(c) > index)


def test_accuracy_change_that_rounds_to_zero_reads_plus_zero() -> None:
    rep = _load("report_mlp.json")
    rep["verification"]["accuracy_after"] = rep["verification"]["accuracy_before"] - 1e-9
    text = _render(summary_table(rep))
    assert "+0.00 pt" in text and "-0.00" not in text


def _bert_base(rep: dict[str, Any]) -> dict[str, Any]:
    """The tiny BERT report scaled to BERT-base sizes and names, with every kind of layer cell:
    a rank-k factor pair, a gathered output, a merged layer and a long fold kind."""
    big = copy.deepcopy(rep)
    for lay in big["layers"]:
        lay["name"] = lay["name"].replace("layers.1.", "layers.11.")
        for key in ("original_shape", "core_shape", "weight_shape"):
            lay[key] = [d * 24 if d > 3 else d for d in lay[key]]
        lay["feature_width"] *= 24 if lay["feature_width"] > 3 else 1
        lay["params"] *= 576
        lay["original_params"] *= 576
    first = big["layers"][4]  # intermediate.dense, 1536×768 → rank 384
    first.update(
        rank=384,
        factors=[[384, 768], [1536, 384]],
        fold_kind="dense-feature+factored",
        params=384 * (768 + 1536),
    )
    big["layers"][5]["fold_kind"] = "indexed(segment-in+gather-out)"
    big["layers"].append({**big["layers"][-1], "name": "3+5", "fold_kind": "merged"})
    big["params_before"], big["params_after"] = 109_482_240, 54_741_120
    big["onnx_bytes_before"], big["onnx_bytes_after"] = 437_956_789, 219_012_345
    return big


def test_bert_base_sized_report_fits_without_golden_text() -> None:
    rep = _bert_base(_load("report_hf_bert.json"))
    text = _render(layer_table(rep), summary_table(rep))
    _fits(text)
    _whole(text, _report_numbers(rep))
    assert _first_column(text)[: len(rep["layers"])] == [lay["name"] for lay in rep["layers"]]
    assert "indexed(segment-in+gather-out)" in _joined_column(text, 4)
    assert f"→ {rep['layers'][5]['feature_width']}" in text  # an indexed layer's gathered width


@pytest.mark.parametrize("name", INSPECTS)
def test_inspect_output_fits_100_columns(name: str) -> None:
    rows = _load(f"inspect_{name}.json")
    text = _render(inspect_table(rows, 1e-4), inspect_summary(rows))
    _golden(f"inspect_{name}.txt", text)
    _fits(text)
    numbers = [
        str(n)
        for r in rows
        for n in (
            _shape(r["shape"]),
            f"{r['params']:,}",
            f"{r['max_row_cos']:.4f}",
            f"{r['max_col_cos']:.4f}",
            f"{r['effective_rank']:.1f}",
        )
    ]
    _whole(text, numbers)
    assert _first_column(text) == [r["name"] for r in rows]
    # the summary line: one line, last, with the totals of the rows
    last = text.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"total: {len(rows)} layers, {sum(r['params'] for r in rows):,} params")
    assert f"{sum(r['mp_params'] for r in rows):,}" in last


def test_inspect_summary_counts_near_parallel_pairs() -> None:
    rows = _load("inspect_mlp.json")
    rows[1]["parallel_row_pairs"], rows[2]["parallel_col_pairs"] = 3, 1200
    assert "1,203 near-parallel pairs" in inspect_summary(rows)


def _compare_rows() -> list[dict[str, Any]]:
    return _load("compare_mlp.json")["rows"]


def test_compare_table_keeps_agreement_and_fits_100_columns() -> None:
    rows = _compare_rows()
    text = _render(compare_table(rows, "mlp_digits.pt: 60 fine-tuning steps per run, seed 0"))
    _golden("compare_mlp.txt", text)
    _fits(text)
    assert "agreement" in text
    numbers = []
    for r in rows:
        numbers += [f"{r['onnx_bytes']:,}", f"{r['accuracy']:.2f}%", f"{r['agreement']:.2%}"]
        numbers += [f"{r['latency_ms_b1']:.3f}", f"{r['latency_ms_b256']:.3f}"]
    _whole(text, numbers)
    labels = [r["method"] + ("" if r["budget"] is None else f" ({r['budget']:g})") for r in rows]
    assert _first_column(text) == labels


def test_compare_table_without_labels_and_with_a_failed_run() -> None:
    rows = copy.deepcopy(_compare_rows())
    for r in rows:
        r["accuracy"] = None
    rows.append({"method": "layer-sparsity", "budget": None, "error": "training diverged"})
    rows[3].update(passed=False, failures=["gate failed: not smaller: 9 → 10 bytes"])
    text = _render(compare_table(rows, "t"))
    _fits(text)
    assert "test accuracy" not in text and "agreement" in text
    assert "layer-sparsity: training diverged" in text and "failed" in text
    label = rows[3]["method"] + ("" if rows[3]["budget"] is None else f" ({rows[3]['budget']:g})")
    assert f"{label} did not pass verification: gate failed: not smaller: 9 → 10 bytes" in text


def test_progress_bar_shows_the_summary_s_size_number_and_fits() -> None:
    stats = StepStats(
        step=9999,
        steps=10000,
        loss=123.456789,
        task_loss=0.0,
        rare_loss=0.0,
        core_params=109_248,
        size_ratio=0.5931,
        fusions=12345,
        tau_cos=1e-4,
    )
    console = Console(file=StringIO(), width=WIDTH, color_system=None)
    bar = training_progress(console)
    task = bar.add_task("fine-tuning", total=stats.steps, loss=0.0, size=1.0, fusions=0)
    bar.update(task, completed=stats.step, **progress_fields(stats))
    text = _render(bar.make_tasks_table(bar.tasks))
    _fits(text)
    for shown in (text, progress_line(stats)):
        # the summary's ONNX bytes ratio is printed as f"{ratio:.3f}×"; no parameter count
        assert "ONNX size ≈0.593×" in shown and "109,248" not in shown and "params" not in shown
        _whole(shown, ["9999/10000", "123.4568", "12345"])


@pytest.mark.parametrize(
    ("value", "spec", "want"),
    [
        (-0.001, ".2f", "0.00"),
        (-0.001, "+.2f", "+0.00"),
        (0.0, "+.2f", "+0.00"),
        (-0.0, ".3f", "0.000"),
        (-0.00001, ".1%", "0.0%"),
        (-1e-9, ".2e", "-1.00e-09"),
        (-0.0, ".2e", "0.00e+00"),
        (-0.28, "+.2f", "-0.28"),
        (-0.005, ".2f", "-0.01"),
        (float("nan"), ".2f", "nan"),
        (float("-inf"), ".2f", "-inf"),
    ],
)
def test_num_never_writes_negative_zero(value: float, spec: str, want: str) -> None:
    assert num(value, spec) == want


@given(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
    st.sampled_from([".2f", "+.2f", ".1%", "+.2%", ".3f", ".4f"]),
)
def test_num_keeps_the_value_and_drops_only_the_sign_of_zero(value: float, spec: str) -> None:
    text = num(value, spec)
    plain = format(value, spec)
    number = float(text.rstrip("%"))
    assert number == float(plain.rstrip("%"))  # the same value as plain formatting
    assert not (text.startswith("-") and number == 0)
    if "+" in spec:  # a sign always, "+" for zero
        assert (text[0] == "+") == (number >= 0) and text[0] in "+-"
    else:
        assert text[0] != "+"


# ---------------------------------------------------------------------------------------------
# The compare plot's accuracy axis.


def test_compare_plot_axis_starts_well_below_the_original() -> None:
    pytest.importorskip("matplotlib")
    from rankshrink.cli.plots import compare_figure

    rows = _compare_rows()
    original = rows[0]["accuracy"]
    fig = compare_figure(rows, "t")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert low <= original - 1, (low, original)
    assert low <= min(r["accuracy"] for r in rows)
    assert high >= max(r["accuracy"] for r in rows)
    # the original as a line, one held-out sample as a band, both labelled
    labels = ax.get_legend_handles_labels()[1]
    one = 100 / rows[0]["samples"]
    assert any(f"({one:.2f} pt)" in label for label in labels), labels
    assert any(label.startswith("original (") for label in labels), labels
    dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_ydata()[0] for line in dashed] == [pytest.approx(original)]


def test_accuracy_limits() -> None:
    from rankshrink.cli.plots import accuracy_limits

    # close results: the axis still spans 5 points below the original
    low, high = accuracy_limits([97.5, 97.78, 98.05], 97.78, 360)
    assert low <= 97.78 - 5 and 98.05 < high <= 98.05 + 1
    # a collapsed run stays on the axis
    low, _ = accuracy_limits([21.39, 97.5], 97.78, 360)
    assert low < 21.39
    # never below 0, and an empty plot still has an axis
    assert accuracy_limits([0.0], 3.0)[0] == 0.0
    assert accuracy_limits([], None) == (0.0, 100.5)


def test_inspect_command_off_a_terminal_is_100_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rankshrink.cli.app import app
    from rankshrink.cli.runner import width as _width

    monkeypatch.setattr("sys.stdout", StringIO())  # a pipe or a CI log: not a terminal
    assert _width() == WIDTH
    monkeypatch.undo()
    sample = Path(__file__).parents[2] / "sample_models" / "transformer_digits.pt"
    result = CliRunner().invoke(app, ["inspect", str(sample)])
    assert result.exit_code == 0, result.output
    widest = max(cell_len(line.rstrip()) for line in result.stdout.splitlines())
    assert widest <= WIDTH and "…" not in result.stdout
    # rich lays a table out to the console's width: at 100 the names keep one line each
    assert "layers.1.attn.out" in result.stdout
    assert result.stdout.rstrip().splitlines()[-1].startswith("total: 14 layers, 67,658 params")
