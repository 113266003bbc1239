"""Flow-matching samplers: σ grids with shift and the DPM-Solver++, UniPC and Euler steps, as pure functions.

Flow convention (Wan's rectified flow). A latent at noise level σ ∈ [0, 1] is x_σ = (1 − σ)·x₀ + σ·ε; the model
predicts the velocity v ≈ ε − x₀, so its data estimate is x̂₀ = x − σ·v. The exponential integrators below work
in α = 1 − σ and λ = log α − log σ (half log-SNR), both functions of σ alone.

Grids (length steps + 1, always ending in 0; the shift is σ′ = s·σ / (1 + (s − 1)·σ)):

| solver  | base σ before the shift      | first σ, shift 16 | model timestep t_k                    |
|---------|------------------------------|-------------------|---------------------------------------|
| "dpm++" | linspace(1, 0, N+1)[:N]      | 1.0 (t 1000)      | int(1000·σ_k), truncated              |
| "unipc" | linspace(0.999, 0, N+1)[:N]  | 0.99994 (t 999)   | int(1000·σ_k), truncated              |
| "euler" | linspace(1, 0, N+1)[:N]      | 1.0 (t 1000)      | 1000·σ_k, kept fractional             |

The grids are built in float64 and stored in fp32, as Wan's samplers do; the integer timesteps come from the
float64 values (an fp32 σ can land just below an integer that the float64 σ reaches, e.g. 944.99999 vs 945.00001).
UniPC's 0.999 is the top of the 1000-point training grid as Wan stores it (in fp32). Euler uses the DPM++ grid
with fractional t, which is what training sees (t = 1000·σ).

Solvers (step k goes from σ_k to σ_{k+1}; N = steps):
- "dpm++": Wan's flow DPM-Solver++: order 2 multistep, data prediction, midpoint, lower-order (first-order) final
  step onto σ = 0. A first-order step is x_t = (σ_t/σ_s)·x + α_t(1 − e^{−h})·x̂₀ with h = λ_t − λ_s; the
  second-order step adds ½·α_t(1 − e^{−h})·(h / h_prev)·(x̂₀ − x̂₀_prev).
- "unipc": Wan's flow UniPC, bh2, order 2, data prediction. Its predictor UniP-2 with ρ = ½ is the same formula
  as the DPM++ midpoint step; before each step after the first, the corrector UniC refines the previous
  predictor output with the new model evaluation (ρ = ½ at order 1, a solved 2×2 ρ at order 2). Order
  min(2, N − k, history + 1).
- "euler": x ← x + (σ_{k+1} − σ_k)·v.

Edge cases, handled on the host when the per-step coefficient tables are built, so no ∞ or NaN ever enters the
traced graph (nor any gradient of it): at σ_s = 1, λ_s = −∞ and e^{−h} = 0 (we compute e^{−h} as the ratio
α_s·σ_t / (σ_s·α_t), never through logs); the step after it has h_prev = ∞, so its second-order term is 0; at
σ_t = 0 the step returns x̂₀ exactly (also enforced in the graph with `where(σ_t == 0, x̂₀, …)`).

Usage inside `lax.scan` (k may be traced); a run that starts at k = skip starts from a fresh `init`, so its
first executed step is first order:

    sch = make("dpm++", steps=20, shift=16.0)
    def body(carry, k):
        x, state = carry
        v = velocity(x, sch.timesteps[k])          # jnp.asarray(sch.timesteps)[k] when k is traced
        return sch.step(state, x, v, k), None
    (x, _), _ = lax.scan(body, (x, sch.init(x)), jnp.arange(skip, sch.steps))

Every step computes in fp32 whatever the dtype of x and v, and returns an fp32 latent.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from pickstyle_jax import flow

SOLVERS = ("dpm++", "unipc", "euler")

# Wan builds UniPC's grid from the top of its 1000-point training grid, 1 − 1/1000, held in an fp32 tensor.
_UNIPC_SIGMA_MAX = float(np.float32(0.999))


def _check(solver: str, steps: int, shift: float) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not np.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")


def sigmas(solver: str, steps: int, shift: float, *, dtype=np.float32) -> np.ndarray:
    """The σ grid of `solver`: [steps + 1], decreasing, ending in 0. See the module docstring for the table.

    Pass dtype=np.float64 for the exact values that the official integer timesteps are truncated from.
    """
    _check(solver, steps, shift)
    top = _UNIPC_SIGMA_MAX if solver == "unipc" else 1.0
    base = np.linspace(top, 0.0, steps + 1, dtype=np.float64)[:steps]
    grid = np.concatenate([flow.shift_sigma(base, float(shift)), [0.0]])
    return grid.astype(dtype)


def timesteps(solver: str, sig) -> np.ndarray:
    """Model timesteps for a grid from `sigmas` (length steps + 1, ending in 0): fp32 [steps].

    "dpm++" and "unipc" truncate 1000·σ to an integer, as Wan does; "euler" keeps 1000·σ. The product is taken
    in float64; for bit-exact official integers pass the float64 grid (`sigmas(..., dtype=np.float64)`).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    sig = np.asarray(sig)
    if sig.ndim != 1 or sig.shape[0] < 2 or sig[-1] != 0:
        raise ValueError(f"expected a full σ grid of length steps + 1 ending in 0 (from `sigmas`), got shape "
                         f"{sig.shape}" + (f" ending in {sig[-1]}" if sig.ndim == 1 and sig.size else ""))
    t = sig[:-1].astype(np.float64) * 1000.0
    if solver != "euler":
        t = np.trunc(t)
    return t.astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# Per-step coefficients, built once on the host in float64.


