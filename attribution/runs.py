"""Run directories: one folder per trained model, holding everything derived from it.

Layout of a run directory::

    config.json            RunConfig (dataset spec, preset, training recipe, seed)
    model/                 EMA weights in diffusers format (config.json + safetensors)
    train_state/           resumable training state (raw weights, optimizer, RNG, step)
    loss_curve.json        [{"step", "loss"}, ...]
    samples/<name>.safetensors   generated images [n,C,H,W] (+ trajectory [T+1,n,C,H,W])
    artifacts/<kind>/<key>/      derived artifacts (gradient stores, factors, features, LDS)

Every write is atomic (temporary file + ``os.replace``), so an interrupted job never leaves a
half-written artifact behind. Tensors are stored with safetensors, never pickle.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from attribution.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_RUN = REPO_ROOT / "demo" / "run"  # the default run of the app's picker (MNIST digits)
# Every run folder beside it is shipped too, e.g. demo/cifar2 (CIFAR-2 at 16x16, its images inside the run).


def default_runs_root() -> Path:
    """Where new runs go: ``$ATTRIBUTION_RUNS`` or ``./runs``."""
    return Path(os.environ.get("ATTRIBUTION_RUNS", "runs"))


# ----------------------------------------------------------------------------- atomic I/O


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-able object (keys sorted)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise UserError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupt ({exc}); delete it and rebuild") from None


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict] = None) -> None:
    """Atomically write ``tensors`` (contiguous, CPU) with JSON-able ``metadata`` to safetensors."""
    from safetensors.torch import save

    data = save(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        metadata={"json": json.dumps(metadata or {}, default=str)},
    )
    atomic_write_bytes(Path(path), data)


def load_tensors(path: Path) -> tuple[dict[str, Tensor], dict]:
    """Tensors and metadata from a safetensors file; a clear error if missing or corrupt."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise UserError(f"missing artifact {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("json", "{}"))
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta
    except Exception as exc:
        raise UserError(f"{path} is corrupt or not a safetensors file ({exc}); delete it and rebuild") from None


