"""What the multi-device tests' subprocesses share (tests/test_sharded_model.py, tests/test_context_parallel.py).

Those tests run their checks in a fresh Python process (XLA_FLAGS must name the simulated devices before JAX
starts), so they pass source text: each prelude appends its device count to XLA_FLAGS (keeping the fast-compile
flags tests/conftest.py puts there), imports JAX and the library, then appends CHECKS.
"""
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# relative error, a collecting check (every case reports before the test fails), and LoRA B factors made non-zero
CHECKS = textwrap.dedent("""
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30))
    errors = []

    def check(name, got, want, tol=1e-5):
        err = rel(got, want)
        print(f"{name}: relative error {err:.2e}", flush=True)
        if not err <= tol:
            errors.append(f"{name}: {err:.3g}")

    def random_b(adapters, key):  # lora.init zeroes B, which would zero every A gradient
        return jax.tree.map(lambda a: a + 0.1 * jax.random.normal(key, a.shape), adapters)
""")


def run(*args, timeout=900):
    """`python -c SOURCE ARGS...` with the repository importable; prints its stdout and fails with its output's tail
    on a non-zero exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=timeout)
    print(r.stdout)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
