"""Write demo/cifar2/data/train.npz: the shipped CIFAR-2 run's 400 training images (16x16 RGB).

200 automobiles + 200 horses, the class-balanced seeded draw (seed 0) of attribution.data from
../shared/data/cifar10_partial_train.npz, area-resized to 16x16; ids keep the source index.

    python demo/make_cifar2_subset.py [path/to/cifar10_partial_train.npz]
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.data import CIFAR10_CLASSES, DatasetSpec, load_dataset  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parents[2] / "shared/data/cifar10_partial_train.npz")
spec = DatasetSpec(source="npz", path=src, classes=(1, 7), limit=400, resolution=16, channels=3, seed=0)
ds = load_dataset(spec)
out = Path(__file__).resolve().parent / "cifar2" / "data" / "train.npz"
out.parent.mkdir(parents=True, exist_ok=True)
ids = np.array([f"cifar10:train:{i.split(':')[-1]}" for i in ds.ids])
np.savez_compressed(out, images=ds.images, labels=ds.labels, class_names=np.array(CIFAR10_CLASSES), ids=ids)
print(f"wrote {out}: {ds.images.shape}, labels {np.bincount(ds.labels).tolist()}")
