"""The example data, and your own images, as tensors the trainer can shuffle deterministically.

- `digits`: scikit-learn's handwritten digits (1797 real 8x8 images, 10 classes). They ship
  inside the scikit-learn package, so nothing is downloaded; they are upsampled to
  `image_size` (tiny_vgg's five max-pools need 32x32) and repeated to 3 channels.
- `imagefolder`: torchvision's ImageFolder (one subfolder per class), with the same
  transforms: resize to `image_size`, RGB, scaled to [0, 1] then normalised.

The train/validation split is a fixed permutation from the run's seed, so every rank and
every resume sees the same split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from graft.config import DataConfig
from graft.errors import ConfigError

# Statistics of the digits set after scaling to [0, 1] (computed once; fixed so the
# transform does not depend on the split).
_DIGITS_MEAN, _DIGITS_STD = 0.3056, 0.3840


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    num_classes: int
    classes: list[str]


def _split(n: int, val_fraction: float, seed: int, limit: int | None) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    if limit is not None:
        order = order[:limit]
    n_val = max(1, int(round(len(order) * val_fraction)))
    return order[n_val:], order[:n_val]


def digits_tensors(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 3, S, S) float32, normalised, and their int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("data.name=digits needs scikit-learn (it ships the digits images): "
                          "pip install scikit-learn") from e
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False)
    x = ((x - _DIGITS_MEAN) / _DIGITS_STD).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return x, y


def _rgb(image):
    # A named function, not a lambda: DataLoader workers must be able to pickle the transform.
    return image.convert("RGB")


def build_datasets(cfg: DataConfig, seed: int) -> Splits:
    """The train and validation sets described by `cfg`, split by `seed`."""
    if cfg.name == "digits":
        x, y = digits_tensors(cfg.image_size)
        train_idx, val_idx = _split(len(y), cfg.val_fraction, seed, cfg.limit)
        return Splits(TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx]),
                      10, [str(i) for i in range(10)])
    if cfg.name == "imagefolder":
        from torchvision import datasets, transforms

        tf = transforms.Compose([
            transforms.Lambda(_rgb),
            transforms.Resize((cfg.image_size, cfg.image_size)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])
        try:
            full = datasets.ImageFolder(cfg.root, transform=tf)
        except FileNotFoundError as e:
            raise ConfigError(f"data.root={cfg.root!r}: {e}; expected one subfolder per class "
                              f"holding images") from e
        train_idx, val_idx = _split(len(full), cfg.val_fraction, seed, cfg.limit)
        return Splits(Subset(full, train_idx), Subset(full, val_idx), len(full.classes), list(full.classes))
    raise ConfigError(f"data.name={cfg.name!r}; use digits or imagefolder")
