"""Measurements m(theta, x') that influence scores explain (method.md §4).

Every measurement is oriented like a loss (lower = the model finds x' more likely), so the
sign convention of method.md §2 reads the same for all of them and measurement substitution
(explaining the ELBO with the loss's gradient, paper Fig. 2b) keeps its sign:

- ``loss``         E_{t~U, eps} ||eps - eps_theta(x_t, t)||^2 (summed over pixels); the training loss.
- ``lt:T``         the same at one 0-indexed timestep T (paper's t = T + 1).
- ``elbo``         Ho et al. (2020) eq. (5) bound L = L_T + sum_{t>1} L_{t-1} + L_0 in nats, i.e. the
                   NEGATIVE evidence lower bound (an upper bound on -log p(x')):
                   prior KL L_T (parameter-free), KL terms w_t ||eps - eps_theta||^2 with
                   w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)), and the t = 1 reconstruction
                   term -log p(x_0 | x_1) with Ho et al.'s discretised Gaussian decoder.
                   Importance-weighted MC over t (see :func:`elbo_proposal`).
- ``elbo-large``   the same bound with the official code's "fixed_large" reverse variance sigma_t^2 = beta_t
                   (t > 1; the decoder keeps the clipped small variance, as in Ho et al.'s code), whose
                   KL terms carry a parameter-free constant besides the weighted MSE.
- ``elbo-simple``  the paper's ELBO* / official code: sum_{t=0}^{T-1} w'_t ||eps - eps_theta||^2 with
                   w'_t = beta_t / (2 alpha_t (1 - abar_t)) (= the fixed_large KL weight), t drawn
                   uniformly over ALL T steps, t = 0 included (estimate: T * w'_t * mse).
- ``trajectory``   NEGATIVE log-density of the recorded sampling trajectory,
                   -[log p(x_T) + sum_t log N(x_{t-1}; mu_theta(x_t, t), sigma_t^2 I)]; the sum over
                   the T transitions is estimated from ``num_draws`` transitions drawn without
                   replacement (exact when num_draws >= T).
- ``square-norm``  D-TRAK's ||eps_theta(x_t, t)||^2 averaged over pixels, t ~ U, eps ~ N(0, I).

Decoder / last-step variance: the "small" variance sigma_1^2 is 0, which makes the last sampling
step deterministic (a delta density). Like Ho et al.'s code (``posterior_log_variance_clipped``)
we use sigma_2^2 (index 1 of ``Schedule.sigma2``) for the t = 1 decoder and for the last
transition of the trajectory density.

Common random numbers: the (t, eps) draws of example i depend only on (seed, i), never on the
model, the batch size or the chunking; the same seed gives the same draws for every model
(needed for LDS ground truth). ``offset`` shifts i for callers that pass a slice of a dataset
(an int), or gives each image's global index (a sequence).

:class:`DrawOptions` refines how the draws are made (all defaults = the plain i.i.d. draws):
- ``scheme``: ``iid`` (t and eps independent per draw and example), ``stratified`` (the K timesteps
  of an example are stratified: one uniform per stratum of the proposal's CDF), ``common`` (the
  stratified timesteps AND the noise are shared by every example: keyed by (seed, round) only, so
  scores of different training examples compare like with like; each example's estimate stays
  unbiased), ``importance`` (stratified timesteps from a per-run proposal, reweighted: unbiased),
  ``antithetic`` (importance, with draws in pairs (t, eps), (t, -eps): the large part of a small-t
  loss gradient is odd in eps and cancels within a pair; an odd K adds one unpaired draw).
- ``draw_round``: draws come in rounds with their own generators, so a gradient store grown round
  by round equals one built in one go with the same rounds.
- ``hflip``: an independent horizontal flip of x_0 per draw (the training augmentation, paper
  App. G.8), drawn after t and eps from the same stream, so flip-free draws are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from attribution.ddpm import Schedule, posterior_mean, predict_eps, q_sample
from attribution.errors import UserError

MEASUREMENTS = ("loss", "lt", "elbo", "elbo-large", "elbo-simple", "trajectory", "square-norm")
ELBOS = ("elbo", "elbo-large", "elbo-simple")

# Share of ELBO draws spent on the t = 1 reconstruction term (the rest is spread over the KL
# terms proportionally to w_t). Any share in (0, 1) gives an unbiased estimate.
ELBO_DECODER_SHARE = 0.1


@dataclass(frozen=True)
class Measurement:
    name: str  # one of MEASUREMENTS
    timestep: Optional[int] = None  # for "lt": 0-indexed timestep

    def __str__(self) -> str:
        return f"lt:{self.timestep}" if self.name == "lt" else self.name


def parse_measurement(text: str) -> Measurement:
    """``"loss"``, ``"elbo"``, ``"elbo-simple"``, ``"trajectory"``, ``"square-norm"`` or ``"lt:500"``."""
    s = str(text).strip().lower()
    if s.startswith("lt:") or s.startswith("lt="):
        try:
            t = int(s[3:])
        except ValueError:
            raise UserError(f"measurement {text!r}: lt needs an integer timestep, e.g. lt:500") from None
        if t < 0:
            raise UserError(f"measurement {text!r}: the timestep must be >= 0")
        return Measurement("lt", t)
    if s in MEASUREMENTS and s != "lt":
        return Measurement(s)
    raise UserError(
        f"unknown measurement {text!r}; choose loss, lt:T (0-indexed timestep), elbo, elbo-large, elbo-simple, "
        "trajectory or square-norm"
    )


class DrawScheme(str, Enum):
    """How the (t, eps) draws of the examples relate to each other (see the module docstring)."""

    IID = "iid"
    STRATIFIED = "stratified"
    COMMON = "common"
    IMPORTANCE = "importance"  # stratified draws from a timestep proposal (Neyman allocation), reweighted
    ANTITHETIC = "antithetic"  # importance, with the draws in antithetic pairs (t, eps) and (t, -eps)


PROPOSAL_SCHEMES = (DrawScheme.IMPORTANCE.value, DrawScheme.ANTITHETIC.value)  # schemes that use a proposal


# Timestep bins of the importance proposal, as fractions of T (fine where the loss gradients are large).
PROPOSAL_EDGES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True)
class DrawOptions:
    """Refinements of the MC draws; the defaults give the plain i.i.d. draws.

    ``proposal``: for the ``importance`` scheme, the probability of each PROPOSAL_EDGES bin
    (uniform within a bin); the loss's uniform t is then estimated with weights p(t) / q(t).
    """

    scheme: str = "iid"
    hflip: bool = False
    draw_round: int = 0
    proposal: Optional[tuple[float, ...]] = None
    # training-side gradients of a model with dropout are taken in train() mode, as in the official
    # code; the dropout masks are then drawn from a generator keyed like the draws (gradients.py)
    train_mode: bool = False

    def __post_init__(self):
        try:
            object.__setattr__(self, "scheme", DrawScheme(str(self.scheme).lower()).value)
        except ValueError:
            raise UserError(f"unknown draw scheme {self.scheme!r}; choose "
                            f"{', '.join(x.value for x in DrawScheme)}") from None
        if self.draw_round < 0:
            raise UserError(f"draw rounds are numbered from 0, got {self.draw_round}")
        if self.proposal is not None:
            q = tuple(float(x) for x in self.proposal)
            if len(q) != len(PROPOSAL_EDGES) - 1 or min(q) <= 0:
                raise UserError(f"a timestep proposal needs {len(PROPOSAL_EDGES) - 1} positive bin weights")
            if abs(sum(q) - 1) > 1e-12:  # normalise once: a proposal read back from a store stays bit-identical
                q = tuple(x / sum(q) for x in q)
            object.__setattr__(self, "proposal", q)


def proposal_pmf(proposal: Sequence[float], T: int) -> Tensor:
    """Per-timestep probabilities ``[T]`` float64 of a bin proposal (uniform within each bin)."""
    edges = [round(e * T) for e in PROPOSAL_EDGES]
    q = torch.zeros(T, dtype=torch.float64)
    for w, a, b in zip(proposal, edges[:-1], edges[1:]):
        q[a:b] = w / max(b - a, 1)
    return q / q.sum()


PLAIN_DRAWS = DrawOptions()
COMMON_KEY = 3 * 10**9  # generator key of the shared draws of the "common" scheme (no example has it)


# ----------------------------------------------------------------------------- ELBO weights


def reverse_variance(schedule: Schedule, kind: str = "small") -> Tensor:
    """sigma_t^2 of p_theta(x_{t-1} | x_t) per 0-indexed timestep ``[T]``: ``small`` = the posterior
    variance (our sampler's), ``large`` = beta_t (the official code's ELBO)."""
    if kind == "small":
        return schedule.sigma2
    if kind == "large":
        return schedule.betas.clone()
    raise ValueError(kind)


def elbo_weights(schedule: Schedule, variance: str = "small") -> Tensor:
    """w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) for t = 1..T-1 (0-indexed), w_0 = 0: ``[T]``.

    Index 0 (the paper's t = 1) is the reconstruction term, not a weighted MSE, hence 0 here.
    ``variance``: the reverse variance sigma_t^2, ``small`` or ``large`` (:func:`reverse_variance`).
    """
    s2 = reverse_variance(schedule, variance)
    w = schedule.betas**2 / (2 * s2.clamp_min(1e-300) * schedule.alphas * (1 - schedule.alpha_bars))
    w[0] = 0.0
    return w


def elbo_simple_weights(schedule: Schedule) -> Tensor:
    """The official code's ELBO* weights w'_t = beta_t / (2 alpha_t (1 - abar_t)) for every
    0-indexed t, t = 0 included: ``[T]``."""
    return schedule.betas / (2 * schedule.alphas * (1 - schedule.alpha_bars))


def elbo_kl_constants(schedule: Schedule, variance: str, pixels: int) -> float:
    """Sum over t = 1..T-1 of the parameter-free part of KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)):
    0.5 * D * (r - 1 - log r) with r = posterior variance / sigma_t^2 (0 for the small variance)."""
    r = schedule.sigma2[1:] / reverse_variance(schedule, variance)[1:]
    return float(0.5 * pixels * (r - 1 - torch.log(r)).sum())


def elbo_proposal(schedule: Schedule, kind: str) -> Tensor:
    """Importance proposal q(t) over 0-indexed timesteps ``[T]`` (float64, sums to 1).

    ``elbo-simple``: uniform over all T steps (the official code's draw). ``elbo`` / ``elbo-large``:
    KL terms get mass proportional to w_t, the decoder (t = 0) gets ELBO_DECODER_SHARE.
    """
    if kind == "elbo-simple":
        return torch.full((schedule.T,), 1.0 / schedule.T, dtype=torch.float64)
    w = elbo_weights(schedule, "large" if kind == "elbo-large" else "small")
    q = w / w.sum() * (1 - ELBO_DECODER_SHARE)
    q[0] = ELBO_DECODER_SHARE
    return q


def decoder_variance(schedule: Schedule) -> float:
    """Variance of the t = 1 decoder and of the last sampling transition (sigma_2^2, clipped)."""
    return float(schedule.sigma2[1])


def transition_variance(schedule: Schedule) -> Tensor:
    """sigma_t^2 of each 0-indexed timestep with index 0 clipped to index 1's: ``[T]``."""
    v = schedule.sigma2.clone()
    v[0] = v[1]
    return v


def prior_kl(schedule: Schedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) summed over pixels: ``[B]`` float64."""
    abar = schedule.alpha_bars[-1]
    x0 = x0.double().flatten(1)
    return 0.5 * (abar * x0.pow(2) + (1 - abar) - 1 - torch.log(1 - abar)).sum(1)


def discretized_gaussian_nll(x0: Tensor, mean: Tensor, var: float) -> Tensor:
    """-log p(x0) of Ho et al.'s discretised Gaussian decoder (256 bins on [-1, 1]): ``[B]``.

    x0, mean: ``[B, ...]``. Edge bins extend to +-infinity, as in Ho et al.'s code.
    """
    x0 = x0.double()
    centred = x0 - mean.double()
    inv_std = 1.0 / math.sqrt(var)
    cdf_plus = torch.special.ndtr(inv_std * (centred + 1.0 / 255))
    cdf_min = torch.special.ndtr(inv_std * (centred - 1.0 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp_min(1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp_min(1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp_min(1e-12))
    logp = torch.where(x0 < -0.999, log_cdf_plus, torch.where(x0 > 0.999, log_one_minus_cdf_min, log_delta))
    return -logp.flatten(1).sum(1)


def gaussian_nll(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """-log N(x; mean, var I) summed over pixels: ``[B]`` float64; var: ``[B]``."""
    d = x[0].numel()
    sq = (x.double() - mean.double()).flatten(1).pow(2).sum(1)
    var = var.double()
    return sq / (2 * var) + 0.5 * d * torch.log(2 * math.pi * var)


# ----------------------------------------------------------------------------- draw plans


def example_key(offset, position: int) -> int:
    """Global draw key of the example at ``position``: ``offset + position`` for an int offset,
    ``offset[position]`` for a sequence of global indices."""
    return int(offset) + position if isinstance(offset, (int, np.integer)) else int(offset[position])


def example_generator(seed: int, index: int, draw_round: int = 0) -> torch.Generator:
    """The generator of example ``index``'s draws of round ``draw_round``: a function of these only
    (round 0 keeps the key (seed, index) that the draws always had)."""
    entropy = [int(seed) & 0xFFFFFFFF, int(index)] + ([int(draw_round)] if draw_round else [])
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


@dataclass
class DrawPlan:
    """Rows of network evaluations for a group of examples, ``R = B * K`` rows, K per example.

    kind: "mse" (coef * ||target - eps_theta||^2), "elbo" (MSE rows, with rows where t == 0
    being decoder rows coef * -log p(target | mu_theta)), "traj" (coef * -log N(target; mu_theta,
    var)), "sqnorm" (coef * mean(eps_theta^2)).
    """

    kind: str
    x_in: Tensor  # [R, C, H, W]  network input x_t
    t: Tensor  # [R] long
    target: Tensor  # [R, C, H, W]  eps (mse/elbo), x_0 (elbo decoder rows) or x_{t-1} (traj)
    coef: Tensor  # [R] float64, includes 1/K and importance weights
    const: Tensor  # [B] float64, parameter-free part of each example's measurement
    per_example: int  # K


def _uniforms(K: int, g: torch.Generator, stratified: bool) -> Tensor:
    """K uniforms in [0, 1) ``[K]`` float64: i.i.d., or one per stratum [k/K, (k+1)/K)."""
    u = torch.rand(K, generator=g, dtype=torch.float64)
    return (torch.arange(K, dtype=torch.float64) + u) / K if stratified else u


def _inverse_cdf(q: Tensor, u: Tensor) -> Tensor:
    """Timesteps ``[K]`` with P(t) = q[t] from uniforms ``u`` ``[K]`` (inverse CDF)."""
    cdf = torch.cumsum(q, 0)
    cdf = cdf / cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=q.numel() - 1)


def _draw_timesteps(
    m: Measurement, schedule: Schedule, K: int, g: torch.Generator, timesteps: Optional[Sequence[int]],
    stratified: bool = False, proposal: Optional[Sequence[float]] = None,
) -> tuple[Tensor, Tensor]:
    """Timesteps ``[K]`` and their importance coefficients ``[K]`` (already divided by K)."""
    T = schedule.T
    if timesteps is not None:
        ts = torch.as_tensor(list(timesteps), dtype=torch.long)
        if m.name not in ("loss", "square-norm"):
            raise UserError(f"fixed timesteps are only supported for loss and square-norm, not {m}")
        if len(ts) == 0 or K % len(ts) != 0:
            raise UserError(f"num_draws ({K}) must be a positive multiple of the {len(ts)} fixed timesteps")
        if ts.min() < 0 or ts.max() >= T:
            raise UserError(f"fixed timesteps must lie in 0..{T - 1}")
        return ts.repeat(K // len(ts)), torch.full((K,), 1.0 / K, dtype=torch.float64)
    if m.name == "lt":
        if not 0 <= m.timestep < T:
            raise UserError(f"measurement lt:{m.timestep}: the timestep must lie in 0..{T - 1}")
        return torch.full((K,), m.timestep, dtype=torch.long), torch.full((K,), 1.0 / K, dtype=torch.float64)
    if m.name in ELBOS:
        q = elbo_proposal(schedule, m.name)
        if stratified:
            t = _inverse_cdf(q, _uniforms(K, g, True))
        else:  # the historical draw (kept: shipped ground truth used it)
            t = torch.multinomial(q, K, replacement=True, generator=g)
        if m.name == "elbo-simple":
            num = elbo_simple_weights(schedule)[t]
        else:  # estimator term_t / q(t); a KL term is w_t * mse, a decoder term (t == 0) has weight 1
            w = elbo_weights(schedule, "large" if m.name == "elbo-large" else "small")
            num = torch.where(t == 0, torch.ones_like(w[t]), w[t])
        return t, num / q[t] / K
    if proposal is not None:  # importance-sampled uniform t: weight (1 / T) / q(t)
        q = proposal_pmf(proposal, T)
        t = _inverse_cdf(q, _uniforms(K, g, True))
        return t, (1.0 / T) / q[t] / K
    if stratified:
        t = (_uniforms(K, g, True) * T).long().clamp_(max=T - 1)
    else:
        t = torch.randint(0, T, (K,), generator=g)
    return t, torch.full((K,), 1.0 / K, dtype=torch.float64)


def _antithetic_draws(m: Measurement, schedule: Schedule, K: int, g: torch.Generator,
                      timesteps: Optional[Sequence[int]], proposal, shape, hflip: bool):
    """K draws as floor(K/2) antithetic pairs (t, eps, flip), (t, -eps, flip) plus, for odd K, one
    independent draw: t ``[K]``, coef ``[K]`` (sum to the plain estimator's weights), eps ``[K, ...]``,
    flip ``[K]`` or None. Each pair's t is stratified over K // 2 strata; the pairs' estimate and the
    extra draw are each unbiased, so their K-weighted mean is too."""
    P = K // 2
    t, c = _draw_timesteps(m, schedule, P, g, timesteps, True, proposal)  # c sums to the weights / P
    eps = torch.randn((P, *shape), generator=g, dtype=torch.float64)
    flip = torch.rand(P, generator=g) < 0.5 if hflip else None
    t, c = t.repeat_interleave(2), c.repeat_interleave(2) * P / K
    eps = torch.stack([eps, -eps], 1).flatten(0, 1)
    flip = None if flip is None else flip.repeat_interleave(2)
    if K % 2:
        t1, c1 = _draw_timesteps(m, schedule, 1, g, timesteps, True, proposal)
        e1 = torch.randn((1, *shape), generator=g, dtype=torch.float64)
        t, c, eps = torch.cat([t, t1]), torch.cat([c, c1 / K]), torch.cat([eps, e1])
        if flip is not None:
            flip = torch.cat([flip, torch.rand(1, generator=g) < 0.5])
    return t, c, eps, flip


def draw_plan(
    schedule: Schedule,
    images: Tensor,
    m: Measurement,
    num_draws: int,
    seed: int,
    indices: Sequence[int],
    trajectory: Optional[Tensor] = None,
    timesteps: Optional[Sequence[int]] = None,
    offset=0,
    options: DrawOptions = PLAIN_DRAWS,
) -> DrawPlan:
    """The rows for ``images[indices]`` (their draws keyed by :func:`example_key`, ``options``'s
    round and, for the ``common`` scheme, shared by all examples)."""
    if num_draws < 1:
        raise UserError(f"the number of MC draws must be >= 1, got {num_draws}")
    T = schedule.T
    idx = list(indices)
    x0 = images[idx].double()
    shape = x0.shape[1:]
    if m.name == "trajectory":
        if trajectory is None:
            raise UserError("the trajectory measurement needs the samples' recorded trajectories "
                            "(draw the query samples with --trajectory)")
        if trajectory.shape[0] != T + 1 or trajectory.shape[1] != images.shape[0]:
            raise UserError(f"trajectory shape {tuple(trajectory.shape)} does not match T+1={T + 1} "
                            f"steps and {images.shape[0]} images")
        K = min(num_draws, T)
        xs, ts, tg, cf, const = [], [], [], [], []
        for i in idx:
            g = example_generator(seed, example_key(offset, i), options.draw_round)
            s = torch.arange(T) if K == T else torch.randperm(T, generator=g)[:K].sort().values
            xs.append(trajectory[s, i])
            tg.append(trajectory[s + 1, i])
            ts.append(T - 1 - s)
            cf.append(torch.full((K,), T / K, dtype=torch.float64))
            xT = trajectory[0, i:i + 1].double()
            const.append(gaussian_nll(xT, torch.zeros_like(xT), torch.ones(1, dtype=torch.float64))[0])
        return DrawPlan("traj", torch.cat(xs).double(), torch.cat(ts), torch.cat(tg).double(),
                        torch.cat(cf), torch.stack(const), K)
    K = num_draws
    common = options.scheme == DrawScheme.COMMON.value
    stratified = options.scheme != DrawScheme.IID.value
    xs, ts, tg, cf = [], [], [], []
    shared = None
    for b, i in enumerate(idx):
        if shared is None or not common:
            g = example_generator(seed, COMMON_KEY if common else example_key(offset, i), options.draw_round)
            use_q = options.proposal if options.scheme in PROPOSAL_SCHEMES and m.name in (
                "loss", "square-norm") and timesteps is None else None
            if options.scheme == DrawScheme.ANTITHETIC.value and K >= 2 and timesteps is None:
                shared = _antithetic_draws(m, schedule, K, g, timesteps, use_q, shape, options.hflip)
            else:
                t, c = _draw_timesteps(m, schedule, K, g, timesteps, stratified, use_q)
                eps = torch.randn((K, *shape), generator=g, dtype=torch.float64)
                flip = torch.rand(K, generator=g) < 0.5 if options.hflip else None
                shared = (t, c, eps, flip)
        t, c, eps, flip = shared
        x0_b = x0[b:b + 1].expand(K, *shape)
        if flip is not None:
            x0_b = torch.where(flip.view(-1, 1, 1, 1), x0_b.flip(-1), x0_b)
        x_t = q_sample(schedule, x0_b, t, eps)
        xs.append(x_t)
        ts.append(t)
        cf.append(c)
        tg.append(torch.where((t == 0).view(-1, 1, 1, 1), x0_b, eps) if m.name in ("elbo", "elbo-large") else eps)
    kind = {"elbo": "elbo", "elbo-large": "elbo", "square-norm": "sqnorm"}.get(m.name, "mse")
    if m.name in ("elbo", "elbo-large"):
        variance = "large" if m.name == "elbo-large" else "small"
        const = prior_kl(schedule, x0) + elbo_kl_constants(schedule, variance, math.prod(shape))
    else:
        const = torch.zeros(len(idx), dtype=torch.float64)
    return DrawPlan(kind, torch.cat(xs), torch.cat(ts), torch.cat(tg), torch.cat(cf), const, K)


def row_terms(schedule: Schedule, kind: str, x_in: Tensor, t: Tensor, target: Tensor,
              eps_pred: Tensor) -> Tensor:
    """Per-row measurement terms (before ``coef``) from the network output: ``[R]`` float64.

    Differentiable in ``eps_pred`` ([R, C, H, W], any float dtype).
    """
    if kind == "sqnorm":
        return eps_pred.double().pow(2).flatten(1).mean(1)
    if kind == "mse":
        return (target.double() - eps_pred.double()).pow(2).flatten(1).sum(1)
    mu = posterior_mean(schedule, x_in.double(), t, eps_pred.double())
    if kind == "traj":
        return gaussian_nll(target, mu, transition_variance(schedule)[t])
    if kind == "elbo":
        mse = (target.double() - eps_pred.double()).pow(2).flatten(1).sum(1)
        dec = t == 0
        if not bool(dec.any()):
            return mse
        nll = torch.zeros_like(mse)
        nll[dec] = discretized_gaussian_nll(target[dec], mu[dec], decoder_variance(schedule))
        return torch.where(dec, nll, mse)
    raise ValueError(kind)


def plan_rows_terms(unet, schedule: Schedule, plan: DrawPlan, rows: slice) -> Tensor:
    """coef * term for ``rows`` of ``plan`` with one forward pass: ``[r]`` float64 (keeps the graph)."""
    dtype = next(unet.parameters()).dtype
    device = next(unet.parameters()).device
    x_in = plan.x_in[rows]
    t = plan.t[rows]
    eps_pred = predict_eps(unet, x_in.to(device=device, dtype=dtype), t.to(device))
    terms = row_terms(schedule, plan.kind, x_in.to(device), t.to(device), plan.target[rows].to(device), eps_pred)
    return terms * plan.coef[rows].to(device)


def example_groups(n: int, per_example: int, rows_per_batch: int) -> Iterator[list[int]]:
    """Consecutive groups of example positions with about ``rows_per_batch`` rows each."""
    g = max(1, rows_per_batch // max(1, per_example))
    for start in range(0, n, g):
        yield list(range(start, min(n, start + g)))


def _check_images(images: Tensor, unet) -> None:
    if images.dim() != 4:
        raise UserError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    cfg = getattr(unet, "config", None) or getattr(getattr(unet, "unet", None), "config", None)
    if cfg is not None and images.shape[1] != cfg.in_channels:
        raise UserError(f"images have {images.shape[1]} channels but the model expects {cfg.in_channels}")


@torch.no_grad()
def measurement_values(
    unet,
    schedule: Schedule,
    images: Tensor,
    m: Measurement,
    num_draws: int,
    seed: int,
    trajectory: Optional[Tensor] = None,
    batch_size: int = 256,
    timesteps: Optional[Sequence[int]] = None,
    offset=0,
    options: DrawOptions = PLAIN_DRAWS,
) -> Tensor:
    """MC estimate of m(theta, x) for each image: ``[B]`` float64 (common random numbers by seed).

    images: ``[B, C, H, W]`` in [-1, 1]; trajectory: ``[T+1, B, C, H, W]`` (``trajectory`` only).
    """
    _check_images(images, unet)
    was_training = unet.training
    unet.eval()
    out = torch.zeros(images.shape[0], dtype=torch.float64)
    K = min(num_draws, schedule.T) if m.name == "trajectory" else num_draws
    try:
        for group in example_groups(images.shape[0], K, batch_size):
            plan = draw_plan(schedule, images, m, num_draws, seed, group, trajectory, timesteps, offset, options)
            owner = torch.arange(len(group)).repeat_interleave(plan.per_example)
            vals = plan.const.clone()
            for start in range(0, owner.numel(), batch_size):
                rows = slice(start, min(owner.numel(), start + batch_size))
                vals.index_add_(0, owner[rows], plan_rows_terms(unet, schedule, plan, rows).cpu())
            out[group] = vals
    finally:
        unet.train(was_training)
    return out
