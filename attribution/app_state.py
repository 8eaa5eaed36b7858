"""Helpers behind the app's pages that need no streamlit: run discovery, upload validation,
gallery tables, method comparison and exports. Kept here so they are unit-testable."""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from attribution.errors import UserError

if TYPE_CHECKING:
    import pandas

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_UPLOAD_SIDE = 2048
UPLOAD_TYPES = ("png", "jpg", "jpeg", "bmp", "webp")
_MODE_CHANNELS = {"L": 1, "RGB": 3}

# Sign convention (method.md §2), shown as the galleries' legend.
SIGN_LEGEND = ("τ > 0: removing the training image is predicted to increase the measurement "
               "(for the loss: it helped generate the query) · τ < 0: removing it lowers the "
               "measurement · neutral: |τ| smallest")


# ----------------------------------------------------------------------------- runs


def available_runs(root: Optional[Path] = None) -> list[Path]:
    """Runs for the picker: ``$ATTRIBUTION_RUN`` (if set) first, then the demo run, then the runs
    under ``$ATTRIBUTION_RUNS`` (or ``./runs``)."""
    from attribution.runs import list_runs

    found: list[Path] = []
    pinned = os.environ.get("ATTRIBUTION_RUN")
    if pinned:
        found.append(Path(pinned))
    for p in list_runs(root):
        if all(p.resolve() != q.resolve() for q in found):
            found.append(p)
    return found


def run_labels(paths: list[Path]) -> list[str]:
    """Unique labels of ``paths`` for the run picker and its ``?run=`` URL value.

    A run is labelled by its folder name (``cifar2``; a folder named ``run`` as ``demo/run``). The
    URL holds the label, so two runs with the same name (a pinned copy of a shipped run, say) must
    not share one: the one that is not shipped gets its parent folder added
    (``cifar2 (/tmp/copy)``), and the shipped runs keep their short labels, which shared links use.
    """
    from attribution.runs import shipped_runs

    def short(p: Path) -> str:
        return p.name if p.name != "run" else f"{p.parent.name}/run"

    shipped = {q.resolve() for q in shipped_runs()}
    names = [short(Path(p)) for p in paths]
    # a clashing label carries the resolved parent folder, so two such labels are equal only for one path
    return [n if names.count(n) == 1 or Path(p).resolve() in shipped else f"{n} ({Path(p).resolve().parent})"
            for p, n in zip(paths, names)]


# ----------------------------------------------------------------------------- uploads


def validate_upload(data: bytes, filename: str, channels: int, resolution: int) -> Tensor:
    """An uploaded image as a query ``[1, C, H, W]`` in [-1, 1] at the run's resolution.

    Rejects (UserError, one actionable line): other file types, files over 5 MB, images larger
    than 2048 px (also a compressed "decompression bomb", e.g. a 20000x20000 PNG of a few kB,
    which PIL refuses before it reports a size), non-square images, and a channel count that
    differs from the model's.
    """
    from PIL import Image, UnidentifiedImageError

    suffix = Path(filename or "").suffix.lower().lstrip(".")
    if suffix not in UPLOAD_TYPES:
        raise UserError(f"{filename!r} is not an image file; upload one of: {', '.join(UPLOAD_TYPES)}")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UserError(f"{filename!r} is {len(data) / 2**20:.1f} MB; upload an image under 5 MB")
    too_big = f"upload an image at most {MAX_UPLOAD_SIDE} px on a side"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if max(w, h) > MAX_UPLOAD_SIDE:  # before decoding a single pixel
                raise UserError(f"{filename!r} is {w}x{h} px; {too_big}")
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)):,} pixels" if pixels else "too many pixels"
        raise UserError(f"{filename!r} is far too large ({size}); {too_big}") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise UserError(f"{filename!r} could not be read as an image; upload a valid PNG or JPEG") from None
    if w != h:
        raise UserError(f"{filename!r} is {w}x{h} px; the model takes square images, crop it to a square")
    if img.mode == "1":  # black-and-white: a greyscale image
        img = img.convert("L")
    have = _MODE_CHANNELS.get(img.mode)
    if have is None:
        hint = " (remove the alpha channel)" if "A" in img.mode else ""
        raise UserError(f"{filename!r} has pixel mode {img.mode}; upload a greyscale (L) or RGB image{hint}")
    if have != channels:
        want = "greyscale (1 channel)" if channels == 1 else "RGB (3 channels)"
        raise UserError(f"{filename!r} has {have} channel(s) but the model takes {want} images; convert it first")
    if (w, h) != (resolution, resolution):
        # area averaging when shrinking, like data._resize; bilinear when enlarging
        img = img.resize((resolution, resolution), Image.BOX if w > resolution else Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8).reshape(resolution, resolution, channels)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def save_upload(run, image: Tensor, filename: str) -> str:
    """Save an uploaded query ``[1, C, H, W]`` as its own sample set (no trajectory); its name."""
    from attribution.runs import config_hash

    name = f"upload-{config_hash(image.numpy().tobytes().hex(), 8)}"
    run.save_samples(name, image, None, {"source": "upload", "filename": str(filename)})
    return name


