"""Why the training-side draws come in antithetic pairs: the variance of a score, per timestep bin
and for a whole K-draw estimate, with and without pairing (issue 11).

A draw's loss gradient at small t is dominated by a part that is odd in eps (the residual
eps - eps_theta(x_t) is nearly linear in eps there), which cancels within a pair (t, eps), (t, -eps).
Scores are ``v . g`` with v K-FAC-preconditioned directions (per-bin table: training-loss gradients
of 8 other training images, like the proposal's pilot; whole-estimate table: the run's 16 or 12
query gradients). Equal cost: a pair (2 draws) against 2 independent draws at the same t.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_antithetic.py --run demo/run --out bench/results/antithetic_demo
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attribution.curvature import CurvatureConfig, curvature_factors, preconditioner_from_factors  # noqa: E402
from attribution.gradients import per_example_gradients  # noqa: E402
from attribution.influence import QUERY_OFFSET, run_hflip, training_images  # noqa: E402
from attribution.measurements import PROPOSAL_EDGES, DrawOptions, Measurement  # noqa: E402
from attribution.proposal import pilot_proposal  # noqa: E402
from attribution.runs import open_run, write_json  # noqa: E402

LOSS = Measurement("loss")


def per_bin(unet, schedule, images, directions, draws_per_bin: int, seed: int) -> list[dict]:
    """Per timestep bin: the score variance of the mean of 2 independent draws vs of one pair."""
    T = schedule.T
    edges = [round(e * T) for e in PROPOSAL_EDGES]
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    rows = []
    for a, b in zip(edges[:-1], edges[1:]):
        pair, ind = [], []
        for k in range(draws_per_bin):
            m = Measurement("lt", int(torch.randint(a, max(b, a + 1), (1,), generator=g)))
            off = [10_000 * (k + 1) + i for i in range(n)]
            pair.append(directions @ per_example_gradients(unet, schedule, images, m, 2, seed, offset=off,
                                                          options=DrawOptions("antithetic")).T)
            ind.append(directions @ per_example_gradients(unet, schedule, images, m, 2, seed + 1, offset=off).T)
        vp, vi = (torch.stack(x).double().var(0).mean() for x in (pair, ind))
        rows.append({"bin": f"[{a}, {b})", "sd_independent": float(vi.sqrt()), "sd_pair": float(vp.sqrt()),
                     "variance_ratio": float(vi / vp)})
    return rows


def whole_estimate(unet, schedule, images, keys: list[int], pq, hflip, proposals: dict, draws: int,
                   repeats: int) -> list[dict]:
    """Variance over ``repeats`` independent K-draw estimates of the scores ``pq @ g`` of ``images``
    (draw keys ``keys``), per scheme with its own pilot proposal ``proposals[scheme]``."""
    out = []
    for scheme in ("importance", "antithetic"):
        t0 = time.process_time()
        prop = proposals[scheme]
        s = torch.stack([pq @ per_example_gradients(unet, schedule, images, LOSS, draws, 7, offset=keys,
                                                     options=DrawOptions(scheme, hflip, r, prop)).T
                         for r in range(repeats)]).double()  # [R, Q, N]
        v = s.var(0)
        out.append({"scheme": scheme, "draws": draws, "mean_variance": float(v.mean()),
                    "noise_to_signal": float((v / s.mean(0).var(1, keepdim=True)).median()),
                    "cpu_s": round(time.process_time() - t0, 1), "proposal": list(prop)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="demo/run")
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--draws", type=int, default=8, help="draws per estimate (whole-estimate table)")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", default="bench/results/antithetic_demo")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    run = open_run(a.run)
    unet = run.load_unet(torch.device("cpu")).float().eval()
    schedule = run.schedule()
    images = training_images(run)
    hflip = run_hflip(run)
    tensors, meta = curvature_factors(run, images, CurvatureConfig("kfac", "mc", "expand", 2, 0, hflip=hflip),
                                      unet=unet)
    pre = preconditioner_from_factors(unet, schedule, tensors, meta, 1e-8)
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    dirs = pre.apply(per_example_gradients(unet, schedule, images[perm[:8]], LOSS, 16, 3,
                                           offset=perm[:8].tolist())).float()
    bins = per_bin(unet, schedule, images[perm[8:40]], dirs, 6, 11)
    proposals = {scheme: pilot_proposal(unet, schedule, images, pre.apply, 0, antithetic=scheme == "antithetic")
                 for scheme in ("importance", "antithetic")}
    queries = run.load_samples("queries")[0]["images"].float()
    gq = per_example_gradients(unet, schedule, queries, LOSS, 128, 0,
                               offset=[QUERY_OFFSET + i for i in range(len(queries))],
                               options=DrawOptions("importance", proposal=proposals["importance"]))
    pq = pre.apply(gq).float()
    keys = perm[40:40 + a.examples].tolist()
    whole = whole_estimate(unet, schedule, images[keys], keys, pq, hflip, proposals, a.draws, a.repeats)
    ratio = whole[0]["mean_variance"] / whole[1]["mean_variance"]
    out = Path(a.out)
    write_json(out.with_suffix(".json"), {"run": a.run, "bins": bins, "whole": whole, "variance_ratio": ratio})
    lines = [f"# Antithetic draws: score variance ({a.run})", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python bench/bench_antithetic.py --run "
             f"{a.run} --out {a.out}`", "",
             "Per timestep bin (32 training images x 8 preconditioned directions x 6 timesteps per bin): the "
             "standard deviation of a score from the mean of 2 independent draws and from one antithetic pair "
             "(same cost), and the variance ratio (> 1: pairs are better).", "",
             "| t bin | sd, 2 independent | sd, 1 pair | variance ratio |", "|---|---|---|---|"]
    lines += [f"| {r['bin']} | {r['sd_independent']:.4g} | {r['sd_pair']:.4g} | {r['variance_ratio']:.2f} |"
              for r in bins]
    lines += ["", f"Whole {a.draws}-draw estimates of {a.examples} training images' scores against the run's "
              f"queries, {a.repeats} independent repeats, each scheme with its own pilot proposal:", "",
              "| scheme | mean variance | median noise / signal | CPU s |", "|---|---|---|---|"]
    lines += [f"| {r['scheme']} | {r['mean_variance']:.4g} | {r['noise_to_signal']:.3f} | {r['cpu_s']} |"
              for r in whole]
    lines += ["", f"Variance ratio importance / antithetic at equal cost: **{ratio:.2f}** (the same stability "
              f"from {1 / ratio:.0%} of the draws)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
