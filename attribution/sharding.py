"""Sharded gradient stores and Kronecker factors: the training examples are split into shards
that executor units (a local process pool or Ray tasks) compute; the driver merges them into
exactly what a single-process build gives.

- **Gradient store** (:mod:`attribution.store`: rounds of draws averaged into two halves).
  Each round's shards are whole 64-row chunks, computed by the same calls as the store's
  (``per_example_gradients`` with the chunk's global ``offset`` and the round's draw options);
  the driver averages them into their half and quantises exactly as the store does, so every
  file is bit-identical to a single-process build. Finished shards of the round being built are
  recorded in ``half<h>/next/shards.json``: an interrupted build resumes.
- **Kronecker factors.** Shards are runs of whole batches of :class:`curvature.TrainingRows`
  (same rows, same draws). curvlinops accumulates every factor as a sum over batches of terms
  already divided by ``num_data``; each shard gets the full data's ``num_data``, so the full
  factor is the sum of the shards' factors (:func:`merge_shard_sums`). EK-FAC: the merged K-FAC
  factors give one eigenbasis (``eigh``, as curvlinops does), and the eigenvalue correction is a
  second sharded pass over that fixed basis (curvlinops' public ``compute_eigenvalue_correction``
  on an operator loaded with the basis), merged the same way. MC Fisher: curvlinops draws the
  sampled labels from one generator seeded at the start of a pass, batch after batch; a shard
  replays the draws of the batches before it (same shapes, same generator) so its labels are
  the single pass's. This uses the operator's ``_generator`` (the one private attribute used).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from attribution.errors import UserError
from attribution.runs import load_tensors, read_json, save_tensors, write_json

Progress = Optional[Callable[[int, int, str], None]]
STORE_CHUNK = 64  # rows per chunk of build_gradient_store (its default chunk_size)


# ----------------------------------------------------------------------------- the model travels


def pack_unet(unet) -> dict:
    """A picklable copy of a diffusers U-Net: ``{"config", "state": safetensors bytes}``."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    return {"config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}, "state": save(state)}


def unpack_unet(payload: dict, device: Optional[torch.device] = None):
    """The U-Net of :func:`pack_unet` (same dtype, eval mode), on ``device``."""
    from diffusers import UNet2DModel
    from safetensors.torch import load

    unet = UNet2DModel.from_config(payload["config"])
    unet.load_state_dict(load(payload["state"]), assign=True)  # keeps the tensors' dtype (float64 too)
    return unet.eval().to(device) if device is not None else unet.eval()


def _device():
    from attribution.ddpm import default_device

    return default_device()


