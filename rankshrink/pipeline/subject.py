"""Load a model and its data, and adapt the model to the interface every method works through.

A :class:`Subject` is what the stages see, whatever the user brought: the module that trains and
runs on ``x`` (a token encoder wrapped to take stacked tokens), how ``x`` feeds an ONNX file
(:class:`~rankshrink.models.io_spec.ModelIO`), the model's family — which decides where its
compressible Linear sites are and which axes are protected (SPEC §3) — and its task kind, which
picks the verification metrics and the default gates.

Families:

- ``chain``: a flat ``nn.Sequential`` of Linear layers and elementwise modules — a sequential
  checkpoint, or an ordinary ``nn.Module`` whose traced forward is one such chain;
- ``graph``: any other ``nn.Module`` whose forward traces (torch.fx) into Linear chains joined by
  residual adds, LayerNorm, reshapes (:mod:`rankshrink.models.graph`);
- ``transformer``: the bundled encoder and Hugging Face BERT-family folders, by their layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rankshrink.io.checkpoint import LoadedModel, load_model
from rankshrink.io.data import Dataset, load_data
from rankshrink.io.data_fit import check_fit
from rankshrink.io.hf_config import is_hf_folder
from rankshrink.io.hf_folder import load_hf_folder
from rankshrink.io.token_data import load_for_encoder
from rankshrink.models.graph import TracedModel, trace
from rankshrink.models.hf_families import token_layout
from rankshrink.models.io_spec import FEATURES, ModelIO, token_io
from rankshrink.models.transformer_layout import (
    TransformerLayout,
    is_transformer,
    transformer_layout,
)
from rankshrink.nn.token_encoder import PackedTokens, TokenEncoder
from rankshrink.onnx.task import Task, Tolerances, model_task
from rankshrink.onnx.tokens import encoder_task

#: Samples per forward pass when computing distillation targets of a token model: a (N, T, T)
#: attention for the whole training set at once can be large.
TEACHER_CHUNK = 256


@dataclass
class Subject:
    """A loaded model and data, adapted: what every stage, the exporter and the verifier read."""

    loaded: LoadedModel
    data: Dataset
    model: nn.Module  # eval mode; takes ``x`` as the data holds it
    io: ModelIO
    family: str  # "chain", "graph" or "transformer"
    layout: TransformerLayout | None = None  # transformer: where each block's projections are
    traced: TracedModel | None = None  # graph: the traced module and its Linear chains

    def teacher(self) -> torch.Tensor:
        """The original model's outputs on the training inputs (distillation targets)."""
        x = self.data.x_train
        with torch.no_grad():
            if not self.io.tokens:
                return self.model(x)
            return torch.cat([self.model(chunk) for chunk in torch.split(x, TEACHER_CHUNK)])

    def task(self, tol: Tolerances) -> Task:
        """The model's task kind under ``tol`` (the flags must fit it).

        Raises:
            InputError: a gate flag or ``--task`` does not fit the model.
        """
        has_labels = self.data.has_labels
        if isinstance(self.model, PackedTokens):
            return encoder_task(self.model.encoder, tol, has_labels)
        return model_task(self.model, self.data.x_test, tol, has_labels)


def load_subject(
    model: Path, data: Path, arch: str | None, trust_pickle: bool, seed: int
) -> Subject:
    """Load a checkpoint or a Hugging Face folder and its data; adapt the model.

    Raises:
        InputError: bad model or data, data that does not fit the model, ``--arch`` or
            ``--trust-pickle`` with a folder (exit 2).
        UnsupportedModelError: a module whose forward does not trace, or uses an op the fold
            cannot handle (exit 2).
    """
    if is_hf_folder(Path(model)):
        if arch is not None or trust_pickle:
            from rankshrink.errors import InputError

            raise InputError(f"{model} is a Hugging Face folder; drop --arch and --trust-pickle")
        loaded = load_hf_folder(model)
        encoder: TokenEncoder = loaded.model  # type: ignore[assignment]
        # a .txt file (--text) is tokenized with the folder's tokenizer
        dataset = load_for_encoder(data, model, encoder.config, seed)
        return adapt(loaded, dataset)
    loaded = load_model(model, arch=arch, trust_pickle=trust_pickle)
    if isinstance(loaded.model, TokenEncoder):  # an encoder saved by compress --save-pt
        tokens = load_for_encoder(data, Path(model).parent, loaded.model.config, seed)
        return adapt(loaded, tokens)
    dataset = load_data(data, seed=seed)
    check_fit(loaded.model, dataset, data)  # input width, output shape, labels: one line each
    return adapt(loaded, dataset)


def adapt(loaded: LoadedModel, data: Dataset) -> Subject:
    """The :class:`Subject` of a loaded model (see the module docstring for the families).

    Raises:
        UnsupportedModelError: the model neither has a known layout nor traces into Linear
            chains (one line naming the op).
    """
    model = loaded.model.eval()
    if isinstance(model, TokenEncoder):
        packed = PackedTokens(model).eval()
        io = token_io(model.kind == "base", model.config.pad_token_id)
        return Subject(loaded, data, packed, io, "transformer", layout=token_layout(packed))
    if is_transformer(model):
        return Subject(loaded, data, model, FEATURES, "transformer", transformer_layout(model))
    if isinstance(model, nn.Sequential):
        return Subject(loaded, data, model, FEATURES, "chain")
    traced = trace(model)
    chain = traced.as_sequential()
    if chain is not None:  # fc1 → relu → fc2 written as a class: the chain it computes
        return Subject(loaded, data, chain.eval(), FEATURES, "chain")
    return Subject(loaded, data, traced.module.eval(), FEATURES, "graph", traced=traced)
