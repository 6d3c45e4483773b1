"""onnxruntime latency of the compressed against the original ONNX, next to the parameter ratio.

    PYTHONPATH=. python benchmarks/bench_latency.py [--quick] [--rounds 10]
    PYTHONPATH=. python benchmarks/bench_latency.py --wide [--steps 300]

Default: compresses ``sample_models/mlp_digits.pt`` on ``sample_models/digits.npz`` with
``rankshrink.pipeline.compress.compress`` and its defaults (exits 1 when the sample files are missing).
``--wide``: a random-init 784-2048-2048-10 MLP on random data (labels: the model's own argmax),
compressed with ``--steps`` fine-tuning steps, where per-call overhead matters less.

The original is exported with ``export_onnx(original, example, path, ExportConfig())``, the same
exporter the pipeline uses. Both files run in ``rankshrink.onnx.session.session(path, threads=1)``; each
batch size (1 and 256) is timed in rounds that alternate original/compressed (order flipped every
round), and the medians of all single-call times are compared, so drift hits both equally.
Printed: parameters and ONNX bytes before/after, latency per batch and its ratio, and
latency ratio / parameter ratio at batch 256 (the issue asks |that − 1| ≤ 0.15). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from rankshrink.io.checkpoint import load_model
from rankshrink.io.data import load_data
from rankshrink.models.arch import make_checkpoint
from rankshrink.onnx.export import ExportConfig, export_onnx
from rankshrink.onnx.session import session
from rankshrink.pipeline.compress import compress
from rankshrink.pipeline.config import CompressConfig
from rankshrink.train.rare_config import TrainConfig

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def wide_inputs(tmp: Path, n: int = 4096) -> tuple[Path, Path]:
    """Write a random 784-2048-2048-10 checkpoint and random data labelled by the model itself."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    ).eval()
    x = torch.randn(n, 784, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    torch.save(make_checkpoint(model), tmp / "wide.pt")
    np.savez(tmp / "wide.npz", x=x.numpy(), y=y.numpy())
    return tmp / "wide.pt", tmp / "wide.npz"


def time_rounds(
    sessions: dict[str, ort.InferenceSession], x: np.ndarray, runs: int, rounds: int
) -> dict[str, list[float]]:
    """Single-call times (ms) per session, ``runs`` calls each, split into alternating rounds."""
    feeds = {name: {s.get_inputs()[0].name: x} for name, s in sessions.items()}
    for name, sess in sessions.items():  # warm-up
        for _ in range(max(10, runs // 20)):
            sess.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    per_round = max(1, runs // rounds)
    names = list(sessions)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            sess, feed = sessions[name], feeds[name]
            for _ in range(per_round):
                start = time.perf_counter()
                sess.run(None, feed)
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def batch_of(x: torch.Tensor, batch: int) -> np.ndarray:
    reps = -(-batch // len(x))
    return x.repeat(reps, 1)[:batch].numpy().astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wide", action="store_true", help="random 784-2048-2048-10 MLP instead")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps for --wide")
    parser.add_argument("--runs1", type=int, default=2000, help="timed calls at batch 1")
    parser.add_argument("--runs256", type=int, default=500, help="timed calls at batch 256")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds")
    parser.add_argument("--quick", action="store_true", help="fewer calls (and --wide steps)")
    args = parser.parse_args()
    if args.quick:
        args.runs1, args.runs256, args.steps = 400, 100, min(args.steps, 100)
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory(prefix="bench-latency-") as tmpdir:
        tmp = Path(tmpdir)
        if args.wide:
            model_path, data_path = wide_inputs(tmp)
            cfg = CompressConfig(model=model_path, data=data_path, train=TrainConfig(args.steps))
            label = f"wide 784-2048-2048-10 (random init, random data, {args.steps} steps)"
        else:
            model_path, data_path = SAMPLES / "mlp_digits.pt", SAMPLES / "digits.npz"
            missing = [str(p) for p in (model_path, data_path) if not p.is_file()]
            if missing:
                print(f"sample files missing: {', '.join(missing)}", file=sys.stderr)
                print(
                    "run `python sample_models/make_samples.py` first, or use --wide",
                    file=sys.stderr,
                )
                return 1
            cfg = CompressConfig(model=model_path, data=data_path)
            label = "sample 64-256-256-256-10 (mlp_digits.pt, compress() defaults)"

        start = time.perf_counter()
        result = compress(cfg)
        seconds = time.perf_counter() - start
        rep = result.report
        paths = {"original": tmp / "original.onnx", "compressed": tmp / "compressed.onnx"}
        paths["compressed"].write_bytes(result.onnx)
        data = load_data(data_path, seed=cfg.train.seed)
        original = load_model(model_path).model
        export_onnx(original, data.x_train[:4], paths["original"], ExportConfig())
        sessions = {name: session(path, threads=1) for name, path in paths.items()}

        p_before, p_after = rep["params_before"], rep["params_after"]
        param_ratio = p_after / p_before
        b_before, b_after = paths["original"].stat().st_size, paths["compressed"].stat().st_size
        print(f"model: {label}")
        print(
            f"compress(): {seconds:.1f} s, {rep['training']['fusions']} fusions, accuracy"
            f" {rep['verification']['accuracy_before']:.2f} -> "
            f"{rep['verification']['accuracy_after']:.2f} %"
        )
        print(
            "layers: "
            + ", ".join(f"{la['weight_shape']} {la['fold_kind']}" for la in rep["layers"])
        )
        print(f"params      {p_before:>12,} -> {p_after:>12,}   ratio {param_ratio:.3f}")
        print(f"ONNX bytes  {b_before:>12,} -> {b_after:>12,}   ratio {b_after / b_before:.3f}")
        ver = rep["verification"]
        print(
            f"verification: top-1 agreement {ver['agreement']:.4f}, export max abs diff"
            f" {ver['export_max_abs_diff']:.2g} (compressed torch vs its ONNX)"
        )
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        print(
            f"onnxruntime {ort.__version__}, 1 intra-op thread, {args.rounds} rounds, load {load}"
        )
        print()
        print("| batch | calls | original ms | compressed ms | latency ratio | lat/param |")
        print("| ----- | ----- | ----------- | ------------- | ------------- | --------- |")
        ratios: dict[int, float] = {}
        for batch, runs in ((1, args.runs1), (256, args.runs256)):
            times = time_rounds(sessions, batch_of(data.x_test, batch), runs, args.rounds)
            orig, comp = (statistics.median(times[n]) for n in ("original", "compressed"))
            ratios[batch] = comp / orig
            print(
                f"| {batch:>5} | {len(times['original']):>5} | {orig:>11.4f} | {comp:>13.4f} |"
                f" {comp / orig:>13.3f} | {comp / orig / param_ratio:>9.3f} |"
            )
        dev = ratios[256] / param_ratio - 1
        print()
        print(
            f"batch 256: latency ratio {ratios[256]:.3f} / parameter ratio {param_ratio:.3f}"
            f" = {ratios[256] / param_ratio:.3f}; |x - 1| = {abs(dev):.3f}"
            f" -> within 15%: {'yes' if abs(dev) <= 0.15 else 'NO'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
