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
    if not files:  # git is what defines "shipped" (the .gitignore rules); no second copy of them here
        raise RuntimeError(f"git tracks no files under {src}: run from a git clone of the project")
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    (dst / "samples").mkdir(exist_ok=True)

