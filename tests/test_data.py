"""Every dataset loader, including CIFAR-10 on a fake CIFAR-format folder, and bad input."""

import pickle

import numpy as np
import pytest

from attribution.data import DatasetSpec, load_dataset, to_model_space, to_uint8
from attribution.errors import UserError


def test_embedded_mnist_default():
    d = load_dataset(DatasetSpec())
    assert d.images.shape == (5000, 28, 28, 1) and d.images.dtype == np.uint8
    assert set(np.unique(d.labels)) == set(range(10))
    assert len(set(d.ids)) == 5000  # ids unique and stable
    assert d.images.max() > 200  # real digits, not blank


def test_limit_is_balanced_deterministic_and_resized():
    spec = DatasetSpec(limit=100, resolution=16, seed=3)
    a, b = load_dataset(spec), load_dataset(spec)
    assert a.images.shape == (100, 16, 16, 1)
    assert np.bincount(a.labels).tolist() == [10] * 10
    assert a.ids == b.ids and np.array_equal(a.images, b.images)
    c = load_dataset(DatasetSpec(limit=100, resolution=16, seed=4))
    assert c.ids != a.ids
    # a limit draw is a subset of the full set's ids
    assert set(a.ids) <= set(load_dataset(DatasetSpec()).ids)


def test_class_filter_and_channels():
    d = load_dataset(DatasetSpec(classes=(3, 8), limit=20, channels=3))
    assert set(np.unique(d.labels)) == {3, 8}
    assert d.images.shape[-1] == 3
    assert np.array_equal(d.images[..., 0], d.images[..., 2])  # grey upsampled to RGB


def test_model_space_roundtrip():
    imgs = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
    x = to_model_space(imgs)
    assert x.shape == (4, 3, 5, 5) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), imgs)


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, images=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), labels=np.arange(6) % 2)
    d = load_dataset(DatasetSpec(source="npz", path=str(path), classes=(1,)))
    assert d.images.shape == (3, 8, 8, 3) and d.labels.tolist() == [1, 1, 1]


def test_shared_cifar_npz(shared_cifar):
    d = load_dataset(DatasetSpec(source="npz", path=str(shared_cifar), classes=(1, 7)))
    assert d.images.shape == (1058, 32, 32, 3)
    assert d.label_name(7) == "horse"


def test_folder_loader(tmp_path):
    from PIL import Image

    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((10, 10, 3), 40 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "cats" / "notes.txt").write_text("ignored")
    d = load_dataset(DatasetSpec(source="folder", path=str(tmp_path), resolution=8))
    assert d.images.shape == (4, 8, 8, 3)
    assert d.class_names == ["cats", "dogs"] and d.labels.tolist() == [0, 0, 1, 1]


def _write_fake_cifar(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(20)]
        data = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": ["c"] * 10}, fh)


def test_cifar_loaders_on_fake_folder(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    _write_fake_cifar(tmp_path)
    # real copies pass torchvision's md5 checks; the fake one cannot
    monkeypatch.setattr(cifar, "check_integrity", lambda *a, **k: True)
    d = load_dataset(DatasetSpec(source="cifar10", path=str(tmp_path)))
    assert d.images.shape == (100, 32, 32, 3)
    two = load_dataset(DatasetSpec(source="cifar2", path=str(tmp_path)))
    assert set(np.unique(two.labels)) == {1, 7} and len(two) == 20


def test_cifar_offline_without_copy_fails_fast(tmp_path, monkeypatch):
    import socket

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(UserError, match="could not be downloaded"):
        load_dataset(DatasetSpec(source="cifar10", path=str(tmp_path / "none")))


@pytest.mark.parametrize(
    "spec, match",
    [
        (DatasetSpec(source="npz", path="/nonexistent.npz"), "no npz file"),
        (DatasetSpec(source="folder", path="/nonexistent"), "no image folder"),
        (DatasetSpec(source="imagenet"), "unknown dataset source"),
        (DatasetSpec(classes=(42,)), "no images with labels"),
        (DatasetSpec(limit=0), "limit must be positive"),
        (DatasetSpec(channels=2), "channels must be 1 or 3"),
    ],
)
def test_bad_input_gives_user_error(spec, match):
    with pytest.raises(UserError, match=match):
        load_dataset(spec)


def test_corrupt_and_wrong_npz(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="not a readable npz"):
        load_dataset(DatasetSpec(source="npz", path=str(bad)))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 4, 4, 2), dtype=np.uint8))
    with pytest.raises(UserError, match="1 or 3 channels"):
        load_dataset(DatasetSpec(source="npz", path=str(wrong)))
    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((2, 4, 4, 3), dtype=np.float32))
    with pytest.raises(UserError, match="uint8"):
        load_dataset(DatasetSpec(source="npz", path=str(floats)))
