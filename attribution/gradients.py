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

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from attribution.ddpm import Schedule
from attribution.errors import UserError
from attribution.runs import read_json, write_json
from attribution.measurements import (
    Measurement,
    _check_images,
    draw_plan,
    example_groups,
    plan_rows_terms,
)

ROWS_PER_BATCH = 256  # network evaluations per forward pass


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
) -> Tensor:
    """Gradient of each example's MC-averaged measurement: ``[B, P]`` in the model's dtype
    (float32 for a float32 model), P = total size of ``params`` (default :func:`kfac_parameters`),
    concatenated in ``params`` order.

    Draws as in :func:`attribution.measurements.measurement_values` (same seed = same draws, so
    ``grad measurement_values`` is exactly what is returned). ``timesteps``: D-TRAK's fixed
    timesteps, each used equally often (num_draws must be a multiple of their count).
    """
    _check_images(images, unet)
    params, mods = _resolve_params(unet, params)
    dtype = params[0].dtype
    sizes = [p.numel() for p in params]
    B_all = images.shape[0]
    out = torch.empty(B_all, sum(sizes), dtype=dtype)
    K = min(num_draws, schedule.T) if m.name == "trajectory" else num_draws
    was_training = unet.training
    unet.eval()
    hooks = _PerExampleGrads(mods)
    try:
        for group in example_groups(B_all, K, rows_per_batch):
            plan = draw_plan(schedule, images, m, num_draws, seed, group, trajectory, timesteps, offset)
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
    offset: int = 0,
) -> Tensor:
    """Plain autograd, one example at a time (slow; the reference for tests and benchmarks)."""
    params, _ = _resolve_params(unet, params)
    was_training = unet.training
    unet.eval()
    rows = []
    try:
        for i in range(images.shape[0]):
            plan = draw_plan(schedule, images, m, num_draws, seed, [i], trajectory, timesteps, offset)
            total = plan_rows_terms(unet, schedule, plan, slice(0, plan.x_in.shape[0])).sum()
            gs = torch.autograd.grad(total, params, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(gs, params)]))
    finally:
        unet.train(was_training)
    return torch.stack(rows).detach()


# ----------------------------------------------------------------------------- gradient store

STORE_DTYPES = ("float16", "int8")
# float16 rows are scaled so that their absmax maps to 2^14: entries down to ~1e-9 of the row's
# maximum stay in float16's normal range, so one scale per row suffices (no per-tensor blocks).
FP16_ROW_MAX = 2.0**14
SCORE_ROWS, SCORE_COLS = 64, 16384  # cache-sized tiles of the store for scoring