def split_evenly(items: Sequence, k: int) -> list[list]:
    """``items`` cut into at most ``k`` contiguous, nearly equal, non-empty runs."""
    k = max(1, min(int(k), len(items)))
    bounds = [round(i * len(items) / k) for i in range(k + 1)]
    return [list(items[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


# ----------------------------------------------------------------------------- gradient store


def store_shard_ranges(n: int, num_shards: int, chunk_size: int = STORE_CHUNK) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop)]`` made of whole chunks of ``chunk_size`` rows."""
    chunks = list(range(0, n, chunk_size))
    return [(c[0], min(n, c[-1] + chunk_size)) for c in split_evenly(chunks, num_shards)]


def store_shard(model: dict, schedule, images: np.ndarray, start: int, measurement: str, num_draws: int,
                seed: int, timesteps, chunk_size: int, rows_per_batch: int, options):
    """Worker side: one round's gradients of rows ``start .. start + len(images)``, chunk by chunk
    exactly as store.build_gradient_store computes them. Returns ``(start, g [n, P])`` in the
    model's dtype (the driver averages it into its half and quantises, as the store does)."""
    from attribution.gradients import per_example_gradients
    from attribution.measurements import parse_measurement

    unet = unpack_unet(model, _device())
    x = torch.from_numpy(np.array(images))
    m = parse_measurement(measurement)
    out = []
    for c0 in range(0, x.shape[0], chunk_size):
        c1 = min(x.shape[0], c0 + chunk_size)
        g = per_example_gradients(unet, schedule, x[c0:c1], m, num_draws, seed, timesteps=timesteps,
                                  offset=start + c0, rows_per_batch=rows_per_batch, options=options)
        if not torch.isfinite(g).all():
            raise UserError(f"non-finite training gradients in rows {start + c0}..{start + c1 - 1}; check the model")
        out.append(g.cpu())
    return start, torch.cat(out).numpy()


def build_gradient_store_sharded(directory: Path, unet, schedule, images: Tensor, m, num_draws: int, seed: int,
                                 executor, dtype: str = "float16", timesteps=None, num_shards: Optional[int] = None,
                                 chunk_size: int = STORE_CHUNK, progress: Progress = None,
                                 rows_per_batch: Optional[int] = None, rounds: int = 1, options=None,
                                 round_draws: Optional[Sequence[int]] = None, should_stop=None):
    """:func:`store.build_gradient_store` (the same arguments, layout and bits: ``rounds``
    completed rounds of ``round_draws[r]`` draws, default ``num_draws`` each) with each round's
    chunks computed as executor units. Resumable at shard granularity. ``num_shards`` default:
    2 per executor slot. Returns the store, or None when ``should_stop`` ended it early.
    """
    from attribution.gradients import ROWS_PER_BATCH, kfac_parameters
    from attribution.measurements import PLAIN_DRAWS, DrawOptions
    from attribution.store import (
        STORE_DTYPES,
        GradientStore,
        StoreHalf,
        _swap_in,
        draws_in_half,
        quantize_rows,
        store_meta,
    )

    options = options or PLAIN_DRAWS
    if dtype not in STORE_DTYPES:
        raise UserError(f"unknown gradient store dtype {dtype!r}; choose {' or '.join(STORE_DTYPES)}")
    plan = [int(num_draws)] * int(rounds) if round_draws is None else [int(d) for d in round_draws]
    if rounds < 1 or rounds > len(plan) or min(plan) < 1:
        raise UserError(f"a gradient store needs 1..{len(plan)} rounds of >= 1 draws, got {rounds}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = int(images.shape[0])
    sizes = [q.numel() for q in kfac_parameters(unet)]
    p = sum(sizes)
    blocks = sizes if dtype == "int8" else [p]
    meta = store_meta(n, p, dtype, blocks, m, plan, seed, timesteps, options)
    if (directory / "store.json").exists() and read_json(directory / "store.json") != meta:
        raise UserError(f"gradient store {directory} was built with other settings; delete it and rebuild")
    if not (directory / "progress.json").exists():
        write_json(directory / "store.json", meta)
        write_json(directory / "progress.json", {"rounds_done": 0, "rows_done": 0})
    first = int(read_json(directory / "progress.json")["rounds_done"])
    total = max(0, rounds - first) * n
    stage = f"training gradients ({sum(plan)} draws in {len(plan)} rounds, sharded)"
    model = pack_unet(unet)
    x = images.detach().cpu().numpy()
    shards = store_shard_ranges(n, num_shards or 2 * executor.slots, chunk_size)
    npdtype = np.float16 if dtype == "float16" else np.int8
    for r in range(first, rounds):
        half = r % 2
        prev = draws_in_half(plan, r, half)  # draws already averaged into this half
        hdir = directory / f"half{half}"
        nxt = hdir / "next"
        nxt.mkdir(parents=True, exist_ok=True)
        rows_done = int(read_json(directory / "progress.json")["rows_done"])
        ledger = nxt / "shards.json"  # finished row ranges of this round (removed with next/)
        if rows_done == 0 or not (nxt / "grads.npy").exists():
            rows_done = 0
            ledger.unlink(missing_ok=True)
            np.lib.format.open_memmap(nxt / "grads.npy", mode="w+", dtype=npdtype, shape=(n, p)).flush()
            np.lib.format.open_memmap(nxt / "scales.npy", mode="w+", dtype=np.float32,
                                      shape=(n, len(blocks))).flush()
        done = np.zeros(n, dtype=bool)
        done[:rows_done] = True
        for a, b in (read_json(ledger)["done"] if ledger.exists() else []):
            done[a:b] = True
        todo = [(a, b) for a, b in shards if not done[a:b].all()]
        opts = DrawOptions(options.scheme, options.hflip, r, options.proposal)
        items = [(model, schedule, x[a:b], a, str(m), plan[r], seed, timesteps, chunk_size,
                  rows_per_batch or ROWS_PER_BATCH, opts) for a, b in todo]
        old = StoreHalf(hdir, blocks) if prev > 0 else None
        if progress is not None:
            progress((r - first) * n + int(done.sum()), max(total, 1), stage)

        def on_result(_i, result, r=r, prev=prev, old=old, k=plan[r]):
            start, g = result
            stop = start + len(g)
            g = torch.from_numpy(g)
            if old is not None:  # draw-weighted running mean of this half, as the store computes it
                g = (old.rows(start, stop) * prev + g.float() * k) / (prev + k)
            q, sc = quantize_rows(g, dtype, blocks)
            values = np.load(nxt / "grads.npy", mmap_mode="r+")
            scales = np.load(nxt / "scales.npy", mmap_mode="r+")
            values[start:stop] = q
            scales[start:stop] = sc
            values.flush()
            scales.flush()
            del values, scales
            done[start:stop] = True
            runs = _true_runs(done)
            write_json(ledger, {"done": runs})
            write_json(directory / "progress.json",
                       {"rounds_done": r, "rows_done": runs[0][1] if runs and runs[0][0] == 0 else 0})
            if progress is not None:
                progress((r - first) * n + int(done.sum()), total, stage)

        if todo and not executor.run(store_shard, items, on_result, should_stop):
            return None
        _swap_in(hdir, nxt)  # the store's own atomic swap of a finished round (removes next/)
        write_json(directory / "progress.json", {"rounds_done": r + 1, "rows_done": 0})
    return GradientStore(directory)


def _true_runs(mask: np.ndarray) -> list[list[int]]:
    """``[[start, stop], ...]`` of the runs of True in a bool vector."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return [[int(a), int(b)] for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1))]


# ----------------------------------------------------------------------------- Kronecker factors


class ShardRows:
    """The batches of :class:`curvature.TrainingRows` for a run of its groups (global example
    positions), on the shard's images ``[n_shard, C, H, W]`` starting at example ``start``.

    ``op`` (set after the operator exists) and ``skip_rows`` (rows of every batch before the
    shard): with the MC Fisher, the labels curvlinops would have drawn for those batches are
    drawn and discarded first, so this shard's labels are the single pass's.
    """

    def __init__(self, schedule, images: Tensor, start: int, groups: list[list[int]], draws: int, seed: int,
                 dtype, skip_rows: Sequence[int] = (), hflip: bool = False):
        from attribution.measurements import DrawOptions

        self.schedule, self.images, self.start, self.groups = schedule, images, start, groups
        self.draws, self.seed, self.dtype, self.skip_rows = draws, seed, dtype, list(skip_rows)
        self.options = DrawOptions(hflip=hflip)  # as TrainingRows: the run's augmentation per draw
        self.op = None

    def __len__(self) -> int:
        return len(self.groups)

    def _replay_labels(self) -> None:
        from curvlinops import FisherType

        op = self.op
        if op is None or op._fisher_type != FisherType.MC or not self.skip_rows:  # noqa: SLF001
            return
        gen, D = op._generator, self.images[0].numel()  # noqa: SLF001 - see the module docstring
        for rows in self.skip_rows:
            for _ in range(op._mc_samples):  # noqa: SLF001
                torch.randn((rows, D), device=gen.device, dtype=self.dtype, generator=gen)

    def __iter__(self):
        from attribution.measurements import Measurement, draw_plan

        self._replay_labels()
        for group in self.groups:
            local = [i - self.start for i in group]
            plan = draw_plan(self.schedule, self.images, Measurement("loss"), self.draws, self.seed, local,
                             offset=self.start, options=self.options)
            yield {"x": plan.x_in.to(self.dtype), "t": plan.t}, plan.target.flatten(1).to(self.dtype)


def _batch_size(X) -> int:
    return X["x"].shape[0]


def factor_shard_pass(model: dict, schedule, images: np.ndarray, start: int, groups: list[list[int]],
                      skip_rows: list[int], cfg: dict, num_rows: int, eigen: Optional[tuple[dict, dict]] = None):
    """Worker side: one shard's share of the factors (pass 1) or, given ``eigen = (eigenvector
    tensors, meta)``, of EK-FAC's corrected eigenvalues (pass 2). Returns ``(tensors, meta)`` in
    :func:`curvature.state_to_tensors` form, already divided by the full data's ``num_rows``."""
    from attribution.curvature import CurvatureConfig, curvlinops_operator, operator_from_tensors, state_to_tensors
    from attribution.ddpm import FlatEpsNet
    from attribution.gradients import kfac_parameters

    c = CurvatureConfig(**cfg)
    net = FlatEpsNet(unpack_unet(model, _device())).eval()
    params = kfac_parameters(net)
    data = ShardRows(schedule, torch.from_numpy(np.array(images)), start, groups, c.draws, c.seed,
                     params[0].dtype, skip_rows, hflip=c.hflip)
    with torch.enable_grad():
        if eigen is None:
            op = curvlinops_operator(net, params, data, method=c.method, fisher=c.fisher, kfac_type=c.kfac_type,
                                     num_data=num_rows, num_per_example_loss_terms=1, mc_samples=c.mc_samples,
                                     seed=c.seed, batch_size_fn=_batch_size)
            data.op = op
            op.compute_kronecker_factors()
        else:
            op = operator_from_tensors(net, params, data, eigen[0], eigen[1], batch_size_fn=_batch_size)
            data.op = op
            op.compute_eigenvalue_correction()
    tensors, meta = state_to_tensors(op.state_dict())
    want = ("corrected_eigenvalues|",) if eigen is not None else ("input_covariances|", "gradient_covariances|")
    return {k: v.cpu() for k, v in tensors.items() if k.startswith(want)}, meta


def merge_shard_sums(parts: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The full data's factors from the shards' factors: their sum, entry by entry.

    Why a sum: curvlinops accumulates each Kronecker factor (A = sum_batches a a^T / (N s),
    G = sum_batches g g^T * c / N) and each EK-FAC corrected eigenvalue as a sum over batches of
    terms already divided by ``num_data`` = N. Every shard was built with the full data's N, so
    the shards' partial sums add up to the single pass's sum; only the order of the floating-point
    additions differs (summed here in float64, then cast back to the factors' dtype).
    """
    if not parts:
        raise ValueError("no shards to merge")
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise ValueError("shards hold different factors")
    return {k: sum(p[k].double() for p in parts).to(parts[0][k].dtype) for k in parts[0]}


def eigenbasis(factors: dict[str, Tensor]) -> dict[str, Tensor]:
    """EK-FAC's basis from merged K-FAC factors: ``eigh(factor).eigenvectors``, as curvlinops'
    ``EKFACLinearOperator._compute_eigenvectors`` does (keys ``<group>_eigenvectors|<module>``)."""
    return {k.replace("|", "_eigenvectors|", 1): torch.linalg.eigh(v).eigenvectors for k, v in factors.items()}


def factor_shard_groups(n: int, draws: int, num_shards: int, rows_per_batch: int = 256) -> list[list[list[int]]]:
    """TrainingRows' batches (groups of example positions) cut into shards of whole batches."""
    from attribution.measurements import example_groups

    return split_evenly(list(example_groups(n, draws, rows_per_batch)), num_shards)


def build_factors_sharded(unet, schedule, images: Tensor, cfg, executor, num_shards: Optional[int] = None,
                          progress: Progress = None, rows_per_batch: int = 256,
                          workdir: Optional[Path] = None, should_stop=None):
    """:func:`curvature.build_factors` with the data traversals split into executor units.

    Returns ``(tensors, meta)`` like build_factors (ready for ``runs.save_tensors``), or None if
    ``should_stop`` ended it early. ``workdir``: where finished shards are kept, so an
    interrupted build resumes (removed at the end).
    """
    from attribution.curvature import output_dim

    n = int(images.shape[0])
    shards = factor_shard_groups(n, cfg.draws, num_shards or 2 * executor.slots, rows_per_batch)
    model = pack_unet(unet)
    x = images.detach().cpu().numpy()
    num_rows = n * cfg.draws
    before = np.cumsum([0] + [len(s) for s in shards])
    all_rows = [len(g) * cfg.draws for s in shards for g in s]
    stage = f"{cfg.method.upper()} factors ({cfg.fisher}, {cfg.kfac_type}, sharded)"

    def items(eigen):
        out = []
        for k, groups in enumerate(shards):
            a, b = groups[0][0], groups[-1][-1] + 1
            out.append((model, schedule, x[a:b], a, groups, all_rows[:before[k]], cfg.key(), num_rows, eigen))
        return out

    def run_pass(name: str, eigen) -> Optional[list]:
        parts: list = [None] * len(shards)
        paths = [workdir / f"{name}_{k}of{len(shards)}.safetensors" for k in range(len(shards))] if workdir else None
        for k in range(len(shards)):
            if paths and paths[k].exists():
                parts[k] = load_tensors(paths[k])
        todo = [k for k in range(len(shards)) if parts[k] is None]

        def on_result(i, result):
            parts[todo[i]] = result
            if paths:
                save_tensors(paths[todo[i]], *result)
            if progress is not None:
                progress(sum(p is not None for p in parts), len(shards), f"{stage}: {name}")

        if progress is not None:
            progress(len(shards) - len(todo), len(shards), f"{stage}: {name}")
        all_items = items(eigen)
        if not executor.run(factor_shard_pass, [all_items[k] for k in todo], on_result, should_stop):
            return None
        return parts

    parts = run_pass("factors", None)
    if parts is None:
        return None
    factors, meta = merge_shard_sums([p[0] for p in parts]), dict(parts[0][1])
    if cfg.method == "ekfac":
        basis = eigenbasis(factors)
        groups = ["input_covariances", "gradient_covariances", "input_covariances_eigenvectors",
                  "gradient_covariances_eigenvectors", "corrected_eigenvalues"]
        emeta = {**meta, "groups": groups}
        parts = run_pass("eigenvalue correction", (basis, emeta))
        if parts is None:
            return None
        factors, meta = {**basis, **merge_shard_sums([p[0] for p in parts])}, emeta
    meta.update(cfg.key())
    meta["output_dim"] = output_dim(unet)
    if workdir is not None:
        for p in Path(workdir).glob("*.safetensors"):
            p.unlink()
    return factors, meta

