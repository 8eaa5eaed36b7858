"""DDPM (Ho et al. 2020): noise schedule, U-Net presets, training loss and ancestral sampling.

Conventions (see ../shared/docs/method.md §1):
- Timesteps are 0-indexed as in diffusers: index ``t`` in ``0..T-1`` is the paper's step ``t+1``.
- Images are float tensors in [-1, 1], shape ``[B, C, H, W]``.
- A sampling trajectory is ``[T+1, B, C, H, W]``: ``trajectory[0]`` is x_T (pure noise) and
  ``trajectory[s]`` is the state after ``s`` denoising steps, so ``trajectory[T]`` is x_0.
  The transition ``trajectory[s] -> trajectory[s+1]`` uses timestep index ``t = T - 1 - s``.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from attribution.errors import UserError

# ----------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Schedule:
    """Linear-beta DDPM schedule; all tensors are float64 of shape ``[T]``."""

    betas: Tensor
    alphas: Tensor
    alpha_bars: Tensor

    @property
    def T(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alpha_bars_prev(self) -> Tensor:
        """abar_{t-1} with abar_{-1} = 1, shape ``[T]``."""
        return torch.cat([torch.ones(1, dtype=self.alpha_bars.dtype), self.alpha_bars[:-1]])

    @property
    def sigma2(self) -> Tensor:
        """The "small" posterior variance (1 - abar_{t-1}) / (1 - abar_t) * beta_t, shape ``[T]``."""
        return (1 - self.alpha_bars_prev) / (1 - self.alpha_bars) * self.betas


def linear_schedule(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Ho et al.'s linear schedule (T = 1000, betas 1e-4 … 0.02)."""
    betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    alphas = 1.0 - betas
    return Schedule(betas=betas, alphas=alphas, alpha_bars=torch.cumprod(alphas, dim=0))


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] broadcast to ``like``'s rank, in ``like``'s dtype/device. t: ``[B]`` long."""
    out = values.to(like.device)[t.to(like.device)].to(like.dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.  x0, eps: ``[B, C, H, W]``; t: ``[B]``."""
    abar = _gather(schedule.alpha_bars, t, x0)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps


# ----------------------------------------------------------------------------- model

# Each preset is a diffusers UNet2DModel configuration (image size and channels come from data).
PRESETS: dict[str, dict] = {
    # For tests only: ~11K parameters at 8x8, small enough for dense exact-GGN references.
    "micro": dict(
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=2,
        attention_head_dim=4,
    ),
    # The embedded default: ~0.18M parameters, trains on 2 CPU cores in minutes at 16x16.
    "tiny": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
    ),
    # ~4.4M parameters at 32x32: a CPU-feasible CIFAR model for small experiments.
    "small": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
        attention_head_dim=32,
    ),
    # Ho et al.'s CIFAR-10 U-Net (35.7M parameters; google/ddpm-cifar10-32's configuration).
    "ho-cifar10": dict(
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        attention_head_dim=None,
        dropout=0.1,
    ),
}


_DIFFUSERS_LOCK = threading.Lock()
_UNET_CLASS = None


def unet_class():
    """diffusers' ``UNet2DModel``, imported exactly once per process behind a lock.

    diffusers resolves its names lazily (``_LazyModule.__getattr__``), and that is not thread-safe:
    two threads running ``from diffusers import UNet2DModel`` in a fresh interpreter fail with
    "cannot import name 'UNet2DModel'" (the app's sessions are threads). The first caller resolves
    every diffusers name this package uses (the U-Net, its logging, the EMA of ``train.py``) under
    the lock; afterwards they are plain module attributes and any thread may import them.
    """
    global _UNET_CLASS
    if _UNET_CLASS is None:
        with _DIFFUSERS_LOCK:
            if _UNET_CLASS is None:
                import diffusers
                import diffusers.training_utils  # noqa: F401  (train.py's EMAModel)
                from diffusers.utils import logging as diffusers_logging

                # diffusers' multi-line "install accelerate" notice would break one-line CLI output
                diffusers_logging.set_verbosity_error()
                _UNET_CLASS = diffusers.UNet2DModel
    return _UNET_CLASS


def build_unet(preset: str, image_size: int, channels: int, seed: int = 0):
    """A freshly initialised diffusers ``UNet2DModel`` for ``preset`` (seeded initialisation)."""
    UNet2DModel = unet_class()

    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if channels not in (1, 3):
        raise UserError(f"images must have 1 or 3 channels, got {channels}")
    n_down = len(PRESETS[preset]["block_out_channels"]) - 1
    if image_size % (2**n_down) != 0:
        raise UserError(
            f"preset {preset!r} needs an image size divisible by {2**n_down}, got {image_size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DModel(
            sample_size=image_size, in_channels=channels, out_channels=channels, **PRESETS[preset]
        )


def predict_eps(unet, x_t: Tensor, t: Tensor) -> Tensor:
    """eps_theta(x_t, t): ``[B, C, H, W]``."""
    return unet(x_t, t).sample


