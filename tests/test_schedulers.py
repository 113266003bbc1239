"""Schedulers: the PickStyle σ table, trajectories against diffusers' flow DPM-Solver++ and UniPC, Euler's closed
form, exactness on straight flows, jit + scan with a traced step index, and gradients free of NaN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from pickstyle_jax import schedulers

# diffusers 0.42 builds its default grids through a NumPy-2-deprecated __array__ path; not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# docs/REFERENCE.md §7: DPM++, shift 16, 20 steps, σ printed to 4 digits and the integer model timesteps.
TABLE_SIGMA = [1.0, 0.9967, 0.9931, 0.9891, 0.9846, 0.9796, 0.9739, 0.9674, 0.9600, 0.9514, 0.9412, 0.9290, 0.9143,
               0.8960, 0.8727, 0.8421, 0.8000, 0.7385, 0.6400, 0.4571, 0.0]
TABLE_T = [1000, 996, 993, 989, 984, 979, 973, 967, 960, 951, 941, 929, 914, 895, 872, 842, 800, 738, 640, 457]
# §9.1: σ at which a run with `skip` starts, and the number of steps it runs.
SKIP_SIGMA = {0: 1.0, 1: 0.9967, 2: 0.9931, 3: 0.9891, 4: 0.9846, 5: 0.9796, 6: 0.9739, 8: 0.9600}


def test_pickstyle_table():
    sig = schedulers.sigmas("dpm++", 20, 16.0)
    assert sig.dtype == np.float32 and sig.shape == (21,)
    np.testing.assert_allclose(sig, TABLE_SIGMA, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.round(sig, 4), np.float32(TABLE_SIGMA))  # the printed digits exactly
    s = 1 - np.arange(21) / 20
    np.testing.assert_array_equal(sig, np.float32(16 * s / (1 + 15 * s)))
    sch = schedulers.make("dpm++", steps=20, shift=16.0)
    np.testing.assert_array_equal(sch.sigmas, sig)
    np.testing.assert_array_equal(sch.timesteps, TABLE_T)
    assert sch.timesteps.dtype == np.float32 and len(set(TABLE_T)) == 20
    for skip, sigma in SKIP_SIGMA.items():
        assert abs(sch.sigmas[skip] - sigma) <= 1e-4 and sch.steps - skip == 20 - skip


def test_grids_and_timesteps():
    # UniPC starts just below 1 (Wan's grid top 0.999, shifted); §7.1 values.
    assert abs(schedulers.sigmas("unipc", 50, 16.0)[0] - 0.99994) < 1e-5
    assert schedulers.timesteps("unipc", schedulers.sigmas("unipc", 50, 16.0, dtype=np.float64))[0] == 999
    np.testing.assert_allclose(schedulers.sigmas("unipc", 50, 5.0)[-3:-1], [0.17227, 0.09251], atol=1e-5)
    for solver in schedulers.SOLVERS:
        for steps, shift in [(20, 16.0), (50, 5.0), (111, 16.0), (148, 1.0)]:
            sch = schedulers.make(solver, steps, shift)
            sig64 = schedulers.sigmas(solver, steps, shift, dtype=np.float64)
            assert sch.sigmas[-1] == 0 and np.all(np.diff(sch.sigmas) < 0)
            np.testing.assert_array_equal(sch.timesteps, schedulers.timesteps(solver, sig64))
            exact = sig64[:-1] * 1000
            if solver == "euler":  # fractional t, as training uses
                np.testing.assert_allclose(sch.timesteps, exact, rtol=1e-7)
            else:  # truncated from the float64 grid (the fp32 grid would give 944 for 945.00001)
                np.testing.assert_array_equal(sch.timesteps, np.trunc(exact))
    assert schedulers.make("euler", 20, 16.0).sigmas.tolist() == schedulers.make("dpm++", 20, 16.0).sigmas.tolist()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown solver"):
        schedulers.make("ddim")
    with pytest.raises(ValueError, match="steps"):
        schedulers.make("dpm++", steps=0)
    with pytest.raises(ValueError, match="shift"):
        schedulers.make("dpm++", shift=-1.0)
    with pytest.raises(ValueError, match="ending in 0"):
        schedulers.timesteps("dpm++", np.ones(5, np.float32))
    sch = schedulers.make("dpm++", 4, 3.0)
    with pytest.raises(ValueError, match="shapes differ"):
        sch.step(sch.init(jnp.zeros(3)), jnp.zeros(3), jnp.zeros(4), 0)
    with pytest.raises(ValueError, match="out of range"):
        sch.step(sch.init(jnp.zeros(3)), jnp.zeros(3), jnp.zeros(3), 4)


# ----------------------------------------------------------------------------------------------------------------
# A toy velocity field: the exact flow of Gaussian data N(μ, s²) (per element) plus a nonlinear term, so x̂₀ moves
# along the trajectory and the multistep terms matter. Written once for numpy, jax and torch.


def toy_velocity(xp, x, sigma, mu, s2):
    a = 1.0 - sigma
    gain = a * s2 / (a * a * s2 + sigma * sigma)
    x0 = mu + gain * (x - a * mu) + 0.1 * xp.sin(x)
    return (x - x0) / sigma


def toy_problem(seed, shape=(2, 3, 4, 5)):
    r = np.random.default_rng(seed)
    x = r.standard_normal(shape).astype(np.float32)
    mu = r.standard_normal(shape).astype(np.float32)
    s2 = r.uniform(0.2, 1.5, shape).astype(np.float32)
    return x, mu, s2


def run_ours(sch, x, mu, s2, skip=0):
    """Python loop; returns the latent after every executed step."""
    x = jnp.asarray(x)
    state, out = sch.init(x), []
    for k in range(skip, sch.steps):
        v = toy_velocity(jnp, x, sch.sigmas[k], mu, s2)
        x, state = sch.step(state, x, v, k)
        out.append(np.asarray(x))
    return np.stack(out)


def run_diffusers(ref, sigmas, x, mu, s2, skip=0):
    x, mu, s2 = (torch.from_numpy(a) for a in (x, mu, s2))
    out = []
    for k in range(skip, len(ref.timesteps)):
        v = toy_velocity(torch, x, float(sigmas[k]), mu, s2)
        x = ref.step(v, ref.timesteps[k], x).prev_sample
        out.append(x.numpy())
    return np.stack(out)


def dpm_reference(sch):
    ref = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=True,
        flow_shift=sch.shift)
    # Its set_timesteps takes no σ list, and its flow grid is not Wan's: build it, then give it our grid.
    ref.set_timesteps(sch.steps)
    ref.sigmas = torch.from_numpy(sch.sigmas)
    ref.timesteps = torch.from_numpy(sch.timesteps.astype(np.int64))
    return ref


def unipc_reference(sch):
    ref = UniPCMultistepScheduler(
        num_train_timesteps=1000, solver_order=2, prediction_type="flow_prediction", predict_x0=True,
        solver_type="bh2", lower_order_final=True, final_sigmas_type="zero", use_flow_sigmas=True,
        flow_shift=sch.shift)
    # Give it Wan's unshifted base grid: it applies the same shift itself, so σ and t must come out identical.
    base = np.linspace(float(np.float32(0.999)), 0.0, sch.steps + 1)[:-1]
    ref.set_timesteps(sigmas=base)
    np.testing.assert_array_equal(ref.sigmas.numpy(), sch.sigmas)
    np.testing.assert_array_equal(ref.timesteps.numpy(), sch.timesteps)
    return ref


@pytest.mark.parametrize("solver,steps,shift,skip", [
    ("dpm++", 20, 16.0, 0), ("dpm++", 20, 16.0, 4), ("dpm++", 12, 5.0, 0),
    ("unipc", 20, 16.0, 0), ("unipc", 20, 16.0, 4), ("unipc", 12, 5.0, 0)])
def test_trajectory_matches_diffusers(solver, steps, shift, skip, seed):
    sch = schedulers.make(solver, steps, shift)
    x, mu, s2 = toy_problem(seed)
    if skip:  # a partial-noise start at σ_skip, with a fresh history on both sides
        x = ((1 - sch.sigmas[skip]) * mu + sch.sigmas[skip] * x).astype(np.float32)
    ref = dpm_reference(sch) if solver == "dpm++" else unipc_reference(sch)
    want = run_diffusers(ref, sch.sigmas, x, mu, s2, skip)
    got = run_ours(sch, x, mu, s2, skip)
    err = np.abs(got - want).max(axis=tuple(range(1, got.ndim)))
    print(f"{solver} steps {steps} shift {shift} skip {skip}: max |ours − diffusers| per step {err.max():.2e} "
          f"(final {err[-1]:.2e}, |x| ≤ {np.abs(want).max():.2f})")
    assert got.shape == want.shape == (steps - skip,) + x.shape
    assert err.max() <= 1e-5, err


def test_skip_first_step_is_first_order(seed):
    """Starting at k = skip with a fresh state differs from continuing a run's history at that k."""
    sch = schedulers.make("dpm++", 20, 16.0)
    x, mu, s2 = (jnp.asarray(a) for a in toy_problem(seed))
    v = toy_velocity(jnp, x, sch.sigmas[4], mu, s2)
    first, _ = sch.step(sch.init(x), x, v, 4)
    m = x - sch.sigmas[4] * v
    a, b = sch.sigmas[5] / sch.sigmas[4], (1 - sch.sigmas[5]) * (1 - (1 - sch.sigmas[4]) * sch.sigmas[5]
                                                                  / (sch.sigmas[4] * (1 - sch.sigmas[5])))
    np.testing.assert_allclose(first, a * x + b * m, atol=1e-6)
    warm = {"x0": m + 1.0, "has_prev": jnp.bool_(True)}
    assert np.abs(np.asarray(sch.step(warm, x, v, 4)[0] - first)).max() > 1e-4


