"""Per-step time of RaRe + live-fusion fine-tuning against plain fine-tuning, side by side.

    PYTHONPATH=. python benchmarks/bench_step.py [--quick] [--rounds 3] [--threads 2]
        [--sample-steps 300] [--wide-steps 160] [--distill]

Both modes run the same loop, :func:`rankshrink.train.rare_loop.fine_tune_`, on a fresh factorized copy of
the same model (``factorize_(prepare_chain(model))``, Frobenius normalization and L2 on):

- plain: ``TrainConfig(lambda_rank=0, fusion=False, target_ratio=None)``;
- rare:  ``TrainConfig()`` defaults (RaRe loss, live fusion, target-ratio schedule, so fusions
  happen and the forward pass pays for the index maps).

ms/step is ``report.seconds / steps``. Runs alternate plain/rare (order flipped every round) and
the medians are compared, so machine drift hits both modes equally. By default both modes train on
labels only (teacher=None, distill=False); ``--distill`` passes the original model's outputs as
teacher to both instead. Models: (1) the sample MLP 64-256-256-256-10 (dropout 0.2) from
``sample_models/mlp_digits.pt`` on the digits train split (random weights / random 1437×64 data
when the sample files are missing); (2) a random-init wide MLP 784-2048-2048-10 on 4096×784
standard-normal data. Batch 128. Prints ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from rankshrink.fold.chain_fold import export_bytes
from rankshrink.io.checkpoint import load_model
from rankshrink.methods.surgery import factorize_
from rankshrink.models.chain import prepare_chain
from rankshrink.train.rare_config import TrainConfig, TrainReport
from rankshrink.train.rare_loop import fine_tune_

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


@dataclass
class Case:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    source: str


def sample_case() -> Case:
    """The sample MLP on digits, or the same architecture on digits-shaped random data."""
    ckpt, npz = SAMPLES / "mlp_digits.pt", SAMPLES / "digits.npz"
    if ckpt.is_file() and npz.is_file():
        model = load_model(ckpt).model
        with np.load(npz) as data:
            train = data["train_idx"]
            x, y = torch.from_numpy(data["x"][train]), torch.from_numpy(data["y"][train])
        source = f"{ckpt.name} + digits train split"
    else:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for fan_in in (64, 256, 256):
            layers += [nn.Linear(fan_in, 256), nn.ReLU(), nn.Dropout(0.2)]
        model = nn.Sequential(*layers, nn.Linear(256, 10))
        gen = torch.Generator().manual_seed(0)
        x, y = torch.rand(1437, 64, generator=gen), torch.randint(0, 10, (1437,), generator=gen)
        source = "sample files missing: random weights, random 1437x64 data"
    return Case("sample 64-256-256-256-10", model.eval(), x, y, source)


def wide_case() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4096, 784, generator=gen), torch.randint(0, 10, (4096,), generator=gen)
    return Case("wide 784-2048-2048-10", model.eval(), x, y, "random init, random 4096x784 data")


def run_once(case: Case, cfg: TrainConfig, teacher: Tensor | None) -> TrainReport:
    """Fine-tune a fresh factorized copy (prepare_chain deep-copies the model)."""
    chain = factorize_(prepare_chain(case.model))
    return fine_tune_(
        chain, case.x, case.y, teacher, cfg, size_fn=lambda: export_bytes(chain.model)
    )


def bench(case: Case, steps: int, rounds: int, distill: bool) -> list[str]:
    """Alternate plain and rare runs; return a table row."""
    teacher = None
    if distill:
        with torch.no_grad():
            teacher = case.model(case.x)
    plain_cfg = TrainConfig(
        steps=steps, lambda_rank=0, fusion=False, target_ratio=None, distill=distill
    )
    rare_cfg = TrainConfig(steps=steps, distill=distill)
    run_once(case, replace(rare_cfg, steps=5), teacher)  # warm-up: lazy init, allocator
    times: dict[str, list[float]] = {"plain": [], "rare": []}
    reports: dict[str, TrainReport] = {}
    for r in range(rounds):
        order = ("plain", "rare") if r % 2 == 0 else ("rare", "plain")
        for mode in order:
            rep = run_once(case, plain_cfg if mode == "plain" else rare_cfg, teacher)
            times[mode].append(rep.seconds / steps * 1e3)
            reports[mode] = rep
    plain, rare = statistics.median(times["plain"]), statistics.median(times["rare"])
    per_round = ", ".join(
        f"{a / b:.2f}" for a, b in zip(times["rare"], times["plain"], strict=True)
    )
    rep = reports["rare"]
    ratio = rare / plain
    return [
        case.name,
        str(steps),
        f"{plain:.2f}",
        f"{rare:.2f}",
        f"{ratio:.2f}x",
        "yes" if ratio <= 1.3 else "NO",
        str(rep.fusions),
        str(rep.search_refresh),
        per_round,
    ]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-steps", type=int, default=300)
    parser.add_argument("--wide-steps", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode (median taken)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="100/20 steps, 1 round")
    parser.add_argument(
        "--distill", action="store_true", help="teacher outputs + distillation in both modes"
    )
    parser.add_argument("--only", choices=("sample", "wide"), help="run one model only")
    args = parser.parse_args()
    if args.quick:
        args.sample_steps, args.wide_steps, args.rounds = 100, 20, 1
    torch.set_num_threads(args.threads)

    cases = []
    if args.only in (None, "sample"):
        cases.append((sample_case(), args.sample_steps))
    if args.only in (None, "wide"):
        cases.append((wide_case(), args.wide_steps))
    target = "teacher outputs + labels (distill=True)" if args.distill else "labels only"
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128, load {load}")
    print(f"both modes train on: {target}; median of {args.rounds} alternating round(s)")
    for case, _ in cases:
        print(f"  {case.name}: {case.source}")
    print("plain = TrainConfig(lambda_rank=0, fusion=False, target_ratio=None)")
    print("rare  = TrainConfig() defaults (RaRe + live fusion + target-ratio schedule)")
    print()
    header = [
        "model", "steps", "plain ms/step", "rare ms/step", "ratio", "<=1.3x",
        "fusions", "search_refresh", "per-round ratios",
    ]  # fmt: skip
    rows = [bench(case, steps, args.rounds, args.distill) for case, steps in cases]
    print_table(header, rows)
    print(f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