def file_digest(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


# ----------------------------------------------------------------------------- runs


class Run:
    """A run directory. Cheap to construct; loads lazily."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- config and model
    @property
    def config(self) -> dict:
        return read_json(self.path / "config.json")

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    def has_model(self) -> bool:
        return (self.model_dir / "config.json").exists()

    def model_fingerprint(self) -> str:
        """Hash of the model weights: derived artifacts are keyed by it."""
        files = sorted(self.model_dir.glob("*.safetensors"))
        if not files:
            raise UserError(f"run {self.path} has no trained model yet (no {self.model_dir}/*.safetensors)")
        return config_hash([file_digest(f) for f in files])

    def load_unet(self, device: Optional[torch.device] = None):
        """The run's (EMA) U-Net in eval mode: a private copy (callers may move or cast it).

        Read from disk once per process and weights version (:func:`_cached_unet`), so many
        sessions or jobs asking at once share one load."""
        if not self.has_model():
            raise UserError(f"run {self.path} has no trained model yet; train it first")
        unet = copy.deepcopy(_cached_unet(self.model_dir)).eval()
        return unet.to(device) if device is not None else unet

    def schedule(self):
        from attribution.ddpm import linear_schedule

        s = self.config.get("schedule", {})
        return linear_schedule(**s) if s else linear_schedule()

    def dataset(self):
        """The training set of this run (its subset mask applied)."""
        from attribution.data import DatasetSpec, load_dataset

        return load_dataset(DatasetSpec(**self.dataset_spec()))

    def dataset_spec(self) -> dict:
        """The config's dataset spec with a relative ``path`` resolved against the run directory
        when the file is there (a derived subset shipped inside the run, e.g. demo/cifar2/data)."""
        spec = dict(self.config["dataset"])
        if spec.get("path") and not Path(spec["path"]).is_absolute() and (self.path / spec["path"]).exists():
            spec["path"] = str((self.path / spec["path"]).resolve())
        return spec

    # -- training curve
    def loss_curve(self) -> list[dict]:
        p = self.path / "loss_curve.json"
        return read_json(p) if p.exists() else []

    # -- samples
    def sample_names(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "samples").glob("*.safetensors"))

    def save_samples(self, name: str, images: Tensor, trajectory: Optional[Tensor], meta: dict) -> Path:
        tensors = {"images": images.float()}
        if trajectory is not None:
            tensors["trajectory"] = trajectory.float()
        path = self.path / "samples" / f"{name}.safetensors"
        save_tensors(path, tensors, {**meta, "model": self.model_fingerprint()})
        return path

    def load_samples(self, name: str) -> tuple[dict[str, Tensor], dict]:
        """``({"images": [n,C,H,W], "trajectory"?: [T+1,n,C,H,W]}, meta)``."""
        path = self.path / "samples" / f"{name}.safetensors"
        if not path.exists():
            have = ", ".join(self.sample_names()) or "none"
            raise UserError(f"run {self.path} has no sample set {name!r} (have: {have})")
        tensors, meta = load_tensors(path)
        if meta.get("model") not in (None, self.model_fingerprint()):
            raise UserError(
                f"sample set {name!r} was drawn from a different model than {self.path}'s; redraw it"
            )
        return tensors, meta

    # -- derived artifacts
    def artifact_dir(self, kind: str, args: dict) -> Path:
        """``artifacts/<kind>/<hash(args + model fingerprint)>/`` with ``args.json`` written."""
        full = {"kind": kind, "model": self.model_fingerprint(), **args}
        d = self.path / "artifacts" / kind / config_hash(full)
        if not (d / "args.json").exists():
            write_json(d / "args.json", full)
        elif read_json(d / "args.json") != json.loads(json.dumps(full, default=str)):
            raise UserError(f"artifact {d} was built with different arguments; delete it and rebuild")
        return d


_UNET_LOCK = threading.Lock()
_UNETS: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()  # (model dir, file stats) -> CPU U-Net
_UNETS_MAX = 8  # LDS retrains load many models; keep the most recent few


def _cached_unet(model_dir: Path):
    """The U-Net in ``model_dir``, loaded once per process and weights version, behind a lock.

    Keyed by the directory and each file's size and mtime, so retrained weights load afresh.
    Callers get copies (:meth:`Run.load_unet`); the cached instance stays on the CPU untouched."""
    from attribution.ddpm import load_pretrained

    d = Path(model_dir).resolve()
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(d.iterdir()) if f.is_file())
    key = (str(d), stats)
    with _UNET_LOCK:
        unet = _UNETS.get(key)
        if unet is None:
            unet = load_pretrained(str(d)).eval()
            _UNETS[key] = unet
            while len(_UNETS) > _UNETS_MAX:
                _UNETS.popitem(last=False)
        _UNETS.move_to_end(key)
        return unet


def open_run(path: str | Path) -> Run:
    """A run directory that exists and has a config; a clear error otherwise."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"no run directory at {p} (create one with `attribution train --out {p}`)")
    if not (p / "config.json").exists():
        raise UserError(f"{p} is not a run directory (no config.json)")
    return Run(p)


def shipped_runs() -> list[Path]:
    """The shipped runs: ``DEMO_RUN`` first, then the other run folders beside it (``demo/*``)."""
    first = [DEMO_RUN] if (DEMO_RUN / "config.json").exists() else []
    others = sorted(p for p in DEMO_RUN.parent.glob("*") if p != DEMO_RUN and (p / "config.json").exists()) \
        if DEMO_RUN.parent.is_dir() else []
    return first + others


def list_runs(root: Optional[Path] = None) -> list[Path]:
    """Run directories under ``root`` (default runs root), the shipped demo runs first."""
    found = shipped_runs()
    root = Path(root) if root is not None else default_runs_root()
    if root.is_dir():
        found += sorted(p for p in root.iterdir() if (p / "config.json").exists())
    return found