def _lambda(sig: np.ndarray) -> np.ndarray:
    """λ = log(1 − σ) − log σ, with the limits −∞ at σ = 1 and +∞ at σ = 0."""
    with np.errstate(divide="ignore"):
        return np.log1p(-sig) - np.log(sig)


def _tables(solver: str, sig64: np.ndarray) -> dict[str, np.ndarray]:
    """fp32 coefficient tables indexed by the step k (each [steps]).

    Multistep update (predictor): x_{k+1} = A[k]·x + B[k]·m + C[k]·(m − m_prev), m = x̂₀ at σ_k.
    UniC corrector at the start of step k (interval σ_{k−1} → σ_k), with x_prev the corrected sample of step
    k − 1, m1 = x̂₀ at σ_{k−1}, m2 = x̂₀ at σ_{k−2}:
      order 1: x = A[k−1]·x_prev + B[k−1]·m1 + C1[k]·(m − m1)
      order 2: x = A[k−1]·x_prev + B[k−1]·m1 + C2m[k]·(m2 − m1) + C2t[k]·(m − m1)
    """
    n = sig64.shape[0] - 1
    s, t = sig64[:-1], sig64[1:]                      # σ_s = σ_k, σ_t = σ_{k+1}
    if np.any(t >= s):
        raise ValueError(f"σ grid must decrease strictly, got {sig64}")
    lam = _lambda(sig64)
    alpha_t = 1.0 - t
    exp_neg_h = (1.0 - s) * t / (s * alpha_t)         # e^{−h} = e^{λ_s − λ_t}, finite even at σ_s = 1 or σ_t = 0
    a = t / s
    b = alpha_t * (1.0 - exp_neg_h)
    tables = {"A": a, "B": b, "euler": (sig64[1:].astype(np.float32) - sig64[:-1].astype(np.float32))}

    # Second-order multistep term: ½·B·h / h_prev. Zero at k = 0 (no history), on the lower-order final step,
    # and after a step from σ = 1 (h_prev = ∞, so D₁ = 0).
    c = np.zeros(n)
    for k in range(1, n - 1):
        if sig64[k - 1] < 1.0 and t[k] > 0.0:
            h, h_prev = lam[k + 1] - lam[k], lam[k] - lam[k - 1]
            c[k] = 0.5 * b[k] * h / h_prev
    tables["C"] = c

    if solver == "unipc":
        c1, c2m, c2t = np.zeros(n), np.zeros(n), np.zeros(n)
        for k in range(1, n):
            bp = b[k - 1]                             # B of the corrected interval σ_{k−1} → σ_k
            c1[k] = 0.5 * bp
            if k < 2:
                continue
            h = lam[k] - lam[k - 1]                   # finite: σ_{k−1} < 1 for k ≥ 2, σ_k > 0
            hh = -h
            phi1 = np.expm1(hh)                       # bh2: B(h) = e^{−h} − 1
            hpk = phi1 / hh - 1.0
            b1 = hpk / phi1
            b2 = 2.0 * (hpk / hh - 0.5) / phi1
            if sig64[k - 2] >= 1.0:                   # rk = −∞: ρ → (0, b1) and the D₁ term vanishes
                c2t[k] = bp * b1
                continue
            rk = (lam[k - 2] - lam[k - 1]) / h
            rho0 = (b1 - b2) / (1.0 - rk)             # the 2×2 solve of R·ρ = b, R = [[1, 1], [rk, 1]]
            rho1 = (b2 - rk * b1) / (1.0 - rk)
            c2m[k] = bp * rho0 / rk
            c2t[k] = bp * rho1
        tables.update(C1=c1, C2m=c2m, C2t=c2t)

    for name, table in tables.items():
        if not np.all(np.isfinite(table)):
            raise ValueError(f"σ grid gives non-finite {solver} coefficients {name}: {table}")
    return {name: table.astype(np.float32) for name, table in tables.items()}


# ----------------------------------------------------------------------------------------------------------------
# Steps: pure functions of (tables, state, x, v, k).


def _at(table: np.ndarray, k):
    return jnp.asarray(table)[k]


