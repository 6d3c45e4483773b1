"""A MiniLM-sized random-init BERT: RaRe+fusion step vs plain step, peak memory, ONNX latency.

    PYTHONPATH=. python benchmarks/bench_minilm.py [--quick] [--steps 30] [--compress-steps 200]
        [--batch-size 8] [--threads 2]

Model: ``BertModel`` with 6 layers, hidden 384, 12 heads, FFN 1536 (MiniLM-L6's shape; vocab 30522),
random init, written with ``save_pretrained`` to a temporary folder and read back through
rankshrink's own loader. Data: random tokens, 512 sequences of 64 (lengths 32–64, right-padded),
no labels, so both modes distill the last hidden state.

1. **Step time**: plain (``TrainConfig(lambda_rank=0, fusion=False, target_ratio=None)``) vs rare
   (``TrainConfig()`` defaults) on fresh factorized copies, each mode in its own spawned process so
   that its peak RSS (``ru_maxrss``) is its own; ms/step is ``report.seconds / steps``.
2. **Compression and latency**: :func:`rankshrink.pipeline.compress.compress` for ``--compress-steps``
   (defaults otherwise: target 0.7, the last 20 % plain recovery), then onnxruntime latency
   (median, one intra-op thread, sequences of 64) of the original and the compressed export at
   batch 1 and 32, next to the parameter ratio of the encoder linears (q, k, v, out, FFN in/out).

Prints ratios measured side by side in one run; asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

LAYERS, HIDDEN, HEADS, FFN, VOCAB, T, N = 6, 384, 12, 1536, 30522, 64, 512


def make_folder(root: Path) -> tuple[Path, Path]:
    """A random-init MiniLM-shaped BertModel folder and a token data file."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
    )
    folder = root / "minilm-random"
    BertModel(config).eval().save_pretrained(folder, safe_serialization=True)
    g = np.random.default_rng(0)
    ids = g.integers(1000, VOCAB, (N, T))
    mask = np.ones((N, T), dtype=np.int64)
    for i, length in enumerate(g.integers(T // 2, T + 1, N)):
        mask[i, length:] = 0
        ids[i, length:] = 0
    data = root / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=mask)
    return folder, data


def fusion_config(args: argparse.Namespace) -> dict:
    """The TrainConfig fields the command line overrides (empty: the defaults)."""
    fields: dict = {}
    if args.tau_cos is not None:
        fields["tau_cos"] = args.tau_cos
    if args.tau_euc is not None:
        fields["tau_euc"] = args.tau_euc
    if args.no_target:
        fields["target_ratio"] = None
    elif args.target_ratio is not None:
        fields["target_ratio"] = args.target_ratio
    return fields


def step_time(
    folder: str, data: str, mode: str, steps: int, batch: int, threads: int, fields: dict
) -> dict:
    """One mode's fine-tuning in this (spawned) process: ms/step and peak RSS."""
    from rankshrink.fold.transformer_plan import export_bytes
    from rankshrink.io.hf_folder import PackedTokens, load_hf_folder, token_layout
    from rankshrink.io.token_data import load_token_data
    from rankshrink.methods.transformer_surgery import factorize_transformer_
    from rankshrink.train.rare_config import TrainConfig
    from rankshrink.train.rare_loop import fine_tune_

    torch.set_num_threads(threads)
    packed = PackedTokens(load_hf_folder(folder).model).eval()
    ds = load_token_data(data, VOCAB, 512)
    with torch.no_grad():
        teacher = torch.cat([packed(ds.x_train[i : i + 64]) for i in range(0, len(ds.x_train), 64)])
    cfg = TrainConfig(steps=steps, batch_size=batch, **fields)
    if mode == "plain":
        cfg = replace(cfg, lambda_rank=0.0, fusion=False, target_ratio=None)
    chain = factorize_transformer_(packed, token_layout(packed))
    report = fine_tune_(chain, ds.x_train, None, teacher, cfg, size_fn=lambda: export_bytes(chain))
    return {
        "ms_per_step": report.seconds / steps * 1e3,
        "fusions": report.fusions,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _child(args: tuple, queue: mp.Queue) -> None:
    queue.put(step_time(*args))


def in_process(*args: object) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def latencies(paths: tuple[Path, Path], x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """Median latency of two files on ``x``, measured in alternating rounds so that machine
    drift hits both alike."""
    from rankshrink.models.io_spec import token_io
    from rankshrink.onnx.session import latency_ms, session

    io = token_io(base=True, pad_id=0)

    sessions = [session(p) for p in paths]
    times: list[list[float]] = [[], []]
    for _ in range(3):
        for i, sess in enumerate(sessions):
            times[i].append(latency_ms(sess, x, repeats=repeats, io=io))
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per mode for the step time")
    parser.add_argument("--compress-steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="10 / 40 steps")
    # A random-init model has no redundancy: at the defaults, fusion only finds the few pairs
    # RaRe makes parallel. These let a run fuse enough to measure what fusion costs and gains.
    parser.add_argument("--tau-cos", type=float, help="fusion threshold τ_cos (both parts)")
    parser.add_argument("--tau-euc", type=float, help="fusion threshold τ_euc (both parts)")
    parser.add_argument("--target-ratio", type=float, help="size target of the τ schedule")
    parser.add_argument("--no-target", action="store_true", help="fixed τ, no schedule")
    parser.add_argument("--only", choices=("step", "latency"), help="run one part only")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.compress_steps = 10, 40
    torch.set_num_threads(args.threads)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {args.threads} threads, load {load}")
    print(f"BertModel {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, FFN {FFN}, vocab {VOCAB};")
    print(f"{N} random sequences of {T} tokens (lengths {T // 2}-{T}), batch {args.batch_size}")
    print(f"TrainConfig overrides for the rare mode: {fusion_config(args) or 'none (defaults)'}")
    with tempfile.TemporaryDirectory(prefix="bench-minilm-") as tmp:
        folder, data = make_folder(Path(tmp))
        if args.only != "latency":
            step_times(folder, data, args)
        if args.only != "step":
            compress_and_time(folder, data, Path(tmp), args)
    print(f"load average at the end: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


def step_times(folder: Path, data: Path, args: argparse.Namespace) -> None:
    """Plain vs rare ms/step and peak RSS, each run in its own process, modes alternating."""
    runs: dict[str, list[dict]] = {"plain": [], "rare": []}
    for mode in ("plain", "rare", "plain", "rare"):
        runs[mode].append(
            in_process(
                str(folder),
                str(data),
                mode,
                args.steps,
                args.batch_size,
                args.threads,
                fusion_config(args),
            )
        )
    plain = min(r["ms_per_step"] for r in runs["plain"])
    rare = min(r["ms_per_step"] for r in runs["rare"])
    print()
    print(f"step time ({args.steps} steps, best of 2 alternating runs per mode):")
    for mode in ("plain", "rare"):
        per = ", ".join(f"{r['ms_per_step']:.0f}" for r in runs[mode])
        peak = max(r["peak_rss_mb"] for r in runs[mode])
        fus = runs[mode][-1]["fusions"]
        print(f"  {mode:5s}: {per} ms/step, peak RSS {peak:.0f} MB, fusions {fus}")
    print(f"  rare / plain = {rare / plain:.2f}x  (goal <= 1.3x)")


def compress_and_time(folder: Path, data: Path, tmp: Path, args: argparse.Namespace) -> None:
    """Compress with the pipeline, then onnxruntime latency of both exports at batch 1 and 32."""
    from rankshrink.io.hf_folder import load_hf_folder
    from rankshrink.io.token_data import load_token_data
    from rankshrink.models.io_spec import token_io
    from rankshrink.nn.token_encoder import PackedTokens
    from rankshrink.onnx.export import ExportConfig, export_onnx
    from rankshrink.pipeline.compress import compress
    from rankshrink.pipeline.config import CompressConfig
    from rankshrink.train.rare_config import TrainConfig

    fields = fusion_config(args)
    cfg = CompressConfig(
        model=folder,
        data=data,
        train=TrainConfig(steps=args.compress_steps, batch_size=args.batch_size, **fields),
        measure_latency=False,
        auto_target="target_ratio" not in fields,
        threads=args.threads,  # as the step-time part, not the thread policy's count
    )
    start = time.perf_counter()
    result = compress(cfg)
    wall = time.perf_counter() - start
    rep = result.report
    ver = rep["verification"]
    linears = [lay for lay in rep["layers"] if lay["name"].startswith("encoder.layers.")]
    p_after = sum(lay["params"] for lay in linears)
    p_before = sum(lay["original_params"] for lay in linears)
    print()
    print(
        f"compress: {args.compress_steps} steps in {rep['training']['seconds']:.0f} s"
        f" (wall {wall:.0f} s), {rep['training']['fusions']} fusions,"
        f" verification passed={ver['passed']}, export diff {ver['export_max_abs_diff']:.2e},"
        f" pooled cosine mean {ver['pooled_cosine_mean']:.4f} min {ver['pooled_cosine_min']:.4f}"
    )
    print(
        f"  encoder-linear params {p_after:,} / {p_before:,} = {p_after / p_before:.3f};"
        f" ONNX bytes ratio {rep['onnx_ratio']:.3f} (embeddings included)"
    )
    ds = load_token_data(data, VOCAB, 512)
    before_path, after_path = tmp / "original.onnx", tmp / "compressed.onnx"
    after_path.write_bytes(result.onnx)
    original = load_hf_folder(folder).model
    export_onnx(PackedTokens(original), ds.x_train[:4], before_path, ExportConfig(), token_io(True, 0))
    print()
    print("onnxruntime latency, 1 intra-op thread, 64 tokens (median of 3 alternating rounds):")
    print("| batch | original ms | compressed ms | latency ratio | encoder-linear param ratio |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for batch, repeats in ((1, 50), (32, 10)):
        x = ds.x_train[:batch]
        a, b = latencies((before_path, after_path), x, repeats)
        print(f"| {batch} | {a:.2f} | {b:.2f} | {b / a:.3f} | {p_after / p_before:.3f} |")


if __name__ == "__main__":
    main()
