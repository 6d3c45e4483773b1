"""``compress`` for a Hugging Face folder: the Transformer pipeline with token inputs.

The steps are :func:`rankshrink.pipeline.compress.compress`'s — factorize (:func:`~rankshrink.io.hf_folder.token_layout`
maps BERT's module names onto the Transformer surgery), fine-tune with RaRe and live fusion, fold,
export, verify — with what tokens change: the data is ``input_ids``/``attention_mask``/
``token_type_ids``, the export has dynamic batch and sequence axes and three named inputs, and
verification runs at two sequence lengths (:func:`~rankshrink.onnx.verify_tokens.verify_tokens`). The report
has the same keys, plus the base model's pooled-cosine similarity and the padding check. ``--save-pt``
gets the folded encoder as a self-describing checkpoint (:mod:`rankshrink.models.token_spec`).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from rankshrink import __version__
from rankshrink.errors import InputError
from rankshrink.fold.transformer_fold import export_bytes, fold_transformer
from rankshrink.io.checkpoint import LoadedModel
from rankshrink.io.data import Dataset
from rankshrink.io.hf_folder import PackedTokens, TokenEncoder, load_hf_folder, token_layout
from rankshrink.io.token_data import load_for_encoder
from rankshrink.methods.transformer_surgery import factorize_transformer_
from rankshrink.models.arch import count_params, make_checkpoint
from rankshrink.onnx.export import check_single_file
from rankshrink.onnx.gates import size_gates
from rankshrink.onnx.tokens import export_tokens, session, token_latency_ms
from rankshrink.onnx.verify import stamp_provenance, with_gates
from rankshrink.onnx.verify_tokens import encoder_task, verify_tokens
from rankshrink.pipeline.compress import (
    DEFAULT_RECOVERY,
    DEFAULT_TARGET_RATIO,
    CompressConfig,
    CompressResult,
    _config_dict,
    _layer_dict,
)
from rankshrink.pipeline.report import build_report, verification_dict
from rankshrink.pipeline.threads import choose_threads, intra_op_threads
from rankshrink.train.rare_loop import StepStats, fine_tune_
from rankshrink.train.recovery import fine_tune_with_recovery_

#: Samples per forward pass when computing the distillation targets.
TEACHER_CHUNK = 256


def compress_hf(
    cfg: CompressConfig,
    progress: Callable[[StepStats], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> CompressResult:
    """Compress a BERT-family folder (see :func:`rankshrink.pipeline.compress.compress`).

    Raises:
        InputError: bad folder or token data (exit 2); ``--arch``/``--trust-pickle`` given.
        TrainingDivergedError, ExportError: no trustworthy model came out (exit 3).
    """
    say = stage or (lambda _msg: None)
    if cfg.arch is not None or cfg.trust_pickle:
        raise InputError(f"{cfg.model} is a Hugging Face folder; drop --arch and --trust-pickle")
    say("loading")
    loaded = load_hf_folder(cfg.model)
    encoder: TokenEncoder = loaded.model  # type: ignore[assignment]
    # a .txt file (--text) is tokenized with the folder's tokenizer
    data = load_for_encoder(cfg.data, cfg.model, encoder.config, cfg.train.seed)
    # everything after loading computes on the thread policy's count (rankshrink.pipeline.threads)
    one = data.x_train[:1]
    threads = choose_threads(cfg.threads, PackedTokens(encoder), one, cfg.train.batch_size)
    with intra_op_threads(threads):
        return _compress_loaded(replace(cfg, threads=threads), loaded, data, progress, say)


def _compress_loaded(
    cfg: CompressConfig,
    loaded: LoadedModel,
    data: Dataset,
    progress: Callable[[StepStats], None] | None,
    say: Callable[[str], None],
) -> CompressResult:
    """:func:`compress_hf` once the inputs are loaded and ``cfg.threads`` is decided."""
    encoder: TokenEncoder = loaded.model  # type: ignore[assignment]
    base = encoder.kind == "base"
    task = encoder_task(encoder, cfg.tolerances, data.has_labels)  # flags checked before work
    original = PackedTokens(encoder).eval()
    check_single_file(original)

    train_cfg = cfg.train
    if cfg.auto_target:
        train_cfg = replace(train_cfg, target_ratio=DEFAULT_TARGET_RATIO["transformer"])
    recovery = cfg.recovery if cfg.recovery is not None else DEFAULT_RECOVERY["transformer"]
    model = copy.deepcopy(original).eval()
    chain = factorize_transformer_(
        model,
        token_layout(model),
        frobenius=cfg.frobenius,
        axis_policy=cfg.axis_policy,
        ffn_fusion=cfg.ffn_fusion,
    )
    teacher = None
    if not data.has_labels or train_cfg.distill:
        with torch.no_grad():  # in chunks: a (N, T, T) attention at once can be large
            chunks = torch.split(data.x_train, TEACHER_CHUNK)
            teacher = torch.cat([original(chunk) for chunk in chunks])

    say("fine-tuning")
    training = fine_tune_with_recovery_(
        chain,
        data.x_train,
        data.y_train,
        teacher,
        train_cfg,
        recovery,
        size_fn=lambda: export_bytes(chain),
        progress=progress,
        fine_tune=fine_tune_,
    )

    say("folding")
    folded = fold_transformer(chain)
    with torch.no_grad():
        fold_diff = float((folded.model(data.x_test) - chain.model(data.x_test)).abs().max())
    compressed = folded.model.encoder  # type: ignore[union-attr]

    say("exporting")
    output_name = "last_hidden_state" if base else "logits"
    example = data.x_train[: min(4, len(data.x_train))]
    with tempfile.TemporaryDirectory(prefix="rankshrink-") as tmp:
        before_path, after_path = Path(tmp, "original.onnx"), Path(tmp, "compressed.onnx")
        bytes_before = export_tokens(encoder, example, before_path, cfg.export, output_name)
        export_tokens(compressed, example, after_path, cfg.export, output_name)
        bytes_after = stamp_provenance(after_path, encoder, compressed)  # verify reads it
        say("verifying")
        verification, checks = verify_tokens(
            encoder,
            compressed,
            after_path,
            data.x_test,
            data.y_test,
            cfg.tolerances,
            task,
            pad_id=encoder.config.pad_token_id,
        )
        lat_before = lat_after = None
        if cfg.measure_latency:
            one = data.x_test[:1]
            lat_before = token_latency_ms(session(before_path), one)
            lat_after = token_latency_ms(session(after_path), one)
        onnx_blob = after_path.read_bytes()

    verification = with_gates(verification, size_gates(bytes_before, bytes_after, cfg.max_bytes))
    failures = verification.failures
    report = build_report(
        method="rare",
        loaded=loaded,
        data_path=cfg.data,
        data=data,
        family="transformer",
        config=_config_dict(cfg, train_cfg, recovery),
        params=(count_params(encoder), count_params(compressed)),
        onnx_bytes=(bytes_before, bytes_after),
        layers=[_layer_dict(lf) for lf in folded.layers],
        heads=folded.heads,
        verification=verification_dict(verification, fold_diff, **checks.as_dict()),
        training=training,
        latency_ms=(lat_before, lat_after),
        failures=failures,
        input_extra={
            "architecture": loaded.meta["architecture"],
            "model_type": loaded.meta["model_type"],
        },
        data_extra={"tokens": int(data.x_train.shape[-1])},
    )
    meta = {
        "compressed_by": f"rankshrink {__version__}",
        "source_sha256": loaded.sha256,
        "method": "rare",
        "architecture": loaded.meta["architecture"],
        "output": output_name,
    }
    return CompressResult(
        report=report,
        onnx=onnx_blob,
        # the exported module itself: loads through load_model and computes what the ONNX does
        checkpoint=make_checkpoint(compressed, meta),
        fold=folded,
        verification=verification,
        training=training,
        gate_failures=failures,
    )
