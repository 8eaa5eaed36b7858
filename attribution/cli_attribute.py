"""``attribution attribute``: top proponents / opponents / neutral training examples per query.

Prints one JSON object: ``{"config": {...}, "queries": [{"query", "stability", "positive",
"negative", "neutral"}, ...]}``; each list holds ``{"index", "score", "id", "label"}`` entries
(K-FAC / EK-FAC add ``"se"``, the score's standard error, and ``"rank_interval"``, a 90% interval
of its rank, both estimated from two independent halves of the draws; ``"stability"`` gives the
split-half Spearman, its Spearman-Brown correction and the expected top-k overlaps of two
independent runs).
"""

from __future__ import annotations

import argparse
import json
import sys

from attribution.errors import UserError

METHODS = ("kfac", "ekfac", "trak", "dtrak", "clip", "pixel")
SCHEMES = ("antithetic", "importance", "common", "stratified", "iid")  # measurements.DrawScheme values (no torch here)


def _defaults() -> dict:
    from attribution.influence import InfluenceSettings

    return InfluenceSettings().to_dict()


DEFAULTS = _defaults()

HELP = """\
Attribute generated samples to training examples.

Scores follow method.md §2: tau > 0 ("positive", a proponent) means removing the training example
is predicted to INCREASE the measurement of the query (for the loss: the example helped the model
produce the query); "negative" lists opponents (tau < 0); "neutral" the smallest |tau|.
Heavy artifacts (gradient store, curvature factors, query gradients) are cached in the run, so a
second call with another damping, variant or measurement takes about a second.
"""


