"""`python -m pickstyle_jax.plan --config=configs/NAME.py --devices=N [--job=train|stylize]`: the memory plan on N
simulated devices of the training step (--job=train, the default: pickstyle_jax/train/plan.py) or of stylising one
clip (--job=stylize: one CS-CFG step, the VAE encode and decode, the text encoder; pickstyle_jax/sample/plan.py, with
--size, --frames and --mesh). Each planner's docstring has the details. This entry point's one job is to make the N
host devices before JAX starts (XLA_FLAGS), so it imports the planner only after setting them.

It also turns off XLA:CPU's while-loop invariant code motion (unless XLA_FLAGS already names passes to disable):
XLA:CPU has no bf16 matmul, so it converts bf16 weights to fp32 before every dot, and that pass then hoists the
conversion of the whole stacked weights out of the layer loop: an fp32 copy of every block's weights (8.4 GB for
vace-1.3B on one device) that a GPU or TPU program, whose matmuls take bf16, never holds.
"""
import os
import sys

# the module docstring says why; bench/compile.py plans with the same flag
HOST_PLAN_FLAGS = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


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
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_disable_hlo_passes" not in flags:
        flags += f" {HOST_PLAN_FLAGS}"
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={_devices_from_argv(sys.argv)}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if job == "stylize":
        from pickstyle_jax.sample import plan  # after XLA_FLAGS: importing it starts JAX
    else:
        from pickstyle_jax.train import plan

    plan.main()
