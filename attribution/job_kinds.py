"""What each kind of background job does, what it must build first, and its plan of stages.

Every kind has three functions:
- ``run(run_dir, args, progress)``: the work (returns a JSON-able result, or ``(result, scores)``
  for score jobs; scores ``[Q, N]``);
- ``needs(run_dir, args)``: the artifacts the job would build now, as keys shared by every job
  that builds the same thing (``[]`` = everything is cached: the job only re-scores, takes a
  second and never waits for a build slot);
- ``plan(run_dir, args, needs)``: the stages it will run, for time estimates
  (:mod:`attribution.job_estimates`).

:mod:`attribution.jobs` uses ``needs`` so that a job waits for the running job that builds an
artifact it needs (never a second build of it), and runs beside builds of other artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def _settings(args: dict):
    from attribution.influence import InfluenceSettings

    return InfluenceSettings(**args["settings"])


def artifact_keys(query_set: str, settings) -> dict[str, str]:
    """The shared key of each artifact an influence job may build, by ``influence_status`` name.

    The query-gradient key leaves out the query indices: all queries of a sample set share one
    cache file per measurement and draws, so two of its builds must not run at once."""
    m = settings.gradient_measurement
    return {
        "store": f"training-gradient store ({settings.train_draws} draws from {settings.preview_draws}, "
                 f"{settings.draw_scheme}, seed {settings.seed}, {settings.store_dtype})",
        "factors": f"{settings.method} factors ({settings.fisher}, {settings.kfac_type}, "
                   f"{settings.factor_draws} draws, seed {settings.seed})",
        "query_gradients": f"query gradients ({query_set}, {m}, {settings.query_draws} draws, seed {settings.seed})",
    }


def _run_influence(run_dir: Path, args: dict, progress):
    """Scores with the store grown to ``args["rounds"]`` rounds (None: all of them); the result
    carries the stability figures and, per query row, the scores' standard errors."""
    from attribution.influence import influence_result
    from attribution.runs import open_run

    run = open_run(run_dir)
    res = influence_result(run, args["query_set"], list(args["query_indices"]), _settings(args), progress=progress,
                           rounds=args.get("rounds"), k=int(args.get("k", 16)))
    out = {"shape": list(res.scores.shape),
           "stability": [res.summary(i) for i in range(res.scores.shape[0])],
           "se": None if res.se is None else [[round(float(x), 9) for x in row] for row in res.se]}
    return out, res.scores


def _needs_influence(run_dir: Path, args: dict) -> list[str]:
    from attribution.influence import influence_status
    from attribution.runs import open_run

    settings = _settings(args)
    have = influence_status(open_run(run_dir), args["query_set"], list(args["query_indices"]), settings,
                            rounds=args.get("rounds"))
    keys = artifact_keys(args["query_set"], settings)
    out = []
    for name, value in have.items():  # tolerant of new entries (non-bool ones are information)
        if value is False:
            out.append(keys.get(name, f"{name} ({config_hash([args['query_set'], settings.to_dict()], 8)})"))
    return out


def _training_size(run) -> int:
    from attribution.influence import run_training_table

    return len(run_training_table(run))


def _model_size(run) -> dict:
    """``{"params": K-FAC parameters, "pixels": image pixels}`` (what a stage's cost scales with)."""
    from attribution.gradients import kfac_parameters, num_parameters

    unet = run.load_unet()
    return {"params": num_parameters(kfac_parameters(unet)), "pixels": int(unet.config.sample_size) ** 2}


def _plan_influence(run_dir: Path, args: dict, needs: list[str]) -> list[dict]:
    from attribution.runs import open_run

    settings = _settings(args)
    run = open_run(run_dir)
    keys = artifact_keys(args["query_set"], settings)
    n, p, q = _training_size(run), _model_size(run), len(args["query_indices"])
    variant = f"{settings.fisher}/{settings.kfac_type}"
    name = "EK-FAC" if settings.method == "ekfac" else "K-FAC"
    plan = []
    if keys["query_gradients"] in needs:
        plan.append({"name": f"query gradients of the {settings.gradient_measurement} ({q} x {settings.query_draws} draws)",
                     "kind": "query_gradients", "units": q * settings.query_draws, **p})
    if keys["factors"] in needs:
        if settings.method == "ekfac":
            plan.append({"name": "EK-FAC factors, pass 1 of 2: Kronecker factors", "kind": "factors",
                         "variant": variant, "units": n * settings.factor_draws, **p})
            plan.append({"name": "EK-FAC factors, pass 2 of 2: eigenvalue correction", "kind": "factors_pass2",
                         "variant": variant, "units": n * settings.factor_draws, **p})
        else:
            plan.append({"name": f"{name} factors", "kind": "factors", "variant": variant,
                         "units": n * settings.factor_draws, **p})
    if keys["store"] in needs:
        from attribution.influence import store_rounds_done

        rounds = settings.rounds if args.get("rounds") is None else min(int(args["rounds"]), settings.rounds)
        done = store_rounds_done(run, settings)
        draws = sum(settings.round_draws[done:rounds])
        plan.append({"name": f"training-gradient store ({n:,} images x {draws} draws, rounds {done + 1}-{rounds} "
                             f"of {settings.rounds})", "kind": "store", "units": n * draws, **p})
    return plan


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
        jobs.start(step["kind"], run_dir, step["args"], owner=owner, label=step.get("label"), priority="background")
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


KINDS: dict[str, JobKind] = {
    "train": JobKind(_run_train, _needs_train, _plan_train),
    "sample": JobKind(_run_sample, _needs_sample, _plan_sample),
    "influence": JobKind(_run_influence, _needs_influence, _plan_influence),
    "baseline": JobKind(_run_baseline, _needs_baseline, _plan_baseline),
    "warmup": JobKind(_run_warmup, lambda run_dir, args: [], _plan_warmup),
    "regenerate": JobKind(_run_regenerate, lambda run_dir, args: [], _plan_regenerate),
}


def warmup_steps(settings: dict, query_set: str, query: int, model: str, baselines: list[str]) -> list[dict]:
    """The warm-up after a first gallery: the other seven Hessian variants (nearest first: the other
    weight sharing, the other Fisher, both; then the other method's four) and the baselines,
    with exactly the args the Attribute page asks for, so a later switch finds them done."""
    from attribution.attribute_text import VARIANTS, settings_label

    here = (settings["method"], settings["fisher"], settings["kfac_type"])
    order = sorted((v for v in VARIANTS if v != here),
                   key=lambda v: (v[0] != here[0], (v[1] != here[1]) + (v[2] != here[2]), v))
    common = {"query_set": query_set, "query_indices": [int(query)], "model": model}
    steps = []
    for method, fisher, kfac_type in order:
        s = {**settings, "method": method, "fisher": fisher, "kfac_type": kfac_type}
        steps.append({"kind": "influence", "args": {"settings": s, **common},
                      "label": settings_label(s, query_set, int(query))})
    for name in baselines:
        steps.append({"kind": "baseline", "args": {"method": name, **common},
                      "label": f"{name.upper() if 'trak' in name else name} baseline · query {query_set}[{query}]"})
    return steps
