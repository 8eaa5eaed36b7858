"""Similarity baselines (method.md §6): CLIP-embedding cosine and raw-pixel cosine.

Every public scorer returns ``scores: Tensor  # [Q, N]`` float32 for Q query images against the N
training examples of ``run.dataset()``, in dataset order.

- CLIP cosine: cosine similarity of open_clip image embeddings (default ViT-B-32, LAION-2B
  weights), with the training embeddings cached in the run (keyed by the weights' digest and the
  model fingerprint). Weights are found without waiting on the network
  (:func:`resolve_clip_weights`); offline without weights is a :class:`ClipUnavailable` error.
- Pixel cosine: cosine similarity of the flattened raw images (model-free floor).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlparse

import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.runs import Run, file_digest, load_tensors, save_tensors, write_json

Progress = Optional[Callable[[int, int, str], None]]

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b79k"
CLIP_WEIGHTS_ENV = "ATTRIBUTION_CLIP_WEIGHTS"


# ============================================================================ queries / pixels

def check_query_images(run: Run, query_images: Tensor) -> None:
    """Query images must be ``[Q, C, H, W]`` float with the training images' C, H, W."""
    if not isinstance(query_images, Tensor) or query_images.dim() != 4:
        shape = tuple(query_images.shape) if isinstance(query_images, Tensor) else type(query_images).__name__
        raise UserError(f"query images must be a [Q, C, H, W] tensor, got {shape}")
    if query_images.shape[0] == 0:
        raise UserError("no query images")
    if not query_images.is_floating_point():
        raise UserError("query images must be float in [-1, 1] (convert uint8 with data.to_model_space)")
    ds = run.dataset()
    want = (ds.channels, ds.resolution, ds.resolution)
    if tuple(query_images.shape[1:]) != want:
        raise UserError(f"query images have shape [C, H, W] = {list(query_images.shape[1:])} but the run's "
                        f"training images are {list(want)}")
    if not torch.isfinite(query_images).all():
        raise UserError("query images contain NaN or inf")


def cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarities of the rows of ``a [Q, D]`` and ``b [N, D]``: ``[Q, N]`` (float64 inside)."""
    a = torch.nn.functional.normalize(a.double().flatten(1), dim=1, eps=1e-12)
    b = torch.nn.functional.normalize(b.double().flatten(1), dim=1, eps=1e-12)
    return a @ b.T


def pixel_scores(run: Run, query_images: Tensor) -> Tensor:
    """Cosine similarity of flattened raw images in [-1, 1]: ``[Q, N]`` float32 (model-free floor)."""
    check_query_images(run, query_images)
    return cosine_matrix(query_images, run.dataset().tensors()).float()


# ============================================================================ CLIP


class ClipUnavailable(UserError):
    """CLIP weights are neither cached, nor given as a file, nor downloadable right now."""


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_offline() -> bool:
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with open_clip here
        return False


def _reachable(url: str, timeout: float = 4.0) -> bool:
    """Whether an HTTP HEAD of ``url`` answers 2xx within ``timeout`` s (DNS included).

    A bare TCP connect is not enough: sandboxes and proxies accept connections they never answer.
    """
    import urllib.request

    ok = []

    def probe():
        try:
            req = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                ok.append(200 <= resp.status < 300)
        except Exception:
            pass

    th = threading.Thread(target=probe, daemon=True)
    th.start()
    th.join(timeout + 0.5)
    return bool(ok and ok[0])


@dataclass(frozen=True)
class ClipWeights:
    """Where CLIP weights come from: a checkpoint file, or None for an untrained model."""

    path: Optional[str]
    key: str  # cache key of the embeddings (digest of the file, or "untrained-seed0")
    cfg: dict  # open_clip pretrained config (image mean/std/interpolation), may be empty


def resolve_clip_weights(model_name: str = DEFAULT_CLIP_MODEL, pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,
                         clip_weights: Optional[str] = None) -> ClipWeights:
    """Find CLIP weights without waiting on the network.

    Order: ``clip_weights`` argument, ``$ATTRIBUTION_CLIP_WEIGHTS``, ``pretrained`` as a file path,
    the Hugging Face / open_clip caches, then a download (only when the hub answers within 3 s and
    HF_HUB_OFFLINE is not set). ``pretrained=None``: untrained weights (tests).
    Raises :class:`ClipUnavailable` (within seconds) when none of these works.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise UserError(f"unknown CLIP model {model_name!r} (e.g. ViT-B-32, ViT-B-16, RN50)")
    file = clip_weights or os.environ.get(CLIP_WEIGHTS_ENV) or None
    if file is None and pretrained is not None and os.path.sep in str(pretrained):
        file = pretrained
    if file is not None:
        p = Path(file).expanduser()
        if not p.is_file():
            raise ClipUnavailable(f"CLIP weight file {p} does not exist (from "
                                  f"{'clip_weights' if clip_weights else CLIP_WEIGHTS_ENV if os.environ.get(CLIP_WEIGHTS_ENV) else 'pretrained'}); "
                                  "point it to an open_clip checkpoint (.safetensors or .bin)")
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained and os.path.sep not in str(pretrained) else {}
        return ClipWeights(str(p), "file-" + _weights_digest(p), dict(cfg or {}))
    if pretrained is None:
        return ClipWeights(None, "untrained-seed0", {})
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise UserError(f"no pretrained weights {pretrained!r} for CLIP {model_name} (known: {tags})")
    cfg = dict(cfg)
    hf = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    candidates: list[tuple[str, str]] = []
    if hf:
        repo, filename = os.path.split(hf)
        filenames = [filename] if filename else []
        filenames += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        candidates = [(repo.rstrip("/"), f) for f in dict.fromkeys(filenames)]
        from huggingface_hub import try_to_load_from_cache

        for repo_id, fn in candidates:
            hit = try_to_load_from_cache(repo_id, fn)
            if isinstance(hit, str) and Path(hit).is_file():
                return ClipWeights(hit, f"hf-{repo_id}-{Path(hit).parent.name}-{fn}", cfg)
    if url:
        local = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return ClipWeights(str(local), "file-" + _weights_digest(local), cfg)
    source = f"not in the cache of huggingface.co/{candidates[0][0]}" if candidates else f"not downloaded from {url}"
    hint = (f"Provide them: set {CLIP_WEIGHTS_ENV}=/path/to/open_clip_model.safetensors (or pass "
            f"clip_weights=...)" + (f", or run `huggingface-cli download {candidates[0][0]}` while online"
                                    if candidates else "")
            + "; or use --method pixel, which needs no weights.")
    if _hub_offline():
        raise ClipUnavailable(f"CLIP weights {model_name}/{pretrained} are {source} and HF_HUB_OFFLINE is set. {hint}")
    if candidates:
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        probe_url = f"{endpoint}/{candidates[0][0]}/resolve/main/{candidates[0][1]}"
    else:
        endpoint = probe_url = url
    if not _reachable(probe_url):
        raise ClipUnavailable(f"CLIP weights {model_name}/{pretrained} are {source} and {urlparse(endpoint).hostname} "
                              f"is unreachable (offline?). {hint}")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        path = open_clip.pretrained.download_pretrained(cfg)
    except Exception as exc:
        raise ClipUnavailable(f"downloading CLIP weights {model_name}/{pretrained} failed "
                              f"({type(exc).__name__}). {hint}") from None
    if not path or not Path(path).is_file():
        raise ClipUnavailable(f"downloading CLIP weights {model_name}/{pretrained} failed. {hint}")
    return ClipWeights(str(path), "file-" + _weights_digest(Path(path)), cfg)


_DIGESTS: dict[tuple, str] = {}


