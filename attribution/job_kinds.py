"""What each kind of background job does, what it must build first, and its plan of stages.

Every kind has three functions:
- ``run(run_dir, args, progress)``: the work (returns a JSON-able result, or ``(result, scores)``
  for score jobs: scores ``[Q, N]``, or a dict of tensors with at least ``"scores"``);
- ``needs(run_dir, args)``: the artifacts the job would build now, as keys shared by every job
  that builds the same thing (``[]`` = everything is cached: the job only re-scores, takes a
  second and never waits for a build slot);
- ``plan(run_dir, args, needs)``: the stages it will run, for time estimates
  (:mod:`attribution.job_estimates`).

:mod:`attribution.jobs` uses ``needs`` so that a job waits for the running job that builds an
artifact it needs (never a second build of it), and runs beside builds of other artifacts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from attribution.errors import UserError
from attribution.runs import config_hash


@dataclass(frozen=True)
class JobKind:
    run: Callable
    needs: Callable
    plan: Callable


def _query_images(run, query_set: str, query_indices: list[int]):
    tensors, _ = run.load_samples(query_set)
    images = tensors["images"]
    bad = [i for i in query_indices if not 0 <= i < len(images)]
    if bad:
        raise UserError(f"query indices {bad} are out of range for sample set {query_set!r} ({len(images)} samples)")
    return images[list(query_indices)]


# ----------------------------------------------------------------------------- train / sample


def _run_train(run_dir: Path, args: dict, progress) -> dict:
    from attribution.data import DatasetSpec
    from attribution.jobs import JobCancelled
    from attribution.train import TrainConfig, train_run

    cfg = TrainConfig(**args.get("train", {}))
    spec = DatasetSpec(**args.get("dataset", {}))

    def on_step(step, total, loss):
        progress.state["loss"] = float(loss)
        progress.report(step, total, "train")  # cancellation goes through should_stop (checkpoints)

    finished = {"flag": False}

    def should_stop() -> bool:
        finished["flag"] = progress.cancelled()
        return finished["flag"]

    train_run(run_dir, spec, cfg, progress=on_step, should_stop=should_stop)
    if finished["flag"]:
        raise JobCancelled("training stopped at a checkpoint; start the job again to resume")
    return {"steps": cfg.steps, "final_loss": progress.state.get("loss")}


def _needs_train(run_dir: Path, args: dict) -> list[str]:
    return [f"model of {Path(run_dir).resolve()}"]


def _plan_train(run_dir: Path, args: dict, needs: list[str]) -> list[dict]:
    return [{"name": "training", "kind": "train", "units": int(args.get("train", {}).get("steps", 0)) or None}]


def _run_sample(run_dir: Path, args: dict, progress) -> dict:
    import torch

    from attribution.ddpm import default_device, sample
    from attribution.runs import open_run

    n, seed = int(args.get("n", 16)), int(args.get("seed", 0))
    if not 1 <= n <= 10_000:
        raise UserError(f"number of samples must be between 1 and 10000, got {n}")
    run = open_run(run_dir)
    device = torch.device(args["device"]) if args.get("device") else default_device()
    unet = run.load_unet(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = sample(unet, run.schedule(), n, gen, return_trajectory=bool(args.get("trajectory")),
                 batch_size=int(args.get("batch_size", 64)),
                 progress=lambda d, t: progress(d, t, f"sample on {device}"))
    name = args.get("name") or f"seed{seed}_n{n}"
    run.save_samples(name, out.images, out.trajectory, {"seed": seed, "n": n, "device": str(device)})
    return {"name": name, "n": n, "device": str(device)}


def _needs_sample(run_dir: Path, args: dict) -> list[str]:
    return [f"sample set {args.get('name') or config_hash(args, 8)}"]


def _plan_sample(run_dir: Path, args: dict, needs: list[str]) -> list[dict]:
    return [{"name": "sampling", "kind": "sample", "units": None}]


# ----------------------------------------------------------------------------- influence


_ENGINE_LOCK = threading.Lock()
_ENGINE_WARM: set = set()


def warm_engine(run) -> None:
    """Fill the influence engine's in-process cache for ``run`` (its model and schedule) once,
    behind a lock, before threads use it: its first fill is not atomic (a second thread could
    find the model cached but not yet the schedule). Every page and job of this package calls
    this before the engine."""
    from attribution.influence import store_rounds_done
    from attribution.influence_settings import InfluenceSettings

    model = Path(run.model_dir)
    key = (str(model.resolve()), tuple(sorted((f.name, f.stat().st_mtime_ns) for f in model.glob("*.safetensors"))))
    if key in _ENGINE_WARM:
        return
    with _ENGINE_LOCK:
        if key not in _ENGINE_WARM:
            store_rounds_done(run, InfluenceSettings())
            _ENGINE_WARM.add(key)


def _settings(args: dict):
    from attribution.influence import InfluenceSettings

    return InfluenceSettings(**args["settings"])


def artifact_keys(query_set: str, settings, hflip: bool = False) -> dict[str, str]:
    """The shared key of each artifact an influence job may build, by ``influence_status`` name
    (plus "reference_factors": the K-FAC factors the timestep pilot of the importance and antithetic schemes uses).

    The query-gradient key leaves out the query indices: all queries of a sample set share one
    cache file per measurement and draws, so two of its builds must not run at once."""
    m = settings.gradient_measurement
    seed = settings.seed
    flip = ", flipped" if hflip else ""
    return {
        "store": f"training-gradient store ({settings.train_draws} draws from {settings.preview_draws}, "
                 f"{settings.draw_scheme}, seed {seed}, {settings.store_dtype}{flip})",
        "factors": f"{settings.method} factors ({settings.fisher}, {settings.kfac_type}, "
                   f"{settings.factor_draws} draws, seed {seed}{flip})",
        "reference_factors": f"kfac factors (mc, expand, {settings.factor_draws} draws, seed {seed}{flip})",
        "query_gradients": f"query gradients ({query_set}, {m}, {settings.query_draws} draws, "
                           f"{settings.draw_scheme}, seed {seed})",
    }


def _run_influence(run_dir: Path, args: dict, progress):
    """Scores with the store grown to ``args["rounds"]`` rounds (None: all of them); the result
    carries the stability figures and, per query row, the scores' standard errors."""
    from attribution.influence import influence_result
    from attribution.runs import open_run

    run = open_run(run_dir)
    warm_engine(run)
    res = influence_result(run, args["query_set"], list(args["query_indices"]), _settings(args), progress=progress,
                           rounds=args.get("rounds"), k=int(args.get("k", 16)))
    out = {"shape": list(res.scores.shape),
           "stability": [res.summary(i) for i in range(res.scores.shape[0])],
           "se": None if res.se is None else [[round(float(x), 9) for x in row] for row in res.se]}
    return out, res.scores


