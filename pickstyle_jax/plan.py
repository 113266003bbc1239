"""`python -m pickstyle_jax.plan --config=configs/NAME.py --devices=N [--job=train|stylize]`: the memory plan on N
simulated devices of the training step (--job=train, the default: pickstyle_jax/train/plan.py) or of stylising one
clip (--job=stylize: one CS-CFG step, the VAE encode and decode, the text encoder; pickstyle_jax/sample/plan.py, with
--size, --frames and --mesh). Each planner's docstring has the details. This entry point's one job is to make the N
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


def _pop_job(argv) -> str:
    """Removes --job=NAME / --job NAME from argv (the planners do not know the flag); returns NAME."""
    for i, a in enumerate(argv):
        if a.startswith("--job="):
            del argv[i]
            return a.split("=", 1)[1]
        if a == "--job" and i + 1 < len(argv):
            job = argv[i + 1]
            del argv[i: i + 2]
            return job
    return "train"


if __name__ == "__main__":
    job = _pop_job(sys.argv)
    if job not in ("train", "stylize"):
        from pickstyle_jax import errors  # imports no JAX

        print(f"error: --job={job}: choose train or stylize", file=sys.stderr)
        sys.exit(errors.EXIT_CODE)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_devices_from_argv(sys.argv)}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if job == "stylize":
        from pickstyle_jax.sample import plan  # after XLA_FLAGS: importing it starts JAX
    else:
        from pickstyle_jax.train import plan

    plan.main()
