"""The other seed methods on the sample models, side by side, in torch only.

The quick variant of ``rankshrink compare`` (no ONNX export or verification; several seeds per row).

    PYTHONPATH=. python benchmarks/methods_smoke.py [--steps 500] [--seeds 0] [--threads 1]
        [--models mlp,transformer] [--onnx]

For each sample model (``sample_models/mlp_digits.pt``, ``transformer_digits.pt``) on the recorded
digits split: truncated SVD at 0.3/0.5/0.7 of the Linear layers' parameters, RMT-SVD (bare MP
edge; and with a rank floor of 8), and — on the MLP only — layer sparsity. Every low-rank method
is followed by the same plain fine-tuning (Adam lr 1e-3, batch 128, cross-entropy + distillation
from the original, cosine decay) for ``--steps`` steps; layer sparsity spends ``--steps`` on the
penalized phase and ``--steps`` more on the refit. Accuracy is on the held-out test split, which
no phase trains on. ``--onnx`` also exports each result and prints its file size. Prints a table;
asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from rankshrink.io.checkpoint import load_model
from rankshrink.io.data import Dataset, load_data
from rankshrink.methods.layer_sparsity import LayerSparsityConfig
from rankshrink.methods.lowrank_layers import LowRankConfig, low_rank
from rankshrink.models.arch import count_params
from rankshrink.train.finetune import fine_tune_plain
from rankshrink.train.sparsity import layer_sparsity

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MODELS = {"mlp": "mlp_digits.pt", "transformer": "transformer_digits.pt"}


def accuracy(model: nn.Module, data: Dataset) -> float:
    with torch.no_grad():
        return 100.0 * float((model.eval()(data.x_test).argmax(1) == data.y_test).float().mean())


def onnx_bytes(model: nn.Module, data: Dataset) -> int:
    from rankshrink.onnx.export import ExportConfig, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        return export_onnx(model.eval(), data.x_test[:2], Path(tmp) / "m.onnx", ExportConfig())


def low_rank_run(cfg: LowRankConfig, steps: int) -> Callable:
    def go(model, data, teacher, seed):
        out, report = low_rank(model, cfg)
        mid = accuracy(out, data)
        fine_tune_plain(out, data.x_train, data.y_train, teacher, steps, seed=seed, cosine=True)
        ranks = ",".join(str(e.rank) if e.kind != "kept" else "-" for e in report)
        return out, mid, f"ranks {ranks}"

    return go


def layer_sparsity_run(steps: int) -> Callable:
    def go(model, data, teacher, seed):
        cfg = LayerSparsityConfig(lam=0.1, steps=steps, refit_steps=steps, seed=seed)
        out, report = layer_sparsity(model, data.x_train, data.y_train, teacher, cfg)
        merged = "; ".join(
            "+".join(m.layers) + f"→{m.shape[0]}×{m.shape[1]}" for m in report.merges
        )
        return out, float("nan"), f"identity {report.identity}, merged {merged or 'none'}"

    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="mlp,transformer")
    parser.add_argument("--onnx", action="store_true", help="also export and size each result")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_data(SAMPLES / "digits.npz")

    for key in args.models.split(","):
        model = load_model(SAMPLES / MODELS[key]).model
        with torch.no_grad():
            teacher = model(data.x_train)
        base_acc, base_params = accuracy(model, data), count_params(model)
        base_bytes = f", {onnx_bytes(model, data):,} ONNX bytes" if args.onnx else ""
        print(
            f"\n{MODELS[key]}: {base_params:,} params, test accuracy {base_acc:.2f} %{base_bytes}"
        )
        runs: list[tuple[str, Callable]] = [
            (f"svd budget {b}", low_rank_run(LowRankConfig("svd", budget=b), args.steps))
            for b in (0.3, 0.5, 0.7)
        ]
        runs += [
            ("rmt-svd", low_rank_run(LowRankConfig("rmt-svd"), args.steps)),
            ("rmt-svd floor 8", low_rank_run(LowRankConfig("rmt-svd", min_rank=8), args.steps)),
        ]
        if key == "mlp":
            runs.append(("layer-sparsity λ=0.1", layer_sparsity_run(args.steps)))
        header = (
            f"{'method':<22}{'params':>9}{'ratio':>7}{'acc trunc':>10}{'acc after':>16}{'Δ':>7}"
        )
        print(header + ("  onnx bytes" if args.onnx else "") + "   seconds  detail")
        for name, go in runs:
            accs, mids = [], []
            start = time.perf_counter()
            for seed in seeds:
                out, mid, detail = go(model, data, teacher, seed)
                accs.append(accuracy(out, data))
                mids.append(mid)
            seconds = (time.perf_counter() - start) / len(seeds)
            params = count_params(out)
            spread = f"{min(accs):.2f}-{max(accs):.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"
            line = (
                f"{name:<22}{params:>9,}{params / base_params:>7.3f}{statistics.mean(mids):>10.2f}"
                f"{spread:>16}{statistics.mean(accs) - base_acc:>+7.2f}"
            )
            if args.onnx:
                line += f"{onnx_bytes(out, data):>12,}"
            print(f"{line}{seconds:>10.1f}  {detail}", flush=True)


if __name__ == "__main__":
    main()
