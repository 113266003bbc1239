"""`python -m pickstyle_jax.plan --config=configs/NAME.py --devices=N`: the memory plan of the training step on N
simulated devices (pickstyle_jax/train/plan.py, which has the details). This entry point's one job is to make the N
host devices before JAX starts (XLA_FLAGS), so it imports the planner only after setting them.
"""
import os
import sys


def _devices_from_argv(argv) -> int:
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 8


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_devices_from_argv(sys.argv)}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from pickstyle_jax.train import plan  # after XLA_FLAGS: importing it starts JAX

    plan.main()