def _dpm_init(x):
    return {"x0": jnp.zeros(jnp.shape(x), jnp.float32), "has_prev": jnp.zeros((), jnp.bool_)}


def _dpm_step(sch: "Scheduler", state, x, v, k):
    x, v = jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32)
    m = x - _at(sch.sigmas, k) * v
    c = jnp.where(state["has_prev"], _at(sch._tables["C"], k), 0.0)
    x_next = _at(sch._tables["A"], k) * x + _at(sch._tables["B"], k) * m + c * (m - state["x0"])
    x_next = jnp.where(_at(sch.sigmas, k + 1) == 0, m, x_next)
    return x_next, {"x0": m, "has_prev": jnp.ones((), jnp.bool_)}


def _unipc_init(x):
    zeros = jnp.zeros(jnp.shape(x), jnp.float32)
    return {"x_prev": zeros, "m1": zeros, "m2": zeros,
            "n": jnp.zeros((), jnp.int32),            # model evaluations in the history, capped at 2
            "order": jnp.zeros((), jnp.int32)}        # predictor order of the previous step (the corrector's)


def _unipc_step(sch: "Scheduler", state, x, v, k):
    tb = sch._tables
    x, v = jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32)
    k = jnp.asarray(k, jnp.int32)
    m = x - _at(sch.sigmas, k) * v
    m1, m2 = state["m1"], state["m2"]

    # UniC: refine the previous predictor output now that the model has been evaluated there.
    kp = jnp.maximum(k - 1, 0)
    base = _at(tb["A"], kp) * state["x_prev"] + _at(tb["B"], kp) * m1
    x_c1 = base + _at(tb["C1"], k) * (m - m1)
    x_c2 = base + _at(tb["C2m"], k) * (m2 - m1) + _at(tb["C2t"], k) * (m - m1)
    x_c = jnp.where(state["order"] >= 2, x_c2, x_c1)
    x = jnp.where(state["n"] > 0, x_c, x)

    # UniP: order min(2, N − k, history + 1), i.e. warm-up and lower-order final.
    order = jnp.minimum(jnp.minimum(2, sch.steps - k), state["n"] + 1)
    c = jnp.where(order >= 2, _at(tb["C"], k), 0.0)
    x_next = _at(tb["A"], k) * x + _at(tb["B"], k) * m + c * (m - m1)
    x_next = jnp.where(_at(sch.sigmas, k + 1) == 0, m, x_next)
    new = {"x_prev": x, "m1": m, "m2": m1, "n": jnp.minimum(state["n"] + 1, 2), "order": order}
    return x_next, new


def _euler_init(x):
    del x
    return {}


def _euler_step(sch: "Scheduler", state, x, v, k):
    x, v = jnp.asarray(x, jnp.float32), jnp.asarray(v, jnp.float32)
    return x + _at(sch._tables["euler"], k) * v, state


_STEPS = {"dpm++": (_dpm_init, _dpm_step), "unipc": (_unipc_init, _unipc_step), "euler": (_euler_init, _euler_step)}


@dataclasses.dataclass(frozen=True, eq=False)
class Scheduler:
    """A solver on a fixed grid. Static: close over it (or mark it static); its arrays are host constants.

    sigmas: fp32 [steps + 1] ending in 0; timesteps: fp32 [steps], the model's t at each σ_k.
    """

    solver: str
    steps: int
    shift: float
    sigmas: np.ndarray
    timesteps: np.ndarray
    _tables: dict[str, np.ndarray] = dataclasses.field(repr=False)

    def init(self, x) -> dict[str, Any]:
        """Empty solver history shaped like the latent x (a pytree of arrays; {} for Euler)."""
        return _STEPS[self.solver][0](x)

    def step(self, state, x, v, k):
        """One step from σ_k to σ_{k+1}: returns (x_next fp32, new state).

        v is the model velocity at (x, σ_k); k is the step index (Python int or traced int32). Consecutive calls
        must use consecutive k; start a run at any k with a fresh `init`.
        """
        if jnp.shape(x) != jnp.shape(v):
            raise ValueError(f"latent and velocity shapes differ: {jnp.shape(x)} vs {jnp.shape(v)}")
        if isinstance(k, (int, np.integer)) and not 0 <= k < self.steps:
            raise ValueError(f"step index {k} out of range for {self.steps} steps")
        return _STEPS[self.solver][1](self, state, x, v, k)


def make(solver: str = "dpm++", steps: int = 20, shift: float = 16.0) -> Scheduler:
    """The scheduler of `solver` on its grid (see the module docstring)."""
    sig64 = sigmas(solver, steps, shift, dtype=np.float64)
    return Scheduler(solver=solver, steps=int(steps), shift=float(shift), sigmas=sig64.astype(np.float32),
                     timesteps=timesteps(solver, sig64), _tables=_tables(solver, sig64))
