"""K-FAC / EK-FAC curvature of the diffusion training loss through curvlinops 3.x (method.md §3).

Scaling convention (stated once, tested in tests/test_curvature.py and tests/test_influence.py):
the user-facing damping ``lambda`` is the paper's and its official code's: it is added to the GGN of
the training loss averaged over the N examples AND over the D = C*H*W pixels (the official code
builds K-FAC on ``MSELoss(reduction="mean")`` and passes lambda straight to curvlinops; method.md §2).
curvlinops is given exactly that loss, so G_curvlinops = G_mean. This package's gradients are of the
squared error SUMMED over pixels (method.md §1), whose GGN is G_sum = D * G_mean, hence

    (G_sum + D * lambda I)^{-1} = (1/D) (G_curvlinops + lambda I)^{-1}.

:class:`Preconditioner` applies the right-hand side with curvlinops' exact damping
(``KFACInverseLinearOperator(..., use_exact_damping=True)``), in float64.

Data given to curvlinops: every training example contributes ``draws`` pre-drawn (t, eps) rows
(the same common-random-number draws as :mod:`attribution.measurements`), re-generated
identically on every traversal, with ``num_data = N * draws`` and
``num_per_example_loss_terms = 1``.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from attribution.ddpm import FlatEpsNet, Schedule
from attribution.errors import UserError
from attribution.gradients import kfac_parameters
from attribution.measurements import DrawOptions, Measurement, draw_plan, example_groups

Progress = Optional[Callable[[int, int, str], None]]
PASS_NAMES = ("Kronecker factors", "eigenvalue correction")  # EK-FAC's two data passes


class CurvatureMethod(str, Enum):
    """Which Kronecker-factored approximation of the GGN."""

    KFAC = "kfac"  # Martens & Grosse 2015; Grosse & Martens 2016 (conv); Eschenhagen et al. 2023
    EKFAC = "ekfac"  # George et al. 2018: K-FAC eigenbasis, re-fitted eigenvalues


class FisherKind(str, Enum):
    """Which curvature K-FAC approximates (Mlodozeniec et al. 2025 §3, method.md §3)."""

    MC = "mc"  # GGN-model / MC Fisher: labels drawn from the model's Gaussian (the paper's choice)
    # GGN-loss / empirical Fisher (what TRAK and D-TRAK use implicitly). Note: curvlinops forms it
    # from per-row gradients, one row per (x_n, t, eps) draw, not from the MC-averaged per-example
    # gradients E_n[grad l_n grad l_n^T] of method.md §3 (which would need per-example K-FAC).
    EMPIRICAL = "empirical"
    TYPE2 = "type-2"  # exact output Hessian: D backward passes per batch (references and tests)


class KFACKind(str, Enum):
    """Weight-sharing variant (Eschenhagen et al. 2023)."""

    EXPAND = "expand"  # the paper's choice, right for a loss summed over shared positions
    REDUCE = "reduce"


def _enum(cls, value, what: str):
    try:
        return cls(str(value).lower())
    except ValueError:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(e.value for e in cls)}") from None


@dataclass(frozen=True)
class CurvatureConfig:
    """Everything that determines a set of Kronecker factors (also their cache key)."""

    method: str = "kfac"
    fisher: str = "mc"
    kfac_type: str = "expand"
    draws: int = 8  # (t, eps) draws per training example
    seed: int = 0
    mc_samples: int = 1  # labels per row for the MC Fisher
    hflip: bool = False  # the run's training augmentation: a random flip per draw (paper App. G.8)

    def __post_init__(self):
        object.__setattr__(self, "method", _enum(CurvatureMethod, self.method, "Hessian approximation").value)
        object.__setattr__(self, "fisher", _enum(FisherKind, self.fisher, "Fisher type").value)
        object.__setattr__(self, "kfac_type", _enum(KFACKind, self.kfac_type, "K-FAC type").value)
        if self.draws < 1 or self.mc_samples < 1:
            raise UserError("curvature draws and mc_samples must be >= 1")
        if self.fisher != FisherKind.MC.value and self.mc_samples != 1:
            raise UserError("mc_samples > 1 only makes sense for the MC Fisher")

    def key(self) -> dict:
        k = asdict(self)
        if not self.hflip:
            k.pop("hflip")  # runs without augmentation keep the cache keys they had
        return k


# ----------------------------------------------------------------------------- data


class TrainingRows:
    """The training data as curvlinops sees it: batches ``({"x": x_t, "t": t}, eps_flat)``.

    Each example contributes ``draws`` rows drawn by :func:`draw_plan` with the training loss's
    common random numbers, so every traversal yields identical batches.
    """

    def __init__(self, schedule: Schedule, images: Tensor, draws: int, seed: int, dtype=torch.float32,
                 rows_per_batch: int = 256, progress: Progress = None, stage: str = "curvature",
                 hflip: bool = False, passes: int = 1):
        self.schedule, self.images, self.draws, self.seed = schedule, images, draws, seed
        self.dtype, self.rows_per_batch = dtype, rows_per_batch
        self.progress, self.stage = progress, stage
        self.options = DrawOptions(hflip=hflip)
        self.groups = list(example_groups(images.shape[0], draws, rows_per_batch))
        self.passes, self._traversal = passes, 0

    @property
    def num_rows(self) -> int:
        return self.images.shape[0] * self.draws

    def __len__(self) -> int:
        return len(self.groups)

    def stage_name(self) -> str:
        """The stage of the current traversal: EK-FAC's two passes get their own names."""
        if self.passes < 2:
            return self.stage
        what = PASS_NAMES[min(self._traversal, len(PASS_NAMES) - 1)]
        return f"{self.stage}, pass {min(self._traversal + 1, self.passes)} of {self.passes}: {what}"

    def __iter__(self):
        stage = self.stage_name()
        for k, group in enumerate(self.groups):
            plan = draw_plan(self.schedule, self.images, Measurement("loss"), self.draws, self.seed, group,
                             options=self.options)
            if self.progress is not None:
                self.progress(k, len(self.groups), stage)
            yield {"x": plan.x_in.to(self.dtype), "t": plan.t}, plan.target.flatten(1).to(self.dtype)
        if self.progress is not None:
            self.progress(len(self.groups), len(self.groups), stage)
        self._traversal += 1