# ----------------------------------------------------------------------------- galleries


def gallery_rows(method: str, top: dict, dataset) -> list[dict]:
    """Flatten ``top_k``'s ``{"positive"|"negative"|"neutral": [(index, score)]}`` into rows with
    the training image's id and label."""
    rows = []
    for group in ("positive", "negative", "neutral"):
        for rank, (index, score) in enumerate(top.get(group, []), start=1):
            index = int(index)
            rows.append({"method": method, "group": group, "rank": rank, "index": index,
                         "id": dataset.ids[index], "label": dataset.label_name(int(dataset.labels[index])),
                         "score": float(score)})
    return rows


def top_k_simple(scores_row: Tensor, k: int) -> dict:
    """Top positive / negative / neutral of a score row ``[N]`` (for baselines, whose scores are
    similarities: "negative" = least similar)."""
    s = scores_row.detach().double().cpu()
    k = max(1, min(int(k), s.numel()))
    pos = torch.argsort(s, descending=True)[:k]
    neg = torch.argsort(s)[:k]
    neu = torch.argsort(s.abs())[:k]
    return {g: [(int(i), float(s[i])) for i in idx] for g, idx in (("positive", pos), ("negative", neg), ("neutral", neu))}


def scores_table(scores_row: Tensor, dataset) -> "pandas.DataFrame":
    """All training examples with their score (``scores_row``: ``[N]``), highest first."""
    import pandas as pd

    s = scores_row.detach().double().cpu().numpy()
    df = pd.DataFrame({"index": np.arange(len(s)), "id": dataset.ids,
                       "label": [dataset.label_name(int(l)) for l in dataset.labels], "score": s})
    return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)


def export_json(settings: dict, rows: list[dict], extra: Optional[dict] = None) -> str:
    """Galleries (rows) and the settings that produced them as one JSON document."""
    return json.dumps({"settings": settings, "rows": rows, **(extra or {})}, indent=2, default=str)


def export_csv(rows: list[dict], settings: dict) -> str:
    """Rows as CSV, the settings in a leading ``# settings: {...}`` comment line."""
    import pandas as pd

    return f"# settings: {json.dumps(settings, sort_keys=True, default=str)}\n" + pd.DataFrame(rows).to_csv(index=False)


# ----------------------------------------------------------------------------- comparison


def top_k_overlap(a: Tensor, b: Tensor, k: int) -> float:
    """|top-k(a) ∩ top-k(b)| / k for score rows ``[N]``."""
    k = max(1, min(int(k), a.numel()))
    ia = set(torch.argsort(a.double(), descending=True)[:k].tolist())
    ib = set(torch.argsort(b.double(), descending=True)[:k].tolist())
    return len(ia & ib) / k


def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman correlation of two score rows ``[N]`` (NaN if either is constant)."""
    from scipy.stats import spearmanr

    a_, b_ = a.double().cpu().numpy(), b.double().cpu().numpy()
    if np.ptp(a_) == 0 or np.ptp(b_) == 0:
        return float("nan")
    return float(spearmanr(a_, b_).statistic)


def comparison_matrices(scores: dict[str, Tensor], k: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean top-k overlap and mean Spearman between methods over queries.

    ``scores``: method -> ``[Q, N]`` (same queries, same order). Returns (names, overlap [M, M],
    spearman [M, M]).
    """
    names = list(scores)
    m = len(names)
    overlap, corr = np.zeros((m, m)), np.zeros((m, m))
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            sa, sb = scores[a], scores[b]
            if sa.shape != sb.shape:
                raise UserError(f"{a} and {b} scored different queries or training sets ({tuple(sa.shape)} vs {tuple(sb.shape)})")
            overlap[i, j] = np.mean([top_k_overlap(sa[q], sb[q], k) for q in range(sa.shape[0])])
            corr[i, j] = np.nanmean([rank_correlation(sa[q], sb[q]) for q in range(sa.shape[0])])
    return names, overlap, corr


def log_damping_options(lo: int = -12, hi: int = 2) -> list[float]:
    """Damping values 10^lo … 10^hi in half-decades, for a log slider."""
    return [float(f"{10 ** (e / 2):.3g}") for e in range(2 * lo, 2 * hi + 1)]


