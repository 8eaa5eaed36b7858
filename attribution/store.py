"""The gradient store: per-example training gradients on disk, grown in rounds of MC draws.

Layout of a store directory::

    store.json      settings (n, p, dtype, blocks, measurement, draws of each round, seed, draw options)
    progress.json   {"rounds_done", "rows_done" (of the round being built)}
    half0/ half1/   grads.npy [N, P] float16|int8 (memory-mapped) + scales.npy [N, B] float32:
                    the MEAN gradient over the rounds of that half (round r goes to half r % 2)

Why two halves: scores from two independent halves of the draws give a split-half reliability
of every gallery (:mod:`attribution.stability`) without a second run, and the full estimate is
their count-weighted mean, so nothing is stored twice. Why rounds: a store can be scored after
any completed round (a preview) and grown later without redoing earlier draws; round r draws from
its own generators (:class:`attribution.measurements.DrawOptions`), so a store grown round by
round is bit-identical to one built in one call with the same rounds (the same arithmetic).

Atomicity: a round rewrites its half into ``halfK/next/`` chunk by chunk (progress recorded after
each flushed chunk, so an interruption resumes at the first unrecorded chunk) and swaps it in
with one rename when the round is complete; the completed rounds are never touched meanwhile.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from attribution.ddpm import Schedule
from attribution.errors import UserError
from attribution.measurements import PLAIN_DRAWS, DrawOptions, Measurement
from attribution.runs import read_json, write_json

STORE_DTYPES = ("float16", "int8")
# float16 rows are scaled so that their absmax maps to 2^14: entries down to ~1e-9 of the row's
# maximum stay in float16's normal range, so one scale per row suffices (no per-tensor blocks).
FP16_ROW_MAX = 2.0**14
SCORE_ROWS, SCORE_COLS = 64, 16384  # cache-sized tiles of the store for scoring
STORE_VERSION = 2  # rounds in two halves


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
    if len(bounds) == 1:  # one scale per row (the float16 store): a plain row max, no block index
        amax = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    else:
        block_of = torch.repeat_interleave(torch.arange(len(bounds)), sizes).expand(x.shape[0], -1)
        amax = torch.zeros(x.shape[0], len(bounds)).scatter_reduce_(1, block_of, x.abs(), "amax").clamp_min(1e-30)
    if dtype == "int8":
        scale = amax / 127.0
    elif dtype == "float16":
        scale = amax / FP16_ROW_MAX
    else:
        raise UserError(f"unknown gradient store dtype {dtype!r}; choose {' or '.join(STORE_DTYPES)}")
    y = x / (scale if len(bounds) == 1 else scale.repeat_interleave(sizes, dim=1))
    q = torch.round(y).clamp_(-127, 127).to(torch.int8) if dtype == "int8" else y.to(torch.float16)
    return q.numpy(), scale.numpy().astype(np.float32)


def dequantize_rows(values: np.ndarray, scales: np.ndarray, blocks: Optional[Sequence[int]] = None) -> Tensor:
    """float32 ``[n, P]`` from stored rows and their per-block scales ``[n, B]``."""
    v = torch.from_numpy(np.array(values)).float()
    sizes = torch.tensor([b - a for a, b in _block_bounds(v.shape[1], blocks)])
    return v.mul_(torch.from_numpy(np.array(scales)).repeat_interleave(sizes, dim=1))


def store_nbytes(n: int, p: int, dtype: str, halves: int = 2) -> int:
    return halves * n * p * (2 if dtype == "float16" else 1)


class StoreHalf:
    """One half of a store: memory-mapped values ``[N, P]`` and scales ``[N, B]`` (read-only)."""

    def __init__(self, directory: Path, blocks: list[int]):
        self.dir, self.blocks = Path(directory), blocks
        self.values = np.load(self.dir / "grads.npy", mmap_mode="c")  # copy-on-write: never written
        self.scales = np.load(self.dir / "scales.npy", mmap_mode="r")

    def rows(self, start: int, stop: int) -> Tensor:
        return dequantize_rows(self.values[start:stop], self.scales[start:stop], self.blocks)

    def score(self, queries: Tensor) -> Tensor:
        """``queries [R, P] @ G_half^T``: ``[R, N]`` in the queries' float dtype.

        Streams the memory map in cache-sized tiles (SCORE_ROWS x SCORE_COLS), converting each tile
        into a reused buffer: ~2x faster than converting whole row chunks, and no dequantised copy
        of the store is ever held. Per-block scales multiply each block's partial scores.
        """
        dtype = queries.dtype if queries.dtype in (torch.float32, torch.float64) else torch.float32
        q = queries.to(dtype)
        n, p = self.values.shape
        bounds = _block_bounds(p, self.blocks)
        values = torch.from_numpy(self.values)
        scales = torch.from_numpy(np.array(self.scales)).to(dtype)  # [N, B]
        out = torch.zeros(q.shape[0], n, dtype=dtype)
        buf = torch.empty(SCORE_ROWS * SCORE_COLS, dtype=dtype)
        part = torch.empty(q.shape[0], SCORE_ROWS, dtype=dtype)
        for start in range(0, n, SCORE_ROWS):
            stop = min(n, start + SCORE_ROWS)
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


def rounds_in_half(rounds_done: int, half: int) -> int:
    """How many of the first ``rounds_done`` rounds went to ``half`` (round r -> half r % 2)."""
    return (rounds_done + 1 - half) // 2


def draws_in_half(round_draws: Sequence[int], rounds_done: int, half: int) -> int:
    """Draws of the first ``rounds_done`` rounds that went to ``half``."""
    return sum(d for r, d in enumerate(round_draws[:rounds_done]) if r % 2 == half)


def round_schedule(total: int, first: int) -> list[int]:
    """Draws of each round: pairs that double from ``first`` (2, 2, 4, 4, 8, 8, ...), the last pair
    taking the rest, so a gallery is previewed early and sharpens geometrically. ``total`` must
    be even (the two halves of the draws are equal after every pair)."""
    if total < 2 or total % 2:
        raise UserError(f"the number of training draws must be even and >= 2 (two equal halves), got {total}")
    size, left, out = max(1, min(int(first), total // 2)), total, []
    while left > 0:
        if left < 4 * size or left - 2 * size < 2 * size:  # this pair would leave less than a pair: take all
            out += [left // 2, left // 2]
            break
        out += [size, size]
        left -= 2 * size
        size *= 2
    return out


class GradientStore:
    """A store directory (read-only view of its completed rounds)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        meta = read_json(self.dir / "store.json")
        if meta.get("version") != STORE_VERSION:
            raise UserError(f"gradient store {self.dir} has an old layout; delete it and rebuild")
        self.n, self.p, self.dtype = int(meta["n"]), int(meta["p"]), meta["dtype"]
        self.blocks = list(meta["blocks"])
        self.round_draws = [int(d) for d in meta["round_draws"]]
        self.meta = meta
        prog = read_json(self.dir / "progress.json")
        self.rounds_done = int(prog["rounds_done"])
        self.halves = [StoreHalf(self.dir / f"half{h}", self.blocks)
                       for h in range(2) if rounds_in_half(self.rounds_done, h) > 0]

    @property
    def draws_done(self) -> int:
        return sum(self.round_draws[:self.rounds_done])

    @property
    def complete(self) -> bool:
        """At least one round is complete (the store can be scored)."""
        return self.rounds_done >= 1

    def weights(self) -> list[float]:
        """Share of the draws in each stored half (sums to 1)."""
        counts = [draws_in_half(self.round_draws, self.rounds_done, h) for h in range(len(self.halves))]
        return [c / sum(counts) for c in counts]

    def rows(self, start: int, stop: int) -> Tensor:
        """Dequantised float32 mean-gradient rows ``[stop - start, P]`` over all completed rounds."""
        return sum(w * h.rows(start, stop) for w, h in zip(self.weights(), self.halves))

    def score(self, queries: Tensor) -> Tensor:
        """``queries [Q, P] @ G^T`` with G the mean over all completed rounds: ``[Q, N]``."""
        self._check()
        return sum(w * h.score(queries) for w, h in zip(self.weights(), self.halves))

    def score_halves(self, query_halves: tuple[Tensor, Tensor], queries: Tensor
                     ) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
        """``(tau_A, tau_B, tau)``, each ``[Q, N]``: half A's training gradients against the queries'
        half-A gradients, B against B (None while the store has one round), and all rounds against
        the full queries. One pass over each half (the query rows are stacked)."""
        self._check()
        Q = queries.shape[0]
        outs, halves_tau = [], []
        for h, (half, qh) in enumerate(zip(self.halves, query_halves)):
            both = half.score(torch.cat([qh, queries]))
            halves_tau.append(both[:Q])
            outs.append(both[Q:])
        tau = sum(w * o for w, o in zip(self.weights(), outs))
        if len(halves_tau) < 2:
            return None, None, tau
        return halves_tau[0], halves_tau[1], tau

    def _check(self) -> None:
        if not self.complete:
            raise UserError(f"gradient store {self.dir} has no complete round yet; build it to resume")


