"""The (adapter × method) matrix as a table: each cell's ONNX ratio, verification and export diff.

    PYTHONPATH=. python benchmarks/matrix.py

Runs ``tests/pipeline/test_matrix.py`` (tiny random models, 30 steps, quality gates opened, every
fidelity check on; see that file) with ``RANKSHRINK_MATRIX_OUT`` set, then prints the cells it
recorded. Exits with pytest's status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ("sequential", "module", "residual", "transformer", "hf")


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "matrix.jsonl")
        env = {**os.environ, "RANKSHRINK_MATRIX_OUT": str(out)}
        test = ROOT / "tests" / "pipeline" / "test_matrix.py"
        status = subprocess.run([sys.executable, "-m", "pytest", "-q", str(test)], env=env).returncode
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    cells = {(r["adapter"], r["method"]): r for r in rows}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print("| adapter (family) | " + " | ".join(methods) + " |")
    print("| --- |" + " ---: |" * len(methods))
    for adapter in ADAPTERS:
        found = [cells[(adapter, m)] for m in methods if (adapter, m) in cells]
        family = next((c["family"] for c in found if "family" in c), "")
        shown = []
        for m in methods:
            c = cells.get((adapter, m))
            if c is None:
                shown.append("not run")
            elif c.get("result") == "refused":
                shown.append("refused (exit 2)")
            else:
                mark = "✓" if c["passed"] else "✗"
                shown.append(f"{c['onnx_ratio']:.3f} {mark} ({c['export_max_abs_diff']:.0e})")
        print(f"| {adapter} ({family}) | " + " | ".join(shown) + " |")
    return status


if __name__ == "__main__":
    sys.exit(main())