def rank_of(scores_row: Tensor, index: int) -> int:
    """1-based rank of training example ``index`` in a score row ``[N]`` (highest = 1)."""
    order = torch.argsort(scores_row.double(), descending=True)
    return int((order == int(index)).nonzero()[0, 0]) + 1


def images_uint8(images: Tensor) -> np.ndarray:
    """``[n, C, H, W]`` in [-1, 1] -> uint8 ``[n, H, W, C]`` (grey squeezed to ``[n, H, W]``)."""
    from attribution.data import to_uint8

    out = to_uint8(images)
    return out[..., 0] if out.shape[-1] == 1 else out


def sequence_str(values: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in values)


# ----------------------------------------------------------------------------- LDS page


def readable_method(name: str) -> str:
    """A short label for a method name as the benchmarks store it.

    ``"K-FAC mc expand (1e-8)"`` -> ``"K-FAC (damping 1e-8)"``, ``"EK-FAC empirical reduce (1e-4)"`` ->
    ``"EK-FAC, empirical Fisher, reduce (damping 1e-4)"``, ``"D-TRAK (best, rel 1)"`` -> ``"D-TRAK (best damping)"``;
    other names are returned as they are.
    """
    m = re.fullmatch(r"(K-FAC|EK-FAC) (mc|empirical) (expand|reduce)(?: \(([^)]+)\))?", name.strip())
    if m:
        parts = [m.group(1)] + (["empirical Fisher"] if m.group(2) == "empirical" else []) \
            + (["reduce"] if m.group(3) == "reduce" else [])
        return ", ".join(parts) + (f" (damping {m.group(4)})" if m.group(4) else "")
    m = re.fullmatch(r"(.+?) \(best, rel [^)]+\)", name.strip())
    if m:
        return f"{m.group(1)} (best damping)"
    return {"random": "random (control)"}.get(name, name)


def method_note(name: str) -> Optional[str]:
    """What a short label leaves out, for a caption: ``"D-TRAK (best damping): …"``."""
    m = re.fullmatch(r"(.+?) \(best, rel ([^)]+)\)", name.strip())
    if m:
        return (f"{readable_method(name)}: the damping with the best LDS in the benchmark's sweep, "
                f"λ = {m.group(2)} × the mean eigenvalue of its projected Gram matrix")
    return None


def lds_command(run_path, meta: dict, run_train: Optional[dict] = None) -> str:
    """The ``attribution lds`` command that built a stored ground truth (its metadata ``meta``).

    Options at their CLI default are left out; ``run_train``: the run's training recipe, to tell
    whether the warm-up differs from the run's own.
    """
    parts = [f"attribution lds --run {run_path}", f"--subsets {meta.get('num_subsets', 32)}",
             f"--seeds {meta.get('num_seeds', 2)}"]
    if float(meta.get("alpha", 0.5)) != 0.5:
        parts.append(f"--alpha {meta['alpha']:g}")
    if int(meta.get("subset_seed", 0)) != 0:
        parts.append(f"--subset-seed {meta['subset_seed']}")
    if meta.get("steps_rule") == "explicit" and meta.get("steps") is not None:
        parts.append(f"--steps {meta['steps']}")
    run_warmup = (run_train or {}).get("warmup_steps")
    if meta.get("warmup_steps") is not None and meta.get("warmup_steps") != run_warmup:
        parts.append(f"--warmup-steps {meta['warmup_steps']}")
    if meta.get("query_set", "queries") != "queries":
        parts.append(f"--query-set {meta['query_set']}")
    parts.append(f"--draws {meta.get('num_draws', 1000)}")
    if int(meta.get("measure_seed", 0)) != 0:
        parts.append(f"--measure-seed {meta['measure_seed']}")
    if meta.get("measurement"):
        parts.append(f"--measurements {meta['measurement']}")
    if not meta.get("paired_seeds", False):
        parts.append("--independent-seeds")
    return " ".join(parts)


def heat_range(matrix, diagonal: bool = False) -> tuple[float, float]:
    """Colour range ``(lo, hi)`` spanning a square matrix's off-diagonal values (``diagonal``: all),
    so that a correlation matrix whose entries all lie in 0.99…1 still shows its variation."""
    a = np.asarray(matrix, dtype=np.float64)
    vals = a[~np.eye(a.shape[0], dtype=bool)] if (a.ndim == 2 and a.shape[0] == a.shape[1] and not diagonal
                                                   and a.shape[0] > 1) else a.ravel()
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo < 1e-12:
        pad = max(abs(hi) * 1e-3, 1e-6)
        lo, hi = lo - pad, hi + pad
    return lo, hi
