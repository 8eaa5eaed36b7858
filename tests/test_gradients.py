"""Per-example gradients (hook-based batching == plain autograd) and the gradient store."""

from __future__ import annotations

import pytest
import torch

from attribution.ddpm import build_unet, linear_schedule
from attribution.errors import UserError
from attribution.gradients import (
    kfac_parameters,
    per_example_gradients,
    reference_per_example_gradients,
)
from attribution.measurements import Measurement, measurement_values, parse_measurement


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    unet = build_unet("micro", 8, 1).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    traj = torch.randn(1001, 3, 1, 8, 8, dtype=torch.float64)
    return unet, x, traj


def test_kfac_parameters_are_linear_and_conv_only(small):
    unet, _, _ = small
    params = kfac_parameters(unet)
    ids = {id(p) for p in params}
    covered = sum(p.numel() for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
                  for p in m.parameters(recurse=False))
    assert sum(p.numel() for p in params) == covered
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(id(m.weight) not in ids for m in norms)
    assert [id(p) for p in kfac_parameters(unet)] == [id(p) for p in params]  # fixed order


@pytest.mark.parametrize("name", ["loss", "lt:3", "elbo", "elbo-simple", "trajectory", "square-norm"])
@pytest.mark.parametrize("rows", [256, 16, 3])
def test_batched_gradients_equal_plain_autograd(small, name, rows):
    """rows=256: all examples in one batch; 16: 2 examples per batch; 3: one example split."""
    unet, x, traj = small
    s = linear_schedule()
    m = parse_measurement(name)
    got = per_example_gradients(unet, s, x, m, 8, seed=1, trajectory=traj, rows_per_batch=rows)
    ref = reference_per_example_gradients(unet, s, x, m, 8, seed=1, trajectory=traj)
    assert got.shape == (3, sum(p.numel() for p in kfac_parameters(unet)))
    scale = ref.abs().max()
    assert scale > 0
    assert (got - ref).abs().max() <= 1e-10 * scale


def test_gradient_matches_finite_difference_of_values(small):
    """The gradient is that of measurement_values (same draws): directional finite difference."""
    unet, x, _ = small
    s = linear_schedule()
    m = Measurement("elbo")
    g = per_example_gradients(unet, s, x, m, 6, seed=2)
    params = kfac_parameters(unet)
    v = torch.randn(g.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = 1e-6

    def shifted(sign):
        with torch.no_grad():
            off = 0
            for p in params:
                p.add_(sign * h * v[off:off + p.numel()].view_as(p))
                off += p.numel()
        return measurement_values(unet, s, x, m, 6, seed=2)

    plus = shifted(+1)
    minus = shifted(-2)
    shifted(+1)
    fd = (plus - minus) / (2 * h)
    torch.testing.assert_close(g @ v, fd, rtol=1e-5, atol=1e-6)


def test_fixed_timesteps_and_dtype():
    unet = build_unet("micro", 8, 1)
    s = linear_schedule()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    g = per_example_gradients(unet, s, x, Measurement("square-norm"), 4, seed=0, timesteps=[100, 900])
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    with pytest.raises(UserError, match="multiple"):
        per_example_gradients(unet, s, x, Measurement("square-norm"), 3, seed=0, timesteps=[100, 900])
    with pytest.raises(UserError):
        per_example_gradients(unet, s, x, Measurement("elbo"), 4, seed=0, timesteps=[100, 900])
    # offset keys the draws by global index: a slice agrees with the full computation
    full = per_example_gradients(unet, s, x, Measurement("loss"), 4, seed=0)
    part = per_example_gradients(unet, s, x[1:], Measurement("loss"), 4, seed=0, offset=1)
    torch.testing.assert_close(full[1:], part, rtol=1e-4, atol=1e-6)


def test_training_gradients_of_a_dropout_model_use_train_mode_reproducibly():
    """Presets with dropout (ho-cifar10) take training gradients in train() mode, as the official
    code does: dropout changes them, the same seed gives the same masks, and a model without
    dropout is unaffected by the mode."""
    from diffusers import UNet2DModel

    from attribution.ddpm import PRESETS, build_unet, linear_schedule
    from attribution.gradients import has_dropout, per_example_gradients
    from attribution.measurements import DrawOptions, Measurement

    torch.manual_seed(0)
    drop = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, dropout=0.5, **PRESETS["micro"]).double().eval()
    plain = build_unet("micro", 8, 1).double()
    assert has_dropout(drop) and not has_dropout(plain) and has_dropout(
        UNet2DModel(sample_size=32, in_channels=3, out_channels=3, **PRESETS["ho-cifar10"]))
    s = linear_schedule()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    m = Measurement("loss")
    on = DrawOptions(train_mode=True)
    a = per_example_gradients(drop, s, x, m, 4, 0, options=on)
    b = per_example_gradients(drop, s, x, m, 4, 0, options=on)
    ev = per_example_gradients(drop, s, x, m, 4, 0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - ev).abs().max() > 1e-3 * ev.abs().max()
    assert not drop.training  # the mode is restored
    torch.testing.assert_close(per_example_gradients(plain, s, x, m, 4, 0, options=on),
                               per_example_gradients(plain, s, x, m, 4, 0), rtol=1e-10, atol=1e-12)