def test_euler_closed_form(seed):
    r = np.random.default_rng(seed)
    lam = r.uniform(-1.0, 1.0, (2, 7)).astype(np.float32)
    x0 = r.standard_normal((2, 7)).astype(np.float32)
    sch = schedulers.make("euler", 20, 16.0)
    x = jnp.asarray(x0)
    state = sch.init(x)
    for k in range(sch.steps):
        x, state = sch.step(state, x, lam * x, k)
    sig = sch.sigmas.astype(np.float64)
    want = np.prod(1 + lam[None].astype(np.float64) * np.diff(sig)[:, None, None], axis=0) * x0
    np.testing.assert_allclose(np.asarray(x), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", schedulers.SOLVERS)
def test_straight_flow_is_exact(solver, seed):
    """Data at a single point x₀: the flow is the straight line x_σ = (1 − σ)x₀ + σε, v = ε − x₀ everywhere on it.
    Every solver must stay on the line and land on x₀ (catches sign, α/σ mix-ups and a bad final step)."""
    r = np.random.default_rng(seed)
    eps, x0 = r.standard_normal((2, 2, 3, 4)).astype(np.float32)
    sch = schedulers.make(solver, 20, 16.0)
    skip = 3
    x = jnp.asarray((1 - sch.sigmas[skip]) * x0 + sch.sigmas[skip] * eps)
    state = sch.init(x)
    for k in range(skip, sch.steps):
        x, state = sch.step(state, x, (x - x0) / sch.sigmas[k], k)
        np.testing.assert_allclose(x, (1 - sch.sigmas[k + 1]) * x0 + sch.sigmas[k + 1] * eps, atol=2e-5)
    np.testing.assert_array_equal(np.isfinite(x), True)


@pytest.mark.parametrize("solver", schedulers.SOLVERS)
def test_scan_with_traced_step_matches_loop(solver, seed):
    sch = schedulers.make(solver, 20, 16.0)
    x, mu, s2 = toy_problem(seed, shape=(2, 6))
    skip = 4
    want = run_ours(sch, x, mu, s2, skip)[-1]

    @jax.jit
    def sample(x):
        def body(carry, k):
            x, state = carry
            v = toy_velocity(jnp, x, jnp.asarray(sch.sigmas)[k], mu, s2)
            return sch.step(state, x, v, k), None
        (x, _), _ = jax.lax.scan(body, (x, sch.init(x)), jnp.arange(skip, sch.steps))
        return x

    got = sample(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, sample(jnp.asarray(x)), atol=1e-2)  # bf16 input rounding only
    np.testing.assert_allclose(sample(jnp.asarray(x)), want, atol=2e-6)


def test_grad_through_dpm_trajectory_is_finite(seed):
    """From σ = 1 (λ = −∞) to σ = 0 (λ = +∞): no 0·∞ may reach the backward pass."""
    sch = schedulers.make("dpm++", 20, 16.0)
    _, mu, s2 = toy_problem(seed, shape=(2, 6))

    def loss(x):
        def body(carry, k):
            x, state = carry
            v = toy_velocity(jnp, x, jnp.asarray(sch.sigmas)[k], mu, s2)
            return sch.step(state, x, v, k), None
        (x, _), _ = jax.lax.scan(body, (x, sch.init(x)), jnp.arange(sch.steps))
        return jnp.sum(x ** 2)

    x = jnp.asarray(np.random.default_rng(seed).standard_normal((2, 6)), jnp.float32)
    g = jax.jit(jax.grad(loss))(x)
    assert np.all(np.isfinite(g)) and np.abs(g).max() > 0
    # The gradient is the true one: compare a central difference along a random direction.
    d = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((2, 6)), jnp.float32)
    fd = (loss(x + 1e-2 * d) - loss(x - 1e-2 * d)) / 2e-2
    np.testing.assert_allclose(jnp.vdot(g, d), fd, rtol=2e-2)