def parse_indices(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-3,7"`` -> [0, 1, 2, 3, 7]."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"--query takes comma-separated indices or ranges like 0,1,5-7; got {text!r}") from None
    if not out:
        raise UserError("--query needs at least one index")
    return out


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("attribute", help="influence scores of training examples for generated samples",
                              description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory (with a trained model and sample sets)")
    p.add_argument("--samples", default="queries",
                   help="sample set holding the query images, in RUN/samples/ (default: %(default)s)")
    p.add_argument("--query", default="0",
                   help="query indices in the sample set: 0,1,2 or 0-3 (default: %(default)s)")
    p.add_argument("--method", default="kfac", choices=METHODS,
                   help="kfac: K-FAC influence (the paper's method); ekfac: eigenvalue-corrected K-FAC; "
                        "trak / dtrak: TRAK / D-TRAK baselines; clip: CLIP-embedding cosine; pixel: raw-pixel "
                        "cosine (default: %(default)s)")
    p.add_argument("--measurement", default="loss",
                   help="what is explained: loss | lt:T (per-timestep loss, 0-indexed T) | elbo (Ho et al. "
                        "eq. 5 bound, nats) | elbo-simple (weighted MSE terms only) | trajectory (negative "
                        "log-density of the recorded sampling trajectory) | square-norm (D-TRAK). All are "
                        "loss-like: lower = the model likes the query more (default: %(default)s)")
    p.add_argument("--approx-measurement", default=None,
                   help="measurement whose gradient is used in the approximation (measurement substitution, "
                        "e.g. explain elbo with the loss's gradient); default: the --measurement itself")
    p.add_argument("--fisher", default="mc", choices=("mc", "empirical"),
                   help="curvature: mc = GGN / MC Fisher (the paper's choice); empirical = empirical Fisher "
                        "(what TRAK uses implicitly) (default: %(default)s)")
    p.add_argument("--kfac", dest="kfac_type", default="expand", choices=("expand", "reduce"),
                   help="K-FAC weight-sharing variant (Eschenhagen et al. 2023); expand is the paper's "
                        "(default: %(default)s)")
    p.add_argument("--damping", type=float, default=None,
                   help="lambda added to the GGN of the training loss averaged over examples and pixels (the paper's and its "
                        "official code's unit: a value from the paper means the same here). Default: "
                        "1e-8 for kfac/ekfac; TRAK/D-TRAK: their adaptive default")
    p.add_argument("--train-draws", type=int, default=DEFAULTS["train_draws"],
                   help="(t, eps) draws per training gradient, over all rounds (default: %(default)s)")
    p.add_argument("--preview-draws", type=int, default=DEFAULTS["preview_draws"],
                   help="draws of the store's first round; rounds then double in pairs (2, 2, 4, 4, ...) up to "
                        "--train-draws, and the gallery can be shown after any round (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=None,
                   help="build only this many rounds now (a preview; run again without it to refine)")
    p.add_argument("--query-draws", type=int, default=DEFAULTS["query_draws"],
                   help="(t, eps) draws per query gradient, in two independent halves (default: %(default)s)")
    p.add_argument("--factor-draws", type=int, default=DEFAULTS["factor_draws"],
                   help="(t, eps) draws per training example for the K-FAC factors (default: %(default)s)")
    p.add_argument("--draw-scheme", default=DEFAULTS["draw_scheme"], choices=SCHEMES,
                   help="antithetic: importance-sampled timesteps with noise in pairs (eps, -eps); importance: "
                        "stratified timesteps from a per-run proposal, reweighted; common: the same stratified "
                        "(t, eps) draws for every training example; stratified: stratified timesteps per example; "
                        "iid: independent draws (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of all Monte-Carlo draws (default: %(default)s)")
    p.add_argument("--compress-queries", action="store_true",
                   help="int8-quantise the preconditioned query gradients (paper §3.2)")
    p.add_argument("--store-dtype", default="float16", choices=("float16", "int8"),
                   help="storage of the cached training gradients (default: %(default)s)")
    p.add_argument("--top", type=int, default=16, help="examples per list (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="print compact one-line JSON (default: indented JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    p.set_defaults(func=cmd_attribute)


def _progress(quiet: bool):
    if quiet:
        return None
    last = {}

    def report(done, total, stage):
        if last.get(stage) == done:
            return
        last[stage] = done
        print(f"\r{stage}: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)

    return report


def _baseline(name: str):
    try:
        from attribution import baselines
    except ModuleNotFoundError as exc:
        if exc.name != "attribution.baselines":
            raise
        raise UserError(f"method {name} is not available yet") from None
    return baselines


def compute_scores(args, run, indices: list[int], progress):
    """``(scores [Q, N], config dict)`` for the parsed ``args``."""
    from attribution.influence import InfluenceSettings, influence_result

    if args.method in ("kfac", "ekfac"):
        settings = InfluenceSettings(
            method=args.method, fisher=args.fisher, kfac_type=args.kfac_type,
            damping=1e-8 if args.damping is None else args.damping, measurement=args.measurement,
            approx_measurement=args.approx_measurement, train_draws=args.train_draws,
            query_draws=args.query_draws, seed=args.seed, compress_queries=args.compress_queries,
            factor_draws=args.factor_draws, store_dtype=args.store_dtype, preview_draws=args.preview_draws,
            draw_scheme=args.draw_scheme)
        if args.rounds is not None and args.rounds < 1:
            raise UserError(f"--rounds must be >= 1, got {args.rounds}")
        res = influence_result(run, args.samples, indices, settings, progress, rounds=args.rounds, k=args.top)
        return res.scores, {"method": args.method, **settings.to_dict(), "result": res}
    tensors, _ = run.load_samples(args.samples)
    images = tensors["images"]
    bad = [i for i in indices if not 0 <= i < images.shape[0]]
    if bad:
        raise UserError(f"query index {bad[0]} is out of range: sample set {args.samples!r} has "
                        f"{images.shape[0]} samples (0..{images.shape[0] - 1})")
    q = images[indices]
    b = _baseline(args.method)
    if args.method in ("trak", "dtrak"):
        kw = {} if args.damping is None else {"damping": args.damping}
        scores = b.trak_scores(run, q, variant=args.method, progress=progress, query_indices=indices, **kw)
        config = {"method": args.method, "damping": args.damping, "measurement": "loss" if args.method == "trak"
                  else "square-norm"}
    elif args.method == "clip":
        scores = b.clip_scores(run, q, progress=progress)
        config = {"method": "clip"}
    else:
        scores = b.pixel_scores(run, q)
        config = {"method": "pixel"}
    from attribution.influence import check_scores

    return check_scores(scores), config


def _quiet_libraries() -> None:
    """Keep stderr to our own progress and one-line errors (diffusers' notices, deprecations)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass


def cmd_attribute(args) -> int:
    from attribution.influence import run_training_table, top_k
    from attribution.runs import open_run

    _quiet_libraries()
    run = open_run(args.run)
    if not run.has_model():
        raise UserError(f"run {run.path} has no trained model yet; train it first")
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    if args.method not in ("kfac", "ekfac") and (args.approx_measurement or args.measurement != "loss"):
        print(f"note: --method {args.method} ignores --measurement / --approx-measurement", file=sys.stderr)
    indices = parse_indices(args.query)
    progress = _progress(args.quiet)
    from attribution.stability import rank_interval

    scores, config = compute_scores(args, run, indices, progress)
    res = config.pop("result", None)
    table = run_training_table(run)
    if len(table) != scores.shape[1]:
        raise UserError(f"scores cover {scores.shape[1]} training examples but the run's dataset has {len(table)}")
    out = {"run": str(run.path), "samples": args.samples, "config": config, "queries": []}
    for row, q in enumerate(indices):
        lists = top_k(scores[row], args.top)
        entry = {"query": q}
        if res is not None:
            entry["stability"] = res.summary(row)

        def item(i, s):
            d = {**table[i], "score": s}
            if res is not None and res.se is not None:
                d["se"] = float(res.se[row, i])
                d["rank_interval"] = list(rank_interval(scores[row], res.se[row], i))
            return d

        entry.update({k: [item(i, s) for i, s in v] for k, v in lists.items()})
        out["queries"].append(entry)
    print(json.dumps(out, separators=(",", ":")) if args.json else json.dumps(out, indent=2))
    return 0