def _weights_digest(path: Path) -> str:
    """file_digest memoised on (path, size, mtime): checkpoints are hundreds of MB."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_digest(path)
    return _DIGESTS[key]


_CLIP_MODELS: dict[tuple, tuple] = {}


def load_clip(model_name: str, weights: ClipWeights, device=None):
    """``(model, preprocess)`` in eval mode; memoised per (model, weights, device).

    ``pretrained=None`` weights are a seeded (seed 0) random initialisation, so they repeat.
    """
    import open_clip

    device = torch.device(device) if device is not None else torch.device("cpu")
    key = (model_name, weights.key, str(device))
    if key not in _CLIP_MODELS:
        kw = {}
        for ours, theirs in (("image_mean", "mean"), ("image_std", "std"),
                             ("image_interpolation", "interpolation"), ("image_resize_mode", "resize_mode")):
            if weights.cfg.get(theirs) is not None:
                kw[ours] = weights.cfg[theirs]
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=weights.path, device=device, **kw)
        except Exception as exc:
            raise ClipUnavailable(f"could not load CLIP {model_name} from {weights.path}: {exc}") from None
        _CLIP_MODELS.clear()  # keep one model in memory
        _CLIP_MODELS[key] = (model.eval(), preprocess)
    return _CLIP_MODELS[key]


@torch.no_grad()
def clip_embeddings(model, preprocess, images: Tensor, batch_size: int = 64, progress: Progress = None,
                    stage: str = "clip embeddings") -> Tensor:
    """Unit-norm CLIP image embeddings ``[B, D]`` float32 of ``images`` ``[B, C, H, W]`` in [-1, 1].

    Grey images are repeated to RGB; each image goes through open_clip's own preprocessing
    (resize to the model's input size, centre crop, normalisation) as a PIL image.
    """
    from PIL import Image

    from attribution.data import to_uint8

    device = next(model.parameters()).device
    out = []
    B = images.shape[0]
    for lo in range(0, B, batch_size):
        arr = to_uint8(images[lo:lo + batch_size])
        if arr.shape[-1] == 1:
            arr = arr.repeat(3, axis=-1)
        batch = torch.stack([preprocess(Image.fromarray(a)) for a in arr]).to(device)
        emb = model.encode_image(batch).float()
        out.append(torch.nn.functional.normalize(emb, dim=-1).cpu())
        if progress is not None:
            progress(min(B, lo + batch_size), B, stage)
    return torch.cat(out)


def clip_train_embeddings(run: Run, model_name: str = DEFAULT_CLIP_MODEL,
                          pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED, *,
                          clip_weights: Optional[str] = None, weights: Optional[ClipWeights] = None,
                          device=None, progress: Progress = None) -> tuple[Tensor, Path]:
    """Cached CLIP embeddings of the run's training set ``[N, D]`` and their artifact folder.

    The cache is keyed by the CLIP weights (file digest) and, like every run artifact, by the
    run's model fingerprint.
    """
    weights = weights or resolve_clip_weights(model_name, pretrained, clip_weights)
    ds = run.dataset()
    d = run.artifact_dir("clip-embeddings", {"model_name": model_name, "weights": weights.key, "num_train": len(ds)})
    path = d / "train_embeddings.safetensors"
    if path.exists():
        emb = load_tensors(path)[0]["embeddings"]
        if emb.shape[0] == len(ds):
            return emb, d
    model, preprocess = load_clip(model_name, weights, device)
    emb = clip_embeddings(model, preprocess, ds.tensors(), progress=progress, stage="clip train embeddings")
    save_tensors(path, {"embeddings": emb}, {"model_name": model_name, "weights": weights.key})
    write_json(d / "weights.json", {"path": weights.path, "key": weights.key})
    return emb, d


def clip_scores(
    run: Run,
    query_images: Tensor,
    *,
    model_name: str = DEFAULT_CLIP_MODEL,
    pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,
    progress: Progress = None,
    clip_weights: Optional[str] = None,
    device=None,
) -> Tensor:
    """Cosine similarity of CLIP image embeddings, queries vs training set: ``[Q, N]`` float32.

    Weights: see :func:`resolve_clip_weights`; ``pretrained=None`` is an untrained model (tests).
    Raises :class:`ClipUnavailable` within seconds when offline without weights.
    """
    check_query_images(run, query_images)
    weights = resolve_clip_weights(model_name, pretrained, clip_weights)
    train, _ = clip_train_embeddings(run, model_name, weights=weights, device=device, progress=progress)
    model, preprocess = load_clip(model_name, weights, device)
    q = clip_embeddings(model, preprocess, query_images, progress=progress, stage="clip queries")
    return cosine_matrix(q, train).float()

__all__ = [
    "CLIP_WEIGHTS_ENV", "ClipUnavailable", "ClipWeights", "DEFAULT_CLIP_MODEL", "DEFAULT_CLIP_PRETRAINED",
    "check_query_images", "clip_embeddings", "clip_scores", "clip_train_embeddings", "cosine_matrix",
    "load_clip", "pixel_scores", "resolve_clip_weights",
]