class FlatEpsNet(torch.nn.Module):
    """Wraps the U-Net as ``{"x": x_t, "t": t} -> eps`` flattened to ``[B, C*H*W]``.

    curvlinops needs a 2-d output for its MSE curvature (method.md §3).
    """

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, inputs: dict) -> Tensor:
        return predict_eps(self.unet, inputs["x"], inputs["t"]).flatten(start_dim=1)


def diffusion_loss(unet, schedule: Schedule, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Per-example l_t = ||eps - eps_theta(x_t, t)||^2 summed over pixels: ``[B]``."""
    x_t = q_sample(schedule, x0, t, eps)
    return (eps - predict_eps(unet, x_t, t)).pow(2).flatten(start_dim=1).sum(dim=1)


def draw_t_eps(
    n: int, shape: tuple[int, ...], T: int, generator: torch.Generator, device="cpu"
) -> tuple[Tensor, Tensor]:
    """Uniform timesteps ``[n]`` and standard-normal noise ``[n, *shape]`` from ``generator``."""
    t = torch.randint(0, T, (n,), generator=generator, device=generator.device).to(device)
    eps = torch.randn((n, *shape), generator=generator, device=generator.device).to(device)
    return t, eps


# ----------------------------------------------------------------------------- sampling


def posterior_mean(schedule: Schedule, x_t: Tensor, t: Tensor, eps_pred: Tensor) -> Tensor:
    """mu_theta(x_t, t) = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)."""
    beta = _gather(schedule.betas, t, x_t)
    abar = _gather(schedule.alpha_bars, t, x_t)
    alpha = _gather(schedule.alphas, t, x_t)
    return (x_t - beta / (1 - abar).sqrt() * eps_pred) / alpha.sqrt()


def ancestral_step(schedule: Schedule, x_t: Tensor, t: Tensor, eps_pred: Tensor, z: Tensor) -> Tensor:
    """One step x_t -> x_{t-1} = mu_theta + sigma_t z (sigma_t = 0 at the last step)."""
    sigma = _gather(schedule.sigma2, t, x_t).sqrt()
    return posterior_mean(schedule, x_t, t, eps_pred) + sigma * z


@dataclass
class SampleOutput:
    images: Tensor  # [n, C, H, W] in [-1, 1] (clamped)
    trajectory: Optional[Tensor]  # [T+1, n, C, H, W] float32 on CPU, or None


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def sample(
    unet,
    schedule: Schedule,
    n: int,
    generator: torch.Generator,
    return_trajectory: bool = False,
    batch_size: int = 64,
    progress: Optional[Callable[[int, int], None]] = None,
) -> SampleOutput:
    """Ancestral sampling with the "small" variance.

    All randomness comes from ``generator`` (on the model's device), drawn batch by batch, so the
    same generator state gives the same samples. ``progress(done_steps, total_steps)`` is called
    once per denoising step.
    """
    device = next(unet.parameters()).device
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    images, trajs = [], []
    total = math.ceil(n / batch_size) * schedule.T
    done = 0
    was_training = unet.training
    unet.eval()
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn((b, *shape), generator=generator, device=generator.device).to(device)
        traj = [x.cpu()] if return_trajectory else None
        for t_idx in reversed(range(schedule.T)):
            t = torch.full((b,), t_idx, dtype=torch.long, device=device)
            z = torch.randn((b, *shape), generator=generator, device=generator.device).to(device)
            x = ancestral_step(schedule, x, t, predict_eps(unet, x, t), z)
            if traj is not None:
                traj.append(x.float().cpu())
            done += 1
            if progress is not None:
                progress(done, total)
        images.append(x.clamp(-1, 1).cpu())
        if traj is not None:
            trajs.append(torch.stack(traj))
    unet.train(was_training)
    return SampleOutput(
        images=torch.cat(images), trajectory=torch.cat(trajs, dim=1) if return_trajectory else None
    )


# ----------------------------------------------------------------------------- checkpoints


def load_pretrained(path_or_id: str):
    """A diffusers-format ``UNet2DModel`` from a local directory or a Hugging Face hub id.

    Offline (or a wrong id) fails fast with a one-line :class:`UserError`.
    """
    UNet2DModel = unet_class()
    p = Path(path_or_id)
    if p.exists():
        sub = p / "unet" if (p / "unet" / "config.json").exists() else p
        if not (sub / "config.json").exists():
            raise UserError(f"{p} is not a diffusers model directory (no config.json)")
        try:
            return UNet2DModel.from_pretrained(sub)
        except Exception as exc:  # corrupt weights / wrong format
            raise UserError(f"could not load the checkpoint in {sub}: {exc}") from None
    import os

    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    try:
        return UNet2DModel.from_pretrained(path_or_id, subfolder="unet")
    except Exception:
        try:
            return UNet2DModel.from_pretrained(path_or_id)
        except Exception as exc:
            raise UserError(
                f"could not load {path_or_id!r}: not a local directory, and the hub could not "
                f"serve it ({type(exc).__name__}). Offline? Download it elsewhere and pass the "
                "local directory instead."
            ) from None
