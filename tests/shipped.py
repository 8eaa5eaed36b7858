"""What git ships of a run directory (a fresh clone's copy), for tests and benchmarks that need a
shipped run without any artifact built on this machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_files(src: Path) -> list[Path]:
    """The files of ``src`` that git tracks (relative to ``src``); [] outside a git work tree."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", str(src.resolve())], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        return []
    base = src.resolve().relative_to(ROOT) if src.resolve().is_relative_to(ROOT) else None
    return [Path(p).relative_to(base) for p in out.split("\0") if p and base is not None]


def copy_shipped(src: Path, dst: Path) -> None:
    """Copy what git ships of run ``src`` to ``dst``: config, model, data, samples/queries, LDS ground
    truth, counterfactual and regeneration results, and the default K-FAC factors; no artifacts
    built here, jobs, retrained models or user-made sample sets."""
    dst.mkdir(parents=True)
    files = tracked_files(src)
    if not files:  # not a git work tree (an unpacked archive): the same selection by name
        files = [p.relative_to(src) for p in src.rglob("*") if p.is_file() and _shipped_by_name(p.relative_to(src))]
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    (dst / "samples").mkdir(exist_ok=True)


def _shipped_by_name(rel: Path) -> bool:
    top = rel.parts[0]
    if top in ("config.json", "loss_curve.json", "model", "data", "lds_truth"):
        return True
    if rel.as_posix() == "samples/queries.safetensors":
        return True
    if top == "lds" and (rel.name.startswith("report_") or rel.name.startswith("regen_")) and ".progress_" not in rel.name:
        return True
    return False