def _reference_missing(run, settings) -> bool:
    """A proposal scheme's store (importance, antithetic) starts with a pilot that needs K-FAC (MC, expand) factors."""
    from attribution.curvature import CurvatureConfig
    from attribution.influence import run_hflip

    from attribution.measurements import PROPOSAL_SCHEMES

    if settings.draw_scheme not in PROPOSAL_SCHEMES or (settings.method, settings.fisher, settings.kfac_type) == \
            ("kfac", "mc", "expand"):
        return False
    ref = CurvatureConfig("kfac", "mc", "expand", settings.factor_draws, settings.seed, hflip=run_hflip(run))
    return not (run.artifact_dir("curvature", ref.key()) / "factors.safetensors").exists()


def _needs_influence(run_dir: Path, args: dict) -> list[str]:
    from attribution.influence import influence_status, run_hflip
    from attribution.runs import open_run

    run = open_run(run_dir)
    warm_engine(run)
    settings = _settings(args)
    have = influence_status(run, args["query_set"], list(args["query_indices"]), settings, rounds=args.get("rounds"))
    keys = artifact_keys(args["query_set"], settings, run_hflip(run))
    want_rounds = min(int(args.get("rounds") or settings.rounds), settings.rounds)
    store_ready = have.get("store") is True or int(have.get("store_rounds_done") or 0) >= want_rounds
    out = [keys[name] for name in ("query_gradients", "factors") if have.get(name) is False]
    if not store_ready:  # (other entries of the status are information, not artifacts)
        out.append(keys["store"])
        if int(have.get("store_rounds_done") or 0) == 0 and _reference_missing(run, settings):
            out.append(keys["reference_factors"])
    return out


