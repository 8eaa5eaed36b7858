"""``attribution build``: a run's gradient store and (E)K-FAC factors ahead of ``attribute``,
in this process or sharded across workers (``--executor local --workers N`` or ``--executor ray``).

The artifacts land where :mod:`attribution.influence` looks for them (same artifact keys), so a
later ``attribute`` with the same settings only scores. Sharded builds equal single-process
ones (:mod:`attribution.sharding`): the store bit for bit, the factors to float64 round-off.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch

from attribution.errors import UserError

WHAT = ("store", "factors")


def _model_and_images(run):
    from attribution.influence import training_images

    return run.load_unet(torch.device("cpu")).float().eval(), training_images(run)


def store_dir(run, settings) -> Path:
    """The store directory :func:`attribution.influence.gradient_store` uses for ``settings``."""
    from attribution import influence

    return influence._store_dir(run, settings, influence._CACHE.get(run))  # noqa: SLF001 - see the report


def factors_path(run, settings) -> Path:
    """Where :func:`attribution.curvature.curvature_factors` keeps the factors for ``settings``."""
    from attribution.influence import run_hflip

    return run.artifact_dir("curvature", settings.curvature(run_hflip(run)).key()) / "factors.safetensors"


def build_store(run, settings, executor=None, num_shards: Optional[int] = None, progress=None, should_stop=None):
    """The run's training-gradient store for ``settings`` (all its rounds), as ``attribute``
    would build it; sharded over a non-inline executor. Returns the store, or None if stopped
    early (call again to resume)."""
    from attribution.influence import TRAINING_LOSS, draw_options, store_rounds_done
    from attribution.sharding import build_gradient_store_sharded
    from attribution.store import GradientStore, build_gradient_store

    d = store_dir(run, settings)
    if store_rounds_done(run, settings) >= settings.rounds:
        return GradientStore(d)
    unet, images = _model_and_images(run)
    args = (d, unet, run.schedule(), images, TRAINING_LOSS, 0, settings.seed)  # as influence.gradient_store
    kw = dict(dtype=settings.store_dtype, progress=progress, rounds=settings.rounds, round_draws=settings.round_draws,
              options=draw_options(run, settings, progress))
    if executor is None or executor.inline:
        return build_gradient_store(*args, **kw)
    return build_gradient_store_sharded(*args, executor=executor, num_shards=num_shards, should_stop=should_stop, **kw)


def build_curvature(run, settings, executor=None, num_shards: Optional[int] = None, progress=None,
                    should_stop=None) -> Optional[Path]:
    """The run's (E)K-FAC factors for ``settings``; sharded over a non-inline executor.
    Returns their path, or None if stopped early (finished shards are kept for the resume)."""
    from attribution.curvature import curvature_factors
    from attribution.influence import run_hflip
    from attribution.runs import save_tensors
    from attribution.sharding import build_factors_sharded

    cfg = settings.curvature(run_hflip(run))
    path = factors_path(run, settings)
    if path.exists():
        return path
    unet, images = _model_and_images(run)
    if executor is None or executor.inline:
        curvature_factors(run, images, cfg, progress, unet=unet)
        return path
    out = build_factors_sharded(unet, run.schedule(), images, cfg, executor, num_shards=num_shards,
                                progress=progress, workdir=path.parent / "shards", should_stop=should_stop)
    if out is None:
        return None
    tensors, meta = out
    meta["n_train"] = int(images.shape[0])
    save_tensors(path, tensors, meta)
    return path


def cmd_build(args) -> int:
    from attribution.cli_attribute import _progress, _quiet_libraries
    from attribution.cli_evaluation import executor_from_args
    from attribution.influence import InfluenceSettings
    from attribution.runs import open_run

    _quiet_libraries()
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    bad = sorted(set(what) - set(WHAT))
    if bad or not what:
        raise UserError(f"--what takes store and/or factors, got {args.what!r}")
    if args.shards is not None and args.shards < 1:
        raise UserError(f"--shards must be >= 1, got {args.shards}")
    run = open_run(args.run)
    if not run.has_model():
        raise UserError(f"run {run.path} has no trained model yet; train it first")
    settings = InfluenceSettings(method=args.method, fisher=args.fisher, kfac_type=args.kfac_type,
                                 train_draws=args.train_draws, preview_draws=args.preview_draws,
                                 draw_scheme=args.draw_scheme, factor_draws=args.factor_draws, seed=args.seed,
                                 store_dtype=args.store_dtype)
    executor = executor_from_args(args)
    progress = _progress(args.quiet)
    out = {"run": str(run.path)}
    try:
        if "store" in what:
            store = build_store(run, settings, executor, args.shards, progress)
            out["store"] = str(store.dir)
        if "factors" in what:
            out["factors"] = str(build_curvature(run, settings, executor, args.shards, progress))
        out["settings"] = settings.to_dict()
    except KeyboardInterrupt:
        print("\ninterrupted; finished chunks and shards are kept. Re-run the same command to resume.", file=sys.stderr)
        return 130
    finally:
        if executor is not None:
            executor.close()
    print(json.dumps(out, indent=2))
    return 0


def add_commands(sub) -> None:
    from attribution.cli_attribute import DEFAULTS, SCHEMES
    from attribution.cli_evaluation import add_executor_args

    p = sub.add_parser("build", help="build a run's gradient store and K-FAC factors (optionally sharded)",
                       description="Build the training-gradient store and the (E)K-FAC factors that `attribute` "
                                   "uses, ahead of time and optionally split into shards over local worker "
                                   "processes or a Ray cluster. Sharded results equal a single-process build. "
                                   "Resumable: re-run the same command after an interruption.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--what", default="store,factors", help="store and/or factors (default: %(default)s)")
    p.add_argument("--method", default="kfac", choices=("kfac", "ekfac"), help="(default: %(default)s)")
    p.add_argument("--fisher", default="mc", choices=("mc", "empirical"), help="(default: %(default)s)")
    p.add_argument("--kfac", dest="kfac_type", default="expand", choices=("expand", "reduce"),
                   help="(default: %(default)s)")
    p.add_argument("--train-draws", type=int, default=DEFAULTS["train_draws"],
                   help="(t, eps) draws per training gradient, over all rounds (default: %(default)s)")
    p.add_argument("--preview-draws", type=int, default=DEFAULTS["preview_draws"],
                   help="draws of the store's first round; rounds then double in pairs, as `attribute` "
                        "(default: %(default)s)")
    p.add_argument("--draw-scheme", default=DEFAULTS["draw_scheme"], choices=SCHEMES,
                   help="training-side draw scheme, as `attribute` (default: %(default)s)")
    p.add_argument("--factor-draws", type=int, default=DEFAULTS["factor_draws"],
                   help="(t, eps) draws per training example for the factors (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Monte-Carlo draws (default: %(default)s)")
    p.add_argument("--store-dtype", default="float16", choices=("float16", "int8"), help="(default: %(default)s)")
    p.add_argument("--shards", type=int, default=None,
                   help="number of shards (default: two per worker; the store splits at 64-row chunks)")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    add_executor_args(p)
    p.set_defaults(func=cmd_build)