def store_meta(n: int, p: int, dtype: str, blocks: list[int], m: Measurement, round_draws: Sequence[int],
               seed: int, timesteps, options: DrawOptions) -> dict:
    return {"version": STORE_VERSION, "n": n, "p": p, "dtype": dtype, "blocks": blocks, "measurement": str(m),
            "round_draws": [int(d) for d in round_draws], "seed": seed, "timesteps": list(timesteps) if timesteps is not None else None,
            "scheme": options.scheme, "hflip": options.hflip,
            "proposal": list(options.proposal) if options.proposal is not None else None,
            **({"train_mode": True} if options.train_mode else {})}


def build_gradient_store(
    directory: Path,
    unet,
    diffusion: Schedule,
    images: Tensor,
    m: Measurement,
    num_draws: int,
    seed: int,
    dtype: str = "float16",
    timesteps: Optional[Sequence[int]] = None,
    chunk_size: int = 64,
    progress: Optional[Callable[[int, int, str], None]] = None,
    rows_per_batch: Optional[int] = None,
    rounds: int = 1,
    options: DrawOptions = PLAIN_DRAWS,
    round_draws: Optional[Sequence[int]] = None,
) -> GradientStore:
    """Build, resume or grow the store of ``images``' gradients to ``rounds`` completed rounds.

    Round r has ``round_draws[r]`` draws (default: ``num_draws`` for each of ``rounds`` rounds;
    the schedule is part of the store's settings, so ``rounds`` may be less than its length: a
    partial build, grown later). ``options.draw_round`` is ignored: round r uses r.
    ``progress(done_rows, total_rows, stage)`` counts rows over the rounds still to build.
    """
    from attribution.gradients import kfac_parameters

    if dtype not in STORE_DTYPES:
        raise UserError(f"unknown gradient store dtype {dtype!r}; choose {' or '.join(STORE_DTYPES)}")
    schedule = [int(num_draws)] * int(rounds) if round_draws is None else [int(d) for d in round_draws]
    if rounds < 1 or rounds > len(schedule) or min(schedule) < 1:
        raise UserError(f"a gradient store needs 1..{len(schedule)} rounds of >= 1 draws, got {rounds}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = int(images.shape[0])
    sizes = [q.numel() for q in kfac_parameters(unet)]
    p = sum(sizes)
    blocks = sizes if dtype == "int8" else [p]  # int8: one scale per row and parameter tensor
    meta = store_meta(n, p, dtype, blocks, m, schedule, seed, timesteps, options)
    if (directory / "store.json").exists() and read_json(directory / "store.json") != meta:
        raise UserError(f"gradient store {directory} was built with other settings; delete it and rebuild")
    if not (directory / "progress.json").exists():
        write_json(directory / "store.json", meta)
        write_json(directory / "progress.json", {"rounds_done": 0, "rows_done": 0})
    prog = read_json(directory / "progress.json")
    first = int(prog["rounds_done"])
    total = max(0, rounds - first) * n
    stage = f"training gradients ({sum(schedule)} draws in {len(schedule)} rounds)"
    done_rows = int(prog["rows_done"]) if first < rounds else 0
    if progress is not None:
        progress(done_rows, max(total, 1), stage)
    for r in range(first, rounds):
        half = r % 2
        prev = draws_in_half(schedule, r, half)  # draws already averaged into this half
        hdir = directory / f"half{half}"
        nxt = hdir / "next"
        nxt.mkdir(parents=True, exist_ok=True)
        rows_done = int(read_json(directory / "progress.json")["rows_done"])
        if rows_done < n:
            _build_round(directory, hdir, nxt, unet, diffusion, images, m, schedule[r], seed, dtype, timesteps,
                         chunk_size, rows_per_batch, options, blocks, r, prev, rows_done,
                         lambda stop: progress((r - first) * n + stop, total, stage) if progress else None)
        _swap_in(hdir, nxt)  # also finishes a swap that an interruption cut short
        write_json(directory / "progress.json", {"rounds_done": r + 1, "rows_done": 0})
    return GradientStore(directory)


def _build_round(directory, hdir, nxt, unet, schedule, images, m, num_draws, seed, dtype, timesteps, chunk_size,
                 rows_per_batch, options, blocks, r, prev, rows_done, on_rows) -> None:
    """Write round ``r``'s running mean of its half into ``nxt`` from row ``rows_done`` on."""
    from attribution.gradients import ROWS_PER_BATCH, per_example_gradients

    n, p = int(images.shape[0]), sum(blocks)
    npdtype = np.float16 if dtype == "float16" else np.int8
    if rows_done == 0 or not (nxt / "grads.npy").exists():
        rows_done = 0
        np.lib.format.open_memmap(nxt / "grads.npy", mode="w+", dtype=npdtype, shape=(n, p)).flush()
        np.lib.format.open_memmap(nxt / "scales.npy", mode="w+", dtype=np.float32, shape=(n, len(blocks))).flush()
    old = StoreHalf(hdir, blocks) if prev > 0 else None
    values = np.load(nxt / "grads.npy", mmap_mode="r+")
    scales = np.load(nxt / "scales.npy", mmap_mode="r+")
    for start in range(rows_done, n, chunk_size):
        stop = min(n, start + chunk_size)
        g = per_example_gradients(unet, schedule, images[start:stop], m, num_draws, seed, timesteps=timesteps,
                                  offset=start, rows_per_batch=rows_per_batch or ROWS_PER_BATCH,
                                  options=DrawOptions(options.scheme, options.hflip, r, options.proposal,
                                                      options.train_mode))
        if not torch.isfinite(g.sum()):  # one reduction: an inf or NaN anywhere makes the sum non-finite
            raise UserError(f"non-finite training gradients in rows {start}..{stop - 1}; check the model")
        if old is not None:  # running mean of this half's draws (prev of them already in ``old``)
            g = (old.rows(start, stop) * prev + g.float() * num_draws) / (prev + num_draws)
        q, s = quantize_rows(g, dtype, blocks)
        values[start:stop] = q
        scales[start:stop] = s
        values.flush()
        scales.flush()
        write_json(directory / "progress.json", {"rounds_done": r, "rows_done": stop})
        on_rows(stop)


def _swap_in(hdir: Path, nxt: Path) -> None:
    """Move ``nxt``'s grads/scales over ``hdir``'s (atomic renames; files already moved are skipped)."""
    for name in ("scales.npy", "grads.npy"):
        if (nxt / name).exists():
            os.replace(nxt / name, hdir / name)
    shutil.rmtree(nxt, ignore_errors=True)
