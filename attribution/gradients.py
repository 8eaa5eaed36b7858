"""Per-example gradients of MC-averaged measurements over the K-FAC-covered parameters.

``per_example_gradients`` evaluates all draws of a group of examples as ONE batch and recovers
each example's gradient from the layer inputs and output-gradients of every Linear / Conv2d
module (grad W_b = sum over the example's draws and positions of g a^T). Why hand-written rather
than ``torch.func.vmap(grad(...))``: it needs one forward and one backward per batch of
B examples x K draws, with no per-row weight gradients materialised; vmap over diffusers'
U-Net re-runs the network per example (see bench/results/influence_cpu.md for the comparison).
``reference_per_example_gradients`` is the plain autograd loop the tests compare against.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from attribution.ddpm import Schedule
from attribution.errors import UserError
from attribution.measurements import (
    PLAIN_DRAWS,
    DrawOptions,
    Measurement,
    _check_images,
    draw_plan,
    example_generator,
    example_groups,
    example_key,
    plan_rows_terms,
)

ROWS_PER_BATCH = 256  # network evaluations per forward pass


def has_dropout(unet) -> bool:
    """Whether the network has active dropout (e.g. the ho-cifar10 preset's 0.1)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in unet.modules())


def kfac_modules(unet) -> list[torch.nn.Module]:
    """The Linear and Conv2d modules of ``unet`` in ``named_modules`` order."""
    return [m for m in unet.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def kfac_parameters(unet) -> list[torch.nn.Parameter]:
    """Weights and biases of the Linear / Conv2d modules (what K-FAC covers), in a fixed order:
    module order of ``named_modules``, weight before bias."""
    params = []
    for mod in kfac_modules(unet):
        params.append(mod.weight)
        if mod.bias is not None:
            params.append(mod.bias)
    return params


def num_parameters(params: Sequence[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _conv_per_example_weight_grads(mod: torch.nn.Conv2d, a: Tensor, g: Tensor, B: int) -> Tensor:
    """Per-example Conv2d weight gradients ``[B, *weight.shape]`` from inputs ``a`` [R, Cin, H, W]
    and output-gradients ``g`` [R, Cout, Ho, Wo], rows grouped as B equal consecutive blocks.

    One backend weight-gradient kernel per example: measured ~10x faster on CPU than unfold +
    einsum (im2col copies dominate) and ~2x faster than one grouped convolution over examples.
    """
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise UserError(f"per-example gradients support zero-padded convolutions only, not {mod}")
    k = a.shape[0] // B
    out = []
    for b in range(B):
        rows = slice(b * k, (b + 1) * k)
        out.append(torch.ops.aten.convolution_backward(
            g[rows], a[rows], mod.weight, None, list(mod.stride), list(mod.padding), list(mod.dilation),
            False, [0, 0], mod.groups, [False, True, False])[1])
    return torch.stack(out)


class _PerExampleGrads:
    """Forward hooks that record (input, output) of each hooked module for one forward pass."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.records: list[tuple[torch.nn.Module, Tensor, Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, mod, inputs, output):
        self.records.append((mod, inputs[0].detach(), output))

    def remove(self):
        for h in self.handles:
            h.remove()

    def grads(self, total: Tensor, B: int, retain_graph: bool = False,
              keep_records: bool = False) -> dict[int, Tensor]:
        """Per-example weight/bias gradients ``{id(param): [B, *param.shape]}`` of ``total``,
        whose rows are grouped as B equal consecutive blocks."""
        outs = [o for _, _, o in self.records]
        gouts = torch.autograd.grad(total, outs, allow_unused=True, retain_graph=retain_graph)
        with torch.no_grad():
            return self._per_example(gouts, B, keep_records)

    def _per_example(self, gouts, B: int, keep_records: bool) -> dict[int, Tensor]:
        res: dict[int, Tensor] = {}
        for (mod, a, _), g in zip(self.records, gouts):
            if g is None:
                continue
            if isinstance(mod, torch.nn.Linear):
                a3 = a.reshape(B, -1, a.shape[-1])
                g3 = g.reshape(B, -1, g.shape[-1])
                gw = torch.einsum("bso,bsi->boi", g3, a3)
                gb = g3.sum(1)
            else:
                gw = _conv_per_example_weight_grads(mod, a, g, B)
                gb = g.reshape(B, -1, *g.shape[1:]).sum((1, 3, 4))
            for p, v in ((mod.weight, gw), (mod.bias, gb)):
                if p is None:
                    continue
                key = id(p)
                res[key] = res[key] + v if key in res else v  # a module called twice accumulates
        if not keep_records:
            self.records = []
        return res


def _resolve_params(unet, params) -> tuple[list[torch.nn.Parameter], list[torch.nn.Module]]:
    allp = kfac_parameters(unet)
    if params is None:
        return allp, kfac_modules(unet)
    ids = {id(p) for p in allp}
    params = list(params)
    if any(id(p) not in ids for p in params):
        raise UserError("per-example gradients cover only Linear / Conv2d weights and biases")
    wanted = {id(p) for p in params}
    mods = [m for m in kfac_modules(unet) if id(m.weight) in wanted or (m.bias is not None and id(m.bias) in wanted)]
    return params, mods


def per_example_gradients(
    unet,
    schedule: Schedule,
    images: Tensor,
    m: Measurement,
    num_draws: int,
    seed: int,
    trajectory: Optional[Tensor] = None,
    timesteps: Optional[Sequence[int]] = None,
    params=None,
    offset=0,
    rows_per_batch: int = ROWS_PER_BATCH,
    options: DrawOptions = PLAIN_DRAWS,
) -> Tensor:
    """Gradient of each example's MC-averaged measurement: ``[B, P]`` in the model's dtype
    (float32 for a float32 model), P = total size of ``params`` (default :func:`kfac_parameters`),
    concatenated in ``params`` order.

    Draws as in :func:`attribution.measurements.measurement_values` (same seed = same draws, so
    ``grad measurement_values`` is exactly what is returned). ``timesteps``: D-TRAK's fixed
    timesteps, each used equally often (num_draws must be a multiple of their count).
    ``options.train_mode``: the network runs in train() mode (dropout active, the official code's
    choice for training gradients); each batch's dropout masks come from a generator keyed by
    (seed, its first example's key, round), so they are reproducible for the same chunking.
    """
    _check_images(images, unet)
    params, mods = _resolve_params(unet, params)
    dtype = params[0].dtype
    sizes = [p.numel() for p in params]
    B_all = images.shape[0]
    out = torch.empty(B_all, sum(sizes), dtype=dtype)
    K = min(num_draws, schedule.T) if m.name == "trajectory" else num_draws
    was_training = unet.training
    unet.train(bool(options.train_mode))
    hooks = _PerExampleGrads(mods)
    try:
        for group in example_groups(B_all, K, rows_per_batch):
            plan = draw_plan(schedule, images, m, num_draws, seed, group, trajectory, timesteps, offset, options)
            if options.train_mode:  # dropout masks keyed like the draws (restored below by fork_rng)
                rng = torch.random.fork_rng(devices=[])
                rng.__enter__()
                torch.manual_seed(int(example_generator(seed, example_key(offset, group[0]) + 7 * 10**9,
                                                        options.draw_round).initial_seed()))
            R = plan.x_in.shape[0]
            if len(group) > 1 or R <= rows_per_batch:
                chunks = [(slice(0, R), len(group))]
            else:  # one example with more draws than a batch: split its rows, accumulate
                chunks = [(slice(s, min(R, s + rows_per_batch)), 1) for s in range(0, R, rows_per_batch)]
            acc: dict[int, Tensor] = {}
            for rows, B in chunks:
                with torch.enable_grad():
                    total = plan_rows_terms(unet, schedule, plan, rows).sum()
                    got = hooks.grads(total, B)
                for k, v in got.items():
                    acc[k] = acc[k] + v if k in acc else v
            if options.train_mode:
                rng.__exit__(None, None, None)
            flat = [acc[id(p)].reshape(len(group), -1) if id(p) in acc
                    else torch.zeros(len(group), p.numel(), dtype=dtype) for p in params]
            out[group[0]:group[-1] + 1] = torch.cat(flat, dim=1).to(dtype).cpu()
    finally:
        hooks.remove()
        unet.train(was_training)
    return out


def reference_per_example_gradients(
    unet, schedule: Schedule, images: Tensor, m: Measurement, num_draws: int, seed: int,
    trajectory: Optional[Tensor] = None, timesteps: Optional[Sequence[int]] = None, params=None,
    offset: int = 0, options: DrawOptions = PLAIN_DRAWS,
) -> Tensor:
    """Plain autograd, one example at a time (slow; the reference for tests and benchmarks)."""
    params, _ = _resolve_params(unet, params)
    was_training = unet.training
    unet.eval()
    rows = []
    try:
        for i in range(images.shape[0]):
            plan = draw_plan(schedule, images, m, num_draws, seed, [i], trajectory, timesteps, offset, options)
            total = plan_rows_terms(unet, schedule, plan, slice(0, plan.x_in.shape[0])).sum()
            gs = torch.autograd.grad(total, params, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(gs, params)]))
    finally:
        unet.train(was_training)
    return torch.stack(rows).detach()


# The gradient store lives in attribution/store.py; these names stay importable from here.
from attribution.store import (  # noqa: E402,F401
    FP16_ROW_MAX,
    STORE_DTYPES,
    GradientStore,
    build_gradient_store,
    dequantize_rows,
    quantize_rows,
    store_nbytes,
)
