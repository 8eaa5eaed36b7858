"""Command line: ``attribution <command> …`` (also ``python -m attribution``).

Core commands live here (train, sample, info); the influence, baseline and evaluation commands
register themselves from their own ``cli_*.py`` modules listed in ``COMMAND_MODULES``.
Every :class:`UserError` becomes a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from attribution.errors import UserError

COMMAND_MODULES = ["attribution.cli_attribute", "attribution.cli_evaluation", "attribution.cli_build",
                   "attribution.cli_regenerate"]


def _add_dataset_args(p: argparse.ArgumentParser) -> None:
    from attribution.data import SOURCES

    g = p.add_argument_group("dataset")
    g.add_argument("--dataset", default="mnist5k", choices=SOURCES,
                   help="image source: mnist5k is the embedded offline default (default: %(default)s)")
    g.add_argument("--data-path", default=None,
                   help="npz file (images uint8 NHWC, labels), image folder, or CIFAR-10 root directory")
    g.add_argument("--classes", default=None,
                   help="comma-separated labels to keep, e.g. 1,7 (CIFAR-2 = automobile, horse)")
    g.add_argument("--limit", type=int, default=None, help="keep at most this many images, class-balanced")
    g.add_argument("--resolution", type=int, default=None, help="resize images to this square size")
    g.add_argument("--channels", type=int, default=None, choices=(1, 3), help="convert to grey (1) or RGB (3)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the --limit draw (default: %(default)s)")


def _dataset_spec(args):
    from attribution.data import DatasetSpec

    classes = None
    if args.classes:
        try:
            classes = tuple(int(c) for c in args.classes.split(","))
        except ValueError:
            raise UserError(f"--classes takes comma-separated integers, got {args.classes!r}") from None
    return DatasetSpec(source=args.dataset, path=args.data_path, classes=classes, limit=args.limit,
                       resolution=args.resolution, channels=args.channels, seed=args.data_seed)


def cmd_train(args) -> int:
    from tqdm import tqdm

    from attribution.train import TrainConfig, train_run

    cfg = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      ema_decay=args.ema_decay, hflip=args.hflip, seed=args.seed,
                      checkpoint_every=args.checkpoint_every)
    bars = []

    def progress(step, total, loss):
        if not bars:  # created lazily, so an input error prints one clean line
            bars.append(tqdm(total=total, initial=step - 1, desc="train", unit="step"))
        bar = bars[0]
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        bar.refresh()

    try:
        run = train_run(Path(args.out), _dataset_spec(args), cfg, progress=progress)
    except KeyboardInterrupt:
        print("\ninterrupted; the last checkpoint is kept. Re-run the same command to resume.", file=sys.stderr)
        return 130
    finally:
        for bar in bars:
            bar.close()
    print(f"trained model in {run.model_dir}")
    return 0


def cmd_sample(args) -> int:
    import torch
    from tqdm import tqdm

    from attribution.ddpm import default_device, sample
    from attribution.runs import open_run

    if args.n <= 0:
        raise UserError(f"-n must be positive, got {args.n}")
    run = open_run(args.run)
    device = default_device()
    unet = run.load_unet(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    bar = tqdm(desc=f"sample on {device}", unit="step")

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.n)

    out = sample(unet, run.schedule(), args.n, gen, return_trajectory=args.trajectory,
                 batch_size=args.batch_size, progress=progress)
    bar.close()
    name = args.name or f"seed{args.seed}_n{args.n}"
    path = run.save_samples(name, out.images, out.trajectory,
                            {"seed": args.seed, "n": args.n, "device": str(device)})
    print(f"saved {args.n} samples{' with trajectories' if args.trajectory else ''} to {path}")
    return 0


def cmd_info(args) -> int:
    from attribution.runs import open_run

    run = open_run(args.run)
    info = {"path": str(run.path), "config": run.config, "trained": run.has_model(),
            "samples": run.sample_names()}
    if run.loss_curve():
        info["final_loss"] = run.loss_curve()[-1]
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from attribution.ddpm import PRESETS

    parser = argparse.ArgumentParser(
        prog="attribution",
        description="Data attribution for diffusion models: train DDPMs, sample, attribute, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train (or resume training) a DDPM into a run directory",
                       description="Train a DDPM. Interrupt with Ctrl-C and re-run the same command to resume.")
    _add_dataset_args(p)
    g = p.add_argument_group("model and training")
    g.add_argument("--out", required=True, help="run directory to create (or resume)")
    g.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="U-Net size: tiny (CPU, 16x16), small (CPU/GPU, 32x32), ho-cifar10 (GPU, 35.7M params)")
    g.add_argument("--steps", type=int, default=3000, help="optimizer steps (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay (default: %(default)s)")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (natural images)")
    g.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    g.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="draw samples (optionally with whole trajectories) from a run",
                       description="Ancestral sampling (GPU when present); samples are saved in RUN/samples/.")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("-n", type=int, default=16, help="number of samples (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--trajectory", action="store_true", help="keep the whole trajectory x_T..x_0")
    p.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--name", default=None, help="sample-set name (default: seed<S>_n<N>)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("info", help="print a run's configuration and contents as JSON")
    p.add_argument("--run", required=True, help="run directory")
    p.set_defaults(func=cmd_info)

    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name != mod_name:
                raise
            continue
        mod.add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
