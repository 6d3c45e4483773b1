"""Per-step cost of RaRe + live fusion against plain fine-tuning, measured side by side.

    python benchmarks/bench_step.py [--quick] [--threads 2]

Both modes run the same loop of :func:`rankshrink.train.fine_tune_` on the same factorized model:
"plain" is ``--lambda-rank 0 --no-fusion`` (Frobenius normalization and L2 stay on), "rare" is the
default configuration (RaRe loss, live fusion, the target-ratio schedule), so fusions happen and the
forward pass pays for the index maps. Labels only (no distillation) in both modes. Runs alternate
plain/rare and the medians are compared, so machine drift hits both equally. Models: the bundled
sample MLP 64-256-256-256-10 on the digits training split, and a wide 784-2048-2048-10 MLP (random
init) on random data. Prints ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rankshrink.chain import prepare_chain
from rankshrink.checkpoint import load_model
from rankshrink.fold import export_bytes
from rankshrink.surgery import factorize_
from rankshrink.train import TrainConfig, fine_tune_

ROOT = Path(__file__).resolve().parents[1]


def _sample() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = load_model(ROOT / "sample_models" / "mlp_digits.pt").model
    data = np.load(ROOT / "sample_models" / "digits.npz")
    train = data["train_idx"]
    return model, torch.from_numpy(data["x"][train]), torch.from_numpy(data["y"][train])


def _wide() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10)
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    return (
        model.eval(),
        torch.randn(4096, 784, generator=gen),
        torch.randint(0, 10, (4096,), generator=gen),
    )


def _ms_per_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig
) -> tuple[float, int, int]:
    chain = factorize_(prepare_chain(model))
    report = fine_tune_(chain, x, y, None, cfg, size_fn=lambda: export_bytes(chain.model))
    return report.seconds / cfg.steps * 1e3, report.fusions, report.search_refresh


def bench(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, rounds: int
) -> None:
    plain_cfg = TrainConfig(
        steps=steps, lambda_rank=0.0, fusion=False, target_ratio=None, distill=False
    )
    rare_cfg = TrainConfig(steps=steps, distill=False)
    _ms_per_step(
        model, x, y, TrainConfig(steps=3, distill=False)
    )  # warm-up (lazy imports, allocator)
    plain, rare = [], []
    fusions = refresh = 0
    for _ in range(rounds):
        plain.append(_ms_per_step(model, x, y, plain_cfg)[0])
        ms, fusions, refresh = _ms_per_step(model, x, y, rare_cfg)
        rare.append(ms)
    p, r = statistics.median(plain), statistics.median(rare)
    print(
        f"| {name} | {steps} | {p:.2f} | {r:.2f} | **{r / p:.2f}×** | {fusions} | {refresh} |"
        f" {', '.join(f'{a / b:.2f}' for a, b in zip(rare, plain, strict=True))} |",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 1 if args.quick else args.rounds
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {rounds} alternating rounds"
    )
    print(
        "| model | steps | plain ms/step | RaRe+fusion ms/step | ratio | fusions | full search every | per-round ratios |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    bench("sample MLP 64-256-256-256-10, batch 128", *_sample(), 100 if args.quick else 400, rounds)
    bench("wide MLP 784-2048-2048-10, batch 128", *_wide(), 15 if args.quick else 60, rounds)


if __name__ == "__main__":
    main()