def _training_size(run) -> int:
    from attribution.influence import run_training_table

    return len(run_training_table(run))


def _model_size(run) -> dict:
    """``{"params": K-FAC parameters, "pixels": image pixels}`` (what a stage's cost scales with)."""
    from attribution.gradients import kfac_parameters, num_parameters

    unet = run.load_unet()
    return {"params": num_parameters(kfac_parameters(unet)), "pixels": int(unet.config.sample_size) ** 2}


def _factor_stages(method: str, fisher: str, kfac_type: str, units: int, size: dict) -> list[dict]:
    variant = f"{fisher}/{kfac_type}"
    what = f"({'MC' if fisher == 'mc' else 'empirical'} Fisher, {kfac_type})"
    if method == "ekfac":
        return [{"name": f"EK-FAC factors {what}, pass 1 of 2: Kronecker factors", "kind": "factors",
                 "variant": variant, "units": units, **size},
                {"name": f"EK-FAC factors {what}, pass 2 of 2: eigenvalue correction", "kind": "factors_pass2",
                 "variant": variant, "units": units, **size}]
    return [{"name": f"K-FAC factors {what}", "kind": "factors", "variant": variant, "units": units, **size}]


def _plan_influence(run_dir: Path, args: dict, needs: list[str]) -> list[dict]:
    from attribution.influence import influence_status, run_hflip
    from attribution.runs import open_run

    settings = _settings(args)
    run = open_run(run_dir)
    keys = artifact_keys(args["query_set"], settings, run_hflip(run))
    n, size, q = _training_size(run), _model_size(run), len(args["query_indices"])
    plan = []
    if keys["query_gradients"] in needs:  # two independent halves (the engine's split-half reliability)
        for h in (1, 2):
            plan.append({"name": f"query gradients of the {settings.gradient_measurement}, half {h} of 2 "
                                 f"({q} x {settings.query_draws // 2} draws)",
                         "kind": "query_gradients", "units": q * (settings.query_draws // 2), **size})
    if keys["factors"] in needs:  # (in the order the engine runs them)
        plan += _factor_stages(settings.method, settings.fisher, settings.kfac_type, n * settings.factor_draws, size)
    if keys["reference_factors"] in needs and keys["reference_factors"] != keys["factors"]:
        plan += _factor_stages("kfac", "mc", "expand", n * settings.factor_draws, size)
    if keys["store"] in needs:
        done = int(influence_status(run, args["query_set"], list(args["query_indices"]), settings)
                   .get("store_rounds_done") or 0)
        want = min(int(args.get("rounds") or settings.rounds), settings.rounds)
        draws = settings.round_draws[done:want]
        from attribution.measurements import PROPOSAL_SCHEMES

        if done == 0 and settings.draw_scheme in PROPOSAL_SCHEMES:
            plan.append({"name": "timestep proposal (a pilot on 32 training images)", "kind": "proposal",
                         "units": _pilot_units(), **size})
        cost = [d + STORE_ROUND_OVERHEAD_DRAWS for d in draws]  # each round also rewrites its half of the store
        plan.append({"name": f"training-image gradients ({n:,} images x {sum(draws)} draws, "
                             f"{len(draws)} rounds)", "kind": "store", "units": n * sum(cost),
                     "segments": cost, **size})
    return plan


# A store round rewrites its half of the store ([N, P] float16) besides computing its draws: on the
# demo run that costs about as much as 3 more draws per round (a fit of 14 rounds' CPU times,
# bench/results/gallery_demo.md: 2.6 s per draw of 1,000 images + 8.4 s per round).
STORE_ROUND_OVERHEAD_DRAWS = 3


def _pilot_units() -> int:
    from attribution.measurements import PROPOSAL_EDGES
    from attribution.proposal import PILOT_DIRECTIONS, PILOT_DRAWS_PER_BIN, PILOT_EXAMPLES

    return PILOT_DIRECTIONS * 32 + (len(PROPOSAL_EDGES) - 1) * PILOT_DRAWS_PER_BIN * PILOT_EXAMPLES


# ----------------------------------------------------------------------------- baselines


def _run_baseline(run_dir: Path, args: dict, progress):
    from attribution import baselines
    from attribution.runs import open_run

    run = open_run(run_dir)
    images = _query_images(run, args["query_set"], list(args["query_indices"]))
    method = args["method"]
    if method in ("trak", "dtrak"):
        kw = {k: args[k] for k in ("proj_dim", "damping") if args.get(k) is not None}
        scores = baselines.trak_scores(run, images, variant=method, progress=progress,
                                       query_indices=list(args["query_indices"]), **kw)
    elif method == "clip":
        scores = baselines.clip_scores(run, images, progress=progress)
    elif method == "pixel":
        scores = baselines.pixel_scores(run, images)
    else:
        raise UserError(f"unknown baseline {method!r}; choose trak, dtrak, clip or pixel")
    return {"shape": list(scores.shape)}, scores


def _baseline_trained(run_dir: Path, args: dict) -> bool:
    """Whether this run already has the method's training-set features (a finished job of the
    same method and model; their cache is per run and model, not per query)."""
    from attribution import jobs

    return any(s["kind"] == "baseline" and s["status"] == "done" and s["args"].get("method") == args["method"]
               and s["args"].get("model") == args.get("model") for s in jobs.list_jobs(run_dir))


def _needs_baseline(run_dir: Path, args: dict) -> list[str]:
    if args.get("method") == "pixel" or _baseline_trained(run_dir, args):
        return []
    return [f"{args.get('method')} training features"]


def _plan_baseline(run_dir: Path, args: dict, needs: list[str]) -> list[dict]:
    from attribution.baselines import DEFAULT_NUM_DRAWS
    from attribution.runs import open_run

    method = args.get("method")
    if method == "pixel":
        return []
    run = open_run(run_dir)
    n, p, q = _training_size(run), _model_size(run), len(args["query_indices"])
    if method == "clip":
        return [{"name": "CLIP embeddings of the training images", "kind": "clip", "units": n}] if needs else []
    plan = []
    if needs:
        plan.append({"name": f"{method.upper()} training gradients ({n:,} images)", "kind": "baseline_train",
                     "variant": method, "units": n * DEFAULT_NUM_DRAWS, **p})
    plan.append({"name": "query gradients", "kind": "baseline_query", "units": q * DEFAULT_NUM_DRAWS, **p})
    return plan


# ----------------------------------------------------------------------------- warm-up


def _run_warmup(run_dir: Path, args: dict, progress) -> dict:
    """Prepare other settings in the background, one job after another (``args["steps"]``: a
    list of ``{"kind", "args", "label"}``), each started as an ordinary low-priority job of the
    same owner, so a session that asks for one of them joins that job instead of building twice."""
    from attribution import jobs
    from attribution.jobs import JobCancelled

    steps = list(args.get("steps", []))
    owner = progress.state.get("owner")
    built = []
    for k, step in enumerate(steps):
        progress(k, len(steps), f"warm-up {k + 1} of {len(steps)}: {step.get('label', step['kind'])}")
        jid = jobs.job_id(step["kind"], step["args"])
        state = jobs.status(run_dir, jid)
        if state is not None and state["status"] == "done" and jobs.has_result(run_dir, state):
            continue
        jobs.start(step["kind"], run_dir, step["args"], mode=jobs.app_mode(), owner=owner, label=step.get("label"),
                   priority="background")
        while True:
            try:
                state = jobs.wait(run_dir, jid, timeout=1.0)
                break
            except TimeoutError:
                if progress.cancelled():
                    jobs.cancel(run_dir, jid, by=owner)
                    raise JobCancelled("warm-up cancelled; what was built is kept") from None
        built.append({"label": step.get("label"), "status": state["status"]})
    progress(len(steps), len(steps), "warm-up finished")
    return {"steps": len(steps), "built": built}


def _plan_warmup(run_dir: Path, args: dict, needs: list[str]) -> list[dict]:
    return [{"name": "warm-up", "kind": "warmup", "units": None}]


def _run_regenerate(run_dir: Path, args: dict, progress) -> dict:
    """Counterfactual regeneration (attribution/regen_job.py): retrain without top-k, regenerate."""
    from attribution.regen_job import run_job

    return run_job(run_dir, args, progress)


def _plan_regenerate(run_dir: Path, args: dict, needs: list[str]) -> list[dict]:
    return [{"name": "counterfactual regeneration", "kind": "regenerate", "units": None}]


def _lds_job(args: dict):
    from attribution.evaluation import LDSJob

    return LDSJob(num_subsets=int(args["subsets"]), num_seeds=int(args["seeds"]),
                  measurements=tuple(args.get("measurements", ("loss",))), num_draws=int(args.get("draws", 128)),
                  query_set=args.get("query_set", "queries"))


def _run_lds(run_dir: Path, args: dict, progress) -> dict:
    """LDS ground truth on the configured executor (the Ray cluster at $ATTRIBUTION_RAY_ADDRESS when
    set, else this machine): retrain, measure, collect. Resumable; cancelling stops between units."""
    from attribution.jobs import JobCancelled
    from attribution.retrain_units import ground_truth_job
    from attribution.runs import open_run

    out = ground_truth_job(open_run(run_dir), _lds_job(args), progress=progress, workers=int(args.get("workers", 1)))
    if out is None:
        raise JobCancelled("LDS ground truth stopped; start it again to resume")
    return {k: str(v) for k, v in out.items()}


def _needs_lds(run_dir: Path, args: dict) -> list[str]:
    return [f"LDS ground truth of {Path(run_dir).resolve()} ({config_hash(args, 8)})"]


def _plan_lds(run_dir: Path, args: dict, needs: list[str]) -> list[dict]:
    return [{"name": f"LDS ground truth ({args['subsets']} subsets x {args['seeds']} seeds)", "kind": "lds",
             "units": None}]


KINDS: dict[str, JobKind] = {
    "train": JobKind(_run_train, _needs_train, _plan_train),
    "sample": JobKind(_run_sample, _needs_sample, _plan_sample),
    "influence": JobKind(_run_influence, _needs_influence, _plan_influence),
    "baseline": JobKind(_run_baseline, _needs_baseline, _plan_baseline),
    "warmup": JobKind(_run_warmup, lambda run_dir, args: [], _plan_warmup),
    # retrains models: a build (it takes a slot), keyed by its own args
    "regenerate": JobKind(_run_regenerate, lambda run_dir, args: [f"counterfactual regeneration {config_hash(args, 8)}"],
                          _plan_regenerate),
    "lds": JobKind(_run_lds, _needs_lds, _plan_lds),
}


def warmup_steps(settings: dict, query_set: str, query: int, model: str, baselines: list[str],
                 rounds: Optional[int] = None) -> list[dict]:
    """The warm-up after a first gallery: the other seven Hessian variants (nearest first: the other
    weight sharing, the other Fisher, both; then the other method's four) and the baselines,
    with the args the Attribute page asks for (``rounds``: the store rounds its gallery is scored
    with, so the warm-up builds factors only and never waits for the store's refinement)."""
    from attribution.attribute_text import VARIANTS, settings_label

    here = (settings["method"], settings["fisher"], settings["kfac_type"])
    order = sorted((v for v in VARIANTS if v != here),
                   key=lambda v: (v[0] != here[0], (v[1] != here[1]) + (v[2] != here[2]), v))
    common = {"query_set": query_set, "query_indices": [int(query)], "model": model}
    steps = []
    for method, fisher, kfac_type in order:
        s = {**settings, "method": method, "fisher": fisher, "kfac_type": kfac_type}
        args = {"settings": s, **common, **({} if rounds is None else {"rounds": int(rounds)})}
        steps.append({"kind": "influence", "args": args, "label": settings_label(s, query_set, int(query))})
    for name in baselines:
        steps.append({"kind": "baseline", "args": {"method": name, **common},
                      "label": f"{name.upper() if 'trak' in name else name} baseline · query {query_set}[{query}]"})
    return steps
