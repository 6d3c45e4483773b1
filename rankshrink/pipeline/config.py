"""What a run is told: :class:`CompressConfig` and :class:`MethodConfig`, each checking itself.

The checks run when a config is built, so a library caller (``from rankshrink import compress``)
gets the same one-line :class:`~rankshrink.errors.InputError` the command line prints, before
anything loads. Messages name the command-line flag, which is also the field's name with dashes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from rankshrink.errors import InputError
from rankshrink.onnx.export import EXPORTERS, ExportConfig
from rankshrink.onnx.quantize import QUANTIZE_MODES
from rankshrink.onnx.task import Tolerances, validate
from rankshrink.train.rare_config import TrainConfig
from rankshrink.train.recovery import RecoveryConfig

AXIS_POLICIES = ("fold", "longer")

#: Each method's own settings (MethodConfig fields): the ones it reads, records in the report, and
#: accepts from the command line. The registry (rankshrink.pipeline.methods) takes them from here.
METHOD_SETTINGS: dict[str, tuple[str, ...]] = {
    "rare": (),
    "svd": ("budget", "rank", "min_rank"),
    "rmt-svd": ("tw_margin", "min_rank", "min_energy"),
    "layer-sparsity": ("lam", "refit_steps"),
    "rare+rmt-svd": ("tw_margin", "min_rank", "min_energy", "refit_steps"),
    "layer-sparsity+rmt-svd": ("lam", "tw_margin", "min_rank", "min_energy", "refit_steps"),
}

#: The command-line flag of each method setting.
SETTING_FLAGS = {
    "budget": "--budget",
    "rank": "--rank",
    "min_rank": "--min-rank",
    "tw_margin": "--tw-margin",
    "min_energy": "--min-energy",
    "lam": "--lambda-sparsity",
    "refit_steps": "--refit-steps",
}

#: The export-size target per model family when none is given. A Transformer's residual stream,
#: embeddings, LayerNorms and head never shrink, and its GELU FFN only through index ops, so the
#: attention projections alone carry the reduction: a lower target would cut them too deep.
DEFAULT_TARGET_RATIO = {"chain": 0.6, "graph": 0.6, "transformer": 0.7}
#: The plain recovery phase at the end of fine-tuning (see rankshrink.train.recovery) per family. On the
#: sample MLP, without it the test accuracy of the default run moved between 96.67 and 98.33 % over
#: seeds and with float-rounding-level changes to the RaRe gradient; with it, seeds 0-3 gave
#: 97.22-97.78 % (original 97.78 %) at the same size.
DEFAULT_RECOVERY = {
    "chain": RecoveryConfig(),
    "graph": RecoveryConfig(),
    "transformer": RecoveryConfig(),
}


def require(ok: bool, message: str) -> None:
    """Raise :class:`InputError` with ``message`` unless ``ok``."""
    if not ok:
        raise InputError(message)


def require_finite(**values: float | None) -> None:
    """Reject nan/inf settings: a NaN gate never fails and an inf rate diverges at step 1."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise InputError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def check_settings(method: str, given: set[str]) -> None:
    """Refuse settings (MethodConfig field names) that ``method`` does not read.

    Raises:
        InputError: ``--rank, --tw-margin do not apply to --method rare``.
    """
    own = METHOD_SETTINGS[method]
    extra = [flag for name, flag in SETTING_FLAGS.items() if name in given and name not in own]
    verb = "does" if len(extra) == 1 else "do"
    if extra:
        raise InputError(f"{', '.join(extra)} {verb} not apply to --method {method}")


def check_train(t: TrainConfig) -> None:
    """The fine-tuning settings' ranges.

    Raises:
        InputError: one line naming the setting.
    """
    require_finite(
        lr=t.lr, lambda_rank=t.lambda_rank, lambda_l2=t.lambda_l2, tau_cos=t.tau_cos,
        tau_euc=t.tau_euc, target_ratio=t.target_ratio,
    )  # fmt: skip
    require(t.steps > 0, f"--steps must be positive, got {t.steps}")
    require(t.batch_size > 0, f"--batch-size must be positive, got {t.batch_size}")
    require(t.lr > 0, f"--lr must be positive, got {t.lr}")
    require(t.lambda_rank >= 0 and t.lambda_l2 >= 0, "--lambda-rank and --lambda-l2 must be ≥ 0")
    require(0 < t.tau_cos <= 1, f"--tau-cos must be in (0, 1], got {t.tau_cos}")
    require(t.tau_euc > 0, f"--tau-euc must be positive, got {t.tau_euc}")
    require(
        t.target_ratio is None or 0 < t.target_ratio < 1,
        f"--target-ratio must be in (0, 1), got {t.target_ratio}",
    )


