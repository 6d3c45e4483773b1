"""The bundled samples at the defaults, stored as float32, fp16 and int8, side by side.

    PYTHONPATH=. python benchmarks/bench_quantize.py [--steps 1000]

For each sample, one ``compress`` run per precision (the same seed, so the same fine-tuning and
fold; only the stored file differs): ONNX bytes and their ratio to the original file, test
accuracy before and after, top-1 agreement, whether the file passed the default gates, and which
weight nodes the accuracy-aware fallback kept in float32. Asserts nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rankshrink.pipeline.compress import compress
from rankshrink.pipeline.config import CompressConfig
from rankshrink.train.rare_config import TrainConfig

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
MODELS = ("mlp_digits.pt", "transformer_digits.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    print("| model | stored as | ONNX bytes | ratio | accuracy before → after | agreement |"
          " passed | kept float32 |")  # fmt: skip
    print("| --- | --- | ---: | ---: | --- | ---: | --- | --- |")
    for name in MODELS:
        for mode in (None, "fp16", "int8"):
            cfg = CompressConfig(
                SAMPLES / name,
                SAMPLES / "digits.npz",
                train=TrainConfig(steps=args.steps),
                auto_target=True,  # the family's default target, as the CLI without a target
                measure_latency=False,
                quantize=mode,
            )
            rep = compress(cfg).report
            ver = rep["verification"]
            kept = (rep.get("quantize") or {}).get("kept_float", [])
            print(
                f"| {name} | {mode or 'float32'} | {rep['onnx_bytes_after']:,} |"
                f" {rep['onnx_ratio']:.3f} | {ver['accuracy_before']:.2f} →"
                f" {ver['accuracy_after']:.2f} % | {ver['agreement']:.2%} | {ver['passed']} |"
                f" {', '.join(kept) or '—'} |"
            )


if __name__ == "__main__":
    main()
