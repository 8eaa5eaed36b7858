"""DDPM training: AdamW, EMA, optional flips, subset mask, seeded, checkpointed and resumable.

All randomness (batch order, timesteps, noise, flips) comes from one ``torch.Generator`` whose
state is checkpointed, so an interrupted-then-resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from attribution.data import DatasetSpec, load_dataset
from attribution.ddpm import build_unet, default_device, draw_t_eps, linear_schedule, q_sample, predict_eps
from attribution.errors import UserError
from attribution.runs import Run, read_json, write_json

STATE_FILE = "train_state/state.pt"


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float = 0.999  # with diffusers' warm-up min(decay, (1+step)/(10+step))
    warmup_steps: int = 100  # linear learning-rate warm-up
    hflip: bool = False  # random horizontal flips (off for digits)
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 10

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        from attribution.ddpm import PRESETS

        if self.preset not in PRESETS:
            raise UserError(f"unknown model preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.lr <= 0:
            raise UserError(f"lr must be positive, got {self.lr}")


ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, recent_loss)


def _ema(unet, decay: float):
    # diffusers' EMAModel: the standard EMA with warm-up, and a state_dict we can checkpoint.
    from diffusers.training_utils import EMAModel

    return EMAModel(unet.parameters(), decay=decay, use_ema_warmup=False)


def run_config(spec: DatasetSpec, cfg: TrainConfig, subset: Optional[Sequence[int]], image_size: int, channels: int) -> dict:
    return {
        "dataset": spec.to_dict(),
        "train": asdict(cfg),
        "subset": None if subset is None else [int(i) for i in subset],
        "schedule": {"T": 1000, "beta_start": 1e-4, "beta_end": 0.02},
        "image_size": image_size,
        "channels": channels,
    }


def train_run(
    run_dir: Path,
    spec: DatasetSpec,
    cfg: TrainConfig,
    subset: Optional[Sequence[int]] = None,
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
    device: Optional[torch.device] = None,
) -> Run:
    """Train (or resume training) the DDPM of ``run_dir``.

    ``subset``: indices into the dataset to train on (LDS retraining); None = all.
    ``should_stop()``: polled every step; when it returns True a checkpoint is written and the
    function returns early (call again to resume).
    """
    run_dir = Path(run_dir)
    data = load_dataset(spec)
    images = data.tensors()  # [N, C, H, W]
    if subset is not None:
        subset = sorted(int(i) for i in subset)
        if not subset or min(subset) < 0 or max(subset) >= len(images):
            raise UserError(f"subset indices must lie in 0..{len(images) - 1}")
        images = images[subset]
    config = run_config(spec, cfg, subset, data.resolution, data.channels)
    if (run_dir / "config.json").exists():
        if read_json(run_dir / "config.json") != config:
            raise UserError(
                f"{run_dir} already holds a run with a different configuration; "
                "choose another --out directory"
            )
    else:
        write_json(run_dir / "config.json", config)
    run = Run(run_dir)
    device = device or default_device()
    fit(run, images.to(device), cfg, progress=progress, should_stop=should_stop)
    return run


def fit(
    run: Run,
    images: torch.Tensor,
    cfg: TrainConfig,
    progress: Optional[ProgressFn] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> bool:
    """The training loop on ``images`` ``[N, C, H, W]``. Returns True when all steps are done."""
    device = images.device
    schedule = linear_schedule()
    n, c, h, _ = images.shape
    unet = build_unet(cfg.preset, h, c, seed=cfg.seed).to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    ema = _ema(unet, cfg.ema_decay)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    step, curve = 0, []

    state_path = run.path / STATE_FILE
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
        except Exception as exc:
            raise UserError(f"{state_path} is corrupt ({exc}); delete it to restart training") from None
        unet.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_schedule"])
        ema.load_state_dict(state["ema"])
        gen.set_state(state["generator"])
        step, curve = int(state["step"]), run.loss_curve()
        curve = [row for row in curve if row["step"] <= step]

    def checkpoint(final: bool) -> None:
        state = {
            "model": unet.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_schedule": sched.state_dict(),
            "ema": ema.state_dict(),
            "generator": gen.get_state(),
            "step": step,
        }
        tmp = state_path.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        write_json(run.path / "loss_curve.json", curve)
        tmp.replace(state_path)
        if final:
            save_ema_model(run, unet, ema)

    recent, t_start = [], time.time()
    while step < cfg.steps:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x0 = images[idx.to(device)]
        if cfg.hflip:
            flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
            x0 = torch.where(flip.to(device).view(-1, 1, 1, 1), x0.flip(-1), x0)
        t, eps = draw_t_eps(cfg.batch_size, tuple(x0.shape[1:]), schedule.T, gen, device)
        loss = (predict_eps(unet, q_sample(schedule, x0, t, eps), t) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        step += 1
        recent.append(loss.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            curve.append({"step": step, "loss": sum(recent) / len(recent), "time_s": time.time() - t_start})
            recent = []
        if progress is not None:
            progress(step, cfg.steps, loss.item())
        if step == cfg.steps:
            break
        if step % cfg.checkpoint_every == 0:
            checkpoint(final=False)
        if should_stop is not None and should_stop():
            checkpoint(final=False)
            return False
    checkpoint(final=True)
    return True


def save_ema_model(run: Run, unet, ema) -> None:
    """Write the EMA weights in diffusers format to ``run/model`` (atomically, via a temp dir)."""
    import shutil

    model = build_unet_like(unet)
    ema.copy_to(model.parameters())
    tmp = run.path / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    old = run.path / ".model.old"
    shutil.rmtree(old, ignore_errors=True)
    if run.model_dir.exists():
        run.model_dir.rename(old)
    tmp.rename(run.model_dir)
    shutil.rmtree(old, ignore_errors=True)


def build_unet_like(unet):
    from diffusers import UNet2DModel

    model = UNet2DModel.from_config(unet.config)
    model.load_state_dict(unet.state_dict())
    return model.to("cpu")


def is_trained(run_dir: Path) -> bool:
    return Run(run_dir).has_model()