def _batch_size(X) -> int:
    return X["x"].shape[0]


def curvlinops_operator(model, params, data, *, method: str = "kfac", fisher: str = "mc",
                        kfac_type: str = "expand", num_data: Optional[int] = None,
                        num_per_example_loss_terms: Optional[int] = 1, mc_samples: int = 1, seed: int = 0,
                        batch_size_fn=None, loss_func: Optional[torch.nn.Module] = None):
    """A curvlinops (E)KFAC operator over ``params`` (mean-reduced MSE unless ``loss_func``)."""
    from curvlinops import EKFACLinearOperator, FisherType, KFACLinearOperator, KFACType

    cls = {"kfac": KFACLinearOperator, "ekfac": EKFACLinearOperator}[_enum(CurvatureMethod, method, "method").value]
    return cls(
        model, loss_func if loss_func is not None else torch.nn.MSELoss(reduction="mean"), list(params), data,
        fisher_type=FisherType(_enum(FisherKind, fisher, "Fisher type").value),
        kfac_approx=KFACType(_enum(KFACKind, kfac_type, "K-FAC type").value),
        mc_samples=mc_samples, num_per_example_loss_terms=num_per_example_loss_terms, num_data=num_data,
        seed=seed, check_deterministic=False, batch_size_fn=batch_size_fn,
    )


def compute_factors(op) -> None:
    """Run the data traversal(s) that fill the operator's factors (EK-FAC: two traversals)."""
    from curvlinops import EKFACLinearOperator

    if isinstance(op, EKFACLinearOperator):
        op._maybe_compute_ekfac()  # noqa: SLF001 - public matmat would do the same lazily
    else:
        op.compute_kronecker_factors()


# ----------------------------------------------------------------------------- state <-> tensors

_FACTOR_GROUPS = ("input_covariances", "gradient_covariances", "input_covariances_eigenvectors",
                  "gradient_covariances_eigenvectors", "corrected_eigenvalues")
