"""The training run: `run(config, workdir) -> exit code`, and the command line.

    python -m pickstyle_jax.train --config=configs/pickstyle.py --workdir=runs/x [--config.total_steps=100 ...]

After `setup.prepare` (checks, distributed init, mesh, base models straight into their shardings, the caption table,
the compiled step): the Grain iterator over the source prepare built, resume from the latest Orbax checkpoint (state,
step key, iterator position), then the steps. Metrics are read one step behind, as nanodo does: step N+1 is
dispatched before step N's loss is pulled to the host, so the host never stalls the device queue; a step's metrics are
always read (and its loss checked for NaN) before its state is checkpointed, and the last step's before the run ends.
Checkpoints every `checkpoint_every` steps and on SIGTERM/SIGINT, and the LoRA exported at the end (checkpoint dir,
PickStyle .pth and PEFT safetensors). Process 0 logs every `log_every` steps to metrics.jsonl and to a TensorBoard
event file beside it (tensorboard.py: a new events.out.tfevents.* per run start, which marks a restart after the step
it starts from, so TensorBoard drops what a killed run logged past its checkpoint, as trim_metrics does for
metrics.jsonl): loss, grad_norm, lr, steps_per_s, tokens_per_s, and mfu where the device's peak is known
(config.peak_flops, else flops.PEAK_BF16; the step's analytic FLOPs, flops.train_step_flops, per second over all
devices' peak); when the run stops (done or by a signal) it draws loss.png from metrics.jsonl (plot.py).
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from pickstyle_jax import errors, flops, lora as lora_lib
from pickstyle_jax.data import pipeline
from pickstyle_jax.data.sources import DataError
from pickstyle_jax.train import checkpointing, plot, setup as setup_lib, tensorboard

__all__ = ["LossNotFinite", "run", "main"]


class LossNotFinite(FloatingPointError):
    """The loss became NaN or inf: the message names the step and the last good checkpoint (a user error: the
    learning rate or the data, not the code)."""


class _Metrics:
    """Step metrics, read one step behind: `push(step, metrics)` hands in a dispatched step's device metrics and
    reports the previous one; `flush()` reports the pending one now. Reporting pulls to the host, raises
    LossNotFinite, and on log steps writes metrics.jsonl and the event file (process 0) and the console line or
    progress bar."""

    def __init__(self, config, tr: setup_lib.TrainSetup, start: int, mgr):
        self.log_every, self.total, self.tokens = int(config.log_every), tr.total, tr.tokens_per_step
        self.lr = float(config.optim.lr)
        self.mgr = mgr
        self.main = jax.process_index() == 0
        self.file = open(tr.workdir / "metrics.jsonl", "a") if self.main else None
        self.events = tensorboard.EventWriter(tr.workdir, resume_step=start) if self.main else None
        peak = float(config.peak_flops) or flops.peak_flops(jax.devices()[0].device_kind)
        batch = int(config.data.batch_size)
        step_flops = flops.train_step_flops(tr.cfg.wcfg, tr.tokens_per_step // batch, batch)
        self.mfu_terms = None if peak is None else (step_flops, peak * jax.device_count())
        self.bar = None
        if self.main and sys.stderr.isatty():
            from tqdm import tqdm  # optional: only an interactive run draws a bar

            self.bar = tqdm(total=self.total, initial=start, unit="step", dynamic_ncols=True)
        self.pending = None
        self.window_t, self.window_n = time.perf_counter(), 0

    def push(self, step: int, metrics) -> None:
        self.flush()
        self.pending = (step, metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, m = self.pending
        self.pending = None
        m = jax.device_get(m)
        self.window_n += 1
        loss = float(m["loss"])
        if not math.isfinite(loss):
            raise LossNotFinite(
                f"loss is {loss} at step {step}; stopping without saving it. The last good checkpoint is step "
                f"{self.mgr.latest_step()} in {self.mgr.directory} (a rerun resumes there; consider a lower optim.lr)")
        if step % self.log_every == 0 or step == self.total:
            dt = time.perf_counter() - self.window_t
            sps = self.window_n / dt if dt > 0 else 0.0
            row = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": self.lr,
                   "steps_per_s": sps, "tokens_per_s": sps * self.tokens}
            if self.mfu_terms is not None:
                step_flops, peak = self.mfu_terms
                row["mfu"] = step_flops * sps / peak
            if self.file:
                self.file.write(json.dumps(row) + "\n")
                self.file.flush()
                self.events.scalars(step, {k: v for k, v in row.items() if k != "step"})
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", gnorm=f"{row['grad_norm']:.3f}")
            elif self.main:
                eta = (self.total - step) / sps if sps else float("nan")
                mfu = f" mfu {row['mfu']:.1%}" if "mfu" in row else ""
                print(f"step {step}/{self.total} loss {loss:.5f} grad_norm {row['grad_norm']:.4f} "
                      f"{sps:.2f} steps/s {row['tokens_per_s']:.0f} tokens/s{mfu} eta {eta:.0f}s", flush=True)
            self.window_t, self.window_n = time.perf_counter(), 0
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()
            self.events.close()


def run(config, workdir) -> int:
    """The training run (module docstring); returns the exit code (0 done, 128 + signal when stopped)."""
    t_start = time.perf_counter()

    def say(msg):
        if jax.process_index() == 0:
            print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

    workdir = Path(workdir).absolute()
    tr = setup_lib.prepare(config, workdir, say)
    state, step_key = tr.state, tr.step_key
    main_proc = jax.process_index() == 0
    it = pipeline.make_iterator(config.data, seed=config.seed, source=tr.source)
    mgr = checkpointing.checkpoint_manager(workdir, config.keep)
    start = 0
    if mgr.latest_step() is not None:
        start = int(mgr.latest_step())
        restored = checkpointing.restore_state(mgr, start, {"train": tr.abstract.state, "key": tr.abstract.key}, it)
        state, step_key = restored["train"], restored["key"]
        say(f"resumed from {mgr.directory} at step {start}")
    if main_proc:  # what a killed run logged past its checkpoint (or before its first) is logged again
        checkpointing.trim_metrics(workdir / "metrics.jsonl", start)

    metrics = _Metrics(config, tr, start, mgr)
    step, code, saved = start, 0, start
    try:
        with checkpointing.Signals() as sig:
            while step < tr.total:
                try:
                    host = next(it)
                except StopIteration:
                    say(f"data exhausted after step {step}")
                    break
                except DataError as e:  # raised where an example is read: in this process or a Grain worker
                    it.close()
                    metrics.flush()
                    raise DataError(f"{e} (training stopped after step {step}; {_kept(mgr)})") from e
                state, m = tr.step_fn(tr.base, state, setup_lib.device_batch(tr, host), step_key)
                step += 1
                metrics.push(step, m)  # reports step - 1 while this step runs
                stop = sig.agreed()
                if step % int(config.checkpoint_every) == 0 or stop or step == tr.total:
                    metrics.flush()  # never checkpoint a step whose loss was not checked
                    checkpointing.save(mgr, step, state, step_key, it)
                    saved = step
                if stop:
                    if main_proc:
                        print(f"stopped by {signal.Signals(stop).name} after step {step}; checkpoint saved in "
                              f"{mgr.directory}; run the same command again to resume", flush=True)
                    code = 128 + stop
                    break
            metrics.flush()
    finally:
        metrics.close()
    if main_proc:
        _loss_png(workdir)
    if code == 0 and saved != step:
        checkpointing.save(mgr, step, state, step_key, it)
    mgr.close()
    if code == 0:  # every process: the LoRA may be split across hosts, and the Orbax save is collective
        lora = multihost_utils.process_allgather(state["lora"], tiled=True)
        out = checkpointing.export_lora(workdir, lora_lib.Lora(lora, tr.cfg.lcfg))
        if main_proc:
            print(f"done: step {step}; LoRA in {out}, {workdir / 'pickstyle_lora.pth'} (PickStyle) and "
                  f"{workdir / 'lora.safetensors'} (PEFT / diffusers)", flush=True)
    return code


def _loss_png(workdir: Path) -> None:
    """WORKDIR/loss.png from every step metrics.jsonl holds (earlier runs of a resumed run included)."""
    rows = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    if rows:
        plot.write_loss_png(workdir / "loss.png", [r["step"] for r in rows], [r["loss"] for r in rows])


def _kept(mgr) -> str:
    last = mgr.latest_step()
    if last is None:
        return "no checkpoint was saved yet"
    return (f"checkpoint step {last} in {mgr.directory} is kept: fix the file and run the same command again to "
            f"resume from it")


def main(argv=None):
    """The command line (module docstring). Bad input ends in one line `error: ...` and exit status 2 (errors.py);
    --verbose or PICKSTYLE_TRACEBACK=1 shows the traceback."""
    from absl import app, flags  # the command line's own dependencies, not the library's
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py[:variant])", lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, exports")
    flags.mark_flags_as_required(["config", "workdir"])

    def _main(argv):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}")
        return run(errors.config_flag(), flags.FLAGS.workdir)

    errors.absl_run(_main, argv)