@dataclass(frozen=True)
class MethodConfig:
    """The method and its own settings; the shared ones (steps, lr, batch, seed, distillation,
    export, tolerances) are :class:`CompressConfig`'s. Each method reads only the settings its
    registry entry names (:data:`rankshrink.pipeline.methods.METHODS`)."""

    method: str = "rare"
    # svd: keep this fraction of the Linear layers' parameters ... or this rank in every layer
    budget: float | None = None  # None with no rank: 0.5
    rank: int | None = None
    # rmt-svd: Tracy–Widom units above the Marchenko–Pastur edge, a rank floor per layer, and
    # the share of each layer's spectral energy always kept (see LowRankConfig.min_energy)
    tw_margin: float = 0.0
    min_rank: int = 1
    min_energy: float = 0.5
    # layer-sparsity: weight of the negative-part penalty; layer-sparsity and the combinations:
    # steps of the refit after the last stage (None: as many as the first stage's --steps)
    lam: float = 0.1
    refit_steps: int | None = None

    def __post_init__(self) -> None:
        names = ", ".join(METHOD_SETTINGS)
        require(self.method in METHOD_SETTINGS, f"--method must be one of {names}, got {self.method!r}")
        # a library caller's "given" settings are the ones that differ from their defaults
        check_settings(self.method, self.changed())
        require_finite(
            budget=self.budget, tw_margin=self.tw_margin, min_energy=self.min_energy,
            lambda_sparsity=self.lam,
        )  # fmt: skip
        b, r = self.budget, self.rank
        require(b is None or 0 < b <= 1, f"--budget must be in (0, 1], got {b}")
        require(b is None or r is None, "give --budget or --rank, not both")
        require(r is None or r > 0, f"--rank must be positive, got {r}")
        require(self.min_rank > 0, f"--min-rank must be positive, got {self.min_rank}")
        require(self.tw_margin >= 0, f"--tw-margin must be ≥ 0, got {self.tw_margin}")
        require(0 <= self.min_energy < 1, f"--min-energy must be in [0, 1), got {self.min_energy}")
        require(self.lam > 0, f"--lambda-sparsity must be positive, got {self.lam}")
        require(self.refit_steps is None or self.refit_steps >= 0, "--refit-steps must be ≥ 0")

    @property
    def svd_budget(self) -> float | None:
        """The budget truncated SVD uses: 0.5 when neither a budget nor a rank is given."""
        return 0.5 if self.budget is None and self.rank is None else self.budget

    def changed(self) -> set[str]:
        """The settings that differ from their defaults (a library caller's "given" settings)."""
        return {
            f.name
            for f in fields(self)
            if f.name != "method" and getattr(self, f.name) != f.default
        }


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``rankshrink compress`` can be told; checked when built.

    Raises:
        InputError: a setting out of range (one line naming its flag).
    """

    model: Path
    data: Path
    method: MethodConfig = field(default_factory=MethodConfig)
    arch: str | None = None
    trust_pickle: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)
    frobenius: bool = True
    axis_policy: str = "fold"
    export: ExportConfig = field(default_factory=ExportConfig)
    tolerances: Tolerances = field(default_factory=Tolerances)
    max_bytes: int | None = None
    measure_latency: bool = True
    # the target ratio was not given: use the model family's default (DEFAULT_TARGET_RATIO)
    auto_target: bool = False
    ffn_fusion: bool = False  # Transformers: also fuse FFN axes (exported with index ops)
    recovery: RecoveryConfig | None = None  # None: the model family's default (DEFAULT_RECOVERY)
    # intra-op threads (--threads); None: the thread policy's count (rankshrink.pipeline.threads)
    threads: int | None = None
    checkpoint: bool = False  # also build the compressed model's checkpoint (--save-pt)
    # store the compressed file's weights as int8 or fp16 (rankshrink.onnx.quantize); None: float32
    quantize: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "data", Path(self.data))
        check_train(self.train)
        validate(self.tolerances)
        require_finite(export_atol=self.tolerances.export_atol)
        require(
            self.tolerances.export_atol > 0,
            f"--export-atol must be positive, got {self.tolerances.export_atol}",
        )
        require(self.max_bytes is None or self.max_bytes > 0, "--max-bytes must be positive")
        require(
            self.export.exporter in EXPORTERS,
            f"--exporter must be one of {', '.join(EXPORTERS)}, got {self.export.exporter!r}",
        )
        require(7 <= self.export.opset <= 23, f"--opset must be between 7 and 23, got {self.export.opset}")
        require(
            self.axis_policy in AXIS_POLICIES,
            f"--axis-policy must be one of {', '.join(AXIS_POLICIES)}, got {self.axis_policy!r}",
        )
        require(
            self.quantize is None or self.quantize in QUANTIZE_MODES,
            f"--quantize must be one of {', '.join(QUANTIZE_MODES)}, got {self.quantize!r}",
        )
        require(
            self.threads is None or self.threads >= 0,
            f"--threads must be ≥ 0 (0: the thread policy), got {self.threads}",
        )
