"""Counterfactual regeneration: the same sampling noise through another model (method.md §1, §7).

A query drawn by :func:`attribution.ddpm.sample` with its trajectory x_T..x_0 fixes its noise:
every ancestral step is ``x_{t-1} = mu_theta(x_t, t) + sigma_t z_t``, so the scaled noise

    n_t = sigma_t z_t = x_{t-1} - mu_theta(x_t, t)

is recovered exactly from the trajectory and the model that drew it (``sigma_0 = 0``: the last
step adds no noise, ``n_0 = 0``). A model retrained without some training images then
regenerates "the same" sample from the same x_T with the same ``n_t`` at every step; with the
original model this reproduces the query to float rounding.

Trajectory convention (ddpm.py): ``trajectory[s]`` is the state after ``s`` steps, the step
``s -> s+1`` uses timestep index ``t = T - 1 - s``. Images are in [-1, 1], ``[n, C, H, W]``.
The job that retrains and regenerates lives in :mod:`attribution.regen_job`.
"""

from __future__ import annotations

from enum import Enum
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from attribution.ddpm import Schedule, posterior_mean, predict_eps
from attribution.errors import UserError


class RemovalMethod(str, Enum):
    """How the k removed training images are chosen (CLI ``--methods``, app, job args)."""

    KFAC = "kfac"
    EKFAC = "ekfac"
    TRAK = "trak"
    DTRAK = "dtrak"
    PIXEL = "pixel"
    RANDOM = "random"

    @property
    def label(self) -> str:
        return {"kfac": "K-FAC", "ekfac": "EK-FAC", "trak": "TRAK", "dtrak": "D-TRAK",
                "pixel": "pixel cosine", "random": "random"}[self.value]

    @classmethod
    def parse(cls, text: str) -> "RemovalMethod":
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise UserError(f"unknown removal method {text!r}; choose from "
                            f"{', '.join(m.value for m in cls)}") from None


def _check_trajectory(trajectory: Tensor, T: int) -> None:
    if trajectory.dim() != 5 or trajectory.shape[0] != T + 1:
        raise UserError(f"a trajectory must be [T+1={T + 1}, n, C, H, W], got {tuple(trajectory.shape)}")


def _model_device_dtype(unet) -> tuple[torch.device, torch.dtype]:
    p = next(unet.parameters())
    return p.device, p.dtype


@torch.no_grad()
def recover_noise(unet, schedule: Schedule, trajectory: Tensor, batch_size: int = 64,
                  progress: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """The scaled noise ``n[s] = sigma_t z_t`` of every step: ``[T, n, C, H, W]`` float32 (CPU).

    ``trajectory``: ``[T+1, n, C, H, W]`` drawn with ``unet`` (the model that drew it).
    Steps where ``sigma_t = 0`` (the last one) get exactly zero.
    """
    T = schedule.T
    _check_trajectory(trajectory, T)
    device, dtype = _model_device_dtype(unet)
    sigma = schedule.sigma2.sqrt()
    was_training = unet.training
    unet.eval()
    out = torch.empty(trajectory.shape[0] - 1, *trajectory.shape[1:], dtype=torch.float32)
    n = trajectory.shape[1]
    try:
        for s in range(T):
            t_idx = T - 1 - s
            for start in range(0, n, batch_size):
                sl = slice(start, min(n, start + batch_size))
                x = trajectory[s, sl].to(device=device, dtype=dtype)
                t = torch.full((x.shape[0],), t_idx, dtype=torch.long, device=device)
                mu = posterior_mean(schedule, x, t, predict_eps(unet, x, t))
                diff = trajectory[s + 1, sl].to(device=device, dtype=dtype) - mu
                out[s, sl] = (diff if float(sigma[t_idx]) > 0 else torch.zeros_like(diff)).float().cpu()
            if progress is not None:
                progress(s + 1, T)
    finally:
        unet.train(was_training)
    return out


@torch.no_grad()
def regenerate(unet, schedule: Schedule, x_T: Tensor, noise: Tensor,
               progress: Optional[Callable[[int, int], None]] = None) -> Tensor:
    """Ancestral sampling from ``x_T`` ``[n, C, H, W]`` with fixed scaled noise ``[T, n, C, H, W]``.

    Returns x_0 clamped to [-1, 1] (as ``ddpm.sample`` returns its images), ``[n, C, H, W]`` on CPU.
    """
    T = schedule.T
    if noise.dim() != 5 or noise.shape[0] != T or noise.shape[1:] != x_T.shape:
        raise UserError(f"noise must be [T={T}, *x_T.shape={tuple(x_T.shape)}], got {tuple(noise.shape)}")
    device, dtype = _model_device_dtype(unet)
    was_training = unet.training
    unet.eval()
    x = x_T.to(device=device, dtype=dtype)
    try:
        for s in range(T):
            t = torch.full((x.shape[0],), T - 1 - s, dtype=torch.long, device=device)
            x = posterior_mean(schedule, x, t, predict_eps(unet, x, t)) + noise[s].to(device=device, dtype=dtype)
            if progress is not None:
                progress(s + 1, T)
    finally:
        unet.train(was_training)
    return x.clamp(-1, 1).float().cpu()


def image_distances(a: Tensor, b: Tensor) -> dict[str, Tensor]:
    """Per-image distances of ``a`` and ``b`` ``[n, C, H, W]`` in [-1, 1]: ``{"l2", "ssim"}``, ``[n]`` float64.

    l2: Euclidean distance over the C*H*W values (the [-1, 1] scale). ssim: scikit-image's
    structural similarity (1 = identical; data range 2), the largest odd window up to 7 that fits.
    """
    from skimage.metrics import structural_similarity

    if a.shape != b.shape or a.dim() != 4:
        raise UserError(f"images to compare must have the same [n, C, H, W] shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    l2 = (a64 - b64).flatten(1).norm(dim=1)
    side = min(a.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    ssim = []
    for x, y in zip(a64.numpy(), b64.numpy()):
        if x.shape[0] == 1:
            ssim.append(structural_similarity(x[0], y[0], data_range=2.0, win_size=win))
        else:
            ssim.append(structural_similarity(x, y, data_range=2.0, win_size=win, channel_axis=0))
    return {"l2": l2, "ssim": torch.tensor(np.asarray(ssim, dtype=np.float64))}
