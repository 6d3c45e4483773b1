"""Make the bundled sample models and their data, deterministically (no downloads).

    python sample_models/make_samples.py            # writes beside this file

- ``digits.npz``: scikit-learn's bundled 8x8 digits, ``x`` = pixels / 16 (float32, the only
  preprocessing, stored in the file), ``y`` labels, and a recorded stratified 80/20 split
  ``train_idx`` / ``test_idx``.
- ``mlp_digits.pt``: a ReLU MLP 64-256-256-256-10 with dropout 0.2, trained on the train split;
  a self-describing rankshrink checkpoint that loads with ``torch.load(weights_only=True)``.

Each sample is one ``make_*`` function; running the script twice gives byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from rankshrink.arch import build_sequential, make_checkpoint

SEED = 0
MLP_EPOCHS = 100
_FIXED_DATE = (2026, 1, 1, 0, 0, 0)  # zip entries carry a timestamp; fix it for stable bytes


def _seed_everything(seed: int = SEED) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez_compressed`` with fixed zip timestamps, so the bytes depend only on the data."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def make_digits_data(out_dir: Path) -> dict[str, np.ndarray]:
    """Write ``digits.npz`` and return its arrays."""
    _seed_everything()
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=SEED, stratify=y)
    arrays = {
        "x": x,
        "y": y,
        "train_idx": np.sort(train).astype(np.int64),
        "test_idx": np.sort(test).astype(np.int64),
    }
    _save_npz(out_dir / "digits.npz", arrays)
    return arrays


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return 100.0 * int((model(x).argmax(1) == y).sum()) / len(y)


def make_mlp_digits(
    out_dir: Path, data: dict[str, np.ndarray], epochs: int = MLP_EPOCHS
) -> dict[str, Any]:
    """Train on the train split, write ``mlp_digits.pt`` and return its meta."""
    _seed_everything()
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    tr, te = torch.from_numpy(data["train_idx"]), torch.from_numpy(data["test_idx"])
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(256, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        order = tr[torch.randperm(len(tr), generator=gen)]
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    model.eval()
    meta = {
        "description": "ReLU MLP 64-256-256-256-10, dropout 0.2, trained on sklearn digits",
        "dataset": "sklearn digits (pixels/16)",
        "seed": SEED,
        "epochs": epochs,
        "train_accuracy": _accuracy(model, x[tr], y[tr]),
        "test_accuracy": _accuracy(model, x[te], y[te]),
    }
    path = out_dir / "mlp_digits.pt"
    torch.save(make_checkpoint(model, meta), path)
    _check_checkpoint(path, data)
    return meta


def _check_checkpoint(path: Path, data: dict[str, np.ndarray]) -> None:
    """Reload the checkpoint safely, rebuild it from its spec and re-measure its test accuracy."""
    ckpt = torch.load(path, weights_only=True)
    model = build_sequential(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])
    te = torch.from_numpy(data["test_idx"])
    acc = _accuracy(model.eval(), torch.from_numpy(data["x"])[te], torch.from_numpy(data["y"])[te])
    expected = ckpt["meta"]["test_accuracy"]
    if acc != expected:
        raise RuntimeError(f"{path}: reloaded test accuracy {acc} != saved {expected}")


def _describe(path: Path, extra: str = "") -> None:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    print(f"{path}  {path.stat().st_size:,} bytes  sha256 {digest}  {extra}".rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).resolve().parent, help="output directory"
    )
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    data = make_digits_data(args.out_dir)
    n_train, n_test = len(data["train_idx"]), len(data["test_idx"])
    _describe(args.out_dir / "digits.npz", f"train {n_train}  test {n_test}")
    meta = make_mlp_digits(args.out_dir, data)
    train_acc, test_acc = meta["train_accuracy"], meta["test_accuracy"]
    accs = f"train accuracy {train_acc:.2f}%  test accuracy {test_acc:.2f}%"
    _describe(args.out_dir / "mlp_digits.pt", accs)


if __name__ == "__main__":
    main()