_SCALARS = ("loss_type", "loss_reduction", "progressbar", "seed", "fisher_type", "mc_samples", "kfac_approx",
            "num_per_example_loss_terms", "separate_weight_and_bias", "num_data")


def state_to_tensors(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Flatten a curvlinops (E)KFAC ``state_dict`` (minus the model) to safetensors-able parts."""
    tensors: dict[str, Tensor] = {}
    for group in _FACTOR_GROUPS:
        for name, val in (state.get(group) or {}).items():
            if isinstance(val, dict):
                for pos, t in val.items():
                    tensors[f"{group}|{name}|{pos}"] = t
            elif val is not None:
                tensors[f"{group}|{name}"] = val
    meta = {k: (v.value if isinstance(v, Enum) else v) for k, v in state.items() if k in _SCALARS}
    meta["groups"] = [g for g in _FACTOR_GROUPS if g in state]
    return tensors, meta


def tensors_to_state(tensors: dict[str, Tensor], meta: dict, model, dtype=None) -> dict:
    """Inverse of :func:`state_to_tensors`; ``model``'s weights fill ``model_func_state_dict``."""
    state = {k: meta[k] for k in _SCALARS}
    for g in meta["groups"]:
        state[g] = {}
    for key, t in tensors.items():
        parts = key.split("|")
        t = t.to(dtype) if dtype is not None else t
        if len(parts) == 3:
            state[parts[0]].setdefault(parts[1], {})[int(parts[2])] = t
        else:
            state[parts[0]][parts[1]] = t
    state.update(model_func_state_dict=model.state_dict(), trace=None, det=None, logdet=None, frobenius_norm=None)
    if "input_covariances_eigenvectors" in meta["groups"]:
        state["cached_activations"] = {}
    return state


def operator_from_tensors(model, params, data, tensors: dict[str, Tensor], meta: dict, batch_size_fn=None):
    """Rebuild an (E)KFAC operator on ``model`` (its dtype) from saved factors (no data pass)."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    dtype = params[0].dtype
    cls = EKFACLinearOperator if "corrected_eigenvalues" in meta["groups"] else KFACLinearOperator
    state = tensors_to_state(tensors, meta, model, dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Loading a state dict")
        return cls.from_state_dict(state, model, list(params), data, check_deterministic=False,
                                   batch_size_fn=batch_size_fn)


# ----------------------------------------------------------------------------- preconditioning


class Preconditioner:
    """(G_sum + D lambda I)^{-1} = (1/D) (G_mean + lambda I)^{-1} with exact damping for an (E)KFAC
    operator ``op`` of a mean-reduced MSE over ``output_dim`` = D entries; lambda is the paper's
    (see the module docstring).

    ``apply(V)`` takes ``[Q, P]`` (rows in ``params`` order) and returns ``[Q, P]`` float64.
    For K-FAC the factors' eigendecompositions are computed once (float64, eigenvalues clipped at
    0 against round-off) and shared by every damping value via :meth:`with_damping`.
    """

    def __init__(self, op, damping: float, output_dim: int, _eig_state: Optional[dict] = None):
        from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator

        if not (damping >= 0 and math.isfinite(damping)):
            raise UserError(f"damping must be a finite number >= 0, got {damping}")
        self.op, self.damping, self.D = op, float(damping), int(output_dim)
        self.is_ekfac = isinstance(op, EKFACLinearOperator)
        with torch.enable_grad():  # a live operator computes its factors lazily; do it now
            if self.is_ekfac and not op._corrected_eigenvalues:  # noqa: SLF001
                compute_factors(op)
            elif not self.is_ekfac and not (op._input_covariances or op._gradient_covariances):  # noqa: SLF001
                compute_factors(op)
        inv = KFACInverseLinearOperator(op, damping=self.damping, use_exact_damping=True)
        if not self.is_ekfac:
            if _eig_state is None:
                _eig_state = self._eigendecompose(op)
            # hand curvlinops its cache of (eigenvectors, eigenvalues) per factor (its state format)
            inv._inverse_input_covariances = _eig_state["in"]  # noqa: SLF001
            inv._inverse_gradient_covariances = _eig_state["grad"]  # noqa: SLF001
        self._eig_state = _eig_state
        self.inv = inv

    @staticmethod
    @torch.no_grad()
    def _eigendecompose(op) -> dict:
        out = {"in": {}, "grad": {}}
        for name in op._mapping:  # noqa: SLF001
            for key, src in (("in", op._input_covariances), ("grad", op._gradient_covariances)):  # noqa: SLF001
                f = src.get(name)
                if f is None:
                    out[key][name] = (None, None)
                    continue
                vals, vecs = torch.linalg.eigh(f.double())
                out[key][name] = (vecs.to(f.dtype), vals.clamp_min(0).to(f.dtype))
        return out

    def with_damping(self, damping: float) -> "Preconditioner":
        """The same factors with another (paper-scale) damping; reuses the eigendecompositions."""
        return Preconditioner(self.op, damping, self.D, self._eig_state)

    @torch.no_grad()
    def apply(self, V: Tensor) -> Tensor:
        """(G_sum + D lambda I)^{-1} V^T, transposed back: ``[Q, P]`` float64."""
        dtype = self.inv.dtype
        out = self.inv @ V.to(dtype).T.contiguous()
        return (out.T / self.D).to(torch.float64)


# ----------------------------------------------------------------------------- diffusion models


def output_dim(unet) -> int:
    cfg = unet.config
    return int(cfg.out_channels * cfg.sample_size * cfg.sample_size)


def build_factors(unet, schedule: Schedule, images: Tensor, cfg: CurvatureConfig, progress: Progress = None,
                  rows_per_batch: int = 256) -> tuple[dict[str, Tensor], dict]:
    """Compute the (E)KFAC factors of the training loss on ``images`` ``[N, C, H, W]``.

    Returns ``(tensors, meta)`` as :func:`state_to_tensors` (ready for ``runs.save_tensors``).
    """
    model = FlatEpsNet(unet).eval()
    params = kfac_parameters(model)
    stage = f"{'EK-FAC' if cfg.method == 'ekfac' else 'K-FAC'} factors ({cfg.fisher} Fisher, {cfg.kfac_type})"
    data = TrainingRows(schedule, images, cfg.draws, cfg.seed, params[0].dtype, rows_per_batch, progress, stage,
                        hflip=cfg.hflip, passes=2 if cfg.method == "ekfac" else 1)
    op = curvlinops_operator(model, params, data, method=cfg.method, fisher=cfg.fisher, kfac_type=cfg.kfac_type,
                             num_data=data.num_rows, num_per_example_loss_terms=1, mc_samples=cfg.mc_samples,
                             seed=cfg.seed, batch_size_fn=_batch_size)
    compute_factors(op)
    state = op.state_dict()
    tensors, meta = state_to_tensors(state)
    meta.update(cfg.key())
    meta["output_dim"] = output_dim(unet)
    return tensors, meta


def _fresh_copy(unet):
    """A new model with ``unet``'s weights (from its config and detached state dict). Why not
    copy.deepcopy: a model that has been through autograd hooks may hold non-leaf tensors, which
    deepcopy refuses."""
    if hasattr(unet, "config") and hasattr(type(unet), "from_config"):
        fresh = type(unet).from_config(unet.config)
        fresh.load_state_dict(unet.state_dict())
        return fresh.to(next(unet.parameters()).dtype)
    return copy.deepcopy(unet)


def preconditioner_from_factors(unet, schedule: Schedule, tensors: dict[str, Tensor], meta: dict,
                                damping: float) -> Preconditioner:
    """A float64 :class:`Preconditioner` for saved factors (a float64 copy of the model)."""
    model = FlatEpsNet(_fresh_copy(unet)).double().eval()
    params = kfac_parameters(model)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    dummy = [({"x": torch.zeros(1, *shape, dtype=torch.float64), "t": torch.zeros(1, dtype=torch.long)},
              torch.zeros(1, math.prod(shape), dtype=torch.float64))]
    op = operator_from_tensors(model, params, dummy, tensors, meta, batch_size_fn=_batch_size)
    return Preconditioner(op, damping, meta["output_dim"])


def curvature_factors(run, images, cfg: CurvatureConfig, progress: Progress = None,
                      unet=None) -> tuple[dict[str, Tensor], dict]:
    """The run's cached factors for ``cfg`` (built and saved on first use).

    ``images``: the training images ``[N, C, H, W]``, or a callable returning them (only called
    when the factors must be built). The cache key is the model fingerprint (which fixes the
    run's training set) plus ``cfg``.
    """
    from attribution.runs import load_tensors, save_tensors

    d = run.artifact_dir("curvature", cfg.key())
    path = d / "factors.safetensors"
    if path.exists():
        return load_tensors(path)
    images = images() if callable(images) else images
    unet = unet if unet is not None else run.load_unet()
    tensors, meta = build_factors(unet, run.schedule(), images, cfg, progress)
    meta["n_train"] = int(images.shape[0])
    save_tensors(path, tensors, meta)
    return tensors, meta


def dense_ggn(unet, schedule: Schedule, images: Tensor, draws: int, seed: int, params: Sequence) -> Tensor:
    """The exact GGN of the mean training loss in the paper's scaling (squared error summed over
    pixels), G = (1 / (N * draws)) sum_rows J_row^T (2 I) J_row over ``params``: ``[P, P]``.

    A reference for small parameter subsets (tests, dense comparisons). Why not
    ``curvlinops.GGNLinearOperator @ I``: that costs one Jacobian-vector pass per parameter;
    per-row Jacobians cost one backward pass per output entry (D << P here). Rows are the same
    (t, eps) draws as :class:`TrainingRows`.
    """
    from attribution.gradients import _PerExampleGrads, _resolve_params
    from attribution.ddpm import predict_eps

    params, mods = _resolve_params(unet, params)
    dtype = params[0].dtype
    G = torch.zeros(sum(p.numel() for p in params), sum(p.numel() for p in params), dtype=torch.float64)
    rows = 0
    was_training = unet.training
    unet.eval()
    hooks = _PerExampleGrads(mods)
    try:
        for group in example_groups(images.shape[0], draws, 64):
            plan = draw_plan(schedule, images, Measurement("loss"), draws, seed, group)
            R = plan.x_in.shape[0]
            with torch.enable_grad():
                out = predict_eps(unet, plan.x_in.to(dtype), plan.t).flatten(1)
                J = []  # per output entry d: per-row gradients [R, P]
                for d in range(out.shape[1]):
                    got = hooks.grads(out[:, d].sum(), R, retain_graph=True, keep_records=True)
                    J.append(torch.cat([got[id(p)].reshape(R, -1) if id(p) in got
                                        else torch.zeros(R, p.numel(), dtype=dtype) for p in params], 1))
                hooks.records = []
            J = torch.stack(J, 1).double()  # [R, D, P]
            G += 2 * torch.einsum("rdp,rdq->pq", J, J)
            rows += R
    finally:
        hooks.remove()
        unet.train(was_training)
    return G / rows


class DensePreconditioner:
    """(G + D lambda I)^{-1} for an explicit matrix ``G`` ``[P, P]`` (exact references on small
    problems); same ``apply`` / ``with_damping`` interface as :class:`Preconditioner`.

    With ``G = dense_ggn(...)`` (summed-pixel scaling) and ``output_dim = D`` it is the exact
    counterpart of :class:`Preconditioner` at the same paper-scale ``damping``; ``output_dim = 1``
    adds ``damping`` to ``G`` as given."""

    def __init__(self, G: Tensor, damping: float, output_dim: int = 1):
        self.G, self.damping, self.D = G.double(), float(damping), int(output_dim)
        eye = torch.eye(G.shape[0], dtype=torch.float64)
        self._chol = torch.linalg.cholesky(self.G + self.D * self.damping * eye)

    def with_damping(self, damping: float) -> "DensePreconditioner":
        return DensePreconditioner(self.G, damping, self.D)

    def apply(self, V: Tensor) -> Tensor:
        return torch.cholesky_solve(V.double().T, self._chol).T
