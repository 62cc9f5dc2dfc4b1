"""Exact minimal adversarial perturbations of small rectified networks, by mixed-integer programming.

For a classifier f = A_L ∘ σ ∘ A_{L−1} ∘ … ∘ σ ∘ A_1 (affine maps A_l(u) = W_l u + c_l, rectifiers
σ_a with any real slopes) and an input x predicted as class c, the minimal ℓp perturbation that
changes the prediction is

    ε*_p(x) = min_{k ≠ c} min { ‖x′ − x‖_p : f_k(x′) ≥ f_c(x′), x′ ∈ B },

B = [0, 1]^d or R^d (``box``). For p ∈ {∞, 1} each inner problem is a mixed-integer linear
program (Tjeng, Xiao & Tedrake 2019): with interval bounds l ≤ z ≤ u on every pre-activation z
(interval arithmetic over the search box), a unit is written through r = max(z, 0), so that
σ_a(z) = a·z + (1 − a)·r, and

    r = z            if l ≥ 0,          r = 0               if u ≤ 0,
    r ≥ z, r ≥ 0, r ≤ z − l(1 − s), r ≤ u·s, s ∈ {0, 1}      otherwise,

which is exact: s = 1 forces r = z ≥ 0, s = 0 forces r = 0 ≥ z. The objective is t with
|x′_i − x_i| ≤ t (ℓ∞) or t = Σ_i e_i, e_i ≥ |x′_i − x_i| (ℓ1). The programs are solved to
optimality by HiGHS through :func:`scipy.optimize.milp` (relative gap 0). HiGHS works to its
tolerances: an absolute optimality gap of 1e-6 in the objective (radius units) and a
feasibility tolerance of 1e-6 on every constraint (:data:`SOLVER_TOLERANCE`), so ε* is exact up
to those; :class:`Exact` reports, per sample, by how much the returned point misses changing the
prediction when the network is evaluated in float64 (``violation`` = max(0, f_c − f_k) there).

A proven optimum is kept on disk, keyed by the SHA-256 of its whole problem (weights, point,
box, class, norm, solver settings and SciPy's version: :data:`SOLUTION_VERSION`), and the same
problem is not solved twice: a chapter rerun, or executed again under another instruction set or
thread count (which change nothing in these NumPy/HiGHS programs), reads it back
(``$ROBUSTREG_MILP_CACHE``: another folder, or empty for none).

The search box is ‖x′ − x‖∞ ≤ ``radius`` (an upper bound on ε*, e.g. from an attack; it only
tightens the interval bounds and cannot cut off the optimum when it is ≥ ε*). Supported layers:
``Flatten``, ``Linear``, ``ReLU``, ``LeakyReLU``, ``PReLU`` in an ``nn.Sequential`` — the
number of binary variables is the number of units whose sign the box leaves open, so this is
for small networks (the two-moons network, an MLP with a few dozen hidden units on 8×8 digits).
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
import torch
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array
from torch import Tensor, nn

from robustreg import data, files
from robustreg.validation import check_batch, check_model, check_norm, check_positive

__all__ = [
    "NORMS",
    "SOLUTION_VERSION",
    "SOLVER_TOLERANCE",
    "Exact",
    "affine_layers",
    "minimal_perturbation",
]

#: The norms of the exact radii (names of :data:`robustreg.validation.NORMS`).
NORMS = ("linf", "l1")

#: Programs with this many nonzeros or more are solved in a child process (see ``_Program.solve``).
IN_PROCESS_NONZEROS = 100_000

#: HiGHS's feasibility tolerance for mixed-integer programs (its default, ``mip_feasibility_tolerance``).
SOLVER_TOLERANCE = 1e-6


@dataclass
class Exact:
    """Per sample: ``radius`` ε*_p (``inf`` where no x′ ∈ B changes the prediction; 0 where
    ``x`` is already misclassified w.r.t. ``y``), the ``point`` x′ attaining it, the ``target``
    class k of the optimal program, ``binaries``, the number of unstable units, and
    ``violation``, max(0, f_c(x′) − f_k(x′)) evaluated in float64 (0 when x′ changes the
    prediction; the solver's feasibility tolerance allows a little more)."""

    radius: Tensor
    point: Tensor
    target: Tensor
    binaries: Tensor
    violation: Tensor


def affine_layers(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """``model`` as a list of (W, c, a): the affine map u ↦ W u + c followed by σ_a with the
    per-unit slopes ``a`` (``None`` for the last, logit layer). Raises ``ValueError`` naming the
    first layer of another kind."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"model must be an nn.Sequential; got {type(model).__name__}")
    layers: list = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Flatten):
            continue
        if isinstance(m, nn.Linear):
            if layers and layers[-1][2] is None:
                raise ValueError(f"layer {i}: two affine layers in a row (fold them first)")
            w = m.weight.detach().double().cpu().numpy()
            c = (
                m.bias.detach().double().cpu().numpy()
                if m.bias is not None
                else np.zeros(w.shape[0])
            )
            layers.append((w, c, None))
        elif isinstance(m, nn.ReLU | nn.LeakyReLU | nn.PReLU):
            if not layers or layers[-1][2] is not None:
                raise ValueError(f"layer {i}: a rectifier must follow a Linear layer")
            w, c, _ = layers[-1]
            if isinstance(m, nn.ReLU):
                a = np.zeros(len(c))
            elif isinstance(m, nn.LeakyReLU):
                a = np.full(len(c), float(m.negative_slope))
            else:
                a = np.broadcast_to(m.weight.detach().double().cpu().numpy(), (len(c),)).copy()
            layers[-1] = (w, c, a)
        else:
            raise ValueError(
                f"layer {i}: {type(m).__name__} is not supported (Flatten, Linear, ReLU, "
                "LeakyReLU, PReLU)"
            )
    if not layers or layers[-1][2] is not None:
        raise ValueError("the last layer must be a Linear layer (the logits)")
    return layers


#: Bump when a change in this module alters what a program solves to.
SOLUTION_VERSION = 2  # 2: HiGHS without presolve (a wrong optimum with it)


def _problem_key(layers, xi, lo, hi, c: int, norm: str) -> str:
    """SHA-256 of one sample's problem: every weight, bias and slope, the point, its search box,
    its class, the norm, the solver's settings and versions (the same key: the same programs)."""
    h = hashlib.sha256(
        repr((SOLUTION_VERSION, scipy.__version__, SOLVER_TOLERANCE, c, norm)).encode()
    )
    for w, b, a in layers:
        for arr in (w, b, np.zeros(0) if a is None else a):
            arr = np.ascontiguousarray(arr, dtype=np.float64)
            h.update(repr(arr.shape).encode())
            h.update(arr.tobytes())
    for arr in (xi, lo, hi):
        h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
    return h.hexdigest()[:32]


def _solutions_dir() -> Path | None:
    """Where proven optima are kept: ``$ROBUSTREG_MILP_CACHE`` if set (empty: nowhere, every
    program is solved), else the ``milp`` folder of :func:`robustreg.data.cache_dir`."""
    if "ROBUSTREG_MILP_CACHE" in os.environ:
        where = os.environ["ROBUSTREG_MILP_CACHE"]
        return Path(where) if where else None
    return data.cache_dir() / "milp"


def _read_solution(key: str) -> dict | None:
    """A proven optimum of this problem solved before (radius, target, point), or None."""
    folder = _solutions_dir()
    if folder is None:
        return None
    path = folder / f"{key}.npz"
    try:
        with np.load(path) as f:
            return {k: f[k] for k in ("radius", "target", "point")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # absent, or unreadable: solved again


def _write_solution(key: str, radius: float, target: int, point: np.ndarray) -> None:
    """Keep a proven optimum, written atomically (a crash leaves no partial file)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, radius=np.float64(radius), target=np.int64(target), point=point)

    folder = _solutions_dir()
    if folder is None:
        return
    try:
        files.atomic_write(folder / f"{key}.npz", write)
    except OSError:  # a read-only cache: the result is still returned
        pass


def _sigma(t: np.ndarray, a: np.ndarray) -> np.ndarray:
    return np.maximum(t, 0) + a * np.minimum(t, 0)


def _interval_bounds(layers, lo: np.ndarray, hi: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Bounds [l, u] on the pre-activations of every hidden layer, for inputs in [lo, hi]."""
    out = []
    for w, c, a in layers[:-1]:
        mid, rad = (hi + lo) / 2, (hi - lo) / 2
        zm, zr = w @ mid + c, np.abs(w) @ rad
        l, u = zm - zr, zm + zr
        out.append((l, u))
        ends = np.stack(
            [_sigma(l, a), _sigma(u, a), np.where((l < 0) & (u > 0), 0.0, _sigma(l, a))]
        )
        lo, hi = ends.min(0), ends.max(0)
    return out


class _Program:
    """Variables and constraints of one program, built row by row."""

    def __init__(self):
        self.lb, self.ub, self.integer = [], [], []
        self.rows, self.cols, self.vals, self.row_lb, self.row_ub = [], [], [], [], []

    def variables(self, lb, ub, integer=False) -> np.ndarray:
        start = len(self.lb)
        self.lb += list(lb)
        self.ub += list(ub)
        self.integer += [int(integer)] * len(lb)
        return np.arange(start, len(self.lb))

    def constraint(self, coeffs: dict[int, float], lb: float, ub: float) -> None:
        r = len(self.row_lb)
        for j, v in coeffs.items():
            if v != 0:
                self.rows.append(r)
                self.cols.append(j)
                self.vals.append(v)
        self.row_lb.append(lb)
        self.row_ub.append(ub)

    def size(self) -> str:
        """The program's size, for messages."""
        return (
            f"{len(self.lb):,} variables ({sum(self.integer):,} binary), "
            f"{len(self.row_lb):,} constraints, {len(self.vals):,} nonzeros"
        )

    def solve(self, objective: np.ndarray, deadline: float | None):
        """Solve with HiGHS, by the ``deadline`` (a ``time.monotonic()`` value). HiGHS's own
        ``time_limit`` is not checked inside its first LP, where a large program
        (784-1024-1024-10: 1.9 million nonzeros) spends minutes; a program of
        :data:`IN_PROCESS_NONZEROS` or more is therefore solved in a child process that is
        killed at the deadline, a smaller one in this process (no fork per program).

        HiGHS's presolve is off. On chapter 08's 2-16-16-2 programs (coefficients 7e-5 … 4) it
        failed twice at the full profile: once it ended in "Solve error" (seed 1, input
        gradient, point 171), once it reported as optimal a radius of 0.0479 where x′ at ℓ∞
        distance 0.0104 changes the prediction (seed 2, Jacobian, point 101; SciPy 1.17.1). Without
        presolve both are solved to the true optimum, and chapter 08's programs are no slower
        (120 programs: 22 s without, 26 s with)."""
        n = len(self.lb)
        a = coo_array((self.vals, (self.rows, self.cols)), shape=(len(self.row_lb), n))
        problem = dict(
            c=objective,
            constraints=LinearConstraint(a.tocsr(), self.row_lb, self.row_ub),
            integrality=np.array(self.integer),
            bounds=Bounds(self.lb, self.ub),
            options={"mip_rel_gap": 0.0, "presolve": False},
        )
        return self._run(problem, deadline)

    def _run(self, problem: dict, deadline: float | None):
        if deadline is not None:  # what is left of the sample's time
            problem["options"]["time_limit"] = max(deadline - time.monotonic(), 1e-3)
        if deadline is None or len(self.vals) < IN_PROCESS_NONZEROS:
            return milp(**problem)  # small: HiGHS's own time_limit holds
        return _solve_in_child(problem, deadline)


def _milp_to_pipe(conn, problem) -> None:
    res = milp(**problem)
    conn.send((res.status, res.message, res.x))
    conn.close()


class _Result:
    def __init__(self, status, message, x):
        self.status, self.message, self.x = status, message, x


def _solve_in_child(problem: dict, deadline: float) -> _Result | None:
    """:func:`scipy.optimize.milp` in a child process; ``None`` if it is still running at
    ``deadline`` (it is then killed)."""
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    ctx = multiprocessing.get_context(method)
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_milp_to_pipe, args=(send, problem), daemon=True)
    child.start()
    send.close()
    try:
        if receive.poll(max(deadline - time.monotonic(), 0.0)):
            try:
                return _Result(*receive.recv())
            except EOFError:  # the child died without an answer
                child.join()
                raise RuntimeError(
                    f"the HiGHS process ended without a result (exit code {child.exitcode})"
                ) from None
        return None
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()


def _target_program(layers, bounds, x, lo, hi, c, k, norm, deadline=None):
    """The program min ‖x′ − x‖_p s.t. f_k(x′) ≥ f_c(x′), x′ ∈ [lo, hi]; returns it with the
    indices of x′ and of the objective's variable t. Raises ``TimeoutError`` if building it
    passes ``deadline`` (a ``time.monotonic()`` value)."""
    prog = _Program()
    d = len(x)
    xp = prog.variables(lo, hi)
    t = prog.variables([0.0], [math.inf])[0]
    if norm == "linf":
        for i in range(d):  # −t ≤ x′_i − x_i ≤ t
            prog.constraint({xp[i]: 1.0, t: -1.0}, -math.inf, x[i])
            prog.constraint({xp[i]: 1.0, t: 1.0}, x[i], math.inf)
    else:
        e = prog.variables(np.zeros(d), hi - lo)
        for i in range(d):
            prog.constraint({xp[i]: 1.0, e[i]: -1.0}, -math.inf, x[i])
            prog.constraint({xp[i]: 1.0, e[i]: 1.0}, x[i], math.inf)
        prog.constraint({t: 1.0, **{int(j): -1.0 for j in e}}, 0.0, 0.0)
    prev = xp  # variables of the layer's input u (h of the previous layer)
    prev_expr = None  # or, for hidden layers: (z, r, a) with h = a·z + (1 − a)·r
    for n_layer, ((w, cvec, a), (l, u)) in enumerate(zip(layers[:-1], bounds, strict=True)):
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(
                f"building the program passed time_limit at hidden layer {n_layer + 1} of "
                f"{len(layers) - 1} (so far {prog.size()}; the network has "
                f"{sum(w.size for w, _, _ in layers):,} weights)"
            )
        z = prog.variables(l, u)
        for j in range(len(cvec)):  # z_j = W_j h + c_j
            coeffs = _input_coeffs(w[j], prev, prev_expr)
            coeffs[int(z[j])] = coeffs.get(int(z[j]), 0.0) - 1.0
            prog.constraint(coeffs, -cvec[j], -cvec[j])
        r = prog.variables(np.maximum(l, 0), np.maximum(u, 0))
        for j in range(len(cvec)):
            zj, rj = int(z[j]), int(r[j])
            if l[j] >= 0:
                prog.constraint({rj: 1.0, zj: -1.0}, 0.0, 0.0)
            elif u[j] <= 0:
                prog.constraint({rj: 1.0}, 0.0, 0.0)
            else:
                s = int(prog.variables([0.0], [1.0], integer=True)[0])
                prog.constraint({rj: 1.0, zj: -1.0}, 0.0, math.inf)  # r ≥ z
                prog.constraint({rj: 1.0, zj: -1.0, s: -l[j]}, -math.inf, -l[j])  # r ≤ z − l(1−s)
                prog.constraint({rj: 1.0, s: -u[j]}, -math.inf, 0.0)  # r ≤ u·s
        prev, prev_expr = None, (z, r, a)
    w, cvec, _ = layers[-1]
    coeffs = _input_coeffs(w[k] - w[c], prev, prev_expr)  # f_k − f_c ≥ 0
    prog.constraint(coeffs, -(cvec[k] - cvec[c]), math.inf)
    return prog, xp, t


def _input_coeffs(row: np.ndarray, prev, prev_expr) -> dict[int, float]:
    """Coefficients of rowᵀh in the program's variables (h = x′, or a·z + (1 − a)·r)."""
    if prev_expr is None:
        return {int(j): float(v) for j, v in zip(prev, row, strict=True)}
    z, r, a = prev_expr
    coeffs: dict[int, float] = {}
    for j in range(len(row)):
        coeffs[int(z[j])] = float(row[j] * a[j])
        coeffs[int(r[j])] = float(row[j] * (1.0 - a[j]))
    return coeffs


def minimal_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    norm: str = "linf",
    *,
    radius: float | Tensor = 1.0,
    box: bool = True,
    time_limit: float | None = 60.0,
) -> Exact:
    """Exact ε*_p(x) for every sample (module docstring), by one MILP per other class.

    ``y``: the class to move away from (0 where the model already disagrees); default the
    predicted class. ``radius`` (number or per-sample ``Tensor[B]``): the ℓ∞ half-width of the
    search box around x; it must be ≥ ε*_∞ (for ℓ1, ≥ ε*_1 is enough, as ‖δ‖∞ ≤ ‖δ‖₁) — an
    attack's radius is one. Where no program is feasible inside the box, ``radius`` is ``inf``:
    nothing within it changes the prediction. ``box=True`` also keeps x′ in [0, 1]^d.
    ``time_limit``: seconds per sample, end to end (building its programs and solving them; a
    large program is solved in a child process that is killed at the limit), or ``None`` for
    no limit (a positive finite number otherwise). A
    sample that runs out of time raises ``TimeoutError`` naming the program's size; a program
    that HiGHS ends without proven optimality raises ``RuntimeError`` (an unproven value is not
    an exact radius).
    """
    if time_limit is not None:
        check_positive("time_limit", time_limit)
    check_norm(norm, NORMS)
    check_batch(x, finite=True)
    check_model(model, x)
    layers = affine_layers(model)
    xs = x.detach().double().cpu().reshape(len(x), -1).numpy()
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1).cpu()
    ref = pred if y is None else y.cpu()
    radii = torch.as_tensor(radius, dtype=torch.float64).expand(len(x)).clone()
    if not (torch.isfinite(radii).all() and (radii > 0).all()):
        raise ValueError(f"radius must be positive and finite; got {radius!r}")
    n_classes = logits.shape[1]
    out_r = torch.full((len(x),), math.inf, dtype=torch.float64)
    out_p = x.detach().clone()
    out_t = torch.full((len(x),), -1, dtype=torch.long)
    out_b = torch.zeros(len(x), dtype=torch.long)
    for i, xi in enumerate(xs):
        c = int(ref[i])
        if int(pred[i]) != c:
            out_r[i], out_t[i] = 0.0, int(pred[i])
            continue
        deadline = None if time_limit is None else time.monotonic() + time_limit
        lo, hi = xi - float(radii[i]), xi + float(radii[i])
        if box:
            lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
        bounds = _interval_bounds(layers, lo, hi)
        out_b[i] = int(sum(((l < 0) & (u > 0)).sum() for l, u in bounds))
        key, best_point = _problem_key(layers, xi, lo, hi, c, norm), np.zeros(0)
        solved = _read_solution(key)
        if solved is not None:  # this very problem was solved before: its optimum
            if solved["target"] >= 0:
                out_r[i], out_t[i] = float(solved["radius"]), int(solved["target"])
                out_p[i] = torch.as_tensor(solved["point"]).reshape(x.shape[1:]).to(x)
            continue
        for k in range(n_classes):
            if k == c:
                continue
            try:
                prog, xp, t = _target_program(layers, bounds, xi, lo, hi, c, k, norm, deadline)
            except TimeoutError as err:
                raise TimeoutError(
                    f"sample {i}, target {k}: {err} (time_limit={time_limit} s)"
                ) from None
            objective = np.zeros(len(prog.lb))
            objective[t] = 1.0
            res = prog.solve(objective, deadline)
            if res is None or res.status == 1:  # killed at the deadline, or HiGHS's own limit
                raise TimeoutError(
                    f"sample {i}, target {k}: no proven optimum within time_limit={time_limit} s "
                    f"for a program of {prog.size()}; raise time_limit, shrink radius (fewer "
                    "unstable units) or use a smaller network"
                )
            if res.status == 2:  # infeasible: no x′ in the box reaches class k
                continue
            if res.status != 0:
                raise RuntimeError(f"sample {i}, target {k}: HiGHS stopped: {res.message}")
            if res.x[t] < out_r[i]:
                out_r[i] = float(res.x[t])
                out_t[i] = k
                out_p[i] = torch.as_tensor(res.x[xp]).reshape(x.shape[1:]).to(x)
                best_point = np.asarray(res.x[xp], dtype=np.float64)
        _write_solution(key, float(out_r[i]), int(out_t[i]), best_point)
    violation = torch.zeros(len(x), dtype=torch.float64)
    done = out_t >= 0
    if done.any():
        with torch.no_grad():
            f = model(out_p[done]).double()
        rows = torch.arange(int(done.sum()))
        gap = f[rows, ref[done]] - f[rows, out_t[done]]
        violation[done] = gap.clamp_min(0).cpu()
    return Exact(out_r, out_p, out_t, out_b, violation)
