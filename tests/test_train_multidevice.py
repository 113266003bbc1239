"""Multi-process training: two real processes (jax.distributed on localhost, 4 CPU devices each) match a
single-process 8-device run. (The sharded step against one device: tests/test_sharded_model.py.)

XLA_FLAGS must be set before JAX starts, so every part runs in its own Python process.
"""
import os
import pathlib
import socket
import subprocess
import sys
import textwrap


ROOT = pathlib.Path(__file__).resolve().parents[1]

_PRELUDE = textwrap.dedent("""
    import os, sys, importlib.util, functools, json
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from absl import flags; flags.FLAGS.mark_as_parsed()
    from pickstyle_jax import sharding
    from pickstyle_jax.train import checkpointing, setup, step
    from pickstyle_jax.data import pipeline
    assert jax.device_count() == 8, jax.devices()
    spec = importlib.util.spec_from_file_location("cfg", "configs/pickstyle.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    rel = lambda a, b: float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30))
""")

_REFERENCE = _PRELUDE + textwrap.dedent("""
    workdir, other = sys.argv[1], sys.argv[2]
    c = mod.get_config("tiny")
    c.data.batch_size, c.total_steps = 8, 3
    tr = setup.prepare(c, workdir)
    # The global batch of a 2-process run: process 0's share, then process 1's.
    its = []
    for p in range(2):
        d = c.data.copy_and_resolve_references(); d.unlock(); d.process_index, d.process_count = p, 2
        its.append(pipeline.make_iterator(d, seed=c.seed))
    state, losses = tr.state, []
    for step in range(3):
        parts = [next(it) for it in its]
        host = {k: np.concatenate([p[k] for p in parts]) for k in ("source", "target", "caption")}
        state, m = tr.step_fn(tr.base, state, setup.device_batch(tr, host), tr.step_key)
        losses.append(float(m["loss"]))
    got = [json.loads(l)["loss"] for l in open(os.path.join(other, "metrics.jsonl")) if l.strip()]
    print("single process", losses, "two processes", got)
    np.testing.assert_allclose(got, losses, rtol=1e-5)
    # the two processes' checkpoint restores here, in one process on 8 devices
    mgr = checkpointing.checkpoint_manager(other, 3)
    assert mgr.latest_step() == 3, mgr.all_steps()
    restored = checkpointing.restore_state(mgr, 3, {"train": tr.abstract.state, "key": tr.abstract.key})
    errs = jax.tree.leaves(jax.tree.map(rel, restored["train"]["lora"], jax.device_get(state["lora"])))
    print("max relative LoRA difference:", max(errs))
    assert max(errs) < 1e-5 and int(restored["train"]["step"]) == 3
""")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port, run = _free_port(), tmp_path / "two"
    env = {**_env(), "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "pickstyle_jax.train", "--config=configs/pickstyle.py:tiny", f"--workdir={run}",
         "--config.total_steps=3", "--config.data.batch_size=8", "--config.checkpoint_every=3",
         f"--config.distributed.coordinator=127.0.0.1:{port}", "--config.distributed.num_processes=2",
         f"--config.distributed.process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:  # a hung collective must not outlive the test
        for p in procs:
            p.kill()
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    assert "8 devices (2 processes)" in outs[0]
    assert (run / "lora" / "config.json").is_file() and (run / "pickstyle_lora.pth").is_file()
    r = subprocess.run([sys.executable, "-c", _REFERENCE, str(tmp_path / "one"), str(run)], capture_output=True,
                       text=True, env=_env(), cwd=ROOT, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-4000:]}"