def _block_bounds(p: int, blocks: Optional[Sequence[int]]) -> list[tuple[int, int]]:
    sizes = [p] if blocks is None else [int(b) for b in blocks]
    if sum(sizes) != p:
        raise ValueError(f"blocks sum to {sum(sizes)}, rows have {p} entries")
    starts = np.cumsum([0] + sizes)
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def quantize_rows(x: Tensor, dtype: str,
                  blocks: Optional[Sequence[int]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` ``[n, P]`` as ``(values [n, P] float16|int8, scales [n, B] float32)``:
    one absmax scale per row and block (``blocks``: sizes summing to P, e.g. the parameter
    tensors; default one block). Per-block scales matter: preconditioned query gradients span
    many orders of magnitude across layers, and one int8 scale per row zeroes most layers."""
    x = x.detach().float()
    bounds = _block_bounds(x.shape[1], blocks)
    sizes = torch.tensor([b - a for a, b in bounds])
    block_of = torch.repeat_interleave(torch.arange(len(bounds)), sizes).expand(x.shape[0], -1)
    amax = torch.zeros(x.shape[0], len(bounds)).scatter_reduce_(1, block_of, x.abs(), "amax").clamp_min(1e-30)
    if dtype == "int8":
        scale = amax / 127.0
    elif dtype == "float16":
        scale = amax / FP16_ROW_MAX
    y = x / scale.repeat_interleave(sizes, dim=1)
    q = torch.round(y).clamp_(-127, 127).to(torch.int8) if dtype == "int8" else y.to(torch.float16)
    return q.numpy(), scale.numpy().astype(np.float32)


def dequantize_rows(values: np.ndarray, scales: np.ndarray, blocks: Optional[Sequence[int]] = None) -> Tensor:
    """float32 ``[n, P]`` from stored rows and their per-block scales ``[n, B]``."""
    v = torch.from_numpy(np.array(values)).float()
    sizes = torch.tensor([b - a for a, b in _block_bounds(v.shape[1], blocks)])
    return v.mul_(torch.from_numpy(np.array(scales)).repeat_interleave(sizes, dim=1))


class GradientStore:
    """Per-example gradients on disk: ``grads.npy`` ``[N, P]`` (float16 or int8, memory-mapped),
    ``scales.npy`` ``[N, B]`` float32 (one per row and parameter tensor), ``store.json`` (settings,
    block sizes), ``progress.json`` (rows done). Read-only view."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        meta = read_json(self.dir / "store.json")
        self.n, self.p, self.dtype = int(meta["n"]), int(meta["p"]), meta["dtype"]
        self.blocks = list(meta["blocks"])
        self.meta = meta
        self.values = np.load(self.dir / "grads.npy", mmap_mode="c")  # copy-on-write: never written
        self.scales = np.load(self.dir / "scales.npy", mmap_mode="r")

    @property
    def rows_done(self) -> int:
        return int(read_json(self.dir / "progress.json")["rows_done"])

    @property
    def complete(self) -> bool:
        return self.rows_done >= self.n

    def rows(self, start: int, stop: int) -> Tensor:
        """Dequantised float32 rows ``[stop - start, P]``."""
        return dequantize_rows(self.values[start:stop], self.scales[start:stop], self.blocks)

    def score(self, queries: Tensor) -> Tensor:
        """``queries [Q, P] @ G^T``: ``[Q, N]`` in the queries' float dtype (float32 or float64).

        Streams the memory map in cache-sized tiles (SCORE_ROWS x SCORE_COLS), converting each tile
        into a reused buffer: ~2x faster than converting whole row chunks, and no dequantised copy
        of the store is ever held. Per-block scales multiply each block's partial scores.
        """
        if not self.complete:
            raise UserError(f"gradient store {self.dir} is incomplete; rebuild it to resume")
        dtype = queries.dtype if queries.dtype in (torch.float32, torch.float64) else torch.float32
        q = queries.to(dtype)
        bounds = _block_bounds(self.p, self.blocks)
        values = torch.from_numpy(self.values)
        scales = torch.from_numpy(np.array(self.scales)).to(dtype)  # [N, B]
        out = torch.zeros(q.shape[0], self.n, dtype=dtype)
        buf = torch.empty(SCORE_ROWS * SCORE_COLS, dtype=dtype)
        part = torch.empty(q.shape[0], SCORE_ROWS, dtype=dtype)
        for start in range(0, self.n, SCORE_ROWS):
            stop = min(self.n, start + SCORE_ROWS)
            r = stop - start
            acc = out[:, start:stop]
            for k, (a, b) in enumerate(bounds):
                part_k = part[:, :r].zero_()
                for c0 in range(a, b, SCORE_COLS):
                    c1 = min(b, c0 + SCORE_COLS)
                    tile = buf[: r * (c1 - c0)].view(r, c1 - c0)
                    tile.copy_(values[start:stop, c0:c1])
                    part_k.addmm_(q[:, c0:c1], tile.T)
                acc.addcmul_(part_k, scales[start:stop, k])
        return out


def store_nbytes(n: int, p: int, dtype: str) -> int:
    return n * p * (2 if dtype == "float16" else 1)


def build_gradient_store(
    directory: Path,
    unet,
    schedule: Schedule,
    images: Tensor,
    m: Measurement,
    num_draws: int,
    seed: int,
    dtype: str = "float16",
    timesteps: Optional[Sequence[int]] = None,
    chunk_size: int = 64,
    progress: Optional[Callable[[int, int, str], None]] = None,
    rows_per_batch: int = ROWS_PER_BATCH,
) -> GradientStore:
    """Build (or resume) the store of ``images``' per-example gradients in ``directory``.

    Chunks of ``chunk_size`` examples are written into the memory map, flushed, and only then
    recorded in ``progress.json`` (atomic write): an interrupted build resumes at the first
    chunk not recorded. ``progress(done_rows, total_rows, "gradient store")``.
    """
    if dtype not in STORE_DTYPES:
        raise UserError(f"unknown gradient store dtype {dtype!r}; choose {' or '.join(STORE_DTYPES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = int(images.shape[0])
    sizes = [q.numel() for q in kfac_parameters(unet)]
    p = sum(sizes)
    blocks = sizes if dtype == "int8" else [p]  # int8: one scale per row and parameter tensor
    meta = {"n": n, "p": p, "dtype": dtype, "blocks": blocks, "measurement": str(m), "draws": num_draws,
            "seed": seed,
            "timesteps": list(timesteps) if timesteps is not None else None}
    if (directory / "store.json").exists() and read_json(directory / "store.json") != meta:
        raise UserError(f"gradient store {directory} was built with other settings; delete it and rebuild")
    npdtype = np.float16 if dtype == "float16" else np.int8
    if not (directory / "progress.json").exists():
        np.lib.format.open_memmap(directory / "grads.npy", mode="w+", dtype=npdtype, shape=(n, p)).flush()
        np.lib.format.open_memmap(directory / "scales.npy", mode="w+", dtype=np.float32,
                                  shape=(n, len(blocks))).flush()
        write_json(directory / "store.json", meta)
        write_json(directory / "progress.json", {"rows_done": 0})
    done = int(read_json(directory / "progress.json")["rows_done"])
    stage = f"gradient store ({m}, {num_draws} draws)"
    if progress is not None:
        progress(done, n, stage)
    if done < n:
        values = np.load(directory / "grads.npy", mmap_mode="r+")
        scales = np.load(directory / "scales.npy", mmap_mode="r+")
        for start in range(done, n, chunk_size):
            stop = min(n, start + chunk_size)
            g = per_example_gradients(unet, schedule, images[start:stop], m, num_draws, seed,
                                      timesteps=timesteps, offset=start, rows_per_batch=rows_per_batch)
            if not torch.isfinite(g).all():
                raise UserError(f"non-finite training gradients in rows {start}..{stop - 1}; check the model")
            q, s = quantize_rows(g, dtype, blocks)
            values[start:stop] = q
            scales[start:stop] = s
            values.flush()
            scales.flush()
            write_json(directory / "progress.json", {"rows_done": stop})
            if progress is not None:
                progress(stop, n, stage)
        del values, scales
    return GradientStore(directory)
