"""Test-wide setup: exact fp32 matmuls for parity tests, absl flags parsed for grain workers."""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Compiling is most of this suite's time on CPU. LLVM at -O0 without its expensive passes compiles the same HLO in
# about two thirds of the time (the partitioner, the fusions and the numerics are XLA's, not LLVM's); the
# subprocesses the tests start inherit it (their preludes append their device counts to XLA_FLAGS:
# tests/multidevice.py).
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402
from absl import flags  # noqa: E402

# Parity tests compare against torch fp32; XLA's CPU default is already fp32, but on GPU/TPU "default" means bf16
# passes, so pin it.
jax.config.update("jax_default_matmul_precision", "highest")

# Grain's multiprocess loading reads absl flags in its workers.
flags.FLAGS.mark_as_parsed()

try:  # torch is a test-only reference; keep it to the two cores CI has.
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
except ImportError:  # pragma: no cover
    pass


def run_seed() -> int:
    """The run's random seed: $PICKSTYLE_TEST_SEED if set (to replay a failure), else fresh entropy."""
    import numpy as np

    env = os.environ.get("PICKSTYLE_TEST_SEED")
    return int(env) if env else int(np.random.SeedSequence().entropy % 2**31)


SEED = run_seed()
print(f"pickstyle test seed: {SEED} (replay with PICKSTYLE_TEST_SEED={SEED})")


import pytest  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    """Per-test seed derived from the run seed and the test name; printed so a failure can be replayed."""
    s = (SEED + sum(map(ord, request.node.name))) % 2**31
    print(f"seed {s} (run seed {SEED}, PICKSTYLE_TEST_SEED={SEED} replays it)")
    return s
